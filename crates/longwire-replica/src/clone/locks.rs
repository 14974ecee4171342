//! Per-region locks, so a region is copied from the source at most once at
//! a time and never on top of a foreground write.
//!
//! Whoever copies a region, or writes to one not yet copied, holds its lock
//! from checking the "hydrated" bit until the bit is set. A fixed set of
//! striped locks (region number modulo the stripe count) stands in for one
//! lock per region: two regions sharing a stripe merely wait for each
//! other. Several stripes are always taken in ascending order, so two
//! multi-region writes cannot deadlock.

use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard};

const STRIPES: usize = 1024;

pub(crate) struct RegionLocks {
    stripes: Vec<Arc<Mutex<()>>>,
}

/// Held locks; dropping releases them.
pub(crate) struct Held {
    _guards: Vec<OwnedMutexGuard<()>>,
}

impl RegionLocks {
    pub(crate) fn new() -> RegionLocks {
        RegionLocks {
            stripes: (0..STRIPES).map(|_| Arc::new(Mutex::new(()))).collect(),
        }
    }

    /// Lock one region.
    pub(crate) async fn lock(&self, region: u64) -> Held {
        self.lock_many(std::iter::once(region)).await
    }

    /// Lock every region in `regions` (any order, duplicates allowed).
    pub(crate) async fn lock_many(&self, regions: impl IntoIterator<Item = u64>) -> Held {
        let mut idx: Vec<usize> = regions
            .into_iter()
            .map(|r| (r % STRIPES as u64) as usize)
            .collect();
        idx.sort_unstable();
        idx.dedup();
        let mut guards = Vec::with_capacity(idx.len());
        for i in idx {
            guards.push(self.stripes[i].clone().lock_owned().await);
        }
        Held { _guards: guards }
    }
}
