//! The local write-back cache, and what is known about every chunk.
//!
//! One directory per volume:
//!
//! ```text
//! DIR/volume      bucket, prefix and volume id this cache belongs to
//! DIR/lock        flock'ed while a server uses the directory
//! DIR/dirty/IDX   a chunk written here and not yet uploaded (empty: all zero,
//!                 delete the object)
//! DIR/clean/IDX   a copy of what the bucket holds, kept for reads (evictable)
//! ```
//!
//! A dirty file comes into being whole: it is prepared as `IDX.tmp` (a
//! full new chunk, the clean copy moved over, or a sparse file of zeros)
//! and renamed into place, so a crash never leaves half a chunk file.
//! Later writes to a dirty chunk are a `pwrite` of just their bytes into
//! its file, so a small write costs a small write, not a chunk. Either
//! way the file is complete before the write is acknowledged, and a
//! completed write survives the server being killed (the kernel holds the
//! page), so acknowledged writes outlive SIGKILL and are uploaded at the
//! next start; a write cut off by the kill may be partly there, as on a
//! disk. FLUSH and FUA do not fsync here: they upload, which makes the
//! data durable in the bucket (a power loss may lose acknowledged writes
//! that no FLUSH covered, as on any disk with a volatile cache).
//!
//! Clean files are dropped at start (the bucket may have changed while we
//! were away); dirty files are replayed. The bound (`cache_size`) covers
//! dirty and clean chunks; clean ones are evicted least recently used
//! first, and writers of chunks not dirty yet wait for uploads when dirty
//! chunks alone fill it.
//!
//! The in-memory state keeps, per chunk, whether it is dirty (with a
//! generation that every write bumps, so an upload knows whether what it
//! sent is still the latest, and when it was first and last written, so
//! the uploader can leave a busy chunk alone for a moment) or clean, and
//! the set of chunks present in the bucket. Callers serialize changes to
//! one chunk with the engine's per-chunk locks, so an upload reads a dirty
//! file between writes, never during one; this module only keeps the files
//! and the state in step. Whether a written chunk became all zeros is
//! found out when it is read for upload (its object is then deleted)
//! rather than by reading it back on every write.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::codec;

/// What the cache holds for one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// Newer than the bucket. `zero`: the chunk is known to be all zeros
    /// (its file is empty, its object is to be deleted); `gen` changes on
    /// every write; `since`: when it became dirty, `last`: its last write.
    Dirty {
        gen: u64,
        zero: bool,
        since: Instant,
        last: Instant,
    },
    /// Same as the bucket; `tick` orders eviction.
    Clean { tick: u64 },
}

/// Where to read a chunk from, as far as the cache knows.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The cache has it in this file.
    File(PathBuf),
    /// Dirty and all zeros, or absent from the bucket: zeros.
    Zero,
    /// Only the bucket has it.
    Remote,
}

/// A dirty chunk as an upload takes it.
pub struct DirtySnapshot {
    pub gen: u64,
    /// None: the chunk is all zero (delete its object).
    pub data: Option<Vec<u8>>,
}

#[derive(Default)]
struct State {
    entries: BTreeMap<u64, Entry>,
    /// Chunks whose object exists in the bucket.
    remote: BTreeSet<u64>,
    /// Clean chunks by last use, oldest first.
    lru: BTreeMap<u64, u64>,
    dirty_bytes: u64,
    clean_bytes: u64,
    tick: u64,
    gen: u64,
}

pub struct Cache {
    dir: PathBuf,
    chunk: u64,
    limit: u64,
    state: Mutex<State>,
    /// Keeps the flock on `DIR/lock`.
    _lock: File,
}

