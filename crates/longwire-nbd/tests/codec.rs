//! Byte-level tests of the sans-IO codec: handshake options and request
//! decoding, with no sockets involved.

use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use longwire_core::{Export, ExportRegistry, Volume, ZeroFlags};
use longwire_nbd::handshake::*;
use longwire_nbd::proto::*;
use longwire_nbd::transmission::*;
use longwire_store::MemoryVolume;

fn registry() -> ExportRegistry {
    let mut r = ExportRegistry::new();
    let vol: Arc<dyn Volume> = Arc::new(MemoryVolume::new(1 << 20));
    r.add(Export { name: "disk".into(), description: "a test disk".into(), volume: vol.clone() }).unwrap();
    r.add(Export { name: "other".into(), description: String::new(), volume: vol }).unwrap();
    r
}

/// Parse option replies out of `out`: (option, type, data).
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

fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = BytesMut::new();
    d.put_u32(name.len() as u32);
    d.put_slice(name.as_bytes());
    d.put_u16(infos.len() as u16);
    for i in infos {
        d.put_u16(*i);
    }
    d.to_vec()
}

fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = BytesMut::new();
    d.put_u32(name.len() as u32);
    d.put_slice(name.as_bytes());
    d.put_u32(queries.len() as u32);
    for q in queries {
        d.put_u32(q.len() as u32);
        d.put_slice(q.as_bytes());
    }
    d.to_vec()
}

#[test]
fn greeting_is_fixed_newstyle_with_no_zeroes() {
    let g = greeting();
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(u16::from_be_bytes([g[16], g[17]]), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
}

#[test]
fn unknown_client_flags_and_bad_magic_end_the_session() {
    let mut hs = Handshake::new();
    assert!(hs.client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).is_ok());
    assert_eq!(hs.client_flags(1 << 5), Err(HandshakeError::BadClientFlags(1 << 5)));
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(b"IHAVEOPX");
    assert!(matches!(parse_option_header(&h), Err(HandshakeError::BadMagic(_))));
    h[..8].copy_from_slice(b"IHAVEOPT");
    h[12..].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
    assert!(matches!(parse_option_header(&h), Err(HandshakeError::OptionTooLarge(_))));
}

#[test]
fn list_shows_names_and_descriptions_and_rejects_data() {
    let reg = registry();
    let mut hs = Handshake::new();
    let mut out = BytesMut::new();
    assert!(matches!(hs.handle_option(OPT_LIST, &[], &reg, &mut out), Step::Continue));
    let r = replies(&out);
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].1, REP_SERVER);
    assert_eq!(&r[0].2[..4], &4u32.to_be_bytes());
    assert_eq!(&r[0].2[4..], b"diska test disk");
    assert_eq!(r[2].1, REP_ACK);
    out.clear();
    hs.handle_option(OPT_LIST, b"x", &reg, &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
}

#[test]
fn unknown_options_are_unsupported_and_starttls_is_policy() {
    let reg = registry();
    let mut hs = Handshake::new();
    let mut out = BytesMut::new();
    hs.handle_option(99, &[], &reg, &mut out);
    hs.handle_option(OPT_STARTTLS, &[], &reg, &mut out);
    let r = replies(&out);
    assert_eq!((r[0].0, r[0].1), (99, REP_ERR_UNSUP));
    assert_eq!(r[1].1, REP_ERR_POLICY);
}

#[test]
fn info_reports_export_name_description_block_size_then_go_transmits() {
    let reg = registry();
    let mut hs = Handshake::new();
    let mut out = BytesMut::new();
    hs.handle_option(OPT_STRUCTURED_REPLY, &[], &reg, &mut out);
    out.clear();
    let p = go_payload("disk", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]);
    assert!(matches!(hs.handle_option(OPT_INFO, &p, &reg, &mut out), Step::Continue));
    let r = replies(&out);
    let types: Vec<u16> = r.iter().filter(|x| x.1 == REP_INFO).map(|x| u16::from_be_bytes([x.2[0], x.2[1]])).collect();
    assert_eq!(types, vec![INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]);
    let export = &r[0].2;
    assert_eq!(u64::from_be_bytes(export[2..10].try_into().unwrap()), 1 << 20);
    let flags = u16::from_be_bytes([export[10], export[11]]);
    assert!(flags & FLAG_HAS_FLAGS != 0 && flags & FLAG_SEND_DF != 0 && flags & FLAG_READ_ONLY == 0);
    assert_eq!(&r[2].2[2..], b"a test disk");
    let bs = &r[3].2;
    assert_eq!(u32::from_be_bytes(bs[10..14].try_into().unwrap()), 32 << 20);
    assert_eq!(r.last().unwrap().1, REP_ACK);

    out.clear();
    match hs.handle_option(OPT_GO, &p, &reg, &mut out) {
        Step::Transmit(n) => {
            assert_eq!(n.export.name, "disk");
            assert!(n.structured && !n.extended && !n.base_allocation);
        }
        s => panic!("GO did not transmit: {s:?}"),
    }
}

