//! Relay fan-out scenarios the tests and `shoal-sim-bench crowd` share: players who see each
//! other through their publishers' relays, and what a player sends as more of them watch it.

use std::time::Duration;

use shoal_control::interest::InterestError;
use shoal_control::watch::WatchConfig;

use crate::link::{LinkConfig, Loss};
use crate::sim::HostId;
use crate::world::{World, WorldSpec};

/// `players` in one 40 m cluster, at most `neighbours` each (none: nobody is introduced,
/// every player is only published and watched), everyone else watched, over 20 ms links with
/// 2 % bursty loss. Returns the world after `secs`, and each player's upload on the wire over
/// the last `measure` seconds, kbit/s.
///
/// # Errors
/// When the world's interest settings are refused.
pub fn watched_crowd(
    seed: u64,
    players: usize,
    neighbours: usize,
    secs: u64,
    measure: u64,
) -> Result<(World, Vec<f64>), InterestError> {
    let mut spec = WorldSpec { clusters: 1, cluster_side: 40.0, ..WorldSpec::avatars(players) };
    spec.control.core.interest.max_neighbours = neighbours.max(1);
    if neighbours == 0 {
        spec.control.core.interest.enter_radius = 0.01;
        spec.control.core.interest.leave_radius = 0.01;
    }
    // Everyone watches everyone, however many: what is measured is the publisher's side.
    spec.control.core.watch = Some(WatchConfig { max_watched: players.max(1), ..WatchConfig::default() });
    let mut world = World::new(seed, spec)?;
    world.sim.set_default_link(LinkConfig::latency(Duration::from_millis(20)).with_loss(Loss::BURSTY));
    world.run_for(Duration::from_secs(secs.saturating_sub(measure)));
    let wire =
        |w: &mut World| -> Vec<u64> { (0..w.len()).map(|i| w.sim.node(w.host(i)).traffic().0.on_the_wire()).collect() };
    let before = wire(&mut world);
    world.run_for(Duration::from_secs(measure));
    let after = wire(&mut world);
    let kbps = before.iter().zip(&after).map(|(b, a)| (a - b) as f64 * 8.0 / 1000.0 / measure.max(1) as f64).collect();
    Ok((world, kbps))
}

/// A player's upload with `watchers` others watching it and nobody introduced (each of them
/// watched by the rest too): the mean over the players, kbit/s on the wire; and the fewest
/// stream updates any player decoded from those it watches, per second of the whole run
/// (start-up included) and per player watched.
///
/// # Errors
/// When the world's interest settings are refused.
pub fn upload_watched_by(seed: u64, watchers: usize, secs: u64, measure: u64) -> Result<(f64, f64), InterestError> {
    let (world, kbps) = watched_crowd(seed, watchers + 1, 0, secs, measure)?;
    let mean = kbps.iter().sum::<f64>() / kbps.len().max(1) as f64;
    let least = (0..world.len())
        .filter_map(|i| world.sim.session(world.host(i)).avatar_mesh())
        .map(|m| m.counters().watched_received as f64 / secs as f64 / watchers.max(1) as f64)
        .fold(f64::INFINITY, f64::min);
    Ok((mean, least))
}

/// `players` in two regions, each with its own relay: a player reaches its region's relay in
/// 5 ms and the other in 80 ms (round trips), the relays reach each other in 10 ms. Nobody is
/// introduced; everyone watches everyone. Returns the world after `secs`.
///
/// # Errors
/// When the world's interest settings are refused.
pub fn two_regions(seed: u64, players: usize, secs: u64) -> Result<World, InterestError> {
    let mut spec = WorldSpec { clusters: 1, cluster_side: 40.0, relays: 2, ..WorldSpec::avatars(players) };
    spec.control.core.interest.enter_radius = 0.01;
    spec.control.core.interest.leave_radius = 0.01;
    spec.control.core.watch = Some(WatchConfig { max_watched: players.max(1), ..WatchConfig::default() });
    let mut world = World::new(seed, spec)?;
    let (a, b) = (HostId(0), HostId(1));
    world.sim.peer_relays(a, b);
    world.sim.link(a, b, LinkConfig::latency(Duration::from_millis(5)));
    for i in 0..world.len() {
        let (home, away) = if i % 2 == 0 { (a, b) } else { (b, a) };
        let h = world.host(i);
        world.sim.link(h, home, LinkConfig::latency(Duration::from_micros(2_500)));
        world.sim.link(h, away, LinkConfig::latency(Duration::from_millis(40)));
    }
    world.run_for(Duration::from_secs(secs));
    Ok(world)
}
