//! The mirror layer: RAID 1 over NBD with dirty-region resync.
//!
//! [`Mirror`] is a [`Volume`] that serves reads from its local volume and
//! sends every change to the local volume and to a replica (any
//! [`Volume`]; in production an NBD export reached with longwire's client).
//!
//! - `sync` mode acknowledges a write once both copies have it (FLUSH and
//!   FUA durable on both); `async` acknowledges after the local copy and
//!   sends to the replica in the background, with at most `max_lag` bytes
//!   outstanding.
//! - A persistent [`RegionBitmap`] has a bit set for every region the
//!   replica may not have. Every write sets its regions' bits *durably
//!   before* it is sent anywhere (an activity log, as DRBD's), so a crash
//!   at any moment never leaves a difference the bitmap does not show; the
//!   bits of regions both copies have are cleared in the background, after
//!   a flush of both ([`activity`]).
//! - When the replica fails, the mirror degrades: writes go on locally and
//!   their bits stay set. A supervisor ([`pairing`]) reconnects, checks the
//!   replica's metadata record ([`meta`]) and, if it is the replica it
//!   expects, copies only the dirty regions ([`resync`]), throttled.
//!   Otherwise it refuses, says why in the log and in the status, and
//!   stays degraded.
//!
//! The replica must be at least 4 KiB larger than the local volume: its
//! last 4 KiB hold the metadata record, and the mirror exports the local
//! volume's size.

mod activity;
pub mod meta;
mod pairing;
mod range_lock;
mod report;
mod resync;
mod state_files;
mod throttle;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use longwire_core::{
    check_range, Capabilities, Extent, LayerStatus, ReadSegment, Volume, VolumeError, VolumeResult,
    ZeroFlags,
};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, Semaphore};
use tokio::task::AbortHandle;
use tracing::{info, warn};

use crate::bitmap::{Fill, RegionBitmap};
use meta::Record;
use range_lock::RangeLocks;
pub use state_files::StatePaths;
use throttle::Throttle;

/// When a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorMode {
    /// Once both copies have it; FLUSH and FUA reach both.
    Sync,
    /// Once the local copy has it; the replica follows with bounded lag.
    Async,
}

impl MirrorMode {
    pub fn parse(s: &str) -> Option<MirrorMode> {
        match s.to_ascii_lowercase().as_str() {
            "sync" => Some(MirrorMode::Sync),
            "async" => Some(MirrorMode::Async),
            _ => None,
        }
    }
}

impl std::fmt::Display for MirrorMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MirrorMode::Sync => "sync",
            MirrorMode::Async => "async",
        })
    }
}

/// Tunables of a [`Mirror`].
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    pub mode: MirrorMode,
    /// Bytes per dirty bit (a power of two). Default 64 KiB.
    pub region_size: u64,
    /// Resync bandwidth in bytes per second (0: unlimited). Default 50 MiB/s.
    pub resync_rate: u64,
    /// Resync copies in flight at once. Default 4.
    pub resync_parallel: usize,
    /// Async mode: bytes sent to the replica but not yet acknowledged by
    /// it before new writes wait. Default 64 MiB.
    pub max_lag: u64,
    /// Wait between attempts to reach (or re-check) the replica. Default 2 s.
    pub retry_interval: Duration,
    /// Connecting and reading the replica's record must finish within this.
    pub connect_timeout: Duration,
    /// How often bits of regions both copies have are cleared. Default 1 s.
    pub clean_interval: Duration,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            mode: MirrorMode::Sync,
            region_size: 64 << 10,
            resync_rate: 50 << 20,
            resync_parallel: 4,
            max_lag: 64 << 20,
            retry_interval: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(10),
            clean_interval: Duration::from_secs(1),
        }
    }
}

