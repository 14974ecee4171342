//! Clone layer over memory (and file) volumes. The source is a memory
//! volume behind [`Source`], which counts the bytes read from it and can
//! be made to fail or hang like a dead network peer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use longwire_core::{Capabilities, Extent, ReadSegment, Volume, VolumeError, VolumeResult};
use longwire_store::{FileVolume, MemoryVolume};

use super::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// (offset, length) of the data in the source; everything else is holes.
const DATA: &[(u64, u64)] = &[
    (0, 64 * KIB),
    (3 * MIB + 100, 5000),
    (20 * MIB, 2 * MIB),
    (40 * MIB - 4 * KIB, 8 * KIB),
    (SIZE - 4 * KIB, 4 * KIB),
];

fn data_bytes() -> u64 {
    DATA.iter().map(|(_, l)| l).sum()
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect()
}

struct Source {
    inner: MemoryVolume,
    read: AtomicU64,
    fail: AtomicBool,
    hang: AtomicBool,
    /// When set, requests outside this byte range fail.
    only: parking_lot::Mutex<Option<std::ops::Range<u64>>>,
}

impl Source {
    async fn new() -> Arc<Source> {
        let inner = MemoryVolume::new(SIZE);
        for (i, (off, len)) in DATA.iter().enumerate() {
            inner
                .write(*off, Bytes::from(pattern(i as u64, *len as usize)), false)
                .await
                .unwrap();
        }
        Arc::new(Source {
            inner,
            read: AtomicU64::new(0),
            fail: AtomicBool::new(false),
            hang: AtomicBool::new(false),
            only: Default::default(),
        })
    }

    async fn gate(&self, offset: u64, len: u64) -> VolumeResult<()> {
        if let Some(r) = &*self.only.lock() {
            if offset < r.start || offset + len > r.end {
                return Err(VolumeError::Io(std::io::Error::other(
                    "outside the allowed range",
                )));
            }
        }
        while self.hang.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if self.fail.load(Ordering::Relaxed) {
            return Err(VolumeError::Io(std::io::Error::other("connection refused")));
        }
        Ok(())
    }
}

#[async_trait]
impl Volume for Source {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn read(&self, offset: u64, len: usize) -> VolumeResult<Bytes> {
        self.gate(offset, len as u64).await?;
        self.read.fetch_add(len as u64, Ordering::Relaxed);
        self.inner.read(offset, len).await
    }
    async fn read_sparse(&self, offset: u64, len: usize) -> VolumeResult<Vec<ReadSegment>> {
        self.gate(offset, len as u64).await?;
        let segs = self.inner.read_sparse(offset, len).await?;
        let data: u64 = segs
            .iter()
            .filter(|s| matches!(s, ReadSegment::Data(_)))
            .map(|s| s.len())
            .sum();
        self.read.fetch_add(data, Ordering::Relaxed);
        Ok(segs)
    }
    async fn write(&self, _: u64, _: Bytes, _: bool) -> VolumeResult<()> {
        Err(VolumeError::ReadOnly)
    }
    async fn flush(&self) -> VolumeResult<()> {
        Ok(())
    }
    async fn extents(&self, offset: u64, len: u64) -> VolumeResult<Vec<Extent>> {
        self.gate(offset, len).await?;
        self.inner.extents(offset, len).await
    }
}

fn config() -> CloneConfig {
    CloneConfig {
        fetch_timeout: Duration::from_millis(500),
        commit_interval: Duration::from_millis(50),
        ..CloneConfig::default()
    }
}

fn clone_over(
    source: &Arc<Source>,
    local: Arc<dyn Volume>,
    dir: &std::path::Path,
    cfg: CloneConfig,
) -> CloneVolume {
    let bitmap = open_bitmap(&bitmap_in_dir(dir), SIZE, &cfg).unwrap();
    CloneVolume::new(local, Some(source.clone() as Arc<dyn Volume>), bitmap, cfg).unwrap()
}

async fn assert_same(a: &dyn Volume, b: &dyn Volume, what: &str) {
    let mut off = 0;
    while off < SIZE {
        let x = a.read(off, MIB as usize).await.unwrap();
        let y = b.read(off, MIB as usize).await.unwrap();
        assert!(x == y, "{what}: differs in the MiB at {off}");
        off += MIB;
    }
}

