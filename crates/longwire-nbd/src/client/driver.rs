//! The async client: one shared work queue, one supervisor task per
//! connection slot, one reader task per live connection.
//!
//! ```text
//!  callers ──push──▶ WorkQueue ──pop──▶ slot 0 writer ──▶ socket ──▶ server
//!     ▲                  ▲        └──▶ slot 1 writer ──▶ socket ──▶ server
//!     │ oneshot          │ re-queue on loss / ESHUTDOWN
//!     └──── reader task (per connection): replies matched by cookie
//! ```
//!
//! - Every request waits on a oneshot channel under its own deadline
//!   ([`ClientConfig::request_timeout`]); whatever happens underneath, the
//!   caller hears back by then.
//! - A writer pops requests while its connection has room
//!   ([`ClientConfig::max_in_flight`]), records each under a fresh cookie
//!   *before* its bytes leave, and writes batches with vectored writes.
//! - The reader task decodes replies with the sans-IO [`ReplyDecoder`],
//!   feeds each to the request's [`ReplyAssembly`] and completes the
//!   oneshot when the last chunk arrives.
//! - When a connection dies (EOF, I/O error, protocol violation, or
//!   silence for `request_timeout` with requests outstanding) its
//!   outstanding requests go back to the front of the queue, where any live
//!   connection picks them up, and the slot reconnects with exponential
//!   backoff. A reconnect must reach the same export (same size, same
//!   canonical name when the server tells it); otherwise every request
//!   fails and the client stops.
//!
//! # Why re-sending is safe
//!
//! A request whose reply never arrived may or may not have been carried
//! out. Every command this client sends is idempotent at the block level:
//! READ, CACHE and BLOCK_STATUS change nothing; WRITE stores the same
//! bytes at the same offset however often it runs; TRIM, WRITE_ZEROES and
//! FLUSH likewise end in the same state when repeated. So running one twice
//! is harmless, and each caller still gets exactly one answer (its oneshot
//! completes once). Two caveats, shared with every NBD client that retries
//! (the kernel's, qemu's):
//!
//! - Ordering. A retried write can only be overtaken by a write the caller
//!   issued after it was acknowledged, and the old copy can only land late
//!   if the server is still executing it from the dead connection after a
//!   whole reconnect and round trip. Callers that give up on a request
//!   (deadline passed) and then write the same blocks again are exposed to
//!   the same window, as with any block device timeout. To keep that window
//!   small, a connection given up for dead is reset (SO_LINGER 0), so the
//!   client's kernel drops the requests it still holds instead of
//!   retransmitting them once the network heals. What a middlebox already
//!   buffered (a TCP-terminating proxy) can still arrive late; the network
//!   torture in `longwire-torture net --reconnecting-client` reproduces
//!   exactly that through its buffering fault proxy (see
//!   docs/RELIABILITY.md).
//! - Durability. A write acknowledged *before* the connection dropped but
//!   not yet flushed is lost if the server itself crashed, and a FLUSH sent
//!   after the reconnect cannot bring it back. Nothing in NBD tells a
//!   restarted server from a network blip, so the client logs how many
//!   writes were unflushed when a connection was lost and carries on.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use longwire_core::{ReadSegment, ZeroFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::codec::*;
use super::config::ClientConfig;
use super::connection::{self, fmt_duration, BoxRead, BoxWrite, Connected};
use super::error::ClientError;
use super::tls::ClientTls;
use super::negotiate::ExportInfo;
use super::uri::NbdUri;
use crate::proto::*;
use crate::transmission::command_name;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One NBD request as the caller asked for it; kept whole so it can be
/// re-sent on another connection.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub typ: u16,
    pub flags: u16,
    pub offset: u64,
    pub len: u64,
    pub payload: Bytes,
}

fn describe(typ: u16, offset: u64, len: u64) -> String {
    match typ {
        CMD_FLUSH | CMD_DISC => command_name(typ).to_string(),
        _ => format!("{} of {len} bytes at offset {offset}", command_name(typ)),
    }
}

impl Request {
    fn describe(&self) -> String {
        describe(self.typ, self.offset, self.len)
    }

    fn is_write(&self) -> bool {
        matches!(self.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES)
    }
}

type ReplyResult = Result<Completed, ClientError>;

/// A request waiting to be sent (again).
struct Pending {
    req: Request,
    tx: oneshot::Sender<ReplyResult>,
}

impl Pending {
    fn fail(self, e: ClientError) {
        let _ = self.tx.send(Err(e));
    }
}

// ---------------------------------------------------------------------------
// The shared queue
// ---------------------------------------------------------------------------

