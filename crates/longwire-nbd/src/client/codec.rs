//! Sans-IO transmission codec for the client side: request encoding,
//! reply framing ([`ReplyDecoder`]: simple, structured and extended replies)
//! and per-request reply assembly ([`ReplyAssembly`]: read chunks stitched
//! and checked for coverage, block status collected, errors kept).
//!
//! Nothing here touches a socket. Every length that comes off the wire is
//! checked before it is used: a reply that breaks framing, claims an absurd
//! length, or contradicts its request is a [`ProtocolError`], and the only
//! safe answer to one is to drop the connection (the spec's "hard
//! disconnect").

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use longwire_core::ReadSegment;

use crate::proto::*;
pub use crate::transmission::ReplyStyle;
use crate::transmission::{command_name, COMPACT_HEADER_LEN, EXTENDED_HEADER_LEN};

/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Length of an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;
/// Largest error message the spec allows in an error chunk.
const MAX_MESSAGE: usize = 4096;

/// The server broke the protocol; the connection cannot be trusted any more.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("NBD protocol violation by the server: {0}")]
pub struct ProtocolError(pub String);

fn violation<T>(msg: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(msg.into()))
}

/// A request the client can put on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub typ: u16,
    pub flags: u16,
    pub offset: u64,
    /// Effect length, or for `NBD_CMD_WRITE` the payload length.
    pub length: u64,
}

/// A request that cannot be encoded in the negotiated header style.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct EncodeError(pub String);

/// Append one request header (compact 28 bytes, or extended 32 bytes) to
/// `out`. A write's payload is not included: the caller sends `length`
/// bytes right after it. With extended headers a write carries
/// `NBD_CMD_FLAG_PAYLOAD_LEN`, as the spec requires.
pub fn encode_request(out: &mut BytesMut, extended: bool, cookie: u64, h: &RequestHeader) -> Result<(), EncodeError> {
    let mut flags = h.flags;
    if extended {
        if h.typ == CMD_WRITE {
            flags |= CMD_FLAG_PAYLOAD_LEN;
        }
        out.reserve(EXTENDED_HEADER_LEN);
        out.put_u32(EXTENDED_REQUEST_MAGIC);
        out.put_u16(flags);
        out.put_u16(h.typ);
        out.put_u64(cookie);
        out.put_u64(h.offset);
        out.put_u64(h.length);
    } else {
        if flags & CMD_FLAG_PAYLOAD_LEN != 0 {
            return Err(EncodeError("NBD_CMD_FLAG_PAYLOAD_LEN needs extended headers".into()));
        }
        let Ok(length) = u32::try_from(h.length) else {
            return Err(EncodeError(format!(
                "{} of {} bytes does not fit a compact request header (32-bit length)",
                command_name(h.typ),
                h.length
            )));
        };
        out.reserve(COMPACT_HEADER_LEN);
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(flags);
        out.put_u16(h.typ);
        out.put_u64(cookie);
        out.put_u64(h.offset);
        out.put_u32(length);
    }
    Ok(())
}

/// One reply message (a simple reply, or one structured/extended chunk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub cookie: u64,
    /// Last message for this cookie (always true for simple replies).
    pub done: bool,
    /// The request offset echoed by extended headers.
    pub req_offset: Option<u64>,
    pub chunk: Chunk,
}

