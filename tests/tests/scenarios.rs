//! Scenario tests on the deterministic simulator: what a player notices when paths fail.

use std::time::Duration;

use shoal_sdk::Profile;
use shoal_tests::scenario::{Duo, DuoSpec, Stream, relay_crash_failover};
use shoal_tests::sim::Sim;

#[test]
fn a_vc_opens_over_relays_and_carries_a_stream() {
    let seed = 1;
    let mut sim = Sim::new(seed);
    let spec = DuoSpec::random(&mut sim);
    let mut duo = Duo::new(sim, &spec);
    let (ka, kb) = duo.open(1, Profile::reliable());
    let t0 = duo.sim.now();
    let (a, b) = (duo.a, duo.b);
    let mut s = Stream::new(ka, kb, Duration::from_millis(10), 100, t0);
    duo.sim.run_with(Duration::from_secs(2), Duration::from_millis(1), |sim| s.step(sim, a, b));
    for e in duo.sim.events() {
        eprintln!("{:?} {:?} {:?}", e.0 - t0, e.1, e.2);
    }
    assert!(duo.opened(ka, kb), "seed {seed}");
    let got = s.arrived.iter().filter(|a| a.is_some()).count();
    assert!(got > 150, "only {got} of {} arrived (seed {seed})", s.sent.len());
    assert!(s.in_order());
}

#[test]
fn relay_crash_probe() {
    for seed in 0..5 {
        let f = relay_crash_failover(seed, Profile::realtime(false));
        eprintln!("{seed}: {f:?}");
    }
}
