//! The login phase (RFC 7143 §6.3, §12, §13) as a sans-IO state machine.
//!
//! The driver hands [`Login::handle`] one Login Request at a time and
//! sends back the response it gets. The machine tracks the stages
//! (SecurityNegotiation → LoginOperationalNegotiation → FullFeaturePhase,
//! CSG/NSG and the T bit), joins and splits texts with the C bit,
//! authenticates (AuthMethod None or CHAP with MD5/SHA-256, one-way or
//! mutual), negotiates operational keys through [`Negotiator`], and ends
//! with [`Step::Complete`] (the session's parameters) or [`Step::Fail`]
//! (a response with a status class and detail, after which the connection
//! is closed).

use std::collections::VecDeque;
use std::net::IpAddr;

use bytes::Bytes;
use longwire_core::AllowList;

use crate::chap::{self, Algorithm};
use crate::keys::{self, Negotiator, Policy, SessionParams, SessionType, TextAssembler};
use crate::pdu::{login_status, stage, LoginRequest, LoginResponse};

/// A CHAP user name and secret.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub secret: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).field("secret", &"<hidden>").finish()
    }
}

/// Who may log in to a target, and how.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// When set, initiators must authenticate with CHAP as this user.
    pub chap: Option<Credentials>,
    /// When set, the target answers an initiator's CHAP challenge (mutual
    /// CHAP) as this user.
    pub mutual: Option<Credentials>,
    /// Initiator names allowed to log in; empty allows every initiator.
    pub allow_initiators: Vec<String>,
    /// Client addresses allowed to see and log in to the target.
    pub allow_addresses: AllowList,
    /// Most sessions the target may have at once (None: no cap of its own).
    pub max_sessions: Option<usize>,
    /// TargetAlias declared to initiators.
    pub alias: Option<String>,
}

impl Access {
    pub fn allows(&self, initiator: &str) -> bool {
        self.allow_initiators.is_empty() || self.allow_initiators.iter().any(|a| a == initiator)
    }

    /// May a client at `peer` (None: unknown, treated as local) see the target?
    pub fn allows_address(&self, peer: Option<IpAddr>) -> bool {
        self.allow_addresses.allows(peer)
    }
}

/// What the login needs to know about the world.
pub trait LoginEnv {
    /// The target of that name, if it exists.
    fn target_access(&self, name: &str) -> Option<Access>;
    /// Access rules of discovery sessions.
    fn discovery_access(&self) -> Access {
        Access::default()
    }
    /// True when a session with this TSIH exists.
    fn session_exists(&self, tsih: u16) -> bool;
}

/// The Target Portal Group Tag of every portal of this server.
pub const TPGT: u16 = 1;

/// What a successful login established.
#[derive(Debug, Clone)]
pub struct LoginResult {
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// None for discovery sessions.
    pub target_name: Option<String>,
    pub session_type: SessionType,
    pub isid: u64,
    pub cid: u16,
    pub params: SessionParams,
    /// ExpCmdSN at the start of the full feature phase.
    pub exp_cmd_sn: u32,
    /// StatSN of the next status after the last login response.
    pub next_stat_sn: u32,
    /// Authenticated with CHAP.
    pub chap: bool,
}

