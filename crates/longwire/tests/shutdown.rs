//! Graceful shutdown: SIGTERM/SIGINT with idle or busy clients exits 0
//! within 5 s, listeners are closed afterwards, and data written before the
//! shutdown is there after a restart on the same images.

mod common;

use common::*;
use std::time::{Duration, Instant};

const EXIT_LIMIT: Duration = Duration::from_secs(5);

fn server() -> Server {
    Server::start(&[
        "--export",
        "disk=file:{dir}/disk.img?size=64M",
        "--export",
        "mem=memory:?size=64M",
        "--listen",
        "127.0.0.1:0",
        "--unix",
        "{dir}/nbd.sock",
    ])
}

/// Signal the server and assert it exits with code 0 within EXIT_LIMIT.
fn stop_within_limit(s: &mut Server, sig: libc::c_int) -> Duration {
    let t0 = Instant::now();
    s.stop_with(sig, EXIT_LIMIT);
    t0.elapsed()
}

const IDLE_CLIENT: &str = r#"
a = connect("disk")                       # TCP
b = connect("mem", transport="unix")      # unix socket
a.pwrite(b"idle-client" * 100, 0)
b.pread(4096, 0)
print("READY", flush=True)
sys.stdin.readline()                      # server has exited by now
# The connections are closed: requests fail promptly instead of hanging.
for n, h in (("tcp", a), ("unix", b)):
    try:
        h.pread(4096, 0)
        raise AssertionError("%s: request after server shutdown succeeded" % n)
    except nbd.Error as e:
        print("closed", n, e, flush=True)
"#;

fn idle_client_then(sig: libc::c_int) {
    let mut s = server();
    let tcp = s.tcp_addr();
    let sock = s.unix_path();
    let mut client = s.spawn_script(IDLE_CLIENT);
    client.wait_for("READY", Duration::from_secs(60), &s);
    let took = stop_within_limit(&mut s, sig);
    eprintln!("server exited after {took:?}");

    // New connections are refused after the exit.
    match tcp_connect(tcp) {
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "TCP connect after shutdown: unexpected error {e}"
        ),
        Ok(_) => panic!("TCP connection to {tcp} accepted after the server exited"),
    }
    assert!(
        std::os::unix::net::UnixStream::connect(&sock).is_err(),
        "unix socket {} still accepts connections after the server exited",
        sock.display()
    );
    let out = s.run_unchecked("nbdinfo", &["--size", &Server::tcp_uri_at(tcp, "disk")]);
    assert!(
        !out.status.success(),
        "nbdinfo succeeded after shutdown: {out:?}"
    );

    client.send_line("go");
    let lines = client.finish(Duration::from_secs(20));
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("closed")).count(),
        2,
        "{lines:?}"
    );
}

#[test]
fn sigterm_with_idle_clients_exits_zero_within_5s() {
    idle_client_then(libc::SIGTERM);
}

#[test]
fn sigint_with_idle_clients_exits_zero_within_5s() {
    idle_client_then(libc::SIGINT);
}

/// SIGTERM immediately after the server announced its listeners (what a
/// supervisor may do right after readiness). Repeated, because the window in
/// which a signal could arrive before its handler is installed is small.
#[test]
fn sigterm_right_after_startup_exits_zero() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        for _ in 0..10 {
            let mut s = server();
            stop_within_limit(&mut s, sig);
        }
    }
}

#[test]
fn sigterm_with_client_in_the_middle_of_negotiation() {
    // A client that connected but never finished the handshake must not
    // block shutdown.
    let mut s = server();
    let mut raw = tcp_connect(s.tcp_addr()).expect("connect");
    let mut greeting = [0u8; 18];
    std::io::Read::read_exact(&mut raw, &mut greeting).expect("read greeting");
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    stop_within_limit(&mut s, libc::SIGTERM);
}

