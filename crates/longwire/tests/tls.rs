//! NBD over TLS (STARTTLS): the real `longwire serve` with certificates
//! made by the `openssl` CLI in the test's directory, driven by libnbd
//! (GnuTLS), qemu (GnuTLS) and raw bytes.
//!
//! PKI made per test: CA `ca` issuing the server certificate (CN=localhost,
//! SAN DNS:localhost + IP:127.0.0.1) and client certificates `client1` and
//! `client2`; an unrelated CA `ca2` issuing `rogue` (also CN=client1).
//! Each client gets a directory in the layout libnbd and qemu expect
//! (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
//!
//! Run: `cargo test -p longwire --test tls`.

mod common;

use common::raw::*;
use common::pki::*;
use common::*;
use std::path::Path;

const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR + 5;

fn make_pki(dir: &Path) {
    make_ca(dir, "ca");
    make_ca(dir, "ca2");
    make_leaf(
        dir,
        "ca",
        "server",
        "/CN=localhost",
        "extendedKeyUsage = serverAuth\nsubjectAltName = DNS:localhost,IP:127.0.0.1",
        1001,
    );
    make_leaf(dir, "ca", "client1", "/O=longwire/CN=client1", "extendedKeyUsage = clientAuth", 1002);
    make_leaf(dir, "ca", "client2", "/CN=client2", "extendedKeyUsage = clientAuth", 1003);
    make_leaf(dir, "ca2", "rogue", "/CN=client1", "extendedKeyUsage = clientAuth", 1004);
    client_dir(dir, "good", Some("client1"));
    client_dir(dir, "other", Some("client2"));
    client_dir(dir, "rogue", Some("rogue"));
    client_dir(dir, "nocert", None);
    std::fs::write(
        dir.join("tls.toml"),
        "[[export]]\nname = \"secret\"\nuri = \"memory:?size=16M\"\ntls_allow = [\"CN=client1\"]\n",
    )
    .unwrap();
}

/// A server with exports `disk` (open) and `secret` (client1 only).
fn tls_server(mode: &str, client_ca: bool) -> Server {
    let mut args = vec![
        "--listen", "127.0.0.1:0", "--export", "disk=memory:?size=64M", "--tls", mode, "--tls-cert",
        "{dir}/server-cert.pem", "--tls-key", "{dir}/server-key.pem",
    ];
    if client_ca {
        args.extend(["--tls-ca", "{dir}/ca-cert.pem", "--config", "{dir}/tls.toml"]);
    }
    let server = Server::start_prepared(&args, make_pki);
    assert!(
        server.stderr_lines().iter().any(|l| l.contains("NBD TLS is on") && l.contains(mode)),
        "no TLS startup line\n{}",
        server.logs()
    );
    server
}

/// Python: connect over TLS with client directory `sub` to `export`.
const PY_TLS: &str = r#"
def tls_connect(sub, export):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(os.path.join(LW_DIR, sub))
    host, port = LW_TCP.rsplit(":", 1)
    h.set_export_name(export)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_tcp(host, port)
    return h
"#;

fn py(server: &Server, script: &str) -> String {
    server.python(&format!("{PY_TLS}\n{script}"))
}

#[test]
fn required_mode_serves_libnbd_over_tls_with_a_client_certificate() {
    let server = tls_server("required", true);
    let out = py(
        &server,
        r#"
h = tls_connect("good", "disk")
check(h.get_tls_negotiated(), "TLS negotiated")
check_eq(h.get_size(), 64 * MiB, "size")
check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation after TLS")
data = pat(1, 1 * MiB)
h.pwrite(data, 3 * MiB)
h.flush()
check_buf(h.pread(1 * MiB, 3 * MiB), data, "read back over TLS")
h.shutdown()
h = tls_connect("good", "secret")
h.pwrite(pat(2, 4096), 0)
check_buf(h.pread(4096, 0), pat(2, 4096), "allow-listed export")
print("OK", h.get_tls_negotiated())
h.shutdown()
"#,
    );
    assert!(out.contains("OK True"), "{out}");
    assert_no_panics(&server);
}

#[test]
fn required_mode_refuses_plaintext_clients_with_tls_reqd() {
    let server = tls_server("required", false);
    // libnbd without TLS fails.
    py(
        &server,
        r#"
h = nbd.NBD()
expect_error(None, "plaintext connect", h.connect_uri, uri("disk"))
"#,
    );
    // On the wire: everything but STARTTLS/ABORT is TLS_REQD, LIST included.
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.expect_opt_error(OPT_LIST, &[], REP_ERR_TLS_REQD);
    c.expect_opt_error(OPT_STRUCTURED_REPLY, &[], REP_ERR_TLS_REQD);
    let go = Be::new().u32(4).raw(b"disk").u16(0);
    c.expect_opt_error(OPT_GO, &go.0, REP_ERR_TLS_REQD);
    // EXPORT_NAME before TLS: disconnect.
    c.option(OPT_EXPORT_NAME, b"disk");
    c.expect_closed("EXPORT_NAME before STARTTLS in required mode");
    // STARTTLS is acknowledged (then the client would start TLS).
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.expect_ack(OPT_STARTTLS, &[]);
    drop(c);
    // Libnbd over TLS without client certificates works (no --tls-ca).
    py(
        &server,
        r#"
h = tls_connect("nocert", "disk")
h.pwrite(b"x" * 512, 0)
check_eq(h.pread(512, 0), b"x" * 512, "read back")
"#,
    );
}

