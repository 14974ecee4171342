//! Collecting a write command's data (RFC 7143 §4.2.5.?, §11.7, §11.8),
//! sans-IO.
//!
//! Data reaches the target as immediate data in the command PDU, then
//! unsolicited Data-Out PDUs (TTT 0xffffffff, when InitialR2T=No and the
//! command's F bit is clear) up to FirstBurstLength, then solicited
//! Data-Out sequences answering our R2Ts, each at most MaxBurstLength with
//! at most MaxOutstandingR2T outstanding. With DataPDUInOrder and
//! DataSequenceInOrder both Yes (the only values this target negotiates)
//! every sequence must arrive with DataSN 0, 1, 2, … and contiguous
//! BufferOffsets; any deviation is a protocol error, which at
//! ErrorRecoveryLevel 0 ends the connection.
//!
//! The collector only keeps the bytes the command will use (`want`: the
//! smaller of the Expected Data Transfer Length and what the CDB
//! transfers); anything beyond is accepted and dropped, and never
//! solicited.

use bytes::{Bytes, BytesMut};

use crate::pdu::{DataOut, RESERVED_TAG};

/// Negotiated limits that shape the data phase.
#[derive(Debug, Clone, Copy)]
pub struct DataLimits {
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub first_burst_length: u32,
    pub max_burst_length: u32,
    pub max_outstanding_r2t: u32,
}

/// One R2T to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2tRequest {
    pub ttt: u32,
    pub r2t_sn: u32,
    pub offset: u32,
    pub len: u32,
}

#[derive(Debug, Clone, Copy)]
struct Sequence {
    ttt: u32,
    offset: u32,
    len: u32,
    received: u32,
    next_data_sn: u32,
}

/// Why a Data-Out PDU was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    /// No outstanding R2T has this Target Transfer Tag: answer with a
    /// Reject and keep going.
    #[error("Data-Out for unknown target transfer tag {0:#x}")]
    UnknownTtt(u32),
    /// The command PDU itself announces an impossible data phase.
    #[error("{0}")]
    Protocol(String),
    /// DataSN, BufferOffset, length or F-bit rules broken by a Data-Out PDU:
    /// the command ends with CHECK CONDITION, ABORTED COMMAND and this
    /// additional sense code; later Data-Out PDUs for it are dropped.
    #[error("{message}")]
    Sequence { asc: u8, ascq: u8, message: String },
}

/// Additional sense codes for data phase errors (SPC-4 table and RFC 7143
/// §11.4.7.2).
pub mod asc {
    pub const DATA_PHASE_ERROR: (u8, u8) = (0x4b, 0x00);
    pub const TOO_MUCH_WRITE_DATA: (u8, u8) = (0x4b, 0x02);
    pub const DATA_OFFSET_ERROR: (u8, u8) = (0x4b, 0x05);
    pub const UNEXPECTED_UNSOLICITED_DATA: (u8, u8) = (0x0c, 0x0c);
    pub const NOT_ENOUGH_UNSOLICITED_DATA: (u8, u8) = (0x0c, 0x0d);
    pub const PROTOCOL_SERVICE_CRC_ERROR: (u8, u8) = (0x47, 0x05);
}

fn seq(code: (u8, u8), message: String) -> DataError {
    DataError::Sequence { asc: code.0, ascq: code.1, message }
}

/// The data phase of one write command.
#[derive(Debug)]
pub struct WriteCollector {
    limits: DataLimits,
    edtl: u32,
    want: u32,
    buf: BytesMut,
    /// Unsolicited data may reach this offset.
    unsolicited_limit: u32,
    unsolicited_done: bool,
    next_unsolicited_offset: u32,
    next_unsolicited_data_sn: u32,
    /// Solicited data covers [solicit_from, want).
    next_r2t_offset: u32,
    next_r2t_sn: u32,
    sequences: Vec<Sequence>,
    solicited_received: u32,
    solicit_from: u32,
}

