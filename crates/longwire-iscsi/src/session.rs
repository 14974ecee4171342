//! The session driver: runs one logged-in connection (the session, since
//! MaxConnections=1) in the full feature phase.
//!
//! - This task reads PDUs (`fill_buf` to wait, so shutdown and pings can
//!   interrupt an idle connection without losing bytes), checks them
//!   against the CmdSN window, collects write data (immediate, unsolicited,
//!   R2T-solicited), and spawns one task per SCSI command once its data is
//!   in. Task management, NOP-Out, Text and Logout are answered here.
//! - Command tasks call the SCSI layer and queue their Data-In / SCSI
//!   Response PDUs; a writer task sends PDUs in queue order, stamping
//!   StatSN, ExpCmdSN and MaxCmdSN as they leave, and batches flushes.
//! - In flight is bounded by the CmdSN window (queue depth), a cap on
//!   immediate commands and a cap on buffered write data. What waits for
//!   an initiator that does not read is bounded too (see `outbound`): READ
//!   data by a per-session budget reserved before the volume is read,
//!   other PDUs by a backlog limit past which this task stops reading.
//! - Errors the RFC leaves no recovery for at ErrorRecoveryLevel 0 (bad
//!   header digest, DataSN/offset errors) end the connection, and so the
//!   session; the initiator recovers by logging in again.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::dataout::{DataError, DataLimits, WriteCollector};
use crate::digest::{self, Digests};
use crate::keys::{self, SessionParams, SessionType, TextAssembler};
use crate::login::{LoginResult, TPGT};
use crate::metrics;
use crate::outbound::{Backlog, BacklogCharge, ReadBudget, ReadPermit};
use longwire_core::stats::{ConnState, ConnStats, ExportStats};
use crate::pdu::{self, op, reject, tmf, Bhs, Layout, Pdu, RawPdu, RESERVED_TAG};
use crate::scsi::{status, CommandResult, DataDirection, Nexus};
use crate::server::IscsiServer;
use crate::target::{self, IscsiTarget};
use crate::window::CmdWindow;

/// Largest write we buffer for one command.
pub const MAX_WRITE: u32 = 64 * 1024 * 1024;
/// Write data one session may hold while collecting; beyond it commands
/// get TASK SET FULL.
pub const WRITE_BUDGET: u64 = 256 * 1024 * 1024;
/// A PDU whose header has arrived must be complete within this time.
const PDU_TIMEOUT: Duration = Duration::from_secs(60);
/// Aborted or dropped ITTs remembered, so their late Data-Out PDUs are
/// dropped silently.
const ABORTED_MEMORY: usize = 256;

/// How a target PDU's StatSN field is filled in when it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatRule {
    /// A status: takes the next StatSN.
    Advance,
    /// Carries the next StatSN without taking it (R2T, NOP-In pings).
    Current,
    /// Reserved (Data-In without status).
    Reserved,
}

/// One message for the writer: PDUs sent back to back, and what they
/// hold of the session's bounds until they are on the socket.
struct Out {
    pdus: Vec<(Pdu, StatRule)>,
    _read: ReadPermit,
    _backlog: BacklogCharge,
}

/// Handle on a running session for the server: kill it, abort its tasks.
pub struct SessionControl {
    kill: CancellationToken,
    shared: Mutex<Option<Arc<Shared>>>,
}

impl SessionControl {
    pub(crate) fn new() -> Arc<SessionControl> {
        Arc::new(SessionControl { kill: CancellationToken::new(), shared: Mutex::new(None) })
    }

    /// Close the session (reinstatement, TARGET COLD RESET).
    pub fn kill(&self) {
        self.kill.cancel();
    }

    /// Abort tasks on `lun` (all LUNs if None), or only the task `itt`.
    /// Returns receivers that turn true once each aborted task has stopped.
    pub(crate) fn abort_tasks(&self, lun: Option<u64>, itt: Option<u32>) -> Vec<watch::Receiver<bool>> {
        let shared = self.shared.lock().unwrap().clone();
        match shared {
            Some(s) => s.abort(lun, itt).1,
            None => Vec::new(),
        }
    }
}

/// Wait until every receiver says the task stopped.
pub(crate) async fn wait_all(waits: Vec<watch::Receiver<bool>>) {
    for mut w in waits {
        let _ = w.wait_for(|d| *d).await;
    }
}

enum Phase {
    Collecting(Box<WriteCollector>),
    Executing,
}

struct Task {
    lun: u64,
    raw_lun: u64,
    cmd_sn: u32,
    /// Non-immediate: counted in the CmdSN window.
    tracked: bool,
    read: bool,
    read_len: u32,
    write: bool,
    write_len: u32,
    /// Bytes the CDB moves out (Data-Out), 0 if it is not a write.
    out_len: u32,
    cdb: Bytes,
    phase: Phase,
    aborted: bool,
    /// Answer TASK SET FULL instead of executing.
    busy: bool,
    buffered: u64,
    /// Data-In the CDB allows: what the SCSI layer may produce.
    data_in_len: u32,
    /// Stops a command still waiting for read budget (abort, session end).
    cancel: CancellationToken,
    done: watch::Sender<bool>,
}

struct State {
    window: CmdWindow,
    tasks: HashMap<u32, Task>,
    /// R2T Target Transfer Tag → ITT.
    ttts: HashMap<u32, u32>,
    next_ttt: u32,
    aborted: VecDeque<u32>,
    immediate: usize,
    buffered: u64,
}

impl State {
    fn alloc_ttt(&mut self) -> u32 {
        loop {
            self.next_ttt = self.next_ttt.wrapping_add(1);
            if self.next_ttt != RESERVED_TAG && !self.ttts.contains_key(&self.next_ttt) {
                return self.next_ttt;
            }
        }
    }

    fn remember_aborted(&mut self, itt: u32) {
        if self.aborted.len() >= ABORTED_MEMORY {
            self.aborted.pop_front();
        }
        self.aborted.push_back(itt);
    }

    /// Remove a task that will never run, releasing what it holds.
    fn drop_task(&mut self, itt: u32) -> Option<Task> {
        let task = self.tasks.remove(&itt)?;
        self.release(&task);
        self.ttts.retain(|_, i| *i != itt);
        self.remember_aborted(itt);
        Some(task)
    }

    fn release(&mut self, task: &Task) {
        if task.tracked {
            self.window.complete(task.cmd_sn);
        } else {
            self.immediate = self.immediate.saturating_sub(1);
        }
        self.buffered = self.buffered.saturating_sub(task.buffered);
    }
}

/// What command tasks share with the reader and the writer.
pub(crate) struct Shared {
    state: Mutex<State>,
    tx: mpsc::UnboundedSender<Out>,
    nexus: Nexus,
    /// The initiator's MaxRecvDataSegmentLength (may change by Text).
    initiator_mrdsl: AtomicU32,
    max_burst: u32,
    read_budget: ReadBudget,
    backlog: Arc<Backlog>,
}

impl Shared {
    fn send(&self, pdu: Pdu, rule: StatRule) {
        self.queue(vec![(pdu, rule)], ReadPermit::default());
    }

    fn send_all(&self, pdus: Vec<(Pdu, StatRule)>) {
        if !pdus.is_empty() {
            self.queue(pdus, ReadPermit::default());
        }
    }

