//! Tickets: short-lived statements signed by the control key.
//!
//! A *session ticket* says who a node is and which roles it holds; a *relay permit* says that
//! a node may send through relays until a given time. Both have one fixed 124-byte layout (see
//! `docs/protocol.md`) so that relays can verify them offline, holding only the control public
//! key, and without an allocator-heavy decoder on the path of an untrusted datagram.

use std::fmt;

use crate::identity::{Identity, NODE_ID_LEN, NodeId, PUBLIC_KEY_LEN, PublicKey, SIGNATURE_LEN, Signature};

/// Version byte of the ticket layout.
pub const TICKET_VERSION: u8 = 1;
/// Bytes covered by the signature.
pub const TICKET_BODY_LEN: usize = 60;
/// Bytes of a signed ticket on the wire.
pub const TICKET_LEN: usize = TICKET_BODY_LEN + SIGNATURE_LEN;
/// Domain separation for the control key's ticket signatures.
const TICKET_CONTEXT: &[u8] = b"shoal/ticket/v1";
/// How far a ticket's issue time may lie in the verifier's future (clock skew allowance).
pub const MAX_CLOCK_SKEW_SECS: u64 = 30;

/// Seconds since the Unix epoch, as read by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct UnixTime(pub u64);

/// What a ticket grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TicketKind {
    /// Who the node is and which roles it holds.
    Session = 1,
    /// The node may send through relays until the ticket expires.
    RelayPermit = 2,
}

impl TicketKind {
    fn from_u8(b: u8) -> Option<TicketKind> {
        match b {
            1 => Some(TicketKind::Session),
            2 => Some(TicketKind::RelayPermit),
            _ => None,
        }
    }
}

/// The roles a ticket grants, as a bit set.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
pub struct Roles(pub u8);

impl Roles {
    /// A player's client.
    pub const CLIENT: Roles = Roles(1);
    /// A relay node: may forward on behalf of others.
    pub const RELAY: Roles = Roles(2);
    /// A hosting server.
    pub const HOSTING: Roles = Roles(4);
    /// Every bit this version defines.
    pub const KNOWN: Roles = Roles(7);

    /// Whether every role in `other` is in `self`.
    pub fn contains(self, other: Roles) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Roles {
    type Output = Roles;
    fn bitor(self, rhs: Roles) -> Roles {
        Roles(self.0 | rhs.0)
    }
}

impl fmt::Debug for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Roles({self})")
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [(Roles::CLIENT, "client"), (Roles::RELAY, "relay"), (Roles::HOSTING, "hosting")]
            .into_iter()
            .filter_map(|(bit, name)| self.contains(bit).then_some(name))
            .collect();
        f.write_str(if names.is_empty() { "none".into() } else { names.join("|") }.as_str())
    }
}

impl fmt::Display for TicketKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TicketKind::Session => "session ticket",
            TicketKind::RelayPermit => "relay permit",
        })
    }
}

impl fmt::Display for UnixTime {
    /// Seconds since the Unix epoch, marked as such.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} s since the Unix epoch", self.0)
    }
}

/// The signed part of a ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TicketBody {
    /// Session ticket or relay permit.
    pub kind: TicketKind,
    /// The node the ticket is about; must match `public_key`.
    pub node_id: NodeId,
    /// The node's long-term key, so a verifier can check the node's own signatures.
    pub public_key: PublicKey,
    /// Roles granted.
    pub roles: Roles,
    /// When the control server issued it.
    pub issued_at: UnixTime,
    /// The first second at which it is no longer valid.
    pub expires_at: UnixTime,
}

impl TicketBody {
    /// A body for `public_key`, valid from `issued_at` for `ttl_secs`.
    pub fn new(
        kind: TicketKind,
        public_key: PublicKey,
        roles: Roles,
        issued_at: UnixTime,
        ttl_secs: u64,
    ) -> TicketBody {
        TicketBody {
            kind,
            node_id: public_key.node_id(),
            public_key,
            roles,
            issued_at,
            expires_at: UnixTime(issued_at.0.saturating_add(ttl_secs)),
        }
    }

