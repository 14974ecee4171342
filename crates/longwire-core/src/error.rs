use std::io;

/// Why a volume operation failed. Each variant maps onto one errno-style
/// value that every front-end can express (NBD error codes, SCSI sense keys).
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The store failed underneath us (disk error, lost backend, …).
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The request is malformed or outside what the volume accepts
    /// (for example a read past the end).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A write would land past the end of the volume, or the store is full.
    #[error("no space: {0}")]
    NoSpace(String),
    /// The volume (or this export of it) is read-only.
    #[error("volume is read-only")]
    ReadOnly,
    /// The operation cannot be done as asked (e.g. a fast zero that would be slow).
    #[error("not supported: {0}")]
    NotSupported(String),
    /// The request is too large to serve in one go.
    #[error("request too large: {0}")]
    Overflow(String),
    /// The server is shutting down and takes no new work.
    #[error("server is shutting down")]
    Shutdown,
}

impl VolumeError {
    /// The POSIX errno this error corresponds to; front-ends map from this.
    pub fn errno(&self) -> i32 {
        match self {
            VolumeError::Io(e) => match e.raw_os_error() {
                Some(28 /* ENOSPC */) | Some(122 /* EDQUOT */) | Some(27 /* EFBIG */) => 28,
                _ => 5,
            },
            VolumeError::Invalid(_) => 22,
            VolumeError::NoSpace(_) => 28,
            VolumeError::ReadOnly => 1,
            VolumeError::NotSupported(_) => 95,
            VolumeError::Overflow(_) => 75,
            VolumeError::Shutdown => 108,
        }
    }
}

/// Result of a volume operation.
pub type VolumeResult<T> = Result<T, VolumeError>;
