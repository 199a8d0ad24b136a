//! Scenario tests on the deterministic simulator: what a player notices when paths fail.
//! Every assertion names the seed, so a failure can be replayed exactly.

use std::time::Duration;

use shoal_mesh::endpoint::Path;
use shoal_mesh::wire::{self, Header, Kind, VcId};
use shoal_sdk::{Event, Profile, SwitchReason, VcEvent, VcKey};
use shoal_tests::link::{LinkConfig, Loss};
use shoal_tests::scenario::{Duo, DuoSpec, Stream, bulk_transfer, relay_crash_failover};
use shoal_tests::sim::{HostId, Sim};

const MS: Duration = Duration::from_millis(1);

/// Three one-relay paths: 15+15 ms (the best), 20+20 ms and 25+25 ms one way.
fn three_paths(seed: u64) -> Duo {
    let spec = DuoSpec { one_relay: vec![(15 * MS, 15 * MS), (20 * MS, 20 * MS), (25 * MS, 25 * MS)], two_relay: None };
    Duo::new(Sim::new(seed), &spec)
}

fn run_streams(duo: &mut Duo, streams: &mut [Stream], d: Duration) {
    let (a, b) = (duo.a, duo.b);
    duo.sim.run_with(d, MS, |sim| {
        for s in streams.iter_mut() {
            s.step(sim, a, b);
        }
    });
}

