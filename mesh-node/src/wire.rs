//! Mesh datagrams on the wire: parse into borrowed views at fixed offsets, emit into caller
//! buffers. Nothing here allocates, so the relay hot path can parse, stamp and forward a
//! datagram in the buffer it was received into. The byte layout is specified in
//! `docs/protocol.md`; the constants below are that specification.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use shoal_protocol::identity::{NODE_ID_LEN, SIGNATURE_LEN};
use shoal_protocol::subscription::SUBSCRIPTION_LEN;
use shoal_protocol::ticket::TICKET_LEN;
use shoal_protocol::{NodeId, Signature};

/// Version byte of this layout.
pub const VERSION: u8 = 1;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 24;
/// Most relays a source route may name.
pub const MAX_ROUTE: usize = 4;
/// Bytes per route entry (a relay's [`NodeId`]).
pub const ROUTE_ENTRY_LEN: usize = NODE_ID_LEN;
/// Bytes of the trace's origin stamp.
pub const TRACE_ORIGIN_LEN: usize = 4;
/// Bytes per trace slot: relay tag (4) and microseconds since the origin stamp (4).
pub const TRACE_SLOT_LEN: usize = 8;
/// Largest datagram Shoal sends or accepts: a 1500-byte Ethernet MTU less IPv6 (40) and UDP
/// (8) headers. Layers above choose smaller payloads for paths with a smaller MTU.
pub const MAX_DATAGRAM: usize = 1452;
/// Bytes of a cookie in the bind handshake.
pub const COOKIE_LEN: usize = 16;
/// Bytes of a bind challenge body: issue time (8) and cookie.
pub const CHALLENGE_BODY_LEN: usize = 8 + COOKIE_LEN;
/// A bind request is padded to this body length so that the challenge it provokes is never
/// larger than the request (no amplification).
pub const BIND_REQUEST_BODY_LEN: usize = CHALLENGE_BODY_LEN;
/// Bytes of a bind proof body: challenge time, cookie, relay permit, node signature.
pub const BIND_PROOF_BODY_LEN: usize = 8 + COOKIE_LEN + TICKET_LEN + SIGNATURE_LEN;
/// Bytes of a bind acknowledgement body: binding expiry (8), observed address (19).
pub const BIND_ACK_BODY_LEN: usize = 8 + ADDR_LEN;
/// Bytes of a socket address on the wire: family (4 or 6), port (u16), IPv6 address (an IPv4
/// one mapped). Bind acks carry one; the SDK's candidate frames carry several.
pub const ADDR_LEN: usize = 19;
/// Bytes of a notice body: code (1), detail (1), reserved (2).
pub const NOTICE_BODY_LEN: usize = 4;
/// Bytes of a probe id.
pub const PROBE_ID_LEN: usize = 8;
/// Bytes of a subscribe acknowledgement body: status (1), reserved (1), stream (2), publisher
/// (8).
pub const SUBSCRIBE_ACK_BODY_LEN: usize = 4 + NODE_ID_LEN;
/// Streams are 16-bit; a publish datagram carries its stream in the VC field.
pub const MAX_STREAM: u32 = u16::MAX as u32;

// No handshake reply is larger than the datagram it answers: a relay cannot amplify.
const _: () = assert!(
    CHALLENGE_BODY_LEN <= BIND_REQUEST_BODY_LEN
        && BIND_ACK_BODY_LEN <= BIND_PROOF_BODY_LEN
        && SUBSCRIBE_ACK_BODY_LEN <= SUBSCRIPTION_LEN
);

const FLAG_TRACE: u8 = 0b0000_0001;
/// On a [`Kind::BindProof`]: release the binding this proof's challenge made (an unbind). On a
/// [`Kind::BindAck`]: the binding was released. On a [`Kind::Subscribe`]: leave the group. No
/// other kind carries it.
const FLAG_UNBIND: u8 = 0b0000_0010;
const KNOWN_FLAGS: u8 = FLAG_TRACE | FLAG_UNBIND;

/// What a datagram is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// A virtual-connection payload for the destination.
    Data = 1,
    /// Measures a route: the destination answers with a [`Kind::ProbeAck`].
    Probe = 2,
    /// The destination's answer to a probe, sent back over the reversed route.
    ProbeAck = 3,
    /// A relay tells the previous hop why it dropped a datagram.
    Notice = 4,
    /// A node asks a relay for a bind challenge.
    BindRequest = 16,
    /// The relay's stateless challenge (a cookie bound to the requester's address).
    BindChallenge = 17,
    /// The node's relay permit and its signature over the cookie.
    BindProof = 18,
    /// The relay accepted the binding; carries the address it saw.
    BindAck = 19,
    /// A publisher's datagram for a fan-out group: the relay its route names copies it to
    /// every member of the group (the publisher, the stream in the VC field).
    Publish = 5,
    /// A node presents a subscription to the relay it names, to join a group; with the
    /// unbind flag, it leaves the group.
    Subscribe = 20,
    /// The relay's answer to a subscribe: member, or why not.
    SubscribeAck = 21,
}

impl Kind {
    /// Every kind, in wire order.
    pub const ALL: [Kind; 11] = [
        Kind::Data,
        Kind::Probe,
        Kind::ProbeAck,
        Kind::Notice,
        Kind::Publish,
        Kind::BindRequest,
        Kind::BindChallenge,
        Kind::BindProof,
        Kind::BindAck,
        Kind::Subscribe,
        Kind::SubscribeAck,
    ];

