//! The `longwire` command line: invalid arguments fail fast and cleanly,
//! existing images are served at their own size, relative paths resolve
//! against the working directory, descriptions are percent-decoded.

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

fn longwire_in(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(server_binary());
    cmd.args(args).current_dir(dir).env("NO_COLOR", "1");
    let (out, timed_out) = output_with_timeout(&mut cmd, Duration::from_secs(10));
    assert!(
        !timed_out,
        "longwire {args:?} did not exit within 10 s: {out:?}"
    );
    out
}

#[test]
fn invalid_arguments_fail_with_a_message() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cases: &[&[&str]] = &[
        &["serve", "--export", "noequals"],
        &["serve", "--export", "=memory:?size=1M"],
        &["serve", "--export", "x=bogus:foo"],
        &["serve", "--export", "x=memory:?size=12Q"],
        &["serve", "--export", "x=memory:"],
        &["serve", "--export", "x=memory:?size=1G&frob=1"],
        &["serve", "--export", "x=memory:?size=1M&readonly=maybe"],
        &["serve", "--export", "x=file:"],
        &[
            "serve",
            "--export",
            "a=memory:?size=1M",
            "--export",
            "a=memory:?size=2M",
        ],
        &[
            "serve",
            "--export",
            "r=file:does-not-exist.img?readonly=true",
        ],
        &[
            "serve",
            "--export",
            "a=memory:?size=1M",
            "--listen",
            "1.2.3.4.5:0",
        ],
        &[
            "serve",
            "--export",
            "a=memory:?size=1M",
            "--listen",
            "localhost",
        ],
        &["serve", "--config", "no-such-config.toml"],
        &["serve", "--bogus-flag"],
        &["frobnicate"],
    ];
    for args in cases {
        let out = longwire_in(dir.path(), args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "longwire {args:?} should fail, but exited with {}:\n{err}",
            out.status
        );
        assert!(
            !err.contains("panicked"),
            "longwire {args:?} panicked:\n{err}"
        );
        assert!(
            err.to_lowercase().contains("error"),
            "longwire {args:?}: no error message:\n{err}"
        );
    }
    // An invalid config file is an error too.
    std::fs::write(
        dir.path().join("bad.toml"),
        "listen = [\"127.0.0.1:0\"]\nfrobnicate = 3\n",
    )
    .unwrap();
    let out = longwire_in(dir.path(), &["serve", "--config", "bad.toml"]);
    assert!(
        !out.status.success(),
        "unknown config key must be an error: {out:?}"
    );
}

#[test]
fn help_and_version() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = longwire_in(dir.path(), &["--version"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("longwire"),
        "{out:?}"
    );
    let out = longwire_in(dir.path(), &["serve", "--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for opt in ["--export", "--listen", "--unix", "--config"] {
        assert!(text.contains(opt), "serve --help lacks {opt}:\n{text}");
    }
}

#[test]
fn existing_image_without_size_is_served_at_its_own_size() {
    const ODD: u64 = 5 * MIB + 512 + 3; // not a multiple of 4096 (nor 512)
    let content = pattern(42, ODD as usize);
    let c2 = content.clone();
    let s = Server::start_prepared(
        &[
            "--export",
            "odd=file:{dir}/odd.img",
            "--export",
            "oddro=file:{dir}/odd-ro.img?readonly=true",
            "--export",
            "rel=file:relative.img?size=1M",
            "--listen",
            "127.0.0.1:0",
        ],
        move |dir| {
            std::fs::write(dir.join("odd.img"), &c2).unwrap();
            std::fs::write(dir.join("odd-ro.img"), &c2).unwrap();
        },
    );
    let script = format!(
        r#"
ODD = {ODD}
for name in ("odd", "oddro"):
    h = connect(name, strict=0)
    check_eq(h.get_size(), ODD, name + ": size of an existing image without size=")
    with open(os.path.join(LW_DIR, name.replace("oddro", "odd-ro") + ".img"), "rb") as f:
        want = f.read()
    check_buf(h.pread(ODD, 0) if ODD <= 32 * MiB else b"", want, name + ": whole content")
    check_buf(h.pread(1000, ODD - 1000), want[-1000:], name + ": tail")
    expect_error("EINVAL", name + ": read past the odd end", h.pread, 4, ODD - 3 + 1)
    alive(h, "odd-size read error")
h = connect("odd")
h.pwrite(b"END", ODD - 3, flags=nbd.CMD_FLAG_FUA)
check_eq(bytes(h.pread(3, ODD - 3)), b"END", "write of the last 3 bytes")
expect_error("ENOSPC", "write past the odd end", h.pwrite, b"xxxx", ODD - 3)
print("ok")
"#
    );
    s.python(&script);
    // The file kept its size and got the write; the read-only one is untouched.
    let md = std::fs::metadata(s.dir().join("odd.img")).unwrap();
    assert_eq!(md.len(), ODD, "odd.img size must not change");
    let f = std::fs::File::open(s.dir().join("odd.img")).unwrap();
    let mut tail = [0u8; 3];
    f.read_exact_at(&mut tail, ODD - 3).unwrap();
    assert_eq!(&tail, b"END");
    assert!(
        std::fs::read(s.dir().join("odd-ro.img")).unwrap() == content,
        "read-only image modified"
    );
    // Relative paths resolve against the working directory.
    let rel = s.dir().join("relative.img");
    assert_eq!(
        std::fs::metadata(&rel).map(|m| m.len()).ok(),
        Some(MIB),
        "{} should exist",
        rel.display()
    );
}

#[test]
fn percent_encoded_utf8_descriptions() {
    let s = Server::start(&[
        "--export",
        "c=memory:?size=1M&description=Caf%C3%A9+%26+cr%C3%A8me%3F%3D%2B",
        "--listen",
        "127.0.0.1:0",
    ]);
    s.python(
        r#"
h = nbd.NBD()
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri(uri("c"))
got = []
h.opt_list(lambda name, desc: got.append((name, desc)) or 0)
check_eq(got, [("c", "Café & crème?=+")], "decoded description in NBD_OPT_LIST")
h.opt_info()
check_eq(h.get_export_description(), "Café & crème?=+", "decoded description in NBD_OPT_INFO")
print("ok")
"#,
    );
}

#[test]
fn verbose_flag_starts_and_serves() {
    let s = Server::start(&[
        "-v",
        "--export",
        "a=memory:?size=1M",
        "--listen",
        "127.0.0.1:0",
    ]);
    let out = s.run("nbdinfo", &["--size", &s.uri("a")]);
    assert_eq!(out.trim(), MIB.to_string());
}
