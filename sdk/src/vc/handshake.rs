//! The key exchange of a VC: making, checking and answering hellos (see [`crate::crypto`] for
//! the keys they agree).
//!
//! A hello is checked whole (its key, its signature over both node ids and the VC id, its
//! time, its profile) by [`check_hello`] before anything acts on it: the node calls it before
//! it creates a VC for a hello, so a forged or replayed hello costs a signature check and a
//! counter, and never a VC or a datagram.

use std::time::{Duration, Instant};

use shoal_mesh::clock::WallClock;
use shoal_mesh::wire::VcId;
use shoal_protocol::{Identity, NodeId, PublicKey, Signature};

use super::{State, VcEvent, VcTransmit, VirtualConnection, renet_for};
use crate::crypto::{CryptoError, Ephemeral, HelloBody, SessionKeys};
use shoal_mesh::endpoint::Path;

use crate::frame::{self, Inner};
use crate::path::PathSet;
use crate::profile::{Profile, ProfileConfig, ProfileError};

/// First hello retransmission; it doubles up to [`HELLO_RETRY_MAX`].
pub(super) const HELLO_RETRY: Duration = Duration::from_millis(200);
pub(super) const HELLO_RETRY_MAX: Duration = Duration::from_secs(2);
/// How far a hello's timestamp may lie from our clock.
pub const HELLO_MAX_SKEW: Duration = Duration::from_secs(120);

