use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use longwire_core::{Extent, ExtentKind, ReadSegment, Volume, VolumeError, ZeroFlags};
use rusqlite::Connection;

use super::*;

const K: u64 = 1024;
const M: u64 = 1024 * K;
/// Chunk size most tests use: small, so multi-chunk cases stay small.
const C: u64 = 4 * K;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

/// Incompressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn opts(size: u64, chunk: u64) -> SqliteOptions {
    SqliteOptions {
        size: Some(size),
        chunk_size: Some(chunk),
        ..Default::default()
    }
}

fn open(path: &Path, name: &str, o: SqliteOptions) -> SqliteVolume {
    SqliteVolume::open(path, name, &o).unwrap_or_else(|e| panic!("open {name}: {e}"))
}

struct Db {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn db() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vols.sqlite");
    Db { _dir: dir, path }
}

/// (rows, stored bytes) of volume `name`, seen through a connection of its
/// own (so only committed data counts).
fn usage(path: &Path, name: &str) -> (u64, u64) {
    let c = Connection::open(path).unwrap();
    c.query_row(
        "SELECT count(*), coalesce(sum(length(data)), 0) FROM chunks
         WHERE volume = (SELECT id FROM volumes WHERE name = ?1)",
        [name],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
    .unwrap()
}

fn rows(path: &Path, name: &str) -> u64 {
    usage(path, name).0
}

/// Codec of each stored chunk, by index.
fn codecs(path: &Path, name: &str) -> Vec<(u64, i64)> {
    let c = Connection::open(path).unwrap();
    let mut s = c
        .prepare(
            "SELECT idx, codec FROM chunks WHERE volume = (SELECT id FROM volumes WHERE name = ?1)
             ORDER BY idx",
        )
        .unwrap();
    s.query_map([name], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

async fn assert_zero(v: &SqliteVolume, offset: u64, len: usize) {
    let got = v.read(offset, len).await.unwrap();
    assert!(
        got.iter().all(|&b| b == 0),
        "range {offset}+{len} is not zero"
    );
}

#[tokio::test]
async fn round_trip_unaligned_and_across_chunks() {
    let d = db();
    // Not a multiple of the chunk size: the last chunk is cut short.
    let size = M + 1000;
    let v = open(&d.path, "v", opts(size, C));
    assert_eq!(v.size(), size);
    let cases: &[(u64, usize)] = &[
        (0, 1),
        (1, 4095),
        (C - 7, 14),                          // straddles a chunk boundary
        (3 * C - 1, 2 * C as usize + 2),      // spans three boundaries
        (10 * C, 8 * C as usize),             // whole chunks
        (size - 3, 3),                        // last bytes of the volume
        (size - 1000 - C, C as usize + 1000), // whole chunk + the short last one
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = Bytes::from(pattern(len, i as u64));
        v.write(off, data.clone(), false).await.unwrap();
        assert_eq!(v.read(off, len).await.unwrap(), data, "case {i}");
    }
    assert_zero(&v, C + 7, 1).await;
    assert_zero(&v, 30 * C, 4 * C as usize).await;
    // A read across data and holes matches a model built from the writes.
    let mut model = vec![0u8; size as usize];
    for (i, &(off, len)) in cases.iter().enumerate() {
        model[off as usize..off as usize + len].copy_from_slice(&pattern(len, i as u64));
    }
    assert_eq!(&v.read(0, size as usize).await.unwrap()[..], &model[..]);
    let sparse = v.read_sparse(0, size as usize).await.unwrap();
    let mut joined = Vec::new();
    for s in sparse {
        match s {
            ReadSegment::Data(b) => joined.extend_from_slice(&b),
            ReadSegment::Zero(n) => joined.resize(joined.len() + n as usize, 0),
        }
    }
    assert_eq!(joined, model);
    assert_eq!(v.read(size, 0).await.unwrap().len(), 0);
}

#[tokio::test]
async fn out_of_range_is_an_error_not_a_panic() {
    let d = db();
    let v = open(&d.path, "v", opts(M, C));
    assert!(matches!(v.read(M, 1).await, Err(VolumeError::Invalid(_))));
    assert!(matches!(
        v.read(u64::MAX, 2).await,
        Err(VolumeError::Invalid(_))
    ));
    assert!(matches!(
        v.read(0, usize::MAX).await,
        Err(VolumeError::Overflow(_))
    ));
    assert!(matches!(
        v.write(M - 1, Bytes::from_static(b"ab"), false).await,
        Err(VolumeError::NoSpace(_))
    ));
    assert!(matches!(
        v.trim(u64::MAX, 2, false).await,
        Err(VolumeError::NoSpace(_))
    ));
    assert!(matches!(
        v.write_zeroes(1, u64::MAX, ZeroFlags::default()).await,
        Err(VolumeError::NoSpace(_))
    ));
    assert!(matches!(
        v.extents(M, 1).await,
        Err(VolumeError::Invalid(_))
    ));
    assert!(matches!(
        v.extents(0, 0).await,
        Err(VolumeError::Invalid(_))
    ));
    v.write(M, Bytes::new(), true).await.unwrap();
    v.trim(M, 0, true).await.unwrap();
}

#[tokio::test]
async fn many_volumes_in_one_database_are_independent() {
    let d = db();
    let a = open(&d.path, "a", opts(M, C));
    let b = open(&d.path, "b", opts(2 * M, 16 * K));
    let c = open(&d.path, "c with spaces/and ünïcode", opts(M, C));
    for (i, v) in [&a, &b, &c].into_iter().enumerate() {
        v.write(100, Bytes::from(pattern(3 * C as usize, i as u64)), false)
            .await
            .unwrap();
    }
    for (i, v) in [&a, &b, &c].into_iter().enumerate() {
        assert_eq!(
            &v.read(100, 3 * C as usize).await.unwrap()[..],
            &pattern(3 * C as usize, i as u64)[..],
            "volume {i}"
        );
    }
    assert_eq!(rows(&d.path, "a"), 4);
    assert_eq!(rows(&d.path, "b"), 1);
    // Trimming and flushing one leaves the others alone.
    a.trim(0, M, true).await.unwrap();
    assert_eq!(rows(&d.path, "a"), 0);
    assert_eq!(rows(&d.path, "b"), 1);
    assert_eq!(rows(&d.path, "c with spaces/and ünïcode"), 4);
    assert_zero(&a, 0, M as usize).await;
    assert_eq!(
        &c.read(100, 3 * C as usize).await.unwrap()[..],
        &pattern(3 * C as usize, 2)[..]
    );
    assert_eq!(b.chunk_size(), 16 * K);
    assert_eq!(b.capabilities().preferred_block, 16 * K as u32);
    // The same volume opened twice is one truth.
    let a2 = open(&d.path, "a", SqliteOptions::default());
    a2.write(5, Bytes::from_static(b"shared"), false)
        .await
        .unwrap();
    assert_eq!(&a.read(5, 6).await.unwrap()[..], b"shared");
}

#[tokio::test]
async fn chunks_that_become_zero_are_deleted() {
    let d = db();
    let v = open(&d.path, "v", opts(M, C));
    // Zeros into a hole store nothing.
    v.write(0, Bytes::from(vec![0u8; 3 * C as usize + 5]), false)
        .await
        .unwrap();
    assert_eq!(rows(&d.path, "v"), 0);

    v.write(0, Bytes::from(pattern(4 * C as usize, 1)), false)
        .await
        .unwrap();
    assert_eq!(rows(&d.path, "v"), 4);
    // A whole-chunk zero write deletes the chunk.
    v.write(C, Bytes::from(vec![0u8; C as usize]), false)
        .await
        .unwrap();
    assert_eq!(rows(&d.path, "v"), 3);
    // Partial zero writes keep the chunk until it is all zero.
    v.write(2 * C, Bytes::from(vec![0u8; 100]), false)
        .await
        .unwrap();
    assert_eq!(rows(&d.path, "v"), 3);
    v.write(2 * C + 100, Bytes::from(vec![0u8; C as usize - 100]), false)
        .await
        .unwrap();
    assert_eq!(rows(&d.path, "v"), 2);
    // An unaligned zero write spanning two chunks' ends.
    v.write(C / 2, Bytes::from(vec![0u8; C as usize]), false)
        .await
        .unwrap();
    assert_eq!(rows(&d.path, "v"), 2);
    v.write(0, Bytes::from(vec![0u8; C as usize / 2]), false)
        .await
        .unwrap();
    assert_eq!(rows(&d.path, "v"), 1);
    assert_zero(&v, 0, 3 * C as usize).await;
    assert_eq!(
        &v.read(3 * C, C as usize).await.unwrap()[..],
        &pattern(4 * C as usize, 1)[3 * C as usize..]
    );
}

#[tokio::test]
async fn trim_and_zero_read_back_zero_and_delete_chunks() {
    let d = db();
    let v = open(&d.path, "v", opts(16 * C, C));
    let data = pattern(16 * C as usize, 9);
    v.write(0, Bytes::from(data.clone()), false).await.unwrap();
    assert_eq!(rows(&d.path, "v"), 16);

    // Unaligned trim: chunks 2..=4 dropped, edges of chunks 1 and 5 zeroed.
    v.trim(C + 10, 4 * C, false).await.unwrap();
    assert_zero(&v, C + 10, 4 * C as usize).await;
    assert_eq!(
        &v.read(C + 9, 1).await.unwrap()[..],
        &data[C as usize + 9..C as usize + 10]
    );
    assert_eq!(
        &v.read(5 * C + 10, 1).await.unwrap()[..],
        &data[5 * C as usize + 10..5 * C as usize + 11]
    );
    assert_eq!(rows(&d.path, "v"), 13);

    let flags = ZeroFlags {
        may_trim: false,
        fast: true,
        fua: true,
    };
    v.write_zeroes(8 * C, 2 * C, flags).await.unwrap();
    assert_zero(&v, 8 * C, 2 * C as usize).await;
    assert_ne!(v.read(10 * C, 1).await.unwrap()[0], 0);
    assert_eq!(rows(&d.path, "v"), 11);

    // Zeroing inside one chunk keeps it, cleared in that range.
    v.write_zeroes(12 * C + 5, 10, ZeroFlags::default())
        .await
        .unwrap();
    assert_zero(&v, 12 * C + 5, 10).await;
    assert_ne!(v.read(12 * C + 4, 1).await.unwrap()[0], 0);
    assert_ne!(v.read(12 * C + 15, 1).await.unwrap()[0], 0);
    assert_eq!(rows(&d.path, "v"), 11);
    // ...and deletes it once nothing else is left.
    v.write_zeroes(12 * C, 5, ZeroFlags::default())
        .await
        .unwrap();
    v.trim(12 * C + 15, C - 15, false).await.unwrap();
    assert_eq!(rows(&d.path, "v"), 10);

    // Trim everything.
    v.trim(0, 16 * C, false).await.unwrap();
    assert_eq!(rows(&d.path, "v"), 0);
    assert_zero(&v, 0, 16 * C as usize).await;
}

#[tokio::test]
async fn trim_to_the_end_drops_a_short_last_chunk() {
    let d = db();
    let size = 4 * C + 100;
    let v = open(&d.path, "v", opts(size, C));
    v.write(size - 100, Bytes::from(pattern(100, 1)), false)
        .await
        .unwrap();
    assert_eq!(rows(&d.path, "v"), 1);
    v.trim(4 * C, 100, false).await.unwrap();
    assert_eq!(rows(&d.path, "v"), 0);
    // A full write of the short chunk, then a zero write of it.
    v.write(4 * C, Bytes::from(pattern(100, 2)), false)
        .await
        .unwrap();
    assert_eq!(&v.read(4 * C, 100).await.unwrap()[..], &pattern(100, 2)[..]);
    v.write(4 * C, Bytes::from(vec![0u8; 100]), false)
        .await
        .unwrap();
    assert_eq!(rows(&d.path, "v"), 0);
}

#[tokio::test]
async fn extents_follow_writes_and_trims() {
    let d = db();
    let v = open(&d.path, "v", opts(8 * C, C));
    assert_eq!(
        v.extents(0, 8 * C).await.unwrap(),
        vec![Extent::new(8 * C, ExtentKind::Hole)]
    );
    v.write(C + 1, Bytes::from(pattern(C as usize, 1)), false)
        .await
        .unwrap(); // chunks 1, 2
    assert_eq!(
        v.extents(0, 8 * C).await.unwrap(),
        vec![
            Extent::new(C, ExtentKind::Hole),
            Extent::new(2 * C, ExtentKind::Data),
            Extent::new(5 * C, ExtentKind::Hole),
        ]
    );
    assert_eq!(
        v.extents(C + 100, 200).await.unwrap(),
        vec![Extent::new(200, ExtentKind::Data)]
    );
    v.trim(C, C, false).await.unwrap();
    assert_eq!(
        v.extents(0, 8 * C).await.unwrap(),
        vec![
            Extent::new(2 * C, ExtentKind::Hole),
            Extent::new(C, ExtentKind::Data),
            Extent::new(5 * C, ExtentKind::Hole),
        ]
    );
    let segs = v.read_sparse(10, 4 * C as usize).await.unwrap();
    assert_eq!(segs.len(), 3, "{segs:?}");
    assert_eq!(segs[0], ReadSegment::Zero(2 * C - 10));
    assert!(matches!(&segs[1], ReadSegment::Data(b) if b.len() as u64 == C));
    assert_eq!(segs[2], ReadSegment::Zero(C + 10));
}

#[tokio::test]
async fn huge_sparse_volume_costs_only_what_is_written() {
    let d = db();
    let tib = 1u64 << 40;
    let v = open(&d.path, "big", opts(6 * tib, 64 * K));
    let offsets = [5 * (1 << 30) + 123, 2 * tib + 7, 6 * tib - 100];
    for (i, &off) in offsets.iter().enumerate() {
        v.write(off, Bytes::from(pattern(100, i as u64)), false)
            .await
            .unwrap();
    }
    for (i, &off) in offsets.iter().enumerate() {
        assert_eq!(
            &v.read(off, 100).await.unwrap()[..],
            &pattern(100, i as u64)[..]
        );
    }
    let ext = v.extents(0, 6 * tib).await.unwrap();
    assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), 6 * tib);
    assert_eq!(ext.iter().filter(|e| e.kind == ExtentKind::Data).count(), 3);
    v.trim(0, 6 * tib, true).await.unwrap();
    assert_eq!(rows(&d.path, "big"), 0);
    let size = std::fs::metadata(&d.path).unwrap().len();
    assert!(size < 10 * M, "database is {size} bytes");
}

#[tokio::test]
async fn compression_stores_compressible_chunks_smaller() {
    let d = db();
    let z = open(
        &d.path,
        "z",
        SqliteOptions {
            size: Some(M),
            chunk_size: Some(64 * K),
            compression: Some(Compression::Zstd),
            read_only: false,
        },
    );
    let raw = open(&d.path, "raw", opts(M, 64 * K));
    assert_eq!(z.compression(), Compression::Zstd);
    assert_eq!(raw.compression(), Compression::None);
    let text: Vec<u8> = b"The quick brown fox jumps over the lazy longwire. "
        .iter()
        .copied()
        .cycle()
        .take(4 * 64 * K as usize)
        .collect();
    let noise = noise(64 * K as usize, 5);
    for v in [&z, &raw] {
        v.write(0, Bytes::from(text.clone()), false).await.unwrap();
        v.write(4 * 64 * K, Bytes::from(noise.clone()), false)
            .await
            .unwrap();
        // Partial write into a compressed chunk: read-modify-write.
        v.write(100, Bytes::from_static(b"PATCH"), false)
            .await
            .unwrap();
    }
    let mut want = text.clone();
    want[100..105].copy_from_slice(b"PATCH");
    want.extend_from_slice(&noise);
    for v in [&z, &raw] {
        assert_eq!(&v.read(0, want.len()).await.unwrap()[..], &want[..]);
    }
    let (zrows, zbytes) = usage(&d.path, "z");
    let (rrows, rbytes) = usage(&d.path, "raw");
    assert_eq!((zrows, rrows), (5, 5));
    assert_eq!(rbytes, 5 * 64 * K);
    // Four text chunks compress to almost nothing; the noise chunk stays raw.
    assert!(
        zbytes < 64 * K + 4 * 2 * K,
        "compressed volume stores {zbytes} bytes"
    );
    assert_eq!(
        codecs(&d.path, "z"),
        vec![(0, 1), (1, 1), (2, 1), (3, 1), (4, 0)]
    );
    assert!(codecs(&d.path, "raw").iter().all(|&(_, c)| c == 0));

    // A small patch into a raw (incompressible) chunk does not try to
    // compress it; a quarter chunk or more does.
    z.write(4 * 64 * K + 10, Bytes::from(vec![b'a'; 4096]), false)
        .await
        .unwrap();
    assert_eq!(codecs(&d.path, "z")[4], (4, 0));
    z.write(4 * 64 * K, Bytes::from(vec![b'a'; 60 * K as usize]), false)
        .await
        .unwrap();
    assert_eq!(codecs(&d.path, "z")[4], (4, 1));
    want[4 * 64 * K as usize..4 * 64 * K as usize + 60 * K as usize].fill(b'a');
    assert_eq!(&z.read(0, want.len()).await.unwrap()[..], &want[..]);

    // Compression comes from the database on reopen.
    drop(z);
    let z = open(&d.path, "z", SqliteOptions::default());
    assert_eq!(z.compression(), Compression::Zstd);
    assert_eq!(&z.read(0, want.len()).await.unwrap()[..], &want[..]);
}

#[tokio::test]
async fn reopen_after_drop_keeps_data_and_settings() {
    let d = db();
    let v = open(&d.path, "v", opts(M, 16 * K));
    v.write(12345, Bytes::from(pattern(50000, 3)), false)
        .await
        .unwrap();
    drop(v);
    let v = open(&d.path, "v", SqliteOptions::default());
    assert_eq!(v.size(), M);
    assert_eq!(v.chunk_size(), 16 * K);
    assert_eq!(
        &v.read(12345, 50000).await.unwrap()[..],
        &pattern(50000, 3)[..]
    );
    drop(v);

    // Growing keeps data; the new space reads as zeros.
    let v = open(
        &d.path,
        "v",
        SqliteOptions {
            size: Some(3 * M),
            ..Default::default()
        },
    );
    assert_eq!(v.size(), 3 * M);
    assert_eq!(
        &v.read(12345, 50000).await.unwrap()[..],
        &pattern(50000, 3)[..]
    );
    assert_zero(&v, M - 10, 2 * M as usize + 10).await;
    drop(v);
    let v = open(&d.path, "v", SqliteOptions::default());
    assert_eq!(v.size(), 3 * M);
    // The WAL was checkpointed away when the last connection closed.
    drop(v);
    assert!(!d.path.with_extension("sqlite-wal").exists());
}

#[tokio::test]
async fn never_shrinks_and_settings_conflicts_name_both_values() {
    let d = db();
    drop(open(&d.path, "v", opts(2 * M, 16 * K)));
    let err = |o: SqliteOptions| SqliteVolume::open(&d.path, "v", &o).unwrap_err();

    let e = err(SqliteOptions {
        size: Some(M),
        ..Default::default()
    });
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    let msg = e.to_string();
    assert!(
        msg.contains("shrink") && msg.contains("2097152") && msg.contains("\"v\""),
        "{msg}"
    );

    let msg = err(SqliteOptions {
        chunk_size: Some(64 * K),
        ..Default::default()
    })
    .to_string();
    assert!(
        msg.contains("16K") && msg.contains("chunk_size=64K"),
        "{msg}"
    );
    let msg = err(SqliteOptions {
        compression: Some(Compression::Zstd),
        ..Default::default()
    })
    .to_string();
    assert!(
        msg.contains("compression none") && msg.contains("compression=zstd"),
        "{msg}"
    );

    // The same values are fine.
    drop(open(&d.path, "v", opts(2 * M, 16 * K)));
    // Bad chunk sizes for a new volume.
    for bad in [1000, 2 * K, 8 * M, 48 * K] {
        let msg = SqliteVolume::open(&d.path, "w", &opts(M, bad))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("power of two"), "{bad}: {msg}");
    }
    // Read-only cannot grow.
    let msg = err(SqliteOptions {
        size: Some(4 * M),
        read_only: true,
        ..Default::default()
    })
    .to_string();
    assert!(msg.contains("read-only"), "{msg}");
}

