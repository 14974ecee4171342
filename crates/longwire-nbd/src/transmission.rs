//! Sans-IO transmission phase: request headers in, typed commands out, and
//! reply encoding for the three reply styles (simple, structured, extended).

use bytes::{BufMut, BytesMut};
use longwire_core::ZeroFlags;

use crate::proto::*;

/// Size of a compact request header.
pub const COMPACT_HEADER_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_HEADER_LEN: usize = 32;
/// Longest error message carried in an error chunk.
const MAX_ERROR_MESSAGE: usize = 4096;

/// A request header exactly as it came off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    /// Effect length, or payload length when the request carries a payload.
    pub length: u64,
}

/// A header that breaks framing; the only answer is to disconnect.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad request magic {0:#x}")]
pub struct BadMagic(pub u32);

/// Parse a request header (28 bytes compact, 32 bytes extended).
pub fn parse_request_header(buf: &[u8], extended: bool) -> Result<RequestHeader, BadMagic> {
    let magic = u32::from_be_bytes(buf[0..4].try_into().unwrap());
    let want = if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
    if magic != want {
        return Err(BadMagic(magic));
    }
    let flags = u16::from_be_bytes([buf[4], buf[5]]);
    let typ = u16::from_be_bytes([buf[6], buf[7]]);
    let cookie = u64::from_be_bytes(buf[8..16].try_into().unwrap());
    let offset = u64::from_be_bytes(buf[16..24].try_into().unwrap());
    let length = if extended {
        u64::from_be_bytes(buf[24..32].try_into().unwrap())
    } else {
        u32::from_be_bytes(buf[24..28].try_into().unwrap()) as u64
    };
    Ok(RequestHeader { flags, typ, cookie, offset, length })
}

impl RequestHeader {
    /// Bytes of payload that follow this header on the wire.
    ///
    /// A WRITE always carries `length` bytes. The extended-headers spec says
    /// clients set PAYLOAD_LEN on it, but qemu's client does not (and qemu's
    /// server accepts that), so we accept both.
    pub fn payload_len(&self, extended: bool) -> u64 {
        if self.typ == CMD_WRITE || (extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0) {
            self.length
        } else {
            0
        }
    }
}

/// A validated command, ready to run against a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read { offset: u64, len: u64, df: bool },
    Write { offset: u64, len: u64, fua: bool },
    Disconnect,
    Flush,
    Trim { offset: u64, len: u64, fua: bool },
    Cache { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64, flags: ZeroFlags },
    BlockStatus { offset: u64, len: u64, req_one: bool },
}

/// Why a well-framed request is refused; becomes an error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub errno: u32,
    pub message: String,
}

impl Rejection {
    fn new(errno: u32, message: impl Into<String>) -> Self {
        Rejection { errno, message: message.into() }
    }
}

/// What a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub size: u64,
    /// Transmission flags advertised to this client.
    pub flags: u16,
    pub extended: bool,
    pub base_allocation: bool,
    pub min_block: u32,
    pub max_payload: u32,
}

