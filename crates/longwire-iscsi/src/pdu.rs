//! The iSCSI PDU codec (RFC 7143 §11), sans-IO.
//!
//! A PDU on the wire is a 48-byte Basic Header Segment ([`Bhs`]), optional
//! Additional Header Segments (`TotalAHSLength` 4-byte words), an optional
//! header digest, the data segment padded to a multiple of 4, and an
//! optional data digest. [`Layout`] says how many bytes follow a BHS;
//! [`decode_frame`] checks lengths and digests and gives a [`RawPdu`];
//! [`Pdu::parse`] turns that into a typed PDU. [`Pdu::to_raw`] and
//! [`Frame::encode`] go the other way. Every opcode either side sends is
//! covered, so tests (and test clients) can speak both roles.

use bytes::{BufMut, Bytes, BytesMut};

use crate::digest::{self, Digests};

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// The "no tag" value of Initiator/Target Transfer Tags.
pub const RESERVED_TAG: u32 = 0xffff_ffff;
/// Largest data segment the 24-bit DataSegmentLength can describe.
pub const MAX_DATA_SEGMENT: u32 = (1 << 24) - 1;

/// Opcodes (RFC 7143 §11.2.1.2).
pub mod op {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MGMT_REQ: u8 = 0x02;
    pub const LOGIN_REQ: u8 = 0x03;
    pub const TEXT_REQ: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQ: u8 = 0x06;
    pub const SNACK_REQ: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MGMT_RESP: u8 = 0x22;
    pub const LOGIN_RESP: u8 = 0x23;
    pub const TEXT_RESP: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESP: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MSG: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;

    /// Human-readable opcode name for logs.
    pub fn name(op: u8) -> &'static str {
        match op {
            NOP_OUT => "NOP-Out",
            SCSI_COMMAND => "SCSI Command",
            TASK_MGMT_REQ => "Task Management Request",
            LOGIN_REQ => "Login Request",
            TEXT_REQ => "Text Request",
            DATA_OUT => "SCSI Data-Out",
            LOGOUT_REQ => "Logout Request",
            SNACK_REQ => "SNACK Request",
            NOP_IN => "NOP-In",
            SCSI_RESPONSE => "SCSI Response",
            TASK_MGMT_RESP => "Task Management Response",
            LOGIN_RESP => "Login Response",
            TEXT_RESP => "Text Response",
            DATA_IN => "SCSI Data-In",
            LOGOUT_RESP => "Logout Response",
            R2T => "R2T",
            ASYNC_MSG => "Asynchronous Message",
            REJECT => "Reject",
            _ => "unknown opcode",
        }
    }
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_DATA_ACK: u8 = 0x08;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const LONG_OP_REJECT: u8 = 0x0a;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// Task management functions (RFC 7143 §11.5.1).
pub mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LOGICAL_UNIT_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    pub const TASK_REASSIGN: u8 = 8;

    /// Task management responses (RFC 7143 §11.6.1).
    pub const FUNCTION_COMPLETE: u8 = 0;
    pub const TASK_DOES_NOT_EXIST: u8 = 1;
    pub const LUN_DOES_NOT_EXIST: u8 = 2;
    pub const TASK_STILL_ALLEGIANT: u8 = 3;
    pub const REASSIGNMENT_NOT_SUPPORTED: u8 = 4;
    pub const NOT_SUPPORTED: u8 = 5;
    pub const AUTHORIZATION_FAILED: u8 = 6;
    pub const FUNCTION_REJECTED: u8 = 255;
}

/// Login status classes and details (RFC 7143 §11.13.5), as (class, detail).
pub mod login_status {
    pub const SUCCESS: (u8, u8) = (0x00, 0x00);
    pub const TARGET_MOVED_TEMPORARILY: (u8, u8) = (0x01, 0x01);
    pub const TARGET_MOVED_PERMANENTLY: (u8, u8) = (0x01, 0x02);
    pub const INITIATOR_ERROR: (u8, u8) = (0x02, 0x00);
    pub const AUTHENTICATION_FAILURE: (u8, u8) = (0x02, 0x01);
    pub const AUTHORIZATION_FAILURE: (u8, u8) = (0x02, 0x02);
    pub const NOT_FOUND: (u8, u8) = (0x02, 0x03);
    pub const TARGET_REMOVED: (u8, u8) = (0x02, 0x04);
    pub const UNSUPPORTED_VERSION: (u8, u8) = (0x02, 0x05);
    pub const TOO_MANY_CONNECTIONS: (u8, u8) = (0x02, 0x06);
    pub const MISSING_PARAMETER: (u8, u8) = (0x02, 0x07);
    pub const CANT_INCLUDE_IN_SESSION: (u8, u8) = (0x02, 0x08);
    pub const SESSION_TYPE_NOT_SUPPORTED: (u8, u8) = (0x02, 0x09);
    pub const SESSION_DOES_NOT_EXIST: (u8, u8) = (0x02, 0x0a);
    pub const INVALID_DURING_LOGIN: (u8, u8) = (0x02, 0x0b);
    pub const TARGET_ERROR: (u8, u8) = (0x03, 0x00);
    pub const SERVICE_UNAVAILABLE: (u8, u8) = (0x03, 0x01);
    pub const OUT_OF_RESOURCES: (u8, u8) = (0x03, 0x02);
}

/// Login stages (CSG/NSG values).
pub mod stage {
    pub const SECURITY: u8 = 0;
    pub const OPERATIONAL: u8 = 1;
    pub const FULL_FEATURE: u8 = 3;
}

/// AHS types (RFC 7143 §11.2.2.1).
pub mod ahs {
    pub const EXTENDED_CDB: u8 = 1;
    pub const BIDI_READ_LENGTH: u8 = 2;
}

/// A raw 48-byte Basic Header Segment with field accessors.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bhs({} itt={:#x} dsl={})", op::name(self.opcode()), self.itt(), self.data_len())
    }
}

impl Default for Bhs {
    fn default() -> Self {
        Bhs([0u8; BHS_LEN])
    }
}

