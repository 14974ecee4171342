//! `GET /metrics`: the Prometheus text exposition format (0.0.4).
//!
//! Per export: requests and errors by kind, bytes, requests in flight, a
//! latency histogram per kind, size, connections; per connection: the same
//! totals and one latency histogram, labelled `conn`, `protocol`,
//! `export`, `peer`; per layer: `longwire_<layer>_<gauge>` gauges and a
//! `longwire_layer_state` line. Every family has its HELP and TYPE once.

use std::collections::BTreeMap;
use std::fmt::Write;

use longwire_core::stats::{ConnSnapshot, HistogramSnapshot, OpSnapshot, LATENCY_BUCKETS};
use longwire_core::LayerStatus;

use super::snapshot::AdminState;

/// The exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One metric family being written: its header, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {}", help.replace('\\', "\\\\").replace('\n', "\\n"));
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        write_labels(self.out, labels);
        let _ = writeln!(self.out, " {}", number(value));
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&h.cumulative) {
            let le = number(*bound);
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &l, *count as f64);
        }
        let mut l = labels.to_vec();
        l.push(("le", "+Inf"));
        self.sample(&format!("{name}_bucket"), &l, h.count as f64);
        self.sample(&format!("{name}_sum"), labels, h.sum_seconds);
        self.sample(&format!("{name}_count"), labels, h.count as f64);
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)]) {
    if labels.is_empty() {
        return;
    }
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"{}\"", escape_label(v));
    }
    out.push('}');
}

/// Label values escape backslash, double quote and newline.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// A metric-name piece from free text: `[a-z0-9_]`, anything else `_`.
fn name_part(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect()
}

/// The whole exposition.
pub fn render(state: &AdminState) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let exports: Vec<_> = state.registry.iter().map(|e| (e, state.stats.export(&e.name).snapshot())).collect();
    let conns: Vec<_> = state.stats.connections().iter().map(|c| c.snapshot()).collect();

    let mut f = Family::new(&mut out, "longwire_up", "gauge", "1 while the server runs; the version is a label.");
    f.sample("longwire_up", &[("version", env!("CARGO_PKG_VERSION"))], 1.0);
    let mut f = Family::new(&mut out, "longwire_uptime_seconds", "gauge", "Seconds since the server started.");
    f.sample("longwire_uptime_seconds", &[], state.started.elapsed().as_secs_f64());

    let mut f = Family::new(&mut out, "longwire_export_size_bytes", "gauge", "Size of the export's volume.");
    for (e, _) in &exports {
        f.sample("longwire_export_size_bytes", &[("export", &e.name)], e.volume.size() as f64);
    }
    let per_op = |out: &mut String, name: &str, help: &str, value: &dyn Fn(&OpSnapshot) -> u64| {
        let mut f = Family::new(out, name, "counter", help);
        for (e, s) in &exports {
            for op in &s.ops {
                f.sample(name, &[("export", &e.name), ("op", op.kind.as_str())], value(op) as f64);
            }
        }
    };
    per_op(&mut out, "longwire_requests_total", "Requests answered, by export and kind (errors included).", &|o| o.requests);
    per_op(&mut out, "longwire_request_errors_total", "Requests answered with an error, by export and kind.", &|o| o.errors);
    let mut f = Family::new(&mut out, "longwire_read_bytes_total", "counter", "Bytes read by clients.");
    for (e, s) in &exports {
        f.sample("longwire_read_bytes_total", &[("export", &e.name)], s.bytes_read as f64);
    }
    let mut f = Family::new(&mut out, "longwire_written_bytes_total", "counter", "Bytes written by clients.");
    for (e, s) in &exports {
        f.sample("longwire_written_bytes_total", &[("export", &e.name)], s.bytes_written as f64);
    }
    let mut f = Family::new(&mut out, "longwire_requests_in_flight", "gauge", "Requests executing now.");
    for (e, s) in &exports {
        f.sample("longwire_requests_in_flight", &[("export", &e.name)], s.in_flight as f64);
    }
    let mut f = Family::new(
        &mut out,
        "longwire_request_duration_seconds",
        "histogram",
        "Time from the start of a request's execution to its answer, by export and kind.",
    );
    for (e, s) in &exports {
        for op in &s.ops {
            f.histogram("longwire_request_duration_seconds", &[("export", &e.name), ("op", op.kind.as_str())], &op.latency);
        }
    }
    let mut f = Family::new(&mut out, "longwire_export_connections", "gauge", "Connections using the export now, by protocol.");
    for (e, _) in &exports {
        for proto in state.protocols.get(&e.name).into_iter().flatten() {
            let n = conns.iter().filter(|c| c.protocol.as_str() == *proto && c.export.split(',').any(|x| x == e.name)).count();
            f.sample("longwire_export_connections", &[("export", &e.name), ("protocol", proto)], n as f64);
        }
    }

    // Layers: what each export's volume stack reports about itself.
    let layers: Vec<_> = exports.iter().map(|(e, _)| (e.name.as_str(), e.volume.status())).collect();
    render_layers(&mut out, &layers);

    // Connections.
    let mut f = Family::new(&mut out, "longwire_connections", "gauge", "Open connections, by protocol.");
    for proto in ["nbd", "iscsi"] {
        f.sample("longwire_connections", &[("protocol", proto)], conns.iter().filter(|c| c.protocol.as_str() == proto).count() as f64);
    }
    let conn_labels = |c: &ConnSnapshot| {
        [("conn", c.id.to_string()), ("protocol", c.protocol.as_str().to_string()), ("export", c.export.clone()), ("peer", c.peer.clone())]
    };
    type ConnValue = fn(&ConnSnapshot) -> u64;
    let families: [(&str, &str, &str, ConnValue); 6] = [
        ("longwire_connection_requests_total", "counter", "Requests answered on the connection.", |c| c.dispatched),
        ("longwire_connection_errors_total", "counter", "Requests answered with an error on the connection.", |c| c.errored),
        ("longwire_connection_read_bytes_total", "counter", "Bytes read on the connection.", |c| c.bytes_read),
        ("longwire_connection_written_bytes_total", "counter", "Bytes written on the connection.", |c| c.bytes_written),
        ("longwire_connection_requests_in_flight", "gauge", "Requests executing now on the connection.", |c| c.in_flight),
        ("longwire_connection_requests_pending", "gauge", "Requests received and not answered yet on the connection.", |c| c.pending()),
    ];
    for (name, kind, help, value) in families {
        let mut f = Family::new(&mut out, name, kind, help);
        for c in &conns {
            let l = conn_labels(c);
            let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
            f.sample(name, &l, value(c) as f64);
        }
    }
    let mut f = Family::new(
        &mut out,
        "longwire_connection_request_duration_seconds",
        "histogram",
        "Time from the start of a request's execution to its answer, per connection (all kinds).",
    );
    for c in &conns {
        let l = conn_labels(c);
        let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
        f.histogram("longwire_connection_request_duration_seconds", &l, &c.latency);
    }
    out
}