#[derive(Default)]
struct QueueInner {
    items: VecDeque<Pending>,
    /// No new requests are accepted (close, give-up, changed export).
    shut: Option<ClientError>,
    /// Queued requests were failed too; nothing will ever be sent again.
    failed: bool,
}

/// Requests waiting for a connection. Every connection pops from it, so
/// work spreads over live connections and a dead connection's requests
/// are picked up by any other.
#[derive(Default)]
struct WorkQueue {
    inner: Mutex<QueueInner>,
    notify: Notify,
}

impl WorkQueue {
    fn push(&self, p: Pending) -> Result<(), ClientError> {
        let mut q = lock(&self.inner);
        if let Some(e) = &q.shut {
            return Err(e.clone());
        }
        q.items.push_back(p);
        drop(q);
        self.notify.notify_one();
        Ok(())
    }

    /// Put requests back at the front, oldest first. Returns how many were
    /// re-queued (requests whose caller gave up are dropped).
    fn requeue(&self, ps: Vec<Pending>) -> usize {
        let ps: Vec<Pending> = ps.into_iter().filter(|p| !p.tx.is_closed()).collect();
        let mut q = lock(&self.inner);
        if q.failed {
            let e = q.shut.clone().unwrap_or(ClientError::Closed);
            drop(q);
            ps.into_iter().for_each(|p| p.fail(e.clone()));
            return 0;
        }
        let n = ps.len();
        for p in ps.into_iter().rev() {
            q.items.push_front(p);
        }
        drop(q);
        if n > 0 {
            self.notify.notify_waiters();
            self.notify.notify_one();
        }
        n
    }

    fn try_pop(&self) -> Option<Pending> {
        let mut q = lock(&self.inner);
        while let Some(p) = q.items.pop_front() {
            if !p.tx.is_closed() {
                return Some(p);
            }
        }
        None
    }

    /// The next request; `None` once the queue is shut and empty.
    async fn pop(&self) -> Option<Pending> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut q = lock(&self.inner);
                while let Some(p) = q.items.pop_front() {
                    if !p.tx.is_closed() {
                        let more = !q.items.is_empty();
                        drop(q);
                        if more {
                            // Pass the baton: another connection may be idle.
                            self.notify.notify_one();
                        }
                        return Some(p);
                    }
                }
                if q.shut.is_some() {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Accept nothing new; what is queued still goes out.
    fn shut(&self, e: ClientError) {
        let mut q = lock(&self.inner);
        if q.shut.is_none() {
            q.shut = Some(e);
        }
        drop(q);
        self.notify.notify_waiters();
    }

    /// Fail everything queued and everything that comes later with `e`.
    fn fail_all(&self, e: ClientError) {
        let mut q = lock(&self.inner);
        if q.failed {
            return;
        }
        q.shut = Some(e.clone());
        q.failed = true;
        let items = std::mem::take(&mut q.items);
        drop(q);
        self.notify.notify_waiters();
        items.into_iter().for_each(|p| p.fail(e.clone()));
    }

    fn shut_error(&self) -> Option<ClientError> {
        lock(&self.inner).shut.clone()
    }

    /// Nothing will be sent any more.
    fn finished(&self) -> bool {
        let q = lock(&self.inner);
        q.failed || (q.shut.is_some() && q.items.is_empty())
    }
}

// ---------------------------------------------------------------------------
// Shared client state
// ---------------------------------------------------------------------------

#[derive(Default)]
struct LinkStatus {
    live: usize,
    lost_since: Option<Instant>,
    attempts: u32,
    last_error: Option<String>,
}

#[derive(Default)]
struct Counters {
    connects: AtomicU64,
    reconnects: AtomicU64,
    resent: AtomicU64,
    /// Writes acknowledged since the last successful flush started.
    unflushed: AtomicU64,
}

/// A snapshot of what the client has been through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientStats {
    /// Connection slots in use (1, or more with `CAN_MULTI_CONN`).
    pub connections: usize,
    /// Slots connected right now.
    pub live_connections: usize,
    /// Successful handshakes, the first ones included.
    pub connects: u64,
    /// Successful handshakes after a lost connection.
    pub reconnects: u64,
    /// Requests put back in the queue because their connection was lost or
    /// the server was shutting down.
    pub resent: u64,
}

