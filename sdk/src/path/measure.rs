//! What a node measures of its candidate paths to one peer, shared by every VC with that peer.
//!
//! Sans-IO, driven by [`crate::Node`]: VCs report what they hear and send
//! ([`PathSet::on_frame`], [`PathSet::on_data_sent`], [`PathSet::on_pong`]) and take pings to
//! ride on the data frames they send ([`PathSet::take_ping`]); the node calls
//! [`PathSet::handle_timeout`] when [`PathSet::poll_timeout`] is due and sends the pings that
//! could not wait for data ([`PathSet::poll_ping`]) through one of the peer's VCs.
//!
//! How often a candidate is pinged depends on what already tells us about it:
//! - **punching**: a direct candidate not yet answered gets bursts of probes (`punch`);
//! - **flowing one way**: a path we send data on that the peer's own frames do not feed is
//!   pinged every half RTT (10–100 ms, and no more often than we send), answered at once: this
//!   is what makes failover take a few RTTs;
//! - **fed**: a path the peer's data arrives on regularly is alive as long as it keeps
//!   coming; it is pinged once a second for its RTT, on frames that go anyway;
//! - **idle**: a path some VC uses with no data either way is kept alive every
//!   [`KEEPALIVE`] by one side only (the lower node id; the other pings only if those pings
//!   stop);
//! - **spare**: candidates no VC uses are pinged every [`SPARE`], by one side likewise.
//!
//! A path is dead when it stays silent past what its mode promises. On a path pinged every
//! half RTT that is one ping interval + RTT/2 + 4 RTT deviations + [`SLACK`] (the pings are
//! already in flight), and only once a ping sent in that time has gone unanswered for an RTT +
//! 4 deviations + [`SLACK`], at least [`CHECK_MIN`] (a ping waits for a data frame to ride
//! on, and a busy host answers late); on the others, silence past the expected gap first sends one urgent
//! ping, and the path is dead only if that goes unanswered for an RTT + 4 deviations +
//! [`SLACK`], so a peer that merely stops sending is not taken for a broken path.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use shoal_mesh::endpoint::Path;

use super::candidate::{
    Candidate, FED_MAX_GAP, FED_MIN_GAPS, FED_WINDOW, FLOW_WINDOW, InFlight, LOSS_MIN_SAMPLES, LOSS_WINDOW, Mode,
    Origin,
};
use super::punch::{self, PUNCH_INTERVAL, PUNCH_PROBES};
use super::{PathId, Punch};
use crate::frame::PONG_HOLD;

/// Bounds of the ping interval of a path data flows out on.
const FAST_MIN: Duration = Duration::from_millis(10);
const FAST_MAX: Duration = Duration::from_millis(100);
/// The shortest ping interval of a path we send on that the peer's data does not feed while
/// the peer streams to us too, more slowly or over another path: each ping draws a pong the
/// peer sends alone, and a neighbour short of upload should not spend more on our checks than
/// on its own stream to us. Five a second still finds a dead path within a quarter of a second
/// or so.
const ANSWERED_MIN: Duration = Duration::from_millis(200);
/// The peer streams to us if its data came at most this long before ours went.
const PEER_STREAMS: Duration = Duration::from_secs(3);
/// Ping interval of a path the peer's frames feed: RTT samples only.
const SAMPLE: Duration = Duration::from_secs(1);
/// Ping interval of a path in use with no data either way.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// Ping interval of a candidate no VC uses.
pub const SPARE: Duration = Duration::from_secs(20);
/// The side that does not keep idle paths alive pings only after this many intervals without
/// the other side's pings.
const DEFER: f64 = 1.5;
/// Added to every silence deadline: what the host's scheduling (ours and the peer's) may add
/// to a gap without the path being at fault.
pub const SLACK: Duration = Duration::from_millis(10);
/// The least time the answer to a check of a silent path is given.
pub(super) const CHECK_MIN: Duration = Duration::from_millis(50);
/// Pings remembered per path.
const MAX_PINGS_IN_FLIGHT: usize = 32;
/// Candidates an introduction may name.
pub const MAX_INTRODUCED_PATHS: usize = 16;
/// Candidates learned from the peer (addresses its authenticated frames came from, and
/// addresses it advertised). Past this, the learned one heard least recently that no VC uses
/// gives way; each is probed, so a peer must not be able to point us at any number of them.
pub const MAX_LEARNED_PATHS: usize = 8;

