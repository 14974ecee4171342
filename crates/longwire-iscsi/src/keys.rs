//! Text keys (RFC 7143 §6): `key=value` strings separated by NUL bytes,
//! split across PDUs with the C (continue) bit; value syntax; and the
//! result functions of operational negotiation (§13).
//!
//! Everything here is pure: [`parse_text`] and [`encode_text`] for the
//! format, [`TextAssembler`] and [`split_text`] for continuation,
//! [`Negotiator`] for the operational keys of the login phase.

use std::collections::HashSet;

/// Longest key name (§6.1: a key name is at most 63 characters).
pub const MAX_KEY_LEN: usize = 63;
/// Longest value we accept. §6.1 limits ordinary values to 255 bytes;
/// binary values (CHAP challenges and responses) may be longer, up to the
/// 8192 bytes §12.1.3 allows for a CHAP_C.
pub const MAX_VALUE_LEN: usize = 8192 * 2 + 2;
/// Largest text (all PDUs of one request together) we assemble.
pub const MAX_TEXT_LEN: usize = 64 * 1024;

/// Malformed text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TextError(pub String);

/// Parse a complete text (all continuation PDUs joined) into ordered
/// key/value pairs. Empty strings (trailing NULs, padding) are ignored.
pub fn parse_text(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out = Vec::new();
    for item in data.split(|&b| b == 0) {
        if item.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(item).map_err(|_| TextError("key=value is not UTF-8".into()))?;
        let Some((k, v)) = s.split_once('=') else {
            return Err(TextError(format!("{s:?} is not key=value")));
        };
        if k.is_empty() || k.len() > MAX_KEY_LEN || !k.bytes().all(|c| c.is_ascii_graphic()) {
            return Err(TextError(format!("invalid key name {k:?}")));
        }
        if v.len() > MAX_VALUE_LEN {
            return Err(TextError(format!("value of {k} is {} bytes long", v.len())));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Encode key/value pairs, each terminated by a NUL.
pub fn encode_text(pairs: &[(String, String)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (k, val) in pairs {
        v.extend_from_slice(k.as_bytes());
        v.push(b'=');
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
    v
}

/// Joins the data segments of a request sent with the C bit over several
/// PDUs.
#[derive(Debug, Default)]
pub struct TextAssembler {
    buf: Vec<u8>,
}

impl TextAssembler {
    /// Add one PDU's data. Returns the whole text once a PDU without the C
    /// bit arrives.
    pub fn push(&mut self, data: &[u8], cont: bool) -> Result<Option<Vec<u8>>, TextError> {
        if self.buf.len() + data.len() > MAX_TEXT_LEN {
            self.buf.clear();
            return Err(TextError(format!("text longer than {MAX_TEXT_LEN} bytes")));
        }
        self.buf.extend_from_slice(data);
        if cont {
            Ok(None)
        } else {
            Ok(Some(std::mem::take(&mut self.buf)))
        }
    }

    /// True while a continued text is being collected.
    pub fn in_progress(&self) -> bool {
        !self.buf.is_empty()
    }
}

/// Split an outgoing text into data segments of at most `max` bytes; every
/// chunk but the last goes out with the C bit.
pub fn split_text(text: &[u8], max: usize) -> Vec<Vec<u8>> {
    let max = max.max(1);
    if text.is_empty() {
        return vec![Vec::new()];
    }
    text.chunks(max).map(|c| c.to_vec()).collect()
}

// ---------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------

/// `Yes`/`No`.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

pub fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

/// A numerical value: decimal or `0x` hexadecimal (§5.1).
pub fn parse_number(v: &str) -> Option<u64> {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if hex.is_empty() || hex.len() > 16 {
            return None;
        }
        return u64::from_str_radix(hex, 16).ok();
    }
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// A number within `[min, max]`.
pub fn parse_range(v: &str, min: u64, max: u64) -> Option<u64> {
    parse_number(v).filter(|n| (min..=max).contains(n))
}

/// List negotiation: the first value in the originator's list that the
/// responder supports (§6.2.1).
pub fn select_from_list<'a>(offered: &str, supported: &[&'a str]) -> Option<&'a str> {
    offered.split(',').find_map(|o| supported.iter().find(|s| **s == o).copied())
}

/// The constant answers of §6.2.
pub const NOT_UNDERSTOOD: &str = "NotUnderstood";
pub const IRRELEVANT: &str = "Irrelevant";
pub const REJECT: &str = "Reject";

// ---------------------------------------------------------------------------
// Operational negotiation
// ---------------------------------------------------------------------------

/// Discovery or normal session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionType {
    Discovery,
    #[default]
    Normal,
}

/// What this target offers and accepts; the other side of every result
/// function.
#[derive(Debug, Clone)]
pub struct Policy {
    /// MaxRecvDataSegmentLength we declare: the largest data segment we
    /// accept.
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    /// Digests we accept, in order of preference.
    pub header_digests: Vec<&'static str>,
    pub data_digests: Vec<&'static str>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_recv_data_segment_length: 256 * 1024,
            max_burst_length: 1024 * 1024,
            first_burst_length: 256 * 1024,
            initial_r2t: false,
            immediate_data: true,
            max_outstanding_r2t: 8,
            default_time2wait: 2,
            default_time2retain: 20,
            header_digests: vec!["CRC32C", "None"],
            data_digests: vec!["CRC32C", "None"],
        }
    }
}

