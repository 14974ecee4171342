//! The per-database engine: one writer thread that owns the only write
//! connection, and a small pool of read-only connections used from tokio's
//! blocking pool. Every volume of one database file opened in this process
//! shares one engine (see [`Db::get`]), so they share one writer, one
//! commit stream and one flush.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Weak};
use std::thread::JoinHandle;

use bytes::Bytes;
use longwire_core::{VolumeError, VolumeResult};
use parking_lot::Mutex;
use rusqlite::{params, Connection};
use tokio::sync::{oneshot, Semaphore};

use super::chunk::{is_zero, pieces, Compression, Decoder, Encoder, Piece, VolInfo, CODEC_RAW};
use super::schema::{connect, sql_io};

/// Most requests the writer commits in one transaction (group commit).
const MAX_BATCH_OPS: usize = 256;
/// Most write payload bytes the writer commits in one transaction.
const MAX_BATCH_BYTES: usize = 64 << 20;
/// Read connections per database; more concurrent reads wait their turn.
const MAX_READERS: usize = 8;
/// Page cache of the writer connection (KiB). Partial-chunk writes read the
/// chunk back first; hot chunks stay in memory.
const WRITER_CACHE_KIB: i64 = 32 << 10;
/// Page cache of each read connection (KiB).
const READER_CACHE_KIB: i64 = 8 << 10;
/// Let the WAL grow to about this much before SQLite copies it into the
/// database file (a checkpoint, two fsyncs). SQLite's default of 1000 pages
/// (4 MiB with 4 KiB pages) means a checkpoint every 60 chunk writes.
const WAL_AUTOCHECKPOINT_BYTES: i64 = 64 << 20;
/// After a checkpoint, a WAL file larger than this is truncated to it.
const JOURNAL_SIZE_LIMIT: i64 = 64 << 20;

const SELECT_RANGE: &str =
    "SELECT idx, codec, data FROM chunks WHERE volume = ?1 AND idx >= ?2 AND idx <= ?3 ORDER BY idx";
const SELECT_ONE: &str = "SELECT codec, data FROM chunks WHERE volume = ?1 AND idx = ?2";
const SELECT_PRESENT: &str =
    "SELECT idx FROM chunks WHERE volume = ?1 AND idx >= ?2 AND idx <= ?3 ORDER BY idx LIMIT ?4";
const UPSERT: &str = "INSERT INTO chunks (volume, idx, codec, data) VALUES (?1, ?2, ?3, ?4)
     ON CONFLICT (volume, idx) DO UPDATE SET codec = excluded.codec, data = excluded.data";
const DELETE_ONE: &str = "DELETE FROM chunks WHERE volume = ?1 AND idx = ?2";
const DELETE_RANGE: &str = "DELETE FROM chunks WHERE volume = ?1 AND idx >= ?2 AND idx < ?3";
/// The write that gives a syncing commit something to commit (see the
/// module documentation: an empty transaction would not sync the WAL).
const BUMP_SYNCS: &str = "UPDATE meta SET value = value + 1 WHERE key = 'syncs'";

/// An SQLite failure during I/O on `vol`, as a [`VolumeError`]: a full disk
/// is ENOSPC, everything else EIO, with the volume and what was being done.
pub(super) fn sql_err(
    vol: &VolInfo,
    what: impl std::fmt::Display,
    e: rusqlite::Error,
) -> VolumeError {
    let msg = format!(
        "sqlite volume {:?} in {}: {what}: {e}",
        vol.name,
        vol.db_path.display()
    );
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => VolumeError::NoSpace(msg),
        _ => VolumeError::Io(io::Error::other(msg)),
    }
}

/// A second copy of an error, for failing every request of a batch.
fn dup(e: &VolumeError) -> VolumeError {
    match e {
        VolumeError::Io(io) => VolumeError::Io(io::Error::new(io.kind(), io.to_string())),
        VolumeError::Invalid(m) => VolumeError::Invalid(m.clone()),
        VolumeError::NoSpace(m) => VolumeError::NoSpace(m.clone()),
        VolumeError::ReadOnly => VolumeError::ReadOnly,
        VolumeError::NotSupported(m) => VolumeError::NotSupported(m.clone()),
        VolumeError::Overflow(m) => VolumeError::Overflow(m.clone()),
        VolumeError::Shutdown => VolumeError::Shutdown,
    }
}

