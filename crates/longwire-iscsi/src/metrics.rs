//! How SCSI commands are counted in longwire's statistics
//! ([`longwire_core::stats`]): which request kind a CDB is, and how many
//! bytes it moved.

use longwire_core::stats::OpKind;

use crate::scsi::{status, CommandResult};

/// The request kind of a CDB, by its operation code (and service action
/// where one opcode does several things).
pub fn op_kind(cdb: &[u8]) -> OpKind {
    match cdb.first().copied().unwrap_or(0) {
        // READ(6/10/12/16)
        0x08 | 0x28 | 0xa8 | 0x88 => OpKind::Read,
        // WRITE(6/10/12/16), WRITE AND VERIFY(10/12/16), COMPARE AND WRITE
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x89 => OpKind::Write,
        // SYNCHRONIZE CACHE(10/16)
        0x35 | 0x91 => OpKind::Flush,
        // UNMAP
        0x42 => OpKind::Trim,
        // WRITE SAME(10/16): how initiators zero ranges
        0x41 | 0x93 => OpKind::Zero,
        // SERVICE ACTION IN(16) / GET LBA STATUS
        0x9e if cdb.get(1).is_some_and(|b| b & 0x1f == 0x12) => OpKind::BlockStatus,
        _ => OpKind::Other,
    }
}

/// Bytes a finished command moved: the data read (what the initiator
/// asked for at most) or the data written, when it succeeded.
pub fn moved_bytes(kind: OpKind, result: &CommandResult, read_len: u32, written: usize) -> u64 {
    if result.status != status::GOOD {
        return 0;
    }
    match kind {
        OpKind::Read => result.data_in.len().min(read_len as usize) as u64,
        OpKind::Write => written as u64,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn kinds() {
        assert_eq!(op_kind(&[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]), OpKind::Read);
        assert_eq!(op_kind(&[0x8a]), OpKind::Write);
        assert_eq!(op_kind(&[0x35]), OpKind::Flush);
        assert_eq!(op_kind(&[0x42]), OpKind::Trim);
        assert_eq!(op_kind(&[0x93]), OpKind::Zero);
        assert_eq!(op_kind(&[0x9e, 0x12]), OpKind::BlockStatus);
        assert_eq!(op_kind(&[0x9e, 0x10]), OpKind::Other, "READ CAPACITY(16)");
        assert_eq!(op_kind(&[0x12]), OpKind::Other, "INQUIRY");
        assert_eq!(op_kind(&[]), OpKind::Other);
    }

    #[test]
    fn bytes() {
        let good = CommandResult::good(Bytes::from(vec![0u8; 4096]));
        assert_eq!(moved_bytes(OpKind::Read, &good, 512, 0), 512);
        assert_eq!(moved_bytes(OpKind::Read, &good, 8192, 0), 4096);
        assert_eq!(moved_bytes(OpKind::Write, &CommandResult::good(Bytes::new()), 0, 65536), 65536);
        let failed = CommandResult { status: status::CHECK_CONDITION, sense: None, data_in: Bytes::new() };
        assert_eq!(moved_bytes(OpKind::Write, &failed, 0, 65536), 0);
    }
}
