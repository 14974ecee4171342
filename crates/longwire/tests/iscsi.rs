//! iSCSI against the real server with initiators nobody here wrote:
//! libiscsi's tools (`iscsi-ls`, `iscsi-inq`, `iscsi-readcapacity16`, and
//! the `iscsi-test-cu` conformance suite) and qemu's iscsi:// block driver;
//! plus the crate's own byte-level initiator for what those cannot do (data
//! digests). Data written over iSCSI is read back over NBD and vice versa.

mod common;

use common::*;
use longwire_iscsi::initiator::{Initiator, LoginOptions};
use std::time::{Duration, Instant};

const DISK: &str = "iqn.2026-11.dev.longwire:disk";
const MEM: &str = "iqn.2026-11.dev.longwire:mem";

fn server() -> Server {
    Server::start(&[
        "--export",
        "disk=file:{dir}/disk.img?size=64M",
        "--export",
        "mem=memory:?size=128M",
        "--export",
        "ro=memory:?size=1M&readonly=true",
        "--listen",
        "127.0.0.1:0",
        "--iscsi",
        "127.0.0.1:0",
    ])
}

/// Run a libiscsi tool against the server; assert success; return stdout.
fn libiscsi(s: &Server, tool: &str, args: &[&str]) -> String {
    s.run(tool, args)
}

#[test]
fn iscsi_ls_discovers_every_export_with_its_luns() {
    let s = server();
    let portal = s.iscsi_addr();
    let out = libiscsi(&s, "iscsi-ls", &[&format!("iscsi://{portal}")]);
    for t in [DISK, MEM, "iqn.2026-11.dev.longwire:ro"] {
        assert!(out.contains(&format!("Target:{t} Portal:{portal},1")), "{t} missing from:\n{out}");
    }
    let out = libiscsi(&s, "iscsi-ls", &["-s", &format!("iscsi://{portal}")]);
    assert_eq!(out.matches("Lun:0").count(), 3, "{out}");
    assert!(out.contains("Type:DIRECT_ACCESS"), "{out}");
    assert!(out.contains("Size:63M") || out.contains("Size:64M"), "{out}");
}

#[test]
fn inquiry_and_read_capacity() {
    let s = server();
    let out = libiscsi(&s, "iscsi-inq", &[&s.iscsi_url(DISK, 0)]);
    assert!(out.contains("Peripheral Device Type:DIRECT_ACCESS"), "{out}");
    assert!(out.contains("Vendor:LONGWIRE"), "{out}");
    let out = libiscsi(&s, "iscsi-readcapacity16", &[&s.iscsi_url(MEM, 0)]);
    assert!(out.contains(&format!("Total size:{}", 128 * MIB)), "{out}");
    let out = libiscsi(&s, "iscsi-readcapacity16", &[&s.iscsi_url(DISK, 0)]);
    assert!(out.contains(&format!("Total size:{}", 64 * MIB)), "{out}");
}

#[test]
fn qemu_io_patterns_over_iscsi() {
    let s = server();
    for target in [DISK, MEM] {
        s.qemu_io(
            &s.iscsi_url(target, 0),
            &[
                "write -P 0xab 0 1M",
                "read -P 0xab 0 1M",
                "aio_write -P 0xcd 2M 1M",
                "aio_write -P 0xef 3M 3M",
                "aio_write -P 0x5e 7M 4k",
                "aio_flush",
                "aio_read -P 0xcd 2M 1M",
                "aio_read -P 0xef 3M 3M",
                "aio_read -P 0x5e 7M 4k",
                "aio_flush",
                "write -f -P 0x12 8M 64k",
                "read -P 0x12 8M 64k",
                "read -P 0 16M 1M",
                "write -P 0x99 20M 20M",
                "read -P 0x99 20M 20M",
                "flush",
            ],
        );
    }
}

