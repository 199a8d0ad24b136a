//! How fast one connection may send: a token bucket of messages.
//!
//! A connection that writes faster than its allowance is not cut off and loses nothing: its
//! reader waits for the next token before it reads on, so QUIC's flow control slows the
//! sender down, and memory for it stays within one stream window. A game client reports about
//! once a second; the default allowance leaves ample room for bursts of check-ins and RTTs.

use std::time::{Duration, Instant};

/// Messages per second a connection may send, and the burst it may send at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained messages per second.
    pub per_s: f64,
    /// Messages that may arrive back to back after a quiet spell.
    pub burst: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit { per_s: 20.0, burst: 40.0 }
    }
}

impl RateLimit {
    /// Checks that both figures are finite and positive, and the burst holds a message.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.per_s.is_finite() && self.per_s > 0.0) {
            return Err(format!("messages_per_s must be above zero, got {}", self.per_s));
        }
        if !(self.burst.is_finite() && self.burst >= 1.0) {
            return Err(format!("burst must be at least 1, got {}", self.burst));
        }
        Ok(())
    }
}

/// One connection's bucket.
#[derive(Debug, Clone)]
pub struct Bucket {
    limit: RateLimit,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(limit: RateLimit, now: Instant) -> Bucket {
        Bucket { limit, tokens: limit.burst, at: now }
    }

    /// Takes a token for one message: `None` if it may go now, or how long to wait before
    /// asking again.
    pub fn take(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.limit.per_s).min(self.limit.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / self.limit.per_s))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_burst_goes_through_then_the_rate_holds() {
        let t0 = Instant::now();
        let mut b = Bucket::new(RateLimit { per_s: 10.0, burst: 5.0 }, t0);
        for _ in 0..5 {
            assert_eq!(b.take(t0), None);
        }
        let wait = b.take(t0).expect("the burst is spent");
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        // After the wait one message goes, and the next waits a full interval again.
        let t1 = t0 + wait;
        assert_eq!(b.take(t1), None);
        assert!(b.take(t1).is_some());
        // Over 10 simulated seconds of asking every millisecond, about 10/s get through.
        let mut taken = 0;
        for ms in 1..=10_000 {
            if b.take(t1 + Duration::from_millis(ms)).is_none() {
                taken += 1;
            }
        }
        assert!((99..=101).contains(&taken), "{taken}");
    }

    #[test]
    fn a_quiet_spell_refills_only_up_to_the_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(RateLimit { per_s: 100.0, burst: 3.0 }, t0);
        let later = t0 + Duration::from_secs(60);
        let free = (0..10).take_while(|_| b.take(later).is_none()).count();
        assert_eq!(free, 3);
    }

    #[test]
    fn bad_limits_are_named() {
        assert!(RateLimit { per_s: 0.0, burst: 5.0 }.validate().unwrap_err().contains("messages_per_s"));
        assert!(RateLimit { per_s: 5.0, burst: 0.5 }.validate().unwrap_err().contains("burst"));
        assert!(RateLimit { per_s: f64::NAN, burst: 5.0 }.validate().is_err());
        assert!(RateLimit::default().validate().is_ok());
    }
}
