//! Mesh datagrams on the wire: parse into borrowed views at fixed offsets, emit into caller
//! buffers. Nothing here allocates, so the relay hot path can parse, stamp and forward a
//! datagram in the buffer it was received into. The byte layout is specified in
//! `docs/protocol.md`; the constants below are that specification.

use shoal_protocol::NodeId;
use shoal_protocol::identity::{NODE_ID_LEN, SIGNATURE_LEN};
use shoal_protocol::subscription::SUBSCRIPTION_LEN;
use shoal_protocol::ticket::TICKET_LEN;

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
/// Bytes of a bundle entry's length prefix.
pub const BUNDLE_ENTRY_LEN: usize = 2;
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
    /// A relay's copies for one member, several publish datagrams in one (see
    /// [`bundled`]): one send, and one IP and UDP header, for all of them.
    Bundle = 6,
}

impl Kind {
    /// Every kind, in wire order.
    pub const ALL: [Kind; 12] = [
        Kind::Data,
        Kind::Probe,
        Kind::ProbeAck,
        Kind::Notice,
        Kind::Publish,
        Kind::Bundle,
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
            Kind::Bundle => BUNDLE_ENTRY_LEN + HEADER_LEN,
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

pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
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

/// Makes a copy that another relay fanned out to this one (`relay`, fed its group) this
/// relay's own, in place: the destination and the single route entry name `relay`, and the
/// trace slot holds `relay`'s tag and stamp. Members then take it as they take `relay`'s own
/// copies; the publisher's sealed payload is untouched.
///
/// `buf` must hold a [`Kind::Publish`] that [`Datagram::parse`] accepted with one route entry,
/// already crossed; the relay calls this after its checks.
pub fn adopt(buf: &mut [u8], relay: NodeId, tag: u32, now_us: u32) {
    let l = Layout::read(buf);
    debug_assert!(l.route_len == 1 && l.hop == 1);
    buf[12..20].copy_from_slice(&relay.0);
    buf[HEADER_LEN..HEADER_LEN + ROUTE_ENTRY_LEN].copy_from_slice(&relay.0);
    if l.trace {
        let origin = u32_at(buf, l.trace_at());
        let at = l.trace_at() + TRACE_ORIGIN_LEN;
        buf[at..at + 4].copy_from_slice(&tag.to_be_bytes());
        buf[at + 4..at + 8].copy_from_slice(&now_us.wrapping_sub(origin).to_be_bytes());
    }
}

/// The datagrams a [`Kind::Bundle`]'s body holds, each after its length (u16, big-endian), in
/// order. A length that runs past the body ends the iteration with an error.
pub fn bundled(body: &[u8]) -> impl Iterator<Item = Result<&[u8], ParseError>> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= body.len() {
            return None;
        }
        let Some(len) = body.get(at..at + BUNDLE_ENTRY_LEN).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize) else {
            at = body.len();
            return Some(Err(ParseError::Truncated { needed: at + BUNDLE_ENTRY_LEN, got: body.len() }));
        };
        let start = at + BUNDLE_ENTRY_LEN;
        let Some(entry) = body.get(start..start + len) else {
            at = body.len();
            return Some(Err(ParseError::Truncated { needed: start + len, got: body.len() }));
        };
        at = start + len;
        Some(Ok(entry))
    })
}

/// Marks an emitted [`Kind::BindProof`] as an unbind, or a [`Kind::BindAck`] as the answer to
/// one. Other kinds are left as they are (the flag would not parse on them).
pub fn set_unbind(datagram: &mut [u8]) {
    let flaggable = [Kind::BindProof as u8, Kind::BindAck as u8, Kind::Subscribe as u8];
    if datagram.len() >= HEADER_LEN && flaggable.contains(&datagram[1]) {
        datagram[2] |= FLAG_UNBIND;
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

mod body;
#[cfg(test)]
mod tests;

pub use body::{
    BIND_CONTEXT, BindAck, BindProof, BindRefusal, Challenge, Notice, NoticeCode, SubscribeAck, SubscribeStatus,
    UNBIND_CONTEXT, bind_proof_message, read_addr, write_addr,
};
