//! Chunk I/O between the cache and the bucket: loading (with read-ahead),
//! writing (in place in the cache, read-modify-write only for chunks the
//! cache lacks), zeroing, uploading (in the background once a chunk is
//! quiet, on FLUSH and FUA), and the tasks that keep uploads and the lease
//! going.

use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{self, StreamExt};
use longwire_core::{VolumeError, VolumeResult};
use object_store::PutMode;
use parking_lot::Mutex;
use tokio::sync::{Mutex as AsyncMutex, MutexGuard, Notify};

use super::bucket::{Bucket, MAX_REQUESTS};
use super::cache::{Cache, Lookup};
use super::codec;
use super::lease::Lease;
use super::manifest::{Layout, Manifest};
use crate::sqlite::Compression;

/// How often the background uploader looks for dirty chunks to upload.
const WRITEBACK_INTERVAL: Duration = Duration::from_secs(1);
/// A dirty chunk is uploaded once it has had no writes for this long, so
/// a chunk being written often is sent once, not after every write.
const WRITEBACK_QUIET: Duration = Duration::from_secs(1);
/// ...or at the latest this long after it became dirty, so data does not
/// sit in the cache for long even without a FLUSH.
const WRITEBACK_MAX_AGE: Duration = Duration::from_secs(10);
/// How far ahead of a sequential reader chunks are fetched.
const READAHEAD_BYTES: u64 = 8 << 20;
/// Lock stripes: chunk `i` uses stripe `i % STRIPES`.
const STRIPES: usize = 256;

/// Per-chunk async locks, striped so memory stays fixed.
struct Stripes(Vec<AsyncMutex<()>>);

impl Stripes {
    fn new() -> Stripes {
        Stripes((0..STRIPES).map(|_| AsyncMutex::new(())).collect())
    }
    async fn lock(&self, index: u64) -> MutexGuard<'_, ()> {
        self.0[(index % STRIPES as u64) as usize].lock().await
    }
}

pub(super) struct Engine {
    pub bucket: Bucket,
    pub layout: Layout,
    /// `s3://bucket/prefix`, for messages.
    pub name: String,
    pub size: u64,
    pub chunk: u64,
    pub zstd: bool,
    pub cache: Cache,
    pub lease: Option<Arc<Lease>>,
    /// Serializes changes to one chunk (read-modify-write, upload snapshot,
    /// marking uploaded, filling the cache from the bucket).
    chunk_locks: Stripes,
    /// Keeps uploads of one chunk in order, so an older version never
    /// lands after a newer one.
    upload_locks: Stripes,
    pub uploads_in_flight: AtomicU64,
    /// Signalled when uploads free cache space.
    room: Notify,
    wake_uploader: Notify,
    last_read_end: AtomicU64,
    prefetching: Mutex<HashSet<u64>>,
}

impl Engine {
    /// `name` is `s3://bucket/prefix`, for messages; size, chunk size and
    /// compression come from the volume's `manifest`.
    pub fn new(
        bucket: Bucket,
        layout: Layout,
        name: String,
        manifest: &Manifest,
        cache: Cache,
        lease: Option<Arc<Lease>>,
    ) -> Engine {
        Engine {
            bucket,
            layout,
            name,
            size: manifest.size,
            chunk: manifest.chunk_size,
            zstd: manifest.compression() == Compression::Zstd,
            cache,
            lease,
            chunk_locks: Stripes::new(),
            upload_locks: Stripes::new(),
            uploads_in_flight: AtomicU64::new(0),
            room: Notify::new(),
            wake_uploader: Notify::new(),
            last_read_end: AtomicU64::new(u64::MAX),
            prefetching: Mutex::new(HashSet::new()),
        }
    }

