//! `longwire-torture`: crash and network-fault torture runs against the
//! real `longwire` binary. See docs/RELIABILITY.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use longwire_torture::server_process::find_longwire;
use longwire_torture::store::Store;
use longwire_torture::{crash, net};

#[derive(Parser)]
#[command(
    name = "longwire-torture",
    about = "Crash and network-fault torture for longwire"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// SIGKILL the server under a verifying writer, restart, verify; repeat.
    Crash {
        /// file, sqlite or s3.
        #[arg(long, default_value = "file")]
        store: Store,
        #[arg(long, default_value_t = 50)]
        rounds: u32,
        /// Seed for the schedule (random if not given; always printed).
        #[arg(long)]
        seed: Option<u64>,
        /// The longwire binary (default: next to this one, else on PATH).
        #[arg(long)]
        longwire: Option<PathBuf>,
        /// Volume size in MiB.
        #[arg(long, default_value_t = 64)]
        size_mib: u64,
        /// Requests in flight.
        #[arg(long, default_value_t = 32)]
        queue_depth: usize,
    },
    /// Clients through a fault-injecting proxy, plus a clean client; then
    /// check connections, threads and memory are released and SIGTERM is prompt.
    Net {
        #[arg(long, default_value_t = 8)]
        clients: usize,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        longwire: Option<PathBuf>,
        /// The export's store: file, sqlite or s3.
        #[arg(long, default_value = "file")]
        store: Store,
        /// Mean milliseconds between faults on each connection direction.
        #[arg(long, default_value_t = 1500)]
        fault_interval_ms: u64,
        /// Let the NBD client reconnect and re-send by itself (see
        /// docs/RELIABILITY.md: a late copy of a re-sent write can land).
        #[arg(long)]
        reconnecting_client: bool,
    },
}

fn seed_or_clock(seed: Option<u64>) -> u64 {
    seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Cmd::Crash { store, rounds, seed, longwire, size_mib, queue_depth } => {
                let seed = seed_or_clock(seed);
                let mut opts = crash::CrashOptions::new(store, rounds, seed, find_longwire(longwire.as_deref()));
                opts.size = size_mib << 20;
                opts.writer.queue_depth = queue_depth;
                println!("crash torture: store {store}, {rounds} rounds, seed {seed}, {}", opts.longwire.display());
                let s = crash::run(&opts, |l| println!("{l}")).await?;
                println!(
                    "summary: store {store}, seed {seed}: {} rounds survived in {:.0?}; {} writes ({} FUA, {} blocks), {} flushes, {} trims, {} zeroes, {} reads checked; {} block writes covered by FLUSH/FUA; {} covered blocks verified after restarts; {} requests cut off by kills; data lost: 0, torn blocks: 0",
                    s.rounds, s.elapsed, s.ops.writes, s.ops.fua_writes, s.ops.blocks_written, s.ops.flushes, s.ops.trims, s.ops.zeroes,
                    s.ops.reads_verified, s.covered_ops, s.covered_blocks_verified, s.in_flight_at_kill
                );
                Ok(())
            }
            Cmd::Net { clients, seconds, seed, longwire, store, fault_interval_ms, reconnecting_client } => {
                let seed = seed_or_clock(seed);
                let mut opts = net::NetOptions::new(clients, seconds, seed, find_longwire(longwire.as_deref()));
                opts.fault_interval = Duration::from_millis(fault_interval_ms);
                opts.store = store;
                opts.reconnecting_client = reconnecting_client;
                println!("network-fault torture: {clients} clients, {seconds} s, seed {seed}, {}", opts.longwire.display());
                let s = net::run(&opts, |l| println!("{l}")).await?;
                let f = s.faults;
                println!(
                    "summary: seed {seed}: {} faults injected (stall {}, delay {}, split {}, drop {}, reset {}, close {}; {} connections accepted); \
                     {} writes ({} FUA), {} flushes, {} trims, {} zeroes, {} reads checked, {} requests failed, {} sessions; \
                     {} blocks verified, data lost: 0; clean client {} requests, p99 {:?}, max {:?}; \
                     connections released in {:?}; idle server {:?} vs warm baseline {:?}; SIGTERM with stalled clients: {:?}",
                    f.faults(), f.stalls, f.delays, f.splits, f.drops, f.resets, f.closes, f.accepted,
                    s.ops.writes, s.ops.fua_writes, s.ops.flushes, s.ops.trims, s.ops.zeroes, s.ops.reads_verified, s.ops.failed, s.sessions,
                    s.blocks_verified, s.probe_requests, s.probe_p99, s.probe_max,
                    s.release_time, s.after.unwrap(), s.baseline.unwrap(), s.shutdown_time
                );
                let bad = net::judge(&s);
                if bad.is_empty() {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("network-fault torture failed:\n  {}", bad.join("\n  ")))
                }
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("longwire-torture: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}
