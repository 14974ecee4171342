//! A real filesystem on a longwire export: nbdfuse exposes the export as a
//! file, mkfs.ext4 formats it, the kernel mounts it through a loop device,
//! files are written, synced, checked with fsck, remounted and verified by
//! sha256. For the file store, the backing image is finally checked offline
//! (fsck + debugfs) to prove the bytes landed in the store.
//!
//! Needs root, /dev/fuse and loop devices.

mod common;

use common::fuse::ext4_round_trip;
use common::*;

fn filesystem_on_export(export: &str, file_image: Option<&str>) {
    let mut s = Server::start(&[
        "--export",
        "disk=file:{dir}/disk.img?size=256M",
        "--export",
        "mem=memory:?size=256M",
        "--listen",
        "127.0.0.1:0",
    ]);
    let dir = s.dir().to_path_buf();

    // 1.-6. nbdfuse, mkfs.ext4, mount, write, fsck, verify, fstrim, fsck.
    let sums = ext4_round_trip(&s, export, 256 * MIB);

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
