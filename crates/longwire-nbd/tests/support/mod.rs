//! Harness for the client integration tests: real servers as child
//! processes (the `longwire` binary, `nbdkit`, `qemu-nbd`), a TCP fault
//! proxy that can cut or stall connections on command, and a reference
//! model of the export's bytes.
//!
//! Every child is killed when its handle drops, every wait is bounded, and
//! a missing tool fails the test with an install hint (nothing is skipped).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// Log client events (reconnects …) into the test output; `RUST_LOG`
/// overrides the default filter.
pub fn init_logging() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "longwire_nbd=info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_test_writer().try_init();
}

/// Run a test body with a hard time limit, so a hang fails instead of
/// blocking the suite.
pub async fn bounded<F: std::future::Future<Output = ()>>(limit: Duration, f: F) {
    if tokio::time::timeout(limit, f).await.is_err() {
        panic!("test did not finish within {limit:?}");
    }
}

/// Deterministic pseudo-random bytes (xorshift), different for every seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn require_tool(tool: &str, package: &str) {
    let found = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        .any(|d| Path::new(d).join(tool).is_file());
    if !found {
        panic!("required tool `{tool}` is not installed; install the Debian package `{package}` (scripts/test does)");
    }
}

// ---------------------------------------------------------------------------
// The longwire binary
// ---------------------------------------------------------------------------

/// The `longwire` binary, built (once per test run) from the workspace with
/// `cargo build -p longwire`, or `LONGWIRE_BIN` if set. If the build fails
/// (the crate may be mid-edit) an existing binary is used, with a warning.
pub fn longwire_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("LONGWIRE_BIN") {
            return PathBuf::from(p);
        }
        // target/<profile>/deps/client-… → target/<profile>/longwire
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe.parent().and_then(Path::parent).expect("test binary lives in target/<profile>/deps");
        let bin = profile_dir.join("longwire");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "longwire"]).current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("running cargo build -p longwire");
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if bin.is_file() {
                eprintln!("warning: `cargo build -p longwire` failed; testing the existing {}\n{err}", bin.display());
            } else {
                panic!("`cargo build -p longwire` failed and there is no {}:\n{err}", bin.display());
            }
        }
        bin
    })
    .clone()
}

/// A `longwire serve` child process in its own temporary directory.
pub struct LongwireServer {
    child: Option<Child>,
    args: Vec<String>,
    dir: tempfile::TempDir,
    listening: Option<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl LongwireServer {
    /// Start `longwire serve ARGS` (`{dir}` in an argument is the server's
    /// temporary directory) and wait for its `listening on` line.
    pub fn start(args: &[&str]) -> LongwireServer {
        let dir = tempfile::Builder::new().prefix("longwire-client-test-").tempdir().expect("temp dir");
        let args = args.iter().map(|a| a.replace("{dir}", dir.path().to_str().unwrap())).collect();
        let mut s = LongwireServer { child: None, args, dir, listening: None, log: Arc::default() };
        s.spawn();
        s
    }

    /// A memory export `NAME` of `size` on a free loopback port.
    pub fn memory(name: &str, size: &str) -> LongwireServer {
        Self::start(&["--export", &format!("{name}=memory:?size={size}"), "--listen", "127.0.0.1:0"])
    }

    fn spawn(&mut self) {
        let mut child = Command::new(longwire_bin())
            .arg("serve")
            .args(&self.args)
            .current_dir(self.dir.path())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning longwire serve");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find("listening on ") {
                    let addr: String = line[i + 13..].chars().take_while(|c| !c.is_whitespace()).collect();
                    let _ = tx.send(addr);
                }
                log.lock().unwrap().push(line);
            }
        });
        self.child = Some(child);
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => self.listening = Some(addr),
            Err(_) => {
                let logs = self.logs();
                self.kill();
                panic!("longwire serve {:?} did not report a listener:\n{logs}", self.args);
            }
        }
    }

    /// The TCP address it listens on.
    pub fn addr(&self) -> SocketAddr {
        let l = self.listening.as_deref().expect("not listening");
        l.parse().unwrap_or_else(|_| panic!("not a TCP listener: {l}"))
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (graceful shutdown) and wait for the exit, at most 20 s.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            panic!("longwire did not exit within 20 s of SIGTERM");
        }
    }

    /// Start again with the same arguments in the same directory.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }
}