    fn encode(&self) -> [u8; TICKET_BODY_LEN] {
        let mut b = [0; TICKET_BODY_LEN];
        b[0] = TICKET_VERSION;
        b[1] = self.kind as u8;
        b[2] = self.roles.0;
        b[3] = 0;
        b[4..12].copy_from_slice(&self.node_id.0);
        b[12..44].copy_from_slice(&self.public_key.0);
        b[44..52].copy_from_slice(&self.issued_at.0.to_be_bytes());
        b[52..60].copy_from_slice(&self.expires_at.0.to_be_bytes());
        b
    }

    /// Signs the body with the control key.
    pub fn sign(self, control: &Identity) -> SignedTicket {
        let signature = control.sign(TICKET_CONTEXT, &self.encode());
        SignedTicket { body: self, signature }
    }
}

/// Why a ticket was refused. Each reason is its own variant so callers can count them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// Fewer bytes than a ticket's fixed length.
    #[error("ticket truncated: {got} of {TICKET_LEN} bytes")]
    Truncated {
        /// Bytes present.
        got: usize,
    },
    /// A layout version this build does not know.
    #[error("unsupported ticket version {0}")]
    UnsupportedVersion(u8),
    /// A kind byte this build does not know.
    #[error("unknown ticket kind {0}")]
    UnknownKind(u8),
    /// Role bits this build does not know, or a non-zero reserved byte.
    #[error("malformed ticket: {0}")]
    Malformed(&'static str),
    /// The node id does not belong to the public key in the ticket.
    #[error("ticket node id does not match its public key")]
    KeyMismatch,
    /// The control key did not sign this ticket (forged or altered).
    #[error("ticket signature is not the control server's")]
    BadSignature,
    /// A ticket of another kind was presented.
    #[error("expected a {expected}, got a {found}")]
    WrongKind {
        /// Kind the verifier asked for.
        expected: TicketKind,
        /// Kind presented.
        found: TicketKind,
    },
    /// The ticket lacks a role the verifier requires.
    #[error("ticket lacks the role {required} (it grants {granted})")]
    WrongRole {
        /// Roles the verifier requires.
        required: Roles,
        /// Roles the ticket grants.
        granted: Roles,
    },
    /// The ticket's validity ended.
    #[error("ticket expired at {expires_at} (now {now})")]
    Expired {
        /// End of validity.
        expires_at: UnixTime,
        /// The verifier's time.
        now: UnixTime,
    },
    /// The ticket was issued further in the future than clock skew explains.
    #[error("ticket issued at {issued_at}, in the future (now {now})")]
    NotYetValid {
        /// Claimed issue time.
        issued_at: UnixTime,
        /// The verifier's time.
        now: UnixTime,
    },
}

/// A ticket with the control server's signature, as carried on the wire.
///
/// Decoding checks only the layout; call [`SignedTicket::verify`] before trusting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedTicket {
    /// What the ticket states.
    pub body: TicketBody,
    /// The control key's signature over the encoded body.
    pub signature: Signature,
}

impl SignedTicket {
    /// The fixed wire form.
    pub fn encode(&self) -> [u8; TICKET_LEN] {
        let mut out = [0; TICKET_LEN];
        out[..TICKET_BODY_LEN].copy_from_slice(&self.body.encode());
        out[TICKET_BODY_LEN..].copy_from_slice(&self.signature.0);
        out
    }

