//! What [`Concat`](super::Concat) and [`Stripe`](super::Stripe) share: a
//! request over the composite becomes [`Piece`]s on the parts, which run
//! concurrently and are put back together in request order. The two differ
//! only in their [`Layout`]; [`Composite`] is the one Volume over both.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;

use crate::{check_range, Capabilities, Extent, LayerStatus, ReadSegment, Volume, VolumeError, VolumeResult, ZeroFlags};

/// The share of one request that lands on one part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Index of the part.
    pub part: usize,
    /// Where the piece starts in that part.
    pub part_offset: u64,
    pub len: u64,
    /// Where the piece starts relative to the request's offset.
    pub at: u64,
}

/// Where a composite's bytes live on its parts.
pub trait Layout: Send + Sync + 'static {
    /// Size of the composite volume.
    fn size(&self) -> u64;
    /// The pieces of `[offset, offset + len)`, in request order.
    fn map(&self, offset: u64, len: u64) -> Vec<Piece>;
    /// The pieces for a command without data, where order does not matter
    /// and fewer, longer pieces are cheaper.
    fn map_by_part(&self, offset: u64, len: u64) -> Vec<Piece> {
        self.map(offset, len)
    }
    /// The pieces whose extents answer an `extents` call (a prefix is fine).
    fn map_extents(&self, offset: u64, len: u64) -> Vec<Piece> {
        self.map(offset, len)
    }
}

/// A volume made of parts placed by a [`Layout`]. Capabilities are what
/// every part can do ([`intersect`]); a flush goes to every part; extents
/// are stitched across parts.
pub struct Composite<L> {
    layout: L,
    parts: Vec<Arc<dyn Volume>>,
    caps: Capabilities,
}

impl<L: Layout> Composite<L> {
    /// Assemble a composite; the caller has validated `layout` against `parts`.
    pub(super) fn assemble(layout: L, parts: Vec<Arc<dyn Volume>>, caps: Capabilities) -> Self {
        Composite { layout, parts, caps }
    }

    pub fn parts(&self) -> &[Arc<dyn Volume>] {
        &self.parts
    }

    pub fn layout(&self) -> &L {
        &self.layout
    }
}

