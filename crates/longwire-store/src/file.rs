//! A volume backed by a raw image file (or a block device) on Linux.
//!
//! All blocking system calls run on a small dedicated I/O pool (`io_pool`)
//! so a slow disk never stalls the reactor threads that drive every
//! connection. Positional I/O (`pread`/`pwrite`) means one shared descriptor
//! serves any number of concurrent requests without a lock.
//!
//! Sparseness is the filesystem's: trims punch holes, and holes are found
//! with `SEEK_DATA`/`SEEK_HOLE`, which (unlike FIEMAP alone) also sees data
//! still in the page cache, so a hole reported here really reads as zeros.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use longwire_core::{
    Capabilities, Extent, ExtentKind, ReadSegment, Volume, VolumeError, VolumeResult, ZeroFlags,
};

use crate::sparse::{check_in_range, check_read, check_write, split_zero_runs, SegmentBuilder, MAX_PAYLOAD};

/// Holes smaller than this are read as data by `read_sparse`: splitting a
/// reply for a few bytes costs more than sending them.
const MIN_SPARSE_HOLE: u64 = 4096;

/// Largest buffer used when zeroing has to fall back to writing zeros.
const ZERO_BUF: u64 = 1 << 20;

/// Most data/hole runs one `extents` call collects; bounds the work on badly
/// fragmented files (the trait allows answering for less than was asked).
const MAX_EXTENT_RUNS: usize = 1024;

/// A raw image file served as a volume.
pub struct FileVolume {
    inner: Arc<Inner>,
    path: PathBuf,
    size: u64,
    read_only: bool,
}

/// What the blocking closures need; shared so they can be `'static`.
struct Inner {
    file: File,
    /// Cleared after the filesystem says it cannot punch holes / zero ranges,
    /// so we stop asking on every request.
    can_punch: AtomicBool,
    can_zero_range: AtomicBool,
}

impl std::fmt::Debug for FileVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileVolume")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// An `io::Error` of the same kind with `context` in front of its message.
fn with_context(e: io::Error, context: impl std::fmt::Display) -> io::Error {
    io::Error::new(e.kind(), format!("{context}: {e}"))
}

