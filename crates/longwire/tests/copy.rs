//! `longwire copy SRC DST`: a sparse raw image copied to file:, sqlite: and
//! an nbd:// export and back out, compared with `qemu-img compare`; the
//! destinations stay sparse, and an nbd:// source is walked with block
//! status (its holes are not read). Zero runs are zeroed on the destination
//! only where it held data before the copy.

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
    copy_with(src, dst, &[])
}

/// `copy` with more options.
fn copy_with(src: &str, dst: &str, options: &[&str]) -> String {
    let (out, timed_out) = output_with_timeout(
        command(&server_binary()).args(["copy", src, dst, "--no-progress"]).args(options).env("NO_COLOR", "1"),
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

/// Size of the source in the zero-run test: 64 sqlite chunks dense, 64 sparse.
const RUNS_SIZE: u64 = 8 * MIB;
/// Data inside each 64 KiB chunk of that source; the rest of the chunk is
/// zero, so zero runs share chunks with data.
const RUNS_DATA: &[(u64, usize)] = &[(0, 12 * KIB as usize), (20 * KIB, 4 * KIB as usize), (44 * KIB, 8 * KIB as usize)];

/// The first half holds its zeros as written zero bytes (found by reading),
/// the second half as file holes (found by SEEK_HOLE).
fn make_zero_run_source(path: &Path) -> Vec<u8> {
    let mut dense = vec![0u8; (RUNS_SIZE / 2) as usize];
    for (i, chunk) in dense.chunks_mut(64 * KIB as usize).enumerate() {
        for (j, (off, len)) in RUNS_DATA.iter().enumerate() {
            chunk[*off as usize..*off as usize + len].copy_from_slice(&pattern((i * 8 + j) as u64, *len));
        }
    }
    let f = fs::File::create(path).unwrap();
    f.set_len(RUNS_SIZE).unwrap();
    // Same content twice; only the second copy's zeros are holes.
    f.write_all_at(&dense, 0).unwrap();
    for (i, chunk) in dense.chunks(64 * KIB as usize).enumerate() {
        for (off, len) in RUNS_DATA {
            let at = RUNS_SIZE / 2 + i as u64 * 64 * KIB + off;
            f.write_all_at(&chunk[*off as usize..*off as usize + len], at).unwrap();
        }
    }
    f.sync_all().unwrap();
    let mut all = dense.clone();
    all.extend_from_slice(&dense);
    all
}

fn assert_same_bytes(want: &[u8], path: &Path) {
    let got = fs::read(path).unwrap();
    assert_eq!(got.len(), want.len(), "{} has the wrong size", path.display());
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{} differs from the source at byte {at}", path.display());
    }
}

#[test]
fn zero_runs_are_zeroed_only_where_the_destination_held_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let want = make_zero_run_source(&dir.path().join("src.raw"));
    let src = format!("file:{}", p("src.raw"));

    // A fresh sqlite volume reads as zeros everywhere, so no zero run is
    // written to it, not even those beside data this copy wrote into the
    // same chunk. One piece at a time (no race hides a needless zeroing)
    // and many at once.
    for (name, options) in [("one", &["--parallel", "1"][..]), ("many", &[][..])] {
        let dst = format!("sqlite:{}?volume={name}", p("vols.db"));
        let sum = copy_with(&src, &dst, options);
        assert_eq!(summary_number(&sum, "bytes zeroed"), 0, "zeros written to a fresh volume: {sum}");
        let out = dir.path().join(format!("{name}.img"));
        copy(&dst, &format!("file:{}", out.display()));
        assert_same_bytes(&want, &out);
    }

    // A volume full of other data: every zero run of the source is zeroed,
    // including the parts of chunks that keep data (the holes of the sparse
    // half through the zero step; zero runs between data may instead be
    // written with the data).
    let ones = dir.path().join("ones.raw");
    fs::write(&ones, vec![0xffu8; RUNS_SIZE as usize]).unwrap();
    let dirty = format!("sqlite:{}?volume=dirty", p("vols.db"));
    copy(&format!("file:{}", ones.display()), &dirty);
    let sum = copy_with(&src, &dirty, &["--parallel", "1"]);
    let holes = RUNS_SIZE / 2 / (64 * KIB) * 40 * KIB;
    assert!(summary_number(&sum, "bytes zeroed") >= holes, "the holes of the source were not zeroed: {sum}");
    let out = dir.path().join("dirty.img");
    copy(&dirty, &format!("file:{}", out.display()));
    assert_same_bytes(&want, &out);
}
