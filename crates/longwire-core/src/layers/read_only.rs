use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{Capabilities, Extent, LayerStatus, ReadSegment, Volume, VolumeError, VolumeResult, ZeroFlags};

/// Serves a volume read-only: reads pass through, every change is refused
/// with [`VolumeError::ReadOnly`].
pub struct ReadOnly {
    inner: Arc<dyn Volume>,
}

impl ReadOnly {
    pub fn new(inner: Arc<dyn Volume>) -> Self {
        ReadOnly { inner }
    }
}

#[async_trait]
impl Volume for ReadOnly {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: true,
            can_trim: false,
            can_zero: false,
            can_fast_zero: false,
            ..self.inner.capabilities()
        }
    }

    fn status(&self) -> Vec<LayerStatus> {
        self.inner.status()
    }

    async fn close(&self) -> VolumeResult<()> {
        self.inner.close().await
    }

    async fn read(&self, offset: u64, len: usize) -> VolumeResult<Bytes> {
        self.inner.read(offset, len).await
    }

    async fn read_sparse(&self, offset: u64, len: usize) -> VolumeResult<Vec<ReadSegment>> {
        self.inner.read_sparse(offset, len).await
    }

    async fn write(&self, _: u64, _: Bytes, _: bool) -> VolumeResult<()> {
        Err(VolumeError::ReadOnly)
    }

    async fn flush(&self) -> VolumeResult<()> {
        Ok(())
    }

    async fn trim(&self, _: u64, _: u64, _: bool) -> VolumeResult<()> {
        Err(VolumeError::ReadOnly)
    }

    async fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> VolumeResult<()> {
        Err(VolumeError::ReadOnly)
    }

    async fn cache(&self, offset: u64, len: u64) -> VolumeResult<()> {
        self.inner.cache(offset, len).await
    }

    async fn extents(&self, offset: u64, len: u64) -> VolumeResult<Vec<Extent>> {
        self.inner.extents(offset, len).await
    }
}
