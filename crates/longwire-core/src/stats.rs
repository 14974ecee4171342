//! Live counters behind `/metrics` and `longwire status`: per export
//! (requests by kind, bytes, errors, in flight, latency histograms) and a
//! table of connections (ENBD's `/proc/nbdinfo` in spirit).
//!
//! It lives in the core crate so both front-ends record into it without
//! knowing who reads it. The hot path is relaxed atomic adds only (a few
//! per request, plus two clock reads); the mutexes here are taken when a
//! connection opens or closes and when someone takes a snapshot.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// Which wire protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Nbd,
    Iscsi,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Nbd => "nbd",
            Protocol::Iscsi => "iscsi",
        }
    }
}

/// What a request did, in the terms both protocols share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    Trim,
    Zero,
    BlockStatus,
    /// Anything else (NBD CACHE; SCSI INQUIRY, MODE SENSE, …).
    Other,
}

impl OpKind {
    pub const ALL: [OpKind; 7] =
        [OpKind::Read, OpKind::Write, OpKind::Flush, OpKind::Trim, OpKind::Zero, OpKind::BlockStatus, OpKind::Other];

    /// The `op` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Trim => "trim",
            OpKind::Zero => "zero",
            OpKind::BlockStatus => "block_status",
            OpKind::Other => "other",
        }
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// NBD option haggling or iSCSI login.
    Handshake,
    /// Serving requests (NBD transmission, iSCSI full feature phase).
    Transmission,
    /// The client said goodbye or the server is shutting down: answering
    /// what is in flight, taking nothing new.
    Closing,
}

impl ConnState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Handshake => "handshake",
            ConnState::Transmission => "transmission",
            ConnState::Closing => "closing",
        }
    }

    fn from_u8(v: u8) -> ConnState {
        match v {
            0 => ConnState::Handshake,
            1 => ConnState::Transmission,
            _ => ConnState::Closing,
        }
    }
}

/// Upper bounds of the latency buckets, in seconds (Prometheus `le`):
/// 50 µs (a page-cache read) to 10 s (a stalled store), roughly ×2–2.5 apart.
pub const LATENCY_BUCKETS: [f64; 17] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

const BUCKET_NANOS: [u64; 17] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A latency histogram with fixed buckets; the last slot counts what is
/// above every bound (`+Inf` only).
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A histogram read at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// Cumulative counts per bound of [`LATENCY_BUCKETS`] (Prometheus style).
    pub cumulative: Vec<u64>,
    /// Observations in all (the `+Inf` bucket).
    pub count: u64,
    /// Sum of all observations in seconds.
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BUCKET_NANOS.partition_point(|&b| b < nanos);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = Vec::with_capacity(LATENCY_BUCKETS.len());
        let mut total = 0;
        for b in &self.buckets[..LATENCY_BUCKETS.len()] {
            total += b.load(Relaxed);
            cumulative.push(total);
        }
        total += self.buckets[LATENCY_BUCKETS.len()].load(Relaxed);
        HistogramSnapshot { cumulative, count: total, sum_seconds: self.sum_nanos.load(Relaxed) as f64 / 1e9 }
    }
}

/// Counters of one request kind.
#[derive(Default)]
struct OpCounters {
    requests: AtomicU64,
    errors: AtomicU64,
    latency: Histogram,
}

/// Counters of one export, summed over every connection and protocol.
#[derive(Default)]
pub struct ExportStats {
    ops: [OpCounters; OpKind::ALL.len()],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    in_flight: AtomicU64,
}

/// One request kind of an export, read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct OpSnapshot {
    pub kind: OpKind,
    /// Requests answered (errors included).
    pub requests: u64,
    pub errors: u64,
    /// Time from the start of execution to the answer; requests refused
    /// before they ran are not in it.
    pub latency: HistogramSnapshot,
}

/// An export's counters read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSnapshot {
    pub ops: Vec<OpSnapshot>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub in_flight: u64,
}

impl ExportSnapshot {
    pub fn requests(&self) -> u64 {
        self.ops.iter().map(|o| o.requests).sum()
    }

    pub fn errors(&self) -> u64 {
        self.ops.iter().map(|o| o.errors).sum()
    }
}

impl ExportStats {
    /// A request answered without running (out of range, read-only, …).
    pub fn refused(&self, kind: OpKind) {
        let op = &self.ops[kind as usize];
        op.requests.fetch_add(1, Relaxed);
        op.errors.fetch_add(1, Relaxed);
    }

    fn end(&self, kind: OpKind, elapsed: Duration, bytes: u64, ok: bool) {
        let op = &self.ops[kind as usize];
        op.requests.fetch_add(1, Relaxed);
        if !ok {
            op.errors.fetch_add(1, Relaxed);
        }
        op.latency.observe(elapsed);
        add_bytes(kind, bytes, &self.bytes_read, &self.bytes_written);
        self.in_flight.fetch_sub(1, Relaxed);
    }

