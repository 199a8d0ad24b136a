//! The path manager of one virtual connection: its candidate paths to the peer, what each
//! one measures (RTT, jitter, loss, per-hop latency, authentication failures), and which of
//! them carry the VC's traffic.
//!
//! Sans-IO. The VC feeds it what it hears ([`PathManager::on_heard`], `on_pong`,
//! `on_auth_failure`, `on_trace`), calls [`PathManager::handle_timeout`] when
//! [`PathManager::poll_timeout`] is due, sends the pings [`PathManager::poll_ping`] asks for,
//! and drains [`PathManager::poll_event`].
//!
//! Liveness comes from pings: every candidate is pinged, the active ones every half smoothed
//! RTT (bounded), the others slowly. A path is dead when nothing authenticated has come over it
//! for one ping interval plus half an RTT plus four RTT deviations: a deadline that follows
//! the path's own RTT rather than a fixed timeout. A dead or failing active path is left at
//! once; a merely better one only after it has stayed better for a hold time (hysteresis).
//!
//! Direct candidates are hole-punched. Until one answers, it is pinged every
//! [`PUNCH_INTERVAL`], at most [`PUNCH_PROBES`] times per attempt: both peers do this from the
//! moment their keys agree, so each side's first probes open its own NAT's mapping for the
//! other's, and a later probe gets through. An attempt that hears nothing has failed (the
//! VC stays relayed, and its stats say so); the next attempt comes after [`PUNCH_RETRY`],
//! doubling up to [`PUNCH_RETRY_MAX`], since networks change. A direct path that answers and
//! is clearly better than the relayed one in use takes the traffic at once, without the hold
//! time: it is what punching is for, and the relayed path stays a pinged candidate, ready
//! to take the traffic back the moment the direct one falls silent.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use shoal_mesh::endpoint::Path;

use crate::pacing::WindowedMin;
use crate::profile::{Policy, Profile};

/// Ping outcomes a path's loss is measured over.
const LOSS_WINDOW: u32 = 64;
/// Outcomes needed before loss counts against a path.
const LOSS_MIN_SAMPLES: u32 = 8;
/// Ping interval of paths that carry no traffic.
const IDLE_PING: Duration = Duration::from_millis(250);
/// Bounds of the ping interval of an active path.
const ACTIVE_PING_MIN: Duration = Duration::from_millis(10);
const ACTIVE_PING_MAX: Duration = Duration::from_millis(100);
/// Authentication failures within `TAMPER_WINDOW` that get a path abandoned.
pub const TAMPER_LIMIT: u32 = 5;
const TAMPER_WINDOW: Duration = Duration::from_secs(2);
/// How long an abandoned path stays out before it is probed again.
pub const ABANDON_FOR: Duration = Duration::from_secs(60);
/// A better path must stay better this long (or ten RTTs, if longer) before the VC moves.
const HOLD: Duration = Duration::from_secs(1);
/// Pings older than this count as lost even before the RTT is known.
const PING_GIVE_UP: Duration = Duration::from_secs(1);
/// Pings remembered per path.
const MAX_PINGS_IN_FLIGHT: usize = 32;
/// The window a path's minimum RTT is taken over.
const MIN_RTT_FOR: Duration = Duration::from_secs(10);
/// How often a direct candidate that has not answered yet is probed.
pub const PUNCH_INTERVAL: Duration = Duration::from_millis(20);
/// Probes in one punching attempt (one second of them).
pub const PUNCH_PROBES: u32 = 50;
/// The wait before the second attempt; it doubles up to [`PUNCH_RETRY_MAX`].
pub const PUNCH_RETRY: Duration = Duration::from_secs(15);
/// The longest wait between attempts.
pub const PUNCH_RETRY_MAX: Duration = Duration::from_secs(600);

/// Where hole punching stands on a direct candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Punch {
    /// Probing: no answer yet in attempt `attempt` (1 for the first).
    Trying {
        /// The attempt.
        attempt: u32,
    },
    /// The peer answered over it: the NATs let the path through.
    Open,
    /// No answer in `attempts` attempts; the next comes later.
    Failed {
        /// Attempts so far.
        attempts: u32,
    },
}

/// A candidate's index within its VC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathId(pub u8);

/// The shape of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// Straight to the peer.
    Direct,
    /// Through one relay.
    OneRelay,
    /// Through two or more relays.
    MultiRelay,
}

impl PathKind {
    /// The kind of `path`.
    pub fn of(path: &Path) -> PathKind {
        match path.route().len() {
            0 => PathKind::Direct,
            1 => PathKind::OneRelay,
            _ => PathKind::MultiRelay,
        }
    }
}

/// Why the VC moved its traffic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SwitchReason {
    /// The first path chosen.
    Initial,
    /// Nothing came over the old path for this long.
    Silent(Duration),
    /// The old path lost this fraction of probes.
    Lossy(f32),
    /// The old path's RTT passed the profile's bound.
    TooSlow(Duration),
    /// The old path delivered no more than this (bytes/s) when it was full, less than the
    /// profile's minimum bandwidth.
    Narrow(u64),
    /// The old path kept delivering frames that failed authentication.
    Tampering,
    /// The new path has been better for the hold time.
    Better,
}

