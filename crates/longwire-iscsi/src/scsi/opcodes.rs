//! The commands we implement, described once.
//!
//! Each entry's CDB usage bitmap is both what REPORT SUPPORTED OPERATION
//! CODES tells the initiator and the mask CDB decoding checks reserved bits
//! against, so the two can never disagree.

use super::sense::{self, Sense};

/// One supported command (or one service action of a command).
#[derive(Debug)]
pub struct OpInfo {
    pub opcode: u8,
    /// Service action, for the opcodes that have them.
    pub sa: Option<u8>,
    /// CDB usage data (SPC-4 6.35.3): byte 0 is the opcode, the service
    /// action field holds the service action, every other bit is one if we
    /// look at it. Its length is the CDB length.
    pub usage: &'static [u8],
    /// Only offered when the logical unit is thin provisioned.
    pub needs_thin: bool,
    /// Recommended command timeout in seconds (for RCTD).
    pub timeout: u32,
}

/// Opcodes whose byte 1 bits 4..0 select a service action.
pub fn has_service_actions(opcode: u8) -> bool {
    matches!(opcode, 0x5e | 0x5f | 0x9e | 0xa3)
}

const IO: u32 = 30;
const ADMIN: u32 = 10;

macro_rules! op {
    ($code:literal, $usage:expr) => {
        op!($code, None, $usage, false, ADMIN)
    };
    ($code:literal, $sa:expr, $usage:expr, $thin:expr, $timeout:expr) => {
        OpInfo {
            opcode: $code,
            sa: $sa,
            usage: &$usage,
            needs_thin: $thin,
            timeout: $timeout,
        }
    };
}

const FF: u8 = 0xff;
/// Group number field: SBC-4 widened it to six bits; accept both.
const GRP: u8 = 0x3f;