    pub fn snapshot(&self) -> ExportSnapshot {
        ExportSnapshot {
            ops: OpKind::ALL
                .iter()
                .map(|&kind| {
                    let op = &self.ops[kind as usize];
                    OpSnapshot {
                        kind,
                        requests: op.requests.load(Relaxed),
                        errors: op.errors.load(Relaxed),
                        latency: op.latency.snapshot(),
                    }
                })
                .collect(),
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
        }
    }
}

fn add_bytes(kind: OpKind, bytes: u64, read: &AtomicU64, written: &AtomicU64) {
    if bytes == 0 {
        return;
    }
    match kind {
        OpKind::Read => read.fetch_add(bytes, Relaxed),
        OpKind::Write => written.fetch_add(bytes, Relaxed),
        _ => 0,
    };
}

/// One connection's counters and where it stands.
pub struct ConnStats {
    pub id: u64,
    pub protocol: Protocol,
    pub peer: String,
    /// Wall-clock time the connection was accepted.
    pub since: SystemTime,
    /// Export name(s), once the handshake or login chose them.
    export: OnceLock<String>,
    state: AtomicU8,
    received: AtomicU64,
    dispatched: AtomicU64,
    errored: AtomicU64,
    in_flight: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    latency: Histogram,
}

/// A connection read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnSnapshot {
    pub id: u64,
    pub protocol: Protocol,
    pub peer: String,
    pub export: String,
    pub state: ConnState,
    pub since: SystemTime,
    /// Requests received (ENBD's "queued"/"requested").
    pub received: u64,
    /// Requests answered.
    pub dispatched: u64,
    /// Requests answered with an error.
    pub errored: u64,
    /// Requests executing now (a subset of received − dispatched, which
    /// also counts iSCSI writes still waiting for their data).
    pub in_flight: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub latency: HistogramSnapshot,
}

impl ConnSnapshot {
    /// Received and not answered yet.
    pub fn pending(&self) -> u64 {
        self.received.saturating_sub(self.dispatched)
    }
}

impl ConnStats {
    /// Name the export(s) this connection uses; only the first call counts.
    pub fn set_export(&self, name: impl Into<String>) {
        let _ = self.export.set(name.into());
    }

    pub fn export(&self) -> &str {
        self.export.get().map(String::as_str).unwrap_or("")
    }

    pub fn set_state(&self, state: ConnState) {
        self.state.store(state as u8, Relaxed);
    }

    pub fn state(&self) -> ConnState {
        ConnState::from_u8(self.state.load(Relaxed))
    }

    /// A request arrived (it may wait for data before it runs).
    pub fn received(&self) {
        self.received.fetch_add(1, Relaxed);
    }

    /// A request that arrived was answered at once with an error, without
    /// running; `export` is counted too when known.
    pub fn refused(&self, kind: OpKind, export: Option<&ExportStats>) {
        self.dispatched.fetch_add(1, Relaxed);
        self.errored.fetch_add(1, Relaxed);
        if let Some(e) = export {
            e.refused(kind);
        }
    }

    /// A received request starts running. Finish the returned guard with
    /// the outcome; dropping it unfinished (a panic, a dropped connection)
    /// counts an error, so in-flight gauges never leak.
    pub fn begin<'a>(&'a self, kind: OpKind, export: Option<&'a ExportStats>) -> Request<'a> {
        self.in_flight.fetch_add(1, Relaxed);
        if let Some(e) = export {
            e.in_flight.fetch_add(1, Relaxed);
        }
        Request { conn: self, export, kind, started: Instant::now(), done: false }
    }

    pub fn snapshot(&self) -> ConnSnapshot {
        ConnSnapshot {
            id: self.id,
            protocol: self.protocol,
            peer: self.peer.clone(),
            export: self.export().to_string(),
            state: self.state(),
            since: self.since,
            received: self.received.load(Relaxed),
            dispatched: self.dispatched.load(Relaxed),
            errored: self.errored.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            latency: self.latency.snapshot(),
        }
    }
}

/// One running request; see [`ConnStats::begin`].
pub struct Request<'a> {
    conn: &'a ConnStats,
    export: Option<&'a ExportStats>,
    kind: OpKind,
    started: Instant,
    done: bool,
}

impl Request<'_> {
    /// The request was answered: `bytes` moved (read or written), `ok`
    /// unless it failed.
    pub fn finish(mut self, bytes: u64, ok: bool) {
        self.record(bytes, ok);
    }

    fn record(&mut self, bytes: u64, ok: bool) {
        self.done = true;
        let elapsed = self.started.elapsed();
        let c = self.conn;
        c.dispatched.fetch_add(1, Relaxed);
        if !ok {
            c.errored.fetch_add(1, Relaxed);
        }
        c.latency.observe(elapsed);
        add_bytes(self.kind, bytes, &c.bytes_read, &c.bytes_written);
        c.in_flight.fetch_sub(1, Relaxed);
        if let Some(e) = self.export {
            e.end(self.kind, elapsed, bytes, ok);
        }
    }
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.record(0, false);
        }
    }
}

