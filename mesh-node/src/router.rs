//! The relay's brain: decides, for each received datagram, whether to forward it (and where),
//! answer it (bind handshake, notices) or drop it, and counts every outcome.
//!
//! Sans-IO. The driver calls, for each datagram, [`Router::handle_datagram`] with the
//! receive buffer; the router checks and stamps it **in place** and returns a [`Verdict`]. A
//! reply is written over the received bytes and is never longer than them, so a relay cannot
//! be used to amplify traffic. Besides that hot path the driver calls
//! [`Router::handle_timeout`] when [`Router::poll_timeout`] says, and drains
//! [`Router::poll_transmit`] (binds to peer relays) and [`Router::poll_event`] after every
//! call, before the next input.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ring::hmac;
use rustc_hash::FxHashMap;
use shoal_protocol::{Identity, NodeId, PublicKey, Roles, SignedTicket, TicketError, TicketKind, UnixTime};

use crate::bind::{BindClient, Transmit};
use crate::clock::WallClock;
use crate::metrics::{Counters, DropReason};
use crate::wire::{
    self, BindAck, BindProof, BindRefusal, COOKIE_LEN, Challenge, Datagram, Header, Kind, Notice, NoticeCode,
    ParseError, Route, VcId,
};

/// How long a bind challenge's cookie stays valid.
const COOKIE_LIFETIME_SECS: u64 = 30;
/// Sources with a rate limit of their own, per binding the relay allows.
const SOURCES_PER_BINDING: usize = 4;

/// A token-bucket rate: sustained `per_sec`, bursts up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained tokens per second.
    pub per_sec: f64,
    /// Bucket capacity.
    pub burst: f64,
}

/// A token bucket. Starts full.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: &Rate, now: Instant) -> TokenBucket {
        TokenBucket { tokens: rate.burst, last: now }
    }

    /// Takes `cost` tokens if the bucket holds them.
    pub(crate) fn take(&mut self, rate: &Rate, now: Instant, cost: f64) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate.per_sec).min(rate.burst);
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }

    fn is_full(&self, rate: &Rate, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * rate.per_sec >= rate.burst
    }
}

/// Validated relay configuration.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The relay's identity.
    pub identity: Identity,
    /// The relay's own permit (kind relay permit, role relay), shown to peer relays. Without
    /// one (a relay waiting for the control server to issue it) it binds to no peer relay.
    pub permit: Option<SignedTicket>,
    /// The control server's public key: the only key whose tickets the relay trusts.
    pub control_key: PublicKey,
    /// Per-source limit in datagrams.
    pub source_packets: Rate,
    /// Per-source limit in bytes.
    pub source_bytes: Rate,
    /// Limit on bind proofs verified (two signature checks each), across all sources.
    pub bind_verifications: Rate,
    /// Limit on notices sent, across all destinations.
    pub notices: Rate,
    /// Most bindings held at once.
    pub max_bindings: usize,
    /// Secret for bind cookies. Every worker of one relay must share it.
    pub cookie_secret: [u8; 32],
}

/// What the driver does with the datagram it passed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    /// Send the (stamped) buffer to this address.
    Forward(SocketAddr),
    /// Send the first `len` bytes of the buffer, now a reply, back to the sender.
    Reply(usize),
    /// Drop it; the reason was counted.
    Drop(DropReason),
    /// Drop it (counted), and send the first `len` bytes of the buffer, now a notice saying
    /// why, back to the sender.
    DropWithNotice(DropReason, usize),
    /// The router took the datagram for itself (a peer relay's answer to our bind); nothing
    /// to send now, but drain [`Router::poll_transmit`].
    Consumed,
}

/// Something the driver or operator may want to know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouterEvent {
    /// A node proved its permit and is reachable at `addr` until `expires_at` (Unix seconds).
    /// With several workers the driver hands this to the others' [`Router::apply_binding`].
    Bound {
        /// The node.
        node: NodeId,
        /// Its roles.
        roles: Roles,
        /// Where it sends from.
        addr: SocketAddr,
        /// When the binding lapses, in Unix seconds.
        expires_at: u64,
    },
    /// This relay's binding to a peer relay was acknowledged.
    PeerBound {
        /// The peer's address.
        addr: SocketAddr,
        /// The peer's id.
        peer: NodeId,
    },
}

