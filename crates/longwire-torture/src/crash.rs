//! Crash torture: write with many requests in flight, SIGKILL the server
//! at a random moment, restart it on the same store and check that every
//! write a completed FLUSH or FUA covered is there and no block is torn.
//! The next round writes on top of what survived.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use longwire_nbd::client::{ClientConfig, NbdClient, ReconnectPolicy};
use tokio_util::sync::CancellationToken;

use crate::block::BLOCK_SIZE;
use crate::ledger::{Floor, Ledger};
use crate::rng::Rng;
use crate::server_process::ServerProcess;
use crate::store::{Backing, Store};
use crate::verify::{verify_all, Verified};
use crate::writer::{self, WriterConfig, WriterCounts};

const EXPORT: &str = "torture";

#[derive(Debug, Clone)]
pub struct CrashOptions {
    pub store: Store,
    pub rounds: u32,
    pub seed: u64,
    pub longwire: PathBuf,
    /// Volume size in bytes.
    pub size: u64,
    /// How long the writer runs before the kill (uniform in the range).
    pub run_for: (Duration, Duration),
    pub writer: WriterConfig,
    /// NBD connections the writer spreads requests over (multi-conn: a
    /// FLUSH on one must cover writes completed on the others).
    pub connections: usize,
}

impl CrashOptions {
    pub fn new(store: Store, rounds: u32, seed: u64, longwire: PathBuf) -> CrashOptions {
        CrashOptions {
            store,
            rounds,
            seed,
            longwire,
            size: 64 << 20,
            run_for: (Duration::from_millis(200), Duration::from_secs(3)),
            writer: WriterConfig {
                queue_depth: 32,
                max_blocks: 16,
                ..WriterConfig::default()
            },
            connections: 2,
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct CrashSummary {
    pub rounds: u32,
    pub ops: WriterCounts,
    /// Block operations that a completed FLUSH or FUA covered.
    pub covered_ops: u64,
    /// Blocks found holding a write covered (by FLUSH/FUA) in the round
    /// before the restart, or a later one.
    pub covered_blocks_verified: u64,
    pub blocks_verified: u64,
    /// Requests that were in flight (and failed) when the server was killed.
    pub in_flight_at_kill: u64,
    pub elapsed: Duration,
}

fn client_config(connections: usize) -> ClientConfig {
    ClientConfig {
        request_timeout: Duration::from_secs(30),
        reconnect: ReconnectPolicy {
            enabled: false,
            ..ReconnectPolicy::default()
        },
        connections,
        max_in_flight: 64,
        ..ClientConfig::default()
    }
}

async fn start(opts: &CrashOptions, backing: &Backing) -> anyhow::Result<ServerProcess> {
    let (bin, uri, env) = (
        opts.longwire.clone(),
        backing.uri.clone(),
        backing.env.clone(),
    );
    tokio::task::spawn_blocking(move || {
        ServerProcess::start_with_env(&bin, EXPORT, &uri, &[], &env)
    })
    .await?
}

fn fail_report(
    what: &str,
    opts: &CrashOptions,
    round: u32,
    v: &Verified,
    server: &ServerProcess,
) -> anyhow::Error {
    let shown: Vec<String> = v
        .problems
        .iter()
        .take(10)
        .map(|p| format!("  {p}"))
        .collect();
    anyhow::anyhow!(
        "{what}: {} block(s) wrong after the restart following round {round} (store {}, seed {}; replay with --seed {} --rounds {round}):\n{}\n--- server log (tail) ---\n{}",
        v.problems.len(),
        opts.store,
        opts.seed,
        opts.seed,
        shown.join("\n"),
        server.log_tail()
    )
}

/// Run the rounds; `report` gets one line per round. An error names the
/// round, the seed and the blocks that were wrong.
pub async fn run(
    opts: &CrashOptions,
    mut report: impl FnMut(String),
) -> anyhow::Result<CrashSummary> {
    let dir = tempfile::tempdir().context("creating a temp dir")?;
    let backing = opts.store.open(dir.path(), opts.size)?;
    let blocks = opts.size / BLOCK_SIZE as u64;
    let ledger = Arc::new(Mutex::new(Ledger::new(0, blocks)));
    let mut rng = Rng::new(opts.seed);
    let mut sum = CrashSummary::default();
    let t0 = Instant::now();
    // A round's line is printed once the restart after its kill is checked.
    let mut pending: Option<String> = None;
    for round in 0..=opts.rounds {
        let server = start(opts, &backing).await?;
        let client = NbdClient::connect(
            &format!("nbd://{}/{EXPORT}", server.addr()),
            client_config(opts.connections),
        )
        .await
        .with_context(|| format!("connecting after restart {round}"))?;
        // What survived the last kill, judged against what was covered.
        let v = verify_all(&client, &ledger, Floor::Covered, true)
            .await
            .map_err(anyhow::Error::msg)?;
        if !v.problems.is_empty() {
            return Err(fail_report("DATA LOSS", opts, round, &v, &server));
        }
        sum.covered_blocks_verified += v.covered_this_round;
        sum.blocks_verified += v.blocks;
        if let Some(line) = pending.take() {
            report(format!(
                "{line}; after restart: {} blocks covered this round all present, none torn",
                v.covered_this_round
            ));
        }
        if round == opts.rounds {
            report(format!(
                "final check: {} blocks read, {} zero",
                v.blocks, v.zero_blocks
            ));
            client.close().await;
            let _ = tokio::task::spawn_blocking(move || server.terminate(Duration::from_secs(15)))
                .await?;
            break;
        }
        // The rebased state must be durable before new writes pile on it.
        client.flush().await.context("flush after restart")?;

        let run_for = rng.duration(opts.run_for.0, opts.run_for.1);
        let stop = CancellationToken::new();
        let w = tokio::spawn(writer::run(
            client.clone(),
            ledger.clone(),
            opts.writer.clone(),
            rng.next_u64(),
            stop.clone(),
        ));
        tokio::time::sleep(run_for).await;
        tokio::task::spawn_blocking(move || server.kill()).await?;
        stop.cancel();
        let r = w.await?;
        drop(client);
        if !r.problems.is_empty() {
            bail!(
                "a read during round {} found wrong data (seed {}): {}",
                round + 1,
                opts.seed,
                r.problems[0]
            );
        }
        if r.counts.writes == 0 && round > 0 {
            if let Some(e) = &r.first_error {
                bail!("round {}: the writer did nothing: {e}", round + 1);
            }
        }
        sum.rounds += 1;
        sum.ops.add(&r.counts);
        sum.in_flight_at_kill += r.counts.failed;
        sum.covered_ops = ledger.lock().unwrap().stats.covered_ops;
        pending = Some(format!(
            "round {:>3}: SIGKILL after {:>4} ms: {:>5} writes ({} FUA), {:>3} flushes, {} trims, {} zeroes, {} reads checked, {} requests cut off",
            round + 1,
            run_for.as_millis(),
            r.counts.writes,
            r.counts.fua_writes,
            r.counts.flushes,
            r.counts.trims,
            r.counts.zeroes,
            r.counts.reads_verified,
            r.counts.failed,
        ));
    }
    sum.elapsed = t0.elapsed();
    Ok(sum)
}
