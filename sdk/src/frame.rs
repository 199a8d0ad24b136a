//! VC frames: what a virtual connection puts in the body of a mesh data datagram.
//!
//! ```text
//! hello   [1][ephemeral 32][static key 32][unix ms 8][profile 16][signature 64]     153 bytes
//! sealed  [2][packet number 8][ciphertext][tag 16]
//!         plaintext: one or more items, each [kind 1][body]:
//!           1 renet packet, to the end of the plaintext (the last item)
//!           7 renet packet with a length [len u16][packet] (any item but the last)
//!           2 ping (id u32), answered at once        8 ping (id u32), answer may wait
//!           3 pong (id u32, held µs u16, delivered u64)
//!           4 close (reason u8)
//!           5 candidates (seq u32, count u8, addresses)   6 candidates ack (seq u32)
//!           9 confirm (nothing: proof that the sender holds the keys)
//!          10 message, to the end of the plaintext (the last item)
//!          11 message with a length [len u16][message] (any item but the last)
//!          12 short id (u32): send to me in the short form under this id
//! short   (the datagram itself, on a direct path, in place of the mesh header and a sealed
//!          frame's first 9 bytes)
//!         [0x81][short id 4][packet number, low 16 bits][ciphertext][tag 16]
//! ```
//! Messages of an unreliable VC small enough for one frame travel as message items, not
//! through renet: nothing is resent or reordered for them, so renet's sequence numbers,
//! channel and counts would only cost bytes. The packet number orders them (latest wins).
//!
//! The short form is what an established direct VC sends once the peer has told it, in a
//! sealed short-id item, the 4-byte id its node knows the VC by: 23 bytes of headers above
//! UDP where a sealed frame in a mesh datagram takes 50. The receiver finds the VC by the id
//! and takes the full packet number as the one nearest above the highest it has seen with
//! those low 16 bits, as QUIC does; the tag is computed over the same additional data as the
//! long form's (with the full packet number and both node ids), so a wrong guess or a
//! forged id fails authentication.
//! The tag of a sealed frame covers its first 9 bytes and the mesh header's source,
//! destination and VC id, so a relay can neither read a frame nor move it to another VC.
//!
//! Several items share one frame so that path measurement rides on data: a ping or a pong
//! costs 5 or 15 bytes inside a frame that goes anyway instead of a datagram of its own, and
//! renet's acks travel with the data they answer.

use std::net::SocketAddr;

use shoal_mesh::wire::{self, VcId};
use shoal_protocol::identity::SIGNATURE_LEN;
use shoal_protocol::{NodeId, PublicKey, Signature};

use crate::crypto::{AAD_LEN, HelloBody, TAG_LEN};
use crate::profile::PROFILE_WIRE_LEN;

/// Frame type of a hello.
pub const HELLO: u8 = 1;
/// Frame type of a sealed frame.
pub const SEALED: u8 = 2;
/// Bytes of a hello frame.
pub const HELLO_LEN: usize = 1 + 32 + 32 + 8 + PROFILE_WIRE_LEN + SIGNATURE_LEN;
/// Bytes a sealed frame adds around its plaintext (type, packet number, kind, tag).
pub const SEALED_OVERHEAD: usize = 1 + 8 + 1 + TAG_LEN;

/// Why a frame could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than its type requires.
    #[error("frame of type {kind} truncated at {len} bytes")]
    Truncated {
        /// Frame type byte.
        kind: u8,
        /// Bytes present.
        len: usize,
    },
    /// A sealed kind whose body does not hold together (a bad count, family or length).
    #[error("malformed body of sealed kind {kind} ({len} bytes)")]
    Malformed {
        /// Plaintext kind byte.
        kind: u8,
        /// Bytes present.
        len: usize,
    },
    /// A frame type this version does not know.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// A sealed frame whose plaintext kind this version does not know.
    #[error("unknown sealed kind {0}")]
    UnknownKind(u8),
    /// Empty datagram body.
    #[error("empty frame")]
    Empty,
}

/// A frame as read off the wire.
#[derive(Debug)]
pub enum Frame<'a> {
    /// The peer's half of the key exchange.
    Hello(HelloBody, Signature),
    /// An encrypted frame: its packet number and ciphertext with tag.
    Sealed {
        /// Packet number (nonce).
        pn: u64,
        /// Ciphertext followed by the tag.
        ciphertext: &'a [u8],
    },
}

