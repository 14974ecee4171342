//! The iSCSI server: accepts connections, runs the login phase, keeps the
//! session registry (TSIH assignment, session reinstatement) and carries
//! resets across the sessions of a target.
//!
//! One connection per session (MaxConnections=1), so "session" and
//! "connection" are the same task here: [`crate::session`] drives it once
//! the login completes.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::watch;
use longwire_core::stats::{ConnState, Protocol, Stats};
use longwire_core::gate::{ConnectionGate, ConnectionSlot, Refused};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::digest::Digests;
use crate::keys::{Policy, SessionType};
use crate::login::{Access, Login, LoginEnv, LoginResult, Step};
use crate::pdu::{self, login_status, Bhs, Layout, LoginResponse, Pdu};
use crate::session::{self, SessionControl};
use crate::target::IscsiTarget;

/// Tunables of the iSCSI front-end.
#[derive(Debug, Clone)]
pub struct IscsiConfig {
    /// A login must complete within this time.
    pub login_timeout: Duration,
    /// Commands one session may have in flight: the CmdSN window.
    pub queue_depth: u32,
    /// Immediate (I bit) commands one session may have in flight.
    pub max_immediate: usize,
    /// READ data (bytes) one session may hold between the volume and the
    /// socket; further READs wait for the initiator to take what is
    /// queued. A READ larger than this runs on its own.
    pub read_budget: u32,
    /// What we negotiate.
    pub policy: Policy,
    /// Idle time before the target pings with a NOP-In.
    pub nop_interval: Duration,
    /// A connection that sends nothing for this long after a ping is dropped.
    pub nop_timeout: Duration,
    /// After shutdown starts (and the initiator was asked to log out), how
    /// long the session keeps serving before closing.
    pub shutdown_grace: Duration,
    /// Most connections (logged in or logging in) at once, server-wide
    /// (0: unlimited). Beyond it new connections are closed at once.
    pub max_connections: usize,
    /// Close a session that has had no command in flight and received no
    /// PDU but NOP-Outs for this long (None: never). NOP-In pings go on
    /// regardless: they find dead initiators, this finds idle live ones.
    pub idle_timeout: Option<Duration>,
    /// Where commands and connections are counted (`/metrics`, `status`).
    pub stats: Arc<Stats>,
}

/// Default of [`IscsiConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default of [`IscsiConfig::read_budget`]: 64 MiB, the bound the NBD
/// front-end puts on one connection's in-flight data.
pub const DEFAULT_READ_BUDGET: u32 = 64 << 20;

impl Default for IscsiConfig {
    fn default() -> Self {
        IscsiConfig {
            login_timeout: Duration::from_secs(15),
            queue_depth: 64,
            max_immediate: 16,
            read_budget: DEFAULT_READ_BUDGET,
            policy: Policy::default(),
            nop_interval: Duration::from_secs(30),
            nop_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_millis(500),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: None,
            stats: Stats::new(),
        }
    }
}

/// Who a session belongs to, for reinstatement (RFC 7143 §6.3.5): the same
/// initiator name and ISID logging in to the same target with TSIH 0
/// replaces the old session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SessionKey {
    initiator: String,
    isid: u64,
    target: Option<String>,
}

struct SessionEntry {
    key: SessionKey,
    target: Option<Arc<IscsiTarget>>,
    control: Arc<SessionControl>,
    /// Becomes true once the session has ended and cleaned up.
    done: watch::Receiver<bool>,
    /// The initiator's address (SendTargets lists only what it may see).
    peer: IpAddr,
}

#[derive(Default)]
struct Registry {
    next_tsih: u16,
    sessions: HashMap<u16, SessionEntry>,
}

/// Serves iSCSI for a set of targets.
pub struct IscsiServer {
    targets: Vec<Arc<IscsiTarget>>,
    config: IscsiConfig,
    shutdown: CancellationToken,
    registry: Mutex<Registry>,
    /// Connections being served now, against `max_connections`.
    gate: ConnectionGate,
}

impl LoginEnv for IscsiServer {
    fn target_access(&self, name: &str) -> Option<Access> {
        self.target(name).map(|t| t.access.clone())
    }

    fn session_exists(&self, tsih: u16) -> bool {
        self.registry.lock().unwrap().sessions.contains_key(&tsih)
    }
}

