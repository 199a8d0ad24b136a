//! One candidate path to a peer and what it measures: RTT samples and their smoothing, ping
//! outcomes and loss, the peer's data flow, hole punching. The schedule that drives it is
//! [`super::PathSet`]'s.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use shoal_mesh::endpoint::Path;

use super::Punch;
use super::measure::{CHECK_MIN, SLACK};
use super::punch::PUNCH_PROBES;
use crate::frame::PONG_HOLD;
use crate::pacing::WindowedMin;

/// Ping outcomes a path's loss is measured over.
pub(super) const LOSS_WINDOW: u32 = 64;
/// Outcomes needed before loss counts against a path.
pub(super) const LOSS_MIN_SAMPLES: u32 = 8;
/// We send data on a path if the last data frame left within this.
pub(super) const FLOW_WINDOW: Duration = Duration::from_millis(500);
/// A path is fed while the peer's data has come over it at least [`FED_MIN_GAPS`] times in a
/// row at most this far apart (one gap up to twice as long, a lost frame, does not break the
/// row once it is long enough), the last within [`FED_WINDOW`]. Long enough for a neighbour
/// that serves us its avatar at the 2 Hz floor: its updates are the path's liveness, where
/// pinging it every half RTT would have it answer with a pong of its own each time (in an
/// avatar crowd, most of the mesh's traffic).
pub(super) const FED_MAX_GAP: Duration = Duration::from_millis(600);
pub(super) const FED_WINDOW: Duration = Duration::from_millis(1200);
pub(super) const FED_MIN_GAPS: usize = 8;
/// Pings older than this count as lost even before the RTT is known.
pub(super) const PING_GIVE_UP: Duration = Duration::from_secs(1);
/// Pings counted lost that a late answer may still clear.
pub(super) const MAX_LATE: usize = 16;
/// RTT samples the typical RTT is the median of.
pub(super) const RECENT_RTTS: usize = 8;
/// The window a path's minimum RTT is taken over.
pub(super) const MIN_RTT_FOR: Duration = Duration::from_secs(10);

/// How a candidate became one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// The control server's introduction named it.
    Introduced,
    /// The peer's frames came from it, or the peer advertised it.
    Learned,
}

/// How a candidate is measured now; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Punch,
    Fast,
    Fed,
    Idle,
    Spare,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct InFlight {
    pub(super) id: u32,
    pub(super) sent: Instant,
    /// The answer may wait up to [`PONG_HOLD`] at the peer.
    pub(super) lazy: bool,
}

impl InFlight {
    /// When it counts as lost, on a path that gives up on answers after `give_up`.
    pub(super) fn lost_at(&self, give_up: Duration) -> Instant {
        self.sent + give_up + if self.lazy { PONG_HOLD } else { Duration::ZERO }
    }
}

