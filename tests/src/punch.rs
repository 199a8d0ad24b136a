//! Hole punching between two players, the scenario that the NAT matrix test and
//! `shoal-sim-bench nat` share. Each player sits in front of a NAT model (or on a public
//! address); both are bound to one relay and introduced to each other with the relay route and
//! the address the relay saw for the other, as the control server does. They open one
//! Reliable VC at the same moment, A sends a first message, and the run records when it
//! arrived, which paths each side's VC took and when, and whether both ways work at the end.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use shoal_mesh::endpoint::Path;
use shoal_mesh::wire::{Route, VcId};
use shoal_protocol::NodeId;
use shoal_sdk::{Event, PathKind, PeerInfo, Profile, VcEvent, VcKey};

use crate::link::LinkConfig;
use crate::nat::{Filtering, Mapping, NatConfig};
use crate::sim::{HostId, Sim};

/// How long the binds to the relay get before the players are introduced.
const BIND_FOR: Duration = Duration::from_millis(500);
/// How finely the first message's arrival is timed.
const FIRST_STEP: Duration = Duration::from_micros(100);
/// From the open, how long the first message may take before the run counts it lost.
const FIRST_LIMIT: Duration = Duration::from_secs(2);
/// From the open, how long the VC gets to settle on a path: one punching attempt (a second of
/// probes) after the keys agree, and the hold a relayed VC waits before it moves to a direct
/// path that is not clearly faster (at least a second, or ten RTTs of the relayed path).
const SETTLE_FOR: Duration = Duration::from_secs(3);
/// How long the messages sent both ways at the end get to arrive.
const BOTH_WAYS_FOR: Duration = Duration::from_secs(1);

/// The NAT in front of a player: none (a public address) or one of the models.
#[derive(Debug, Clone, Copy)]
pub enum Front {
    /// A public address, no NAT.
    Public,
    /// Behind a NAT of this model, with its name.
    Behind(&'static str, fn() -> NatConfig),
}

impl Front {
    /// Every front of the matrix: public, then the NAT models from the most open to the
    /// symmetric one.
    pub fn all() -> [Front; 6] {
        [
            Front::Public,
            Front::Behind("full cone", NatConfig::full_cone),
            Front::Behind("address-restricted", NatConfig::address_restricted),
            Front::Behind("home (port-restricted)", NatConfig::home),
            Front::Behind("address-dependent mapping", NatConfig::address_dependent),
            Front::Behind("symmetric", NatConfig::symmetric),
        ]
    }

    /// Its name, for reports.
    pub fn name(self) -> &'static str {
        match self {
            Front::Public => "public",
            Front::Behind(name, _) => name,
        }
    }

    /// Whether the mapping towards the peer is the one the relay saw (endpoint-independent).
    pub fn predictable(self) -> bool {
        match self {
            Front::Public => true,
            Front::Behind(_, cfg) => cfg().mapping == Mapping::EndpointIndependent,
        }
    }

    /// Whether a peer that has been sent to may come in from another port of its address.
    pub fn admits_other_ports(self) -> bool {
        match self {
            Front::Public => true,
            Front::Behind(_, cfg) => cfg().filtering != Filtering::AddressAndPortDependent,
        }
    }
}

/// Whether two players can reach each other directly, from the NAT models alone. Both send to
/// the address the relay saw for the other. Between two predictable mappings, each side's
/// probes open its own filter for the other's, and a later probe gets through. If one
/// mapping is not predictable, its probes come from a port the other side never sent to:
/// they get in only if that side's filter admits other ports of an address it sent to; the
/// receiver then learns the new port from the authenticated probe and answers there.
pub fn direct_possible(x: Front, y: Front) -> bool {
    match (x.predictable(), y.predictable()) {
        (true, true) => true,
        (false, true) => y.admits_other_ports(),
        (true, false) => x.admits_other_ports(),
        (false, false) => false,
    }
}

/// One-way latencies of a pair's three links. The NATs translate; these links between the
/// hosts decide the delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairLinks {
    /// Player A to the relay.
    pub a_relay: Duration,
    /// The relay to player B.
    pub relay_b: Duration,
    /// A to B straight (also the link of datagrams to a NAT port nobody is mapped to yet).
    pub direct: Duration,
}