struct Shared {
    uri: NbdUri,
    config: ClientConfig,
    /// Loaded once; every (re)connect to an `nbds://` URI does STARTTLS with it.
    tls: Option<ClientTls>,
    /// The export as first negotiated; reconnects must match it.
    identity: ExportInfo,
    slots: usize,
    queue: WorkQueue,
    cancel: CancellationToken,
    status: Mutex<LinkStatus>,
    counters: Counters,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn on_connected(&self) {
        let mut s = lock(&self.status);
        s.live += 1;
        s.lost_since = None;
        s.attempts = 0;
        s.last_error = None;
    }

    fn on_disconnected(&self) {
        let mut s = lock(&self.status);
        s.live -= 1;
        if s.live == 0 && s.lost_since.is_none() {
            s.lost_since = Some(Instant::now());
        }
    }

    fn live(&self) -> usize {
        lock(&self.status).live
    }

    /// Where the connection stands, for error messages.
    fn status_line(&self) -> String {
        let s = lock(&self.status);
        let addr = &self.uri.address;
        if let Some(e) = self.queue.shut_error() {
            if !matches!(e, ClientError::Closed) {
                return e.to_string();
            }
        }
        match (s.live, s.lost_since) {
            (n, _) if n > 0 => format!("connected to {addr}, but the server has not replied"),
            (_, Some(t)) => {
                let mut line = format!("the connection to {addr} was lost {} ago", fmt_duration(t.elapsed()));
                if s.attempts > 0 {
                    line += &format!("; {} reconnect attempt(s) failed", s.attempts);
                }
                if let Some(e) = &s.last_error {
                    line += &format!(", the last with: {e}");
                }
                line
            }
            _ => format!("not connected to {addr}"),
        }
    }

    /// A reconnect reached the export we had, or the reason it did not.
    fn check_identity(&self, new: &ExportInfo) -> Result<(), String> {
        let old = &self.identity;
        if new.size != old.size {
            return Err(format!(
                "export {:?} on {} changed size from {} to {}; refusing to continue",
                old.requested_name, self.uri.address, old.size, new.size
            ));
        }
        if let (Some(a), Some(b)) = (&old.canonical_name, &new.canonical_name) {
            if a != b {
                return Err(format!(
                    "export on {} is now {b:?} instead of {a:?}; refusing to continue",
                    self.uri.address
                ));
            }
        }
        if new.min_block > old.min_block || new.max_payload < max_io(&self.config, old) {
            return Err(format!(
                "export {:?} on {} changed its block size constraints (minimum {} → {}, maximum payload {} → {}); refusing to continue",
                old.requested_name, self.uri.address, old.min_block, new.min_block, old.max_payload, new.max_payload
            ));
        }
        Ok(())
    }
}

/// Largest read/write payload the client sends in one request.
pub(crate) fn max_io(config: &ClientConfig, info: &ExportInfo) -> u32 {
    let align = info.min_block.max(1);
    let max = config.max_request.min(info.max_payload).max(align);
    max - max % align
}

// ---------------------------------------------------------------------------
// One connection
// ---------------------------------------------------------------------------

struct InFlight {
    pending: Pending,
    assembly: ReplyAssembly,
    sent_at: Instant,
    _permit: OwnedSemaphorePermit,
}

struct ConnState {
    inflight: Mutex<HashMap<u64, InFlight>>,
    last_rx: Mutex<Instant>,
    draining: AtomicBool,
    drain: Notify,
    idle: Notify,
}

impl ConnState {
    fn start_drain(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            self.drain.notify_waiters();
        }
    }

    fn framing(&self, cookie: u64) -> SimpleFraming {
        lock(&self.inflight).get(&cookie).map_or(SimpleFraming::Unknown, |e| e.assembly.expect().simple_framing())
    }

    /// Wait until no request is outstanding.
    async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if lock(&self.inflight).is_empty() {
                return;
            }
            idle.await;
        }
    }
}

/// How a connection ended.
enum ConnEnd {
    /// Lost; the slot reconnects.
    Lost(String),
    /// The server said ESHUTDOWN; we disconnected and reconnect after it.
    ServerShutdown,
    /// The client is closing (gracefully or dropped).
    Closed,
}

fn complete(entry: InFlight, shared: &Shared, conn: &ConnState) {
    let InFlight { pending, assembly, .. } = entry;
    match assembly.finish() {
        Ok(Ok(done)) => {
            if pending.req.is_write() {
                shared.counters.unflushed.fetch_add(1, Ordering::Relaxed);
            }
            let _ = pending.tx.send(Ok(done));
        }
        Ok(Err(e)) if e.errno == ESHUTDOWN => {
            // The server is going away: disconnect after what is in flight
            // and send this again once we are back.
            debug!("server answered {} with NBD_ESHUTDOWN; reconnecting after it", pending.req.describe());
            conn.start_drain();
            shared.counters.resent.fetch_add(shared.queue.requeue(vec![pending]) as u64, Ordering::Relaxed);
        }
        Ok(Err(e)) => {
            let request = pending.req.describe();
            pending.fail(ClientError::Server { request, errno: e.errno, message: e.message });
        }
        Err(p) => {
            let request = pending.req.describe();
            pending.fail(ClientError::Protocol(format!("{request}: {p}")));
        }
    }
}

