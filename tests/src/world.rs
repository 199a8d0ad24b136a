//! A world of players in the simulator: N players, each a node and a session, sign in to the
//! control server's core, walk between random waypoints in a square world and report where
//! they are; the core introduces those that come near each other, and every player sends
//! messages to each neighbour on the VCs the introduction opened, until the two walk apart and
//! the core's farewells close them. Everything comes from the seed, so the same seed gives the
//! same world.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use glam::Vec3;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use shoal_control::interest::{InterestConfig, InterestError};
use shoal_control::watch::WatchConfig;
use shoal_protocol::NodeId;
use shoal_sdk::avatar::movement::Mover;
use shoal_sdk::{AvatarConfig, AvatarEvent, CloseReason, Event, PlayerState, SessionEvent, VcEvent, VcKey};

use crate::link::LinkConfig;
use crate::sim::{ControlConfig, HostId, Sim};

/// Others within the enter radius of a player, on average, in [`WorldSpec::new`]'s world.
pub const DENSITY: f32 = 5.0;

/// What a world is made of.
#[derive(Debug, Clone)]
pub struct WorldSpec {
    /// Players.
    pub players: usize,
    /// Relays, each offered to every player.
    pub relays: usize,
    /// Side of the square world (x and z from 0 to it).
    pub side: f32,
    /// Walking speed, units per second (under the control server's `max_speed`).
    pub speed: f32,
    /// The game's frame: players move, set their state and read their messages this often.
    pub frame: Duration,
    /// Each player sends one message on every VC with each neighbour this often.
    pub message_every: Duration,
    /// Bytes per message (at least 12).
    pub message_size: usize,
    /// One-way latency of every link between two hosts.
    pub link_latency: Duration,
    /// The control server.
    pub control: ControlConfig,
    /// How often sessions report.
    pub report_every: Duration,
    /// Whether players serve avatars (moving by the movement model, one `set_avatar` a frame)
    /// instead of walking between waypoints; their avatar VC then carries no test messages.
    pub avatars: bool,
    /// With avatars: players gather in this many clusters (0: spread over the world).
    pub clusters: usize,
    /// Side of a cluster's square.
    pub cluster_side: f32,
    /// With avatars: the first this many players lie, serving their avatar [`LIE`] metres
    /// east of where they are while reporting where they are.
    pub liars: usize,
}

/// How far east of the truth a lying player serves its avatar, metres.
pub const LIE: f32 = 100.0;

impl WorldSpec {
    /// `players` in a square sized so that a player has about [`DENSITY`] others within the
    /// control server's enter radius, walking at 5 units/s, with a relay per 250 players (at
    /// least two), 20 ms links, and a 64-byte message on every VC twice a second.
    pub fn new(players: usize) -> WorldSpec {
        let mut control = ControlConfig::default();
        // The avatar mesh alone; [`WorldSpec::watching`] adds relay fan-out.
        control.core.watch = None;
        let enter = control.core.interest.enter_radius;
        WorldSpec {
            players,
            relays: (players / 250).max(2),
            side: (players as f32 * std::f32::consts::PI * enter * enter / DENSITY).sqrt(),
            speed: 5.0,
            frame: Duration::from_millis(100),
            message_every: Duration::from_millis(500),
            message_size: 64,
            link_latency: Duration::from_millis(20),
            control,
            report_every: Duration::from_secs(1),
            avatars: false,
            clusters: 0,
            cluster_side: 40.0,
            liars: 0,
        }
    }

    /// `players` serving avatars at a 30 Hz game frame, gathered in clusters of about 20 (a
    /// square of 40 m each, so that most players have the default 16 neighbours), with no
    /// test messages on the reliable VCs but one every 5 s.
    pub fn avatars(players: usize) -> WorldSpec {
        WorldSpec {
            avatars: true,
            clusters: players.div_ceil(20),
            frame: Duration::from_micros(33_333),
            message_every: Duration::from_secs(5),
            ..WorldSpec::new(players)
        }
    }

    /// [`WorldSpec::avatars`] with relay fan-out: the control server subscribes every player
    /// to the others within its view radius (beyond its neighbours) through their relays.
    pub fn watching(players: usize) -> WorldSpec {
        let mut spec = WorldSpec::avatars(players);
        spec.control.core.watch = Some(WatchConfig::default());
        spec
    }

