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

    /// Threads doing blocking file I/O (writes, syncs, uncached reads) for
    /// all file volumes [default: 4].
    #[arg(long, value_name = "N")]
    pub io_threads: Option<usize>,
}
