//! The sans-IO handshake in its TLS modes: STARTTLS, TLS_REQD refusals,
//! the state reset after STARTTLS, and per-export client allow-lists.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use longwire_core::{Export, ExportRegistry, Volume};
use longwire_nbd::handshake::*;
use longwire_nbd::proto::*;
use longwire_nbd::tls::{subject_common_name, TlsMode, TlsPolicy};
use longwire_store::MemoryVolume;

fn registry() -> ExportRegistry {
    let mut r = ExportRegistry::new();
    let vol: Arc<dyn Volume> = Arc::new(MemoryVolume::new(1 << 20));
    r.add(Export { name: "disk".into(), description: "a test disk".into(), volume: vol.clone() }).unwrap();
    r.add(Export { name: "secret".into(), description: String::new(), volume: vol }).unwrap();
    r
}

fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut v = Vec::new();
    while !out.is_empty() {
        assert_eq!(out.get_u64(), OPT_REPLY_MAGIC);
        let opt = out.get_u32();
        let typ = out.get_u32();
        let len = out.get_u32() as usize;
        v.push((opt, typ, out[..len].to_vec()));
        out.advance(len);
    }
    v
}

fn go_payload(name: &str) -> Vec<u8> {
    let mut d = BytesMut::new();
    d.put_u32(name.len() as u32);
    d.put_slice(name.as_bytes());
    d.put_u16(0);
    d.to_vec()
}

fn meta_payload(name: &str) -> Vec<u8> {
    let mut d = BytesMut::new();
    d.put_u32(name.len() as u32);
    d.put_slice(name.as_bytes());
    d.put_u32(1);
    d.put_u32(BASE_ALLOCATION.len() as u32);
    d.put_slice(BASE_ALLOCATION.as_bytes());
    d.to_vec()
}

fn policy(mode: TlsMode) -> Arc<TlsPolicy> {
    let mut allow = HashMap::new();
    allow.insert("secret".to_string(), vec!["client1".to_string()]);
    Arc::new(TlsPolicy { mode, allow })
}

/// One option; returns the step and the reply types.
fn opt(hs: &mut Handshake, reg: &ExportRegistry, o: u32, data: &[u8]) -> (Step, Vec<u32>) {
    let mut out = BytesMut::new();
    let step = hs.handle_option(o, data, reg, &mut out);
    let r = replies(&out);
    assert!(r.iter().all(|x| x.0 == o), "replies name the option");
    (step, r.into_iter().map(|x| x.1).collect())
}

fn listed(hs: &mut Handshake, reg: &ExportRegistry) -> Vec<String> {
    let mut out = BytesMut::new();
    hs.handle_option(OPT_LIST, &[], reg, &mut out);
    replies(&out)
        .into_iter()
        .filter(|r| r.1 == REP_SERVER)
        .map(|r| String::from_utf8(r.2[4..4 + u32::from_be_bytes(r.2[..4].try_into().unwrap()) as usize].to_vec()).unwrap())
        .collect()
}

#[test]
fn starttls_is_policy_when_tls_is_off() {
    let reg = registry();
    let mut hs = Handshake::with_tls(Arc::new(TlsPolicy::default()));
    let (step, r) = opt(&mut hs, &reg, OPT_STARTTLS, &[]);
    assert!(matches!(step, Step::Continue));
    assert_eq!(r, vec![REP_ERR_POLICY]);
}

#[test]
fn required_mode_refuses_everything_but_starttls_and_abort() {
    let reg = registry();
    let mut hs = Handshake::with_tls(policy(TlsMode::Required));
    for o in [OPT_LIST, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY, OPT_EXTENDED_HEADERS, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, 99] {
        let data = if o == OPT_INFO || o == OPT_GO { go_payload("disk") } else { vec![] };
        let (step, r) = opt(&mut hs, &reg, o, &data);
        assert!(matches!(step, Step::Continue), "option {o}");
        assert_eq!(r, vec![REP_ERR_TLS_REQD], "option {o}: nothing but TLS_REQD, not even the export list");
    }
    // EXPORT_NAME cannot be answered with an error: disconnect.
    let (step, r) = opt(&mut hs, &reg, OPT_EXPORT_NAME, b"disk");
    assert!(matches!(step, Step::Close));
    assert!(r.is_empty());

    let mut hs = Handshake::with_tls(policy(TlsMode::Required));
    let (step, r) = opt(&mut hs, &reg, OPT_ABORT, &[]);
    assert!(matches!(step, Step::Close));
    assert_eq!(r, vec![REP_ACK]);
}

