//! Which store a torture run puts its export on, as a volume URI template.
//!
//! Adding a store is one arm here: the URI with `{dir}` (the run's temp
//! directory), `{size}` (bytes) and, for s3, `{endpoint}` filled in.
//! [`Store::open`] also starts what the store needs beside the server
//! (an `s3s-fs` object server for s3), which outlives server kills.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    File,
    Sqlite,
    S3,
    /// Keeps nothing across a restart: every covered write is lost. Only
    /// useful to show the checker catches loss.
    Memory,
}

impl std::str::FromStr for Store {
    type Err = String;
    fn from_str(s: &str) -> Result<Store, String> {
        match s {
            "file" => Ok(Store::File),
            "sqlite" => Ok(Store::Sqlite),
            "s3" => Ok(Store::S3),
            "memory" => Ok(Store::Memory),
            _ => Err(format!(
                "unknown store {s:?}: use file, sqlite, s3 (or memory, which must fail)"
            )),
        }
    }
}

impl std::fmt::Display for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Store::File => "file",
            Store::Sqlite => "sqlite",
            Store::S3 => "s3",
            Store::Memory => "memory",
        })
    }
}

impl Store {
    /// The URI template for this store.
    pub fn template(self) -> Result<&'static str, String> {
        match self {
            Store::File => Ok("file:{dir}/torture.img?size={size}"),
            Store::Sqlite => Ok("sqlite:{dir}/torture.db?volume=torture&size={size}"),
            Store::Memory => Ok("memory:?size={size}"),
            Store::S3 => Ok("s3://torture/vol?endpoint={endpoint}&region=us-east-1&cache={dir}/cache&size={size}"),
        }
    }

    /// The export URI for a run in `dir`, and whatever must run beside
    /// the server for it.
    pub fn open(self, dir: &Path, size: u64) -> anyhow::Result<Backing> {
        let template = self.template().map_err(anyhow::Error::msg)?;
        let (s3, endpoint) = match self {
            Store::S3 => {
                let s = S3Server::start(dir)?;
                let e = format!("http://127.0.0.1:{}", s.port);
                (Some(s), e)
            }
            _ => (None, String::new()),
        };
        let uri = template
            .replace("{dir}", &dir.display().to_string())
            .replace("{size}", &size.to_string())
            .replace("{endpoint}", &endpoint);
        let env = if s3.is_some() {
            vec![
                ("AWS_ACCESS_KEY_ID".into(), S3_KEY.into()),
                ("AWS_SECRET_ACCESS_KEY".into(), S3_SECRET.into()),
            ]
        } else {
            Vec::new()
        };
        Ok(Backing { uri, env, _s3: s3 })
    }
}

/// A store ready for the server: its URI, the environment the server needs
/// (credentials), and helpers kept alive as long as this is.
pub struct Backing {
    pub uri: String,
    pub env: Vec<(String, String)>,
    _s3: Option<S3Server>,
}

const S3_KEY: &str = "torture-access-key";
const S3_SECRET: &str = "torture-secret-key-0123456789abcdef";

/// `s3s-fs` serving `DIR/s3` on a free loopback port, bucket `torture`.
struct S3Server {
    child: Child,
    port: u16,
}

impl S3Server {
    fn start(dir: &Path) -> anyhow::Result<S3Server> {
        let root = dir.join("s3");
        std::fs::create_dir_all(root.join("torture"))?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", S3_KEY, "--secret-key", S3_SECRET])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run s3s-fs (install it: cargo install --locked s3s-fs@0.14.1 --features binary; scripts/test does)")?;
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(st) = child.try_wait()? {
                bail!("s3s-fs exited with {st} before listening on port {port}");
            }
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                bail!("s3s-fs did not listen on port {port} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(S3Server { child, port })
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
