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
    Serve(Box<ServeArgs>),
    /// Show a running server's exports and connections (from its admin endpoint).
    ///
    /// Exports: size, protocols, connections, requests, bytes read and
    /// written, errors, and the state layers (mirror, clone, …) report.
    /// Connections: id, protocol, export, peer, state (handshake,
    /// transmission, closing), requests queued (received), dispatched
    /// (answered), errored, pending (received, not yet answered) and age.
    /// The server must run with the admin endpoint on (`--admin ADDR`; on
    /// by default at 127.0.0.1:9810 for `longwire serve` with no listener
    /// options).
    Status(StatusArgs),
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
    /// Copy one volume onto another (file:, sqlite:, s3://, memory:, nbd://, nbds://), sparse-aware.
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
    /// Move a volume from SRC (usually nbd://old-host/disk) to DST, resumably.
    ///
    /// DST is filled exactly as an export with ?clone-from=SRC would be:
    /// SRC's block status is asked first, so holes and zero runs are never
    /// copied; data regions (1 MiB) are copied several at once; a bitmap
    /// beside DST (PATH.clone-bitmap, or in state=DIR for other stores)
    /// records what is done, so an interrupted migrate started again
    /// continues where it stopped. Source disconnects are retried with
    /// backoff. Exits once every region is local and DST is flushed.
    ///
    /// To keep serving clients during the move, serve DST instead:
    /// --export disk='file:disk.img?clone-from=nbd://old-host/disk'.
    Migrate(MigrateArgs),
    /// Create a volume: a sparse image file, or a volume in an SQLite database or an S3 bucket.
    Create(CreateArgs),
    /// List the volumes of an SQLite database or S3 bucket prefix, or the image files of a directory.
    List(ListArgs),
    /// Show a volume's size, allocated bytes, chunk size and compression.
    Info(InfoArgs),
    /// Delete a volume and its data (an SQLite or S3 volume, or an image file).
    Delete(DeleteArgs),
}

/// A size such as 10G or 65536 (binary units), for clap.
fn size_arg(s: &str) -> Result<u64, String> {
    longwire_store::parse_size(s)
}

/// `none` or `zstd`, for clap.
fn compression_arg(s: &str) -> Result<longwire_store::sqlite::Compression, String> {
    longwire_store::sqlite::Compression::parse(s)
        .ok_or_else(|| format!("unknown compression {s:?}; use zstd or none"))
}

#[derive(Debug, Args)]
#[command(after_help = "\
file:PATH creates a sparse image (and missing parent directories); nothing
is written, so it takes no space until data arrives.
sqlite:PATH?volume=NAME creates volume NAME in the database PATH, and the
database if it is missing; one database holds many volumes. Chunk size and
compression are fixed for the life of the volume.
An existing volume is never touched unless --force is given.

Examples:
  longwire create file:/srv/images/vm1.img --size 20G
  longwire create 'sqlite:/srv/volumes.db?volume=vm1' --size 20G
  longwire create 'sqlite:/srv/volumes.db?volume=logs' --size 100G --chunk-size 256K --compression zstd
  longwire serve --export vm1='sqlite:/srv/volumes.db?volume=vm1'")]
pub struct CreateArgs {
    /// file:PATH or sqlite:PATH?volume=NAME.
    #[arg(value_name = "URI")]
    pub uri: String,

    /// Size of the volume, e.g. 10G (K, M, G, T, P are powers of 1024); may
    /// also be given as size= in the URI.
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    pub size: Option<u64>,

    /// sqlite only: chunk size, a power of two from 4K to 4M [default: 64K].
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    pub chunk_size: Option<u64>,

    /// sqlite only: compress chunks with zstd, or none [default: none].
    #[arg(long, value_name = "zstd|none", value_parser = compression_arg)]
    pub compression: Option<longwire_store::sqlite::Compression>,

    /// Replace an existing volume of that name; its data is lost.
    #[arg(long)]
    pub force: bool,

