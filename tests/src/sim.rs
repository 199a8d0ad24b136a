//! The deterministic network simulator: a virtual clock, hosts that run the sans-IO cores
//! (relays run the mesh [`Router`], players run the SDK [`Node`]), and links between every
//! pair of hosts with their own latency, jitter, loss, reordering, duplication and bandwidth.
//! Hosts crash and restart, pairs partition, and a relay can be made to flip bits.
//!
//! Every random choice comes from one seeded generator, so the same seed gives the same run.
//! Key material is the exception (the VC's ephemeral keys come from the system), and no
//! decision depends on its bytes.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use shoal_mesh::clock::WallClock;
use shoal_mesh::router::{Rate, Router, RouterConfig, Verdict};
use shoal_mesh::wire::{Datagram, Kind};
use shoal_protocol::{Identity, Roles, SignedTicket, TicketBody, TicketKind, UnixTime};
use shoal_sdk::{Event, Node};

use crate::link::{Link, LinkConfig};

/// Unix time at the start of every simulation.
pub const T0_UNIX: u64 = 1_800_000_000;

/// A host in the simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostId(pub usize);

#[derive(Debug)]
enum Core {
    Relay(Box<Router>),
    Node(Box<Node>),
}

#[derive(Debug)]
struct Host {
    addr: SocketAddr,
    core: Core,
    up: bool,
    /// Relays only: the config to restart with, and the peer relays to bind again.
    relay_cfg: Option<RouterConfig>,
    relay_peers: Vec<SocketAddr>,
    /// Relays only: chance to flip one bit of each data datagram they forward.
    tamper: f64,
}

/// A datagram in flight.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: Instant,
    seq: u64,
    to: usize,
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
    /// Dropped because the receiver was down or partitioned away.
    pub blackholed: u64,
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
    by_addr: BTreeMap<SocketAddr, usize>,
    links: BTreeMap<(usize, usize), Link>,
    default_link: LinkConfig,
    partitions: BTreeSet<(usize, usize)>,
    queue: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    events: Vec<(Instant, HostId, Event)>,
    stats: NetStats,
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
            links: BTreeMap::new(),
            default_link: LinkConfig::latency(Duration::from_millis(20)),
            partitions: BTreeSet::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            events: Vec::new(),
            stats: NetStats::default(),
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
        };
        let router = Router::new(cfg.clone(), self.clock(), self.now);
        self.push_host(Core::Relay(Box::new(router)), Some(cfg))
    }

    /// Adds a player node.
    pub fn add_node(&mut self) -> HostId {
        let identity = Identity::from_seed(self.rng.random());
        let node = Node::new(identity.clone(), self.permit(&identity, Roles::CLIENT), self.clock());
        self.push_host(Core::Node(Box::new(node)), None)
    }

    fn push_host(&mut self, core: Core, relay_cfg: Option<RouterConfig>) -> HostId {
        let addr = self.next_addr();
        let i = self.hosts.len();
        self.hosts.push(Host { addr, core, up: true, relay_cfg, relay_peers: Vec::new(), tamper: 0.0 });
        self.by_addr.insert(addr, i);
        HostId(i)
    }

    /// A host's address.
    pub fn addr(&self, h: HostId) -> SocketAddr {
        self.hosts[h.0].addr
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
        }
        self.drain(h.0);
    }

    /// Sends raw `bytes` to `to` as if host `from` had sent them: a forger on `from`'s
    /// address (an on-path attacker at a relay, say).
    pub fn inject(&mut self, from: HostId, to: HostId, bytes: Vec<u8>) {
        let addr = self.addr(to);
        self.send(from.0, addr, bytes);
    }

    /// Events the nodes reported, with when and where.
    pub fn events(&self) -> &[(Instant, HostId, Event)] {
        &self.events
    }

    /// Takes the events reported so far.
    pub fn take_events(&mut self) -> Vec<(Instant, HostId, Event)> {
        std::mem::take(&mut self.events)
    }

    fn send(&mut self, from: usize, to: SocketAddr, mut bytes: Vec<u8>) {
        self.stats.sent += 1;
        let Some(&dst) = self.by_addr.get(&to) else {
            self.stats.blackholed += 1;
            return;
        };
        if self.partitions.contains(&(from, dst)) {
            self.stats.blackholed += 1;
            return;
        }
        let default = self.default_link;
        let link = self.links.entry((from, dst)).or_insert_with(|| Link::new(default));
        let arrivals = link.transmit(self.now, bytes.len(), &mut self.rng);
        if arrivals.is_empty() {
            self.stats.lost += 1;
        }
        let from_addr = self.hosts[from].addr;
        let n = arrivals.len();
        for (i, at) in arrivals.into_iter().enumerate() {
            self.seq += 1;
            let b = if i + 1 == n { std::mem::take(&mut bytes) } else { bytes.clone() };
            self.queue.push(Reverse(InFlight { at, seq: self.seq, to: dst, from: from_addr, bytes: b }));
        }
    }

    /// Sends everything host `i` has queued, and collects its events.
    fn drain(&mut self, i: usize) {
        let mut out = Vec::new();
        match &mut self.hosts[i].core {
            Core::Relay(r) => {
                while let Some(t) = r.poll_transmit() {
                    out.push((t.to, t.bytes));
                }
                while r.poll_event().is_some() {}
            }
            Core::Node(n) => {
                while let Some(t) = n.poll_transmit() {
                    out.push((t.to, t.bytes));
                }
                while let Some(e) = n.poll_event() {
                    self.events.push((self.now, HostId(i), e));
                }
            }
        }
        for (to, bytes) in out {
            self.send(i, to, bytes);
        }
    }

    fn deliver(&mut self, f: InFlight) {
        let i = f.to;
        if !self.hosts[i].up {
            self.stats.blackholed += 1;
            return;
        }
        self.stats.delivered += 1;
        let now = self.now;
        let mut bytes = f.bytes;
        let mut out: Option<(SocketAddr, usize)> = None;
        let tamper = self.hosts[i].tamper;
        match &mut self.hosts[i].core {
            Core::Node(n) => n.handle_datagram(now, f.from, &bytes),
            Core::Relay(r) => match r.handle_datagram(now, f.from, &mut bytes) {
                Verdict::Forward(to) => out = Some((to, bytes.len())),
                Verdict::Reply(len) | Verdict::DropWithNotice(_, len) => out = Some((f.from, len)),
                Verdict::Drop(_) | Verdict::Consumed => {}
            },
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

    fn next_timer(&self) -> Option<(Instant, usize)> {
        let now = self.now;
        self.hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.up)
            .filter_map(|(i, h)| {
                let t = match &h.core {
                    Core::Relay(r) => Some(r.poll_timeout()),
                    Core::Node(n) => n.poll_timeout(now),
                };
                t.map(|t| (t.max(now), i))
            })
            .min()
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
            let timer = self.next_timer();
            let next = match (next_packet, timer) {
                (Some(p), Some((t, _))) => p.min(t),
                (Some(p), None) => p,
                (None, Some((t, _))) => t,
                (None, None) => until,
            };
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
            if let Some((_, i)) = timer {
                let now = self.now;
                spins = if spins.0 == now { (now, spins.1 + 1) } else { (now, 0) };
                if spins.1 > 100_000 {
                    panic!("host {i} spins on its timer at {:?} (seed {})", self.elapsed(), self.seed);
                }
                match &mut self.hosts[i].core {
                    Core::Relay(r) => r.handle_timeout(now),
                    Core::Node(n) => n.handle_timeout(now),
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
