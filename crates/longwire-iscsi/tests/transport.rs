//! The iSCSI transport end to end over TCP, with a test double standing in
//! for the SCSI layer (vendor-specific opcodes only, so nothing here
//! pretends to be SBC): login, discovery, the data phases, digests, the
//! CmdSN window, task management, pings, logout, reinstatement, shutdown,
//! and what a session holds for an initiator that stops reading.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use longwire_iscsi::initiator::{Initiator, LoginFailed, LoginOptions};
use longwire_iscsi::login::{Access, Credentials};
use longwire_iscsi::pdu::{self, login_status, reject, tmf, Pdu, RESERVED_TAG};
use longwire_iscsi::scsi::{status, CommandResult, DataDirection, Nexus};
use longwire_iscsi::target::{encode_lun, IscsiTarget, ScsiBackend};
use longwire_iscsi::{IscsiConfig, IscsiServer};
use tokio_util::sync::CancellationToken;

/// Vendor-specific test opcodes.
const WRITE_BUF: u8 = 0xc0;
const READ_BUF: u8 = 0xc1;
const SLEEP: u8 = 0xc2;
const FAIL: u8 = 0xc3;
const PANIC: u8 = 0xc4;

#[derive(Default)]
struct Double {
    buf: Mutex<Vec<u8>>,
    executed: AtomicUsize,
    lun_resets: Mutex<Vec<u64>>,
    target_resets: Mutex<Vec<bool>>,
    lost: Mutex<Vec<Nexus>>,
    held: Arc<HeldReads>,
}

/// READ data the double handed out that is still alive somewhere in the
/// target (queued, being sent), per initiator port: the honest measure of
/// what a session holds, since every byte of it is freed only when the
/// last reference goes.
#[derive(Default)]
struct HeldReads(Mutex<HashMap<String, HeldCount>>);

#[derive(Default, Clone, Copy, Debug)]
struct HeldCount {
    now: usize,
    peak: usize,
    reads: usize,
}

impl HeldReads {
    fn hold(self: &Arc<Self>, port: &str, data: Vec<u8>) -> Bytes {
        {
            let mut m = self.0.lock().unwrap();
            let c = m.entry(port.to_string()).or_default();
            c.now += data.len();
            c.peak = c.peak.max(c.now);
            c.reads += 1;
        }
        Bytes::from_owner(Held { data, port: port.to_string(), reads: self.clone() })
    }

    /// The counts of `initiator`'s session with `isid`.
    fn of(&self, isid: u64) -> HeldCount {
        let port = longwire_iscsi::target::initiator_port(INITIATOR, isid);
        self.0.lock().unwrap().get(&port).copied().unwrap_or_default()
    }
}

struct Held {
    data: Vec<u8>,
    port: String,
    reads: Arc<HeldReads>,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(c) = self.reads.0.lock().unwrap().get_mut(&self.port) {
            c.now -= self.data.len();
        }
    }
}

fn len_of(cdb: &[u8]) -> u32 {
    u32::from_be_bytes(cdb[2..6].try_into().unwrap())
}

#[async_trait]
impl ScsiBackend for Double {
    fn data_direction(&self, _lun: u64, cdb: &[u8]) -> DataDirection {
        match cdb[0] {
            WRITE_BUF => DataDirection::Out { len: len_of(cdb) },
            READ_BUF => DataDirection::In { len: len_of(cdb) },
            _ => DataDirection::None,
        }
    }

    async fn execute(&self, nexus: &Nexus, _lun: u64, cdb: &[u8], data_out: Bytes) -> CommandResult {
        self.executed.fetch_add(1, Ordering::SeqCst);
        let ok = |data_in: Bytes| CommandResult { status: status::GOOD, sense: None, data_in };
        match cdb[0] {
            WRITE_BUF => {
                let mut b = self.buf.lock().unwrap();
                if b.len() < data_out.len() {
                    b.resize(data_out.len(), 0);
                }
                b[..data_out.len()].copy_from_slice(&data_out);
                ok(Bytes::new())
            }
            READ_BUF => {
                let b = self.buf.lock().unwrap();
                let n = (len_of(cdb) as usize).min(b.len());
                ok(self.held.hold(&nexus.initiator_port, b[..n].to_vec()))
            }
            SLEEP => {
                tokio::time::sleep(Duration::from_millis(cdb[2] as u64 * 100)).await;
                ok(Bytes::new())
            }
            PANIC => panic!("test double told to panic"),
            FAIL => CommandResult {
                status: status::CHECK_CONDITION,
                sense: Some(Bytes::from_static(&[0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0])),
                data_in: Bytes::new(),
            },
            _ => ok(Bytes::new()),
        }
    }

    fn lun_reset(&self, lun: u64) {
        self.lun_resets.lock().unwrap().push(lun);
    }

    fn target_reset(&self, cold: bool) {
        self.target_resets.lock().unwrap().push(cold);
    }

    fn nexus_lost(&self, nexus: &Nexus) {
        self.lost.lock().unwrap().push(nexus.clone());
    }
}

const TARGET: &str = "iqn.2026-11.dev.longwire:disk";
const INITIATOR: &str = "iqn.2026-11.dev.longwire.test:initiator";

struct Harness {
    addr: SocketAddr,
    backend: Arc<Double>,
    server: Arc<IscsiServer>,
    shutdown: CancellationToken,
    rt: tokio::runtime::Runtime,
}

impl Harness {
    fn start() -> Harness {
        Self::with(IscsiConfig::default(), Access::default(), 1)
    }

