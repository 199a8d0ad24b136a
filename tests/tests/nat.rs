//! Players behind NATs in the simulator: relayed traffic works whatever the NAT, and a NAT's
//! filter stops direct datagrams until the host behind it has sent to the peer (the ground
//! hole punching stands on). Every assertion names the seed.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use shoal_mesh::endpoint::Path;
use shoal_mesh::wire::{Route, VcId};
use shoal_sdk::{Event, PathKind, Profile, VcKey};
use shoal_tests::link::LinkConfig;
use shoal_tests::nat::{NatConfig, NatStats};
use shoal_tests::punch::{Front, PairLinks, direct_possible, introduce, nat_pair, observed};
use shoal_tests::sim::{HostId, NatId, Sim};

const MS: Duration = Duration::from_millis(1);

/// Sends `message` on VC `vc` from `from` to `to`, opening it at `from` first if need be.
fn send(sim: &mut Sim, from: HostId, to: HostId, vc: u32, message: &[u8]) {
    let (now, peer) = (sim.now(), sim.node(to).id());
    let key = VcKey { peer, vc: VcId(vc) };
    if !sim.node(from).vcs().any(|k| k == key) {
        sim.node(from).open(now, peer, VcId(vc), Profile::reliable()).unwrap();
    }
    sim.node(from).send(key, message.to_vec()).unwrap();
    sim.flush(from);
}

fn recv_all(sim: &mut Sim, at: HostId, from: HostId, vc: u32) -> Vec<Vec<u8>> {
    let key = VcKey { peer: sim.node(from).id(), vc: VcId(vc) };
    std::iter::from_fn(|| sim.node(at).recv(key).map(|m| m.to_vec())).collect()
}

/// What a relay-first run through NATs saw, to compare runs of one seed.
#[derive(Debug, PartialEq)]
struct RelayFirst {
    observed: Vec<Option<SocketAddr>>,
    nats: Vec<NatStats>,
}

/// Two players behind home NATs and one behind a symmetric NAT, bound to two relays, open
/// reliable VCs to each other over the relays and talk, also after idling for longer than a
/// NAT mapping lives without traffic.
fn relay_first(seed: u64) -> RelayFirst {
    let mut sim = Sim::new(seed);
    sim.set_default_link(LinkConfig::latency(10 * MS));
    let (r1, r2) = (sim.add_relay(), sim.add_relay());
    let nats = [sim.add_nat(NatConfig::home()), sim.add_nat(NatConfig::home()), sim.add_nat(NatConfig::symmetric())];
    let nodes = nats.map(|n| sim.add_node_behind(n));
    let [a, b, c] = nodes;
    for &n in &nodes {
        sim.bind(n, r1);
        sim.bind(n, r2);
    }
    sim.run_for(Duration::from_millis(500));

    // Each relay saw the node at its NAT's mapping, never at its private address.
    let relays = [sim.addr(r1), sim.addr(r2)];
    let mut seen = Vec::new();
    for (&n, &nat) in nodes.iter().zip(&nats) {
        for &r in &relays {
            let o = observed(&sim, n, r);
            let o = o.unwrap_or_else(|| panic!("{n:?} never bound to {r} (seed {seed})"));
            assert_eq!(o.ip(), sim.nat_ip(nat), "seed {seed}");
            assert_eq!(Some(o), sim.mapping(n, r), "seed {seed}");
            assert_ne!(o, sim.addr(n), "seed {seed}");
            seen.push(Some(o));
        }
    }
    // Behind the home NATs one mapping serves both relays; the symmetric NAT made one each.
    assert_eq!(sim.mapping(a, relays[0]), sim.mapping(a, relays[1]), "seed {seed}");
    assert_ne!(sim.mapping(c, relays[0]), sim.mapping(c, relays[1]), "seed {seed}");
    let created: Vec<u64> = nats.iter().map(|&n| sim.nat_stats(n).mappings_created).collect();
    assert_eq!(created, [1, 1, 2], "seed {seed}");

    let routes: Vec<Route> = [r1, r2].iter().map(|&r| Route::new(&[sim.relay_id(r)]).unwrap()).collect();
    let paths: Vec<Path> = routes.iter().map(|&r| Path::Relayed(r)).collect();
    for &x in &nodes {
        for &y in &nodes {
            if x != y {
                introduce(&mut sim, x, y, paths.clone());
            }
        }
    }
    let pairs = [(a, b, 1), (a, c, 2), (c, b, 3)];
    for round in 0..2u8 {
        for &(x, y, vc) in &pairs {
            send(&mut sim, x, y, vc, &[b'q', round, vc as u8]);
        }
        sim.run_for(Duration::from_secs(1));
        for &(x, y, vc) in &pairs {
            assert_eq!(recv_all(&mut sim, y, x, vc), [vec![b'q', round, vc as u8]], "{x:?} to {y:?} (seed {seed})");
            send(&mut sim, y, x, vc, &[b'a', round, vc as u8]);
        }
        sim.run_for(Duration::from_secs(1));
        for &(x, y, vc) in &pairs {
            assert_eq!(recv_all(&mut sim, x, y, vc), [vec![b'a', round, vc as u8]], "{y:?} to {x:?} (seed {seed})");
            let now = sim.now();
            let key = VcKey { peer: sim.node(y).id(), vc: VcId(vc) };
            let kind = sim.node(x).stats(now, key).and_then(|s| s.path).map(|p| p.kind);
            assert_eq!(kind, Some(PathKind::OneRelay), "seed {seed}");
        }
        if round == 0 {
            // Idle for longer than a mapping lives without traffic: the relay keepalives
            // hold the mappings open.
            sim.run_for(Duration::from_secs(45));
        }
    }
    let stats: Vec<NatStats> = nats.iter().map(|&n| sim.nat_stats(n)).collect();
    for s in &stats {
        assert_eq!(s.expired, 0, "a mapping expired under keepalives (seed {seed}): {s:?}");
        assert_eq!(s.inbound_filtered, 0, "relayed traffic was filtered (seed {seed}): {s:?}");
        assert!(s.inbound_admitted > 0, "seed {seed}");
    }
    assert_eq!(sim.net_stats().filtered, 0, "seed {seed}");
    assert!(sim.events().iter().all(|(_, _, e)| !matches!(e, Event::RelayLost { .. })), "seed {seed}");
    RelayFirst { observed: seen, nats: stats }
}

