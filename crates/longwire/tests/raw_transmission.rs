//! Byte-level NBD transmission tests: the real `longwire serve` binary
//! driven over raw TCP with hand-built bytes (client in `common/raw.rs`),
//! for what libnbd/qemu cannot or will not send: exact simple, structured
//! and extended reply bytes, error values, payload consumption after
//! refused requests, block status (compact and 64-bit), unknown commands
//! and flags, pipelining, NBD_CMD_DISC, framing errors and garbage.
//!
//! Handshake-phase tests are in `raw_handshake.rs`.
//!
//! Run: `cargo test -p longwire --test raw_transmission`.

mod common;

use common::raw::*;
use common::*;
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

// ===========================================================================
// Transmission: simple replies
// ===========================================================================

/// Spec: simple replies are exactly magic, error, cookie (+ the data for READ); written data reads back.
#[test]
fn simple_write_then_read_back() {
    let server = memory_server();
    let (mut c, info) = Conn::open(&server, "a", Style::Simple, false);
    assert_eq!((info.size, info.flags), (64 * MIB, MEMORY_RW_FLAGS));
    let d = data(7, 8192);
    // Exact reply bytes of a successful write.
    c.send(&c.write_bytes(0x0102_0304_0506_0708, 12345, &d));
    assert_eq!(c.recv(16), Be::new().u32(SIMPLE_REPLY_MAGIC).u32(0).u64(0x0102_0304_0506_0708).0);
    // Exact reply bytes of a read: header then the data.
    c.request(0, CMD_READ, 0xA1, 12345, 8192);
    assert_eq!(c.recv(16), Be::new().u32(SIMPLE_REPLY_MAGIC).u32(0).u64(0xA1).0);
    assert_eq!(c.recv(8192), d);
    // Unwritten neighbours read as zeros; the last byte of the export reads.
    assert_eq!(c.read(0xA2, 12345 - 100, 100), vec![0; 100]);
    assert_eq!(c.read(0xA3, 64 * MIB - 1, 1), vec![0]);
}

/// Spec: a READ beyond the export is EINVAL, and a failed simple READ reply carries no data.
#[test]
fn simple_read_past_end_is_einval_without_payload() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
    c.write_ok(1, 0, &data(1, 512));
    for (cookie, off, len) in [(10, 64 * MIB - 512, 1024u64), (11, 64 * MIB, 1), (12, u64::MAX - 10, 512)] {
        c.request(0, CMD_READ, cookie, off, len);
        assert_eq!(c.simple_reply(), (EINVAL, cookie), "read of {len} at {off}");
        // No payload follows: the next bytes are the next reply.
        c.request(0, CMD_READ, cookie + 100, 0, 512);
        assert_eq!(c.simple_reply(), (0, cookie + 100));
        assert_eq!(c.recv(512), data(1, 512));
    }
}

/// Spec: a WRITE beyond the export is ENOSPC, and its payload is read and discarded (framing kept).
#[test]
fn simple_write_past_end_is_enospc_and_its_payload_is_consumed() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
    // The payload bytes look like a request header: if the server did not
    // consume them, it would execute them.
    let trap = {
        let mut t = c.header(0, CMD_WRITE, 0xBAD, 0, 4096);
        t.resize(4096, 0x55);
        t
    };
    assert_eq!(c.write(5, 64 * MIB - 2048, &trap), ENOSPC);
    assert_eq!(c.write(6, 64 * MIB, &trap[..1]), ENOSPC);
    // Next request on the same connection works, and the export is untouched.
    assert_eq!(c.read(7, 64 * MIB - 4096, 4096), vec![0; 4096]);
    assert_eq!(c.read(8, 0, 4096), vec![0; 4096]);
}

/// Spec: unknown commands and command flags not valid for a command are EINVAL; refused WRITE payloads are consumed.
#[test]
fn simple_unknown_command_and_bad_flags_are_einval() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
    assert_eq!(c.cmd(0, 42, 1, 0, 0), EINVAL, "command 42");
    assert_eq!(c.cmd(0, 42, 2, 4096, 512), EINVAL, "command 42 with a length");
    assert_eq!(c.cmd(0, 0xffff, 3, 0, 0), EINVAL, "command 0xffff");
    assert_eq!(c.cmd(0, 9, 20, 0, 4096), EINVAL, "command 9 (first number after the known ones)");
    assert_eq!(c.cmd(0, 0x42, 21, 0, 4096), EINVAL, "command 0x42 with a length");
    // DF is not advertised without structured replies: no data may follow.
    assert_eq!(c.cmd(CMD_FLAG_DF, CMD_READ, 4, 0, 512), EINVAL, "READ with DF");
    assert_eq!(c.cmd(1 << 12, CMD_READ, 22, 0, 512), EINVAL, "READ with unknown flag bit 12");
    assert_eq!(c.cmd(1 << 15, CMD_FLUSH, 5, 0, 0), EINVAL, "FLUSH with flag bit 15");
    assert_eq!(c.cmd(CMD_FLAG_REQ_ONE, CMD_TRIM, 6, 0, 512), EINVAL, "TRIM with REQ_ONE");
    // PAYLOAD_LEN is not valid without extended headers.
    assert_eq!(c.cmd(CMD_FLAG_PAYLOAD_LEN, CMD_FLUSH, 7, 0, 0), EINVAL, "FLUSH with PAYLOAD_LEN");
    // A WRITE with a bad flag is refused and its payload consumed.
    let mut w = c.header(1 << 14, CMD_WRITE, 8, 0, 512);
    w.extend_from_slice(&data(3, 512));
    c.send(&w);
    assert_eq!(c.status(8, 0), EINVAL, "WRITE with flag bit 14");
    assert_eq!(c.read(9, 0, 512), vec![0; 512], "refused write must not have written");
}

/// Spec: a WRITE above the maximum payload is EINVAL, its payload is skipped, and nothing is written.
#[test]
fn simple_write_larger_than_max_payload_is_refused_and_framing_kept() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
    let len = MAX_PAYLOAD as usize + 1; // 33554433: fits the 64 MiB export
    let mut req = c.header(0, CMD_WRITE, 0x33, 0, len as u64);
    req.extend_from_slice(&vec![0x5A; len]);
    // Read the reply concurrently: a server may reply before consuming.
    let mut rd = c.s.try_clone().unwrap();
    let reader = thread::spawn(move || {
        let mut h = [0u8; 16];
        rd.read_exact(&mut h).map(|_| h)
    });
    c.send(&req);
    let h = reader.join().unwrap().expect("reply to the oversized write");
    assert_eq!(h.to_vec(), Be::new().u32(SIMPLE_REPLY_MAGIC).u32(EINVAL).u64(0x33).0);
    // Framing kept: the next request is understood, nothing was written.
    assert_eq!(c.read(0x34, 0, 4096), vec![0; 4096]);
    c.write_ok(0x35, MAX_PAYLOAD, &data(5, 512));
    assert_eq!(c.read(0x36, MAX_PAYLOAD, 512), data(5, 512));
}

