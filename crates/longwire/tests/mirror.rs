//! The mirror layer end to end: a primary `longwire serve` whose export has
//! `?mirror=nbd://…`, a replica that is another `longwire serve` (or
//! `nbdkit`), the TCP fault proxy between them to cut the link, qemu-io
//! writing to the primary, and `qemu-img compare` on the two images.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{command, require_tool, run, Server};
use longwire_torture::fault_proxy::{FaultProxy, Faults};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
/// The replica carries the mirror's 4 KiB metadata record at its end.
const REPLICA_SIZE: u64 = SIZE + 4096;
const REGION: u64 = 64 << 10;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn replica_server() -> Server {
    Server::start(&[
        "--listen",
        "127.0.0.1:0",
        "--no-iscsi",
        "--export",
        &format!("disk=file:{{dir}}/replica.img?size={REPLICA_SIZE}"),
    ])
}

fn primary(replica_uri: &str, extra: &str) -> Server {
    let uri = format!(
        "disk=file:{{dir}}/disk.img?size={SIZE}&mirror={replica_uri}&mirror-timeout=2{extra}"
    );
    Server::start(&["--listen", "127.0.0.1:0", "--no-iscsi", "--export", &uri])
}

/// Wait until the server has logged `needle` at least `n` times; returns the last such line.
fn wait_log(server: &Server, needle: &str, n: usize, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let lines: Vec<String> = server
            .stderr_lines()
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect();
        if lines.len() >= n {
            return lines.last().unwrap().clone();
        }
        if Instant::now() > deadline {
            panic!("no {n}× {needle:?} within {timeout:?}\n{}", server.logs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The data bytes the last resync sent, from its "in sync" log line.
fn resent(line: &str) -> u64 {
    let tail = line
        .split("resync sent ")
        .nth(1)
        .unwrap_or_else(|| panic!("no byte count in {line:?}"));
    tail.split(' ').next().unwrap().parse().unwrap()
}

fn qemu_write(server: &Server, writes: &[(u64, u64, u8)]) {
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for (off, len, pat) in writes {
        args.push("-c".into());
        args.push(format!("write -P {pat} {off} {len}"));
    }
    args.push("-c".into());
    args.push("flush".into());
    args.push(server.qemu_uri("disk"));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    server.run("qemu-io", &refs);
}

/// `qemu-img compare` of the first SIZE bytes of two raw files.
fn assert_images_equal(a: &Path, b: &Path) {
    require_tool("qemu-img");
    let opt = |p: &Path| {
        format!(
            "driver=raw,size={SIZE},file.driver=file,file.filename={}",
            p.display()
        )
    };
    let out = run("qemu-img", &["compare", "--image-opts", &opt(a), &opt(b)]);
    assert!(out.contains("Images are identical"), "{out}");
}

#[test]
fn a_cut_replica_gets_only_the_dirty_regions_back() {
    let rt = runtime();
    let replica = replica_server();
    let proxy = rt
        .block_on(FaultProxy::start(replica.tcp_addr(), Faults::none()))
        .unwrap();
    let primary = primary(&format!("nbd://{}/disk", proxy.addr()), "&resync-rate=0");
    wait_log(&primary, "mirror: in sync with", 1, Duration::from_secs(30));
    qemu_write(&primary, &[(0, 4 * MIB, 0x11), (40 * MIB, MIB, 0x22)]);
    settle();

    // Cut the network between the primary and the replica; keep it cut.
    proxy.set_refusing(true);
    proxy.cut_all();
    let started = Instant::now();
    let writes: Vec<(u64, u64, u8)> = (0..24u64)
        .map(|i| (i * 2 * MIB + 8192, 4096, 0x30 + i as u8))
        .collect();
    qemu_write(&primary, &writes);
    let wrote_for = started.elapsed();
    assert!(
        wrote_for < Duration::from_secs(10),
        "writes stalled for {wrote_for:?} while the replica was away"
    );
    wait_log(&primary, "mirror degraded", 1, Duration::from_secs(10));

    proxy.set_refusing(false);
    let t0 = Instant::now();
    let line = wait_log(&primary, "mirror: in sync with", 2, Duration::from_secs(60));
    let resync_time = t0.elapsed();
    let dirtied = 24 * 4096u64;
    let bytes = resent(&line);
    eprintln!("resync: {bytes} bytes resent for {dirtied} bytes dirtied in 24 regions, back in sync {resync_time:?} after reconnecting");
    // Each 4 KiB write dirtied one 64 KiB region; only those went over,
    // and of each only what the local allocation map calls data.
    assert!(bytes >= dirtied && bytes <= 24 * REGION, "{line}");
    assert_images_equal(
        &primary.dir().join("disk.img"),
        &replica.dir().join("replica.img"),
    );
}

#[test]
fn an_unrelated_replica_is_refused_until_a_full_resync_is_asked_for() {
    let mut replica = replica_server();
    let port_uri = format!("nbd://{}/disk", replica.tcp_addr());
    let primary = primary(&port_uri, "&resync-rate=0");
    wait_log(&primary, "mirror: in sync with", 1, Duration::from_secs(30));
    qemu_write(&primary, &[(0, MIB, 0x11)]);

    // The replica comes back on the same address with another image.
    replica.terminate();
    let img = replica.dir().join("replica.img");
    std::fs::remove_file(&img).unwrap();
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(REPLICA_SIZE).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x77u8; 65536], 8 * MIB).unwrap();
    drop(f);
    qemu_write(&primary, &[(2 * MIB, 4096, 0x12)]);
    let replica = restart_on(replica);
    let img = replica.dir().join("replica.img");
    let line = wait_log(&primary, "refusing to resync", 1, Duration::from_secs(30));
    assert!(
        line.contains("no mirror metadata") && line.contains("mirror-force-full"),
        "{line}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let mut buf = vec![0u8; 65536];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&img).unwrap(),
        &mut buf,
        8 * MIB,
    )
    .unwrap();
    assert!(
        buf.iter().all(|&b| b == 0x77),
        "the refused replica was written to"
    );

    // The user asks for it.
    std::fs::write(primary.dir().join("disk.img.mirror-force-full"), b"").unwrap();
    wait_log(&primary, "mirror: in sync with", 2, Duration::from_secs(60));
    assert!(!primary.dir().join("disk.img.mirror-force-full").exists());
    assert_images_equal(&primary.dir().join("disk.img"), &img);
}

/// Restart a replica server on the port it had (the primary's URI names it).
fn restart_on(mut server: Server) -> Server {
    let addr = server.tcp_addr();
    let args: Vec<String> = server
        .args()
        .iter()
        .map(|a| {
            if a == "127.0.0.1:0" {
                addr.to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let dir = server.keep_dir();
    drop(server);
    let refs: Vec<String> = args
        .iter()
        .map(|a| a.replace(&dir.display().to_string(), "{dir}"))
        .collect();
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
    Server::start_prepared(&refs, |new_dir| {
        std::fs::copy(dir.join("replica.img"), new_dir.join("replica.img")).unwrap();
    })
}

#[test]
fn a_primary_restart_during_a_resync_resumes_it() {
    let replica = replica_server();
    let uri = format!("nbd://{}/disk", replica.tcp_addr());
    // 16 MiB of data to copy at 4 MiB/s: the first pairing takes ~4 s.
    let mut primary = Server::start_prepared(
        &[
            "--listen",
            "127.0.0.1:0",
            "--no-iscsi",
            "--export",
            &format!("disk=file:{{dir}}/disk.img?size={SIZE}&mirror={uri}&resync-rate=4M"),
        ],
        |dir| {
            let f = std::fs::File::create(dir.join("disk.img")).unwrap();
            f.set_len(SIZE).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, &vec![0x5au8; 16 * MIB as usize], 8 * MIB)
                .unwrap();
        },
    );
    wait_log(&primary, "resyncing", 1, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(2000));
    primary.kill();
    primary.start_again();
    let line = wait_log(&primary, "mirror: in sync with", 1, Duration::from_secs(60));
    let second = resent(&line);
    eprintln!("resumed resync sent {second} of {} bytes", 16 * MIB);
    assert!(
        second < 16 * MIB - 2 * MIB,
        "the resync started over: {line}"
    );
    assert!(
        primary
            .stderr_lines()
            .iter()
            .all(|l| !l.contains("refusing")),
        "{}",
        primary.logs()
    );
    assert_images_equal(
        &primary.dir().join("disk.img"),
        &replica.dir().join("replica.img"),
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Nbdkit(Child);

impl Nbdkit {
    fn start(port: u16, image: &Path) -> Nbdkit {
        require_tool("nbdkit");
        let child = command("nbdkit")
            .args(["-f", "-i", "127.0.0.1", "-p", &port.to_string(), "file"])
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "nbdkit did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nbdkit(child)
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn nbdkit_as_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("replica.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(REPLICA_SIZE)
        .unwrap();
    let port = free_port();
    let kit = Nbdkit::start(port, &img);
    let primary = primary(
        &format!("nbd://127.0.0.1:{port}/"),
        "&resync-rate=0&mirror-mode=sync",
    );
    wait_log(&primary, "mirror: in sync with", 1, Duration::from_secs(30));
    qemu_write(&primary, &[(0, 2 * MIB, 0x41), (30 * MIB, 4096, 0x42)]);
    assert_images_equal(&primary.dir().join("disk.img"), &img);
    settle();

    // nbdkit dies; the primary goes on; nbdkit comes back.
    drop(kit);
    qemu_write(&primary, &[(10 * MIB, 4096, 0x43), (20 * MIB, 8192, 0x44)]);
    wait_log(&primary, "mirror degraded", 1, Duration::from_secs(10));
    let _kit = Nbdkit::start(port, &img);
    let line = wait_log(&primary, "mirror: in sync with", 2, Duration::from_secs(60));
    let bytes = resent(&line);
    assert!((3 * 4096..=2 * REGION).contains(&bytes), "{line}");
    assert_images_equal(&primary.dir().join("disk.img"), &img);
}

/// Let the mirror clear the bits of regions both copies have (it does so
/// every second, after flushing both), so a later resync is only what the
/// replica missed.
fn settle() {
    std::thread::sleep(Duration::from_millis(2500));
}
