//! Opening one connection: the socket (TCP or unix) and the handshake,
//! driven through the sans-IO [`ClientNegotiation`], under one timeout.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::config::ClientConfig;
use super::error::ClientError;
use super::negotiate::*;
use super::tls::ClientTls;
use super::uri::{Address, NbdUri};

pub(crate) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// A connection in the transmission phase.
pub(crate) struct Connected {
    pub rd: BoxRead,
    pub wr: BoxWrite,
    pub info: ExportInfo,
    /// A second handle on the TCP socket (none for unix sockets), so a
    /// connection given up for dead can be reset: see [`Connected::abandon`].
    pub socket: Option<socket2::Socket>,
}

impl Connected {
    /// Mark the socket to be reset rather than closed when its halves are
    /// dropped: the kernel then discards what it has not sent yet instead of
    /// retransmitting it, so old requests cannot reach the server after the
    /// ones re-sent on a new connection when the network heals.
    pub fn abandon(socket: &Option<socket2::Socket>) {
        if let Some(s) = socket {
            let _ = s.set_linger(Some(std::time::Duration::ZERO));
        }
    }
}

fn connect_error(address: &Address, e: io::Error) -> ClientError {
    ClientError::Connect { address: address.to_string(), kind: e.kind(), message: e.to_string() }
}

/// A freshly opened socket.
enum Plain {
    Tcp(TcpStream),
    Unix(UnixStream),
}

async fn open_stream(address: &Address) -> io::Result<Plain> {
    match address {
        Address::Tcp { host, port } => {
            let mut last = None;
            for addr in tokio::net::lookup_host((host.as_str(), *port)).await? {
                match TcpStream::connect(addr).await {
                    Ok(s) => {
                        // Requests are small and latency-bound; never wait to coalesce.
                        s.set_nodelay(true)?;
                        return Ok(Plain::Tcp(s));
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host} has no addresses"))))
        }
        Address::Unix(path) => Ok(Plain::Unix(UnixStream::connect(path).await?)),
    }
}

/// Connect and negotiate, all within `config.connect_timeout`. `tls`
/// (loaded once per client by [`super::tls::load`]) is required for TLS URIs.
pub(crate) async fn connect(uri: &NbdUri, config: &ClientConfig, tls: Option<&ClientTls>) -> Result<Connected, ClientError> {
    let address = &uri.address;
    let tls = match (uri.tls, tls) {
        (false, _) => None,
        (true, Some(t)) => Some(t),
        (true, None) => {
            return Err(ClientError::TlsSetup { uri: uri.to_string(), message: "no TLS configuration loaded".into() })
        }
    };
    let timeout = config.connect_timeout;
    let attempt = async {
        let opts = NegotiateOptions {
            export: uri.export.clone(),
            extended_headers: config.extended_headers,
            structured_replies: config.structured_replies,
            block_status: config.block_status,
            tls: tls.is_some(),
        };
        let fail = |e: HandshakeFailure| match e {
            HandshakeFailure::Io(e) => connect_error(address, e),
            HandshakeFailure::Nbd(error) => ClientError::Handshake { address: address.to_string(), error },
            HandshakeFailure::Tls(e) => tls_error(address, tls, e),
        };
        match open_stream(address).await.map_err(|e| connect_error(address, e))? {
            Plain::Tcp(s) => {
                let dup = socket2::SockRef::from(&s).try_clone().map_err(|e| connect_error(address, e))?;
                handshake(s, opts, tls, |s| {
                    let (r, w) = s.into_split();
                    (Box::new(r), Box::new(w))
                })
                .await
                .map(|c| Connected { socket: Some(dup), ..c })
            }
            Plain::Unix(s) => {
                handshake(s, opts, tls, |s| {
                    let (r, w) = s.into_split();
                    (Box::new(r), Box::new(w))
                })
                .await
            }
        }
        .map_err(fail)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Connect {
            address: address.to_string(),
            kind: io::ErrorKind::TimedOut,
            message: format!("connecting and the NBD handshake did not finish within {}", fmt_duration(timeout)),
        }),
    }
}

fn tls_error(address: &Address, tls: Option<&ClientTls>, e: io::Error) -> ClientError {
    let mut message = e.to_string();
    if let Some(t) = tls {
        if message.contains("invalid peer certificate") {
            message = format!(
                "{message} (the server's certificate is not trusted by the CA in {}, or does not name {:?})",
                t.ca.display(),
                t.server_name.to_str()
            );
        } else if message.contains("CertificateRequired") {
            message = format!(
                "{message} (the server wants a client certificate: client-cert.pem and client-key.pem in the \
                 tls-certificates directory, or ClientConfig::tls_cert/tls_key)"
            );
        }
    }
    ClientError::Tls { address: address.to_string(), message }
}

/// The handshake on `stream`, upgrading it to TLS when the negotiation
/// says so; `split` divides a plaintext stream that stays plaintext.
async fn handshake<S>(
    mut stream: S,
    opts: NegotiateOptions,
    tls: Option<&ClientTls>,
    split: impl FnOnce(S) -> (BoxRead, BoxWrite),
) -> Result<Connected, HandshakeFailure>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut n = ClientNegotiation::new(opts);
    let mut out = BytesMut::new();
    let mut greeting = [0u8; GREETING_LEN];
    stream.read_exact(&mut greeting).await.map_err(|e| eof_means(e, "the server closed the connection before greeting"))?;
    let action = n.greeting(&greeting, &mut out)?;
    match drive(&mut stream, &mut n, &mut out, action).await? {
        Step::Done(info) => {
            let (rd, wr) = split(stream);
            Ok(Connected { rd, wr, info, socket: None })
        }
        Step::StartTls => {
            let Some(tls) = tls else {
                return Err(NegotiationError::Protocol("STARTTLS without a TLS configuration".into()).into());
            };
            let mut stream =
                tls.connector.connect(tls.server_name.clone(), stream).await.map_err(HandshakeFailure::Tls)?;
            let action = n.tls_established(&mut out)?;
            // TLS errors can still surface now (TLS 1.3 servers check the
            // client certificate after the client's handshake finished).
            let step = drive(&mut stream, &mut n, &mut out, action).await.map_err(|e| match e {
                HandshakeFailure::Io(e) if e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) => HandshakeFailure::Tls(e),
                e => e,
            })?;
            match step {
                Step::Done(info) => {
                    let (r, w) = tokio::io::split(stream);
                    Ok(Connected { rd: Box::new(r), wr: Box::new(w), info, socket: None })
                }
                Step::StartTls => Err(NegotiationError::Protocol("STARTTLS acknowledged twice".into()).into()),
            }
        }
    }
}