#[test]
fn qemu_img_convert_in_and_out_and_compare() {
    let s = server();
    let src = s.dir().join("src.raw");
    let data = pattern(7, (24 * MIB) as usize);
    std::fs::write(&src, &data).unwrap();
    let url = s.iscsi_url(DISK, 0);
    s.qemu_img(&["convert", "-n", "-f", "raw", "-O", "raw", src.to_str().unwrap(), &url]);
    let out = s.dir().join("out.raw");
    s.qemu_img(&["convert", "-f", "raw", "-O", "raw", &url, out.to_str().unwrap()]);
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len() as u64, 64 * MIB);
    assert!(got[..data.len()] == data[..], "image copied out over iSCSI matches");
    assert!(got[data.len()..].iter().all(|&b| b == 0));
    // compare exits 0 when the contents match (sizes differ: -s not given).
    let cmp = s.qemu_img_unchecked(&["compare", "-f", "raw", "-F", "raw", out.to_str().unwrap(), &url]);
    assert!(cmp.status.success(), "qemu-img compare: {cmp:?}");
    // And the backing file holds the same bytes.
    let file = std::fs::read(s.dir().join("disk.img")).unwrap();
    assert!(file[..data.len()] == data[..]);
}

#[test]
fn data_written_over_iscsi_is_read_over_nbd_and_back() {
    let s = server();
    s.qemu_io(&s.iscsi_url(MEM, 0), &["write -P 0x3c 1M 2M"]);
    s.qemu_io(&s.uri("mem"), &["read -P 0x3c 1M 2M", "write -P 0x7e 5M 1M"]);
    s.qemu_io(&s.iscsi_url(MEM, 0), &["read -P 0x7e 5M 1M", "read -P 0x3c 1M 2M"]);
}

#[test]
fn read_only_exports_are_write_protected_luns() {
    let s = server();
    let target = "iqn.2026-11.dev.longwire:ro";
    let url = s.iscsi_url(target, 0);
    let out = s.run("qemu-io", &["-r", "-f", "raw", "-c", "read -P 0 0 64k", &url]);
    assert!(!out.to_lowercase().contains("fail"), "{out}");
    // qemu sees the write protection (MODE SENSE WP) and will not open it
    // read-write.
    let out = s.run_unchecked("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &url]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("write protected"), "{out:?}");
    // A WRITE(10) anyway: CHECK CONDITION, DATA PROTECT.
    let mut i = Initiator::connect(s.iscsi_addr()).unwrap();
    i.login(&LoginOptions::normal("iqn.2026-11.dev.longwire.test:ro", target)).unwrap();
    let r = i.command(0, &write10(0, 1), 0, &[1u8; 512]).unwrap();
    assert_eq!(r.status, 2, "{r:?}");
    assert_eq!(r.sense[2] & 0x0f, 0x07, "DATA PROTECT: {r:?}");
}

#[test]
fn header_digest_with_qemu() {
    let s = server();
    let opts = format!(
        "driver=iscsi,transport=tcp,portal={},target={DISK},lun=0,header-digest=crc32c",
        s.iscsi_addr()
    );
    let out = s.run(
        "qemu-io",
        &["-c", "write -P 0x42 0 256k", "-c", "read -P 0x42 0 256k", "--image-opts", &opts],
    );
    assert!(!out.to_lowercase().contains("fail"), "{out}");
    assert!(
        s.stderr_lines().iter().any(|l| l.contains("iSCSI session started") && l.contains("header_digest=true")),
        "the session should have negotiated HeaderDigest=CRC32C\n{}",
        s.logs()
    );
}

fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn write10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    c
}

#[test]
fn header_and_data_digests_with_a_byte_level_initiator() {
    let s = server();
    let mut i = Initiator::connect(s.iscsi_addr()).unwrap();
    i.login(
        &LoginOptions::normal("iqn.2026-11.dev.longwire.test:digests", MEM)
            .key("HeaderDigest", "CRC32C")
            .key("DataDigest", "CRC32C")
            .key("InitialR2T", "Yes")
            .key("MaxBurstLength", "65536"),
    )
    .unwrap();
    assert!(i.digests.header && i.digests.data);
    let data = pattern(3, 512 * 1000);
    let w = i.command(0, &write10(100, 1000), 0, &data).unwrap();
    assert_eq!(w.status, 0, "WRITE(10): {w:?}");
    assert!(w.r2ts >= 7, "the write was solicited with R2Ts");
    let r = i.command(0, &read10(100, 1000), data.len() as u32, &[]).unwrap();
    assert_eq!(r.status, 0);
    assert!(r.data == data, "read back over digested PDUs");
    assert_eq!(i.logout().unwrap().response, 0);
    // The same bytes over NBD.
    s.qemu_io(&s.uri("mem"), &[&format!("read -P 0 0 {}", 512 * 100)]);
    let h = s.python(&format!(
        "h = connect('mem')\nbuf = h.pread({}, {})\nimport hashlib\nprint(hashlib.sha256(buf).hexdigest())\n",
        data.len(),
        512 * 100
    ));
    assert!(h.contains(&sha256_hex(&data)), "{h}");
}