impl IscsiServer {
    pub fn new(targets: Vec<Arc<IscsiTarget>>, config: IscsiConfig, shutdown: CancellationToken) -> Arc<IscsiServer> {
        Arc::new(IscsiServer {
            targets,
            gate: ConnectionGate::new(config.max_connections),
            config,
            shutdown,
            registry: Mutex::new(Registry { next_tsih: 1, ..Default::default() }),
        })
    }

    /// Connections being served now (logging in or logged in).
    pub fn active_connections(&self) -> usize {
        self.gate.active()
    }

    /// Count a new connection in, unless the server is at `max_connections`.
    fn admit(&self, peer: SocketAddr) -> Option<ConnectionSlot> {
        match self.gate.admit() {
            Ok(slot) => Some(slot),
            Err(Refused::Report { unreported }) => {
                let (max, more) = (self.gate.max(), Refused::suffix(unreported));
                warn!(%peer, "iSCSI connection limit reached ({max} connections); closing the new connection{more}");
                None
            }
            Err(Refused::Quiet) => None,
        }
    }

    pub fn targets(&self) -> &[Arc<IscsiTarget>] {
        &self.targets
    }

    pub fn config(&self) -> &IscsiConfig {
        &self.config
    }

    pub fn target(&self, name: &str) -> Option<&Arc<IscsiTarget>> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// Number of sessions in the full feature phase.
    pub fn session_count(&self) -> usize {
        self.registry.lock().unwrap().sessions.len()
    }

