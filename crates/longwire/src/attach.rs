//! `longwire attach URI DIR/FILE`: a remote NBD export as one regular file
//! in a FUSE mount (like libnbd's `nbdfuse`), sitting on [`NbdVolume`] so
//! that server restarts and network cuts are ridden out: requests are
//! re-sent after a reconnect instead of failing.
//!
//! Threads: fuser reads requests from /dev/fuse on its own thread and calls
//! the [`Filesystem`] methods there. Each I/O method hands the request to
//! the tokio runtime (through a [`Handle`]) and returns at once; the task
//! replies when the volume answers. So the kernel may have many requests
//! outstanding (a filesystem on a loop device on top sees a queue depth
//! above 1), and a slow or reconnecting server never blocks the FUSE loop.
//!
//! `longwire detach` (or `fusermount3 -u`) unmounts; SIGINT/SIGTERM flush
//! the volume and unmount. Either way the process flushes and exits 0.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use bytes::Bytes;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use longwire_core::{Volume, VolumeError, ZeroFlags};
use longwire_nbd::client::{ClientConfig, NbdUri, NbdVolume};
use tokio::runtime::Handle;
use tracing::{error, info, warn};

use crate::cli::{AttachArgs, DetachArgs};

const ROOT: INodeNo = INodeNo::ROOT;
const FILE_INO: INodeNo = INodeNo(2);
/// Attributes never change behind the kernel's back (the size is fixed for
/// the life of the client), so they may be cached for a while.
const TTL: Duration = Duration::from_secs(60);
/// The FUSE fstype shows up as `fuse.longwire` in /proc/mounts.
pub const SUBTYPE: &str = "longwire";

/// The client settings the attach options describe.
pub fn client_config(timeout: Option<u64>, connections: Option<usize>, reconnect_for: Option<&str>) -> anyhow::Result<ClientConfig> {
    let mut config = ClientConfig::default();
    if let Some(t) = timeout {
        if t == 0 {
            bail!("--timeout must be at least 1 second");
        }
        config.request_timeout = Duration::from_secs(t);
    }
    if let Some(n) = connections {
        if n == 0 {
            bail!("--connections must be at least 1");
        }
        config.connections = n;
    }
    match reconnect_for.map(str::trim) {
        None => {}
        Some("forever") | Some("inf") | Some("infinity") => config.reconnect.give_up_after = None,
        Some("0") => config.reconnect.enabled = false,
        Some(s) => {
            let secs: u64 = s
                .parse()
                .map_err(|_| anyhow::anyhow!("--reconnect-for takes whole seconds, 0 (never reconnect) or \"forever\", not {s:?}"))?;
            config.reconnect.give_up_after = Some(Duration::from_secs(secs));
        }
    }
    Ok(config)
}

/// Split `DIR/FILE` into the mount point and the file name, checking both.
fn split_target(target: &Path) -> anyhow::Result<(PathBuf, String)> {
    let name = target
        .file_name()
        .and_then(OsStr::to_str)
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .ok_or_else(|| anyhow::anyhow!("{}: give DIR/FILE: DIR is mounted, FILE is the name of the disk file in it", target.display()))?
        .to_string();
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = std::fs::canonicalize(&parent).with_context(|| format!("mount point {}", parent.display()))?;
    if !dir.is_dir() {
        bail!("mount point {} is not a directory", dir.display());
    }
    if target.is_dir() {
        bail!(
            "{} is a directory: give DIR/FILE (DIR is mounted and FILE appears in it), e.g. {}/disk",
            target.display(),
            target.display()
        );
    }
    Ok((dir, name))
}