/// Spec: a READ above the maximum payload is EINVAL with no data; exactly the maximum is served.
#[test]
fn simple_read_larger_than_max_payload_is_einval_without_payload() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
    c.request(0, CMD_READ, 0x41, 0, MAX_PAYLOAD + 1);
    assert_eq!(c.simple_reply(), (EINVAL, 0x41));
    c.request(0, CMD_READ, 0x42, 0, 16);
    assert_eq!(c.simple_reply(), (0, 0x42), "no payload may follow the error");
    assert_eq!(c.recv(16), vec![0; 16]);
    // Exactly the maximum is served.
    assert_eq!(c.read(0x43, 0, MAX_PAYLOAD).len(), MAX_PAYLOAD as usize);
}

/// Spec: with SEND_FUA advertised, FUA is accepted on every command; CACHE still rejects flags it does not know.
#[test]
fn fua_is_accepted_on_every_command() {
    // "NBD_CMD_FLAG_FUA; This flag is valid for all commands, provided
    // NBD_FLAG_SEND_FUA has been negotiated, in which case the server MUST
    // accept all commands with this bit set".
    let server = memory_server();
    let (mut c, info) = Conn::open(&server, "a", Style::Structured, true);
    assert_ne!(info.flags & F_SEND_FUA, 0);
    let d = data(8, 4096);
    let mut w = c.header(CMD_FLAG_FUA, CMD_WRITE, 1, 0, 4096);
    w.extend_from_slice(&d);
    c.send(&w);
    assert_eq!(c.status(1, 0), 0, "WRITE+FUA");
    c.request(CMD_FLAG_FUA, CMD_READ, 2, 0, 4096);
    let chunks = c.chunks(2);
    assert_eq!(assemble(Style::Structured, 0, 4096, &chunks), d, "READ+FUA");
    assert_eq!(c.cmd(CMD_FLAG_FUA, CMD_FLUSH, 3, 0, 0), 0, "FLUSH+FUA");
    assert_eq!(c.cmd(CMD_FLAG_FUA, CMD_TRIM, 4, 8192, 4096), 0, "TRIM+FUA");
    assert_eq!(c.cmd(CMD_FLAG_FUA, CMD_CACHE, 5, 0, 4096), 0, "CACHE+FUA");
    assert_eq!(c.cmd(CMD_FLAG_FUA, CMD_WRITE_ZEROES, 6, 8192, 4096), 0, "WRITE_ZEROES+FUA");
    c.request(CMD_FLAG_FUA, CMD_BLOCK_STATUS, 7, 0, 4096);
    let (_, ext) = block_status_compact(&c.chunk());
    assert_eq!(ext[0].1, DATA, "BLOCK_STATUS+FUA");
    // CACHE must reject flags it does not recognise.
    assert_eq!(c.cmd(CMD_FLAG_NO_HOLE, CMD_CACHE, 8, 0, 4096), EINVAL, "CACHE+NO_HOLE");
}

/// Spec: zero-length requests must not disconnect (BLOCK_STATUS of 0 bytes is EINVAL), in every reply style.
#[test]
fn zero_length_requests_do_not_disconnect() {
    // "The client SHOULD NOT request a ... length of 0; the behavior of a
    // server on such a request is unspecified although the server SHOULD
    // NOT disconnect."
    let server = memory_server();
    for style in [Style::Simple, Style::Structured, Style::Extended] {
        let (mut c, _) = Conn::open(&server, "a", style, style != Style::Simple);
        c.request(0, CMD_READ, 1, 4096, 0);
        match style {
            Style::Simple => assert_eq!(c.simple_reply(), (0, 1), "READ of 0 bytes (no data follows)"),
            _ => {
                let chunks = c.chunks(1);
                assert!(chunks.iter().all(|ch| ch.typ == TYPE_NONE || ch.typ & 0x8000 != 0), "{chunks:?}");
            }
        }
        let _ = c.write(2, 4096, &[]);
        let _ = c.cmd(0, CMD_TRIM, 3, 4096, 0);
        let _ = c.cmd(0, CMD_WRITE_ZEROES, 4, 64 * MIB, 0);
        let _ = c.cmd(0, CMD_CACHE, 5, 0, 0);
        if style != Style::Simple {
            assert_eq!(c.cmd(0, CMD_BLOCK_STATUS, 6, 0, 0), EINVAL, "BLOCK_STATUS of 0 bytes");
        }
        c.assert_alive(7, &format!("{style:?}: after zero-length requests"));
    }
}

/// Spec: a read-only export advertises READ_ONLY and refuses WRITE/TRIM/WRITE_ZEROES with EPERM; reads still work.
#[test]
fn readonly_export_refuses_writes_with_eperm() {
    let server = Server::start(&["--export", "ro=memory:?size=1M&readonly=true", "--listen", "127.0.0.1:0"]);
    let (mut c, info) = Conn::open(&server, "ro", Style::Simple, false);
    assert_eq!((info.size, info.flags), (MIB, MEMORY_RO_FLAGS), "flags {:#x}", info.flags);
    assert_eq!(c.write(1, 0, &data(1, 4096)), EPERM, "WRITE");
    assert_eq!(c.cmd(0, CMD_TRIM, 2, 0, 4096), EPERM, "TRIM");
    assert_eq!(c.cmd(0, CMD_WRITE_ZEROES, 3, 0, 4096), EPERM, "WRITE_ZEROES");
    // Reads, flush and cache work.
    assert_eq!(c.read(4, 0, 4096), vec![0; 4096]);
    assert_eq!(c.cmd(0, CMD_FLUSH, 5, 0, 0), 0, "FLUSH");
    assert_eq!(c.cmd(0, CMD_CACHE, 6, 0, 4096), 0, "CACHE");
}

