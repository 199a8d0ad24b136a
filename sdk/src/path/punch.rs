//! Hole punching of direct candidates.
//!
//! Until a direct candidate answers, it is probed every [`PUNCH_INTERVAL`], at most
//! [`PUNCH_PROBES`] times per attempt: both peers do this from the moment their keys agree, so
//! each side's first probes open its own NAT's mapping for the other's, and a later probe gets
//! through. An attempt that hears nothing has failed (the VCs stay relayed, and their stats say
//! so); the next attempt comes after [`PUNCH_RETRY`], doubling up to [`PUNCH_RETRY_MAX`], since
//! networks change. Once one direct candidate to a peer is open, the others that failed wait
//! until our network or the peer's addresses change: a second way through the NATs would cost
//! probes and add nothing.

use std::time::Duration;

/// How often a direct candidate that has not answered yet is probed.
pub const PUNCH_INTERVAL: Duration = Duration::from_millis(20);
/// Probes in one punching attempt (one second of them).
pub const PUNCH_PROBES: u32 = 50;
/// The wait before the second attempt; it doubles up to [`PUNCH_RETRY_MAX`].
pub const PUNCH_RETRY: Duration = Duration::from_secs(15);
/// The longest wait between attempts.
pub const PUNCH_RETRY_MAX: Duration = Duration::from_secs(600);

/// The wait after failed attempt `attempt` (the first is 1).
pub(crate) fn retry_wait(attempt: u32) -> Duration {
    PUNCH_RETRY.saturating_mul(1 << attempt.saturating_sub(1).min(10)).min(PUNCH_RETRY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_up_to_the_cap() {
        assert_eq!(retry_wait(1), PUNCH_RETRY);
        assert_eq!(retry_wait(2), PUNCH_RETRY * 2);
        assert_eq!(retry_wait(6), PUNCH_RETRY * 32);
        assert_eq!(retry_wait(7), PUNCH_RETRY_MAX);
        assert_eq!(retry_wait(u32::MAX), PUNCH_RETRY_MAX);
    }
}
