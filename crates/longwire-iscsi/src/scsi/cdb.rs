//! CDB decoding: bytes from the network in, a typed [`Command`] or the
//! sense data explaining the refusal out. No I/O and no logical-unit state,
//! so it can be tested (and fuzzed) on its own.
//!
//! Everything checked here depends on the CDB alone: the opcode and service
//! action, reserved bits (through the usage maps in [`super::opcodes`]),
//! protection fields, and field combinations SBC/SPC forbid. Checks that
//! need the logical unit (LBA range, transfer limits, write protection)
//! happen when the command runs.

use super::opcodes;
use super::sense::{self, Sense};

/// Logical block size we present.
pub const BLOCK_SIZE: u32 = 512;

/// A stretch of logical blocks named by a CDB, with the CDB offset of its
/// length field so errors about the length can point at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub lba: u64,
    pub blocks: u32,
    pub len_byte: u16,
}

/// A decoded, syntactically valid command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    RequestSense {
        alloc: u32,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc: u32,
    },
    ModeSense {
        /// MODE SENSE(10) rather than (6).
        ten: bool,
        dbd: bool,
        llbaa: bool,
        /// Page control: 0 current, 1 changeable, 2 default, 3 saved.
        pc: u8,
        page: u8,
        subpage: u8,
        alloc: u32,
    },
    ModeSelect {
        ten: bool,
        pf: bool,
        param_len: u32,
    },
    Reserve6,
    Release6,
    PreventAllow {
        prevent: bool,
    },
    StartStopUnit,
    ReportLuns {
        select: u8,
        alloc: u32,
    },
    ReportSupportedOpcodes {
        rctd: bool,
        options: u8,
        opcode: u8,
        sa: u16,
        alloc: u32,
    },
    PersistentReserveIn {
        action: u8,
        alloc: u32,
    },
    PersistentReserveOut {
        action: u8,
        scope: u8,
        pr_type: u8,
        param_len: u32,
    },
    ReadCapacity10,
    ReadCapacity16 {
        alloc: u32,
    },
    GetLbaStatus {
        lba: u64,
        alloc: u32,
    },
    Read {
        span: Span,
    },
    Write {
        span: Span,
        fua: bool,
    },
    WriteAndVerify {
        span: Span,
    },
    /// BYTCHK 0: check the medium; 1: compare with Data-Out; 3: compare
    /// every block with one Data-Out block.
    Verify {
        span: Span,
        bytchk: u8,
    },
    /// `span.blocks` 0 means "through the last block".
    SynchronizeCache {
        span: Span,
    },
    /// `span.blocks` 0 means "through the last block".
    PreFetch {
        span: Span,
    },
    Unmap {
        param_len: u32,
    },
    /// `span.blocks` 0 means "through the last block".
    WriteSame {
        span: Span,
        unmap: bool,
        ndob: bool,
    },
    CompareAndWrite {
        span: Span,
        fua: bool,
    },
}

/// What data a command moves, in bytes, decided from the CDB alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    None,
    In(u64),
    Out(u64),
}

fn be16(b: &[u8], at: usize) -> u16 {
    let mut v = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        v.copy_from_slice(s);
    }
    u16::from_be_bytes(v)
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_be_bytes(v)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_be_bytes(v)
}