fn writer_gone() -> VolumeError {
    VolumeError::Io(io::Error::other("the sqlite writer thread has stopped"))
}

/// A change for the writer thread.
pub(super) enum Op {
    Write {
        vol: Arc<VolInfo>,
        offset: u64,
        data: Bytes,
    },
    /// TRIM and WRITE_ZEROES: make the range read as zeros, dropping
    /// chunks that become all zero.
    Zero {
        vol: Arc<VolInfo>,
        offset: u64,
        len: u64,
    },
    /// Commit nothing new, but make everything committed so far durable.
    Flush,
}

struct Request {
    op: Op,
    /// Durable before the reply: FUA, or FLUSH.
    sync: bool,
    reply: oneshot::Sender<VolumeResult<()>>,
}

/// One database file's connections.
pub(super) struct Db {
    path: PathBuf,
    /// None when the database was opened read-only.
    writer: Option<Writer>,
    readers: Readers,
}

/// Databases open in this process, by canonical path, so volumes of one
/// file share one writer (two writers would fight over SQLite's write lock).
static OPEN: Mutex<Vec<(PathBuf, Weak<Db>)>> = Mutex::new(Vec::new());

impl Db {
    /// The engine for the database at `path` (which exists), shared with
    /// volumes of the same file opened earlier when possible.
    pub fn get(path: &Path, read_only: bool) -> io::Result<Arc<Db>> {
        let key = std::fs::canonicalize(path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
        })?;
        let mut open = OPEN.lock();
        open.retain(|(_, w)| w.strong_count() > 0);
        if let Some(db) = open
            .iter()
            .find(|(p, _)| *p == key)
            .and_then(|(_, w)| w.upgrade())
        {
            if read_only || db.writer.is_some() {
                return Ok(db);
            }
        }
        let writer = if read_only {
            None
        } else {
            Some(Writer::start(&key)?)
        };
        let db = Arc::new(Db {
            readers: Readers {
                path: key.clone(),
                idle: Mutex::new(Vec::new()),
                permits: Semaphore::new(MAX_READERS),
            },
            path: key.clone(),
            writer,
        });
        open.retain(|(p, _)| *p != key);
        open.push((key, Arc::downgrade(&db)));
        Ok(db)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hand `op` to the writer and wait until it is committed (and, with
    /// `sync`, durable).
    pub async fn submit(&self, op: Op, sync: bool) -> VolumeResult<()> {
        let writer = self.writer.as_ref().ok_or(VolumeError::ReadOnly)?;
        let tx = writer.tx.as_ref().ok_or_else(writer_gone)?;
        let (reply, done) = oneshot::channel();
        tx.send(Request { op, sync, reply })
            .map_err(|_| writer_gone())?;
        done.await.map_err(|_| writer_gone())?
    }

    /// Run `f` on a read connection in tokio's blocking pool.
    pub async fn read<T, F>(self: &Arc<Self>, f: F) -> VolumeResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut ReadConn) -> VolumeResult<T> + Send + 'static,
    {
        let _permit = self
            .readers
            .permits
            .acquire()
            .await
            .map_err(|_| VolumeError::Shutdown)?;
        let db = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut rc = match db.readers.idle.lock().pop() {
                Some(rc) => rc,
                None => ReadConn::open(&db.readers.path)?,
            };
            let result = f(&mut rc);
            db.readers.idle.lock().push(rc);
            result
        })
        .await
        .map_err(|e| VolumeError::Io(io::Error::other(format!("sqlite read task failed: {e}"))))?
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        // Close the read connections before the writer (dropped right after
        // this), so the writer's connection is the last one and checkpoints
        // the WAL into the database file and removes it. Read-only
        // connections cannot do that.
        self.readers.idle.lock().clear();
    }
}

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<ReadConn>>,
    permits: Semaphore,
}

