//! TLS for NBD (`NBD_OPT_STARTTLS`): the server's rustls configuration,
//! loaded from PEM files, and the policy the sans-IO handshake applies
//! (the mode, and per-export allow-lists of client certificate subjects).
//!
//! Only TLS 1.3 is offered, with rustls' `ring` provider. With a CA
//! configured, clients must present a certificate issued by it (checked
//! during the TLS handshake: a client without one, or with one from another
//! CA, never gets past STARTTLS); the Common Name of its subject is then
//! what export allow-lists match against.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio_rustls::TlsAcceptor;

/// How a server treats TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS: STARTTLS is refused with `NBD_REP_ERR_POLICY`.
    #[default]
    Off,
    /// STARTTLS is accepted, plaintext clients are served too (exports with
    /// an allow-list still require TLS).
    Optional,
    /// Nothing but STARTTLS and ABORT is accepted before TLS is up.
    Required,
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::Optional => "optional",
            TlsMode::Required => "required",
        })
    }
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(TlsMode::Off),
            "optional" => Ok(TlsMode::Optional),
            "required" => Ok(TlsMode::Required),
            _ => Err(format!("TLS mode {s:?} is not one of off, optional, required")),
        }
    }
}

/// What the handshake needs to decide about TLS; no crypto in here, so the
/// state machine stays testable without certificates.
#[derive(Debug, Clone, Default)]
pub struct TlsPolicy {
    pub mode: TlsMode,
    /// Export name → Common Names of the client certificates allowed to use
    /// it. Exports not in the map are open to every client that got this
    /// far (in `required` mode: every client with a valid certificate, when
    /// a CA is configured).
    pub allow: HashMap<String, Vec<String>>,
}

impl TlsPolicy {
    /// May a client with this TLS state use `export`? `Err` carries the
    /// option reply error and a message.
    pub fn check_export(&self, export: &str, tls_active: bool, peer_cn: Option<&str>) -> Result<(), (u32, String)> {
        use crate::proto::{REP_ERR_POLICY, REP_ERR_TLS_REQD};
        let Some(allowed) = self.allow.get(export) else { return Ok(()) };
        if !tls_active {
            return Err((REP_ERR_TLS_REQD, format!("export {export:?} requires TLS with a client certificate")));
        }
        match peer_cn {
            Some(cn) if allowed.iter().any(|a| a == cn) => Ok(()),
            Some(cn) => Err((REP_ERR_POLICY, format!("client certificate CN={cn} may not use export {export:?}"))),
            None => Err((REP_ERR_POLICY, format!("export {export:?} requires a client certificate"))),
        }
    }
}

/// A configuration error (unreadable or unparsable file, bad key).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsSetupError(String);

/// Everything the session driver needs for TLS.
#[derive(Clone)]
pub struct NbdTls {
    pub policy: Arc<TlsPolicy>,
    pub acceptor: TlsAcceptor,
    /// Client certificates are requested and verified.
    pub client_auth: bool,
}

impl fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdTls").field("policy", &self.policy).field("client_auth", &self.client_auth).finish()
    }
}

impl NbdTls {
    /// Load the server certificate chain and key (PEM), and the CA that
    /// client certificates must chain to (PEM; none: no client
    /// certificates are requested).
    pub fn load(policy: TlsPolicy, cert: &Path, key: &Path, ca: Option<&Path>) -> Result<NbdTls, TlsSetupError> {
        let err = |m: String| TlsSetupError(m);
        let certs = read_certs(cert, "TLS certificate")?;
        let key_pem =
            std::fs::read(key).map_err(|e| err(format!("cannot read TLS key {}: {e}", key.display())))?;
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| err(format!("cannot read TLS key {}: no PEM private key found ({e})", key.display())))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| err(format!("TLS setup failed: {e}")))?;
        let builder = match ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in read_certs(ca, "TLS CA certificate")? {
                    roots
                        .add(c)
                        .map_err(|e| err(format!("cannot read TLS CA certificate {}: {e}", ca.display())))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| err(format!("cannot use TLS CA certificate {}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(certs, key_der).map_err(|e| {
            err(format!("TLS certificate {} and key {} do not work together: {e}", cert.display(), key.display()))
        })?;
        Ok(NbdTls { policy: Arc::new(policy), acceptor: TlsAcceptor::from(Arc::new(config)), client_auth: ca.is_some() })
    }
}

pub(crate) fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let pem = std::fs::read(path).map_err(|e| TlsSetupError(format!("cannot read {what} {}: {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError(format!("cannot read {what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsSetupError(format!("cannot read {what} {}: no PEM certificate found", path.display())));
    }
    Ok(certs)
}

/// The Common Name of a DER certificate's subject (the last CN attribute,
/// as the most specific one), if it has one in a string type we can read.
pub fn subject_common_name(der: &[u8]) -> Option<String> {
    // Certificate ::= SEQUENCE { tbsCertificate, ... }
    let (cert, _) = der_element(der, 0x30)?;
    let (mut tbs, _) = der_element(cert, 0x30)?;
    // tbsCertificate: [0] version (optional), serial, signature, issuer,
    // validity, subject.
    if tbs.first() == Some(&0xa0) {
        tbs = der_element(tbs, 0xa0)?.1;
    }
    let (_, rest) = der_element(tbs, 0x02)?; // serialNumber
    let (_, rest) = der_element(rest, 0x30)?; // signature
    let (_, rest) = der_element(rest, 0x30)?; // issuer
    let (_, rest) = der_element(rest, 0x30)?; // validity
    let (mut name, _) = der_element(rest, 0x30)?; // subject
    const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
    let mut cn = None;
    while !name.is_empty() {
        // RelativeDistinguishedName ::= SET OF AttributeTypeAndValue
        let (mut rdn, rest) = der_element(name, 0x31)?;
        name = rest;
        while !rdn.is_empty() {
            let (atv, rest) = der_element(rdn, 0x30)?;
            rdn = rest;
            let (oid, value) = der_element(atv, 0x06)?;
            if oid != OID_CN {
                continue;
            }
            let (&tag, _) = value.split_first()?;
            let (s, _) = der_element(value, tag)?;
            cn = match tag {
                // UTF8String, PrintableString, TeletexString, IA5String
                0x0c | 0x13 | 0x14 | 0x16 => Some(String::from_utf8_lossy(s).into_owned()),
                // BMPString (UCS-2)
                0x1e => Some(String::from_utf16_lossy(
                    &s.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect::<Vec<_>>(),
                )),
                _ => cn,
            };
        }
    }
    cn
}

/// One DER element with the given tag: (contents, what follows).
fn der_element(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = b.split_first()?;
    if t != tag {
        return None;
    }
    let (&l0, mut rest) = rest.split_first()?;
    let len = if l0 < 0x80 {
        l0 as usize
    } else {
        let n = (l0 & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &x| (a << 8) | x as usize);
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}
