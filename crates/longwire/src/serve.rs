//! `longwire serve`: open the volumes, bind the NBD and iSCSI listeners,
//! run until a signal, then shut down gracefully.
//!
//! Shutdown: stop accepting, let sessions finish in-flight requests (late
//! requests get ESHUTDOWN), flush every volume, close it (an S3 volume
//! gives its lease back), exit. Bounded in time so a
//! stalled client cannot hold the process hostage.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use longwire_core::layers::{Concat, ReadOnly, Stripe};
use longwire_core::{Export, ExportRegistry, Volume};
use longwire_iscsi::backend::{build_target, LunVolume};
use longwire_iscsi::{IscsiConfig, IscsiServer};
use longwire_nbd::{ExportLimits, NbdServer, NbdTls, ServerConfig, TlsMode, TlsPolicy};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin::AdminState;
use crate::cli::ServeArgs;
use crate::units::human_size;
use crate::config::{Config, ExportConfig, ExportSource};

/// How long sessions get to finish after a shutdown signal: short enough
/// that, with the final flush, a server with stalled clients still exits
/// within 5 s.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(3);

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = Config::from_args(&args)?;
    // Signal handlers first: once we say "listening", a supervisor may stop
    // us at any moment and must get a graceful shutdown, not a kill.
    let signals = Signals::install()?;
    // Check addresses before opening stores, so a typo does not create images.
    let addrs = cfg.listen.iter().map(|a| parse_addr(a, "--listen")).collect::<anyhow::Result<Vec<_>>>()?;
    let iscsi_addrs = cfg.iscsi.iter().map(|a| parse_addr(a, "--iscsi")).collect::<anyhow::Result<Vec<_>>>()?;
    let export_names: Vec<String> = cfg.exports.iter().map(|e| e.name.clone()).collect();
    let addresses = Arc::new(cfg.address_policy()?);
    let plans = crate::iscsi::plan_targets(&cfg.iscsi_targets, &export_names, &addresses)?;
    let admin_addr = cfg.admin.as_deref().map(|a| parse_addr(a, "--admin")).transpose()?;
    let iscsi_exports: Vec<String> = plans.iter().flat_map(|p| p.luns.iter().map(|(_, e)| e.clone())).collect();
    if let Some(n) = cfg.io_threads {
        longwire_store::set_io_threads(n);
    }
    // Certificates before stores too: a bad path should not leave images behind.
    let tls = load_tls(&cfg)?;
    let registry = Arc::new(build_registry(&cfg.exports).await?);

    // Counters for /metrics and `longwire status`, every export listed from the start.
    let stats = longwire_core::Stats::new();
    for e in registry.iter() {
        stats.export(&e.name);
    }
    let mut server_cfg = ServerConfig { stats: stats.clone(), ..ServerConfig::default() };
    if let Some(secs) = cfg.handshake_timeout {
        server_cfg.handshake_timeout = Duration::from_secs(secs);
    }
    if let Some(n) = cfg.max_in_flight {
        server_cfg.max_in_flight = n;
    }
    server_cfg.tls = tls;
    if let Some(n) = cfg.max_connections {
        server_cfg.max_connections = n;
    }
    if let Some(secs) = cfg.idle_timeout.filter(|s| *s > 0) {
        server_cfg.idle_timeout = Some(Duration::from_secs(secs));
    }
    let caps: HashMap<String, usize> = cfg.exports.iter().filter_map(|e| Some((e.name.clone(), e.max_connections?))).collect();
    for (export, n) in &caps {
        info!(%export, "export {export:?} is limited to {n} NBD connections at once");
    }
    if !caps.is_empty() {
        server_cfg.export_limits = Some(ExportLimits::new(caps));
    }
    if !addresses.is_open() {
        for e in registry.iter() {
            let list = addresses.for_export(&e.name);
            if !list.is_any() {
                info!(export = %e.name, "export {:?} is limited to clients from {list} (and unix-socket clients)", e.name);
            }
        }
        server_cfg.addresses = Some(addresses.clone());
    }
    let shutdown = CancellationToken::new();
    let sessions = TaskTracker::new();
    let nbd = NbdServer::new(registry.clone(), server_cfg, shutdown.clone());

    if let Some(addr) = admin_addr {
        let nbd_on = !addrs.is_empty() || cfg.unix.is_some();
        let iscsi_on = !iscsi_addrs.is_empty();
        let protocols = registry
            .iter()
            .map(|e| {
                let mut p = Vec::new();
                if nbd_on {
                    p.push("nbd");
                }
                if iscsi_on && iscsi_exports.contains(&e.name) {
                    p.push("iscsi");
                }
                (e.name.clone(), p)
            })
            .collect();
        let state = Arc::new(AdminState { registry: registry.clone(), stats: stats.clone(), protocols, started: Instant::now() });
        start_admin(addr, cfg.admin_is_default, state, shutdown.clone()).await?;
    }
    let first = registry.iter().next().map(|e| e.name.clone()).unwrap_or_default();
    // Hints for the startup lines: required TLS needs a TLS URI.
    let (scheme, tls_hint) = if cfg.tls_mode == TlsMode::Required { ("nbds", "?tls-certificates=DIR") } else { ("nbd", "") };
    for addr in addrs {
        let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        info!("NBD listening on {local} (try: nbdinfo '{scheme}://{local}/{first}{tls_hint}')");
        tokio::spawn(accept_tcp(listener, nbd.clone(), sessions.clone(), shutdown.clone()));
    }
    let unix_path = cfg.unix.clone();
    if let Some(path) = &unix_path {
        let listener = bind_unix(path)?;
        let tls_hint = tls_hint.replace('?', "&");
        info!("NBD listening on unix:{} (try: nbdinfo '{scheme}+unix:///{first}?socket={}{tls_hint}')", path.display(), path.display());
        tokio::spawn(accept_unix(listener, nbd.clone(), sessions.clone(), shutdown.clone()));
    }
    if !iscsi_addrs.is_empty() {
        let mut iscsi_cfg = IscsiConfig { stats: stats.clone(), ..IscsiConfig::default() };
        if let Some(secs) = cfg.handshake_timeout {
            iscsi_cfg.login_timeout = Duration::from_secs(secs);
        }
        if let Some(n) = cfg.max_connections {
            iscsi_cfg.max_connections = n;
        }
        if let Some(secs) = cfg.idle_timeout.filter(|s| *s > 0) {
            iscsi_cfg.idle_timeout = Some(Duration::from_secs(secs));
        }
        let targets = plans
            .into_iter()
            .map(|p| {
                let luns = p
                    .luns
                    .iter()
                    .map(|(lun, export)| LunVolume {
                        lun: *lun,
                        export: export.clone(),
                        volume: registry.get(export).expect("planned from the registry's exports").volume.clone(),
                    })
                    .collect();
                info!(target = %p.name, luns = ?p.luns, chap = p.access.chap.is_some(), "iSCSI target ready");
                if !p.access.allow_addresses.is_any() {
                    info!(target = %p.name, "iSCSI target {} is limited to clients from {}", p.name, p.access.allow_addresses);
                }
                if let Some(n) = p.access.max_sessions {
                    info!(target = %p.name, "iSCSI target {} is limited to {n} sessions at once", p.name);
                }
                Arc::new(build_target(p.name, luns, p.access))
            })
            .collect();
        let iscsi = IscsiServer::new(targets, iscsi_cfg, shutdown.clone());
        for addr in iscsi_addrs {
            let listener = match TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) if cfg.iscsi_is_default => {
                    warn!("not serving iSCSI: cannot listen on the default address {addr}: {e}");
                    continue;
                }
                Err(e) => return Err(e).with_context(|| format!("cannot listen for iSCSI on {addr}")),
            };
            let local = listener.local_addr()?;
            info!("iSCSI listening on {local} (try: iscsi-ls -s iscsi://{local})");
            tokio::spawn(accept_iscsi(listener, iscsi.clone(), sessions.clone(), shutdown.clone()));
        }
    }

    signals.wait().await;
    info!("shutting down: finishing in-flight requests");
    shutdown.cancel();
    sessions.close();
    if tokio::time::timeout(SHUTDOWN_DEADLINE, sessions.wait()).await.is_err() {
        warn!("some connections did not finish within {SHUTDOWN_DEADLINE:?}; closing them");
    }
    flush_all(&registry).await;
    close_all(&registry).await;
    if let Some(path) = unix_path {
        let _ = std::fs::remove_file(path);
    }
    info!("stopped");
    Ok(())
}