    /// Print the new volume as JSON (as `longwire info --json`).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Columns: SIZE as clients see it; ALLOCATED, the part that holds data (the
rest reads as zeros and takes no space) and USED, that as a share of SIZE;
for SQLite volumes STORED (the bytes of chunk data after compression), CHUNK
and COMPRESSION. --json prints every field, sizes in bytes.

Examples:
  longwire list sqlite:/srv/volumes.db
  longwire list file:/srv/images
  longwire list --json sqlite:/srv/volumes.db")]
pub struct ListArgs {
    /// sqlite:PATH (a database) or file:DIR (a directory of images).
    #[arg(value_name = "STORE-URI")]
    pub store: String,

    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  longwire info 'sqlite:/srv/volumes.db?volume=vm1'
  longwire info file:/srv/images/vm1.img --json")]
pub struct InfoArgs {
    /// file:PATH or sqlite:PATH?volume=NAME.
    #[arg(value_name = "URI")]
    pub uri: String,

    /// Print JSON (sizes in bytes) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "\
A volume that holds data (any allocated bytes) is only deleted with --yes;
an empty one (just created, or fully trimmed) is deleted without it.
Deleting cannot be undone. Stop serving a volume before deleting it: a
server that still has it open keeps answering, but what it writes is lost.
An SQLite database does not shrink when a volume is deleted: later writes
reuse the space (run `sqlite3 PATH VACUUM` offline to give it back).
Only image files are deleted, never directories or devices.

Examples:
  longwire delete 'sqlite:/srv/volumes.db?volume=scratch' --yes
  longwire delete file:/srv/images/old.img --yes")]
pub struct DeleteArgs {
    /// file:PATH or sqlite:PATH?volume=NAME.
    #[arg(value_name = "URI")]
    pub uri: String,

    /// Delete even though the volume holds data.
    #[arg(long)]
    pub yes: bool,
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

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The server's admin address [default: 127.0.0.1:9810].
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,

    /// Print the server's JSON status as it is.
    #[arg(long)]
    pub json: bool,
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

/// `longwire migrate SRC DST`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Source volume URI (nbd://, nbd+unix://, nbds://, or a store URI).
    #[arg(value_name = "SRC")]
    pub src: String,

    /// Destination volume URI (file:PATH is created at SRC's size; other
    /// stores need &state=DIR for the hydration bitmap).
    #[arg(value_name = "DST")]
    pub dst: String,

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
  is given, only the listeners given are opened. The admin endpoint
  (--admin: /metrics for Prometheus, /status for `longwire status`) follows
  the same rule: 127.0.0.1:9810 with no listener options, else only if given.

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

    /// Serve the admin HTTP endpoint on a TCP address: GET /metrics
    /// (Prometheus) and GET /status (JSON, read by `longwire status`).
    /// Default: 127.0.0.1:9810 when no listener of any kind is given, else
    /// off. Keep it on loopback or a management network: it has no
    /// authentication.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,

    /// Do not serve the admin endpoint (not even on the default address).
    #[arg(long)]
    pub no_admin: bool,

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

    /// Most NBD connections, and separately most iSCSI connections, served
    /// at once; beyond it new connections are closed as soon as they are
    /// accepted (0: unlimited) [default: 1024]. Per-export and per-target
    /// caps: `max_connections` in [[export]] / [[iscsi_target]] of --config.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Close an NBD connection that has had no request in flight and sent
    /// nothing, or an iSCSI session that has had no command (NOP-Outs
    /// aside), for SECS seconds (0: never) [default: 0].
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,

    /// Only clients from these addresses or ranges (10.0.0.0/8, ::1, …)
    /// may use EXPORT (over NBD and as its iSCSI target); without EXPORT=,
    /// every export with no list of its own. Others do not see it at all.
    /// Unix-socket clients are always allowed (repeatable).
    #[arg(long, value_name = "[EXPORT=]ADDR[,ADDR…]")]
    pub allow: Vec<String>,

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
