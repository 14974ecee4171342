//! The single-writer lease: one object, `PREFIX/lease.json`, naming the
//! server that may write the volume and until when.
//!
//! Two servers writing one volume through two write-back caches would
//! overwrite each other's chunks, so opening for writing takes the lease
//! and a second server is refused with the holder's name. The holder
//! renews it every TTL/3; a crashed holder's lease runs out after the TTL
//! (at once when the holder was on this host and its pid is gone).
//!
//! Taking and renewing use conditional writes (`If-None-Match: *` to
//! create, `If-Match: ETAG` to replace), so two servers racing for the
//! lease cannot both win. Not every server honours them — Garage 2.5
//! answers 200 to `If-None-Match: *` on an existing key — so [`probe`]
//! writes a probe key twice with create-only semantics: a refused second
//! write proves the server honours them. Otherwise the lease is
//! [`LeaseMode::BestEffort`]: write a fresh token, wait, read it back, and
//! give up if another token is there. That catches a second server started
//! later, but two servers starting within the wait can both win.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use object_store::{PutMode, UpdateVersion};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::bucket::Bucket;
use super::manifest::Layout;

/// How the lease is enforced; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseMode {
    /// The server honours conditional writes: taking the lease is atomic.
    Conditional,
    /// Write, wait, read back: refuses a later second writer, not a
    /// simultaneous one.
    BestEffort,
    /// Opened read-only: no lease taken.
    None,
}

impl LeaseMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseMode::Conditional => "conditional",
            LeaseMode::BestEffort => "best-effort",
            LeaseMode::None => "none (read-only)",
        }
    }
}

/// What `lease.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Host name of the holder.
    pub host: String,
    pub pid: u32,
    /// Unix seconds when the holder took the lease.
    pub since: u64,
    /// Unix seconds after which the lease is free unless renewed.
    pub expires: u64,
    /// Random per open, so a holder recognises its own lease.
    pub token: String,
}

impl LeaseRecord {
    /// "host H, pid P, since 2026-… (N s ago)" for messages.
    pub fn describe(&self) -> String {
        let now = unix_now();
        format!(
            "host {}, pid {}, since {} ({} s ago; lease expires in {} s unless renewed)",
            self.host,
            self.pid,
            utc(self.since),
            now.saturating_sub(self.since),
            self.expires.saturating_sub(now)
        )
    }

    /// Still held: not expired, and not left by a dead process of this host.
    pub(crate) fn is_live(&self) -> bool {
        if unix_now() >= self.expires {
            return false;
        }
        if self.host == host_name() && !pid_alive(self.pid) {
            return false;
        }
        true
    }
}

/// A held lease. Writes check [`Lease::check`]; a background task renews it.
pub struct Lease {
    pub mode: LeaseMode,
    pub ttl: Duration,
    record: Mutex<LeaseRecord>,
    /// Version of our last write of `lease.json`, for conditional renewal.
    version: Mutex<UpdateVersion>,
    /// Unix milliseconds until which our lease is known to be valid; 0 once
    /// another holder has taken it.
    valid_until_ms: AtomicU64,
    /// Set when another server took the lease: who.
    lost_to: Mutex<Option<String>>,
    /// Given back at close: never renewed (which would take it again) and
    /// no longer lets writes through.
    released: AtomicBool,
    /// Keeps a renewal and the release from interleaving, so a renewal
    /// that read the lease before the release cannot write it back after.
    updating: tokio::sync::Mutex<()>,
}

/// Everything in the lease that messages and `info` need.
#[derive(Debug, Clone)]
pub struct LeaseInfo {
    pub mode: LeaseMode,
    pub holder: Option<LeaseRecord>,
}

impl Lease {
    /// Ok while writes may go to the bucket; otherwise why not.
    pub fn check(&self) -> Result<(), String> {
        if self.is_released() {
            return Err(
                "the volume was closed and its lease given back; this server no longer writes it"
                    .into(),
            );
        }
        if let Some(who) = self.lost_to.lock().as_ref() {
            return Err(format!(
                "the volume's lease was taken over by {who}; this server no longer writes it"
            ));
        }
        if unix_now_ms() >= self.valid_until_ms.load(Ordering::Relaxed) {
            return Err("the volume's lease could not be renewed in time (bucket unreachable?); writes are refused until it is".into());
        }
        Ok(())
    }

