//! A raw NBD client for the byte-level protocol tests (`raw_handshake.rs`,
//! `raw_transmission.rs`): the real `longwire serve` binary driven over a
//! `std::net::TcpStream` with hand-built, big-endian bytes.
//!
//! * Every socket has read and write timeouts ([`IO_TIMEOUT`]), so a server
//!   that stops answering makes a test fail instead of hanging.
//! * The wire constants are written out here from the NBD spec (`doc/proto.md`
//!   with the extended-headers extension) rather than imported from the
//!   server crates: the tests must not share the code under test, so a wrong
//!   constant on the server side cannot hide itself.
//! * The helpers assert the framing they read (magics, echoed option and
//!   cookie, lengths), so a test only spells out what it is about.

use super::{pattern, Server, MIB};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

// ===========================================================================
// Wire constants (from the NBD spec)
// ===========================================================================

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (server) / client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const F_HAS_FLAGS: u16 = 1 << 0;
pub const F_READ_ONLY: u16 = 1 << 1;
pub const F_SEND_FLUSH: u16 = 1 << 2;
pub const F_SEND_FUA: u16 = 1 << 3;
pub const F_SEND_TRIM: u16 = 1 << 5;
pub const F_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const F_SEND_DF: u16 = 1 << 7;
pub const F_CAN_MULTI_CONN: u16 = 1 << 8;
pub const F_SEND_CACHE: u16 = 1 << 10;
pub const F_SEND_FAST_ZERO: u16 = 1 << 11;

/// What a writable memory export advertises without structured replies.
pub const MEMORY_RW_FLAGS: u16 = F_HAS_FLAGS
    | F_SEND_FLUSH
    | F_SEND_FUA
    | F_SEND_TRIM
    | F_SEND_WRITE_ZEROES
    | F_CAN_MULTI_CONN
    | F_SEND_CACHE
    | F_SEND_FAST_ZERO;
/// What a read-only memory export advertises without structured replies.
pub const MEMORY_RO_FLAGS: u16 =
    F_HAS_FLAGS | F_READ_ONLY | F_SEND_FLUSH | F_SEND_FUA | F_CAN_MULTI_CONN | F_SEND_CACHE;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR + 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR + 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR + 3;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR + 6;

// NBD_INFO_* items of NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const TYPE_NONE: u16 = 0;
pub const TYPE_OFFSET_DATA: u16 = 1;
pub const TYPE_OFFSET_HOLE: u16 = 2;
pub const TYPE_BLOCK_STATUS: u16 = 5;
pub const TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const TYPE_ERROR: u16 = (1 << 15) + 1;
pub const TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// base:allocation status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
pub const HOLE: u32 = STATE_HOLE | STATE_ZERO;
pub const DATA: u32 = 0;

// Error values.
pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// The spec's default / longwire's maximum payload (32 MiB).
pub const MAX_PAYLOAD: u64 = 32 * MIB;

/// Per-read/-write socket timeout: nothing here may hang.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

// ===========================================================================
// Encoding and decoding
// ===========================================================================

/// Minimal big-endian byte builder: `Be::new().u64(IHAVEOPT).u32(7).0`.
#[derive(Default)]
pub struct Be(pub Vec<u8>);

impl Be {
    pub fn new() -> Self {
        Be(Vec::new())
    }
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// The 18 bytes the server must open with.
pub fn expected_greeting() -> Vec<u8> {
    Be::new()
        .u64(NBDMAGIC)
        .u64(IHAVEOPT)
        .u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        .0
}

/// An option request: IHAVEOPT, option, length, data.
pub fn option_bytes(opt: u32, data: &[u8]) -> Vec<u8> {
    Be::new()
        .u64(IHAVEOPT)
        .u32(opt)
        .u32(data.len() as u32)
        .raw(data)
        .0
}

/// NBD_OPT_GO / NBD_OPT_INFO payload: name, then the requested NBD_INFO items.
pub fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = Be::new()
        .u32(name.len() as u32)
        .raw(name.as_bytes())
        .u16(infos.len() as u16);
    for &i in infos {
        b = b.u16(i);
    }
    b.0
}

/// NBD_OPT_SET_META_CONTEXT / LIST_META_CONTEXT payload.
pub fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = Be::new()
        .u32(export.len() as u32)
        .raw(export.as_bytes())
        .u32(queries.len() as u32);
    for q in queries {
        b = b.u32(q.len() as u32).raw(q.as_bytes());
    }
    b.0
}

/// A compact (28-byte header) request.
pub fn compact_request(flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    Be::new()
        .u32(REQUEST_MAGIC)
        .u16(flags)
        .u16(typ)
        .u64(cookie)
        .u64(offset)
        .u32(len)
        .0
}