/// The NBD TLS settings, loaded and checked (None: TLS is off).
fn load_tls(cfg: &Config) -> anyhow::Result<Option<NbdTls>> {
    let mode = cfg.tls_mode;
    if mode == TlsMode::Off {
        if cfg.tls_cert.is_some() {
            info!("NBD TLS is off (a certificate is configured, but tls = \"off\")");
        }
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
        // Config::from_args already refused this.
        anyhow::bail!("TLS mode {mode} needs --tls-cert and --tls-key");
    };
    let allow = cfg
        .exports
        .iter()
        .filter(|e| !e.tls_allow.is_empty())
        .map(|e| (e.name.clone(), e.tls_allow.iter().map(|a| a.trim_start_matches("CN=").to_string()).collect()))
        .collect();
    let tls = NbdTls::load(TlsPolicy { mode, allow }, cert, key, cfg.tls_ca.as_deref())?;
    let clients = match &cfg.tls_ca {
        Some(ca) => format!("client certificates required, verified against {}", ca.display()),
        None => "no client certificates".to_string(),
    };
    info!(mode = %mode, "NBD TLS is on ({mode}; TLS 1.3; certificate {}; {clients})", cert.display());
    for e in cfg.exports.iter().filter(|e| !e.tls_allow.is_empty()) {
        info!(export = %e.name, "export {:?} is limited to TLS clients {}", e.name, e.tls_allow.join(", "));
    }
    Ok(Some(tls))
}

