//! Byte-level tests of the client's sans-IO codec: the handshake driven
//! against the server's own sans-IO handshake and against hand-built
//! replies (fallbacks, malformed lengths), request encoding, and reply
//! decoding/assembly for every reply style, including every way a reply
//! can be malformed.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use longwire_core::{Export, ExportRegistry, ReadSegment, Volume, VolumeError};
use longwire_nbd::client::codec::*;
use longwire_nbd::client::negotiate::*;
use longwire_nbd::client::ClientError;
use longwire_nbd::handshake::{self, Handshake, Step};
use longwire_nbd::proto::*;
use longwire_nbd::transmission::{decode_command, parse_request_header, Command, Limits};
use longwire_store::MemoryVolume;

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

fn registry() -> ExportRegistry {
    let mut r = ExportRegistry::new();
    let vol: Arc<dyn Volume> = Arc::new(MemoryVolume::new(4 << 20));
    r.add(Export { name: "disk".into(), description: "a test disk".into(), volume: vol }).unwrap();
    r
}

/// Split option requests out of client output: (option, payload).
fn options(mut b: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut v = Vec::new();
    while !b.is_empty() {
        assert_eq!(b.get_u64(), IHAVEOPT);
        let opt = b.get_u32();
        let len = b.get_u32() as usize;
        v.push((opt, b[..len].to_vec()));
        b.advance(len);
    }
    v
}

/// Run the client negotiation against longwire's sans-IO server handshake.
fn negotiate_with_server(opts: NegotiateOptions) -> (ExportInfo, Vec<u32>) {
    let reg = registry();
    let mut server = Handshake::new();
    let mut client = ClientNegotiation::new(opts);
    let mut to_server = BytesMut::new();
    let mut action = client.greeting(&handshake::greeting(), &mut to_server).unwrap();
    server.client_flags(to_server.get_u32()).unwrap();
    let mut sent = Vec::new();
    loop {
        match action {
            Action::Done(info) => return (*info, sent),
            Action::ReadExportNameReply { .. } => panic!("longwire supports NBD_OPT_GO"),
            Action::StartTls => panic!("TLS was not asked for"),
            Action::ReadOptionReply => {
                let opts = options(&to_server);
                to_server.clear();
                assert_eq!(opts.len(), 1, "one option at a time");
                let (opt, data) = &opts[0];
                sent.push(*opt);
                let mut out = BytesMut::new();
                let step = server.handle_option(*opt, data, &reg, &mut out);
                assert!(!matches!(step, Step::Close));
                // Feed every reply to the client; the last one yields the action.
                let mut replies = &out[..];
                loop {
                    let h: [u8; 20] = replies[..20].try_into().unwrap();
                    let (o, typ, len) = parse_option_reply_header(&h).unwrap();
                    let data = &replies[20..20 + len as usize];
                    replies = &replies[20 + len as usize..];
                    action = client.option_reply(o, typ, data, &mut to_server).unwrap();
                    if replies.is_empty() {
                        break;
                    }
                    assert!(matches!(action, Action::ReadOptionReply));
                }
                if matches!(step, Step::Transmit(_)) {
                    assert!(matches!(action, Action::Done(_)));
                }
            }
        }
    }
}

#[test]
fn negotiates_extended_headers_block_status_and_block_sizes_with_longwire() {
    let (info, sent) = negotiate_with_server(NegotiateOptions::new("disk"));
    assert_eq!(sent, vec![OPT_EXTENDED_HEADERS, OPT_SET_META_CONTEXT, OPT_GO]);
    assert_eq!(info.size, 4 << 20);
    assert_eq!(info.reply_style, ReplyStyle::Extended);
    assert_eq!(info.base_allocation, Some(BASE_ALLOCATION_ID));
    assert!(info.block_size_advertised);
    assert_eq!((info.min_block, info.preferred_block, info.max_payload), (1, 4096, 32 << 20));
    assert_eq!(info.canonical_name.as_deref(), Some("disk"));
    assert_eq!(info.description.as_deref(), Some("a test disk"));
    assert!(info.flags & FLAG_CAN_MULTI_CONN != 0 && !info.used_export_name);
}

