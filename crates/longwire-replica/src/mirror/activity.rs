//! Clearing the bits of regions both copies have.
//!
//! A write sets its regions' bits before it is sent; once it has reached
//! both copies the bits are only "activity", not "the replica missed it".
//! They are cleared here, in batches: note the last write sequence number,
//! flush both copies, then clear every region whose last write had that
//! number or less and that no write holds right now. A region's bit is
//! therefore only cleared when its data is durable on both sides, so
//! neither a crash of the primary nor one of the replica can leave a
//! difference behind a clear bit. Regions written all the time stay set,
//! which costs nothing but a few extra regions in a resync.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::{debug, warn};

use super::Shared;

pub(super) async fn clean_periodically(s: Arc<Shared>) {
    let mut tick = tokio::time::interval(s.opts.clean_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        clean_once(&s).await;
    }
}

pub(super) async fn clean_once(s: &Arc<Shared>) {
    let Some(link) = s.current_link() else { return };
    if s.activity.lock().regions.is_empty() {
        return;
    }
    let seq = s.seq.load(Ordering::SeqCst);
    let (l, r) = tokio::join!(s.local.flush(), link.volume.flush());
    if let Err(e) = l {
        warn!("mirror: flushing the local volume failed: {e}");
        return;
    }
    if let Err(e) = r {
        s.degrade(link.epoch, format!("flush: {e}"));
        return;
    }
    let cleared = {
        let mut log = s.activity.lock();
        if log.epoch != link.epoch {
            return;
        }
        let done: Vec<u64> = log
            .regions
            .iter()
            .filter(|(r, last)| **last <= seq && !s.locks.is_held(&s.bitmap.region_bytes(**r)))
            .map(|(r, _)| *r)
            .collect();
        for r in &done {
            log.regions.remove(r);
            s.bitmap.clear(*r..*r + 1);
        }
        done.len()
    };
    if cleared > 0 {
        debug!(
            "mirror: {cleared} regions are on both copies; {} still marked",
            s.bitmap.count()
        );
        // Not urgent: a bit left set only costs a region of resync.
        if let Err(e) = s.bitmap.persist_async().await {
            warn!("mirror: saving the dirty-region bitmap failed: {e}");
        }
    }
}
