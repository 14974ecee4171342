//! NBD for longwire: the wire format as a sans-IO codec ([`handshake`],
//! [`transmission`]) and the session driver that runs it over a socket
//! ([`server`]).
#![forbid(unsafe_code)]

pub mod client;
pub mod handshake;
pub mod limits;
pub mod proto;
pub mod server;
pub mod tls;
pub mod transmission;

pub use limits::{ExportLimits, ExportPermit};
pub use server::{NbdServer, ServerConfig};
pub use tls::{NbdTls, TlsMode, TlsPolicy};
