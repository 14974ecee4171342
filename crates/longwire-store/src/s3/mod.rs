//! Volumes in an S3 bucket (AWS, Garage, MinIO, s3s-fs…), through the
//! `object_store` crate, with a local write-back cache.
//!
//! URI: `s3://BUCKET/PREFIX?endpoint=http://127.0.0.1:3900&region=garage&size=10G`
//! (see [`crate::open_uri`] and [`S3Options`]).
//!
//! - **Objects** ([`manifest`]): `PREFIX/manifest.json` (size, chunk size,
//!   compression, format version), one object per non-zero chunk under
//!   `PREFIX/chunks/`, and `PREFIX/lease.json`. A missing chunk reads as
//!   zeros; a chunk that becomes all zero (by a write, TRIM or
//!   WRITE_ZEROES) has its object deleted. Extents are chunk presence,
//!   listed once at open and then kept in memory. A chunk object of the
//!   wrong size or a corrupt manifest is an error naming the volume.
//! - **Cache** ([`cache`]): writes land in a bounded directory of chunk
//!   files and are acknowledged from there; a background task uploads
//!   dirty chunks once they are quiet for a second (or dirty for 10 s),
//!   FLUSH uploads every dirty chunk and a FUA write its own chunks
//!   before replying. Dirty chunks survive a killed
//!   server and are uploaded at the next open.
//! - **Lease** ([`lease`]): one writer per volume, by conditional writes
//!   where the server honours them (probed at open), best effort otherwise.
//! - **Bucket** ([`bucket`]): at most 16 requests at once, retries with
//!   backoff inside a deadline (`timeout=`, default 30 s) after which the
//!   request fails with EIO and a log line naming the bucket.
//!
//! One volume object serves every connection with one cache, so the volume
//! advertises multi-conn.

mod bucket;
mod cache;
mod codec;
mod engine;
pub mod lease;
pub mod manage;
pub mod manifest;
mod options;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use longwire_core::{
    Capabilities, Extent, ExtentKind, Gauge, LayerStatus, ReadSegment, Volume, VolumeError,
    VolumeResult, ZeroFlags,
};
use object_store::{ObjectStore, PutMode};

use crate::sparse::{check_in_range, check_read, check_write, SegmentBuilder, MAX_PAYLOAD};
use crate::sqlite::Compression;
use bucket::Bucket;
use cache::Cache;
use engine::Engine;
use manifest::{Layout, Manifest};

pub use lease::{LeaseMode, LeaseRecord};
pub use options::{parse_duration, S3Options, PARAMS};

/// Most chunks one `extents` call looks at.
const MAX_EXTENT_CHUNKS: usize = 8192;
/// Best-effort lease: wait between writing our token and reading it back.
const LEASE_SETTLE: Duration = Duration::from_millis(1500);

/// A volume stored in an S3 bucket.
pub struct S3Volume {
    engine: Arc<Engine>,
    manifest: Manifest,
    read_only: bool,
    /// Removed on drop (read-only opens cache in a private temporary directory).
    temp_cache: Option<PathBuf>,
}

impl std::fmt::Debug for S3Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Volume")
            .field("name", &self.engine.name)
            .field("size", &self.manifest.size)
            .field("chunk_size", &self.manifest.chunk_size)
            .finish()
    }
}

/// Bytes as "1.5 MiB".
pub(crate) fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Connect to the bucket: the store, the key layout, and a name for messages.
pub(crate) fn connect(opts: &S3Options) -> Result<(Bucket, Layout), String> {
    let layout = Layout::new(&opts.prefix).map_err(|e| format!("{}: {e}", opts.display()))?;
    let store = opts.build_store()?;
    Ok((connect_store(store, opts), layout))
}

pub(crate) fn connect_store(store: Arc<dyn ObjectStore>, opts: &S3Options) -> Bucket {
    let name = match &opts.endpoint {
        Some(ep) => format!("bucket {} at {ep}", opts.bucket),
        None => format!("bucket {}", opts.bucket),
    };
    Bucket::new(store, name, opts.timeout)
}

/// Read and check the manifest; None when the volume does not exist.
pub(crate) async fn read_manifest(
    bucket: &Bucket,
    layout: &Layout,
    vname: &str,
) -> Result<Option<Manifest>, String> {
    match bucket.get(&layout.manifest()).await {
        Ok(Some(f)) => Manifest::parse(&f.bytes)
            .map(Some)
            .map_err(|e| format!("{vname}: {e}")),
        Ok(None) => Ok(None),
        Err(e) => Err(format!(
            "{vname}: cannot read {} from {}: {e}",
            layout.manifest(),
            bucket.name
        )),
    }
}

