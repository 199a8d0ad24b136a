//! One VC's choice among the paths to its peer, by its profile's policy, over the measurements
//! its peer's [`PathSet`] shares with the other VCs.
//!
//! Sans-IO, driven by the VC: [`Selector::reselect`] after anything that may change the choice
//! (the VC calls it on every timeout), [`Selector::on_auth_failure`] for frames that failed
//! authentication on this VC, and [`Selector::poll_event`] for what to report.
//!
//! A dead or failing primary is left at once; a merely better path takes over only after it
//! has stayed better for a hold time. A path that was left for a fault (silence, loss,
//! tampering) is on probation: it does not take the traffic back for being better until it
//! has answered for [`PROBATION`], so a path that drops out now and then does not pull the VC
//! back and forth. A direct path that answers and is clearly better than the relayed one in
//! use takes the traffic at once, without the hold time: it is what punching is for.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use shoal_mesh::endpoint::Path;
use shoal_protocol::NodeId;

use super::{PathEvent, PathId, PathInfo, PathKind, PathSet, PathStats, SwitchReason};
use crate::profile::{Policy, Profile};

/// Authentication failures within `TAMPER_WINDOW` that get a path abandoned.
pub const TAMPER_LIMIT: u32 = 5;
const TAMPER_WINDOW: Duration = Duration::from_secs(2);
/// How long an abandoned path stays out before it is tried again.
pub const ABANDON_FOR: Duration = Duration::from_secs(60);
/// A better path must stay better this long (or ten RTTs, if longer) before the VC moves.
const HOLD: Duration = Duration::from_secs(1);
/// A path left for a fault must wait this long (or twenty RTTs, if longer) before it may take
/// the traffic back. Short enough that a loss burst that passed for an outage costs a couple of
/// seconds on the second-best path, not the rest of the session.
pub const PROBATION: Duration = Duration::from_secs(2);

/// What this VC alone knows of a candidate.
#[derive(Debug, Default, Clone)]
struct Slot {
    better_since: Option<Instant>,
    /// When the VC left it for a fault.
    left: Option<Instant>,
    tamper: VecDeque<Instant>,
    abandoned_until: Option<Instant>,
    auth_failures: u64,
    bytes_sent: u64,
    bytes_received: u64,
}

/// One VC's path choice. See the module docs.
#[derive(Debug)]
pub struct Selector {
    profile: Profile,
    /// Paths carrying traffic: the primary first, then a redundant or striped second and third.
    active: Vec<PathId>,
    last_switch: Option<Instant>,
    slots: Vec<Slot>,
    events: VecDeque<PathEvent>,
    degraded: bool,
    /// The primary was chosen before anything was measured: the first measurements may
    /// replace it without waiting for the hold time.
    provisional: bool,
}

fn relays(p: &Path) -> &[NodeId] {
    match p {
        Path::Direct(_) => &[],
        Path::Relayed(r) => r.relays(),
    }
}

impl Selector {
    /// A selector for a VC with `profile`; it picks its first path on the first
    /// [`Selector::reselect`].
    pub fn new(profile: Profile) -> Selector {
        Selector {
            profile,
            active: Vec::new(),
            last_switch: None,
            slots: Vec::new(),
            events: VecDeque::new(),
            degraded: false,
            provisional: true,
        }
    }

    fn slot(&mut self, id: PathId) -> &mut Slot {
        let i = usize::from(id.0);
        if self.slots.len() <= i {
            self.slots.resize(i + 1, Slot::default());
        }
        &mut self.slots[i]
    }

    fn slot_ref(&self, id: PathId) -> Option<&Slot> {
        self.slots.get(usize::from(id.0))
    }

    /// Paths the VC sends on now: the primary first.
    pub fn sending(&self) -> &[PathId] {
        &self.active
    }

    /// The candidate was replaced by another path: whatever this VC knew of it goes.
    pub fn forget(&mut self, now: Instant, paths: &PathSet, id: PathId) {
        *self.slot(id) = Slot::default();
        if self.active.contains(&id) {
            let was_primary = self.active.first() == Some(&id);
            self.active.retain(|&a| a != id);
            if was_primary {
                self.reselect(now, paths, Some(SwitchReason::Silent(Duration::ZERO)));
            }
        }
    }

    /// Whether this VC has taken `id` out of use for tampering.
    pub fn is_abandoned(&self, now: Instant, id: PathId) -> bool {
        self.slot_ref(id).and_then(|s| s.abandoned_until).is_some_and(|t| now < t)
    }

    /// `n` bytes of this VC's data left over `id`.
    pub fn on_data_sent(&mut self, id: PathId, n: usize) {
        self.slot(id).bytes_sent += n as u64;
    }

