//! NBD front-end limits: --max-connections (server-wide), per-export
//! `max_connections`, --idle-timeout, and many slow ("trickle") handshakes
//! not starving a real client nor bloating the server.

mod common;

use common::raw::*;
use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Retry `f` until it returns Some or `limit` passes.
fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if t0.elapsed() > limit {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Connect and open export "a", or None when the server closes at once
/// (over its connection limit).
fn try_open(s: &Server) -> Option<Conn> {
    let mut c = Conn::connect(s);
    let mut g = [0u8; 18];
    if c.s.read_exact(&mut g).is_err() {
        return None;
    }
    assert_eq!(g.to_vec(), expected_greeting());
    c.send(&(C_FIXED_NEWSTYLE | C_NO_ZEROES).to_be_bytes());
    c.go("a");
    Some(c)
}

#[test]
fn server_wide_connection_limit() {
    let s = Server::start(&[
        "--export",
        "a=memory:?size=16M",
        "--listen",
        "127.0.0.1:0",
        "--max-connections",
        "3",
    ]);
    let mut conns: Vec<Conn> = (0..3)
        .map(|_| Conn::open(&s, "a", Style::Simple, false).0)
        .collect();
    // The fourth is accepted and closed at once, without a greeting.
    let mut fourth = Conn::connect(&s);
    let took = fourth.expect_closed_within(Duration::from_secs(2), "fourth connection");
    assert!(took < Duration::from_secs(1), "closing took {took:?}");
    // The three still work.
    for (i, c) in conns.iter_mut().enumerate() {
        c.assert_alive(i as u64 + 1, "connection under the limit");
    }
    // One leaves: a new one gets in (once the server has noticed).
    drop(conns.pop());
    let mut c = eventually(Duration::from_secs(3), || try_open(&s))
        .expect("a connection after one left was not admitted");
    c.assert_alive(9, "connection after one left");
    let logs = s.logs();
    assert!(
        logs.contains("connection limit reached (3 connections)"),
        "no warning about the limit:\n{logs}"
    );
    assert_no_panics(&s);
}

#[test]
fn per_export_connection_limit() {
    let config = r#"
listen = ["127.0.0.1:0"]
[[export]]
name = "a"
uri = "memory:?size=16M"
max_connections = 2
[[export]]
name = "b"
uri = "memory:?size=16M"
"#;
    let s = Server::start_with(&["--config", "{dir}/lw.toml"], Some(1), |d| {
        std::fs::write(d.join("lw.toml"), config).unwrap()
    });
    let mut a1 = Conn::open(&s, "a", Style::Simple, false).0;
    let _a2 = Conn::open(&s, "a", Style::Simple, false).0;

    // Third GO (and INFO) for "a": ERR_POLICY with the message; the
    // connection stays in option haggling and can pick another export.
    let mut c = Conn::start(&s, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    let msg = "export a has reached its connection limit (2)";
    assert_eq!(c.info_go(OPT_GO, "a", &[]).unwrap_err(), (REP_ERR_POLICY, msg.to_string()));
    assert_eq!(c.info_go(OPT_INFO, "a", &[]).unwrap_err(), (REP_ERR_POLICY, msg.to_string()));
    // Another export is unaffected.
    c.go("b");
    c.assert_alive(1, "export b");
    let _b2 = Conn::open(&s, "b", Style::Simple, false).0;
    let _b3 = Conn::open(&s, "b", Style::Simple, false).0;

    // EXPORT_NAME for a full export: disconnect.
    let mut old = Conn::start(&s, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    old.option(OPT_EXPORT_NAME, b"a");
    old.expect_closed("EXPORT_NAME for a full export");

    // One "a" client leaves: GO for "a" succeeds again.
    a1.request(0, CMD_DISC, 0, 0, 0);
    drop(a1);
    let mut again = eventually(Duration::from_secs(3), || {
        let mut c = Conn::start(&s, C_FIXED_NEWSTYLE | C_NO_ZEROES);
        c.info_go(OPT_GO, "a", &[]).ok().map(|_| c)
    })
    .expect("GO for a after a client left");
    again.assert_alive(2, "export a after a client left");
    assert!(s.logs().contains(msg), "refusal not logged:\n{}", s.logs());
    assert_no_panics(&s);
}

#[test]
fn idle_timeout() {
    let s = Server::start(&[
        "--export",
        "a=memory:?size=16M",
        "--listen",
        "127.0.0.1:0",
        "--idle-timeout",
        "1",
    ]);
    let (mut busy, _) = Conn::open(&s, "a", Style::Simple, false);
    let (mut idle, _) = Conn::open(&s, "a", Style::Structured, false);
    let t0 = Instant::now();
    // The busy client issues a request every 300 ms for ~3.6 s, in another thread.
    let busy_thread = thread::spawn(move || {
        for i in 0..12u64 {
            let d = data(i, 4096);
            busy.write_ok(i * 2, i * 4096, &d);
            assert_eq!(busy.read(i * 2 + 1, i * 4096, 4096), d, "busy client read {i}");
            thread::sleep(Duration::from_millis(300));
        }
        busy.assert_alive(99, "busy client after 3.6 s");
    });
    let took = idle.expect_closed_within(Duration::from_secs(3), "idle client");
    assert!(took >= Duration::from_millis(900), "idle client closed too early ({took:?})");
    eprintln!("idle client closed after {:?}", t0.elapsed());
    busy_thread.join().expect("busy client failed");
    let logs = s.logs();
    assert!(logs.contains("closing connection idle for 1s"), "no idle log:\n{logs}");
    assert_no_panics(&s);
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn trickle_handshakes_do_not_starve_real_clients() {
    const TRICKLERS: usize = 300;
    let s = Server::start(&[
        "--export",
        "a=memory:?size=64M",
        "--listen",
        "127.0.0.1:0",
        "--handshake-timeout",
        "2",
    ]);
    let pid = s.pid();
    let start_rss = rss_kib(pid).unwrap_or(0);

    // RSS sampler.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(25));
            }
        })
    };

    // 300 connections sending one byte every 200 ms, never finishing.
    let addr = s.tcp_addr();
    let mut socks: Vec<Option<TcpStream>> = (0..TRICKLERS)
        .map(|i| {
            let st = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("trickle connection {i}: {e}"));
            st.set_nonblocking(true).unwrap();
            Some(st)
        })
        .collect();
    let trickle_start = Instant::now();
    let trickler = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(8);
        let mut open = socks.len();
        while open > 0 && Instant::now() < deadline {
            for slot in socks.iter_mut() {
                let Some(st) = slot else { continue };
                let mut buf = [0u8; 64];
                let closed = loop {
                    match st.read(&mut buf) {
                        Ok(0) => break true,
                        Ok(_) => continue, // the greeting
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                        Err(_) => break true,
                    }
                };
                // Client flags 0x00000003, one byte at a time, then junk.
                if closed || st.write(&[0]).is_err() {
                    *slot = None;
                    open -= 1;
                }
            }
            thread::sleep(Duration::from_millis(200));
        }
        open
    });

    // Meanwhile a real client connects and does 50 reads/writes.
    thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let (mut c, _) = Conn::open(&s, "a", Style::Structured, false);
    let connect = t0.elapsed();
    for i in 0..25u64 {
        let d = data(i, 64 * 1024);
        c.write_ok(2 * i, i * 65536, &d);
        assert_eq!(c.read(2 * i + 1, i * 65536, 65536), d, "read {i}");
    }
    let total = t0.elapsed();
    eprintln!("real client: connect {connect:?}, connect + 50 requests {total:?}");
    assert!(total < Duration::from_secs(3), "real client took {total:?} among tricklers");

    let still_open = trickler.join().unwrap();
    let closed_after = trickle_start.elapsed();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak_kib = peak.load(Ordering::Relaxed);
    eprintln!(
        "server RSS: {start_rss} KiB at start, peak {peak_kib} KiB during the trickle; \
         tricklers all closed after {closed_after:?}"
    );
    assert_eq!(still_open, 0, "{still_open} trickle connections were not closed by the server");
    assert!(peak_kib < 64 * 1024, "server RSS peaked at {peak_kib} KiB");
    // The real client is still fine (it finished its handshake in time).
    c.assert_alive(999, "real client after the trickle");
    assert!(s.logs().contains("handshake timed out"), "{}", s.logs());
    assert_no_panics(&s);
}
