//! Sense data: what went wrong, in the fixed format of SPC-4 4.5.3.
//!
//! Every error path in the command set ends in a [`Sense`]; this module is
//! the only place that knows the byte layout, so the rest of the code talks
//! in sense keys and additional sense codes.

use bytes::Bytes;

/// Sense keys (SPC-4 table 27).
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const ABORTED_COMMAND: u8 = 0xB;
    pub const MISCOMPARE: u8 = 0xE;
}

/// Length of fixed-format sense data with the standard 10 additional bytes.
pub const FIXED_SENSE_LEN: usize = 18;

/// Where in the CDB or parameter list the offending field is (the
/// sense-key specific "field pointer", SPC-4 4.5.2.4.2). It lets an
/// initiator's log say exactly which bit we objected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldPointer {
    /// True when the field is in the CDB, false for the parameter list.
    pub in_cdb: bool,
    /// Byte offset of the field.
    pub byte: u16,
    /// Most significant bit of the field within that byte, if known.
    pub bit: Option<u8>,
}

/// One sense condition: key, additional sense code and qualifier, plus the
/// optional INFORMATION and field pointer parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// INFORMATION field (VALID bit set when present): the offset of the
    /// first miscompared byte for MISCOMPARE.
    pub information: Option<u32>,
    pub field: Option<FieldPointer>,
}

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            information: None,
            field: None,
        }
    }

    /// ILLEGAL REQUEST, INVALID FIELD IN CDB, pointing at `byte` (and `bit`).
    pub const fn invalid_cdb(byte: u16, bit: Option<u8>) -> Sense {
        Sense {
            field: Some(FieldPointer {
                in_cdb: true,
                byte,
                bit,
            }),
            ..INVALID_FIELD_IN_CDB
        }
    }

    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST, pointing at `byte`.
    pub const fn invalid_param(byte: u16, bit: Option<u8>) -> Sense {
        Sense {
            field: Some(FieldPointer {
                in_cdb: false,
                byte,
                bit,
            }),
            ..INVALID_FIELD_IN_PARAMETER_LIST
        }
    }

    /// This sense with the INFORMATION field set (and VALID).
    pub const fn with_information(self, information: u32) -> Sense {
        Sense {
            information: Some(information),
            ..self
        }
    }

    /// The additional sense code and qualifier as one number (ASC << 8 | ASCQ).
    pub const fn code(&self) -> u16 {
        ((self.asc as u16) << 8) | self.ascq as u16
    }

    /// Fixed-format sense data (response code 70h, current error).
    pub fn to_fixed(&self) -> Bytes {
        let mut s = [0u8; FIXED_SENSE_LEN];
        s[0] = 0x70;
        if let Some(info) = self.information {
            s[0] |= 0x80;
            s[3..7].copy_from_slice(&info.to_be_bytes());
        }
        s[2] = self.key & 0x0f;
        // ADDITIONAL SENSE LENGTH: bytes 8..18.
        s[7] = (FIXED_SENSE_LEN - 8) as u8;
        s[12] = self.asc;
        s[13] = self.ascq;
        if let Some(f) = self.field {
            let mut b = 0x80; // SKSV
            if f.in_cdb {
                b |= 0x40; // C/D
            }
            if let Some(bit) = f.bit {
                b |= 0x08 | (bit & 0x07); // BPV + bit pointer
            }
            s[15] = b;
            s[16..18].copy_from_slice(&f.byte.to_be_bytes());
        }
        Bytes::copy_from_slice(&s)
    }
}