/// Reads replies until the connection ends; returns why it ended.
async fn reader(mut rd: BoxRead, conn: Arc<ConnState>, shared: Arc<Shared>, info: ExportInfo) -> String {
    let mut decoder = ReplyDecoder::new(info.reply_style, info.max_payload as u64);
    let mut buf = BytesMut::with_capacity(256 * 1024);
    loop {
        loop {
            let reply = match decoder.decode(&mut buf, |c| conn.framing(c)) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => return e.to_string(),
            };
            let cookie = reply.cookie;
            let mut map = lock(&conn.inflight);
            let Some(entry) = map.get_mut(&cookie) else {
                return format!("NBD protocol violation by the server: reply for unknown cookie {cookie:#x}");
            };
            match entry.assembly.add(reply) {
                Ok(false) => {}
                Ok(true) => {
                    let entry = map.remove(&cookie).expect("entry is present");
                    let idle = map.is_empty();
                    drop(map);
                    complete(entry, &shared, &conn);
                    if idle {
                        conn.idle.notify_waiters();
                    }
                }
                Err(e) => {
                    // This request's reply is nonsense: fail it rather than
                    // retry it forever. The others are re-sent after reconnect.
                    let entry = map.remove(&cookie).expect("entry is present");
                    drop(map);
                    let request = entry.pending.req.describe();
                    entry.pending.fail(ClientError::Protocol(format!("{request}: {e}")));
                    return e.to_string();
                }
            }
        }
        let want = decoder.wanted(buf.len()).clamp(64 * 1024, 4 << 20);
        buf.reserve(want);
        match rd.read_buf(&mut buf).await {
            Ok(0) => {
                return if decoder.is_idle(buf.len()) {
                    "the server closed the connection".to_string()
                } else {
                    "the server closed the connection in the middle of a reply".to_string()
                };
            }
            Ok(_) => *lock(&conn.last_rx) = Instant::now(),
            Err(e) => return format!("read error: {e}"),
        }
    }
}

/// Write `bufs` out completely, many per syscall.
async fn write_all(wr: &mut BoxWrite, bufs: &mut VecDeque<Bytes>) -> io::Result<()> {
    while !bufs.is_empty() {
        let slices: Vec<IoSlice<'_>> = bufs.iter().take(64).map(|b| IoSlice::new(b)).collect();
        let mut n = wr.write_vectored(&slices).await?;
        drop(slices);
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let front = bufs.front_mut().expect("wrote more than was queued");
            if n >= front.len() {
                n -= front.len();
                bufs.pop_front();
            } else {
                let _ = front.split_to(n);
                n = 0;
            }
        }
    }
    wr.flush().await
}

enum WriterEnd {
    Closed,
    Drained,
}

struct Writer<'a> {
    wr: BoxWrite,
    conn: &'a ConnState,
    shared: &'a Shared,
    info: &'a ExportInfo,
    next_cookie: u64,
}

