//! A TCP proxy that injects network faults, for tests that put a flaky
//! network between a client and a server.
//!
//! ```no_run
//! # async fn demo(server: std::net::SocketAddr) -> std::io::Result<()> {
//! use std::time::Duration;
//! use longwire_torture::fault_proxy::{FaultProxy, Faults};
//!
//! // A fault every 2 s on average per connection direction, seeded.
//! let proxy = FaultProxy::start(server, Faults::chaos(42, Duration::from_secs(2))).await?;
//! let uri = format!("nbd://{}/default", proxy.addr()); // point the client here
//! proxy.set_paused(true);   // stall everything (nothing is read or forwarded)
//! proxy.set_paused(false);
//! proxy.cut_all();          // reset every live connection (RST both ways)
//! proxy.set_refusing(true); // new connections are reset at once
//! println!("{:?}", proxy.stats());
//! # Ok(()) }
//! ```
//!
//! Each accepted connection gets its own connection to the target and two
//! pumps (client→server, server→client). Random faults are decided per
//! direction: after an exponentially distributed quiet time (mean
//! [`Faults::mean_interval`]) the next chunk that passes triggers one, picked
//! by [`FaultWeights`]:
//!
//! - **stall**: stop reading and forwarding this direction for a while (the
//!   sender sees TCP backpressure), then carry on;
//! - **delay**: for a while, hold every chunk a few milliseconds;
//! - **split**: for a while, forward in tiny writes (1–97 bytes) so every
//!   header arrives in pieces;
//! - **drop**: silently discard everything from now on in this direction
//!   (a black hole; the connection stays up, a closed end is still passed
//!   on so the proxy itself never holds a connection open);
//! - **reset**: close both sockets with `SO_LINGER` 0, so both peers get RST;
//! - **close**: close both sides cleanly (FIN) in the middle of traffic.
//!
//! The schedule is derived from [`Faults::seed`] and the connection number,
//! so a run can be repeated (timing still varies).

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::rng::Rng;

/// Relative weights of the random faults (0 disables one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultWeights {
    pub stall: u32,
    pub delay: u32,
    pub split: u32,
    pub drop: u32,
    pub reset: u32,
    pub close: u32,
}

/// The random fault schedule. [`Faults::none`] forwards faithfully.
#[derive(Debug, Clone, PartialEq)]
pub struct Faults {
    pub seed: u64,
    /// Mean quiet time between random faults on one direction of one
    /// connection; `None` injects no random faults.
    pub mean_interval: Option<Duration>,
    pub weights: FaultWeights,
    /// How long a stall lasts (uniform in the range).
    pub stall: (Duration, Duration),
    /// Extra latency per chunk during a delay episode.
    pub delay: (Duration, Duration),
    /// How long a delay or split episode lasts.
    pub episode: (Duration, Duration),
}

impl Faults {
    /// A plain proxy: no random faults (manual controls still work).
    pub fn none() -> Faults {
        Faults {
            mean_interval: None,
            ..Faults::chaos(0, Duration::from_secs(1))
        }
    }

    /// Every kind of fault, one per `mean_interval` on average per direction.
    pub fn chaos(seed: u64, mean_interval: Duration) -> Faults {
        Faults {
            seed,
            mean_interval: Some(mean_interval),
            weights: FaultWeights {
                stall: 3,
                delay: 3,
                split: 3,
                drop: 1,
                reset: 2,
                close: 1,
            },
            stall: (Duration::from_millis(200), Duration::from_secs(4)),
            delay: (Duration::from_millis(1), Duration::from_millis(40)),
            episode: (Duration::from_millis(100), Duration::from_secs(2)),
        }
    }
}

/// What the proxy has done so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FaultStats {
    pub accepted: u64,
    /// Connections reset at once because the proxy was refusing.
    pub refused: u64,
    /// Connections the target refused or did not answer.
    pub target_failed: u64,
    pub live: u64,
    pub bytes_to_target: u64,
    pub bytes_from_target: u64,
    pub stalls: u64,
    pub delays: u64,
    pub splits: u64,
    pub drops: u64,
    pub resets: u64,
    pub closes: u64,
    /// Connections reset by [`FaultProxy::cut_all`].
    pub cut: u64,
}

impl FaultStats {
    /// Random faults injected (manual cuts not included).
    pub fn faults(&self) -> u64 {
        self.stalls + self.delays + self.splits + self.drops + self.resets + self.closes
    }
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    target_failed: AtomicU64,
    live: AtomicU64,
    to_target: AtomicU64,
    from_target: AtomicU64,
    stalls: AtomicU64,
    delays: AtomicU64,
    splits: AtomicU64,
    drops: AtomicU64,
    resets: AtomicU64,
    closes: AtomicU64,
    cut: AtomicU64,
}

struct Shared {
    target: SocketAddr,
    faults: Mutex<Faults>,
    paused: watch::Sender<bool>,
    refusing: AtomicBool,
    counters: Counters,
    conns: Mutex<HashMap<u64, Arc<Control>>>,
    stop: CancellationToken,
}