impl Drop for LongwireServer {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------
// Third-party servers
// ---------------------------------------------------------------------------

/// A third-party NBD server child process on a loopback TCP port.
pub struct ExternalServer {
    child: Child,
    pub port: u16,
    _dir: Option<tempfile::TempDir>,
}

impl ExternalServer {
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Start `make(port)` on a free port; retry with another port if the
    /// server does not come up (someone else took the port).
    fn start(tool: &str, package: &str, dir: Option<tempfile::TempDir>, make: impl Fn(u16) -> Command) -> ExternalServer {
        require_tool(tool, package);
        let mut why = String::new();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut child = make(port).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect(tool);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(st)) = child.try_wait() {
                    why = format!("{tool} exited with {st}");
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return ExternalServer { child, port, _dir: dir };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    why = format!("{tool} did not listen on port {port} within 10 s");
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("could not start {tool}: {why}");
    }

    /// `nbdkit -f -p PORT -i 127.0.0.1 [--no-sr] memory SIZE`.
    pub fn nbdkit(no_sr: bool, size: &str) -> ExternalServer {
        Self::start("nbdkit", "nbdkit", None, |port| {
            let mut c = Command::new("nbdkit");
            c.args(["-f", "--exit-with-parent", "-p", &port.to_string(), "-i", "127.0.0.1"]);
            if no_sr {
                c.arg("--no-sr");
            }
            c.args(["memory", size]);
            c
        })
    }

    /// `qemu-nbd -f raw -p PORT -b 127.0.0.1 -x NAME --persistent FILE`
    /// over a fresh sparse image of `size` bytes.
    pub fn qemu_nbd(name: &str, size: u64) -> ExternalServer {
        let dir = tempfile::Builder::new().prefix("longwire-qemu-nbd-").tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img).unwrap().set_len(size).unwrap();
        Self::start("qemu-nbd", "qemu-utils", Some(dir), |port| {
            let mut c = Command::new("qemu-nbd");
            c.args(["-f", "raw", "-p", &port.to_string(), "-b", "127.0.0.1", "-x", name, "--persistent"]).arg(&img);
            c
        })
    }
}

impl Drop for ExternalServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Fault proxy
// ---------------------------------------------------------------------------

struct ProxyConn {
    task: AbortHandle,
    /// Bytes forwarded client → server.
    up: Arc<AtomicU64>,
}

struct ProxyState {
    upstream: Mutex<SocketAddr>,
    stalled: AtomicBool,
    accepted: AtomicUsize,
    conns: Mutex<Vec<ProxyConn>>,
}

