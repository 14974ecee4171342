//! What the verifying writer did to every block, and what a block read
//! back may therefore hold (sans-IO).
//!
//! Each block keeps the history of operations issued to it, numbered by a
//! per-block sequence number, plus two floors: the last operation that
//! *completed* (a read from a live server must see it or something later)
//! and the last one *covered* by a completed FLUSH or by FUA (it must
//! survive a crash of the server). Only one operation per block is in
//! flight at a time, so a block's history is a line, not a tree, and "or
//! something later" is well defined.
//!
//! A FLUSH covers the writes that had completed when it was sent (the NBD
//! spec's promise), so [`Ledger::flush_begin`] takes the list of completed,
//! uncovered operations and [`Ledger::flush_done`] raises their floors.
//!
//! What a block may hold: the state of some issued operation `e` that is
//! at or after the floor, or before it when everything between `e` and the
//! floor was a TRIM (the spec lets TRIM leave old data in place). Zeros are
//! explained by the initial state, WRITE_ZEROES or TRIM.

use crate::block::Observed;

/// Which floor a check holds a block to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Floor {
    /// After a server crash: what FLUSH or FUA made durable.
    Covered,
    /// On a live server: everything that completed.
    Completed,
}

/// One operation on one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Data { write_id: u64 },
    Zero,
    Trim,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    seq: u64,
    op: Op,
}

#[derive(Debug)]
struct BlockState {
    entries: Vec<Entry>,
    next_seq: u64,
    completed: u64,
    covered: u64,
    /// The seq the last [`Ledger::rebase`] found (0 before any).
    base: u64,
    busy: bool,
    retired: bool,
}

impl BlockState {
    fn new() -> BlockState {
        // seq 0 is the fresh volume: zeros.
        BlockState {
            entries: vec![Entry {
                seq: 0,
                op: Op::Zero,
            }],
            next_seq: 1,
            completed: 0,
            covered: 0,
            base: 0,
            busy: false,
            retired: false,
        }
    }

    /// Drop history no check can accept any more: everything before the
    /// last non-TRIM operation at or below the covered floor.
    fn prune(&mut self) {
        let keep_from = self
            .entries
            .iter()
            .rposition(|e| e.seq <= self.covered && e.op != Op::Trim)
            .unwrap_or(0);
        self.entries.drain(..keep_from);
    }
}

/// A block read back that the history cannot explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub block: u64,
    pub observed: Observed,
    pub floor: u64,
    pub floor_kind: Floor,
    /// The most recent operations issued to the block, oldest first.
    pub history: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.floor_kind {
            Floor::Covered => "covered by FLUSH/FUA",
            Floor::Completed => "completed",
        };
        let verdict = match self.observed {
            Observed::Torn { reason } => format!("is torn: {reason}"),
            Observed::Misplaced { index, seq, write_id } => {
                format!("holds the block written for block {index} (seq {seq}, write id {write_id}): a misdirected write")
            }
            Observed::Zero => format!("reads as zeros, but operation seq {} was {what}: DATA LOST", self.floor),
            Observed::Data { seq, write_id } => format!(
                "holds seq {seq} (write id {write_id}), which was never issued or is older than seq {} that was {what}: DATA LOST",
                self.floor
            ),
        };
        write!(
            f,
            "block {} {verdict}; history (seq:op): {}",
            self.block, self.history
        )
    }
}

/// Counters for the summary.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LedgerStats {
    /// Block operations that became covered (by FLUSH or FUA).
    pub covered_ops: u64,
}

/// Per-block histories for blocks `first..first + len` of a volume.
#[derive(Debug)]
pub struct Ledger {
    first: u64,
    blocks: Vec<BlockState>,
    dirty: Vec<(u32, u64)>,
    pub stats: LedgerStats,
}

/// Completed operations a FLUSH in flight will cover.
#[derive(Debug)]
pub struct FlushTicket(Vec<(u32, u64)>);

impl Ledger {
    pub fn new(first: u64, len: u64) -> Ledger {
        Ledger {
            first,
            blocks: (0..len).map(|_| BlockState::new()).collect(),
            dirty: Vec::new(),
            stats: LedgerStats::default(),
        }
    }

    pub fn first(&self) -> u64 {
        self.first
    }

