//! The deterministic network simulator: a virtual clock, hosts that run the sans-IO cores
//! (relays run the mesh [`Router`], players run the SDK [`Node`]), and links between every
//! pair of hosts with their own latency, jitter, loss, reordering, duplication and bandwidth.
//! Hosts crash and restart, pairs partition, and a relay can be made to flip bits.
//!
//! Players can sit behind NATs ([`Sim::add_nat`], [`Sim::add_node_behind`]): such a host has a
//! private address, what it sends to the outside leaves with the NAT's public mapping as its
//! source, and what arrives at the NAT's public address reaches it only through a live mapping
//! whose filter admits the sender. The NAT translates; the link between the two hosts still
//! decides latency and loss.
//!
//! Every random choice comes from one seeded generator, so the same seed gives the same run.
//! Key material is the exception (the VC's ephemeral keys come from the system), and no
//! decision depends on its bytes.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use shoal_mesh::clock::WallClock;
use shoal_mesh::router::{Rate, Router, RouterConfig, Verdict};
use shoal_mesh::wire::{Datagram, Kind};
use shoal_protocol::{Identity, Roles, SignedTicket, TicketBody, TicketKind, UnixTime};
use shoal_sdk::{Event, Node, NodeOutcome, SessionCore, SessionEvent, VcKey};

use self::control::ControlPlane;
pub use self::control::{CONTROL_ADDR, ControlConfig, ControlStats};
use self::timers::Timers;
use crate::link::{Link, LinkConfig};
use crate::nat::{Nat, NatConfig, NatStats};

mod control;
mod timers;

/// Unix time at the start of every simulation.
pub const T0_UNIX: u64 = 1_800_000_000;

/// A host in the simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostId(pub usize);

/// A NAT box in the simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NatId(pub usize);

/// Most NATs a simulation holds: one public address each, in 203.0.113.0/24.
pub const MAX_NATS: usize = 254;

/// Most hosts behind one NAT: one private address each, in `192.168.<nat>.0/24`.
pub const MAX_HOSTS_PER_NAT: usize = 254;

#[derive(Debug)]
enum Core {
    Relay(Box<Router>),
    Node(Box<Node>),
}

#[derive(Debug)]
struct Host {
    /// The host's own socket address: public, or private when it is behind a NAT.
    addr: SocketAddr,
    /// The NAT it sits behind, if any.
    nat: Option<usize>,
    core: Core,
    up: bool,
    /// Relays only: the config to restart with, and the peer relays to bind again.
    relay_cfg: Option<RouterConfig>,
    relay_peers: Vec<SocketAddr>,
    /// Relays only: chance to flip one bit of each data datagram they forward.
    tamper: f64,
    /// Players only: the session that signs the node in to the control server.
    session: Option<Box<SessionCore>>,
    /// Datagrams and their bytes (UDP payload) the host sent.
    sent: (u64, u64),
}

/// Where a datagram in flight is headed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Dest {
    /// A host's own socket address.
    Host(SocketAddr),
    /// A NAT's public address; the NAT translates (or refuses) the datagram when it arrives,
    /// so that its filter sees the mappings of that moment.
    Nat(usize, SocketAddr),
}

/// A datagram in flight.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: Instant,
    seq: u64,
    to: Dest,
    from: SocketAddr,
    bytes: Vec<u8>,
}

/// Totals the network saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Datagrams handed to links.
    pub sent: u64,
    /// Datagrams delivered to a live host.
    pub delivered: u64,
    /// Lost on a link (loss model or full queue).
    pub lost: u64,
    /// Dropped because the receiver was down, partitioned away or had no such address.
    pub blackholed: u64,
    /// Dropped by a NAT: no live mapping on the port, the filter refused the sender, or a
    /// host sent to its own NAT's public address and the NAT does not hairpin.
    pub filtered: u64,
    /// Bits a tampering relay flipped.
    pub tampered: u64,
}