    /// Run blocking cache file work off the reactor.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Engine) -> io::Result<T> + Send + 'static,
    ) -> VolumeResult<T> {
        let me = Arc::clone(self);
        let name = self.name.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| {
                VolumeError::Io(io::Error::other(format!("{name}: cache task failed: {e}")))
            })?
            .map_err(|e| {
                VolumeError::Io(io::Error::new(
                    e.kind(),
                    format!("{name}: local cache: {e}"),
                ))
            })
    }

    fn chunk_error(&self, index: u64, what: &str) -> VolumeError {
        let start = index * self.chunk;
        let msg = format!(
            "{}: chunk {index} (bytes {start}..{}, object {}) is corrupt: {what}",
            self.name,
            start + self.chunk,
            self.layout.chunk(index)
        );
        tracing::error!("{msg}");
        VolumeError::Io(io::Error::new(io::ErrorKind::InvalidData, msg))
    }

    fn check_lease(&self) -> VolumeResult<()> {
        if let Some(lease) = &self.lease {
            lease.check().map_err(|e| {
                let msg = format!("{}: {e}", self.name);
                tracing::error!("{msg}");
                VolumeError::Io(io::Error::other(msg))
            })?;
        }
        Ok(())
    }

    /// `n` bytes at byte `start` of chunk `index` (None: all zeros). A
    /// chunk in the cache reads just those bytes, without the chunk's lock
    /// (see [`Cache::read_range`]); one only the bucket has is downloaded
    /// whole under its lock and kept for later reads.
    pub async fn read_piece(
        self: &Arc<Self>,
        index: u64,
        start: usize,
        n: usize,
    ) -> VolumeResult<Option<Vec<u8>>> {
        for _ in 0..8 {
            match self.cache.lookup(index) {
                Lookup::Zero => return Ok(None),
                Lookup::File(path) => {
                    let got = self
                        .blocking(move |e| {
                            let mut buf = vec![0u8; n];
                            let found = e.cache.read_range(&path, start as u64, &mut buf)?;
                            Ok(found.then_some(buf))
                        })
                        .await?;
                    if got.is_some() {
                        return Ok(got);
                    }
                    // Moved or evicted meanwhile: look again.
                }
                Lookup::Remote => {
                    let _guard = self.chunk_locks.lock(index).await;
                    if !matches!(self.cache.lookup(index), Lookup::Remote) {
                        continue;
                    }
                    let whole = self.fetch(index, true).await?;
                    return Ok(whole.map(|d| d[start..start + n].to_vec()));
                }
            }
        }
        Err(VolumeError::Io(io::Error::other(format!(
            "{}: chunk {index} kept moving in the cache; giving up",
            self.name
        ))))
    }

    /// Bring chunk `index` into the cache if only the bucket has it.
    pub async fn warm(self: &Arc<Self>, index: u64) -> VolumeResult<()> {
        if self.cache.lookup_is_remote(index) {
            self.read_piece(index, 0, 0).await?;
        }
        Ok(())
    }

    /// Download chunk `index` and (`keep`) keep a clean copy in the cache;
    /// a writer about to make it dirty does not need one. The caller holds
    /// the chunk's lock, so no write can slip in between.
    async fn fetch(self: &Arc<Self>, index: u64, keep: bool) -> VolumeResult<Option<Vec<u8>>> {
        let key = self.layout.chunk(index);
        let got = self.bucket.get(&key).await.map_err(|e| {
            self.bucket.io_error(
                &format!("reading chunk {index} of {}", self.layout.prefix),
                e,
            )
        })?;
        let Some(got) = got else {
            // Deleted behind our back: a missing chunk reads as zeros.
            return Ok(None);
        };
        let data = codec::decode(&got.bytes, self.chunk as usize)
            .map_err(|e| self.chunk_error(index, &e))?;
        if keep {
            let copy = data.clone();
            self.blocking(move |e| {
                e.cache.put_clean(index, &copy);
                Ok(())
            })
            .await?;
        }
        Ok(Some(data))
    }

    /// Note a read of `[offset, end)`; if it continues a sequential stream,
    /// fetch the chunks after it in the background.
    pub fn read_ahead(self: &Arc<Self>, offset: u64, end: u64) {
        let last = self.last_read_end.swap(end, Ordering::Relaxed);
        if last == u64::MAX || offset.abs_diff(last) > READAHEAD_BYTES / 2 {
            return;
        }
        let first = end.div_ceil(self.chunk);
        let count = (READAHEAD_BYTES / self.chunk).clamp(2, 32);
        let last_chunk = (self.size - 1) / self.chunk;
        for index in first..(first + count).min(last_chunk + 1) {
            if self.cache.lookup_is_remote(index) && self.prefetching.lock().insert(index) {
                let me = Arc::clone(self);
                tokio::spawn(async move {
                    let _ = me.warm(index).await;
                    me.prefetching.lock().remove(&index);
                });
            }
        }
    }

    /// Wait until dirty chunks leave room for one more.
    async fn wait_for_room(&self) -> VolumeResult<()> {
        let started = Instant::now();
        while self.cache.full() {
            self.wake_uploader.notify_one();
            let _ = tokio::time::timeout(Duration::from_millis(100), self.room.notified()).await;
            if started.elapsed() > self.bucket.timeout {
                let msg = format!(
                    "{}: the write-back cache ({} dirty) has not drained for {} s: uploads to {} are failing",
                    self.name,
                    crate::s3::human(self.cache.dirty_bytes()),
                    self.bucket.timeout.as_secs(),
                    self.bucket.name
                );
                tracing::error!("{msg}");
                return Err(VolumeError::Io(io::Error::other(msg)));
            }
        }
        Ok(())
    }

    /// Write `data` at byte `start` of chunk `index` into the cache.
    pub async fn write_piece(
        self: &Arc<Self>,
        index: u64,
        start: usize,
        data: Bytes,
    ) -> VolumeResult<()> {
        self.check_lease()?;
        // A chunk dirty already takes no more room: only others wait.
        let _guard = loop {
            let guard = self.chunk_locks.lock(index).await;
            if self.cache.holds_dirty_data(index) || !self.cache.full() {
                break guard;
            }
            drop(guard);
            self.wait_for_room().await?;
        };
        let chunk = self.chunk as usize;
        let whole = if start == 0 && data.len() == chunk {
            data.to_vec()
        } else {
            // Patch the cached chunk in place when the cache has it.
            let piece = data.clone();
            if self
                .blocking(move |e| e.cache.write_local(index, start as u64, &piece))
                .await?
            {
                return Ok(());
            }
            // Only the bucket has it (no clean copy: it becomes dirty now).
            let mut cur = self
                .fetch(index, false)
                .await?
                .unwrap_or_else(|| vec![0u8; chunk]);
            cur[start..start + data.len()].copy_from_slice(&data);
            cur
        };
        self.blocking(move |e| {
            if codec::is_zero(&whole) {
                e.cache.put_dirty(index, None)
            } else {
                e.cache.put_dirty(index, Some(&whole))
            }
        })
        .await
    }

    /// Make chunk `index` all zeros (its object will be deleted).
    pub async fn zero_chunk(self: &Arc<Self>, index: u64) -> VolumeResult<()> {
        self.check_lease()?;
        let _guard = self.chunk_locks.lock(index).await;
        self.blocking(move |e| e.cache.put_dirty(index, None)).await
    }

    /// Upload the current version of chunk `index` if it is dirty.
    pub async fn upload(self: &Arc<Self>, index: u64) -> VolumeResult<()> {
        self.check_lease()?;
        let _order = self.upload_locks.lock(index).await;
        let snap = {
            let _guard = self.chunk_locks.lock(index).await;
            self.blocking(move |e| e.cache.snapshot(index)).await?
        };
        let Some(snap) = snap else { return Ok(()) };
        let key = self.layout.chunk(index);
        self.uploads_in_flight.fetch_add(1, Ordering::Relaxed);
        let result = match &snap.data {
            Some(d) => {
                let body = Bytes::from(codec::encode(d, self.zstd));
                self.bucket
                    .put(&key, body, PutMode::Overwrite)
                    .await
                    .map(|_| ())
            }
            None => self.bucket.delete(&key).await,
        };
        self.uploads_in_flight.fetch_sub(1, Ordering::Relaxed);
        result.map_err(|e| {
            self.bucket.io_error(
                &format!("uploading chunk {index} of {}", self.layout.prefix),
                e,
            )
        })?;
        let present = snap.data.is_some();
        let gen = snap.gen;
        {
            let _guard = self.chunk_locks.lock(index).await;
            self.blocking(move |e| {
                e.cache.uploaded(index, gen, present);
                Ok(())
            })
            .await?;
        }
        self.room.notify_waiters();
        Ok(())
    }

    /// Upload `indices`, `MAX_REQUESTS` at a time; the first error wins
    /// (the others are still attempted).
    pub async fn upload_all(self: &Arc<Self>, indices: Vec<u64>) -> VolumeResult<()> {
        let results: Vec<VolumeResult<()>> = stream::iter(indices)
            .map(|i| {
                let me = Arc::clone(self);
                async move { me.upload(i).await }
            })
            .buffer_unordered(MAX_REQUESTS)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Upload every chunk that is dirty now: what FLUSH promises.
    pub async fn flush(self: &Arc<Self>) -> VolumeResult<()> {
        self.check_lease()?;
        let dirty = self.cache.dirty();
        self.upload_all(dirty).await
    }

    /// What the background uploader sends this round: chunks that are due
    /// (quiet, or dirty too long), and when dirty chunks fill more than
    /// three quarters of the cache, the least recently written ones too,
    /// down to three quarters, so writers of new chunks seldom wait for
    /// room. (Measured: half instead uploads more and writes ~30% slower.)
    pub(super) fn writeback_batch(&self) -> Vec<u64> {
        let mut batch = self.cache.due(WRITEBACK_QUIET, WRITEBACK_MAX_AGE);
        let high = self.cache.limit() / 4 * 3;
        let dirty = self.cache.dirty_bytes();
        if dirty > high {
            let excess = (dirty - high).div_ceil(self.chunk) as usize;
            let chosen: HashSet<u64> = batch.iter().copied().collect();
            let oldest = self
                .cache
                .dirty()
                .into_iter()
                .filter(|i| !chosen.contains(i));
            batch.extend(oldest.take(excess.saturating_sub(chosen.len())));
        }
        batch
    }

    /// Start the background uploader and lease renewal; both stop when the
    /// engine is dropped.
    pub fn spawn_tasks(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(uploader(weak));
        if let Some(lease) = &self.lease {
            let weak = Arc::downgrade(self);
            let every = lease.ttl / 3;
            tokio::spawn(renewer(weak, every));
        }
    }
}