/// A read-only connection and its decoding state.
pub(super) struct ReadConn {
    conn: Connection,
    dec: Decoder,
    scratch: Vec<u8>,
}

impl ReadConn {
    fn open(path: &Path) -> VolumeResult<ReadConn> {
        let conn = connect(path, true)
            .and_then(|c| {
                c.execute_batch(&format!("PRAGMA cache_size = -{READER_CACHE_KIB}"))?;
                c.set_prepared_statement_cache_capacity(16);
                Ok(c)
            })
            .map_err(|e| {
                VolumeError::Io(sql_io(format_args!("cannot open {}", path.display()), e))
            })?;
        Ok(ReadConn {
            conn,
            dec: Decoder::new(),
            scratch: Vec::new(),
        })
    }

    /// Walk `[offset, offset + len)` (inside the volume, `len` > 0) chunk
    /// piece by chunk piece, in order, in one statement (so one consistent
    /// snapshot): `emit(piece, Some(bytes))` for stored chunks,
    /// `emit(piece, None)` for missing ones, which read as zeros.
    pub fn scan(
        &mut self,
        vol: &VolInfo,
        offset: u64,
        len: u64,
        mut emit: impl FnMut(Piece, Option<&[u8]>),
    ) -> VolumeResult<()> {
        let ReadConn { conn, dec, scratch } = self;
        let first = offset / vol.chunk;
        let last = (offset + len - 1) / vol.chunk;
        let what = || format_args!("reading chunks {first}..={last}").to_string();
        let mut stmt = conn
            .prepare_cached(SELECT_RANGE)
            .map_err(|e| sql_err(vol, what(), e))?;
        let mut rows = stmt
            .query(params![vol.id, first as i64, last as i64])
            .map_err(|e| sql_err(vol, what(), e))?;
        let mut pending = pieces(vol.chunk, offset, len).peekable();
        while let Some(row) = rows.next().map_err(|e| sql_err(vol, what(), e))? {
            let index = row.get::<_, i64>(0).map_err(|e| sql_err(vol, what(), e))? as u64;
            while let Some(p) = pending.next_if(|p| p.index < index) {
                emit(p, None);
            }
            let Some(p) = pending.next_if(|p| p.index == index) else {
                continue;
            };
            let codec: i64 = row
                .get(1)
                .map_err(|e| vol.chunk_error(index, format_args!("bad codec column: {e}")))?;
            let blob = row
                .get_ref(2)
                .and_then(|v| v.as_blob().map_err(Into::into))
                .map_err(|e| vol.chunk_error(index, format_args!("bad data column: {e}")))?;
            let bytes = dec.piece(vol, p, codec, blob, scratch)?;
            emit(p, Some(bytes));
        }
        for p in pending {
            emit(p, None);
        }
        Ok(())
    }