    fn from_u8(b: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u8 == b)
    }

    /// Kinds that travel over a source route through relays. The others are between a node
    /// and the relay it talks to and always have an empty route.
    pub fn is_routed(self) -> bool {
        matches!(self, Kind::Data | Kind::Probe | Kind::ProbeAck | Kind::Publish)
    }

    /// Smallest body this kind may carry.
    fn min_body(self) -> usize {
        match self {
            Kind::Data | Kind::Publish => 0,
            Kind::Probe | Kind::ProbeAck => PROBE_ID_LEN,
            Kind::Notice => NOTICE_BODY_LEN,
            Kind::BindRequest => BIND_REQUEST_BODY_LEN,
            Kind::BindChallenge => CHALLENGE_BODY_LEN,
            Kind::BindProof => BIND_PROOF_BODY_LEN,
            Kind::BindAck => BIND_ACK_BODY_LEN,
            Kind::Subscribe => SUBSCRIPTION_LEN,
            Kind::SubscribeAck => SUBSCRIBE_ACK_BODY_LEN,
        }
    }
}

/// A virtual connection's id, local to the pair of nodes that share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct VcId(pub u32);

/// Why bytes are not a mesh datagram. Every malformed input maps to one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than the fields its header announces.
    #[error("truncated: {got} bytes, need {needed}")]
    Truncated {
        /// Bytes the header announces, at least.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// Longer than [`MAX_DATAGRAM`].
    #[error("oversized: {0} bytes")]
    Oversized(usize),
    /// A version this build does not speak.
    #[error("unsupported version {0}")]
    UnsupportedVersion(u8),
    /// A kind this build does not know.
    #[error("unknown kind {0}")]
    UnknownKind(u8),
    /// Flag bits this build does not know.
    #[error("unknown flags {0:#04x}")]
    UnknownFlags(u8),
    /// A route longer than [`MAX_ROUTE`].
    #[error("route of {0} relays exceeds {MAX_ROUTE}")]
    RouteTooLong(u8),
    /// The hop index points past the end of the route.
    #[error("hop {hop} is past a route of {route_len}")]
    HopPastRoute {
        /// Hop index.
        hop: u8,
        /// Route length.
        route_len: u8,
    },
    /// A relay-to-node kind with a route, a probe without a trace, or the unbind flag on a
    /// kind other than a bind proof or ack.
    #[error("{0:?} datagram with an invalid route, trace or flag")]
    BadShape(Kind),
    /// The body is shorter than its kind requires.
    #[error("{kind:?} body of {got} bytes, need {needed}")]
    ShortBody {
        /// Kind of the datagram.
        kind: Kind,
        /// Bytes the kind needs.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// A field holds a value the kind does not allow.
    #[error("invalid field: {0}")]
    InvalidField(&'static str),
}

/// The fields an emitter chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Datagram kind.
    pub kind: Kind,
    /// Sending node.
    pub source: NodeId,
    /// Receiving node (for bind and notice kinds: the relay or the node being answered).
    pub destination: NodeId,
    /// Virtual connection this belongs to (0 outside VCs).
    pub vc: VcId,
    /// Whether relays stamp trace slots.
    pub trace: bool,
}

/// A source route of up to [`MAX_ROUTE`] relays, stored inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    len: u8,
    hops: [NodeId; MAX_ROUTE],
}

impl Route {
    /// The direct route: no relays.
    pub const DIRECT: Route = Route { len: 0, hops: [NodeId([0; NODE_ID_LEN]); MAX_ROUTE] };

    /// A route through `relays`, in order. `None` if longer than [`MAX_ROUTE`].
    pub fn new(relays: &[NodeId]) -> Option<Route> {
        if relays.len() > MAX_ROUTE {
            return None;
        }
        let mut r = Route::DIRECT;
        r.hops[..relays.len()].copy_from_slice(relays);
        r.len = relays.len() as u8;
        Some(r)
    }

    /// The relays, in order.
    pub fn relays(&self) -> &[NodeId] {
        &self.hops[..self.len as usize]
    }

    /// The same relays in the opposite order.
    pub fn reversed(&self) -> Route {
        let mut r = *self;
        r.hops[..self.len as usize].reverse();
        r
    }

    /// Number of relays.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether this is the direct route.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Default for Route {
    fn default() -> Route {
        Route::DIRECT
    }
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.relays()).finish()
    }
}

/// The short tag a relay writes into its trace slot: the first four bytes of its id.
pub fn relay_tag(id: NodeId) -> u32 {
    u32::from_be_bytes([id.0[0], id.0[1], id.0[2], id.0[3]])
}

/// One filled trace slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceSlot {
    /// [`relay_tag`] of the relay that stamped it.
    pub tag: u32,
    /// Microseconds from the origin stamp to the relay's receipt, on the relay's clock.
    pub delta_us: u32,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn node_at(b: &[u8], at: usize) -> NodeId {
    let mut x = [0; NODE_ID_LEN];
    x.copy_from_slice(&b[at..at + NODE_ID_LEN]);
    NodeId(x)
}

/// A validated datagram, borrowed from the receive buffer.
///
/// [`Datagram::parse`] checks every length and field once; the accessors then read at fixed
/// offsets and cannot fail.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    bytes: &'a [u8],
    kind: Kind,
}

/// Offsets derived from the header's route length and flags.
#[derive(Debug, Clone, Copy)]
struct Layout {
    route_len: usize,
    hop: usize,
    trace: bool,
}