/// Validate a request header against the export and negotiated features.
pub fn decode_command(h: &RequestHeader, lim: &Limits) -> Result<Command, Rejection> {
    let read_only = lim.flags & FLAG_READ_ONLY != 0;
    let mut allowed = CMD_FLAG_FUA;
    let has_payload_flag = h.flags & CMD_FLAG_PAYLOAD_LEN != 0;
    match h.typ {
        CMD_READ if lim.flags & FLAG_SEND_DF != 0 => allowed |= CMD_FLAG_DF,
        CMD_WRITE if lim.extended => allowed |= CMD_FLAG_PAYLOAD_LEN,
        CMD_WRITE_ZEROES => {
            allowed |= CMD_FLAG_NO_HOLE;
            if lim.flags & FLAG_SEND_FAST_ZERO != 0 {
                allowed |= CMD_FLAG_FAST_ZERO;
            }
        }
        CMD_BLOCK_STATUS => allowed |= CMD_FLAG_REQ_ONE,
        _ => {}
    }
    let name = command_name(h.typ);
    if h.flags & !allowed != 0 {
        return Err(Rejection::new(EINVAL, format!("flags {:#x} are not valid for {name}", h.flags & !allowed)));
    }
    let (offset, len, fua) = (h.offset, h.length, h.flags & CMD_FLAG_FUA != 0);
    let in_range = offset.checked_add(len).is_some_and(|end| end <= lim.size);
    let is_write = matches!(h.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if is_write && read_only {
        return Err(Rejection::new(EPERM, format!("{name} refused: the export is read-only")));
    }
    if matches!(h.typ, CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_CACHE) && !in_range {
        let errno = if matches!(h.typ, CMD_WRITE | CMD_WRITE_ZEROES) { ENOSPC } else { EINVAL };
        return Err(Rejection::new(
            errno,
            format!("{name} of {len} bytes at offset {offset} goes past the end of the export ({} bytes)", lim.size),
        ));
    }
    let min = lim.min_block.max(1) as u64;
    if matches!(h.typ, CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) && (offset % min != 0 || len % min != 0) {
        return Err(Rejection::new(EINVAL, format!("{name} is not aligned to the {min}-byte minimum block size")));
    }
    match h.typ {
        CMD_READ => {
            if len > lim.max_payload as u64 {
                let errno = if lim.flags & FLAG_SEND_DF != 0 { EOVERFLOW } else { EINVAL };
                return Err(Rejection::new(errno, format!("read of {len} bytes exceeds the {}-byte maximum", lim.max_payload)));
            }
            Ok(Command::Read { offset, len, df: h.flags & CMD_FLAG_DF != 0 })
        }
        CMD_WRITE => {
            if len > lim.max_payload as u64 {
                return Err(Rejection::new(EINVAL, format!("write of {len} bytes exceeds the {}-byte maximum payload", lim.max_payload)));
            }
            Ok(Command::Write { offset, len, fua })
        }
        _ if has_payload_flag => Err(Rejection::new(EINVAL, format!("{name} does not take a payload"))),
        CMD_DISC => Ok(Command::Disconnect),
        CMD_FLUSH => Ok(Command::Flush),
        CMD_TRIM => Ok(Command::Trim { offset, len, fua }),
        CMD_CACHE => Ok(Command::Cache { offset, len }),
        CMD_WRITE_ZEROES => Ok(Command::WriteZeroes {
            offset,
            len,
            flags: ZeroFlags {
                may_trim: h.flags & CMD_FLAG_NO_HOLE == 0,
                fast: h.flags & CMD_FLAG_FAST_ZERO != 0,
                fua,
            },
        }),
        CMD_BLOCK_STATUS => {
            if !lim.base_allocation {
                return Err(Rejection::new(EINVAL, "NBD_CMD_BLOCK_STATUS needs a metadata context selected first"));
            }
            if len == 0 || !in_range {
                return Err(Rejection::new(EINVAL, format!("block status of {len} bytes at offset {offset} is outside the export")));
            }
            Ok(Command::BlockStatus { offset, len, req_one: h.flags & CMD_FLAG_REQ_ONE != 0 })
        }
        t => Err(Rejection::new(EINVAL, format!("unknown command {t}"))),
    }
}

/// Human-readable command name for messages and logs.
pub fn command_name(typ: u16) -> &'static str {
    match typ {
        CMD_READ => "NBD_CMD_READ",
        CMD_WRITE => "NBD_CMD_WRITE",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_FLUSH => "NBD_CMD_FLUSH",
        CMD_TRIM => "NBD_CMD_TRIM",
        CMD_CACHE => "NBD_CMD_CACHE",
        CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "unknown command",
    }
}

/// Which reply headers the session uses, fixed at the end of the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStyle {
    Simple,
    Structured,
    Extended,
}

impl ReplyStyle {
    pub fn new(structured: bool, extended: bool) -> Self {
        match (structured, extended) {
            (_, true) => ReplyStyle::Extended,
            (true, false) => ReplyStyle::Structured,
            (false, false) => ReplyStyle::Simple,
        }
    }