fn sha256_hex(data: &[u8]) -> String {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let p = dir.path().join("d");
    std::fs::write(&p, data).unwrap();
    sha256_file(&p)
}

fn chap_server() -> Server {
    Server::start_with_iscsi(&["--config", "{dir}/longwire.toml"], Some(1), 1, |dir| {
        std::fs::write(
            dir.join("longwire.toml"),
            r#"
listen = ["127.0.0.1:0"]
iscsi = ["127.0.0.1:0"]

[[export]]
name = "a"
uri = "memory:?size=16M"
[[export]]
name = "b"
uri = "memory:?size=8M"
[[export]]
name = "open"
uri = "memory:?size=4M"

[[iscsi_target]]
name = "iqn.2026-11.dev.longwire:secure"
luns = ["a", "b"]
chap_user = "alice"
chap_secret = "correct-horse-battery"
mutual_user = "longwire"
mutual_secret = "staple-target-secret"

[[iscsi_target]]
name = "iqn.2026-11.dev.longwire:only-one"
luns = ["open"]
allow_initiators = ["iqn.2026-11.dev.longwire.test:allowed"]
"#,
        )
        .unwrap();
    })
}

#[test]
fn chap_right_and_wrong_secrets() {
    let s = chap_server();
    let portal = s.iscsi_addr();
    let secure = "iqn.2026-11.dev.longwire:secure";
    let ok = libiscsi(&s, "iscsi-inq", &[&format!("iscsi://alice%correct-horse-battery@{portal}/{secure}/1")]);
    assert!(ok.contains("DIRECT_ACCESS"), "{ok}");
    for bad in [
        format!("iscsi://alice%wrong-secret@{portal}/{secure}/0"),
        format!("iscsi://mallory%correct-horse-battery@{portal}/{secure}/0"),
        format!("iscsi://{portal}/{secure}/0"),
    ] {
        let out = s.run_unchecked("iscsi-inq", &[&bad]);
        assert!(!out.status.success(), "{bad} must be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Authentication failure") || err.contains("Login Failed") || err.contains("failed"), "{err}");
    }
    // Mutual CHAP: libiscsi checks the target's answer.
    let mut cmd = command("iscsi-inq");
    cmd.env("LIBISCSI_CHAP_TARGET_USERNAME", "longwire")
        .env("LIBISCSI_CHAP_TARGET_PASSWORD", "staple-target-secret")
        .arg(format!("iscsi://alice%correct-horse-battery@{portal}/{secure}/0"));
    let out = run_unchecked(&mut cmd, &s.logs());
    assert!(out.status.success(), "mutual CHAP: {out:?}");
    let mut cmd = command("iscsi-inq");
    cmd.env("LIBISCSI_CHAP_TARGET_USERNAME", "longwire")
        .env("LIBISCSI_CHAP_TARGET_PASSWORD", "not-the-target-secret")
        .arg(format!("iscsi://alice%correct-horse-battery@{portal}/{secure}/0"));
    let out = run_unchecked(&mut cmd, &s.logs());
    assert!(!out.status.success(), "a target that cannot prove itself is refused by libiscsi");
    // Grouped exports are LUNs 0 and 1 of one target.
    let out = libiscsi(&s, "iscsi-ls", &["-s", &format!("iscsi://alice%correct-horse-battery@{portal}")]);
    assert!(out.contains(secure) && out.contains("Lun:1"), "{out}");
}

