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
//!
//! A binding goes when its permit lapses, when its node unbinds (a bind proof with the unbind
//! flag, answering the challenge of the bind it releases and signed with the node's key), or
//! when the relay has heard nothing from it, neither a datagram nor a bind, for
//! [`IDLE_EXPIRY`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ring::hmac;
use rustc_hash::FxHashMap;
use shoal_protocol::{
    Group, Identity, NodeId, PublicKey, Roles, SignedSubscription, SignedTicket, StreamId, SubscriptionError,
    TicketError, TicketKind, UnixTime,
};

use crate::bind::{BindClient, KEEPALIVE_MAX, Transmit};
use crate::clock::WallClock;
use crate::fanout::{FanoutConfig, Groups};
use crate::metrics::{Counters, DropReason};
use crate::wire::{
    self, BindAck, BindProof, BindRefusal, COOKIE_LEN, Challenge, Datagram, Header, Kind, MAX_STREAM, Notice,
    NoticeCode, ParseError, Route, SUBSCRIBE_ACK_BODY_LEN, SubscribeAck, SubscribeStatus, VcId,
};

/// How long a bind challenge's cookie stays valid.
const COOKIE_LIFETIME_SECS: u64 = 30;
/// Sources with a rate limit of their own, per binding the relay allows.
const SOURCES_PER_BINDING: usize = 4;
/// A binding the relay has heard nothing from for this long (no datagram, no bind) is
/// dropped: four of the longest keepalive interval, which a bound node never lets pass
/// without binding again.
pub const IDLE_EXPIRY: Duration = Duration::from_secs(4 * KEEPALIVE_MAX.as_secs());

/// Why a relay refused an unbind. Refusals are counted and not answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnbindRefusal {
    /// The sender's address holds no binding of the node the unbind names, here.
    NotBound,
    /// The unbind does not answer the challenge of the binding's latest bind (an old unbind
    /// replayed, or a cookie this relay never issued to that address).
    StaleChallenge,
    /// The permit does not decode, is not the control key's, has lapsed or names another node.
    BadPermit,
    /// The node's signature does not match its permit's key.
    BadProof,
}

