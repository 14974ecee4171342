//! Client address allow-lists (NBD and iSCSI) and the iSCSI connection
//! limits, with real clients.
//!
//! Real tools cannot choose their source address, and a loopback
//! connection to 127.0.0.2 still comes from 127.0.0.1 (the route's
//! preferred source), so the tests tell clients apart by family: the
//! allow-lists name 127.0.0.1, and a tool dialling [::1] comes from ::1.
//! A listener on [::ffff:127.0.0.1] sees IPv4-mapped peers, which must
//! match the IPv4 rule. Python/libnbd with a socket bound to 127.0.0.2
//! shows that it is the client's address that counts, not the listener.

mod common;

use common::raw::*;
use common::*;
use longwire_iscsi::initiator::{Initiator, LoginOptions};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// The server's NBD listener on `ip`.
fn nbd_on(s: &Server, ip: &str) -> SocketAddr {
    *s.tcp_addrs()
        .iter()
        .find(|a| a.ip().to_string() == ip)
        .unwrap_or_else(|| panic!("no NBD listener on {ip}"))
}

fn iscsi_on(s: &Server, ip: &str) -> SocketAddr {
    *s.iscsi_addrs()
        .iter()
        .find(|a| a.ip().to_string() == ip)
        .unwrap_or_else(|| panic!("no iSCSI listener on {ip}"))
}

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

fn nbd_server() -> Server {
    Server::start(&[
        "--export",
        "public=memory:?size=1M",
        "--export",
        "secret=memory:?size=2M",
        "--allow",
        "secret=127.0.0.1/32",
        "--listen",
        "127.0.0.1:0",
        "--listen",
        "[::1]:0",
        "--listen",
        "[::ffff:127.0.0.1]:0",
        "--unix",
        "{dir}/nbd.sock",
    ])
}

/// `nbdinfo --list --json` through `uri`.
fn listed(s: &Server, uri: &str) -> String {
    s.run("nbdinfo", &["--list", "--json", uri])
}

#[test]
fn nbd_list_shows_an_export_only_to_allowed_addresses() {
    let s = nbd_server();
    let v6 = listed(&s, &format!("nbd://{}", nbd_on(&s, "::1")));
    assert!(v6.contains("\"public\""), "{v6}");
    assert!(!v6.contains("secret"), "::1 must not see secret:\n{v6}");
    let v4 = listed(&s, &format!("nbd://{}", nbd_on(&s, "127.0.0.1")));
    assert!(
        v4.contains("\"public\"") && v4.contains("\"secret\""),
        "{v4}"
    );
    // ::ffff:127.0.0.1 is 127.0.0.1.
    let mapped = listed(&s, &format!("nbd://{}", nbd_on(&s, "::ffff:127.0.0.1")));
    assert!(
        mapped.contains("\"secret\""),
        "an IPv4-mapped client must match the IPv4 rule:\n{mapped}"
    );
    // Unix-socket clients are local: always allowed.
    let unix = listed(
        &s,
        &format!("nbd+unix:///?socket={}", s.unix_path().display()),
    );
    assert!(unix.contains("\"secret\""), "{unix}");

    // The source address decides, not the listener dialled.
    let out = s.python(&format!(
        r#"
import socket
def names(src, dst):
    host, port = dst.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((src, 0))
    sock.connect((host, int(port)))
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_socket(sock.detach())
    found = []
    h.opt_list(lambda name, desc: found.append(name))
    h.opt_abort()
    return sorted(found)
print("from .2:", names("127.0.0.2", "{one}"))
print("from .1:", names("127.0.0.1", "{one}"))
"#,
        one = nbd_on(&s, "127.0.0.1"),
    ));
    assert!(out.contains("from .2: ['public']"), "{out}");
    assert!(out.contains("from .1: ['public', 'secret']"), "{out}");
    assert_no_panics(&s);
}

