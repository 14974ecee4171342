//! A small, fixed pool of threads for blocking file I/O.
//!
//! Why not tokio's `spawn_blocking`: it grows a thread per concurrent call
//! (up to 512), so 32 writes in flight become 32 threads fighting over the
//! same inode lock in the kernel. Measured with 4k random writes at QD 32
//! (docs/BENCHMARKS.md), a few dedicated threads spend far less CPU on lock
//! spinning and context switches, and keep the same throughput.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use crossbeam_channel::{unbounded, Sender};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of threads running blocking jobs in submission order.
pub(crate) struct IoPool {
    tx: Sender<Job>,
}

/// Threads in the shared pool, unless set otherwise before first use (by
/// [`set_io_threads`] or the `LONGWIRE_IO_THREADS` environment variable).
pub const DEFAULT_IO_THREADS: usize = 4;

static THREADS: OnceLock<usize> = OnceLock::new();
static POOL: OnceLock<IoPool> = OnceLock::new();

/// Choose the size of the shared I/O pool. Only the first call before the
/// pool starts has an effect; returns false if it was too late.
pub fn set_io_threads(n: usize) -> bool {
    THREADS.set(n.max(1)).is_ok() && POOL.get().is_none()
}

/// The process-wide pool all file volumes share.
pub(crate) fn shared() -> &'static IoPool {
    POOL.get_or_init(|| {
        let from_env = std::env::var("LONGWIRE_IO_THREADS").ok().and_then(|v| v.parse().ok());
        IoPool::new(*THREADS.get_or_init(|| from_env.unwrap_or(DEFAULT_IO_THREADS).max(1)))
    })
}

impl IoPool {
    fn new(threads: usize) -> IoPool {
        let (tx, rx) = unbounded::<Job>();
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("longwire-io-{i}"))
                .spawn(move || {
                    for job in rx.iter() {
                        // A panicking job must not take the thread with it;
                        // its caller sees the dropped result channel.
                        let _ = catch_unwind(AssertUnwindSafe(job));
                    }
                })
                .expect("cannot start I/O thread");
        }
        IoPool { tx }
    }

    /// Run `f` on a pool thread and wait for its result. `None` if the job
    /// panicked.
    pub(crate) async fn run<T, F>(&self, f: F) -> Option<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.tx.send(job).ok()?;
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_and_survives_panics() {
        let pool = IoPool::new(2);
        assert_eq!(pool.run(|| 40 + 2).await, Some(42));
        assert_eq!(pool.run(|| -> u32 { panic!("boom") }).await, None);
        // Both threads still work after a panic.
        let results = futures_join(&pool).await;
        assert_eq!(results, vec![Some(0), Some(1), Some(2), Some(3)]);
    }

    async fn futures_join(pool: &IoPool) -> Vec<Option<u32>> {
        let mut v = Vec::new();
        for i in 0..4 {
            v.push(pool.run(move || i).await);
        }
        v
    }
}
