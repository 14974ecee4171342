//! Crash torture, short CI runs (`longwire-torture crash` does the long
//! ones; figures in docs/RELIABILITY.md). Each round a verifying writer
//! runs against the real server, which is SIGKILLed at a random moment,
//! restarted on the same store and read back whole: every write a
//! completed FLUSH or FUA covered must be there, no block torn.

use std::path::PathBuf;
use std::time::Duration;

use longwire_torture::crash::{self, CrashOptions};
use longwire_torture::store::Store;

const ROUNDS: u32 = 4;

fn options(store: Store, seed: u64) -> CrashOptions {
    let mut o = CrashOptions::new(
        store,
        ROUNDS,
        seed,
        PathBuf::from(env!("CARGO_BIN_EXE_longwire")),
    );
    o.size = 32 << 20;
    o.run_for = (Duration::from_millis(200), Duration::from_millis(1200));
    o
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `min_covered`: blocks found holding covered writes over all restarts
/// (the s3 store is slower, so it writes less in the same time).
fn survive(store: Store, seed: u64, min_covered: u64) {
    let opts = options(store, seed);
    let s = runtime()
        .block_on(crash::run(&opts, |l| eprintln!("{l}")))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(s.rounds, ROUNDS);
    // The run must have been a real test: writes, flushes, FUA and kills
    // with requests in flight, and covered data that was then checked.
    assert!(
        s.ops.writes > 50 && s.ops.flushes > 0 && s.ops.fua_writes > 0,
        "{s:?}"
    );
    assert!(
        s.in_flight_at_kill > 0,
        "no kill caught requests in flight: {s:?}"
    );
    assert!(s.covered_blocks_verified >= min_covered, "{s:?}");
}

#[test]
fn file_store_survives_sigkill_rounds() {
    survive(Store::File, 0xF11E, 1000);
}

#[test]
fn sqlite_store_survives_sigkill_rounds() {
    survive(Store::Sqlite, 0x5917, 1000);
}

/// Needs `s3s-fs` (scripts/test installs it); the object server keeps
/// running across the server kills, as remote storage would.
#[test]
fn s3_store_survives_sigkill_rounds() {
    survive(Store::S3, 0x53, 50);
}

/// The checker is honest: the memory store forgets everything at a kill,
/// and the run must say so, naming the block, the round and the seed.
#[test]
fn checker_reports_loss_on_a_store_that_forgets() {
    let mut opts = options(Store::Memory, 7);
    opts.rounds = 1;
    let err = runtime()
        .block_on(crash::run(&opts, |_| {}))
        .expect_err("the memory store cannot survive a SIGKILL");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("DATA LOSS") && msg.contains("seed 7") && msg.contains("block "),
        "{msg}"
    );
}
