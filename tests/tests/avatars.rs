//! Avatars in the simulator: players serve their avatars to the neighbours the control server
//! introduced, through the session's avatar mesh, over lossy links; every view is compared
//! with where the player really was.

#![allow(clippy::expect_used)]

use std::time::Duration;

use shoal_sdk::avatar::Trace;
use shoal_tests::avatars::{avatar_run, codec_bits};
use shoal_tests::link::{LinkConfig, Loss};
use shoal_tests::world::{AvatarStats, World, WorldSpec, WorldStats};

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
    let mut r =
        avatar_run(11, WorldSpec::avatars(60), Duration::from_secs(5), Duration::from_secs(55)).expect("a valid world");
    let k = &r.world;
    assert_eq!((k.signed_in, k.refusals, k.control_lost), (60, 0, 0), "{k:?}");
    assert!(k.introductions >= 60 * 10, "{k:?}");
    // Every introduced neighbour's avatar appears: 99 % within a second of the introduction,
    // all within two (the handshake, a far neighbour's first update at the 2 Hz floor, and a
    // burst of loss that takes it).
    let a = &mut r.stats;
    assert_eq!(a.never_appeared, 0);
    let appear = AvatarStats::quantile(&mut a.appear_delays, 0.99).expect("avatars appeared");
    let slowest = AvatarStats::quantile(&mut a.appear_delays, 1.0).expect("avatars appeared");
    assert!(appear <= Duration::from_secs(1), "p99 of avatars took {appear:?} to appear");
    assert!(slowest <= Duration::from_secs(2), "an avatar took {slowest:?} to appear");
    assert_eq!(k.avatars_appeared, k.introductions, "{k:?}");
    // Nobody shows an avatar from a player it was not introduced to.
    assert_eq!(k.avatars_from_strangers, 0, "{k:?}");
    // Shown where they were, within 0.6 m for 99 % of samples (walking 1.4 m/s, running
    // 5.5 m/s, jumping, through bursts of loss).
    let err = AvatarStats::quantile(&mut a.errors, 0.99).expect("samples");
    assert!(a.errors.len() > 100_000 && err < 0.6, "p99 error {err} m over {} samples", a.errors.len());
    // Near neighbours (served at the full rate) hold an update under 150 ms old, 99 % of
    // the time, through bursts of four lost datagrams; nobody else waits a second.
    let near = AvatarStats::quantile(&mut a.near_staleness, 0.99).expect("near samples");
    let crowded = AvatarStats::quantile(&mut a.crowded_staleness, 0.99).unwrap_or_default();
    let far = AvatarStats::quantile(&mut a.far_staleness, 0.99).expect("far samples");
    assert!(near <= Duration::from_millis(150), "near staleness p99 {near:?}");
    assert!(crowded < Duration::from_secs(1) && far < Duration::from_secs(1), "staleness p99 {crowded:?} {far:?}");
    // Measurement and upkeep (datagrams without a message, and what rides on the others)
    // stay within 2 kbit/s per neighbour: pongs wait for an update going the same way.
    let upkeep = r.overhead_kbps_per_neighbour.iter().sum::<f64>() / r.overhead_kbps_per_neighbour.len() as f64;
    assert!(upkeep <= 2.0, "measurement and upkeep {upkeep:.2} kbit/s per neighbour");
    // Everyone's whole upload holds to the 96 kbit/s budget over the minute.
    let most = r.upload_kbps.iter().copied().fold(0.0, f64::max);
    assert!(most <= 96.0 * 1.05, "a player sent {most:.1} kbit/s");
}