/// How long past its time a ping on a path that carries our data waits for a data frame to
/// ride on before it goes on its own: the data goes at about the ping's rate, and a ping
/// timed just before it would cost a datagram for nothing.
fn grace(c: &Candidate, mode: Mode, interval: Duration) -> Duration {
    if mode == Mode::Fast && !c.paced { interval / 2 } else { Duration::ZERO }
}

/// A ping to send on its own, because no data frame went that way in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingSend {
    /// The candidate.
    pub path: PathId,
    /// The ping's id.
    pub id: u32,
    /// Whether the peer must answer at once.
    pub urgent: bool,
}

/// Candidates refused or replaced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathSetCounters {
    /// Candidates refused: past [`MAX_INTRODUCED_PATHS`], or past [`MAX_LEARNED_PATHS`] with
    /// every learned one in use.
    pub refused: u64,
    /// Learned candidates that gave way to a newer one.
    pub evicted: u64,
}

/// The candidates to one peer and what they measure. See the module docs.
#[derive(Debug)]
pub struct PathSet {
    /// Our node id is the lower one: we keep idle paths alive.
    keeper: bool,
    candidates: Vec<Candidate>,
    next_ping_id: u32,
    pings_due: VecDeque<PingSend>,
    /// Some VC with the peer holds keys: pings can be sent.
    armed: bool,
    confirmed: bool,
    evicted: Vec<PathId>,
    counters: PathSetCounters,
}

impl PathSet {
    /// An empty set. `keeper` says whether our node id is the lower of the two (we keep idle
    /// paths alive; the peer defers to our pings).
    pub fn new(keeper: bool) -> PathSet {
        PathSet {
            keeper,
            candidates: Vec::new(),
            next_ping_id: 1,
            pings_due: VecDeque::new(),
            armed: false,
            confirmed: false,
            evicted: Vec::new(),
            counters: PathSetCounters::default(),
        }
    }

    /// Adds a candidate the control server's introduction named; returns its id, the existing
    /// one if it is known, or `None` past [`MAX_INTRODUCED_PATHS`].
    pub fn introduce(&mut self, now: Instant, path: Path) -> Option<PathId> {
        if let Some(id) = self.find(&path) {
            return Some(id);
        }
        if self.count(Origin::Introduced) >= MAX_INTRODUCED_PATHS {
            self.counters.refused += 1;
            return None;
        }
        Some(self.insert(now, path, Origin::Introduced))
    }

    /// Adds a candidate learned from the peer (an authenticated frame came from it, or the
    /// peer advertised it); returns its id. Past [`MAX_LEARNED_PATHS`] the learned candidate
    /// heard least recently that no VC uses gives way (see [`PathSet::take_evicted`]); if every
    /// one is in use, `None`.
    pub fn learn(&mut self, now: Instant, path: Path) -> Option<PathId> {
        if let Some(id) = self.find(&path) {
            return Some(id);
        }
        if self.count(Origin::Learned) < MAX_LEARNED_PATHS {
            return Some(self.insert(now, path, Origin::Learned));
        }
        let victim = (0..self.candidates.len())
            .filter(|&i| self.candidates[i].origin == Origin::Learned && !self.candidates[i].in_use)
            .min_by_key(|&i| self.candidates[i].heard);
        let Some(i) = victim else {
            self.counters.refused += 1;
            return None;
        };
        self.counters.evicted += 1;
        self.candidates[i] = Candidate::new(now, path, Origin::Learned);
        let id = PathId(i as u8);
        self.evicted.push(id);
        Some(id)
    }