    /// A chunk header (structured or extended style). `req_offset` is the
    /// request's offset, echoed by extended headers.
    pub fn chunk_header(self, out: &mut BytesMut, flags: u16, typ: u16, cookie: u64, req_offset: u64, len: u64) {
        match self {
            ReplyStyle::Extended => {
                out.put_u32(EXTENDED_REPLY_MAGIC);
                out.put_u16(flags);
                out.put_u16(typ);
                out.put_u64(cookie);
                out.put_u64(req_offset);
                out.put_u64(len);
            }
            _ => {
                out.put_u32(STRUCTURED_REPLY_MAGIC);
                out.put_u16(flags);
                out.put_u16(typ);
                out.put_u64(cookie);
                out.put_u32(len as u32);
            }
        }
    }

    /// A simple reply header (the read data, if any, follows it).
    pub fn simple(out: &mut BytesMut, cookie: u64, errno: u32) {
        out.put_u32(SIMPLE_REPLY_MAGIC);
        out.put_u32(errno);
        out.put_u64(cookie);
    }

    /// Success without payload.
    pub fn ok(self, out: &mut BytesMut, cookie: u64, req_offset: u64) {
        match self {
            ReplyStyle::Simple => Self::simple(out, cookie, 0),
            _ => self.chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, req_offset, 0),
        }
    }

    /// A final error reply; structured styles carry `message` for humans.
    pub fn error(self, out: &mut BytesMut, cookie: u64, req_offset: u64, errno: u32, message: &str) {
        match self {
            ReplyStyle::Simple => Self::simple(out, cookie, errno),
            _ => {
                let mut msg = message.as_bytes();
                if msg.len() > MAX_ERROR_MESSAGE {
                    msg = &msg[..MAX_ERROR_MESSAGE];
                }
                self.chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, req_offset, 6 + msg.len() as u64);
                out.put_u32(errno);
                out.put_u16(msg.len() as u16);
                out.put_slice(msg);
            }
        }
    }

    /// Header of an OFFSET_DATA chunk; `data_len` bytes of data follow it.
    pub fn offset_data(self, out: &mut BytesMut, cookie: u64, req_offset: u64, offset: u64, data_len: u64, done: bool) {
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        self.chunk_header(out, flags, REPLY_TYPE_OFFSET_DATA, cookie, req_offset, 8 + data_len);
        out.put_u64(offset);
    }

    /// An OFFSET_HOLE chunk: `len` bytes at `offset` read as zeros.
    pub fn offset_hole(self, out: &mut BytesMut, cookie: u64, req_offset: u64, offset: u64, len: u32, done: bool) {
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        self.chunk_header(out, flags, REPLY_TYPE_OFFSET_HOLE, cookie, req_offset, 12);
        out.put_u64(offset);
        out.put_u32(len);
    }

    /// A final block-status chunk for one context: `(length, status)` pairs.
    pub fn block_status(self, out: &mut BytesMut, cookie: u64, req_offset: u64, context: u32, extents: &[(u64, u32)]) {
        match self {
            ReplyStyle::Extended => {
                let len = 8 + 16 * extents.len() as u64;
                self.chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT, cookie, req_offset, len);
                out.put_u32(context);
                out.put_u32(extents.len() as u32);
                for &(l, s) in extents {
                    out.put_u64(l);
                    out.put_u64(s as u64);
                }
            }
            _ => {
                let len = 4 + 8 * extents.len() as u64;
                self.chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, req_offset, len);
                out.put_u32(context);
                for &(l, s) in extents {
                    out.put_u32(l as u32);
                    out.put_u32(s);
                }
            }
        }
    }
}

/// What the request decoder produced from the buffered bytes.
#[derive(Debug)]
pub enum Decoded {
    /// A valid command, with its payload for writes.
    Command { header: RequestHeader, command: Command, payload: bytes::Bytes },
    /// A well-framed request that must be answered with an error; any
    /// payload it carried has been consumed.
    Refused { header: RequestHeader, rejection: Rejection },
}

/// Largest refused payload we read and throw away to keep framing;
/// anything larger ends the session.
pub const MAX_DISCARD: u64 = 1 << 32;

