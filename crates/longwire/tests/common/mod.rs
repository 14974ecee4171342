//! Test harness shared by the integration tests in `crates/longwire/tests/`.
//!
//! Every test starts its own `longwire serve` child process in its own
//! temporary directory (the child's working directory), on port 0, so tests
//! are independent and can run in parallel.  The real binary is driven with
//! real third-party NBD clients (libnbd's python bindings, nbdinfo, nbdcopy,
//! qemu-io, qemu-img, nbdfuse).
//!
//! Conventions:
//! * Arguments passed to [`Server::start`] may contain `{dir}`, which is
//!   replaced by the server's temporary directory (useful for
//!   `--unix {dir}/nbd.sock` and `file:{dir}/disk.img?size=1G`).
//! * Every external command runs with a bounded timeout, so a hung server
//!   makes a test fail with a diagnostic instead of hanging the suite.
//! * Missing tools make tests fail loudly ([`require_tool`]); nothing is
//!   silently skipped.  Run `scripts/test` to install everything.

#![allow(dead_code)]

pub mod fuse;
pub mod json;
pub mod pki;
pub mod raw;
pub mod s3;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long to wait for all `listening on` lines after spawning the server.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Default timeout for an external client command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(180);
/// The Debian python3 that has the `nbd` module (the one on PATH may not).
pub const PYTHON: &str = "/usr/bin/python3";

/// PATH for child processes: system directories first so that `nbdsh`
/// (a shell script running `python3 -mnbd`) picks the Debian python3 that
/// has libnbd's bindings, and so that /sbin tools (mkfs, fsck, mount) are
/// found.
pub fn child_path() -> String {
    let rest = std::env::var("PATH").unwrap_or_default();
    format!("/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin:{rest}")
}

/// A `Command` with the test PATH set.
pub fn command(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env("PATH", child_path());
    c
}

// ---------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------

fn package_for(tool: &str) -> &'static str {
    match tool {
        "nbdsh" | "nbdinfo" | "nbdcopy" => "libnbd-bin",
        "nbdfuse" => "nbdfuse",
        "nbdkit" => "nbdkit",
        "qemu-io" | "qemu-img" | "qemu-nbd" => "qemu-utils",
        "iscsi-ls" | "iscsi-inq" | "iscsi-readcapacity16" | "iscsi-test-cu" | "iscsi-swp" => {
            "libiscsi-bin"
        }
        "fusermount3" => "fuse3",
        "mkfs.ext4" | "fsck.ext4" | "debugfs" | "e2fsck" => "e2fsprogs",
        "fio" => "fio",
        "mount" | "umount" | "losetup" => "mount",
        "fstrim" => "util-linux",
        "sha256sum" | "sync" | "dd" => "coreutils",
        "python3" | "/usr/bin/python3" => "python3-libnbd (and python3)",
        _ => "the package providing it",
    }
}

/// Locate `tool` on the test PATH, or panic with an install hint.
pub fn require_tool(tool: &str) -> PathBuf {
    let found = if tool.contains('/') {
        let p = PathBuf::from(tool);
        p.is_file().then_some(p)
    } else {
        child_path()
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.is_file())
    };
    match found {
        Some(p) => p,
        None => panic!(
            "required tool `{tool}` is not installed; install the Debian package `{}` \
             (scripts/test installs every dependency of this test suite)",
            package_for(tool)
        ),
    }
}

