//! Every NBD transmission command, driven through libnbd (python bindings
//! and `nbdsh`) against the real server, for both the memory and the file
//! store: READ, WRITE (+FUA), FLUSH, TRIM, CACHE, WRITE_ZEROES (+NO_HOLE,
//! +FAST_ZERO), BLOCK_STATUS (+REQ_ONE), DF reads, simple vs structured
//! replies, high queue depth, and the server's handling of bad requests
//! (libnbd strict mode off, so the server's own checks are exercised).

mod common;

use common::*;

/// Content of the pre-existing read-only image `ro.img` (16 MiB).
const RO_MARK: &[u8] = b"READONLY";
const RO_MARK_OFFSET: u64 = MIB;

fn server() -> Server {
    Server::start_prepared(
        &[
            "--export",
            "mem=memory:?size=64M",
            "--export",
            "file=file:{dir}/disk.img?size=64M",
            "--export",
            "ro=memory:?size=16M&readonly=true",
            "--export",
            "rofile=file:{dir}/ro.img?size=16M&readonly=true",
            "--listen",
            "127.0.0.1:0",
            "--unix",
            "{dir}/nbd.sock",
        ],
        |dir| {
            // A read-only file export needs an existing image.
            let mut img = vec![0u8; 16 * MIB as usize];
            let mark = RO_MARK.repeat(8192);
            img[RO_MARK_OFFSET as usize..RO_MARK_OFFSET as usize + mark.len()]
                .copy_from_slice(&mark);
            std::fs::write(dir.join("ro.img"), img).unwrap();
        },
    )
}

/// Run `body` with `EXPORT` (and `IMG`, the backing file for file stores or
/// None) defined.
fn run_for(s: &Server, export: &str, body: &str) -> String {
    let img = if export == "file" {
        format!("{:?}", s.dir().join("disk.img").to_str().unwrap())
    } else {
        "None".to_string()
    };
    s.python(&format!("EXPORT = {export:?}\nIMG = {img}\n{body}"))
}

// ---------------------------------------------------------------------------
// READ / WRITE / FUA / FLUSH
// ---------------------------------------------------------------------------

const READ_WRITE: &str = r#"
h = connect(EXPORT)
size = h.get_size()
check_eq(size, 64 * MiB, "export size")
check(h.can_fua(), "FUA must be advertised")
check(h.can_flush(), "FLUSH must be advertised")
check(not h.is_read_only(), "must be writable")

a = pat(1, 256 * KiB)
h.pwrite(a, 1 * MiB)
check_buf(h.pread(len(a), 1 * MiB), a, "aligned 256K write, no flags")

b = pat(2, 64 * KiB)
h.pwrite(b, 3 * MiB, flags=nbd.CMD_FLAG_FUA)
check_buf(h.pread(len(b), 3 * MiB), b, "64K write with FUA")

# Minimum block size is 1: tiny and unaligned writes work.
h.pwrite(b"\x5a\xa5\x3c", 4095)
check_buf(h.pread(5, 4094), b"\x00\x5a\xa5\x3c\x00", "3-byte write at 4095 (crosses a 4K boundary)")
d = pat(3, 10000)
h.pwrite(d, 12345)
check_buf(h.pread(10000, 12345), d, "unaligned 10000-byte write at 12345")
h.pwrite(b"\xff" * 100, 12345 + 50, flags=nbd.CMD_FLAG_FUA)
check_buf(h.pread(10000, 12345), d[:50] + b"\xff" * 100 + d[150:], "partial overwrite")
check_buf(h.pread(7, 12345 - 3), b"\x00\x00\x00" + d[:4], "read straddling start of written data")

# First and last bytes of the export.
h.pwrite(b"\x11", 0)
h.pwrite(b"\x22", size - 1)
check_eq(bytes(h.pread(1, 0)), b"\x11", "first byte")
check_eq(bytes(h.pread(1, size - 1)), b"\x22", "last byte")
e = pat(4, 8192)
h.pwrite(e, size - 8192)
check_buf(h.pread(8192, size - 8192), e, "last 8K")

# Exactly the advertised maximum payload, both directions.
m = h.get_block_size(nbd.SIZE_MAXIMUM)
check_eq(m, 32 * MiB, "maximum payload")
check_eq(h.get_block_size(nbd.SIZE_MINIMUM), 1, "minimum block size")
check_eq(h.get_block_size(nbd.SIZE_PREFERRED), 4096, "preferred block size")
big = pat(5, m)
h.pwrite(big, 16 * MiB)
check_buf(h.pread(m, 16 * MiB), big, "32 MiB write + 32 MiB read")

h.flush()

# A second connection sees everything.
h2 = connect(EXPORT, transport="unix")
check_buf(h2.pread(len(a), 1 * MiB), a, "second connection (unix socket) reads data of the first")
check_buf(h2.pread(m, 16 * MiB), big, "second connection reads the 32 MiB block")

if IMG is not None:
    # The file store is a raw image: after FLUSH the bytes are in the file.
    with open(IMG, "rb") as f:
        f.seek(1 * MiB); check_buf(f.read(len(a)), a, "backing file at 1 MiB")
        f.seek(12345); check_buf(f.read(10000), d[:50] + b"\xff" * 100 + d[150:], "backing file at 12345")
        f.seek(size - 8192); check_buf(f.read(8192), e, "backing file tail")
    check_eq(os.path.getsize(IMG), size, "backing file size")
