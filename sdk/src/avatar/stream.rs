//! A published avatar stream: one sender's states to every watcher a relay copies them to, with
//! no acknowledgement from any of them, sealed so that the relay can neither read nor forge
//! them.
//!
//! **Coding.** The pairwise codec deltas against what each receiver acknowledged; a stream has
//! no acknowledgements, so it uses key states instead, as video does. Every [`KEY_EVERY`]
//! ticks (and at the start) the sender sends a full state, and until the next one it deltas
//! against that key state. The bits are the pairwise codec's ([`super::codec`]): the sender
//! takes its own key state as acknowledged.
//!
//! A key state goes three times: the [`KEY_COPIES`] updates after it each carry a copy, so
//! that losing it costs a watcher that one update, and losing it and the next (loss comes in
//! bursts) those two, not the second until the next key state. (A second key state of its own
//! would not do: deltas name one baseline, and a watcher that caught only the other could not
//! decode them.) The plaintext is a byte holding the length of the copy (0: none), the copy,
//! then the update.
//!
//! So a watcher that lost every copy of a key state, or joined between two, refuses the
//! deltas that name it ([`DecodeError::MissingBaseline`]) until the next key state, at most
//! [`KEY_EVERY`] ticks on. It never decodes against another state. A watcher that heard nothing for
//! [`STREAM_GAP`] forgets what it holds, so that tick numbers, which deltas carry as their low
//! bits, cannot alias across a long silence.
//!
//! **Sealing.** The publisher picks a random key and gives it to the control server, which
//! passes it to the watchers with their grants (see `docs/protocol.md`). Each datagram is
//! ChaCha20-Poly1305 under that key. The nonce is a 64-bit sequence number that the datagram
//! carries in clear. The additional data is the publisher's id and the stream.
//!
//! A watcher refuses a sequence number it has seen, or one more than [`REPLAY_WINDOW`] behind
//! the newest. The relay cannot alter a datagram or make one up. Replaying one gets it
//! nothing.

use std::time::{Duration, Instant};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use shoal_protocol::{NodeId, StreamId};

use super::codec::{Ack, DecodeError, Decoded, Decoder, Encoder, Form, MAX_AGE};
use super::{AvatarState, Quantizer};

/// Ticks between key states (a second of the default 60 Hz avatar clock): the longest a
/// watcher that lost one, or just joined, waits to decode again.
pub const KEY_EVERY: u32 = 60;
const _: () = assert!(KEY_EVERY <= MAX_AGE);
/// Updates after a key state that carry a copy of it. Each costs the key state's bytes (about
/// 22) once a second; two cover a burst of loss as long as the 5 Hz watch interval.
pub const KEY_COPIES: u8 = 2;
/// Silence after which a watcher forgets the stream's states and waits for a key state.
pub const STREAM_GAP: Duration = Duration::from_secs(2);
/// Sequence numbers behind the newest a watcher still takes (reordered, not replayed).
pub const REPLAY_WINDOW: u64 = 64;
/// Bytes a sealed datagram adds: the sequence number and the tag.
pub const SEAL_OVERHEAD: usize = 8 + 16;

/// The publisher's side.
#[derive(Debug, Clone)]
pub struct StreamEncoder {
    enc: Encoder,
    key_every: u32,
    /// The tick of the last key state.
    key: Option<u32>,
    /// The last key state's bytes, and how many more updates are to carry them.
    repeat: Option<(Vec<u8>, u8)>,
}

impl StreamEncoder {
    /// A stream whose first update will be a key state.
    pub fn new(q: Quantizer) -> StreamEncoder {
        StreamEncoder { enc: Encoder::new(q), key_every: KEY_EVERY, key: None, repeat: None }
    }