/// Panic unless the Debian python3 can `import nbd`.
pub fn require_python_nbd() {
    require_tool(PYTHON);
    let out = command(PYTHON)
        .args(["-c", "import nbd"])
        .output()
        .expect("running /usr/bin/python3");
    if !out.status.success() {
        panic!(
            "/usr/bin/python3 cannot `import nbd`; install the Debian package python3-libnbd \
             (scripts/test installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---------------------------------------------------------------------------
// Running commands with timeouts
// ---------------------------------------------------------------------------

/// Spawn `cmd` with piped stdout/stderr (stdin from /dev/null unless the
/// caller configured it), wait at most `timeout`, kill it on timeout.
/// Returns the output and whether it timed out.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> (Output, bool) {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("failed to spawn {cmd:?}: {e}"));
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait after kill");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stdout = t1.join().unwrap_or_default();
    let stderr = t2.join().unwrap_or_default();
    (
        Output {
            status,
            stdout,
            stderr,
        },
        timed_out,
    )
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains(' ') || a.contains('\n') || a.is_empty() {
            s.push_str(&format!("{a:?}"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

fn format_failure(what: &str, cmd: &Command, out: &Output, timed_out: bool, extra: &str) -> String {
    format!(
        "{what}: `{}` {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n{extra}",
        describe(cmd),
        if timed_out {
            "TIMED OUT (killed)".to_string()
        } else {
            format!("exited with {}", out.status)
        },
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    )
}

/// Run a command (bounded by [`CMD_TIMEOUT`]), assert it succeeded, return stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    run_cmd(command(program).args(args), "")
}

/// Run an arbitrary `Command`, assert success, return stdout. `context` is
/// appended to the panic message (e.g. server stderr).
pub fn run_cmd(cmd: &mut Command, context: &str) -> String {
    let (out, timed_out) = output_with_timeout(cmd, CMD_TIMEOUT);
    if timed_out || !out.status.success() {
        panic!(
            "{}",
            format_failure("command failed", cmd, &out, timed_out, context)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command and return its full output without asserting anything
/// (still bounded by [`CMD_TIMEOUT`]; a timeout panics).
pub fn run_unchecked(cmd: &mut Command, context: &str) -> Output {
    let (out, timed_out) = output_with_timeout(cmd, CMD_TIMEOUT);
    if timed_out {
        panic!(
            "{}",
            format_failure("command hung", cmd, &out, true, context)
        );
    }
    out
}

/// sha256 of a file, via coreutils `sha256sum`.
pub fn sha256_file(path: &Path) -> String {
    require_tool("sha256sum");
    let out = run("sha256sum", &["-b", path.to_str().unwrap()]);
    out.split_whitespace().next().unwrap().to_string()
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

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
pub const TIB: u64 = 1024 * GIB;

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

/// Listener address reported by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    listening: Vec<Listen>,
    /// Addresses from `iSCSI listening on` lines.
    iscsi: Vec<SocketAddr>,
    eof: bool,
}

type SharedLog = Arc<(Mutex<LogState>, Condvar)>;

/// A running `longwire serve` process.
pub struct Server {
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    args: Vec<String>,
    want_listeners: Option<usize>,
    want_iscsi: Option<usize>,
    log: SharedLog,
    stdout_log: Arc<Mutex<Vec<String>>>,
    listeners: Vec<Listen>,
    iscsi_listeners: Vec<SocketAddr>,
    exit_status: Option<ExitStatus>,
    script_counter: AtomicUsize,
}

/// The server binary: the `longwire` built by cargo for this test run.
/// `LONGWIRE_TEST_BIN` may point at another build of the same binary (for
/// example a release build) to run the suite against it.
pub fn server_binary() -> String {
    std::env::var("LONGWIRE_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_longwire").to_string())
}

/// Remove ANSI escape sequences (tracing may colour its output).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c2 in chars.by_ref() {
                    if ('@'..='~').contains(&c2) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Parse the address out of a log line containing `listening on ADDR`
/// (NBD listeners; `iSCSI listening on` lines are [`parse_iscsi_listening`]'s).
pub fn parse_listening(line: &str) -> Option<Listen> {
    let line = strip_ansi(line);
    if line.contains("iSCSI listening on ") {
        return None;
    }
    let idx = line.find("listening on ")?;
    let rest = line[idx + "listening on ".len()..].trim_start();
    let token: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
    let token = token.trim_matches(|c| matches!(c, '"' | '\'' | '`' | ',' | ';' | '(' | ')'));
    if let Some(p) = token.strip_prefix("unix:") {
        return Some(Listen::Unix(PathBuf::from(p)));
    }
    let token = token.strip_prefix("tcp:").unwrap_or(token);
    let token = token.strip_prefix("//").unwrap_or(token);
    token.parse::<SocketAddr>().ok().map(Listen::Tcp)
}

/// Parse the address out of a log line `iSCSI listening on ADDR (…)`.
pub fn parse_iscsi_listening(line: &str) -> Option<SocketAddr> {
    let line = strip_ansi(line);
    let idx = line.find("iSCSI listening on ")?;
    let rest = &line[idx + "iSCSI listening on ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

fn count_flag(args: &[String], flag: &str) -> usize {
    let eq = format!("{flag}=");
    args.iter()
        .filter(|a| *a == flag || a.starts_with(&eq))
        .count()
}

/// How many NBD `listening on` lines the arguments imply: one per
/// --listen/--unix; with no listener flag at all, the default one.
fn expected_listeners(args: &[String]) -> usize {
    let n = count_flag(args, "--listen") + count_flag(args, "--unix");
    if n == 0 && count_flag(args, "--iscsi") == 0 {
        1
    } else {
        n
    }
}

/// How many `iSCSI listening on` lines to wait for: one per --iscsi (the
/// default iSCSI listener is not waited for: its port may be taken).
fn expected_iscsi_listeners(args: &[String]) -> usize {
    count_flag(args, "--iscsi")
}

impl Server {
    /// Start `longwire serve ARGS...` in a fresh temporary directory and wait
    /// until every listener has been reported.
    pub fn start(args: &[&str]) -> Server {
        Self::start_prepared(args, |_| {})
    }

    /// Like [`Server::start`], but first calls `prepare` with the (empty)
    /// temporary directory, e.g. to create pre-existing image files.
    pub fn start_prepared(args: &[&str], prepare: impl FnOnce(&Path)) -> Server {
        Self::start_with(args, None, prepare)
    }

    /// Full control: `listeners` is the number of `listening on` lines to
    /// wait for (None: derived from --listen/--unix, default 1), e.g. when
    /// the listeners come from a --config file.
    pub fn start_with(
        args: &[&str],
        listeners: Option<usize>,
        prepare: impl FnOnce(&Path),
    ) -> Server {
        Self::start_inner(args, listeners, None, prepare)
    }

    /// Like [`Server::start_with`], also saying how many `iSCSI listening
    /// on` lines to wait for (when iSCSI listeners come from a --config file).
    pub fn start_with_iscsi(
        args: &[&str],
        listeners: Option<usize>,
        iscsi: usize,
        prepare: impl FnOnce(&Path),
    ) -> Server {
        Self::start_inner(args, listeners, Some(iscsi), prepare)
    }

    fn start_inner(
        args: &[&str],
        listeners: Option<usize>,
        iscsi: Option<usize>,
        prepare: impl FnOnce(&Path),
    ) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("longwire-test-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("creating temp dir");
        let dir_path = dir.path().to_path_buf();
        prepare(&dir_path);
        let args: Vec<String> = args
            .iter()
            .map(|a| a.replace("{dir}", dir_path.to_str().unwrap()))
            .collect();
        let mut s = Server {
            child: None,
            dir: Some(dir),
            dir_path,
            args,
            want_listeners: listeners,
            want_iscsi: iscsi,
            log: Arc::new((Mutex::new(LogState::default()), Condvar::new())),
            stdout_log: Arc::new(Mutex::new(Vec::new())),
            listeners: Vec::new(),
            iscsi_listeners: Vec::new(),
            exit_status: None,
            script_counter: AtomicUsize::new(0),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let bin = server_binary();
        let mut cmd = Command::new(&bin);
        cmd.arg("serve")
            .args(&self.args)
            .current_dir(&self.dir_path)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG_STYLE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("failed to spawn {bin} serve {:?}: {e}", self.args));
        let stderr = child.stderr.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let log = Arc::new((Mutex::new(LogState::default()), Condvar::new()));
        let log2 = log.clone();
        thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                        let (m, cv) = &*log2;
                        let mut st = m.lock().unwrap();
                        if let Some(l) = parse_listening(&line) {
                            st.listening.push(l);
                        }
                        if let Some(a) = parse_iscsi_listening(&line) {
                            st.iscsi.push(a);
                        }
                        st.lines.push(line);
                        cv.notify_all();
                    }
                }
            }
            let (m, cv) = &*log2;
            m.lock().unwrap().eof = true;
            cv.notify_all();
        });
        let out_log = Arc::new(Mutex::new(Vec::new()));
        let out_log2 = out_log.clone();
        thread::spawn(move || {
            let r = BufReader::new(stdout);
            for line in r.lines() {
                match line {
                    Ok(l) => out_log2.lock().unwrap().push(l),
                    Err(_) => break,
                }
            }
        });
        self.log = log;
        self.stdout_log = out_log;
        self.child = Some(child);
        self.exit_status = None;

        let want = self
            .want_listeners
            .unwrap_or_else(|| expected_listeners(&self.args));
        let want_iscsi = self
            .want_iscsi
            .unwrap_or_else(|| expected_iscsi_listeners(&self.args));
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let (m, cv) = &*self.log;
        let mut st = m.lock().unwrap();
        loop {
            if st.listening.len() >= want && st.iscsi.len() >= want_iscsi {
                break;
            }
            let now = Instant::now();
            if st.eof || now >= deadline {
                drop(st);
                let exited = self.child.as_mut().unwrap().try_wait().ok().flatten();
                let why = if let Some(es) = exited {
                    format!("the server exited with {es} before reporting its listeners")
                } else if now >= deadline {
                    format!("timed out after {STARTUP_TIMEOUT:?}")
                } else {
                    "the server closed stderr".to_string()
                };
                let msg = format!(
                    "longwire serve {:?} did not report {want} `listening on` line(s): {why}\n{}",
                    self.args,
                    self.logs()
                );
                self.kill();
                panic!("{msg}");
            }
            st = cv.wait_timeout(st, deadline - now).unwrap().0;
        }
        self.listeners = st.listening.clone();
        self.iscsi_listeners = st.iscsi.clone();
    }

    /// Stop (SIGTERM) if running and start again with the same arguments in
    /// the same directory. Port-0 listeners get new ports.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.terminate();
        }
        self.spawn();
    }

    /// Start again after [`Server::kill`]/[`Server::terminate`], same args/dir.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "server still running");
        self.spawn();
    }

    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    pub fn args(&self) -> &[String] {
        &self.args
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server not running").id()
    }

    pub fn listeners(&self) -> &[Listen] {
        &self.listeners
    }

    /// iSCSI listeners reported by the server.
    pub fn iscsi_addrs(&self) -> &[SocketAddr] {
        &self.iscsi_listeners
    }

    /// First iSCSI listener.
    pub fn iscsi_addr(&self) -> SocketAddr {
        *self
            .iscsi_listeners
            .first()
            .unwrap_or_else(|| panic!("server has no iSCSI listener\n{}", self.logs()))
    }

    /// `iscsi://ADDR/TARGET/LUN` for libiscsi tools and qemu.
    pub fn iscsi_url(&self, target: &str, lun: u64) -> String {
        format!("iscsi://{}/{target}/{lun}", self.iscsi_addr())
    }

    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| match l {
                Listen::Tcp(a) => Some(*a),
                _ => None,
            })
            .collect()
    }

    /// First TCP listener.
    pub fn tcp_addr(&self) -> SocketAddr {
        *self
            .tcp_addrs()
            .first()
            .unwrap_or_else(|| panic!("server has no TCP listener\n{}", self.logs()))
    }

    pub fn tcp_v4_addr(&self) -> SocketAddr {
        *self
            .tcp_addrs()
            .iter()
            .find(|a| a.is_ipv4())
            .unwrap_or_else(|| panic!("server has no IPv4 listener\n{}", self.logs()))
    }

    pub fn tcp_v6_addr(&self) -> SocketAddr {
        *self
            .tcp_addrs()
            .iter()
            .find(|a| a.is_ipv6())
            .unwrap_or_else(|| panic!("server has no IPv6 listener\n{}", self.logs()))
    }

    pub fn unix_path(&self) -> PathBuf {
        self.listeners
            .iter()
            .find_map(|l| match l {
                Listen::Unix(p) => Some(p.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("server has no unix listener\n{}", self.logs()))
    }

    pub fn has_tcp(&self) -> bool {
        !self.tcp_addrs().is_empty()
    }

    /// NBD URI for `export` on a TCP address.
    pub fn tcp_uri_at(addr: SocketAddr, export: &str) -> String {
        format!("nbd://{addr}/{export}")
    }

    /// NBD URI for `export` on the unix socket.
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.unix_path().display())
    }

    /// NBD URI for `export`: first TCP listener if any, else the unix socket.
    pub fn uri(&self, export: &str) -> String {
        if self.has_tcp() {
            Self::tcp_uri_at(self.tcp_addr(), export)
        } else {
            self.unix_uri(export)
        }
    }

    /// qemu's legacy-free URL form is the same as libnbd's for TCP; for unix
    /// sockets qemu wants `nbd+unix:///export?socket=PATH` too.
    pub fn qemu_uri(&self, export: &str) -> String {
        self.uri(export)
    }

    /// Captured stderr lines so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.log.0.lock().unwrap().lines.clone()
    }

    /// Captured server output, formatted for failure messages.
    pub fn logs(&self) -> String {
        let err = self.stderr_lines().join("\n");
        let out = self.stdout_log.lock().unwrap().join("\n");
        format!(
            "--- longwire serve {:?} stderr ---\n{err}\n--- longwire stdout ---\n{out}\n--- end of server output ---",
            self.args
        )
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => match c.try_wait() {
                Ok(Some(st)) => {
                    self.exit_status = Some(st);
                    self.child = None;
                    false
                }
                _ => true,
            },
        }
    }

    /// Send a signal to the server process.
    pub fn signal(&self, sig: libc::c_int) {
        let pid = self.pid() as libc::pid_t;
        let r = unsafe { libc::kill(pid, sig) };
        assert_eq!(r, 0, "kill({pid}, {sig}) failed");
    }

    /// Wait for the process to exit, at most `timeout`. Returns the exit
    /// status, or None on timeout (the process is left running).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = match self.child.as_mut() {
                None => return self.exit_status,
                Some(c) => c,
            };
            if let Some(st) = child.try_wait().expect("try_wait") {
                self.exit_status = Some(st);
                self.child = None;
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM and assert a clean exit (code 0) within 10 s.
    pub fn terminate(&mut self) -> ExitStatus {
        self.stop_with(libc::SIGTERM, Duration::from_secs(10))
    }

    /// Send `sig`, wait at most `timeout`, assert exit code 0.
    pub fn stop_with(&mut self, sig: libc::c_int, timeout: Duration) -> ExitStatus {
        self.signal(sig);
        match self.wait_timeout(timeout) {
            Some(st) => {
                assert!(
                    st.success(),
                    "server exited with {st} (expected exit code 0) after signal {sig}\n{}",
                    self.logs()
                );
                st
            }
            None => {
                let logs = self.logs();
                self.kill();
                panic!("server did not exit within {timeout:?} after signal {sig}\n{logs}");
            }
        }
    }

    /// SIGKILL the server (no graceful shutdown) and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            if let Ok(st) = c.wait() {
                self.exit_status = Some(st);
            }
        }
    }

    // -- client helpers -----------------------------------------------------

    /// Run a command against this server (PATH set, bounded), assert success,
    /// return stdout. Failures include the server's log.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        require_tool(program);
        run_cmd(command(program).args(args), &self.logs())
    }

    /// Run a command, return its output without asserting success.
    pub fn run_unchecked(&self, program: &str, args: &[&str]) -> Output {
        require_tool(program);
        run_unchecked(command(program).args(args), &self.logs())
    }

    /// Environment describing this server for python scripts.
    fn python_env(&self, cmd: &mut Command) {
        cmd.env("LW_DIR", &self.dir_path);
        if let Some(a) = self
            .tcp_addrs()
            .iter()
            .find(|a| a.is_ipv4())
            .or(self.tcp_addrs().first())
        {
            cmd.env("LW_TCP", a.to_string());
        }
        if let Some(p) = self.listeners.iter().find_map(|l| match l {
            Listen::Unix(p) => Some(p.clone()),
            _ => None,
        }) {
            cmd.env("LW_UNIX", p);
        }
        cmd.env("PYTHONDONTWRITEBYTECODE", "1");
    }

    /// Write `script` (prefixed with [`PY_PRELUDE`]) to the server directory.
    pub fn write_script(&self, script: &str) -> PathBuf {
        let n = self.script_counter.fetch_add(1, Ordering::SeqCst);
        let path = self.dir_path.join(format!("script-{n}.py"));
        let mut f = std::fs::File::create(&path).expect("create script");
        f.write_all(PY_PRELUDE.as_bytes()).unwrap();
        f.write_all(b"\n# ---- test script ----\n").unwrap();
        f.write_all(script.as_bytes()).unwrap();
        f.write_all(format!("\n\nprint({SCRIPT_DONE:?})\n").as_bytes())
            .unwrap();
        path
    }

    /// A `Command` running a python+libnbd script against this server.
    pub fn python_command(&self, script: &str) -> Command {
        require_python_nbd();
        let path = self.write_script(script);
        let mut cmd = command(PYTHON);
        cmd.arg("-u").arg(&path);
        self.python_env(&mut cmd);
        cmd
    }

    /// Run a python+libnbd script against this server; assert exit 0;
    /// return stdout. The script sees `LW_TCP`, `LW_UNIX`, `LW_DIR` and the
    /// helpers of [`PY_PRELUDE`].
    pub fn python(&self, script: &str) -> String {
        let mut cmd = self.python_command(script);
        let (out, timed_out) = output_with_timeout(&mut cmd, CMD_TIMEOUT);
        if timed_out
            || !out.status.success()
            || !String::from_utf8_lossy(&out.stdout).contains(SCRIPT_DONE)
        {
            panic!(
                "{}",
                format_failure(
                    "python/libnbd test script failed",
                    &cmd,
                    &out,
                    timed_out,
                    &self.logs()
                )
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run `nbdsh -u URI -c SCRIPT` (or without -u when `uri` is None).
    pub fn nbdsh(&self, uri: Option<&str>, script: &str) -> Output {
        require_tool("nbdsh");
        require_python_nbd();
        let mut cmd = command("nbdsh");
        if let Some(u) = uri {
            cmd.args(["-u", u]);
        }
        cmd.args(["-c", script]);
        run_unchecked(&mut cmd, &self.logs())
    }

    /// Like [`Server::nbdsh`] but asserts success and returns stdout.
    pub fn nbdsh_ok(&self, uri: Option<&str>, script: &str) -> String {
        let out = self.nbdsh(uri, script);
        if !out.status.success() {
            panic!(
                "nbdsh failed ({}) for script:\n{script}\n--- stdout ---\n{}\n--- stderr ---\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Keep the temporary directory after the test (for debugging).
    pub fn keep_dir(&mut self) -> PathBuf {
        if let Some(d) = self.dir.take() {
            let p = d.keep();
            eprintln!("keeping {}", p.display());
            p
        } else {
            self.dir_path.clone()
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id() as libc::pid_t;
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(10))
                    }
                    _ => {
                        eprintln!("longwire (pid {pid}) ignored SIGTERM for 10 s; sending SIGKILL");
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
        if std::env::var_os("LONGWIRE_TEST_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                let p = d.keep();
                eprintln!("LONGWIRE_TEST_KEEP: kept {}", p.display());
            }
        }
    }
}

/// A python+libnbd script running in the background, talking to the test
/// over stdin/stdout lines (e.g. print "READY", then wait for a line).
pub struct Script {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Script {
    /// Wait (bounded) for a stdout line starting with `prefix`; returns it.
    pub fn wait_for(&mut self, prefix: &str, timeout: Duration, server: &Server) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    let err = self
                        .stderr
                        .take()
                        .map(|t| t.join().unwrap_or_default())
                        .unwrap_or_default();
                    panic!(
                        "background script did not print {prefix:?} within {timeout:?}\nstdout: {:?}\nstderr:\n{err}\n{}",
                        self.seen,
                        server.logs()
                    );
                }
            }
        }
    }

    /// Send one line to the script's stdin.
    pub fn send_line(&mut self, line: &str) {
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = stdin.write_all(format!("{line}\n").as_bytes());
            let _ = stdin.flush();
        }
    }

    /// Close stdin, wait (bounded) for exit; assert success and that the
    /// script ran to its end. Returns all stdout lines.
    pub fn finish(mut self, timeout: Duration) -> Vec<String> {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let err = self
                    .stderr
                    .take()
                    .map(|t| t.join().unwrap_or_default())
                    .unwrap_or_default();
                panic!("background script did not exit within {timeout:?}; stdout {:?}\nstderr:\n{err}", self.seen);
            }
            thread::sleep(Duration::from_millis(10));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        let err = self
            .stderr
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default();
        assert!(
            status.success() && self.seen.iter().any(|l| l == SCRIPT_DONE),
            "background script failed ({status}):\nstdout: {:?}\nstderr:\n{err}",
            self.seen
        );
        std::mem::take(&mut self.seen)
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Server {
    /// Start a python+libnbd script in the background (see [`Script`]).
    pub fn spawn_script(&self, script: &str) -> Script {
        let mut cmd = self.python_command(script);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn python script");
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let err = thread::spawn(move || {
            let mut v = String::new();
            let _ = stderr.read_to_string(&mut v);
            v
        });
        Script {
            child,
            lines: rx,
            seen: Vec::new(),
            stderr: Some(err),
        }
    }
}

/// The qemu trace line that proves NBD_OPT_EXTENDED_HEADERS was accepted.
pub const QEMU_EXT_HDR_ACK: &str = "Received option reply 11 (extended headers), type 1 (ack)";

impl Server {
    /// Run `qemu-io -f raw` with the given `-c` commands against `uri`, with
    /// qemu's NBD client tracing enabled. Asserts exit status 0 and that no
    /// command reported a failure (qemu-io exits 0 even when an `aio_read`
    /// pattern check fails, so the output is checked too).
    /// Returns (stdout, stderr-with-trace).
    pub fn qemu_io(&self, uri: &str, cmds: &[&str]) -> (String, String) {
        require_tool("qemu-io");
        let mut cmd = command("qemu-io");
        cmd.args(["--trace", "nbd_*", "-f", "raw"]);
        for c in cmds {
            cmd.args(["-c", c]);
        }
        cmd.arg(uri);
        let (out, timed_out) = output_with_timeout(&mut cmd, CMD_TIMEOUT);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let lower = stdout.to_lowercase();
        if timed_out || !out.status.success() || lower.contains("fail") || lower.contains("error") {
            panic!(
                "{}",
                format_failure(
                    "qemu-io reported a failure",
                    &cmd,
                    &out,
                    timed_out,
                    &self.logs()
                )
            );
        }
        (stdout, stderr)
    }

    /// `qemu-img ARGS...` with NBD tracing (`-T nbd_*`); asserts success.
    /// Returns (stdout, stderr-with-trace).
    pub fn qemu_img(&self, args: &[&str]) -> (String, String) {
        let out = self.qemu_img_unchecked(args);
        if !out.status.success() {
            panic!(
                "qemu-img {args:?} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
        }
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn qemu_img_unchecked(&self, args: &[&str]) -> Output {
        require_tool("qemu-img");
        let mut cmd = command("qemu-img");
        cmd.args(["-T", "nbd_*"]).args(args);
        run_unchecked(&mut cmd, &self.logs())
    }
}

/// Assert that a qemu NBD client trace shows extended headers negotiated.
pub fn assert_extended_headers(trace: &str, what: &str) {
    assert!(
        trace.contains(QEMU_EXT_HDR_ACK),
        "{what}: qemu did not negotiate NBD_OPT_EXTENDED_HEADERS (no {QEMU_EXT_HDR_ACK:?} in its trace):\n{}",
        trace.lines().filter(|l| l.contains("option")).collect::<Vec<_>>().join("\n")
    );
}

/// Try a TCP connection (short timeout). Used to check refused connections.
pub fn tcp_connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2))
}

