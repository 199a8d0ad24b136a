//! Scenarios that the tests and `shoal-sim-bench` share: a two-player topology with several
//! relayed paths between the players, and a game-like message stream over one VC that
//! records when each message was sent and when (and in which order) it arrived.

use std::time::{Duration, Instant};

use rand::RngExt;
use shoal_mesh::endpoint::Path;
use shoal_mesh::wire::{Route, VcId};
use shoal_protocol::NodeId;
use shoal_sdk::{PeerInfo, Profile, VcKey};

use crate::link::LinkConfig;
use crate::sim::{HostId, Sim};

/// One relayed path of a [`Duo`]: the relays it crosses, and its one-way latencies.
#[derive(Debug, Clone)]
pub struct DuoPath {
    /// The relays, from A's side.
    pub relays: Vec<HostId>,
    /// A's path to B.
    pub from_a: Path,
    /// B's path to A.
    pub from_b: Path,
    /// Round trip over it (sum of its links' latencies, both ways).
    pub rtt: Duration,
}

/// Two players, A and B, with no direct path, and relayed paths between them.
#[derive(Debug)]
pub struct Duo {
    /// The network.
    pub sim: Sim,
    /// Player A.
    pub a: HostId,
    /// Player B.
    pub b: HostId,
    /// The relayed paths.
    pub paths: Vec<DuoPath>,
}

/// One-relay paths with these (A–relay, relay–B) one-way latencies, and optionally one
/// two-relay path: A–R (first), R–R' (second), R'–B (third).
#[derive(Debug, Clone, Default)]
pub struct DuoSpec {
    /// (A to relay, relay to B) one-way latency of each one-relay path.
    pub one_relay: Vec<(Duration, Duration)>,
    /// One-way latencies of a two-relay path's three links.
    pub two_relay: Option<[Duration; 3]>,
}

impl DuoSpec {
    /// Three one-relay paths and one two-relay path, with latencies drawn from the sim's
    /// seeded generator (5–40 ms per link).
    pub fn random(sim: &mut Sim) -> DuoSpec {
        let mut ms = || Duration::from_micros(sim.rng().random_range(5_000..40_000));
        DuoSpec { one_relay: (0..3).map(|_| (ms(), ms())).collect(), two_relay: Some([ms(), ms(), ms()]) }
    }
}

impl Duo {
    /// Builds the topology, binds both players to their relays and introduces them to each
    /// other (as the control server will). Runs the network until every bind is done.
    pub fn new(mut sim: Sim, spec: &DuoSpec) -> Duo {
        let (a, b) = (sim.add_node(), sim.add_node());
        sim.partition(a, b, true);
        let mut paths = Vec::new();
        for &(la, lb) in &spec.one_relay {
            let r = sim.add_relay();
            sim.link(a, r, LinkConfig::latency(la));
            sim.link(r, b, LinkConfig::latency(lb));
            sim.bind(a, r);
            sim.bind(b, r);
            let route = one(&[sim.relay_id(r)]);
            paths.push(DuoPath {
                relays: vec![r],
                from_a: Path::Relayed(route),
                from_b: Path::Relayed(route.reversed()),
                rtt: 2 * (la + lb),
            });
        }
        if let Some([l1, l2, l3]) = spec.two_relay {
            let (r1, r2) = (sim.add_relay(), sim.add_relay());
            sim.link(a, r1, LinkConfig::latency(l1));
            sim.link(r1, r2, LinkConfig::latency(l2));
            sim.link(r2, b, LinkConfig::latency(l3));
            // Each player reaches only the relay on its side.
            sim.partition(a, r2, true);
            sim.partition(b, r1, true);
            sim.peer_relays(r1, r2);
            sim.bind(a, r1);
            sim.bind(b, r2);
            let route = one(&[sim.relay_id(r1), sim.relay_id(r2)]);
            paths.push(DuoPath {
                relays: vec![r1, r2],
                from_a: Path::Relayed(route),
                from_b: Path::Relayed(route.reversed()),
                rtt: 2 * (l1 + l2 + l3),
            });
        }
        sim.run_for(Duration::from_millis(500));
        let (ka, kb) = (sim.node(a).public_key(), sim.node(b).public_key());
        let now = sim.now();
        let to_b = paths.iter().map(|p| p.from_a).collect();
        let to_a = paths.iter().map(|p| p.from_b).collect();
        sim.node(a).add_peer(now, PeerInfo { key: kb, paths: to_b });
        sim.node(b).add_peer(now, PeerInfo { key: ka, paths: to_a });
        Duo { sim, a, b, paths }
    }

