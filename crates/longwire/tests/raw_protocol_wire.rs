//! Byte-level NBD protocol tests: the real `longwire serve` binary driven
//! over a raw `std::net::TcpStream` with hand-built, big-endian bytes.
//!
//! Every socket has read/write timeouts, so a server that stops answering
//! makes a test fail instead of hanging. The wire constants are written out
//! here from the spec (`doc/proto.md` with the extended-headers extension)
//! rather than imported from the server, so a wrong constant on the server
//! side cannot hide itself.
//!
//! Run: `cargo test -p longwire --test raw_protocol_wire` (about 3 s).
//!
//! Layout:
//! 1. wire constants
//! 2. encoding / decoding helpers and the `Conn` client
//! 3. handshake tests
//! 4. transmission tests: simple replies
//! 5. transmission tests: structured replies and block status
//! 6. transmission tests: extended headers
//! 7. pipelining, framing errors, disconnects
//! 8. robustness under garbage

mod common;

use common::*;
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

// ===========================================================================
// 1. Wire constants (from the NBD spec)
// ===========================================================================

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

const REQUEST_MAGIC: u32 = 0x2560_9513;
const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (server) / client flags.
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const C_FIXED_NEWSTYLE: u32 = 1 << 0;
const C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
const F_HAS_FLAGS: u16 = 1 << 0;
const F_READ_ONLY: u16 = 1 << 1;
const F_SEND_FLUSH: u16 = 1 << 2;
const F_SEND_FUA: u16 = 1 << 3;
const F_SEND_TRIM: u16 = 1 << 5;
const F_SEND_WRITE_ZEROES: u16 = 1 << 6;
const F_SEND_DF: u16 = 1 << 7;
const F_CAN_MULTI_CONN: u16 = 1 << 8;
const F_SEND_CACHE: u16 = 1 << 10;
const F_SEND_FAST_ZERO: u16 = 1 << 11;

/// What a writable memory export advertises without structured replies.
const MEMORY_RW_FLAGS: u16 = F_HAS_FLAGS
    | F_SEND_FLUSH
    | F_SEND_FUA
    | F_SEND_TRIM
    | F_SEND_WRITE_ZEROES
    | F_CAN_MULTI_CONN
    | F_SEND_CACHE
    | F_SEND_FAST_ZERO;
/// What a read-only memory export advertises without structured replies.
const MEMORY_RO_FLAGS: u16 = F_HAS_FLAGS | F_READ_ONLY | F_SEND_FLUSH | F_SEND_FUA | F_CAN_MULTI_CONN | F_SEND_CACHE;

// Options.
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const OPT_EXTENDED_HEADERS: u32 = 11;

// Option replies.
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_FLAG_ERROR: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR + 1;
const REP_ERR_POLICY: u32 = REP_FLAG_ERROR + 2;
const REP_ERR_INVALID: u32 = REP_FLAG_ERROR + 3;
const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR + 6;

const INFO_EXPORT: u16 = 0;

// Commands.
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
const CMD_FLAG_DF: u16 = 1 << 2;
const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured reply flags and chunk types.
const REPLY_FLAG_DONE: u16 = 1 << 0;
const TYPE_NONE: u16 = 0;
const TYPE_OFFSET_DATA: u16 = 1;
const TYPE_OFFSET_HOLE: u16 = 2;
const TYPE_BLOCK_STATUS: u16 = 5;
const TYPE_BLOCK_STATUS_EXT: u16 = 6;
const TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation status bits.
const STATE_HOLE: u32 = 1 << 0;
const STATE_ZERO: u32 = 1 << 1;
const HOLE: u32 = STATE_HOLE | STATE_ZERO;
const DATA: u32 = 0;

// Error values.
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// The spec's default / longwire's maximum payload (32 MiB).
const MAX_PAYLOAD: u64 = 32 * MIB;

/// Per-read/-write socket timeout: nothing here may hang.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

// ===========================================================================
// 2. Helpers: encoding, decoding, a raw client
// ===========================================================================

/// Minimal big-endian byte builder: `Be::new().u64(IHAVEOPT).u32(7).0`.
#[derive(Default)]
struct Be(Vec<u8>);

impl Be {
    fn new() -> Self {
        Be(Vec::new())
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// The 18 bytes the server must open with.
fn expected_greeting() -> Vec<u8> {
    Be::new().u64(NBDMAGIC).u64(IHAVEOPT).u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).0
}

/// An option request: IHAVEOPT, option, length, data.
fn option_bytes(opt: u32, data: &[u8]) -> Vec<u8> {
    Be::new().u64(IHAVEOPT).u32(opt).u32(data.len() as u32).raw(data).0
}

/// NBD_OPT_GO / NBD_OPT_INFO payload.
fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = Be::new().u32(name.len() as u32).raw(name.as_bytes()).u16(infos.len() as u16);
    for &i in infos {
        b = b.u16(i);
    }
    b.0
}

/// NBD_OPT_SET_META_CONTEXT / LIST_META_CONTEXT payload.
fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = Be::new().u32(export.len() as u32).raw(export.as_bytes()).u32(queries.len() as u32);
    for q in queries {
        b = b.u32(q.len() as u32).raw(q.as_bytes());
    }
    b.0
}

/// Deterministic test data (never all zero).
fn data(seed: u64, len: usize) -> Vec<u8> {
    pattern(seed, len)
}

/// Reply style agreed in the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Style {
    Simple,
    Structured,
    Extended,
}

/// What NBD_OPT_GO told us.
#[derive(Debug, Clone, Copy)]
struct GoInfo {
    size: u64,
    flags: u16,
    /// Context id the server assigned to base:allocation, if selected.
    ctx: Option<u32>,
}

/// One structured or extended reply chunk.
#[derive(Debug, Clone)]
struct Chunk {
    flags: u16,
    typ: u16,
    cookie: u64,
    /// Extended headers only: the echoed request offset.
    offset: Option<u64>,
    payload: Vec<u8>,
}

impl Chunk {
    fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }

    /// (errno, message) of an NBD_REPLY_TYPE_ERROR chunk, checking its framing.
    fn error(&self) -> (u32, String) {
        assert_eq!(self.typ, TYPE_ERROR, "expected an NBD_REPLY_TYPE_ERROR chunk, got {self:?}");
        assert!(self.payload.len() >= 6, "error chunk payload shorter than 6 bytes: {self:?}");
        let errno = be32(&self.payload);
        let msg_len = be16(&self.payload[4..]) as usize;
        assert_eq!(
            msg_len,
            self.payload.len() - 6,
            "error chunk message length {msg_len} does not match chunk length {}",
            self.payload.len()
        );
        let msg = String::from_utf8(self.payload[6..].to_vec()).expect("error message is not UTF-8");
        (errno, msg)
    }
}

/// A raw NBD client connection.
struct Conn {
    s: TcpStream,
    style: Style,
}

impl Conn {
    fn connect_addr(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        Conn { s, style: Style::Simple }
    }

    fn connect(server: &Server) -> Conn {
        Self::connect_addr(server.tcp_addr())
    }

    /// Connect, check the greeting, send `client_flags`.
    fn start(server: &Server, client_flags: u32) -> Conn {
        let mut c = Self::connect(server);
        c.greeting();
        c.send(&client_flags.to_be_bytes());
        c
    }

    /// Connect and negotiate `export` in `style`; with `meta`, also select
    /// base:allocation. Asserts every step.
    fn open(server: &Server, export: &str, style: Style, meta: bool) -> (Conn, GoInfo) {
        Self::open_addr(server.tcp_addr(), export, style, meta)
    }

    fn open_addr(addr: SocketAddr, export: &str, style: Style, meta: bool) -> (Conn, GoInfo) {
        let mut c = Self::connect_addr(addr);
        c.greeting();
        c.send(&(C_FIXED_NEWSTYLE | C_NO_ZEROES).to_be_bytes());
        match style {
            Style::Simple => {}
            Style::Structured => c.expect_ack(OPT_STRUCTURED_REPLY, &[]),
            Style::Extended => c.expect_ack(OPT_EXTENDED_HEADERS, &[]),
        }
        let ctx = meta.then(|| c.set_meta_base_allocation(export));
        let mut info = c.go(export);
        info.ctx = ctx;
        c.style = style;
        (c, info)
    }

    fn send(&mut self, b: &[u8]) {
        self.s
            .write_all(b)
            .unwrap_or_else(|e| panic!("sending {} bytes to the server failed: {e}", b.len()));
    }

    fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s
            .read_exact(&mut v)
            .unwrap_or_else(|e| panic!("expected {n} bytes from the server: {e}"));
        v
    }

    fn greeting(&mut self) {
        let g = self.recv(18);
        assert_eq!(g, expected_greeting(), "greeting bytes");
    }

    /// Wait (at most `limit`) for the server to close the connection without
    /// sending anything more. Returns how long it took.
    fn expect_closed_within(&mut self, limit: Duration, what: &str) -> Duration {
        let t0 = Instant::now();
        self.s.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 256];
        let r = self.s.read(&mut buf);
        let took = t0.elapsed();
        match r {
            Ok(0) => {}
            Ok(n) => panic!("{what}: expected the server to close the connection, but it sent {n} bytes: {:02x?}", &buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: the server kept the connection open for {took:?} (expected it to close)")
            }
            Err(e) => panic!("{what}: expected a close, read failed: {e}"),
        }
        took
    }

    fn expect_closed(&mut self, what: &str) -> Duration {
        self.expect_closed_within(IO_TIMEOUT, what)
    }

    /// Assert that nothing at all arrives within `wait`.
    fn expect_silence(&mut self, wait: Duration, what: &str) {
        self.s.set_read_timeout(Some(wait)).unwrap();
        let mut b = [0u8; 64];
        match self.s.read(&mut b) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Ok(0) => panic!("{what}: the server closed the connection"),
            Ok(n) => panic!("{what}: unexpected {n} bytes from the server: {:02x?}", &b[..n]),
            Err(e) => panic!("{what}: {e}"),
        }
        self.s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    }

    // -- options ------------------------------------------------------------

    fn option(&mut self, opt: u32, data: &[u8]) {
        self.send(&option_bytes(opt, data));
    }

    /// Read one option reply to `opt`: (reply type, data).
    fn opt_reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        let h = self.recv(20);
        assert_eq!(be64(&h), OPT_REPLY_MAGIC, "option reply magic in {h:02x?}");
        assert_eq!(be32(&h[8..]), opt, "option reply must echo the option");
        let typ = be32(&h[12..]);
        let len = be32(&h[16..]) as usize;
        assert!(len <= 64 * 1024, "option reply of {len} bytes is implausible");
        (typ, self.recv(len))
    }

    /// Send `opt` and expect exactly one NBD_REP_ACK with no data.
    fn expect_ack(&mut self, opt: u32, data: &[u8]) {
        self.option(opt, data);
        assert_eq!(self.opt_reply(opt), (REP_ACK, vec![]), "reply to option {opt}");
    }

    /// Send `opt` and expect a single error reply of type `err` whose data
    /// is a (non-empty, UTF-8) message. Returns the message.
    fn expect_opt_error(&mut self, opt: u32, data: &[u8], err: u32) -> String {
        self.option(opt, data);
        let (typ, msg) = self.opt_reply(opt);
        assert_eq!(typ, err, "reply type to option {opt} (message {:?})", String::from_utf8_lossy(&msg));
        String::from_utf8(msg).expect("error message is UTF-8")
    }

    /// SET_META_CONTEXT base:allocation; returns the assigned context id.
    fn set_meta_base_allocation(&mut self, export: &str) -> u32 {
        self.option(OPT_SET_META_CONTEXT, &meta_payload(export, &["base:allocation"]));
        let (typ, d) = self.opt_reply(OPT_SET_META_CONTEXT);
        assert_eq!(typ, REP_META_CONTEXT, "SET_META_CONTEXT must select base:allocation");
        assert_eq!(&d[4..], b"base:allocation", "META_CONTEXT reply names the context");
        let id = be32(&d);
        assert_eq!(self.opt_reply(OPT_SET_META_CONTEXT), (REP_ACK, vec![]), "SET_META_CONTEXT ends with ACK");
        id
    }

    /// NBD_OPT_GO for `name`; asserts success and returns size and flags.
    fn go(&mut self, name: &str) -> GoInfo {
        self.option(OPT_GO, &go_payload(name, &[]));
        let mut export = None;
        loop {
            let (typ, d) = self.opt_reply(OPT_GO);
            match typ {
                REP_INFO => {
                    assert!(d.len() >= 2, "NBD_REP_INFO without a type");
                    if be16(&d) == INFO_EXPORT {
                        assert_eq!(d.len(), 12, "NBD_INFO_EXPORT is 12 bytes");
                        export = Some((be64(&d[2..]), be16(&d[10..])));
                    }
                }
                REP_ACK => {
                    assert!(d.is_empty());
                    break;
                }
                t => panic!("GO {name:?} failed with reply type {t:#x}: {:?}", String::from_utf8_lossy(&d)),
            }
        }
        let (size, flags) = export.expect("a successful GO must send NBD_INFO_EXPORT");
        GoInfo { size, flags, ctx: None }
    }

    // -- requests -----------------------------------------------------------

    /// Encode a request header in the negotiated style (compact or extended).
    fn header(&self, flags: u16, typ: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
        if self.style == Style::Extended {
            Be::new().u32(EXTENDED_REQUEST_MAGIC).u16(flags).u16(typ).u64(cookie).u64(offset).u64(len).0
        } else {
            let len32 = u32::try_from(len).expect("compact requests have 32-bit lengths");
            Be::new().u32(REQUEST_MAGIC).u16(flags).u16(typ).u64(cookie).u64(offset).u32(len32).0
        }
    }

    fn request(&mut self, flags: u16, typ: u16, cookie: u64, offset: u64, len: u64) {
        let h = self.header(flags, typ, cookie, offset, len);
        self.send(&h);
    }

    /// Bytes of a WRITE request (PAYLOAD_LEN set when extended).
    fn write_bytes(&self, cookie: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
        let flags = if self.style == Style::Extended { CMD_FLAG_PAYLOAD_LEN } else { 0 };
        let mut b = self.header(flags, CMD_WRITE, cookie, offset, payload.len() as u64);
        b.extend_from_slice(payload);
        b
    }

    // -- replies ------------------------------------------------------------

    /// A 16-byte simple reply header: (errno, cookie).
    fn simple_reply(&mut self) -> (u32, u64) {
        let h = self.recv(16);
        assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC, "simple reply magic in {h:02x?}");
        (be32(&h[4..]), be64(&h[8..]))
    }

    /// One structured (20-byte header) or extended (32-byte header) chunk.
    fn chunk(&mut self) -> Chunk {
        match self.style {
            Style::Simple => panic!("no chunks without structured replies"),
            Style::Structured => {
                let h = self.recv(20);
                assert_eq!(be32(&h), STRUCTURED_REPLY_MAGIC, "structured reply magic in {h:02x?}");
                let len = be32(&h[16..]) as usize;
                assert!(len as u64 <= MAX_PAYLOAD + 64, "chunk length {len} is implausible");
                Chunk { flags: be16(&h[4..]), typ: be16(&h[6..]), cookie: be64(&h[8..]), offset: None, payload: self.recv(len) }
            }
            Style::Extended => {
                let h = self.recv(32);
                assert_eq!(be32(&h), EXTENDED_REPLY_MAGIC, "extended reply magic in {h:02x?}");
                let len = be64(&h[24..]);
                assert!(len <= MAX_PAYLOAD + 64, "chunk length {len} is implausible");
                Chunk {
                    flags: be16(&h[4..]),
                    typ: be16(&h[6..]),
                    cookie: be64(&h[8..]),
                    offset: Some(be64(&h[16..])),
                    payload: self.recv(len as usize),
                }
            }
        }
    }

    /// All chunks of the reply to `cookie`, up to and including DONE.
    fn chunks(&mut self, cookie: u64) -> Vec<Chunk> {
        let mut v = Vec::new();
        loop {
            let c = self.chunk();
            assert_eq!(c.cookie, cookie, "chunk for an unexpected cookie: {c:?}");
            let done = c.done();
            v.push(c);
            if done {
                return v;
            }
            assert!(v.len() < 10_000, "no DONE chunk after 10000 chunks");
        }
    }

    /// The reply to a request that carries no reply data (or failed):
    /// returns the error value, 0 on success. Structured styles must answer
    /// with exactly one chunk: NONE (success) or ERROR, with DONE set.
    /// `req_offset` is checked against extended headers' echoed offset.
    fn status(&mut self, cookie: u64, req_offset: u64) -> u32 {
        match self.style {
            Style::Simple => {
                let (errno, got) = self.simple_reply();
                assert_eq!(got, cookie, "simple reply cookie");
                errno
            }
            _ => {
                let c = self.chunk();
                assert_eq!(c.cookie, cookie, "reply cookie in {c:?}");
                assert!(c.done(), "a single-chunk reply must have NBD_REPLY_FLAG_DONE: {c:?}");
                if self.style == Style::Extended {
                    assert_eq!(c.offset, Some(req_offset), "extended reply must echo the request offset: {c:?}");
                }
                match c.typ {
                    TYPE_NONE => {
                        assert!(c.payload.is_empty(), "NONE chunk with payload");
                        0
                    }
                    TYPE_ERROR => {
                        let (errno, msg) = c.error();
                        assert_ne!(errno, 0, "error chunk with error 0");
                        assert!(!msg.is_empty(), "error chunk without a message");
                        errno
                    }
                    t => panic!("expected NONE or ERROR chunk, got type {t}: {c:?}"),
                }
            }
        }
    }

    /// Send a payload-less command and return its error value.
    fn cmd(&mut self, flags: u16, typ: u16, cookie: u64, offset: u64, len: u64) -> u32 {
        self.request(flags, typ, cookie, offset, len);
        self.status(cookie, offset)
    }

    /// WRITE and return its error value.
    fn write(&mut self, cookie: u64, offset: u64, payload: &[u8]) -> u32 {
        let b = self.write_bytes(cookie, offset, payload);
        self.send(&b);
        self.status(cookie, offset)
    }

    fn write_ok(&mut self, cookie: u64, offset: u64, payload: &[u8]) {
        assert_eq!(self.write(cookie, offset, payload), 0, "write of {} bytes at {offset}", payload.len());
    }

    /// READ that must succeed; returns the data (reassembled from chunks
    /// in structured styles).
    fn read(&mut self, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
        self.request(0, CMD_READ, cookie, offset, len);
        match self.style {
            Style::Simple => {
                let (errno, got) = self.simple_reply();
                assert_eq!((errno, got), (0, cookie), "simple read reply (errno, cookie)");
                self.recv(len as usize)
            }
            _ => {
                let chunks = self.chunks(cookie);
                assemble(self.style, offset, len, &chunks)
            }
        }
    }

    /// A follow-up READ proving that framing is intact.
    fn assert_alive(&mut self, cookie: u64, what: &str) {
        let got = self.read(cookie, 0, 512);
        assert_eq!(got.len(), 512, "{what}: connection no longer usable");
    }
}

