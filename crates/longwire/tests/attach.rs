//! `longwire attach`: an NBD export as a FUSE file that survives server
//! restarts and network cuts. ext4 on a loop device on the attached file
//! is written while the server is restarted (same file, same port) or while
//! a fault proxy cuts every connection; fsck must be clean and every file
//! intact. Also: an export that comes back with another size makes I/O
//! fail (EIO) instead of hanging; SIGTERM and `longwire detach` detach
//! cleanly.
//!
//! Needs root, /dev/fuse and loop devices.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::fuse::{require_fuse_env, test_files, Mounts};
use common::*;

const SIZE: u64 = 256 * MIB;

/// A free TCP port on 127.0.0.1 (so a restarted server can come back on
/// the same address).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn attach_log(log: &Path) -> String {
    fs::read_to_string(log).unwrap_or_default()
}

/// The files written under disruption: the usual tree plus more bulk.
fn files() -> Vec<(String, Vec<u8>)> {
    let mut v = test_files();
    for i in 0..16 {
        v.push((format!("bulk/part-{i:02}.bin"), pattern(500 + i, 2 * MIB as usize + i as usize * 513)));
    }
    v
}

/// Attach `uri`, mkfs.ext4, loop-mount, write [`files`] (each fsynced, so
/// I/O reaches the export all along) while `disrupt(server, round)` runs
/// `rounds` times spread over the writes; then sync, unmount, fsck, remount
/// and check every file by sha256. The attach process must stay alive
/// throughout, and finally detach cleanly. Returns the attach log.
fn ext4_under_disruption(s: &mut Server, uri: &str, rounds: usize, mut disrupt: impl FnMut(&mut Server, usize)) -> String {
    require_fuse_env();
    let dir = s.dir().to_path_buf();
    let fuse_dir = dir.join("fuse");
    let mnt = dir.join("mnt");
    let expected_dir = dir.join("expected");
    for d in [&fuse_dir, &mnt, &expected_dir] {
        fs::create_dir(d).unwrap();
    }
    let log = dir.join("attach.log");
    let mut m = Mounts::default();
    let dev = m.start_attach(uri, &fuse_dir, SIZE, &["--timeout", "90", "--reconnect-for", "120"], &log);
    run("mkfs.ext4", &["-F", "-q", "-L", "longwire", dev.to_str().unwrap()]);
    m.mount_loop(&dev, &mnt);

    let files = files();
    let n = files.len();
    let progress = Arc::new(AtomicUsize::new(0));
    let (done_tx, done_rx) = mpsc::channel();
    {
        let (files, mnt, progress) = (files.clone(), mnt.clone(), progress.clone());
        thread::spawn(move || {
            let r = std::panic::catch_unwind(|| {
                for (i, (name, data)) in files.iter().enumerate() {
                    let p = mnt.join(name);
                    fs::create_dir_all(p.parent().unwrap()).unwrap();
                    let mut f = fs::File::create(&p).unwrap();
                    f.write_all(data).unwrap();
                    f.sync_all().unwrap_or_else(|e| panic!("fsync {name}: {e}"));
                    progress.store(i + 1, Ordering::SeqCst);
                }
            });
            let _ = done_tx.send(r.map_err(|e| {
                e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
            }));
        });
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    for round in 0..rounds {
        let want = (round + 1) * n / (rounds + 1);
        while progress.load(Ordering::SeqCst) < want {
            assert!(Instant::now() < deadline, "writes stalled at file {} of {n}\n{}", progress.load(Ordering::SeqCst), attach_log(&log));
            thread::sleep(Duration::from_millis(20));
        }
        disrupt(s, round);
        assert!(m.fuse_process_alive(), "longwire attach died after disruption {round}: {}", attach_log(&log));
    }
    let left = deadline.saturating_duration_since(Instant::now());
    match done_rx.recv_timeout(left) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("writing files failed: {e}\n{}\n{}", attach_log(&log), s.logs()),
        Err(_) => panic!("writing files did not finish within 300 s\n{}\n{}", attach_log(&log), s.logs()),
    }
    assert!(m.fuse_process_alive(), "longwire attach died: {}", attach_log(&log));
    let sums: Vec<String> = files.iter().map(|(name, data)| fuse::sha256_bytes_via_tool(&expected_dir, name, data)).collect();
    run("sync", &[]);
    m.umount_loop(&mnt);

    let out = run_unchecked(command("fsck.ext4").args(["-n", "-f"]).arg(&dev), &s.logs());
    assert!(out.status.success(), "fsck.ext4 -n -f after the disruptions is not clean: {out:?}\n{}", attach_log(&log));

    m.mount_loop(&dev, &mnt);
    for ((name, _), sum) in files.iter().zip(&sums) {
        assert_eq!(&sha256_file(&mnt.join(name)), sum, "sha256 of {name} after remount");
    }
    m.umount_loop(&mnt);
    assert!(m.fuse_process_alive(), "longwire attach died: {}", attach_log(&log));
    m.stop_nbdfuse();
    attach_log(&log)
}