/// The simulator. See the module docs.
#[derive(Debug)]
pub struct Sim {
    seed: u64,
    t0: Instant,
    now: Instant,
    rng: Xoshiro256PlusPlus,
    control: Identity,
    hosts: Vec<Host>,
    /// Hosts on the open network, by address.
    by_addr: BTreeMap<SocketAddr, usize>,
    /// Hosts behind NATs, by private address.
    private: BTreeMap<SocketAddr, usize>,
    nats: Vec<Nat>,
    /// NATs by public address.
    nat_by_ip: BTreeMap<IpAddr, usize>,
    links: BTreeMap<(usize, usize), Link>,
    default_link: LinkConfig,
    partitions: BTreeSet<(usize, usize)>,
    queue: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    events: Vec<(Instant, HostId, Event)>,
    stats: NetStats,
    timers: Timers,
    control_plane: Option<Box<ControlPlane>>,
    session_events: Vec<(Instant, HostId, SessionEvent)>,
}

impl Sim {
    /// An empty network whose randomness all comes from `seed`.
    pub fn new(seed: u64) -> Sim {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let control = Identity::from_seed(rng.random());
        let t0 = Instant::now();
        Sim {
            seed,
            t0,
            now: t0,
            rng,
            control,
            hosts: Vec::new(),
            by_addr: BTreeMap::new(),
            private: BTreeMap::new(),
            nats: Vec::new(),
            nat_by_ip: BTreeMap::new(),
            links: BTreeMap::new(),
            default_link: LinkConfig::latency(Duration::from_millis(20)),
            partitions: BTreeSet::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            events: Vec::new(),
            stats: NetStats::default(),
            timers: Timers::default(),
            control_plane: None,
            session_events: Vec::new(),
        }
    }

    /// The seed, for failure messages.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Virtual now.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    /// The seeded generator, for scenarios that draw their own parameters.
    pub fn rng(&mut self) -> &mut Xoshiro256PlusPlus {
        &mut self.rng
    }

    /// The clock every host shares.
    pub fn clock(&self) -> WallClock {
        WallClock::new(self.t0, T0_UNIX * 1_000_000)
    }

    /// Totals so far.
    pub fn net_stats(&self) -> NetStats {
        self.stats
    }

    fn permit(&self, id: &Identity, roles: Roles) -> SignedTicket {
        TicketBody::new(TicketKind::RelayPermit, id.public_key(), roles, UnixTime(T0_UNIX), 86_400).sign(&self.control)
    }

    fn next_addr(&self) -> SocketAddr {
        let n = self.hosts.len() as u32 + 1;
        SocketAddr::from(([10, (n >> 16) as u8, (n >> 8) as u8, n as u8], 7000))
    }

    /// Adds a relay.
    pub fn add_relay(&mut self) -> HostId {
        let identity = Identity::from_seed(self.rng.random());
        let lots = Rate { per_sec: 1e9, burst: 1e9 };
        let cfg = RouterConfig {
            permit: Some(self.permit(&identity, Roles::RELAY)),
            identity,
            control_key: self.control.public_key(),
            source_packets: lots,
            source_bytes: lots,
            bind_verifications: lots,
            notices: Rate { per_sec: 1000.0, burst: 100.0 },
            max_bindings: 10_000,
            cookie_secret: self.rng.random(),
            fanout: shoal_mesh::fanout::FanoutConfig::default(),
        };
        let router = Router::new(cfg.clone(), self.clock(), self.now);
        let addr = self.next_addr();
        self.push_host(addr, None, Core::Relay(Box::new(router)), Some(cfg))
    }

    /// Adds a player node.
    pub fn add_node(&mut self) -> HostId {
        let core = self.player();
        let addr = self.next_addr();
        self.push_host(addr, None, core, None)
    }

    fn player(&mut self) -> Core {
        let identity = Identity::from_seed(self.rng.random());
        let node = Node::new(identity.clone(), self.permit(&identity, Roles::CLIENT), self.clock());
        Core::Node(Box::new(node))
    }

    fn push_host(
        &mut self,
        addr: SocketAddr,
        nat: Option<usize>,
        core: Core,
        relay_cfg: Option<RouterConfig>,
    ) -> HostId {
        let i = self.hosts.len();
        let mut core = core;
        if let Core::Node(n) = &mut core {
            // As the driver does: the node knows its socket's own address.
            n.set_local_addr(addr);
        }
        let relay_peers = Vec::new();
        self.hosts.push(Host {
            addr,
            nat,
            core,
            up: true,
            relay_cfg,
            relay_peers,
            tamper: 0.0,
            session: None,
            sent: (0, 0),
        });
        let table = if nat.is_some() { &mut self.private } else { &mut self.by_addr };
        table.insert(addr, i);
        self.timers.touch(i);
        HostId(i)
    }

