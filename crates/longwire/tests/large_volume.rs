//! 6 TiB sparse exports (memory and file store): offsets beyond 32-bit and
//! 41-bit boundaries, the very end of the export, bounds errors, and qemu-io
//! with extended headers at large offsets.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;

const SIZE: u64 = 6 * TIB;

fn server() -> Server {
    Server::start(&[
        "--export",
        "mem=memory:?size=6T",
        "--export",
        "file=file:{dir}/big.img?size=6T",
        "--listen",
        "127.0.0.1:0",
    ])
}

const LARGE: &str = r#"
h = connect(EXPORT, strict=0)
size = h.get_size()
check_eq(size, 6 * TiB, "export size")
G4 = 4 * GiB
writes = [
    ("low",            4096,                   8192),
    ("below 4G",       G4 - 16384,             8192),
    ("straddling 4G",  G4 - 1000,              2000),
    ("above 4G",       G4 + 4096,              8192),
    ("4G + low",       G4 + 4096 + 64 * KiB,   4096),
    ("past 2T",        2 * TiB + 12345,        100000),
    ("above 2T+4G",    2 * TiB + G4 + 4096,    8192),
    ("5T",             5 * TiB,                1 * MiB),
    ("near end",       size - 1 * MiB - 4096,  1 * MiB),
    ("last 4K",        size - 4096,            4095),
    ("last byte",      size - 1,               1),
]
for i, (what, off, n) in enumerate(writes):
    h.pwrite(pat(100 + i, n), off, flags=nbd.CMD_FLAG_FUA if i % 2 else 0)
h.flush()
for i, (what, off, n) in enumerate(writes):
    check_buf(h.pread(n, off), pat(100 + i, n), "%s: read back at offset %d" % (what, off))
# No aliasing of high offsets onto low ones (32-bit truncation would put
# 4G+4096 on top of 4096, 2T+x on top of x, ...).
check(bytes(h.pread(4096, 4096 + 16 * KiB)) == bytes(4096), "4096+16K untouched")
check(bytes(h.pread(4096, 12345 + 200000)) == bytes(4096), "low offsets untouched by 2T writes")
check(bytes(h.pread(64 * KiB, 3 * TiB)) == bytes(64 * KiB), "3T is a hole")
check(bytes(h.pread(64 * KiB, 4 * TiB + 4096)) == bytes(64 * KiB), "4T+4K is a hole")
check(bytes(h.pread(4096, size - 2 * MiB)) == bytes(4096), "just before the near-end write is a hole")
# Overwrite straddling 4G and re-check neighbours.
h.pwrite(b"\xaa" * 16, G4 - 8)
check_eq(bytes(h.pread(16, G4 - 8)), b"\xaa" * 16, "16 bytes straddling 4G")
check_buf(h.pread(1000 - 8, G4 - 1000), pat(102, 2000)[:992], "before the 4G overwrite")
check_buf(h.pread(1000 - 8, G4 + 8), pat(102, 2000)[1008:], "after the 4G overwrite")

# Block status far into the export: holes and data at exact places.
m = allocation_map(h, 5 * TiB - 1 * MiB, 5 * TiB + 2 * MiB, mask=nbd.STATE_ZERO)
check_eq(m, [(5 * TiB - 1 * MiB, 1 * MiB, nbd.STATE_ZERO), (5 * TiB, 1 * MiB, 0), (5 * TiB + 1 * MiB, 1 * MiB, nbd.STATE_ZERO)],
         "block status around 5T (ZERO bit)")
ext = extents_once(h, 1 * GiB, 3 * TiB, nbd.CMD_FLAG_REQ_ONE)
check_eq(len(ext), 1, "REQ_ONE at 3T")
check(ext[0][2] & nbd.STATE_ZERO and 0 < ext[0][1] <= 1 * GiB, "3T: one zero extent within the request: %r" % ext)

# TRIM and WRITE_ZEROES at large offsets.
h.trim(1 * MiB, 5 * TiB)
check(bytes(h.pread(1 * MiB, 5 * TiB)) == bytes(1 * MiB), "trim at 5T reads zero")
h.zero(4096, size - 4096)
check(bytes(h.pread(4096, size - 4096)) == bytes(4096), "zero of the last 4K (including the last byte) reads zero")
check_buf(h.pread(4096, size - 1 * MiB - 4096), pat(108, 1 * MiB)[:4096], "near-end data intact after tail zero")