#[test]
fn nbd_refusal_looks_like_an_unknown_export() {
    let s = nbd_server();
    let v6 = nbd_on(&s, "::1");
    // nbdinfo (GO) says the same for the hidden export as for one that
    // does not exist.
    let err = |name: &str| {
        let out = s.run_unchecked("nbdinfo", &[&format!("nbd://{v6}/{name}")]);
        assert!(!out.status.success(), "nbdinfo {name} from ::1 must fail");
        String::from_utf8_lossy(&out.stderr).replace(name, "NAME")
    };
    let hidden = err("secret");
    assert_eq!(
        hidden,
        err("nosuch"),
        "a hidden export must look like a missing one"
    );
    // qemu is refused too, and gets in from the allowed address.
    let (out, timed_out) = output_with_timeout(
        command("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "read 0 4k",
            &format!("nbd://{v6}/secret"),
        ]),
        Duration::from_secs(30),
    );
    assert!(
        !timed_out && !out.status.success(),
        "qemu-io from ::1: {out:?}"
    );
    let v4 = nbd_on(&s, "127.0.0.1");
    let (w, _) = s.qemu_io(&format!("nbd://{v4}/secret"), &["write -P 0x5a 0 64k"]);
    assert!(w.contains("wrote 65536/65536"), "{w}");
    let (r, _) = s.qemu_io(&format!("nbd://{v4}/secret"), &["read -P 0x5a 0 64k"]);
    assert!(r.contains("read 65536/65536"), "{r}");

    // Byte level, from ::1: INFO and metadata contexts get ERR_UNKNOWN
    // with the unknown-export message; EXPORT_NAME closes.
    let start = || {
        let mut c = Conn::connect_addr(v6);
        c.greeting();
        c.send(&(C_FIXED_NEWSTYLE | C_NO_ZEROES).to_be_bytes());
        c
    };
    let mut c = start();
    let (typ, msg) = c.info_go(OPT_INFO, "secret", &[]).unwrap_err();
    assert_eq!(
        (typ, msg.as_str()),
        (
            REP_ERR_UNKNOWN,
            "no export named \"secret\"; NBD_OPT_LIST shows the exports"
        )
    );
    c.expect_ack(OPT_STRUCTURED_REPLY, &[]);
    let e = c.expect_opt_error(
        OPT_SET_META_CONTEXT,
        &meta_payload("secret", &["base:allocation"]),
        REP_ERR_UNKNOWN,
    );
    assert_eq!(e, "no export named \"secret\"");
    // The connection goes on with what it may use.
    c.go("public");
    c.style = Style::Structured;
    c.assert_alive(1, "public after a refused secret");
    let mut old = start();
    old.option(OPT_EXPORT_NAME, b"secret");
    old.expect_closed("EXPORT_NAME for a hidden export");
    let logs = s.logs();
    assert!(
        logs.contains("refused: client address ::1 may not use export \"secret\""),
        "refusals are logged:\n{logs}"
    );
    assert_no_panics(&s);
}

#[test]
fn server_wide_default_and_per_export_override_from_the_config_file() {
    let config = r#"
listen = ["127.0.0.1:0", "[::1]:0"]
allow = ["127.0.0.1"]
[[export]]
name = "default-rule"
uri = "memory:?size=1M"
[[export]]
name = "everyone"
uri = "memory:?size=1M"
allow = ["127.0.0.0/8", "::1"]
[[export]]
name = "unix-only"
uri = "memory:?size=1M"
allow = []
"#;
    let s = Server::start_with(
        &["--config", "{dir}/lw.toml", "--unix", "{dir}/nbd.sock"],
        Some(3),
        |d| std::fs::write(d.join("lw.toml"), config).unwrap(),
    );
    let v6 = listed(&s, &format!("nbd://{}", nbd_on(&s, "::1")));
    assert!(v6.contains("\"everyone\""), "{v6}");
    assert!(
        !v6.contains("default-rule") && !v6.contains("unix-only"),
        "{v6}"
    );
    let v4 = listed(&s, &format!("nbd://{}", nbd_on(&s, "127.0.0.1")));
    assert!(
        v4.contains("\"everyone\"") && v4.contains("\"default-rule\""),
        "{v4}"
    );
    assert!(!v4.contains("unix-only"), "{v4}");
    let unix = listed(
        &s,
        &format!("nbd+unix:///?socket={}", s.unix_path().display()),
    );
    for e in ["everyone", "default-rule", "unix-only"] {
        assert!(unix.contains(&format!("\"{e}\"")), "{e} over unix:\n{unix}");
    }
}

#[test]
fn bad_allow_entries_stop_the_server_with_a_hint() {
    let out = run_unchecked(
        command(&server_binary()).args([
            "serve",
            "--export",
            "a=memory:?size=1M",
            "--allow",
            "a=10.1.2.3/8",
            "--listen",
            "127.0.0.1:0",
        ]),
        "",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did you mean 10.0.0.0/8"), "{err}");
    let out = run_unchecked(
        command(&server_binary()).args([
            "serve",
            "--export",
            "a=memory:?size=1M",
            "--allow",
            "b=10.0.0.0/8",
            "--listen",
            "127.0.0.1:0",
        ]),
        "",
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no export named \"b\""),
        "{out:?}"
    );
}

const HIDDEN: &str = "iqn.2026-11.dev.longwire:hidden";
const GROUP: &str = "iqn.2026-11.dev.longwire:group";
const OPEN: &str = "iqn.2026-11.dev.longwire:open";

