//! `longwire copy SRC DST`: copy one volume onto another, sparse-aware.
//!
//! Both ends are volume URIs: `file:`, `sqlite:` and `memory:` (opened by
//! [`longwire_store::open_uri`]) or `nbd://` / `nbd+unix://` / `nbds://` /
//! `nbds+unix://` (an
//! [`NbdVolume`], which asks the server for block status). SRC's allocation
//! map is walked first; data extents are read and written in chunks, many at
//! once; holes and zero extents are never read, and on DST they are zeroed
//! only where DST's own map, taken before the copy starts, says it held
//! data (a fresh or sparse destination is left alone; see [`alloc_map`]).
//! DST is flushed at the end.

mod alloc_map;
mod plan;

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use longwire_core::{ReadSegment, Volume, ZeroFlags};
use longwire_nbd::client::{ClientConfig, NbdVolume};
use tokio::task::JoinSet;

use crate::cli::CopyArgs;
use crate::units::human_size;
use alloc_map::AllocationMap;
use plan::{plan, Step};

/// Largest piece read and written at once.
const CHUNK: u64 = 4 << 20;

fn is_nbd(uri: &str) -> bool {
    let scheme = uri.split_once(':').map(|(s, _)| s.to_ascii_lowercase()).unwrap_or_default();
    scheme.starts_with("nbd")
}

/// Open a volume URI. `create_size`: for `file:`/`sqlite:` URIs without
/// `size=`, add it, so a missing destination is created at SRC's size (and
/// a smaller existing one grown to it).
async fn open(uri: &str, connections: usize, create_size: Option<u64>) -> anyhow::Result<Arc<dyn Volume>> {
    if is_nbd(uri) {
        let config = ClientConfig { connections, ..ClientConfig::default() };
        let vol = NbdVolume::connect(uri, config).await.with_context(|| format!("connecting to {uri}"))?;
        return Ok(Arc::new(vol));
    }
    let mut uri = uri.to_string();
    if let Some(size) = create_size {
        let scheme = uri.split_once(':').map(|(s, _)| s.to_ascii_lowercase()).unwrap_or_default();
        let query = uri.split_once('?').map(|(_, q)| q).unwrap_or("");
        let has_size = query.split('&').any(|p| p.split('=').next() == Some("size"));
        if (scheme == "file" || scheme == "sqlite") && !has_size {
            let sep = if uri.contains('?') { '&' } else { '?' };
            uri = format!("{uri}{sep}size={size}");
        }
    }
    let opened = longwire_store::open_uri(&uri).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(opened.volume)
}

#[derive(Default)]
struct Counters {
    /// Bytes of SRC data read (and written to DST).
    read: AtomicU64,
    /// Bytes of SRC that were holes or zeros and were not read.
    skipped: AtomicU64,
    /// Bytes zeroed on DST (where DST held data under a SRC zero run).
    zeroed: AtomicU64,
}

pub fn run(args: CopyArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(copy(args))
}

