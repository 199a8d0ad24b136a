//! End-to-end keys of a virtual connection.
//!
//! Each side of a VC sends a hello: a fresh X25519 public key, signed together with both node
//! ids, the VC id, a timestamp and the profile by its long-term ed25519 key. Once a side holds
//! its own hello and the peer's, both derive the same two directional ChaCha20-Poly1305 keys
//! with HKDF-SHA256 over the X25519 secret and both hellos. The exchange is symmetric, so two
//! sides that open the same VC at once (as after an introduction) each have keys after half a
//! round trip, and a side that only answers has them as soon as the hello arrives.
//!
//! Why this and not Noise through `snow`: identities are already ed25519 keys that tickets and
//! relay binds use, and `ring` (already in the tree for those and for TLS) provides X25519,
//! HKDF and the AEAD. A signed ephemeral exchange (SIGMA, as in TLS 1.3 and IKEv2) gives mutual
//! authentication and forward secrecy with no second crypto stack and no static X25519 keys to
//! distribute. Packet numbers are the nonces; a sliding window rejects replays.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::agreement::{EphemeralPrivateKey, UnparsedPublicKey, X25519, agree_ephemeral};
use ring::hkdf::{HKDF_SHA256, KeyType, Salt};
use ring::rand::SystemRandom;
use shoal_mesh::wire::VcId;
use shoal_protocol::{Identity, NodeId, PublicKey, Signature};

/// Domain separation for hello signatures.
const HELLO_CONTEXT: &[u8] = b"shoal/vc-hello/v1";
/// HKDF salt for VC keys.
const KDF_SALT: &[u8] = b"shoal/vc-keys/v1";
/// Bytes of an AEAD tag.
pub const TAG_LEN: usize = 16;
/// Packets the replay window remembers behind the highest seen.
pub const REPLAY_WINDOW: u64 = 4096;

/// Why key material was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The hello's signature does not match the key it names.
    #[error("hello signature does not verify")]
    BadSignature,
    /// The hello's key does not belong to the node that sent it.
    #[error("hello key does not match the sending node id")]
    WrongKey,
    /// The X25519 exchange failed (a low-order public key).
    #[error("key agreement failed")]
    Agreement,
    /// The system random source failed.
    #[error("random source failed")]
    Random,
    /// The frame does not authenticate under this VC's key.
    #[error("frame failed authentication")]
    Auth,
    /// The packet number was seen before, or is too old for the window.
    #[error("packet number {0} replayed or too old")]
    Replay(u64),
}

/// One side's half of the exchange: its ephemeral key, until the peer's half arrives.
#[derive(Debug)]
pub struct Ephemeral {
    private: Option<EphemeralPrivateKey>,
    public: [u8; 32],
}

impl Ephemeral {
    /// A fresh key pair from the system random source. Key material is the one thing the
    /// simulator does not seed: nothing the VC decides depends on its bytes.
    pub fn generate() -> Result<Ephemeral, CryptoError> {
        let private = EphemeralPrivateKey::generate(&X25519, &SystemRandom::new()).map_err(|_| CryptoError::Random)?;
        let pk = private.compute_public_key().map_err(|_| CryptoError::Random)?;
        let mut public = [0; 32];
        public.copy_from_slice(pk.as_ref());
        Ok(Ephemeral { private: Some(private), public })
    }

    /// The public half, sent in the hello.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }
}

/// What a hello says, apart from its signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloBody {
    /// Sender's ephemeral X25519 key.
    pub ephemeral: [u8; 32],
    /// Sender's long-term ed25519 key.
    pub static_key: PublicKey,
    /// Sender's Unix time in ms: a later hello replaces an earlier one (peer restart).
    pub unix_ms: u64,
    /// The profile, as [`crate::profile::ProfileConfig::to_wire`].
    pub profile: [u8; crate::profile::PROFILE_WIRE_LEN],
}