#[tokio::test]
async fn missing_database_or_volume_needs_a_size() {
    let d = db();
    let nested = d.path.parent().unwrap().join("a/b/vols.sqlite");
    let e = SqliteVolume::open(&nested, "v", &SqliteOptions::default()).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    assert!(!nested.exists());
    let e = SqliteVolume::open(
        &nested,
        "v",
        &SqliteOptions {
            size: Some(M),
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    drop(open(&nested, "one", opts(M, C)));
    drop(open(&nested, "two", opts(M, C)));
    let e = SqliteVolume::open(&nested, "three", &SqliteOptions::default()).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    let msg = e.to_string();
    assert!(
        msg.contains("no volume \"three\"") && msg.contains("\"one\", \"two\""),
        "{msg}"
    );
    let e = SqliteVolume::open(&nested, "", &opts(M, C)).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
}

#[tokio::test]
async fn read_only_volume_reads_and_refuses_changes() {
    let d = db();
    let v = open(&d.path, "v", opts(M, C));
    v.write(0, Bytes::from_static(b"keep"), false)
        .await
        .unwrap();
    let ro = open(
        &d.path,
        "v",
        SqliteOptions {
            read_only: true,
            ..Default::default()
        },
    );
    assert!(ro.capabilities().read_only && !ro.capabilities().can_trim);
    assert_eq!(&ro.read(0, 4).await.unwrap()[..], b"keep");
    assert!(matches!(
        ro.write(0, Bytes::from_static(b"x"), false).await,
        Err(VolumeError::ReadOnly)
    ));
    assert!(matches!(
        ro.trim(0, 1, false).await,
        Err(VolumeError::ReadOnly)
    ));
    ro.flush().await.unwrap();
    drop(v);
    drop(ro);
    // Read-only on its own (no writer in the process).
    let ro = open(
        &d.path,
        "v",
        SqliteOptions {
            read_only: true,
            ..Default::default()
        },
    );
    assert_eq!(&ro.read(0, 4).await.unwrap()[..], b"keep");
}

#[tokio::test]
async fn corrupt_chunks_are_errors_naming_the_chunk() {
    let d = db();
    let v = open(
        &d.path,
        "v",
        SqliteOptions {
            size: Some(M),
            chunk_size: Some(C),
            compression: Some(Compression::Zstd),
            read_only: false,
        },
    );
    let text: Vec<u8> = b"abcdefgh"
        .iter()
        .copied()
        .cycle()
        .take(8 * C as usize)
        .collect();
    v.write(0, Bytes::from(text.clone()), false).await.unwrap();
    let noise = noise(C as usize, 1);
    v.write(8 * C, Bytes::from(noise.clone()), false)
        .await
        .unwrap();
    assert_eq!(codecs(&d.path, "v")[8], (8, 0));

    let c = Connection::open(&d.path).unwrap();
    let set = |idx: u64, codec: i64, data: &[u8]| {
        c.execute(
            "UPDATE chunks SET codec = ?2, data = ?3 WHERE idx = ?1",
            rusqlite::params![idx as i64, codec, data],
        )
        .unwrap();
    };
    set(2, 1, b"this is not zstd");
    set(3, 0, &noise[..100]); // raw, wrong length
    let short = zstd::bulk::compress(&text[..100], 1).unwrap();
    set(4, 1, &short); // valid zstd, wrong length
    set(5, 9, &noise); // unknown codec
    c.execute("UPDATE chunks SET data = 42 WHERE idx = 6", [])
        .unwrap();

    for (idx, what) in [
        (2, "zstd"),
        (3, "holds 100 bytes"),
        (4, "decodes to 100 bytes"),
        (5, "unknown codec 9"),
        (6, "data column"),
    ] {
        let msg = v.read(idx * C + 1, 10).await.unwrap_err().to_string();
        assert!(
            msg.contains(&format!(
                "chunk {idx} (bytes {}..{})",
                idx * C,
                (idx + 1) * C
            )) && msg.contains(what)
                && msg.contains("\"v\""),
            "{msg}"
        );
        let e = v.read_sparse(0, 8 * C as usize).await.unwrap_err();
        assert_eq!(e.errno(), 5);
        // A partial write cannot merge into it...
        let e = v
            .write(idx * C + 1, Bytes::from_static(b"x"), false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains(&format!("chunk {idx} ")), "{e}");
    }
    // ...and the failed write changed nothing else in its batch.
    assert_eq!(
        &v.read(0, 2 * C as usize).await.unwrap()[..],
        &text[..2 * C as usize]
    );
    // A whole-chunk write replaces it, a trim removes it.
    v.write(2 * C, Bytes::from(noise.clone()), false)
        .await
        .unwrap();
    assert_eq!(&v.read(2 * C, C as usize).await.unwrap()[..], &noise[..]);
    v.trim(3 * C, C, false).await.unwrap();
    assert_zero(&v, 3 * C, C as usize).await;
    // The corrupt chunk does not affect extents (presence only).
    let ext = v.extents(0, M).await.unwrap();
    assert_eq!(ext[0], Extent::new(3 * C, ExtentKind::Data));
}

#[tokio::test]
async fn foreign_and_damaged_databases_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, setup: &dyn Fn(&Path), want: &str| {
        let p = dir.path().join(name);
        setup(&p);
        let before = std::fs::read(&p).unwrap();
        let e = SqliteVolume::open(&p, "v", &opts(M, C)).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(want) && msg.contains(name), "{name}: {msg}");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{name}: {msg}");
        assert!(std::fs::read(&p).unwrap() == before, "{name} was modified");
        assert!(!p.with_extension("wal").exists());
    };
    check(
        "raw.img",
        &|p| std::fs::write(p, pattern(64 * K as usize, 1)).unwrap(),
        "not an SQLite database",
    );
    check(
        "other.db",
        &|p| {
            Connection::open(p)
                .unwrap()
                .execute_batch("CREATE TABLE volumes (name TEXT); CREATE TABLE chunks (x);")
                .unwrap()
        },
        "not a longwire one",
    );
    check(
        "future.db",
        &|p| {
            Connection::open(p)
                .unwrap()
                .execute_batch(&format!(
                    "PRAGMA application_id = {}; PRAGMA user_version = 7; CREATE TABLE t (x);",
                    schema::APPLICATION_ID
                ))
                .unwrap()
        },
        "format version 7",
    );
    check(
        "damaged.db",
        &|p| {
            Connection::open(p)
                .unwrap()
                .execute_batch(&format!(
                    "PRAGMA application_id = {}; PRAGMA user_version = 1;
                     CREATE TABLE meta (key, value); CREATE TABLE volumes (name, id, size, chunk_size,
                     compression, format_version, created);",
                    schema::APPLICATION_ID
                ))
                .unwrap()
        },
        "no table \"chunks\"",
    );
    check(
        "columns.db",
        &|p| {
            Connection::open(p)
                .unwrap()
                .execute_batch(&format!(
                    "PRAGMA application_id = {}; PRAGMA user_version = 1;
                     CREATE TABLE meta (key, value); CREATE TABLE volumes (name, id, size, chunk_size,
                     compression, format_version, created); CREATE TABLE chunks (volume, idx, data);",
                    schema::APPLICATION_ID
                ))
                .unwrap()
        },
        "no column \"codec\"",
    );

    // A damaged volume row.
    let d = db();
    drop(open(&d.path, "v", opts(M, C)));
    Connection::open(&d.path)
        .unwrap()
        .execute("UPDATE volumes SET chunk_size = 1000", [])
        .unwrap();
    let msg = SqliteVolume::open(&d.path, "v", &SqliteOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("invalid chunk size 1000"), "{msg}");

    // An empty file is a new database.
    let p = dir.path().join("empty.db");
    std::fs::write(&p, b"").unwrap();
    let v = open(&p, "v", opts(M, C));
    v.write(0, Bytes::from_static(b"ok"), true).await.unwrap();
}

