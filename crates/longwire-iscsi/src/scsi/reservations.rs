//! Reservations: RESERVE(6)/RELEASE(6) (SPC-2 7.21, 7.24) and persistent
//! reservations (SPC-4 5.13, 6.15, 6.16), with the conflict rules that keep
//! other initiators off a reserved logical unit.
//!
//! State lives in memory: registrations survive I_T nexus loss and resets
//! as SPC-4 requires, but not a restart of the server (APTPL is refused,
//! so initiators are never promised otherwise).

use super::cdb::Command;
use super::sense::{self, Sense};
use super::Nexus;

/// Registrations kept per logical unit; more are refused with
/// INSUFFICIENT REGISTRATION RESOURCES.
const MAX_REGISTRATIONS: usize = 256;

/// Persistent reservation types (SPC-4 table 170).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrType {
    WriteExclusive = 1,
    ExclusiveAccess = 3,
    WriteExclusiveRegistrantsOnly = 5,
    ExclusiveAccessRegistrantsOnly = 6,
    WriteExclusiveAllRegistrants = 7,
    ExclusiveAccessAllRegistrants = 8,
}

impl PrType {
    fn from_code(code: u8) -> Option<PrType> {
        use PrType::*;
        Some(match code {
            1 => WriteExclusive,
            3 => ExclusiveAccess,
            5 => WriteExclusiveRegistrantsOnly,
            6 => ExclusiveAccessRegistrantsOnly,
            7 => WriteExclusiveAllRegistrants,
            8 => ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    /// Every registrant holds the reservation.
    fn all_registrants(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
        )
    }

    /// Registrants (not just the holder) get access.
    fn registrants_access(self) -> bool {
        !matches!(self, PrType::WriteExclusive | PrType::ExclusiveAccess)
    }

    /// Reads are refused to those without access, too.
    fn exclusive_access(self) -> bool {
        matches!(
            self,
            PrType::ExclusiveAccess
                | PrType::ExclusiveAccessRegistrantsOnly
                | PrType::ExclusiveAccessAllRegistrants
        )
    }
}

/// How a command fares under reservations held by others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Allowed under any reservation (identification, status, PR IN).
    Free,
    /// Reads the medium or its settings: allowed under Write Exclusive.
    Read,
    /// Changes the medium or its settings.
    Write,
    /// PERSISTENT RESERVE OUT: checks keys itself.
    PrOut,
    /// RESERVE(6): special-cased when persistent reservations exist
    /// (SPC-4 5.13.3, "compatible reservation handling").
    Reserve6,
    /// RELEASE(6): likewise; from a non-holder of a RESERVE(6) reservation
    /// it is a harmless no-op.
    Release6,
    /// Allowed even under another nexus's RESERVE(6) (SPC-2 table 18).
    Identify,
}

/// Classify a command for the conflict tables (SPC-4 5.13.1 table 63,
/// SBC-3 4.17 table 13).
pub fn class(cmd: &Command) -> Class {
    use Command::*;
    match cmd {
        Inquiry { .. } | ReportLuns { .. } | RequestSense { .. } => Class::Identify,
        PreventAllow { prevent: false } => Class::Identify,
        TestUnitReady
        | PersistentReserveIn { .. }
        | ReadCapacity10
        | ReadCapacity16 { .. }
        | ReportSupportedOpcodes { .. } => Class::Free,
        Read { .. } | Verify { .. } | PreFetch { .. } | ModeSense { .. } | GetLbaStatus { .. } => {
            Class::Read
        }
        Reserve6 => Class::Reserve6,
        Release6 => Class::Release6,
        PersistentReserveOut { .. } => Class::PrOut,
        Write { .. }
        | WriteAndVerify { .. }
        | WriteSame { .. }
        | Unmap { .. }
        | CompareAndWrite { .. }
        | SynchronizeCache { .. }
        | ModeSelect { .. }
        | StartStopUnit
        | PreventAllow { prevent: true } => Class::Write,
    }
}

#[derive(Debug, Clone)]
struct Registration {
    nexus: Nexus,
    key: u64,
}

#[derive(Debug, Clone)]
struct Reservation {
    holder: Nexus,
    kind: PrType,
}

/// What a reservation-changing command did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done; queue these unit attentions.
    Good(Vec<(Nexus, Sense)>),
    /// RESERVATION CONFLICT status.
    Conflict,
    /// CHECK CONDITION with this sense.
    Check(Sense),
}

