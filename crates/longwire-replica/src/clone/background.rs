//! The background copier and the periodic commit.
//!
//! The copier walks the regions not yet local in order. For each stretch
//! it first asks the source's allocation map (NBD block status) about up to
//! [`SCAN_SPAN`] bytes at once: regions that read as zeros there are marked
//! local without copying, so a mostly empty volume costs one request per
//! span; the rest are copied, several at a time. While foreground requests
//! are running it copies one region at a time with a short pause between
//! them, so clients keep the bandwidth without starving the copy. Source
//! failures back off exponentially and are retried forever; the NBD client
//! underneath reconnects.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use longwire_core::VolumeResult;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::hydration::Hydration;

/// Largest stretch of the source asked about in one allocation-map request.
const SCAN_SPAN: u64 = 1 << 30;
/// Pause between regions while foreground requests are running.
const YIELD_PAUSE: Duration = Duration::from_millis(2);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Copy every region that is not local yet, then release the source.
pub(crate) async fn hydrate_all(h: Arc<Hydration>) {
    let mut backoff = BACKOFF_FIRST;
    let mut cursor = 0;
    loop {
        let next = h
            .bitmap
            .next_clear(cursor)
            .or_else(|| h.bitmap.next_clear(0));
        let Some(first) = next else {
            match h.finish().await {
                Ok(()) => return,
                Err(e) => {
                    warn!("clone: cannot commit the finished hydration, retrying: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
        };
        match copy_stretch(&h, first).await {
            Ok(done_to) => {
                backoff = BACKOFF_FIRST;
                cursor = done_to;
            }
            Err(e) => {
                debug!(
                    "clone: background copy at region {first} failed, retrying in {backoff:?}: {e}"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                cursor = first;
            }
        }
    }
}

/// Handle the regions from `first` as far as one allocation-map answer
/// reaches; returns the region to continue from.
async fn copy_stretch(h: &Arc<Hydration>, first: u64) -> VolumeResult<u64> {
    let size = h.bitmap.volume_size();
    let start = h.bitmap.region_bytes(first).start;
    let end = (start + SCAN_SPAN).min(size);
    let source = h.source()?;
    let extents = match tokio::time::timeout(
        h.config.fetch_timeout,
        source.extents(start, end - start),
    )
    .await
    {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            h.counters.source_failed(e.to_string());
            return Err(e);
        }
        Err(_) => {
            let e = longwire_core::VolumeError::Io(std::io::Error::other(
                "the source's allocation map did not come within the fetch timeout",
            ));
            h.counters.source_failed(e.to_string());
            return Err(e);
        }
    };
    h.counters.source_answered();
    // Data runs, in order, clamped to what was asked.
    let mut data: Vec<Range<u64>> = Vec::new();
    let mut pos = start;
    for e in extents {
        let len = e.len.min(end - pos);
        if len == 0 {
            break;
        }
        if !e.kind.reads_as_zero() {
            match data.last_mut() {
                Some(last) if last.end == pos => last.end += len,
                _ => data.push(pos..pos + len),
            }
        }
        pos += len;
        if pos >= end {
            break;
        }
    }
    let known_to = pos;
    let mut tasks: JoinSet<VolumeResult<()>> = JoinSet::new();
    let mut region = first;
    let mut d = 0;
    loop {
        let bytes = h.bitmap.region_bytes(region);
        if region >= h.bitmap.regions() || (bytes.end > known_to && region != first) {
            break;
        }
        if !h.bitmap.get(region) {
            while d < data.len() && data[d].end <= bytes.start {
                d += 1;
            }
            // A region the map does not fully cover is copied whole: the
            // copy asks the map again for just that region.
            let has_data = bytes.end > known_to || data.get(d).is_some_and(|r| r.start < bytes.end);
            if has_data {
                let limit = if h.foreground_busy() {
                    1
                } else {
                    h.config.parallel.max(1)
                };
                while tasks.len() >= limit {
                    if let Some(r) = tasks.join_next().await {
                        r.map_err(|e| std::io::Error::other(e.to_string()))??;
                    }
                }
                if h.foreground_busy() {
                    tokio::time::sleep(YIELD_PAUSE).await;
                }
                let h2 = Arc::clone(h);
                tasks.spawn(async move { h2.hydrate(region).await });
            } else {
                h.mark_zero(region).await?;
            }
        }
        region += 1;
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| std::io::Error::other(e.to_string()))??;
    }
    Ok(region)
}

/// Commit the bitmap every `interval` while hydration goes on, so a crash
/// loses at most that much copying.
pub(crate) async fn commit_periodically(h: Arc<Hydration>, interval: Duration) {
    let mut done = h.watch_complete();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = done.wait_for(|c| *c) => return,
        }
        if h.bitmap.needs_persist() {
            if let Err(e) = h.commit().await {
                warn!("clone: periodic commit of the hydration bitmap failed (retried): {e}");
            }
        }
    }
}