impl UnbindRefusal {
    /// Every refusal, for exposition.
    pub const ALL: [UnbindRefusal; 4] =
        [UnbindRefusal::NotBound, UnbindRefusal::StaleChallenge, UnbindRefusal::BadPermit, UnbindRefusal::BadProof];
}

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
    /// Bounds on fan-out groups.
    pub fanout: FanoutConfig,
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
    /// Send the (stamped) buffer, unchanged, to every address [`Router::copies_for`] gives
    /// for this group: a publisher's datagram fanned out.
    FanOut(Group),
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
        /// When the challenge its proof answered was issued, in Unix seconds: an unbind must
        /// answer the same one.
        challenge_at: u64,
    },
    /// A node unbound itself from `addr`. With several workers the driver hands this to the
    /// others' [`Router::apply_unbinding`].
    Unbound {
        /// The node.
        node: NodeId,
        /// The address it was bound at.
        addr: SocketAddr,
        /// The challenge time of the binding it released.
        challenge_at: u64,
    },
    /// A node joined a group (or renewed its membership) until `expires_at` (Unix seconds).
    /// With several workers the driver hands this to the others' [`Router::apply_membership`].
    Joined {
        /// The group.
        group: Group,
        /// The member.
        node: NodeId,
        /// Where it is reached.
        addr: SocketAddr,
        /// When its subscription lapses, in Unix seconds.
        expires_at: u64,
    },
    /// A node left a group.
    Left {
        /// The group.
        group: Group,
        /// The member that left.
        node: NodeId,
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
    /// When the challenge of the latest bind was issued (Unix seconds); see
    /// [`RouterEvent::Bound::challenge_at`].
    challenge_at: u64,
    /// When the relay last heard from the node: a datagram from its address, or a bind.
    heard: Instant,
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
    /// Fan-out groups and their members.
    groups: Groups,
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
            groups: Groups::new(cfg.fanout),
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

    /// Fan-out groups held, and memberships across them.
    pub fn groups(&self) -> (usize, usize) {
        (self.groups.len(), self.groups.member_count())
    }

    /// Where the copies go of a datagram [`Verdict::FanOut`] named `group` for.
    pub fn copies_for(&self, group: &Group) -> &[SocketAddr] {
        self.groups.addrs(group)
    }

    /// Adopts a membership another worker of this relay admitted (see [`RouterEvent::Joined`]).
    pub fn apply_membership(&mut self, now: Instant, group: Group, node: NodeId, addr: SocketAddr, expires_at: u64) {
        let lapses = now + Duration::from_secs(expires_at.saturating_sub(self.clock.unix_secs(now)));
        let _ = self.groups.join(group, node, addr, lapses);
    }

    /// Drops a membership another worker of this relay released (see [`RouterEvent::Left`]).
    pub fn apply_leave(&mut self, group: Group, node: NodeId) {
        self.groups.leave(group, node);
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
    pub fn apply_binding(
        &mut self,
        now: Instant,
        node: NodeId,
        roles: Roles,
        addr: SocketAddr,
        expires_at: u64,
        challenge_at: u64,
    ) {
        let left = expires_at.saturating_sub(self.clock.unix_secs(now));
        let expires = now + Duration::from_secs(left);
        self.insert_binding(addr, Binding { node, roles, expires, challenge_at, heard: now });
        if roles.contains(Roles::RELAY) && self.peer_owner {
            self.add_peer(addr, now);
        }
    }

    /// Drops a binding another worker of this relay released on its node's unbind (see
    /// [`RouterEvent::Unbound`]), unless the node has bound again since.
    pub fn apply_unbinding(&mut self, node: NodeId, addr: SocketAddr, challenge_at: u64) {
        if self.by_addr.get(&addr).is_some_and(|b| b.node == node && b.challenge_at == challenge_at) {
            self.remove_binding(addr);
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

    /// Drives peer binds and drops lapsed and idle bindings and idle rate-limit state.
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
            let mut idle = 0;
            self.by_addr.retain(|addr, b| {
                let lapsed = b.expires <= now;
                let silent = now.saturating_duration_since(b.heard) >= IDLE_EXPIRY;
                idle += u64::from(silent && !lapsed);
                let keep = !lapsed && !silent;
                if !keep && by_node.get(&b.node) == Some(addr) {
                    by_node.remove(&b.node);
                }
                keep
            });
            self.counters.idle_expired += idle;
            let by_addr = &self.by_addr;
            self.groups.sweep(now, |node, addr| by_addr.get(&addr).is_some_and(|b| b.node == node && b.expires > now));
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
            Verdict::FanOut(group) => {
                let copies = self.groups.addrs(&group).len() as u64;
                self.counters.published += 1;
                self.counters.copies += copies;
                self.counters.forwarded_bytes += buf.len() as u64 * copies;
            }
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
        let (hot, publish) = match Datagram::parse(buf) {
            Ok(d) if d.kind().is_routed() => (Hot::read(&d, self.id), (d.kind() == Kind::Publish).then(|| d.vc())),
            Ok(d) => {
                return match d.kind() {
                    Kind::Subscribe => self.subscribe(now, from, buf),
                    Kind::BindRequest => self.challenge(now, from, buf),
                    Kind::BindProof if d.unbind() => self.release(now, from, buf),
                    Kind::BindProof => self.accept_proof(now, from, buf),
                    Kind::BindChallenge | Kind::BindAck => self.peer_bind_reply(now, from, buf),
                    _ => self.peer_notice(now, from, buf),
                };
            }
            Err(e) => return Verdict::Drop(DropReason::Malformed(ParseErrorKind::of(&e))),
        };
        match publish {
            Some(stream) => self.fan_out(now, from, buf, hot, stream),
            None => self.forward(now, from, buf, hot),
        }
    }

    /// The hot path: every check on the fields read once, then stamp in place.
    fn forward(&mut self, now: Instant, from: SocketAddr, buf: &mut [u8], d: Hot) -> Verdict {
        let Some(binding) = self.by_addr.get_mut(&from) else {
            return self.refuse(now, buf, DropReason::NotBound, NoticeCode::NotBound);
        };
        if binding.expires <= now {
            return self.refuse(now, buf, DropReason::PermitExpired, NoticeCode::PermitExpired);
        }
        binding.heard = now;
        let binding = *binding;
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

    /// A publisher's datagram for its group here: the publisher's binding checked as for data,
    /// every copy charged to its rate limit, then stamped once for all the copies.
    fn fan_out(&mut self, now: Instant, from: SocketAddr, buf: &mut [u8], d: Hot, stream: VcId) -> Verdict {
        let Some(binding) = self.by_addr.get_mut(&from) else {
            return self.refuse(now, buf, DropReason::NotBound, NoticeCode::NotBound);
        };
        if binding.expires <= now {
            return self.refuse(now, buf, DropReason::PermitExpired, NoticeCode::PermitExpired);
        }
        binding.heard = now;
        if d.source != binding.node || d.hop != 0 {
            return Verdict::Drop(DropReason::SourceMismatch);
        }
        // A publish names this relay as its only hop and as its destination (so that one
        // buffer serves every member).
        if d.route_len != 1 || !d.on_route || d.next_hop != self.id {
            return Verdict::Drop(DropReason::NotOnRoute);
        }
        if stream.0 > MAX_STREAM {
            return Verdict::Drop(DropReason::Malformed(ParseErrorKind::Field));
        }
        let group = Group { publisher: d.source, stream: StreamId(stream.0 as u16) };
        let copies = self.groups.members(now, &group).len();
        if copies == 0 {
            return Verdict::Drop(DropReason::NoGroup);
        }
        let (pr, br) = (self.cfg.source_packets, self.cfg.source_bytes);
        let (packets, bytes) =
            self.buckets.entry(d.source).or_insert_with(|| (TokenBucket::new(&pr, now), TokenBucket::new(&br, now)));
        let n = copies as f64;
        if !packets.take(&pr, now, n) || !bytes.take(&br, now, buf.len() as f64 * n) {
            self.counters.copies_rate_limited += copies as u64;
            return Verdict::Drop(DropReason::RateLimited);
        }
        wire::stamp_and_advance(buf, self.tag, self.clock.stamp_us(now));
        Verdict::FanOut(group)
    }

    /// A node presents a subscription (or leaves a group): answered with its status, in a
    /// reply smaller than the request. Refusals are counted, and answered within the notice
    /// budget.
    fn subscribe(&mut self, now: Instant, from: SocketAddr, buf: &mut [u8]) -> Verdict {
        let Ok(d) = Datagram::parse(buf) else { return Verdict::Drop(DropReason::Internal) };
        let (node, leave) = (d.source(), d.unbind());
        let decoded = SignedSubscription::decode(d.body());
        let (publisher, stream) = decoded.map_or((NodeId([0; 8]), 0), |s| (s.body.publisher, s.body.stream.0));
        let status = match self.check_subscription(now, from, node, decoded, leave) {
            Ok(s) => s,
            Err(None) => return Verdict::Drop(DropReason::BindRateLimited),
            Err(Some(s)) => s,
        };
        self.counters.subscribe_answered(status);
        let refused = !matches!(status, SubscribeStatus::Member | SubscribeStatus::Left);
        if refused && !self.notice_bucket.take(&self.cfg.notices, now, 1.0) {
            return Verdict::Drop(DropReason::SubscribeRefused);
        }
        let mut body = [0; SUBSCRIBE_ACK_BODY_LEN];
        SubscribeAck { status, stream, publisher }.write(&mut body);
        match self.write_reply(buf, Kind::SubscribeAck, node, VcId(0), &body) {
            Verdict::Reply(n) if refused => Verdict::DropWithNotice(DropReason::SubscribeRefused, n),
            v => v,
        }
    }

    /// Every check on a subscribe, cheapest first: the sender's binding, the subscription's
    /// layout, relay, subscriber and validity, the signature budget (`Err(None)` when spent),
    /// the signature; then the group's room. A leave needs no signature: it comes from the
    /// member's own binding.
    fn check_subscription(
        &mut self,
        now: Instant,
        from: SocketAddr,
        node: NodeId,
        sub: Result<SignedSubscription, SubscriptionError>,
        leave: bool,
    ) -> Result<SubscribeStatus, Option<SubscribeStatus>> {
        let bound = self.by_addr.get(&from).is_some_and(|b| b.node == node && b.expires > now);
        if !bound {
            return Err(Some(SubscribeStatus::NotBound));
        }
        let sub = sub.map_err(|_| Some(SubscribeStatus::Forged))?;
        let b = sub.body;
        let now_secs = self.clock.unix_secs(now);
        if b.relay != self.id {
            return Err(Some(SubscribeStatus::WrongRelay));
        }
        if b.subscriber != node {
            return Err(Some(SubscribeStatus::WrongSubscriber));
        }
        if leave {
            if self.groups.leave(b.group(), node) {
                self.events.push_back(RouterEvent::Left { group: b.group(), node });
            }
            return Ok(SubscribeStatus::Left);
        }
        if now_secs >= b.expires_at.0 {
            return Err(Some(SubscribeStatus::Expired));
        }
        if !self.bind_bucket.take(&self.cfg.bind_verifications, now, 1.0) {
            return Err(None);
        }
        sub.verify(&self.cfg.control_key, self.id, node, UnixTime(now_secs)).map_err(|e| {
            Some(match e {
                SubscriptionError::Expired { .. } | SubscriptionError::NotYetValid { .. } => SubscribeStatus::Expired,
                SubscriptionError::WrongRelay { .. } => SubscribeStatus::WrongRelay,
                SubscriptionError::WrongSubscriber { .. } => SubscribeStatus::WrongSubscriber,
                _ => SubscribeStatus::Forged,
            })
        })?;
        let lapses = now + Duration::from_secs(b.expires_at.0 - now_secs);
        self.groups.join(b.group(), node, from, lapses).map_err(Some)?;
        self.events.push_back(RouterEvent::Joined { group: b.group(), node, addr: from, expires_at: b.expires_at.0 });
        Ok(SubscribeStatus::Member)
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
        let expires = now + Duration::from_secs(left);
        let challenge_at = BindProof::read(d.body()).challenge.issued_at;
        self.insert_binding(from, Binding { node, roles: b.roles, expires, challenge_at, heard: now });
        self.counters.binds_accepted += 1;
        let expires_at = b.expires_at.0;
        self.events.push_back(RouterEvent::Bound { node, roles: b.roles, addr: from, expires_at, challenge_at });
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

    /// Handles an unbind: on success drops the binding and answers with a flagged ack, smaller
    /// than the unbind; a refusal is counted and not answered.
    fn release(&mut self, now: Instant, from: SocketAddr, buf: &mut [u8]) -> Verdict {
        let Ok(d) = Datagram::parse(buf) else { return Verdict::Drop(DropReason::Internal) };
        let node = d.source();
        let challenge_at = match self.check_unbind(now, from, &d) {
            Ok(at) => at,
            Err(None) => return Verdict::Drop(DropReason::BindRateLimited),
            Err(Some(r)) => {
                self.counters.unbind_refused(r);
                return Verdict::Drop(DropReason::UnbindRefused);
            }
        };
        self.remove_binding(from);
        self.counters.unbinds += 1;
        self.events.push_back(RouterEvent::Unbound { node, addr: from, challenge_at });
        let mut body = [0; wire::BIND_ACK_BODY_LEN];
        BindAck { expires_at: 0, observed: from }.write(&mut body);
        let verdict = self.write_reply(buf, Kind::BindAck, node, VcId(0), &body);
        if let Verdict::Reply(n) = verdict {
            wire::set_unbind(&mut buf[..n]);
        }
        verdict
    }

    /// Every check on an unbind, cheapest first: a binding of this node at this address, the
    /// challenge of its latest bind with a cookie this relay made, the signature budget
    /// (`Err(None)` when spent), the permit and the node's signature under the unbind context.
    /// Returns the released binding's challenge time.
    fn check_unbind(&mut self, now: Instant, from: SocketAddr, d: &Datagram<'_>) -> Result<u64, Option<UnbindRefusal>> {
        let node = d.source();
        let proof = BindProof::read(d.body());
        let c = proof.challenge;
        let Some(b) = self.by_addr.get(&from).copied() else { return Err(Some(UnbindRefusal::NotBound)) };
        if b.node != node || d.destination() != self.id {
            return Err(Some(UnbindRefusal::NotBound));
        }
        if b.challenge_at != c.issued_at || self.cookie(from, node, c.issued_at) != c.cookie {
            return Err(Some(UnbindRefusal::StaleChallenge));
        }
        if !self.bind_bucket.take(&self.cfg.bind_verifications, now, 1.0) {
            return Err(None);
        }
        let ticket = SignedTicket::decode(proof.permit).map_err(|_| Some(UnbindRefusal::BadPermit))?;
        if ticket.body.node_id != node {
            return Err(Some(UnbindRefusal::BadPermit));
        }
        let now_secs = UnixTime(self.clock.unix_secs(now));
        let verified = ticket
            .verify(&self.cfg.control_key, TicketKind::RelayPermit, Roles::default(), now_secs)
            .map_err(|_| Some(UnbindRefusal::BadPermit))?;
        let msg = wire::bind_proof_message(self.id, &c);
        verified
            .body
            .public_key
            .verify(wire::UNBIND_CONTEXT, &msg, &proof.signature)
            .map_err(|_| Some(UnbindRefusal::BadProof))?;
        Ok(b.challenge_at)
    }

    /// Forgets the binding at `addr`, and its node's address if it is this one.
    fn remove_binding(&mut self, addr: SocketAddr) {
        if let Some(b) = self.by_addr.remove(&addr)
            && self.by_node.get(&b.node) == Some(&addr)
        {
            self.by_node.remove(&b.node);
        }
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

    /// A challenge or ack from a peer relay we are binding to. Relays never unbind, so an
    /// unbind's ack is unsolicited.
    fn peer_bind_reply(&mut self, now: Instant, from: SocketAddr, buf: &mut [u8]) -> Verdict {
        let Ok(d) = Datagram::parse(buf) else { return Verdict::Drop(DropReason::Internal) };
        if d.unbind() {
            return Verdict::Drop(DropReason::UnsolicitedBindReply);
        }
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
            fanout: crate::fanout::FanoutConfig::default(),
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
        r.apply_binding(now, peer, Roles::RELAY, peer_addr, until, 0);
        r.apply_binding(now, client, Roles::CLIENT, client_addr, until, 0);
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

    /// Runs the whole handshake for `node` from `addr`; returns the bound client.
    fn bound_client(
        r: &mut Router,
        now: Instant,
        clock: &WallClock,
        node: &Identity,
        permit: &SignedTicket,
        addr: SocketAddr,
    ) -> BindClient {
        let mut c = BindClient::new(SocketAddr::from(([127, 0, 0, 1], 7000)), now);
        let mut out = c.handle_timeout(now, node, permit).unwrap().bytes;
        loop {
            let v = r.handle_datagram(now, addr, &mut out);
            let Verdict::Reply(n) = v else { panic!("{v:?}") };
            let reply = out[..n].to_vec();
            match c.handle_datagram(now, clock, &Datagram::parse(&reply).unwrap(), node, permit) {
                Some(t) => out = t.bytes,
                None => break,
            }
        }
        assert!(c.is_bound());
        c
    }

    fn long_permit(control: &Identity, node: &Identity) -> SignedTicket {
        TicketBody::new(TicketKind::RelayPermit, node.public_key(), Roles::CLIENT, UnixTime(T0), 3600).sign(control)
    }

    #[test]
    fn a_node_unbinds_with_its_key_and_the_ack_is_smaller() {
        let (mut r, control, now, clock) = setup(8, 100.0);
        let node = Identity::from_seed([10; 32]);
        let addr = SocketAddr::from(([127, 0, 0, 1], 5000));
        let permit = permit_for(&control, &node, TicketKind::RelayPermit);
        let c = bound_client(&mut r, now, &clock, &node, &permit, addr);
        while r.poll_event().is_some() {}
        let mut unbind = c.unbind(&node, &permit).unwrap().bytes;
        let len = unbind.len();
        let Verdict::Reply(n) = r.handle_datagram(now, addr, &mut unbind) else { panic!() };
        assert!(n < len, "an ack of {n} bytes to an unbind of {len}");
        let ack = Datagram::parse(&unbind[..n]).unwrap();
        assert!(ack.kind() == Kind::BindAck && ack.unbind());
        assert_eq!(r.lookup(node.node_id()), None);
        assert_eq!((r.bindings(), r.counters().unbinds), (0, 1));
        let ev = r.poll_event();
        assert!(matches!(ev, Some(RouterEvent::Unbound { node: n, addr: a, .. }) if n == node.node_id() && a == addr));
    }

    #[test]
    fn unbinds_not_from_the_bound_node_are_refused_counted_and_unanswered() {
        let (mut r, control, now, clock) = setup(8, 100.0);
        let node = Identity::from_seed([10; 32]);
        let addr = SocketAddr::from(([127, 0, 0, 1], 5000));
        let permit = permit_for(&control, &node, TicketKind::RelayPermit);
        let c = bound_client(&mut r, now, &clock, &node, &permit, addr);
        let unbind = c.unbind(&node, &permit).unwrap().bytes;
        let refused = |r: &mut Router, from: SocketAddr, mut bytes: Vec<u8>, why: UnbindRefusal| {
            let before = r.counters().unbind_refusals(why);
            assert_eq!(r.handle_datagram(now, from, &mut bytes), Verdict::Drop(DropReason::UnbindRefused), "{why:?}");
            assert_eq!(r.counters().unbind_refusals(why), before + 1, "{why:?}");
            assert_eq!(r.lookup(node.node_id()), Some(addr), "{why:?} unbound the node");
        };
        // A third party spoofing another address, or the node's own with another node's id.
        refused(&mut r, SocketAddr::from(([127, 0, 0, 1], 5001)), unbind.clone(), UnbindRefusal::NotBound);
        let other = Identity::from_seed([11; 32]);
        let mut theirs = unbind.clone();
        theirs[4..12].copy_from_slice(&other.node_id().0);
        refused(&mut r, addr, theirs, UnbindRefusal::NotBound);
        // A signature that is not the node's.
        let mut forged = unbind.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        refused(&mut r, addr, forged, UnbindRefusal::BadProof);
        // The node's own bind proof with the flag set: signed for binding, not unbinding.
        let mut c2 = BindClient::new(SocketAddr::from(([127, 0, 0, 1], 7000)), now);
        let mut req = c2.handle_timeout(now, &node, &permit).unwrap().bytes;
        let Verdict::Reply(n) = r.handle_datagram(now, addr, &mut req) else { panic!() };
        let challenge = Datagram::parse(&req[..n]).unwrap();
        let mut proof = c2.handle_datagram(now, &clock, &challenge, &node, &permit).unwrap().bytes;
        wire::set_unbind(&mut proof);
        refused(&mut r, addr, proof, UnbindRefusal::BadProof);
        // A permit that is not the control key's.
        let forged_permit = permit_for(&Identity::from_seed([99; 32]), &node, TicketKind::RelayPermit);
        refused(&mut r, addr, c.unbind(&node, &forged_permit).unwrap().bytes, UnbindRefusal::BadPermit);
        // After the node binds again, its old unbind is stale: a replay cannot undo the new
        // binding.
        let later = now + Duration::from_secs(2);
        let c3 = bound_client(&mut r, later, &clock, &node, &permit, addr);
        let mut old = unbind.clone();
        assert_eq!(r.handle_datagram(later, addr, &mut old), Verdict::Drop(DropReason::UnbindRefused));
        assert_eq!(r.counters().unbind_refusals(UnbindRefusal::StaleChallenge), 1);
        assert_eq!(r.lookup(node.node_id()), Some(addr));
        // The fresh one works; a second copy of it finds nothing to unbind.
        let fresh = c3.unbind(&node, &permit).unwrap().bytes;
        assert!(matches!(r.handle_datagram(later, addr, &mut fresh.clone()), Verdict::Reply(_)));
        assert_eq!(r.handle_datagram(later, addr, &mut fresh.clone()), Verdict::Drop(DropReason::UnbindRefused));
        assert_eq!(r.counters().unbind_refusals(UnbindRefusal::NotBound), 3);
        assert_eq!(r.counters().unbinds, 1);
        assert_eq!(r.counters().notices_sent, 0, "refused unbinds are not answered");
    }

    #[test]
    fn a_binding_that_hears_nothing_expires_and_one_that_hears_stays() {
        let (mut r, _, now, clock) = setup(8, 100.0);
        let me = r.id();
        let until = clock.unix_secs(now) + 3600;
        let (talker, quiet) = (Identity::from_seed([20; 32]).node_id(), Identity::from_seed([21; 32]).node_id());
        let (talker_addr, quiet_addr) =
            (SocketAddr::from(([127, 0, 0, 1], 6000)), SocketAddr::from(([127, 0, 0, 1], 6001)));
        r.apply_binding(now, talker, Roles::CLIENT, talker_addr, until, 0);
        r.apply_binding(now, quiet, Roles::CLIENT, quiet_addr, until, 0);
        let h = Header { kind: Kind::Data, source: talker, destination: quiet, vc: VcId(1), trace: false };
        let mut t = now;
        while t < now + IDLE_EXPIRY + Duration::from_secs(2) {
            // The talker sends a datagram every minute; the quiet one sends nothing.
            let mut buf = vec![0; 64];
            let n = wire::emit(&mut buf, &h, &Route::new(&[me]).unwrap(), 0, b"x").unwrap();
            buf.truncate(n);
            let _ = r.handle_datagram(t, talker_addr, &mut buf);
            t += Duration::from_secs(60);
            r.handle_timeout(t);
        }
        assert_eq!(r.lookup(quiet), None);
        assert_eq!(r.lookup(talker), Some(talker_addr));
        assert_eq!(r.counters().idle_expired, 1);
        // A bind is hearing too: the talker, silent from now on but binding again, stays.
        let mut k = t;
        while k < t + IDLE_EXPIRY * 2 {
            r.apply_binding(k, talker, Roles::CLIENT, talker_addr, until, 1);
            k += crate::bind::KEEPALIVE_MAX;
            r.handle_timeout(k);
        }
        assert_eq!(r.lookup(talker), Some(talker_addr));
        assert_eq!(r.counters().idle_expired, 1);
    }

    #[test]
    fn another_workers_unbinding_drops_only_the_binding_it_released() {
        let (mut r, _, now, clock) = setup(8, 100.0);
        let until = clock.unix_secs(now) + 3600;
        let node = Identity::from_seed([20; 32]).node_id();
        let addr = SocketAddr::from(([127, 0, 0, 1], 6000));
        r.apply_binding(now, node, Roles::CLIENT, addr, until, 7);
        // Released at its earlier bind: the node has bound again since.
        r.apply_unbinding(node, addr, 6);
        assert_eq!(r.lookup(node), Some(addr));
        r.apply_unbinding(node, addr, 7);
        assert_eq!((r.lookup(node), r.bindings()), (None, 0));
    }

    #[test]
    fn a_bound_client_binds_again_within_the_longest_keepalive_however_much_it_sends() {
        let (mut r, control, now, clock) = setup(8, 100.0);
        let node = Identity::from_seed([10; 32]);
        let addr = SocketAddr::from(([127, 0, 0, 1], 5000));
        let permit = long_permit(&control, &node);
        let mut c = bound_client(&mut r, now, &clock, &node, &permit, addr);
        // Data every second defers the keepalive, but never past KEEPALIVE_MAX since the ack.
        for s in 1..200 {
            c.on_sent(now + Duration::from_secs(s));
            assert!(c.poll_timeout() <= now + crate::bind::KEEPALIVE_MAX, "at {s} s: {:?}", c.poll_timeout() - now);
        }
        // The ack of an unbind is not the answer to a bind: the client stays as it was.
        let mut unbind = c.unbind(&node, &permit).unwrap().bytes;
        let Verdict::Reply(n) = r.handle_datagram(now, addr, &mut unbind) else { panic!() };
        let ack = Datagram::parse(&unbind[..n]).unwrap();
        assert_eq!(c.handle_datagram(now, &clock, &ack, &node, &permit), None);
        assert!(c.is_bound());
        // Not bound, nothing to unbind.
        assert!(BindClient::new(addr, now).unbind(&node, &permit).is_none());
    }
}