    /// Reads a ticket from the first [`TICKET_LEN`] bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<SignedTicket, TicketError> {
        if bytes.len() < TICKET_LEN {
            return Err(TicketError::Truncated { got: bytes.len() });
        }
        if bytes[0] != TICKET_VERSION {
            return Err(TicketError::UnsupportedVersion(bytes[0]));
        }
        let kind = TicketKind::from_u8(bytes[1]).ok_or(TicketError::UnknownKind(bytes[1]))?;
        let roles = Roles(bytes[2]);
        if !Roles::KNOWN.contains(roles) {
            return Err(TicketError::Malformed("unknown role bits"));
        }
        if bytes[3] != 0 {
            return Err(TicketError::Malformed("reserved byte is not zero"));
        }
        let mut node_id = [0; NODE_ID_LEN];
        node_id.copy_from_slice(&bytes[4..12]);
        let mut key = [0; PUBLIC_KEY_LEN];
        key.copy_from_slice(&bytes[12..44]);
        let mut sig = [0; SIGNATURE_LEN];
        sig.copy_from_slice(&bytes[TICKET_BODY_LEN..TICKET_LEN]);
        let u64_at = |at: usize| {
            let mut b = [0; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let body = TicketBody {
            kind,
            node_id: NodeId(node_id),
            public_key: PublicKey(key),
            roles,
            issued_at: UnixTime(u64_at(44)),
            expires_at: UnixTime(u64_at(52)),
        };
        if body.public_key.node_id() != body.node_id {
            return Err(TicketError::KeyMismatch);
        }
        Ok(SignedTicket { body, signature: Signature(sig) })
    }

    /// Checks the control key's signature, the kind, the roles and the validity window.
    ///
    /// Cheap checks run first, so a stale or wrong ticket costs no signature verification.
    pub fn verify(
        &self,
        control: &PublicKey,
        kind: TicketKind,
        required: Roles,
        now: UnixTime,
    ) -> Result<VerifiedTicket, TicketError> {
        let b = &self.body;
        if b.kind != kind {
            return Err(TicketError::WrongKind { expected: kind, found: b.kind });
        }
        if !b.roles.contains(required) {
            return Err(TicketError::WrongRole { required, granted: b.roles });
        }
        if now >= b.expires_at {
            return Err(TicketError::Expired { expires_at: b.expires_at, now });
        }
        if b.issued_at.0 > now.0.saturating_add(MAX_CLOCK_SKEW_SECS) {
            return Err(TicketError::NotYetValid { issued_at: b.issued_at, now });
        }
        control.verify(TICKET_CONTEXT, &b.encode(), &self.signature).map_err(|_| TicketError::BadSignature)?;
        Ok(VerifiedTicket { body: *b })
    }
}

/// A ticket whose signature, kind, roles and validity were checked at some time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedTicket {
    /// What the ticket states.
    pub body: TicketBody,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn control() -> Identity {
        Identity::from_seed([9; 32])
    }

    fn permit(node: &Identity, issued: u64, ttl: u64) -> SignedTicket {
        TicketBody::new(TicketKind::RelayPermit, node.public_key(), Roles::CLIENT, UnixTime(issued), ttl)
            .sign(&control())
    }

    #[test]
    fn valid_permit_verifies() {
        let node = Identity::from_seed([1; 32]);
        let t = SignedTicket::decode(&permit(&node, 1000, 60).encode()).unwrap();
        let v = t.verify(&control().public_key(), TicketKind::RelayPermit, Roles::CLIENT, UnixTime(1010)).unwrap();
        assert_eq!(v.body.node_id, node.node_id());
    }