    fn interest(&self) -> InterestConfig {
        self.control.core.interest
    }
}

/// What a world did, as its players saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorldStats {
    /// Players whose session was welcomed.
    pub signed_in: u64,
    /// Introductions players received (two per pair).
    pub introductions: u64,
    /// Introductions of a pair farther apart, when it came, than the enter radius plus the
    /// distance both could walk since their last reports.
    pub far_introductions: u64,
    /// Farewells players received (two per pair).
    pub farewells: u64,
    /// VCs the introductions opened.
    pub vcs_opened: u64,
    /// VCs the farewells closed.
    pub vcs_closed: u64,
    /// VCs that closed without either side asking (timed out, handshake unanswered).
    pub vcs_lost: u64,
    /// Messages handed to a VC.
    pub messages_sent: u64,
    /// Messages a VC refused (closed, or its buffer full).
    pub messages_refused: u64,
    /// Messages read by the neighbour they were sent to.
    pub messages_delivered: u64,
    /// Messages read with other bytes than were sent, or from another sender.
    pub corrupt: u64,
    /// Control connections lost.
    pub control_lost: u64,
    /// Refusals from the control server.
    pub refusals: u64,
    /// Neighbours' avatars that appeared (one per introduction whose avatar came).
    pub avatars_appeared: u64,
    /// Avatars that appeared, or updates that came, from a player neither introduced nor
    /// watched.
    pub avatars_from_strangers: u64,
    /// Avatars that left.
    pub avatars_left: u64,
}

/// What players saw of each other's avatars, sampled every few frames.
#[derive(Debug, Clone, Default)]
pub struct AvatarStats {
    /// From an introduction to the neighbour's avatar appearing, per introduction whose avatar
    /// came.
    pub appear_delays: Vec<Duration>,
    /// Introductions older than the run's appearance bound whose avatar had not appeared.
    pub never_appeared: u64,
    /// Distance between a shown avatar and where that player was at the time shown, metres.
    pub errors: Vec<f32>,
    /// Age of the newest update a player holds from a near neighbour: one that serves it at
    /// the full rate (within the near radius while the budget allows; in a crowd, the
    /// nearest ones the budget affords).
    pub near_staleness: Vec<Duration>,
    /// The same for a neighbour within the near radius that the budget has it serve below
    /// the full rate, nearer ones taking it.
    pub crowded_staleness: Vec<Duration>,
    /// The same for farther neighbours.
    pub far_staleness: Vec<Duration>,
    /// Age of the newest update a player holds from a player it watches (not a neighbour)
    /// through the publisher's relay.
    pub watched_staleness: Vec<Duration>,
    /// Distance between a watched avatar as shown and where that player was at the time
    /// shown, metres.
    pub watched_errors: Vec<f32>,
}

impl AvatarStats {
    /// The `q`-quantile (0 to 1) of `v`, sorting it; `None` when empty.
    pub fn quantile<T: Copy + PartialOrd>(v: &mut [T], q: f64) -> Option<T> {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        v.get(i).copied()
    }
}

/// Where a player was: its positions over the last seconds, by time since its session's
/// avatar clock started.
#[derive(Debug, Default)]
struct Trail {
    points: VecDeque<(f64, Vec3)>,
}

/// Seconds of trail kept: more than any interpolation delay.
const TRAIL_SECS: f64 = 3.0;

impl Trail {
    fn push(&mut self, t: f64, p: Vec3) {
        self.points.push_back((t, p));
        while self.points.front().is_some_and(|&(t0, _)| t - t0 > TRAIL_SECS) {
            self.points.pop_front();
        }
    }

    /// The position at `t`, between the two frames around it.
    fn at(&self, t: f64) -> Option<Vec3> {
        let i = self.points.iter().position(|&(ti, _)| ti >= t)?;
        if i == 0 {
            return (self.points[0].0 - t < 0.05).then_some(self.points[0].1);
        }
        let ((t0, a), (t1, b)) = (self.points[i - 1], self.points[i]);
        Some(a.lerp(b, ((t - t0) / (t1 - t0)) as f32))
    }
}