/// What a path measures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PathStats {
    /// Smoothed round-trip time, once measured.
    pub srtt: Option<Duration>,
    /// Mean deviation of the RTT: the path's jitter.
    pub jitter: Duration,
    /// Fraction of the last pings that got no pong.
    pub loss: f32,
    /// Latency of each hop, from the trace of the latest traced frame that came over it.
    pub hop_latencies: Vec<Duration>,
    /// Frames over it that failed authentication.
    pub auth_failures: u64,
    /// Pings sent.
    pub pings: u64,
    /// Pongs received.
    pub pongs: u64,
    /// Data bytes sent over it (sealed renet frames other than acks).
    pub bytes_sent: u64,
    /// Data bytes received over it.
    pub bytes_received: u64,
    /// Paced VCs: the rate this path is paced at, bytes per second.
    pub pacing_rate: Option<f64>,
    /// Paced VCs: the rate the peer reports this path delivers, bytes per second.
    pub delivery_rate: Option<f64>,
    /// Paced VCs: what the path delivered when it last showed congestion (its bandwidth as
    /// far as it is known), bytes per second.
    pub capacity: Option<f64>,
    /// Direct paths: where hole punching stands.
    pub punch: Option<Punch>,
}

/// A candidate path as the VC's stats show it.
#[derive(Debug, Clone, PartialEq)]
pub struct PathInfo {
    /// Its index.
    pub id: PathId,
    /// Where it goes.
    pub path: Path,
    /// Its shape.
    pub kind: PathKind,
    /// What it measures.
    pub stats: PathStats,
    /// Whether it carries traffic now.
    pub active: bool,
    /// Whether it is out for tampering.
    pub abandoned: bool,
}

/// Something the VC reports upward.
#[derive(Debug, Clone, PartialEq)]
pub enum PathEvent {
    /// The primary path changed.
    Changed {
        /// The previous path.
        old: Option<Box<PathInfo>>,
        /// The new one.
        new: Box<PathInfo>,
        /// Why.
        reason: SwitchReason,
    },
    /// A path kept producing frames that failed authentication and is out of use.
    Abandoned {
        /// The path.
        path: Box<PathInfo>,
        /// Failures within the window.
        failures: u32,
    },
    /// No path meets the profile's criteria; the best of the rest is in use.
    Degraded {
        /// The path in use.
        path: Box<PathInfo>,
    },
}

#[derive(Debug)]
struct Candidate {
    path: Path,
    stats: PathStats,
    /// Last time an authenticated frame came over it.
    heard: Option<Instant>,
    rttvar: Duration,
    /// Smallest RTT seen lately, and when: the path's latency without queueing.
    min_rtt: WindowedMin,
    pings: VecDeque<(u32, Instant)>,
    next_ping: Instant,
    /// Outcome bits of the last pings (1 = lost), newest in bit 0.
    outcomes: u64,
    samples: u32,
    tamper: VecDeque<Instant>,
    abandoned_until: Option<Instant>,
    better_since: Option<Instant>,
    /// When it last joined the active set: silence is counted from then at the earliest,
    /// since until then it was pinged at the slow rate.
    joined: Option<Instant>,
    /// Direct paths before they first answer: probes left in this attempt. Once they are
    /// spent, `next_ping` is when the next attempt starts.
    punch_left: u32,
    /// Pings sent before this went out before the peer held the keys: the peer may have
    /// dropped them unread, so their going unanswered is not loss.
    forgive_before: Option<Instant>,
}

impl Candidate {
    fn is_abandoned(&self, now: Instant) -> bool {
        self.abandoned_until.is_some_and(|t| now < t)
    }

    fn loss(&self) -> f32 {
        if self.samples < LOSS_MIN_SAMPLES {
            return 0.0;
        }
        let n = self.samples.min(LOSS_WINDOW);
        let mask = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
        (self.outcomes & mask).count_ones() as f32 / n as f32
    }

    /// Loss over the last (up to 16) outcomes, with as few as 4: for telling a lossy path
    /// from a dead one when it falls silent.
    fn recent_loss(&self) -> f32 {
        let n = self.samples.min(16);
        if n < 4 {
            return 0.0;
        }
        (self.outcomes & ((1u64 << n) - 1)).count_ones() as f32 / n as f32
    }

    /// A ping sent at `sent` went unanswered.
    fn lose(&mut self, sent: Instant) {
        if self.forgive_before.is_none_or(|t| sent >= t) {
            self.record(true);
        }
    }

    fn record(&mut self, lost: bool) {
        self.outcomes = (self.outcomes << 1) | u64::from(lost);
        self.samples = self.samples.saturating_add(1);
        self.stats.loss = self.loss();
    }

    /// How long a ping waits for its pong before it counts as lost.
    fn give_up(&self) -> Duration {
        self.stats.srtt.map_or(PING_GIVE_UP, |s| (s * 2 + self.rttvar * 4).max(Duration::from_millis(20)))
    }

    /// How long silence may last before the path is dead (None while unmeasured).
    fn silence_deadline(&self, interval: Duration) -> Option<Duration> {
        let srtt = self.stats.srtt?;
        Some(interval + srtt / 2 + 4 * self.rttvar + Duration::from_millis(5))
    }

    /// Whether it is a direct path still being punched, or waiting for its next attempt.
    fn punching(&self) -> bool {
        matches!(self.stats.punch, Some(Punch::Trying { .. } | Punch::Failed { .. }))
    }

    fn relays(&self) -> &[shoal_protocol::NodeId] {
        match &self.path {
            Path::Direct(_) => &[],
            Path::Relayed(r) => r.relays(),
        }
    }
}

/// The candidates of one VC and the choice among them. See the module docs.
#[derive(Debug)]
pub struct PathManager {
    profile: Profile,
    candidates: Vec<Candidate>,
    /// Paths carrying traffic: the primary first, then a redundant or striped second and third.
    active: Vec<PathId>,
    next_ping_id: u32,
    last_switch: Option<Instant>,
    pings_due: VecDeque<(PathId, u32)>,
    events: VecDeque<PathEvent>,
    degraded: bool,
    /// The primary was chosen before anything was measured: the first measurements may
    /// replace it without waiting for the hold time.
    provisional: bool,
}