    /// Adds a NAT box behaving as `cfg`, with its own public address (203.0.113.x, apart
    /// from the 10.x addresses of hosts on the open network). Its ports start at a point drawn
    /// from the seeded generator.
    ///
    /// # Panics
    /// Past [`MAX_NATS`]: a scenario bug.
    #[allow(clippy::panic)]
    pub fn add_nat(&mut self, cfg: NatConfig) -> NatId {
        let i = self.nats.len();
        if i >= MAX_NATS {
            panic!("more than {MAX_NATS} NATs");
        }
        let ip = IpAddr::from([203, 0, 113, i as u8 + 1]);
        self.nats.push(Nat::new(ip, cfg, self.rng.random()));
        self.nat_by_ip.insert(ip, i);
        NatId(i)
    }

    /// Adds a player node behind `nat`, at private address `192.168.<nat>.<n>:7000`.
    ///
    /// # Panics
    /// Past [`MAX_HOSTS_PER_NAT`] hosts behind one NAT: a scenario bug.
    #[allow(clippy::panic)]
    pub fn add_node_behind(&mut self, nat: NatId) -> HostId {
        let behind = self.hosts.iter().filter(|h| h.nat == Some(nat.0)).count();
        if behind >= MAX_HOSTS_PER_NAT {
            panic!("more than {MAX_HOSTS_PER_NAT} hosts behind NAT {nat:?}");
        }
        let core = self.player();
        let addr = SocketAddr::from(([192, 168, nat.0 as u8, behind as u8 + 1], 7000));
        self.push_host(addr, Some(nat.0), core, None)
    }

    /// A host's own address: the one its socket is bound to, private for a host behind a
    /// NAT (see [`Sim::mapping`] for the address others see).
    pub fn addr(&self, h: HostId) -> SocketAddr {
        self.hosts[h.0].addr
    }

    /// The NAT a host sits behind, if any.
    pub fn nat_of(&self, h: HostId) -> Option<NatId> {
        self.hosts[h.0].nat.map(NatId)
    }

    /// A NAT's public IP address.
    pub fn nat_ip(&self, nat: NatId) -> IpAddr {
        self.nats[nat.0].public_ip()
    }

    /// What a NAT has done so far.
    pub fn nat_stats(&self, nat: NatId) -> NatStats {
        self.nats[nat.0].stats()
    }

    /// The source address `dst` sees host `h`'s datagrams come from, without sending
    /// anything: `h`'s own address if it is on the open network or `dst` is on its side of
    /// the NAT, else its NAT's live mapping towards `dst` (`None` until `h` has sent there,
    /// or after the mapping expired). Behind an endpoint-independent mapping this is the
    /// same for every destination; behind a symmetric NAT it is not.
    pub fn mapping(&self, h: HostId, dst: SocketAddr) -> Option<SocketAddr> {
        let host = &self.hosts[h.0];
        let Some(x) = host.nat else { return Some(host.addr) };
        if self.private.get(&dst).is_some_and(|&i| self.hosts[i].nat == Some(x)) {
            return Some(host.addr);
        }
        self.nats[x].mapping(self.now, host.addr, dst)
    }

    /// Moves host `h` to a new port (its socket rebound, or a phone changing network): later
    /// datagrams leave from the new address (behind a NAT, through a new mapping), and
    /// datagrams to the old one are lost. Returns the new address.
    pub fn rebind(&mut self, h: HostId) -> SocketAddr {
        let old = self.hosts[h.0].addr;
        let port = if old.port() == u16::MAX { 1024 } else { old.port() + 1 };
        let new = SocketAddr::new(old.ip(), port);
        let table = if self.hosts[h.0].nat.is_some() { &mut self.private } else { &mut self.by_addr };
        table.remove(&old);
        table.insert(new, h.0);
        self.hosts[h.0].addr = new;
        new
    }