impl WriteCollector {
    /// Start with the command PDU: `edtl` is its Expected Data Transfer
    /// Length, `want` the bytes the command uses, `immediate` its data
    /// segment and `final_` its F bit.
    pub fn new(limits: DataLimits, edtl: u32, want: u32, immediate: &Bytes, final_: bool) -> Result<WriteCollector, DataError> {
        let want = want.min(edtl);
        let imm = immediate.len() as u32;
        if imm > 0 && !limits.immediate_data {
            return Err(DataError::Protocol("immediate data sent although ImmediateData=No".into()));
        }
        if imm > edtl {
            return Err(DataError::Protocol(format!("{imm} bytes of immediate data for a transfer of {edtl}")));
        }
        if imm > limits.first_burst_length {
            return Err(DataError::Protocol(format!(
                "{imm} bytes of immediate data exceed FirstBurstLength {}",
                limits.first_burst_length
            )));
        }
        let unsolicited_follows = !final_;
        if unsolicited_follows && limits.initial_r2t {
            return Err(DataError::Protocol("unsolicited Data-Out announced although InitialR2T=Yes".into()));
        }
        if unsolicited_follows && imm >= edtl {
            return Err(DataError::Protocol("unsolicited Data-Out announced for data already sent".into()));
        }
        let unsolicited_limit = if unsolicited_follows { limits.first_burst_length.min(edtl) } else { imm };
        let mut buf = BytesMut::with_capacity(want as usize);
        let keep = imm.min(want) as usize;
        buf.extend_from_slice(&immediate[..keep]);
        let mut c = WriteCollector {
            limits,
            edtl,
            want,
            buf,
            unsolicited_limit,
            unsolicited_done: !unsolicited_follows,
            next_unsolicited_offset: imm,
            next_unsolicited_data_sn: 0,
            next_r2t_offset: 0,
            next_r2t_sn: 0,
            sequences: Vec::new(),
            solicited_received: 0,
            solicit_from: 0,
        };
        if c.unsolicited_done {
            c.start_solicited();
        }
        Ok(c)
    }

    fn start_solicited(&mut self) {
        let from = self.next_unsolicited_offset.min(self.want);
        self.solicit_from = from;
        self.next_r2t_offset = from;
        if self.buf.len() < from as usize {
            self.buf.resize(from as usize, 0);
        }
    }

    /// Bytes the command will use.
    pub fn want(&self) -> u32 {
        self.want
    }

    /// The Expected Data Transfer Length.
    pub fn edtl(&self) -> u32 {
        self.edtl
    }

    /// R2Ts to send now (none before the unsolicited data is complete),
    /// with Target Transfer Tags from `next_ttt`.
    pub fn r2ts(&mut self, mut next_ttt: impl FnMut() -> u32) -> Vec<R2tRequest> {
        let mut out = Vec::new();
        if !self.unsolicited_done {
            return out;
        }
        while self.next_r2t_offset < self.want && (self.sequences.len() as u32) < self.limits.max_outstanding_r2t.max(1) {
            let len = (self.want - self.next_r2t_offset).min(self.limits.max_burst_length);
            let r = R2tRequest { ttt: next_ttt(), r2t_sn: self.next_r2t_sn, offset: self.next_r2t_offset, len };
            self.sequences.push(Sequence { ttt: r.ttt, offset: r.offset, len, received: 0, next_data_sn: 0 });
            self.next_r2t_sn += 1;
            self.next_r2t_offset += len;
            out.push(r);
        }
        out
    }

    /// Target Transfer Tags of the R2Ts still waiting for data.
    pub fn outstanding_ttts(&self) -> Vec<u32> {
        self.sequences.iter().map(|s| s.ttt).collect()
    }

    /// Number of R2Ts sent so far.
    pub fn r2t_count(&self) -> u32 {
        self.next_r2t_sn
    }