async fn wait(clone: &CloneVolume) {
    tokio::time::timeout(Duration::from_secs(20), clone.wait_complete())
        .await
        .expect("hydration did not complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_at_once_then_copies_only_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let source = Source::new().await;
    source.hang.store(true, Ordering::Relaxed);
    let local = Arc::new(MemoryVolume::new(SIZE));
    let clone = clone_over(&source, local.clone(), dir.path(), config());
    assert_eq!(clone.status()[0].state, "hydrating");
    source.hang.store(false, Ordering::Relaxed);
    // A read of a region not copied yet comes from the source.
    let (off, len) = DATA[2];
    let got = clone.read(off + 10, 1000).await.unwrap();
    assert_eq!(got, source.inner.read(off + 10, 1000).await.unwrap());
    wait(&clone).await;
    assert_same(&clone, &source.inner, "clone vs source").await;
    let p = clone.progress();
    assert!(p.complete && p.hydrated_bytes == SIZE, "{p:?}");
    // Only data crossed, at extent granularity (the memory store's 64 KiB
    // chunks): never the holes.
    let read = source.read.load(Ordering::Relaxed);
    assert!(
        read >= data_bytes() && read <= data_bytes() + 6 * 64 * KIB,
        "read {read} for {} of data",
        data_bytes()
    );
    assert_eq!(p.fetched_bytes, read);
    assert!(
        local.allocated_bytes() <= 8 * 64 * KIB + len,
        "local is not sparse: {}",
        local.allocated_bytes()
    );
    let st = clone.status();
    assert_eq!(st[0].layer, "clone");
    assert_eq!(st[0].state, "complete");
    assert!(st[0].detail.contains("released"), "{}", st[0].detail);
    // Released: the source failing changes nothing now.
    source.fail.store(true, Ordering::Relaxed);
    assert_same(&clone, &source.inner, "after release").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_hydration_are_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let source = Source::new().await;
    let model = MemoryVolume::new(SIZE);
    let mut off = 0;
    while off < SIZE {
        model
            .write(
                off,
                source.inner.read(off, MIB as usize).await.unwrap(),
                false,
            )
            .await
            .unwrap();
        off += MIB;
    }
    let clone = Arc::new(clone_over(
        &source,
        Arc::new(MemoryVolume::new(SIZE)),
        dir.path(),
        CloneConfig {
            parallel: 8,
            ..config()
        },
    ));
    // Partial-region writes, whole-region writes and zeroing, racing the
    // background copier, on data and on holes.
    let writes: Vec<(u64, usize)> = vec![
        (100, 10),
        (20 * MIB + 5, 300),
        (21 * MIB, MIB as usize),
        (30 * MIB - 7, 3 * MIB as usize),
        (SIZE - 100, 100),
        (40 * MIB - KIB, 2 * KIB as usize),
    ];
    let mut tasks = Vec::new();
    for (i, (o, l)) in writes.iter().enumerate() {
        let data = Bytes::from(pattern(100 + i as u64, *l));
        model.write(*o, data.clone(), false).await.unwrap();
        let c = clone.clone();
        let o = *o;
        tasks.push(tokio::spawn(async move { c.write(o, data, false).await }));
    }
    model
        .write_zeroes(3 * MIB, MIB, Default::default())
        .await
        .unwrap();
    let c = clone.clone();
    tasks.push(tokio::spawn(async move {
        c.write_zeroes(3 * MIB, MIB, Default::default()).await
    }));
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    wait(&clone).await;
    assert_same(&*clone, &model, "clone vs source + writes").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_region_writes_and_trims_copy_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let source = Source::new().await;
    source.hang.store(true, Ordering::Relaxed);
    let clone = clone_over(
        &source,
        Arc::new(MemoryVolume::new(SIZE)),
        dir.path(),
        config(),
    );
    // The source hangs, yet these finish: nothing needs copying.
    clone
        .write(20 * MIB, Bytes::from(vec![7u8; MIB as usize]), false)
        .await
        .unwrap();
    clone.trim(21 * MIB, MIB, false).await.unwrap();
    assert_eq!(
        clone.read(20 * MIB, 4).await.unwrap(),
        Bytes::from_static(&[7, 7, 7, 7])
    );
    assert_eq!(source.read.load(Ordering::Relaxed), 0);
    source.hang.store(false, Ordering::Relaxed);
    wait(&clone).await;
    // The 2 MiB of source data under them was never fetched.
    let read = source.read.load(Ordering::Relaxed);
    assert!(read <= data_bytes() - 2 * MIB + 6 * 64 * KIB, "read {read}");
    assert_eq!(
        clone.read(20 * MIB, 4).await.unwrap(),
        Bytes::from_static(&[7, 7, 7, 7])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_source_fails_reads_with_eio_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let source = Source::new().await;
    source.hang.store(true, Ordering::Relaxed);
    let clone = clone_over(
        &source,
        Arc::new(MemoryVolume::new(SIZE)),
        dir.path(),
        config(),
    );
    let started = Instant::now();
    let err = clone.read(20 * MIB, 512).await.unwrap_err();
    assert_eq!(err.errno(), 5, "{err}");
    assert!(err.to_string().contains("did not answer within"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // A refusing source: EIO at once, and status says so.
    source.hang.store(false, Ordering::Relaxed);
    source.fail.store(true, Ordering::Relaxed);
    let err = clone.read(20 * MIB, 512).await.unwrap_err();
    assert_eq!(err.errno(), 5);
    assert_eq!(clone.status()[0].state, "source-unreachable");
    // It comes back: hydration finishes on its own.
    source.fail.store(false, Ordering::Relaxed);
    wait(&clone).await;
    assert_same(&clone, &source.inner, "after the source came back").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hydration_resumes_after_a_restart_and_keeps_flushed_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let source = Source::new().await;
    let cfg = CloneConfig {
        commit_interval: Duration::from_secs(3600),
        ..config()
    };
    let (off, _) = DATA[2];
    // Only region 20 (1 MiB of DATA[2]) can be copied in the first run.
    *source.only.lock() = Some(off..off + MIB);
    {
        let local = Arc::new(FileVolume::open(&img, Some(SIZE), false).unwrap());
        let clone = clone_over(&source, local, dir.path(), cfg.clone());
        // A partial write into a region with source data: copied, then
        // written; flushed, so it must survive.
        clone
            .write(off + 5, Bytes::from_static(b"mine"), false)
            .await
            .unwrap();
        clone.flush().await.unwrap();
        assert_eq!(clone.progress().hydrated_bytes, MIB);
        assert_eq!(source.read.load(Ordering::Relaxed), MIB);
    }
    *source.only.lock() = None;
    let before = source.read.load(Ordering::Relaxed);
    let local = Arc::new(FileVolume::open(&img, None, false).unwrap());
    let clone = clone_over(&source, local, dir.path(), cfg.clone());
    assert!(
        clone.progress().hydrated_bytes >= MIB,
        "the bitmap was not kept"
    );
    wait(&clone).await;
    assert_eq!(
        clone.read(off + 5, 4).await.unwrap(),
        Bytes::from_static(b"mine")
    );
    let mut expect = source.inner.read(off, 16).await.unwrap().to_vec();
    expect[5..9].copy_from_slice(b"mine");
    assert_eq!(clone.read(off, 16).await.unwrap(), Bytes::from(expect));
    // The region copied before the restart was not fetched again.
    let again = source.read.load(Ordering::Relaxed) - before;
    assert!(
        again >= data_bytes() - MIB && again <= data_bytes() - MIB + 6 * 64 * KIB,
        "fetched {again} after the restart"
    );
    drop(clone);
    // Complete on disk: no source needed any more.
    let path = bitmap_in_dir(dir.path());
    assert!(is_complete(&path, SIZE, &cfg).unwrap());
    let local = Arc::new(FileVolume::open(&img, None, false).unwrap());
    let clone =
        CloneVolume::new(local, None, open_bitmap(&path, SIZE, &cfg).unwrap(), cfg).unwrap();
    assert!(clone.is_complete());
    assert_eq!(
        clone.read(off + 5, 4).await.unwrap(),
        Bytes::from_static(b"mine")
    );
}

#[tokio::test]
async fn refuses_what_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    let bitmap = || open_bitmap(&bitmap_in_dir(dir.path()), SIZE, &cfg).unwrap();
    let local: Arc<dyn Volume> = Arc::new(MemoryVolume::new(SIZE));
    let err = CloneVolume::new(local.clone(), None, bitmap(), cfg.clone()).unwrap_err();
    assert!(err.contains("needs its source"), "{err}");
    let small: Arc<dyn Volume> = Arc::new(MemoryVolume::new(SIZE / 2));
    let err = CloneVolume::new(local, Some(small), bitmap(), cfg.clone()).unwrap_err();
    assert!(err.contains("same size"), "{err}");
}