    /// `n` bytes of this VC's data came over `id`.
    pub fn on_data_received(&mut self, id: PathId, n: usize) {
        self.slot(id).bytes_received += n as u64;
    }

    /// This VC's data bytes received over `id` so far: what its pongs over `id` report.
    pub fn delivered(&self, id: PathId) -> u64 {
        self.slot_ref(id).map_or(0, |s| s.bytes_received)
    }

    /// A frame of this VC over `id` failed authentication. Returns true when this abandons
    /// the path for this VC.
    pub fn on_auth_failure(&mut self, now: Instant, paths: &PathSet, id: PathId) -> bool {
        let abandoned = self.is_abandoned(now, id);
        let s = self.slot(id);
        s.auth_failures += 1;
        s.tamper.push_back(now);
        while s.tamper.front().is_some_and(|t| now.saturating_duration_since(*t) > TAMPER_WINDOW) {
            s.tamper.pop_front();
        }
        let failures = s.tamper.len() as u32;
        if failures < TAMPER_LIMIT || abandoned {
            return false;
        }
        self.abandon(now, paths, id, failures);
        if self.active.contains(&id) {
            self.reselect(now, paths, Some(SwitchReason::Tampering));
        }
        true
    }

    fn abandon(&mut self, now: Instant, paths: &PathSet, id: PathId, failures: u32) {
        let s = self.slot(id);
        s.abandoned_until = Some(now + ABANDON_FOR);
        s.tamper.clear();
        s.left = Some(now);
        let info = self.info_of(now, paths, id);
        self.events.push_back(PathEvent::Abandoned { path: Box::new(info), failures });
    }

    fn usable(&self, now: Instant, paths: &PathSet, id: PathId) -> bool {
        !self.is_abandoned(now, id) && paths.usable(now, id)
    }

    /// Whether `id` is out for this VC: abandoned, or silent past its deadline.
    fn is_dead(&self, now: Instant, paths: &PathSet, id: PathId) -> Option<SwitchReason> {
        if self.is_abandoned(now, id) {
            return Some(SwitchReason::Tampering);
        }
        let quiet = paths.silence(now, id)?;
        // Silence on a path that has just delivered forgeries is tampering: frames are being
        // altered, and the losses are the ones that did not even parse as ours.
        if self.tampered_lately(now, id) {
            return Some(SwitchReason::Tampering);
        }
        // Silence on a path that was losing pings before is loss, not an outage.
        let recent = paths.recent_loss(id);
        Some(if recent > self.profile.max_loss { SwitchReason::Lossy(recent) } else { SwitchReason::Silent(quiet) })
    }

    /// Whether frames over `id` failed authentication within the tamper window.
    fn tampered_lately(&self, now: Instant, id: PathId) -> bool {
        self.slot_ref(id).is_some_and(|s| s.tamper.iter().any(|t| now.saturating_duration_since(*t) <= TAMPER_WINDOW))
    }

    /// Why `id` fails the profile's criteria, if it does.
    fn breaks_criteria(&self, paths: &PathSet, id: PathId) -> Option<SwitchReason> {
        let loss = paths.loss(id);
        if loss > self.profile.max_loss {
            return Some(SwitchReason::Lossy(loss));
        }
        if let (Some(cap), Some(min)) = (paths.capacity(id), self.profile.min_bandwidth)
            && cap < min as f64
        {
            return Some(SwitchReason::Narrow(cap as u64));
        }
        match (paths.typical_rtt(id), self.profile.max_latency) {
            (Some(s), Some(max)) if s > max => Some(SwitchReason::TooSlow(s)),
            _ => None,
        }
    }

    /// Lower is better.
    fn score(&self, paths: &PathSet, id: PathId) -> f64 {
        let srtt = paths.typical_rtt(id).map_or(f64::MAX, |s| s.as_secs_f64());
        match self.profile.policy {
            Policy::LowestLatency => srtt,
            // A bulk transfer queues on the paths it fills; ranking them by their smoothed RTT
            // would chase it from path to path. The minimum is the path without that queue.
            Policy::Widest => paths.min_rtt(id).map_or(srtt, |m| m.as_secs_f64()),
            Policy::LowestLoss => f64::from(paths.loss(id)) * 10.0 + srtt,
            Policy::MostStable => paths.rttvar(id).as_secs_f64() * 4.0 + srtt / 4.0,
        }
    }