impl Bhs {
    pub fn new(opcode: u8) -> Bhs {
        let mut b = Bhs::default();
        b.0[0] = opcode & 0x3f;
        b
    }
    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }
    /// The I (immediate delivery) bit.
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }
    pub fn set_immediate(&mut self, on: bool) {
        if on {
            self.0[0] |= 0x40;
        } else {
            self.0[0] &= !0x40;
        }
    }
    /// Byte 1: the F bit and opcode-specific flags.
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }
    /// TotalAHSLength in bytes.
    pub fn ahs_len(&self) -> usize {
        self.0[4] as usize * 4
    }
    pub fn data_len(&self) -> u32 {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]])
    }
    pub fn set_data_len(&mut self, len: u32) {
        let b = len.to_be_bytes();
        self.0[5..8].copy_from_slice(&b[1..4]);
    }
    pub fn lun(&self) -> u64 {
        self.u64_at(8)
    }
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_be_bytes([self.0[off], self.0[off + 1]])
    }
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_be_bytes(self.0[off..off + 4].try_into().unwrap())
    }
    pub fn u64_at(&self, off: usize) -> u64 {
        u64::from_be_bytes(self.0[off..off + 8].try_into().unwrap())
    }
    pub fn set_u16(&mut self, off: usize, v: u16) {
        self.0[off..off + 2].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }
    /// StatSN, ExpCmdSN and MaxCmdSN of a target PDU (bytes 24..36).
    pub fn set_sequence(&mut self, stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32) {
        self.set_u32(24, stat_sn);
        self.set_u32(28, exp_cmd_sn);
        self.set_u32(32, max_cmd_sn);
    }
}

/// Round up to a multiple of 4.
pub fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// What follows a BHS on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub ahs_len: usize,
    pub header_digest: bool,
    pub data_len: usize,
    pub data_digest: bool,
}

impl Layout {
    pub fn of(bhs: &Bhs, digests: Digests) -> Layout {
        let data_len = bhs.data_len() as usize;
        Layout {
            ahs_len: bhs.ahs_len(),
            header_digest: digests.header,
            data_len,
            data_digest: digests.data && data_len > 0,
        }
    }
    /// Bytes after the BHS up to and including the header digest.
    pub fn header_rest(&self) -> usize {
        self.ahs_len + if self.header_digest { 4 } else { 0 }
    }
    /// Bytes of the data segment on the wire: padding and digest included.
    pub fn data_wire(&self) -> usize {
        if self.data_len == 0 {
            0
        } else {
            pad4(self.data_len) + if self.data_digest { 4 } else { 0 }
        }
    }
    /// Everything after the BHS.
    pub fn rest(&self) -> usize {
        self.header_rest() + self.data_wire()
    }
}

/// A PDU as framed, digests checked and stripped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawPdu {
    pub bhs: Bhs,
    pub ahs: Bytes,
    pub data: Bytes,
}

/// Framing errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header cannot be trusted; the connection must end.
    #[error("header digest mismatch (got {got:#010x}, computed {want:#010x})")]
    HeaderDigest { got: u32, want: u32 },
    /// The header is fine but the data is corrupt: Reject and discard.
    #[error("data digest mismatch (got {got:#010x}, computed {want:#010x})")]
    DataDigest { got: u32, want: u32 },
    #[error("PDU is {got} bytes after the BHS, expected {want}")]
    Length { got: usize, want: usize },
}

/// Decode everything after a BHS (`rest`, of `Layout::rest()` bytes).
/// On a data digest error the header is still usable: the caller gets it
/// back inside the error path via [`decode_frame_header`].
pub fn decode_frame(bhs: Bhs, rest: &[u8], digests: Digests) -> Result<RawPdu, FrameError> {
    let layout = Layout::of(&bhs, digests);
    if rest.len() != layout.rest() {
        return Err(FrameError::Length { got: rest.len(), want: layout.rest() });
    }
    let ahs = &rest[..layout.ahs_len];
    let mut pos = layout.ahs_len;
    if layout.header_digest {
        let got = digest::from_wire(rest[pos..pos + 4].try_into().unwrap());
        let want = digest::crc32c_append(digest::crc32c(&bhs.0), ahs);
        if got != want {
            return Err(FrameError::HeaderDigest { got, want });
        }
        pos += 4;
    }
    let data = &rest[pos..pos + layout.data_len];
    if layout.data_digest {
        let padded = &rest[pos..pos + pad4(layout.data_len)];
        let dpos = pos + pad4(layout.data_len);
        let got = digest::from_wire(rest[dpos..dpos + 4].try_into().unwrap());
        let want = digest::crc32c(padded);
        if got != want {
            return Err(FrameError::DataDigest { got, want });
        }
    }
    Ok(RawPdu { bhs, ahs: Bytes::copy_from_slice(ahs), data: Bytes::copy_from_slice(data) })
}

/// Check only the header digest of a frame (used to decide whether a PDU
/// with a data digest error can still be answered with a Reject).
pub fn header_digest_ok(bhs: &Bhs, ahs_and_digest: &[u8], digests: Digests) -> bool {
    if !digests.header {
        return true;
    }
    let n = bhs.ahs_len();
    if ahs_and_digest.len() < n + 4 {
        return false;
    }
    let got = digest::from_wire(ahs_and_digest[n..n + 4].try_into().unwrap());
    got == digest::crc32c_append(digest::crc32c(&bhs.0), &ahs_and_digest[..n])
}

/// An encoded PDU ready for the socket: written as the listed pieces in order.
#[derive(Debug, Clone)]
pub struct Frame {
    pub pieces: Vec<Bytes>,
}

impl Frame {
    /// Encode without copying the data segment: header, data, then a small
    /// tail with padding and data digest.
    pub fn encode(mut bhs: Bhs, ahs: &[u8], data: &Bytes, digests: Digests) -> Frame {
        bhs.0[4] = (ahs.len() / 4) as u8;
        bhs.set_data_len(data.len() as u32);
        let mut head = BytesMut::with_capacity(BHS_LEN + ahs.len() + 4);
        head.put_slice(&bhs.0);
        head.put_slice(ahs);
        if digests.header {
            let crc = digest::crc32c(&head);
            head.put_slice(&digest::to_wire(crc));
        }
        let mut pieces = vec![head.freeze()];
        if !data.is_empty() {
            pieces.push(data.clone());
            let pad = pad4(data.len()) - data.len();
            if pad > 0 || digests.data {
                let mut tail = BytesMut::with_capacity(8);
                tail.put_bytes(0, pad);
                if digests.data {
                    let crc = digest::crc32c_append(digest::crc32c(data), &tail);
                    tail.put_slice(&digest::to_wire(crc));
                }
                pieces.push(tail.freeze());
            }
        }
        Frame { pieces }
    }

