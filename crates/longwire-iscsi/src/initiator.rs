//! A minimal blocking iSCSI initiator over `std::net`, for tests and
//! diagnostics: it speaks byte-exact PDUs built with [`crate::pdu`] so tests
//! can exercise what real initiators do not (data digests, odd CmdSNs,
//! broken Data-Out sequences, pings left unanswered).
//!
//! It keeps the bookkeeping an initiator must (ITT, CmdSN, ExpStatSN) and
//! offers helpers for the common exchanges (login, SendTargets, a SCSI
//! command with R2T-driven writes and Data-In reads, logout), while
//! [`Initiator::send`] and [`Initiator::recv`] stay available for anything
//! hand-made.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::Bytes;

use crate::chap::{self, Algorithm};
use crate::digest::Digests;
use crate::keys;
use crate::pdu::{self, stage, Bhs, Layout, Pdu, BHS_LEN, RESERVED_TAG};

/// How to log in.
#[derive(Debug, Clone)]
pub struct LoginOptions {
    pub initiator: String,
    /// None: a discovery session.
    pub target: Option<String>,
    pub isid: u64,
    /// Extra operational keys, sent in the operational stage.
    pub keys: Vec<(String, String)>,
    /// CHAP user and secret.
    pub chap: Option<(String, String)>,
    /// Mutual CHAP: expected target user and secret.
    pub mutual: Option<(String, String)>,
    /// CHAP_A offer.
    pub chap_algorithms: String,
}

impl LoginOptions {
    pub fn normal(initiator: &str, target: &str) -> LoginOptions {
        LoginOptions {
            initiator: initiator.into(),
            target: Some(target.into()),
            isid: 0x8000_0000_0001,
            keys: Vec::new(),
            chap: None,
            mutual: None,
            chap_algorithms: "5".into(),
        }
    }

    pub fn discovery(initiator: &str) -> LoginOptions {
        LoginOptions { target: None, ..LoginOptions::normal(initiator, "") }
    }

    pub fn key(mut self, k: &str, v: &str) -> LoginOptions {
        self.keys.push((k.into(), v.into()));
        self
    }
}

/// A login that failed with a status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("login failed with status {class:#04x}/{detail:#04x}")]
pub struct LoginFailed {
    pub class: u8,
    pub detail: u8,
}

/// The outcome of a SCSI command.
#[derive(Debug, Clone, Default)]
pub struct CommandOutcome {
    pub status: u8,
    pub sense: Bytes,
    pub data: Vec<u8>,
    pub overflow: bool,
    pub underflow: bool,
    pub residual: u32,
    /// Data-In PDUs received.
    pub data_in_pdus: u32,
    /// R2Ts received.
    pub r2ts: u32,
}

/// One connection of a test initiator.
pub struct Initiator {
    stream: TcpStream,
    pub digests: Digests,
    pub itt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub tsih: u16,
    /// The target's declared MaxRecvDataSegmentLength.
    pub target_mrdsl: u32,
    /// Our MaxRecvDataSegmentLength.
    pub mrdsl: u32,
    pub first_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    /// Keys the target answered during login.
    pub negotiated: Vec<(String, String)>,
}