#[test]
fn falls_back_to_structured_and_simple_replies_when_asked() {
    let opts = NegotiateOptions { extended_headers: false, ..NegotiateOptions::new("disk") };
    let (info, sent) = negotiate_with_server(opts);
    assert_eq!(sent, vec![OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT, OPT_GO]);
    assert_eq!(info.reply_style, ReplyStyle::Structured);
    assert!(info.base_allocation.is_some());

    let opts = NegotiateOptions { extended_headers: false, structured_replies: false, ..NegotiateOptions::new("") };
    let (info, sent) = negotiate_with_server(opts);
    assert_eq!(sent, vec![OPT_GO], "no metadata context without structured replies");
    assert_eq!(info.reply_style, ReplyStyle::Simple);
    assert_eq!(info.base_allocation, None);
    assert_eq!(info.canonical_name.as_deref(), Some("disk"), "the empty name is the default export");
}

fn greeting(flags: u16) -> Vec<u8> {
    let mut g = Vec::new();
    g.put_u64(NBDMAGIC);
    g.put_u64(IHAVEOPT);
    g.put_u16(flags);
    g
}

/// An old server: refuses every option, so the client ends with EXPORT_NAME.
#[test]
fn falls_back_to_export_name_when_go_is_unsupported() {
    for (flags, zeroes) in [(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 0), (FLAG_FIXED_NEWSTYLE, 124)] {
        let mut c = ClientNegotiation::new(NegotiateOptions::new("disk"));
        let mut out = BytesMut::new();
        let mut a = c.greeting(&greeting(flags), &mut out).unwrap();
        let client_flags = out.get_u32();
        assert_eq!(client_flags & FLAG_C_NO_ZEROES != 0, zeroes == 0);
        let mut seen = Vec::new();
        while let Action::ReadOptionReply = a {
            let (opt, _) = options(&out).pop().unwrap();
            out.clear();
            seen.push(opt);
            a = c.option_reply(opt, REP_ERR_UNSUP, b"unknown option", &mut out).unwrap();
        }
        assert_eq!(seen, vec![OPT_EXTENDED_HEADERS, OPT_STRUCTURED_REPLY, OPT_GO]);
        let Action::ReadExportNameReply { len } = a else { panic!("expected EXPORT_NAME") };
        assert_eq!(len, 10 + zeroes);
        assert_eq!(options(&out), vec![(OPT_EXPORT_NAME, b"disk".to_vec())]);
        let mut reply = Vec::new();
        reply.put_u64(1 << 30);
        reply.put_u16(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH);
        reply.resize(len, 0);
        assert!(c.export_name_reply(&reply[..len - 1]).is_err(), "short EXPORT_NAME reply");
        let info = c.export_name_reply(&reply).unwrap();
        assert!(info.used_export_name);
        assert_eq!((info.size, info.reply_style, info.min_block), (1 << 30, ReplyStyle::Simple, 1));
    }
}

#[test]
fn plain_newstyle_and_oldstyle_servers() {
    let mut c = ClientNegotiation::new(NegotiateOptions::new("x"));
    let mut out = BytesMut::new();
    let a = c.greeting(&greeting(0), &mut out).unwrap();
    assert_eq!(out.get_u32(), 0, "no fixed-newstyle flag back");
    assert!(matches!(a, Action::ReadExportNameReply { len: 134 }));
    assert_eq!(options(&out), vec![(OPT_EXPORT_NAME, b"x".to_vec())]);

    let mut g = Vec::new();
    g.put_u64(NBDMAGIC);
    g.put_u64(0x0000_4202_8186_1253);
    g.put_u16(0);
    let e = ClientNegotiation::new(NegotiateOptions::new("x")).greeting(&g, &mut BytesMut::new()).unwrap_err();
    assert_eq!(e, NegotiationError::Oldstyle);
    let mut bad = greeting(1);
    bad[0] ^= 1;
    assert!(ClientNegotiation::new(NegotiateOptions::new("x")).greeting(&bad, &mut BytesMut::new()).is_err());
}