#[test]
fn initiator_allow_list() {
    let s = chap_server();
    let url = s.iscsi_url("iqn.2026-11.dev.longwire:only-one", 0);
    let ok = libiscsi(&s, "iscsi-inq", &["-i", "iqn.2026-11.dev.longwire.test:allowed", &url]);
    assert!(ok.contains("DIRECT_ACCESS"));
    let out = s.run_unchecked("iscsi-inq", &["-i", "iqn.2026-11.dev.longwire.test:someone-else", &url]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Authorization failure"), "{out:?}");
    // Discovery hides targets the initiator may not use.
    let out = libiscsi(&s, "iscsi-ls", &["-i", "iqn.2026-11.dev.longwire.test:someone-else", &format!("iscsi://{}", s.iscsi_addr())]);
    assert!(!out.contains("only-one"), "{out}");
    let out = libiscsi(&s, "iscsi-ls", &["-i", "iqn.2026-11.dev.longwire.test:allowed", &format!("iscsi://{}", s.iscsi_addr())]);
    assert!(out.contains("only-one"), "{out}");
}

#[test]
fn sigterm_with_sessions_open_exits_cleanly() {
    let mut s = server();
    let mut i = Initiator::connect(s.iscsi_addr()).unwrap();
    i.login(&LoginOptions::normal("iqn.2026-11.dev.longwire.test:stay", MEM)).unwrap();
    let t0 = Instant::now();
    s.terminate();
    assert!(t0.elapsed() < Duration::from_secs(5), "shutdown took {:?}", t0.elapsed());
    assert!(i.closed_within(Duration::from_secs(2)));
}

#[test]
fn no_listener_flags_serve_iscsi_on_3260_too() {
    // Uses the fixed ports 10809 (NBD, must be free) and 3260 (iSCSI: when
    // another process holds it, the server must say so and carry on).
    if std::net::TcpListener::bind("127.0.0.1:10809").is_err() {
        panic!("port 127.0.0.1:10809 is in use by another process; this test needs it free");
    }
    let s = Server::start(&["--export", "d=memory:?size=1M"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let outcome = loop {
        let lines = s.stderr_lines();
        if let Some(l) = lines.iter().find(|l| l.contains("iSCSI listening on 127.0.0.1:3260")) {
            break l.clone();
        }
        if let Some(l) = lines.iter().find(|l| l.contains("not serving iSCSI: cannot listen on the default address 127.0.0.1:3260")) {
            break l.clone();
        }
        assert!(Instant::now() < deadline, "no word about the default iSCSI listener\n{}", s.logs());
        std::thread::sleep(Duration::from_millis(20));
    };
    if outcome.contains("iSCSI listening") {
        let out = libiscsi(&s, "iscsi-ls", &["iscsi://127.0.0.1:3260"]);
        assert!(out.contains("iqn.2026-11.dev.longwire:d"), "{out}");
    } else {
        eprintln!("127.0.0.1:3260 is taken by another process; checked the warning instead: {outcome}");
    }
    let size = s.run("nbdinfo", &["--size", "nbd://127.0.0.1:10809/d"]);
    assert_eq!(size.trim(), MIB.to_string(), "NBD's default listener is up either way");
    drop(s);
    // --no-iscsi, and any explicit listener, turn the iSCSI default off.
    for args in [&["--export", "d=memory:?size=1M", "--listen", "127.0.0.1:0"][..], &["--export", "d=memory:?size=1M", "--no-iscsi", "--listen", "127.0.0.1:0"]] {
        let s = Server::start(args);
        assert!(s.iscsi_addrs().is_empty());
        std::thread::sleep(Duration::from_millis(200));
        assert!(!s.stderr_lines().iter().any(|l| l.contains("iSCSI")), "{}", s.logs());
    }
    // --iscsi alone opens no NBD listener.
    let s = Server::start(&["--export", "d=memory:?size=1M", "--iscsi", "127.0.0.1:0"]);
    assert!(s.listeners().is_empty(), "{}", s.logs());
    assert_eq!(s.iscsi_addrs().len(), 1);
}

// ---------------------------------------------------------------------------
// libiscsi's conformance suite
// ---------------------------------------------------------------------------

/// One `iscsi-test-cu` run: the summary counts and what was skipped.
#[derive(Debug, Default)]
struct CuSummary {
    tests_run: u64,
    tests_failed: u64,
    asserts_failed: u64,
    suites_failed: u64,
    failures: Vec<String>,
    skipped: Vec<String>,
}

fn parse_cu(out: &str) -> CuSummary {
    let mut s = CuSummary::default();
    let mut current = String::new();
    for line in out.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("Test: ") {
            current = rest.split(" ...").next().unwrap_or("").to_string();
        }
        if let Some(i) = line.find("[SKIPPED]") {
            let entry = format!("{current}: {}", line[i..].trim());
            if s.skipped.last() != Some(&entry) {
                s.skipped.push(entry);
            }
        }
        if t.ends_with("FAILED") || t.contains("...FAILED") {
            s.failures.push(current.clone());
        }
        let cols: Vec<&str> = t.split_whitespace().collect();
        // "tests     15     15     15      0        0" (Total Ran Passed Failed Inactive)
        match cols.first() {
            Some(&"suites") if cols.len() >= 5 => s.suites_failed = cols[4].parse().unwrap_or(u64::MAX),
            Some(&"tests") if cols.len() >= 5 => {
                s.tests_run = cols[2].parse().unwrap_or(0);
                s.tests_failed = cols[4].parse().unwrap_or(u64::MAX);
            }
            Some(&"asserts") if cols.len() >= 5 => s.asserts_failed = cols[4].parse().unwrap_or(u64::MAX),
            _ => {}
        }
    }
    s
}

/// `iscsi-test-cu --dataloss --allow-sanitize --test SUITES URL URL`: the
/// URL twice so the MultipathIO tests run over two sessions too.
fn conformance(target: &str, initiator_suffix: &str, suites: &str) {
    let s = server();
    require_tool("iscsi-test-cu");
    let url = s.iscsi_url(target, 0);
    let mut cmd = command("iscsi-test-cu");
    cmd.args([
        "--dataloss",
        "--allow-sanitize",
        "--initiator-name",
        &format!("iqn.2026-11.dev.longwire.test:cu-{initiator_suffix}-1"),
        "--initiator-name-2",
        &format!("iqn.2026-11.dev.longwire.test:cu-{initiator_suffix}-2"),
        "--test",
        suites,
        &url,
        &url,
    ]);
    let t0 = Instant::now();
    let (out, timed_out) = output_with_timeout(&mut cmd, Duration::from_secs(600));
    let took = t0.elapsed();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let summary = parse_cu(&text);
    let summary_lines: Vec<&str> =
        text.lines().filter(|l| l.contains("Run Summary") || l.trim_start().starts_with("suites") || l.trim_start().starts_with("tests ") || l.trim_start().starts_with("asserts")).collect();
    eprintln!("iscsi-test-cu {suites} on {target}: {took:?}\n{}", summary_lines.join("\n"));
    for sk in &summary.skipped {
        eprintln!("  skipped: {sk}");
    }
    let log = s.dir().join(format!("iscsi-test-cu-{initiator_suffix}.log"));
    std::fs::write(&log, &text).unwrap();
    assert!(!timed_out, "iscsi-test-cu timed out after {took:?}");
    let want = if suites == "ALL" { 200 } else { 1 };
    assert!(summary.tests_run >= want, "iscsi-test-cu ran only {} tests:\n{text}", summary.tests_run);
    assert!(
        summary.tests_failed == 0 && summary.asserts_failed == 0 && summary.suites_failed == 0,
        "iscsi-test-cu failures on {target}: {:?}\n{summary:?}\n--- output ---\n{text}\n{}",
        summary.failures,
        s.logs()
    );
}

#[test]
fn iscsi_test_cu_all_on_a_file_lun() {
    conformance(DISK, "file", "ALL");
}

#[test]
fn iscsi_test_cu_all_on_a_memory_lun() {
    conformance(MEM, "mem", "ALL");
}

#[test]
fn iscsi_test_cu_read_only_suite_on_a_write_protected_lun() {
    conformance("iqn.2026-11.dev.longwire:ro", "ro", "ALL.ReadOnly");
}

#[test]
fn cu_summary_parsing() {
    let out = "  Test: Simple ...passed\n  Test: Foo ...    [SKIPPED] READ12 is not implemented.\nFAILED\n\
        Run Summary:    Type  Total    Ran Passed Failed Inactive\n              suites      4      4    n/a      0        0\n\
                       tests     15     15     14      1        0\n             asserts    181    181    180      1      n/a\n";
    let s = parse_cu(out);
    assert_eq!((s.tests_run, s.tests_failed, s.asserts_failed, s.suites_failed), (15, 1, 1, 0));
    assert_eq!(s.skipped, vec!["Foo: [SKIPPED] READ12 is not implemented."]);
}
