// Shared NBD fuzz harnesses.
//
// This file is compiled twice, through identical code: by the cargo-fuzz
// crate (fuzz/src/lib.rs, used by fuzz/fuzz_targets/*.rs) and by the
// stable-Rust replay test crates/longwire-nbd/tests/fuzz_corpus.rs, which
// `include!`s it. Keep it free of inner attributes and crate-level items
// and refer to everything by full path.

/// Export registry the handshake harness negotiates against.
pub fn nbd_fuzz_registry() -> longwire_core::ExportRegistry {
    use std::sync::Arc;
    let mut r = longwire_core::ExportRegistry::new();
    let vol: Arc<dyn longwire_core::Volume> = Arc::new(longwire_store::MemoryVolume::new(1 << 20));
    r.add(longwire_core::Export { name: "disk".into(), description: "a fuzz disk".into(), volume: vol.clone() })
        .unwrap();
    // The default export, if the registry accepts an empty name.
    let _ = r.add(longwire_core::Export { name: "".into(), description: String::new(), volume: vol });
    r
}

/// `nbd_handshake`: byte 0 selects the session setup (bit 0: client sends
/// NO_ZEROES, bit 1: server shutting down); the rest is a sequence of
/// options, each a 4-byte option number, a 4-byte length (clamped to what
/// is left and to MAX_OPTION_LEN) and the data. Everything is fed to one
/// `Handshake` until it answers Close or Transmit.
pub fn nbd_handshake(data: &[u8]) {
    use longwire_nbd::handshake::{Handshake, Step, MAX_OPTION_LEN};
    use longwire_nbd::proto::*;
    let registry = nbd_fuzz_registry();
    let Some((&setup, mut rest)) = data.split_first() else { return };
    let mut hs = Handshake::new();
    let cflags = FLAG_C_FIXED_NEWSTYLE | if setup & 1 != 0 { FLAG_C_NO_ZEROES } else { 0 };
    hs.client_flags(cflags).expect("valid client flags refused");
    hs.shutting_down = setup & 2 != 0;
    let mut out = bytes::BytesMut::new();
    while rest.len() >= 8 {
        let opt = u32::from_be_bytes(rest[0..4].try_into().unwrap());
        let len = u32::from_be_bytes(rest[4..8].try_into().unwrap());
        rest = &rest[8..];
        // Round-trip the header through the public header parser too.
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        h[8..12].copy_from_slice(&opt.to_be_bytes());
        h[12..].copy_from_slice(&len.to_be_bytes());
        let parsed = longwire_nbd::handshake::parse_option_header(&h);
        assert_eq!(parsed.is_ok(), len <= MAX_OPTION_LEN, "option header {opt}/{len}: {parsed:?}");
        let len = (len.min(MAX_OPTION_LEN) as usize).min(rest.len());
        let (payload, tail) = rest.split_at(len);
        rest = tail;
        out.clear();
        let step = hs.handle_option(opt, payload, &registry, &mut out);
        if opt != OPT_EXPORT_NAME {
            nbd_check_option_replies(opt, &out);
        }
        match step {
            Step::Continue => {}
            Step::StartTls => hs.tls_established(None),
            Step::Close | Step::Transmit(_) => return,
        }
    }
}

/// Every byte the server writes during option haggling (other than the
/// EXPORT_NAME answer) must be well-framed option replies to `opt`.
fn nbd_check_option_replies(opt: u32, mut out: &[u8]) {
    use longwire_nbd::proto::OPT_REPLY_MAGIC;
    while !out.is_empty() {
        assert!(out.len() >= 20, "truncated option reply header ({} bytes) to option {opt}", out.len());
        assert_eq!(u64::from_be_bytes(out[..8].try_into().unwrap()), OPT_REPLY_MAGIC, "bad reply magic");
        let ropt = u32::from_be_bytes(out[8..12].try_into().unwrap());
        assert_eq!(ropt, opt, "reply names option {ropt}, request was {opt}");
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert!(out.len() >= 20 + len, "option reply claims {len} bytes, {} present", out.len() - 20);
        out = &out[20 + len..];
    }
}

/// `nbd_requests`: byte 0 selects the limits (read-only, structured,
/// base:allocation, min block size, payload limit); the rest is fed in
/// variable-sized chunks (the chunk size is taken from the stream itself)
/// to a `RequestDecoder`, in compact mode and then in extended mode.
pub fn nbd_requests(data: &[u8]) {
    let Some((&setup, stream)) = data.split_first() else { return };
    for extended in [false, true] {
        nbd_requests_mode(setup, stream, extended);
    }
}

