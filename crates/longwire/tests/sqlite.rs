//! The SQLite store behind the real server, driven by real clients: libnbd
//! (python and nbdsh) for every command including trim, zero and block
//! status; qemu-img convert/compare/map; nbdcopy; nbdfuse + mkfs.ext4 +
//! mount; and crash durability — data acknowledged after FLUSH (or written
//! with FUA) survives SIGKILL of the server, and no chunk is ever torn.

mod common;

use common::fuse::ext4_round_trip;
use common::json::Json;
use common::*;
use std::fs;
use std::time::Duration;

/// A server with two sqlite volumes in one database, plus an in-memory
/// volume of the same size for comparisons.
fn server() -> Server {
    Server::start(&[
        "--export",
        "v=sqlite:{dir}/vols.sqlite?volume=v&size=64M&chunk_size=64K",
        "--export",
        "z=sqlite:{dir}/vols.sqlite?volume=z&size=64M&compression=zstd&description=compressed",
        "--listen",
        "127.0.0.1:0",
        "--unix",
        "{dir}/nbd.sock",
    ])
}

/// Run a python snippet against the server's own database file (read
/// only) with the stdlib sqlite3 module; returns stdout.
fn sql(s: &Server, query: &str) -> String {
    let db = s.dir().join("vols.sqlite");
    let script = format!(
        "import sqlite3, sys\n\
         c = sqlite3.connect('file:{}?mode=ro', uri=True)\n\
         for row in c.execute(sys.argv[1]):\n    print(*row)\n",
        db.display()
    );
    run(PYTHON, &["-c", &script, query]).trim().to_string()
}

const COMMANDS: &str = r#"
h = connect(EXPORT)
size = h.get_size()
check_eq(size, 64 * MiB, "export size")
for what, ok in [("flush", h.can_flush()), ("fua", h.can_fua()), ("trim", h.can_trim()),
                 ("zero", h.can_zero()), ("fast zero", h.can_fast_zero()),
                 ("multi-conn", h.can_multi_conn())]:
    check(ok, "%s must be advertised" % what)
check_eq(h.get_block_size(nbd.SIZE_MINIMUM), 1, "minimum block size")
check_eq(h.get_block_size(nbd.SIZE_PREFERRED), 64 * KiB, "preferred block size = chunk size")
check_eq(h.get_block_size(nbd.SIZE_MAXIMUM), 32 * MiB, "maximum payload")

# Never-written space reads as zeros and is a hole.
check(bytes(h.pread(1 * MiB, 5 * MiB)) == bytes(1 * MiB), "fresh export reads zeros")
check_eq(allocation_map(h, 0, size, mask=nbd.STATE_HOLE), [(0, size, nbd.STATE_HOLE)], "fresh export is one hole")

# Writes across chunk boundaries, unaligned, with and without FUA.
a = pat(1, 3 * MiB + 5)
h.pwrite(a, 4 * MiB - 7)
b = pat(2, 100)
h.pwrite(b, 20 * MiB + 64 * KiB - 50, flags=nbd.CMD_FLAG_FUA)
h.pwrite(b"\x01", size - 1)
check_buf(h.pread(len(a), 4 * MiB - 7), a, "3 MiB unaligned write")
check_buf(h.pread(100, 20 * MiB + 64 * KiB - 50), b, "FUA write across a chunk boundary")
check_eq(bytes(h.pread(2, size - 2)), b"\x00\x01", "last byte")
big = pat(3, 32 * MiB)
h.pwrite(big, 30 * MiB)
check_buf(h.pread(32 * MiB, 30 * MiB), big, "32 MiB write and read")
h.flush()

# Block status follows chunk presence (64 KiB chunks).
m = allocation_map(h, 0, 30 * MiB, mask=nbd.STATE_HOLE)
check_eq(m, [(0, 4 * MiB - 64 * KiB, nbd.STATE_HOLE),
             (4 * MiB - 64 * KiB, 3 * MiB + 64 * KiB, 0),
             (7 * MiB, 13 * MiB, nbd.STATE_HOLE),
             (20 * MiB, 128 * KiB, 0),
             (20 * MiB + 128 * KiB, 10 * MiB - 128 * KiB, nbd.STATE_HOLE)],
         "allocation after writes")
check(all(f & nbd.STATE_ZERO for (_, _, f) in allocation_map(h, 8 * MiB, 16 * MiB)), "holes read as zero")