/// Chunks present in the bucket, with their object sizes.
pub(crate) async fn list_chunks(
    bucket: &Bucket,
    layout: &Layout,
    vname: &str,
) -> Result<Vec<(u64, u64)>, String> {
    let listed = bucket
        .list(&layout.chunks_dir())
        .await
        .map_err(|e| format!("{vname}: cannot list its chunks in {}: {e}", bucket.name))?;
    Ok(listed
        .iter()
        .filter_map(|m| layout.chunk_index(&m.location).map(|i| (i, m.size)))
        .collect())
}

impl S3Volume {
    /// Open (or, with a size, create) the volume `opts` names.
    pub async fn open(opts: &S3Options) -> Result<S3Volume, String> {
        let (bucket, layout) = connect(opts)?;
        Self::open_with(bucket, layout, opts).await
    }

    /// Open over an existing object store (unit tests use an in-memory one).
    pub(crate) async fn open_with(
        bucket: Bucket,
        layout: Layout,
        opts: &S3Options,
    ) -> Result<S3Volume, String> {
        let vname = opts.display();
        // A missing volume without a size fails before taking the lease.
        if opts.size.is_none() && read_manifest(&bucket, &layout, &vname).await?.is_none() {
            return Err(format!(
                "{vname} does not exist (no {} in {}); add &size=10G (any size) to create it",
                layout.manifest(),
                bucket.name
            ));
        }
        let lease = if opts.read_only {
            None
        } else {
            let lease = lease::acquire(&bucket, &layout, opts.lease_ttl, LEASE_SETTLE).await?;
            match lease.mode {
                LeaseMode::Conditional => tracing::info!(
                    "{vname}: lease taken (conditional writes honoured by {})",
                    bucket.name
                ),
                _ => tracing::warn!(
                    "{vname}: {} ignores conditional writes; the single-writer lease is best effort \
                     (a second server started at the same moment is not refused)",
                    bucket.name
                ),
            }
            Some(lease)
        };
        let held = lease.clone();
        let spare = (
            Bucket::new(bucket.store.clone(), bucket.name.clone(), bucket.timeout),
            layout.clone(),
        );
        let opened = Self::open_leased(bucket, layout, opts, lease).await;
        if let (Err(_), Some(l)) = (&opened, held) {
            // Give the lease back so a corrected retry is not refused.
            if let Err(e) = l.release(&spare.0, &spare.1).await {
                tracing::warn!("{vname}: could not give the lease back: {e}");
            }
        }
        opened
    }

