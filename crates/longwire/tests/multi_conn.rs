//! NBD_FLAG_CAN_MULTI_CONN: with several connections to one export, a FLUSH
//! (or FUA write) on one connection must cover writes completed on the
//! others, and its effect must be visible on every connection.
//!
//! What these tests can and cannot prove:
//! * Visibility (write on A, FLUSH on B, read on C) is checked directly.
//! * Durability is approximated by SIGKILLing the server right after the
//!   FLUSH reply (with all connections still open, so no disconnect-time
//!   flushing can happen) and then reading the backing file and a restarted
//!   server. A SIGKILL does not drop the kernel page cache, so this proves
//!   that the data had left the server process (was written to the file) by
//!   the time B's FLUSH was acknowledged — which catches per-connection
//!   user-space write buffers that a FLUSH on another connection fails to
//!   drain — but it cannot prove that fsync/fdatasync reached stable storage;
//!   that would need a power cut (or a fault-injecting filesystem).

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::time::Duration;

const SCRIPT: &str = r#"
A = connect(EXPORT)
B = connect(EXPORT)
C = connect(EXPORT, transport="unix")
for n, h in (("A", A), ("B", B), ("C", C)):
    check(h.can_multi_conn(), "connection %s: CAN_MULTI_CONN must be advertised" % n)
    check(h.can_flush() and h.can_fua(), "connection %s: FLUSH and FUA must be advertised" % n)

# 1. write on A (no FUA), FLUSH on B, read on C.
d1 = pat(1, 1 * MiB)
A.pwrite(d1, 4 * MiB)
B.flush()
check_buf(C.pread(1 * MiB, 4 * MiB), d1, "C reads A's write after FLUSH on B")

# 2. rotate: write on C, FLUSH on A, read on B.
d2 = pat(2, 256 * KiB)
C.pwrite(d2, 9 * MiB + 4096)
A.flush()
check_buf(B.pread(256 * KiB, 9 * MiB + 4096), d2, "B reads C's write after FLUSH on A")

# 3. FUA write on B is visible on A and C immediately.
d3 = pat(3, 64 * KiB)
B.pwrite(d3, 12 * MiB, flags=nbd.CMD_FLAG_FUA)
check_buf(A.pread(64 * KiB, 12 * MiB), d3, "A reads B's FUA write")
check_buf(C.pread(64 * KiB, 12 * MiB), d3, "C reads B's FUA write")

# 4. interleaved async writes on A and B (disjoint blocks), then one FLUSH on
# C covers all of them.
bufs = []
for i in range(64):
    h = A if i % 2 == 0 else B
    b = nbd.Buffer.from_bytearray(bytearray(pat(100 + i, 64 * KiB)))
    bufs.append(b)
    h.aio_pwrite(b, 20 * MiB + i * 64 * KiB)
run_aio(A)
run_aio(B)
C.flush()
for i in range(64):
    check_buf(C.pread(64 * KiB, 20 * MiB + i * 64 * KiB), pat(100 + i, 64 * KiB), "block %d written on %s" % (i, "AB"[i % 2]))

# 5. the last writes before the crash: on A and C, flushed by B.
d5 = pat(5, 512 * KiB)
A.pwrite(d5, 30 * MiB)
C.pwrite(d5[::-1], 31 * MiB)
B.flush()

print("READY", flush=True)
# Keep every connection open while the test SIGKILLs the server.
sys.stdin.readline()
"#;

const VERIFY: &str = r#"
h = connect(EXPORT)
check_buf(h.pread(1 * MiB, 4 * MiB), pat(1, 1 * MiB), "step 1 data after crash + restart")
check_buf(h.pread(256 * KiB, 9 * MiB + 4096), pat(2, 256 * KiB), "step 2 data after crash + restart")
check_buf(h.pread(64 * KiB, 12 * MiB), pat(3, 64 * KiB), "step 3 data after crash + restart")
for i in range(64):
    check_buf(h.pread(64 * KiB, 20 * MiB + i * 64 * KiB), pat(100 + i, 64 * KiB), "step 4 block %d after crash + restart" % i)
d5 = pat(5, 512 * KiB)
check_buf(h.pread(512 * KiB, 30 * MiB), d5, "step 5 (A) after crash + restart")
check_buf(h.pread(512 * KiB, 31 * MiB), d5[::-1], "step 5 (C) after crash + restart")
print("ok")
"#;

fn three_connections_then_crash(export: &str, file_backed: bool) {
    let mut s = Server::start(&[
        "--export",
        "disk=file:{dir}/mc.img?size=64M",
        "--export",
        "mem=memory:?size=64M",
        "--listen",
        "127.0.0.1:0",
        "--unix",
        "{dir}/nbd.sock",
    ]);
    let mut script = s.spawn_script(&format!("EXPORT = {export:?}\n{SCRIPT}"));
    script.wait_for("READY", Duration::from_secs(120), &s);

    // Crash the server with all three connections still open.
    s.kill();

    // Let the script finish (its connections are now dead).
    script.finish(Duration::from_secs(30));

    if file_backed {
        // The bytes are in the backing file (raw image) right after the crash.
        let f = std::fs::File::open(s.dir().join("mc.img")).unwrap();
        for (off, want) in [
            (4 * MIB, pattern_py(1, MIB as usize)),
            (30 * MIB, pattern_py(5, 512 * KIB as usize)),
        ] {
            let mut buf = vec![0u8; want.len()];
            f.read_exact_at(&mut buf, off).unwrap();
            assert!(
                buf == want,
                "backing file at {off} does not hold the flushed data after SIGKILL"
            );
        }
        // And a restarted server on the same image serves everything.
        s.start_again();
        s.python(&format!("EXPORT = {export:?}\n{VERIFY}"));
    }
}

/// The python prelude's `pat(seed, n)`, reimplemented for direct file checks.
fn pattern_py(seed: u64, n: usize) -> Vec<u8> {
    let block: Vec<u8> = (0..4096u64)
        .map(|i| (((i * 131 + seed * 29 + (i >> 8) * 7) & 0xff) | 1) as u8)
        .collect();
    block.iter().copied().cycle().take(n).collect()
}

#[test]
fn flush_on_one_connection_covers_writes_on_others_file_store() {
    three_connections_then_crash("disk", true);
}

#[test]
fn flush_on_one_connection_covers_writes_on_others_memory_store() {
    // Memory store: visibility only (a crash loses everything by design).
    three_connections_then_crash("mem", false);
}

#[test]
fn nbdcopy_multi_conn_and_nbdinfo_agree() {
    let s = Server::start(&[
        "--export",
        "disk=file:{dir}/d.img?size=32M",
        "--listen",
        "127.0.0.1:0",
    ]);
    let uri = s.uri("disk");
    let out = s.run_unchecked("nbdinfo", &["--can", "multi-conn", &uri]);
    assert!(out.status.success(), "nbdinfo --can multi-conn: {out:?}");
    let src = s.dir().join("src.bin");
    std::fs::write(&src, pattern(3, 32 * MIB as usize)).unwrap();
    // nbdcopy only opens several connections when multi-conn is advertised.
    s.run(
        "nbdcopy",
        &["-C", "4", "--flush", src.to_str().unwrap(), &uri],
    );
    let back = s.dir().join("back.bin");
    s.run("nbdcopy", &["-C", "4", &uri, back.to_str().unwrap()]);
    assert_eq!(sha256_file(&src), sha256_file(&back));
}
