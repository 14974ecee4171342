// Shared iSCSI / SCSI fuzz harnesses.
//
// Compiled twice through identical code: by the cargo-fuzz crate
// (fuzz/src/lib.rs) and by the stable-Rust replay test
// crates/longwire-iscsi/tests/fuzz_corpus.rs, which `include!`s it. Keep it
// free of inner attributes and refer to everything by full path.

/// `iscsi_pdu`: byte 0 selects the digests in force (bit 0 header, bit 1
/// data); the rest is a byte stream split into frames with
/// `pdu::split_frames`, and every frame is parsed with `Pdu::parse`. A
/// parsed PDU is re-encoded and the result must parse again. The stream is
/// also framed BHS by BHS through `Layout`/`decode_frame` directly.
pub fn iscsi_pdu(data: &[u8]) {
    use longwire_iscsi::pdu::{self, Bhs, Layout, Pdu, BHS_LEN};
    let Some((&setup, stream)) = data.split_first() else { return };
    let digests = longwire_iscsi::digest::Digests { header: setup & 1 != 0, data: setup & 2 != 0 };
    if let Ok((raws, used)) = pdu::split_frames(stream, digests) {
        assert!(used <= stream.len(), "split_frames used {used} of {} bytes", stream.len());
        for raw in &raws {
            if let Ok(p) = Pdu::parse(raw) {
                let _ = p.opcode();
                let again = p.to_raw();
                let _ = Pdu::parse(&again);
                let _ = p.encode(digests);
            }
        }
    }
    // Direct framing of the first BHS, with whatever follows it (usually a
    // length mismatch, which must be an error, not a panic).
    if stream.len() >= BHS_LEN {
        let bhs = Bhs(stream[..BHS_LEN].try_into().unwrap());
        let layout = Layout::of(&bhs, digests);
        let _ = (bhs.opcode(), bhs.immediate(), bhs.final_bit(), bhs.lun(), bhs.itt(), bhs.flags());
        let _ = pdu::op::name(bhs.opcode());
        let rest = &stream[BHS_LEN..];
        let _ = pdu::header_digest_ok(&bhs, rest, digests);
        let _ = pdu::decode_frame(bhs, rest, digests);
        if rest.len() >= layout.rest() {
            if let Ok(raw) = pdu::decode_frame(bhs, &rest[..layout.rest()], digests) {
                let _ = Pdu::parse(&raw);
            }
        }
    }
}

/// `iscsi_keys`: byte 0 selects the session type and how the text is cut
/// into continuation PDUs; the rest is key=value text. It goes through
/// `TextAssembler`, `parse_text` and a `Negotiator` (twice, so that
/// re-negotiation paths run), and each value through the value parsers.
pub fn iscsi_keys(data: &[u8]) {
    use longwire_iscsi::keys::{self, Negotiator, Policy, SessionType, TextAssembler};
    let Some((&setup, text)) = data.split_first() else { return };
    let session_type = if setup & 1 != 0 { SessionType::Discovery } else { SessionType::Normal };
    let piece = ((setup >> 1) as usize % 32) + 1;
    let mut asm = TextAssembler::default();
    let mut whole = None;
    let pieces = keys::split_text(text, piece);
    let n = pieces.len();
    for (i, p) in pieces.iter().enumerate() {
        match asm.push(p, i + 1 < n) {
            Ok(Some(t)) => whole = Some(t),
            Ok(None) => {}
            Err(_) => return,
        }
    }
    let whole = whole.expect("assembler never returned the text");
    assert_eq!(whole, text, "assembler changed the text");
    assert!(!asm.in_progress());
    let Ok(pairs) = keys::parse_text(&whole) else { return };
    // What parses must encode back to something that parses the same.
    let again = keys::parse_text(&keys::encode_text(&pairs)).expect("re-encoded text does not parse");
    assert_eq!(again, pairs);
    for (_, v) in &pairs {
        let _ = keys::parse_bool(v);
        let _ = keys::parse_number(v);
        let _ = keys::parse_range(v, 512, (1 << 24) - 1);
        let _ = keys::select_from_list(v, &["CRC32C", "None"]);
    }
    let mut neg = Negotiator::new(Policy::default(), session_type);
    if neg.negotiate(&pairs).is_ok() {
        let _ = neg.declaration();
        let _ = neg.negotiate(&pairs);
    }
}

/// `scsi_cdb`: the input is a CDB (any length, including shorter than the
/// opcode's own CDB length); decode it and compute its data transfer.
pub fn scsi_cdb(data: &[u8]) {
    use longwire_iscsi::scsi::cdb;
    if let Some(&op) = data.first() {
        let _ = cdb::cdb_len(op);
        let _ = cdb::Command::ignores_unit_attention(op);
    }
    if let Ok(cmd) = cdb::decode(data) {
        let _ = cmd.transfer();
    }
    // iSCSI always hands over a 16-byte CDB field; decode the padded form too.
    let mut padded = [0u8; 16];
    let n = data.len().min(16);
    padded[..n].copy_from_slice(&data[..n]);
    if let Ok(cmd) = cdb::decode(&padded) {
        let _ = cmd.transfer();
    }
}
