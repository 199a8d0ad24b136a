//! Keepalives towards relays in the simulator: a node behind a NAT measures how long the
//! NAT keeps a silent mapping (a mapping that expired comes back at a new port, which the
//! relay reports) and settles on a keepalive just inside that; a node on the open network has
//! no mapping to hold and only renews its binding. Every assertion names the seed.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use shoal_mesh::bind::{KEEPALIVE, KEEPALIVE_MAX};
use shoal_tests::link::LinkConfig;
use shoal_tests::nat::NatConfig;
use shoal_tests::sim::Sim;

const S: Duration = Duration::from_secs(1);

/// One node in front of `nat` (or on the open network), bound to one relay and otherwise
/// silent for `minutes`; returns the keepalive it settled on, the mappings that expired in the
/// first and in the second half of the run, and whether it was still bound.
fn idle(seed: u64, nat: Option<NatConfig>, minutes: u64) -> (Duration, [u64; 2], bool) {
    let mut sim = Sim::new(seed);
    sim.set_default_link(LinkConfig::latency(Duration::from_millis(15)));
    let r = sim.add_relay();
    let (n, nat) = match nat {
        Some(cfg) => {
            let nat = sim.add_nat(cfg);
            (sim.add_node_behind(nat), Some(nat))
        }
        None => (sim.add_node(), None),
    };
    sim.bind(n, r);
    let half = Duration::from_secs(minutes * 30);
    sim.run_for(half);
    let first = nat.map_or(0, |x| sim.nat_stats(x).expired);
    sim.run_for(half);
    let second = nat.map_or(0, |x| sim.nat_stats(x).expired) - first;
    let relay = sim.addr(r);
    let (keepalive, _) = sim.node(n).endpoint().keepalive(relay).unwrap();
    let bound = sim.node(n).endpoint().bound_relays().any(|(_, a)| a == relay);
    // Wherever the node is, the relay forwards to where the node's NAT maps it now.
    let id = sim.node(n).id();
    assert_eq!(sim.relay_binding(r, id), sim.mapping(n, relay), "seed {seed}");
    (keepalive, [first, second], bound)
}

#[test]
fn a_node_behind_a_nat_settles_on_a_keepalive_just_inside_the_mapping_lifetime() {
    for (seed, lifetime) in [(1, 30 * S), (2, 50 * S), (3, 90 * S)] {
        let (keepalive, [first, second], bound) = idle(seed, Some(NatConfig::home().with_timeout(lifetime)), 30);
        assert!(bound, "seed {seed}");
        assert!(
            keepalive < lifetime && keepalive >= lifetime * 3 / 4,
            "keepalive {keepalive:?} for a {lifetime:?} mapping (seed {seed})"
        );
        assert!(keepalive > KEEPALIVE, "seed {seed}");
        // Finding the lifetime costs a few expired mappings; once found, none expire.
        assert!((1..=4).contains(&first), "{first} expiries while searching (seed {seed})");
        assert_eq!(second, 0, "mappings expired after the keepalive settled (seed {seed})");
    }
}

#[test]
fn a_nat_quicker_than_the_default_gets_keepalives_often_enough() {
    let seed = 4;
    let (keepalive, [first, second], bound) = idle(seed, Some(NatConfig::home().with_timeout(10 * S)), 20);
    assert!(bound, "seed {seed}");
    assert!(keepalive < 10 * S && keepalive >= 7 * S, "{keepalive:?} (seed {seed})");
    assert!(first <= 4, "{first} (seed {seed})");
    assert_eq!(second, 0, "seed {seed}");
}

#[test]
fn a_node_on_the_open_network_only_renews_its_binding() {
    let seed = 5;
    let (keepalive, _, bound) = idle(seed, None, 10);
    assert!(bound, "seed {seed}");
    assert_eq!(keepalive, KEEPALIVE_MAX, "seed {seed}");
}