/// Why a hello was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HelloError {
    /// The key it carries is not the one the peer was introduced with.
    #[error("hello carries a key other than the peer's")]
    WrongKey,
    /// Its signature does not verify under the peer's key for this pair of nodes and VC.
    #[error(transparent)]
    Signature(#[from] CryptoError),
    /// Its time is further from ours than [`HELLO_MAX_SKEW`].
    #[error("hello time is {skew:?} from ours")]
    Skew {
        /// How far.
        skew: Duration,
    },
    /// Its profile is not one this version can run.
    #[error("hello profile: {0}")]
    Profile(#[from] ProfileError),
}

/// Checks a hello from `peer_key`'s node to `me` on `vc` whole, and returns the profile it
/// asks for.
pub fn check_hello(
    me: NodeId,
    clock: &WallClock,
    now: Instant,
    peer_key: PublicKey,
    vc: VcId,
    h: &HelloBody,
    sig: &Signature,
) -> Result<Profile, HelloError> {
    if h.static_key != peer_key {
        return Err(HelloError::WrongKey);
    }
    h.verify(sig, peer_key.node_id(), me, vc)?;
    let ours = clock.unix_us(now) / 1000;
    let skew = Duration::from_millis(ours.abs_diff(h.unix_ms));
    if skew > HELLO_MAX_SKEW {
        return Err(HelloError::Skew { skew });
    }
    Ok(Profile::from_config(&ProfileConfig::from_wire(&h.profile)?)?)
}

pub(super) fn make_hello(
    identity: &Identity,
    e: &Ephemeral,
    clock: &WallClock,
    now: Instant,
    profile: &Profile,
    peer: NodeId,
    vc: VcId,
) -> (HelloBody, Signature) {
    let body = HelloBody {
        ephemeral: e.public(),
        static_key: identity.public_key(),
        unix_ms: clock.unix_us(now) / 1000,
        profile: profile.config.to_wire(),
    };
    let sig = body.sign(identity, peer, vc);
    (body, sig)
}

impl VirtualConnection {
    /// Sends the hello for a round of the key exchange (the first, or a retry).
    pub(super) fn send_hellos(&mut self, now: Instant, paths: &PathSet) {
        let to = self.hello_paths(now, paths);
        self.hello_rounds = self.hello_rounds.wrapping_add(1);
        let bytes = frame::write_hello(&self.my_hello.0, &self.my_hello.1);
        for path in to {
            self.push(VcTransmit { path, trace: false, frame: bytes.clone(), carries_data: false, riding: 0 });
        }
    }

    /// Where this round's hello goes: one relayed path (the introduction's best first, the
    /// next one at each retry) and every direct candidate. The relay gets the VC going at
    /// once and the direct candidates take over when they answer, as on every other frame;
    /// the other relayed paths are spares, measured once the keys agree. A hello on every
    /// path would multiply what each introduction costs by the relays (a player in a moving
    /// crowd is introduced to someone every few seconds), and a relay that is down costs one
    /// retry.
    fn hello_paths(&self, now: Instant, paths: &PathSet) -> Vec<Path> {
        let live = paths.ids().filter(|&id| !self.sel.is_abandoned(now, id)).filter_map(|id| paths.path(id));
        let (relayed, direct): (Vec<Path>, Vec<Path>) = live.partition(|p| matches!(p, Path::Relayed(_)));
        let relay = (!relayed.is_empty()).then(|| relayed[self.hello_rounds as usize % relayed.len()]);
        relay.into_iter().chain(direct).collect()
    }

    /// Handles a hello; returns whether it was genuine and the peer is still waiting for ours
    /// (a fresh exchange, or a retransmission before any frame of ours got through).
    pub(super) fn on_hello(
        &mut self,
        now: Instant,
        paths: &PathSet,
        from: Path,
        h: HelloBody,
        sig: &Signature,
    ) -> bool {
        let me = self.identity.node_id();
        match check_hello(me, &self.clock, now, self.peer_key, self.vc, &h, sig) {
            Ok(p) if p.delivery == self.profile.delivery => self.take_hello(now, paths, Some(from), h),
            _ => {
                self.counters.bad_hellos += 1;
                false
            }
        }
    }

    /// Acts on a hello that [`check_hello`] passed (the node checked it before creating this
    /// VC for it); returns whether the peer is still waiting for ours.
    pub(crate) fn take_hello(&mut self, now: Instant, paths: &PathSet, from: Option<Path>, h: HelloBody) -> bool {
        let me = self.identity.node_id();
        match self.peer_hello {
            Some(old) if old.ephemeral == h.ephemeral => {
                // A retransmission: the peer lacks our proof of the keys, and perhaps our hello
                // (if we have not seen a frame of its own yet). They go back the way it came;
                // our own retries go everywhere on their own timer. A confirm draws no answer,
                // so two sides cannot keep each other talking.
                if let Some(path) = from.or_else(|| self.sel.sending().first().and_then(|&id| paths.path(id))) {
                    if !self.confirmed {
                        let bytes = frame::write_hello(&self.my_hello.0, &self.my_hello.1);
                        self.push(VcTransmit { path, trace: false, frame: bytes, carries_data: false, riding: 0 });
                    }
                    self.seal_control(&[path], false, &[Inner::Confirm]);
                }
                return !self.confirmed;
            }
            Some(old) if h.unix_ms <= old.unix_ms => {
                // An older exchange, replayed.
                self.counters.bad_hellos += 1;
                return false;
            }
            Some(_) => {
                // The peer restarted the VC: new keys, new renet state.
                match Ephemeral::generate() {
                    Ok(e) => self.ephemeral = e,
                    Err(_) => {
                        self.counters.bad_hellos += 1;
                        return false;
                    }
                }
                self.my_hello =
                    make_hello(&self.identity, &self.ephemeral, &self.clock, now, &self.profile, self.peer, self.vc);
                self.renet = renet_for(&self.profile);
                // Frames still queued were sealed under the old keys; the peer would take
                // them for forgeries.
                self.pacers.clear();
                self.held_pongs.clear();
                self.pull_ok = false;
                self.ack_due = false;
                self.acked_at = None;
                self.renet_at = now;
                self.newest_renet = None;
                self.confirmed = false;
                // The peer's VC is a new one: its node knows it by another id, if any yet.
                self.short_peer = None;
                self.short_confirmed = false;
                self.outbox.clear();
                self.events.push_back(VcEvent::Reset);
            }
            None => {}
        }
        match SessionKeys::derive(me, self.peer, &mut self.ephemeral, &self.my_hello.0, &h) {
            Ok(k) => {
                self.keys = Some(k);
                self.peer_hello = Some(h);
                // Our hello back the way the peer's came, which just worked (our earlier ones
                // may have come before the peer knew us), and behind it proof that we hold
                // the keys, so the peer's VC is confirmed even if this one has nothing to send
                // for a while. Our retries cover the loss of either.
                let to = from.map_or_else(|| self.hello_paths(now, paths), |p| vec![p]);
                let bytes = frame::write_hello(&self.my_hello.0, &self.my_hello.1);
                for &path in &to {
                    self.push(VcTransmit { path, trace: false, frame: bytes.clone(), carries_data: false, riding: 0 });
                }
                self.seal_control(&to, false, &[Inner::Confirm]);
                self.hello_next = now + self.hello_backoff;
                if let State::Handshaking { .. } = self.state {
                    self.state = State::Open;
                    self.events.push_back(VcEvent::Opened);
                }
                self.last_heard = now;
                self.flush_now = true;
                true
            }
            Err(_) => {
                self.counters.bad_hellos += 1;
                false
            }
        }
    }
}
