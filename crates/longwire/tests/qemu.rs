//! qemu's NBD client (qemu-io, qemu-img 10.x) and nbdcopy against the real
//! server. qemu negotiates NBD_OPT_EXTENDED_HEADERS, so these tests exercise
//! the extended-header request/reply path (64-bit lengths, extended block
//! status); every test asserts that extended headers were in use.

mod common;

use common::json::Json;
use common::*;
use std::fs;

fn server() -> Server {
    Server::start(&[
        "--export",
        "mem=memory:?size=256M",
        "--export",
        "disk=file:{dir}/disk.img?size=64M",
        "--listen",
        "127.0.0.1:0",
        "--unix",
        "{dir}/nbd.sock",
    ])
}

fn io_patterns(s: &Server, uri: &str) {
    let (_, trace) = s.qemu_io(
        uri,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -f -P 0x12 1M 64k",
            "read -P 0x12 1M 64k",
            "aio_write -P 0xcd 2M 1M",
            "aio_write -P 0xef 3M 1M",
            "aio_write -P 0x5e 4M 4k",
            "aio_flush",
            "aio_read -P 0xcd 2M 1M",
            "aio_read -P 0xef 3M 1M",
            "aio_read -P 0x5e 4M 4k",
            "aio_flush",
            "read -P 0 8M 1M",
            // WRITE_ZEROES (qemu sets NO_HOLE unless -u), then with -u.
            "write -z 3M 512k",
            "read -P 0 3M 512k",
            "read -P 0xef 3670016 512k",
            "write -z -u 2M 512k",
            "read -P 0 2M 512k",
            "read -P 0xcd 2621440 512k",
            // TRIM
            "discard 0 512k",
            "read -P 0 0 512k",
            "read -P 0xab 512k 512k",
            // Byte-granular (minimum block size 1).
            "write -P 0x77 4097 3",
            "read -P 0x77 4097 3",
            "read -P 0 4100 1",
            "read -P 0 4096 1",
            // Larger than the maximum payload: qemu splits it.
            "write -P 0x99 16M 40M",
            "read -P 0x99 16M 40M",
            "flush",
        ],
    );
    assert_extended_headers(&trace, "qemu-io");
    assert!(
        trace.contains("nbd_opt_info_block_size Block sizes are 0x1, 0x1000, 0x2000000"),
        "qemu saw unexpected block sizes:\n{}",
        trace
            .lines()
            .filter(|l| l.contains("block_size"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // A new connection sees everything.
    let (_, trace) = s.qemu_io(
        uri,
        &[
            "read -P 0xab 512k 512k",
            "read -P 0x12 1M 64k",
            "read -P 0x5e 4M 4k",
            "read -P 0x77 4097 3",
            "read -P 0x99 16M 40M",
        ],
    );
    assert_extended_headers(&trace, "qemu-io (second connection)");
}

#[test]
fn qemu_io_patterns_memory_over_tcp() {
    let s = server();
    io_patterns(&s, &s.uri("mem"));
}

#[test]
fn qemu_io_patterns_file_over_unix_socket() {
    let s = server();
    io_patterns(&s, &s.unix_uri("disk"));
}

/// Self-check: a wrong pattern must be detected (so the checks above mean
/// something).
#[test]
fn qemu_io_detects_wrong_patterns() {
    let s = server();
    s.qemu_io(&s.uri("mem"), &["write -P 0xab 0 64k"]);
    require_tool("qemu-io");
    for cmd in ["read -P 0xac 0 64k", "aio_read -P 0xac 0 64k"] {
        let out = s.run_unchecked(
            "qemu-io",
            &["-f", "raw", "-c", cmd, "-c", "aio_flush", &s.uri("mem")],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success() || text.contains("Pattern verification failed"),
            "qemu-io `{cmd}` did not notice a wrong pattern: {out:?}"
        );
    }
}

#[test]
fn qemu_img_map_reports_exact_allocation() {
    let s = server();
    let uri = s.uri("disk");
    s.qemu_io(
        &uri,
        &[
            "write -P 1 1M 1M",
            "write -P 2 8M 64k",
            "write -P 3 63M 1M",
            "flush",
        ],
    );
    let (out, trace) = s.qemu_img(&["map", "--output=json", "-f", "raw", &uri]);
    assert_extended_headers(&trace, "qemu-img map");
    let j = Json::parse(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let mut data = Vec::new();
    let mut pos = 0;
    for e in j.as_array() {
        let start = e.get("start").as_u64();
        let len = e.get("length").as_u64();
        assert_eq!(start, pos, "map must be contiguous: {out}");
        pos += len;
        let is_data = e.get("data").as_bool();
        assert_eq!(
            is_data,
            !e.get("zero").as_bool(),
            "data xor zero expected in {e:?}"
        );
        if is_data {
            data.push((start, len));
        }
    }
    assert_eq!(pos, 64 * MIB, "map must cover the export: {out}");
    assert_eq!(
        data,
        vec![(MIB, MIB), (8 * MIB, 64 * KIB), (63 * MIB, MIB)],
        "data extents seen by qemu-img map:\n{out}"
    );
}

#[test]
fn qemu_img_convert_in_and_out_then_compare() {
    let s = server();
    let local = s.dir().join("local.img");
    let out_img = s.dir().join("out.img");
    make_source_image(&s, &local);
    let uri = s.uri("disk");

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

    let (stdout, trace) = s.qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        local.to_str().unwrap(),
        &uri,
    ]);
    assert!(stdout.contains("Images are identical"), "{stdout}");
    assert_extended_headers(&trace, "qemu-img compare");
    let (stdout, _) = s.qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &uri,
        local.to_str().unwrap(),
    ]);
    assert!(stdout.contains("Images are identical"), "{stdout}");

    let (_, trace) = s.qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &uri,
        out_img.to_str().unwrap(),
    ]);
    assert_extended_headers(&trace, "qemu-img convert (out of the export)");
    let (stdout, _) = s.qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        local.to_str().unwrap(),
        out_img.to_str().unwrap(),
    ]);
    assert!(stdout.contains("Images are identical"), "{stdout}");
    assert_eq!(
        sha256_file(&local),
        sha256_file(&out_img),
        "sha256 of source and round-tripped image"
    );

    // The file store holds exactly the converted bytes.
    assert_eq!(
        sha256_file(&local),
        sha256_file(&s.dir().join("disk.img")),
        "sha256 of the export's backing file"
    );

    // Self-check: compare notices a one-byte difference made through NBD.
    s.qemu_io(&uri, &["write -P 0x55 40M 1"]);
    let out = s.qemu_img_unchecked(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        local.to_str().unwrap(),
        &uri,
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu-img compare must report a difference: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Content mismatch at offset 41943040"),
        "{out:?}"
    );
}

