//! A real filesystem on a longwire export, shared by the tests that need
//! one (`fuse_mount.rs`, `sqlite.rs`, `s3.rs`): nbdfuse exposes the export
//! as a file, mkfs.ext4 formats it, the kernel mounts it through a loop
//! device.
//!
//! Needs root, /dev/fuse and loop devices.

use super::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Unmounts everything and stops nbdfuse, even when the test panics.
#[derive(Default)]
pub struct Mounts {
    pub loop_mounts: Vec<PathBuf>,
    pub fuse_mount: Option<PathBuf>,
    pub nbdfuse: Option<Child>,
}

impl Mounts {
    pub fn is_mounted(p: &Path) -> bool {
        let target = fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(target.to_str().unwrap()))
    }

    pub fn umount_loop(&mut self, mnt: &Path) {
        run("umount", &[mnt.to_str().unwrap()]);
        self.loop_mounts.retain(|m| m != mnt);
        assert!(!Self::is_mounted(mnt), "{} still mounted", mnt.display());
    }

    pub fn mount_loop(&mut self, image: &Path, mnt: &Path) {
        run(
            "mount",
            &["-o", "loop", image.to_str().unwrap(), mnt.to_str().unwrap()],
        );
        self.loop_mounts.push(mnt.to_path_buf());
    }

    /// `nbdfuse -P PIDFILE FUSE_DIR/nbd URI` (stays in the foreground), and
    /// wait until the file is there with `size` bytes. Returns its path.
    pub fn start_nbdfuse(
        &mut self,
        s: &Server,
        export: &str,
        fuse_dir: &Path,
        size: u64,
    ) -> PathBuf {
        let dir = s.dir();
        let dev = fuse_dir.join("nbd");
        let pidfile = dir.join("nbdfuse.pid");
        let _ = fs::remove_file(&pidfile);
        let log = fs::File::create(dir.join("nbdfuse.log")).unwrap();
        let child = command("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(&dev)
            .arg(s.uri(export))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn nbdfuse");
        self.nbdfuse = Some(child);
        self.fuse_mount = Some(fuse_dir.to_path_buf());
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(pidfile.exists() && fs::metadata(&dev).map(|md| md.len()).unwrap_or(0) == size) {
            if let Ok(Some(st)) = self.nbdfuse.as_mut().unwrap().try_wait() {
                panic!(
                    "nbdfuse exited early with {st}: {}\n{}",
                    fs::read_to_string(dir.join("nbdfuse.log")).unwrap_or_default(),
                    s.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nbdfuse did not expose {} ({size} bytes) within 20 s: {}\n{}",
                dev.display(),
                fs::read_to_string(dir.join("nbdfuse.log")).unwrap_or_default(),
                s.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        dev
    }

    /// `longwire attach URI FUSE_DIR/disk EXTRA...` (foreground), logging
    /// to `log`, and wait until the file is there with `size` bytes. The
    /// attach process is kept in `self.nbdfuse` (the FUSE process), so
    /// [`Mounts::stop_nbdfuse`] and the drop clean-up apply to it too.
    pub fn start_attach(
        &mut self,
        uri: &str,
        fuse_dir: &Path,
        size: u64,
        extra: &[&str],
        log: &Path,
    ) -> PathBuf {
        let dev = fuse_dir.join("disk");
        let logf = fs::File::create(log).unwrap();
        let child = command(&server_binary())
            .arg("attach")
            .arg(uri)
            .arg(&dev)
            .args(extra)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("spawn longwire attach");
        self.nbdfuse = Some(child);
        self.fuse_mount = Some(fuse_dir.to_path_buf());
        let deadline = Instant::now() + Duration::from_secs(20);
        while fs::metadata(&dev).map(|md| md.len()).unwrap_or(0) != size {
            if let Ok(Some(st)) = self.nbdfuse.as_mut().unwrap().try_wait() {
                panic!(
                    "longwire attach exited early with {st}: {}",
                    fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "longwire attach did not expose {} ({size} bytes) within 20 s: {}",
                dev.display(),
                fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        dev
    }

    /// Is the FUSE process (nbdfuse or longwire attach) still running?
    pub fn fuse_process_alive(&mut self) -> bool {
        matches!(self.nbdfuse.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Wait at most `timeout` for the FUSE process to exit; its status.
    pub fn wait_fuse_process(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.nbdfuse.as_mut()?.try_wait().unwrap() {
                self.nbdfuse = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `fusermount3 -u` and wait for nbdfuse to exit cleanly.
    pub fn stop_nbdfuse(&mut self) {
        let fuse = self.fuse_mount.take().expect("nbdfuse not mounted");
        run("fusermount3", &["-u", fuse.to_str().unwrap()]);
        let mut child = self.nbdfuse.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                assert!(st.success(), "nbdfuse exited with {st}");
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("nbdfuse did not exit after fusermount3 -u");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.loop_mounts.drain(..).rev() {
            let _ = command("umount").arg(&m).status();
            if Self::is_mounted(&m) {
                let _ = command("umount").arg("-l").arg(&m).status();
            }
        }
        if let Some(f) = self.fuse_mount.take() {
            let _ = command("fusermount3").arg("-u").arg(&f).status();
            if Self::is_mounted(&f) {
                let _ = command("fusermount3").args(["-u", "-z"]).arg(&f).status();
            }
        }
        if let Some(mut c) = self.nbdfuse.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn require_fuse_env() {
    for t in [
        "nbdfuse",
        "fusermount3",
        "mkfs.ext4",
        "fsck.ext4",
        "debugfs",
        "mount",
        "umount",
        "fstrim",
        "sha256sum",
        "sync",
    ] {
        require_tool(t);
    }
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: this test needs FUSE (a container may need --device /dev/fuse)"
    );
}

/// Files to store: (relative path, content).
pub fn test_files() -> Vec<(String, Vec<u8>)> {
    let mut v = vec![
        ("empty".to_string(), Vec::new()),
        ("small.txt".to_string(), b"hello from longwire\n".to_vec()),
        ("one-kib.bin".to_string(), pattern(1, 1024)),
        ("odd-size.bin".to_string(), pattern(2, MIB as usize + 7)),
        ("ten-mib.bin".to_string(), pattern(3, 10 * MIB as usize)),
        (
            "dir/sub/three-mib.bin".to_string(),
            pattern(4, 3 * MIB as usize),
        ),
    ];
    for i in 0..50 {
        v.push((
            format!("many/file-{i:03}.bin"),
            pattern(100 + i, 4096 + i as usize * 97),
        ));
    }
    v
}

pub fn sha256_bytes_via_tool(dir: &Path, name: &str, data: &[u8]) -> String {
    let p = dir.join(name.replace('/', "_"));
    fs::write(&p, data).unwrap();
    sha256_file(&p)
}

/// On `export` (`size` bytes) of a running server: nbdfuse, mkfs.ext4
/// (which discards the whole device first: NBD TRIM), mount, write
/// [`test_files`], sync, unmount, fsck; remount, verify every file by
/// sha256 and byte for byte, delete some, fstrim (more TRIMs), unmount,
/// fsck again, remount and check one file; unmount and stop nbdfuse.
/// Returns the sha256 of each of [`test_files`], in order.
pub fn ext4_round_trip(s: &Server, export: &str, size: u64) -> Vec<String> {
    require_fuse_env();
    let dir = s.dir().to_path_buf();
    let fuse_dir = dir.join("fuse");
    let mnt = dir.join("mnt");
    let expected_dir = dir.join("expected");
    for d in [&fuse_dir, &mnt, &expected_dir] {
        fs::create_dir(d).unwrap();
    }
    let mut m = Mounts::default();

    // 1. nbdfuse MOUNTPOINT/FILENAME URI (stays in the foreground).
    let dev = m.start_nbdfuse(s, export, &fuse_dir, size);

    // 2. mkfs (mke2fs discards the whole file first: NBD TRIM).
    run(
        "mkfs.ext4",
        &["-F", "-q", "-L", "longwire", dev.to_str().unwrap()],
    );

    // 3. mount, write files, sync, unmount.
    let files = test_files();
    let mut sums = Vec::new();
    m.mount_loop(&dev, &mnt);
    for (name, data) in &files {
        let p = mnt.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
        sums.push(sha256_bytes_via_tool(&expected_dir, name, data));
    }
    run("sync", &[]);
    m.umount_loop(&mnt);

    // 4. fsck (read-only check, forced) must be clean.
    let out = run_unchecked(command("fsck.ext4").args(["-n", "-f"]).arg(&dev), &s.logs());
    assert!(
        out.status.success(),
        "fsck.ext4 -n -f on the export is not clean: {out:?}\n{}",
        s.logs()
    );

    // 5. remount and verify every file by sha256 and byte-for-byte; delete
    // some, fstrim (more TRIMs), unmount, fsck again.
    m.mount_loop(&dev, &mnt);
    for ((name, data), sum) in files.iter().zip(&sums) {
        let p = mnt.join(name);
        assert_eq!(&sha256_file(&p), sum, "sha256 of {name} after remount");
        assert!(
            fs::read(&p).unwrap() == *data,
            "content of {name} after remount"
        );
    }
    fs::remove_dir_all(mnt.join("many")).unwrap();
    fs::remove_file(mnt.join("odd-size.bin")).unwrap();
    run("sync", &[]);
    // fstrim: ext4 -> loop device -> fallocate(PUNCH_HOLE) on the FUSE file
    // -> nbdfuse -> NBD_CMD_TRIM.
    let fstrim = run_unchecked(command("fstrim").arg("-v").arg(&mnt), &s.logs());
    assert!(
        fstrim.status.success(),
        "fstrim on the mounted export failed: {fstrim:?}"
    );
    m.umount_loop(&mnt);
    let out = run_unchecked(command("fsck.ext4").args(["-n", "-f"]).arg(&dev), &s.logs());
    assert!(
        out.status.success(),
        "fsck.ext4 after deletions/fstrim is not clean: {out:?}\n{}",
        s.logs()
    );
    m.mount_loop(&dev, &mnt);
    assert_eq!(
        &sha256_file(&mnt.join("ten-mib.bin")),
        &sums[4],
        "ten-mib.bin after fstrim"
    );
    assert!(!mnt.join("odd-size.bin").exists());
    m.umount_loop(&mnt);

    // 6. stop nbdfuse cleanly.
    m.stop_nbdfuse();
    sums
}