/// How the mirror reaches its replica. Called again after every failure,
/// so a connector returns a fresh connection each time (for NBD: a client
/// that does not reconnect on its own, with a short request timeout, so a
/// dead replica degrades the mirror instead of stalling writes).
#[async_trait]
pub trait ReplicaConnector: Send + Sync + 'static {
    /// For logs and status, e.g. the NBD URI.
    fn describe(&self) -> String;
    async fn connect(&self) -> Result<Arc<dyn Volume>, String>;
}

/// A [`ReplicaConnector`] from a closure, for callers that would rather
/// not implement an async trait.
pub fn connector_fn<F, Fut>(describe: String, connect: F) -> Box<dyn ReplicaConnector>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Arc<dyn Volume>, String>> + Send + 'static,
{
    struct FnConnector<F> {
        describe: String,
        connect: F,
    }
    #[async_trait]
    impl<F, Fut> ReplicaConnector for FnConnector<F>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Arc<dyn Volume>, String>> + Send + 'static,
    {
        fn describe(&self) -> String {
            self.describe.clone()
        }
        async fn connect(&self) -> Result<Arc<dyn Volume>, String> {
            (self.connect)().await
        }
    }
    Box::new(FnConnector { describe, connect })
}

/// A connected replica; `epoch` changes on every connect and disconnect,
/// so late results of an old connection are recognised and ignored.
#[derive(Clone)]
struct Link {
    volume: Arc<dyn Volume>,
    epoch: u64,
}

/// Where the pair stands.
#[derive(Debug, Clone)]
enum Phase {
    /// Not connected yet since start.
    Connecting {
        reason: Option<String>,
    },
    Degraded {
        since: Instant,
        reason: String,
    },
    /// Connected, but the replica is not the one this volume pairs with.
    Refused {
        reason: String,
    },
    Resyncing {
        started: Instant,
        full: bool,
    },
    InSync,
}

/// Regions whose bits are set only because a write to both copies may not
/// be durable on both yet (see [`activity`]); every other set bit is a
/// region the replica missed and the resync must copy.
struct ActivityLog {
    epoch: u64,
    /// Region → sequence number of the last write that reached both.
    regions: HashMap<u64, u64>,
}

struct Shared {
    local: Arc<dyn Volume>,
    connector: Box<dyn ReplicaConnector>,
    bitmap: Arc<RegionBitmap>,
    paths: StatePaths,
    opts: MirrorOptions,
    /// The local metadata record (and the lock that orders its updates).
    record: tokio::sync::Mutex<Record>,
    link: RwLock<Option<Link>>,
    activity: Mutex<ActivityLog>,
    seq: AtomicU64,
    /// A generation was started for writes without the replica since the
    /// last pairing.
    alone: AtomicBool,
    locks: Arc<RangeLocks>,
    phase: Mutex<Phase>,
    /// Wakes the supervisor when the link is lost.
    lost: Notify,
    throttle: Throttle,
    lag: Arc<Semaphore>,
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    /// Data bytes the resyncs copied to the replica since start.
    resync_sent: AtomicU64,
    /// Bytes the resyncs zeroed on the replica (no data sent).
    resync_zeroed: AtomicU64,
    /// `resync_sent` when the current resync started.
    sent_at_start: AtomicU64,
    /// Async mode: bytes written locally, not yet on the replica.
    lag_bytes: AtomicU64,
}

/// A change to apply to both copies.
#[derive(Clone)]
enum Change {
    Write(Bytes, bool),
    Zero(ZeroFlags),
}

/// Lag is counted in units of this many bytes (semaphore permits are u32).
const LAG_UNIT: u64 = 4096;

/// RAID 1 of a local volume and a replica. See the module docs.
pub struct Mirror {
    shared: Arc<Shared>,
    tasks: Vec<AbortHandle>,
}