    pub fn len(&self) -> usize {
        self.pieces.iter().map(|p| p.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All pieces in one buffer (tests).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        for p in &self.pieces {
            v.extend_from_slice(p);
        }
        v
    }
}

/// Split a byte stream holding whole frames into raw PDUs (tests and test
/// clients). Stops at the first incomplete frame and returns what remains.
pub fn split_frames(mut buf: &[u8], digests: Digests) -> Result<(Vec<RawPdu>, usize), FrameError> {
    let mut out = Vec::new();
    let mut used = 0;
    while buf.len() >= BHS_LEN {
        let bhs = Bhs(buf[..BHS_LEN].try_into().unwrap());
        let layout = Layout::of(&bhs, digests);
        if buf.len() < BHS_LEN + layout.rest() {
            break;
        }
        out.push(decode_frame(bhs, &buf[BHS_LEN..BHS_LEN + layout.rest()], digests)?);
        used += BHS_LEN + layout.rest();
        buf = &buf[BHS_LEN + layout.rest()..];
    }
    Ok((out, used))
}

// ---------------------------------------------------------------------------
// Typed PDUs
// ---------------------------------------------------------------------------

/// Why a raw PDU could not be understood; the target answers with a
/// Reject carrying `reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    pub reason: u8,
    pub message: String,
}

fn bad(reason: u8, message: impl Into<String>) -> ParseError {
    ParseError { reason, message: message.into() }
}

/// NOP-Out (initiator ping or answer to a target ping).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data: Bytes,
}

/// NOP-In (answer to a ping, or a target ping when `ttt` is not reserved).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NopIn {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data: Bytes,
}

/// SCSI Command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScsiCommand {
    pub immediate: bool,
    /// F: no unsolicited Data-Out PDUs follow.
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    pub attr: u8,
    pub lun: u64,
    pub itt: u32,
    pub expected_len: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    /// The CDB: 16 bytes from the BHS, plus an Extended CDB AHS if present.
    pub cdb: Bytes,
    /// Expected read length of a bidirectional command (AHS type 2).
    pub bidi_read_len: Option<u32>,
    /// Immediate data.
    pub data: Bytes,
}

/// SCSI Response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScsiResponse {
    pub bidi_overflow: bool,
    pub bidi_underflow: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// 0: command completed at target; 1: target failure.
    pub response: u8,
    pub status: u8,
    pub itt: u32,
    pub snack_tag: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_data_sn: u32,
    pub bidi_residual: u32,
    pub residual: u32,
    /// Sense data (without the 2-byte SenseLength prefix).
    pub sense: Bytes,
}

/// Task Management Function Request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    pub function: u8,
    pub lun: u64,
    pub itt: u32,
    pub ref_task_tag: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
    pub exp_data_sn: u32,
}

/// Task Management Function Response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskMgmtResponse {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Login Request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoginRequest {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    /// 48-bit ISID.
    pub isid: u64,
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data: Bytes,
}

/// Login Response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: u64,
    pub tsih: u16,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub status_class: u8,
    pub status_detail: u8,
    pub data: Bytes,
}

/// Text Request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data: Bytes,
}

/// Text Response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextResponse {
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data: Bytes,
}

/// SCSI Data-Out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataOut {
    pub final_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub data: Bytes,
}

/// SCSI Data-In.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataIn {
    pub final_: bool,
    pub ack: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// S: the PDU carries the command's status.
    pub has_status: bool,
    pub status: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub residual: u32,
    pub data: Bytes,
}

/// Logout Request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogoutRequest {
    pub immediate: bool,
    /// 0: close the session; 1: close the connection; 2: remove the
    /// connection for recovery.
    pub reason: u8,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Logout Response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogoutResponse {
    /// 0: closed successfully; 1: CID not found; 2: connection recovery
    /// not supported; 3: cleanup failed.
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub time2wait: u16,
    pub time2retain: u16,
}

/// Ready To Transfer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct R2t {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_len: u32,
}

/// Asynchronous Message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AsyncMessage {
    pub lun: u64,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    /// 0: SCSI async event; 1: target requests logout; 2: target will drop
    /// the connection; 3: ... drop all connections; 4: requests parameter
    /// negotiation.
    pub event: u8,
    pub vcode: u8,
    pub param1: u16,
    pub param2: u16,
    pub param3: u16,
    pub data: Bytes,
}

/// Async events (RFC 7143 §11.9.1).
pub mod async_event {
    pub const SCSI_EVENT: u8 = 0;
    pub const REQUEST_LOGOUT: u8 = 1;
    pub const DROP_CONNECTION: u8 = 2;
    pub const DROP_ALL_CONNECTIONS: u8 = 3;
    pub const REQUEST_NEGOTIATION: u8 = 4;
}

/// Reject.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reject {
    pub reason: u8,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    /// The header of the rejected PDU.
    pub header: Bytes,
}

/// SNACK Request (only parsed, so it can be rejected at ERL 0).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snack {
    pub snack_type: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub beg_run: u32,
    pub run_length: u32,
}

/// Every PDU either side sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pdu {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    Snack(Snack),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
}

fn flag(b: u8, mask: u8) -> bool {
    b & mask != 0
}

fn bit(on: bool, mask: u8) -> u8 {
    if on {
        mask
    } else {
        0
    }
}

fn isid_of(bhs: &Bhs) -> u64 {
    let mut b = [0u8; 8];
    b[2..8].copy_from_slice(&bhs.0[8..14]);
    u64::from_be_bytes(b)
}

fn set_isid(bhs: &mut Bhs, isid: u64) {
    bhs.0[8..14].copy_from_slice(&isid.to_be_bytes()[2..8]);
}

/// Parse the AHS list of a SCSI Command: (extended CDB bytes, bidi read length).
fn parse_command_ahs(mut ahs: &[u8]) -> Result<(Option<Bytes>, Option<u32>), ParseError> {
    let mut ext = None;
    let mut bidi = None;
    while !ahs.is_empty() {
        if ahs.len() < 4 {
            return Err(bad(reject::PROTOCOL_ERROR, "truncated AHS"));
        }
        let len = u16::from_be_bytes([ahs[0], ahs[1]]) as usize;
        let typ = ahs[2];
        let total = pad4(3 + len);
        if ahs.len() < total {
            return Err(bad(reject::PROTOCOL_ERROR, "AHS longer than TotalAHSLength"));
        }
        // The AHS-specific bytes start after type (byte 2) with one
        // reserved byte (byte 3) for both defined types.
        match typ {
            ahs::EXTENDED_CDB => {
                if len < 1 {
                    return Err(bad(reject::INVALID_PDU_FIELD, "empty extended CDB AHS"));
                }
                ext = Some(Bytes::copy_from_slice(&ahs[4..3 + len]));
            }
            ahs::BIDI_READ_LENGTH => {
                if len != 5 {
                    return Err(bad(reject::INVALID_PDU_FIELD, "bidirectional read length AHS must have length 5"));
                }
                bidi = Some(u32::from_be_bytes(ahs[4..8].try_into().unwrap()));
            }
            _ => return Err(bad(reject::INVALID_PDU_FIELD, format!("unknown AHS type {typ}"))),
        }
        ahs = &ahs[total..];
    }
    Ok((ext, bidi))
}

