//! [`CloneVolume`]: the Volume clients see while (and after) a clone
//! hydrates.
//!
//! Requests touching only local regions go straight to the local store.
//! Otherwise:
//!
//! - read, read_sparse, cache: copy the missing regions first, then serve
//!   locally;
//! - write, write_zeroes: regions the request covers whole are not copied
//!   (they are about to be overwritten), partly covered ones are copied
//!   first; all under the regions' locks, so a background copy cannot land
//!   on top of the new data;
//! - trim: regions covered whole become local without copying (their
//!   contents are unspecified after a trim anyway); partly covered ones
//!   stay as they are;
//! - flush, and FUA before hydration is complete: commit (flush the local
//!   store, then persist the bitmap), so an acknowledged write can never be
//!   overwritten from the source after a crash;
//! - extents: from the local store for local regions, from the source
//!   for the rest ("data" if the source cannot say).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::try_join_all;
use longwire_core::{
    check_range, Capabilities, Extent, ExtentKind, LayerStatus, ReadSegment, Volume, VolumeError,
    VolumeResult, ZeroFlags,
};
use tokio::task::JoinHandle;

use super::background::{commit_periodically, hydrate_all};
use super::hydration::Hydration;
use super::progress::Progress;
use super::CloneConfig;
use crate::RegionBitmap;

/// A local volume filled from a remote source on demand and in the
/// background. See the module docs.
pub struct CloneVolume {
    h: Arc<Hydration>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for CloneVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloneVolume")
            .field("bitmap", &self.h.bitmap)
            .field("progress", &self.progress())
            .finish()
    }
}

impl Drop for CloneVolume {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl CloneVolume {
    /// Serve `local`, filling it from `source`. `bitmap` (bit set = region
    /// is local) says how far an earlier run got; a complete bitmap needs
    /// no source (pass `None`) and gives a plain pass-through. Starts the
    /// background copier on the current tokio runtime.
    pub fn new(
        local: Arc<dyn Volume>,
        source: Option<Arc<dyn Volume>>,
        bitmap: RegionBitmap,
        config: CloneConfig,
    ) -> Result<CloneVolume, String> {
        if bitmap.volume_size() != local.size() {
            return Err(format!(
                "{}: the hydration bitmap is for a {}-byte volume but the local volume is {} bytes",
                bitmap.path().display(),
                bitmap.volume_size(),
                local.size()
            ));
        }
        let complete = bitmap.next_clear(0).is_none();
        if !complete {
            if local.capabilities().read_only {
                return Err("a clone needs a writable local volume (drop readonly)".into());
            }
            let Some(source) = &source else {
                return Err(format!(
                    "{}: hydration is not complete, so the clone needs its source (clone-from=…)",
                    bitmap.path().display()
                ));
            };
            if source.size() != local.size() {
                return Err(format!(
                    "the clone's source is {} bytes but the local volume is {} bytes; they must be the same size \
                     (a new local file is created at the source's size when no size= is given)",
                    source.size(),
                    local.size()
                ));
            }
            let region = bitmap.region_size();
            for (what, caps) in [
                ("local volume", local.capabilities()),
                ("source", source.capabilities()),
            ] {
                if caps.min_block > 1 && !region.is_multiple_of(u64::from(caps.min_block)) {
                    return Err(format!(
                        "the {what}'s {}-byte minimum block does not divide the {region}-byte hydration region",
                        caps.min_block
                    ));
                }
            }
        }
        let interval = config.commit_interval;
        let h = Arc::new(Hydration::new(local, source, bitmap, config));
        let mut tasks = Vec::new();
        if !complete {
            tasks.push(tokio::spawn(hydrate_all(Arc::clone(&h))));
            tasks.push(tokio::spawn(commit_periodically(Arc::clone(&h), interval)));
        }
        Ok(CloneVolume { h, tasks })
    }

    /// How far hydration has come.
    pub fn progress(&self) -> Progress {
        self.h.progress()
    }

    /// Wait until every region is local, the bitmap is committed and the
    /// source released.
    pub async fn wait_complete(&self) {
        let mut rx = self.h.watch_complete();
        let _ = rx.wait_for(|c| *c).await;
    }

    pub fn is_complete(&self) -> bool {
        self.h.is_complete()
    }

    /// The local volume underneath.
    pub fn local(&self) -> &Arc<dyn Volume> {
        &self.h.local
    }

    fn check(&self, offset: u64, len: u64) -> VolumeResult<()> {
        if check_range(self.size(), offset, len) {
            Ok(())
        } else {
            Err(VolumeError::Invalid(format!(
                "{len} bytes at offset {offset} go past the end of the volume ({} bytes)",
                self.size()
            )))
        }
    }

    /// Copy every missing region `[offset, offset + len)` touches.
    async fn hydrate_range(&self, offset: u64, len: u64) -> VolumeResult<()> {
        let missing = self.h.missing(offset, len);
        if missing.is_empty() {
            return Ok(());
        }
        try_join_all(missing.into_iter().map(|r| self.h.hydrate(r))).await?;
        Ok(())
    }