impl Layout {
    fn read(b: &[u8]) -> Layout {
        Layout { route_len: (b[3] >> 4) as usize, hop: (b[3] & 0x0f) as usize, trace: b[2] & FLAG_TRACE != 0 }
    }
    fn trace_at(&self) -> usize {
        HEADER_LEN + self.route_len * ROUTE_ENTRY_LEN
    }
    fn trace_len(&self) -> usize {
        if self.trace { TRACE_ORIGIN_LEN + self.route_len * TRACE_SLOT_LEN } else { 0 }
    }
    fn body_at(&self) -> usize {
        self.trace_at() + self.trace_len()
    }
}

impl<'a> Datagram<'a> {
    /// Validates `bytes` as one datagram.
    pub fn parse(bytes: &'a [u8]) -> Result<Datagram<'a>, ParseError> {
        if bytes.len() < HEADER_LEN {
            return Err(ParseError::Truncated { needed: HEADER_LEN, got: bytes.len() });
        }
        if bytes.len() > MAX_DATAGRAM {
            return Err(ParseError::Oversized(bytes.len()));
        }
        if bytes[0] != VERSION {
            return Err(ParseError::UnsupportedVersion(bytes[0]));
        }
        let kind = Kind::from_u8(bytes[1]).ok_or(ParseError::UnknownKind(bytes[1]))?;
        if bytes[2] & !KNOWN_FLAGS != 0 {
            return Err(ParseError::UnknownFlags(bytes[2]));
        }
        let l = Layout::read(bytes);
        if l.route_len > MAX_ROUTE {
            return Err(ParseError::RouteTooLong(l.route_len as u8));
        }
        if l.hop > l.route_len {
            return Err(ParseError::HopPastRoute { hop: l.hop as u8, route_len: l.route_len as u8 });
        }
        let routed_ok = kind.is_routed() || (l.route_len == 0 && !l.trace);
        let probe_ok = !matches!(kind, Kind::Probe | Kind::ProbeAck) || l.trace;
        let unbind_ok =
            bytes[2] & FLAG_UNBIND == 0 || matches!(kind, Kind::BindProof | Kind::BindAck | Kind::Subscribe);
        if !routed_ok || !probe_ok || !unbind_ok {
            return Err(ParseError::BadShape(kind));
        }
        let body_at = l.body_at();
        if bytes.len() < body_at {
            return Err(ParseError::Truncated { needed: body_at, got: bytes.len() });
        }
        let mut needed = kind.min_body();
        if matches!(kind, Kind::Probe | Kind::ProbeAck) {
            // The ack echoes the forward trace, which has as many slots as the route; the probe
            // carries room for that echo so the ack is never larger than the probe.
            needed += l.trace_len();
        }
        let got = bytes.len() - body_at;
        if got < needed {
            return Err(ParseError::ShortBody { kind, needed, got });
        }
        Ok(Datagram { bytes, kind })
    }

    fn layout(&self) -> Layout {
        Layout::read(self.bytes)
    }

    /// The kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Whether relays stamp trace slots.
    pub fn traced(&self) -> bool {
        self.layout().trace
    }

    /// Whether this bind proof is an unbind, or this bind ack answers one.
    pub fn unbind(&self) -> bool {
        self.bytes[2] & FLAG_UNBIND != 0
    }

    /// Sending node.
    pub fn source(&self) -> NodeId {
        node_at(self.bytes, 4)
    }

    /// Receiving node.
    pub fn destination(&self) -> NodeId {
        node_at(self.bytes, 12)
    }

    /// Virtual connection.
    pub fn vc(&self) -> VcId {
        VcId(u32_at(self.bytes, 20))
    }

    /// Index of the next relay to cross; equals the route length once every relay is crossed.
    pub fn hop(&self) -> usize {
        self.layout().hop
    }

    /// Number of relays on the route.
    pub fn route_len(&self) -> usize {
        self.layout().route_len
    }

    /// The `i`-th relay of the route (`i < route_len`).
    pub fn route_at(&self, i: usize) -> NodeId {
        node_at(self.bytes, HEADER_LEN + i * ROUTE_ENTRY_LEN)
    }

    /// The route as a value.
    pub fn route(&self) -> Route {
        let mut r = Route::DIRECT;
        for i in 0..self.route_len() {
            r.hops[i] = self.route_at(i);
        }
        r.len = self.route_len() as u8;
        r
    }

    /// The sender's origin stamp (microseconds, wrapping), if traced.
    pub fn trace_origin(&self) -> Option<u32> {
        let l = self.layout();
        l.trace.then(|| u32_at(self.bytes, l.trace_at()))
    }

    /// The filled trace slots, in hop order (only those of relays already crossed).
    pub fn trace_slots(&self) -> impl Iterator<Item = TraceSlot> + 'a {
        let l = self.layout();
        let bytes = self.bytes;
        let filled = if l.trace { l.hop } else { 0 };
        (0..filled).map(move |i| {
            let at = l.trace_at() + TRACE_ORIGIN_LEN + i * TRACE_SLOT_LEN;
            TraceSlot { tag: u32_at(bytes, at), delta_us: u32_at(bytes, at + 4) }
        })
    }

    /// The kind-specific body.
    pub fn body(&self) -> &'a [u8] {
        &self.bytes[self.layout().body_at()..]
    }

    /// The whole datagram.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// Writes a header, route and (zeroed) trace area into `buf`; returns the body offset.
