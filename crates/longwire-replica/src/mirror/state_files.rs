//! Where the mirror keeps its state, and the local metadata file.
//!
//! Three files beside the volume (`disk.img.mirror-meta`,
//! `disk.img.mirror-bitmap`, and `disk.img.mirror-force-full`, which the
//! user creates to ask for a full resync) or, for stores that are not one
//! file, in a directory the user names.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use super::meta::{DecodeError, Record};

/// The mirror's files for one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatePaths {
    /// The local copy of the metadata record.
    pub meta: PathBuf,
    /// The dirty-region bitmap.
    pub bitmap: PathBuf,
    /// Present: the next connection overwrites the replica with a full
    /// sync, whatever its record says. Removed once that sync starts.
    pub force_full: PathBuf,
}

impl StatePaths {
    /// `PATH.mirror-meta` etc. beside a volume kept in the file `PATH`.
    pub fn beside(volume: &Path) -> StatePaths {
        let with = |suffix: &str| {
            let mut s = volume.as_os_str().to_owned();
            s.push(suffix);
            PathBuf::from(s)
        };
        StatePaths {
            meta: with(".mirror-meta"),
            bitmap: with(".mirror-bitmap"),
            force_full: with(".mirror-force-full"),
        }
    }

    /// `DIR/mirror-meta` etc.
    pub fn in_dir(dir: &Path) -> StatePaths {
        StatePaths {
            meta: dir.join("mirror-meta"),
            bitmap: dir.join("mirror-bitmap"),
            force_full: dir.join("mirror-force-full"),
        }
    }
}

/// Load the local record, or create one (new volume id and generation)
/// when the file does not exist. Returns the record and whether it was
/// created.
pub fn load_or_create(path: &Path, size: u64) -> io::Result<(Record, bool)> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    match File::open(path) {
        Ok(mut f) => {
            let mut b = Vec::new();
            f.read_to_end(&mut b).map_err(named)?;
            let rec = Record::decode(&b).map_err(|e| {
                let what = match e {
                    DecodeError::Blank | DecodeError::NotARecord => "not a longwire mirror metadata file".to_string(),
                    DecodeError::Corrupt(why) => format!("damaged mirror metadata ({why})"),
                };
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {what}; move it and the .mirror-bitmap away to pair afresh (a full resync)", path.display()),
                )
            })?;
            if rec.size != size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: the mirror was set up for a {}-byte volume, but the volume is {size} bytes; \
                         move the mirror state files away to pair afresh (a full resync)",
                        path.display(),
                        rec.size
                    ),
                ));
            }
            Ok((rec, false))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut id = [0u8; 16];
            id.copy_from_slice(&random_bytes(16)?);
            let rec = Record::new(id, new_generation()?, size);
            save(path, &rec)?;
            Ok((rec, true))
        }
        Err(e) => Err(named(e)),
    }
}

/// Replace the record atomically (temporary file, fsync, rename, fsync dir).
pub fn save(path: &Path, rec: &Record) -> io::Result<()> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp-new");
    let tmp = PathBuf::from(tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(named)?;
    f.write_all(&rec.encode()).map_err(named)?;
    f.sync_all().map_err(named)?;
    std::fs::rename(&tmp, path).map_err(named)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir).and_then(|d| d.sync_all()).map_err(named)?;
    }
    Ok(())
}

/// A fresh random, non-zero generation (zero means "none" on disk).
pub fn new_generation() -> io::Result<u64> {
    loop {
        let g = u64::from_le_bytes(random_bytes(8)?.try_into().unwrap());
        if g != 0 {
            return Ok(g);
        }
    }
}

fn random_bytes(n: usize) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| io::Error::new(e.kind(), format!("/dev/urandom: {e}")))?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_load_and_refuse_other_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let paths = StatePaths::beside(&dir.path().join("disk.img"));
        assert!(paths.meta.ends_with("disk.img.mirror-meta"));
        let (a, created) = load_or_create(&paths.meta, 1 << 20).unwrap();
        assert!(created && a.peer.is_none());
        let (b, created) = load_or_create(&paths.meta, 1 << 20).unwrap();
        assert!(!created);
        assert_eq!(a, b);
        let err = load_or_create(&paths.meta, 2 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("move the mirror state files away"), "{err}");
        std::fs::write(&paths.meta, b"junk").unwrap();
        let err = load_or_create(&paths.meta, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("damaged"), "{err}");
    }
}