impl<'a> Frame<'a> {
    /// Reads a frame; never panics on any input.
    pub fn parse(b: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        let kind = *b.first().ok_or(FrameError::Empty)?;
        let truncated = FrameError::Truncated { kind, len: b.len() };
        match kind {
            HELLO => {
                if b.len() != HELLO_LEN {
                    return Err(truncated);
                }
                let mut at = 1;
                let mut take = |n: usize| {
                    let s = &b[at..at + n];
                    at += n;
                    s
                };
                let mut ephemeral = [0; 32];
                ephemeral.copy_from_slice(take(32));
                let mut key = [0; 32];
                key.copy_from_slice(take(32));
                let mut ms = [0; 8];
                ms.copy_from_slice(take(8));
                let mut profile = [0; PROFILE_WIRE_LEN];
                profile.copy_from_slice(take(PROFILE_WIRE_LEN));
                let mut sig = [0; SIGNATURE_LEN];
                sig.copy_from_slice(take(SIGNATURE_LEN));
                let body =
                    HelloBody { ephemeral, static_key: PublicKey(key), unix_ms: u64::from_be_bytes(ms), profile };
                Ok(Frame::Hello(body, Signature(sig)))
            }
            SEALED => {
                if b.len() < 9 + 1 + TAG_LEN {
                    return Err(truncated);
                }
                let mut pn = [0; 8];
                pn.copy_from_slice(&b[1..9]);
                Ok(Frame::Sealed { pn: u64::from_be_bytes(pn), ciphertext: &b[9..] })
            }
            other => Err(FrameError::UnknownType(other)),
        }
    }
}

/// Writes a hello frame.
pub fn write_hello(h: &HelloBody, sig: &Signature) -> Vec<u8> {
    let mut b = Vec::with_capacity(HELLO_LEN);
    b.push(HELLO);
    b.extend_from_slice(&h.ephemeral);
    b.extend_from_slice(&h.static_key.0);
    b.extend_from_slice(&h.unix_ms.to_be_bytes());
    b.extend_from_slice(&h.profile);
    b.extend_from_slice(&sig.0);
    b
}

/// The additional data of a sealed frame from `source` to `destination` on `vc`.
pub fn aad(pn: u64, source: NodeId, destination: NodeId, vc: VcId) -> [u8; AAD_LEN] {
    let mut a = [0; AAD_LEN];
    a[0] = SEALED;
    a[1..9].copy_from_slice(&pn.to_be_bytes());
    a[9..17].copy_from_slice(&source.0);
    a[17..25].copy_from_slice(&destination.0);
    a[25..29].copy_from_slice(&vc.0.to_be_bytes());
    a
}

/// One item of a sealed frame, once opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inner<'a> {
    /// One renet packet.
    Renet(&'a [u8]),
    /// A path probe, answered with a pong on the path it came by. An urgent ping is answered
    /// at once; another may wait up to [`PONG_HOLD`] for a frame going that way anyway.
    Ping {
        /// Its id.
        id: u32,
        /// Whether the answer must leave at once.
        urgent: bool,
    },
    /// The answer to a ping, with the data bytes (sealed renet frames other than acks) the
    /// answering side has received over the path the ping came by: the sender's measure of
    /// what the path delivers.
    Pong {
        /// The ping answered.
        ping: u32,
        /// How long the answer waited for a frame to ride on, in units of [`HELD_UNIT`]; not
        /// part of the path's RTT.
        held: u16,
        /// Data bytes received over the path so far.
        delivered: u64,
    },
    /// The peer closed the VC.
    Close(u8),
    /// The peer's own direct addresses changed (its NAT mapping or its network did): punch
    /// these. Repeated until acknowledged.
    Candidates(Candidates),
    /// The peer has our [`Inner::Candidates`] of this sequence number.
    CandidatesAck(u32),
    /// Nothing but proof that the sender holds the keys: sent once they are agreed, so the
    /// other side stops repeating its hello even on a VC that has nothing to say.
    Confirm,
    /// One message of an unreliable VC, outside renet.
    Message(&'a [u8]),
    /// The id the sender's node knows this VC by: short-form datagrams to it carry it.
    ShortId(u32),
}

/// Longest a lazy ping's answer waits for a frame to ride on. A lazy ping samples the RTT of a
/// path the peer's data already shows alive, or keeps a quiet one open: nothing waits on its
/// answer, and one that went alone would cost a datagram. Long enough for a neighbour served
/// at the avatar floor (2 Hz) to carry it with its next update.
pub const PONG_HOLD: std::time::Duration = std::time::Duration::from_millis(500);

/// The unit of a pong's hold time on the wire: 16 µs, so that a `u16` spans [`PONG_HOLD`]
/// (up to 1.05 s) at a resolution far below any RTT.
pub const HELD_UNIT: std::time::Duration = std::time::Duration::from_micros(16);

/// `held` as it goes in a pong: in [`HELD_UNIT`]s, saturating.
pub fn held_units(held: std::time::Duration) -> u16 {
    (held.as_micros() / HELD_UNIT.as_micros()).min(u128::from(u16::MAX)) as u16
}

/// Most addresses one [`Inner::Candidates`] carries.
pub const MAX_ADVERTISED: usize = 4;

/// A node's direct addresses as it advertises them to a peer: a sequence number (a later one
/// replaces an earlier one) and up to [`MAX_ADVERTISED`] addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidates {
    /// Increases with every new set.
    pub seq: u32,
    addrs: [Option<SocketAddr>; MAX_ADVERTISED],
}