    /// Queue PDUs for the writer. Data-In data is covered by `read`; the
    /// rest counts in the backlog.
    fn queue(&self, pdus: Vec<(Pdu, StatRule)>, read: ReadPermit) {
        let bytes = pdus
            .iter()
            .map(|(p, _)| {
                pdu::BHS_LEN
                    + match p {
                        Pdu::DataIn(_) => 0,
                        other => other.to_raw().data.len(),
                    }
            })
            .sum();
        let _ = self.tx.send(Out { pdus, _read: read, _backlog: self.backlog.charge(bytes) });
    }

    /// Abort matching tasks: ones still collecting data are dropped at
    /// once; running ones are marked so their response is never sent.
    fn abort(&self, lun: Option<u64>, itt: Option<u32>) -> (usize, Vec<watch::Receiver<bool>>) {
        let mut st = self.state.lock().unwrap();
        let matching: Vec<u32> = st
            .tasks
            .iter()
            .filter(|(i, t)| itt.is_none_or(|x| x == **i) && lun.is_none_or(|l| l == t.lun) && !t.aborted)
            .map(|(i, _)| *i)
            .collect();
        let mut waits = Vec::new();
        for i in &matching {
            let collecting = matches!(st.tasks.get(i).map(|t| &t.phase), Some(Phase::Collecting(_)));
            if collecting {
                if let Some(t) = st.drop_task(*i) {
                    let _ = t.done.send(true);
                }
            } else if let Some(t) = st.tasks.get_mut(i) {
                t.aborted = true;
                t.cancel.cancel();
                waits.push(t.done.subscribe());
            }
        }
        (matching.len(), waits)
    }

    /// A command finished: send its Data-In and status unless aborted.
    /// `read` is the read budget its data holds, freed once it is sent.
    fn finish(&self, itt: u32, result: CommandResult, read: ReadPermit) {
        let task = {
            let mut st = self.state.lock().unwrap();
            let Some(task) = st.tasks.remove(&itt) else { return };
            st.release(&task);
            task
        };
        if !task.aborted {
            let pdus = build_response(
                &task_shape(itt, &task),
                result,
                self.initiator_mrdsl.load(Ordering::Relaxed),
                self.max_burst,
            );
            if !pdus.is_empty() {
                self.queue(pdus, read);
            }
        }
        let _ = task.done.send(true);
    }
}

/// The parts of a command that shape its response.
#[derive(Debug, Clone, Copy)]
pub struct TaskShape {
    pub itt: u32,
    pub raw_lun: u64,
    pub read: bool,
    pub read_len: u32,
    pub write: bool,
    pub write_len: u32,
    pub out_len: u32,
}

fn task_shape(itt: u32, t: &Task) -> TaskShape {
    TaskShape {
        itt,
        raw_lun: t.raw_lun,
        read: t.read,
        read_len: t.read_len,
        write: t.write,
        write_len: t.write_len,
        out_len: t.out_len,
    }
}

/// Residual (overflow, underflow, count) of `actual` bytes against the
/// expected length.
fn residual(expected: u32, actual: u64) -> (bool, bool, u32) {
    let expected = expected as u64;
    if actual > expected {
        (true, false, (actual - expected).min(u32::MAX as u64) as u32)
    } else if actual < expected {
        (false, true, (expected - actual) as u32)
    } else {
        (false, false, 0)
    }
}

/// The Data-In PDUs and status of a finished command (RFC 7143 §11.4,
/// §11.7): data split by the initiator's MaxRecvDataSegmentLength, F at the
/// end of every MaxBurstLength sequence, status in the last Data-In when
/// the command succeeded without sense data, else a SCSI Response.
/// Residuals compare the Expected Data Transfer Length with what the
/// command moved: the Data-In it produced, or the Data-Out its CDB asks for.
pub fn build_response(shape: &TaskShape, result: CommandResult, mrdsl: u32, max_burst: u32) -> Vec<(Pdu, StatRule)> {
    let data = result.data_in;
    let send_len = if shape.read { (data.len() as u64).min(shape.read_len as u64) as usize } else { 0 };
    // Which residual goes in the Residual Count field.
    let (o, u, count, bidi) = if shape.write {
        let (o, u, c) = residual(shape.write_len, shape.out_len as u64);
        let bidi = shape.read.then(|| residual(shape.read_len, data.len() as u64));
        (o, u, c, bidi)
    } else if shape.read {
        let (o, u, c) = residual(shape.read_len, data.len() as u64);
        (o, u, c, None)
    } else {
        let moved = data.len().max(shape.out_len as usize) as u64;
        let (o, u, c) = residual(0, moved);
        (o, u, c, None)
    };
    let good = matches!(result.status, status::GOOD | status::CONDITION_MET | 0x10 | 0x14);
    let collapse = send_len > 0 && result.sense.is_none() && good && bidi.is_none();
    let mut out = Vec::new();
    let seg = mrdsl.max(512) as usize;
    let burst = max_burst.max(512) as usize;
    let mut pos = 0usize;
    let mut data_sn = 0u32;
    while pos < send_len {
        let burst_end = ((pos / burst) + 1) * burst;
        let end = (pos + seg).min(send_len).min(burst_end);
        let last = end == send_len;
        let with_status = last && collapse;
        out.push((
            Pdu::DataIn(pdu::DataIn {
                final_: last || end == burst_end,
                has_status: with_status,
                status: if with_status { result.status } else { 0 },
                overflow: with_status && o,
                underflow: with_status && u,
                residual: if with_status { count } else { 0 },
                lun: shape.raw_lun,
                itt: shape.itt,
                ttt: RESERVED_TAG,
                data_sn,
                buffer_offset: pos as u32,
                data: data.slice(pos..end),
                ..Default::default()
            }),
            if with_status { StatRule::Advance } else { StatRule::Reserved },
        ));
        data_sn += 1;
        pos = end;
    }
    if !collapse {
        let (bo, bu, bc) = bidi.unwrap_or((false, false, 0));
        out.push((
            Pdu::ScsiResponse(pdu::ScsiResponse {
                overflow: o,
                underflow: u,
                residual: count,
                bidi_overflow: bo,
                bidi_underflow: bu,
                bidi_residual: bc,
                response: 0,
                status: result.status,
                itt: shape.itt,
                exp_data_sn: data_sn,
                sense: result.sense.unwrap_or_default(),
                ..Default::default()
            }),
            StatRule::Advance,
        ));
    }
    out
}

/// Text exchange state (continuation in both directions).
#[derive(Default)]
struct TextState {
    assembler: TextAssembler,
    itt: u32,
    pending: VecDeque<Vec<u8>>,
    ttt: u32,
}

enum Flow {
    Continue,
    Close,
}