#[test]
fn go_errors_are_replies_not_disconnects() {
    let reg = registry();
    let mut hs = Handshake::new();
    let mut out = BytesMut::new();
    assert!(matches!(hs.handle_option(OPT_GO, &go_payload("nope", &[]), &reg, &mut out), Step::Continue));
    assert_eq!(replies(&out)[0].1, REP_ERR_UNKNOWN);
    out.clear();
    // Name length claims more bytes than were sent.
    let mut bad = go_payload("disk", &[]);
    bad[3] = 200;
    assert!(matches!(hs.handle_option(OPT_GO, &bad, &reg, &mut out), Step::Continue));
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    out.clear();
    // Trailing garbage.
    let mut bad = go_payload("disk", &[]);
    bad.push(0);
    hs.handle_option(OPT_INFO, &bad, &reg, &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
}

#[test]
fn empty_name_selects_the_first_export_when_no_default() {
    let reg = registry();
    let mut hs = Handshake::new();
    let mut out = BytesMut::new();
    match hs.handle_option(OPT_GO, &go_payload("", &[]), &reg, &mut out) {
        Step::Transmit(n) => assert_eq!(n.export.name, "disk"),
        s => panic!("{s:?}"),
    }
}

#[test]
fn export_name_honours_no_zeroes_and_refuses_unknown_by_closing() {
    let reg = registry();
    let mut hs = Handshake::new();
    hs.client_flags(FLAG_C_FIXED_NEWSTYLE).unwrap();
    let mut out = BytesMut::new();
    assert!(matches!(hs.handle_option(OPT_EXPORT_NAME, b"disk", &reg, &mut out), Step::Transmit(_)));
    assert_eq!(out.len(), 8 + 2 + 124);
    let mut hs = Handshake::new();
    hs.client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).unwrap();
    out.clear();
    assert!(matches!(hs.handle_option(OPT_EXPORT_NAME, b"disk", &reg, &mut out), Step::Transmit(_)));
    assert_eq!(out.len(), 10);
    out.clear();
    assert!(matches!(hs.handle_option(OPT_EXPORT_NAME, b"missing", &reg, &mut out), Step::Close));
    assert!(out.is_empty());
}

#[test]
fn meta_contexts_need_structured_replies_and_select_base_allocation() {
    let reg = registry();
    let mut hs = Handshake::new();
    let mut out = BytesMut::new();
    let set = meta_payload("disk", &["base:allocation", "qemu:dirty-bitmap:x", "nope:"]);
    hs.handle_option(OPT_SET_META_CONTEXT, &set, &reg, &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    out.clear();
    hs.handle_option(OPT_EXTENDED_HEADERS, &[], &reg, &mut out);
    hs.handle_option(OPT_STRUCTURED_REPLY, &[], &reg, &mut out);
    let r = replies(&out);
    assert_eq!(r[0].1, REP_ACK);
    assert_eq!(r[1].1, REP_ERR_EXT_HEADER_REQD);
    out.clear();
    hs.handle_option(OPT_LIST_META_CONTEXT, &meta_payload("disk", &[]), &reg, &mut out);
    let r = replies(&out);
    assert_eq!(r[0].1, REP_META_CONTEXT);
    assert_eq!(&r[0].2[4..], b"base:allocation");
    out.clear();
    hs.handle_option(OPT_SET_META_CONTEXT, &set, &reg, &mut out);
    let r = replies(&out);
    assert_eq!(r.len(), 2);
    assert_eq!(u32::from_be_bytes(r[0].2[..4].try_into().unwrap()), BASE_ALLOCATION_ID);
    out.clear();
    // Contexts chosen for "disk" do not carry over to "other".
    match hs.handle_option(OPT_GO, &go_payload("other", &[]), &reg, &mut out) {
        Step::Transmit(n) => assert!(!n.base_allocation && n.extended),
        s => panic!("{s:?}"),
    }
    let mut hs2 = Handshake::new();
    hs2.handle_option(OPT_STRUCTURED_REPLY, &[], &reg, &mut out);
    hs2.handle_option(OPT_SET_META_CONTEXT, &set, &reg, &mut out);
    match hs2.handle_option(OPT_GO, &go_payload("disk", &[]), &reg, &mut out) {
        Step::Transmit(n) => assert!(n.base_allocation),
        s => panic!("{s:?}"),
    }
}

#[test]
fn shutdown_refuses_options_but_allows_abort() {
    let reg = registry();
    let mut hs = Handshake::new();
    hs.shutting_down = true;
    let mut out = BytesMut::new();
    hs.handle_option(OPT_GO, &go_payload("disk", &[]), &reg, &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_SHUTDOWN);
    out.clear();
    assert!(matches!(hs.handle_option(OPT_ABORT, &[], &reg, &mut out), Step::Close));
    assert_eq!(replies(&out)[0].1, REP_ACK);
}

fn header(extended: bool, flags: u16, typ: u16, offset: u64, length: u64) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC });
    b.put_u16(flags);
    b.put_u16(typ);
    b.put_u64(0xdead_beef);
    b.put_u64(offset);
    if extended {
        b.put_u64(length);
    } else {
        b.put_u32(length as u32);
    }
    b.to_vec()
}