/// Reassemble the content chunks of a successful structured read of
/// `[offset, offset+len)`: checks bounds, non-overlap, full coverage, no
/// error chunks and (extended) the echoed request offset.
fn assemble(style: Style, offset: u64, len: u64, chunks: &[Chunk]) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    let mut covered = vec![false; len as usize];
    for c in chunks {
        if style == Style::Extended {
            assert_eq!(c.offset, Some(offset), "extended chunk must echo the request offset: {c:?}");
        }
        let (at, n) = match c.typ {
            TYPE_OFFSET_DATA => {
                assert!(c.payload.len() >= 9, "OFFSET_DATA chunk must be at least 9 bytes");
                (be64(&c.payload), c.payload.len() as u64 - 8)
            }
            TYPE_OFFSET_HOLE => {
                assert_eq!(c.payload.len(), 12, "OFFSET_HOLE chunk is exactly 12 bytes");
                let n = be32(&c.payload[8..]) as u64;
                assert!(n > 0, "zero-length hole");
                (be64(&c.payload), n)
            }
            TYPE_NONE => {
                assert!(c.payload.is_empty() && c.done());
                continue;
            }
            t => panic!("unexpected chunk type {t} in a successful read: {c:?}"),
        };
        assert!(at >= offset && at + n <= offset + len, "chunk [{at}, +{n}) outside the request [{offset}, +{len})");
        let start = (at - offset) as usize;
        for (i, seen) in covered[start..start + n as usize].iter_mut().enumerate() {
            assert!(!*seen, "chunks overlap at offset {}", at + i as u64);
            *seen = true;
        }
        if c.typ == TYPE_OFFSET_DATA {
            buf[start..start + n as usize].copy_from_slice(&c.payload[8..]);
        }
    }
    if let Some(i) = covered.iter().position(|&c| !c) {
        panic!("read reply does not cover offset {} (chunks: {chunks:?})", offset + i as u64);
    }
    buf
}

/// Decode a compact NBD_REPLY_TYPE_BLOCK_STATUS chunk: (context, extents).
fn block_status_compact(c: &Chunk) -> (u32, Vec<(u64, u32)>) {
    assert_eq!(c.typ, TYPE_BLOCK_STATUS, "expected a BLOCK_STATUS chunk: {c:?}");
    assert!(c.done(), "block status chunk must be final (one context)");
    let p = &c.payload;
    assert!(p.len() >= 12 && (p.len() - 4).is_multiple_of(8), "BLOCK_STATUS length {} is not 4 + 8n", p.len());
    let ext = p[4..].chunks(8).map(|d| (be32(d) as u64, be32(&d[4..]))).collect();
    (be32(p), ext)
}

/// Decode an NBD_REPLY_TYPE_BLOCK_STATUS_EXT chunk: (context, extents).
fn block_status_ext(c: &Chunk) -> (u32, Vec<(u64, u32)>) {
    assert_eq!(c.typ, TYPE_BLOCK_STATUS_EXT, "expected a BLOCK_STATUS_EXT chunk: {c:?}");
    assert!(c.done(), "block status chunk must be final (one context)");
    let p = &c.payload;
    assert!(p.len() >= 24 && (p.len() - 8).is_multiple_of(16), "BLOCK_STATUS_EXT length {} is not 8 + 16n", p.len());
    let count = be32(&p[4..]) as usize;
    assert_eq!(count * 16 + 8, p.len(), "descriptor count must match the chunk length");
    let ext = p[8..]
        .chunks(16)
        .map(|d| {
            let status = be64(&d[8..]);
            assert_eq!(status >> 32, 0, "base:allocation status must fit 32 bits");
            (be64(d), status as u32)
        })
        .collect();
    (be32(p), ext)
}

/// Server with one 64 MiB writable export "a".
fn memory_server() -> Server {
    Server::start(&["--export", "a=memory:?size=64M", "--listen", "127.0.0.1:0"])
}

/// The server must not have logged a panic (tokio swallows task panics).
fn assert_no_panics(server: &Server) {
    let lines = server.stderr_lines();
    if let Some(l) = lines.iter().find(|l| l.contains("panicked")) {
        panic!("server logged a panic: {l}\n{}", server.logs());
    }
}

/// Simple xorshift64* PRNG (seeded, no extra crates).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

// ===========================================================================
// 3. Handshake
// ===========================================================================

#[test]
fn greeting_is_nbdmagic_ihaveopt_and_fixed_newstyle_no_zeroes() {
    let server = memory_server();
    let mut c = Conn::connect(&server);
    let g = c.recv(18);
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(be16(&g[16..]), 0x0003, "handshake flags = FIXED_NEWSTYLE | NO_ZEROES");
    // Nothing else until the client speaks.
    c.expect_silence(Duration::from_millis(200), "after the greeting");
}

#[test]
fn unknown_client_flags_close_the_connection_without_a_reply() {
    let server = memory_server();
    for flags in [C_FIXED_NEWSTYLE | C_NO_ZEROES | 1 << 2, 1 << 31, 0xffff_ffff] {
        let mut c = Conn::start(&server, flags);
        let took = c.expect_closed(&format!("client flags {flags:#x}"));
        assert!(took < Duration::from_secs(2), "close took {took:?}");
    }
    // The server is fine.
    let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
    c.assert_alive(1, "after refused clients");
}

#[test]
fn option_with_wrong_magic_closes_the_connection() {
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    let mut bad = option_bytes(OPT_LIST, &[]);
    bad[7] ^= 0x01; // IHAVEOPT -> IHAVEOPU
    c.send(&bad);
    let took = c.expect_closed("option with wrong magic");
    assert!(took < Duration::from_secs(2), "close took {took:?}");

    // Also after a successful option.
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE);
    c.option(OPT_LIST, &[]);
    assert_eq!(c.opt_reply(OPT_LIST).0, REP_SERVER);
    assert_eq!(c.opt_reply(OPT_LIST), (REP_ACK, vec![]));
    c.send(&Be::new().u64(NBDMAGIC).u32(OPT_LIST).u32(0).0);
    c.expect_closed("second option with NBDMAGIC instead of IHAVEOPT");
}

#[test]
fn option_longer_than_64k_closes_immediately() {
    let server = memory_server();
    // 64 KiB exactly is still accepted (an unknown option: ERR_UNSUP).
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.expect_opt_error(99, &vec![0xAB; 64 * 1024], REP_ERR_UNSUP);
    // One byte more: hard disconnect without reading the payload, and
    // without waiting for it (we never send it).
    for len in [64 * 1024 + 1, 0xffff_ffffu32] {
        let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
        c.send(&Be::new().u64(IHAVEOPT).u32(OPT_GO).u32(len).0);
        let took = c.expect_closed(&format!("option length {len}"));
        assert!(took < Duration::from_secs(2), "server waited {took:?} before closing (length {len})");
    }
    let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
    c.assert_alive(1, "after oversized options");
}

#[test]
fn unknown_option_gets_err_unsup_and_the_session_continues() {
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.option(99, b"some data the server must skip");
    let (typ, msg) = c.opt_reply(99);
    assert_eq!(typ, REP_ERR_UNSUP, "unknown option 99");
    assert!(String::from_utf8(msg).is_ok(), "error data must be a UTF-8 message");
    // Also an unknown option number with the high bit set.
    c.expect_opt_error(0x8000_0001, &[], REP_ERR_UNSUP);
    // The session continues: LIST and GO work.
    c.option(OPT_LIST, &[]);
    assert_eq!(c.opt_reply(OPT_LIST).0, REP_SERVER);
    assert_eq!(c.opt_reply(OPT_LIST), (REP_ACK, vec![]));
    let info = c.go("a");
    assert_eq!(info.size, 64 * MIB);
    c.assert_alive(1, "after unknown options");
}

#[test]
fn starttls_is_refused_with_err_policy() {
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    let msg = c.expect_opt_error(OPT_STARTTLS, &[], REP_ERR_POLICY);
    assert!(!msg.is_empty());
    // Still in plaintext option haggling.
    assert_eq!(c.go("a").size, 64 * MIB);
}

#[test]
fn list_rejects_data_and_lists_every_export_with_its_description() {
    let server = Server::start(&[
        "--export",
        "alpha=memory:?size=1M&description=First%20disk",
        "--export",
        "b=memory:?size=2M",
        "--listen",
        "127.0.0.1:0",
    ]);
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.expect_opt_error(OPT_LIST, b"x", REP_ERR_INVALID);

    c.option(OPT_LIST, &[]);
    let expect_alpha = Be::new().u32(5).raw(b"alpha").raw(b"First disk").0;
    let expect_b = Be::new().u32(1).raw(b"b").0;
    assert_eq!(c.opt_reply(OPT_LIST), (REP_SERVER, expect_alpha));
    assert_eq!(c.opt_reply(OPT_LIST), (REP_SERVER, expect_b));
    assert_eq!(c.opt_reply(OPT_LIST), (REP_ACK, vec![]));
    assert_eq!(c.go("b").size, 2 * MIB);
}

#[test]
fn go_for_a_missing_export_is_err_unknown_and_the_session_continues() {
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.option(OPT_GO, &go_payload("nope", &[]));
    let (typ, msg) = c.opt_reply(OPT_GO);
    assert_eq!(typ, REP_ERR_UNKNOWN, "GO nope: {:?}", String::from_utf8_lossy(&msg));
    let info = c.go("a");
    assert_eq!(info.size, 64 * MIB);
    assert_eq!(info.flags, MEMORY_RW_FLAGS, "transmission flags {:#x}", info.flags);
    c.assert_alive(1, "after GO");
}