# TRIM: whole chunks become holes; partial chunks are zeroed in the range.
h.trim(1 * MiB, 30 * MiB + 64 * KiB)
check(bytes(h.pread(1 * MiB, 30 * MiB + 64 * KiB)) == bytes(1 * MiB), "trimmed range reads zeros")
check_buf(h.pread(64 * KiB, 30 * MiB), big[:64 * KiB], "data before the trim")
check_buf(h.pread(64 * KiB, 31 * MiB + 64 * KiB), big[1 * MiB + 64 * KiB:1 * MiB + 128 * KiB], "data after the trim")
check_eq(allocation_map(h, 30 * MiB, 32 * MiB, mask=nbd.STATE_HOLE),
         [(30 * MiB, 64 * KiB, 0), (30 * MiB + 64 * KiB, 1 * MiB, nbd.STATE_HOLE),
          (31 * MiB + 64 * KiB, 1 * MiB - 64 * KiB, 0)], "allocation after trim")
h.trim(100, 40 * MiB + 10)
check(bytes(h.pread(100, 40 * MiB + 10)) == bytes(100), "small trim reads zeros")
check_buf(h.pread(10, 40 * MiB), big[10 * MiB:10 * MiB + 10], "bytes before a small trim")

# WRITE_ZEROES: plain, NO_HOLE, FAST_ZERO, FUA, unaligned.
h.zero(2 * MiB, 44 * MiB)
h.zero(1 * MiB, 50 * MiB, flags=nbd.CMD_FLAG_NO_HOLE)
h.zero(1 * MiB, 52 * MiB, flags=nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
h.zero(1000, 60 * MiB + 33)
for off, n in [(44 * MiB, 2 * MiB), (50 * MiB, 1 * MiB), (52 * MiB, 1 * MiB), (60 * MiB + 33, 1000)]:
    check(bytes(h.pread(n, off)) == bytes(n), "zeroed [%d,+%d) reads zeros" % (off, n))
check_buf(h.pread(33, 60 * MiB), big[30 * MiB:30 * MiB + 33], "bytes before an unaligned zero")
check_eq(allocation_map(h, 44 * MiB, 46 * MiB, mask=nbd.STATE_HOLE), [(44 * MiB, 2 * MiB, nbd.STATE_HOLE)],
         "zeroed whole chunks are holes")

# Every connection sees the same volume (multi-conn).
h2 = connect(EXPORT, transport="unix")
check_buf(h2.pread(len(a), 4 * MiB - 7), a, "second connection")
h2.pwrite(b"two", 5)
h2.flush()
check_eq(bytes(h.pread(3, 5)), b"two", "first connection sees the second's write")
h.shutdown()
h2.shutdown()
"#;

#[test]
fn libnbd_commands_on_sqlite_volumes() {
    let s = server();
    for export in ["v", "z"] {
        s.python(&format!("EXPORT = {export:?}\n{COMMANDS}"));
    }
    // Both volumes live in one database, independently; holes cost nothing.
    let rows = sql(
        &s,
        "SELECT v.name, count(c.idx), sum(length(c.data)) FROM volumes v \
         LEFT JOIN chunks c ON c.volume = v.id GROUP BY v.name ORDER BY v.name",
    );
    let lines: Vec<Vec<u64>> = rows
        .lines()
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .map(|n| n.parse().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(lines.len(), 2, "{rows}");
    assert_eq!(
        lines[0][0], lines[1][0],
        "same chunks present in v and z: {rows}"
    );
    assert!(lines[0][0] < 64 * 1024 / 64, "{rows}");
    // Random data does not compress: stored raw, about the same size.
    assert!(lines[1][1] <= lines[0][1], "{rows}");
    let info = s.run("nbdinfo", &["--list", &s.uri("")]);
    assert!(info.contains("compressed"), "{info}");
}

#[test]
fn nbdsh_round_trip() {
    let s = server();
    let out = s.nbdsh_ok(
        Some(&s.uri("v")),
        "buf = b'longwire' * 16384\n\
         h.pwrite(buf, 1000)\n\
         assert h.pread(len(buf), 1000) == buf\n\
         h.trim(65536, 65536)\n\
         assert h.pread(65536, 65536) == bytearray(65536)\n\
         h.zero(100, 1000)\n\
         assert h.pread(100, 1000) == bytearray(100)\n\
         assert h.pread(10, 1100) == buf[100:110]\n\
         h.flush()\n\
         print('size', h.get_size(), 'preferred', h.get_block_size(nbd.SIZE_PREFERRED))",
    );
    assert!(out.contains("size 67108864 preferred 65536"), "{out}");
}

#[test]
fn qemu_img_convert_in_and_out_then_compare_and_map() {
    let s = server();
    let local = s.dir().join("local.img");
    let out_img = s.dir().join("out.img");
    make_source_image(&s, &local);
    for export in ["v", "z"] {
        let uri = s.uri(export);
        let (_, trace) = s.qemu_img(&[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            local.to_str().unwrap(),
            &uri,
        ]);
        assert_extended_headers(&trace, "qemu-img convert (into the export)");
        let (stdout, _) = s.qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            local.to_str().unwrap(),
            &uri,
        ]);
        assert!(
            stdout.contains("Images are identical"),
            "{export}: {stdout}"
        );

        let _ = fs::remove_file(&out_img);
        s.qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            out_img.to_str().unwrap(),
        ]);
        let (stdout, _) = s.qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            local.to_str().unwrap(),
            out_img.to_str().unwrap(),
        ]);
        assert!(
            stdout.contains("Images are identical"),
            "{export}: {stdout}"
        );
        assert_eq!(
            sha256_file(&local),
            sha256_file(&out_img),
            "{export}: round trip"
        );

        // The allocation map is the written chunks (64 KiB granularity):
        // qemu-img convert skips the zero runs of the source.
        let (out, _) = s.qemu_img(&["map", "--output=json", "-f", "raw", &uri]);
        let j = Json::parse(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        let mut data = Vec::new();
        for e in j.as_array() {
            if e.get("data").as_bool() {
                data.push((e.get("start").as_u64(), e.get("length").as_u64()));
            }
        }
        assert_eq!(
            data,
            vec![
                (0, 4 * MIB),
                (20 * MIB, 3 * MIB),
                (30 * MIB, 5 * MIB + 64 * KIB),
                (40 * MIB, 64 * KIB),
                (63 * MIB, MIB),
            ],
            "{export}: data extents seen by qemu-img map:\n{out}"
        );
    }
    // Compression: the pattern-filled parts shrink to almost nothing.
    let sizes = sql(
        &s,
        "SELECT v.name, sum(length(c.data)) FROM volumes v JOIN chunks c ON c.volume = v.id \
         GROUP BY v.name ORDER BY v.name",
    );
    let n: Vec<u64> = sizes
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    assert!(n[1] < n[0] / 2 && n[1] > 5 * MIB, "v and z store {sizes}");
}