fn limits(flags: u16) -> Limits {
    Limits { size: 1 << 40, flags, extended: false, base_allocation: true, min_block: 1, max_payload: 32 << 20 }
}

const RW: u16 = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_DF | FLAG_SEND_FAST_ZERO;

fn decode(extended: bool, flags: u16, typ: u16, offset: u64, length: u64, lim: Limits) -> Result<Command, Rejection> {
    let h = parse_request_header(&header(extended, flags, typ, offset, length), extended).unwrap();
    assert_eq!(h.cookie, 0xdead_beef);
    decode_command(&h, &Limits { extended, ..lim })
}

#[test]
fn request_headers_round_trip_compact_and_extended() {
    let h = parse_request_header(&header(false, CMD_FLAG_FUA, CMD_WRITE, 1 << 33, 4096), false).unwrap();
    assert_eq!((h.flags, h.typ, h.offset, h.length), (CMD_FLAG_FUA, CMD_WRITE, 1 << 33, 4096));
    assert_eq!(h.payload_len(false), 4096);
    let h = parse_request_header(&header(true, 0, CMD_TRIM, 3 << 41, 1 << 35), true).unwrap();
    assert_eq!((h.offset, h.length, h.payload_len(true)), (3 << 41, 1 << 35, 0));
    assert_eq!(parse_request_header(&header(true, 0, CMD_READ, 0, 1), false), Err(BadMagic(EXTENDED_REQUEST_MAGIC)));
}

#[test]
fn commands_decode_with_their_flags() {
    let lim = limits(RW);
    assert_eq!(decode(false, CMD_FLAG_DF, CMD_READ, 0, 512, lim), Ok(Command::Read { offset: 0, len: 512, df: true }));
    assert_eq!(decode(false, CMD_FLAG_FUA, CMD_WRITE, 512, 512, lim), Ok(Command::Write { offset: 512, len: 512, fua: true }));
    assert_eq!(
        decode(false, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 0, 1 << 30, lim),
        Ok(Command::WriteZeroes { offset: 0, len: 1 << 30, flags: ZeroFlags { may_trim: false, fast: true, fua: false } })
    );
    assert_eq!(decode(false, CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 0, 1 << 20, lim), Ok(Command::BlockStatus { offset: 0, len: 1 << 20, req_one: true }));
    assert_eq!(decode(true, CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 0, 4096, lim), Ok(Command::Write { offset: 0, len: 4096, fua: false }));
    // qemu omits PAYLOAD_LEN on extended writes; the payload is still there.
    assert_eq!(decode(true, 0, CMD_WRITE, 0, 4096, lim), Ok(Command::Write { offset: 0, len: 4096, fua: false }));
    let h = parse_request_header(&header(true, 0, CMD_WRITE, 0, 4096), true).unwrap();
    assert_eq!(h.payload_len(true), 4096);
    assert_eq!(decode(true, 0, CMD_TRIM, 0, 1 << 36, lim), Ok(Command::Trim { offset: 0, len: 1 << 36, fua: false }));
    assert_eq!(decode(false, 0, CMD_DISC, 0, 0, lim), Ok(Command::Disconnect));
}