#[test]
fn the_same_seed_gives_the_same_avatars() {
    let run = |seed| {
        let world = crowd(seed, 20, Loss::BURSTY, 8, 0);
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

/// 41 players standing within 40 m, the control server allowing 40 neighbours each: every
/// player serves 40, and still sends no more than its budget, the nearest at the full rate.
#[test]
fn forty_neighbours_stay_within_the_upload_budget_and_the_nearest_get_the_full_rate() {
    let mut spec = WorldSpec { clusters: 1, cluster_side: 28.0, ..WorldSpec::avatars(41) };
    spec.control.core.interest.max_neighbours = 40;
    let mut world = World::new(31, spec).expect("a valid world");
    world.run_for(Duration::from_secs(8));
    let h = world.host(0);
    let before = (world.sim.node(h).traffic().0, world.sim.now());
    let nearest =
        |w: &World| (1..w.len()).min_by(|&a, &b| w.distance(0, a).total_cmp(&w.distance(0, b))).expect("others");
    let j = nearest(&world);
    let sends_before = world.sim.session(h).avatar_mesh().expect("avatars").schedule().sends(world.node_id(j));
    world.run_for(Duration::from_secs(4));
    assert_eq!(world.neighbours(0).count(), 40);
    let (after, now) = (world.sim.node(h).traffic().0, world.sim.now());
    let secs = (now - before.1).as_secs_f64();
    let kbps = (after.on_the_wire() - before.0.on_the_wire()) as f64 * 8.0 / 1000.0 / secs;
    // Everything the player sent, on the wire, within 5 % of the 96 kbit/s budget.
    assert!(kbps <= 96.0 * 1.05, "player 0 sent {kbps:.1} kbit/s to 40 neighbours");
    let mesh = world.sim.session(h).avatar_mesh().expect("avatars");
    let rate = (mesh.schedule().sends(world.node_id(j)) - sends_before) as f64 / secs;
    // The nearest neighbour (if it stayed the nearest) got about 30 updates a second.
    if nearest(&world) == j {
        assert!(rate >= 25.0, "the nearest neighbour got {rate:.1} updates/s ({kbps:.1} kbit/s in all)");
    }
    // Nobody starves.
    for n in mesh.neighbours() {
        assert!(mesh.schedule().rate(n).is_some_and(|r| r >= 0.5 * 0.9), "{n} served at {:?}", mesh.schedule().rate(n));
    }
}

/// Two players whose direct path is cut move on a relayed path; the relay it goes through
/// crashes. The receiver's view keeps moving (extrapolated, then from updates on the other
/// relay) and stays close to where the player really was.
#[test]
fn a_relay_crash_mid_movement_keeps_the_avatar_moving_within_a_bound() {
    let spec = WorldSpec { clusters: 1, cluster_side: 20.0, ..WorldSpec::avatars(2) };
    let mut world = World::new(41, spec).expect("a valid world");
    let (a, b) = (world.host(0), world.host(1));
    world.sim.partition(a, b, true);
    world.run_for(Duration::from_secs(8));
    let key = shoal_sdk::VcKey { peer: world.node_id(1), vc: shoal_sdk::VcId(1) };
    let now = world.sim.now();
    let path = world.sim.node(a).stats(now, key).and_then(|s| s.path).expect("a path").path;
    let shoal_sdk::Path::Relayed(route) = path else { panic!("the direct path is cut, yet {path:?}") };
    let relay = (0..world.spec().relays)
        .map(shoal_tests::sim::HostId)
        .find(|&r| world.sim.relay_id(r) == route.relays()[0])
        .expect("the relay is one of the world's");
    let seen = world.avatar_stats(Duration::from_secs(2)).errors.len();
    world.sim.crash(relay);
    world.run_for(Duration::from_secs(4));
    let mut after: Vec<f32> = world.avatar_stats(Duration::from_secs(2)).errors[seen..].to_vec();
    assert!(after.len() >= 60, "{} samples after the crash", after.len());
    let worst = AvatarStats::quantile(&mut after, 1.0).expect("samples");
    // Running (5.5 m/s) through 250 ms of extrapolation and the hold until failover.
    assert!(worst < 3.0, "shown up to {worst} m from the truth after the crash");
    let k = world.stats();
    assert_eq!((k.vcs_lost, k.avatars_left), (0, 0), "{k:?}");
    let now = world.sim.now();
    let path = world.sim.node(a).stats(now, key).and_then(|s| s.path).expect("a path").path;
    assert_ne!(path, shoal_sdk::Path::Relayed(route), "still on the crashed relay");
}

/// The recorded trace the codec's benchmarks read (100 players of the movement model for five
/// minutes at 30 Hz): it loads whole, and the codec spends no more than its targets on it.
#[test]
fn the_recorded_trace_loads_and_the_codec_meets_its_targets_on_it() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/avatars-100x300s.trace");
    let trace = Trace::from_bytes(&std::fs::read(path).expect("the fixture")).expect("a trace");
    assert_eq!((trace.players(), trace.frames(), trace.hz()), (100, 9000, 30));
    let bits = codec_bits(&trace).expect("the default codec");
    assert!(bits.moving_p50 <= 64 && bits.idle_p50 <= 8, "{bits:?}");
    assert!(bits.postcard_mean > 8.0 * bits.mean, "{bits:?}");
}