fn iscsi_server() -> Server {
    let config = r#"
iscsi = ["127.0.0.1:0", "[::1]:0"]
[[export]]
name = "open"
uri = "memory:?size=1M"
[[export]]
name = "hidden"
uri = "memory:?size=1M"
allow = ["127.0.0.1/32"]
[[export]]
name = "g0"
uri = "memory:?size=1M"
[[iscsi_target]]
name = "iqn.2026-11.dev.longwire:group"
luns = ["g0"]
allow = ["127.0.0.1"]
"#;
    Server::start_with_iscsi(&["--config", "{dir}/lw.toml"], Some(0), 2, |d| {
        std::fs::write(d.join("lw.toml"), config).unwrap()
    })
}

#[test]
fn iscsi_targets_are_invisible_to_addresses_not_allowed() {
    let s = iscsi_server();
    let v4 = iscsi_on(&s, "127.0.0.1");
    let v6 = iscsi_on(&s, "::1");
    let from_v6 = s.run("iscsi-ls", &[&format!("iscsi://{v6}")]);
    assert!(from_v6.contains(&format!("Target:{OPEN} ")), "{from_v6}");
    assert!(
        !from_v6.contains(HIDDEN) && !from_v6.contains(GROUP),
        "::1 must see neither:\n{from_v6}"
    );
    let from_v4 = s.run("iscsi-ls", &[&format!("iscsi://{v4}")]);
    for t in [OPEN, HIDDEN, GROUP] {
        assert!(
            from_v4.contains(&format!("Target:{t} ")),
            "{t} missing for 127.0.0.1:\n{from_v4}"
        );
    }

    // Login from ::1: "not found", exactly as for a target that does not
    // exist; from 127.0.0.1 it works.
    let inq_err = |target: &str| {
        let out = s.run_unchecked("iscsi-inq", &[&format!("iscsi://{v6}/{target}/0")]);
        assert!(
            !out.status.success(),
            "iscsi-inq {target} from ::1 must fail"
        );
        String::from_utf8_lossy(&out.stderr).replace(target, "T")
    };
    let hidden = inq_err(HIDDEN);
    assert_eq!(
        hidden,
        inq_err("iqn.2026-11.dev.longwire:nosuch"),
        "a hidden target must look like a missing one"
    );
    assert_eq!(inq_err(GROUP), hidden);
    for t in [HIDDEN, GROUP] {
        let ok = s.run("iscsi-inq", &[&format!("iscsi://{v4}/{t}/0")]);
        assert!(ok.contains("DIRECT_ACCESS"), "{t} from 127.0.0.1: {ok}");
    }
    // The status at byte level: 02/03 (not 02/02, which would confirm the
    // target exists).
    let mut i = Initiator::connect(v6).unwrap();
    let f = i
        .login(&LoginOptions::normal(
            "iqn.2026-11.dev.longwire.test:a",
            HIDDEN,
        ))
        .unwrap_err();
    assert_eq!((f.class, f.detail), (0x02, 0x03));
    let logs = s.logs();
    assert!(
        logs.contains(&format!("address ::1 may not use target \"{HIDDEN}\"")),
        "{logs}"
    );
    assert_no_panics(&s);
}

