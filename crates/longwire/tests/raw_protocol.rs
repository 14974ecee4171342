//! Hand-written NBD wire traffic for what the libnbd/qemu clients cannot or
//! will not send: exact greeting and option replies (STARTTLS policy error,
//! unknown options, NBD_OPT_EXPORT_NAME with and without NO_ZEROES), unknown
//! commands, exact export flags per negotiated mode, the extended-header
//! request/reply layout (64-bit effect lengths, BLOCK_STATUS_EXT, error
//! chunks, offset echo), bad magic, and the config-file handshake timeout.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const OPT_EXTENDED_HEADERS: u32 = 11;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

const FLAG_HAS_FLAGS: u16 = 1 << 0;
const FLAG_READ_ONLY: u16 = 1 << 1;
const FLAG_SEND_FLUSH: u16 = 1 << 2;
const FLAG_SEND_FUA: u16 = 1 << 3;
const FLAG_SEND_TRIM: u16 = 1 << 5;
const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
const FLAG_SEND_DF: u16 = 1 << 7;
const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
const FLAG_SEND_CACHE: u16 = 1 << 10;
const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;
const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
const REPLY_TYPE_ERROR: u16 = 0x8001;
const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

const EINVAL: u32 = 22;

fn server() -> Server {
    Server::start(&[
        "--export",
        "a=memory:?size=64M&description=raw+test",
        "--export",
        "f=file:{dir}/f.img?size=16M",
        "--export",
        "big=memory:?size=8G",
        "--export",
        "ro=memory:?size=1M&readonly=true",
        "--listen",
        "127.0.0.1:0",
    ])
}

struct Raw {
    s: TcpStream,
    greeting_flags: u16,
}

struct OptReply {
    opt: u32,
    typ: u32,
    data: Vec<u8>,
}

/// One reply chunk in structured or extended mode (or a simple reply).
#[derive(Debug)]
struct Chunk {
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: Option<u64>,
    payload: Vec<u8>,
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

impl Raw {
    /// Connect and read the greeting; do not send client flags yet.
    fn greet(s: &Server) -> Raw {
        let st = tcp_connect(s.tcp_addr()).expect("connect");
        st.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        st.set_nodelay(true).unwrap();
        let mut r = Raw {
            s: st,
            greeting_flags: 0,
        };
        let g = r.read_n(18);
        assert_eq!(&g[..8], b"NBDMAGIC", "greeting magic");
        assert_eq!(be64(&g[8..16]), IHAVEOPT, "newstyle magic");
        r.greeting_flags = be16(&g[16..]);
        r
    }

    /// Connect, greet, send FIXED_NEWSTYLE|NO_ZEROES.
    fn connect(s: &Server) -> Raw {
        let mut r = Self::greet(s);
        r.send(&3u32.to_be_bytes());
        r
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("write to server");
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s
            .read_exact(&mut v)
            .unwrap_or_else(|e| panic!("reading {n} bytes from server: {e}"));
        v
    }

