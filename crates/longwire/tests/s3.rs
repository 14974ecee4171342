//! The S3 store behind the real server, against a real S3 server
//! (s3s-fs, which keeps objects as plain files so the tests can look at
//! and damage them): writes and reads with libnbd and qemu, holes in
//! BLOCK_STATUS, qemu-img convert both ways, restarts, data acknowledged
//! after FLUSH surviving SIGKILL (and unflushed cache uploaded on restart),
//! the single-writer lease (and its release on a clean stop), corrupt
//! objects, ext4 on nbdfuse surviving a restart with an emptied cache, and
//! `longwire copy` of a sparse image in and out with the holes kept.

mod common;

use common::fuse::{ext4_round_trip, Mounts};
use common::json::Json;
use common::s3::{serve_fails, S3sFs};
use common::*;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
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
# TRIM across the chunk 3/4 boundary with no whole chunk inside: two partial
# chunks rewritten, the rest of a untouched.
h.trim(100 * KiB, 1 * MiB - 50 * KiB)    # [1 MiB - 50 KiB, 1 MiB + 50 KiB)
want = bytearray(a)                      # a starts at 1 MiB - 7
want[:50 * KiB + 7] = bytes(50 * KiB + 7)
check(bytes(h.pread(50 * KiB, 1 * MiB - 50 * KiB)) == bytes(50 * KiB), "trimmed before a")
check_buf(h.pread(len(a), 1 * MiB - 7), want, "a after a trim across chunks")
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

/// ext4 through nbdfuse and a loop mount (mkfs, files, fsck, fstrim), then
/// a clean stop, the write-back cache deleted and a restart: the
/// filesystem now comes from the bucket alone, and is clean and whole.
#[test]
fn ext4_on_nbdfuse_survives_restart_from_the_bucket() {
    const SIZE: u64 = 128 * MIB;
    let s3 = S3sFs::start();
    let uri = s3.uri(
        "fs",
        "&size=128M&chunk_size=256K&cache={dir}/cache&lease_ttl=3s&timeout=10s",
    );
    let mut s = Server::start(&["--export", &format!("fs={uri}"), "--listen", "127.0.0.1:0"]);
    let sums = ext4_round_trip(&s, "fs", SIZE);
    s.terminate();
    assert!(s.logs().contains("lease released"), "{}", s.logs());
    // Sparse: mkfs discarded the volume, so only what ext4 wrote is stored.
    let chunks = s3.chunks("fs").len() as u64;
    assert!(
        chunks > 0 && chunks * 256 * KIB < 64 * MIB,
        "{chunks} chunks of 256 KiB in the bucket for a 128 MiB volume"
    );

    fs::remove_dir_all(s.dir().join("cache")).unwrap();
    s.start_again();
    assert!(
        !s.logs().contains("left in the cache"),
        "the cache was deleted, yet: {}",
        s.logs()
    );
    let mut m = Mounts::default();
    let dev = m.start_nbdfuse(&s, "fs", &s.dir().join("fuse"), SIZE);
    let out = run_unchecked(command("fsck.ext4").args(["-n", "-f"]).arg(&dev), &s.logs());
    assert!(
        out.status.success(),
        "fsck after restart: {out:?}\n{}",
        s.logs()
    );
    let mnt = s.dir().join("mnt");
    m.mount_loop(&dev, &mnt);
    // What ext4_round_trip left: every file but the ones it deleted.
    let files = common::fuse::test_files();
    for ((name, data), sum) in files.iter().zip(&sums) {
        let p = mnt.join(name);
        if name.starts_with("many/") || name == "odd-size.bin" {
            assert!(!p.exists(), "{name} was deleted before the restart");
            continue;
        }
        assert_eq!(&sha256_file(&p), sum, "sha256 of {name} after restart");
        assert!(
            fs::read(&p).unwrap() == *data,
            "content of {name} after restart"
        );
    }
    m.umount_loop(&mnt);
    m.stop_nbdfuse();
}

