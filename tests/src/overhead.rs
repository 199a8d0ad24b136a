//! The mesh's own overhead, measured where a player pays it: one player with N neighbours (a
//! star, so every datagram it sends or receives is for one of them), everyone on the open
//! network and bound to one relay, each neighbour introduced as the control server does (the
//! relay's route first, then the neighbour's address to punch) with the session's two VCs,
//! realtime and reliable. After a warm-up (key exchange, punching, first measurements), the
//! player's traffic is counted over a window, idle or while a 30 Hz stream of 20-byte avatar
//! updates flows on every realtime VC.
//!
//! Overhead is what carries no message: whole datagrams that hold none (pings, pongs, acks,
//! keepalives, hellos, binds) and the bytes that ride in datagrams that do (pings, pongs and
//! acks packed beside the data). Bytes are UDP payload; IPv4 and UDP headers add 28 per
//! datagram, reported apart.

use std::time::Duration;

use rand::RngExt;
use shoal_mesh::endpoint::Path;
use shoal_mesh::wire::{Route, VcId};
use shoal_sdk::{Event, PeerInfo, Profile, SwitchReason, Traffic, VcEvent, VcKey};

use crate::link::LinkConfig;
use crate::sim::{HostId, Sim};

pub use shoal_sdk::IP_UDP_HEADERS;

/// Which way messages flow during the measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// No messages at all.
    Idle,
    /// The player and every neighbour send each other an update every `1/hz` seconds.
    Both {
        /// Updates a second each way.
        hz: u32,
    },
    /// Only the player sends (a crowd that stands still watching it).
    Out {
        /// Updates a second.
        hz: u32,
    },
    /// The player sends every neighbour `hz` updates a second, and they send it `back_hz`
    /// (in an avatar crowd, neighbours whose upload budget serves the player at the floor
    /// rate while it serves them at the full one).
    Uneven {
        /// Updates a second from the player.
        hz: u32,
        /// Updates a second back from each neighbour.
        back_hz: u32,
    },
}

/// One measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverheadRun {
    /// Neighbours.
    pub neighbours: usize,
    /// Seconds measured.
    pub secs: f64,
    /// What the player sent over the window.
    pub sent: Traffic,
    /// What it received.
    pub received: Traffic,
    /// Path changes on the player's VCs during the window.
    pub path_changes: usize,
    /// Messages the player received during the window.
    pub messages_in: u64,
}

impl OverheadRun {
    /// Bytes above UDP in each datagram the player sent with a `payload`-byte message, on
    /// average, besides what rode along (pings, pongs, acks): the headers an update pays.
    pub fn header_bytes_per_datagram(&self, payload: u64) -> f64 {
        let s = &self.sent;
        (s.data_bytes - s.riding_bytes) as f64 / s.data_datagrams.max(1) as f64 - payload as f64
    }

    /// Overhead bytes (sent and received) per second per neighbour, in kbit/s.
    pub fn kbps_per_neighbour(&self) -> f64 {
        let bytes = (self.sent.overhead() + self.received.overhead()) as f64;
        bytes * 8.0 / 1000.0 / self.secs / self.neighbours as f64
    }

    /// The same with the IP and UDP headers of the overhead datagrams counted.
    pub fn kbps_per_neighbour_on_the_wire(&self) -> f64 {
        let dgrams = (self.sent.overhead_datagrams + self.received.overhead_datagrams) as f64;
        self.kbps_per_neighbour() + dgrams * IP_UDP_HEADERS as f64 * 8.0 / 1000.0 / self.secs / self.neighbours as f64
    }

    /// Overhead datagrams (sent and received) per second per neighbour.
    pub fn datagrams_per_neighbour(&self) -> f64 {
        (self.sent.overhead_datagrams + self.received.overhead_datagrams) as f64 / self.secs / self.neighbours as f64
    }

    /// Payload bytes (sent and received, headers included) per second per neighbour, kbit/s.
    pub fn payload_kbps_per_neighbour(&self) -> f64 {
        let bytes = (self.sent.data_bytes + self.received.data_bytes
            - self.sent.riding_bytes
            - self.received.riding_bytes) as f64;
        bytes * 8.0 / 1000.0 / self.secs / self.neighbours as f64
    }
}

fn delta(after: Traffic, before: Traffic) -> Traffic {
    Traffic {
        data_datagrams: after.data_datagrams - before.data_datagrams,
        data_bytes: after.data_bytes - before.data_bytes,
        riding_bytes: after.riding_bytes - before.riding_bytes,
        overhead_datagrams: after.overhead_datagrams - before.overhead_datagrams,
        overhead_bytes: after.overhead_bytes - before.overhead_bytes,
    }
}

/// The player's VCs with each neighbour, and the neighbours' with it.
struct Star {
    sim: Sim,
    player: HostId,
    neighbours: Vec<HostId>,
    /// (player's realtime VC to the neighbour, the neighbour's to the player)
    realtime: Vec<(VcKey, VcKey)>,
}

