//! Network-fault torture, short CI run (`longwire-torture net` does the
//! long ones; figures in docs/RELIABILITY.md). Clients reach the real
//! server through a proxy that stalls, delays, splits, drops and resets
//! their connections while doing verified I/O; a clean client beside them
//! must keep getting answers. Then every connection must be released,
//! threads and memory back near the baseline, and SIGTERM with stalled
//! clients attached must end the server within 5 s.

use std::path::PathBuf;
use std::time::Duration;

use longwire_torture::net::{self, NetOptions};

#[test]
fn server_survives_a_faulty_network() {
    let mut opts = NetOptions::new(4, 20, 0x4E7, PathBuf::from(env!("CARGO_BIN_EXE_longwire")));
    opts.fault_interval = Duration::from_millis(800);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s = rt
        .block_on(net::run(&opts, |l| eprintln!("{l}")))
        .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{s:#?}");
    let bad = net::judge(&s);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    // The faults really happened and really hit the clients.
    let f = s.faults;
    assert!(
        f.stalls > 0 && f.splits > 0 && f.delays > 0 && f.resets + f.closes > 0,
        "{f:?}"
    );
    assert!(s.sessions > 4, "no client ever lost its session: {s:?}");
    assert!(
        s.ops.writes > 1000 && s.ops.reads_verified > 100,
        "{:?}",
        s.ops
    );
    assert!(s.probe_requests > 100, "the clean client barely ran: {s:?}");
}
