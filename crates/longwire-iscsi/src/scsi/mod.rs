//! The SCSI block command set over a Volume.
//!
//! This is the seam between the iSCSI transport and the storage: the
//! session driver gathers a command's CDB and Data-Out bytes, calls
//! [`Target::execute`], and sends back the status, sense and Data-In.
//! Nothing here knows about PDUs.

use std::sync::Arc;

use bytes::Bytes;
use longwire_core::Volume;

/// SCSI status codes (SAM-5).
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
    pub const TASK_ABORTED: u8 = 0x40;
}

/// Identifies the I_T nexus a command arrived on (initiator port ↔ target
/// port). Reservations and unit attentions are kept per nexus.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// Initiator port name: the iSCSI initiator name plus ",i,0x" and the ISID.
    pub initiator_port: String,
    /// Target port name (target name plus ",t,0x" and the TPGT).
    pub target_port: String,
}

/// What a command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandResult {
    pub status: u8,
    /// Fixed-format sense data (SPC-4 4.5.3) when `status` is CHECK CONDITION.
    pub sense: Option<Bytes>,
    /// Data-In for the initiator, at most the length the CDB allows (the
    /// allocation length or transfer length). The transport truncates it to
    /// the initiator's Expected Data Transfer Length and reports residuals.
    pub data_in: Bytes,
}

/// Stable identity of a logical unit, shown in INQUIRY VPD pages.
#[derive(Debug, Clone)]
pub struct LunIdentity {
    /// Export name; also the basis of the unit serial number (VPD 0x80) and
    /// of the NAA designator (VPD 0x83), which must stay the same across
    /// restarts for the same export.
    pub export: String,
    /// Vendor (8 chars) and product (16 chars) for standard INQUIRY.
    pub vendor: String,
    pub product: String,
}

/// A logical unit: one Volume plus the SCSI state that goes with it
/// (reservations, unit attentions, mode pages).
pub struct LogicalUnit {
    pub volume: Arc<dyn Volume>,
    pub identity: LunIdentity,
}

/// The LUNs of one iSCSI target; handles target-level commands (REPORT
/// LUNS, commands addressed to LUNs that do not exist) and dispatches the
/// rest to the right [`LogicalUnit`].
pub struct Target {
    pub luns: Vec<(u64, Arc<LogicalUnit>)>,
}

/// The transport's view of a CDB, decided before any data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDirection {
    None,
    /// The command reads `len` bytes from the initiator (Data-Out).
    Out { len: u32 },
    /// The command returns up to `len` bytes to the initiator (Data-In).
    In { len: u32 },
}
