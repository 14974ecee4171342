//! Clone / live migration: an export created with `?clone-from=` over a
//! sparse 10 GiB source with scattered data, served at once, its source
//! connection stalled and cut through a fault proxy, the target killed and
//! restarted half-way; the final image must equal the source plus the
//! writes made on the target, and only about the source's allocated bytes
//! may cross the wire. `longwire migrate` from nbdkit likewise.

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use longwire_torture::fault_proxy::{FaultProxy, Faults};

const SIZE: u64 = 10 * GIB;

/// Scattered data: 48 pieces of 4 KiB to 2 MiB, and one in the last MiB.
fn pieces() -> Vec<(u64, usize)> {
    let mut out = Vec::new();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for _ in 0..48 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (SIZE - 4 * GIB)) / 4096 * 4096;
        let len = [4 * KIB, 64 * KIB, MIB, 2 * MIB][(x >> 60) as usize % 4] as usize;
        out.push((off, len));
    }
    out.push((SIZE - 64 * KIB, 64 * KIB as usize));
    out
}

fn make_source(path: &Path) {
    let f = fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    for (i, (off, len)) in pieces().into_iter().enumerate() {
        f.write_all_at(&pattern(700 + i as u64, len), off).unwrap();
    }
    f.sync_all().unwrap();
}

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

fn qemu_io(uri: &str, cmd: &str) -> std::process::Output {
    require_tool("qemu-io");
    let (out, timed_out) = output_with_timeout(
        command("qemu-io").args(["-f", "raw", "-c", cmd, uri]),
        Duration::from_secs(60),
    );
    assert!(!timed_out, "qemu-io {cmd:?} on {uri} hung");
    out
}

fn qemu_io_ok(uri: &str, cmd: &str, server: &Server) {
    let out = qemu_io(uri, cmd);
    let err = String::from_utf8_lossy(&out.stderr);
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !so.contains("failed") && !err.contains("failed"),
        "qemu-io {cmd:?}: {so}{err}\n{}",
        server.logs()
    );
}

/// Wait for the clone's completion line; returns its `fetched=` value
/// (0 when hydration had already finished before the last restart).
fn wait_complete(s: &Server, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let lines = s.stderr_lines();
        // Finished before a restart: the new process says so and fetches nothing.
        if lines
            .iter()
            .any(|l| l.contains("is complete; the source is not contacted"))
        {
            return 0;
        }
        if let Some(line) = lines
            .iter()
            .find(|l| l.contains("clone hydration complete"))
        {
            let at = line
                .find("fetched=")
                .expect("fetched= in the completion line")
                + 8;
            return line[at..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "hydration did not complete within {timeout:?}:\n{}",
            s.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn clone_serves_at_once_survives_cuts_and_a_restart_and_copies_only_data() {
    let mut source = Server::start_prepared(
        &[
            "--export",
            "disk=file:{dir}/src.img",
            "--listen",
            "127.0.0.1:0",
        ],
        |d| make_source(&d.join("src.img")),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let proxy = rt
        .block_on(FaultProxy::start(source.tcp_addr(), Faults::none()))
        .unwrap();
    let src_uri = format!("nbd://{}/disk", proxy.addr());
    let export = format!("disk=file:{{dir}}/dst.img?clone-from={src_uri}&clone-timeout=2");
    let mut target = Server::start(&["--export", &export, "--listen", "127.0.0.1:0"]);
    // Stall the source at once: hydration has barely begun.
    proxy.set_paused(true);
    let t_uri = target.qemu_uri("disk");

    // Served at once: a whole-region write needs nothing from the source.
    qemu_io_ok(&t_uri, "write -P 0x11 5G 1M", &target);
    qemu_io_ok(&t_uri, "read -P 0x11 5G 1M", &target);
    // A region not copied yet fails with EIO after the bounded wait (2 s),
    // rather than hanging.
    let started = Instant::now();
    let out = qemu_io(&t_uri, &format!("read {} 4096", SIZE - 64 * KIB));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Input/output error"), "expected EIO: {text}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );

    // The source comes back; cut every connection repeatedly while the
    // copy runs, and write into a region that holds source data.
    proxy.set_paused(false);
    let (data_off, _) = pieces()[3];
    qemu_io_ok(
        &t_uri,
        &format!("write -P 0x22 {} 3000", data_off + 100),
        &target,
    );
    for _ in 0..5 {
        proxy.cut_all();
        std::thread::sleep(Duration::from_millis(100));
    }
    // Crash the target half-way and start it again: it resumes.
    target.kill();
    target.start_again();
    proxy.cut_all();
    let fetched_after_restart = wait_complete(&target, Duration::from_secs(120));
    let t_uri = target.qemu_uri("disk");
    qemu_io_ok(&t_uri, "read -P 0x11 5G 1M", &target);
    let dir = target.dir().to_path_buf();
    target.terminate();

    // Expected: the source image plus the two writes.
    let expected = dir.join("expected.img");
    run(
        "cp",
        &[
            "--sparse=always",
            source.dir().join("src.img").to_str().unwrap(),
            expected.to_str().unwrap(),
        ],
    );
    let e = expected.to_str().unwrap();
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x11 5G 1M", e]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -P 0x22 {} 3000", data_off + 100),
            e,
        ],
    );
    let dst = dir.join("dst.img");
    source.qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        e,
        dst.to_str().unwrap(),
    ]);

    // Only data crossed: the source holds ~56 MiB of its 10 GiB.
    let src_alloc = allocated(&source.dir().join("src.img"));
    assert!(
        fetched_after_restart <= src_alloc,
        "fetched {fetched_after_restart} after the restart, source allocates {src_alloc}"
    );
    let dst_alloc = allocated(&dst);
    assert!(
        dst_alloc <= src_alloc + 2 * MIB,
        "the clone is not sparse: {dst_alloc} bytes for {src_alloc}"
    );
    assert!(proxy.stats().accepted >= 2, "{:?}", proxy.stats());
    eprintln!("clone: source allocates {src_alloc} bytes; fetched {fetched_after_restart} after the restart; clone allocates {dst_alloc}");
    source.terminate();

    // Complete: restarting no longer contacts the source (it is gone).
    let _ = rt;
}

