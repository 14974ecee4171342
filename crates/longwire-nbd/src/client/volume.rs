//! [`NbdVolume`]: a remote NBD export as a longwire [`Volume`].

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use longwire_core::{
    check_range, Capabilities, Extent, ExtentKind, ReadSegment, Volume, VolumeError, VolumeResult, ZeroFlags,
};

use super::codec::segments_to_bytes;
use super::config::ClientConfig;
use super::driver::NbdClient;
use super::error::ClientError;
use crate::proto::*;

/// Longest effect length (trim, zero, cache, block status) sent in one
/// request: fits a compact header and is aligned to any minimum block size.
const MAX_EFFECT: u64 = 1 << 30;
/// Pieces of one split call in flight at once.
const SPLIT_CONCURRENCY: usize = 32;

/// A remote export served by an [`NbdClient`], as a [`Volume`].
///
/// Ranges are checked locally (past the end, unaligned to the minimum block
/// size) so bad requests never reach the server; reads and writes larger
/// than [`NbdClient::max_io`] are split and the pieces run concurrently;
/// operations the server does not advertise degrade as the `Volume` trait
/// says (no TRIM: accepted and ignored; no WRITE_ZEROES: zeros are written;
/// no FUA: a flush follows; no block status: everything is data). Errors
/// the server returns map back to [`VolumeError`] by errno.
pub struct NbdVolume {
    client: NbdClient,
    size: u64,
    flags: u16,
    caps: Capabilities,
    max_io: u64,
    block_status: bool,
}

impl std::fmt::Debug for NbdVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdVolume").field("client", &self.client).field("caps", &self.caps).finish()
    }
}

impl NbdVolume {
    pub fn new(client: NbdClient) -> Self {
        let info = client.info();
        let has = |f: u16| info.flags & f != 0;
        let read_only = has(FLAG_READ_ONLY);
        let max_io = client.max_io();
        let caps = Capabilities {
            read_only,
            can_flush: has(FLAG_SEND_FLUSH),
            can_trim: !read_only && has(FLAG_SEND_TRIM),
            can_zero: !read_only && has(FLAG_SEND_WRITE_ZEROES),
            can_fast_zero: !read_only && has(FLAG_SEND_WRITE_ZEROES) && has(FLAG_SEND_FAST_ZERO),
            can_multi_conn: has(FLAG_CAN_MULTI_CONN),
            min_block: info.min_block,
            preferred_block: info.preferred_block.max(info.min_block),
            max_payload: max_io,
        };
        NbdVolume {
            size: info.size,
            flags: info.flags,
            block_status: info.base_allocation.is_some(),
            caps,
            max_io: max_io as u64,
            client,
        }
    }

    /// Connect to an NBD URI and wrap the client.
    pub async fn connect(uri: &str, config: ClientConfig) -> Result<NbdVolume, ClientError> {
        Ok(NbdVolume::new(NbdClient::connect(uri, config).await?))
    }

    pub fn client(&self) -> &NbdClient {
        &self.client
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    fn check(&self, what: &str, offset: u64, len: u64, write: bool) -> VolumeResult<()> {
        if !check_range(self.size, offset, len) {
            let msg = format!("{what} of {len} bytes at offset {offset} goes past the end of the export ({} bytes)", self.size);
            return Err(if write { VolumeError::NoSpace(msg) } else { VolumeError::Invalid(msg) });
        }
        let min = self.caps.min_block.max(1) as u64;
        if !offset.is_multiple_of(min) || !len.is_multiple_of(min) {
            return Err(VolumeError::Invalid(format!(
                "{what} of {len} bytes at offset {offset} is not aligned to the export's {min}-byte minimum block size"
            )));
        }
        Ok(())
    }

    fn check_write(&self, what: &str, offset: u64, len: u64) -> VolumeResult<()> {
        if self.caps.read_only {
            return Err(VolumeError::ReadOnly);
        }
        self.check(what, offset, len, true)
    }

    /// A flush standing in for FUA on a server without `SEND_FUA`.
    async fn emulate_fua(&self, fua: bool) -> VolumeResult<()> {
        if fua && !self.has(FLAG_SEND_FUA) && self.has(FLAG_SEND_FLUSH) {
            self.client.flush().await?;
        }
        Ok(())
    }

    fn fua(&self, fua: bool) -> bool {
        fua && self.has(FLAG_SEND_FUA)
    }

    async fn read_segments(&self, offset: u64, len: usize) -> VolumeResult<Vec<ReadSegment>> {
        self.check("read", offset, len as u64, false)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let parts: Vec<Vec<ReadSegment>> = stream::iter(pieces(offset, len as u64, self.max_io))
            .map(|(o, l)| self.client.read(o, l as u32))
            .buffered(SPLIT_CONCURRENCY)
            .try_collect()
            .await?;
        let mut out: Vec<ReadSegment> = Vec::new();
        for seg in parts.into_iter().flatten() {
            match (out.last_mut(), seg) {
                (Some(ReadSegment::Zero(z)), ReadSegment::Zero(n)) => *z += n,
                (_, seg) => out.push(seg),
            }
        }
        Ok(out)
    }

    /// Run one effect-length command over `[offset, offset + len)` in pieces.
    async fn split_effect<F, Fut>(&self, offset: u64, len: u64, f: F) -> VolumeResult<()>
    where
        F: Fn(u64, u64) -> Fut,
        Fut: std::future::Future<Output = Result<(), ClientError>>,
    {
        stream::iter(pieces(offset, len, MAX_EFFECT))
            .map(|(o, l)| f(o, l))
            .buffer_unordered(SPLIT_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }
}

/// Split `[offset, offset + len)` into pieces of at most `max` bytes.
fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    let max = max.max(1);
    let end = offset + len;
    (0..len.div_ceil(max)).map(move |i| {
        let o = offset + i * max;
        (o, max.min(end - o))
    })
}

#[async_trait]
impl Volume for NbdVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    async fn read(&self, offset: u64, len: usize) -> VolumeResult<Bytes> {
        let segments = self.read_segments(offset, len).await?;
        Ok(segments_to_bytes(segments, len))
    }