/// Every supported command, sorted by opcode then service action.
pub static SUPPORTED: &[OpInfo] = &[
    op!(0x00, [0x00, 0, 0, 0, 0, 0]),     // TEST UNIT READY
    op!(0x03, [0x03, 0x01, 0, 0, FF, 0]), // REQUEST SENSE
    op!(0x08, None, [0x08, 0x1f, FF, FF, FF, 0], false, IO), // READ(6)
    op!(0x0a, None, [0x0a, 0x1f, FF, FF, FF, 0], false, IO), // WRITE(6)
    op!(0x12, [0x12, 0x01, FF, FF, FF, 0]), // INQUIRY
    op!(0x15, [0x15, 0x11, 0, 0, FF, 0]), // MODE SELECT(6)
    op!(0x16, [0x16, 0, 0, 0, 0, 0]),     // RESERVE(6)
    op!(0x17, [0x17, 0, 0, 0, 0, 0]),     // RELEASE(6)
    op!(0x1a, [0x1a, 0x08, FF, FF, FF, 0]), // MODE SENSE(6)
    op!(0x1b, [0x1b, 0x01, 0, 0x0f, 0xf7, 0]), // START STOP UNIT
    op!(0x1e, [0x1e, 0, 0, 0, 0x03, 0]),  // PREVENT ALLOW MEDIUM REMOVAL
    op!(0x25, [0x25, 0, FF, FF, FF, FF, 0, 0, 0x01, 0]), // READ CAPACITY(10)
    op!(
        0x28,
        None,
        [0x28, 0xfe, FF, FF, FF, FF, GRP, FF, FF, 0],
        false,
        IO
    ), // READ(10)
    op!(
        0x2a,
        None,
        [0x2a, 0xfa, FF, FF, FF, FF, GRP, FF, FF, 0],
        false,
        IO
    ), // WRITE(10)
    op!(
        0x2e,
        None,
        [0x2e, 0xf6, FF, FF, FF, FF, GRP, FF, FF, 0],
        false,
        IO
    ), // WRITE AND VERIFY(10)
    op!(
        0x2f,
        None,
        [0x2f, 0xf6, FF, FF, FF, FF, GRP, FF, FF, 0],
        false,
        IO
    ), // VERIFY(10)
    op!(
        0x34,
        None,
        [0x34, 0x02, FF, FF, FF, FF, GRP, FF, FF, 0],
        false,
        IO
    ), // PRE-FETCH(10)
    op!(
        0x35,
        None,
        [0x35, 0x06, FF, FF, FF, FF, GRP, FF, FF, 0],
        false,
        IO
    ), // SYNCHRONIZE CACHE(10)
    op!(
        0x41,
        None,
        [0x41, 0xf8, FF, FF, FF, FF, GRP, FF, FF, 0],
        false,
        IO
    ), // WRITE SAME(10)
    op!(
        0x42,
        None,
        [0x42, 0x01, 0, 0, 0, 0, GRP, FF, FF, 0],
        true,
        IO
    ), // UNMAP
    op!(0x55, [0x55, 0x11, 0, 0, 0, 0, 0, FF, FF, 0]), // MODE SELECT(10)
    op!(0x5a, [0x5a, 0x18, FF, FF, 0, 0, 0, FF, FF, 0]), // MODE SENSE(10)
    // PERSISTENT RESERVE IN: READ KEYS, READ RESERVATION, REPORT CAPABILITIES, READ FULL STATUS
    op!(
        0x5e,
        Some(0),
        [0x5e, 0x00, 0, 0, 0, 0, 0, FF, FF, 0],
        false,
        ADMIN
    ),
    op!(
        0x5e,
        Some(1),
        [0x5e, 0x01, 0, 0, 0, 0, 0, FF, FF, 0],
        false,
        ADMIN
    ),
    op!(
        0x5e,
        Some(2),
        [0x5e, 0x02, 0, 0, 0, 0, 0, FF, FF, 0],
        false,
        ADMIN
    ),
    op!(
        0x5e,
        Some(3),
        [0x5e, 0x03, 0, 0, 0, 0, 0, FF, FF, 0],
        false,
        ADMIN
    ),
    // PERSISTENT RESERVE OUT: REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT,
    // PREEMPT AND ABORT, REGISTER AND IGNORE EXISTING KEY
    op!(
        0x5f,
        Some(0),
        [0x5f, 0x00, FF, 0, 0, FF, FF, FF, FF, 0],
        false,
        ADMIN
    ),
    op!(
        0x5f,
        Some(1),
        [0x5f, 0x01, FF, 0, 0, FF, FF, FF, FF, 0],
        false,
        ADMIN
    ),
    op!(
        0x5f,
        Some(2),
        [0x5f, 0x02, FF, 0, 0, FF, FF, FF, FF, 0],
        false,
        ADMIN
    ),
    op!(
        0x5f,
        Some(3),
        [0x5f, 0x03, FF, 0, 0, FF, FF, FF, FF, 0],
        false,
        ADMIN
    ),
    op!(
        0x5f,
        Some(4),
        [0x5f, 0x04, FF, 0, 0, FF, FF, FF, FF, 0],
        false,
        ADMIN
    ),
    op!(
        0x5f,
        Some(5),
        [0x5f, 0x05, FF, 0, 0, FF, FF, FF, FF, 0],
        false,
        ADMIN
    ),
    op!(
        0x5f,
        Some(6),
        [0x5f, 0x06, FF, 0, 0, FF, FF, FF, FF, 0],
        false,
        ADMIN
    ),
    op!(
        0x88,
        None,
        [0x88, 0xfe, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0],
        false,
        IO
    ), // READ(16)
    op!(
        0x89,
        None,
        [0x89, 0xfa, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0, 0, FF, GRP, 0],
        false,
        IO
    ), // COMPARE AND WRITE
    op!(
        0x8a,
        None,
        [0x8a, 0xfa, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0],
        false,
        IO
    ), // WRITE(16)
    op!(
        0x8e,
        None,
        [0x8e, 0xf6, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0],
        false,
        IO
    ), // WRITE AND VERIFY(16)
    op!(
        0x8f,
        None,
        [0x8f, 0xf6, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0],
        false,
        IO
    ), // VERIFY(16)
    op!(
        0x90,
        None,
        [0x90, 0x02, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0],
        false,
        IO
    ), // PRE-FETCH(16)
    op!(
        0x91,
        None,
        [0x91, 0x06, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0],
        false,
        IO
    ), // SYNCHRONIZE CACHE(16)
    op!(
        0x93,
        None,
        [0x93, 0xf9, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0],
        false,
        IO
    ), // WRITE SAME(16)
    op!(
        0x9e,
        Some(0x10),
        [0x9e, 0x10, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x01, 0],
        false,
        ADMIN
    ), // READ CAPACITY(16)
    op!(
        0x9e,
        Some(0x12),
        [0x9e, 0x12, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0],
        true,
        ADMIN
    ), // GET LBA STATUS
    op!(0xa0, [0xa0, 0, FF, 0, 0, 0, FF, FF, FF, FF, 0, 0]), // REPORT LUNS
    op!(
        0xa3,
        Some(0x0c),
        [0xa3, 0x0c, 0x87, FF, FF, FF, FF, FF, FF, FF, 0, 0],
        false,
        ADMIN
    ), // REPORT SUPPORTED OPERATION CODES
    op!(
        0xa8,
        None,
        [0xa8, 0xfe, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0],
        false,
        IO
    ), // READ(12)
    op!(
        0xaa,
        None,
        [0xaa, 0xfa, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0],
        false,
        IO
    ), // WRITE(12)
    op!(
        0xae,
        None,
        [0xae, 0xf6, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0],
        false,
        IO
    ), // WRITE AND VERIFY(12)
    op!(
        0xaf,
        None,
        [0xaf, 0xf6, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0],
        false,
        IO
    ), // VERIFY(12)
];

