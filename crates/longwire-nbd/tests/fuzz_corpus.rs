//! Replays the fuzz corpus (fuzz/corpus/<target>/ and fixed crash
//! reproducers in fuzz/artifacts/<target>/crash-*) through the NBD fuzz
//! harnesses, plus a few thousand deterministic pseudo-random inputs. The
//! harnesses are `include!`d from fuzz/src/harness_nbd.rs: the same code
//! cargo-fuzz runs, on stable Rust. See docs/RELIABILITY.md.

include!("../../../fuzz/src/harness_nbd.rs");
include!("../../../fuzz/src/replay.rs");

#[test]
fn nbd_handshake_corpus() {
    replay("nbd_handshake", 5, nbd_handshake);
    random_inputs("nbd_handshake", 3000, 256, nbd_handshake);
}

#[test]
fn nbd_requests_corpus() {
    replay("nbd_requests", 5, nbd_requests);
    random_inputs("nbd_requests", 3000, 512, nbd_requests);
}

#[test]
fn nbd_client_replies_corpus() {
    replay("nbd_client_replies", 5, nbd_client_replies);
    random_inputs("nbd_client_replies", 3000, 512, nbd_client_replies);
}
