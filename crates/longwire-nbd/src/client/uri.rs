//! NBD URIs, as in the NBD project's `doc/uri.md` (the subset a client
//! without TLS needs):
//!
//! - `nbd://host[:port]/export` — TCP, port 10809 by default; IPv6 hosts in
//!   brackets (`nbd://[::1]:10809/disk`).
//! - `nbd+unix:///export?socket=/path` — a unix socket.
//! - `nbds://host[:port]/export`, `nbds+unix:///export?socket=/path` — the
//!   same over TLS (`NBD_OPT_STARTTLS`). As in libnbd,
//!   `tls-certificates=DIR` names a directory holding `ca-cert.pem` (the CA
//!   the server's certificate must chain to) and, for client
//!   authentication, `client-cert.pem` and `client-key.pem`;
//!   `tls-hostname=NAME` overrides the name the server certificate is
//!   checked against (default: the host, or `localhost` for unix sockets).
//!   Other `tls-*` parameters are accepted and ignored.
//!
//! The export name is the path without its leading `/`, percent-decoded;
//! an empty name asks for the server's default export.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The default NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A TCP host (name or IP literal, without brackets) and port.
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A parsed NBD URI: where to connect and which export to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub address: Address,
    pub export: String,
    /// `nbds` / `nbds+unix`: the server is to be reached over TLS.
    pub tls: bool,
    /// `tls-certificates=DIR`: `ca-cert.pem`, optionally `client-cert.pem`
    /// and `client-key.pem`.
    pub tls_certificates: Option<PathBuf>,
    /// `tls-hostname=NAME`: the name to check the server certificate against.
    pub tls_hostname: Option<String>,
}

impl NbdUri {
    /// A TCP target.
    pub fn tcp(host: impl Into<String>, port: u16, export: impl Into<String>) -> Self {
        NbdUri { address: Address::Tcp { host: host.into(), port }, export: export.into(), tls: false, tls_certificates: None, tls_hostname: None }
    }

    /// The same target over TLS, trusting the certificates in `dir` (see
    /// [`NbdUri::tls_certificates`]).
    pub fn with_tls(mut self, dir: impl Into<PathBuf>) -> Self {
        self.tls = true;
        self.tls_certificates = Some(dir.into());
        self
    }

    /// The name the server's certificate must carry.
    pub fn tls_server_name(&self) -> String {
        match (&self.tls_hostname, &self.address) {
            (Some(h), _) => h.clone(),
            (None, Address::Tcp { host, .. }) => host.clone(),
            (None, Address::Unix(_)) => "localhost".to_string(),
        }
    }

    /// A unix socket target.
    pub fn unix(path: impl Into<PathBuf>, export: impl Into<String>) -> Self {
        NbdUri { address: Address::Unix(path.into()), export: export.into(), tls: false, tls_certificates: None, tls_hostname: None }
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls { "s" } else { "" };
        let export = percent_encode(&self.export);
        let mut query = Vec::new();
        if let Address::Unix(p) = &self.address {
            query.push(format!("socket={}", p.display()));
        }
        if let Some(d) = &self.tls_certificates {
            query.push(format!("tls-certificates={}", d.display()));
        }
        if let Some(h) = &self.tls_hostname {
            query.push(format!("tls-hostname={h}"));
        }
        let query = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
        match &self.address {
            Address::Tcp { .. } => write!(f, "nbd{s}://{}/{export}{query}", self.address),
            Address::Unix(_) => write!(f, "nbd{s}+unix:///{export}{query}"),
        }
    }
}

/// A URI that cannot be parsed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("invalid NBD URI {uri:?}: {reason}")]
pub struct UriError {
    pub uri: String,
    pub reason: String,
}