/// A handle to a running proxy. Dropping it stops the proxy and resets
/// every connection through it.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Listen on a free loopback port (of the target's address family) and
    /// forward every connection to `target`.
    pub async fn start(target: SocketAddr, faults: Faults) -> io::Result<FaultProxy> {
        let bind: SocketAddr = if target.is_ipv4() {
            (Ipv4Addr::LOCALHOST, 0).into()
        } else {
            (Ipv6Addr::LOCALHOST, 0).into()
        };
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            faults: Mutex::new(faults),
            paused: watch::channel(false).0,
            refusing: AtomicBool::new(false),
            counters: Counters::default(),
            conns: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
        });
        tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultProxy { addr, shared })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Reset every live connection now (RST to both peers).
    pub fn cut_all(&self) {
        let conns: Vec<_> = self
            .shared
            .conns
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect();
        for c in conns {
            if c.reset() {
                self.shared.counters.cut.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Pause: no connection reads or forwards anything (both peers see
    /// a silent, stalled network) until resumed. New connections are still
    /// accepted and then stall too.
    pub fn set_paused(&self, paused: bool) {
        self.shared.paused.send_replace(paused);
    }

    /// Refuse: reset new connections as soon as they are accepted.
    pub fn set_refusing(&self, refusing: bool) {
        self.shared.refusing.store(refusing, Ordering::Relaxed);
    }

    /// Change the random fault schedule; connections opened from now on
    /// use it (existing ones keep theirs).
    pub fn set_faults(&self, faults: Faults) {
        *self.shared.faults.lock().unwrap() = faults;
    }

    pub fn stats(&self) -> FaultStats {
        let c = &self.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultStats {
            accepted: l(&c.accepted),
            refused: l(&c.refused),
            target_failed: l(&c.target_failed),
            live: l(&c.live),
            bytes_to_target: l(&c.to_target),
            bytes_from_target: l(&c.from_target),
            stalls: l(&c.stalls),
            delays: l(&c.delays),
            splits: l(&c.splits),
            drops: l(&c.drops),
            resets: l(&c.resets),
            closes: l(&c.closes),
            cut: l(&c.cut),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.cancel();
        self.cut_all();
    }
}

/// Per connection: a way to end it from anywhere, gracefully or with RST.
struct Control {
    /// Duplicates of both sockets' descriptors, kept so a reset can set
    /// `SO_LINGER` 0 on sockets the pumps own; the sockets close when the
    /// pumps and this are all dropped.
    sockets: [std::net::TcpStream; 2],
    end: CancellationToken,
}

impl Control {
    /// End with RST both ways; false if it was already ending.
    fn reset(&self) -> bool {
        if self.end.is_cancelled() {
            return false;
        }
        for s in &self.sockets {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
        self.end.cancel();
        true
    }

    /// End with FIN both ways.
    fn close(&self) -> bool {
        if self.end.is_cancelled() {
            return false;
        }
        for s in &self.sockets {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.end.cancel();
        true
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut n = 0u64;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shared.stop.cancelled() => return,
        };
        let Ok((client, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        n += 1;
        if shared.refusing.load(Ordering::Relaxed) {
            shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            drop(client);
            continue;
        }
        shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(connection(client, n, shared.clone()));
    }
}

fn duplicate(s: TcpStream) -> io::Result<(TcpStream, std::net::TcpStream)> {
    let std = s.into_std()?;
    let dup = std.try_clone()?;
    Ok((TcpStream::from_std(std)?, dup))
}

async fn connection(client: TcpStream, id: u64, shared: Arc<Shared>) {
    let connect = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(shared.target)) => r,
        _ = shared.stop.cancelled() => return,
    };
    let server = match connect {
        Ok(Ok(s)) => s,
        _ => {
            shared
                .counters
                .target_failed
                .fetch_add(1, Ordering::Relaxed);
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok((client, c_dup)), Ok((server, s_dup))) = (duplicate(client), duplicate(server)) else {
        return;
    };
    let control = Arc::new(Control {
        sockets: [c_dup, s_dup],
        end: shared.stop.child_token(),
    });
    shared.conns.lock().unwrap().insert(id, control.clone());
    shared.counters.live.fetch_add(1, Ordering::Relaxed);

    let faults = shared.faults.lock().unwrap().clone();
    let mut rng = Rng::new(faults.seed ^ id.wrapping_mul(0xA24B_AED4_963E_E407));
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = Pump {
        shared: &shared,
        control: &control,
        faults: &faults,
        rng: rng.fork(1),
        to_target: true,
    };
    let down = Pump {
        shared: &shared,
        control: &control,
        faults: &faults,
        rng: rng.fork(2),
        to_target: false,
    };
    tokio::join!(up.run(cr, sw), down.run(sr, cw));

    shared.conns.lock().unwrap().remove(&id);
    shared.counters.live.fetch_sub(1, Ordering::Relaxed);
}

/// One direction of one connection.
struct Pump<'a> {
    shared: &'a Shared,
    control: &'a Control,
    faults: &'a Faults,
    rng: Rng,
    to_target: bool,
}

#[derive(Default)]
struct Episodes {
    delay_until: Option<Instant>,
    split_until: Option<Instant>,
    black_hole: bool,
}

enum Fault {
    Stall,
    Delay,
    Split,
    Drop,
    Reset,
    Close,
}

impl Pump<'_> {
    fn next_fault_at(&mut self) -> Option<Instant> {
        self.faults
            .mean_interval
            .map(|m| Instant::now() + self.rng.exponential(m))
    }

    fn pick(&mut self) -> Option<Fault> {
        let w = self.faults.weights;
        let i = self
            .rng
            .weighted(&[w.stall, w.delay, w.split, w.drop, w.reset, w.close])?;
        Some(
            [
                Fault::Stall,
                Fault::Delay,
                Fault::Split,
                Fault::Drop,
                Fault::Reset,
                Fault::Close,
            ]
            .into_iter()
            .nth(i)
            .unwrap(),
        )
    }

    /// Sleep unless the connection ends first; false if it ended.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.control.end.cancelled() => false,
        }
    }

    async fn wait_unpaused(&self) -> bool {
        let mut rx = self.shared.paused.subscribe();
        tokio::select! {
            r = rx.wait_for(|p| !*p) => r.is_ok(),
            _ = self.control.end.cancelled() => false,
        }
    }

    async fn run(mut self, mut from: OwnedReadHalf, mut to: OwnedWriteHalf) {
        self.pump(&mut from, &mut to).await;
        if self.control.end.is_cancelled() {
            // Dropping a write half sends FIN; a reset must not.
            to.forget();
        }
    }

    async fn pump(&mut self, from: &mut OwnedReadHalf, to: &mut OwnedWriteHalf) {
        let c = &self.shared.counters;
        let bytes = if self.to_target {
            &c.to_target
        } else {
            &c.from_target
        };
        let mut next_fault = self.next_fault_at();
        let mut ep = Episodes::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if !self.wait_unpaused().await {
                return;
            }
            let n = tokio::select! {
                r = from.read(&mut buf) => r.unwrap_or(0),
                _ = self.control.end.cancelled() => return,
            };
            if n == 0 {
                // Pass the end on (even from a black hole), so the proxy
                // never keeps a connection the client has closed.
                let _ = to.shutdown().await;
                return;
            }
            // Paused while the read was pending: hold what was read.
            if !self.wait_unpaused().await {
                return;
            }
            let now = Instant::now();
            if next_fault.is_some_and(|t| now >= t) {
                next_fault = self.next_fault_at();
                match self.pick() {
                    Some(Fault::Stall) => {
                        c.stalls.fetch_add(1, Ordering::Relaxed);
                        let d = self.rng.duration(self.faults.stall.0, self.faults.stall.1);
                        if !self.sleep(d).await {
                            return;
                        }
                    }
                    Some(Fault::Delay) => {
                        c.delays.fetch_add(1, Ordering::Relaxed);
                        ep.delay_until = Some(
                            now + self
                                .rng
                                .duration(self.faults.episode.0, self.faults.episode.1),
                        );
                    }
                    Some(Fault::Split) => {
                        c.splits.fetch_add(1, Ordering::Relaxed);
                        ep.split_until = Some(
                            now + self
                                .rng
                                .duration(self.faults.episode.0, self.faults.episode.1),
                        );
                    }
                    Some(Fault::Drop) => {
                        if !ep.black_hole {
                            c.drops.fetch_add(1, Ordering::Relaxed);
                        }
                        ep.black_hole = true;
                    }
                    Some(Fault::Reset) => {
                        if self.control.reset() {
                            c.resets.fetch_add(1, Ordering::Relaxed);
                        }
                        return;
                    }
                    Some(Fault::Close) => {
                        if self.control.close() {
                            c.closes.fetch_add(1, Ordering::Relaxed);
                        }
                        return;
                    }
                    None => {}
                }
            }
            if ep.black_hole {
                continue;
            }
            if ep.delay_until.is_some_and(|t| now < t) {
                let d = self.rng.duration(self.faults.delay.0, self.faults.delay.1);
                if !self.sleep(d).await {
                    return;
                }
            }
            let wrote = if ep.split_until.is_some_and(|t| now < t) {
                self.write_split(to, &buf[..n]).await
            } else {
                self.write(to, &buf[..n]).await
            };
            if !wrote {
                // The receiving peer is gone: end the whole connection.
                self.control.end.cancel();
                return;
            }
            bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    async fn write(&self, to: &mut OwnedWriteHalf, data: &[u8]) -> bool {
        tokio::select! {
            r = to.write_all(data) => r.is_ok(),
            _ = self.control.end.cancelled() => false,
        }
    }

    async fn write_split(&mut self, to: &mut OwnedWriteHalf, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            let k = (self.rng.range(1, 98) as usize).min(data.len());
            if !self.write(to, &data[..k]).await {
                return false;
            }
            data = &data[k..];
            // Let each piece leave as its own segment.
            tokio::task::yield_now().await;
        }
        true
    }
}