    /// Run one connection to completion: login, then the session. Never
    /// panics on bad input; errors are logged.
    pub async fn serve_connection<R, W>(self: Arc<Self>, rd: R, wr: W, peer_addr: SocketAddr, local: SocketAddr)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        // Over the server-wide limit: dropping the halves closes the socket.
        let Some(_slot) = self.admit(peer_addr) else { return };
        let peer = peer_addr.to_string();
        let conn = self.config.stats.open_connection(Protocol::Iscsi, &peer);
        let mut rd = BufReader::with_capacity(256 * 1024, rd);
        let mut wr = wr;
        let login = tokio::select! {
            r = tokio::time::timeout(self.config.login_timeout, self.login(&mut rd, &mut wr, peer_addr.ip(), &peer)) => match r {
                Ok(Ok(Some(done))) => done,
                Ok(Ok(None)) => return,
                Ok(Err(e)) => {
                    debug!(%peer, "login ended: {e}");
                    return;
                }
                Err(_) => {
                    info!(%peer, "login timed out after {:?}; closing", self.config.login_timeout);
                    return;
                }
            },
            _ = self.shutdown.cancelled() => return,
        };
        let (result, tsih, control, done_tx) = login;
        let target = result.target_name.as_deref().and_then(|n| self.target(n)).cloned();
        match &target {
            Some(t) => info!(%peer, initiator = %result.initiator_name, target = %t.name, tsih, chap = result.chap,
                header_digest = result.params.header_digest, data_digest = result.params.data_digest, "iSCSI session started"),
            None => debug!(%peer, initiator = %result.initiator_name, tsih, "iSCSI discovery session started"),
        }
        if let Some(t) = &target {
            let exports: Vec<String> = t.luns.iter().filter_map(|l| t.backend.lun_export(*l)).collect();
            conn.set_export(exports.join(","));
        }
        conn.set_state(ConnState::Transmission);
        let stats = conn.stats().clone();
        let outcome = session::run(self.clone(), rd, wr, *result, target.clone(), tsih, control, local, &peer, stats).await;
        match (&target, outcome) {
            (Some(t), Ok(())) => info!(%peer, target = %t.name, tsih, "iSCSI session ended"),
            (Some(t), Err(e)) => info!(%peer, target = %t.name, tsih, "iSCSI session ended: {e}"),
            (None, Ok(())) => debug!(%peer, tsih, "discovery session ended"),
            (None, Err(e)) => debug!(%peer, tsih, "discovery session ended: {e}"),
        }
        self.registry.lock().unwrap().sessions.remove(&tsih);
        let _ = done_tx.send(true);
    }

    /// The login phase. `Ok(None)`: refused or the initiator left.
    #[allow(clippy::type_complexity)]
    async fn login<R, W>(
        &self,
        rd: &mut BufReader<R>,
        wr: &mut W,
        peer_ip: IpAddr,
        peer: &str,
    ) -> io::Result<Option<(Box<LoginResult>, u16, Arc<SessionControl>, watch::Sender<bool>)>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let initial_stat_sn = u32::from_be_bytes(crate::chap::random_bytes(4).try_into().unwrap()) & 0x00ff_ffff;
        let mut login = Login::new(self.config.policy.clone(), initial_stat_sn, self.config.queue_depth);
        login.set_peer(peer_ip);
        loop {
            if rd.fill_buf().await?.is_empty() {
                return Ok(None);
            }
            let mut bhs = Bhs::default();
            rd.read_exact(&mut bhs.0).await?;
            let layout = Layout::of(&bhs, Digests::default());
            // Login texts are limited to 8192 bytes per PDU; allow some slack.
            if layout.data_len > 64 * 1024 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "oversized PDU during login"));
            }
            let mut rest = vec![0u8; layout.rest()];
            rd.read_exact(&mut rest).await?;
            let raw = pdu::decode_frame(bhs, &rest, Digests::default())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let req = match Pdu::parse(&raw) {
                Ok(Pdu::LoginRequest(r)) => r,
                other => {
                    // Anything but a Login Request during login.
                    let what = match other {
                        Ok(p) => pdu::op::name(p.opcode()),
                        Err(_) => "malformed PDU",
                    };
                    debug!(%peer, "{what} during login");
                    let resp = LoginResponse {
                        itt: bhs.itt(),
                        status_class: login_status::INVALID_DURING_LOGIN.0,
                        status_detail: login_status::INVALID_DURING_LOGIN.1,
                        ..Default::default()
                    };
                    write_login(wr, resp).await?;
                    return Ok(None);
                }
            };
            let (step, reason) = login.handle_with_reason(&req, self);
            match step {
                Step::Respond(resp) => write_login(wr, resp).await?,
                Step::Fail(resp) => {
                    let who = login.initiator_name().unwrap_or("?").to_string();
                    let target = login.target_name().unwrap_or("").to_string();
                    info!(
                        %peer, initiator = %who, target = %target,
                        "iSCSI login refused ({:02x}/{:02x}): {}",
                        resp.status_class, resp.status_detail, reason.unwrap_or_default()
                    );
                    write_login(wr, resp).await?;
                    return Ok(None);
                }
                Step::Complete(mut resp, result) => {
                    let (tsih, control, done_tx) = match self.register(&result, peer_ip).await {
                        Ok(r) => r,
                        Err(why) => {
                            info!(%peer, initiator = %result.initiator_name, "iSCSI login refused (03/02): {why}");
                            resp.transit = false;
                            resp.nsg = 0;
                            resp.data = Bytes::new();
                            (resp.status_class, resp.status_detail) = login_status::OUT_OF_RESOURCES;
                            write_login(wr, resp).await?;
                            return Ok(None);
                        }
                    };
                    resp.tsih = tsih;
                    write_login(wr, resp).await?;
                    return Ok(Some((result, tsih, control, done_tx)));
                }
            }
        }
    }

    /// Give a new session its TSIH, replacing (reinstating) an old session
    /// of the same initiator name, ISID and target.
    /// Refused (`Err`, why) when the target is at its session cap.
    async fn register(&self, result: &LoginResult, peer: IpAddr) -> Result<(u16, Arc<SessionControl>, watch::Sender<bool>), String> {
        let key = SessionKey { initiator: result.initiator_name.clone(), isid: result.isid, target: result.target_name.clone() };
        let old = {
            let reg = self.registry.lock().unwrap();
            reg.sessions.values().find(|e| e.key == key).map(|e| (e.control.clone(), e.done.clone()))
        };
        if let Some((control, mut done)) = old {
            info!(initiator = %key.initiator, isid = format!("{:#014x}", key.isid), "session reinstatement: closing the old session");
            control.kill();
            // The old nexus must be gone (its reservations released) before
            // the new one starts.
            if tokio::time::timeout(Duration::from_secs(10), done.wait_for(|d| *d)).await.is_err() {
                warn!("old session did not end within 10 s; going ahead");
            }
        }
        let target = result.target_name.as_deref().and_then(|n| self.target(n)).cloned();
        let mut reg = self.registry.lock().unwrap();
        reg.sessions.retain(|_, e| e.key != key);
        if reg.sessions.len() >= 0xfff0 {
            return Err("no session identifiers (TSIH) left".into());
        }
        if let Some(t) = &target {
            if let Some(cap) = t.access.max_sessions {
                let n = reg.sessions.values().filter(|e| e.target.as_ref().is_some_and(|o| o.name == t.name)).count();
                if n >= cap {
                    return Err(format!("target {} has reached its session limit ({cap})", t.name));
                }
            }
        }
        let mut tsih = reg.next_tsih;
        while tsih == 0 || reg.sessions.contains_key(&tsih) {
            tsih = tsih.wrapping_add(1);
        }
        reg.next_tsih = tsih.wrapping_add(1);
        let control = SessionControl::new();
        let (done_tx, done_rx) = watch::channel(false);
        reg.sessions.insert(tsih, SessionEntry { key, target, control: control.clone(), done: done_rx, peer });
        Ok((tsih, control, done_tx))
    }

    /// Sessions of `target` (all of them, the caller's included).
    fn sessions_of(&self, target: &str) -> Vec<Arc<SessionControl>> {
        let reg = self.registry.lock().unwrap();
        reg.sessions
            .values()
            .filter(|e| e.target.as_ref().is_some_and(|t| t.name == target))
            .map(|e| e.control.clone())
            .collect()
    }

    /// Abort every task on `lun` (or on every LUN) in every session of
    /// `target`, waiting until none is running any more.
    pub(crate) async fn abort_everywhere(&self, target: &str, lun: Option<u64>) {
        let mut waits = Vec::new();
        for s in self.sessions_of(target) {
            waits.extend(s.abort_tasks(lun, None));
        }
        session::wait_all(waits).await;
    }

    /// Close every session of `target` (TARGET COLD RESET).
    pub(crate) fn kill_sessions_of(&self, target: &str) {
        for s in self.sessions_of(target) {
            s.kill();
        }
    }

    /// Discovery: what SendTargets reports to `initiator` of session
    /// `tsih`, reached through the portal `local`: the targets its name
    /// and address may log in to. `only` restricts it to one target.
    pub(crate) fn send_targets(&self, tsih: u16, initiator: &str, local: SocketAddr, only: Option<&str>) -> Vec<(String, String)> {
        // A session always has its entry; if not, show only address-open targets.
        let peer = self.registry.lock().unwrap().sessions.get(&tsih).map(|e| e.peer);
        let mut out = Vec::new();
        for t in &self.targets {
            let address_ok = match peer {
                Some(ip) => t.access.allows_address(Some(ip)),
                None => t.access.allow_addresses.is_any(),
            };
            if only.is_some_and(|n| n != t.name) || !t.access.allows(initiator) || !address_ok {
                continue;
            }
            out.push(("TargetName".to_string(), t.name.clone()));
            out.push(("TargetAddress".to_string(), portal_address(local)));
        }
        out
    }

    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    pub(crate) fn session_type_name(t: SessionType) -> &'static str {
        match t {
            SessionType::Discovery => "discovery",
            SessionType::Normal => "normal",
        }
    }
}

/// `ip:port,TPGT` with IPv6 addresses in brackets (RFC 7143 §13.8).
pub fn portal_address(addr: SocketAddr) -> String {
    let host = match addr {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    };
    format!("{host}:{},{}", addr.port(), crate::login::TPGT)
}

async fn write_login<W: AsyncWrite + Unpin>(wr: &mut W, resp: LoginResponse) -> io::Result<()> {
    let frame = Pdu::LoginResponse(resp).encode(Digests::default());
    for p in &frame.pieces {
        wr.write_all(p).await?;
    }
    wr.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portal_addresses() {
        assert_eq!(portal_address("127.0.0.1:3260".parse().unwrap()), "127.0.0.1:3260,1");
        assert_eq!(portal_address("[::1]:3260".parse().unwrap()), "[::1]:3260,1");
        assert_eq!(portal_address("[fe80::1%2]:3261".parse().unwrap()), "[fe80::1]:3261,1");
    }
}