#[test]
fn ext4_survives_server_restarts() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut s = Server::start(&["--export", "disk=file:{dir}/disk.img?size=256M", "--listen", &listen]);
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    let log = ext4_under_disruption(&mut s, &uri, 2, |s, round| {
        // SIGTERM (the server finishes in-flight requests and flushes),
        // then the same file on the same port.
        s.restart();
        eprintln!("server restarted ({})", round + 1);
    });
    assert!(log.contains("re-established"), "no reconnect was logged:\n{log}");
}

/// A TCP proxy that can cut every connection through it.
struct FaultProxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl FaultProxy {
    fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let c2 = conns.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut c = c2.lock().unwrap();
                    c.push(client.try_clone().unwrap());
                    c.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        FaultProxy { addr, conns }
    }

    /// Cut every connection (both directions, both sides).
    fn cut(&self) -> usize {
        let conns: Vec<TcpStream> = self.conns.lock().unwrap().drain(..).collect();
        for c in &conns {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        conns.len() / 2
    }
}

#[test]
fn ext4_survives_connection_cuts() {
    let mut s = Server::start(&["--export", "disk=file:{dir}/disk.img?size=256M", "--listen", "127.0.0.1:0"]);
    let proxy = FaultProxy::start(s.tcp_addr());
    let uri = format!("nbd://{}/disk", proxy.addr);
    let cuts = AtomicUsize::new(0);
    let log = ext4_under_disruption(&mut s, &uri, 4, |_, _| {
        let n = proxy.cut();
        cuts.fetch_add(n, Ordering::SeqCst);
        // Cut again shortly after, while the client is reconnecting or
        // re-sending.
        thread::sleep(Duration::from_millis(150));
        cuts.fetch_add(proxy.cut(), Ordering::SeqCst);
    });
    assert!(cuts.load(Ordering::SeqCst) >= 4, "the proxy cut only {} connections", cuts.load(Ordering::SeqCst));
    assert!(log.contains("re-established"), "no reconnect was logged:\n{log}");
}

#[test]
fn export_with_another_size_fails_io_instead_of_hanging() {
    require_fuse_env();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut s = Server::start_prepared(&["--export", "disk=file:{dir}/disk.img", "--listen", &listen], |d| {
        fs::File::create(d.join("disk.img")).unwrap().set_len(64 * MIB).unwrap();
    });
    let dir = s.dir().to_path_buf();
    let fuse_dir = dir.join("fuse");
    fs::create_dir(&fuse_dir).unwrap();
    let log = dir.join("attach.log");
    let mut m = Mounts::default();
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    let dev = m.start_attach(&uri, &fuse_dir, 64 * MIB, &["--timeout", "20", "--reconnect-for", "30"], &log);
    let f = fs::OpenOptions::new().read(true).write(true).open(&dev).unwrap();
    f.write_all_at(&pattern(7, 4096), 0).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, pattern(7, 4096));

    s.terminate();
    fs::OpenOptions::new().write(true).open(dir.join("disk.img")).unwrap().set_len(128 * MIB).unwrap();
    s.start_again();

    // I/O now fails with EIO, well within the request timeout; never hangs.
    let (tx, rx) = mpsc::channel();
    let f2 = f.try_clone().unwrap();
    thread::spawn(move || {
        let started = Instant::now();
        let mut buf = vec![0u8; 4096];
        let r = f2.read_exact_at(&mut buf, 0);
        let w = f2.write_all_at(&buf, 8192);
        let _ = tx.send((r, w, started.elapsed()));
    });
    let (r, w, took) = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
        panic!("I/O on the attached file hung after the export changed size\n{}", attach_log(&log))
    });
    let r = r.expect_err("a read succeeded on an export that changed size");
    let w = w.expect_err("a write succeeded on an export that changed size");
    assert_eq!(r.raw_os_error(), Some(libc::EIO), "read error {r}");
    assert_eq!(w.raw_os_error(), Some(libc::EIO), "write error {w}");
    assert!(took < Duration::from_secs(40), "failing took {took:?}");
    let text = attach_log(&log);
    assert!(text.contains("changed size from 67108864 to 134217728"), "attach did not log the size change clearly:\n{text}");
    assert!(m.fuse_process_alive(), "attach died instead of failing I/O: {text}");
    drop(f);

    // Unmounting still works (the final flush fails: any exit status).
    let fuse = m.fuse_mount.take().unwrap();
    run("fusermount3", &["-u", fuse.to_str().unwrap()]);
    assert!(m.wait_fuse_process(Duration::from_secs(30)).is_some(), "attach did not exit after unmount: {}", attach_log(&log));
    assert!(!Mounts::is_mounted(&fuse));
}