    fn insert(&mut self, now: Instant, path: Path, origin: Origin) -> PathId {
        self.candidates.push(Candidate::new(now, path, origin));
        PathId((self.candidates.len() - 1) as u8)
    }

    fn count(&self, origin: Origin) -> usize {
        self.candidates.iter().filter(|c| c.origin == origin).count()
    }

    /// Ids whose candidate was replaced by a newer one since the last call: VCs must forget
    /// what they knew of them.
    pub fn take_evicted(&mut self) -> Vec<PathId> {
        std::mem::take(&mut self.evicted)
    }

    /// Refusals and evictions so far.
    pub fn counters(&self) -> PathSetCounters {
        self.counters
    }

    /// The candidate that is `path`.
    pub fn find(&self, path: &Path) -> Option<PathId> {
        self.candidates.iter().position(|c| c.path == *path).map(|i| PathId(i as u8))
    }

    /// The path behind an id.
    pub fn path(&self, id: PathId) -> Option<Path> {
        self.get(id).map(|c| c.path)
    }

    /// Every candidate id.
    pub fn ids(&self) -> impl Iterator<Item = PathId> + '_ {
        (0..self.candidates.len()).map(|i| PathId(i as u8))
    }

    /// How many candidates there are.
    pub fn len(&self) -> usize {
        self.candidates.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.candidates.is_empty()
    }

    fn get(&self, id: PathId) -> Option<&Candidate> {
        self.candidates.get(usize::from(id.0))
    }

    fn get_mut(&mut self, id: PathId) -> Option<&mut Candidate> {
        self.candidates.get_mut(usize::from(id.0))
    }

    /// Whether pings can be sent (some VC with the peer holds keys). Until then none are.
    pub fn set_armed(&mut self, armed: bool) {
        self.armed = armed;
    }

    /// The candidates some VC sends on now. One that joins is pinged at once and its silence
    /// counted from now, since until now it was pinged slowly.
    /// `paced` says which of them a pacing VC sends on: its frames are queued and sealed ahead,
    /// so pings cannot ride on them and go on their own, on time.
    pub fn set_in_use(&mut self, now: Instant, in_use: impl Fn(PathId) -> bool, paced: impl Fn(PathId) -> bool) {
        for i in 0..self.candidates.len() {
            let used = in_use(PathId(i as u8));
            let c = &mut self.candidates[i];
            c.paced = paced(PathId(i as u8));
            if used && !c.in_use {
                c.joined = Some(now);
                c.next_ping = c.next_ping.min(now);
                c.suspect = None;
            }
            c.in_use = used;
        }
    }

    /// The peer has just shown it holds the keys (the first VC confirmed). Pings sent before
    /// then may have reached it before it could read them: their going unanswered is not
    /// counted. They stay in flight: a pong for one is as good an RTT sample as any.
    pub fn on_confirmed(&mut self, now: Instant) {
        if std::mem::replace(&mut self.confirmed, true) {
            return;
        }
        for c in &mut self.candidates {
            c.forgive_before = Some(now);
            c.outcomes = 0;
            c.samples = 0;
            c.loss = 0.0;
        }
    }

    /// Starts a fresh punching attempt on direct candidate `id` now, whatever its backoff:
    /// the peer's addresses or our own have just changed, so the last attempt's outcome no
    /// longer says anything. An open path is punched too, since the NAT that let it through
    /// may be another one now. Relayed candidates are only pinged at once.
    pub fn punch_now(&mut self, now: Instant, id: PathId) {
        let Some(c) = self.get_mut(id) else { return };
        c.next_ping = now;
        if c.is_direct() {
            let attempt = match c.punch {
                Some(Punch::Trying { attempt } | Punch::Failed { attempts: attempt }) => attempt + 1,
                Some(Punch::Open) | None => 1,
            };
            c.punch = Some(Punch::Trying { attempt });
            c.punch_left = PUNCH_PROBES;
        }
    }

    /// Our network changed (a new socket, a new NAT mapping): every candidate is pinged at
    /// once and every direct one punched afresh.
    pub fn on_network_change(&mut self, now: Instant) {
        for i in 0..self.candidates.len() {
            self.punch_now(now, PathId(i as u8));
        }
    }

    /// An authenticated frame came over `id`. `data` says whether it carried the peer's
    /// messages: the peer's own flow, which tells us the path works for as long as it keeps
    /// coming (acks and pongs answer what we send, pings come at the peer's whim).
    pub fn on_frame(&mut self, now: Instant, id: PathId, data: bool) {
        let Some(c) = self.get_mut(id) else { return };
        c.heard = Some(now);
        if c.suspect.take().is_some() && !data {
            // The check answered: the path works, the peer's data just paused. The path is
            // not fed until the data comes back (then at once: its rate is known).
            c.paused = true;
        }
        if data {
            c.paused = false;
            if let Some(last) = c.initiative {
                let gap = now.saturating_duration_since(last);
                if gap <= FED_MAX_GAP {
                    if c.gaps.len() >= FED_MIN_GAPS {
                        c.gaps.pop_front();
                    }
                    c.gaps.push_back(gap);
                } else if gap > FED_MAX_GAP * 2 || c.gaps.len() < FED_MIN_GAPS {
                    c.gaps.clear();
                }
                // Otherwise one frame was lost from a steady flow: the flow goes on, and the
                // gap is not what its rate promises (the silence in it was checked).
            }
            c.initiative = Some(now);
        }
    }

    /// The peer pinged us over `id`.
    pub fn on_peer_ping(&mut self, now: Instant, id: PathId) {
        if let Some(c) = self.get_mut(id) {
            c.peer_pinged = Some(now);
        }
    }

    /// A frame with renet packets (data or acks) is leaving over `id` (call before
    /// [`PathSet::take_ping`] for it). A path
    /// that starts carrying data is pinged at once and its silence counted from now, since
    /// until now it was pinged slowly.
    pub fn on_data_sent(&mut self, now: Instant, id: PathId) {
        let Some(c) = self.get_mut(id) else { return };
        if !c.sending(now) {
            c.joined = Some(c.joined.map_or(now, |j| j.max(now)));
            c.next_ping = c.next_ping.min(now);
            c.suspect = None;
        }
        if let Some(last) = c.sent_data {
            let gap = now.saturating_duration_since(last);
            c.sent_gap = Some(match c.sent_gap {
                Some(g) if gap <= FLOW_WINDOW => (g * 7 + gap) / 8,
                _ => gap,
            });
        }
        c.sent_data = Some(now);
    }

    /// The pong for ping `ping` came over `id`, after waiting `held` at the peer for a frame
    /// to ride on. Returns the RTT it measured, unless the ping had been counted lost (then the
    /// loss is undone and the RTT kept, but nothing is returned).
    pub fn on_pong(&mut self, now: Instant, id: PathId, ping: u32, held: Duration) -> Option<Duration> {
        // No answer waits longer than that; a peer claiming more would shrink its RTT.
        let held = held.min(PONG_HOLD);
        let c = self.get_mut(id)?;
        let Some(at) = c.pings.iter().position(|p| p.id == ping) else {
            // A pong that came after its ping was counted lost: not a loss after all, and an
            // RTT sample, but not one for the pacers, whose books closed on it.
            let sent = c.unlose(ping)?;
            let rtt = now.saturating_duration_since(sent).saturating_sub(held);
            c.heard = Some(now);
            c.sample(now, rtt);
            return None;
        };
        if c.punching() {
            // The first answer through the NATs. The probes before it were stopped by a NAT
            // not yet open, which says nothing of the path's loss. Perhaps it answers the last
            // probe of a failed attempt: pinging resumes at the usual rate.
            c.punch = Some(Punch::Open);
            c.next_ping = c.next_ping.min(now);
            c.pings.drain(..at);
            (c.outcomes, c.samples) = (0, 0);
        }
        // Pings before this one that are still waiting were overtaken: count them as lost.
        let at = c.pings.iter().position(|p| p.id == ping)?;
        for _ in 0..at {
            if let Some(early) = c.pings.pop_front() {
                c.lose(early);
            }
        }
        let sent = c.pings.pop_front()?.sent;
        c.record(false);
        c.pongs += 1;
        c.last_pong = Some(now);
        c.heard = Some(now);
        c.suspect = None;
        let rtt = now.saturating_duration_since(sent).saturating_sub(held);
        c.sample(now, rtt);
        Some(rtt)
    }

    /// A traced frame came over `id` with these per-hop latencies.
    pub fn on_trace(&mut self, id: PathId, hops: Vec<Duration>) {
        if let Some(c) = self.get_mut(id) {
            c.hop_latencies = hops;
        }
    }

    /// A VC measured `id`'s bandwidth (what it delivered when full), bytes per second.
    pub fn on_capacity(&mut self, id: PathId, bytes_per_sec: f64) {
        if let Some(c) = self.get_mut(id) {
            c.capacity = Some(bytes_per_sec);
        }
    }

    /// Sending on `id` failed locally (say, its first relay is not bound): treat it as silent.
    pub fn on_unusable(&mut self, id: PathId) {
        if let Some(c) = self.get_mut(id) {
            c.heard = None;
            c.srtt = None;
        }
    }

    fn mode(&self, c: &Candidate, now: Instant) -> Mode {
        if matches!(c.punch, Some(Punch::Trying { .. })) {
            Mode::Punch
        } else if !c.in_use {
            Mode::Spare
        } else if c.fed(now) {
            Mode::Fed
        } else if c.sending(now) {
            Mode::Fast
        } else {
            Mode::Idle
        }
    }

    fn interval(&self, c: &Candidate, mode: Mode) -> Duration {
        let defer = if self.keeper { 1.0 } else { DEFER };
        match mode {
            Mode::Punch => PUNCH_INTERVAL,
            Mode::Fast => {
                let half = c.srtt.map_or(FAST_MIN, |s| s / 2).clamp(FAST_MIN, FAST_MAX);
                // No more often than we send: a slow stream does not need fast failover.
                let fast = half.max(c.sent_gap.unwrap_or_default().min(KEEPALIVE));
                if self.peer_streams(c) { fast.max(ANSWERED_MIN) } else { fast }
            }
            Mode::Fed => SAMPLE,
            Mode::Idle => KEEPALIVE.mul_f64(defer),
            Mode::Spare => SPARE.mul_f64(defer),
        }
    }

    /// Whether the peer's own data has come to us (on any path) lately, as of our last data
    /// on `c`: a neighbour whose upload budget serves us more slowly than we serve it.
    fn peer_streams(&self, c: &Candidate) -> bool {
        let (Some(ours), Some(theirs)) = (c.sent_data, self.candidates.iter().filter_map(|o| o.initiative).max())
        else {
            return false;
        };
        ours.saturating_duration_since(theirs) <= PEER_STREAMS
    }

    /// How long silence on `c` is normal in `mode`, counted from the time returned with it.
    fn quiet_allowance(&self, c: &Candidate, mode: Mode) -> Option<(Instant, Duration)> {
        let heard = c.heard?;
        let base = c.joined.map_or(heard, |j| heard.max(j));
        let srtt = c.srtt?;
        Some(match mode {
            Mode::Fast => (base, self.interval(c, mode) + srtt / 2 + 4 * c.rttvar + SLACK),
            Mode::Fed => {
                let since = c.initiative.map_or(base, |t| t.max(base));
                (since, c.longest_gap().mul_f64(1.5) + SLACK)
            }
            Mode::Punch | Mode::Idle | Mode::Spare => (base, self.interval(c, mode) + srtt + 4 * c.rttvar + SLACK),
        })
    }

    /// Why `id` counts as dead now, if it does: silent past its deadline (with the silence so
    /// far). See the module docs.
    pub fn silence(&self, now: Instant, id: PathId) -> Option<Duration> {
        let c = self.get(id)?;
        let heard = c.heard?;
        let mode = self.mode(c, now);
        let (since, allowed) = self.quiet_allowance(c, mode)?;
        let quiet = now.saturating_duration_since(since);
        if mode == Mode::Fast {
            let dead = quiet > allowed && c.unanswered_since(now, since);
            return dead.then_some(now.saturating_duration_since(heard));
        }
        let s = c.suspect?;
        let dead = now.saturating_duration_since(s) > c.answer_within()?;
        dead.then_some(now.saturating_duration_since(heard))
    }

    /// Whether `id` has been measured and is not dead.
    pub fn usable(&self, now: Instant, id: PathId) -> bool {
        self.get(id).is_some_and(|c| c.srtt.is_some() && c.heard.is_some()) && self.silence(now, id).is_none()
    }

    /// Smoothed RTT.
    pub fn srtt(&self, id: PathId) -> Option<Duration> {
        self.get(id)?.srtt
    }

    /// The median of the last RTT samples: what a path's choice goes by, since one stalled
    /// sample moves it not at all (the smoothed RTT keeps such a sample for a while where
    /// samples are few).
    pub fn typical_rtt(&self, id: PathId) -> Option<Duration> {
        self.get(id)?.typical_rtt()
    }

    /// RTT deviation: the path's jitter.
    pub fn rttvar(&self, id: PathId) -> Duration {
        self.get(id).map_or(Duration::ZERO, |c| c.rttvar)
    }

    /// The smallest RTT of the last ten seconds: the path without queueing.
    pub fn min_rtt(&self, id: PathId) -> Option<Duration> {
        self.get(id)?.min_rtt.get()
    }

    /// Fraction of the last pings that got no pong (0 until enough were sent), less one lost
    /// ping: what a path's choice goes by. Pings are few where data flows or nothing does, and
    /// one lost among ten is not a 10 % path.
    pub fn loss(&self, id: PathId) -> f32 {
        self.get(id).map_or(0.0, |c| {
            let n = c.samples.min(LOSS_WINDOW);
            if n < LOSS_MIN_SAMPLES {
                return 0.0;
            }
            (c.loss * n as f32 - 1.0).max(0.0) / n as f32
        })
    }

    /// Whether enough pings went over `id` for [`PathSet::loss`] to say anything.
    pub fn loss_known(&self, id: PathId) -> bool {
        self.get(id).is_some_and(|c| c.samples >= LOSS_MIN_SAMPLES)
    }

    /// Loss over the last few pings, for telling a lossy path from a dead one.
    pub fn recent_loss(&self, id: PathId) -> f32 {
        self.get(id).map_or(0.0, Candidate::recent_loss)
    }

    /// Measured bandwidth, bytes per second.
    pub fn capacity(&self, id: PathId) -> Option<f64> {
        self.get(id)?.capacity
    }

    /// Where hole punching stands (direct candidates).
    pub fn punch(&self, id: PathId) -> Option<Punch> {
        self.get(id)?.punch
    }

    /// Whether it has no RTT yet and is still worth waiting for (not a failed punch).
    pub fn awaiting_first_rtt(&self, id: PathId) -> bool {
        self.get(id).is_some_and(|c| c.srtt.is_none() && !matches!(c.punch, Some(Punch::Failed { .. })))
    }

    /// The shared part of a candidate's stats.
    pub fn fill_stats(&self, id: PathId, s: &mut super::PathStats) {
        let Some(c) = self.get(id) else { return };
        s.srtt = c.srtt;
        s.jitter = c.rttvar;
        s.loss = c.loss;
        s.hop_latencies.clone_from(&c.hop_latencies);
        s.pings = c.pings_sent;
        s.pongs = c.pongs;
        s.capacity = c.capacity;
        s.punch = c.punch;
    }

    /// A ping to ride on a data frame about to leave over `id`, if one is due within the
    /// next half interval: it costs 5 bytes there instead of a datagram later.
    pub fn take_ping(&mut self, now: Instant, id: PathId) -> Option<(u32, bool)> {
        if !self.armed {
            return None;
        }
        let c = self.get(id)?;
        let mode = self.mode(c, now);
        if mode == Mode::Punch || c.suspect.is_some() {
            return None;
        }
        let interval = self.interval(c, mode);
        // Early by up to half an interval: a ping on a frame that goes anyway is cheaper than
        // one on its own later. Not when its answer must go alone for a peer that streams to us
        // (see [`ANSWERED_MIN`]): early, it would draw more of them.
        let early = if mode == Mode::Fast && self.peer_streams(c) { Duration::ZERO } else { interval / 2 };
        if now + early < c.next_ping {
            return None;
        }
        let urgent = mode == Mode::Fast;
        let ping = self.record_ping(now, id, interval, urgent);
        Some((ping, urgent))
    }

    /// A ping to ride on our answer to the peer's ping over `id`, when the peer keeps the path
    /// alive and our own RTT for it is older than three of its intervals: the peer's pings
    /// tell us the path works, not how long it takes. On a path the peer's data comes over,
    /// older than a second (a fed path's sampling interval) is enough: the peer sends on it
    /// while we use another, and without fresh samples it would keep the RTT it had when we
    /// left it (taken, say, while the host was busy with a crowd's handshakes), never look
    /// good enough to come back to, and leave each side pinging its own one-way path.
    pub fn take_echo_ping(&mut self, now: Instant, id: PathId) -> Option<u32> {
        if !self.armed {
            return None;
        }
        let c = self.get(id)?;
        let mode = self.mode(c, now);
        if !matches!(mode, Mode::Idle | Mode::Spare) || !c.pings.is_empty() {
            return None;
        }
        let interval = self.interval(c, mode);
        let stale = if c.fed(now) { SAMPLE } else { interval * 3 };
        if c.last_pong.is_some_and(|t| now.saturating_duration_since(t) < stale) {
            return None;
        }
        let next = c.next_ping;
        let ping = self.record_ping(now, id, interval, false);
        // Not a ping of the schedule: the deferral stands.
        self.candidates[usize::from(id.0)].next_ping = next;
        Some(ping)
    }

    fn record_ping(&mut self, now: Instant, id: PathId, interval: Duration, urgent: bool) -> u32 {
        let ping = self.next_ping_id;
        self.next_ping_id = self.next_ping_id.wrapping_add(1);
        let i = usize::from(id.0);
        let c = &mut self.candidates[i];
        if c.pings.len() >= MAX_PINGS_IN_FLIGHT
            && let Some(old) = c.pings.pop_front()
        {
            c.lose(old);
        }
        c.pings.push_back(InFlight { id: ping, sent: now, lazy: !urgent });
        c.pings_sent += 1;
        c.next_ping = now + interval;
        if let Some(Punch::Trying { attempt }) = c.punch {
            c.punch_left = c.punch_left.saturating_sub(1);
            if c.punch_left == 0 {
                // The attempt's last probe. It counts as failed unless this probe or an
                // earlier one is still answered (see `on_pong`).
                c.punch = Some(Punch::Failed { attempts: attempt });
                c.next_ping = now + punch::retry_wait(attempt);
            }
        }
        ping
    }

    /// Whether a direct candidate to the peer answers now.
    fn direct_open(&self, now: Instant) -> bool {
        self.ids().any(|id| {
            let c = &self.candidates[usize::from(id.0)];
            c.punch == Some(Punch::Open) && self.usable(now, id)
        })
    }

    /// Expires lost pings, checks silent paths and queues the pings that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        let direct_open = self.direct_open(now);
        for i in 0..self.candidates.len() {
            let id = PathId(i as u8);
            let c = &self.candidates[i];
            let mode = self.mode(c, now);
            let interval = self.interval(c, mode);
            let allowance = self.quiet_allowance(c, mode);
            let c = &mut self.candidates[i];
            let give_up = c.give_up();
            while let Some(p) = c.pings.front().copied()
                && now > p.lost_at(give_up)
            {
                c.pings.pop_front();
                c.lose(p);
            }
            if !self.armed {
                continue;
            }
            // Silence past what the mode promised: one urgent ping to tell a broken path from
            // a quiet peer. Pings are already flying on fast paths.
            if mode != Mode::Fast
                && mode != Mode::Punch
                && c.suspect.is_none()
                && let Some((since, allowed)) = allowance
                && now.saturating_duration_since(since) > allowed
            {
                c.suspect = Some(now);
                let ping = self.record_ping(now, id, interval, true);
                self.pings_due.push_back(PingSend { path: id, id: ping, urgent: true });
                continue;
            }
            let c = &mut self.candidates[i];
            if now < c.next_ping + grace(c, mode, interval) {
                continue;
            }
            if let Some(Punch::Failed { attempts }) = c.punch {
                if direct_open {
                    // Another direct path works: no more probes here until something changes.
                    c.next_ping = now + punch::retry_wait(attempts);
                    continue;
                }
                c.punch = Some(Punch::Trying { attempt: attempts + 1 });
                c.punch_left = PUNCH_PROBES;
            }
            if matches!(mode, Mode::Idle | Mode::Spare)
                && c.srtt.is_some()
                && let Some(p) = c.peer_pinged
                && now.saturating_duration_since(p) < interval
            {
                // The peer keeps this path alive; its pings say it works, and our answers
                // carry a ping of ours now and then for the RTT (`take_echo_ping`).
                c.next_ping = p + interval;
                continue;
            }
            let urgent = matches!(mode, Mode::Fast | Mode::Punch);
            let interval = match c.punch {
                Some(Punch::Trying { .. }) => PUNCH_INTERVAL,
                _ => interval,
            };
            let ping = self.record_ping(now, id, interval, urgent);
            self.pings_due.push_back(PingSend { path: id, id: ping, urgent });
        }
    }

    /// When [`PathSet::handle_timeout`] is next due, if ever.
    #[must_use]
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for c in &self.candidates {
            if let Some(p) = c.pings.front() {
                at(p.lost_at(c.give_up()) + Duration::from_millis(1));
            }
            if !self.armed {
                continue;
            }
            let mode = self.mode(c, now);
            at(c.next_ping + grace(c, mode, self.interval(c, mode)));
            // Fast paths die at this time; the others are checked with an urgent ping then.
            if mode != Mode::Punch
                && c.suspect.is_none()
                && let Some((since, allowed)) = self.quiet_allowance(c, mode)
            {
                let t = since + allowed + Duration::from_millis(1);
                if t > now {
                    at(t);
                }
                // ... once a ping sent for them has also gone unanswered too long.
                if mode == Mode::Fast
                    && let Some(t) = c.overdue_from(since).map(|t| t + Duration::from_millis(1))
                    && t > now
                {
                    at(t);
                }
            }
            if let Some(s) = c.suspect
                && let Some(w) = c.answer_within()
            {
                let t = s + w + Duration::from_millis(1);
                if t > now {
                    at(t);
                }
            }
            // The moment a path stops being fed or flowing, its mode (and deadline) changes.
            for t in [c.initiative.map(|t| t + FED_WINDOW), c.sent_data.map(|t| t + FLOW_WINDOW)].into_iter().flatten()
            {
                if t > now {
                    at(t);
                }
            }
        }
        next
    }

    /// The next ping that must go on its own.
    #[must_use]
    pub fn poll_ping(&mut self) -> Option<PingSend> {
        self.pings_due.pop_front()
    }
}