impl FileVolume {
    /// Open (or create) the image at `path`.
    ///
    /// - Missing file: created sparse at `size` (parent directories too); an
    ///   error if no size is given or `read_only` is set, since a new
    ///   read-only image would only ever read zeros and usually means a
    ///   mistyped path.
    /// - Existing file: `size` may grow it (not when read-only) but never
    ///   shrinks it, because shrinking destroys data; without `size` the
    ///   current length is used.
    ///
    /// Blocking: call it at startup or from `spawn_blocking`.
    pub fn open(
        path: impl AsRef<Path>,
        size: Option<u64>,
        read_only: bool,
    ) -> io::Result<FileVolume> {
        let path = path.as_ref();
        let shown = path.display();
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        let (file, size) = match opts.open(path) {
            Ok(mut file) => {
                let size = Self::settle_size(&mut file, path, size, read_only)?;
                (file, size)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let Some(size) = size else {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{shown} does not exist; give a size to create it"),
                    ));
                };
                if read_only {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{shown} does not exist, and a read-only volume cannot create it"),
                    ));
                }
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(|e| {
                        with_context(
                            e,
                            format_args!("cannot create directory {}", parent.display()),
                        )
                    })?;
                }
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(|e| with_context(e, format_args!("cannot create {shown}")))?;
                file.set_len(size).map_err(|e| {
                    with_context(e, format_args!("cannot make {shown} {size} bytes long"))
                })?;
                tracing::info!(path = %shown, size, "created sparse image");
                (file, size)
            }
            Err(e) => return Err(with_context(e, format_args!("cannot open {shown}"))),
        };
        Ok(FileVolume {
            inner: Arc::new(Inner {
                file,
                can_punch: AtomicBool::new(true),
                can_zero_range: AtomicBool::new(true),
            }),
            path: path.to_path_buf(),
            size,
            read_only,
        })
    }

    /// Reconcile an existing file's length with the requested size.
    fn settle_size(
        file: &mut File,
        path: &Path,
        wanted: Option<u64>,
        read_only: bool,
    ) -> io::Result<u64> {
        let shown = path.display();
        let meta = file
            .metadata()
            .map_err(|e| with_context(e, format_args!("cannot stat {shown}")))?;
        if meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{shown} is a directory, not an image file"),
            ));
        }
        // Block devices report length 0 in metadata; seeking to the end
        // gives their real size (and a regular file's length).
        let current = if meta.is_file() {
            meta.len()
        } else {
            file.seek(SeekFrom::End(0))
                .map_err(|e| with_context(e, format_args!("cannot size {shown}")))?
        };
        let Some(wanted) = wanted else {
            return Ok(current);
        };
        if wanted < current {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{shown} is {current} bytes; size {wanted} would shrink it and destroy data. \
                     Refusing: leave the size out to use the current size, or give one of at least {current} bytes"
                ),
            ));
        }
        if wanted > current {
            if read_only {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{shown} is {current} bytes; size {wanted} would grow it, which a read-only volume cannot do. \
                         Leave the size out or open it writable"
                    ),
                ));
            }
            if !meta.is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{shown} is a {current}-byte device and cannot be grown to {wanted} bytes"
                    ),
                ));
            }
            file.set_len(wanted).map_err(|e| {
                with_context(e, format_args!("cannot grow {shown} to {wanted} bytes"))
            })?;
            tracing::info!(path = %shown, from = current, to = wanted, "grew image");
        }
        Ok(wanted)
    }

    /// The path this volume was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `f` on the I/O pool with the shared file.
    async fn blocking<T, F>(&self, f: F) -> VolumeResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> VolumeResult<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        match crate::io_pool::shared().run(move || f(&inner)).await {
            Some(result) => result,
            None => Err(VolumeError::Io(io::Error::other("file I/O task failed"))),
        }
    }

    /// Read `len` bytes: straight from the page cache when it has them all
    /// (no thread hand-off), else the rest on the blocking pool.
    async fn read_cached_or_blocking(&self, offset: u64, len: usize) -> VolumeResult<Bytes> {
        let mut buf = BytesMut::zeroed(len);
        let done = pread_nowait(&self.inner.file, &mut buf, offset);
        if done == len {
            return Ok(buf.freeze());
        }
        self.blocking(move |inner| {
            inner.file.read_exact_at(&mut buf[done..], offset + done as u64)?;
            Ok(buf.freeze())
        })
        .await
    }

    fn writable(&self) -> VolumeResult<()> {
        if self.read_only {
            Err(VolumeError::ReadOnly)
        } else {
            Ok(())
        }
    }
}

// ---- small wrappers around the raw system calls -------------------------

/// Read what the page cache already holds without ever blocking:
/// `preadv2(RWF_NOWAIT)` returns EAGAIN instead of waiting for the disk, so
/// this is safe on a reactor thread. Returns the bytes read (0 when nothing
/// could be read without blocking, or on any error: the caller then falls
/// back to a blocking read, which reports real errors).
fn pread_nowait(file: &File, buf: &mut [u8], offset: u64) -> usize {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let iov = libc::iovec { iov_base: rest.as_mut_ptr().cast(), iov_len: rest.len() };
        let Ok(pos) = off(offset + done as u64) else { return done };
        // SAFETY: `iov` points into `buf`, which outlives the call; the fd is
        // owned by `file`.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, pos, libc::RWF_NOWAIT) };
        if n <= 0 {
            return done;
        }
        done += n as usize;
    }
    done
}

fn off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

/// True for the errors meaning "this filesystem/device can't do that at all".
fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS))
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (o, l) = (off(offset)?, off(len)?);
    // SAFETY: plain syscall on a descriptor we own; no memory is passed.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, o, l) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `lseek` with `SEEK_DATA`/`SEEK_HOLE`. It moves the shared file position,
