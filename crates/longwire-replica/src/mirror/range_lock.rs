//! Exclusive locks on byte ranges, held across `await`s.
//!
//! The mirror writes each region to two places. Two overlapping writes in
//! flight at once could land in one order locally and in the other on the
//! replica, and a resync copying a region could overwrite a newer write to
//! it; both would leave the copies different with no dirty bit to show it.
//! So every write, and every resync copy, holds its (region-aligned) range
//! for its whole life. Disjoint ranges never wait for each other.

use std::ops::Range;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

#[derive(Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, Range<u64>)>>,
    next_id: Mutex<u64>,
    released: Notify,
}

/// Holds a range until dropped.
pub struct RangeGuard {
    locks: Arc<RangeLocks>,
    id: u64,
}

impl RangeLocks {
    /// Wait until nothing overlapping `range` is held, then hold it.
    pub async fn lock(self: &Arc<Self>, range: Range<u64>) -> RangeGuard {
        let id = {
            let mut n = self.next_id.lock();
            *n += 1;
            *n
        };
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Register before checking, so a release in between still wakes us.
            released.as_mut().enable();
            {
                let mut held = self.held.lock();
                if !held.iter().any(|(_, r)| overlaps(r, &range)) {
                    held.push((id, range));
                    return RangeGuard {
                        locks: Arc::clone(self),
                        id,
                    };
                }
            }
            released.await;
        }
    }

    /// True when some held range overlaps `range`.
    pub fn is_held(&self, range: &Range<u64>) -> bool {
        self.held.lock().iter().any(|(_, r)| overlaps(r, range))
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        self.locks.held.lock().retain(|(id, _)| *id != self.id);
        self.locks.released.notify_waiters();
    }
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_wait_disjoint_do_not() {
        let locks = Arc::new(RangeLocks::default());
        let a = locks.lock(0..100).await;
        let _b = locks.lock(100..200).await;
        assert!(locks.is_held(&(50..60)));
        let l2 = Arc::clone(&locks);
        let waiter = tokio::spawn(async move { l2.lock(90..110).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "still waits for 100..200");
        drop(_b);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