fn byte(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

/// The CDB length an opcode uses, from its group code (SPC-4 4.2.5.1), for
/// callers that need to know how much of a buffer is CDB.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// RDPROTECT/WRPROTECT/VRPROTECT: we have no protection information, so any
/// non-zero value is refused (SBC-3 4.22.2).
fn no_protection(cdb: &[u8]) -> Result<(), Sense> {
    if byte(cdb, 1) & 0xe0 != 0 {
        Err(Sense::invalid_cdb(1, Some(7)))
    } else {
        Ok(())
    }
}

/// Decode the LBA and transfer length of a READ/WRITE-family CDB.
fn span(cdb: &[u8]) -> Span {
    match cdb.first().copied().unwrap_or(0) >> 5 {
        // 6-byte: 21-bit LBA, 8-bit length where 0 means 256 (SBC-3 5.15).
        0 => {
            let lba = (u64::from(byte(cdb, 1) & 0x1f) << 16) | u64::from(be16(cdb, 2));
            let len = byte(cdb, 4);
            Span {
                lba,
                blocks: if len == 0 { 256 } else { u32::from(len) },
                len_byte: 4,
            }
        }
        1 | 2 => Span {
            lba: u64::from(be32(cdb, 2)),
            blocks: u32::from(be16(cdb, 7)),
            len_byte: 7,
        },
        5 => Span {
            lba: u64::from(be32(cdb, 2)),
            blocks: be32(cdb, 6),
            len_byte: 6,
        },
        _ => Span {
            lba: be64(cdb, 2),
            blocks: be32(cdb, 10),
            len_byte: 10,
        },
    }
}

/// Decode a CDB. `cdb` may be longer than the command's CDB (iSCSI pads to
/// 16 bytes); only the command's own length is looked at.
pub fn decode(cdb: &[u8]) -> Result<Command, Sense> {
    let info = opcodes::lookup(cdb)?;
    opcodes::check_reserved(cdb, info)?;
    let cdb = &cdb[..info.usage.len()];
    let b1 = byte(cdb, 1);
    let cmd = match info.opcode {
        0x00 => Command::TestUnitReady,
        0x03 => {
            if b1 & 0x01 != 0 {
                // DESC: descriptor-format sense data is not supported.
                return Err(Sense::invalid_cdb(1, Some(0)));
            }
            Command::RequestSense {
                alloc: u32::from(byte(cdb, 4)),
            }
        }
        0x12 => {
            let evpd = b1 & 0x01 != 0;
            let page = byte(cdb, 2);
            if !evpd && page != 0 {
                return Err(Sense::invalid_cdb(2, None));
            }
            Command::Inquiry {
                evpd,
                page,
                alloc: u32::from(be16(cdb, 3)),
            }
        }
        0x1a | 0x5a => {
            let ten = info.opcode == 0x5a;
            Command::ModeSense {
                ten,
                dbd: b1 & 0x08 != 0,
                llbaa: ten && b1 & 0x10 != 0,
                pc: byte(cdb, 2) >> 6,
                page: byte(cdb, 2) & 0x3f,
                subpage: byte(cdb, 3),
                alloc: if ten {
                    u32::from(be16(cdb, 7))
                } else {
                    u32::from(byte(cdb, 4))
                },
            }
        }
        0x15 | 0x55 => {
            if b1 & 0x01 != 0 {
                // SP: we keep no saved pages.
                return Err(Sense::invalid_cdb(1, Some(0)));
            }
            let ten = info.opcode == 0x55;
            Command::ModeSelect {
                ten,
                pf: b1 & 0x10 != 0,
                param_len: if ten {
                    u32::from(be16(cdb, 7))
                } else {
                    u32::from(byte(cdb, 4))
                },
            }
        }
        0x16 => Command::Reserve6,
        0x17 => Command::Release6,
        0x1e => Command::PreventAllow {
            prevent: byte(cdb, 4) & 0x03 != 0,
        },
        0x1b => Command::StartStopUnit,
        0xa0 => Command::ReportLuns {
            select: byte(cdb, 2),
            alloc: be32(cdb, 6),
        },
        0xa3 => Command::ReportSupportedOpcodes {
            rctd: byte(cdb, 2) & 0x80 != 0,
            options: byte(cdb, 2) & 0x07,
            opcode: byte(cdb, 3),
            sa: be16(cdb, 4),
            alloc: be32(cdb, 6),
        },
        0x5e => Command::PersistentReserveIn {
            action: b1 & 0x1f,
            alloc: u32::from(be16(cdb, 7)),
        },
        0x5f => Command::PersistentReserveOut {
            action: b1 & 0x1f,
            scope: byte(cdb, 2) >> 4,
            pr_type: byte(cdb, 2) & 0x0f,
            param_len: be32(cdb, 5),
        },
        0x25 => {
            // With PMI clear the LBA field must be zero (SBC-3 5.16.1).
            if byte(cdb, 8) & 0x01 == 0 && be32(cdb, 2) != 0 {
                return Err(Sense::invalid_cdb(2, None));
            }
            Command::ReadCapacity10
        }
        0x9e if info.sa == Some(0x10) => {
            if byte(cdb, 14) & 0x01 == 0 && be64(cdb, 2) != 0 {
                return Err(Sense::invalid_cdb(2, None));
            }
            Command::ReadCapacity16 {
                alloc: be32(cdb, 10),
            }
        }
        0x9e => Command::GetLbaStatus {
            lba: be64(cdb, 2),
            alloc: be32(cdb, 10),
        },
        0x08 | 0x28 | 0xa8 | 0x88 => {
            no_protection(cdb)?;
            Command::Read { span: span(cdb) }
        }
        0x0a | 0x2a | 0xaa | 0x8a => {
            no_protection(cdb)?;
            Command::Write {
                span: span(cdb),
                fua: b1 & 0x08 != 0,
            }
        }
        0x2e | 0xae | 0x8e => {
            no_protection(cdb)?;
            // BYTCHK 00b and 01b only (SBC-4 5.42): the compare is against
            // the data just written durably, so both mean the same to us.
            if b1 & 0x04 != 0 {
                return Err(Sense::invalid_cdb(1, Some(2)));
            }
            Command::WriteAndVerify { span: span(cdb) }
        }
        0x2f | 0xaf | 0x8f => {
            no_protection(cdb)?;
            let bytchk = (b1 >> 1) & 0x03;
            if bytchk == 2 {
                return Err(Sense::invalid_cdb(1, Some(2)));
            }
            Command::Verify {
                span: span(cdb),
                bytchk,
            }
        }
        0x35 | 0x91 => Command::SynchronizeCache { span: span(cdb) },
        0x34 | 0x90 => Command::PreFetch { span: span(cdb) },
        0x42 => {
            if b1 & 0x01 != 0 {
                // ANCHOR: anchored LBAs are not supported (ANC_SUP = 0).
                return Err(Sense::invalid_cdb(1, Some(0)));
            }
            Command::Unmap {
                param_len: u32::from(be16(cdb, 7)),
            }
        }
        0x41 | 0x93 => {
            no_protection(cdb)?;
            if b1 & 0x10 != 0 {
                // ANCHOR is invalid without UNMAP and unsupported with it.
                return Err(Sense::invalid_cdb(1, Some(4)));
            }
            Command::WriteSame {
                span: span(cdb),
                unmap: b1 & 0x08 != 0,
                ndob: info.opcode == 0x93 && b1 & 0x01 != 0,
            }
        }
        0x89 => {
            no_protection(cdb)?;
            Command::CompareAndWrite {
                span: Span {
                    lba: be64(cdb, 2),
                    blocks: u32::from(byte(cdb, 13)),
                    len_byte: 13,
                },
                fua: b1 & 0x08 != 0,
            }
        }
        // Every table entry is handled above; a new one without a decoder
        // is a bug, reported as unsupported rather than a panic.
        _ => return Err(sense::INVALID_COMMAND_OPERATION_CODE),
    };
    Ok(cmd)
}

fn blocks_bytes(blocks: u32) -> u64 {
    u64::from(blocks) * u64::from(BLOCK_SIZE)
}

impl Command {
    /// The data this command moves if it runs, from the CDB alone.
    pub fn transfer(&self) -> Transfer {
        use Command::*;
        match *self {
            RequestSense { alloc }
            | Inquiry { alloc, .. }
            | ModeSense { alloc, .. }
            | ReportLuns { alloc, .. }
            | ReportSupportedOpcodes { alloc, .. }
            | PersistentReserveIn { alloc, .. }
            | ReadCapacity16 { alloc }
            | GetLbaStatus { alloc, .. } => in_or_none(u64::from(alloc)),
            ReadCapacity10 => Transfer::In(8),
            Read { span } => in_or_none(blocks_bytes(span.blocks)),
            ModeSelect { param_len, .. }
            | PersistentReserveOut { param_len, .. }
            | Unmap { param_len } => out_or_none(u64::from(param_len)),
            Write { span, .. } | WriteAndVerify { span } => out_or_none(blocks_bytes(span.blocks)),
            Verify { span, bytchk } => match bytchk {
                0 => Transfer::None,
                3 if span.blocks > 0 => Transfer::Out(u64::from(BLOCK_SIZE)),
                3 => Transfer::None,
                _ => out_or_none(blocks_bytes(span.blocks)),
            },
            WriteSame { ndob: true, .. } => Transfer::None,
            WriteSame { .. } => Transfer::Out(u64::from(BLOCK_SIZE)),
            CompareAndWrite { span, .. } => out_or_none(2 * blocks_bytes(span.blocks)),
            TestUnitReady
            | Reserve6
            | Release6
            | PreventAllow { .. }
            | StartStopUnit
            | SynchronizeCache { .. }
            | PreFetch { .. } => Transfer::None,
        }
    }

    /// True for commands a pending unit attention does not interrupt
    /// (SAM-5 5.14: INQUIRY, REPORT LUNS and REQUEST SENSE).
    pub fn ignores_unit_attention(opcode: u8) -> bool {
        matches!(opcode, 0x12 | 0xa0 | 0x03)
    }
}

fn in_or_none(n: u64) -> Transfer {
    if n == 0 {
        Transfer::None
    } else {
        Transfer::In(n)
    }
}

fn out_or_none(n: u64) -> Transfer {
    if n == 0 {
        Transfer::None
    } else {
        Transfer::Out(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdb16(bytes: &[u8]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    #[test]
    fn read6_zero_length_means_256_blocks() {
        let c = decode(&cdb16(&[0x08, 0x1f, 0xff, 0xff, 0, 0])).unwrap();
        assert_eq!(
            c,
            Command::Read {
                span: Span {
                    lba: 0x1f_ffff,
                    blocks: 256,
                    len_byte: 4
                }
            }
        );
        assert_eq!(c.transfer(), Transfer::In(256 * 512));
        // The top three bits of byte 1 are reserved (they were the LUN in SCSI-2).
        assert_eq!(
            decode(&[0x08, 0x20, 0, 0, 1, 0]),
            Err(Sense::invalid_cdb(1, Some(5)))
        );
    }

    #[test]
    fn read_write_lengths_and_lbas() {
        let r10 = decode(&[0x28, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x01, 0x02, 0]).unwrap();
        assert_eq!(
            r10,
            Command::Read {
                span: Span {
                    lba: 0xffff_ffff,
                    blocks: 0x102,
                    len_byte: 7
                }
            }
        );
        let r12 = decode(&[0xa8, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0, 0]).unwrap();
        assert!(matches!(r12, Command::Read { span } if span.blocks == u32::MAX && span.lba == 1));
        let mut w16 = cdb16(&[0x8a, 0x08]);
        w16[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
        w16[13] = 1;
        let w = decode(&w16).unwrap();
        assert_eq!(
            w,
            Command::Write {
                span: Span {
                    lba: u64::MAX,
                    blocks: 1,
                    len_byte: 10
                },
                fua: true
            }
        );
        // Zero-length transfers move nothing.
        let z = decode(&[0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!(z.transfer(), Transfer::None);
    }

    #[test]
    fn protection_fields_are_refused() {
        for op in [0x28u8, 0x2a, 0x2e, 0x2f, 0x41] {
            let mut c = [0u8; 10];
            c[0] = op;
            c[1] = 0x20;
            assert_eq!(
                decode(&c),
                Err(Sense::invalid_cdb(1, Some(7))),
                "opcode {op:#x}"
            );
        }
        let mut c = cdb16(&[0x89, 0x40]);
        c[13] = 1;
        assert_eq!(decode(&c), Err(Sense::invalid_cdb(1, Some(7))));
    }

    #[test]
    fn short_cdb_is_refused_not_panicking() {
        assert_eq!(
            decode(&[0x88, 0, 0]),
            Err(sense::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)
        );
        assert_eq!(
            decode(&[0x9e]),
            Err(sense::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)
        );
        assert_eq!(decode(&[]), Err(Sense::invalid_cdb(0, None)));
    }

    #[test]
    fn inquiry_evpd_rules() {
        assert_eq!(
            decode(&[0x12, 0, 1, 0, 0xff, 0]),
            Err(Sense::invalid_cdb(2, None))
        );
        assert_eq!(
            decode(&[0x12, 0x02, 0, 0, 0xff, 0]),
            Err(Sense::invalid_cdb(1, Some(1)))
        );
        assert_eq!(
            decode(&[0x12, 1, 0x83, 0x01, 0x00, 0]),
            Ok(Command::Inquiry {
                evpd: true,
                page: 0x83,
                alloc: 256
            })
        );
    }

    #[test]
    fn write_same_flags() {
        let ws = decode(&[0x41, 0x08, 0, 0, 0, 5, 0, 0, 2, 0]).unwrap();
        assert_eq!(
            ws,
            Command::WriteSame {
                span: Span {
                    lba: 5,
                    blocks: 2,
                    len_byte: 7
                },
                unmap: true,
                ndob: false
            }
        );
        assert_eq!(ws.transfer(), Transfer::Out(512));
        // ANCHOR, with or without UNMAP.
        assert_eq!(
            decode(&[0x41, 0x10, 0, 0, 0, 0, 0, 0, 1, 0]),
            Err(Sense::invalid_cdb(1, Some(4)))
        );
        assert_eq!(
            decode(&[0x41, 0x18, 0, 0, 0, 0, 0, 0, 1, 0]),
            Err(Sense::invalid_cdb(1, Some(4)))
        );
        // NDOB only exists in WRITE SAME(16).
        assert_eq!(
            decode(&[0x41, 0x01, 0, 0, 0, 0, 0, 0, 1, 0]),
            Err(Sense::invalid_cdb(1, Some(0)))
        );
        let mut c = cdb16(&[0x93, 0x09]);
        c[13] = 4;
        let ws16 = decode(&c).unwrap();
        assert!(matches!(
            ws16,
            Command::WriteSame {
                unmap: true,
                ndob: true,
                ..
            }
        ));
        assert_eq!(ws16.transfer(), Transfer::None);
    }

    #[test]
    fn compare_and_write_transfer_is_twice_the_blocks() {
        let mut c = cdb16(&[0x89, 0x18]);
        c[9] = 7;
        c[13] = 3;
        let caw = decode(&c).unwrap();
        assert_eq!(caw.transfer(), Transfer::Out(3 * 1024));
        assert!(matches!(caw, Command::CompareAndWrite { fua: true, span } if span.lba == 7));
    }

    #[test]
    fn verify_bytchk() {
        let v = |b1: u8| decode(&[0x2f, b1, 0, 0, 0, 0, 0, 0, 4, 0]);
        assert_eq!(v(0).unwrap().transfer(), Transfer::None);
        assert_eq!(v(0x02).unwrap().transfer(), Transfer::Out(2048));
        assert_eq!(v(0x04), Err(Sense::invalid_cdb(1, Some(2))));
        assert_eq!(v(0x06).unwrap().transfer(), Transfer::Out(512));
        // WRITE AND VERIFY: only 00b/01b.
        assert!(decode(&[0x2e, 0x02, 0, 0, 0, 0, 0, 0, 1, 0]).is_ok());
        assert_eq!(
            decode(&[0x2e, 0x06, 0, 0, 0, 0, 0, 0, 1, 0]),
            Err(Sense::invalid_cdb(1, Some(2)))
        );
    }

    #[test]
    fn read_capacity_lba_without_pmi() {
        assert_eq!(
            decode(&[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0]),
            Err(Sense::invalid_cdb(2, None))
        );
        assert!(decode(&[0x25, 0, 0, 0, 0, 1, 0, 0, 1, 0]).is_ok());
        let mut c = cdb16(&[0x9e, 0x10]);
        c[13] = 32;
        assert_eq!(decode(&c), Ok(Command::ReadCapacity16 { alloc: 32 }));
    }

    #[test]
    fn mode_sense_fields() {
        assert_eq!(
            decode(&[0x5a, 0x18, 0xbf, 0xff, 0, 0, 0, 0x01, 0x00, 0]),
            Ok(Command::ModeSense {
                ten: true,
                dbd: true,
                llbaa: true,
                pc: 2,
                page: 0x3f,
                subpage: 0xff,
                alloc: 256
            })
        );
        // LLBAA does not exist in MODE SENSE(6).
        assert_eq!(
            decode(&[0x1a, 0x10, 0x3f, 0, 0xff, 0]),
            Err(Sense::invalid_cdb(1, Some(4)))
        );
        // SP: no saved pages.
        assert_eq!(
            decode(&[0x15, 0x11, 0, 0, 12, 0]),
            Err(Sense::invalid_cdb(1, Some(0)))
        );
    }

    #[test]
    fn cdb_len_by_group() {
        assert_eq!(cdb_len(0x12), Some(6));
        assert_eq!(cdb_len(0x28), Some(10));
        assert_eq!(cdb_len(0x5f), Some(10));
        assert_eq!(cdb_len(0x88), Some(16));
        assert_eq!(cdb_len(0xa0), Some(12));
        assert_eq!(cdb_len(0x7f), None);
    }
}