#[test]
fn iscsi_server_wide_connection_limit() {
    let s = Server::start(&[
        "--export",
        "a=memory:?size=1M",
        "--iscsi",
        "127.0.0.1:0",
        "--max-connections",
        "2",
    ]);
    let addr = s.iscsi_addr();
    // Two connections that have not logged in yet hold the two places.
    let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    thread::sleep(Duration::from_millis(200));
    let mut third = TcpStream::connect(addr).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let t0 = Instant::now();
    let mut b = [0u8; 48];
    assert!(
        matches!(third.read(&mut b), Ok(0) | Err(_)),
        "the third connection is closed"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "closed at once, not after {:?}",
        t0.elapsed()
    );
    let out = s.run_unchecked("iscsi-ls", &[&format!("iscsi://{addr}")]);
    assert!(
        !out.status.success(),
        "iscsi-ls over the limit must fail: {out:?}"
    );
    // One place frees up: a real initiator gets in.
    drop(held);
    let ok = eventually(Duration::from_secs(5), || {
        let out = s.run_unchecked("iscsi-ls", &[&format!("iscsi://{addr}")]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .expect("iscsi-ls after the held connections closed");
    assert!(ok.contains("iqn.2026-11.dev.longwire:a"), "{ok}");
    assert!(
        s.logs()
            .contains("iSCSI connection limit reached (2 connections)"),
        "{}",
        s.logs()
    );
    assert_no_panics(&s);
}

#[test]
fn iscsi_login_timeout_closes_silent_connections() {
    let s = Server::start(&[
        "--export",
        "a=memory:?size=1M",
        "--iscsi",
        "127.0.0.1:0",
        "--handshake-timeout",
        "2",
    ]);
    let mut silent = TcpStream::connect(s.iscsi_addr()).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t0 = Instant::now();
    let mut b = [0u8; 48];
    assert!(
        matches!(silent.read(&mut b), Ok(0) | Err(_)),
        "a silent connection is closed"
    );
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(5),
        "closed after {took:?}, want ~2 s"
    );
    // Real initiators log in well within it.
    assert!(s
        .run("iscsi-ls", &[&format!("iscsi://{}", s.iscsi_addr())])
        .contains(":a "));
    assert!(
        s.logs().contains("login timed out after 2s"),
        "{}",
        s.logs()
    );
}

#[test]
fn iscsi_per_target_session_limit() {
    let config = r#"
iscsi = ["127.0.0.1:0"]
[[export]]
name = "a"
uri = "memory:?size=1M"
[[export]]
name = "b"
uri = "memory:?size=1M"
[[iscsi_target]]
name = "iqn.2026-11.dev.longwire:one-at-a-time"
luns = ["a"]
max_connections = 1
"#;
    let s = Server::start_with_iscsi(&["--config", "{dir}/lw.toml"], Some(0), 1, |d| {
        std::fs::write(d.join("lw.toml"), config).unwrap()
    });
    let target = "iqn.2026-11.dev.longwire:one-at-a-time";
    let mut first = Initiator::connect(s.iscsi_addr()).unwrap();
    first
        .login(&LoginOptions::normal(
            "iqn.2026-11.dev.longwire.test:first",
            target,
        ))
        .unwrap();
    let url = s.iscsi_url(target, 0);
    let out = s.run_unchecked("iscsi-inq", &[&url]);
    assert!(
        !out.status.success(),
        "a second session must be refused: {out:?}"
    );
    let mut second = Initiator::connect(s.iscsi_addr()).unwrap();
    let f = second
        .login(&LoginOptions::normal(
            "iqn.2026-11.dev.longwire.test:second",
            target,
        ))
        .unwrap_err();
    assert_eq!((f.class, f.detail), (0x03, 0x02), "out of resources");
    // Other targets are not affected.
    assert!(s
        .run(
            "iscsi-inq",
            &[&s.iscsi_url("iqn.2026-11.dev.longwire:b", 0)]
        )
        .contains("DIRECT_ACCESS"));
    first.logout().unwrap();
    let ok = eventually(Duration::from_secs(5), || {
        let out = s.run_unchecked("iscsi-inq", &[&url]);
        out.status.success().then_some(())
    });
    assert!(
        ok.is_some(),
        "iscsi-inq after the first session logged out:\n{}",
        s.logs()
    );
    assert!(
        s.logs().contains("has reached its session limit (1)"),
        "{}",
        s.logs()
    );
}

#[test]
fn iscsi_idle_sessions_are_closed_busy_ones_are_not() {
    let s = Server::start(&[
        "--export",
        "a=memory:?size=1M",
        "--iscsi",
        "127.0.0.1:0",
        "--idle-timeout",
        "2",
    ]);
    let target = "iqn.2026-11.dev.longwire:a";
    let mut busy = Initiator::connect(s.iscsi_addr()).unwrap();
    busy.login(&LoginOptions::normal(
        "iqn.2026-11.dev.longwire.test:busy",
        target,
    ))
    .unwrap();
    let mut idle = Initiator::connect(s.iscsi_addr()).unwrap();
    idle.login(&LoginOptions::normal(
        "iqn.2026-11.dev.longwire.test:idle",
        target,
    ))
    .unwrap();
    let t0 = Instant::now();
    // TEST UNIT READY every 500 ms for 4 s keeps one session busy.
    while t0.elapsed() < Duration::from_secs(4) {
        let r = busy.command(0, &[0u8; 6], 0, &[]).unwrap();
        assert_eq!(r.status, 0);
        thread::sleep(Duration::from_millis(500));
    }
    assert!(
        idle.closed_within(Duration::from_secs(1)),
        "the idle session was not closed after 4 s"
    );
    let r = busy.command(0, &[0u8; 6], 0, &[]).unwrap();
    assert_eq!(r.status, 0, "the busy session still works");
    assert!(
        s.logs().contains("closing iSCSI session idle for 2s"),
        "{}",
        s.logs()
    );
}