#[derive(Debug)]
pub(super) struct Candidate {
    pub(super) path: Path,
    pub(super) origin: Origin,
    pub(super) srtt: Option<Duration>,
    pub(super) rttvar: Duration,
    /// Smallest RTT seen lately: the path's latency without queueing.
    pub(super) min_rtt: WindowedMin,
    pub(super) loss: f32,
    /// Outcome bits of the last pings (1 = lost), newest in bit 0.
    pub(super) outcomes: u64,
    pub(super) samples: u32,
    pub(super) pings: VecDeque<InFlight>,
    /// Pings counted lost lately, with the sample count just after: a late pong undoes it.
    pub(super) late: VecDeque<(InFlight, u32)>,
    /// The last RTT samples.
    pub(super) recent: VecDeque<Duration>,
    pub(super) pings_sent: u64,
    pub(super) pongs: u64,
    /// When our last pong came back.
    pub(super) last_pong: Option<Instant>,
    pub(super) next_ping: Instant,
    /// Last time an authenticated frame came over it.
    pub(super) heard: Option<Instant>,
    /// Last time the peer's data came over it.
    pub(super) initiative: Option<Instant>,
    /// The last gaps between the peer's data frames, newest last (at most [`FED_MIN_GAPS`]).
    pub(super) gaps: VecDeque<Duration>,
    /// The peer's data stopped and a check showed the path still works.
    pub(super) paused: bool,
    /// Last time the peer pinged it.
    pub(super) peer_pinged: Option<Instant>,
    /// Last time we sent data over it, and the mean gap of our data frames.
    pub(super) sent_data: Option<Instant>,
    pub(super) sent_gap: Option<Duration>,
    /// Silence past what its mode promised began here; an urgent ping went to check.
    pub(super) suspect: Option<Instant>,
    /// When it last joined some VC's sending set: silence is counted from then at the
    /// earliest, since until then it was pinged slowly.
    pub(super) joined: Option<Instant>,
    pub(super) in_use: bool,
    /// A pacing VC sends on it.
    pub(super) paced: bool,
    pub(super) hop_latencies: Vec<Duration>,
    pub(super) capacity: Option<f64>,
    pub(super) punch: Option<Punch>,
    /// Direct paths before they first answer: probes left in this attempt.
    pub(super) punch_left: u32,
    /// Pings sent before this went out before the peer held the keys: their going unanswered
    /// is not loss.
    pub(super) forgive_before: Option<Instant>,
}

impl Candidate {
    pub(super) fn new(now: Instant, path: Path, origin: Origin) -> Candidate {
        Candidate {
            path,
            origin,
            srtt: None,
            rttvar: Duration::ZERO,
            min_rtt: WindowedMin::default(),
            loss: 0.0,
            outcomes: 0,
            samples: 0,
            pings: VecDeque::new(),
            late: VecDeque::new(),
            recent: VecDeque::new(),
            pings_sent: 0,
            pongs: 0,
            last_pong: None,
            next_ping: now,
            heard: None,
            initiative: None,
            gaps: VecDeque::new(),
            paused: false,
            peer_pinged: None,
            sent_data: None,
            sent_gap: None,
            suspect: None,
            joined: None,
            in_use: false,
            paced: false,
            hop_latencies: Vec::new(),
            capacity: None,
            punch: matches!(path, Path::Direct(_)).then_some(Punch::Trying { attempt: 1 }),
            punch_left: PUNCH_PROBES,
            forgive_before: None,
        }
    }

    pub(super) fn is_direct(&self) -> bool {
        matches!(self.path, Path::Direct(_))
    }

    pub(super) fn fed(&self, now: Instant) -> bool {
        !self.paused
            && self.gaps.len() >= FED_MIN_GAPS
            && self.initiative.is_some_and(|t| now.saturating_duration_since(t) <= FED_WINDOW)
    }

    /// The longest of the last gaps between the peer's data frames: half as long again is
    /// normal silence on a fed path. Bursts (two VCs sending at once) make short gaps that a
    /// mean would trust; the longest is what the peer's send rate promises.
    pub(super) fn longest_gap(&self) -> Duration {
        self.gaps.iter().copied().max().unwrap_or(FED_MAX_GAP)
    }

    pub(super) fn sending(&self, now: Instant) -> bool {
        self.sent_data.is_some_and(|t| now.saturating_duration_since(t) <= FLOW_WINDOW)
    }

    pub(super) fn loss(&self) -> f32 {
        if self.samples < LOSS_MIN_SAMPLES {
            return 0.0;
        }
        let n = self.samples.min(LOSS_WINDOW);
        let mask = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
        (self.outcomes & mask).count_ones() as f32 / n as f32
    }

    /// Loss over the last (up to 16) outcomes, with as few as 4: for telling a lossy path
    /// from a dead one when it falls silent.
    pub(super) fn recent_loss(&self) -> f32 {
        let n = self.samples.min(16);
        if n < 4 {
            return 0.0;
        }
        // Less one lost ping, as for `PathSet::loss`: the ping that found the path dead.
        ((self.outcomes & ((1u64 << n) - 1)).count_ones() as f32 - 1.0).max(0.0) / n as f32
    }

