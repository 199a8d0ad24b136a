//! Address changes in the simulator: a player whose NAT gives it a new mapping without telling
//! it, or whose game moves it to a new socket (Wi-Fi to cellular), keeps its VCs. A reliable
//! stream sent across the change arrives whole and in order, the relay forwards to the new
//! address once the moved node has proved itself again, and the peer learns the new address
//! and punches it where its NAT needs that. Every assertion names the seed.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use shoal_mesh::endpoint::Path;
use shoal_mesh::wire::{Route, VcId};
use shoal_sdk::{PathKind, PeerInfo, Profile, VcKey};
use shoal_tests::link::LinkConfig;
use shoal_tests::nat::NatConfig;
use shoal_tests::punch::observed;
use shoal_tests::sim::{HostId, Sim};

const MS: Duration = Duration::from_millis(1);
/// Messages in the stream, one every 10 ms.
const STREAM: u32 = 400;

/// Where a player sits: on the open network, or behind a NAT of this kind.
#[derive(Debug, Clone, Copy)]
enum Front {
    Public,
    Behind(fn() -> NatConfig),
}

/// How the move happens.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Move {
    /// The NAT (or the network) gives the node a new address and the node is not told.
    Silent,
    /// The game rebinds the node's socket and tells the node.
    Told,
}

/// What a run saw, to compare runs of one seed.
#[derive(Debug, PartialEq)]
struct Roamed {
    /// The path kind each side's VC ended on.
    kinds: [PathKind; 2],
    /// The moved node's address as the relay and the peer see it, after the move.
    new_addr: SocketAddr,
    /// Direct candidates the peer took up from the moved node's advertisements.
    learned: u64,
    /// Frames each side sent.
    frames: [u64; 2],
}

fn place(sim: &mut Sim, f: Front) -> HostId {
    match f {
        Front::Public => sim.add_node(),
        Front::Behind(cfg) => {
            let nat = sim.add_nat(cfg());
            sim.add_node_behind(nat)
        }
    }
}

fn kind(sim: &mut Sim, at: HostId, key: VcKey) -> PathKind {
    let now = sim.now();
    sim.node(at).stats(now, key).and_then(|s| s.path).map(|p| p.kind).unwrap()
}