/// Open every export's store (or its parts) and register it.
async fn build_registry(exports: &[ExportConfig]) -> anyhow::Result<ExportRegistry> {
    let mut registry = ExportRegistry::new();
    for e in exports {
        let (mut volume, uri_description, what) = open_export(e).await?;
        if e.readonly && !volume.capabilities().read_only {
            volume = Arc::new(ReadOnly::new(volume));
        }
        let description = e.description.clone().or(uri_description).unwrap_or_default();
        info!(
            export = %e.name,
            size = volume.size(),
            read_only = volume.capabilities().read_only,
            "export {:?} ready: {what} ({})",
            e.name,
            human_size(volume.size())
        );
        registry
            .add(Export { name: e.name.clone(), description, volume })
            .map_err(|msg| anyhow!(msg))?;
    }
    Ok(registry)
}

/// Open one export's volume: its URI, or its parts assembled into a
/// concatenation or stripe set. Returns the volume, the description its URI
/// gave (plain URIs only) and what to call it in the startup log.
async fn open_export(e: &ExportConfig) -> anyhow::Result<(Arc<dyn Volume>, Option<String>, String)> {
    let open_parts = |parts: &[String]| {
        let parts = parts.to_vec();
        async move {
            let mut volumes: Vec<Arc<dyn Volume>> = Vec::with_capacity(parts.len());
            for (i, uri) in parts.iter().enumerate() {
                let opened = longwire_store::open_uri(uri)
                    .await
                    .map_err(|msg| anyhow!("export {:?}: part {i}: {msg}", e.name))?;
                volumes.push(opened.volume);
            }
            anyhow::Ok(volumes)
        }
    };
    let describe_parts = |parts: &[String], volumes: &[Arc<dyn Volume>]| -> String {
        parts
            .iter()
            .zip(volumes)
            .map(|(uri, v)| format!("{uri} ({})", human_size(v.size())))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match e.source()? {
        ExportSource::Uri(uri) => {
            let opened = crate::layers::open(uri, &e.name).await.map_err(|err| anyhow!("export {:?}: {err:#}", e.name))?;
            Ok((opened.volume, opened.description, uri.to_string()))
        }
        ExportSource::Concat(parts) => {
            let volumes = open_parts(parts).await?;
            let list = describe_parts(parts, &volumes);
            let concat = Concat::new(volumes).map_err(|err| anyhow!("export {:?}: cannot concatenate its parts: {err}", e.name))?;
            info!(export = %e.name, parts = parts.len(), layout = "concat", size = concat.size(), "export {:?}: concatenation of {} parts: {list}", e.name, parts.len());
            Ok((Arc::new(concat), None, format!("concat of {} parts", parts.len())))
        }
        ExportSource::Stripe { parts, stripe_size } => {
            let volumes = open_parts(parts).await?;
            let list = describe_parts(parts, &volumes);
            let stripe =
                Stripe::new(volumes, stripe_size).map_err(|err| anyhow!("export {:?}: cannot stripe over its parts: {err}", e.name))?;
            info!(
                export = %e.name,
                parts = parts.len(),
                layout = "stripe",
                stripe_size,
                size = stripe.size(),
                "export {:?}: stripe set of {} parts, {} stripes: {list}",
                e.name,
                parts.len(),
                human_size(stripe_size)
            );
            Ok((Arc::new(stripe), None, format!("stripe of {} parts × {}", parts.len(), human_size(stripe_size))))
        }
    }
}

fn parse_addr(addr: &str, flag: &str) -> anyhow::Result<SocketAddr> {
    addr.parse()
        .with_context(|| format!("{flag} {addr:?} is not an address like 127.0.0.1:10809 or [::1]:10809"))
}

fn bind_unix(path: &PathBuf) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    // A socket left behind by a previous run would make bind fail; remove
    // it, but never remove anything that is not a socket.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
        }
    }
    UnixListener::bind(path).with_context(|| format!("cannot listen on unix socket {}", path.display()))
}

