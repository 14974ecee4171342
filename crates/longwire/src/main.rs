//! `longwire`: a network block storage server.
//!
//! This binary only wires things together: the CLI and config file
//! ([`cli`], [`config`]) describe exports and listeners, [`iscsi`] decides
//! the iSCSI targets, [`serve`] opens the stores, fills the export registry
//! and runs the front-ends. [`attach`] (a remote export as a FUSE file)
//! and [`copy`] (volume to volume) are the client-side commands;
//! [`manage`] creates, lists, describes and deletes volumes; [`status`]
//! prints a running server's exports and connections from its [`admin`]
//! endpoint (which also serves Prometheus metrics).

mod admin;
mod attach;
mod cli;
mod config;
mod copy;
mod iscsi;
mod layers;
mod manage;
mod migrate;
mod serve;
mod status;
mod units;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    // Volume management prints its own result; the stores' info logs would
    // only repeat it.
    let quiet = matches!(
        cli.command,
        cli::Command::Create(_) | cli::Command::List(_) | cli::Command::Info(_) | cli::Command::Delete(_)
    );
    init_logging(cli.verbose, quiet);
    let result = match cli.command {
        cli::Command::Serve(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build();
            match runtime {
                Ok(rt) => rt.block_on(serve::run(*args)),
                Err(e) => Err(e.into()),
            }
        }
        cli::Command::Attach(args) => attach::run(args),
        cli::Command::Detach(args) => attach::detach(args),
        cli::Command::Copy(args) => copy::run(args),
        cli::Command::Status(args) => status::run(args),
        cli::Command::Migrate(args) => migrate::run(args),
        cli::Command::Create(args) => manage::create(args),
        cli::Command::List(args) => manage::list(args),
        cli::Command::Info(args) => manage::info(args),
        cli::Command::Delete(args) => manage::delete(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("longwire: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Log to stderr; `RUST_LOG` wins, else `-v` raises the level from info
/// (from warn when `quiet`).
fn init_logging(verbose: u8, quiet: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 if quiet => "warn",
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