impl Candidates {
    /// The first [`MAX_ADVERTISED`] of `addrs` under `seq`.
    pub fn new(seq: u32, addrs: &[SocketAddr]) -> Candidates {
        let mut c = Candidates { seq, addrs: [None; MAX_ADVERTISED] };
        for (slot, a) in c.addrs.iter_mut().zip(addrs) {
            *slot = Some(*a);
        }
        c
    }

    /// The addresses.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.addrs.iter().flatten().copied()
    }

    /// Reads `[seq u32][count u8][count addresses]` at the start of `p`, addresses as the mesh
    /// writes them ([`wire::write_addr`]); returns it and the bytes it took. A count past the
    /// limit, a bad family or a short body is `None`.
    fn read(p: &[u8]) -> Option<(Candidates, usize)> {
        let seq = u32::from_be_bytes(p.get(..4)?.try_into().ok()?);
        let n = usize::from(*p.get(4)?);
        if n > MAX_ADVERTISED {
            return None;
        }
        let len = 5 + n * wire::ADDR_LEN;
        let addrs = p.get(5..len)?;
        let mut c = Candidates { seq, addrs: [None; MAX_ADVERTISED] };
        for (slot, b) in c.addrs.iter_mut().zip(addrs.chunks_exact(wire::ADDR_LEN)) {
            *slot = Some(wire::read_addr(b).ok()?);
        }
        Some((c, len))
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.push(self.addrs().count() as u8);
        for a in self.addrs() {
            let at = out.len();
            out.resize(at + wire::ADDR_LEN, 0);
            wire::write_addr(a, &mut out[at..]);
        }
    }
}

/// Renet's type byte for an ack-only packet.
pub(crate) const RENET_ACK: u8 = 4;

/// Item kind of a renet packet that runs to the end of the plaintext.
pub const KIND_RENET: u8 = 1;
const KIND_PING: u8 = 2;
const KIND_PONG: u8 = 3;
const KIND_CLOSE: u8 = 4;
const KIND_CANDIDATES: u8 = 5;
const KIND_CANDIDATES_ACK: u8 = 6;
const KIND_RENET_PART: u8 = 7;
const KIND_PING_LAZY: u8 = 8;
const KIND_CONFIRM: u8 = 9;
const KIND_MESSAGE: u8 = 10;
const KIND_MESSAGE_PART: u8 = 11;
const KIND_SHORT_ID: u8 = 12;

/// First byte of a short-form datagram: no mesh header starts with it (its version bit is
/// set), so relays and the mesh layer refuse it as an unknown version.
pub const SHORT: u8 = 0x81;
/// Bytes of a short-form datagram before its ciphertext: the marker, the short id and the
/// low 16 bits of the packet number.
pub const SHORT_HEADER_LEN: usize = 7;

/// Bytes a ping item takes.
pub const PING_ITEM_LEN: usize = 5;
/// Bytes a pong item takes.
pub const PONG_ITEM_LEN: usize = 15;