    /// True if the server closes the connection (EOF/reset) within `t`.
    fn closed_within(&mut self, t: Duration) -> bool {
        self.s.set_read_timeout(Some(t)).unwrap();
        let mut b = [0u8; 1];
        let deadline = Instant::now() + t;
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {
                    if Instant::now() > deadline {
                        return false;
                    }
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }

    fn opt(&mut self, opt: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    fn reply(&mut self) -> OptReply {
        let h = self.read_n(20);
        assert_eq!(be64(&h), OPT_REPLY_MAGIC, "option reply magic");
        let len = be32(&h[16..]) as usize;
        OptReply {
            opt: be32(&h[8..]),
            typ: be32(&h[12..]),
            data: self.read_n(len),
        }
    }

    fn opt_expect(&mut self, opt: u32, data: &[u8], want_type: u32, what: &str) -> OptReply {
        self.opt(opt, data);
        let r = self.reply();
        assert_eq!(r.opt, opt, "{what}: option echoed in the reply");
        assert_eq!(
            r.typ, want_type,
            "{what}: reply type {:#x} (expected {want_type:#x})",
            r.typ
        );
        r
    }

    fn info_or_go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// NBD_OPT_INFO/GO; returns all NBD_INFO items (type, payload) on ACK,
    /// or Err(reply type) on an error reply.
    fn info_go(&mut self, opt: u32, name: &str, infos: &[u16]) -> Result<Vec<(u16, Vec<u8>)>, u32> {
        self.opt(opt, &Self::info_or_go_payload(name, infos));
        let mut items = Vec::new();
        loop {
            let r = self.reply();
            assert_eq!(r.opt, opt);
            match r.typ {
                REP_INFO => items.push((be16(&r.data), r.data[2..].to_vec())),
                REP_ACK => return Ok(items),
                t if t & 0x8000_0000 != 0 => return Err(t),
                t => panic!("unexpected reply type {t:#x} to option {opt}"),
            }
        }
    }

    /// GO and return (size, transmission flags).
    fn go(&mut self, name: &str) -> (u64, u16) {
        let items = self
            .info_go(OPT_GO, name, &[INFO_BLOCK_SIZE])
            .unwrap_or_else(|t| panic!("GO {name:?} failed: {t:#x}"));
        export_info(&items)
    }

    fn set_meta_base_allocation(&mut self, name: &str) -> u32 {
        let q = b"base:allocation";
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
        self.opt(OPT_SET_META_CONTEXT, &d);
        let r = self.reply();
        assert_eq!(r.typ, REP_META_CONTEXT, "SET_META_CONTEXT base:allocation");
        assert_eq!(&r.data[4..], q, "context name");
        let id = be32(&r.data);
        let r = self.reply();
        assert_eq!(r.typ, REP_ACK);
        id
    }

    fn request(
        &mut self,
        flags: u16,
        typ: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b);
    }

    fn ext_request(
        &mut self,
        flags: u16,
        typ: u16,
        cookie: u64,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) {
        let mut b = Vec::with_capacity(32 + payload.len());
        b.extend_from_slice(&EXT_REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// Simple reply: (error, cookie); reads `data_len` bytes of data if error == 0.
    fn simple_reply(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let h = self.read_n(16);
        assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC, "simple reply magic");
        let err = be32(&h[4..]);
        let data = if err == 0 {
            self.read_n(data_len)
        } else {
            Vec::new()
        };
        (err, be64(&h[8..]), data)
    }

    /// One chunk (structured, extended or simple).
    fn chunk(&mut self) -> Chunk {
        let m = self.read_n(4);
        match be32(&m) {
            SIMPLE_REPLY_MAGIC => {
                let h = self.read_n(12);
                Chunk {
                    flags: REPLY_FLAG_DONE,
                    typ: if be32(&h) == 0 {
                        REPLY_TYPE_NONE
                    } else {
                        REPLY_TYPE_ERROR
                    },
                    cookie: be64(&h[4..]),
                    offset: None,
                    payload: be32(&h)
                        .to_be_bytes()
                        .iter()
                        .copied()
                        .chain([0u8, 0])
                        .collect(),
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let h = self.read_n(16);
                let len = be32(&h[12..]) as usize;
                Chunk {
                    flags: be16(&h),
                    typ: be16(&h[2..]),
                    cookie: be64(&h[4..]),
                    offset: None,
                    payload: self.read_n(len),
                }
            }
            EXT_REPLY_MAGIC => {
                let h = self.read_n(28);
                let len = be64(&h[20..]);
                assert!(len <= 64 << 20, "absurd extended reply length {len}");
                Chunk {
                    flags: be16(&h),
                    typ: be16(&h[2..]),
                    cookie: be64(&h[4..]),
                    offset: Some(be64(&h[12..])),
                    payload: self.read_n(len as usize),
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// All chunks of one reply (until DONE).
    fn chunks_until_done(&mut self) -> Vec<Chunk> {
        let mut v = Vec::new();
        loop {
            let c = self.chunk();
            let done = c.flags & REPLY_FLAG_DONE != 0;
            v.push(c);
            if done {
                return v;
            }
        }
    }
}

fn export_info(items: &[(u16, Vec<u8>)]) -> (u64, u16) {
    let e = items
        .iter()
        .find(|(t, _)| *t == INFO_EXPORT)
        .unwrap_or_else(|| panic!("no NBD_INFO_EXPORT in {items:?}"));
    assert_eq!(e.1.len(), 10, "NBD_INFO_EXPORT length");
    (be64(&e.1), be16(&e.1[8..]))
}

const RW_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_CAN_MULTI_CONN
    | FLAG_SEND_CACHE
    | FLAG_SEND_FAST_ZERO;

fn assert_rw_flags(flags: u16, df_expected: bool, what: &str) {
    assert_eq!(
        flags & RW_FLAGS,
        RW_FLAGS,
        "{what}: transmission flags {flags:#06x} lack some of {RW_FLAGS:#06x}"
    );
    assert_eq!(
        flags & FLAG_READ_ONLY,
        0,
        "{what}: READ_ONLY set in {flags:#06x}"
    );
    assert_eq!(
        flags & FLAG_SEND_DF != 0,
        df_expected,
        "{what}: SEND_DF in {flags:#06x} (must be set iff structured replies or extended headers were negotiated)"
    );
}

fn error_of(c: &Chunk) -> u32 {
    assert!(c.typ & 0x8000 != 0, "expected an error chunk, got {c:?}");
    assert!(c.payload.len() >= 6, "error chunk payload too short: {c:?}");
    let msglen = be16(&c.payload[4..]) as usize;
    assert!(
        6 + msglen <= c.payload.len(),
        "error message length overflows the chunk: {c:?}"
    );
    be32(&c.payload)
}

#[test]
fn greeting_option_errors_list_info_and_abort() {
    let s = server();
    let mut r = Raw::greet(&s);
    assert_eq!(
        r.greeting_flags & 3,
        3,
        "server must offer FIXED_NEWSTYLE|NO_ZEROES: {:#x}",
        r.greeting_flags
    );
    r.send(&3u32.to_be_bytes());

    // STARTTLS: refused by policy; unknown options: ERR_UNSUP with the
    // payload consumed; options that take no data reject data.
    r.opt_expect(OPT_STARTTLS, &[], REP_ERR_POLICY, "STARTTLS");
    r.opt_expect(
        0x4242,
        &[7u8; 100],
        REP_ERR_UNSUP,
        "unknown option with payload",
    );
    for (opt, what) in [
        (OPT_STRUCTURED_REPLY, "STRUCTURED_REPLY"),
        (OPT_EXTENDED_HEADERS, "EXTENDED_HEADERS"),
    ] {
        r.opt(opt, &[1, 2, 3]);
        let rep = r.reply();
        assert_eq!(rep.opt, opt);
        assert!(
            rep.typ & 0x8000_0000 != 0,
            "{what} with data must be rejected, got {:#x}",
            rep.typ
        );
    }

    // LIST
    r.opt(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let rep = r.reply();
        assert_eq!(rep.opt, OPT_LIST);
        match rep.typ {
            REP_SERVER => {
                let n = be32(&rep.data) as usize;
                names.push(String::from_utf8(rep.data[4..4 + n].to_vec()).unwrap());
            }
            REP_ACK => break,
            t => panic!("unexpected reply {t:#x} to LIST"),
        }
    }
    names.sort();
    assert_eq!(names, ["a", "big", "f", "ro"]);

    // INFO: unknown export -> ERR_UNKNOWN; the connection goes on.
    assert_eq!(
        r.info_go(OPT_INFO, "nope", &[]),
        Err(REP_ERR_UNKNOWN),
        "INFO for an unknown export"
    );
    assert_eq!(
        r.info_go(OPT_GO, "nope", &[]),
        Err(REP_ERR_UNKNOWN),
        "GO for an unknown export"
    );

    // INFO with every info request: exact values. Without structured
    // replies/extended headers negotiated, DF must be clear.
    let items = r
        .info_go(
            OPT_INFO,
            "a",
            &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
        )
        .expect("INFO a");
    let (size, flags) = export_info(&items);
    assert_eq!(size, 64 * MIB);
    assert_rw_flags(flags, false, "INFO a (no structured replies)");
    let bs = items
        .iter()
        .find(|(t, _)| *t == INFO_BLOCK_SIZE)
        .expect("NBD_INFO_BLOCK_SIZE");
    assert_eq!(
        (be32(&bs.1), be32(&bs.1[4..]), be32(&bs.1[8..])),
        (1, 4096, 32 * MIB as u32),
        "block sizes"
    );
    let desc = items
        .iter()
        .find(|(t, _)| *t == INFO_DESCRIPTION)
        .expect("NBD_INFO_DESCRIPTION");
    assert_eq!(desc.1, b"raw test");
    if let Some(n) = items.iter().find(|(t, _)| *t == INFO_NAME) {
        assert_eq!(n.1, b"a", "canonical name");
    }
    // Read-only export flags.
    let (_, ro_flags) = export_info(&r.info_go(OPT_INFO, "ro", &[]).expect("INFO ro"));
    assert_eq!(
        ro_flags & (FLAG_HAS_FLAGS | FLAG_READ_ONLY),
        FLAG_HAS_FLAGS | FLAG_READ_ONLY,
        "{ro_flags:#x}"
    );
    assert_eq!(
        ro_flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO),
        0,
        "{ro_flags:#x}"
    );
    // Empty name = default export (the first one here).
    let (size, _) = export_info(&r.info_go(OPT_INFO, "", &[]).expect("INFO default"));
    assert_eq!(size, 64 * MIB, "empty name selects the first export");

    // After STRUCTURED_REPLY the same INFO reports DF.
    r.opt_expect(OPT_STRUCTURED_REPLY, &[], REP_ACK, "STRUCTURED_REPLY");
    let (_, flags) = export_info(&r.info_go(OPT_INFO, "a", &[]).unwrap());
    assert_rw_flags(flags, true, "INFO a (structured replies)");

    // ABORT: ACK (SHOULD) and the server closes the connection.
    r.opt(OPT_ABORT, &[]);
    let rep = r.reply();
    assert_eq!((rep.opt, rep.typ), (OPT_ABORT, REP_ACK));
    assert!(
        r.closed_within(Duration::from_secs(5)),
        "server must close after NBD_OPT_ABORT"
    );
}

#[test]
fn export_name_option_with_and_without_no_zeroes() {
    let s = server();
    for no_zeroes in [true, false] {
        let mut r = Raw::greet(&s);
        r.send(&(if no_zeroes { 3u32 } else { 1u32 }).to_be_bytes());
        r.opt(OPT_EXPORT_NAME, b"a");
        let h = r.read_n(10);
        assert_eq!(be64(&h), 64 * MIB, "EXPORT_NAME size");
        assert_rw_flags(be16(&h[8..]), false, "EXPORT_NAME flags");
        if !no_zeroes {
            assert_eq!(
                r.read_n(124),
                vec![0u8; 124],
                "124 zero bytes without NO_ZEROES"
            );
        }
        r.request(0, CMD_WRITE, 1, 512, 4, b"abcd");
        assert_eq!(r.simple_reply(0).0, 0);
        r.request(0, CMD_READ, 2, 510, 8, &[]);
        let (err, cookie, data) = r.simple_reply(8);
        assert_eq!((err, cookie), (0, 2));
        assert_eq!(data, b"\0\0abcd\0\0");
        r.request(0, CMD_DISC, 3, 0, 0, &[]);
        assert!(
            r.closed_within(Duration::from_secs(5)),
            "server must close after NBD_CMD_DISC"
        );
    }
    // EXPORT_NAME of an unknown export: the server just closes.
    let mut r = Raw::connect(&s);
    r.opt(OPT_EXPORT_NAME, b"nope");
    assert!(
        r.closed_within(Duration::from_secs(5)),
        "EXPORT_NAME for an unknown export must close the connection"
    );
}

#[test]
fn simple_replies_unknown_commands_and_flags() {
    let s = server();
    let mut r = Raw::connect(&s);
    let (size, flags) = r.go("a");
    assert_eq!(size, 64 * MIB);
    assert_rw_flags(flags, false, "GO a without structured replies");

    r.request(0, CMD_WRITE, 10, 0, 4096, &[0x5a; 4096]);
    assert_eq!(r.simple_reply(0), (0, 10, vec![]));
    for (i, typ) in [0x42u16, 9, 0xffff].into_iter().enumerate() {
        let cookie = 100 + i as u64;
        r.request(0, typ, cookie, 0, 4096, &[]);
        let (err, c, _) = r.simple_reply(0);
        assert_eq!(c, cookie, "cookie echo");
        assert_eq!(
            err, EINVAL,
            "unknown command {typ:#x} must fail with EINVAL"
        );
    }
    // Still in sync: a read works.
    r.request(0, CMD_READ, 200, 0, 4096, &[]);
    let (err, c, data) = r.simple_reply(4096);
    assert_eq!((err, c), (0, 200));
    assert!(data.iter().all(|&b| b == 0x5a));
    // Unknown command flag bits on a read (spec: SHOULD be EINVAL).
    r.request(1 << 12, CMD_READ, 201, 0, 512, &[]);
    let (err, c, _) = r.simple_reply(512);
    assert_eq!(c, 201);
    assert_eq!(err, EINVAL, "unknown command flag on READ");
    // Oversized write (simple replies): error, payload consumed, in sync.
    let big = vec![0xeeu8; 32 * MIB as usize + 512];
    r.request(0, CMD_WRITE, 300, 0, big.len() as u32, &big);
    let (err, c, _) = r.simple_reply(0);
    assert_eq!(c, 300);
    assert_ne!(err, 0, "a write above the maximum payload must fail");
    r.request(0, CMD_READ, 301, 0, 4096, &[]);
    let (err, c, data) = r.simple_reply(4096);
    assert_eq!(
        (err, c),
        (0, 301),
        "connection in sync after the oversized write"
    );
    assert!(
        data.iter().all(|&b| b == 0x5a),
        "oversized write must not have modified data"
    );
    r.request(0, CMD_DISC, 302, 0, 0, &[]);
    assert!(r.closed_within(Duration::from_secs(5)));
}

#[test]
fn bad_request_magic_drops_only_that_connection() {
    let s = server();
    let mut r = Raw::connect(&s);
    r.go("a");
    r.send(&[0xde, 0xad, 0xbe, 0xef].repeat(7));
    assert!(
        r.closed_within(Duration::from_secs(5)),
        "server should hard-disconnect on a bad request magic"
    );
    // The server itself is fine.
    let mut r2 = Raw::connect(&s);
    r2.go("a");
    r2.request(0, CMD_READ, 1, 0, 512, &[]);
    assert_eq!(r2.simple_reply(512).0, 0);
}

#[test]
fn structured_replies_raw() {
    let s = server();
    let mut r = Raw::connect(&s);
    r.opt_expect(OPT_STRUCTURED_REPLY, &[], REP_ACK, "STRUCTURED_REPLY");
    let ctx = r.set_meta_base_allocation("f");
    let (size, flags) = r.go("f");
    assert_eq!(size, 16 * MIB);
    assert_rw_flags(flags, true, "GO f with structured replies");

    r.request(0, CMD_WRITE, 1, 8192, 4096, &[0x61; 4096]);
    let c = r.chunks_until_done();
    assert_eq!(c.last().unwrap().cookie, 1);
    assert!(c.iter().all(|c| c.typ & 0x8000 == 0), "write failed: {c:?}");

    // READ [0, 16K): data/hole chunks covering the range exactly.
    r.request(0, CMD_READ, 2, 0, 16384, &[]);
    let mut buf = vec![0xffu8; 16384];
    let mut covered = 0u64;
    for c in r.chunks_until_done() {
        assert_eq!(c.cookie, 2);
        match c.typ {
            REPLY_TYPE_OFFSET_DATA => {
                let off = be64(&c.payload) as usize;
                let d = &c.payload[8..];
                buf[off..off + d.len()].copy_from_slice(d);
                covered += d.len() as u64;
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let off = be64(&c.payload) as usize;
                let n = be32(&c.payload[8..]) as usize;
                buf[off..off + n].fill(0);
                covered += n as u64;
            }
            REPLY_TYPE_NONE => {}
            t => panic!("unexpected chunk type {t:#x} for READ"),
        }
    }
    assert_eq!(covered, 16384, "read chunks must cover the request exactly");
    let mut want = vec![0u8; 16384];
    want[8192..12288].fill(0x61);
    assert!(buf == want, "structured read content");

    // BLOCK_STATUS (32-bit descriptors).
    r.request(0, CMD_BLOCK_STATUS, 3, 0, 16384, &[]);
    let chunks = r.chunks_until_done();
    let st: Vec<&Chunk> = chunks
        .iter()
        .filter(|c| c.typ == REPLY_TYPE_BLOCK_STATUS)
        .collect();
    assert_eq!(
        st.len(),
        1,
        "exactly one status chunk per context: {chunks:?}"
    );
    assert_eq!(be32(&st[0].payload), ctx, "context id");
    let descs: Vec<(u32, u32)> = st[0].payload[4..]
        .chunks(8)
        .map(|d| (be32(d), be32(&d[4..])))
        .collect();
    assert_eq!(
        descs[0],
        (8192, 3),
        "first extent: hole+zero [0,8K): {descs:?}"
    );
    assert_eq!(
        descs[1],
        (4096, 0),
        "second extent: data [8K,12K): {descs:?}"
    );
    assert_eq!(descs[2].1, 3, "third extent: hole: {descs:?}");

    // Unknown command: an error (structured error chunk or simple reply).
    r.request(0, 0x42, 4, 0, 0, &[]);
    let chunks = r.chunks_until_done();
    assert_eq!(chunks.last().unwrap().cookie, 4);
    assert_eq!(
        error_of(&chunks[0]),
        EINVAL,
        "unknown command in structured mode: {chunks:?}"
    );
    // READ past the end: EINVAL, as a structured reply (a simple reply is
    // not allowed for READ once structured replies are negotiated).
    r.request(0, CMD_READ, 5, 16 * MIB, 512, &[]);
    let chunks = r.chunks_until_done();
    assert!(
        chunks.iter().all(|c| c.offset.is_none()),
        "no extended replies without negotiation"
    );
    assert_eq!(error_of(&chunks[0]), EINVAL, "read past end: {chunks:?}");
    r.request(0, CMD_DISC, 6, 0, 0, &[]);
    assert!(r.closed_within(Duration::from_secs(5)));
}

#[test]
fn extended_headers_raw() {
    let s = server();
    let mut r = Raw::connect(&s);
    r.opt_expect(OPT_EXTENDED_HEADERS, &[], REP_ACK, "EXTENDED_HEADERS");
    let ctx = r.set_meta_base_allocation("big");
    let (size, flags) = r.go("big");
    assert_eq!(size, 8 * GIB);
    assert_rw_flags(flags, true, "GO big with extended headers");

    let check_reply_header = |chunks: &[Chunk], cookie: u64, offset: u64, what: &str| {
        for c in chunks {
            assert_eq!(c.cookie, cookie, "{what}: cookie echo");
            assert_eq!(
                c.offset,
                Some(offset),
                "{what}: extended replies must echo the request offset: {c:?}"
            );
        }
    };

    // WRITE with PAYLOAD_LEN above 4 GiB.
    let off = 5 * GIB + 4096;
    r.ext_request(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 1, off, 8192, &[0x7e; 8192]);
    let c = r.chunks_until_done();
    check_reply_header(&c, 1, off, "WRITE");
    assert_eq!(
        (c.len(), c[0].typ, c[0].flags & REPLY_FLAG_DONE),
        (1, REPLY_TYPE_NONE, 1),
        "write reply: {c:?}"
    );

    // READ it back (with a hole before it).
    r.ext_request(0, CMD_READ, 2, off - 4096, 12288, &[]);
    let chunks = r.chunks_until_done();
    check_reply_header(&chunks, 2, off - 4096, "READ");
    let mut buf = vec![0xffu8; 12288];
    let mut covered = 0;
    for c in &chunks {
        match c.typ {
            REPLY_TYPE_OFFSET_DATA => {
                let o = (be64(&c.payload) - (off - 4096)) as usize;
                let d = &c.payload[8..];
                buf[o..o + d.len()].copy_from_slice(d);
                covered += d.len();
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let o = (be64(&c.payload) - (off - 4096)) as usize;
                let n = be32(&c.payload[8..]) as usize;
                buf[o..o + n].fill(0);
                covered += n;
            }
            REPLY_TYPE_NONE => {}
            t => panic!("unexpected chunk type {t:#x}"),
        }
    }
    assert_eq!(covered, 12288);
    assert!(
        buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 0x7e),
        "extended READ content"
    );

    // BLOCK_STATUS_EXT over 8 GiB (64-bit effect length).
    r.ext_request(0, CMD_BLOCK_STATUS, 3, 0, 8 * GIB, &[]);
    let chunks = r.chunks_until_done();
    check_reply_header(&chunks, 3, 0, "BLOCK_STATUS");
    let st: Vec<&Chunk> = chunks
        .iter()
        .filter(|c| c.typ == REPLY_TYPE_BLOCK_STATUS_EXT)
        .collect();
    assert_eq!(
        st.len(),
        1,
        "one BLOCK_STATUS_EXT chunk (and no 32-bit BLOCK_STATUS): {chunks:?}"
    );
    let p = &st[0].payload;
    assert_eq!(be32(p), ctx, "context id");
    let count = be32(&p[4..]) as usize;
    assert!(
        count >= 1 && p.len() == 8 + 16 * count,
        "descriptor count {count} vs payload {}",
        p.len()
    );
    let descs: Vec<(u64, u64)> = p[8..]
        .chunks(16)
        .map(|d| (be64(d), be64(&d[8..])))
        .collect();
    for (len, status) in &descs {
        assert!(*len > 0, "zero-length extent: {descs:?}");
        assert_eq!(
            status >> 32,
            0,
            "base:allocation status must fit 32 bits: {descs:?}"
        );
    }
    assert_eq!(
        descs[0].1 & 2,
        2,
        "the start of a fresh memory export reads as zero: {descs:?}"
    );
    let sum_but_last: u64 = descs[..descs.len() - 1].iter().map(|d| d.0).sum();
    assert!(sum_but_last < 8 * GIB, "{descs:?}");

    // WRITE_ZEROES and TRIM with effect lengths above 4 GiB.
    r.ext_request(0, CMD_WRITE_ZEROES, 4, GIB, 6 * GIB, &[]);
    let c = r.chunks_until_done();
    check_reply_header(&c, 4, GIB, "WRITE_ZEROES 6 GiB");
    assert!(
        c.iter().all(|c| c.typ & 0x8000 == 0),
        "6 GiB write zeroes failed: {c:?}"
    );
    r.ext_request(0, CMD_READ, 5, off, 4096, &[]);
    let c = r.chunks_until_done();
    let zero = c.iter().all(|c| match c.typ {
        REPLY_TYPE_OFFSET_DATA => c.payload[8..].iter().all(|&b| b == 0),
        _ => c.typ & 0x8000 == 0,
    });
    assert!(
        zero,
        "data inside the zeroed 6 GiB range must read as zero: {c:?}"
    );
    r.ext_request(0, CMD_TRIM, 6, 0, 8 * GIB, &[]);
    let c = r.chunks_until_done();
    check_reply_header(&c, 6, 0, "TRIM 8 GiB");
    assert!(
        c.iter().all(|c| c.typ & 0x8000 == 0),
        "8 GiB trim failed: {c:?}"
    );

    // Errors arrive as error chunks with the request offset echoed.
    r.ext_request(0, 0x42, 7, 12345, 0, &[]);
    let c = r.chunks_until_done();
    check_reply_header(&c, 7, 12345, "unknown command");
    assert_eq!(error_of(&c[0]), EINVAL, "unknown command: {c:?}");
    r.ext_request(0, CMD_READ, 8, 8 * GIB - 512, 1024, &[]);
    let c = r.chunks_until_done();
    check_reply_header(&c, 8, 8 * GIB - 512, "read past end");
    assert!(
        matches!(c[0].typ, REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET),
        "{c:?}"
    );
    assert_eq!(error_of(&c[0]), EINVAL, "read past end: {c:?}");
    r.ext_request(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 9, 8 * GIB, 512, &[1; 512]);
    let c = r.chunks_until_done();
    check_reply_header(&c, 9, 8 * GIB, "write past end");
    assert_eq!(error_of(&c[0]), 28, "write past end -> ENOSPC: {c:?}");
    // Cookie is echoed verbatim, all 64 bits; FLUSH works.
    r.ext_request(0, CMD_FLUSH, u64::MAX, 0, 0, &[]);
    let c = r.chunks_until_done();
    check_reply_header(&c, u64::MAX, 0, "FLUSH");
    r.ext_request(0, CMD_DISC, 10, 0, 0, &[]);
    assert!(r.closed_within(Duration::from_secs(5)));
}

#[test]
fn concurrent_raw_clients_share_one_export() {
    let s = server();
    let addr = s.tcp_addr();
    let handles: Vec<_> = (0..8u64)
        .map(|i| {
            std::thread::spawn(move || {
                let st = TcpStream::connect(addr).unwrap();
                st.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut r = Raw {
                    s: st,
                    greeting_flags: 0,
                };
                let _ = r.read_n(18);
                r.send(&3u32.to_be_bytes());
                r.go("a");
                let data = pattern(i, 65536);
                for k in 0..16u64 {
                    r.request(0, CMD_WRITE, k, (i * 16 + k) * 65536, 65536, &data);
                }
                for _ in 0..16 {
                    assert_eq!(r.simple_reply(0).0, 0);
                }
                r.request(0, CMD_FLUSH, 99, 0, 0, &[]);
                assert_eq!(r.simple_reply(0).0, 0);
                let _ = r.s.shutdown(Shutdown::Both);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread");
    }
    let mut r = Raw::connect(&s);
    r.go("a");
    for i in 0..8u64 {
        r.request(0, CMD_READ, i, (i * 16 + 15) * 65536, 65536, &[]);
        let (err, _, d) = r.simple_reply(65536);
        assert_eq!(err, 0);
        assert!(d == pattern(i, 65536), "client {i}'s data");
    }
}

#[test]
fn config_file_exports_and_handshake_timeout() {
    let s = Server::start_with(&["--config", "{dir}/longwire.toml"], Some(2), |dir| {
        std::fs::write(
            dir.join("longwire.toml"),
            format!(
                r#"
listen = ["127.0.0.1:0"]
unix = "{}/cfg.sock"
handshake_timeout = 1

[[export]]
name = "cfgdisk"
uri = "file:{}/cfg.img?size=3M"
description = "from the config file"

[[export]]
name = "cfgro"
uri = "memory:?size=1M"
readonly = true
"#,
                dir.display(),
                dir.display()
            ),
        )
        .unwrap();
    });
    assert!(s.has_tcp(), "{}", s.logs());
    let _ = s.unix_path();
    let out = s.run("nbdinfo", &["--list", &s.uri("")]);
    assert!(out.contains("export=\"cfgdisk\""), "{out}");
    assert!(out.contains("description: from the config file"), "{out}");
    assert!(out.contains("export-size: 3145728"), "{out}");
    let out = s.run_unchecked("nbdinfo", &["--is", "read-only", &s.unix_uri("cfgro")]);
    assert!(out.status.success(), "cfgro must be read-only: {out:?}");

    // handshake_timeout = 1: a client that stalls in negotiation is dropped.
    let mut r = Raw::greet(&s);
    let t0 = Instant::now();
    assert!(
        r.closed_within(Duration::from_secs(10)),
        "stalled handshake was not timed out"
    );
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "handshake timeout of 1 s took {took:?}"
    );
    // ... but an established connection is not subject to it.
    let mut r = Raw::connect(&s);
    r.go("cfgdisk");
    std::thread::sleep(Duration::from_millis(2500));
    r.request(0, CMD_READ, 1, 0, 512, &[]);
    assert_eq!(
        r.simple_reply(512).0,
        0,
        "idle transmission-phase connection must survive the handshake timeout"
    );
}