/// The operational parameters in force, starting from the defaults of §13.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Largest data segment the initiator accepts (what we may send).
    pub initiator_mrdsl: u32,
    /// Largest data segment we accept (what we declared).
    pub target_mrdsl: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub error_recovery_level: u32,
    pub max_connections: u32,
}

/// The §13 default of MaxRecvDataSegmentLength, in force during login.
pub const DEFAULT_MRDSL: u32 = 8192;

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            header_digest: false,
            data_digest: false,
            initiator_mrdsl: DEFAULT_MRDSL,
            target_mrdsl: DEFAULT_MRDSL,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            default_time2wait: 2,
            default_time2retain: 20,
            error_recovery_level: 0,
            max_connections: 1,
        }
    }
}

/// How the responder answers one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `key=value` in the response.
    Reply(String),
    /// A declaration: nothing to answer.
    Silent,
}

/// The negotiation as a whole failed: end the login with this status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NegotiationFailure {
    pub status: (u8, u8),
    pub message: String,
}

/// Negotiates the operational keys (§13) of one login, one key list at a
/// time, remembering which keys were settled so a re-negotiation is caught.
#[derive(Debug, Clone)]
pub struct Negotiator {
    pub policy: Policy,
    pub session_type: SessionType,
    pub params: SessionParams,
    settled: HashSet<String>,
    /// We declared our MaxRecvDataSegmentLength.
    pub declared_mrdsl: bool,
}

/// Keys that only matter in normal sessions (§13: "Irrelevant when:
/// SessionType=Discovery").
const NORMAL_ONLY: &[&str] = &[
    "MaxConnections",
    "InitialR2T",
    "ImmediateData",
    "MaxBurstLength",
    "FirstBurstLength",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "TaskReporting",
    "iSCSIProtocolLevel",
];

/// Keys handled by the login state machine (declarations and security),
/// not by [`Negotiator::negotiate`].
pub const LOGIN_KEYS: &[&str] = &[
    "InitiatorName",
    "TargetName",
    "SessionType",
    "InitiatorAlias",
    "AuthMethod",
    "CHAP_A",
    "CHAP_I",
    "CHAP_C",
    "CHAP_N",
    "CHAP_R",
];

impl Negotiator {
    pub fn new(policy: Policy, session_type: SessionType) -> Negotiator {
        let params = SessionParams { target_mrdsl: policy.max_recv_data_segment_length, ..SessionParams::default() };
        Negotiator { policy, session_type, params, settled: HashSet::new(), declared_mrdsl: false }
    }