    /// Indices of the first `limit` stored chunks in `[first, last]`, in order.
    pub fn present(
        &mut self,
        vol: &VolInfo,
        first: u64,
        last: u64,
        limit: usize,
    ) -> VolumeResult<Vec<u64>> {
        let what = || format!("listing chunks {first}..={last}");
        let mut stmt = self
            .conn
            .prepare_cached(SELECT_PRESENT)
            .map_err(|e| sql_err(vol, what(), e))?;
        let rows = stmt
            .query_map(
                params![vol.id, first as i64, last as i64, limit as i64],
                |r| r.get::<_, i64>(0),
            )
            .map_err(|e| sql_err(vol, what(), e))?;
        rows.map(|r| r.map(|i| i as u64).map_err(|e| sql_err(vol, what(), e)))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------

/// The handle to the writer thread. Dropping it lets the thread finish the
/// requests already queued, close its connection (which checkpoints the WAL
/// into the database file) and exit; the drop waits for that.
struct Writer {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(path: &Path) -> io::Result<Writer> {
        let shown = path.display();
        let conn = connect(path, false)
            .and_then(|c| {
                c.execute_batch(&format!(
                    "PRAGMA journal_mode = WAL;
                     PRAGMA synchronous = NORMAL;
                     PRAGMA cache_size = -{WRITER_CACHE_KIB};
                     PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT};"
                ))?;
                let page: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
                c.execute_batch(&format!(
                    "PRAGMA wal_autocheckpoint = {}",
                    WAL_AUTOCHECKPOINT_BYTES / page.max(512)
                ))?;
                c.set_prepared_statement_cache_capacity(16);
                Ok(c)
            })
            .map_err(|e| sql_io(format_args!("cannot open {shown} for writing"), e))?;
        let (tx, rx) = mpsc::channel();
        let state = WriterThread {
            conn,
            enc: Encoder::new(),
            dec: Decoder::new(),
            scratch: Vec::new(),
            dirty: false,
            full_sync: false,
        };
        let thread = std::thread::Builder::new()
            .name("longwire-sqlite".into())
            .spawn(move || state.run(rx))
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot start the writer thread for {shown}: {e}"),
                )
            })?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct WriterThread {
    conn: Connection,
    enc: Encoder,
    dec: Decoder,
    /// One chunk, for read-modify-write.
    scratch: Vec<u8>,
    /// Something was committed with synchronous=NORMAL (in the WAL, not yet
    /// fsynced) since the last syncing commit.
    dirty: bool,
    /// The connection is currently at synchronous=FULL.
    full_sync: bool,
}

impl WriterThread {
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        while let Ok(first) = rx.recv() {
            let mut bytes = first.op.payload();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_OPS && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(r) => {
                        bytes += r.op.payload();
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            let results = self.run_batch(&batch);
            for (req, result) in batch.into_iter().zip(results) {
                let _ = req.reply.send(result);
            }
        }
    }