    /// Take one Data-Out PDU.
    pub fn data_out(&mut self, pdu: &DataOut) -> Result<(), DataError> {
        let len = pdu.data.len() as u32;
        if pdu.ttt == RESERVED_TAG {
            if self.unsolicited_done {
                return Err(seq(asc::UNEXPECTED_UNSOLICITED_DATA, "unsolicited Data-Out after the unsolicited data ended".into()));
            }
            if pdu.data_sn != self.next_unsolicited_data_sn {
                return Err(seq(asc::DATA_PHASE_ERROR, format!(
                    "unsolicited Data-Out DataSN {} (expected {})",
                    pdu.data_sn, self.next_unsolicited_data_sn
                )));
            }
            if pdu.buffer_offset != self.next_unsolicited_offset {
                return Err(seq(asc::DATA_OFFSET_ERROR, format!(
                    "unsolicited Data-Out at offset {} (expected {})",
                    pdu.buffer_offset, self.next_unsolicited_offset
                )));
            }
            let end = pdu.buffer_offset.saturating_add(len);
            if end > self.unsolicited_limit {
                return Err(seq(asc::UNEXPECTED_UNSOLICITED_DATA, format!(
                    "unsolicited data up to {end} exceeds the first burst of {}",
                    self.unsolicited_limit
                )));
            }
            self.store(pdu.buffer_offset, &pdu.data);
            self.next_unsolicited_offset = end;
            self.next_unsolicited_data_sn += 1;
            if pdu.final_ {
                self.unsolicited_done = true;
                self.start_solicited();
            }
            return Ok(());
        }
        let Some(i) = self.sequences.iter().position(|s| s.ttt == pdu.ttt) else {
            return Err(DataError::UnknownTtt(pdu.ttt));
        };
        let s = self.sequences[i];
        if pdu.data_sn != s.next_data_sn {
            return Err(seq(asc::DATA_PHASE_ERROR, format!(
                "Data-Out DataSN {} for R2T {:#x} (expected {})",
                pdu.data_sn, s.ttt, s.next_data_sn
            )));
        }
        if pdu.buffer_offset != s.offset + s.received {
            return Err(seq(asc::DATA_OFFSET_ERROR, format!(
                "Data-Out at offset {} for R2T {:#x} (expected {})",
                pdu.buffer_offset,
                s.ttt,
                s.offset + s.received
            )));
        }
        if s.received + len > s.len {
            return Err(seq(asc::TOO_MUCH_WRITE_DATA, format!(
                "Data-Out overruns R2T {:#x}: {} of {} bytes",
                s.ttt,
                s.received + len,
                s.len
            )));
        }
        let done = s.received + len == s.len;
        if pdu.final_ && !done {
            return Err(seq(asc::DATA_PHASE_ERROR, format!(
                "Data-Out F bit after {} of {} bytes of R2T {:#x}",
                s.received + len,
                s.len,
                s.ttt
            )));
        }
        self.store(pdu.buffer_offset, &pdu.data);
        self.solicited_received += len;
        let s = &mut self.sequences[i];
        s.received += len;
        s.next_data_sn += 1;
        if done {
            self.sequences.remove(i);
        }
        Ok(())
    }

    fn store(&mut self, offset: u32, data: &[u8]) {
        let start = offset as usize;
        let end = (start + data.len()).min(self.want as usize);
        if start >= end {
            return;
        }
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        self.buf[start..end].copy_from_slice(&data[..end - start]);
    }

    /// All data has arrived.
    pub fn is_complete(&self) -> bool {
        self.unsolicited_done && self.sequences.is_empty() && self.next_r2t_offset >= self.want
    }

