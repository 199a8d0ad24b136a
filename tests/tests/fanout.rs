//! Relay fan-out in the simulator, end to end through the sessions and the control server's
//! core: players beyond each other's few neighbours see each other through the publishers'
//! relays, and a player's upload does not grow with the number watching it.

#![allow(clippy::expect_used)]

use std::time::Duration;

use shoal_control::watch::WatchConfig;
use shoal_tests::link::{LinkConfig, Loss};
use shoal_tests::sim::HostId;
use shoal_tests::world::{World, WorldSpec};

/// `players` in one 40 m cluster, at most `neighbours` each, everyone else watched; returns
/// the world after `secs`, and each player's upload over the last `measure` seconds, kbit/s.
fn watched_crowd(seed: u64, players: usize, neighbours: usize, secs: u64, measure: u64) -> (World, Vec<f64>) {
    let mut spec = WorldSpec { clusters: 1, cluster_side: 40.0, ..WorldSpec::avatars(players) };
    spec.control.core.interest.max_neighbours = neighbours.max(1);
    if neighbours == 0 {
        // Nobody is introduced: every player is only published and watched.
        spec.control.core.interest.enter_radius = 0.01;
        spec.control.core.interest.leave_radius = 0.01;
    }
    spec.control.core.watch = Some(WatchConfig::default());
    let mut world = World::new(seed, spec).expect("a valid world");
    let loss = Loss::GilbertElliott { good_to_bad: 0.005, bad_to_good: 0.25, loss_good: 0.0, loss_bad: 1.0 };
    world.sim.set_default_link(LinkConfig::latency(Duration::from_millis(20)).with_loss(loss));
    world.run_for(Duration::from_secs(secs - measure));
    let wire =
        |w: &mut World| -> Vec<u64> { (0..w.len()).map(|i| w.sim.node(w.host(i)).traffic().0.on_the_wire()).collect() };
    let before = wire(&mut world);
    world.run_for(Duration::from_secs(measure));
    let after = wire(&mut world);
    let kbps = before.iter().zip(&after).map(|(b, a)| (a - b) as f64 * 8.0 / 1000.0 / measure as f64).collect();
    (world, kbps)
}

#[test]
fn players_beyond_their_neighbours_see_each_other_through_the_relays() {
    let (world, kbps) = watched_crowd(3, 12, 2, 12, 4);
    let now = world.sim.now();
    for (i, &sent) in kbps.iter().enumerate() {
        let h = world.host(i);
        let neighbours: Vec<_> = world.neighbours(i).collect();
        assert!(neighbours.len() <= 2);
        let mesh = world.sim.session(h).avatar_mesh().expect("avatars");
        // Everyone else is shown: the neighbours from their direct updates, the rest from their
        // streams.
        for j in (0..world.len()).filter(|&j| j != i) {
            let id = world.node_id(j);
            assert!(mesh.avatar_of(id, now).is_some(), "player {i} does not show player {j}");
        }
        let watched = mesh.watched().count();
        assert!(watched + neighbours.len() >= world.len() - 1, "player {i} watches {watched}");
        assert!(mesh.counters().watched_received > 0, "player {i}: {:?}", mesh.counters());
        assert_eq!(mesh.counters().watched_refused, 0, "player {i}: {:?}", mesh.counters());
        assert!(sent <= 96.0 * 1.05, "player {i} sent {sent:.1} kbit/s");
    }
    let copies: u64 = (0..world.spec().relays).map(|r| world.sim.relay_counters(HostId(r)).copies).sum();
    assert!(copies > 0);
}

/// What a player sends does not depend on how many watch it: the relay makes the copies.
/// (Without neighbours, so that what the pairwise serving costs, which depends on how near
/// the nearest are, does not blur the comparison.)
#[test]
fn a_players_upload_is_flat_in_the_number_watching_it() {
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (_, few) = watched_crowd(5, 2, 0, 12, 6);
    let (world, many) = watched_crowd(5, 16, 0, 12, 6);
    let (few, many) = (mean(&few), mean(&many));
    assert!(many <= few * 1.10, "upload {few:.1} kbit/s watched by 1, {many:.1} by 15");
    // Every watcher got the stream: 5 updates a second from each of the 15 others.
    for i in 0..world.len() {
        let m = world.sim.session(world.host(i)).avatar_mesh().expect("avatars");
        assert!(m.counters().watched_received >= 15 * 5 * 8, "player {i}: {:?}", m.counters());
    }
    let copies: u64 = (0..world.spec().relays).map(|r| world.sim.relay_counters(HostId(r)).copies).sum();
    assert!(copies > 0);
}
