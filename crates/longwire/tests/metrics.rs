//! The admin endpoint: `/metrics` (Prometheus text format) and `/status`
//! (JSON) and `longwire status`, fed by both front-ends. Real clients
//! (qemu-io, nbdsh, iscsi-ls) do the I/O; the exposition is fetched over a
//! raw TCP socket, parsed, and the counters must move by exactly what the
//! clients did.

mod common;

use common::json::Json;
use common::raw::*;
use common::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

const DISK: &str = "disk";
const MIB: f64 = 1048576.0;

/// The admin address the server logged.
fn admin_addr(s: &Server) -> SocketAddr {
    for line in s.stderr_lines() {
        let line = strip_ansi(&line);
        if let Some(i) = line.find("admin HTTP endpoint at http://") {
            let rest = &line[i + "admin HTTP endpoint at http://".len()..];
            let addr = rest.split('/').next().unwrap();
            return addr.parse().unwrap_or_else(|e| panic!("admin address {addr:?}: {e}"));
        }
    }
    panic!("the server did not log its admin endpoint\n{}", s.logs());
}

/// Send `request` as is; the whole answer (the server closes after one).
fn http_raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    // The server may answer and close before reading all of a bad request.
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// GET `path`; asserts a 200 and returns the body.
fn get(addr: SocketAddr, path: &str) -> String {
    let answer = http_raw(addr, format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP answer: {answer:?}"));
    assert!(head.starts_with("HTTP/1.1 200 "), "GET {path}: {head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .unwrap();
    assert_eq!(body.len(), len, "body length vs Content-Length");
    body.to_string()
}

/// One sample of the exposition: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parse the text exposition format, checking its shape: every sample
/// belongs to a family announced once by HELP and TYPE, before it.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = std::collections::BTreeSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap().to_string();
            assert!(helped.insert(name.clone()), "HELP for {name} twice");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().unwrap().to_string(), it.next().unwrap().to_string());
            assert!(["counter", "gauge", "histogram"].contains(&kind.as_str()), "{line}");
            assert!(typed.insert(name.clone(), kind).is_none(), "TYPE for {name} twice");
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => (name.to_string(), parse_labels(rest.strip_suffix('}').expect("closing brace"))),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.get(*f).is_some_and(|k| k == "histogram")))
            .unwrap_or(&name)
            .to_string();
        assert!(typed.contains_key(&family) && helped.contains(&family), "sample {name} before its HELP/TYPE");
        samples.push((name, labels, value));
    }
    samples
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        assert_eq!(chars.next(), Some('"'), "label value must be quoted in {s:?}");
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => panic!("dangling escape in {s:?}"),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(key, value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
}

/// The scraped exposition, with lookups.
struct Metrics(Vec<Sample>);

impl Metrics {
    fn scrape(addr: SocketAddr) -> Metrics {
        Metrics(parse_exposition(&get(addr, "/metrics")))
    }

    /// The one sample of `name` whose labels include `want`; 0 if absent.
    fn value(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        let found: Vec<f64> = self
            .0
            .iter()
            .filter(|(n, l, _)| n == name && want.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
            .map(|(_, _, v)| *v)
            .collect();
        assert!(found.len() <= 1, "{name} {want:?} matches {} samples", found.len());
        found.first().copied().unwrap_or(0.0)
    }

    fn has(&self, name: &str, want: &[(&str, &str)]) -> bool {
        self.0.iter().any(|(n, l, _)| n == name && want.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
    }

    /// A histogram's buckets are cumulative and end at its count.
    fn check_histogram(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        let buckets: Vec<(f64, f64)> = self
            .0
            .iter()
            .filter(|(n, l, _)| {
                n == &format!("{name}_bucket") && want.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, l, v)| (if l["le"] == "+Inf" { f64::INFINITY } else { l["le"].parse().unwrap() }, *v))
            .collect();
        assert!(buckets.len() > 10, "{name} {want:?} has {} buckets", buckets.len());
        assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{name} buckets not cumulative: {buckets:?}");
        let count = self.value(&format!("{name}_count"), want);
        assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, count), "{name}: +Inf bucket vs count");
        count
    }
}

fn status_json(addr: SocketAddr) -> Json {
    Json::parse(&get(addr, "/status")).expect("/status is JSON")
}

fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