# Bounds at the end of a huge export.
expect_error("EINVAL", "read at size", h.pread, 1, size)
expect_error("EINVAL", "read straddling the end", h.pread, 8192, size - 4096)
expect_error("EINVAL", "read at 8T", h.pread, 4096, 8 * TiB)
expect_error("EINVAL", "read at 2^63", h.pread, 4096, 2 ** 63)
expect_error("ENOSPC", "write at size", h.pwrite, b"x", size)
expect_error("ENOSPC", "write straddling the end", h.pwrite, b"x" * 8192, size - 4096)
expect_error("ENOSPC", "write near 2^64", h.pwrite, b"x" * 4096, 2 ** 64 - 4096)
alive(h, "bounds errors")
print("ok")
"#;

#[test]
fn six_tib_memory_export() {
    let s = server();
    s.python(&format!("EXPORT = 'mem'\n{LARGE}"));
}

#[test]
fn six_tib_file_export() {
    let s = server();
    s.python(&format!("EXPORT = 'file'\n{LARGE}"));
    let md = std::fs::metadata(s.dir().join("big.img")).unwrap();
    assert_eq!(md.len(), SIZE, "backing file size");
    assert!(
        md.blocks() * 512 < 64 * MIB,
        "the 6 TiB backing file must stay sparse: {} bytes allocated",
        md.blocks() * 512
    );
}

#[test]
fn six_tib_file_backing_file_has_data_at_exact_offsets() {
    let s = server();
    s.python(
        r#"
h = connect("file")
h.pwrite(b"A" * 4096, 5 * TiB + 4096)
h.pwrite(b"B" * 512, 4 * GiB - 256)
h.flush()
print("ok")
"#,
    );
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(s.dir().join("big.img")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 5 * TIB + 4096).unwrap();
    assert!(buf.iter().all(|&b| b == b'A'), "backing file at 5T+4K");
    let mut buf = vec![0u8; 512];
    f.read_exact_at(&mut buf, 4 * GIB - 256).unwrap();
    assert!(buf.iter().all(|&b| b == b'B'), "backing file at 4G-256");
}

fn qemu_large(s: &Server, export: &str) {
    let uri = s.uri(export);
    let (_, trace) = s.qemu_io(
        &uri,
        &[
            "write -P 0x5a 5T 64k",
            "read -P 0x5a 5T 64k",
            "write -P 0x6b 4294963200 8k", // 4G - 4K, straddles 4G
            "read -P 0x6b 4294963200 8k",
            "aio_write -P 0x7c 2199023255552 1M", // 2T
            "aio_write -P 0x7d 6597069762560 4k", // 6T - 4K (end)
            "aio_flush",
            "aio_read -P 0x7c 2199023255552 1M",
            "aio_read -P 0x7d 6597069762560 4k",
            "aio_flush",
            "read -P 0 3T 1M",
            // 64-bit effect lengths are legal with extended headers.
            "write -z -u 1T 64M",
            "read -P 0 1T 1M",
            "discard 4T 16M",
            "read -P 0 4T 1M",
            "read -P 0 4398062239744 1M", // 4T + 16M - 1M
            "flush",
        ],
    );
    assert_extended_headers(&trace, "qemu-io on the 6 TiB export");
    let (_, trace) = s.qemu_io(
        &uri,
        &[
            "read -P 0x5a 5T 64k",
            "read -P 0x7c 2T 1M",
            "read -P 0x7d 6597069762560 4k",
            "read -P 0x6b 4294963200 8k",
        ],
    );
    assert_extended_headers(&trace, "qemu-io reconnect");
    let (out, _) = s.qemu_img(&["info", "--output=json", &uri]);
    let j = common::json::Json::parse(&out).unwrap();
    assert_eq!(j.get("virtual-size").as_u64(), SIZE, "{out}");
}

#[test]
fn six_tib_qemu_io_memory() {
    let s = server();
    qemu_large(&s, "mem");
}

#[test]
fn six_tib_qemu_io_file() {
    let s = server();
    qemu_large(&s, "file");
}