#[test]
fn bad_requests_get_the_right_errno() {
    let lim = limits(RW);
    let size = lim.size;
    let errno = |r: Result<Command, Rejection>| r.unwrap_err().errno;
    assert_eq!(errno(decode(false, 0, CMD_READ, size - 511, 512, lim)), EINVAL);
    assert_eq!(errno(decode(false, 0, CMD_WRITE, size, 1, lim)), ENOSPC);
    assert_eq!(errno(decode(false, 0, CMD_WRITE_ZEROES, size - 1, 2, lim)), ENOSPC);
    assert_eq!(errno(decode(false, 0, CMD_TRIM, u64::MAX, 2, lim)), EINVAL);
    assert_eq!(errno(decode(false, 0, 42, 0, 0, lim)), EINVAL);
    assert_eq!(errno(decode(false, CMD_FLAG_REQ_ONE, CMD_READ, 0, 1, lim)), EINVAL);
    assert_eq!(errno(decode(false, 1 << 9, CMD_FLUSH, 0, 0, lim)), EINVAL);
    assert_eq!(errno(decode(false, 0, CMD_WRITE, 0, (32 << 20) + 1, lim)), EINVAL);
    assert_eq!(errno(decode(false, 0, CMD_READ, 0, (32 << 20) + 1, lim)), EOVERFLOW);
    assert_eq!(errno(decode(true, CMD_FLAG_PAYLOAD_LEN, CMD_FLUSH, 0, 8, lim)), EINVAL);
    let ro = limits(FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_FUA);
    assert_eq!(errno(decode(false, 0, CMD_WRITE, 0, 512, ro)), EPERM);
    assert_eq!(errno(decode(false, 0, CMD_TRIM, 0, 512, ro)), EPERM);
    assert_eq!(errno(decode(false, 0, CMD_WRITE_ZEROES, 0, 512, ro)), EPERM);
    let no_meta = Limits { base_allocation: false, ..lim };
    assert_eq!(errno(decode(false, 0, CMD_BLOCK_STATUS, 0, 512, no_meta)), EINVAL);
    let aligned = Limits { min_block: 512, ..lim };
    assert_eq!(errno(decode(false, 0, CMD_READ, 1, 512, aligned)), EINVAL);
}

#[test]
fn reply_encodings_have_the_right_shapes() {
    let mut out = BytesMut::new();
    ReplyStyle::Simple.error(&mut out, 7, 0, EINVAL, "ignored");
    assert_eq!(out.len(), 16);
    out.clear();
    ReplyStyle::Structured.error(&mut out, 7, 0, EIO, "boom");
    assert_eq!(out.len(), 20 + 6 + 4);
    assert_eq!(u16::from_be_bytes([out[6], out[7]]), REPLY_TYPE_ERROR);
    out.clear();
    ReplyStyle::Extended.ok(&mut out, 7, 99);
    assert_eq!(out.len(), 32);
    assert_eq!(u64::from_be_bytes(out[16..24].try_into().unwrap()), 99);
    out.clear();
    ReplyStyle::Extended.block_status(&mut out, 7, 0, 1, &[(1 << 33, STATE_HOLE | STATE_ZERO), (4096, 0)]);
    assert_eq!(out.len(), 32 + 8 + 32);
    assert_eq!(u32::from_be_bytes(out[36..40].try_into().unwrap()), 2);
    assert_eq!(u64::from_be_bytes(out[40..48].try_into().unwrap()), 1 << 33);
}

#[test]
fn decoder_waits_for_whole_requests_and_splits_payloads() {
    let lim = limits(RW);
    let mut d = RequestDecoder::new(false);
    let mut wire = header(false, 0, CMD_WRITE, 4096, 8);
    wire.extend_from_slice(b"abcdefgh");
    wire.extend_from_slice(&header(false, 0, CMD_FLUSH, 0, 0));
    let mut buf = BytesMut::new();
    // Fed one byte at a time, nothing comes out early.
    let mut got = Vec::new();
    for b in wire {
        buf.put_u8(b);
        while let Some(x) = d.decode(&mut buf, &lim, None).unwrap() {
            got.push(x);
        }
    }
    assert_eq!(got.len(), 2);
    match &got[0] {
        Decoded::Command { command: Command::Write { offset: 4096, len: 8, .. }, payload, .. } => assert_eq!(&payload[..], b"abcdefgh"),
        x => panic!("{x:?}"),
    }
    assert!(matches!(got[1], Decoded::Command { command: Command::Flush, .. }));
    assert!(d.is_idle(buf.len()));
}

