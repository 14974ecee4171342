//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// longwire serves block volumes over the network (NBD and iSCSI).
///
/// Run `longwire serve` with no arguments for a 1 GiB sparse volume named
/// `default` in ./longwire-data, over NBD on 127.0.0.1:10809 and iSCSI on
/// 127.0.0.1:3260. Then, for example: `nbdinfo nbd://127.0.0.1/default` or
/// `iscsi-ls -s iscsi://127.0.0.1`.
#[derive(Debug, Parser)]
#[command(name = "longwire", version, propagate_version = true)]
pub struct Cli {
    /// More logging (-v debug, -vv trace). RUST_LOG overrides this.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve volumes over NBD and iSCSI until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Expose a remote NBD export as a file (FUSE), surviving server restarts.
    ///
    /// Mounts DIR (which must exist) and shows the export in it as the single
    /// regular file DIR/FILE, like `nbdfuse DIR/FILE URI`. Use it like a disk
    /// image: `mkfs.ext4 DIR/FILE`, `mount -o loop DIR/FILE /mnt`, qemu, dd.
    /// The process stays in the foreground until the mount goes away.
    ///
    /// Unlike nbdfuse it rides out server restarts and network cuts: a lost
    /// connection is re-established with backoff (100 ms doubling to 5 s) and
    /// the requests that were in flight are sent again, so the file just
    /// stalls meanwhile. A request fails (EIO to the reader or writer) when it
    /// has not completed within --timeout, when the server stays unreachable
    /// for longer than --reconnect-for, or at once when the export comes back
    /// with a different size or name.
    Attach(AttachArgs),
    /// Unmount what `longwire attach` mounted (the attach process then exits).
    Detach(DetachArgs),
    /// Copy one volume onto another (file:, sqlite:, memory:, nbd://, nbds://), sparse-aware.
    ///
    /// Both are volume URIs: file:PATH, sqlite:PATH?volume=NAME, memory:?size=N,
    /// nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, and over TLS
    /// nbds://HOST[:PORT]/EXPORT?tls-certificates=DIR (DIR holds ca-cert.pem,
    /// and client-cert.pem + client-key.pem for a client certificate). SRC's
    /// allocation map (SEEK_HOLE for files, chunk maps for sqlite, NBD block
    /// status) is walked first; data is copied in 4 MiB pieces, several at
    /// once; holes and zero runs are not read, and are zeroed on DST only where
    /// DST may hold data. DST is flushed at the end.
    Copy(CopyArgs),
}

#[derive(Debug, Args)]
#[command(after_help = "\
How the options map onto the client (longwire_nbd::client::ClientConfig):
  --timeout SECS        request_timeout (default 30): the longest one read,
                        write, flush... may take, including time queued
                        behind a reconnect; also how long a connection with
                        requests outstanding may stay silent before it is
                        dropped and replaced.
  --reconnect-for SECS  reconnect.give_up_after (default 60): how long the
                        connection may stay down before every queued and
                        later request fails; 'forever' never gives up
                        (requests still fail after --timeout); 0 turns
                        reconnecting off (reconnect.enabled = false).
  --connections N       connections (default 1), used only when the server
                        advertises CAN_MULTI_CONN.
  --read-only           the file is read-only (also when the export is).

Requests: read/write go straight to the export (direct I/O, many in flight);
fsync flushes the export (close() does not, as with a local file); writes
on an O_SYNC/O_DSYNC descriptor are sent with FUA; fallocate(PUNCH_HOLE)
zeroes and deallocates (NBD WRITE_ZEROES, or TRIM when the server cannot
zero), fallocate(ZERO_RANGE) zeroes.

Detaching: `longwire detach DIR/FILE` (or DIR, or `fusermount3 -u DIR`), or
SIGINT/SIGTERM to the attach process: it flushes the export, unmounts and
exits 0. A mount still in use (e.g. loop-mounted) cannot be unmounted: the
attach process then logs it and keeps serving.

Examples:
  mkdir -p /mnt/nbd && longwire attach nbd://127.0.0.1/default /mnt/nbd/disk &
  longwire attach 'nbd+unix:///vm1?socket=/run/longwire.sock' /mnt/vm1/disk --timeout 120
  longwire attach 'nbds://nbd.example.com/vm2?tls-certificates=/etc/pki/nbd' /mnt/vm2/disk
  longwire detach /mnt/nbd/disk")]
pub struct AttachArgs {
    /// nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH; over TLS
    /// nbds://HOST[:PORT]/EXPORT?tls-certificates=DIR or
    /// nbds+unix:///EXPORT?socket=PATH&tls-certificates=DIR (DIR holds
    /// ca-cert.pem, and client-cert.pem + client-key.pem for a client
    /// certificate, as for libnbd).
    #[arg(value_name = "URI")]
    pub uri: String,

    /// DIR/FILE: DIR (an existing directory) is mounted and the export
    /// appears in it as the file FILE.
    #[arg(value_name = "DIR/FILE")]
    pub file: PathBuf,

    /// Fail a request that has not completed after SECS seconds, waiting
    /// for reconnects included [default: 30].
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,

    /// Connections to the server (used when it allows several) [default: 1].
    #[arg(long, value_name = "N")]
    pub connections: Option<usize>,