#[test]
fn malformed_go_is_err_invalid() {
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    // Name length 100, but only "a" + info count follow.
    c.expect_opt_error(OPT_GO, &Be::new().u32(100).raw(b"a").u16(0).0, REP_ERR_INVALID);
    // Name length that runs exactly past the end (no room for the count).
    c.expect_opt_error(OPT_GO, &Be::new().u32(3).raw(b"a").u16(0).0, REP_ERR_INVALID);
    // Fewer than 6 bytes.
    c.expect_opt_error(OPT_GO, &[0, 0, 0], REP_ERR_INVALID);
    // Info count larger than the list.
    c.expect_opt_error(OPT_GO, &Be::new().u32(1).raw(b"a").u16(2).u16(0).0, REP_ERR_INVALID);
    // Trailing garbage.
    c.expect_opt_error(OPT_GO, &Be::new().u32(1).raw(b"a").u16(0).raw(b"zz").0, REP_ERR_INVALID);
    assert_eq!(c.go("a").size, 64 * MIB);
}

#[test]
fn export_name_with_no_zeroes_sends_exactly_10_bytes() {
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.option(OPT_EXPORT_NAME, b"a");
    let r = c.recv(10);
    assert_eq!(be64(&r), 64 * MIB, "export size");
    assert_eq!(be16(&r[8..]), MEMORY_RW_FLAGS, "transmission flags");
    // The very next bytes must be the reply to our first request: no padding.
    c.request(0, CMD_READ, 0xfeed, 0, 8);
    assert_eq!(c.simple_reply(), (0, 0xfeed));
    assert_eq!(c.recv(8), vec![0u8; 8]);
}

#[test]
fn export_name_without_no_zeroes_sends_134_bytes() {
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE);
    c.option(OPT_EXPORT_NAME, b"a");
    let r = c.recv(134);
    assert_eq!(be64(&r), 64 * MIB, "export size");
    assert_eq!(be16(&r[8..]), MEMORY_RW_FLAGS, "transmission flags");
    assert_eq!(&r[10..], &[0u8; 124][..], "124 reserved zero bytes");
    c.request(0, CMD_READ, 0xfeed, 0, 8);
    assert_eq!(c.simple_reply(), (0, 0xfeed));
    assert_eq!(c.recv(8), vec![0u8; 8]);

    // The empty name selects the default (first) export.
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.option(OPT_EXPORT_NAME, b"");
    assert_eq!(be64(&c.recv(10)), 64 * MIB);
}

#[test]
fn go_never_pads_even_without_no_zeroes() {
    let server = memory_server();
    // Client flags without NO_ZEROES: GO must still not send 124 zeros.
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE);
    let info = c.go("");
    assert_eq!((info.size, info.flags), (64 * MIB, MEMORY_RW_FLAGS), "GO \"\" picks the default export");
    c.request(0, CMD_READ, u64::MAX, 0, 8);
    assert_eq!(c.recv(16), Be::new().u32(SIMPLE_REPLY_MAGIC).u32(0).u64(u64::MAX).0);
    assert_eq!(c.recv(8), vec![0u8; 8]);
}

#[test]
fn export_name_after_extended_headers_closes() {
    // "a client that has used NBD_OPT_EXTENDED_HEADERS ... MUST NOT use
    // this option": the server cannot reply with an error, so it closes.
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.expect_ack(OPT_EXTENDED_HEADERS, &[]);
    c.option(OPT_EXPORT_NAME, b"a");
    c.expect_closed("EXPORT_NAME after EXTENDED_HEADERS");
}

#[test]
fn export_name_for_an_unknown_export_closes() {
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.option(OPT_EXPORT_NAME, b"missing");
    c.expect_closed("EXPORT_NAME missing");
}

#[test]
fn abort_is_acked_then_closed() {
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply(OPT_ABORT), (REP_ACK, vec![]));
    c.expect_closed("after NBD_OPT_ABORT");
}

#[test]
fn handshake_timeout_closes_silent_and_stalled_clients_only() {
    let server = Server::start(&[
        "--export",
        "a=memory:?size=64M",
        "--listen",
        "127.0.0.1:0",
        "--handshake-timeout",
        "1",
    ]);
    let t0 = Instant::now();
    // Sends nothing at all.
    let mut silent = Conn::connect(&server);
    // Sends its flags and half an option header, then stalls.
    let mut half_header = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    half_header.send(&option_bytes(OPT_LIST, &[])[..10]);
    // Sends a full header promising 100 bytes, then only 10.
    let mut half_data = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    half_data.send(&Be::new().u64(IHAVEOPT).u32(99).u32(100).raw(&[7; 10]).0);

    // Meanwhile a normal client is served.
    let (mut good, _) = Conn::open(&server, "a", Style::Structured, false);
    good.write_ok(1, 4096, &data(1, 4096));

    // The silent client got the greeting and then the close.
    silent.greeting();
    for (c, what) in [(&mut silent, "silent"), (&mut half_header, "half header"), (&mut half_data, "half data")] {
        c.expect_closed_within(Duration::from_secs(4), what);
        let at = t0.elapsed();
        assert!(
            at >= Duration::from_millis(900) && at <= Duration::from_secs(3),
            "{what} client closed {at:?} after connecting; expected about 1 s"
        );
    }
    // The timeout covers only the handshake: the good client, now past it,
    // still works.
    assert!(t0.elapsed() > Duration::from_secs(1));
    assert_eq!(good.read(2, 4096, 4096), data(1, 4096));
}

#[test]
fn truncated_handshakes_do_not_affect_other_connections() {
    let server = memory_server();
    // A client in the middle of its own handshake while others vanish.
    let mut good = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    good.expect_ack(OPT_STRUCTURED_REPLY, &[]);

    let cuts: Vec<Vec<u8>> = vec![
        vec![],                                                  // right after connecting
        vec![0, 0],                                              // half the client flags
        Be::new().u32(3).0,                                      // flags only
        Be::new().u32(3).raw(&option_bytes(OPT_GO, &[])[..9]).0, // half an option header
        Be::new().u32(3).u64(IHAVEOPT).u32(OPT_GO).u32(50).raw(&[0, 0, 0, 1, b'a']).0, // half the data
    ];
    for (i, bytes) in cuts.iter().enumerate() {
        let mut c = Conn::connect(&server);
        if i % 2 == 0 {
            c.greeting();
        }
        c.send(bytes);
        drop(c);
    }
    thread::sleep(Duration::from_millis(100));
    let info = good.go("a");
    good.style = Style::Structured;
    assert_eq!(info.flags, MEMORY_RW_FLAGS | F_SEND_DF);
    good.write_ok(1, 0, &data(2, 512));
    assert_eq!(good.read(2, 0, 512), data(2, 512));
    let (mut fresh, _) = Conn::open(&server, "a", Style::Simple, false);
    assert_eq!(fresh.read(3, 0, 512), data(2, 512));
    assert_no_panics(&server);
}

// ===========================================================================
// 4. Transmission: simple replies
// ===========================================================================

#[test]
fn simple_write_then_read_back() {
    let server = memory_server();
    let (mut c, info) = Conn::open(&server, "a", Style::Simple, false);
    assert_eq!((info.size, info.flags), (64 * MIB, MEMORY_RW_FLAGS));
    let d = data(7, 8192);
    // Exact reply bytes of a successful write.
    c.send(&c.write_bytes(0x0102_0304_0506_0708, 12345, &d));
    assert_eq!(c.recv(16), Be::new().u32(SIMPLE_REPLY_MAGIC).u32(0).u64(0x0102_0304_0506_0708).0);
    // Exact reply bytes of a read: header then the data.
    c.request(0, CMD_READ, 0xA1, 12345, 8192);
    assert_eq!(c.recv(16), Be::new().u32(SIMPLE_REPLY_MAGIC).u32(0).u64(0xA1).0);
    assert_eq!(c.recv(8192), d);
    // Unwritten neighbours read as zeros; the last byte of the export reads.
    assert_eq!(c.read(0xA2, 12345 - 100, 100), vec![0; 100]);
    assert_eq!(c.read(0xA3, 64 * MIB - 1, 1), vec![0]);
}

#[test]
fn simple_read_past_end_is_einval_without_payload() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
    c.write_ok(1, 0, &data(1, 512));
    for (cookie, off, len) in [(10, 64 * MIB - 512, 1024u64), (11, 64 * MIB, 1), (12, u64::MAX - 10, 512)] {
        c.request(0, CMD_READ, cookie, off, len);
        assert_eq!(c.simple_reply(), (EINVAL, cookie), "read of {len} at {off}");
        // No payload follows: the next bytes are the next reply.
        c.request(0, CMD_READ, cookie + 100, 0, 512);
        assert_eq!(c.simple_reply(), (0, cookie + 100));
        assert_eq!(c.recv(512), data(1, 512));
    }
}

#[test]
fn simple_write_past_end_is_enospc_and_its_payload_is_consumed() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
    // The payload bytes look like a request header: if the server did not
    // consume them, it would execute them.
    let trap = {
        let mut t = c.header(0, CMD_WRITE, 0xBAD, 0, 4096);
        t.resize(4096, 0x55);
        t
    };
    assert_eq!(c.write(5, 64 * MIB - 2048, &trap), ENOSPC);
    assert_eq!(c.write(6, 64 * MIB, &trap[..1]), ENOSPC);
    // Next request on the same connection works, and the export is untouched.
    assert_eq!(c.read(7, 64 * MIB - 4096, 4096), vec![0; 4096]);
    assert_eq!(c.read(8, 0, 4096), vec![0; 4096]);
}

