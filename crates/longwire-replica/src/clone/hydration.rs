//! The shared state of a clone and the operations every path uses: copy a
//! region, mark regions local, commit the bitmap.
//!
//! Durability rule: a bit on disk says "this region's local data is
//! durable". So a commit snapshots the bits first, flushes the local store,
//! and only then writes the snapshot (see [`Hydration::commit`]); a bit set
//! after the snapshot waits for the next commit.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use longwire_core::{Volume, VolumeError, VolumeResult};
use parking_lot::RwLock;
use tokio::sync::watch;

use super::fetch::{apply, fetch, zero_where_needed};
use super::locks::RegionLocks;
use super::progress::{Counters, Progress};
use super::CloneConfig;
use crate::RegionBitmap;

pub(crate) struct Hydration {
    pub local: Arc<dyn Volume>,
    /// `None` once hydration is complete (the source is released).
    source: RwLock<Option<Arc<dyn Volume>>>,
    /// One bit per region: set = the region is local.
    pub bitmap: Arc<RegionBitmap>,
    pub locks: RegionLocks,
    pub counters: Counters,
    pub config: CloneConfig,
    /// Foreground requests in progress; the background copier slows down
    /// while there are any.
    foreground: AtomicUsize,
    /// One commit at a time, so snapshots reach the disk in order.
    commit_lock: tokio::sync::Mutex<()>,
    complete_tx: watch::Sender<bool>,
}

/// Counts a foreground request while it lives.
pub(crate) struct Foreground<'a>(&'a AtomicUsize);

impl Drop for Foreground<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Hydration {
    pub(crate) fn new(
        local: Arc<dyn Volume>,
        source: Option<Arc<dyn Volume>>,
        bitmap: RegionBitmap,
        config: CloneConfig,
    ) -> Hydration {
        let complete = bitmap.next_clear(0).is_none();
        Hydration {
            local,
            source: RwLock::new(if complete { None } else { source }),
            bitmap: Arc::new(bitmap),
            locks: RegionLocks::new(),
            counters: Counters::new(complete),
            config,
            foreground: AtomicUsize::new(0),
            commit_lock: tokio::sync::Mutex::new(()),
            complete_tx: watch::channel(complete).0,
        }
    }