#[test]
fn relayed_vcs_work_behind_home_and_symmetric_nats() {
    for seed in 0..3 {
        relay_first(seed);
    }
}

#[test]
fn the_same_seed_gives_the_same_mappings() {
    let nine = relay_first(9);
    assert_eq!(nine, relay_first(9));
    assert_ne!(nine.observed, relay_first(10).observed);
}

/// Two players behind NATs of kind `x` and `y`, each bound to one relay so that it has a
/// mapping the relay (and a rendezvous service) can report.
fn pair(seed: u64, x: NatConfig, y: NatConfig) -> (Sim, [HostId; 2], [NatId; 2], SocketAddr) {
    let mut sim = Sim::new(seed);
    sim.set_default_link(LinkConfig::latency(10 * MS));
    let r = sim.add_relay();
    let nats = [sim.add_nat(x), sim.add_nat(y)];
    let nodes = nats.map(|n| sim.add_node_behind(n));
    for n in nodes {
        sim.bind(n, r);
    }
    sim.run_for(Duration::from_millis(500));
    let relay = sim.addr(r);
    (sim, nodes, nats, relay)
}

#[test]
fn a_home_nat_filters_direct_datagrams_until_its_host_has_sent_to_the_peer() {
    let seed = 4;
    let (mut sim, [a, b], [na, nb], relay) = pair(seed, NatConfig::home(), NatConfig::home());
    // The addresses the relay reports.
    let (pa, pb) = (sim.mapping(a, relay).unwrap(), sim.mapping(b, relay).unwrap());
    let before = (sim.nat_stats(na), sim.nat_stats(nb), sim.net_stats());

    // A to B: B's NAT has never seen B send to A, so it drops the datagram...
    sim.send_raw(a, pb, b"knock".to_vec());
    sim.run_for(100 * MS);
    assert_eq!(sim.nat_stats(nb).inbound_filtered, before.1.inbound_filtered + 1, "seed {seed}");
    assert_eq!(sim.net_stats().filtered, before.2.filtered + 1, "seed {seed}");
    // ...but it left through A's one mapping, which now admits B.
    assert_eq!(sim.mapping(a, pb), Some(pa), "seed {seed}");
    sim.send_raw(b, pa, b"knock".to_vec());
    sim.run_for(100 * MS);
    assert_eq!(sim.nat_stats(na).inbound_admitted, before.0.inbound_admitted + 1, "seed {seed}");
    // B has now sent to A, so A's next datagram gets in.
    let admitted = sim.nat_stats(nb).inbound_admitted;
    sim.send_raw(a, pb, b"knock".to_vec());
    sim.run_for(100 * MS);
    assert_eq!(sim.nat_stats(nb).inbound_admitted, admitted + 1, "seed {seed}");
    assert_eq!(sim.net_stats().filtered, before.2.filtered + 1, "seed {seed}");
    // A port with no mapping admits nobody.
    let stranger = SocketAddr::new(pa.ip(), pa.port().wrapping_add(1));
    sim.send_raw(b, stranger, b"knock".to_vec());
    sim.run_for(100 * MS);
    assert_eq!(sim.net_stats().filtered, before.2.filtered + 2, "seed {seed}");
}

