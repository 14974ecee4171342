//! The block commands (SBC-3): capacity, read, write, verify, write same,
//! unmap, compare and write, LBA status, pre-fetch and cache flush, each
//! translated into [`Volume`] calls.
//!
//! Every LBA range and length is checked against the [`Geometry`] before
//! the volume is touched, and memory use is bounded by the maximum transfer
//! length (WRITE SAME and VERIFY work in chunks).

use bytes::{Bytes, BytesMut};
use longwire_core::{ExtentKind, Volume, VolumeError, ZeroFlags};

use super::cdb::{Span, BLOCK_SIZE};
use super::geometry::{
    Geometry, LBPPB_EXPONENT, MAX_COMPARE_AND_WRITE_BLOCKS, MAX_UNMAP_DESCRIPTORS,
    MAX_UNMAP_LBA_COUNT, MAX_WRITE_SAME_BLOCKS,
};
use super::sense::{self, Sense};
use super::{status, Failure};

const BLOCK: u64 = BLOCK_SIZE as u64;
/// Working buffer for WRITE SAME patterns and VERIFY reads.
const CHUNK_BYTES: u64 = 1 << 20;
/// Most LBA status descriptors one GET LBA STATUS returns.
const MAX_LBA_STATUS_DESCRIPTORS: usize = 64;
/// How far ahead one GET LBA STATUS looks (bounds the extent query).
const LBA_STATUS_WINDOW_BYTES: u64 = 1 << 30;

/// The medium as one command sees it.
pub struct Medium<'a> {
    pub volume: &'a dyn Volume,
    pub geometry: &'a Geometry,
    /// Write cache enabled: when clear, every write is made durable.
    pub wce: bool,
    /// Set when medium changes are refused, with the sense to report.
    pub protect: Option<Sense>,
}

/// Map a store failure on a read path to sense data (and log it: the
/// initiator only sees a sense code, the operator needs the cause).
fn read_failure(e: VolumeError) -> Failure {
    failure(e, sense::UNRECOVERED_READ_ERROR)
}

fn write_failure(e: VolumeError) -> Failure {
    failure(e, sense::WRITE_ERROR)
}