/// A framing error: the only answer is to disconnect.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FramingError {
    #[error(transparent)]
    BadMagic(#[from] BadMagic),
    #[error("payload of {0} bytes is too large to skip")]
    PayloadTooLarge(u64),
}

/// Sans-IO request stream decoder: the driver appends bytes from the socket
/// to a buffer and calls [`RequestDecoder::decode`] until it returns `None`.
/// Write payloads are split off the buffer without copying; refused
/// payloads are skipped as they arrive, however large, without buffering.
#[derive(Debug)]
pub struct RequestDecoder {
    extended: bool,
    state: DecodeState,
}

#[derive(Debug)]
enum DecodeState {
    Header,
    Payload { header: RequestHeader, command: Command, len: usize },
    Discard { header: RequestHeader, rejection: Rejection, left: u64 },
}

impl RequestDecoder {
    pub fn new(extended: bool) -> Self {
        RequestDecoder { extended, state: DecodeState::Header }
    }

    /// Bytes a complete request header occupies.
    fn header_len(&self) -> usize {
        if self.extended {
            EXTENDED_HEADER_LEN
        } else {
            COMPACT_HEADER_LEN
        }
    }

    /// How many more bytes the decoder wants before it can make progress
    /// (a hint for sizing reads).
    pub fn wanted(&self, buffered: usize) -> usize {
        match &self.state {
            DecodeState::Header => self.header_len().saturating_sub(buffered),
            DecodeState::Payload { len, .. } => len.saturating_sub(buffered),
            DecodeState::Discard { left, .. } => (*left).min(1 << 20) as usize,
        }
    }

    /// True when no request is partially decoded.
    pub fn is_idle(&self, buffered: usize) -> bool {
        matches!(self.state, DecodeState::Header) && buffered == 0
    }

    /// Decode the next request from `buf`, consuming its bytes. `refuse`
    /// turns every new request into that rejection (used at shutdown).
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
        refuse: Option<&Rejection>,
    ) -> Result<Option<Decoded>, FramingError> {
        loop {
            match &mut self.state {
                DecodeState::Header => {
                    let n = self.header_len();
                    if buf.len() < n {
                        return Ok(None);
                    }
                    let header = parse_request_header(&buf[..n], self.extended)?;
                    let _ = buf.split_to(n);
                    let payload_len = header.payload_len(self.extended);
                    let decoded = match refuse {
                        Some(r) => Err(r.clone()),
                        None => decode_command(&header, limits),
                    };
                    self.state = match decoded {
                        Ok(command @ Command::Write { len, .. }) if len == payload_len => {
                            DecodeState::Payload { header, command, len: len as usize }
                        }
                        Ok(command) if payload_len == 0 => {
                            return Ok(Some(Decoded::Command { header, command, payload: bytes::Bytes::new() }));
                        }
                        // decode_command refuses payloads on every other
                        // command; stay safe if that ever changes.
                        Ok(_) => DecodeState::Discard {
                            header,
                            rejection: Rejection::new(EINVAL, "unexpected payload"),
                            left: payload_len,
                        },
                        Err(rejection) => DecodeState::Discard { header, rejection, left: payload_len },
                    };
                    if let DecodeState::Discard { left, .. } = self.state {
                        if left > MAX_DISCARD {
                            return Err(FramingError::PayloadTooLarge(left));
                        }
                    }
                }
                DecodeState::Payload { header, command, len } => {
                    if buf.len() < *len {
                        buf.reserve(*len - buf.len());
                        return Ok(None);
                    }
                    let payload = buf.split_to(*len).freeze();
                    let (header, command) = (*header, *command);
                    self.state = DecodeState::Header;
                    return Ok(Some(Decoded::Command { header, command, payload }));
                }
                DecodeState::Discard { header, rejection, left } => {
                    let n = (*left).min(buf.len() as u64);
                    let _ = buf.split_to(n as usize);
                    *left -= n;
                    if *left > 0 {
                        return Ok(None);
                    }
                    let (header, rejection) = (*header, rejection.clone());
                    self.state = DecodeState::Header;
                    return Ok(Some(Decoded::Refused { header, rejection }));
                }
            }
        }
    }
}
