//! The SCSI block command set over a Volume.
//!
//! This is the seam between the iSCSI transport and the storage: the
//! session driver gathers a command's CDB and Data-Out bytes, calls
//! [`Target::execute`], and sends back the status, sense and Data-In.
//! Nothing here knows about PDUs.
//!
//! One module per job:
//! - [`cdb`]: CDB bytes → typed [`cdb::Command`] (sans-IO, fuzzable).
//! - [`sense`]: fixed-format sense data and the codes we use.
//! - `opcodes`: the supported-command table (REPORT SUPPORTED OPERATION
//!   CODES and reserved-bit checking both read it).
//! - `geometry`: capacity and limits derived from the volume.
//! - `inquiry`, `mode`: INQUIRY/VPD and MODE SENSE/SELECT data.
//! - `reservations`, `attention`: RESERVE(6), persistent reservations and
//!   unit attentions, kept per I_T nexus.
//! - `block`: the medium commands, as [`Volume`] calls.
//! - [`lun`]: LUN field encoding shared with the transport.
//!
//! A command runs through: LUN lookup → unit attention → CDB decode →
//! reservation check → execution.
#![forbid(unsafe_code)]

mod attention;
mod block;
pub mod cdb;
mod geometry;
mod inquiry;
pub mod lun;
mod mode;
mod opcodes;
mod reservations;
pub mod sense;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use longwire_core::Volume;

use attention::Attention;
use block::Medium;
use cdb::{Command, Transfer};
use geometry::Geometry;
use mode::ModeState;
use reservations::{Outcome, Reservations};
use sense::Sense;

pub use cdb::BLOCK_SIZE;
pub use lun::{decode_lun, encode_lun};

/// SCSI status codes (SAM-5).
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
    pub const TASK_ABORTED: u8 = 0x40;
}

/// Identifies the I_T nexus a command arrived on (initiator port ↔ target
/// port). Reservations and unit attentions are kept per nexus.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// Initiator port name: the iSCSI initiator name plus ",i,0x" and the ISID.
    pub initiator_port: String,
    /// Target port name (target name plus ",t,0x" and the TPGT).
    pub target_port: String,
}

/// What a command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandResult {
    pub status: u8,
    /// Fixed-format sense data (SPC-4 4.5.3) when `status` is CHECK CONDITION.
    pub sense: Option<Bytes>,
    /// Data-In for the initiator, at most the length the CDB allows (the
    /// allocation length or transfer length). The transport truncates it to
    /// the initiator's Expected Data Transfer Length and reports residuals.
    pub data_in: Bytes,
}

impl CommandResult {
    /// GOOD status with `data_in`.
    pub fn good(data_in: Bytes) -> CommandResult {
        CommandResult {
            status: status::GOOD,
            sense: None,
            data_in,
        }
    }

    /// CHECK CONDITION with `sense`.
    pub fn check(sense: Sense) -> CommandResult {
        CommandResult {
            status: status::CHECK_CONDITION,
            sense: Some(sense.to_fixed()),
            data_in: Bytes::new(),
        }
    }

    /// A status without sense or data (RESERVATION CONFLICT, BUSY).
    pub fn status(status: u8) -> CommandResult {
        CommandResult {
            status,
            sense: None,
            data_in: Bytes::new(),
        }
    }
}

/// Stable identity of a logical unit, shown in INQUIRY VPD pages.
#[derive(Debug, Clone)]
pub struct LunIdentity {
    /// Export name; also the basis of the unit serial number (VPD 0x80) and
    /// of the NAA designator (VPD 0x83), which must stay the same across
    /// restarts for the same export.
    pub export: String,
    /// Vendor (8 chars) and product (16 chars) for standard INQUIRY; empty
    /// means "LONGWIRE" / "longwire volume". Non-ASCII is replaced.
    pub vendor: String,
    pub product: String,
}

/// The transport's view of a CDB, decided before any data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDirection {
    None,
    /// The command reads `len` bytes from the initiator (Data-Out).
    Out {
        len: u32,
    },
    /// The command returns up to `len` bytes to the initiator (Data-In).
    In {
        len: u32,
    },
}