/// The entry for `opcode` (and `sa` when the opcode has service actions).
pub fn find(opcode: u8, sa: Option<u8>) -> Option<&'static OpInfo> {
    SUPPORTED.iter().find(|i| i.opcode == opcode && i.sa == sa)
}

/// Look up the command a CDB starts, reporting why not if we do not
/// implement it: unknown opcodes get INVALID COMMAND OPERATION CODE,
/// unknown service actions INVALID FIELD IN CDB pointing at byte 1 (which
/// initiators such as libiscsi read as "not implemented").
pub fn lookup(cdb: &[u8]) -> Result<&'static OpInfo, Sense> {
    let Some(&opcode) = cdb.first() else {
        return Err(Sense::invalid_cdb(0, None));
    };
    if has_service_actions(opcode) {
        let Some(&b1) = cdb.get(1) else {
            return Err(sense::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT);
        };
        find(opcode, Some(b1 & 0x1f)).ok_or(Sense::invalid_cdb(1, Some(4)))
    } else {
        find(opcode, None).ok_or(sense::INVALID_COMMAND_OPERATION_CODE)
    }
}

/// Check that `cdb` is long enough for `info` and that no bit outside its
/// usage map is set (reserved bits, and NACA/LINK in the control byte,
/// which we do not support). Vendor-specific control bits are ignored.
pub fn check_reserved(cdb: &[u8], info: &OpInfo) -> Result<(), Sense> {
    let len = info.usage.len();
    let Some(cdb) = cdb.get(..len) else {
        return Err(sense::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT);
    };
    for (i, (&byte, &usage)) in cdb.iter().zip(info.usage).enumerate().skip(1) {
        let mut allowed = usage;
        if i == 1 && info.sa.is_some() {
            allowed |= 0x1f;
        }
        if i == len - 1 {
            allowed |= 0xc0;
        }
        let bad = byte & !allowed;
        if bad != 0 {
            let bit = 7 - bad.leading_zeros() as u8;
            return Err(Sense::invalid_cdb(i as u16, Some(bit)));
        }
    }
    Ok(())
}

/// Whether the logical unit offers `info` (UNMAP and GET LBA STATUS only
/// make sense with thin provisioning).
pub fn offered(info: &OpInfo, thin: bool) -> bool {
    thin || !info.needs_thin
}

/// Command timeouts descriptor (SPC-4 6.35.4).
fn timeouts(out: &mut Vec<u8>, info: &OpInfo) {
    out.extend_from_slice(&0x0au16.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&1u32.to_be_bytes()); // nominal
    out.extend_from_slice(&info.timeout.to_be_bytes()); // recommended
}

