//! Byte-level NBD handshake tests: the real `longwire serve` binary driven
//! over raw TCP with hand-built bytes (client in `common/raw.rs`), for what
//! libnbd/qemu cannot or will not send: the exact greeting, client flags,
//! option haggling (unknown, malformed and oversized options, LIST, INFO,
//! GO, STARTTLS, ABORT), NBD_OPT_EXPORT_NAME with and without NO_ZEROES,
//! the handshake timeout, truncated handshakes and the config-file settings
//! that show on the wire.
//!
//! Transmission-phase tests are in `raw_transmission.rs`.
//!
//! Run: `cargo test -p longwire --test raw_handshake`.

mod common;

use common::raw::*;
use common::*;
use std::thread;
use std::time::{Duration, Instant};

// ===========================================================================
// Greeting and client flags
// ===========================================================================

/// Spec: the server opens with NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES, then waits for the client.
#[test]
fn greeting_is_nbdmagic_ihaveopt_and_fixed_newstyle_no_zeroes() {
    let server = memory_server();
    let mut c = Conn::connect(&server);
    let g = c.recv(18);
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(be16(&g[16..]), 0x0003, "handshake flags = FIXED_NEWSTYLE | NO_ZEROES");
    // Nothing else until the client speaks.
    c.expect_silence(Duration::from_millis(200), "after the greeting");
}

/// Spec: client flags the server does not know make it close the connection, without any reply.
#[test]
fn unknown_client_flags_close_the_connection_without_a_reply() {
    let server = memory_server();
    for flags in [C_FIXED_NEWSTYLE | C_NO_ZEROES | 1 << 2, 1 << 31, 0xffff_ffff] {
        let mut c = Conn::start(&server, flags);
        let took = c.expect_closed(&format!("client flags {flags:#x}"));
        assert!(took < Duration::from_secs(2), "close took {took:?}");
    }
    // The server is fine.
    let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
    c.assert_alive(1, "after refused clients");
}

// ===========================================================================
// Option haggling: framing and unknown / unsupported options
// ===========================================================================

/// Spec: an option request without the IHAVEOPT magic ends the session (hard disconnect).
#[test]
fn option_with_wrong_magic_closes_the_connection() {
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    let mut bad = option_bytes(OPT_LIST, &[]);
    bad[7] ^= 0x01; // IHAVEOPT -> IHAVEOPU
    c.send(&bad);
    let took = c.expect_closed("option with wrong magic");
    assert!(took < Duration::from_secs(2), "close took {took:?}");

    // Also after a successful option.
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE);
    c.option(OPT_LIST, &[]);
    assert_eq!(c.opt_reply(OPT_LIST).0, REP_SERVER);
    assert_eq!(c.opt_reply(OPT_LIST), (REP_ACK, vec![]));
    c.send(&Be::new().u64(NBDMAGIC).u32(OPT_LIST).u32(0).0);
    c.expect_closed("second option with NBDMAGIC instead of IHAVEOPT");
}

/// Spec (option length limit): up to 64 KiB of option data is read; longer options are a hard disconnect at once.
#[test]
fn option_longer_than_64k_closes_immediately() {
    let server = memory_server();
    // 64 KiB exactly is still accepted (an unknown option: ERR_UNSUP).
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.expect_opt_error(99, &vec![0xAB; 64 * 1024], REP_ERR_UNSUP);
    // One byte more: hard disconnect without reading the payload, and
    // without waiting for it (we never send it).
    for len in [64 * 1024 + 1, 0xffff_ffffu32] {
        let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
        c.send(&Be::new().u64(IHAVEOPT).u32(OPT_GO).u32(len).0);
        let took = c.expect_closed(&format!("option length {len}"));
        assert!(took < Duration::from_secs(2), "server waited {took:?} before closing (length {len})");
    }
    let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
    c.assert_alive(1, "after oversized options");
}