impl Writer<'_> {
    /// Record the request as outstanding and encode it into `out`.
    fn stage(&mut self, p: Pending, permit: OwnedSemaphorePermit, hdr: &mut BytesMut, out: &mut VecDeque<Bytes>) {
        let r = &p.req;
        let expect = match r.typ {
            CMD_READ => Expect::Read { offset: r.offset, len: r.len },
            CMD_BLOCK_STATUS => match self.info.base_allocation {
                Some(context) => Expect::BlockStatus { offset: r.offset, len: r.len, context },
                None => {
                    let request = r.describe();
                    return p.fail(ClientError::Server {
                        request,
                        errno: ENOTSUP,
                        message: "this connection did not negotiate base:allocation".into(),
                    })
                }
            },
            _ => Expect::Plain { offset: r.offset },
        };
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let header = RequestHeader { typ: r.typ, flags: r.flags, offset: r.offset, length: r.len };
        if let Err(e) = encode_request(hdr, self.info.extended(), cookie, &header) {
            return p.fail(ClientError::Invalid(e.0));
        }
        if r.typ == CMD_WRITE && !r.payload.is_empty() {
            out.push_back(hdr.split().freeze());
            out.push_back(r.payload.clone());
        }
        let entry = InFlight { pending: p, assembly: ReplyAssembly::new(expect), sent_at: Instant::now(), _permit: permit };
        lock(&self.conn.inflight).insert(cookie, entry);
    }

    async fn run(&mut self) -> io::Result<WriterEnd> {
        let sem = Arc::new(Semaphore::new(self.shared.config.max_in_flight.max(1)));
        let mut hdr = BytesMut::with_capacity(4096);
        let mut out = VecDeque::new();
        loop {
            let drain = self.conn.drain.notified();
            tokio::pin!(drain);
            drain.as_mut().enable();
            if self.conn.draining.load(Ordering::SeqCst) {
                self.conn.wait_idle().await;
                self.disconnect().await?;
                return Ok(WriterEnd::Drained);
            }
            let (permit, first) = tokio::select! {
                _ = &mut drain => continue,
                p = async {
                    let permit = sem.clone().acquire_owned().await.expect("semaphore is never closed");
                    (permit, self.shared.queue.pop().await)
                } => p,
            };
            let Some(first) = first else {
                // Closing: let what is outstanding finish, then say goodbye.
                self.conn.wait_idle().await;
                self.disconnect().await?;
                return Ok(WriterEnd::Closed);
            };
            self.stage(first, permit, &mut hdr, &mut out);
            // Batch whatever else is ready into the same syscall.
            for _ in 0..31 {
                let Ok(permit) = sem.clone().try_acquire_owned() else { break };
                let Some(p) = self.shared.queue.try_pop() else { break };
                self.stage(p, permit, &mut hdr, &mut out);
            }
            if !hdr.is_empty() {
                out.push_back(hdr.split().freeze());
            }
            write_all(&mut self.wr, &mut out).await?;
        }
    }

    async fn disconnect(&mut self) -> io::Result<()> {
        let mut b = BytesMut::new();
        let disc = RequestHeader { typ: CMD_DISC, flags: 0, offset: 0, length: 0 };
        let _ = encode_request(&mut b, self.info.extended(), 0, &disc);
        self.wr.write_all(&b).await?;
        self.wr.flush().await?;
        let _ = self.wr.shutdown().await;
        Ok(())
    }
}

/// Declares the connection dead when requests are outstanding and nothing
/// has come from the server for `limit`.
async fn stall_watch(conn: &ConnState, limit: Duration) -> String {
    let tick = (limit / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        tokio::time::sleep(tick).await;
        let (oldest, n) = {
            let map = lock(&conn.inflight);
            (map.values().map(|e| e.sent_at).min(), map.len())
        };
        if let Some(oldest) = oldest {
            let quiet_since = oldest.max(*lock(&conn.last_rx));
            if quiet_since.elapsed() >= limit {
                return format!(
                    "the server sent nothing for {} with {n} request(s) outstanding",
                    fmt_duration(quiet_since.elapsed())
                );
            }
        }
    }
}

/// Run one connection until it ends. Outstanding requests are re-queued.
async fn run_connection(shared: &Arc<Shared>, slot: usize, c: Connected) -> ConnEnd {
    let Connected { rd, wr, info, socket } = c;
    let conn = Arc::new(ConnState {
        inflight: Mutex::new(HashMap::new()),
        last_rx: Mutex::new(Instant::now()),
        draining: AtomicBool::new(false),
        drain: Notify::new(),
        idle: Notify::new(),
    });
    let mut reader_task = tokio::spawn(reader(rd, conn.clone(), shared.clone(), info.clone()));
    let mut writer = Writer { wr, conn: &conn, shared, info: &info, next_cookie: 1 };
    let mut reader_done = false;
    let end = tokio::select! {
        r = &mut reader_task => {
            reader_done = true;
            ConnEnd::Lost(r.unwrap_or_else(|e| format!("reader task failed: {e}")))
        }
        r = writer.run() => match r {
            Ok(WriterEnd::Closed) => ConnEnd::Closed,
            Ok(WriterEnd::Drained) => ConnEnd::ServerShutdown,
            Err(e) => ConnEnd::Lost(format!("write error: {e}")),
        },
        why = stall_watch(&conn, shared.config.request_timeout) => ConnEnd::Lost(why),
        _ = shared.cancel.cancelled() => ConnEnd::Closed,
    };
    if matches!(end, ConnEnd::Lost(_)) {
        Connected::abandon(&socket);
    }
    if !reader_done {
        reader_task.abort();
        let _ = reader_task.await;
    }
    drop(writer);
    drop(socket);
    let mut outstanding: Vec<(u64, InFlight)> = lock(&conn.inflight).drain().collect();
    outstanding.sort_by_key(|(cookie, _)| *cookie);
    let n = outstanding.len();
    let requeued = shared.queue.requeue(outstanding.into_iter().map(|(_, e)| e.pending).collect());
    shared.counters.resent.fetch_add(requeued as u64, Ordering::Relaxed);
    if let ConnEnd::Lost(why) = &end {
        let unflushed = shared.counters.unflushed.load(Ordering::Relaxed);
        warn!(
            uri = %shared.uri, slot, outstanding = n, resend = requeued, unflushed_writes = unflushed,
            "NBD connection lost: {why}; reconnecting ({requeued} outstanding request(s) will be re-sent; \
             {unflushed} acknowledged write(s) not yet flushed)"
        );
    }
    end
}