    /// The address relay `r` forwards to for `node`: where it last bound it.
    ///
    /// # Panics
    /// If `r` is not a relay: a scenario bug.
    #[allow(clippy::panic)]
    pub fn relay_binding(&self, r: HostId, node: shoal_protocol::NodeId) -> Option<SocketAddr> {
        match &self.hosts[r.0].core {
            Core::Relay(router) => router.lookup(node),
            Core::Node(_) => panic!("host {r:?} is not a relay"),
        }
    }

    /// Relay `r`'s counters.
    ///
    /// # Panics
    /// If `r` is not a relay: a scenario bug.
    #[allow(clippy::panic)]
    pub fn relay_counters(&self, r: HostId) -> shoal_mesh::metrics::Counters {
        match &self.hosts[r.0].core {
            Core::Relay(router) => router.counters().clone(),
            Core::Node(_) => panic!("host {r:?} is not a relay"),
        }
    }

    /// Fan-out groups relay `r` holds, and memberships across them.
    pub fn relay_groups(&self, r: HostId) -> (usize, usize) {
        match &self.hosts[r.0].core {
            Core::Relay(router) => router.groups(),
            Core::Node(_) => panic!("host {r:?} is not a relay"),
        }
    }

    /// Datagrams host `h` sent, and their bytes (UDP payload), so far.
    pub fn sent_by(&self, h: HostId) -> (u64, u64) {
        self.hosts[h.0].sent
    }

    /// A relay's node id.
    pub fn relay_id(&self, h: HostId) -> shoal_protocol::NodeId {
        match &self.hosts[h.0].core {
            Core::Relay(r) => r.id(),
            Core::Node(n) => n.id(),
        }
    }

    /// The player node at `h`.
    ///
    /// # Panics
    /// If `h` is a relay: a scenario bug.
    #[allow(clippy::panic)]
    pub fn node(&mut self, h: HostId) -> &mut Node {
        // The caller may change what the node waits for.
        self.timers.touch(h.0);
        match &mut self.hosts[h.0].core {
            Core::Node(n) => n,
            Core::Relay(_) => panic!("host {h:?} is a relay"),
        }
    }

    /// Sets the link between `a` and `b`, both directions.
    pub fn link(&mut self, a: HostId, b: HostId, cfg: LinkConfig) {
        self.links.insert((a.0, b.0), Link::new(cfg));
        self.links.insert((b.0, a.0), Link::new(cfg));
    }

    /// Sets the link used between hosts that have none of their own.
    pub fn set_default_link(&mut self, cfg: LinkConfig) {
        self.default_link = cfg;
    }

    /// Cuts (or restores) both directions between `a` and `b`.
    pub fn partition(&mut self, a: HostId, b: HostId, cut: bool) {
        for k in [(a.0, b.0), (b.0, a.0)] {
            if cut {
                self.partitions.insert(k);
            } else {
                self.partitions.remove(&k);
            }
        }
    }

    /// Makes a relay flip one bit in the body of each data datagram it forwards, with chance
    /// `p`.
    pub fn tamper(&mut self, relay: HostId, p: f64) {
        self.hosts[relay.0].tamper = p;
    }

    /// Binds relay `a` to relay `b` (for routes through both).
    pub fn peer_relays(&mut self, a: HostId, b: HostId) {
        let (aa, ba) = (self.addr(a), self.addr(b));
        let now = self.now;
        for (x, y) in [(a.0, ba), (b.0, aa)] {
            self.hosts[x].relay_peers.push(y);
            if let Core::Relay(r) = &mut self.hosts[x].core {
                r.set_peer_owner(true);
                r.add_peer(y, now);
            }
        }
        self.drain(a.0);
        self.drain(b.0);
    }

    /// Starts binding node `n` to relay `r`.
    pub fn bind(&mut self, n: HostId, r: HostId) {
        let (addr, now) = (self.addr(r), self.now);
        self.node(n).add_relay(now, addr);
        self.drain(n.0);
    }

    /// Stops a host: it loses everything in flight to it and all its state.
    pub fn crash(&mut self, h: HostId) {
        self.hosts[h.0].up = false;
        self.timers.touch(h.0);
    }