/// Printed by the last line of every script, so that a script that stops
/// early (e.g. `sys.exit(0)`) cannot pass.
pub const SCRIPT_DONE: &str = "__longwire_script_completed__";

/// Python helpers prepended to every script run by [`Server::python`].
pub const PY_PRELUDE: &str = r#"
import errno, os, sys, time, traceback
import nbd

LW_TCP = os.environ.get("LW_TCP")
LW_UNIX = os.environ.get("LW_UNIX")
LW_DIR = os.environ.get("LW_DIR")
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

def uri(name="", transport=None):
    """NBD URI for export `name` on this test's server."""
    if transport is None:
        transport = "tcp" if LW_TCP else "unix"
    if transport == "unix":
        return "nbd+unix:///%s?socket=%s" % (name, LW_UNIX)
    return "nbd://%s/%s" % (LW_TCP, name)

def connect(name="", structured=True, meta=True, strict=None, transport=None, opt_mode=False):
    """Connect a fresh libnbd handle to export `name`."""
    h = nbd.NBD()
    if not structured:
        h.set_request_structured_replies(False)
    if meta and structured:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if opt_mode:
        h.set_opt_mode(True)
    h.connect_uri(uri(name, transport))
    if strict is not None:
        h.set_strict_mode(strict)
    return h

