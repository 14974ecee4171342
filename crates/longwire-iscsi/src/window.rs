//! The command window (RFC 7143 §4.2.2.1, §3.2.2.1): which CmdSNs the
//! target accepts, and the ExpCmdSN/MaxCmdSN it advertises.
//!
//! The window is a real queue depth: MaxCmdSN = ExpCmdSN + depth − 1 −
//! (commands received in order and not yet answered). So an initiator can
//! never have more than `depth` commands in flight, and MaxCmdSN never
//! moves backwards (a command arriving raises ExpCmdSN and the in-flight
//! count together; one completing lowers only the count).
//!
//! Commands with a CmdSN above ExpCmdSN but inside the window are held as
//! "ahead" until the gap is filled; anything outside the window (or
//! already seen) is to be dropped silently.

use std::collections::HashMap;

/// `a < b` in 32-bit serial number arithmetic (RFC 1982).
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && (b.wrapping_sub(a) as i32) > 0
}

/// `a <= b` in serial number arithmetic.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

/// What to do with a non-immediate PDU, by its CmdSN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// CmdSN == ExpCmdSN: deliver.
    InOrder,
    /// Inside the window, above ExpCmdSN: deliver (the gap below it is
    /// waited for before ExpCmdSN moves on).
    Ahead,
    /// Already received: drop.
    Duplicate,
    /// Outside the window: drop.
    OutOfWindow,
}

impl Admit {
    pub fn accepted(self) -> bool {
        matches!(self, Admit::InOrder | Admit::Ahead)
    }
}

/// The command window of one session.
#[derive(Debug, Clone)]
pub struct CmdWindow {
    exp_cmd_sn: u32,
    depth: u32,
    /// Commands received in order whose response is not sent yet.
    outstanding: u32,
    /// CmdSNs received above ExpCmdSN; the flag says whether the command
    /// is still outstanding.
    ahead: HashMap<u32, bool>,
}

impl CmdWindow {
    pub fn new(exp_cmd_sn: u32, depth: u32) -> CmdWindow {
        CmdWindow { exp_cmd_sn, depth: depth.max(1), outstanding: 0, ahead: HashMap::new() }
    }

