//! Chunk-size benchmark for the SQLite store, through the Volume API.
//!
//! ```sh
//! cargo run --release -p longwire-store --example sqlite_chunk_bench
//! cargo run --release -p longwire-store --example sqlite_chunk_bench -- \
//!     --dir /mnt/ssd --chunks 16K,64K --size 512M --compression zstd
//! ```
//!
//! For each chunk size, on a fresh database, through the Volume API:
//!
//! 1. 4 KiB random writes into the empty volume (queue depth 16, FLUSH
//!    every 64 writes): most create a chunk;
//! 2. 1 MiB sequential writes over the whole volume (queue depth 4, FLUSH at
//!    the end);
//! 3. 4 KiB random writes again, now into existing chunks;
//! 4. 1 MiB sequential reads, 4 KiB random reads (queue depth 16);
//! 5. after trimming every other MiB, the extent map of the whole volume;
//! 6. the database file's size after closing.
//!
//! Each result is the median of `--runs` runs. Data is incompressible
//! unless `--compression zstd`, which writes half-compressible data.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use longwire_core::Volume;
use longwire_store::parse_size;
use longwire_store::sqlite::{Compression, SqliteOptions, SqliteVolume};
use tokio::task::JoinSet;

const K: u64 = 1024;
const M: u64 = 1024 * K;

struct Args {
    dir: PathBuf,
    chunks: Vec<u64>,
    size: u64,
    random_writes: u64,
    flush_every: u64,
    compression: Compression,
    page_size: Option<u32>,
    runs: usize,
}

fn args() -> Args {
    let mut a = Args {
        dir: std::env::temp_dir(),
        chunks: vec![4 * K, 16 * K, 64 * K, 256 * K],
        size: 256 * M,
        random_writes: 20_000,
        flush_every: 64,
        compression: Compression::None,
        page_size: None,
        runs: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => a.dir = PathBuf::from(val()),
            "--chunks" => {
                a.chunks = val().split(',').map(|s| parse_size(s).unwrap()).collect();
            }
            "--size" => a.size = parse_size(&val()).unwrap(),
            "--random-writes" => a.random_writes = val().parse().unwrap(),
            "--flush-every" => a.flush_every = val().parse().unwrap(),
            "--compression" => a.compression = Compression::parse(&val()).expect("none or zstd"),
            "--page-size" => a.page_size = Some(val().parse().unwrap()),
            "--runs" => a.runs = val().parse().unwrap(),
            "--help" | "-h" => {
                println!(
                    "options: --dir DIR --chunks 4K,16K,64K,256K --size 256M --random-writes 20000 \
                     --flush-every 64 --compression none|zstd --page-size 4096 --runs 3"
                );
                std::process::exit(0);
            }
            other => panic!("unknown option {other}"),
        }
    }
    a
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `len` bytes: random, or (with compression) half random, half text.
fn data(rng: &mut Rng, len: usize, compressible: bool) -> Bytes {
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        if compressible && (v.len() / 512) % 2 == 1 {
            v.extend_from_slice(b"longwire block storage: the quick brown fox ");
        } else {
            v.extend_from_slice(&rng.next().to_le_bytes());
        }
    }
    v.truncate(len);
    Bytes::from(v)
}

/// Run `ops` operations with at most `qd` in flight; `op(i)` builds the
/// i-th. After every `flush_every` operations (and at the end), wait for
/// everything in flight and flush.
async fn run<F, Fut>(
    v: &Arc<SqliteVolume>,
    ops: u64,
    qd: usize,
    flush_every: Option<u64>,
    op: F,
) -> Duration
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..ops {
        while set.len() >= qd {
            set.join_next().await.unwrap().unwrap();
        }
        set.spawn(op(i));
        if let Some(n) = flush_every {
            if (i + 1) % n == 0 {
                while let Some(r) = set.join_next().await {
                    r.unwrap();
                }
                v.flush().await.unwrap();
            }
        }
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    if flush_every.is_some() {
        v.flush().await.unwrap();
    }
    start.elapsed()
}

fn fresh_db(dir: &Path, chunk: u64, page_size: Option<u32>) -> PathBuf {
    let path = dir.join(format!(
        "longwire-bench-{}-{chunk}.sqlite",
        std::process::id()
    ));
    remove_db(&path);
    if let Some(ps) = page_size {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(&format!(
            "PRAGMA page_size = {ps}; PRAGMA journal_mode = WAL;"
        ))
        .unwrap();
    }
    path
}

fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "volume {} MiB, {} random 4K writes (QD 16, flush every {}), compression {}, dir {}, \
         median of {} runs",
        a.size / M,
        a.random_writes,
        a.flush_every,
        a.compression,
        a.dir.display(),
        a.runs
    );
    println!();
    println!(
        "| chunk | 4K rand write, new chunks (IOPS) | 4K rand write, existing chunks (IOPS) \
         | 1M seq write | 1M seq read | 4K rand read (IOPS) | extents of the volume | DB size |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &chunk in &a.chunks {
        let mut results: Vec<Result> = (0..a.runs)
            .map(|_| rt.block_on(bench_one(&a, chunk)))
            .collect();
        let med = |f: &dyn Fn(&Result) -> f64, results: &mut Vec<Result>| {
            results.sort_by(|x, y| f(x).total_cmp(&f(y)));
            f(&results[results.len() / 2])
        };
        let rand_write = med(&|r| r.rand_write, &mut results);
        let rand_overwrite = med(&|r| r.rand_overwrite, &mut results);
        let seq_write = med(&|r| r.seq_write, &mut results);
        let seq_read = med(&|r| r.seq_read, &mut results);
        let rand_read = med(&|r| r.rand_read, &mut results);
        let extents = med(&|r| r.extents_ms, &mut results);
        let db_size = med(&|r| r.db_mib, &mut results);
        println!(
            "| {} | {:.0} | {:.0} | {:.0} MiB/s | {:.0} MiB/s | {:.0} | {:.1} ms | {:.0} MiB |",
            human(chunk),
            rand_write,
            rand_overwrite,
            seq_write,
            seq_read,
            rand_read,
            extents,
            db_size,
        );
    }
}