///
/// `origin_us` is the sender's clock in microseconds, used when `header.trace` is set.
/// Fails if `buf` cannot hold the header plus `body_len` bytes within [`MAX_DATAGRAM`].
pub fn emit_header(
    buf: &mut [u8],
    h: &Header,
    route: &Route,
    hop: usize,
    origin_us: u32,
    body_len: usize,
) -> Result<usize, EmitError> {
    let l = Layout { route_len: route.len(), hop, trace: h.trace };
    let total = l.body_at() + body_len;
    if total > MAX_DATAGRAM || total > buf.len() {
        return Err(EmitError::TooLarge { len: total, max: MAX_DATAGRAM.min(buf.len()) });
    }
    if !h.kind.is_routed() && (!route.is_empty() || h.trace) {
        return Err(EmitError::Shape(h.kind));
    }
    buf[0] = VERSION;
    buf[1] = h.kind as u8;
    buf[2] = if h.trace { FLAG_TRACE } else { 0 };
    buf[3] = ((route.len() as u8) << 4) | (hop.min(route.len()) as u8);
    buf[4..12].copy_from_slice(&h.source.0);
    buf[12..20].copy_from_slice(&h.destination.0);
    buf[20..24].copy_from_slice(&h.vc.0.to_be_bytes());
    for (i, id) in route.relays().iter().enumerate() {
        let at = HEADER_LEN + i * ROUTE_ENTRY_LEN;
        buf[at..at + ROUTE_ENTRY_LEN].copy_from_slice(&id.0);
    }
    if h.trace {
        let at = l.trace_at();
        buf[at..at + 4].copy_from_slice(&origin_us.to_be_bytes());
        buf[at + 4..l.body_at()].fill(0);
    }
    Ok(l.body_at())
}

/// Emits a whole datagram with `body`; returns its length.
pub fn emit(buf: &mut [u8], h: &Header, route: &Route, origin_us: u32, body: &[u8]) -> Result<usize, EmitError> {
    let at = emit_header(buf, h, route, 0, origin_us, body.len())?;
    buf[at..at + body.len()].copy_from_slice(body);
    Ok(at + body.len())
}

/// Why a datagram could not be emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EmitError {
    /// The datagram would exceed the size limit or the buffer.
    #[error("datagram of {len} bytes exceeds {max}")]
    TooLarge {
        /// Bytes needed.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A node-to-relay kind was given a route or a trace.
    #[error("{0:?} datagrams carry no route or trace")]
    Shape(Kind),
}

/// Stamps the current hop's trace slot and advances the hop index, in place.
///
/// `buf` must hold a datagram that [`Datagram::parse`] accepted with `hop < route_len`; the
/// relay calls this after its checks. `now_us` is the relay's clock in microseconds.
pub fn stamp_and_advance(buf: &mut [u8], tag: u32, now_us: u32) {
    let l = Layout::read(buf);
    debug_assert!(l.hop < l.route_len);
    if l.trace {
        let origin = u32_at(buf, l.trace_at());
        let at = l.trace_at() + TRACE_ORIGIN_LEN + l.hop * TRACE_SLOT_LEN;
        buf[at..at + 4].copy_from_slice(&tag.to_be_bytes());
        buf[at + 4..at + 8].copy_from_slice(&now_us.wrapping_sub(origin).to_be_bytes());
    }
    buf[3] = ((l.route_len as u8) << 4) | (l.hop as u8 + 1);
}

/// Body of a [`Kind::BindChallenge`] (and the echo of it inside a proof).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    /// Relay's time when it made the cookie, in Unix seconds.
    pub issued_at: u64,
    /// MAC over the requester's address, id and `issued_at`, under the relay's secret.
    pub cookie: [u8; COOKIE_LEN],
}

impl Challenge {
    /// Writes the 24-byte body.
    pub fn write(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.issued_at.to_be_bytes());
        out[8..CHALLENGE_BODY_LEN].copy_from_slice(&self.cookie);
    }

    /// Reads it from a body of at least [`CHALLENGE_BODY_LEN`] bytes (checked by parse).
    pub fn read(body: &[u8]) -> Challenge {
        let mut cookie = [0; COOKIE_LEN];
        cookie.copy_from_slice(&body[8..CHALLENGE_BODY_LEN]);
        Challenge { issued_at: u64_at(body, 0), cookie }
    }
}

/// Body of a [`Kind::BindProof`], borrowed.
#[derive(Debug, Clone, Copy)]
pub struct BindProof<'a> {
    /// The challenge being answered.
    pub challenge: Challenge,
    /// The node's relay permit, not yet decoded.
    pub permit: &'a [u8],
    /// The node's signature over [`bind_proof_message`].
    pub signature: Signature,
}

