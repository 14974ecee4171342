//! Unit tests over an in-memory object store: the engine's logic (chunks,
//! holes, cache replay, lease, corruption). The real servers are exercised
//! by the binary's integration tests.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use longwire_core::{ExtentKind, ReadSegment, Volume, ZeroFlags};
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};

use super::manifest::Layout;
use super::*;

const C: u64 = 64 << 10;

struct Fixture {
    store: Arc<InMemory>,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            store: Arc::new(InMemory::new()),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn opts(&self, size: Option<u64>) -> S3Options {
        let mut o = S3Options::new("b", "vols/a");
        o.size = size;
        o.chunk_size = Some(C);
        o.cache_dir = Some(self.dir.path().join("cache"));
        o.cache_size = 8 * C;
        o.timeout = Duration::from_secs(5);
        o.lease_ttl = Duration::from_secs(3);
        o
    }

    async fn open(&self, opts: &S3Options) -> Result<S3Volume, String> {
        let bucket = connect_store(self.store.clone() as Arc<dyn ObjectStore>, opts);
        S3Volume::open_with(bucket, Layout::new(&opts.prefix).unwrap(), opts).await
    }

    async fn objects(&self, under: &str) -> Vec<String> {
        use futures::TryStreamExt;
        let mut v: Vec<String> = self
            .store
            .list(Some(&Path::from(under)))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        v.sort();
        v
    }
}

#[tokio::test]
async fn create_write_flush_read_back() {
    let f = Fixture::new();
    let msg = f.open(&f.opts(None)).await.unwrap_err();
    assert!(
        msg.contains("does not exist") && msg.contains("size="),
        "{msg}"
    );

    let v = f.open(&f.opts(Some(10 * C + 100))).await.unwrap();
    assert_eq!(v.size(), 10 * C + 100);
    assert_eq!(v.lease_mode(), LeaseMode::Conditional);
    v.write(C - 2, Bytes::from_static(b"abcd"), false)
        .await
        .unwrap();
    v.write(10 * C + 50, Bytes::from_static(b"end"), false)
        .await
        .unwrap();
    assert!(v.dirty_bytes() > 0);
    v.flush().await.unwrap();
    assert_eq!(v.dirty_bytes(), 0);
    assert_eq!(
        f.objects("vols/a/chunks").await,
        vec![
            "vols/a/chunks/0000000000000000",
            "vols/a/chunks/0000000000000001",
            "vols/a/chunks/000000000000000a"
        ]
    );
    assert_eq!(&v.read(C - 2, 4).await.unwrap()[..], b"abcd");

    // Holes and extents from chunk presence.
    let ext = v.extents(0, 10 * C + 100).await.unwrap();
    assert_eq!(ext[0].kind, ExtentKind::Data);
    assert_eq!(ext[0].len, 2 * C);
    assert_eq!(ext[1].kind, ExtentKind::Hole);
    let seg = v.read_sparse(3 * C, C as usize).await.unwrap();
    assert_eq!(seg, vec![ReadSegment::Zero(C)]);

    // Zeroing the data drops the objects.
    v.write_zeroes(
        0,
        2 * C,
        ZeroFlags {
            fua: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        f.objects("vols/a/chunks").await,
        vec!["vols/a/chunks/000000000000000a"]
    );
    v.trim(10 * C, 100, true).await.unwrap();
    assert!(f.objects("vols/a/chunks").await.is_empty());
    assert!(v.read(0, 1000).await.unwrap().iter().all(|&b| b == 0));
}

#[tokio::test]
async fn reopen_reads_from_the_bucket_and_never_shrinks() {
    let f = Fixture::new();
    let v = f.open(&f.opts(Some(4 * C))).await.unwrap();
    let data: Vec<u8> = (0..3 * C).map(|i| (i % 251) as u8).collect();
    v.write(1000, Bytes::from(data.clone()), true)
        .await
        .unwrap();
    drop(v);
    // Same process, so the dead-pid rule does not apply: release explicitly.
    let mut o = f.opts(None);
    o.cache_dir = Some(f.dir.path().join("other-cache"));
    let msg = f.open(&o).await.unwrap_err();
    assert!(
        msg.contains("in use by another server") && msg.contains("pid"),
        "{msg}"
    );
    f.store
        .delete(&Path::from("vols/a/lease.json"))
        .await
        .unwrap();
    let v = f.open(&o).await.unwrap();
    assert_eq!(&v.read(1000, data.len()).await.unwrap()[..], &data[..]);
    drop(v);
    f.store
        .delete(&Path::from("vols/a/lease.json"))
        .await
        .unwrap();
    let mut o = f.opts(Some(C));
    o.cache_dir = Some(f.dir.path().join("third"));
    assert!(f.open(&o).await.unwrap_err().contains("shrink"));
}

#[tokio::test]
async fn unflushed_writes_are_uploaded_on_reopen() {
    let f = Fixture::new();
    let v = f.open(&f.opts(Some(4 * C))).await.unwrap();
    v.write(5, Bytes::from_static(b"cached"), false)
        .await
        .unwrap();
    // Simulate a crash before any upload: forget the volume without flushing
    // (the background uploader may or may not have run; remove what it did).
    let _ = f
        .store
        .delete(&Path::from("vols/a/chunks/0000000000000000"))
        .await;
    std::mem::forget(v);
    f.store
        .delete(&Path::from("vols/a/lease.json"))
        .await
        .unwrap();
    // The cache directory is still flock'ed by the forgotten volume; copy it.
    let src = f.dir.path().join("cache");
    let dst = f.dir.path().join("cache2");
    std::fs::create_dir_all(dst.join("dirty")).unwrap();
    std::fs::create_dir_all(dst.join("clean")).unwrap();
    std::fs::copy(src.join("volume"), dst.join("volume")).unwrap();
    for e in std::fs::read_dir(src.join("dirty")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join("dirty").join(e.file_name())).unwrap();
    }
    for e in std::fs::read_dir(src.join("clean")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join("dirty").join(e.file_name())).unwrap();
    }
    let mut o = f.opts(None);
    o.cache_dir = Some(dst);
    let v = f.open(&o).await.unwrap();
    assert_eq!(v.dirty_bytes(), 0, "replayed at open");
    assert_eq!(
        f.objects("vols/a/chunks").await,
        vec!["vols/a/chunks/0000000000000000"]
    );
    assert_eq!(&v.read(5, 6).await.unwrap()[..], b"cached");
}