/// The fields the forwarding decision reads, copied out of the datagram so that the buffer
/// can then be stamped in place.
#[derive(Debug, Clone, Copy)]
struct Hot {
    source: NodeId,
    hop: usize,
    route_len: usize,
    /// Whether the route names this relay at the current hop.
    on_route: bool,
    /// The next relay, or the destination after the last relay.
    next_hop: NodeId,
    next_is_relay: bool,
    origin: Option<u32>,
    /// The previous relay's stamp (0 at the first hop).
    prev_delta: u32,
}

impl Hot {
    fn read(d: &Datagram<'_>, me: NodeId) -> Hot {
        let (hop, route_len) = (d.hop(), d.route_len());
        let next_is_relay = hop + 1 < route_len;
        Hot {
            source: d.source(),
            hop,
            route_len,
            on_route: hop < route_len && d.route_at(hop) == me,
            next_hop: if next_is_relay { d.route_at(hop + 1) } else { d.destination() },
            next_is_relay,
            origin: d.trace_origin(),
            prev_delta: d.trace_slots().last().map_or(0, |s| s.delta_us),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Binding {
    node: NodeId,
    roles: Roles,
    expires: Instant,
}

/// The relay's routing state machine. See the module docs for the call order.
#[derive(Debug)]
pub struct Router {
    cfg: RouterConfig,
    id: NodeId,
    tag: u32,
    clock: WallClock,
    cookie_key: hmac::Key,
    /// Who sends from each address.
    by_addr: FxHashMap<SocketAddr, Binding>,
    /// Where each bound node is reached.
    by_node: FxHashMap<NodeId, SocketAddr>,
    /// Packet and byte buckets per source node.
    buckets: FxHashMap<NodeId, (TokenBucket, TokenBucket)>,
    bind_bucket: TokenBucket,
    notice_bucket: TokenBucket,
    /// Our own bindings to peer relays.
    peers: Vec<BindClient>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<RouterEvent>,
    counters: Counters,
    next_sweep: Instant,
    /// Whether this router binds to peer relays (one worker per relay does).
    peer_owner: bool,
}

impl Router {
    /// A router with no bindings. `clock` maps `now` to Unix time for tickets and stamps.
    pub fn new(cfg: RouterConfig, clock: WallClock, now: Instant) -> Router {
        let id = cfg.identity.node_id();
        Router {
            id,
            tag: wire::relay_tag(id),
            clock,
            cookie_key: hmac::Key::new(hmac::HMAC_SHA256, &cfg.cookie_secret),
            by_addr: FxHashMap::default(),
            by_node: FxHashMap::default(),
            buckets: FxHashMap::default(),
            bind_bucket: TokenBucket::new(&cfg.bind_verifications, now),
            notice_bucket: TokenBucket::new(&cfg.notices, now),
            peers: Vec::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            counters: Counters::default(),
            next_sweep: now + Duration::from_secs(1),
            peer_owner: true,
            cfg,
        }
    }

    /// This relay's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Replaces the wall-clock anchor (drivers re-read the system clock now and then).
    pub fn set_clock(&mut self, clock: WallClock) {
        self.clock = clock;
    }

    /// Counters since start.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Counters, for the driver to add its own (send failures).
    pub fn counters_mut(&mut self) -> &mut Counters {
        &mut self.counters
    }

    /// Whether this router binds to peer relays. With several workers sharing one port, one
    /// owns the peer binds and the others hand it the peers' replies; the default is `true`.
    pub fn set_peer_owner(&mut self, owner: bool) {
        self.peer_owner = owner;
    }

    /// Number of nodes bound here.
    pub fn bindings(&self) -> usize {
        self.by_node.len()
    }

    /// Where a bound node is reached.
    pub fn lookup(&self, node: NodeId) -> Option<SocketAddr> {
        self.by_node.get(&node).copied()
    }

    /// Starts binding to a peer relay at `addr`, so that it accepts datagrams we forward.
    pub fn add_peer(&mut self, addr: SocketAddr, now: Instant) {
        if !self.peers.iter().any(|p| p.relay() == addr) {
            self.peers.push(BindClient::new(addr, now));
        }
    }

    /// Replaces this relay's own permit (issued or renewed by the control server) and binds to
    /// every peer relay again with it.
    pub fn set_permit(&mut self, now: Instant, permit: SignedTicket) {
        self.cfg.permit = Some(permit);
        for p in &mut self.peers {
            p.refresh(now);
        }
    }

    /// The peer relays that hold our binding, with the round-trip time each last measured.
    pub fn peer_rtts(&self) -> impl Iterator<Item = (NodeId, SocketAddr, Duration)> + '_ {
        self.peers.iter().filter(|p| p.is_bound()).filter_map(|p| Some((p.relay_id()?, p.relay(), p.rtt()?)))
    }

    /// Adopts a binding another worker of this relay verified (see [`RouterEvent::Bound`]).
    pub fn apply_binding(&mut self, now: Instant, node: NodeId, roles: Roles, addr: SocketAddr, expires_at: u64) {
        let left = expires_at.saturating_sub(self.clock.unix_secs(now));
        self.insert_binding(addr, Binding { node, roles, expires: now + Duration::from_secs(left) });
        if roles.contains(Roles::RELAY) && self.peer_owner {
            self.add_peer(addr, now);
        }
    }

    /// Router-originated datagrams (binds to peer relays).
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Events since the last poll.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<RouterEvent> {
        self.events.pop_front()
    }

    /// When [`Router::handle_timeout`] is next due.
    #[must_use]
    pub fn poll_timeout(&self) -> Instant {
        self.peers.iter().map(BindClient::poll_timeout).fold(self.next_sweep, Instant::min)
    }

    /// Drives peer binds and drops lapsed bindings and idle rate-limit state.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(permit) = &self.cfg.permit {
            for p in &mut self.peers {
                if let Some(t) = p.handle_timeout(now, &self.cfg.identity, permit) {
                    self.transmits.push_back(t);
                }
            }
        }
        if now >= self.next_sweep {
            self.next_sweep = now + Duration::from_secs(1);
            let by_node = &mut self.by_node;
            self.by_addr.retain(|addr, b| {
                let keep = b.expires > now;
                if !keep && by_node.get(&b.node) == Some(addr) {
                    by_node.remove(&b.node);
                }
                keep
            });
            let (pr, br) = (self.cfg.source_packets, self.cfg.source_bytes);
            self.buckets.retain(|_, (p, b)| !(p.is_full(&pr, now) && b.is_full(&br, now)));
        }
    }

