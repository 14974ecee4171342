//! The NBD session driver: owns one connection's sockets, runs the
//! handshake through the sans-IO [`Handshake`], then pipelines requests
//! against the export's volume and sends replies as they complete.
//!
//! TLS: when the handshake answers STARTTLS ([`Step::StartTls`]), the
//! driver runs the TLS handshake on the same stream (tokio-rustls) and
//! carries on haggling over TLS. A plain connection is split into owned
//! halves for transmission ([`Connection::split_owned`], no locking for
//! TCP and unix sockets); a TLS one with `tokio::io::split`.
//!
//! Shape of a session in transmission: one task per connection, so a
//! request served from memory or the page cache never wakes another thread.
//! - Socket bytes accumulate in a buffer; the sans-IO [`RequestDecoder`]
//!   turns them into commands (write payloads split off without copying).
//! - Each command becomes a future in a `FuturesUnordered`; they run
//!   concurrently and reply in completion order. Blocking store work runs
//!   on the store's own threads and wakes us when done.
//! - Replies queue up and go out with vectored writes, many per syscall.
//! - Backpressure: no new requests are decoded while `max_in_flight`
//!   requests (or 64 MiB of their data, or 64 MiB of unsent replies) are
//!   pending, so a client that stops reading stops being read from.

use std::collections::{BTreeSet, VecDeque};
use std::io::{self, IoSlice};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::future::Either;
use futures_util::stream::{FuturesUnordered, StreamExt};
use longwire_core::stats::{ConnState, ConnStats, ExportStats, OpKind, Protocol, Stats};
use longwire_core::gate::{ConnectionGate, ConnectionSlot, Refused};
use longwire_core::{AddressPolicy, ExportRegistry, ExtentKind, ReadSegment, Volume, VolumeError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::handshake::{self, Handshake, Negotiated, Step};
use crate::limits::ExportLimits;
use crate::proto::*;
use crate::tls::{subject_common_name, NbdTls};
use crate::transmission::*;

/// Tunables of the NBD front-end.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A client must finish option haggling within this time.
    pub handshake_timeout: Duration,
    /// Requests one connection may have in flight before we stop reading.
    pub max_in_flight: usize,
    /// After shutdown starts, how long an idle client gets to disconnect.
    pub shutdown_grace: Duration,
    /// TLS (STARTTLS) settings; None: TLS is off.
    pub tls: Option<NbdTls>,
    /// Most NBD connections at once, server-wide (0: unlimited). Beyond
    /// it, new connections are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Per-export connection caps, enforced by the handshake (None: none).
    pub export_limits: Option<Arc<ExportLimits>>,
    /// Close a connection in transmission that has had no request in
    /// flight and sent no byte for this long (None: never).
    pub idle_timeout: Option<Duration>,
    /// Per-export client address allow-lists, enforced by the handshake
    /// (None: every address may use every export).
    pub addresses: Option<Arc<AddressPolicy>>,
    /// Where requests and connections are counted (`/metrics`, `status`).
    pub stats: Arc<Stats>,
}

/// Default of [`ServerConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            max_in_flight: 128,
            shutdown_grace: Duration::from_millis(500),
            tls: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            export_limits: None,
            idle_timeout: None,
            addresses: None,
            stats: Stats::new(),
        }
    }
}

/// Serves NBD sessions for every export in a registry.
pub struct NbdServer {
    registry: Arc<ExportRegistry>,
    config: ServerConfig,
    shutdown: CancellationToken,
    /// Connections being served now, against `max_connections`.
    gate: ConnectionGate,
}

impl NbdServer {
    pub fn new(registry: Arc<ExportRegistry>, config: ServerConfig, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(NbdServer {
            registry,
            gate: ConnectionGate::new(config.max_connections),
            config,
            shutdown,
        })
    }

    /// NBD connections being served now.
    pub fn active_connections(&self) -> usize {
        self.gate.active()
    }

