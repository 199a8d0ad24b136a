//! Showing a neighbour's avatar smoothly from the updates that reach us.
//!
//! Updates are stamped with the sender's avatar clock and arrive with a delay that varies.
//! The receiver shows the avatar as it was a little in the past (the *render time*: now,
//! moved onto the sender's clock, minus an interpolation delay), between the two updates
//! around that time. The delay is [`InterpConfig::delay`] at least, and grows with the
//! jitter measured in the arrivals, so that the next update is usually there in time. Past
//! the newest update the avatar is extrapolated along its velocity for up to
//! [`InterpConfig::max_extrapolation`], then held still. An update that changes what was
//! already shown (a late one, or one after an extrapolation that guessed wrong) is blended in
//! over [`InterpConfig::blend`] rather than snapped to.
//!
//! Sans-IO: fed arrivals with their local time, asked for the state at a local time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use glam::Vec3;

use super::AvatarState;

/// Updates kept: two seconds at 30 Hz.
const KEEP: usize = 64;
/// Arrivals the clock offset and jitter are measured over.
const OFFSET_WINDOW: usize = 64;

/// How a receiver shows avatars.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InterpConfig {
    /// The least interpolation delay (default 100 ms).
    pub delay: Duration,
    /// How far past the newest update the avatar keeps moving along its velocity before it
    /// holds still (default 250 ms).
    pub max_extrapolation: Duration,
    /// How long a correction takes to blend in (default 100 ms).
    pub blend: Duration,
}