#[tokio::test]
async fn flush_syncs_only_when_something_changed() {
    let d = db();
    let v = open(&d.path, "v", opts(M, C));
    let syncs = || -> i64 {
        Connection::open(&d.path)
            .unwrap()
            .query_row("SELECT value FROM meta WHERE key = 'syncs'", [], |r| {
                r.get(0)
            })
            .unwrap()
    };
    assert_eq!(syncs(), 0);
    v.flush().await.unwrap();
    assert_eq!(syncs(), 0, "nothing to make durable");
    v.write(0, Bytes::from_static(b"a"), false).await.unwrap();
    v.flush().await.unwrap();
    assert_eq!(syncs(), 1);
    v.flush().await.unwrap();
    assert_eq!(syncs(), 1);
    v.write(0, Bytes::from_static(b"b"), true).await.unwrap();
    assert_eq!(syncs(), 2);
    v.trim(0, C, true).await.unwrap();
    assert_eq!(syncs(), 3);
    let (r, _) = usage(&d.path, "v");
    assert_eq!(r, 0);
}

/// Zeroing bytes of a stored chunk that are zero already leaves the chunk
/// alone (the FUA commit finds nothing changed, so it does not sync);
/// zeroing bytes that hold data still zeroes exactly those.
#[tokio::test]
async fn zeroing_zeros_in_a_stored_chunk_changes_nothing() {
    let d = db();
    let v = open(&d.path, "v", opts(M, C));
    let syncs = || -> i64 {
        Connection::open(&d.path)
            .unwrap()
            .query_row("SELECT value FROM meta WHERE key = 'syncs'", [], |r| {
                r.get(0)
            })
            .unwrap()
    };
    let half = (C / 2) as usize;
    let data = pattern(half, 5);
    v.write(C / 2, Bytes::from(data.clone()), true)
        .await
        .unwrap();
    assert_eq!(syncs(), 1);
    let fua = ZeroFlags {
        fua: true,
        ..Default::default()
    };
    v.write_zeroes(0, C / 2, fua).await.unwrap();
    assert_eq!(syncs(), 1, "zeros over zeros rewrote the chunk");
    v.write_zeroes(C / 2 + 16, 16, fua).await.unwrap();
    assert_eq!(syncs(), 2);
    let got = v.read(0, C as usize).await.unwrap();
    let mut want = vec![0u8; C as usize];
    want[half..].copy_from_slice(&data);
    want[half + 16..half + 32].fill(0);
    assert_eq!(&got[..], &want[..]);
    assert_eq!(rows(&d.path, "v"), 1);
}

