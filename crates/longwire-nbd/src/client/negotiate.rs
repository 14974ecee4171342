//! Sans-IO client side of the fixed-newstyle handshake.
//!
//! The driver reads the 18-byte greeting and hands it to
//! [`ClientNegotiation::greeting`]; from then on it writes whatever lands
//! in the output buffer and does what the returned [`Action`] says: read
//! one option reply (20-byte header, then its payload) and feed it to
//! [`ClientNegotiation::option_reply`], or read the fixed-size
//! `NBD_OPT_EXPORT_NAME` reply and feed it to
//! [`ClientNegotiation::export_name_reply`].
//!
//! With [`NegotiateOptions::tls`] the first option is `STARTTLS`; once the
//! server acknowledges it the machine returns [`Action::StartTls`], the
//! driver runs the TLS handshake on the stream and calls
//! [`ClientNegotiation::tls_established`], and everything after that goes
//! over TLS.
//!
//! The order of options: `EXTENDED_HEADERS` (else `STRUCTURED_REPLY`),
//! `SET_META_CONTEXT base:allocation` (when replies can carry it), then
//! `GO` asking for `INFO_BLOCK_SIZE`, `INFO_NAME` and `INFO_DESCRIPTION`;
//! a server that does not know `GO` gets `EXPORT_NAME` instead.

use bytes::{BufMut, BytesMut};

use crate::proto::*;
use crate::transmission::ReplyStyle;

/// Length of the server's greeting (magic, IHAVEOPT, handshake flags).
pub const GREETING_LEN: usize = 18;
/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Largest option reply payload accepted (names and descriptions are at
/// most 4 KiB; error messages get generous room).
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// What the client wants from the handshake.
#[derive(Debug, Clone)]
pub struct NegotiateOptions {
    /// Export name ("" asks for the server's default export).
    pub export: String,
    /// Try `NBD_OPT_EXTENDED_HEADERS`.
    pub extended_headers: bool,
    /// Try `NBD_OPT_STRUCTURED_REPLY` (when extended headers are refused).
    pub structured_replies: bool,
    /// Select `base:allocation` for block status.
    pub block_status: bool,
    /// Start with `NBD_OPT_STARTTLS` (and fail if the server refuses).
    pub tls: bool,
}

impl NegotiateOptions {
    pub fn new(export: impl Into<String>) -> Self {
        NegotiateOptions {
            export: export.into(),
            extended_headers: true,
            structured_replies: true,
            block_status: true,
            tls: false,
        }
    }
}

/// Everything the transmission phase needs to know, as negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The name the client asked for.
    pub requested_name: String,
    /// The server's canonical name for the export (`NBD_INFO_NAME`), if sent.
    pub canonical_name: Option<String>,
    /// `NBD_INFO_DESCRIPTION`, if sent.
    pub description: Option<String>,
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_payload: u32,
    /// Whether the server sent `NBD_INFO_BLOCK_SIZE` (else the defaults apply).
    pub block_size_advertised: bool,
    pub reply_style: ReplyStyle,
    /// Metadata context id of `base:allocation`, when selected.
    pub base_allocation: Option<u32>,
    /// The server did not support `NBD_OPT_GO`; `NBD_OPT_EXPORT_NAME` was used.
    pub used_export_name: bool,
}

impl ExportInfo {
    pub fn extended(&self) -> bool {
        self.reply_style == ReplyStyle::Extended
    }