    /// Count a new connection in, unless the server is at `max_connections`.
    fn admit(&self, peer: &str) -> Option<ConnectionSlot> {
        match self.gate.admit() {
            Ok(slot) => Some(slot),
            Err(Refused::Report { unreported }) => {
                let (max, more) = (self.gate.max(), Refused::suffix(unreported));
                warn!(%peer, "connection limit reached ({max} connections); closing the new connection{more}");
                None
            }
            Err(Refused::Quiet) => None,
        }
    }

    /// Run one client connection to completion. Never panics on bad input:
    /// protocol violations end the session, I/O errors are logged.
    pub async fn serve_connection<S: Connection>(self: Arc<Self>, stream: S, peer: String) {
        // Over the server-wide limit: dropping the stream closes it.
        let Some(_slot) = self.admit(&peer) else { return };
        let conn = self.config.stats.open_connection(Protocol::Nbd, &peer);
        let negotiation = tokio::select! {
            r = tokio::time::timeout(
                self.config.handshake_timeout,
                // The span names the peer in what the handshake logs (refusals).
                self.negotiate(stream, &peer).instrument(tracing::info_span!("nbd", %peer)),
            ) => match r {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    debug!(%peer, "handshake ended: {e}");
                    return;
                }
                Err(_) => {
                    info!(%peer, "handshake timed out after {:?}; closing", self.config.handshake_timeout);
                    return;
                }
            },
            _ = self.shutdown.cancelled() => return,
        };
        let (export, result) = match negotiation {
            Negotiation::Refused => return,
            Negotiation::Plain(rd, n) => {
                let export = n.export.name.clone();
                info!(%peer, %export, structured = n.structured, extended = n.extended, tls = false, "client connected");
                let leftover = BytesMut::from(rd.buffer());
                let (r, w) = rd.into_inner().split_owned();
                (export, self.transmission(r, leftover, w, *n, &peer, conn.stats()).await)
            }
            Negotiation::Tls(rd, n, cn) => {
                let export = n.export.name.clone();
                let client = cn.as_deref().unwrap_or("-");
                info!(%peer, %export, structured = n.structured, extended = n.extended, tls = true, %client, "client connected");
                let leftover = BytesMut::from(rd.buffer());
                let (r, w) = tokio::io::split((*rd).into_inner());
                (export, self.transmission(r, leftover, w, *n, &peer, conn.stats()).await)
            }
        };
        match result {
            Ok(()) => info!(%peer, %export, "client disconnected"),
            Err(e) => info!(%peer, %export, "connection ended: {e}"),
        }
    }

    /// The whole handshake: greeting, options, and the TLS upgrade when the
    /// client asks for it.
    async fn negotiate<S: Connection>(&self, stream: S, peer: &str) -> io::Result<Negotiation<S>> {
        let mut hs = match &self.config.tls {
            Some(tls) => Handshake::with_tls(tls.policy.clone()),
            None => Handshake::new(),
        };
        if let Some(limits) = &self.config.export_limits {
            hs.set_limits(limits.clone());
        }
        if let Some(policy) = &self.config.addresses {
            hs.set_client_address(policy.clone(), stream.peer_ip()?);
        }
        // Small: handshakes are small, and many may be pending at once
        // (bigger option payloads bypass the buffer).
        let mut rd = BufReader::with_capacity(HANDSHAKE_BUF, stream);
        rd.write_all(&handshake::greeting()).await?;
        let flags = rd.read_u32().await?;
        hs.client_flags(flags).map_err(invalid)?;
        match self.options(&mut rd, &mut hs).await? {
            Some(OptionsEnd::Transmit(n)) => return Ok(Negotiation::Plain(rd, n)),
            None => return Ok(Negotiation::Refused),
            Some(OptionsEnd::StartTls) => {}
        }
        let Some(tls) = &self.config.tls else {
            return Err(invalid("STARTTLS accepted without TLS configured"));
        };
        if !rd.buffer().is_empty() {
            return Err(invalid("client sent data before the STARTTLS reply"));
        }
        let stream = match tls.acceptor.accept(rd.into_inner()).await {
            Ok(s) => s,
            Err(e) => {
                // Worth more than debug: a bad or missing client certificate ends here.
                info!(%peer, "TLS handshake failed: {e}");
                return Ok(Negotiation::Refused);
            }
        };
        let cn = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| subject_common_name(c));
        debug!(%peer, client = cn.as_deref().unwrap_or("-"), "TLS established");
        hs.tls_established(cn.clone());
        let mut rd = BufReader::with_capacity(HANDSHAKE_BUF, stream);
        match self.options(&mut rd, &mut hs).await? {
            Some(OptionsEnd::Transmit(n)) => Ok(Negotiation::Tls(Box::new(rd), n, cn)),
            None => Ok(Negotiation::Refused),
            Some(OptionsEnd::StartTls) => Err(invalid("second STARTTLS accepted")),
        }
    }

    /// Option haggling until the client starts transmission, asks for TLS,
    /// or leaves (`Ok(None)`: the client left or was refused).
    async fn options<S>(&self, rd: &mut BufReader<S>, hs: &mut Handshake) -> io::Result<Option<OptionsEnd>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut out = BytesMut::new();
        loop {
            let mut header = [0u8; 16];
            rd.read_exact(&mut header).await?;
            let (opt, len) = handshake::parse_option_header(&header).map_err(invalid)?;
            let mut data = vec![0u8; len as usize];
            rd.read_exact(&mut data).await?;
            hs.shutting_down = self.shutdown.is_cancelled();
            let step = hs.handle_option(opt, &data, &self.registry, &mut out);
            rd.write_all(&out).await?;
            rd.flush().await?;
            out.clear();
            match step {
                Step::Continue => {}
                Step::Close => return Ok(None),
                Step::Transmit(n) => return Ok(Some(OptionsEnd::Transmit(n))),
                Step::StartTls => return Ok(Some(OptionsEnd::StartTls)),
            }
        }
    }

    /// `rbuf` holds request bytes the handshake already read.
    async fn transmission<R, W>(
        &self,
        mut rd: R,
        mut rbuf: BytesMut,
        mut wr: W,
        n: Negotiated,
        peer: &str,
        conn: &Arc<ConnStats>,
    ) -> io::Result<()>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        conn.set_export(n.export.name.as_str());
        conn.set_state(ConnState::Transmission);
        let volume = n.export.volume.clone();
        let caps = volume.capabilities();
        let limits = Limits {
            size: volume.size(),
            flags: n.flags,
            extended: n.extended,
            base_allocation: n.base_allocation,
            min_block: caps.min_block,
            max_payload: caps.max_payload,
        };
        let ctx = Arc::new(RequestContext {
            volume,
            style: ReplyStyle::new(n.structured, n.extended),
            conn: conn.clone(),
            export_stats: self.config.stats.export(&n.export.name),
        });
        let barrier = Arc::new(WriteBarrier::default());
        let max_in_flight = self.config.max_in_flight.max(1);
        let shutdown_refusal = Rejection { errno: ESHUTDOWN, message: "server is shutting down".into() };

        rbuf.reserve(READ_BUF);
        let mut decoder = RequestDecoder::new(n.extended);
        let mut inflight = FuturesUnordered::new();
        let mut inflight_bytes = 0u64;
        let mut out = ReplyQueue::default();
        let mut reading = true;
        let mut shutting_down = false;
        // Written bytes may sit in a buffering writer (TLS) until flushed.
        let mut unflushed = false;
        // Last byte received or request completed (for the idle timeout).
        let mut last_activity = tokio::time::Instant::now();
        let idle_timeout = self.config.idle_timeout.filter(|d| !d.is_zero());

        loop {
            // Start every request already buffered, within the bounds.
            let has_room = |inflight: usize, bytes: u64, out: &ReplyQueue| {
                inflight < max_in_flight && bytes < MAX_INFLIGHT_BYTES && out.bytes < MAX_QUEUED_BYTES
            };
            while reading && has_room(inflight.len(), inflight_bytes, &out) {
                let refuse = shutting_down.then_some(&shutdown_refusal);
                match decoder.decode(&mut rbuf, &limits, refuse).map_err(invalid)? {
                    None => break,
                    Some(Decoded::Refused { header, rejection }) => {
                        debug!(%peer, "refused {}: {}", command_name(header.typ), rejection.message);
                        if header.typ != CMD_DISC {
                            conn.received();
                            conn.refused(op_kind(header.typ), Some(&ctx.export_stats));
                        }
                        let mut b = BytesMut::with_capacity(64);
                        ctx.style.error(&mut b, header.cookie, header.offset, rejection.errno, &rejection.message);
                        out.push(b.freeze());
                    }
                    Some(Decoded::Command { command: Command::Disconnect, .. }) => {
                        // Answer what is in flight, then close; ignore anything after DISC.
                        reading = false;
                        conn.set_state(ConnState::Closing);
                        rbuf.clear();
                    }
                    Some(Decoded::Command { header, command, payload }) => {
                        let order = match command {
                            Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. } => {
                                Some(Order::Write(barrier.begin_write()))
                            }
                            Command::Flush => Some(Order::Flush(barrier.clone(), barrier.mark())),
                            _ => None,
                        };
                        let cost = command_cost(&command);
                        inflight_bytes += cost;
                        conn.received();
                        let reply = ctx.clone().execute(command, header.cookie, header.offset, payload, order);
                        inflight.push(if cost >= SPAWN_THRESHOLD {
                            // Big copies run on another worker, in parallel
                            // with this connection's socket work.
                            let task = tokio::spawn(reply);
                            let style = ctx.style;
                            Either::Left(async move {
                                let reply = task.await.unwrap_or_else(|e| {
                                    let mut b = BytesMut::new();
                                    style.error(&mut b, header.cookie, header.offset, EIO, &format!("request failed: {e}"));
                                    vec![b.freeze()]
                                });
                                (reply, cost)
                            })
                        } else {
                            Either::Right(async move { (reply.await, cost) })
                        });
                    }
                }
            }
            if !reading && inflight.is_empty() && out.is_empty() && !unflushed {
                break;
            }
            let can_read = reading && has_room(inflight.len(), inflight_bytes, &out);
            // Nothing owed to the client. A half-received request does not
            // keep a connection from the idle timeout (a stalled sender).
            let quiet = inflight.is_empty() && out.is_empty() && !unflushed;
            let idle = quiet && decoder.is_idle(rbuf.len());
            if can_read {
                rbuf.reserve(decoder.wanted(rbuf.len()).clamp(READ_BUF / 4, READ_BUF));
            }
            tokio::select! {
                Some((reply, cost)) = inflight.next(), if !inflight.is_empty() => {
                    last_activity = tokio::time::Instant::now();
                    inflight_bytes -= cost;
                    out.extend(reply);
                }
                r = write_some(&mut wr, &out), if !out.is_empty() || unflushed => match r? {
                    // Flush once the queue is drained (a no-op on plain sockets).
                    0 => unflushed = false,
                    n => {
                        out.advance(n);
                        unflushed = true;
                    }
                },
                r = rd.read_buf(&mut rbuf), if can_read => {
                    last_activity = tokio::time::Instant::now();
                    if r? == 0 {
                        reading = false;
                        conn.set_state(ConnState::Closing);
                        if !decoder.is_idle(rbuf.len()) {
                            debug!(%peer, "client closed the connection in the middle of a request");
                        }
                    }
                }
                _ = self.shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    conn.set_state(ConnState::Closing);
                }
                // An async block, so the timer (and its clock read) is only
                // made when the branch is enabled: select! builds every
                // branch's future on each pass, enabled or not.
                _ = async { tokio::time::sleep(self.config.shutdown_grace).await }, if shutting_down && idle => {
                    debug!(%peer, "closing idle connection for shutdown");
                    break;
                }
                _ = async { tokio::time::sleep_until(last_activity + idle_timeout.unwrap_or_default()).await },
                    if idle_timeout.is_some() && quiet && reading && !shutting_down =>
                {
                    info!(%peer, export = %n.export.name, "closing connection idle for {:?}", idle_timeout.unwrap_or_default());
                    break;
                }
            }
        }
        let _ = wr.shutdown().await;
        Ok(())
    }
}

