//! A server-wide connection limit shared by the front-ends.
//!
//! Each accepted connection takes a [`ConnectionSlot`] and gives it back by
//! dropping it. Refusals are reported to the caller for logging, but at most
//! once per [`REFUSAL_REPORT_INTERVAL`], so a flood of connections cannot
//! flood the log too.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// At most one refusal report per this interval.
pub const REFUSAL_REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// Counts connections against a maximum (0: unlimited).
#[derive(Debug)]
pub struct ConnectionGate {
    max: usize,
    active: Arc<AtomicUsize>,
    /// When a refusal was last reported, and how many went unreported since.
    reported: Mutex<(Option<Instant>, u64)>,
}

/// A connection's place in the count; freed on drop.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why [`ConnectionGate::admit`] said no.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Log this one: `unreported` refusals happened since the last report.
    Report { unreported: u64 },
    /// A report went out recently; stay quiet.
    Quiet,
}

impl Refused {
    /// " (N more refused since the last warning)", or nothing.
    pub fn suffix(unreported: u64) -> String {
        match unreported {
            0 => String::new(),
            k => format!(" ({k} more refused since the last warning)"),
        }
    }
}

impl ConnectionGate {
    pub fn new(max: usize) -> Self {
        ConnectionGate { max, active: Arc::default(), reported: Mutex::new((None, 0)) }
    }

    /// The maximum (0: unlimited).
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections holding a slot now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Take a slot, unless the gate is at its maximum.
    pub fn admit(&self) -> Result<ConnectionSlot, Refused> {
        let n = self.active.fetch_add(1, Ordering::AcqRel);
        let slot = ConnectionSlot(self.active.clone());
        if self.max == 0 || n < self.max {
            return Ok(slot);
        }
        drop(slot);
        let mut log = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if log.0.is_none_or(|t| now.duration_since(t) >= REFUSAL_REPORT_INTERVAL) {
            let unreported = log.1;
            *log = (Some(now), 0);
            Err(Refused::Report { unreported })
        } else {
            log.1 += 1;
            Err(Refused::Quiet)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_refuses_and_reports_once_per_interval() {
        let gate = ConnectionGate::new(2);
        let a = gate.admit().unwrap();
        let _b = gate.admit().unwrap();
        assert_eq!(gate.active(), 2);
        assert_eq!(gate.admit().unwrap_err(), Refused::Report { unreported: 0 });
        assert_eq!(gate.admit().unwrap_err(), Refused::Quiet);
        assert_eq!(gate.active(), 2, "refusals give their slot back");
        drop(a);
        assert!(gate.admit().is_ok());
        assert!(ConnectionGate::new(0).admit().is_ok(), "0 is unlimited");
    }
}
