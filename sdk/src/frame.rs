//! VC frames: what a virtual connection puts in the body of a mesh data datagram.
//!
//! ```text
//! hello   [1][ephemeral 32][static key 32][unix ms 8][profile 16][signature 64]     153 bytes
//! sealed  [2][packet number 8][ciphertext][tag 16]
//!         plaintext: [kind 1][body]   kind 1 renet packet, 2 ping(id u32), 3 pong(id u32),
//!                                     4 close(reason u8), 5 candidates(seq u32, addrs),
//!                                     6 candidates ack(seq u32)
//! ```
//! The tag of a sealed frame covers its first 9 bytes and the mesh header's source,
//! destination and VC id, so a relay can neither read a frame nor move it to another VC.

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

/// What a sealed frame carries once opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inner<'a> {
    /// One renet packet.
    Renet(&'a [u8]),
    /// A path probe, answered with a pong on the path it came by.
    Ping(u32),
    /// The answer to a ping, with the data bytes (sealed renet frames other than acks) the
    /// answering side has received over the path the ping came by: the sender's measure of
    /// what the path delivers.
    Pong {
        /// The ping answered.
        ping: u32,
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

    /// Reads `[seq u32][count u8][count addresses]`, addresses as the mesh writes them
    /// ([`wire::write_addr`]); anything else (a count past the limit, a bad family, a short or
    /// long body) is `None`.
    fn read(p: &[u8]) -> Option<Candidates> {
        let seq = u32::from_be_bytes(p.get(..4)?.try_into().ok()?);
        let n = usize::from(*p.get(4)?);
        let addrs = p.get(5..)?;
        if n > MAX_ADVERTISED || addrs.len() != n * wire::ADDR_LEN {
            return None;
        }
        let mut c = Candidates { seq, addrs: [None; MAX_ADVERTISED] };
        for (slot, b) in c.addrs.iter_mut().zip(addrs.chunks_exact(wire::ADDR_LEN)) {
            *slot = Some(wire::read_addr(b).ok()?);
        }
        Some(c)
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

/// Plaintext kind of [`Inner::Renet`].
pub const KIND_RENET: u8 = 1;
const KIND_PING: u8 = 2;
const KIND_PONG: u8 = 3;
const KIND_CLOSE: u8 = 4;
const KIND_CANDIDATES: u8 = 5;
const KIND_CANDIDATES_ACK: u8 = 6;

impl<'a> Inner<'a> {
    /// Reads an opened plaintext.
    pub fn parse(p: &'a [u8]) -> Result<Inner<'a>, FrameError> {
        let kind = *p.first().ok_or(FrameError::Empty)?;
        let id = || -> Result<u32, FrameError> {
            let b: [u8; 4] =
                p.get(1..5).and_then(|s| s.try_into().ok()).ok_or(FrameError::Truncated { kind, len: p.len() })?;
            Ok(u32::from_be_bytes(b))
        };
        match kind {
            KIND_RENET => Ok(Inner::Renet(&p[1..])),
            KIND_PING => Ok(Inner::Ping(id()?)),
            KIND_PONG => {
                let d: [u8; 8] =
                    p.get(5..13).and_then(|s| s.try_into().ok()).ok_or(FrameError::Truncated { kind, len: p.len() })?;
                Ok(Inner::Pong { ping: id()?, delivered: u64::from_be_bytes(d) })
            }
            KIND_CLOSE => Ok(Inner::Close(*p.get(1).ok_or(FrameError::Truncated { kind, len: p.len() })?)),
            KIND_CANDIDATES => {
                Candidates::read(&p[1..]).map(Inner::Candidates).ok_or(FrameError::Malformed { kind, len: p.len() })
            }
            KIND_CANDIDATES_ACK => Ok(Inner::CandidatesAck(id()?)),
            other => Err(FrameError::UnknownKind(other)),
        }
    }

    /// Appends the plaintext to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            Inner::Renet(p) => {
                out.push(KIND_RENET);
                out.extend_from_slice(p);
            }
            Inner::Ping(id) => {
                out.push(KIND_PING);
                out.extend_from_slice(&id.to_be_bytes());
            }
            Inner::Pong { ping, delivered } => {
                out.push(KIND_PONG);
                out.extend_from_slice(&ping.to_be_bytes());
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
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_bytes_parse_to_a_frame_or_an_error(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Frame::parse(&b);
            let _ = Inner::parse(&b);
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
        fn inner_round_trips(id in any::<u32>(), d in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let pong = Inner::Pong { ping: id, delivered: d };
            let v4 = SocketAddr::from(((d as u32).to_be_bytes(), id as u16));
            let v6 = SocketAddr::from(([d as u16; 8], 9));
            let candidates = [
                Inner::Candidates(Candidates::new(id, &[])),
                Inner::Candidates(Candidates::new(id, &[v4, v6, v4, v6])),
                Inner::CandidatesAck(id),
            ];
            for inner in [Inner::Renet(&payload), Inner::Ping(id), pong, Inner::Close(id as u8)].into_iter().chain(candidates) {
                let mut out = Vec::new();
                inner.write(&mut out);
                prop_assert_eq!(Inner::parse(&out).unwrap(), inner);
            }
        }
    }

    #[test]
    fn truncated_inner_frames_are_errors() {
        assert_eq!(Inner::parse(&[KIND_PING, 1, 2]), Err(FrameError::Truncated { kind: KIND_PING, len: 3 }));
        assert_eq!(Inner::parse(&[KIND_PONG, 0, 0, 0, 1, 0]), Err(FrameError::Truncated { kind: KIND_PONG, len: 6 }));
        assert_eq!(Inner::parse(&[KIND_CLOSE]), Err(FrameError::Truncated { kind: KIND_CLOSE, len: 1 }));
        assert_eq!(Inner::parse(&[9]), Err(FrameError::UnknownKind(9)));
        // Candidates: a count past the limit, an unknown family, a cut address, trailing bytes.
        let mut ok = Vec::new();
        Inner::Candidates(Candidates::new(7, &[SocketAddr::from(([10, 0, 0, 1], 4000))])).write(&mut ok);
        assert_eq!(ok.len(), 1 + 4 + 1 + wire::ADDR_LEN);
        let mut bad_family = ok.clone();
        bad_family[6] = 5;
        for bad in [
            vec![KIND_CANDIDATES, 0, 0, 0, 7, 5],
            bad_family,
            ok[..ok.len() - 1].to_vec(),
            [ok.as_slice(), &[0]].concat(),
        ] {
            assert_eq!(Inner::parse(&bad), Err(FrameError::Malformed { kind: KIND_CANDIDATES, len: bad.len() }));
        }
        assert!(Inner::parse(&ok).is_ok());
        assert_eq!(Frame::parse(&[SEALED, 0, 0]).unwrap_err(), FrameError::Truncated { kind: SEALED, len: 3 });
    }
}