    pub fn len(&self) -> u64 {
        self.blocks.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    fn at(&mut self, block: u64) -> &mut BlockState {
        let i = block
            .checked_sub(self.first)
            .expect("block below the ledger's range");
        &mut self.blocks[i as usize]
    }

    /// Claim `n` blocks from `start` for one operation; false if any is in
    /// use or retired.
    pub fn reserve(&mut self, start: u64, n: u64) -> bool {
        if start < self.first || start + n > self.first + self.len() {
            return false;
        }
        let range = (start - self.first) as usize..(start - self.first + n) as usize;
        if self.blocks[range.clone()]
            .iter()
            .any(|b| b.busy || b.retired)
        {
            return false;
        }
        self.blocks[range].iter_mut().for_each(|b| b.busy = true);
        true
    }

    /// Record an operation on reserved blocks; returns each block's seq.
    pub fn issue(&mut self, start: u64, n: u64, op: Op) -> Vec<u64> {
        (start..start + n)
            .map(|b| {
                let s = self.at(b);
                debug_assert!(s.busy);
                let seq = s.next_seq;
                s.next_seq += 1;
                s.entries.push(Entry { seq, op });
                seq
            })
            .collect()
    }

    /// The operation on `start..` with `seqs` completed (durably with FUA).
    pub fn complete(&mut self, start: u64, seqs: &[u64], fua: bool) {
        for (i, &seq) in seqs.iter().enumerate() {
            let block = start + i as u64;
            let s = self.at(block);
            s.busy = false;
            s.completed = s.completed.max(seq);
            if fua {
                s.covered = s.covered.max(seq);
                s.prune();
                self.stats.covered_ops += 1;
            } else {
                self.dirty.push(((block - self.first) as u32, seq));
            }
        }
    }

    /// The operation failed: its effect is unknown and stays possible.
    /// `retire` keeps the block from being written again (on a live server
    /// the lost request may still land later, so a newer write could be
    /// overtaken by it).
    pub fn fail(&mut self, start: u64, n: u64, retire: bool) {
        for b in start..start + n {
            let s = self.at(b);
            s.busy = false;
            s.retired |= retire;
        }
    }

    /// Release blocks reserved for a read.
    pub fn release(&mut self, start: u64, n: u64) {
        for b in start..start + n {
            self.at(b).busy = false;
        }
    }

    pub fn flush_begin(&mut self) -> FlushTicket {
        FlushTicket(std::mem::take(&mut self.dirty))
    }

    pub fn flush_done(&mut self, ticket: FlushTicket, ok: bool) {
        if !ok {
            self.dirty.extend(ticket.0);
            return;
        }
        self.stats.covered_ops += ticket.0.len() as u64;
        for (i, seq) in ticket.0 {
            let s = &mut self.blocks[i as usize];
            s.covered = s.covered.max(seq);
            s.prune();
        }
    }

    /// The seq `block` is held to (0: nothing must be found on it).
    pub fn floor(&self, block: u64, kind: Floor) -> u64 {
        let s = &self.blocks[(block - self.first) as usize];
        match kind {
            Floor::Covered => s.covered,
            Floor::Completed => s.completed,
        }
    }

    /// Whether an operation on `block` was covered since the last rebase
    /// (so a check now tests this round's FLUSH/FUA, not an older state).
    pub fn covered_since_rebase(&self, block: u64) -> bool {
        let s = &self.blocks[(block - self.first) as usize];
        s.covered > s.base
    }

    pub fn retired(&self) -> u64 {
        self.blocks.iter().filter(|b| b.retired).count() as u64
    }

    /// Judge what was read from `block`. On success returns the seq of the
    /// operation that explains it.
    pub fn check(
        &self,
        block: u64,
        observed: Observed,
        floor_kind: Floor,
    ) -> Result<u64, Box<Problem>> {
        let s = &self.blocks[(block - self.first) as usize];
        let floor = self.floor(block, floor_kind);
        let explains = |e: &Entry| match (observed, e.op) {
            (Observed::Zero, Op::Zero | Op::Trim) => true,
            (Observed::Data { seq, write_id }, Op::Data { write_id: w }) => {
                seq == e.seq && write_id == w
            }
            _ => false,
        };
        let only_trims_until_floor = |from: u64| {
            s.entries
                .iter()
                .filter(|x| x.seq > from && x.seq <= floor)
                .all(|x| x.op == Op::Trim)
        };
        for e in s.entries.iter().rev() {
            if explains(e) && (e.seq >= floor || only_trims_until_floor(e.seq)) {
                return Ok(e.seq);
            }
        }
        let tail = s.entries.iter().rev().take(8).collect::<Vec<_>>();
        let history = tail
            .iter()
            .rev()
            .map(|e| match e.op {
                Op::Data { write_id } => format!("{}:write#{write_id}", e.seq),
                Op::Zero => format!("{}:zero", e.seq),
                Op::Trim => format!("{}:trim", e.seq),
            })
            .collect::<Vec<_>>()
            .join(" ");
        Err(Box::new(Problem {
            block,
            observed,
            floor,
            floor_kind,
            history,
        }))
    }

    /// After a restart the block was read (and explained by `seq`) and
    /// then flushed: that state is now the durable truth, and operations
    /// the dead server never finished can no longer appear.
    pub fn rebase(&mut self, block: u64, seq: u64) {
        let s = self.at(block);
        s.entries.retain(|e| e.seq == seq);
        s.completed = seq;
        s.covered = seq;
        s.base = seq;
        s.busy = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(seq: u64, write_id: u64) -> Observed {
        Observed::Data { seq, write_id }
    }

    #[test]
    fn covered_write_must_survive_but_later_ones_may_vanish() {
        let mut l = Ledger::new(10, 4);
        assert!(l.reserve(10, 1));
        let s1 = l.issue(10, 1, Op::Data { write_id: 1 });
        l.complete(10, &s1, false);
        let t = l.flush_begin();
        l.flush_done(t, true);
        assert!(l.reserve(10, 1));
        let s2 = l.issue(10, 1, Op::Data { write_id: 2 });
        l.complete(10, &s2, false);
        assert_eq!(l.check(10, data(1, 1), Floor::Covered), Ok(1));
        assert_eq!(l.check(10, data(2, 2), Floor::Covered), Ok(2));
        assert!(
            l.check(10, Observed::Zero, Floor::Covered).is_err(),
            "the covered write is gone"
        );
        assert!(
            l.check(10, data(1, 1), Floor::Completed).is_err(),
            "a live server lost a completed write"
        );
        assert!(
            l.check(10, data(2, 9), Floor::Covered).is_err(),
            "a write id that was never issued"
        );
        assert!(
            l.check(10, data(3, 2), Floor::Covered).is_err(),
            "a seq that was never issued"
        );
    }

    #[test]
    fn uncovered_writes_may_be_lost_and_fua_covers() {
        let mut l = Ledger::new(0, 2);
        assert!(l.reserve(0, 2));
        let s = l.issue(0, 2, Op::Data { write_id: 5 });
        l.complete(0, &s, false);
        assert_eq!(l.check(1, Observed::Zero, Floor::Covered), Ok(0));
        assert!(l.reserve(0, 1));
        let s = l.issue(0, 1, Op::Data { write_id: 6 });
        l.complete(0, &s, true);
        assert!(l.check(0, data(1, 5), Floor::Covered).is_err());
        assert!(l.check(0, Observed::Zero, Floor::Covered).is_err());
    }

    #[test]
    fn a_flush_covers_only_what_completed_before_it() {
        let mut l = Ledger::new(0, 2);
        assert!(l.reserve(0, 1));
        let s = l.issue(0, 1, Op::Data { write_id: 1 });
        let t = l.flush_begin();
        l.complete(0, &s, false);
        l.flush_done(t, true);
        assert_eq!(l.check(0, Observed::Zero, Floor::Covered), Ok(0));
    }

    #[test]
    fn a_trim_may_leave_old_data_but_zeroes_may_not() {
        let mut l = Ledger::new(0, 1);
        for (id, op) in [(1, Op::Data { write_id: 1 }), (2, Op::Trim)] {
            assert!(l.reserve(0, 1));
            let s = l.issue(0, 1, op);
            l.complete(0, &s, id == 2);
        }
        assert_eq!(l.check(0, data(1, 1), Floor::Covered), Ok(1));
        assert_eq!(l.check(0, Observed::Zero, Floor::Covered), Ok(2));
        assert!(l.reserve(0, 1));
        let s = l.issue(0, 1, Op::Zero);
        l.complete(0, &s, true);
        assert!(l.check(0, data(1, 1), Floor::Covered).is_err());
    }

    #[test]
    fn torn_and_misplaced_blocks_are_always_problems() {
        let l = Ledger::new(0, 1);
        assert!(l
            .check(0, Observed::Torn { reason: "x" }, Floor::Covered)
            .is_err());
        assert!(l
            .check(
                0,
                Observed::Misplaced {
                    index: 3,
                    seq: 0,
                    write_id: 0
                },
                Floor::Covered
            )
            .is_err());
    }

    #[test]
    fn rebase_forgets_what_the_dead_server_never_finished() {
        let mut l = Ledger::new(0, 1);
        assert!(l.reserve(0, 1));
        let s = l.issue(0, 1, Op::Data { write_id: 1 });
        l.fail(0, 1, false);
        assert_eq!(l.check(0, Observed::Zero, Floor::Covered), Ok(0));
        l.rebase(0, 0);
        assert!(l.check(0, data(s[0], 1), Floor::Covered).is_err());
        assert!(l.reserve(0, 1));
        assert_eq!(
            l.issue(0, 1, Op::Zero),
            vec![2],
            "sequence numbers keep growing"
        );
    }
}
