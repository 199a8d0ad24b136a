//! What `shoal-nat-peer` prints: one JSON object a line, so [`super::measure`] can read a run
//! back. Times are `ms`, milliseconds since the peer's introduction (when its session opened
//! the VC), or `unix_us`, wall-clock microseconds, which compare across the peers since they
//! share the machine's clock.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use shoal_mesh::endpoint::Path;
use shoal_sdk::PathInfo;
use shoal_sdk::PathKind;
use shoal_sdk::path::Punch;

/// The stdin line that tells a peer to print its final stats; it signs out when stdin ends
/// after that, so that neither peer's farewell closes the other's VC before its stats are out.
pub const STOP: &str = "stop";

/// One line of a peer's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum PeerLine {
    /// Signed in; the mesh socket is bound at `local` (the host's view, before any NAT).
    SignedIn {
        /// When.
        unix_us: u64,
        /// Our node id.
        id: String,
        /// The mesh socket's address.
        local: SocketAddr,
    },
    /// The control server took this as our mesh address (from a relay's observation when the
    /// check-in carried one, else the control connection's address with the mesh port).
    Observed {
        /// When.
        unix_us: u64,
        /// The address.
        addr: SocketAddr,
    },
    /// A relay accepted our binding and saw us at `observed`.
    RelayBound {
        /// When.
        unix_us: u64,
        /// The relay.
        relay: SocketAddr,
        /// Our address as it saw it: our NAT's mapping towards the relay.
        observed: SocketAddr,
    },
    /// Introduced to the other peer; the VC is opened now (`ms` counts from here) and the
    /// first message queued.
    Introduced {
        /// When.
        unix_us: u64,
        /// The other peer's node id.
        peer: String,
        /// The VC's candidate paths, in the session's order.
        candidates: Vec<String>,
    },
    /// The VC's keys are agreed.
    Opened {
        /// Since the introduction.
        ms: f64,
    },
    /// The VC moved to another path.
    Path {
        /// Since the introduction.
        ms: f64,
        /// `direct`, `one_relay` or `multi_relay`.
        kind: String,
        /// Where it goes.
        path: String,
        /// Its smoothed RTT when it was chosen, if measured.
        srtt_us: Option<u64>,
        /// Why it was chosen.
        reason: String,
    },
    /// The other peer's first message arrived.
    Message {
        /// Since our introduction.
        ms: f64,
        /// When.
        unix_us: u64,
        /// Its number (the other peer sends 0 at its introduction).
        n: u64,
        /// The kind of our active path then.
        on: Option<String>,
    },
    /// The first answer to one of our messages arrived.
    Echo {
        /// Since the introduction.
        ms: f64,
        /// The number of the message answered.
        n: u64,
        /// From sending that message to its answer.
        rtt_us: u64,
        /// The kind of our active path then.
        on: Option<String>,
    },
    /// The outcome is clear from this side: direct with traffic over it, or every direct
    /// candidate's punching attempt failed while messages flow over the relay.
    Settled {
        /// Since the introduction.
        ms: f64,
        /// The kind of the active path.
        kind: String,
    },
    /// The VC closed.
    Closed {
        /// Since the introduction.
        ms: f64,
        /// Why.
        reason: String,
    },
    /// The end of the run: the VC's paths and the message counts.
    Final {
        /// Since the introduction.
        ms: f64,
        /// The peer's own time limit ended the run, not a stop from the caller.
        timed_out: bool,
        /// The kind of the active path.
        active: Option<String>,
        /// Every candidate path.
        paths: Vec<PathLine>,
        /// Messages sent.
        sent: u64,
        /// The other peer's messages received.
        received: u64,
        /// Answers to ours received.
        echoes: u64,
    },
    /// The peer could not go on.
    Failed {
        /// Why.
        what: String,
    },
}

/// One candidate path in [`PeerLine::Final`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathLine {
    /// `direct`, `one_relay` or `multi_relay`.
    pub kind: String,
    /// Where it goes.
    pub path: String,
    /// Whether it carries the traffic.
    pub active: bool,
    /// Smoothed RTT, if measured.
    pub srtt_us: Option<u64>,
    /// Pings sent over it.
    pub pings: u64,
    /// Pongs received over it.
    pub pongs: u64,
    /// Data bytes sent over it.
    pub bytes_sent: u64,
    /// Data bytes received over it.
    pub bytes_received: u64,
    /// Direct paths: the punching state (`trying N`, `open`, `failed N`).
    pub punch: Option<String>,
}

impl PathLine {
    /// The line for `p`.
    pub fn of(p: &PathInfo) -> PathLine {
        PathLine {
            kind: kind_name(p.kind).into(),
            path: path_text(&p.path),
            active: p.active,
            srtt_us: p.stats.srtt.map(micros),
            pings: p.stats.pings,
            pongs: p.stats.pongs,
            bytes_sent: p.stats.bytes_sent,
            bytes_received: p.stats.bytes_received,
            punch: p.stats.punch.map(punch_text),
        }
    }
}

/// Whole microseconds of `d`.
pub fn micros(d: std::time::Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

/// A path as text: the address, or `via` and the relays' ids.
pub fn path_text(path: &Path) -> String {
    match path {
        Path::Direct(a) => a.to_string(),
        Path::Relayed(r) => {
            let relays: Vec<String> = r.relays().iter().map(ToString::to_string).collect();
            format!("via {}", relays.join(","))
        }
    }
}

/// The name of a path kind in the lines.
pub fn kind_name(kind: PathKind) -> &'static str {
    match kind {
        PathKind::Direct => "direct",
        PathKind::OneRelay => "one_relay",
        PathKind::MultiRelay => "multi_relay",
    }
}

/// The path kind `name` stands for.
pub fn parse_kind(name: &str) -> Option<PathKind> {
    match name {
        "direct" => Some(PathKind::Direct),
        "one_relay" => Some(PathKind::OneRelay),
        "multi_relay" => Some(PathKind::MultiRelay),
        _ => None,
    }
}

/// A punching state as text.
pub fn punch_text(p: Punch) -> String {
    match p {
        Punch::Trying { attempt } => format!("trying {attempt}"),
        Punch::Open => "open".into(),
        Punch::Failed { attempts } => format!("failed {attempts}"),
    }
}

/// The punching state `text` stands for.
pub fn parse_punch(text: &str) -> Option<Punch> {
    let mut words = text.split_whitespace();
    let (word, n) = (words.next()?, words.next().and_then(|n| n.parse().ok()));
    match (word, n) {
        ("open", None) => Some(Punch::Open),
        ("trying", Some(attempt)) => Some(Punch::Trying { attempt }),
        ("failed", Some(attempts)) => Some(Punch::Failed { attempts }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn kinds_and_punch_states_read_back_as_written() {
        for kind in [PathKind::Direct, PathKind::OneRelay, PathKind::MultiRelay] {
            assert_eq!(parse_kind(kind_name(kind)), Some(kind));
        }
        for p in [Punch::Open, Punch::Trying { attempt: 2 }, Punch::Failed { attempts: 3 }] {
            assert_eq!(parse_punch(&punch_text(p)), Some(p));
        }
        assert_eq!(parse_punch("failed"), None);
        let line = PeerLine::Settled { ms: 1.5, kind: "direct".into() };
        let text = serde_json::to_string(&line).unwrap();
        assert_eq!(text, r#"{"ev":"settled","ms":1.5,"kind":"direct"}"#);
        assert_eq!(serde_json::from_str::<PeerLine>(&text).unwrap(), line);
    }
}
