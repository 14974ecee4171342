//! fio's NBD engine (libnbd) against the real server: verified random
//! writes at a high queue depth, several jobs (= several connections)
//! writing disjoint ranges, and trims interleaved with writes.

mod common;

use common::*;

fn server() -> Server {
    Server::start(&[
        "--export",
        "mem=memory:?size=256M",
        "--export",
        "file=file:{dir}/fio.img?size=256M",
        "--unix",
        "{dir}/nbd.sock",
    ])
}

/// Run fio with `args` (+ the NBD engine and URI); assert success and that
/// no job reported an error.
fn fio(s: &Server, export: &str, args: &[&str]) -> String {
    require_tool("fio");
    let uri = format!("--uri={}", s.unix_uri(export));
    let mut a = vec![
        "--ioengine=nbd",
        uri.as_str(),
        "--output-format=normal",
        "--verify_state_save=0",
    ];
    a.extend_from_slice(args);
    let out = s.run("fio", &a);
    for l in out.lines().filter(|l| l.contains("err=")) {
        assert!(
            l.contains("err= 0"),
            "fio job reported an error: {l}\n{out}\n{}",
            s.logs()
        );
    }
    assert!(
        out.contains("err= 0"),
        "no fio job summary in output:\n{out}"
    );
    out
}

fn verified_random_writes(export: &str) {
    let s = server();
    fio(
        &s,
        export,
        &[
            "--name=randwrite-verify",
            "--rw=randwrite",
            "--bs=4k",
            "--size=64M",
            "--iodepth=64",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
        ],
    );
    fio(
        &s,
        export,
        &[
            "--name=mixed-sizes-verify",
            "--rw=randwrite",
            "--bsrange=512-256k",
            "--offset=64M",
            "--size=64M",
            "--iodepth=16",
            "--verify=sha256",
            "--verify_fatal=1",
        ],
    );
}

#[test]
fn fio_random_writes_verified_memory() {
    verified_random_writes("mem");
}

#[test]
fn fio_random_writes_verified_file() {
    verified_random_writes("file");
}

#[test]
fn fio_parallel_connections_verified() {
    let s = server();
    // numjobs=4: four processes, four NBD connections, disjoint ranges.
    for export in ["mem", "file"] {
        fio(
            &s,
            export,
            &[
                "--name=parallel",
                "--rw=write",
                "--bs=1M",
                "--size=32M",
                "--numjobs=4",
                "--offset_increment=32M",
                "--iodepth=8",
                "--verify=sha256",
                "--verify_fatal=1",
            ],
        );
    }
}

#[test]
fn fio_trims_interleaved_with_verified_writes() {
    let s = server();
    // iodepth=1: fio does not order a block's trim before its write when both
    // are in flight (NBD allows either order), so keep them sequential.
    for export in ["mem", "file"] {
        fio(
            &s,
            export,
            &[
                "--name=trimwrite",
                "--rw=randtrimwrite",
                "--bs=64k",
                "--size=32M",
                "--iodepth=1",
                "--verify=crc32c",
                "--verify_fatal=1",
            ],
        );
        fio(
            &s,
            export,
            &[
                "--name=randtrim",
                "--rw=randtrim",
                "--bs=64k",
                "--size=64M",
                "--iodepth=32",
            ],
        );
    }
}