    async fn read_sparse(&self, offset: u64, len: usize) -> VolumeResult<Vec<ReadSegment>> {
        self.read_segments(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> VolumeResult<()> {
        let len = data.len() as u64;
        self.check_write("write", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let send_fua = self.fua(fua);
        stream::iter(pieces(offset, len, self.max_io))
            .map(|(o, l)| {
                let start = (o - offset) as usize;
                self.client.write(o, data.slice(start..start + l as usize), send_fua)
            })
            .buffer_unordered(SPLIT_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        self.emulate_fua(fua).await
    }

    async fn flush(&self) -> VolumeResult<()> {
        if self.has(FLAG_SEND_FLUSH) {
            self.client.flush().await?;
        }
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> VolumeResult<()> {
        self.check_write("trim", offset, len)?;
        if self.has(FLAG_SEND_TRIM) && len > 0 {
            let send_fua = self.fua(fua);
            self.split_effect(offset, len, |o, l| self.client.trim(o, l, send_fua)).await?;
            return self.emulate_fua(fua).await;
        }
        // A hint the server does not take: accepted and ignored.
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> VolumeResult<()> {
        self.check_write("write zeroes", offset, len)?;
        if !self.has(FLAG_SEND_WRITE_ZEROES) {
            if flags.fast {
                return Err(VolumeError::NotSupported("the server does not support NBD_CMD_WRITE_ZEROES".into()));
            }
            let chunk = self.max_io.min(1 << 20);
            let zeros = BytesMut::zeroed(chunk as usize).freeze();
            stream::iter(pieces(offset, len, chunk))
                .map(|(o, l)| self.client.write(o, zeros.slice(..l as usize), false))
                .buffer_unordered(SPLIT_CONCURRENCY)
                .try_collect::<Vec<()>>()
                .await?;
            return if flags.fua { self.flush().await } else { Ok(()) };
        }
        if flags.fast && !self.has(FLAG_SEND_FAST_ZERO) {
            return Err(VolumeError::NotSupported("the server does not support fast zeroing".into()));
        }
        if len == 0 {
            return Ok(());
        }
        let wire = ZeroFlags { fua: self.fua(flags.fua), ..flags };
        self.split_effect(offset, len, |o, l| self.client.write_zeroes(o, l, wire)).await?;
        self.emulate_fua(flags.fua).await
    }

    async fn cache(&self, offset: u64, len: u64) -> VolumeResult<()> {
        self.check("cache", offset, len, false)?;
        if self.has(FLAG_SEND_CACHE) && len > 0 {
            self.split_effect(offset, len, |o, l| self.client.cache(o, l)).await?;
        }
        Ok(())
    }

    async fn extents(&self, offset: u64, len: u64) -> VolumeResult<Vec<Extent>> {
        if len == 0 {
            return Err(VolumeError::Invalid("extents of an empty range".into()));
        }
        if !check_range(self.size, offset, len) {
            return Err(VolumeError::Invalid(format!(
                "extents of {len} bytes at offset {offset} go past the end of the export ({} bytes)",
                self.size
            )));
        }
        if !self.block_status {
            return Ok(vec![Extent::new(len, ExtentKind::Data)]);
        }
        let min = self.caps.min_block.max(1) as u64;
        if !offset.is_multiple_of(min) {
            return Err(VolumeError::Invalid(format!(
                "extents at offset {offset} are not aligned to the export's {min}-byte minimum block size"
            )));
        }
        // Whole minimum blocks, within the export (the answer may cover
        // less than asked, never less than one byte).
        let ask = (len.min(MAX_EFFECT).div_ceil(min) * min).min(self.size - offset);
        let mut out = Vec::new();
        for (l, status) in self.client.block_status(offset, ask).await? {
            let kind = match (status & STATE_HOLE != 0, status & STATE_ZERO != 0) {
                (true, true) => ExtentKind::Hole,
                (false, true) => ExtentKind::Zero,
                // Unallocated without the zero flag may read as anything.
                _ => ExtentKind::Data,
            };
            Extent::push_merged(&mut out, Extent::new(l, kind));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::pieces;

    #[test]
    fn pieces_cover_the_range() {
        assert_eq!(pieces(10, 25, 10).collect::<Vec<_>>(), vec![(10, 10), (20, 10), (30, 5)]);
        assert_eq!(pieces(0, 8, 8).collect::<Vec<_>>(), vec![(0, 8)]);
        assert_eq!(pieces(0, 0, 8).count(), 0);
    }
}
