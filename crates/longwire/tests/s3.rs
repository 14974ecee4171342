//! The S3 store behind the real server, against a real S3 server
//! (s3s-fs, which keeps objects as plain files so the tests can look at
//! and damage them): writes and reads with libnbd and qemu, holes in
//! BLOCK_STATUS, qemu-img convert both ways, restarts, data acknowledged
//! after FLUSH surviving SIGKILL (and unflushed cache uploaded on restart),
//! the single-writer lease (and its release on a clean stop), and corrupt
//! objects.

mod common;

use common::s3::{serve_fails, S3sFs};
use common::*;
use std::fs;
use std::time::Duration;

/// `--export v=s3://…` with a 64 MiB volume of 256 KiB chunks, its cache
/// in the server's directory and a short lease.
fn export(s3: &S3sFs, name: &str, extra: &str) -> String {
    format!(
        "v={}",
        s3.uri(
            name,
            &format!(
                "&size=64M&chunk_size=256K&cache={{dir}}/cache&lease_ttl=3s&timeout=10s{extra}"
            )
        )
    )
}

fn serve(s3: &S3sFs, name: &str) -> Server {
    Server::start(&["--export", &export(s3, name, ""), "--listen", "127.0.0.1:0"])
}

const WRITE_AND_MAP: &str = r#"
h = connect("v")
size = h.get_size()
check_eq(size, 64 * MiB, "export size")
for what, ok in [("flush", h.can_flush()), ("fua", h.can_fua()), ("trim", h.can_trim()),
                 ("zero", h.can_zero()), ("multi-conn", h.can_multi_conn())]:
    check(ok, "%s must be advertised" % what)
check_eq(allocation_map(h, 0, size, mask=nbd.STATE_HOLE), [(0, size, nbd.STATE_HOLE)], "fresh volume is one hole")
a = pat(1, 300 * KiB + 5)
h.pwrite(a, 1 * MiB - 7)                 # across chunk 3/4/5 boundaries, unaligned
b = pat(2, 4096)
h.pwrite(b, 40 * MiB, nbd.CMD_FLAG_FUA)
h.flush()
check_buf(h.pread(len(a), 1 * MiB - 7), a, "read back a")
check_buf(h.pread(4096, 40 * MiB), b, "read back b")
check(bytes(h.pread(1 * MiB, 10 * MiB)) == bytes(1 * MiB), "never-written range reads zeros")
m = allocation_map(h, 0, size, mask=nbd.STATE_HOLE)
check_eq(m, [(0, 768 * KiB, nbd.STATE_HOLE), (768 * KiB, 768 * KiB, 0),
             (1536 * KiB, 40 * MiB - 1536 * KiB, nbd.STATE_HOLE), (40 * MiB, 256 * KiB, 0),
             (40 * MiB + 256 * KiB, 24 * MiB - 256 * KiB, nbd.STATE_HOLE)], "holes where never written")
# Zeroing a whole chunk drops its object.
h.zero(256 * KiB, 40 * MiB, nbd.CMD_FLAG_FUA)
check(bytes(h.pread(4096, 40 * MiB)) == bytes(4096), "zeroed")
print("__longwire_script_completed__")
"#;

#[test]
fn writes_reads_holes_and_restart() {
    let s3 = S3sFs::start();
    let mut s = serve(&s3, "vm1");
    s.python(WRITE_AND_MAP);
    // The bucket holds a manifest and exactly the chunks with data.
    assert!(s3.object_path("vm1/manifest.json").is_file());
    assert_eq!(
        s3.chunks("vm1"),
        vec!["0000000000000003", "0000000000000004", "0000000000000005"]
    );
    assert_eq!(
        fs::metadata(s3.object_path("vm1/chunks/0000000000000004"))
            .unwrap()
            .len(),
        256 * KIB
    );

    // qemu writes; after a restart with an emptied cache the data comes from the bucket.
    s.run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xab 8M 3M", &s.qemu_uri("v")],
    );
    s.terminate();
    fs::remove_dir_all(s.dir().join("cache")).unwrap();
    s.start_again();
    s.run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xab 8M 3M",
            "-c",
            "read -P 0 11M 1M",
            &s.qemu_uri("v"),
        ],
    );

    // qemu-img convert in and out, compared.
    let img = s.dir().join("src.raw");
    let data = pattern(7, 5 * MIB as usize);
    let mut raw = vec![0u8; 16 * MIB as usize];
    raw[3 * MIB as usize..8 * MIB as usize].copy_from_slice(&data);
    fs::write(&img, &raw).unwrap();
    let img_s = img.to_str().unwrap().to_string();
    s.run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            &img_s,
            &s.qemu_uri("v"),
        ],
    );
    let out = s.dir().join("out.raw");
    let out_s = out.to_str().unwrap().to_string();
    s.run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &s.qemu_uri("v"),
            &out_s,
        ],
    );
    let got = fs::read(&out).unwrap();
    assert_eq!(&got[..16 * MIB as usize], &raw[..], "qemu-img round trip");
}