/// which is harmless: every read and write here is positional (pread/pwrite),
/// and the returned offset is computed from `offset`, not the position, so
/// concurrent seeks can't confuse each other.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    let o = off(offset)?;
    // SAFETY: plain syscall on a descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), o, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// One stretch of the file: data, or a hole that reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    start: u64,
    len: u64,
    data: bool,
}

/// Data/hole map of `[start, end)` from `SEEK_DATA`/`SEEK_HOLE`, at most
/// `max_runs` runs (so it may stop short of `end`). `None` when the
/// filesystem can't tell; callers then treat everything as data.
fn seek_map(file: &File, start: u64, end: u64, max_runs: usize) -> io::Result<Option<Vec<Run>>> {
    let mut runs: Vec<Run> = Vec::new();
    let mut pos = start;
    while pos < end && runs.len() < max_runs {
        let data = match seek(file, pos, libc::SEEK_DATA) {
            Ok(d) => d.clamp(pos, end),
            // No data at or after pos: the rest is one hole.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) || unsupported(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        if data > pos {
            runs.push(Run {
                start: pos,
                len: data - pos,
                data: false,
            });
            pos = data;
            if pos >= end {
                break;
            }
        }
        let hole = match seek(file, pos, libc::SEEK_HOLE) {
            // Never less than pos+1: data was just found at pos. If a racing
            // punch makes the kernel say otherwise, call the rest data (safe:
            // it only costs a read).
            Ok(h) if h > pos => h.min(end),
            Ok(_) => end,
            // ENXIO: the file shrank under us; reading will report it.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) || unsupported(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        runs.push(Run {
            start: pos,
            len: hole - pos,
            data: true,
        });
        pos = hole;
    }
    Ok(Some(runs))
}

/// Inside a hole found by `SEEK_HOLE`, the byte ranges that are nonetheless
/// allocated (e.g. unwritten extents left by `FALLOC_FL_ZERO_RANGE`), from
/// the FIEMAP ioctl. These read as zeros (SEEK_HOLE checked the page cache)
/// but are not holes, so `extents` reports them as `Zero`.
///
/// Best effort: any failure, or more than a few batches of extents, and the
/// remainder is left as a hole; that only changes the allocation hint.
fn allocated_in_hole(file: &File, start: u64, len: u64) -> Vec<(u64, u64)> {
    // Layout of struct fiemap / fiemap_extent from <linux/fiemap.h>.
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct FiemapExtent {
        logical: u64,
        physical: u64,
        length: u64,
        reserved64: [u64; 2],
        flags: u32,
        reserved: [u32; 3],
    }
    const BATCH: usize = 64;
    #[repr(C)]
    struct Fiemap {
        start: u64,
        length: u64,
        flags: u32,
        mapped_extents: u32,
        extent_count: u32,
        reserved: u32,
        extents: [FiemapExtent; BATCH],
    }
    /// _IOWR('f', 11, struct fiemap) with the 32-byte header.
    const FS_IOC_FIEMAP: u32 = 0xC020_660B;
    const FIEMAP_EXTENT_LAST: u32 = 0x1;

    let end = start + len;
    let mut found = Vec::new();
    let mut pos = start;
    for _ in 0..4 {
        if pos >= end {
            break;
        }
        let mut map = Fiemap {
            start: pos,
            length: end - pos,
            flags: 0,
            mapped_extents: 0,
            extent_count: BATCH as u32,
            reserved: 0,
            extents: [FiemapExtent::default(); BATCH],
        };
        // SAFETY: `map` is a correctly laid out struct fiemap with room for
        // `extent_count` extents; the kernel writes only within it.
        let r = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                FS_IOC_FIEMAP as _,
                &mut map as *mut Fiemap,
            )
        };
        if r != 0 {
            break;
        }
        let n = (map.mapped_extents as usize).min(BATCH);
        if n == 0 {
            break;
        }
        let mut last = false;
        for e in &map.extents[..n] {
            let s = e.logical.max(pos);
            let t = e.logical.saturating_add(e.length).min(end);
            if t > s {
                found.push((s, t - s));
            }
            pos = pos.max(t);
            last |= e.flags & FIEMAP_EXTENT_LAST != 0;
        }
        if last {
            break;
        }
    }
    found
}

