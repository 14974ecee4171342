//! `longwire create | list | info | delete` on SQLite databases holding
//! several volumes and on image files; a created volume served over NBD
//! (nbdinfo sees its size); `longwire copy` of a sparse image into a created
//! SQLite volume and back out, compared with `qemu-img compare`, with the
//! holes still holes (`qemu-img map`, `stat`); and the refusals (existing
//! volume, missing volume, a file that is not a longwire database, deleting
//! data without --yes), each a clear message and exit code 1, never a panic.

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::json::Json;
use common::*;

/// Run `longwire ARGS` (bounded); the output whatever the status.
fn lw(args: &[&str]) -> Output {
    let (out, timed_out) = output_with_timeout(
        command(&server_binary()).args(args).env("NO_COLOR", "1"),
        Duration::from_secs(120),
    );
    assert!(!timed_out, "longwire {args:?} timed out: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked"),
        "longwire {args:?} panicked: {err}"
    );
    out
}

/// `longwire ARGS` must succeed; returns its stdout.
fn lw_ok(args: &[&str]) -> String {
    let out = lw(args);
    assert!(
        out.status.success(),
        "longwire {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `longwire ARGS` must fail with exit code 1; returns its stderr.
fn lw_err(args: &[&str]) -> String {
    let out = lw(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "longwire {args:?}: {out:?}");
    assert!(err.contains("longwire: error: "), "{err}");
    err
}

fn json(args: &[&str]) -> Json {
    let out = lw_ok(args);
    Json::parse(&out).unwrap_or_else(|e| panic!("longwire {args:?} printed bad JSON ({e}): {out}"))
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("longwire-manage-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

fn names(list: &Json) -> Vec<&str> {
    list.as_array()
        .iter()
        .map(|v| v.get("name").as_str())
        .collect()
}

#[test]
fn sqlite_create_list_info_delete() {
    let dir = tempdir();
    let db = dir.path().join("sub/volumes.db");
    let store = format!("sqlite:{}", db.display());
    let vol = |name: &str| format!("{store}?volume={name}");

    // Three volumes in one database (created with it).
    lw_ok(&["create", &vol("alpha"), "--size", "1G"]);
    lw_ok(&[
        "create",
        &vol("beta"),
        "--size",
        "64M",
        "--chunk-size",
        "16K",
        "--compression",
        "zstd",
    ]);
    let made = json(&["create", &format!("{}&size=16M", vol("gamma")), "--json"]);
    assert_eq!(made.get("size").as_u64(), 16 * MIB);
    assert_eq!(made.get("uri").as_str(), vol("gamma"));
    assert!(db.is_file());

    let list = json(&["list", &store, "--json"]);
    assert_eq!(names(&list), ["alpha", "beta", "gamma"]);
    let [alpha, beta, gamma] = list.as_array() else {
        panic!("{list:?}")
    };
    assert_eq!(alpha.get("size").as_u64(), GIB);
    assert_eq!(alpha.get("chunk_size").as_u64(), 64 * KIB);
    assert_eq!(alpha.get("compression").as_str(), "none");
    assert_eq!(beta.get("size").as_u64(), 64 * MIB);
    assert_eq!(beta.get("chunk_size").as_u64(), 16 * KIB);
    assert_eq!(beta.get("compression").as_str(), "zstd");
    assert_eq!(gamma.get("allocated").as_u64(), 0);
    assert_eq!(gamma.get("store").as_str(), "sqlite");

    // The human table has the same facts.
    let table = lw_ok(&["list", &store]);
    let beta_row = table
        .lines()
        .find(|l| l.starts_with("beta"))
        .unwrap_or_else(|| panic!("{table}"));
    for cell in ["64.0 MiB", "16.0 KiB", "zstd"] {
        assert!(
            beta_row.contains(cell),
            "{cell:?} missing from {beta_row:?}"
        );
    }

    // An existing volume is refused, with the way out.
    let err = lw_err(&["create", &vol("beta"), "--size", "1G"]);
    assert!(
        err.contains("already has a volume \"beta\"") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        json(&["info", &vol("beta"), "--json"]).get("size").as_u64(),
        64 * MIB
    );

    // Put 1 MiB of data into gamma: info shows it allocated.
    let src = dir.path().join("one-mib.raw");
    let f = fs::File::create(&src).unwrap();
    f.set_len(16 * MIB).unwrap();
    f.write_all_at(&pattern(7, MIB as usize), 4 * MIB).unwrap();
    lw_ok(&[
        "copy",
        &format!("file:{}", src.display()),
        &vol("gamma"),
        "--no-progress",
    ]);
    let info = json(&["info", &vol("gamma"), "--json"]);
    assert_eq!(info.get("allocated").as_u64(), MIB, "{info:?}");
    assert_eq!(info.get("chunks").as_u64(), 16, "{info:?}");
    let human = lw_ok(&["info", &vol("gamma")]);
    assert!(
        human.contains("1.0 MiB (1048576 bytes)") && human.contains("6% of the size"),
        "{human}"
    );

    // Deleting data needs --yes; an empty volume goes without.
    let err = lw_err(&["delete", &vol("gamma")]);
    assert!(
        err.contains("holds 1.0 MiB of data") && err.contains("--yes"),
        "{err}"
    );
    assert_eq!(
        names(&json(&["list", &store, "--json"])),
        ["alpha", "beta", "gamma"]
    );
    lw_ok(&["delete", &vol("gamma"), "--yes"]);
    lw_ok(&["delete", &vol("alpha")]);
    assert_eq!(names(&json(&["list", &store, "--json"])), ["beta"]);

    // Gone means gone: a new gamma starts empty, not with the old chunks.
    lw_ok(&["create", &vol("gamma"), "--size", "16M"]);
    assert_eq!(
        json(&["info", &vol("gamma"), "--json"])
            .get("allocated")
            .as_u64(),
        0
    );
    let s = Server::start(&[
        "--export",
        &format!("g={}", vol("gamma")),
        "--listen",
        "127.0.0.1:0",
    ]);
    let out = s.run("nbdinfo", &["--map", &s.uri("g")]);
    assert!(!out.contains("data"), "new volume shows old data: {out}");

    // Missing volumes name what exists.
    let err = lw_err(&["info", &vol("delta")]);
    assert!(
        err.contains("no volume \"delta\"") && err.contains("\"beta\", \"gamma\""),
        "{err}"
    );
    let err = lw_err(&["delete", &vol("delta"), "--yes"]);
    assert!(err.contains("no volume \"delta\""), "{err}");
}

#[test]
fn file_create_list_info_delete() {
    let dir = tempdir();
    let images = dir.path().join("images");
    let img = images.join("vm1.img");
    let uri = format!("file:{}", img.display());

    let made = json(&["create", &uri, "--size", "64M", "--json"]);
    assert_eq!(made.get("store").as_str(), "file");
    let md = fs::metadata(&img).unwrap();
    assert_eq!(md.len(), 64 * MIB);
    assert!(
        md.blocks() * 512 < MIB,
        "a new image should be sparse: {} blocks",
        md.blocks()
    );

    let err = lw_err(&["create", &uri, "--size", "64M"]);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    let err = lw_err(&[
        "create",
        &format!("file:{}/x.img", images.display()),
        "--size",
        "1M",
        "--chunk-size",
        "16K",
    ]);
    assert!(err.contains("sqlite"), "{err}");
    let err = lw_err(&["create", &format!("file:{}/x.img", images.display())]);
    assert!(err.contains("size"), "{err}");

    fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&[0xab; 8192], 0)
        .unwrap();
    lw_ok(&["create", &uri, "--size", "32M", "--force"]);
    let md = fs::metadata(&img).unwrap();
    assert_eq!(md.len(), 32 * MIB, "--force makes a new image");
    let mut head = [0u8; 8192];
    fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert!(head.iter().all(|&b| b == 0), "--force keeps old data");

    // list file:DIR: images only, by name.
    fs::write(images.join("b.img"), vec![1u8; 4096]).unwrap();
    fs::write(images.join(".hidden"), b"x").unwrap();
    lw_ok(&[
        "create",
        &format!("sqlite:{}/vols.db?volume=a", images.display()),
        "--size",
        "1M",
    ]);
    let list = json(&["list", &format!("file:{}", images.display()), "--json"]);
    assert_eq!(names(&list), ["b.img", "vm1.img"]);
    assert_eq!(list.as_array()[0].get("allocated").as_u64(), 4096);
    let info = json(&["info", &uri, "--json"]);
    assert_eq!(info.get("size").as_u64(), 32 * MIB);
    assert_eq!(info.get("chunk_size"), &Json::Null);

    let err = lw_err(&[
        "delete",
        &format!("file:{}", images.join("b.img").display()),
    ]);
    assert!(err.contains("--yes"), "{err}");
    lw_ok(&[
        "delete",
        &format!("file:{}", images.join("b.img").display()),
        "--yes",
    ]);
    lw_ok(&["delete", &uri]);
    assert!(!img.exists() && !images.join("b.img").exists());
    let err = lw_err(&["delete", &uri]);
    assert!(err.contains("does not exist"), "{err}");
    let err = lw_err(&["delete", &format!("file:{}", images.display()), "--yes"]);
    assert!(err.contains("not an image file"), "{err}");
    assert!(images.is_dir());
}

#[test]
fn created_volumes_are_served() {
    let s = Server::start_prepared(
        &[
            "--export",
            "sq=sqlite:{dir}/vols.db?volume=v",
            "--export",
            "img=file:{dir}/disk.img",
            "--listen",
            "127.0.0.1:0",
        ],
        |d| {
            lw_ok(&[
                "create",
                &format!("sqlite:{}/vols.db?volume=v", d.display()),
                "--size",
                "96M",
            ]);
            lw_ok(&[
                "create",
                &format!("sqlite:{}/vols.db?volume=other", d.display()),
                "--size",
                "1M",
            ]);
            lw_ok(&[
                "create",
                &format!("file:{}/disk.img", d.display()),
                "--size",
                "40M",
            ]);
        },
    );
    assert_eq!(
        s.run("nbdinfo", &["--size", &s.uri("sq")]).trim(),
        (96 * MIB).to_string()
    );
    assert_eq!(
        s.run("nbdinfo", &["--size", &s.uri("img")]).trim(),
        (40 * MIB).to_string()
    );
    let info = Json::parse(&s.run("nbdinfo", &["--json", &s.uri("sq")])).unwrap();
    let export = &info.get("exports").as_array()[0];
    assert_eq!(
        export.get("block_size_preferred").as_u64(),
        64 * KIB,
        "{info:?}"
    );
}

/// 64 MiB image with data at 64 KiB-aligned places, so the SQLite copy
/// (64 KiB chunks) holds exactly the same runs.
const SIZE: u64 = 64 * MIB;
const DATA: &[(u64, u64)] = &[
    (0, MIB),
    (10 * MIB, 64 * KIB),
    (20 * MIB, 3 * MIB),
    (SIZE - 128 * KIB, 128 * KIB),
];

fn data_runs(s: &Server, path: &Path) -> Vec<(u64, u64)> {
    let (out, _) = s.qemu_img(&["map", "-f", "raw", "--output=json", path.to_str().unwrap()]);
    let map = Json::parse(&out).unwrap();
    map.as_array()
        .iter()
        .filter(|e| e.get("data").as_bool())
        .map(|e| (e.get("start").as_u64(), e.get("length").as_u64()))
        .collect()
}

#[test]
fn copy_into_a_created_sqlite_volume_and_back_keeps_holes() {
    let s = Server::start(&["--export", "x=memory:?size=1M", "--listen", "127.0.0.1:0"]);
    let dir = s.dir();
    let src = dir.join("src.raw");
    let f = fs::File::create(&src).unwrap();
    f.set_len(SIZE).unwrap();
    for (i, &(off, len)) in DATA.iter().enumerate() {
        f.write_all_at(&pattern(90 + i as u64, len as usize), off)
            .unwrap();
    }
    f.sync_all().unwrap();
    let data: u64 = DATA.iter().map(|d| d.1).sum();

    let vol = format!("sqlite:{}/vols.db?volume=copy", dir.display());
    lw_ok(&["create", &vol, "--size", "64M"]);
    lw_ok(&[
        "copy",
        &format!("file:{}", src.display()),
        &vol,
        "--no-progress",
    ]);
    let info = json(&["info", &vol, "--json"]);
    assert_eq!(
        info.get("allocated").as_u64(),
        data,
        "holes were stored: {info:?}"
    );

    let out = dir.join("out.img");
    lw_ok(&[
        "copy",
        &vol,
        &format!("file:{}", out.display()),
        "--no-progress",
    ]);
    s.qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(data_runs(&s, &src), DATA, "qemu-img map of the source");
    assert_eq!(
        data_runs(&s, &out),
        DATA,
        "holes were filled on the way back"
    );
    let md = fs::metadata(&out).unwrap();
    assert_eq!(md.len(), SIZE);
    assert!(
        md.blocks() * 512 <= data + MIB,
        "out.img is not sparse: {} bytes allocated",
        md.blocks() * 512
    );
}

#[test]
fn refusals_are_clear_errors() {
    let dir = tempdir();
    let d = dir.path().display().to_string();

    // Not an SQLite file at all: named, untouched.
    let junk = dir.path().join("junk.db");
    fs::write(&junk, vec![0x5a; 8192]).unwrap();
    for args in [
        vec!["list".to_string(), format!("sqlite:{d}/junk.db")],
        vec!["info".to_string(), format!("sqlite:{d}/junk.db?volume=a")],
        vec![
            "create".to_string(),
            format!("sqlite:{d}/junk.db?volume=a"),
            "--size".into(),
            "1M".into(),
        ],
        vec![
            "delete".to_string(),
            format!("sqlite:{d}/junk.db?volume=a"),
            "--yes".into(),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = lw_err(&args);
        assert!(
            err.contains("junk.db is not an SQLite database"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(fs::read(&junk).unwrap(), vec![0x5a; 8192]);

    // Somebody else's SQLite database: refused, not converted.
    let theirs = dir.path().join("theirs.db");
    require_tool(PYTHON);
    run(PYTHON, &["-c", &format!("import sqlite3; c = sqlite3.connect({:?}); c.execute('create table t (x)'); c.commit()", theirs.display().to_string())]);
    let before = fs::read(&theirs).unwrap();
    let err = lw_err(&[
        "create",
        &format!("sqlite:{d}/theirs.db?volume=a"),
        "--size",
        "1M",
    ]);
    assert!(
        err.contains("theirs.db is an SQLite database but not a longwire one"),
        "{err}"
    );
    let err = lw_err(&["list", &format!("sqlite:{d}/theirs.db")]);
    assert!(err.contains("not a longwire one"), "{err}");
    assert_eq!(fs::read(&theirs).unwrap(), before);

    // Missing things.
    let err = lw_err(&["list", &format!("sqlite:{d}/none.db")]);
    assert!(err.contains("none.db does not exist"), "{err}");
    assert!(
        !dir.path().join("none.db").exists(),
        "list created the database"
    );
    let err = lw_err(&["info", &format!("sqlite:{d}/none.db")]);
    assert!(err.contains("volume=NAME"), "{err}");
    let err = lw_err(&["info", &format!("file:{d}/none.img")]);
    assert!(err.contains("none.img does not exist"), "{err}");
    let err = lw_err(&["info", "memory:?size=1G"]);
    assert!(err.contains("running server"), "{err}");
    let err = lw_err(&["create", "disk.img", "--size", "1G"]);
    assert!(err.contains("file:disk.img"), "{err}");
    // Bad arguments are clap's usage errors (exit 2), with the rule.
    let out = lw(&["create", &format!("file:{d}/x.img"), "--size", "1.5G"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1536M"),
        "{out:?}"
    );
    let out = lw(&[
        "create",
        &format!("sqlite:{d}/v.db?volume=a"),
        "--size",
        "1G",
        "--compression",
        "lz4",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("zstd or none"),
        "{out:?}"
    );
    assert!(!dir.path().join("x.img").exists() && !dir.path().join("v.db").exists());
}
