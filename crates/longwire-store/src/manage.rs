//! Volume management by URI, without serving: create, list, describe and
//! delete volumes. The command line formats what these return; nothing here
//! prints.
//!
//! Each operation parses the URI once and dispatches on the store with one
//! `match`, so a new store adds one arm per function. Results are plain
//! [`VolumeInfo`] values; errors are `io::Error`s whose kind says what went
//! wrong (`AlreadyExists`, `NotFound`, `InvalidInput`, `InvalidData` for a
//! file that is not what the URI says) and whose message is meant for an
//! operator.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::sqlite::{self, Compression, SqliteOptions, VolumeRecord};
use crate::uri::{parse, Spec, Target};

/// Which store holds a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    File,
    Sqlite,
    S3,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::File => "file",
            StoreKind::Sqlite => "sqlite",
            StoreKind::S3 => "s3",
        }
    }
}

impl std::fmt::Display for StoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is known about one volume without opening it for I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub kind: StoreKind,
    /// The volume's name: its name in the database, or the file name.
    pub name: String,
    /// Where it lives: the image file or the database file.
    pub location: String,
    /// A URI that opens this volume (`serve --export NAME=URI`, `copy`).
    pub uri: String,
    /// Size in bytes as clients see it.
    pub size: u64,
    /// Bytes of the volume that hold data (the rest reads as zeros without
    /// taking space).
    pub allocated: u64,
    /// Bytes the store spends on that data when it differs from
    /// `allocated` (compressed chunks).
    pub stored: Option<u64>,
    /// Chunked stores: the fixed chunk size.
    pub chunk_size: Option<u64>,
    /// Chunked stores: `none` or `zstd`.
    pub compression: Option<String>,
    /// Chunked stores: number of chunks stored.
    pub chunks: Option<u64>,
    /// When the store records it: creation time, UTC.
    pub created: Option<String>,
    /// Files: not a regular file but a block device.
    pub block_device: bool,
    /// S3: how this server enforces the single-writer lease, probed now:
    /// `conditional`, or `best-effort` where it ignores conditional writes.
    pub lease_mode: Option<String>,
    /// S3: who holds the lease (`free` when nobody does).
    pub lease: Option<String>,
}

/// What `create` makes. Values also given in the URI (`size=`,
/// `chunk_size=`, `compression=`) must agree with these.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateOptions {
    pub size: Option<u64>,
    /// sqlite only (default 64K).
    pub chunk_size: Option<u64>,
    /// sqlite only (default none).
    pub compression: Option<Compression>,
    /// Replace an existing volume (its data is lost) instead of refusing.
    pub replace: bool,
}

fn err(kind: io::ErrorKind, msg: impl Into<String>) -> io::Error {
    io::Error::new(kind, msg.into())
}

fn invalid(msg: impl Into<String>) -> io::Error {
    err(io::ErrorKind::InvalidInput, msg)
}

/// `io::Error` with `uri: ` in front, keeping its kind.
fn in_uri(uri: &str, e: io::Error) -> io::Error {
    err(e.kind(), format!("{uri}: {e}"))
}

fn parse_io(uri: &str) -> io::Result<Spec> {
    parse(uri).map_err(invalid)
}

fn memory_has_nothing(uri: &str) -> io::Error {
    invalid(format!(
        "{uri}: memory volumes exist only inside a running server, so there is nothing to manage; \
         use file: or sqlite:"
    ))
}

fn sqlite_volume<'a>(uri: &str, spec: &'a Spec) -> io::Result<&'a str> {
    spec.volume.as_deref().ok_or_else(|| {
        let sep = if uri.contains('?') { '&' } else { '?' };
        invalid(format!(
            "{uri}: name the volume inside the database: add {sep}volume=NAME"
        ))
    })
}

