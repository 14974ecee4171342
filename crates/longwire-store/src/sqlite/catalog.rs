//! The `volumes` table seen from outside a server: create a volume that
//! must not exist yet, list and describe volumes with what their chunks
//! occupy, delete a volume with all its chunks. Each call opens a
//! short-lived connection of its own; none starts the writer thread.

use std::io;
use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use super::schema::{self, connect, inspect, sql_io, Kind};
use super::{Compression, SqliteOptions};

/// One volume of a database, with the space its data takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    pub name: String,
    pub size: u64,
    pub chunk_size: u64,
    pub compression: Compression,
    /// When it was created (UTC, `YYYY-MM-DDTHH:MM:SSZ`).
    pub created: String,
    /// Chunks stored; every other chunk reads as zeros.
    pub chunks: u64,
    /// Bytes of chunk data in the database (after compression).
    pub stored_bytes: u64,
}

impl VolumeRecord {
    /// Bytes of the volume that hold data: stored chunks, whole (the last
    /// one only up to the end of the volume).
    pub fn allocated(&self) -> u64 {
        self.chunks.saturating_mul(self.chunk_size).min(self.size)
    }
}

/// Every volume in the database at `path`, by name. An empty database has
/// none; a missing file or one that is not a longwire database is an error.
pub fn list_volumes(path: &Path) -> io::Result<Vec<VolumeRecord>> {
    let Some(conn) = open_existing(path, true)? else {
        return Ok(Vec::new());
    };
    records(&conn, None).map_err(|e| sql_io(format_args!("cannot read {}", path.display()), e))
}

/// Volume `name` in the database at `path`; `NotFound` (naming the volumes
/// it does hold) when missing.
pub fn describe_volume(path: &Path, name: &str) -> io::Result<VolumeRecord> {
    let conn = open_existing(path, true)?;
    find(conn.as_ref(), path, name)
}

/// Create volume `name` (and the database, if missing) at `opts.size`;
/// `AlreadyExists` if the database holds it already.
pub fn create_volume(path: &Path, name: &str, opts: &SqliteOptions) -> io::Result<VolumeRecord> {
    schema::create_new_volume(path, name, opts)?;
    describe_volume(path, name)
}

/// Delete volume `name` and all its chunks in one transaction; returns what
/// it was. The database file does not shrink: freed pages are reused by
/// later writes (an offline `VACUUM` compacts it). A server that has the
/// volume open keeps serving its own view; stop serving it first.
pub fn delete_volume(path: &Path, name: &str) -> io::Result<VolumeRecord> {
    let shown = path.display().to_string();
    let mut conn = open_existing(path, false)?;
    let Some(conn) = conn.as_mut() else {
        return find(None, path, name);
    };
    let fail = |e| {
        sql_io(
            format_args!("cannot delete volume {name:?} from {shown}"),
            e,
        )
    };
    // A removed volume must stay removed after a power cut.
    conn.execute_batch("PRAGMA synchronous = FULL")
        .map_err(fail)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(fail)?;
    let record = find(Some(&tx), path, name)?;
    let id: i64 = tx
        .query_row("SELECT id FROM volumes WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .map_err(fail)?;
    tx.execute("DELETE FROM chunks WHERE volume = ?1", [id])
        .map_err(fail)?;
    tx.execute("DELETE FROM volumes WHERE id = ?1", [id])
        .map_err(fail)?;
    schema::remember_id(&tx, id).map_err(fail)?;
    tx.commit().map_err(fail)?;
    tracing::info!(path = %shown, volume = name, "deleted SQLite volume");
    Ok(record)
}

/// Open an existing file and check it is a longwire database without
/// changing it; `None` for an empty database (no volumes yet).
fn open_existing(path: &Path, read_only: bool) -> io::Result<Option<Connection>> {
    let shown = path.display().to_string();
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{shown} is a directory, not a database file"),
            ))
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{shown} does not exist"),
            ))
        }
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot open {shown}: {e}"),
            ))
        }
    }
    let conn =
        connect(path, read_only).map_err(|e| sql_io(format_args!("cannot open {shown}"), e))?;
    match inspect(&conn, &shown)? {
        Kind::Empty => Ok(None),
        Kind::Longwire => Ok(Some(conn)),
    }
}

/// The record of volume `name`, or a `NotFound` that lists what exists.
fn find(conn: Option<&Connection>, path: &Path, name: &str) -> io::Result<VolumeRecord> {
    let shown = path.display().to_string();
    let read = |e| sql_io(format_args!("cannot read {shown}"), e);
    let mut all = Vec::new();
    if let Some(conn) = conn {
        if let Some(r) = records(conn, Some(name)).map_err(read)?.pop() {
            return Ok(r);
        }
        let mut stmt = conn
            .prepare("SELECT name FROM volumes ORDER BY name LIMIT 21")
            .map_err(read)?;
        all = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(read)?;
    }
    let have = match all.len() {
        0 => "it holds no volumes".to_string(),
        n => {
            let more = if n > 20 { ", …" } else { "" };
            let list: Vec<String> = all.iter().take(20).map(|n| format!("{n:?}")).collect();
            format!("it holds {}{more}", list.join(", "))
        }
    };
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("{shown} has no volume {name:?} ({have})"),
    ))
}

/// Records of every volume, or of the one named.
fn records(conn: &Connection, name: Option<&str>) -> rusqlite::Result<Vec<VolumeRecord>> {
    // length() of a BLOB reads only the row header, not its overflow pages.
    let mut stmt = conn.prepare(
        "SELECT v.name, v.size, v.chunk_size, v.compression, v.created,
                (SELECT count(*) FROM chunks c WHERE c.volume = v.id),
                (SELECT coalesce(sum(length(c.data)), 0) FROM chunks c WHERE c.volume = v.id)
         FROM volumes v WHERE ?1 IS NULL OR v.name = ?1 ORDER BY v.name",
    )?;
    let rows = stmt.query_map([name], |r| {
        let compression: String = r.get(3)?;
        Ok(VolumeRecord {
            name: r.get(0)?,
            size: r.get::<_, i64>(1)?.max(0) as u64,
            chunk_size: r.get::<_, i64>(2)?.max(0) as u64,
            compression: Compression::parse(&compression).unwrap_or_default(),
            created: r.get(4)?,
            chunks: r.get::<_, i64>(5)?.max(0) as u64,
            stored_bytes: r.get::<_, i64>(6)?.max(0) as u64,
        })
    })?;
    rows.collect()
}