impl FromStr for NbdUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<Self, UriError> {
        let err = |reason: &str| UriError { uri: uri.to_string(), reason: reason.to_string() };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| err("expected nbd://, nbd+unix://, nbds:// or nbds+unix://"))?;
        let (tls, unix) = match scheme.to_ascii_lowercase().as_str() {
            "nbd" | "nbd+tcp" => (false, false),
            "nbds" | "nbds+tcp" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            _ => return Err(err(&format!("unknown scheme {scheme:?} (expected nbd, nbd+unix, nbds or nbds+unix)"))),
        };
        let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).ok_or_else(|| err("bad percent-encoding in the export name"))?;
        let mut socket = None;
        let mut tls_certificates = None;
        let mut tls_hostname = None;
        for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v).ok_or_else(|| err("bad percent-encoding in the query"))?;
            match k {
                "socket" => socket = Some(v),
                "tls-certificates" if tls => tls_certificates = Some(PathBuf::from(v)),
                "tls-hostname" if tls => tls_hostname = Some(v),
                _ if k.starts_with("tls-") && tls => {}
                _ if k.starts_with("tls-") => {
                    return Err(err(&format!("{k} only goes with nbds:// or nbds+unix:// (TLS)")))
                }
                _ => return Err(err(&format!("unsupported query parameter {k:?}"))),
            }
        }
        let address = if unix {
            if !authority.is_empty() {
                return Err(err("a unix-socket URI has no host (use nbd+unix:///export?socket=/path)"));
            }
            let socket = socket.ok_or_else(|| err("nbd+unix needs ?socket=/path/to/socket"))?;
            if socket.is_empty() {
                return Err(err("empty socket path"));
            }
            Address::Unix(PathBuf::from(socket))
        } else {
            if socket.is_some() {
                return Err(err("socket= only goes with nbd+unix://"));
            }
            let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
                let (h, after) = rest.split_once(']').ok_or_else(|| err("unclosed [ in the host"))?;
                match after {
                    "" => (h.to_string(), None),
                    p if p.starts_with(':') => (h.to_string(), Some(&p[1..])),
                    _ => return Err(err("unexpected text after ]")),
                }
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p)),
                    None => (authority.to_string(), None),
                }
            };
            let host = if host.is_empty() { "localhost".to_string() } else { host };
            let port = match port {
                None | Some("") => DEFAULT_PORT,
                Some(p) => p.parse::<u16>().map_err(|_| err(&format!("bad port {p:?}")))?,
            };
            Address::Tcp { host, port }
        };
        Ok(NbdUri { address, export, tls, tls_certificates, tls_hostname })
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~/".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_uris() {
        let u: NbdUri = "nbd://example.com:1234/disk".parse().unwrap();
        assert_eq!(u, NbdUri::tcp("example.com", 1234, "disk"));
        let u: NbdUri = "nbd://127.0.0.1/".parse().unwrap();
        assert_eq!(u, NbdUri::tcp("127.0.0.1", DEFAULT_PORT, ""));
        let u: NbdUri = "nbd://[::1]:99/a%20b/c".parse().unwrap();
        assert_eq!(u, NbdUri::tcp("::1", 99, "a b/c"));
        assert_eq!(u.to_string(), "nbd://[::1]:99/a%20b/c");
        let u: NbdUri = "nbd://host".parse().unwrap();
        assert_eq!(u, NbdUri::tcp("host", DEFAULT_PORT, ""));
    }

    #[test]
    fn parses_unix_uris() {
        let u: NbdUri = "nbd+unix:///default?socket=/run/lw.sock".parse().unwrap();
        assert_eq!(u, NbdUri::unix("/run/lw.sock", "default"));
        assert_eq!(u.to_string(), "nbd+unix:///default?socket=/run/lw.sock");
        let u: NbdUri = "nbd+unix://?socket=/tmp/s".parse().unwrap();
        assert_eq!(u, NbdUri::unix("/tmp/s", ""));
        assert!("nbd+unix:///x".parse::<NbdUri>().is_err());
        assert!("nbd+unix://host/x?socket=/s".parse::<NbdUri>().is_err());
    }

    #[test]
    fn recognises_tls_and_rejects_garbage() {
        let u: NbdUri = "nbds://h/x".parse().unwrap();
        assert!(u.tls);
        let u: NbdUri = "nbds+unix:///x?socket=/s&tls-verify-peer=false".parse().unwrap();
        assert!(u.tls);
        assert_eq!(u.tls_server_name(), "localhost");
        let u: NbdUri = "nbds://127.0.0.1:99/x?tls-certificates=/etc/pki/a%20b".parse().unwrap();
        assert_eq!(u, NbdUri::tcp("127.0.0.1", 99, "x").with_tls("/etc/pki/a b"));
        assert_eq!(u.tls_server_name(), "127.0.0.1");
        assert_eq!(u.to_string(), "nbds://127.0.0.1:99/x?tls-certificates=/etc/pki/a b");
        let u: NbdUri = "nbds+unix:///x?socket=/s&tls-certificates=/d&tls-hostname=srv".parse().unwrap();
        assert_eq!(u.tls_certificates.as_deref(), Some(std::path::Path::new("/d")));
        assert_eq!(u.tls_server_name(), "srv");
        assert_eq!(u.to_string().parse::<NbdUri>().unwrap(), u);
        assert!("nbd://h/x?tls-certificates=/d".parse::<NbdUri>().is_err());
        for bad in ["http://h/x", "nbd:/h", "nbd://h:99999/x", "nbd://h/x?foo=1", "nbd://[::1/x", "nbd://h/%zz"] {
            assert!(bad.parse::<NbdUri>().is_err(), "{bad} should not parse");
        }
    }
}
