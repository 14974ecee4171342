//! Sans-IO fixed-newstyle handshake: option bytes in, reply bytes out.
//!
//! The session driver reads the 16-byte option header and its payload from
//! the socket, hands them to [`Handshake::handle_option`], writes whatever
//! lands in the output buffer, and acts on the returned [`Step`]. Nothing
//! here touches a socket, so every option path is unit-testable and fuzzable.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use longwire_core::{AddressPolicy, Capabilities, Export, ExportRegistry};

use crate::limits::{ExportLimits, ExportPermit};
use crate::proto::*;
use crate::tls::{TlsMode, TlsPolicy};
use tracing::info;

/// Largest option payload we accept. Real options are a few KiB at most
/// (names and context queries are capped at 4 KiB each); anything bigger is
/// treated as abuse and ends the session.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// The server's opening bytes: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// A violation that ends the session without a reply (hard disconnect).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("client sent unknown client flags {0:#x}")]
    BadClientFlags(u32),
    #[error("bad option magic {0:#x}")]
    BadMagic(u64),
    #[error("option payload of {0} bytes is too large")]
    OptionTooLarge(u32),
}

/// Split a 16-byte option header into (option, payload length).
pub fn parse_option_header(h: &[u8; 16]) -> Result<(u32, u32), HandshakeError> {
    let magic = u64::from_be_bytes(h[..8].try_into().unwrap());
    if magic != IHAVEOPT {
        return Err(HandshakeError::BadMagic(magic));
    }
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
    if len > MAX_OPTION_LEN {
        return Err(HandshakeError::OptionTooLarge(len));
    }
    Ok((opt, len))
}

/// Everything the transmission phase needs to know about what was agreed.
#[derive(Debug, Clone)]
pub struct Negotiated {
    pub export: Export,
    /// Structured replies were agreed (always true when `extended` is).
    pub structured: bool,
    /// Extended (64-bit) headers were agreed.
    pub extended: bool,
    /// The client selected `base:allocation` for this export.
    pub base_allocation: bool,
    /// Transmission flags as sent to the client.
    pub flags: u16,
    /// The connection's slot of the export's connection limit; held for as
    /// long as the session lasts.
    pub permit: Arc<ExportPermit>,
}

/// What the driver should do after an option has been handled.
#[derive(Debug)]
pub enum Step {
    /// Write the output and read the next option.
    Continue,
    /// Write the output, then close the connection.
    Close,
    /// Write the output, then enter the transmission phase.
    Transmit(Box<Negotiated>),
    /// Write the output (the STARTTLS acknowledgement), run the TLS
    /// handshake on the connection, report it with
    /// [`Handshake::tls_established`], and read the next option over TLS.
    StartTls,
}

/// Transmission flags for a volume, given what the client negotiated.
/// Each bit is set only when the volume really honours it.
pub fn transmission_flags(caps: &Capabilities, structured: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
    if caps.read_only {
        f |= FLAG_READ_ONLY;
    } else {
        if caps.can_trim {
            f |= FLAG_SEND_TRIM;
        }
        // WRITE_ZEROES always works (at worst by writing zeros); FAST_ZERO is
        // honest because a slow zero fails fast with ENOTSUP.
        f |= FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= FLAG_SEND_DF;
    }
    if caps.can_multi_conn {
        f |= FLAG_CAN_MULTI_CONN;
    }
    f
}

/// State of one client's option haggling.
#[derive(Debug, Default)]
pub struct Handshake {
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// Export name of the last SET_META_CONTEXT and whether it selected
    /// `base:allocation`.
    meta: Option<(String, bool)>,
    /// Set by the driver when the server is shutting down.
    pub shutting_down: bool,
    /// TLS mode and export allow-lists.
    tls: Arc<TlsPolicy>,
    /// STARTTLS was accepted: everything from here on is over TLS.
    tls_active: bool,
    /// Common Name of the verified client certificate, if any.
    peer_cn: Option<String>,
    /// Per-export connection limits (None: unlimited).
    limits: Option<Arc<ExportLimits>>,
    /// Per-export client address allow-lists (None: everyone).
    addresses: Option<Arc<AddressPolicy>>,
    /// The client's address (None: a unix-socket client).
    peer: Option<IpAddr>,
}

impl Handshake {
    /// A handshake for a server without TLS.
    pub fn new() -> Self {
        Self::default()
    }