// ---------------------------------------------------------------------------
// Supervisors: connect, run, reconnect
// ---------------------------------------------------------------------------

async fn supervise(shared: Arc<Shared>, slot: usize, mut first: Option<Connected>) {
    loop {
        // The first connection was counted as live when it was made.
        let c = match first.take() {
            Some(c) => c,
            None => match reconnect(&shared, slot).await {
                Some(c) => {
                    shared.on_connected();
                    c
                }
                None => return,
            },
        };
        let end = run_connection(&shared, slot, c).await;
        shared.on_disconnected();
        match end {
            ConnEnd::Closed => return,
            ConnEnd::ServerShutdown => {
                info!(uri = %shared.uri, slot, "the NBD server is shutting down; disconnected, will reconnect")
            }
            ConnEnd::Lost(_) => {}
        }
        if shared.cancel.is_cancelled() {
            return;
        }
    }
}

/// Reconnect with exponential backoff. `None`: give up (the client is
/// finished, or this slot retires).
async fn reconnect(shared: &Arc<Shared>, slot: usize) -> Option<Connected> {
    let policy = &shared.config.reconnect;
    let lost_at = Instant::now();
    let mut delay = policy.initial_delay;
    let mut attempt = 0u32;
    loop {
        if shared.cancel.is_cancelled() || shared.queue.finished() {
            return None;
        }
        if !policy.enabled {
            if shared.live() == 0 {
                shared.queue.fail_all(ClientError::GaveUp(format!(
                    "the connection to {} was lost and reconnecting is disabled",
                    shared.uri.address
                )));
            }
            return None;
        }
        attempt += 1;
        let r = tokio::select! {
            r = connection::connect(&shared.uri, &shared.config, shared.tls.as_ref()) => r,
            _ = shared.cancel.cancelled() => return None,
        };
        let err = match r {
            Ok(c) => match shared.check_identity(&c.info) {
                Ok(()) if slot > 0 && !c.info.has_flag(FLAG_CAN_MULTI_CONN) => {
                    warn!(uri = %shared.uri, slot, "the server no longer allows multiple connections; retiring this one");
                    return None;
                }
                Ok(()) => {
                    shared.counters.connects.fetch_add(1, Ordering::Relaxed);
                    shared.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    info!(
                        uri = %shared.uri, slot, attempts = attempt, downtime_ms = lost_at.elapsed().as_millis() as u64,
                        "NBD connection re-established after {attempt} attempt(s) in {}",
                        fmt_duration(lost_at.elapsed())
                    );
                    return Some(c);
                }
                Err(msg) => {
                    error!(uri = %shared.uri, slot, "{msg}");
                    shared.queue.fail_all(ClientError::ExportChanged(msg));
                    shared.cancel.cancel();
                    return None;
                }
            },
            Err(e) => e.to_string(),
        };
        {
            let mut s = lock(&shared.status);
            s.attempts += 1;
            s.last_error = Some(err.clone());
        }
        let elapsed = lost_at.elapsed();
        if let Some(limit) = policy.give_up_after {
            if elapsed >= limit {
                let msg = format!(
                    "gave up reconnecting to {} after {} and {attempt} attempt(s); last error: {err}",
                    shared.uri,
                    fmt_duration(elapsed)
                );
                if shared.live() == 0 {
                    error!(uri = %shared.uri, slot, attempts = attempt, "{msg}");
                    shared.queue.fail_all(ClientError::GaveUp(msg));
                } else {
                    warn!(uri = %shared.uri, slot, attempts = attempt, "{msg}; other connections carry on");
                }
                return None;
            }
        }
        let mut wait = delay;
        if let Some(limit) = policy.give_up_after {
            wait = wait.min(limit.saturating_sub(elapsed));
        }
        if attempt == 1 {
            warn!(uri = %shared.uri, slot, "NBD reconnect attempt 1 failed: {err}; retrying with backoff");
        } else {
            debug!(uri = %shared.uri, slot, attempt, "NBD reconnect attempt failed: {err}; next in {}", fmt_duration(wait));
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.cancel.cancelled() => return None,
        }
        delay = (delay * 2).min(policy.max_delay);
    }
}