#[test]
fn simple_unknown_command_and_bad_flags_are_einval() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
    assert_eq!(c.cmd(0, 42, 1, 0, 0), EINVAL, "command 42");
    assert_eq!(c.cmd(0, 42, 2, 4096, 512), EINVAL, "command 42 with a length");
    assert_eq!(c.cmd(0, 0xffff, 3, 0, 0), EINVAL, "command 0xffff");
    // DF is not advertised without structured replies: no data may follow.
    assert_eq!(c.cmd(CMD_FLAG_DF, CMD_READ, 4, 0, 512), EINVAL, "READ with DF");
    assert_eq!(c.cmd(1 << 15, CMD_FLUSH, 5, 0, 0), EINVAL, "FLUSH with flag bit 15");
    assert_eq!(c.cmd(CMD_FLAG_REQ_ONE, CMD_TRIM, 6, 0, 512), EINVAL, "TRIM with REQ_ONE");
    // PAYLOAD_LEN is not valid without extended headers.
    assert_eq!(c.cmd(CMD_FLAG_PAYLOAD_LEN, CMD_FLUSH, 7, 0, 0), EINVAL, "FLUSH with PAYLOAD_LEN");
    // A WRITE with a bad flag is refused and its payload consumed.
    let mut w = c.header(1 << 14, CMD_WRITE, 8, 0, 512);
    w.extend_from_slice(&data(3, 512));
    c.send(&w);
    assert_eq!(c.status(8, 0), EINVAL, "WRITE with flag bit 14");
    assert_eq!(c.read(9, 0, 512), vec![0; 512], "refused write must not have written");
}

#[test]
fn simple_write_larger_than_max_payload_is_refused_and_framing_kept() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
    let len = MAX_PAYLOAD as usize + 1; // 33554433: fits the 64 MiB export
    let mut req = c.header(0, CMD_WRITE, 0x33, 0, len as u64);
    req.extend_from_slice(&vec![0x5A; len]);
    // Read the reply concurrently: a server may reply before consuming.
    let mut rd = c.s.try_clone().unwrap();
    let reader = thread::spawn(move || {
        let mut h = [0u8; 16];
        rd.read_exact(&mut h).map(|_| h)
    });
    c.send(&req);
    let h = reader.join().unwrap().expect("reply to the oversized write");
    assert_eq!(h.to_vec(), Be::new().u32(SIMPLE_REPLY_MAGIC).u32(EINVAL).u64(0x33).0);
    // Framing kept: the next request is understood, nothing was written.
    assert_eq!(c.read(0x34, 0, 4096), vec![0; 4096]);
    c.write_ok(0x35, MAX_PAYLOAD, &data(5, 512));
    assert_eq!(c.read(0x36, MAX_PAYLOAD, 512), data(5, 512));
}

#[test]
fn simple_read_larger_than_max_payload_is_einval_without_payload() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
    c.request(0, CMD_READ, 0x41, 0, MAX_PAYLOAD + 1);
    assert_eq!(c.simple_reply(), (EINVAL, 0x41));
    c.request(0, CMD_READ, 0x42, 0, 16);
    assert_eq!(c.simple_reply(), (0, 0x42), "no payload may follow the error");
    assert_eq!(c.recv(16), vec![0; 16]);
    // Exactly the maximum is served.
    assert_eq!(c.read(0x43, 0, MAX_PAYLOAD).len(), MAX_PAYLOAD as usize);
}

#[test]
fn fua_is_accepted_on_every_command() {
    // "NBD_CMD_FLAG_FUA; This flag is valid for all commands, provided
    // NBD_FLAG_SEND_FUA has been negotiated, in which case the server MUST
    // accept all commands with this bit set".
    let server = memory_server();
    let (mut c, info) = Conn::open(&server, "a", Style::Structured, true);
    assert_ne!(info.flags & F_SEND_FUA, 0);
    let d = data(8, 4096);
    let mut w = c.header(CMD_FLAG_FUA, CMD_WRITE, 1, 0, 4096);
    w.extend_from_slice(&d);
    c.send(&w);
    assert_eq!(c.status(1, 0), 0, "WRITE+FUA");
    c.request(CMD_FLAG_FUA, CMD_READ, 2, 0, 4096);
    let chunks = c.chunks(2);
    assert_eq!(assemble(Style::Structured, 0, 4096, &chunks), d, "READ+FUA");
    assert_eq!(c.cmd(CMD_FLAG_FUA, CMD_FLUSH, 3, 0, 0), 0, "FLUSH+FUA");
    assert_eq!(c.cmd(CMD_FLAG_FUA, CMD_TRIM, 4, 8192, 4096), 0, "TRIM+FUA");
    assert_eq!(c.cmd(CMD_FLAG_FUA, CMD_CACHE, 5, 0, 4096), 0, "CACHE+FUA");
    assert_eq!(c.cmd(CMD_FLAG_FUA, CMD_WRITE_ZEROES, 6, 8192, 4096), 0, "WRITE_ZEROES+FUA");
    c.request(CMD_FLAG_FUA, CMD_BLOCK_STATUS, 7, 0, 4096);
    let (_, ext) = block_status_compact(&c.chunk());
    assert_eq!(ext[0].1, DATA, "BLOCK_STATUS+FUA");
    // CACHE must reject flags it does not recognise.
    assert_eq!(c.cmd(CMD_FLAG_NO_HOLE, CMD_CACHE, 8, 0, 4096), EINVAL, "CACHE+NO_HOLE");
}

#[test]
fn zero_length_requests_do_not_disconnect() {
    // "The client SHOULD NOT request a ... length of 0; the behavior of a
    // server on such a request is unspecified although the server SHOULD
    // NOT disconnect."
    let server = memory_server();
    for style in [Style::Simple, Style::Structured, Style::Extended] {
        let (mut c, _) = Conn::open(&server, "a", style, style != Style::Simple);
        c.request(0, CMD_READ, 1, 4096, 0);
        match style {
            Style::Simple => assert_eq!(c.simple_reply(), (0, 1), "READ of 0 bytes (no data follows)"),
            _ => {
                let chunks = c.chunks(1);
                assert!(chunks.iter().all(|ch| ch.typ == TYPE_NONE || ch.typ & 0x8000 != 0), "{chunks:?}");
            }
        }
        let _ = c.write(2, 4096, &[]);
        let _ = c.cmd(0, CMD_TRIM, 3, 4096, 0);
        let _ = c.cmd(0, CMD_WRITE_ZEROES, 4, 64 * MIB, 0);
        let _ = c.cmd(0, CMD_CACHE, 5, 0, 0);
        if style != Style::Simple {
            assert_eq!(c.cmd(0, CMD_BLOCK_STATUS, 6, 0, 0), EINVAL, "BLOCK_STATUS of 0 bytes");
        }
        c.assert_alive(7, &format!("{style:?}: after zero-length requests"));
    }
}

#[test]
fn readonly_export_refuses_writes_with_eperm() {
    let server = Server::start(&["--export", "ro=memory:?size=1M&readonly=true", "--listen", "127.0.0.1:0"]);
    let (mut c, info) = Conn::open(&server, "ro", Style::Simple, false);
    assert_eq!((info.size, info.flags), (MIB, MEMORY_RO_FLAGS), "flags {:#x}", info.flags);
    assert_eq!(c.write(1, 0, &data(1, 4096)), EPERM, "WRITE");
    assert_eq!(c.cmd(0, CMD_TRIM, 2, 0, 4096), EPERM, "TRIM");
    assert_eq!(c.cmd(0, CMD_WRITE_ZEROES, 3, 0, 4096), EPERM, "WRITE_ZEROES");
    // Reads, flush and cache work.
    assert_eq!(c.read(4, 0, 4096), vec![0; 4096]);
    assert_eq!(c.cmd(0, CMD_FLUSH, 5, 0, 0), 0, "FLUSH");
    assert_eq!(c.cmd(0, CMD_CACHE, 6, 0, 4096), 0, "CACHE");
}

#[test]
fn flush_trim_write_zeroes_and_cache_succeed() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
    c.write_ok(1, 0, &data(1, 256 * 1024));
    assert_eq!(c.cmd(0, CMD_FLUSH, 2, 0, 0), 0, "FLUSH");
    assert_eq!(c.cmd(CMD_FLAG_FUA, CMD_FLUSH, 3, 0, 0), 0, "FLUSH+FUA");
    assert_eq!(c.cmd(0, CMD_CACHE, 4, 0, 256 * 1024), 0, "CACHE");
    assert_eq!(c.cmd(0, CMD_WRITE_ZEROES, 5, 4096, 4096), 0, "WRITE_ZEROES");
    assert_eq!(c.cmd(CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, CMD_WRITE_ZEROES, 6, 16384, 100), 0, "WRITE_ZEROES NO_HOLE");
    assert_eq!(c.cmd(0, CMD_TRIM, 7, 128 * 1024, 128 * 1024), 0, "TRIM");
    // Zeroed ranges read as zeros, the rest is intact.
    let got = c.read(8, 0, 128 * 1024);
    let mut want = data(1, 128 * 1024);
    want[4096..8192].fill(0);
    want[16384..16484].fill(0);
    assert_eq!(got, want);
    // Past the end: WRITE_ZEROES is ENOSPC, TRIM and CACHE are EINVAL.
    assert_eq!(c.cmd(0, CMD_WRITE_ZEROES, 9, 64 * MIB - 512, 1024), ENOSPC);
    assert_eq!(c.cmd(0, CMD_TRIM, 10, 64 * MIB - 512, 1024), EINVAL);
    assert_eq!(c.cmd(0, CMD_CACHE, 11, 64 * MIB, 1), EINVAL);
}

// ===========================================================================
// 5. Transmission: structured replies and block status
// ===========================================================================

#[test]
fn structured_read_of_a_sparse_region_is_one_hole_chunk() {
    let server = memory_server();
    let (mut c, info) = Conn::open(&server, "a", Style::Structured, false);
    assert_eq!(info.flags, MEMORY_RW_FLAGS | F_SEND_DF);
    c.request(0, CMD_READ, 0x77, MIB, 64 * 1024);
    // Exactly: header(DONE, OFFSET_HOLE, cookie, 12) + offset + hole size.
    let want = Be::new()
        .u32(STRUCTURED_REPLY_MAGIC)
        .u16(REPLY_FLAG_DONE)
        .u16(TYPE_OFFSET_HOLE)
        .u64(0x77)
        .u32(12)
        .u64(MIB)
        .u32(64 * 1024)
        .0;
    assert_eq!(c.recv(want.len()), want);
    c.assert_alive(0x78, "after hole read");
}