macro_rules! sense_consts {
    ($($(#[$m:meta])* $name:ident = $key:ident, $asc:literal, $ascq:literal;)*) => {
        $($(#[$m])* pub const $name: Sense = Sense::new(key::$key, $asc, $ascq);)*
    };
}

sense_consts! {
    /// "No error": what REQUEST SENSE returns when nothing is pending.
    NO_SENSE = NO_SENSE, 0x00, 0x00;
    INVALID_COMMAND_OPERATION_CODE = ILLEGAL_REQUEST, 0x20, 0x00;
    LBA_OUT_OF_RANGE = ILLEGAL_REQUEST, 0x21, 0x00;
    INVALID_FIELD_IN_CDB = ILLEGAL_REQUEST, 0x24, 0x00;
    LOGICAL_UNIT_NOT_SUPPORTED = ILLEGAL_REQUEST, 0x25, 0x00;
    INVALID_FIELD_IN_PARAMETER_LIST = ILLEGAL_REQUEST, 0x26, 0x00;
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION = ILLEGAL_REQUEST, 0x26, 0x04;
    PARAMETER_LIST_LENGTH_ERROR = ILLEGAL_REQUEST, 0x1a, 0x00;
    /// The Data-Out the initiator sent does not fit what the CDB describes.
    INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT = ILLEGAL_REQUEST, 0x0e, 0x03;
    SAVING_PARAMETERS_NOT_SUPPORTED = ILLEGAL_REQUEST, 0x39, 0x00;
    INSUFFICIENT_REGISTRATION_RESOURCES = ILLEGAL_REQUEST, 0x55, 0x04;
    WRITE_PROTECTED = DATA_PROTECT, 0x27, 0x00;
    SOFTWARE_WRITE_PROTECTED = DATA_PROTECT, 0x27, 0x02;
    /// Thin provisioning ran out of space (SBC-3 4.7.3.7).
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT = DATA_PROTECT, 0x27, 0x07;
    UNRECOVERED_READ_ERROR = MEDIUM_ERROR, 0x11, 0x00;
    WRITE_ERROR = MEDIUM_ERROR, 0x0c, 0x00;
    MISCOMPARE_DURING_VERIFY = MISCOMPARE, 0x1d, 0x00;
    INTERNAL_TARGET_FAILURE = HARDWARE_ERROR, 0x44, 0x00;
    POWER_ON_OCCURRED = UNIT_ATTENTION, 0x29, 0x01;
    BUS_DEVICE_RESET_OCCURRED = UNIT_ATTENTION, 0x29, 0x03;
    I_T_NEXUS_LOSS_OCCURRED = UNIT_ATTENTION, 0x29, 0x07;
    MODE_PARAMETERS_CHANGED = UNIT_ATTENTION, 0x2a, 0x01;
    RESERVATIONS_PREEMPTED = UNIT_ATTENTION, 0x2a, 0x03;
    RESERVATIONS_RELEASED = UNIT_ATTENTION, 0x2a, 0x04;
    REGISTRATIONS_PREEMPTED = UNIT_ATTENTION, 0x2a, 0x05;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_layout() {
        let s = LBA_OUT_OF_RANGE.to_fixed();
        assert_eq!(s.len(), 18);
        assert_eq!(s[0], 0x70);
        assert_eq!(s[2], 0x05);
        assert_eq!(s[7], 10);
        assert_eq!((s[12], s[13]), (0x21, 0x00));
        assert_eq!(&s[15..18], &[0, 0, 0]);
    }

    #[test]
    fn information_sets_valid() {
        let s = MISCOMPARE_DURING_VERIFY
            .with_information(0x0102_0304)
            .to_fixed();
        assert_eq!(s[0], 0xf0);
        assert_eq!(s[2], 0x0e);
        assert_eq!(&s[3..7], &[1, 2, 3, 4]);
        assert_eq!((s[12], s[13]), (0x1d, 0x00));
    }

    #[test]
    fn field_pointer_encoding() {
        let s = Sense::invalid_cdb(2, Some(5)).to_fixed();
        assert_eq!((s[12], s[13]), (0x24, 0x00));
        assert_eq!(s[15], 0x80 | 0x40 | 0x08 | 5);
        assert_eq!(&s[16..18], &[0, 2]);
        let p = Sense::invalid_param(300, None).to_fixed();
        assert_eq!((p[12], p[13]), (0x26, 0x00));
        assert_eq!(p[15], 0x80);
        assert_eq!(&p[16..18], &300u16.to_be_bytes());
    }
}