async fn accept_tcp(listener: TcpListener, nbd: Arc<NbdServer>, sessions: TaskTracker, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                sessions.spawn(nbd.clone().serve_connection(stream, peer.to_string()));
            }
            Err(e) => accept_failed(e).await,
        }
    }
}

async fn accept_iscsi(listener: TcpListener, iscsi: Arc<IscsiServer>, sessions: TaskTracker, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let local = match stream.local_addr() {
                    Ok(a) => a,
                    Err(e) => {
                        warn!("iSCSI connection from {peer}: {e}");
                        continue;
                    }
                };
                let (rd, wr) = stream.into_split();
                sessions.spawn(iscsi.clone().serve_connection(rd, wr, peer, local));
            }
            Err(e) => accept_failed(e).await,
        }
    }
}

async fn accept_unix(listener: UnixListener, nbd: Arc<NbdServer>, sessions: TaskTracker, shutdown: CancellationToken) {
    let mut n = 0u64;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                n += 1;
                sessions.spawn(nbd.clone().serve_connection(stream, format!("unix#{n}")));
            }
            Err(e) => accept_failed(e).await,
        }
    }
}

/// Bind the admin endpoint and serve it in the background. A busy default
/// port is only a warning (another server may hold it).
async fn start_admin(addr: SocketAddr, is_default: bool, state: Arc<AdminState>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) if is_default => {
            warn!("no admin endpoint: cannot use the default address {addr}: {e} (pick one with --admin ADDR)");
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("cannot open the admin endpoint on {addr} (--admin)")),
    };
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() {
        warn!("the admin endpoint on {local} is reachable from the network and has no authentication");
    }
    // Worded without "listening on": that phrase announces NBD listeners.
    info!("admin HTTP endpoint at http://{local}/metrics and /status (try: longwire status --admin {local})");
    tokio::spawn(crate::admin::serve(listener, state, shutdown));
    Ok(())
}

/// Out of file descriptors and the like: log and back off instead of spinning.
async fn accept_failed(e: std::io::Error) {
    error!("accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// SIGTERM and SIGINT, caught from startup on.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => info!("received SIGTERM"),
            _ = self.int.recv() => info!("received SIGINT"),
        }
    }
}

/// Tell every volume it is no longer served (after the last request), so
/// it can give back what another server may be waiting for.
async fn close_all(registry: &ExportRegistry) {
    for e in registry.iter() {
        match tokio::time::timeout(Duration::from_secs(10), e.volume.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => error!(export = %e.name, "closing the volume failed: {err}"),
            Err(_) => error!(export = %e.name, "closing the volume timed out"),
        }
    }
}

/// Make every acknowledged write durable before exiting.
async fn flush_all(registry: &ExportRegistry) {
    for e in registry.iter() {
        if e.volume.capabilities().read_only {
            continue;
        }
        match tokio::time::timeout(Duration::from_secs(10), e.volume.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => error!(export = %e.name, "flush at shutdown failed: {err}"),
            Err(_) => error!(export = %e.name, "flush at shutdown timed out"),
        }
    }
}