h.shutdown()
h2.shutdown()
print("ok")
"#;

#[test]
fn read_write_fua_flush_memory() {
    let s = server();
    run_for(&s, "mem", READ_WRITE);
}

#[test]
fn read_write_fua_flush_file() {
    let s = server();
    run_for(&s, "file", READ_WRITE);
}

// ---------------------------------------------------------------------------
// Sparse reads
// ---------------------------------------------------------------------------

const SPARSE_READS: &str = r#"
h = connect(EXPORT)
for (off, n) in [(0, 4096), (1, 511), (5 * MiB + 7, 100000), (63 * MiB, 1 * MiB), (0, 32 * MiB)]:
    check(bytes(h.pread(n, off)) == bytes(n), "never-written region [%d, +%d) must read as zeros" % (off, n))
# DF read of a hole.
# (libnbd 1.14 only accepts DF on pread_structured.)
check(bytes(h.pread_structured(1 * MiB, 7 * MiB, lambda *a: 0, flags=nbd.CMD_FLAG_DF)) == bytes(1 * MiB), "DF read of a hole")
print("ok")
"#;

#[test]
fn sparse_regions_read_as_zero_memory() {
    let s = server();
    run_for(&s, "mem", SPARSE_READS);
}

#[test]
fn sparse_regions_read_as_zero_file() {
    let s = server();
    run_for(&s, "file", SPARSE_READS);
}

// ---------------------------------------------------------------------------
// TRIM
// ---------------------------------------------------------------------------

const TRIM: &str = r#"
h = connect(EXPORT)
check(h.can_trim(), "TRIM must be advertised")
data = pat(7, 12 * MiB)
h.pwrite(data, 4 * MiB)          # data in [4M, 16M)
h.flush()
m = allocation_map(h, 4 * MiB, 16 * MiB, mask=nbd.STATE_HOLE | nbd.STATE_ZERO)
check(all(f == 0 for (_, _, f) in m), "freshly written [4M,16M) must be data (no HOLE, no ZERO): %r" % m)
alloc_before = os.stat(IMG).st_blocks * 512 if IMG else None

# 4 MiB-aligned trim in the middle of the data.
h.trim(4 * MiB, 8 * MiB)
check(bytes(h.pread(4 * MiB, 8 * MiB)) == bytes(4 * MiB), "trimmed [8M,12M) must read as zeros")
check_buf(h.pread(4 * MiB, 4 * MiB), data[:4 * MiB], "data before the trimmed range is intact")
check_buf(h.pread(4 * MiB, 12 * MiB), data[8 * MiB:], "data after the trimmed range is intact")
m = allocation_map(h, 4 * MiB, 16 * MiB, mask=nbd.STATE_HOLE)
check_eq(m, [(4 * MiB, 4 * MiB, 0), (8 * MiB, 4 * MiB, nbd.STATE_HOLE), (12 * MiB, 4 * MiB, 0)],
         "base:allocation after trimming [8M,12M) (offset, length, HOLE bit)")
m = allocation_map(h, 8 * MiB, 12 * MiB)
check(all(f & nbd.STATE_ZERO for (_, _, f) in m), "trimmed hole should also report ZERO: %r" % m)
if IMG:
    alloc_after = os.stat(IMG).st_blocks * 512
    check(alloc_before - alloc_after >= 4 * MiB - 64 * KiB,
          "TRIM on the file store should punch a hole: allocated %d -> %d bytes" % (alloc_before, alloc_after))

# Unaligned, small trims: contents of the trimmed bytes are unspecified
# afterwards (spec), but bytes outside the range must never change.
h.trim(1000, 4 * MiB + 100)
check_buf(h.pread(100, 4 * MiB), data[:100], "bytes before an unaligned trim")
check_buf(h.pread(4096, 4 * MiB + 1100), data[1100:1100 + 4096], "bytes after an unaligned trim")
h.trim(5000, 12 * MiB + 3)
check_buf(h.pread(3, 12 * MiB), data[8 * MiB:8 * MiB + 3], "bytes before an unaligned trim (2)")
check_buf(h.pread(8192, 12 * MiB + 5003), data[8 * MiB + 5003:8 * MiB + 5003 + 8192], "bytes after an unaligned trim (2)")

# Trim with FUA, then the whole export; then everything reads as zero.
h.trim(1 * MiB, 14 * MiB, flags=nbd.CMD_FLAG_FUA)
h.trim(h.get_size(), 0)
h.flush()
check(bytes(h.pread(32 * MiB, 0)) == bytes(32 * MiB), "after trimming everything, reads are zero")
m = allocation_map(h, 0, h.get_size(), mask=nbd.STATE_HOLE)
check_eq(m, [(0, h.get_size(), nbd.STATE_HOLE)], "after trimming everything the export is one hole")
alive(h, "trims")
print("ok")
"#;

#[test]
fn trim_then_hole_and_zeros_memory() {
    let s = server();
    run_for(&s, "mem", TRIM);
}

#[test]
fn trim_then_hole_and_zeros_file() {
    let s = server();
    run_for(&s, "file", TRIM);
}

// ---------------------------------------------------------------------------
// WRITE_ZEROES
// ---------------------------------------------------------------------------

