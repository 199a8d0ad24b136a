//! A peer's paths and one VC's choice among them, driven together on a virtual clock with a
//! network that answers each ping after its path's RTT.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use shoal_mesh::endpoint::Path;
use shoal_mesh::wire::Route;
use shoal_protocol::NodeId;

use super::*;
use crate::profile::Profile;

const MS: Duration = Duration::from_millis(1);

fn relayed(ids: &[u8]) -> Path {
    Path::Relayed(Route::new(&ids.iter().map(|&b| NodeId([b; 8])).collect::<Vec<_>>()).unwrap())
}

fn direct() -> Path {
    Path::Direct("203.0.113.7:4000".parse().unwrap())
}

/// One side of a VC: the peer's paths (this side keeps idle paths alive) and the VC's choice.
struct Side {
    paths: PathSet,
    sel: Selector,
    now: Instant,
    /// Pongs in flight: when they arrive, on which path, for which ping.
    inflight: Vec<(Instant, PathId, u32)>,
    /// Whether the VC sends data every 10 ms on its primary.
    sending: bool,
    next_data: Instant,
}

impl Side {
    fn new(profile: Profile, candidates: &[Path]) -> Side {
        let now = Instant::now();
        let mut paths = PathSet::new(true);
        for p in candidates {
            paths.introduce(now, *p);
        }
        paths.set_armed(true);
        Side { paths, sel: Selector::new(profile), now, inflight: Vec::new(), sending: false, next_data: now }
    }

    /// Runs for `d`; `rtt(path, elapsed)` says how long a ping on `path` takes to be answered
    /// at that time since `t0` (None: the path is down).
    fn run(&mut self, t0: Instant, d: Duration, rtt: impl Fn(PathId, Duration) -> Option<Duration>) {
        let end = self.now + d;
        while self.now < end {
            let now = self.now;
            self.paths.handle_timeout(now);
            let mut sent = Vec::new();
            while let Some(p) = self.paths.poll_ping() {
                sent.push((p.path, p.id));
            }
            if self.sending && now >= self.next_data {
                self.next_data = now + 10 * MS;
                if let Some(&primary) = self.sel.sending().first() {
                    self.paths.on_data_sent(now, primary);
                    if let Some((id, _)) = self.paths.take_ping(now, primary) {
                        sent.push((primary, id));
                    }
                }
            }
            for (path, id) in sent {
                if let Some(r) = rtt(path, now - t0) {
                    self.inflight.push((now + r, path, id));
                }
            }
            self.sel.reselect(now, &self.paths, None);
            let active = self.sel.sending().to_vec();
            self.paths.set_in_use(now, |id| active.contains(&id), |_| false);
            self.inflight.sort_by_key(|x| x.0);
            let mut next = self.paths.poll_timeout(now).unwrap_or(now + Duration::from_secs(1));
            if let Some(t) = self.sel.poll_timeout(now, &self.paths) {
                next = next.min(t);
            }
            if let Some(x) = self.inflight.first() {
                next = next.min(x.0);
            }
            if self.sending {
                next = next.min(self.next_data);
            }
            self.now = next.clamp(now + Duration::from_micros(100), end.max(now + Duration::from_micros(100)));
            while self.inflight.first().is_some_and(|x| x.0 <= self.now) {
                let (_, path, id) = self.inflight.remove(0);
                self.paths.on_frame(self.now, path, false);
                self.paths.on_pong(self.now, path, id, Duration::ZERO);
            }
        }
    }

    fn pings(&self, id: PathId) -> u64 {
        self.sel.info_of(self.now, &self.paths, id).stats.pings
    }

    fn punch(&self, id: PathId) -> Option<Punch> {
        self.paths.punch(id)
    }

    fn changes(&mut self) -> Vec<PathEvent> {
        std::iter::from_fn(|| self.sel.poll_event()).filter(|e| matches!(e, PathEvent::Changed { .. })).collect()
    }
}

