//! Link models for the simulator: latency, jitter, loss (uniform or bursty Gilbert–Elliott),
//! reordering, duplication and a bandwidth limit with a bounded queue.

use std::time::{Duration, Instant};

use rand::rngs::Xoshiro256PlusPlus;
use rand::{Rng, RngExt};

/// How a link loses datagrams.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Loss {
    /// Never.
    None,
    /// Each datagram independently with this probability.
    Uniform(f64),
    /// Bursty loss: a two-state Markov chain (Gilbert–Elliott), stepped once per datagram, or
    /// once per 50 ms between sparser ones.
    GilbertElliott {
        /// Chance to go from the good state to the bad one.
        good_to_bad: f64,
        /// Chance to go back.
        bad_to_good: f64,
        /// Loss in the good state.
        loss_good: f64,
        /// Loss in the bad state.
        loss_bad: f64,
    },
}

impl Loss {
    /// 2 % loss in bursts of four datagrams on average: the bursty loss the avatar and
    /// fan-out crowds are measured under.
    pub const BURSTY: Loss =
        Loss::GilbertElliott { good_to_bad: 0.005, bad_to_good: 0.25, loss_good: 0.0, loss_bad: 1.0 };
}

/// One direction of a link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkConfig {
    /// One-way propagation delay.
    pub latency: Duration,
    /// Extra delay drawn uniformly from zero to this, per datagram.
    pub jitter: Duration,
    /// Loss model.
    pub loss: Loss,
    /// Chance that a datagram is held back by up to one extra latency (reordering).
    pub reorder: f64,
    /// Chance that a datagram is delivered twice.
    pub duplicate: f64,
    /// Bytes per second the link carries; `None` for unlimited.
    pub bandwidth: Option<u64>,
    /// Longest a datagram may wait behind others before the link drops it (tail drop).
    pub queue: Duration,
    /// Chance that a datagram is held up by the extra delay given: a host that was not
    /// scheduled in time (a busy CPU, a laptop waking), which a loopback path sees as a gap.
    pub stall: (f64, Duration),
}

impl LinkConfig {
    /// A clean link with this one-way latency.
    pub fn latency(latency: Duration) -> LinkConfig {
        LinkConfig {
            latency,
            jitter: Duration::ZERO,
            loss: Loss::None,
            reorder: 0.0,
            duplicate: 0.0,
            bandwidth: None,
            queue: Duration::from_millis(50),
            stall: (0.0, Duration::ZERO),
        }
    }

    /// The same link with a chance `p` per datagram of a stall of `d`.
    pub fn with_stalls(self, p: f64, d: Duration) -> LinkConfig {
        LinkConfig { stall: (p, d), ..self }
    }

    /// The same link with `loss`.
    pub fn with_loss(self, loss: Loss) -> LinkConfig {
        LinkConfig { loss, ..self }
    }

    /// The same link with `jitter`.
    pub fn with_jitter(self, jitter: Duration) -> LinkConfig {
        LinkConfig { jitter, ..self }
    }

    /// The same link limited to `bytes_per_sec`.
    pub fn with_bandwidth(self, bytes_per_sec: u64) -> LinkConfig {
        LinkConfig { bandwidth: Some(bytes_per_sec), ..self }
    }
}

/// A link direction with its state: the Gilbert–Elliott state and when its queue drains.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub(crate) cfg: LinkConfig,
    bad: bool,
    busy_until: Option<Instant>,
    /// When the last datagram was offered to it.
    last: Option<Instant>,
}

/// The Gilbert–Elliott chain steps once per datagram, and once per this much time between
/// datagrams when they are sparser. Stepping per datagram stands for time while datagrams flow
/// steadily; on a link that carries one every 200 ms (a 5 Hz stream) or every few seconds (a
/// bind retried with backoff), a burst of four datagrams would stretch over a second or a
/// quarter of a minute, where real bursts of loss (interference, a queue overflowing) last
/// tens of milliseconds. Links at 20 Hz and faster step exactly as before.
const STEP: Duration = Duration::from_millis(50);

/// The chance that a two-state chain that steps from good to bad with chance `p` and back
/// with `r` is in the other state after `steps` steps (at least one).
fn flip_chance(bad: bool, p: f64, r: f64, steps: f64) -> f64 {
    if steps <= 1.0 || p + r <= 0.0 {
        return if bad { r } else { p };
    }
    // The chain forgets where it was as (1 - p - r)^steps; it tends to bad with chance
    // p / (p + r).
    let bad_in_the_end = p / (p + r);
    let memory = (1.0 - p - r).max(0.0).powf(steps);
    let flip = if bad { (1.0 - bad_in_the_end) * (1.0 - memory) } else { bad_in_the_end * (1.0 - memory) };
    flip.clamp(0.0, 1.0)
}