impl Mirror {
    /// Wrap `local`, keeping state in `paths`, and start the background
    /// supervisor that connects to the replica (the mirror starts
    /// degraded until then). Must be called within a tokio runtime.
    pub fn open(
        local: Arc<dyn Volume>,
        connector: Box<dyn ReplicaConnector>,
        paths: StatePaths,
        opts: MirrorOptions,
    ) -> std::io::Result<Mirror> {
        let size = local.size();
        if local.capabilities().read_only {
            return Err(std::io::Error::other(
                "a read-only volume cannot be mirrored (it takes no writes to mirror)",
            ));
        }
        let (record, created) = state_files::load_or_create(&paths.meta, size)?;
        // A missing bitmap beside an existing record means we cannot know
        // what the replica missed: every region is dirty.
        let bitmap = Arc::new(RegionBitmap::open(
            &paths.bitmap,
            size,
            opts.region_size,
            Fill::Set,
        )?);
        if created {
            info!(
                "mirror of {} set up: volume id {}, generation {:016x}",
                connector.describe(),
                meta::hex(&record.volume_id),
                record.current
            );
        }
        let lag_units = (opts.max_lag / LAG_UNIT).clamp(1, u32::MAX as u64 / 2) as usize;
        let shared = Arc::new(Shared {
            local,
            connector,
            bitmap,
            paths,
            record: tokio::sync::Mutex::new(record),
            link: RwLock::new(None),
            activity: Mutex::new(ActivityLog {
                epoch: 0,
                regions: HashMap::new(),
            }),
            seq: AtomicU64::new(0),
            alone: AtomicBool::new(false),
            locks: Arc::new(RangeLocks::default()),
            phase: Mutex::new(Phase::Connecting { reason: None }),
            lost: Notify::new(),
            throttle: Throttle::new(opts.resync_rate),
            lag: Arc::new(Semaphore::new(lag_units)),
            stats: Stats::default(),
            opts,
        });
        let tasks = vec![
            tokio::spawn(pairing::supervise(Arc::clone(&shared))).abort_handle(),
            tokio::spawn(activity::clean_periodically(Arc::clone(&shared))).abort_handle(),
        ];
        Ok(Mirror { shared, tasks })
    }

    /// True when the replica has everything (no resync pending or running).
    pub fn in_sync(&self) -> bool {
        matches!(*self.shared.phase.lock(), Phase::InSync)
    }

    /// Data bytes resyncs have copied to the replica since start.
    pub fn resync_sent_bytes(&self) -> u64 {
        self.shared.stats.resync_sent.load(Ordering::Relaxed)
    }