    /// Opens VC `vc` from A with `profile`; B opens its side when the hello arrives.
    /// Returns the VC's key at A and at B.
    ///
    /// # Panics
    /// If A cannot open it (a scenario bug).
    #[allow(clippy::expect_used)]
    pub fn open(&mut self, vc: u32, profile: Profile) -> (VcKey, VcKey) {
        let (ida, idb, now) = (self.sim.node(self.a).id(), self.sim.node(self.b).id(), self.sim.now());
        let ka = self.sim.node(self.a).open(now, idb, VcId(vc), profile).expect("open");
        self.sim.flush(self.a);
        (ka, VcKey { peer: ida, vc: VcId(vc) })
    }

    /// The path of `self.paths` that A's VC `key` sends on now.
    pub fn active_path(&mut self, key: VcKey) -> Option<usize> {
        let now = self.sim.now();
        let path = self.sim.node(self.a).stats(now, key)?.path?.path;
        self.paths.iter().position(|p| p.from_a == path)
    }
}

/// The filler byte at `i` of message `seq`, so that the receiver can check every byte.
fn pattern(seq: u64, i: usize) -> u8 {
    (seq as u8).wrapping_mul(31).wrapping_add(i as u8)
}

fn one(ids: &[NodeId]) -> Route {
    // Routes here have one or two relays, within MAX_ROUTE.
    Route::new(ids).unwrap_or(Route::DIRECT)
}

/// A one-way message stream from A to B over one VC: a message every `every`, each carrying
/// its sequence number and send time, padded to `size` bytes.
#[derive(Debug)]
pub struct Stream {
    /// The VC at A.
    pub at_a: VcKey,
    /// The VC at B.
    pub at_b: VcKey,
    every: Duration,
    size: usize,
    t0: Instant,
    next_send: Option<Instant>,
    /// Send time of each message, by sequence number.
    pub sent: Vec<Instant>,
    /// Arrival time of each message, by sequence number.
    pub arrived: Vec<Option<Instant>>,
    /// Sequence numbers in the order they arrived (duplicates included).
    pub order: Vec<u64>,
    /// Messages the VC refused (buffer full).
    pub refused: u64,
    /// Messages that arrived with bytes other than those sent.
    pub corrupt: u64,
}

impl Stream {
    /// A stream over the VC (`at_a`, `at_b`).
    pub fn new(at_a: VcKey, at_b: VcKey, every: Duration, size: usize, t0: Instant) -> Stream {
        Stream {
            at_a,
            at_b,
            every,
            size: size.max(16),
            t0,
            next_send: None,
            sent: Vec::new(),
            arrived: Vec::new(),
            order: Vec::new(),
            refused: 0,
            corrupt: 0,
        }
    }