/// Create a volume that does not exist yet. `file:` makes a sparse image
/// (parent directories too); `sqlite:PATH?volume=NAME` creates the volume
/// in the database, creating the database if missing. An existing volume
/// is an `AlreadyExists` error unless `opts.replace`. Blocking.
pub fn create(uri: &str, opts: &CreateOptions) -> io::Result<VolumeInfo> {
    let spec = parse_io(uri)?;
    if spec.readonly {
        return Err(invalid(format!(
            "{uri}: a new volume cannot be read-only; leave readonly out"
        )));
    }
    let size = agree(uri, "size", spec.size, opts.size)?
        .ok_or_else(|| invalid(format!("{uri}: give the size of the new volume, e.g. 10G")))?;
    let chunk_size = agree(uri, "chunk_size", spec.chunk_size, opts.chunk_size)?;
    let compression = agree(uri, "compression", spec.compression, opts.compression)?;
    match &spec.target {
        Target::File(path) => {
            if chunk_size.is_some() || compression.is_some() {
                return Err(invalid(format!(
                    "{uri}: chunk size and compression apply to sqlite: volumes; a file: image has neither"
                )));
            }
            create_file(path, size, opts.replace).map_err(|e| in_uri(uri, e))?;
            file_info(path).map_err(|e| in_uri(uri, e))
        }
        Target::Sqlite(path) => {
            let name = sqlite_volume(uri, &spec)?;
            let sqlite_opts = SqliteOptions {
                size: Some(size),
                chunk_size,
                compression,
                read_only: false,
            };
            let created = match sqlite::create_volume(path, name, &sqlite_opts) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && opts.replace => {
                    sqlite::delete_volume(path, name).map_err(|e| in_uri(uri, e))?;
                    sqlite::create_volume(path, name, &sqlite_opts)
                }
                other => other,
            };
            let record = created.map_err(|e| in_uri(uri, e))?;
            Ok(sqlite_info(path, record))
        }
        Target::S3 => crate::s3::manage::create_blocking(uri, &spec, size, chunk_size, compression, opts.replace),
        Target::Memory => Err(memory_has_nothing(uri)),
    }
}

/// The volumes a store holds. `sqlite:PATH`: every volume in the database.
/// `file:DIR`: the image files in the directory (not hidden files, SQLite
/// databases or their journals), by name; `file:PATH` of a file lists it
/// alone. Blocking.
pub fn list(store_uri: &str) -> io::Result<Vec<VolumeInfo>> {
    let spec = parse_io(store_uri)?;
    match &spec.target {
        Target::File(path) => list_files(path).map_err(|e| in_uri(store_uri, e)),
        Target::Sqlite(path) => {
            let records = match &spec.volume {
                Some(name) => vec![sqlite::describe_volume(path, name)],
                None => match sqlite::list_volumes(path) {
                    Ok(all) => all.into_iter().map(Ok).collect(),
                    Err(e) => vec![Err(e)],
                },
            };
            records
                .into_iter()
                .map(|r| {
                    r.map(|r| sqlite_info(path, r))
                        .map_err(|e| in_uri(store_uri, e))
                })
                .collect()
        }
        Target::S3 => crate::s3::manage::list_blocking(store_uri, &spec),
        Target::Memory => Err(memory_has_nothing(store_uri)),
    }
}

/// What is known about one volume. Blocking.
pub fn info(uri: &str) -> io::Result<VolumeInfo> {
    let spec = parse_io(uri)?;
    match &spec.target {
        Target::File(path) => file_info(path).map_err(|e| in_uri(uri, e)),
        Target::Sqlite(path) => {
            let name = sqlite_volume(uri, &spec)?;
            let record = sqlite::describe_volume(path, name).map_err(|e| in_uri(uri, e))?;
            Ok(sqlite_info(path, record))
        }
        Target::S3 => crate::s3::manage::info_blocking(uri, &spec),
        Target::Memory => Err(memory_has_nothing(uri)),
    }
}

/// Delete a volume and everything in it: an sqlite volume with all its
/// chunks, or an image file (never a directory or a device). Returns what
/// was deleted. Stop serving a volume before deleting it. Blocking.
pub fn delete(uri: &str) -> io::Result<VolumeInfo> {
    let spec = parse_io(uri)?;
    match &spec.target {
        Target::File(path) => {
            let info = file_info(path).map_err(|e| in_uri(uri, e))?;
            if info.block_device {
                return Err(invalid(format!(
                    "{uri}: {} is a block device; longwire deletes image files only",
                    path.display()
                )));
            }
            fs::remove_file(path)
                .and_then(|()| sync_parent(path))
                .map_err(|e| {
                    in_uri(
                        uri,
                        err(e.kind(), format!("cannot delete {}: {e}", path.display())),
                    )
                })?;
            tracing::info!(path = %path.display(), "deleted image");
            Ok(info)
        }
        Target::Sqlite(path) => {
            let name = sqlite_volume(uri, &spec)?;
            let record = sqlite::delete_volume(path, name).map_err(|e| in_uri(uri, e))?;
            Ok(sqlite_info(path, record))
        }
        Target::S3 => crate::s3::manage::delete_blocking(uri, &spec),
        Target::Memory => Err(memory_has_nothing(uri)),
    }
}

/// A value given both in the URI and as an option must be the same.
fn agree<T: PartialEq + std::fmt::Debug>(
    uri: &str,
    what: &str,
    in_uri: Option<T>,
    given: Option<T>,
) -> io::Result<Option<T>> {
    match (in_uri, given) {
        (Some(a), Some(b)) if a != b => Err(invalid(format!(
            "{uri}: {what} is given twice with different values ({a:?} in the URI, {b:?} as an option); give it once"
        ))),
        (a, b) => Ok(b.or(a)),
    }
}