#[test]
fn flushed_and_acknowledged_writes_survive_sigkill() {
    let s3 = S3sFs::start();
    let mut s = serve(&s3, "crash");
    s.python(
        r#"
h = connect("v")
h.pwrite(pat(3, 1 * MiB), 2 * MiB)
h.flush()
h.pwrite(pat(4, 64 * KiB), 20 * MiB)     # acknowledged, never flushed
print("__longwire_script_completed__")
"#,
    );
    // Flushed data is in the bucket before the kill.
    assert_eq!(s3.chunks("crash").len(), 4);
    s.kill();
    s.start_again();
    // The unflushed write was in the cache and is uploaded at start.
    assert!(s.logs().contains("left in the cache"), "{}", s.logs());
    assert!(
        s3.chunks("crash").contains(&"0000000000000050".to_string()),
        "{:?}",
        s3.chunks("crash")
    );
    s.python(
        r#"
h = connect("v")
check_buf(h.pread(1 * MiB, 2 * MiB), pat(3, 1 * MiB), "flushed data")
check_buf(h.pread(64 * KiB, 20 * MiB), pat(4, 64 * KiB), "acknowledged data")
print("__longwire_script_completed__")
"#,
    );
}

#[test]
fn one_writer_at_a_time() {
    let s3 = S3sFs::start();
    let mut a = serve(&s3, "shared");
    let pid = a.pid().to_string();
    let other = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let exp = export(&s3, "shared", "").replace("{dir}", other.path().to_str().unwrap());
    let err = serve_fails(other.path(), &["--export", &exp, "--listen", "127.0.0.1:0"]);
    assert!(
        err.contains("in use by another server")
            && err.contains(&format!("pid {pid}"))
            && err.contains("host "),
        "{err}"
    );
    assert!(
        err.contains("conditional") || !a.logs().contains("best effort"),
        "{err}"
    );

    // The holder dies: its pid is gone, so the lease is free at once on this host.
    a.kill();
    let b = Server::start_prepared(&["--export", &exp, "--listen", "127.0.0.1:0"], |_| {});
    drop(b);

    // A holder on another host: refused until its lease expires.
    let lease = s3.object_path("shared/lease.json");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    fs::write(
        &lease,
        format!(
            r#"{{"host":"other-host","pid":1,"since":{now},"expires":{},"token":"x"}}"#,
            now + 3
        ),
    )
    .unwrap();
    let err = serve_fails(other.path(), &["--export", &exp, "--listen", "127.0.0.1:0"]);
    assert!(err.contains("host other-host, pid 1"), "{err}");
    std::thread::sleep(Duration::from_secs(4));
    let c = Server::start(&["--export", &exp, "--listen", "127.0.0.1:0"]);
    assert!(c.logs().contains("lease taken"), "{}", c.logs());
}

/// A clean stop (SIGTERM) uploads what is left and deletes the lease, so
/// another server takes the volume at once instead of after the TTL.
#[test]
fn clean_stop_gives_the_lease_back() {
    let s3 = S3sFs::start();
    let mut a = serve(&s3, "handover");
    a.python(
        r#"
h = connect("v")
h.pwrite(pat(5, 300 * KiB), 5 * MiB)     # acknowledged, never flushed
print("__longwire_script_completed__")
"#,
    );
    let lease = s3.object_path("handover/lease.json");
    assert!(lease.is_file(), "the running server holds the lease");
    a.terminate();
    assert!(a.logs().contains("lease released"), "{}", a.logs());
    assert!(!lease.exists(), "the lease outlived a clean stop");

    // Another server, with its own (empty) cache: it starts without
    // waiting and reads the data from the bucket.
    let other = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let exp = export(&s3, "handover", "").replace("{dir}", other.path().to_str().unwrap());
    let b = Server::start(&["--export", &exp, "--listen", "127.0.0.1:0"]);
    assert!(b.logs().contains("lease taken"), "{}", b.logs());
    b.python(
        r#"
h = connect("v")
check_buf(h.pread(300 * KiB, 5 * MiB), pat(5, 300 * KiB), "written before the stop")
print("__longwire_script_completed__")
"#,
    );
}

#[test]
fn corrupt_objects_are_clear_errors() {
    let s3 = S3sFs::start();
    let mut s = serve(&s3, "bad");
    s.run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 0 512K", &s.qemu_uri("v")],
    );
    s.terminate();
    // A chunk object cut short: reads of it fail with EIO, naming the volume.
    fs::write(s3.object_path("bad/chunks/0000000000000001"), b"short").unwrap();
    fs::remove_dir_all(s.dir().join("cache")).unwrap();
    s.start_again();
    s.python(
        r#"
h = connect("v")
check_buf(h.pread(4096, 0), b"\x5a" * 4096, "intact chunk")
expect_error("EIO", "read of a damaged chunk", h.pread, 4096, 256 * KiB)
print("__longwire_script_completed__")
"#,
    );
    let logs = s.logs();
    assert!(
        logs.contains("s3://longwire-test/bad")
            && logs.contains("chunk 1")
            && logs.contains("5 bytes"),
        "{logs}"
    );
    s.terminate();

    // A manifest that is not one: the server refuses to start, saying why.
    fs::write(s3.object_path("bad/manifest.json"), b"{\"size\": ").unwrap();
    let err = serve_fails(
        s.dir(),
        &["--export", &s.args()[1], "--listen", "127.0.0.1:0"],
    );
    assert!(
        err.contains("s3://longwire-test/bad") && err.contains("not a longwire volume manifest"),
        "{err}"
    );
}