#[tokio::test]
async fn corrupt_objects_are_errors_naming_the_volume() {
    let f = Fixture::new();
    let v = f.open(&f.opts(Some(4 * C))).await.unwrap();
    v.write(0, Bytes::from(vec![1u8; C as usize]), true)
        .await
        .unwrap();
    drop(v);
    f.store
        .delete(&Path::from("vols/a/lease.json"))
        .await
        .unwrap();
    f.store
        .put(
            &Path::from("vols/a/chunks/0000000000000000"),
            PutPayload::from_static(b"short"),
        )
        .await
        .unwrap();
    let mut o = f.opts(None);
    o.cache_dir = Some(f.dir.path().join("c2"));
    let v = f.open(&o).await.unwrap();
    let e = v.read(0, 10).await.unwrap_err().to_string();
    assert!(
        e.contains("s3://b/vols/a") && e.contains("chunk 0") && e.contains("5 bytes"),
        "{e}"
    );
    drop(v);
    f.store
        .delete(&Path::from("vols/a/lease.json"))
        .await
        .unwrap();

    f.store
        .put(
            &Path::from("vols/a/manifest.json"),
            PutPayload::from_static(b"{\"size\": 1"),
        )
        .await
        .unwrap();
    o.cache_dir = Some(f.dir.path().join("c3"));
    let e = f.open(&o).await.unwrap_err();
    assert!(
        e.contains("s3://b/vols/a") && e.contains("not a longwire volume manifest"),
        "{e}"
    );
}

