//! A persistent bitmap with one bit per fixed-size region of a volume.
//!
//! The mirror uses it for "regions the replica has missed", the clone for
//! "regions not yet copied from the source". Both need the same three
//! things: fast in-memory tests and updates on the I/O path, iteration for
//! the background copier, and a way to make the current state durable
//! before acknowledging something that depends on it.
//!
//! On disk: a 4 KiB header (magic, format version, volume size, region
//! size) followed by the bits as little-endian `u64` words. Only the 4 KiB
//! pages that changed since the last [`RegionBitmap::persist`] are
//! rewritten, then `fdatasync`. Persists are serialised and each one
//! snapshots the bits under the same lock, so a later persist never writes
//! an older state over a newer one; a caller whose `persist` returns knows
//! every bit it changed before calling is on disk.
//!
//! A page write is not atomic against power loss, but it is against a crash
//! of the server process, which is the failure this file is designed for.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

const MAGIC: &[u8; 8] = b"LWRBMAP1";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 4096;
const PAGE_BYTES: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE_BYTES / 8;

/// The value every bit has in a newly created bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    Clear,
    Set,
}

/// One bit per region, in memory and in a file. See the module docs.
pub struct RegionBitmap {
    path: PathBuf,
    volume_size: u64,
    region_size: u64,
    regions: u64,
    created: bool,
    bits: Mutex<Bits>,
    /// Held for the whole of a persist: see the module docs.
    persist_lock: Mutex<File>,
}

/// Changed pages taken by [`RegionBitmap::snapshot`], not yet on disk.
#[derive(Debug)]
pub struct Snapshot {
    pages: Vec<(usize, Vec<u8>)>,
}

impl Snapshot {
    /// True when nothing had changed.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}

struct Bits {
    words: Vec<u64>,
    set: u64,
    dirty_pages: BTreeSet<usize>,
}

impl RegionBitmap {
    /// Open the bitmap at `path`, or create it with every bit `fill` when
    /// the file does not exist. An existing file must describe the same
    /// volume size and region size; otherwise this fails with a message
    /// naming the file (the bitmap belongs to something else).
    pub fn open(path: &Path, volume_size: u64, region_size: u64, fill: Fill) -> io::Result<RegionBitmap> {
        if region_size == 0 || !region_size.is_power_of_two() {
            return Err(invalid(format!("region size {region_size} must be a power of two")));
        }
        let regions = volume_size.div_ceil(region_size);
        let nwords = usize::try_from(regions.div_ceil(64))
            .map_err(|_| invalid(format!("{regions} regions do not fit in memory")))?;
        let (file, words, created) = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => {
                let words = load(&file, path, volume_size, region_size, nwords)?;
                (file, words, false)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let words = initial_words(regions, nwords, fill);
                let file = create(path, volume_size, region_size, &words)?;
                (file, words, true)
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        let set = words.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok(RegionBitmap {
            path: path.to_owned(),
            volume_size,
            region_size,
            regions,
            created,
            bits: Mutex::new(Bits { words, set, dirty_pages: BTreeSet::new() }),
            persist_lock: Mutex::new(file),
        })
    }

    /// The file this bitmap lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when [`open`](Self::open) created the file (nothing was known
    /// before), false when it loaded an existing one.
    pub fn created(&self) -> bool {
        self.created
    }

    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }

    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    /// Number of regions (the last one may be shorter than `region_size`).
    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// The regions that bytes `[offset, offset + len)` touch (clamped to
    /// the volume).
    pub fn regions_touching(&self, offset: u64, len: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(self.volume_size);
        if offset >= end {
            return 0..0;
        }
        offset / self.region_size..end.div_ceil(self.region_size)
    }

    /// The regions that bytes `[offset, offset + len)` cover completely.
    /// The short last region counts as covered when the range reaches the
    /// end of the volume.
    pub fn regions_covered(&self, offset: u64, len: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(self.volume_size);
        let first = offset.div_ceil(self.region_size);
        let last = if end == self.volume_size { self.regions } else { end / self.region_size };
        if first >= last {
            return 0..0;
        }
        first..last
    }

    /// Byte range of one region.
    pub fn region_bytes(&self, region: u64) -> Range<u64> {
        let start = region * self.region_size;
        start..(start + self.region_size).min(self.volume_size)
    }

