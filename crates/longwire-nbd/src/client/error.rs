//! What can go wrong in the client, and how it maps onto [`VolumeError`].

use std::io;

use longwire_core::VolumeError;

use super::negotiate::NegotiationError;
use super::uri::UriError;
use crate::proto::*;

/// Why a client operation failed. Cloneable: one failure (a lost server, a
/// changed export) is reported to every request it affects.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Uri(#[from] UriError),
    /// The client's TLS configuration is unusable (a missing or unreadable
    /// certificate or key); reconnecting cannot help.
    #[error("TLS setup for {uri} failed: {message}")]
    TlsSetup { uri: String, message: String },
    /// The TLS handshake with the server failed (an untrusted certificate,
    /// a wrong name, a rejected client certificate…).
    #[error("TLS handshake with {address} failed: {message}")]
    Tls { address: String, message: String },
    #[error("cannot connect to {address}: {message}")]
    Connect { address: String, kind: io::ErrorKind, message: String },
    #[error("NBD handshake with {address} failed: {error}")]
    Handshake { address: String, error: NegotiationError },
    /// The server broke the protocol while answering a request.
    #[error("{0}")]
    Protocol(String),
    /// The server answered with an error.
    #[error("{request} failed on the server: {} ({message})", errno_name(*.errno))]
    Server { request: String, errno: u32, message: String },
    /// The request's deadline passed.
    #[error("{0}")]
    TimedOut(String),
    /// A reconnect reached an export that is not the one we had.
    #[error("{0}")]
    ExportChanged(String),
    /// The connection stayed down longer than the reconnect policy allows.
    #[error("{0}")]
    GaveUp(String),
    /// The request cannot be sent as asked (e.g. too long for compact headers).
    #[error("{0}")]
    Invalid(String),
    #[error("the NBD client is closed")]
    Closed,
}

/// The spec's name for an NBD error value.
pub fn errno_name(errno: u32) -> String {
    match errno {
        EPERM => "NBD_EPERM".into(),
        EIO => "NBD_EIO".into(),
        ENOMEM => "NBD_ENOMEM".into(),
        EINVAL => "NBD_EINVAL".into(),
        ENOSPC => "NBD_ENOSPC".into(),
        EOVERFLOW => "NBD_EOVERFLOW".into(),
        ENOTSUP => "NBD_ENOTSUP".into(),
        ESHUTDOWN => "NBD_ESHUTDOWN".into(),
        e => format!("NBD error {e}"),
    }
}

impl From<ClientError> for VolumeError {
    fn from(e: ClientError) -> Self {
        let msg = e.to_string();
        match e {
            ClientError::Server { errno, message, .. } => {
                let detail = if message.is_empty() { msg } else { message };
                match errno {
                    EPERM => VolumeError::ReadOnly,
                    ENOSPC => VolumeError::NoSpace(detail),
                    EINVAL => VolumeError::Invalid(detail),
                    ENOTSUP => VolumeError::NotSupported(detail),
                    EOVERFLOW => VolumeError::Overflow(detail),
                    ESHUTDOWN => VolumeError::Shutdown,
                    _ => VolumeError::Io(io::Error::other(detail)),
                }
            }
            ClientError::Invalid(m) => VolumeError::Invalid(m),
            ClientError::TimedOut(_) => VolumeError::Io(io::Error::new(io::ErrorKind::TimedOut, msg)),
            ClientError::Closed | ClientError::GaveUp(_) => VolumeError::Io(io::Error::new(io::ErrorKind::NotConnected, msg)),
            ClientError::Connect { kind, .. } => VolumeError::Io(io::Error::new(kind, msg)),
            _ => VolumeError::Io(io::Error::other(msg)),
        }
    }
}