def check(cond, msg):
    if not cond:
        raise AssertionError(msg)

def check_eq(got, want, what):
    if got != want:
        g = got if not isinstance(got, (bytes, bytearray)) or len(got) < 64 else describe_buf(got)
        w = want if not isinstance(want, (bytes, bytearray)) or len(want) < 64 else describe_buf(want)
        raise AssertionError("%s: got %r, expected %r" % (what, g, w))

def describe_buf(b):
    import hashlib
    nz = next((i for i, x in enumerate(b) if x != 0), None)
    return "<%d bytes sha256=%s first_nonzero_at=%s head=%r>" % (
        len(b), hashlib.sha256(b).hexdigest()[:16], nz, bytes(b[:16]))

def check_buf(got, want, what):
    if bytes(got) != bytes(want):
        diff = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]), None)
        raise AssertionError("%s: data mismatch (len got %d want %d, first difference at +%s): got %s want %s"
                             % (what, len(got), len(want), diff, describe_buf(got), describe_buf(want)))

def expect_error(errname, what, fn, *args, **kwargs):
    """Call fn; it must fail with nbd.Error whose errno name is `errname`
    (or one of them, if a tuple/list is given; None accepts any error)."""
    try:
        r = fn(*args, **kwargs)
    except nbd.Error as e:
        if errname is None:
            return e
        names = errname if isinstance(errname, (tuple, list)) else (errname,)
        if e.errno not in names:
            raise AssertionError("%s: failed with errno %s (%s), expected %s"
                                 % (what, e.errno, e.string, "/".join(names)))
        return e
    raise AssertionError("%s: succeeded (returned %r) but should have failed with %s"
                         % (what, r if not isinstance(r, (bytes, bytearray)) else describe_buf(r), errname))

