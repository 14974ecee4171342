//! The verifying writer: many requests in flight against one NBD export,
//! every block it writes self-describing ([`crate::block`]) and every
//! operation recorded in a [`Ledger`], so what is read back can be judged.
//!
//! Workers pick an operation by weight: WRITE (1..=max blocks), WRITE
//! with FUA, FLUSH, TRIM, WRITE_ZEROES, and READ-and-verify. A worker
//! reserves the blocks it touches, so no two requests to one block are in
//! flight at once and the order of a block's history is the order its
//! requests completed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use longwire_core::{ReadSegment, ZeroFlags};
use longwire_nbd::client::NbdClient;
use longwire_nbd::proto::{FLAG_SEND_FUA, FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES};
use tokio_util::sync::CancellationToken;

use crate::block::{self, BLOCK_SIZE};
use crate::ledger::{Floor, Ledger, Op, Problem};
use crate::rng::Rng;

/// Relative weights of the operations a worker picks from.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub write: u32,
    pub write_fua: u32,
    pub flush: u32,
    pub trim: u32,
    pub zero: u32,
    pub read: u32,
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            write: 60,
            write_fua: 8,
            flush: 6,
            trim: 3,
            zero: 3,
            read: 10,
        }
    }
}

/// How the writer behaves.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Concurrent workers, each with one request in flight.
    pub queue_depth: usize,
    /// Largest write, in blocks.
    pub max_blocks: u64,
    pub mix: Mix,
    /// Keep going after a failed request (the client reconnects by
    /// itself); otherwise a worker stops at its first failure.
    pub survive_failures: bool,
    /// Never write again to blocks whose request failed. Needed while the
    /// server stays up: the lost request may still arrive and land after a
    /// newer write (crash torture needs none: the server is dead).
    pub retire_on_failure: bool,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            queue_depth: 16,
            max_blocks: 16,
            mix: Mix::default(),
            survive_failures: false,
            retire_on_failure: false,
        }
    }
}

/// What the writer did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriterCounts {
    pub writes: u64,
    pub fua_writes: u64,
    pub flushes: u64,
    pub trims: u64,
    pub zeroes: u64,
    pub reads_verified: u64,
    pub blocks_written: u64,
    pub failed: u64,
}

impl WriterCounts {
    pub fn add(&mut self, o: &WriterCounts) {
        self.writes += o.writes;
        self.fua_writes += o.fua_writes;
        self.flushes += o.flushes;
        self.trims += o.trims;
        self.zeroes += o.zeroes;
        self.reads_verified += o.reads_verified;
        self.blocks_written += o.blocks_written;
        self.failed += o.failed;
    }
}

#[derive(Debug, Default)]
pub struct WriterReport {
    pub counts: WriterCounts,
    /// The first failed request, if any.
    pub first_error: Option<String>,
    /// Blocks a read during the run could not explain (data loss on a live server).
    pub problems: Vec<Problem>,
}

