//! One-line volume descriptions: `file:disk.img?size=10G&readonly=true`,
//! `memory:?size=1G`, `sqlite:vols.db?volume=disk1&size=10G`,
//! `s3://bucket/vm1?endpoint=http://127.0.0.1:3900&size=10G`.
//!
//! The same syntax is used on the command line and in config files, so the
//! parsing and the error messages (which tell the user what to write
//! instead) live here once.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::sync::Arc;

use longwire_core::layers::ReadOnly;
use longwire_core::Volume;

use crate::s3::S3Options;
use crate::sqlite::{Compression, SqliteOptions};
use crate::{FileVolume, MemoryVolume, S3Volume, SqliteVolume};

const SCHEMES: &str = "file: (file:PATH?size=10G), memory: (memory:?size=1G), \
                       sqlite: (sqlite:PATH?volume=NAME&size=10G) \
                       and s3: (s3://BUCKET/NAME?endpoint=URL&size=10G)";
const PARAMS: &str = "size, readonly and description";
const SQLITE_PARAMS: &str = "volume, size, chunk_size, compression, readonly and description";
const SIZE_HELP: &str = "use a whole number of bytes, optionally followed by K, M, G, T or P \
                         (powers of 1024, e.g. 10G)";

/// A volume opened from a URI, with the description the URI gave it.
pub struct OpenedVolume {
    pub volume: Arc<dyn Volume>,
    /// From `?description=…`, percent-decoded; shown to clients listing exports.
    pub description: Option<String>,
}

impl std::fmt::Debug for OpenedVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedVolume")
            .field("size", &self.volume.size())
            .field("capabilities", &self.volume.capabilities())
            .field("description", &self.description)
            .finish()
    }
}

/// Parse a size such as `1048576`, `64K`, `10G`, `2TiB`. Units are binary
/// (K = 1024) whatever their spelling, so `10G` and `10GiB` agree.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    if num.is_empty() {
        return Err(format!("invalid size {s:?}: {SIZE_HELP}"));
    }
    let shift = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "p" | "pib" => 50,
        u if u.starts_with('.') => {
            return Err(format!(
                "invalid size {s:?}: whole numbers only (write 1536M, not 1.5G)"
            ));
        }
        _ => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {unit:?}; {SIZE_HELP}"
            ))
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("size {s:?} is too large (the limit is {} bytes)", u64::MAX))
}

/// Where the bytes live.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Target {
    File(PathBuf),
    Memory,
    /// A database file; the volume inside it is `Spec::volume`.
    Sqlite(PathBuf),
    /// A bucket and prefix; the rest is in `Spec::s3`.
    S3,
}

/// A parsed URI, before anything is opened.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Spec {
    pub target: Target,
    pub size: Option<u64>,
    pub readonly: bool,
    pub description: Option<String>,
    /// sqlite only: the volume's name inside the database.
    pub volume: Option<String>,
    /// sqlite only: chunk size of a new volume.
    pub chunk_size: Option<u64>,
    /// sqlite and s3: compression of a new volume.
    pub compression: Option<Compression>,
    /// s3 only: bucket, prefix and the s3-specific parameters.
    pub s3: Option<S3Options>,
}

/// Open the volume a URI describes. Async because `s3:` talks to a bucket;
/// the blocking opens of `file:` and `sqlite:` run on tokio's blocking pool.
/// Needs a tokio runtime (the S3 store spawns its uploader on it).
///
/// - `file:PATH` (relative or absolute) or `file:///abs/path`: a raw image;
///   with `size` it is created if missing or grown if smaller, never shrunk.
/// - `memory:`: a sparse RAM disk; `size` is required.
/// - `sqlite:PATH?volume=NAME` (path forms as for `file:`): volume `NAME` in
///   an SQLite database that holds many; with `size` the database and the
///   volume are created if missing, the volume grown if smaller, never
///   shrunk. `chunk_size` (default 64K) and `compression` (`none` or
///   `zstd`) apply when the volume is created; on an existing volume they
///   must match. See [`crate::sqlite`].
/// - `s3://BUCKET/PREFIX`: a volume of chunk objects under PREFIX, with
///   `endpoint`, `region`, `cache`, `cache_size`, `timeout`, `lease_ttl`
///   as well as `size`, `chunk_size` and `compression` (as for sqlite).
///   See [`crate::s3`].
///
/// Query parameters: `size` (see [`parse_size`]), `readonly`
/// (true/false/1/0/yes/no) and `description` (percent-encoded, `+` is a
/// space). Paths may percent-encode awkward characters (`%3F` for `?`).
pub async fn open_uri(uri: &str) -> Result<OpenedVolume, String> {
    let spec = parse(uri)?;
    if let Some(opts) = &spec.s3 {
        let v = S3Volume::open(opts).await.map_err(|e| format!("{uri}: {e}"))?;
        return Ok(finish(Arc::new(v), spec));
    }
    let uri = uri.to_string();
    tokio::task::spawn_blocking(move || open_local(&uri, spec))
        .await
        .map_err(|e| format!("opening a volume failed: {e}"))?
}

