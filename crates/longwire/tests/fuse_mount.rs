//! A real filesystem on a longwire export: nbdfuse exposes the export as a
//! file, mkfs.ext4 formats it, the kernel mounts it through a loop device,
//! files are written, synced, checked with fsck, remounted and verified by
//! sha256. For the file store, the backing image is finally checked offline
//! (fsck + debugfs) to prove the bytes landed in the store.
//!
//! Needs root, /dev/fuse and loop devices.

mod common;

use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Unmounts everything and stops nbdfuse, even when the test panics.
struct Mounts {
    loop_mounts: Vec<PathBuf>,
    fuse_mount: Option<PathBuf>,
    nbdfuse: Option<Child>,
}

impl Mounts {
    fn is_mounted(p: &Path) -> bool {
        let target = fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(target.to_str().unwrap()))
    }

    fn umount_loop(&mut self, mnt: &Path) {
        run("umount", &[mnt.to_str().unwrap()]);
        self.loop_mounts.retain(|m| m != mnt);
        assert!(!Self::is_mounted(mnt), "{} still mounted", mnt.display());
    }

    fn mount_loop(&mut self, image: &Path, mnt: &Path) {
        run(
            "mount",
            &["-o", "loop", image.to_str().unwrap(), mnt.to_str().unwrap()],
        );
        self.loop_mounts.push(mnt.to_path_buf());
    }

    /// `fusermount3 -u` and wait for nbdfuse to exit cleanly.
    fn stop_nbdfuse(&mut self) {
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

fn require_fuse_env() {
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
fn test_files() -> Vec<(String, Vec<u8>)> {
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

fn sha256_bytes_via_tool(dir: &Path, name: &str, data: &[u8]) -> String {
    let p = dir.join(name.replace('/', "_"));
    fs::write(&p, data).unwrap();
    sha256_file(&p)
}

fn filesystem_on_export(export: &str, file_image: Option<&str>) {
    require_fuse_env();
    let mut s = Server::start(&[
        "--export",
        "disk=file:{dir}/disk.img?size=256M",
        "--export",
        "mem=memory:?size=256M",
        "--listen",
        "127.0.0.1:0",
    ]);
    let dir = s.dir().to_path_buf();
    let fuse_dir = dir.join("fuse");
    let mnt = dir.join("mnt");
    let expected_dir = dir.join("expected");
    for d in [&fuse_dir, &mnt, &expected_dir] {
        fs::create_dir(d).unwrap();
    }
    let dev = fuse_dir.join("nbd");
    let pidfile = dir.join("nbdfuse.pid");
    let mut m = Mounts {
        loop_mounts: Vec::new(),
        fuse_mount: None,
        nbdfuse: None,
    };

    // 1. nbdfuse MOUNTPOINT/FILENAME URI (stays in the foreground).
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
    m.nbdfuse = Some(child);
    m.fuse_mount = Some(fuse_dir.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(pidfile.exists() && fs::metadata(&dev).map(|md| md.len()).unwrap_or(0) == 256 * MIB) {
        if let Ok(Some(st)) = m.nbdfuse.as_mut().unwrap().try_wait() {
            panic!(
                "nbdfuse exited early with {st}: {}\n{}",
                fs::read_to_string(dir.join("nbdfuse.log")).unwrap_or_default(),
                s.logs()
            );
        }
        assert!(
            Instant::now() < deadline,
            "nbdfuse did not expose {} (256 MiB) within 20 s: {}\n{}",
            dev.display(),
            fs::read_to_string(dir.join("nbdfuse.log")).unwrap_or_default(),
            s.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

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

    // 7. file store: the backing image itself is a clean ext4 with the data.
    if let Some(img) = file_image {
        s.terminate();
        let img = dir.join(img);
        let out = run_unchecked(command("fsck.ext4").args(["-n", "-f"]).arg(&img), "");
        assert!(
            out.status.success(),
            "backing image {} is not a clean ext4: {out:?}",
            img.display()
        );
        let out_file = dir.join("from-debugfs.bin");
        run(
            "debugfs",
            &[
                "-R",
                &format!("dump /dir/sub/three-mib.bin {}", out_file.display()),
                img.to_str().unwrap(),
            ],
        );
        assert_eq!(
            sha256_file(&out_file),
            sums[5],
            "dir/sub/three-mib.bin read offline from the backing image"
        );
    }
}

#[test]
fn ext4_on_nbdfuse_file_store() {
    filesystem_on_export("disk", Some("disk.img"));
}

#[test]
fn ext4_on_nbdfuse_memory_store() {
    filesystem_on_export("mem", None);
}