    /// Decides what to do with one datagram received from `from`, held in `buf`.
    ///
    /// On [`Verdict::Forward`] the buffer has been stamped and is ready to send unchanged in
    /// length; on [`Verdict::Reply`] its prefix has been overwritten with the reply.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, buf: &mut [u8]) -> Verdict {
        let verdict = self.decide(now, from, buf);
        match verdict {
            Verdict::Forward(_) => {
                self.counters.forwarded_packets += 1;
                self.counters.forwarded_bytes += buf.len() as u64;
            }
            Verdict::Reply(_) => self.counters.replies += 1,
            Verdict::Consumed => {}
            Verdict::Drop(reason) => self.counters.drop(reason),
            Verdict::DropWithNotice(reason, _) => {
                self.counters.drop(reason);
                self.counters.notices_sent += 1;
            }
        }
        verdict
    }

    fn decide(&mut self, now: Instant, from: SocketAddr, buf: &mut [u8]) -> Verdict {
        let hot = match Datagram::parse(buf) {
            Ok(d) if d.kind().is_routed() => Hot::read(&d, self.id),
            Ok(d) => {
                return match d.kind() {
                    Kind::BindRequest => self.challenge(now, from, buf),
                    Kind::BindProof => self.accept_proof(now, from, buf),
                    Kind::BindChallenge | Kind::BindAck => self.peer_bind_reply(now, from, buf),
                    _ => self.peer_notice(now, from, buf),
                };
            }
            Err(e) => return Verdict::Drop(DropReason::Malformed(ParseErrorKind::of(&e))),
        };
        self.forward(now, from, buf, hot)
    }

    /// The hot path: every check on the fields read once, then stamp in place.
    fn forward(&mut self, now: Instant, from: SocketAddr, buf: &mut [u8], d: Hot) -> Verdict {
        let Some(binding) = self.by_addr.get(&from).copied() else {
            return self.refuse(now, buf, DropReason::NotBound, NoticeCode::NotBound);
        };
        if binding.expires <= now {
            return self.refuse(now, buf, DropReason::PermitExpired, NoticeCode::PermitExpired);
        }
        let from_relay = binding.roles.contains(Roles::RELAY);
        if !from_relay && (d.source != binding.node || d.hop != 0) {
            return Verdict::Drop(DropReason::SourceMismatch);
        }
        if d.hop >= d.route_len {
            return Verdict::Drop(DropReason::HopLimit);
        }
        if !d.on_route {
            return Verdict::Drop(DropReason::NotOnRoute);
        }
        let Some(next) = self.by_node.get(&d.next_hop).copied() else {
            return self.refuse(now, buf, DropReason::UnknownNextHop, NoticeCode::UnknownNextHop);
        };
        if d.next_is_relay && !self.by_addr.get(&next).is_some_and(|b| b.roles.contains(Roles::RELAY)) {
            return self.refuse(now, buf, DropReason::UnknownNextHop, NoticeCode::UnknownNextHop);
        }
        // A peer relay forwards for sources it vouches for, and a hostile one could name a new
        // source in every datagram. Once the table is full, a source not in it is charged to
        // the relay that brought it, so memory stays bounded and the flood stays limited.
        let mut key = d.source;
        if from_relay && self.buckets.len() >= self.max_sources() && !self.buckets.contains_key(&key) {
            key = binding.node;
            self.counters.sources_over_cap += 1;
        }
        let (pr, br) = (self.cfg.source_packets, self.cfg.source_bytes);
        let (packets, bytes) =
            self.buckets.entry(key).or_insert_with(|| (TokenBucket::new(&pr, now), TokenBucket::new(&br, now)));
        if !packets.take(&pr, now, 1.0) || !bytes.take(&br, now, buf.len() as f64) {
            return Verdict::Drop(DropReason::RateLimited);
        }
        let stamp = self.clock.stamp_us(now);
        if let Some(origin) = d.origin {
            let hop_us = stamp.wrapping_sub(origin).wrapping_sub(d.prev_delta);
            // A hop "shorter than zero" means the clocks disagree; such samples are not kept.
            if hop_us < 1 << 31 {
                self.counters.hop_latency.record(u64::from(hop_us));
            }
        }
        wire::stamp_and_advance(buf, self.tag, stamp);
        Verdict::Forward(next)
    }

    /// How many sources get a rate limit of their own: the nodes bound here plus those peer
    /// relays forward for, a few per binding.
    fn max_sources(&self) -> usize {
        self.cfg.max_bindings.saturating_mul(SOURCES_PER_BINDING)
    }

    /// Rate-limit state currently held (one entry per source seen recently).
    #[must_use]
    pub fn rate_limited_sources(&self) -> usize {
        self.buckets.len()
    }

    /// Drops with a notice to the sender, if the notice budget allows and the notice is no
    /// larger than what provoked it.
    fn refuse(&mut self, now: Instant, buf: &mut [u8], reason: DropReason, code: NoticeCode) -> Verdict {
        self.refuse_with(now, buf, reason, Notice { code, refusal: None })
    }

    fn refuse_with(&mut self, now: Instant, buf: &mut [u8], reason: DropReason, notice: Notice) -> Verdict {
        if buf.len() < wire::HEADER_LEN + wire::NOTICE_BODY_LEN || !self.notice_bucket.take(&self.cfg.notices, now, 1.0)
        {
            return Verdict::Drop(reason);
        }
        let Ok(d) = Datagram::parse(buf) else { return Verdict::Drop(reason) };
        let (to, vc) = (d.source(), d.vc());
        let mut body = [0; wire::NOTICE_BODY_LEN];
        notice.write(&mut body);
        match self.write_reply(buf, Kind::Notice, to, vc, &body) {
            Verdict::Reply(n) => Verdict::DropWithNotice(reason, n),
            _ => Verdict::Drop(reason),
        }
    }

    /// Overwrites `buf` with a direct datagram from this relay to `to`.
    fn write_reply(&self, buf: &mut [u8], kind: Kind, to: NodeId, vc: VcId, body: &[u8]) -> Verdict {
        let h = Header { kind, source: self.id, destination: to, vc, trace: false };
        match wire::emit(buf, &h, &Route::DIRECT, 0, body) {
            Ok(n) => Verdict::Reply(n),
            Err(_) => Verdict::Drop(DropReason::Internal),
        }
    }

    fn cookie(&self, from: SocketAddr, node: NodeId, issued_at: u64) -> [u8; COOKIE_LEN] {
        let mut ctx = hmac::Context::with_key(&self.cookie_key);
        match from {
            SocketAddr::V4(a) => ctx.update(&a.ip().octets()),
            SocketAddr::V6(a) => ctx.update(&a.ip().octets()),
        }
        ctx.update(&from.port().to_be_bytes());
        ctx.update(&node.0);
        ctx.update(&issued_at.to_be_bytes());
        let mut c = [0; COOKIE_LEN];
        c.copy_from_slice(&ctx.sign().as_ref()[..COOKIE_LEN]);
        c
    }

    /// Answers a bind request with a stateless challenge of the same size.
    fn challenge(&mut self, now: Instant, from: SocketAddr, buf: &mut [u8]) -> Verdict {
        let Ok(d) = Datagram::parse(buf) else { return Verdict::Drop(DropReason::Internal) };
        let node = d.source();
        let issued_at = self.clock.unix_secs(now);
        let mut body = [0; wire::CHALLENGE_BODY_LEN];
        Challenge { issued_at, cookie: self.cookie(from, node, issued_at) }.write(&mut body);
        self.write_reply(buf, Kind::BindChallenge, node, VcId(0), &body)
    }

    /// Handles a bind proof: on success binds the sender's address and answers with an ack.
    fn accept_proof(&mut self, now: Instant, from: SocketAddr, buf: &mut [u8]) -> Verdict {
        let Ok(d) = Datagram::parse(buf) else { return Verdict::Drop(DropReason::Internal) };
        let node = d.source();
        let permit = match self.check_proof(now, from, &d) {
            Ok(p) => p,
            Err(None) => return Verdict::Drop(DropReason::BindRateLimited),
            Err(Some(r)) => {
                self.counters.bind_refused(r);
                let notice = Notice { code: NoticeCode::BindRefused, refusal: Some(r) };
                return self.refuse_with(now, buf, DropReason::BindRefused, notice);
            }
        };
        let b = permit.body;
        let left = b.expires_at.0.saturating_sub(self.clock.unix_secs(now));
        self.insert_binding(from, Binding { node, roles: b.roles, expires: now + Duration::from_secs(left) });
        self.counters.binds_accepted += 1;
        self.events.push_back(RouterEvent::Bound { node, roles: b.roles, addr: from, expires_at: b.expires_at.0 });
        // A relay that binds to us expects to be bound to in turn, so that we forward to it.
        if b.roles.contains(Roles::RELAY) && self.peer_owner {
            self.add_peer(from, now);
        }
        let mut body = [0; wire::BIND_ACK_BODY_LEN];
        BindAck { expires_at: b.expires_at.0, observed: from }.write(&mut body);
        self.write_reply(buf, Kind::BindAck, node, VcId(0), &body)
    }

    /// Every check on a bind proof, cheapest first: cookie, the signature budget (`Err(None)`
    /// when spent), permit and proof signatures, and room in the binding table.
    fn check_proof(
        &mut self,
        now: Instant,
        from: SocketAddr,
        d: &Datagram<'_>,
    ) -> Result<shoal_protocol::VerifiedTicket, Option<BindRefusal>> {
        let node = d.source();
        let proof = BindProof::read(d.body());
        let now_secs = self.clock.unix_secs(now);
        let c = proof.challenge;
        let fresh = c.issued_at <= now_secs && now_secs - c.issued_at <= COOKIE_LIFETIME_SECS;
        if d.destination() != self.id || !fresh || self.cookie(from, node, c.issued_at) != c.cookie {
            return Err(Some(BindRefusal::BadCookie));
        }
        if !self.bind_bucket.take(&self.cfg.bind_verifications, now, 1.0) {
            return Err(None);
        }
        let permit = self.verify_proof(&proof, node, now_secs).map_err(Some)?;
        let known = self.by_node.contains_key(&node) || self.by_addr.get(&from).is_some_and(|old| old.node == node);
        if !known && self.by_addr.len() >= self.cfg.max_bindings {
            return Err(Some(BindRefusal::Full));
        }
        Ok(permit)
    }

    fn verify_proof(
        &self,
        proof: &BindProof<'_>,
        node: NodeId,
        now_secs: u64,
    ) -> Result<shoal_protocol::VerifiedTicket, BindRefusal> {
        let ticket = SignedTicket::decode(proof.permit).map_err(|_| BindRefusal::MalformedPermit)?;
        if ticket.body.node_id != node {
            return Err(BindRefusal::WrongNode);
        }
        let verified = ticket
            .verify(&self.cfg.control_key, TicketKind::RelayPermit, Roles::default(), UnixTime(now_secs))
            .map_err(|e| match e {
                TicketError::Expired { .. } | TicketError::NotYetValid { .. } => BindRefusal::ExpiredPermit,
                TicketError::WrongKind { .. } | TicketError::WrongRole { .. } => BindRefusal::WrongRole,
                TicketError::BadSignature => BindRefusal::ForgedPermit,
                _ => BindRefusal::MalformedPermit,
            })?;
        let msg = wire::bind_proof_message(self.id, &proof.challenge);
        verified
            .body
            .public_key
            .verify(wire::BIND_CONTEXT, &msg, &proof.signature)
            .map_err(|_| BindRefusal::BadProof)?;
        Ok(verified)
    }

    fn insert_binding(&mut self, addr: SocketAddr, binding: Binding) {
        // A node that moved: forget its old address.
        if let Some(old) = self.by_node.insert(binding.node, addr)
            && old != addr
        {
            self.by_addr.remove(&old);
        }
        if let Some(prev) = self.by_addr.insert(addr, binding)
            && prev.node != binding.node
            && self.by_node.get(&prev.node) == Some(&addr)
        {
            self.by_node.remove(&prev.node);
        }
    }

    /// Relays never forward notices, but a peer relay saying it lost our binding (it
    /// restarted) makes us bind to it again at once.
    fn peer_notice(&mut self, now: Instant, from: SocketAddr, buf: &[u8]) -> Verdict {
        let notice = Datagram::parse(buf).ok().and_then(|d| Notice::read(d.body()).ok());
        if let Some(Notice { code: NoticeCode::NotBound | NoticeCode::PermitExpired, .. }) = notice
            && let Some(peer) = self.peers.iter_mut().find(|p| p.relay() == from && p.is_bound())
        {
            peer.restart(now);
        }
        Verdict::Drop(DropReason::NoticeReceived)
    }

    /// A challenge or ack from a peer relay we are binding to.
    fn peer_bind_reply(&mut self, now: Instant, from: SocketAddr, buf: &mut [u8]) -> Verdict {
        let Ok(d) = Datagram::parse(buf) else { return Verdict::Drop(DropReason::Internal) };
        let Some(peer) = self.peers.iter_mut().find(|p| p.relay() == from) else {
            return Verdict::Drop(DropReason::UnsolicitedBindReply);
        };
        let was_bound = peer.is_bound();
        let Some(permit) = &self.cfg.permit else { return Verdict::Drop(DropReason::UnsolicitedBindReply) };
        if let Some(t) = peer.handle_datagram(now, &self.clock, &d, &self.cfg.identity, permit) {
            self.transmits.push_back(t);
        }
        if !was_bound
            && peer.is_bound()
            && let Some(id) = peer.relay_id()
        {
            self.events.push_back(RouterEvent::PeerBound { addr: from, peer: id });
        }
        Verdict::Consumed
    }
}