    /// Encodes `state` at `tick`: a key state when one is due, otherwise against the last
    /// (carrying a copy of it if it went in one of the [`KEY_COPIES`] updates before).
    pub fn encode(&mut self, tick: u32, state: &AvatarState) -> (Form, Vec<u8>) {
        if self.key.is_none_or(|k| tick.wrapping_sub(k) >= self.key_every) {
            self.enc.on_ack(Ack { tick: 0, need_full: true });
        }
        let (form, bytes) = self.enc.encode(tick, state);
        let copy = match &mut self.repeat {
            Some((bytes, left)) if form != Form::Full && *left > 0 => {
                *left -= 1;
                Some(bytes.clone())
            }
            _ => None,
        };
        if form == Form::Full
            && let Some(t) = self.enc.last_tick()
        {
            // The key state stands in for an acknowledgement from every watcher.
            self.key = Some(t);
            self.enc.on_ack(Ack { tick: t as u16, need_full: false });
            self.repeat = Some((bytes.clone(), KEY_COPIES)).filter(|(b, _)| b.len() <= usize::from(u8::MAX));
        }
        let copy = copy.unwrap_or_default();
        let mut out = Vec::with_capacity(1 + copy.len() + bytes.len());
        // At most 255 bytes: longer key states are not repeated.
        out.push(copy.len() as u8);
        out.extend_from_slice(&copy);
        out.extend_from_slice(&bytes);
        (form, out)
    }
}

/// A watcher's side.
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    q: Quantizer,
    dec: Decoder,
    last: Option<Instant>,
}

impl StreamDecoder {
    /// A watcher that holds nothing yet.
    pub fn new(q: Quantizer) -> StreamDecoder {
        StreamDecoder { q, dec: Decoder::new(q), last: None }
    }

    /// Decodes one update that arrived at `now` (taking the copy of a key state it carries,
    /// if any, first).
    pub fn decode(&mut self, now: Instant, bytes: &[u8]) -> Result<Decoded, DecodeError> {
        let (&copy, rest) = bytes.split_first().ok_or(DecodeError::Malformed)?;
        let (key, update) = rest.split_at_checked(usize::from(copy)).ok_or(DecodeError::Malformed)?;
        if self.last.is_some_and(|t| now.saturating_duration_since(t) > STREAM_GAP) {
            self.dec = Decoder::new(self.q);
        }
        if !key.is_empty() {
            match self.dec.decode(key)? {
                k if k.form == Form::Full => {}
                _ => return Err(DecodeError::Malformed),
            }
        }
        let d = self.dec.decode(update)?;
        self.last = Some(now);
        Ok(d)
    }
}

/// Why a sealed datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// Too short to hold a sequence number and a tag.
    #[error("stream datagram truncated")]
    Truncated,
    /// Not sealed with the stream's key, or altered.
    #[error("stream datagram does not authenticate")]
    Forged,
    /// A sequence number already taken, or too far behind the newest.
    #[error("stream datagram {0} replayed or too old")]
    Replayed(u64),
}

fn aad(publisher: NodeId, stream: StreamId) -> [u8; 10] {
    let mut a = [0; 10];
    a[..8].copy_from_slice(&publisher.0);
    a[8..].copy_from_slice(&stream.0.to_be_bytes());
    a
}

fn nonce(seq: u64) -> Nonce {
    let mut n = [0; 12];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn key(bytes: &[u8; 32]) -> LessSafeKey {
    // A 32-byte key is what ChaCha20-Poly1305 takes: this cannot fail.
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, bytes).unwrap_or_else(|_| unreachable!()))
}

/// Seals the publisher's datagrams.
pub struct StreamSealer {
    key: LessSafeKey,
    aad: [u8; 10],
    seq: u64,
}

impl std::fmt::Debug for StreamSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSealer").field("seq", &self.seq).finish_non_exhaustive()
    }
}

impl StreamSealer {
    /// Seals `publisher`'s `stream` under `secret`; a new key starts its numbers again.
    pub fn new(secret: &[u8; 32], publisher: NodeId, stream: StreamId) -> StreamSealer {
        StreamSealer { key: key(secret), aad: aad(publisher, stream), seq: 0 }
    }

    /// `plain`, sealed under the next sequence number.
    pub fn seal(&mut self, plain: &[u8]) -> Vec<u8> {
        let seq = self.seq;
        self.seq += 1;
        let mut out = Vec::with_capacity(SEAL_OVERHEAD + plain.len());
        out.extend_from_slice(&seq.to_be_bytes());
        let mut body = plain.to_vec();
        // Sealing in place with a fresh nonce and a buffer we own cannot fail.
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(seq), Aad::from(self.aad), &mut body)
            .unwrap_or_else(|_| unreachable!());
        out.extend_from_slice(&body);
        out.extend_from_slice(tag.as_ref());
        out
    }
}