fn vc_events(duo: &Duo, host: HostId, key: VcKey) -> Vec<VcEvent> {
    duo.sim
        .events()
        .iter()
        .filter_map(|(_, h, e)| match e {
            Event::Vc(k, e) if *h == host && *k == key => Some(e.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_relay_crash_moves_realtime_within_three_rtts_and_reliable_loses_nothing() {
    for seed in 0..12 {
        let mut sim = Sim::new(seed);
        let spec = DuoSpec::random(&mut sim);
        let mut duo = Duo::new(sim, &spec);
        let (rt_a, rt_b) = duo.open(1, Profile::realtime(false));
        let (rel_a, rel_b) = duo.open(2, Profile::reliable());
        let t0 = duo.sim.now();
        let mut streams = [Stream::new(rt_a, rt_b, 10 * MS, 64, t0), Stream::new(rel_a, rel_b, 10 * MS, 200, t0)];
        run_streams(&mut duo, &mut streams, Duration::from_secs(2));
        let failed = duo.active_path(rt_a).unwrap_or_else(|| panic!("no active path (seed {seed})"));
        let crash = duo.sim.now();
        duo.sim.crash(duo.paths[failed].relays[0]);
        run_streams(&mut duo, &mut streams, Duration::from_secs(3));
        let end = duo.sim.now();
        // Let the reliable stream drain, sending nothing new.
        streams[1].stop();
        run_streams(&mut duo, &mut streams, Duration::from_secs(2));
        let [rt, rel] = &streams;

        let resumed = rt.resumed_after(crash).unwrap_or_else(|| panic!("realtime never resumed (seed {seed})"));
        let bound = 3 * duo.paths[failed].rtt + 20 * MS;
        assert!(resumed <= bound, "realtime resumed after {resumed:?}, bound {bound:?} (seed {seed})");
        assert_ne!(duo.active_path(rt_a), Some(failed), "still on the crashed relay (seed {seed})");
        let settled = crash + Duration::from_secs(1);
        let late = rt.sent.iter().zip(&rt.arrived).filter(|(s, a)| **s >= settled && **s < end && a.is_none()).count();
        assert_eq!(late, 0, "realtime stream did not recover (seed {seed})");
        assert_eq!(rel.lost_before(end), 0, "reliable messages lost (seed {seed})");
        assert!(rel.in_order(), "reliable messages out of order or duplicated (seed {seed})");
        assert_eq!(rel.corrupt + rt.corrupt, 0, "seed {seed}");
    }
}

#[test]
fn loss_on_the_active_path_moves_the_vc_and_redundant_copies_lose_nothing() {
    for seed in 0..4 {
        let mut duo = three_paths(seed);
        let (plain_a, plain_b) = duo.open(1, Profile::realtime(false));
        let (red_a, red_b) = duo.open(2, Profile::realtime(true));
        let t0 = duo.sim.now();
        let mut streams = [Stream::new(plain_a, plain_b, 10 * MS, 64, t0), Stream::new(red_a, red_b, 10 * MS, 64, t0)];
        run_streams(&mut duo, &mut streams, Duration::from_secs(2));
        assert_eq!(duo.active_path(plain_a), Some(0), "seed {seed}");
        assert_eq!(duo.active_path(red_a), Some(0), "seed {seed}");

        // Path 0 starts losing 20% of datagrams each way (on its first link).
        let lossy = LinkConfig::latency(15 * MS).with_loss(Loss::Uniform(0.2));
        let (a, r) = (duo.a, duo.paths[0].relays[0]);
        duo.sim.link(a, r, lossy);
        let hit = duo.sim.now();
        run_streams(&mut duo, &mut streams, Duration::from_secs(4));

        for key in [plain_a, red_a] {
            assert_ne!(duo.active_path(key), Some(0), "VC {key:?} stayed on the lossy path (seed {seed})");
            let moved = vc_events(&duo, a, key).into_iter().any(|e| {
                matches!(e, VcEvent::PathChanged { reason: SwitchReason::Lossy(l), old: Some(old), .. }
                    if old.path == duo.paths[0].from_a && l > 0.05)
            });
            assert!(moved, "no move for loss on {key:?} (seed {seed}): {:#?}", vc_events(&duo, a, key));
        }
        let [plain, red] = &streams;
        assert!(
            plain.lost_around(hit, Duration::from_secs(1)) > 0,
            "the plain stream should show the loss (seed {seed})"
        );
        let end = duo.sim.now() - 100 * MS;
        let lost = red.sent.iter().zip(&red.arrived).filter(|(s, a)| a.is_none() && **s >= hit && **s < end).count();
        assert_eq!(lost, 0, "redundant realtime lost updates across the failure (seed {seed})");
    }
}

#[test]
fn a_relay_that_flips_bits_is_detected_and_its_path_abandoned() {
    for seed in 0..4 {
        let mut duo = three_paths(seed);
        let (rel_a, rel_b) = duo.open(1, Profile::reliable());
        let t0 = duo.sim.now();
        let mut streams = [Stream::new(rel_a, rel_b, 10 * MS, 300, t0)];
        run_streams(&mut duo, &mut streams, Duration::from_secs(2));
        assert_eq!(duo.active_path(rel_a), Some(0), "seed {seed}");
        duo.sim.tamper(duo.paths[0].relays[0], 0.5);
        let hit = duo.sim.now();
        run_streams(&mut duo, &mut streams, Duration::from_secs(3));
        duo.sim.run_for(Duration::from_secs(1));
        let [s] = &mut streams;
        s.step(&mut duo.sim, duo.a, duo.b);

        assert!(duo.sim.net_stats().tampered > 0, "seed {seed}");
        for (host, key) in [(duo.a, rel_a), (duo.b, rel_b)] {
            let ev = vc_events(&duo, host, key);
            assert!(
                ev.iter().any(|e| matches!(e, VcEvent::PathAbandoned { path, .. } if path.stats.auth_failures > 0)),
                "no abandoned path at {host:?} (seed {seed}): {ev:?}"
            );
            let now = duo.sim.now();
            let stats = duo.sim.node(host).stats(now, key).unwrap_or_else(|| panic!("VC gone (seed {seed})"));
            assert!(stats.counters.auth_failures > 0, "seed {seed}");
        }
        assert_ne!(duo.active_path(rel_a), Some(0), "still on the tampering relay (seed {seed})");
        assert_eq!(s.corrupt, 0, "a tampered message reached the game (seed {seed})");
        let end = duo.sim.now() - Duration::from_secs(1);
        assert_eq!(s.lost_before(end), 0, "reliable messages lost (seed {seed})");
        assert!(s.in_order(), "seed {seed}");
        assert!(s.resumed_after(hit + Duration::from_millis(500)).is_some(), "traffic did not continue (seed {seed})");
    }
}

#[test]
fn forged_frames_on_one_vc_leave_the_other_vcs_on_the_same_path_alone() {
    let seed = 7;
    let mut duo = three_paths(seed);
    let (hit_a, hit_b) = duo.open(1, Profile::realtime(false));
    let (calm_a, calm_b) = duo.open(2, Profile::realtime(false));
    let t0 = duo.sim.now();
    let mut streams = [Stream::new(hit_a, hit_b, 10 * MS, 64, t0), Stream::new(calm_a, calm_b, 10 * MS, 64, t0)];
    run_streams(&mut duo, &mut streams, Duration::from_secs(2));
    duo.sim.take_events();
    let (a, b, r) = (duo.a, duo.b, duo.paths[0].relays[0]);
    let (ida, idb) = (duo.sim.node(a).id(), duo.sim.node(b).id());
    let Path::Relayed(route) = duo.paths[0].from_a else { unreachable!() };
    let attack = duo.sim.now();
    // An attacker at relay 0's address forges sealed frames on VC 1 towards B: garbage under a
    // plausible header, sealed-frame type and packet numbers far ahead.
    duo.sim.run_with(Duration::from_secs(2), 20 * MS, |sim| {
        let mut body = vec![2u8; 80];
        body[1..9].copy_from_slice(&(1_000_000 + sim.elapsed().as_millis() as u64).to_be_bytes());
        let h = Header { kind: Kind::Data, source: ida, destination: idb, vc: VcId(1), trace: false };
        let mut buf = vec![0; wire::MAX_DATAGRAM];
        let at = wire::emit_header(&mut buf, &h, &route, route.len(), 0, body.len()).unwrap_or(0);
        buf[at..at + body.len()].copy_from_slice(&body);
        buf.truncate(at + body.len());
        sim.inject(r, b, buf);
        for s in streams.iter_mut() {
            s.step(sim, a, b);
        }
    });
    let hit = vc_events(&duo, b, hit_b);
    assert!(hit.iter().any(|e| matches!(e, VcEvent::PathAbandoned { .. })), "forgeries went unnoticed: {hit:?}");
    let calm = vc_events(&duo, b, calm_b);
    assert!(calm.is_empty(), "the other VC was disturbed: {calm:?}");
    let now = duo.sim.now();
    let calm_stats = duo.sim.node(b).stats(now, calm_b).unwrap_or_else(|| panic!("VC 2 gone"));
    assert_eq!(calm_stats.counters.auth_failures, 0);
    assert_eq!(calm_stats.path.map(|p| p.path), Some(duo.paths[0].from_b), "VC 2 left a healthy path");
    let [s_hit, s_calm] = &streams;
    let end = duo.sim.now() - 200 * MS;
    assert_eq!(s_calm.lost_before(end), 0, "VC 2 lost messages");
    assert_eq!(s_hit.corrupt + s_calm.corrupt, 0);
    // VC 1 keeps working (B answers on another path; A's sending path is untouched).
    assert!(s_hit.resumed_after(attack + Duration::from_secs(1)).is_some());
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let run = |seed| {
        let f = relay_crash_failover(seed, Profile::realtime(false));
        (f.resumed, f.lost, f.failed_rtt)
    };
    assert_eq!(run(3), run(3));
    assert_eq!(relay_crash_failover(5, Profile::reliable()), relay_crash_failover(5, Profile::reliable()));
}

#[test]
fn only_introduced_peers_open_vcs_and_direct_paths_work() {
    let seed = 11;
    let mut sim = Sim::new(seed);
    sim.set_default_link(LinkConfig::latency(10 * MS));
    let (a, b, c) = (sim.add_node(), sim.add_node(), sim.add_node());
    let (ka, kb) = (sim.node(a).public_key(), sim.node(b).public_key());
    let (addr_a, addr_b) = (sim.addr(a), sim.addr(b));
    let now = sim.now();
    sim.node(a).add_peer(now, shoal_sdk::PeerInfo { key: kb, paths: vec![Path::Direct(addr_b)] });
    sim.node(b).add_peer(now, shoal_sdk::PeerInfo { key: ka, paths: vec![Path::Direct(addr_a)] });
    // C knows B, but B was never introduced to C.
    sim.node(c).add_peer(now, shoal_sdk::PeerInfo { key: kb, paths: vec![Path::Direct(addr_b)] });
    let idb = sim.node(b).id();
    let good = sim.node(a).open(now, idb, VcId(1), Profile::reliable()).unwrap();
    let stranger = sim.node(c).open(now, idb, VcId(1), Profile::reliable()).unwrap();
    sim.node(a).send(good, b"hello".to_vec()).unwrap();
    sim.run_for(Duration::from_secs(11));

    let ida = sim.node(a).id();
    let got = sim.node(b).recv(VcKey { peer: ida, vc: VcId(1) });
    assert_eq!(got.as_deref(), Some(&b"hello"[..]), "the introduced peer's message (seed {seed})");
    let now = sim.now();
    let path = sim.node(a).stats(now, good).and_then(|s| s.path).map(|p| p.kind);
    assert_eq!(path, Some(shoal_sdk::PathKind::Direct));
    assert!(sim.node(b).counters().unknown_peer > 0, "the stranger's hellos were not counted");
    let idc = sim.node(c).id();
    assert!(sim.node(b).vcs().all(|k| k.peer != idc), "B opened a VC for a stranger");
    let closed = sim.events().iter().any(|(_, h, e)| {
        *h == c && *e == Event::Vc(stranger, VcEvent::Closed(shoal_sdk::CloseReason::HandshakeTimeout))
    });
    assert!(closed, "the stranger's VC should close unanswered");
}

#[test]
fn realtime_delivery_is_latest_wins_under_reordering() {
    let seed = 21;
    let mut duo = three_paths(seed);
    let (a, r) = (duo.a, duo.paths[0].relays[0]);
    let mut jumbled = LinkConfig::latency(15 * MS).with_jitter(8 * MS);
    jumbled.reorder = 0.3;
    duo.sim.link(a, r, jumbled);
    let (ka, kb) = duo.open(1, Profile::realtime(false));
    let t0 = duo.sim.now();
    let mut streams = [Stream::new(ka, kb, 5 * MS, 64, t0)];
    run_streams(&mut duo, &mut streams, Duration::from_secs(3));
    let [s] = &streams;
    assert!(s.in_order(), "an older update was delivered after a newer one (seed {seed})");
    let now = duo.sim.now();
    let stale = duo.sim.node(duo.b).stats(now, kb).map(|st| st.counters.stale).unwrap_or(0);
    assert!(stale > 0, "the link reordered nothing? (seed {seed})");
    let got = s.arrived.iter().filter(|x| x.is_some()).count();
    assert!(got * 10 >= s.sent.len() * 7, "only {got} of {} updates (seed {seed})", s.sent.len());
}

/// Scenario 4: 20 MB over a Bulk VC striped over three paths of 4, 2.5 and 1.5 MB/s arrives
/// intact, and sooner than over the best single path alone.
#[test]
fn bulk_striped_over_three_paths_arrives_intact_and_beats_the_best_single_path() {
    let total = 20 << 20;
    let limit = Duration::from_secs(30);
    let striped = bulk_transfer(7, 3, total, limit);
    let single = bulk_transfer(7, 1, total, limit);
    for run in [&striped, &single] {
        assert_eq!(run.received_hash.as_ref(), Some(&run.sent_hash), "transfer incomplete or corrupt: {run:?}");
        assert_eq!(run.duplicates, 0);
    }
    let (s, one) = (striped.took.unwrap(), single.took.unwrap());
    assert!(s.as_secs_f64() < 0.75 * one.as_secs_f64(), "striped {s:?} against single {one:?}");
    // Every path carried a share.
    assert!(striped.bytes_per_path.iter().all(|&b| b > total as u64 / 10), "{:?}", striped.bytes_per_path);
}

/// A custom profile asking for 2 MB/s leaves the lower-latency path once filling it shows it
/// carries only 1 MB/s, for the wider one, and the transfer completes there.
#[test]
fn a_path_measured_narrower_than_the_profile_minimum_is_left() {
    use shoal_sdk::profile::CustomCriteria;
    use shoal_sdk::{Delivery, ProfileConfig};
    let seed = 11;
    let spec = DuoSpec { one_relay: vec![(10 * MS, 10 * MS), (20 * MS, 20 * MS)], two_relay: None };
    let mut duo = Duo::new(Sim::new(seed), &spec);
    let narrow = duo.paths[0].relays[0];
    duo.sim.link(duo.a, narrow, LinkConfig::latency(10 * MS).with_bandwidth(1_000_000));
    let profile = Profile::from_config(&ProfileConfig::Custom(CustomCriteria {
        delivery: Delivery::ReliableUnordered,
        max_latency_ms: None,
        min_bandwidth_kbps: Some(16_000),
        max_loss: None,
        redundancy: false,
    }))
    .unwrap();
    let (ka, kb) = duo.open(1, profile);
    duo.sim.run_for(Duration::from_millis(500));
    assert_eq!(duo.active_path(ka), Some(0), "seed {seed}: the lower-latency path first");
    let (a, b) = (duo.a, duo.b);
    let count = 64u32;
    for i in 0..count {
        let mut m = vec![i as u8; 64 * 1024];
        m[..4].copy_from_slice(&i.to_be_bytes());
        duo.sim.node(a).send(ka, m).unwrap();
    }
    duo.sim.flush(a);
    let mut got = vec![false; count as usize];
    duo.sim.run_with(Duration::from_secs(20), 10 * MS, |s| {
        while let Some(m) = s.node(b).recv(kb) {
            let i = u32::from_be_bytes(m[..4].try_into().unwrap()) as usize;
            assert!(m[4..].iter().all(|&x| x == i as u8), "seed {seed}: message {i} corrupt");
            got[i] = true;
        }
    });
    assert!(got.iter().all(|&g| g), "seed {seed}: transfer incomplete");
    let narrowed = duo.sim.events().iter().find_map(|(_, h, e)| match e {
        Event::Vc(k, VcEvent::PathChanged { reason: SwitchReason::Narrow(bw), .. }) if *h == a && *k == ka => Some(*bw),
        _ => None,
    });
    let bw = narrowed.unwrap_or_else(|| panic!("seed {seed}: no switch for a narrow path: {:?}", duo.sim.events()));
    assert!((500_000..2_000_000).contains(&bw), "seed {seed}: measured {bw} B/s on a 1 MB/s path");
    assert_eq!(duo.active_path(ka), Some(1), "seed {seed}");
}

/// A paced profile with redundancy still sends every packet on two disjoint paths.
#[test]
fn a_paced_redundant_profile_sends_each_packet_on_two_paths() {
    use shoal_sdk::profile::CustomCriteria;
    use shoal_sdk::{Delivery, ProfileConfig};
    let seed = 5;
    let mut duo = three_paths(seed);
    let profile = Profile::from_config(&ProfileConfig::Custom(CustomCriteria {
        delivery: Delivery::Unreliable,
        max_latency_ms: None,
        min_bandwidth_kbps: Some(1_000),
        max_loss: None,
        redundancy: true,
    }))
    .unwrap();
    let (ka, kb) = duo.open(1, profile);
    let (a, b) = (duo.a, duo.b);
    // 500 kB/s: enough for each path's loss to be measured.
    let t0 = duo.sim.now();
    let mut stream = Stream::new(ka, kb, 2 * MS, 1000, t0);
    duo.sim.run_with(Duration::from_secs(3), MS, |s| stream.step(s, a, b));
    let now = duo.sim.now();
    let sa = duo.sim.node(a).stats(now, ka).unwrap();
    let carrying: Vec<_> = sa.paths.iter().filter(|p| p.stats.bytes_sent > 500 * 1000).collect();
    assert_eq!(carrying.len(), 2, "seed {seed}: {:?}", sa.paths);
    // The copies that lose the race still count as delivered: neither path looks lossy or
    // narrow, and neither is throttled to the floor.
    for p in &carrying {
        assert_eq!(p.stats.capacity, None, "seed {seed}: {p:?}");
        assert!(p.stats.pacing_rate.unwrap() > 500_000.0, "seed {seed}: {p:?}");
    }
    let sb = duo.sim.node(b).stats(now, kb).unwrap();
    assert!(sb.counters.duplicates > 1000, "seed {seed}: copies not deduplicated: {:?}", sb.counters);
    assert_eq!(stream.corrupt, 0);
    // Unreliable messages beyond the rate are dropped while the paths ramp up; after that,
    // none.
    let lost = stream.lost_around(t0 + Duration::from_millis(1750), Duration::from_millis(750));
    assert_eq!(lost, 0, "seed {seed}: lost between 1 s and 2.5 s");
}