/// Why a command did not complete with GOOD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// CHECK CONDITION with this sense.
    Check(Sense),
    /// A status without sense (RESERVATION CONFLICT, BUSY).
    Status(u8),
}

impl From<Sense> for Failure {
    fn from(s: Sense) -> Failure {
        Failure::Check(s)
    }
}

/// `data` cut to the allocation length: never an error (SPC-4 4.2.5.6).
fn truncate(mut data: Vec<u8>, alloc: u32) -> Bytes {
    data.truncate(usize::try_from(alloc).unwrap_or(usize::MAX));
    Bytes::from(data)
}

/// The SCSI state of a logical unit that changes at run time.
#[derive(Debug)]
struct LuState {
    attention: Attention,
    reservations: Reservations,
    mode: ModeState,
}

/// A logical unit: one Volume plus the SCSI state that goes with it
/// (reservations, unit attentions, mode pages).
pub struct LogicalUnit {
    volume: Arc<dyn Volume>,
    identity: LunIdentity,
    geometry: Geometry,
    naa: [u8; 16],
    serial: String,
    state: Mutex<LuState>,
    /// Medium commands hold it shared; COMPARE AND WRITE holds it
    /// exclusively, so its compare and write are atomic with respect to
    /// every other command on this logical unit.
    io: tokio::sync::RwLock<()>,
}

impl std::fmt::Debug for LogicalUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogicalUnit")
            .field("identity", &self.identity)
            .field("geometry", &self.geometry)
            .finish_non_exhaustive()
    }
}

impl LogicalUnit {
    pub fn new(volume: Arc<dyn Volume>, identity: LunIdentity) -> Self {
        let geometry = Geometry::new(volume.size(), &volume.capabilities());
        let state = LuState {
            attention: Attention::default(),
            reservations: Reservations::default(),
            mode: ModeState::defaults(&geometry),
        };
        LogicalUnit {
            naa: inquiry::naa_designator(&identity.export),
            serial: inquiry::unit_serial(&identity.export),
            volume,
            identity,
            geometry,
            state: Mutex::new(state),
            io: tokio::sync::RwLock::new(()),
        }
    }

    pub fn volume(&self) -> &Arc<dyn Volume> {
        &self.volume
    }

    pub fn identity(&self) -> &LunIdentity {
        &self.identity
    }

    /// Number of 512-byte logical blocks.
    pub fn num_blocks(&self) -> u64 {
        self.geometry.num_blocks
    }

    /// The NAA designator reported in VPD page 83h.
    pub fn naa_designator(&self) -> [u8; 16] {
        self.naa
    }

    /// The unit serial number reported in VPD page 80h.
    pub fn unit_serial(&self) -> &str {
        &self.serial
    }

    /// The state lock. A panic while holding it cannot leave the state
    /// half-updated in a way that matters more than refusing service, so
    /// poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, LuState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Find and decode the command, refusing what this unit does not offer.
    fn decode(&self, cdb: &[u8]) -> Result<Command, Sense> {
        let info = opcodes::lookup(cdb)?;
        if !opcodes::offered(info, self.geometry.thin) {
            return Err(if opcodes::has_service_actions(info.opcode) {
                Sense::invalid_cdb(1, Some(4))
            } else {
                sense::INVALID_COMMAND_OPERATION_CODE
            });
        }
        cdb::decode(cdb)
    }

