//! What a node keeps per peer: its key, the paths to it that every VC with it shares, and what
//! it needs to refuse hostile hellos cheaply.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use shoal_mesh::wire::VcId;
use shoal_protocol::PublicKey;

use crate::path::PathSet;

/// Hello checks (a signature verification each) a peer's id may cost us per second, and in a
/// burst. A genuine peer opens a handful of VCs at once; forged hellos that name it beyond this
/// are dropped unread.
const HELLO_CHECKS_PER_SEC: f64 = 20.0;
const HELLO_CHECK_BURST: f64 = 20.0;

/// One peer. See the module docs.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) key: PublicKey,
    pub(crate) paths: PathSet,
    /// The newest hello time (unix ms) taken per VC id: a hello for a VC that does not exist
    /// must be newer, so a captured one cannot open it again.
    hellos: BTreeMap<VcId, u64>,
    tokens: f64,
    refilled: Option<Instant>,
    /// Last time anything authenticated came from the peer, on any VC and path.
    pub(crate) heard: Option<Instant>,
}

impl Peer {
    pub(crate) fn new(key: PublicKey, paths: PathSet) -> Peer {
        Peer { key, paths, hellos: BTreeMap::new(), tokens: HELLO_CHECK_BURST, refilled: None, heard: None }
    }

    /// Whether another hello check is within this peer's budget; spends one if it is.
    pub(crate) fn allow_hello_check(&mut self, now: Instant) -> bool {
        let elapsed = self.refilled.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.refilled = Some(now);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * HELLO_CHECKS_PER_SEC).min(HELLO_CHECK_BURST);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// Whether a hello of `unix_ms` for `vc` is newer than any taken for it.
    pub(crate) fn is_fresh(&self, vc: VcId, unix_ms: u64) -> bool {
        self.hellos.get(&vc).is_none_or(|&t| unix_ms > t)
    }

    /// A hello of `unix_ms` for `vc` was taken.
    pub(crate) fn took_hello(&mut self, vc: VcId, unix_ms: u64) {
        let t = self.hellos.entry(vc).or_insert(unix_ms);
        *t = (*t).max(unix_ms);
    }
}
