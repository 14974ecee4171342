//! The NBD client against real servers started as child processes: the
//! `longwire` binary, `nbdkit` (with and without structured replies) and
//! `qemu-nbd`, some of them behind a fault proxy that cuts or stalls
//! connections on command.
//!
//! - Interoperability: one read/write/flush/trim/zero/cache/extents script
//!   against every server and every reply style, checked against a
//!   reference model.
//! - Reconnection: connections cut repeatedly under a stream of pipelined
//!   writes; the server SIGKILLed and SIGTERMed and restarted mid-stream;
//!   a server that comes back with another size; a server that never
//!   comes back (give-up).
//! - Deadlines: a proxy that stalls.
//! - Multi-conn: requests spread over several connections when (and only
//!   when) the server advertises `CAN_MULTI_CONN`.
//!
//! Every test runs under a hard time limit ([`bounded`]).

mod support;

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use futures_util::stream::{self, StreamExt};
use longwire_core::{ExtentKind, ReadSegment, Volume, VolumeError, ZeroFlags};
use longwire_nbd::client::*;
use longwire_nbd::proto::*;
use longwire_nbd::transmission::ReplyStyle;
use support::*;

const SIZE: u64 = 64 * MIB;

fn fast_reconnect() -> ReconnectPolicy {
    ReconnectPolicy {
        enabled: true,
        initial_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(200),
        give_up_after: Some(Duration::from_secs(30)),
    }
}

// ---------------------------------------------------------------------------
// Interoperability
// ---------------------------------------------------------------------------

struct Expect {
    style: ReplyStyle,
    block_status: bool,
    multi_conn: bool,
    /// The server answers sparse reads with OFFSET_HOLE chunks.
    holes_in_reads: bool,
}

/// Small enough that the 3 MiB write below is split into pieces.
fn interop_config() -> ClientConfig {
    ClientConfig { max_request: 1 << 20, request_timeout: Duration::from_secs(20), ..ClientConfig::default() }
}

fn flatten(segments: &[ReadSegment]) -> Vec<u8> {
    let mut v = Vec::new();
    for s in segments {
        match s {
            ReadSegment::Data(d) => v.extend_from_slice(d),
            ReadSegment::Zero(n) => v.resize(v.len() + *n as usize, 0),
        }
    }
    v
}

