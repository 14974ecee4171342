//! Client tunables.

use std::path::PathBuf;
use std::time::Duration;

/// How a lost connection is re-established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Reconnect at all. When false a lost connection fails every
    /// outstanding request and the client is finished.
    pub enabled: bool,
    /// Wait after the first failed attempt (the first attempt is immediate).
    pub initial_delay: Duration,
    /// The wait doubles after each failed attempt up to this.
    pub max_delay: Duration,
    /// Stop trying once the connection has been down this long: every
    /// queued request fails, and so does every later one. `None` retries
    /// forever (requests still fail at their deadline).
    pub give_up_after: Option<Duration>,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            enabled: true,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            give_up_after: Some(Duration::from_secs(60)),
        }
    }
}

/// Everything [`NbdClient`](super::NbdClient) can be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The longest one request may take, from the call until its reply,
    /// including time spent queued behind a reconnect. A request that
    /// cannot finish in time fails with a "did not complete within" error.
    /// A connection that has had requests outstanding without hearing
    /// anything from the server for this long is considered dead and is
    /// replaced. Default 30 s.
    pub request_timeout: Duration,
    /// Connecting (TCP or unix) plus the whole NBD handshake must finish
    /// within this, on the first connect and on every reconnect attempt.
    /// Default 10 s.
    pub connect_timeout: Duration,
    pub reconnect: ReconnectPolicy,
    /// Connections to spread requests over when the server advertises
    /// `NBD_FLAG_CAN_MULTI_CONN` (otherwise one is used). Default 1.
    pub connections: usize,
    /// Requests one connection may have outstanding. Default 64.
    pub max_in_flight: usize,
    /// Largest read or write payload sent in one request ([`NbdVolume`]
    /// splits larger ones); the server's advertised maximum applies too.
    /// Default 32 MiB.
    ///
    /// [`NbdVolume`]: super::NbdVolume
    pub max_request: u32,
    /// Try `NBD_OPT_EXTENDED_HEADERS`. Default true.
    pub extended_headers: bool,
    /// Try `NBD_OPT_STRUCTURED_REPLY` (when extended headers are not
    /// agreed). Default true.
    pub structured_replies: bool,
    /// Select `base:allocation` for block status. Default true.
    pub block_status: bool,
    /// TLS (`nbds://` URIs only): the CA certificate (PEM) the server's
    /// certificate must chain to. Overrides `ca-cert.pem` from the URI's
    /// `tls-certificates=DIR`; one of the two is required.
    pub tls_ca: Option<PathBuf>,
    /// TLS client certificate chain (PEM), presented when the server asks.
    /// Overrides `client-cert.pem` from `tls-certificates=DIR`; needs
    /// [`tls_key`](Self::tls_key).
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of [`tls_cert`](Self::tls_cert). Overrides
    /// `client-key.pem` from `tls-certificates=DIR`.
    pub tls_key: Option<PathBuf>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            reconnect: ReconnectPolicy::default(),
            connections: 1,
            max_in_flight: 64,
            max_request: 32 << 20,
            extended_headers: true,
            structured_replies: true,
            block_status: true,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}
