//! The database layout and everything done at open time: telling a longwire
//! database from any other file, creating the schema in a new one, and
//! finding, creating or growing one volume's row. Runs once per open on a
//! short-lived connection of its own.

use std::io;
use std::path::Path;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use super::chunk::{Compression, VolInfo};
use super::{SqliteOptions, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// `PRAGMA application_id` of a longwire database ("lwir"). A database
/// without it is somebody else's and is never modified.
pub(super) const APPLICATION_ID: i32 = 0x6C77_6972;

/// How a "missing, give a size" `NotFound` message ends; `open_uri`
/// replaces it with the URI parameter to add.
pub(crate) const NEEDS_SIZE: &str = "; give a size to create it";

/// `PRAGMA user_version` and `volumes.format_version`: the layout below.
pub(super) const FORMAT_VERSION: i64 = 1;

/// How long a connection waits for a lock held by another connection (in
/// this process only during open; other processes, e.g. the `sqlite3`
/// shell, any time) before giving up with SQLITE_BUSY.
pub(super) const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Format version 1. `chunks` is a rowid table: see the measurements in the
/// module documentation (WITHOUT ROWID stores every BLOB's first part in
/// the primary-key b-tree, which made extent scans and random writes slower).
const SCHEMA: &str = "
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
);
CREATE TABLE volumes (
    name           TEXT PRIMARY KEY NOT NULL,
    id             INTEGER NOT NULL UNIQUE,
    size           INTEGER NOT NULL CHECK (size >= 0),
    chunk_size     INTEGER NOT NULL CHECK (chunk_size > 0),
    compression    TEXT NOT NULL,
    format_version INTEGER NOT NULL,
    created        TEXT NOT NULL
);
CREATE TABLE chunks (
    volume INTEGER NOT NULL REFERENCES volumes (id),
    idx    INTEGER NOT NULL,
    codec  INTEGER NOT NULL,
    data   BLOB NOT NULL,
    PRIMARY KEY (volume, idx)
);
INSERT INTO meta (key, value) VALUES ('syncs', 0);
";

/// Tables and columns a format-1 database has (checked, in this order).
const TABLES: &[(&str, &[&str])] = &[
    ("meta", &["key", "value"]),
    (
        "volumes",
        &[
            "name",
            "id",
            "size",
            "chunk_size",
            "compression",
            "format_version",
            "created",
        ],
    ),
    ("chunks", &["volume", "idx", "codec", "data"]),
];

/// An `io::Error` carrying an SQLite failure, with `context`.
pub(super) fn sql_io(context: impl std::fmt::Display, e: rusqlite::Error) -> io::Error {
    let kind = match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => io::ErrorKind::InvalidData,
        Some(rusqlite::ErrorCode::ReadOnly) | Some(rusqlite::ErrorCode::PermissionDenied) => {
            io::ErrorKind::PermissionDenied
        }
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("{context}: {e}"))
}

/// Open a connection with the settings every longwire connection shares.
pub(super) fn connect(path: &Path, read_only: bool) -> rusqlite::Result<Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

/// What a file turned out to be.
pub(super) enum Kind {
    /// A new or empty database: no tables, no marks.
    Empty,
    Longwire,
}