    /// The collected bytes (`want` long once complete).
    pub fn into_data(mut self) -> Bytes {
        self.buf.truncate(self.want as usize);
        self.buf.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> DataLimits {
        DataLimits {
            initial_r2t: false,
            immediate_data: true,
            first_burst_length: 8192,
            max_burst_length: 16384,
            max_outstanding_r2t: 2,
        }
    }

    fn data_out(ttt: u32, data_sn: u32, offset: u32, len: usize, final_: bool, fill: u8) -> DataOut {
        DataOut {
            final_,
            ttt,
            data_sn,
            buffer_offset: offset,
            data: Bytes::from(vec![fill; len]),
            ..Default::default()
        }
    }

    fn ttts() -> impl FnMut() -> u32 {
        let mut n = 0x100;
        move || {
            n += 1;
            n
        }
    }

    #[test]
    fn immediate_data_only() {
        let imm = Bytes::from(vec![7u8; 4096]);
        let mut c = WriteCollector::new(limits(), 4096, 4096, &imm, true).unwrap();
        assert!(c.r2ts(ttts()).is_empty());
        assert!(c.is_complete());
        assert_eq!(c.into_data(), imm);
    }

    #[test]
    fn immediate_unsolicited_then_r2ts() {
        let mut c = WriteCollector::new(limits(), 40960, 40960, &Bytes::from(vec![1u8; 1024]), false).unwrap();
        let mut t = ttts();
        assert!(c.r2ts(&mut t).is_empty(), "no R2T before the unsolicited data ends");
        c.data_out(&data_out(RESERVED_TAG, 0, 1024, 4096, false, 2)).unwrap();
        c.data_out(&data_out(RESERVED_TAG, 1, 5120, 3072, true, 3)).unwrap();
        let r = c.r2ts(&mut t);
        assert_eq!(
            r,
            vec![
                R2tRequest { ttt: 0x101, r2t_sn: 0, offset: 8192, len: 16384 },
                R2tRequest { ttt: 0x102, r2t_sn: 1, offset: 24576, len: 16384 },
            ],
            "MaxBurstLength pieces, MaxOutstandingR2T at once"
        );
        assert!(c.r2ts(&mut t).is_empty());
        // Second R2T answered first (sequences may interleave by TTT).
        c.data_out(&data_out(0x102, 0, 24576, 8192, false, 5)).unwrap();
        c.data_out(&data_out(0x102, 1, 32768, 8192, true, 5)).unwrap();
        assert!(c.r2ts(&mut t).is_empty(), "nothing left to solicit");
        assert!(!c.is_complete());
        c.data_out(&data_out(0x101, 0, 8192, 16384, true, 4)).unwrap();
        assert!(c.is_complete());
        assert_eq!(c.r2t_count(), 2);
        let d = c.into_data();
        assert_eq!(d.len(), 40960);
        assert_eq!(d[0], 1);
        assert_eq!(d[1024], 2);
        assert_eq!(d[5120], 3);
        assert_eq!(d[8192], 4);
        assert_eq!(d[40959], 5);
    }

    #[test]
    fn more_r2ts_follow_as_sequences_complete() {
        let mut l = limits();
        l.max_outstanding_r2t = 1;
        l.initial_r2t = true;
        let mut c = WriteCollector::new(l, 40000, 40000, &Bytes::new(), true).unwrap();
        let mut t = ttts();
        let r = c.r2ts(&mut t);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].offset, r[0].len), (0, 16384));
        c.data_out(&data_out(r[0].ttt, 0, 0, 16384, true, 1)).unwrap();
        let r = c.r2ts(&mut t);
        assert_eq!((r[0].r2t_sn, r[0].offset, r[0].len), (1, 16384, 16384));
        c.data_out(&data_out(r[0].ttt, 0, 16384, 16384, true, 1)).unwrap();
        let r = c.r2ts(&mut t);
        assert_eq!((r[0].offset, r[0].len), (32768, 7232));
        c.data_out(&data_out(r[0].ttt, 0, 32768, 7232, true, 1)).unwrap();
        assert!(c.is_complete());
    }

    #[test]
    fn only_what_the_command_uses_is_kept_and_solicited() {
        // EDTL 10000 for a one-block write: the immediate data covers
        // everything; only 512 bytes are kept.
        let imm = Bytes::from(vec![0xa6u8; 8192]);
        let mut c = WriteCollector::new(limits(), 10000, 512, &imm, true).unwrap();
        assert!(c.r2ts(ttts()).is_empty(), "the command needs nothing more");
        assert!(c.is_complete());
        assert_eq!(c.into_data().len(), 512);
        // EDTL smaller than the CDB: only EDTL is solicited.
        let mut l = limits();
        l.initial_r2t = true;
        let mut c = WriteCollector::new(l, 512, 1024, &Bytes::new(), true).unwrap();
        assert_eq!(c.want(), 512);
        let r = c.r2ts(ttts());
        assert_eq!((r[0].offset, r[0].len), (0, 512));
        // EDTL 0.
        let mut c = WriteCollector::new(limits(), 0, 512, &Bytes::new(), true).unwrap();
        assert!(c.r2ts(ttts()).is_empty());
        assert!(c.is_complete());
        assert!(c.into_data().is_empty());
    }

    #[test]
    fn sequence_errors() {
        let mk = || {
            let mut c = WriteCollector::new(limits(), 1024, 1024, &Bytes::new(), false).unwrap();
            assert!(c.r2ts(ttts()).is_empty());
            c
        };
        // DataSN 0 twice.
        let mut c = mk();
        c.data_out(&data_out(RESERVED_TAG, 0, 0, 512, false, 0)).unwrap();
        assert!(matches!(c.data_out(&data_out(RESERVED_TAG, 0, 512, 512, true, 0)), Err(DataError::Sequence { .. })));
        // DataSN 27, -1, and reversed order.
        for sn in [27, u32::MAX, 1] {
            let mut c = mk();
            assert!(matches!(c.data_out(&data_out(RESERVED_TAG, sn, 0, 512, false, 0)), Err(DataError::Sequence { .. })));
        }
        // Wrong offset.
        let mut c = mk();
        assert!(matches!(c.data_out(&data_out(RESERVED_TAG, 0, 512, 512, false, 0)), Err(DataError::Sequence { .. })));
        // Beyond the first burst.
        let mut c = WriteCollector::new(limits(), 65536, 65536, &Bytes::new(), false).unwrap();
        assert!(matches!(c.data_out(&data_out(RESERVED_TAG, 0, 0, 9000, false, 0)), Err(DataError::Sequence { .. })));
        // Unknown TTT.
        let mut c = mk();
        assert_eq!(c.data_out(&data_out(0x999, 0, 0, 512, true, 0)), Err(DataError::UnknownTtt(0x999)));
        // Solicited: overrun, early F, wrong DataSN.
        let mut l = limits();
        l.initial_r2t = true;
        for (sn, off, len, f) in [(0, 0, 2048, true), (0, 0, 512, true), (1, 0, 512, false), (0, 512, 512, false)] {
            let mut c = WriteCollector::new(l, 1024, 1024, &Bytes::new(), true).unwrap();
            let r = c.r2ts(ttts());
            assert!(
                matches!(c.data_out(&data_out(r[0].ttt, sn, off, len, f, 0)), Err(DataError::Sequence { .. })),
                "{sn} {off} {len} {f}"
            );
        }
    }

    #[test]
    fn command_level_errors() {
        let mut l = limits();
        l.immediate_data = false;
        assert!(WriteCollector::new(l, 512, 512, &Bytes::from(vec![0u8; 512]), true).is_err());
        let mut l = limits();
        l.initial_r2t = true;
        assert!(WriteCollector::new(l, 1024, 1024, &Bytes::new(), false).is_err());
        assert!(WriteCollector::new(limits(), 100, 100, &Bytes::from(vec![0u8; 200]), true).is_err());
        assert!(WriteCollector::new(limits(), 100000, 100000, &Bytes::from(vec![0u8; 9000]), true).is_err());
    }
}