/// Spec: an unknown option gets NBD_REP_ERR_UNSUP, its data is skipped and haggling continues.
#[test]
fn unknown_option_gets_err_unsup_and_the_session_continues() {
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.option(99, b"some data the server must skip");
    let (typ, msg) = c.opt_reply(99);
    assert_eq!(typ, REP_ERR_UNSUP, "unknown option 99");
    assert!(String::from_utf8(msg).is_ok(), "error data must be a UTF-8 message");
    // Another unknown option with 100 bytes of data to skip.
    c.expect_opt_error(0x4242, &[7u8; 100], REP_ERR_UNSUP);
    // Also an unknown option number with the high bit set.
    c.expect_opt_error(0x8000_0001, &[], REP_ERR_UNSUP);
    // The session continues: LIST and GO work.
    c.option(OPT_LIST, &[]);
    assert_eq!(c.opt_reply(OPT_LIST).0, REP_SERVER);
    assert_eq!(c.opt_reply(OPT_LIST), (REP_ACK, vec![]));
    let info = c.go("a");
    assert_eq!(info.size, 64 * MIB);
    c.assert_alive(1, "after unknown options");
}

/// Spec: a server without TLS answers NBD_OPT_STARTTLS with NBD_REP_ERR_POLICY and stays in plaintext haggling.
#[test]
fn starttls_is_refused_with_err_policy() {
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    let msg = c.expect_opt_error(OPT_STARTTLS, &[], REP_ERR_POLICY);
    assert!(!msg.is_empty());
    // Still in plaintext option haggling.
    assert_eq!(c.go("a").size, 64 * MIB);
}

/// Spec: STRUCTURED_REPLY and EXTENDED_HEADERS take no data; with data they are NBD_REP_ERR_INVALID, not negotiated.
#[test]
fn structured_reply_and_extended_headers_with_data_are_err_invalid() {
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.expect_opt_error(OPT_STRUCTURED_REPLY, &[1, 2, 3], REP_ERR_INVALID);
    c.expect_opt_error(OPT_EXTENDED_HEADERS, &[1, 2, 3], REP_ERR_INVALID);
    // Nothing was negotiated: INFO reports no DF ...
    let items = c.info("a", &[]);
    assert_eq!(export_info(&items).1, MEMORY_RW_FLAGS, "rejected options must not enable DF");
    // ... and the well-formed option is still accepted afterwards.
    c.expect_ack(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.go("a").flags, MEMORY_RW_FLAGS | F_SEND_DF);
    c.style = Style::Structured;
    c.assert_alive(1, "after the rejected options");
}

// ===========================================================================
// LIST, INFO, GO
// ===========================================================================

/// Spec: NBD_OPT_LIST with data is ERR_INVALID; without, one REP_SERVER (name + description) per export, then ACK.
#[test]
fn list_rejects_data_and_lists_every_export_with_its_description() {
    let server = Server::start(&[
        "--export",
        "alpha=memory:?size=1M&description=First%20disk",
        "--export",
        "b=memory:?size=2M",
        "--listen",
        "127.0.0.1:0",
    ]);
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.expect_opt_error(OPT_LIST, b"x", REP_ERR_INVALID);

    c.option(OPT_LIST, &[]);
    let expect_alpha = Be::new().u32(5).raw(b"alpha").raw(b"First disk").0;
    let expect_b = Be::new().u32(1).raw(b"b").0;
    assert_eq!(c.opt_reply(OPT_LIST), (REP_SERVER, expect_alpha));
    assert_eq!(c.opt_reply(OPT_LIST), (REP_SERVER, expect_b));
    assert_eq!(c.opt_reply(OPT_LIST), (REP_ACK, vec![]));
    assert_eq!(c.go("b").size, 2 * MIB);
}

/// Spec: INFO and GO for an unknown export are NBD_REP_ERR_UNKNOWN and haggling continues.
#[test]
fn info_and_go_for_a_missing_export_are_err_unknown_and_the_session_continues() {
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.option(OPT_INFO, &go_payload("nope", &[]));
    let (typ, msg) = c.opt_reply(OPT_INFO);
    assert_eq!(typ, REP_ERR_UNKNOWN, "INFO nope: {:?}", String::from_utf8_lossy(&msg));
    c.option(OPT_GO, &go_payload("nope", &[]));
    let (typ, msg) = c.opt_reply(OPT_GO);
    assert_eq!(typ, REP_ERR_UNKNOWN, "GO nope: {:?}", String::from_utf8_lossy(&msg));
    let info = c.go("a");
    assert_eq!(info.size, 64 * MIB);
    assert_eq!(info.flags, MEMORY_RW_FLAGS, "transmission flags {:#x}", info.flags);
    c.assert_alive(1, "after GO");
}