#[test]
fn starttls_acks_then_options_work_and_a_second_starttls_is_invalid() {
    let reg = registry();
    let mut hs = Handshake::with_tls(policy(TlsMode::Required));
    let (_, r) = opt(&mut hs, &reg, OPT_STARTTLS, b"x");
    assert_eq!(r, vec![REP_ERR_INVALID], "STARTTLS takes no data");
    let (step, r) = opt(&mut hs, &reg, OPT_STARTTLS, &[]);
    assert!(matches!(step, Step::StartTls));
    assert_eq!(r, vec![REP_ACK]);
    hs.tls_established(None);
    assert!(hs.tls_active());
    assert_eq!(listed(&mut hs, &reg), vec!["disk"], "an allow-listed export is hidden from a client not on its list");
    let (step, r) = opt(&mut hs, &reg, OPT_STARTTLS, &[]);
    assert!(matches!(step, Step::Continue));
    assert_eq!(r, vec![REP_ERR_INVALID]);
    let (step, r) = opt(&mut hs, &reg, OPT_GO, &go_payload("disk"));
    assert!(matches!(step, Step::Transmit(_)));
    assert_eq!(r.last(), Some(&REP_ACK));
}

#[test]
fn starttls_resets_what_was_negotiated_in_plaintext() {
    let reg = registry();
    let mut hs = Handshake::with_tls(policy(TlsMode::Optional));
    assert_eq!(opt(&mut hs, &reg, OPT_EXTENDED_HEADERS, &[]).1, vec![REP_ACK]);
    assert_eq!(opt(&mut hs, &reg, OPT_SET_META_CONTEXT, &meta_payload("disk")).1, vec![REP_META_CONTEXT, REP_ACK]);
    assert!(matches!(opt(&mut hs, &reg, OPT_STARTTLS, &[]).0, Step::StartTls));
    hs.tls_established(Some("client1".into()));
    // Structured replies are off again: meta contexts need them anew.
    assert_eq!(opt(&mut hs, &reg, OPT_SET_META_CONTEXT, &meta_payload("disk")).1, vec![REP_ERR_INVALID]);
    match opt(&mut hs, &reg, OPT_GO, &go_payload("disk")).0 {
        Step::Transmit(n) => assert!(!n.structured && !n.extended && !n.base_allocation, "{n:?}"),
        s => panic!("{s:?}"),
    }
    // EXPORT_NAME is allowed again (it is not after extended headers).
    let mut hs = Handshake::with_tls(policy(TlsMode::Optional));
    opt(&mut hs, &reg, OPT_EXTENDED_HEADERS, &[]);
    assert!(matches!(opt(&mut hs, &reg, OPT_STARTTLS, &[]).0, Step::StartTls));
    hs.tls_established(None);
    let mut out = BytesMut::new();
    assert!(matches!(hs.handle_option(OPT_EXPORT_NAME, b"disk", &reg, &mut out), Step::Transmit(_)));
}

#[test]
fn optional_mode_serves_plaintext_but_allow_listed_exports_need_tls() {
    let reg = registry();
    let mut hs = Handshake::with_tls(policy(TlsMode::Optional));
    assert_eq!(listed(&mut hs, &reg), vec!["disk"]);
    assert_eq!(opt(&mut hs, &reg, OPT_INFO, &go_payload("secret")).1, vec![REP_ERR_TLS_REQD]);
    assert_eq!(opt(&mut hs, &reg, OPT_STRUCTURED_REPLY, &[]).1, vec![REP_ACK]);
    assert_eq!(opt(&mut hs, &reg, OPT_SET_META_CONTEXT, &meta_payload("secret")).1, vec![REP_ERR_TLS_REQD]);
    assert!(matches!(opt(&mut hs, &reg, OPT_EXPORT_NAME, b"secret").0, Step::Close));
    let mut hs = Handshake::with_tls(policy(TlsMode::Optional));
    assert!(matches!(opt(&mut hs, &reg, OPT_GO, &go_payload("disk")).0, Step::Transmit(_)));
}

