//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// longwire serves block volumes over the network (NBD, fixed newstyle).
///
/// Run `longwire serve` with no arguments for a 1 GiB sparse volume named
/// `default` in ./longwire-data, on 127.0.0.1:10809. Then, for example:
/// `nbdinfo nbd://127.0.0.1/default`.
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
    /// Serve volumes over NBD until SIGINT or SIGTERM.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
#[command(after_help = "\
Volume URIs:
  file:PATH?size=10G        a raw image; created sparse at that size if missing
  memory:?size=1G           a sparse in-memory volume (lost at exit)
  Extra parameters: readonly=true, description=Some%20text

Examples:
  longwire serve
  longwire serve --export disk=file:/srv/disk.img?size=100G --listen 0.0.0.0:10809
  longwire serve --export scratch=memory:?size=4G --unix /run/longwire.sock
  longwire serve --config /etc/longwire.toml")]
pub struct ServeArgs {
    /// Export a volume as NAME=URI (repeatable).
    #[arg(short, long = "export", value_name = "NAME=URI")]
    pub exports: Vec<String>,

    /// Listen for NBD on a TCP address, IPv4 or [IPv6] (repeatable; port 0
    /// picks a free port). Default: 127.0.0.1:10809 unless --unix is given.
    #[arg(short, long = "listen", value_name = "ADDR")]
    pub listen: Vec<String>,

    /// Listen for NBD on a unix socket at PATH.
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,

    /// Read exports and settings from a TOML file (see docs/CONFIG.md).
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Seconds a client may take to finish the NBD handshake.
    #[arg(long, value_name = "SECS")]
    pub handshake_timeout: Option<u64>,

    /// Requests one connection may have in flight before the server stops
    /// reading more from it.
    #[arg(long, value_name = "N")]
    pub max_in_flight: Option<usize>,
}