/// Run a logged-in session until logout, disconnect, kill or shutdown.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run<R, W>(
    server: Arc<IscsiServer>,
    rd: BufReader<R>,
    wr: W,
    login: LoginResult,
    target: Option<Arc<IscsiTarget>>,
    tsih: u16,
    control: Arc<SessionControl>,
    local: SocketAddr,
    peer: &str,
    stats: Arc<ConnStats>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let params = login.params.clone();
    let digests = Digests { header: params.header_digest, data: params.data_digest };
    let nexus = Nexus {
        initiator_port: target::initiator_port(&login.initiator_name, login.isid),
        target_port: target::target_port(target.as_ref().map(|t| t.name.as_str()).unwrap_or(""), TPGT),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            window: CmdWindow::new(login.exp_cmd_sn, server.config().queue_depth),
            tasks: HashMap::new(),
            ttts: HashMap::new(),
            next_ttt: 0x1000,
            aborted: VecDeque::new(),
            immediate: 0,
            buffered: 0,
        }),
        tx,
        nexus: nexus.clone(),
        initiator_mrdsl: AtomicU32::new(params.initiator_mrdsl),
        max_burst: params.max_burst_length,
        read_budget: ReadBudget::new(server.config().read_budget),
        backlog: Arc::new(Backlog::default()),
    });
    *control.shared.lock().unwrap() = Some(shared.clone());
    let mut writer = tokio::spawn(write_pdus(wr, rx, shared.clone(), login.next_stat_sn, digests));

    let mut conn = Conn {
        server: server.clone(),
        shared: shared.clone(),
        control: control.clone(),
        target: target.clone(),
        session_type: login.session_type,
        initiator: login.initiator_name.clone(),
        cid: login.cid,
        tsih,
        local,
        peer: peer.to_string(),
        digests,
        limits: DataLimits {
            initial_r2t: params.initial_r2t,
            immediate_data: params.immediate_data,
            first_burst_length: params.first_burst_length,
            max_burst_length: params.max_burst_length,
            max_outstanding_r2t: params.max_outstanding_r2t,
        },
        params,
        text: TextState::default(),
        lun_stats: target
            .iter()
            .flat_map(|t| t.luns.iter().filter_map(|l| Some((*l, server.config().stats.export(&t.backend.lun_export(*l)?)))))
            .collect(),
        stats: stats.clone(),
    };
    let result = conn.serve(rd).await;
    stats.set_state(ConnState::Closing);

    // Whatever ended the session: drop tasks still waiting for data, let
    // running ones finish (their responses still go out if the socket is
    // alive), then close the writer.
    let waits = shared.abort_running_or_collecting();
    if tokio::time::timeout(Duration::from_secs(30), wait_all(waits)).await.is_err() {
        warn!(peer = %conn.peer, "commands still running 30 s after the session ended");
    }
    *control.shared.lock().unwrap() = None;
    drop(conn);
    drop(shared);
    // What is still queued goes out if the initiator takes it in time; an
    // initiator that stopped reading gets no more than a ping would.
    let drain = server.config().nop_timeout;
    let written = match tokio::time::timeout(drain, &mut writer).await {
        Ok(r) => r.unwrap_or_else(|e| Err(io::Error::other(e))),
        Err(_) => {
            writer.abort();
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("initiator read nothing for {drain:?} after the session ended; dropped the PDUs still queued"),
            ))
        }
    };
    if let Some(t) = &target {
        t.backend.nexus_lost(&nexus);
    }
    result.and(written.or_else(|e| if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) { Ok(()) } else { Err(e) }))
}

impl Shared {
    /// At session end: drop collecting tasks; running ones finish
    /// normally, except that ones still waiting for read budget give up
    /// (TASK ABORTED) rather than wait for a socket nobody reads. Returns
    /// receivers for the running ones.
    fn abort_running_or_collecting(&self) -> Vec<watch::Receiver<bool>> {
        let mut st = self.state.lock().unwrap();
        let itts: Vec<u32> = st.tasks.keys().copied().collect();
        let mut waits = Vec::new();
        for itt in itts {
            let collecting = matches!(st.tasks.get(&itt).map(|t| &t.phase), Some(Phase::Collecting(_)));
            if collecting {
                if let Some(t) = st.drop_task(itt) {
                    let _ = t.done.send(true);
                }
            } else if let Some(t) = st.tasks.get(&itt) {
                t.cancel.cancel();
                waits.push(t.done.subscribe());
            }
        }
        waits
    }
}

struct Conn {
    server: Arc<IscsiServer>,
    shared: Arc<Shared>,
    control: Arc<SessionControl>,
    target: Option<Arc<IscsiTarget>>,
    session_type: SessionType,
    initiator: String,
    cid: u16,
    tsih: u16,
    local: SocketAddr,
    peer: String,
    digests: Digests,
    params: SessionParams,
    limits: DataLimits,
    text: TextState,
    /// Per-export counters of each LUN.
    lun_stats: Vec<(u64, Arc<ExportStats>)>,
    /// This connection's counters.
    stats: Arc<ConnStats>,
}

/// What reading one PDU gave.
enum Incoming {
    Pdu(Bhs, Pdu),
    /// Answer with a Reject; `fatal` ends the connection after it.
    Reject { bhs: Bhs, reason: u8, message: String, fatal: bool },
}