const WRITE_ZEROES: &str = r#"
h = connect(EXPORT)
check(h.can_zero(), "WRITE_ZEROES must be advertised")
check(h.can_fast_zero(), "FAST_ZERO must be advertised")
data = pat(11, 24 * MiB)
h.pwrite(data, 0)
h.flush()

def expect_zero_range(off, n, what):
    check(bytes(h.pread(n, off)) == bytes(n), "%s: [%d,+%d) must read as zeros" % (what, off, n))

def expect_data(off, n, what):
    check_buf(h.pread(n, off), data[off:off + n], "%s: data at [%d,+%d) must be untouched" % (what, off, n))

# Plain, aligned.
h.zero(4 * MiB, 4 * MiB)
expect_zero_range(4 * MiB, 4 * MiB, "plain zero")
expect_data(0, 4 * MiB, "plain zero"); expect_data(8 * MiB, 64 * KiB, "plain zero")
# Plain, unaligned and tiny.
h.zero(1000, 100)
expect_zero_range(100, 1000, "unaligned zero")
expect_data(0, 100, "unaligned zero"); expect_data(1100, 8192, "unaligned zero")
h.zero(1, 12 * MiB + 4095)
expect_zero_range(12 * MiB + 4095, 1, "1-byte zero")
expect_data(12 * MiB + 4090, 5, "1-byte zero"); expect_data(12 * MiB + 4096, 10, "1-byte zero")
# With FUA.
h.zero(64 * KiB, 9 * MiB, flags=nbd.CMD_FLAG_FUA)
expect_zero_range(9 * MiB, 64 * KiB, "zero+FUA")
expect_data(9 * MiB + 64 * KiB, 4096, "zero+FUA")

# NO_HOLE: must read as zero and the area must be provisioned.
alloc_before = os.stat(IMG).st_blocks * 512 if IMG else None
h.zero(4 * MiB, 40 * MiB, flags=nbd.CMD_FLAG_NO_HOLE)   # [40M,44M) was never written (a hole)
expect_zero_range(40 * MiB, 4 * MiB, "NO_HOLE zero of a hole")
h.zero(2 * MiB, 14 * MiB, flags=nbd.CMD_FLAG_NO_HOLE)   # over data
expect_zero_range(14 * MiB, 2 * MiB, "NO_HOLE zero of data")
expect_data(13 * MiB, 1 * MiB, "NO_HOLE zero"); expect_data(16 * MiB, 1 * MiB, "NO_HOLE zero")
if IMG:
    alloc_after = os.stat(IMG).st_blocks * 512
    check(alloc_after - alloc_before >= 4 * MiB - 64 * KiB,
          "NO_HOLE zero of a hole must provision it on the file store (allocated %d -> %d)" % (alloc_before, alloc_after))
    # (No block-status check here: a provisioned range made with
    # fallocate(ZERO_RANGE) is an unwritten extent, which SEEK_DATA on ext4
    # legitimately reports as a hole.)

