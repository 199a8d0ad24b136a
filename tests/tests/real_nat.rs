//! Hole punching through real NAT: Linux network namespaces with iptables MASQUERADE routers
//! ([`shoal_tests::netns`]), the relay and the control server as processes on the public side,
//! and two SDK sessions (`shoal-nat-peer`) behind the routers. Behind two cone NATs the VC starts
//! on the relay and moves to the direct path; behind a cone and a symmetric NAT punching fails
//! and the relay carries the messages both ways.
//!
//! Needs root, `ip` and `iptables` (`scripts/test.sh` installs iptables). Without them each test
//! says it was skipped; under `CI=true` a skip is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::sync::{Mutex, PoisonError};

use shoal_sdk::PathKind;
use shoal_sdk::path::Punch;
use shoal_tests::netns::{NatMode, PeerRun, RealNatRun, measure, unavailable};

/// One run at a time, so that each keeps the machine's two CPUs to itself.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Whether `test` can run here; says loudly why not, and fails under `CI=true`.
fn can_run(test: &str) -> bool {
    let Some(why) = unavailable() else { return true };
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{test} cannot run under CI=true: {why}");
    // Straight to stderr, past the test harness's capture, so the skip shows in every run.
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
    false
}

fn run(a: NatMode, b: NatMode) -> RealNatRun {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let run = measure(a, b).unwrap_or_else(|e| panic!("the {a}/{b} run failed: {e}"));
    eprintln!("{}", run.summary());
    run
}

/// Both peers, named.
fn peers(run: &RealNatRun) -> [(&str, &PeerRun); 2] {
    [("a", &run.peers[0]), ("b", &run.peers[1])]
}

/// What every run shows: the VC started on the relay, and messages were answered both ways.
fn started_on_the_relay_and_talked(run: &RealNatRun) {
    for (name, p) in peers(run) {
        assert_eq!(p.first_kind(), Some(PathKind::OneRelay), "{name}'s first path: {run:#?}");
        assert!(p.received > 0 && p.echoes > 0, "{name} got {} messages, {} answers: {run:#?}", p.received, p.echoes);
        assert!(p.opened.is_some(), "{name}'s VC never opened: {run:#?}");
        assert!(!p.timed_out && p.closed.is_none(), "{name} did not end by the stop: {run:#?}");
    }
    assert!(run.first_message().is_some() && run.relay_rtt().is_some(), "{run:#?}");
}

#[test]
fn behind_two_cone_nats_the_vc_starts_on_the_relay_and_moves_to_the_punched_direct_path() {
    if !can_run("real NAT, cone/cone") {
        return;
    }
    let run = run(NatMode::Cone, NatMode::Cone);
    started_on_the_relay_and_talked(&run);
    for (name, p) in peers(&run) {
        assert_eq!(p.final_kind, Some(PathKind::Direct), "{name} did not end direct: {run:#?}");
        let direct = p.paths_of(PathKind::Direct).find(|d| d.active).expect("an active direct path");
        assert_eq!(direct.punch, Some(Punch::Open), "{name}: {run:#?}");
        assert!(direct.bytes_sent > 0 && direct.bytes_received > 0, "{name}: no messages over {direct:?}");
        // The relay stays a pinged candidate, ready to take the traffic back.
        let relayed = p.paths_of(PathKind::OneRelay).next().expect("the relayed path");
        assert!(relayed.pongs > 0, "{name}: {relayed:?}");
    }
    assert!(run.direct_upgrade().is_some() && run.direct_rtt().is_some(), "{run:#?}");
}

#[test]
fn behind_a_cone_and_a_symmetric_nat_punching_fails_and_the_relay_carries_the_messages() {
    if !can_run("real NAT, cone/symmetric") {
        return;
    }
    let run = run(NatMode::Cone, NatMode::Symmetric);
    started_on_the_relay_and_talked(&run);
    for (name, p) in peers(&run) {
        assert_eq!(p.final_kind, Some(PathKind::OneRelay), "{name} left the relay: {run:#?}");
        assert_eq!(p.direct_at(), None, "{name} went direct: {run:#?}");
        let relayed = p.paths_of(PathKind::OneRelay).find(|r| r.active).expect("the active relayed path");
        assert!(relayed.bytes_sent > 0 && relayed.bytes_received > 0, "{name}: no messages over {relayed:?}");
        // The other's candidates were punched, and none answered.
        let direct: Vec<_> = p.paths_of(PathKind::Direct).collect();
        assert!(!direct.is_empty(), "{name} had no direct candidate to punch: {run:#?}");
        for d in direct {
            assert!(matches!(d.punch, Some(Punch::Failed { .. })), "{name}: {d:?}");
            assert_eq!((d.pongs, d.bytes_received), (0, 0), "{name}: {d:?}");
        }
    }
    assert!(run.first_message_relayed(), "{run:#?}");
}
