//! iSCSI targets: a name, the LUNs behind it, and who may log in.
//!
//! The transport talks to the SCSI layer through [`ScsiBackend`], which
//! [`crate::scsi::Target`] implements (see `backend.rs`); tests can plug
//! in a double.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::login::Access;
use crate::scsi::{CommandResult, DataDirection, Nexus};

/// What the session driver needs from the SCSI layer.
#[async_trait]
pub trait ScsiBackend: Send + Sync + 'static {
    /// The data phase a CDB implies, from the CDB alone.
    fn data_direction(&self, lun: u64, cdb: &[u8]) -> DataDirection;
    /// Run one command.
    async fn execute(&self, nexus: &Nexus, lun: u64, cdb: &[u8], data_out: Bytes) -> CommandResult;
    /// LOGICAL UNIT RESET: the transport has already aborted the tasks.
    fn lun_reset(&self, lun: u64);
    /// TARGET WARM/COLD RESET: the transport has already aborted the tasks.
    fn target_reset(&self, cold: bool);
    /// The I_T nexus ended (logout, connection loss, reinstatement).
    fn nexus_lost(&self, nexus: &Nexus);
    /// The export behind `lun`, for per-export statistics (None: not
    /// counted per export).
    fn lun_export(&self, _lun: u64) -> Option<String> {
        None
    }
}

/// The prefix of default target names: `iqn.2026-11.dev.longwire:<export>`.
pub const IQN_PREFIX: &str = "iqn.2026-11.dev.longwire";

/// The default target name of an export.
pub fn default_target_name(export: &str) -> String {
    format!("{IQN_PREFIX}:{export}")
}

/// One iSCSI target.
pub struct IscsiTarget {
    /// iSCSI name (iqn.…).
    pub name: String,
    /// LUN numbers, for task management checks and logs.
    pub luns: Vec<u64>,
    pub backend: Arc<dyn ScsiBackend>,
    /// CHAP, allowed initiators, alias.
    pub access: Access,
}

impl std::fmt::Debug for IscsiTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IscsiTarget").field("name", &self.name).field("luns", &self.luns).finish()
    }
}

impl IscsiTarget {
    pub fn has_lun(&self, lun: u64) -> bool {
        self.luns.contains(&lun)
    }
}

/// Check an iSCSI name (RFC 7143 §4.2.7): `iqn.`/`eui.`/`naa.` form, at most
/// 223 bytes, lowercase letters, digits, `-`, `.`, `:`.
pub fn valid_iscsi_name(name: &str) -> bool {
    let ok_chars = name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'.' | b':'));
    !name.is_empty()
        && name.len() <= 223
        && ok_chars
        && (name.starts_with("iqn.") || name.starts_with("eui.") || name.starts_with("naa."))
}

/// Decode the 8-byte LUN field (SAM-5 §4.7) into a LUN number: peripheral
/// device addressing (`00 LL`) and flat space addressing (`4H LL`). Other
/// formats give a number no target has.
pub fn decode_lun(raw: u64) -> u64 {
    let b = raw.to_be_bytes();
    if b[2..].iter().any(|&x| x != 0) {
        return u64::MAX;
    }
    match b[0] >> 6 {
        // Peripheral: bus 0 and the LUN in byte 1 (some initiators put the
        // high byte of larger LUNs in the bus field; accept that too).
        0 => ((b[0] as u64) << 8) | b[1] as u64,
        1 => (((b[0] & 0x3f) as u64) << 8) | b[1] as u64,
        _ => u64::MAX,
    }
}

/// Encode a LUN number for the LUN field.
pub fn encode_lun(lun: u64) -> u64 {
    if lun < 256 {
        lun << 48
    } else {
        (0x4000 | (lun & 0x3fff)) << 48
    }
}

/// The SCSI initiator port name of a session: `name,i,0x<ISID>`.
pub fn initiator_port(initiator: &str, isid: u64) -> String {
    format!("{initiator},i,0x{isid:012x}")
}

/// The SCSI target port name: `name,t,0x<TPGT>`.
pub fn target_port(target: &str, tpgt: u16) -> String {
    format!("{target},t,0x{tpgt:04x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(default_target_name("disk"), "iqn.2026-11.dev.longwire:disk");
        assert!(valid_iscsi_name("iqn.2026-11.dev.longwire:disk"));
        assert!(!valid_iscsi_name("iqn.2026-11.dev.longwire:Disk"));
        assert!(!valid_iscsi_name("disk"));
        assert_eq!(initiator_port("iqn.x", 0x0023_3d00_0001), "iqn.x,i,0x00233d000001");
        assert_eq!(target_port("iqn.t", 1), "iqn.t,t,0x0001");
    }

    #[test]
    fn lun_field() {
        assert_eq!(decode_lun(0), 0);
        assert_eq!(decode_lun(0x0001_0000_0000_0000), 1);
        assert_eq!(decode_lun(0x00ff_0000_0000_0000), 255);
        assert_eq!(decode_lun(0x4101_0000_0000_0000), 0x101);
        assert_eq!(decode_lun(0x0101_0000_0000_0000), 0x101);
        assert_eq!(decode_lun(0xc000_0000_0000_0000), u64::MAX);
        assert_eq!(decode_lun(0x0000_0001_0000_0000), u64::MAX);
        for lun in [0, 1, 255, 256, 16383] {
            assert_eq!(decode_lun(encode_lun(lun)), lun);
        }
    }
}
