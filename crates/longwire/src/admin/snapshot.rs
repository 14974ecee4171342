//! The server's state as `GET /status` sends it (JSON) and `longwire
//! status` reads it: exports with their totals and layer states, and the
//! connection table.

use std::collections::HashMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use longwire_core::stats::{ConnSnapshot, Stats};
use longwire_core::ExportRegistry;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServerStatus {
    pub version: String,
    pub uptime_seconds: f64,
    pub exports: Vec<ExportStatus>,
    pub connections: Vec<ConnectionStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExportStatus {
    pub name: String,
    pub size: u64,
    pub read_only: bool,
    /// Front-ends serving it: `nbd`, `iscsi`.
    pub protocols: Vec<String>,
    /// Connections using it now.
    pub connections: u64,
    pub requests: u64,
    pub errors: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub in_flight: u64,
    /// Requests and errors by kind (read, write, flush, …).
    pub ops: Vec<OpStatus>,
    /// What layers report about themselves (mirror, clone, …).
    pub layers: Vec<LayerState>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OpStatus {
    pub op: String,
    pub requests: u64,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerState {
    pub layer: String,
    pub state: String,
    pub detail: String,
    pub gauges: Vec<(String, f64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConnectionStatus {
    pub id: u64,
    pub protocol: String,
    /// Export name(s); empty during the handshake and for iSCSI discovery.
    pub export: String,
    pub peer: String,
    pub state: String,
    /// Seconds since the Unix epoch when the connection was accepted.
    pub since_unix: f64,
    pub age_seconds: f64,
    /// Requests received.
    pub queued: u64,
    /// Requests answered.
    pub dispatched: u64,
    /// Requests answered with an error.
    pub errored: u64,
    /// Received, not answered yet.
    pub pending: u64,
    /// Executing now.
    pub in_flight: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// What the admin endpoint reads from.
pub struct AdminState {
    pub registry: std::sync::Arc<ExportRegistry>,
    pub stats: std::sync::Arc<Stats>,
    /// Front-ends serving each export.
    pub protocols: HashMap<String, Vec<&'static str>>,
    pub started: Instant,
}

impl AdminState {
    pub fn status(&self) -> ServerStatus {
        let conns: Vec<ConnSnapshot> = self.stats.connections().iter().map(|c| c.snapshot()).collect();
        let now = SystemTime::now();
        let exports = self
            .registry
            .iter()
            .map(|e| {
                let s = self.stats.export(&e.name).snapshot();
                let connections = conns.iter().filter(|c| c.export.split(',').any(|n| n == e.name)).count() as u64;
                ExportStatus {
                    name: e.name.clone(),
                    size: e.volume.size(),
                    read_only: e.volume.capabilities().read_only,
                    protocols: self.protocols.get(&e.name).map(|p| p.iter().map(|s| s.to_string()).collect()).unwrap_or_default(),
                    connections,
                    requests: s.requests(),
                    errors: s.errors(),
                    bytes_read: s.bytes_read,
                    bytes_written: s.bytes_written,
                    in_flight: s.in_flight,
                    ops: s
                        .ops
                        .iter()
                        .map(|o| OpStatus { op: o.kind.as_str().to_string(), requests: o.requests, errors: o.errors })
                        .collect(),
                    layers: e
                        .volume
                        .status()
                        .into_iter()
                        .map(|l| LayerState {
                            layer: l.layer.to_string(),
                            state: l.state,
                            detail: l.detail,
                            gauges: l.gauges.iter().map(|g| (g.name.to_string(), g.value)).collect(),
                        })
                        .collect(),
                }
            })
            .collect();
        let connections = conns
            .iter()
            .map(|c| ConnectionStatus {
                id: c.id,
                protocol: c.protocol.as_str().to_string(),
                export: c.export.clone(),
                peer: c.peer.clone(),
                state: c.state.as_str().to_string(),
                since_unix: c.since.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
                age_seconds: now.duration_since(c.since).map(|d| d.as_secs_f64()).unwrap_or(0.0),
                queued: c.received,
                dispatched: c.dispatched,
                errored: c.errored,
                pending: c.pending(),
                in_flight: c.in_flight,
                bytes_read: c.bytes_read,
                bytes_written: c.bytes_written,
            })
            .collect();
        ServerStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            exports,
            connections,
        }
    }
}
