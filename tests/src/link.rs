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
    /// Bursty loss: a two-state Markov chain (Gilbert–Elliott), stepped once per datagram.
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
}

impl Link {
    pub(crate) fn new(cfg: LinkConfig) -> Link {
        Link { cfg, bad: false, busy_until: None }
    }

    /// When each copy of a `len`-byte datagram sent at `now` arrives (none if it is lost).
    pub(crate) fn transmit(&mut self, now: Instant, len: usize, rng: &mut Xoshiro256PlusPlus) -> Vec<Instant> {
        let lost = match self.cfg.loss {
            Loss::None => false,
            Loss::Uniform(p) => rng.random_bool(p),
            Loss::GilbertElliott { good_to_bad, bad_to_good, loss_good, loss_bad } => {
                let flip = rng.random_bool(if self.bad { bad_to_good } else { good_to_bad });
                self.bad ^= flip;
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
