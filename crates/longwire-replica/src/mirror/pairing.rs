//! The supervisor: reach the replica, check that it is the right one,
//! resync it, and start over whenever the link is lost.
//!
//! Checking means reading the metadata record at the end of the replica
//! and applying [`meta::decide`]. Once accepted, the replica's record is
//! set to this volume's current generation (marked inconsistent) *before*
//! the resync writes anything, and the local record remembers that
//! generation as the replica's; the record is marked consistent when the
//! resync ends. So a primary restarted in the middle of a resync finds a
//! replica at its own generation and a bitmap holding what is left: it
//! resumes instead of refusing or starting over.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tracing::{error, info, warn};

use super::meta::{self, Decision, Record, RECORD_LEN};
use super::{resync, state_files, Link, Phase, Shared};

enum PairError {
    /// Could not talk to it; try again later.
    Unreachable(String),
    /// Talked to it, and it must not be overwritten.
    Refused(String),
}

pub(super) async fn supervise(s: Arc<Shared>) {
    let mut last_refusal = String::new();
    loop {
        if s.current_link().is_some() {
            s.lost.notified().await;
            continue;
        }
        match pair(&s).await {
            Ok((link, full)) => {
                last_refusal.clear();
                *s.phase.lock() = Phase::Resyncing {
                    started: Instant::now(),
                    full,
                };
                s.stats.sent_at_start.store(
                    s.stats.resync_sent.load(Ordering::Relaxed),
                    Ordering::Relaxed,
                );
                let started = Instant::now();
                let dirty = s.bitmap.count();
                info!(
                    "mirror: replica {} accepted; resyncing {dirty} dirty regions ({} bytes at most){}",
                    s.connector.describe(),
                    dirty * s.bitmap.region_size(),
                    if full { " — full initial sync, holes are zeroed without sending data" } else { "" }
                );
                match resync::run(&s, &link).await {
                    Ok(()) => {
                        if let Err(e) = finish(&s, &link).await {
                            s.degrade(link.epoch, e);
                            continue;
                        }
                        let sent = s.stats.resync_sent.load(Ordering::Relaxed)
                            - s.stats.sent_at_start.load(Ordering::Relaxed);
                        info!(
                            resync_sent_bytes = sent,
                            "mirror: in sync with {} (resync sent {sent} bytes of data in {:.1} s)",
                            s.connector.describe(),
                            started.elapsed().as_secs_f64()
                        );
                    }
                    Err(e) => warn!("mirror: resync interrupted: {e}"),
                }
            }
            Err(PairError::Unreachable(reason)) => {
                {
                    let mut phase = s.phase.lock();
                    match &mut *phase {
                        Phase::Connecting { reason: r } => *r = Some(reason),
                        Phase::Degraded { reason: r, .. } => *r = reason,
                        other => {
                            *other = Phase::Degraded {
                                since: Instant::now(),
                                reason,
                            }
                        }
                    }
                }
                tokio::time::sleep(s.opts.retry_interval).await;
            }
            Err(PairError::Refused(reason)) => {
                if reason != last_refusal {
                    error!(
                        "mirror: refusing to resync replica {}: {reason}. The volume stays degraded. \
                         To overwrite the replica with this volume (a full resync), create the file {}",
                        s.connector.describe(),
                        s.paths.force_full.display()
                    );
                    last_refusal = reason.clone();
                }
                *s.phase.lock() = Phase::Refused { reason };
                tokio::time::sleep(s.opts.retry_interval).await;
            }
        }
    }
}

/// Connect, read the replica's record, decide, and on acceptance stamp the
/// replica with our generation and install the link. Returns the link and
/// whether this is a full sync.
async fn pair(s: &Arc<Shared>) -> Result<(Link, bool), PairError> {
    let timeout = s.opts.connect_timeout;
    let remote = tokio::time::timeout(timeout, s.connector.connect())
        .await
        .map_err(|_| PairError::Unreachable(format!("no connection within {timeout:?}")))?
        .map_err(PairError::Unreachable)?;
    let need = s.size() + RECORD_LEN as u64;
    if remote.size() < need {
        return Err(PairError::Refused(format!(
            "the replica is {} bytes, but needs at least {need}: this volume's {} bytes plus 4 KiB for the \
             mirror's metadata at its end; make it larger",
            remote.size(),
            s.size()
        )));
    }
    if remote.capabilities().read_only {
        return Err(PairError::Refused("the replica is read-only".into()));
    }
    let at = remote.size() - RECORD_LEN as u64;
    let bytes = tokio::time::timeout(timeout, remote.read(at, RECORD_LEN))
        .await
        .map_err(|_| {
            PairError::Unreachable(format!("reading its metadata took longer than {timeout:?}"))
        })?
        .map_err(|e| PairError::Unreachable(format!("reading its metadata: {e}")))?;
    let theirs = Record::decode(&bytes);

    let mut rec = s.record.lock().await;
    let forced = s.paths.force_full.exists();
    let decision = if forced {
        Decision::FullSync
    } else {
        meta::decide(&rec, &theirs)
    };
    let full = match decision {
        Decision::Refuse(why) => return Err(PairError::Refused(why)),
        Decision::FullSync => true,
        Decision::Resync => false,
    };
    if full {
        if forced {
            warn!(
                "mirror: {} exists: overwriting the replica with a full resync",
                s.paths.force_full.display()
            );
        }
        s.bitmap.set(0..s.bitmap.regions());
        s.bitmap
            .persist_async()
            .await
            .map_err(|e| PairError::Unreachable(format!("saving the bitmap: {e}")))?;
    }
    // From here on the replica follows this generation; it is inconsistent
    // until the resync finishes.
    let mut stamp = rec.clone();
    stamp.peer = None;
    stamp.consistent = false;
    remote
        .write(at, Bytes::from(stamp.encode()), true)
        .await
        .map_err(|e| PairError::Unreachable(format!("writing its metadata: {e}")))?;
    let mut next = rec.clone();
    next.peer = Some(rec.current);
    let path = s.paths.meta.clone();
    let saved = next.clone();
    tokio::task::spawn_blocking(move || state_files::save(&path, &saved))
        .await
        .map_err(|e| PairError::Unreachable(e.to_string()))?
        .map_err(|e| PairError::Unreachable(format!("saving the local metadata: {e}")))?;
    *rec = next;
    s.alone.store(false, std::sync::atomic::Ordering::Release);
    if forced {
        let _ = std::fs::remove_file(&s.paths.force_full);
    }
    let link = {
        let mut log = s.activity.lock();
        log.epoch += 1;
        log.regions.clear();
        let link = Link {
            volume: remote,
            epoch: log.epoch,
        };
        *s.link.write() = Some(link.clone());
        link
    };
    Ok((link, full))
}

/// The resync is over: mark the replica's record consistent.
async fn finish(s: &Arc<Shared>, link: &Link) -> Result<(), String> {
    let rec = s.record.lock().await;
    let mut stamp = rec.clone();
    stamp.peer = None;
    stamp.consistent = true;
    // The replica carries the generation it was paired at; a later local
    // generation (a write failed over in between) is caught by the next
    // pairing, not here.
    stamp.current = rec.peer.unwrap_or(rec.current);
    drop(rec);
    let at = link.volume.size() - RECORD_LEN as u64;
    link.volume
        .write(at, Bytes::from(stamp.encode()), true)
        .await
        .map_err(|e| format!("writing its metadata: {e}"))?;
    // Under the activity lock, so a degradation racing with this wins.
    let log = s.activity.lock();
    if log.epoch == link.epoch {
        *s.phase.lock() = Phase::InSync;
    }
    Ok(())
}