fn nbd_requests_mode(setup: u8, stream: &[u8], extended: bool) {
    use longwire_nbd::transmission::{Command, Decoded, Limits, RequestDecoder};
    let caps = longwire_core::Capabilities {
        read_only: setup & 1 != 0,
        ..longwire_core::Capabilities::default()
    };
    let structured = extended || setup & 2 != 0;
    let limits = Limits {
        size: 1 << 20,
        flags: longwire_nbd::handshake::transmission_flags(&caps, structured),
        extended,
        base_allocation: setup & 4 != 0,
        min_block: if setup & 8 != 0 { 512 } else { 1 },
        max_payload: if setup & 16 != 0 { 1 << 20 } else { 64 * 1024 },
    };
    let refuse = longwire_nbd::transmission::Rejection { errno: longwire_nbd::proto::ESHUTDOWN, message: "shutting down".into() };
    let mut dec = RequestDecoder::new(extended);
    let mut buf = bytes::BytesMut::new();
    let mut fed: usize = 0;
    let mut payload_out: usize = 0;
    let mut pos = 0;
    let mut round = 0usize;
    while pos < stream.len() {
        // Chunk sizes 1..=64 from the stream (varies header splits).
        let n = ((stream[pos] as usize) % 64 + 1).min(stream.len() - pos);
        let chunk = &stream[pos..pos + n];
        pos += n;
        fed += chunk.len();
        buf.extend_from_slice(chunk);
        round += 1;
        loop {
            let before = buf.len();
            let refusing = setup & 32 != 0 && round.is_multiple_of(7);
            match dec.decode(&mut buf, &limits, if refusing { Some(&refuse) } else { None }) {
                Ok(Some(Decoded::Command { command, payload, .. })) => {
                    payload_out += payload.len();
                    match command {
                        Command::Write { len, .. } => {
                            assert_eq!(payload.len() as u64, len, "write payload length mismatch")
                        }
                        _ => assert!(payload.is_empty(), "non-write command with payload"),
                    }
                    assert!(payload_out <= fed, "decoder returned {payload_out} payload bytes from {fed} input bytes");
                }
                Ok(Some(Decoded::Refused { .. })) => {}
                Ok(None) => {
                    assert!(buf.len() <= before, "decoder grew the buffer contents");
                    break;
                }
                Err(_) => return,
            }
        }
        let _ = dec.wanted(buf.len());
        let _ = dec.is_idle(buf.len());
    }
}

/// `nbd_client_replies`: byte 0 selects the reply style (simple,
/// structured, extended); the rest is a server byte stream fed in chunks
/// to the client's `ReplyDecoder`, and every decoded reply is checked by a
/// `ReplyAssembly` whose expectation is derived from the cookie.
pub fn nbd_client_replies(data: &[u8]) {
    use longwire_nbd::client::codec::{Expect, ReplyAssembly, ReplyDecoder, ReplyStyle};
    use std::collections::HashMap;
    let Some((&setup, stream)) = data.split_first() else { return };
    let style = match setup % 3 {
        0 => ReplyStyle::Simple,
        1 => ReplyStyle::Structured,
        _ => ReplyStyle::Extended,
    };
    fn expect_for(cookie: u64) -> Expect {
        let len = (cookie >> 8) & 0xffff;
        match cookie & 3 {
            0 => Expect::Read { offset: 0, len },
            1 => Expect::BlockStatus { offset: 0, len: len.max(1), context: 1 },
            2 => Expect::Plain { offset: 0 },
            _ => Expect::Read { offset: 4096, len },
        }
    }
    let mut dec = ReplyDecoder::new(style, 64 * 1024);
    let mut buf = bytes::BytesMut::new();
    let mut asm: HashMap<u64, ReplyAssembly> = HashMap::new();
    let chunk = (setup as usize >> 2) % 48 + 1;
    let mut fed = 0usize;
    let mut got = 0usize;
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        fed += piece.len();
        loop {
            let framing = |cookie: u64| {
                if cookie >> 63 != 0 {
                    longwire_nbd::client::codec::SimpleFraming::Unknown
                } else {
                    expect_for(cookie).simple_framing()
                }
            };
            match dec.decode(&mut buf, framing) {
                Ok(Some(reply)) => {
                    got += match &reply.chunk {
                        longwire_nbd::client::codec::Chunk::Simple { data, .. } => data.len(),
                        longwire_nbd::client::codec::Chunk::OffsetData { data, .. } => data.len(),
                        _ => 0,
                    };
                    assert!(got <= fed, "decoder returned {got} data bytes from {fed} input bytes");
                    let cookie = reply.cookie;
                    if asm.len() > 64 && !asm.contains_key(&cookie) {
                        continue;
                    }
                    let a = asm.entry(cookie).or_insert_with(|| ReplyAssembly::new(expect_for(cookie)));
                    match a.add(reply) {
                        Ok(true) => {
                            let a = asm.remove(&cookie).unwrap();
                            let _ = a.finish();
                        }
                        Ok(false) => {}
                        Err(_) => {
                            asm.remove(&cookie);
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        let _ = dec.wanted(buf.len());
    }
}
