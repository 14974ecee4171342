//! iSCSI for longwire.
//!
//! - [`scsi`]: the SCSI block command set (SPC/SBC) executed against a
//!   [`longwire_core::Volume`]: CDB in, status + sense + data out. Knows
//!   nothing about iSCSI.
//! - The iSCSI layer (RFC 7143, error recovery level 0): sans-IO PDU codec,
//!   login/negotiation, and the session driver that carries SCSI commands
//!   to a [`scsi::Target`].

pub mod scsi;
