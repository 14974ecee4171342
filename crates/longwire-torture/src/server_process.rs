//! The real `longwire serve` as a child process: start it on a free
//! loopback port, find the address in its log, kill it (SIGKILL) or stop
//! it (SIGTERM), and look at its resources in `/proc`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

/// Lines of server log kept for error reports.
const LOG_TAIL: usize = 200;

pub struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

/// Where the `longwire` binary is: `explicit` if given, else `$LONGWIRE`,
/// else next to the running executable (cargo puts both in target/<profile>,
/// tests one level down in deps/), else `longwire` on PATH.
pub fn find_longwire(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("LONGWIRE") {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let p = dir.join("longwire");
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from("longwire")
}

impl ServerProcess {
    /// `longwire serve --listen 127.0.0.1:0 --export NAME=URI …extra`,
    /// waiting until it logs its NBD address.
    pub fn start(
        binary: &Path,
        export: &str,
        uri: &str,
        extra: &[&str],
    ) -> anyhow::Result<ServerProcess> {
        Self::start_with_env(binary, export, uri, extra, &[])
    }

    /// [`ServerProcess::start`] with extra environment variables.
    pub fn start_with_env(
        binary: &Path,
        export: &str,
        uri: &str,
        extra: &[&str],
        env: &[(String, String)],
    ) -> anyhow::Result<ServerProcess> {
        let mut child = Command::new(binary)
            .args(["serve", "--listen", "127.0.0.1:0", "--export"])
            .arg(format!("{export}={uri}"))
            .args(extra)
            .env("RUST_LOG", std::env::var("TORTURE_SERVER_LOG").unwrap_or_else(|_| "info".into()))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {} (build it with `cargo build -p longwire`, or pass --longwire PATH)", binary.display()))?;
        let stderr = child.stderr.take().expect("piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = parse_listening(&line) {
                    let _ = tx.send(addr);
                }
                let mut l = keep.lock().unwrap();
                if l.len() >= LOG_TAIL {
                    l.remove(0);
                }
                l.push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "longwire did not report its NBD address within 30 s; log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        Ok(ServerProcess { child, addr, log })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines the server logged.
    pub fn log_tail(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGKILL and reap: the crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `limit` for the exit. Returns how long it
    /// took and whether it exited 0; SIGKILLs it if it did not exit in time.
    pub fn terminate(mut self, limit: Duration) -> anyhow::Result<(Duration, bool)> {
        let t0 = Instant::now();
        signal(self.pid(), libc::SIGTERM);
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok((t0.elapsed(), st.success()));
            }
            if t0.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(anyhow!(
                    "longwire did not exit within {limit:?} of SIGTERM; log:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn resources(&self) -> anyhow::Result<Resources> {
        Resources::of(self.pid())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid we spawned and have not reaped.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// `… NBD listening on 127.0.0.1:PORT (try: …)`.
fn parse_listening(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("NBD listening on ")? + "NBD listening on ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// What a process holds, from `/proc/PID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// Open descriptors that are sockets (listeners included).
    pub sockets: usize,
    pub fds: usize,
    pub threads: usize,
    pub rss_kib: u64,
}

impl Resources {
    pub fn of(pid: u32) -> anyhow::Result<Resources> {
        let mut sockets = 0;
        let mut fds = 0;
        for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("reading /proc/{pid}/fd"))?
        {
            let Ok(e) = e else { continue };
            fds += 1;
            if std::fs::read_link(e.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
            {
                sockets += 1;
            }
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(Resources {
            sockets,
            fds,
            threads: field("Threads:") as usize,
            rss_kib: field("VmRSS:"),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_the_listening_line() {
        let l = "2026-11-21T10:00:00Z  INFO longwire::serve: NBD listening on 127.0.0.1:41234 (try: nbdinfo 'nbd://127.0.0.1:41234/x')";
        assert_eq!(
            super::parse_listening(l),
            Some("127.0.0.1:41234".parse().unwrap())
        );
        assert_eq!(
            super::parse_listening("iSCSI listening on 127.0.0.1:3260"),
            None
        );
    }
}
