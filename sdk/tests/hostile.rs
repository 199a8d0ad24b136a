//! What a hostile sender can do to a node, with two nodes wired in memory on a virtual clock:
//! forged and replayed hellos open nothing and cost a bounded amount of checking, and a peer
//! cannot make a VC probe any number of addresses.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shoal_mesh::clock::WallClock;
use shoal_mesh::endpoint::Path;
use shoal_mesh::wire::{self, Header, Kind, Route, VcId};
use shoal_protocol::{Identity, Roles, SignedTicket, TicketBody, TicketKind, UnixTime};
use shoal_sdk::crypto::{Ephemeral, HelloBody};
use shoal_sdk::frame::write_hello;
use shoal_sdk::path::MAX_LEARNED_PATHS;
use shoal_sdk::{MAX_VCS_PER_PEER, Node, PeerInfo, Profile, VcKey};

const T0_UNIX: u64 = 1_800_000_000;
const HOP: Duration = Duration::from_millis(1);

fn addr(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, last], port))
}

struct Net {
    t0: Instant,
    now: Instant,
    clock: WallClock,
    control: Identity,
    nodes: Vec<(SocketAddr, Node, Identity)>,
    queue: VecDeque<(Instant, SocketAddr, SocketAddr, Vec<u8>)>,
    /// Datagrams each node sent, by index.
    sent: Vec<usize>,
}

impl Net {
    fn new() -> Net {
        let t0 = Instant::now();
        let clock = WallClock::new(t0, T0_UNIX * 1_000_000);
        Net {
            t0,
            now: t0,
            clock,
            control: Identity::from_seed([200; 32]),
            nodes: Vec::new(),
            queue: VecDeque::new(),
            sent: Vec::new(),
        }
    }

    fn permit(&self, id: &Identity) -> SignedTicket {
        TicketBody::new(TicketKind::RelayPermit, id.public_key(), Roles::CLIENT, UnixTime(T0_UNIX), 3600)
            .sign(&self.control)
    }

    fn add(&mut self, seed: u8) -> usize {
        let id = Identity::from_seed([seed; 32]);
        let node = Node::new(id.clone(), self.permit(&id), self.clock);
        self.nodes.push((addr(seed, 7000), node, id));
        self.sent.push(0);
        self.nodes.len() - 1
    }

    /// Introduces `a` and `b` to each other over their direct addresses.
    fn introduce(&mut self, a: usize, b: usize) {
        let now = self.now;
        let (ka, kb) = (self.nodes[a].2.public_key(), self.nodes[b].2.public_key());
        let (aa, ab) = (self.nodes[a].0, self.nodes[b].0);
        self.nodes[a].1.add_peer(now, PeerInfo { key: kb, paths: vec![Path::Direct(ab)] });
        self.nodes[b].1.add_peer(now, PeerInfo { key: ka, paths: vec![Path::Direct(aa)] });
    }

    fn drain(&mut self, i: usize) {
        let from = self.nodes[i].0;
        while let Some(t) = self.nodes[i].1.poll_transmit() {
            self.sent[i] += 1;
            self.queue.push_back((self.now + HOP, from, t.to, t.bytes));
        }
        while self.nodes[i].1.poll_event().is_some() {}
    }

    /// Delivers `bytes` to node `to` as if they came from `from`, now.
    fn inject(&mut self, from: SocketAddr, to: usize, bytes: &[u8]) {
        let now = self.now;
        self.nodes[to].1.handle_datagram(now, from, bytes);
        self.drain(to);
    }

    /// Runs for `d`, delivering datagrams; `tap` sees each one first and may keep it from
    /// being delivered (returns false) or change where it seems to come from.
    fn run(&mut self, d: Duration, mut tap: impl FnMut(&mut SocketAddr, SocketAddr, &[u8]) -> bool) {
        let end = self.now + d;
        while self.now < end {
            self.now += Duration::from_micros(500);
            let now = self.now;
            for i in 0..self.nodes.len() {
                if self.nodes[i].1.poll_timeout(now).is_some_and(|t| t <= now) {
                    self.nodes[i].1.handle_timeout(now);
                }
                self.drain(i);
            }
            while self.queue.front().is_some_and(|q| q.0 <= now) {
                let (_, mut from, to, bytes) = self.queue.pop_front().unwrap();
                if !tap(&mut from, to, &bytes) {
                    continue;
                }
                let Some(i) = self.nodes.iter().position(|n| n.0 == to) else { continue };
                self.nodes[i].1.handle_datagram(now, from, &bytes);
                self.drain(i);
            }
        }
    }

