//! Real S3 servers for the S3 store's tests: `s3s-fs` (one process serving
//! a directory, objects as plain files so tests can inspect and damage
//! them) and a three-node Garage cluster on loopback.
//!
//! Both use the same fixed test credentials, which [`set_credentials`]
//! puts into this process's environment so every `longwire` the harness
//! starts inherits them.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::{command, require_tool, run_cmd};

/// Garage wants key ids `GK` + 24 hex digits and 64-hex-digit secrets.
pub const ACCESS_KEY: &str = "GK31c2f218a2e44f485b94239e";
pub const SECRET_KEY: &str = "b892c0665f0ada8a4755dae98baa3b133590e11dae3bcc1f9d2a9e6c3bd5f3a9";
pub const BUCKET: &str = "longwire-test";

/// Export the test credentials to this process (and so to every server
/// it starts). Every test sets the same values.
pub fn set_credentials() {
    std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    std::env::remove_var("AWS_SESSION_TOKEN");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited with {st} before listening on port {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on port {port} within 20 s");
}

/// An s3s-fs server serving a temporary directory, with [`BUCKET`] created.
pub struct S3sFs {
    child: Child,
    pub root: tempfile::TempDir,
    pub port: u16,
}

impl S3sFs {
    pub fn start() -> S3sFs {
        require_tool("s3s-fs");
        set_credentials();
        let root = tempfile::Builder::new()
            .prefix("s3s-fs-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        // A bucket is a directory to s3s-fs.
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let port = free_port();
        let mut child = command("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting s3s-fs");
        wait_for_port(port, &mut child, "s3s-fs");
        S3sFs { child, root, port }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `s3://BUCKET/NAME?endpoint=…` plus `extra` parameters.
    pub fn uri(&self, name: &str, extra: &str) -> String {
        format!(
            "s3://{BUCKET}/{name}?endpoint={}&region=us-east-1{extra}",
            self.endpoint()
        )
    }

    /// Where s3s-fs keeps object `key` of the test bucket.
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.root.path().join(BUCKET).join(key)
    }

    /// The chunk objects of volume `name`, sorted.
    pub fn chunks(&self, name: &str) -> Vec<String> {
        let dir = self.object_path(&format!("{name}/chunks"));
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.retain(|n| n.len() == 16);
        v.sort();
        v
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One Garage node of a [`Garage`] cluster.
pub struct GarageNode {
    pub config: PathBuf,
    pub s3_port: u16,
    pub rpc_port: u16,
    /// `ID@127.0.0.1:PORT`, known once the node has started.
    pub id: String,
    child: Option<Child>,
}

impl GarageNode {
    /// What the node wrote to stderr (warnings and errors), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config.with_file_name("garage.log")).unwrap_or_default()
    }
}

/// Three Garage nodes on loopback with replication factor 3 (every object
/// on every node; reads and writes need two of the three), one zone, the
/// test bucket and the test key allowed on it.
pub struct Garage {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<GarageNode>,
    /// From the first process started to the bucket being usable.
    pub startup: Duration,
}

/// Shared by the nodes of a cluster: 32 bytes as hex. Fixed, since the
/// cluster is private to the test and listens on loopback only.
const RPC_SECRET: &str = "4425f5c26c5e11581d3223904324dcb5b5d5dfb14e5e7f35e38c595424f5f1e6";

impl Garage {
    pub fn start() -> Garage {
        require_tool("garage");
        set_credentials();
        let began = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("garage-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let mut nodes = Vec::new();
        for i in 0..3 {
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let (rpc, s3, admin) = (free_port(), free_port(), free_port());
            let config = node_dir.join("garage.toml");
            // sqlite: compiled into the default build (so is lmdb) and
            // needs no memory map sizing.
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = \"{d}/meta\"\n\
                     data_dir = \"{d}/data\"\n\
                     db_engine = \"sqlite\"\n\
                     replication_factor = 3\n\
                     rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                     rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                     rpc_secret = \"{RPC_SECRET}\"\n\
                     [s3_api]\n\
                     s3_region = \"garage\"\n\
                     api_bind_addr = \"127.0.0.1:{s3}\"\n\
                     root_domain = \".s3.garage.localhost\"\n\
                     [admin]\n\
                     api_bind_addr = \"127.0.0.1:{admin}\"\n",
                    d = node_dir.display()
                ),
            )
            .unwrap();
            nodes.push(GarageNode {
                config,
                s3_port: s3,
                rpc_port: rpc,
                id: String::new(),
                child: None,
            });
        }
        let mut g = Garage {
            dir,
            nodes,
            startup: Duration::ZERO,
        };
        for i in 0..3 {
            g.spawn_node(i);
        }
        for i in 0..3 {
            g.wait_node(i);
        }
        // `node id` prints `ID@ADDR` (the node key is made at first start).
        for i in 0..3 {
            g.nodes[i].id = g.cli(i, &["node", "id", "-q"]).trim().to_string();
        }
        let ids: Vec<String> = g.nodes.iter().map(|n| n.id.clone()).collect();
        for id in &ids[1..] {
            g.cli(0, &["node", "connect", id]);
        }
        g.wait_healthy();
        let mut assign = vec!["layout", "assign", "-z", "dc1", "-c", "1G"];
        assign.extend(ids.iter().map(|id| id.split('@').next().unwrap()));
        g.cli(0, &assign);
        g.cli(0, &["layout", "apply", "--version", "1"]);
        g.cli(
            0,
            &[
                "key",
                "import",
                "--yes",
                "-n",
                "longwire-test",
                ACCESS_KEY,
                SECRET_KEY,
            ],
        );
        g.cli(0, &["bucket", "create", BUCKET]);
        g.cli(
            0,
            &[
                "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", ACCESS_KEY,
            ],
        );
        g.startup = began.elapsed();
        g
    }

    /// Run `garage -c nodeN.toml ARGS`, retrying for a while: right after
    /// start or a layout change a node may not know its peers yet.
    pub fn cli(&self, node: usize, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = command("garage")
                .arg("-c")
                .arg(&self.nodes[node].config)
                .args(args)
                .output()
                .expect("running garage");
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            if Instant::now() > deadline {
                panic!(
                    "garage {args:?} failed: {}\n{}\nnode log:\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    self.nodes[node].log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn spawn_node(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.config.with_file_name("garage.log"))
            .unwrap();
        let child = command(require_tool("garage").to_str().unwrap())
            .arg("-c")
            .arg(&n.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting garage");
        n.child = Some(child);
    }

    fn wait_node(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let port = n.s3_port;
        let child = n.child.as_mut().expect("node started");
        wait_for_port(port, child, &format!("garage node {i}"));
    }

    /// Start node `i` again (after [`Garage::kill_node`]) with its data,
    /// and wait until every running node sees every other. A restarted
    /// node does not find its peers by itself (none are configured, and
    /// the peer list it saves may be empty), and a connection made in one
    /// direction only took Garage 10 to 30 s to report healthy on the
    /// other side, so both sides connect.
    pub fn start_node(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "garage node {i} is running");
        self.spawn_node(i);
        self.wait_node(i);
        let peers: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| j != i && self.nodes[j].child.is_some())
            .collect();
        for &j in &peers {
            self.cli(i, &["node", "connect", &self.nodes[j].id]);
            self.cli(j, &["node", "connect", &self.nodes[i].id]);
        }
        self.wait_healthy();
    }

    /// Wait until each running node lists every running node as healthy.
    pub fn wait_healthy(&self) {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| self.nodes[j].child.is_some())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let all_seen = running.iter().all(|&j| {
                let healthy = healthy_ids(&self.status(j));
                running.iter().all(|&k| {
                    healthy
                        .iter()
                        .any(|h| self.nodes[k].id.starts_with(h.as_str()))
                })
            });
            if all_seen {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "garage nodes {running:?} do not all see each other after 30 s:\n{}",
                    self.status(running[0])
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGKILL node `i`.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `garage status` as node `i` sees the cluster.
    pub fn status(&self, i: usize) -> String {
        self.cli(i, &["status"])
    }

    pub fn endpoint(&self, node: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[node].s3_port)
    }

    pub fn uri(&self, node: usize, name: &str, extra: &str) -> String {
        format!(
            "s3://{BUCKET}/{name}?endpoint={}&region=garage{extra}",
            self.endpoint(node)
        )
    }
}

/// The node ids (16-hex-digit prefixes) in the HEALTHY NODES table of
/// `garage status`.
fn healthy_ids(status: &str) -> Vec<String> {
    status
        .split("====")
        .skip_while(|part| !part.contains("HEALTHY NODES"))
        .nth(1)
        .unwrap_or("")
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.len() == 16 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .map(str::to_string)
        .collect()
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
    }
}

/// Run `longwire serve ARGS` expecting it to fail at startup; returns its
/// stderr. Used for refusals (lease held, corrupt manifest).
pub fn serve_fails(dir: &Path, args: &[&str]) -> String {
    let mut cmd = command(&super::server_binary());
    cmd.arg("serve").args(args).current_dir(dir);
    let (out, timed_out) = super::output_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(!timed_out, "longwire serve {args:?} did not exit");
    assert!(
        !out.status.success(),
        "longwire serve {args:?} should have failed"
    );
    let _ = run_cmd;
    String::from_utf8_lossy(&out.stderr).into_owned()
}
