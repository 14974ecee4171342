use bytes::Bytes;

/// What a stretch of a volume holds, as far as the store can tell cheaply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated; contents unknown without reading.
    Data,
    /// Not allocated in the store and reads as zeros (a sparse hole).
    Hole,
    /// Allocated but known to read as zeros.
    Zero,
}

impl ExtentKind {
    /// True when reading this extent is guaranteed to return zeros.
    pub fn reads_as_zero(self) -> bool {
        !matches!(self, ExtentKind::Data)
    }
}

/// One run of the allocation map: `len` bytes of the same [`ExtentKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub kind: ExtentKind,
}

impl Extent {
    pub fn new(len: u64, kind: ExtentKind) -> Self {
        Extent { len, kind }
    }

    /// Append `ext` to `list`, merging with the last entry when the kind matches.
    pub fn push_merged(list: &mut Vec<Extent>, ext: Extent) {
        if ext.len == 0 {
            return;
        }
        match list.last_mut() {
            Some(last) if last.kind == ext.kind => last.len = last.len.saturating_add(ext.len),
            _ => list.push(ext),
        }
    }
}

/// One piece of a sparse read, in order: bytes that were read, or a run
/// known to be zero that need not travel over the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadSegment {
    Data(Bytes),
    Zero(u64),
}

impl ReadSegment {
    pub fn len(&self) -> u64 {
        match self {
            ReadSegment::Data(b) => b.len() as u64,
            ReadSegment::Zero(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