    /// Answer the operational keys of one request text. Returns the
    /// response pairs in the order of the request. Keys of [`LOGIN_KEYS`]
    /// are skipped (the caller handles them).
    pub fn negotiate(&mut self, pairs: &[(String, String)]) -> Result<Vec<(String, String)>, NegotiationFailure> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut first_burst_offer: Option<u64> = None;
        for (k, v) in pairs {
            if LOGIN_KEYS.contains(&k.as_str()) {
                continue;
            }
            if matches!(v.as_str(), NOT_UNDERSTOOD | IRRELEVANT | REJECT) {
                // An answer to something we never offered: nothing to do.
                continue;
            }
            let declarative = matches!(k.as_str(), "MaxRecvDataSegmentLength");
            if !declarative && !k.starts_with("X-") && !k.starts_with("X#") && !self.settled.insert(k.clone()) {
                return Err(NegotiationFailure {
                    status: crate::pdu::login_status::INITIATOR_ERROR,
                    message: format!("key {k} negotiated twice"),
                });
            }
            if self.session_type == SessionType::Discovery && NORMAL_ONLY.contains(&k.as_str()) {
                out.push((k.clone(), IRRELEVANT.into()));
                continue;
            }
            if k == "FirstBurstLength" {
                // Answered after MaxBurstLength is known (it must not exceed it).
                match parse_range(v, 512, (1 << 24) - 1) {
                    Some(n) => {
                        first_burst_offer = Some(n);
                        out.push((k.clone(), String::new()));
                    }
                    None => out.push((k.clone(), REJECT.into())),
                }
                continue;
            }
            match self.answer(k, v) {
                Answer::Reply(r) => out.push((k.clone(), r)),
                Answer::Silent => {}
            }
        }
        if let Some(offer) = first_burst_offer {
            let p = &mut self.params;
            let fb = offer.min(self.policy.first_burst_length as u64).min(p.max_burst_length as u64) as u32;
            p.first_burst_length = fb;
            let irrelevant = p.initial_r2t && !p.immediate_data;
            for (k, v) in out.iter_mut() {
                if k == "FirstBurstLength" && v.is_empty() {
                    *v = if irrelevant { IRRELEVANT.to_string() } else { fb.to_string() };
                }
            }
        }
        // FirstBurstLength must never exceed MaxBurstLength, whether it was
        // negotiated or is the default.
        if self.params.first_burst_length > self.params.max_burst_length {
            self.params.first_burst_length = self.params.max_burst_length;
        }
        Ok(out)
    }

    /// Our MaxRecvDataSegmentLength declaration, once per login.
    pub fn declaration(&mut self) -> Option<(String, String)> {
        if self.declared_mrdsl {
            return None;
        }
        self.declared_mrdsl = true;
        Some(("MaxRecvDataSegmentLength".into(), self.policy.max_recv_data_segment_length.to_string()))
    }

    fn answer(&mut self, k: &str, v: &str) -> Answer {
        let p = &mut self.params;
        let pol = &self.policy;
        let reply = |s: String| Answer::Reply(s);
        let reject = || Answer::Reply(REJECT.into());
        match k {
            "HeaderDigest" | "DataDigest" => {
                let supported: &[&'static str] =
                    if k == "HeaderDigest" { &pol.header_digests } else { &pol.data_digests };
                // Responder picks the first value of the offer it supports.
                match select_from_list(v, supported) {
                    Some(sel) => {
                        let on = sel == "CRC32C";
                        if k == "HeaderDigest" {
                            p.header_digest = on;
                        } else {
                            p.data_digest = on;
                        }
                        reply(sel.to_string())
                    }
                    None => reject(),
                }
            }
            "MaxRecvDataSegmentLength" => match parse_range(v, 512, (1 << 24) - 1) {
                Some(n) => {
                    p.initiator_mrdsl = n as u32;
                    Answer::Silent
                }
                None => reject(),
            },
            "MaxConnections" => match parse_range(v, 1, 65535) {
                Some(n) => {
                    p.max_connections = n.min(1) as u32;
                    reply(p.max_connections.to_string())
                }
                None => reject(),
            },
            "InitialR2T" => match parse_bool(v) {
                Some(b) => {
                    p.initial_r2t = b || pol.initial_r2t;
                    reply(yes_no(p.initial_r2t))
                }
                None => reject(),
            },
            "ImmediateData" => match parse_bool(v) {
                Some(b) => {
                    p.immediate_data = b && pol.immediate_data;
                    reply(yes_no(p.immediate_data))
                }
                None => reject(),
            },
            "MaxBurstLength" => match parse_range(v, 512, (1 << 24) - 1) {
                Some(n) => {
                    p.max_burst_length = n.min(pol.max_burst_length as u64) as u32;
                    reply(p.max_burst_length.to_string())
                }
                None => reject(),
            },
            "DefaultTime2Wait" => match parse_range(v, 0, 3600) {
                Some(n) => {
                    p.default_time2wait = n.max(pol.default_time2wait as u64) as u32;
                    reply(p.default_time2wait.to_string())
                }
                None => reject(),
            },
            "DefaultTime2Retain" => match parse_range(v, 0, 3600) {
                Some(n) => {
                    p.default_time2retain = n.min(pol.default_time2retain as u64) as u32;
                    reply(p.default_time2retain.to_string())
                }
                None => reject(),
            },
            "MaxOutstandingR2T" => match parse_range(v, 1, 65535) {
                Some(n) => {
                    p.max_outstanding_r2t = n.min(pol.max_outstanding_r2t as u64) as u32;
                    reply(p.max_outstanding_r2t.to_string())
                }
                None => reject(),
            },
            // OR with our Yes: always Yes.
            "DataPDUInOrder" | "DataSequenceInOrder" => match parse_bool(v) {
                Some(_) => reply(yes_no(true)),
                None => reject(),
            },
            "ErrorRecoveryLevel" => match parse_range(v, 0, 2) {
                Some(_) => {
                    p.error_recovery_level = 0;
                    reply("0".into())
                }
                None => reject(),
            },
            // Obsoleted by RFC 7143 §13.26: markers are answered No, the
            // intervals Reject; never NotUnderstood.
            "IFMarker" | "OFMarker" => reply("No".into()),
            "IFMarkInt" | "OFMarkInt" => reject(),
            "iSCSIProtocolLevel" => match parse_range(v, 0, 31) {
                Some(n) => reply(n.min(1).to_string()),
                None => reject(),
            },
            "TaskReporting" => match select_from_list(v, &["RFC3720"]) {
                Some(s) => reply(s.into()),
                None => reject(),
            },
            "RDMAExtensions" => match parse_bool(v) {
                Some(_) => reply("No".into()),
                None => reject(),
            },
            // Keys only a target sends, or only used in Text requests.
            "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" | "SendTargets" => reject(),
            _ => reply(NOT_UNDERSTOOD.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn answer_of(out: &[(String, String)], key: &str) -> Option<String> {
        out.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    #[test]
    fn text_parses_and_encodes() {
        let t = b"InitiatorName=iqn.2001-04.com.example:a\0SessionType=Normal\0\0\0";
        let p = parse_text(t).unwrap();
        assert_eq!(p, kv(&[("InitiatorName", "iqn.2001-04.com.example:a"), ("SessionType", "Normal")]));
        assert_eq!(encode_text(&p), t[..t.len() - 2].to_vec());
        // A value may contain '='.
        assert_eq!(parse_text(b"X-a=b=c\0").unwrap(), kv(&[("X-a", "b=c")]));
        assert_eq!(parse_text(b"").unwrap(), vec![]);
    }

    #[test]
    fn malformed_text_is_refused() {
        assert!(parse_text(b"novalue\0").is_err());
        assert!(parse_text(b"=x\0").is_err());
        assert!(parse_text(&[b'k', b'=', 0xff, 0]).is_err());
        let long_key = format!("{}=1\0", "K".repeat(64));
        assert!(parse_text(long_key.as_bytes()).is_err());
        let ok_key = format!("{}=1\0", "K".repeat(63));
        assert!(parse_text(ok_key.as_bytes()).is_ok());
    }

    #[test]
    fn continuation_joins_across_pdus_even_mid_key() {
        let mut a = TextAssembler::default();
        assert_eq!(a.push(b"MaxBurstLe", true).unwrap(), None);
        assert!(a.in_progress());
        assert_eq!(a.push(b"ngth=262", true).unwrap(), None);
        let whole = a.push(b"144\0", false).unwrap().unwrap();
        assert_eq!(parse_text(&whole).unwrap(), kv(&[("MaxBurstLength", "262144")]));
        assert!(!a.in_progress());
        let big = vec![b'a'; MAX_TEXT_LEN];
        assert!(a.push(&big, true).is_ok());
        assert!(a.push(b"x", true).is_err());
    }

    #[test]
    fn split_text_chunks() {
        let t = vec![7u8; 20000];
        let parts = split_text(&t, 8192);
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), vec![8192, 8192, 3616]);
        assert_eq!(split_text(b"", 8192), vec![Vec::<u8>::new()]);
    }

    #[test]
    fn values() {
        assert_eq!(parse_number("262144"), Some(262144));
        assert_eq!(parse_number("0x400"), Some(1024));
        assert_eq!(parse_number("-1"), None);
        assert_eq!(parse_number("12a"), None);
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_range("511", 512, 1000), None);
        assert_eq!(parse_bool("Yes"), Some(true));
        assert_eq!(parse_bool("yes"), None);
        assert_eq!(select_from_list("CRC32C,None", &["None"]), Some("None"));
        assert_eq!(select_from_list("None,CRC32C", &["CRC32C", "None"]), Some("None"));
        assert_eq!(select_from_list("MD5", &["None"]), None);
    }

    fn normal() -> Negotiator {
        Negotiator::new(Policy::default(), SessionType::Normal)
    }

    #[test]
    fn digests_pick_the_first_offered_value_we_support() {
        let mut n = normal();
        let out = n.negotiate(&kv(&[("HeaderDigest", "CRC32C,None"), ("DataDigest", "None,CRC32C")])).unwrap();
        assert_eq!(answer_of(&out, "HeaderDigest").as_deref(), Some("CRC32C"));
        assert_eq!(answer_of(&out, "DataDigest").as_deref(), Some("None"));
        assert!(n.params.header_digest && !n.params.data_digest);
        let mut n = normal();
        let out = n.negotiate(&kv(&[("HeaderDigest", "SHA1")])).unwrap();
        assert_eq!(answer_of(&out, "HeaderDigest").as_deref(), Some("Reject"));
        assert!(!n.params.header_digest);
    }

    #[test]
    fn numeric_results_min_and_max() {
        let mut n = normal();
        let out = n
            .negotiate(&kv(&[
                ("MaxBurstLength", "16776192"),
                ("FirstBurstLength", "16776192"),
                ("MaxOutstandingR2T", "4"),
                ("DefaultTime2Wait", "0"),
                ("DefaultTime2Retain", "60"),
                ("MaxConnections", "8"),
                ("ErrorRecoveryLevel", "2"),
            ]))
            .unwrap();
        assert_eq!(answer_of(&out, "MaxBurstLength").as_deref(), Some("1048576"), "min with ours");
        assert_eq!(answer_of(&out, "FirstBurstLength").as_deref(), Some("262144"));
        assert_eq!(answer_of(&out, "MaxOutstandingR2T").as_deref(), Some("4"));
        assert_eq!(answer_of(&out, "DefaultTime2Wait").as_deref(), Some("2"), "max with ours");
        assert_eq!(answer_of(&out, "DefaultTime2Retain").as_deref(), Some("20"), "min with ours");
        assert_eq!(answer_of(&out, "MaxConnections").as_deref(), Some("1"));
        assert_eq!(answer_of(&out, "ErrorRecoveryLevel").as_deref(), Some("0"));
        assert_eq!(n.params.max_outstanding_r2t, 4);
    }

    #[test]
    fn first_burst_never_exceeds_max_burst() {
        let mut n = normal();
        let out = n.negotiate(&kv(&[("FirstBurstLength", "262144"), ("MaxBurstLength", "65536")])).unwrap();
        assert_eq!(answer_of(&out, "FirstBurstLength").as_deref(), Some("65536"));
        assert_eq!(n.params.first_burst_length, 65536);
        // The default FirstBurstLength (65536) is clamped too.
        let mut n = normal();
        n.negotiate(&kv(&[("MaxBurstLength", "4096")])).unwrap();
        assert_eq!(n.params.first_burst_length, 4096);
    }

    #[test]
    fn booleans_and_or() {
        let mut n = normal();
        let out = n
            .negotiate(&kv(&[
                ("InitialR2T", "No"),
                ("ImmediateData", "Yes"),
                ("DataPDUInOrder", "No"),
                ("DataSequenceInOrder", "Yes"),
            ]))
            .unwrap();
        assert_eq!(answer_of(&out, "InitialR2T").as_deref(), Some("No"));
        assert_eq!(answer_of(&out, "ImmediateData").as_deref(), Some("Yes"));
        assert_eq!(answer_of(&out, "DataPDUInOrder").as_deref(), Some("Yes"), "OR with our Yes");
        let mut n = normal();
        let out = n.negotiate(&kv(&[("InitialR2T", "Yes"), ("ImmediateData", "No")])).unwrap();
        assert_eq!(answer_of(&out, "InitialR2T").as_deref(), Some("Yes"));
        assert_eq!(answer_of(&out, "ImmediateData").as_deref(), Some("No"));
        let pol = Policy { immediate_data: false, ..Default::default() };
        let mut n = Negotiator::new(pol, SessionType::Normal);
        let out = n.negotiate(&kv(&[("ImmediateData", "Yes")])).unwrap();
        assert_eq!(answer_of(&out, "ImmediateData").as_deref(), Some("No"), "AND with our No");
    }

    #[test]
    fn first_burst_is_irrelevant_without_unsolicited_data() {
        let mut n = normal();
        let out = n
            .negotiate(&kv(&[("FirstBurstLength", "65536"), ("InitialR2T", "Yes"), ("ImmediateData", "No")]))
            .unwrap();
        assert_eq!(answer_of(&out, "FirstBurstLength").as_deref(), Some("Irrelevant"));
    }

    #[test]
    fn declarations_bad_values_and_unknown_keys() {
        let mut n = normal();
        let out = n
            .negotiate(&kv(&[
                ("MaxRecvDataSegmentLength", "65536"),
                ("MaxBurstLength", "100"),
                ("InitialR2T", "Maybe"),
                ("X-com.example.foo", "1"),
                ("Frobnicate", "Yes"),
                ("IFMarker", "No"),
                ("OFMarkInt", "2048~65535"),
                ("TargetPortalGroupTag", "1"),
            ]))
            .unwrap();
        assert_eq!(n.params.initiator_mrdsl, 65536);
        assert_eq!(answer_of(&out, "MaxRecvDataSegmentLength"), None, "declarative: no answer");
        assert_eq!(answer_of(&out, "MaxBurstLength").as_deref(), Some("Reject"), "below 512");
        assert_eq!(n.params.max_burst_length, 262144, "a rejected key keeps its default");
        assert_eq!(answer_of(&out, "InitialR2T").as_deref(), Some("Reject"));
        assert_eq!(answer_of(&out, "X-com.example.foo").as_deref(), Some("NotUnderstood"));
        assert_eq!(answer_of(&out, "Frobnicate").as_deref(), Some("NotUnderstood"));
        assert_eq!(answer_of(&out, "IFMarker").as_deref(), Some("No"));
        assert_eq!(answer_of(&out, "OFMarkInt").as_deref(), Some("Reject"));
        assert_eq!(answer_of(&out, "TargetPortalGroupTag").as_deref(), Some("Reject"));
        assert_eq!(n.declaration(), Some(("MaxRecvDataSegmentLength".into(), "262144".into())));
        assert_eq!(n.declaration(), None, "declared once");
    }

    #[test]
    fn renegotiation_fails_the_login() {
        let mut n = normal();
        n.negotiate(&kv(&[("MaxBurstLength", "65536")])).unwrap();
        let err = n.negotiate(&kv(&[("MaxBurstLength", "65536")])).unwrap_err();
        assert_eq!(err.status, crate::pdu::login_status::INITIATOR_ERROR);
        // Declarations may be repeated.
        n.negotiate(&kv(&[("MaxRecvDataSegmentLength", "8192")])).unwrap();
        n.negotiate(&kv(&[("MaxRecvDataSegmentLength", "16384")])).unwrap();
        assert_eq!(n.params.initiator_mrdsl, 16384);
    }

    #[test]
    fn discovery_sessions_answer_irrelevant() {
        let mut n = Negotiator::new(Policy::default(), SessionType::Discovery);
        let out = n
            .negotiate(&kv(&[
                ("HeaderDigest", "None"),
                ("InitialR2T", "No"),
                ("MaxBurstLength", "262144"),
                ("MaxConnections", "1"),
                ("ErrorRecoveryLevel", "0"),
            ]))
            .unwrap();
        assert_eq!(answer_of(&out, "HeaderDigest").as_deref(), Some("None"));
        assert_eq!(answer_of(&out, "InitialR2T").as_deref(), Some("Irrelevant"));
        assert_eq!(answer_of(&out, "MaxBurstLength").as_deref(), Some("Irrelevant"));
        assert_eq!(answer_of(&out, "MaxConnections").as_deref(), Some("Irrelevant"));
        assert_eq!(answer_of(&out, "ErrorRecoveryLevel").as_deref(), Some("0"));
    }

    #[test]
    fn answers_from_the_initiator_are_ignored() {
        let mut n = normal();
        let out = n.negotiate(&kv(&[("SomeKey", "NotUnderstood"), ("Other", "Irrelevant")])).unwrap();
        assert!(out.is_empty());
    }
}
