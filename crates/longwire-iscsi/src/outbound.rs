//! Bounds on what a session holds for the initiator before the socket
//! takes it.
//!
//! An initiator that stops reading its socket must not make the target
//! pile up PDUs for it. Two bounds, both released when the writer has put
//! the bytes on the socket (or dropped them with the connection):
//!
//! - [`ReadBudget`]: bytes of READ data. A command reserves its Data-In
//!   length *before* the volume is read, so a stalled initiator leaves
//!   further READs waiting (holding only their CDB and a CmdSN slot, which
//!   closes the window) instead of filling memory. A command larger than
//!   the whole budget reserves all of it, so it still runs alone.
//! - [`Backlog`]: bytes of every other queued PDU (NOP-In echoes, Rejects,
//!   R2Ts, responses). These are answers to what the initiator sends, so
//!   past [`Backlog::LIMIT`] the session stops reading its socket until
//!   the initiator reads ours: TCP then pushes back on the sender.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// READ data one session may hold between the volume and the socket.
#[derive(Debug)]
pub(crate) struct ReadBudget {
    permits: Arc<Semaphore>,
    size: u32,
}

impl ReadBudget {
    /// A budget of `bytes` (at least 1).
    pub(crate) fn new(bytes: u32) -> ReadBudget {
        let size = bytes.max(1);
        ReadBudget { permits: Arc::new(Semaphore::new(size as usize)), size }
    }

    /// Wait until `len` bytes (at most the whole budget) are free and take
    /// them. Waiters are served in order, so a large READ is not starved
    /// by small ones.
    pub(crate) async fn reserve(&self, len: u32) -> ReadPermit {
        let n = len.min(self.size);
        if n == 0 {
            return ReadPermit(None);
        }
        // The semaphore is never closed, so this only waits.
        ReadPermit(self.permits.clone().acquire_many_owned(n).await.ok())
    }

    /// Bytes not reserved now.
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.permits.available_permits()
    }
}

/// Bytes of a [`ReadBudget`] held by one command's data; returned on drop.
#[derive(Debug, Default)]
pub(crate) struct ReadPermit(Option<OwnedSemaphorePermit>);

impl ReadPermit {
    /// Give back what exceeds `len` (the command produced less data than
    /// its CDB allowed).
    pub(crate) fn shrink_to(&mut self, len: usize) {
        let Some(p) = &mut self.0 else { return };
        let excess = p.num_permits().saturating_sub(len);
        if excess > 0 {
            drop(p.split(excess));
        }
    }
}

/// Bytes of queued PDUs other than READ data, and a wake-up for the
/// session's reader when they drop below the limit.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    bytes: AtomicUsize,
    drained: Notify,
}

impl Backlog {
    /// Past this much queued, the session stops reading requests. Far
    /// above what a well-behaved initiator causes (a NOP-In echo is at
    /// most one data segment), small next to the read budget.
    pub(crate) const LIMIT: usize = 1 << 20;

    /// Count `bytes` as queued until the returned charge is dropped.
    pub(crate) fn charge(self: &Arc<Self>, bytes: usize) -> BacklogCharge {
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        BacklogCharge { backlog: self.clone(), bytes }
    }

    /// True while the session should not read more requests.
    pub(crate) fn is_full(&self) -> bool {
        self.bytes.load(Ordering::Acquire) >= Self::LIMIT
    }

    /// Resolves after queued bytes dropped below the limit (possibly
    /// spuriously: check [`Backlog::is_full`] again).
    pub(crate) async fn drained(&self) {
        self.drained.notified().await
    }

    /// Bytes queued now.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
}

/// Queued bytes of one message; uncounted when dropped.
#[derive(Debug)]
pub(crate) struct BacklogCharge {
    backlog: Arc<Backlog>,
    bytes: usize,
}

impl Drop for BacklogCharge {
    fn drop(&mut self) {
        let before = self.backlog.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        if before >= Backlog::LIMIT && before - self.bytes < Backlog::LIMIT {
            // `notify_one` keeps the wake-up if the reader is not waiting
            // yet, so it cannot be lost between its check and its wait.
            self.backlog.drained.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn reads_wait_for_budget_and_large_ones_take_all_of_it() {
        let b = ReadBudget::new(1000);
        let p1 = b.reserve(600).await;
        assert_eq!(b.available(), 400);
        // 600 more do not fit: the reservation waits until p1 is gone.
        let waiting = tokio::time::timeout(Duration::from_millis(50), b.reserve(600)).await;
        assert!(waiting.is_err());
        drop(p1);
        let p2 = b.reserve(600).await;
        drop(p2);
        // Larger than the budget: takes the whole budget, and runs.
        let big = b.reserve(5000).await;
        assert_eq!(b.available(), 0);
        drop(big);
        assert_eq!(b.available(), 1000);
        // Nothing to read takes nothing.
        let _none = b.reserve(0).await;
        assert_eq!(b.available(), 1000);
    }

    #[tokio::test]
    async fn shrinking_returns_the_unused_part() {
        let b = ReadBudget::new(1000);
        let mut p = b.reserve(800).await;
        p.shrink_to(100);
        assert_eq!(b.available(), 900);
        p.shrink_to(5000);
        assert_eq!(b.available(), 900);
        drop(p);
        assert_eq!(b.available(), 1000);
    }

    #[tokio::test]
    async fn backlog_wakes_the_reader_once_below_the_limit() {
        let b = Arc::new(Backlog::default());
        let small = b.charge(100);
        assert!(!b.is_full());
        let big = b.charge(Backlog::LIMIT);
        assert!(b.is_full());
        drop(small);
        assert!(b.is_full(), "still at the limit");
        let waiter = tokio::spawn({
            let b = b.clone();
            async move {
                while b.is_full() {
                    b.drained().await;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(big);
        tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert_eq!(b.queued(), 0);
    }
}
