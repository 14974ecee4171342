//! `longwire`: a network block storage server.
//!
//! This binary only wires things together: the CLI and config file
//! ([`cli`], [`config`]) describe exports and listeners, [`iscsi`] decides
//! the iSCSI targets, [`serve`] opens the stores, fills the export registry
//! and runs the front-ends. [`attach`] (a remote export as a FUSE file)
//! and [`copy`] (volume to volume) are the client-side commands.

mod attach;
mod cli;
mod config;
mod copy;
mod iscsi;
mod serve;
mod units;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        cli::Command::Serve(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build();
            match runtime {
                Ok(rt) => rt.block_on(serve::run(args)),
                Err(e) => Err(e.into()),
            }
        }
        cli::Command::Attach(args) => attach::run(args),
        cli::Command::Detach(args) => attach::detach(args),
        cli::Command::Copy(args) => copy::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("longwire: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Log to stderr; `RUST_LOG` wins, else `-v` raises the level from info.
fn init_logging(verbose: u8) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