/// Write zeros over `[offset, offset + len)` the slow way.
fn write_zero_buffers(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; len.min(ZERO_BUF) as usize];
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(ZERO_BUF) as usize;
        file.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

impl Inner {
    /// Try one fallocate mode that `flag` says may work; `Ok(false)` when the
    /// filesystem can't do it (remembered if permanent).
    fn try_fallocate(
        &self,
        flag: &AtomicBool,
        mode: libc::c_int,
        offset: u64,
        len: u64,
    ) -> io::Result<bool> {
        if !flag.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match fallocate(&self.file, mode, offset, len) {
            Ok(()) => Ok(true),
            Err(e) if unsupported(&e) => {
                flag.store(false, Ordering::Relaxed);
                Ok(false)
            }
            // Some filesystems reject unaligned ranges with EINVAL although
            // fallocate(2) says they shouldn't; fall back for this request.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<bool> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        self.try_fallocate(&self.can_punch, mode, offset, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<bool> {
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        self.try_fallocate(&self.can_zero_range, mode, offset, len)
    }
}

#[async_trait]
impl Volume for FileVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        let writable = !self.read_only;
        Capabilities {
            read_only: self.read_only,
            can_flush: true,
            can_trim: writable,
            can_zero: writable,
            // Fast zero succeeds when fallocate can do it and otherwise fails
            // with NotSupported without touching data, which is the promise.
            can_fast_zero: writable,
            // One descriptor, no user-space cache: fdatasync through any
            // handle covers writes completed through all of them.
            can_multi_conn: true,
            min_block: 1,
            preferred_block: 4096,
            max_payload: MAX_PAYLOAD,
        }
    }

    async fn read(&self, offset: u64, len: usize) -> VolumeResult<Bytes> {
        check_read(self.size, offset, len)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.read_cached_or_blocking(offset, len).await
    }

    async fn read_sparse(&self, offset: u64, len: usize) -> VolumeResult<Vec<ReadSegment>> {
        check_read(self.size, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        // Fast path: everything is in the page cache. Zero blocks in what we
        // read still become holes on the wire.
        let mut buf = BytesMut::zeroed(len);
        if pread_nowait(&self.inner.file, &mut buf, offset) == len {
            return Ok(split_zero_runs(offset, buf.freeze()));
        }
        self.blocking(move |inner| {
            let file = &inner.file;
            let end = offset + len as u64;
            let runs = seek_map(file, offset, end, usize::MAX)?.unwrap_or_else(|| {
                vec![Run {
                    start: offset,
                    len: len as u64,
                    data: true,
                }]
            });
            // Small holes become data, then neighbours of the same kind merge,
            // so each data stretch is one pread.
            let mut merged: Vec<Run> = Vec::new();
            for mut r in runs {
                r.data |= r.len < MIN_SPARSE_HOLE;
                match merged.last_mut() {
                    Some(last) if last.data == r.data => last.len += r.len,
                    _ => merged.push(r),
                }
            }
            let mut out = SegmentBuilder::default();
            for r in merged {
                if r.data {
                    file.read_exact_at(out.data(r.len as usize), r.start)?;
                } else {
                    out.zero(r.len);
                }
            }
            Ok(out.finish())
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> VolumeResult<()> {
        self.writable()?;
        check_write(self.size, offset, data.len() as u64)?;
        if data.is_empty() && !fua {
            return Ok(());
        }
        self.blocking(move |inner| {
            inner.file.write_all_at(&data, offset)?;
            if fua {
                inner.file.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> VolumeResult<()> {
        if self.read_only {
            // Nothing can have been written through this volume.
            return Ok(());
        }
        self.blocking(|inner| Ok(inner.file.sync_data()?)).await
    }

    /// Punches a hole. Trim is only a hint, so a filesystem that can't punch
    /// makes this a successful no-op.
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> VolumeResult<()> {
        self.writable()?;
        check_write(self.size, offset, len)?;
        self.blocking(move |inner| {
            if len > 0 && !inner.punch(offset, len)? {
                tracing::trace!(offset, len, "trim ignored: cannot punch holes here");
            }
            if fua {
                inner.file.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    /// Cheapest first: punch a hole (only if `may_trim`), then ZERO_RANGE
    /// (keeps the blocks allocated, so it honours "no hole"), then — unless
    /// `fast` — writing zeros.
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> VolumeResult<()> {
        self.writable()?;
        check_write(self.size, offset, len)?;
        self.blocking(move |inner| {
            if len > 0 {
                let done = (flags.may_trim && inner.punch(offset, len)?)
                    || inner.zero_range(offset, len)?;
                if !done {
                    if flags.fast {
                        return Err(VolumeError::NotSupported(
                            "this filesystem cannot zero without writing zeros".into(),
                        ));
                    }
                    write_zero_buffers(&inner.file, offset, len)?;
                }
            }
            if flags.fua {
                inner.file.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    /// Starts readahead; a hint, so failures are ignored.
    async fn cache(&self, offset: u64, len: u64) -> VolumeResult<()> {
        check_in_range(self.size, offset, len)?;
        self.blocking(move |inner| {
            if let (Ok(o), Ok(l)) = (off(offset), off(len)) {
                // SAFETY: plain syscall on a descriptor we own; no memory is
                // passed. Returns an error number, which we ignore.
                let _ = unsafe {
                    libc::posix_fadvise(inner.file.as_raw_fd(), o, l, libc::POSIX_FADV_WILLNEED)
                };
            }
            Ok(())
        })
        .await
    }

    async fn extents(&self, offset: u64, len: u64) -> VolumeResult<Vec<Extent>> {
        if len == 0 {
            return Err(VolumeError::Invalid("extents of an empty range".into()));
        }
        check_in_range(self.size, offset, len)?;
        self.blocking(move |inner| {
            let file = &inner.file;
            let Some(runs) = seek_map(file, offset, offset + len, MAX_EXTENT_RUNS)? else {
                return Ok(vec![Extent::new(len, ExtentKind::Data)]);
            };
            let mut out = Vec::new();
            for r in runs {
                if r.data {
                    Extent::push_merged(&mut out, Extent::new(r.len, ExtentKind::Data));
                    continue;
                }
                // Split the hole into truly unallocated parts and allocated
                // parts that read as zeros.
                let mut pos = r.start;
                for (s, n) in allocated_in_hole(file, r.start, r.len) {
                    // Defensive: never go backwards even if the kernel's
                    // list overlapped.
                    let (s, t) = (s.max(pos), s + n);
                    if t > s {
                        Extent::push_merged(&mut out, Extent::new(s - pos, ExtentKind::Hole));
                        Extent::push_merged(&mut out, Extent::new(t - s, ExtentKind::Zero));
                        pos = t;
                    }
                }
                Extent::push_merged(
                    &mut out,
                    Extent::new(r.start + r.len - pos, ExtentKind::Hole),
                );
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const TIB: u64 = 1 << 40;
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn pattern(len: usize, seed: u8) -> Bytes {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect::<Vec<u8>>()
            .into()
    }

    fn new_volume(dir: &tempfile::TempDir, size: u64) -> FileVolume {
        FileVolume::open(dir.path().join("disk.img"), Some(size), false).unwrap()
    }

    async fn assert_zero(v: &FileVolume, offset: u64, len: usize) {
        let got = v.read(offset, len).await.unwrap();
        assert!(
            got.iter().all(|&b| b == 0),
            "range {offset}+{len} is not zero"
        );
    }

    fn allocated(v: &FileVolume) -> u64 {
        std::fs::metadata(v.path()).unwrap().blocks() * 512
    }

    #[tokio::test]
    async fn round_trip_at_various_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let v = new_volume(&dir, 8 * MIB);
        let cases: &[(u64, usize)] = &[
            (0, 1),
            (1, 4095),
            (4093, 10),
            (MIB - 3, 70_000),
            (8 * MIB - 5, 5),
        ];
        for (i, &(off, len)) in cases.iter().enumerate() {
            v.write(off, pattern(len, i as u8), i % 2 == 0)
                .await
                .unwrap();
            assert_eq!(
                v.read(off, len).await.unwrap(),
                pattern(len, i as u8),
                "case {i}"
            );
        }
        v.flush().await.unwrap();
        // Reopen: the data is in the file, not just in this object.
        drop(v);
        let v = FileVolume::open(dir.path().join("disk.img"), None, true).unwrap();
        assert_eq!(v.size(), 8 * MIB);
        assert_eq!(v.read(MIB - 3, 70_000).await.unwrap(), pattern(70_000, 3));
        assert_zero(&v, 2 * MIB, 4096).await;
    }

    #[tokio::test]
    async fn huge_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let v = new_volume(&dir, 6 * TIB);
        assert_eq!(std::fs::metadata(v.path()).unwrap().len(), 6 * TIB);
        let offsets = [4 * GIB + 17, 2 * TIB + 4096, 6 * TIB - 10];
        for (i, &off) in offsets.iter().enumerate() {
            v.write(off, pattern(10, i as u8), false).await.unwrap();
        }
        for (i, &off) in offsets.iter().enumerate() {
            assert_eq!(v.read(off, 10).await.unwrap(), pattern(10, i as u8));
        }
        assert_zero(&v, 3 * TIB, 4096).await;
        assert!(allocated(&v) < 64 * MIB, "file should stay sparse");
        // The region around 2 TiB: hole, data, hole.
        let ext = v.extents(2 * TIB - MIB, 2 * MIB).await.unwrap();
        assert_eq!(ext.len(), 3, "{ext:?}");
        assert_eq!(
            (ext[0].kind, ext[1].kind, ext[2].kind),
            (ExtentKind::Hole, ExtentKind::Data, ExtentKind::Hole)
        );
        assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), 2 * MIB);
        assert!(matches!(
            v.read(6 * TIB - 1, 2).await,
            Err(VolumeError::Invalid(_))
        ));
        assert!(matches!(
            v.write(6 * TIB, pattern(1, 0), false).await,
            Err(VolumeError::NoSpace(_))
        ));
        assert!(matches!(
            v.trim(u64::MAX, 2, false).await,
            Err(VolumeError::NoSpace(_))
        ));
    }

    #[tokio::test]
    async fn trim_punches_holes_that_read_zero() {
        let dir = tempfile::tempdir().unwrap();
        let v = new_volume(&dir, 4 * MIB);
        v.write(0, pattern(4 * MIB as usize, 7), true)
            .await
            .unwrap();
        assert_eq!(
            v.extents(0, 4 * MIB).await.unwrap(),
            vec![Extent::new(4 * MIB, ExtentKind::Data)]
        );
        let before = allocated(&v);

        v.trim(MIB, MIB, true).await.unwrap();
        assert_zero(&v, MIB, MIB as usize).await;
        assert_eq!(
            v.read(MIB - 1, 1).await.unwrap(),
            pattern(4 * MIB as usize, 7).slice(MIB as usize - 1..MIB as usize)
        );
        assert!(allocated(&v) <= before - MIB, "trim should free space");
        assert_eq!(
            v.extents(0, 4 * MIB).await.unwrap(),
            vec![
                Extent::new(MIB, ExtentKind::Data),
                Extent::new(MIB, ExtentKind::Hole),
                Extent::new(2 * MIB, ExtentKind::Data),
            ]
        );

        // Writing into the hole makes it data again.
        v.write(MIB, pattern(4096, 1), false).await.unwrap();
        let ext = v.extents(MIB, 4096).await.unwrap();
        assert_eq!(ext, vec![Extent::new(4096, ExtentKind::Data)]);
    }

    #[tokio::test]
    async fn write_zeroes_with_and_without_may_trim() {
        let dir = tempfile::tempdir().unwrap();
        let v = new_volume(&dir, 4 * MIB);
        v.write(0, pattern(4 * MIB as usize, 3), true)
            .await
            .unwrap();
        let full = allocated(&v);

        // may_trim: the range becomes a hole.
        let trim = ZeroFlags {
            may_trim: true,
            fast: false,
            fua: true,
        };
        v.write_zeroes(0, MIB, trim).await.unwrap();
        assert_zero(&v, 0, MIB as usize).await;
        assert_eq!(
            v.extents(0, MIB).await.unwrap(),
            vec![Extent::new(MIB, ExtentKind::Hole)]
        );

        // No may_trim ("no hole"): reads zero, stays allocated.
        let keep = ZeroFlags {
            may_trim: false,
            fast: false,
            fua: true,
        };
        let after_punch = allocated(&v);
        v.write_zeroes(2 * MIB, MIB, keep).await.unwrap();
        // Extents before reading: on ext4 the range is now an unwritten
        // extent (Zero); reading it caches zero pages, after which the kernel
        // conservatively reports it as data. Either way: never a Hole.
        let ext = v.extents(2 * MIB, MIB).await.unwrap();
        assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), MIB);
        assert!(
            ext.iter().all(|e| e.kind != ExtentKind::Hole),
            "range should stay allocated: {ext:?}"
        );
        assert_zero(&v, 2 * MIB, MIB as usize).await;
        assert_eq!(
            allocated(&v),
            after_punch,
            "NO_HOLE zeroing must not free space"
        );
        assert!(after_punch < full);

        // Unaligned zeroing keeps the neighbours.
        v.write_zeroes(3 * MIB + 1, 10, keep).await.unwrap();
        assert_zero(&v, 3 * MIB + 1, 10).await;
        assert_ne!(v.read(3 * MIB, 1).await.unwrap()[0], 0);
        assert_ne!(v.read(3 * MIB + 11, 1).await.unwrap()[0], 0);

        // read_sparse: zeros as Zero segments, data as Data, sizes add up.
        let segs = v.read_sparse(MIB - 4096, 2 * 4096).await.unwrap();
        assert_eq!(segs.len(), 2, "{segs:?}");
        assert_eq!(segs[0], ReadSegment::Zero(4096));
        assert_eq!(
            segs[1],
            ReadSegment::Data(
                pattern(4 * MIB as usize, 3).slice(MIB as usize..MIB as usize + 4096)
            )
        );
    }

    #[tokio::test]
    async fn fast_zero_is_fast_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let v = new_volume(&dir, 2 * MIB);
        v.write(0, pattern(2 * MIB as usize, 5), false)
            .await
            .unwrap();
        let fast = ZeroFlags {
            may_trim: false,
            fast: true,
            fua: false,
        };
        // The temp dir's filesystem supports fallocate, so this succeeds.
        v.write_zeroes(0, MIB, fast).await.unwrap();
        assert_zero(&v, 0, MIB as usize).await;

        // Pretend the filesystem cannot fallocate: fast must refuse and leave
        // the data alone; slow must still zero.
        v.inner.can_punch.store(false, Ordering::Relaxed);
        v.inner.can_zero_range.store(false, Ordering::Relaxed);
        let err = v.write_zeroes(MIB, 4096, fast).await.unwrap_err();
        assert!(matches!(err, VolumeError::NotSupported(_)), "{err:?}");
        assert_eq!(
            v.read(MIB, 4096).await.unwrap(),
            pattern(2 * MIB as usize, 5).slice(MIB as usize..MIB as usize + 4096)
        );
        let slow = ZeroFlags {
            may_trim: true,
            fast: false,
            fua: true,
        };
        v.write_zeroes(MIB, MIB, slow).await.unwrap();
        assert_zero(&v, MIB, MIB as usize).await;
        // Trim on such a filesystem is a successful no-op.
        v.trim(0, 4096, false).await.unwrap();
    }

    #[tokio::test]
    async fn sparse_read_of_holes_and_tiny_holes() {
        let dir = tempfile::tempdir().unwrap();
        let v = new_volume(&dir, 4 * MIB);
        v.write(MIB, pattern(4096, 2), false).await.unwrap();
        // Hole, data, hole.
        let segs = v.read_sparse(0, 2 * MIB as usize).await.unwrap();
        assert_eq!(
            segs,
            vec![
                ReadSegment::Zero(MIB),
                ReadSegment::Data(pattern(4096, 2)),
                ReadSegment::Zero(MIB - 4096)
            ]
        );
        // A hole smaller than 4 KiB at the edge is read as data.
        let segs = v.read_sparse(MIB - 100, 200).await.unwrap();
        assert_eq!(segs.len(), 1);
        let ReadSegment::Data(d) = &segs[0] else {
            panic!("{segs:?}")
        };
        assert!(d[..100].iter().all(|&b| b == 0));
        assert_eq!(&d[100..], &pattern(4096, 2)[..100]);
        // An all-hole range is one Zero.
        assert_eq!(
            v.read_sparse(3 * MIB, 8192).await.unwrap(),
            vec![ReadSegment::Zero(8192)]
        );
        v.cache(0, 4 * MIB).await.unwrap();
    }

    #[tokio::test]
    async fn open_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/disk.img");

        // Missing, no size: tells you to give one.
        let err = FileVolume::open(&path, None, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("give a size"), "{err}");
        // Missing, read-only: not created.
        assert!(FileVolume::open(&path, Some(MIB), true).is_err());
        assert!(!path.exists());

        // Missing with size: created sparse, parents too.
        let v = FileVolume::open(&path, Some(10 * MIB), false).unwrap();
        assert_eq!(v.size(), 10 * MIB);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 10 * MIB);
        assert!(allocated(&v) < MIB);
        v.write(10 * MIB - 4, pattern(4, 8), true).await.unwrap();
        drop(v);

        // Shrinking is refused and the file untouched.
        let err = FileVolume::open(&path, Some(MIB), false).unwrap_err();
        assert!(err.to_string().contains("shrink"), "{err}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 10 * MIB);

        // Growing read-only is refused; growing writable works and keeps data.
        assert!(FileVolume::open(&path, Some(20 * MIB), true)
            .unwrap_err()
            .to_string()
            .contains("read-only"));
        let v = FileVolume::open(&path, Some(20 * MIB), false).unwrap();
        assert_eq!(v.size(), 20 * MIB);
        assert_eq!(v.read(10 * MIB - 4, 4).await.unwrap(), pattern(4, 8));
        assert_zero(&v, 10 * MIB, 4096).await;
        drop(v);

        // Same size and no size both open at the current length.
        assert_eq!(
            FileVolume::open(&path, Some(20 * MIB), false)
                .unwrap()
                .size(),
            20 * MIB
        );
        assert_eq!(
            FileVolume::open(&path, None, false).unwrap().size(),
            20 * MIB
        );

        // A directory is not an image.
        let err = FileVolume::open(dir.path(), None, true).unwrap_err();
        assert!(err.to_string().contains("directory"), "{err}");
    }

    #[tokio::test]
    async fn read_only_refuses_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro.img");
        FileVolume::open(&path, Some(MIB), false)
            .unwrap()
            .write(0, pattern(4, 1), true)
            .await
            .unwrap();
        let v = FileVolume::open(&path, None, true).unwrap();
        let caps = v.capabilities();
        assert!(caps.read_only && !caps.can_trim && !caps.can_zero && !caps.can_fast_zero);
        assert!(matches!(
            v.write(0, pattern(4, 2), false).await,
            Err(VolumeError::ReadOnly)
        ));
        assert!(matches!(
            v.trim(0, 4096, false).await,
            Err(VolumeError::ReadOnly)
        ));
        assert!(matches!(
            v.write_zeroes(0, 4096, ZeroFlags::default()).await,
            Err(VolumeError::ReadOnly)
        ));
        v.flush().await.unwrap();
        assert_eq!(v.read(0, 4).await.unwrap(), pattern(4, 1));
        // Really opened O_RDONLY: a write through the descriptor fails.
        assert!(v.inner.file.write_at(b"x", 0).is_err());
    }
}