/// Decide whether the database is empty or a longwire database of this
/// format, without writing anything. Anything else is an `InvalidData`
/// error saying what was found.
pub(super) fn inspect(conn: &Connection, shown: &str) -> io::Result<Kind> {
    let q = |sql: &str| -> io::Result<i64> {
        conn.query_row(sql, [], |r| r.get(0)).map_err(|e| {
            if e.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase) {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{shown} is not an SQLite database, so not a longwire one ({e})"),
                )
            } else {
                sql_io(format_args!("cannot read {shown}"), e)
            }
        })
    };
    let app_id = q("PRAGMA application_id")?;
    let version = q("PRAGMA user_version")?;
    let objects = q("SELECT count(*) FROM sqlite_schema")?;
    if app_id == 0 && version == 0 && objects == 0 {
        return Ok(Kind::Empty);
    }
    let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
    if app_id != APPLICATION_ID as i64 {
        return Err(bad(format!(
            "{shown} is an SQLite database but not a longwire one (application_id {app_id:#x}, \
             expected {APPLICATION_ID:#x}); refusing to use it. Name a new file to create a longwire database"
        )));
    }
    if version != FORMAT_VERSION {
        return Err(bad(format!(
            "{shown} is a longwire database of format version {version}; this build reads version {FORMAT_VERSION}"
        )));
    }
    for (table, want) in TABLES {
        let mut stmt = conn
            .prepare("SELECT name FROM pragma_table_info(?1)")
            .map_err(|e| sql_io(format_args!("cannot read {shown}"), e))?;
        let have: Vec<String> = stmt
            .query_map([table], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(|e| sql_io(format_args!("cannot read {shown}"), e))?;
        if have.is_empty() {
            return Err(bad(format!(
                "{shown} is marked as a longwire database but has no table {table:?}; it is damaged"
            )));
        }
        if let Some(missing) = want.iter().find(|c| !have.iter().any(|h| h == *c)) {
            return Err(bad(format!(
                "{shown} is marked as a longwire database but its table {table:?} has no column {missing:?}; it is damaged"
            )));
        }
    }
    Ok(Kind::Longwire)
}

fn create_schema(conn: &Connection, shown: &str) -> io::Result<()> {
    conn.execute_batch(&format!(
        "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {FORMAT_VERSION}; {SCHEMA}"
    ))
    .map_err(|e| {
        sql_io(
            format_args!("cannot create the longwire tables in {shown}"),
            e,
        )
    })
}

/// SQLite page size of a new database, from the chunk size of its first
/// volume: a quarter chunk, between 4 KiB and 16 KiB. Chunks are BLOBs that
/// spill into chains of overflow pages; 16 KiB pages make a 64 KiB chunk a
/// chain of 5 pages instead of 17, which measured faster for sequential
/// and random I/O, while 4 KiB chunks waste less space in 4 KiB pages.
fn page_size_for(chunk: u64) -> u64 {
    (chunk / 4).clamp(4096, 16384)
}

/// Check a chunk size given by the user.
pub(crate) fn check_chunk_size(chunk: u64) -> Result<(), String> {
    if !chunk.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk) {
        return Err(format!(
            "chunk size {chunk} is not a power of two between {} and {} (e.g. 64K)",
            MIN_CHUNK_SIZE, MAX_CHUNK_SIZE
        ));
    }
    Ok(())
}

/// Open (creating or growing as asked) volume `name` in the database at
/// `path` and return its facts. Blocking.
pub(super) fn open_volume(path: &Path, name: &str, opts: &SqliteOptions) -> io::Result<VolInfo> {
    open_or_create(path, name, opts, false)
}

/// Create volume `name` (and the database if missing); an `AlreadyExists`
/// error if the volume is there already, so a typo cannot silently reuse
/// somebody's volume. `opts.size` is required. Blocking.
pub(super) fn create_new_volume(path: &Path, name: &str, opts: &SqliteOptions) -> io::Result<VolInfo> {
    if opts.size.is_none() || opts.read_only {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "creating a volume needs a size and a writable database",
        ));
    }
    open_or_create(path, name, opts, true)
}