/// What one reply message carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// A simple reply; `data` is the payload of a successful read.
    Simple { errno: u32, data: Bytes },
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: bytes of the export at `offset`.
    OffsetData { offset: u64, data: Bytes },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: `len` zero bytes at `offset`.
    OffsetHole { offset: u64, len: u32 },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS(_EXT)`: (length, status) descriptors.
    BlockStatus { context: u32, descriptors: Vec<(u64, u64)> },
    /// An error chunk (`ERROR`, `ERROR_OFFSET` or an unknown error type).
    Error { errno: u32, message: String, offset: Option<u64> },
}

/// What the decoder must know about an outstanding request to frame a
/// simple reply (whose length depends on the request it answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimpleFraming {
    /// No request with this cookie is outstanding.
    Unknown,
    /// A successful simple reply carries this many bytes (reads), or 0.
    Payload(u64),
}

#[derive(Debug)]
enum DecodeState {
    Header,
    SimpleData { cookie: u64, len: usize },
    Chunk { cookie: u64, flags: u16, typ: u16, req_offset: Option<u64>, len: usize },
}

/// Splits the server's byte stream into [`Reply`] messages.
///
/// The driver appends socket bytes to a buffer and calls
/// [`ReplyDecoder::decode`] until it returns `Ok(None)`. Payloads are split
/// off the buffer without copying.
#[derive(Debug)]
pub struct ReplyDecoder {
    style: ReplyStyle,
    max_payload: u64,
    state: DecodeState,
}

impl ReplyDecoder {
    /// `max_payload` bounds every payload the server may send (data chunks
    /// may exceed the advertised maximum by their fixed overhead; pass the
    /// advertised maximum, the decoder adds the slack).
    pub fn new(style: ReplyStyle, max_payload: u64) -> Self {
        // Block status for 2^20 extents is 16 MiB with extended headers;
        // 32 MiB is what the spec says is never a denial of service.
        let max_payload = max_payload.max(32 << 20) + 4096 + 64;
        ReplyDecoder { style, max_payload, state: DecodeState::Header }
    }

    /// How many more bytes are needed before the next message can be
    /// decoded (a hint for sizing reads).
    pub fn wanted(&self, buffered: usize) -> usize {
        let need = match self.state {
            DecodeState::Header => match self.style {
                ReplyStyle::Simple => SIMPLE_REPLY_LEN,
                ReplyStyle::Structured => SIMPLE_REPLY_LEN,
                ReplyStyle::Extended => EXTENDED_REPLY_LEN,
            },
            DecodeState::SimpleData { len, .. } | DecodeState::Chunk { len, .. } => len,
        };
        need.saturating_sub(buffered)
    }

    /// True when no message is partially decoded.
    pub fn is_idle(&self, buffered: usize) -> bool {
        matches!(self.state, DecodeState::Header) && buffered == 0
    }

    /// Decode the next message from `buf`. `framing` tells, for the cookie
    /// of a simple reply, whether such a request is outstanding and how
    /// long a successful reply's payload is.
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        framing: impl Fn(u64) -> SimpleFraming,
    ) -> Result<Option<Reply>, ProtocolError> {
        loop {
            match self.state {
                DecodeState::Header => {
                    if buf.len() < 4 {
                        return Ok(None);
                    }
                    let magic = u32::from_be_bytes(buf[..4].try_into().unwrap());
                    match (magic, self.style) {
                        (SIMPLE_REPLY_MAGIC, ReplyStyle::Simple | ReplyStyle::Structured) => {
                            if buf.len() < SIMPLE_REPLY_LEN {
                                return Ok(None);
                            }
                            let mut h = buf.split_to(SIMPLE_REPLY_LEN);
                            h.advance(4);
                            let errno = h.get_u32();
                            let cookie = h.get_u64();
                            let payload = match framing(cookie) {
                                SimpleFraming::Unknown => {
                                    return violation(format!("simple reply for unknown cookie {cookie:#x}"))
                                }
                                SimpleFraming::Payload(n) => n,
                            };
                            if errno != 0 || payload == 0 {
                                return Ok(Some(Reply {
                                    cookie,
                                    done: true,
                                    req_offset: None,
                                    chunk: Chunk::Simple { errno, data: Bytes::new() },
                                }));
                            }
                            if self.style == ReplyStyle::Structured {
                                return violation(format!(
                                    "successful simple reply to a read (cookie {cookie:#x}) after structured replies were negotiated"
                                ));
                            }
                            if payload > self.max_payload {
                                return violation(format!("simple read reply of {payload} bytes is too large"));
                            }
                            self.state = DecodeState::SimpleData { cookie, len: payload as usize };
                        }
                        (STRUCTURED_REPLY_MAGIC, ReplyStyle::Structured) => {
                            if buf.len() < STRUCTURED_REPLY_LEN {
                                return Ok(None);
                            }
                            let mut h = buf.split_to(STRUCTURED_REPLY_LEN);
                            h.advance(4);
                            let flags = h.get_u16();
                            let typ = h.get_u16();
                            let cookie = h.get_u64();
                            let len = h.get_u32() as u64;
                            self.state = self.chunk_state(cookie, flags, typ, None, len)?;
                        }
                        (EXTENDED_REPLY_MAGIC, ReplyStyle::Extended) => {
                            if buf.len() < EXTENDED_REPLY_LEN {
                                return Ok(None);
                            }
                            let mut h = buf.split_to(EXTENDED_REPLY_LEN);
                            h.advance(4);
                            let flags = h.get_u16();
                            let typ = h.get_u16();
                            let cookie = h.get_u64();
                            let offset = h.get_u64();
                            let len = h.get_u64();
                            self.state = self.chunk_state(cookie, flags, typ, Some(offset), len)?;
                        }
                        (m, style) => {
                            return violation(format!("unexpected reply magic {m:#010x} (reply style {style:?})"));
                        }
                    }
                }
                DecodeState::SimpleData { cookie, len } => {
                    if buf.len() < len {
                        buf.reserve(len - buf.len());
                        return Ok(None);
                    }
                    let data = buf.split_to(len).freeze();
                    self.state = DecodeState::Header;
                    return Ok(Some(Reply { cookie, done: true, req_offset: None, chunk: Chunk::Simple { errno: 0, data } }));
                }
                DecodeState::Chunk { cookie, flags, typ, req_offset, len } => {
                    if buf.len() < len {
                        buf.reserve(len - buf.len());
                        return Ok(None);
                    }
                    let payload = buf.split_to(len).freeze();
                    self.state = DecodeState::Header;
                    let chunk = parse_chunk(typ, payload, self.style == ReplyStyle::Extended)?;
                    let done = flags & REPLY_FLAG_DONE != 0;
                    if matches!(chunk, Chunk::None) && !done {
                        return violation("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE");
                    }
                    return Ok(Some(Reply { cookie, done, req_offset, chunk }));
                }
            }
        }
    }

    fn chunk_state(&self, cookie: u64, flags: u16, typ: u16, req_offset: Option<u64>, len: u64) -> Result<DecodeState, ProtocolError> {
        if len > self.max_payload {
            return violation(format!("reply chunk of type {typ} claims {len} bytes of payload"));
        }
        Ok(DecodeState::Chunk { cookie, flags, typ, req_offset, len: len as usize })
    }
}

/// Parse the payload of one structured/extended chunk, checking its length
/// against the type.
fn parse_chunk(typ: u16, mut p: Bytes, extended: bool) -> Result<Chunk, ProtocolError> {
    let len = p.len();
    match typ {
        REPLY_TYPE_NONE => {
            if len != 0 {
                return violation(format!("NBD_REPLY_TYPE_NONE with {len} bytes of payload"));
            }
            Ok(Chunk::None)
        }
        REPLY_TYPE_OFFSET_DATA => {
            if len < 9 {
                return violation(format!("NBD_REPLY_TYPE_OFFSET_DATA with length {len} (at least 9)"));
            }
            let offset = p.get_u64();
            Ok(Chunk::OffsetData { offset, data: p })
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if len != 12 {
                return violation(format!("NBD_REPLY_TYPE_OFFSET_HOLE with length {len} (must be 12)"));
            }
            let offset = p.get_u64();
            let size = p.get_u32();
            if size == 0 {
                return violation("NBD_REPLY_TYPE_OFFSET_HOLE of zero bytes");
            }
            Ok(Chunk::OffsetHole { offset, len: size })
        }
        REPLY_TYPE_BLOCK_STATUS => {
            if extended {
                return violation("NBD_REPLY_TYPE_BLOCK_STATUS after extended headers were negotiated");
            }
            if len < 12 || !(len - 4).is_multiple_of(8) {
                return violation(format!("NBD_REPLY_TYPE_BLOCK_STATUS with length {len} (must be 4 + 8n, n > 0)"));
            }
            let context = p.get_u32();
            let mut descriptors = Vec::with_capacity((len - 4) / 8);
            while p.has_remaining() {
                let l = p.get_u32() as u64;
                let s = p.get_u32() as u64;
                if l == 0 {
                    return violation("block status descriptor of zero length");
                }
                descriptors.push((l, s));
            }
            Ok(Chunk::BlockStatus { context, descriptors })
        }
        REPLY_TYPE_BLOCK_STATUS_EXT => {
            if !extended {
                return violation("NBD_REPLY_TYPE_BLOCK_STATUS_EXT without extended headers");
            }
            if len < 24 || !(len - 8).is_multiple_of(16) {
                return violation(format!("NBD_REPLY_TYPE_BLOCK_STATUS_EXT with length {len} (must be 8 + 16n, n > 0)"));
            }
            let context = p.get_u32();
            let count = p.get_u32() as usize;
            if count != (len - 8) / 16 {
                return violation(format!(
                    "NBD_REPLY_TYPE_BLOCK_STATUS_EXT says {count} descriptors but carries {}",
                    (len - 8) / 16
                ));
            }
            let mut descriptors = Vec::with_capacity(count);
            while p.has_remaining() {
                let l = p.get_u64();
                let s = p.get_u64();
                if l == 0 {
                    return violation("block status descriptor of zero length");
                }
                descriptors.push((l, s));
            }
            Ok(Chunk::BlockStatus { context, descriptors })
        }
        t if t & (1 << 15) != 0 => {
            // Every error chunk starts with errno and a message length; the
            // known ERROR_OFFSET type appends an offset after the message.
            let fixed = if t == REPLY_TYPE_ERROR_OFFSET { 14 } else { 6 };
            if len < fixed {
                return violation(format!("error chunk of type {t:#x} with length {len} (at least {fixed})"));
            }
            let errno = p.get_u32();
            let msg_len = p.get_u16() as usize;
            if msg_len > len - fixed || msg_len > MAX_MESSAGE {
                return violation(format!("error message of {msg_len} bytes does not fit a chunk of {len} bytes"));
            }
            if errno == 0 {
                return violation("error chunk with error value 0");
            }
            let message = String::from_utf8_lossy(&p[..msg_len]).into_owned();
            p.advance(msg_len);
            let offset = (t == REPLY_TYPE_ERROR_OFFSET).then(|| p.get_u64());
            Ok(Chunk::Error { errno, message, offset })
        }
        t => violation(format!("unknown reply chunk type {t}")),
    }
}

/// An error the server reported for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub errno: u32,
    /// The server's message (empty with simple replies).
    pub message: String,
}

/// What a request expects back, so its reply can be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A read of `len` bytes at `offset`: data and hole chunks must cover
    /// the range exactly once.
    Read { offset: u64, len: u64 },
    /// Block status over `len` bytes at `offset` for metadata context `context`.
    BlockStatus { offset: u64, len: u64, context: u32 },
    /// Anything else: success or an error, no payload.
    Plain { offset: u64 },
}

impl Expect {
    fn offset(&self) -> u64 {
        match *self {
            Expect::Read { offset, .. } | Expect::BlockStatus { offset, .. } | Expect::Plain { offset } => offset,
        }
    }

    /// How the decoder frames a simple reply to this request.
    pub fn simple_framing(&self) -> SimpleFraming {
        match *self {
            Expect::Read { len, .. } => SimpleFraming::Payload(len),
            _ => SimpleFraming::Payload(0),
        }
    }
}

/// A successful reply, assembled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completed {
    /// Success without data.
    Done,
    /// Read data in order, covering the request exactly; holes are
    /// [`ReadSegment::Zero`].
    Read(Vec<ReadSegment>),
    /// Block status: `(length, status)` runs from the request offset, never
    /// beyond the requested length, at least one.
    Extents(Vec<(u64, u32)>),
}

/// Collects the chunks of one request's reply and checks them against the
/// request: content chunks inside the range and never overlapping, full
/// coverage on success, one status chunk for our context, extended headers
/// echoing the request offset.
#[derive(Debug)]
pub struct ReplyAssembly {
    expect: Expect,
    /// Content chunks by offset.
    content: BTreeMap<u64, ReadSegment>,
    extents: Option<Vec<(u64, u64)>>,
    error: Option<ServerError>,
    done: bool,
}

impl ReplyAssembly {
    pub fn new(expect: Expect) -> Self {
        ReplyAssembly { expect, content: BTreeMap::new(), extents: None, error: None, done: false }
    }

    pub fn expect(&self) -> &Expect {
        &self.expect
    }

    /// Add one reply message; returns true once the reply is complete.
    pub fn add(&mut self, reply: Reply) -> Result<bool, ProtocolError> {
        if self.done {
            return violation("reply chunk after the final chunk");
        }
        if let Some(o) = reply.req_offset {
            if o != self.expect.offset() {
                return violation(format!("extended reply echoes offset {o}, the request was at {}", self.expect.offset()));
            }
        }
        match reply.chunk {
            Chunk::Simple { errno, data } => {
                if !self.content.is_empty() || self.extents.is_some() || self.error.is_some() {
                    return violation("simple reply after structured chunks for the same request");
                }
                if errno != 0 {
                    self.error = Some(ServerError { errno, message: String::new() });
                } else if let Expect::Read { offset, len } = self.expect {
                    if data.len() as u64 != len {
                        return violation(format!("simple read reply of {} bytes for a {len}-byte read", data.len()));
                    }
                    if len > 0 {
                        self.content.insert(offset, ReadSegment::Data(data));
                    }
                } else if matches!(self.expect, Expect::BlockStatus { .. }) {
                    // A simple success cannot carry block status.
                    return violation("simple success reply to NBD_CMD_BLOCK_STATUS");
                }
            }
            Chunk::None => {}
            Chunk::OffsetData { offset, data } => self.content(offset, ReadSegment::Data(data))?,
            Chunk::OffsetHole { offset, len } => self.content(offset, ReadSegment::Zero(len as u64))?,
            Chunk::BlockStatus { context, descriptors } => {
                let Expect::BlockStatus { context: want, .. } = self.expect else {
                    return violation("block status chunk in reply to a request that is not NBD_CMD_BLOCK_STATUS");
                };
                // Contexts we did not select are ignored.
                if context == want {
                    if self.extents.is_some() {
                        return violation(format!("two block status chunks for context {context}"));
                    }
                    self.extents = Some(descriptors);
                }
            }
            Chunk::Error { errno, message, offset } => {
                if let (Some(at), Expect::Read { offset: ro, len } | Expect::BlockStatus { offset: ro, len, .. }) =
                    (offset, self.expect)
                {
                    if at < ro || at - ro >= len.max(1) {
                        return violation(format!("error chunk at offset {at} lies outside the request"));
                    }
                }
                // Keep the first error: later ones rarely add anything.
                self.error.get_or_insert(ServerError { errno, message });
            }
        }
        self.done = reply.done;
        Ok(reply.done)
    }

    fn content(&mut self, at: u64, seg: ReadSegment) -> Result<(), ProtocolError> {
        let Expect::Read { offset, len } = self.expect else {
            return violation("read data chunk in reply to a request that is not NBD_CMD_READ");
        };
        let n = seg.len();
        let inside = at >= offset && at.checked_add(n).is_some_and(|end| end <= offset + len);
        if !inside {
            return violation(format!("read chunk of {n} bytes at {at} lies outside the request ({len} bytes at {offset})"));
        }
        if let Some((&prev, p)) = self.content.range(..=at).next_back() {
            if prev + p.len() > at {
                return violation(format!("read chunk at {at} overlaps the chunk at {prev}"));
            }
        }
        if let Some((&next, _)) = self.content.range(at..).next() {
            if next < at + n {
                return violation(format!("read chunk at {at} overlaps the chunk at {next}"));
            }
        }
        self.content.insert(at, seg);
        Ok(())
    }

    /// The outcome once the final chunk arrived: the server's error, or the
    /// assembled result (a [`ProtocolError`] if a success is incomplete).
    pub fn finish(self) -> Result<Result<Completed, ServerError>, ProtocolError> {
        if !self.done {
            return violation("reply is not complete");
        }
        if let Some(e) = self.error {
            return Ok(Err(e));
        }
        match self.expect {
            Expect::Plain { .. } => Ok(Ok(Completed::Done)),
            Expect::Read { offset, len } => {
                let mut pos = offset;
                let mut out: Vec<ReadSegment> = Vec::with_capacity(self.content.len());
                for (at, seg) in self.content {
                    if at != pos {
                        return violation(format!("read reply leaves bytes {pos}..{at} uncovered"));
                    }
                    pos += seg.len();
                    match (out.last_mut(), seg) {
                        (Some(ReadSegment::Zero(z)), ReadSegment::Zero(n)) => *z += n,
                        (_, seg) => out.push(seg),
                    }
                }
                if pos != offset + len {
                    return violation(format!("read reply covers {} of {len} bytes", pos - offset));
                }
                Ok(Ok(Completed::Read(out)))
            }
            Expect::BlockStatus { len, context, .. } => {
                let Some(descriptors) = self.extents else {
                    return violation(format!("successful block status reply without a chunk for context {context}"));
                };
                let mut out = Vec::with_capacity(descriptors.len());
                let mut covered = 0u64;
                for (i, (l, status)) in descriptors.iter().copied().enumerate() {
                    if covered >= len {
                        // Only the last descriptor may reach past the request.
                        return violation(format!("block status descriptor {i} starts past the requested {len} bytes"));
                    }
                    let l = l.min(len - covered);
                    covered += l;
                    out.push((l, status as u32));
                }
                Ok(Ok(Completed::Extents(out)))
            }
        }
    }
}

/// Flatten read segments into one buffer (zero-copy for a single data segment).
pub fn segments_to_bytes(segments: Vec<ReadSegment>, len: usize) -> Bytes {
    if let [ReadSegment::Data(_)] = segments.as_slice() {
        let Some(ReadSegment::Data(d)) = segments.into_iter().next() else { unreachable!() };
        return d;
    }
    let mut out = BytesMut::zeroed(len);
    let mut pos = 0usize;
    for s in segments {
        match s {
            ReadSegment::Data(d) => {
                out[pos..pos + d.len()].copy_from_slice(&d);
                pos += d.len();
            }
            ReadSegment::Zero(n) => pos += n as usize,
        }
    }
    out.freeze()
}