    fn unix_ms(&self) -> u64 {
        self.clock.unix_us(self.now) / 1000
    }
}

/// A mesh data datagram from `source` to `dest` on `vc`, carrying `frame`, direct.
fn datagram(source: &Identity, dest: &Identity, vc: VcId, frame: &[u8]) -> Vec<u8> {
    let h = Header { kind: Kind::Data, source: source.node_id(), destination: dest.node_id(), vc, trace: false };
    let mut buf = vec![0; wire::MAX_DATAGRAM];
    let n = wire::emit(&mut buf, &h, &Route::DIRECT, 0, frame).unwrap();
    buf.truncate(n);
    buf
}

/// A hello claiming to come from `claimed` to `to` on `vc`, signed by `signer`, carrying
/// `key` as the sender's static key, at `unix_ms`.
fn hello(signer: &Identity, key: &Identity, to: &Identity, vc: VcId, unix_ms: u64) -> Vec<u8> {
    let body = HelloBody {
        ephemeral: Ephemeral::generate().unwrap().public(),
        static_key: key.public_key(),
        unix_ms,
        profile: Profile::realtime(false).config.to_wire(),
    };
    // The signature covers the claimed sender's id; a forger signs with its own key.
    let sig = body.sign(signer, to.node_id(), vc);
    write_hello(&body, &sig)
}

#[test]
fn forged_hellos_open_no_vc_and_draw_no_datagram() {
    let mut net = Net::new();
    let (a, b) = (net.add(1), net.add(2));
    net.introduce(a, b);
    net.run(Duration::from_millis(10), |_, _, _| true);
    let (ia, ib) = (net.nodes[a].2.clone(), net.nodes[b].2.clone());
    let attacker = Identity::from_seed([66; 32]);
    let sent_before = net.sent[b];
    let ms = net.unix_ms();
    // Signed by the attacker, carrying the attacker's key, then carrying A's key: both claim
    // to be A, from the attacker's own address.
    for key in [&attacker, &ia] {
        let frame = hello(&attacker, key, &ib, VcId(1), ms);
        let d = datagram(&ia, &ib, VcId(1), &frame);
        net.inject(addr(66, 9999), b, &d);
    }
    // A genuine signature by A for another node, and one for another VC id.
    let other = Identity::from_seed([3; 32]);
    for (to, vc) in [(&other, VcId(1)), (&ib, VcId(2))] {
        let frame = hello(&ia, &ia, to, vc, ms);
        let d = datagram(&ia, &ib, VcId(1), &frame);
        net.inject(addr(66, 9999), b, &d);
    }
    // A's genuine hello from two minutes in the past is too old to open anything.
    let frame = hello(&ia, &ia, &ib, VcId(1), ms - 180_000);
    net.inject(addr(66, 9999), b, &datagram(&ia, &ib, VcId(1), &frame));
    assert_eq!(net.nodes[b].1.vcs().count(), 0, "a forged hello opened a VC");
    assert_eq!(net.sent[b], sent_before, "B answered a forged hello");
    assert_eq!(net.nodes[b].1.counters().bad_hellos, 5);
}

#[test]
fn a_captured_hello_cannot_open_its_vc_again() {
    let mut net = Net::new();
    let (a, b) = (net.add(1), net.add(2));
    net.introduce(a, b);
    let (ia, ib) = (net.nodes[a].2.clone(), net.nodes[b].2.clone());
    let now = net.now;
    net.nodes[a].1.open(now, ib.node_id(), VcId(1), Profile::reliable()).unwrap();
    net.drain(a);
    // An eavesdropper keeps A's first hello.
    let mut captured = None;
    net.run(Duration::from_millis(100), |_, to, bytes| {
        if to == addr(2, 7000) && captured.is_none() {
            captured = Some(bytes.to_vec());
        }
        true
    });
    let key = VcKey { peer: ia.node_id(), vc: VcId(1) };
    assert!(net.nodes[b].1.stats(net.now, key).is_some(), "B did not open its side");
    // A closes the VC; B forgets it.
    let now = net.now;
    net.nodes[a].1.close(now, VcKey { peer: ib.node_id(), vc: VcId(1) });
    net.drain(a);
    net.run(Duration::from_millis(100), |_, _, _| true);
    assert_eq!(net.nodes[b].1.vcs().count(), 0);
    let sent_before = net.sent[b];
    net.inject(addr(66, 9999), b, &captured.unwrap());
    assert_eq!(net.nodes[b].1.vcs().count(), 0, "a replayed hello reopened the VC");
    assert_eq!(net.sent[b], sent_before);
    assert_eq!(net.nodes[b].1.counters().replayed_hellos, 1);
}