#[tokio::test]
async fn zstd_chunks_and_status() {
    let f = Fixture::new();
    let mut o = f.opts(Some(4 * C));
    o.compression = Some(Compression::Zstd);
    let v = f.open(&o).await.unwrap();
    v.write(0, Bytes::from(vec![7u8; 3 * C as usize]), false)
        .await
        .unwrap();
    let st = v.status();
    assert_eq!(st[0].layer, "s3");
    assert_eq!(st[0].state, "dirty");
    assert!(st[0].detail.contains("conditional"), "{}", st[0].detail);
    v.flush().await.unwrap();
    assert_eq!(v.status()[0].state, "clean");
    let obj = f
        .store
        .get(&Path::from("vols/a/chunks/0000000000000001"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(obj.len() < 1000, "compressed: {}", obj.len());
    let info = manage::info_with(&v.engine.bucket, &v.engine.layout, "s3://b/vols/a")
        .await
        .unwrap();
    assert_eq!(info.chunks, 3);
    assert_eq!(info.allocated_bytes, 3 * C);
    assert!(info.lease.is_some());
    let e = manage::delete_with(&v.engine.bucket, &v.engine.layout, "s3://b/vols/a")
        .await
        .unwrap_err();
    assert!(e.contains("in use"), "{e}");
    v.close().await.unwrap();
    assert!(
        !f.objects("vols/a")
            .await
            .contains(&"vols/a/lease.json".to_string()),
        "lease deleted at close"
    );
    // Closed: writes are refused rather than going out without a lease.
    assert!(v.write(0, Bytes::from(vec![1u8; 10]), false).await.is_err());
    v.close().await.unwrap();
    let n = manage::delete_with(&v.engine.bucket, &v.engine.layout, "s3://b/vols/a")
        .await
        .unwrap();
    assert_eq!(n, 4);
    assert!(f.objects("vols").await.is_empty());
}

#[tokio::test]
async fn cache_bound_forces_uploads() {
    let f = Fixture::new();
    let v = f.open(&f.opts(Some(64 * C))).await.unwrap();
    // 32 chunks through an 8-chunk cache.
    for i in 0..32u64 {
        v.write(i * C, Bytes::from(vec![i as u8 + 1; C as usize]), false)
            .await
            .unwrap();
    }
    assert!(v.dirty_bytes() <= 8 * C);
    v.flush().await.unwrap();
    assert_eq!(f.objects("vols/a/chunks").await.len(), 32);
    for i in [0u64, 17, 31] {
        assert_eq!(v.read(i * C + 7, 1).await.unwrap()[0], i as u8 + 1);
    }
}

/// TRIM and WRITE_ZEROES over partial chunks: across a chunk boundary with
/// no whole chunk inside (two pieces, one per chunk), inside one chunk,
/// and inside the volume's short last chunk. Only the range reads as zeros.
#[tokio::test]
async fn zeroing_partial_chunks() {
    let f = Fixture::new();
    let size = 4 * C + 300;
    let v = f.open(&f.opts(Some(size))).await.unwrap();
    v.write(0, Bytes::from(vec![7u8; size as usize]), false)
        .await
        .unwrap();
    let ranges = [(C - 100, 300), (2 * C + 10, 20), (4 * C + 280, 20)];
    for &(off, len) in &ranges[..2] {
        v.trim(off, len, false).await.unwrap();
    }
    let (off, len) = ranges[2];
    v.write_zeroes(off, len, ZeroFlags::default())
        .await
        .unwrap();
    v.flush().await.unwrap();
    let got = v.read(0, size as usize).await.unwrap();
    for (i, &b) in got.iter().enumerate() {
        let i = i as u64;
        let zeroed = ranges.iter().any(|&(o, l)| i >= o && i < o + l);
        assert_eq!(b, if zeroed { 0 } else { 7 }, "byte {i}");
    }
    assert_eq!(f.objects("vols/a/chunks").await.len(), 5);
}

/// Small writes patch the cached chunk; FLUSH uploads the latest bytes, and
/// a chunk that small writes turn back to zeros has its object deleted.
#[tokio::test]
async fn small_writes_upload_latest_and_zeroed_chunks_are_deleted() {
    let f = Fixture::new();
    let v = f.open(&f.opts(Some(4 * C))).await.unwrap();
    for i in 0..16u64 {
        v.write(C + i * 512, Bytes::from(vec![i as u8 + 1; 512]), false)
            .await
            .unwrap();
    }
    v.flush().await.unwrap();
    assert_eq!(f.objects("vols/a/chunks").await.len(), 1);
    v.write(C + 512, Bytes::from(vec![0xEE; 100]), false)
        .await
        .unwrap();
    v.close().await.unwrap();
    drop(v);
    // A reopen with an empty cache reads what the bucket holds.
    std::fs::remove_dir_all(f.dir.path().join("cache")).unwrap();
    let v = f.open(&f.opts(None)).await.unwrap();
    let got = v.read(C, 16 * 512).await.unwrap();
    for (j, &b) in got.iter().enumerate() {
        let want = if (512..612).contains(&j) {
            0xEE
        } else {
            (j / 512) as u8 + 1
        };
        assert_eq!(b, want, "byte {j} of chunk 1");
    }
    // Zero every written byte with small writes (not WRITE_ZEROES).
    for i in 0..16u64 {
        v.write(C + i * 512, Bytes::from(vec![0u8; 512]), false)
            .await
            .unwrap();
    }
    v.flush().await.unwrap();
    assert!(f.objects("vols/a/chunks").await.is_empty());
    assert_eq!(v.dirty_bytes(), 0);
    let ext = v.extents(0, 4 * C).await.unwrap();
    assert!(ext.iter().all(|e| e.kind == ExtentKind::Hole), "{ext:?}");
}

/// The background uploader leaves chunks being written alone, unless dirty
/// chunks fill more than three quarters of the cache: then the least
/// recently written go first.
#[tokio::test]
async fn writeback_waits_for_quiet_chunks_unless_the_cache_fills() {
    let f = Fixture::new();
    let v = f.open(&f.opts(Some(8 * C))).await.unwrap();
    for i in 0..3u64 {
        v.write(i * C + 7, Bytes::from_static(b"x"), false)
            .await
            .unwrap();
    }
    assert!(v.engine.writeback_batch().is_empty(), "all just written");
    for i in 3..7u64 {
        v.write(i * C + 7, Bytes::from_static(b"x"), false)
            .await
            .unwrap();
    }
    // 7 dirty chunks in a cache of 8: the one written first, down to 6.
    assert_eq!(v.engine.writeback_batch(), vec![0]);
}