/// Many tasks write, zero and trim small ranges that share chunks (each
/// task owns every 64th 16-byte stripe, so the final content does not
/// depend on the interleaving); the result must equal a model of the same
/// operations. Lost read-modify-write updates would show as differences.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_partial_writes_to_shared_chunks_match_a_model() {
    const TASKS: u64 = 32;
    const STRIPE: u64 = 16;
    const SIZE: u64 = 16 * C;
    let d = db();
    let v = Arc::new(open(&d.path, "v", opts(SIZE, C)));
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let v = Arc::clone(&v);
        handles.push(tokio::spawn(async move {
            let mut model = vec![None::<u8>; SIZE as usize];
            let mut x = (t + 1).wrapping_mul(0x2545_F491_4F6C_DD1D);
            let mut next = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            for i in 0..150u64 {
                // Stripe s belongs to task s % TASKS.
                let stripe = (next() % (SIZE / STRIPE / TASKS)) * TASKS + t;
                let start = stripe * STRIPE + next() % 8;
                let len = 1 + next() % (STRIPE - (start % STRIPE));
                let range = start as usize..(start + len) as usize;
                match next() % 8 {
                    0 => {
                        v.trim(start, len, false).await.unwrap();
                        model[range].fill(Some(0));
                    }
                    1 => {
                        v.write_zeroes(start, len, ZeroFlags::default())
                            .await
                            .unwrap();
                        model[range].fill(Some(0));
                    }
                    2 => {
                        v.write(start, Bytes::from(vec![0u8; len as usize]), i % 3 == 0)
                            .await
                            .unwrap();
                        model[range].fill(Some(0));
                    }
                    _ => {
                        let byte = (next() as u8) | 1;
                        v.write(start, Bytes::from(vec![byte; len as usize]), false)
                            .await
                            .unwrap();
                        model[range].fill(Some(byte));
                    }
                }
                if i % 50 == 0 {
                    v.flush().await.unwrap();
                    // Reads in between see this task's own writes.
                    let got = v.read(start, len as usize).await.unwrap();
                    let want: Vec<u8> = model[start as usize..(start + len) as usize]
                        .iter()
                        .map(|b| b.unwrap())
                        .collect();
                    assert_eq!(&got[..], &want[..]);
                }
            }
            model
        }));
    }
    let mut want = vec![0u8; SIZE as usize];
    for h in handles {
        let model = h.await.unwrap();
        for (i, b) in model.into_iter().enumerate() {
            if let Some(b) = b {
                want[i] = b;
            }
        }
    }
    let got = v.read(0, SIZE as usize).await.unwrap();
    if let Some(i) = (0..SIZE as usize).find(|&i| got[i] != want[i]) {
        panic!(
            "byte {i} (chunk {}) is {} but the model says {}",
            i as u64 / C,
            got[i],
            want[i]
        );
    }
    // Stored chunks are exactly the non-zero ones.
    let nonzero = (0..SIZE / C)
        .filter(|&c| {
            want[(c * C) as usize..((c + 1) * C) as usize]
                .iter()
                .any(|&b| b != 0)
        })
        .count() as u64;
    assert_eq!(rows(&d.path, "v"), nonzero);
}

#[tokio::test]
async fn capabilities() {
    let d = db();
    let v = open(&d.path, "v", opts(M, 64 * K));
    let c = v.capabilities();
    assert!(c.can_flush && c.can_trim && c.can_zero && c.can_fast_zero && c.can_multi_conn);
    assert!(!c.read_only);
    assert_eq!(
        (c.min_block, c.preferred_block, c.max_payload),
        (1, 64 * 1024, 32 << 20)
    );
    // Fast zero always succeeds.
    v.write_zeroes(
        5,
        100_000,
        ZeroFlags {
            may_trim: false,
            fast: true,
            fua: false,
        },
    )
    .await
    .unwrap();
}