/// A client that got through EXTENDED_HEADERS and META_CONTEXT, waiting for GO.
fn at_go() -> (ClientNegotiation, BytesMut) {
    let mut c = ClientNegotiation::new(NegotiateOptions::new("disk"));
    let mut out = BytesMut::new();
    c.greeting(&greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES), &mut out).unwrap();
    c.option_reply(OPT_EXTENDED_HEADERS, REP_ACK, &[], &mut out).unwrap();
    let mut ctx = Vec::new();
    ctx.put_u32(7);
    ctx.put_slice(BASE_ALLOCATION.as_bytes());
    c.option_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &ctx, &mut out).unwrap();
    c.option_reply(OPT_SET_META_CONTEXT, REP_ACK, &[], &mut out).unwrap();
    (c, out)
}

fn info(typ: u16, body: &[u8]) -> Vec<u8> {
    let mut d = Vec::new();
    d.put_u16(typ);
    d.put_slice(body);
    d
}

#[test]
fn go_replies_are_checked() {
    let export = |size: u64, flags: u16| {
        let mut b = Vec::new();
        b.put_u64(size);
        b.put_u16(flags);
        info(INFO_EXPORT, &b)
    };
    let block = |min: u32, pref: u32, max: u32| {
        let mut b = Vec::new();
        b.put_u32(min);
        b.put_u32(pref);
        b.put_u32(max);
        info(INFO_BLOCK_SIZE, &b)
    };
    // A good one, with an unknown info type that must be ignored.
    let (mut c, mut out) = at_go();
    c.option_reply(OPT_GO, REP_INFO, &info(99, b"whatever"), &mut out).unwrap();
    c.option_reply(OPT_GO, REP_INFO, &export(1 << 20, FLAG_HAS_FLAGS), &mut out).unwrap();
    c.option_reply(OPT_GO, REP_INFO, &block(512, 4096, 1 << 20), &mut out).unwrap();
    let Action::Done(i) = c.option_reply(OPT_GO, REP_ACK, &[], &mut out).unwrap() else { panic!() };
    assert_eq!((i.min_block, i.max_payload, i.base_allocation), (512, 1 << 20, Some(7)));
    assert_eq!(i.reply_style, ReplyStyle::Extended);

    // Every malformed or missing piece is a protocol error.
    let bad: Vec<Vec<(u32, u32, Vec<u8>)>> = vec![
        vec![(OPT_GO, REP_INFO, export(1, FLAG_HAS_FLAGS)[..11].to_vec())],
        vec![(OPT_GO, REP_INFO, block(3, 4096, 1 << 20))],
        vec![(OPT_GO, REP_INFO, block(1 << 17, 1 << 17, 1 << 20))],
        vec![(OPT_GO, REP_INFO, block(4096, 512, 1 << 20))],
        vec![(OPT_GO, REP_INFO, block(4096, 4096, 512))],
        vec![(OPT_GO, REP_INFO, vec![0])],
        vec![(OPT_GO, REP_ACK, vec![])],
        vec![(OPT_GO, REP_INFO, export(1, 0)), (OPT_GO, REP_ACK, vec![])],
        vec![(OPT_INFO, REP_ACK, vec![])],
        vec![(OPT_GO, REP_SERVER, vec![0, 0, 0, 0])],
    ];
    for (i, replies) in bad.into_iter().enumerate() {
        let (mut c, mut out) = at_go();
        let r = replies.iter().try_for_each(|(o, t, d)| c.option_reply(*o, *t, d, &mut out).map(drop));
        assert!(matches!(r, Err(NegotiationError::Protocol(_))), "case {i}: {r:?}");
    }

    // Refusals carry the server's reason.
    let (mut c, mut out) = at_go();
    let e = c.option_reply(OPT_GO, REP_ERR_UNKNOWN, b"no such export", &mut out).unwrap_err();
    assert!(e.to_string().contains("no export named \"disk\": no such export"), "{e}");
    let (mut c, mut out) = at_go();
    assert!(matches!(c.option_reply(OPT_GO, REP_ERR_SHUTDOWN, b"bye", &mut out), Err(NegotiationError::ShuttingDown(_))));
    let (mut c, mut out) = at_go();
    assert!(matches!(c.option_reply(OPT_GO, REP_ERR_TLS_REQD, b"", &mut out), Err(NegotiationError::TlsRequired(_))));
    // After extended headers were agreed, GO must not be "unsupported".
    let (mut c, mut out) = at_go();
    assert!(matches!(c.option_reply(OPT_GO, REP_ERR_UNSUP, b"", &mut out), Err(NegotiationError::Refused { .. })));
}

