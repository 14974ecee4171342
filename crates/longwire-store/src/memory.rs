//! A sparse volume in RAM.
//!
//! Storage is 64 KiB chunks allocated on first write, so a 6 TiB volume costs
//! only what has been written. Chunks that were never written (or were
//! trimmed away) read as zeros and are reported as holes.

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use longwire_core::{
    Capabilities, Extent, ExtentKind, ReadSegment, Volume, VolumeError, VolumeResult, ZeroFlags,
};
use parking_lot::RwLock;

use crate::sparse::{check_in_range, check_read, check_write, SegmentBuilder, MAX_PAYLOAD};

/// Allocation unit. Small enough that scattered 4 KiB writes don't balloon
/// memory too much, large enough that the maps stay small.
const CHUNK: u64 = 64 * 1024;

/// Chunks are spread over this many independently locked maps (chunk `i`
/// lives in shard `i % SHARDS`), so concurrent connections touching
/// different chunks rarely wait for each other.
const SHARDS: usize = 16;

/// Most chunks one `extents` call looks at; bounds the work for huge ranges
/// (the trait allows returning less than asked for).
const MAX_EXTENT_CHUNKS: usize = 4096;

type Chunk = Box<[u8]>;
/// BTreeMap rather than HashMap so range operations (trim, extents) over a
/// multi-TiB range cost O(chunks present), not O(chunks in range).
type Shard = RwLock<BTreeMap<u64, Chunk>>;

/// A sparse in-memory volume. Contents are lost when it is dropped.
pub struct MemoryVolume {
    size: u64,
    shards: Box<[Shard]>,
}

impl std::fmt::Debug for MemoryVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryVolume")
            .field("size", &self.size)
            .field("allocated_bytes", &self.allocated_bytes())
            .finish()
    }
}

/// The part of one chunk that a byte range touches.
struct Piece {
    /// Chunk index.
    index: u64,
    /// Offset of the first byte inside the chunk.
    start: usize,
    len: usize,
}

/// Split `[offset, offset + len)` into per-chunk pieces, in order. The
/// caller has checked that the range does not overflow.
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = Piece> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let start = pos % CHUNK;
        let n = (CHUNK - start).min(end - pos);
        let piece = Piece {
            index: pos / CHUNK,
            start: start as usize,
            len: n as usize,
        };
        pos += n;
        Some(piece)
    })
}

impl MemoryVolume {
    /// A volume of `size` bytes that reads as all zeros. Allocates nothing
    /// until written.
    pub fn new(size: u64) -> Self {
        let shards = (0..SHARDS).map(|_| RwLock::new(BTreeMap::new())).collect();
        MemoryVolume { size, shards }
    }

    /// Bytes of RAM currently holding data (whole chunks).
    pub fn allocated_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.read().len() as u64)
            .sum::<u64>()
            * CHUNK
    }

    fn shard(&self, index: u64) -> &Shard {
        &self.shards[(index % SHARDS as u64) as usize]
    }

    /// Zero `[offset, offset + len)` inside chunks that exist; missing
    /// chunks are already zero and stay unallocated.
    fn zero_partial(&self, offset: u64, len: u64) {
        for p in pieces(offset, len) {
            if let Some(chunk) = self.shard(p.index).write().get_mut(&p.index) {
                chunk[p.start..p.start + p.len].fill(0);
            }
        }
    }

    /// Make a checked range read as zeros: whole chunks are dropped, partial
    /// chunks at either end are zeroed in place.
    fn discard(&self, offset: u64, len: u64) {
        let end = offset + len;
        let first_full = offset.div_ceil(CHUNK);
        // A range reaching the end of the volume covers the last chunk even
        // when the volume size is not a multiple of CHUNK.
        let end_full = if end == self.size {
            end.div_ceil(CHUNK)
        } else {
            end / CHUNK
        };
        if first_full >= end_full {
            self.zero_partial(offset, len);
            return;
        }
        for shard in self.shards.iter() {
            let mut map = shard.write();
            let doomed: Vec<u64> = map.range(first_full..end_full).map(|(&k, _)| k).collect();
            for k in doomed {
                map.remove(&k);
            }
        }
        // saturating: first_full * CHUNK can exceed u64 near the top of a
        // u64::MAX-sized volume; the min() then clips it back to `end`.
        let head_end = first_full.saturating_mul(CHUNK).min(end);
        self.zero_partial(offset, head_end - offset);
        let tail_start = end_full.saturating_mul(CHUNK).min(end);
        self.zero_partial(tail_start, end - tail_start);
    }

    /// Sorted indices of the first `limit` present chunks in `[first, last]`.
    fn present_chunks(&self, first: u64, last: u64, limit: usize) -> Vec<u64> {
        let mut found: Vec<u64> = Vec::new();
        for shard in self.shards.iter() {
            // Each shard's first `limit` keys are enough: the global first
            // `limit` are among them.
            found.extend(
                shard
                    .read()
                    .range(first..=last)
                    .map(|(&k, _)| k)
                    .take(limit),
            );
        }
        found.sort_unstable();
        found.truncate(limit);
        found
    }
}