/// Spec: NBD_OPT_INFO answers NBD_INFO_EXPORT/BLOCK_SIZE/DESCRIPTION exactly, per export and negotiated mode, and does not end haggling.
#[test]
fn info_reports_size_flags_block_sizes_and_description() {
    let server = Server::start(&[
        "--export",
        "a=memory:?size=64M&description=raw+test",
        "--export",
        "ro=memory:?size=1M&readonly=true",
        "--listen",
        "127.0.0.1:0",
    ]);
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    // Every info request: exact values. Without structured replies or
    // extended headers negotiated, DF must be clear.
    let items = c.info("a", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]);
    assert_eq!(export_info(&items), (64 * MIB, MEMORY_RW_FLAGS), "INFO a (no structured replies)");
    let bs = info_item(&items, INFO_BLOCK_SIZE).expect("NBD_INFO_BLOCK_SIZE");
    assert_eq!(bs.len(), 12, "NBD_INFO_BLOCK_SIZE is 14 bytes");
    assert_eq!((be32(bs), be32(&bs[4..]), be32(&bs[8..])), (1, 4096, 32 * MIB as u32), "block sizes (min, preferred, max)");
    let desc = info_item(&items, INFO_DESCRIPTION).expect("NBD_INFO_DESCRIPTION");
    assert_eq!(desc, b"raw test");
    if let Some(n) = info_item(&items, INFO_NAME) {
        assert_eq!(n, b"a", "canonical name");
    }
    // Read-only export flags.
    let (size, ro_flags) = export_info(&c.info("ro", &[]));
    assert_eq!((size, ro_flags), (MIB, MEMORY_RO_FLAGS), "INFO ro flags {ro_flags:#x}");
    assert_eq!(ro_flags & (F_SEND_TRIM | F_SEND_WRITE_ZEROES | F_SEND_FAST_ZERO), 0, "{ro_flags:#x}");
    // Empty name = default export (the first one here).
    assert_eq!(export_info(&c.info("", &[])).0, 64 * MIB, "empty name selects the first export");
    // After STRUCTURED_REPLY the same INFO reports DF.
    c.expect_ack(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(export_info(&c.info("a", &[])).1, MEMORY_RW_FLAGS | F_SEND_DF, "INFO a (structured replies)");
    // INFO did not end the handshake: GO still works.
    let info = c.go("a");
    assert_eq!((info.size, info.flags), (64 * MIB, MEMORY_RW_FLAGS | F_SEND_DF));
    c.style = Style::Structured;
    c.assert_alive(1, "after INFO then GO");
}

/// Spec: a GO payload whose lengths do not add up is NBD_REP_ERR_INVALID, and haggling continues.
#[test]
fn malformed_go_is_err_invalid() {
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    // Name length 100, but only "a" + info count follow.
    c.expect_opt_error(OPT_GO, &Be::new().u32(100).raw(b"a").u16(0).0, REP_ERR_INVALID);
    // Name length that runs exactly past the end (no room for the count).
    c.expect_opt_error(OPT_GO, &Be::new().u32(3).raw(b"a").u16(0).0, REP_ERR_INVALID);
    // Fewer than 6 bytes.
    c.expect_opt_error(OPT_GO, &[0, 0, 0], REP_ERR_INVALID);
    // Info count larger than the list.
    c.expect_opt_error(OPT_GO, &Be::new().u32(1).raw(b"a").u16(2).u16(0).0, REP_ERR_INVALID);
    // Trailing garbage.
    c.expect_opt_error(OPT_GO, &Be::new().u32(1).raw(b"a").u16(0).raw(b"zz").0, REP_ERR_INVALID);
    assert_eq!(c.go("a").size, 64 * MIB);
}

/// Spec: GO never sends the 124 zero bytes of EXPORT_NAME, even without NO_ZEROES; "" picks the default export.
#[test]
fn go_never_pads_even_without_no_zeroes() {
    let server = memory_server();
    // Client flags without NO_ZEROES: GO must still not send 124 zeros.
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE);
    let info = c.go("");
    assert_eq!((info.size, info.flags), (64 * MIB, MEMORY_RW_FLAGS), "GO \"\" picks the default export");
    c.request(0, CMD_READ, u64::MAX, 0, 8);
    assert_eq!(c.recv(16), Be::new().u32(SIMPLE_REPLY_MAGIC).u32(0).u64(u64::MAX).0);
    assert_eq!(c.recv(8), vec![0u8; 8]);
}

// ===========================================================================
// NBD_OPT_EXPORT_NAME
// ===========================================================================