/// The same script against any server; `label` names it in failures.
async fn interop_script(label: &str, vol: &NbdVolume, exp: &Expect) {
    let info = vol.client().info().clone();
    assert_eq!(info.reply_style, exp.style, "{label}: negotiated reply style");
    assert_eq!(info.base_allocation.is_some(), exp.block_status, "{label}: base:allocation negotiated");
    assert_eq!(vol.size(), SIZE, "{label}: export size");
    let caps = vol.capabilities();
    assert_eq!(caps.can_multi_conn, exp.multi_conn, "{label}: CAN_MULTI_CONN");
    assert!(!caps.read_only && caps.can_flush && caps.can_trim && caps.can_zero, "{label}: capabilities {caps:?}");
    assert_eq!(vol.client().max_io(), 1 << 20, "{label}: max_request caps the payload");
    let mut m = Model::new(SIZE);

    // A fresh export reads as zeros.
    let got = vol.read(0, MIB as usize).await.unwrap();
    assert_eq!(got.len(), MIB as usize);
    m.check(&format!("{label}: fresh read"), 0, &got);

    // Writes of several sizes, one with FUA, one split into 1 MiB pieces.
    for (i, (off, len, fua)) in [(0, MIB, false), (5 * MIB + 4096, 4096, true), (10 * MIB, 3 * MIB + 8192, false), (20 * MIB, 64 * KIB, true)]
        .into_iter()
        .enumerate()
    {
        let data = pattern(i as u64 + 1, len as usize);
        vol.write(off, Bytes::from(data.clone()), fua).await.unwrap_or_else(|e| panic!("{label}: write {i}: {e}"));
        m.write(off, &data);
    }

    // Pipelined: 256 writes in flight together, then 256 reads.
    let offs: Vec<u64> = (0..256).map(|i| 24 * MIB + i * 8192).collect();
    let writes = offs.iter().enumerate().map(|(i, &off)| vol.write(off, Bytes::from(pattern(100 + i as u64, 4096)), false));
    for (i, r) in join_all(writes).await.into_iter().enumerate() {
        r.unwrap_or_else(|e| panic!("{label}: pipelined write {i}: {e}"));
        m.write(offs[i], &pattern(100 + i as u64, 4096));
    }
    let reads = join_all(offs.iter().map(|&off| vol.read(off, 4096))).await;
    for (i, r) in reads.into_iter().enumerate() {
        m.check(&format!("{label}: pipelined read {i}"), offs[i], &r.unwrap());
    }

    // Read back across written/unwritten boundaries.
    for (off, len) in [(0, MIB + 8192), (5 * MIB, 16 * KIB), (10 * MIB - 4096, 3 * MIB + 16 * KIB), (24 * MIB, 2 * MIB)] {
        let got = vol.read(off, len as usize).await.unwrap();
        m.check(&format!("{label}: read {len} at {off}"), off, &got);
    }
    let segs = vol.read_sparse(MIB - 4096, 64 * KIB as usize).await.unwrap();
    m.check(&format!("{label}: sparse read"), MIB - 4096, &flatten(&segs));
    if exp.holes_in_reads {
        assert!(segs.iter().any(|s| matches!(s, ReadSegment::Zero(_))), "{label}: expected a hole in {segs:?}");
    }

    vol.flush().await.unwrap();

    // Trim (contents unspecified afterwards), zeroing with and without
    // NO_HOLE, FUA, fast zero, cache.
    vol.trim(0, 256 * KIB, false).await.unwrap();
    m.trim(0, 256 * KIB);
    vol.write_zeroes(0, 128 * KIB, ZeroFlags { may_trim: true, ..Default::default() }).await.unwrap();
    m.zero(0, 128 * KIB);
    vol.write_zeroes(512 * KIB, 128 * KIB, ZeroFlags::default()).await.unwrap();
    m.zero(512 * KIB, 128 * KIB);
    vol.write_zeroes(11 * MIB, 64 * KIB, ZeroFlags { fua: true, ..Default::default() }).await.unwrap();
    m.zero(11 * MIB, 64 * KIB);
    match vol.write_zeroes(10 * MIB, 64 * KIB, ZeroFlags { fast: true, may_trim: true, fua: false }).await {
        Ok(()) => m.zero(10 * MIB, 64 * KIB),
        Err(VolumeError::NotSupported(_)) => {}
        Err(e) => panic!("{label}: fast zero: {e}"),
    }
    vol.cache(0, MIB).await.unwrap();
    for (off, len) in [(0, MIB), (10 * MIB, 2 * MIB)] {
        let got = vol.read(off, len as usize).await.unwrap();
        m.check(&format!("{label}: after trim/zero, read {len} at {off}"), off, &got);
    }

    // Extents: never claim zeros where the model has data.
    for (off, len) in [(0, 16 * MIB), (48 * MIB, MIB), (10 * MIB - 4096, MIB), (SIZE - 4096, 4096)] {
        let ext = vol.extents(off, len).await.unwrap();
        let total: u64 = ext.iter().map(|e| e.len).sum();
        assert!(total >= 1 && total <= len, "{label}: extents of {len} at {off} cover {total}: {ext:?}");
        let mut pos = off;
        for e in &ext {
            if e.kind.reads_as_zero() {
                m.check_zero(&format!("{label}: extents at {off}"), pos, e.len);
            }
            pos += e.len;
        }
    }
    let unwritten = vol.extents(48 * MIB, MIB).await.unwrap();
    let written = vol.extents(5 * MIB + 4096, 4096).await.unwrap();
    assert_eq!(written[0].kind, ExtentKind::Data, "{label}: a written block is data: {written:?}");
    if exp.block_status {
        assert_ne!(unwritten[0].kind, ExtentKind::Data, "{label}: an unwritten range reads as zero: {unwritten:?}");
    } else {
        assert_eq!(unwritten, vec![longwire_core::Extent::new(MIB, ExtentKind::Data)], "{label}: no block status, all data");
    }

    // Out-of-range requests are refused locally with the right error…
    assert!(matches!(vol.read(SIZE - 4096, 8192).await, Err(VolumeError::Invalid(_))), "{label}: read past the end");
    assert!(matches!(vol.write(SIZE - 4096, Bytes::from(vec![1; 8192]), false).await, Err(VolumeError::NoSpace(_))));
    // … and when sent anyway, the server's error comes back mapped.
    let e = vol.client().read(SIZE - 4096, 8192).await.unwrap_err();
    let ClientError::Server { errno, .. } = &e else { panic!("{label}: expected a server error, got {e}") };
    assert_eq!(*errno, EINVAL, "{label}: {e}");
    assert!(matches!(VolumeError::from(e), VolumeError::Invalid(_)));

    // The connection survived all of that.
    let got = vol.read(10 * MIB, 4 * MIB as usize).await.unwrap();
    m.check(&format!("{label}: after errors"), 10 * MIB, &got);
    let stats = vol.client().stats();
    assert_eq!(stats.reconnects, 0, "{label}: no reconnects expected: {stats:?}");

    // Everything touched, once more.
    for off in (0..32 * MIB).step_by(4 * MIB as usize) {
        let got = vol.read(off, 4 * MIB as usize).await.unwrap();
        m.check(&format!("{label}: final read at {off}"), off, &got);
    }
    vol.client().close().await;
    assert!(matches!(vol.client().flush().await, Err(ClientError::Closed)), "{label}: closed client refuses requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interop_longwire_extended_headers() {
    init_logging();
    let server = LongwireServer::memory("disk", "64M");
    bounded(Duration::from_secs(120), async {
        let vol = NbdVolume::connect(&server.uri("disk"), interop_config()).await.unwrap();
        let exp = Expect { style: ReplyStyle::Extended, block_status: true, multi_conn: true, holes_in_reads: true };
        interop_script("longwire (extended)", &vol, &exp).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interop_longwire_structured_replies() {
    init_logging();
    let server = LongwireServer::memory("disk", "64M");
    bounded(Duration::from_secs(120), async {
        let cfg = ClientConfig { extended_headers: false, ..interop_config() };
        let vol = NbdVolume::connect(&server.uri("disk"), cfg).await.unwrap();
        let exp = Expect { style: ReplyStyle::Structured, block_status: true, multi_conn: true, holes_in_reads: true };
        interop_script("longwire (structured)", &vol, &exp).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interop_longwire_simple_replies() {
    init_logging();
    let server = LongwireServer::memory("disk", "64M");
    bounded(Duration::from_secs(120), async {
        let cfg = ClientConfig { extended_headers: false, structured_replies: false, ..interop_config() };
        let vol = NbdVolume::connect(&server.uri("disk"), cfg).await.unwrap();
        let exp = Expect { style: ReplyStyle::Simple, block_status: false, multi_conn: true, holes_in_reads: false };
        interop_script("longwire (simple)", &vol, &exp).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interop_nbdkit() {
    init_logging();
    let server = ExternalServer::nbdkit(false, "64M");
    bounded(Duration::from_secs(120), async {
        let vol = NbdVolume::connect(&server.uri("disk"), interop_config()).await.unwrap();
        let exp = Expect { style: ReplyStyle::Structured, block_status: true, multi_conn: true, holes_in_reads: false };
        interop_script("nbdkit", &vol, &exp).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interop_nbdkit_without_structured_replies() {
    init_logging();
    let server = ExternalServer::nbdkit(true, "64M");
    bounded(Duration::from_secs(120), async {
        let vol = NbdVolume::connect(&server.uri("disk"), interop_config()).await.unwrap();
        let exp = Expect { style: ReplyStyle::Simple, block_status: false, multi_conn: true, holes_in_reads: false };
        interop_script("nbdkit --no-sr", &vol, &exp).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interop_qemu_nbd() {
    init_logging();
    let server = ExternalServer::qemu_nbd("disk", SIZE);
    bounded(Duration::from_secs(120), async {
        let vol = NbdVolume::connect(&server.uri("disk"), interop_config()).await.unwrap();
        let exp = Expect { style: ReplyStyle::Extended, block_status: true, multi_conn: false, holes_in_reads: true };
        interop_script("qemu-nbd", &vol, &exp).await;
    })
    .await;
}

/// Server errors come back as the right [`VolumeError`]; handshake
/// failures and unsupported URIs are reported clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_mapped_and_clear() {
    init_logging();
    let server = LongwireServer::start(&[
        "--export",
        "disk=memory:?size=1M",
        "--export",
        "ro=memory:?size=1M&readonly=true",
        "--listen",
        "127.0.0.1:0",
    ]);
    bounded(Duration::from_secs(60), async {
        // Read-only: refused locally by NbdVolume, EPERM from the server → ReadOnly.
        let ro = NbdVolume::connect(&server.uri("ro"), ClientConfig::default()).await.unwrap();
        assert!(ro.capabilities().read_only);
        assert!(matches!(ro.write(0, Bytes::from(vec![1; 512]), false).await, Err(VolumeError::ReadOnly)));
        let e = ro.client().write(0, Bytes::from(vec![1; 512]), false).await.unwrap_err();
        assert!(matches!(&e, ClientError::Server { errno: EPERM, .. }), "{e}");
        assert!(e.to_string().contains("NBD_CMD_WRITE of 512 bytes at offset 0") && e.to_string().contains("NBD_EPERM"), "{e}");
        assert!(matches!(VolumeError::from(e), VolumeError::ReadOnly));

        // Writing past the end: ENOSPC → NoSpace, with the server's message.
        let rw = NbdVolume::connect(&server.uri("disk"), ClientConfig::default()).await.unwrap();
        let e = rw.client().write(MIB - 512, Bytes::from(vec![1; 1024]), false).await.unwrap_err();
        assert!(matches!(&e, ClientError::Server { errno: ENOSPC, .. }), "{e}");
        match VolumeError::from(e) {
            VolumeError::NoSpace(msg) => assert!(msg.contains("past the end"), "{msg}"),
            other => panic!("expected NoSpace, got {other}"),
        }
        // A payload the server would refuse is refused locally.
        let e = rw.client().read(0, 64 << 20).await.unwrap_err();
        assert!(matches!(&e, ClientError::Invalid(m) if m.contains("maximum payload of 33554432 bytes")), "{e}");
        // The session carries on after errors.
        rw.write(0, Bytes::from(vec![7; 4096]), true).await.unwrap();
        assert_eq!(rw.read(0, 4096).await.unwrap(), vec![7; 4096]);

        // An unknown export: the server's reason, no retrying.
        let e = NbdClient::connect(&server.uri("nope"), ClientConfig::default()).await.unwrap_err();
        assert!(matches!(&e, ClientError::Handshake { error: NegotiationError::UnknownExport { .. }, .. }), "{e}");
        assert!(e.to_string().contains("no export named \"nope\""), "{e}");

        // Nobody listening.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let e = NbdClient::connect(&format!("nbd://{dead}/x"), ClientConfig::default()).await.unwrap_err();
        assert!(matches!(&e, ClientError::Connect { .. }), "{e}");

        // TLS needs a CA to trust; bad URIs say what is wrong.
        let e = NbdClient::connect(&format!("nbds://{}/disk", server.addr()), ClientConfig::default()).await.unwrap_err();
        assert!(matches!(&e, ClientError::TlsSetup { .. }) && e.to_string().contains("tls-certificates=DIR"), "{e}");
        let e = NbdClient::connect(&format!("nbds://{}/disk?tls-certificates=/nonexistent", server.addr()), ClientConfig::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca-cert.pem"), "{e}");
        let e = NbdClient::connect("nbd+unix:///disk", ClientConfig::default()).await.unwrap_err();
        assert!(e.to_string().contains("socket="), "{e}");
    })
    .await;
}

/// `nbd+unix://` URIs reach a unix-socket listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_over_a_unix_socket() {
    init_logging();
    let server = LongwireServer::start(&["--export", "disk=memory:?size=1M", "--unix", "{dir}/nbd.sock"]);
    bounded(Duration::from_secs(30), async {
        let uri = format!("nbd+unix:///disk?socket={}/nbd.sock", server.dir().display());
        let vol = NbdVolume::connect(&uri, ClientConfig::default()).await.unwrap();
        assert_eq!(vol.size(), MIB);
        vol.write(4096, Bytes::from(pattern(9, 4096)), false).await.unwrap();
        assert_eq!(vol.read(4096, 4096).await.unwrap(), pattern(9, 4096));
    })
    .await;
}

// ---------------------------------------------------------------------------
// Reconnection
// ---------------------------------------------------------------------------

/// Cut every connection again and again while hundreds of writes are in
/// flight: every write is acknowledged exactly once, none fails, and the
/// export ends up with exactly the written data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconnects_through_repeated_cuts_during_pipelined_writes() {
    init_logging();
    let server = LongwireServer::memory("disk", "64M");
    bounded(Duration::from_secs(180), async {
        let proxy = Arc::new(Proxy::start(server.addr()).await);
        let cfg = ClientConfig { reconnect: fast_reconnect(), max_in_flight: 32, ..ClientConfig::default() };
        let vol = Arc::new(NbdVolume::connect(&proxy.uri("disk"), cfg).await.unwrap());
        const N: usize = 1500;
        const LEN: usize = 32 * 1024;
        const CUTS: usize = 12;
        let acks: Arc<Vec<AtomicU32>> = Arc::new((0..N).map(|_| AtomicU32::new(0)).collect());
        let done = Arc::new(AtomicUsize::new(0));

        // Cut whenever another N/(CUTS+1) writes have been acknowledged,
        // so every cut lands mid-stream with writes outstanding, and only
        // once the client is back from the previous cut (a cut during the
        // handshake would be a failed attempt, not a lost session).
        let cutter = {
            let (proxy, done, vol) = (proxy.clone(), done.clone(), vol.clone());
            tokio::spawn(async move {
                let mut cuts = 0;
                while cuts < CUTS {
                    let recovered = vol.client().stats().reconnects >= cuts as u64;
                    if recovered && done.load(Ordering::SeqCst) >= (cuts + 1) * N / (CUTS + 1) {
                        assert!(proxy.cut_all() > 0, "cut {cuts}: no connection to cut");
                        cuts += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                cuts
            })
        };
        let results: Vec<Result<(), VolumeError>> = stream::iter(0..N)
            .map(|i| {
                let (vol, acks, done) = (vol.clone(), acks.clone(), done.clone());
                async move {
                    let r = vol.write((i * LEN) as u64, Bytes::from(pattern(i as u64, LEN)), false).await;
                    acks[i].fetch_add(1, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                    r
                }
            })
            .buffer_unordered(128)
            .collect()
            .await;
        let cuts = cutter.await.unwrap();
        assert_eq!(cuts, CUTS);
        for (i, r) in results.iter().enumerate() {
            if let Err(e) = r {
                panic!("a write failed despite reconnecting ({i}): {e}");
            }
        }
        for (i, a) in acks.iter().enumerate() {
            assert_eq!(a.load(Ordering::SeqCst), 1, "write {i} acknowledged {} times", a.load(Ordering::SeqCst));
        }
        let stats = vol.client().stats();
        assert!(stats.reconnects >= CUTS as u64, "{stats:?}");
        assert!(stats.resent > 0, "cuts happened with writes outstanding, some must have been re-sent: {stats:?}");
        assert!(proxy.accepted() > CUTS, "every cut forced a new connection");

        // The data: through the reconnected client and through a fresh
        // connection straight to the server.
        vol.flush().await.unwrap();
        let direct = NbdVolume::connect(&server.uri("disk"), ClientConfig::default()).await.unwrap();
        for i in 0..N {
            let want = pattern(i as u64, LEN);
            let off = (i * LEN) as u64;
            assert_eq!(vol.read(off, LEN).await.unwrap(), want, "block {i} via the client");
            assert_eq!(direct.read(off, LEN).await.unwrap(), want, "block {i} via a fresh connection");
        }
    })
    .await;
}

/// Kill the server (SIGKILL), and later stop it gracefully (SIGTERM: the
/// server answers NBD_ESHUTDOWN), restarting it each time, while writes
/// stream in over a unix socket. The client carries on through both and
/// the image file holds every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn carries_on_through_server_kill_and_restart() {
    init_logging();
    let server = LongwireServer::start(&["--export", "disk=file:{dir}/disk.img?size=64M", "--unix", "{dir}/nbd.sock"]);
    let dir = server.dir().to_path_buf();
    bounded(Duration::from_secs(180), async {
        let uri = format!("nbd+unix:///disk?socket={}/nbd.sock", dir.display());
        let cfg = ClientConfig { reconnect: fast_reconnect(), ..ClientConfig::default() };
        let vol = Arc::new(NbdVolume::connect(&uri, cfg).await.unwrap());
        const N: usize = 900;
        const LEN: usize = 64 * 1024;
        let acks: Arc<Vec<AtomicU32>> = Arc::new((0..N).map(|_| AtomicU32::new(0)).collect());
        let done = Arc::new(AtomicUsize::new(0));

        let controller = {
            let done = done.clone();
            tokio::task::spawn_blocking(move || {
                let mut server = server;
                let wait_for = |n: usize| {
                    while done.load(Ordering::SeqCst) < n {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                };
                wait_for(N / 3);
                server.kill();
                std::thread::sleep(Duration::from_millis(300));
                server.start_again();
                wait_for(2 * N / 3);
                server.terminate();
                std::thread::sleep(Duration::from_millis(300));
                server.start_again();
                server
            })
        };
        let results: Vec<Result<(), VolumeError>> = stream::iter(0..N)
            .map(|i| {
                let (vol, acks, done) = (vol.clone(), acks.clone(), done.clone());
                async move {
                    let r = vol.write((i * LEN) as u64, Bytes::from(pattern(1000 + i as u64, LEN)), false).await;
                    acks[i].fetch_add(1, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                    r
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        let server = controller.await.unwrap();
        for (i, r) in results.iter().enumerate() {
            if let Err(e) = r {
                panic!("write {i} failed across the restarts: {e}\n--- server log ---\n{}", server.logs());
            }
        }
        assert!(acks.iter().all(|a| a.load(Ordering::SeqCst) == 1), "every write acknowledged exactly once");
        let stats = vol.client().stats();
        assert!(stats.reconnects >= 2, "two restarts, two reconnects at least: {stats:?}");
        vol.flush().await.unwrap();

        let image = std::fs::read(dir.join("disk.img")).unwrap();
        for i in 0..N {
            let want = pattern(1000 + i as u64, LEN);
            assert_eq!(&image[i * LEN..(i + 1) * LEN], &want[..], "block {i} in the image file");
        }
        assert_eq!(vol.read(0, LEN).await.unwrap(), pattern(1000, LEN));
        vol.client().close().await;
        drop(server);
    })
    .await;
}

/// The server comes back with a different size: every request fails with
/// a clear error, quickly, and the client stops reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_an_export_that_changed_size() {
    init_logging();
    let big = LongwireServer::memory("disk", "64M");
    let small = LongwireServer::memory("disk", "32M");
    bounded(Duration::from_secs(60), async {
        let proxy = Proxy::start(big.addr()).await;
        let cfg = ClientConfig { reconnect: fast_reconnect(), ..ClientConfig::default() };
        let vol = NbdVolume::connect(&proxy.uri("disk"), cfg).await.unwrap();
        vol.write(0, Bytes::from(vec![1; 4096]), false).await.unwrap();

        proxy.set_upstream(small.addr());
        proxy.cut_all();
        let t = Instant::now();
        let e = vol.write(4096, Bytes::from(vec![2; 4096]), false).await.unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("changed size from 67108864 to 33554432; refusing to continue"),
            "unexpected error: {msg}"
        );
        assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());

        // Later requests fail at once with the same reason; no more connection attempts.
        let accepted = proxy.accepted();
        let t = Instant::now();
        let e = vol.read(0, 4096).await.unwrap_err();
        assert!(e.to_string().contains("refusing to continue"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(1), "took {:?}", t.elapsed());
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(proxy.accepted(), accepted, "the client must stop reconnecting");
    })
    .await;
}

/// The server never comes back: requests fail once the reconnect policy
/// gives up, long before their own deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gives_up_when_the_server_stays_away() {
    init_logging();
    let server = LongwireServer::memory("disk", "8M");
    bounded(Duration::from_secs(60), async {
        let proxy = Proxy::start(server.addr()).await;
        let policy = ReconnectPolicy { give_up_after: Some(Duration::from_secs(1)), ..fast_reconnect() };
        let cfg = ClientConfig { reconnect: policy, request_timeout: Duration::from_secs(20), ..ClientConfig::default() };
        let vol = NbdVolume::connect(&proxy.uri("disk"), cfg).await.unwrap();
        vol.write(0, Bytes::from(vec![1; 4096]), false).await.unwrap();

        let nowhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        proxy.set_upstream(nowhere);
        proxy.cut_all();
        let t = Instant::now();
        let e = vol.read(0, 4096).await.unwrap_err();
        assert!(e.to_string().contains("gave up reconnecting"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
        assert!(proxy.accepted() > 2, "it did retry before giving up");
        let t = Instant::now();
        assert!(vol.flush().await.unwrap_err().to_string().contains("gave up reconnecting"));
        assert!(t.elapsed() < Duration::from_secs(1), "took {:?}", t.elapsed());
    })
    .await;
}

/// With reconnecting switched off, a lost connection fails what is
/// outstanding and everything after it, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_reconnect_a_lost_connection_fails_at_once() {
    init_logging();
    let server = LongwireServer::memory("disk", "8M");
    bounded(Duration::from_secs(30), async {
        let proxy = Proxy::start(server.addr()).await;
        let policy = ReconnectPolicy { enabled: false, ..ReconnectPolicy::default() };
        let vol = NbdVolume::connect(&proxy.uri("disk"), ClientConfig { reconnect: policy, ..ClientConfig::default() }).await.unwrap();
        vol.write(0, Bytes::from(vec![1; 4096]), false).await.unwrap();
        proxy.cut_all();
        let t = Instant::now();
        let e = vol.read(0, 4096).await.unwrap_err();
        assert!(e.to_string().contains("reconnecting is disabled"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
        assert_eq!(proxy.accepted(), 1, "no reconnect attempt");
    })
    .await;
}

// ---------------------------------------------------------------------------
// Deadlines
// ---------------------------------------------------------------------------

/// A proxy that accepts but never forwards: requests fail at their
/// deadline with a clear error, connecting fails at the connect timeout,
/// and once the path is healthy again the client recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_fails_requests_at_the_deadline() {
    init_logging();
    let server = LongwireServer::memory("disk", "8M");
    bounded(Duration::from_secs(60), async {
        let proxy = Proxy::start(server.addr()).await;
        let deadline = Duration::from_millis(1500);
        let cfg = ClientConfig {
            request_timeout: deadline,
            connect_timeout: Duration::from_secs(1),
            reconnect: fast_reconnect(),
            ..ClientConfig::default()
        };
        let vol = NbdVolume::connect(&proxy.uri("disk"), cfg.clone()).await.unwrap();
        vol.write(0, Bytes::from(pattern(5, 4096)), false).await.unwrap();

        proxy.set_stalled(true);
        let t = Instant::now();
        let e = vol.read(0, 4096).await.unwrap_err();
        let took = t.elapsed();
        assert!(matches!(&e, VolumeError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("NBD_CMD_READ of 4096 bytes at offset 0 did not complete within 1.5s"), "{msg}");
        assert!(took >= deadline && took < deadline + Duration::from_secs(2), "failed after {took:?}");

        // Several at once, all bounded by the same deadline.
        let t = Instant::now();
        let rs = join_all((0..16u64).map(|i| vol.write(i * 4096, Bytes::from(vec![3; 4096]), false))).await;
        assert!(rs.iter().all(|r| r.is_err()));
        assert!(t.elapsed() < deadline + Duration::from_secs(2), "took {:?}", t.elapsed());

        // A fresh connection through the stall fails at the connect timeout.
        let t = Instant::now();
        let e = NbdClient::connect(&proxy.uri("disk"), cfg.clone()).await.unwrap_err();
        assert!(e.to_string().contains("did not finish within 1s"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());

        // New connections are forwarded again, but the stalled ones stay
        // stuck (no FIN, no RST): only noticing that the server went
        // silent lets the client replace its connection and recover.
        proxy.set_stalled(false);
        let t = Instant::now();
        loop {
            match vol.read(0, 4096).await {
                Ok(d) => {
                    assert_eq!(d, pattern(5, 4096));
                    break;
                }
                Err(e) if t.elapsed() < Duration::from_secs(15) => tracing::info!("not yet: {e}"),
                Err(e) => panic!("the client did not recover: {e}"),
            }
        }
        assert!(vol.client().stats().reconnects >= 1);
    })
    .await;
}

// ---------------------------------------------------------------------------
// Multi-conn
// ---------------------------------------------------------------------------

/// With CAN_MULTI_CONN the client opens the configured number of
/// connections and requests travel over all of them; without it, one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_conn_spreads_requests_over_connections() {
    init_logging();
    let server = LongwireServer::memory("disk", "64M");
    let qemu = ExternalServer::qemu_nbd("disk", 16 * MIB);
    bounded(Duration::from_secs(120), async {
        let proxy = Proxy::start(server.addr()).await;
        let cfg = ClientConfig { connections: 4, max_in_flight: 8, ..ClientConfig::default() };
        let vol = Arc::new(NbdVolume::connect(&proxy.uri("disk"), cfg.clone()).await.unwrap());
        assert_eq!(proxy.accepted(), 4, "four connections to a CAN_MULTI_CONN server");
        let stats = vol.client().stats();
        assert_eq!((stats.connections, stats.live_connections), (4, 4), "{stats:?}");
        let before = proxy.bytes_up();

        const N: usize = 512;
        const LEN: usize = 16 * 1024;
        let results: Vec<_> = stream::iter(0..N)
            .map(|i| {
                let vol = vol.clone();
                async move { vol.write((i * LEN) as u64, Bytes::from(pattern(7000 + i as u64, LEN)), false).await }
            })
            .buffer_unordered(128)
            .collect()
            .await;
        assert!(results.iter().all(|r| r.is_ok()));
        let after = proxy.bytes_up();
        assert_eq!(after.len(), 4);
        for (c, (a, b)) in after.iter().zip(&before).enumerate() {
            // Each connection carried some of the 16 KiB write payloads.
            assert!(a - b >= 4 * LEN as u64, "connection {c} carried only {} bytes: {before:?} → {after:?}", a - b);
        }
        // A flush on one connection covers writes completed on all of them.
        vol.flush().await.unwrap();
        let direct = NbdVolume::connect(&server.uri("disk"), ClientConfig::default()).await.unwrap();
        for i in (0..N).step_by(7) {
            assert_eq!(direct.read((i * LEN) as u64, LEN).await.unwrap(), pattern(7000 + i as u64, LEN), "block {i}");
        }

        // qemu-nbd does not advertise CAN_MULTI_CONN for a writable export.
        let qproxy = Proxy::start(qemu.addr()).await;
        let qvol = NbdVolume::connect(&qproxy.uri("disk"), cfg).await.unwrap();
        assert!(!qvol.capabilities().can_multi_conn);
        qvol.write(0, Bytes::from(vec![9; 4096]), false).await.unwrap();
        assert_eq!(qproxy.accepted(), 1, "one connection without CAN_MULTI_CONN");
        assert_eq!(qvol.client().stats().connections, 1);
    })
    .await;
}