impl PathManager {
    /// A manager for `paths`, in order of preference before anything is measured.
    pub fn new(profile: Profile, paths: &[Path], now: Instant) -> PathManager {
        let mut m = PathManager {
            profile,
            candidates: Vec::new(),
            active: Vec::new(),
            next_ping_id: 1,
            last_switch: None,
            pings_due: VecDeque::new(),
            events: VecDeque::new(),
            degraded: false,
            provisional: true,
        };
        for p in paths {
            m.add(now, *p);
        }
        m
    }

    /// Adds a candidate (a new relay, a direct address); returns its id, or the existing one.
    pub fn add(&mut self, now: Instant, path: Path) -> Option<PathId> {
        if let Some(i) = self.find(&path) {
            return Some(i);
        }
        if self.candidates.len() >= usize::from(u8::MAX) {
            return None;
        }
        self.candidates.push(Candidate {
            path,
            stats: PathStats::default(),
            heard: None,
            rttvar: Duration::ZERO,
            min_rtt: WindowedMin::default(),
            pings: VecDeque::new(),
            next_ping: now,
            outcomes: 0,
            samples: 0,
            tamper: VecDeque::new(),
            abandoned_until: None,
            better_since: None,
            joined: None,
            punch_left: PUNCH_PROBES,
            forgive_before: None,
        });
        let c = self.candidates.last_mut()?;
        if matches!(path, Path::Direct(_)) {
            c.stats.punch = Some(Punch::Trying { attempt: 1 });
        }
        Some(PathId((self.candidates.len() - 1) as u8))
    }

    /// Starts a fresh punching attempt on direct candidate `id` now, whatever its backoff:
    /// the peer's addresses or our own have just changed, so the last attempt's outcome no
    /// longer says anything. An open path is punched too, since the NAT that let it through
    /// may be another one now. Relayed candidates are only pinged at once.
    pub fn punch_now(&mut self, now: Instant, id: PathId) {
        let Some(c) = self.candidates.get_mut(usize::from(id.0)) else { return };
        c.next_ping = now;
        if c.relays().is_empty() {
            let attempt = match c.stats.punch {
                Some(Punch::Trying { attempt } | Punch::Failed { attempts: attempt }) => attempt + 1,
                Some(Punch::Open) | None => 1,
            };
            c.stats.punch = Some(Punch::Trying { attempt });
            c.punch_left = PUNCH_PROBES;
        }
    }

    /// Our network changed (a new socket, a new NAT mapping): every candidate is pinged at
    /// once and every direct one punched afresh, so paths that still work are confirmed and
    /// the ones that need the NATs opened again get them opened.
    pub fn on_network_change(&mut self, now: Instant) {
        for i in 0..self.candidates.len() {
            self.punch_now(now, PathId(i as u8));
        }
    }

    /// The candidate that is `path`.
    pub fn find(&self, path: &Path) -> Option<PathId> {
        self.candidates.iter().position(|c| c.path == *path).map(|i| PathId(i as u8))
    }

    /// The path behind an id.
    pub fn path(&self, id: PathId) -> Option<Path> {
        self.candidates.get(usize::from(id.0)).map(|c| c.path)
    }

    /// Paths the VC sends on now: the primary first. Empty only when there are no candidates.
    pub fn sending(&self) -> &[PathId] {
        &self.active
    }

    /// Everything known about each candidate.
    pub fn info(&self, now: Instant) -> Vec<PathInfo> {
        (0..self.candidates.len()).map(|i| self.info_of(PathId(i as u8), now)).collect()
    }

    fn info_of(&self, id: PathId, now: Instant) -> PathInfo {
        let c = &self.candidates[usize::from(id.0)];
        PathInfo {
            id,
            path: c.path,
            kind: PathKind::of(&c.path),
            stats: c.stats.clone(),
            active: self.active.contains(&id),
            abandoned: c.is_abandoned(now),
        }
    }

    fn ping_interval(&self, id: PathId) -> Duration {
        let c = &self.candidates[usize::from(id.0)];
        if matches!(c.stats.punch, Some(Punch::Trying { .. })) {
            return PUNCH_INTERVAL;
        }
        if !self.active.contains(&id) {
            return IDLE_PING;
        }
        let half = c.stats.srtt.map_or(ACTIVE_PING_MIN, |s| s / 2);
        let max = if self.profile.is_reliable() { ACTIVE_PING_MAX * 2 } else { ACTIVE_PING_MAX };
        half.clamp(ACTIVE_PING_MIN, max)
    }

    /// An authenticated frame came over `id`.
    pub fn on_heard(&mut self, now: Instant, id: PathId) {
        if let Some(c) = self.candidates.get_mut(usize::from(id.0)) {
            c.heard = Some(now);
        }
    }

    /// The pong for ping `ping` came over `id`. Returns the RTT it measured.
    pub fn on_pong(&mut self, now: Instant, id: PathId, ping: u32) -> Option<Duration> {
        let c = self.candidates.get_mut(usize::from(id.0))?;
        let at = c.pings.iter().position(|(p, _)| *p == ping)?;
        if c.punching() {
            // The first answer through the NATs. The probes before it were stopped by a NAT
            // not yet open, which says nothing of the path's loss. Perhaps it answers the last
            // probe of a failed attempt: pinging resumes at the usual rate.
            c.stats.punch = Some(Punch::Open);
            c.next_ping = c.next_ping.min(now);
            c.pings.drain(..at);
            (c.outcomes, c.samples) = (0, 0);
        }
        // Pings before this one that are still waiting were overtaken: count them as lost.
        let at = c.pings.iter().position(|(p, _)| *p == ping)?;
        let (_, sent) = c.pings[at];
        for _ in 0..at {
            if let Some((_, early)) = c.pings.pop_front() {
                c.lose(early);
            }
        }
        c.pings.pop_front();
        c.record(false);
        c.stats.pongs += 1;
        c.heard = Some(now);
        let rtt = now.saturating_duration_since(sent);
        c.min_rtt.push(now, rtt, MIN_RTT_FOR);
        match c.stats.srtt {
            None => {
                c.stats.srtt = Some(rtt);
                c.rttvar = rtt / 2;
            }
            Some(s) => {
                let dev = s.abs_diff(rtt);
                c.rttvar = (c.rttvar * 3 + dev) / 4;
                c.stats.srtt = Some((s * 7 + rtt) / 8);
            }
        }
        c.stats.jitter = c.rttvar;
        Some(rtt)
    }

