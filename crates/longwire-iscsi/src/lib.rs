//! iSCSI for longwire.
//!
//! - [`scsi`]: the SCSI block command set (SPC/SBC) executed against a
//!   [`longwire_core::Volume`]: CDB in, status + sense + data out. Knows
//!   nothing about iSCSI.
//! - The iSCSI layer (RFC 7143, error recovery level 0), each module with
//!   one job:
//!   - [`digest`]: CRC32C header and data digests;
//!   - [`pdu`]: the sans-IO PDU codec (framing, every opcode);
//!   - [`keys`]: text key=value parsing, continuation, operational
//!     negotiation (§13 result functions);
//!   - [`chap`]: CHAP responses and binary values;
//!   - [`login`]: the login state machine (stages, authentication,
//!     negotiation, login status codes);
//!   - [`window`]: the CmdSN window (ExpCmdSN/MaxCmdSN, queue depth);
//!   - [`dataout`]: write data collection (immediate data, unsolicited
//!     Data-Out, R2Ts, DataSN/BufferOffset checks);
//!   - [`session`]: the connection driver that runs a session over a socket;
//!   - `outbound`: what a session may queue for an initiator that does not
//!     read (the read-data budget, the backlog of other PDUs);
//!   - [`target`]: iSCSI targets (name, LUNs, access rules) and the
//!     [`ScsiBackend`] seam; [`backend`] plugs [`scsi::Target`] into it;
//!   - [`server`]: the listener side: login, session registry, TSIH,
//!     reinstatement, resets across sessions;
//!   - [`metrics`]: how SCSI commands are counted in the statistics;
//!   - [`initiator`]: a minimal blocking initiator for tests and diagnostics.
#![forbid(unsafe_code)]

pub mod backend;
pub mod chap;
pub mod dataout;
pub mod digest;
pub mod initiator;
pub mod keys;
pub mod login;
pub mod metrics;
mod outbound;
pub mod pdu;
pub mod scsi;
pub mod server;
pub mod session;
pub mod target;
pub mod window;

pub use server::{IscsiConfig, IscsiServer};
pub use target::{IscsiTarget, ScsiBackend};