/// The shape of a parse failure, for counting (the [`ParseError`] itself carries lengths).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParseErrorKind {
    /// [`ParseError::Truncated`] or [`ParseError::ShortBody`].
    Truncated,
    /// [`ParseError::Oversized`].
    Oversized,
    /// [`ParseError::UnsupportedVersion`].
    Version,
    /// [`ParseError::UnknownKind`] or [`ParseError::UnknownFlags`].
    Unknown,
    /// [`ParseError::RouteTooLong`], [`ParseError::HopPastRoute`] or [`ParseError::BadShape`].
    Route,
    /// [`ParseError::InvalidField`].
    Field,
}

impl ParseErrorKind {
    /// Classifies `e`.
    pub fn of(e: &ParseError) -> ParseErrorKind {
        match e {
            ParseError::Truncated { .. } | ParseError::ShortBody { .. } => ParseErrorKind::Truncated,
            ParseError::Oversized(_) => ParseErrorKind::Oversized,
            ParseError::UnsupportedVersion(_) => ParseErrorKind::Version,
            ParseError::UnknownKind(_) | ParseError::UnknownFlags(_) => ParseErrorKind::Unknown,
            ParseError::RouteTooLong(_) | ParseError::HopPastRoute { .. } | ParseError::BadShape(_) => {
                ParseErrorKind::Route
            }
            ParseError::InvalidField(_) => ParseErrorKind::Field,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bind::BindClient;
    use shoal_protocol::TicketBody;

    const T0: u64 = 1_800_000_000;

    fn setup(max_bindings: usize, binds_per_sec: f64) -> (Router, Identity, Instant, WallClock) {
        let control = Identity::from_seed([1; 32]);
        let me = Identity::from_seed([2; 32]);
        let lots = Rate { per_sec: 1e6, burst: 1e6 };
        let now = Instant::now();
        let clock = WallClock::new(now, T0 * 1_000_000);
        let cfg = RouterConfig {
            permit: Some(
                TicketBody::new(TicketKind::RelayPermit, me.public_key(), Roles::RELAY, UnixTime(T0), 60)
                    .sign(&control),
            ),
            identity: me,
            control_key: control.public_key(),
            source_packets: lots,
            source_bytes: lots,
            bind_verifications: Rate { per_sec: binds_per_sec, burst: binds_per_sec },
            notices: lots,
            max_bindings,
            cookie_secret: [3; 32],
        };
        (Router::new(cfg, clock, now), control, now, clock)
    }

    fn permit_for(control: &Identity, node: &Identity, kind: TicketKind) -> SignedTicket {
        TicketBody::new(kind, node.public_key(), Roles::CLIENT, UnixTime(T0), 60).sign(control)
    }

    /// Runs request → challenge for `node` from `addr`, and returns the proof bytes.
    fn proof(
        r: &mut Router,
        now: Instant,
        clock: &WallClock,
        node: &Identity,
        permit: &SignedTicket,
        addr: SocketAddr,
    ) -> Vec<u8> {
        let relay_addr = SocketAddr::from(([127, 0, 0, 1], 7000));
        let mut c = BindClient::new(relay_addr, now);
        let mut req = c.handle_timeout(now, node, permit).unwrap().bytes;
        let req_len = req.len();
        let Verdict::Reply(n) = r.handle_datagram(now, addr, &mut req) else { panic!("no challenge") };
        assert!(n <= req_len, "challenge larger than the request");
        let challenge = Datagram::parse(&req[..n]).unwrap();
        c.handle_datagram(now, clock, &challenge, node, permit).unwrap().bytes
    }

    fn refusal(v: Verdict, r: &Router, want: BindRefusal) {
        assert!(matches!(v, Verdict::DropWithNotice(DropReason::BindRefused, _)), "{v:?}");
        assert_eq!(r.counters().bind_refusals(want), 1, "{want:?}");
    }

    #[test]
    fn a_valid_proof_binds_and_the_ack_is_smaller() {
        let (mut r, control, now, clock) = setup(8, 100.0);
        let node = Identity::from_seed([10; 32]);
        let addr = SocketAddr::from(([127, 0, 0, 1], 5000));
        let mut p = proof(&mut r, now, &clock, &node, &permit_for(&control, &node, TicketKind::RelayPermit), addr);
        let len = p.len();
        let Verdict::Reply(n) = r.handle_datagram(now, addr, &mut p) else { panic!() };
        assert!(n < len);
        let ack = BindAck::read(Datagram::parse(&p[..n]).unwrap().body()).unwrap();
        assert_eq!(ack.observed, addr);
        assert_eq!(r.lookup(node.node_id()), Some(addr));
    }

    #[test]
    fn every_bad_proof_is_refused_for_its_own_reason() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 5000));
        let node = Identity::from_seed([10; 32]);