# FAST_ZERO (holes allowed): the memory and file stores can always zero
# quickly (deallocate), so this must succeed.
t0 = time.time()
h.zero(7 * MiB, 17 * MiB, flags=nbd.CMD_FLAG_FAST_ZERO)
check(time.time() - t0 < 5, "FAST_ZERO took %.1fs" % (time.time() - t0))
expect_zero_range(17 * MiB, 7 * MiB, "FAST_ZERO")
expect_data(16 * MiB, 1 * MiB, "FAST_ZERO")
# FAST_ZERO | NO_HOLE: either succeeds (zeros) or fails fast with ENOTSUP
# leaving the contents alone.
h.pwrite(data[:4 * MiB], 48 * MiB)
t0 = time.time()
try:
    h.zero(4 * MiB, 48 * MiB, flags=nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    expect_zero_range(48 * MiB, 4 * MiB, "FAST_ZERO|NO_HOLE")
except nbd.Error as e:
    check_eq(e.errno, "ENOTSUP", "FAST_ZERO|NO_HOLE may only fail with ENOTSUP")
    check_buf(h.pread(4 * MiB, 48 * MiB), data[:4 * MiB], "failed FAST_ZERO must not alter contents")
check(time.time() - t0 < 5, "FAST_ZERO|NO_HOLE took %.1fs" % (time.time() - t0))
# Zero the whole export.
h.zero(h.get_size(), 0)
h.flush()
expect_zero_range(0, 32 * MiB, "zero whole export"); expect_zero_range(32 * MiB, 32 * MiB, "zero whole export")
alive(h, "write zeroes")
print("ok")
"#;

#[test]
fn write_zeroes_plain_no_hole_fast_zero_memory() {
    let s = server();
    run_for(&s, "mem", WRITE_ZEROES);
}

#[test]
fn write_zeroes_plain_no_hole_fast_zero_file() {
    let s = server();
    run_for(&s, "file", WRITE_ZEROES);
}

// ---------------------------------------------------------------------------
// CACHE
// ---------------------------------------------------------------------------

const CACHE: &str = r#"
h = connect(EXPORT)
check(h.can_cache(), "CACHE must be advertised")
a = pat(21, 1 * MiB)
h.pwrite(a, 2 * MiB)
h.cache(1 * MiB, 2 * MiB)        # data
h.cache(4 * MiB, 10 * MiB)       # hole
h.cache(32 * MiB, 0)             # the maximum payload size
# Larger than the maximum payload: the spec lets the server refuse (EINVAL or
# EOVERFLOW) but not disconnect.
try:
    h.cache(h.get_size(), 0)
except nbd.Error as e:
    check(e.errno in ("EINVAL", "EOVERFLOW"), "cache of the whole export failed with %s" % e)
alive(h, "cache of the whole export")
h.cache(1, 2 * MiB + 17)         # unaligned
c = h.aio_cache(64 * KiB, 2 * MiB)
run_aio(h)
check(h.aio_command_completed(c), "aio_cache completed")
check_buf(h.pread(1 * MiB, 2 * MiB), a, "data after CACHE")
check(bytes(h.pread(1 * MiB, 10 * MiB)) == bytes(1 * MiB), "hole after CACHE")
print("ok")
"#;

#[test]
fn cache_command_memory() {
    let s = server();
    run_for(&s, "mem", CACHE);
}

#[test]
fn cache_command_file() {
    let s = server();
    run_for(&s, "file", CACHE);
}

// ---------------------------------------------------------------------------
// BLOCK_STATUS
// ---------------------------------------------------------------------------

#[test]
fn block_status_on_sparse_file_exact_extents() {
    let s = server();
    run_for(
        &s,
        "file",
        r#"
h = connect(EXPORT)
check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation must be negotiated")
size = h.get_size()
HZ = nbd.STATE_HOLE | nbd.STATE_ZERO
check_eq(allocation_map(h, 0, size), [(0, size, HZ)], "fresh sparse file: one hole+zero extent")

h.pwrite(pat(31, 1 * MiB), 1 * MiB)              # data [1M, 2M)
h.pwrite(pat(32, 64 * KiB), 8 * MiB)             # data [8M, 8M+64K)
h.pwrite(pat(33, 1 * MiB), 63 * MiB)             # data [63M, 64M) (end of export)
expected = [
    (0, 1 * MiB, HZ),
    (1 * MiB, 1 * MiB, 0),
    (2 * MiB, 6 * MiB, HZ),
    (8 * MiB, 64 * KiB, 0),
    (8 * MiB + 64 * KiB, 55 * MiB - 64 * KiB, HZ),
    (63 * MiB, 1 * MiB, 0),
]
check_eq(allocation_map(h, 0, size), expected, "extents (offset, length, HOLE|ZERO) of the sparse file")
# Also when the queries start mid-extent.
check_eq(allocation_map(h, 1 * MiB + 4096, 8 * MiB + 4096),
         [(1 * MiB + 4096, 1 * MiB - 4096, 0), (2 * MiB, 6 * MiB, HZ), (8 * MiB, 4096, 0)],
         "extents of a range starting inside a data extent")

# Raw reply checks, single calls.
def one(count, off, flags=0):
    return extents_once(h, count, off, flags)

ext = one(4 * MiB, 0)
check(len(ext) >= 1, "at least one extent")
check_eq(ext[0][0], 0, "first extent starts at the request offset")
covered = 0
for i, (o, l, f) in enumerate(ext):
    check(l > 0, "extent lengths must be nonzero: %r" % ext)
    if i < len(ext) - 1:
        covered += l
check(covered < 4 * MiB, "sum of the first N-1 extents must be below the request length: %r" % ext)
check_eq(ext[0], (0, 1 * MiB, HZ), "first extent of [0,4M)")

# REQ_ONE: exactly one extent, never longer than the request.
for (count, off, want_flags) in [(64 * MiB, 0, HZ), (4096, 1 * MiB + 4096, 0), (100, 2 * MiB + 100, HZ),
                                 (1 * MiB, 63 * MiB, 0), (3, 8 * MiB + 64 * KiB - 1, 0), (1, size - 1, 0),
                                 (32 * MiB, 8 * MiB + 64 * KiB, HZ)]:
    ext = one(count, off, nbd.CMD_FLAG_REQ_ONE)
    check_eq(len(ext), 1, "REQ_ONE block status (count=%d, offset=%d) must return exactly one extent: %r" % (count, off, ext))
    (o, l, f) = ext[0]
    check(0 < l <= count, "REQ_ONE extent length %d must be in (0, %d] (offset=%d)" % (l, count, off))
    check_eq(f & HZ, want_flags, "REQ_ONE extent flags at offset %d" % off)
ext = one(64 * MiB, 0, nbd.CMD_FLAG_REQ_ONE)
check_eq(ext[0][1], 1 * MiB, "REQ_ONE at 0: the hole ends exactly at 1M")
print("ok")
"#,
    );
}

/// Whatever granularity the memory store tracks allocation at, it must never
/// claim ZERO for bytes that are not zero (clients like qemu-img convert
/// would skip copying them), and unwritten space must read as zero.
#[test]
fn block_status_memory_never_claims_zero_for_data() {
    let s = server();
    run_for(
        &s,
        "mem",
        r#"
h = connect(EXPORT)
check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation must be negotiated")
size = h.get_size()
writes = [(1 * MiB, 1 * MiB), (8 * MiB + 512, 3), (20 * MiB + 4096, 64 * KiB), (size - 1, 1)]
for i, (off, n) in enumerate(writes):
    h.pwrite(pat(40 + i, n), off)
m = allocation_map(h, 0, size)
for (off, n) in writes:
    for (o, l, f) in m:
        if o < off + n and off < o + l:
            check(not f & nbd.STATE_ZERO, "extent (%d, %d, %d) overlaps written data at [%d,+%d) but claims ZERO" % (o, l, f, off, n))
# REQ_ONE on the memory store.
for (count, off) in [(64 * MiB, 0), (4096, 1 * MiB + 4096), (1, size - 1), (10, 8 * MiB + 510)]:
    ext = extents_once(h, count, off, nbd.CMD_FLAG_REQ_ONE)
    check_eq(len(ext), 1, "REQ_ONE must return exactly one extent at %d: %r" % (off, ext))
    check(0 < ext[0][1] <= count, "REQ_ONE extent length %d must be in (0, %d]" % (ext[0][1], count))
# After trimming everything: one zero region.
h.trim(size, 0)
m = allocation_map(h, 0, size, mask=nbd.STATE_ZERO)
check_eq(m, [(0, size, nbd.STATE_ZERO)], "after trimming the whole memory export it must read as zero")
print("ok")
"#,
    );
}

// ---------------------------------------------------------------------------
// Simple vs structured replies, DF
// ---------------------------------------------------------------------------

#[test]
fn simple_replies_when_structured_replies_are_not_requested() {
    let s = server();
    s.python(
        r#"
for name in ("mem", "file"):
    h = connect(name, structured=False, strict=0)
    check(not h.get_structured_replies_negotiated(), "structured replies must be off")
    check(not h.can_df(), "SEND_DF must not be advertised without structured replies (spec MUST)")
    check(not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "no meta context without structured replies")
    a = pat(51, 1 * MiB)
    h.pwrite(a, 5 * MiB, flags=nbd.CMD_FLAG_FUA)
    check_buf(h.pread(1 * MiB, 5 * MiB), a, name + ": read with simple reply")
    check(bytes(h.pread(4096, 30 * MiB)) == bytes(4096), name + ": sparse read with simple reply")
    big = pat(52, 32 * MiB)
    h.pwrite(big, 32 * MiB)
    check_buf(h.pread(32 * MiB, 32 * MiB), big, name + ": 32 MiB read with a simple reply")
    h.trim(1 * MiB, 5 * MiB); h.zero(4096, 40 * MiB); h.cache(4096, 0); h.flush()
    # Errors arrive as simple error replies; the stream stays in sync.
    expect_error("EINVAL", name + ": simple-reply read past end", h.pread, 4096, h.get_size())
    alive(h, "simple-reply read error")
    expect_error("ENOSPC", name + ": simple-reply write past end", h.pwrite, b"z" * 4096, h.get_size())
    alive(h, "simple-reply write error")
    check(bytes(h.pread(4096, 0)) == bytes(4096), "after errors")
    h.shutdown()
print("ok")
"#,
    );
}

#[test]
fn structured_replies_negotiated_and_df_reads() {
    let s = server();
    s.python(
        r#"
for name in ("mem", "file"):
    h = connect(name)
    check(h.get_structured_replies_negotiated(), name + ": structured replies must be negotiated")
    check(h.can_df(), name + ": DF must be advertised")
    a = pat(61, 1 * MiB)
    h.pwrite(a, 2 * MiB)
    # Mixed data/hole ranges, with and without DF.
    want = bytes(1 * MiB) + a + bytes(1 * MiB)
    check_buf(h.pread(3 * MiB, 1 * MiB), want, name + ": structured read of hole+data+hole")
    # Chunks must exactly cover the request, with no overlap; with DF there
    # is exactly one chunk. The spec requires DF to work for requests up to
    # 64 KiB; larger DF reads may instead fail with EOVERFLOW.
    for (count, off) in [(64 * KiB, 2 * MiB - 32 * KiB), (64 * KiB, 3 * MiB - 4096), (3 * MiB, 1 * MiB)]:
        for flags in (0, nbd.CMD_FLAG_DF):
            chunks = []
            def cb(buf, o, status, err):
                chunks.append((o, len(buf), status))
                return 0
            what = "%s: read of [%d,+%d) flags=%d" % (name, off, count, flags)
            try:
                buf = h.pread_structured(count, off, cb, flags=flags)
            except nbd.Error as e:
                check(flags and count > 64 * KiB and e.errno == "EOVERFLOW", "%s failed: %s" % (what, e))
                continue
            check_buf(buf, want[off - 1 * MiB:off - 1 * MiB + count], what)
            chunks.sort()
            pos = off
            for (o, n, st) in chunks:
                check(st in (nbd.READ_DATA, nbd.READ_HOLE), "unexpected chunk status %r" % st)
                check_eq(o, pos, what + ": chunks must be contiguous, non-overlapping: %r" % chunks)
                pos += n
            check_eq(pos, off + count, what + ": chunks must cover the request: %r" % chunks)
            if flags == nbd.CMD_FLAG_DF:
                check_eq(len(chunks), 1, what + ": a DF read must be a single chunk: %r" % chunks)
    h.shutdown()
print("ok")
"#,
    );
}

// ---------------------------------------------------------------------------
// High queue depth
// ---------------------------------------------------------------------------

const CONCURRENT: &str = r#"
import random
h = connect(EXPORT)
QD = 128
BS = 32 * KiB
N = 1024                     # 32 MiB in 1024 blocks
def content(i, gen):
    return random.Random(i * 1000 + gen).randbytes(BS)

def issue(fn, *args):
    while h.aio_in_flight() >= QD:
        h.poll(-1)
    return fn(*args)

# Phase 1: write every block, out of order, QD writes in flight.
order = list(range(N)); random.Random(1).shuffle(order)
keep = []
cookies = []
for i in order:
    b = nbd.Buffer.from_bytearray(bytearray(content(i, 0)))
    keep.append(b)
    fl = nbd.CMD_FLAG_FUA if i % 7 == 0 else 0
    cookies.append(issue(h.aio_pwrite, b, i * BS, None, fl))
run_aio(h)
for c in cookies:
    check(h.aio_command_completed(c), "write %d completed" % c)

# Phase 2: mixed: read even blocks while rewriting odd blocks (disjoint), plus
# flushes and cache requests in the stream.
reads = {}
cookies = []
keep = []
for j, i in enumerate(order):
    if i % 2 == 0:
        b = nbd.Buffer(BS)
        reads[i] = b
        cookies.append(issue(h.aio_pread, b, i * BS))
    else:
        b = nbd.Buffer.from_bytearray(bytearray(content(i, 1)))
        keep.append(b)
        cookies.append(issue(h.aio_pwrite, b, i * BS))
    if j % 100 == 99:
        cookies.append(issue(h.aio_flush))
    if j % 150 == 0:
        cookies.append(issue(h.aio_cache, BS, i * BS))
run_aio(h)
for c in cookies:
    check(h.aio_command_completed(c), "command %d completed" % c)
for i, b in reads.items():
    check_buf(b.to_bytearray(), content(i, 0), "async read of block %d" % i)

# Phase 3: read everything back asynchronously and verify.
reads = {}
for i in order:
    b = nbd.Buffer(BS)
    reads[i] = b
    issue(h.aio_pread, b, i * BS)
run_aio(h)
for i, b in reads.items():
    check_buf(b.to_bytearray(), content(i, i % 2), "final async read of block %d" % i)
print("ok")
"#;

#[test]
fn many_concurrent_async_requests_memory() {
    let s = server();
    run_for(&s, "mem", CONCURRENT);
}

#[test]
fn many_concurrent_async_requests_file() {
    let s = server();
    run_for(&s, "file", CONCURRENT);
}

// ---------------------------------------------------------------------------
// Bad requests, strict mode off
// ---------------------------------------------------------------------------

const BAD_REQUESTS: &str = r#"
h = connect(EXPORT, strict=0)
size = h.get_size()
ref = pat(71, 64 * KiB)
h.pwrite(ref, 0)
def ok(what):
    try:
        check_buf(h.pread(len(ref), 0), ref, "connection unusable after " + what)
    except nbd.Error as e:
        raise AssertionError("connection unusable after %s: %s" % (what, e))

# READ past the end -> EINVAL
for (n, off) in [(4096, size), (8192, size - 4096), (1, size), (512, 2 ** 63), (4096, 2 ** 64 - 1024)]:
    expect_error("EINVAL", "read %d bytes at offset %d (size %d)" % (n, off, size), h.pread, n, off)
    ok("read past end at %d" % off)

# WRITE past the end -> ENOSPC, and nothing is written
for (n, off) in [(4096, size), (8192, size - 4096), (1, size), (4096, 2 ** 64 - 1024)]:
    expect_error("ENOSPC", "write %d bytes at offset %d (size %d)" % (n, off, size), h.pwrite, b"\xee" * n, off)
    ok("write past end at %d" % off)
check(bytes(h.pread(4096, size - 4096)) == bytes(4096), "a rejected straddling write must not modify the in-range part")

# TRIM past the end -> EINVAL; WRITE_ZEROES past the end -> ENOSPC (spec)
expect_error("EINVAL", "trim past end", h.trim, 4096, size); ok("trim past end")
expect_error("EINVAL", "trim straddling end", h.trim, 8192, size - 4096); ok("trim straddling end")
expect_error("ENOSPC", "write zeroes past end", h.zero, 4096, size); ok("zero past end")
expect_error("ENOSPC", "write zeroes straddling end", h.zero, 8192, size - 4096); ok("zero straddling end")
expect_error(None, "cache past end", h.cache, 4096, size); ok("cache past end")
try:
    extents_once(h, 4096, size)
    raise AssertionError("block status starting at the end of the export should fail")
except nbd.Error as e:
    check_eq(e.errno, "EINVAL", "block status past end errno")
ok("block status past end")

# Zero-length requests: any reply is fine, but no disconnect.
for (what, fn, args) in [("read", h.pread, (0, 0)), ("write", h.pwrite, (b"", 0)),
                         ("trim", h.trim, (0, 0)), ("zero", h.zero, (0, 0)),
                         ("cache", h.cache, (0, 0)), ("read at end", h.pread, (0, size)),
                         ("write at end", h.pwrite, (b"", size))]:
    try:
        fn(*args)
    except nbd.Error:
        pass
    ok("zero-length " + what)
try:
    extents_once(h, 0, 0)
except nbd.Error:
    pass
ok("zero-length block status")

# Flags that do not apply to a command: error or ignore, never disconnect.
for (what, fn, args, fl) in [("read+REQ_ONE", h.pread, (4096, 0), nbd.CMD_FLAG_REQ_ONE),
                             ("read+NO_HOLE", h.pread, (4096, 0), nbd.CMD_FLAG_NO_HOLE),
                             ("trim+NO_HOLE", h.trim, (4096, 1 * MiB), nbd.CMD_FLAG_NO_HOLE),
                             ("write+DF", h.pwrite, (ref[:4096], 0), nbd.CMD_FLAG_DF),
                             ("flush+FUA", h.flush, (), nbd.CMD_FLAG_FUA)]:
    try:
        fn(*args, flags=fl)
    except nbd.Error:
        pass
    ok(what)

# Payload above the advertised maximum: an error reply, the connection stays
# usable, and nothing was written.
m = h.get_block_size(nbd.SIZE_MAXIMUM)
big = pat(72, m + 4096)
h.pwrite(big[:m], 1 * MiB)
h.pwrite(big[m:], 1 * MiB + m)
expect_error(None, "write of %d bytes (max payload %d)" % (m + 4096, m), h.pwrite, b"\xdd" * (m + 4096), 1 * MiB)
ok("oversized write")
check_buf(h.pread(m, 1 * MiB) + h.pread(4096, 1 * MiB + m), big, "a rejected oversized write must not modify data")
expect_error(None, "structured read of %d bytes (max payload %d)" % (m + 4096, m), h.pread, m + 4096, 0)
ok("oversized read")

s2 = connect(EXPORT, structured=False, strict=0)
expect_error(None, "simple-reply read of %d bytes (max payload %d)" % (m + 4096, m), s2.pread, m + 4096, 0)
check_buf(s2.pread(len(ref), 0), ref, "simple-reply connection usable after oversized read")
s2.shutdown()

check(not h.aio_is_dead(), "connection dead")
h.shutdown()
print("ok")
"#;

#[test]
fn bad_requests_get_errors_and_connection_survives_memory() {
    let s = server();
    run_for(&s, "mem", BAD_REQUESTS);
}

#[test]
fn bad_requests_get_errors_and_connection_survives_file() {
    let s = server();
    run_for(&s, "file", BAD_REQUESTS);
}

#[test]
fn read_only_exports_refuse_modifications_with_eperm() {
    let s = server();
    s.python(
        r#"
for name in ("ro", "rofile"):
    h = connect(name, strict=0)
    check(h.is_read_only(), name + " must be read-only")
    check(not h.can_trim() and not h.can_zero() and not h.can_fast_zero(), name + ": no trim/zero on read-only")
    check(bytes(h.pread(1 * MiB, 0)) == bytes(1 * MiB), name + ": read works")
    if name == "rofile":
        check_eq(bytes(h.pread(64 * KiB, 1 * MiB)), b"READONLY" * 8192, "rofile: existing file content is served")
    expect_error("EPERM", name + ": write", h.pwrite, b"x" * 4096, 0); alive(h, "write on ro")
    expect_error("EPERM", name + ": write+FUA", h.pwrite, b"x" * 4096, 4096, flags=nbd.CMD_FLAG_FUA); alive(h, "write+FUA on ro")
    expect_error("EPERM", name + ": trim", h.trim, 4096, 0); alive(h, "trim on ro")
    expect_error("EPERM", name + ": write zeroes", h.zero, 4096, 0); alive(h, "zero on ro")
    expect_error("EPERM", name + ": write zeroes NO_HOLE", h.zero, 4096, 0, flags=nbd.CMD_FLAG_NO_HOLE); alive(h, "zero on ro")
    check(bytes(h.pread(8192, 0)) == bytes(8192), name + ": nothing was modified")
    for fn in (h.flush, lambda: h.cache(4096, 0)):
        try:
            fn()
        except nbd.Error:
            pass
    alive(h, "flush/cache on ro")
    h.shutdown()
# A read-only file export leaves its file alone.
import hashlib
check_eq(os.path.getsize(os.path.join(LW_DIR, "ro.img")), 16 * MiB, "ro.img size")
with open(os.path.join(LW_DIR, "ro.img"), "rb") as f:
    want = bytearray(16 * MiB)
    want[1 * MiB:1 * MiB + 64 * KiB] = b"READONLY" * 8192
    check(f.read() == want, "ro.img must be untouched")
print("ok")
"#,
    );
}

// ---------------------------------------------------------------------------
// Export selection during negotiation
// ---------------------------------------------------------------------------

#[test]
fn unknown_export_name_is_refused_cleanly() {
    let s = server();
    s.python(
        r#"
# Option mode: NBD_OPT_GO / NBD_OPT_INFO for an unknown name fail, and the
# server stays in negotiation so another export can be chosen.
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri("no-such-export"))
check(h.aio_is_negotiating(), "in option mode after connect")
expect_error(None, "opt_info for an unknown export", h.opt_info)
check(h.aio_is_negotiating(), "server must not disconnect after NBD_OPT_INFO for an unknown export")
expect_error(None, "opt_go for an unknown export", h.opt_go)
check(h.aio_is_negotiating(), "server must not disconnect after NBD_OPT_GO for an unknown export")
h.set_export_name("mem")
h.opt_go()
check_eq(h.get_size(), 64 * MiB, "export chosen after a refused one")
h.pwrite(b"after-refusal", 0)
check_eq(bytes(h.pread(13, 0)), b"after-refusal", "I/O after a refused export")
h.shutdown()

# Plain connect: fails promptly, no hang.
for transport in ("tcp", "unix"):
    t0 = time.time()
    h = nbd.NBD()
    expect_error(None, "connect to unknown export over " + transport, h.connect_uri, uri("no-such-export", transport))
    check(time.time() - t0 < 5, "refusal took %.1fs" % (time.time() - t0))
# Names differing only in case or with a trailing space are different names.
for bad in ("MEM", "mem ", "me", "memx"):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri("mem"))
    h.set_export_name(bad)
    expect_error(None, "export name %r" % bad, h.opt_go)
    h.opt_abort()
print("ok")
"#,
    );
}