#[test]
fn nbdcopy_in_and_out_with_checksums() {
    let s = server();
    require_tool("nbdcopy");
    let src = s.dir().join("src.bin");
    let mut data = pattern(7, 64 * MIB as usize);
    data[10 * MIB as usize..20 * MIB as usize].fill(0);
    data[40 * MIB as usize..40 * MIB as usize + 4096].fill(0);
    data[60 * MIB as usize..].fill(0);
    fs::write(&src, &data).unwrap();
    let want = sha256_file(&src);

    let v = s.unix_uri("v");
    let z = s.uri("z");
    s.run(
        "nbdcopy",
        &["--flush", "-C", "4", src.to_str().unwrap(), &v],
    );
    s.run("nbdcopy", &["--flush", &v, &z]);
    let out1 = s.dir().join("out1.bin");
    let out2 = s.dir().join("out2.bin");
    s.run("nbdcopy", &[&v, out1.to_str().unwrap()]);
    s.run("nbdcopy", &["--synchronous", &z, out2.to_str().unwrap()]);
    assert_eq!(sha256_file(&out1), want, "src -> v -> out1");
    assert_eq!(sha256_file(&out2), want, "src -> v -> z -> out2");
    // Zero runs were not stored (nbdcopy skips them, or zeroing deletes).
    let rows: u64 = sql(
        &s,
        "SELECT count(*) FROM chunks WHERE volume = (SELECT id FROM volumes WHERE name = 'v')",
    )
    .parse()
    .unwrap();
    assert!(rows <= (50 * MIB / (64 * KIB)) + 2, "{rows} chunks stored");
}

#[test]
fn ext4_on_nbdfuse_sqlite_store_survives_restart() {
    let mut s = Server::start(&[
        "--export",
        "fs=sqlite:{dir}/vols.sqlite?volume=fs&size=256M",
        "--listen",
        "127.0.0.1:0",
    ]);
    let sums = ext4_round_trip(&s, "fs", 256 * MIB);
    let db = s.dir().join("vols.sqlite");
    s.terminate();
    // Sparse: mkfs discarded everything, so only what ext4 wrote is stored.
    let db_size = fs::metadata(&db).unwrap().len();
    eprintln!("database after mkfs + files + fstrim: {db_size} bytes");
    assert!(
        db_size < 64 * MIB,
        "database is {db_size} bytes for a 256 MiB volume"
    );
    let check = sql(&s, "PRAGMA integrity_check");
    assert_eq!(check, "ok");

    // After a restart the filesystem is still clean and holds the data.
    s.start_again();
    let fuse_dir = s.dir().join("fuse");
    let mnt = s.dir().join("mnt");
    let mut m = common::fuse::Mounts::default();
    let dev = m.start_nbdfuse(&s, "fs", &fuse_dir, 256 * MIB);
    let out = run_unchecked(command("fsck.ext4").args(["-n", "-f"]).arg(&dev), &s.logs());
    assert!(out.status.success(), "fsck after restart: {out:?}");
    m.mount_loop(&dev, &mnt);
    assert_eq!(sha256_file(&mnt.join("dir/sub/three-mib.bin")), sums[5]);
    assert_eq!(sha256_file(&mnt.join("ten-mib.bin")), sums[4]);
    m.umount_loop(&mnt);
    m.stop_nbdfuse();
}

