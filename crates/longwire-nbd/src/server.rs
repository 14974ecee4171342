//! The NBD session driver: owns one connection's sockets, runs the
//! handshake through the sans-IO [`Handshake`], then pipelines requests
//! against the export's volume and sends replies as they complete.
//!
//! Shape of a session in transmission:
//! - this task reads requests, validates them, reads payloads, and spawns
//!   one task per request (bounded by a semaphore: backpressure);
//! - request tasks encode their reply and hand it to a writer task over a
//!   channel, so replies go out in completion order;
//! - the writer batches whatever replies are ready into one flush.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use longwire_core::{ExportRegistry, ExtentKind, ReadSegment, Volume, VolumeError};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedRwLockReadGuard, OwnedSemaphorePermit, RwLock, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::handshake::{self, Handshake, Negotiated, Step};
use crate::proto::*;
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            max_in_flight: 128,
            shutdown_grace: Duration::from_millis(500),
        }
    }
}

/// Serves NBD sessions for every export in a registry.
pub struct NbdServer {
    registry: Arc<ExportRegistry>,
    config: ServerConfig,
    shutdown: CancellationToken,
}

/// Largest payload we will read and throw away to keep framing after
/// refusing a request; anything larger ends the session.
const MAX_DISCARD: u64 = 1 << 32;

/// One encoded reply: header and data pieces, written in order, plus the
/// in-flight permit it releases once written (so a client that stops
/// reading replies stops being read from).
struct Reply {
    pieces: Vec<Bytes>,
    _permit: OwnedSemaphorePermit,
}

impl NbdServer {
    pub fn new(registry: Arc<ExportRegistry>, config: ServerConfig, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(NbdServer { registry, config, shutdown })
    }

    /// Run one client connection to completion. Never panics on bad input:
    /// protocol violations end the session, I/O errors are logged.
    pub async fn serve_connection<R, W>(self: Arc<Self>, rd: R, wr: W, peer: String)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut rd = BufReader::with_capacity(256 * 1024, rd);
        let mut wr = wr;
        let negotiated = tokio::select! {
            r = tokio::time::timeout(self.config.handshake_timeout, self.handshake(&mut rd, &mut wr)) => match r {
                Ok(Ok(Some(n))) => n,
                Ok(Ok(None)) => return,
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
        let export = negotiated.export.name.clone();
        info!(%peer, %export, structured = negotiated.structured, extended = negotiated.extended, "client connected");
        match self.transmission(rd, wr, *negotiated, &peer).await {
            Ok(()) => info!(%peer, %export, "client disconnected"),
            Err(e) => info!(%peer, %export, "connection ended: {e}"),
        }
    }

    /// Option haggling. `Ok(None)` means the client left or was refused.
    async fn handshake<R, W>(&self, rd: &mut R, wr: &mut W) -> io::Result<Option<Box<Negotiated>>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        wr.write_all(&handshake::greeting()).await?;
        let mut hs = Handshake::new();
        let flags = rd.read_u32().await?;
        hs.client_flags(flags).map_err(invalid)?;
        let mut out = BytesMut::new();
        loop {
            let mut header = [0u8; 16];
            rd.read_exact(&mut header).await?;
            let (opt, len) = handshake::parse_option_header(&header).map_err(invalid)?;
            let mut data = vec![0u8; len as usize];
            rd.read_exact(&mut data).await?;
            hs.shutting_down = self.shutdown.is_cancelled();
            let step = hs.handle_option(opt, &data, &self.registry, &mut out);
            wr.write_all(&out).await?;
            wr.flush().await?;
            out.clear();
            match step {
                Step::Continue => {}
                Step::Close => return Ok(None),
                Step::Transmit(n) => return Ok(Some(n)),
            }
        }
    }

    async fn transmission<R, W>(&self, mut rd: BufReader<R>, wr: W, n: Negotiated, peer: &str) -> io::Result<()>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
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
        let ctx = Arc::new(RequestContext { volume, style: ReplyStyle::new(n.structured, n.extended) });
        let header_len = if n.extended { EXTENDED_HEADER_LEN } else { COMPACT_HEADER_LEN };

        let (tx, rx) = mpsc::unbounded_channel::<Reply>();
        let writer = tokio::spawn(write_replies(wr, rx));
        let permits = Arc::new(Semaphore::new(self.config.max_in_flight));
        // Writes hold a read guard while in flight; FLUSH takes the write
        // guard, so it waits for every write received before it.
        let write_order = Arc::new(RwLock::new(()));
        let mut shutting_down = false;
        let mut header = [0u8; EXTENDED_HEADER_LEN];

