//! Composite exports from the config file (`concat = [...]`, `stripe =
//! [...]`): served over NBD and iSCSI at once, data written across part
//! boundaries by one protocol is read back by the other, and the part files
//! end up holding exactly the bytes the layout says they should.

mod common;

use common::json::Json;
use common::*;

const CONFIG: &str = r#"
[[export]]
name = "big"
concat = ["file:c0.img?size=1M", "file:c1.img?size=3M"]
description = "two files end to end"

[[export]]
name = "fast"
stripe = ["file:s0.img?size=1M", "file:s1.img?size=1M", "file:s2.img?size=1M"]
stripe_size = "64K"

# One part read-only: the whole composite is (capabilities intersect).
[[export]]
name = "mixed"
concat = ["file:m0.img?size=1M", "file:m1.img?readonly=true"]
"#;

const STRIPE: u64 = 64 * KIB;

fn server() -> Server {
    Server::start_with_iscsi(
        &["--config", "{dir}/composite.toml", "--listen", "127.0.0.1:0", "--iscsi", "127.0.0.1:0"],
        Some(1),
        1,
        |dir| {
            std::fs::write(dir.join("composite.toml"), CONFIG).unwrap();
            std::fs::write(dir.join("m1.img"), vec![0u8; MIB as usize]).unwrap();
        },
    )
}

fn target(export: &str) -> String {
    format!("iqn.2026-11.dev.longwire:{export}")
}

/// What the volume should hold: apply `write -P PAT OFF LEN` to a model.
fn fill(model: &mut [u8], pat: u8, off: u64, len: u64) {
    model[off as usize..(off + len) as usize].fill(pat);
}

fn write_cmd(pat: u8, off: u64, len: u64) -> String {
    format!("write -P {pat:#x} {off} {len}")
}

fn read_cmd(pat: u8, off: u64, len: u64) -> String {
    format!("read -P {pat:#x} {off} {len}")
}

fn qemu_io(s: &Server, uri: &str, cmds: &[String]) {
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    s.qemu_io(uri, &cmds);
}