#[test]
fn empty_export_name_gets_the_default_export() {
    // With an export named `default` (not first), "" selects it.
    let s = Server::start(&[
        "--export",
        "first=memory:?size=8M",
        "--export",
        "default=memory:?size=24M",
        "--listen",
        "127.0.0.1:0",
    ]);
    s.python(
        r#"
h = connect("")
check_eq(h.get_size(), 24 * MiB, "empty name must select `default`")
h.pwrite(b"written-via-empty-name", 4096, flags=nbd.CMD_FLAG_FUA)
d = connect("default")
check_eq(bytes(d.pread(22, 4096)), b"written-via-empty-name", "`default` sees data written via the empty name")
f = connect("first")
check(bytes(f.pread(22, 4096)) == bytes(22), "`first` is a different export")
print("ok")
"#,
    );
    // Without one, "" selects the first export.
    let s = server();
    s.python(
        r#"
h = connect("")
check_eq(h.get_size(), 64 * MiB, "empty name must select the first export (mem)")
h.pwrite(b"first-export", 0, flags=nbd.CMD_FLAG_FUA)
check_eq(bytes(connect("mem").pread(12, 0)), b"first-export", "empty name is `mem`")
print("ok")
"#,
    );
}

#[test]
fn option_haggling_list_info_and_starttls() {
    let s = Server::start(&[
        "--export",
        "a=memory:?size=1M&description=first+one",
        "--export",
        "b=file:{dir}/b.img?size=2M&description=second%20one",
        "--export",
        "c=memory:?size=3M&readonly=true",
        "--listen",
        "127.0.0.1:0",
    ]);
    s.python(
        r#"
h = nbd.NBD()
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri(uri(""))
got = []
n = h.opt_list(lambda name, desc: got.append((name, desc)) or 0)
check_eq(sorted(got), [("a", "first one"), ("b", "second one"), ("c", "")], "NBD_OPT_LIST")
check_eq(n, 3, "opt_list count")
for (name, size, ro, desc) in [("a", 1 * MiB, False, "first one"), ("b", 2 * MiB, False, "second one"), ("c", 3 * MiB, True, None)]:
    h.set_export_name(name)
    h.opt_info()
    check_eq(h.get_size(), size, "NBD_OPT_INFO size of " + name)
    check_eq(bool(h.is_read_only()), ro, "NBD_OPT_INFO read-only of " + name)
    if desc is not None:
        check_eq(h.get_export_description(), desc, "NBD_OPT_INFO description of " + name)
    check_eq(h.get_block_size(nbd.SIZE_MAXIMUM), 32 * MiB, "NBD_OPT_INFO block size of " + name)
# Listing twice on one connection is fine, then GO.
got2 = []
h.opt_list(lambda name, desc: got2.append(name) or 0)
check_eq(sorted(got2), ["a", "b", "c"], "second NBD_OPT_LIST")
h.set_export_name("b")
h.opt_go()
check_eq(h.get_size(), 2 * MiB, "GO after INFO/LIST")
h.shutdown()

# STARTTLS is refused by policy: TLS_REQUIRE fails (quickly), TLS_ALLOW falls
# back to plaintext on the same connection.
check(nbd.NBD().supports_tls(), "libnbd built without TLS")
t0 = time.time()
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
expect_error(None, "TLS_REQUIRE against a server without TLS", h.connect_uri, uri("a"))
check(time.time() - t0 < 5, "TLS refusal took %.1fs" % (time.time() - t0))
h = nbd.NBD()
h.set_tls(nbd.TLS_ALLOW)
h.connect_uri(uri("a"))
check(not h.get_tls_negotiated(), "no TLS")
h.pwrite(b"plaintext", 0)
check_eq(bytes(h.pread(9, 0)), b"plaintext", "I/O after refused STARTTLS")
print("ok")
"#,
    );
}

#[test]
fn nbdsh_one_liners() {
    let s = server();
    let uri = s.uri("mem");
    let out = s.nbdsh_ok(
        Some(&uri),
        "h.pwrite(b'hello from nbdsh', 1048576, nbd.CMD_FLAG_FUA); print(h.get_size()); print(h.pread(16, 1048576).decode())",
    );
    assert!(out.contains("67108864"), "{out}");
    assert!(out.contains("hello from nbdsh"), "{out}");
    let out = s.nbdsh_ok(
        Some(&s.unix_uri("mem")),
        "print(h.pread(16, 1048576).decode())",
    );
    assert!(out.contains("hello from nbdsh"), "{out}");
}