/// One `longwire_layer_state` line per layer, and each layer gauge as
/// `longwire_<layer>_<gauge>{export="…"}`, grouped into families by name.
fn render_layers(out: &mut String, layers: &[(&str, Vec<LayerStatus>)]) {
    let mut f = Family::new(out, "longwire_layer_state", "gauge", "1 for each layer's current state word.");
    for (export, statuses) in layers {
        for l in statuses {
            f.sample("longwire_layer_state", &[("export", export), ("layer", l.layer), ("state", &l.state)], 1.0);
        }
    }
    // Family name → (help, samples by export).
    type Families<'a> = BTreeMap<String, (&'a str, Vec<(&'a str, f64)>)>;
    let mut gauges: Families = BTreeMap::new();
    for (export, statuses) in layers {
        for l in statuses {
            for g in &l.gauges {
                let name = format!("longwire_{}_{}", name_part(l.layer), name_part(g.name));
                gauges.entry(name).or_insert((g.help, Vec::new())).1.push((export, g.value));
            }
        }
    }
    for (name, (help, samples)) in &gauges {
        let mut f = Family::new(out, name, "gauge", help);
        for (export, v) in samples {
            f.sample(name, &[("export", export)], *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use longwire_core::Gauge;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut s = String::new();
        write_labels(&mut s, &[("export", "x\"y"), ("le", "+Inf")]);
        assert_eq!(s, "{export=\"x\\\"y\",le=\"+Inf\"}");
    }

    #[test]
    fn layers_become_state_lines_and_gauges() {
        let mirror = |state: &str, dirty: f64| LayerStatus {
            layer: "mirror",
            state: state.into(),
            detail: String::new(),
            gauges: vec![Gauge::new("dirty_bytes", "Bytes not yet on every replica.", dirty)],
        };
        let mut out = String::new();
        render_layers(&mut out, &[("a", vec![mirror("in-sync", 0.0)]), ("b", vec![mirror("degraded", 4096.0)]), ("c", vec![])]);
        assert_eq!(
            out,
            "# HELP longwire_layer_state 1 for each layer's current state word.\n\
             # TYPE longwire_layer_state gauge\n\
             longwire_layer_state{export=\"a\",layer=\"mirror\",state=\"in-sync\"} 1\n\
             longwire_layer_state{export=\"b\",layer=\"mirror\",state=\"degraded\"} 1\n\
             # HELP longwire_mirror_dirty_bytes Bytes not yet on every replica.\n\
             # TYPE longwire_mirror_dirty_bytes gauge\n\
             longwire_mirror_dirty_bytes{export=\"a\"} 0\n\
             longwire_mirror_dirty_bytes{export=\"b\"} 4096\n"
        );
    }

    #[test]
    fn numbers_and_names() {
        assert_eq!(number(5e-5), "0.00005");
        assert_eq!(number(10.0), "10");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(name_part("dirty-bytes"), "dirty_bytes");
    }
}