impl Default for InterpConfig {
    fn default() -> Self {
        InterpConfig {
            delay: Duration::from_millis(100),
            max_extrapolation: Duration::from_millis(250),
            blend: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Sender's clock, seconds.
    at: f64,
    state: AvatarState,
}

/// One neighbour's avatar as shown.
#[derive(Debug, Clone)]
pub struct Interpolator {
    cfg: InterpConfig,
    /// Local time all times are measured from.
    epoch: Instant,
    samples: VecDeque<Sample>,
    /// Arrival delays (local arrival − sender time), newest last.
    delays: VecDeque<f64>,
    /// The smallest of them: the clock offset with the least queueing.
    quickest: f64,
    /// The interpolation delay they and the update interval give ([`Interpolator::delay`]),
    /// refitted at each arrival rather than at each read.
    delay: Duration,
    /// A correction being blended in: the offset at its start, and when it started.
    correction: Option<(Vec3, f64)>,
}

impl Interpolator {
    /// Nothing shown yet; `epoch` is any local instant before the first arrival.
    pub fn new(cfg: InterpConfig, epoch: Instant) -> Interpolator {
        Interpolator {
            cfg,
            epoch,
            samples: VecDeque::new(),
            delays: VecDeque::new(),
            quickest: 0.0,
            delay: cfg.delay,
            correction: None,
        }
    }

    fn local(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.epoch).as_secs_f64()
    }

    /// Whether any update has arrived.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The sender's state stamped `at` seconds on its clock arrived at `now`.
    pub fn push(&mut self, now: Instant, at: f64, state: AvatarState) {
        let local = self.local(now);
        if self.delays.len() == OFFSET_WINDOW {
            self.delays.pop_front();
        }
        self.delays.push_back(local - at);
        if self.samples.iter().any(|s| s.at == at) {
            self.refit();
            return;
        }
        // What was shown until now, to blend from.
        let before = (!self.samples.is_empty()).then(|| self.raw(self.render_time(local)).position);
        let i = self.samples.iter().position(|s| s.at > at).unwrap_or(self.samples.len());
        self.samples.insert(i, Sample { at, state });
        while self.samples.len() > KEEP {
            self.samples.pop_front();
        }
        self.refit();
        if let Some(before) = before {
            let after = self.raw(self.render_time(local)).position;
            let pending = self.pending_correction(local);
            let jump = before + pending - after;
            self.correction = (jump.length_squared() > 1e-10).then_some((jump, local));
        }
    }

    /// The interpolation delay now: the configured least, or more when arrivals jitter.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// Fits the clock offset and the delay to the arrivals so far.
    fn refit(&mut self) {
        let Some(&min) = self.delays.iter().min_by(|a, b| a.total_cmp(b)) else { return };
        self.quickest = min;
        // Nine arrivals in ten come within this much of the quickest; the interpolation needs
        // the next update there one interval ahead. A percentile, so that one update held up
        // for seconds does not throw the whole view back.
        let mut extra: Vec<f64> = self.delays.iter().map(|d| d - min).collect();
        extra.sort_by(f64::total_cmp);
        let p90 = extra[(extra.len() - 1) * 9 / 10];
        let base = self.cfg.delay.as_secs_f64();
        // A peer's clock is its own: stamps far apart must not make a duration that panics.
        self.delay = Duration::try_from_secs_f64(base.max(p90 + self.interval())).unwrap_or(Duration::MAX);
    }

    /// The sender's update interval, from the newest updates.
    fn interval(&self) -> f64 {
        let n = self.samples.len();
        if n < 2 {
            return 0.0;
        }
        let span = self.samples[n - 1].at - self.samples[n.saturating_sub(8)].at;
        span / (n.min(8) - 1) as f64
    }

    /// The render time on the sender's clock for local time `local`.
    fn render_time(&self, local: f64) -> f64 {
        local - self.quickest - self.delay.as_secs_f64()
    }

    fn pending_correction(&self, local: f64) -> Vec3 {
        let Some((offset, since)) = self.correction else { return Vec3::ZERO };
        let blend = self.cfg.blend.as_secs_f64();
        let left = if blend > 0.0 { 1.0 - ((local - since) / blend).clamp(0.0, 1.0) } else { 0.0 };
        offset * left as f32
    }

    /// The sender's time (seconds on its clock) shown at local time `now`, once an update has
    /// arrived.
    pub fn render_at(&self, now: Instant) -> Option<f64> {
        (!self.samples.is_empty()).then(|| self.render_time(self.local(now)))
    }

    /// The avatar to show at local time `now`, if any update has arrived.
    pub fn state_at(&self, now: Instant) -> Option<AvatarState> {
        if self.samples.is_empty() {
            return None;
        }
        let local = self.local(now);
        let mut s = self.raw(self.render_time(local));
        s.position += self.pending_correction(local);
        Some(s)
    }

    /// The avatar at sender time `t` from the samples alone.
    fn raw(&self, t: f64) -> AvatarState {
        let (Some(first), Some(last)) = (self.samples.front(), self.samples.back()) else {
            return AvatarState::default();
        };
        if t <= first.at {
            return first.state;
        }
        if t >= last.at {
            let ahead = (t - last.at).min(self.cfg.max_extrapolation.as_secs_f64()) as f32;
            let mut s = last.state;
            s.position += s.velocity * ahead;
            return s;
        }
        let i = self.samples.iter().position(|s| s.at > t).unwrap_or(self.samples.len() - 1);
        let (a, b) = (self.samples[i - 1], self.samples[i]);
        let f = ((t - a.at) / (b.at - a.at)) as f32;
        AvatarState {
            position: a.state.position.lerp(b.state.position, f),
            orientation: a.state.orientation.slerp(b.state.orientation, f),
            velocity: a.state.velocity.lerp(b.state.velocity, f),
            anim: if f < 0.5 { a.state.anim } else { b.state.anim },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::avatar::movement::Mover;

    const MS: Duration = Duration::from_millis(1);

    /// A walker served at 30 Hz over a link of `latency` plus up to `jitter`, each update
    /// dropped when `lost(i)`; returns the worst and the 99th-percentile distance between what
    /// is shown every 10 ms and where the sender really was at the render time.
    fn run(latency: Duration, jitter: Duration, lost: impl Fn(usize) -> bool) -> (f32, f32, Duration) {
        let t0 = Instant::now();
        let mut interp = Interpolator::new(InterpConfig::default(), t0);
        let mut m = Mover::new(11, 200.0);
        let truth: Vec<AvatarState> = (0..30 * 60).map(|_| m.step(1.0 / 30.0)).collect();
        let mut arrivals: Vec<(Duration, usize)> = (0..truth.len())
            .filter(|&i| !lost(i))
            .map(|i| {
                // A jitter that is the same for every run: a hash of the index.
                let j = jitter.mul_f64(((i * 7919) % 101) as f64 / 100.0);
                (MS * (i as u32 * 100 / 3) + latency + j, i)
            })
            .collect();
        arrivals.sort();
        let mut errors = Vec::new();
        let mut next = 0;
        let mut t = Duration::from_secs(2);
        while t < Duration::from_secs(58) {
            while next < arrivals.len() && arrivals[next].0 <= t {
                let i = arrivals[next].1;
                interp.push(t0 + arrivals[next].0, i as f64 / 30.0, truth[i]);
                next += 1;
            }
            let shown = interp.state_at(t0 + t).unwrap();
            // Where the sender was at the render time (between two true states).
            let render = t.as_secs_f64() - latency.as_secs_f64() - interp.delay().as_secs_f64();
            let k = (render * 30.0).floor().max(0.0) as usize;
            let f = (render * 30.0 - k as f64) as f32;
            let want = truth[k].position.lerp(truth[(k + 1).min(truth.len() - 1)].position, f);
            errors.push(shown.position.distance(want));
            t += 10 * MS;
        }
        errors.sort_by(f32::total_cmp);
        (errors[errors.len() - 1], errors[errors.len() * 99 / 100], interp.delay())
    }

    #[test]
    fn on_a_steady_link_the_avatar_is_shown_where_it_was() {
        let (worst, _, delay) = run(40 * MS, Duration::ZERO, |_| false);
        assert!(worst < 0.02, "off by {worst} m");
        assert_eq!(delay, InterpConfig::default().delay);
    }

    #[test]
    fn jitter_grows_the_delay_and_loss_is_bridged() {
        let (_, p99, delay) = run(40 * MS, 120 * MS, |i| i % 10 == 3 || i % 37 == 0);
        assert!(p99 < 0.10, "p99 {p99} m");
        assert!(delay > 120 * MS && delay < 200 * MS, "delay {delay:?}");
    }

    #[test]
    fn past_the_newest_update_it_extrapolates_then_holds_and_a_late_update_is_blended() {
        let t0 = Instant::now();
        let mut interp = Interpolator::new(InterpConfig::default(), t0);
        let walking =
            |x: f32| AvatarState { position: Vec3::new(x, 0.0, 0.0), velocity: Vec3::X, ..Default::default() };
        for i in 0..10 {
            interp.push(t0 + MS * (i * 33), f64::from(i) * 0.033, walking(i as f32 * 0.033));
        }
        let last = 9.0f32 * 0.033;
        let at = |ms: u32| interp.state_at(t0 + MS * ms).unwrap().position.x;
        // The delay is 100 ms: 150 ms after the last update, 50 ms of extrapolation.
        assert!((at(297 + 150) - (last + 0.05)).abs() < 0.005, "{}", at(447));
        // Past 250 ms of extrapolation it holds.
        assert!((at(297 + 1000) - (last + 0.25)).abs() < 0.005);
        assert_eq!(at(297 + 1000), at(297 + 2000));
        // The avatar had stopped: an update saying so moves it back, but over the blend time.
        let shown = at(297 + 2000);
        interp.push(
            t0 + MS * 2297,
            f64::from(last) + 0.033,
            AvatarState { position: Vec3::new(last, 0.0, 0.0), ..Default::default() },
        );
        let just_after = interp.state_at(t0 + MS * 2298).unwrap().position.x;
        assert!((just_after - shown).abs() < 0.01, "snapped from {shown} to {just_after}");
        let settled = interp.state_at(t0 + MS * 2500).unwrap().position.x;
        assert!((settled - last).abs() < 0.005, "{settled}");
    }
}