/// An extended (32-byte header) request.
pub fn extended_request(flags: u16, typ: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
    Be::new()
        .u32(EXTENDED_REQUEST_MAGIC)
        .u16(flags)
        .u16(typ)
        .u64(cookie)
        .u64(offset)
        .u64(len)
        .0
}

/// The NBD_INFO_EXPORT item of an INFO/GO reply: (size, transmission flags).
pub fn export_info(items: &[(u16, Vec<u8>)]) -> (u64, u16) {
    let e = items
        .iter()
        .find(|(t, _)| *t == INFO_EXPORT)
        .unwrap_or_else(|| panic!("no NBD_INFO_EXPORT in {items:?}"));
    assert_eq!(
        e.1.len(),
        10,
        "NBD_INFO_EXPORT is 12 bytes (type, size, flags)"
    );
    (be64(&e.1), be16(&e.1[8..]))
}

/// The payload of the NBD_INFO item `typ` (after the 2-byte type), if sent.
pub fn info_item(items: &[(u16, Vec<u8>)], typ: u16) -> Option<&[u8]> {
    items
        .iter()
        .find(|(t, _)| *t == typ)
        .map(|(_, d)| d.as_slice())
}

/// The NBD_INFO items of an INFO/GO reply: (type, payload after the type).
pub type InfoItems = Vec<(u16, Vec<u8>)>;

/// Reply style agreed in the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    Simple,
    Structured,
    Extended,
}

/// What NBD_OPT_GO told us.
#[derive(Debug, Clone, Copy)]
pub struct GoInfo {
    pub size: u64,
    pub flags: u16,
    /// Context id the server assigned to base:allocation, if selected.
    pub ctx: Option<u32>,
}

/// One structured or extended reply chunk.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    /// Extended headers only: the echoed request offset.
    pub offset: Option<u64>,
    pub payload: Vec<u8>,
}

impl Chunk {
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }

    /// (errno, message) of an NBD_REPLY_TYPE_ERROR chunk, checking its framing.
    pub fn error(&self) -> (u32, String) {
        assert_eq!(
            self.typ, TYPE_ERROR,
            "expected an NBD_REPLY_TYPE_ERROR chunk, got {self:?}"
        );
        assert!(
            self.payload.len() >= 6,
            "error chunk payload shorter than 6 bytes: {self:?}"
        );
        let errno = be32(&self.payload);
        let msg_len = be16(&self.payload[4..]) as usize;
        assert_eq!(
            msg_len,
            self.payload.len() - 6,
            "error chunk message length {msg_len} does not match chunk length {}",
            self.payload.len()
        );
        let msg =
            String::from_utf8(self.payload[6..].to_vec()).expect("error message is not UTF-8");
        (errno, msg)
    }
}

// ===========================================================================
// The client
// ===========================================================================

/// A raw NBD client connection (TCP, with [`IO_TIMEOUT`] on every read and
/// write). `style` selects how requests are encoded and replies parsed.
pub struct Conn {
    pub s: TcpStream,
    pub style: Style,
}

impl Conn {
    /// Connect without reading anything.
    pub fn connect_addr(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        Conn {
            s,
            style: Style::Simple,
        }
    }

    /// Connect to the server's TCP listener without reading anything.
    pub fn connect(server: &Server) -> Conn {
        Self::connect_addr(server.tcp_addr())
    }

    /// Connect, check the greeting, send `client_flags`.
    pub fn start(server: &Server, client_flags: u32) -> Conn {
        let mut c = Self::connect(server);
        c.greeting();
        c.send(&client_flags.to_be_bytes());
        c
    }

    /// Connect and negotiate `export` in `style`; with `meta`, also select
    /// base:allocation. Asserts every step.
    pub fn open(server: &Server, export: &str, style: Style, meta: bool) -> (Conn, GoInfo) {
        Self::open_addr(server.tcp_addr(), export, style, meta)
    }

    pub fn open_addr(addr: SocketAddr, export: &str, style: Style, meta: bool) -> (Conn, GoInfo) {
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

    pub fn send(&mut self, b: &[u8]) {
        self.s
            .write_all(b)
            .unwrap_or_else(|e| panic!("sending {} bytes to the server failed: {e}", b.len()));
    }

    pub fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s
            .read_exact(&mut v)
            .unwrap_or_else(|e| panic!("expected {n} bytes from the server: {e}"));
        v
    }

    /// Read the 18-byte greeting and check it byte for byte.
    pub fn greeting(&mut self) {
        let g = self.recv(18);
        assert_eq!(g, expected_greeting(), "greeting bytes");
    }