async fn uploader(weak: Weak<Engine>) {
    let mut failing = false;
    loop {
        let wake = match weak.upgrade() {
            Some(e) => {
                let notified = Arc::clone(&e);
                drop(e);
                notified
            }
            None => return,
        };
        // Woken by a writer waiting for room: upload everything now.
        let woken = tokio::select! {
            _ = wake.wake_uploader.notified() => true,
            _ = tokio::time::sleep(WRITEBACK_INTERVAL) => false,
        };
        drop(wake);
        let Some(engine) = weak.upgrade() else { return };
        let dirty = if woken {
            engine.cache.dirty()
        } else {
            engine.writeback_batch()
        };
        if dirty.is_empty() {
            continue;
        }
        match engine.upload_all(dirty).await {
            Ok(()) => {
                if failing {
                    tracing::info!(
                        "{}: uploads to {} work again",
                        engine.name,
                        engine.bucket.name
                    );
                }
                failing = false
            }
            Err(e) => {
                if !failing {
                    tracing::warn!("{}: background upload failed, will retry: {e}", engine.name);
                }
                failing = true;
                drop(engine);
                tokio::time::sleep(WRITEBACK_INTERVAL).await;
            }
        }
    }
}

async fn renewer(weak: Weak<Engine>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(engine) = weak.upgrade() else { return };
        let Some(lease) = engine.lease.clone() else {
            return;
        };
        if let Err(e) = lease.renew(&engine.bucket, &engine.layout).await {
            if lease.is_released() {
                return; // closed: the lease was given back on purpose
            }
            tracing::error!("{}: lease renewal failed: {e}", engine.name);
            if lease.check().is_err() && e.contains("taken over") {
                return;
            }
        }
    }
}