    fn data_direction(&self, cdb: &[u8]) -> DataDirection {
        let Ok(cmd) = self.decode(cdb) else {
            return DataDirection::None;
        };
        // No valid command moves more than a maximum transfer, a full
        // COMPARE AND WRITE or a 64 KiB parameter list; refusing to
        // solicit more keeps the transport from buffering it.
        if let Command::CompareAndWrite { span, .. } = cmd {
            if span.blocks == 0 {
                // Moves nothing, but ask for one byte: an initiator that
                // meant to send data (libiscsi's 256-block request, whose
                // one-byte length wrapped to 0) then shows the CDB and the
                // Data-Out disagree, which execute reports as INVALID FIELD
                // IN CDB. With nothing to send the no-op completes GOOD.
                return DataDirection::Out { len: 1 };
            }
        }
        let g = &self.geometry;
        let limit = (u64::from(g.max_transfer_blocks) * u64::from(BLOCK_SIZE))
            .max(2 * u64::from(geometry::MAX_COMPARE_AND_WRITE_BLOCKS) * u64::from(BLOCK_SIZE))
            .max(0xffff);
        match cmd.transfer() {
            Transfer::None => DataDirection::None,
            Transfer::In(n) => DataDirection::In {
                len: u32::try_from(n).unwrap_or(u32::MAX),
            },
            Transfer::Out(n) if n <= limit => DataDirection::Out {
                len: u32::try_from(n).unwrap_or(u32::MAX),
            },
            Transfer::Out(_) => DataDirection::None,
        }
    }