/// Spec: FLUSH, CACHE, WRITE_ZEROES (also NO_HOLE) and TRIM succeed in range; past the end ENOSPC/EINVAL.
#[test]
fn flush_trim_write_zeroes_and_cache_succeed() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
    c.write_ok(1, 0, &data(1, 256 * 1024));
    assert_eq!(c.cmd(0, CMD_FLUSH, 2, 0, 0), 0, "FLUSH");
    assert_eq!(c.cmd(CMD_FLAG_FUA, CMD_FLUSH, 3, 0, 0), 0, "FLUSH+FUA");
    assert_eq!(c.cmd(0, CMD_CACHE, 4, 0, 256 * 1024), 0, "CACHE");
    assert_eq!(c.cmd(0, CMD_WRITE_ZEROES, 5, 4096, 4096), 0, "WRITE_ZEROES");
    assert_eq!(c.cmd(CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, CMD_WRITE_ZEROES, 6, 16384, 100), 0, "WRITE_ZEROES NO_HOLE");
    assert_eq!(c.cmd(0, CMD_TRIM, 7, 128 * 1024, 128 * 1024), 0, "TRIM");
    // Zeroed ranges read as zeros, the rest is intact.
    let got = c.read(8, 0, 128 * 1024);
    let mut want = data(1, 128 * 1024);
    want[4096..8192].fill(0);
    want[16384..16484].fill(0);
    assert_eq!(got, want);
    // Past the end: WRITE_ZEROES is ENOSPC, TRIM and CACHE are EINVAL.
    assert_eq!(c.cmd(0, CMD_WRITE_ZEROES, 9, 64 * MIB - 512, 1024), ENOSPC);
    assert_eq!(c.cmd(0, CMD_TRIM, 10, 64 * MIB - 512, 1024), EINVAL);
    assert_eq!(c.cmd(0, CMD_CACHE, 11, 64 * MIB, 1), EINVAL);
}

// ===========================================================================
// Transmission: structured replies and block status
// ===========================================================================

/// Spec: a structured READ of never-written space is exactly one OFFSET_HOLE chunk with DONE.
#[test]
fn structured_read_of_a_sparse_region_is_one_hole_chunk() {
    let server = memory_server();
    let (mut c, info) = Conn::open(&server, "a", Style::Structured, false);
    assert_eq!(info.flags, MEMORY_RW_FLAGS | F_SEND_DF);
    c.request(0, CMD_READ, 0x77, MIB, 64 * 1024);
    // Exactly: header(DONE, OFFSET_HOLE, cookie, 12) + offset + hole size.
    let want = Be::new()
        .u32(STRUCTURED_REPLY_MAGIC)
        .u16(REPLY_FLAG_DONE)
        .u16(TYPE_OFFSET_HOLE)
        .u64(0x77)
        .u32(12)
        .u64(MIB)
        .u32(64 * 1024)
        .0;
    assert_eq!(c.recv(want.len()), want);
    c.assert_alive(0x78, "after hole read");
}

/// Spec: structured READ sends OFFSET_DATA for data and OFFSET_HOLE for holes, covering the request exactly once.
#[test]
fn structured_read_of_written_and_mixed_regions() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Structured, false);
    let d = data(9, 4096);
    c.write_ok(1, 0x20000, &d);

    // Read of written data: one OFFSET_DATA chunk with the right offset.
    c.request(0, CMD_READ, 2, 0x20000, 4096);
    let want = Be::new()
        .u32(STRUCTURED_REPLY_MAGIC)
        .u16(REPLY_FLAG_DONE)
        .u16(TYPE_OFFSET_DATA)
        .u64(2)
        .u32(8 + 4096)
        .u64(0x20000)
        .raw(&d)
        .0;
    assert_eq!(c.recv(want.len()), want);

    // A region spanning a hole and the data: reassembles correctly, and the
    // 64 KiB never written before the data is sent as a hole, not zeros.
    c.request(0, CMD_READ, 3, 0x10000, 0x20000);
    let chunks = c.chunks(3);
    let got = assemble(Style::Structured, 0x10000, 0x20000, &chunks);
    let mut want = vec![0u8; 0x20000];
    want[0x10000..0x11000].copy_from_slice(&d);
    assert_eq!(got, want);
    let data_bytes: usize = chunks.iter().filter(|c| c.typ == TYPE_OFFSET_DATA).map(|c| c.payload.len() - 8).sum();
    assert!(data_bytes <= 0x10000, "{data_bytes} data bytes sent; the unwritten half must be a hole: {chunks:?}");
    let hole = chunks.iter().find(|c| c.typ == TYPE_OFFSET_HOLE).expect("a hole chunk");
    assert_eq!(be64(&hole.payload), 0x10000, "hole offset");
    assert_eq!(be32(&hole.payload[8..]), 0x10000, "hole size");
    assert!(chunks.last().unwrap().done() && chunks[..chunks.len() - 1].iter().all(|c| !c.done()));
}

/// Spec: with structured replies a failed READ is an ERROR chunk (errno + message), never a simple reply.
#[test]
fn structured_read_past_end_is_an_error_chunk() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Structured, false);
    c.request(0, CMD_READ, 0xE1, 64 * MIB - 512, 1024);
    let chunks = c.chunks(0xE1);
    assert_eq!(chunks.len(), 1, "only an error chunk: {chunks:?}");
    let ch = &chunks[0];
    assert_eq!((ch.flags, ch.typ), (REPLY_FLAG_DONE, TYPE_ERROR));
    let (errno, msg) = ch.error();
    assert_eq!(errno, EINVAL);
    assert!(!msg.is_empty(), "error chunk must carry a message");
    // A bad flag on a READ also gets a structured error, never a simple reply.
    c.request(1 << 13, CMD_READ, 0xE2, 0, 512);
    assert_eq!(c.status(0xE2, 0), EINVAL);
    c.assert_alive(0xE3, "after read errors");
}

/// Spec: READ with DF (don't fragment) is answered with a single content chunk, OFFSET_DATA for a mixed region.
#[test]
fn structured_df_read_of_a_mixed_region_is_one_data_chunk() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Structured, false);
    let d = data(4, 4096);
    c.write_ok(1, 0x20000, &d);
    c.request(CMD_FLAG_DF, CMD_READ, 2, 0x18000, 0x10000);
    let chunks = c.chunks(2);
    let content: Vec<_> = chunks.iter().filter(|c| c.typ != TYPE_NONE).collect();
    assert_eq!(content.len(), 1, "DF allows one content chunk: {chunks:?}");
    assert_eq!(content[0].typ, TYPE_OFFSET_DATA, "a mixed region under DF must be OFFSET_DATA");
    assert_eq!(be64(&content[0].payload), 0x18000);
    let mut want = vec![0u8; 0x10000];
    want[0x8000..0x9000].copy_from_slice(&d);
    assert_eq!(&content[0].payload[8..], &want[..]);
    assert_eq!(assemble(Style::Structured, 0x18000, 0x10000, &chunks), want);
}

