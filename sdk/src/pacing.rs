//! Pacing and rate control of one path of a striped (Bulk) VC.
//!
//! A bulk transfer sent as fast as renet emits it overruns any path narrower than the sender's
//! link, and a relay's queue drops the excess; realtime VCs that share the path suffer the
//! queueing. So each path of a paced VC has a [`Pacer`]: a queue of sealed frames released by
//! a token bucket at the path's rate, and a controller that sets that rate from what the peer
//! reports it received.
//!
//! The measurement rides on the path's pings. When a ping leaves, the pacer notes how many
//! data bytes it has released on the path so far; the peer answers with the data bytes it has
//! received over that path (in the authenticated pong), and the path is FIFO, so the two
//! counts describe the same stream. Over a window of about one RTT that gives the delivery
//! rate and the loss, and the pong's RTT less the path's minimum gives the queueing delay.
//!
//! The controller is deliberately small (slow start, then additive probing, cut to 90% of the
//! measured delivery rate on congestion), closer to BBR's delivery-rate model than to
//! loss-halving: congestion is a queue building up (the first signal, long before a drop) or
//! loss above [`LOSS_CUT`]. A lower loss is treated as the path's own (wireless, say) and
//! left to renet's retransmission, so a lossy path is not starved to nothing.
//!
//! No crate offers a congestion controller apart from a transport (quinn's are tied to its
//! connection and its packet-number acks), hence this one.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Rate a path starts at before anything is measured, bytes per second.
pub const INITIAL_RATE: f64 = 250_000.0;
/// The controller never goes below this, so that a path keeps being measured.
pub const MIN_RATE: f64 = 20_000.0;
const MAX_RATE: f64 = 1e9;
/// Loss in one window above which the path counts as congested.
pub const LOSS_CUT: f64 = 0.10;
/// The rate after a congestion signal, as a share of the measured delivery rate.
const CUT_TO: f64 = 0.9;
/// Growth per RTT in congestion avoidance.
const PROBE_GAIN: f64 = 0.05;
/// Queueing delay that counts as congestion: the larger of this and half the minimum RTT.
const DELAY_CUT: Duration = Duration::from_millis(10);
/// Pongs that must all show queueing before it counts, in slow start and after.
const QUEUE_PONGS_SLOW_START: usize = 1;
const QUEUE_PONGS_AVOIDANCE: usize = 4;
/// The window the minimum RTT is taken over.
const MIN_RTT_FOR: Duration = Duration::from_secs(10);
/// Smallest window a rate is measured over.
const MIN_WINDOW: Duration = Duration::from_millis(20);
/// Bytes of data that must have been sent in a window before its loss counts: frames that
/// jitter carries past the ping behind them look lost until the next one, and a few of those
/// must not look like 10 % loss.
const MIN_LOSS_BYTES: u64 = 64 * 1200;
/// Largest burst the token bucket allows: the larger of this and [`BURST_TIME`] at the rate.
const BURST_BYTES: f64 = 4.0 * 1300.0;
const BURST_TIME: f64 = 0.002;
/// Pings remembered for matching their pongs.
const MAX_PINGS: usize = 32;

/// One measurement point: when a ping left, how much had been sent before it, how much the
/// peer had received when it arrived, and when its pong came back. Delivery is timed by the
/// pongs: pings queue behind data, so their departures would understate the time the data took.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    sent: u64,
    delivered: u64,
    acked: Instant,
    /// The pacing rate when the ping left.
    rate: f64,
}

/// The minimum of values seen over a sliding time window (a monotonic queue).
#[derive(Debug, Default)]
pub(crate) struct WindowedMin {
    q: VecDeque<(Duration, Instant)>,
}

impl WindowedMin {
    /// Records `v` seen at `now`, forgetting what is older than `window`.
    pub(crate) fn push(&mut self, now: Instant, v: Duration, window: Duration) {
        while self.q.back().is_some_and(|b| b.0 >= v) {
            self.q.pop_back();
        }
        self.q.push_back((v, now));
        while self.q.front().is_some_and(|f| now.saturating_duration_since(f.1) > window) {
            self.q.pop_front();
        }
    }

    /// The minimum over the window, as of the last push.
    pub(crate) fn get(&self) -> Option<Duration> {
        self.q.front().map(|f| f.0)
    }
}