impl HelloBody {
    fn signed_bytes(&self, from: NodeId, to: NodeId, vc: VcId) -> Vec<u8> {
        let mut m = Vec::with_capacity(8 + 8 + 4 + 32 + 32 + 8 + self.profile.len());
        m.extend_from_slice(&from.0);
        m.extend_from_slice(&to.0);
        m.extend_from_slice(&vc.0.to_be_bytes());
        m.extend_from_slice(&self.ephemeral);
        m.extend_from_slice(&self.static_key.0);
        m.extend_from_slice(&self.unix_ms.to_be_bytes());
        m.extend_from_slice(&self.profile);
        m
    }

    /// Signs the hello from `me` to `to` on `vc`.
    pub fn sign(&self, me: &Identity, to: NodeId, vc: VcId) -> Signature {
        me.sign(HELLO_CONTEXT, &self.signed_bytes(me.node_id(), to, vc))
    }

    /// Checks that `from` sent this hello to `to` on `vc`.
    pub fn verify(&self, sig: &Signature, from: NodeId, to: NodeId, vc: VcId) -> Result<(), CryptoError> {
        if self.static_key.node_id() != from {
            return Err(CryptoError::WrongKey);
        }
        self.static_key
            .verify(HELLO_CONTEXT, &self.signed_bytes(from, to, vc), sig)
            .map_err(|_| CryptoError::BadSignature)
    }
}

struct KeyLen;

impl KeyType for KeyLen {
    fn len(&self) -> usize {
        64
    }
}

/// The keys of an established VC, with the send counter and the replay window.
pub struct SessionKeys {
    send: LessSafeKey,
    recv: LessSafeKey,
    next_pn: u64,
    replay: ReplayWindow,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys").field("next_pn", &self.next_pn).finish_non_exhaustive()
    }
}

impl SessionKeys {
    /// Completes the exchange: `mine` is our ephemeral (consumed), `my_hello` and `peer_hello`
    /// the two hellos as signed. Both sides get the same keys, each sending with the other's
    /// receive key.
    pub fn derive(
        me: NodeId,
        peer: NodeId,
        mine: &mut Ephemeral,
        my_hello: &HelloBody,
        peer_hello: &HelloBody,
    ) -> Result<SessionKeys, CryptoError> {
        let private = mine.private.take().ok_or(CryptoError::Agreement)?;
        let peer_pub = UnparsedPublicKey::new(&X25519, peer_hello.ephemeral);
        let mut okm = [0u8; 64];
        // The transcript orders the two hellos by node id so both sides hash the same bytes.
        let (lo, hi) = if me < peer { (my_hello, peer_hello) } else { (peer_hello, my_hello) };
        let mut transcript = Vec::with_capacity(2 * 96);
        for h in [lo, hi] {
            transcript.extend_from_slice(&h.ephemeral);
            transcript.extend_from_slice(&h.static_key.0);
            transcript.extend_from_slice(&h.unix_ms.to_be_bytes());
            transcript.extend_from_slice(&h.profile);
        }
        agree_ephemeral(private, &peer_pub, |shared| {
            let prk = Salt::new(HKDF_SHA256, KDF_SALT).extract(shared);
            prk.expand(&[&transcript], KeyLen).and_then(|okm_| okm_.fill(&mut okm))
        })
        .map_err(|_| CryptoError::Agreement)?
        .map_err(|_| CryptoError::Agreement)?;
        let key = |b: &[u8]| {
            UnboundKey::new(&CHACHA20_POLY1305, b)
                .map(LessSafeKey::new)
                // A 32-byte slice is always a valid ChaCha20-Poly1305 key.
                .unwrap_or_else(|_| unreachable!("32-byte chacha key"))
        };
        let (lo_to_hi, hi_to_lo) = (key(&okm[..32]), key(&okm[32..]));
        let (send, recv) = if me < peer { (lo_to_hi, hi_to_lo) } else { (hi_to_lo, lo_to_hi) };
        Ok(SessionKeys { send, recv, next_pn: 0, replay: ReplayWindow::default() })
    }

