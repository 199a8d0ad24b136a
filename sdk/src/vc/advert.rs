//! Address advertisements: when a relay sees us at a new address, the peer hears of it from
//! us (a sealed frame, repeated until acknowledged) and punches it; when the peer advertises,
//! we punch what it names, within the bound on learned paths.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shoal_mesh::endpoint::Path;

use super::VirtualConnection;
use crate::frame::{Candidates, Inner};
use crate::path::PathSet;

/// How often our candidate advertisement is repeated until the peer acknowledges it, and how
/// many times at most.
const ADVERT_RETRY: Duration = Duration::from_millis(200);
const ADVERT_TRIES: u32 = 10;

/// An advertisement of our direct addresses waiting for the peer's acknowledgement.
#[derive(Debug, Clone, Copy)]
struct Pending {
    candidates: Candidates,
    next: Instant,
    tries_left: u32,
}

/// What a VC knows of advertisements, ours and the peer's.
#[derive(Debug, Default)]
pub(super) struct AdvertState {
    pending: Option<Pending>,
    /// Sequence number of our latest advertisement.
    seq: u32,
    /// Sequence number of the peer's latest advertisement taken up.
    peer_seq: Option<u32>,
}

impl AdvertState {
    /// When the pending advertisement is next repeated.
    pub(super) fn next(&self) -> Option<Instant> {
        self.pending.map(|p| p.next)
    }

    /// The peer acknowledged advertisement `seq`.
    pub(super) fn acked(&mut self, seq: u32) {
        if self.pending.is_some_and(|p| p.candidates.seq == seq) {
            self.pending = None;
        }
    }
}

impl VirtualConnection {
    /// Our direct addresses changed (a relay sees us at a new NAT mapping): tell the peer,
    /// which punches them. The advertisement goes over the relayed paths and the ones in use,
    /// and is repeated until the peer acknowledges it. The node asks one VC per peer.
    pub fn advertise(&mut self, now: Instant, addrs: &[SocketAddr]) {
        self.advert.seq = self.advert.seq.wrapping_add(1);
        let candidates = Candidates::new(self.advert.seq, addrs);
        self.advert.pending = Some(Pending { candidates, next: now, tries_left: ADVERT_TRIES });
    }

    pub(super) fn send_advert(&mut self, now: Instant, paths: &PathSet) {
        let Some(a) = self.advert.pending.as_mut() else { return };
        if now < a.next || self.keys.is_none() {
            return;
        }
        let candidates = a.candidates;
        a.tries_left -= 1;
        a.next = now + ADVERT_RETRY;
        if a.tries_left == 0 {
            self.advert.pending = None;
        }
        let to: Vec<Path> = paths
            .ids()
            .filter(|&id| {
                !self.sel.is_abandoned(now, id)
                    && (self.sel.sending().contains(&id) || paths.path(id).is_some_and(|p| !p.route().is_empty()))
            })
            .filter_map(|id| paths.path(id))
            .collect();
        self.seal_control(&to, false, &[Inner::Candidates(candidates)]);
    }

    /// The peer's addresses changed: punch the new ones, within the bound on learned paths.
    pub(super) fn on_candidates(&mut self, now: Instant, paths: &mut PathSet, path: Path, c: &Candidates) {
        self.seal_control(&[path], false, &[Inner::CandidatesAck(c.seq)]);
        if self.advert.peer_seq.is_some_and(|s| s.wrapping_sub(c.seq) < 1 << 31) {
            return; // This one or a later one was taken up already.
        }
        self.advert.peer_seq = Some(c.seq);
        for addr in c.addrs() {
            let direct = Path::Direct(addr);
            let known = paths.find(&direct);
            let id = match known {
                Some(id) => Some(id),
                None if addr.ip().is_unspecified() || addr.ip().is_multicast() || addr.port() == 0 => None,
                None => {
                    let id = paths.learn(now, direct);
                    self.counters.candidates_learned += u64::from(id.is_some());
                    id
                }
            };
            match id {
                Some(id) => paths.punch_now(now, id),
                None => self.counters.candidates_refused += 1,
            }
        }
    }
}