impl Conn {
    async fn serve<R: AsyncRead + Unpin>(&mut self, mut rd: BufReader<R>) -> io::Result<()> {
        let cfg = self.server.config().clone();
        let shutdown = self.server.shutdown_token().clone();
        let kill = self.control.kill.clone();
        let mut shutting_down = false;
        let mut grace_end = Instant::now();
        let mut last_rx = Instant::now();
        let mut ping: Option<Instant> = None;
        // Last PDU other than a NOP-Out (for the idle timeout: answering
        // our pings keeps a connection alive, not busy).
        let mut last_work = Instant::now();
        let idle_timeout = cfg.idle_timeout.filter(|d| !d.is_zero());
        loop {
            let idle_deadline = match ping {
                Some(sent) => sent + cfg.nop_timeout,
                None => last_rx + cfg.nop_interval,
            };
            // An initiator that sends but does not read: stop reading its
            // requests (and so their answers) until it takes ours.
            let backlogged = self.shared.backlog.is_full();
            tokio::select! {
                biased;
                _ = kill.cancelled() => {
                    return Err(io::Error::other("session closed by the target (reinstatement or reset)"));
                }
                _ = shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    grace_end = Instant::now() + cfg.shutdown_grace;
                    // Ask the initiator to log out (RFC 7143 §11.9.1 event 1).
                    self.shared.send(
                        Pdu::AsyncMessage(pdu::AsyncMessage {
                            event: pdu::async_event::REQUEST_LOGOUT,
                            param3: 1,
                            ..Default::default()
                        }),
                        StatRule::Advance,
                    );
                    continue;
                }
                _ = tokio::time::sleep_until(grace_end), if shutting_down => {
                    debug!(peer = %self.peer, "closing the session for shutdown");
                    return Ok(());
                }
                _ = tokio::time::sleep_until(idle_deadline) => {
                    if ping.is_some() {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "initiator stopped answering NOP-In pings"));
                    }
                    let ttt = self.shared.state.lock().unwrap().alloc_ttt();
                    self.shared.send(
                        Pdu::NopIn(pdu::NopIn { lun: 0, itt: RESERVED_TAG, ttt, ..Default::default() }),
                        StatRule::Current,
                    );
                    ping = Some(Instant::now());
                    continue;
                }
                _ = tokio::time::sleep_until(last_work + idle_timeout.unwrap_or_default()), if idle_timeout.is_some() && !shutting_down => {
                    if self.shared.state.lock().unwrap().tasks.is_empty() {
                        info!(peer = %self.peer, "closing iSCSI session idle for {:?}", idle_timeout.unwrap_or_default());
                        return Ok(());
                    }
                    // Commands still running: idle only once they are done.
                    last_work = Instant::now();
                    continue;
                }
                _ = self.shared.backlog.drained(), if backlogged => continue,
                r = rd.fill_buf(), if !backlogged => {
                    if r?.is_empty() {
                        return Ok(());
                    }
                }
            }
            let incoming = match tokio::time::timeout(PDU_TIMEOUT, self.read_pdu(&mut rd)).await {
                Ok(r) => r?,
                Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "PDU not completed within 60 s")),
            };
            last_rx = Instant::now();
            ping = None;
            if !matches!(&incoming, Incoming::Pdu(_, Pdu::NopOut(_))) {
                last_work = last_rx;
            }
            let flow = match incoming {
                Incoming::Pdu(bhs, pdu) => self.dispatch(bhs, pdu).await?,
                Incoming::Reject { bhs, reason, message, fatal } => {
                    debug!(peer = %self.peer, "rejecting {}: {message}", op::name(bhs.opcode()));
                    self.reject(&bhs, reason);
                    if reason == reject::DATA_DIGEST_ERROR && bhs.opcode() == op::DATA_OUT {
                        let pdus = {
                            let mut st = self.shared.state.lock().unwrap();
                            fail_task_locked(&mut st, bhs.itt(), crate::dataout::asc::PROTOCOL_SERVICE_CRC_ERROR)
                        };
                        if let Some(pdus) = pdus {
                            warn!(peer = %self.peer, "data digest error in write data of ITT {:#x}", bhs.itt());
                            self.shared.send_all(pdus);
                        }
                    }
                    if fatal {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, message));
                    }
                    Flow::Continue
                }
            };
            if let Flow::Close = flow {
                return Ok(());
            }
        }
    }

    /// Read one PDU (its first byte is already buffered).
    async fn read_pdu<R: AsyncRead + Unpin>(&mut self, rd: &mut BufReader<R>) -> io::Result<Incoming> {
        let mut bhs = Bhs::default();
        rd.read_exact(&mut bhs.0).await?;
        let layout = Layout::of(&bhs, self.digests);
        let mut head = vec![0u8; layout.header_rest()];
        rd.read_exact(&mut head).await?;
        if !pdu::header_digest_ok(&bhs, &head, self.digests) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "header digest error"));
        }
        if layout.data_len > self.params.target_mrdsl as usize {
            discard(rd, layout.data_wire() as u64).await?;
            return Ok(Incoming::Reject {
                bhs,
                reason: reject::PROTOCOL_ERROR,
                message: format!(
                    "data segment of {} bytes exceeds MaxRecvDataSegmentLength {}",
                    layout.data_len, self.params.target_mrdsl
                ),
                fatal: false,
            });
        }
        let mut buf = BytesMut::zeroed(layout.data_wire());
        rd.read_exact(&mut buf).await?;
        if layout.data_digest {
            let padded = pdu::pad4(layout.data_len);
            let got = digest::from_wire(buf[padded..padded + 4].try_into().unwrap());
            if got != digest::crc32c(&buf[..padded]) {
                // Reject the PDU (§7.8); a write whose data is lost ends
                // with a CHECK CONDITION (see `serve`).
                return Ok(Incoming::Reject {
                    bhs,
                    reason: reject::DATA_DIGEST_ERROR,
                    message: "data digest error".into(),
                    fatal: false,
                });
            }
        }
        let data = buf.freeze().slice(..layout.data_len);
        let raw = RawPdu { bhs, ahs: Bytes::copy_from_slice(&head[..layout.ahs_len]), data };
        Ok(match Pdu::parse(&raw) {
            Ok(p) => Incoming::Pdu(bhs, p),
            Err(e) => Incoming::Reject { bhs, reason: e.reason, message: e.message, fatal: false },
        })
    }

    /// Send a Reject for `bhs`. A rejected non-immediate request still used
    /// its CmdSN.
    fn reject(&self, bhs: &Bhs, reason: u8) {
        let carries_cmd_sn = matches!(
            bhs.opcode(),
            op::NOP_OUT | op::SCSI_COMMAND | op::TASK_MGMT_REQ | op::TEXT_REQ | op::LOGOUT_REQ
        );
        if carries_cmd_sn && !bhs.immediate() && !(bhs.opcode() == op::NOP_OUT && bhs.itt() == RESERVED_TAG) {
            self.shared.state.lock().unwrap().window.admit(bhs.u32_at(24), false);
        }
        self.send_reject(bhs, reason);
    }

    fn send_reject(&self, bhs: &Bhs, reason: u8) {
        self.shared.send(
            Pdu::Reject(pdu::Reject { reason, header: Bytes::copy_from_slice(&bhs.0), ..Default::default() }),
            StatRule::Advance,
        );
    }

    /// Admit a non-immediate request by CmdSN. False: drop it silently.
    fn admit(&self, immediate: bool, cmd_sn: u32, what: &str) -> bool {
        if immediate {
            return true;
        }
        let mut st = self.shared.state.lock().unwrap();
        let a = st.window.admit(cmd_sn, false);
        if !a.accepted() {
            debug!(
                peer = %self.peer,
                "dropping {what} with CmdSN {cmd_sn:#x} outside the window [{:#x}, {:#x}] ({a:?})",
                st.window.exp_cmd_sn(),
                st.window.max_cmd_sn()
            );
        }
        a.accepted()
    }

    async fn dispatch(&mut self, bhs: Bhs, pdu: Pdu) -> io::Result<Flow> {
        match pdu {
            Pdu::ScsiCommand(c) => self.scsi_command(&bhs, c),
            Pdu::DataOut(d) => self.data_out(&bhs, d),
            Pdu::NopOut(n) => {
                self.nop_out(n);
                Ok(Flow::Continue)
            }
            Pdu::TaskMgmtRequest(t) => self.task_mgmt(&bhs, t).await,
            Pdu::TextRequest(t) => {
                self.text_request(&bhs, t);
                Ok(Flow::Continue)
            }
            Pdu::LogoutRequest(l) => self.logout(&bhs, l).await,
            Pdu::Snack(_) => {
                self.send_reject(&bhs, reject::SNACK_REJECT);
                Ok(Flow::Continue)
            }
            other => {
                debug!(peer = %self.peer, "unexpected {} from the initiator", op::name(other.opcode()));
                self.reject(&bhs, reject::PROTOCOL_ERROR);
                Ok(Flow::Continue)
            }
        }
    }

    fn scsi_command(&mut self, bhs: &Bhs, c: pdu::ScsiCommand) -> io::Result<Flow> {
        let Some(target) = self.target.clone() else {
            self.reject(bhs, reject::PROTOCOL_ERROR);
            return Ok(Flow::Continue);
        };
        if (!c.write && !c.data.is_empty()) || (c.data.len() as u64) > c.expected_len as u64 {
            self.reject(bhs, reject::PROTOCOL_ERROR);
            return Ok(Flow::Continue);
        }
        let lun = target::decode_lun(c.lun);
        let dir = target.backend.data_direction(lun, &c.cdb);
        let (out_len, data_in_len) = match dir {
            DataDirection::Out { len } => (len, 0),
            DataDirection::In { len } => (0, len),
            DataDirection::None => (0, 0),
        };
        let read_len = match (c.read, c.write) {
            (true, true) => c.bidi_read_len.unwrap_or(0),
            (true, false) => c.expected_len,
            _ => 0,
        };
        let write_len = if c.write { c.expected_len } else { 0 };
        let (done_tx, _) = watch::channel(false);
        let mut task = Task {
            lun,
            raw_lun: c.lun,
            cmd_sn: c.cmd_sn,
            tracked: !c.immediate,
            read: c.read,
            read_len,
            write: c.write,
            write_len,
            out_len,
            cdb: c.cdb.clone(),
            phase: Phase::Executing,
            aborted: false,
            busy: false,
            buffered: 0,
            data_in_len,
            cancel: CancellationToken::new(),
            done: done_tx,
        };
        let mut r2ts = Vec::new();
        let ready_data;
        {
            let mut st = self.shared.state.lock().unwrap();
            if st.tasks.contains_key(&c.itt) {
                drop(st);
                self.reject(bhs, reject::TASK_IN_PROGRESS);
                return Ok(Flow::Continue);
            }
            if c.immediate {
                if st.immediate >= self.server.config().max_immediate {
                    drop(st);
                    self.send_reject(bhs, reject::IMMEDIATE_COMMAND_REJECT);
                    return Ok(Flow::Continue);
                }
                st.immediate += 1;
            } else {
                let a = st.window.admit(c.cmd_sn, true);
                if !a.accepted() {
                    debug!(
                        peer = %self.peer,
                        "dropping SCSI command with CmdSN {:#x} outside the window [{:#x}, {:#x}] ({a:?})",
                        c.cmd_sn,
                        st.window.exp_cmd_sn(),
                        st.window.max_cmd_sn()
                    );
                    st.remember_aborted(c.itt);
                    return Ok(Flow::Continue);
                }
            }
            if c.write {
                let mut want = out_len.min(write_len).min(MAX_WRITE);
                if st.buffered + want as u64 > WRITE_BUDGET {
                    task.busy = true;
                    want = 0;
                }
                match WriteCollector::new(self.limits, write_len, want, &c.data, c.final_) {
                    Ok(mut collector) => {
                        task.buffered = want as u64;
                        st.buffered += want as u64;
                        r2ts = collector.r2ts(|| st.alloc_ttt());
                        for r in &r2ts {
                            st.ttts.insert(r.ttt, c.itt);
                        }
                        if collector.is_complete() {
                            ready_data = Some(collector.into_data());
                        } else {
                            task.phase = Phase::Collecting(Box::new(collector));
                            ready_data = None;
                        }
                    }
                    Err(e) => {
                        st.release(&task);
                        drop(st);
                        debug!(peer = %self.peer, "refusing SCSI command: {e}");
                        self.send_reject(bhs, reject::PROTOCOL_ERROR);
                        return Ok(Flow::Continue);
                    }
                }
            } else {
                ready_data = Some(Bytes::new());
            }
            st.tasks.insert(c.itt, task);
        }
        self.shared.send_all(
            r2ts.iter()
                .map(|r| {
                    (
                        Pdu::R2t(pdu::R2t {
                            lun: c.lun,
                            itt: c.itt,
                            ttt: r.ttt,
                            r2t_sn: r.r2t_sn,
                            buffer_offset: r.offset,
                            desired_len: r.len,
                            ..Default::default()
                        }),
                        StatRule::Current,
                    )
                })
                .collect(),
        );
        if let Some(data) = ready_data {
            self.execute(c.itt, data);
        }
        Ok(Flow::Continue)
    }

    /// Start a command whose data is complete.
    fn execute(&self, itt: u32, data: Bytes) {
        let (lun, cdb, busy, read_len, data_in_len, cancel) = {
            let mut st = self.shared.state.lock().unwrap();
            let Some(t) = st.tasks.get_mut(&itt) else { return };
            t.phase = Phase::Executing;
            (t.lun, t.cdb.clone(), t.busy, t.read_len, t.data_in_len, t.cancel.clone())
        };
        // Counted once its data is in: commands dropped while collecting
        // data never ran.
        let kind = metrics::op_kind(&cdb);
        let written = data.len();
        let conn = self.stats.clone();
        let export = self.lun_stats.iter().find(|(l, _)| *l == lun).map(|(_, s)| s.clone());
        conn.received();
        let cdb0 = cdb.first().copied().unwrap_or(0);
        let shared = self.shared.clone();
        let backend = self.target.as_ref().expect("commands only run in normal sessions").backend.clone();
        tokio::spawn(async move {
            let request = conn.begin(kind, export.as_deref());
            // Reserve room for the data before the volume is read, so an
            // initiator that does not read cannot make us hold more.
            let mut read = ReadPermit::default();
            if !busy && data_in_len > 0 {
                tokio::select! {
                    p = shared.read_budget.reserve(data_in_len) => read = p,
                    _ = cancel.cancelled() => {
                        let result = CommandResult::status(status::TASK_ABORTED);
                        request.finish(0, false);
                        shared.finish(itt, result, read);
                        return;
                    }
                }
            }
            let result = if busy {
                CommandResult { status: status::TASK_SET_FULL, sense: None, data_in: Bytes::new() }
            } else {
                // Run in its own task so a panic in the SCSI layer fails
                // the command instead of leaving it hanging.
                let s = shared.clone();
                match tokio::spawn(async move { backend.execute(&s.nexus, lun, &cdb, data).await }).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!("SCSI command {:#04x} (ITT {itt:#x}) failed inside the target: {e}", cdb0);
                        CommandResult {
                            status: status::CHECK_CONDITION,
                            // HARDWARE ERROR, INTERNAL TARGET FAILURE.
                            sense: Some(Bytes::from_static(&[0x70, 0, 0x04, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x44, 0, 0, 0, 0, 0])),
                            data_in: Bytes::new(),
                        }
                    }
                }
            };
            request.finish(metrics::moved_bytes(kind, &result, read_len, written), result.status == status::GOOD);
            read.shrink_to(result.data_in.len());
            shared.finish(itt, result, read);
        });
    }

    fn data_out(&mut self, bhs: &Bhs, d: pdu::DataOut) -> io::Result<Flow> {
        let next = {
            let mut st = self.shared.state.lock().unwrap();
            data_out_locked(&mut st, &d)
        };
        match next {
            DataNext::Nothing => {}
            DataNext::Reject(reason, why) => {
                debug!(peer = %self.peer, "rejecting Data-Out: {why}");
                self.send_reject(bhs, reason);
            }
            DataNext::Fail(pdus, msg) => {
                warn!(peer = %self.peer, "write data error, failing the command (ITT {:#x}): {msg}", d.itt);
                self.shared.send_all(pdus);
            }
            DataNext::R2ts(lun, r2ts) => self.shared.send_all(
                r2ts.iter()
                    .map(|r| {
                        (
                            Pdu::R2t(pdu::R2t {
                                lun,
                                itt: d.itt,
                                ttt: r.ttt,
                                r2t_sn: r.r2t_sn,
                                buffer_offset: r.offset,
                                desired_len: r.len,
                                ..Default::default()
                            }),
                            StatRule::Current,
                        )
                    })
                    .collect(),
            ),
            DataNext::Execute(itt, data) => self.execute(itt, data),
        }
        Ok(Flow::Continue)
    }

    fn nop_out(&mut self, n: pdu::NopOut) {
        if n.itt == RESERVED_TAG {
            // The answer to one of our pings (or a ping wanting no answer).
            return;
        }
        if !self.admit(n.immediate, n.cmd_sn, "NOP-Out") {
            return;
        }
        let max = self.shared.initiator_mrdsl.load(Ordering::Relaxed) as usize;
        let data = n.data.slice(..n.data.len().min(max));
        self.shared.send(
            Pdu::NopIn(pdu::NopIn { lun: n.lun, itt: n.itt, ttt: RESERVED_TAG, data, ..Default::default() }),
            StatRule::Advance,
        );
    }

    async fn task_mgmt(&mut self, bhs: &Bhs, t: pdu::TaskMgmtRequest) -> io::Result<Flow> {
        let Some(target) = self.target.clone() else {
            self.reject(bhs, reject::PROTOCOL_ERROR);
            return Ok(Flow::Continue);
        };
        if !self.admit(t.immediate, t.cmd_sn, "task management request") {
            return Ok(Flow::Continue);
        }
        let lun = target::decode_lun(t.lun);
        let lun_check = |resp: u8| if target.has_lun(lun) { resp } else { tmf::LUN_DOES_NOT_EXIST };
        let mut cold = false;
        let response = match t.function {
            tmf::ABORT_TASK => {
                let (found, waits) = self.shared.abort(None, Some(t.ref_task_tag));
                if found > 0 {
                    wait_all(waits).await;
                    tmf::FUNCTION_COMPLETE
                } else {
                    // Never received: consider its CmdSN received (§11.5.1).
                    let mut st = self.shared.state.lock().unwrap();
                    if st.window.is_pending(t.ref_cmd_sn) && st.window.skip(t.ref_cmd_sn) {
                        tmf::FUNCTION_COMPLETE
                    } else {
                        tmf::TASK_DOES_NOT_EXIST
                    }
                }
            }
            tmf::ABORT_TASK_SET => {
                let r = lun_check(tmf::FUNCTION_COMPLETE);
                if r == tmf::FUNCTION_COMPLETE {
                    let (_, waits) = self.shared.abort(Some(lun), None);
                    wait_all(waits).await;
                }
                r
            }
            tmf::CLEAR_TASK_SET => {
                let r = lun_check(tmf::FUNCTION_COMPLETE);
                if r == tmf::FUNCTION_COMPLETE {
                    self.server.abort_everywhere(&target.name, Some(lun)).await;
                }
                r
            }
            tmf::LOGICAL_UNIT_RESET => {
                let r = lun_check(tmf::FUNCTION_COMPLETE);
                if r == tmf::FUNCTION_COMPLETE {
                    info!(peer = %self.peer, target = %target.name, lun, "LOGICAL UNIT RESET");
                    self.server.abort_everywhere(&target.name, Some(lun)).await;
                    target.backend.lun_reset(lun);
                }
                r
            }
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                cold = t.function == tmf::TARGET_COLD_RESET;
                info!(peer = %self.peer, target = %target.name, "TARGET {} RESET", if cold { "COLD" } else { "WARM" });
                self.server.abort_everywhere(&target.name, None).await;
                target.backend.target_reset(cold);
                tmf::FUNCTION_COMPLETE
            }
            tmf::CLEAR_ACA => tmf::NOT_SUPPORTED,
            tmf::TASK_REASSIGN => tmf::REASSIGNMENT_NOT_SUPPORTED,
            _ => tmf::FUNCTION_REJECTED,
        };
        self.shared.send(
            Pdu::TaskMgmtResponse(pdu::TaskMgmtResponse { response, itt: t.itt, ..Default::default() }),
            StatRule::Advance,
        );
        if cold {
            // A cold reset ends every session of the target (§11.5.1),
            // ours too once the response is out.
            self.server.kill_sessions_of(&target.name);
            return Ok(Flow::Close);
        }
        Ok(Flow::Continue)
    }

    fn text_request(&mut self, bhs: &Bhs, t: pdu::TextRequest) {
        if !self.admit(t.immediate, t.cmd_sn, "Text request") {
            return;
        }
        let mrdsl = self.shared.initiator_mrdsl.load(Ordering::Relaxed) as usize;
        // The initiator asks for the rest of a long answer.
        if t.ttt != RESERVED_TAG && !self.text.pending.is_empty() {
            if t.ttt != self.text.ttt || t.itt != self.text.itt {
                self.send_reject(bhs, reject::INVALID_PDU_FIELD);
                return;
            }
            let chunk = self.text.pending.pop_front().unwrap();
            self.send_text_chunk(&t, chunk);
            return;
        }
        if t.itt != self.text.itt {
            // A new exchange resets any unfinished one.
            self.text = TextState { itt: t.itt, ..Default::default() };
        }
        let text = match self.text.assembler.push(&t.data, t.cont) {
            Err(_) => {
                self.send_reject(bhs, reject::PROTOCOL_ERROR);
                return;
            }
            Ok(None) => {
                // More of the request follows.
                let ttt = self.shared.state.lock().unwrap().alloc_ttt();
                self.shared.send(
                    Pdu::TextResponse(pdu::TextResponse { final_: false, lun: t.lun, itt: t.itt, ttt, ..Default::default() }),
                    StatRule::Advance,
                );
                return;
            }
            Ok(Some(text)) => text,
        };
        let pairs = match keys::parse_text(&text) {
            Ok(p) => p,
            Err(_) => {
                self.send_reject(bhs, reject::PROTOCOL_ERROR);
                return;
            }
        };
        let mut out = Vec::new();
        for (k, v) in &pairs {
            match k.as_str() {
                "SendTargets" => {
                    let only = match (self.session_type, v.as_str()) {
                        (SessionType::Discovery, "All") => None,
                        (SessionType::Discovery, "") => continue,
                        (SessionType::Normal, "" | "All") => self.target.as_ref().map(|t| t.name.clone()),
                        (_, name) => Some(name.to_string()),
                    };
                    out.extend(self.server.send_targets(self.tsih, &self.initiator, self.local, only.as_deref()));
                }
                "MaxRecvDataSegmentLength" => match keys::parse_range(v, 512, (1 << 24) - 1) {
                    Some(n) => self.shared.initiator_mrdsl.store(n as u32, Ordering::Relaxed),
                    None => out.push((k.clone(), keys::REJECT.into())),
                },
                _ if matches!(v.as_str(), keys::NOT_UNDERSTOOD | keys::IRRELEVANT | keys::REJECT) => {}
                "HeaderDigest" | "DataDigest" | "MaxConnections" | "InitialR2T" | "ImmediateData" | "MaxBurstLength"
                | "FirstBurstLength" | "DefaultTime2Wait" | "DefaultTime2Retain" | "MaxOutstandingR2T"
                | "DataPDUInOrder" | "DataSequenceInOrder" | "ErrorRecoveryLevel" | "SessionType" | "InitiatorName"
                | "TargetName" | "AuthMethod" => {
                    // Leading-only and initial-only keys cannot change now.
                    out.push((k.clone(), keys::REJECT.into()));
                }
                _ => out.push((k.clone(), keys::NOT_UNDERSTOOD.into())),
            }
        }
        let encoded = keys::encode_text(&out);
        let mut chunks: VecDeque<Vec<u8>> = keys::split_text(&encoded, mrdsl).into();
        let first = chunks.pop_front().unwrap_or_default();
        self.text.pending = chunks;
        if !self.text.pending.is_empty() {
            self.text.ttt = self.shared.state.lock().unwrap().alloc_ttt();
        }
        self.send_text_chunk(&t, first);
    }

    fn send_text_chunk(&mut self, t: &pdu::TextRequest, data: Vec<u8>) {
        let more = !self.text.pending.is_empty();
        self.shared.send(
            Pdu::TextResponse(pdu::TextResponse {
                final_: !more,
                cont: more,
                lun: t.lun,
                itt: t.itt,
                ttt: if more { self.text.ttt } else { RESERVED_TAG },
                data: Bytes::from(data),
                ..Default::default()
            }),
            StatRule::Advance,
        );
        if !more {
            self.text = TextState { itt: t.itt, ..Default::default() };
        }
    }

    async fn logout(&mut self, bhs: &Bhs, l: pdu::LogoutRequest) -> io::Result<Flow> {
        if !self.admit(l.immediate, l.cmd_sn, "Logout request") {
            return Ok(Flow::Continue);
        }
        let (response, close) = match l.reason {
            0 => (0, true),
            1 if l.cid == self.cid => (0, true),
            1 => (1, false),
            2 => (2, false),
            _ => {
                self.send_reject(bhs, reject::PROTOCOL_ERROR);
                return Ok(Flow::Continue);
            }
        };
        if close {
            // Running commands answer before the logout response.
            let waits = self.shared.abort_running_or_collecting();
            if tokio::time::timeout(Duration::from_secs(30), wait_all(waits)).await.is_err() {
                warn!(peer = %self.peer, "commands still running 30 s after logout");
            }
            debug!(peer = %self.peer, tsih = self.tsih, "logout ({})", IscsiServer::session_type_name(self.session_type));
        }
        self.shared.send(
            Pdu::LogoutResponse(pdu::LogoutResponse {
                response,
                itt: l.itt,
                time2wait: self.params.default_time2wait.min(u16::MAX as u32) as u16,
                time2retain: 0,
                ..Default::default()
            }),
            StatRule::Advance,
        );
        Ok(if close { Flow::Close } else { Flow::Continue })
    }
}

