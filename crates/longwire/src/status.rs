//! `longwire status`: ask a running server's admin endpoint for its state
//! (`GET /status`) and print it as two tables, exports and connections,
//! in the spirit of ENBD's `/proc/nbdinfo`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use crate::admin::snapshot::{ConnectionStatus, ExportStatus, ServerStatus};
use crate::cli::StatusArgs;
use crate::config::DEFAULT_ADMIN;
use crate::units::human_size;

/// Connect and read timeouts: the endpoint answers from memory.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The most we read back.
const MAX_RESPONSE: u64 = 64 << 20;

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let addr_text = args.admin.as_deref().unwrap_or(DEFAULT_ADMIN);
    let body = fetch(addr_text, "/status")?;
    if args.json {
        print!("{body}");
        return Ok(());
    }
    let status: ServerStatus =
        serde_json::from_str(&body).with_context(|| format!("the admin endpoint at {addr_text} sent a status this version cannot read"))?;
    print!("{}", render(&status));
    Ok(())
}

/// GET `path` from the admin endpoint at `addr`; the body of a 200 answer.
fn fetch(addr: &str, path: &str) -> anyhow::Result<String> {
    let hint = || format!("is `longwire serve --admin {addr}` running? (--admin ADDR here picks another address)");
    let addrs: Vec<SocketAddr> =
        addr.to_socket_addrs().with_context(|| format!("--admin {addr:?} is not an address like 127.0.0.1:9810 or [::1]:9810"))?.collect();
    let mut last_err = None;
    let mut stream = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    let Some(mut stream) = stream else {
        let e = last_err.map(|e| e.to_string()).unwrap_or_else(|| "no address".into());
        bail!("no longwire admin endpoint answers at {addr} ({e}); {}", hint());
    };
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").with_context(hint)?;
    let mut raw = Vec::new();
    stream.take(MAX_RESPONSE).read_to_end(&mut raw).with_context(|| format!("reading the answer from {addr}; {}", hint()))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("{addr} did not answer with HTTP; {}", hint()))?;
    let status_line = head.lines().next().unwrap_or("");
    if !status_line.starts_with("HTTP/1.") {
        bail!("{addr} did not answer with HTTP; {}", hint());
    }
    if status_line.split(' ').nth(1) != Some("200") {
        bail!("the admin endpoint at {addr} answered {status_line:?}: {}", body.trim());
    }
    Ok(body.to_string())
}

/// The two tables as text.
pub fn render(s: &ServerStatus) -> String {
    let mut out = String::new();
    let mut rows =
        vec![["EXPORT", "SIZE", "PROTOCOLS", "CONNS", "REQUESTS", "READ", "WRITTEN", "ERRORS", "STATE"].map(String::from).to_vec()];
    for e in &s.exports {
        rows.push(export_row(e));
    }
    out.push_str(&table(&rows));
    for e in &s.exports {
        for l in &e.layers {
            let detail = if l.detail.is_empty() { String::new() } else { format!(" ({})", l.detail) };
            out.push_str(&format!("  {}: {} {}{detail}\n", e.name, l.layer, l.state));
        }
    }
    out.push('\n');
    if s.connections.is_empty() {
        out.push_str("no connections\n");
        return out;
    }
    let mut rows =
        vec![["ID", "PROTO", "EXPORT", "PEER", "STATE", "QUEUED", "DISPATCHED", "ERRORED", "PENDING", "SINCE"].map(String::from).to_vec()];
    for c in &s.connections {
        rows.push(connection_row(c));
    }
    out.push_str(&table(&rows));
    out
}

fn export_row(e: &ExportStatus) -> Vec<String> {
    let state = match e.layers.as_slice() {
        [] => "-".to_string(),
        layers => layers.iter().map(|l| format!("{}:{}", l.layer, l.state)).collect::<Vec<_>>().join(","),
    };
    let protocols = if e.protocols.is_empty() { "-".to_string() } else { e.protocols.join(",") };
    let ro = if e.read_only { " ro" } else { "" };
    vec![
        e.name.clone(),
        format!("{}{ro}", human_size(e.size)),
        protocols,
        e.connections.to_string(),
        e.requests.to_string(),
        human_size(e.bytes_read),
        human_size(e.bytes_written),
        e.errors.to_string(),
        state,
    ]
}

fn connection_row(c: &ConnectionStatus) -> Vec<String> {
    vec![
        c.id.to_string(),
        c.protocol.clone(),
        if c.export.is_empty() { "-".into() } else { c.export.clone() },
        c.peer.clone(),
        c.state.clone(),
        c.queued.to_string(),
        c.dispatched.to_string(),
        c.errored.to_string(),
        c.pending.to_string(),
        format!("{} ago", human_duration(c.age_seconds)),
    ]
}

/// `45s`, `12m03s`, `3h05m`, `2d04h`.
fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Left-aligned columns, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|i| rows.iter().filter_map(|r| r.get(i)).map(|c| c.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::snapshot::LayerState;

    #[test]
    fn renders_both_tables() {
        let s = ServerStatus {
            version: "0".into(),
            uptime_seconds: 1.0,
            exports: vec![ExportStatus {
                name: "disk".into(),
                size: 1 << 30,
                read_only: false,
                protocols: vec!["nbd".into(), "iscsi".into()],
                connections: 1,
                requests: 10,
                errors: 1,
                bytes_read: 0,
                bytes_written: 1 << 20,
                in_flight: 0,
                ops: vec![],
                layers: vec![LayerState {
                    layer: "mirror".into(),
                    state: "degraded".into(),
                    detail: "1 replica down".into(),
                    gauges: vec![],
                }],
            }],
            connections: vec![ConnectionStatus {
                id: 7,
                protocol: "nbd".into(),
                export: "disk".into(),
                peer: "127.0.0.1:4000".into(),
                state: "transmission".into(),
                since_unix: 0.0,
                age_seconds: 75.0,
                queued: 10,
                dispatched: 9,
                errored: 1,
                pending: 1,
                in_flight: 1,
                bytes_read: 0,
                bytes_written: 1 << 20,
            }],
        };
        let text = render(&s);
        assert!(text.contains("disk    1.0 GiB  nbd,iscsi  1      10        0 B   1.0 MiB  1       mirror:degraded"), "{text}");
        assert!(text.contains("  disk: mirror degraded (1 replica down)"), "{text}");
        assert!(
            text.contains("7   nbd    disk    127.0.0.1:4000  transmission  10      9           1        1        1m15s ago"),
            "{text}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(5.2), "5s");
        assert_eq!(human_duration(3725.0), "1h02m");
        assert_eq!(human_duration(90000.0), "1d01h");
    }
}