    pub fn has_flag(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Why a handshake failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NegotiationError {
    #[error("NBD handshake: the server broke the protocol: {0}")]
    Protocol(String),
    #[error("the server speaks the oldstyle NBD handshake, which is not supported")]
    Oldstyle,
    #[error("the server has no export named {name:?}: {message}")]
    UnknownExport { name: String, message: String },
    #[error("the server requires TLS (use an nbds:// or nbds+unix:// URI): {0}")]
    TlsRequired(String),
    #[error("the server refused TLS (NBD_OPT_STARTTLS): {0}")]
    TlsRefused(String),
    #[error("the server is shutting down: {0}")]
    ShuttingDown(String),
    #[error("the server refused {option}: {message} (error {code:#x})")]
    Refused { option: &'static str, code: u32, message: String },
}

/// What the driver does next.
#[derive(Debug)]
pub enum Action {
    /// Write the output, then read one option reply (header and payload).
    ReadOptionReply,
    /// Write the output, then read exactly `len` bytes: the reply to
    /// `NBD_OPT_EXPORT_NAME`.
    ReadExportNameReply { len: usize },
    /// Write the output (nothing, in practice), then run the TLS client
    /// handshake on the stream and call
    /// [`ClientNegotiation::tls_established`].
    StartTls,
    /// The handshake is over; transmission starts.
    Done(Box<ExportInfo>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Start,
    StartTls,
    TlsHandshake,
    ExtendedHeaders,
    StructuredReply,
    MetaContext,
    Go,
    ExportName,
    Finished,
}

/// The client's side of option haggling.
#[derive(Debug)]
pub struct ClientNegotiation {
    opts: NegotiateOptions,
    pending: Pending,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    meta_candidate: Option<u32>,
    base_allocation: Option<u32>,
    export: Option<(u64, u16)>,
    block_size: Option<(u32, u32, u32)>,
    canonical_name: Option<String>,
    description: Option<String>,
}

fn protocol<T>(msg: impl Into<String>) -> Result<T, NegotiationError> {
    Err(NegotiationError::Protocol(msg.into()))
}

/// Split an option reply header into (option, reply type, payload length),
/// checking the magic and bounding the length.
pub fn parse_option_reply_header(h: &[u8; OPTION_REPLY_HEADER_LEN]) -> Result<(u32, u32, u32), NegotiationError> {
    let magic = u64::from_be_bytes(h[..8].try_into().unwrap());
    if magic != OPT_REPLY_MAGIC {
        return protocol(format!("bad option reply magic {magic:#x}"));
    }
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    if len > MAX_OPTION_REPLY {
        return protocol(format!("option reply of {len} bytes is too large"));
    }
    Ok((opt, typ, len))
}

fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_GO => "NBD_OPT_GO",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        _ => "an option",
    }
}

/// Append one option request.
pub fn encode_option(out: &mut BytesMut, opt: u32, data: &[u8]) {
    out.reserve(16 + data.len());
    out.put_u64(IHAVEOPT);
    out.put_u32(opt);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// Payload of `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::with_capacity(6 + name.len() + 2 * infos.len());
    d.put_u32(name.len() as u32);
    d.put_slice(name.as_bytes());
    d.put_u16(infos.len() as u16);
    for &i in infos {
        d.put_u16(i);
    }
    d
}

/// Payload of `NBD_OPT_SET_META_CONTEXT`/`NBD_OPT_LIST_META_CONTEXT`.
pub fn meta_context_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.put_u32(name.len() as u32);
    d.put_slice(name.as_bytes());
    d.put_u32(queries.len() as u32);
    for q in queries {
        d.put_u32(q.len() as u32);
        d.put_slice(q.as_bytes());
    }
    d
}

impl ClientNegotiation {
    pub fn new(opts: NegotiateOptions) -> Self {
        ClientNegotiation {
            opts,
            pending: Pending::Start,
            no_zeroes: false,
            structured: false,
            extended: false,
            meta_candidate: None,
            base_allocation: None,
            export: None,
            block_size: None,
            canonical_name: None,
            description: None,
        }
    }