/// What a Data-Out PDU leads to.
enum DataNext {
    Nothing,
    Reject(u8, String),
    /// The command failed: send these PDUs (its CHECK CONDITION).
    Fail(Vec<(Pdu, StatRule)>, String),
    R2ts(u64, Vec<crate::dataout::R2tRequest>),
    Execute(u32, Bytes),
}

/// Fixed-format sense data: ABORTED COMMAND with an additional sense code.
fn aborted_command_sense(code: (u8, u8)) -> Bytes {
    let mut s = vec![0u8; 18];
    s[0] = 0x70;
    s[2] = 0x0b;
    s[7] = 10;
    s[12] = code.0;
    s[13] = code.1;
    Bytes::from(s)
}

/// End a command that is still collecting data with CHECK CONDITION
/// (ABORTED COMMAND, `code`); later Data-Out PDUs for it are dropped.
/// Returns its response PDUs.
fn fail_task_locked(st: &mut State, itt: u32, code: (u8, u8)) -> Option<Vec<(Pdu, StatRule)>> {
    if !matches!(st.tasks.get(&itt).map(|t| &t.phase), Some(Phase::Collecting(_))) {
        return None;
    }
    let task = st.drop_task(itt)?;
    let _ = task.done.send(true);
    let result = CommandResult { status: status::CHECK_CONDITION, sense: Some(aborted_command_sense(code)), data_in: Bytes::new() };
    // No data phase happened: report the whole transfer as not done.
    let mut shape = task_shape(itt, &task);
    shape.out_len = 0;
    Some(build_response(&shape, result, DEFAULT_SEGMENT, DEFAULT_SEGMENT))
}