async fn copy(args: CopyArgs) -> anyhow::Result<()> {
    let connections = args.connections.unwrap_or(4).max(1);
    let parallel = args.parallel.unwrap_or(8).max(1);
    let src = open(&args.src, connections, None).await?;
    let size = src.size();
    let dst = open(&args.dst, connections, Some(size)).await?;
    if dst.size() < size {
        bail!("{} ({} bytes) is smaller than {} ({size} bytes)", args.dst, dst.size(), args.src);
    }
    if dst.capabilities().read_only {
        bail!("{} is read-only", args.dst);
    }
    let started = Instant::now();

    let src_map = AllocationMap::read(&*src, size).await.with_context(|| format!("allocation map of {}", args.src))?;
    // Before anything is written: where DST may hold data of its own.
    let dst_map =
        Arc::new(AllocationMap::read(&*dst, size).await.with_context(|| format!("allocation map of {}", args.dst))?);
    let total_data = src_map.data_bytes();

    let counters = Arc::new(Counters::default());
    let progress = (!args.no_progress && std::io::stderr().is_terminal()).then(|| {
        let c = counters.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let done = c.read.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                let pct = if total_data == 0 { 100.0 } else { done as f64 * 100.0 / total_data as f64 };
                eprint!(
                    "\rcopied {} of {} data ({pct:.0}%), {:.1} MB/s   ",
                    human_size(done),
                    human_size(total_data),
                    done as f64 / secs / 1e6
                );
                let _ = std::io::stderr().flush();
            }
        })
    });

    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let mut failure: Option<anyhow::Error> = None;
    'walk: for run in src_map.runs() {
        let end = run.start + run.len;
        let mut pos = run.start;
        while pos < end {
            let len = (end - pos).min(CHUNK);
            while tasks.len() >= parallel {
                if let Some(r) = tasks.join_next().await {
                    if let Err(e) = r.map_err(anyhow::Error::from).and_then(|r| r) {
                        failure = Some(e);
                        break 'walk;
                    }
                }
            }
            let (src, dst, dst_map, c) = (src.clone(), dst.clone(), dst_map.clone(), counters.clone());
            let data = run.data;
            tasks.spawn(async move {
                if data {
                    copy_chunk(&*src, &*dst, &dst_map, pos, len, &c).await
                } else {
                    c.skipped.fetch_add(len, Ordering::Relaxed);
                    zero_where_needed(&*dst, &dst_map, pos, len, &c).await
                }
            });
            pos += len;
        }
    }
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r.map_err(anyhow::Error::from).and_then(|r| r) {
            failure.get_or_insert(e);
        }
    }
    if let Some(p) = progress {
        p.abort();
        let done = counters.read.load(Ordering::Relaxed);
        eprintln!("\rcopied {} of {} data                    ", human_size(done), human_size(total_data));
    }
    if let Some(e) = failure {
        return Err(e.context(format!("copying {} to {}", args.src, args.dst)));
    }
    dst.flush().await.with_context(|| format!("flushing {}", args.dst))?;
    // Give back what the volumes hold, such as an S3 volume's lease.
    dst.close().await.with_context(|| format!("closing {}", args.dst))?;
    src.close().await.with_context(|| format!("closing {}", args.src))?;

    let secs = started.elapsed().as_secs_f64();
    let read = counters.read.load(Ordering::Relaxed);
    let skipped = counters.skipped.load(Ordering::Relaxed);
    let zeroed = counters.zeroed.load(Ordering::Relaxed);
    eprintln!(
        "copied {} ({size} bytes) from {} to {}: {read} bytes read, {skipped} bytes of holes skipped, \
         {zeroed} bytes zeroed on the destination, in {secs:.2} s ({:.1} MB/s)",
        human_size(size),
        args.src,
        args.dst,
        read as f64 / secs.max(1e-6) / 1e6
    );
    Ok(())
}

/// Copy `[pos, pos + len)`, which SRC says holds data; runs SRC reports as
/// zero on the way (sparse reads) and all-zero buffers count as holes
/// (small ones between data are written with it, see [`plan`]).
async fn copy_chunk(
    src: &dyn Volume,
    dst: &dyn Volume,
    dst_map: &AllocationMap,
    pos: u64,
    len: u64,
    c: &Counters,
) -> anyhow::Result<()> {
    let segments = src.read_sparse(pos, len as usize).await.with_context(|| format!("reading {len} bytes at {pos}"))?;
    for seg in &segments {
        match seg {
            ReadSegment::Data(_) => c.read.fetch_add(seg.len(), Ordering::Relaxed),
            ReadSegment::Zero(n) => c.skipped.fetch_add(*n, Ordering::Relaxed),
        };
    }
    let fold = u64::from(dst.capabilities().preferred_block);
    for step in plan(pos, segments, fold) {
        match step {
            Step::Write { at, data } => {
                let n = data.len();
                dst.write(at, data, false).await.with_context(|| format!("writing {n} bytes at {at}"))?;
            }
            Step::Zero { at, len } => zero_where_needed(dst, dst_map, at, len, c).await?,
        }
    }
    Ok(())
}

/// Make `[pos, pos + len)` of DST read as zeros, touching only the parts
/// that held data before the copy started. The rest still reads as zeros:
/// the copy writes only SRC's data, never inside SRC's zero runs.
async fn zero_where_needed(dst: &dyn Volume, dst_map: &AllocationMap, pos: u64, len: u64, c: &Counters) -> anyhow::Result<()> {
    for (start, end) in dst_map.data_within(pos, pos + len) {
        let n = end - start;
        dst.write_zeroes(start, n, ZeroFlags { may_trim: true, ..Default::default() })
            .await
            .with_context(|| format!("zeroing {n} bytes at {start}"))?;
        c.zeroed.fetch_add(n, Ordering::Relaxed);
    }
    Ok(())
}