/// What a pacer reports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PacerStats {
    /// The pacing rate, bytes per second.
    pub rate: f64,
    /// The delivery rate measured over the last window, bytes per second.
    pub delivery_rate: f64,
    /// Loss measured over the last window.
    pub loss: f64,
    /// Whether the controller is still in slow start.
    pub slow_start: bool,
    /// Congestion signals acted on.
    pub cuts: u64,
    /// The delivery rate measured when the path last showed congestion: its bandwidth as
    /// far as it is known, bytes per second.
    pub capacity: Option<f64>,
    /// Bytes waiting in the queue.
    pub queued: usize,
}

/// The pacer of one path. See the module docs.
#[derive(Debug)]
pub struct Pacer {
    rate: f64,
    slow_start: bool,
    tokens: f64,
    refilled: Instant,
    queue: VecDeque<Vec<u8>>,
    queued: usize,
    /// Data bytes released so far.
    sent: u64,
    pings: VecDeque<(u32, Sample)>,
    samples: VecDeque<Sample>,
    /// RTTs of the latest pongs, newest last.
    recent: VecDeque<Duration>,
    min_rtt: WindowedMin,
    /// Windows that began before this instant saw the rate before the last cut.
    cut_at: Option<Instant>,
    grown_at: Instant,
    delivery_rate: f64,
    loss: f64,
    cuts: u64,
    capacity: Option<f64>,
}

impl Pacer {
    /// A pacer at [`INITIAL_RATE`] in slow start.
    pub fn new(now: Instant) -> Pacer {
        Pacer {
            rate: INITIAL_RATE,
            slow_start: true,
            tokens: BURST_BYTES,
            refilled: now,
            queue: VecDeque::new(),
            queued: 0,
            sent: 0,
            pings: VecDeque::new(),
            samples: VecDeque::new(),
            recent: VecDeque::new(),
            min_rtt: WindowedMin::default(),
            cut_at: None,
            grown_at: now,
            delivery_rate: 0.0,
            loss: 0.0,
            cuts: 0,
            capacity: None,
        }
    }

    /// The pacing rate, bytes per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The path's bandwidth as far as it is known: what it delivered when it last showed
    /// congestion, bytes per second.
    pub fn capacity(&self) -> Option<f64> {
        self.capacity
    }

    /// Data bytes released so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Bytes queued.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// How long the queue takes to drain at the current rate, with `extra` more bytes in it.
    pub fn drain_time(&self, extra: usize) -> Duration {
        Duration::from_secs_f64((self.queued + extra) as f64 / self.rate)
    }

    /// What it reports.
    pub fn stats(&self) -> PacerStats {
        PacerStats {
            rate: self.rate,
            delivery_rate: self.delivery_rate,
            loss: self.loss,
            slow_start: self.slow_start,
            cuts: self.cuts,
            capacity: self.capacity,
            queued: self.queued,
        }
    }

    /// Queues a sealed frame.
    pub fn enqueue(&mut self, frame: Vec<u8>) {
        self.queued += frame.len();
        self.queue.push_back(frame);
    }

    /// Empties the queue (the path left the sending set; its frames go elsewhere).
    pub fn take_queue(&mut self) -> VecDeque<Vec<u8>> {
        self.queued = 0;
        std::mem::take(&mut self.queue)
    }