#[async_trait]
impl<L: Layout> Volume for Composite<L> {
    fn size(&self) -> u64 {
        self.layout.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn status(&self) -> Vec<LayerStatus> {
        self.parts.iter().flat_map(|p| p.status()).collect()
    }

    /// Every part is closed, even when one fails; the first error wins.
    async fn close(&self) -> VolumeResult<()> {
        close(&self.parts).await
    }

    async fn read(&self, offset: u64, len: usize) -> VolumeResult<Bytes> {
        check(self.size(), &self.caps, "read", offset, len as u64, false)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        read(&self.parts, self.layout.map(offset, len as u64), len).await
    }

    async fn read_sparse(&self, offset: u64, len: usize) -> VolumeResult<Vec<ReadSegment>> {
        check(self.size(), &self.caps, "read", offset, len as u64, false)?;
        read_sparse(&self.parts, self.layout.map(offset, len as u64)).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> VolumeResult<()> {
        check(self.size(), &self.caps, "write", offset, data.len() as u64, true)?;
        write(&self.parts, self.layout.map(offset, data.len() as u64), data, fua).await
    }

    async fn flush(&self) -> VolumeResult<()> {
        flush(&self.parts).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> VolumeResult<()> {
        check(self.size(), &self.caps, "trim", offset, len, true)?;
        trim(&self.parts, self.layout.map_by_part(offset, len), fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> VolumeResult<()> {
        check(self.size(), &self.caps, "write zeroes", offset, len, true)?;
        if flags.fast && !self.caps.can_fast_zero {
            return Err(VolumeError::NotSupported("not every part can zero fast".into()));
        }
        write_zeroes(&self.parts, self.layout.map_by_part(offset, len), flags).await
    }

    async fn cache(&self, offset: u64, len: u64) -> VolumeResult<()> {
        check(self.size(), &self.caps, "cache", offset, len, false)?;
        cache(&self.parts, self.layout.map_by_part(offset, len)).await
    }

    async fn extents(&self, offset: u64, len: u64) -> VolumeResult<Vec<Extent>> {
        if len == 0 {
            return Err(VolumeError::Invalid("extents of an empty range".into()));
        }
        check(self.size(), &self.caps, "extents", offset, len, false)?;
        extents(&self.parts, self.layout.map_extents(offset, len)).await
    }
}

/// Most parts' extents queried for one `extents` call (stripes can make a
/// long range into very many pieces; a shorter answer is allowed).
pub const MAX_EXTENT_PIECES: usize = 64;

/// Capabilities of a composite: what every part can do.
pub fn intersect(parts: &[Arc<dyn Volume>]) -> Capabilities {
    let mut caps = parts[0].capabilities();
    for p in &parts[1..] {
        let c = p.capabilities();
        caps.read_only |= c.read_only;
        caps.can_flush &= c.can_flush;
        caps.can_trim &= c.can_trim;
        caps.can_zero &= c.can_zero;
        caps.can_fast_zero &= c.can_fast_zero;
        caps.can_multi_conn &= c.can_multi_conn;
        caps.min_block = caps.min_block.max(c.min_block);
        caps.preferred_block = caps.preferred_block.max(c.preferred_block);
        caps.max_payload = caps.max_payload.min(c.max_payload);
    }
    caps.preferred_block = caps.preferred_block.max(caps.min_block);
    caps.max_payload = caps.max_payload.max(caps.min_block);
    caps
}

/// Merge pieces that are contiguous on the same part (for commands
/// without data, where request order does not matter).
pub fn coalesce(mut pieces: Vec<Piece>) -> Vec<Piece> {
    pieces.sort_by_key(|p| (p.part, p.part_offset));
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for p in pieces {
        match out.last_mut() {
            Some(last) if last.part == p.part && last.part_offset + last.len == p.part_offset => last.len += p.len,
            _ => out.push(p),
        }
    }
    out
}

/// Checks shared by every composite operation.
pub fn check(size: u64, caps: &Capabilities, what: &str, offset: u64, len: u64, write: bool) -> VolumeResult<()> {
    if write && caps.read_only {
        return Err(VolumeError::ReadOnly);
    }
    if !check_range(size, offset, len) {
        let msg = format!("{what} of {len} bytes at offset {offset} goes past the end of the volume ({size} bytes)");
        return Err(if write { VolumeError::NoSpace(msg) } else { VolumeError::Invalid(msg) });
    }
    Ok(())
}

/// The first error, after every piece has finished (so no piece is left
/// half-done behind the caller's back).
fn first_error<T>(results: Vec<VolumeResult<T>>) -> VolumeResult<Vec<T>> {
    results.into_iter().collect()
}

fn short_read(piece: &Piece, got: u64) -> VolumeError {
    VolumeError::Io(std::io::Error::other(format!(
        "part {} returned {got} bytes for a {}-byte read at {}",
        piece.part, piece.len, piece.part_offset
    )))
}

pub async fn read(parts: &[Arc<dyn Volume>], pieces: Vec<Piece>, len: usize) -> VolumeResult<Bytes> {
    let reads = pieces.iter().map(|p| parts[p.part].read(p.part_offset, p.len as usize));
    let data = first_error(join_all(reads).await)?;
    for (p, d) in pieces.iter().zip(&data) {
        if d.len() as u64 != p.len {
            return Err(short_read(p, d.len() as u64));
        }
    }
    if data.len() == 1 {
        return Ok(data.into_iter().next().expect("one piece"));
    }
    let mut out = BytesMut::zeroed(len);
    for (p, d) in pieces.iter().zip(data) {
        out[p.at as usize..(p.at + p.len) as usize].copy_from_slice(&d);
    }
    Ok(out.freeze())
}

pub async fn read_sparse(parts: &[Arc<dyn Volume>], pieces: Vec<Piece>) -> VolumeResult<Vec<ReadSegment>> {
    let reads = pieces.iter().map(|p| parts[p.part].read_sparse(p.part_offset, p.len as usize));
    let all = first_error(join_all(reads).await)?;
    let mut order: Vec<(u64, &Piece, Vec<ReadSegment>)> =
        pieces.iter().zip(all).map(|(p, segs)| (p.at, p, segs)).collect();
    order.sort_by_key(|(at, _, _)| *at);
    let mut out: Vec<ReadSegment> = Vec::new();
    for (_, p, segs) in order {
        let got: u64 = segs.iter().map(ReadSegment::len).sum();
        if got != p.len {
            return Err(short_read(p, got));
        }
        for s in segs.into_iter().filter(|s| !s.is_empty()) {
            match (out.last_mut(), s) {
                (Some(ReadSegment::Zero(z)), ReadSegment::Zero(n)) => *z += n,
                (_, s) => out.push(s),
            }
        }
    }
    Ok(out)
}

pub async fn write(parts: &[Arc<dyn Volume>], pieces: Vec<Piece>, data: Bytes, fua: bool) -> VolumeResult<()> {
    let writes = pieces
        .iter()
        .map(|p| parts[p.part].write(p.part_offset, data.slice(p.at as usize..(p.at + p.len) as usize), fua));
    first_error(join_all(writes).await).map(drop)
}

pub async fn trim(parts: &[Arc<dyn Volume>], pieces: Vec<Piece>, fua: bool) -> VolumeResult<()> {
    let ops = coalesce(pieces).into_iter().map(|p| parts[p.part].trim(p.part_offset, p.len, fua));
    first_error(join_all(ops).await).map(drop)
}

pub async fn write_zeroes(parts: &[Arc<dyn Volume>], pieces: Vec<Piece>, flags: ZeroFlags) -> VolumeResult<()> {
    let ops = coalesce(pieces).into_iter().map(|p| parts[p.part].write_zeroes(p.part_offset, p.len, flags));
    first_error(join_all(ops).await).map(drop)
}

pub async fn cache(parts: &[Arc<dyn Volume>], pieces: Vec<Piece>) -> VolumeResult<()> {
    let ops = coalesce(pieces).into_iter().map(|p| parts[p.part].cache(p.part_offset, p.len));
    first_error(join_all(ops).await).map(drop)
}

pub async fn flush(parts: &[Arc<dyn Volume>]) -> VolumeResult<()> {
    first_error(join_all(parts.iter().map(|p| p.flush())).await).map(drop)
}

pub async fn close(parts: &[Arc<dyn Volume>]) -> VolumeResult<()> {
    first_error(join_all(parts.iter().map(|p| p.close())).await).map(drop)
}

/// Query the parts under the first pieces concurrently and stitch their
/// answers in request order, stopping after the first piece whose part
/// answered for less than the whole piece (the result must be contiguous).
pub async fn extents(parts: &[Arc<dyn Volume>], mut pieces: Vec<Piece>) -> VolumeResult<Vec<Extent>> {
    pieces.sort_by_key(|p| p.at);
    pieces.truncate(MAX_EXTENT_PIECES);
    let queries = pieces.iter().map(|p| parts[p.part].extents(p.part_offset, p.len));
    let answers = first_error(join_all(queries).await)?;
    let mut out = Vec::new();
    for (p, list) in pieces.iter().zip(answers) {
        let mut covered = 0u64;
        for e in list {
            let len = e.len.min(p.len - covered);
            Extent::push_merged(&mut out, Extent::new(len, e.kind));
            covered += len;
            if covered == p.len {
                break;
            }
        }
        if covered < p.len {
            break;
        }
    }
    if out.is_empty() {
        return Err(VolumeError::Io(std::io::Error::other("a part returned no extents")));
    }
    Ok(out)
}
