//! Relay fan-out in the simulator, end to end through the sessions and the control server's
//! core: players beyond each other's few neighbours see each other through the publishers'
//! relays, and a player's upload does not grow with the number watching it.

#![allow(clippy::expect_used, clippy::panic)]

use std::time::Duration;

use shoal_tests::avatars::avatar_run;
use shoal_tests::fanout::{two_regions, upload_watched_by, watched_crowd};
use shoal_tests::sim::HostId;
use shoal_tests::world::{AvatarStats, World, WorldSpec};

#[test]
fn players_beyond_their_neighbours_see_each_other_through_the_relays() {
    let (world, kbps) = watched_crowd(3, 12, 2, 12, 4).expect("a valid world");
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
    // Both relays are as near as each other to everyone: the publishers share them.
    for r in 0..world.spec().relays {
        let c = world.sim.relay_counters(HostId(r));
        assert!(c.published > 0 && c.copies > 0, "relay {r}: {c:?}");
    }
}

/// What a player sends does not depend on how many watch it: the relay makes the copies.
/// (Without neighbours, so that what the pairwise serving costs, which depends on how near
/// the nearest are, does not blur the comparison.) `shoal-sim-bench crowd` adds 500.
#[test]
fn a_players_upload_is_flat_in_the_number_watching_it() {
    let (one, _) = upload_watched_by(5, 1, 12, 6).expect("a valid world");
    for watchers in [10, 100] {
        let (many, least) = upload_watched_by(5, watchers, 12, 6).expect("a valid world");
        assert!((many - one).abs() <= one * 0.10, "upload {one:.2} kbit/s watched by 1, {many:.2} by {watchers}");
        // Every watcher got every stream it watches, at about the 5 Hz watch rate once
        // granted (the first seconds go to signing in and subscribing).
        assert!(least >= 2.5, "a watcher got {least:.2} updates/s per player watched, of {watchers}");
    }
}

/// Two regions, each near its own relay and far from the other's, the relays near each other:
/// a player watches those of the other region at its own relay, which the publisher's relay
/// feeds, so each stream crosses the link between the relays once however many watch it there.
#[test]
fn watchers_in_another_region_take_each_stream_from_their_own_relay() {
    let mut world = two_regions(11, 12, 10).expect("a valid world");
    let counters = |w: &World| [0, 1].map(|r| w.sim.relay_counters(HostId(r)));
    let before = counters(&world);
    world.run_for(Duration::from_secs(5));
    let after = counters(&world);
    let now = world.sim.now();
    for i in 0..world.len() {
        let mesh = world.sim.session(world.host(i)).avatar_mesh().expect("avatars");
        let heard: Vec<_> = mesh.watched_received().collect();
        for j in (0..world.len()).filter(|&j| j != i) {
            let at = heard.iter().find(|(p, _)| *p == world.node_id(j)).map(|&(_, at)| at);
            assert!(
                at.is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(1)),
                "player {i} does not see player {j} move"
            );
        }
        assert_eq!(mesh.counters().watched_refused, 0, "player {i}: {:?}", mesh.counters());
    }
    for (r, other) in [(0, 1), (1, 0)] {
        let published = after[r].published - before[r].published;
        let fed_here = after[r].fed - before[r].fed;
        let copies = after[r].copies - before[r].copies;
        let fed_there = after[other].fed - before[other].fed;
        assert!(published > 0 && fed_here > 0, "relay {r}: {:?}", after[r]);
        // The other relay took each of this one's publishes once, and this one each of its.
        assert_eq!(fed_there, published, "relay {other} took {fed_there} of relay {r}'s {published}");
        // Each region's six publish at their own relay, which copies to the five others there
        // and once to the other relay, not to the six watching from there; the other region's
        // streams it is fed go to the six here.
        assert_eq!(copies, published * 6 + fed_here * 6, "relay {r}: {published} published, {fed_here} fed");
    }
    let core = world.sim.control_core().expect("a control server");
    assert!(core.counters().chained_grants > 0, "{:?}", core.counters());
}