struct Result {
    rand_write: f64,
    rand_overwrite: f64,
    seq_write: f64,
    seq_read: f64,
    rand_read: f64,
    extents_ms: f64,
    db_mib: f64,
}

async fn bench_one(a: &Args, chunk: u64) -> Result {
    let path = fresh_db(&a.dir, chunk, a.page_size);
    let v = Arc::new(
        SqliteVolume::open(
            &path,
            "bench",
            &SqliteOptions {
                size: Some(a.size),
                chunk_size: Some(chunk),
                compression: Some(a.compression),
                read_only: false,
            },
        )
        .unwrap(),
    );
    let zstd = a.compression == Compression::Zstd;
    let blocks = a.size / (4 * K);

    // 4K random writes into an empty volume.
    let mut rng = Rng(0x1234_5678_9abc_def1 ^ chunk);
    let writes: Arc<Vec<(u64, Bytes)>> = Arc::new(
        (0..a.random_writes)
            .map(|_| {
                (
                    (rng.next() % blocks) * 4 * K,
                    data(&mut rng, 4 * K as usize, zstd),
                )
            })
            .collect(),
    );
    let t = run(&v, a.random_writes, 16, Some(a.flush_every), |i| {
        let (v, w) = (Arc::clone(&v), Arc::clone(&writes));
        async move {
            let (off, d) = &w[i as usize];
            v.write(*off, d.clone(), false).await.unwrap();
        }
    })
    .await;
    let rand_write = a.random_writes as f64 / t.as_secs_f64();

    // 1M sequential writes over the whole volume.
    let seq_ops = a.size / M;
    let buf: Arc<Vec<Bytes>> = Arc::new((0..8).map(|_| data(&mut rng, M as usize, zstd)).collect());
    let t = run(&v, seq_ops, 4, Some(u64::MAX), |i| {
        let (v, b) = (Arc::clone(&v), Arc::clone(&buf));
        async move {
            v.write(i * M, b[i as usize % 8].clone(), false)
                .await
                .unwrap();
        }
    })
    .await;
    let seq_write = a.size as f64 / M as f64 / t.as_secs_f64();

    // 4K random writes again, now that every chunk exists (steady state:
    // read-modify-write of existing chunks instead of creating them).
    let writes: Arc<Vec<(u64, Bytes)>> = Arc::new(
        (0..a.random_writes)
            .map(|_| {
                (
                    (rng.next() % blocks) * 4 * K,
                    data(&mut rng, 4 * K as usize, zstd),
                )
            })
            .collect(),
    );
    let t = run(&v, a.random_writes, 16, Some(a.flush_every), |i| {
        let (v, w) = (Arc::clone(&v), Arc::clone(&writes));
        async move {
            let (off, d) = &w[i as usize];
            v.write(*off, d.clone(), false).await.unwrap();
        }
    })
    .await;
    let rand_overwrite = a.random_writes as f64 / t.as_secs_f64();

    // 1M sequential reads.
    let t = run(&v, seq_ops, 4, None, |i| {
        let v = Arc::clone(&v);
        async move {
            let got = v.read(i * M, M as usize).await.unwrap();
            assert_eq!(got.len(), M as usize);
        }
    })
    .await;
    let seq_read = a.size as f64 / M as f64 / t.as_secs_f64();

    // 4K random reads.
    let reads = a.random_writes;
    let t = run(&v, reads, 16, None, |i| {
        let v = Arc::clone(&v);
        let off = ((i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % blocks) * 4 * K;
        async move {
            v.read(off, 4 * K as usize).await.unwrap();
        }
    })
    .await;
    let rand_read = reads as f64 / t.as_secs_f64();

    // Extent map of the whole volume (trim every other MiB first, so it has
    // some structure).
    for i in (0..seq_ops).step_by(2) {
        v.trim(i * M, M, false).await.unwrap();
    }
    v.flush().await.unwrap();
    let start = Instant::now();
    let mut pos = 0;
    let mut runs = 0;
    while pos < a.size {
        let ext = v.extents(pos, a.size - pos).await.unwrap();
        runs += ext.len();
        pos += ext.iter().map(|e| e.len).sum::<u64>();
    }
    let extents = start.elapsed();
    assert_eq!(runs as u64, seq_ops, "every other MiB trimmed");

    drop(v);
    let db_size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    remove_db(&path);
    Result {
        rand_write,
        rand_overwrite,
        seq_write,
        seq_read,
        rand_read,
        extents_ms: extents.as_secs_f64() * 1e3,
        db_mib: (db_size / M) as f64,
    }
}

fn human(n: u64) -> String {
    if n >= M && n.is_multiple_of(M) {
        format!("{}M", n / M)
    } else {
        format!("{}K", n / K)
    }
}