    /// One game frame: A sends if a message is due, and B reads what arrived.
    pub fn step(&mut self, sim: &mut Sim, a: HostId, b: HostId) {
        let now = sim.now();
        if self.next_send.is_none_or(|t| now >= t) {
            let seq = self.sent.len() as u64;
            let mut m = vec![0u8; self.size];
            m[..8].copy_from_slice(&seq.to_be_bytes());
            m[8..16].copy_from_slice(&((now - self.t0).as_nanos() as u64).to_be_bytes());
            for (i, b) in m.iter_mut().enumerate().skip(16) {
                *b = pattern(seq, i);
            }
            match sim.node(a).send(self.at_a, m) {
                Ok(()) => {
                    self.sent.push(now);
                    self.arrived.push(None);
                }
                Err(_) => self.refused += 1,
            }
            self.next_send = Some(self.next_send.map_or(now, |t| t) + self.every);
            sim.flush(a);
        }
        while let Some(m) = sim.node(b).recv(self.at_b) {
            let Some(seq) = m.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes) else {
                self.corrupt += 1;
                continue;
            };
            if m.len() != self.size || m.iter().enumerate().skip(16).any(|(i, b)| *b != pattern(seq, i)) {
                self.corrupt += 1;
                continue;
            }
            if let Some(slot) = self.arrived.get_mut(seq as usize) {
                slot.get_or_insert(now);
            }
            self.order.push(seq);
        }
    }

    /// Sends nothing more; later steps only read what arrives.
    pub fn stop(&mut self) {
        self.next_send = Some(self.t0 + Duration::from_secs(1 << 30));
    }

    /// Time from `at` until the first message sent at or after `at` arrived.
    pub fn resumed_after(&self, at: Instant) -> Option<Duration> {
        self.sent
            .iter()
            .zip(&self.arrived)
            .filter(|(s, _)| **s >= at)
            .filter_map(|(_, a)| *a)
            .min()
            .map(|a| a.saturating_duration_since(at))
    }

    /// Messages sent within `window` around `at` that never arrived.
    pub fn lost_around(&self, at: Instant, window: Duration) -> u64 {
        self.sent
            .iter()
            .zip(&self.arrived)
            .filter(|(s, a)| a.is_none() && **s + window >= at && **s <= at + window)
            .count() as u64
    }

    /// Messages sent before `until` that never arrived.
    pub fn lost_before(&self, until: Instant) -> u64 {
        self.sent.iter().zip(&self.arrived).filter(|(s, a)| a.is_none() && **s < until).count() as u64
    }

    /// Whether messages arrived in the order they were sent, each once.
    pub fn in_order(&self) -> bool {
        self.order.windows(2).all(|w| w[0] < w[1])
    }
}

/// What one failover run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Failover {
    /// From the crash to the first message sent after it arriving.
    pub resumed: Option<Duration>,
    /// RTT of the path that failed.
    pub failed_rtt: Duration,
    /// Messages lost within a second either side of the crash.
    pub lost: u64,
    /// Whether every message arrived, in order (meaningful for reliable ordered VCs).
    pub all_in_order: bool,
}

/// Opens a VC with `profile` on a random topology from `seed`, streams A to B at 100 Hz,
/// crashes the first relay of the VC's active path after two seconds, and measures.
pub fn relay_crash_failover(seed: u64, profile: Profile) -> Failover {
    let mut sim = Sim::new(seed);
    let spec = DuoSpec::random(&mut sim);
    let mut duo = Duo::new(sim, &spec);
    let (ka, kb) = duo.open(1, profile);
    let t0 = duo.sim.now();
    let (a, b) = (duo.a, duo.b);
    let mut stream = Stream::new(ka, kb, Duration::from_millis(10), 64, t0);
    let jitter = Duration::from_micros(duo.sim.rng().random_range(0..10_000));
    duo.sim.run_with(Duration::from_secs(2) + jitter, Duration::from_millis(1), |s| stream.step(s, a, b));
    let failed = duo.active_path(ka);
    let crash_at = duo.sim.now();
    let failed_rtt = failed.map_or(Duration::ZERO, |i| duo.paths[i].rtt);
    if let Some(i) = failed {
        let r = duo.paths[i].relays[0];
        duo.sim.crash(r);
    }
    duo.sim.run_with(Duration::from_secs(2), Duration::from_millis(1), |s| stream.step(s, a, b));
    // Stop sending and let the reliable stream finish.
    let end = duo.sim.now();
    stream.stop();
    duo.sim.run_with(Duration::from_secs(2), Duration::from_millis(1), |s| stream.step(s, a, b));
    Failover {
        resumed: stream.resumed_after(crash_at),
        failed_rtt,
        lost: stream.lost_around(crash_at, Duration::from_secs(1)),
        all_in_order: stream.lost_before(end) == 0 && stream.in_order(),
    }
}

/// The bulk topology: three one-relay paths, each narrowed on the player A side.
/// (A–relay latency, relay–B latency, bandwidth of the A–relay link in bytes/s.)
pub const BULK_PATHS: [(Duration, Duration, u64); 3] = [
    (Duration::from_millis(10), Duration::from_millis(10), 4_000_000),
    (Duration::from_millis(15), Duration::from_millis(10), 2_500_000),
    (Duration::from_millis(20), Duration::from_millis(15), 1_500_000),
];

/// Size of each message of a bulk transfer.
pub const BULK_MESSAGE: usize = 64 * 1024;