    /// Regions currently marked dirty.
    pub fn dirty_regions(&self) -> u64 {
        self.shared.bitmap.count()
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Shared {
    fn size(&self) -> u64 {
        self.local.size()
    }

    /// The bytes of whole regions covering `[offset, offset + len)`.
    fn region_span(&self, offset: u64, len: u64) -> Range<u64> {
        let r = self.bitmap.regions_touching(offset, len);
        if r.is_empty() {
            return offset..offset;
        }
        self.bitmap.region_bytes(r.start).start..self.bitmap.region_bytes(r.end - 1).end
    }

    fn current_link(&self) -> Option<Link> {
        self.link.read().clone()
    }

    /// Set the bits of `regions` (the caller holds their range lock and
    /// persists afterwards). Returns the regions whose bits may be cleared
    /// once this write reaches both copies: those that were clean, or set
    /// only by earlier writes that reached both. Without a link the regions
    /// become plain "replica missed it".
    fn mark(&self, regions: Range<u64>, linked: bool) -> Vec<u64> {
        let mut log = self.activity.lock();
        let mut clearable = Vec::new();
        for r in regions.clone() {
            if !linked {
                log.regions.remove(&r);
            } else if !self.bitmap.get(r) || log.regions.contains_key(&r) {
                clearable.push(r);
            }
        }
        self.bitmap.set(regions);
        clearable
    }

    /// Both copies have the latest write to `regions` (sent over the link
    /// of `epoch`): their bits may be cleared after the next flush of both.
    fn reached_both(&self, regions: impl IntoIterator<Item = u64>, epoch: u64) {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let mut log = self.activity.lock();
        if log.epoch == epoch {
            log.regions.extend(regions.into_iter().map(|r| (r, seq)));
        }
    }

    /// The copies of `regions` may differ (e.g. the local write failed
    /// after the replica's succeeded): leave them to the resync.
    fn forget(&self, regions: Range<u64>) {
        let mut log = self.activity.lock();
        for r in regions {
            log.regions.remove(&r);
        }
    }

    /// The link of `epoch` failed: drop it and go on alone. Results of the
    /// old link that arrive later are ignored (the epoch moved on).
    fn degrade(&self, epoch: u64, reason: String) {
        {
            let mut log = self.activity.lock();
            if log.epoch != epoch {
                return;
            }
            log.epoch += 1;
            log.regions.clear();
            *self.link.write() = None;
        }
        warn!(
            "mirror degraded: replica {} failed ({reason}); writes go on locally and {} regions are marked for resync",
            self.connector.describe(),
            self.bitmap.count()
        );
        *self.phase.lock() = Phase::Degraded {
            since: Instant::now(),
            reason,
        };
        self.lost.notify_one();
    }

    /// Start a new generation before the first write the replica will
    /// miss, so a replica that is later written by someone else as a
    /// primary can be told apart from one that merely fell behind.
    async fn start_alone(&self) -> VolumeResult<()> {
        if self.alone.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut rec = self.record.lock().await;
        if self.alone.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut next = rec.clone();
        next.next_generation(state_files::new_generation()?);
        let path = self.paths.meta.clone();
        let saved = next.clone();
        tokio::task::spawn_blocking(move || state_files::save(&path, &saved))
            .await
            .map_err(std::io::Error::other)??;
        info!(
            "mirror: writing without the replica from generation {:016x} on",
            next.current
        );
        *rec = next;
        self.alone.store(true, Ordering::Release);
        Ok(())
    }

    async fn modify(self: &Arc<Self>, offset: u64, len: u64, change: Change) -> VolumeResult<()> {
        if !check_range(self.size(), offset, len) {
            return Err(VolumeError::NoSpace(format!(
                "{len} bytes at offset {offset} go past the end of the {}-byte volume",
                self.size()
            )));
        }
        if len == 0 {
            return apply(&*self.local, offset, len, &change).await;
        }
        let guard = self.locks.lock(self.region_span(offset, len)).await;
        let regions = self.bitmap.regions_touching(offset, len);
        let link = self.current_link();
        let clearable = self.mark(regions.clone(), link.is_some());
        // Durable before anything is written: see the module docs.
        self.bitmap.persist_async().await?;
        let Some(link) = link else {
            self.start_alone().await?;
            return apply(&*self.local, offset, len, &change).await;
        };
        match self.opts.mode {
            MirrorMode::Sync => {
                let (l, r) = tokio::join!(
                    apply(&*self.local, offset, len, &change),
                    apply(&*link.volume, offset, len, &change)
                );
                if let Err(e) = l {
                    self.forget(regions);
                    return Err(e);
                }
                match r {
                    Ok(()) => self.reached_both(clearable, link.epoch),
                    Err(e) => {
                        self.degrade(link.epoch, format!("write of {len} bytes at {offset}: {e}"));
                        self.start_alone().await?;
                    }
                }
                Ok(())
            }
            MirrorMode::Async => {
                let units = len
                    .div_ceil(LAG_UNIT)
                    .clamp(1, self.opts.max_lag.div_ceil(LAG_UNIT).max(1))
                    as u32;
                let permit = Arc::clone(&self.lag)
                    .acquire_many_owned(units)
                    .await
                    .map_err(std::io::Error::other)?;
                if let Err(e) = apply(&*self.local, offset, len, &change).await {
                    self.forget(regions);
                    return Err(e);
                }
                // No FUA for the replica in async mode: only the local copy is promised durable.
                let remote_change = match change {
                    Change::Write(d, _) => Change::Write(d, false),
                    Change::Zero(f) => Change::Zero(ZeroFlags { fua: false, ..f }),
                };
                let me = Arc::clone(self);
                self.stats.lag_bytes.fetch_add(len, Ordering::Relaxed);
                tokio::spawn(async move {
                    // The range stays locked until the replica has it, so a
                    // later write to it cannot overtake this one there.
                    let _guard = guard;
                    let _permit = permit;
                    let r = apply(&*link.volume, offset, len, &remote_change).await;
                    me.stats.lag_bytes.fetch_sub(len, Ordering::Relaxed);
                    match r {
                        Ok(()) => me.reached_both(clearable, link.epoch),
                        Err(e) => {
                            me.degrade(
                                link.epoch,
                                format!("write of {len} bytes at {offset}: {e}"),
                            );
                            if let Err(e) = me.start_alone().await {
                                warn!("mirror: cannot record a new generation: {e}");
                            }
                        }
                    }
                });
                Ok(())
            }
        }
    }
}

async fn apply(v: &dyn Volume, offset: u64, len: u64, change: &Change) -> VolumeResult<()> {
    match change {
        Change::Write(data, fua) => v.write(offset, data.clone(), *fua).await,
        Change::Zero(flags) => v.write_zeroes(offset, len, *flags).await,
    }
}

#[async_trait]
impl Volume for Mirror {
    fn size(&self) -> u64 {
        self.shared.size()
    }

    fn capabilities(&self) -> Capabilities {
        let local = self.shared.local.capabilities();
        Capabilities {
            read_only: false,
            // Trim is carried out as zeroing on both copies, so they agree.
            can_trim: true,
            can_zero: true,
            // Whether zeroing is fast depends on both copies; never promise it.
            can_fast_zero: false,
            max_payload: local.max_payload.min(32 << 20),
            ..local
        }
    }

    async fn read(&self, offset: u64, len: usize) -> VolumeResult<Bytes> {
        self.shared.local.read(offset, len).await
    }

    async fn read_sparse(&self, offset: u64, len: usize) -> VolumeResult<Vec<ReadSegment>> {
        self.shared.local.read_sparse(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> VolumeResult<()> {
        let len = data.len() as u64;
        self.shared
            .modify(offset, len, Change::Write(data, fua))
            .await
    }

    async fn flush(&self) -> VolumeResult<()> {
        let s = &self.shared;
        let link = match s.opts.mode {
            MirrorMode::Sync => s.current_link(),
            MirrorMode::Async => None,
        };
        let Some(link) = link else {
            return s.local.flush().await;
        };
        let (l, r) = tokio::join!(s.local.flush(), link.volume.flush());
        if let Err(e) = r {
            s.degrade(link.epoch, format!("flush: {e}"));
            s.start_alone().await?;
        }
        l
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> VolumeResult<()> {
        let flags = ZeroFlags {
            may_trim: true,
            fast: false,
            fua,
        };
        self.shared.modify(offset, len, Change::Zero(flags)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> VolumeResult<()> {
        if flags.fast {
            return Err(VolumeError::NotSupported(
                "a mirror cannot promise fast zeroing on both copies".into(),
            ));
        }
        self.shared.modify(offset, len, Change::Zero(flags)).await
    }

    async fn cache(&self, offset: u64, len: u64) -> VolumeResult<()> {
        self.shared.local.cache(offset, len).await
    }

    async fn extents(&self, offset: u64, len: u64) -> VolumeResult<Vec<Extent>> {
        self.shared.local.extents(offset, len).await
    }

    fn status(&self) -> Vec<LayerStatus> {
        let mut v = vec![report::status(&self.shared)];
        v.extend(self.shared.local.status());
        v
    }

    /// A last flush (so the dirty bitmap on disk is as small as it can be),
    /// then the local store's own close (an S3 store gives up its lease).
    async fn close(&self) -> VolumeResult<()> {
        let flushed = self.flush().await;
        self.shared.local.close().await?;
        flushed
    }
}

#[cfg(test)]
mod tests;