/// Wrap read-only volumes and attach the description.
fn finish(volume: Arc<dyn Volume>, spec: Spec) -> OpenedVolume {
    let volume = if spec.readonly {
        Arc::new(ReadOnly::new(volume))
    } else {
        volume
    };
    OpenedVolume {
        volume,
        description: spec.description,
    }
}

/// Open a `file:`, `sqlite:` or `memory:` volume. Blocking.
fn open_local(uri: &str, spec: Spec) -> Result<OpenedVolume, String> {
    let volume: Arc<dyn Volume> = match &spec.target {
        Target::S3 => unreachable!("s3 volumes are opened by open_uri"),
        Target::Memory => {
            let size = spec.size.ok_or_else(|| {
                format!("{uri}: a memory volume needs a size, e.g. memory:?size=1G")
            })?;
            Arc::new(MemoryVolume::new(size))
        }
        Target::File(path) => match FileVolume::open(path, spec.size, spec.readonly) {
            Ok(v) => Arc::new(v),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && spec.size.is_none() => {
                let sep = if uri.contains('?') { '&' } else { '?' };
                return Err(format!(
                    "{uri} does not exist; add {sep}size=10G (any size) to create it"
                ));
            }
            Err(e) => return Err(format!("{uri}: {e}")),
        },
        Target::Sqlite(path) => {
            let name = spec.volume.as_deref().ok_or_else(|| {
                let sep = if uri.contains('?') { '&' } else { '?' };
                format!(
                    "{uri}: name the volume inside the database: add {sep}volume=NAME \
                     (one database holds many volumes)"
                )
            })?;
            let opts = SqliteOptions {
                size: spec.size,
                chunk_size: spec.chunk_size,
                compression: spec.compression,
                read_only: spec.readonly,
            };
            match SqliteVolume::open(path, name, &opts) {
                Ok(v) => Arc::new(v),
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        && spec.size.is_none()
                        && !spec.readonly =>
                {
                    let msg = e.to_string();
                    let msg = msg.strip_suffix(crate::sqlite::NEEDS_SIZE).unwrap_or(&msg);
                    return Err(format!(
                        "{uri}: {msg}; add &size=10G (any size) to create it"
                    ));
                }
                Err(e) => return Err(format!("{uri}: {e}")),
            }
        }
    };
    Ok(finish(volume, spec))
}