#[test]
fn structured_read_of_written_and_mixed_regions() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Structured, false);
    let d = data(9, 4096);
    c.write_ok(1, 0x20000, &d);

    // Read of written data: one OFFSET_DATA chunk with the right offset.
    c.request(0, CMD_READ, 2, 0x20000, 4096);
    let want = Be::new()
        .u32(STRUCTURED_REPLY_MAGIC)
        .u16(REPLY_FLAG_DONE)
        .u16(TYPE_OFFSET_DATA)
        .u64(2)
        .u32(8 + 4096)
        .u64(0x20000)
        .raw(&d)
        .0;
    assert_eq!(c.recv(want.len()), want);

    // A region spanning a hole and the data: reassembles correctly, and the
    // 64 KiB never written before the data is sent as a hole, not zeros.
    c.request(0, CMD_READ, 3, 0x10000, 0x20000);
    let chunks = c.chunks(3);
    let got = assemble(Style::Structured, 0x10000, 0x20000, &chunks);
    let mut want = vec![0u8; 0x20000];
    want[0x10000..0x11000].copy_from_slice(&d);
    assert_eq!(got, want);
    let data_bytes: usize = chunks.iter().filter(|c| c.typ == TYPE_OFFSET_DATA).map(|c| c.payload.len() - 8).sum();
    assert!(data_bytes <= 0x10000, "{data_bytes} data bytes sent; the unwritten half must be a hole: {chunks:?}");
    let hole = chunks.iter().find(|c| c.typ == TYPE_OFFSET_HOLE).expect("a hole chunk");
    assert_eq!(be64(&hole.payload), 0x10000, "hole offset");
    assert_eq!(be32(&hole.payload[8..]), 0x10000, "hole size");
    assert!(chunks.last().unwrap().done() && chunks[..chunks.len() - 1].iter().all(|c| !c.done()));
}

#[test]
fn structured_read_past_end_is_an_error_chunk() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Structured, false);
    c.request(0, CMD_READ, 0xE1, 64 * MIB - 512, 1024);
    let chunks = c.chunks(0xE1);
    assert_eq!(chunks.len(), 1, "only an error chunk: {chunks:?}");
    let ch = &chunks[0];
    assert_eq!((ch.flags, ch.typ), (REPLY_FLAG_DONE, TYPE_ERROR));
    let (errno, msg) = ch.error();
    assert_eq!(errno, EINVAL);
    assert!(!msg.is_empty(), "error chunk must carry a message");
    // A bad flag on a READ also gets a structured error, never a simple reply.
    c.request(1 << 13, CMD_READ, 0xE2, 0, 512);
    assert_eq!(c.status(0xE2, 0), EINVAL);
    c.assert_alive(0xE3, "after read errors");
}

#[test]
fn structured_df_read_of_a_mixed_region_is_one_data_chunk() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Structured, false);
    let d = data(4, 4096);
    c.write_ok(1, 0x20000, &d);
    c.request(CMD_FLAG_DF, CMD_READ, 2, 0x18000, 0x10000);
    let chunks = c.chunks(2);
    let content: Vec<_> = chunks.iter().filter(|c| c.typ != TYPE_NONE).collect();
    assert_eq!(content.len(), 1, "DF allows one content chunk: {chunks:?}");
    assert_eq!(content[0].typ, TYPE_OFFSET_DATA, "a mixed region under DF must be OFFSET_DATA");
    assert_eq!(be64(&content[0].payload), 0x18000);
    let mut want = vec![0u8; 0x10000];
    want[0x8000..0x9000].copy_from_slice(&d);
    assert_eq!(&content[0].payload[8..], &want[..]);
    assert_eq!(assemble(Style::Structured, 0x18000, 0x10000, &chunks), want);
}

#[test]
fn block_status_without_a_meta_context_is_einval() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Structured, false);
    assert_eq!(c.cmd(0, CMD_BLOCK_STATUS, 1, 0, 4096), EINVAL);
    c.assert_alive(2, "after block status error");

    // Selecting the context for a different export does not count.
    let server = Server::start(&["--export", "a=memory:?size=1M", "--export", "b=memory:?size=1M", "--listen", "127.0.0.1:0"]);
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.expect_ack(OPT_STRUCTURED_REPLY, &[]);
    c.set_meta_base_allocation("b");
    c.go("a");
    c.style = Style::Structured;
    assert_eq!(c.cmd(0, CMD_BLOCK_STATUS, 3, 0, 4096), EINVAL);

    // A later SET_META_CONTEXT with no queries replaces (clears) the
    // selection: no META_CONTEXT reply, just ACK, and BLOCK_STATUS fails.
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.expect_ack(OPT_STRUCTURED_REPLY, &[]);
    c.set_meta_base_allocation("a");
    c.expect_ack(OPT_SET_META_CONTEXT, &meta_payload("a", &[]));
    c.go("a");
    c.style = Style::Structured;
    assert_eq!(c.cmd(0, CMD_BLOCK_STATUS, 4, 0, 4096), EINVAL);

    // SET_META_CONTEXT before structured replies is refused.
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.expect_opt_error(OPT_SET_META_CONTEXT, &meta_payload("a", &["base:allocation"]), REP_ERR_INVALID);
}

#[test]
fn block_status_base_allocation_reports_data_and_holes() {
    let server = memory_server();
    let (mut c, info) = Conn::open(&server, "a", Style::Structured, true);
    let ctx = info.ctx.unwrap();
    c.write_ok(1, 0x20000, &data(3, 0x10000));

    c.request(0, CMD_BLOCK_STATUS, 2, 0, 0x40000);
    let chunks = c.chunks(2);
    assert_eq!(chunks.len(), 1, "one status chunk for one context: {chunks:?}");
    let (id, ext) = block_status_compact(&chunks[0]);
    assert_eq!(id, ctx, "context id must be the one from NBD_REP_META_CONTEXT");
    assert_eq!(ext, vec![(0x20000, HOLE), (0x10000, DATA), (0x10000, HOLE)]);

    // Starting inside the data.
    c.request(0, CMD_BLOCK_STATUS, 3, 0x28000, 0x10000);
    let (_, ext) = block_status_compact(&c.chunk());
    assert_eq!(ext, vec![(0x8000, DATA), (0x8000, HOLE)]);

    // REQ_ONE: exactly one extent, no longer than the request.
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 4, 0, 0x40000);
    let (id, ext) = block_status_compact(&c.chunk());
    assert_eq!((id, ext), (ctx, vec![(0x20000, HOLE)]));
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 5, 0x20000, 0x1000);
    let (_, ext) = block_status_compact(&c.chunk());
    assert_eq!(ext, vec![(0x1000, DATA)]);

    // Out of range and zero length are EINVAL.
    assert_eq!(c.cmd(0, CMD_BLOCK_STATUS, 6, 64 * MIB - 512, 1024), EINVAL);
    assert_eq!(c.cmd(0, CMD_BLOCK_STATUS, 7, 0, 0), EINVAL);
}

// ===========================================================================
// 6. Transmission: extended headers
// ===========================================================================

#[test]
fn extended_headers_use_32_byte_messages_and_echo_the_offset() {
    let server = memory_server();
    let (mut c, info) = Conn::open(&server, "a", Style::Extended, false);
    assert_eq!(info.flags, MEMORY_RW_FLAGS | F_SEND_DF);
    let d = data(11, 4096);

    // WRITE: a 32-byte request; the reply is exactly one 32-byte NONE chunk.
    c.send(&c.write_bytes(0xC1, 0x21000, &d));
    let want = Be::new().u32(EXTENDED_REPLY_MAGIC).u16(REPLY_FLAG_DONE).u16(TYPE_NONE).u64(0xC1).u64(0x21000).u64(0).0;
    assert_eq!(c.recv(32), want);

    // READ of the data: OFFSET_DATA, header echoes the request offset.
    c.request(0, CMD_READ, 0xC2, 0x21000, 4096);
    let want = Be::new()
        .u32(EXTENDED_REPLY_MAGIC)
        .u16(REPLY_FLAG_DONE)
        .u16(TYPE_OFFSET_DATA)
        .u64(0xC2)
        .u64(0x21000)
        .u64(8 + 4096)
        .u64(0x21000)
        .raw(&d)
        .0;
    assert_eq!(c.recv(want.len()), want);

    // A read starting in a hole: every chunk header carries the REQUEST
    // offset, while payload offsets say where each piece lies.
    c.request(0, CMD_READ, 0xC3, 0x10000, 0x20000);
    let chunks = c.chunks(0xC3);
    for ch in &chunks {
        assert_eq!(ch.offset, Some(0x10000), "chunk header offset: {ch:?}");
    }
    let hole = chunks.iter().find(|c| c.typ == TYPE_OFFSET_HOLE).expect("hole chunk");
    assert_eq!((be64(&hole.payload), be32(&hole.payload[8..])), (0x10000, 0x10000));
    let data_chunk = chunks.iter().find(|c| c.typ == TYPE_OFFSET_DATA).expect("data chunk");
    assert_eq!(be64(&data_chunk.payload), 0x20000, "payload offset of the data");
    let mut want = vec![0u8; 0x20000];
    want[0x11000..0x12000].copy_from_slice(&d);
    assert_eq!(assemble(Style::Extended, 0x10000, 0x20000, &chunks), want);

    // Errors echo the offset too.
    c.request(0, CMD_READ, 0xC4, 64 * MIB - 512, 1024);
    let ch = c.chunk();
    assert_eq!((ch.flags, ch.typ, ch.cookie, ch.offset), (REPLY_FLAG_DONE, TYPE_ERROR, 0xC4, Some(64 * MIB - 512)));
    assert_eq!(ch.error().0, EINVAL);
    assert_eq!(c.cmd(0, CMD_FLUSH, 0xC5, 0, 0), 0);
}