impl Cache {
    /// Open (creating) the cache directory for the volume `identity`
    /// (bucket, prefix, volume id), replaying dirty chunks left by an
    /// earlier run. Blocking.
    pub fn open(
        dir: &Path,
        identity: &str,
        chunk: u64,
        limit: u64,
        remote: BTreeSet<u64>,
    ) -> Result<Cache, String> {
        let ctx =
            |what: &str, e: io::Error| format!("cache directory {}: {what}: {e}", dir.display());
        fs::create_dir_all(dir.join("dirty")).map_err(|e| ctx("cannot create it", e))?;
        fs::create_dir_all(dir.join("clean")).map_err(|e| ctx("cannot create it", e))?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(|e| ctx("cannot open its lock file", e))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(format!(
                "cache directory {} is in use by another longwire process; give each server its own cache=DIR",
                dir.display()
            ));
        }
        let id_path = dir.join("volume");
        match fs::read_to_string(&id_path) {
            Ok(found) if found.trim() == identity => {}
            Ok(found) => {
                let dirty = fs::read_dir(dir.join("dirty"))
                    .map(|d| d.count())
                    .unwrap_or(0);
                if dirty > 0 {
                    return Err(format!(
                        "cache directory {} holds {dirty} unsaved chunks of another volume ({}); \
                         open that volume to upload them, or delete the directory to discard them",
                        dir.display(),
                        found.trim()
                    ));
                }
                fs::write(&id_path, identity).map_err(|e| ctx("cannot write", e))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::write(&id_path, identity).map_err(|e| ctx("cannot write", e))?
            }
            Err(e) => return Err(ctx("cannot read its volume file", e)),
        }
        // Clean copies may be stale now; leftover temporaries are unacknowledged writes.
        for sub in ["clean", "dirty"] {
            for entry in fs::read_dir(dir.join(sub)).map_err(|e| ctx("cannot list it", e))? {
                let entry = entry.map_err(|e| ctx("cannot list it", e))?;
                let name = entry.file_name();
                if sub == "clean" || name.to_string_lossy().ends_with(".tmp") {
                    fs::remove_file(entry.path()).map_err(|e| ctx("cannot clean up", e))?;
                }
            }
        }
        let mut state = State {
            remote,
            ..State::default()
        };
        for entry in fs::read_dir(dir.join("dirty")).map_err(|e| ctx("cannot list it", e))? {
            let entry = entry.map_err(|e| ctx("cannot list it", e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(index) = u64::from_str_radix(&name, 16) else {
                continue;
            };
            let len = entry
                .metadata()
                .map_err(|e| ctx("cannot stat a chunk file", e))?
                .len();
            if len != 0 && len != chunk {
                return Err(format!(
                    "cache directory {}: dirty chunk file {name} is {len} bytes, not 0 or {chunk}; \
                     the cache is damaged (delete the file to drop that chunk's unsaved data)",
                    dir.display()
                ));
            }
            state.gen += 1;
            let gen = state.gen;
            let now = Instant::now();
            state.entries.insert(
                index,
                Entry::Dirty {
                    gen,
                    zero: len == 0,
                    since: now,
                    last: now,
                },
            );
            state.dirty_bytes += len;
        }
        Ok(Cache {
            dir: dir.to_path_buf(),
            chunk,
            limit,
            state: Mutex::new(state),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn file(&self, dirty: bool, index: u64) -> PathBuf {
        self.dir
            .join(if dirty { "dirty" } else { "clean" })
            .join(format!("{index:016x}"))
    }

    /// Where chunk `index` can be read from; marks a clean hit as used.
    pub fn lookup(&self, index: u64) -> Lookup {
        let mut st = self.state.lock();
        match st.entries.get(&index).copied() {
            Some(Entry::Dirty { zero: true, .. }) => Lookup::Zero,
            Some(Entry::Dirty { .. }) => Lookup::File(self.file(true, index)),
            Some(Entry::Clean { tick }) => {
                st.tick += 1;
                let t = st.tick;
                st.lru.remove(&tick);
                st.lru.insert(t, index);
                st.entries.insert(index, Entry::Clean { tick: t });
                Lookup::File(self.file(false, index))
            }
            None if st.remote.contains(&index) => Lookup::Remote,
            None => Lookup::Zero,
        }
    }

    /// True when only the bucket has chunk `index` (a read would download it).
    pub fn lookup_is_remote(&self, index: u64) -> bool {
        let st = self.state.lock();
        !st.entries.contains_key(&index) && st.remote.contains(&index)
    }

    /// Read a whole chunk file; None if it vanished (evicted or moved by
    /// an upload meanwhile: look it up again).
    pub fn read_file(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        let mut buf = Vec::with_capacity(self.chunk as usize);
        match File::open(path) {
            Ok(mut f) => {
                f.read_to_end(&mut buf)?;
                if buf.len() as u64 != self.chunk {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "cache file {} is {} bytes, not {}",
                            path.display(),
                            buf.len(),
                            self.chunk
                        ),
                    ));
                }
                Ok(Some(buf))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Read `buf.len()` bytes at `start` of a chunk file, so a small read
    /// of a cached chunk costs a small read; false if the file vanished
    /// (evicted or moved by an upload meanwhile: look it up again). No
    /// lock is taken: the open file stays the same chunk version even if
    /// it is renamed or replaced meanwhile, and a write racing the read
    /// may or may not be seen, as on a disk. An empty file is a dirty
    /// chunk zeroed after the lookup, which reads as zeros; any other
    /// short file is damage.
    pub fn read_range(&self, path: &Path, start: u64, buf: &mut [u8]) -> io::Result<bool> {
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        match f.read_exact_at(buf, start) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                let len = f.metadata()?.len();
                if len == 0 {
                    buf.fill(0);
                    return Ok(true);
                }
                Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "cache file {} is {len} bytes, not {}",
                        path.display(),
                        self.chunk
                    ),
                ))
            }
            Err(e) => Err(e),
        }
    }

    fn write_atomic(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        drop(f);
        fs::rename(&tmp, path)
    }

    /// Chunk `index` now holds `data` (None: all zeros). Blocking; the
    /// caller holds the chunk's lock.
    pub fn put_dirty(&self, index: u64, data: Option<&[u8]>) -> io::Result<()> {
        self.write_atomic(&self.file(true, index), data.unwrap_or(&[]))?;
        let mut st = self.state.lock();
        let since = match st.entries.get(&index).copied() {
            Some(Entry::Clean { tick }) => {
                st.lru.remove(&tick);
                st.clean_bytes -= self.chunk;
                let _ = fs::remove_file(self.file(false, index));
                None
            }
            Some(Entry::Dirty { zero, since, .. }) => {
                if !zero {
                    st.dirty_bytes -= self.chunk;
                }
                Some(since)
            }
            None => None,
        };
        self.mark_dirty(&mut st, index, data.is_none(), since);
        if data.is_some() {
            st.dirty_bytes += self.chunk;
        }
        self.evict(&mut st);
        Ok(())
    }

    /// Record a write to chunk `index`: a new generation, written now.
    fn mark_dirty(&self, st: &mut State, index: u64, zero: bool, since: Option<Instant>) {
        st.gen += 1;
        let gen = st.gen;
        let now = Instant::now();
        st.entries.insert(
            index,
            Entry::Dirty {
                gen,
                zero,
                since: since.unwrap_or(now),
                last: now,
            },
        );
    }

    /// Write `data` at byte `start` of chunk `index` from what the cache
    /// holds: in place into its dirty file, or into a new dirty file made
    /// from its clean copy or from zeros. False (nothing done) when only
    /// the bucket has the chunk: load it and use [`Cache::put_dirty`].
    /// Blocking; the caller holds the chunk's lock.
    pub fn write_local(&self, index: u64, start: u64, data: &[u8]) -> io::Result<bool> {
        let dirty = self.file(true, index);
        let mut st = self.state.lock();
        let entry = st.entries.get(&index).copied();
        match entry {
            Some(Entry::Dirty {
                zero: false, since, ..
            }) => {
                drop(st);
                File::options()
                    .write(true)
                    .open(&dirty)?
                    .write_all_at(data, start)?;
                let mut st = self.state.lock();
                self.mark_dirty(&mut st, index, false, Some(since));
                Ok(true)
            }
            Some(Entry::Clean { tick }) => {
                // Move the clean copy aside under the state lock, so
                // eviction cannot delete it meanwhile; until the dirty file
                // is in place the chunk reads from the bucket (behind our lock).
                let tmp = dirty.with_extension("tmp");
                st.lru.remove(&tick);
                st.entries.remove(&index);
                st.clean_bytes -= self.chunk;
                let clean = self.file(false, index);
                if let Err(e) = fs::rename(&clean, &tmp) {
                    let _ = fs::remove_file(&clean);
                    return Err(e);
                }
                drop(st);
                self.finish_new_dirty(index, &tmp, start, data)?;
                Ok(true)
            }
            None if st.remote.contains(&index) => Ok(false),
            Some(Entry::Dirty { zero: true, .. }) | None => {
                if codec::is_zero(data) {
                    return Ok(true); // zeros already
                }
                drop(st);
                let tmp = dirty.with_extension("tmp");
                File::create(&tmp)?.set_len(self.chunk)?;
                self.finish_new_dirty(index, &tmp, start, data)?;
                Ok(true)
            }
        }
    }

    /// Write `data` into the chunk file prepared at `tmp` and rename it
    /// into place as chunk `index`'s dirty file.
    fn finish_new_dirty(&self, index: u64, tmp: &Path, start: u64, data: &[u8]) -> io::Result<()> {
        let done = File::options()
            .write(true)
            .open(tmp)
            .and_then(|f| f.write_all_at(data, start))
            .and_then(|()| fs::rename(tmp, self.file(true, index)));
        if let Err(e) = done {
            let _ = fs::remove_file(tmp);
            return Err(e);
        }
        let mut st = self.state.lock();
        let since = match st.entries.get(&index).copied() {
            Some(Entry::Dirty { since, .. }) => Some(since),
            _ => None,
        };
        self.mark_dirty(&mut st, index, false, since);
        st.dirty_bytes += self.chunk;
        self.evict(&mut st);
        Ok(())
    }

    /// Keep a downloaded chunk for later reads, if there is room. Blocking;
    /// the caller holds the chunk's lock.
    pub fn put_clean(&self, index: u64, data: &[u8]) {
        {
            let mut st = self.state.lock();
            if st.entries.contains_key(&index) {
                return;
            }
            if st.dirty_bytes + st.clean_bytes + self.chunk > self.limit {
                self.evict_to(&mut st, self.limit.saturating_sub(self.chunk));
                if st.dirty_bytes + st.clean_bytes + self.chunk > self.limit {
                    return;
                }
            }
            // Reserve the space before writing; the entry follows the file.
            st.clean_bytes += self.chunk;
        }
        let ok = self.write_atomic(&self.file(false, index), data).is_ok();
        let mut st = self.state.lock();
        if ok && !st.entries.contains_key(&index) {
            st.tick += 1;
            let t = st.tick;
            st.lru.insert(t, index);
            st.entries.insert(index, Entry::Clean { tick: t });
        } else {
            st.clean_bytes -= self.chunk;
            if ok {
                let _ = fs::remove_file(self.file(false, index));
            }
        }
    }

    fn evict(&self, st: &mut State) {
        self.evict_to(st, self.limit);
    }

    /// Drop clean chunks, oldest first, until the cache uses at most `target`.
    fn evict_to(&self, st: &mut State, target: u64) {
        while st.dirty_bytes + st.clean_bytes > target {
            let Some((&tick, &index)) = st.lru.iter().next() else {
                break;
            };
            st.lru.remove(&tick);
            st.entries.remove(&index);
            st.clean_bytes -= self.chunk;
            let _ = fs::remove_file(self.file(false, index));
        }
    }

    /// The current contents of dirty chunk `index`, for uploading; None if
    /// it is not dirty. Blocking; the caller holds the chunk's lock.
    pub fn snapshot(&self, index: u64) -> io::Result<Option<DirtySnapshot>> {
        let entry = self.state.lock().entries.get(&index).copied();
        match entry {
            Some(Entry::Dirty {
                gen, zero: true, ..
            }) => Ok(Some(DirtySnapshot { gen, data: None })),
            Some(Entry::Dirty {
                gen, zero: false, ..
            }) => {
                let path = self.file(true, index);
                match self.read_file(&path)? {
                    Some(d) if codec::is_zero(&d) => Ok(Some(DirtySnapshot { gen, data: None })),
                    Some(d) => Ok(Some(DirtySnapshot { gen, data: Some(d) })),
                    None => Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{} vanished", path.display()),
                    )),
                }
            }
            _ => Ok(None),
        }
    }

    /// The bucket now holds generation `gen` of chunk `index` (`present`:
    /// as an object; otherwise deleted). Unless the chunk was rewritten
    /// meanwhile it becomes clean. Blocking; the caller holds the lock.
    pub fn uploaded(&self, index: u64, gen: u64, present: bool) {
        let mut st = self.state.lock();
        if present {
            st.remote.insert(index);
        } else {
            st.remote.remove(&index);
        }
        let zero = match st.entries.get(&index).copied() {
            Some(Entry::Dirty { gen: g, zero, .. }) if g == gen => zero,
            _ => return,
        };
        let dirty = self.file(true, index);
        if present {
            st.dirty_bytes -= self.chunk;
            if fs::rename(&dirty, self.file(false, index)).is_ok() {
                st.clean_bytes += self.chunk;
                st.tick += 1;
                let t = st.tick;
                st.lru.insert(t, index);
                st.entries.insert(index, Entry::Clean { tick: t });
            } else {
                let _ = fs::remove_file(&dirty);
                st.entries.remove(&index);
            }
            self.evict(&mut st);
        } else {
            // Known zero (an empty file), or found all zero at upload.
            if !zero {
                st.dirty_bytes -= self.chunk;
            }
            let _ = fs::remove_file(&dirty);
            st.entries.remove(&index);
        }
    }

    /// Dirty chunks, oldest write first.
    pub fn dirty(&self) -> Vec<u64> {
        let st = self.state.lock();
        let mut v: Vec<(u64, u64)> = st
            .entries
            .iter()
            .filter_map(|(&i, e)| match e {
                Entry::Dirty { gen, .. } => Some((*gen, i)),
                _ => None,
            })
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, i)| i).collect()
    }

    /// Dirty chunks due for upload, oldest write first: those left alone
    /// for `quiet`, and those dirty for `max_age` however busy they are.
    pub fn due(&self, quiet: Duration, max_age: Duration) -> Vec<u64> {
        let now = Instant::now();
        let st = self.state.lock();
        let mut v: Vec<(u64, u64)> = st
            .entries
            .iter()
            .filter_map(|(&i, e)| match e {
                Entry::Dirty {
                    gen, since, last, ..
                } if now.duration_since(*last) >= quiet
                    || now.duration_since(*since) >= max_age =>
                {
                    Some((*gen, i))
                }
                _ => None,
            })
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, i)| i).collect()
    }

    /// Chunks in `[first, last]` that read as data: dirty non-zero, or in
    /// the bucket and not dirty-zero. In order, at most `max`.
    pub fn allocated(&self, first: u64, last: u64, max: usize) -> Vec<u64> {
        let st = self.state.lock();
        let mut out = BTreeSet::new();
        for (&i, e) in st.entries.range(first..=last) {
            if matches!(e, Entry::Dirty { zero: false, .. }) {
                out.insert(i);
            }
        }
        for &i in st.remote.range(first..=last) {
            if !matches!(st.entries.get(&i), Some(Entry::Dirty { zero: true, .. })) {
                out.insert(i);
            }
        }
        out.into_iter().take(max).collect()
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.state.lock().dirty_bytes
    }

    pub fn clean_bytes(&self) -> u64 {
        self.state.lock().clean_bytes
    }

    /// True when chunk `index` has a dirty file (writing it takes no room).
    pub fn holds_dirty_data(&self, index: u64) -> bool {
        matches!(
            self.state.lock().entries.get(&index),
            Some(Entry::Dirty { zero: false, .. })
        )
    }

    /// True when dirty chunks alone fill the cache: writers must wait.
    pub fn full(&self) -> bool {
        self.state.lock().dirty_bytes + self.chunk > self.limit
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: u64 = 4096;

    fn open(dir: &Path, remote: &[u64]) -> Result<Cache, String> {
        Cache::open(
            dir,
            "s3://b/v id1",
            C,
            4 * C,
            remote.iter().copied().collect(),
        )
    }

    #[test]
    fn dirty_survives_reopen_and_clean_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path(), &[5]).unwrap();
        assert_eq!(c.lookup(5), Lookup::Remote);
        assert_eq!(c.lookup(6), Lookup::Zero);
        c.put_dirty(1, Some(&[7u8; C as usize])).unwrap();
        c.put_dirty(2, None).unwrap();
        c.put_clean(5, &[9u8; C as usize]);
        assert!(matches!(c.lookup(5), Lookup::File(_)));
        assert_eq!(c.dirty(), vec![1, 2]);
        assert_eq!(c.dirty_bytes(), C);
        assert_eq!(c.clean_bytes(), C);
        assert_eq!(c.allocated(0, 10, 100), vec![1, 5]);
        drop(c);

        let c = open(dir.path(), &[5]).unwrap();
        assert_eq!(c.dirty(), vec![1, 2]);
        assert_eq!(c.lookup(2), Lookup::Zero);
        assert_eq!(
            c.lookup(5),
            Lookup::Remote,
            "clean copies are dropped at open"
        );
        let s = c.snapshot(1).unwrap().unwrap();
        assert_eq!(s.data.unwrap(), vec![7u8; C as usize]);
        c.uploaded(1, s.gen, true);
        assert!(matches!(c.lookup(1), Lookup::File(p) if p.to_string_lossy().contains("clean")));
        let s = c.snapshot(2).unwrap().unwrap();
        assert!(s.data.is_none());
        c.uploaded(2, s.gen, false);
        assert!(c.dirty().is_empty());
        assert_eq!(c.dirty_bytes(), 0);
    }

    #[test]
    fn ranged_reads_follow_the_file_they_opened() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path(), &[]).unwrap();
        let data: Vec<u8> = (0..C).map(|i| (i % 251) as u8).collect();
        c.put_dirty(1, Some(&data)).unwrap();
        let Lookup::File(path) = c.lookup(1) else {
            panic!("a dirty chunk reads from its file")
        };
        let mut buf = [0u8; 100];
        assert!(c.read_range(&path, 1000, &mut buf).unwrap());
        assert_eq!(&buf[..], &data[1000..1100]);
        let mut tail = [0u8; 16];
        assert!(c.read_range(&path, C - 16, &mut tail).unwrap());
        assert_eq!(&tail[..], &data[C as usize - 16..]);

        // Zeroed after the lookup: the empty file reads as zeros.
        c.put_dirty(1, None).unwrap();
        buf.fill(1);
        assert!(c.read_range(&path, 1000, &mut buf).unwrap());
        assert!(buf.iter().all(|&b| b == 0));

        // Uploaded after the lookup (moved to clean/): look again.
        c.put_dirty(2, Some(&data)).unwrap();
        let Lookup::File(path) = c.lookup(2) else {
            panic!("a dirty chunk reads from its file")
        };
        let gen = c.snapshot(2).unwrap().unwrap().gen;
        c.uploaded(2, gen, true);
        assert!(!c.read_range(&path, 0, &mut buf).unwrap());

        // A file cut short by something else is damage, not zeros.
        let Lookup::File(path) = c.lookup(2) else {
            panic!("a clean chunk reads from its file")
        };
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(C / 2)
            .unwrap();
        let e = c.read_range(&path, C - 100, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("bytes, not"), "{e}");
    }

    #[test]
    fn rewrite_during_upload_stays_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path(), &[]).unwrap();
        c.put_dirty(3, Some(&[1u8; C as usize])).unwrap();
        let s = c.snapshot(3).unwrap().unwrap();
        c.put_dirty(3, Some(&[2u8; C as usize])).unwrap();
        c.uploaded(3, s.gen, true);
        assert_eq!(c.dirty(), vec![3]);
        assert_eq!(c.allocated(0, 9, 9), vec![3]);
    }

    #[test]
    fn small_writes_patch_the_cached_chunk_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path(), &[7, 8]).unwrap();
        // Absent from the bucket: a sparse chunk of zeros with the piece.
        assert!(c.write_local(1, 100, &[5u8; 10]).unwrap());
        let mut want = vec![0u8; C as usize];
        want[100..110].fill(5);
        let s = c.snapshot(1).unwrap().unwrap();
        assert_eq!(s.data.as_deref(), Some(&want[..]));
        // Dirty: patched in place, and the generation moves on.
        assert!(c.write_local(1, 0, &[6u8; 4]).unwrap());
        want[..4].fill(6);
        let s2 = c.snapshot(1).unwrap().unwrap();
        assert_eq!(s2.data.as_deref(), Some(&want[..]));
        assert!(s2.gen > s.gen);
        c.uploaded(1, s.gen, true);
        assert_eq!(c.dirty(), vec![1], "an older generation does not clean it");
        assert_eq!(c.dirty_bytes(), C);

        // Only the bucket has it: the caller must load it first.
        assert!(!c.write_local(7, 0, &[1u8; 4]).unwrap());
        assert_eq!(c.lookup(7), Lookup::Remote);
        // Clean: the clean copy becomes the dirty file, patched.
        c.put_clean(8, &[9u8; C as usize]);
        assert!(c.write_local(8, 8, &[3u8; 8]).unwrap());
        let mut want8 = vec![9u8; C as usize];
        want8[8..16].fill(3);
        assert_eq!(c.clean_bytes(), 0);
        assert_eq!(c.dirty_bytes(), 2 * C);
        assert!(matches!(c.lookup(8), Lookup::File(p) if p.to_string_lossy().contains("dirty")));
        assert_eq!(c.snapshot(8).unwrap().unwrap().data.unwrap(), want8);
        drop(c);

        // Each of those writes was complete in its file: they survive a restart.
        let c = open(dir.path(), &[7, 8]).unwrap();
        assert_eq!(c.snapshot(1).unwrap().unwrap().data.unwrap(), want);
        assert_eq!(c.snapshot(8).unwrap().unwrap().data.unwrap(), want8);
    }

    #[test]
    fn a_chunk_written_back_to_zeros_is_deleted_at_upload() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path(), &[]).unwrap();
        assert!(c.write_local(2, 0, &[1u8; 8]).unwrap());
        assert!(c.write_local(2, 0, &[0u8; 8]).unwrap());
        assert_eq!(
            c.allocated(0, 9, 9),
            vec![2],
            "not read back on every write"
        );
        let s = c.snapshot(2).unwrap().unwrap();
        assert!(s.data.is_none(), "an all-zero chunk uploads as a delete");
        c.uploaded(2, s.gen, false);
        assert!(c.dirty().is_empty());
        assert_eq!(c.dirty_bytes(), 0);
        assert_eq!(c.lookup(2), Lookup::Zero);
        assert!(c.allocated(0, 9, 9).is_empty());
        // Zeros into a chunk that is zero already: nothing to write.
        assert!(c.write_local(3, 0, &[0u8; 8]).unwrap());
        assert!(c.dirty().is_empty());
    }

    #[test]
    fn busy_chunks_wait_for_quiet_or_age() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path(), &[]).unwrap();
        c.put_dirty(1, Some(&[1u8; C as usize])).unwrap();
        let long = Duration::from_secs(3600);
        assert!(c.due(long, long).is_empty(), "just written");
        assert_eq!(c.due(Duration::ZERO, long), vec![1], "quiet long enough");
        std::thread::sleep(Duration::from_millis(30));
        c.write_local(1, 0, &[2u8; 4]).unwrap();
        assert!(c.due(Duration::from_millis(20), long).is_empty());
        assert_eq!(
            c.due(long, Duration::from_millis(20)),
            vec![1],
            "dirty for longer than the maximum age, however busy"
        );
    }

    #[test]
    fn bounded_and_evicts_clean_first() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path(), &[10, 11, 12, 13, 14]).unwrap();
        for i in 10..15 {
            c.put_clean(i, &[1u8; C as usize]);
        }
        assert!(c.clean_bytes() <= 4 * C);
        assert_eq!(c.lookup(10), Lookup::Remote, "oldest evicted");
        for i in 0..4 {
            c.put_dirty(i, Some(&[1u8; C as usize])).unwrap();
        }
        assert_eq!(c.clean_bytes(), 0);
        assert!(c.full());
    }

    #[test]
    fn refuses_another_volumes_dirty_cache_and_a_second_user() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path(), &[]).unwrap();
        let e = open(dir.path(), &[]).err().unwrap();
        assert!(e.contains("in use by another longwire process"), "{e}");
        c.put_dirty(0, Some(&[1u8; C as usize])).unwrap();
        drop(c);
        let e = Cache::open(dir.path(), "s3://b/other id2", C, 4 * C, BTreeSet::new())
            .err()
            .unwrap();
        assert!(e.contains("unsaved chunks of another volume"), "{e}");
    }
}