    pub fn exp_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn
    }

    pub fn max_cmd_sn(&self) -> u32 {
        let free = self.depth.saturating_sub(self.outstanding);
        self.exp_cmd_sn.wrapping_add(free).wrapping_sub(1)
    }

    /// Commands counted against the queue depth.
    pub fn outstanding(&self) -> u32 {
        self.outstanding
    }

    /// A non-immediate PDU arrived. `tracked` says it stays outstanding
    /// until [`CmdWindow::complete`] (SCSI commands); PDUs answered at
    /// once (NOP-Out, Text, Logout, task management) pass `false`.
    pub fn admit(&mut self, cmd_sn: u32, tracked: bool) -> Admit {
        if sn_lt(cmd_sn, self.exp_cmd_sn) {
            return Admit::Duplicate;
        }
        if !sn_le(cmd_sn, self.max_cmd_sn()) || self.outstanding >= self.depth {
            return Admit::OutOfWindow;
        }
        if cmd_sn == self.exp_cmd_sn {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            if tracked {
                self.outstanding += 1;
            }
            while let Some(still) = self.ahead.remove(&self.exp_cmd_sn) {
                self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
                if still {
                    self.outstanding += 1;
                }
            }
            return Admit::InOrder;
        }
        if self.ahead.contains_key(&cmd_sn) {
            return Admit::Duplicate;
        }
        self.ahead.insert(cmd_sn, tracked);
        Admit::Ahead
    }

    /// Consider `cmd_sn` received without a command (an ABORT TASK for a
    /// command that never arrived, §11.5.1). Returns false when it is
    /// outside the window or already received.
    pub fn skip(&mut self, cmd_sn: u32) -> bool {
        self.admit(cmd_sn, false).accepted()
    }

    /// True when `cmd_sn` is inside the window and not received yet.
    pub fn is_pending(&self, cmd_sn: u32) -> bool {
        sn_le(self.exp_cmd_sn, cmd_sn) && sn_le(cmd_sn, self.max_cmd_sn()) && !self.ahead.contains_key(&cmd_sn)
    }

    /// A tracked command's response was sent (or it was aborted).
    pub fn complete(&mut self, cmd_sn: u32) {
        if let Some(still) = self.ahead.get_mut(&cmd_sn) {
            *still = false;
        } else {
            self.outstanding = self.outstanding.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_arithmetic_wraps() {
        assert!(sn_lt(1, 2));
        assert!(!sn_lt(2, 2));
        assert!(sn_lt(u32::MAX, 0));
        assert!(sn_lt(u32::MAX - 5, 3));
        assert!(!sn_lt(3, u32::MAX - 5));
        assert!(sn_le(7, 7));
    }

    #[test]
    fn queue_depth_closes_and_reopens_the_window() {
        let mut w = CmdWindow::new(10, 4);
        assert_eq!((w.exp_cmd_sn(), w.max_cmd_sn()), (10, 13));
        for sn in 10..14 {
            assert_eq!(w.admit(sn, true), Admit::InOrder);
            assert_eq!(w.max_cmd_sn(), 13, "MaxCmdSN does not move while commands are in flight");
        }
        assert_eq!(w.exp_cmd_sn(), 14);
        assert_eq!(w.max_cmd_sn(), 13, "window closed: MaxCmdSN = ExpCmdSN - 1");
        assert_eq!(w.admit(14, true), Admit::OutOfWindow);
        w.complete(11);
        assert_eq!(w.max_cmd_sn(), 14);
        assert_eq!(w.admit(14, true), Admit::InOrder);
    }

    #[test]
    fn out_of_window_and_duplicates_are_dropped() {
        let mut w = CmdWindow::new(100, 64);
        assert_eq!(w.max_cmd_sn(), 163);
        assert_eq!(w.admit(164, true), Admit::OutOfWindow, "MaxCmdSN + 1");
        assert_eq!(w.admit(99, true), Admit::Duplicate, "ExpCmdSN - 1");
        assert_eq!(w.exp_cmd_sn(), 100, "dropped PDUs do not move the window");
        assert_eq!(w.admit(100, true), Admit::InOrder);
        assert_eq!(w.admit(100, true), Admit::Duplicate);
    }

    #[test]
    fn gaps_are_filled_in_order() {
        let mut w = CmdWindow::new(0, 8);
        assert_eq!(w.admit(2, true), Admit::Ahead);
        assert_eq!(w.admit(2, true), Admit::Duplicate);
        assert_eq!(w.admit(1, false), Admit::Ahead);
        assert_eq!(w.exp_cmd_sn(), 0);
        assert_eq!(w.max_cmd_sn(), 7);
        assert!(w.is_pending(0));
        assert!(!w.is_pending(2));
        // The held command completes before the gap fills.
        w.complete(2);
        assert_eq!(w.admit(0, true), Admit::InOrder);
        assert_eq!(w.exp_cmd_sn(), 3);
        assert_eq!(w.outstanding(), 1, "only CmdSN 0 is still in flight");
        assert_eq!(w.max_cmd_sn(), 9);
        w.complete(0);
        assert_eq!(w.max_cmd_sn(), 10);
    }

    #[test]
    fn window_wraps_around() {
        let mut w = CmdWindow::new(u32::MAX - 1, 4);
        assert_eq!(w.max_cmd_sn(), 1);
        assert_eq!(w.admit(u32::MAX - 1, true), Admit::InOrder);
        assert_eq!(w.admit(u32::MAX, true), Admit::InOrder);
        assert_eq!(w.admit(0, true), Admit::InOrder);
        assert_eq!(w.exp_cmd_sn(), 1);
        assert_eq!(w.admit(3, true), Admit::OutOfWindow);
        assert!(w.skip(1));
        assert_eq!(w.exp_cmd_sn(), 2);
    }
}