/// After EXPORT_NAME: unaligned 4-byte write at 512, read of [510, 518), DISC.
fn export_name_session_works(c: &mut Conn) {
    c.write_ok(1, 512, b"abcd");
    c.request(0, CMD_READ, 2, 510, 8);
    assert_eq!(c.simple_reply(), (0, 2));
    assert_eq!(c.recv(8), b"\0\0abcd\0\0");
    c.request(0, CMD_DISC, 3, 0, 0);
    c.expect_closed("after NBD_CMD_DISC");
}

/// Spec: with NO_ZEROES, EXPORT_NAME answers exactly size + flags (10 bytes), then transmission starts.
#[test]
fn export_name_with_no_zeroes_sends_exactly_10_bytes() {
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.option(OPT_EXPORT_NAME, b"a");
    let r = c.recv(10);
    assert_eq!(be64(&r), 64 * MIB, "export size");
    assert_eq!(be16(&r[8..]), MEMORY_RW_FLAGS, "transmission flags");
    // The very next bytes must be the reply to our first request: no padding.
    c.request(0, CMD_READ, 0xfeed, 0, 8);
    assert_eq!(c.simple_reply(), (0, 0xfeed));
    assert_eq!(c.recv(8), vec![0u8; 8]);
    export_name_session_works(&mut c);
}

/// Spec: without NO_ZEROES, EXPORT_NAME answers size + flags + 124 zero bytes; "" selects the default export.
#[test]
fn export_name_without_no_zeroes_sends_134_bytes() {
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE);
    c.option(OPT_EXPORT_NAME, b"a");
    let r = c.recv(134);
    assert_eq!(be64(&r), 64 * MIB, "export size");
    assert_eq!(be16(&r[8..]), MEMORY_RW_FLAGS, "transmission flags");
    assert_eq!(&r[10..], &[0u8; 124][..], "124 reserved zero bytes");
    c.request(0, CMD_READ, 0xfeed, 0, 8);
    assert_eq!(c.simple_reply(), (0, 0xfeed));
    assert_eq!(c.recv(8), vec![0u8; 8]);
    export_name_session_works(&mut c);

    // The empty name selects the default (first) export.
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.option(OPT_EXPORT_NAME, b"");
    assert_eq!(be64(&c.recv(10)), 64 * MIB);
}

/// Spec: a client that negotiated EXTENDED_HEADERS must not use EXPORT_NAME; the server can only close.
#[test]
fn export_name_after_extended_headers_closes() {
    // "a client that has used NBD_OPT_EXTENDED_HEADERS ... MUST NOT use
    // this option": the server cannot reply with an error, so it closes.
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.expect_ack(OPT_EXTENDED_HEADERS, &[]);
    c.option(OPT_EXPORT_NAME, b"a");
    c.expect_closed("EXPORT_NAME after EXTENDED_HEADERS");
}

/// Spec: EXPORT_NAME has no error reply, so an unknown export name makes the server close the connection.
#[test]
fn export_name_for_an_unknown_export_closes() {
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.option(OPT_EXPORT_NAME, b"missing");
    c.expect_closed("EXPORT_NAME missing");
}

// ===========================================================================
// ABORT, timeouts, truncated handshakes, config file
// ===========================================================================

/// Spec: NBD_OPT_ABORT is answered with an empty ACK (SHOULD), then the server closes.
#[test]
fn abort_is_acked_then_closed() {
    let server = memory_server();
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply(OPT_ABORT), (REP_ACK, vec![]));
    c.expect_closed("after NBD_OPT_ABORT");
}

/// --handshake-timeout: silent or stalled negotiating clients are closed after ~1 s; others are unaffected.
#[test]
fn handshake_timeout_closes_silent_and_stalled_clients_only() {
    let server = Server::start(&[
        "--export",
        "a=memory:?size=64M",
        "--listen",
        "127.0.0.1:0",
        "--handshake-timeout",
        "1",
    ]);
    let t0 = Instant::now();
    // Sends nothing at all.
    let mut silent = Conn::connect(&server);
    // Sends its flags and half an option header, then stalls.
    let mut half_header = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    half_header.send(&option_bytes(OPT_LIST, &[])[..10]);
    // Sends a full header promising 100 bytes, then only 10.
    let mut half_data = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    half_data.send(&Be::new().u64(IHAVEOPT).u32(99).u32(100).raw(&[7; 10]).0);

    // Meanwhile a normal client is served.
    let (mut good, _) = Conn::open(&server, "a", Style::Structured, false);
    good.write_ok(1, 4096, &data(1, 4096));

    // The silent client got the greeting and then the close.
    silent.greeting();
    for (c, what) in [(&mut silent, "silent"), (&mut half_header, "half header"), (&mut half_data, "half data")] {
        c.expect_closed_within(Duration::from_secs(4), what);
        let at = t0.elapsed();
        assert!(
            at >= Duration::from_millis(900) && at <= Duration::from_secs(3),
            "{what} client closed {at:?} after connecting; expected about 1 s"
        );
    }
    // The timeout covers only the handshake: the good client, now past it,
    // still works.
    assert!(t0.elapsed() > Duration::from_secs(1));
    assert_eq!(good.read(2, 4096, 4096), data(1, 4096));
}