#[test]
fn decoder_skips_refused_payloads_and_keeps_framing() {
    let lim = limits(RW);
    let mut d = RequestDecoder::new(false);
    // A write past the end with a 1 MiB payload, then a read.
    let mut wire = header(false, 0, CMD_WRITE, lim.size, 1 << 20);
    wire.extend(std::iter::repeat_n(0x25u8, 1 << 20));
    wire.extend_from_slice(&header(false, 0, CMD_READ, 0, 512));
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for chunk in wire.chunks(7000) {
        buf.extend_from_slice(chunk);
        while let Some(x) = d.decode(&mut buf, &lim, None).unwrap() {
            got.push(x);
        }
        // Refused payload bytes are dropped as they arrive, never buffered.
        assert!(buf.len() < 7000 + 32);
    }
    assert!(matches!(&got[0], Decoded::Refused { rejection, .. } if rejection.errno == ENOSPC));
    assert!(matches!(got[1], Decoded::Command { command: Command::Read { offset: 0, len: 512, .. }, .. }));
}

#[test]
fn decoder_refuses_everything_at_shutdown_and_rejects_bad_framing() {
    let lim = limits(RW);
    let mut d = RequestDecoder::new(true);
    let refusal = Rejection { errno: ESHUTDOWN, message: "bye".into() };
    let mut buf = BytesMut::from(&header(true, 0, CMD_READ, 0, 512)[..]);
    assert!(matches!(d.decode(&mut buf, &lim, Some(&refusal)).unwrap(), Some(Decoded::Refused { rejection, .. }) if rejection.errno == ESHUTDOWN));
    // An extended non-write claiming a 5 GiB payload cannot be skipped.
    let mut buf = BytesMut::from(&header(true, CMD_FLAG_PAYLOAD_LEN, CMD_FLUSH, 0, 5 << 30)[..]);
    assert_eq!(d.decode(&mut buf, &lim, None).unwrap_err(), FramingError::PayloadTooLarge(5 << 30));
    let mut d = RequestDecoder::new(false);
    let mut buf = BytesMut::from(&header(true, 0, CMD_READ, 0, 512)[..]);
    assert!(matches!(d.decode(&mut buf, &lim, None), Err(FramingError::BadMagic(_))));
}

#[test]
fn address_allow_lists_hide_exports() {
    use longwire_core::{AddressPolicy, AllowList};
    let reg = registry();
    // "disk" is for 10.0.0.0/8 only; "other" (and the empty name's
    // default, "disk") follow from that.
    let policy = Arc::new(AddressPolicy::new(
        AllowList::Any,
        [("disk".to_string(), AllowList::parse(&["10.0.0.0/8"]).unwrap())].into(),
    ));
    let listed = |peer: Option<&str>| {
        let mut hs = Handshake::new();
        hs.set_client_address(policy.clone(), peer.map(|p| p.parse().unwrap()));
        let mut out = BytesMut::new();
        hs.handle_option(OPT_LIST, &[], &reg, &mut out);
        replies(&out).iter().filter(|r| r.1 == REP_SERVER).count()
    };
    assert_eq!(listed(Some("10.1.2.3")), 2);
    assert_eq!(listed(Some("::ffff:10.1.2.3")), 2, "IPv4-mapped clients match IPv4 rules");
    assert_eq!(listed(None), 2, "unix-socket clients see everything");
    assert_eq!(listed(Some("192.168.0.1")), 1);

    let mut hs = Handshake::new();
    hs.set_client_address(policy.clone(), Some("192.168.0.1".parse().unwrap()));
    for name in ["disk", ""] {
        for opt in [OPT_INFO, OPT_GO] {
            let mut out = BytesMut::new();
            assert!(matches!(hs.handle_option(opt, &go_payload(name, &[]), &reg, &mut out), Step::Continue));
            let r = replies(&out);
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].1, REP_ERR_UNKNOWN, "{name:?} must look unknown");
            assert_eq!(String::from_utf8_lossy(&r[0].2), format!("no export named {name:?}; NBD_OPT_LIST shows the exports"));
        }
    }
    let mut out = BytesMut::new();
    assert!(matches!(hs.handle_option(OPT_GO, &go_payload("other", &[]), &reg, &mut out), Step::Transmit(_)));
    let mut hs = Handshake::new();
    hs.set_client_address(policy, Some("192.168.0.1".parse().unwrap()));
    let mut out = BytesMut::new();
    assert!(matches!(hs.handle_option(OPT_EXPORT_NAME, b"disk", &reg, &mut out), Step::Close));
    assert!(out.is_empty());
}
