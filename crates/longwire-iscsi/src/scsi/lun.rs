//! LUN numbers and the 8-byte LUN field of SAM-5 4.7, used by REPORT LUNS
//! and by the transport to turn a PDU's LUN field into the number
//! [`super::Target`] is keyed by. Both directions live here so they agree.

/// Encode `lun` with single-level addressing: peripheral device addressing
/// below 256, flat space below 16384, extended flat space below 2^24.
/// Larger numbers are returned as their raw big-endian bytes (they cannot
/// be addressed with one level).
pub fn encode_lun(lun: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    match lun {
        0..=0xff => b[1] = lun as u8,
        0x100..=0x3fff => {
            b[0] = 0x40 | (lun >> 8) as u8;
            b[1] = lun as u8;
        }
        0x4000..=0xff_ffff => {
            b[0] = 0xd2; // extended, length 01b, extended flat space
            b[1..4].copy_from_slice(&(lun as u32).to_be_bytes()[1..]);
        }
        _ => b = lun.to_be_bytes(),
    }
    b
}

/// Decode a LUN field produced by [`encode_lun`] (or any single-level LUN
/// in those formats). Anything else, including multi-level LUNs, maps to
/// `u64::MAX`, which no logical unit uses, so the command gets LOGICAL
/// UNIT NOT SUPPORTED.
pub fn decode_lun(raw: [u8; 8]) -> u64 {
    let rest_zero = |from: usize| raw[from..].iter().all(|&b| b == 0);
    match raw[0] >> 6 {
        0b00 if raw[0] == 0 && rest_zero(2) => u64::from(raw[1]),
        0b01 if rest_zero(2) => (u64::from(raw[0] & 0x3f) << 8) | u64::from(raw[1]),
        0b11 if raw[0] == 0xd2 && rest_zero(4) => {
            let v = u32::from_be_bytes([0, raw[1], raw[2], raw[3]]);
            if v >= 0x4000 {
                u64::from(v)
            } else {
                u64::MAX
            }
        }
        _ => u64::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for lun in [0u64, 1, 255, 256, 0x3fff, 0x4000, 0xff_ffff] {
            assert_eq!(decode_lun(encode_lun(lun)), lun, "lun {lun}");
        }
        assert_eq!(encode_lun(1), [0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(encode_lun(300), [0x41, 0x2c, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn unsupported_forms() {
        assert_eq!(
            decode_lun([0, 1, 0, 0, 0, 0, 0, 1]),
            u64::MAX,
            "second level"
        );
        assert_eq!(decode_lun([0x05, 1, 0, 0, 0, 0, 0, 0]), u64::MAX, "bus id");
        assert_eq!(
            decode_lun([0x80, 1, 0, 0, 0, 0, 0, 0]),
            u64::MAX,
            "logical unit addressing"
        );
        assert_eq!(
            decode_lun([0xc1, 0, 0, 0, 0, 0, 0, 0]),
            u64::MAX,
            "well-known"
        );
    }
}