/// A 64 MiB sparse image whose data sits on 64 KiB boundaries, so a volume
/// of 64 KiB chunks holds exactly the same runs.
const COPY_SIZE: u64 = 64 * MIB;
const COPY_DATA: &[(u64, u64)] = &[
    (0, MIB),
    (10 * MIB, 64 * KIB),
    (20 * MIB, 3 * MIB),
    (COPY_SIZE - 128 * KIB, 128 * KIB),
];

/// The data runs `qemu-img map` sees in a raw image.
fn data_runs(path: &Path) -> Vec<(u64, u64)> {
    let out = run(
        "qemu-img",
        &["map", "-f", "raw", "--output=json", path.to_str().unwrap()],
    );
    Json::parse(&out)
        .unwrap()
        .as_array()
        .iter()
        .filter(|e| e.get("data").as_bool())
        .map(|e| (e.get("start").as_u64(), e.get("length").as_u64()))
        .collect()
}

/// `longwire ARGS` without a server; must succeed. Returns stdout.
fn longwire(dir: &Path, args: &[&str]) -> String {
    run_cmd(
        command(&server_binary())
            .args(args)
            .env("NO_COLOR", "1")
            .current_dir(dir),
        "",
    )
}

/// `longwire copy` of a sparse image into an S3 volume and back out (with
/// another, empty cache, so the data comes from the bucket): `qemu-img
/// compare` finds them equal, the bucket holds only the chunks with data,
/// and the copy out is as sparse as the source.
#[test]
fn copy_a_sparse_image_in_and_out_keeps_holes() {
    let s3 = S3sFs::start();
    let dir = tempfile::Builder::new()
        .prefix("longwire-s3-copy-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    let f = fs::File::create(&src).unwrap();
    f.set_len(COPY_SIZE).unwrap();
    for (i, &(off, len)) in COPY_DATA.iter().enumerate() {
        f.write_all_at(&pattern(90 + i as u64, len as usize), off)
            .unwrap();
    }
    f.sync_all().unwrap();
    assert_eq!(data_runs(&src), COPY_DATA, "qemu-img map of the source");
    let data: u64 = COPY_DATA.iter().map(|r| r.1).sum();

    let vol = s3.uri("copied", "&chunk_size=64K");
    let with_cache = |name: &str| format!("{vol}&cache={}", d.join(name).display());
    longwire(d, &["create", &vol, "--size", "64M"]);
    let copy_in = with_cache("cache-in");
    longwire(
        d,
        &[
            "copy",
            &format!("file:{}", src.display()),
            &copy_in,
            "--no-progress",
        ],
    );
    assert_eq!(
        s3.chunks("copied").len() as u64,
        data / (64 * KIB),
        "{:?}",
        s3.chunks("copied")
    );
    let info = Json::parse(&longwire(d, &["info", &vol, "--json"])).unwrap();
    assert_eq!(info.get("allocated").as_u64(), data, "{info:?}");
    assert_eq!(info.get("chunks").as_u64(), data / (64 * KIB), "{info:?}");
    assert!(
        !s3.object_path("copied/lease.json").exists(),
        "copy kept the lease"
    );

    let out = d.join("out.raw");
    longwire(
        d,
        &[
            "copy",
            &with_cache("cache-out"),
            &format!("file:{}", out.display()),
            "--no-progress",
        ],
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(
        data_runs(&out),
        COPY_DATA,
        "holes were filled on the way out"
    );
    let md = fs::metadata(&out).unwrap();
    assert_eq!(md.len(), COPY_SIZE);
    assert!(
        md.blocks() * 512 <= data + MIB,
        "out.raw is not sparse: {} bytes allocated",
        md.blocks() * 512
    );
    assert!(
        !d.join("longwire-cache").exists(),
        "a cache was made in the working directory"
    );
}