    /// Handle the server greeting; appends the client flags and the first
    /// option to `out`.
    pub fn greeting(&mut self, g: &[u8], out: &mut BytesMut) -> Result<Action, NegotiationError> {
        if self.pending != Pending::Start {
            return protocol("greeting handled twice");
        }
        if g.len() != GREETING_LEN {
            return protocol(format!("greeting of {} bytes", g.len()));
        }
        let magic = u64::from_be_bytes(g[..8].try_into().unwrap());
        if magic != NBDMAGIC {
            return protocol(format!("bad greeting magic {magic:#x}: not an NBD server"));
        }
        let opt_magic = u64::from_be_bytes(g[8..16].try_into().unwrap());
        if opt_magic == 0x0000_4202_8186_1253 {
            return Err(NegotiationError::Oldstyle);
        }
        if opt_magic != IHAVEOPT {
            return protocol(format!("bad greeting magic {opt_magic:#x}"));
        }
        let flags = u16::from_be_bytes([g[16], g[17]]);
        let fixed = flags & FLAG_FIXED_NEWSTYLE != 0;
        self.no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let mut client_flags = 0;
        if fixed {
            client_flags |= FLAG_C_FIXED_NEWSTYLE;
        }
        if self.no_zeroes {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        out.put_u32(client_flags);
        if !fixed {
            if self.opts.tls {
                return Err(NegotiationError::TlsRefused(
                    "the server does not speak fixed newstyle, so it cannot do STARTTLS".into(),
                ));
            }
            // Plain newstyle: EXPORT_NAME is the only option there is.
            return Ok(self.send_export_name(out));
        }
        if self.opts.tls {
            return Ok(self.send(out, Pending::StartTls, OPT_STARTTLS, &[]));
        }
        Ok(self.after_start(out))
    }

    /// The TLS handshake that [`Action::StartTls`] asked for succeeded;
    /// option haggling continues (over TLS).
    pub fn tls_established(&mut self, out: &mut BytesMut) -> Result<Action, NegotiationError> {
        if self.pending != Pending::TlsHandshake {
            return protocol("TLS established when no STARTTLS was acknowledged");
        }
        Ok(self.after_start(out))
    }

    fn after_start(&mut self, out: &mut BytesMut) -> Action {
        if self.opts.extended_headers {
            self.send(out, Pending::ExtendedHeaders, OPT_EXTENDED_HEADERS, &[])
        } else {
            self.after_extended(out)
        }
    }

    fn after_extended(&mut self, out: &mut BytesMut) -> Action {
        if !self.extended && self.opts.structured_replies {
            self.send(out, Pending::StructuredReply, OPT_STRUCTURED_REPLY, &[])
        } else {
            self.after_structured(out)
        }
    }

    fn after_structured(&mut self, out: &mut BytesMut) -> Action {
        if self.structured && self.opts.block_status {
            let d = meta_context_payload(&self.opts.export, &[BASE_ALLOCATION]);
            self.send(out, Pending::MetaContext, OPT_SET_META_CONTEXT, &d)
        } else {
            self.send_go(out)
        }
    }

    fn send_go(&mut self, out: &mut BytesMut) -> Action {
        let d = info_payload(&self.opts.export, &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]);
        self.send(out, Pending::Go, OPT_GO, &d)
    }

    fn send_export_name(&mut self, out: &mut BytesMut) -> Action {
        let name = self.opts.export.clone();
        encode_option(out, OPT_EXPORT_NAME, name.as_bytes());
        self.pending = Pending::ExportName;
        Action::ReadExportNameReply { len: 10 + if self.no_zeroes { 0 } else { 124 } }
    }

    fn send(&mut self, out: &mut BytesMut, pending: Pending, opt: u32, data: &[u8]) -> Action {
        encode_option(out, opt, data);
        self.pending = pending;
        Action::ReadOptionReply
    }

    fn pending_option(&self) -> Option<u32> {
        Some(match self.pending {
            Pending::StartTls => OPT_STARTTLS,
            Pending::ExtendedHeaders => OPT_EXTENDED_HEADERS,
            Pending::StructuredReply => OPT_STRUCTURED_REPLY,
            Pending::MetaContext => OPT_SET_META_CONTEXT,
            Pending::Go => OPT_GO,
            _ => return None,
        })
    }