    pub(crate) fn foreground(&self) -> Foreground<'_> {
        self.foreground.fetch_add(1, Ordering::Relaxed);
        Foreground(&self.foreground)
    }

    pub(crate) fn foreground_busy(&self) -> bool {
        self.foreground.load(Ordering::Relaxed) > 0
    }

    pub(crate) fn is_complete(&self) -> bool {
        *self.complete_tx.borrow()
    }

    pub(crate) fn watch_complete(&self) -> watch::Receiver<bool> {
        self.complete_tx.subscribe()
    }

    pub(crate) fn source(&self) -> VolumeResult<Arc<dyn Volume>> {
        self.source.read().clone().ok_or_else(|| {
            VolumeError::Io(std::io::Error::other(
                "the clone's source is already released (hydration is complete)",
            ))
        })
    }

    pub(crate) fn progress(&self) -> Progress {
        let hydrated =
            (self.bitmap.count() * self.bitmap.region_size()).min(self.bitmap.volume_size());
        Progress::new(&self.counters, self.bitmap.volume_size(), hydrated)
    }

    /// The regions `[offset, offset + len)` touches that are not local yet.
    pub(crate) fn missing(&self, offset: u64, len: u64) -> Vec<u64> {
        let touching = self.bitmap.regions_touching(offset, len);
        let mut out = Vec::new();
        let mut r = touching.start;
        while let Some(c) = self.bitmap.next_clear(r).filter(|c| *c < touching.end) {
            out.push(c);
            r = c + 1;
        }
        out
    }

    /// Make sure `region` is local, copying it from the source if needed,
    /// waiting for the source at most the configured time. The copy runs
    /// in its own task, so it finishes (or times out) even if our caller
    /// goes away: a local write must not land after the lock is released.
    pub(crate) async fn hydrate(self: &Arc<Self>, region: u64) -> VolumeResult<()> {
        if self.bitmap.get(region) {
            return Ok(());
        }
        let held = self.locks.lock(region).await;
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let _held = held;
            me.copy_region(region).await
        })
        .await
        .map_err(|e| {
            VolumeError::Io(std::io::Error::other(format!(
                "copying region {region}: {e}"
            )))
        })?
    }

    /// Copy `region` unless it is local already. The caller holds the
    /// region's lock and lets this run to the end.
    pub(crate) async fn copy_region(&self, region: u64) -> VolumeResult<()> {
        if self.bitmap.get(region) {
            return Ok(());
        }
        let fetched = self.fetch_region(region).await?;
        self.counters
            .fetched
            .fetch_add(fetched.fetched, Ordering::Relaxed);
        apply(&*self.local, fetched).await?;
        self.bitmap.set(region..region + 1);
        Ok(())
    }

    /// Read one region from the source, bounded by the fetch timeout.
    async fn fetch_region(&self, region: u64) -> VolumeResult<super::fetch::Fetched> {
        let range = self.bitmap.region_bytes(region);
        let source = self.source()?;
        let limit = self.config.fetch_timeout;
        match tokio::time::timeout(limit, fetch(&*source, range.clone())).await {
            Ok(Ok(f)) => {
                self.counters.source_answered();
                Ok(f)
            }
            Ok(Err(e)) => {
                self.counters.source_failed(e.to_string());
                Err(source_error(&range, &e.to_string()))
            }
            Err(_) => {
                let why = format!("the source did not answer within {}", secs(limit));
                self.counters.source_failed(why.clone());
                Err(source_error(&range, &why))
            }
        }
    }

    /// Mark a region the source reports as all zeros local without copying
    /// it (zeroing the local store there only where it holds data).
    pub(crate) async fn mark_zero(self: &Arc<Self>, region: u64) -> VolumeResult<()> {
        if self.bitmap.get(region) {
            return Ok(());
        }
        let held = self.locks.lock(region).await;
        if self.bitmap.get(region) {
            return Ok(());
        }
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let _held = held;
            let range = me.bitmap.region_bytes(region);
            zero_where_needed(&*me.local, range.start, range.end - range.start).await?;
            me.counters
                .skipped
                .fetch_add(range.end - range.start, Ordering::Relaxed);
            me.bitmap.set(region..region + 1);
            Ok(())
        })
        .await
        .map_err(|e| {
            VolumeError::Io(std::io::Error::other(format!(
                "marking region {region}: {e}"
            )))
        })?
    }

    /// Make everything written so far durable, bits included: snapshot the
    /// bits, flush the local store, write the snapshot.
    pub(crate) async fn commit(&self) -> VolumeResult<()> {
        let _one = self.commit_lock.lock().await;
        let snapshot = self.bitmap.snapshot();
        if let Err(e) = self.local.flush().await {
            self.bitmap.abandon_snapshot(snapshot);
            return Err(e);
        }
        if snapshot.is_empty() {
            return Ok(());
        }
        let bitmap = Arc::clone(&self.bitmap);
        tokio::task::spawn_blocking(move || bitmap.write_snapshot(snapshot))
            .await
            .map_err(std::io::Error::other)?
            .map_err(VolumeError::Io)
    }

    /// Every region is local: commit, drop the source, tell the waiters.
    pub(crate) async fn finish(&self) -> VolumeResult<()> {
        self.commit().await?;
        let released = self.source.write().take().is_some();
        self.counters.complete.store(true, Ordering::Relaxed);
        self.complete_tx.send_replace(true);
        if released {
            let p = self.progress();
            tracing::info!(
                fetched = p.fetched_bytes,
                skipped = p.skipped_bytes,
                "clone hydration complete: {}; the volume is an ordinary local volume now",
                p.detail()
            );
        }
        Ok(())
    }
}

fn secs(d: Duration) -> String {
    format!("{:.0} s", d.as_secs_f64())
}

fn source_error(range: &Range<u64>, why: &str) -> VolumeError {
    VolumeError::Io(std::io::Error::other(format!(
        "bytes {}..{} are not copied from the clone's source yet, and the source failed: {why} \
         (it is retried in the background; check that the source is reachable)",
        range.start, range.end
    )))
}
