//! A mesh endpoint: the node side of the mesh plane that later layers (virtual connections,
//! the SDK) build on. It binds to relays, sends payloads over a path (direct, or a source
//! route through relays), receives payloads with their per-hop trace, and probes paths.
//!
//! Sans-IO, with the house call order: after [`Endpoint::handle_datagram`],
//! [`Endpoint::handle_timeout`] or a send, drain [`Endpoint::poll_transmit`] and
//! [`Endpoint::poll_event`] before the next input.
//!
//! ## Reading a trace
//! Every relay writes the microseconds from the sender's origin stamp to its own receipt, on
//! its own clock. With synchronised clocks (one host, or NTP) consecutive differences are the
//! one-way latency of each hop ([`Trace::hop_latencies`]). Probes need no synchronised clocks:
//! each relay stamps the probe on the way out and its ack on the way back, on the same clock,
//! so the difference is that relay's round trip to the destination, and consecutive
//! differences give each hop's round-trip time ([`ProbeReport::hop_rtts`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use shoal_protocol::{Identity, NodeId, SignedSubscription, SignedTicket};

use crate::bind::{BindClient, MappingLife, Transmit};
use crate::clock::WallClock;
use crate::wire::{
    self, Datagram, EmitError, Header, Kind, MAX_DATAGRAM, MAX_ROUTE, Notice, PROBE_ID_LEN, Route, SubscribeAck,
    TRACE_ORIGIN_LEN, TRACE_SLOT_LEN, TraceSlot, VcId,
};

/// How long a probe waits for its ack.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// How a datagram leaves this endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// Straight to the peer's address.
    Direct(SocketAddr),
    /// Through these relays; the first must be one this endpoint is bound to.
    Relayed(Route),
}

impl Path {
    /// The relays crossed (empty when direct).
    pub fn route(&self) -> Route {
        match self {
            Path::Direct(_) => Route::DIRECT,
            Path::Relayed(r) => *r,
        }
    }
}

/// Where and how a payload goes: the addressing of one data datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    /// The receiving node.
    pub destination: NodeId,
    /// Direct, or through relays.
    pub path: Path,
    /// The virtual connection.
    pub vc: VcId,
    /// Whether relays stamp a per-hop trace.
    pub trace: bool,
}

/// The per-hop trace a datagram arrived with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trace {
    /// Sender's origin stamp, in its microseconds (wrapping).
    pub origin_us: u32,
    slots: [TraceSlot; MAX_ROUTE],
    len: u8,
    /// Microseconds from the origin stamp to our receipt, on our clock.
    pub arrival_delta_us: u32,
}

impl Trace {
    fn read(d: &Datagram<'_>, arrival_us: u32) -> Option<Trace> {
        let origin_us = d.trace_origin()?;
        let mut t = Trace {
            origin_us,
            slots: [TraceSlot { tag: 0, delta_us: 0 }; MAX_ROUTE],
            len: 0,
            arrival_delta_us: arrival_us.wrapping_sub(origin_us),
        };
        for s in d.trace_slots() {
            t.slots[t.len as usize] = s;
            t.len += 1;
        }
        Some(t)
    }

    /// The relays' stamps, in hop order.
    pub fn slots(&self) -> &[TraceSlot] {
        &self.slots[..self.len as usize]
    }

    /// One-way latency of each hop (sender → first relay, …, last relay → us). Meaningful when
    /// the clocks involved agree; a hop that comes out negative is reported as zero.
    pub fn hop_latencies(&self) -> Vec<Duration> {
        let mut prev = 0u32;
        let mut out = Vec::with_capacity(self.len as usize + 1);
        for d in self.slots().iter().map(|s| s.delta_us).chain([self.arrival_delta_us]) {
            let hop = d.wrapping_sub(prev);
            out.push(Duration::from_micros(if hop < 1 << 31 { u64::from(hop) } else { 0 }));
            prev = d;
        }
        out
    }
}