    /// The smoothed RTT of `id`.
    pub fn srtt(&self, id: PathId) -> Option<Duration> {
        self.candidates.get(usize::from(id.0))?.stats.srtt
    }

    /// `n` bytes of data left over `id`.
    pub fn on_data_sent(&mut self, id: PathId, n: usize) {
        if let Some(c) = self.candidates.get_mut(usize::from(id.0)) {
            c.stats.bytes_sent += n as u64;
        }
    }

    /// `n` bytes of data came over `id`.
    pub fn on_data_received(&mut self, id: PathId, n: usize) {
        if let Some(c) = self.candidates.get_mut(usize::from(id.0)) {
            c.stats.bytes_received += n as u64;
        }
    }

    /// The VC measured `id`'s bandwidth (what it delivered when full), bytes per second.
    pub fn on_capacity(&mut self, id: PathId, bytes_per_sec: f64) {
        if let Some(c) = self.candidates.get_mut(usize::from(id.0)) {
            c.stats.capacity = Some(bytes_per_sec);
        }
    }

    /// Data bytes received over `id` so far: what a pong over it reports.
    pub fn delivered(&self, id: PathId) -> u64 {
        self.candidates.get(usize::from(id.0)).map_or(0, |c| c.stats.bytes_received)
    }

    /// A traced frame came over `id` with these per-hop latencies.
    pub fn on_trace(&mut self, id: PathId, hops: Vec<Duration>) {
        if let Some(c) = self.candidates.get_mut(usize::from(id.0)) {
            c.stats.hop_latencies = hops;
        }
    }

    /// A frame over `id` failed authentication. Returns true when this abandons the path.
    pub fn on_auth_failure(&mut self, now: Instant, id: PathId) -> bool {
        let Some(c) = self.candidates.get_mut(usize::from(id.0)) else { return false };
        c.stats.auth_failures += 1;
        c.tamper.push_back(now);
        while c.tamper.front().is_some_and(|t| now.saturating_duration_since(*t) > TAMPER_WINDOW) {
            c.tamper.pop_front();
        }
        let failures = c.tamper.len() as u32;
        if failures < TAMPER_LIMIT || c.is_abandoned(now) {
            return false;
        }
        self.abandon(now, id, failures);
        if self.active.contains(&id) {
            self.reselect(now, Some(SwitchReason::Tampering));
        }
        true
    }

    fn abandon(&mut self, now: Instant, id: PathId, failures: u32) {
        let c = &mut self.candidates[usize::from(id.0)];
        c.abandoned_until = Some(now + ABANDON_FOR);
        c.tamper.clear();
        c.heard = None;
        let info = self.info_of(id, now);
        self.events.push_back(PathEvent::Abandoned { path: Box::new(info), failures });
    }

    /// The peer has just shown it holds the keys. Pings sent before then could have reached
    /// it before it could read them: going unanswered says nothing about the paths, so it is
    /// not counted. They stay in flight, though: a pong for one is as good an RTT sample as
    /// any, and the first a punched path gets may well answer one of them.
    pub fn on_confirmed(&mut self, now: Instant) {
        for c in &mut self.candidates {
            c.forgive_before = Some(now);
            c.outcomes = 0;
            c.samples = 0;
            c.stats.loss = 0.0;
        }
    }

    /// Sending on `id` failed locally (say, its first relay is not bound): treat it as silent.
    pub fn on_unusable(&mut self, id: PathId) {
        if let Some(c) = self.candidates.get_mut(usize::from(id.0)) {
            c.heard = None;
            c.stats.srtt = None;
        }
    }

    /// Sends due pings, expires lost ones, and re-evaluates the choice of paths.
    pub fn handle_timeout(&mut self, now: Instant) {
        for i in 0..self.candidates.len() {
            let id = PathId(i as u8);
            let interval = self.ping_interval(id);
            let c = &mut self.candidates[i];
            if let Some(t) = c.abandoned_until
                && now >= t
            {
                c.abandoned_until = None;
            }
            let give_up = c.give_up();
            while let Some(&(_, sent)) = c.pings.front()
                && now.saturating_duration_since(sent) > give_up
            {
                c.pings.pop_front();
                c.lose(sent);
            }
            if now >= c.next_ping && !c.is_abandoned(now) {
                if let Some(Punch::Failed { attempts }) = c.stats.punch {
                    // The wait after a failed attempt is over: the next one starts.
                    c.stats.punch = Some(Punch::Trying { attempt: attempts + 1 });
                    c.punch_left = PUNCH_PROBES;
                }
                let ping = self.next_ping_id;
                self.next_ping_id = self.next_ping_id.wrapping_add(1);
                if c.pings.len() >= MAX_PINGS_IN_FLIGHT
                    && let Some((_, sent)) = c.pings.pop_front()
                {
                    c.lose(sent);
                }
                c.pings.push_back((ping, now));
                c.stats.pings += 1;
                c.next_ping = now + interval;
                self.pings_due.push_back((id, ping));
                if let Some(Punch::Trying { attempt }) = c.stats.punch {
                    c.punch_left = c.punch_left.saturating_sub(1);
                    if c.punch_left == 0 {
                        // The attempt's last probe. It counts as failed unless this probe or
                        // an earlier one is still answered (see `on_pong`).
                        let wait = PUNCH_RETRY.saturating_mul(1 << (attempt - 1).min(10)).min(PUNCH_RETRY_MAX);
                        c.stats.punch = Some(Punch::Failed { attempts: attempt });
                        c.next_ping = now + wait;
                    }
                }
            }
        }
        self.reselect(now, None);
    }

