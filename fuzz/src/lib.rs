//! Fuzz harnesses for longwire's sans-IO decoders.
//!
//! The harness bodies live in `harness_nbd.rs` and `harness_iscsi.rs` so that
//! the stable-Rust replay tests (`crates/longwire-nbd/tests/fuzz_corpus.rs`,
//! `crates/longwire-iscsi/tests/fuzz_corpus.rs`) can `include!` the very same
//! code and replay the corpus in CI without nightly or libFuzzer.

include!("harness_nbd.rs");
include!("harness_iscsi.rs");