impl Pdu {
    /// The opcode this PDU is sent with.
    pub fn opcode(&self) -> u8 {
        match self {
            Pdu::NopOut(_) => op::NOP_OUT,
            Pdu::ScsiCommand(_) => op::SCSI_COMMAND,
            Pdu::TaskMgmtRequest(_) => op::TASK_MGMT_REQ,
            Pdu::LoginRequest(_) => op::LOGIN_REQ,
            Pdu::TextRequest(_) => op::TEXT_REQ,
            Pdu::DataOut(_) => op::DATA_OUT,
            Pdu::LogoutRequest(_) => op::LOGOUT_REQ,
            Pdu::Snack(_) => op::SNACK_REQ,
            Pdu::NopIn(_) => op::NOP_IN,
            Pdu::ScsiResponse(_) => op::SCSI_RESPONSE,
            Pdu::TaskMgmtResponse(_) => op::TASK_MGMT_RESP,
            Pdu::LoginResponse(_) => op::LOGIN_RESP,
            Pdu::TextResponse(_) => op::TEXT_RESP,
            Pdu::DataIn(_) => op::DATA_IN,
            Pdu::LogoutResponse(_) => op::LOGOUT_RESP,
            Pdu::R2t(_) => op::R2T,
            Pdu::AsyncMessage(_) => op::ASYNC_MSG,
            Pdu::Reject(_) => op::REJECT,
        }
    }

    /// Parse a framed PDU. Unknown opcodes fail with
    /// `COMMAND_NOT_SUPPORTED`; malformed fields with `INVALID_PDU_FIELD`
    /// or `PROTOCOL_ERROR`.
    pub fn parse(raw: &RawPdu) -> Result<Pdu, ParseError> {
        let b = &raw.bhs;
        let f = b.flags();
        let data = raw.data.clone();
        let no_ahs = |what: &str| -> Result<(), ParseError> {
            if raw.ahs.is_empty() {
                Ok(())
            } else {
                Err(bad(reject::PROTOCOL_ERROR, format!("{what} must not carry an AHS")))
            }
        };
        Ok(match b.opcode() {
            op::NOP_OUT => {
                no_ahs("NOP-Out")?;
                Pdu::NopOut(NopOut {
                    immediate: b.immediate(),
                    lun: b.lun(),
                    itt: b.itt(),
                    ttt: b.u32_at(20),
                    cmd_sn: b.u32_at(24),
                    exp_stat_sn: b.u32_at(28),
                    data,
                })
            }
            op::SCSI_COMMAND => {
                let (ext, bidi) = parse_command_ahs(&raw.ahs)?;
                let mut cdb = BytesMut::from(&b.0[32..48]);
                if let Some(e) = ext {
                    cdb.extend_from_slice(&e);
                }
                Pdu::ScsiCommand(ScsiCommand {
                    immediate: b.immediate(),
                    final_: flag(f, 0x80),
                    read: flag(f, 0x40),
                    write: flag(f, 0x20),
                    attr: f & 0x07,
                    lun: b.lun(),
                    itt: b.itt(),
                    expected_len: b.u32_at(20),
                    cmd_sn: b.u32_at(24),
                    exp_stat_sn: b.u32_at(28),
                    cdb: cdb.freeze(),
                    bidi_read_len: bidi,
                    data,
                })
            }
            op::TASK_MGMT_REQ => {
                no_ahs("Task Management Request")?;
                if !b.final_bit() {
                    return Err(bad(reject::PROTOCOL_ERROR, "Task Management Request without the F bit"));
                }
                Pdu::TaskMgmtRequest(TaskMgmtRequest {
                    immediate: b.immediate(),
                    function: f & 0x7f,
                    lun: b.lun(),
                    itt: b.itt(),
                    ref_task_tag: b.u32_at(20),
                    cmd_sn: b.u32_at(24),
                    exp_stat_sn: b.u32_at(28),
                    ref_cmd_sn: b.u32_at(32),
                    exp_data_sn: b.u32_at(36),
                })
            }
            op::LOGIN_REQ => Pdu::LoginRequest(LoginRequest {
                transit: flag(f, 0x80),
                cont: flag(f, 0x40),
                csg: (f >> 2) & 3,
                nsg: f & 3,
                version_max: b.0[2],
                version_min: b.0[3],
                isid: isid_of(b),
                tsih: b.u16_at(14),
                itt: b.itt(),
                cid: b.u16_at(20),
                cmd_sn: b.u32_at(24),
                exp_stat_sn: b.u32_at(28),
                data,
            }),
            op::TEXT_REQ => {
                no_ahs("Text Request")?;
                Pdu::TextRequest(TextRequest {
                    immediate: b.immediate(),
                    final_: flag(f, 0x80),
                    cont: flag(f, 0x40),
                    lun: b.lun(),
                    itt: b.itt(),
                    ttt: b.u32_at(20),
                    cmd_sn: b.u32_at(24),
                    exp_stat_sn: b.u32_at(28),
                    data,
                })
            }
            op::DATA_OUT => {
                no_ahs("Data-Out")?;
                Pdu::DataOut(DataOut {
                    final_: flag(f, 0x80),
                    lun: b.lun(),
                    itt: b.itt(),
                    ttt: b.u32_at(20),
                    exp_stat_sn: b.u32_at(28),
                    data_sn: b.u32_at(36),
                    buffer_offset: b.u32_at(40),
                    data,
                })
            }
            op::LOGOUT_REQ => {
                no_ahs("Logout Request")?;
                Pdu::LogoutRequest(LogoutRequest {
                    immediate: b.immediate(),
                    reason: f & 0x7f,
                    itt: b.itt(),
                    cid: b.u16_at(20),
                    cmd_sn: b.u32_at(24),
                    exp_stat_sn: b.u32_at(28),
                })
            }
            op::SNACK_REQ => Pdu::Snack(Snack {
                snack_type: f & 0x0f,
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                exp_stat_sn: b.u32_at(28),
                beg_run: b.u32_at(40),
                run_length: b.u32_at(44),
            }),
            op::NOP_IN => Pdu::NopIn(NopIn {
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                stat_sn: b.u32_at(24),
                exp_cmd_sn: b.u32_at(28),
                max_cmd_sn: b.u32_at(32),
                data,
            }),
            op::SCSI_RESPONSE => {
                let sense = if data.len() >= 2 {
                    let n = u16::from_be_bytes([data[0], data[1]]) as usize;
                    data.slice(2..(2 + n).min(data.len()))
                } else {
                    Bytes::new()
                };
                Pdu::ScsiResponse(ScsiResponse {
                    bidi_overflow: flag(f, 0x10),
                    bidi_underflow: flag(f, 0x08),
                    overflow: flag(f, 0x04),
                    underflow: flag(f, 0x02),
                    response: b.0[2],
                    status: b.0[3],
                    itt: b.itt(),
                    snack_tag: b.u32_at(20),
                    stat_sn: b.u32_at(24),
                    exp_cmd_sn: b.u32_at(28),
                    max_cmd_sn: b.u32_at(32),
                    exp_data_sn: b.u32_at(36),
                    bidi_residual: b.u32_at(40),
                    residual: b.u32_at(44),
                    sense,
                })
            }
            op::TASK_MGMT_RESP => Pdu::TaskMgmtResponse(TaskMgmtResponse {
                response: b.0[2],
                itt: b.itt(),
                stat_sn: b.u32_at(24),
                exp_cmd_sn: b.u32_at(28),
                max_cmd_sn: b.u32_at(32),
            }),
            op::LOGIN_RESP => Pdu::LoginResponse(LoginResponse {
                transit: flag(f, 0x80),
                cont: flag(f, 0x40),
                csg: (f >> 2) & 3,
                nsg: f & 3,
                version_max: b.0[2],
                version_active: b.0[3],
                isid: isid_of(b),
                tsih: b.u16_at(14),
                itt: b.itt(),
                stat_sn: b.u32_at(24),
                exp_cmd_sn: b.u32_at(28),
                max_cmd_sn: b.u32_at(32),
                status_class: b.0[36],
                status_detail: b.0[37],
                data,
            }),
            op::TEXT_RESP => Pdu::TextResponse(TextResponse {
                final_: flag(f, 0x80),
                cont: flag(f, 0x40),
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                stat_sn: b.u32_at(24),
                exp_cmd_sn: b.u32_at(28),
                max_cmd_sn: b.u32_at(32),
                data,
            }),
            op::DATA_IN => Pdu::DataIn(DataIn {
                final_: flag(f, 0x80),
                ack: flag(f, 0x40),
                overflow: flag(f, 0x04),
                underflow: flag(f, 0x02),
                has_status: flag(f, 0x01),
                status: b.0[3],
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                stat_sn: b.u32_at(24),
                exp_cmd_sn: b.u32_at(28),
                max_cmd_sn: b.u32_at(32),
                data_sn: b.u32_at(36),
                buffer_offset: b.u32_at(40),
                residual: b.u32_at(44),
                data,
            }),
            op::LOGOUT_RESP => Pdu::LogoutResponse(LogoutResponse {
                response: b.0[2],
                itt: b.itt(),
                stat_sn: b.u32_at(24),
                exp_cmd_sn: b.u32_at(28),
                max_cmd_sn: b.u32_at(32),
                time2wait: b.u16_at(40),
                time2retain: b.u16_at(42),
            }),
            op::R2T => Pdu::R2t(R2t {
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                stat_sn: b.u32_at(24),
                exp_cmd_sn: b.u32_at(28),
                max_cmd_sn: b.u32_at(32),
                r2t_sn: b.u32_at(36),
                buffer_offset: b.u32_at(40),
                desired_len: b.u32_at(44),
            }),
            op::ASYNC_MSG => Pdu::AsyncMessage(AsyncMessage {
                lun: b.lun(),
                stat_sn: b.u32_at(24),
                exp_cmd_sn: b.u32_at(28),
                max_cmd_sn: b.u32_at(32),
                event: b.0[36],
                vcode: b.0[37],
                param1: b.u16_at(38),
                param2: b.u16_at(40),
                param3: b.u16_at(42),
                data,
            }),
            op::REJECT => Pdu::Reject(Reject {
                reason: b.0[2],
                stat_sn: b.u32_at(24),
                exp_cmd_sn: b.u32_at(28),
                max_cmd_sn: b.u32_at(32),
                data_sn: b.u32_at(36),
                header: data,
            }),
            other => {
                return Err(bad(reject::COMMAND_NOT_SUPPORTED, format!("opcode {other:#04x} is not supported")));
            }
        })
    }