#[test]
fn a_flood_of_hellos_naming_a_peer_costs_a_bounded_number_of_checks() {
    let mut net = Net::new();
    let (a, b) = (net.add(1), net.add(2));
    net.introduce(a, b);
    let (ia, ib) = (net.nodes[a].2.clone(), net.nodes[b].2.clone());
    let attacker = Identity::from_seed([66; 32]);
    let ms = net.unix_ms();
    let frame = hello(&attacker, &ia, &ib, VcId(1), ms);
    let d = datagram(&ia, &ib, VcId(1), &frame);
    for _ in 0..1000 {
        net.inject(addr(66, 9999), b, &d);
    }
    let c = net.nodes[b].1.counters();
    assert!(c.bad_hellos <= 20, "{c:?}");
    assert_eq!(c.bad_hellos + c.hello_flood, 1000);
    // The genuine peer still gets through once the budget refills.
    net.run(Duration::from_secs(1), |_, _, _| true);
    let now = net.now;
    net.nodes[a].1.open(now, ib.node_id(), VcId(1), Profile::reliable()).unwrap();
    net.drain(a);
    net.run(Duration::from_millis(100), |_, _, _| true);
    assert!(net.nodes[b].1.stats(net.now, VcKey { peer: ia.node_id(), vc: VcId(1) }).is_some());
}

#[test]
fn a_peer_opens_at_most_the_cap_of_vcs() {
    let mut net = Net::new();
    let (a, b) = (net.add(1), net.add(2));
    net.introduce(a, b);
    let (ia, ib) = (net.nodes[a].2.clone(), net.nodes[b].2.clone());
    let ms = net.unix_ms();
    for vc in 1..=MAX_VCS_PER_PEER as u32 + 4 {
        let frame = hello(&ia, &ia, &ib, VcId(vc), ms);
        net.inject(addr(1, 7000), b, &datagram(&ia, &ib, VcId(vc), &frame));
        // Past the burst of hello checks, a genuine peer waits for the budget.
        net.run(Duration::from_millis(60), |_, _, _| true);
    }
    assert_eq!(net.nodes[b].1.vcs().count(), MAX_VCS_PER_PEER);
    assert_eq!(net.nodes[b].1.counters().too_many_vcs, 4);
}

#[test]
fn a_peer_cannot_make_a_vc_probe_any_number_of_addresses() {
    let mut net = Net::new();
    let (a, b) = (net.add(1), net.add(2));
    net.introduce(a, b);
    let (ia, ib) = (net.nodes[a].2.clone(), net.nodes[b].2.clone());
    let now = net.now;
    let ka = net.nodes[a].1.open(now, ib.node_id(), VcId(1), Profile::realtime(false)).unwrap();
    net.drain(a);
    net.run(Duration::from_millis(100), |_, _, _| true);
    // A (or whoever captures A's frames) sends genuine frames to B from 300 addresses, one
    // each: every frame authenticates.
    let mut port = 20_000u16;
    for i in 0..300u32 {
        net.nodes[a].1.send(ka, i.to_be_bytes().to_vec()).unwrap();
        let now = net.now;
        net.nodes[a].1.handle_timeout(now);
        net.drain(a);
        net.run(Duration::from_millis(2), |from, to, _| {
            if *from == addr(1, 7000) && to == addr(2, 7000) {
                port += 1;
                *from = SocketAddr::from(([10, 9, (port >> 8) as u8, port as u8], port));
            }
            true
        });
    }
    let kb = VcKey { peer: ia.node_id(), vc: VcId(1) };
    let mut got = 0;
    while net.nodes[b].1.recv(kb).is_some() {
        got += 1;
    }
    assert!(got > 250, "B should still take A's messages: {got}");
    let stats = net.nodes[b].1.stats(net.now, kb).unwrap();
    assert!(stats.paths.len() <= 1 + MAX_LEARNED_PATHS, "{} paths", stats.paths.len());
    assert!(net.nodes[b].1.counters().paths_evicted > 0);
    // Probing stays bounded too: B sends a bounded number of datagrams a second.
    let before = net.sent[b];
    net.run(Duration::from_secs(5), |_, _, _| true);
    let per_sec = (net.sent[b] - before) / 5;
    assert!(per_sec < 500, "B sends {per_sec} datagrams a second");
    let _ = net.t0;
}