    pub fn get(&self, region: u64) -> bool {
        if region >= self.regions {
            return false;
        }
        let bits = self.bits.lock();
        bits.words[(region / 64) as usize] & (1 << (region % 64)) != 0
    }

    /// True when any region in `regions` is set.
    pub fn any(&self, regions: Range<u64>) -> bool {
        self.next_with(regions.start, true).is_some_and(|r| r < regions.end)
    }

    /// True when every region in `regions` is set.
    pub fn all(&self, regions: Range<u64>) -> bool {
        self.next_with(regions.start, false).is_none_or(|r| r >= regions.end)
    }

    /// Number of set regions.
    pub fn count(&self) -> u64 {
        self.bits.lock().set
    }

    /// The first set region at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        self.next_with(from, true)
    }

    /// The first clear region at or after `from`.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        self.next_with(from, false)
    }

    /// Set `regions` in memory; returns how many changed. Call
    /// [`persist`](Self::persist) to make it durable.
    pub fn set(&self, regions: Range<u64>) -> u64 {
        self.update(regions, true)
    }

    /// Clear `regions` in memory; returns how many changed.
    pub fn clear(&self, regions: Range<u64>) -> u64 {
        self.update(regions, false)
    }

    /// True when something changed since the last persist.
    pub fn needs_persist(&self) -> bool {
        !self.bits.lock().dirty_pages.is_empty()
    }

    /// Write the changed pages and `fdatasync`. Blocking: from async code
    /// use [`persist_async`](Self::persist_async).
    pub fn persist(&self) -> io::Result<()> {
        let file = self.persist_lock.lock();
        let pages: Vec<(usize, Vec<u8>)> = {
            let mut bits = self.bits.lock();
            let dirty = std::mem::take(&mut bits.dirty_pages);
            dirty.into_iter().map(|p| (p, page_bytes(&bits.words, p))).collect()
        };
        if pages.is_empty() {
            return Ok(());
        }
        let result = pages
            .iter()
            .try_for_each(|(p, bytes)| file.write_all_at(bytes, HEADER_LEN + (*p * PAGE_BYTES) as u64))
            .and_then(|()| file.sync_data());
        if result.is_err() {
            // Try again next time rather than believe the pages are on disk.
            self.bits.lock().dirty_pages.extend(pages.iter().map(|(p, _)| *p));
        }
        result.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))
    }

    /// Take the pages changed since the last persist, as they are now, for
    /// [`write_snapshot`](Self::write_snapshot). Splitting a persist in two
    /// lets a caller make something else durable in between: the clone
    /// snapshots its "hydrated" bits, flushes the local store, then writes
    /// the snapshot, so no bit reaches the disk before the data it vouches
    /// for. Callers that split must serialise snapshot-to-write themselves,
    /// or an older page could be written over a newer one.
    pub fn snapshot(&self) -> Snapshot {
        let mut bits = self.bits.lock();
        let dirty = std::mem::take(&mut bits.dirty_pages);
        Snapshot { pages: dirty.into_iter().map(|p| (p, page_bytes(&bits.words, p))).collect() }
    }

    /// Write a [`snapshot`](Self::snapshot) and `fdatasync`. On failure the
    /// pages count as changed again, so the next persist retries them.
    pub fn write_snapshot(&self, snapshot: Snapshot) -> io::Result<()> {
        let file = self.persist_lock.lock();
        if snapshot.pages.is_empty() {
            return Ok(());
        }
        let result = snapshot
            .pages
            .iter()
            .try_for_each(|(p, bytes)| file.write_all_at(bytes, HEADER_LEN + (*p * PAGE_BYTES) as u64))
            .and_then(|()| file.sync_data());
        if result.is_err() {
            self.abandon_snapshot(snapshot);
        }
        result.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))
    }

    /// Give up on writing a [`snapshot`](Self::snapshot): its pages count as
    /// changed again.
    pub fn abandon_snapshot(&self, snapshot: Snapshot) {
        self.bits.lock().dirty_pages.extend(snapshot.pages.iter().map(|(p, _)| *p));
    }

    /// [`persist`](Self::persist) on the blocking thread pool.
    pub async fn persist_async(self: &Arc<Self>) -> io::Result<()> {
        if !self.needs_persist() {
            // A persist in progress may still hold our bits: wait for it by
            // taking its lock, which costs nothing when none is running.
            let me = Arc::clone(self);
            return tokio::task::spawn_blocking(move || drop(me.persist_lock.lock()))
                .await
                .map_err(io::Error::other);
        }
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || me.persist()).await.map_err(io::Error::other)?
    }

    fn update(&self, regions: Range<u64>, value: bool) -> u64 {
        let end = regions.end.min(self.regions);
        let mut bits = self.bits.lock();
        let mut changed = 0u64;
        let mut r = regions.start;
        while r < end {
            let w = (r / 64) as usize;
            let lo = r % 64;
            let hi = (end - r + lo).min(64);
            let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
            let old = bits.words[w];
            let new = if value { old | mask } else { old & !mask };
            if new != old {
                let delta = u64::from((old ^ new).count_ones());
                changed += delta;
                bits.words[w] = new;
                bits.dirty_pages.insert(w / WORDS_PER_PAGE);
            }
            r += hi - lo;
        }
        if value {
            bits.set += changed;
        } else {
            bits.set -= changed;
        }
        changed
    }

    fn next_with(&self, from: u64, value: bool) -> Option<u64> {
        if from >= self.regions {
            return None;
        }
        let bits = self.bits.lock();
        let mut w = (from / 64) as usize;
        let flip = if value { 0 } else { u64::MAX };
        let mut word = (bits.words[w] ^ flip) & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let r = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (r < self.regions).then_some(r);
            }
            w += 1;
            if w >= bits.words.len() {
                return None;
            }
            word = bits.words[w] ^ flip;
        }
    }
}