// ---------------------------------------------------------------------------
// The public handle
// ---------------------------------------------------------------------------

struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The last handle is gone: stop every task (they hold `Shared`).
        self.shared.cancel.cancel();
    }
}

/// A pipelined, reconnecting NBD client for one export.
///
/// Cheap to clone; every clone shares the connections. Each method sends
/// one NBD request exactly as asked (no splitting; [`NbdVolume`] does that
/// and checks ranges) and waits at most
/// [`ClientConfig::request_timeout`] for its reply. Dropping the last
/// clone closes the connections; [`NbdClient::close`] does it gracefully.
///
/// [`NbdVolume`]: super::NbdVolume
#[derive(Clone)]
pub struct NbdClient {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient").field("uri", &self.shared().uri.to_string()).field("stats", &self.stats()).finish()
    }
}

impl NbdClient {
    /// Connect to an NBD URI (`nbd://host[:port]/export`,
    /// `nbd+unix:///export?socket=/path`, or over TLS
    /// `nbds://host[:port]/export?tls-certificates=DIR`,
    /// `nbds+unix:///export?socket=/path&tls-certificates=DIR`).
    pub async fn connect(uri: &str, config: ClientConfig) -> Result<NbdClient, ClientError> {
        Self::connect_to(uri.parse()?, config).await
    }

    /// Connect to a parsed URI. The first connection's failure is returned
    /// as is (no retry); reconnecting starts once a session was established.
    pub async fn connect_to(uri: NbdUri, config: ClientConfig) -> Result<NbdClient, ClientError> {
        let tls = super::tls::load(&uri, &config)?;
        let first = connection::connect(&uri, &config, tls.as_ref()).await?;
        let identity = first.info.clone();
        let slots = if identity.has_flag(FLAG_CAN_MULTI_CONN) { config.connections.max(1) } else { 1 };
        let shared = Arc::new(Shared {
            uri,
            config,
            tls,
            identity,
            slots,
            queue: WorkQueue::default(),
            cancel: CancellationToken::new(),
            status: Mutex::new(LinkStatus::default()),
            counters: Counters::default(),
            tasks: Mutex::new(Vec::new()),
        });
        shared.counters.connects.fetch_add(1, Ordering::Relaxed);
        let extra = join_all((1..slots).map(|_| connection::connect(&shared.uri, &shared.config, shared.tls.as_ref()))).await;
        let mut conns = vec![Some(first)];
        for (i, r) in extra.into_iter().enumerate() {
            conns.push(match r.map_err(|e| e.to_string()).and_then(|c| shared.check_identity(&c.info).map(|()| c)) {
                Ok(c) => {
                    shared.counters.connects.fetch_add(1, Ordering::Relaxed);
                    Some(c)
                }
                Err(e) => {
                    warn!(uri = %shared.uri, slot = i + 1, "extra NBD connection failed: {e}; will keep trying");
                    None
                }
            });
        }
        for _ in conns.iter().flatten() {
            shared.on_connected();
        }
        let tasks = conns
            .into_iter()
            .enumerate()
            .map(|(slot, c)| tokio::spawn(supervise(shared.clone(), slot, c)))
            .collect();
        *lock(&shared.tasks) = tasks;
        debug!(uri = %shared.uri, slots, style = ?shared.identity.reply_style, "NBD client connected");
        Ok(NbdClient { handle: Arc::new(Handle { shared }) })
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// The export as negotiated on the first connection.
    pub fn info(&self) -> &ExportInfo {
        &self.shared().identity
    }

    pub fn size(&self) -> u64 {
        self.info().size
    }

    pub fn uri(&self) -> &NbdUri {
        &self.shared().uri
    }

    pub fn config(&self) -> &ClientConfig {
        &self.shared().config
    }

    /// Largest read/write payload one request carries
    /// (`min(max_request, server maximum)`, aligned to the minimum block).
    pub fn max_io(&self) -> u32 {
        max_io(self.config(), self.info())
    }

    pub fn stats(&self) -> ClientStats {
        let s = self.shared();
        ClientStats {
            connections: s.slots,
            live_connections: s.live(),
            connects: s.counters.connects.load(Ordering::Relaxed),
            reconnects: s.counters.reconnects.load(Ordering::Relaxed),
            resent: s.counters.resent.load(Ordering::Relaxed),
        }
    }

    /// Send one request and wait for its reply, at most `request_timeout`.
    pub(crate) async fn submit(&self, req: Request) -> Result<Completed, ClientError> {
        let shared = self.shared();
        let timeout = shared.config.request_timeout;
        let deadline = Instant::now() + timeout;
        let (typ, offset, len) = (req.typ, req.offset, req.len);
        let (tx, rx) = oneshot::channel();
        shared.queue.push(Pending { req, tx })?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(shared.queue.shut_error().unwrap_or(ClientError::Closed)),
            Err(_) => Err(ClientError::TimedOut(format!(
                "{} did not complete within {}: {}",
                describe(typ, offset, len),
                fmt_duration(timeout),
                shared.status_line()
            ))),
        }
    }

