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
use super::uri::{Address, NbdUri};

pub(crate) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// A connection in the transmission phase.
pub(crate) struct Connected {
    pub rd: BoxRead,
    pub wr: BoxWrite,
    pub info: ExportInfo,
}

fn connect_error(address: &Address, e: io::Error) -> ClientError {
    ClientError::Connect { address: address.to_string(), kind: e.kind(), message: e.to_string() }
}

async fn open_stream(address: &Address) -> io::Result<(BoxRead, BoxWrite)> {
    match address {
        Address::Tcp { host, port } => {
            let mut last = None;
            for addr in tokio::net::lookup_host((host.as_str(), *port)).await? {
                match TcpStream::connect(addr).await {
                    Ok(s) => {
                        // Requests are small and latency-bound; never wait to coalesce.
                        s.set_nodelay(true)?;
                        let (r, w) = s.into_split();
                        return Ok((Box::new(r), Box::new(w)));
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host} has no addresses"))))
        }
        Address::Unix(path) => {
            let s = UnixStream::connect(path).await?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
    }
}

/// Connect and negotiate, all within `config.connect_timeout`.
pub(crate) async fn connect(uri: &NbdUri, config: &ClientConfig) -> Result<Connected, ClientError> {
    if uri.tls {
        return Err(ClientError::TlsUnsupported(uri.to_string()));
    }
    let address = &uri.address;
    let timeout = config.connect_timeout;
    let attempt = async {
        let (mut rd, mut wr) = open_stream(address).await.map_err(|e| connect_error(address, e))?;
        let opts = NegotiateOptions {
            export: uri.export.clone(),
            extended_headers: config.extended_headers,
            structured_replies: config.structured_replies,
            block_status: config.block_status,
        };
        let info = negotiate(&mut rd, &mut wr, opts).await.map_err(|e| match e {
            HandshakeFailure::Io(e) => connect_error(address, e),
            HandshakeFailure::Nbd(error) => ClientError::Handshake { address: address.to_string(), error },
        })?;
        Ok(Connected { rd, wr, info })
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

pub(crate) enum HandshakeFailure {
    Io(io::Error),
    Nbd(NegotiationError),
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

/// Run the client side of the handshake on a connected stream.
pub(crate) async fn negotiate<R, W>(rd: &mut R, wr: &mut W, opts: NegotiateOptions) -> Result<ExportInfo, HandshakeFailure>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut n = ClientNegotiation::new(opts);
    let mut greeting = [0u8; GREETING_LEN];
    rd.read_exact(&mut greeting).await.map_err(|e| eof_means(e, "the server closed the connection before greeting"))?;
    let mut out = BytesMut::new();
    let mut action = n.greeting(&greeting, &mut out)?;
    loop {
        if !out.is_empty() {
            wr.write_all(&out).await?;
            wr.flush().await?;
            out.clear();
        }
        action = match action {
            Action::ReadOptionReply => {
                let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
                rd.read_exact(&mut h).await.map_err(|e| eof_means(e, "the server closed the connection during the handshake"))?;
                let (opt, typ, len) = parse_option_reply_header(&h)?;
                let mut data = vec![0u8; len as usize];
                rd.read_exact(&mut data).await?;
                n.option_reply(opt, typ, &data, &mut out)?
            }
            Action::ReadExportNameReply { len } => {
                let mut data = vec![0u8; len];
                rd.read_exact(&mut data).await.map_err(|e| {
                    eof_means(e, "the server closed the connection after NBD_OPT_EXPORT_NAME (no such export?)")
                })?;
                return Ok(*n.export_name_reply(&data)?);
            }
            Action::Done(info) => return Ok(*info),
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