/// Parse a URI without opening anything (also used by [`crate::manage`]).
pub(crate) fn parse(uri: &str) -> Result<Spec, String> {
    let no_scheme = || {
        format!("{uri:?} does not say what kind of volume it is; write file:{uri} for an image file. Valid kinds: {SCHEMES}")
    };
    let (scheme, rest) = uri.split_once(':').ok_or_else(no_scheme)?;
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return Err(no_scheme());
    }
    let (target, query) = rest.split_once('?').unwrap_or((rest, ""));
    let target_str = target;
    let target = match scheme.to_ascii_lowercase().as_str() {
        "file" => Target::File(file_path(uri, "file", target)?),
        "sqlite" => Target::Sqlite(file_path(uri, "sqlite", target)?),
        "s3" => Target::S3,
        "memory" if target.is_empty() => Target::Memory,
        "memory" => {
            return Err(format!(
                "{uri}: memory volumes take no path; write memory:?size=1G"
            ))
        }
        _ => {
            return Err(format!(
                "{uri}: unknown volume kind {scheme:?}; valid kinds are {SCHEMES}"
            ))
        }
    };

    let sqlite = matches!(target, Target::Sqlite(_));
    let s3 = match target {
        Target::S3 => Some(s3_location(uri, target_str)?),
        _ => None,
    };
    let chunked = sqlite || s3.is_some();
    let mut spec = Spec {
        target,
        size: None,
        readonly: false,
        description: None,
        volume: None,
        chunk_size: None,
        compression: None,
        s3,
    };
    let mut seen: Vec<&str> = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (key, raw) = match part.split_once('=') {
            Some(kv) => kv,
            // A bare `readonly` reads naturally as "readonly=true".
            None if part == "readonly" => (part, "true"),
            None => {
                return Err(format!(
                    "{uri}: parameter {part:?} needs a value, e.g. {part}=…"
                ))
            }
        };
        if seen.contains(&key) {
            return Err(format!("{uri}: parameter {key:?} is given twice"));
        }
        seen.push(key);
        let value = decode(raw, true).map_err(|e| format!("{uri}: {key}: {e}"))?;
        let value =
            String::from_utf8(value).map_err(|_| format!("{uri}: {key} is not valid UTF-8"))?;
        match key {
            "size" => spec.size = Some(parse_size(&value).map_err(|e| format!("{uri}: {e}"))?),
            "readonly" => {
                spec.readonly = match value.to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" => true,
                    "false" | "0" | "no" => false,
                    _ => {
                        return Err(format!(
                            "{uri}: readonly={value} is not a yes/no value; use true or false"
                        ))
                    }
                }
            }
            "description" => spec.description = Some(value),
            "volume" if sqlite => {
                if value.is_empty() {
                    return Err(format!("{uri}: volume= needs a name, e.g. volume=disk1"));
                }
                spec.volume = Some(value)
            }
            "chunk_size" if chunked => {
                let n = parse_size(&value).map_err(|e| format!("{uri}: chunk_size: {e}"))?;
                if sqlite {
                    crate::sqlite::check_chunk_size(n).map_err(|e| format!("{uri}: {e}"))?;
                } else {
                    crate::s3::manifest::check_chunk_size(n).map_err(|e| format!("{uri}: {e}"))?;
                }
                spec.chunk_size = Some(n)
            }
            "compression" if chunked => {
                spec.compression = Some(Compression::parse(&value).ok_or_else(|| {
                    format!("{uri}: compression={value} is not known; use zstd or none")
                })?)
            }
            _ if spec.s3.is_some() => {
                let known = spec.s3.as_mut().unwrap().set(key, &value).map_err(|e| format!("{uri}: {e}"))?;
                if !known {
                    return Err(format!(
                        "{uri}: unknown parameter {key:?}; valid parameters are {}",
                        crate::s3::PARAMS
                    ));
                }
            }
            _ => {
                let valid = if sqlite { SQLITE_PARAMS } else { PARAMS };
                return Err(format!(
                    "{uri}: unknown parameter {key:?}; valid parameters are {valid}"
                ));
            }
        }
    }
    if let Some(o) = spec.s3.as_mut() {
        o.size = spec.size;
        o.read_only = spec.readonly;
        o.chunk_size = spec.chunk_size;
        o.compression = spec.compression;
    }
    Ok(spec)
}

/// Bucket and prefix of `s3://BUCKET/PREFIX` (`target` is what follows
/// `s3:`), percent-decoded.
fn s3_location(uri: &str, target: &str) -> Result<S3Options, String> {
    let rest = target.strip_prefix("//").ok_or_else(|| {
        format!("{uri}: write s3://BUCKET/NAME, e.g. s3://volumes/vm1?endpoint=http://127.0.0.1:3900&size=10G")
    })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket = String::from_utf8(decode(bucket, false).map_err(|e| format!("{uri}: {e}"))?)
        .map_err(|_| format!("{uri}: the bucket name is not valid UTF-8"))?;
    let prefix = String::from_utf8(decode(prefix, false).map_err(|e| format!("{uri}: {e}"))?)
        .map_err(|_| format!("{uri}: the volume name is not valid UTF-8"))?;
    if bucket.is_empty() {
        return Err(format!("{uri}: no bucket named; write s3://BUCKET/NAME"));
    }
    Ok(S3Options::new(&bucket, &prefix))
}