    #[test]
    fn every_refusal_is_its_own_error() {
        let node = Identity::from_seed([1; 32]);
        let ctl = control().public_key();
        let t = permit(&node, 1000, 60);
        assert_eq!(
            t.verify(&ctl, TicketKind::RelayPermit, Roles::CLIENT, UnixTime(1060)),
            Err(TicketError::Expired { expires_at: UnixTime(1060), now: UnixTime(1060) })
        );
        assert!(matches!(
            t.verify(&ctl, TicketKind::RelayPermit, Roles::CLIENT, UnixTime(900)),
            Err(TicketError::NotYetValid { .. })
        ));
        let e = t.verify(&ctl, TicketKind::Session, Roles::CLIENT, UnixTime(1010)).unwrap_err();
        assert!(matches!(e, TicketError::WrongKind { .. }));
        assert_eq!(e.to_string(), "expected a session ticket, got a relay permit");
        let e = t.verify(&ctl, TicketKind::RelayPermit, Roles::RELAY, UnixTime(1010)).unwrap_err();
        assert!(matches!(e, TicketError::WrongRole { .. }));
        assert_eq!(e.to_string(), "ticket lacks the role relay (it grants client)");
        assert_eq!(
            TicketError::Expired { expires_at: UnixTime(1060), now: UnixTime(1061) }.to_string(),
            "ticket expired at 1060 s since the Unix epoch (now 1061 s since the Unix epoch)"
        );
        assert_eq!(format!("{:?} {}", Roles(0), Roles::CLIENT | Roles::HOSTING), "Roles(none) client|hosting");
        // Signed by someone other than the control key.
        let forged = TicketBody::new(TicketKind::RelayPermit, node.public_key(), Roles::CLIENT, UnixTime(1000), 60)
            .sign(&Identity::from_seed([66; 32]));
        assert_eq!(
            forged.verify(&ctl, TicketKind::RelayPermit, Roles::CLIENT, UnixTime(1010)),
            Err(TicketError::BadSignature)
        );
        // Expiry extended by the holder: signature no longer matches.
        let mut stretched = t;
        stretched.body.expires_at = UnixTime(999_999);
        assert_eq!(
            stretched.verify(&ctl, TicketKind::RelayPermit, Roles::CLIENT, UnixTime(1010)),
            Err(TicketError::BadSignature)
        );
        // Node id swapped for someone else's.
        let mut bytes = t.encode();
        bytes[4] ^= 1;
        assert_eq!(SignedTicket::decode(&bytes), Err(TicketError::KeyMismatch));
        let mut bytes = t.encode();
        bytes[0] = 2;
        assert_eq!(SignedTicket::decode(&bytes), Err(TicketError::UnsupportedVersion(2)));
        let mut bytes = t.encode();
        bytes[1] = 7;
        assert_eq!(SignedTicket::decode(&bytes), Err(TicketError::UnknownKind(7)));
    }

    #[test]
    fn truncated_at_every_length_is_an_error() {
        let node = Identity::from_seed([1; 32]);
        let bytes = permit(&node, 1000, 60).encode();
        for len in 0..TICKET_LEN {
            assert_eq!(SignedTicket::decode(&bytes[..len]), Err(TicketError::Truncated { got: len }));
        }
    }

    proptest! {
        #[test]
        fn round_trip(seed in any::<[u8; 32]>(), roles in 0u8..8, issued in any::<u32>(), ttl in any::<u32>(), session in any::<bool>()) {
            let node = Identity::from_seed(seed);
            let kind = if session { TicketKind::Session } else { TicketKind::RelayPermit };
            let t = TicketBody::new(kind, node.public_key(), Roles(roles), UnixTime(issued.into()), ttl.into()).sign(&control());
            prop_assert_eq!(SignedTicket::decode(&t.encode()), Ok(t));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(t) = SignedTicket::decode(&bytes) {
                let _ = t.verify(&control().public_key(), TicketKind::RelayPermit, Roles::CLIENT, UnixTime(0));
            }
        }

        #[test]
        fn any_flipped_bit_is_refused(bit in 0usize..TICKET_LEN * 8) {
            let node = Identity::from_seed([3; 32]);
            let mut bytes = permit(&node, 1000, 60).encode();
            bytes[bit / 8] ^= 1 << (bit % 8);
            let verdict = SignedTicket::decode(&bytes)
                .and_then(|t| t.verify(&control().public_key(), TicketKind::RelayPermit, Roles::CLIENT, UnixTime(1010)));
            prop_assert!(verdict.is_err());
        }
    }
}