#[test]
fn a_direct_path_that_never_answers_is_punched_in_bounded_attempts_with_backoff() {
    let mut s = Side::new(Profile::reliable(), &[relayed(&[1]), direct()]);
    let t0 = s.now;
    let d = PathId(1);
    let relay_only = |id: PathId, _| (id.0 == 0).then_some(60 * MS);
    s.run(t0, 500 * MS, relay_only);
    assert_eq!(s.punch(d), Some(Punch::Trying { attempt: 1 }));
    // Every 20 ms while trying: about 25 probes in half a second.
    assert!((24..=26).contains(&s.pings(d)), "{}", s.pings(d));
    s.run(t0, 9_500 * MS, relay_only);
    assert_eq!(s.punch(d), Some(Punch::Failed { attempts: 1 }));
    assert_eq!(s.pings(d), u64::from(PUNCH_PROBES), "one attempt, then quiet until the retry");
    assert_eq!(s.sel.sending(), &[PathId(0)], "the VC stays relayed");
    // The second attempt comes 15 s after the first ended, the third 30 s after that.
    s.run(t0, Duration::from_secs(10), relay_only);
    assert_eq!(s.pings(d), 2 * u64::from(PUNCH_PROBES));
    s.run(t0, Duration::from_secs(25), relay_only);
    assert_eq!(s.pings(d), 2 * u64::from(PUNCH_PROBES), "the third attempt waits 30 s");
    s.run(t0, Duration::from_secs(10), relay_only);
    assert_eq!(s.pings(d), 3 * u64::from(PUNCH_PROBES));
}

#[test]
fn a_punched_direct_path_takes_the_traffic_at_its_first_answer() {
    let mut s = Side::new(Profile::reliable(), &[relayed(&[1]), direct()]);
    let t0 = s.now;
    // The peer's NAT lets probes through from 300 ms on (when its own probes opened it).
    let net = |id: PathId, t: Duration| match id.0 {
        0 => Some(60 * MS),
        _ => (t >= 300 * MS).then_some(20 * MS),
    };
    s.run(t0, 280 * MS, net);
    assert_eq!(s.sel.sending(), &[PathId(0)]);
    s.changes();
    s.run(t0, 100 * MS, net);
    assert_eq!(s.punch(PathId(1)), Some(Punch::Open));
    // Within one probe interval and one direct RTT of the NAT opening, not a hold time.
    assert_eq!(s.sel.sending(), &[PathId(1)]);
    let ev = s.changes();
    assert!(matches!(ev[..], [PathEvent::Changed { reason: SwitchReason::Better, .. }]), "{ev:?}");
}

#[test]
fn a_direct_path_as_fast_as_the_relay_is_preferred_and_kept() {
    let mut s = Side::new(Profile::reliable(), &[relayed(&[1]), direct()]);
    let t0 = s.now;
    // The direct path answers from the start, a little slower than the relay (loopback).
    let net = |id: PathId, _| Some(Duration::from_micros(if id.0 == 0 { 300 } else { 320 }));
    s.run(t0, 500 * MS, net);
    assert_eq!(s.sel.sending(), &[PathId(1)]);
    s.changes();
    s.sending = true;
    s.run(t0, Duration::from_secs(5), net);
    assert_eq!(s.changes(), vec![]);
    assert_eq!(s.sel.sending(), &[PathId(1)]);
}

#[test]
fn a_flowing_vc_leaves_a_dead_path_within_a_few_rtts() {
    let mut s = Side::new(Profile::realtime(false), &[relayed(&[1]), relayed(&[2])]);
    s.sending = true;
    let t0 = s.now;
    let fast = |id: PathId| if id.0 == 0 { 40 * MS } else { 60 * MS };
    s.run(t0, Duration::from_secs(3), |id, _| Some(fast(id)));
    assert_eq!(s.sel.sending(), &[PathId(0)]);
    s.changes();
    // Path 0 dies at 3 s.
    s.run(t0, 400 * MS, |id, _| (id.0 != 0).then(|| fast(id)));
    assert_eq!(s.sel.sending(), &[PathId(1)]);
    let ev = s.changes();
    let [PathEvent::Changed { reason: SwitchReason::Silent(quiet), new, .. }] = &ev[..] else { panic!("{ev:?}") };
    assert_eq!(new.id, PathId(1));
    assert!(*quiet < 130 * MS, "took {quiet:?} of silence on a 40 ms path");
}

#[test]
fn an_idle_vc_pings_its_path_every_keepalive_and_spares_rarely() {
    let mut s = Side::new(Profile::realtime(false), &[relayed(&[1]), relayed(&[2])]);
    let t0 = s.now;
    s.run(t0, Duration::from_secs(2), |id, _| Some(if id.0 == 0 { 40 * MS } else { 60 * MS }));
    s.changes();
    let (p0, p1) = (s.pings(PathId(0)), s.pings(PathId(1)));
    s.run(t0, Duration::from_secs(60), |id, _| Some(if id.0 == 0 { 40 * MS } else { 60 * MS }));
    let per_min = |before: u64, id| s.pings(id) - before;
    assert!((11..=13).contains(&per_min(p0, PathId(0))), "{}", per_min(p0, PathId(0)));
    assert!((2..=4).contains(&per_min(p1, PathId(1))), "{}", per_min(p1, PathId(1)));
    assert!(s.changes().is_empty());
}