#[test]
fn option_reply_headers_are_checked() {
    let mut h = [0u8; 20];
    h[..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    h[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
    h[12..16].copy_from_slice(&REP_INFO.to_be_bytes());
    h[16..20].copy_from_slice(&12u32.to_be_bytes());
    assert_eq!(parse_option_reply_header(&h).unwrap(), (OPT_GO, REP_INFO, 12));
    h[16..20].copy_from_slice(&(MAX_OPTION_REPLY + 1).to_be_bytes());
    assert!(parse_option_reply_header(&h).is_err(), "oversized reply");
    h[16..20].copy_from_slice(&0u32.to_be_bytes());
    h[0] ^= 0xff;
    assert!(parse_option_reply_header(&h).is_err(), "bad magic");
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

#[test]
fn requests_encode_in_both_header_styles_and_the_server_parses_them() {
    let write = RequestHeader { typ: CMD_WRITE, flags: CMD_FLAG_FUA, offset: 4096, length: 512 };
    for extended in [false, true] {
        let mut b = BytesMut::new();
        encode_request(&mut b, extended, 0xabc, &write).unwrap();
        assert_eq!(b.len(), if extended { 32 } else { 28 });
        let h = parse_request_header(&b, extended).unwrap();
        assert_eq!((h.cookie, h.offset, h.length, h.typ), (0xabc, 4096, 512, CMD_WRITE));
        assert_eq!(h.flags & CMD_FLAG_PAYLOAD_LEN != 0, extended, "extended writes carry PAYLOAD_LEN");
        let lim = Limits { size: 1 << 20, flags: FLAG_SEND_FUA, extended, base_allocation: false, min_block: 1, max_payload: 1 << 20 };
        assert_eq!(decode_command(&h, &lim), Ok(Command::Write { offset: 4096, len: 512, fua: true }));
    }
    // 64-bit effect lengths only fit extended headers.
    let trim = RequestHeader { typ: CMD_TRIM, flags: 0, offset: 0, length: 1 << 33 };
    assert!(encode_request(&mut BytesMut::new(), false, 1, &trim).is_err());
    let mut b = BytesMut::new();
    encode_request(&mut b, true, 1, &trim).unwrap();
    assert_eq!(parse_request_header(&b, true).unwrap().length, 1 << 33);
}

// ---------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------

fn decode_all(style: ReplyStyle, bytes: &[u8], framing: SimpleFraming) -> Result<Vec<Reply>, ProtocolError> {
    let mut d = ReplyDecoder::new(style, 1 << 20);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    // Byte by byte: every partial state must wait, not misparse.
    for &b in bytes {
        buf.put_u8(b);
        while let Some(r) = d.decode(&mut buf, |_| framing)? {
            out.push(r);
        }
    }
    assert!(d.is_idle(buf.len()), "bytes left over");
    Ok(out)
}

fn assemble(expect: Expect, replies: Vec<Reply>) -> Result<Result<Completed, ServerError>, ProtocolError> {
    let mut a = ReplyAssembly::new(expect);
    for r in replies {
        a.add(r)?;
    }
    a.finish()
}

#[test]
fn simple_replies_frame_read_data_by_the_request() {
    let mut b = BytesMut::new();
    ReplyStyle::simple(&mut b, 5, 0);
    b.put_slice(b"abcdefgh");
    ReplyStyle::simple(&mut b, 6, EIO);
    let replies = decode_all(ReplyStyle::Simple, &b, SimpleFraming::Payload(8)).unwrap();
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[0].chunk, Chunk::Simple { errno: 0, data: Bytes::from_static(b"abcdefgh") });
    assert_eq!(replies[1].chunk, Chunk::Simple { errno: EIO, data: Bytes::new() }, "an error carries no data");
    let r = assemble(Expect::Read { offset: 0, len: 8 }, vec![replies[0].clone()]).unwrap().unwrap();
    assert_eq!(r, Completed::Read(vec![ReadSegment::Data(Bytes::from_static(b"abcdefgh"))]));
    let r = assemble(Expect::Read { offset: 0, len: 8 }, vec![replies[1].clone()]).unwrap();
    assert_eq!(r, Err(ServerError { errno: EIO, message: String::new() }));

    // Unknown cookie; a successful simple read reply once structured replies are on.
    let mut b = BytesMut::new();
    ReplyStyle::simple(&mut b, 1, 0);
    assert!(decode_all(ReplyStyle::Simple, &b, SimpleFraming::Unknown).is_err());
    assert!(decode_all(ReplyStyle::Structured, &b, SimpleFraming::Payload(8)).is_err());
    assert!(decode_all(ReplyStyle::Extended, &b, SimpleFraming::Payload(0)).is_err(), "no simple replies with extended headers");
    // …but a payload-less one is fine with structured replies.
    assert_eq!(decode_all(ReplyStyle::Structured, &b, SimpleFraming::Payload(0)).unwrap().len(), 1);
}

/// A sparse read as longwire's server encodes it, chunks out of order,
/// comes back as data and holes in order.
#[test]
fn structured_and_extended_reads_assemble_data_and_holes() {
    for style in [ReplyStyle::Structured, ReplyStyle::Extended] {
        let mut b = BytesMut::new();
        style.offset_hole(&mut b, 9, 1000, 1004, 4, false);
        style.offset_data(&mut b, 9, 1000, 1000, 4, false);
        b.put_slice(b"head");
        style.offset_data(&mut b, 9, 1000, 1008, 2, true);
        b.put_slice(b"zz");
        let replies = decode_all(style, &b, SimpleFraming::Unknown).unwrap();
        assert_eq!(replies.len(), 3);
        let r = assemble(Expect::Read { offset: 1000, len: 10 }, replies).unwrap().unwrap();
        let Completed::Read(segs) = r else { panic!() };
        assert_eq!(
            segs,
            vec![ReadSegment::Data(Bytes::from_static(b"head")), ReadSegment::Zero(4), ReadSegment::Data(Bytes::from_static(b"zz"))]
        );
        assert_eq!(&segments_to_bytes(segs, 10)[..], b"head\0\0\0\0zz");
    }
}

fn chunk(style: ReplyStyle, flags: u16, typ: u16, cookie: u64, req_offset: u64, payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    style.chunk_header(&mut b, flags, typ, cookie, req_offset, payload.len() as u64);
    b.put_slice(payload);
    b
}

#[test]
fn malformed_chunks_are_protocol_errors() {
    let s = ReplyStyle::Structured;
    let done = REPLY_FLAG_DONE;
    let hole = |len: u32| {
        let mut p = Vec::new();
        p.put_u64(0);
        p.put_u32(len);
        p
    };
    let cases: Vec<(&str, ReplyStyle, BytesMut)> = vec![
        ("NONE with payload", s, chunk(s, done, REPLY_TYPE_NONE, 1, 0, b"x")),
        ("NONE without DONE", s, chunk(s, 0, REPLY_TYPE_NONE, 1, 0, b"")),
        ("OFFSET_DATA shorter than 9", s, chunk(s, done, REPLY_TYPE_OFFSET_DATA, 1, 0, &[0; 8])),
        ("OFFSET_HOLE of 11 bytes", s, chunk(s, done, REPLY_TYPE_OFFSET_HOLE, 1, 0, &hole(1)[..11])),
        ("OFFSET_HOLE of zero size", s, chunk(s, done, REPLY_TYPE_OFFSET_HOLE, 1, 0, &hole(0))),
        ("BLOCK_STATUS of 4+7 bytes", s, chunk(s, done, REPLY_TYPE_BLOCK_STATUS, 1, 0, &[0; 11])),
        ("BLOCK_STATUS without descriptors", s, chunk(s, done, REPLY_TYPE_BLOCK_STATUS, 1, 0, &[0; 4])),
        ("BLOCK_STATUS descriptor of length 0", s, chunk(s, done, REPLY_TYPE_BLOCK_STATUS, 1, 0, &[0; 12])),
        ("BLOCK_STATUS_EXT without extended headers", s, chunk(s, done, REPLY_TYPE_BLOCK_STATUS_EXT, 1, 0, &[0; 24])),
        ("ERROR shorter than 6", s, chunk(s, done, REPLY_TYPE_ERROR, 1, 0, &[0, 0, 0, 5, 0])),
        ("ERROR message longer than the chunk", s, chunk(s, done, REPLY_TYPE_ERROR, 1, 0, &[0, 0, 0, 5, 0, 9, b'a'])),
        ("ERROR with errno 0", s, chunk(s, done, REPLY_TYPE_ERROR, 1, 0, &[0, 0, 0, 0, 0, 0])),
        ("ERROR_OFFSET shorter than 14", s, chunk(s, done, REPLY_TYPE_ERROR_OFFSET, 1, 0, &[0, 0, 0, 5, 0, 0, 0])),
        ("unknown chunk type", s, chunk(s, done, 77, 1, 0, b"")),
        ("bad magic", s, BytesMut::from(&[0x12u8, 0x34, 0x56, 0x78, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..])),
        ("structured chunk with extended headers", ReplyStyle::Extended, chunk(s, done, REPLY_TYPE_NONE, 1, 0, b"")),
        ("extended chunk with structured replies", s, chunk(ReplyStyle::Extended, done, REPLY_TYPE_NONE, 1, 0, b"")),
        ("BLOCK_STATUS with extended headers", ReplyStyle::Extended, chunk(ReplyStyle::Extended, done, REPLY_TYPE_BLOCK_STATUS, 1, 0, &[0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0])),
        ("BLOCK_STATUS_EXT with a wrong count", ReplyStyle::Extended, {
            let mut p = Vec::new();
            p.put_u32(1);
            p.put_u32(2);
            p.put_u64(512);
            p.put_u64(0);
            chunk(ReplyStyle::Extended, done, REPLY_TYPE_BLOCK_STATUS_EXT, 1, 0, &p)
        }),
    ];
    for (what, style, bytes) in cases {
        assert!(decode_all(style, &bytes, SimpleFraming::Unknown).is_err(), "{what} must be rejected");
    }
    // A chunk claiming a huge payload is refused from its header alone.
    let mut b = BytesMut::new();
    ReplyStyle::Extended.chunk_header(&mut b, done, REPLY_TYPE_OFFSET_DATA, 1, 0, 1 << 40);
    let mut d = ReplyDecoder::new(ReplyStyle::Extended, 1 << 20);
    assert!(d.decode(&mut b, |_| SimpleFraming::Unknown).is_err());
    // An unknown *error* type is an error for the request, not for the stream.
    let r = decode_all(s, &chunk(s, done, 0x8123, 1, 0, &[0, 0, 0, 5, 0, 2, b'h', b'i', 9, 9]), SimpleFraming::Unknown).unwrap();
    assert_eq!(r[0].chunk, Chunk::Error { errno: 5, message: "hi".into(), offset: None });
}

#[test]
fn reply_contents_must_match_the_request() {
    let s = ReplyStyle::Structured;
    let read = Expect::Read { offset: 100, len: 10 };
    let data = |off: u64, bytes: &[u8], done: bool| {
        let mut b = BytesMut::new();
        s.offset_data(&mut b, 1, 100, off, bytes.len() as u64, done);
        b.put_slice(bytes);
        decode_all(s, &b, SimpleFraming::Unknown).unwrap().remove(0)
    };
    let none = decode_all(s, &chunk(s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, 0, b""), SimpleFraming::Unknown).unwrap().remove(0);
    // Outside the request, overlapping, and short coverage.
    assert!(ReplyAssembly::new(read).add(data(95, b"0123456789", true)).is_err());
    assert!(ReplyAssembly::new(read).add(data(105, b"0123456789", true)).is_err());
    let mut a = ReplyAssembly::new(read);
    a.add(data(100, b"01234", false)).unwrap();
    assert!(a.add(data(104, b"45", false)).is_err(), "overlap");
    assert!(assemble(read, vec![data(100, b"01234", false), none.clone()]).is_err(), "5 of 10 bytes covered");
    assert!(assemble(read, vec![data(100, b"0123456789", true), none.clone()]).is_err(), "chunk after DONE");
    // Data for a request that is not a read.
    assert!(assemble(Expect::Plain { offset: 0 }, vec![data(100, b"0123456789", true)]).is_err());
    // An error chunk wins over content, and its message is kept.
    let mut b = BytesMut::new();
    s.error(&mut b, 1, 100, EIO, "disk on fire");
    let err = decode_all(s, &b, SimpleFraming::Unknown).unwrap().remove(0);
    let r = assemble(read, vec![data(100, b"01234", false), err]).unwrap();
    assert_eq!(r, Err(ServerError { errno: EIO, message: "disk on fire".into() }));

    // Extended replies must echo the request offset.
    let e = ReplyStyle::Extended;
    let mut b = BytesMut::new();
    e.ok(&mut b, 1, 4096);
    let ok = decode_all(e, &b, SimpleFraming::Unknown).unwrap().remove(0);
    assert!(assemble(Expect::Plain { offset: 4096 }, vec![ok.clone()]).unwrap().is_ok());
    assert!(assemble(Expect::Plain { offset: 0 }, vec![ok]).is_err());
}

#[test]
fn block_status_is_collected_for_our_context_and_clipped() {
    for style in [ReplyStyle::Structured, ReplyStyle::Extended] {
        let mut b = BytesMut::new();
        style.block_status(&mut b, 3, 0, 9, &[(100, 0)]); // another context: ignored
        let mut other = decode_all(style, &b, SimpleFraming::Unknown).unwrap().remove(0);
        other.done = false;
        let mut b = BytesMut::new();
        style.block_status(&mut b, 3, 0, 1, &[(4096, STATE_HOLE | STATE_ZERO), (1 << 20, 0)]);
        let ours = decode_all(style, &b, SimpleFraming::Unknown).unwrap().remove(0);
        let expect = Expect::BlockStatus { offset: 0, len: 8192, context: 1 };
        let r = assemble(expect, vec![other.clone(), ours.clone()]).unwrap().unwrap();
        assert_eq!(r, Completed::Extents(vec![(4096, STATE_HOLE | STATE_ZERO), (4096, 0)]), "the last run is clipped");
        assert!(assemble(expect, vec![other.clone(), ours.clone()]).is_ok());
        // No chunk for our context on success.
        let mut b = BytesMut::new();
        style.ok(&mut b, 3, 0);
        let none = decode_all(style, &b, SimpleFraming::Unknown).unwrap().remove(0);
        assert!(assemble(expect, vec![other, none]).is_err());
        // Descriptors past the request (other than the last) are a violation.
        let mut b = BytesMut::new();
        style.block_status(&mut b, 3, 0, 1, &[(8192, 0), (512, 0)]);
        let long = decode_all(style, &b, SimpleFraming::Unknown).unwrap().remove(0);
        assert!(assemble(expect, vec![long]).is_err());
    }
}

#[test]
fn server_errors_map_to_volume_errors() {
    let server = |errno: u32| ClientError::Server { request: "NBD_CMD_WRITE of 1 bytes at offset 0".into(), errno, message: "why".into() };
    assert!(matches!(VolumeError::from(server(EPERM)), VolumeError::ReadOnly));
    assert!(matches!(VolumeError::from(server(ENOSPC)), VolumeError::NoSpace(m) if m == "why"));
    assert!(matches!(VolumeError::from(server(EINVAL)), VolumeError::Invalid(_)));
    assert!(matches!(VolumeError::from(server(ENOTSUP)), VolumeError::NotSupported(_)));
    assert!(matches!(VolumeError::from(server(EOVERFLOW)), VolumeError::Overflow(_)));
    assert!(matches!(VolumeError::from(server(ESHUTDOWN)), VolumeError::Shutdown));
    match VolumeError::from(server(EIO)) {
        VolumeError::Io(e) => assert_eq!(e.to_string(), "why"),
        other => panic!("{other}"),
    }
    let e = server(ENOMEM);
    assert_eq!(e.to_string(), "NBD_CMD_WRITE of 1 bytes at offset 0 failed on the server: NBD_ENOMEM (why)");
    assert!(matches!(VolumeError::from(e), VolumeError::Io(_)));
}

/// STARTTLS comes first when TLS is asked for; the machine stops for the
/// TLS handshake and carries on with the usual options afterwards.
#[test]
fn starttls_comes_first_and_pauses_for_the_tls_handshake() {
    let mut c = ClientNegotiation::new(NegotiateOptions { tls: true, ..NegotiateOptions::new("disk") });
    let mut out = BytesMut::new();
    let a = c.greeting(&greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES), &mut out).unwrap();
    assert!(matches!(a, Action::ReadOptionReply));
    assert_eq!(options(&out[4..]), vec![(OPT_STARTTLS, vec![])]);
    out.clear();
    // Nothing but STARTTLS before TLS is up.
    assert!(c.tls_established(&mut out).is_err());
    let a = c.option_reply(OPT_STARTTLS, REP_ACK, &[], &mut out).unwrap();
    assert!(matches!(a, Action::StartTls) && out.is_empty());
    let a = c.tls_established(&mut out).unwrap();
    assert!(matches!(a, Action::ReadOptionReply));
    assert_eq!(options(&out).iter().map(|o| o.0).collect::<Vec<_>>(), vec![OPT_EXTENDED_HEADERS]);
}

#[test]
fn a_server_refusing_starttls_or_requiring_it_is_reported() {
    for typ in [REP_ERR_POLICY, REP_ERR_UNSUP] {
        let mut c = ClientNegotiation::new(NegotiateOptions { tls: true, ..NegotiateOptions::new("disk") });
        let mut out = BytesMut::new();
        c.greeting(&greeting(FLAG_FIXED_NEWSTYLE), &mut out).unwrap();
        let e = c.option_reply(OPT_STARTTLS, typ, b"TLS is off", &mut out).unwrap_err();
        assert_eq!(e, NegotiationError::TlsRefused("TLS is off".into()));
        assert!(e.to_string().contains("server refused TLS"), "{e}");
    }
    // Not fixed newstyle: no STARTTLS possible.
    let mut c = ClientNegotiation::new(NegotiateOptions { tls: true, ..NegotiateOptions::new("disk") });
    let e = c.greeting(&greeting(0), &mut BytesMut::new()).unwrap_err();
    assert!(matches!(e, NegotiationError::TlsRefused(_)), "{e}");
    // A plaintext client at a TLS-only server stops at the first refusal.
    let mut c = ClientNegotiation::new(NegotiateOptions::new("disk"));
    let mut out = BytesMut::new();
    c.greeting(&greeting(FLAG_FIXED_NEWSTYLE), &mut out).unwrap();
    let e = c.option_reply(OPT_EXTENDED_HEADERS, REP_ERR_TLS_REQD, b"TLS required", &mut out).unwrap_err();
    assert_eq!(e, NegotiationError::TlsRequired("TLS required".into()));
}
