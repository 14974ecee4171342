//! The mirror's [`LayerStatus`]: a state word, a sentence, and gauges.

use std::sync::atomic::Ordering;

use longwire_core::{Gauge, LayerStatus};

use super::{Phase, Shared};

pub(super) fn status(s: &Shared) -> LayerStatus {
    let phase = s.phase.lock().clone();
    let replica = s.connector.describe();
    let dirty = s.bitmap.count() * s.bitmap.region_size();
    let sent = s.stats.resync_sent.load(Ordering::Relaxed);
    let mut rate = 0.0;
    let (state, detail) = match &phase {
        Phase::Connecting { reason } => (
            "connecting",
            match reason {
                Some(r) => format!("replica {replica} not reached yet ({r}); {} dirty", size(dirty)),
                None => format!("connecting to replica {replica}"),
            },
        ),
        Phase::Degraded { since, reason } => (
            "degraded",
            format!(
                "replica {replica} lost {:.0} s ago ({reason}); writes go on locally, {} to resync when it is back",
                since.elapsed().as_secs_f64(),
                size(dirty)
            ),
        ),
        Phase::Refused { reason } => (
            "refused",
            format!(
                "replica {replica} refused: {reason}; {} dirty. To overwrite it with this volume, create {}",
                size(dirty),
                s.paths.force_full.display()
            ),
        ),
        Phase::Resyncing { started, full } => {
            let done = sent - s.stats.sent_at_start.load(Ordering::Relaxed);
            let secs = started.elapsed().as_secs_f64().max(0.001);
            rate = done as f64 / secs;
            (
                "resyncing",
                format!(
                    "{} resync to {replica}: {} left, {} sent at {}/s",
                    if *full { "full" } else { "dirty-region" },
                    size(dirty),
                    size(done),
                    size(rate as u64)
                ),
            )
        }
        Phase::InSync => ("in-sync", format!("replica {replica}, {} mode", s.opts.mode)),
    };
    let is = |p: bool| if p { 1.0 } else { 0.0 };
    LayerStatus {
        layer: "mirror",
        state: state.to_string(),
        detail,
        gauges: vec![
            Gauge::new(
                "in_sync",
                "1 when the replica has every write",
                is(matches!(phase, Phase::InSync)),
            ),
            Gauge::new(
                "connected",
                "1 while the replica is connected and accepted",
                is(matches!(phase, Phase::InSync | Phase::Resyncing { .. })),
            ),
            Gauge::new(
                "dirty_bytes",
                "Bytes marked for resync (whole regions)",
                dirty as f64,
            ),
            Gauge::new(
                "resync_sent_bytes",
                "Data bytes copied to the replica by resyncs since start",
                sent as f64,
            ),
            Gauge::new(
                "resync_zeroed_bytes",
                "Bytes zeroed on the replica by resyncs since start (no data sent)",
                s.stats.resync_zeroed.load(Ordering::Relaxed) as f64,
            ),
            Gauge::new(
                "resync_rate_bytes_per_second",
                "Data rate of the running resync",
                rate,
            ),
            Gauge::new(
                "lag_bytes",
                "Async mode: bytes written locally not yet acknowledged by the replica",
                s.stats.lag_bytes.load(Ordering::Relaxed) as f64,
            ),
        ],
    }
}

/// Binary units, one decimal: `12.0 MiB`.
fn size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