impl<'a> BindProof<'a> {
    /// Reads it from a body of at least [`BIND_PROOF_BODY_LEN`] bytes (checked by parse).
    pub fn read(body: &'a [u8]) -> BindProof<'a> {
        let permit_at = CHALLENGE_BODY_LEN;
        let sig_at = permit_at + TICKET_LEN;
        let mut sig = [0; SIGNATURE_LEN];
        sig.copy_from_slice(&body[sig_at..sig_at + SIGNATURE_LEN]);
        BindProof { challenge: Challenge::read(body), permit: &body[permit_at..sig_at], signature: Signature(sig) }
    }

    /// Writes the body.
    pub fn write(challenge: &Challenge, permit: &[u8; TICKET_LEN], signature: &Signature, out: &mut [u8]) {
        challenge.write(out);
        out[CHALLENGE_BODY_LEN..CHALLENGE_BODY_LEN + TICKET_LEN].copy_from_slice(permit);
        out[CHALLENGE_BODY_LEN + TICKET_LEN..BIND_PROOF_BODY_LEN].copy_from_slice(&signature.0);
    }
}

/// Domain separation for bind proofs.
pub const BIND_CONTEXT: &[u8] = b"shoal/bind/v1";

/// Domain separation for unbinds: a node's signature over the same message as its bind proof,
/// so a captured bind proof cannot be replayed as an unbind.
pub const UNBIND_CONTEXT: &[u8] = b"shoal/unbind/v1";

/// Marks an emitted [`Kind::BindProof`] as an unbind, or a [`Kind::BindAck`] as the answer to
/// one. Other kinds are left as they are (the flag would not parse on them).
pub fn set_unbind(datagram: &mut [u8]) {
    let flaggable = [Kind::BindProof as u8, Kind::BindAck as u8, Kind::Subscribe as u8];
    if datagram.len() >= HEADER_LEN && flaggable.contains(&datagram[1]) {
        datagram[2] |= FLAG_UNBIND;
    }
}

/// What a node signs to prove it holds its key: the relay's id and the challenge. Binding the
/// relay id stops one relay replaying a proof to another.
pub fn bind_proof_message(relay: NodeId, challenge: &Challenge) -> [u8; NODE_ID_LEN + CHALLENGE_BODY_LEN] {
    let mut m = [0; NODE_ID_LEN + CHALLENGE_BODY_LEN];
    m[..NODE_ID_LEN].copy_from_slice(&relay.0);
    challenge.write(&mut m[NODE_ID_LEN..]);
    m
}

/// Writes `addr` into the first [`ADDR_LEN`] bytes of `out`.
///
/// # Panics
/// If `out` is shorter than [`ADDR_LEN`]: a caller bug, as with a slice index.
pub fn write_addr(addr: SocketAddr, out: &mut [u8]) {
    let (family, ip) = match addr.ip() {
        IpAddr::V4(v4) => (4, v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => (6, v6),
    };
    out[0] = family;
    out[1..3].copy_from_slice(&addr.port().to_be_bytes());
    out[3..ADDR_LEN].copy_from_slice(&ip.octets());
}

/// Reads an address written by [`write_addr`] from the first [`ADDR_LEN`] bytes of `b`.
pub fn read_addr(b: &[u8]) -> Result<SocketAddr, ParseError> {
    let b: &[u8; ADDR_LEN] = b
        .get(..ADDR_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or(ParseError::Truncated { needed: ADDR_LEN, got: b.len() })?;
    let mut ip = [0; 16];
    ip.copy_from_slice(&b[3..]);
    let ip = Ipv6Addr::from(ip);
    let ip = match b[0] {
        4 => IpAddr::V4(ip.to_ipv4_mapped().ok_or(ParseError::InvalidField("address: v4 address not mapped"))?),
        6 => IpAddr::V6(ip),
        _ => return Err(ParseError::InvalidField("address: family")),
    };
    Ok(SocketAddr::new(ip, u16::from_be_bytes([b[1], b[2]])))
}

/// Body of a [`Kind::BindAck`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindAck {
    /// Unix second at which the binding lapses (the permit's expiry, or sooner).
    pub expires_at: u64,
    /// The node's address as the relay saw it (server-reflexive).
    pub observed: SocketAddr,
}

impl BindAck {
    /// Writes the 27-byte body.
    pub fn write(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.expires_at.to_be_bytes());
        write_addr(self.observed, &mut out[8..]);
    }

    /// Reads it from a body of at least [`BIND_ACK_BODY_LEN`] bytes (checked by parse).
    pub fn read(body: &[u8]) -> Result<BindAck, ParseError> {
        Ok(BindAck { expires_at: u64_at(body, 0), observed: read_addr(&body[8..])? })
    }
}

/// A relay's answer to a subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SubscribeStatus {
    /// The node is a member of the group until its subscription expires.
    Member = 0,
    /// The node left the group (the answer to a leave).
    Left = 1,
    /// The sender's address holds no binding of the node the subscription names.
    NotBound = 2,
    /// Made for another relay.
    WrongRelay = 3,
    /// Presented by a node other than its subscriber.
    WrongSubscriber = 4,
    /// Expired, or issued in the future.
    Expired = 5,
    /// Not the control server's signature, or an unknown layout.
    Forged = 6,
    /// The group holds as many members as the relay allows.
    GroupFull = 7,
    /// The relay holds as many groups as it allows.
    TooManyGroups = 8,
}

impl SubscribeStatus {
    /// Every status, in wire order.
    pub const ALL: [SubscribeStatus; 9] = [
        SubscribeStatus::Member,
        SubscribeStatus::Left,
        SubscribeStatus::NotBound,
        SubscribeStatus::WrongRelay,
        SubscribeStatus::WrongSubscriber,
        SubscribeStatus::Expired,
        SubscribeStatus::Forged,
        SubscribeStatus::GroupFull,
        SubscribeStatus::TooManyGroups,
    ];
}

/// The body of a [`Kind::SubscribeAck`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscribeAck {
    /// Member, or why not.
    pub status: SubscribeStatus,
    /// The stream the subscribe named.
    pub stream: u16,
    /// Its publisher.
    pub publisher: NodeId,
}

impl SubscribeAck {
    /// Writes the body into `out` (at least [`SUBSCRIBE_ACK_BODY_LEN`] bytes).
    pub fn write(&self, out: &mut [u8]) {
        out[0] = self.status as u8;
        out[1] = 0;
        out[2..4].copy_from_slice(&self.stream.to_be_bytes());
        out[4..SUBSCRIBE_ACK_BODY_LEN].copy_from_slice(&self.publisher.0);
    }

    /// Reads a body the parser has sized.
    pub fn read(body: &[u8]) -> Result<SubscribeAck, ParseError> {
        let status = SubscribeStatus::ALL
            .into_iter()
            .find(|s| *s as u8 == body[0])
            .ok_or(ParseError::InvalidField("subscribe status"))?;
        let mut publisher = [0; NODE_ID_LEN];
        publisher.copy_from_slice(&body[4..SUBSCRIBE_ACK_BODY_LEN]);
        Ok(SubscribeAck { status, stream: u16::from_be_bytes([body[2], body[3]]), publisher: NodeId(publisher) })
    }
}

