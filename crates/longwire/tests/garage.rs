//! The S3 store on a real replicated object store: a three-node Garage
//! cluster on loopback, replication factor 3. One node is SIGKILLed while
//! a volume is served; the volume stays readable and writable (Garage
//! needs two of three nodes), from the running server and from a fresh one
//! with an empty cache, which can only read through the bucket.
//!
//! Garage ignores `If-None-Match: *` (it answers 200 to a create-only PUT
//! over an existing key), so longwire's probe finds no conditional writes
//! and falls back to the best-effort lease: the log and `longwire info`
//! say so, and a second server on the same volume is still refused.
//!
//! longwire talks to node 0 only (one endpoint), so the node killed is
//! another one; losing the endpoint itself needs a load balancer in front.

mod common;

use common::s3::{serve_fails, Garage};
use common::*;
use std::fs;
use std::time::Instant;

/// A 64 MiB volume of 256 KiB chunks through node 0, its cache in the
/// server's directory.
fn export(g: &Garage, name: &str) -> String {
    format!(
        "v={}",
        g.uri(
            0,
            name,
            "&size=64M&chunk_size=256K&cache={dir}/cache&lease_ttl=6s&timeout=20s"
        )
    )
}

fn qemu_io(s: &Server, cmds: &[&str]) {
    let uri = s.qemu_uri("v");
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(&uri);
    s.run("qemu-io", &args);
}

/// What the volume holds once the node is down and written to: 0x11 in
/// the first 3 MiB, partly overwritten by 0x33 with the node down.
const EXPECTED: [&str; 6] = [
    "read -P 0x11 0 1M",
    "read -P 0x33 1M 512K",
    "read -P 0x11 1572864 1572864",
    "read -P 0x22 20971000 300K", // unaligned, across chunk boundaries
    "read -P 0 10M 1M",           // never written
    "read -P 0x44 40M 1M",
];
const WRITTEN_AFTER_RESTART: &str = "read -P 0x55 60M 2M";

/// `longwire info URI` as `key -> value` rows.
fn info(uri: &str) -> Vec<(String, String)> {
    let out = run(&server_binary(), &["info", uri]);
    out.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once("  ")?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

fn row<'a>(rows: &'a [(String, String)], key: &str) -> &'a str {
    rows.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key:?} row in longwire info: {rows:?}"))
}

#[test]
fn volume_survives_a_killed_node_with_a_best_effort_lease() {
    let test_start = Instant::now();
    let mut g = Garage::start();
    eprintln!("garage: 3-node cluster ready in {:?}", g.startup);
    let exp = export(&g, "vm");
    let mut s = Server::start(&["--export", &exp, "--listen", "127.0.0.1:0"]);

    // The probe found that Garage ignores conditional writes.
    let logs = s.logs();
    assert!(
        logs.contains("ignores conditional writes") && logs.contains("best effort"),
        "{logs}"
    );
    let vol_uri = g.uri(0, "vm", "");
    let rows = info(&vol_uri);
    assert!(
        row(&rows, "lease mode").starts_with("best-effort"),
        "{rows:?}"
    );
    assert!(
        row(&rows, "lease").contains(&format!("pid {}", s.pid())),
        "{rows:?}"
    );

    // The weak lease still refuses a second server started later.
    let other = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let other_exp = exp.replace("{dir}", other.path().to_str().unwrap());
    let err = serve_fails(
        other.path(),
        &["--export", &other_exp, "--listen", "127.0.0.1:0"],
    );
    assert!(
        err.contains("in use by another server") && err.contains(&format!("pid {}", s.pid())),
        "{err}"
    );

    qemu_io(
        &s,
        &["write -P 0x11 0 3M", "write -P 0x22 20971000 300K", "flush"],
    );

    // One node dies; writes and flushes still reach a quorum.
    g.kill_node(1);
    qemu_io(
        &s,
        &["write -P 0x33 1M 512K", "write -P 0x44 40M 1M", "flush"],
    );
    qemu_io(&s, &EXPECTED);

    // A clean stop gives the lease back (even with a node down).
    s.terminate();
    assert!(s.logs().contains("lease released"), "{}", s.logs());
    let rows = info(&vol_uri);
    assert_eq!(row(&rows, "lease"), "free", "{rows:?}");

    // A fresh server with no cache reads everything through the two live
    // nodes, and takes the volume at once.
    fs::remove_dir_all(s.dir().join("cache")).unwrap();
    let started = Instant::now();
    s.start_again();
    eprintln!(
        "longwire: reopened with a node down in {:?}",
        started.elapsed()
    );
    qemu_io(&s, &EXPECTED);

    // The node comes back; the cluster keeps working, and with the other
    // node down instead it still serves everything (node 1 caught up, or
    // node 0 still holds it: either way, a quorum answers).
    g.start_node(1);
    qemu_io(&s, &["write -P 0x55 60M 2M", "flush"]);
    g.kill_node(2);
    s.terminate();
    fs::remove_dir_all(s.dir().join("cache")).unwrap();
    s.start_again();
    qemu_io(&s, &EXPECTED);
    qemu_io(&s, &[WRITTEN_AFTER_RESTART]);
    g.start_node(2);

    // Finally all three nodes, and a restart reads it all back once more.
    s.terminate();
    fs::remove_dir_all(s.dir().join("cache")).unwrap();
    s.start_again();
    qemu_io(&s, &EXPECTED);
    qemu_io(&s, &[WRITTEN_AFTER_RESTART]);
    // 256 KiB chunks: 0-11 (0x11, 0x33 inside), 79-81 (0x22), 160-163
    // (0x44), 240-247 (0x55); nothing else is stored.
    let rows = info(&vol_uri);
    assert_eq!(row(&rows, "chunks"), "27", "{rows:?}");
    s.terminate();
    eprintln!("garage test: {:?} in all", test_start.elapsed());
}