/// The reservation state of one logical unit.
#[derive(Debug, Default)]
pub struct Reservations {
    /// RESERVE(6) holder.
    legacy: Option<Nexus>,
    generation: u32,
    registrations: Vec<Registration>,
    reservation: Option<Reservation>,
}

// PERSISTENT RESERVE OUT service actions.
const REGISTER: u8 = 0;
const RESERVE: u8 = 1;
const RELEASE: u8 = 2;
const CLEAR: u8 = 3;
const PREEMPT: u8 = 4;
const PREEMPT_AND_ABORT: u8 = 5;
const REGISTER_AND_IGNORE_EXISTING_KEY: u8 = 6;

/// PERSISTENT RESERVE OUT basic parameter list length (SPC-4 6.16.3).
const PROUT_PARAM_LEN: u32 = 24;

impl Reservations {
    fn key_of(&self, nexus: &Nexus) -> Option<u64> {
        self.registrations
            .iter()
            .find(|r| r.nexus == *nexus)
            .map(|r| r.key)
    }

    /// Holds the persistent reservation (every registrant does for the
    /// all-registrants types).
    fn is_holder(&self, nexus: &Nexus) -> bool {
        match &self.reservation {
            Some(r) if r.kind.all_registrants() => self.key_of(nexus).is_some(),
            Some(r) => r.holder == *nexus,
            None => false,
        }
    }

    /// May use the medium as if it held the reservation.
    fn has_access(&self, nexus: &Nexus, r: &Reservation) -> bool {
        if r.kind.registrants_access() {
            self.key_of(nexus).is_some()
        } else {
            r.holder == *nexus
        }
    }

    /// Would `class` from `nexus` conflict with a reservation?
    pub fn conflicts(&self, nexus: &Nexus, class: Class) -> bool {
        if let Some(holder) = &self.legacy {
            if holder != nexus && !matches!(class, Class::Identify | Class::Release6) {
                return true;
            }
        }
        let Some(r) = &self.reservation else {
            return false;
        };
        match class {
            Class::Identify | Class::Free | Class::PrOut => false,
            // Holders (and registrants with access) get a GOOD no-op; all
            // others a conflict (SPC-4 5.13.3).
            Class::Reserve6 | Class::Release6 => !self.has_access(nexus, r),
            Class::Read => !self.has_access(nexus, r) && r.kind.exclusive_access(),
            Class::Write => !self.has_access(nexus, r),
        }
    }

    /// RESERVE(6). Conflicts were checked by [`Self::conflicts`]; with a
    /// persistent reservation present this is a no-op.
    pub fn reserve6(&mut self, nexus: &Nexus) {
        if self.reservation.is_none() {
            self.legacy = Some(nexus.clone());
        }
    }

    /// RELEASE(6): releases only the caller's own reservation.
    pub fn release6(&mut self, nexus: &Nexus) {
        if self.legacy.as_ref() == Some(nexus) {
            self.legacy = None;
        }
    }

    /// Resets and nexus loss drop RESERVE(6) reservations (SPC-2 5.5.1);
    /// persistent reservations survive both.
    pub fn clear_legacy(&mut self) {
        self.legacy = None;
    }

    pub fn nexus_lost(&mut self, nexus: &Nexus) {
        self.release6(nexus);
    }

