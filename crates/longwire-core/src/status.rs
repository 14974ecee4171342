//! What a store or layer says about its own state, for `longwire status`,
//! the `/metrics` endpoint and logs.
//!
//! Most volumes have nothing to say. Layers with a life of their own (a
//! mirror that can be degraded or resyncing, a clone that is hydrating, an
//! object store with a write-back cache) report one [`LayerStatus`] each;
//! a layer reports its own entry first and then its inner volume's.

/// One layer's state: a word for tables, a sentence for people, numbers for
/// Prometheus.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerStatus {
    /// Which kind of layer: `"mirror"`, `"clone"`, `"s3"`… Used as the
    /// metric name prefix (`longwire_<layer>_<gauge>`).
    pub layer: &'static str,
    /// A short state word, e.g. `"in-sync"`, `"degraded"`, `"resyncing"`.
    pub state: String,
    /// Free text for the status table, e.g. `"12.0 MiB left at 40 MiB/s"`.
    pub detail: String,
    /// Numeric values exported as gauges.
    pub gauges: Vec<Gauge>,
}

/// One numeric value of a [`LayerStatus`].
#[derive(Debug, Clone, PartialEq)]
pub struct Gauge {
    /// Metric-name suffix in snake case, e.g. `"dirty_bytes"`.
    pub name: &'static str,
    /// One line for the metric's `# HELP`.
    pub help: &'static str,
    pub value: f64,
}

impl Gauge {
    pub fn new(name: &'static str, help: &'static str, value: f64) -> Self {
        Gauge { name, help, value }
    }
}