/// Segment size for responses that carry no data.
const DEFAULT_SEGMENT: u32 = 8192;

/// Apply a Data-Out PDU to its task (under the state lock).
fn data_out_locked(st: &mut State, d: &pdu::DataOut) -> DataNext {
    let itt = if d.ttt == RESERVED_TAG {
        d.itt
    } else {
        match st.ttts.get(&d.ttt) {
            Some(&itt) if itt == d.itt => itt,
            _ if st.aborted.contains(&d.itt) => return DataNext::Nothing,
            _ => {
                return DataNext::Reject(
                    reject::INVALID_PDU_FIELD,
                    format!("Data-Out for unknown TTT {:#x} (ITT {:#x})", d.ttt, d.itt),
                )
            }
        }
    };
    let known_aborted = st.aborted.contains(&itt);
    let State { tasks, ttts, next_ttt, .. } = st;
    let Some(task) = tasks.get_mut(&itt) else {
        if known_aborted {
            return DataNext::Nothing;
        }
        return DataNext::Reject(reject::INVALID_PDU_FIELD, format!("Data-Out for unknown ITT {itt:#x}"));
    };
    let Phase::Collecting(collector) = &mut task.phase else {
        return DataNext::Reject(reject::PROTOCOL_ERROR, format!("Data-Out for ITT {itt:#x} after its data was complete"));
    };
    match collector.data_out(d) {
        Ok(()) => {}
        Err(DataError::UnknownTtt(ttt)) => {
            return DataNext::Reject(reject::INVALID_PDU_FIELD, format!("Data-Out for unknown TTT {ttt:#x}"))
        }
        Err(DataError::Protocol(msg)) => return DataNext::Reject(reject::PROTOCOL_ERROR, msg),
        Err(DataError::Sequence { asc, ascq, message }) => {
            return match fail_task_locked(st, itt, (asc, ascq)) {
                Some(pdus) => DataNext::Fail(pdus, message),
                None => DataNext::Nothing,
            }
        }
    }
    let outstanding = collector.outstanding_ttts();
    ttts.retain(|ttt, i| *i != itt || outstanding.contains(ttt));
    if collector.is_complete() {
        let Phase::Collecting(c) = std::mem::replace(&mut task.phase, Phase::Executing) else { unreachable!() };
        return DataNext::Execute(itt, c.into_data());
    }
    let r2ts = collector.r2ts(|| loop {
        *next_ttt = next_ttt.wrapping_add(1);
        if *next_ttt != RESERVED_TAG && !ttts.contains_key(next_ttt) {
            return *next_ttt;
        }
    });
    for r in &r2ts {
        ttts.insert(r.ttt, itt);
    }
    if r2ts.is_empty() {
        DataNext::Nothing
    } else {
        DataNext::R2ts(task.raw_lun, r2ts)
    }
}

