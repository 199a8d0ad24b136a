//! Paths to a peer: what they measure, and which of them each virtual connection uses.
//!
//! Measurement is per peer ([`PathSet`], in `measure`): every VC with a peer shares its
//! candidates' RTT, loss, liveness and hole-punching state, and the pings that keep them
//! current ride on data frames where data flows. Choice is per VC ([`Selector`], in `select`):
//! each VC applies its own profile's policy to the shared measurements, with hysteresis, and
//! keeps its own record of frames that failed authentication, so that a fault seen on one VC
//! never moves another.

mod candidate;
mod measure;
mod punch;
mod select;
#[cfg(test)]
mod tests;

use std::time::Duration;

use shoal_mesh::endpoint::Path;

pub use measure::{
    KEEPALIVE, MAX_INTRODUCED_PATHS, MAX_LEARNED_PATHS, PathSet, PathSetCounters, PingSend, SLACK, SPARE,
};
pub use punch::{PUNCH_INTERVAL, PUNCH_PROBES, PUNCH_RETRY, PUNCH_RETRY_MAX};
pub use select::{ABANDON_FOR, PROBATION, Selector, TAMPER_LIMIT};

/// Where hole punching stands on a direct candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Punch {
    /// Probing: no answer yet in attempt `attempt` (1 for the first).
    Trying {
        /// The attempt.
        attempt: u32,
    },
    /// The peer answered over it: the NATs let the path through.
    Open,
    /// No answer in `attempts` attempts; the next comes later.
    Failed {
        /// Attempts so far.
        attempts: u32,
    },
}

/// A candidate's index within its VC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathId(pub u8);

/// The shape of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// Straight to the peer.
    Direct,
    /// Through one relay.
    OneRelay,
    /// Through two or more relays.
    MultiRelay,
}

impl PathKind {
    /// The kind of `path`.
    pub fn of(path: &Path) -> PathKind {
        match path.route().len() {
            0 => PathKind::Direct,
            1 => PathKind::OneRelay,
            _ => PathKind::MultiRelay,
        }
    }
}

/// Why the VC moved its traffic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SwitchReason {
    /// The first path chosen.
    Initial,
    /// Nothing came over the old path for this long.
    Silent(Duration),
    /// The old path lost this fraction of probes.
    Lossy(f32),
    /// The old path's RTT passed the profile's bound.
    TooSlow(Duration),
    /// The old path delivered no more than this (bytes/s) when it was full, less than the
    /// profile's minimum bandwidth.
    Narrow(u64),
    /// The old path kept delivering frames that failed authentication.
    Tampering,
    /// The new path has been better for the hold time.
    Better,
}

/// What a path measures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PathStats {
    /// Smoothed round-trip time, once measured.
    pub srtt: Option<Duration>,
    /// Mean deviation of the RTT: the path's jitter.
    pub jitter: Duration,
    /// Fraction of the last pings that got no pong.
    pub loss: f32,
    /// Latency of each hop, from the trace of the latest traced frame that came over it.
    pub hop_latencies: Vec<Duration>,
    /// Frames over it that failed authentication.
    pub auth_failures: u64,
    /// Pings sent.
    pub pings: u64,
    /// Pongs received.
    pub pongs: u64,
    /// Data bytes sent over it (sealed renet frames other than acks).
    pub bytes_sent: u64,
    /// Data bytes received over it.
    pub bytes_received: u64,
    /// Paced VCs: the rate this path is paced at, bytes per second.
    pub pacing_rate: Option<f64>,
    /// Paced VCs: the rate the peer reports this path delivers, bytes per second.
    pub delivery_rate: Option<f64>,
    /// Paced VCs: what the path delivered when it last showed congestion (its bandwidth as
    /// far as it is known), bytes per second.
    pub capacity: Option<f64>,
    /// Direct paths: where hole punching stands.
    pub punch: Option<Punch>,
}

/// A candidate path as the VC's stats show it.
#[derive(Debug, Clone, PartialEq)]
pub struct PathInfo {
    /// Its index.
    pub id: PathId,
    /// Where it goes.
    pub path: Path,
    /// Its shape.
    pub kind: PathKind,
    /// What it measures.
    pub stats: PathStats,
    /// Whether it carries traffic now.
    pub active: bool,
    /// Whether it is out for tampering.
    pub abandoned: bool,
}

/// Something the VC reports upward.
#[derive(Debug, Clone, PartialEq)]
pub enum PathEvent {
    /// The primary path changed.
    Changed {
        /// The previous path.
        old: Option<Box<PathInfo>>,
        /// The new one.
        new: Box<PathInfo>,
        /// Why.
        reason: SwitchReason,
    },
    /// A path kept producing frames that failed authentication and is out of use.
    Abandoned {
        /// The path.
        path: Box<PathInfo>,
        /// Failures within the window.
        failures: u32,
    },
    /// No path meets the profile's criteria; the best of the rest is in use.
    Degraded {
        /// The path in use.
        path: Box<PathInfo>,
    },
}