/// Opens a publisher's datagrams, once each.
pub struct StreamOpener {
    key: LessSafeKey,
    aad: [u8; 10],
    /// The newest sequence number taken, and which of the [`REPLAY_WINDOW`] before it were.
    newest: Option<u64>,
    seen: u64,
}

impl std::fmt::Debug for StreamOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamOpener").field("newest", &self.newest).finish_non_exhaustive()
    }
}

impl StreamOpener {
    /// Opens `publisher`'s `stream` under `secret`.
    pub fn new(secret: &[u8; 32], publisher: NodeId, stream: StreamId) -> StreamOpener {
        StreamOpener { key: key(secret), aad: aad(publisher, stream), newest: None, seen: 0 }
    }

    /// The plaintext of `sealed`, if it authenticates and was not taken before.
    pub fn open(&mut self, sealed: &[u8]) -> Result<Vec<u8>, StreamError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(StreamError::Truncated);
        }
        let mut s = [0; 8];
        s.copy_from_slice(&sealed[..8]);
        let seq = u64::from_be_bytes(s);
        if let Some(n) = self.newest {
            let behind = n.checked_sub(seq);
            if behind.is_some_and(|b| b >= REPLAY_WINDOW || (self.seen >> b) & 1 == 1) {
                return Err(StreamError::Replayed(seq));
            }
        }
        let mut body = sealed[8..].to_vec();
        let plain_len =
            self.key.open_in_place(nonce(seq), Aad::from(self.aad), &mut body).map_err(|_| StreamError::Forged)?.len();
        body.truncate(plain_len);
        match self.newest {
            Some(n) if seq <= n => self.seen |= 1 << (n - seq),
            Some(n) => {
                let ahead = seq - n;
                self.seen = if ahead >= 64 { 0 } else { self.seen << ahead };
                self.seen |= 1;
                self.newest = Some(seq);
            }
            None => {
                self.newest = Some(seq);
                self.seen = 1;
            }
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use glam::{Quat, Vec3};
    use proptest::prelude::*;

    use super::*;
    use crate::avatar::CodecConfig;

    fn q() -> Quantizer {
        Quantizer::new(CodecConfig::default()).unwrap()
    }

    fn state(i: u32) -> AvatarState {
        let t = i as f32 / 60.0;
        AvatarState {
            position: Vec3::new(100.0 + 3.0 * t, 0.0, 200.0 + (t * 0.7).sin() * 5.0),
            orientation: Quat::from_rotation_y(t * 0.3),
            velocity: Vec3::new(3.0, 0.0, (t * 0.7).cos() * 3.5),
            anim: (i / 90) as u16,
        }
    }

    proptest! {
        /// Under any loss of updates, every update a watcher decodes is the state that was
        /// sent, within quantisation; it decodes every update it gets once it caught any copy
        /// of the key state, and otherwise decodes again at the next key state.
        #[test]
        fn a_watcher_never_decodes_a_wrong_state_and_recovers_at_the_next_key(lost in proptest::collection::vec(any::<bool>(), 300)) {
            let (mut enc, mut dec) = (StreamEncoder::new(q()), StreamDecoder::new(q()));
            let t0 = Instant::now();
            // Whether the watcher got the newest key state sent, and how many updates ago
            // it went.
            let (mut holds_key, mut since_key) = (false, u32::MAX);
            // Published at 6 Hz: every tenth tick of the 60 Hz avatar clock.
            for (k, &drop) in lost.iter().enumerate() {
                let tick = 10 * k as u32;
                let s = state(tick);
                let (form, bytes) = enc.encode(tick, &s);
                since_key = if form == Form::Full { 0 } else { since_key.saturating_add(1) };
                if since_key == 0 {
                    holds_key = !drop;
                } else if since_key <= u32::from(KEY_COPIES) {
                    holds_key |= !drop;
                }
                if drop { continue; }
                match dec.decode(t0 + Duration::from_millis(200 * k as u64), &bytes) {
                    Ok(d) => {
                        let want = q().dequantize(&q().quantize(&s));
                        prop_assert!((d.state.position - want.position).length() < 1e-3, "{:?} {:?}", d.state, want);
                        prop_assert_eq!(d.state.anim, want.anim);
                    }
                    // Refused only while the current key state is missing.
                    Err(DecodeError::MissingBaseline { .. } | DecodeError::NoState) => prop_assert!(!holds_key, "update {k}"),
                    Err(e) => prop_assert!(false, "{e}"),
                }
            }
        }

        /// Any datagram not sealed by the key, any bit flipped, any repeat: refused.
        #[test]
        fn only_the_publishers_sealed_datagrams_open_and_each_once(flip in 0usize..(SEAL_OVERHEAD + 20) * 8) {
            let (p, s) = (NodeId([1; 8]), StreamId(0));
            let mut sealer = StreamSealer::new(&[9; 32], p, s);
            let mut opener = StreamOpener::new(&[9; 32], p, s);
            let a = sealer.seal(&[5; 20]);
            let b = sealer.seal(&[6; 20]);
            let mut bad = b.clone();
            bad[flip / 8] ^= 1 << (flip % 8);
            prop_assert!(opener.open(&bad).is_err());
            prop_assert_eq!(opener.open(&b).unwrap(), vec![6; 20]);
            // Reordered: the older one still opens, once.
            prop_assert_eq!(opener.open(&a).unwrap(), vec![5; 20]);
            prop_assert_eq!(opener.open(&a), Err(StreamError::Replayed(0)));
            prop_assert_eq!(opener.open(&b), Err(StreamError::Replayed(1)));
        }
    }

    #[test]
    fn a_relay_cannot_forge_move_or_replay_a_stream() {
        let (p, s) = (NodeId([1; 8]), StreamId(0));
        let mut sealer = StreamSealer::new(&[9; 32], p, s);
        let sealed: Vec<Vec<u8>> = (0..100u8).map(|i| sealer.seal(&[i; 12])).collect();
        // Another key (a relay's guess), another publisher's or stream's name: refused.
        for mut o in [
            StreamOpener::new(&[8; 32], p, s),
            StreamOpener::new(&[9; 32], NodeId([2; 8]), s),
            StreamOpener::new(&[9; 32], p, StreamId(1)),
        ] {
            assert_eq!(o.open(&sealed[0]), Err(StreamError::Forged));
        }
        let mut o = StreamOpener::new(&[9; 32], p, s);
        assert_eq!(o.open(&sealed[99]).unwrap(), vec![99; 12]);
        // Far behind the newest: refused even unseen.
        assert_eq!(o.open(&sealed[10]), Err(StreamError::Replayed(10)));
        assert_eq!(o.open(&sealed[40]).unwrap(), vec![40; 12]);
        assert_eq!(o.open(&sealed[99][..10]), Err(StreamError::Truncated));
    }

    #[test]
    fn a_watcher_that_joins_late_or_hears_nothing_for_a_while_waits_for_a_key_state() {
        let (mut enc, mut dec) = (StreamEncoder::new(q()), StreamDecoder::new(q()));
        let t0 = Instant::now();
        let mut forms = Vec::new();
        for k in 0..40u32 {
            forms.push(enc.encode(10 * k, &state(10 * k)));
        }
        // Key states every 60 ticks, updates every 10: updates 0, 6, 12, ... are full.
        let keys: Vec<usize> = forms.iter().enumerate().filter(|(_, f)| f.0 == Form::Full).map(|(i, _)| i).collect();
        assert_eq!(keys, vec![0, 6, 12, 18, 24, 30, 36]);
        // Joining at update 3: nothing until update 6.
        for (k, (_, b)) in forms.iter().enumerate().skip(3).take(10) {
            let r = dec.decode(t0 + Duration::from_millis(200 * k as u64), b);
            assert_eq!(r.is_ok(), k >= 6, "update {k}: {r:?}");
        }
        // Then three seconds of silence: a delta (with no copy of its key state) is not decoded
        // against what it held.
        let later = t0 + Duration::from_millis(200 * 13 + 3000);
        assert!(dec.decode(later, &forms[15].1).is_err());
        assert!(dec.decode(later, &forms[18].1).is_ok());
    }
}