    async fn open_leased(
        bucket: Bucket,
        layout: Layout,
        opts: &S3Options,
        lease: Option<Arc<lease::Lease>>,
    ) -> Result<S3Volume, String> {
        let vname = opts.display();
        let manifest = match read_manifest(&bucket, &layout, &vname).await? {
            Some(mut m) => {
                if let Some(c) = opts.chunk_size.filter(|&c| c != m.chunk_size) {
                    return Err(format!(
                        "{vname}: chunk_size={} does not match the volume's chunk size {} (fixed at creation)",
                        human(c),
                        human(m.chunk_size)
                    ));
                }
                if let Some(c) = opts.compression.filter(|&c| c != m.compression()) {
                    return Err(format!(
                        "{vname}: compression={c} does not match the volume's compression {} (fixed at creation)",
                        m.compression
                    ));
                }
                match opts.size {
                    Some(s) if s < m.size => return Err(format!(
                        "{vname}: size={} would shrink the volume ({} bytes); volumes never shrink",
                        s, m.size
                    )),
                    Some(s) if s > m.size && !opts.read_only => {
                        m.size = s;
                        bucket
                            .put(
                                &layout.manifest(),
                                Bytes::from(m.to_json()),
                                PutMode::Overwrite,
                            )
                            .await
                            .map_err(|e| format!("{vname}: cannot grow the volume: {e}"))?;
                        tracing::info!("{vname}: grown to {}", human(s));
                    }
                    _ => {}
                }
                m
            }
            None => {
                let Some(size) = opts.size.filter(|_| !opts.read_only) else {
                    return Err(format!(
                        "{vname} does not exist (no {} in {}); add &size=10G (any size) to create it",
                        layout.manifest(),
                        bucket.name
                    ));
                };
                if size == 0 {
                    return Err(format!("{vname}: size must be more than 0"));
                }
                let m = Manifest::new(
                    size,
                    opts.chunk_size.unwrap_or(manifest::DEFAULT_CHUNK_SIZE),
                    opts.compression.unwrap_or_default(),
                );
                bucket
                    .put(
                        &layout.manifest(),
                        Bytes::from(m.to_json()),
                        PutMode::Overwrite,
                    )
                    .await
                    .map_err(|e| {
                        format!("{vname}: cannot create the volume in {}: {e}", bucket.name)
                    })?;
                tracing::info!(
                    "{vname}: created ({}, {} chunks)",
                    human(size),
                    human(m.chunk_size)
                );
                m
            }
        };
        let remote: BTreeSet<u64> = list_chunks(&bucket, &layout, &vname)
            .await?
            .into_iter()
            .map(|(i, _)| i)
            .collect();

        let (dir, temp_cache) = if opts.read_only {
            let d = std::env::temp_dir().join(format!("longwire-s3-ro-{}", lease::random_token()));
            (d.clone(), Some(d))
        } else {
            (opts.cache_dir(), None)
        };
        let identity = format!("{vname} {}", manifest.volume_id);
        let chunk = manifest.chunk_size;
        let limit = opts.cache_size.max(chunk);
        let cache =
            tokio::task::spawn_blocking(move || Cache::open(&dir, &identity, chunk, limit, remote))
                .await
                .map_err(|e| format!("{vname}: {e}"))?
                .map_err(|e| format!("{vname}: {e}"))?;
        let engine = Arc::new(Engine::new(
            bucket,
            layout,
            vname.clone(),
            &manifest,
            cache,
            lease,
        ));
        let leftover = engine.cache.dirty();
        if !leftover.is_empty() {
            tracing::info!(
                "{vname}: uploading {} chunks left in the cache {} by an earlier run",
                leftover.len(),
                engine.cache.dir().display()
            );
            engine
                .upload_all(leftover)
                .await
                .map_err(|e| format!("{vname}: cannot upload chunks left in the cache: {e}"))?;
        }
        if !opts.read_only {
            engine.spawn_tasks();
        }
        Ok(S3Volume {
            engine,
            manifest,
            read_only: opts.read_only,
            temp_cache,
        })
    }

    /// How the single-writer lease is enforced on this bucket.
    pub fn lease_mode(&self) -> LeaseMode {
        self.engine
            .lease
            .as_ref()
            .map(|l| l.mode)
            .unwrap_or(LeaseMode::None)
    }

    /// Our lease record, when writing.
    pub fn lease(&self) -> Option<LeaseRecord> {
        self.engine.lease.as_ref().map(|l| l.record())
    }

    pub fn chunk_size(&self) -> u64 {
        self.manifest.chunk_size
    }

    pub fn compression(&self) -> Compression {
        self.manifest.compression()
    }

    /// Bytes written here and not yet in the bucket.
    pub fn dirty_bytes(&self) -> u64 {
        self.engine.cache.dirty_bytes()
    }