        let result: io::Result<()> = async {
            loop {
                let permit = permits.clone().acquire_owned().await.expect("semaphore never closed");
                // Wait for the next request without consuming it, so shutdown
                // can interrupt an idle connection without losing bytes.
                let more = if shutting_down {
                    tokio::select! {
                        r = rd.fill_buf() => !r?.is_empty(),
                        _ = tokio::time::sleep(self.config.shutdown_grace) => {
                            debug!(%peer, "closing idle connection for shutdown");
                            false
                        }
                    }
                } else {
                    tokio::select! {
                        r = rd.fill_buf() => !r?.is_empty(),
                        _ = self.shutdown.cancelled() => { shutting_down = true; continue; }
                    }
                };
                if !more {
                    return Ok(());
                }
                rd.read_exact(&mut header[..header_len]).await?;
                let h = parse_request_header(&header[..header_len], n.extended).map_err(invalid)?;
                let payload_len = h.payload_len(n.extended);
                let decoded = if shutting_down {
                    Err(Rejection { errno: ESHUTDOWN, message: "server is shutting down".into() })
                } else {
                    decode_command(&h, &limits)
                };
                let payload = match &decoded {
                    Ok(Command::Write { len, .. }) if *len == payload_len => {
                        let mut buf = BytesMut::zeroed(payload_len as usize);
                        rd.read_exact(&mut buf).await?;
                        buf.freeze()
                    }
                    _ => {
                        discard(&mut rd, payload_len).await?;
                        Bytes::new()
                    }
                };
                let cmd = match decoded {
                    Ok(Command::Disconnect) => return Ok(()),
                    Ok(cmd) => cmd,
                    Err(rej) => {
                        debug!(%peer, "refused {}: {}", command_name(h.typ), rej.message);
                        let mut out = BytesMut::with_capacity(64);
                        ctx.style.error(&mut out, h.cookie, h.offset, rej.errno, &rej.message);
                        let _ = tx.send(Reply { pieces: vec![out.freeze()], _permit: permit });
                        continue;
                    }
                };
                let guard = match cmd {
                    Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. } => {
                        Some(Order::Write(write_order.clone().read_owned().await))
                    }
                    Command::Flush => Some(Order::Flush(write_order.clone())),
                    _ => None,
                };
                let ctx = ctx.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let pieces = ctx.execute(cmd, h.cookie, h.offset, payload, guard).await;
                    let _ = tx.send(Reply { pieces, _permit: permit });
                });
            }
        }
        .await;
        // Dropping our sender lets the writer finish once every in-flight
        // request has replied.
        drop(tx);
        let written = writer.await.unwrap_or_else(|e| Err(io::Error::other(e)));
        result.and(written)
    }
}

/// How a request is ordered against others on its connection.
enum Order {
    /// Held (never read) until the write completes.
    Write(#[allow(dead_code)] OwnedRwLockReadGuard<()>),
    Flush(Arc<RwLock<()>>),
}

/// What request tasks share: the volume and how to encode replies.
struct RequestContext {
    volume: Arc<dyn Volume>,
    style: ReplyStyle,
}

impl RequestContext {
    async fn execute(&self, cmd: Command, cookie: u64, req_offset: u64, payload: Bytes, order: Option<Order>) -> Vec<Bytes> {
        let result = match cmd {
            Command::Read { offset, len, df } => return self.read(cookie, offset, len as usize, df).await,
            Command::BlockStatus { offset, len, req_one } => return self.block_status(cookie, offset, len, req_one).await,
            Command::Write { offset, fua, .. } => self.volume.write(offset, payload, fua).await,
            Command::Flush => {
                if let Some(Order::Flush(lock)) = order {
                    drop(lock.write_owned().await);
                }
                self.volume.flush().await
            }
            Command::Trim { offset, len, fua } => self.volume.trim(offset, len, fua).await,
            Command::Cache { offset, len } => self.volume.cache(offset, len).await,
            Command::WriteZeroes { offset, len, flags } => self.volume.write_zeroes(offset, len, flags).await,
            Command::Disconnect => Ok(()),
        };
        let mut out = BytesMut::with_capacity(32);
        match result {
            Ok(()) => self.style.ok(&mut out, cookie, req_offset),
            Err(e) => self.fail(&mut out, cookie, req_offset, &e),
        }
        vec![out.freeze()]
    }

    fn fail(&self, out: &mut BytesMut, cookie: u64, req_offset: u64, e: &VolumeError) {
        if !matches!(e, VolumeError::NotSupported(_)) {
            warn!("request failed: {e}");
        }
        self.style.error(out, cookie, req_offset, nbd_errno(e.errno()), &e.to_string());
    }

    async fn read(&self, cookie: u64, offset: u64, len: usize, df: bool) -> Vec<Bytes> {
        let mut head = BytesMut::with_capacity(64);
        if self.style == ReplyStyle::Simple {
            return match self.volume.read(offset, len).await {
                Ok(data) => {
                    ReplyStyle::simple(&mut head, cookie, 0);
                    vec![head.freeze(), data]
                }
                Err(e) => {
                    self.fail(&mut head, cookie, offset, &e);
                    vec![head.freeze()]
                }
            };
        }
        if len == 0 {
            self.style.ok(&mut head, cookie, offset);
            return vec![head.freeze()];
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
                return vec![head.freeze()];
            }
            Err(e) => {
                self.fail(&mut head, cookie, offset, &e);
                return vec![head.freeze()];
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
        reply
    }

    async fn block_status(&self, cookie: u64, offset: u64, len: u64, req_one: bool) -> Vec<Bytes> {
        let mut out = BytesMut::with_capacity(128);
        let extents = match self.volume.extents(offset, len).await {
            Ok(e) => e,
            Err(e) => {
                self.fail(&mut out, cookie, offset, &e);
                return vec![out.freeze()];
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
        vec![out.freeze()]
    }
}

/// Write replies as they arrive, batching whatever is ready into one flush.
async fn write_replies<W: AsyncWrite + Unpin>(wr: W, mut rx: mpsc::UnboundedReceiver<Reply>) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    while let Some(reply) = rx.recv().await {
        for piece in &reply.pieces {
            w.write_all(piece).await?;
        }
        while let Ok(reply) = rx.try_recv() {
            for piece in &reply.pieces {
                w.write_all(piece).await?;
            }
        }
        w.flush().await?;
    }
    w.shutdown().await.or(Ok(()))
}

/// Read and drop `n` bytes of a refused request's payload.
async fn discard<R: AsyncRead + Unpin>(rd: &mut R, n: u64) -> io::Result<()> {
    if n == 0 {
        return Ok(());
    }
    if n > MAX_DISCARD {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("payload of {n} bytes is too large")));
    }
    let copied = tokio::io::copy(&mut rd.take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn invalid<E: std::fmt::Display>(e: E) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}