impl<'a> Inner<'a> {
    /// Reads the item at the start of `p`; returns it and the bytes it took.
    fn read(p: &'a [u8]) -> Result<(Inner<'a>, usize), FrameError> {
        let kind = *p.first().ok_or(FrameError::Empty)?;
        let truncated = FrameError::Truncated { kind, len: p.len() };
        let u32_at = |at: usize| -> Result<u32, FrameError> {
            let b: [u8; 4] = p.get(at..at + 4).and_then(|s| s.try_into().ok()).ok_or(truncated)?;
            Ok(u32::from_be_bytes(b))
        };
        match kind {
            KIND_RENET => Ok((Inner::Renet(&p[1..]), p.len())),
            KIND_RENET_PART => read_part(p, truncated).map(|(b, len)| (Inner::Renet(b), len)),
            KIND_PING | KIND_PING_LAZY => {
                Ok((Inner::Ping { id: u32_at(1)?, urgent: kind == KIND_PING }, PING_ITEM_LEN))
            }
            KIND_PONG => {
                let h: [u8; 2] = p.get(5..7).and_then(|s| s.try_into().ok()).ok_or(truncated)?;
                let d: [u8; 8] = p.get(7..15).and_then(|s| s.try_into().ok()).ok_or(truncated)?;
                let pong =
                    Inner::Pong { ping: u32_at(1)?, held: u16::from_be_bytes(h), delivered: u64::from_be_bytes(d) };
                Ok((pong, PONG_ITEM_LEN))
            }
            KIND_CLOSE => Ok((Inner::Close(*p.get(1).ok_or(truncated)?), 2)),
            KIND_CANDIDATES => {
                let (c, len) = Candidates::read(&p[1..]).ok_or(FrameError::Malformed { kind, len: p.len() })?;
                Ok((Inner::Candidates(c), 1 + len))
            }
            KIND_CANDIDATES_ACK => Ok((Inner::CandidatesAck(u32_at(1)?), 5)),
            KIND_CONFIRM => Ok((Inner::Confirm, 1)),
            KIND_MESSAGE => Ok((Inner::Message(&p[1..]), p.len())),
            KIND_MESSAGE_PART => read_part(p, truncated).map(|(b, len)| (Inner::Message(b), len)),
            KIND_SHORT_ID => Ok((Inner::ShortId(u32_at(1)?), 5)),
            other => Err(FrameError::UnknownKind(other)),
        }
    }

    /// Appends the item to `out`; `last` says whether another item follows.
    fn write_item(&self, out: &mut Vec<u8>, last: bool) {
        match self {
            Inner::Renet(p) => write_body(out, if last { KIND_RENET } else { KIND_RENET_PART }, p),
            Inner::Ping { id, urgent } => {
                out.push(if *urgent { KIND_PING } else { KIND_PING_LAZY });
                out.extend_from_slice(&id.to_be_bytes());
            }
            Inner::Pong { ping, held, delivered } => {
                out.push(KIND_PONG);
                out.extend_from_slice(&ping.to_be_bytes());
                out.extend_from_slice(&held.to_be_bytes());
                out.extend_from_slice(&delivered.to_be_bytes());
            }
            Inner::Close(r) => out.extend_from_slice(&[KIND_CLOSE, *r]),
            Inner::Candidates(c) => {
                out.push(KIND_CANDIDATES);
                c.write(out);
            }
            Inner::CandidatesAck(seq) => {
                out.push(KIND_CANDIDATES_ACK);
                out.extend_from_slice(&seq.to_be_bytes());
            }
            Inner::Confirm => out.push(KIND_CONFIRM),
            Inner::Message(m) => write_body(out, if last { KIND_MESSAGE } else { KIND_MESSAGE_PART }, m),
            Inner::ShortId(id) => {
                out.push(KIND_SHORT_ID);
                out.extend_from_slice(&id.to_be_bytes());
            }
        }
    }

    /// Whether the item carries the game's data: a message, or a renet packet other than an
    /// ack.
    pub fn is_data(&self) -> bool {
        match self {
            Inner::Renet(p) => p.first() != Some(&RENET_ACK),
            Inner::Message(_) => true,
            _ => false,
        }
    }

    /// Bytes the item takes on the wire when `last` says whether another follows.
    pub fn wire_len(&self, last: bool) -> usize {
        match self {
            Inner::Renet(p) => p.len() + if last { 1 } else { 3 },
            Inner::Ping { .. } => PING_ITEM_LEN,
            Inner::Pong { .. } => PONG_ITEM_LEN,
            Inner::Close(_) => 2,
            Inner::Candidates(c) => 6 + c.addrs().count() * wire::ADDR_LEN,
            Inner::CandidatesAck(_) => 5,
            Inner::Confirm => 1,
            Inner::Message(m) => m.len() + if last { 1 } else { 3 },
            Inner::ShortId(_) => 5,
        }
    }
}