impl std::fmt::Debug for RegionBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionBitmap")
            .field("path", &self.path)
            .field("region_size", &self.region_size)
            .field("regions", &self.regions)
            .field("set", &self.count())
            .finish()
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn initial_words(regions: u64, nwords: usize, fill: Fill) -> Vec<u64> {
    let mut words = vec![0u64; nwords];
    if fill == Fill::Set {
        words.fill(u64::MAX);
        let tail = regions % 64;
        if tail != 0 {
            words[nwords - 1] = (1u64 << tail) - 1;
        }
    }
    words
}

fn header(volume_size: u64, region_size: u64) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&volume_size.to_le_bytes());
    h[24..32].copy_from_slice(&region_size.to_le_bytes());
    h
}

fn page_bytes(words: &[u64], page: usize) -> Vec<u8> {
    let start = page * WORDS_PER_PAGE;
    let end = (start + WORDS_PER_PAGE).min(words.len());
    words[start..end].iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Create the file under a temporary name and rename it into place, so a
/// crash during creation never leaves a half-written bitmap behind.
fn create(path: &Path, volume_size: u64, region_size: u64, words: &[u64]) -> io::Result<File> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let tmp = path.with_extension("tmp-new");
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp).map_err(named)?;
    file.write_all_at(&header(volume_size, region_size), 0).map_err(named)?;
    let body: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    file.write_all_at(&body, HEADER_LEN).map_err(named)?;
    file.sync_all().map_err(named)?;
    std::fs::rename(&tmp, path).map_err(named)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir).and_then(|d| d.sync_all()).map_err(named)?;
    }
    Ok(file)
}

