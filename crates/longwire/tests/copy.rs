//! `longwire copy SRC DST`: a sparse raw image copied to file:, sqlite: and
//! an nbd:// export and back out, compared with `qemu-img compare`; the
//! destinations stay sparse, and an nbd:// source is walked with block
//! status (its holes are not read).

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use common::*;

const SIZE: u64 = 64 * MIB;

/// (offset, length) of the data in the sparse source image.
const DATA: &[(u64, usize)] = &[
    (0, MIB as usize),
    (10 * MIB, 64 * KIB as usize),
    (20 * MIB + 4 * KIB, 3 * MIB as usize),
    (40 * MIB - 8 * KIB, 16 * KIB as usize),
    (SIZE - 4 * KIB, 4 * KIB as usize),
];

fn data_bytes() -> u64 {
    DATA.iter().map(|(_, l)| *l as u64).sum()
}

fn make_source(path: &Path) {
    let f = fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    for (i, (off, len)) in DATA.iter().enumerate() {
        f.write_all_at(&pattern(40 + i as u64, *len), *off).unwrap();
    }
    f.sync_all().unwrap();
}

/// Run `longwire copy SRC DST --no-progress`; returns its stderr.
fn copy(src: &str, dst: &str) -> String {
    let (out, timed_out) = output_with_timeout(
        command(&server_binary()).args(["copy", src, dst, "--no-progress"]).env("NO_COLOR", "1"),
        Duration::from_secs(120),
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!timed_out, "longwire copy {src} {dst} timed out: {err}");
    assert!(out.status.success(), "longwire copy {src} {dst} failed: {err}");
    assert!(err.contains("holes skipped"), "no summary: {err}");
    err
}

/// The number before `label` in the summary.
fn summary_number(summary: &str, label: &str) -> u64 {
    let before = &summary[..summary.find(label).unwrap_or_else(|| panic!("{label:?} not in {summary}"))];
    before.trim_end().rsplit(' ').next().unwrap().parse().unwrap_or_else(|e| panic!("{label:?} in {summary}: {e}"))
}

fn compare(s: &Server, a: &str, b: &str) {
    s.qemu_img(&["compare", "-f", "raw", "-F", "raw", a, b]);
}

/// Allocated bytes of a file: roughly the data, not the full size.
fn assert_sparse(path: &Path) {
    let md = fs::metadata(path).unwrap();
    assert_eq!(md.len(), SIZE, "{} has the wrong size", path.display());
    let allocated = md.blocks() * 512;
    assert!(
        allocated <= data_bytes() + 2 * MIB,
        "{} is not sparse: {allocated} bytes allocated for {} bytes of data",
        path.display(),
        data_bytes()
    );
}

#[test]
fn copy_between_file_sqlite_and_nbd_stays_sparse() {
    let s = Server::start_prepared(
        &["--export", "disk=file:{dir}/served.img?size=64M", "--listen", "127.0.0.1:0"],
        |d| make_source(&d.join("src.raw")),
    );
    let dir = s.dir().to_path_buf();
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let src = p("src.raw");

    // file: -> file: (created at SRC's size, sparse).
    let sum = copy(&format!("file:{src}"), &format!("file:{}", p("copy.img")));
    assert_eq!(summary_number(&sum, "bytes read"), data_bytes(), "{sum}");
    assert!(summary_number(&sum, "bytes of holes skipped") >= SIZE - data_bytes() - MIB, "{sum}");
    compare(&s, &src, &p("copy.img"));
    assert_sparse(&dir.join("copy.img"));

    // file: -> sqlite: -> file:.
    let db = format!("sqlite:{}?volume=v1", p("vols.db"));
    copy(&format!("file:{src}"), &db);
    let sum = copy(&db, &format!("file:{}", p("from-sqlite.img")));
    assert!(summary_number(&sum, "bytes of holes skipped") >= SIZE - data_bytes() - 4 * MIB, "{sum}");
    compare(&s, &src, &p("from-sqlite.img"));
    assert_sparse(&dir.join("from-sqlite.img"));

    // file: -> nbd:// -> file:; the nbd source is walked by block status.
    let nbd = s.uri("disk");
    copy(&format!("file:{src}"), &nbd);
    compare(&s, &src, &s.qemu_uri("disk"));
    let sum = copy(&nbd, &format!("file:{}", p("from-nbd.img")));
    let skipped = summary_number(&sum, "bytes of holes skipped");
    assert!(skipped >= SIZE - data_bytes() - MIB, "holes of the nbd source were read: {sum}");
    assert!(summary_number(&sum, "bytes read") <= data_bytes() + MIB, "{sum}");
    compare(&s, &src, &p("from-nbd.img"));
    assert_sparse(&dir.join("from-nbd.img"));

    // Onto a destination holding data where SRC has holes: zeroed there.
    let dirty = dir.join("dirty.img");
    fs::write(&dirty, vec![0xffu8; SIZE as usize]).unwrap();
    let sum = copy(&nbd, &format!("file:{}", dirty.display()));
    assert!(summary_number(&sum, "bytes zeroed") >= SIZE - data_bytes() - MIB, "{sum}");
    compare(&s, &src, dirty.to_str().unwrap());

    // A destination smaller than the source is refused.
    let small = "memory:?size=1M".to_string();
    let (out, _) = output_with_timeout(command(&server_binary()).args(["copy", &format!("file:{src}"), &small]), Duration::from_secs(60));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("smaller"), "{out:?}");
}