/// Spec: BLOCK_STATUS needs a context selected for this export (structured replies first), else EINVAL.
#[test]
fn block_status_without_a_meta_context_is_einval() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Structured, false);
    assert_eq!(c.cmd(0, CMD_BLOCK_STATUS, 1, 0, 4096), EINVAL);
    c.assert_alive(2, "after block status error");

    // Selecting the context for a different export does not count.
    let server = Server::start(&["--export", "a=memory:?size=1M", "--export", "b=memory:?size=1M", "--listen", "127.0.0.1:0"]);
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.expect_ack(OPT_STRUCTURED_REPLY, &[]);
    c.set_meta_base_allocation("b");
    c.go("a");
    c.style = Style::Structured;
    assert_eq!(c.cmd(0, CMD_BLOCK_STATUS, 3, 0, 4096), EINVAL);

    // A later SET_META_CONTEXT with no queries replaces (clears) the
    // selection: no META_CONTEXT reply, just ACK, and BLOCK_STATUS fails.
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.expect_ack(OPT_STRUCTURED_REPLY, &[]);
    c.set_meta_base_allocation("a");
    c.expect_ack(OPT_SET_META_CONTEXT, &meta_payload("a", &[]));
    c.go("a");
    c.style = Style::Structured;
    assert_eq!(c.cmd(0, CMD_BLOCK_STATUS, 4, 0, 4096), EINVAL);

    // SET_META_CONTEXT before structured replies is refused.
    let mut c = Conn::start(&server, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.expect_opt_error(OPT_SET_META_CONTEXT, &meta_payload("a", &["base:allocation"]), REP_ERR_INVALID);
}

/// Spec: BLOCK_STATUS base:allocation reports exact extents for the context id; REQ_ONE gives one extent.
#[test]
fn block_status_base_allocation_reports_data_and_holes() {
    let server = memory_server();
    let (mut c, info) = Conn::open(&server, "a", Style::Structured, true);
    let ctx = info.ctx.unwrap();
    c.write_ok(1, 0x20000, &data(3, 0x10000));

    c.request(0, CMD_BLOCK_STATUS, 2, 0, 0x40000);
    let chunks = c.chunks(2);
    assert_eq!(chunks.len(), 1, "one status chunk for one context: {chunks:?}");
    let (id, ext) = block_status_compact(&chunks[0]);
    assert_eq!(id, ctx, "context id must be the one from NBD_REP_META_CONTEXT");
    assert_eq!(ext, vec![(0x20000, HOLE), (0x10000, DATA), (0x10000, HOLE)]);

    // Starting inside the data.
    c.request(0, CMD_BLOCK_STATUS, 3, 0x28000, 0x10000);
    let (_, ext) = block_status_compact(&c.chunk());
    assert_eq!(ext, vec![(0x8000, DATA), (0x8000, HOLE)]);

    // REQ_ONE: exactly one extent, no longer than the request.
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 4, 0, 0x40000);
    let (id, ext) = block_status_compact(&c.chunk());
    assert_eq!((id, ext), (ctx, vec![(0x20000, HOLE)]));
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 5, 0x20000, 0x1000);
    let (_, ext) = block_status_compact(&c.chunk());
    assert_eq!(ext, vec![(0x1000, DATA)]);

    // Out of range and zero length are EINVAL.
    assert_eq!(c.cmd(0, CMD_BLOCK_STATUS, 6, 64 * MIB - 512, 1024), EINVAL);
    assert_eq!(c.cmd(0, CMD_BLOCK_STATUS, 7, 0, 0), EINVAL);
}

/// Spec: the structured-reply rules hold on a sparse file export too (flags with DF, data/hole chunks, base:allocation, errors).
#[test]
fn structured_replies_on_a_file_export() {
    let server = Server::start(&["--export", "f=file:{dir}/f.img?size=16M", "--listen", "127.0.0.1:0"]);
    let (mut c, info) = Conn::open(&server, "f", Style::Structured, true);
    let ctx = info.ctx.unwrap();
    assert_eq!(info.size, 16 * MIB);
    assert_eq!(info.flags, MEMORY_RW_FLAGS | F_SEND_DF, "file export flags with structured replies: {:#x}", info.flags);

    c.write_ok(1, 8192, &[0x61; 4096]);
    // READ [0, 16K): data/hole chunks covering the range exactly.
    let mut want = vec![0u8; 16384];
    want[8192..12288].fill(0x61);
    assert_eq!(c.read(2, 0, 16384), want, "structured read content");

    // BLOCK_STATUS (32-bit descriptors): hole [0, 8K), data [8K, 12K), hole.
    c.request(0, CMD_BLOCK_STATUS, 3, 0, 16384);
    let chunks = c.chunks(3);
    assert_eq!(chunks.len(), 1, "exactly one status chunk per context: {chunks:?}");
    let (id, ext) = block_status_compact(&chunks[0]);
    assert_eq!(id, ctx, "context id");
    assert!(ext.len() >= 3, "{ext:?}");
    assert_eq!(ext[0], (8192, HOLE), "first extent: hole+zero [0,8K): {ext:?}");
    assert_eq!(ext[1], (4096, DATA), "second extent: data [8K,12K): {ext:?}");
    assert_eq!(ext[2].1, HOLE, "third extent: hole: {ext:?}");

    // Unknown command: a structured ERROR chunk with EINVAL.
    assert_eq!(c.cmd(0, 0x42, 4, 0, 0), EINVAL, "unknown command in structured mode");
    // READ past the end: EINVAL as a structured error (a simple reply is
    // not allowed for READ once structured replies are negotiated).
    assert_eq!(c.cmd(0, CMD_READ, 5, 16 * MIB, 512), EINVAL, "read past end");
    c.request(0, CMD_DISC, 6, 0, 0);
    c.expect_closed("after NBD_CMD_DISC");
}

// ===========================================================================
// Transmission: extended headers
// ===========================================================================