/// Appends a renet packet or a message as item `kind`: to the end of the plaintext, or with
/// a length first (the part kinds).
fn write_body(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    out.push(kind);
    if matches!(kind, KIND_RENET_PART | KIND_MESSAGE_PART) {
        // Packets and messages are at most a datagram long, far below u16::MAX.
        let len = body.len().min(usize::from(u16::MAX));
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.extend_from_slice(&body[..len]);
    } else {
        out.extend_from_slice(body);
    }
}

/// Reads a part item at the start of `p` (kind, length u16, body): the body and the bytes
/// the item took.
fn read_part(p: &[u8], truncated: FrameError) -> Result<(&[u8], usize), FrameError> {
    let b: [u8; 2] = p.get(1..3).and_then(|s| s.try_into().ok()).ok_or(truncated)?;
    let len = 3 + usize::from(u16::from_be_bytes(b));
    Ok((p.get(3..len).ok_or(truncated)?, len))
}

/// Appends the plaintext of a frame holding `items`, in order, to `out`.
pub fn write_items(items: &[Inner<'_>], out: &mut Vec<u8>) {
    for (i, item) in items.iter().enumerate() {
        item.write_item(out, i + 1 == items.len());
    }
}

/// The items of an opened plaintext, checked whole: an error anywhere refuses the frame, so
/// nothing of a malformed frame takes effect.
pub fn parse_items(p: &[u8]) -> Result<Items<'_>, FrameError> {
    if p.is_empty() {
        return Err(FrameError::Empty);
    }
    let mut at = 0;
    while at < p.len() {
        let (_, len) = Inner::read(&p[at..])?;
        at += len;
    }
    Ok(Items { p, at: 0 })
}