#[test]
fn extended_block_status_uses_block_status_ext_chunks() {
    let server = memory_server();
    let (mut c, info) = Conn::open(&server, "a", Style::Extended, true);
    let ctx = info.ctx.unwrap();
    c.write_ok(1, 0x20000, &data(3, 0x10000));
    c.request(0, CMD_BLOCK_STATUS, 2, 0x10000, 0x30000);
    let ch = c.chunk();
    assert_eq!((ch.cookie, ch.offset), (2, Some(0x10000)));
    let (id, ext) = block_status_ext(&ch);
    assert_eq!(id, ctx);
    assert_eq!(ext, vec![(0x10000, HOLE), (0x10000, DATA), (0x10000, HOLE)]);
    // Exact bytes for REQ_ONE.
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 3, 0x20000, 0x30000);
    let want = Be::new()
        .u32(EXTENDED_REPLY_MAGIC)
        .u16(REPLY_FLAG_DONE)
        .u16(TYPE_BLOCK_STATUS_EXT)
        .u64(3)
        .u64(0x20000)
        .u64(8 + 16)
        .u32(ctx)
        .u32(1)
        .u64(0x10000)
        .u64(DATA as u64)
        .0;
    assert_eq!(c.recv(want.len()), want);
}

#[test]
fn extended_64_bit_effect_lengths_on_a_6t_export() {
    let server = Server::start(&["--export", "big=memory:?size=6T", "--listen", "127.0.0.1:0"]);
    let (mut c, info) = Conn::open(&server, "big", Style::Extended, true);
    assert_eq!(info.size, 6 * TIB);
    let d = data(6, 0x10000);
    let at = 5 * TIB;
    c.write_ok(1, at, &d);
    c.write_ok(2, 4 * GIB, &d);

    // One BLOCK_STATUS over the whole 6 TiB (a 64-bit effect length).
    c.request(0, CMD_BLOCK_STATUS, 3, 0, 6 * TIB);
    let (_, ext) = block_status_ext(&c.chunk());
    assert_eq!(
        ext,
        vec![(4 * GIB, HOLE), (0x10000, DATA), (at - 4 * GIB - 0x10000, HOLE), (0x10000, DATA), (TIB - 0x10000, HOLE)]
    );

    // WRITE_ZEROES of 4 GiB + 64 KiB: a length that does not fit 32 bits.
    assert_eq!(c.cmd(0, CMD_WRITE_ZEROES, 4, 0, 4 * GIB + 0x10000), 0);
    assert_eq!(c.read(5, 4 * GIB, 0x10000), vec![0; 0x10000], "zeroed beyond 4 GiB");
    assert_eq!(c.read(6, at, 0x10000), d, "data at 5 TiB untouched");

    // TRIM of the whole export.
    assert_eq!(c.cmd(0, CMD_TRIM, 7, 0, 6 * TIB), 0);
    c.request(0, CMD_BLOCK_STATUS, 8, 0, 6 * TIB);
    let (_, ext) = block_status_ext(&c.chunk());
    assert_eq!(ext, vec![(6 * TIB, HOLE)]);

    // WRITE_ZEROES of the whole export, after writing again.
    c.write_ok(9, at, &d);
    assert_eq!(c.cmd(CMD_FLAG_FUA, CMD_WRITE_ZEROES, 10, 0, 6 * TIB), 0);
    assert_eq!(c.read(11, at, 0x10000), vec![0; 0x10000]);

    // 64-bit range checks: one byte past the end, and lengths that would
    // look valid if truncated to 32 bits.
    assert_eq!(c.cmd(0, CMD_WRITE_ZEROES, 12, 0x10000, 6 * TIB), ENOSPC);
    assert_eq!(c.cmd(0, CMD_TRIM, 13, 1, 6 * TIB), EINVAL);
    assert_eq!(c.cmd(0, CMD_WRITE_ZEROES, 14, 0, (1 << 32) * 1024 * 1024 + 512), ENOSPC);
    assert_eq!(c.cmd(0, CMD_BLOCK_STATUS, 15, 0, 6 * TIB + 1), EINVAL);
    assert_eq!(c.cmd(0, CMD_WRITE_ZEROES, 16, u64::MAX - 10, 20), ENOSPC, "offset + length overflows u64");
}

#[test]
fn extended_write_with_and_without_payload_len() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Extended, false);
    let d1 = data(21, 4096);
    let d2 = data(22, 4096);
    // Spec form: PAYLOAD_LEN set.
    let mut w = c.header(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 1, 0, 4096);
    w.extend_from_slice(&d1);
    c.send(&w);
    assert_eq!(c.status(1, 0), 0);
    // qemu's form: PAYLOAD_LEN omitted, length is still the payload length.
    let mut w = c.header(0, CMD_WRITE, 2, 4096, 4096);
    w.extend_from_slice(&d2);
    c.send(&w);
    assert_eq!(c.status(2, 4096), 0);
    let mut want = d1.clone();
    want.extend_from_slice(&d2);
    assert_eq!(c.read(3, 0, 8192), want);
    // FUA works with PAYLOAD_LEN.
    let mut w = c.header(CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_FUA, CMD_WRITE, 4, 8192, 512);
    w.extend_from_slice(&d1[..512]);
    c.send(&w);
    assert_eq!(c.status(4, 8192), 0);
    assert_eq!(c.read(5, 8192, 512), d1[..512].to_vec());
}

#[test]
fn extended_payload_len_on_a_non_write_is_einval_and_the_payload_is_consumed() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Extended, true);
    // Payloads shaped like valid requests: executing them would be a bug.
    let trap = c.write_bytes(0xBAD, 0, &data(1, 64));
    for (cookie, typ, off) in [(1, CMD_FLUSH, 0), (2, CMD_READ, 0), (3, CMD_BLOCK_STATUS, 0), (4, CMD_TRIM, 0), (5, CMD_CACHE, 4096)] {
        let mut r = c.header(CMD_FLAG_PAYLOAD_LEN, typ, cookie, off, trap.len() as u64);
        r.extend_from_slice(&trap);
        c.send(&r);
        assert_eq!(c.status(cookie, off), EINVAL, "command {typ} with PAYLOAD_LEN");
        // The next request works, and the trap was not executed.
        assert_eq!(c.read(cookie + 100, 0, 64), vec![0; 64], "after command {typ}");
    }
}

// ===========================================================================
// 7. Pipelining, framing errors, disconnects
// ===========================================================================

/// 64 requests (writes to one region, reads of another written beforehand)
/// in one burst, then all replies: every cookie answered once, data right.
fn pipeline(server: &Server, style: Style, base: u64) {
    let (mut c, _) = Conn::open(server, "a", style, false);
    const N: u64 = 64;
    const BLK: u64 = 4096;
    let read_region = base;
    let write_region = base + N * BLK;
    let setup = data(base, (N * BLK) as usize);
    c.write_ok(1, read_region, &setup);

    let mut burst = Vec::new();
    let mut expect: HashMap<u64, Option<u64>> = HashMap::new(); // cookie -> read offset
    for i in 0..N {
        let cookie = 0xC0DE_0000_0000_0000 | (i << 8) | style as u64;
        if i % 2 == 0 {
            burst.extend(c.write_bytes(cookie, write_region + i * BLK, &data(1000 + i, BLK as usize)));
            expect.insert(cookie, None);
        } else {
            burst.extend(c.header(0, CMD_READ, cookie, read_region + i * BLK, BLK));
            expect.insert(cookie, Some(read_region + i * BLK));
        }
    }
    c.send(&burst);

    let mut answered = HashMap::new();
    let mut partial: HashMap<u64, Vec<Chunk>> = HashMap::new();
    while answered.len() < N as usize {
        let (cookie, result) = match style {
            Style::Simple => {
                let (errno, cookie) = c.simple_reply();
                assert_eq!(errno, 0, "cookie {cookie:#x}");
                let read = *expect.get(&cookie).unwrap_or_else(|| panic!("reply for unknown cookie {cookie:#x}"));
                (cookie, read.map(|_| c.recv(BLK as usize)))
            }
            _ => {
                let ch = c.chunk();
                let cookie = ch.cookie;
                let read = *expect.get(&cookie).unwrap_or_else(|| panic!("chunk for unknown cookie {cookie:#x}"));
                assert!(!answered.contains_key(&cookie), "chunk after DONE for cookie {cookie:#x}");
                let done = ch.done();
                partial.entry(cookie).or_default().push(ch);
                if !done {
                    continue;
                }
                let chunks = partial.remove(&cookie).unwrap();
                match read {
                    Some(off) => (cookie, Some(assemble(style, off, BLK, &chunks))),
                    None => {
                        assert_eq!(chunks.len(), 1);
                        assert_eq!(chunks[0].typ, TYPE_NONE, "write reply: {chunks:?}");
                        (cookie, None)
                    }
                }
            }
        };
        assert!(answered.insert(cookie, result).is_none(), "cookie {cookie:#x} answered twice");
    }
    for (cookie, result) in &answered {
        if let Some(off) = expect[cookie] {
            let i = (off - read_region) / BLK;
            let want = &setup[(i * BLK) as usize..((i + 1) * BLK) as usize];
            assert_eq!(result.as_deref(), Some(want), "read reply for cookie {cookie:#x}");
        }
    }
    // Nothing extra was sent, and the writes landed.
    c.expect_silence(Duration::from_millis(100), "after the last reply");
    let all = c.read(2, write_region, N * BLK);
    for i in (0..N).step_by(2) {
        assert_eq!(&all[(i * BLK) as usize..((i + 1) * BLK) as usize], &data(1000 + i, BLK as usize)[..], "write {i}");
    }
}