fn sqlite_info(path: &Path, r: VolumeRecord) -> VolumeInfo {
    let allocated = r.allocated();
    VolumeInfo {
        kind: StoreKind::Sqlite,
        uri: format!(
            "sqlite:{}?volume={}",
            encode(path.as_os_str().as_bytes(), false),
            encode(r.name.as_bytes(), true)
        ),
        name: r.name,
        location: path.display().to_string(),
        size: r.size,
        allocated,
        stored: (r.stored_bytes != allocated).then_some(r.stored_bytes),
        chunk_size: Some(r.chunk_size),
        compression: Some(r.compression.as_str().to_string()),
        chunks: Some(r.chunks),
        created: Some(r.created),
        block_device: false,
        lease_mode: None,
        lease: None,
    }
}

/// Make a sparse image of `size` bytes; `replace` empties an existing one
/// first (never a directory or a device).
fn create_file(path: &Path, size: u64, replace: bool) -> io::Result<()> {
    let shown = path.display();
    match fs::metadata(path) {
        Ok(m) if !m.is_file() => {
            return Err(err(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{shown} exists and is not a regular file; longwire creates image files only"
                ),
            ));
        }
        Ok(m) if !replace => {
            return Err(err(
                io::ErrorKind::AlreadyExists,
                format!("{shown} already exists ({} bytes)", m.len()),
            ));
        }
        _ => {}
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| {
            err(
                e.kind(),
                format!("cannot create directory {}: {e}", parent.display()),
            )
        })?;
    }
    let mut open = OpenOptions::new();
    open.write(true);
    if replace {
        open.create(true).truncate(true);
    } else {
        open.create_new(true);
    }
    let file = open.open(path).map_err(|e| {
        let kind = e.kind();
        err(kind, format!("cannot create {shown}: {e}"))
    })?;
    file.set_len(size)
        .and_then(|()| file.sync_all())
        .map_err(|e| {
            err(
                e.kind(),
                format!("cannot make {shown} {size} bytes long: {e}"),
            )
        })?;
    sync_parent(path).map_err(|e| {
        err(
            e.kind(),
            format!("cannot sync the directory of {shown}: {e}"),
        )
    })?;
    tracing::info!(path = %shown, size, "created sparse image");
    Ok(())
}

/// Make a file's creation or removal durable.
fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(parent)?.sync_all()
}

fn file_info(path: &Path) -> io::Result<VolumeInfo> {
    let shown = path.display();
    let meta = fs::metadata(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            err(e.kind(), format!("{shown} does not exist"))
        } else {
            err(e.kind(), format!("cannot stat {shown}: {e}"))
        }
    })?;
    let block_device = meta.file_type().is_block_device();
    let (size, allocated) = if meta.is_file() {
        (meta.len(), meta.blocks() * 512)
    } else if block_device {
        let mut f =
            File::open(path).map_err(|e| err(e.kind(), format!("cannot open {shown}: {e}")))?;
        let size = io::Seek::seek(&mut f, io::SeekFrom::End(0))?;
        (size, size)
    } else {
        return Err(invalid(format!(
            "{shown} is not an image file (it is a directory or a special file)"
        )));
    };
    Ok(VolumeInfo {
        kind: StoreKind::File,
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| shown.to_string()),
        location: shown.to_string(),
        uri: format!("file:{}", encode(path.as_os_str().as_bytes(), false)),
        size,
        allocated,
        stored: None,
        chunk_size: None,
        compression: None,
        chunks: None,
        created: None,
        block_device,
        lease_mode: None,
        lease: None,
    })
}