/// Read and drop `n` bytes.
async fn discard<R: AsyncRead + Unpin>(rd: &mut R, n: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut rd.take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Send PDUs in queue order, stamping StatSN/ExpCmdSN/MaxCmdSN, batching
/// whatever is ready into one flush. Each message's hold on the session's
/// bounds is released once its bytes are written (copied into the
/// buffer or the socket), not at the flush.
async fn write_pdus<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<Out>,
    shared: Arc<Shared>,
    mut stat_sn: u32,
    digests: Digests,
) -> io::Result<()> {
    // Hold only a weak reference so the channel closes when the session
    // drops its sender.
    let weak = Arc::downgrade(&shared);
    drop(shared);
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    let mut encode = |pdus: &[(Pdu, StatRule)], buf: &mut Vec<Bytes>| {
        let (exp, max) = match weak.upgrade() {
            Some(s) => {
                let st = s.state.lock().unwrap();
                (st.window.exp_cmd_sn(), st.window.max_cmd_sn())
            }
            None => (0, 0),
        };
        for (pdu, rule) in pdus {
            let mut raw = pdu.to_raw();
            let sn = match rule {
                StatRule::Advance => {
                    let s = stat_sn;
                    stat_sn = stat_sn.wrapping_add(1);
                    s
                }
                StatRule::Current => stat_sn,
                StatRule::Reserved => 0,
            };
            raw.bhs.set_sequence(sn, exp, max);
            let frame = pdu::Frame::encode(raw.bhs, &raw.ahs, &raw.data, digests);
            buf.extend(frame.pieces);
        }
    };
    let mut pieces = Vec::new();
    while let Some(mut out) = rx.recv().await {
        loop {
            encode(&out.pdus, &mut pieces);
            for p in pieces.drain(..) {
                w.write_all(&p).await?;
            }
            drop(out);
            match rx.try_recv() {
                Ok(next) => out = next,
                Err(_) => break,
            }
        }
        w.flush().await?;
    }
    w.shutdown().await.or(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(read: bool, read_len: u32, write: bool, write_len: u32, out_len: u32) -> TaskShape {
        TaskShape { itt: 9, raw_lun: 0, read, read_len, write, write_len, out_len }
    }

    fn good(data: usize) -> CommandResult {
        CommandResult { status: status::GOOD, sense: None, data_in: Bytes::from(vec![0x5a; data]) }
    }

    fn data_ins(out: &[(Pdu, StatRule)]) -> Vec<&pdu::DataIn> {
        out.iter()
            .filter_map(|(p, _)| match p {
                Pdu::DataIn(d) => Some(d),
                _ => None,
            })
            .collect()
    }

    fn response(out: &[(Pdu, StatRule)]) -> Option<&pdu::ScsiResponse> {
        out.iter().find_map(|(p, _)| match p {
            Pdu::ScsiResponse(r) => Some(r),
            _ => None,
        })
    }

    #[test]
    fn read_with_status_in_the_last_data_in() {
        let out = build_response(&shape(true, 20000, false, 0, 0), good(20000), 8192, 1 << 20);
        let d = data_ins(&out);
        assert_eq!(d.len(), 3);
        assert_eq!(d.iter().map(|d| d.data.len()).collect::<Vec<_>>(), vec![8192, 8192, 3616]);
        assert_eq!(d.iter().map(|d| d.buffer_offset).collect::<Vec<_>>(), vec![0, 8192, 16384]);
        assert_eq!(d.iter().map(|d| d.data_sn).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(!d[0].final_ && !d[0].has_status);
        assert!(d[2].final_ && d[2].has_status && d[2].status == 0);
        assert!(!d[2].underflow && !d[2].overflow);
        assert!(response(&out).is_none());
        assert_eq!(out.iter().map(|(_, r)| *r).collect::<Vec<_>>(), vec![StatRule::Reserved, StatRule::Reserved, StatRule::Advance]);
    }

    #[test]
    fn data_in_sequences_end_at_max_burst() {
        let out = build_response(&shape(true, 40000, false, 0, 0), good(40000), 8192, 16384);
        let d = data_ins(&out);
        let finals: Vec<bool> = d.iter().map(|d| d.final_).collect();
        let lens: Vec<usize> = d.iter().map(|d| d.data.len()).collect();
        assert_eq!(lens, vec![8192, 8192, 8192, 8192, 7232]);
        assert_eq!(finals, vec![false, true, false, true, true]);
    }

    #[test]
    fn read_residuals() {
        // EDTL 10000 for one 512-byte block: underflow.
        let out = build_response(&shape(true, 10000, false, 0, 0), good(512), 8192, 1 << 20);
        let d = data_ins(&out);
        assert_eq!(d.len(), 1);
        assert!(d[0].underflow && d[0].residual == 10000 - 512);
        // EDTL 200: 200 bytes sent, overflow 312.
        let out = build_response(&shape(true, 200, false, 0, 0), good(512), 8192, 1 << 20);
        let d = data_ins(&out);
        assert_eq!(d[0].data.len(), 200);
        assert!(d[0].overflow && d[0].residual == 312);
        // EDTL 0: no Data-In, a SCSI Response with overflow 512.
        let out = build_response(&shape(true, 0, false, 0, 0), good(512), 8192, 1 << 20);
        assert!(data_ins(&out).is_empty());
        let r = response(&out).unwrap();
        assert!(r.overflow && r.residual == 512 && r.status == 0 && r.exp_data_sn == 0);
    }

    #[test]
    fn write_residuals_compare_edtl_with_the_cdb() {
        let ok = CommandResult { status: status::GOOD, sense: None, data_in: Bytes::new() };
        for (edtl, cdb, o, u, n) in [(0, 512, true, false, 512), (10000, 512, false, true, 9488), (200, 512, true, false, 312), (512, 1024, true, false, 512), (512, 512, false, false, 0)] {
            let out = build_response(&shape(false, 0, true, edtl, cdb), ok.clone(), 8192, 1 << 20);
            let r = response(&out).unwrap();
            assert_eq!((r.overflow, r.underflow, r.residual), (o, u, n), "EDTL {edtl} CDB {cdb}");
        }
    }

    #[test]
    fn check_condition_sends_sense_in_a_scsi_response() {
        let sense = Bytes::from_static(&[0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0]);
        let r = CommandResult { status: status::CHECK_CONDITION, sense: Some(sense.clone()), data_in: Bytes::new() };
        let out = build_response(&shape(true, 512, false, 0, 0), r, 8192, 1 << 20);
        assert_eq!(out.len(), 1);
        let resp = response(&out).unwrap();
        assert_eq!(resp.status, status::CHECK_CONDITION);
        assert_eq!(resp.sense, sense);
        assert!(resp.underflow && resp.residual == 512);
        // Data and sense: Data-In without status, then the response.
        let r = CommandResult { status: status::CHECK_CONDITION, sense: Some(sense), data_in: Bytes::from(vec![1u8; 100]) };
        let out = build_response(&shape(true, 512, false, 0, 0), r, 8192, 1 << 20);
        assert_eq!(out.len(), 2);
        assert!(!data_ins(&out)[0].has_status);
        assert_eq!(response(&out).unwrap().exp_data_sn, 1);
        // Status without sense but not good (RESERVATION CONFLICT).
        let r = CommandResult { status: status::RESERVATION_CONFLICT, sense: None, data_in: Bytes::new() };
        let out = build_response(&shape(false, 0, false, 0, 0), r, 8192, 1 << 20);
        assert_eq!(response(&out).unwrap().status, status::RESERVATION_CONFLICT);
    }

    #[test]
    fn no_data_phase_without_the_r_bit() {
        let out = build_response(&shape(false, 0, true, 512, 0), good(512), 8192, 1 << 20);
        assert!(data_ins(&out).is_empty());
        let r = response(&out).unwrap();
        assert_eq!(r.status, 0);
        assert!(r.underflow && r.residual == 512);
    }
}