/// Why a relay refused a datagram, as told to the previous hop in a [`Kind::Notice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum NoticeCode {
    /// The sender's address holds no binding: present a permit first.
    NotBound = 1,
    /// The sender's binding lapsed with its permit: bind again with a fresh permit.
    PermitExpired = 2,
    /// The relay does not know the next hop (the destination is not bound here, or the next
    /// relay is not a peer).
    UnknownNextHop = 3,
    /// The bind proof was refused; the detail byte says why (see [`BindRefusal`]).
    BindRefused = 4,
}

impl NoticeCode {
    fn from_u8(b: u8) -> Option<NoticeCode> {
        match b {
            1 => Some(NoticeCode::NotBound),
            2 => Some(NoticeCode::PermitExpired),
            3 => Some(NoticeCode::UnknownNextHop),
            4 => Some(NoticeCode::BindRefused),
            _ => None,
        }
    }
}

/// Detail of a [`NoticeCode::BindRefused`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BindRefusal {
    /// The cookie does not match this address or has expired.
    BadCookie = 1,
    /// The permit does not decode.
    MalformedPermit = 2,
    /// The permit is not signed by the control key.
    ForgedPermit = 3,
    /// The permit has expired or is not yet valid.
    ExpiredPermit = 4,
    /// The permit is of the wrong kind or lacks a role.
    WrongRole = 5,
    /// The node's signature over the challenge does not match the permit's key.
    BadProof = 6,
    /// The permit names another node than the header's source.
    WrongNode = 7,
    /// The relay's binding table is full.
    Full = 8,
}

impl BindRefusal {
    /// Every refusal, in wire order.
    pub const ALL: [BindRefusal; 8] = [
        BindRefusal::BadCookie,
        BindRefusal::MalformedPermit,
        BindRefusal::ForgedPermit,
        BindRefusal::ExpiredPermit,
        BindRefusal::WrongRole,
        BindRefusal::BadProof,
        BindRefusal::WrongNode,
        BindRefusal::Full,
    ];

    fn from_u8(b: u8) -> Option<BindRefusal> {
        BindRefusal::ALL.into_iter().find(|r| *r as u8 == b)
    }
}

/// Body of a [`Kind::Notice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notice {
    /// Why.
    pub code: NoticeCode,
    /// Detail for [`NoticeCode::BindRefused`].
    pub refusal: Option<BindRefusal>,
}

impl Notice {
    /// Writes the 4-byte body.
    pub fn write(&self, out: &mut [u8]) {
        out[0] = self.code as u8;
        out[1] = self.refusal.map_or(0, |r| r as u8);
        out[2..4].fill(0);
    }

    /// Reads it from a body of at least [`NOTICE_BODY_LEN`] bytes (checked by parse).
    pub fn read(body: &[u8]) -> Result<Notice, ParseError> {
        let code = NoticeCode::from_u8(body[0]).ok_or(ParseError::InvalidField("notice code"))?;
        let refusal = match (code, body[1]) {
            (NoticeCode::BindRefused, b) => Some(BindRefusal::from_u8(b).ok_or(ParseError::InvalidField("refusal"))?),
            (_, 0) => None,
            _ => return Err(ParseError::InvalidField("notice detail")),
        };
        Ok(Notice { code, refusal })
    }
}

/// Probe id at the start of a probe or probe-ack body.
pub fn probe_id(body: &[u8]) -> u64 {
    u64_at(body, 0)
}

/// Body length of a probe over `route_len` relays: the id plus room for the ack to echo the
/// forward trace, so the ack is never larger than the probe.
pub fn probe_body_len(route_len: usize) -> usize {
    PROBE_ID_LEN + TRACE_ORIGIN_LEN + route_len * TRACE_SLOT_LEN
}

