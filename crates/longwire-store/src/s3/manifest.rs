//! The volume's manifest object and where every object of a volume lives
//! in the bucket.
//!
//! ```text
//! PREFIX/manifest.json          size, chunk size, compression, format version
//! PREFIX/lease.json             the single-writer lease (see lease.rs)
//! PREFIX/chunks/0000000000000007  chunk 7 (bytes 7*chunk .. 8*chunk)
//! ```
//!
//! Chunk keys are 16 hex digits so a listing returns them in index order.

use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::sqlite::Compression;

/// The `format` field every manifest carries, so a stray JSON file under
/// the prefix is never taken for a volume.
pub const FORMAT: &str = "longwire-s3-volume";
/// Manifest layout version this code reads and writes.
pub const VERSION: u32 = 1;
/// Name of the manifest object inside a volume's prefix.
pub const MANIFEST: &str = "manifest.json";
/// Name of the lease object inside a volume's prefix.
pub const LEASE: &str = "lease.json";
/// Folder of the chunk objects inside a volume's prefix.
pub const CHUNKS: &str = "chunks";

/// Chunk size of new volumes: large enough that a sequential stream costs
/// one request per MiB, small enough that a cache miss on a 4K read
/// downloads little. The write-back cache absorbs small writes.
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
pub const MIN_CHUNK_SIZE: u64 = 4 << 10;
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;

/// What `manifest.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Volume size in bytes; may grow, never shrinks.
    pub size: u64,
    /// Chunk size in bytes (a power of two); fixed at creation.
    pub chunk_size: u64,
    /// `none` or `zstd`: how new chunks are written. Reading never depends
    /// on it (a chunk object says by its length whether it is compressed).
    pub compression: String,
    /// Random at creation. The local cache remembers it so dirty chunks of
    /// a deleted and re-created volume are never uploaded into the new one.
    pub volume_id: String,
    /// Seconds since the Unix epoch at creation.
    pub created: u64,
}

impl Manifest {
    pub fn new(size: u64, chunk_size: u64, compression: Compression) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            size,
            chunk_size,
            compression: compression.as_str().into(),
            volume_id: super::lease::random_token(),
            created: super::lease::unix_now(),
        }
    }

    /// Parse and check a manifest; the error says what is wrong with it.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| format!("manifest.json is not a longwire volume manifest ({e})"))?;
        if m.format != FORMAT {
            return Err(format!(
                "manifest.json has format {:?}, not {FORMAT:?}: this prefix is not a longwire volume",
                m.format
            ));
        }
        if m.version != VERSION {
            return Err(format!(
                "manifest.json has format version {}; this longwire reads version {VERSION} (upgrade longwire)",
                m.version
            ));
        }
        check_chunk_size(m.chunk_size).map_err(|e| format!("manifest.json: {e}"))?;
        if Compression::parse(&m.compression).is_none() {
            return Err(format!(
                "manifest.json: unknown compression {:?} (expected none or zstd)",
                m.compression
            ));
        }
        if m.size == 0 || m.size.checked_add(m.chunk_size).is_none() {
            return Err(format!("manifest.json: invalid size {}", m.size));
        }
        Ok(m)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        v.push(b'\n');
        v
    }

    pub fn compression(&self) -> Compression {
        Compression::parse(&self.compression).unwrap_or_default()
    }

    /// Number of chunks that cover the volume.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }
}

/// A chunk size is a power of two between 4 KiB and 64 MiB.
pub fn check_chunk_size(n: u64) -> Result<(), String> {
    if !n.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&n) {
        return Err(format!(
            "chunk size {n} is not a power of two between 4K and 64M (e.g. 1M)"
        ));
    }
    Ok(())
}

/// Object keys of one volume.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The volume's prefix, without a trailing slash.
    pub prefix: String,
}

impl Layout {
    /// Check `prefix` (from the URI) names a usable key prefix.
    pub fn new(prefix: &str) -> Result<Layout, String> {
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            return Err(
                "no volume named: write s3://BUCKET/NAME (the prefix names the volume)".into(),
            );
        }
        Path::parse(prefix)
            .map_err(|e| format!("volume name {prefix:?} is not a valid object key prefix: {e}"))?;
        Ok(Layout {
            prefix: prefix.to_string(),
        })
    }

    fn path(&self, rest: &str) -> Path {
        Path::from(format!("{}/{rest}", self.prefix).as_str())
    }

    pub fn manifest(&self) -> Path {
        self.path(MANIFEST)
    }

    pub fn lease(&self) -> Path {
        self.path(LEASE)
    }

    pub fn probe(&self, token: &str) -> Path {
        self.path(&format!("lease-probe-{token}"))
    }

    pub fn chunks_dir(&self) -> Path {
        self.path(CHUNKS)
    }

    pub fn chunk(&self, index: u64) -> Path {
        self.path(&format!("{CHUNKS}/{index:016x}"))
    }

    /// The chunk index a listed key stands for, or None for anything else.
    pub fn chunk_index(&self, key: &Path) -> Option<u64> {
        let name = key.filename()?;
        let parent = key.as_ref().strip_suffix(name)?.strip_suffix('/')?;
        if parent != self.chunks_dir().as_ref() || name.len() != 16 {
            return None;
        }
        u64::from_str_radix(name, 16).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checks() {
        let m = Manifest::new(10 << 30, 1 << 20, Compression::Zstd);
        let back = Manifest::parse(&m.to_json()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.compression(), Compression::Zstd);
        assert_eq!(back.chunks(), 10 << 10);

        let e = Manifest::parse(b"{not json").unwrap_err();
        assert!(e.contains("not a longwire volume manifest"), "{e}");
        let mut bad = m.clone();
        bad.format = "other".into();
        assert!(Manifest::parse(&bad.to_json())
            .unwrap_err()
            .contains("not a longwire volume"));
        let mut bad = m.clone();
        bad.version = 9;
        assert!(Manifest::parse(&bad.to_json())
            .unwrap_err()
            .contains("upgrade longwire"));
        let mut bad = m.clone();
        bad.chunk_size = 1000;
        assert!(Manifest::parse(&bad.to_json())
            .unwrap_err()
            .contains("power of two"));
        let mut bad = m;
        bad.compression = "lz4".into();
        assert!(Manifest::parse(&bad.to_json())
            .unwrap_err()
            .contains("none or zstd"));
    }

    #[test]
    fn keys() {
        let l = Layout::new("/vols/vm1/").unwrap();
        assert_eq!(l.manifest().as_ref(), "vols/vm1/manifest.json");
        assert_eq!(l.chunk(7).as_ref(), "vols/vm1/chunks/0000000000000007");
        assert_eq!(l.chunk_index(&l.chunk(0xabc)), Some(0xabc));
        assert_eq!(l.chunk_index(&l.manifest()), None);
        assert_eq!(
            l.chunk_index(&Path::from("vols/vm2/chunks/0000000000000007")),
            None
        );
        assert!(Layout::new("").is_err());
        assert!(Layout::new("a//b").is_err());
    }
}
