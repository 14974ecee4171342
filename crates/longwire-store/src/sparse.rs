//! Helpers shared by the stores: request validation and building sparse reads.

use bytes::{Bytes, BytesMut};
use longwire_core::{check_range, ReadSegment, VolumeError, VolumeResult};

/// Largest read either store will allocate a buffer for. Reads allocate
/// `len` bytes up front, so an unchecked length from a client could exhaust
/// memory; this is the `max_payload` both stores advertise.
pub(crate) const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Validate a read-like request (read, read_sparse). Out of range is
/// `Invalid` (EINVAL), as NBD expects for reads; oversized is `Overflow`.
pub(crate) fn check_read(size: u64, offset: u64, len: usize) -> VolumeResult<()> {
    if len > MAX_PAYLOAD as usize {
        return Err(VolumeError::Overflow(format!(
            "read of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit"
        )));
    }
    check_in_range(size, offset, len as u64)
}

/// Validate a range that is only inspected (extents, cache): `Invalid` when
/// outside the volume.
pub(crate) fn check_in_range(size: u64, offset: u64, len: u64) -> VolumeResult<()> {
    if check_range(size, offset, len) {
        Ok(())
    } else {
        Err(VolumeError::Invalid(format!(
            "range {offset}+{len} is outside the volume ({size} bytes)"
        )))
    }
}

/// Validate a range that would be changed (write, trim, zero): past the end
/// is `NoSpace` (ENOSPC), which is what NBD clients expect for writes.
pub(crate) fn check_write(size: u64, offset: u64, len: u64) -> VolumeResult<()> {
    if check_range(size, offset, len) {
        Ok(())
    } else {
        Err(VolumeError::NoSpace(format!(
            "range {offset}+{len} runs past the end of the volume ({size} bytes)"
        )))
    }
}

/// Collects a sparse read in order, merging neighbours so the front-end sends
/// as few chunks as possible: consecutive data becomes one `Data`, consecutive
/// zeros one `Zero`.
#[derive(Default)]
pub(crate) struct SegmentBuilder {
    segments: Vec<ReadSegment>,
    pending: BytesMut,
}

impl SegmentBuilder {
    /// Append `n` bytes of data and return them (zero-filled) for the caller
    /// to fill in, so stores can read straight into the final buffer.
    pub(crate) fn data(&mut self, n: usize) -> &mut [u8] {
        let start = self.pending.len();
        self.pending.resize(start + n, 0);
        &mut self.pending[start..]
    }

    /// Append a run of `n` zero bytes.
    pub(crate) fn zero(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        self.flush_data();
        match self.segments.last_mut() {
            Some(ReadSegment::Zero(z)) => *z += n,
            _ => self.segments.push(ReadSegment::Zero(n)),
        }
    }

    pub(crate) fn finish(mut self) -> Vec<ReadSegment> {
        self.flush_data();
        self.segments
    }

    fn flush_data(&mut self) {
        if !self.pending.is_empty() {
            self.segments
                .push(ReadSegment::Data(self.pending.split().freeze()));
        }
    }
}

/// Split data read at `offset` into segments, turning every all-zero block
/// aligned to `MIN_ZERO_RUN` into a `Zero` run: it reads as zeros, so the
/// front-end need not send it. Scanning stops at the first non-zero byte of
/// each block, so real data costs almost nothing to check.
pub(crate) fn split_zero_runs(offset: u64, data: Bytes) -> Vec<ReadSegment> {
    const BLOCK: u64 = MIN_ZERO_RUN;
    let len = data.len() as u64;
    let mut segments = Vec::new();
    let mut data_start = 0u64; // start of the pending data run, relative
    let mut pos = 0u64;
    while pos < len {
        // Block boundaries are aligned to absolute offsets.
        let next = (((offset + pos) / BLOCK + 1) * BLOCK - offset).min(len);
        let whole_block = next - pos == BLOCK;
        if whole_block && is_zero(&data[pos as usize..next as usize]) {
            if data_start < pos {
                segments.push(ReadSegment::Data(data.slice(data_start as usize..pos as usize)));
            }
            match segments.last_mut() {
                Some(ReadSegment::Zero(z)) => *z += BLOCK,
                _ => segments.push(ReadSegment::Zero(BLOCK)),
            }
            data_start = next;
        }
        pos = next;
    }
    if data_start < len {
        segments.push(ReadSegment::Data(data.slice(data_start as usize..)));
    }
    segments
}

/// Smallest zero run worth reporting as a hole.
pub(crate) const MIN_ZERO_RUN: u64 = 4096;

fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().unwrap()) == 0) && words.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn zero_runs_become_holes_on_absolute_block_boundaries() {
        use bytes::Bytes;
        // 1 KiB of data, then two zero blocks, then data, read at offset 3 KiB
        // so the first block boundary is 1 KiB in.
        let mut v = vec![0u8; 1024 + 8192 + 4096 + 100];
        v[..1024].fill(7);
        v[1024 + 8192..].fill(9);
        v[1024 + 8192 + 10] = 0;
        let segs = super::split_zero_runs(3072, Bytes::from(v.clone()));
        assert_eq!(segs.len(), 3, "{segs:?}");
        assert_eq!(segs[0], ReadSegment::Data(Bytes::from(v[..1024].to_vec())));
        assert_eq!(segs[1], ReadSegment::Zero(8192));
        assert_eq!(segs[2], ReadSegment::Data(Bytes::from(v[1024 + 8192..].to_vec())));
        // An unaligned all-zero tail shorter than a block stays data.
        let segs = super::split_zero_runs(0, Bytes::from(vec![0u8; 4096 + 10]));
        assert_eq!(segs, vec![ReadSegment::Zero(4096), ReadSegment::Data(Bytes::from(vec![0u8; 10]))]);
        // One non-zero byte anywhere keeps a block as data.
        let mut w = vec![0u8; 4096];
        w[4095] = 1;
        assert!(matches!(super::split_zero_runs(0, Bytes::from(w))[..], [ReadSegment::Data(_)]));
    }

    use super::*;

    #[test]
    fn builder_merges_neighbours() {
        let mut b = SegmentBuilder::default();
        b.data(2).copy_from_slice(b"ab");
        b.data(1).copy_from_slice(b"c");
        b.zero(5);
        b.zero(0);
        b.zero(3);
        b.data(1)[0] = b'd';
        let segs = b.finish();
        assert_eq!(
            segs,
            vec![
                ReadSegment::Data(bytes::Bytes::from_static(b"abc")),
                ReadSegment::Zero(8),
                ReadSegment::Data(bytes::Bytes::from_static(b"d")),
            ]
        );
    }

    #[test]
    fn range_checks() {
        assert!(check_read(100, 0, 100).is_ok());
        assert!(matches!(
            check_read(100, 1, 100),
            Err(VolumeError::Invalid(_))
        ));
        assert!(matches!(
            check_read(u64::MAX, u64::MAX, 2),
            Err(VolumeError::Invalid(_))
        ));
        assert!(matches!(
            check_read(u64::MAX, 0, MAX_PAYLOAD as usize + 1),
            Err(VolumeError::Overflow(_))
        ));
        assert!(matches!(
            check_write(100, 99, 2),
            Err(VolumeError::NoSpace(_))
        ));
        assert!(matches!(
            check_write(100, u64::MAX, 2),
            Err(VolumeError::NoSpace(_))
        ));
        assert!(check_write(100, 100, 0).is_ok());
    }
}