    /// Wait (at most `limit`) for the server to close the connection without
    /// sending anything more. Returns how long it took.
    pub fn expect_closed_within(&mut self, limit: Duration, what: &str) -> Duration {
        let t0 = Instant::now();
        self.s.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 256];
        let r = self.s.read(&mut buf);
        let took = t0.elapsed();
        match r {
            Ok(0) => {}
            Ok(n) => panic!(
                "{what}: expected the server to close the connection, but it sent {n} bytes: {:02x?}",
                &buf[..n]
            ),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: the server kept the connection open for {took:?} (expected it to close)")
            }
            Err(e) => panic!("{what}: expected a close, read failed: {e}"),
        }
        took
    }

    /// [`Conn::expect_closed_within`] with [`IO_TIMEOUT`].
    pub fn expect_closed(&mut self, what: &str) -> Duration {
        self.expect_closed_within(IO_TIMEOUT, what)
    }

    /// Assert that nothing at all arrives within `wait`.
    pub fn expect_silence(&mut self, wait: Duration, what: &str) {
        self.s.set_read_timeout(Some(wait)).unwrap();
        let mut b = [0u8; 64];
        match self.s.read(&mut b) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Ok(0) => panic!("{what}: the server closed the connection"),
            Ok(n) => panic!(
                "{what}: unexpected {n} bytes from the server: {:02x?}",
                &b[..n]
            ),
            Err(e) => panic!("{what}: {e}"),
        }
        self.s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    }

    // -- options ------------------------------------------------------------

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        self.send(&option_bytes(opt, data));
    }

    /// Read one option reply to `opt`: (reply type, data).
    pub fn opt_reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        let h = self.recv(20);
        assert_eq!(be64(&h), OPT_REPLY_MAGIC, "option reply magic in {h:02x?}");
        assert_eq!(be32(&h[8..]), opt, "option reply must echo the option");
        let typ = be32(&h[12..]);
        let len = be32(&h[16..]) as usize;
        assert!(
            len <= 64 * 1024,
            "option reply of {len} bytes is implausible"
        );
        (typ, self.recv(len))
    }

    /// Send `opt` and expect exactly one NBD_REP_ACK with no data.
    pub fn expect_ack(&mut self, opt: u32, data: &[u8]) {
        self.option(opt, data);
        assert_eq!(
            self.opt_reply(opt),
            (REP_ACK, vec![]),
            "reply to option {opt}"
        );
    }

    /// Send `opt` and expect a single error reply of type `err` whose data
    /// is a UTF-8 message. Returns the message.
    pub fn expect_opt_error(&mut self, opt: u32, data: &[u8], err: u32) -> String {
        self.option(opt, data);
        let (typ, msg) = self.opt_reply(opt);
        assert_eq!(
            typ,
            err,
            "reply type to option {opt} (message {:?})",
            String::from_utf8_lossy(&msg)
        );
        String::from_utf8(msg).expect("error message is UTF-8")
    }

    /// SET_META_CONTEXT base:allocation; returns the assigned context id.
    pub fn set_meta_base_allocation(&mut self, export: &str) -> u32 {
        self.option(
            OPT_SET_META_CONTEXT,
            &meta_payload(export, &["base:allocation"]),
        );
        let (typ, d) = self.opt_reply(OPT_SET_META_CONTEXT);
        assert_eq!(
            typ, REP_META_CONTEXT,
            "SET_META_CONTEXT must select base:allocation"
        );
        assert_eq!(
            &d[4..],
            b"base:allocation",
            "META_CONTEXT reply names the context"
        );
        let id = be32(&d);
        assert_eq!(
            self.opt_reply(OPT_SET_META_CONTEXT),
            (REP_ACK, vec![]),
            "SET_META_CONTEXT ends with ACK"
        );
        id
    }

    /// NBD_OPT_INFO or NBD_OPT_GO (`opt`) for `name`, requesting `infos`.
    /// On ACK returns every NBD_INFO item as (type, payload after the type);
    /// on an error reply returns (error type, message).
    pub fn info_go(
        &mut self,
        opt: u32,
        name: &str,
        infos: &[u16],
    ) -> Result<InfoItems, (u32, String)> {
        self.option(opt, &go_payload(name, infos));
        let mut items = Vec::new();
        loop {
            let (typ, d) = self.opt_reply(opt);
            match typ {
                REP_INFO => {
                    assert!(d.len() >= 2, "NBD_REP_INFO without a type");
                    items.push((be16(&d), d[2..].to_vec()));
                }
                REP_ACK => {
                    assert!(d.is_empty(), "ACK with data");
                    return Ok(items);
                }
                t if t & REP_FLAG_ERROR != 0 => {
                    return Err((t, String::from_utf8_lossy(&d).into_owned()))
                }
                t => panic!("unexpected reply type {t:#x} to option {opt} for {name:?}"),
            }
        }
    }

    /// NBD_OPT_INFO that must succeed; returns the NBD_INFO items.
    pub fn info(&mut self, name: &str, infos: &[u16]) -> InfoItems {
        self.info_go(OPT_INFO, name, infos)
            .unwrap_or_else(|(t, m)| panic!("INFO {name:?} failed with reply type {t:#x}: {m:?}"))
    }

    /// NBD_OPT_GO for `name`; asserts success and returns size and flags.
    pub fn go(&mut self, name: &str) -> GoInfo {
        let items = self
            .info_go(OPT_GO, name, &[])
            .unwrap_or_else(|(t, m)| panic!("GO {name:?} failed with reply type {t:#x}: {m:?}"));
        let (size, flags) = export_info(&items);
        GoInfo {
            size,
            flags,
            ctx: None,
        }
    }

    // -- requests -----------------------------------------------------------

    /// Encode a request header in the negotiated style (compact or extended).
    pub fn header(&self, flags: u16, typ: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
        if self.style == Style::Extended {
            extended_request(flags, typ, cookie, offset, len)
        } else {
            let len32 = u32::try_from(len).expect("compact requests have 32-bit lengths");
            compact_request(flags, typ, cookie, offset, len32)
        }
    }

    pub fn request(&mut self, flags: u16, typ: u16, cookie: u64, offset: u64, len: u64) {
        let h = self.header(flags, typ, cookie, offset, len);
        self.send(&h);
    }

    /// Bytes of a WRITE request (PAYLOAD_LEN set when extended).
    pub fn write_bytes(&self, cookie: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
        let flags = if self.style == Style::Extended {
            CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        };
        let mut b = self.header(flags, CMD_WRITE, cookie, offset, payload.len() as u64);
        b.extend_from_slice(payload);
        b
    }

    // -- replies ------------------------------------------------------------

    /// A 16-byte simple reply header: (errno, cookie).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let h = self.recv(16);
        assert_eq!(
            be32(&h),
            SIMPLE_REPLY_MAGIC,
            "simple reply magic in {h:02x?}"
        );
        (be32(&h[4..]), be64(&h[8..]))
    }

    /// One structured (20-byte header) or extended (32-byte header) chunk,
    /// whichever the negotiated style requires.
    pub fn chunk(&mut self) -> Chunk {
        match self.style {
            Style::Simple => panic!("no chunks without structured replies"),
            Style::Structured => {
                let h = self.recv(20);
                assert_eq!(
                    be32(&h),
                    STRUCTURED_REPLY_MAGIC,
                    "structured reply magic in {h:02x?}"
                );
                let len = be32(&h[16..]) as usize;
                assert!(
                    len as u64 <= MAX_PAYLOAD + 64,
                    "chunk length {len} is implausible"
                );
                Chunk {
                    flags: be16(&h[4..]),
                    typ: be16(&h[6..]),
                    cookie: be64(&h[8..]),
                    offset: None,
                    payload: self.recv(len),
                }
            }
            Style::Extended => {
                let h = self.recv(32);
                assert_eq!(
                    be32(&h),
                    EXTENDED_REPLY_MAGIC,
                    "extended reply magic in {h:02x?}"
                );
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
    pub fn chunks(&mut self, cookie: u64) -> Vec<Chunk> {
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
    pub fn status(&mut self, cookie: u64, req_offset: u64) -> u32 {
        match self.style {
            Style::Simple => {
                let (errno, got) = self.simple_reply();
                assert_eq!(got, cookie, "simple reply cookie");
                errno
            }
            _ => {
                let c = self.chunk();
                assert_eq!(c.cookie, cookie, "reply cookie in {c:?}");
                assert!(
                    c.done(),
                    "a single-chunk reply must have NBD_REPLY_FLAG_DONE: {c:?}"
                );
                if self.style == Style::Extended {
                    assert_eq!(
                        c.offset,
                        Some(req_offset),
                        "extended reply must echo the request offset: {c:?}"
                    );
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
    pub fn cmd(&mut self, flags: u16, typ: u16, cookie: u64, offset: u64, len: u64) -> u32 {
        self.request(flags, typ, cookie, offset, len);
        self.status(cookie, offset)
    }

    /// WRITE and return its error value.
    pub fn write(&mut self, cookie: u64, offset: u64, payload: &[u8]) -> u32 {
        let b = self.write_bytes(cookie, offset, payload);
        self.send(&b);
        self.status(cookie, offset)
    }

    pub fn write_ok(&mut self, cookie: u64, offset: u64, payload: &[u8]) {
        assert_eq!(
            self.write(cookie, offset, payload),
            0,
            "write of {} bytes at {offset}",
            payload.len()
        );
    }

    /// READ that must succeed; returns the data (reassembled from chunks
    /// in structured styles).
    pub fn read(&mut self, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
        self.request(0, CMD_READ, cookie, offset, len);
        match self.style {
            Style::Simple => {
                let (errno, got) = self.simple_reply();
                assert_eq!(
                    (errno, got),
                    (0, cookie),
                    "simple read reply (errno, cookie)"
                );
                self.recv(len as usize)
            }
            _ => {
                let chunks = self.chunks(cookie);
                assemble(self.style, offset, len, &chunks)
            }
        }
    }

    /// A follow-up READ proving that framing is intact.
    pub fn assert_alive(&mut self, cookie: u64, what: &str) {
        let got = self.read(cookie, 0, 512);
        assert_eq!(got.len(), 512, "{what}: connection no longer usable");
    }
}

/// Reassemble the content chunks of a successful structured read of
/// `[offset, offset+len)`: checks bounds, non-overlap, full coverage, no
/// error chunks and (extended) the echoed request offset.
pub fn assemble(style: Style, offset: u64, len: u64, chunks: &[Chunk]) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    let mut covered = vec![false; len as usize];
    for c in chunks {
        if style == Style::Extended {
            assert_eq!(
                c.offset,
                Some(offset),
                "extended chunk must echo the request offset: {c:?}"
            );
        }
        let (at, n) = match c.typ {
            TYPE_OFFSET_DATA => {
                assert!(
                    c.payload.len() >= 9,
                    "OFFSET_DATA chunk must be at least 9 bytes"
                );
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
        assert!(
            at >= offset && at + n <= offset + len,
            "chunk [{at}, +{n}) outside the request [{offset}, +{len})"
        );
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
        panic!(
            "read reply does not cover offset {} (chunks: {chunks:?})",
            offset + i as u64
        );
    }
    buf
}

/// Decode a compact NBD_REPLY_TYPE_BLOCK_STATUS chunk: (context, extents).
pub fn block_status_compact(c: &Chunk) -> (u32, Vec<(u64, u32)>) {
    assert_eq!(
        c.typ, TYPE_BLOCK_STATUS,
        "expected a BLOCK_STATUS chunk: {c:?}"
    );
    assert!(c.done(), "block status chunk must be final (one context)");
    let p = &c.payload;
    assert!(
        p.len() >= 12 && (p.len() - 4).is_multiple_of(8),
        "BLOCK_STATUS length {} is not 4 + 8n",
        p.len()
    );
    let ext = p[4..]
        .chunks(8)
        .map(|d| (be32(d) as u64, be32(&d[4..])))
        .collect();
    (be32(p), ext)
}

/// Decode an NBD_REPLY_TYPE_BLOCK_STATUS_EXT chunk: (context, extents).
pub fn block_status_ext(c: &Chunk) -> (u32, Vec<(u64, u32)>) {
    assert_eq!(
        c.typ, TYPE_BLOCK_STATUS_EXT,
        "expected a BLOCK_STATUS_EXT chunk: {c:?}"
    );
    assert!(c.done(), "block status chunk must be final (one context)");
    let p = &c.payload;
    assert!(
        p.len() >= 24 && (p.len() - 8).is_multiple_of(16),
        "BLOCK_STATUS_EXT length {} is not 8 + 16n",
        p.len()
    );
    let count = be32(&p[4..]) as usize;
    assert_eq!(
        count * 16 + 8,
        p.len(),
        "descriptor count must match the chunk length"
    );
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

// ===========================================================================
// Servers and checks shared by the raw tests
// ===========================================================================

/// Server with one 64 MiB writable memory export "a" on 127.0.0.1.
pub fn memory_server() -> Server {
    Server::start(&["--export", "a=memory:?size=64M", "--listen", "127.0.0.1:0"])
}

/// The server must not have logged a panic (tokio swallows task panics).
pub fn assert_no_panics(server: &Server) {
    let lines = server.stderr_lines();
    if let Some(l) = lines.iter().find(|l| l.contains("panicked")) {
        panic!("server logged a panic: {l}\n{}", server.logs());
    }
}

/// Deterministic test data (never all zero): [`pattern`].
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    pattern(seed, len)
}

/// Simple xorshift64* PRNG (seeded, no extra crates).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}