    /// Restarts a crashed relay with empty state (no bindings); nodes bind again when it
    /// tells them so.
    pub fn restart(&mut self, h: HostId) {
        let now = self.now;
        let clock = self.clock();
        let host = &mut self.hosts[h.0];
        host.up = true;
        if let Some(cfg) = host.relay_cfg.clone() {
            let mut r = Router::new(cfg, clock, now);
            if !host.relay_peers.is_empty() {
                r.set_peer_owner(true);
            }
            for p in &host.relay_peers {
                r.add_peer(*p, now);
            }
            host.core = Core::Relay(Box::new(r));
            self.register_relay(h.0);
        }
        self.drain(h.0);
    }

    /// Sends raw `bytes` to `to` as if host `from` had sent them: a forger on `from`'s
    /// address (an on-path attacker at a relay, say). They are addressed to `to`'s own
    /// address, which for a host behind a NAT only hosts behind the same NAT reach; see
    /// [`Sim::send_raw`] to aim at a mapping.
    pub fn inject(&mut self, from: HostId, to: HostId, bytes: Vec<u8>) {
        let addr = self.addr(to);
        self.send(from.0, addr, bytes);
    }

    /// Sends raw `bytes` from host `from` to address `to`, through `from`'s NAT if it has
    /// one, exactly as the host's own datagrams go.
    pub fn send_raw(&mut self, from: HostId, to: SocketAddr, bytes: Vec<u8>) {
        self.send(from.0, to, bytes);
    }

    /// Events the nodes reported, with when and where. A player's node events go to its
    /// session instead, which passes them on ([`Sim::take_session_events`]).
    pub fn events(&self) -> &[(Instant, HostId, Event)] {
        &self.events
    }

    /// Takes the events the players' sessions reported so far, with when and where.
    pub fn take_session_events(&mut self) -> Vec<(Instant, HostId, SessionEvent)> {
        std::mem::take(&mut self.session_events)
    }

    /// Takes the events reported so far.
    pub fn take_events(&mut self) -> Vec<(Instant, HostId, Event)> {
        std::mem::take(&mut self.events)
    }

    fn send(&mut self, from: usize, to: SocketAddr, mut bytes: Vec<u8>) {
        self.stats.sent += 1;
        let sent = &mut self.hosts[from].sent;
        *sent = (sent.0 + 1, sent.1 + bytes.len() as u64);
        let now = self.now;
        let (src, nat) = (self.hosts[from].addr, self.hosts[from].nat);
        // Out through the sender's NAT, unless the receiver is on the same side of it.
        let from_addr = match nat {
            Some(x) if self.private.get(&to).is_some_and(|&i| self.hosts[i].nat == Some(x)) => src,
            Some(x) if to.ip() == self.nats[x].public_ip() => match self.nats[x].hairpin(now, src, to) {
                Some(public) => public,
                None => {
                    self.stats.filtered += 1;
                    return;
                }
            },
            Some(x) => self.nats[x].outbound(now, src, to),
            None => src,
        };
        // Where it goes, and the host it will reach if nothing changes on the way.
        let (dest, dst) = if let Some(&n) = self.nat_by_ip.get(&to.ip()) {
            let dst = self.nats[n].target(now, to).and_then(|a| self.private.get(&a).copied());
            (Dest::Nat(n, to), dst)
        } else if let Some(&i) = self.by_addr.get(&to) {
            (Dest::Host(to), Some(i))
        } else if let Some(&i) = self.private.get(&to).filter(|&&i| nat.is_some() && self.hosts[i].nat == nat) {
            (Dest::Host(to), Some(i))
        } else {
            self.stats.blackholed += 1;
            return;
        };
        let arrivals = match dst {
            Some(dst) => {
                if self.partitions.contains(&(from, dst)) {
                    self.stats.blackholed += 1;
                    return;
                }
                let default = self.default_link;
                let link = self.links.entry((from, dst)).or_insert_with(|| Link::new(default));
                link.transmit(now, bytes.len(), &mut self.rng)
            }
            // A port with no mapping yet: the datagram still travels (a mapping may open
            // before it arrives, as when a peer predicts a symmetric NAT's next port), over a
            // default link.
            None => Link::new(self.default_link).transmit(now, bytes.len(), &mut self.rng),
        };
        if arrivals.is_empty() {
            self.stats.lost += 1;
        }
        let n = arrivals.len();
        for (i, at) in arrivals.into_iter().enumerate() {
            self.seq += 1;
            let b = if i + 1 == n { std::mem::take(&mut bytes) } else { bytes.clone() };
            self.queue.push(Reverse(InFlight { at, seq: self.seq, to: dest, from: from_addr, bytes: b }));
        }
    }