/// The relay most players publish through crashes: the control server, once the relay's
/// connection falls silent, moves every publisher to the other relay and grants its watchers
/// subscriptions there, and every player again sees everyone it watches move, within a bound.
#[test]
fn a_relay_crash_moves_its_groups_to_another_relay() {
    let (mut world, _) = watched_crowd(7, 12, 2, 10, 1).expect("a valid world");
    let published = |w: &World, r: usize| w.sim.relay_counters(HostId(r)).published;
    let busiest = (0..world.spec().relays).max_by_key(|&r| published(&world, r)).expect("relays");
    assert!(published(&world, busiest) > 0);
    let fresh = |w: &World| -> usize {
        let now = w.sim.now();
        let mut stale = 0;
        for i in 0..w.len() {
            let mesh = w.sim.session(w.host(i)).avatar_mesh().expect("avatars");
            let neighbours: Vec<_> = w.neighbours(i).collect();
            let heard: Vec<_> = mesh.watched_received().collect();
            for j in (0..w.len()).filter(|&j| j != i && !neighbours.contains(&w.node_id(j))) {
                let id = w.node_id(j);
                let age = heard.iter().find(|(p, _)| *p == id).map(|&(_, at)| now.saturating_duration_since(at));
                stale += usize::from(age.is_none_or(|a| a > Duration::from_secs(1)));
            }
        }
        stale
    };
    assert_eq!(fresh(&world), 0, "before the crash every watched player is fresh");
    world.sim.crash(HostId(busiest));
    let crashed = world.sim.now();
    let presence = world.spec().control.core.relay_presence_timeout;
    let mut recovered = None;
    while world.sim.now() < crashed + presence + Duration::from_secs(10) {
        world.run_for(Duration::from_millis(250));
        if world.sim.now() > crashed + Duration::from_secs(2) && fresh(&world) == 0 {
            recovered = Some(world.sim.now() - crashed);
            break;
        }
    }
    let took = recovered.unwrap_or_else(|| panic!("{} watched players still stale", fresh(&world)));
    // The control server hears the relay is gone after its presence timeout (4 s); the
    // grants, the subscriptions and the next key state follow within a few seconds.
    assert!(took <= presence + Duration::from_secs(5), "groups moved after {took:?}");
    let other = (0..world.spec().relays).find(|&r| r != busiest).expect("another relay");
    assert!(world.sim.relay_counters(HostId(other)).copies > 0);
    let core = world.sim.control_core().expect("a control server");
    assert!(core.counters().watch_grants > 0 && core.counters().watch_no_relay == 0, "{:?}", core.counters());
}

/// A small zone of the 1,000-player benchmark (`shoal-sim-bench crowd`): 40 players in two
/// clusters over 2 % bursty loss, each with its nearest as neighbours and everyone else within
/// 150 m watched. Every pair within the view radius shows each other, nobody sends more than
/// the budget, and watched avatars are as fresh as the 5 Hz stream allows.
#[test]
fn a_zone_in_clusters_shows_everyone_in_view_within_the_budget() {
    let mut r = avatar_run(13, WorldSpec::watching(40), Duration::from_secs(5), Duration::from_secs(15))
        .expect("a valid world");
    let (pairs, shown) = r.view_pairs;
    assert!(pairs > 40 * 20 && shown == pairs, "{shown} of {pairs} pairs in view show each other");
    assert!(r.watched >= 5.0, "{} watched per player", r.watched);
    let most = r.upload_kbps.iter().copied().fold(0.0, f64::max);
    assert!(most <= 96.0 * 1.05, "a player sent {most:.1} kbit/s");
    let s = &mut r.stats;
    let near = AvatarStats::quantile(&mut s.near_staleness, 0.99).expect("neighbours");
    assert!(near <= Duration::from_millis(150), "neighbour staleness p99 {near:?}");
    // A watched player's newest update is at most one 5 Hz interval late 98 % of the time,
    // through a publisher's uplink and a watcher's downlink that each lose 2 % in bursts; and
    // none waits long (two lost copies of a key state cost a second).
    let watched = AvatarStats::quantile(&mut s.watched_staleness, 0.98).expect("watched players");
    let worst = AvatarStats::quantile(&mut s.watched_staleness, 0.999).expect("watched players");
    assert!(watched <= Duration::from_millis(360), "watched staleness p98 {watched:?}");
    assert!(worst <= Duration::from_millis(1500), "watched staleness p99.9 {worst:?}");
    let err = AvatarStats::quantile(&mut s.watched_errors, 0.99).expect("watched samples");
    assert!(err < 1.0, "watched avatars shown {err:.2} m from the truth (p99)");
    assert_eq!((r.world.avatars_from_strangers, r.world.refusals), (0, 0), "{:?}", r.world);
}