    /// Remove `nexus`'s registration and what goes with it.
    fn unregister(&mut self, nexus: &Nexus, uas: &mut Vec<(Nexus, Sense)>) {
        self.registrations.retain(|r| r.nexus != *nexus);
        let Some(r) = &self.reservation else { return };
        if r.kind.all_registrants() {
            if self.registrations.is_empty() {
                self.reservation = None;
            }
        } else if r.holder == *nexus {
            let kind = r.kind;
            self.reservation = None;
            if kind.registrants_access() {
                for reg in &self.registrations {
                    uas.push((reg.nexus.clone(), sense::RESERVATIONS_RELEASED));
                }
            }
        }
    }

    /// PERSISTENT RESERVE OUT. `list` is the Data-Out the initiator sent.
    pub fn persistent_reserve_out(
        &mut self,
        nexus: &Nexus,
        action: u8,
        scope: u8,
        type_code: u8,
        param_len: u32,
        list: &[u8],
    ) -> Outcome {
        if param_len != PROUT_PARAM_LEN {
            return Outcome::Check(sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let Some(p) = list.get(..PROUT_PARAM_LEN as usize) else {
            return Outcome::Check(sense::PARAMETER_LIST_LENGTH_ERROR);
        };
        let rk = u64::from_be_bytes(p[0..8].try_into().unwrap_or_default());
        let sark = u64::from_be_bytes(p[8..16].try_into().unwrap_or_default());
        let flags = p[20];
        let registering = matches!(action, REGISTER | REGISTER_AND_IGNORE_EXISTING_KEY);
        if flags & 0x08 != 0 {
            // SPEC_I_PT: not supported (SIP_C = 0).
            return Outcome::Check(Sense::invalid_param(20, Some(3)));
        }
        if registering && flags & 0x04 != 0 {
            // ALL_TG_PT: not supported (ATP_C = 0).
            return Outcome::Check(Sense::invalid_param(20, Some(2)));
        }
        if registering && flags & 0x01 != 0 {
            // APTPL: nothing here survives a restart (PTPL_C = 0).
            return Outcome::Check(Sense::invalid_param(20, Some(0)));
        }
        if flags & 0xf2 != 0 || p[21] != 0 {
            let at = if p[21] != 0 { 21 } else { 20 };
            return Outcome::Check(Sense::invalid_param(at, None));
        }
        let kind = match action {
            RESERVE | RELEASE | PREEMPT | PREEMPT_AND_ABORT => {
                if scope != 0 {
                    return Outcome::Check(Sense::invalid_cdb(2, Some(7)));
                }
                match PrType::from_code(type_code) {
                    Some(k) => Some(k),
                    None => return Outcome::Check(Sense::invalid_cdb(2, Some(3))),
                }
            }
            _ => None,
        };
        let mut uas = Vec::new();
        let current = self.key_of(nexus);
        match (action, kind) {
            (REGISTER | REGISTER_AND_IGNORE_EXISTING_KEY, _) => {
                let check_key = action == REGISTER;
                match current {
                    None => {
                        if check_key && rk != 0 {
                            return Outcome::Conflict;
                        }
                        if sark == 0 {
                            return Outcome::Good(uas);
                        }
                        if self.registrations.len() >= MAX_REGISTRATIONS {
                            return Outcome::Check(sense::INSUFFICIENT_REGISTRATION_RESOURCES);
                        }
                        self.registrations.push(Registration {
                            nexus: nexus.clone(),
                            key: sark,
                        });
                    }
                    Some(key) => {
                        if check_key && rk != key {
                            return Outcome::Conflict;
                        }
                        if sark == 0 {
                            self.unregister(nexus, &mut uas);
                        } else if let Some(r) =
                            self.registrations.iter_mut().find(|r| r.nexus == *nexus)
                        {
                            r.key = sark;
                        }
                    }
                }
                self.generation = self.generation.wrapping_add(1);
            }
            (RESERVE, Some(kind)) => {
                if current != Some(rk) {
                    return Outcome::Conflict;
                }
                match &self.reservation {
                    None => {
                        self.reservation = Some(Reservation {
                            holder: nexus.clone(),
                            kind,
                        })
                    }
                    Some(r) if r.kind == kind && self.is_holder(nexus) => {}
                    Some(_) => return Outcome::Conflict,
                }
            }
            (RELEASE, Some(kind)) => {
                if current != Some(rk) {
                    return Outcome::Conflict;
                }
                let Some(r) = &self.reservation else {
                    return Outcome::Good(uas);
                };
                if !self.is_holder(nexus) {
                    return Outcome::Good(uas);
                }
                if r.kind != kind {
                    return Outcome::Check(sense::INVALID_RELEASE_OF_PERSISTENT_RESERVATION);
                }
                if r.kind.registrants_access() {
                    for reg in self.registrations.iter().filter(|r| r.nexus != *nexus) {
                        uas.push((reg.nexus.clone(), sense::RESERVATIONS_RELEASED));
                    }
                }
                self.reservation = None;
            }
            (CLEAR, _) => {
                if current != Some(rk) {
                    return Outcome::Conflict;
                }
                for reg in self.registrations.iter().filter(|r| r.nexus != *nexus) {
                    uas.push((reg.nexus.clone(), sense::RESERVATIONS_PREEMPTED));
                }
                self.registrations.clear();
                self.reservation = None;
                self.generation = self.generation.wrapping_add(1);
            }
            (PREEMPT | PREEMPT_AND_ABORT, Some(kind)) => {
                if current != Some(rk) {
                    return Outcome::Conflict;
                }
                match self.preempt(nexus, sark, kind, &mut uas) {
                    Ok(()) => self.generation = self.generation.wrapping_add(1),
                    Err(o) => return o,
                }
            }
            // REGISTER AND MOVE and anything newer: unknown service actions
            // never get here (the opcode table refuses them).
            _ => return Outcome::Check(Sense::invalid_cdb(1, Some(4))),
        }
        Outcome::Good(uas)
    }

    /// PREEMPT (and PREEMPT AND ABORT, whose task aborting is the
    /// transport's business), SPC-4 5.13.11.4.
    fn preempt(
        &mut self,
        nexus: &Nexus,
        sark: u64,
        kind: PrType,
        uas: &mut Vec<(Nexus, Sense)>,
    ) -> Result<(), Outcome> {
        let removed = |regs: &[Registration], keep: &dyn Fn(&Registration) -> bool| -> Vec<Nexus> {
            regs.iter()
                .filter(|r| !keep(r))
                .map(|r| r.nexus.clone())
                .collect()
        };
        let res = self.reservation.clone();
        let (gone, new_reservation) = match &res {
            Some(r) if r.kind.all_registrants() && sark == 0 => {
                // Take over: everyone else is unregistered.
                let gone = removed(&self.registrations, &|r| r.nexus == *nexus);
                (gone, Some(kind))
            }
            Some(r) if !r.kind.all_registrants() && self.key_of(&r.holder) == Some(sark) => {
                // Preempt the holder: its key's registrations go (except
                // ours) and we take the reservation.
                let gone = removed(&self.registrations, &|r| r.key != sark || r.nexus == *nexus);
                (gone, Some(kind))
            }
            _ => {
                // Only registrations are removed.
                if sark == 0 {
                    return Err(Outcome::Check(Sense::invalid_param(8, None)));
                }
                let gone = removed(&self.registrations, &|r| r.key != sark);
                if gone.is_empty() {
                    return Err(Outcome::Conflict);
                }
                (gone, None)
            }
        };
        for n in &gone {
            self.registrations.retain(|r| r.nexus != *n);
            if n != nexus {
                uas.push((n.clone(), sense::REGISTRATIONS_PREEMPTED));
            }
        }
        match new_reservation {
            Some(kind) => {
                let changed = match &res {
                    Some(r) => r.kind != kind,
                    None => true,
                };
                self.reservation = Some(Reservation {
                    holder: nexus.clone(),
                    kind,
                });
                if changed {
                    for reg in self.registrations.iter().filter(|r| r.nexus != *nexus) {
                        uas.push((reg.nexus.clone(), sense::RESERVATIONS_RELEASED));
                    }
                }
            }
            None => {
                // Removing registrations may have removed the holder (we
                // preempted ourselves) or the last all-registrants holder.
                if let Some(r) = &self.reservation {
                    let holder_gone = if r.kind.all_registrants() {
                        self.registrations.is_empty()
                    } else {
                        self.key_of(&r.holder).is_none()
                    };
                    if holder_gone {
                        self.reservation = None;
                    }
                }
            }
        }
        Ok(())
    }

    /// PERSISTENT RESERVE IN parameter data (complete; the caller
    /// truncates to the allocation length).
    pub fn persistent_reserve_in(&self, action: u8) -> Result<Vec<u8>, Sense> {
        let mut out = self.generation.to_be_bytes().to_vec();
        match action {
            0 => {
                // READ KEYS
                let n = self.registrations.len() * 8;
                out.extend_from_slice(&(n as u32).to_be_bytes());
                for r in &self.registrations {
                    out.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            1 => {
                // READ RESERVATION
                match &self.reservation {
                    None => out.extend_from_slice(&0u32.to_be_bytes()),
                    Some(r) => {
                        out.extend_from_slice(&16u32.to_be_bytes());
                        let key = if r.kind.all_registrants() {
                            0
                        } else {
                            self.key_of(&r.holder).unwrap_or(0)
                        };
                        out.extend_from_slice(&key.to_be_bytes());
                        out.extend_from_slice(&[0; 4]);
                        out.push(0);
                        out.push(r.kind as u8); // scope 0 (LU)
                        out.extend_from_slice(&[0; 2]);
                    }
                }
            }
            2 => {
                // REPORT CAPABILITIES: CRH; TMV with ALLOW COMMANDS 001b;
                // all six reservation types.
                return Ok(vec![0x00, 0x08, 0x10, 0x90, 0xea, 0x01, 0x00, 0x00]);
            }
            3 => {
                // READ FULL STATUS
                let mut body = Vec::new();
                for r in &self.registrations {
                    let holder = self.is_holder(&r.nexus);
                    body.extend_from_slice(&r.key.to_be_bytes());
                    body.extend_from_slice(&[0; 4]);
                    body.push(u8::from(holder)); // R_HOLDER
                    body.push(match (&self.reservation, holder) {
                        (Some(res), true) => res.kind as u8,
                        _ => 0,
                    });
                    body.extend_from_slice(&[0; 4]);
                    body.extend_from_slice(&1u16.to_be_bytes()); // relative target port
                    let tid = transport_id(&r.nexus.initiator_port);
                    body.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    body.extend_from_slice(&tid);
                }
                out.extend_from_slice(&(body.len() as u32).to_be_bytes());
                out.extend(body);
            }
            _ => return Err(Sense::invalid_cdb(1, Some(4))),
        }
        Ok(out)
    }
}

/// An iSCSI TransportID (SPC-4 7.6.4.6): format 01b (name plus ",i,0x"
/// ISID) when the port name has an ISID, else format 00b; NUL-terminated
/// and padded to a multiple of four, at least 20 bytes of name.
fn transport_id(initiator_port: &str) -> Vec<u8> {
    let format: u8 = if initiator_port.contains(",i,0x") {
        0x40
    } else {
        0
    };
    let mut name: Vec<u8> = initiator_port
        .bytes()
        .filter(|&b| b != 0)
        .take(1020)
        .collect();
    name.push(0);
    name.resize(name.len().next_multiple_of(4).max(20), 0);
    let mut out = vec![format | 0x05, 0];
    out.extend_from_slice(&(name.len() as u16).to_be_bytes());
    out.extend(name);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nexus(i: u32) -> Nexus {
        Nexus {
            initiator_port: format!("iqn.2024-01.test:init{i},i,0x23d000000001"),
            target_port: "iqn.t,t,0x1".into(),
        }
    }

    fn params(rk: u64, sark: u64, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&rk.to_be_bytes());
        p[8..16].copy_from_slice(&sark.to_be_bytes());
        p[20] = flags;
        p
    }

    fn prout(r: &mut Reservations, n: &Nexus, action: u8, kind: u8, rk: u64, sark: u64) -> Outcome {
        r.persistent_reserve_out(n, action, 0, kind, 24, &params(rk, sark, 0))
    }

    fn keys(r: &Reservations) -> (u32, Vec<u64>) {
        let d = r.persistent_reserve_in(0).unwrap();
        let gen = u32::from_be_bytes(d[0..4].try_into().unwrap());
        let len = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
        assert_eq!(len, d.len() - 8);
        (
            gen,
            d[8..]
                .chunks(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                .collect(),
        )
    }

    fn reservation(r: &Reservations) -> Option<(u64, u8)> {
        let d = r.persistent_reserve_in(1).unwrap();
        (d[7] == 16).then(|| (u64::from_be_bytes(d[8..16].try_into().unwrap()), d[21]))
    }

    #[test]
    fn register_reregister_unregister() {
        let mut r = Reservations::default();
        let a = nexus(1);
        assert_eq!(
            prout(&mut r, &a, REGISTER_AND_IGNORE_EXISTING_KEY, 0, 0, 0x11),
            Outcome::Good(vec![])
        );
        assert_eq!(keys(&r), (1, vec![0x11]));
        // REGISTER with the wrong current key conflicts.
        assert_eq!(prout(&mut r, &a, REGISTER, 0, 0, 0x12), Outcome::Conflict);
        assert_eq!(
            prout(&mut r, &a, REGISTER, 0, 0x11, 0x12),
            Outcome::Good(vec![])
        );
        assert_eq!(keys(&r), (2, vec![0x12]));
        assert_eq!(
            prout(&mut r, &a, REGISTER, 0, 0x12, 0),
            Outcome::Good(vec![])
        );
        assert_eq!(keys(&r), (3, vec![]));
        // Unregistered REGISTER with a non-zero key conflicts.
        assert_eq!(prout(&mut r, &a, REGISTER, 0, 5, 6), Outcome::Conflict);
    }

    #[test]
    fn parameter_list_checks() {
        let mut r = Reservations::default();
        let a = nexus(1);
        assert_eq!(
            r.persistent_reserve_out(&a, REGISTER, 0, 0, 23, &params(0, 1, 0)),
            Outcome::Check(sense::PARAMETER_LIST_LENGTH_ERROR)
        );
        assert_eq!(
            r.persistent_reserve_out(&a, REGISTER, 0, 0, 24, &[0; 10]),
            Outcome::Check(sense::PARAMETER_LIST_LENGTH_ERROR)
        );
        assert_eq!(
            r.persistent_reserve_out(&a, REGISTER, 0, 0, 24, &params(0, 1, 0x01)),
            Outcome::Check(Sense::invalid_param(20, Some(0)))
        );
        assert_eq!(
            r.persistent_reserve_out(&a, REGISTER, 0, 0, 24, &params(0, 1, 0x08)),
            Outcome::Check(Sense::invalid_param(20, Some(3)))
        );
        prout(&mut r, &a, REGISTER, 0, 0, 1);
        assert_eq!(
            r.persistent_reserve_out(&a, RESERVE, 1, 1, 24, &params(1, 0, 0)),
            Outcome::Check(Sense::invalid_cdb(2, Some(7)))
        );
        assert_eq!(
            prout(&mut r, &a, RESERVE, 2, 1, 0),
            Outcome::Check(Sense::invalid_cdb(2, Some(3)))
        );
    }

    #[test]
    fn access_by_type() {
        // (type, registered reads, registered writes, unregistered reads, unregistered writes)
        let table = [
            (1u8, true, false, true, false),
            (3, false, false, false, false),
            (5, true, true, true, false),
            (6, true, true, false, false),
            (7, true, true, true, false),
            (8, true, true, false, false),
        ];
        for (kind, rr, rw, ur, uw) in table {
            let mut r = Reservations::default();
            let (a, b, c) = (nexus(1), nexus(2), nexus(3));
            prout(&mut r, &a, REGISTER, 0, 0, 0xa);
            prout(&mut r, &b, REGISTER, 0, 0, 0xb);
            assert_eq!(
                prout(&mut r, &a, RESERVE, kind, 0xa, 0),
                Outcome::Good(vec![])
            );
            let expect_key = if kind >= 7 { 0 } else { 0xa };
            assert_eq!(reservation(&r), Some((expect_key, kind)));
            assert!(!r.conflicts(&a, Class::Write), "type {kind}");
            assert_eq!(!r.conflicts(&b, Class::Read), rr, "type {kind}");
            assert_eq!(!r.conflicts(&b, Class::Write), rw, "type {kind}");
            assert_eq!(!r.conflicts(&c, Class::Read), ur, "type {kind}");
            assert_eq!(!r.conflicts(&c, Class::Write), uw, "type {kind}");
            assert!(!r.conflicts(&c, Class::Free));
            assert!(!r.conflicts(&c, Class::Identify));
            // A second RESERVE by someone else conflicts; the same one is fine.
            assert_eq!(
                prout(&mut r, &a, RESERVE, kind, 0xa, 0),
                Outcome::Good(vec![])
            );
            if kind < 7 {
                assert_eq!(prout(&mut r, &b, RESERVE, kind, 0xb, 0), Outcome::Conflict);
            }
            // Release with the wrong type.
            let other = if kind == 1 { 3 } else { 1 };
            assert_eq!(
                prout(&mut r, &a, RELEASE, other, 0xa, 0),
                Outcome::Check(sense::INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
            );
            let out = prout(&mut r, &a, RELEASE, kind, 0xa, 0);
            if kind >= 5 {
                assert_eq!(
                    out,
                    Outcome::Good(vec![(b.clone(), sense::RESERVATIONS_RELEASED)])
                );
            } else {
                assert_eq!(out, Outcome::Good(vec![]));
            }
            assert_eq!(reservation(&r), None);
        }
    }

    #[test]
    fn holder_unregistering_releases_unless_all_registrants() {
        for (kind, stays) in [(1u8, false), (6, false), (7, true), (8, true)] {
            let mut r = Reservations::default();
            let (a, b) = (nexus(1), nexus(2));
            prout(&mut r, &a, REGISTER, 0, 0, 1);
            prout(&mut r, &b, REGISTER, 0, 0, 2);
            prout(&mut r, &a, RESERVE, kind, 1, 0);
            prout(&mut r, &a, REGISTER, 0, 1, 0);
            assert_eq!(reservation(&r).is_some(), stays, "type {kind}");
            if stays {
                assert_eq!(
                    prout(&mut r, &b, RELEASE, kind, 2, 0),
                    Outcome::Good(vec![])
                );
                assert_eq!(reservation(&r), None);
            }
        }
    }

    #[test]
    fn clear_and_preempt() {
        let mut r = Reservations::default();
        let (a, b) = (nexus(1), nexus(2));
        prout(&mut r, &a, REGISTER, 0, 0, 1);
        prout(&mut r, &b, REGISTER, 0, 0, 2);
        let (gen, _) = keys(&r);
        // Preempt a registration (no reservation).
        assert_eq!(
            prout(&mut r, &b, PREEMPT, 3, 2, 1),
            Outcome::Good(vec![(a.clone(), sense::REGISTRATIONS_PREEMPTED)])
        );
        assert_eq!(keys(&r), (gen + 1, vec![2]));
        assert_eq!(prout(&mut r, &b, PREEMPT, 3, 2, 9), Outcome::Conflict);
        assert_eq!(
            prout(&mut r, &b, PREEMPT, 3, 2, 0),
            Outcome::Check(Sense::invalid_param(8, None))
        );
        // Preempt the holder: take over the reservation.
        prout(&mut r, &a, REGISTER, 0, 0, 1);
        prout(&mut r, &a, RESERVE, 1, 1, 0);
        let out = prout(&mut r, &b, PREEMPT, 3, 2, 1);
        assert_eq!(
            out,
            Outcome::Good(vec![(a.clone(), sense::REGISTRATIONS_PREEMPTED)])
        );
        assert_eq!(reservation(&r), Some((2, 3)));
        // CLEAR from an unregistered nexus conflicts; from a registered one
        // drops everything.
        assert_eq!(prout(&mut r, &a, CLEAR, 0, 1, 0), Outcome::Conflict);
        prout(&mut r, &a, REGISTER, 0, 0, 1);
        let (gen, _) = keys(&r);
        assert_eq!(
            prout(&mut r, &b, CLEAR, 0, 2, 0),
            Outcome::Good(vec![(a.clone(), sense::RESERVATIONS_PREEMPTED)])
        );
        assert_eq!(keys(&r), (gen + 1, vec![]));
        assert_eq!(reservation(&r), None);
    }

    #[test]
    fn legacy_reserve() {
        let mut r = Reservations::default();
        let (a, b) = (nexus(1), nexus(2));
        r.reserve6(&a);
        assert!(!r.conflicts(&a, Class::Write));
        assert!(r.conflicts(&b, Class::Read));
        assert!(r.conflicts(&b, Class::Free));
        assert!(r.conflicts(&b, Class::PrOut));
        assert!(!r.conflicts(&b, Class::Identify));
        assert!(
            !r.conflicts(&b, Class::Release6),
            "RELEASE(6) from others is a no-op"
        );
        assert!(r.conflicts(&b, Class::Reserve6));
        r.release6(&b);
        assert!(r.conflicts(&b, Class::Write));
        r.nexus_lost(&a);
        assert!(!r.conflicts(&b, Class::Write));
        // With a persistent reservation, RESERVE(6) is a no-op for holders
        // and a conflict for others.
        prout(&mut r, &a, REGISTER, 0, 0, 1);
        prout(&mut r, &a, RESERVE, 1, 1, 0);
        assert!(!r.conflicts(&a, Class::Reserve6));
        assert!(r.conflicts(&b, Class::Reserve6));
        assert!(r.conflicts(&b, Class::Release6));
        r.reserve6(&a);
        assert!(!r.conflicts(&b, Class::Read));
    }

    #[test]
    fn full_status_and_capabilities() {
        let mut r = Reservations::default();
        let a = nexus(1);
        prout(&mut r, &a, REGISTER, 0, 0, 7);
        prout(&mut r, &a, RESERVE, 3, 7, 0);
        let d = r.persistent_reserve_in(3).unwrap();
        let len = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
        assert_eq!(len, d.len() - 8);
        assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), 7);
        assert_eq!(d[20], 1, "R_HOLDER");
        assert_eq!(d[21], 3);
        let tid_len = u32::from_be_bytes(d[28..32].try_into().unwrap()) as usize;
        assert_eq!(d[32], 0x45);
        assert_eq!(u16::from_be_bytes([d[34], d[35]]) as usize + 4, tid_len);
        assert_eq!(tid_len % 4, 0);
        let caps = r.persistent_reserve_in(2).unwrap();
        assert_eq!(caps.len(), 8);
        assert_eq!(u16::from_be_bytes([caps[0], caps[1]]), 8);
        assert!(r.persistent_reserve_in(4).is_err());
    }
}