/// Spec (extended headers): 32-byte requests and replies; every reply chunk echoes the request's cookie and offset.
#[test]
fn extended_headers_use_32_byte_messages_and_echo_the_offset() {
    let server = memory_server();
    let (mut c, info) = Conn::open(&server, "a", Style::Extended, false);
    assert_eq!(info.flags, MEMORY_RW_FLAGS | F_SEND_DF);
    let d = data(11, 4096);

    // WRITE: a 32-byte request; the reply is exactly one 32-byte NONE chunk.
    c.send(&c.write_bytes(0xC1, 0x21000, &d));
    let want = Be::new().u32(EXTENDED_REPLY_MAGIC).u16(REPLY_FLAG_DONE).u16(TYPE_NONE).u64(0xC1).u64(0x21000).u64(0).0;
    assert_eq!(c.recv(32), want);

    // READ of the data: OFFSET_DATA, header echoes the request offset.
    c.request(0, CMD_READ, 0xC2, 0x21000, 4096);
    let want = Be::new()
        .u32(EXTENDED_REPLY_MAGIC)
        .u16(REPLY_FLAG_DONE)
        .u16(TYPE_OFFSET_DATA)
        .u64(0xC2)
        .u64(0x21000)
        .u64(8 + 4096)
        .u64(0x21000)
        .raw(&d)
        .0;
    assert_eq!(c.recv(want.len()), want);

    // A read starting in a hole: every chunk header carries the REQUEST
    // offset, while payload offsets say where each piece lies.
    c.request(0, CMD_READ, 0xC3, 0x10000, 0x20000);
    let chunks = c.chunks(0xC3);
    for ch in &chunks {
        assert_eq!(ch.offset, Some(0x10000), "chunk header offset: {ch:?}");
    }
    let hole = chunks.iter().find(|c| c.typ == TYPE_OFFSET_HOLE).expect("hole chunk");
    assert_eq!((be64(&hole.payload), be32(&hole.payload[8..])), (0x10000, 0x10000));
    let data_chunk = chunks.iter().find(|c| c.typ == TYPE_OFFSET_DATA).expect("data chunk");
    assert_eq!(be64(&data_chunk.payload), 0x20000, "payload offset of the data");
    let mut want = vec![0u8; 0x20000];
    want[0x11000..0x12000].copy_from_slice(&d);
    assert_eq!(assemble(Style::Extended, 0x10000, 0x20000, &chunks), want);

    // Errors echo the offset too.
    c.request(0, CMD_READ, 0xC4, 64 * MIB - 512, 1024);
    let ch = c.chunk();
    assert_eq!((ch.flags, ch.typ, ch.cookie, ch.offset), (REPLY_FLAG_DONE, TYPE_ERROR, 0xC4, Some(64 * MIB - 512)));
    assert_eq!(ch.error().0, EINVAL);
    assert_eq!(c.cmd(0, CMD_FLUSH, 0xC5, 0, 0), 0);
    // Unknown command and write past the end: single ERROR chunks with the
    // request offset echoed.
    assert_eq!(c.cmd(0, 0x42, 0xC6, 12345, 0), EINVAL, "unknown command");
    assert_eq!(c.write(0xC7, 64 * MIB, &[1; 512]), ENOSPC, "write past end");
    // The cookie is echoed verbatim, all 64 bits.
    assert_eq!(c.cmd(0, CMD_FLUSH, u64::MAX, 0, 0), 0, "FLUSH with cookie u64::MAX");
    c.assert_alive(0xC8, "after extended errors");
}

/// Spec (extended headers): BLOCK_STATUS answers with BLOCK_STATUS_EXT (64-bit descriptors), byte for byte.
#[test]
fn extended_block_status_uses_block_status_ext_chunks() {
    let server = memory_server();
    let (mut c, info) = Conn::open(&server, "a", Style::Extended, true);
    let ctx = info.ctx.unwrap();
    c.write_ok(1, 0x20000, &data(3, 0x10000));
    c.request(0, CMD_BLOCK_STATUS, 2, 0x10000, 0x30000);
    let ch = c.chunk();
    assert_eq!((ch.cookie, ch.offset), (2, Some(0x10000)));
    let (id, ext) = block_status_ext(&ch);
    assert_eq!(id, ctx);
    assert_eq!(ext, vec![(0x10000, HOLE), (0x10000, DATA), (0x10000, HOLE)]);
    // Exact bytes for REQ_ONE.
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 3, 0x20000, 0x30000);
    let want = Be::new()
        .u32(EXTENDED_REPLY_MAGIC)
        .u16(REPLY_FLAG_DONE)
        .u16(TYPE_BLOCK_STATUS_EXT)
        .u64(3)
        .u64(0x20000)
        .u64(8 + 16)
        .u32(ctx)
        .u32(1)
        .u64(0x10000)
        .u64(DATA as u64)
        .0;
    assert_eq!(c.recv(want.len()), want);
}

/// Spec (extended headers): 64-bit effect lengths for BLOCK_STATUS/WRITE_ZEROES/TRIM and 64-bit range checks.
#[test]
fn extended_64_bit_effect_lengths_on_a_6t_export() {
    let server = Server::start(&["--export", "big=memory:?size=6T", "--listen", "127.0.0.1:0"]);
    let (mut c, info) = Conn::open(&server, "big", Style::Extended, true);
    assert_eq!(info.size, 6 * TIB);
    let d = data(6, 0x10000);
    let at = 5 * TIB;
    c.write_ok(1, at, &d);
    c.write_ok(2, 4 * GIB, &d);

    // One BLOCK_STATUS over the whole 6 TiB (a 64-bit effect length).
    c.request(0, CMD_BLOCK_STATUS, 3, 0, 6 * TIB);
    let (_, ext) = block_status_ext(&c.chunk());
    assert_eq!(
        ext,
        vec![(4 * GIB, HOLE), (0x10000, DATA), (at - 4 * GIB - 0x10000, HOLE), (0x10000, DATA), (TIB - 0x10000, HOLE)]
    );

    // WRITE_ZEROES of 4 GiB + 64 KiB: a length that does not fit 32 bits.
    assert_eq!(c.cmd(0, CMD_WRITE_ZEROES, 4, 0, 4 * GIB + 0x10000), 0);
    assert_eq!(c.read(5, 4 * GIB, 0x10000), vec![0; 0x10000], "zeroed beyond 4 GiB");
    assert_eq!(c.read(6, at, 0x10000), d, "data at 5 TiB untouched");

    // TRIM of the whole export.
    assert_eq!(c.cmd(0, CMD_TRIM, 7, 0, 6 * TIB), 0);
    c.request(0, CMD_BLOCK_STATUS, 8, 0, 6 * TIB);
    let (_, ext) = block_status_ext(&c.chunk());
    assert_eq!(ext, vec![(6 * TIB, HOLE)]);

    // WRITE_ZEROES of the whole export, after writing again.
    c.write_ok(9, at, &d);
    assert_eq!(c.cmd(CMD_FLAG_FUA, CMD_WRITE_ZEROES, 10, 0, 6 * TIB), 0);
    assert_eq!(c.read(11, at, 0x10000), vec![0; 0x10000]);

    // 64-bit range checks: one byte past the end, and lengths that would
    // look valid if truncated to 32 bits.
    assert_eq!(c.cmd(0, CMD_WRITE_ZEROES, 12, 0x10000, 6 * TIB), ENOSPC);
    assert_eq!(c.cmd(0, CMD_TRIM, 13, 1, 6 * TIB), EINVAL);
    assert_eq!(c.cmd(0, CMD_WRITE_ZEROES, 14, 0, (1 << 32) * 1024 * 1024 + 512), ENOSPC);
    assert_eq!(c.cmd(0, CMD_BLOCK_STATUS, 15, 0, 6 * TIB + 1), EINVAL);
    assert_eq!(c.cmd(0, CMD_WRITE_ZEROES, 16, u64::MAX - 10, 20), ENOSPC, "offset + length overflows u64");
}