    /// Encrypts `buf[from..]` in place with the next packet number and appends the tag;
    /// returns the packet number. `aad` binds the frame to its header and the mesh addressing.
    pub fn seal(&mut self, aad: impl Fn(u64) -> [u8; AAD_LEN], buf: &mut Vec<u8>, from: usize) -> u64 {
        let pn = self.next_pn;
        self.next_pn += 1;
        let tag = self
            .send
            .seal_in_place_separate_tag(nonce(pn), Aad::from(aad(pn)), &mut buf[from..])
            // ring fails only for inputs over ~256 GiB, far beyond a datagram.
            .unwrap_or_else(|_| unreachable!("chacha seal of a datagram"));
        buf.extend_from_slice(tag.as_ref());
        pn
    }

    /// The highest packet number opened so far.
    pub fn highest_received(&self) -> Option<u64> {
        self.replay.highest
    }

    /// Checks that `pn` is new, authenticates and decrypts `buf` (ciphertext and tag) in place,
    /// and returns the plaintext. A frame that fails leaves the window untouched.
    pub fn open<'a>(&mut self, pn: u64, aad: [u8; AAD_LEN], buf: &'a mut [u8]) -> Result<&'a [u8], CryptoError> {
        if !self.replay.is_fresh(pn) {
            return Err(CryptoError::Replay(pn));
        }
        let plain = self.recv.open_in_place(nonce(pn), Aad::from(aad), buf).map_err(|_| CryptoError::Auth)?;
        self.replay.mark(pn);
        Ok(plain)
    }

    /// Authenticates a packet whose number was seen before (a redundant copy that lost the
    /// race), without marking anything: whether it is genuine, and what it says. Only for
    /// measuring what a path delivered; its content was already delivered once.
    pub fn open_duplicate<'a>(&self, pn: u64, aad: [u8; AAD_LEN], buf: &'a mut [u8]) -> Result<&'a [u8], CryptoError> {
        let plain = self.recv.open_in_place(nonce(pn), Aad::from(aad), buf).map_err(|_| CryptoError::Auth)?;
        Ok(plain)
    }

    /// Packets sealed so far.
    pub fn sent(&self) -> u64 {
        self.next_pn
    }
}

/// Bytes of additional data bound into each frame's tag.
pub const AAD_LEN: usize = 1 + 8 + 8 + 8 + 4;

fn nonce(pn: u64) -> Nonce {
    let mut n = [0; 12];
    n[4..].copy_from_slice(&pn.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Which packet numbers have been received: the highest, and a bitmap of the
/// [`REPLAY_WINDOW`] below it (as in RFC 6479). Wider than WireGuard's because a Bulk VC
/// stripes over paths whose latencies differ by thousands of packets at full rate.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    highest: Option<u64>,
    bits: Box<[u64; (REPLAY_WINDOW / 64) as usize]>,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow { highest: None, bits: Box::new([0; (REPLAY_WINDOW / 64) as usize]) }
    }
}

impl ReplayWindow {
    fn slot(pn: u64) -> (usize, u64) {
        (((pn / 64) % (REPLAY_WINDOW / 64)) as usize, 1 << (pn % 64))
    }

    /// Whether `pn` has not been seen and is inside the window.
    pub fn is_fresh(&self, pn: u64) -> bool {
        match self.highest {
            None => true,
            Some(h) if pn > h => true,
            Some(h) if h - pn >= REPLAY_WINDOW - 64 => false,
            Some(_) => {
                let (w, b) = Self::slot(pn);
                self.bits[w] & b == 0
            }
        }
    }

