//! Unit attention conditions, kept per I_T nexus (SAM-5 5.14, SPC-4 5.11).
//!
//! Events that change a logical unit behind an initiator's back (resets,
//! mode changes, reservation preemption) queue a unit attention for the
//! nexuses concerned; each is reported once, on that nexus's next command.

use std::collections::{HashMap, VecDeque};

use super::sense::Sense;
use super::Nexus;

/// Nexuses tracked per logical unit. Sessions come and go; lost ones are
/// kept (to tell them about the loss when they come back) until space is
/// needed, then the least recently seen lost one goes first.
const MAX_NEXUSES: usize = 1024;
/// Pending conditions per nexus; more than this and the oldest are kept.
const MAX_PENDING: usize = 8;

#[derive(Debug, Default)]
struct NexusState {
    pending: VecDeque<Sense>,
    /// The session ended (`nexus_lost`); it may log in again.
    lost: bool,
    /// Logical time of the last command, for eviction.
    seen: u64,
}

/// The nexuses a logical unit has seen and what each has pending.
#[derive(Debug, Default)]
pub struct Attention {
    nexuses: HashMap<Nexus, NexusState>,
    clock: u64,
}

impl Attention {
    /// Record that `nexus` sent a command, so later events reach it.
    pub fn touch(&mut self, nexus: &Nexus) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(s) = self.entry(nexus) {
            s.seen = clock;
            s.lost = false;
        }
    }

    fn entry(&mut self, nexus: &Nexus) -> Option<&mut NexusState> {
        if !self.nexuses.contains_key(nexus) {
            if self.nexuses.len() >= MAX_NEXUSES {
                self.evict();
            }
            if self.nexuses.len() >= MAX_NEXUSES {
                return None;
            }
            self.nexuses.insert(nexus.clone(), NexusState::default());
        }
        self.nexuses.get_mut(nexus)
    }

    /// Drop the least recently seen nexus, preferring lost ones.
    fn evict(&mut self) {
        let victim = self
            .nexuses
            .iter()
            .min_by_key(|(_, s)| (!s.lost, s.seen))
            .map(|(n, _)| n.clone());
        if let Some(n) = victim {
            self.nexuses.remove(&n);
        }
    }

    /// Report (and clear) the oldest pending condition for `nexus`.
    pub fn take(&mut self, nexus: &Nexus) -> Option<Sense> {
        self.nexuses.get_mut(nexus)?.pending.pop_front()
    }

    /// Queue `sense` for one nexus (ignored if already pending).
    pub fn raise(&mut self, nexus: &Nexus, sense: Sense) {
        if let Some(s) = self.entry(nexus) {
            push(&mut s.pending, sense);
        }
    }

    /// Queue `sense` for every known nexus except `except`.
    pub fn raise_others(&mut self, except: Option<&Nexus>, sense: Sense) {
        for (n, s) in self.nexuses.iter_mut() {
            if Some(n) != except {
                push(&mut s.pending, sense);
            }
        }
    }

    /// A reset: whatever was pending is superseded by the reset itself,
    /// for every known nexus (including the one that asked for it).
    pub fn reset(&mut self, sense: Sense) {
        for s in self.nexuses.values_mut() {
            s.pending.clear();
            s.pending.push_back(sense);
        }
    }

    /// The nexus's session is gone: when it returns it learns of the loss.
    pub fn lost(&mut self, nexus: &Nexus, sense: Sense) {
        if let Some(s) = self.nexuses.get_mut(nexus) {
            s.pending.clear();
            s.pending.push_back(sense);
            s.lost = true;
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.nexuses.len()
    }
}

fn push(q: &mut VecDeque<Sense>, sense: Sense) {
    if !q.contains(&sense) && q.len() < MAX_PENDING {
        q.push_back(sense);
    }
}

#[cfg(test)]
mod tests {
    use super::super::sense;
    use super::*;

    fn nexus(i: usize) -> Nexus {
        Nexus {
            initiator_port: format!("iqn.i{i},i,0x1"),
            target_port: "iqn.t,t,0x1".into(),
        }
    }

    #[test]
    fn reported_once_per_nexus() {
        let mut a = Attention::default();
        let (n1, n2) = (nexus(1), nexus(2));
        a.touch(&n1);
        a.touch(&n2);
        a.raise_others(Some(&n1), sense::MODE_PARAMETERS_CHANGED);
        assert_eq!(a.take(&n1), None);
        assert_eq!(a.take(&n2), Some(sense::MODE_PARAMETERS_CHANGED));
        assert_eq!(a.take(&n2), None);
        a.reset(sense::BUS_DEVICE_RESET_OCCURRED);
        assert_eq!(a.take(&n1), Some(sense::BUS_DEVICE_RESET_OCCURRED));
        assert_eq!(a.take(&n2), Some(sense::BUS_DEVICE_RESET_OCCURRED));
        // Duplicates collapse.
        a.raise(&n1, sense::RESERVATIONS_RELEASED);
        a.raise(&n1, sense::RESERVATIONS_RELEASED);
        assert_eq!(a.take(&n1), Some(sense::RESERVATIONS_RELEASED));
        assert_eq!(a.take(&n1), None);
    }

    #[test]
    fn bounded() {
        let mut a = Attention::default();
        for i in 0..MAX_NEXUSES + 10 {
            a.touch(&nexus(i));
        }
        assert_eq!(a.len(), MAX_NEXUSES);
        let n = nexus(0);
        for _ in 0..3 * MAX_PENDING {
            a.raise(&n, sense::MODE_PARAMETERS_CHANGED);
            a.raise(&n, sense::RESERVATIONS_RELEASED);
        }
        let mut count = 0;
        while a.take(&n).is_some() {
            count += 1;
        }
        assert!(count <= MAX_PENDING);
    }

    #[test]
    fn lost_nexus_is_evicted_first() {
        let mut a = Attention::default();
        for i in 0..MAX_NEXUSES {
            a.touch(&nexus(i));
        }
        a.lost(&nexus(500), sense::I_T_NEXUS_LOSS_OCCURRED);
        a.touch(&nexus(MAX_NEXUSES));
        assert_eq!(a.take(&nexus(500)), None, "the lost one made room");
        assert!(a.nexuses.contains_key(&nexus(0)));
    }
}