        // The cookie was issued to another address.
        let (mut r, control, now, clock) = setup(8, 100.0);
        let good = permit_for(&control, &node, TicketKind::RelayPermit);
        let mut p = proof(&mut r, now, &clock, &node, &good, SocketAddr::from(([127, 0, 0, 1], 5001)));
        let v = r.handle_datagram(now, addr, &mut p);
        refusal(v, &r, BindRefusal::BadCookie);

        // The cookie is older than its lifetime.
        let (mut r, _, now, clock) = setup(8, 100.0);
        let mut p = proof(&mut r, now, &clock, &node, &good, addr);
        let v = r.handle_datagram(now + Duration::from_secs(COOKIE_LIFETIME_SECS + 2), addr, &mut p);
        refusal(v, &r, BindRefusal::BadCookie);

        // Signed by a key other than the permit's.
        let (mut r, _, now, clock) = setup(8, 100.0);
        let mut p = proof(&mut r, now, &clock, &node, &good, addr);
        let last = p.len() - 1;
        p[last] ^= 1;
        let v = r.handle_datagram(now, addr, &mut p);
        refusal(v, &r, BindRefusal::BadProof);

        // A permit for someone else, presented by `node`.
        let (mut r, _, now, clock) = setup(8, 100.0);
        let other = permit_for(&control, &Identity::from_seed([11; 32]), TicketKind::RelayPermit);
        let mut p = proof(&mut r, now, &clock, &node, &other, addr);
        let v = r.handle_datagram(now, addr, &mut p);
        refusal(v, &r, BindRefusal::WrongNode);