    /// Expose the file read-only.
    #[arg(long)]
    pub read_only: bool,

    /// Keep trying to reconnect for SECS seconds after losing the server
    /// ('forever', or 0 for never) [default: 60].
    #[arg(long, value_name = "SECS")]
    pub reconnect_for: Option<String>,
}

/// Unmount a `longwire attach` mount; the attach process flushes and exits 0.
#[derive(Debug, Args)]
pub struct DetachArgs {
    /// The attached file (DIR/FILE) or its mount point (DIR).
    #[arg(value_name = "FILE_OR_DIR")]
    pub path: PathBuf,
}

#[derive(Debug, Args)]
#[command(after_help = "\
DST must be at least as large as SRC. A file: or sqlite: DST without size=
is created at SRC's size if missing (sparse), and grown to it if smaller.

Progress (bytes copied of the data total, MB/s) is shown on stderr when it
is a terminal; a summary (bytes read, holes skipped, time, throughput) is
always printed at the end.

Examples:
  longwire copy file:disk.raw nbd://127.0.0.1/default
  longwire copy nbd://127.0.0.1/default file:backup.img
  longwire copy file:disk.raw 'nbds://nbd.example.com/default?tls-certificates=/etc/pki/nbd'
  longwire copy file:disk.raw 'sqlite:vols.db?volume=disk1'")]
pub struct CopyArgs {
    /// Source volume URI.
    #[arg(value_name = "SRC")]
    pub src: String,

    /// Destination volume URI.
    #[arg(value_name = "DST")]
    pub dst: String,

    /// Connections per NBD end (used when the server allows several) [default: 4].
    #[arg(long, value_name = "N")]
    pub connections: Option<usize>,

    /// Pieces copied at once [default: 8].
    #[arg(long, value_name = "N")]
    pub parallel: Option<usize>,

    /// No progress line (the final summary is still printed).
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Volume URIs:
  file:PATH?size=10G        a raw image; created sparse at that size if missing
  memory:?size=1G           a sparse in-memory volume (lost at exit)
  Extra parameters: readonly=true, description=Some%20text

Listeners:
  With no --listen, --unix or --iscsi (here or in the config file), NBD
  listens on 127.0.0.1:10809 and iSCSI on 127.0.0.1:3260. Once any listener
  is given, only the listeners given are opened.

iSCSI:
  Every export is a target iqn.2026-11.dev.longwire:<export> with the volume
  at LUN 0 (grouping, CHAP and initiator allow-lists: see docs/CONFIG.md).
  Try: iscsi-ls -s iscsi://127.0.0.1:3260

Examples:
  longwire serve
  longwire serve --export disk=file:/srv/disk.img?size=100G --listen 0.0.0.0:10809
  longwire serve --export disk=file:/srv/disk.img?size=100G --iscsi 0.0.0.0:3260
  longwire serve --export scratch=memory:?size=4G --unix /run/longwire.sock
  longwire serve --config /etc/longwire.toml")]
pub struct ServeArgs {
    /// Export a volume as NAME=URI (repeatable).
    #[arg(short, long = "export", value_name = "NAME=URI")]
    pub exports: Vec<String>,

    /// Listen for NBD on a TCP address, IPv4 or [IPv6] (repeatable; port 0
    /// picks a free port). Default: 127.0.0.1:10809 when no listener of any
    /// kind is given.
    #[arg(short, long = "listen", value_name = "ADDR")]
    pub listen: Vec<String>,

    /// Listen for iSCSI on a TCP address, IPv4 or [IPv6] (repeatable; port
    /// 0 picks a free port). Default: 127.0.0.1:3260 when no listener of any
    /// kind is given.
    #[arg(long = "iscsi", value_name = "ADDR")]
    pub iscsi: Vec<String>,

    /// Do not serve iSCSI (not even on the default address).
    #[arg(long)]
    pub no_iscsi: bool,

    /// Listen for NBD on a unix socket at PATH.
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,

    /// Read exports and settings from a TOML file (see docs/CONFIG.md).
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Seconds a client may take to finish the NBD handshake or the iSCSI
    /// login.
    #[arg(long, value_name = "SECS")]
    pub handshake_timeout: Option<u64>,

    /// Requests one connection may have in flight before the server stops
    /// reading more from it.
    #[arg(long, value_name = "N")]
    pub max_in_flight: Option<usize>,

    /// Most NBD connections served at once; beyond it new connections are
    /// closed as soon as they are accepted (0: unlimited) [default: 1024].
    /// Per-export caps: `max_connections` in an [[export]] of --config.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Close an NBD connection that has had no request in flight and sent
    /// nothing for SECS seconds (0: never) [default: 0].
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,

    /// Threads doing blocking file I/O (writes, syncs, uncached reads) for
    /// all file volumes [default: 4].
    #[arg(long, value_name = "N")]
    pub io_threads: Option<usize>,

    /// NBD TLS (STARTTLS, TLS 1.3): off, optional (plaintext clients still
    /// served) or required [default: required when --tls-cert is given,
    /// else off].
    #[arg(long, value_name = "MODE")]
    pub tls: Option<longwire_nbd::TlsMode>,

    /// Server certificate chain for NBD TLS (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// Private key of the server certificate (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// CA certificate(s) (PEM): NBD TLS clients must present a certificate
    /// issued by one of them.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
}