/// Writes, FLUSH and FUA; then, while unflushed whole-chunk writes are in
/// flight, SIGKILL. After a restart all flushed data is there, and every
/// chunk the in-flight writes touched holds one whole write (never a torn
/// mix), twice over.
#[test]
fn flushed_data_survives_sigkill_and_no_chunk_is_torn() {
    let mut s = Server::start(&[
        "--export",
        "v=sqlite:{dir}/vols.sqlite?volume=v&size=64M&chunk_size=64K",
        "--export",
        "z=sqlite:{dir}/vols.sqlite?volume=z&size=64M&chunk_size=64K&compression=zstd",
        "--listen",
        "127.0.0.1:0",
    ]);
    for round in 0..2u32 {
        for export in ["v", "z"] {
            let mut script = s.spawn_script(&format!(
                r#"
EXPORT = {export:?}
ROUND = {round}
h = connect(EXPORT)
# Flushed: unaligned writes across chunks, partial-chunk rewrites, a trim.
for i in range(40):
    h.pwrite(pat(ROUND * 100 + i, 70000 + i), i * 300 * KiB + i)
h.trim(5 * 300 * KiB, 100 * KiB)
h.zero(20 * 300 * KiB, 12345)
h.flush()
# FUA alone, no flush after it.
h.pwrite(pat(ROUND * 100 + 77, 5000), 40 * MiB + 11, flags=nbd.CMD_FLAG_FUA)
print("DURABLE", flush=True)
# Unflushed whole-chunk writes into [48M, 64M) until the server dies.
n = 0
try:
    while True:
        for k in range(32):
            n += 1
            chunk = (n * 7919) % 256
            buf = nbd.Buffer.from_bytearray(bytearray([(n % 250) + 1]) * (64 * KiB))
            h.aio_pwrite(buf, 48 * MiB + chunk * 64 * KiB)
        if n == 32:
            print("WRITING", flush=True)
        while h.aio_in_flight() > 16:
            h.poll(-1)
except nbd.Error:
    pass
"#
            ));
            script.wait_for("DURABLE", Duration::from_secs(60), &s);
            script.wait_for("WRITING", Duration::from_secs(60), &s);
            std::thread::sleep(Duration::from_millis(300));
            s.kill();
            drop(script);
            s.start_again();

            let out = s.python(&format!(
                r#"
EXPORT = {export:?}
ROUND = {round}
h = connect(EXPORT)
want = bytearray(40 * 300 * KiB + 80000)
for i in range(40):
    d = pat(ROUND * 100 + i, 70000 + i)
    want[i * 300 * KiB + i:i * 300 * KiB + i + len(d)] = d
want[100 * KiB:100 * KiB + 5 * 300 * KiB] = bytes(5 * 300 * KiB)
want[12345:12345 + 20 * 300 * KiB] = bytes(20 * 300 * KiB)
check_buf(h.pread(len(want), 0), want, "flushed writes after SIGKILL")
check_buf(h.pread(5000, 40 * MiB + 11), pat(ROUND * 100 + 77, 5000), "FUA write after SIGKILL")
landed = 0
for c in range(256):
    got = h.pread(64 * KiB, 48 * MiB + c * 64 * KiB)
    check(got == bytes([got[0]]) * len(got), "chunk %d at 48M+%dK is torn" % (c, c * 64))
    landed += got[0] != 0
# Writes acknowledged before the kill were committed, so many landed.
check(landed > 0, "none of the in-flight writes landed")
print("LANDED", landed)
# Clean the in-flight region for the next round.
h.trim(16 * MiB, 48 * MiB)
h.flush()
"#
            ));
            eprintln!(
                "round {round} {export}: {}",
                out.lines().find(|l| l.starts_with("LANDED")).unwrap_or("?")
            );
        }
    }
    let check = sql(&s, "PRAGMA integrity_check");
    assert_eq!(check, "ok");
}
