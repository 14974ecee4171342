//! The fault proxy's own behaviour, against a TCP echo server: faithful
//! forwarding, every byte in order through splits and delays, and the
//! manual controls (cut, pause, refuse) doing what they say.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use longwire_torture::fault_proxy::{FaultProxy, FaultWeights, Faults};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Send `data` and read the same amount back.
async fn round_trip(s: &mut TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(data).await?;
        Ok::<_, std::io::Error>(())
    };
    let mut back = vec![0; data.len()];
    let recv = r.read_exact(&mut back);
    let (a, b) = tokio::join!(send, recv);
    a?;
    b?;
    Ok(back)
}

#[tokio::test]
async fn forwards_every_byte_through_splits_and_delays() {
    let target = echo_server().await;
    let faults = Faults {
        mean_interval: Some(Duration::from_millis(5)),
        weights: FaultWeights {
            stall: 1,
            delay: 3,
            split: 3,
            drop: 0,
            reset: 0,
            close: 0,
        },
        stall: (Duration::from_millis(10), Duration::from_millis(50)),
        ..Faults::chaos(11, Duration::from_millis(5))
    };
    let proxy = FaultProxy::start(target, faults).await.unwrap();
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    let data = pattern(1 << 20);
    for _ in 0..3 {
        let back = timeout(Duration::from_secs(60), round_trip(&mut s, &data))
            .await
            .expect("echo through the proxy hung")
            .unwrap();
        assert!(back == data, "bytes were lost, duplicated or reordered");
    }
    let st = proxy.stats();
    assert!(
        st.splits > 0 && st.delays > 0,
        "no faults were injected: {st:?}"
    );
    // The counters move just after each write, so the echo may beat them.
    for _ in 0..100 {
        let st = proxy.stats();
        if st.bytes_to_target == 3 << 20 && st.bytes_from_target == 3 << 20 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("byte counters wrong: {:?}", proxy.stats());
}

#[tokio::test]
async fn cut_all_resets_both_peers() {
    let target = echo_server().await;
    let proxy = FaultProxy::start(target, Faults::none()).await.unwrap();
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut s, b"hello").await.unwrap();
    assert_eq!(proxy.stats().live, 1);
    proxy.cut_all();
    let mut buf = [0u8; 16];
    let r = timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("a cut connection must end at once");
    assert_eq!(
        r.map_err(|e| e.kind()).unwrap_err(),
        ErrorKind::ConnectionReset,
        "expected RST"
    );
    let st = proxy.stats();
    assert_eq!(st.cut, 1);
    for _ in 0..100 {
        if proxy.stats().live == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the proxy still counts a live connection after the cut");
}

#[tokio::test]
async fn pause_holds_traffic_until_resumed() {
    let target = echo_server().await;
    let proxy = FaultProxy::start(target, Faults::none()).await.unwrap();
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut s, b"before").await.unwrap();
    proxy.set_paused(true);
    s.write_all(b"during").await.unwrap();
    let mut buf = [0u8; 6];
    assert!(
        timeout(Duration::from_millis(500), s.read_exact(&mut buf))
            .await
            .is_err(),
        "data crossed a paused proxy"
    );
    proxy.set_paused(false);
    timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("resumed proxy did not forward")
        .unwrap();
    assert_eq!(&buf, b"during");
}

#[tokio::test]
async fn refusing_resets_new_connections_only() {
    let target = echo_server().await;
    let proxy = FaultProxy::start(target, Faults::none()).await.unwrap();
    let mut old = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut old, b"x").await.unwrap();
    proxy.set_refusing(true);
    let mut new = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut buf = [0u8; 1];
    let r = timeout(Duration::from_secs(5), new.read(&mut buf))
        .await
        .expect("refused connection hung");
    assert!(
        matches!(r, Err(ref e) if e.kind() == ErrorKind::ConnectionReset),
        "expected RST, got {r:?}"
    );
    round_trip(&mut old, b"still up")
        .await
        .expect("existing connection was disturbed");
    assert_eq!(proxy.stats().refused, 1);
    proxy.set_refusing(false);
    let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut again, b"ok").await.unwrap();
}

#[tokio::test]
async fn random_resets_and_closes_end_connections() {
    let target = echo_server().await;
    let faults = Faults {
        weights: FaultWeights {
            stall: 0,
            delay: 0,
            split: 0,
            drop: 0,
            reset: 1,
            close: 1,
        },
        ..Faults::chaos(5, Duration::from_millis(20))
    };
    let proxy = FaultProxy::start(target, faults).await.unwrap();
    let data = pattern(4096);
    for _ in 0..10 {
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let ended = timeout(Duration::from_secs(10), async {
            loop {
                if round_trip(&mut s, &data).await.is_err() {
                    return;
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "a connection outlived its scheduled fault");
    }
    let st = proxy.stats();
    assert!(st.resets + st.closes >= 10, "{st:?}");
}
