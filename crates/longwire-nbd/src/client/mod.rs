//! An NBD client: a pipelined, reconnecting connection to one export, and
//! [`NbdVolume`], which presents it as a longwire [`Volume`].
//!
//! Layers, bottom up:
//!
//! - [`codec`] and [`negotiate`] — sans-IO: request encoding, reply
//!   decoding and assembly (simple, structured and extended replies, every
//!   length checked), and the client side of the fixed-newstyle handshake.
//! - [`uri`] — `nbd://host[:port]/export`, `nbd+unix:///export?socket=…`,
//!   and the TLS forms `nbds://…?tls-certificates=DIR`, `nbds+unix://…`
//!   (`NBD_OPT_STARTTLS`, rustls; re-done on every reconnect).
//! - [`NbdClient`] — the async driver: many requests in flight per
//!   connection, replies matched by cookie, several connections when the
//!   server allows it (`CAN_MULTI_CONN`), a deadline on every request, and
//!   reconnection with exponential backoff that re-sends what was in flight
//!   (see the `driver` module for why that is safe).
//! - [`NbdVolume`] — range checks, splitting, fallbacks for what the server
//!   does not advertise, and errno mapping back to [`VolumeError`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use longwire_core::Volume;
//! use longwire_nbd::client::{ClientConfig, NbdVolume};
//!
//! let vol = NbdVolume::connect("nbd://127.0.0.1/default", ClientConfig::default()).await?;
//! vol.write(0, bytes::Bytes::from_static(b"hello"), false).await?;
//! vol.flush().await?;
//! # Ok(()) }
//! ```
//!
//! [`Volume`]: longwire_core::Volume
//! [`VolumeError`]: longwire_core::VolumeError

pub mod codec;
mod config;
mod connection;
mod driver;
mod error;
pub mod negotiate;
mod tls;
pub mod uri;
mod volume;

pub use codec::Completed;
pub use config::{ClientConfig, ReconnectPolicy};
pub use driver::{ClientStats, NbdClient};
pub use error::{errno_name, ClientError};
pub use negotiate::{ExportInfo, NegotiationError};
pub use uri::{Address, NbdUri, UriError};
pub use volume::NbdVolume;