/// Every export's counters and the connection table of one server.
#[derive(Default)]
pub struct Stats {
    /// In the order exports were first named (the registry's order when
    /// the server registers them at startup).
    exports: Mutex<Vec<(String, Arc<ExportStats>)>>,
    connections: Mutex<BTreeMap<u64, Arc<ConnStats>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats").field("exports", &lock(&self.exports).len()).field("connections", &lock(&self.connections).len()).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Stats {
    pub fn new() -> Arc<Stats> {
        Arc::new(Stats::default())
    }

    /// The counters of export `name`, created on first use.
    pub fn export(&self, name: &str) -> Arc<ExportStats> {
        let mut exports = lock(&self.exports);
        if let Some((_, s)) = exports.iter().find(|(n, _)| n == name) {
            return s.clone();
        }
        let s = Arc::new(ExportStats::default());
        exports.push((name.to_string(), s.clone()));
        s
    }

    /// Every export's counters, in registration order.
    pub fn exports(&self) -> Vec<(String, Arc<ExportStats>)> {
        lock(&self.exports).clone()
    }

    /// Enter a new connection in the table (state: handshake). It leaves
    /// the table when the returned guard is dropped.
    pub fn open_connection(self: &Arc<Self>, protocol: Protocol, peer: &str) -> ConnectionEntry {
        let id = self.next_id.fetch_add(1, Relaxed) + 1;
        let conn = Arc::new(ConnStats {
            id,
            protocol,
            peer: peer.to_string(),
            since: SystemTime::now(),
            export: OnceLock::new(),
            state: AtomicU8::new(ConnState::Handshake as u8),
            received: AtomicU64::new(0),
            dispatched: AtomicU64::new(0),
            errored: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            latency: Histogram::default(),
        });
        lock(&self.connections).insert(id, conn.clone());
        ConnectionEntry { stats: self.clone(), conn }
    }

    /// Connections open now, oldest first.
    pub fn connections(&self) -> Vec<Arc<ConnStats>> {
        lock(&self.connections).values().cloned().collect()
    }
}

/// A connection's place in the table; removes it on drop.
pub struct ConnectionEntry {
    stats: Arc<Stats>,
    conn: Arc<ConnStats>,
}

impl ConnectionEntry {
    pub fn stats(&self) -> &Arc<ConnStats> {
        &self.conn
    }
}

impl std::ops::Deref for ConnectionEntry {
    type Target = ConnStats;
    fn deref(&self) -> &ConnStats {
        &self.conn
    }
}

impl Drop for ConnectionEntry {
    fn drop(&mut self) {
        lock(&self.stats.connections).remove(&self.conn.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(10)); // ≤ 50 µs
        h.observe(Duration::from_micros(50)); // ≤ 50 µs (le is inclusive)
        h.observe(Duration::from_millis(3)); // ≤ 5 ms
        h.observe(Duration::from_secs(60)); // +Inf only
        let s = h.snapshot();
        assert_eq!(s.cumulative[0], 2);
        assert_eq!(s.cumulative[5], 2); // ≤ 2.5 ms
        assert_eq!(s.cumulative[6], 3); // ≤ 5 ms
        assert_eq!(*s.cumulative.last().unwrap(), 3);
        assert_eq!(s.count, 4);
        assert!((s.sum_seconds - 60.00306).abs() < 1e-9);
    }

    #[test]
    fn requests_count_on_connection_and_export() {
        let stats = Stats::new();
        let export = stats.export("disk");
        let conn = stats.open_connection(Protocol::Nbd, "127.0.0.1:5000");
        conn.set_export("disk");
        conn.set_state(ConnState::Transmission);
        conn.received();
        let r = conn.begin(OpKind::Write, Some(&export));
        assert_eq!(export.snapshot().in_flight, 1);
        assert_eq!(conn.snapshot().pending(), 1);
        r.finish(4096, true);
        conn.received();
        conn.refused(OpKind::Read, Some(&export));
        conn.received();
        drop(conn.begin(OpKind::Flush, Some(&export))); // dropped unfinished: an error

        let e = export.snapshot();
        assert_eq!((e.requests(), e.errors(), e.bytes_written, e.bytes_read, e.in_flight), (3, 2, 4096, 0, 0));
        assert_eq!(e.ops[OpKind::Read as usize].latency.count, 0, "refused requests have no latency");
        let c = conn.snapshot();
        assert_eq!((c.received, c.dispatched, c.errored, c.in_flight, c.pending()), (3, 3, 2, 0, 0));
        assert_eq!(c.export, "disk");
        assert_eq!(stats.connections().len(), 1);
        drop(conn);
        assert!(stats.connections().is_empty());
        assert!(Arc::ptr_eq(&stats.export("disk"), &export));
    }
}