    /// Sends everything host `i` has queued, and collects its events. A player's node events
    /// go to its session, whose node commands are applied and answered here, until neither
    /// has anything more; what the session asks of its control link goes to the control plane.
    fn drain(&mut self, i: usize) {
        let now = self.now;
        let mut out = Vec::new();
        let mut links = Vec::new();
        let host = &mut self.hosts[i];
        match &mut host.core {
            Core::Relay(r) => {
                while let Some(t) = r.poll_transmit() {
                    out.push((t.to, t.bytes));
                }
                while r.poll_event().is_some() {}
            }
            Core::Node(n) => loop {
                while let Some(t) = n.poll_transmit() {
                    out.push((t.to, t.bytes));
                }
                let Some(s) = host.session.as_mut() else {
                    while let Some(e) = n.poll_event() {
                        self.events.push((now, HostId(i), e));
                    }
                    break;
                };
                let mut busy = false;
                while let Some(e) = n.poll_event() {
                    busy = true;
                    s.handle_node_event(now, e);
                }
                // Messages on the avatar VC are the session's, as the tokio driver hands them.
                if let Some(vc) = s.avatar_vc() {
                    let peers: Vec<_> = s.avatar_mesh().map(|m| m.neighbours().collect()).unwrap_or_default();
                    for peer in peers {
                        let key = VcKey { peer, vc };
                        while let Some(m) = n.recv(key) {
                            busy = true;
                            s.handle_avatar_message(now, peer, &m);
                        }
                    }
                }
                while let Some(c) = s.poll_command() {
                    busy = true;
                    match c.apply(n, now) {
                        Some(NodeOutcome::Unbind(unbinds)) => out.extend(unbinds.into_iter().map(|t| (t.to, t.bytes))),
                        Some(outcome) => s.handle_node_outcome(now, outcome),
                        None => {}
                    }
                }
                while let Some(t) = s.poll_transmit() {
                    busy = true;
                    links.push(t);
                }
                while let Some(e) = s.poll_event() {
                    busy = true;
                    self.session_events.push((now, HostId(i), e));
                }
                if !busy {
                    break;
                }
            },
        }
        for (to, bytes) in out {
            self.send(i, to, bytes);
        }
        for t in links {
            self.link_command(i, t);
        }
        self.timers.touch(i);
    }

    fn deliver(&mut self, f: InFlight) {
        let now = self.now;
        let to = match f.to {
            Dest::Host(a) => a,
            Dest::Nat(x, public) => match self.nats[x].inbound(now, f.from, public) {
                Some(a) => a,
                None => {
                    self.stats.filtered += 1;
                    return;
                }
            },
        };
        let Some(&i) = self.by_addr.get(&to).or_else(|| self.private.get(&to)) else {
            // Nobody holds the address any more: the host rebound since.
            self.stats.blackholed += 1;
            return;
        };
        if !self.hosts[i].up {
            self.stats.blackholed += 1;
            return;
        }
        self.stats.delivered += 1;
        let mut bytes = f.bytes;
        let mut out: Option<(SocketAddr, usize)> = None;
        // A fan-out's members but the last, which `out` takes with the buffer itself.
        let mut copies: Vec<SocketAddr> = Vec::new();
        let tamper = self.hosts[i].tamper;
        match &mut self.hosts[i].core {
            Core::Node(n) => n.handle_datagram(now, f.from, &bytes),
            Core::Relay(r) => match r.handle_datagram(now, f.from, &mut bytes) {
                Verdict::Forward(to) => out = Some((to, bytes.len())),
                Verdict::Reply(len) | Verdict::DropWithNotice(_, len) => out = Some((f.from, len)),
                Verdict::FanOut(group) => {
                    copies.extend_from_slice(r.copies_for(&group));
                    out = copies.pop().map(|to| (to, bytes.len()));
                }
                Verdict::Drop(_) | Verdict::Consumed => {}
            },
        }
        for to in copies {
            self.send(i, to, bytes.clone());
        }
        if let Some((to, len)) = out {
            bytes.truncate(len);
            if tamper > 0.0 && self.rng.random_bool(tamper) {
                self.flip_body_bit(&mut bytes);
            }
            self.send(i, to, bytes);
        }
        self.drain(i);
    }