fn failure(e: VolumeError, medium: Sense) -> Failure {
    if matches!(e, VolumeError::Shutdown) {
        tracing::debug!("volume operation refused: shutting down");
    } else {
        tracing::warn!(error = %e, "volume operation failed");
    }
    match e {
        VolumeError::Shutdown => Failure::Status(status::BUSY),
        VolumeError::ReadOnly => Failure::Check(sense::WRITE_PROTECTED),
        VolumeError::NoSpace(_) => Failure::Check(sense::SPACE_ALLOCATION_FAILED_WRITE_PROTECT),
        VolumeError::Io(_) if e.errno() == 28 => {
            Failure::Check(sense::SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
        }
        VolumeError::Io(_) => Failure::Check(medium),
        // Ranges were checked here first, so the store disagreeing is an
        // internal inconsistency, not the initiator's fault.
        VolumeError::Invalid(_) | VolumeError::Overflow(_) | VolumeError::NotSupported(_) => {
            Failure::Check(sense::INTERNAL_TARGET_FAILURE)
        }
    }
}

impl Medium<'_> {
    fn g(&self) -> &Geometry {
        self.geometry
    }

    /// Check a read/write span: length within MAXIMUM TRANSFER LENGTH, then
    /// inside the logical unit.
    fn check_transfer(&self, span: Span) -> Result<(), Failure> {
        if span.blocks > self.g().max_transfer_blocks {
            return Err(Sense::invalid_cdb(span.len_byte, None).into());
        }
        self.check_range(span.lba, u64::from(span.blocks))
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Failure> {
        if self.g().in_range(lba, blocks) {
            Ok(())
        } else {
            Err(sense::LBA_OUT_OF_RANGE.into())
        }
    }

    /// Blocks named by a span whose zero length means "through the last
    /// LBA" (SYNCHRONIZE CACHE, PRE-FETCH, WRITE SAME with WSNZ=0).
    fn to_end(&self, span: Span) -> Result<u64, Failure> {
        if span.blocks != 0 {
            return Ok(u64::from(span.blocks));
        }
        self.g()
            .num_blocks
            .checked_sub(span.lba)
            .ok_or(Failure::Check(sense::LBA_OUT_OF_RANGE))
    }

    fn writable(&self) -> Result<(), Failure> {
        match self.protect {
            Some(s) => Err(s.into()),
            None => Ok(()),
        }
    }

    async fn read_exact(&self, lba: u64, bytes: u64) -> Result<Bytes, Failure> {
        let offset = self.g().offset(lba);
        let len =
            usize::try_from(bytes).map_err(|_| Failure::Check(sense::INTERNAL_TARGET_FAILURE))?;
        let data = self.volume.read(offset, len).await.map_err(read_failure)?;
        if data.len() != len {
            tracing::warn!(offset, len, got = data.len(), "short read from volume");
            return Err(sense::INTERNAL_TARGET_FAILURE.into());
        }
        Ok(data)
    }

    /// Make blocks read as unmapped: zeros when we promise LBPRZ (via
    /// write_zeroes, which may deallocate), otherwise a trim hint.
    async fn deallocate(&self, lba: u64, blocks: u64) -> Result<(), Failure> {
        if blocks == 0 {
            return Ok(());
        }
        let (offset, len) = (self.g().offset(lba), blocks * BLOCK);
        let result = if self.g().lbprz {
            let flags = ZeroFlags {
                may_trim: true,
                fast: false,
                fua: !self.wce,
            };
            self.volume.write_zeroes(offset, len, flags).await
        } else {
            self.volume.trim(offset, len, !self.wce).await
        };
        result.map_err(write_failure)
    }

    // ---- commands --------------------------------------------------------

    /// READ(6/10/12/16).
    pub async fn read(&self, span: Span) -> Result<Bytes, Failure> {
        self.check_transfer(span)?;
        if span.blocks == 0 {
            return Ok(Bytes::new());
        }
        self.read_exact(span.lba, u64::from(span.blocks) * BLOCK)
            .await
    }

    /// WRITE(6/10/12/16) and WRITE AND VERIFY. If the initiator sent less
    /// Data-Out than the CDB names (iSCSI expected length shorter than the
    /// transfer length), only what arrived is written, as FCP-4 9.4.2 and
    /// libiscsi's residual tests expect; extra Data-Out is ignored.
    pub async fn write(&self, span: Span, fua: bool, data: &Bytes) -> Result<(), Failure> {
        self.check_transfer(span)?;
        self.writable()?;
        let want = u64::from(span.blocks) * BLOCK;
        let mut n = want.min(data.len() as u64);
        n -= n % u64::from(self.g().min_io);
        if n == 0 {
            return Ok(());
        }
        let payload = data.slice(..n as usize);
        self.volume
            .write(self.g().offset(span.lba), payload, fua || !self.wce)
            .await
            .map_err(write_failure)
    }

    /// VERIFY(10/12/16). BYTCHK 0 reads the blocks back; 1 compares them
    /// with the Data-Out; 3 compares every block with one Data-Out block.
    pub async fn verify(&self, span: Span, bytchk: u8, data: &Bytes) -> Result<(), Failure> {
        self.check_transfer(span)?;
        if span.blocks == 0 {
            return Ok(());
        }
        let total = u64::from(span.blocks) * BLOCK;
        let expected: &[u8] = match bytchk {
            0 => &[],
            3 => data.get(..BLOCK as usize).ok_or(Failure::Check(
                sense::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT,
            ))?,
            _ => data.get(..total as usize).ok_or(Failure::Check(
                sense::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT,
            ))?,
        };
        let mut done = 0u64;
        while done < total {
            let n = (total - done).min(CHUNK_BYTES);
            let medium = self.read_exact(span.lba + done / BLOCK, n).await?;
            let mismatch = match bytchk {
                0 => None,
                3 => medium
                    .iter()
                    .enumerate()
                    .find(|&(i, b)| *b != expected[i % BLOCK as usize])
                    .map(|(i, _)| i),
                _ => first_difference(&medium, &expected[done as usize..(done + n) as usize]),
            };
            if let Some(i) = mismatch {
                let at = done + i as u64;
                return Err(sense::MISCOMPARE_DURING_VERIFY
                    .with_information(u32::try_from(at).unwrap_or(u32::MAX))
                    .into());
            }
            done += n;
        }
        Ok(())
    }

    /// SYNCHRONIZE CACHE(10/16): the whole volume is flushed, whatever the
    /// range (it is still checked). IMMED is accepted and ignored: we
    /// answer after the flush, which is allowed and reports its errors.
    pub async fn synchronize_cache(&self, span: Span) -> Result<(), Failure> {
        let blocks = self.to_end(span)?;
        self.check_range(span.lba, blocks)?;
        self.volume.flush().await.map_err(write_failure)
    }

    /// PRE-FETCH(10/16). Answers GOOD, never CONDITION MET: we cannot
    /// promise the blocks will stay cached, and SBC-3 5.10 makes GOOD the
    /// answer when the cache may not hold them all.
    pub async fn prefetch(&self, span: Span) -> Result<(), Failure> {
        let blocks = self.to_end(span)?;
        self.check_range(span.lba, blocks)?;
        let len = (blocks * BLOCK).min(u64::from(self.g().max_transfer_blocks) * BLOCK);
        if len > 0 {
            // A hint: failing to start readahead is not the initiator's problem.
            let _ = self.volume.cache(self.g().offset(span.lba), len).await;
        }
        Ok(())
    }

    /// UNMAP: parse and check the whole parameter list (SBC-3 5.28), then
    /// deallocate. Nothing is unmapped unless every descriptor is valid.
    pub async fn unmap(&self, param_len: u32, data: &Bytes) -> Result<(), Failure> {
        self.writable()?;
        let ranges = parse_unmap(param_len, data, self.g())?;
        for (lba, blocks) in ranges {
            self.deallocate(lba, u64::from(blocks)).await?;
        }
        Ok(())
    }

    /// WRITE SAME(10/16): deallocate (UNMAP), zero (a zero block or NDOB)
    /// or replicate the block, in bounded chunks.
    pub async fn write_same(
        &self,
        span: Span,
        unmap: bool,
        ndob: bool,
        data: &Bytes,
    ) -> Result<(), Failure> {
        let blocks = self.to_end(span)?;
        if blocks > MAX_WRITE_SAME_BLOCKS {
            return Err(Sense::invalid_cdb(span.len_byte, None).into());
        }
        self.check_range(span.lba, blocks)?;
        self.writable()?;
        if unmap && !self.g().thin {
            return Err(Sense::invalid_cdb(1, Some(3)).into());
        }
        let pattern = if ndob {
            None
        } else {
            if data.len() != BLOCK as usize {
                return Err(sense::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT.into());
            }
            Some(data.clone())
        };
        if blocks == 0 {
            return Ok(());
        }
        let (offset, len) = (self.g().offset(span.lba), blocks * BLOCK);
        if unmap {
            // UNMAP=1 deallocates whatever the data block holds; reads then
            // return what LBPRZ says (zeros when set). libiscsi's
            // WriteSame*.UnmapUntilEnd checks exactly this, and it is what
            // LIO does.
            return self.deallocate(span.lba, blocks).await;
        }
        if is_zero(pattern.as_ref()) {
            let flags = ZeroFlags {
                may_trim: false,
                fast: false,
                fua: !self.wce,
            };
            return self
                .volume
                .write_zeroes(offset, len, flags)
                .await
                .map_err(write_failure);
        }
        // A real pattern: replicate it into one bounded buffer and write
        // that repeatedly.
        let pattern = pattern.unwrap_or_default();
        let chunk = len.min(CHUNK_BYTES);
        let mut buf = BytesMut::with_capacity(chunk as usize);
        while (buf.len() as u64) < chunk {
            buf.extend_from_slice(&pattern);
        }
        let buf = buf.freeze();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk);
            self.volume
                .write(offset + done, buf.slice(..n as usize), !self.wce)
                .await
                .map_err(write_failure)?;
            done += n;
        }
        Ok(())
    }

    /// COMPARE AND WRITE: the caller holds the logical unit's I/O lock
    /// exclusively, so nothing else touches the medium between the compare
    /// and the write.
    pub async fn compare_and_write(
        &self,
        span: Span,
        fua: bool,
        data: &Bytes,
    ) -> Result<(), Failure> {
        if span.blocks > MAX_COMPARE_AND_WRITE_BLOCKS {
            return Err(Sense::invalid_cdb(span.len_byte, None).into());
        }
        self.check_range(span.lba, u64::from(span.blocks))?;
        if span.blocks == 0 {
            // SBC-3 5.2: not an error, nothing happens. Data sent anyway
            // (the one-byte length wrapped to zero) does not fit the CDB.
            if !data.is_empty() {
                return Err(Sense::invalid_cdb(span.len_byte, None).into());
            }
            return Ok(());
        }
        self.writable()?;
        let n = u64::from(span.blocks) * BLOCK;
        if data.len() as u64 != 2 * n {
            return Err(sense::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT.into());
        }
        let medium = self.read_exact(span.lba, n).await?;
        if let Some(i) = first_difference(&medium, &data[..n as usize]) {
            return Err(sense::MISCOMPARE_DURING_VERIFY
                .with_information(i as u32)
                .into());
        }
        self.volume
            .write(
                self.g().offset(span.lba),
                data.slice(n as usize..),
                fua || !self.wce,
            )
            .await
            .map_err(write_failure)
    }

    /// GET LBA STATUS (SBC-3 5.6): mapped/deallocated runs from the
    /// volume's extent map, starting exactly at the requested LBA. Blocks
    /// only partly covered by a hole count as mapped.
    pub async fn get_lba_status(&self, lba: u64, alloc: u32) -> Result<Vec<u8>, Failure> {
        let g = self.g();
        if lba >= g.num_blocks {
            return Err(sense::LBA_OUT_OF_RANGE.into());
        }
        if alloc == 0 {
            return Ok(Vec::new());
        }
        let start = g.offset(lba);
        let window = ((g.num_blocks - lba) * BLOCK).min(LBA_STATUS_WINDOW_BYTES);
        let extents = self
            .volume
            .extents(start, window)
            .await
            .map_err(read_failure)?;
        let end_block = lba + window / BLOCK;

        // Runs of (deallocated, first block, end block).
        let mut runs: Vec<(bool, u64, u64)> = Vec::new();
        let mut push = |dealloc: bool, from: u64, to: u64| {
            if to <= from {
                return;
            }
            match runs.last_mut() {
                Some(last) if last.0 == dealloc && last.2 == from => last.2 = to,
                _ => runs.push((dealloc, from, to)),
            }
        };
        let mut pos = start;
        let mut cursor = lba;
        for e in &extents {
            let (from, to) = (pos, pos.saturating_add(e.len));
            pos = to;
            if e.kind == ExtentKind::Hole {
                let first = from.div_ceil(BLOCK).max(cursor);
                let last = (to / BLOCK).min(end_block);
                if last > first {
                    push(false, cursor, first);
                    push(true, first, last);
                    cursor = last;
                }
            }
            if pos >= start + window {
                break;
            }
        }
        // Whatever the map covered that was not a whole hole is mapped;
        // the first descriptor always starts at `lba`.
        let covered = pos
            .min(start + window)
            .div_ceil(BLOCK)
            .min(end_block)
            .max(lba + 1);
        push(false, cursor, covered);

        let mut body = Vec::new();
        let mut count = 0;
        'runs: for (dealloc, mut from, to) in runs {
            while from < to {
                if count == MAX_LBA_STATUS_DESCRIPTORS {
                    break 'runs;
                }
                let n = (to - from).min(u64::from(u32::MAX));
                body.extend_from_slice(&from.to_be_bytes());
                body.extend_from_slice(&(n as u32).to_be_bytes());
                body.push(u8::from(dealloc)); // 0 mapped, 1 deallocated
                body.extend_from_slice(&[0; 3]);
                from += n;
                count += 1;
            }
        }
        let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&[0; 4]);
        out.extend(body);
        Ok(out)
    }
}