/// The forward trace a probe-ack echoes: origin stamp and slots, as the destination saw them.
pub fn echoed_trace<'a>(ack: &Datagram<'a>) -> (u32, impl Iterator<Item = TraceSlot> + 'a) {
    let body = ack.body();
    let origin = u32_at(body, PROBE_ID_LEN);
    let n = ack.route_len();
    let slots = (0..n).map(move |i| {
        let at = PROBE_ID_LEN + TRACE_ORIGIN_LEN + i * TRACE_SLOT_LEN;
        TraceSlot { tag: u32_at(body, at), delta_us: u32_at(body, at + 4) }
    });
    (origin, slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(b: u8) -> NodeId {
        NodeId([b; NODE_ID_LEN])
    }

    fn any_route() -> impl Strategy<Value = Route> {
        proptest::collection::vec(any::<[u8; 8]>(), 0..=MAX_ROUTE)
            .prop_map(|v| Route::new(&v.into_iter().map(NodeId).collect::<Vec<_>>()).unwrap_or_default())
    }

    /// A valid body for `kind` over `route_len` relays.
    fn body_for(kind: Kind, route_len: usize, fill: u8) -> Vec<u8> {
        let mut body = match kind {
            Kind::Data | Kind::Publish => vec![fill; 40],
            Kind::Subscribe => vec![fill; SUBSCRIPTION_LEN],
            Kind::SubscribeAck => {
                let mut b = vec![0; SUBSCRIBE_ACK_BODY_LEN];
                SubscribeAck { status: SubscribeStatus::GroupFull, stream: 7, publisher: id(fill) }.write(&mut b);
                b
            }
            Kind::Probe | Kind::ProbeAck => vec![fill; probe_body_len(route_len)],
            Kind::Notice => {
                let mut b = vec![0; NOTICE_BODY_LEN];
                Notice { code: NoticeCode::BindRefused, refusal: Some(BindRefusal::ForgedPermit) }.write(&mut b);
                b
            }
            Kind::BindRequest => vec![0; BIND_REQUEST_BODY_LEN],
            Kind::BindChallenge => vec![fill; CHALLENGE_BODY_LEN],
            Kind::BindProof => vec![fill; BIND_PROOF_BODY_LEN],
            Kind::BindAck => {
                let mut b = vec![0; BIND_ACK_BODY_LEN];
                BindAck { expires_at: 77, observed: "[2001:db8::1]:9".parse().unwrap() }.write(&mut b);
                b
            }
        };
        body.truncate(body.len());
        body
    }

    fn emit_vec(h: &Header, route: &Route, origin: u32, body: &[u8]) -> Vec<u8> {
        let mut buf = vec![0; MAX_DATAGRAM];
        let n = emit(&mut buf, h, route, origin, body).unwrap();
        buf.truncate(n);
        buf
    }

    proptest! {
        #[test]
        fn every_kind_round_trips(kind_i in 0usize..Kind::ALL.len(), route in any_route(), src in any::<[u8; 8]>(),
                                  dst in any::<[u8; 8]>(), vc in any::<u32>(), origin in any::<u32>(), fill in any::<u8>()) {
            let kind = Kind::ALL[kind_i];
            let optional_trace = matches!(kind, Kind::Data | Kind::Publish);
            let (route, trace) = if kind.is_routed() { (route, !optional_trace || fill % 2 == 0) } else { (Route::DIRECT, false) };
            let h = Header { kind, source: NodeId(src), destination: NodeId(dst), vc: VcId(vc), trace };
            let body = body_for(kind, route.len(), fill);
            let bytes = emit_vec(&h, &route, origin, &body);
            let d = Datagram::parse(&bytes).unwrap();
            prop_assert_eq!(d.kind(), kind);
            prop_assert_eq!((d.source(), d.destination(), d.vc()), (h.source, h.destination, h.vc));
            prop_assert_eq!(d.route(), route);
            prop_assert_eq!(d.hop(), 0);
            prop_assert_eq!(d.traced(), trace);
            prop_assert_eq!(d.trace_origin(), trace.then_some(origin));
            prop_assert_eq!(d.body(), &body[..]);
            match kind {
                Kind::Notice => prop_assert!(Notice::read(d.body()).is_ok()),
                Kind::BindAck => prop_assert_eq!(BindAck::read(d.body()).unwrap().expires_at, 77),
                Kind::BindChallenge => prop_assert_eq!(Challenge::read(d.body()).cookie, [fill; COOKIE_LEN]),
                Kind::BindProof => prop_assert_eq!(BindProof::read(d.body()).permit.len(), TICKET_LEN),
                Kind::SubscribeAck => prop_assert_eq!(
                    SubscribeAck::read(d.body()).unwrap(),
                    SubscribeAck { status: SubscribeStatus::GroupFull, stream: 7, publisher: id(fill) }
                ),
                _ => {}
            }
            // Truncated at every byte: an error, never a panic.
            for len in 0..bytes.len() {
                let body_free = matches!(kind, Kind::Data | Kind::Publish) && len >= bytes.len() - body.len();
                prop_assert!(Datagram::parse(&bytes[..len]).is_err() || body_free);
            }
        }

        #[test]
        fn stamping_every_hop_fills_the_trace_in_order(route in any_route(), origin in any::<u32>(), step in 1u32..10_000) {
            prop_assume!(!route.is_empty());
            let h = Header { kind: Kind::Data, source: id(1), destination: id(2), vc: VcId(9), trace: true };
            let mut bytes = emit_vec(&h, &route, origin, b"payload");
            let len = bytes.len();
            for i in 0..route.len() {
                stamp_and_advance(&mut bytes, relay_tag(route.relays()[i]), origin.wrapping_add(step * (i as u32 + 1)));
                prop_assert_eq!(bytes.len(), len);
            }
            let d = Datagram::parse(&bytes).unwrap();
            prop_assert_eq!(d.hop(), route.len());
            let slots: Vec<_> = d.trace_slots().collect();
            prop_assert_eq!(slots.len(), route.len());
            for (i, s) in slots.iter().enumerate() {
                prop_assert_eq!(s.tag, relay_tag(route.relays()[i]));
                prop_assert_eq!(s.delta_us, step * (i as u32 + 1));
            }
            prop_assert_eq!(d.body(), b"payload");
        }

        #[test]
        fn an_unbind_and_its_ack_round_trip(src in any::<[u8; 8]>(), dst in any::<[u8; 8]>(), issued_at in any::<u64>(),
                                           cookie in any::<[u8; COOKIE_LEN]>(), permit in any::<[u8; TICKET_LEN]>(),
                                           sig in proptest::collection::vec(any::<u8>(), SIGNATURE_LEN), port in any::<u16>()) {
            let challenge = Challenge { issued_at, cookie };
            let signature = Signature(sig.try_into().unwrap());
            let mut body = [0; BIND_PROOF_BODY_LEN];
            BindProof::write(&challenge, &permit, &signature, &mut body);
            let h = Header { kind: Kind::BindProof, source: NodeId(src), destination: NodeId(dst), vc: VcId(0), trace: false };
            let mut bytes = emit_vec(&h, &Route::DIRECT, 0, &body);
            set_unbind(&mut bytes);
            let d = Datagram::parse(&bytes).unwrap();
            prop_assert!(d.unbind());
            prop_assert_eq!((d.kind(), d.source(), d.destination()), (Kind::BindProof, NodeId(src), NodeId(dst)));
            let p = BindProof::read(d.body());
            prop_assert_eq!(p.challenge, challenge);
            prop_assert_eq!(p.permit, &permit[..]);
            prop_assert_eq!(p.signature, signature);
            // Truncated at every byte: an error, never a panic.
            for len in 0..bytes.len() {
                prop_assert!(Datagram::parse(&bytes[..len]).is_err());
            }
            // Its ack: smaller, and flagged.
            let mut ack_body = [0; BIND_ACK_BODY_LEN];
            let observed = SocketAddr::from(([192, 0, 2, 7], port));
            BindAck { expires_at: 0, observed }.write(&mut ack_body);
            let h = Header { kind: Kind::BindAck, source: NodeId(dst), destination: NodeId(src), vc: VcId(0), trace: false };
            let mut ack = emit_vec(&h, &Route::DIRECT, 0, &ack_body);
            set_unbind(&mut ack);
            prop_assert!(ack.len() < bytes.len());
            let d = Datagram::parse(&ack).unwrap();
            prop_assert!(d.unbind());
            prop_assert_eq!(BindAck::read(d.body()).unwrap(), BindAck { expires_at: 0, observed });
            for len in 0..ack.len() {
                prop_assert!(Datagram::parse(&ack[..len]).is_err());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1400)) {
            if let Ok(d) = Datagram::parse(&bytes) {
                let _ = (d.route(), d.trace_slots().count(), d.body().len());
                prop_assert!(d.route_len() <= MAX_ROUTE && d.hop() <= d.route_len());
            }
        }
    }

    fn data(route: &Route, trace: bool) -> Vec<u8> {
        let h = Header { kind: Kind::Data, source: id(1), destination: id(2), vc: VcId(1), trace };
        emit_vec(&h, route, 5, b"x")
    }

    #[test]
    fn each_malformation_has_its_own_error() {
        let route = Route::new(&[id(10), id(11)]).unwrap();
        let good = data(&route, true);
        let mut b = good.clone();
        b[0] = 2;
        assert_eq!(Datagram::parse(&b).unwrap_err(), ParseError::UnsupportedVersion(2));
        let mut b = good.clone();
        b[1] = 99;
        assert_eq!(Datagram::parse(&b).unwrap_err(), ParseError::UnknownKind(99));
        let mut b = good.clone();
        b[2] |= 0x80;
        assert_eq!(Datagram::parse(&b).unwrap_err(), ParseError::UnknownFlags(0x81));
        let mut b = good.clone();
        b[3] = 0x23; // hop 3 on a route of 2
        assert_eq!(Datagram::parse(&b).unwrap_err(), ParseError::HopPastRoute { hop: 3, route_len: 2 });
        let mut b = good.clone();
        b[3] = 0x50; // a route of 5 relays
        assert_eq!(Datagram::parse(&b).unwrap_err(), ParseError::RouteTooLong(5));
        assert!(matches!(Datagram::parse(&good[..30]), Err(ParseError::Truncated { .. })));
        assert_eq!(Datagram::parse(&vec![0; MAX_DATAGRAM + 1]).unwrap_err(), ParseError::Oversized(MAX_DATAGRAM + 1));
        // A probe must be traced; bind kinds carry no route.
        let h = Header { kind: Kind::Probe, source: id(1), destination: id(2), vc: VcId(0), trace: false };
        let b = emit_vec(&h, &route, 0, &[0; 64]);
        assert_eq!(Datagram::parse(&b).unwrap_err(), ParseError::BadShape(Kind::Probe));
        let h = Header { kind: Kind::BindRequest, source: id(1), destination: id(2), vc: VcId(0), trace: false };
        let mut buf = [0; 100];
        assert_eq!(emit(&mut buf, &h, &route, 0, &[0; 24]), Err(EmitError::Shape(Kind::BindRequest)));
        let b = emit_vec(&h, &Route::DIRECT, 0, &[0; 10]);
        assert!(matches!(Datagram::parse(&b), Err(ParseError::ShortBody { kind: Kind::BindRequest, .. })));
        assert!(Route::new(&[id(1); 5]).is_none());
        // The unbind flag belongs to bind proofs and acks and to subscribes (a leave) only;
        // set_unbind leaves others be.
        for kind in Kind::ALL.into_iter().filter(|k| !matches!(k, Kind::BindProof | Kind::BindAck | Kind::Subscribe)) {
            let route = if kind.is_routed() { Route::new(&[id(10)]).unwrap() } else { Route::DIRECT };
            let h = Header { kind, source: id(1), destination: id(2), vc: VcId(0), trace: kind.is_routed() };
            let mut b = emit_vec(&h, &route, 0, &body_for(kind, route.len(), 0));
            set_unbind(&mut b);
            assert!(!Datagram::parse(&b).unwrap().unbind(), "{kind:?}");
            b[2] |= 0b10;
            assert_eq!(Datagram::parse(&b).unwrap_err(), ParseError::BadShape(kind));
        }
    }

    #[test]
    fn replies_are_never_larger_than_what_provokes_them() {
        for route_len in 0..=MAX_ROUTE {
            let trace = TRACE_ORIGIN_LEN + route_len * TRACE_SLOT_LEN;
            let probe = HEADER_LEN + route_len * ROUTE_ENTRY_LEN + trace + probe_body_len(route_len);
            let ack = HEADER_LEN + route_len * ROUTE_ENTRY_LEN + trace + PROBE_ID_LEN + trace;
            assert!(ack <= probe);
        }
    }
}
