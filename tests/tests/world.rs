//! Whole sessions in the simulator: players sign in to the control server's core, walk, are
//! introduced by proximity, talk on the VCs the introductions opened, and part with farewells.

#![allow(clippy::expect_used)]

use std::time::Duration;

use shoal_tests::world::{World, WorldSpec};

/// After a walk, players stop and the control server settles: each player's neighbours are
/// those the server's interest rules give, both sides agree, and every neighbour has its VCs.
fn check_settled(world: &mut World) {
    let interest = world.spec().control.core.interest;
    for i in 0..world.len() {
        let neighbours: Vec<_> = world.neighbours(i).collect();
        assert!(neighbours.len() <= interest.max_neighbours, "player {i} has {} neighbours", neighbours.len());
        let peers = world.vc_peers(i);
        for n in neighbours {
            let j = (0..world.len()).find(|&j| world.node_id(j) == n).expect("a neighbour is a player");
            assert!(
                world.distance(i, j) <= interest.leave_radius,
                "players {i} and {j} are neighbours {:.1} apart",
                world.distance(i, j)
            );
            assert!(world.neighbours(j).any(|m| m == world.node_id(i)), "{i} has {j} as neighbour, not the other way");
            assert!(peers.contains(&n), "player {i} holds no VC with its neighbour {j}");
        }
    }
}

#[test]
fn two_hundred_players_sign_in_meet_talk_and_part() {
    let mut world = World::new(7, WorldSpec::new(200)).expect("a valid world");
    world.run_for(Duration::from_secs(30));
    world.set_walking(false);
    world.run_for(Duration::from_secs(5));
    let k = world.stats();
    assert_eq!(k.signed_in, 200, "{k:?}");
    assert_eq!((k.refusals, k.control_lost), (0, 0), "{k:?}");
    // Walking brought players together and apart again.
    assert!(k.introductions >= 200, "{k:?}");
    assert!(k.farewells >= 20, "{k:?}");
    assert_eq!(k.far_introductions, 0, "introduced while far apart: {k:?}");
    assert_eq!(k.vcs_opened, 2 * k.introductions, "{k:?}");
    assert_eq!(k.vcs_closed, 2 * k.farewells, "{k:?}");
    // Nothing corrupted, none closed for another reason than a farewell, and what was sent
    // arrived, bar what was in flight when a farewell closed its VC.
    assert_eq!((k.corrupt, k.vcs_lost), (0, 0), "{k:?}");
    assert!(k.messages_sent > 10_000, "{k:?}");
    assert!(k.messages_delivered * 100 >= k.messages_sent * 99, "{k:?}");
    check_settled(&mut world);
}

#[test]
fn the_same_seed_gives_the_same_world() {
    let run = |seed| {
        let mut world = World::new(seed, WorldSpec::new(40)).expect("a valid world");
        world.run_for(Duration::from_secs(15));
        let neighbours: Vec<Vec<_>> = (0..world.len()).map(|i| world.neighbours(i).collect()).collect();
        (world.stats(), neighbours, world.sim.net_stats().delivered)
    };
    let a = run(3);
    assert!(a.0.introductions > 0 && a.0.messages_delivered > 0, "{:?}", a.0);
    assert_eq!(a, run(3));
    assert_ne!(a, run(4));
}