fn list_files(path: &Path) -> io::Result<Vec<VolumeInfo>> {
    let meta = fs::metadata(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            err(e.kind(), format!("{} does not exist", path.display()))
        } else {
            err(e.kind(), format!("cannot stat {}: {e}", path.display()))
        }
    })?;
    if !meta.is_dir() {
        return Ok(vec![file_info(path)?]);
    }
    let entries = fs::read_dir(path)
        .map_err(|e| err(e.kind(), format!("cannot list {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| err(e.kind(), format!("cannot list {}: {e}", path.display())))?;
        let name = entry.file_name();
        let bytes = name.as_bytes();
        let journal = [&b"-wal"[..], b"-shm", b"-journal"]
            .iter()
            .any(|s| bytes.ends_with(s));
        if bytes.starts_with(b".") || journal {
            continue;
        }
        let file = entry.path();
        // Follows symlinks; whatever vanished or is not a file is skipped.
        match fs::metadata(&file) {
            Ok(m) if m.is_file() && !is_sqlite(&file) => out.push(file_info(&file)?),
            _ => {}
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Starts with the SQLite header: a database, listed with `sqlite:PATH`.
fn is_sqlite(path: &Path) -> bool {
    let mut head = [0u8; 16];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map(|()| &head == b"SQLite format 3\0")
        .unwrap_or(false)
}

/// Percent-encode what `open_uri` would misread: `%`, `?`, `&`, `#`,
/// spaces, controls and non-ASCII bytes (`+` too in query values, where it
/// means a space).
fn encode(bytes: &[u8], query_value: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        let plain = b.is_ascii_graphic()
            && !matches!(b, b'%' | b'?' | b'&' | b'#')
            && !(query_value && matches!(b, b'+' | b'='));
        if plain {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    fn opts(size: u64) -> CreateOptions {
        CreateOptions {
            size: Some(size),
            ..Default::default()
        }
    }

    #[test]
    fn file_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a b%.img");
        let uri = format!("file:{}", encode(path.as_os_str().as_bytes(), false));
        let made = create(&uri, &opts(8 * M)).unwrap();
        assert_eq!(made.size, 8 * M);
        assert_eq!(made.uri, uri);
        assert!(made.allocated < M, "{made:?}");
        assert_eq!(fs::metadata(&path).unwrap().len(), 8 * M);

        let e = create(&uri, &opts(8 * M)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        fs::write(&path, b"data").unwrap();
        let again = create(
            &uri,
            &CreateOptions {
                replace: true,
                ..opts(4 * M)
            },
        )
        .unwrap();
        assert_eq!(again.size, 4 * M);
        assert_eq!(&fs::read(&path).unwrap()[..4], &[0; 4]);

        fs::write(dir.path().join(".hidden"), b"x").unwrap();
        fs::write(dir.path().join("z.img"), b"x").unwrap();
        let dir_uri = format!("file:{}", dir.path().display());
        let names: Vec<String> = list(&dir_uri)
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["a b%.img", "z.img"]);

        assert_eq!(delete(&uri).unwrap().size, 4 * M);
        assert!(!path.exists());
        assert_eq!(delete(&uri).unwrap_err().kind(), io::ErrorKind::NotFound);
        let e = delete(&dir_uri).unwrap_err();
        assert!(e.to_string().contains("not an image file"), "{e}");
    }

    #[test]
    fn sqlite_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("v.db");
        let store = format!("sqlite:{}", db.display());
        let a = create(
            &format!("{store}?volume=a&chunk_size=16K"),
            &CreateOptions {
                compression: Some(Compression::Zstd),
                ..opts(2 * M)
            },
        )
        .unwrap();
        assert_eq!(a.chunk_size, Some(16 << 10));
        assert_eq!(a.compression.as_deref(), Some("zstd"));
        assert_eq!((a.allocated, a.chunks), (0, Some(0)));
        create(&format!("{store}?volume=b+1"), &opts(M)).unwrap();

        let e = create(&format!("{store}?volume=a"), &opts(M)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        let e = create(&format!("{store}?volume=a&size=1M"), &opts(2 * M)).unwrap_err();
        assert!(e.to_string().contains("given twice"), "{e}");

        let all = list(&store).unwrap();
        let names: Vec<&str> = all.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["a", "b 1"]);
        assert_eq!(info(&all[1].uri).unwrap(), all[1]);

        let e = info(&format!("{store}?volume=c")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains(r#"it holds "a", "b 1""#), "{e}");

        delete(&format!("{store}?volume=a")).unwrap();
        assert_eq!(list(&store).unwrap().len(), 1);
        // A new volume never gets a deleted volume's id.
        create(&format!("{store}?volume=a"), &opts(M)).unwrap();
        let conn = rusqlite::Connection::open(&db).unwrap();
        let ids: Vec<i64> = conn
            .prepare("SELECT id FROM volumes ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(ids, [2, 3]);
    }

    #[test]
    fn refuses_what_is_not_a_longwire_database() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        fs::write(&img, vec![7u8; 8192]).unwrap();
        let e = list(&format!("sqlite:{}", img.display())).unwrap_err();
        assert!(e.to_string().contains("not an SQLite database"), "{e}");
        let e = create(&format!("sqlite:{}?volume=a", img.display()), &opts(M)).unwrap_err();
        assert!(e.to_string().contains("not an SQLite database"), "{e}");
        assert_eq!(fs::read(&img).unwrap(), vec![7u8; 8192]);
        let e = info("memory:?size=1G").unwrap_err();
        assert!(e.to_string().contains("running server"), "{e}");
    }
}