#[test]
fn a_direct_vc_opens_through_home_nats_once_both_sides_send() {
    let seed = 5;
    let (mut sim, [a, b], [_, nb], relay) = pair(seed, NatConfig::home(), NatConfig::home());
    let (pa, pb) = (sim.mapping(a, relay).unwrap(), sim.mapping(b, relay).unwrap());
    introduce(&mut sim, a, b, vec![Path::Direct(pb)]);
    introduce(&mut sim, b, a, vec![Path::Direct(pa)]);
    let filtered = sim.nat_stats(nb).inbound_filtered;

    // A alone: its hellos die at B's NAT.
    send(&mut sim, a, b, 1, b"ping");
    sim.run_for(Duration::from_secs(1));
    assert!(sim.nat_stats(nb).inbound_filtered > filtered, "seed {seed}");
    assert!(sim.node(b).vcs().next().is_none(), "a hello got through a closed NAT (seed {seed})");

    // B opens the same VC: its hello opens B's NAT to A, and A's NAT already admits B.
    let (now, ida) = (sim.now(), sim.node(a).id());
    sim.node(b).open(now, ida, VcId(1), Profile::reliable()).unwrap();
    sim.flush(b);
    sim.run_for(Duration::from_secs(3));
    assert_eq!(recv_all(&mut sim, b, a, 1), [b"ping".to_vec()], "seed {seed}");
    let (now, idb) = (sim.now(), sim.node(b).id());
    let kind = sim.node(a).stats(now, VcKey { peer: idb, vc: VcId(1) }).and_then(|s| s.path).map(|p| p.kind);
    assert_eq!(kind, Some(PathKind::Direct), "seed {seed}");
}

#[test]
fn a_symmetric_nat_maps_each_destination_apart_so_the_relay_reported_address_is_filtered() {
    let seed = 6;
    let (mut sim, [a, b], [na, nb], relay) = pair(seed, NatConfig::symmetric(), NatConfig::home());
    let (pa, pb) = (sim.mapping(a, relay).unwrap(), sim.mapping(b, relay).unwrap());
    // A sends to B: from a new port, not the one the relay saw.
    sim.send_raw(a, pb, b"knock".to_vec());
    let towards_b = sim.mapping(a, pb).unwrap();
    assert_ne!(towards_b, pa, "seed {seed}");
    assert_eq!(sim.nat_stats(na).mappings_created, 2, "seed {seed}");
    // B answers at the address the relay reported: A's NAT only lets the relay in there.
    let filtered = sim.nat_stats(na).inbound_filtered;
    sim.send_raw(b, pa, b"knock".to_vec());
    sim.run_for(100 * MS);
    assert_eq!(sim.nat_stats(na).inbound_filtered, filtered + 1, "seed {seed}");
    // At the mapping A's datagram came from, B gets in. A's datagram itself had died at B's
    // home NAT: B had sent to A's relay-facing mapping, not to that one.
    sim.send_raw(b, towards_b, b"knock".to_vec());
    sim.run_for(100 * MS);
    assert_eq!(sim.nat_stats(na).inbound_filtered, filtered + 1, "seed {seed}");
    assert!(sim.nat_stats(nb).inbound_filtered > 0, "seed {seed}");
}