#[derive(Debug)]
struct Player {
    host: HostId,
    id: NodeId,
    at: [f32; 2],
    to: [f32; 2],
    /// Neighbours, with the VCs their introduction opened.
    neighbours: BTreeMap<NodeId, Vec<VcKey>>,
    next_send: Instant,
    seq: u64,
    /// With avatars: how it moves, where it was, and when its session's avatar clock started.
    mover: Option<Mover>,
    trail: Trail,
    epoch: Instant,
    /// Neighbours introduced whose avatar has not appeared yet, since when.
    awaiting: BTreeMap<NodeId, Instant>,
}

/// N players moving in a world. See the module docs.
#[derive(Debug)]
pub struct World {
    /// The network, control server included.
    pub sim: Sim,
    spec: WorldSpec,
    players: Vec<Player>,
    /// Player index by node id.
    index: BTreeMap<NodeId, usize>,
    rng: Xoshiro256PlusPlus,
    stats: WorldStats,
    walking: bool,
    avatar_stats: AvatarStats,
    frames: u64,
}

impl World {
    /// Builds the world on a simulator seeded with `seed`: relays, the control server, and the
    /// players at random places, each starting to sign in.
    pub fn new(seed: u64, spec: WorldSpec) -> Result<World, InterestError> {
        let mut sim = Sim::new(seed);
        sim.set_default_link(LinkConfig::latency(spec.link_latency));
        for _ in 0..spec.relays {
            sim.add_relay();
        }
        sim.start_control(spec.control.clone())?;
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(sim.rng().random());
        let mut players = Vec::with_capacity(spec.players);
        let mut index = BTreeMap::new();
        let now = sim.now();
        // Cluster centres, away from the world's edges.
        let centres: Vec<Vec3> = (0..spec.clusters)
            .map(|_| Vec3::new(rng.random_range(0.2..0.8) * spec.side, 0.0, rng.random_range(0.2..0.8) * spec.side))
            .collect();
        for i in 0..spec.players {
            let (account, password) = (format!("player{i}"), format!("password{i}"));
            sim.add_account(&account, &password);
            let (report_every, avatars) = (spec.report_every, spec.avatars);
            let host = sim.add_player(&account, &password, |c| {
                c.report_every = report_every;
                c.avatars = avatars.then(AvatarConfig::default);
            });
            let id = sim.node(host).id();
            index.insert(id, i);
            let mut place = || [rng.random_range(0.0..spec.side), rng.random_range(0.0..spec.side)];
            let (at, to) = (place(), place());
            let mover = spec.avatars.then(|| match centres.get(i % spec.clusters.max(1)) {
                Some(&c) => Mover::around(rng.random(), c, spec.cluster_side),
                None => Mover::around(rng.random(), Vec3::new(at[0], 0.0, at[1]), spec.side),
            });
            // Spread the players' sending over the interval.
            let next_send = now + spec.message_every.mul_f64(rng.random::<f64>());
            players.push(Player {
                host,
                id,
                at,
                to,
                neighbours: BTreeMap::new(),
                next_send,
                seq: 0,
                mover,
                trail: Trail::default(),
                epoch: now,
                awaiting: BTreeMap::new(),
            });
        }
        Ok(World {
            sim,
            spec,
            players,
            index,
            rng,
            stats: WorldStats::default(),
            walking: true,
            avatar_stats: AvatarStats::default(),
            frames: 0,
        })
    }

    /// The spec it was built from.
    pub fn spec(&self) -> &WorldSpec {
        &self.spec
    }

    /// What players saw of each other's avatars so far; introductions still waiting for
    /// their avatar count as never appeared once older than `bound`.
    pub fn avatar_stats(&self, bound: Duration) -> AvatarStats {
        let now = self.sim.now();
        let waiting = self.players.iter().flat_map(|p| p.awaiting.values()).filter(|&&t| now - t > bound);
        AvatarStats { never_appeared: waiting.count() as u64, ..self.avatar_stats.clone() }
    }

    /// Player `i`'s avatar now, with avatars.
    pub fn avatar(&self, i: usize) -> Option<Vec3> {
        self.players[i].mover.as_ref().map(|m| m.state().position)
    }

    /// Players stop (or start again) walking; they keep reporting and sending.
    pub fn set_walking(&mut self, walking: bool) {
        self.walking = walking;
    }