/// A payload delivered to this endpoint.
///
/// What the mesh vouches for: a relayed payload came from the relay bound to this endpoint
/// that its route names as the last hop, and that relay forwarded it only from the address the
/// `source` node bound with its permit and a proof of its key. So `source` is as good as the
/// relays' word. A direct payload's `source` is only what its header claims: anyone who can
/// reach our socket can write any source there. Neither is protected against replay by a relay
/// or on-path observer. Virtual connections (the SDK) authenticate every frame end to end on
/// top of this, and drop replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Sending node: vouched for by the relays when `route` is not empty, claimed otherwise.
    pub source: NodeId,
    /// Virtual connection.
    pub vc: VcId,
    /// The relays it crossed.
    pub route: Route,
    /// Where it came from (the last relay, or the peer itself).
    pub from: SocketAddr,
    /// Its trace, if the sender asked for one.
    pub trace: Option<Trace>,
    /// The payload.
    pub payload: Vec<u8>,
    /// Bytes of the whole datagram it came in.
    pub datagram_len: usize,
}

/// Datagrams the endpoint refused, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointCounters {
    /// Not a mesh datagram, or not a valid one.
    pub malformed: u64,
    /// Addressed to another node, or not at the end of its route.
    pub not_for_us: u64,
    /// Relayed datagrams that did not come from the bound relay their route names as the last
    /// hop: replayed or forged from another address.
    pub misrouted: u64,
    /// Bind answers from an address we are not binding to, probe answers that match no probe
    /// of ours, and kinds an endpoint never receives.
    pub unexpected: u64,
    /// Challenges from a relay's address that answered no request of ours (beyond one per
    /// request sent): forged or duplicated. None draws a proof.
    pub unsolicited_challenges: u64,
}

/// The result of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// Probe id, as returned by [`Endpoint::probe`].
    pub id: u64,
    /// The probed node.
    pub destination: NodeId,
    /// The probed route.
    pub route: Route,
    /// Round trip, on our clock.
    pub rtt: Duration,
    /// Round-trip time of each hop, from our side to the destination's: `route.len() + 1`
    /// entries, independent of clock offsets between nodes.
    pub hop_rtts: Vec<Duration>,
    /// The forward trace, as the destination saw it (one-way per-hop latencies).
    pub forward: Trace,
}

/// Something that happened at the endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointEvent {
    /// A relay accepted our binding.
    RelayBound {
        /// The relay.
        relay: NodeId,
        /// Its address.
        addr: SocketAddr,
        /// Our address as the relay saw it.
        observed: SocketAddr,
        /// Whether the relay saw us elsewhere before: our address changed (a new NAT mapping,
        /// a new socket).
        moved: bool,
    },
    /// A payload arrived.
    Received(Received),
    /// A probe came back.
    ProbeDone(ProbeReport),
    /// A relay stopped answering our binds; routes through it no longer work from here.
    RelayLost {
        /// The relay.
        relay: NodeId,
        /// Its address.
        addr: SocketAddr,
    },
    /// A probe got no answer within [`PROBE_TIMEOUT`].
    ProbeLost {
        /// Probe id.
        id: u64,
    },
    /// A copy of a publisher's stream, fanned out by the relay that holds our subscription.
    Published(Received),
    /// A relay answered our subscribe: we are a member of the group, left it, or why not.
    Subscription {
        /// The relay.
        relay: NodeId,
        /// Its answer.
        ack: SubscribeAck,
    },
    /// A relay dropped something of ours and said why. Unauthenticated: a hint.
    Notice {
        /// The relay.
        relay: NodeId,
        /// Why.
        notice: Notice,
        /// The VC of the dropped datagram.
        vc: VcId,
    },
}

/// Why a send failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The route's first relay is not one this endpoint is bound to.
    #[error("not bound to the route's first relay {0}")]
    NotBound(NodeId),
    /// The datagram would not fit.
    #[error(transparent)]
    Emit(#[from] EmitError),
}

#[derive(Debug, Clone, Copy)]
struct PendingProbe {
    destination: NodeId,
    route: Route,
    sent: Instant,
}