#[test]
fn an_idle_path_that_stops_answering_is_checked_before_it_is_left() {
    let mut s = Side::new(Profile::realtime(false), &[relayed(&[1]), relayed(&[2])]);
    let t0 = s.now;
    let net = |id: PathId| if id.0 == 0 { 40 * MS } else { 60 * MS };
    s.run(t0, Duration::from_secs(10), |id, _| Some(net(id)));
    s.changes();
    let died = s.now - t0;
    s.run(t0, Duration::from_secs(12), |id, t| (id.0 != 0 || t < died).then(|| net(id)));
    assert_eq!(s.sel.sending(), &[PathId(1)]);
    let ev = s.changes();
    let reason = |e: &PathEvent| match e {
        PathEvent::Changed { reason, .. } => Some(*reason),
        _ => None,
    };
    // Dead, or lossy when the lost keepalive and its check make up a share of few samples.
    assert!(
        matches!(
            ev.iter().map(reason).collect::<Vec<_>>()[..],
            [Some(SwitchReason::Silent(_) | SwitchReason::Lossy(_))]
        ),
        "{ev:?}"
    );
}

#[test]
fn hysteresis_keeps_a_path_that_is_only_slightly_worse() {
    let mut s = Side::new(Profile::realtime(false), &[relayed(&[1]), relayed(&[2])]);
    s.sending = true;
    let t0 = s.now;
    // Two paths within 1 ms of each other, swapping order every 300 ms.
    let swapping = |id: PathId, t: Duration| {
        let odd = (t.as_millis() / 300) % 2 == 1;
        Some(if (id.0 == 0) == odd { 40 * MS } else { 41 * MS })
    };
    s.run(t0, Duration::from_secs(1), swapping);
    s.changes();
    let before = s.sel.sending().to_vec();
    s.run(t0, Duration::from_secs(10), swapping);
    assert_eq!(s.changes(), vec![], "flapped between near-equal paths");
    assert_eq!(s.sel.sending(), before);
}

#[test]
fn a_clearly_better_path_wins_after_the_hold_time() {
    let mut s = Side::new(Profile::realtime(false), &[relayed(&[1]), relayed(&[2])]);
    s.sending = true;
    let t0 = s.now;
    s.run(t0, Duration::from_secs(2), |id, _| Some(if id.0 == 0 { 30 * MS } else { 50 * MS }));
    assert_eq!(s.sel.sending(), &[PathId(0)]);
    // Path 1 is measured only now and then while path 0 carries the data: give it time.
    s.run(t0, Duration::from_secs(60), |id, _| Some(if id.0 == 0 { 80 * MS } else { 50 * MS }));
    assert_eq!(s.sel.sending(), &[PathId(1)]);
}

#[test]
fn redundancy_adds_a_relay_disjoint_second_path() {
    let paths = [relayed(&[1]), relayed(&[1, 2]), relayed(&[3])];
    let mut s = Side::new(Profile::realtime(true), &paths);
    let t0 = s.now;
    s.run(t0, Duration::from_secs(2), |id, _| Some(MS * (20 + 10 * u32::from(id.0))));
    assert_eq!(s.sel.sending(), &[PathId(0), PathId(2)], "path 1 shares relay 1 with the primary");
}

#[test]
fn repeated_auth_failures_abandon_the_active_path_for_this_vc() {
    let mut s = Side::new(Profile::reliable(), &[relayed(&[1]), relayed(&[2])]);
    let t0 = s.now;
    s.run(t0, Duration::from_secs(2), |id, _| Some(if id.0 == 0 { 20 * MS } else { 30 * MS }));
    while s.sel.poll_event().is_some() {}
    let now = s.now;
    let abandoned: Vec<bool> =
        (0..TAMPER_LIMIT).map(|i| s.sel.on_auth_failure(now + MS * i, &s.paths, PathId(0))).collect();
    assert_eq!(abandoned.last(), Some(&true));
    assert_eq!(s.sel.sending()[0], PathId(1));
    assert!(matches!(s.sel.poll_event(), Some(PathEvent::Abandoned { failures: TAMPER_LIMIT, .. })));
    assert!(matches!(s.sel.poll_event(), Some(PathEvent::Changed { reason: SwitchReason::Tampering, .. })));
    // Another VC's view of the same paths is untouched.
    let mut other = Selector::new(Profile::reliable());
    other.reselect(s.now, &s.paths, None);
    assert_eq!(other.sending(), &[PathId(0)]);
}

