use std::sync::Arc;

use super::composite::{self, Composite, Layout, Piece};
use crate::{Volume, VolumeError};

/// RAID 0 over equal-sized parts (ENBD's striped aggregation): stripe `k`
/// of the volume is stripe `k / n` of part `k % n`. A request is split at
/// stripe boundaries and the pieces run concurrently, so large requests
/// use every part at once.
///
/// Capabilities are what every part can do; a flush goes to every part;
/// extents are stitched stripe by stripe.
pub type Stripe = Composite<StripeLayout>;

/// How a [`Stripe`] spreads stripes over its parts.
pub struct StripeLayout {
    parts: u64,
    stripe: u64,
    part_size: u64,
}

impl Stripe {
    /// Stripe over `parts` in units of `stripe_size` bytes. Refused unless
    /// there is at least one part, all parts have the same size, that size
    /// is a whole number of stripes, and the stripe size is a multiple of
    /// the composite's minimum block size (the largest of the parts').
    pub fn new(parts: Vec<Arc<dyn Volume>>, stripe_size: u64) -> Result<Stripe, VolumeError> {
        if parts.is_empty() {
            return Err(VolumeError::Invalid("a stripe set needs at least one part".into()));
        }
        let part_size = parts[0].size();
        if let Some((i, p)) = parts.iter().enumerate().find(|(_, p)| p.size() != part_size) {
            return Err(VolumeError::Invalid(format!(
                "stripe parts must all be the same size: part 0 has {part_size} bytes, part {i} has {}",
                p.size()
            )));
        }
        let caps = composite::intersect(&parts);
        if stripe_size == 0 || !stripe_size.is_multiple_of(caps.min_block as u64) {
            return Err(VolumeError::Invalid(format!(
                "stripe size {stripe_size} must be a positive multiple of the {}-byte minimum block size",
                caps.min_block
            )));
        }
        if part_size == 0 || !part_size.is_multiple_of(stripe_size) {
            return Err(VolumeError::Invalid(format!(
                "each part ({part_size} bytes) must be a whole, non-zero number of {stripe_size}-byte stripes"
            )));
        }
        if part_size.checked_mul(parts.len() as u64).is_none() {
            return Err(VolumeError::Invalid("the parts together are larger than 2^64 bytes".into()));
        }
        let layout = StripeLayout { parts: parts.len() as u64, stripe: stripe_size, part_size };
        Ok(Composite::assemble(layout, parts, caps))
    }
}

impl StripeLayout {
    pub fn stripe_size(&self) -> u64 {
        self.stripe
    }

    /// Like [`Layout::map`], but at most `limit` pieces (the first ones).
    fn map_limited(&self, offset: u64, len: u64, limit: usize) -> Vec<Piece> {
        let n = self.parts;
        let end = offset + len;
        let mut pieces = Vec::with_capacity(((len / self.stripe + 2) as usize).min(limit));
        let mut pos = offset;
        while pos < end && pieces.len() < limit {
            let k = pos / self.stripe;
            let within = pos % self.stripe;
            let take = (self.stripe - within).min(end - pos);
            pieces.push(Piece {
                part: (k % n) as usize,
                part_offset: (k / n) * self.stripe + within,
                len: take,
                at: pos - offset,
            });
            pos += take;
        }
        pieces
    }

}

impl Layout for StripeLayout {
    fn size(&self) -> u64 {
        self.part_size * self.parts
    }

    /// The pieces of `[offset, offset + len)`, one per stripe touched, in order.
    fn map(&self, offset: u64, len: u64) -> Vec<Piece> {
        self.map_limited(offset, len, usize::MAX)
    }

    /// Extents look at a bounded prefix: a long range is many stripes.
    fn map_extents(&self, offset: u64, len: u64) -> Vec<Piece> {
        self.map_limited(offset, len, composite::MAX_EXTENT_PIECES)
    }