#[test]
fn pipelining_64_requests_in_one_burst() {
    let server = memory_server();
    pipeline(&server, Style::Simple, 0);
    pipeline(&server, Style::Structured, 8 * MIB);
    pipeline(&server, Style::Extended, 16 * MIB);
}

#[test]
fn wrong_request_magic_closes_the_connection() {
    let server = memory_server();
    // Compact session: a bad magic, and an extended magic.
    for magic in [0xdead_beefu32, EXTENDED_REQUEST_MAGIC, SIMPLE_REPLY_MAGIC] {
        let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
        c.assert_alive(1, "before bad magic");
        let mut h = c.header(0, CMD_READ, 2, 0, 512);
        h[..4].copy_from_slice(&magic.to_be_bytes());
        c.send(&h);
        c.expect_closed(&format!("request magic {magic:#x} on a compact session"));
    }
    // Extended session: the compact magic is wrong there.
    let (mut c, _) = Conn::open(&server, "a", Style::Extended, false);
    let mut h = c.header(0, CMD_READ, 2, 0, 512);
    h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    c.send(&h);
    c.expect_closed("compact magic on an extended session");
    let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
    c.assert_alive(3, "fresh connection");
}

#[test]
fn truncated_requests_do_not_hurt_the_server() {
    let server = memory_server();
    for style in [Style::Simple, Style::Structured, Style::Extended] {
        // Half a header.
        let (mut c, _) = Conn::open(&server, "a", style, false);
        let h = c.header(0, CMD_READ, 1, 0, 512);
        c.send(&h[..h.len() / 2]);
        drop(c);
        // A write header with only part of its payload.
        let (mut c, _) = Conn::open(&server, "a", style, false);
        let w = c.write_bytes(2, 0, &data(1, 65536));
        c.send(&w[..w.len() - 1000]);
        drop(c);
    }
    thread::sleep(Duration::from_millis(100));
    let (mut c, _) = Conn::open(&server, "a", Style::Structured, false);
    assert_eq!(c.read(3, 0, 65536), vec![0; 65536], "a truncated write must not be applied");
    let mut server = server;
    assert!(server.is_running());
    assert_no_panics(&server);
}

#[test]
fn disc_answers_earlier_requests_then_closes() {
    let server = memory_server();
    for style in [Style::Simple, Style::Structured, Style::Extended] {
        let (mut c, _) = Conn::open(&server, "a", style, false);
        let d = data(31, 65536);
        let mut burst = c.write_bytes(1, 0, &d);
        burst.extend(c.header(0, CMD_READ, 2, 0x100000, 65536));
        burst.extend(c.header(0, CMD_FLUSH, 3, 0, 0));
        burst.extend(c.header(0, CMD_DISC, 4, 0, 0));
        c.send(&burst);
        let mut seen = Vec::new();
        match style {
            Style::Simple => {
                for _ in 0..3 {
                    let (errno, cookie) = c.simple_reply();
                    assert_eq!(errno, 0);
                    if cookie == 2 {
                        assert_eq!(c.recv(65536), vec![0; 65536]);
                    }
                    seen.push(cookie);
                }
            }
            _ => {
                // Chunks of different replies may interleave: group them.
                let mut partial: HashMap<u64, Vec<Chunk>> = HashMap::new();
                while seen.len() < 3 {
                    let ch = c.chunk();
                    let cookie = ch.cookie;
                    let done = ch.done();
                    partial.entry(cookie).or_default().push(ch);
                    if !done {
                        continue;
                    }
                    let chunks = partial.remove(&cookie).unwrap();
                    if cookie == 2 {
                        assert_eq!(assemble(style, 0x100000, 65536, &chunks), vec![0; 65536]);
                    } else {
                        assert_eq!(chunks.len(), 1, "{chunks:?}");
                        assert_eq!(chunks[0].typ, TYPE_NONE, "{chunks:?}");
                    }
                    seen.push(cookie);
                }
                assert!(partial.is_empty(), "unfinished replies: {partial:?}");
            }
        }
        seen.sort();
        assert_eq!(seen, vec![1, 2, 3], "{style:?}: every request before DISC answered once");
        c.expect_closed(&format!("{style:?}: after NBD_CMD_DISC (which has no reply)"));
        // The write before DISC was applied.
        let (mut c2, _) = Conn::open(&server, "a", Style::Simple, false);
        assert_eq!(c2.read(5, 0, 65536), d);
    }
}

// ===========================================================================
// 8. Robustness: garbage from many clients
// ===========================================================================

/// One hostile session on export "junk": random bytes, either during the
/// handshake or after a valid one (then often with a valid request magic
/// and random fields). Returns false if the server failed to close the
/// connection after we half-closed it.
fn garbage_session(addr: SocketAddr, rng: &mut Rng) -> bool {
    let junk_size = 256 * MIB;
    let mode = rng.below(4);
    let (mut c, style) = if mode == 0 {
        let mut c = Conn::connect_addr(addr);
        c.greeting();
        if rng.below(2) == 0 {
            c.send(&3u32.to_be_bytes());
        }
        (c, None)
    } else {
        let style = [Style::Simple, Style::Structured, Style::Extended][rng.below(3) as usize];
        let meta = style != Style::Simple && rng.below(2) == 0;
        let (c, info) = Conn::open_addr(addr, "junk", style, meta);
        assert_eq!(info.size, junk_size);
        (c, Some(style))
    };
    c.s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    // Drain whatever the server replies so it never blocks on us.
    let mut rd = c.s.try_clone().unwrap();
    rd.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
    let drain = thread::spawn(move || {
        let mut b = vec![0u8; 65536];
        loop {
            match rd.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) => return !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            }
        }
    });
    for _ in 0..1 + rng.below(40) {
        let piece = match style {
            Some(style) if rng.below(3) != 0 => {
                // A well-framed header with random contents.
                let flags = if rng.below(2) == 0 { rng.next() as u16 & 0x3f } else { rng.next() as u16 };
                let typ = if rng.below(4) == 0 { rng.next() as u16 } else { rng.below(9) as u16 };
                let offset = match rng.below(3) {
                    0 => rng.below(junk_size),
                    1 => junk_size - rng.below(8192),
                    _ => rng.next(),
                };
                let len = match rng.below(4) {
                    0 | 1 => rng.below(8192),
                    2 => rng.below(1 << 26),
                    _ => rng.next(),
                };
                let mut h = if style == Style::Extended {
                    Be::new().u32(EXTENDED_REQUEST_MAGIC).u16(flags).u16(typ).u64(rng.next()).u64(offset).u64(len).0
                } else {
                    Be::new().u32(REQUEST_MAGIC).u16(flags).u16(typ).u64(rng.next()).u64(offset).u32(len as u32).0
                };
                let payload = rng.below(2) * rng.below(len.min(8192) + 1);
                h.extend(rng.bytes(payload as usize));
                h
            }
            _ => {
                let n = 1 + rng.below(300) as usize;
                rng.bytes(n)
            }
        };
        if c.s.write_all(&piece).is_err() {
            break; // the server hung up on us: fine
        }
    }
    let _ = c.s.shutdown(Shutdown::Write);
    drain.join().unwrap()
}

#[test]
fn garbage_from_20_clients_does_not_affect_a_well_behaved_client() {
    let server = Server::start(&[
        "--export",
        "good=memory:?size=16M",
        "--export",
        "junk=memory:?size=256M",
        "--listen",
        "127.0.0.1:0",
    ]);
    let addr = server.tcp_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let sessions = Arc::new(AtomicUsize::new(0));
    let hostile: Vec<_> = (0..20u64)
        .map(|i| {
            let stop = stop.clone();
            let sessions = sessions.clone();
            thread::spawn(move || {
                let mut rng = Rng::new(0x5EED_0000 + i);
                let mut stuck = 0;
                while !stop.load(Ordering::Relaxed) {
                    if !garbage_session(addr, &mut rng) {
                        stuck += 1;
                    }
                    sessions.fetch_add(1, Ordering::Relaxed);
                }
                stuck
            })
        })
        .collect();

    // The well-behaved client: write, read back, verify, for ~1.5 s.
    let (mut good, _) = Conn::open(&server, "good", Style::Structured, true);
    let mut rng = Rng::new(42);
    let t0 = Instant::now();
    let mut ops = 0u64;
    let mut shadow = vec![0u8; 16 * MIB as usize];
    while t0.elapsed() < Duration::from_millis(1500) || ops < 20 {
        let off = rng.below(16 * MIB / 4096 - 4) * 4096;
        let d = data(ops, 4096 + rng.below(3) as usize * 4096);
        good.write_ok(2 * ops + 1, off, &d);
        shadow[off as usize..off as usize + d.len()].copy_from_slice(&d);
        let rd_off = rng.below(16 * MIB / 4096 - 4) * 4096;
        let got = good.read(2 * ops + 2, rd_off, 16384);
        assert_eq!(got, &shadow[rd_off as usize..rd_off as usize + 16384], "good client read at {rd_off}");
        ops += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let stuck: usize = hostile.into_iter().map(|t| t.join().expect("hostile client thread")).sum();
    let n = sessions.load(Ordering::Relaxed);
    assert!(n >= 20, "only {n} hostile sessions ran");
    assert_eq!(stuck, 0, "{stuck} of {n} hostile connections were not closed after the client half-closed them");

    // The server is alive, the good session still works, new ones too.
    let mut server = server;
    assert!(server.is_running(), "server died\n{}", server.logs());
    assert_no_panics(&server);
    assert_eq!(good.read(1, 0, 4096), &shadow[..4096]);
    let (mut fresh, _) = Conn::open(&server, "good", Style::Simple, false);
    assert_eq!(fresh.read(1, 8192, 4096), &shadow[8192..12288]);
}