/// One endpoint: a node's identity, its bindings to relays, and its probes in flight.
#[derive(Debug)]
pub struct Endpoint {
    identity: Identity,
    permit: SignedTicket,
    clock: WallClock,
    relays: Vec<BindClient>,
    probes: FxHashMap<u64, PendingProbe>,
    next_probe: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<EndpointEvent>,
    /// Our socket's address, once the driver said.
    local: Option<SocketAddr>,
    counters: EndpointCounters,
}

impl Endpoint {
    /// An endpoint for `identity`, which shows `permit` to relays.
    pub fn new(identity: Identity, permit: SignedTicket, clock: WallClock) -> Endpoint {
        Endpoint {
            identity,
            permit,
            clock,
            relays: Vec::new(),
            probes: FxHashMap::default(),
            next_probe: 1,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            local: None,
            counters: EndpointCounters::default(),
        }
    }

    /// Our node id.
    pub fn node_id(&self) -> NodeId {
        self.identity.node_id()
    }

    /// Datagrams refused so far, by reason.
    pub fn counters(&self) -> EndpointCounters {
        let mut c = self.counters;
        c.unsolicited_challenges = self.relays.iter().map(BindClient::unsolicited_challenges).sum();
        c
    }

    /// Replaces the permit (renewed by the control server) and binds again everywhere.
    pub fn set_permit(&mut self, now: Instant, permit: SignedTicket) {
        self.permit = permit;
        for r in &mut self.relays {
            r.refresh(now);
        }
    }

    /// Our socket moved (a new network, a new port): binds again everywhere at once from the
    /// new address, which each relay takes as the node having moved once the proof checks
    /// out.
    pub fn network_changed(&mut self, now: Instant) {
        for r in &mut self.relays {
            r.refresh(now);
        }
    }

    /// Starts binding to the relay at `addr`.
    pub fn add_relay(&mut self, now: Instant, addr: SocketAddr) {
        if !self.relays.iter().any(|r| r.relay() == addr) {
            let mut r = BindClient::new(addr, now);
            if let Some(local) = self.local {
                r.set_local(local);
            }
            self.relays.push(r);
        }
    }