#[test]
fn learned_paths_are_bounded_and_the_least_heard_gives_way() {
    let now = Instant::now();
    let mut paths = PathSet::new(true);
    paths.introduce(now, relayed(&[1]));
    let addr = |i: u16| Path::Direct(std::net::SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 9000)));
    let mut ids = Vec::new();
    for i in 0..MAX_LEARNED_PATHS as u16 {
        let id = paths.learn(now, addr(i)).unwrap();
        paths.on_frame(now + MS * u32::from(i), id, false);
        ids.push(id);
    }
    assert!(paths.take_evicted().is_empty());
    // One more: the first learned (heard longest ago) gives way, and its id is reported.
    let id = paths.learn(now + Duration::from_secs(1), addr(1000)).unwrap();
    assert_eq!(id, ids[0]);
    assert_eq!(paths.take_evicted(), vec![ids[0]]);
    assert_eq!(paths.path(id), Some(addr(1000)));
    assert_eq!(paths.len(), 1 + MAX_LEARNED_PATHS);
    // Learned paths in use are kept: with all of them in use, a new one is refused.
    paths.set_in_use(now, |_| true, |_| false);
    assert_eq!(paths.learn(now, addr(2000)), None);
    assert_eq!(paths.counters(), PathSetCounters { refused: 1, evicted: 1 });
    // Introductions have their own bound.
    for i in 0..MAX_INTRODUCED_PATHS as u8 {
        paths.introduce(now, relayed(&[2, i]));
    }
    assert_eq!(paths.counters().refused, 2);
}

#[test]
fn a_late_pong_clears_the_loss_it_was_counted_as() {
    let mut s = Side::new(Profile::realtime(false), &[relayed(&[1])]);
    s.sending = true;
    let t0 = s.now;
    s.run(t0, Duration::from_secs(2), |_, _| Some(20 * MS));
    assert_eq!(s.paths.loss(PathId(0)), 0.0);
    // For a second, every answer waits 200 ms (a stalled host), far past the give-up time.
    let stall = s.now - t0;
    s.run(t0, Duration::from_secs(1), |_, t| Some(if t < stall + Duration::from_secs(1) { 200 * MS } else { 20 * MS }));
    s.run(t0, Duration::from_secs(1), |_, _| Some(20 * MS));
    assert_eq!(s.paths.loss(PathId(0)), 0.0, "answers that came late were counted as lost");
}

/// Seen with twenty players on loopback: one side of a VC took its direct path's first RTT
/// while the host was busy with the crowd's handshakes (tens of ms), and stayed on the relay.
/// The peer sent on the direct path and kept it alive with its pings, so this side never pinged
/// it again and its RTT never came down: each side pinged its own one-way path twenty times a
/// second. Riding on the answers to the peer's pings, fresh samples bring it down.
#[test]
fn a_path_the_peer_sends_on_gets_fresh_rtt_samples_from_our_answers_to_its_pings() {
    let mut now = Instant::now();
    let mut paths = PathSet::new(false);
    let relay = paths.introduce(now, relayed(&[1])).unwrap();
    let direct = paths.introduce(now, direct()).unwrap();
    paths.set_armed(true);
    paths.handle_timeout(now);
    // The first samples: the relay answers in 1 ms, the direct path, on a busy host, in 40.
    while let Some(p) = paths.poll_ping() {
        let rtt = if p.path == direct { 40 * MS } else { MS };
        paths.on_pong(now + rtt, p.path, p.id, Duration::ZERO);
    }
    assert_eq!(paths.typical_rtt(direct), Some(40 * MS));
    paths.set_in_use(now, |id| id == relay, |_| false);
    // We send on the relay; the peer sends on the direct path every 33 ms and pings it every
    // 20 ms. Our answers may carry a ping of ours, which the peer answers in 1 ms.
    let end = now + Duration::from_secs(10);
    let mut next_data = now;
    while now < end {
        now += 20 * MS;
        if now >= next_data {
            paths.on_frame(now, direct, true);
            next_data = now + 33 * MS;
        }
        paths.on_data_sent(now, relay);
        paths.on_peer_ping(now, direct);
        if let Some(ping) = paths.take_echo_ping(now, direct) {
            paths.on_pong(now + MS, direct, ping, Duration::ZERO);
        }
        paths.handle_timeout(now);
        while paths.poll_ping().is_some() {}
    }
    let rtt = paths.typical_rtt(direct).unwrap();
    assert!(rtt < 5 * MS, "the direct path still looks {rtt:?} long");
}

