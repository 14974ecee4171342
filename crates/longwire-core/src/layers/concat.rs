use std::sync::Arc;

use super::composite::{self, Composite, Layout, Piece};
use crate::{Volume, VolumeError};

/// Parts laid end to end: the first part's bytes, then the second's, …
/// (ENBD's linear aggregation). A request that crosses a boundary is split
/// and the pieces run concurrently.
///
/// Capabilities are what every part can do (see [`Concat::new`]); a flush
/// goes to every part; extents are stitched across boundaries.
pub type Concat = Composite<ConcatLayout>;

/// Where each part of a [`Concat`] starts.
pub struct ConcatLayout {
    /// Where each part starts, plus the total size at the end.
    starts: Vec<u64>,
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
        Ok(Composite::assemble(ConcatLayout { starts }, parts, caps))
    }
}

impl Layout for ConcatLayout {
    fn size(&self) -> u64 {
        *self.starts.last().expect("starts ends with the size")
    }

    /// The pieces of `[offset, offset + len)`, in order.
    fn map(&self, offset: u64, len: u64) -> Vec<Piece> {
        let parts = self.starts.len() - 1;
        let mut pieces = Vec::new();
        let end = offset + len;
        // The last part starting at or before `offset`.
        let mut part = self.starts[..parts].partition_point(|&s| s <= offset).saturating_sub(1);
        let mut pos = offset;
        while pos < end && part < parts {
            let part_end = self.starts[part + 1];
            let n = part_end.min(end) - pos;
            pieces.push(Piece { part, part_offset: pos - self.starts[part], len: n, at: pos - offset });
            pos += n;
            part += 1;
        }
        pieces
    }
}