const BUSY_CLIENT: &str = r#"
h = connect("disk")
BS = 256 * KiB
acked = -1
print("BUSY", flush=True)
t0 = time.time()
try:
    i = 0
    while time.time() - t0 < 60:
        h.pwrite(pat(i % 251, BS), (i % 200) * BS)
        acked = i
        i += 1
        if i == 20:
            print("STARTED", flush=True)
    raise AssertionError("the server never closed the connection")
except nbd.Error as e:
    print("ACKED", acked, flush=True)
"#;

#[test]
fn sigterm_during_busy_io_exits_zero_and_keeps_acknowledged_writes() {
    let mut s = server();
    let mut client = s.spawn_script(BUSY_CLIENT);
    client.wait_for("STARTED", Duration::from_secs(60), &s);
    std::thread::sleep(Duration::from_millis(200));
    stop_within_limit(&mut s, libc::SIGTERM);
    let acked_line = client.wait_for("ACKED", Duration::from_secs(30), &s);
    client.finish(Duration::from_secs(20));
    let acked: i64 = acked_line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(acked >= 19, "{acked_line}");

    // Every acknowledged write (the last one for each block) is in the image.
    s.start_again();
    s.python(&format!(
        r#"
acked = {acked}
h = connect("disk")
BS = 256 * KiB
last = {{}}
for i in range(acked + 1):
    last[i % 200] = i
for blk, i in sorted(last.items()):
    got = bytes(h.pread(BS, blk * BS))
    # The write after the last acknowledged one was in flight: it may or may
    # not have been applied.
    nxt = acked + 1
    if blk == nxt % 200 and got == pat(nxt % 251, BS):
        continue
    check_buf(got, pat(i % 251, BS), "block %d (write #%d, acknowledged before SIGTERM)" % (blk, i))
print("ok")
"#
    ));
}

#[test]
fn flushed_data_survives_sigterm_and_restart() {
    let mut s = server();
    s.python(
        r#"
h = connect("disk")
h.pwrite(pat(1, 1 * MiB), 1 * MiB)
h.pwrite(pat(2, 4096), 63 * MiB, flags=nbd.CMD_FLAG_FUA)
h.zero(1 * MiB, 10 * MiB)
h.flush()
# Keep the connection open; the test shuts the server down underneath it.
print("ok")
"#,
    );
    let first_port = s.tcp_addr();
    stop_within_limit(&mut s, libc::SIGTERM);

    // Restart with the same arguments in the same directory (new port; the
    // same unix socket path must be reusable).
    s.start_again();
    eprintln!("restarted: {first_port} -> {}", s.tcp_addr());
    s.python(
        r#"
for transport in ("tcp", "unix"):
    h = connect("disk", transport=transport)
    check_buf(h.pread(1 * MiB, 1 * MiB), pat(1, 1 * MiB), transport + ": data written before shutdown")
    check_buf(h.pread(4096, 63 * MiB), pat(2, 4096), transport + ": FUA data written before shutdown")
    check(bytes(h.pread(1 * MiB, 10 * MiB)) == bytes(1 * MiB), transport + ": zeroed range")
    check(bytes(h.pread(4096, 0)) == bytes(4096), transport + ": never-written range")
    # The memory export starts empty again.
    m = connect("mem", transport=transport)
    check(bytes(m.pread(4096, 0)) == bytes(4096), "memory export after restart")
print("ok")
"#,
    );
    stop_within_limit(&mut s, libc::SIGTERM);
}

#[test]
fn restart_after_sigkill_reuses_unix_socket_path_and_image() {
    let mut s = server();
    s.python(
        r#"
h = connect("disk", transport="unix")
h.pwrite(b"before-crash" * 100, 8192)
h.flush()
print("ok")
"#,
    );
    s.kill();
    // A stale socket file may be left behind by a crash; the server must
    // still start on the same path.
    s.start_again();
    s.python(
        r#"
h = connect("disk", transport="unix")
check_eq(bytes(h.pread(1200, 8192)), b"before-crash" * 100, "data after crash + restart")
print("ok")
"#,
    );
}