/// What one bulk transfer measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkRun {
    /// From the first message handed to the VC to the last one delivered (None if the
    /// transfer did not finish within its time limit).
    pub took: Option<Duration>,
    /// SHA-256 of what A sent, messages in order.
    pub sent_hash: Vec<u8>,
    /// SHA-256 of what B received, messages in order (None if some never arrived).
    pub received_hash: Option<Vec<u8>>,
    /// Messages delivered more than once.
    pub duplicates: u64,
    /// Data bytes A sent over each path (retransmissions included).
    pub bytes_per_path: Vec<u64>,
    /// Bytes the links dropped (queue overflow).
    pub dropped_datagrams: u64,
}

/// Transfers `total` bytes from A to B over a Bulk VC that stripes over up to `stripe` paths
/// of the [`BULK_PATHS`] topology (1 ms of jitter per link), with at most `limit` of virtual
/// time.
pub fn bulk_transfer(seed: u64, stripe: u8, total: usize, limit: Duration) -> BulkRun {
    let mut sim = Sim::new(seed);
    let spec = DuoSpec { one_relay: BULK_PATHS.iter().map(|&(la, lb, _)| (la, lb)).collect(), two_relay: None };
    let jitter = Duration::from_millis(1);
    sim.set_default_link(LinkConfig::latency(Duration::from_millis(10)).with_jitter(jitter));
    let mut duo = Duo::new(sim, &spec);
    let (a, b) = (duo.a, duo.b);
    for (p, &(la, lb, bw)) in duo.paths.clone().iter().zip(&BULK_PATHS) {
        let r = p.relays[0];
        duo.sim.link(a, r, LinkConfig::latency(la).with_jitter(jitter).with_bandwidth(bw));
        duo.sim.link(r, b, LinkConfig::latency(lb).with_jitter(jitter));
    }
    let profile = Profile::from_config(&shoal_sdk::ProfileConfig::Bulk { max_paths: Some(stripe) })
        .unwrap_or_else(|_| Profile::bulk());
    let (ka, kb) = duo.open(1, profile);
    // Let the key exchange and the first path measurements finish.
    duo.sim.run_for(Duration::from_millis(500));
    let count = total.div_ceil(BULK_MESSAGE);
    let mut sent = ring::digest::Context::new(&ring::digest::SHA256);
    let t0 = duo.sim.now();
    for i in 0..count {
        let mut m = vec![0u8; BULK_MESSAGE];
        m[..8].copy_from_slice(&(i as u64).to_be_bytes());
        for (j, byte) in m.iter_mut().enumerate().skip(8) {
            *byte = pattern(i as u64, j);
        }
        sent.update(&m);
        if duo.sim.node(a).send(ka, m).is_err() {
            break;
        }
    }
    duo.sim.flush(a);
    let mut got: Vec<Option<Vec<u8>>> = vec![None; count];
    let (mut received, mut duplicates, mut last) = (0, 0, None);
    duo.sim.run_with(limit, Duration::from_millis(5), |s| {
        while let Some(m) = s.node(b).recv(kb) {
            let slot = m
                .get(..8)
                .and_then(|h| h.try_into().ok())
                .map(u64::from_be_bytes)
                .and_then(|i| got.get_mut(i as usize));
            match slot {
                Some(slot @ None) => {
                    *slot = Some(m.to_vec());
                    received += 1;
                    last = Some(s.now());
                }
                _ => duplicates += 1,
            }
        }
    });
    let received_hash = (received == count).then(|| {
        let mut h = ring::digest::Context::new(&ring::digest::SHA256);
        for m in got.iter().flatten() {
            h.update(m);
        }
        h.finish().as_ref().to_vec()
    });
    let now = duo.sim.now();
    let stats = duo.sim.node(a).stats(now, ka);
    let bytes_per_path = duo
        .paths
        .iter()
        .map(|p| {
            stats.as_ref().and_then(|s| s.paths.iter().find(|i| i.path == p.from_a)).map_or(0, |i| i.stats.bytes_sent)
        })
        .collect();
    BulkRun {
        took: last.filter(|_| received == count).map(|l| l.saturating_duration_since(t0)),
        sent_hash: sent.finish().as_ref().to_vec(),
        received_hash,
        duplicates,
        bytes_per_path,
        dropped_datagrams: duo.sim.net_stats().lost,
    }
}