    /// The medium as the next command sees it.
    fn medium(&self) -> Medium<'_> {
        let mode = self.lock().mode;
        let protect = if self.geometry.read_only {
            Some(sense::WRITE_PROTECTED)
        } else if mode.swp {
            Some(sense::SOFTWARE_WRITE_PROTECTED)
        } else {
            None
        };
        Medium {
            volume: self.volume.as_ref(),
            geometry: &self.geometry,
            wce: mode.wce,
            protect,
        }
    }

    async fn execute(&self, nexus: &Nexus, cdb: &[u8], data: &Bytes) -> CommandResult {
        {
            let mut st = self.lock();
            st.attention.touch(nexus);
            let exempt = cdb
                .first()
                .is_some_and(|&op| Command::ignores_unit_attention(op));
            if !exempt {
                if let Some(ua) = st.attention.take(nexus) {
                    return CommandResult::check(ua);
                }
            }
        }
        let cmd = match self.decode(cdb) {
            Ok(cmd) => cmd,
            Err(s) => return CommandResult::check(s),
        };
        if self
            .lock()
            .reservations
            .conflicts(nexus, reservations::class(&cmd))
        {
            return CommandResult::status(status::RESERVATION_CONFLICT);
        }
        match self.run(nexus, cmd, data).await {
            Ok(data_in) => CommandResult::good(data_in),
            Err(Failure::Check(s)) => CommandResult::check(s),
            Err(Failure::Status(s)) => CommandResult::status(s),
        }
    }

    async fn run(&self, nexus: &Nexus, cmd: Command, data: &Bytes) -> Result<Bytes, Failure> {
        use Command::*;
        let none = Bytes::new();
        match cmd {
            TestUnitReady | PreventAllow { .. } | StartStopUnit => Ok(none),
            RequestSense { alloc } => {
                let s = self.lock().attention.take(nexus).unwrap_or(sense::NO_SENSE);
                Ok(truncate(s.to_fixed().to_vec(), alloc))
            }
            Inquiry { evpd, page, alloc } => {
                let d = if evpd {
                    inquiry::vpd(
                        page,
                        &inquiry::VpdSource {
                            identity: &self.identity,
                            geometry: &self.geometry,
                            naa: &self.naa,
                            serial: &self.serial,
                            nexus,
                        },
                    )?
                } else {
                    inquiry::standard(&self.identity, inquiry::PERIPHERAL_DISK)
                };
                Ok(truncate(d, alloc))
            }
            ModeSense {
                ten,
                dbd,
                llbaa,
                pc,
                page,
                subpage,
                alloc,
            } => {
                let mode = self.lock().mode;
                let req = mode::SenseRequest {
                    ten,
                    dbd,
                    llbaa,
                    pc,
                    page,
                    subpage,
                };
                let wp = self.geometry.read_only || mode.swp;
                Ok(truncate(
                    mode::mode_sense(&req, &self.geometry, mode, wp)?,
                    alloc,
                ))
            }
            ModeSelect { ten, pf, param_len } => {
                let list = data
                    .get(..param_len as usize)
                    .ok_or(sense::PARAMETER_LIST_LENGTH_ERROR)?;
                let mut st = self.lock();
                let next = mode::mode_select(ten, pf, list, &self.geometry, st.mode)?;
                if next != st.mode {
                    st.mode = next;
                    st.attention
                        .raise_others(Some(nexus), sense::MODE_PARAMETERS_CHANGED);
                }
                Ok(none)
            }
            Reserve6 => {
                self.lock().reservations.reserve6(nexus);
                Ok(none)
            }
            Release6 => {
                self.lock().reservations.release6(nexus);
                Ok(none)
            }
            // Answered by the target, which knows every LUN.
            ReportLuns { .. } => Err(sense::INTERNAL_TARGET_FAILURE.into()),
            ReportSupportedOpcodes {
                rctd,
                options,
                opcode,
                sa,
                alloc,
            } => {
                let thin = self.geometry.thin;
                let d = if options == 0 {
                    opcodes::report_all(rctd, thin)
                } else {
                    opcodes::report_one(options, opcode, sa, rctd, thin)?
                };
                Ok(truncate(d, alloc))
            }
            PersistentReserveIn { action, alloc } => {
                let d = self.lock().reservations.persistent_reserve_in(action)?;
                Ok(truncate(d, alloc))
            }
            PersistentReserveOut {
                action,
                scope,
                pr_type,
                param_len,
            } => {
                let mut st = self.lock();
                let outcome = st
                    .reservations
                    .persistent_reserve_out(nexus, action, scope, pr_type, param_len, data);
                match outcome {
                    Outcome::Good(uas) => {
                        for (n, s) in uas {
                            st.attention.raise(&n, s);
                        }
                        Ok(none)
                    }
                    Outcome::Conflict => Err(Failure::Status(status::RESERVATION_CONFLICT)),
                    Outcome::Check(s) => Err(s.into()),
                }
            }
            ReadCapacity10 => Ok(Bytes::from(block::read_capacity10(&self.geometry))),
            ReadCapacity16 { alloc } => Ok(truncate(block::read_capacity16(&self.geometry), alloc)),
            GetLbaStatus { lba, alloc } => {
                let _io = self.io.read().await;
                let d = self.medium().get_lba_status(lba, alloc).await?;
                Ok(truncate(d, alloc))
            }
            Read { span } => {
                let _io = self.io.read().await;
                self.medium().read(span).await
            }
            Write { span, fua } => {
                let _io = self.io.read().await;
                self.medium().write(span, fua, data).await.map(|()| none)
            }
            // Written durably, so the medium holds exactly the Data-Out:
            // that is the verification (and the byte compare, for BYTCHK=1).
            WriteAndVerify { span } => {
                let _io = self.io.read().await;
                self.medium().write(span, true, data).await.map(|()| none)
            }
            Verify { span, bytchk } => {
                let _io = self.io.read().await;
                self.medium()
                    .verify(span, bytchk, data)
                    .await
                    .map(|()| none)
            }
            SynchronizeCache { span } => self.medium().synchronize_cache(span).await.map(|()| none),
            PreFetch { span } => self.medium().prefetch(span).await.map(|()| none),
            Unmap { param_len } => {
                let _io = self.io.read().await;
                self.medium().unmap(param_len, data).await.map(|()| none)
            }
            WriteSame { span, unmap, ndob } => {
                let _io = self.io.read().await;
                self.medium()
                    .write_same(span, unmap, ndob, data)
                    .await
                    .map(|()| none)
            }
            CompareAndWrite { span, fua } => {
                let _io = self.io.write().await;
                self.medium()
                    .compare_and_write(span, fua, data)
                    .await
                    .map(|()| none)
            }
        }
    }

    /// A reset of this logical unit: RESERVE(6) reservations go, every
    /// nexus gets `ua`. A cold reset (power on) also restores the mode
    /// parameters; warm and LUN resets keep them, because silently turning
    /// the write cache back on behind an initiator that disabled it would
    /// lose data it believes durable.
    fn reset(&self, ua: Sense, power_on: bool) {
        let mut st = self.lock();
        st.reservations.clear_legacy();
        st.attention.reset(ua);
        if power_on {
            st.mode = ModeState::defaults(&self.geometry);
        }
    }

    fn nexus_lost(&self, nexus: &Nexus) {
        let mut st = self.lock();
        st.reservations.nexus_lost(nexus);
        st.attention.lost(nexus, sense::I_T_NEXUS_LOSS_OCCURRED);
    }
}

