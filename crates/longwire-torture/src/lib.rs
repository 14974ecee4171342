//! Torture tests for longwire, run against the real `longwire` binary.
//!
//! - [`crash`]: SIGKILL the server at random moments under a verifying
//!   writer and check, after each restart, that everything a FLUSH or FUA
//!   covered survived and nothing is torn.
//! - [`net`]: clients behind a [`fault_proxy::FaultProxy`] that stalls,
//!   delays, splits, drops and resets their connections; the server must
//!   keep serving others, release everything and shut down promptly.
//!
//! The pieces are usable on their own: [`fault_proxy`] by any test that
//! needs a flaky network, [`writer`] + [`ledger`] + [`verify`] by any test
//! that wants to know exactly what a volume may hold after a failure.

pub mod block;
pub mod crash;
pub mod fault_proxy;
pub mod ledger;
pub mod net;
pub mod rng;
pub mod server_process;
pub mod store;
pub mod verify;
pub mod writer;
