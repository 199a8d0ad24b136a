//! Avatars in the simulator: players serve their avatars to the neighbours the control server
//! introduced, through the session's avatar mesh, over lossy links; every view is compared
//! with where the player really was.

#![allow(clippy::expect_used)]

use std::time::Duration;

use shoal_tests::link::{LinkConfig, Loss};
use shoal_tests::world::{AvatarStats, World, WorldSpec, WorldStats};

/// 2 % loss in bursts of four datagrams on average.
fn bursty_loss() -> Loss {
    Loss::GilbertElliott { good_to_bad: 0.005, bad_to_good: 0.25, loss_good: 0.0, loss_bad: 1.0 }
}

/// `players` in clusters over 20 ms links with `loss`, for `secs` of virtual time.
fn crowd(seed: u64, players: usize, loss: Loss, secs: u64, liars: usize) -> World {
    let mut world = World::new(seed, WorldSpec { liars, ..WorldSpec::avatars(players) }).expect("a valid world");
    world.sim.set_default_link(LinkConfig::latency(Duration::from_millis(20)).with_loss(loss));
    world.run_for(Duration::from_secs(secs));
    world
}

/// Three clusters of 20 (each player has up to the default 16 neighbours) for a minute under
/// 2 % bursty loss. The benchmark (`shoal-sim-bench avatars`) runs 200 and 1,000.
#[test]
fn a_crowd_in_clusters_sees_its_neighbours_move_through_bursty_loss() {
    let world = crowd(11, 60, bursty_loss(), 60, 0);
    let k = world.stats();
    assert_eq!((k.signed_in, k.refusals, k.control_lost), (60, 0, 0), "{k:?}");
    assert!(k.introductions >= 60 * 10, "{k:?}");
    // Every introduced neighbour's avatar appears, within a second of the introduction.
    let mut a = world.avatar_stats(Duration::from_secs(2));
    assert_eq!(a.never_appeared, 0);
    let appear = AvatarStats::quantile(&mut a.appear_delays, 1.0).expect("avatars appeared");
    assert!(appear <= Duration::from_millis(1500), "an avatar took {appear:?} to appear");
    assert_eq!(k.avatars_appeared, k.introductions, "{k:?}");
    // Nobody shows an avatar from a player it was not introduced to.
    assert_eq!(k.avatars_from_strangers, 0, "{k:?}");
    // Shown where they were, within 0.6 m for 99 % of samples (walking 1.4 m/s, running
    // 5.5 m/s, jumping, through bursts of loss).
    let err = AvatarStats::quantile(&mut a.errors, 0.99).expect("samples");
    assert!(a.errors.len() > 100_000 && err < 0.6, "p99 error {err} m over {} samples", a.errors.len());
    // No neighbour goes unserved: the newest update held is under a second old (p99), near
    // or far.
    let near = AvatarStats::quantile(&mut a.near_staleness, 0.99).expect("near samples");
    let far = AvatarStats::quantile(&mut a.far_staleness, 0.99).expect("far samples");
    assert!(near < Duration::from_secs(1) && far < Duration::from_millis(1500), "staleness p99 {near:?} {far:?}");
}

#[test]
fn the_same_seed_gives_the_same_avatars() {
    let run = |seed| {
        let world = crowd(seed, 20, bursty_loss(), 8, 0);
        let a = world.avatar_stats(Duration::from_secs(2));
        let errors: Vec<u32> = a.errors.iter().map(|e| e.to_bits()).collect();
        (world.stats(), errors, a.appear_delays)
    };
    let a = run(5);
    assert!(a.0.avatars_appeared > 0 && !a.1.is_empty(), "{:?}", a.0);
    assert_eq!(a, run(5));
    assert_ne!(a.1, run(6).1);
}

/// One player serves its avatar 100 m from where it reports being: its neighbours see the
/// difference and the control server flags it, then cuts it off. Honest players under 5 %
/// loss are never flagged.
#[test]
fn a_lying_player_is_flagged_and_honest_ones_under_loss_are_not() {
    let world = crowd(21, 20, Loss::Uniform(0.05), 20, 1);
    let k: WorldStats = world.stats();
    let core = world.sim.control_core().expect("a control server");
    let c = core.counters();
    assert!(c.avatar_flags >= 1 && c.avatar_mismatches >= 2, "{c:?}");
    assert_eq!(c.implausible, 0, "{c:?}");
    let liar = world.node_id(0);
    // Cut off after three flags, or flagged and on its way.
    assert!(core.player(liar).is_none_or(|p| p.flags >= 1), "{c:?}");
    for i in 1..world.len() {
        let p = core.player(world.node_id(i)).expect("honest players stay signed in");
        assert_eq!(p.flags, 0, "honest player {i} flagged: {c:?}");
    }
    assert!(k.refusals <= 1, "{k:?}");
}
