//! Clone / live migration: serve a local volume at once while it is filled
//! from a remote source, on demand and in the background ("hydration").
//!
//! - [`volume`]: [`CloneVolume`], what clients see: requests on regions not
//!   copied yet wait for them (or, for whole-region writes and trims, skip
//!   the copy);
//! - [`hydration`]: the shared state and the copy / mark / commit steps;
//! - [`fetch`]: one region from the source (allocation map, then data) and
//!   into the local store;
//! - [`background`]: the copier that walks the rest, skipping what the
//!   source reports as holes or zeros, and the periodic commit;
//! - [`locks`]: per-region locks so copies never land on new writes;
//! - [`progress`]: counters, [`Progress`] and the status entry.
//!
//! The "hydrated" bits live in a [`RegionBitmap`](crate::RegionBitmap)
//! beside the volume, so hydration resumes after a restart. Once every
//! region is local the bitmap is committed, the source is dropped and the
//! layer passes everything straight through.

mod background;
mod fetch;
mod hydration;
mod locks;
mod progress;
#[cfg(test)]
mod tests;
mod volume;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use progress::{human_size, Progress};
pub use volume::CloneVolume;

use crate::bitmap::{Fill, RegionBitmap};

/// Tunables of a clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneConfig {
    /// Bytes per bitmap bit: the unit copied from the source. Larger
    /// regions mean fewer requests; smaller ones, less waiting on the
    /// first read of a region. Default 1 MiB.
    pub region_size: u64,
    /// Regions the background copier fetches at once. Default 4.
    pub parallel: usize,
    /// The longest a request waits for the source (per region) before it
    /// fails with EIO. Default 30 s.
    pub fetch_timeout: Duration,
    /// How often the bitmap is committed while hydrating. Default 2 s.
    pub commit_interval: Duration,
}

impl Default for CloneConfig {
    fn default() -> Self {
        CloneConfig {
            region_size: 1 << 20,
            parallel: 4,
            fetch_timeout: Duration::from_secs(30),
            commit_interval: Duration::from_secs(2),
        }
    }
}

/// The hydration bitmap of a volume kept in the file `volume`:
/// `PATH.clone-bitmap` beside it.
pub fn bitmap_beside(volume: &Path) -> PathBuf {
    let mut p = volume.as_os_str().to_owned();
    p.push(".clone-bitmap");
    PathBuf::from(p)
}

/// The hydration bitmap kept in a state directory: `DIR/clone-bitmap`
/// (for stores that are not one file).
pub fn bitmap_in_dir(dir: &Path) -> PathBuf {
    dir.join("clone-bitmap")
}

/// Open (or create, with nothing hydrated) the hydration bitmap at `path`
/// for a volume of `size` bytes.
pub fn open_bitmap(path: &Path, size: u64, config: &CloneConfig) -> std::io::Result<RegionBitmap> {
    RegionBitmap::open(path, size, config.region_size, Fill::Clear)
}

/// True when the bitmap at `path` exists and says every region is local:
/// the clone no longer needs its source.
pub fn is_complete(path: &Path, size: u64, config: &CloneConfig) -> std::io::Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    Ok(open_bitmap(path, size, config)?.next_clear(0).is_none())
}