    /// Build the BHS, AHS and data segment of this PDU.
    pub fn to_raw(&self) -> RawPdu {
        let mut b = Bhs::new(self.opcode());
        let mut ahs = BytesMut::new();
        let data: Bytes;
        match self {
            Pdu::NopOut(p) => {
                b.set_immediate(p.immediate);
                b.0[1] = 0x80;
                b.set_u64(8, p.lun);
                b.set_u32(16, p.itt);
                b.set_u32(20, p.ttt);
                b.set_u32(24, p.cmd_sn);
                b.set_u32(28, p.exp_stat_sn);
                data = p.data.clone();
            }
            Pdu::ScsiCommand(p) => {
                b.set_immediate(p.immediate);
                b.0[1] = bit(p.final_, 0x80) | bit(p.read, 0x40) | bit(p.write, 0x20) | (p.attr & 7);
                b.set_u64(8, p.lun);
                b.set_u32(16, p.itt);
                b.set_u32(20, p.expected_len);
                b.set_u32(24, p.cmd_sn);
                b.set_u32(28, p.exp_stat_sn);
                let n = p.cdb.len().min(16);
                b.0[32..32 + n].copy_from_slice(&p.cdb[..n]);
                if p.cdb.len() > 16 {
                    let ext = &p.cdb[16..];
                    ahs.put_u16(ext.len() as u16 + 1);
                    ahs.put_u8(ahs::EXTENDED_CDB);
                    ahs.put_u8(0);
                    ahs.put_slice(ext);
                    while !ahs.len().is_multiple_of(4) {
                        ahs.put_u8(0);
                    }
                }
                if let Some(len) = p.bidi_read_len {
                    ahs.put_u16(5);
                    ahs.put_u8(ahs::BIDI_READ_LENGTH);
                    ahs.put_u8(0);
                    ahs.put_u32(len);
                }
                data = p.data.clone();
            }
            Pdu::TaskMgmtRequest(p) => {
                b.set_immediate(p.immediate);
                b.0[1] = 0x80 | (p.function & 0x7f);
                b.set_u64(8, p.lun);
                b.set_u32(16, p.itt);
                b.set_u32(20, p.ref_task_tag);
                b.set_u32(24, p.cmd_sn);
                b.set_u32(28, p.exp_stat_sn);
                b.set_u32(32, p.ref_cmd_sn);
                b.set_u32(36, p.exp_data_sn);
                data = Bytes::new();
            }
            Pdu::LoginRequest(p) => {
                b.set_immediate(true);
                b.0[1] = bit(p.transit, 0x80) | bit(p.cont, 0x40) | ((p.csg & 3) << 2) | (p.nsg & 3);
                b.0[2] = p.version_max;
                b.0[3] = p.version_min;
                set_isid(&mut b, p.isid);
                b.set_u16(14, p.tsih);
                b.set_u32(16, p.itt);
                b.set_u16(20, p.cid);
                b.set_u32(24, p.cmd_sn);
                b.set_u32(28, p.exp_stat_sn);
                data = p.data.clone();
            }
            Pdu::TextRequest(p) => {
                b.set_immediate(p.immediate);
                b.0[1] = bit(p.final_, 0x80) | bit(p.cont, 0x40);
                b.set_u64(8, p.lun);
                b.set_u32(16, p.itt);
                b.set_u32(20, p.ttt);
                b.set_u32(24, p.cmd_sn);
                b.set_u32(28, p.exp_stat_sn);
                data = p.data.clone();
            }
            Pdu::DataOut(p) => {
                b.0[1] = bit(p.final_, 0x80);
                b.set_u64(8, p.lun);
                b.set_u32(16, p.itt);
                b.set_u32(20, p.ttt);
                b.set_u32(28, p.exp_stat_sn);
                b.set_u32(36, p.data_sn);
                b.set_u32(40, p.buffer_offset);
                data = p.data.clone();
            }
            Pdu::LogoutRequest(p) => {
                b.set_immediate(p.immediate);
                b.0[1] = 0x80 | (p.reason & 0x7f);
                b.set_u32(16, p.itt);
                b.set_u16(20, p.cid);
                b.set_u32(24, p.cmd_sn);
                b.set_u32(28, p.exp_stat_sn);
                data = Bytes::new();
            }
            Pdu::Snack(p) => {
                b.0[1] = 0x80 | (p.snack_type & 0x0f);
                b.set_u64(8, p.lun);
                b.set_u32(16, p.itt);
                b.set_u32(20, p.ttt);
                b.set_u32(28, p.exp_stat_sn);
                b.set_u32(40, p.beg_run);
                b.set_u32(44, p.run_length);
                data = Bytes::new();
            }
            Pdu::NopIn(p) => {
                b.0[1] = 0x80;
                b.set_u64(8, p.lun);
                b.set_u32(16, p.itt);
                b.set_u32(20, p.ttt);
                b.set_sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                data = p.data.clone();
            }
            Pdu::ScsiResponse(p) => {
                b.0[1] = 0x80
                    | bit(p.bidi_overflow, 0x10)
                    | bit(p.bidi_underflow, 0x08)
                    | bit(p.overflow, 0x04)
                    | bit(p.underflow, 0x02);
                b.0[2] = p.response;
                b.0[3] = p.status;
                b.set_u32(16, p.itt);
                b.set_u32(20, p.snack_tag);
                b.set_sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                b.set_u32(36, p.exp_data_sn);
                b.set_u32(40, p.bidi_residual);
                b.set_u32(44, p.residual);
                data = if p.sense.is_empty() {
                    Bytes::new()
                } else {
                    let mut d = BytesMut::with_capacity(2 + p.sense.len());
                    d.put_u16(p.sense.len() as u16);
                    d.put_slice(&p.sense);
                    d.freeze()
                };
            }
            Pdu::TaskMgmtResponse(p) => {
                b.0[1] = 0x80;
                b.0[2] = p.response;
                b.set_u32(16, p.itt);
                b.set_sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                data = Bytes::new();
            }
            Pdu::LoginResponse(p) => {
                b.0[1] = bit(p.transit, 0x80) | bit(p.cont, 0x40) | ((p.csg & 3) << 2) | (p.nsg & 3);
                b.0[2] = p.version_max;
                b.0[3] = p.version_active;
                set_isid(&mut b, p.isid);
                b.set_u16(14, p.tsih);
                b.set_u32(16, p.itt);
                b.set_sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                b.0[36] = p.status_class;
                b.0[37] = p.status_detail;
                data = p.data.clone();
            }
            Pdu::TextResponse(p) => {
                b.0[1] = bit(p.final_, 0x80) | bit(p.cont, 0x40);
                b.set_u64(8, p.lun);
                b.set_u32(16, p.itt);
                b.set_u32(20, p.ttt);
                b.set_sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                data = p.data.clone();
            }
            Pdu::DataIn(p) => {
                b.0[1] = bit(p.final_, 0x80)
                    | bit(p.ack, 0x40)
                    | bit(p.overflow, 0x04)
                    | bit(p.underflow, 0x02)
                    | bit(p.has_status, 0x01);
                b.0[3] = if p.has_status { p.status } else { 0 };
                b.set_u64(8, p.lun);
                b.set_u32(16, p.itt);
                b.set_u32(20, p.ttt);
                b.set_sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                b.set_u32(36, p.data_sn);
                b.set_u32(40, p.buffer_offset);
                b.set_u32(44, p.residual);
                data = p.data.clone();
            }
            Pdu::LogoutResponse(p) => {
                b.0[1] = 0x80;
                b.0[2] = p.response;
                b.set_u32(16, p.itt);
                b.set_sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                b.set_u16(40, p.time2wait);
                b.set_u16(42, p.time2retain);
                data = Bytes::new();
            }
            Pdu::R2t(p) => {
                b.0[1] = 0x80;
                b.set_u64(8, p.lun);
                b.set_u32(16, p.itt);
                b.set_u32(20, p.ttt);
                b.set_sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                b.set_u32(36, p.r2t_sn);
                b.set_u32(40, p.buffer_offset);
                b.set_u32(44, p.desired_len);
                data = Bytes::new();
            }
            Pdu::AsyncMessage(p) => {
                b.0[1] = 0x80;
                b.set_u64(8, p.lun);
                b.set_u32(16, RESERVED_TAG);
                b.set_sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                b.0[36] = p.event;
                b.0[37] = p.vcode;
                b.set_u16(38, p.param1);
                b.set_u16(40, p.param2);
                b.set_u16(42, p.param3);
                data = p.data.clone();
            }
            Pdu::Reject(p) => {
                b.0[1] = 0x80;
                b.0[2] = p.reason;
                b.set_u32(16, RESERVED_TAG);
                b.set_sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                b.set_u32(36, p.data_sn);
                data = p.header.clone();
            }
        }
        b.0[4] = (ahs.len() / 4) as u8;
        b.set_data_len(data.len() as u32);
        RawPdu { bhs: b, ahs: ahs.freeze(), data }
    }

