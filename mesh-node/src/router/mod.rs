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
use shoal_protocol::{Group, Identity, NodeId, PublicKey, Roles, SignedTicket};

use crate::bind::{BindClient, KEEPALIVE_MAX, Transmit};
use crate::bundle::Bundler;
use crate::clock::WallClock;
use crate::fanout::{FanoutConfig, Groups};
use crate::metrics::{Counters, DropReason};
use crate::wire::{self, Datagram, Header, Kind, Notice, NoticeCode, ParseError, Route, VcId};

pub use feed::{FEED_IDLE, FEED_REFRESH, FEED_RETRY};

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
    /// for this group: a publisher's datagram fanned out. (With bundling on, the router sends
    /// the copies itself, through [`Router::poll_transmit`], and says [`Verdict::Consumed`].)
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
    /// Groups other relays feed here.
    feeds: feed::Feeds,
    /// When a feed is next due to be presented upstream (none: nothing is).
    feeds_next: Option<Instant>,
    /// Copies waiting to share a datagram with others for the same member (when bundling).
    bundler: Option<Bundler>,
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
            feeds: feed::Feeds::default(),
            feeds_next: None,
            bundler: (!cfg.fanout.bundle_window.is_zero()).then(|| Bundler::new(id, cfg.fanout.bundle_window)),
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
        if self.groups.join(group, node, addr, lapses).is_ok() {
            self.feed_member_joined(now, &group);
        }
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

    /// Router-originated datagrams: binds to peer relays, feeds presented upstream, and the
    /// bundles of copies (see [`crate::bundle`]).
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if let Some(t) = self.transmits.pop_front() {
            return Some(t);
        }
        let b = self.bundler.as_mut()?;
        let t = b.poll_transmit();
        (self.counters.bundles, self.counters.bundled_copies) = (b.bundles, b.bundled_copies);
        t
    }

    /// Gives back the buffer of a sent transmit, for reuse.
    pub fn recycle(&mut self, bytes: Vec<u8>) {
        if let Some(b) = &mut self.bundler {
            b.recycle(bytes);
        }
    }

    /// Events since the last poll.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<RouterEvent> {
        self.events.pop_front()
    }

    /// When [`Router::handle_timeout`] is next due.
    #[must_use]
    pub fn poll_timeout(&self) -> Instant {
        let peers = self.peers.iter().map(BindClient::poll_timeout).fold(self.next_sweep, Instant::min);
        let bundles = self.bundler.as_ref().and_then(Bundler::poll_timeout);
        [self.feeds_timeout(), bundles].into_iter().flatten().fold(peers, Instant::min)
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
        if let Some(b) = &mut self.bundler {
            b.flush_due(now);
        }
        self.present_due(now);
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
            self.sweep_feeds(now);
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
        self.count(now, verdict, buf)
    }

    /// Counts what `verdict` does with `buf`; a fan-out is handed to the bundler when bundling.
    fn count(&mut self, now: Instant, verdict: Verdict, buf: &[u8]) -> Verdict {
        match verdict {
            Verdict::Forward(_) => {
                self.counters.forwarded_packets += 1;
                self.counters.forwarded_bytes += buf.len() as u64;
            }
            Verdict::Reply(_) => self.counters.replies += 1,
            Verdict::FanOut(group) => {
                let copies = self.groups.addrs(&group).len() as u64;
                self.counters.copies += copies;
                self.counters.forwarded_bytes += buf.len() as u64 * copies;
                // Copies too large for two to share a datagram go out as they are, without a
                // copy of the bytes.
                if let Some(b) = self.bundler.as_mut().filter(|_| Bundler::shares(buf.len())) {
                    for (node, addr) in self.groups.each(&group) {
                        b.push(now, node, addr, buf);
                    }
                    return Verdict::Consumed;
                }
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
                    Kind::SubscribeAck => self.feed_answer(now, from, buf),
                    Kind::Bundle => self.unbundle(now, from, buf),
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

    /// How many sources get a rate limit of their own: the nodes bound here plus those peer
    /// relays forward for, a few per binding.
    pub(super) fn max_sources(&self) -> usize {
        self.cfg.max_bindings.saturating_mul(SOURCES_PER_BINDING)
    }

    /// Rate-limit state currently held (one entry per source seen recently).
    #[must_use]
    pub fn rate_limited_sources(&self) -> usize {
        self.buckets.len()
    }

    /// Drops with a notice to the sender, if the notice budget allows and the notice is no
    /// larger than what provoked it.
    pub(super) fn refuse(&mut self, now: Instant, buf: &mut [u8], reason: DropReason, code: NoticeCode) -> Verdict {
        self.refuse_with(now, buf, reason, Notice { code, refusal: None })
    }

    pub(super) fn refuse_with(&mut self, now: Instant, buf: &mut [u8], reason: DropReason, notice: Notice) -> Verdict {
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
    pub(super) fn write_reply(&self, buf: &mut [u8], kind: Kind, to: NodeId, vc: VcId, body: &[u8]) -> Verdict {
        let h = Header { kind, source: self.id, destination: to, vc, trace: false };
        match wire::emit(buf, &h, &Route::DIRECT, 0, body) {
            Ok(n) => Verdict::Reply(n),
            Err(_) => Verdict::Drop(DropReason::Internal),
        }
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

mod binding;
mod feed;
mod publish;
#[cfg(test)]
mod tests;