#[test]
fn detach_by_signal_and_by_command() {
    require_fuse_env();
    let s = Server::start(&["--export", "mem=memory:?size=64M", "--listen", "127.0.0.1:0"]);
    let dir = s.dir().to_path_buf();
    let fuse_dir = dir.join("fuse");
    fs::create_dir(&fuse_dir).unwrap();
    let uri = s.uri("mem");
    let data = pattern(9, MIB as usize);

    // 1. Write, SIGTERM: flush, unmount, exit 0.
    let log = dir.join("attach1.log");
    let mut m = Mounts::default();
    let dev = m.start_attach(&uri, &fuse_dir, 64 * MIB, &[], &log);
    {
        let mut f = fs::OpenOptions::new().write(true).open(&dev).unwrap();
        f.seek(SeekFrom::Start(MIB)).unwrap();
        f.write_all(&data).unwrap();
    }
    let pid = m.nbdfuse.as_ref().unwrap().id() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let st = m.wait_fuse_process(Duration::from_secs(20)).unwrap_or_else(|| panic!("attach ignored SIGTERM: {}", attach_log(&log)));
    assert!(st.success(), "attach exited with {st} after SIGTERM: {}", attach_log(&log));
    assert!(!Mounts::is_mounted(&fuse_dir), "still mounted after SIGTERM");
    m.fuse_mount = None;

    // 2. Attach again: the data is there; `longwire detach FILE`.
    let log = dir.join("attach2.log");
    let dev = m.start_attach(&uri, &fuse_dir, 64 * MIB, &["--read-only"], &log);
    let mut back = vec![0u8; data.len()];
    {
        let mut f = fs::File::open(&dev).unwrap();
        f.seek(SeekFrom::Start(MIB)).unwrap();
        f.read_exact(&mut back).unwrap();
    }
    assert!(back == data, "data written before SIGTERM did not survive");
    assert!(fs::OpenOptions::new().write(true).open(&dev).is_err(), "--read-only file opened for writing");
    let out = run_unchecked(command(&server_binary()).arg("detach").arg(&dev), "");
    assert!(out.status.success(), "longwire detach failed: {out:?}");
    let st = m.wait_fuse_process(Duration::from_secs(20)).unwrap_or_else(|| panic!("attach did not exit after detach: {}", attach_log(&log)));
    assert!(st.success(), "attach exited with {st} after detach: {}", attach_log(&log));
    assert!(!Mounts::is_mounted(&fuse_dir), "still mounted after detach");
    m.fuse_mount = None;

    // 3. detach on something that is not an attach mount fails clearly.
    let out = run_unchecked(command(&server_binary()).arg("detach").arg(&fuse_dir), "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a longwire attach mount"), "{out:?}");

    // 4. nbds:// without a CA to trust is refused with a clear message.
    let out = run_unchecked(command(&server_binary()).args(["attach", "nbds://127.0.0.1/x"]).arg(fuse_dir.join("disk")), "");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS") && err.contains("tls-certificates"), "{out:?}");
}