/// Spec (extended headers): WRITE with PAYLOAD_LEN (and, like qemu, without it) writes its payload; FUA works too.
#[test]
fn extended_write_with_and_without_payload_len() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Extended, false);
    let d1 = data(21, 4096);
    let d2 = data(22, 4096);
    // Spec form: PAYLOAD_LEN set.
    let mut w = c.header(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 1, 0, 4096);
    w.extend_from_slice(&d1);
    c.send(&w);
    assert_eq!(c.status(1, 0), 0);
    // qemu's form: PAYLOAD_LEN omitted, length is still the payload length.
    let mut w = c.header(0, CMD_WRITE, 2, 4096, 4096);
    w.extend_from_slice(&d2);
    c.send(&w);
    assert_eq!(c.status(2, 4096), 0);
    let mut want = d1.clone();
    want.extend_from_slice(&d2);
    assert_eq!(c.read(3, 0, 8192), want);
    // FUA works with PAYLOAD_LEN.
    let mut w = c.header(CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_FUA, CMD_WRITE, 4, 8192, 512);
    w.extend_from_slice(&d1[..512]);
    c.send(&w);
    assert_eq!(c.status(4, 8192), 0);
    assert_eq!(c.read(5, 8192, 512), d1[..512].to_vec());
}

/// Spec (extended headers): PAYLOAD_LEN on a non-WRITE is EINVAL and the payload is skipped, not executed.
#[test]
fn extended_payload_len_on_a_non_write_is_einval_and_the_payload_is_consumed() {
    let server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Extended, true);
    // Payloads shaped like valid requests: executing them would be a bug.
    let trap = c.write_bytes(0xBAD, 0, &data(1, 64));
    for (cookie, typ, off) in [(1, CMD_FLUSH, 0), (2, CMD_READ, 0), (3, CMD_BLOCK_STATUS, 0), (4, CMD_TRIM, 0), (5, CMD_CACHE, 4096)] {
        let mut r = c.header(CMD_FLAG_PAYLOAD_LEN, typ, cookie, off, trap.len() as u64);
        r.extend_from_slice(&trap);
        c.send(&r);
        assert_eq!(c.status(cookie, off), EINVAL, "command {typ} with PAYLOAD_LEN");
        // The next request works, and the trap was not executed.
        assert_eq!(c.read(cookie + 100, 0, 64), vec![0; 64], "after command {typ}");
    }
}

// ===========================================================================
// Pipelining, framing errors, disconnects
// ===========================================================================

/// 64 requests (writes to one region, reads of another written beforehand)
/// in one burst, then all replies: every cookie answered once, data right.
fn pipeline(server: &Server, style: Style, base: u64) {
    let (mut c, _) = Conn::open(server, "a", style, false);
    const N: u64 = 64;
    const BLK: u64 = 4096;
    let read_region = base;
    let write_region = base + N * BLK;
    let setup = data(base, (N * BLK) as usize);
    c.write_ok(1, read_region, &setup);

    let mut burst = Vec::new();
    let mut expect: HashMap<u64, Option<u64>> = HashMap::new(); // cookie -> read offset
    for i in 0..N {
        let cookie = 0xC0DE_0000_0000_0000 | (i << 8) | style as u64;
        if i % 2 == 0 {
            burst.extend(c.write_bytes(cookie, write_region + i * BLK, &data(1000 + i, BLK as usize)));
            expect.insert(cookie, None);
        } else {
            burst.extend(c.header(0, CMD_READ, cookie, read_region + i * BLK, BLK));
            expect.insert(cookie, Some(read_region + i * BLK));
        }
    }
    c.send(&burst);

    let mut answered = HashMap::new();
    let mut partial: HashMap<u64, Vec<Chunk>> = HashMap::new();
    while answered.len() < N as usize {
        let (cookie, result) = match style {
            Style::Simple => {
                let (errno, cookie) = c.simple_reply();
                assert_eq!(errno, 0, "cookie {cookie:#x}");
                let read = *expect.get(&cookie).unwrap_or_else(|| panic!("reply for unknown cookie {cookie:#x}"));
                (cookie, read.map(|_| c.recv(BLK as usize)))
            }
            _ => {
                let ch = c.chunk();
                let cookie = ch.cookie;
                let read = *expect.get(&cookie).unwrap_or_else(|| panic!("chunk for unknown cookie {cookie:#x}"));
                assert!(!answered.contains_key(&cookie), "chunk after DONE for cookie {cookie:#x}");
                let done = ch.done();
                partial.entry(cookie).or_default().push(ch);
                if !done {
                    continue;
                }
                let chunks = partial.remove(&cookie).unwrap();
                match read {
                    Some(off) => (cookie, Some(assemble(style, off, BLK, &chunks))),
                    None => {
                        assert_eq!(chunks.len(), 1);
                        assert_eq!(chunks[0].typ, TYPE_NONE, "write reply: {chunks:?}");
                        (cookie, None)
                    }
                }
            }
        };
        assert!(answered.insert(cookie, result).is_none(), "cookie {cookie:#x} answered twice");
    }
    for (cookie, result) in &answered {
        if let Some(off) = expect[cookie] {
            let i = (off - read_region) / BLK;
            let want = &setup[(i * BLK) as usize..((i + 1) * BLK) as usize];
            assert_eq!(result.as_deref(), Some(want), "read reply for cookie {cookie:#x}");
        }
    }
    // Nothing extra was sent, and the writes landed.
    c.expect_silence(Duration::from_millis(100), "after the last reply");
    let all = c.read(2, write_region, N * BLK);
    for i in (0..N).step_by(2) {
        assert_eq!(&all[(i * BLK) as usize..((i + 1) * BLK) as usize], &data(1000 + i, BLK as usize)[..], "write {i}");
    }
}