    /// A handshake applying a TLS policy.
    pub fn with_tls(policy: Arc<TlsPolicy>) -> Self {
        Handshake { tls: policy, ..Self::default() }
    }

    /// Apply per-export connection limits: GO and EXPORT_NAME take a slot
    /// (carried in [`Negotiated::permit`]); a full export is refused with
    /// NBD_REP_ERR_POLICY (GO/INFO) or a disconnect (EXPORT_NAME).
    pub fn set_limits(&mut self, limits: Arc<ExportLimits>) {
        self.limits = Some(limits);
    }

    /// Apply per-export address allow-lists to the client at `peer` (None:
    /// a unix-socket client, always allowed). An export the client may not
    /// use is treated as if it did not exist: not listed, NBD_REP_ERR_UNKNOWN
    /// for INFO/GO, a disconnect for EXPORT_NAME, so nothing tells the
    /// client that it exists.
    pub fn set_client_address(&mut self, policy: Arc<AddressPolicy>, peer: Option<IpAddr>) {
        self.addresses = Some(policy);
        self.peer = peer;
    }

    /// May this client's address see `export`?
    fn visible(&self, export: &str) -> bool {
        self.addresses.as_ref().is_none_or(|p| p.allows(export, self.peer))
    }

    /// The export `name` resolves to, if it exists and this client's
    /// address may see it (refusals are logged, never told).
    fn lookup<'r>(&self, registry: &'r ExportRegistry, name: &str) -> Option<&'r Export> {
        let export = registry.get(name)?;
        if !self.visible(&export.name) {
            let peer = self.peer.map(|p| p.to_string()).unwrap_or_default();
            info!("refused: client address {peer} may not use export {:?} (answered as if it did not exist)", export.name);
            return None;
        }
        Some(export)
    }

    /// A slot of `export`, or the refusal message when it is full.
    fn permit(&self, export: &str, take: bool) -> Result<ExportPermit, String> {
        let Some(limits) = &self.limits else { return Ok(ExportPermit::unlimited()) };
        let full = |cap| format!("export {export} has reached its connection limit ({cap})");
        if take {
            limits.acquire(export).map_err(full)
        } else {
            match limits.full(export) {
                Some(cap) => Err(full(cap)),
                None => Ok(ExportPermit::unlimited()),
            }
        }
    }

    /// The driver finished the TLS handshake after [`Step::StartTls`];
    /// `peer_cn` is the subject Common Name of the client certificate the
    /// TLS layer verified (None: no certificate).
    pub fn tls_established(&mut self, peer_cn: Option<String>) {
        self.tls_active = true;
        self.peer_cn = peer_cn;
    }

    /// TLS is up on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// May this client see `export` (TLS allow-lists)?
    fn access(&self, export: &str) -> Result<(), (u32, String)> {
        self.tls.check_export(export, self.tls_active, self.peer_cn.as_deref())
    }

    /// Accept the client's 32-bit flags; unknown flags end the session.
    pub fn client_flags(&mut self, flags: u32) -> Result<(), HandshakeError> {
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(HandshakeError::BadClientFlags(flags));
        }
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        Ok(())
    }

    /// Handle one option; replies are appended to `out`.
    pub fn handle_option(&mut self, opt: u32, data: &[u8], registry: &ExportRegistry, out: &mut BytesMut) -> Step {
        if self.shutting_down && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Step::Close;
            }
            reply_err(out, opt, REP_ERR_SHUTDOWN, "server is shutting down");
            return Step::Continue;
        }
        if self.tls.mode == TlsMode::Required && !self.tls_active && opt != OPT_STARTTLS && opt != OPT_ABORT {
            // Nothing, not even the export list, before TLS.
            if opt == OPT_EXPORT_NAME {
                return Step::Close;
            }
            reply_err(out, opt, REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first");
            return Step::Continue;
        }
        match opt {
            OPT_EXPORT_NAME => self.export_name(data, registry, out),
            OPT_ABORT => {
                reply(out, opt, REP_ACK, &[]);
                Step::Close
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply_err(out, opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Step::Continue;
                }
                for e in registry.iter().filter(|e| self.visible(&e.name) && self.access(&e.name).is_ok()) {
                    let mut d = BytesMut::with_capacity(4 + e.name.len() + e.description.len());
                    d.put_u32(e.name.len() as u32);
                    d.put_slice(e.name.as_bytes());
                    d.put_slice(e.description.as_bytes());
                    reply(out, opt, REP_SERVER, &d);
                }
                reply(out, opt, REP_ACK, &[]);
                Step::Continue
            }
            OPT_STARTTLS => self.starttls(data, out),
            OPT_INFO | OPT_GO => self.info_or_go(opt, data, registry, out),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_err(out, opt, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                } else if self.extended {
                    reply_err(out, opt, REP_ERR_EXT_HEADER_REQD, "extended headers already negotiated");
                } else {
                    self.structured = true;
                    reply(out, opt, REP_ACK, &[]);
                }
                Step::Continue
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    reply_err(out, opt, REP_ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data");
                } else {
                    self.extended = true;
                    self.structured = true;
                    reply(out, opt, REP_ACK, &[]);
                }
                Step::Continue
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(opt, data, registry, out);
                Step::Continue
            }
            _ => {
                reply_err(out, opt, REP_ERR_UNSUP, &format!("option {opt} is not supported"));
                Step::Continue
            }
        }
    }

    fn starttls(&mut self, data: &[u8], out: &mut BytesMut) -> Step {
        let opt = OPT_STARTTLS;
        if self.tls.mode == TlsMode::Off {
            reply_err(out, opt, REP_ERR_POLICY, "TLS is not enabled on this server");
        } else if !data.is_empty() {
            reply_err(out, opt, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
        } else if self.tls_active {
            reply_err(out, opt, REP_ERR_INVALID, "TLS is already active");
        } else {
            reply(out, opt, REP_ACK, &[]);
            // What was agreed in plaintext does not carry over into TLS.
            self.structured = false;
            self.extended = false;
            self.meta = None;
            self.tls_active = true;
            return Step::StartTls;
        }
        Step::Continue
    }

    fn export_name(&mut self, data: &[u8], registry: &ExportRegistry, out: &mut BytesMut) -> Step {
        if self.extended {
            // A client that negotiated extended headers MUST use GO.
            return Step::Close;
        }
        let Some(name) = string(data) else { return Step::Close };
        let Some(export) = self.lookup(registry, name) else {
            return Step::Close;
        };
        // Check the export the name resolved to (an empty name picks the default).
        if let Err((_, msg)) = self.access(&export.name) {
            info!("refused: {msg}");
            return Step::Close;
        }
        let permit = match self.permit(&export.name, true) {
            Ok(p) => p,
            Err(msg) => {
                info!("refused: {msg}");
                return Step::Close;
            }
        };
        let negotiated = self.negotiated(export, name, permit);
        out.put_u64(export.volume.size());
        out.put_u16(negotiated.flags);
        if !self.no_zeroes {
            out.put_bytes(0, 124);
        }
        Step::Transmit(Box::new(negotiated))
    }

    fn negotiated(&self, export: &Export, requested_name: &str, permit: ExportPermit) -> Negotiated {
        let base_allocation = match &self.meta {
            Some((meta_name, selected)) => *selected && meta_name == requested_name,
            None => false,
        };
        Negotiated {
            export: export.clone(),
            structured: self.structured,
            extended: self.extended,
            base_allocation,
            flags: transmission_flags(&export.volume.capabilities(), self.structured),
            permit: Arc::new(permit),
        }
    }

    fn info_or_go(&mut self, opt: u32, data: &[u8], registry: &ExportRegistry, out: &mut BytesMut) -> Step {
        let mut r = Reader(data);
        let parsed = (|| {
            let name_len = r.u32()? as usize;
            let name = string(r.take(name_len)?)?;
            let n = r.u16()? as usize;
            let mut infos = Vec::with_capacity(n.min(16));
            for _ in 0..n {
                infos.push(r.u16()?);
            }
            r.done()?;
            Some((name, infos))
        })();
        let Some((name, infos)) = parsed else {
            reply_err(out, opt, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO request");
            return Step::Continue;
        };
        let Some(export) = self.lookup(registry, name) else {
            reply_err(out, opt, REP_ERR_UNKNOWN, &format!("no export named {name:?}; NBD_OPT_LIST shows the exports"));
            return Step::Continue;
        };
        if let Err((typ, msg)) = self.access(&export.name) {
            info!("refused: {msg}");
            reply_err(out, opt, typ, &msg);
            return Step::Continue;
        }
        // GO takes a slot (held by the session); INFO only looks.
        let permit = match self.permit(&export.name, opt == OPT_GO) {
            Ok(p) => p,
            Err(msg) => {
                info!("refused: {msg}");
                reply_err(out, opt, REP_ERR_POLICY, &msg);
                return Step::Continue;
            }
        };
        let negotiated = self.negotiated(export, name, permit);
        let caps = export.volume.capabilities();

        let mut d = BytesMut::with_capacity(12);
        d.put_u16(INFO_EXPORT);
        d.put_u64(export.volume.size());
        d.put_u16(negotiated.flags);
        reply(out, opt, REP_INFO, &d);

        if infos.contains(&INFO_NAME) {
            let mut d = BytesMut::new();
            d.put_u16(INFO_NAME);
            d.put_slice(export.name.as_bytes());
            reply(out, opt, REP_INFO, &d);
        }
        if infos.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
            let mut d = BytesMut::new();
            d.put_u16(INFO_DESCRIPTION);
            d.put_slice(export.description.as_bytes());
            reply(out, opt, REP_INFO, &d);
        }
        // Sent even when not requested: clients ignore what they did not ask for.
        let mut d = BytesMut::with_capacity(14);
        d.put_u16(INFO_BLOCK_SIZE);
        d.put_u32(caps.min_block);
        d.put_u32(caps.preferred_block.max(caps.min_block).max(512));
        d.put_u32(caps.max_payload);
        reply(out, opt, REP_INFO, &d);

        reply(out, opt, REP_ACK, &[]);
        if opt == OPT_GO {
            Step::Transmit(Box::new(negotiated))
        } else {
            Step::Continue
        }
    }

    fn meta_context(&mut self, opt: u32, data: &[u8], registry: &ExportRegistry, out: &mut BytesMut) {
        let set = opt == OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the previous selection even when it fails.
            self.meta = None;
        }
        if !self.structured {
            reply_err(out, opt, REP_ERR_INVALID, "negotiate structured replies before metadata contexts");
            return;
        }
        let mut r = Reader(data);
        let parsed = (|| {
            let name_len = r.u32()? as usize;
            let name = string(r.take(name_len)?)?;
            let n = r.u32()?;
            let mut queries = Vec::new();
            for _ in 0..n {
                let len = r.u32()? as usize;
                queries.push(string(r.take(len)?)?);
            }
            r.done()?;
            Some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            reply_err(out, opt, REP_ERR_INVALID, "malformed metadata context request");
            return;
        };
        let Some(export) = self.lookup(registry, name) else {
            reply_err(out, opt, REP_ERR_UNKNOWN, &format!("no export named {name:?}"));
            return;
        };
        if let Err((typ, msg)) = self.access(&export.name) {
            reply_err(out, opt, typ, &msg);
            return;
        }
        let matches = |q: &str| if set { q == BASE_ALLOCATION } else { q == BASE_ALLOCATION || q == "base:" };
        let selected = if !set && queries.is_empty() { true } else { queries.iter().any(|q| matches(q)) };
        if selected {
            let mut d = BytesMut::new();
            d.put_u32(if set { BASE_ALLOCATION_ID } else { 0 });
            d.put_slice(BASE_ALLOCATION.as_bytes());
            reply(out, opt, REP_META_CONTEXT, &d);
        }
        if set {
            self.meta = Some((name.to_string(), selected));
        }
        reply(out, opt, REP_ACK, &[]);
    }
}

/// Append one option reply.
fn reply(out: &mut BytesMut, opt: u32, typ: u32, data: &[u8]) {
    out.reserve(20 + data.len());
    out.put_u64(OPT_REPLY_MAGIC);
    out.put_u32(opt);
    out.put_u32(typ);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// Append an error reply carrying a human-readable message.
fn reply_err(out: &mut BytesMut, opt: u32, typ: u32, msg: &str) {
    reply(out, opt, typ, msg.as_bytes());
}

/// A protocol string: UTF-8, at most 4096 bytes.
fn string(b: &[u8]) -> Option<&str> {
    if b.len() > MAX_STRING {
        return None;
    }
    std::str::from_utf8(b).ok()
}

/// Bounds-checked big-endian reader over an option payload.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    }
    fn done(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}