impl Initiator {
    pub fn connect(addr: SocketAddr) -> io::Result<Initiator> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Initiator {
            stream,
            digests: Digests::default(),
            itt: 0x100,
            cmd_sn: 1,
            exp_stat_sn: 0,
            exp_cmd_sn: 1,
            max_cmd_sn: 1,
            tsih: 0,
            target_mrdsl: 8192,
            mrdsl: 262144,
            first_burst: 65536,
            immediate_data: true,
            initial_r2t: true,
            negotiated: Vec::new(),
        })
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    pub fn next_itt(&mut self) -> u32 {
        self.itt = self.itt.wrapping_add(1);
        self.itt
    }

    /// Take the next CmdSN (for a non-immediate request).
    pub fn next_cmd_sn(&mut self) -> u32 {
        let sn = self.cmd_sn;
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        sn
    }

    /// Send raw bytes.
    pub fn send_bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.stream.write_all(b)
    }

    /// Send a PDU with the digests in force.
    pub fn send(&mut self, pdu: &Pdu) -> io::Result<()> {
        let frame = pdu.encode(self.digests);
        self.stream.write_all(&frame.to_vec())
    }

    /// Receive one PDU, updating ExpStatSN and the command window.
    pub fn recv(&mut self) -> io::Result<Pdu> {
        let mut bhs = Bhs::default();
        self.stream.read_exact(&mut bhs.0)?;
        let layout = Layout::of(&bhs, self.digests);
        let mut rest = vec![0u8; layout.rest()];
        self.stream.read_exact(&mut rest)?;
        let raw = pdu::decode_frame(bhs, &rest, self.digests).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let pdu = Pdu::parse(&raw).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.track(&raw.bhs, &pdu);
        Ok(pdu)
    }

    /// Receive with a time limit; `Ok(None)` on timeout.
    pub fn recv_timeout(&mut self, d: Duration) -> io::Result<Option<Pdu>> {
        self.stream.set_read_timeout(Some(d))?;
        let mut peek = [0u8; 1];
        let r = self.stream.peek(&mut peek);
        self.stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        match r {
            Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => self.recv().map(Some),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// True once the target closed the connection (waits up to `d`).
    pub fn closed_within(&mut self, d: Duration) -> bool {
        let deadline = std::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.recv_timeout(left) {
                Ok(Some(_)) => continue,
                Ok(None) => return false,
                Err(_) => return true,
            }
        }
    }

    fn track(&mut self, bhs: &Bhs, pdu: &Pdu) {
        let op = bhs.opcode();
        if op == pdu::op::LOGIN_RESP && bhs.0[36] != 0 {
            return;
        }
        let exp = bhs.u32_at(28);
        let max = bhs.u32_at(32);
        if op != pdu::op::LOGIN_RESP || bhs.0[1] & 0x80 != 0 {
            self.exp_cmd_sn = exp;
            self.max_cmd_sn = max;
        }
        let has_status = match pdu {
            Pdu::DataIn(d) => d.has_status,
            Pdu::R2t(_) => false,
            Pdu::NopIn(n) => n.itt != RESERVED_TAG,
            _ => true,
        };
        if has_status {
            self.exp_stat_sn = bhs.u32_at(24).wrapping_add(1);
        }
    }

    /// Log in; on success digests and limits are in force.
    pub fn login(&mut self, o: &LoginOptions) -> Result<(), LoginFailed> {
        self.try_login(o).map_err(|e| match e {
            LoginError::Failed(f) => f,
            LoginError::Io(e) => panic!("login I/O error: {e}"),
        })
    }

    fn try_login(&mut self, o: &LoginOptions) -> Result<(), LoginError> {
        let itt = self.next_itt();
        let mut first = vec![("InitiatorName".to_string(), o.initiator.clone())];
        match &o.target {
            Some(t) => {
                first.push(("TargetName".into(), t.clone()));
                first.push(("SessionType".into(), "Normal".into()));
            }
            None => first.push(("SessionType".into(), "Discovery".into())),
        }
        let mut csg = stage::OPERATIONAL;
        if let Some((user, secret)) = &o.chap {
            csg = stage::SECURITY;
            let mut t = first.clone();
            t.push(("AuthMethod".into(), "CHAP,None".into()));
            let r = self.login_step(o, itt, true, csg, stage::OPERATIONAL, &t)?;
            first.clear();
            if r.transit {
                return Err(LoginError::Io(io::Error::other("target skipped CHAP")));
            }
            let r = self.login_step(o, itt, false, csg, 0, &[("CHAP_A".into(), o.chap_algorithms.clone())])?;
            let got = keys::parse_text(&r.data).unwrap();
            let get = |k: &str| got.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap_or_default();
            let alg = Algorithm::from_code(&get("CHAP_A")).expect("CHAP_A");
            let id: u8 = get("CHAP_I").parse().expect("CHAP_I");
            let c = chap::decode_binary(&get("CHAP_C")).expect("CHAP_C");
            let resp = chap::response(alg, id, secret.as_bytes(), &c);
            let mut t = vec![("CHAP_N".to_string(), user.clone()), ("CHAP_R".to_string(), chap::encode_hex(&resp))];
            let mutual_challenge = chap::random_bytes(16);
            if o.mutual.is_some() {
                t.push(("CHAP_I".into(), "77".into()));
                t.push(("CHAP_C".into(), chap::encode_hex(&mutual_challenge)));
            }
            let r = self.login_step(o, itt, true, csg, stage::OPERATIONAL, &t)?;
            if let Some((tuser, tsecret)) = &o.mutual {
                let got = keys::parse_text(&r.data).unwrap();
                let get = |k: &str| got.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap_or_default();
                let want = chap::response(alg, 77, tsecret.as_bytes(), &mutual_challenge);
                if get("CHAP_N") != *tuser || chap::decode_binary(&get("CHAP_R")) != Some(want) {
                    return Err(LoginError::Io(io::Error::other("target failed mutual CHAP")));
                }
            }
            csg = stage::OPERATIONAL;
        }
        let mut t = first;
        t.push(("MaxRecvDataSegmentLength".into(), self.mrdsl.to_string()));
        t.extend(o.keys.iter().cloned());
        let r = self.login_step(o, itt, true, csg, stage::FULL_FEATURE, &t)?;
        let mut r = r;
        while !r.transit {
            r = self.login_step(o, itt, true, csg, stage::FULL_FEATURE, &[])?;
        }
        self.tsih = r.tsih;
        let neg = keys::parse_text(&r.data).unwrap_or_default();
        for (k, v) in &neg {
            match k.as_str() {
                "HeaderDigest" => self.digests.header = v == "CRC32C",
                "DataDigest" => self.digests.data = v == "CRC32C",
                "MaxRecvDataSegmentLength" => self.target_mrdsl = v.parse().unwrap_or(8192),
                "FirstBurstLength" => self.first_burst = v.parse().unwrap_or(self.first_burst),
                "ImmediateData" => self.immediate_data = v == "Yes",
                "InitialR2T" => self.initial_r2t = v == "Yes",
                _ => {}
            }
        }
        self.negotiated.extend(neg);
        Ok(())
    }

    fn login_step(
        &mut self,
        o: &LoginOptions,
        itt: u32,
        transit: bool,
        csg: u8,
        nsg: u8,
        text: &[(String, String)],
    ) -> Result<pdu::LoginResponse, LoginError> {
        let req = Pdu::LoginRequest(pdu::LoginRequest {
            transit,
            cont: false,
            csg,
            nsg: if transit { nsg } else { 0 },
            isid: o.isid,
            tsih: 0,
            itt,
            cid: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            data: Bytes::from(keys::encode_text(text)),
            ..Default::default()
        });
        let saved = self.digests;
        self.digests = Digests::default();
        self.send(&req).map_err(LoginError::Io)?;
        let resp = self.recv().map_err(LoginError::Io);
        self.digests = saved;
        match resp? {
            Pdu::LoginResponse(r) => {
                if r.status_class != 0 {
                    return Err(LoginError::Failed(LoginFailed { class: r.status_class, detail: r.status_detail }));
                }
                self.negotiated.extend(keys::parse_text(&r.data).unwrap_or_default());
                Ok(r)
            }
            other => Err(LoginError::Io(io::Error::other(format!("expected a Login Response, got {other:?}")))),
        }
    }

    /// SendTargets=`what` in a Text exchange (following continuations).
    pub fn send_targets(&mut self, what: &str) -> io::Result<Vec<(String, String)>> {
        let itt = self.next_itt();
        let mut ttt = RESERVED_TAG;
        let mut text = keys::encode_text(&[("SendTargets".into(), what.into())]);
        let mut all = Vec::new();
        loop {
            let cmd_sn = self.next_cmd_sn();
            self.send(&Pdu::TextRequest(pdu::TextRequest {
                immediate: false,
                final_: true,
                cont: false,
                lun: 0,
                itt,
                ttt,
                cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
                data: Bytes::from(std::mem::take(&mut text)),
            }))?;
            match self.recv()? {
                Pdu::TextResponse(r) => {
                    all.extend_from_slice(&r.data);
                    if r.final_ {
                        break;
                    }
                    ttt = r.ttt;
                }
                other => return Err(io::Error::other(format!("expected a Text Response, got {other:?}"))),
            }
        }
        keys::parse_text(&all).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Run one SCSI command to completion: immediate data up to the first
    /// burst, R2Ts answered with Data-Out, Data-In collected.
    pub fn command(&mut self, lun: u64, cdb: &[u8], read_len: u32, write: &[u8]) -> io::Result<CommandOutcome> {
        let itt = self.next_itt();
        let cmd_sn = self.next_cmd_sn();
        let write_len = write.len() as u32;
        let imm = if self.immediate_data {
            write.len().min(self.first_burst as usize).min(self.target_mrdsl as usize)
        } else {
            0
        };
        let unsolicited_end = if !self.initial_r2t { write.len().min(self.first_burst as usize) } else { imm };
        self.send(&Pdu::ScsiCommand(pdu::ScsiCommand {
            immediate: false,
            final_: unsolicited_end <= imm,
            read: read_len > 0,
            write: write_len > 0,
            attr: 1,
            lun,
            itt,
            expected_len: if write_len > 0 { write_len } else { read_len },
            cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb: Bytes::copy_from_slice(cdb),
            bidi_read_len: None,
            data: Bytes::copy_from_slice(&write[..imm]),
        }))?;
        if unsolicited_end > imm {
            self.send_data(lun, itt, RESERVED_TAG, write, imm, unsolicited_end)?;
        }
        let mut out = CommandOutcome::default();
        loop {
            match self.recv()? {
                Pdu::R2t(r) if r.itt == itt => {
                    out.r2ts += 1;
                    let start = r.buffer_offset as usize;
                    let end = start + r.desired_len as usize;
                    self.send_data(lun, itt, r.ttt, write, start, end)?;
                }
                Pdu::DataIn(d) if d.itt == itt => {
                    out.data_in_pdus += 1;
                    let off = d.buffer_offset as usize;
                    if out.data.len() < off + d.data.len() {
                        out.data.resize(off + d.data.len(), 0);
                    }
                    out.data[off..off + d.data.len()].copy_from_slice(&d.data);
                    if d.has_status {
                        out.status = d.status;
                        out.overflow = d.overflow;
                        out.underflow = d.underflow;
                        out.residual = d.residual;
                        return Ok(out);
                    }
                }
                Pdu::ScsiResponse(r) if r.itt == itt => {
                    out.status = r.status;
                    out.sense = r.sense;
                    out.overflow = r.overflow;
                    out.underflow = r.underflow;
                    out.residual = r.residual;
                    return Ok(out);
                }
                Pdu::NopIn(n) if n.itt == RESERVED_TAG => self.answer_ping(&n)?,
                other => return Err(io::Error::other(format!("unexpected PDU during command {itt:#x}: {other:?}"))),
            }
        }
    }

    /// Send `write[start..end]` as Data-Out PDUs of at most the target's
    /// MaxRecvDataSegmentLength.
    pub fn send_data(&mut self, lun: u64, itt: u32, ttt: u32, write: &[u8], start: usize, end: usize) -> io::Result<()> {
        let mut pos = start;
        let mut data_sn = 0;
        while pos < end {
            let n = (end - pos).min(self.target_mrdsl as usize);
            self.send(&Pdu::DataOut(pdu::DataOut {
                final_: pos + n == end,
                lun,
                itt,
                ttt,
                exp_stat_sn: self.exp_stat_sn,
                data_sn,
                buffer_offset: pos as u32,
                data: Bytes::copy_from_slice(&write[pos..pos + n]),
            }))?;
            data_sn += 1;
            pos += n;
        }
        Ok(())
    }

    /// Answer a target's NOP-In ping.
    pub fn answer_ping(&mut self, n: &pdu::NopIn) -> io::Result<()> {
        self.send(&Pdu::NopOut(pdu::NopOut {
            immediate: true,
            lun: n.lun,
            itt: RESERVED_TAG,
            ttt: n.ttt,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            data: Bytes::new(),
        }))
    }

    /// NOP-Out ping with data; returns the NOP-In.
    pub fn ping(&mut self, data: &[u8]) -> io::Result<pdu::NopIn> {
        let itt = self.next_itt();
        let cmd_sn = self.next_cmd_sn();
        self.send(&Pdu::NopOut(pdu::NopOut {
            immediate: false,
            lun: 0,
            itt,
            ttt: RESERVED_TAG,
            cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            data: Bytes::copy_from_slice(data),
        }))?;
        match self.recv()? {
            Pdu::NopIn(n) if n.itt == itt => Ok(n),
            other => Err(io::Error::other(format!("expected a NOP-In, got {other:?}"))),
        }
    }

    /// Logout (close the session); returns the response.
    pub fn logout(&mut self) -> io::Result<pdu::LogoutResponse> {
        let itt = self.next_itt();
        self.send(&Pdu::LogoutRequest(pdu::LogoutRequest {
            immediate: true,
            reason: 0,
            itt,
            cid: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        }))?;
        loop {
            match self.recv()? {
                Pdu::LogoutResponse(r) => return Ok(r),
                Pdu::NopIn(n) if n.itt == RESERVED_TAG => continue,
                Pdu::AsyncMessage(_) => continue,
                other => return Err(io::Error::other(format!("expected a Logout Response, got {other:?}"))),
            }
        }
    }
}

enum LoginError {
    Failed(LoginFailed),
    Io(io::Error),
}

/// Header bytes of a PDU (for tests that corrupt or truncate frames).
pub fn encode(pdu: &Pdu, digests: Digests) -> Vec<u8> {
    pdu.encode(digests).to_vec()
}

/// Length of the BHS, re-exported for tests.
pub const HEADER_LEN: usize = BHS_LEN;