/// Compare a part file with the bytes expected in it; report the first
/// difference by offset rather than dumping megabytes.
fn assert_part(s: &Server, file: &str, expected: &[u8]) {
    let got = std::fs::read(s.dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert_eq!(got.len(), expected.len(), "{file}: size");
    if let Some(i) = got.iter().zip(expected).position(|(a, b)| a != b) {
        panic!("{file}: byte {i} is {:#x}, expected {:#x}", got[i], expected[i]);
    }
}

fn nbdinfo(s: &Server, export: &str) -> Json {
    require_tool("nbdinfo");
    let out = s.run("nbdinfo", &["--json", &s.uri(export)]);
    let j = Json::parse(&out).unwrap_or_else(|e| panic!("nbdinfo --json is not JSON ({e}):\n{out}"));
    let exports = j.get("exports").as_array();
    assert_eq!(exports.len(), 1, "{j:?}");
    exports[0].clone()
}

#[test]
fn concat_and_stripe_exports_over_nbd_and_iscsi() {
    let mut s = server();
    let logs = s.logs();
    assert!(logs.contains("concatenation of 2 parts"), "{logs}");
    assert!(logs.contains("stripe set of 3 parts, 64.0 KiB stripes"), "{logs}");

    // Advertised size and flags: the parts' intersection.
    for (export, size) in [("big", 4 * MIB), ("fast", 3 * MIB)] {
        let e = nbdinfo(&s, export);
        assert_eq!(e.get("export-size").as_u64(), size, "{export}: {e:?}");
        assert!(!e.get("is_read_only").as_bool(), "{export}: {e:?}");
        for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_multi_conn"] {
            assert!(e.get(flag).as_bool(), "{export}: {flag} in {e:?}");
        }
    }
    let e = nbdinfo(&s, "mixed");
    assert_eq!(e.get("export-size").as_u64(), 2 * MIB, "{e:?}");
    assert!(e.get("is_read_only").as_bool(), "a read-only part makes the composite read-only: {e:?}");
    for flag in ["can_trim", "can_zero", "can_fast_zero"] {
        assert!(!e.get(flag).as_bool(), "mixed: {flag} in {e:?}");
    }
    assert!(e.get("can_multi_conn").as_bool(), "mixed: can_multi_conn in {e:?}");
    let out = s.run("iscsi-readcapacity16", &[&s.iscsi_url(&target("big"), 0)]);
    assert!(out.contains(&format!("Total size:{}", 4 * MIB)), "{out}");

    // Concat: the only boundary is at 1 MiB.
    let big_nbd = s.uri("big");
    let big_iscsi = s.iscsi_url(&target("big"), 0);
    let mut big = vec![0u8; (4 * MIB) as usize];
    // NBD writes across the boundary and at the very end; iSCSI reads.
    let (a, b) = ((0x11, 960 * KIB, 128 * KIB), (0x33, 4 * MIB - 4 * KIB, 4 * KIB));
    qemu_io(&s, &big_nbd, &[write_cmd(a.0, a.1, a.2), write_cmd(b.0, b.1, b.2)]);
    fill(&mut big, a.0, a.1, a.2);
    fill(&mut big, b.0, b.1, b.2);
    qemu_io(&s, &big_iscsi, &[read_cmd(a.0, a.1, a.2), read_cmd(b.0, b.1, b.2), read_cmd(0, 0, 960 * KIB)]);
    // iSCSI overwrites the middle of that, again across the boundary; NBD reads.
    let c = (0x44, 1000 * KIB, 64 * KIB);
    qemu_io(&s, &big_iscsi, &[write_cmd(c.0, c.1, c.2)]);
    fill(&mut big, c.0, c.1, c.2);
    qemu_io(
        &s,
        &big_nbd,
        &[read_cmd(0x11, 960 * KIB, 40 * KIB), read_cmd(c.0, c.1, c.2), read_cmd(0x11, 1064 * KIB, 24 * KIB)],
    );

    // Stripe: 48 stripes of 64 KiB over 3 parts.
    let fast_nbd = s.uri("fast");
    let fast_iscsi = s.iscsi_url(&target("fast"), 0);
    let mut fast = vec![0u8; (3 * MIB) as usize];
    // Stripes 1..=6 (parts 1, 2, 0, 1, 2, 0), partial at both ends, and the last stripe.
    let (a, b) = ((0x5a, 100 * KIB, 300 * KIB), (0x77, 3 * MIB - STRIPE, STRIPE));
    qemu_io(&s, &fast_nbd, &[write_cmd(a.0, a.1, a.2), write_cmd(b.0, b.1, b.2)]);
    fill(&mut fast, a.0, a.1, a.2);
    fill(&mut fast, b.0, b.1, b.2);
    qemu_io(&s, &fast_iscsi, &[read_cmd(a.0, a.1, a.2), read_cmd(b.0, b.1, b.2), read_cmd(0, 0, 100 * KIB)]);
    // Stripes 16..=20 (parts 1, 2, 0, 1, 2), from the middle of stripe 16.
    let c = (0xa5, MIB + 32 * KIB, 256 * KIB);
    qemu_io(&s, &fast_iscsi, &[write_cmd(c.0, c.1, c.2)]);
    fill(&mut fast, c.0, c.1, c.2);
    qemu_io(&s, &fast_nbd, &[read_cmd(c.0, c.1, c.2), read_cmd(a.0, a.1, a.2), read_cmd(0, MIB, 32 * KIB)]);

    // The mixed export is read-only as a whole.
    let out = s.run_unchecked("qemu-io", &["-f", "raw", "-c", "write -P 0x1 0 4k", &s.uri("mixed")]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() || text.to_lowercase().contains("fail") || text.contains("read-only"), "{text}");

    s.terminate();

    // Concat: part 0 holds volume bytes [0, 1M), part 1 holds [1M, 4M).
    assert_part(&s, "c0.img", &big[..MIB as usize]);
    assert_part(&s, "c1.img", &big[MIB as usize..]);
    // Stripe k of the volume is at (k / 3) * 64K in part k % 3.
    let mut parts = vec![vec![0u8; MIB as usize]; 3];
    for (k, chunk) in fast.chunks(STRIPE as usize).enumerate() {
        let at = (k / 3) * STRIPE as usize;
        parts[k % 3][at..at + chunk.len()].copy_from_slice(chunk);
    }
    for (i, expected) in parts.iter().enumerate() {
        assert_part(&s, &format!("s{i}.img"), expected);
    }
    // Spot checks written out by hand, in case the model and the layout
    // agree on a mistake: volume byte 1M+32K is stripe 16 (part 1, 5th stripe).
    let s1 = std::fs::read(s.dir().join("s1.img")).unwrap();
    assert_eq!(s1[(5 * STRIPE + 32 * KIB) as usize], 0xa5);
    assert_eq!(s1[(5 * STRIPE + 32 * KIB - 1) as usize], 0);
    let s2 = std::fs::read(s.dir().join("s2.img")).unwrap();
    assert!(s2[(15 * STRIPE) as usize..].iter().all(|&b| b == 0x77), "stripe 47 is the last of part 2");
    let c1 = std::fs::read(s.dir().join("c1.img")).unwrap();
    assert_eq!(&c1[..40 * KIB as usize], &vec![0x44; 40 * KIB as usize][..]);
    assert_eq!(c1[(3 * MIB - 1) as usize], 0x33);
    let m1 = std::fs::read(s.dir().join("m1.img")).unwrap();
    assert!(m1.iter().all(|&b| b == 0), "the read-only part is untouched");
}

#[test]
fn composite_errors_name_the_export() {
    // Stripe parts of different sizes: refused at startup, naming the export.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[[export]]\nname = \"uneven\"\nstripe = [\"memory:?size=1M\", \"memory:?size=2M\"]\n",
    )
    .unwrap();
    let out = run_unchecked(
        command(&server_binary()).args(["serve", "--listen", "127.0.0.1:0", "--config"]).arg(&cfg),
        "longwire serve",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("export \"uneven\"") && err.contains("same size"), "{err}");
}