/// The LUNs of one iSCSI target; handles target-level commands (REPORT
/// LUNS, commands addressed to LUNs that do not exist) and dispatches the
/// rest to the right [`LogicalUnit`].
#[derive(Debug)]
pub struct Target {
    /// Sorted by LUN, no duplicates.
    luns: Vec<(u64, Arc<LogicalUnit>)>,
}

const OP_INQUIRY: u8 = 0x12;
const OP_REQUEST_SENSE: u8 = 0x03;
const OP_REPORT_LUNS: u8 = 0xa0;

impl Target {
    /// A target serving `luns`. When a LUN number appears twice the first
    /// logical unit wins.
    pub fn new(mut luns: Vec<(u64, Arc<LogicalUnit>)>) -> Self {
        luns.sort_by_key(|(n, _)| *n);
        luns.dedup_by_key(|(n, _)| *n);
        Target { luns }
    }

    /// The logical unit at `lun`, if any.
    pub fn logical_unit(&self, lun: u64) -> Option<&Arc<LogicalUnit>> {
        self.luns
            .binary_search_by_key(&lun, |(n, _)| *n)
            .ok()
            .map(|i| &self.luns[i].1)
    }

    /// LUN numbers served, ascending.
    pub fn lun_numbers(&self) -> impl Iterator<Item = u64> + '_ {
        self.luns.iter().map(|(n, _)| *n)
    }

    /// Data the CDB moves, decided from the CDB alone (for R2T and residual accounting).
    /// Unknown/malformed CDBs → DataDirection::None (execute will then report the error).
    /// Out lengths are bounded by what any valid command can need, so a
    /// transport that solicits exactly this never buffers more.
    pub fn data_direction(&self, lun: u64, cdb: &[u8]) -> DataDirection {
        let op = cdb.first().copied();
        if op == Some(OP_REPORT_LUNS) {
            return match cdb::decode(cdb) {
                Ok(Command::ReportLuns { alloc, .. }) if alloc > 0 => {
                    DataDirection::In { len: alloc }
                }
                _ => DataDirection::None,
            };
        }
        match self.logical_unit(lun) {
            Some(lu) => lu.data_direction(cdb),
            None => match (op, cdb::decode(cdb)) {
                (Some(OP_INQUIRY | OP_REQUEST_SENSE), Ok(cmd)) => match cmd.transfer() {
                    Transfer::In(n) => DataDirection::In {
                        len: u32::try_from(n).unwrap_or(u32::MAX),
                    },
                    _ => DataDirection::None,
                },
                _ => DataDirection::None,
            },
        }
    }

    /// Run one command. `data_out` holds the Data-Out the transport
    /// gathered: everything the initiator sent, up to its Expected Data
    /// Transfer Length. Less than the CDB names is handled per command
    /// (READ/WRITE family: only what arrived is written; parameter lists:
    /// PARAMETER LIST LENGTH ERROR; WRITE SAME, COMPARE AND WRITE and
    /// VERIFY with BYTCHK: INVALID FIELD IN COMMAND INFORMATION UNIT). Never
    /// panics, whatever the bytes.
    pub async fn execute(
        &self,
        nexus: &Nexus,
        lun: u64,
        cdb: &[u8],
        data_out: Bytes,
    ) -> CommandResult {
        if cdb.first() == Some(&OP_REPORT_LUNS) {
            return self.report_luns(cdb);
        }
        match self.logical_unit(lun) {
            Some(lu) => lu.execute(nexus, cdb, &data_out).await,
            None => Self::absent(cdb),
        }
    }

    /// REPORT LUNS (SPC-4 6.33): answered for any LUN, even one that does
    /// not exist, and never interrupted by a unit attention.
    fn report_luns(&self, cdb: &[u8]) -> CommandResult {
        let (select, alloc) = match cdb::decode(cdb) {
            Ok(Command::ReportLuns { select, alloc }) => (select, alloc),
            Ok(_) => return CommandResult::check(sense::INTERNAL_TARGET_FAILURE),
            Err(s) => return CommandResult::check(s),
        };
        if alloc < 16 {
            return CommandResult::check(Sense::invalid_cdb(6, None));
        }
        let luns: Vec<u64> = match select {
            // All logical units; we have no well-known ones.
            0x00 | 0x02 => self.lun_numbers().collect(),
            0x01 => Vec::new(),
            _ => return CommandResult::check(Sense::invalid_cdb(2, None)),
        };
        let mut d = ((luns.len() * 8) as u32).to_be_bytes().to_vec();
        d.extend_from_slice(&[0; 4]);
        for n in luns {
            d.extend_from_slice(&encode_lun(n));
        }
        CommandResult::good(truncate(d, alloc))
    }

    /// A command to a LUN with no logical unit (SPC-4 6.4.2, SAM-5 5.9).
    fn absent(cdb: &[u8]) -> CommandResult {
        let op = cdb.first().copied();
        if !matches!(op, Some(OP_INQUIRY | OP_REQUEST_SENSE)) {
            return CommandResult::check(sense::LOGICAL_UNIT_NOT_SUPPORTED);
        }
        match cdb::decode(cdb) {
            Ok(Command::Inquiry { evpd, page, alloc }) => {
                let d = if evpd {
                    match inquiry::vpd_absent(page) {
                        Ok(d) => d,
                        Err(s) => return CommandResult::check(s),
                    }
                } else {
                    let id = LunIdentity {
                        export: String::new(),
                        vendor: String::new(),
                        product: String::new(),
                    };
                    inquiry::standard(&id, inquiry::PERIPHERAL_NONE)
                };
                CommandResult::good(truncate(d, alloc))
            }
            Ok(Command::RequestSense { alloc }) => CommandResult::good(truncate(
                sense::LOGICAL_UNIT_NOT_SUPPORTED.to_fixed().to_vec(),
                alloc,
            )),
            Ok(_) => CommandResult::check(sense::INTERNAL_TARGET_FAILURE),
            Err(s) => CommandResult::check(s),
        }
    }

    /// Task-management effects on SCSI state: LOGICAL UNIT RESET. Clears
    /// the RESERVE(6) reservation (persistent reservations survive) and
    /// raises BUS DEVICE RESET FUNCTION OCCURRED (29h/03h) for every nexus,
    /// including the one that asked (SAM-5 5.12, 7.8).
    pub fn lun_reset(&self, lun: u64) {
        if let Some(lu) = self.logical_unit(lun) {
            lu.reset(sense::BUS_DEVICE_RESET_OCCURRED, false);
        }
    }

    /// TARGET WARM RESET (`cold` false): a LUN reset of every logical unit
    /// (29h/03h). TARGET COLD RESET: the same plus power-on semantics,
    /// POWER ON OCCURRED (29h/01h) and mode parameters back to defaults.
    pub fn target_reset(&self, cold: bool) {
        let ua = if cold {
            sense::POWER_ON_OCCURRED
        } else {
            sense::BUS_DEVICE_RESET_OCCURRED
        };
        for (_, lu) in &self.luns {
            lu.reset(ua, cold);
        }
    }

    /// The session behind `nexus` is gone: its RESERVE(6) reservations are
    /// released, and it will see I_T NEXUS LOSS OCCURRED (29h/07h) if it
    /// comes back. Persistent reservations and registrations stay.
    pub fn nexus_lost(&self, nexus: &Nexus) {
        for (_, lu) in &self.luns {
            lu.nexus_lost(nexus);
        }
    }
}