    /// Whether `id` is out: abandoned, or silent past its deadline.
    fn is_dead(&self, now: Instant, id: PathId) -> Option<SwitchReason> {
        let c = &self.candidates[usize::from(id.0)];
        if c.is_abandoned(now) {
            return Some(SwitchReason::Tampering);
        }
        let deadline = c.silence_deadline(self.ping_interval(id))?;
        let heard = c.heard?;
        let since = c.joined.map_or(heard, |j| heard.max(j));
        let quiet = now.saturating_duration_since(since);
        if quiet <= deadline {
            return None;
        }
        // Silence on a path that has just delivered forgeries is tampering: frames are being
        // altered, and the losses are the ones that did not even parse as ours.
        if c.tamper.iter().any(|t| now.saturating_duration_since(*t) <= TAMPER_WINDOW) {
            return Some(SwitchReason::Tampering);
        }
        // Silence on a path that was losing pings before is loss, not an outage.
        let recent = c.recent_loss();
        Some(if recent > self.profile.max_loss { SwitchReason::Lossy(recent) } else { SwitchReason::Silent(quiet) })
    }

    fn usable(&self, now: Instant, id: PathId) -> bool {
        let c = &self.candidates[usize::from(id.0)];
        !c.is_abandoned(now) && c.stats.srtt.is_some() && c.heard.is_some() && self.is_dead(now, id).is_none()
    }

    /// Why `id` fails the profile's criteria, if it does.
    fn breaks_criteria(&self, id: PathId) -> Option<SwitchReason> {
        let c = &self.candidates[usize::from(id.0)];
        let loss = c.loss();
        if loss > self.profile.max_loss {
            return Some(SwitchReason::Lossy(loss));
        }
        if let (Some(cap), Some(min)) = (c.stats.capacity, self.profile.min_bandwidth)
            && cap < min as f64
        {
            return Some(SwitchReason::Narrow(cap as u64));
        }
        match (c.stats.srtt, self.profile.max_latency) {
            (Some(s), Some(max)) if s > max => Some(SwitchReason::TooSlow(s)),
            _ => None,
        }
    }

    /// Lower is better.
    fn score(&self, id: PathId) -> f64 {
        let c = &self.candidates[usize::from(id.0)];
        let srtt = c.stats.srtt.map_or(f64::MAX, |s| s.as_secs_f64());
        let jitter = c.rttvar.as_secs_f64();
        match self.profile.policy {
            Policy::LowestLatency => srtt,
            // A bulk transfer queues on the paths it fills; ranking them by their smoothed RTT
            // would chase it from path to path. The minimum is the path without that queue.
            Policy::Widest => c.min_rtt.get().map_or(srtt, |m| m.as_secs_f64()),
            Policy::LowestLoss => f64::from(c.loss()) * 10.0 + srtt,
            Policy::MostStable => jitter * 4.0 + srtt / 4.0,
        }
    }