#[test]
fn optional_mode_serves_plaintext_and_tls_clients() {
    let server = tls_server("optional", false);
    py(
        &server,
        r#"
h = nbd.NBD()
h.connect_uri(uri("disk"))
check(not h.get_tls_negotiated(), "plaintext")
h.pwrite(pat(3, 65536), 0)
h.shutdown()
h = tls_connect("nocert", "disk")
check(h.get_tls_negotiated(), "TLS")
check_buf(h.pread(65536, 0), pat(3, 65536), "plaintext write read over TLS")
"#,
    );
}

#[test]
fn unknown_ca_and_missing_client_certificates_fail_the_tls_handshake() {
    let server = tls_server("required", true);
    py(
        &server,
        r#"
for sub in ["rogue", "nocert"]:
    expect_error(None, "client dir " + sub, tls_connect, sub, "disk")
"#,
    );
    let logs = server.logs();
    assert!(!logs.contains("client connected"), "a client got in:\n{logs}");
}

#[test]
fn disallowed_subject_is_refused_from_the_allow_listed_export() {
    let server = tls_server("required", true);
    let out = py(
        &server,
        r#"
# client2 is a valid client, but not on secret's list.
h = tls_connect("other", "disk")
h.shutdown()
e = expect_error(None, "client2 on secret", tls_connect, "other", "secret")
print("REFUSED", e.string)
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(os.path.join(LW_DIR, "other"))
h.set_opt_mode(True)
host, port = LW_TCP.rsplit(":", 1)
h.connect_tcp(host, port)
names = []
h.opt_list(lambda name, desc: names.append(name) or 0)
check_eq(names, ["disk"], "exports listed to client2")
h.opt_abort()
"#,
    );
    assert!(out.contains("REFUSED"), "{out}");
}

#[test]
fn tls_works_on_unix_sockets_and_refusals_are_logged() {
    let args = [
        "--unix", "{dir}/nbd.sock", "--export", "disk=memory:?size=64M", "--tls-cert", "{dir}/server-cert.pem",
        "--tls-key", "{dir}/server-key.pem", "--tls-ca", "{dir}/ca-cert.pem", "--config", "{dir}/tls.toml",
    ];
    let server = Server::start_prepared(&args, make_pki);
    assert!(server.stderr_lines().iter().any(|l| l.contains("nbds+unix://")), "{}", server.logs());
    py(
        &server,
        r#"
def unix_tls(sub, export):
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri("nbds+unix:///%s?socket=%s&tls-certificates=%s" % (export, LW_UNIX, os.path.join(LW_DIR, sub)))
    return h
h = unix_tls("good", "secret")
check(h.get_tls_negotiated(), "TLS on the unix socket")
h.pwrite(pat(4, 8192), 4096)
check_buf(h.pread(8192, 4096), pat(4, 8192), "read back")
h.shutdown()
expect_error(None, "client2 on secret", unix_tls, "other", "secret")
"#,
    );
    let logs = server.logs();
    assert!(logs.contains("refused: client certificate CN=client2 may not use export \"secret\""), "{logs}");
}

#[test]
fn qemu_reads_and_writes_over_tls() {
    let server = tls_server("required", true);
    let port = server.tcp_addr().port();
    let object = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", server.dir().join("good").display());
    let opts = format!("driver=nbd,host=127.0.0.1,port={port},export=disk,tls-creds=tls0");
    require_tool("qemu-img");
    let info = run_cmd(
        command("qemu-img").args(["info", "--object", &object, "--image-opts", &opts]),
        &server.logs(),
    );
    assert!(info.contains("64 MiB"), "{info}");
    require_tool("qemu-io");
    let io = run_cmd(
        command("qemu-io").args([
            "--object",
            &object,
            "--image-opts",
            &opts,
            "-c",
            "write -P 0x5a 1M 256k",
            "-c",
            "read -P 0x5a 1M 256k",
            "-c",
            "read -P 0 0 64k",
        ]),
        &server.logs(),
    );
    assert!(!io.to_lowercase().contains("fail"), "{io}");
    // qemu with a certificate from the unknown CA cannot connect.
    let rogue = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", server.dir().join("rogue").display());
    let out = run_unchecked(
        command("qemu-img").args(["info", "--object", &rogue, "--image-opts", &opts]),
        &server.logs(),
    );
    assert!(!out.status.success(), "qemu-img with a rogue certificate succeeded");
}

#[test]
fn bad_tls_settings_are_clear_errors() {
    let bin = server_binary();
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = command(&bin).current_dir(dir.path()).arg("serve").args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let base = ["--no-iscsi", "--listen", "127.0.0.1:0", "--export", "d=memory:?size=1M"];
    let err = run(&[&base[..], &["--tls-cert", "/nonexistent/x.pem", "--tls-key", "/nonexistent/k.pem"]].concat());
    assert!(err.contains("cannot read TLS certificate /nonexistent/x.pem"), "{err}");
    std::fs::write(dir.path().join("junk.pem"), "not a certificate\n").unwrap();
    let err = run(&[&base[..], &["--tls-cert", "junk.pem", "--tls-key", "junk.pem"]].concat());
    assert!(err.contains("cannot read TLS certificate junk.pem"), "{err}");
    let err = run(&[&base[..], &["--tls", "required"]].concat());
    assert!(err.contains("--tls-cert"), "{err}");
    let err = run(&[&base[..], &["--tls", "sometimes"]].concat());
    assert!(err.contains("sometimes"), "{err}");
}
