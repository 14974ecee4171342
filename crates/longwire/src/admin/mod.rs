//! The admin endpoint: `GET /metrics` (Prometheus) and `GET /status`
//! (JSON, read by `longwire status`) on a TCP address of its own,
//! normally loopback.
//!
//! A small hand-written HTTP/1.x responder ([`http`]) rather than a web
//! framework: two read-only pages, one request per connection, heads
//! bounded to 8 KiB and 10 s, at most 64 connections at once. Bad requests
//! get a 4xx and a closed connection; the block-serving side never waits
//! on it (the pages are built from atomics and short-held table locks).

pub mod http;
pub mod metrics;
pub mod snapshot;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

pub use snapshot::AdminState;

/// How long a client gets to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;

/// Accept admin connections until shutdown.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                    active.fetch_sub(1, Ordering::AcqRel);
                    debug!(%peer, "admin: too many connections; closing");
                    continue;
                }
                let state = state.clone();
                let active = active.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &state).await {
                        debug!(%peer, "admin connection: {e}");
                    }
                    active.fetch_sub(1, Ordering::AcqRel);
                });
            }
            Err(e) => {
                error!("admin accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Read one request, answer it, close.
async fn handle(mut stream: TcpStream, state: &AdminState) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let parsed = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut chunk = [0u8; 2048];
        loop {
            match http::parse_request(&buf) {
                Ok(None) => {}
                done => return Ok(done),
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(Ok(None));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let reply = match parsed {
        Err(_) => http::response(408, "text/plain", b"request timed out\n", false),
        Ok(Err(e)) => return Err(e),
        // The client left before finishing its request.
        Ok(Ok(Ok(None))) => return Ok(()),
        Ok(Ok(Err(e))) => http::response(e.status, "text/plain; charset=utf-8", format!("{}\n", e.message).as_bytes(), false),
        Ok(Ok(Ok(Some(req)))) => route(&req, state),
    };
    stream.write_all(&reply).await?;
    stream.shutdown().await
}

fn route(req: &http::Request, state: &AdminState) -> Vec<u8> {
    let head_only = req.method == "HEAD";
    match req.path.as_str() {
        "/metrics" => http::response(200, metrics::CONTENT_TYPE, metrics::render(state).as_bytes(), head_only),
        "/status" => {
            let mut body = serde_json::to_vec_pretty(&state.status()).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
            body.push(b'\n');
            http::response(200, "application/json", &body, head_only)
        }
        "/" => http::response(
            200,
            "text/plain; charset=utf-8",
            b"longwire admin endpoint\n/metrics  Prometheus metrics\n/status   exports and connections (JSON; `longwire status` prints it)\n",
            head_only,
        ),
        _ => http::response(404, "text/plain; charset=utf-8", b"not found; try /metrics or /status\n", head_only),
    }
}
