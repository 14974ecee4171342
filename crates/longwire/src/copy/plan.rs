//! How one piece read from SRC becomes requests to DST, without I/O.
//!
//! Data is written and zero runs are left to the zero step, except a zero
//! run shorter than DST's preferred block between two data runs: that one
//! is written as zeros inside one write with its neighbours. DST cannot keep
//! a hole that small anyway (a sqlite chunk or a memory chunk is stored
//! whole), and writing around it costs a read-modify-write of the shared
//! block per side, so a source full of small zero runs was copied as many
//! small partial-chunk writes instead of a few whole ones.

use bytes::{Bytes, BytesMut};
use longwire_core::ReadSegment;

/// One request to DST.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Write these bytes at `at`.
    Write { at: u64, data: Bytes },
    /// `[at, at + len)` must read as zeros.
    Zero { at: u64, len: u64 },
}

/// The steps for the segments of a sparse read at `pos`; zero runs shorter
/// than `fold` between data are written with it.
pub(super) fn plan(pos: u64, segments: Vec<ReadSegment>, fold: u64) -> Vec<Step> {
    let mut p = Planner {
        steps: Vec::new(),
        batch: Vec::new(),
        batch_at: pos,
        at: pos,
        gap: 0,
        fold,
    };
    for seg in segments {
        match seg {
            ReadSegment::Data(bytes) if bytes.iter().any(|&b| b != 0) => p.data(bytes),
            other => p.gap += other.len(),
        }
    }
    p.end_batch();
    p.end_gap();
    p.steps
}

struct Planner {
    steps: Vec<Step>,
    /// Data (and folded zeros) not yet written, starting at `batch_at`.
    batch: Vec<Bytes>,
    batch_at: u64,
    /// End of what has been placed in `steps` or `batch`.
    at: u64,
    /// Zero bytes after `at` not placed yet.
    gap: u64,
    fold: u64,
}

impl Planner {
    fn data(&mut self, bytes: Bytes) {
        if !self.batch.is_empty() && self.gap > 0 && self.gap < self.fold {
            self.batch.push(Bytes::from(vec![0u8; self.gap as usize]));
            self.at += self.gap;
            self.gap = 0;
        } else if self.gap > 0 {
            self.end_batch();
            self.end_gap();
        }
        if self.batch.is_empty() {
            self.batch_at = self.at;
        }
        self.at += bytes.len() as u64;
        self.batch.push(bytes);
    }

    fn end_batch(&mut self) {
        let data = match self.batch.len() {
            0 => return,
            1 => self.batch.pop().unwrap(),
            _ => {
                let mut joined = BytesMut::with_capacity((self.at - self.batch_at) as usize);
                for part in self.batch.drain(..) {
                    joined.extend_from_slice(&part);
                }
                joined.freeze()
            }
        };
        self.steps.push(Step::Write {
            at: self.batch_at,
            data,
        });
    }

    fn end_gap(&mut self) {
        if self.gap > 0 {
            self.steps.push(Step::Zero {
                at: self.at,
                len: self.gap,
            });
            self.at += self.gap;
            self.gap = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, byte: u8) -> ReadSegment {
        ReadSegment::Data(Bytes::from(vec![byte; n]))
    }

    #[test]
    fn small_gaps_between_data_are_written_large_ones_are_not() {
        let segs = vec![
            ReadSegment::Zero(4),
            data(2, 1),
            ReadSegment::Zero(3), // < fold: written
            data(1, 2),
            ReadSegment::Zero(8), // >= fold: left to the zero step
            data(2, 3),
            data(2, 0), // all-zero data counts as a gap
            ReadSegment::Zero(1),
        ];
        assert_eq!(
            plan(100, segs, 8),
            vec![
                Step::Zero { at: 100, len: 4 },
                Step::Write {
                    at: 104,
                    data: Bytes::from_static(&[1, 1, 0, 0, 0, 2])
                },
                Step::Zero { at: 110, len: 8 },
                Step::Write {
                    at: 118,
                    data: Bytes::from_static(&[3, 3])
                },
                Step::Zero { at: 120, len: 3 },
            ]
        );
    }

    #[test]
    fn nothing_is_folded_with_a_fold_of_one_byte() {
        let segs = vec![data(2, 1), ReadSegment::Zero(1), data(1, 2)];
        assert_eq!(
            plan(0, segs, 1),
            vec![
                Step::Write {
                    at: 0,
                    data: Bytes::from_static(&[1, 1])
                },
                Step::Zero { at: 2, len: 1 },
                Step::Write {
                    at: 3,
                    data: Bytes::from_static(&[2])
                },
            ]
        );
    }

    #[test]
    fn all_zero_and_all_data_pieces() {
        assert_eq!(
            plan(7, vec![ReadSegment::Zero(5), data(3, 0)], 64),
            vec![Step::Zero { at: 7, len: 8 }]
        );
        let one = Bytes::from(vec![9u8; 16]);
        assert_eq!(
            plan(0, vec![ReadSegment::Data(one.clone())], 64),
            vec![Step::Write { at: 0, data: one }]
        );
        assert_eq!(plan(0, vec![], 64), vec![]);
    }
}