fn star(seed: u64, n: usize, link: impl Fn(&mut Sim) -> LinkConfig) -> Star {
    let mut sim = Sim::new(seed);
    let relay = sim.add_relay();
    let player = sim.add_node();
    let neighbours: Vec<HostId> = (0..n).map(|_| sim.add_node()).collect();
    for &h in std::iter::once(&player).chain(&neighbours) {
        let l = link(&mut sim);
        sim.link(h, relay, l);
        sim.bind(h, relay);
    }
    for &h in &neighbours {
        let l = link(&mut sim);
        sim.link(player, h, l);
    }
    sim.run_for(Duration::from_millis(500));
    let via = Route::new(&[sim.relay_id(relay)]).map_or(Path::Direct(sim.addr(relay)), Path::Relayed);
    let kp = sim.node(player).public_key();
    let idp = sim.node(player).id();
    let mut realtime = Vec::new();
    for &h in &neighbours {
        let (kh, idh) = (sim.node(h).public_key(), sim.node(h).id());
        let (ap, ah) = (sim.addr(player), sim.addr(h));
        let now = sim.now();
        sim.node(player).add_peer(now, PeerInfo { key: kh, paths: vec![via, Path::Direct(ah)] });
        sim.node(h).add_peer(now, PeerInfo { key: kp, paths: vec![via, Path::Direct(ap)] });
        for (vc, profile) in [(VcId(1), Profile::realtime(false)), (VcId(2), Profile::reliable())] {
            // Both sides open, as both sides of an introduction do; a hello may have opened
            // the other side already.
            let _ = sim.node(player).open(now, idh, vc, profile.clone());
            let _ = sim.node(h).open(now, idp, vc, profile);
        }
        sim.flush(player);
        sim.flush(h);
        realtime.push((VcKey { peer: idh, vc: VcId(1) }, VcKey { peer: idp, vc: VcId(1) }));
    }
    Star { sim, player, neighbours, realtime }
}

impl Star {
    /// Runs for `d` with `flow`; returns the messages the player received.
    fn run(&mut self, d: Duration, flow: Flow) -> u64 {
        let every = match flow {
            Flow::Idle => d,
            Flow::Both { hz } | Flow::Out { hz } | Flow::Uneven { hz, .. } => Duration::from_secs(1) / hz.max(1),
        };
        // Every how many of the player's updates each neighbour sends one back.
        let back_every = match flow {
            Flow::Idle | Flow::Out { .. } => None,
            Flow::Both { .. } => Some(1),
            Flow::Uneven { hz, back_hz } => Some((hz / back_hz.max(1)).max(1)),
        };
        let update = [0x5au8; 20];
        let mut got = 0;
        let mut tick = 0u32;
        let (player, neighbours, realtime) = (self.player, self.neighbours.clone(), self.realtime.clone());
        self.sim.run_with(d, every, |sim| {
            if flow != Flow::Idle {
                let back = back_every.is_some_and(|k| tick.is_multiple_of(k));
                tick = tick.wrapping_add(1);
                for (&h, &(to_h, to_p)) in neighbours.iter().zip(&realtime) {
                    let _ = sim.node(player).send(to_h, update.to_vec());
                    if back {
                        let _ = sim.node(h).send(to_p, update.to_vec());
                    }
                }
                sim.flush(player);
                for &h in &neighbours {
                    sim.flush(h);
                }
            }
            for (&h, &(to_h, to_p)) in neighbours.iter().zip(&realtime) {
                while sim.node(player).recv(to_h).is_some() {
                    got += 1;
                }
                while sim.node(h).recv(to_p).is_some() {}
            }
        });
        got
    }
}

/// Measures the player's overhead with `n` neighbours: `warmup` of `flow`, then `measure` of
/// it. Links are 5–30 ms one way, drawn from the seed.
pub fn overhead(seed: u64, n: usize, flow: Flow, warmup: Duration, measure: Duration) -> OverheadRun {
    let mut s = star(seed, n, |sim| LinkConfig::latency(Duration::from_micros(sim.rng().random_range(5_000..30_000))));
    s.run(warmup, flow);
    s.sim.take_events();
    let before = s.sim.node(s.player).traffic();
    let messages_in = s.run(measure, flow);
    let after = s.sim.node(s.player).traffic();
    let player = s.player;
    let path_changes = s
        .sim
        .events()
        .iter()
        .filter(|(_, h, e)| *h == player && matches!(e, Event::Vc(_, VcEvent::PathChanged { .. })))
        .count();
    OverheadRun {
        neighbours: n,
        secs: measure.as_secs_f64(),
        sent: delta(after.0, before.0),
        received: delta(after.1, before.1),
        path_changes,
        messages_in,
    }
}

/// Path changes on every VC of two players on a LAN-like link (0.1 ms one way) whose hosts
/// now and then hold a datagram up by `stall` (a chance of `p` each), over `d` after a
/// warm-up, with `flow` between them: what a new user trying two clients on one machine
/// sees.
pub fn lan_path_changes(seed: u64, p: f64, stall: Duration, flow: Flow, d: Duration) -> Vec<(HostId, SwitchReason)> {
    let mut s = star(seed, 1, |_| LinkConfig::latency(Duration::from_micros(100)).with_stalls(p, stall));
    s.run(Duration::from_secs(5), flow);
    s.sim.take_events();
    s.run(d, flow);
    s.sim
        .events()
        .iter()
        .filter_map(|(_, h, e)| match e {
            Event::Vc(_, VcEvent::PathChanged { reason, .. }) => Some((*h, *reason)),
            _ => None,
        })
        .collect()
}