        // A session ticket is not a relay permit.
        let (mut r, _, now, clock) = setup(8, 100.0);
        let session = permit_for(&control, &node, TicketKind::Session);
        let mut p = proof(&mut r, now, &clock, &node, &session, addr);
        let v = r.handle_datagram(now, addr, &mut p);
        refusal(v, &r, BindRefusal::WrongRole);

        // A forged permit.
        let (mut r, _, now, clock) = setup(8, 100.0);
        let forged = permit_for(&Identity::from_seed([99; 32]), &node, TicketKind::RelayPermit);
        let mut p = proof(&mut r, now, &clock, &node, &forged, addr);
        let v = r.handle_datagram(now, addr, &mut p);
        refusal(v, &r, BindRefusal::ForgedPermit);
    }

    #[test]
    fn a_full_table_and_a_spent_budget_refuse_new_binds() {
        let (mut r, control, now, clock) = setup(1, 100.0);
        for (i, seed) in [20u8, 21].into_iter().enumerate() {
            let node = Identity::from_seed([seed; 32]);
            let addr = SocketAddr::from(([127, 0, 0, 1], 6000 + i as u16));
            let mut p = proof(&mut r, now, &clock, &node, &permit_for(&control, &node, TicketKind::RelayPermit), addr);
            let v = r.handle_datagram(now, addr, &mut p);
            if i == 0 {
                assert!(matches!(v, Verdict::Reply(_)));
            } else {
                refusal(v, &r, BindRefusal::Full);
            }
        }

        let (mut r, control, now, clock) = setup(8, 1.0);
        let mut verdicts = Vec::new();
        for seed in [30u8, 31] {
            let node = Identity::from_seed([seed; 32]);
            let addr = SocketAddr::from(([127, 0, 0, 1], 7000 + u16::from(seed)));
            let mut p = proof(&mut r, now, &clock, &node, &permit_for(&control, &node, TicketKind::RelayPermit), addr);
            verdicts.push(r.handle_datagram(now, addr, &mut p));
        }
        assert!(matches!(verdicts[0], Verdict::Reply(_)));
        assert_eq!(verdicts[1], Verdict::Drop(DropReason::BindRateLimited));
    }

    #[test]
    fn a_peer_relay_naming_endless_sources_cannot_grow_the_rate_limit_table() {
        let (mut r, _, now, clock) = setup(2, 100.0);
        let me = r.id();
        let (peer, peer_addr) = (Identity::from_seed([40; 32]).node_id(), SocketAddr::from(([127, 0, 0, 1], 8000)));
        let (client, client_addr) = (Identity::from_seed([41; 32]).node_id(), SocketAddr::from(([127, 0, 0, 1], 8001)));
        let until = clock.unix_secs(now) + 60;
        r.apply_binding(now, peer, Roles::RELAY, peer_addr, until);
        r.apply_binding(now, client, Roles::CLIENT, client_addr, until);
        let route = Route::new(&[peer, me]).unwrap();
        let cap = 2 * SOURCES_PER_BINDING;
        let sources = 100u64;
        for i in 0..sources {
            let h = Header {
                kind: Kind::Data,
                source: NodeId(i.to_be_bytes()),
                destination: client,
                vc: VcId(1),
                trace: false,
            };
            let mut buf = vec![0; 64];
            let n = wire::emit(&mut buf, &h, &route, 0, b"avatar").unwrap();
            buf.truncate(n);
            // As the peer relay sent it: its own hop done.
            wire::stamp_and_advance(&mut buf, 0, 0);
            assert_eq!(r.handle_datagram(now, peer_addr, &mut buf), Verdict::Forward(client_addr));
        }
        // Each source up to the cap has its own limit; the rest share the peer relay's.
        assert_eq!(r.rate_limited_sources(), cap + 1);
        assert_eq!(r.counters().sources_over_cap, sources - cap as u64);
        assert_eq!(r.counters().forwarded_packets, sources);
    }
}