impl Link {
    pub(crate) fn new(cfg: LinkConfig) -> Link {
        Link { cfg, bad: false, busy_until: None, last: None }
    }

    /// When each copy of a `len`-byte datagram sent at `now` arrives (none if it is lost).
    pub(crate) fn transmit(&mut self, now: Instant, len: usize, rng: &mut Xoshiro256PlusPlus) -> Vec<Instant> {
        let lost = match self.cfg.loss {
            Loss::None => false,
            Loss::Uniform(p) => rng.random_bool(p),
            Loss::GilbertElliott { good_to_bad, bad_to_good, loss_good, loss_bad } => {
                let steps =
                    self.last.map_or(1.0, |t| now.saturating_duration_since(t).as_secs_f64() / STEP.as_secs_f64());
                self.last = Some(now);
                let flip = flip_chance(self.bad, good_to_bad, bad_to_good, steps);
                self.bad ^= rng.random_bool(flip);
                rng.random_bool(if self.bad { loss_bad } else { loss_good })
            }
        };
        if lost {
            return Vec::new();
        }
        // Serialisation behind earlier datagrams on a limited link, with tail drop.
        let mut depart = now;
        if let Some(bw) = self.cfg.bandwidth {
            let start = self.busy_until.map_or(now, |b| b.max(now));
            if start.saturating_duration_since(now) > self.cfg.queue {
                return Vec::new();
            }
            let tx = Duration::from_nanos((len as u64).saturating_mul(1_000_000_000) / bw.max(1));
            depart = start + tx;
            self.busy_until = Some(depart);
        }
        let copies = if rng.random_bool(self.cfg.duplicate) { 2 } else { 1 };
        (0..copies)
            .map(|_| {
                let jitter = random_upto(rng, self.cfg.jitter);
                let held =
                    if rng.random_bool(self.cfg.reorder) { random_upto(rng, self.cfg.latency) } else { Duration::ZERO };
                let (p, d) = self.cfg.stall;
                let stalled = if p > 0.0 && rng.random_bool(p) { d } else { Duration::ZERO };
                depart + self.cfg.latency + jitter + held + stalled
            })
            .collect()
    }
}

fn random_upto(rng: &mut impl Rng, max: Duration) -> Duration {
    if max.is_zero() { Duration::ZERO } else { Duration::from_nanos(rng.random_range(0..=max.as_nanos() as u64)) }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn bursty() -> LinkConfig {
        LinkConfig::latency(Duration::from_millis(20)).with_loss(Loss::BURSTY)
    }

    /// Loss rate and mean burst length (in datagrams) of `n` datagrams `every` apart.
    fn losses(every: Duration, n: u32) -> (f64, f64) {
        let (mut link, mut rng) = (Link::new(bursty()), Xoshiro256PlusPlus::seed_from_u64(7));
        let t0 = Instant::now();
        let (mut lost, mut bursts, mut last_lost) = (0u32, 0u32, false);
        for i in 0..n {
            let gone = link.transmit(t0 + every * i, 100, &mut rng).is_empty();
            lost += u32::from(gone);
            bursts += u32::from(gone && !last_lost);
            last_lost = gone;
        }
        (f64::from(lost) / f64::from(n), f64::from(lost) / f64::from(bursts.max(1)))
    }

    #[test]
    fn bursts_are_in_datagrams_on_a_busy_link_and_in_time_on_a_sparse_one() {
        assert_eq!(flip_chance(true, 0.005, 0.25, 1.0), 0.25);
        assert_eq!(flip_chance(false, 0.005, 0.25, 0.3), 0.005);
        // Long silences forget the state: bad with the chain's own chance.
        assert!((flip_chance(false, 0.005, 0.25, 1e4) - 0.005 / 0.255).abs() < 1e-9);
        // The same share lost at 30 Hz and at 5 Hz; four datagrams a burst at 30 Hz, barely
        // more than one at 5 Hz, where 200 ms pass between datagrams.
        let (busy, busy_burst) = losses(Duration::from_micros(33_333), 400_000);
        let (sparse, sparse_burst) = losses(Duration::from_millis(200), 400_000);
        assert!((busy - 0.0196).abs() < 0.003 && (sparse - 0.0196).abs() < 0.003, "{busy} {sparse}");
        assert!((busy_burst - 4.0).abs() < 0.4, "{busy_burst}");
        assert!(sparse_burst < 1.5, "{sparse_burst}");
    }
}
