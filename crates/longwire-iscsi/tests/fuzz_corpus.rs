//! Replays the fuzz corpus (fuzz/corpus/<target>/ and fixed crash
//! reproducers in fuzz/artifacts/<target>/crash-*) through the iSCSI and
//! SCSI fuzz harnesses, plus a few thousand deterministic pseudo-random
//! inputs. The harnesses are `include!`d from fuzz/src/harness_iscsi.rs:
//! the same code cargo-fuzz runs, on stable Rust. See docs/RELIABILITY.md.

include!("../../../fuzz/src/harness_iscsi.rs");
include!("../../../fuzz/src/replay.rs");

#[test]
fn iscsi_pdu_corpus() {
    replay("iscsi_pdu", 3, iscsi_pdu);
    random_inputs("iscsi_pdu", 3000, 512, iscsi_pdu);
}

#[test]
fn iscsi_keys_corpus() {
    replay("iscsi_keys", 5, iscsi_keys);
    random_inputs("iscsi_keys", 3000, 256, iscsi_keys);
}

#[test]
fn scsi_cdb_corpus() {
    replay("scsi_cdb", 10, scsi_cdb);
    random_inputs("scsi_cdb", 5000, 20, scsi_cdb);
}