    /// Handle one option reply (`data` is its payload, exactly as long as
    /// the header said).
    pub fn option_reply(&mut self, opt: u32, typ: u32, data: &[u8], out: &mut BytesMut) -> Result<Action, NegotiationError> {
        let Some(want) = self.pending_option() else {
            return protocol("option reply when none was expected");
        };
        if opt != want {
            return protocol(format!("reply for option {opt} while waiting for {}", option_name(want)));
        }
        let is_error = typ & (1 << 31) != 0;
        let message = || String::from_utf8_lossy(data).into_owned();
        if typ == REP_ERR_TLS_REQD && self.pending != Pending::StartTls {
            return Err(NegotiationError::TlsRequired(message()));
        }
        match self.pending {
            Pending::StartTls => match typ {
                REP_ACK => {
                    if !data.is_empty() {
                        return protocol(format!("NBD_REP_ACK with {} bytes of payload", data.len()));
                    }
                    self.pending = Pending::TlsHandshake;
                    Ok(Action::StartTls)
                }
                REP_ERR_POLICY | REP_ERR_UNSUP => {
                    let m = message();
                    Err(NegotiationError::TlsRefused(if m.is_empty() { "no reason given".into() } else { m }))
                }
                t if is_error => Err(NegotiationError::Refused { option: "NBD_OPT_STARTTLS", code: t, message: message() }),
                t => protocol(format!("unexpected reply type {t} to NBD_OPT_STARTTLS")),
            },
            Pending::ExtendedHeaders | Pending::StructuredReply => {
                let extended = self.pending == Pending::ExtendedHeaders;
                match typ {
                    REP_ACK => {
                        if !data.is_empty() {
                            return protocol(format!("NBD_REP_ACK with {} bytes of payload", data.len()));
                        }
                        self.structured = true;
                        self.extended |= extended;
                        Ok(if extended { self.after_extended(out) } else { self.after_structured(out) })
                    }
                    // Any refusal just means the older reply style.
                    _ if is_error => Ok(if extended { self.after_extended(out) } else { self.after_structured(out) }),
                    t => protocol(format!("unexpected reply type {t} to {}", option_name(opt))),
                }
            }
            Pending::MetaContext => match typ {
                REP_META_CONTEXT => {
                    if data.len() < 4 || data.len() > 4 + MAX_STRING {
                        return protocol(format!("NBD_REP_META_CONTEXT of {} bytes", data.len()));
                    }
                    let id = u32::from_be_bytes(data[..4].try_into().unwrap());
                    if &data[4..] == BASE_ALLOCATION.as_bytes() {
                        self.meta_candidate = Some(id);
                    }
                    Ok(Action::ReadOptionReply)
                }
                REP_ACK => {
                    self.base_allocation = self.meta_candidate.take();
                    Ok(self.send_go(out))
                }
                // No block status then; reads and writes still work.
                _ if is_error => {
                    self.meta_candidate = None;
                    Ok(self.send_go(out))
                }
                t => protocol(format!("unexpected reply type {t} to NBD_OPT_SET_META_CONTEXT")),
            },
            Pending::Go => match typ {
                REP_INFO => {
                    self.info(data)?;
                    Ok(Action::ReadOptionReply)
                }
                REP_ACK => {
                    let Some((size, flags)) = self.export else {
                        return protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT");
                    };
                    self.finish(size, flags, false).map(Action::Done)
                }
                REP_ERR_UNSUP if !self.extended => Ok(self.send_export_name(out)),
                REP_ERR_UNKNOWN => {
                    Err(NegotiationError::UnknownExport { name: self.opts.export.clone(), message: message() })
                }
                REP_ERR_TLS_REQD => Err(NegotiationError::TlsRequired(message())),
                REP_ERR_SHUTDOWN => Err(NegotiationError::ShuttingDown(message())),
                t if is_error => Err(NegotiationError::Refused { option: "NBD_OPT_GO", code: t, message: message() }),
                t => protocol(format!("unexpected reply type {t} to NBD_OPT_GO")),
            },
            _ => protocol("option reply when none was expected"),
        }
    }

