use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::composite::{self, Piece};
use crate::{Capabilities, Extent, ReadSegment, Volume, VolumeError, VolumeResult, ZeroFlags};

/// Parts laid end to end: the first part's bytes, then the second's, …
/// (ENBD's linear aggregation). A request that crosses a boundary is split
/// and the pieces run concurrently.
///
/// Capabilities are what every part can do (see [`Concat::new`]); a flush
/// goes to every part; extents are stitched across boundaries.
pub struct Concat {
    parts: Vec<Arc<dyn Volume>>,
    /// Where each part starts, plus the total size at the end.
    starts: Vec<u64>,
    caps: Capabilities,
}

impl Concat {
    /// Concatenate `parts` in order. Refused when there are none, when a
    /// part is empty, when the sizes overflow, or when a boundary would
    /// not fall on a multiple of the composite's minimum block size (the
    /// largest of the parts').
    pub fn new(parts: Vec<Arc<dyn Volume>>) -> Result<Concat, VolumeError> {
        if parts.is_empty() {
            return Err(VolumeError::Invalid("a concatenation needs at least one part".into()));
        }
        let caps = composite::intersect(&parts);
        let mut starts = Vec::with_capacity(parts.len() + 1);
        let mut end = 0u64;
        for (i, p) in parts.iter().enumerate() {
            let size = p.size();
            if size == 0 {
                return Err(VolumeError::Invalid(format!("part {i} of the concatenation is empty")));
            }
            if !size.is_multiple_of(caps.min_block as u64) {
                return Err(VolumeError::Invalid(format!(
                    "part {i} is {size} bytes, not a multiple of the {}-byte minimum block size of the concatenation",
                    caps.min_block
                )));
            }
            starts.push(end);
            end = end
                .checked_add(size)
                .ok_or_else(|| VolumeError::Invalid("the parts together are larger than 2^64 bytes".into()))?;
        }
        starts.push(end);
        Ok(Concat { parts, starts, caps })
    }

    pub fn parts(&self) -> &[Arc<dyn Volume>] {
        &self.parts
    }

    /// The pieces of `[offset, offset + len)`, in order.
    pub fn map(&self, offset: u64, len: u64) -> Vec<Piece> {
        let mut pieces = Vec::new();
        let end = offset + len;
        // The last part starting at or before `offset`.
        let mut part = self.starts[..self.parts.len()].partition_point(|&s| s <= offset).saturating_sub(1);
        let mut pos = offset;
        while pos < end && part < self.parts.len() {
            let part_end = self.starts[part + 1];
            let n = part_end.min(end) - pos;
            pieces.push(Piece { part, part_offset: pos - self.starts[part], len: n, at: pos - offset });
            pos += n;
            part += 1;
        }
        pieces
    }
}

#[async_trait]
impl Volume for Concat {
    fn size(&self) -> u64 {
        *self.starts.last().expect("starts ends with the size")
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    async fn read(&self, offset: u64, len: usize) -> VolumeResult<Bytes> {
        composite::check(self.size(), &self.caps, "read", offset, len as u64, false)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        composite::read(&self.parts, self.map(offset, len as u64), len).await
    }

    async fn read_sparse(&self, offset: u64, len: usize) -> VolumeResult<Vec<ReadSegment>> {
        composite::check(self.size(), &self.caps, "read", offset, len as u64, false)?;
        composite::read_sparse(&self.parts, self.map(offset, len as u64)).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> VolumeResult<()> {
        composite::check(self.size(), &self.caps, "write", offset, data.len() as u64, true)?;
        composite::write(&self.parts, self.map(offset, data.len() as u64), data, fua).await
    }

    async fn flush(&self) -> VolumeResult<()> {
        composite::flush(&self.parts).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> VolumeResult<()> {
        composite::check(self.size(), &self.caps, "trim", offset, len, true)?;
        composite::trim(&self.parts, self.map(offset, len), fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> VolumeResult<()> {
        composite::check(self.size(), &self.caps, "write zeroes", offset, len, true)?;
        if flags.fast && !self.caps.can_fast_zero {
            return Err(VolumeError::NotSupported("not every part can zero fast".into()));
        }
        composite::write_zeroes(&self.parts, self.map(offset, len), flags).await
    }

    async fn cache(&self, offset: u64, len: u64) -> VolumeResult<()> {
        composite::check(self.size(), &self.caps, "cache", offset, len, false)?;
        composite::cache(&self.parts, self.map(offset, len)).await
    }

    async fn extents(&self, offset: u64, len: u64) -> VolumeResult<Vec<Extent>> {
        if len == 0 {
            return Err(VolumeError::Invalid("extents of an empty range".into()));
        }
        composite::check(self.size(), &self.caps, "extents", offset, len, false)?;
        composite::extents(&self.parts, self.map(offset, len)).await
    }
}