    /// Usable candidates, those that meet the criteria first, each group best first.
    fn ranked(&self, now: Instant) -> Vec<PathId> {
        let mut ids: Vec<PathId> =
            (0..self.candidates.len() as u8).map(PathId).filter(|&i| self.usable(now, i)).collect();
        ids.sort_by(|&a, &b| {
            let ka = (self.breaks_criteria(a).is_some(), self.score(a));
            let kb = (self.breaks_criteria(b).is_some(), self.score(b));
            ka.partial_cmp(&kb).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b))
        });
        ids
    }

    fn disjoint(&self, a: PathId, b: PathId) -> bool {
        let (ca, cb) = (&self.candidates[usize::from(a.0)], &self.candidates[usize::from(b.0)]);
        if ca.relays().is_empty() && cb.relays().is_empty() {
            return false;
        }
        !ca.relays().iter().any(|r| cb.relays().contains(r))
    }

    fn reselect(&mut self, now: Instant, forced: Option<SwitchReason>) {
        let ranked = self.ranked(now);
        let current = self.active.first().copied();
        let mut reason = None;
        let primary = match current {
            None => {
                // Nothing measured yet: the first candidate not out, in the given order.
                let first = ranked.first().copied().or_else(|| {
                    (0..self.candidates.len() as u8)
                        .map(PathId)
                        .find(|&i| !self.candidates[usize::from(i.0)].is_abandoned(now))
                });
                reason = Some(SwitchReason::Initial);
                first
            }
            Some(cur) => {
                let why_leave = forced.or_else(|| self.is_dead(now, cur)).or_else(|| self.breaks_criteria(cur));
                let best = self.preferred(&ranked, cur);
                match (why_leave, best) {
                    (Some(why), Some(best)) if best != cur => {
                        // Leave a failing path only for one that does not fail the same way.
                        let better = self.breaks_criteria(best).is_none()
                            || matches!(why, SwitchReason::Silent(_) | SwitchReason::Tampering);
                        if better {
                            let c = &self.candidates[usize::from(cur.0)];
                            if why == SwitchReason::Tampering && !c.is_abandoned(now) {
                                let failures = c.tamper.len() as u32;
                                self.abandon(now, cur, failures);
                            }
                            reason = Some(why);
                            Some(best)
                        } else {
                            Some(cur)
                        }
                    }
                    (Some(SwitchReason::Tampering), None) => {
                        // Everything measured is out: try any candidate not abandoned.
                        let next = (0..self.candidates.len() as u8)
                            .map(PathId)
                            .find(|&i| i != cur && !self.candidates[usize::from(i.0)].is_abandoned(now));
                        if next.is_some() {
                            reason = Some(SwitchReason::Tampering);
                        }
                        next.or(Some(cur))
                    }
                    (None, Some(best)) if best != cur && self.breaks_criteria(best).is_none() => {
                        let upgrade = self.candidates[usize::from(best.0)].relays().is_empty()
                            && !self.candidates[usize::from(cur.0)].relays().is_empty();
                        let clearly = self.clearly_better(best, cur);
                        if clearly || upgrade {
                            let hold = self.hold();
                            let since = *self.candidates[usize::from(best.0)].better_since.get_or_insert(now);
                            let settled = self.last_switch.is_none_or(|t| now.saturating_duration_since(t) >= hold);
                            if self.provisional
                                || (upgrade && clearly)
                                || (now.saturating_duration_since(since) >= hold && settled)
                            {
                                reason = Some(SwitchReason::Better);
                                Some(best)
                            } else {
                                Some(cur)
                            }
                        } else {
                            self.candidates[usize::from(best.0)].better_since = None;
                            Some(cur)
                        }
                    }
                    _ => Some(cur),
                }
            }
        };
        let Some(primary) = primary else { return };
        // Until every candidate has a first RTT, a clearly better one wins without the hold.
        if self.provisional
            && self.candidates.iter().all(|c| {
                c.stats.srtt.is_some() || c.is_abandoned(now) || matches!(c.stats.punch, Some(Punch::Failed { .. }))
            })
        {
            self.provisional = false;
        }
        let mut active = vec![primary];
        let extra = if self.profile.redundancy { 1 } else { usize::from(self.profile.stripe.saturating_sub(1)) };
        for &id in &ranked {
            if active.len() > extra {
                break;
            }
            if id != primary && (!self.profile.redundancy || active.iter().all(|&a| self.disjoint(a, id))) {
                active.push(id);
            }
        }
        for &id in &active {
            if !self.active.contains(&id) {
                // A path joining the active set is pinged at its fast rate from now on.
                let c = &mut self.candidates[usize::from(id.0)];
                c.next_ping = now;
                c.joined = Some(now);
            }
        }
        if let Some(reason) = reason {
            let old = current.map(|c| Box::new(self.info_of(c, now)));
            self.last_switch = Some(now);
            for c in &mut self.candidates {
                c.better_since = None;
            }
            self.active = active;
            let new = Box::new(self.info_of(primary, now));
            self.events.push_back(PathEvent::Changed { old, new, reason });
        } else {
            self.active = active;
        }
        let degraded = self.usable(now, primary) && self.breaks_criteria(primary).is_some();
        if degraded && !self.degraded {
            self.events.push_back(PathEvent::Degraded { path: Box::new(self.info_of(primary, now)) });
        }
        self.degraded = degraded;
    }

    /// The best-ranked candidate; but a relayed primary gives way to a direct path that is not
    /// clearly worse than the best, since a direct path spares the relays and a hop.
    fn preferred(&self, ranked: &[PathId], cur: PathId) -> Option<PathId> {
        let best = ranked.first().copied()?;
        if self.candidates[usize::from(cur.0)].relays().is_empty() {
            return Some(best);
        }
        let direct = ranked
            .iter()
            .copied()
            .find(|&d| self.candidates[usize::from(d.0)].relays().is_empty() && self.breaks_criteria(d).is_none());
        match direct {
            Some(d) if !self.clearly_better(best, d) => Some(d),
            _ => Some(best),
        }
    }

    fn clearly_better(&self, a: PathId, b: PathId) -> bool {
        let (sa, sb) = (self.score(a), self.score(b));
        // At least 10% and 2 ms (in score units) better.
        sa < sb * 0.9 && sb - sa > 0.002
    }

    fn hold(&self) -> Duration {
        let srtt = self.active.first().and_then(|&i| self.candidates[usize::from(i.0)].stats.srtt);
        srtt.map_or(HOLD, |s| HOLD.max(s * 10))
    }

    /// When [`PathManager::handle_timeout`] is next due.
    #[must_use]
    pub fn poll_timeout(&self, now: Instant) -> Instant {
        let mut next = now + IDLE_PING;
        for (i, c) in self.candidates.iter().enumerate() {
            let id = PathId(i as u8);
            match c.abandoned_until {
                Some(t) if t > now => next = next.min(t),
                _ => next = next.min(c.next_ping),
            }
            if let Some(&(_, oldest)) = c.pings.front() {
                next = next.min(oldest + c.give_up() + Duration::from_millis(1));
            }
            if let (Some(h), Some(d)) = (c.heard, c.silence_deadline(self.ping_interval(id)))
                && self.active.contains(&id)
            {
                let dead_at = c.joined.map_or(h, |j| h.max(j)) + d + Duration::from_millis(1);
                // A deadline already passed has been acted on; do not spin on it.
                if dead_at > now {
                    next = next.min(dead_at);
                }
            }
        }
        next
    }

    /// The next ping to send: which path, which id.
    #[must_use]
    pub fn poll_ping(&mut self) -> Option<(PathId, u32)> {
        self.pings_due.pop_front()
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<PathEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use shoal_mesh::wire::Route;
    use shoal_protocol::NodeId;

    fn relayed(ids: &[u8]) -> Path {
        Path::Relayed(Route::new(&ids.iter().map(|&b| NodeId([b; 8])).collect::<Vec<_>>()).unwrap())
    }

    /// Answers every ping on each path after that path's RTT (None = path down).
    fn run(m: &mut PathManager, start: Instant, until: Duration, rtt: impl Fn(PathId, Duration) -> Option<Duration>) {
        thread_local! {
            /// Pongs in flight, kept across calls so that a test's phases join up.
            static INFLIGHT: std::cell::RefCell<Vec<(Instant, PathId, u32)>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let mut inflight = INFLIGHT.take();
        inflight.retain(|x| x.0 >= start);
        let mut now = start;
        while now < start + until {
            m.handle_timeout(now);
            while let Some((id, ping)) = m.poll_ping() {
                if let Some(r) = rtt(id, now - start) {
                    inflight.push((now + r, id, ping));
                }
            }
            inflight.sort_by_key(|x| x.0);
            let next = m.poll_timeout(now).min(inflight.first().map_or(now + IDLE_PING, |x| x.0));
            now = next.max(now + Duration::from_micros(100));
            while inflight.first().is_some_and(|x| x.0 <= now) {
                let (_, id, ping) = inflight.remove(0);
                let _ = m.on_pong(now, id, ping);
            }
        }
        INFLIGHT.set(inflight);
    }

    fn direct() -> Path {
        Path::Direct("203.0.113.7:4000".parse().unwrap())
    }

    /// Pings sent on `id` so far.
    fn pings(m: &PathManager, id: PathId, now: Instant) -> u64 {
        m.info(now)[usize::from(id.0)].stats.pings
    }

    fn punch(m: &PathManager, id: PathId, now: Instant) -> Option<Punch> {
        m.info(now)[usize::from(id.0)].stats.punch
    }

    #[test]
    fn a_direct_path_that_never_answers_is_punched_in_bounded_attempts_with_backoff() {
        let t0 = Instant::now();
        let mut m = PathManager::new(Profile::reliable(), &[relayed(&[1]), direct()], t0);
        let d = PathId(1);
        let relay_only = |id: PathId, _| (id.0 == 0).then(|| Duration::from_millis(60));
        run(&mut m, t0, Duration::from_millis(500), relay_only);
        assert_eq!(punch(&m, d, t0), Some(Punch::Trying { attempt: 1 }));
        // Every 20 ms while trying: about 25 probes in half a second.
        assert!((24..=26).contains(&pings(&m, d, t0)), "{}", pings(&m, d, t0));
        run(&mut m, t0 + Duration::from_millis(500), Duration::from_millis(9_500), relay_only);
        assert_eq!(punch(&m, d, t0), Some(Punch::Failed { attempts: 1 }));
        assert_eq!(pings(&m, d, t0), u64::from(PUNCH_PROBES), "one attempt, then quiet until the retry");
        assert_eq!(m.sending(), &[PathId(0)], "the VC stays relayed");
        // The second attempt comes 15 s after the first ended, the third 30 s after that.
        run(&mut m, t0 + Duration::from_secs(10), Duration::from_secs(10), relay_only);
        assert_eq!(pings(&m, d, t0), 2 * u64::from(PUNCH_PROBES));
        assert_eq!(punch(&m, d, t0), Some(Punch::Failed { attempts: 2 }));
        run(&mut m, t0 + Duration::from_secs(20), Duration::from_secs(25), relay_only);
        assert_eq!(pings(&m, d, t0), 2 * u64::from(PUNCH_PROBES), "the third attempt waits 30 s");
        run(&mut m, t0 + Duration::from_secs(45), Duration::from_secs(10), relay_only);
        assert_eq!(pings(&m, d, t0), 3 * u64::from(PUNCH_PROBES));
    }

    #[test]
    fn a_punched_direct_path_takes_the_traffic_at_its_first_answer() {
        let t0 = Instant::now();
        let mut m = PathManager::new(Profile::reliable(), &[relayed(&[1]), direct()], t0);
        // The peer's NAT lets probes through from 300 ms on (when its own probes opened it).
        let opens = Duration::from_millis(300);
        let net = move |id: PathId, t: Duration| match id.0 {
            0 => Some(Duration::from_millis(60)),
            _ => (t >= opens).then(|| Duration::from_millis(20)),
        };
        run(&mut m, t0, Duration::from_millis(280), net);
        assert_eq!(m.sending(), &[PathId(0)]);
        while m.poll_event().is_some() {}
        run(&mut m, t0 + Duration::from_millis(280), Duration::from_millis(100), |id, t| {
            net(id, t + Duration::from_millis(280))
        });
        assert_eq!(punch(&m, PathId(1), t0), Some(Punch::Open));
        // Within one probe interval and one direct RTT of the NAT opening, not a hold time.
        assert_eq!(m.sending(), &[PathId(1)]);
        let ev = m.poll_event().unwrap();
        assert!(matches!(ev, PathEvent::Changed { reason: SwitchReason::Better, .. }), "{ev:?}");
        // If it dies, the relayed path takes over again.
        run(&mut m, t0 + Duration::from_millis(380), Duration::from_millis(600), |id, _| {
            (id.0 == 0).then(|| Duration::from_millis(60))
        });
        assert_eq!(m.sending(), &[PathId(0)]);
    }

    #[test]
    fn a_direct_path_as_fast_as_the_relay_is_preferred_and_kept() {
        let t0 = Instant::now();
        let mut m = PathManager::new(Profile::reliable(), &[relayed(&[1]), direct()], t0);
        // The direct path answers from the start, a little slower than the relay (loopback).
        let net = |id: PathId, _| Some(Duration::from_micros(if id.0 == 0 { 300 } else { 320 }));
        run(&mut m, t0, Duration::from_millis(500), net);
        assert_eq!(m.sending(), &[PathId(1)]);
        // And it stays there: the relay is not clearly better.
        while m.poll_event().is_some() {}
        run(&mut m, t0 + Duration::from_millis(500), Duration::from_secs(5), net);
        assert_eq!(m.poll_event(), None);
        assert_eq!(m.sending(), &[PathId(1)]);
    }

    #[test]
    fn a_failed_punch_does_not_keep_relay_choices_provisional() {
        let t0 = Instant::now();
        let mut m = PathManager::new(Profile::realtime(false), &[relayed(&[1]), relayed(&[2]), direct()], t0);
        let swapping = |id: PathId, t: Duration| {
            let odd = (t.as_millis() / 300) % 2 == 1;
            match id.0 {
                2 => None,
                _ => Some(Duration::from_millis(if (id.0 == 0) == odd { 40 } else { 46 })),
            }
        };
        run(&mut m, t0, Duration::from_secs(2), swapping);
        while m.poll_event().is_some() {}
        run(&mut m, t0 + Duration::from_secs(2), Duration::from_secs(6), |id, t| {
            swapping(id, t + Duration::from_secs(2))
        });
        let changes = std::iter::from_fn(|| m.poll_event()).filter(|e| matches!(e, PathEvent::Changed { .. })).count();
        assert_eq!(changes, 0, "relays swapped every 300 ms were followed");
    }

    #[test]
    fn picks_the_fastest_path_and_leaves_it_within_a_few_rtts_when_it_dies() {
        let t0 = Instant::now();
        let mut m = PathManager::new(Profile::realtime(false), &[relayed(&[1]), relayed(&[2])], t0);
        let fast = |id: PathId| if id.0 == 0 { Duration::from_millis(40) } else { Duration::from_millis(60) };
        run(&mut m, t0, Duration::from_secs(3), |id, _| Some(fast(id)));
        assert_eq!(m.sending(), &[PathId(0)]);
        while m.poll_event().is_some() {}
        // Path 0 dies at 3 s.
        let died = Duration::from_secs(3);
        run(&mut m, t0 + died, Duration::from_millis(400), |id, _| (id.0 != 0).then(|| fast(id)));
        assert_eq!(m.sending(), &[PathId(1)]);
        let ev = m.poll_event().unwrap();
        let PathEvent::Changed { reason: SwitchReason::Silent(quiet), new, .. } = ev else { panic!("{ev:?}") };
        assert_eq!(new.id, PathId(1));
        assert!(quiet < Duration::from_millis(120), "took {quiet:?} of silence on a 40 ms path");
    }

    #[test]
    fn hysteresis_keeps_a_path_that_is_only_slightly_worse() {
        let t0 = Instant::now();
        let mut m = PathManager::new(Profile::realtime(false), &[relayed(&[1]), relayed(&[2])], t0);
        // Two paths within 1 ms of each other, swapping order every 300 ms.
        let swapping = |id: PathId, t: Duration| {
            let odd = (t.as_millis() / 300) % 2 == 1;
            Some(Duration::from_millis(if (id.0 == 0) == odd { 40 } else { 41 }))
        };
        run(&mut m, t0, Duration::from_secs(1), swapping);
        // The first choice, and perhaps the first measured one.
        while m.poll_event().is_some() {}
        let before = m.sending().to_vec();
        run(&mut m, t0 + Duration::from_secs(1), Duration::from_secs(10), |id, t| {
            swapping(id, t + Duration::from_secs(1))
        });
        let ev: Vec<_> = std::iter::from_fn(|| m.poll_event()).collect();
        let changes = ev.iter().filter(|e| matches!(e, PathEvent::Changed { .. })).count();
        assert_eq!(changes, 0, "flapped between near-equal paths {ev:?}");
        assert_eq!(m.sending(), before);
    }

    #[test]
    fn a_clearly_better_path_wins_after_the_hold_time() {
        let t0 = Instant::now();
        let mut m = PathManager::new(Profile::realtime(false), &[relayed(&[1]), relayed(&[2])], t0);
        run(&mut m, t0, Duration::from_secs(2), |id, _| Some(Duration::from_millis(if id.0 == 0 { 30 } else { 50 })));
        assert_eq!(m.sending(), &[PathId(0)]);
        run(&mut m, t0 + Duration::from_secs(2), Duration::from_secs(3), |id, _| {
            Some(Duration::from_millis(if id.0 == 0 { 80 } else { 50 }))
        });
        assert_eq!(m.sending(), &[PathId(1)]);
    }

    #[test]
    fn redundancy_adds_a_relay_disjoint_second_path() {
        let t0 = Instant::now();
        let paths = [relayed(&[1]), relayed(&[1, 2]), relayed(&[3])];
        let mut m = PathManager::new(Profile::realtime(true), &paths, t0);
        run(&mut m, t0, Duration::from_secs(2), |id, _| Some(Duration::from_millis(20 + 10 * u64::from(id.0))));
        assert_eq!(m.sending(), &[PathId(0), PathId(2)], "path 1 shares relay 1 with the primary");
    }

    #[test]
    fn repeated_auth_failures_abandon_the_active_path() {
        let t0 = Instant::now();
        let mut m = PathManager::new(Profile::reliable(), &[relayed(&[1]), relayed(&[2])], t0);
        run(&mut m, t0, Duration::from_secs(2), |id, _| Some(Duration::from_millis(if id.0 == 0 { 20 } else { 30 })));
        while m.poll_event().is_some() {}
        let now = t0 + Duration::from_secs(2);
        let abandoned: Vec<bool> =
            (0..TAMPER_LIMIT).map(|i| m.on_auth_failure(now + Duration::from_millis(i.into()), PathId(0))).collect();
        assert_eq!(abandoned.last(), Some(&true));
        assert_eq!(m.sending()[0], PathId(1));
        assert!(matches!(m.poll_event(), Some(PathEvent::Abandoned { failures: TAMPER_LIMIT, .. })));
        assert!(matches!(m.poll_event(), Some(PathEvent::Changed { reason: SwitchReason::Tampering, .. })));
    }
}