def pat(seed, n):
    """Deterministic, seed-dependent, non-zero-heavy bytes of length n."""
    block = bytes(((i * 131 + seed * 29 + (i >> 8) * 7) & 0xff) | 1 for i in range(4096))
    reps = n // 4096 + 1
    return (block * reps)[:n]

def alive(h, what, off=0):
    """Assert the connection still works after an error."""
    try:
        h.pread(512, off)
    except nbd.Error as e:
        raise AssertionError("connection unusable after %s: pread failed: %s" % (what, e))

def extents_once(h, count, off, flags=0):
    """One BLOCK_STATUS call: list of (offset, length, flags) for base:allocation."""
    got = []
    def cb(metacontext, offset, entries, err):
        if metacontext != nbd.CONTEXT_BASE_ALLOCATION:
            return 0
        o = offset
        for i in range(0, len(entries), 2):
            got.append((o, entries[i], entries[i + 1]))
            o += entries[i]
        return 0
    h.block_status(count, off, cb, flags=flags)
    return got

def allocation_map(h, off, end, mask=nbd.STATE_HOLE | nbd.STATE_ZERO):
    """Cover [off, end) with repeated BLOCK_STATUS calls; merge adjacent
    extents with equal (flags & mask); clip to `end`."""
    runs = []
    pos = off
    calls = 0
    while pos < end:
        calls += 1
        check(calls < 100000, "block_status made no progress")
        ext = extents_once(h, min(end - pos, 2 ** 31), pos)
        check(len(ext) > 0, "block_status at %d returned no extents" % pos)
        for (o, l, f) in ext:
            check(l > 0, "zero-length extent at %d" % o)
            if o >= end:
                break
            l = min(l, end - o)
            f &= mask
            if runs and runs[-1][2] == f and runs[-1][0] + runs[-1][1] == o:
                runs[-1] = (runs[-1][0], runs[-1][1] + l, f)
            else:
                runs.append((o, l, f))
        pos = ext[-1][0] + ext[-1][1]
    return runs

def run_aio(h):
    """Poll until nothing is in flight."""
    while h.aio_in_flight() > 0:
        h.poll(-1)

print("libnbd", nbd.NBD().get_version(), file=sys.stderr)
"#;

/// Build a 64 MiB raw image with patterns, random data and holes.
pub fn make_source_image(s: &Server, path: &std::path::Path) {
    s.run(
        "qemu-img",
        &["create", "-q", "-f", "raw", path.to_str().unwrap(), "64M"],
    );
    let p = path.to_str().unwrap();
    s.run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 4M",
            "-c",
            "write -P 0x22 20M 3M",
            "-c",
            "write -P 0x33 63M 1M",
            "-c",
            "write -P 0x44 40M 1",
            p,
        ],
    );
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(30 * MIB + 123)).unwrap();
    std::io::Write::write_all(&mut f, &pattern(99, 5 * MIB as usize)).unwrap();
    f.sync_all().unwrap();
}
