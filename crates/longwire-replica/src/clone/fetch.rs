//! Copying one region from the source to the local store, in two halves.
//!
//! [`fetch`] only reads from the source (its allocation map, then the data
//! parts), so it can be abandoned at any point: that is where the bounded
//! wait for a slow or dead source applies. [`apply`] then writes what was
//! fetched locally and must run to the end once started — a local write
//! left running after its caller gave up could land later, on top of data
//! written since.

use std::ops::Range;

use bytes::Bytes;
use longwire_core::{ReadSegment, Volume, VolumeError, VolumeResult, ZeroFlags};

/// What a region of the source holds: data to write, and runs that read as
/// zeros (holes) which are never transferred.
#[derive(Debug, Default)]
pub(crate) struct Fetched {
    pieces: Vec<Piece>,
    /// Bytes that crossed the wire from the source.
    pub fetched: u64,
}

#[derive(Debug)]
enum Piece {
    Data(u64, Bytes),
    Zero(u64, u64),
}

impl Fetched {
    fn push_zero(&mut self, at: u64, len: u64) {
        if let Some(Piece::Zero(start, n)) = self.pieces.last_mut() {
            if *start + *n == at {
                *n += len;
                return;
            }
        }
        self.pieces.push(Piece::Zero(at, len));
    }
}

/// Read `range` of the source: its allocation map first, so holes and zero
/// runs are skipped, then the data parts (sparse reads, so a server that
/// knows more holes sends none of them).
pub(crate) async fn fetch(source: &dyn Volume, range: Range<u64>) -> VolumeResult<Fetched> {
    let mut out = Fetched::default();
    let mut pos = range.start;
    while pos < range.end {
        let extents = source.extents(pos, range.end - pos).await?;
        let before = pos;
        for e in extents {
            let len = e.len.min(range.end - pos);
            if len == 0 {
                break;
            }
            if e.kind.reads_as_zero() {
                out.push_zero(pos, len);
            } else {
                read_data(source, pos, len, &mut out).await?;
            }
            pos += len;
            if pos >= range.end {
                break;
            }
        }
        if pos == before {
            return Err(VolumeError::Io(std::io::Error::other(format!(
                "the source returned an empty allocation map at offset {pos}"
            ))));
        }
    }
    Ok(out)
}

async fn read_data(source: &dyn Volume, pos: u64, len: u64, out: &mut Fetched) -> VolumeResult<()> {
    let mut at = pos;
    for seg in source.read_sparse(pos, len as usize).await? {
        let n = seg.len();
        match seg {
            ReadSegment::Data(bytes) => {
                out.fetched += n;
                if bytes.iter().all(|&b| b == 0) {
                    out.push_zero(at, n);
                } else {
                    out.pieces.push(Piece::Data(at, bytes));
                }
            }
            ReadSegment::Zero(_) => out.push_zero(at, n),
        }
        at += n;
    }
    if at != pos + len {
        return Err(VolumeError::Io(std::io::Error::other(format!(
            "the source answered a read of {len} bytes at {pos} with {} bytes",
            at - pos
        ))));
    }
    Ok(())
}

/// Write what [`fetch`] found into the local store. Zero runs are zeroed
/// only where the local store holds data: a fresh sparse local volume is
/// left alone, one with stale contents is cleaned.
pub(crate) async fn apply(local: &dyn Volume, fetched: Fetched) -> VolumeResult<()> {
    for piece in fetched.pieces {
        match piece {
            Piece::Data(at, bytes) => local.write(at, bytes, false).await?,
            Piece::Zero(at, len) => zero_where_needed(local, at, len).await?,
        }
    }
    Ok(())
}

/// Make `[pos, pos + len)` of `local` read as zeros, touching only the
/// parts it does not already know to be zero.
pub(crate) async fn zero_where_needed(local: &dyn Volume, pos: u64, len: u64) -> VolumeResult<()> {
    let end = pos + len;
    let mut at = pos;
    while at < end {
        let extents = local.extents(at, end - at).await?;
        let before = at;
        for e in extents {
            let n = e.len.min(end - at);
            if n == 0 {
                break;
            }
            if !e.kind.reads_as_zero() {
                local
                    .write_zeroes(
                        at,
                        n,
                        ZeroFlags {
                            may_trim: true,
                            ..Default::default()
                        },
                    )
                    .await?;
            }
            at += n;
            if at >= end {
                break;
            }
        }
        if at == before {
            // No map: zero it all rather than loop.
            local
                .write_zeroes(
                    at,
                    end - at,
                    ZeroFlags {
                        may_trim: true,
                        ..Default::default()
                    },
                )
                .await?;
            at = end;
        }
    }
    Ok(())
}