/// `longwire status ARGS`; (success, stdout, stderr).
fn longwire_status(args: &[&str]) -> (bool, String, String) {
    let mut cmd = command(&server_binary());
    cmd.arg("status").args(args);
    let (out, timed_out) = output_with_timeout(&mut cmd, Duration::from_secs(30));
    assert!(!timed_out, "longwire status timed out");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn nbd_server() -> Server {
    Server::start(&["--export", "disk=memory:?size=64M", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
}

#[test]
fn nbd_requests_bytes_errors_and_latency_are_counted() {
    let s = nbd_server();
    let admin = admin_addr(&s);
    let e = [("export", DISK)];
    let before = Metrics::scrape(admin);
    assert_eq!(before.value("longwire_export_size_bytes", &e), 64.0 * MIB);
    assert_eq!(before.value("longwire_written_bytes_total", &e), 0.0);

    // qemu-io: one 1 MiB write (and the flush qemu sends when it closes).
    s.qemu_io(&s.qemu_uri(DISK), &["write -P 0xab 0 1M"]);
    let m = Metrics::scrape(admin);
    assert_eq!(m.value("longwire_written_bytes_total", &e), MIB);
    assert_eq!(m.value("longwire_requests_total", &[("export", DISK), ("op", "write")]), 1.0);
    assert_eq!(m.value("longwire_request_errors_total", &[("export", DISK), ("op", "write")]), 0.0);
    assert_eq!(m.check_histogram("longwire_request_duration_seconds", &[("export", DISK), ("op", "write")]), 1.0);
    assert!(m.value("longwire_request_duration_seconds_sum", &[("export", DISK), ("op", "write")]) > 0.0);

    // nbdsh: a 4 KiB read, a flush, and a read past the end (libnbd's
    // own bounds check off, so the server sees it and must refuse it).
    let flushes = m.value("longwire_requests_total", &[("export", DISK), ("op", "flush")]);
    let out = s.nbdsh_ok(
        Some(&s.uri(DISK)),
        "assert h.pread(4096, 0) == b'\\xab' * 4096\n\
         h.flush()\n\
         h.set_strict_mode(0)\n\
         try:\n    h.pread(512, 64 << 20)\n    print('READ PAST END SUCCEEDED')\n\
         except nbd.Error as e:\n    print('refused', e.errno)\n",
    );
    assert!(out.contains("refused"), "{out}");
    let m = Metrics::scrape(admin);
    let read = [("export", DISK), ("op", "read")];
    assert_eq!(m.value("longwire_read_bytes_total", &e), 4096.0, "refused reads move no bytes");
    assert_eq!(m.value("longwire_requests_total", &read), 2.0);
    assert_eq!(m.value("longwire_request_errors_total", &read), 1.0);
    assert_eq!(m.check_histogram("longwire_request_duration_seconds", &read), 1.0, "the refused read never ran");
    assert_eq!(m.value("longwire_requests_total", &[("export", DISK), ("op", "flush")]), flushes + 1.0);
    assert_eq!(m.value("longwire_requests_in_flight", &e), 0.0);

    // The same totals in /status.
    let st = status_json(admin);
    let ex = &st.get("exports").as_array()[0];
    assert_eq!(ex.get("name").as_str(), DISK);
    assert_eq!(ex.get("bytes_written").as_u64(), 1 << 20);
    assert_eq!(ex.get("bytes_read").as_u64(), 4096);
    assert_eq!(ex.get("errors").as_u64(), 1);
    assert_eq!(ex.get("protocols").as_array(), &[Json::Str("nbd".into())]);
}

#[test]
fn connections_are_listed_while_open_and_gone_after() {
    let s = nbd_server();
    let admin = admin_addr(&s);
    let (mut c, _) = Conn::open(&s, DISK, Style::Simple, false);
    let peer = c.s.local_addr().unwrap().to_string();
    // One 512-byte read, answered.
    c.send(&compact_request(0, 0, 7, 0, 512));
    let reply = c.recv(16 + 512);
    assert_eq!(be32(&reply[4..8]), 0, "read error");

    let st = status_json(admin);
    let conns = st.get("connections").as_array();
    let me = conns.iter().find(|x| x.get("peer").as_str() == peer).unwrap_or_else(|| panic!("{peer} not in {conns:?}"));
    assert_eq!(me.get("protocol").as_str(), "nbd");
    assert_eq!(me.get("export").as_str(), DISK);
    assert_eq!(me.get("state").as_str(), "transmission");
    assert_eq!((me.get("queued").as_u64(), me.get("dispatched").as_u64(), me.get("pending").as_u64()), (1, 1, 0));
    assert_eq!(me.get("bytes_read").as_u64(), 512);
    assert_eq!(st.get("exports").as_array()[0].get("connections").as_u64(), 1);
    let id = me.get("id").as_u64().to_string();

    let m = Metrics::scrape(admin);
    let labels = [("conn", id.as_str()), ("peer", peer.as_str()), ("export", DISK), ("protocol", "nbd")];
    assert_eq!(m.value("longwire_connection_read_bytes_total", &labels), 512.0);
    assert_eq!(m.value("longwire_connection_requests_total", &labels), 1.0);
    assert_eq!(m.check_histogram("longwire_connection_request_duration_seconds", &labels), 1.0);
    assert_eq!(m.value("longwire_connections", &[("protocol", "nbd")]), 1.0);
    assert_eq!(m.value("longwire_export_connections", &[("export", DISK), ("protocol", "nbd")]), 1.0);

    // The table as people read it.
    let (ok, out, err) = longwire_status(&["--admin", &admin.to_string()]);
    assert!(ok, "longwire status failed: {err}");
    let export_line = out.lines().find(|l| l.starts_with("disk ")).unwrap_or_else(|| panic!("no export row:\n{out}"));
    assert!(export_line.contains("64.0 MiB") && export_line.contains("nbd"), "{out}");
    let conn_line = out.lines().find(|l| l.contains(&peer)).unwrap_or_else(|| panic!("no row for {peer}:\n{out}"));
    let cols: Vec<&str> = conn_line.split_whitespace().collect();
    assert_eq!(&cols[..9], &[id.as_str(), "nbd", DISK, peer.as_str(), "transmission", "1", "1", "0", "0"], "{out}");
    let (ok, json, _) = longwire_status(&["--admin", &admin.to_string(), "--json"]);
    assert!(ok && Json::parse(&json).is_ok(), "{json}");

    // Disconnect: the row goes away.
    c.send(&compact_request(0, 2, 8, 0, 0));
    drop(c);
    let gone = eventually(Duration::from_secs(5), || {
        status_json(admin).get("connections").as_array().iter().all(|x| x.get("peer").as_str() != peer)
    });
    assert!(gone, "connection still listed after disconnect");
    let m = Metrics::scrape(admin);
    assert!(!m.has("longwire_connection_requests_total", &[("peer", peer.as_str())]));
    assert_eq!(m.value("longwire_connections", &[("protocol", "nbd")]), 0.0);
    let (_, out, _) = longwire_status(&["--admin", &admin.to_string()]);
    assert!(out.contains("no connections"), "{out}");
}

#[test]
fn iscsi_commands_are_counted() {
    let s = Server::start(&[
        "--export",
        "disk=memory:?size=64M",
        "--listen",
        "127.0.0.1:0",
        "--iscsi",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]);
    let admin = admin_addr(&s);
    let target = "iqn.2026-11.dev.longwire:disk";
    let url = s.iscsi_url(target, 0);
    s.qemu_io(&url, &["write -P 0x5a 0 1M"]);
    s.qemu_io(&url, &["read -P 0x5a 0 64k"]);
    // Discovery and INQUIRY-style commands count as "other", not as I/O.
    require_tool("iscsi-ls");
    let out = run_cmd(command("iscsi-ls").args(["-s", &format!("iscsi://{}", s.iscsi_addr())]), &s.logs());
    assert!(out.contains(target), "{out}");

    let e = [("export", DISK)];
    let m = Metrics::scrape(admin);
    assert_eq!(m.value("longwire_written_bytes_total", &e), MIB);
    // qemu reads a little on open (probing), so at least the 64 KiB asked for.
    assert!(m.value("longwire_read_bytes_total", &e) >= 65536.0);
    assert!(m.value("longwire_requests_total", &[("export", DISK), ("op", "write")]) >= 1.0);
    assert!(m.value("longwire_requests_total", &[("export", DISK), ("op", "other")]) >= 1.0, "INQUIRY etc.");
    assert!(m.value("longwire_requests_total", &[("export", DISK), ("op", "flush")]) >= 1.0, "SYNCHRONIZE CACHE");
    assert!(m.check_histogram("longwire_request_duration_seconds", &[("export", DISK), ("op", "read")]) >= 1.0);
    let st = status_json(admin);
    let protos = st.get("exports").as_array()[0].get("protocols").as_array().to_vec();
    assert_eq!(protos, vec![Json::Str("nbd".into()), Json::Str("iscsi".into())]);

    // A session kept open (qemu-io waiting on its stdin) is listed with its
    // peer address, the export behind its target, and its state.
    require_tool("qemu-io");
    let mut open = command("qemu-io")
        .args(["-f", "raw", &url])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let listed = eventually(Duration::from_secs(10), || {
        status_json(admin).get("connections").as_array().iter().any(|c| {
            c.get("protocol").as_str() == "iscsi"
                && c.get("export").as_str() == DISK
                && c.get("state").as_str() == "transmission"
                && c.get("peer").as_str().starts_with("127.0.0.1:")
        })
    });
    let table = longwire_status(&["--admin", &admin.to_string()]).1;
    drop(open.stdin.take()); // qemu-io quits at end of input
    let _ = open.wait();
    assert!(listed, "no iSCSI session listed: {:?}", status_json(admin).get("connections"));
    assert!(table.lines().any(|l| l.contains(" iscsi ") && l.contains("127.0.0.1:") && l.contains("transmission")), "{table}");
    // Sessions over: no iSCSI connection stays listed.
    let gone = eventually(Duration::from_secs(5), || Metrics::scrape(admin).value("longwire_connections", &[("protocol", "iscsi")]) == 0.0);
    assert!(gone, "iSCSI connections still listed: {:?}", status_json(admin).get("connections"));
}

#[test]
fn bad_http_gets_an_error_and_the_server_lives_on() {
    let s = nbd_server();
    let admin = admin_addr(&s);
    let status_of = |req: &[u8]| -> String {
        let answer = http_raw(admin, req);
        answer.lines().next().unwrap_or("").to_string()
    };
    assert!(status_of(b"garbage\r\n\r\n").starts_with("HTTP/1.1 400 "));
    assert!(status_of(b"GET metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 400 "));
    assert!(status_of(b"GET /metrics HTTP/1.1\r\nbroken header\r\n\r\n").starts_with("HTTP/1.1 400 "));
    assert!(status_of(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n").starts_with("HTTP/1.1 400 "), "a TLS hello");
    assert!(status_of(b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").starts_with("HTTP/1.1 400 "));
    assert!(status_of(b"DELETE /status HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405 "));
    assert!(status_of(b"GET /nothing-here HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
    // An endless head is cut off at the bound, not buffered.
    let mut long = b"GET /metrics HTTP/1.1\r\nX-Long: ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 64 * 1024));
    assert!(status_of(&long).starts_with("HTTP/1.1 431 "));
    // Connect and leave without a word; half a request, then leave.
    drop(TcpStream::connect(admin).unwrap());
    let mut half = TcpStream::connect(admin).unwrap();
    half.write_all(b"GET /met").unwrap();
    drop(half);
    // HEAD gets headers only.
    let head = http_raw(admin, b"HEAD /metrics HTTP/1.0\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 ") && head.ends_with("\r\n\r\n"), "{head}");

    // Still serving both sides.
    assert!(get(admin, "/metrics").contains("# TYPE longwire_requests_total counter"));
    s.qemu_io(&s.qemu_uri(DISK), &["write -P 1 0 4k"]);
    assert_eq!(Metrics::scrape(admin).value("longwire_written_bytes_total", &[("export", DISK)]), 4096.0);
}

#[test]
fn admin_is_off_unless_asked_and_status_says_what_to_do() {
    // Listeners given, no --admin: no endpoint.
    let s = Server::start(&["--export", "disk=memory:?size=1M", "--listen", "127.0.0.1:0"]);
    assert!(!s.stderr_lines().iter().any(|l| l.contains("admin HTTP endpoint")), "{}", s.logs());

    // No server at that address: a clear error naming the fix.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (ok, _, err) = longwire_status(&["--admin", &free.to_string()]);
    assert!(!ok);
    assert!(err.contains(&format!("is `longwire serve --admin {free}` running?")), "{err}");
    let (ok, _, err) = longwire_status(&["--admin", "not-an-address"]);
    assert!(!ok && err.contains("not an address like 127.0.0.1:9810"), "{err}");
}

#[test]
fn admin_address_from_the_config_file() {
    let s = Server::start_prepared(&["--config", "{dir}/longwire.toml"], |dir| {
        std::fs::write(
            dir.join("longwire.toml"),
            "listen = [\"127.0.0.1:0\"]\nadmin = \"127.0.0.1:0\"\n\n[[export]]\nname = \"disk\"\nuri = \"memory:?size=1M\"\n",
        )
        .unwrap();
    });
    let admin = admin_addr(&s);
    let st = status_json(admin);
    assert_eq!(st.get("exports").as_array()[0].get("size").as_u64(), 1 << 20);
}

#[test]
fn layer_states_and_gauges_are_exported() {
    // A clone export reports its hydration through Volume::status().
    let src = Server::start(&["--export", "disk=memory:?size=4M", "--listen", "127.0.0.1:0"]);
    src.qemu_io(&src.qemu_uri(DISK), &["write -P 0x11 0 1M"]);
    let export = format!("disk=file:{{dir}}/clone.img?clone-from={}", src.uri(DISK));
    let s = Server::start(&["--export", &export, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&s);
    let m = Metrics::scrape(admin);
    assert_eq!(m.value("longwire_clone_total_bytes", &[("export", DISK)]), 4.0 * MIB, "{:?}", m.0);
    assert!(m.has("longwire_layer_state", &[("export", DISK), ("layer", "clone")]));
    let st = status_json(admin);
    let layers = st.get("exports").as_array()[0].get("layers").as_array().to_vec();
    assert_eq!(layers[0].get("layer").as_str(), "clone");
    let (ok, out, err) = longwire_status(&["--admin", &admin.to_string()]);
    assert!(ok, "{err}");
    let row = out.lines().find(|l| l.starts_with("disk ")).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("clone:"), "the state column names the layer: {out}");
}