/// The path part of a `file:` (or `sqlite:`, which `scheme` names) URI:
/// `file:rel/path`, `file:/abs/path`, `file:///abs/path` or
/// `file://localhost/abs/path`, percent-decoded.
fn file_path(uri: &str, scheme: &str, target: &str) -> Result<PathBuf, String> {
    let target = match target.strip_prefix("//") {
        None => target,
        Some(rest) => {
            let rest = rest.strip_prefix("localhost").unwrap_or(rest);
            if !rest.starts_with('/') {
                return Err(format!(
                    "{uri}: only local files are supported; write {scheme}:///absolute/path or {scheme}:relative/path"
                ));
            }
            rest
        }
    };
    if target.is_empty() {
        let example = if scheme == "sqlite" {
            "sqlite:volumes.db?volume=disk1&size=10G"
        } else {
            "file:disk.img?size=10G"
        };
        return Err(format!(
            "{uri}: no file named; write {scheme}:PATH, e.g. {example}"
        ));
    }
    // '+' is a literal plus in paths; only %XX is decoded.
    let bytes = decode(target, false).map_err(|e| format!("{uri}: {e}"))?;
    Ok(PathBuf::from(OsString::from_vec(bytes)))
}

/// Percent-decode `s` (`%20` → space; with `plus_is_space`, `+` → space too).
/// Strict, so a stray `%` is reported rather than silently kept.
fn decode(s: &str, plus_is_space: bool) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(|| {
                    format!("bad percent escape in {s:?}: % must be followed by two hex digits (write %25 for a literal %)")
                })?;
                out.push(byte);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use longwire_core::VolumeError;

    const G: u64 = 1 << 30;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1048576));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512b"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("3M"), Ok(3 << 20));
        assert_eq!(parse_size("3m"), Ok(3 << 20));
        assert_eq!(parse_size("3MiB"), Ok(3 << 20));
        assert_eq!(parse_size("10G"), Ok(10 * G));
        assert_eq!(parse_size("10g"), Ok(10 * G));
        assert_eq!(parse_size("10GiB"), Ok(10 * G));
        assert_eq!(parse_size(" 10 G "), Ok(10 * G));
        assert_eq!(parse_size("6T"), Ok(6 << 40));
        assert_eq!(parse_size("6t"), Ok(6 << 40));
        assert_eq!(parse_size("6TiB"), Ok(6 << 40));
        assert_eq!(parse_size("2P"), Ok(2 << 50));
        assert_eq!(parse_size("2PiB"), Ok(2 << 50));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_size("16383P"), Ok(16383 << 50));

        for bad in ["", "G", "-1", "10X", "10KB", "ten"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("K, M, G, T or P"), "{bad:?}: {e}");
        }
        assert!(parse_size("1.5G").unwrap_err().contains("whole numbers"));
        assert!(parse_size("16384P").unwrap_err().contains("too large"));
        assert!(parse_size("18446744073709551616")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn parses_file_forms() {
        let p = |u: &str| match parse(u).unwrap().target {
            Target::File(p) => p,
            t => panic!("{t:?}"),
        };
        assert_eq!(p("file:images/a.img"), PathBuf::from("images/a.img"));
        assert_eq!(p("file:/abs/a.img?size=1G"), PathBuf::from("/abs/a.img"));
        assert_eq!(p("file:///abs/a.img"), PathBuf::from("/abs/a.img"));
        assert_eq!(p("file://localhost/abs/a.img"), PathBuf::from("/abs/a.img"));
        assert_eq!(
            p("FILE:my%20disk%3F+1.img"),
            PathBuf::from("my disk?+1.img")
        );

        let spec = parse("file:a.img?size=2G&readonly=yes&description=Build+cache%21").unwrap();
        assert_eq!(spec.size, Some(2 * G));
        assert!(spec.readonly);
        assert_eq!(spec.description.as_deref(), Some("Build cache!"));
        assert!(parse("file:a.img?readonly").unwrap().readonly);
        assert!(!parse("file:a.img?readonly=0&").unwrap().readonly);
    }

    #[test]
    fn parse_errors_say_what_to_do() {
        let e = |u: &str| parse(u).unwrap_err();
        let msg = e("disk.img");
        assert!(
            msg.contains("file:disk.img") && msg.contains("memory:"),
            "{msg}"
        );
        let msg = e("nbd://host/x");
        assert!(
            msg.contains("unknown volume kind") && msg.contains("file:") && msg.contains("memory:"),
            "{msg}"
        );
        let msg = e("file:a.img?sise=1G");
        assert!(
            msg.contains("\"sise\"") && msg.contains("size, readonly and description"),
            "{msg}"
        );
        assert!(e("file:a.img?readonly=maybe").contains("true or false"));
        assert!(e("file:a.img?size=1G&size=2G").contains("twice"));
        assert!(e("file:a.img?size").contains("needs a value"));
        assert!(e("file:a.img?size=big").contains("K, M, G, T or P"));
        assert!(e("file:").contains("no file named"));
        assert!(e("file://server/a.img").contains("only local files"));
        assert!(e("file:100%.img").contains("%25"));
        assert!(e("memory:foo?size=1G").contains("no path"));
    }

    #[tokio::test]
    async fn opens_memory() {
        let v = open_uri("memory:?size=1G&description=RAM+disk%20one").await.unwrap();
        assert_eq!(v.volume.size(), G);
        assert_eq!(v.description.as_deref(), Some("RAM disk one"));
        assert!(!v.volume.capabilities().read_only);
        v.volume
            .write(5, Bytes::from_static(b"hi"), false)
            .await
            .unwrap();
        assert_eq!(
            v.volume.read(5, 2).await.unwrap(),
            Bytes::from_static(b"hi")
        );

        let ro = open_uri("memory:?size=1M&readonly=true").await.unwrap();
        assert!(ro.volume.capabilities().read_only);
        assert!(matches!(
            ro.volume.write(0, Bytes::from_static(b"x"), false).await,
            Err(VolumeError::ReadOnly)
        ));

        let msg = open_uri("memory:").await.unwrap_err();
        assert!(
            msg.contains("needs a size") && msg.contains("memory:?size=1G"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn opens_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new dir/disk.img");
        let encoded = path.to_str().unwrap().replace(' ', "%20");

        // Missing without size: say how to create it.
        let uri = format!("file:{encoded}");
        let msg = open_uri(&uri).await.unwrap_err();
        assert_eq!(
            msg,
            format!("{uri} does not exist; add ?size=10G (any size) to create it")
        );
        let msg = open_uri(&format!("{uri}?readonly=false")).await.unwrap_err();
        assert!(msg.contains("&size=10G"), "{msg}");

        // Created with size, via the file:/// form.
        let v = open_uri(&format!("file://{encoded}?size=4M")).await.unwrap();
        assert_eq!(v.volume.size(), 4 << 20);
        assert!(v.description.is_none());
        v.volume
            .write(100, Bytes::from_static(b"data"), true)
            .await
            .unwrap();
        drop(v);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 20);

        // Shrinking is refused, with the reason.
        let msg = open_uri(&format!("{uri}?size=1M")).await.unwrap_err();
        assert!(msg.contains("shrink") && msg.starts_with(&uri), "{msg}");

        // Read-only: wrapped, writes refused, data visible.
        let ro = open_uri(&format!("{uri}?readonly=1")).await.unwrap();
        assert!(ro.volume.capabilities().read_only);
        assert!(!ro.volume.capabilities().can_trim);
        assert!(matches!(
            ro.volume.write(0, Bytes::from_static(b"x"), false).await,
            Err(VolumeError::ReadOnly)
        ));
        assert_eq!(
            ro.volume.read(100, 4).await.unwrap(),
            Bytes::from_static(b"data")
        );
    }

    #[test]
    fn parses_sqlite_forms() {
        let spec = parse(
            "sqlite:///srv/vols%20a.db?volume=disk+one&size=2G&chunk_size=16K&compression=ZSTD&readonly",
        )
        .unwrap();
        assert_eq!(spec.target, Target::Sqlite(PathBuf::from("/srv/vols a.db")));
        assert_eq!(spec.volume.as_deref(), Some("disk one"));
        assert_eq!(spec.size, Some(2 * G));
        assert_eq!(spec.chunk_size, Some(16 << 10));
        assert_eq!(spec.compression, Some(Compression::Zstd));
        assert!(spec.readonly);
        let spec = parse("SQLITE:rel/v.db?volume=a&compression=none").unwrap();
        assert_eq!(spec.target, Target::Sqlite(PathBuf::from("rel/v.db")));
        assert_eq!(spec.compression, Some(Compression::None));

        let e = |u: &str| parse(u).unwrap_err();
        assert!(e("sqlite:").contains("sqlite:PATH"), "{}", e("sqlite:"));
        assert!(e("sqlite://host/v.db").contains("sqlite:///absolute/path"));
        assert!(e("sqlite:v.db?volume=").contains("needs a name"));
        assert!(e("sqlite:v.db?volume=a&chunk_size=1000").contains("power of two"));
        assert!(e("sqlite:v.db?volume=a&chunk_size=big").contains("chunk_size"));
        assert!(e("sqlite:v.db?volume=a&compression=lz4").contains("zstd or none"));
        let msg = e("sqlite:v.db?volume=a&sise=1G");
        assert!(
            msg.contains("volume, size, chunk_size, compression, readonly and description"),
            "{msg}"
        );
        // sqlite-only parameters are unknown elsewhere.
        let msg = e("file:a.img?volume=x");
        assert!(
            msg.contains("\"volume\"") && msg.contains("size, readonly and description"),
            "{msg}"
        );
        assert!(e("memory:?size=1G&chunk_size=4K").contains("unknown parameter"));
        assert!(e("nbd://x").contains("sqlite:"));
    }

    #[tokio::test]
    async fn opens_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub dir/vols.db");
        let enc = path.to_str().unwrap().replace(' ', "%20");

        let msg = open_uri(&format!("sqlite:{enc}?size=1M")).await.unwrap_err();
        assert!(msg.contains("add &volume=NAME"), "{msg}");
        let msg = open_uri(&format!("sqlite:{enc}")).await.unwrap_err();
        assert!(msg.contains("add ?volume=NAME"), "{msg}");
        let uri = format!("sqlite:{enc}?volume=a");
        let msg = open_uri(&uri).await.unwrap_err();
        assert_eq!(
            msg,
            format!(
                "{uri}: {} does not exist; add &size=10G (any size) to create it",
                path.display()
            )
        );

        let a = open_uri(&format!(
            "{uri}&size=4M&chunk_size=16K&description=Volume+A"
        )).await.unwrap();
        assert_eq!(a.volume.size(), 4 << 20);
        assert_eq!(a.description.as_deref(), Some("Volume A"));
        assert_eq!(a.volume.capabilities().preferred_block, 16 << 10);
        a.volume
            .write(100, Bytes::from_static(b"data"), true)
            .await
            .unwrap();

        // A second volume in the same file; a missing one lists what exists.
        let b = open_uri(&format!("sqlite:{enc}?volume=b&size=1M&compression=zstd")).await.unwrap();
        assert_eq!(b.volume.capabilities().preferred_block, 64 << 10);
        let msg = open_uri(&format!("sqlite:{enc}?volume=c")).await.unwrap_err();
        assert!(
            msg.contains("no volume \"c\" (it holds \"a\", \"b\"); add &size=10G"),
            "{msg}"
        );

        // Never shrinks; conflicting chunk size names both values.
        let msg = open_uri(&format!("{uri}&size=1M")).await.unwrap_err();
        assert!(msg.contains("shrink") && msg.starts_with(&uri), "{msg}");
        let msg = open_uri(&format!("{uri}&chunk_size=64K")).await.unwrap_err();
        assert!(msg.contains("16K") && msg.contains("64K"), "{msg}");

        // Read-only: wrapped, writes refused, data visible.
        let ro = open_uri(&format!("{uri}&readonly=true")).await.unwrap();
        assert!(ro.volume.capabilities().read_only);
        assert!(matches!(
            ro.volume.write(0, Bytes::from_static(b"x"), false).await,
            Err(VolumeError::ReadOnly)
        ));
        assert_eq!(
            ro.volume.read(100, 4).await.unwrap(),
            Bytes::from_static(b"data")
        );

        // Not a database.
        let img = dir.path().join("disk.img");
        std::fs::write(&img, vec![7u8; 8192]).unwrap();
        let msg = open_uri(&format!("sqlite:{}?volume=a&size=1M", img.display())).await.unwrap_err();
        assert!(msg.contains("not an SQLite database"), "{msg}");
    }
}