/// The items of a plaintext that [`parse_items`] checked.
#[derive(Debug, Clone)]
pub struct Items<'a> {
    p: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Items<'a> {
    type Item = Inner<'a>;

    fn next(&mut self) -> Option<Inner<'a>> {
        let (item, len) = Inner::read(self.p.get(self.at..)?).ok()?;
        self.at += len;
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn write(items: &[Inner<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        write_items(items, &mut out);
        out
    }

    fn inner_strategy() -> impl Strategy<Value = (u8, u32, u64, u16, Vec<u8>)> {
        (0u8..10, any::<u32>(), any::<u64>(), any::<u16>(), proptest::collection::vec(any::<u8>(), 0..64))
    }

    fn make<'a>((k, id, d, h, payload): &'a (u8, u32, u64, u16, Vec<u8>)) -> Inner<'a> {
        let v4 = SocketAddr::from(((*d as u32).to_be_bytes(), *id as u16));
        let v6 = SocketAddr::from(([*d as u16; 8], 9));
        match k {
            0 => Inner::Renet(payload),
            1 => Inner::Ping { id: *id, urgent: d % 2 == 0 },
            2 => Inner::Pong { ping: *id, held: *h, delivered: *d },
            3 => Inner::Close(*id as u8),
            4 => Inner::Candidates(Candidates::new(*id, &[])),
            5 => Inner::Candidates(Candidates::new(*id, &[v4, v6, v4, v6])),
            6 => Inner::CandidatesAck(*id),
            7 if d % 2 == 0 => Inner::Confirm,
            8 => Inner::Message(payload),
            9 => Inner::ShortId(*id),
            _ => Inner::Candidates(Candidates::new(*id, &[v6])),
        }
    }

    proptest! {
        #[test]
        fn any_bytes_parse_to_a_frame_or_an_error(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Frame::parse(&b);
            if let Ok(items) = parse_items(&b) {
                prop_assert!(items.count() > 0);
            }
        }

        #[test]
        fn hello_round_trips(e in any::<[u8; 32]>(), k in any::<[u8; 32]>(), ms in any::<u64>(), p in any::<[u8; 16]>()) {
            let h = HelloBody { ephemeral: e, static_key: PublicKey(k), unix_ms: ms, profile: p };
            let bytes = write_hello(&h, &Signature([3; 64]));
            prop_assert_eq!(bytes.len(), HELLO_LEN);
            match Frame::parse(&bytes).unwrap() {
                Frame::Hello(back, sig) => { prop_assert_eq!(back, h); prop_assert_eq!(sig, Signature([3; 64])); }
                Frame::Sealed { .. } => prop_assert!(false),
            }
            for cut in 0..bytes.len() {
                prop_assert!(Frame::parse(&bytes[..cut]).is_err());
            }
        }

        #[test]
        fn items_round_trip_in_any_combination(raw in proptest::collection::vec(inner_strategy(), 1..6)) {
            let items: Vec<Inner<'_>> = raw.iter().map(make).collect();
            let bytes = write(&items);
            let lens: usize = items.iter().enumerate().map(|(i, it)| it.wire_len(i + 1 == items.len())).sum();
            prop_assert_eq!(bytes.len(), lens);
            let back: Vec<Inner<'_>> = parse_items(&bytes).unwrap().collect();
            prop_assert_eq!(back, items);
        }

        #[test]
        fn a_cut_frame_never_reads_as_its_whole(raw in proptest::collection::vec(inner_strategy(), 1..4)) {
            let items: Vec<Inner<'_>> = raw.iter().map(make).collect();
            let bytes = write(&items);
            for cut in 0..bytes.len() {
                // A cut either fails, or reads as different items (a renet packet that runs to
                // the end is shorter): never as the frame that was written.
                if let Ok(back) = parse_items(&bytes[..cut]) {
                    prop_assert_ne!(back.collect::<Vec<_>>(), items.clone());
                }
            }
        }
    }

    #[test]
    fn truncated_and_malformed_items_refuse_the_whole_frame() {
        let one = |b: &[u8]| parse_items(b).map(|i| i.count());
        assert_eq!(one(&[KIND_PING, 1, 2]), Err(FrameError::Truncated { kind: KIND_PING, len: 3 }));
        assert_eq!(one(&[KIND_PONG, 0, 0, 0, 1, 0]), Err(FrameError::Truncated { kind: KIND_PONG, len: 6 }));
        assert_eq!(one(&[KIND_CLOSE]), Err(FrameError::Truncated { kind: KIND_CLOSE, len: 1 }));
        assert_eq!(one(&[KIND_RENET_PART, 0, 5, 1, 2]), Err(FrameError::Truncated { kind: KIND_RENET_PART, len: 5 }));
        assert_eq!(one(&[KIND_MESSAGE_PART, 0, 5, 1]), Err(FrameError::Truncated { kind: KIND_MESSAGE_PART, len: 4 }));
        assert_eq!(one(&[KIND_SHORT_ID, 0, 1]), Err(FrameError::Truncated { kind: KIND_SHORT_ID, len: 3 }));
        assert_eq!(one(&[13]), Err(FrameError::UnknownKind(13)));
        assert_eq!(one(&[]), Err(FrameError::Empty));
        // A good ping followed by garbage: nothing of the frame is taken.
        assert_eq!(one(&[KIND_PING, 0, 0, 0, 1, 42]), Err(FrameError::UnknownKind(42)));
        // Candidates: a count past the limit, an unknown family, a cut address.
        let ok = write(&[Inner::Candidates(Candidates::new(7, &[SocketAddr::from(([10, 0, 0, 1], 4000))]))]);
        assert_eq!(ok.len(), 1 + 4 + 1 + wire::ADDR_LEN);
        let mut bad_family = ok.clone();
        bad_family[6] = 5;
        for bad in [vec![KIND_CANDIDATES, 0, 0, 0, 7, 5], bad_family, ok[..ok.len() - 1].to_vec()] {
            assert_eq!(one(&bad), Err(FrameError::Malformed { kind: KIND_CANDIDATES, len: bad.len() }));
        }
        // Trailing bytes after candidates are another item, and here not a valid one.
        assert!(one(&[ok.as_slice(), &[0]].concat()).is_err());
        assert_eq!(one(&ok), Ok(1));
        assert_eq!(Frame::parse(&[SEALED, 0, 0]).unwrap_err(), FrameError::Truncated { kind: SEALED, len: 3 });
    }

    #[test]
    fn measurement_rides_on_renet_packets() {
        let data = [7u8; 40];
        let ack = [4u8, 1, 2];
        let items = [
            Inner::Ping { id: 9, urgent: false },
            Inner::Pong { ping: 3, held: 75, delivered: 10 },
            Inner::Renet(&ack),
            Inner::Renet(&data),
        ];
        let bytes = write(&items);
        // Only the non-final renet packet pays for a length.
        assert_eq!(bytes.len(), PING_ITEM_LEN + PONG_ITEM_LEN + 3 + ack.len() + 1 + data.len());
        assert_eq!(parse_items(&bytes).unwrap().collect::<Vec<_>>(), items);
    }
}