    fn burst(&self) -> f64 {
        (self.rate * BURST_TIME).max(BURST_BYTES)
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst());
    }

    /// The next frame the rate allows now.
    pub fn poll_release(&mut self, now: Instant) -> Option<Vec<u8>> {
        self.refill(now);
        let len = self.queue.front()?.len();
        if self.tokens < len as f64 {
            return None;
        }
        self.tokens -= len as f64;
        self.queued -= len;
        self.sent += len as u64;
        self.queue.pop_front()
    }

    /// When the frame at the head of the queue may leave.
    pub fn next_release(&self, now: Instant) -> Option<Instant> {
        let len = self.queue.front()?.len() as f64;
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        let tokens = (self.tokens + elapsed * self.rate).min(self.burst());
        let wait = ((len - tokens) / self.rate).max(0.0);
        // Round up to the microsecond, so that a wake-up at that instant finds the tokens.
        Some(now + Duration::from_micros((wait * 1e6).ceil() as u64))
    }

    /// Ping `id` left on this path now, behind every frame released so far.
    pub fn on_ping(&mut self, now: Instant, id: u32) {
        if self.pings.len() >= MAX_PINGS {
            self.pings.pop_front();
        }
        self.pings.push_back((id, Sample { at: now, sent: self.sent, delivered: 0, acked: now, rate: self.rate }));
    }

    /// The pong for ping `id` came back after `rtt`, saying the peer had received
    /// `delivered` data bytes over this path when the ping reached it. `srtt` is the path's
    /// smoothed RTT.
    pub fn on_pong(&mut self, now: Instant, id: u32, delivered: u64, rtt: Duration, srtt: Duration) {
        let Some(at) = self.pings.iter().position(|(p, _)| *p == id) else { return };
        let (_, mut s) = self.pings[at];
        self.pings.drain(..=at);
        // The peer cannot have received more than was sent; a lying peer only slows itself.
        s.delivered = delivered.min(s.sent);
        s.acked = now;
        self.min_rtt.push(now, rtt, MIN_RTT_FOR);
        let min_rtt = self.min_rtt.get().unwrap_or(rtt);
        if self.recent.len() >= QUEUE_PONGS_AVOIDANCE {
            self.recent.pop_front();
        }
        self.recent.push_back(rtt);
        if self.samples.back().is_some_and(|b| b.delivered > s.delivered) {
            // The peer's count went backwards (its side of the VC restarted, or it lies):
            // measure afresh from here rather than wait for it to catch up.
            self.samples.clear();
        }
        self.samples.push_back(s);
        // Measure over the newest window of at least one RTT.
        let window = srtt.max(MIN_WINDOW);
        let Some(base_at) = self.samples.iter().rposition(|b| now.saturating_duration_since(b.acked) >= window) else {
            return;
        };
        self.samples.drain(..base_at);
        let base = self.samples[0];
        let dt = now.saturating_duration_since(base.acked).as_secs_f64();
        let dsent = s.sent - base.sent;
        let ddel = s.delivered.saturating_sub(base.delivered).min(dsent);
        self.delivery_rate = ddel as f64 / dt;
        self.loss = if dsent >= MIN_LOSS_BYTES { 1.0 - ddel as f64 / dsent as f64 } else { 0.0 };
        // Only windows wholly after the last cut judge the rate it set, and only a rate in
        // use: an idle or game-limited path proves nothing either way.
        // (In use is judged on the sending side's clock: the pongs' spacing stretches as a
        // queue builds.)
        let sending_dt = s.at.saturating_duration_since(base.at).as_secs_f64();
        // The rate is the one at the window's start: slow start raises it within the window.
        if self.cut_at.is_some_and(|c| base.at < c) || (dsent as f64) < 0.7 * base.rate * sending_dt {
            return;
        }
        // A queue shows as every recent pong being late; jitter makes only some late. Slow
        // start looks at fewer pongs, since the rate doubles every RTT while it waits.
        let n = if self.slow_start { QUEUE_PONGS_SLOW_START } else { QUEUE_PONGS_AVOIDANCE };
        let lowest = self.recent.iter().rev().take(n).min().copied().unwrap_or(rtt);
        let queueing = lowest.saturating_sub(min_rtt);
        let threshold = DELAY_CUT.max(min_rtt / 4);
        let congested = self.loss > LOSS_CUT || queueing > threshold;
        if congested {
            self.capacity = Some(self.delivery_rate);
            self.rate = (self.delivery_rate * CUT_TO).clamp(MIN_RATE, MAX_RATE);
            self.slow_start = false;
            self.cut_at = Some(now);
            self.cuts += 1;
            self.grown_at = now;
            return;
        }
        if queueing > threshold / 2 || rtt.saturating_sub(min_rtt) > threshold / 2 {
            // A queue may be building (this pong alone is enough to hold; it takes several to
            // cut): hold the rate until it drains or passes the threshold, rather than probe
            // into it.
            return;
        }
        if self.capacity.is_some_and(|c| self.delivery_rate > c) {
            // The path carries more than it did when it last filled: that width is stale.
            self.capacity = None;
        }
        let rounds =
            (now.saturating_duration_since(self.grown_at).as_secs_f64() / srtt.as_secs_f64().max(1e-4)).min(1.0);
        self.grown_at = now;
        let gain = if self.slow_start { 2f64.powf(rounds) } else { 1.0 + PROBE_GAIN * rounds };
        self.rate = (self.rate * gain).min(MAX_RATE);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A bottleneck of `capacity` bytes/s with a `buffer` of queue and a base RTT, fed by a
    /// pacer that always has data; pings every half RTT. Returns the pacer and the bytes
    /// delivered and dropped.
    fn run(capacity: f64, buffer: Duration, base_rtt: Duration, for_: Duration) -> (Pacer, u64, u64) {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        let mut now = t0;
        let step = Duration::from_micros(200);
        let (mut busy_until, mut delivered, mut dropped) = (t0, 0u64, 0u64);
        // Pongs in flight: (arrives at, ping id, delivered when the ping got through, rtt).
        let mut pongs: VecDeque<(Instant, u32, u64, Duration)> = VecDeque::new();
        let mut arrivals: VecDeque<(Instant, u64)> = VecDeque::new();
        let (mut next_ping, mut ping_id) = (t0, 0u32);
        while now < t0 + for_ {
            while p.queued() < 20_000 {
                p.enqueue(vec![0; 1200]);
            }
            while let Some(f) = p.poll_release(now) {
                let start = busy_until.max(now);
                if start.saturating_duration_since(now) > buffer {
                    dropped += f.len() as u64;
                    continue;
                }
                busy_until = start + Duration::from_secs_f64(f.len() as f64 / capacity);
                arrivals.push_back((busy_until + base_rtt / 2, f.len() as u64));
            }
            while arrivals.front().is_some_and(|a| a.0 <= now) {
                delivered += arrivals.pop_front().unwrap().1;
            }
            if now >= next_ping {
                p.on_ping(now, ping_id);
                // The ping queues behind the data; its pong comes back unqueued.
                let reaches = busy_until.max(now) + base_rtt / 2;
                let bytes_by_then = delivered + arrivals.iter().filter(|a| a.0 <= reaches).map(|a| a.1).sum::<u64>();
                pongs.push_back((reaches + base_rtt / 2, ping_id, bytes_by_then, reaches + base_rtt / 2 - now));
                ping_id += 1;
                next_ping = now + base_rtt / 2;
            }
            while pongs.front().is_some_and(|x| x.0 <= now) {
                let (_, id, d, rtt) = pongs.pop_front().unwrap();
                p.on_pong(now, id, d, rtt, base_rtt);
            }
            now += step;
        }
        (p, delivered, dropped)
    }

    #[test]
    fn converges_on_the_bottleneck_rate_without_filling_its_queue() {
        let capacity = 2_000_000.0;
        let (p, delivered, dropped) =
            run(capacity, Duration::from_millis(50), Duration::from_millis(40), Duration::from_secs(10));
        let s = p.stats();
        assert!(!s.slow_start);
        assert!((0.7 * capacity..=1.2 * capacity).contains(&s.rate), "{s:?}");
        // At least 80% of the capacity used over the whole run, including the ramp.
        assert!(delivered as f64 > 0.8 * capacity * 10.0, "delivered {delivered}");
        // Most of what is dropped is the overshoot when slow start ends.
        assert!((dropped as f64) < 0.05 * delivered as f64, "dropped {dropped} of {delivered}");
    }

    #[test]
    fn a_small_buffer_is_found_by_loss() {
        // 2 ms of buffer on a 40 ms path: the queue never shows; loss does.
        let capacity = 1_000_000.0;
        let (p, delivered, dropped) =
            run(capacity, Duration::from_millis(2), Duration::from_millis(40), Duration::from_secs(10));
        assert!(p.stats().cuts > 0);
        assert!(delivered as f64 > 0.7 * capacity * 10.0, "delivered {delivered}");
        assert!((dropped as f64) < 0.15 * delivered as f64, "dropped {dropped} of {delivered}");
    }

    #[test]
    fn releases_at_the_rate_after_the_burst() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        for _ in 0..100 {
            p.enqueue(vec![0; 1000]);
        }
        let mut released = 0;
        while p.poll_release(t0).is_some() {
            released += 1;
        }
        assert_eq!(released, (BURST_BYTES / 1000.0) as usize);
        let at = p.next_release(t0).unwrap();
        let left = BURST_BYTES - 1000.0 * released as f64;
        assert_eq!(at - t0, Duration::from_micros(((1000.0 - left) / INITIAL_RATE * 1e6).ceil() as u64));
        assert!(p.poll_release(at).is_some());
        assert!(p.poll_release(at).is_none());
    }

    #[test]
    fn an_idle_path_does_not_grow_its_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        let rtt = Duration::from_millis(20);
        for i in 0..100u32 {
            let now = t0 + rtt * i;
            p.on_ping(now, i);
            p.on_pong(now + rtt, i, 0, rtt, rtt);
        }
        assert_eq!(p.rate(), INITIAL_RATE);
        assert!(p.stats().slow_start);
    }

    /// Feeds a pacer that sends at its full rate over a path with RTT `rtt(i)` for ping `i`
    /// and no bottleneck (everything sent is delivered).
    fn unlimited(rtt: impl Fn(u32) -> Duration, pings: u32) -> Pacer {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        let mut now = t0;
        let mut inflight: VecDeque<(Instant, u32, u64, Duration)> = VecDeque::new();
        for i in 0..pings {
            let step = Duration::from_millis(10);
            // Release everything the rate allows over the step.
            let mut t = now;
            while t < now + step {
                while p.queued() < 50_000 {
                    p.enqueue(vec![0; 1200]);
                }
                while p.poll_release(t).is_some() {}
                t += Duration::from_micros(100);
            }
            now += step;
            p.on_ping(now, i);
            inflight.push_back((now + rtt(i), i, p.sent, rtt(i)));
            inflight.make_contiguous().sort_by_key(|x| x.0);
            while inflight.front().is_some_and(|x| x.0 <= now) {
                let (at, id, d, r) = inflight.pop_front().unwrap();
                p.on_pong(at, id, d, r, Duration::from_millis(27));
            }
        }
        p
    }

    #[test]
    fn jitter_alone_is_not_congestion() {
        // RTT swinging between 20 and 35 ms with nothing queued: no cut, no capacity.
        let p = unlimited(|i| Duration::from_millis(20 + (u64::from(i).wrapping_mul(2_654_435_761) >> 7) % 16), 400);
        let s = p.stats();
        // At most one early exit from slow start; no lasting width.
        assert!(s.cuts <= 1, "{s:?}");
        assert_eq!(s.capacity, None);
        assert!(s.rate > 10.0 * INITIAL_RATE, "{s:?}");
    }

    #[test]
    fn an_idle_path_with_a_late_pong_keeps_its_rate_and_no_capacity() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        for i in 0..40u32 {
            let now = t0 + Duration::from_millis(250) * i;
            p.on_ping(now, i);
            let rtt = Duration::from_millis(if i == 20 { 60 } else { 20 });
            p.on_pong(now + rtt, i, 0, rtt, Duration::from_millis(20));
        }
        assert_eq!(p.stats().cuts, 0);
        assert_eq!(p.capacity(), None);
        assert_eq!(p.rate(), INITIAL_RATE);
    }

    #[test]
    fn a_count_that_goes_backwards_restarts_the_measurement() {
        // The peer reports a huge count once, then honest ones: the controller must keep
        // working (here: grow on a clean path) instead of waiting for the count to catch up.
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        let rtt = Duration::from_millis(20);
        let mut now = t0;
        for i in 0..200u32 {
            let mut t = now;
            while t < now + Duration::from_millis(10) {
                while p.queued() < 50_000 {
                    p.enqueue(vec![0; 1200]);
                }
                while p.poll_release(t).is_some() {}
                t += Duration::from_micros(100);
            }
            now += Duration::from_millis(10);
            p.on_ping(now, i);
            let delivered = if i == 5 { u64::MAX } else { p.sent };
            p.on_pong(now + rtt, i, delivered, rtt, rtt);
        }
        assert!(p.rate() > 10.0 * INITIAL_RATE, "{:?}", p.stats());
    }

    #[test]
    fn a_peer_claiming_more_than_was_sent_changes_nothing() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        p.on_ping(t0, 1);
        p.on_pong(t0 + Duration::from_millis(20), 1, u64::MAX, Duration::from_millis(20), Duration::from_millis(20));
        assert_eq!(p.rate(), INITIAL_RATE);
        assert_eq!(p.stats().delivery_rate, 0.0);
    }
}
