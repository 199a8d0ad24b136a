//! The mesh's own traffic, as a player with neighbours pays it, and path choice that does not
//! flap when a host's scheduling stalls now and then. In the simulator, so the figures are
//! exact: these are behaviour (what a budget-limited player notices), not speed.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use shoal_tests::overhead::{Flow, lan_path_changes, overhead};

const SECS: Duration = Duration::from_secs(1);

#[test]
fn an_idle_neighbour_costs_under_half_a_kilobit_and_a_flowing_one_under_two() {
    for seed in 0..3 {
        let idle = overhead(seed, 4, Flow::Idle, 20 * SECS, 30 * SECS);
        assert!(idle.kbps_per_neighbour_on_the_wire() <= 0.5, "idle (seed {seed}): {idle:?}");
        assert_eq!(idle.path_changes, 0, "idle paths changed (seed {seed})");
        let flowing = overhead(seed, 4, Flow::Both { hz: 30 }, 20 * SECS, 10 * SECS);
        assert!(flowing.kbps_per_neighbour_on_the_wire() <= 2.0, "flowing (seed {seed}): {flowing:?}");
        // Every update arrived: the overhead was not saved by dropping traffic.
        assert!(flowing.messages_in >= 4 * 300, "seed {seed}: {flowing:?}");
        // Acks and measurement ride on the updates: almost no datagram of their own.
        assert!(flowing.datagrams_per_neighbour() < 1.0, "seed {seed}: {flowing:?}");
    }
}

/// A neighbour that serves the player once a second while the player serves it 30 times
/// (its upload budget is shorter) answers the player's checks of the path at most five
/// times a second, not once per update: under 3 kbit/s on the wire, where 30 pongs a second
/// cost it 17.
#[test]
fn a_neighbour_that_streams_back_slowly_pays_little_for_the_players_checks() {
    for seed in 0..2 {
        let run = overhead(seed, 4, Flow::Uneven { hz: 30, back_hz: 1 }, 10 * SECS, 10 * SECS);
        assert!(run.kbps_per_neighbour_on_the_wire() <= 3.0, "seed {seed}: {run:?}");
        assert!(run.datagrams_per_neighbour() <= 6.0, "seed {seed}: {run:?}");
        assert!(run.messages_in >= 4 * 9, "seed {seed}: {run:?}");
        assert_eq!(run.path_changes, 0, "seed {seed}: {run:?}");
    }
}

/// Once a direct VC is established, an update goes in the short form: 23 bytes of headers
/// (marker, short id, packet number, tag) and a message item's kind byte above UDP, where the
/// mesh header and a sealed frame took 50 and renet's packet 9 more.
#[test]
fn an_update_on_an_established_direct_vc_carries_at_most_28_bytes_of_headers() {
    for seed in 0..3 {
        let run = overhead(seed, 4, Flow::Out { hz: 30 }, 10 * SECS, 10 * SECS);
        let headers = run.header_bytes_per_datagram(20);
        eprintln!("seed {seed}: {headers} header bytes; {run:?}");
        assert!(headers <= 28.0, "seed {seed}: {headers} bytes of headers per update: {run:?}");
        assert!(run.sent.data_datagrams >= 4 * 290, "seed {seed}: {run:?}");
    }
}

#[test]
fn idle_and_flowing_vcs_on_a_stalling_host_keep_their_paths() {
    // Two players on one machine (0.1 ms apart) whose datagrams now and then wait 25 ms for
    // the scheduler, as a new user trying two clients on a busy laptop sees.
    for seed in 0..3 {
        let idle = lan_path_changes(seed, 0.02, Duration::from_millis(25), Flow::Idle, 30 * SECS);
        assert!(idle.is_empty(), "idle VCs changed path (seed {seed}): {idle:?}");
        let flowing = lan_path_changes(seed, 0.02, Duration::from_millis(25), Flow::Both { hz: 30 }, 30 * SECS);
        assert!(flowing.is_empty(), "flowing VCs changed path (seed {seed}): {flowing:?}");
    }
}
