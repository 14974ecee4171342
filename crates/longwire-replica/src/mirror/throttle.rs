//! A token bucket for the resync: it may use `rate` bytes per second and
//! no more, so a resync of a large volume leaves the disks and the network
//! to foreground I/O.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

pub struct Throttle {
    /// Bytes per second; 0 means unlimited.
    rate: u64,
    /// When the bytes granted so far will have been "paid for".
    next_free: Mutex<Instant>,
}

impl Throttle {
    pub fn new(rate: u64) -> Throttle {
        Throttle {
            rate,
            next_free: Mutex::new(Instant::now()),
        }
    }

    /// Wait until `bytes` more may be sent. A burst of up to a quarter of a
    /// second's worth goes through at once.
    pub async fn take(&self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        let wait = {
            let mut next = self.next_free.lock();
            let now = Instant::now();
            let burst = Duration::from_millis(250);
            let start = (*next).max(now.checked_sub(burst).unwrap_or(now));
            *next = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
            next.saturating_duration_since(now + burst)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_the_rate() {
        let t = Throttle::new(4 << 20);
        let start = Instant::now();
        for _ in 0..16 {
            t.take(256 << 10).await; // 4 MiB in all
        }
        let took = start.elapsed();
        // 4 MiB at 4 MiB/s minus the 0.25 s burst.
        assert!(took >= Duration::from_millis(700), "{took:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
    }
}