    /// Apply a batch in one transaction; one result per request. A request
    /// that fails is rolled back alone (savepoint) unless SQLite abandoned
    /// the whole transaction, in which case every request fails.
    fn run_batch(&mut self, batch: &[Request]) -> Vec<VolumeResult<()>> {
        let sync = batch.iter().any(|r| r.sync);
        let fail_all = |e: VolumeError| batch.iter().map(|_| Err(dup(&e))).collect();
        let conn_err = |what: &str, e: rusqlite::Error| {
            let msg = format!("sqlite: {what}: {e}");
            match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::DiskFull) => VolumeError::NoSpace(msg),
                _ => VolumeError::Io(io::Error::other(msg)),
            }
        };
        // synchronous can only change outside a transaction.
        if self.full_sync != sync {
            let pragma = if sync {
                "PRAGMA synchronous = FULL"
            } else {
                "PRAGMA synchronous = NORMAL"
            };
            if let Err(e) = self.exec(pragma) {
                return fail_all(conn_err("setting synchronous", e));
            }
            self.full_sync = sync;
        }
        if let Err(e) = self.exec("BEGIN IMMEDIATE") {
            return fail_all(conn_err("starting a transaction", e));
        }
        let mut results = Vec::with_capacity(batch.len());
        let mut changed = false;
        for req in batch {
            match self.apply_alone(&req.op) {
                Ok(c) => {
                    changed |= c;
                    results.push(Ok(()));
                }
                Err(e) if self.conn.is_autocommit() => {
                    // SQLite rolled the whole transaction back (I/O error,
                    // disk full): nothing of this batch happened.
                    return fail_all(e);
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if sync && (self.dirty || changed) {
            if let Err(e) = self.exec(BUMP_SYNCS) {
                let _ = self.exec("ROLLBACK");
                return fail_all(conn_err("recording a flush", e));
            }
        }
        if let Err(e) = self.exec("COMMIT") {
            if !self.conn.is_autocommit() {
                let _ = self.exec("ROLLBACK");
            }
            return fail_all(conn_err("committing", e));
        }
        self.dirty = !sync && (self.dirty || changed);
        results
    }

    fn exec(&self, sql: &str) -> rusqlite::Result<()> {
        self.conn.prepare_cached(sql)?.execute([]).map(|_| ())
    }

    /// Apply one op inside a savepoint, so a failure undoes only its own
    /// changes. Returns whether anything changed.
    fn apply_alone(&mut self, op: &Op) -> VolumeResult<bool> {
        let (vol, result) = match op {
            Op::Flush => return Ok(false),
            Op::Write { vol, .. } | Op::Zero { vol, .. } => {
                self.exec("SAVEPOINT op")
                    .map_err(|e| sql_err(vol, "savepoint", e))?;
                (vol, self.apply(op))
            }
        };
        if result.is_err() && !self.conn.is_autocommit() {
            self.exec("ROLLBACK TO op")
                .map_err(|e| sql_err(vol, "rolling back", e))?;
        }
        if !self.conn.is_autocommit() {
            self.exec("RELEASE op")
                .map_err(|e| sql_err(vol, "savepoint", e))?;
        }
        result
    }

    fn apply(&mut self, op: &Op) -> VolumeResult<bool> {
        match op {
            Op::Write { vol, offset, data } => self.write(vol, *offset, data),
            Op::Zero { vol, offset, len } => self.zero(vol, *offset, *len),
            Op::Flush => Ok(false),
        }
    }

    fn write(&mut self, vol: &VolInfo, offset: u64, data: &[u8]) -> VolumeResult<bool> {
        let mut changed = false;
        let mut pos = 0;
        for p in pieces(vol.chunk, offset, data.len() as u64) {
            let src = &data[pos..pos + p.len];
            pos += p.len;
            let whole = p.start == 0 && p.len as u64 >= vol.logical_len(p.index);
            if !whole {
                changed |= self.modify(vol, p, Some(src))?;
            } else if is_zero(src) {
                changed |= self.delete(vol, p.index)?;
            } else if p.len as u64 == vol.chunk {
                put(
                    &self.conn,
                    &mut self.enc,
                    vol,
                    p.index,
                    src,
                    vol.compression,
                )?;
                changed = true;
            } else {
                // The last chunk of a volume whose size is not a multiple
                // of the chunk size: stored whole, zero past the end.
                self.scratch.clear();
                self.scratch.resize(vol.chunk as usize, 0);
                self.scratch[..p.len].copy_from_slice(src);
                put(
                    &self.conn,
                    &mut self.enc,
                    vol,
                    p.index,
                    &self.scratch,
                    vol.compression,
                )?;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Make `[offset, offset + len)` read as zeros: chunks wholly inside
    /// are deleted with one range DELETE (cost: chunks present, not chunks
    /// covered), partial chunks at either end are rewritten (unless
    /// those bytes are zero already).
    fn zero(&mut self, vol: &VolInfo, offset: u64, len: u64) -> VolumeResult<bool> {
        let end = offset + len;
        let first_full = offset.div_ceil(vol.chunk);
        // A range reaching the end of the volume covers its last chunk even
        // when the size is not a multiple of the chunk size.
        let end_full = if end == vol.size {
            end.div_ceil(vol.chunk)
        } else {
            end / vol.chunk
        };
        let mut changed = false;
        if first_full >= end_full {
            for p in pieces(vol.chunk, offset, len) {
                changed |= self.modify(vol, p, None)?;
            }
            return Ok(changed);
        }
        let n = self
            .conn
            .prepare_cached(DELETE_RANGE)
            .and_then(|mut s| s.execute(params![vol.id, first_full as i64, end_full as i64]))
            .map_err(|e| {
                sql_err(
                    vol,
                    format_args!("deleting chunks {first_full}..{end_full}"),
                    e,
                )
            })?;
        changed |= n > 0;
        let head_end = (first_full * vol.chunk).min(end);
        let tail_start = (end_full * vol.chunk).min(end).max(head_end);
        for p in pieces(vol.chunk, offset, head_end - offset).chain(pieces(
            vol.chunk,
            tail_start,
            end - tail_start,
        )) {
            changed |= self.modify(vol, p, None)?;
        }
        Ok(changed)
    }

    /// Read-modify-write of part of one chunk: `src` bytes, or zeros when
    /// `src` is None. A missing chunk counts as zeros; a chunk that ends up
    /// all zero is deleted. Returns whether anything changed.
    fn modify(&mut self, vol: &VolInfo, p: Piece, src: Option<&[u8]>) -> VolumeResult<bool> {
        let writes_zero = src.is_none_or(is_zero);
        let codec = self.load(vol, p.index)?;
        let exists = codec.is_some();
        if !exists {
            if writes_zero {
                return Ok(false);
            }
            self.scratch.clear();
            self.scratch.resize(vol.chunk as usize, 0);
        } else if writes_zero && is_zero(&self.scratch[p.start..p.start + p.len]) {
            // Zeros over zeros: rewriting the chunk (and maybe compressing
            // it again) would change nothing.
            return Ok(false);
        }
        let dst = &mut self.scratch[p.start..p.start + p.len];
        match src {
            Some(s) => dst.copy_from_slice(s),
            None => dst.fill(0),
        }
        if writes_zero && is_zero(&self.scratch) {
            return self.delete(vol, p.index);
        }
        // A chunk stored raw did not compress; a small patch is unlikely to
        // change that, so do not spend a compression attempt on it (with
        // incompressible data that tripled the cost of 4K random writes).
        // The next write of a quarter chunk or more tries again.
        let compression = if codec == Some(CODEC_RAW) && (p.len as u64) < vol.chunk / 4 {
            Compression::None
        } else {
            vol.compression
        };
        put(
            &self.conn,
            &mut self.enc,
            vol,
            p.index,
            &self.scratch,
            compression,
        )?;
        Ok(true)
    }

    /// Decode chunk `index` into `self.scratch`; its codec, or None when it
    /// is missing.
    fn load(&mut self, vol: &VolInfo, index: u64) -> VolumeResult<Option<i64>> {
        let what = || format!("reading chunk {index}");
        let mut stmt = self
            .conn
            .prepare_cached(SELECT_ONE)
            .map_err(|e| sql_err(vol, what(), e))?;
        let mut rows = stmt
            .query(params![vol.id, index as i64])
            .map_err(|e| sql_err(vol, what(), e))?;
        let Some(row) = rows.next().map_err(|e| sql_err(vol, what(), e))? else {
            return Ok(None);
        };
        let codec: i64 = row
            .get(0)
            .map_err(|e| vol.chunk_error(index, format_args!("bad codec column: {e}")))?;
        let blob = row
            .get_ref(1)
            .and_then(|v| v.as_blob().map_err(Into::into))
            .map_err(|e| vol.chunk_error(index, format_args!("bad data column: {e}")))?;
        self.scratch.resize(vol.chunk as usize, 0);
        self.dec
            .decode(vol, index, codec, blob, &mut self.scratch)?;
        Ok(Some(codec))
    }

    fn delete(&mut self, vol: &VolInfo, index: u64) -> VolumeResult<bool> {
        let n = self
            .conn
            .prepare_cached(DELETE_ONE)
            .and_then(|mut s| s.execute(params![vol.id, index as i64]))
            .map_err(|e| sql_err(vol, format_args!("deleting chunk {index}"), e))?;
        Ok(n > 0)
    }
}

/// Store `data` (one whole chunk) as chunk `index`: one statement, so a
/// crash leaves either the old chunk or the new one.
fn put(
    conn: &Connection,
    enc: &mut Encoder,
    vol: &VolInfo,
    index: u64,
    data: &[u8],
    compression: Compression,
) -> VolumeResult<()> {
    let (codec, blob) = enc.encode(data, compression);
    conn.prepare_cached(UPSERT)
        .and_then(|mut s| s.execute(params![vol.id, index as i64, codec, blob]))
        .map_err(|e| sql_err(vol, format_args!("writing chunk {index}"), e))?;
    Ok(())
}

impl Op {
    fn payload(&self) -> usize {
        match self {
            Op::Write { data, .. } => data.len(),
            _ => 0,
        }
    }
}