/// A (in front of `x`) streams `STREAM` numbered messages to B (in front of `y`) on a
/// reliable VC that has settled on its best path; a second into the stream A moves.
fn roam(seed: u64, x: Front, y: Front, how: Move) -> Roamed {
    let mut sim = Sim::new(seed);
    sim.set_default_link(LinkConfig::latency(10 * MS));
    let r = sim.add_relay();
    let (a, b) = (place(&mut sim, x), place(&mut sim, y));
    sim.bind(a, r);
    sim.bind(b, r);
    sim.run_for(Duration::from_millis(500));
    let relay = sim.addr(r);
    let via = Path::Relayed(Route::new(&[sim.relay_id(r)]).unwrap());
    let (oa, ob) = (observed(&sim, a, relay).unwrap(), observed(&sim, b, relay).unwrap());
    let (ka, kb) = (sim.node(a).public_key(), sim.node(b).public_key());
    let now = sim.now();
    sim.node(a).add_peer(now, PeerInfo { key: kb, paths: vec![via, Path::Direct(ob)] });
    sim.node(b).add_peer(now, PeerInfo { key: ka, paths: vec![via, Path::Direct(oa)] });
    let (ida, idb) = (sim.node(a).id(), sim.node(b).id());
    let (ab, ba) = (VcKey { peer: idb, vc: VcId(1) }, VcKey { peer: ida, vc: VcId(1) });
    sim.node(a).open(now, idb, VcId(1), Profile::reliable()).unwrap();
    sim.node(b).open(now, ida, VcId(1), Profile::reliable()).unwrap();
    sim.flush(a);
    sim.flush(b);
    sim.run_for(Duration::from_secs(3));
    let before = kind(&mut sim, a, ab);

    let mut sent = 0u32;
    let mut got = Vec::new();
    let mut moved = None;
    sim.run_with(Duration::from_secs(12), 10 * MS, |sim| {
        if sent < STREAM {
            sim.node(a).send(ab, sent.to_be_bytes().to_vec()).unwrap();
            sim.flush(a);
            sent += 1;
        }
        if sent == 100 && moved.is_none() {
            let new = sim.rebind(a);
            if how == Move::Told {
                let now = sim.now();
                sim.node(a).set_local_addr(new);
                sim.node(a).network_changed(now);
                sim.flush(a);
            }
            moved = Some(new);
        }
        while let Some(m) = sim.node(b).recv(ba) {
            got.push(u32::from_be_bytes(m[..].try_into().unwrap()));
        }
    });
    assert_ne!(moved, None, "seed {seed}");
    assert_eq!(got, (0..STREAM).collect::<Vec<_>>(), "the stream lost or reordered messages (seed {seed})");

    // The relay forwards to where A is now, which is where A's NAT maps it towards the relay.
    let now_at_relay = sim.mapping(a, relay).unwrap();
    assert_ne!(now_at_relay, oa, "A did not move (seed {seed})");
    assert_eq!(sim.relay_binding(r, ida), Some(now_at_relay), "seed {seed}");
    let kinds = [kind(&mut sim, a, ab), kind(&mut sim, b, ba)];
    if before == PathKind::Direct {
        // Back on a direct path, at A's new address as B sees it.
        assert_eq!(kinds, [PathKind::Direct; 2], "seed {seed}");
        let now = sim.now();
        let path = sim.node(b).stats(now, ba).and_then(|s| s.path).unwrap().path;
        assert_eq!(Some(path), sim.mapping(a, sim.addr(b)).map(Path::Direct), "seed {seed}");
    }
    let now = sim.now();
    let stats = [sim.node(a).stats(now, ab).unwrap(), sim.node(b).stats(now, ba).unwrap()];
    for s in &stats {
        assert_eq!(s.counters.auth_failures, 0, "seed {seed}");
    }
    Roamed {
        kinds,
        new_addr: now_at_relay,
        learned: stats[1].counters.candidates_learned,
        frames: [stats[0].counters.frames_sent, stats[1].counters.frames_sent],
    }
}

#[test]
fn a_direct_vc_behind_home_nats_survives_a_nat_rebinding_the_node_never_heard_of() {
    // B's NAT admits only addresses B has sent to: it is B's punching towards A's new
    // mapping, which A advertises once the relay reports it, that brings the direct path back.
    for seed in 0..3 {
        let r = roam(seed, Front::Behind(NatConfig::home), Front::Behind(NatConfig::home), Move::Silent);
        assert_eq!(r.kinds, [PathKind::Direct; 2], "seed {seed}");
        assert_eq!(r.learned, 1, "seed {seed}");
    }
}

#[test]
fn a_player_who_changes_network_keeps_a_direct_vc_to_a_public_peer() {
    for seed in 0..3 {
        let r = roam(seed, Front::Behind(NatConfig::home), Front::Public, Move::Told);
        assert_eq!(r.kinds, [PathKind::Direct; 2], "seed {seed}");
    }
}

#[test]
fn a_relayed_vc_follows_a_symmetric_nat_player_to_its_new_mapping() {
    for seed in 0..3 {
        let r = roam(seed, Front::Behind(NatConfig::symmetric), Front::Behind(NatConfig::home), Move::Silent);
        assert_eq!(r.kinds, [PathKind::OneRelay; 2], "seed {seed}");
    }
}

#[test]
fn a_public_player_that_rebinds_its_socket_keeps_streaming() {
    for seed in 0..3 {
        let r = roam(seed, Front::Public, Front::Behind(NatConfig::full_cone), Move::Told);
        assert_eq!(r.kinds, [PathKind::Direct; 2], "seed {seed}");
    }
}

#[test]
fn the_same_seed_roams_the_same_way() {
    let run = || roam(7, Front::Behind(NatConfig::home), Front::Behind(NatConfig::home), Move::Silent);
    assert_eq!(run(), run());
}