pub(crate) enum HandshakeFailure {
    Io(io::Error),
    Nbd(NegotiationError),
    Tls(io::Error),
}

impl From<io::Error> for HandshakeFailure {
    fn from(e: io::Error) -> Self {
        HandshakeFailure::Io(e)
    }
}

impl From<NegotiationError> for HandshakeFailure {
    fn from(e: NegotiationError) -> Self {
        HandshakeFailure::Nbd(e)
    }
}

/// Where [`drive`] stopped.
enum Step {
    Done(ExportInfo),
    StartTls,
}

/// Run the negotiation on `s` from `action` until it is done or wants TLS.
async fn drive<S>(s: &mut S, n: &mut ClientNegotiation, out: &mut BytesMut, mut action: Action) -> Result<Step, HandshakeFailure>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    loop {
        if !out.is_empty() {
            s.write_all(out).await?;
            s.flush().await?;
            out.clear();
        }
        action = match action {
            Action::ReadOptionReply => {
                let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
                s.read_exact(&mut h).await.map_err(|e| eof_means(e, "the server closed the connection during the handshake"))?;
                let (opt, typ, len) = parse_option_reply_header(&h)?;
                let mut data = vec![0u8; len as usize];
                s.read_exact(&mut data).await?;
                n.option_reply(opt, typ, &data, out)?
            }
            Action::ReadExportNameReply { len } => {
                let mut data = vec![0u8; len];
                s.read_exact(&mut data).await.map_err(|e| {
                    eof_means(e, "the server closed the connection after NBD_OPT_EXPORT_NAME (no such export?)")
                })?;
                return Ok(Step::Done(*n.export_name_reply(&data)?));
            }
            Action::StartTls => return Ok(Step::StartTls),
            Action::Done(info) => return Ok(Step::Done(*info)),
        };
    }
}

fn eof_means(e: io::Error, what: &str) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        io::Error::new(io::ErrorKind::UnexpectedEof, what.to_string())
    } else {
        e
    }
}

/// A duration for humans: "30s", "1.5s", "250ms".
pub(crate) fn fmt_duration(d: Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