    /// Run a modifying local operation over `[offset, offset + len)` with
    /// the missing regions it touches locked: partly covered ones are
    /// copied first (unless `copy_partial` is false), covered ones become
    /// local once the operation succeeded.
    async fn modify<F, Fut>(
        &self,
        offset: u64,
        len: u64,
        copy_partial: bool,
        op: F,
    ) -> VolumeResult<()>
    where
        F: FnOnce(Arc<dyn Volume>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = VolumeResult<()>> + Send + 'static,
    {
        let missing = self.h.missing(offset, len);
        if missing.is_empty() {
            return op(Arc::clone(&self.h.local)).await;
        }
        let held = self.h.locks.lock_many(missing.iter().copied()).await;
        let covered = self.h.bitmap.regions_covered(offset, len);
        let h = Arc::clone(&self.h);
        // The whole locked section runs to the end even if our caller goes
        // away: a local write must not land after the locks are released.
        tokio::spawn(async move {
            let _held = held;
            let partial: Vec<u64> = missing
                .iter()
                .copied()
                .filter(|r| !covered.contains(r) && !h.bitmap.get(*r))
                .collect();
            if copy_partial {
                for r in partial {
                    h.copy_region(r).await?;
                }
            }
            op(Arc::clone(&h.local)).await?;
            for r in missing.into_iter().filter(|r| covered.contains(r)) {
                h.bitmap.set(r..r + 1);
            }
            Ok(())
        })
        .await
        .map_err(|e| VolumeError::Io(std::io::Error::other(format!("clone write: {e}"))))?
    }

    /// After a FUA operation or flush: make the bits durable too.
    async fn commit_if_hydrating(&self) -> VolumeResult<()> {
        if self.h.is_complete() {
            Ok(())
        } else {
            self.h.commit().await
        }
    }
}

#[async_trait]
impl Volume for CloneVolume {
    fn size(&self) -> u64 {
        self.h.local.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.h.local.capabilities()
    }

    async fn read(&self, offset: u64, len: usize) -> VolumeResult<Bytes> {
        self.check(offset, len as u64)?;
        let _fg = self.h.foreground();
        self.hydrate_range(offset, len as u64).await?;
        self.h.local.read(offset, len).await
    }

    async fn read_sparse(&self, offset: u64, len: usize) -> VolumeResult<Vec<ReadSegment>> {
        self.check(offset, len as u64)?;
        let _fg = self.h.foreground();
        self.hydrate_range(offset, len as u64).await?;
        self.h.local.read_sparse(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> VolumeResult<()> {
        self.check(offset, data.len() as u64)?;
        let _fg = self.h.foreground();
        if self.h.is_complete() {
            return self.h.local.write(offset, data, fua).await;
        }
        let len = data.len() as u64;
        self.modify(offset, len, true, move |local| async move {
            local.write(offset, data, false).await
        })
        .await?;
        if fua {
            self.commit_if_hydrating().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> VolumeResult<()> {
        if self.h.is_complete() {
            return self.h.local.flush().await;
        }
        self.h.commit().await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> VolumeResult<()> {
        self.check(offset, len)?;
        let _fg = self.h.foreground();
        if self.h.is_complete() {
            return self.h.local.trim(offset, len, fua).await;
        }
        self.modify(offset, len, false, move |local| async move {
            local.trim(offset, len, false).await
        })
        .await?;
        if fua {
            self.commit_if_hydrating().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> VolumeResult<()> {
        self.check(offset, len)?;
        let _fg = self.h.foreground();
        if self.h.is_complete() {
            return self.h.local.write_zeroes(offset, len, flags).await;
        }
        let missing = self.h.missing(offset, len);
        let covered = self.h.bitmap.regions_covered(offset, len);
        if flags.fast && missing.iter().any(|r| !covered.contains(r)) {
            return Err(VolumeError::NotSupported(
                "part of the range must be copied from the clone's source first, which is not fast"
                    .into(),
            ));
        }
        let inner = ZeroFlags {
            fua: false,
            ..flags
        };
        self.modify(offset, len, true, move |local| async move {
            local.write_zeroes(offset, len, inner).await
        })
        .await?;
        if flags.fua {
            self.commit_if_hydrating().await?;
        }
        Ok(())
    }

    async fn cache(&self, offset: u64, len: u64) -> VolumeResult<()> {
        self.check(offset, len)?;
        self.hydrate_range(offset, len).await?;
        self.h.local.cache(offset, len).await
    }

    async fn extents(&self, offset: u64, len: u64) -> VolumeResult<Vec<Extent>> {
        self.check(offset, len)?;
        let b = &self.h.bitmap;
        let end = offset + len;
        let first = offset / b.region_size();
        let local = b.get(first);
        // The run of regions with the same state, clamped to the request.
        let next = if local {
            b.next_clear(first)
        } else {
            b.next_set(first)
        };
        let run_end = next
            .map_or(self.size(), |r| b.region_bytes(r).start)
            .min(end);
        let run = run_end - offset;
        let answer = if local {
            self.h.local.extents(offset, run).await?
        } else {
            match self.h.source() {
                Ok(src) => match tokio::time::timeout(
                    self.h.config.fetch_timeout,
                    src.extents(offset, run),
                )
                .await
                {
                    Ok(Ok(e)) => e,
                    _ => vec![Extent::new(run, ExtentKind::Data)],
                },
                // Released in the meantime: ask again, now it is all local.
                Err(_) => self.h.local.extents(offset, run).await?,
            }
        };
        Ok(clamp(answer, run))
    }

    fn status(&self) -> Vec<LayerStatus> {
        let mut out = vec![self.progress().status()];
        out.extend(self.h.local.status());
        out
    }

    /// Commit the hydration bitmap (a flush does), then close the local
    /// store (an S3 store gives up its lease).
    async fn close(&self) -> VolumeResult<()> {
        let flushed = self.flush().await;
        self.h.local.close().await?;
        flushed
    }
}

/// Cut an extent list to at most `limit` bytes.
fn clamp(extents: Vec<Extent>, limit: u64) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut total = 0;
    for e in extents {
        if total >= limit {
            break;
        }
        let len = e.len.min(limit - total);
        Extent::push_merged(&mut out, Extent::new(len, e.kind));
        total += len;
    }
    if out.is_empty() {
        out.push(Extent::new(limit, ExtentKind::Data));
    }
    out
}