/// A TCP proxy in front of a server that can cut every connection, stall
/// (accept and hold connections, forward nothing), and switch upstream.
pub struct Proxy {
    pub addr: SocketAddr,
    st: Arc<ProxyState>,
    accept: AbortHandle,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let st = Arc::new(ProxyState {
            upstream: Mutex::new(upstream),
            stalled: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let st2 = st.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                st2.accepted.fetch_add(1, Ordering::SeqCst);
                let up = Arc::new(AtomicU64::new(0));
                let task = tokio::spawn(proxy_conn(client, st2.clone(), up.clone()));
                st2.conns.lock().unwrap().push(ProxyConn { task: task.abort_handle(), up });
            }
        })
        .abort_handle();
        Proxy { addr, st, accept }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    /// Drop every connection (both sides). Returns how many were open.
    pub fn cut_all(&self) -> usize {
        let conns = std::mem::take(&mut *self.st.conns.lock().unwrap());
        let n = conns.iter().filter(|c| !c.task.is_finished()).count();
        for c in conns {
            c.task.abort();
        }
        n
    }

    /// Stop forwarding on every connection, and hold new ones without
    /// forwarding anything.
    pub fn set_stalled(&self, stalled: bool) {
        self.st.stalled.store(stalled, Ordering::SeqCst);
    }

    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.st.upstream.lock().unwrap() = upstream;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.st.accepted.load(Ordering::SeqCst)
    }

    /// Client → server bytes of each connection not yet cut.
    pub fn bytes_up(&self) -> Vec<u64> {
        self.st.conns.lock().unwrap().iter().map(|c| c.up.load(Ordering::SeqCst)).collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

async fn proxy_conn(client: TcpStream, st: Arc<ProxyState>, up: Arc<AtomicU64>) {
    if st.stalled.load(Ordering::SeqCst) {
        // Accept, then never answer: hold the socket until cut.
        let _hold = client;
        return std::future::pending::<()>().await;
    }
    let upstream = *st.upstream.lock().unwrap();
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::select! {
        _ = pump(cr, sw, st.clone(), Some(up)) => {}
        _ = pump(sr, cw, st, None) => {}
    }
}

async fn pump(mut r: impl AsyncReadExt + Unpin, mut w: impl AsyncWriteExt + Unpin, st: Arc<ProxyState>, count: Option<Arc<AtomicU64>>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if st.stalled.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
        if let Some(c) = &count {
            c.fetch_add(n as u64, Ordering::SeqCst);
        }
    }
}

// ---------------------------------------------------------------------------
// Reference model
// ---------------------------------------------------------------------------

/// What the export should contain. Trimmed blocks become "unknown" (their
/// contents are unspecified) until written again.
pub struct Model {
    pub data: Vec<u8>,
    known: Vec<bool>,
}

pub const BLOCK: u64 = 4096;

impl Model {
    pub fn new(size: u64) -> Model {
        Model { data: vec![0; size as usize], known: vec![true; (size / BLOCK) as usize] }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        assert!(offset.is_multiple_of(BLOCK) && (data.len() as u64).is_multiple_of(BLOCK));
        self.data[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        for b in offset / BLOCK..(offset + data.len() as u64) / BLOCK {
            self.known[b as usize] = true;
        }
    }

    pub fn zero(&mut self, offset: u64, len: u64) {
        self.write(offset, &vec![0; len as usize]);
    }

    pub fn trim(&mut self, offset: u64, len: u64) {
        for b in offset / BLOCK..(offset + len) / BLOCK {
            self.known[b as usize] = false;
        }
    }

    /// Assert that `got`, read at `offset`, matches every known block.
    pub fn check(&self, what: &str, offset: u64, got: &[u8]) {
        assert!(offset.is_multiple_of(BLOCK));
        for (i, chunk) in got.chunks(BLOCK as usize).enumerate() {
            let at = offset + i as u64 * BLOCK;
            if !self.known[(at / BLOCK) as usize] {
                continue;
            }
            let want = &self.data[at as usize..at as usize + chunk.len()];
            if chunk != want {
                let j = chunk.iter().zip(want).position(|(a, b)| a != b).unwrap();
                panic!("{what}: byte {} differs: got {:#04x}, expected {:#04x}", at + j as u64, chunk[j], want[j]);
            }
        }
    }

    /// Assert that every known block in the range is zero.
    pub fn check_zero(&self, what: &str, offset: u64, len: u64) {
        let start = offset / BLOCK * BLOCK;
        let end = (offset + len).div_ceil(BLOCK) * BLOCK;
        for at in (start..end).step_by(BLOCK as usize) {
            if !self.known[(at / BLOCK) as usize] {
                continue;
            }
            let lo = at.max(offset) as usize;
            let hi = (at + BLOCK).min(offset + len) as usize;
            if let Some(j) = self.data[lo..hi].iter().position(|&b| b != 0) {
                panic!("{what}: the server claims zeros at {}, but the model has {:#04x}", lo + j, self.data[lo + j]);
            }
        }
    }
}