impl PairLinks {
    /// Every link `one_way`.
    pub fn fixed(one_way: Duration) -> PairLinks {
        PairLinks { a_relay: one_way, relay_b: one_way, direct: one_way }
    }

    /// Links drawn from `seed`: each leg of the relayed path 5–40 ms, and the direct path
    /// anywhere the triangle inequality allows beside them, from the legs' difference (at
    /// least 5 ms) to their sum: a relay is a detour, of any length.
    pub fn random(seed: u64) -> PairLinks {
        // Apart from the simulator's own generator, which the same seed starts.
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ 0x7075_6e63_685f_6c6b);
        let mut us = |lo: u64, hi: u64| Duration::from_micros(rng.random_range(lo..=hi));
        let (a_relay, relay_b) = (us(5_000, 40_000), us(5_000, 40_000));
        let lo = a_relay.abs_diff(relay_b).max(Duration::from_millis(5));
        let direct = us(lo.as_micros() as u64, (a_relay + relay_b).as_micros() as u64);
        PairLinks { a_relay, relay_b, direct }
    }

    /// Round trip over the relay.
    pub fn relay_rtt(&self) -> Duration {
        2 * (self.a_relay + self.relay_b)
    }

    /// Round trip over the direct path.
    pub fn direct_rtt(&self) -> Duration {
        2 * self.direct
    }
}

/// What one run of [`nat_pair`] saw. Times are from the moment both sides opened the VC;
/// arrays are `[at A, at B]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PairRun {
    /// The links it ran over.
    pub links: PairLinks,
    /// Where the relay saw each player (`None`: it never bound).
    pub observed: [Option<SocketAddr>; 2],
    /// When A's first message reached B's application, if it arrived intact.
    pub first_message: Option<Duration>,
    /// The kind of the first path each side's VC chose.
    pub first_path: [Option<PathKind>; 2],
    /// When each side's VC first moved to a direct path.
    pub direct_at: [Option<Duration>; 2],
    /// The kind of the path each side's VC was on at the end.
    pub final_path: [Option<PathKind>; 2],
    /// Whether a message sent each way at the end arrived, and nothing else did.
    pub both_ways: bool,
}

impl PairRun {
    /// When both sides were on a direct path: the later of the two moves.
    pub fn direct_upgrade(&self) -> Option<Duration> {
        let [a, b] = self.direct_at;
        Some(a?.max(b?))
    }

    /// Whether any message got through.
    pub fn talked(&self) -> bool {
        self.first_message.is_some() || self.both_ways
    }

    /// Whether both sides ended on a direct path.
    pub fn ended_direct(&self) -> bool {
        self.final_path == [Some(PathKind::Direct); 2]
    }
}