/// Read buffer of a connection during the handshake.
const HANDSHAKE_BUF: usize = 8 * 1024;
/// Requests moving at least this much data run as their own task.
const SPAWN_THRESHOLD: u64 = 128 * 1024;
/// Bytes of socket data read at a time.
const READ_BUF: usize = 256 * 1024;
/// Data of in-flight reads and writes one connection may hold in memory
/// before the server stops reading more requests from it.
const MAX_INFLIGHT_BYTES: u64 = 64 << 20;
/// Encoded replies waiting for a slow client before we stop reading.
const MAX_QUEUED_BYTES: usize = 64 << 20;

/// Memory a request pins while in flight (its payload or its read buffer).
fn command_cost(c: &Command) -> u64 {
    match c {
        Command::Read { len, .. } | Command::Write { len, .. } => *len,
        _ => 0,
    }
}

/// Replies encoded and waiting to be written, in order.
#[derive(Default)]
struct ReplyQueue {
    pieces: VecDeque<Bytes>,
    bytes: usize,
}

impl ReplyQueue {
    fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.bytes += b.len();
            self.pieces.push_back(b);
        }
    }

    fn extend(&mut self, reply: Vec<Bytes>) {
        for b in reply {
            self.push(b);
        }
    }

    fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Drop `n` written bytes from the front.
    fn advance(&mut self, mut n: usize) {
        self.bytes -= n;
        while n > 0 {
            let Some(front) = self.pieces.front_mut() else { return };
            if n >= front.len() {
                n -= front.len();
                self.pieces.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}

/// One vectored write of as much of the queue as the socket takes, or,
/// with the queue empty, a flush (returning 0).
async fn write_some<W: AsyncWrite + Unpin>(wr: &mut W, out: &ReplyQueue) -> io::Result<usize> {
    if out.is_empty() {
        wr.flush().await?;
        return Ok(0);
    }
    let slices: Vec<IoSlice<'_>> = out.pieces.iter().take(64).map(|b| IoSlice::new(b)).collect();
    let n = wr.write_vectored(&slices).await?;
    if n == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    Ok(n)
}

/// Orders each FLUSH after every write received before it on the same
/// connection (the spec only requires writes already replied to; covering
/// the in-flight ones too is stricter and cheap).
#[derive(Default)]
struct WriteBarrier {
    /// Next write number, and the numbers of writes still in flight.
    state: Mutex<(u64, BTreeSet<u64>)>,
    done: Notify,
}

impl WriteBarrier {
    fn begin_write(self: &Arc<Self>) -> WriteTicket {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let id = st.0;
        st.0 += 1;
        st.1.insert(id);
        WriteTicket { barrier: self.clone(), id }
    }

    /// A point in the write sequence: the writes numbered below it.
    fn mark(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Wait until every write numbered below `mark` has completed.
    async fn wait_before(&self, mark: u64) {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let oldest = self.state.lock().unwrap_or_else(|e| e.into_inner()).1.first().copied();
            if oldest.is_none_or(|id| id >= mark) {
                return;
            }
            notified.await;
        }
    }
}

/// Held by a write while it is in flight; completing (or dropping) it lets
/// waiting flushes proceed.
struct WriteTicket {
    barrier: Arc<WriteBarrier>,
    id: u64,
}

impl Drop for WriteTicket {
    fn drop(&mut self) {
        self.barrier.state.lock().unwrap_or_else(|e| e.into_inner()).1.remove(&self.id);
        self.barrier.done.notify_waiters();
    }
}

/// How a request is ordered against others on its connection.
enum Order {
    /// Held (never read) until the write completes.
    Write(#[allow(dead_code)] WriteTicket),
    /// The barrier and the mark this flush must wait for.
    Flush(Arc<WriteBarrier>, u64),
}

/// What request tasks share: the volume, how to encode replies, and
/// where requests are counted.
struct RequestContext {
    volume: Arc<dyn Volume>,
    style: ReplyStyle,
    conn: Arc<ConnStats>,
    export_stats: Arc<ExportStats>,
}

/// The request kind a command is counted as.
fn op_kind(typ: u16) -> OpKind {
    match typ {
        CMD_READ => OpKind::Read,
        CMD_WRITE => OpKind::Write,
        CMD_FLUSH => OpKind::Flush,
        CMD_TRIM => OpKind::Trim,
        CMD_WRITE_ZEROES => OpKind::Zero,
        CMD_BLOCK_STATUS => OpKind::BlockStatus,
        _ => OpKind::Other,
    }
}

impl RequestContext {
    /// Run one command and count it: its kind, bytes moved, latency and
    /// whether it failed.
    async fn execute(self: Arc<Self>, cmd: Command, cookie: u64, req_offset: u64, payload: Bytes, order: Option<Order>) -> Vec<Bytes> {
        let (kind, bytes) = match &cmd {
            Command::Read { len, .. } => (OpKind::Read, *len),
            Command::Write { .. } => (OpKind::Write, payload.len() as u64),
            Command::Flush => (OpKind::Flush, 0),
            Command::Trim { .. } => (OpKind::Trim, 0),
            Command::WriteZeroes { .. } => (OpKind::Zero, 0),
            Command::BlockStatus { .. } => (OpKind::BlockStatus, 0),
            Command::Cache { .. } | Command::Disconnect => (OpKind::Other, 0),
        };
        let request = self.conn.begin(kind, Some(&self.export_stats));
        let (reply, ok) = self.run(cmd, cookie, req_offset, payload, order).await;
        request.finish(if ok { bytes } else { 0 }, ok);
        reply
    }

    /// The reply to a command, and whether it succeeded.
    async fn run(&self, cmd: Command, cookie: u64, req_offset: u64, payload: Bytes, order: Option<Order>) -> (Vec<Bytes>, bool) {
        let result = match cmd {
            Command::Read { offset, len, df } => return self.read(cookie, offset, len as usize, df).await,
            Command::BlockStatus { offset, len, req_one } => return self.block_status(cookie, offset, len, req_one).await,
            Command::Write { offset, fua, .. } => self.volume.write(offset, payload, fua).await,
            Command::Flush => {
                if let Some(Order::Flush(barrier, mark)) = order {
                    barrier.wait_before(mark).await;
                }
                self.volume.flush().await
            }
            Command::Trim { offset, len, fua } => self.volume.trim(offset, len, fua).await,
            Command::Cache { offset, len } => self.volume.cache(offset, len).await,
            Command::WriteZeroes { offset, len, flags } => self.volume.write_zeroes(offset, len, flags).await,
            Command::Disconnect => Ok(()),
        };
        let mut out = BytesMut::with_capacity(32);
        let ok = result.is_ok();
        match result {
            Ok(()) => self.style.ok(&mut out, cookie, req_offset),
            Err(e) => self.fail(&mut out, cookie, req_offset, &e),
        }
        (vec![out.freeze()], ok)
    }

    fn fail(&self, out: &mut BytesMut, cookie: u64, req_offset: u64, e: &VolumeError) {
        if !matches!(e, VolumeError::NotSupported(_)) {
            warn!("request failed: {e}");
        }
        self.style.error(out, cookie, req_offset, nbd_errno(e.errno()), &e.to_string());
    }

    async fn read(&self, cookie: u64, offset: u64, len: usize, df: bool) -> (Vec<Bytes>, bool) {
        let mut head = BytesMut::with_capacity(64);
        if self.style == ReplyStyle::Simple {
            return match self.volume.read(offset, len).await {
                Ok(data) => {
                    ReplyStyle::simple(&mut head, cookie, 0);
                    (vec![head.freeze(), data], true)
                }
                Err(e) => {
                    self.fail(&mut head, cookie, offset, &e);
                    (vec![head.freeze()], false)
                }
            };
        }
        if len == 0 {
            self.style.ok(&mut head, cookie, offset);
            return (vec![head.freeze()], true);
        }
        let segments = if df {
            self.volume.read(offset, len).await.map(|d| vec![ReadSegment::Data(d)])
        } else {
            self.volume.read_sparse(offset, len).await
        };
        let segments = match segments {
            Ok(s) if s.iter().map(|s| s.len()).sum::<u64>() == len as u64 => s,
            Ok(_) => {
                self.fail(&mut head, cookie, offset, &VolumeError::Io(io::Error::other("store returned a short read")));
                return (vec![head.freeze()], false);
            }
            Err(e) => {
                self.fail(&mut head, cookie, offset, &e);
                return (vec![head.freeze()], false);
            }
        };
        let mut reply = Vec::with_capacity(segments.len() * 2);
        let mut pos = offset;
        let last = segments.len() - 1;
        for (i, seg) in segments.into_iter().enumerate() {
            let done = i == last;
            match seg {
                ReadSegment::Data(d) => {
                    self.style.offset_data(&mut head, cookie, offset, pos, d.len() as u64, done);
                    pos += d.len() as u64;
                    reply.push(head.split().freeze());
                    reply.push(d);
                }
                ReadSegment::Zero(n) => {
                    self.style.offset_hole(&mut head, cookie, offset, pos, n as u32, done);
                    pos += n;
                }
            }
        }
        if !head.is_empty() {
            reply.push(head.freeze());
        }
        (reply, true)
    }

    async fn block_status(&self, cookie: u64, offset: u64, len: u64, req_one: bool) -> (Vec<Bytes>, bool) {
        let mut out = BytesMut::with_capacity(128);
        let extents = match self.volume.extents(offset, len).await {
            Ok(e) => e,
            Err(e) => {
                self.fail(&mut out, cookie, offset, &e);
                return (vec![out.freeze()], false);
            }
        };
        // Clip to the request (which also keeps every length within 32 bits
        // for compact replies) and to a sane number of descriptors.
        const MAX_DESCRIPTORS: usize = 1 << 16;
        let mut list = Vec::new();
        let mut covered = 0u64;
        for e in extents {
            if covered >= len || list.len() >= MAX_DESCRIPTORS {
                break;
            }
            let l = e.len.min(len - covered);
            if l == 0 {
                continue;
            }
            let status = match e.kind {
                ExtentKind::Data => 0,
                ExtentKind::Hole => STATE_HOLE | STATE_ZERO,
                ExtentKind::Zero => STATE_ZERO,
            };
            match list.last_mut() {
                Some((pl, ps)) if *ps == status => *pl += l,
                _ => list.push((l, status)),
            }
            covered += l;
            if req_one {
                break;
            }
        }
        if list.is_empty() {
            list.push((len, 0));
        }
        if req_one {
            list.truncate(1);
        }
        self.style.block_status(&mut out, cookie, offset, BASE_ALLOCATION_ID, &list);
        (vec![out.freeze()], true)
    }
}

fn invalid<E: std::fmt::Display>(e: E) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// How the handshake ended.
enum Negotiation<S> {
    /// The client left or was refused.
    Refused,
    /// Transmission over the plain connection.
    Plain(BufReader<S>, Box<Negotiated>),
    /// Transmission over TLS; the client certificate's Common Name.
    Tls(Box<BufReader<tokio_rustls::server::TlsStream<S>>>, Box<Negotiated>, Option<String>),
}

enum OptionsEnd {
    Transmit(Box<Negotiated>),
    StartTls,
}

/// A client connection: one stream for the handshake (and the TLS upgrade),
/// split into halves that can be used independently for transmission.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn split_owned(self) -> (Self::Read, Self::Write);
    /// The client's IP address, for address allow-lists; None for local
    /// clients (unix sockets, in-process streams), which lists always admit.
    fn peer_ip(&self) -> io::Result<Option<IpAddr>>;
}

impl Connection for tokio::net::TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn split_owned(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
    fn peer_ip(&self) -> io::Result<Option<IpAddr>> {
        self.peer_addr().map(|a| Some(a.ip()))
    }
}

impl Connection for tokio::net::UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn split_owned(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
    fn peer_ip(&self) -> io::Result<Option<IpAddr>> {
        Ok(None)
    }
}

impl Connection for tokio::io::DuplexStream {
    type Read = tokio::io::ReadHalf<tokio::io::DuplexStream>;
    type Write = tokio::io::WriteHalf<tokio::io::DuplexStream>;
    fn split_owned(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
    fn peer_ip(&self) -> io::Result<Option<IpAddr>> {
        Ok(None)
    }
}