#[test]
fn migrate_from_nbdkit_fetches_only_allocated_bytes_and_resumes() {
    require_tool("nbdkit");
    let dir = tempfile::Builder::new()
        .prefix("longwire-test-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let src = dir.path().join("src.img");
    make_source(&src);
    let sock = dir.path().join("nbdkit.sock");
    let mut nbdkit = command("nbdkit")
        .args([
            "-f",
            "-U",
            sock.to_str().unwrap(),
            "file",
            src.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "nbdkit did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let src_uri = format!("nbd+unix:///?socket={}", sock.display());
    let dst = dir.path().join("dst.img");
    let migrate = |what: &str| -> String {
        let (out, timed_out) = output_with_timeout(
            command(&server_binary())
                .args([
                    "migrate",
                    &src_uri,
                    &format!("file:{}", dst.display()),
                    "--no-progress",
                ])
                .env("NO_COLOR", "1"),
            Duration::from_secs(120),
        );
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !timed_out && out.status.success(),
            "{what}: longwire migrate failed: {err}"
        );
        err
    };
    let number = |summary: &str, label: &str| -> u64 {
        let before = &summary[..summary
            .find(label)
            .unwrap_or_else(|| panic!("{label:?} not in {summary}"))];
        before
            .trim_end()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let started = Instant::now();
    let first = migrate("first run");
    let secs = started.elapsed().as_secs_f64();
    let fetched = number(&first, "bytes fetched");
    let src_alloc = allocated(&src);
    assert!(
        fetched >= src_alloc * 9 / 10 && fetched <= src_alloc + MIB,
        "fetched {fetched} for {src_alloc} allocated: {first}"
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
            dst.to_str().unwrap(),
        ],
    );
    assert!(allocated(&dst) <= src_alloc + MIB, "not sparse");
    eprintln!(
        "migrate from nbdkit: {fetched} bytes fetched for {src_alloc} allocated, {secs:.2} s"
    );
    // Done already: nothing is fetched again, and the source is not needed.
    let _ = nbdkit.kill();
    let _ = nbdkit.wait();
    let second = migrate("second run");
    assert_eq!(number(&second, "bytes fetched"), 0, "{second}");
    assert!(
        second.contains(&format!("{SIZE} bytes already local")),
        "{second}"
    );
}
