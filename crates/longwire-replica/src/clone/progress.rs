//! How far hydration has come, for `longwire status`, `/metrics`, the
//! `migrate` progress bar and logs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use longwire_core::{Gauge, LayerStatus};
use parking_lot::Mutex;

/// Counters updated as regions are copied.
#[derive(Debug)]
pub(crate) struct Counters {
    started: Instant,
    /// Bytes read from the source over the wire.
    pub fetched: AtomicU64,
    /// Bytes of regions marked hydrated because the source said they read
    /// as zeros: nothing was transferred for them.
    pub skipped: AtomicU64,
    /// Source failures since start (each retried).
    pub source_errors: AtomicU64,
    /// The last source failure, while the source is failing.
    pub last_error: Mutex<Option<String>>,
    pub complete: AtomicBool,
}

impl Counters {
    pub(crate) fn new(complete: bool) -> Counters {
        Counters {
            started: Instant::now(),
            fetched: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            source_errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
            complete: AtomicBool::new(complete),
        }
    }

    pub(crate) fn source_failed(&self, error: String) {
        self.source_errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock() = Some(error);
    }

    pub(crate) fn source_answered(&self) {
        if self.last_error.lock().is_some() {
            *self.last_error.lock() = None;
        }
    }
}

/// A snapshot of a clone's progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Volume size.
    pub total_bytes: u64,
    /// Bytes in regions already local (copied, zero at the source, or
    /// overwritten locally).
    pub hydrated_bytes: u64,
    /// Bytes read from the source so far (this run).
    pub fetched_bytes: u64,
    /// Bytes the source reported as holes or zeros, not transferred (this run).
    pub skipped_bytes: u64,
    /// Source failures so far (this run); each was retried.
    pub source_errors: u64,
    /// The source's last error, while it keeps failing.
    pub source_error: Option<String>,
    /// Every region is local and the source has been released.
    pub complete: bool,
    /// Seconds since the layer started.
    pub elapsed_secs: f64,
}

impl Progress {
    pub(crate) fn new(counters: &Counters, total_bytes: u64, hydrated_bytes: u64) -> Progress {
        Progress {
            total_bytes,
            hydrated_bytes,
            fetched_bytes: counters.fetched.load(Ordering::Relaxed),
            skipped_bytes: counters.skipped.load(Ordering::Relaxed),
            source_errors: counters.source_errors.load(Ordering::Relaxed),
            source_error: counters.last_error.lock().clone(),
            complete: counters.complete.load(Ordering::Relaxed),
            elapsed_secs: counters.started.elapsed().as_secs_f64(),
        }
    }

    /// Bytes fetched per second since the layer started.
    pub fn fetch_rate(&self) -> f64 {
        self.fetched_bytes as f64 / self.elapsed_secs.max(1e-3)
    }

    /// The state word: `complete`, `hydrating` or `source-unreachable`.
    pub fn state(&self) -> &'static str {
        match (self.complete, &self.source_error) {
            (true, _) => "complete",
            (false, None) => "hydrating",
            (false, Some(_)) => "source-unreachable",
        }
    }

    /// One sentence for people.
    pub fn detail(&self) -> String {
        let pct = if self.total_bytes == 0 {
            100.0
        } else {
            self.hydrated_bytes as f64 * 100.0 / self.total_bytes as f64
        };
        let mut s = format!(
            "{} of {} local ({pct:.1}%), {} fetched from the source at {}/s, {} of holes skipped",
            human_size(self.hydrated_bytes),
            human_size(self.total_bytes),
            human_size(self.fetched_bytes),
            human_size(self.fetch_rate() as u64),
            human_size(self.skipped_bytes),
        );
        if self.complete {
            s.push_str("; the source is released");
            return s;
        } else if let Some(e) = &self.source_error {
            s.push_str(&format!(
                "; the source is failing, retrying with backoff: {e}"
            ));
        }
        s
    }

    pub(crate) fn status(&self) -> LayerStatus {
        LayerStatus {
            layer: "clone",
            state: self.state().to_string(),
            detail: self.detail(),
            gauges: vec![
                Gauge::new("total_bytes", "Size of the cloned volume in bytes.", self.total_bytes as f64),
                Gauge::new("hydrated_bytes", "Bytes of the clone already held locally.", self.hydrated_bytes as f64),
                Gauge::new(
                    "remaining_bytes",
                    "Bytes of the clone still to be copied from the source (before holes are skipped).",
                    (self.total_bytes - self.hydrated_bytes.min(self.total_bytes)) as f64,
                ),
                Gauge::new("fetched_bytes", "Bytes read from the source since start.", self.fetched_bytes as f64),
                Gauge::new("skipped_bytes", "Bytes the source reported as holes or zeros, not copied.", self.skipped_bytes as f64),
                Gauge::new("source_errors", "Failed requests to the source since start (each retried).", self.source_errors as f64),
                Gauge::new("complete", "1 once every region is local and the source is released.", f64::from(u8::from(self.complete))),
            ],
        }
    }
}

/// `1.5 GiB`-style sizes for the detail sentence.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