    /// Usable candidates, those that meet the criteria first, each group best first.
    fn ranked(&self, now: Instant, paths: &PathSet) -> Vec<PathId> {
        let mut ids: Vec<PathId> = paths.ids().filter(|&i| self.usable(now, paths, i)).collect();
        ids.sort_by(|&a, &b| {
            let ka = (self.breaks_criteria(paths, a).is_some(), self.score(paths, a));
            let kb = (self.breaks_criteria(paths, b).is_some(), self.score(paths, b));
            ka.partial_cmp(&kb).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b))
        });
        ids
    }

    fn is_direct(paths: &PathSet, id: PathId) -> bool {
        paths.path(id).is_some_and(|p| relays(&p).is_empty())
    }

    fn disjoint(paths: &PathSet, a: PathId, b: PathId) -> bool {
        let (Some(pa), Some(pb)) = (paths.path(a), paths.path(b)) else { return false };
        let (ra, rb) = (relays(&pa), relays(&pb));
        if ra.is_empty() && rb.is_empty() {
            return false;
        }
        !ra.iter().any(|r| rb.contains(r))
    }

    /// Whether `id` was left for a fault too recently to take the traffic back.
    fn on_probation(&self, now: Instant, paths: &PathSet, id: PathId) -> bool {
        let probation = paths.srtt(id).map_or(PROBATION, |s| PROBATION.max(s * 20));
        self.slot_ref(id).and_then(|s| s.left).is_some_and(|t| now.saturating_duration_since(t) < probation)
    }

    /// The best-ranked candidate; but a relayed primary gives way to a direct path that is not
    /// clearly worse than the best, since a direct path spares the relays and a hop.
    fn preferred(&self, paths: &PathSet, ranked: &[PathId], cur: PathId) -> Option<PathId> {
        let best = ranked.first().copied()?;
        if Self::is_direct(paths, cur) {
            return Some(best);
        }
        let direct =
            ranked.iter().copied().find(|&d| Self::is_direct(paths, d) && self.breaks_criteria(paths, d).is_none());
        match direct {
            Some(d) if !self.clearly_better(paths, best, d) => Some(d),
            _ => Some(best),
        }
    }

    fn clearly_better(&self, paths: &PathSet, a: PathId, b: PathId) -> bool {
        let (sa, sb) = (self.score(paths, a), self.score(paths, b));
        // At least 10% and 2 ms (in score units) better.
        sa < sb * 0.9 && sb - sa > 0.002
    }

    fn hold(&self, paths: &PathSet) -> Duration {
        let srtt = self.active.first().and_then(|&i| paths.srtt(i));
        srtt.map_or(HOLD, |s| HOLD.max(s * 10))
    }

    /// Re-evaluates the choice of paths; `forced` names a fault that makes the VC leave its
    /// primary now. Events for changes follow in [`Selector::poll_event`].
    pub fn reselect(&mut self, now: Instant, paths: &PathSet, forced: Option<SwitchReason>) {
        let all = self.ranked(now, paths);
        // Paths on probation serve only when nothing else does.
        let settled: Vec<PathId> = all.iter().copied().filter(|&i| !self.on_probation(now, paths, i)).collect();
        let ranked = if settled.is_empty() { all } else { settled };
        let current = self.active.first().copied();
        let mut reason = None;
        let primary = match current {
            None => {
                // Nothing measured yet: the first candidate not out, in the given order.
                let first = ranked.first().copied().or_else(|| paths.ids().find(|&i| !self.is_abandoned(now, i)));
                reason = Some(SwitchReason::Initial);
                first
            }
            Some(cur) => {
                let dead = forced.or_else(|| self.is_dead(now, paths, cur));
                let alive = dead.is_none();
                let why_leave = dead.or_else(|| self.breaks_criteria(paths, cur));
                // Loss on a path that has just delivered forgeries is tampering: frames are
                // being altered, and the losses are the ones that did not even parse as ours.
                let why_leave = match why_leave {
                    Some(SwitchReason::Lossy(_)) if self.tampered_lately(now, cur) => Some(SwitchReason::Tampering),
                    other => other,
                };
                let best = self.preferred(paths, &ranked, cur);
                match (why_leave, best) {
                    (Some(why), Some(best)) if best != cur => {
                        // Leave a failing path only for one that does not fail the same way; a
                        // path that still answers but loses too much, only for one measured to
                        // lose less (loss comes in bursts, and a candidate pinged a few times
                        // has lost nothing yet).
                        let measured_better = match why {
                            SwitchReason::Lossy(_) if alive => {
                                paths.loss_known(best) && paths.loss(best) < paths.loss(cur)
                            }
                            _ => true,
                        };
                        let better = measured_better
                            && (self.breaks_criteria(paths, best).is_none()
                                || matches!(why, SwitchReason::Silent(_) | SwitchReason::Tampering));
                        if better {
                            if why == SwitchReason::Tampering && !self.is_abandoned(now, cur) {
                                let failures = self.slot_ref(cur).map_or(0, |s| s.tamper.len() as u32);
                                self.abandon(now, paths, cur, failures);
                            }
                            if matches!(why, SwitchReason::Silent(_) | SwitchReason::Lossy(_)) {
                                self.slot(cur).left = Some(now);
                            }
                            reason = Some(why);
                            Some(best)
                        } else {
                            Some(cur)
                        }
                    }
                    (Some(SwitchReason::Tampering), None) => {
                        // Everything measured is out: try any candidate not abandoned.
                        let next = paths.ids().find(|&i| i != cur && !self.is_abandoned(now, i));
                        if next.is_some() {
                            reason = Some(SwitchReason::Tampering);
                        }
                        next.or(Some(cur))
                    }
                    (None, Some(best))
                        if best != cur
                            && self.breaks_criteria(paths, best).is_none()
                            && !self.on_probation(now, paths, best) =>
                    {
                        let upgrade = Self::is_direct(paths, best) && !Self::is_direct(paths, cur);
                        let clearly = self.clearly_better(paths, best, cur);
                        if clearly || upgrade {
                            let hold = self.hold(paths);
                            let since = *self.slot(best).better_since.get_or_insert(now);
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
                            self.slot(best).better_since = None;
                            Some(cur)
                        }
                    }
                    _ => Some(cur),
                }
            }
        };
        let Some(primary) = primary else { return };
        // Until every candidate has a first RTT, a clearly better one wins without the hold.
        if self.provisional && paths.ids().all(|i| !paths.awaiting_first_rtt(i) || self.is_abandoned(now, i)) {
            self.provisional = false;
        }
        let mut active = vec![primary];
        let extra = if self.profile.redundancy { 1 } else { usize::from(self.profile.stripe.saturating_sub(1)) };
        for &id in &ranked {
            if active.len() > extra {
                break;
            }
            if id != primary && (!self.profile.redundancy || active.iter().all(|&a| Self::disjoint(paths, a, id))) {
                active.push(id);
            }
        }
        if let Some(reason) = reason {
            let old = current.map(|c| Box::new(self.info_of(now, paths, c)));
            self.last_switch = Some(now);
            for s in &mut self.slots {
                s.better_since = None;
            }
            self.active = active;
            let new = Box::new(self.info_of(now, paths, primary));
            self.events.push_back(PathEvent::Changed { old, new, reason });
        } else {
            self.active = active;
        }
        let degraded = self.usable(now, paths, primary) && self.breaks_criteria(paths, primary).is_some();
        if degraded && !self.degraded {
            self.events.push_back(PathEvent::Degraded { path: Box::new(self.info_of(now, paths, primary)) });
        }
        self.degraded = degraded;
    }

    /// When the choice should be looked at again for time alone: a better path's hold time
    /// ends, a path's probation or abandonment ends.
    #[must_use]
    pub fn poll_timeout(&self, now: Instant, paths: &PathSet) -> Option<Instant> {
        let hold = self.hold(paths);
        let settled = self.last_switch.map(|t| t + hold);
        let mut next: Option<Instant> = None;
        for (i, s) in self.slots.iter().enumerate() {
            let id = PathId(i as u8);
            let probation = paths.srtt(id).map_or(PROBATION, |r| PROBATION.max(r * 20));
            let times = [
                s.abandoned_until,
                s.better_since.map(|t| (t + hold).max(settled.unwrap_or(t))),
                s.left.map(|t| t + probation),
            ];
            for t in times.into_iter().flatten() {
                if t > now {
                    next = Some(next.map_or(t, |n| n.min(t)));
                }
            }
        }
        next
    }

    /// Every candidate as this VC sees it.
    pub fn info(&self, now: Instant, paths: &PathSet) -> Vec<PathInfo> {
        paths.ids().map(|id| self.info_of(now, paths, id)).collect()
    }

    /// One candidate as this VC sees it.
    pub fn info_of(&self, now: Instant, paths: &PathSet, id: PathId) -> PathInfo {
        let mut stats = PathStats::default();
        paths.fill_stats(id, &mut stats);
        if let Some(s) = self.slot_ref(id) {
            stats.auth_failures = s.auth_failures;
            stats.bytes_sent = s.bytes_sent;
            stats.bytes_received = s.bytes_received;
        }
        let path = paths.path(id).unwrap_or(Path::Relayed(shoal_mesh::wire::Route::DIRECT));
        PathInfo {
            id,
            path,
            kind: PathKind::of(&path),
            stats,
            active: self.active.contains(&id),
            abandoned: self.is_abandoned(now, id),
        }
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<PathEvent> {
        self.events.pop_front()
    }
}