#[test]
fn a_lossy_path_is_left_only_for_one_measured_to_lose_less() {
    let mut s = Side::new(Profile::realtime(false), &[relayed(&[1]), direct()]);
    s.sending = true;
    let t0 = s.now;
    // The direct path loses one ping in ten (never long enough to fall silent); the relay
    // loses none, but as a spare it is pinged every 20 s.
    let net = |id: PathId, t: Duration| match id.0 {
        0 => Some(60 * MS),
        _ => (!(t.as_millis() / 10).is_multiple_of(10)).then_some(20 * MS),
    };
    s.run(t0, Duration::from_secs(1), net);
    assert_eq!(s.sel.sending(), &[PathId(1)]);
    s.changes();
    // Past the profile's 5 %, but the relay's few answers say nothing of its loss yet.
    s.run(t0, Duration::from_secs(10), net);
    assert!(s.paths.loss(PathId(1)) > 0.05, "{}", s.paths.loss(PathId(1)));
    assert!(!s.paths.loss_known(PathId(0)));
    assert_eq!(s.changes(), vec![], "left a 10 % path for one never measured");
    assert_eq!(s.sel.sending(), &[PathId(1)]);
    // Once the relay has answered enough pings, it is the better path.
    s.run(t0, Duration::from_secs(200), net);
    assert!(s.paths.loss_known(PathId(0)));
    let ev = s.changes();
    assert!(matches!(ev.first(), Some(PathEvent::Changed { reason: SwitchReason::Lossy(_), .. })), "{ev:?}");
    assert_eq!(s.sel.sending(), &[PathId(0)]);
}

/// A path we serve a peer over at 30 Hz, answered after 40 ms, while the peer's own data comes
/// back every `peer_gap` (if at all), for 10 s; then the path dies. Returns the pings in those
/// 10 s and how long after the death the path stopped counting as usable.
fn serving_at_30_hz(peer_gap: Option<Duration>) -> (u64, Duration) {
    let t0 = Instant::now();
    let mut now = t0;
    let mut paths = PathSet::new(true);
    let relay = paths.introduce(now, relayed(&[1])).unwrap();
    paths.set_armed(true);
    paths.set_in_use(now, |_| true, |_| false);
    let death = now + Duration::from_secs(10);
    let (mut next_data, mut next_peer) = (now, now);
    let mut pongs: Vec<(Instant, u32)> = Vec::new();
    let mut pings = 0;
    while now < death + Duration::from_secs(2) {
        now += MS;
        let alive = now < death;
        let mut sent = Vec::new();
        if now >= next_data {
            next_data = now + 33 * MS;
            paths.on_data_sent(now, relay);
            sent.extend(paths.take_ping(now, relay).map(|(id, _)| id));
        }
        if let Some(gap) = peer_gap
            && now >= next_peer
            && alive
        {
            next_peer = now + gap;
            paths.on_frame(now, relay, true);
        }
        paths.handle_timeout(now);
        sent.extend(std::iter::from_fn(|| paths.poll_ping()).map(|p| p.id));
        if alive {
            pings += sent.len() as u64;
            pongs.extend(sent.into_iter().map(|id| (now + 40 * MS, id)));
        }
        for (_, id) in pongs.extract_if(.., |(at, _)| *at <= now) {
            paths.on_frame(now, relay, false);
            paths.on_pong(now, relay, id, Duration::ZERO);
        }
        if !alive && !paths.usable(now, relay) {
            return (pings, now - death);
        }
    }
    (pings, Duration::MAX)
}

/// Every ping on a path the peer's data does not feed draws a pong the peer sends alone. A
/// peer with nothing to send us pays that for our fast failover; one that streams to us, more
/// slowly than we serve it (its upload budget serves its farther neighbours less), is not made
/// to answer 30 times a second, and a dead path is still found within a third of a second.
#[test]
fn a_peer_that_streams_to_us_slowly_is_pinged_five_times_a_second_not_at_our_rate() {
    let (alone, found) = serving_at_30_hz(None);
    assert!(alone >= 250, "a one-way stream is pinged at its rate: {alone} in 10 s");
    assert!(found <= 150 * MS, "found dead after {found:?}");
    let (streaming, found) = serving_at_30_hz(Some(700 * MS));
    assert!((40..=55).contains(&streaming), "{streaming} pings in 10 s");
    assert!(found <= 330 * MS, "found dead after {found:?}");
}