pub fn run(args: AttachArgs) -> anyhow::Result<()> {
    // Reject a malformed URI before anything else (connecting reports it too, less directly).
    args.uri.parse::<NbdUri>().map_err(|e| anyhow::anyhow!("{e}"))?;
    let config = client_config(args.timeout, args.connections, args.reconnect_for.as_deref())?;
    let (mountpoint, name) = split_target(&args.file)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let volume = runtime
        .block_on(NbdVolume::connect(&args.uri, config.clone()))
        .with_context(|| format!("connecting to {}", args.uri))?;
    let volume: Arc<NbdVolume> = Arc::new(volume);
    let caps = volume.capabilities();
    let read_only = args.read_only || caps.read_only;
    info!(
        uri = %args.uri,
        size = volume.size(),
        read_only,
        "attached {} at {} (request timeout {} s, reconnect {})",
        args.uri,
        mountpoint.join(&name).display(),
        config.request_timeout.as_secs(),
        match (config.reconnect.enabled, config.reconnect.give_up_after) {
            (false, _) => "off".to_string(),
            (true, None) => "forever".to_string(),
            (true, Some(d)) => format!("for up to {} s", d.as_secs()),
        }
    );

    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let fs = AttachFs {
        volume: volume.clone(),
        handle: runtime.handle().clone(),
        name: name.clone(),
        read_only,
        uid,
        gid,
        started: SystemTime::now(),
        last_error: Arc::new(Mutex::new(String::new())),
    };
    let mut options = vec![
        MountOption::FSName(args.uri.clone()),
        MountOption::Subtype(SUBTYPE.into()),
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoExec,
    ];
    options.push(if read_only { MountOption::RO } else { MountOption::RW });
    let mut mount_config = fuser::Config::default();
    mount_config.mount_options = options;
    let session = fuser::Session::new(fs, &mountpoint, &mount_config)
        .with_context(|| format!("mounting FUSE on {} (is fusermount3 installed and /dev/fuse present?)", mountpoint.display()))?;
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    let fuse_thread = std::thread::Builder::new().name("fuse".into()).spawn(move || {
        let r = session.run();
        let _ = done_tx.send(());
        r
    })?;
    info!("{} is ready; detach with: longwire detach {}", mountpoint.join(&name).display(), mountpoint.display());

    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        loop {
            let sig = tokio::select! {
                _ = &mut done_rx => {
                    info!("{} was unmounted", mountpoint.display());
                    break;
                }
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            info!("{sig}: flushing and unmounting {}", mountpoint.display());
            if let Err(e) = volume.flush().await {
                error!("flush before unmounting failed: {e}");
            }
            match fusermount_u(&mountpoint) {
                Ok(()) => {
                    // The FUSE loop ends once the kernel lets go.
                    if tokio::time::timeout(Duration::from_secs(10), &mut done_rx).await.is_err() {
                        warn!("the FUSE session did not end within 10 s of unmounting");
                    }
                    break;
                }
                Err(e) => {
                    // Busy (e.g. loop-mounted): keep serving rather than lose data.
                    error!("cannot unmount {}: {e}; still attached (unmount what uses it, then signal again)", mountpoint.display());
                }
            }
        }
        anyhow::Ok(())
    })?;
    let session_result = fuse_thread.join().map_err(|_| anyhow::anyhow!("the FUSE thread panicked"))?;
    let flushed = runtime.block_on(async {
        let r = volume.flush().await;
        volume.client().close().await;
        r
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    if let Err(e) = session_result {
        warn!("FUSE session ended with an error: {e}");
    }
    flushed.context("final flush of the volume")?;
    info!("detached");
    Ok(())
}

/// The filesystem: a root directory holding one file, the volume.
struct AttachFs {
    volume: Arc<NbdVolume>,
    handle: Handle,
    name: String,
    read_only: bool,
    uid: u32,
    gid: u32,
    started: SystemTime,
    /// The last I/O error logged, so a dead server logs once, not per request.
    last_error: Arc<Mutex<String>>,
}

impl AttachFs {
    fn attr(&self, ino: INodeNo) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o755, 0, 2)
        } else {
            let perm = if self.read_only { 0o444 } else { 0o644 };
            (FileType::RegularFile, perm, self.volume.size(), 1)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Run `op` on the runtime and hand its result to `reply`.
    fn spawn<T, F, R>(&self, what: &'static str, op: F, reply: R)
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, VolumeError>> + Send + 'static,
        R: FnOnce(Result<T, Errno>) + Send + 'static,
    {
        let last_error = self.last_error.clone();
        self.handle.spawn(async move {
            let r = op.await.map_err(|e| {
                let msg = format!("{what} failed: {e}");
                let mut last = last_error.lock().unwrap();
                if *last != msg {
                    error!("{msg}");
                    *last = msg;
                }
                Errno::from_i32(e.errno())
            });
            if r.is_ok() {
                let mut last = last_error.lock().unwrap();
                if !last.is_empty() {
                    info!("I/O works again");
                    last.clear();
                }
            }
            reply(r);
        });
    }

    fn flush_volume(&self, what: &'static str, reply: ReplyEmpty) {
        let vol = self.volume.clone();
        self.spawn(what, async move { vol.flush().await }, move |r| match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }
}

impl Filesystem for AttachFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // More asynchronous requests (readahead, writeback) outstanding.
        let _ = config.set_max_background(64);
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT && name == OsStr::new(&self.name) {
            reply.entry(&TTL, &self.attr(FILE_INO), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == ROOT || ino == FILE_INO {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino != ROOT && ino != FILE_INO {
            return reply.error(Errno::ENOENT);
        }
        // The size of a volume is fixed; O_TRUNC and times are ignored.
        match size {
            Some(s) if ino == FILE_INO && s != self.volume.size() && s != 0 => reply.error(Errno::EINVAL),
            _ => reply.attr(&TTL, &self.attr(ino)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let acc = flags.0 & libc::O_ACCMODE;
        if self.read_only && acc != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        // Direct I/O: every read and write reaches the volume (no second
        // page cache under the loop device's), writes run in parallel.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let vsize = self.volume.size();
        let len = (size as u64).min(vsize.saturating_sub(offset)) as usize;
        if len == 0 {
            return reply.data(&[]);
        }
        let vol = self.volume.clone();
        self.spawn("read", async move { vol.read(offset, len).await }, move |r| match r {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let vsize = self.volume.size();
        if offset >= vsize && !data.is_empty() {
            return reply.error(Errno::ENOSPC);
        }
        // A short write at the end of the volume, like a block device.
        let len = (data.len() as u64).min(vsize - offset.min(vsize)) as usize;
        let data = Bytes::copy_from_slice(&data[..len]);
        let fua = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let vol = self.volume.clone();
        self.spawn("write", async move { vol.write(offset, data, fua).await }, move |r| match r {
            Ok(()) => reply.written(len as u32),
            Err(e) => reply.error(e),
        });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close(2) of every copy of a descriptor (also the copies a fork
        // closes on exec) lands here. Like a local file, close does not
        // make data durable (fsync does), and it must not stall while the
        // server is away.
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        if ino != FILE_INO || self.read_only {
            return reply.ok();
        }
        self.flush_volume("fsync", reply);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let vsize = self.volume.size();
        let end = offset.saturating_add(length);
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        if (punch || zero) && end > vsize {
            // Nothing lies past the end; clip (the size never changes).
            if offset >= vsize {
                return reply.ok();
            }
        } else if end > vsize && !keep_size {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let len = end.min(vsize) - offset.min(vsize);
        let vol = self.volume.clone();
        let can_zero = vol.capabilities().can_zero;
        if punch {
            // A punched hole must read back as zeros: zero with permission
            // to deallocate (the server punches); a plain TRIM promises
            // nothing about the contents, so it is used only when the
            // server cannot zero cheaply.
            self.spawn(
                "punch hole",
                async move {
                    if can_zero {
                        vol.write_zeroes(offset, len, ZeroFlags { may_trim: true, ..Default::default() }).await
                    } else {
                        vol.trim(offset, len, false).await
                    }
                },
                move |r| match r {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(e),
                },
            );
        } else if zero {
            self.spawn(
                "zero range",
                async move { vol.write_zeroes(offset, len, ZeroFlags::default()).await },
                move |r| match r {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(e),
                },
            );
        } else if mode & !libc::FALLOC_FL_KEEP_SIZE == 0 {
            // Plain allocation inside the volume: every byte already exists.
            reply.ok();
        } else {
            reply.error(Errno::EOPNOTSUPP);
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [(ROOT, FileType::Directory, "."), (ROOT, FileType::Directory, ".."), (FILE_INO, FileType::RegularFile, self.name.as_str())];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// `longwire detach PATH`: unmount the attach mount that PATH is (the
/// mount point) or is in (the file).
pub fn detach(args: DetachArgs) -> anyhow::Result<()> {
    let path = &args.path;
    // The file, or the mount point; a dead mount may not canonicalize.
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| std::path::absolute(path).unwrap_or_else(|_| path.clone()));
    let mounts = fuse_mounts()?;
    let candidates = [abs.clone(), abs.parent().map(Path::to_path_buf).unwrap_or_default()];
    let (mountpoint, fstype, source) = candidates
        .iter()
        .find_map(|c| mounts.iter().find(|(m, _, _)| m == c))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("{} is not a longwire attach mount (nor a file in one)", path.display()))?;
    // fusermount3 mounts as fuse.longwire; root mounts directly as fuse
    // with the URI as the source.
    let ours = fstype == format!("fuse.{SUBTYPE}") || (fstype == "fuse" && source.starts_with("nbd"));
    if !ours {
        bail!("{} is a {fstype} mount of {source}, not one made by longwire attach", mountpoint.display());
    }
    fusermount_u(&mountpoint)?;
    info!("unmounted {}; the attach process flushes and exits", mountpoint.display());
    Ok(())
}

/// `fusermount3 -u MOUNTPOINT`, with its complaint in the error.
fn fusermount_u(mountpoint: &Path) -> anyhow::Result<()> {
    let out = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(mountpoint)
        .stdin(std::process::Stdio::null())
        .output()
        .context("running fusermount3 -u (install fuse3)")?;
    if !out.status.success() {
        bail!(
            "fusermount3 -u {} failed ({}): {}; is something (a loop device, a mount) still using it?",
            mountpoint.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Mount points, fstypes and sources from /proc/self/mountinfo.
fn fuse_mounts() -> anyhow::Result<Vec<(PathBuf, String, String)>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let mp = fields.get(4)?;
            let sep = fields.iter().position(|f| *f == "-")?;
            let fstype = fields.get(sep + 1)?;
            let source = fields.get(sep + 2).copied().unwrap_or_default();
            Some((PathBuf::from(unescape_mountinfo(mp)), fstype.to_string(), unescape_mountinfo(source)))
        })
        .collect())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push(u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap(), 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