fn load(file: &File, path: &Path, volume_size: u64, region_size: u64, nwords: usize) -> io::Result<Vec<u64>> {
    let mut h = [0u8; 32];
    file.read_exact_at(&mut h, 0)
        .map_err(|_| invalid(format!("{}: too short to be a longwire region bitmap", path.display())))?;
    if &h[..8] != MAGIC {
        return Err(invalid(format!("{}: not a longwire region bitmap (bad magic)", path.display())));
    }
    let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
    if version != VERSION {
        return Err(invalid(format!("{}: bitmap format version {version}, this longwire reads {VERSION}", path.display())));
    }
    let expected = header(volume_size, region_size);
    if h != expected {
        let vs = u64::from_le_bytes(h[16..24].try_into().unwrap());
        let rs = u64::from_le_bytes(h[24..32].try_into().unwrap());
        return Err(invalid(format!(
            "{}: bitmap is for a {vs}-byte volume with {rs}-byte regions, but the volume is {volume_size} bytes \
             with {region_size}-byte regions; it belongs to another volume or configuration (move it away to start over)",
            path.display()
        )));
    }
    let mut body = vec![0u8; nwords * 8];
    file.read_exact_at(&mut body, HEADER_LEN)
        .map_err(|_| invalid(format!("{}: bitmap file is truncated", path.display())))?;
    Ok(body.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn set_clear_count_and_search() {
        let dir = tempfile::tempdir().unwrap();
        let b = RegionBitmap::open(&dir.path().join("b"), 10 * MIB + 1, 64 << 10, Fill::Clear).unwrap();
        assert!(b.created());
        assert_eq!(b.regions(), 161);
        assert_eq!(b.set(3..130), 127);
        assert_eq!(b.set(100..140), 10);
        assert_eq!(b.count(), 137);
        assert!(b.get(3) && b.get(139) && !b.get(2) && !b.get(140));
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_clear(3), Some(140));
        assert_eq!(b.clear(64..128), 64);
        assert_eq!(b.next_set(10), Some(10));
        assert_eq!(b.next_set(64), Some(128));
        assert!(b.any(60..70) && !b.all(60..70) && b.all(3..64) && !b.any(64..128));
        assert_eq!(b.set(160..1000), 1, "clamped to the last region");
        assert_eq!(b.next_set(161), None);
    }

    #[test]
    fn region_arithmetic() {
        let dir = tempfile::tempdir().unwrap();
        let b = RegionBitmap::open(&dir.path().join("b"), 100_000, 4096, Fill::Clear).unwrap();
        assert_eq!(b.regions(), 25);
        assert_eq!(b.regions_touching(4095, 2), 0..2);
        assert_eq!(b.regions_covered(4095, 8192), 1..2);
        assert_eq!(b.regions_covered(4095, 8194), 1..3);
        assert_eq!(b.regions_covered(4096 * 24, 100_000 - 4096 * 24), 24..25, "short tail region");
        assert_eq!(b.regions_covered(1, 10), 0..0);
        assert_eq!(b.region_bytes(24), 98304..100_000);
    }

    #[test]
    fn persists_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        {
            let b = RegionBitmap::open(&path, 1 << 40, 64 << 10, Fill::Set).unwrap();
            assert_eq!(b.count(), (1 << 40) / (64 << 10));
            b.clear(0..5);
            b.clear(1_000_000..1_000_010);
            b.persist().unwrap();
            b.set(2..3); // not persisted: lost on reopen
        }
        let b = RegionBitmap::open(&path, 1 << 40, 64 << 10, Fill::Clear).unwrap();
        assert!(!b.created());
        assert_eq!(b.count(), (1 << 40) / (64 << 10) - 15);
        assert_eq!(b.next_set(0), Some(5));
        assert_eq!(b.next_clear(5), Some(1_000_000));
    }

    #[test]
    fn refuses_a_bitmap_of_another_volume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        RegionBitmap::open(&path, MIB, 4096, Fill::Clear).unwrap();
        let err = RegionBitmap::open(&path, 2 * MIB, 4096, Fill::Clear).unwrap_err();
        assert!(err.to_string().contains("belongs to another volume"), "{err}");
        std::fs::write(&path, b"garbage").unwrap();
        let err = RegionBitmap::open(&path, MIB, 4096, Fill::Clear).unwrap_err();
        assert!(err.to_string().contains("too short"), "{err}");
    }

    #[tokio::test]
    async fn concurrent_persists_never_lose_a_bit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let b = Arc::new(RegionBitmap::open(&path, 64 * MIB, 4096, Fill::Clear).unwrap());
        let tasks: Vec<_> = (0..64u64)
            .map(|i| {
                let b = Arc::clone(&b);
                tokio::spawn(async move {
                    b.set(i * 200..i * 200 + 1);
                    b.persist_async().await.unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        drop(b);
        let b = RegionBitmap::open(&path, 64 * MIB, 4096, Fill::Clear).unwrap();
        assert_eq!(b.count(), 64);
    }
    #[test]
    fn snapshots_hold_only_the_bits_set_before_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let b = RegionBitmap::open(&path, 64 * MIB, 4096, Fill::Clear).unwrap();
        b.set(0..10);
        let snap = b.snapshot();
        assert!(!snap.is_empty() && !b.needs_persist());
        b.set(10..20);
        b.write_snapshot(snap).unwrap();
        assert!(b.needs_persist(), "bits set after the snapshot still need a persist");
        let snap = b.snapshot();
        b.abandon_snapshot(snap);
        assert!(b.needs_persist(), "an abandoned snapshot's pages are dirty again");
        drop(b);
        // The bits set after the snapshot were never written.
        let b = RegionBitmap::open(&path, 64 * MIB, 4096, Fill::Clear).unwrap();
        assert_eq!(b.count(), 10);
    }
}