/// REPORT SUPPORTED OPERATION CODES, reporting options 000b: every command.
pub fn report_all(rctd: bool, thin: bool) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    for info in SUPPORTED.iter().filter(|i| offered(i, thin)) {
        out.push(info.opcode);
        out.push(0);
        out.extend_from_slice(&u16::from(info.sa.unwrap_or(0)).to_be_bytes());
        out.push(0);
        out.push(if rctd { 0x02 } else { 0 } | u8::from(info.sa.is_some()));
        out.extend_from_slice(&(info.usage.len() as u16).to_be_bytes());
        if rctd {
            timeouts(&mut out, info);
        }
    }
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// REPORT SUPPORTED OPERATION CODES for one command (reporting options
/// 001b, 010b and 011b). Asking for a service action of an opcode that has
/// none, or for an opcode without its service action, is an invalid field
/// in the CDB (SPC-4 6.35.1).
pub fn report_one(
    options: u8,
    opcode: u8,
    sa: u16,
    rctd: bool,
    thin: bool,
) -> Result<Vec<u8>, Sense> {
    let with_sa = has_service_actions(opcode);
    let sa_key = match (options, with_sa) {
        (1, true) => return Err(Sense::invalid_cdb(2, Some(2))),
        (2, false) => return Err(Sense::invalid_cdb(2, Some(2))),
        (1, false) | (3, false) => None,
        (2, true) | (3, true) => match u8::try_from(sa) {
            Ok(s) if s <= 0x1f => Some(s),
            _ => Some(0xff), // cannot exist: reported as not supported
        },
        _ => return Err(Sense::invalid_cdb(2, Some(2))),
    };
    let mut out = vec![0u8; 4];
    match find(opcode, sa_key).filter(|i| offered(i, thin)) {
        Some(info) => {
            out[1] = 0x03 | if rctd { 0x80 } else { 0 };
            out[2..4].copy_from_slice(&(info.usage.len() as u16).to_be_bytes());
            out.extend_from_slice(info.usage);
            if rctd {
                timeouts(&mut out, info);
            }
        }
        None => out[1] = 0x01, // not supported
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_consistent() {
        for w in SUPPORTED.windows(2) {
            assert!((w[0].opcode, w[0].sa) < (w[1].opcode, w[1].sa));
        }
        for i in SUPPORTED {
            assert_eq!(i.usage[0], i.opcode);
            assert_eq!(i.sa.is_some(), has_service_actions(i.opcode));
            if let Some(sa) = i.sa {
                assert_eq!(i.usage[1] & 0x1f, sa, "opcode {:#x}", i.opcode);
            }
            assert!(matches!(i.usage.len(), 6 | 10 | 12 | 16));
        }
    }

    #[test]
    fn reserved_bits_are_refused_with_a_pointer() {
        let info = find(0x28, None).unwrap();
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        assert!(check_reserved(&cdb, info).is_ok());
        cdb[1] = 0x01; // obsolete RELADR
        assert_eq!(
            check_reserved(&cdb, info),
            Err(Sense::invalid_cdb(1, Some(0)))
        );
        cdb[1] = 0;
        cdb[9] = 0x04; // NACA
        assert_eq!(
            check_reserved(&cdb, info),
            Err(Sense::invalid_cdb(9, Some(2)))
        );
        cdb[9] = 0xc0; // vendor specific: ignored
        assert!(check_reserved(&cdb, info).is_ok());
        assert_eq!(
            check_reserved(&cdb[..9], info),
            Err(sense::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)
        );
    }

    #[test]
    fn lookup_errors() {
        assert_eq!(
            lookup(&[0xff]).unwrap_err(),
            sense::INVALID_COMMAND_OPERATION_CODE
        );
        assert_eq!(
            lookup(&[0x9e, 0x11]).unwrap_err(),
            Sense::invalid_cdb(1, Some(4))
        );
        assert_eq!(lookup(&[]).unwrap_err(), Sense::invalid_cdb(0, None));
        assert!(lookup(&[0x9e, 0x10]).is_ok());
    }

    #[test]
    fn report_all_descriptor_layout() {
        let plain = report_all(false, true);
        let len = u32::from_be_bytes(plain[..4].try_into().unwrap()) as usize;
        assert_eq!(len, plain.len() - 4);
        assert_eq!(len % 8, 0);
        assert_eq!(len / 8, SUPPORTED.len());
        let timed = report_all(true, false);
        let n = SUPPORTED.iter().filter(|i| !i.needs_thin).count();
        assert_eq!(timed.len(), 4 + n * 20);
        // Every descriptor has CTDP set and a 0x0a-byte timeouts descriptor.
        for d in timed[4..].chunks(20) {
            assert_eq!(d[5] & 0x02, 0x02);
            assert_eq!(&d[8..10], &[0, 0x0a]);
        }
    }

    #[test]
    fn report_one_rules() {
        // READ(10) has no service actions: option 1 works, option 2 does not.
        let r = report_one(1, 0x28, 0, false, true).unwrap();
        assert_eq!(r[1], 0x03);
        assert_eq!(&r[2..4], &[0, 10]);
        assert_eq!(r[4], 0x28);
        assert_eq!(r[5] & 0x18, 0x18, "DPO and FUA are evaluated");
        assert!(report_one(2, 0x28, 0, false, true).is_err());
        // READ CAPACITY(16) is a service action.
        assert!(report_one(1, 0x9e, 0x10, false, true).is_err());
        let r = report_one(2, 0x9e, 0x10, true, true).unwrap();
        assert_eq!(r[1], 0x83);
        assert_eq!(r.len(), 4 + 16 + 12);
        // Unsupported: SUPPORT = 001b.
        assert_eq!(
            report_one(1, 0x8b, 0, false, true).unwrap(),
            vec![0, 1, 0, 0]
        );
        assert_eq!(
            report_one(1, 0x42, 0, false, false).unwrap(),
            vec![0, 1, 0, 0]
        );
        assert!(report_one(4, 0x28, 0, false, true).is_err());
    }
}