    /// Send any request (the flags are sent as given).
    pub async fn request(&self, typ: u16, flags: u16, offset: u64, len: u64, payload: Bytes) -> Result<Completed, ClientError> {
        self.submit(Request { typ, flags, offset, len, payload }).await
    }

    /// Refuse a payload the server said it would not take (and whose reply
    /// the decoder would not accept).
    fn check_payload(&self, typ: u16, offset: u64, len: u64) -> Result<(), ClientError> {
        let max = self.info().max_payload as u64;
        if len > max {
            return Err(ClientError::Invalid(format!(
                "{} exceeds the server's maximum payload of {max} bytes",
                describe(typ, offset, len)
            )));
        }
        Ok(())
    }

    /// `NBD_CMD_READ`: the data in order, holes as [`ReadSegment::Zero`].
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadSegment>, ClientError> {
        self.check_payload(CMD_READ, offset, len as u64)?;
        match self.request(CMD_READ, 0, offset, len as u64, Bytes::new()).await? {
            Completed::Read(segments) => Ok(segments),
            other => Err(ClientError::Protocol(format!("unexpected read result {other:?}"))),
        }
    }

    /// `NBD_CMD_WRITE`, with `NBD_CMD_FLAG_FUA` when `fua`.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let len = data.len() as u64;
        self.check_payload(CMD_WRITE, offset, len)?;
        self.request(CMD_WRITE, flags, offset, len, data).await.map(drop)
    }

    /// `NBD_CMD_FLUSH`.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let before = self.shared().counters.unflushed.load(Ordering::Relaxed);
        self.request(CMD_FLUSH, 0, 0, 0, Bytes::new()).await?;
        let _ = self.shared().counters.unflushed.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(before)));
        Ok(())
    }

    /// `NBD_CMD_TRIM`.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ClientError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(CMD_TRIM, flags, offset, len, Bytes::new()).await.map(drop)
    }

    /// `NBD_CMD_WRITE_ZEROES` (`NO_HOLE` unless `may_trim`, `FAST_ZERO`, `FUA`).
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), ClientError> {
        let mut f = 0;
        if !flags.may_trim {
            f |= CMD_FLAG_NO_HOLE;
        }
        if flags.fast {
            f |= CMD_FLAG_FAST_ZERO;
        }
        if flags.fua {
            f |= CMD_FLAG_FUA;
        }
        self.request(CMD_WRITE_ZEROES, f, offset, len, Bytes::new()).await.map(drop)
    }

    /// `NBD_CMD_CACHE`.
    pub async fn cache(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.request(CMD_CACHE, 0, offset, len, Bytes::new()).await.map(drop)
    }

    /// `NBD_CMD_BLOCK_STATUS` for `base:allocation`: `(length, flags)` runs
    /// from `offset` (flags are `NBD_STATE_HOLE`/`NBD_STATE_ZERO`).
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>, ClientError> {
        match self.request(CMD_BLOCK_STATUS, 0, offset, len, Bytes::new()).await? {
            Completed::Extents(e) => Ok(e),
            other => Err(ClientError::Protocol(format!("unexpected block status result {other:?}"))),
        }
    }

    /// Stop taking requests, let the outstanding ones finish (bounded by
    /// `request_timeout`), send `NBD_CMD_DISC` and close every connection.
    pub async fn close(&self) {
        let shared = self.shared();
        shared.queue.shut(ClientError::Closed);
        let tasks = std::mem::take(&mut *lock(&shared.tasks));
        let all = join_all(tasks);
        if tokio::time::timeout(shared.config.request_timeout, all).await.is_err() {
            warn!(uri = %shared.uri, "NBD client did not close within {}; dropping connections", fmt_duration(shared.config.request_timeout));
        }
        shared.cancel.cancel();
        shared.queue.fail_all(ClientError::Closed);
    }
}