    fn info(&mut self, d: &[u8]) -> Result<(), NegotiationError> {
        if d.len() < 2 {
            return protocol(format!("NBD_REP_INFO of {} bytes", d.len()));
        }
        let typ = u16::from_be_bytes([d[0], d[1]]);
        let body = &d[2..];
        match typ {
            INFO_EXPORT => {
                if d.len() != 12 {
                    return protocol(format!("NBD_INFO_EXPORT of {} bytes (must be 12)", d.len()));
                }
                let size = u64::from_be_bytes(body[..8].try_into().unwrap());
                let flags = u16::from_be_bytes([body[8], body[9]]);
                self.export = Some((size, flags));
            }
            INFO_BLOCK_SIZE => {
                if d.len() != 14 {
                    return protocol(format!("NBD_INFO_BLOCK_SIZE of {} bytes (must be 14)", d.len()));
                }
                let min = u32::from_be_bytes(body[..4].try_into().unwrap());
                let pref = u32::from_be_bytes(body[4..8].try_into().unwrap());
                let max = u32::from_be_bytes(body[8..12].try_into().unwrap());
                if !min.is_power_of_two() || min > 65536 {
                    return protocol(format!("minimum block size {min} is not a power of two up to 64 KiB"));
                }
                if !pref.is_power_of_two() || pref < min {
                    return protocol(format!("preferred block size {pref} is not a power of two at least {min}"));
                }
                if max < min {
                    return protocol(format!("maximum payload {max} is below the minimum block size {min}"));
                }
                self.block_size = Some((min, pref, max));
            }
            INFO_NAME => self.canonical_name = Some(info_string(body)?),
            INFO_DESCRIPTION => self.description = Some(info_string(body)?),
            // Unknown information types are ignored, as the spec says.
            _ => {}
        }
        Ok(())
    }

    /// Handle the fixed-size reply to `NBD_OPT_EXPORT_NAME`.
    pub fn export_name_reply(&mut self, d: &[u8]) -> Result<Box<ExportInfo>, NegotiationError> {
        if self.pending != Pending::ExportName {
            return protocol("NBD_OPT_EXPORT_NAME reply when none was expected");
        }
        let want = 10 + if self.no_zeroes { 0 } else { 124 };
        if d.len() != want {
            return protocol(format!("NBD_OPT_EXPORT_NAME reply of {} bytes (expected {want})", d.len()));
        }
        let size = u64::from_be_bytes(d[..8].try_into().unwrap());
        let flags = u16::from_be_bytes([d[8], d[9]]);
        self.finish(size, flags, true)
    }

    fn finish(&mut self, size: u64, flags: u16, used_export_name: bool) -> Result<Box<ExportInfo>, NegotiationError> {
        if flags & FLAG_HAS_FLAGS == 0 {
            return protocol(format!("transmission flags {flags:#x} lack NBD_FLAG_HAS_FLAGS"));
        }
        self.pending = Pending::Finished;
        let (min_block, preferred_block, max_payload) = self.block_size.unwrap_or((1, 4096, 32 << 20));
        Ok(Box::new(ExportInfo {
            requested_name: self.opts.export.clone(),
            canonical_name: self.canonical_name.take(),
            description: self.description.take(),
            size,
            flags,
            min_block,
            preferred_block,
            max_payload,
            block_size_advertised: self.block_size.is_some(),
            reply_style: ReplyStyle::new(self.structured, self.extended),
            base_allocation: self.base_allocation,
            used_export_name,
        }))
    }
}

fn info_string(b: &[u8]) -> Result<String, NegotiationError> {
    if b.len() > MAX_STRING {
        return protocol(format!("string of {} bytes in NBD_REP_INFO", b.len()));
    }
    Ok(String::from_utf8_lossy(b).into_owned())
}