    /// Encode for the wire with the given digests.
    pub fn encode(&self, digests: Digests) -> Frame {
        let raw = self.to_raw();
        Frame::encode(raw.bhs, &raw.ahs, &raw.data, digests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_pdus() -> Vec<Pdu> {
        let d = Bytes::from_static(b"hello, world!");
        vec![
            Pdu::NopOut(NopOut {
                immediate: true,
                lun: 0x0001_0000_0000_0000,
                itt: 7,
                ttt: RESERVED_TAG,
                cmd_sn: 10,
                exp_stat_sn: 20,
                data: d.clone(),
            }),
            Pdu::ScsiCommand(ScsiCommand {
                immediate: false,
                final_: true,
                read: true,
                write: false,
                attr: 1,
                lun: 0,
                itt: 0x1234,
                expected_len: 4096,
                cmd_sn: 99,
                exp_stat_sn: 3,
                cdb: Bytes::from_static(&[0x28, 0, 0, 0, 0, 1, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0]),
                bidi_read_len: None,
                data: Bytes::new(),
            }),
            Pdu::ScsiCommand(ScsiCommand {
                immediate: false,
                final_: false,
                read: true,
                write: true,
                attr: 0,
                lun: 3 << 48,
                itt: 0x99,
                expected_len: 512,
                cmd_sn: 1,
                exp_stat_sn: 2,
                cdb: Bytes::from((0u8..32).collect::<Vec<u8>>()),
                bidi_read_len: Some(8192),
                data: Bytes::from(vec![0xa5; 512]),
            }),
            Pdu::TaskMgmtRequest(TaskMgmtRequest {
                immediate: true,
                function: tmf::ABORT_TASK,
                lun: 0,
                itt: 5,
                ref_task_tag: 4,
                cmd_sn: 8,
                exp_stat_sn: 9,
                ref_cmd_sn: 7,
                exp_data_sn: 0,
            }),
            Pdu::LoginRequest(LoginRequest {
                transit: true,
                cont: false,
                csg: stage::OPERATIONAL,
                nsg: stage::FULL_FEATURE,
                version_max: 0,
                version_min: 0,
                isid: 0x8000_1234_5678,
                tsih: 0,
                itt: 1,
                cid: 2,
                cmd_sn: 3,
                exp_stat_sn: 4,
                data: Bytes::from_static(b"InitiatorName=iqn.x\0"),
            }),
            Pdu::TextRequest(TextRequest {
                immediate: true,
                final_: true,
                cont: false,
                lun: 0,
                itt: 77,
                ttt: RESERVED_TAG,
                cmd_sn: 1,
                exp_stat_sn: 1,
                data: Bytes::from_static(b"SendTargets=All\0"),
            }),
            Pdu::DataOut(DataOut {
                final_: true,
                lun: 0,
                itt: 3,
                ttt: 0x10,
                exp_stat_sn: 6,
                data_sn: 2,
                buffer_offset: 8192,
                data: Bytes::from(vec![1u8; 1001]),
            }),
            Pdu::LogoutRequest(LogoutRequest { immediate: true, reason: 0, itt: 4, cid: 1, cmd_sn: 11, exp_stat_sn: 12 }),
            Pdu::Snack(Snack {
                snack_type: 1,
                lun: 0,
                itt: 2,
                ttt: 3,
                exp_stat_sn: 4,
                beg_run: 5,
                run_length: 6,
            }),
            Pdu::NopIn(NopIn {
                lun: 0,
                itt: RESERVED_TAG,
                ttt: 9,
                stat_sn: 1,
                exp_cmd_sn: 2,
                max_cmd_sn: 65,
                data: Bytes::new(),
            }),
            Pdu::ScsiResponse(ScsiResponse {
                bidi_overflow: false,
                bidi_underflow: true,
                overflow: false,
                underflow: true,
                response: 0,
                status: 2,
                itt: 8,
                snack_tag: 0,
                stat_sn: 100,
                exp_cmd_sn: 101,
                max_cmd_sn: 164,
                exp_data_sn: 3,
                bidi_residual: 11,
                residual: 512,
                sense: Bytes::from_static(&[0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0]),
            }),
            Pdu::TaskMgmtResponse(TaskMgmtResponse {
                response: tmf::TASK_DOES_NOT_EXIST,
                itt: 5,
                stat_sn: 6,
                exp_cmd_sn: 7,
                max_cmd_sn: 8,
            }),
            Pdu::LoginResponse(LoginResponse {
                transit: false,
                cont: true,
                csg: stage::SECURITY,
                nsg: 0,
                version_max: 0,
                version_active: 0,
                isid: 0x4000_0000_0001,
                tsih: 0x1234,
                itt: 1,
                stat_sn: 2,
                exp_cmd_sn: 3,
                max_cmd_sn: 4,
                status_class: 2,
                status_detail: 1,
                data: Bytes::from_static(b"AuthMethod=CHAP\0"),
            }),
            Pdu::TextResponse(TextResponse {
                final_: false,
                cont: true,
                lun: 0,
                itt: 2,
                ttt: 0x55,
                stat_sn: 3,
                exp_cmd_sn: 4,
                max_cmd_sn: 5,
                data: d.clone(),
            }),
            Pdu::DataIn(DataIn {
                final_: true,
                ack: false,
                overflow: true,
                underflow: false,
                has_status: true,
                status: 0,
                lun: 0,
                itt: 9,
                ttt: RESERVED_TAG,
                stat_sn: 5,
                exp_cmd_sn: 6,
                max_cmd_sn: 7,
                data_sn: 3,
                buffer_offset: 3 * 8192,
                residual: 200,
                data: Bytes::from(vec![9u8; 8192]),
            }),
            Pdu::LogoutResponse(LogoutResponse {
                response: 0,
                itt: 4,
                stat_sn: 5,
                exp_cmd_sn: 6,
                max_cmd_sn: 7,
                time2wait: 2,
                time2retain: 20,
            }),
            Pdu::R2t(R2t {
                lun: 0,
                itt: 3,
                ttt: 0x77,
                stat_sn: 4,
                exp_cmd_sn: 5,
                max_cmd_sn: 6,
                r2t_sn: 1,
                buffer_offset: 65536,
                desired_len: 262144,
            }),
            Pdu::AsyncMessage(AsyncMessage {
                lun: 0,
                stat_sn: 1,
                exp_cmd_sn: 2,
                max_cmd_sn: 3,
                event: async_event::REQUEST_LOGOUT,
                vcode: 0,
                param1: 0,
                param2: 0,
                param3: 5,
                data: Bytes::new(),
            }),
            Pdu::Reject(Reject {
                reason: reject::PROTOCOL_ERROR,
                stat_sn: 1,
                exp_cmd_sn: 2,
                max_cmd_sn: 3,
                data_sn: 0,
                header: Bytes::from(vec![0x3fu8; 48]),
            }),
        ]
    }

    #[test]
    fn every_pdu_round_trips_with_and_without_digests() {
        for digests in [
            Digests::default(),
            Digests { header: true, data: false },
            Digests { header: false, data: true },
            Digests { header: true, data: true },
        ] {
            for pdu in all_pdus() {
                let frame = pdu.encode(digests).to_vec();
                assert_eq!(frame.len() % 4, 0, "{pdu:?}: frames are padded to 4 bytes");
                let (raws, used) = split_frames(&frame, digests).unwrap();
                assert_eq!(used, frame.len());
                assert_eq!(raws.len(), 1);
                let back = Pdu::parse(&raws[0]).unwrap();
                assert_eq!(back, pdu, "digests {digests:?}");
            }
        }
    }

    #[test]
    fn bhs_layout_matches_rfc() {
        let cmd = Pdu::ScsiCommand(ScsiCommand {
            final_: true,
            read: true,
            lun: 0x0001_0000_0000_0000,
            itt: 0x0a0b0c0d,
            expected_len: 0x1000,
            cmd_sn: 0x11223344,
            exp_stat_sn: 0x55667788,
            cdb: Bytes::from_static(&[0x28; 16]),
            data: Bytes::from_static(b"abcde"),
            ..Default::default()
        });
        let raw = cmd.to_raw();
        let b = raw.bhs.0;
        assert_eq!(b[0], 0x01);
        assert_eq!(b[1], 0xc0);
        assert_eq!(&b[5..8], &[0, 0, 5]);
        assert_eq!(&b[8..10], &[0, 1]);
        assert_eq!(&b[16..20], &[0x0a, 0x0b, 0x0c, 0x0d]);
        assert_eq!(&b[20..24], &[0, 0, 0x10, 0]);
        assert_eq!(&b[24..28], &[0x11, 0x22, 0x33, 0x44]);
        assert_eq!(&b[28..32], &[0x55, 0x66, 0x77, 0x88]);
        assert_eq!(&b[32..48], &[0x28; 16]);
        let frame = cmd.encode(Digests::default()).to_vec();
        assert_eq!(frame.len(), 48 + 8, "5 data bytes padded to 8");
        assert_eq!(&frame[48..56], b"abcde\0\0\0");

        let login = Pdu::LoginRequest(LoginRequest {
            transit: true,
            csg: 1,
            nsg: 3,
            isid: 0x0023_3d00_0001,
            tsih: 0,
            cid: 0,
            ..Default::default()
        });
        let b = login.to_raw().bhs.0;
        assert_eq!(b[0], 0x43, "login requests are always immediate");
        assert_eq!(b[1], 0x87);
        assert_eq!(&b[8..14], &[0x00, 0x23, 0x3d, 0x00, 0x00, 0x01]);
    }

    #[test]
    fn digests_are_checked() {
        let digests = Digests { header: true, data: true };
        let pdu = Pdu::NopOut(NopOut { itt: 1, data: Bytes::from_static(b"ping"), ..Default::default() });
        let frame = pdu.encode(digests).to_vec();
        assert_eq!(frame.len(), 48 + 4 + 4 + 4);
        let mut bad_header = frame.clone();
        bad_header[17] ^= 1;
        assert!(matches!(split_frames(&bad_header, digests), Err(FrameError::HeaderDigest { .. })));
        let mut bad_data = frame.clone();
        bad_data[52] ^= 1;
        assert!(matches!(split_frames(&bad_data, digests), Err(FrameError::DataDigest { .. })));
        let bhs = Bhs(frame[..48].try_into().unwrap());
        assert!(header_digest_ok(&bhs, &frame[48..52], digests));
        assert!(!header_digest_ok(&bhs, &[0, 0, 0, 0], digests));
    }

    #[test]
    fn layout_counts_padding_and_digests() {
        let mut b = Bhs::new(op::DATA_OUT);
        b.set_data_len(5);
        b.0[4] = 2;
        let l = Layout::of(&b, Digests { header: true, data: true });
        assert_eq!(l.header_rest(), 8 + 4);
        assert_eq!(l.data_wire(), 8 + 4);
        b.set_data_len(0);
        let l = Layout::of(&b, Digests { header: false, data: true });
        assert_eq!(l.rest(), 8, "no data digest without data");
    }

    #[test]
    fn unknown_opcode_and_bad_ahs_are_rejected() {
        let raw = RawPdu { bhs: Bhs::new(0x1c), ahs: Bytes::new(), data: Bytes::new() };
        assert_eq!(Pdu::parse(&raw).unwrap_err().reason, reject::COMMAND_NOT_SUPPORTED);
        let raw = RawPdu {
            bhs: Bhs::new(op::SCSI_COMMAND),
            ahs: Bytes::from_static(&[0, 1, 9, 0]),
            data: Bytes::new(),
        };
        assert_eq!(Pdu::parse(&raw).unwrap_err().reason, reject::INVALID_PDU_FIELD);
        let raw = RawPdu { bhs: Bhs::new(op::NOP_OUT), ahs: Bytes::from_static(&[0, 1, 1, 0]), data: Bytes::new() };
        assert_eq!(Pdu::parse(&raw).unwrap_err().reason, reject::PROTOCOL_ERROR);
    }

    #[test]
    fn rfc_read10_pdu_header_digest() {
        // RFC 7143 appendix B.4: the digest of a READ (10) command BHS.
        let cmd = Pdu::ScsiCommand(ScsiCommand {
            final_: true,
            read: true,
            itt: 0x14000000,
            expected_len: 0x00000400,
            cmd_sn: 0x00000014,
            exp_stat_sn: 0x00000018,
            cdb: Bytes::from_static(&[0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]),
            ..Default::default()
        });
        let frame = cmd.encode(Digests { header: true, data: false }).to_vec();
        assert_eq!(&frame[48..52], &[0x56, 0x3a, 0x96, 0xd9]);
    }
}