fn lock(l: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

/// Unique write ids across rounds and workers.
static WRITE_IDS: AtomicU64 = AtomicU64::new(1);

/// Run workers until `stop` fires or a problem is found (and, unless
/// `survive_failures`, each worker until its first failed request).
pub async fn run(
    client: NbdClient,
    ledger: Arc<Mutex<Ledger>>,
    cfg: WriterConfig,
    seed: u64,
    stop: CancellationToken,
) -> WriterReport {
    let mut cfg = cfg;
    let info = client.info();
    if !info.has_flag(FLAG_SEND_FUA) {
        cfg.mix.write_fua = 0;
    }
    if !info.has_flag(FLAG_SEND_TRIM) {
        cfg.mix.trim = 0;
    }
    if !info.has_flag(FLAG_SEND_WRITE_ZEROES) {
        cfg.mix.zero = 0;
    }
    let halt = stop.child_token();
    let mut rng = Rng::new(seed);
    let workers: Vec<_> = (0..cfg.queue_depth)
        .map(|i| {
            let w = Worker {
                client: client.clone(),
                ledger: ledger.clone(),
                cfg: cfg.clone(),
                rng: rng.fork(i as u64),
                halt: halt.clone(),
            };
            tokio::spawn(w.run())
        })
        .collect();
    let mut report = WriterReport::default();
    for w in workers {
        if let Ok(r) = w.await {
            report.counts.add(&r.counts);
            if report.first_error.is_none() {
                report.first_error = r.first_error;
            }
            report.problems.extend(r.problems);
        }
    }
    report
}

struct Worker {
    client: NbdClient,
    ledger: Arc<Mutex<Ledger>>,
    cfg: WriterConfig,
    rng: Rng,
    halt: CancellationToken,
}

enum Step {
    Done,
    Failed(String),
    Problems(Vec<Problem>),
}

impl Worker {
    async fn run(mut self) -> WriterReport {
        let mut report = WriterReport::default();
        let m = self.cfg.mix;
        let weights = [m.write, m.write_fua, m.flush, m.trim, m.zero, m.read];
        while !self.halt.is_cancelled() {
            let Some(which) = self.rng.weighted(&weights) else {
                break;
            };
            // No select on `halt` here: a dropped request may still be sent,
            // and the ledger must know whether it completed.
            match self.step(which, &mut report.counts).await {
                Step::Done => {}
                Step::Failed(e) => {
                    report.counts.failed += 1;
                    report.first_error.get_or_insert(e);
                    if !self.cfg.survive_failures {
                        break;
                    }
                }
                Step::Problems(p) => {
                    report.problems.extend(p);
                    self.halt.cancel();
                    break;
                }
            }
        }
        report
    }

    /// Reserve a random run of up to `max` blocks (a few tries, then give up).
    fn reserve(&mut self, max: u64) -> Option<(u64, u64)> {
        let mut l = lock(&self.ledger);
        for _ in 0..8 {
            let n = self.rng.range(1, max.min(l.len()) + 1);
            let start = l.first() + self.rng.range(0, l.len() - n + 1);
            if l.reserve(start, n) {
                return Some((start, n));
            }
        }
        None
    }

    async fn step(&mut self, which: usize, counts: &mut WriterCounts) -> Step {
        match which {
            0 | 1 => self.write(which == 1, counts).await,
            2 => self.flush(counts).await,
            3 | 4 => self.zero(which == 3, counts).await,
            _ => self.read(counts).await,
        }
    }

    async fn write(&mut self, fua: bool, counts: &mut WriterCounts) -> Step {
        let Some((start, n)) = self.reserve(self.cfg.max_blocks) else {
            tokio::task::yield_now().await;
            return Step::Done;
        };
        let write_id = WRITE_IDS.fetch_add(1, Ordering::Relaxed);
        let seqs = lock(&self.ledger).issue(start, n, Op::Data { write_id });
        let mut buf = BytesMut::zeroed(n as usize * BLOCK_SIZE);
        for (i, (chunk, seq)) in buf.chunks_mut(BLOCK_SIZE).zip(&seqs).enumerate() {
            block::encode(chunk, start + i as u64, *seq, write_id);
        }
        let r = self
            .client
            .write(start * BLOCK_SIZE as u64, buf.freeze(), fua)
            .await;
        self.finish(
            start,
            n,
            &seqs,
            fua,
            r.map_err(|e| e.to_string()),
            |c| {
                c.writes += 1;
                c.fua_writes += fua as u64;
                c.blocks_written += n;
            },
            counts,
        )
    }

    async fn zero(&mut self, trim: bool, counts: &mut WriterCounts) -> Step {
        let Some((start, n)) = self.reserve(self.cfg.max_blocks) else {
            tokio::task::yield_now().await;
            return Step::Done;
        };
        let fua = self.rng.chance(0.3);
        let seqs = lock(&self.ledger).issue(start, n, if trim { Op::Trim } else { Op::Zero });
        let (off, len) = (start * BLOCK_SIZE as u64, n * BLOCK_SIZE as u64);
        let r = if trim {
            self.client.trim(off, len, fua).await
        } else {
            let may_trim = self.rng.chance(0.5);
            self.client
                .write_zeroes(
                    off,
                    len,
                    ZeroFlags {
                        may_trim,
                        fast: false,
                        fua,
                    },
                )
                .await
        };
        self.finish(
            start,
            n,
            &seqs,
            fua,
            r.map_err(|e| e.to_string()),
            |c| if trim { c.trims += 1 } else { c.zeroes += 1 },
            counts,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        start: u64,
        n: u64,
        seqs: &[u64],
        fua: bool,
        r: Result<(), String>,
        count: impl FnOnce(&mut WriterCounts),
        counts: &mut WriterCounts,
    ) -> Step {
        let mut l = lock(&self.ledger);
        match r {
            Ok(()) => {
                l.complete(start, seqs, fua);
                count(counts);
                Step::Done
            }
            Err(e) => {
                l.fail(start, n, self.cfg.retire_on_failure);
                Step::Failed(e)
            }
        }
    }

    async fn flush(&mut self, counts: &mut WriterCounts) -> Step {
        let ticket = lock(&self.ledger).flush_begin();
        let r = self.client.flush().await;
        lock(&self.ledger).flush_done(ticket, r.is_ok());
        match r {
            Ok(()) => {
                counts.flushes += 1;
                Step::Done
            }
            Err(e) => Step::Failed(e.to_string()),
        }
    }

    /// Read a run of blocks nobody is writing and hold each to what has
    /// completed: the server is up, so nothing completed may be missing.
    async fn read(&mut self, counts: &mut WriterCounts) -> Step {
        let Some((start, n)) = self.reserve(self.cfg.max_blocks * 4) else {
            tokio::task::yield_now().await;
            return Step::Done;
        };
        let r = read_blocks(&self.client, start, n).await;
        let mut l = lock(&self.ledger);
        l.release(start, n);
        match r {
            Ok(data) => {
                let problems: Vec<Problem> = data
                    .chunks(BLOCK_SIZE)
                    .enumerate()
                    .filter_map(|(i, b)| {
                        let idx = start + i as u64;
                        l.check(idx, block::decode(b, idx), Floor::Completed)
                            .err()
                            .map(|p| *p)
                    })
                    .collect();
                if !problems.is_empty() {
                    return Step::Problems(problems);
                }
                counts.reads_verified += 1;
                Step::Done
            }
            Err(e) => Step::Failed(e),
        }
    }
}

/// Read `n` blocks from `start` as one contiguous buffer.
pub async fn read_blocks(client: &NbdClient, start: u64, n: u64) -> Result<Bytes, String> {
    let len = (n as usize) * BLOCK_SIZE;
    let segments = client
        .read(start * BLOCK_SIZE as u64, len as u32)
        .await
        .map_err(|e| e.to_string())?;
    let mut out = BytesMut::with_capacity(len);
    for s in segments {
        match s {
            ReadSegment::Data(b) => out.extend_from_slice(&b),
            ReadSegment::Zero(z) => out.resize(out.len() + z as usize, 0),
        }
    }
    if out.len() != len {
        return Err(format!(
            "read of {len} bytes at block {start} returned {} bytes",
            out.len()
        ));
    }
    Ok(out.freeze())
}