    /// Runs the world for `d` of virtual time, a game frame at a time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.sim.now() + d;
        while self.sim.now() < until {
            self.frame();
            let step = self.spec.frame.min(until - self.sim.now());
            self.sim.run_for(step);
        }
        self.take_events();
    }

    /// What happened so far.
    pub fn stats(&self) -> WorldStats {
        let signed_in = self.players.iter().filter(|p| self.sim.session(p.host).counters().welcomes > 0).count();
        WorldStats { signed_in: signed_in as u64, ..self.stats }
    }

    /// Players.
    pub fn len(&self) -> usize {
        self.players.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.players.is_empty()
    }

    /// Player `i`'s host.
    pub fn host(&self, i: usize) -> HostId {
        self.players[i].host
    }

    /// Player `i`'s node id.
    pub fn node_id(&self, i: usize) -> NodeId {
        self.players[i].id
    }

    /// Player `i`'s neighbours as its session was told: introduced and not yet bid farewell.
    pub fn neighbours(&self, i: usize) -> impl Iterator<Item = NodeId> + '_ {
        self.players[i].neighbours.keys().copied()
    }

    /// The peers player `i`'s node holds VCs with now.
    pub fn vc_peers(&mut self, i: usize) -> Vec<NodeId> {
        let host = self.players[i].host;
        let mut peers: Vec<NodeId> = self.sim.node(host).vcs().map(|k| k.peer).collect();
        peers.dedup();
        peers
    }

    /// Distance between players `a` and `b` on the ground.
    pub fn distance(&self, a: usize, b: usize) -> f32 {
        let (p, q) = (self.players[a].at, self.players[b].at);
        ((p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2)).sqrt()
    }

    /// One game frame: what the sessions reported, then every player walks, sets its state,
    /// sends what is due and reads what arrived.
    fn frame(&mut self) {
        self.take_events();
        self.frames += 1;
        // Ten samples a second.
        if self.spec.avatars && self.frames.is_multiple_of((100 / self.spec.frame.as_millis().max(1)).max(1) as u64) {
            self.sample_avatars();
        }
        let now = self.sim.now();
        let step = self.spec.speed * self.spec.frame.as_secs_f32();
        let size = self.spec.message_size.max(12);
        let dt = self.spec.frame.as_secs_f32();
        let avatar_vc = self.spec.avatars.then(|| AvatarConfig::default().vc);
        for (i, p) in self.players.iter_mut().enumerate() {
            if let Some(m) = &mut p.mover {
                let s = if self.walking { m.step(dt) } else { m.state() };
                p.at = [s.position.x, s.position.z];
                p.trail.push(now.saturating_duration_since(p.epoch).as_secs_f64(), s.position);
                let mut served = s;
                if i < self.spec.liars {
                    served.position.x += LIE;
                }
                // The report's position comes from the state set below, the truth.
                self.sim.session_mut(p.host).set_avatar(now, served);
            } else if self.walking {
                let (dx, dz) = (p.to[0] - p.at[0], p.to[1] - p.at[1]);
                let left = (dx * dx + dz * dz).sqrt();
                if left <= step {
                    p.at = p.to;
                    p.to = [self.rng.random_range(0.0..self.spec.side), self.rng.random_range(0.0..self.spec.side)];
                } else {
                    p.at = [p.at[0] + dx / left * step, p.at[1] + dz / left * step];
                }
            }
            let y = p.mover.as_ref().map_or(0.0, |m| m.state().position.y);
            let state = PlayerState { position: [p.at[0], y, p.at[1]], status: "playing".into(), ..Default::default() };
            // A small state always fits a report.
            let _ = self.sim.session_mut(p.host).set_state(state);
            if now >= p.next_send {
                p.next_send += self.spec.message_every;
                let node = self.sim.node(p.host);
                for key in p.neighbours.values().flatten().filter(|k| Some(k.vc) != avatar_vc) {
                    p.seq += 1;
                    match node.send(*key, message(i as u32, p.seq, size)) {
                        Ok(()) => self.stats.messages_sent += 1,
                        Err(_) => self.stats.messages_refused += 1,
                    }
                }
                self.sim.flush(p.host);
            }
            let node = self.sim.node(p.host);
            for key in p.neighbours.values().flatten().filter(|k| Some(k.vc) != avatar_vc) {
                while let Some(m) = node.recv(*key) {
                    let from = m.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
                    let sender = from.and_then(|f| self.index.get(&key.peer).filter(|&&s| s == f as usize));
                    if sender.is_some() && m.len() == size && is_message(&m) {
                        self.stats.messages_delivered += 1;
                    } else {
                        self.stats.corrupt += 1;
                    }
                }
            }
        }
    }

    /// Compares what every player shows of its neighbours with where they were at the time
    /// shown, and how old its newest update from each is.
    fn sample_avatars(&mut self) {
        let now = self.sim.now();
        let rates = AvatarConfig::default().rates;
        for i in 0..self.players.len() {
            let id = self.node_id(i);
            let session = self.sim.session(self.players[i].host);
            let Some(mesh) = session.avatar_mesh() else { continue };
            let me = self.players[i].mover.as_ref().map(|m| m.state().position);
            for (peer, at, _) in mesh.received() {
                let Some(&j) = self.index.get(&peer).filter(|&&j| j >= self.spec.liars) else { continue };
                let (Some(shown), Some(t)) = (mesh.avatar_of(peer, now), mesh.render_time_of(peer, now)) else {
                    continue;
                };
                if let Some(truth) = self.players[j].trail.at(t) {
                    self.avatar_stats.errors.push(shown.position.distance(truth));
                }
                let age = now.saturating_duration_since(at);
                let full = self.sim.session(self.players[j].host).avatar_mesh().and_then(|m| m.schedule().rate(id));
                let stats = &mut self.avatar_stats;
                if full.is_some_and(|r| r >= rates.full_hz) {
                    stats.near_staleness.push(age);
                } else if me.is_some_and(|m| m.distance(shown.position) <= rates.near) {
                    stats.crowded_staleness.push(age);
                } else {
                    stats.far_staleness.push(age);
                }
            }
            let neighbours = &self.players[i].neighbours;
            for (peer, at) in mesh.watched_received().filter(|(p, _)| !neighbours.contains_key(p)) {
                let Some(&j) = self.index.get(&peer).filter(|&&j| j >= self.spec.liars) else { continue };
                let (Some(shown), Some(t)) = (mesh.avatar_of(peer, now), mesh.render_time_of(peer, now)) else {
                    continue;
                };
                if let Some(truth) = self.players[j].trail.at(t) {
                    self.avatar_stats.watched_errors.push(shown.position.distance(truth));
                }
                self.avatar_stats.watched_staleness.push(now.saturating_duration_since(at));
            }
        }
    }

    /// Of the pairs of players within `radius` of each other now (each pair counted from both
    /// sides), how many there are and how many of them show the other's avatar.
    pub fn shown_within(&self, radius: f32) -> (usize, usize) {
        let now = self.sim.now();
        let (mut pairs, mut shown) = (0, 0);
        for i in 0..self.players.len() {
            let Some(mesh) = self.sim.session(self.players[i].host).avatar_mesh() else { continue };
            for j in (0..self.players.len()).filter(|&j| j != i && self.distance(i, j) <= radius) {
                pairs += 1;
                shown += usize::from(mesh.avatar_of(self.players[j].id, now).is_some());
            }
        }
        (pairs, shown)
    }

    /// Up to `most` pairs within `radius` of which the first does not show the second, each
    /// with what the first holds of the second: a neighbour, a watch (and whether its stream
    /// ever showed), or nothing.
    pub fn unshown_within(&self, radius: f32, most: usize) -> Vec<String> {
        let now = self.sim.now();
        let mut out = Vec::new();
        for i in 0..self.players.len() {
            let Some(mesh) = self.sim.session(self.players[i].host).avatar_mesh() else { continue };
            for j in (0..self.players.len()).filter(|&j| j != i && self.distance(i, j) <= radius) {
                let peer = self.players[j].id;
                if mesh.avatar_of(peer, now).is_some() || out.len() >= most {
                    continue;
                }
                let neighbour = mesh.neighbours().any(|p| p == peer);
                let watching = mesh.watched().any(|p| p == peer);
                let received = mesh.watched_received().any(|(p, _)| p == peer);
                out.push(format!(
                    "player {i} does not show {j}, {:.1} m apart: neighbour {neighbour}, watching {watching}, stream shown {received}; {i} watches {}",
                    self.distance(i, j),
                    mesh.watched().count()
                ));
            }
        }
        out
    }

    /// How far apart two players may have moved since the control server last heard where
    /// they were: both positions may be a report interval and the control plane's latency
    /// old.
    pub fn report_margin(&self) -> f32 {
        let stale = self.spec.report_every + self.spec.control.tick + 4 * self.spec.control.latency;
        let speed = if self.spec.avatars { shoal_sdk::avatar::movement::RUN } else { self.spec.speed };
        2.0 * speed * stale.as_secs_f32()
    }

    fn take_events(&mut self) {
        let interest = self.spec.interest();
        let margin = self.report_margin();
        for (at, host, e) in self.sim.take_session_events() {
            let Some(i) = self.player_of(host) else { continue };
            match e {
                SessionEvent::Introduced { peer, vcs } => {
                    self.stats.introductions += 1;
                    self.stats.vcs_opened += vcs.len() as u64;
                    if self.index.get(&peer).is_some_and(|&j| self.distance(i, j) > interest.enter_radius + margin) {
                        self.stats.far_introductions += 1;
                    }
                    self.players[i].neighbours.insert(peer, vcs);
                    if self.spec.avatars {
                        self.players[i].awaiting.insert(peer, at);
                    }
                }
                SessionEvent::Farewell { peer, closed } => {
                    self.stats.farewells += 1;
                    self.stats.vcs_closed += closed.len() as u64;
                    self.players[i].neighbours.remove(&peer);
                    self.players[i].awaiting.remove(&peer);
                }
                SessionEvent::Avatar(AvatarEvent::Appeared(peer, _)) => {
                    self.stats.avatars_appeared += 1;
                    if let Some(since) = self.players[i].awaiting.remove(&peer) {
                        self.avatar_stats.appear_delays.push(at - since);
                    }
                    if !self.knows(i, peer) {
                        self.stats.avatars_from_strangers += 1;
                    }
                }
                SessionEvent::Avatar(AvatarEvent::Updated(peer, _)) if !self.knows(i, peer) => {
                    self.stats.avatars_from_strangers += 1;
                }
                SessionEvent::Avatar(AvatarEvent::Left(_)) => self.stats.avatars_left += 1,
                SessionEvent::Node(Event::Vc(_, VcEvent::Closed(reason)))
                    if !matches!(reason, CloseReason::Local | CloseReason::Peer) =>
                {
                    self.stats.vcs_lost += 1;
                }
                SessionEvent::ControlLost(_) => self.stats.control_lost += 1,
                SessionEvent::Refused(_) => self.stats.refusals += 1,
                _ => {}
            }
        }
    }

    /// Whether player `i` was introduced to `peer`, or watches it.
    fn knows(&self, i: usize, peer: NodeId) -> bool {
        self.players[i].neighbours.contains_key(&peer)
            || self.sim.session(self.players[i].host).avatar_mesh().is_some_and(|m| m.watched().any(|w| w == peer))
    }

    /// The player on `host`.
    fn player_of(&self, host: HostId) -> Option<usize> {
        // Players' hosts follow the relays', in order.
        let first = self.players.first()?.host.0;
        let i = host.0.checked_sub(first)?;
        (self.players.get(i)?.host == host).then_some(i)
    }
}

/// Message `seq` of player `from`: its index and the sequence number, then a filler the
/// receiver checks.
fn message(from: u32, seq: u64, size: usize) -> Vec<u8> {
    let mut m = vec![0u8; size];
    m[..4].copy_from_slice(&from.to_be_bytes());
    m[4..12].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in m.iter_mut().enumerate().skip(12) {
        *b = filler(seq, i);
    }
    m
}

fn filler(seq: u64, i: usize) -> u8 {
    (seq as u8).wrapping_mul(31).wrapping_add(i as u8)
}

/// Whether `m`'s filler is the one its sequence number gives.
fn is_message(m: &[u8]) -> bool {
    let Some(seq) = m.get(4..12).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes) else { return false };
    m.iter().enumerate().skip(12).all(|(i, b)| *b == filler(seq, i))
}