fn open_or_create(
    path: &Path,
    name: &str,
    opts: &SqliteOptions,
    must_be_new: bool,
) -> io::Result<VolInfo> {
    let shown = path.display().to_string();
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    if name.is_empty() {
        return Err(invalid("the volume name is empty".into()));
    }
    if let Some(size) = opts.size {
        if size > i64::MAX as u64 {
            return Err(invalid(format!(
                "size {size} is too large for an SQLite volume (the limit is {} bytes)",
                i64::MAX
            )));
        }
    }
    if let Some(chunk) = opts.chunk_size {
        check_chunk_size(chunk).map_err(invalid)?;
    }

    let mut new_file = false;
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(invalid(format!(
                "{shown} is a directory, not a database file"
            )));
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if opts.read_only {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{shown} does not exist, and a read-only volume cannot create it"),
                ));
            }
            if opts.size.is_none() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{shown} does not exist{NEEDS_SIZE}"),
                ));
            }
            new_file = true;
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot create directory {}: {e}", parent.display()),
                    )
                })?;
            }
        }
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot open {shown}: {e}"),
            ))
        }
    }

    let mut conn = connect(path, opts.read_only)
        .map_err(|e| sql_io(format_args!("cannot open {shown}"), e))?;
    // Look before touching: switching to WAL rewrites the header, which must
    // never happen to somebody else's database.
    let kind = inspect(&conn, &shown)?;
    if opts.read_only {
        if let Kind::Empty = kind {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{shown} is an empty database with no volumes, and a read-only volume cannot create one"),
            ));
        }
    } else {
        if let Kind::Empty = kind {
            // Only possible before the first write; see `page_size_for`.
            let chunk = opts.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
            conn.execute_batch(&format!("PRAGMA page_size = {}", page_size_for(chunk)))
                .map_err(|e| sql_io(format_args!("cannot configure {shown}"), e))?;
        }
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| sql_io(format_args!("cannot switch {shown} to WAL mode"), e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(io::Error::other(format!(
                "{shown}: SQLite cannot use WAL mode here (it stays in {mode:?} mode); \
                 the database must be on a local file system"
            )));
        }
        // Creating or growing a volume is rare; make it durable at once.
        conn.execute_batch("PRAGMA synchronous = FULL")
            .map_err(|e| sql_io(format_args!("cannot configure {shown}"), e))?;
    }

    let behavior = if opts.read_only {
        TransactionBehavior::Deferred
    } else {
        TransactionBehavior::Immediate
    };
    let tx = conn
        .transaction_with_behavior(behavior)
        .map_err(|e| sql_io(format_args!("cannot lock {shown}"), e))?;
    // Again under the write lock: another process may have created it since.
    if let Kind::Empty = inspect(&tx, &shown)? {
        create_schema(&tx, &shown)?;
        tracing::info!(path = %shown, "created longwire SQLite database");
    }
    let info = find_or_create(&tx, path, &shown, name, opts, must_be_new)?;
    tx.commit()
        .map_err(|e| sql_io(format_args!("cannot commit to {shown}"), e))?;
    if new_file {
        // SQLite fsyncs the directory for the WAL it creates, not for the
        // database file itself.
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot sync directory {}: {e}", parent.display()),
                )
            })?;
    }
    Ok(info)
}

fn find_or_create(
    tx: &Connection,
    path: &Path,
    shown: &str,
    name: &str,
    opts: &SqliteOptions,
    must_be_new: bool,
) -> io::Result<VolInfo> {
    let ctx = |e| sql_io(format_args!("cannot read volume {name:?} from {shown}"), e);
    let row: Option<(i64, i64, i64, String, i64)> = tx
        .query_row(
            "SELECT id, size, chunk_size, compression, format_version FROM volumes WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()
        .map_err(ctx)?;
    let Some((id, stored_size, chunk, compression, version)) = row else {
        return create_volume(tx, path, shown, name, opts);
    };
    if must_be_new {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{shown} already has a volume {name:?} ({stored_size} bytes)"),
        ));
    }

    let damaged = |what: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("volume {name:?} in {shown} {what}; the database is damaged or from a newer longwire"),
        )
    };
    if version != FORMAT_VERSION {
        return Err(damaged(format!(
            "has format version {version}, not {FORMAT_VERSION}"
        )));
    }
    let chunk = u64::try_from(chunk).unwrap_or(0);
    if check_chunk_size(chunk).is_err() {
        return Err(damaged(format!("has an invalid chunk size {chunk}")));
    }
    let Some(stored_compression) = Compression::parse(&compression) else {
        return Err(damaged(format!(
            "has an unknown compression {compression:?}"
        )));
    };
    let Ok(current) = u64::try_from(stored_size) else {
        return Err(damaged(format!("has a negative size {stored_size}")));
    };

    let conflict = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    if let Some(want) = opts.chunk_size.filter(|&c| c != chunk) {
        return Err(conflict(format!(
            "volume {name:?} in {shown} has chunk size {} (fixed when it was created); \
             chunk_size={} conflicts with it. Leave chunk_size out to open it",
            human(chunk),
            human(want)
        )));
    }
    if let Some(want) = opts.compression.filter(|&c| c != stored_compression) {
        return Err(conflict(format!(
            "volume {name:?} in {shown} has compression {stored_compression} (fixed when it was created); \
             compression={want} conflicts with it. Leave compression out to open it"
        )));
    }

    let mut size = current;
    if let Some(wanted) = opts.size {
        if wanted < current {
            return Err(conflict(format!(
                "volume {name:?} in {shown} is {current} bytes; size {wanted} would shrink it and destroy data. \
                 Refusing: leave the size out to use the current size, or give one of at least {current} bytes"
            )));
        }
        if wanted > current {
            if opts.read_only {
                return Err(conflict(format!(
                    "volume {name:?} in {shown} is {current} bytes; size {wanted} would grow it, \
                     which a read-only volume cannot do. Leave the size out or open it writable"
                )));
            }
            tx.execute(
                "UPDATE volumes SET size = ?2 WHERE name = ?1",
                params![name, wanted as i64],
            )
            .map_err(|e| sql_io(format_args!("cannot grow volume {name:?} in {shown}"), e))?;
            tracing::info!(path = %shown, volume = name, from = current, to = wanted, "grew SQLite volume");
            size = wanted;
        }
    }
    Ok(VolInfo {
        id,
        name: name.to_string(),
        db_path: path.to_path_buf(),
        size,
        chunk,
        compression: stored_compression,
    })
}

