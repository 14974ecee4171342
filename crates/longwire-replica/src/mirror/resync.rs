//! Copying the regions the replica missed.
//!
//! Walks the bitmap for regions that are set and not merely "activity"
//! (see [`super::activity`]), in runs of up to `RUN` bytes, a few runs at
//! once, each under its range lock so no foreground write to it can be
//! overtaken. Within a run the local allocation map decides: data is read
//! and written (through the rate limit), holes and zeros become one
//! WRITE_ZEROES on the replica, so a first, full sync of a sparse volume
//! moves only its data. Copied regions are then handed to the activity
//! log, which clears them after the next flush of both copies.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use longwire_core::ZeroFlags;
use tokio::task::JoinSet;

use super::{Link, Shared};

/// Largest run copied under one range lock.
const RUN: u64 = 1 << 20;

/// One pass over the bitmap, repeated until nothing the replica missed is
/// left. Fails (after degrading the mirror) when a copy fails.
pub(super) async fn run(s: &Arc<Shared>, link: &Link) -> Result<(), String> {
    loop {
        if pass(s, link).await? == 0 {
            return Ok(());
        }
    }
}

/// Returns the number of regions copied.
async fn pass(s: &Arc<Shared>, link: &Link) -> Result<u64, String> {
    let regions = s.bitmap.regions();
    let per_run = (RUN / s.bitmap.region_size()).max(1);
    let mut tasks = JoinSet::new();
    let mut cursor = 0;
    let mut copied = 0;
    while let Some(run) = next_run(s, cursor, per_run, regions) {
        if s.activity.lock().epoch != link.epoch {
            return Err("the replica was lost".into());
        }
        cursor = run.end;
        copied += run.end - run.start;
        while tasks.len() >= s.opts.resync_parallel.max(1) {
            joined(tasks.join_next().await)?;
        }
        tasks.spawn(copy_run(Arc::clone(s), link.clone(), run));
    }
    while let Some(r) = tasks.join_next().await {
        joined(Some(r))?;
    }
    Ok(copied)
}

fn joined(r: Option<Result<Result<(), String>, tokio::task::JoinError>>) -> Result<(), String> {
    match r {
        None => Ok(()),
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(format!("resync task failed: {e}")),
    }
}

/// The next run of regions the replica missed, at or after `from`.
fn next_run(s: &Shared, mut from: u64, per_run: u64, regions: u64) -> Option<Range<u64>> {
    let log = s.activity.lock();
    let start = loop {
        let r = s.bitmap.next_set(from)?;
        if !log.regions.contains_key(&r) {
            break r;
        }
        from = r + 1;
    };
    let limit = s
        .bitmap
        .next_clear(start)
        .unwrap_or(regions)
        .min(start + per_run);
    let end = (start + 1..limit)
        .find(|r| log.regions.contains_key(r))
        .unwrap_or(limit);
    Some(start..end)
}

async fn copy_run(s: Arc<Shared>, link: Link, run: Range<u64>) -> Result<(), String> {
    let bytes = s.bitmap.region_bytes(run.start).start..s.bitmap.region_bytes(run.end - 1).end;
    let result = async {
        let _guard = s.locks.lock(bytes.clone()).await;
        let mut pos = bytes.start;
        while pos < bytes.end {
            let extents = s
                .local
                .extents(pos, bytes.end - pos)
                .await
                .map_err(|e| format!("local allocation map: {e}"))?;
            if extents.iter().all(|e| e.len == 0) {
                return Err(format!("local allocation map at {pos} is empty"));
            }
            for e in extents {
                if pos >= bytes.end {
                    break;
                }
                let len = e.len.min(bytes.end - pos);
                if len == 0 {
                    continue;
                }
                if e.kind.reads_as_zero() {
                    let flags = ZeroFlags {
                        may_trim: true,
                        ..ZeroFlags::default()
                    };
                    link.volume
                        .write_zeroes(pos, len, flags)
                        .await
                        .map_err(|e| format!("zeroing the replica: {e}"))?;
                    s.stats.resync_zeroed.fetch_add(len, Ordering::Relaxed);
                } else {
                    s.throttle.take(len).await;
                    let data = s
                        .local
                        .read(pos, len as usize)
                        .await
                        .map_err(|e| format!("local read: {e}"))?;
                    link.volume
                        .write(pos, data, false)
                        .await
                        .map_err(|e| format!("writing the replica: {e}"))?;
                    s.stats.resync_sent.fetch_add(len, Ordering::Relaxed);
                }
                pos += len;
            }
        }
        s.reached_both(run.clone(), link.epoch);
        Ok(())
    }
    .await;
    if let Err(e) = &result {
        s.degrade(link.epoch, format!("resync: {e}"));
    }
    result
}
