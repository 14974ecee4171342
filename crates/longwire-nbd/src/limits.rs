//! Connection limits: per-export counts consulted by the sans-IO handshake.
//!
//! [`ExportLimits`] holds each export's cap and how many connections use it
//! now. The handshake takes an [`ExportPermit`] on NBD_OPT_GO / EXPORT_NAME;
//! the permit travels with the session in [`crate::handshake::Negotiated`]
//! and frees its slot when dropped, i.e. when the connection ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Per-export connection caps and live counts. Exports without a cap are
/// not counted.
#[derive(Debug, Default)]
pub struct ExportLimits {
    caps: HashMap<String, usize>,
    counts: Mutex<HashMap<String, usize>>,
}

impl ExportLimits {
    /// `caps`: export name → most connections it may have at once.
    pub fn new(caps: HashMap<String, usize>) -> Arc<Self> {
        Arc::new(ExportLimits { caps, counts: Mutex::default() })
    }

    /// The cap of `export`, if it has one.
    pub fn cap(&self, export: &str) -> Option<usize> {
        self.caps.get(export).copied()
    }

    /// Connections `export` has now.
    pub fn count(&self, export: &str) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).get(export).copied().unwrap_or(0)
    }

    /// Is `export` at its cap? Returns the cap when it is.
    pub fn full(&self, export: &str) -> Option<usize> {
        let cap = self.cap(export)?;
        (self.count(export) >= cap).then_some(cap)
    }

    /// Take a slot of `export`; `Err(cap)` when it is full.
    pub fn acquire(self: &Arc<Self>, export: &str) -> Result<ExportPermit, usize> {
        let Some(cap) = self.cap(export) else {
            return Ok(ExportPermit { limits: None, export: String::new() });
        };
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(export.to_string()).or_insert(0);
        if *n >= cap {
            return Err(cap);
        }
        *n += 1;
        Ok(ExportPermit { limits: Some(self.clone()), export: export.to_string() })
    }
}

/// One connection's slot of an export; dropping it frees the slot.
#[derive(Debug)]
pub struct ExportPermit {
    limits: Option<Arc<ExportLimits>>,
    export: String,
}

impl ExportPermit {
    /// A permit counting against nothing (no limits configured).
    pub fn unlimited() -> Self {
        ExportPermit { limits: None, export: String::new() }
    }
}

impl Drop for ExportPermit {
    fn drop(&mut self) {
        if let Some(l) = &self.limits {
            let mut counts = l.counts.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = counts.get_mut(&self.export) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_count_and_release() {
        let l = ExportLimits::new([("a".to_string(), 2)].into());
        let p1 = l.acquire("a").unwrap();
        let _p2 = l.acquire("a").unwrap();
        assert_eq!(l.acquire("a").unwrap_err(), 2);
        assert_eq!(l.full("a"), Some(2));
        drop(p1);
        assert_eq!(l.count("a"), 1);
        assert!(l.acquire("a").is_ok());
        // Uncapped exports are never full.
        for _ in 0..10 {
            std::mem::forget(l.acquire("b").unwrap());
        }
        assert_eq!(l.full("b"), None);
    }
}
