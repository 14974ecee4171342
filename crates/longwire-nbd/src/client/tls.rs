//! The client's TLS configuration: which CA to trust and which certificate
//! to present, from the URI's `tls-certificates=DIR` (libnbd's layout:
//! `ca-cert.pem`, `client-cert.pem`, `client-key.pem`) or from
//! [`ClientConfig`]'s paths, which take precedence.
//!
//! There is deliberately no fallback to the system's roots: NBD servers
//! almost always carry certificates from a private CA, so an `nbds://`
//! URI without a CA is reported instead of failing obscurely later.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::RootCertStore;
use tokio_rustls::TlsConnector;

use super::config::ClientConfig;
use super::error::ClientError;
use super::uri::NbdUri;
use crate::tls::read_certs;

/// Everything needed to run STARTTLS's handshake; loaded once per client
/// and reused on every (re)connect.
#[derive(Clone)]
pub(crate) struct ClientTls {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
    /// The CA file, for error messages.
    pub ca: PathBuf,
}

/// Load the TLS configuration for `uri`; `None` when it is not a TLS URI.
pub(crate) fn load(uri: &NbdUri, config: &ClientConfig) -> Result<Option<ClientTls>, ClientError> {
    if !uri.tls {
        return Ok(None);
    }
    let err = |message: String| ClientError::TlsSetup { uri: uri.to_string(), message };
    let dir = uri.tls_certificates.as_deref();
    let in_dir = |name: &str| dir.map(|d| d.join(name));
    let ca = config.tls_ca.clone().or_else(|| in_dir("ca-cert.pem")).ok_or_else(|| {
        err("no CA certificate to check the server against: add tls-certificates=DIR to the URI (DIR holding \
             ca-cert.pem, and client-cert.pem + client-key.pem for a client certificate)"
            .into())
    })?;
    // A client certificate: from the config, else the directory's if it has one.
    let cert = config.tls_cert.clone().or_else(|| in_dir("client-cert.pem").filter(|p| p.exists()));
    let key = match &cert {
        None => None,
        Some(cert) => Some(config.tls_key.clone().or_else(|| in_dir("client-key.pem")).ok_or_else(|| {
            err(format!("client certificate {} has no key: set the key path (tls_key)", cert.display()))
        })?),
    };

    let mut roots = RootCertStore::empty();
    for c in read_certs(&ca, "TLS CA certificate").map_err(|e| err(e.to_string()))? {
        roots.add(c).map_err(|e| err(format!("cannot use TLS CA certificate {}: {e}", ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots);
    let tls_config = match (&cert, &key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert, "TLS client certificate").map_err(|e| err(e.to_string()))?;
            let key_der = read_key(key).map_err(err)?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                err(format!("TLS client certificate {} and key {} do not work together: {e}", cert.display(), key.display()))
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    let name = uri.tls_server_name();
    let server_name = ServerName::try_from(name.clone())
        .map_err(|e| err(format!("{name:?} cannot be checked against a certificate: {e}")))?;
    Ok(Some(ClientTls { connector: TlsConnector::from(Arc::new(tls_config)), server_name, ca }))
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read TLS client key {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("cannot read TLS client key {}: no PEM private key found ({e})", path.display()))
}
