//! The short form of established direct VCs under attack: short datagrams with made-up ids,
//! garbage, and forgeries from the peer's own address change nothing but counters, and the VC
//! goes on delivering.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rand::RngExt;
use shoal_mesh::endpoint::Path;
use shoal_sdk::{PeerInfo, Profile, VcId, VcKey};
use shoal_tests::link::LinkConfig;
use shoal_tests::sim::Sim;

#[test]
fn forged_and_garbled_short_datagrams_are_counted_and_change_nothing() {
    let mut sim = Sim::new(9);
    let (a, b) = (sim.add_node(), sim.add_node());
    sim.link(a, b, LinkConfig::latency(Duration::from_millis(10)));
    let (ka, kb) = (sim.node(a).public_key(), sim.node(b).public_key());
    let (ida, idb) = (sim.node(a).id(), sim.node(b).id());
    let (aa, ab) = (sim.addr(a), sim.addr(b));
    let now = sim.now();
    sim.node(a).add_peer(now, PeerInfo { key: kb, paths: vec![Path::Direct(ab)] });
    sim.node(b).add_peer(now, PeerInfo { key: ka, paths: vec![Path::Direct(aa)] });
    let (to_b, to_a) = (VcKey { peer: idb, vc: VcId(1) }, VcKey { peer: ida, vc: VcId(1) });
    sim.node(a).open(now, idb, VcId(1), Profile::realtime(false)).unwrap();
    sim.node(b).open(now, ida, VcId(1), Profile::realtime(false)).unwrap();
    sim.flush(a);
    sim.flush(b);
    // Both ways for two seconds, so that each side has the other's short id.
    let exchange = |sim: &mut Sim, secs: u64| {
        let mut got = 0;
        sim.run_with(Duration::from_secs(secs), Duration::from_millis(33), |sim| {
            let _ = sim.node(a).send(to_b, vec![1u8; 12]);
            let _ = sim.node(b).send(to_a, vec![2u8; 12]);
            sim.flush(a);
            sim.flush(b);
            while let Some(m) = sim.node(b).recv(to_a) {
                assert_eq!(&m[..], &[1u8; 12][..], "b received something a never sent");
                got += 1;
            }
            while sim.node(a).recv(to_b).is_some() {}
        });
        got
    };
    let got = exchange(&mut sim, 2);
    assert!(got > 40, "{got} messages before the attack");
    let counters = |sim: &mut Sim| {
        let now = sim.now();
        (sim.node(b).counters(), sim.node(b).stats(now, to_a).unwrap().counters)
    };
    let before = counters(&mut sim);
    // From a's own address (spoofed: inject sends as a): every id a node could have handed
    // out early, with random bodies, and truncated ones.
    let mut forged = 0u64;
    for id in 0u32..64 {
        for len in [3usize, 7, 23, 40] {
            let mut d = vec![0x81];
            d.extend_from_slice(&id.to_be_bytes());
            while d.len() < len {
                let r: u8 = sim.rng().random();
                d.push(r);
            }
            sim.inject(a, b, d);
            forged += 1;
        }
    }
    sim.run_for(Duration::from_millis(100));
    let after = counters(&mut sim);
    let unknown = after.0.unknown_short - before.0.unknown_short;
    let failed = after.1.auth_failures - before.1.auth_failures;
    assert!(unknown > 0 && failed > 0, "unknown {unknown}, failed {failed}");
    assert_eq!(unknown + failed, forged, "every forgery is counted once");
    // What arrives meanwhile is a's, in flight before the attack.
    while let Some(m) = sim.node(b).recv(to_a) {
        assert_eq!(&m[..], &[1u8; 12][..], "a forgery was delivered");
    }
    // The VC goes on delivering.
    let later = exchange(&mut sim, 2);
    assert!(later > 40, "{later} messages after the attack");
}