    fn flip_body_bit(&mut self, bytes: &mut [u8]) {
        let body_at = match Datagram::parse(bytes) {
            Ok(d) if d.kind() == Kind::Data && !d.body().is_empty() => bytes.len() - d.body().len(),
            _ => return,
        };
        let at = self.rng.random_range(body_at..bytes.len());
        let bit = self.rng.random_range(0..8u8);
        bytes[at] ^= 1 << bit;
        self.stats.tampered += 1;
    }

    /// The next host timer, after reading again the timers of hosts that changed.
    fn next_timer(&mut self) -> Option<(Instant, usize)> {
        let (now, hosts) = (self.now, &self.hosts);
        self.timers.refresh(|i| {
            let h = &hosts[i];
            if !h.up {
                return None;
            }
            match &h.core {
                Core::Relay(r) => Some(r.poll_timeout()),
                Core::Node(n) => {
                    let session = h.session.as_ref().and_then(|s| s.poll_timeout());
                    n.poll_timeout(now).into_iter().chain(session).min()
                }
            }
        });
        self.timers.next(now)
    }

    /// Runs the network until `until` (virtual), delivering datagrams and firing timers in
    /// time order.
    ///
    /// # Panics
    /// If a host asks to be woken at the same instant 100,000 times in a row: a core that
    /// never advances its timer. The message names the seed.
    #[allow(clippy::panic)]
    pub fn run_until(&mut self, until: Instant) {
        let mut spins = (self.now, 0u32);
        loop {
            let next_packet = self.queue.peek().map(|Reverse(f)| f.at);
            let control = self.control_plane.as_ref().map(|cp| cp.next_at().max(self.now));
            let timer = self.next_timer();
            let next = [next_packet, control, timer.map(|(t, _)| t)].into_iter().flatten().min().unwrap_or(until);
            if next > until {
                self.now = until;
                return;
            }
            self.now = next.max(self.now);
            if next_packet == Some(next) {
                if let Some(Reverse(f)) = self.queue.pop() {
                    self.deliver(f);
                }
                continue;
            }
            if control == Some(next) {
                self.step_control();
                continue;
            }
            if let Some((_, i)) = timer {
                let now = self.now;
                spins = if spins.0 == now { (now, spins.1 + 1) } else { (now, 0) };
                if spins.1 > 100_000 {
                    panic!("host {i} spins on its timer at {:?} (seed {})", self.elapsed(), self.seed);
                }
                let host = &mut self.hosts[i];
                match (&mut host.core, &mut host.session) {
                    (Core::Relay(r), _) => r.handle_timeout(now),
                    (Core::Node(n), None) => n.handle_timeout(now),
                    (Core::Node(n), Some(s)) => {
                        if s.poll_timeout().is_some_and(|t| t <= now) {
                            s.handle_timeout(now);
                        }
                        if n.poll_timeout(now).is_some_and(|t| t <= now) {
                            n.handle_timeout(now);
                        }
                    }
                }
                self.drain(i);
            }
        }
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// Runs for `d`, handing control to `app` every `step` (the game's frame).
    pub fn run_with(&mut self, d: Duration, step: Duration, mut app: impl FnMut(&mut Sim)) {
        let until = self.now + d;
        while self.now < until {
            app(self);
            self.run_for(step.min(until - self.now));
        }
    }

    /// After `f` has changed a node (opened a VC, sent), sends what it queued.
    pub fn flush(&mut self, h: HostId) {
        self.drain(h.0);
    }
}