    /// The share of `[offset, offset + len)` on each part, for commands
    /// without data: the stripes a range touches on one part are
    /// consecutive rows, so each part gets one contiguous range (at most
    /// one piece per part, however long the range).
    fn map_by_part(&self, offset: u64, len: u64) -> Vec<Piece> {
        if len == 0 {
            return Vec::new();
        }
        let n = self.parts;
        let s = self.stripe;
        let end = offset + len;
        let (k0, k1) = (offset / s, (end - 1) / s);
        let mut pieces = Vec::with_capacity(n as usize);
        for p in 0..n {
            // First and last stripe in [k0, k1] that live on part p.
            let first = k0 + (p + n - k0 % n) % n;
            if first > k1 {
                continue;
            }
            let last = k1 - (k1 % n + n - p) % n;
            let skip = if first == k0 { offset % s } else { 0 };
            let start = (first / n) * s + skip;
            let stop = (last / n) * s + if last == k1 { (end - 1) % s + 1 } else { s };
            let at = (first * s + skip) - offset;
            pieces.push(Piece { part: p as usize, part_offset: start, len: stop - start, at });
        }
        pieces
    }
}

#[cfg(test)]
mod tests {
    use super::super::composite::{coalesce, Piece};
    use super::*;
    use crate::{Capabilities, Extent, ExtentKind, VolumeResult};
    use async_trait::async_trait;
    use bytes::Bytes;

    /// Just a size, for mapping tests.
    struct Sized(u64);

    #[async_trait]
    impl Volume for Sized {
        fn size(&self) -> u64 {
            self.0
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
        async fn read(&self, _: u64, len: usize) -> VolumeResult<Bytes> {
            Ok(Bytes::from(vec![0; len]))
        }
        async fn write(&self, _: u64, _: Bytes, _: bool) -> VolumeResult<()> {
            Ok(())
        }
        async fn flush(&self) -> VolumeResult<()> {
            Ok(())
        }
        async fn extents(&self, _: u64, len: u64) -> VolumeResult<Vec<Extent>> {
            Ok(vec![Extent::new(len, ExtentKind::Data)])
        }
    }

    /// `map_by_part` covers exactly what the per-stripe pieces cover.
    #[test]
    fn map_by_part_equals_coalesced_stripes() {
        for n in 1..=4u64 {
            let parts: Vec<Arc<dyn Volume>> = (0..n).map(|_| Arc::new(Sized(64 * 10)) as Arc<dyn Volume>).collect();
            let st = Stripe::new(parts, 64).unwrap();
            for offset in (0..st.size()).step_by(13) {
                for len in [1, 5, 63, 64, 65, 128, 200, 640, 1000] {
                    if offset + len > st.size() {
                        continue;
                    }
                    let want: Vec<(usize, u64, u64)> =
                        coalesce(st.layout().map(offset, len)).iter().map(|p| (p.part, p.part_offset, p.len)).collect();
                    let mut got: Vec<(usize, u64, u64)> =
                        st.layout().map_by_part(offset, len).iter().map(|p| (p.part, p.part_offset, p.len)).collect();
                    got.sort();
                    assert_eq!(got, want, "n={n} offset={offset} len={len}");
                }
            }
        }
    }

    /// A huge range costs one piece per part, and extents look at a bounded prefix.
    #[tokio::test]
    async fn huge_ranges_stay_cheap() {
        let parts: Vec<Arc<dyn Volume>> = (0..3).map(|_| Arc::new(Sized(1 << 40)) as Arc<dyn Volume>).collect();
        let st = Stripe::new(parts, 4096).unwrap();
        assert_eq!(st.layout().map_by_part(100 * 4096, st.size() - 100 * 4096).len(), 3);
        let ext = st.extents(0, st.size()).await.unwrap();
        assert_eq!(ext, vec![Extent::new(composite::MAX_EXTENT_PIECES as u64 * 4096, ExtentKind::Data)]);
    }

    #[test]
    fn coalesce_merges_contiguous_pieces_per_part() {
        let p = |part, part_offset, len, at| Piece { part, part_offset, len, at };
        let pieces = vec![p(0, 32, 32, 0), p(1, 0, 64, 32), p(0, 64, 64, 96), p(1, 64, 16, 160)];
        assert_eq!(coalesce(pieces), vec![p(0, 32, 96, 0), p(1, 0, 80, 32)]);
    }
}