/// Clients vanishing at every point of the handshake do not disturb a concurrent handshake or the server.
#[test]
fn truncated_handshakes_do_not_affect_other_connections() {
    let server = memory_server();
    // A client in the middle of its own handshake while others vanish.
    let mut good = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    good.expect_ack(OPT_STRUCTURED_REPLY, &[]);

    let cuts: Vec<Vec<u8>> = vec![
        vec![],                                                  // right after connecting
        vec![0, 0],                                              // half the client flags
        Be::new().u32(3).0,                                      // flags only
        Be::new().u32(3).raw(&option_bytes(OPT_GO, &[])[..9]).0, // half an option header
        Be::new().u32(3).u64(IHAVEOPT).u32(OPT_GO).u32(50).raw(&[0, 0, 0, 1, b'a']).0, // half the data
    ];
    for (i, bytes) in cuts.iter().enumerate() {
        let mut c = Conn::connect(&server);
        if i % 2 == 0 {
            c.greeting();
        }
        c.send(bytes);
        drop(c);
    }
    thread::sleep(Duration::from_millis(100));
    let info = good.go("a");
    good.style = Style::Structured;
    assert_eq!(info.flags, MEMORY_RW_FLAGS | F_SEND_DF);
    good.write_ok(1, 0, &data(2, 512));
    assert_eq!(good.read(2, 0, 512), data(2, 512));
    let (mut fresh, _) = Conn::open(&server, "a", Style::Simple, false);
    assert_eq!(fresh.read(3, 0, 512), data(2, 512));
    assert_no_panics(&server);
}

/// Config file: listeners, export description/readonly and handshake_timeout apply; the timeout spares transmission.
#[test]
fn config_file_exports_and_handshake_timeout() {
    let s = Server::start_with(&["--config", "{dir}/longwire.toml"], Some(2), |dir| {
        std::fs::write(
            dir.join("longwire.toml"),
            format!(
                r#"
listen = ["127.0.0.1:0"]
unix = "{}/cfg.sock"
handshake_timeout = 1

[[export]]
name = "cfgdisk"
uri = "file:{}/cfg.img?size=3M"
description = "from the config file"

[[export]]
name = "cfgro"
uri = "memory:?size=1M"
readonly = true
"#,
                dir.display(),
                dir.display()
            ),
        )
        .unwrap();
    });
    assert!(s.has_tcp(), "{}", s.logs());
    let _ = s.unix_path();
    let out = s.run("nbdinfo", &["--list", &s.uri("")]);
    assert!(out.contains("export=\"cfgdisk\""), "{out}");
    assert!(out.contains("description: from the config file"), "{out}");
    assert!(out.contains("export-size: 3145728"), "{out}");
    let out = s.run_unchecked("nbdinfo", &["--is", "read-only", &s.unix_uri("cfgro")]);
    assert!(out.status.success(), "cfgro must be read-only: {out:?}");

    // handshake_timeout = 1: a client that stalls in negotiation is dropped.
    let mut r = Conn::connect(&s);
    let t0 = Instant::now();
    r.greeting();
    r.expect_closed_within(Duration::from_secs(10), "stalled handshake was not timed out");
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "handshake timeout of 1 s took {took:?}");
    // ... but an established connection is not subject to it.
    let (mut r, _) = Conn::open(&s, "cfgdisk", Style::Simple, false);
    thread::sleep(Duration::from_millis(2500));
    r.request(0, CMD_READ, 1, 0, 512);
    assert_eq!(
        r.simple_reply(),
        (0, 1),
        "idle transmission-phase connection must survive the handshake timeout"
    );
    assert_eq!(r.recv(512), vec![0u8; 512]);
}