/// Spec: pipelined requests are each answered exactly once, by cookie, in every reply style.
#[test]
fn pipelining_64_requests_in_one_burst() {
    let server = memory_server();
    pipeline(&server, Style::Simple, 0);
    pipeline(&server, Style::Structured, 8 * MIB);
    pipeline(&server, Style::Extended, 16 * MIB);
}

/// Spec: a request with the wrong magic for the negotiated header style is a hard disconnect of that connection only.
#[test]
fn wrong_request_magic_closes_the_connection() {
    let server = memory_server();
    // Compact session: a bad magic, and an extended magic.
    for magic in [0xdead_beefu32, EXTENDED_REQUEST_MAGIC, SIMPLE_REPLY_MAGIC] {
        let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
        c.assert_alive(1, "before bad magic");
        let mut h = c.header(0, CMD_READ, 2, 0, 512);
        h[..4].copy_from_slice(&magic.to_be_bytes());
        c.send(&h);
        c.expect_closed(&format!("request magic {magic:#x} on a compact session"));
    }
    // Extended session: the compact magic is wrong there.
    let (mut c, _) = Conn::open(&server, "a", Style::Extended, false);
    let mut h = c.header(0, CMD_READ, 2, 0, 512);
    h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    c.send(&h);
    c.expect_closed("compact magic on an extended session");
    let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
    c.assert_alive(3, "fresh connection");
}

/// Clients vanishing mid-request do not apply partial writes or harm the server.
#[test]
fn truncated_requests_do_not_hurt_the_server() {
    let server = memory_server();
    for style in [Style::Simple, Style::Structured, Style::Extended] {
        // Half a header.
        let (mut c, _) = Conn::open(&server, "a", style, false);
        let h = c.header(0, CMD_READ, 1, 0, 512);
        c.send(&h[..h.len() / 2]);
        drop(c);
        // A write header with only part of its payload.
        let (mut c, _) = Conn::open(&server, "a", style, false);
        let w = c.write_bytes(2, 0, &data(1, 65536));
        c.send(&w[..w.len() - 1000]);
        drop(c);
    }
    thread::sleep(Duration::from_millis(100));
    let (mut c, _) = Conn::open(&server, "a", Style::Structured, false);
    assert_eq!(c.read(3, 0, 65536), vec![0; 65536], "a truncated write must not be applied");
    let mut server = server;
    assert!(server.is_running());
    assert_no_panics(&server);
}

/// Spec: NBD_CMD_DISC has no reply; earlier requests are answered (and applied) before the server closes.
#[test]
fn disc_answers_earlier_requests_then_closes() {
    let server = memory_server();
    for style in [Style::Simple, Style::Structured, Style::Extended] {
        let (mut c, _) = Conn::open(&server, "a", style, false);
        let d = data(31, 65536);
        let mut burst = c.write_bytes(1, 0, &d);
        burst.extend(c.header(0, CMD_READ, 2, 0x100000, 65536));
        burst.extend(c.header(0, CMD_FLUSH, 3, 0, 0));
        burst.extend(c.header(0, CMD_DISC, 4, 0, 0));
        c.send(&burst);
        let mut seen = Vec::new();
        match style {
            Style::Simple => {
                for _ in 0..3 {
                    let (errno, cookie) = c.simple_reply();
                    assert_eq!(errno, 0);
                    if cookie == 2 {
                        assert_eq!(c.recv(65536), vec![0; 65536]);
                    }
                    seen.push(cookie);
                }
            }
            _ => {
                // Chunks of different replies may interleave: group them.
                let mut partial: HashMap<u64, Vec<Chunk>> = HashMap::new();
                while seen.len() < 3 {
                    let ch = c.chunk();
                    let cookie = ch.cookie;
                    let done = ch.done();
                    partial.entry(cookie).or_default().push(ch);
                    if !done {
                        continue;
                    }
                    let chunks = partial.remove(&cookie).unwrap();
                    if cookie == 2 {
                        assert_eq!(assemble(style, 0x100000, 65536, &chunks), vec![0; 65536]);
                    } else {
                        assert_eq!(chunks.len(), 1, "{chunks:?}");
                        assert_eq!(chunks[0].typ, TYPE_NONE, "{chunks:?}");
                    }
                    seen.push(cookie);
                }
                assert!(partial.is_empty(), "unfinished replies: {partial:?}");
            }
        }
        seen.sort();
        assert_eq!(seen, vec![1, 2, 3], "{style:?}: every request before DISC answered once");
        c.expect_closed(&format!("{style:?}: after NBD_CMD_DISC (which has no reply)"));
        // The write before DISC was applied.
        let (mut c2, _) = Conn::open(&server, "a", Style::Simple, false);
        assert_eq!(c2.read(5, 0, 65536), d);
    }
}