    fn check_writable(&self) -> VolumeResult<()> {
        if self.read_only {
            Err(VolumeError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Read `[offset, offset+len)` as one piece per chunk, concurrently,
    /// in order: each piece's length and bytes (None: zeros).
    async fn load_range(
        &self,
        offset: u64,
        len: usize,
    ) -> VolumeResult<Vec<(usize, Option<Vec<u8>>)>> {
        let chunk = self.manifest.chunk_size;
        let mut futs = Vec::new();
        let mut pos = offset;
        let end = offset + len as u64;
        while pos < end {
            let index = pos / chunk;
            let start = (pos % chunk) as usize;
            let n = ((chunk - start as u64).min(end - pos)) as usize;
            let e = Arc::clone(&self.engine);
            futs.push(async move { e.read_piece(index, start, n).await.map(|d| (n, d)) });
            pos += n as u64;
        }
        let out = futures::future::try_join_all(futs).await?;
        self.engine.read_ahead(offset, end);
        Ok(out)
    }

    async fn zero(&self, offset: u64, len: u64, fua: bool) -> VolumeResult<()> {
        self.check_writable()?;
        check_write(self.manifest.size, offset, len)?;
        if len == 0 {
            return if fua { self.flush().await } else { Ok(()) };
        }
        let chunk = self.manifest.chunk_size;
        let end = offset + len;
        let first_whole = offset.div_ceil(chunk);
        let end_whole = end / chunk; // exclusive; the last chunk may end past the volume
        let last_chunk_end = end == self.manifest.size;
        let end_whole = if last_chunk_end {
            end.div_ceil(chunk)
        } else {
            end_whole
        };
        let mut touched = Vec::new();
        // Partial chunks at the ends: rewrite with zeros (only if they hold
        // data). A range inside one chunk is one piece; a range across a
        // chunk boundary with no whole chunk in it is two, one per chunk.
        let mut edges = Vec::new();
        if first_whole > end_whole {
            edges.push((offset, end));
        } else {
            if offset < first_whole * chunk {
                edges.push((offset, (first_whole * chunk).min(end)));
            }
            if end_whole * chunk < end {
                edges.push(((end_whole * chunk).max(offset), end));
            }
        }
        for (from, to) in edges {
            let index = from / chunk;
            if !self.engine.cache.allocated(index, index, 1).is_empty() {
                let zeros = Bytes::from(vec![0u8; (to - from) as usize]);
                self.engine
                    .write_piece(index, (from % chunk) as usize, zeros)
                    .await?;
                touched.push(index);
            }
        }
        if first_whole < end_whole {
            for index in self
                .engine
                .cache
                .allocated(first_whole, end_whole - 1, usize::MAX)
            {
                self.engine.zero_chunk(index).await?;
                touched.push(index);
            }
        }
        if fua {
            self.engine.upload_all(touched).await?;
        }
        Ok(())
    }
}

impl Drop for S3Volume {
    fn drop(&mut self) {
        if let Some(d) = &self.temp_cache {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

#[async_trait]
impl Volume for S3Volume {
    fn size(&self) -> u64 {
        self.manifest.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.read_only,
            can_flush: true,
            can_trim: !self.read_only,
            can_zero: !self.read_only,
            // Zeroing drops chunks (and rewrites at most two partial ones).
            can_fast_zero: !self.read_only,
            can_multi_conn: true,
            min_block: 1,
            preferred_block: self.manifest.chunk_size.min(1 << 20) as u32,
            max_payload: MAX_PAYLOAD,
        }
    }

    async fn read(&self, offset: u64, len: usize) -> VolumeResult<Bytes> {
        check_read(self.manifest.size, offset, len)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let mut pieces = self.load_range(offset, len).await?;
        if let [(_, Some(d))] = pieces.as_mut_slice() {
            return Ok(Bytes::from(std::mem::take(d))); // one chunk: no copy
        }
        let mut buf = vec![0u8; len];
        let mut at = 0;
        for (n, data) in pieces {
            if let Some(d) = data {
                buf[at..at + n].copy_from_slice(&d);
            }
            at += n;
        }
        Ok(Bytes::from(buf))
    }

    async fn read_sparse(&self, offset: u64, len: usize) -> VolumeResult<Vec<ReadSegment>> {
        check_read(self.manifest.size, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut out = SegmentBuilder::default();
        for (n, data) in self.load_range(offset, len).await? {
            match data {
                Some(d) => out.data(n).copy_from_slice(&d),
                None => out.zero(n as u64),
            }
        }
        Ok(out.finish())
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> VolumeResult<()> {
        self.check_writable()?;
        check_write(self.manifest.size, offset, data.len() as u64)?;
        let chunk = self.manifest.chunk_size;
        let mut pos = 0usize;
        let mut touched = Vec::new();
        while pos < data.len() {
            let abs = offset + pos as u64;
            let index = abs / chunk;
            let start = (abs % chunk) as usize;
            let n = (chunk as usize - start).min(data.len() - pos);
            self.engine
                .write_piece(index, start, data.slice(pos..pos + n))
                .await?;
            touched.push(index);
            pos += n;
        }
        if fua {
            self.engine.upload_all(touched).await?;
        }
        Ok(())
    }

    async fn flush(&self) -> VolumeResult<()> {
        if self.read_only {
            return Ok(());
        }
        self.engine.flush().await
    }

    /// Drops whole chunks and zeroes partial ones, so a trimmed range reads
    /// back as zeros.
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> VolumeResult<()> {
        self.zero(offset, len, fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> VolumeResult<()> {
        self.zero(offset, len, flags.fua).await
    }

    async fn cache(&self, offset: u64, len: u64) -> VolumeResult<()> {
        check_in_range(self.manifest.size, offset, len)?;
        let len = len.min(MAX_PAYLOAD as u64);
        if len > 0 {
            let chunk = self.manifest.chunk_size;
            let warm = (offset / chunk..=(offset + len - 1) / chunk).map(|i| self.engine.warm(i));
            futures::future::try_join_all(warm).await?;
        }
        Ok(())
    }

    async fn extents(&self, offset: u64, len: u64) -> VolumeResult<Vec<Extent>> {
        if len == 0 {
            return Err(VolumeError::Invalid("extents of an empty range".into()));
        }
        check_in_range(self.manifest.size, offset, len)?;
        let chunk = self.manifest.chunk_size;
        let end = offset + len;
        let present =
            self.engine
                .cache
                .allocated(offset / chunk, (end - 1) / chunk, MAX_EXTENT_CHUNKS);
        let truncated = present.len() == MAX_EXTENT_CHUNKS;
        let mut out = Vec::new();
        let mut pos = offset;
        for index in present {
            let start = (index * chunk).max(pos);
            let stop = (index * chunk + chunk).min(end);
            Extent::push_merged(&mut out, Extent::new(start - pos, ExtentKind::Hole));
            Extent::push_merged(&mut out, Extent::new(stop - start, ExtentKind::Data));
            pos = stop;
        }
        if !truncated {
            Extent::push_merged(&mut out, Extent::new(end - pos, ExtentKind::Hole));
        }
        Ok(out)
    }

    /// Uploads what is still dirty, then gives the lease back, so the next
    /// server takes the volume at once instead of after the lease's TTL.
    /// If the upload fails the lease is kept: the unuploaded chunks are in
    /// this server's cache, and another writer must not start from the
    /// older chunks in the bucket while the lease can still say so.
    async fn close(&self) -> VolumeResult<()> {
        let Some(lease) = &self.engine.lease else {
            return Ok(());
        };
        if lease.is_released() {
            return Ok(());
        }
        let name = &self.engine.name;
        if let Err(e) = self.engine.flush().await {
            tracing::error!(
                "{name}: {} not uploaded at close ({e}); keeping the lease, so other servers \
                 are refused until it expires; restarting this server with the same cache \
                 uploads them",
                human(self.engine.cache.dirty_bytes())
            );
            return Err(e);
        }
        match lease
            .release(&self.engine.bucket, &self.engine.layout)
            .await
        {
            Ok(()) => {
                tracing::info!("{name}: lease released");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(
                    "{name}: could not delete the lease ({e}); another server can take the \
                     volume once it expires"
                );
                Err(VolumeError::Io(std::io::Error::other(format!(
                    "{name}: releasing the lease: {e}"
                ))))
            }
        }
    }

    fn status(&self) -> Vec<LayerStatus> {
        let dirty = self.engine.cache.dirty_bytes();
        let clean = self.engine.cache.clean_bytes();
        let uploads = self.engine.uploads_in_flight.load(Ordering::Relaxed);
        let mode = self.lease_mode();
        let lease_ok = self.engine.lease.as_ref().is_none_or(|l| l.check().is_ok());
        let state = if !lease_ok {
            "lease-lost"
        } else if dirty > 0 {
            "dirty"
        } else {
            "clean"
        };
        vec![LayerStatus {
            layer: "s3",
            state: state.into(),
            detail: format!(
                "{}: {} dirty, {} cached of {} in {}, {uploads} uploads in flight, lease {}",
                self.engine.name,
                human(dirty),
                human(clean),
                human(self.engine.cache.limit()),
                self.engine.cache.dir().display(),
                mode.as_str()
            ),
            gauges: vec![
                Gauge::new(
                    "dirty_bytes",
                    "Bytes written to the local cache and not yet uploaded",
                    dirty as f64,
                ),
                Gauge::new(
                    "cached_bytes",
                    "Clean bytes kept in the local cache for reads",
                    clean as f64,
                ),
                Gauge::new(
                    "uploads_in_flight",
                    "Chunk uploads running now",
                    uploads as f64,
                ),
                Gauge::new(
                    "lease_conditional",
                    "1 when the lease uses conditional writes, 0 when best effort or read-only",
                    if mode == LeaseMode::Conditional {
                        1.0
                    } else {
                        0.0
                    },
                ),
            ],
        }]
    }
}
