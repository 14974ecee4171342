//! longwire's own NBD client over TLS (`nbds://`, `NBD_OPT_STARTTLS`)
//! against the real `longwire serve --tls required`, with certificates made
//! by the `openssl` CLI (see `common::pki`): reads and writes with a client
//! certificate, the errors for an untrusted server, a missing CA and a
//! plaintext client, reconnecting over TLS after a server restart, and
//! `longwire copy` to and from an `nbds://` export.
//!
//! Run: `cargo test -p longwire --test client_tls`.

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::pki::*;
use common::*;
use longwire_core::Volume;
use longwire_nbd::client::{ClientConfig, ClientError, NbdVolume, NegotiationError, ReconnectPolicy};

/// CA `ca` issuing the server (localhost, 127.0.0.1) and `client1`; an
/// unrelated CA `ca2`. Client directories: `good` (trusts ca, presents
/// client1), `nocert` (trusts ca only), `wrongca` (trusts ca2, presents
/// client1).
fn make_pki(dir: &Path) {
    make_ca(dir, "ca");
    make_ca(dir, "ca2");
    make_leaf(
        dir,
        "ca",
        "server",
        "/CN=localhost",
        "extendedKeyUsage = serverAuth\nsubjectAltName = DNS:localhost,IP:127.0.0.1",
        2001,
    );
    make_leaf(dir, "ca", "client1", "/CN=client1", "extendedKeyUsage = clientAuth", 2002);
    client_dir(dir, "good", Some("client1"));
    client_dir(dir, "nocert", None);
    client_dir(dir, "wrongca", Some("client1"));
    std::fs::copy(dir.join("ca2-cert.pem"), dir.join("wrongca/ca-cert.pem")).unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `longwire serve --tls required` with client certificates required, on
/// a fixed port (so a restart comes back on it), export `disk` a 16 MiB
/// file in the test directory (so its data survives the restart).
fn tls_server() -> Server {
    let listen = format!("127.0.0.1:{}", free_port());
    let args = [
        "--listen", &listen, "--export", "disk=file:{dir}/disk.img?size=16M", "--tls", "required", "--tls-cert",
        "{dir}/server-cert.pem", "--tls-key", "{dir}/server-key.pem", "--tls-ca", "{dir}/ca-cert.pem",
    ];
    Server::start_prepared(&args, make_pki)
}

fn nbds(server: &Server, host: &str, export: &str, certs: &str) -> String {
    format!(
        "nbds://{host}:{}/{export}?tls-certificates={}",
        server.tcp_addr().port(),
        server.dir().join(certs).display()
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn quick() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(10),
        reconnect: ReconnectPolicy {
            enabled: true,
            initial_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
            give_up_after: Some(Duration::from_secs(30)),
        },
        ..ClientConfig::default()
    }
}

#[test]
fn reads_and_writes_over_tls_with_a_client_certificate() {
    let server = tls_server();
    let rt = runtime();
    rt.block_on(async {
        // An IP address as the server name (the certificate has IP:127.0.0.1).
        let vol = NbdVolume::connect(&nbds(&server, "127.0.0.1", "disk", "good"), quick()).await.unwrap();
        assert_eq!(vol.size(), 16 << 20);
        let data = pattern(1, 256 << 10);
        vol.write(4096, Bytes::from(data.clone()), false).await.unwrap();
        vol.flush().await.unwrap();
        assert_eq!(&vol.read(4096, data.len()).await.unwrap()[..], &data[..]);

        // A DNS name, and the paths given in ClientConfig rather than the URI.
        let d = server.dir();
        let cfg = ClientConfig {
            tls_ca: Some(d.join("ca-cert.pem")),
            tls_cert: Some(d.join("client1-cert.pem")),
            tls_key: Some(d.join("client1-key.pem")),
            ..quick()
        };
        let uri = format!("nbds://localhost:{}/disk", server.tcp_addr().port());
        let vol2 = NbdVolume::connect(&uri, cfg).await.unwrap();
        assert_eq!(&vol2.read(4096, data.len()).await.unwrap()[..], &data[..]);
    });
}

#[test]
fn tls_errors_are_clear() {
    let mut server = tls_server();
    let rt = runtime();
    rt.block_on(async {
        // The client does not trust the server's CA.
        let e = NbdVolume::connect(&nbds(&server, "127.0.0.1", "disk", "wrongca"), quick()).await.unwrap_err();
        assert!(matches!(&e, ClientError::Tls { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("TLS handshake") && msg.contains("invalid peer certificate"), "{msg}");
        assert!(msg.contains("wrongca/ca-cert.pem"), "{msg}");

        // The certificate does not name the host asked for.
        let uri = format!("{}&tls-hostname=elsewhere.example", nbds(&server, "127.0.0.1", "disk", "good"));
        let e = NbdVolume::connect(&uri, quick()).await.unwrap_err();
        assert!(matches!(&e, ClientError::Tls { .. }), "{e}");

        // Plaintext against a TLS-only server.
        let e = NbdVolume::connect(&server.uri("disk"), quick()).await.unwrap_err();
        assert!(matches!(&e, ClientError::Handshake { error: NegotiationError::TlsRequired(_), .. }), "{e}");
        assert!(e.to_string().contains("requires TLS"), "{e}");

        // nbds:// without a CA, and with a directory lacking ca-cert.pem.
        let uri = format!("nbds://127.0.0.1:{}/disk", server.tcp_addr().port());
        let e = NbdVolume::connect(&uri, quick()).await.unwrap_err();
        assert!(matches!(&e, ClientError::TlsSetup { .. }) && e.to_string().contains("tls-certificates"), "{e}");
        let e = NbdVolume::connect(&nbds(&server, "127.0.0.1", "disk", "nonexistent"), quick()).await.unwrap_err();
        assert!(e.to_string().contains("nonexistent/ca-cert.pem"), "{e}");

        // No client certificate, but the server requires one.
        let e = NbdVolume::connect(&nbds(&server, "127.0.0.1", "disk", "nocert"), quick()).await.unwrap_err();
        assert!(matches!(&e, ClientError::Tls { .. }) && e.to_string().contains("client certificate"), "{e}");
    });
    assert!(server.is_running(), "the server survived the bad clients\n{}", server.logs());
}

#[test]
fn reconnects_over_tls_after_a_server_restart() {
    let mut server = tls_server();
    let rt = runtime();
    let uri = nbds(&server, "127.0.0.1", "disk", "good");
    let data = pattern(7, 64 << 10);
    let vol = rt.block_on(async {
        let vol = NbdVolume::connect(&uri, quick()).await.unwrap();
        vol.write(0, Bytes::from(data.clone()), true).await.unwrap();
        vol.flush().await.unwrap();
        vol
    });
    server.restart();
    rt.block_on(async {
        assert_eq!(&vol.read(0, data.len()).await.unwrap()[..], &data[..]);
        vol.write(1 << 20, Bytes::from(data.clone()), false).await.unwrap();
        vol.flush().await.unwrap();
        assert_eq!(&vol.read(1 << 20, data.len()).await.unwrap()[..], &data[..]);
        let stats = vol.client().stats();
        assert!(stats.reconnects >= 1, "{stats:?}");
    });
}

#[test]
fn copy_to_and_from_an_nbds_export() {
    let server = tls_server();
    let d = server.dir();
    let src = d.join("src.raw");
    let back = d.join("back.raw");
    // Data with a hole in the middle.
    let mut img = pattern(3, 4 << 20);
    img[1 << 20..3 << 20].fill(0);
    img.resize(16 << 20, 0);
    std::fs::write(&src, &img).unwrap();
    let uri = nbds(&server, "127.0.0.1", "disk", "good");
    for (from, to) in [(format!("file:{}", src.display()), uri.clone()), (uri.clone(), format!("file:{}", back.display()))] {
        let (out, timed_out) = output_with_timeout(
            command(&server_binary()).args(["copy", &from, &to, "--no-progress"]).env("NO_COLOR", "1"),
            Duration::from_secs(60),
        );
        assert!(!timed_out && out.status.success(), "copy {from} {to}: {}", String::from_utf8_lossy(&out.stderr));
    }
    require_tool("cmp");
    run_cmd(command("cmp").arg(&src).arg(&back), "cmp");
}