/// Spec (multi-conn): 8 raw clients pipelining writes to one export concurrently all see their writes after FLUSH.
#[test]
fn concurrent_raw_clients_share_one_export() {
    let server = memory_server();
    let addr = server.tcp_addr();
    let handles: Vec<_> = (0..8u64)
        .map(|i| {
            thread::spawn(move || {
                let (mut c, _) = Conn::open_addr(addr, "a", Style::Simple, false);
                let d = data(i, 65536);
                let mut burst = Vec::new();
                for k in 0..16u64 {
                    burst.extend(c.write_bytes(k, (i * 16 + k) * 65536, &d));
                }
                c.send(&burst);
                let mut cookies: Vec<u64> = (0..16)
                    .map(|_| {
                        let (errno, cookie) = c.simple_reply();
                        assert_eq!(errno, 0, "client {i} write {cookie}");
                        cookie
                    })
                    .collect();
                cookies.sort();
                assert_eq!(cookies, (0..16).collect::<Vec<_>>(), "client {i}: every write answered once");
                assert_eq!(c.cmd(0, CMD_FLUSH, 99, 0, 0), 0, "client {i} FLUSH");
                let _ = c.s.shutdown(Shutdown::Both);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread");
    }
    let (mut c, _) = Conn::open(&server, "a", Style::Simple, false);
    for i in 0..8u64 {
        for k in [0, 15] {
            assert!(c.read(100 + i * 16 + k, (i * 16 + k) * 65536, 65536) == data(i, 65536), "client {i}'s write {k}");
        }
    }
}

// ===========================================================================
// Robustness: garbage from many clients
// ===========================================================================

/// One hostile session on export "junk": random bytes, either during the
/// handshake or after a valid one (then often with a valid request magic
/// and random fields). Returns false if the server failed to close the
/// connection after we half-closed it.
fn garbage_session(addr: SocketAddr, rng: &mut Rng) -> bool {
    let junk_size = 256 * MIB;
    let mode = rng.below(4);
    let (mut c, style) = if mode == 0 {
        let mut c = Conn::connect_addr(addr);
        c.greeting();
        if rng.below(2) == 0 {
            c.send(&3u32.to_be_bytes());
        }
        (c, None)
    } else {
        let style = [Style::Simple, Style::Structured, Style::Extended][rng.below(3) as usize];
        let meta = style != Style::Simple && rng.below(2) == 0;
        let (c, info) = Conn::open_addr(addr, "junk", style, meta);
        assert_eq!(info.size, junk_size);
        (c, Some(style))
    };
    c.s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    // Drain whatever the server replies so it never blocks on us.
    let mut rd = c.s.try_clone().unwrap();
    rd.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
    let drain = thread::spawn(move || {
        let mut b = vec![0u8; 65536];
        loop {
            match rd.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) => return !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            }
        }
    });
    for _ in 0..1 + rng.below(40) {
        let piece = match style {
            Some(style) if rng.below(3) != 0 => {
                // A well-framed header with random contents.
                let flags = if rng.below(2) == 0 { rng.next() as u16 & 0x3f } else { rng.next() as u16 };
                let typ = if rng.below(4) == 0 { rng.next() as u16 } else { rng.below(9) as u16 };
                let offset = match rng.below(3) {
                    0 => rng.below(junk_size),
                    1 => junk_size - rng.below(8192),
                    _ => rng.next(),
                };
                let len = match rng.below(4) {
                    0 | 1 => rng.below(8192),
                    2 => rng.below(1 << 26),
                    _ => rng.next(),
                };
                let mut h = if style == Style::Extended {
                    Be::new().u32(EXTENDED_REQUEST_MAGIC).u16(flags).u16(typ).u64(rng.next()).u64(offset).u64(len).0
                } else {
                    Be::new().u32(REQUEST_MAGIC).u16(flags).u16(typ).u64(rng.next()).u64(offset).u32(len as u32).0
                };
                let payload = rng.below(2) * rng.below(len.min(8192) + 1);
                h.extend(rng.bytes(payload as usize));
                h
            }
            _ => {
                let n = 1 + rng.below(300) as usize;
                rng.bytes(n)
            }
        };
        if c.s.write_all(&piece).is_err() {
            break; // the server hung up on us: fine
        }
    }
    let _ = c.s.shutdown(Shutdown::Write);
    drain.join().unwrap()
}

/// Garbage from 20 hostile clients is contained: each is closed, a well-behaved client and the server keep working.
#[test]
fn garbage_from_20_clients_does_not_affect_a_well_behaved_client() {
    let server = Server::start(&[
        "--export",
        "good=memory:?size=16M",
        "--export",
        "junk=memory:?size=256M",
        "--listen",
        "127.0.0.1:0",
    ]);
    let addr = server.tcp_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let sessions = Arc::new(AtomicUsize::new(0));
    let hostile: Vec<_> = (0..20u64)
        .map(|i| {
            let stop = stop.clone();
            let sessions = sessions.clone();
            thread::spawn(move || {
                let mut rng = Rng::new(0x5EED_0000 + i);
                let mut stuck = 0;
                while !stop.load(Ordering::Relaxed) {
                    if !garbage_session(addr, &mut rng) {
                        stuck += 1;
                    }
                    sessions.fetch_add(1, Ordering::Relaxed);
                }
                stuck
            })
        })
        .collect();

    // The well-behaved client: write, read back, verify, for ~1.5 s.
    let (mut good, _) = Conn::open(&server, "good", Style::Structured, true);
    let mut rng = Rng::new(42);
    let t0 = Instant::now();
    let mut ops = 0u64;
    let mut shadow = vec![0u8; 16 * MIB as usize];
    while t0.elapsed() < Duration::from_millis(1500) || ops < 20 {
        let off = rng.below(16 * MIB / 4096 - 4) * 4096;
        let d = data(ops, 4096 + rng.below(3) as usize * 4096);
        good.write_ok(2 * ops + 1, off, &d);
        shadow[off as usize..off as usize + d.len()].copy_from_slice(&d);
        let rd_off = rng.below(16 * MIB / 4096 - 4) * 4096;
        let got = good.read(2 * ops + 2, rd_off, 16384);
        assert_eq!(got, &shadow[rd_off as usize..rd_off as usize + 16384], "good client read at {rd_off}");
        ops += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let stuck: usize = hostile.into_iter().map(|t| t.join().expect("hostile client thread")).sum();
    let n = sessions.load(Ordering::Relaxed);
    assert!(n >= 20, "only {n} hostile sessions ran");
    assert_eq!(stuck, 0, "{stuck} of {n} hostile connections were not closed after the client half-closed them");

    // The server is alive, the good session still works, new ones too.
    let mut server = server;
    assert!(server.is_running(), "server died\n{}", server.logs());
    assert_no_panics(&server);
    assert_eq!(good.read(1, 0, 4096), &shadow[..4096]);
    let (mut fresh, _) = Conn::open(&server, "good", Style::Simple, false);
    assert_eq!(fresh.read(1, 8192, 4096), &shadow[8192..12288]);
}

// ===========================================================================
// Shutdown
// ===========================================================================

/// Spec: on shutdown, in-flight requests finish and later requests get
/// NBD_ESHUTDOWN; then the server disconnects and exits 0.
#[test]
fn requests_after_sigterm_get_eshutdown_then_the_server_closes() {
    let mut server = memory_server();
    let (mut c, _) = Conn::open(&server, "a", Style::Structured, false);
    let d = data(3, 4096);
    c.send(&c.write_bytes(1, 0, &d));
    assert_eq!(c.chunks(1).len(), 1, "write before shutdown succeeds");

    server.signal(libc::SIGTERM);
    // Give the server a moment to see the signal, but less than its grace period.
    thread::sleep(Duration::from_millis(150));
    c.request(0, CMD_READ, 2, 0, 4096);
    let chunks = c.chunks(2);
    let last = chunks.last().expect("a reply to the late request");
    assert!(last.done());
    assert_eq!(last.error().0, 108, "late request must get NBD_ESHUTDOWN");
    c.expect_closed_within(Duration::from_secs(5), "server closes after shutdown");
    let status = server.wait_timeout(Duration::from_secs(5)).expect("server exits after SIGTERM");
    assert!(status.success(), "server exit status {status:?}");
}