/// No data block (NDOB) or an all-zero one: WRITE SAME can then zero or
/// deallocate instead of writing.
fn is_zero(pattern: Option<&Bytes>) -> bool {
    match pattern {
        None => true,
        Some(b) => b.iter().all(|&x| x == 0),
    }
}

/// Offset of the first differing byte of two equal-length buffers.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Parse an UNMAP parameter list into (LBA, blocks) ranges, checking every
/// length: the list must hold its 8-byte header and the descriptors the
/// header announces; a trailing partial descriptor is ignored (SBC-3
/// 5.28.2); descriptor count and total blocks must be within the limits in
/// the Block Limits page; every range must lie inside the logical unit.
/// UNMAP DATA LENGTH is redundant with the other two and not relied on.
pub fn parse_unmap(param_len: u32, data: &[u8], g: &Geometry) -> Result<Vec<(u64, u32)>, Failure> {
    if param_len == 0 {
        return Ok(Vec::new());
    }
    let len_err = Failure::Check(sense::PARAMETER_LIST_LENGTH_ERROR);
    if param_len < 8 {
        return Err(len_err);
    }
    let list = data.get(..param_len as usize).ok_or(len_err.clone())?;
    let bd_len = usize::from(u16::from_be_bytes([list[2], list[3]]));
    let descriptors = list.get(8..8 + bd_len).ok_or(len_err)?;
    let count = bd_len / 16;
    if count > MAX_UNMAP_DESCRIPTORS as usize {
        return Err(Sense::invalid_param(2, None).into());
    }
    let mut ranges = Vec::with_capacity(count);
    let mut total = 0u64;
    for (i, d) in descriptors.chunks_exact(16).enumerate() {
        let lba = u64::from_be_bytes(d[0..8].try_into().unwrap_or_default());
        let blocks = u32::from_be_bytes(d[8..12].try_into().unwrap_or_default());
        total += u64::from(blocks);
        if total > u64::from(MAX_UNMAP_LBA_COUNT) {
            return Err(Sense::invalid_param((8 + 16 * i + 8) as u16, None).into());
        }
        if !g.in_range(lba, u64::from(blocks)) {
            return Err(sense::LBA_OUT_OF_RANGE.into());
        }
        ranges.push((lba, blocks));
    }
    Ok(ranges)
}

/// READ CAPACITY(10) parameter data: last LBA (FFFFFFFFh when it does not
/// fit; READ CAPACITY(16) has the real one) and block length.
pub fn read_capacity10(g: &Geometry) -> Vec<u8> {
    let last = u32::try_from(g.last_lba())
        .ok()
        .filter(|&l| l != u32::MAX)
        .unwrap_or(u32::MAX);
    let mut d = last.to_be_bytes().to_vec();
    d.extend_from_slice(&BLOCK_SIZE.to_be_bytes());
    d
}

/// READ CAPACITY(16) parameter data (SBC-3 5.16.2).
pub fn read_capacity16(g: &Geometry) -> Vec<u8> {
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&g.last_lba().to_be_bytes());
    d[8..12].copy_from_slice(&BLOCK_SIZE.to_be_bytes());
    d[13] = LBPPB_EXPONENT;
    if g.thin {
        d[14] |= 0x80; // LBPME
        if g.lbprz {
            d[14] |= 0x40; // LBPRZ
        }
    }
    d
}