#[test]
fn qemu_img_info_sees_virtual_size() {
    let s = server();
    let (out, trace) = s.qemu_img(&["info", "--output=json", &s.uri("mem")]);
    let j = Json::parse(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(j.get("virtual-size").as_u64(), 256 * MIB, "{out}");
    assert_extended_headers(&trace, "qemu-img info");
}

#[test]
fn nbdcopy_in_and_out_with_checksums() {
    let s = server();
    require_tool("nbdcopy");
    // 64 MiB source: random data with zero regions.
    let src = s.dir().join("src.bin");
    let mut data = pattern(7, 64 * MIB as usize);
    data[10 * MIB as usize..20 * MIB as usize].fill(0);
    data[40 * MIB as usize..40 * MIB as usize + 4096].fill(0);
    data[60 * MIB as usize..].fill(0);
    fs::write(&src, &data).unwrap();
    let want = sha256_file(&src);

    // A 64 MiB slice of the memory export is not possible with nbdcopy, so
    // use an exactly-sized memory export too.
    let s2 = Server::start(&[
        "--export",
        "m64=memory:?size=64M",
        "--listen",
        "127.0.0.1:0",
    ]);
    let mem = s2.uri("m64");
    let disk = s.unix_uri("disk");

    // file -> memory export (multi-conn), memory -> file export (NBD to NBD),
    // file export -> local file.
    s2.run(
        "nbdcopy",
        &["--flush", "-C", "4", src.to_str().unwrap(), &mem],
    );
    s.run("nbdcopy", &["--flush", &mem, &disk]);
    let out1 = s.dir().join("out1.bin");
    let out2 = s.dir().join("out2.bin");
    s.run("nbdcopy", &[&disk, out1.to_str().unwrap()]);
    s2.run("nbdcopy", &["--synchronous", &mem, out2.to_str().unwrap()]);
    assert_eq!(
        sha256_file(&out1),
        want,
        "sha256 after src -> mem -> disk -> out1"
    );
    assert_eq!(sha256_file(&out2), want, "sha256 after src -> mem -> out2");
    assert_eq!(
        sha256_file(&s.dir().join("disk.img")),
        want,
        "sha256 of the file export's backing file"
    );

    // Piped through stdin/stdout as well.
    let piped = s.dir().join("piped.bin");
    s.run(
        "sh",
        &[
            "-c",
            &format!(
                "nbdcopy -- {mem:?} - | nbdcopy -- - {disk:?} && nbdcopy -- {disk:?} - > {}",
                piped.display()
            ),
        ],
    );
    assert_eq!(
        sha256_file(&piped),
        want,
        "sha256 after piping through nbdcopy"
    );
}
