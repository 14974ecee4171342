//! Misbehaving and demanding clients: many simultaneous connections, deep
//! pipelining past --max-in-flight, clients vanishing mid-request or
//! mid-handshake, oversized names and option payloads. After each abuse the
//! server must still be running and serving other clients correctly, and
//! must never have panicked.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

fn server(extra: &[&str]) -> Server {
    let mut args = vec![
        "--export",
        "a=memory:?size=64M",
        "--export",
        "f=file:{dir}/f.img?size=64M",
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn connect_raw(s: &Server) -> TcpStream {
    let mut st = tcp_connect(s.tcp_addr()).expect("connect");
    st.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut g = [0u8; 18];
    st.read_exact(&mut g).expect("greeting");
    assert_eq!(&g[..8], b"NBDMAGIC");
    st.write_all(&3u32.to_be_bytes()).unwrap();
    st
}

fn opt(st: &mut TcpStream, opt: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    st.write_all(&b).unwrap();
}

/// Read one option reply: (type, data).
fn opt_reply(st: &mut TcpStream) -> std::io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    st.read_exact(&mut h)?;
    assert_eq!(
        u64::from_be_bytes(h[..8].try_into().unwrap()),
        OPT_REPLY_MAGIC
    );
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut d = vec![0u8; len];
    st.read_exact(&mut d)?;
    Ok((u32::from_be_bytes(h[12..16].try_into().unwrap()), d))
}

/// NBD_OPT_GO (no info requests, simple replies); panics unless it succeeds.
fn go(st: &mut TcpStream, name: &str) {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    opt(st, 7, &d);
    loop {
        let (t, _) = opt_reply(st).expect("GO reply");
        match t {
            3 => continue,
            1 => return,
            t => panic!("GO {name:?} failed with {t:#x}"),
        }
    }
}

fn request(typ: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// The server is alive, serves a fresh client correctly and never panicked.
fn assert_healthy(s: &mut Server, what: &str) {
    assert!(s.is_running(), "server died after {what}\n{}", s.logs());
    let mut st = connect_raw(s);
    go(&mut st, "a");
    st.write_all(&request(0, 7, 0, 512)).unwrap();
    let mut h = [0u8; 16];
    st.read_exact(&mut h)
        .unwrap_or_else(|e| panic!("no reply after {what}: {e}\n{}", s.logs()));
    assert_eq!(
        u32::from_be_bytes(h[..4].try_into().unwrap()),
        SIMPLE_REPLY_MAGIC
    );
    assert_eq!(
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        0,
        "read failed after {what}"
    );
    let mut d = [0u8; 512];
    st.read_exact(&mut d).unwrap();
    let logs = s.logs();
    assert!(
        !logs.contains("panicked"),
        "server panicked during {what}:\n{logs}"
    );
}

#[test]
fn one_hundred_concurrent_libnbd_connections() {
    let mut s = server(&[]);
    s.python(
        r#"
hs = []
for i in range(100):
    hs.append(connect("f" if i % 2 else "a"))
for i, h in enumerate(hs):
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(pat(i, 64 * KiB))), (i // 2) * 64 * KiB)
for h in hs:
    run_aio(h)
for h in hs:
    h.flush()
for i, h in enumerate(hs):
    other = hs[(i + 2) % 100]   # same export, different connection
    check_buf(other.pread(64 * KiB, (i // 2) * 64 * KiB), pat(i, 64 * KiB), "connection %d's data via another connection" % i)
for h in hs:
    h.shutdown()
print("ok")
"#,
    );
    assert_healthy(&mut s, "100 connections");
}

#[test]
fn deep_pipelining_beyond_max_in_flight() {
    let mut s = server(&["--max-in-flight", "4"]);
    let mut st = connect_raw(&s);
    go(&mut st, "a");
    // 2000 writes of 4 KiB then 2000 reads, all sent before reading any
    // reply (a separate thread writes so the server's backpressure cannot
    // deadlock us).
    let n = 2000u64;
    let mut w = st.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..n {
            let mut b = request(1, i, i * 4096, 4096);
            b.extend_from_slice(&pattern(i, 4096));
            w.write_all(&b).unwrap();
        }
        for i in 0..n {
            w.write_all(&request(0, n + i, i * 4096, 4096)).unwrap();
        }
    });
    let mut seen = vec![false; 2 * n as usize];
    // NBD does not order in-flight requests, so a pipelined read may see its
    // block before or after the write to it: accept either here, and check
    // the final contents below.
    for _ in 0..2 * n {
        let mut h = [0u8; 16];
        st.read_exact(&mut h)
            .unwrap_or_else(|e| panic!("reply stream broken: {e}\n{}", s.logs()));
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        assert_eq!(err, 0, "request {cookie} failed");
        assert!(
            !seen[cookie as usize],
            "duplicate reply for cookie {cookie}"
        );
        seen[cookie as usize] = true;
        if cookie >= n {
            let mut d = vec![0u8; 4096];
            st.read_exact(&mut d).unwrap();
            let i = cookie - n;
            assert!(
                d == pattern(i, 4096) || d.iter().all(|&b| b == 0),
                "read {i}: garbage"
            );
        }
    }
    writer.join().unwrap();
    assert!(seen.iter().all(|&x| x), "missing replies");
    // Everything is there now.
    for i in (0..n).step_by(97) {
        st.write_all(&request(0, 99_999, i * 4096, 4096)).unwrap();
        let mut h = [0u8; 16];
        st.read_exact(&mut h).unwrap();
        let mut d = vec![0u8; 4096];
        st.read_exact(&mut d).unwrap();
        assert!(d == pattern(i, 4096), "block {i} after pipelined writes");
    }
    assert_healthy(&mut s, "deep pipelining");
}

#[test]
fn clients_vanishing_at_every_stage() {
    let mut s = server(&[]);
    for round in 0..5 {
        // 1. connect and close immediately.
        drop(tcp_connect(s.tcp_addr()).unwrap());
        // 2. close in the middle of the client flags.
        let mut st = tcp_connect(s.tcp_addr()).unwrap();
        let mut g = [0u8; 18];
        st.read_exact(&mut g).unwrap();
        st.write_all(&[0, 0]).unwrap();
        drop(st);
        // 3. close in the middle of an option header / option payload.
        let mut st = connect_raw(&s);
        st.write_all(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
        drop(st);
        let mut st = connect_raw(&s);
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&7u32.to_be_bytes());
        b.extend_from_slice(&1000u32.to_be_bytes());
        b.extend_from_slice(&[0u8; 10]);
        st.write_all(&b).unwrap();
        drop(st);
        // 4. close in the middle of a request header and of a write payload.
        for f in ["f", "a"] {
            let mut st = connect_raw(&s);
            go(&mut st, f);
            st.write_all(&request(0, 1, 0, 512)[..13]).unwrap();
            drop(st);
            let mut st = connect_raw(&s);
            go(&mut st, f);
            let mut b = request(1, 1, 0, 65536);
            b.extend_from_slice(&[0xab; 1000]);
            st.write_all(&b).unwrap();
            drop(st);
        }
        // 5. close with many requests in flight and replies unread.
        let mut st = connect_raw(&s);
        go(&mut st, "f");
        let mut b = Vec::new();
        for i in 0..200u64 {
            b.extend_from_slice(&request(0, i, i * 65536, 65536));
        }
        b.extend_from_slice(&request(3, 999, 0, 0));
        st.write_all(&b).unwrap();
        drop(st);
        assert_healthy(&mut s, &format!("vanishing clients (round {round})"));
    }
    // A partial write must not have been applied.
    s.python(
        r#"
h = connect("f")
check(bytes(h.pread(65536, 0)) == bytes(65536), "a write whose payload never fully arrived must not be applied")
print("ok")
"#,
    );
}

#[test]
fn oversized_names_and_option_payloads() {
    let mut s = server(&[]);
    // Export names up to 4096 bytes are legal: unknown -> ERR_UNKNOWN.
    let mut st = connect_raw(&s);
    let name = "n".repeat(4096);
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    opt(&mut st, 7, &d);
    let (t, _) = opt_reply(&mut st).expect("reply to GO with a 4096-byte name");
    assert_eq!(
        t, 0x8000_0006,
        "GO with an unknown 4096-byte name: ERR_UNKNOWN"
    );
    // Still negotiating.
    go(&mut st, "a");
    drop(st);

    // Name length field larger than the option payload: invalid, no crash.
    let mut st = connect_raw(&s);
    let mut d = Vec::new();
    d.extend_from_slice(&100_000u32.to_be_bytes());
    d.extend_from_slice(b"abc");
    d.extend_from_slice(&0u16.to_be_bytes());
    opt(&mut st, 7, &d);
    if let Ok((t, _)) = opt_reply(&mut st) {
        assert!(t & 0x8000_0000 != 0, "malformed GO must fail, got {t:#x}");
    }
    drop(st);

    // A very long name (64 KiB) and a huge unknown option (16 MiB): the
    // server may reply with an error or drop the connection, but must
    // survive.
    let mut st = connect_raw(&s);
    let name = "x".repeat(65536);
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    opt(&mut st, 7, &d);
    if let Ok((t, _)) = opt_reply(&mut st) {
        assert!(
            t & 0x8000_0000 != 0,
            "GO with a 64 KiB name must fail, got {t:#x}"
        );
    }
    drop(st);
    let mut st = connect_raw(&s);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&0x4242u32.to_be_bytes());
    b.extend_from_slice(&(16u32 << 20).to_be_bytes());
    st.write_all(&b).unwrap();
    let _ = st.write_all(&vec![0u8; 16 << 20]);
    let _ = opt_reply(&mut st);
    drop(st);
    // Claims a 4 GiB option payload, then stalls and goes away.
    let mut st = connect_raw(&s);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&0x4242u32.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    st.write_all(&b).unwrap();
    drop(st);
    assert_healthy(&mut s, "oversized names and options");
}

#[test]
fn meta_context_listing_and_unknown_contexts() {
    let s = server(&[]);
    s.python(
        r#"
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri("f"))
got = []
n = h.opt_list_meta_context(lambda name: got.append(name) or 0)
check("base:allocation" in got, "NBD_OPT_LIST_META_CONTEXT must offer base:allocation: %r" % got)
h.opt_abort()

# Requesting unknown contexts alongside base:allocation: only the known one
# is selected and block status still works.
h = nbd.NBD()
h.add_meta_context("qemu:dirty-bitmap:nope")
h.add_meta_context("nosuch:thing")
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri("f"))
check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation selected")
check(not h.can_meta_context("nosuch:thing"), "unknown context must not be selected")
h.pwrite(b"x" * 4096, 0)
check_eq(extents_once(h, 8192, 0)[0][2] & nbd.STATE_HOLE, 0, "block status after mixed context request")

# Only unknown contexts: connection works, no block status.
h = nbd.NBD()
h.add_meta_context("nosuch:thing")
h.connect_uri(uri("a"))
check(not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "nothing selected")
h.pread(512, 0)
print("ok")
"#,
    );
}