    /// The relays that hold our binding, with their addresses.
    pub fn bound_relays(&self) -> impl Iterator<Item = (NodeId, SocketAddr)> + '_ {
        self.relays.iter().filter(|r| r.is_bound()).filter_map(|r| Some((r.relay_id()?, r.relay())))
    }

    /// The relays that hold our binding, with the round-trip time each last measured.
    pub fn relay_rtts(&self) -> impl Iterator<Item = (NodeId, SocketAddr, Duration)> + '_ {
        self.relays.iter().filter(|r| r.is_bound()).filter_map(|r| Some((r.relay_id()?, r.relay(), r.rtt()?)))
    }

    /// Our address as seen by a relay, once bound.
    pub fn observed_address(&self) -> Option<SocketAddr> {
        self.relays.iter().find_map(|r| r.bound().map(|b| b.observed))
    }

    /// A relayed datagram goes to relay `to`: our NAT's mapping towards it is fresh.
    fn note_sent(&mut self, now: Instant, to: SocketAddr) {
        if let Some(r) = self.relays.iter_mut().find(|r| r.relay() == to) {
            r.on_sent(now);
        }
    }

    /// Tells the endpoint its socket's address (at start, and after the socket moved), from
    /// which the relay bindings tell whether a NAT sits in front and how long its mappings
    /// live, and fit their keepalives to that.
    pub fn set_local_addr(&mut self, local: SocketAddr) {
        self.local = Some(local);
        for r in &mut self.relays {
            r.set_local(local);
        }
    }

    /// The keepalive interval of the binding to the relay at `relay`, and what it has
    /// measured of the NAT's mapping lifetime.
    pub fn keepalive(&self, relay: SocketAddr) -> Option<(Duration, MappingLife)> {
        let r = self.relays.iter().find(|r| r.relay() == relay)?;
        Some((r.keepalive(), r.mapping_life()))
    }

    fn first_hop(&self, path: &Path) -> Result<SocketAddr, SendError> {
        match path {
            Path::Direct(addr) => Ok(*addr),
            Path::Relayed(route) => {
                let first = route.relays().first().copied().unwrap_or(NodeId([0; 8]));
                self.relays
                    .iter()
                    .find(|r| r.is_bound() && r.relay_id() == Some(first))
                    .map(BindClient::relay)
                    .ok_or(SendError::NotBound(first))
            }
        }
    }

    /// Writes a data datagram into `buf` without allocating; returns where to send it and its
    /// length. The tokio driver sends from its own buffers with this.
    pub fn encode_data(
        &mut self,
        now: Instant,
        env: &Envelope,
        payload: &[u8],
        buf: &mut [u8],
    ) -> Result<(SocketAddr, usize), SendError> {
        let to = self.first_hop(&env.path)?;
        let h = Header {
            kind: Kind::Data,
            source: self.node_id(),
            destination: env.destination,
            vc: env.vc,
            trace: env.trace,
        };
        let route = env.path.route();
        let len = wire::emit(buf, &h, &route, self.clock.stamp_us(now), payload)?;
        if !route.is_empty() {
            self.note_sent(now, to);
        }
        Ok((to, len))
    }

    /// Queues a data datagram (see [`Endpoint::poll_transmit`]).
    pub fn send(&mut self, now: Instant, env: &Envelope, payload: &[u8]) -> Result<(), SendError> {
        let mut buf = vec![0; MAX_DATAGRAM];
        let (to, len) = self.encode_data(now, env, payload, &mut buf)?;
        buf.truncate(len);
        self.transmits.push_back(Transmit { to, bytes: buf });
        Ok(())
    }

    /// The address of the relay `relay`, if we are bound to it.
    fn bound_relay(&self, relay: NodeId) -> Result<SocketAddr, SendError> {
        self.first_hop(&Path::Relayed(Route::new(&[relay]).unwrap_or_default()))
    }

    /// Presents `subscription` to the relay it names (which must hold our binding), to join
    /// its group, or with `leave` to leave it. The answer comes as
    /// [`EndpointEvent::Subscription`].
    pub fn subscribe(&mut self, now: Instant, subscription: &SignedSubscription, leave: bool) -> Result<(), SendError> {
        let relay = subscription.body.relay;
        let to = self.bound_relay(relay)?;
        let h = Header { kind: Kind::Subscribe, source: self.node_id(), destination: relay, vc: VcId(0), trace: false };
        let mut buf = vec![0; MAX_DATAGRAM];
        let len = wire::emit(&mut buf, &h, &Route::DIRECT, 0, &subscription.encode())?;
        buf.truncate(len);
        if leave {
            wire::set_unbind(&mut buf);
        }
        self.note_sent(now, to);
        self.transmits.push_back(Transmit { to, bytes: buf });
        Ok(())
    }

    /// Queues `payload` for the fan-out group of our `stream` at `relay`: the relay copies it
    /// to every member the control server subscribed.
    pub fn publish(
        &mut self,
        now: Instant,
        relay: NodeId,
        stream: u16,
        trace: bool,
        payload: &[u8],
    ) -> Result<(), SendError> {
        let mut buf = vec![0; MAX_DATAGRAM];
        let (to, len) = self.encode_publish(now, relay, stream, trace, payload, &mut buf)?;
        buf.truncate(len);
        self.transmits.push_back(Transmit { to, bytes: buf });
        Ok(())
    }

    /// Writes a publish datagram into `buf` without queueing it (see [`Endpoint::publish`]);
    /// returns where to send it and its length.
    pub fn encode_publish(
        &mut self,
        now: Instant,
        relay: NodeId,
        stream: u16,
        trace: bool,
        payload: &[u8],
        buf: &mut [u8],
    ) -> Result<(SocketAddr, usize), SendError> {
        let to = self.bound_relay(relay)?;
        let route = Route::new(&[relay]).unwrap_or_default();
        let h =
            Header { kind: Kind::Publish, source: self.node_id(), destination: relay, vc: VcId(stream.into()), trace };
        let len = wire::emit(buf, &h, &route, self.clock.stamp_us(now), payload)?;
        self.note_sent(now, to);
        Ok((to, len))
    }

    /// Queues a probe of `path` to `destination`; its report comes as
    /// [`EndpointEvent::ProbeDone`] or [`EndpointEvent::ProbeLost`]. Returns the probe id.
    pub fn probe(&mut self, now: Instant, destination: NodeId, path: &Path) -> Result<u64, SendError> {
        let to = self.first_hop(path)?;
        let route = path.route();
        let id = self.next_probe;
        self.next_probe += 1;
        let mut body = vec![0; wire::probe_body_len(route.len())];
        body[..PROBE_ID_LEN].copy_from_slice(&id.to_be_bytes());
        let h = Header { kind: Kind::Probe, source: self.node_id(), destination, vc: VcId(0), trace: true };
        let mut buf = vec![0; MAX_DATAGRAM];
        let len = wire::emit(&mut buf, &h, &route, self.clock.stamp_us(now), &body)?;
        buf.truncate(len);
        self.transmits.push_back(Transmit { to, bytes: buf });
        if !route.is_empty() {
            self.note_sent(now, to);
        }
        self.probes.insert(id, PendingProbe { destination, route, sent: now });
        Ok(id)
    }

    /// Handles one received datagram.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let Ok(d) = Datagram::parse(bytes) else {
            self.counters.malformed += 1;
            return;
        };
        let me = self.node_id();
        if d.kind() == Kind::Publish {
            self.take_copy(from, &d, bytes.len(), now);
            return;
        }
        if d.kind() == Kind::Bundle {
            self.take_bundle(from, &d, now);
            return;
        }
        if d.destination() != me || d.hop() != d.route_len() {
            self.counters.not_for_us += 1;
            return;
        }
        if matches!(d.kind(), Kind::Data | Kind::Probe | Kind::ProbeAck) && !self.came_from_last_hop(&d, from) {
            self.counters.misrouted += 1;
            return;
        }
        let arrival = self.clock.stamp_us(now);
        match d.kind() {
            Kind::Data => self.events.push_back(EndpointEvent::Received(Received {
                source: d.source(),
                vc: d.vc(),
                route: d.route(),
                from,
                trace: Trace::read(&d, arrival),
                payload: d.body().to_vec(),
                datagram_len: bytes.len(),
            })),
            Kind::Probe => self.answer_probe(now, from, &d),
            Kind::ProbeAck => self.finish_probe(now, &d, arrival),
            Kind::BindChallenge | Kind::BindAck => {
                let (id, perm, clock) = (&self.identity, &self.permit, &self.clock);
                let Some(relay) = self.relays.iter_mut().find(|r| r.relay() == from) else {
                    self.counters.unexpected += 1;
                    return;
                };
                let before = relay.bound();
                let seen_before = relay.last_observed();
                if let Some(t) = relay.handle_datagram(now, clock, &d, id, perm) {
                    self.transmits.push_back(t);
                }
                if let (Some(now_bound), Some(rid)) = (relay.bound(), relay.relay_id())
                    && before.map(|b| b.observed) != Some(now_bound.observed)
                {
                    self.events.push_back(EndpointEvent::RelayBound {
                        relay: rid,
                        addr: from,
                        observed: now_bound.observed,
                        moved: seen_before.is_some_and(|s| s != now_bound.observed),
                    });
                }
            }
            Kind::Notice => match Notice::read(d.body()) {
                Ok(notice) => {
                    let relay = d.source();
                    if let Some(r) = self.relays.iter_mut().find(|r| r.relay() == from) {
                        match notice.code {
                            // The relay lost our binding (restart, expiry): bind again now.
                            wire::NoticeCode::NotBound | wire::NoticeCode::PermitExpired if r.is_bound() => {
                                r.restart(now)
                            }
                            wire::NoticeCode::BindRefused => r.refused(now),
                            _ => {}
                        }
                    }
                    self.events.push_back(EndpointEvent::Notice { relay, notice, vc: d.vc() });
                }
                Err(_) => self.counters.malformed += 1,
            },
            Kind::SubscribeAck => match SubscribeAck::read(d.body()) {
                Ok(ack) if self.relays.iter().any(|r| r.relay() == from && r.relay_id() == Some(d.source())) => {
                    self.events.push_back(EndpointEvent::Subscription { relay: d.source(), ack });
                }
                Ok(_) => self.counters.unexpected += 1,
                Err(_) => self.counters.malformed += 1,
            },
            Kind::BindRequest | Kind::BindProof | Kind::Subscribe | Kind::Publish | Kind::Bundle => {
                self.counters.unexpected += 1
            }
        }
    }

    /// A copy from a fan-out group: taken only from the bound relay its route ends with, which
    /// checked the publisher's binding and our subscription, and addressed to that relay's
    /// group (a publish names the relay as its destination, so one buffer serves every copy).
    fn take_copy(&mut self, from: SocketAddr, d: &Datagram<'_>, datagram_len: usize, now: Instant) {
        let route = d.route();
        if d.hop() != d.route_len() || route.relays().last() != Some(&d.destination()) {
            self.counters.not_for_us += 1;
            return;
        }
        if !self.came_from_last_hop(d, from) {
            self.counters.misrouted += 1;
            return;
        }
        let arrival = self.clock.stamp_us(now);
        self.events.push_back(EndpointEvent::Published(Received {
            source: d.source(),
            vc: d.vc(),
            route,
            from,
            trace: Trace::read(d, arrival),
            payload: d.body().to_vec(),
            datagram_len,
        }));
    }

    /// A relay's bundle of copies for us: taken only from a bound relay, at the address we bound
    /// it at, naming itself as the source; then each copy inside as if it had come alone (each
    /// must name that relay as the one it crossed). A copy's share of the bundle's headers is
    /// not counted in its length.
    fn take_bundle(&mut self, from: SocketAddr, d: &Datagram<'_>, now: Instant) {
        let relay = d.source();
        if d.destination() != self.node_id()
            || !self.relays.iter().any(|r| r.is_bound() && r.relay_id() == Some(relay) && r.relay() == from)
        {
            self.counters.misrouted += 1;
            return;
        }
        for entry in wire::bundled(d.body()) {
            match entry.and_then(Datagram::parse) {
                Ok(copy) if copy.kind() == Kind::Publish => self.take_copy(from, &copy, copy.as_bytes().len(), now),
                Ok(_) => self.counters.unexpected += 1,
                Err(_) => self.counters.malformed += 1,
            }
        }
    }

    /// Whether a datagram that crossed relays came from the relay its route ends with, at the
    /// address we bound it at. Only that relay checked the sender's binding; a copy sent from
    /// anywhere else is a replay or a forgery. Direct datagrams pass: their source is a claim.
    fn came_from_last_hop(&self, d: &Datagram<'_>, from: SocketAddr) -> bool {
        let route = d.route();
        let Some(&last) = route.relays().last() else { return true };
        self.relays.iter().any(|r| r.is_bound() && r.relay_id() == Some(last) && r.relay() == from)
    }

    /// Answers a probe over the reversed route with an ack that echoes its forward trace. The
    /// probe reserved room for the echo, so the ack is exactly as large as the probe.
    fn answer_probe(&mut self, now: Instant, from: SocketAddr, d: &Datagram<'_>) {
        let route = d.route().reversed();
        let n = route.len();
        let mut body = vec![0; wire::probe_body_len(n)];
        body[..PROBE_ID_LEN].copy_from_slice(&d.body()[..PROBE_ID_LEN]);
        let origin = d.trace_origin().unwrap_or(0);
        body[PROBE_ID_LEN..PROBE_ID_LEN + TRACE_ORIGIN_LEN].copy_from_slice(&origin.to_be_bytes());
        for (i, s) in d.trace_slots().enumerate() {
            let at = PROBE_ID_LEN + TRACE_ORIGIN_LEN + i * TRACE_SLOT_LEN;
            body[at..at + 4].copy_from_slice(&s.tag.to_be_bytes());
            body[at + 4..at + 8].copy_from_slice(&s.delta_us.to_be_bytes());
        }
        let h =
            Header { kind: Kind::ProbeAck, source: self.node_id(), destination: d.source(), vc: d.vc(), trace: true };
        let mut buf = vec![0; MAX_DATAGRAM];
        if let Ok(len) = wire::emit(&mut buf, &h, &route, self.clock.stamp_us(now), &body) {
            buf.truncate(len);
            self.transmits.push_back(Transmit { to: from, bytes: buf });
        }
    }

    fn finish_probe(&mut self, now: Instant, d: &Datagram<'_>, arrival: u32) {
        let id = wire::probe_id(d.body());
        let Some(p) = self.probes.get(&id).copied() else {
            self.counters.unexpected += 1;
            return;
        };
        if d.source() != p.destination || d.route().reversed() != p.route {
            self.counters.unexpected += 1;
            return;
        }
        self.probes.remove(&id);
        let rtt = now.saturating_duration_since(p.sent);
        let (fwd_origin, fwd_slots) = wire::echoed_trace(d);
        let mut forward = Trace {
            origin_us: fwd_origin,
            slots: [TraceSlot { tag: 0, delta_us: 0 }; MAX_ROUTE],
            len: 0,
            arrival_delta_us: 0,
        };
        for s in fwd_slots {
            forward.slots[forward.len as usize] = s;
            forward.len += 1;
        }
        let back = Trace::read(d, arrival);
        // Each relay's round trip to the destination: its stamp on the ack minus its stamp on
        // the probe, both on its own clock. Relay i of the forward route is slot n-1-i of the
        // ack's trace.
        let n = p.route.len();
        let mut through = Vec::with_capacity(n + 2);
        through.push(rtt.as_micros() as i64);
        if let Some(back) = back {
            for i in 0..n {
                let f = fwd_origin.wrapping_add(forward.slots[i].delta_us);
                let b = back.origin_us.wrapping_add(back.slots().get(n - 1 - i).map_or(0, |s| s.delta_us));
                through.push(i64::from(b.wrapping_sub(f) as i32));
            }
        }
        through.push(0);
        let hop_rtts = through.windows(2).map(|w| Duration::from_micros((w[0] - w[1]).max(0) as u64)).collect();
        self.events.push_back(EndpointEvent::ProbeDone(ProbeReport {
            id,
            destination: p.destination,
            route: p.route,
            rtt,
            hop_rtts,
            forward,
        }));
    }

    /// Drives binds and expires probes.
    pub fn handle_timeout(&mut self, now: Instant) {
        for r in &mut self.relays {
            let was_bound = r.is_bound();
            if let Some(t) = r.handle_timeout(now, &self.identity, &self.permit) {
                self.transmits.push_back(t);
            }
            if let (true, false, Some(relay)) = (was_bound, r.is_bound(), r.relay_id()) {
                self.events.push_back(EndpointEvent::RelayLost { relay, addr: r.relay() });
            }
        }
        let events = &mut self.events;
        self.probes.retain(|id, p| {
            let alive = now.saturating_duration_since(p.sent) < PROBE_TIMEOUT;
            if !alive {
                events.push_back(EndpointEvent::ProbeLost { id: *id });
            }
            alive
        });
    }

    /// When [`Endpoint::handle_timeout`] is next due.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let binds = self.relays.iter().map(BindClient::poll_timeout);
        let probes = self.probes.values().map(|p| p.sent + PROBE_TIMEOUT);
        binds.chain(probes).min()
    }

    /// Datagrams to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Events since the last poll.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<EndpointEvent> {
        self.events.pop_front()
    }
}

impl Endpoint {
    /// Unbinds for every relay holding our binding, for the driver to send as the node stops
    /// (a session signing out): each relay lets go of the binding at once instead of at its
    /// idle expiry. Nothing changes here, so a node that keeps running binds again at its next
    /// keepalive.
    #[must_use]
    pub fn unbind_all(&self) -> Vec<Transmit> {
        self.relays.iter().filter_map(|r| r.unbind(&self.identity, &self.permit)).collect()
    }
}