#[test]
fn allow_lists_match_the_client_certificate_common_name() {
    let reg = registry();
    for (cn, allowed) in [(Some("client1"), true), (Some("client2"), false), (None, false)] {
        let mut hs = Handshake::with_tls(policy(TlsMode::Required));
        assert!(matches!(opt(&mut hs, &reg, OPT_STARTTLS, &[]).0, Step::StartTls));
        hs.tls_established(cn.map(String::from));
        let want = if allowed { vec!["disk", "secret"] } else { vec!["disk"] };
        assert_eq!(listed(&mut hs, &reg), want, "{cn:?}");
        let (step, r) = opt(&mut hs, &reg, OPT_GO, &go_payload("secret"));
        if allowed {
            assert!(matches!(step, Step::Transmit(_)), "{cn:?}");
        } else {
            assert!(matches!(step, Step::Continue));
            assert_eq!(r, vec![REP_ERR_POLICY], "{cn:?}");
            assert!(matches!(opt(&mut hs, &reg, OPT_EXPORT_NAME, b"secret").0, Step::Close));
        }
    }
}

#[test]
fn shutdown_still_wins_over_tls() {
    let reg = registry();
    let mut hs = Handshake::with_tls(policy(TlsMode::Required));
    hs.shutting_down = true;
    assert_eq!(opt(&mut hs, &reg, OPT_STARTTLS, &[]).1, vec![REP_ERR_SHUTDOWN]);
}

#[test]
fn tls_modes_parse_and_print() {
    for m in ["off", "optional", "required"] {
        assert_eq!(m.parse::<TlsMode>().unwrap().to_string(), m);
    }
    assert!("on".parse::<TlsMode>().is_err());
}

#[test]
fn common_name_comes_from_the_subject_not_the_issuer() {
    // A minimal hand-built certificate skeleton: only the fields the parser
    // walks (version, serial, signature, issuer, validity, subject).
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        if body.len() < 0x80 {
            v.push(body.len() as u8);
        } else {
            v.push(0x82);
            v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        }
        v.extend_from_slice(body);
        v
    }
    fn name(cn: &str, tag: u8) -> Vec<u8> {
        let o = tlv(0x31, &tlv(0x30, &[tlv(0x06, &[0x55, 0x04, 0x0a]), tlv(0x0c, b"Org")].concat()));
        let c = tlv(0x31, &tlv(0x30, &[tlv(0x06, &[0x55, 0x04, 0x03]), tlv(tag, cn.as_bytes())].concat()));
        tlv(0x30, &[o, c].concat())
    }
    let tbs = tlv(
        0x30,
        &[
            tlv(0xa0, &tlv(0x02, &[2])),
            tlv(0x02, &[1, 2, 3]),
            tlv(0x30, &tlv(0x06, &[1, 2, 3])),
            name("the-ca", 0x0c),
            tlv(0x30, &[0u8; 30]),
            name("client1", 0x13),
            tlv(0x30, &[0u8; 200]),
        ]
        .concat(),
    );
    let cert = tlv(0x30, &[tbs, tlv(0x30, &[]), tlv(0x03, &[0])].concat());
    assert_eq!(subject_common_name(&cert).as_deref(), Some("client1"));
    assert_eq!(subject_common_name(&cert[..cert.len() / 2]), None, "truncated input is no CN, not a panic");
    assert_eq!(subject_common_name(b""), None);
}

#[test]
fn the_empty_name_cannot_sneak_past_an_allow_list() {
    // `secret` is the export an empty name selects.
    let mut reg = ExportRegistry::new();
    let vol: Arc<dyn Volume> = Arc::new(MemoryVolume::new(1 << 20));
    reg.add(Export { name: "secret".into(), description: String::new(), volume: vol.clone() }).unwrap();
    reg.add(Export { name: "disk".into(), description: String::new(), volume: vol }).unwrap();
    let mut hs = Handshake::with_tls(policy(TlsMode::Required));
    assert!(matches!(opt(&mut hs, &reg, OPT_STARTTLS, &[]).0, Step::StartTls));
    hs.tls_established(Some("client2".into()));
    assert_eq!(opt(&mut hs, &reg, OPT_GO, &go_payload("")).1, vec![REP_ERR_POLICY]);
    assert_eq!(opt(&mut hs, &reg, OPT_INFO, &go_payload("")).1, vec![REP_ERR_POLICY]);
    assert_eq!(opt(&mut hs, &reg, OPT_STRUCTURED_REPLY, &[]).1, vec![REP_ACK]);
    assert_eq!(opt(&mut hs, &reg, OPT_SET_META_CONTEXT, &meta_payload("")).1, vec![REP_ERR_POLICY]);
    let mut out = BytesMut::new();
    assert!(matches!(hs.handle_option(OPT_EXPORT_NAME, b"", &reg, &mut out), Step::Close));
}