    fn with(config: IscsiConfig, access: Access, extra_targets: usize) -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let backend = Arc::new(Double::default());
        let mut targets = vec![Arc::new(IscsiTarget {
            name: TARGET.into(),
            luns: vec![0],
            backend: backend.clone(),
            access,
        })];
        for i in 1..extra_targets {
            targets.push(Arc::new(IscsiTarget {
                name: format!("iqn.2026-11.dev.longwire:extra-target-with-a-long-name-{i:04}"),
                luns: vec![0],
                backend: backend.clone(),
                access: Access::default(),
            }));
        }
        let shutdown = CancellationToken::new();
        let server = IscsiServer::new(targets, config, shutdown.clone());
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let srv = server.clone();
        rt.spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else { return };
                let local = stream.local_addr().unwrap();
                let (rd, wr) = stream.into_split();
                tokio::spawn(srv.clone().serve_connection(rd, wr, peer, local));
            }
        });
        Harness { addr, backend, server, shutdown, rt }
    }

    fn connect(&self) -> Initiator {
        Initiator::connect(self.addr).unwrap()
    }

    fn login(&self) -> Initiator {
        self.login_with(LoginOptions::normal(INITIATOR, TARGET))
    }

    fn login_with(&self, o: LoginOptions) -> Initiator {
        let mut i = self.connect();
        i.login(&o).unwrap();
        i
    }

    fn wait_until(&self, what: &str, f: impl Fn() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("timed out waiting for {what}");
    }
}