#[async_trait]
impl Volume for MemoryVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: false,
            // Nothing to persist, so flush is a successful no-op.
            can_flush: true,
            can_trim: true,
            can_zero: true,
            // Zeroing only drops or clears memory: always cheap.
            can_fast_zero: true,
            // Every handle sees the same chunks; there is no cache to flush.
            can_multi_conn: true,
            min_block: 1,
            preferred_block: 4096,
            max_payload: MAX_PAYLOAD,
        }
    }

    async fn read(&self, offset: u64, len: usize) -> VolumeResult<Bytes> {
        check_read(self.size, offset, len)?;
        let mut buf = vec![0u8; len];
        let mut pos = 0;
        for p in pieces(offset, len as u64) {
            if let Some(chunk) = self.shard(p.index).read().get(&p.index) {
                buf[pos..pos + p.len].copy_from_slice(&chunk[p.start..p.start + p.len]);
            }
            pos += p.len;
        }
        Ok(Bytes::from(buf))
    }

    async fn read_sparse(&self, offset: u64, len: usize) -> VolumeResult<Vec<ReadSegment>> {
        check_read(self.size, offset, len)?;
        let mut out = SegmentBuilder::default();
        for p in pieces(offset, len as u64) {
            match self.shard(p.index).read().get(&p.index) {
                Some(chunk) => out
                    .data(p.len)
                    .copy_from_slice(&chunk[p.start..p.start + p.len]),
                None => out.zero(p.len as u64),
            }
        }
        Ok(out.finish())
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> VolumeResult<()> {
        check_write(self.size, offset, data.len() as u64)?;
        let mut pos = 0;
        for p in pieces(offset, data.len() as u64) {
            let src = &data[pos..pos + p.len];
            pos += p.len;
            let mut map = self.shard(p.index).write();
            match map.get_mut(&p.index) {
                Some(chunk) => chunk[p.start..p.start + p.len].copy_from_slice(src),
                // Writing zeros into a hole changes nothing; skipping it keeps
                // zero-filling clients from allocating the whole volume.
                None if src.iter().all(|&b| b == 0) => {}
                None => {
                    let mut chunk: Chunk = vec![0u8; CHUNK as usize].into_boxed_slice();
                    chunk[p.start..p.start + p.len].copy_from_slice(src);
                    map.insert(p.index, chunk);
                }
            }
        }
        Ok(())
    }

    async fn flush(&self) -> VolumeResult<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> VolumeResult<()> {
        check_write(self.size, offset, len)?;
        self.discard(offset, len);
        Ok(())
    }

    /// Same as trim: a dropped chunk reads as zeros, and RAM has no notion of
    /// "keep it allocated" worth honouring, so `may_trim` makes no difference
    /// and `fast` always succeeds.
    async fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> VolumeResult<()> {
        check_write(self.size, offset, len)?;
        self.discard(offset, len);
        Ok(())
    }

    async fn extents(&self, offset: u64, len: u64) -> VolumeResult<Vec<Extent>> {
        if len == 0 {
            return Err(VolumeError::Invalid("extents of an empty range".into()));
        }
        check_in_range(self.size, offset, len)?;
        let end = offset + len;
        let present = self.present_chunks(offset / CHUNK, (end - 1) / CHUNK, MAX_EXTENT_CHUNKS);
        let truncated = present.len() == MAX_EXTENT_CHUNKS;
        let mut out = Vec::new();
        let mut pos = offset;
        for index in present {
            let start = (index * CHUNK).max(pos);
            let stop = index.saturating_mul(CHUNK).saturating_add(CHUNK).min(end);
            Extent::push_merged(&mut out, Extent::new(start - pos, ExtentKind::Hole));
            Extent::push_merged(&mut out, Extent::new(stop - start, ExtentKind::Data));
            pos = stop;
        }
        // When we stopped early, what follows is unknown: end the answer at
        // the last chunk examined instead of guessing "hole".
        if !truncated {
            Extent::push_merged(&mut out, Extent::new(end - pos, ExtentKind::Hole));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIB: u64 = 1 << 40;
    const GIB: u64 = 1 << 30;

    fn pattern(len: usize, seed: u8) -> Bytes {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect::<Vec<u8>>()
            .into()
    }

    async fn assert_zero(v: &MemoryVolume, offset: u64, len: usize) {
        let got = v.read(offset, len).await.unwrap();
        assert!(
            got.iter().all(|&b| b == 0),
            "range {offset}+{len} is not zero"
        );
    }

    #[tokio::test]
    async fn round_trip_unaligned_and_across_chunks() {
        let v = MemoryVolume::new(1 << 20);
        let cases: &[(u64, usize)] = &[
            (0, 1),
            (1, 4095),
            (CHUNK - 7, 14),                         // straddles a chunk boundary
            (3 * CHUNK - 1, 2 * CHUNK as usize + 2), // spans three boundaries
            ((1 << 20) - 3, 3),                      // last bytes of the volume
        ];
        for (i, &(off, len)) in cases.iter().enumerate() {
            let data = pattern(len, i as u8);
            v.write(off, data.clone(), false).await.unwrap();
            assert_eq!(v.read(off, len).await.unwrap(), data, "case {i}");
        }
        // Bytes around a write are untouched.
        assert_zero(&v, CHUNK - 8, 1).await;
        assert_zero(&v, CHUNK + 7, 1).await;
    }

    #[tokio::test]
    async fn huge_sparse_volume_allocates_only_written_chunks() {
        let v = MemoryVolume::new(6 * TIB);
        assert_eq!(v.size(), 6 * TIB);
        let offsets = [5 * GIB + 123, 2 * TIB + 7, 6 * TIB - 100];
        for (i, &off) in offsets.iter().enumerate() {
            v.write(off, pattern(100, i as u8), false).await.unwrap();
        }
        for (i, &off) in offsets.iter().enumerate() {
            assert_eq!(v.read(off, 100).await.unwrap(), pattern(100, i as u8));
        }
        assert_zero(&v, 4 * TIB, 4096).await;
        // Each 100-byte write lands inside a single chunk.
        assert_eq!(v.allocated_bytes(), 3 * CHUNK);
        // Extents over the whole volume are cheap and describe the layout.
        let ext = v.extents(0, 6 * TIB).await.unwrap();
        assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), 6 * TIB);
        assert_eq!(ext.iter().filter(|e| e.kind == ExtentKind::Data).count(), 3);
    }

    #[tokio::test]
    async fn out_of_range_is_an_error_not_a_panic() {
        let v = MemoryVolume::new(6 * TIB);
        assert!(matches!(
            v.read(6 * TIB, 1).await,
            Err(VolumeError::Invalid(_))
        ));
        assert!(matches!(
            v.read(u64::MAX, 2).await,
            Err(VolumeError::Invalid(_))
        ));
        assert!(matches!(
            v.read(0, usize::MAX).await,
            Err(VolumeError::Overflow(_))
        ));
        assert!(matches!(
            v.write(6 * TIB - 1, pattern(2, 0), false).await,
            Err(VolumeError::NoSpace(_))
        ));
        assert!(matches!(
            v.write(u64::MAX, pattern(2, 0), false).await,
            Err(VolumeError::NoSpace(_))
        ));
        assert!(matches!(
            v.trim(u64::MAX, u64::MAX, false).await,
            Err(VolumeError::NoSpace(_))
        ));
        assert!(matches!(
            v.write_zeroes(1, u64::MAX, ZeroFlags::default()).await,
            Err(VolumeError::NoSpace(_))
        ));
        assert!(matches!(
            v.extents(6 * TIB, 1).await,
            Err(VolumeError::Invalid(_))
        ));
        assert!(matches!(
            v.extents(0, 0).await,
            Err(VolumeError::Invalid(_))
        ));
        // Zero-length requests at the very end are fine.
        assert_eq!(v.read(6 * TIB, 0).await.unwrap().len(), 0);
    }

    #[tokio::test]
    async fn max_size_volume_does_not_overflow() {
        let v = MemoryVolume::new(u64::MAX);
        let off = u64::MAX - 10;
        v.write(off, pattern(10, 3), false).await.unwrap();
        assert_eq!(v.read(off, 10).await.unwrap(), pattern(10, 3));
        // The last chunk is [2^64 - CHUNK, 2^64); the range starts one byte
        // before the chunk ahead of it.
        let ext = v.extents(u64::MAX - 2 * CHUNK, 2 * CHUNK).await.unwrap();
        assert_eq!(
            ext,
            vec![
                Extent::new(CHUNK + 1, ExtentKind::Hole),
                Extent::new(CHUNK - 1, ExtentKind::Data)
            ]
        );
        // Trimming just the written bytes clears them but keeps the chunk...
        v.trim(off, 10, false).await.unwrap();
        assert_zero(&v, off, 10).await;
        assert_eq!(v.allocated_bytes(), CHUNK);
        // ...while trimming from the chunk's start to the end of the volume
        // frees it, though the volume ends one byte short of the chunk's end.
        v.trim(u64::MAX - (CHUNK - 1), CHUNK - 1, false)
            .await
            .unwrap();
        assert_eq!(
            v.allocated_bytes(),
            0,
            "trim to the end of the volume drops the last chunk"
        );
    }

    #[tokio::test]
    async fn trim_and_zero_read_back_zero_and_free_chunks() {
        let v = MemoryVolume::new(16 * CHUNK);
        v.write(0, pattern(16 * CHUNK as usize, 9), false)
            .await
            .unwrap();
        assert_eq!(v.allocated_bytes(), 16 * CHUNK);

        // Unaligned trim: chunks 2..=4 fully covered and dropped, edges zeroed.
        v.trim(CHUNK + 10, 4 * CHUNK, false).await.unwrap();
        assert_zero(&v, CHUNK + 10, 4 * CHUNK as usize).await;
        assert_eq!(
            v.read(CHUNK + 9, 1).await.unwrap(),
            pattern(16 * CHUNK as usize, 9).slice(CHUNK as usize + 9..CHUNK as usize + 10)
        );
        assert_eq!(v.allocated_bytes(), 13 * CHUNK);

        let flags = ZeroFlags {
            may_trim: false,
            fast: true,
            fua: true,
        };
        v.write_zeroes(8 * CHUNK, 2 * CHUNK, flags).await.unwrap();
        assert_zero(&v, 8 * CHUNK, 2 * CHUNK as usize).await;
        assert_ne!(v.read(10 * CHUNK, 1).await.unwrap()[0], 0);
        assert_eq!(v.allocated_bytes(), 11 * CHUNK);

        // Zeroing inside one chunk keeps it, cleared.
        v.write_zeroes(12 * CHUNK + 5, 10, ZeroFlags::default())
            .await
            .unwrap();
        assert_zero(&v, 12 * CHUNK + 5, 10).await;
        assert_ne!(v.read(12 * CHUNK + 4, 1).await.unwrap()[0], 0);
        assert_ne!(v.read(12 * CHUNK + 15, 1).await.unwrap()[0], 0);
    }

    #[tokio::test]
    async fn extents_follow_writes_and_trims() {
        let v = MemoryVolume::new(8 * CHUNK);
        assert_eq!(
            v.extents(0, 8 * CHUNK).await.unwrap(),
            vec![Extent::new(8 * CHUNK, ExtentKind::Hole)]
        );

        v.write(CHUNK + 1, pattern(CHUNK as usize, 1), false)
            .await
            .unwrap(); // chunks 1 and 2
        assert_eq!(
            v.extents(0, 8 * CHUNK).await.unwrap(),
            vec![
                Extent::new(CHUNK, ExtentKind::Hole),
                Extent::new(2 * CHUNK, ExtentKind::Data),
                Extent::new(5 * CHUNK, ExtentKind::Hole),
            ]
        );
        // Clipped to the requested range.
        assert_eq!(
            v.extents(CHUNK + 100, 200).await.unwrap(),
            vec![Extent::new(200, ExtentKind::Data)]
        );

        v.trim(CHUNK, CHUNK, false).await.unwrap();
        assert_eq!(
            v.extents(0, 8 * CHUNK).await.unwrap(),
            vec![
                Extent::new(2 * CHUNK, ExtentKind::Hole),
                Extent::new(CHUNK, ExtentKind::Data),
                Extent::new(5 * CHUNK, ExtentKind::Hole),
            ]
        );
    }

    #[tokio::test]
    async fn read_sparse_reports_holes_and_merges() {
        let v = MemoryVolume::new(8 * CHUNK);
        v.write(2 * CHUNK - 3, pattern(6, 4), false).await.unwrap(); // chunks 1 and 2
        let segs = v.read_sparse(10, 4 * CHUNK as usize).await.unwrap();
        assert_eq!(segs.len(), 3, "{segs:?}");
        assert_eq!(segs[0], ReadSegment::Zero(CHUNK - 10));
        match &segs[1] {
            ReadSegment::Data(d) => {
                assert_eq!(d.len() as u64, 2 * CHUNK);
                assert_eq!(
                    &d[CHUNK as usize - 3..CHUNK as usize + 3],
                    &pattern(6, 4)[..]
                );
            }
            other => panic!("expected data, got {other:?}"),
        }
        assert_eq!(segs[2], ReadSegment::Zero(CHUNK + 10));
        let total: u64 = segs.iter().map(|s| s.len()).sum();
        assert_eq!(total, 4 * CHUNK);
    }

    #[tokio::test]
    async fn zero_writes_into_holes_stay_sparse() {
        let v = MemoryVolume::new(4 * CHUNK);
        v.write(0, Bytes::from(vec![0u8; 4 * CHUNK as usize]), false)
            .await
            .unwrap();
        assert_eq!(v.allocated_bytes(), 0);
        assert_eq!(v.capabilities().max_payload, MAX_PAYLOAD);
        assert!(v.capabilities().can_multi_conn && v.capabilities().can_fast_zero);
    }
}