#[test]
fn hosts_behind_one_nat_reach_each_other_privately_and_at_their_mapping_only_with_hairpinning() {
    for hairpin in [false, true] {
        let seed = 8;
        let mut sim = Sim::new(seed);
        let r = sim.add_relay();
        let nat = sim.add_nat(NatConfig::full_cone().with_hairpin(hairpin));
        let (a, b) = (sim.add_node_behind(nat), sim.add_node_behind(nat));
        sim.bind(b, r);
        sim.run_for(Duration::from_millis(500));
        let pb = sim.mapping(b, sim.addr(r)).unwrap();
        let delivered = sim.net_stats().delivered;

        // On the LAN: straight there, no mapping made.
        sim.send_raw(a, sim.addr(b), b"lan".to_vec());
        sim.run_for(100 * MS);
        assert_eq!(sim.net_stats().delivered, delivered + 1, "seed {seed}");
        assert_eq!(sim.mapping(a, sim.addr(b)), Some(sim.addr(a)), "seed {seed}");
        assert_eq!(sim.nat_stats(nat).mappings_created, 1, "seed {seed}");

        // At B's public mapping: looped back only by a hairpinning NAT, from A's mapping.
        sim.send_raw(a, pb, b"hairpin".to_vec());
        sim.run_for(100 * MS);
        let s = sim.nat_stats(nat);
        if hairpin {
            assert_eq!(sim.net_stats().delivered, delivered + 2, "seed {seed}");
            assert_eq!((s.hairpin_refused, s.mappings_created), (0, 2), "seed {seed}");
            assert_eq!(sim.mapping(a, pb).map(|m| m.ip()), Some(sim.nat_ip(nat)), "seed {seed}");
        } else {
            assert_eq!(sim.net_stats().delivered, delivered + 1, "seed {seed}");
            assert_eq!((s.hairpin_refused, s.mappings_created), (1, 1), "seed {seed}");
            assert_eq!(sim.net_stats().filtered, 1, "seed {seed}");
        }
    }
}

#[test]
fn a_rebound_host_leaves_through_a_new_mapping_and_its_old_address_goes_dead() {
    let seed = 12;
    let (mut sim, [a, b], [na, _], relay) = pair(seed, NatConfig::full_cone(), NatConfig::home());
    let (old_private, old_public) = (sim.addr(a), sim.mapping(a, relay).unwrap());
    let new_private = sim.rebind(a);
    assert_ne!(new_private, old_private);
    assert_eq!(sim.addr(a), new_private);
    assert_eq!(sim.mapping(a, relay), None, "seed {seed}");
    sim.send_raw(a, relay, b"hi".to_vec());
    let new_public = sim.mapping(a, relay).unwrap();
    assert_ne!(new_public, old_public, "seed {seed}");
    assert_eq!(sim.nat_stats(na).mappings_created, 2, "seed {seed}");
    // The old mapping still lives, and admits anyone, but leads to an address nobody holds
    // any more.
    let blackholed = sim.net_stats().blackholed;
    sim.send_raw(b, old_public, b"hi".to_vec());
    sim.run_for(100 * MS);
    assert_eq!(sim.net_stats().blackholed, blackholed + 1, "seed {seed}");

    // A host on the open network moves too.
    let r = sim.add_relay();
    let old = sim.addr(r);
    let new = sim.rebind(r);
    assert_eq!((new.ip(), sim.addr(r)), (old.ip(), new));
    assert_eq!(sim.mapping(r, relay), Some(new));
}

/// Every pair of fronts, over 10 ms links: both players open a reliable VC at once; the first
/// message goes over the relay; the VC goes direct where the NATs allow; both ways work.
#[test]
fn every_nat_pair_talks_at_once_over_the_relay_and_goes_direct_where_the_nats_allow() {
    let fronts = Front::all();
    let mut direct = 0;
    for (i, &x) in fronts.iter().enumerate() {
        for &y in &fronts[i..] {
            let seed = 100 + i as u64;
            let what = format!("{} / {} (seed {seed})", x.name(), y.name());
            let run = nat_pair(seed, x, y, PairLinks::fixed(10 * MS));
            assert!(run.observed.iter().all(Option::is_some), "not bound: {what}");
            assert!(run.first_message.is_some(), "the first message never arrived: {what}");
            // Each side's first path was the relay.
            assert_eq!(run.first_path, [Some(PathKind::OneRelay); 2], "{what}");
            // Both ways, on whatever path the VC settled on.
            assert!(run.both_ways, "{what}");
            let [ka, kb] = run.final_path;
            assert_eq!(ka, kb, "the two sides disagree: {what}");
            let kind = ka.unwrap_or_else(|| panic!("no path: {what}"));
            let expected = if direct_possible(x, y) { PathKind::Direct } else { PathKind::OneRelay };
            assert_eq!(kind, expected, "{what}");
            direct += usize::from(kind == PathKind::Direct);
        }
    }
    // Of the 21 pairs, those with two unpredictable mappings, and those with one against a
    // port-restricted filter, stay relayed.
    assert_eq!(direct, 16);
}
