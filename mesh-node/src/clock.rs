//! Wall-clock time for sans-IO cores, which otherwise see only the monotonic `Instant`s their
//! driver passes in. Tickets expire in Unix seconds and trace stamps are Unix microseconds, so
//! the driver hands each core one anchor pairing an `Instant` with the Unix time it read then.

use std::time::{Duration, Instant};

/// Maps monotonic instants onto Unix time from one anchor reading.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    at: Instant,
    unix_us: u64,
}

impl WallClock {
    /// An anchor: at `at`, the Unix time was `unix_us` microseconds.
    pub fn new(at: Instant, unix_us: u64) -> WallClock {
        WallClock { at, unix_us }
    }

    /// Reads the system clock now; for drivers only.
    pub fn system() -> WallClock {
        let unix_us =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_micros()
                as u64;
        WallClock::new(Instant::now(), unix_us)
    }

    /// Unix microseconds at `now` (never before the anchor).
    pub fn unix_us(&self, now: Instant) -> u64 {
        self.unix_us + now.saturating_duration_since(self.at).as_micros() as u64
    }

    /// Unix seconds at `now`.
    pub fn unix_secs(&self, now: Instant) -> u64 {
        self.unix_us(now) / 1_000_000
    }

    /// The trace clock: Unix microseconds, wrapping at 32 bits (about 71 minutes).
    pub fn stamp_us(&self, now: Instant) -> u32 {
        self.unix_us(now) as u32
    }
}