    /// Records `pn` (call after it authenticated).
    pub fn mark(&mut self, pn: u64) {
        let h = self.highest.unwrap_or(0);
        if self.highest.is_none() || pn > h {
            // Clear the words the window slides over.
            let from = if self.highest.is_none() { 0 } else { h / 64 + 1 };
            let to = pn / 64;
            if to.saturating_sub(from) >= REPLAY_WINDOW / 64 {
                self.bits.fill(0);
            } else {
                for word in from..=to {
                    self.bits[Self::slot(word * 64).0] = 0;
                }
            }
            self.highest = Some(pn);
        }
        let (w, b) = Self::slot(pn);
        self.bits[w] |= b;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn hello(id: &Identity, e: &Ephemeral, ms: u64) -> HelloBody {
        HelloBody { ephemeral: e.public(), static_key: id.public_key(), unix_ms: ms, profile: [1; 16] }
    }

    fn pair() -> (SessionKeys, SessionKeys) {
        let (a, b) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
        let (mut ea, mut eb) = (Ephemeral::generate().unwrap(), Ephemeral::generate().unwrap());
        let (ha, hb) = (hello(&a, &ea, 10), hello(&b, &eb, 20));
        let ka = SessionKeys::derive(a.node_id(), b.node_id(), &mut ea, &ha, &hb).unwrap();
        let kb = SessionKeys::derive(b.node_id(), a.node_id(), &mut eb, &hb, &ha).unwrap();
        (ka, kb)
    }

    fn aad(pn: u64) -> [u8; AAD_LEN] {
        let mut a = [0; AAD_LEN];
        a[1..9].copy_from_slice(&pn.to_be_bytes());
        a
    }

    #[test]
    fn both_sides_derive_matching_directional_keys() {
        let (mut ka, mut kb) = pair();
        let mut m = b"hello over the mesh".to_vec();
        let pn = ka.seal(aad, &mut m, 0);
        assert_eq!(kb.open(pn, aad(pn), &mut m).unwrap(), b"hello over the mesh");
        // The reverse direction uses the other key: a's own frame does not open at a.
        let mut m2 = b"x".to_vec();
        let pn2 = ka.seal(aad, &mut m2, 0);
        assert_eq!(ka.open(pn2, aad(pn2), &mut m2), Err(CryptoError::Auth));
    }

    #[test]
    fn flipped_bits_replays_and_moved_frames_are_refused() {
        let (mut ka, mut kb) = pair();
        let mut m = b"trade 10 gold".to_vec();
        let pn = ka.seal(aad, &mut m, 0);
        let mut flipped = m.clone();
        flipped[3] ^= 0x10;
        assert_eq!(kb.open(pn, aad(pn), &mut flipped), Err(CryptoError::Auth));
        let mut other_vc = m.clone();
        let mut moved = aad(pn);
        moved[AAD_LEN - 1] = 9;
        assert_eq!(kb.open(pn, moved, &mut other_vc), Err(CryptoError::Auth));
        let mut once = m.clone();
        assert!(kb.open(pn, aad(pn), &mut once).is_ok());
        assert_eq!(kb.open(pn, aad(pn), &mut m), Err(CryptoError::Replay(pn)));
    }

    #[test]
    fn hello_signatures_bind_sender_receiver_and_vc() {
        let (a, b) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
        let e = Ephemeral::generate().unwrap();
        let h = hello(&a, &e, 5);
        let sig = h.sign(&a, b.node_id(), VcId(7));
        assert_eq!(h.verify(&sig, a.node_id(), b.node_id(), VcId(7)), Ok(()));
        assert_eq!(h.verify(&sig, a.node_id(), b.node_id(), VcId(8)), Err(CryptoError::BadSignature));
        assert_eq!(h.verify(&sig, b.node_id(), a.node_id(), VcId(7)), Err(CryptoError::WrongKey));
        let forged = HelloBody { unix_ms: 6, ..h };
        assert_eq!(forged.verify(&sig, a.node_id(), b.node_id(), VcId(7)), Err(CryptoError::BadSignature));
    }

    proptest! {
        /// The window accepts each number once, in any order, and never one it has slid past.
        #[test]
        fn replay_window_accepts_each_packet_once(order in proptest::collection::vec(0u64..20_000, 1..400)) {
            let mut w = ReplayWindow::default();
            let mut seen = std::collections::BTreeSet::new();
            for pn in order {
                let fresh = w.is_fresh(pn);
                if seen.contains(&pn) {
                    prop_assert!(!fresh, "replay of {} accepted", pn);
                }
                let highest = seen.iter().next_back().copied();
                if !seen.contains(&pn) && highest.is_none_or(|h| pn + (REPLAY_WINDOW - 64) > h) {
                    prop_assert!(fresh, "fresh {} refused (highest {:?})", pn, highest);
                }
                if fresh {
                    w.mark(pn);
                    seen.insert(pn);
                }
            }
        }
    }
}