fn cdb(op: u8, len: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = op;
    c[2..6].copy_from_slice(&len.to_be_bytes());
    c
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn discovery_reports_targets_with_portal_and_tag() {
    let h = Harness::start();
    let mut i = h.login_with(LoginOptions::discovery(INITIATOR));
    let st = i.send_targets("All").unwrap();
    assert_eq!(
        st,
        vec![("TargetName".into(), TARGET.into()), ("TargetAddress".into(), format!("{},1", h.addr))]
    );
    assert_eq!(i.logout().unwrap().response, 0);
    assert!(i.closed_within(Duration::from_secs(5)));
}

#[test]
fn long_sendtargets_answers_continue_over_several_pdus() {
    let h = Harness::with(IscsiConfig::default(), Access::default(), 300);
    let mut i = h.connect();
    i.mrdsl = 512;
    i.login(&LoginOptions::discovery(INITIATOR)).unwrap();
    let st = i.send_targets("All").unwrap();
    assert_eq!(st.iter().filter(|(k, _)| k == "TargetName").count(), 300);
    // A normal session's SendTargets names only its own target.
    let mut n = h.login();
    let st = n.send_targets("").unwrap();
    assert_eq!(st[0], ("TargetName".into(), TARGET.into()));
    assert_eq!(st.len(), 2);
}

#[test]
fn login_negotiates_and_assigns_a_tsih() {
    let h = Harness::start();
    let o = LoginOptions::normal(INITIATOR, TARGET)
        .key("InitialR2T", "No")
        .key("ImmediateData", "Yes")
        .key("MaxBurstLength", "16776192")
        .key("FirstBurstLength", "262144")
        .key("MaxOutstandingR2T", "4")
        .key("ErrorRecoveryLevel", "2")
        .key("X-org.example.magic", "1");
    let i = h.login_with(o);
    assert_ne!(i.tsih, 0);
    let get = |k: &str| i.negotiated.iter().rev().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    assert_eq!(get("TargetPortalGroupTag").as_deref(), Some("1"));
    assert_eq!(get("MaxBurstLength").as_deref(), Some("1048576"));
    assert_eq!(get("FirstBurstLength").as_deref(), Some("262144"));
    assert_eq!(get("ErrorRecoveryLevel").as_deref(), Some("0"));
    assert_eq!(get("MaxOutstandingR2T").as_deref(), Some("4"));
    assert_eq!(get("X-org.example.magic").as_deref(), Some("NotUnderstood"));
    assert_eq!(get("MaxRecvDataSegmentLength").as_deref(), Some("262144"));
    assert_eq!(i.max_cmd_sn.wrapping_sub(i.exp_cmd_sn) + 1, 64, "queue depth 64");
}

#[test]
fn login_failures_carry_status_class_and_detail() {
    let h = Harness::with(
        IscsiConfig::default(),
        Access {
            chap: Some(Credentials { user: "alice".into(), secret: "0123456789ab".into() }),
            allow_initiators: vec![INITIATOR.into()],
            ..Default::default()
        },
        1,
    );
    let try_login = |o: LoginOptions| h.connect().login(&o).err();
    assert_eq!(
        try_login(LoginOptions::normal(INITIATOR, "iqn.2026-11.dev.longwire:nope")),
        Some(LoginFailed { class: 2, detail: 3 })
    );
    let mut o = LoginOptions::normal(INITIATOR, TARGET);
    o.chap = Some(("alice".into(), "wrong-secret".into()));
    assert_eq!(try_login(o), Some(LoginFailed { class: 2, detail: 1 }));
    let mut o = LoginOptions::normal("iqn.2026-11.dev.longwire.test:intruder", TARGET);
    o.chap = Some(("alice".into(), "0123456789ab".into()));
    assert_eq!(try_login(o), Some(LoginFailed { class: 2, detail: 2 }));
    assert_eq!(try_login(LoginOptions::normal(INITIATOR, TARGET)), Some(LoginFailed { class: 2, detail: 1 }));
    let mut o = LoginOptions::normal(INITIATOR, TARGET);
    o.chap = Some(("alice".into(), "0123456789ab".into()));
    o.chap_algorithms = "7,5".into();
    let mut i = h.connect();
    i.login(&o).unwrap();
    assert_eq!(i.command(0, &cdb(0x00, 0), 0, &[]).unwrap().status, 0);
    let _ = login_status::SUCCESS;
}

#[test]
fn mutual_chap() {
    let h = Harness::with(
        IscsiConfig::default(),
        Access {
            chap: Some(Credentials { user: "alice".into(), secret: "0123456789ab".into() }),
            mutual: Some(Credentials { user: "longwire".into(), secret: "target-secret".into() }),
            ..Default::default()
        },
        1,
    );
    let mut o = LoginOptions::normal(INITIATOR, TARGET);
    o.chap = Some(("alice".into(), "0123456789ab".into()));
    o.mutual = Some(("longwire".into(), "target-secret".into()));
    let mut i = h.connect();
    i.login(&o).unwrap();
    assert_eq!(i.ping(b"x").unwrap().data, Bytes::from_static(b"x"));
}

fn write_then_read(i: &mut Initiator, h: &Harness, n: usize) {
    let data = pattern(n);
    let w = i.command(0, &cdb(WRITE_BUF, n as u32), 0, &data).unwrap();
    assert_eq!(w.status, 0);
    assert!(!w.overflow && !w.underflow);
    assert_eq!(&h.backend.buf.lock().unwrap()[..n], &data[..]);
    let r = i.command(0, &cdb(READ_BUF, n as u32), n as u32, &[]).unwrap();
    assert_eq!(r.status, 0);
    assert_eq!(r.data.len(), n);
    assert!(r.data == data, "read back what was written");
}

#[test]
fn write_with_immediate_data_and_r2ts_then_read_in_segments() {
    let h = Harness::start();
    let mut i = h.connect();
    i.mrdsl = 4096;
    i.login(&LoginOptions::normal(INITIATOR, TARGET).key("MaxBurstLength", "65536").key("MaxOutstandingR2T", "2")).unwrap();
    let n = 1_000_000;
    let data = pattern(n);
    let w = i.command(0, &cdb(WRITE_BUF, n as u32), 0, &data).unwrap();
    assert_eq!(w.status, 0);
    assert_eq!(w.r2ts as usize, (n - 65536).div_ceil(65536), "R2Ts of at most MaxBurstLength after the first burst");
    let r = i.command(0, &cdb(READ_BUF, n as u32), n as u32, &[]).unwrap();
    assert_eq!(r.data_in_pdus as usize, n.div_ceil(4096), "Data-In split by our MaxRecvDataSegmentLength");
    assert!(r.data == data);
}

#[test]
fn unsolicited_data_out_within_the_first_burst() {
    let h = Harness::start();
    let mut i = h.connect();
    i.login(&LoginOptions::normal(INITIATOR, TARGET).key("InitialR2T", "No").key("ImmediateData", "No")).unwrap();
    assert!(!i.initial_r2t && !i.immediate_data);
    write_then_read(&mut i, &h, 300_000);
    // Initial R2T, no immediate data: everything solicited.
    let mut i = h.connect();
    i.login(&LoginOptions::normal(INITIATOR, TARGET).key("InitialR2T", "Yes").key("ImmediateData", "No")).unwrap();
    write_then_read(&mut i, &h, 5000);
}

#[test]
fn header_and_data_digests() {
    let h = Harness::start();
    let mut i = h.login_with(
        LoginOptions::normal(INITIATOR, TARGET).key("HeaderDigest", "CRC32C,None").key("DataDigest", "CRC32C,None"),
    );
    assert!(i.digests.header && i.digests.data);
    write_then_read(&mut i, &h, 100_001);
    assert_eq!(i.ping(b"digest me").unwrap().data, Bytes::from_static(b"digest me"));
    // A corrupted data digest on a NOP-Out is rejected; the session goes on.
    let itt = i.next_itt();
    let cmd_sn = i.next_cmd_sn();
    let mut bytes = longwire_iscsi::initiator::encode(
        &Pdu::NopOut(pdu::NopOut { itt, ttt: RESERVED_TAG, cmd_sn, data: Bytes::from_static(b"abcd"), ..Default::default() }),
        i.digests,
    );
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    i.send_bytes(&bytes).unwrap();
    match i.recv().unwrap() {
        Pdu::Reject(r) => assert_eq!(r.reason, reject::DATA_DIGEST_ERROR),
        other => panic!("{other:?}"),
    }
    assert_eq!(i.ping(b"still here").unwrap().data, Bytes::from_static(b"still here"));
    // A corrupted header digest ends the connection.
    let mut bytes = longwire_iscsi::initiator::encode(&Pdu::NopOut(pdu::NopOut::default()), i.digests);
    bytes[48] ^= 1;
    i.send_bytes(&bytes).unwrap();
    assert!(i.closed_within(Duration::from_secs(5)));
}

#[test]
fn check_condition_and_residuals() {
    let h = Harness::start();
    let mut i = h.login();
    let r = i.command(0, &cdb(FAIL, 0), 0, &[]).unwrap();
    assert_eq!(r.status, status::CHECK_CONDITION);
    assert_eq!(r.sense[2], 5);
    i.command(0, &cdb(WRITE_BUF, 512), 0, &pattern(512)).unwrap();
    let r = i.command(0, &cdb(READ_BUF, 512), 10000, &[]).unwrap();
    assert!(r.underflow && r.residual == 10000 - 512);
    let r = i.command(0, &cdb(READ_BUF, 512), 200, &[]).unwrap();
    assert!(r.overflow && r.residual == 312);
    assert_eq!(r.data.len(), 200);
    // Write EDTL bigger than the CDB: the extra is accepted and dropped.
    let r = i.command(0, &cdb(WRITE_BUF, 512), 0, &pattern(10000)).unwrap();
    assert!(r.underflow && r.residual == 10000 - 512);
}

#[test]
fn a_panic_in_the_scsi_layer_fails_only_that_command() {
    let h = Harness::start();
    let mut i = h.login();
    let r = i.command(0, &cdb(PANIC, 0), 0, &[]).unwrap();
    assert_eq!(r.status, status::CHECK_CONDITION);
    assert_eq!((r.sense[2], r.sense[12]), (0x04, 0x44), "HARDWARE ERROR, INTERNAL TARGET FAILURE");
    assert_eq!(i.command(0, &cdb(0, 0), 0, &[]).unwrap().status, 0);
}

#[test]
fn nop_out_is_echoed() {
    let h = Harness::start();
    let mut i = h.login();
    let n = i.ping(b"hello there").unwrap();
    assert_eq!(n.data, Bytes::from_static(b"hello there"));
    assert_eq!(n.ttt, RESERVED_TAG);
}

#[test]
fn commands_outside_the_window_are_dropped() {
    let h = Harness::start();
    let mut i = h.login();
    let exp = i.exp_cmd_sn;
    for cmd_sn in [i.max_cmd_sn.wrapping_add(1), exp.wrapping_sub(1)] {
        let itt = i.next_itt();
        i.send(&Pdu::ScsiCommand(pdu::ScsiCommand {
            final_: true,
            itt,
            cmd_sn,
            cdb: Bytes::from(cdb(0, 0)),
            ..Default::default()
        }))
        .unwrap();
        assert!(i.recv_timeout(Duration::from_millis(500)).unwrap().is_none(), "CmdSN {cmd_sn} must be ignored");
    }
    assert_eq!(i.command(0, &cdb(0, 0), 0, &[]).unwrap().status, 0, "CmdSN == ExpCmdSN works");
    assert_eq!(i.exp_cmd_sn, exp.wrapping_add(1));
}

#[test]
fn window_is_a_real_queue_depth() {
    let cfg = IscsiConfig { queue_depth: 4, ..Default::default() };
    let h = Harness::with(cfg, Access::default(), 1);
    let mut i = h.login();
    assert_eq!(i.max_cmd_sn.wrapping_sub(i.exp_cmd_sn), 3);
    // Four commands that take 300 ms fill the window.
    let mut slow = cdb(SLEEP, 0);
    slow[2] = 3;
    for _ in 0..4 {
        let itt = i.next_itt();
        let cmd_sn = i.next_cmd_sn();
        i.send(&Pdu::ScsiCommand(pdu::ScsiCommand { final_: true, itt, cmd_sn, cdb: Bytes::from(slow.clone()), ..Default::default() }))
            .unwrap();
    }
    // A fifth command is outside the window until one completes.
    let itt = i.next_itt();
    let cmd_sn = i.next_cmd_sn();
    i.send(&Pdu::ScsiCommand(pdu::ScsiCommand {
        final_: true,
        itt,
        cmd_sn,
        cdb: Bytes::from(cdb(SLEEP, 0)),
        ..Default::default()
    }))
    .unwrap();
    let mut responses = 0;
    while let Some(p) = i.recv_timeout(Duration::from_secs(1)).unwrap() {
        if let Pdu::ScsiResponse(r) = p {
            assert_ne!(r.itt, itt, "the command beyond MaxCmdSN must be dropped");
            responses += 1;
        }
    }
    assert_eq!(responses, 4);
    assert_eq!(i.max_cmd_sn.wrapping_sub(i.exp_cmd_sn), 3, "window open again");
}

fn start_unsolicited_write(i: &mut Initiator, len: u32) -> u32 {
    let itt = i.next_itt();
    let cmd_sn = i.next_cmd_sn();
    i.send(&Pdu::ScsiCommand(pdu::ScsiCommand {
        final_: false,
        write: true,
        itt,
        cmd_sn,
        expected_len: len,
        cdb: Bytes::from(cdb(WRITE_BUF, len)),
        ..Default::default()
    }))
    .unwrap();
    itt
}

fn expect_aborted_command(i: &mut Initiator, itt: u32, asc: u8, ascq: u8) {
    match i.recv().unwrap() {
        Pdu::ScsiResponse(r) => {
            assert_eq!(r.itt, itt);
            assert_eq!(r.status, status::CHECK_CONDITION);
            assert_eq!((r.sense[2], r.sense[12], r.sense[13]), (0x0b, asc, ascq), "ABORTED COMMAND {asc:#x}/{ascq:#x}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn data_sequence_errors_fail_the_command_not_the_session() {
    let h = Harness::start();
    let mut i = h.login_with(LoginOptions::normal(INITIATOR, TARGET).key("InitialR2T", "No").key("ImmediateData", "No"));
    let data_out = |itt: u32, data_sn: u32, offset: u32, final_: bool| {
        Pdu::DataOut(pdu::DataOut {
            final_,
            itt,
            ttt: RESERVED_TAG,
            data_sn,
            buffer_offset: offset,
            data: Bytes::from(vec![0u8; 512]),
            ..Default::default()
        })
    };
    // Two Data-Out PDUs with DataSN 0.
    let itt = start_unsolicited_write(&mut i, 1024);
    i.send(&data_out(itt, 0, 0, false)).unwrap();
    i.send(&data_out(itt, 0, 512, true)).unwrap();
    expect_aborted_command(&mut i, itt, 0x4b, 0x00);
    // DataSN 27; reversed order (the late PDU is dropped silently).
    for (first, second) in [(27, None), (1, Some(0))] {
        let itt = start_unsolicited_write(&mut i, 1024);
        i.send(&data_out(itt, first, 0, false)).unwrap();
        expect_aborted_command(&mut i, itt, 0x4b, 0x00);
        if let Some(sn) = second {
            i.send(&data_out(itt, sn, 512, true)).unwrap();
        }
    }
    // A wrong buffer offset.
    let itt = start_unsolicited_write(&mut i, 1024);
    i.send(&data_out(itt, 0, 512, false)).unwrap();
    expect_aborted_command(&mut i, itt, 0x4b, 0x05);
    assert_eq!(i.ping(b"alive").unwrap().data, Bytes::from_static(b"alive"), "the session goes on");
    assert_eq!(h.backend.executed.load(Ordering::SeqCst), 0, "no broken write ran");
    // A data digest error in write data: Reject, then the command fails.
    let mut i = h.login_with(
        LoginOptions { isid: 0x8000_0000_0005, ..LoginOptions::normal(INITIATOR, TARGET) }
            .key("InitialR2T", "No")
            .key("ImmediateData", "No")
            .key("DataDigest", "CRC32C"),
    );
    let itt = start_unsolicited_write(&mut i, 512);
    let mut bytes = longwire_iscsi::initiator::encode(&data_out(itt, 0, 0, true), i.digests);
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    i.send_bytes(&bytes).unwrap();
    assert!(matches!(i.recv().unwrap(), Pdu::Reject(r) if r.reason == reject::DATA_DIGEST_ERROR));
    expect_aborted_command(&mut i, itt, 0x47, 0x05);
    assert_eq!(h.backend.executed.load(Ordering::SeqCst), 0);
}

#[test]
fn data_out_for_an_unknown_ttt_is_rejected() {
    let h = Harness::start();
    let mut i = h.login();
    i.send(&Pdu::DataOut(pdu::DataOut { final_: true, itt: 0x4242, ttt: 0x777, data: Bytes::from(vec![1u8; 16]), ..Default::default() }))
        .unwrap();
    match i.recv().unwrap() {
        Pdu::Reject(r) => {
            assert_eq!(r.reason, reject::INVALID_PDU_FIELD);
            assert_eq!(r.header.len(), 48);
            assert_eq!(r.header[0] & 0x3f, pdu::op::DATA_OUT);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(i.ping(b"ok").unwrap().data, Bytes::from_static(b"ok"));
}

#[test]
fn malformed_and_unsupported_pdus_are_rejected() {
    let h = Harness::start();
    let mut i = h.login();
    // Unknown opcode.
    let mut b = vec![0u8; 48];
    b[0] = 0x1c;
    b[16..20].copy_from_slice(&[0, 0, 0, 9]);
    i.send_bytes(&b).unwrap();
    match i.recv().unwrap() {
        Pdu::Reject(r) => assert_eq!(r.reason, reject::COMMAND_NOT_SUPPORTED),
        other => panic!("{other:?}"),
    }
    // SNACK at ERL 0.
    i.send(&Pdu::Snack(pdu::Snack { itt: 1, ..Default::default() })).unwrap();
    assert!(matches!(i.recv().unwrap(), Pdu::Reject(r) if r.reason == reject::SNACK_REJECT));
    // A data segment larger than our MaxRecvDataSegmentLength.
    let cmd_sn = i.cmd_sn;
    i.send(&Pdu::NopOut(pdu::NopOut { immediate: true, itt: 5, ttt: RESERVED_TAG, cmd_sn, data: Bytes::from(vec![0u8; 300_000]), ..Default::default() }))
        .unwrap();
    assert!(matches!(i.recv().unwrap(), Pdu::Reject(r) if r.reason == reject::PROTOCOL_ERROR));
    // A Login Request in the full feature phase.
    i.send(&Pdu::LoginRequest(pdu::LoginRequest::default())).unwrap();
    assert!(matches!(i.recv().unwrap(), Pdu::Reject(r) if r.reason == reject::PROTOCOL_ERROR));
    assert_eq!(i.ping(b"alive").unwrap().data, Bytes::from_static(b"alive"));
}

#[test]
fn abort_task_suppresses_the_response() {
    let h = Harness::start();
    let mut i = h.login();
    let itt = i.next_itt();
    let cmd_sn = i.next_cmd_sn();
    i.send(&Pdu::ScsiCommand(pdu::ScsiCommand {
        final_: true,
        itt,
        cmd_sn,
        cdb: Bytes::from({
            let mut c = cdb(SLEEP, 0);
            c[2] = 5;
            c
        }),
        ..Default::default()
    }))
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let tm_itt = i.next_itt();
    i.send(&Pdu::TaskMgmtRequest(pdu::TaskMgmtRequest {
        immediate: true,
        function: tmf::ABORT_TASK,
        itt: tm_itt,
        ref_task_tag: itt,
        ref_cmd_sn: cmd_sn,
        cmd_sn: i.cmd_sn,
        ..Default::default()
    }))
    .unwrap();
    match i.recv().unwrap() {
        Pdu::TaskMgmtResponse(r) => {
            assert_eq!(r.itt, tm_itt);
            assert_eq!(r.response, tmf::FUNCTION_COMPLETE);
        }
        other => panic!("{other:?}"),
    }
    assert!(i.recv_timeout(Duration::from_millis(800)).unwrap().is_none(), "no response for the aborted task");
    // An unknown task.
    let tm_itt = i.next_itt();
    i.send(&Pdu::TaskMgmtRequest(pdu::TaskMgmtRequest {
        immediate: true,
        function: tmf::ABORT_TASK,
        itt: tm_itt,
        ref_task_tag: 0xdead,
        ref_cmd_sn: cmd_sn,
        cmd_sn: i.cmd_sn,
        ..Default::default()
    }))
    .unwrap();
    assert!(matches!(i.recv().unwrap(), Pdu::TaskMgmtResponse(r) if r.response == tmf::TASK_DOES_NOT_EXIST));
    assert_eq!(i.command(0, &cdb(0, 0), 0, &[]).unwrap().status, 0);
}

fn tmf_request(i: &mut Initiator, function: u8, lun: u64) -> u8 {
    let itt = i.next_itt();
    i.send(&Pdu::TaskMgmtRequest(pdu::TaskMgmtRequest {
        immediate: true,
        function,
        lun: encode_lun(lun),
        itt,
        ref_task_tag: RESERVED_TAG,
        cmd_sn: i.cmd_sn,
        ..Default::default()
    }))
    .unwrap();
    loop {
        match i.recv().unwrap() {
            Pdu::TaskMgmtResponse(r) => {
                assert_eq!(r.itt, itt);
                return r.response;
            }
            Pdu::ScsiResponse(_) => continue,
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn resets_and_their_response_codes() {
    let h = Harness::start();
    let mut i = h.login();
    let mut other = h.login_with(LoginOptions { isid: 0x8000_0000_0002, ..LoginOptions::normal(INITIATOR, TARGET) });
    // A long command on the other session is aborted by the LUN reset and
    // never answered.
    let itt = other.next_itt();
    let cmd_sn = other.next_cmd_sn();
    let mut c = cdb(SLEEP, 0);
    c[2] = 3;
    other
        .send(&Pdu::ScsiCommand(pdu::ScsiCommand { final_: true, itt, cmd_sn, cdb: Bytes::from(c), ..Default::default() }))
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(tmf_request(&mut i, tmf::LOGICAL_UNIT_RESET, 0), tmf::FUNCTION_COMPLETE);
    assert_eq!(*h.backend.lun_resets.lock().unwrap(), vec![0]);
    assert!(other.recv_timeout(Duration::from_millis(500)).unwrap().is_none());
    assert_eq!(tmf_request(&mut i, tmf::LOGICAL_UNIT_RESET, 5), tmf::LUN_DOES_NOT_EXIST);
    assert_eq!(tmf_request(&mut i, tmf::ABORT_TASK_SET, 0), tmf::FUNCTION_COMPLETE);
    assert_eq!(tmf_request(&mut i, tmf::CLEAR_TASK_SET, 0), tmf::FUNCTION_COMPLETE);
    assert_eq!(tmf_request(&mut i, tmf::CLEAR_ACA, 0), tmf::NOT_SUPPORTED);
    assert_eq!(tmf_request(&mut i, tmf::TASK_REASSIGN, 0), tmf::REASSIGNMENT_NOT_SUPPORTED);
    assert_eq!(tmf_request(&mut i, 0x33, 0), tmf::FUNCTION_REJECTED);
    assert_eq!(tmf_request(&mut i, tmf::TARGET_WARM_RESET, 0), tmf::FUNCTION_COMPLETE);
    assert_eq!(*h.backend.target_resets.lock().unwrap(), vec![false]);
    assert_eq!(other.ping(b"warm").unwrap().data, Bytes::from_static(b"warm"), "a warm reset keeps sessions");
    // A cold reset answers, then closes every session of the target.
    assert_eq!(tmf_request(&mut i, tmf::TARGET_COLD_RESET, 0), tmf::FUNCTION_COMPLETE);
    assert_eq!(*h.backend.target_resets.lock().unwrap(), vec![false, true]);
    assert!(i.closed_within(Duration::from_secs(5)));
    assert!(other.closed_within(Duration::from_secs(5)));
}

#[test]
fn logout_closes_and_ends_the_nexus() {
    let h = Harness::start();
    let mut i = h.login();
    assert_eq!(i.command(0, &cdb(0, 0), 0, &[]).unwrap().status, 0);
    let r = i.logout().unwrap();
    assert_eq!(r.response, 0);
    assert_eq!(r.time2wait, 2);
    assert!(i.closed_within(Duration::from_secs(5)));
    h.wait_until("nexus_lost", || h.backend.lost.lock().unwrap().len() == 1);
    let lost = h.backend.lost.lock().unwrap()[0].clone();
    assert_eq!(lost.initiator_port, format!("{INITIATOR},i,0x800000000001"));
    assert_eq!(lost.target_port, format!("{TARGET},t,0x0001"));
    h.wait_until("the registry to empty", || h.server.session_count() == 0);
}

#[test]
fn same_initiator_and_isid_reinstates_the_session() {
    let h = Harness::start();
    let mut old = h.login();
    let mut new = h.login();
    assert!(old.closed_within(Duration::from_secs(5)), "the old session is closed");
    assert_eq!(h.backend.lost.lock().unwrap().len(), 1, "the old nexus ended before the new login completed");
    assert_eq!(new.ping(b"new").unwrap().data, Bytes::from_static(b"new"));
    assert_eq!(h.server.session_count(), 1);
    // A different ISID is a separate session.
    let mut third = h.login_with(LoginOptions { isid: 0x8000_0000_0099, ..LoginOptions::normal(INITIATOR, TARGET) });
    assert_eq!(third.ping(b"3").unwrap().data, Bytes::from_static(b"3"));
    assert_eq!(new.ping(b"2").unwrap().data, Bytes::from_static(b"2"));
    assert_eq!(h.server.session_count(), 2);
}

#[test]
fn idle_connections_are_pinged_and_dropped_when_silent() {
    let cfg = IscsiConfig {
        nop_interval: Duration::from_millis(200),
        nop_timeout: Duration::from_millis(400),
        ..Default::default()
    };
    let h = Harness::with(cfg, Access::default(), 1);
    let mut i = h.login();
    // Answer two pings: the connection stays.
    for _ in 0..2 {
        match i.recv_timeout(Duration::from_secs(2)).unwrap() {
            Some(Pdu::NopIn(n)) => {
                assert_eq!(n.itt, RESERVED_TAG);
                assert_ne!(n.ttt, RESERVED_TAG, "a ping wants an answer");
                i.answer_ping(&n).unwrap();
            }
            other => panic!("expected a ping, got {other:?}"),
        }
    }
    // Stop answering.
    assert!(i.closed_within(Duration::from_secs(5)), "a silent initiator is dropped");
}

#[test]
fn shutdown_asks_for_logout_then_closes() {
    let h = Harness::start();
    let mut i = h.login();
    h.shutdown.cancel();
    match i.recv_timeout(Duration::from_secs(2)).unwrap() {
        Some(Pdu::AsyncMessage(a)) => assert_eq!(a.event, pdu::async_event::REQUEST_LOGOUT),
        other => panic!("expected an async logout request, got {other:?}"),
    }
    assert!(i.closed_within(Duration::from_secs(5)));
    drop(h.rt);
}

// ---------------------------------------------------------------------------
// An initiator that stops reading its socket
// ---------------------------------------------------------------------------

/// Send a READ_BUF of `len` bytes without waiting for it; returns its ITT.
fn send_read(i: &mut Initiator, len: u32) -> u32 {
    let itt = i.next_itt();
    let cmd_sn = i.next_cmd_sn();
    i.send(&Pdu::ScsiCommand(pdu::ScsiCommand {
        final_: true,
        read: true,
        itt,
        expected_len: len,
        cmd_sn,
        exp_stat_sn: i.exp_stat_sn,
        cdb: Bytes::from(cdb(READ_BUF, len)),
        ..Default::default()
    }))
    .unwrap();
    itt
}

/// What an initiator received once it started reading again.
#[derive(Default)]
struct Received {
    /// ITT → status and data of each command answered.
    reads: HashMap<u32, (u8, Vec<u8>)>,
    tmf: Vec<pdu::TaskMgmtResponse>,
}

/// Read PDUs until `done` says so, or nothing comes for 2 s.
fn receive(i: &mut Initiator, done: impl Fn(&Received) -> bool) -> Received {
    let mut got = Received::default();
    let mut data: HashMap<u32, Vec<u8>> = HashMap::new();
    while !done(&got) {
        match i.recv_timeout(Duration::from_secs(2)).unwrap() {
            None => break,
            Some(Pdu::DataIn(d)) => {
                let buf = data.entry(d.itt).or_default();
                let off = d.buffer_offset as usize;
                assert_eq!(off, buf.len(), "Data-In in order");
                buf.extend_from_slice(&d.data);
                if d.has_status {
                    got.reads.insert(d.itt, (d.status, data.remove(&d.itt).unwrap()));
                }
            }
            Some(Pdu::ScsiResponse(r)) => {
                got.reads.insert(r.itt, (r.status, data.remove(&r.itt).unwrap_or_default()));
            }
            Some(Pdu::TaskMgmtResponse(r)) => got.tmf.push(r),
            Some(Pdu::NopIn(n)) if n.itt == RESERVED_TAG => i.answer_ping(&n).unwrap(),
            Some(other) => panic!("unexpected {other:?}"),
        }
    }
    got
}

fn login_isid(h: &Harness, isid: u64) -> Initiator {
    h.login_with(LoginOptions { isid, ..LoginOptions::normal(INITIATOR, TARGET) })
}

#[test]
fn reads_for_an_initiator_that_does_not_read_stay_within_the_budget() {
    const BUDGET: usize = 4 << 20;
    const LEN: usize = 1 << 20;
    // 60 MiB asked for: more than the budget plus what loopback socket
    // buffers absorb, within the CmdSN window of 64.
    const READS: usize = 60;
    let cfg = IscsiConfig { read_budget: BUDGET as u32, ..Default::default() };
    let h = Harness::with(cfg, Access::default(), 1);
    let (stalled_isid, other_isid) = (0x8000_0000_0011, 0x8000_0000_0022);
    let mut other = login_isid(&h, other_isid);
    let data = pattern(LEN);
    assert_eq!(other.command(0, &cdb(WRITE_BUF, LEN as u32), 0, &data).unwrap().status, 0);

    let mut stalled = login_isid(&h, stalled_isid);
    let itts: Vec<u32> = (0..READS).map(|_| send_read(&mut stalled, LEN as u32)).collect();
    std::thread::sleep(Duration::from_secs(1));
    let held = h.backend.held.of(stalled_isid);
    eprintln!("stalled session after 1 s: {held:?}");
    assert!(held.peak <= BUDGET, "read data held for the stalled initiator exceeds the budget: {held:?}");
    assert!(held.reads < READS, "further reads wait instead of being fetched: {held:?}");

    // Meanwhile another session is served as usual.
    let started = std::time::Instant::now();
    for _ in 0..4 {
        let r = other.command(0, &cdb(READ_BUF, LEN as u32), LEN as u32, &[]).unwrap();
        assert_eq!(r.status, 0);
        assert!(r.data == data);
    }
    assert_eq!(other.ping(b"still served").unwrap().data, Bytes::from_static(b"still served"));
    assert!(started.elapsed() < Duration::from_secs(5), "the other session waited {:?}", started.elapsed());
    assert!(h.backend.held.of(stalled_isid).peak <= BUDGET);

    // The stalled initiator reads again: every read arrives, intact.
    let got = receive(&mut stalled, |r| r.reads.len() == READS);
    assert_eq!(got.reads.len(), READS);
    for itt in &itts {
        let (status, d) = &got.reads[itt];
        assert_eq!(*status, 0, "ITT {itt:#x}");
        assert!(*d == data, "ITT {itt:#x}: wrong data");
    }
    let held = h.backend.held.of(stalled_isid);
    eprintln!("stalled session at the end: {held:?}");
    assert_eq!(held.reads, READS);
    assert!(held.peak <= BUDGET, "{held:?}");
    h.wait_until("the sent data to be freed", || h.backend.held.of(stalled_isid).now == 0);
    assert_eq!(stalled.command(0, &cdb(0, 0), 0, &[]).unwrap().status, 0, "window open again");
}

#[test]
fn reads_larger_than_the_budget_still_complete() {
    let cfg = IscsiConfig { read_budget: 256 << 10, ..Default::default() };
    let h = Harness::with(cfg, Access::default(), 1);
    let mut i = h.login();
    let n = 3 << 20;
    write_then_read(&mut i, &h, n);
    // Several at once take turns with the whole budget.
    let itts: Vec<u32> = (0..4).map(|_| send_read(&mut i, n as u32)).collect();
    let got = receive(&mut i, |r| r.reads.len() == itts.len());
    let data = pattern(n);
    for itt in &itts {
        assert!(got.reads[itt].0 == 0 && got.reads[itt].1 == data, "ITT {itt:#x}");
    }
}

#[test]
fn aborted_reads_waiting_for_budget_never_run() {
    const LEN: usize = 1 << 20;
    const READS: usize = 40;
    let cfg = IscsiConfig { read_budget: LEN as u32, ..Default::default() };
    let h = Harness::with(cfg, Access::default(), 1);
    let isid = 0x8000_0000_0033;
    let mut i = login_isid(&h, isid);
    let data = pattern(LEN);
    assert_eq!(i.command(0, &cdb(WRITE_BUF, LEN as u32), 0, &data).unwrap().status, 0);
    for _ in 0..READS {
        send_read(&mut i, LEN as u32);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(h.backend.held.of(isid).reads < READS, "some reads must be waiting");
    let tm_itt = i.next_itt();
    i.send(&Pdu::TaskMgmtRequest(pdu::TaskMgmtRequest {
        immediate: true,
        function: tmf::ABORT_TASK_SET,
        itt: tm_itt,
        ref_task_tag: RESERVED_TAG,
        cmd_sn: i.cmd_sn,
        ..Default::default()
    }))
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let got = receive(&mut i, |_| false);
    assert_eq!(got.tmf.len(), 1);
    assert_eq!((got.tmf[0].itt, got.tmf[0].response), (tm_itt, tmf::FUNCTION_COMPLETE));
    let ran = h.backend.held.of(isid).reads;
    eprintln!("{ran} of {READS} reads ran before the abort");
    assert!(ran < READS);
    assert_eq!(got.reads.len(), ran, "every read that ran was answered, no other");
    assert!(got.reads.values().all(|(s, d)| *s == 0 && *d == data));
    assert_eq!(i.command(0, &cdb(0, 0), 0, &[]).unwrap().status, 0);
}

#[test]
fn a_sender_that_does_not_read_is_pushed_back() {
    let h = Harness::start();
    let mut i = h.login();
    // NOP-Outs each echoed with a full data segment, sent without reading
    // the echoes: far more than socket buffers hold.
    const PINGS: u32 = 600;
    let seg = i.target_mrdsl.min(i.mrdsl) as usize;
    let payload = move |k: u32| {
        let mut d = pattern(seg);
        d[..4].copy_from_slice(&k.to_be_bytes());
        Bytes::from(d)
    };
    let mut stream = i.stream().try_clone().unwrap();
    let (digests, cmd_sn, exp_stat_sn) = (i.digests, i.cmd_sn, i.exp_stat_sn);
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = std::thread::spawn({
        let sent = sent.clone();
        move || {
            for k in 0..PINGS {
                let ping = Pdu::NopOut(pdu::NopOut {
                    immediate: true,
                    itt: 0x10_0000 + k,
                    ttt: RESERVED_TAG,
                    cmd_sn,
                    exp_stat_sn,
                    data: payload(k),
                    ..Default::default()
                });
                stream.write_all(&longwire_iscsi::initiator::encode(&ping, digests)).unwrap();
                sent.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    // Wait until the sender is stuck (no progress for a second).
    let mut n = 0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(1000));
        let now = sent.load(Ordering::SeqCst);
        if now == n {
            break;
        }
        n = now;
    }
    eprintln!("{n} of {PINGS} pings of {seg} bytes sent before the target pushed back");
    assert!((n as u32) < PINGS, "the target kept reading requests whose answers it could not send");
    // What the sender got rid of sits in socket buffers and the target's
    // backlog (1 MiB), not in an ever-growing queue.
    assert!(n * seg < 64 << 20, "{n} pings of {seg} bytes taken in");
    for k in 0..PINGS {
        match i.recv().unwrap() {
            Pdu::NopIn(n) => {
                assert_eq!(n.itt, 0x10_0000 + k);
                assert!(n.data == payload(k), "echo {k}");
            }
            other => panic!("expected the echo of ping {k}, got {other:?}"),
        }
    }
    writer.join().unwrap();
    assert_eq!(i.ping(b"after").unwrap().data, Bytes::from_static(b"after"));
}