/// What to do after a Login Request.
#[derive(Debug)]
pub enum Step {
    /// Send this response and wait for the next request.
    Respond(LoginResponse),
    /// Send this response, then close the connection.
    Fail(LoginResponse),
    /// Send this response (after setting its TSIH); the connection is in
    /// the full feature phase.
    Complete(LoginResponse, Box<LoginResult>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Auth {
    /// AuthMethod not negotiated yet.
    Start,
    /// AuthMethod=None chosen.
    NoneChosen,
    /// AuthMethod=CHAP chosen; waiting for CHAP_A.
    ChapAlgorithm,
    /// Challenge sent; waiting for CHAP_N and CHAP_R.
    ChapResponse { alg: Algorithm, id: u8, challenge: Vec<u8> },
    /// Authenticated with CHAP.
    ChapDone,
}

#[derive(Debug, Clone, Copy)]
struct Ids {
    isid: u64,
    tsih: u16,
    cid: u16,
}

#[derive(Debug, Clone)]
struct Declared {
    initiator_name: String,
    initiator_alias: Option<String>,
    target_name: Option<String>,
    session_type: SessionType,
}

/// One connection's login.
pub struct Login {
    policy: Policy,
    queue_depth: u32,
    ids: Option<Ids>,
    stage: u8,
    text_in: TextAssembler,
    /// Response text still to send (our last response had the C bit).
    pending_out: VecDeque<Vec<u8>>,
    /// T and NSG for the response carrying the last pending chunk.
    pending_transit: Option<u8>,
    negotiator: Option<Negotiator>,
    declared: Option<Declared>,
    access: Access,
    auth: Auth,
    stat_sn: u32,
    /// The initiator's address, for address allow-lists.
    peer: Option<IpAddr>,
}

/// Failure with a status.
type Fail = ((u8, u8), String);

impl Login {
    /// `initial_stat_sn` numbers the first response; `queue_depth` sets
    /// MaxCmdSN in the responses.
    pub fn new(policy: Policy, initial_stat_sn: u32, queue_depth: u32) -> Login {
        Login {
            policy,
            queue_depth: queue_depth.max(1),
            ids: None,
            stage: stage::SECURITY,
            text_in: TextAssembler::default(),
            pending_out: VecDeque::new(),
            pending_transit: None,
            negotiator: None,
            declared: None,
            access: Access::default(),
            auth: Auth::Start,
            stat_sn: initial_stat_sn,
            peer: None,
        }
    }

    /// The initiator's address, checked against the target's address
    /// allow-list (without one, every target's list admits the client).
    pub fn set_peer(&mut self, peer: IpAddr) {
        self.peer = Some(peer);
    }

    /// The initiator name, once declared (for logs).
    pub fn initiator_name(&self) -> Option<&str> {
        self.declared.as_ref().map(|d| d.initiator_name.as_str())
    }

    /// The target name, once declared (for logs).
    pub fn target_name(&self) -> Option<&str> {
        self.declared.as_ref().and_then(|d| d.target_name.as_deref())
    }

    /// Handle one Login Request.
    pub fn handle(&mut self, req: &LoginRequest, env: &dyn LoginEnv) -> Step {
        match self.process(req, env) {
            Ok(step) => step,
            Err(((class, detail), _msg)) => Step::Fail(self.response(req, false, false, 0, (class, detail), Vec::new())),
        }
    }

    /// Why the last failure happened is in the returned message; kept for logs.
    pub fn handle_with_reason(&mut self, req: &LoginRequest, env: &dyn LoginEnv) -> (Step, Option<String>) {
        match self.process(req, env) {
            Ok(step) => (step, None),
            Err((status, msg)) => (Step::Fail(self.response(req, false, false, 0, status, Vec::new())), Some(msg)),
        }
    }

    fn process(&mut self, req: &LoginRequest, env: &dyn LoginEnv) -> Result<Step, Fail> {
        let initiator_error = |m: &str| -> Fail { (login_status::INITIATOR_ERROR, m.to_string()) };
        match self.ids {
            None => {
                if req.version_min > 0 {
                    return Err((
                        login_status::UNSUPPORTED_VERSION,
                        format!("initiator needs iSCSI version {} or later; this target speaks 0", req.version_min),
                    ));
                }
                if req.tsih != 0 {
                    let status = if env.session_exists(req.tsih) {
                        login_status::TOO_MANY_CONNECTIONS
                    } else {
                        login_status::SESSION_DOES_NOT_EXIST
                    };
                    return Err((status, format!("login to session {:#x}: MaxConnections is 1", req.tsih)));
                }
                if req.csg != stage::SECURITY && req.csg != stage::OPERATIONAL {
                    return Err(initiator_error("the first login request must start in stage 0 or 1"));
                }
                self.stage = req.csg;
                self.ids = Some(Ids { isid: req.isid, tsih: req.tsih, cid: req.cid });
            }
            Some(ids) => {
                if ids.isid != req.isid || ids.tsih != req.tsih || ids.cid != req.cid {
                    return Err(initiator_error("ISID, TSIH or CID changed during login"));
                }
            }
        }
        if req.transit && req.cont {
            return Err(initiator_error("login request with both T and C set"));
        }
        if req.csg != self.stage {
            return Err(initiator_error(&format!("login request for stage {} while in stage {}", req.csg, self.stage)));
        }
        if req.transit && !(req.nsg > req.csg && (req.nsg == stage::OPERATIONAL || req.nsg == stage::FULL_FEATURE)) {
            return Err(initiator_error(&format!("invalid stage transition {} -> {}", req.csg, req.nsg)));
        }

        // The rest of a long response of ours: the initiator asks with
        // empty requests.
        if !self.pending_out.is_empty() {
            if !req.data.is_empty() || req.cont {
                return Err(initiator_error("text sent while the target's response was continuing"));
            }
            let chunk = self.pending_out.pop_front().unwrap();
            let more = !self.pending_out.is_empty();
            if more {
                return Ok(Step::Respond(self.response(req, false, true, 0, login_status::SUCCESS, chunk)));
            }
            let nsg = self.pending_transit.take();
            return self.finish(req, nsg, chunk);
        }

        let text = match self.text_in.push(&req.data, req.cont) {
            Err(e) => return Err(initiator_error(&e.0)),
            // More of the initiator's text follows: acknowledge with an
            // empty response.
            Ok(None) => return Ok(Step::Respond(self.response(req, false, false, 0, login_status::SUCCESS, Vec::new()))),
            Ok(Some(t)) => t,
        };
        let pairs = keys::parse_text(&text).map_err(|e| initiator_error(&e.0))?;
        let mut out: Vec<(String, String)> = Vec::new();

        if self.declared.is_none() {
            self.declare(&pairs, env, &mut out)?;
        } else {
            self.check_redeclaration(&pairs)?;
        }

        match self.stage {
            stage::SECURITY => self.security(&pairs, &mut out)?,
            _ => {
                if let Some((k, _)) = pairs.iter().find(|(k, _)| k == "AuthMethod" || k.starts_with("CHAP_")) {
                    return Err(initiator_error(&format!("{k} outside the security negotiation stage")));
                }
            }
        }

        let negotiator = self.negotiator.as_mut().expect("negotiator exists after the declarations");
        let answers = negotiator.negotiate(&pairs).map_err(|f| (f.status, f.message))?;
        out.extend(answers);
        if self.stage == stage::OPERATIONAL {
            if let Some(d) = negotiator.declaration() {
                out.push(d);
            }
        }

        // May we move on?
        let mut nsg = None;
        if req.transit {
            match self.stage {
                stage::SECURITY => match self.auth {
                    Auth::NoneChosen | Auth::ChapDone => nsg = Some(req.nsg),
                    Auth::Start => {
                        if self.access.chap.is_some() {
                            return Err((
                                login_status::AUTHENTICATION_FAILURE,
                                "the target requires CHAP but the initiator did not negotiate AuthMethod".into(),
                            ));
                        }
                        self.auth = Auth::NoneChosen;
                        nsg = Some(req.nsg);
                    }
                    // CHAP still running: stay in this stage.
                    Auth::ChapAlgorithm | Auth::ChapResponse { .. } => {}
                },
                _ => nsg = Some(req.nsg),
            }
        }

        let text = keys::encode_text(&out);
        let mut chunks: VecDeque<Vec<u8>> = keys::split_text(&text, keys::DEFAULT_MRDSL as usize).into();
        let first = chunks.pop_front().unwrap_or_default();
        if !chunks.is_empty() {
            self.pending_out = chunks;
            self.pending_transit = nsg;
            return Ok(Step::Respond(self.response(req, false, true, 0, login_status::SUCCESS, first)));
        }
        self.finish(req, nsg, first)
    }

    /// The last response of a text exchange: move to `nsg` if set.
    fn finish(&mut self, req: &LoginRequest, nsg: Option<u8>, data: Vec<u8>) -> Result<Step, Fail> {
        let Some(nsg) = nsg else {
            return Ok(Step::Respond(self.response(req, false, false, 0, login_status::SUCCESS, data)));
        };
        let resp = self.response(req, true, false, nsg, login_status::SUCCESS, data);
        self.stage = nsg;
        if nsg != stage::FULL_FEATURE {
            return Ok(Step::Respond(resp));
        }
        let declared = self.declared.clone().expect("declared before full feature phase");
        let negotiator = self.negotiator.as_ref().expect("negotiator");
        let ids = self.ids.expect("ids");
        Ok(Step::Complete(
            resp,
            Box::new(LoginResult {
                initiator_name: declared.initiator_name,
                initiator_alias: declared.initiator_alias,
                target_name: declared.target_name,
                session_type: declared.session_type,
                isid: ids.isid,
                cid: ids.cid,
                params: negotiator.params.clone(),
                exp_cmd_sn: req.cmd_sn,
                next_stat_sn: self.stat_sn,
                chap: self.auth == Auth::ChapDone,
            }),
        ))
    }

    /// The declarations of the first request: who is logging in to what.
    fn declare(&mut self, pairs: &[(String, String)], env: &dyn LoginEnv, out: &mut Vec<(String, String)>) -> Result<(), Fail> {
        let get = |k: &str| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        let Some(initiator_name) = get("InitiatorName").filter(|n| !n.is_empty()) else {
            return Err((login_status::MISSING_PARAMETER, "the first login request has no InitiatorName".into()));
        };
        let session_type = match get("SessionType").as_deref() {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(other) => {
                return Err((login_status::SESSION_TYPE_NOT_SUPPORTED, format!("SessionType={other} is not supported")))
            }
        };
        let mut target_name = None;
        let access = match session_type {
            SessionType::Discovery => env.discovery_access(),
            SessionType::Normal => {
                let Some(name) = get("TargetName").filter(|n| !n.is_empty()) else {
                    return Err((login_status::MISSING_PARAMETER, "a normal session needs a TargetName".into()));
                };
                let Some(access) = env.target_access(&name) else {
                    return Err((login_status::NOT_FOUND, format!("no target named {name:?}")));
                };
                // "Not found" rather than "authorization failure" (02/02):
                // the latter would confirm to a client that may not even
                // see the target (SendTargets hides it) that it exists.
                // Only our log says why.
                if !access.allows_address(self.peer) {
                    let peer = self.peer.map(|p| p.to_string()).unwrap_or_default();
                    return Err((
                        login_status::NOT_FOUND,
                        format!("address {peer} may not use target {name:?} (answered as not found)"),
                    ));
                }
                target_name = Some(name);
                access
            }
        };
        if !access.allows(&initiator_name) {
            return Err((
                login_status::AUTHORIZATION_FAILURE,
                format!("initiator {initiator_name:?} may not log in to {}", target_name.as_deref().unwrap_or("discovery")),
            ));
        }
        if self.stage == stage::OPERATIONAL && access.chap.is_some() {
            return Err((
                login_status::AUTHENTICATION_FAILURE,
                "the target requires CHAP but the initiator skipped security negotiation".into(),
            ));
        }
        if session_type == SessionType::Normal {
            out.push(("TargetPortalGroupTag".into(), TPGT.to_string()));
            if let Some(alias) = &access.alias {
                out.push(("TargetAlias".into(), alias.clone()));
            }
        }
        self.negotiator = Some(Negotiator::new(self.policy.clone(), session_type));
        self.access = access;
        self.declared = Some(Declared {
            initiator_name,
            initiator_alias: get("InitiatorAlias"),
            target_name,
            session_type,
        });
        Ok(())
    }

    /// InitiatorName, TargetName and SessionType may be repeated later in
    /// the login only with the same value.
    fn check_redeclaration(&self, pairs: &[(String, String)]) -> Result<(), Fail> {
        let d = self.declared.as_ref().unwrap();
        for (k, v) in pairs {
            let same = match k.as_str() {
                "InitiatorName" => *v == d.initiator_name,
                "TargetName" => d.target_name.as_deref() == Some(v.as_str()),
                "SessionType" => {
                    (v == "Normal" && d.session_type == SessionType::Normal)
                        || (v == "Discovery" && d.session_type == SessionType::Discovery)
                }
                _ => true,
            };
            if !same {
                return Err((login_status::INITIATOR_ERROR, format!("{k} changed during login")));
            }
        }
        Ok(())
    }

    /// AuthMethod and CHAP keys.
    fn security(&mut self, pairs: &[(String, String)], out: &mut Vec<(String, String)>) -> Result<(), Fail> {
        let auth_fail = |m: String| -> Fail { (login_status::AUTHENTICATION_FAILURE, m) };
        let mut name = None;
        let mut resp = None;
        let mut mutual_id = None;
        let mut mutual_challenge = None;
        for (k, v) in pairs {
            match k.as_str() {
                "AuthMethod" => {
                    if self.auth != Auth::Start {
                        return Err((login_status::INITIATOR_ERROR, "AuthMethod negotiated twice".into()));
                    }
                    let want: &[&str] = if self.access.chap.is_some() { &["CHAP"] } else { &["None"] };
                    match keys::select_from_list(v, want) {
                        Some("CHAP") => {
                            self.auth = Auth::ChapAlgorithm;
                            out.push((k.clone(), "CHAP".into()));
                        }
                        Some(_) => {
                            self.auth = Auth::NoneChosen;
                            out.push((k.clone(), "None".into()));
                        }
                        None => {
                            return Err(auth_fail(format!(
                                "AuthMethod={v} offered; this target needs {}",
                                want[0]
                            )))
                        }
                    }
                }
                "CHAP_A" => {
                    if self.auth != Auth::ChapAlgorithm {
                        return Err(auth_fail("CHAP_A out of sequence".into()));
                    }
                    let Some(alg) = chap::select_algorithm(v) else {
                        return Err(auth_fail(format!("no supported CHAP algorithm in CHAP_A={v} (supported: 5, 7)")));
                    };
                    let id = chap::random_bytes(1)[0];
                    let challenge = chap::random_bytes(alg.digest_len());
                    out.push(("CHAP_A".into(), alg.code().to_string()));
                    out.push(("CHAP_I".into(), id.to_string()));
                    out.push(("CHAP_C".into(), chap::encode_hex(&challenge)));
                    self.auth = Auth::ChapResponse { alg, id, challenge };
                }
                "CHAP_N" => name = Some(v.clone()),
                "CHAP_R" => resp = Some(v.clone()),
                "CHAP_I" => mutual_id = Some(v.clone()),
                "CHAP_C" => mutual_challenge = Some(v.clone()),
                _ => {}
            }
        }
        if name.is_none() && resp.is_none() && mutual_id.is_none() && mutual_challenge.is_none() {
            return Ok(());
        }
        let Auth::ChapResponse { alg, id, challenge } = self.auth.clone() else {
            return Err(auth_fail("CHAP response keys out of sequence".into()));
        };
        let creds = self.access.chap.clone().expect("CHAP is only chosen with credentials");
        let (Some(name), Some(resp)) = (name, resp) else {
            return Err(auth_fail("CHAP_N and CHAP_R must come together".into()));
        };
        if name != creds.user {
            return Err(auth_fail(format!("CHAP_N={name:?} is not the configured user")));
        }
        let Some(got) = chap::decode_binary(&resp) else {
            return Err(auth_fail("CHAP_R is not a binary value".into()));
        };
        let want = chap::response(alg, id, creds.secret.as_bytes(), &challenge);
        if !chap::equal(&got, &want) {
            return Err(auth_fail(format!("wrong CHAP secret for user {name:?}")));
        }
        match (mutual_id, mutual_challenge) {
            (None, None) => {}
            (Some(i), Some(c)) => {
                let Some(mutual) = self.access.mutual.clone() else {
                    return Err(auth_fail("the initiator asked for mutual CHAP; no target credentials are configured".into()));
                };
                let Some(mid) = keys::parse_range(&i, 0, 255) else {
                    return Err(auth_fail(format!("CHAP_I={i} is not an identifier")));
                };
                let Some(mc) = chap::decode_binary(&c).filter(|c| !c.is_empty() && c.len() <= 1024) else {
                    return Err(auth_fail("CHAP_C is not a valid challenge".into()));
                };
                if mc == challenge {
                    return Err(auth_fail("the initiator reflected our CHAP challenge".into()));
                }
                let r = chap::response(alg, mid as u8, mutual.secret.as_bytes(), &mc);
                out.push(("CHAP_N".into(), mutual.user.clone()));
                out.push(("CHAP_R".into(), chap::encode_hex(&r)));
            }
            _ => return Err(auth_fail("CHAP_I and CHAP_C must come together".into())),
        }
        self.auth = Auth::ChapDone;
        Ok(())
    }

    fn response(
        &mut self,
        req: &LoginRequest,
        transit: bool,
        cont: bool,
        nsg: u8,
        status: (u8, u8),
        data: Vec<u8>,
    ) -> LoginResponse {
        let stat_sn = self.stat_sn;
        if status.0 == 0 {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        LoginResponse {
            transit,
            cont,
            csg: self.stage,
            nsg: if transit { nsg } else { 0 },
            version_max: 0,
            version_active: 0,
            isid: req.isid,
            tsih: req.tsih,
            itt: req.itt,
            stat_sn,
            exp_cmd_sn: req.cmd_sn,
            max_cmd_sn: req.cmd_sn.wrapping_add(self.queue_depth - 1),
            status_class: status.0,
            status_detail: status.1,
            data: Bytes::from(data),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdu::{Pdu, RawPdu};

    struct Env {
        access: Access,
    }

    impl LoginEnv for Env {
        fn target_access(&self, name: &str) -> Option<Access> {
            (name == "iqn.2026-11.dev.longwire:disk").then(|| self.access.clone())
        }
        fn session_exists(&self, tsih: u16) -> bool {
            tsih == 7
        }
    }

    const TARGET: &str = "iqn.2026-11.dev.longwire:disk";
    const INITIATOR: &str = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test";

    fn open() -> Env {
        Env { access: Access::default() }
    }

    fn chap_env(mutual: bool) -> Env {
        Env {
            access: Access {
                chap: Some(Credentials { user: "alice".into(), secret: "opensesame12".into() }),
                mutual: mutual.then(|| Credentials { user: "target".into(), secret: "targetsecret".into() }),
                ..Default::default()
            },
        }
    }

    fn req(transit: bool, csg: u8, nsg: u8, text: &str) -> LoginRequest {
        LoginRequest {
            transit,
            cont: false,
            csg,
            nsg: if transit { nsg } else { 0 },
            isid: 0x8000_0000_1234,
            itt: 0x10,
            cmd_sn: 100,
            exp_stat_sn: 0,
            data: Bytes::from(text.replace('|', "\0")),
            ..Default::default()
        }
    }

    fn pairs(r: &LoginResponse) -> Vec<(String, String)> {
        keys::parse_text(&r.data).unwrap()
    }

    fn get(r: &LoginResponse, k: &str) -> Option<String> {
        pairs(r).into_iter().find(|(key, _)| key == k).map(|(_, v)| v)
    }

    fn respond(step: Step) -> LoginResponse {
        match step {
            Step::Respond(r) => r,
            other => panic!("expected Respond, got {other:?}"),
        }
    }

    fn fail(step: Step) -> (u8, u8) {
        match step {
            Step::Fail(r) => {
                assert!(!r.transit);
                (r.status_class, r.status_detail)
            }
            other => panic!("expected Fail, got {other:?}"),
        }
    }

    fn first_text() -> String {
        format!("InitiatorName={INITIATOR}|TargetName={TARGET}|SessionType=Normal|")
    }

    #[test]
    fn no_auth_login_like_libiscsi() {
        let env = open();
        let mut l = Login::new(Policy::default(), 1000, 64);
        // Security stage, offering CHAP or None, transit to operational.
        let r = respond(l.handle(&req(true, 0, 1, &format!("{}AuthMethod=CHAP,None|", first_text())), &env));
        assert!(r.transit);
        assert_eq!((r.csg, r.nsg), (0, 1));
        assert_eq!(get(&r, "AuthMethod").as_deref(), Some("None"));
        assert_eq!(get(&r, "TargetPortalGroupTag").as_deref(), Some("1"));
        assert_eq!(r.stat_sn, 1000);
        assert_eq!((r.exp_cmd_sn, r.max_cmd_sn), (100, 163));
        assert_eq!(r.tsih, 0);
        assert_eq!(r.isid, 0x8000_0000_1234);
        // Operational stage.
        let ops = format!(
            "InitiatorName={INITIATOR}|TargetName={TARGET}|SessionType=Normal|HeaderDigest=None,CRC32C|DataDigest=None|InitialR2T=No|ImmediateData=Yes|MaxBurstLength=262144|\
             FirstBurstLength=262144|DefaultTime2Wait=2|DefaultTime2Retain=0|IFMarker=No|OFMarker=No|\
             MaxConnections=1|MaxRecvDataSegmentLength=262144|DataPDUInOrder=Yes|DataSequenceInOrder=Yes|\
             ErrorRecoveryLevel=0|MaxOutstandingR2T=1|"
        );
        let (r, result) = match l.handle(&req(true, 1, 3, &ops), &env) {
            Step::Complete(r, res) => (r, res),
            other => panic!("{other:?}"),
        };
        assert!(r.transit);
        assert_eq!((r.csg, r.nsg), (1, 3));
        assert_eq!(r.stat_sn, 1001);
        assert_eq!(get(&r, "HeaderDigest").as_deref(), Some("None"));
        assert_eq!(get(&r, "InitialR2T").as_deref(), Some("No"));
        assert_eq!(get(&r, "MaxBurstLength").as_deref(), Some("262144"));
        assert_eq!(get(&r, "MaxRecvDataSegmentLength").as_deref(), Some("262144"), "our declaration");
        assert_eq!(get(&r, "IFMarker").as_deref(), Some("No"));
        assert_eq!(result.initiator_name, INITIATOR);
        assert_eq!(result.target_name.as_deref(), Some(TARGET));
        assert_eq!(result.exp_cmd_sn, 100);
        assert_eq!(result.next_stat_sn, 1002);
        assert_eq!(result.params.initiator_mrdsl, 262144);
        assert!(!result.params.initial_r2t && result.params.immediate_data);
        assert_eq!(result.params.first_burst_length, 262144);
        assert!(!result.chap);
    }

    #[test]
    fn straight_to_full_feature_phase() {
        let env = open();
        let mut l = Login::new(Policy::default(), 1, 64);
        match l.handle(&req(true, 1, 3, &first_text()), &env) {
            Step::Complete(r, res) => {
                assert_eq!((r.csg, r.nsg), (1, 3));
                assert_eq!(get(&r, "MaxRecvDataSegmentLength").as_deref(), Some("262144"));
                assert_eq!(res.params, SessionParams { target_mrdsl: 262144, ..Default::default() });
            }
            other => panic!("{other:?}"),
        }
        let mut l = Login::new(Policy::default(), 1, 64);
        assert!(matches!(l.handle(&req(true, 0, 3, &first_text()), &env), Step::Complete(..)));
    }

    #[test]
    fn discovery_session() {
        let env = open();
        let mut l = Login::new(Policy::default(), 1, 64);
        let r = match l.handle(
            &req(true, 1, 3, &format!("InitiatorName={INITIATOR}|SessionType=Discovery|MaxBurstLength=512|")),
            &env,
        ) {
            Step::Complete(r, res) => {
                assert_eq!(res.session_type, SessionType::Discovery);
                assert_eq!(res.target_name, None);
                r
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(get(&r, "MaxBurstLength").as_deref(), Some("Irrelevant"));
        assert_eq!(get(&r, "TargetPortalGroupTag"), None);
    }

    #[test]
    fn login_errors_have_the_right_status() {
        let env = open();
        let cases: Vec<(LoginRequest, (u8, u8))> = vec![
            (req(true, 0, 1, &format!("TargetName={TARGET}|")), login_status::MISSING_PARAMETER),
            (req(true, 0, 1, &format!("InitiatorName={INITIATOR}|")), login_status::MISSING_PARAMETER),
            (
                req(true, 0, 1, &format!("InitiatorName={INITIATOR}|TargetName=iqn.nope|")),
                login_status::NOT_FOUND,
            ),
            (
                req(true, 0, 1, &format!("InitiatorName={INITIATOR}|SessionType=Bogus|")),
                login_status::SESSION_TYPE_NOT_SUPPORTED,
            ),
            (req(true, 0, 2, &first_text()), login_status::INITIATOR_ERROR),
            (req(true, 1, 1, &first_text()), login_status::INITIATOR_ERROR),
            (req(true, 3, 3, &first_text()), login_status::INITIATOR_ERROR),
            (LoginRequest { version_min: 1, ..req(true, 0, 1, &first_text()) }, login_status::UNSUPPORTED_VERSION),
            (LoginRequest { tsih: 7, ..req(true, 0, 1, &first_text()) }, login_status::TOO_MANY_CONNECTIONS),
            (LoginRequest { tsih: 9, ..req(true, 0, 1, &first_text()) }, login_status::SESSION_DOES_NOT_EXIST),
            (LoginRequest { cont: true, ..req(true, 0, 1, &first_text()) }, login_status::INITIATOR_ERROR),
            (req(true, 0, 1, "garbage|"), login_status::INITIATOR_ERROR),
        ];
        for (r, want) in cases {
            let mut l = Login::new(Policy::default(), 1, 64);
            assert_eq!(fail(l.handle(&r, &env)), want, "{r:?}");
        }
        let deny = Env { access: Access { allow_initiators: vec!["iqn.other".into()], ..Default::default() } };
        let mut l = Login::new(Policy::default(), 1, 64);
        assert_eq!(fail(l.handle(&req(true, 0, 1, &first_text()), &deny)), login_status::AUTHORIZATION_FAILURE);
        let allow = Env { access: Access { allow_initiators: vec![INITIATOR.into()], ..Default::default() } };
        let mut l = Login::new(Policy::default(), 1, 64);
        respond(l.handle(&req(true, 0, 1, &first_text()), &allow));
    }

    #[test]
    fn a_disallowed_address_gets_not_found() {
        // Both rules fail: the address check answers first, so the reply
        // does not confirm the target exists (no 02/02).
        let env = Env {
            access: Access {
                allow_addresses: AllowList::parse(&["127.0.0.2"]).unwrap(),
                allow_initiators: vec!["iqn.other".into()],
                ..Default::default()
            },
        };
        let mut l = Login::new(Policy::default(), 1, 64);
        l.set_peer("127.0.0.1".parse().unwrap());
        let (step, reason) = l.handle_with_reason(&req(true, 0, 1, &first_text()), &env);
        assert_eq!(fail(step), login_status::NOT_FOUND);
        assert!(reason.unwrap().contains("127.0.0.1 may not use target"));
        // The allowed address gets as far as the initiator-name check.
        let mut l = Login::new(Policy::default(), 1, 64);
        l.set_peer("::ffff:127.0.0.2".parse().unwrap());
        assert_eq!(fail(l.handle(&req(true, 0, 1, &first_text()), &env)), login_status::AUTHORIZATION_FAILURE);
    }

    #[test]
    fn stage_must_follow_the_transitions() {
        let env = open();
        let mut l = Login::new(Policy::default(), 1, 64);
        respond(l.handle(&req(false, 0, 0, &first_text()), &env));
        // Still in security: a request claiming stage 1 is an error.
        assert_eq!(fail(l.handle(&req(true, 1, 3, ""), &env)), login_status::INITIATOR_ERROR);
        // ISID must not change.
        let mut l = Login::new(Policy::default(), 1, 64);
        respond(l.handle(&req(false, 0, 0, &first_text()), &env));
        let mut r = req(true, 0, 1, "");
        r.isid = 1;
        assert_eq!(fail(l.handle(&r, &env)), login_status::INITIATOR_ERROR);
        // Re-declaring a different target.
        let mut l = Login::new(Policy::default(), 1, 64);
        respond(l.handle(&req(false, 0, 0, &first_text()), &env));
        assert_eq!(fail(l.handle(&req(true, 0, 1, "TargetName=iqn.other|"), &env)), login_status::INITIATOR_ERROR);
        // Key negotiated twice.
        let mut l = Login::new(Policy::default(), 1, 64);
        respond(l.handle(&req(true, 0, 1, &format!("{}MaxBurstLength=4096|", first_text())), &env));
        assert_eq!(fail(l.handle(&req(true, 1, 3, "MaxBurstLength=4096|"), &env)), login_status::INITIATOR_ERROR);
    }

    #[test]
    fn initiator_text_continues_across_pdus() {
        let env = open();
        let mut l = Login::new(Policy::default(), 5, 64);
        let text = format!("{}MaxBurstLength=65536|", first_text()).replace('|', "\0");
        let (a, b) = text.as_bytes().split_at(20);
        let mut r1 = req(false, 1, 0, "");
        r1.cont = true;
        r1.data = Bytes::copy_from_slice(a);
        let resp = respond(l.handle(&r1, &env));
        assert!(resp.data.is_empty() && !resp.transit && !resp.cont);
        let mut r2 = req(true, 1, 3, "");
        r2.data = Bytes::copy_from_slice(b);
        match l.handle(&r2, &env) {
            Step::Complete(r, res) => {
                assert_eq!(get(&r, "MaxBurstLength").as_deref(), Some("65536"));
                assert_eq!(res.params.max_burst_length, 65536);
                assert_eq!(r.stat_sn, 6);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn long_target_text_continues_across_pdus() {
        let env = open();
        let mut l = Login::new(Policy::default(), 1, 64);
        // 600 unknown keys: the NotUnderstood answers exceed 8192 bytes.
        let mut text = first_text();
        for i in 0..600 {
            text.push_str(&format!("X-vendor.key-number-{i:04}=1|"));
        }
        let r = respond(l.handle(&req(true, 1, 3, &text), &env));
        assert!(r.cont && !r.transit);
        assert_eq!(r.data.len(), 8192);
        let mut all = r.data.to_vec();
        loop {
            match l.handle(&req(true, 1, 3, ""), &env) {
                Step::Respond(r) => {
                    assert!(r.cont && !r.transit);
                    all.extend_from_slice(&r.data);
                }
                Step::Complete(r, _) => {
                    assert!(!r.cont && r.transit);
                    all.extend_from_slice(&r.data);
                    break;
                }
                Step::Fail(r) => panic!("{r:?}"),
            }
        }
        let p = keys::parse_text(&all).unwrap();
        assert_eq!(p.iter().filter(|(_, v)| v == "NotUnderstood").count(), 600);
    }

    fn chap_login(env: &Env, secret: &str, mutual: Option<(&str, u8, &[u8])>) -> Result<LoginResponse, (u8, u8)> {
        let mut l = Login::new(Policy::default(), 1, 64);
        let r = respond(l.handle(&req(true, 0, 1, &format!("{}AuthMethod=CHAP,None|", first_text())), env));
        assert!(!r.transit, "CHAP is not done yet");
        assert_eq!(get(&r, "AuthMethod").as_deref(), Some("CHAP"));
        let r = respond(l.handle(&req(false, 0, 0, "CHAP_A=5|"), env));
        assert_eq!(get(&r, "CHAP_A").as_deref(), Some("5"));
        let id: u8 = get(&r, "CHAP_I").unwrap().parse().unwrap();
        let challenge = chap::decode_binary(&get(&r, "CHAP_C").unwrap()).unwrap();
        assert_eq!(challenge.len(), 16);
        let response = chap::response(Algorithm::Md5, id, secret.as_bytes(), &challenge);
        let mut text = format!("CHAP_N=alice|CHAP_R={}|", chap::encode_hex(&response));
        if let Some((_, mid, mc)) = mutual {
            text.push_str(&format!("CHAP_I={mid}|CHAP_C={}|", chap::encode_hex(mc)));
        }
        match l.handle(&req(true, 0, 1, &text), env) {
            Step::Respond(r) => {
                assert!(r.transit);
                assert_eq!((r.csg, r.nsg), (0, 1));
                Ok(r)
            }
            Step::Fail(r) => Err((r.status_class, r.status_detail)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn chap_one_way() {
        let env = chap_env(false);
        let r = chap_login(&env, "opensesame12", None).unwrap();
        assert_eq!(get(&r, "CHAP_N"), None);
        assert_eq!(chap_login(&env, "wrong", None).unwrap_err(), login_status::AUTHENTICATION_FAILURE);
        // Mutual asked for, but no target credentials configured.
        assert_eq!(
            chap_login(&env, "opensesame12", Some(("target", 3, b"0123456789abcdef"))).unwrap_err(),
            login_status::AUTHENTICATION_FAILURE
        );
    }

    #[test]
    fn chap_mutual() {
        let env = chap_env(true);
        let mc = b"an initiator challenge";
        let r = chap_login(&env, "opensesame12", Some(("target", 42, mc))).unwrap();
        assert_eq!(get(&r, "CHAP_N").as_deref(), Some("target"));
        let want = chap::response(Algorithm::Md5, 42, b"targetsecret", mc);
        assert_eq!(get(&r, "CHAP_R"), Some(chap::encode_hex(&want)));
    }

    #[test]
    fn chap_sha256_and_refusals() {
        let env = chap_env(false);
        let mut l = Login::new(Policy::default(), 1, 64);
        respond(l.handle(&req(true, 0, 1, &format!("{}AuthMethod=CHAP|", first_text())), &env));
        let r = respond(l.handle(&req(false, 0, 0, "CHAP_A=7,5|"), &env));
        assert_eq!(get(&r, "CHAP_A").as_deref(), Some("7"));
        let id: u8 = get(&r, "CHAP_I").unwrap().parse().unwrap();
        let c = chap::decode_binary(&get(&r, "CHAP_C").unwrap()).unwrap();
        assert_eq!(c.len(), 32);
        let resp = chap::response(Algorithm::Sha256, id, b"opensesame12", &c);
        let r = respond(l.handle(&req(true, 0, 1, &format!("CHAP_N=alice|CHAP_R={}|", chap::encode_hex(&resp))), &env));
        assert!(r.transit);

        // CHAP required: None only, skipping security, wrong user, unknown algorithm.
        let mut l = Login::new(Policy::default(), 1, 64);
        assert_eq!(
            fail(l.handle(&req(true, 0, 1, &format!("{}AuthMethod=None|", first_text())), &env)),
            login_status::AUTHENTICATION_FAILURE
        );
        let mut l = Login::new(Policy::default(), 1, 64);
        assert_eq!(fail(l.handle(&req(true, 1, 3, &first_text()), &env)), login_status::AUTHENTICATION_FAILURE);
        let mut l = Login::new(Policy::default(), 1, 64);
        assert_eq!(fail(l.handle(&req(true, 0, 1, &first_text()), &env)), login_status::AUTHENTICATION_FAILURE);
        let mut l = Login::new(Policy::default(), 1, 64);
        respond(l.handle(&req(true, 0, 1, &format!("{}AuthMethod=CHAP|", first_text())), &env));
        assert_eq!(fail(l.handle(&req(false, 0, 0, "CHAP_A=6|"), &env)), login_status::AUTHENTICATION_FAILURE);
        let mut l = Login::new(Policy::default(), 1, 64);
        respond(l.handle(&req(true, 0, 1, &format!("{}AuthMethod=CHAP|", first_text())), &env));
        assert_eq!(fail(l.handle(&req(true, 0, 1, "CHAP_N=alice|CHAP_R=0x00|"), &env)), login_status::AUTHENTICATION_FAILURE);
        // No CHAP configured: an initiator that only offers CHAP is refused.
        let mut l = Login::new(Policy::default(), 1, 64);
        assert_eq!(
            fail(l.handle(&req(true, 0, 1, &format!("{}AuthMethod=CHAP|", first_text())), &open())),
            login_status::AUTHENTICATION_FAILURE
        );
    }

    #[test]
    fn responses_encode_to_the_expected_bytes() {
        let env = open();
        let mut l = Login::new(Policy::default(), 0x01020304, 64);
        let r = respond(l.handle(&req(true, 0, 1, &format!("{}AuthMethod=None|", first_text())), &env));
        let raw: RawPdu = Pdu::LoginResponse(r).to_raw();
        let b = raw.bhs.0;
        assert_eq!(b[0], 0x23);
        assert_eq!(b[1], 0x81, "T=1 CSG=0 NSG=1");
        assert_eq!(&b[8..14], &[0x80, 0, 0, 0, 0x12, 0x34]);
        assert_eq!(&b[16..20], &[0, 0, 0, 0x10]);
        assert_eq!(&b[24..28], &[1, 2, 3, 4]);
        assert_eq!(&b[28..32], &[0, 0, 0, 100]);
        assert_eq!(&b[32..36], &[0, 0, 0, 163]);
        assert_eq!(&b[36..38], &[0, 0]);
        assert_eq!(&raw.data[..], b"TargetPortalGroupTag=1\0AuthMethod=None\0");
    }
}