    pub(super) fn lose(&mut self, p: InFlight) {
        if self.forgive_before.is_none_or(|t| p.sent >= t) {
            self.record(true);
            if self.late.len() >= MAX_LATE {
                self.late.pop_front();
            }
            self.late.push_back((p, self.samples));
        }
    }

    /// The pong for `ping` came after the ping was counted lost (a stalled host, a burst of
    /// queueing): it was not lost after all. Returns when it was sent.
    pub(super) fn unlose(&mut self, ping: u32) -> Option<Instant> {
        let at = self.late.iter().position(|(p, _)| p.id == ping)?;
        let (p, index) = self.late.remove(at)?;
        let age = self.samples.saturating_sub(index);
        if age < 64 {
            self.outcomes &= !(1u64 << age);
            self.loss = self.loss();
        }
        Some(p.sent)
    }

    /// The median of the last RTT samples: what the path typically takes, which one stalled
    /// sample does not move (the smoothed RTT keeps it for a while where samples are few).
    pub(super) fn typical_rtt(&self) -> Option<Duration> {
        let mut v: Vec<Duration> = self.recent.iter().copied().collect();
        v.sort();
        v.get(v.len() / 2).copied().or(self.srtt)
    }

    pub(super) fn record(&mut self, lost: bool) {
        self.outcomes = (self.outcomes << 1) | u64::from(lost);
        self.samples = self.samples.saturating_add(1);
        self.loss = self.loss();
    }

    pub(super) fn sample(&mut self, now: Instant, rtt: Duration) {
        self.min_rtt.push(now, rtt, MIN_RTT_FOR);
        if self.recent.len() >= RECENT_RTTS {
            self.recent.pop_front();
        }
        self.recent.push_back(rtt);
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(s) => {
                self.rttvar = (self.rttvar * 3 + s.abs_diff(rtt)) / 4;
                self.srtt = Some((s * 7 + rtt) / 8);
            }
        }
    }

    /// How long a ping waits for its pong before it counts as lost.
    pub(super) fn give_up(&self) -> Duration {
        self.srtt.map_or(PING_GIVE_UP, |s| (s * 2 + self.rttvar * 4).max(Duration::from_millis(20)))
    }

    /// An RTT and its deviation, with room for scheduling: how long the answer to a check may
    /// take. Never under [`CHECK_MIN`]: where the RTT is tiny (loopback, a LAN) the hosts'
    /// scheduling is all the wait there is, and a busy machine stalls for tens of ms.
    pub(super) fn answer_within(&self) -> Option<Duration> {
        Some((self.srtt? + 4 * self.rttvar + SLACK).max(CHECK_MIN))
    }

    /// Pings that should have been answered after `since` and have gone unanswered for as
    /// long as an answer may take ([`Candidate::answer_within`]), the ones already counted
    /// lost included. A path data flows out on is dead only once it has been asked and said
    /// nothing: its pings wait for a data frame to ride on, so silence alone may just mean the
    /// next ping has not gone yet.
    pub(super) fn unanswered_since(&self, now: Instant, since: Instant) -> bool {
        self.overdue_from(since).is_some_and(|t| now > t)
    }

    /// When the first ping that should have been answered after `since` will have gone
    /// unanswered too long (see [`Candidate::unanswered_since`]), if one is out.
    pub(super) fn overdue_from(&self, since: Instant) -> Option<Instant> {
        let wait = self.answer_within()?;
        let from = since.checked_sub(self.srtt.unwrap_or_default()).unwrap_or(since);
        let hold = |p: &InFlight| if p.lazy { PONG_HOLD } else { Duration::ZERO };
        self.late
            .iter()
            .map(|(p, _)| p)
            .chain(&self.pings)
            .filter(|p| p.sent >= from)
            .map(|p| p.sent + wait + hold(p))
            .min()
    }

    pub(super) fn punching(&self) -> bool {
        matches!(self.punch, Some(Punch::Trying { .. } | Punch::Failed { .. }))
    }
}
