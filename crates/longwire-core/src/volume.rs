use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::{Extent, ExtentKind, LayerStatus, ReadSegment, VolumeError, VolumeResult};

/// What a volume can do. Front-ends advertise exactly this and nothing more,
/// so every flag here is a promise the implementation keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Writes, trims and zeroing are refused.
    pub read_only: bool,
    /// `flush` and FUA writes make data durable (otherwise they are no-ops
    /// that still succeed, e.g. for a memory volume with nothing to persist).
    pub can_flush: bool,
    /// `trim` may actually discard (otherwise it is accepted and ignored).
    pub can_trim: bool,
    /// `write_zeroes` is implemented more efficiently than writing zeros.
    pub can_zero: bool,
    /// `write_zeroes` with `fast` set succeeds when it is cheap, and fails
    /// with `NotSupported` (without changing anything) when it would not be.
    pub can_fast_zero: bool,
    /// A flush on any handle covers writes completed through every handle of
    /// this volume: there is no per-connection cache.
    pub can_multi_conn: bool,
    /// Smallest addressable unit; requests must be aligned to it.
    pub min_block: u32,
    /// Size and alignment that avoids read-modify-write.
    pub preferred_block: u32,
    /// Largest single read or write payload the volume accepts.
    pub max_payload: u32,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            read_only: false,
            can_flush: true,
            can_trim: false,
            can_zero: false,
            can_fast_zero: false,
            can_multi_conn: false,
            min_block: 1,
            preferred_block: 4096,
            max_payload: 32 * 1024 * 1024,
        }
    }
}

/// How a `write_zeroes` may be carried out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated (punched) rather than written.
    pub may_trim: bool,
    /// Fail with `NotSupported` unless zeroing is faster than writing.
    pub fast: bool,
    /// Durable before returning.
    pub fua: bool,
}

/// An async block device: the interface between front-ends and stores.
///
/// Callers check ranges against [`Volume::size`] before calling (see
/// [`check_range`]); implementations may assume valid ranges but must still
/// not panic on bad ones.
#[async_trait]
pub trait Volume: Send + Sync + 'static {
    /// Size in bytes. Constant for the life of the volume.
    fn size(&self) -> u64;

    /// What this volume supports.
    fn capabilities(&self) -> Capabilities;

    /// Read `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: usize) -> VolumeResult<Bytes>;

    /// Read `len` bytes at `offset`, reporting runs known to be zero as
    /// [`ReadSegment::Zero`] so front-ends can skip sending them. The default
    /// reads everything.
    async fn read_sparse(&self, offset: u64, len: usize) -> VolumeResult<Vec<ReadSegment>> {
        Ok(vec![ReadSegment::Data(self.read(offset, len).await?)])
    }

    /// Write `data` at `offset`; when `fua` is set it is durable on return.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> VolumeResult<()>;

    /// Make every completed write durable.
    async fn flush(&self) -> VolumeResult<()>;

    /// Hint that the range is no longer needed. Contents afterwards are
    /// unspecified until rewritten. The default accepts and ignores it.
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> VolumeResult<()> {
        let _ = (offset, len);
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Make the range read as zeros. The default writes zero buffers (and so
    /// refuses `fast`).
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> VolumeResult<()> {
        if flags.fast {
            return Err(VolumeError::NotSupported("zeroing is no faster than writing".into()));
        }
        let chunk = self.capabilities().max_payload.clamp(4096, 1 << 20) as u64;
        let zeros = BytesMut::zeroed(chunk as usize).freeze();
        let mut pos = offset;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| VolumeError::NoSpace(format!("zeroing {len} bytes at {offset} overflows")))?;
        while pos < end {
            let n = chunk.min(end - pos);
            self.write(pos, zeros.slice(..n as usize), false).await?;
            pos += n;
        }
        if flags.fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Hint that the range will be read soon. The default does nothing.
    async fn cache(&self, offset: u64, len: u64) -> VolumeResult<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Allocation map of the range starting at `offset`, covering at least
    /// one byte and at most roughly `len` bytes (`len` is never 0). `Zero`
    /// versus `Data` is best effort: allocated zeros may be reported as data,
    /// but `Hole`/`Zero` must only be claimed for ranges that read as zeros.
    /// The default says "data".
    async fn extents(&self, offset: u64, len: u64) -> VolumeResult<Vec<Extent>> {
        let _ = offset;
        Ok(vec![Extent::new(len, ExtentKind::Data)])
    }

    /// State of the layers and store under this volume, outermost first
    /// (see [`LayerStatus`]). Layers put their own entry before their inner
    /// volume's. The default has nothing to report.
    fn status(&self) -> Vec<LayerStatus> {
        Vec::new()
    }

    /// Called once when the server stops serving the volume, after the
    /// last request has finished: the place to give back what other
    /// servers may be waiting for (an S3 volume's single-writer lease)
    /// instead of leaving it to time out. Layers forward it to their inner
    /// volumes. The default has nothing to give back.
    async fn close(&self) -> VolumeResult<()> {
        Ok(())
    }
}

/// Check that `[offset, offset + len)` lies inside a volume of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}