fn create_volume(
    tx: &Connection,
    path: &Path,
    shown: &str,
    name: &str,
    opts: &SqliteOptions,
) -> io::Result<VolInfo> {
    let Some(size) = opts.size.filter(|_| !opts.read_only) else {
        let mut names: Vec<String> = Vec::new();
        if let Ok(mut stmt) = tx.prepare("SELECT name FROM volumes ORDER BY name LIMIT 21") {
            if let Ok(rows) = stmt.query_map([], |r| r.get(0)) {
                names = rows.filter_map(Result::ok).collect();
            }
        }
        let have = match names.len() {
            0 => "it holds no volumes yet".to_string(),
            n => {
                let more = if n > 20 { ", …" } else { "" };
                names.truncate(20);
                let list: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
                format!("it holds {}{more}", list.join(", "))
            }
        };
        let tail = if opts.read_only {
            "; a read-only volume cannot create it"
        } else {
            NEEDS_SIZE
        };
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{shown} has no volume {name:?} ({have}){tail}"),
        ));
    };
    let chunk = opts.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
    let compression = opts.compression.unwrap_or_default();
    // Ids are never reused (see `LAST_ID`): a server still holding a
    // deleted volume open must not write into a new one.
    let id: i64 = tx
        .query_row(
            &format!(
                "INSERT INTO volumes (name, id, size, chunk_size, compression, format_version, created)
                 VALUES (?1, max((SELECT coalesce(max(id), 0) FROM volumes),
                                 (SELECT coalesce(max(value), 0) FROM meta WHERE key = '{LAST_ID}')) + 1,
                         ?2, ?3, ?4, ?5, strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
                 RETURNING id"
            ),
            params![
                name,
                size as i64,
                chunk as i64,
                compression.as_str(),
                FORMAT_VERSION
            ],
            |r| r.get(0),
        )
        .map_err(|e| sql_io(format_args!("cannot create volume {name:?} in {shown}"), e))?;
    remember_id(tx, id)
        .map_err(|e| sql_io(format_args!("cannot create volume {name:?} in {shown}"), e))?;
    tracing::info!(path = %shown, volume = name, size, chunk_size = chunk, %compression, "created SQLite volume");
    Ok(VolInfo {
        id,
        name: name.to_string(),
        db_path: path.to_path_buf(),
        size,
        chunk,
        compression,
    })
}

/// `meta` key holding the highest volume id ever handed out. Older
/// databases lack it until their next create or delete; `max(id)` covers
/// them, since nothing was deleted by a build that did not write it.
pub(super) const LAST_ID: &str = "last_volume_id";

/// Record that volume id `id` has been used, so it is never handed out again.
pub(super) fn remember_id(tx: &Connection, id: i64) -> rusqlite::Result<()> {
    tx.execute(
        &format!(
            "INSERT INTO meta (key, value) VALUES ('{LAST_ID}', ?1)
             ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)"
        ),
        [id],
    )
    .map(drop)
}

/// `65536` → `64K`, for messages that echo what the user would write.
pub(super) fn human(n: u64) -> String {
    for (shift, unit) in [(30, "G"), (20, "M"), (10, "K")] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}