/// Two players, A in front of `x` and B in front of `y`, over `links`: see the module docs.
/// The first message's arrival is timed to within 0.1 ms; the VC then gets a few seconds to
/// settle before a message is sent each way.
pub fn nat_pair(seed: u64, x: Front, y: Front, links: PairLinks) -> PairRun {
    let mut sim = Sim::new(seed);
    sim.set_default_link(LinkConfig::latency(links.direct));
    let r = sim.add_relay();
    let (a, b) = (place(&mut sim, x), place(&mut sim, y));
    sim.link(a, r, LinkConfig::latency(links.a_relay));
    sim.link(r, b, LinkConfig::latency(links.relay_b));
    sim.link(a, b, LinkConfig::latency(links.direct));
    sim.bind(a, r);
    sim.bind(b, r);
    sim.run_for(BIND_FOR);
    let relay = sim.addr(r);
    let via = Route::new(&[sim.relay_id(r)]).map(Path::Relayed);
    let observed = [observed(&sim, a, relay), observed(&sim, b, relay)];
    let paths = |other: Option<SocketAddr>| via.into_iter().chain(other.map(Path::Direct)).collect();
    introduce(&mut sim, a, b, paths(observed[1]));
    introduce(&mut sim, b, a, paths(observed[0]));
    sim.take_events();

    let (ida, idb) = (sim.node(a).id(), sim.node(b).id());
    let (at_a, at_b) = (VcKey { peer: idb, vc: VcId(1) }, VcKey { peer: ida, vc: VcId(1) });
    let t0 = sim.now();
    let opened_b = sim.node(b).open(t0, ida, VcId(1), Profile::reliable()).is_ok();
    sim.flush(b);
    let opened_a = sim.node(a).open(t0, idb, VcId(1), Profile::reliable()).is_ok();
    let sent = opened_a && opened_b && sim.node(a).send(at_a, b"first".to_vec()).is_ok();
    sim.flush(a);

    let mut first_message = None;
    while sent && sim.now() < t0 + FIRST_LIMIT {
        sim.run_for(FIRST_STEP);
        if let Some(m) = sim.node(b).recv(at_b) {
            first_message = (m.as_ref() == b"first").then(|| sim.now() - t0);
            break;
        }
    }
    sim.run_until(t0 + SETTLE_FOR);
    let first_path = [first_kind(&sim, a, idb, t0), first_kind(&sim, b, ida, t0)];
    let direct_at = [direct_since(&sim, a, idb, t0), direct_since(&sim, b, ida, t0)];

    // Both ways, on whatever path the VC settled on.
    let sent_ab = sim.node(a).send(at_a, b"a to b".to_vec()).is_ok();
    sim.flush(a);
    let sent_ba = sim.node(b).send(at_b, b"b to a".to_vec()).is_ok();
    sim.flush(b);
    sim.run_for(BOTH_WAYS_FOR);
    let got_b = recv_all(&mut sim, b, at_b);
    let got_a = recv_all(&mut sim, a, at_a);
    let both_ways = sent_ab && sent_ba && got_b == [b"a to b".to_vec()] && got_a == [b"b to a".to_vec()];
    let now = sim.now();
    let kind = |sim: &mut Sim, h: HostId, key| sim.node(h).stats(now, key).and_then(|s| s.path).map(|p| p.kind);
    let final_path = [kind(&mut sim, a, at_a), kind(&mut sim, b, at_b)];
    PairRun { links, observed, first_message, first_path, direct_at, final_path, both_ways }
}

fn place(sim: &mut Sim, f: Front) -> HostId {
    match f {
        Front::Public => sim.add_node(),
        Front::Behind(_, cfg) => {
            let nat = sim.add_nat(cfg());
            sim.add_node_behind(nat)
        }
    }
}

/// Where a relay saw a node, from the node's `RelayBound` events.
pub fn observed(sim: &Sim, node: HostId, relay: SocketAddr) -> Option<SocketAddr> {
    sim.events().iter().rev().find_map(|(_, h, e)| match e {
        Event::RelayBound { addr, observed, .. } if *h == node && *addr == relay => Some(*observed),
        _ => None,
    })
}

/// Introduces `y` to `x` with the paths `to_y`, as the control server would.
pub fn introduce(sim: &mut Sim, x: HostId, y: HostId, to_y: Vec<Path>) {
    let (now, key) = (sim.now(), sim.node(y).public_key());
    sim.node(x).add_peer(now, PeerInfo { key, paths: to_y });
}

fn recv_all(sim: &mut Sim, at: HostId, key: VcKey) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| sim.node(at).recv(key).map(|m| m.to_vec())).collect()
}

/// The paths `h`'s VCs with `peer` moved to, with when (since `t0`).
fn path_changes(sim: &Sim, h: HostId, peer: NodeId, t0: Instant) -> impl Iterator<Item = (Duration, PathKind)> + '_ {
    sim.events().iter().filter_map(move |(t, at, e)| match e {
        Event::Vc(k, VcEvent::PathChanged { new, .. }) if *at == h && k.peer == peer => {
            Some((t.saturating_duration_since(t0), new.kind))
        }
        _ => None,
    })
}

fn first_kind(sim: &Sim, h: HostId, peer: NodeId, t0: Instant) -> Option<PathKind> {
    path_changes(sim, h, peer, t0).next().map(|(_, k)| k)
}

fn direct_since(sim: &Sim, h: HostId, peer: NodeId, t0: Instant) -> Option<Duration> {
    path_changes(sim, h, peer, t0).find(|(_, k)| *k == PathKind::Direct).map(|(t, _)| t)
}