    /// True once [`Lease::release`] ran.
    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::Relaxed)
    }

    pub fn record(&self) -> LeaseRecord {
        self.record.lock().clone()
    }

    /// Renew once; on success the lease is valid for another TTL.
    pub async fn renew(&self, bucket: &Bucket, layout: &Layout) -> Result<(), String> {
        let _updating = self.updating.lock().await;
        if self.is_released() {
            return Err("lease released".into());
        }
        if self.lost_to.lock().is_some() {
            return Err("lease lost".into());
        }
        let mut rec = self.record();
        rec.expires = unix_now() + self.ttl.as_secs().max(1);
        let started = unix_now_ms();
        let body = Bytes::from(serde_json::to_vec(&rec).expect("serializes"));
        let result = match self.mode {
            LeaseMode::Conditional => {
                let v = self.version.lock().clone();
                bucket.put(&layout.lease(), body, PutMode::Update(v)).await
            }
            _ => match bucket.get(&layout.lease()).await {
                Ok(Some(f)) => match serde_json::from_slice::<LeaseRecord>(&f.bytes) {
                    Ok(other) if other.token != rec.token => {
                        Err(object_store::Error::Precondition {
                            path: layout.lease().to_string(),
                            source: "taken".into(),
                        })
                    }
                    _ => bucket.put(&layout.lease(), body, PutMode::Overwrite).await,
                },
                Ok(None) => bucket.put(&layout.lease(), body, PutMode::Overwrite).await,
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(put) => {
                *self.version.lock() = UpdateVersion {
                    e_tag: put.e_tag,
                    version: put.version,
                };
                *self.record.lock() = rec;
                self.valid_until_ms
                    .store(started + self.ttl.as_millis() as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(object_store::Error::Precondition { .. })
            | Err(object_store::Error::AlreadyExists { .. }) => {
                let holder = match read(bucket, layout).await {
                    Ok(Some(r)) => r.describe(),
                    _ => "another server".into(),
                };
                *self.lost_to.lock() = Some(holder.clone());
                self.valid_until_ms.store(0, Ordering::Relaxed);
                Err(format!("lease taken over by {holder}"))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Delete the lease if it is still ours (clean shutdown, a failed
    /// open), so the next server need not wait for it to expire. Stops
    /// renewal and writes first, whether or not the delete gets through.
    pub async fn release(&self, bucket: &Bucket, layout: &Layout) -> Result<(), String> {
        let _updating = self.updating.lock().await;
        self.released.store(true, Ordering::Relaxed);
        self.valid_until_ms.store(0, Ordering::Relaxed);
        match read(bucket, layout).await? {
            Some(r) if r.token == self.record().token => bucket
                .delete(&layout.lease())
                .await
                .map_err(|e| format!("deleting {}: {e}", layout.lease())),
            // Taken over or already gone: nothing of ours to delete.
            _ => Ok(()),
        }
    }
}

/// Does the server refuse a create-only write over an existing key?
pub async fn probe(bucket: &Bucket, layout: &Layout) -> Result<LeaseMode, String> {
    let key = layout.probe(&random_token());
    let body = Bytes::from_static(b"probe");
    let first = bucket.put(&key, body.clone(), PutMode::Create).await;
    let mode = match first {
        Err(object_store::Error::NotImplemented) => Ok(LeaseMode::BestEffort),
        Err(e) => Err(format!("writing the probe object {key}: {e}")),
        Ok(_) => match bucket.put(&key, body, PutMode::Create).await {
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(LeaseMode::Conditional),
            Ok(_) | Err(object_store::Error::NotImplemented) => Ok(LeaseMode::BestEffort),
            Err(e) => Err(format!("writing the probe object {key}: {e}")),
        },
    };
    let _ = bucket.delete(&key).await;
    mode
}

/// The current lease record, if any. An unreadable one counts as absent
/// (it will be replaced), never as a reason to panic.
pub async fn read(bucket: &Bucket, layout: &Layout) -> Result<Option<LeaseRecord>, String> {
    Ok(read_versioned(bucket, layout).await?.map(|(r, _)| r))
}

async fn read_versioned(
    bucket: &Bucket,
    layout: &Layout,
) -> Result<Option<(LeaseRecord, UpdateVersion)>, String> {
    match bucket.get(&layout.lease()).await {
        Ok(Some(f)) => {
            let v = UpdateVersion {
                e_tag: f.e_tag,
                version: f.version,
            };
            Ok(Some((
                serde_json::from_slice(&f.bytes).unwrap_or(LeaseRecord {
                    host: "(unreadable lease.json)".into(),
                    pid: 0,
                    since: 0,
                    expires: 0,
                    token: String::new(),
                }),
                v,
            )))
        }
        Ok(None) => Ok(None),
        Err(e) => Err(format!("reading {}: {e}", layout.lease())),
    }
}

/// Take the lease for writing, or say who holds it. `settle` is the
/// best-effort mode's wait between writing and reading back.
pub async fn acquire(
    bucket: &Bucket,
    layout: &Layout,
    ttl: Duration,
    settle: Duration,
) -> Result<Arc<Lease>, String> {
    let mode = probe(bucket, layout).await?;
    let ttl_s = ttl.as_secs().max(1);
    for _ in 0..5 {
        let existing = read_versioned(bucket, layout).await?;
        if let Some((rec, _)) = &existing {
            if rec.is_live() {
                return Err(in_use(bucket, layout, rec));
            }
        }
        let now = unix_now();
        let rec = LeaseRecord {
            host: host_name(),
            pid: std::process::id(),
            since: now,
            expires: now + ttl_s,
            token: random_token(),
        };
        let started = unix_now_ms();
        let body = Bytes::from(serde_json::to_vec(&rec).expect("serializes"));
        let put_mode = match (mode, &existing) {
            (LeaseMode::Conditional, Some((_, v))) => PutMode::Update(v.clone()),
            (LeaseMode::Conditional, None) => PutMode::Create,
            _ => PutMode::Overwrite,
        };
        let put = match bucket.put(&layout.lease(), body, put_mode).await {
            Ok(p) => p,
            // Someone else wrote the lease between our read and write: look again.
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => continue,
            Err(e) => return Err(format!("writing {}: {e}", layout.lease())),
        };
        if mode == LeaseMode::BestEffort {
            tokio::time::sleep(settle).await;
            match read(bucket, layout).await? {
                Some(now_there) if now_there.token != rec.token => {
                    return Err(in_use(bucket, layout, &now_there));
                }
                _ => {}
            }
        }
        return Ok(Arc::new(Lease {
            mode,
            ttl,
            record: Mutex::new(rec),
            version: Mutex::new(UpdateVersion {
                e_tag: put.e_tag,
                version: put.version,
            }),
            valid_until_ms: AtomicU64::new(started + ttl.as_millis() as u64),
            lost_to: Mutex::new(None),
            released: AtomicBool::new(false),
            updating: tokio::sync::Mutex::new(()),
        }));
    }
    Err(format!(
        "{}/{}: could not take the lease: other servers keep changing it",
        bucket.name, layout.prefix
    ))
}

fn in_use(bucket: &Bucket, layout: &Layout, rec: &LeaseRecord) -> String {
    format!(
        "the volume {} in {} is in use by another server ({}); stop that server, open it with \
         readonly=true, or wait for its lease to expire",
        layout.prefix,
        bucket.name,
        rec.describe()
    )
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// 128 random bits as hex, from the kernel.
pub fn random_token() -> String {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Practically unreachable; fall back to time and pid, still unique per open.
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = (t ^ ((std::process::id() as u128) << 64)).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn pid_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as i32, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Unix seconds as `2026-11-21 12:34:56 UTC`, for people reading messages.
fn utc(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map_or_else(
            || format!("{unix} (unix time)"),
            |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        )
}
