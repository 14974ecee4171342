//! The mirror over memory volumes: a replica that can be cut off, swapped
//! for another volume, or written behind the mirror's back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use longwire_core::{
    Capabilities, Extent, ReadSegment, Volume, VolumeError, VolumeResult, ZeroFlags,
};
use longwire_store::MemoryVolume;
use parking_lot::Mutex;

use super::meta::RECORD_LEN;
use super::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

/// A volume that fails every call while `down`, and counts written bytes.
struct Flaky {
    inner: Arc<dyn Volume>,
    down: Arc<AtomicBool>,
    written: AtomicU64,
}

impl Flaky {
    fn check(&self) -> VolumeResult<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(VolumeError::Io(std::io::Error::other("replica is down")));
        }
        Ok(())
    }
}

#[async_trait]
impl Volume for Flaky {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn read(&self, offset: u64, len: usize) -> VolumeResult<Bytes> {
        self.check()?;
        self.inner.read(offset, len).await
    }
    async fn read_sparse(&self, offset: u64, len: usize) -> VolumeResult<Vec<ReadSegment>> {
        self.check()?;
        self.inner.read_sparse(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> VolumeResult<()> {
        self.check()?;
        self.written.fetch_add(data.len() as u64, Ordering::SeqCst);
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> VolumeResult<()> {
        self.check()?;
        self.inner.flush().await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> VolumeResult<()> {
        self.check()?;
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn extents(&self, offset: u64, len: u64) -> VolumeResult<Vec<Extent>> {
        self.check()?;
        self.inner.extents(offset, len).await
    }
}

/// Hands out the current replica volume, unless it is down.
struct TestConnector {
    replica: Mutex<Arc<dyn Volume>>,
    down: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
}

#[async_trait]
impl ReplicaConnector for Arc<TestConnector> {
    fn describe(&self) -> String {
        "test replica".into()
    }
    async fn connect(&self) -> Result<Arc<dyn Volume>, String> {
        if self.down.load(Ordering::SeqCst) {
            return Err("connection refused".into());
        }
        let inner = self.replica.lock().clone();
        let down = Arc::clone(&self.down);
        let counter = Arc::clone(&self.written);
        Ok(Arc::new(Counting {
            inner: Flaky {
                inner,
                down,
                written: AtomicU64::new(0),
            },
            total: counter,
        }))
    }
}

/// Adds a Flaky's writes to a counter shared across connections.
struct Counting {
    inner: Flaky,
    total: Arc<AtomicU64>,
}

#[async_trait]
impl Volume for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn read(&self, offset: u64, len: usize) -> VolumeResult<Bytes> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> VolumeResult<()> {
        let n = data.len() as u64;
        self.inner.write(offset, data, fua).await?;
        self.total.fetch_add(n, Ordering::SeqCst);
        Ok(())
    }
    async fn flush(&self) -> VolumeResult<()> {
        self.inner.flush().await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> VolumeResult<()> {
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn extents(&self, offset: u64, len: u64) -> VolumeResult<Vec<Extent>> {
        self.inner.extents(offset, len).await
    }
}

struct Rig {
    dir: tempfile::TempDir,
    local: Arc<dyn Volume>,
    conn: Arc<TestConnector>,
}

impl Rig {
    fn new() -> Rig {
        let replica: Arc<dyn Volume> = Arc::new(MemoryVolume::new(SIZE + RECORD_LEN as u64));
        Rig {
            dir: tempfile::tempdir().unwrap(),
            local: Arc::new(MemoryVolume::new(SIZE)),
            conn: Arc::new(TestConnector {
                replica: Mutex::new(replica),
                down: Arc::new(AtomicBool::new(false)),
                written: Arc::new(AtomicU64::new(0)),
            }),
        }
    }

    fn opts() -> MirrorOptions {
        MirrorOptions {
            retry_interval: Duration::from_millis(20),
            clean_interval: Duration::from_millis(20),
            resync_rate: 0,
            ..MirrorOptions::default()
        }
    }

    fn open(&self, opts: MirrorOptions) -> Mirror {
        let paths = StatePaths::beside(&self.dir.path().join("disk"));
        Mirror::open(
            Arc::clone(&self.local),
            Box::new(Arc::clone(&self.conn)),
            paths,
            opts,
        )
        .unwrap()
    }

    fn replica(&self) -> Arc<dyn Volume> {
        self.conn.replica.lock().clone()
    }

    fn set_down(&self, down: bool) {
        self.conn.down.store(down, Ordering::SeqCst);
    }

    fn replica_written(&self) -> u64 {
        self.conn.written.load(Ordering::SeqCst)
    }

    async fn assert_same(&self) {
        let a = self.local.read(0, SIZE as usize).await.unwrap();
        let b = self.replica().read(0, SIZE as usize).await.unwrap();
        assert!(a == b, "local and replica differ");
    }
}

async fn wait_for(m: &Mirror, state: &str) -> LayerStatus {
    for _ in 0..1000 {
        let st = m.status().remove(0);
        if st.state == state {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("mirror never reached {state}: {:?}", m.status()[0]);
}

/// Wait until in sync and every activity bit is cleared.
async fn wait_clean(m: &Mirror) {
    wait_for(m, "in-sync").await;
    for _ in 0..1000 {
        if m.dirty_regions() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("dirty regions never cleared: {}", m.dirty_regions());
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<_>>(),
    )
}

#[tokio::test]
async fn first_pairing_copies_only_data_and_zeroes_stale_replica_bytes() {
    let rig = Rig::new();
    rig.local
        .write(0, pattern(1, 100 * KIB as usize), false)
        .await
        .unwrap();
    rig.local
        .write(5 * MIB, pattern(2, 64 * KIB as usize), false)
        .await
        .unwrap();
    // The replica holds old junk where the local volume has a hole.
    rig.replica()
        .write(3 * MIB, pattern(9, 256 * KIB as usize), false)
        .await
        .unwrap();
    let before = rig.replica_written();
    let m = rig.open(Rig::opts());
    wait_clean(&m).await;
    rig.assert_same().await;
    // 100 KiB → two regions, plus one region: data only, holes zeroed.
    assert_eq!(m.resync_sent_bytes(), 3 * 64 * KIB);
    assert_eq!(
        rig.replica_written() - before,
        3 * 64 * KIB + RECORD_LEN as u64 * 2
    );
}

#[tokio::test]
async fn writes_while_cut_off_are_resynced_region_by_region() {
    let rig = Rig::new();
    let m = rig.open(Rig::opts());
    wait_clean(&m).await;
    m.write(0, pattern(3, 4096), false).await.unwrap();
    rig.assert_same().await;

    rig.set_down(true);
    // Sync mode: the write that finds the replica gone still succeeds.
    m.write(MIB, pattern(4, 4096), false).await.unwrap();
    wait_for(&m, "degraded").await;
    for i in 0..10u64 {
        m.write(2 * MIB + i * 256 * KIB, pattern(i as u8, 8192), false)
            .await
            .unwrap();
    }
    m.write_zeroes(0, 4096, ZeroFlags::default()).await.unwrap();
    m.flush().await.unwrap();
    assert_eq!(m.dirty_regions(), 12);
    let sent = m.resync_sent_bytes();
    rig.set_down(false);
    wait_clean(&m).await;
    rig.assert_same().await;
    // Only the 12 dirty regions went over, nothing else.
    let resent = m.resync_sent_bytes() - sent;
    assert_eq!(resent, 12 * 64 * KIB, "resent {resent}");
}

#[tokio::test]
async fn an_unrelated_replica_is_refused_until_forced() {
    let rig = Rig::new();
    let m = rig.open(Rig::opts());
    wait_clean(&m).await;
    m.write(0, pattern(5, 8192), false).await.unwrap();
    // The replica comes back as another, unrelated volume with data of its own.
    rig.set_down(true);
    m.write(MIB, pattern(6, 8192), false).await.unwrap();
    let stranger: Arc<dyn Volume> = Arc::new(MemoryVolume::new(SIZE + RECORD_LEN as u64));
    stranger.write(0, pattern(7, 8192), false).await.unwrap();
    *rig.conn.replica.lock() = Arc::clone(&stranger);
    rig.set_down(false);
    let st = wait_for(&m, "refused").await;
    assert!(
        st.detail.contains("wiped") && st.detail.contains("mirror-force-full"),
        "{}",
        st.detail
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        stranger.read(0, 8192).await.unwrap(),
        pattern(7, 8192),
        "refused replica was written"
    );
    // The user asks for a full resync.
    std::fs::write(
        StatePaths::beside(&rig.dir.path().join("disk")).force_full,
        b"",
    )
    .unwrap();
    wait_clean(&m).await;
    rig.assert_same().await;
}

#[tokio::test]
async fn a_replica_written_by_another_primary_is_refused() {
    let rig = Rig::new();
    let m = rig.open(Rig::opts());
    wait_clean(&m).await;
    rig.set_down(true);
    m.write(0, pattern(1, 4096), false).await.unwrap();
    wait_for(&m, "degraded").await;
    // Someone promoted the replica: same volume id, a generation of its own.
    let replica = rig.replica();
    let at = replica.size() - RECORD_LEN as u64;
    let mut rec = meta::Record::decode(&replica.read(at, RECORD_LEN).await.unwrap()).unwrap();
    rec.next_generation(12345);
    replica
        .write(at, Bytes::from(rec.encode()), false)
        .await
        .unwrap();
    rig.set_down(false);
    let st = wait_for(&m, "refused").await;
    assert!(st.detail.contains("split brain"), "{}", st.detail);
}

#[tokio::test]
async fn a_restart_in_the_middle_of_a_resync_resumes_it() {
    let rig = Rig::new();
    rig.local
        .write(0, pattern(1, 4 * MIB as usize), false)
        .await
        .unwrap();
    let slow = MirrorOptions {
        resync_rate: 2 * MIB,
        resync_parallel: 1,
        ..Rig::opts()
    };
    let m = rig.open(slow.clone());
    wait_for(&m, "resyncing").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let first = m.resync_sent_bytes();
    assert!(first > 0 && first < 4 * MIB, "sent {first}");
    drop(m);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let m = rig.open(Rig::opts());
    wait_clean(&m).await;
    rig.assert_same().await;
    let second = m.resync_sent_bytes();
    assert!(second < 4 * MIB, "second run resent everything: {second}");
    assert!(first + second >= 4 * MIB);
}

#[tokio::test]
async fn writes_racing_with_a_resync_are_never_lost() {
    let rig = Rig::new();
    rig.local
        .write(0, pattern(1, 8 * MIB as usize), false)
        .await
        .unwrap();
    let opts = MirrorOptions {
        resync_rate: 16 * MIB,
        ..Rig::opts()
    };
    let m = Arc::new(rig.open(opts));
    wait_for(&m, "resyncing").await;
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let m = Arc::clone(&m);
        tasks.push(tokio::spawn(async move {
            for i in 0..40u64 {
                let off = ((t * 7919 + i * 104729) % (SIZE / 4096)) * 4096;
                m.write(off, pattern((t * 40 + i) as u8, 4096), false)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    wait_clean(&m).await;
    rig.assert_same().await;
}

#[tokio::test]
async fn async_mode_catches_up_and_survives_a_cut() {
    let rig = Rig::new();
    let m = rig.open(MirrorOptions {
        mode: MirrorMode::Async,
        ..Rig::opts()
    });
    wait_clean(&m).await;
    for i in 0..20u64 {
        m.write(i * 300 * KIB, pattern(i as u8, 4096), false)
            .await
            .unwrap();
    }
    m.flush().await.unwrap();
    wait_clean(&m).await;
    rig.assert_same().await;
    rig.set_down(true);
    for i in 0..5u64 {
        m.write(i * 100 * KIB, pattern(100 + i as u8, 4096), true)
            .await
            .unwrap();
    }
    wait_for(&m, "degraded").await;
    rig.set_down(false);
    wait_clean(&m).await;
    rig.assert_same().await;
}

#[tokio::test]
async fn state_files_survive_a_reopen_and_a_small_replica_is_refused() {
    let rig = Rig::new();
    *rig.conn.replica.lock() = Arc::new(MemoryVolume::new(SIZE));
    let m = rig.open(Rig::opts());
    let st = wait_for(&m, "refused").await;
    assert!(st.detail.contains("4 KiB"), "{}", st.detail);
    let g = st.gauges.iter().find(|g| g.name == "in_sync").unwrap();
    assert_eq!(g.value, 0.0);
}
