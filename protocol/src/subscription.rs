//! Subscriptions: the control server's word that a node may receive a publisher's stream
//! through one relay until a given time.
//!
//! A relay copies what a publisher publishes to a group, (publisher, relay, stream), to every
//! member, and only the control server makes members: it signs a subscription for each
//! watcher, which presents it to the relay. Like tickets, a subscription has one fixed layout
//! (108 bytes, see `docs/protocol.md`) that the relay verifies offline, holding only the
//! control public key, before anything is allocated for it. It names the relay it is for, so
//! one shown to another relay is refused, and the subscriber, so nobody else can present it.

use crate::identity::{Identity, NODE_ID_LEN, NodeId, PublicKey, SIGNATURE_LEN, Signature};
use crate::ticket::{MAX_CLOCK_SKEW_SECS, UnixTime};

/// Version byte of the subscription layout.
pub const SUBSCRIPTION_VERSION: u8 = 1;
/// Bytes covered by the signature.
pub const SUBSCRIPTION_BODY_LEN: usize = 44;
/// Bytes of a signed subscription on the wire.
pub const SUBSCRIPTION_LEN: usize = SUBSCRIPTION_BODY_LEN + SIGNATURE_LEN;
/// Domain separation for the control key's subscription signatures: a ticket's signature
/// never verifies as a subscription's, nor the other way round.
const SUBSCRIPTION_CONTEXT: &[u8] = b"shoal/subscription/v1";

/// One of a publisher's streams (a player may publish its avatar and, say, its voice apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct StreamId(pub u16);

/// The stream a player's avatar is published on.
pub const AVATAR_STREAM: StreamId = StreamId(0);

/// A fan-out group: what a relay copies to its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Group {
    /// Who publishes to it.
    pub publisher: NodeId,
    /// The publisher's stream.
    pub stream: StreamId,
}

/// What a subscription states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionBody {
    /// Who may receive the copies.
    pub subscriber: NodeId,
    /// Whose stream.
    pub publisher: NodeId,
    /// Which of the publisher's streams.
    pub stream: StreamId,
    /// The relay that copies it: no other relay takes the subscription.
    pub relay: NodeId,
    /// When the control server issued it.
    pub issued_at: UnixTime,
    /// The first second at which it is no longer valid.
    pub expires_at: UnixTime,
}

impl SubscriptionBody {
    /// The group it admits its subscriber to.
    pub fn group(&self) -> Group {
        Group { publisher: self.publisher, stream: self.stream }
    }

    fn encode(&self) -> [u8; SUBSCRIPTION_BODY_LEN] {
        let mut b = [0; SUBSCRIPTION_BODY_LEN];
        b[0] = SUBSCRIPTION_VERSION;
        b[1] = 0;
        b[2..4].copy_from_slice(&self.stream.0.to_be_bytes());
        b[4..12].copy_from_slice(&self.subscriber.0);
        b[12..20].copy_from_slice(&self.publisher.0);
        b[20..28].copy_from_slice(&self.relay.0);
        b[28..36].copy_from_slice(&self.issued_at.0.to_be_bytes());
        b[36..44].copy_from_slice(&self.expires_at.0.to_be_bytes());
        b
    }

    /// Signs the body with the control key.
    pub fn sign(self, control: &Identity) -> SignedSubscription {
        let signature = control.sign(SUBSCRIPTION_CONTEXT, &self.encode());
        SignedSubscription { body: self, signature }
    }
}

/// Why a subscription was refused. Each reason is its own variant so a relay can count them
/// apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    /// Fewer bytes than a subscription's fixed length.
    #[error("subscription truncated: {got} of {SUBSCRIPTION_LEN} bytes")]
    Truncated {
        /// Bytes present.
        got: usize,
    },
    /// A layout version this build does not know.
    #[error("unsupported subscription version {0}")]
    UnsupportedVersion(u8),
    /// A non-zero reserved byte.
    #[error("malformed subscription: reserved byte is not zero")]
    Malformed,
    /// The control key did not sign it (forged or altered).
    #[error("subscription signature is not the control server's")]
    BadSignature,
    /// Made for another relay.
    #[error("subscription is for relay {intended}, not this one")]
    WrongRelay {
        /// The relay it names.
        intended: NodeId,
    },
    /// Presented by a node other than its subscriber.
    #[error("subscription is {subscriber}'s, presented by {presenter}")]
    WrongSubscriber {
        /// The subscriber it names.
        subscriber: NodeId,
        /// Who presented it.
        presenter: NodeId,
    },
    /// Its validity ended.
    #[error("subscription expired at {expires_at} (now {now})")]
    Expired {
        /// End of validity.
        expires_at: UnixTime,
        /// The verifier's time.
        now: UnixTime,
    },
    /// Issued further in the future than clock skew explains.
    #[error("subscription issued at {issued_at}, in the future (now {now})")]
    NotYetValid {
        /// Claimed issue time.
        issued_at: UnixTime,
        /// The verifier's time.
        now: UnixTime,
    },
}

/// A subscription with the control server's signature, as carried on the wire.
///
/// Decoding checks only the layout; call [`SignedSubscription::verify`] before trusting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedSubscription {
    /// What it states.
    pub body: SubscriptionBody,
    /// The control key's signature over the encoded body.
    pub signature: Signature,
}

impl SignedSubscription {
    /// The fixed wire form.
    pub fn encode(&self) -> [u8; SUBSCRIPTION_LEN] {
        let mut out = [0; SUBSCRIPTION_LEN];
        out[..SUBSCRIPTION_BODY_LEN].copy_from_slice(&self.body.encode());
        out[SUBSCRIPTION_BODY_LEN..].copy_from_slice(&self.signature.0);
        out
    }

    /// Reads a subscription from the first [`SUBSCRIPTION_LEN`] bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<SignedSubscription, SubscriptionError> {
        if bytes.len() < SUBSCRIPTION_LEN {
            return Err(SubscriptionError::Truncated { got: bytes.len() });
        }
        if bytes[0] != SUBSCRIPTION_VERSION {
            return Err(SubscriptionError::UnsupportedVersion(bytes[0]));
        }
        if bytes[1] != 0 {
            return Err(SubscriptionError::Malformed);
        }
        let id_at = |at: usize| {
            let mut b = [0; NODE_ID_LEN];
            b.copy_from_slice(&bytes[at..at + NODE_ID_LEN]);
            NodeId(b)
        };
        let u64_at = |at: usize| {
            let mut b = [0; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let mut sig = [0; SIGNATURE_LEN];
        sig.copy_from_slice(&bytes[SUBSCRIPTION_BODY_LEN..SUBSCRIPTION_LEN]);
        let body = SubscriptionBody {
            stream: StreamId(u16::from_be_bytes([bytes[2], bytes[3]])),
            subscriber: id_at(4),
            publisher: id_at(12),
            relay: id_at(20),
            issued_at: UnixTime(u64_at(28)),
            expires_at: UnixTime(u64_at(36)),
        };
        Ok(SignedSubscription { body, signature: Signature(sig) })
    }

    /// Checks that `presenter` may receive the group's copies from `relay` at `now`: the
    /// subscription names both, is within its validity window, and the control key signed it.
    ///
    /// Cheap checks run first, so a stale or misdirected subscription costs no signature
    /// verification.
    pub fn verify(
        &self,
        control: &PublicKey,
        relay: NodeId,
        presenter: NodeId,
        now: UnixTime,
    ) -> Result<SubscriptionBody, SubscriptionError> {
        let b = &self.body;
        if b.relay != relay {
            return Err(SubscriptionError::WrongRelay { intended: b.relay });
        }
        if b.subscriber != presenter {
            return Err(SubscriptionError::WrongSubscriber { subscriber: b.subscriber, presenter });
        }
        if now >= b.expires_at {
            return Err(SubscriptionError::Expired { expires_at: b.expires_at, now });
        }
        if b.issued_at.0 > now.0.saturating_add(MAX_CLOCK_SKEW_SECS) {
            return Err(SubscriptionError::NotYetValid { issued_at: b.issued_at, now });
        }
        control
            .verify(SUBSCRIPTION_CONTEXT, &b.encode(), &self.signature)
            .map_err(|_| SubscriptionError::BadSignature)?;
        Ok(*b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ticket::{Roles, SignedTicket, TicketBody, TicketKind};
    use proptest::prelude::*;

    fn control() -> Identity {
        Identity::from_seed([9; 32])
    }

    fn id(b: u8) -> NodeId {
        Identity::from_seed([b; 32]).node_id()
    }

    fn body(issued: u64, ttl: u64) -> SubscriptionBody {
        SubscriptionBody {
            subscriber: id(1),
            publisher: id(2),
            stream: StreamId(7),
            relay: id(3),
            issued_at: UnixTime(issued),
            expires_at: UnixTime(issued + ttl),
        }
    }

    #[test]
    fn a_valid_subscription_verifies_for_its_relay_and_subscriber() {
        let s = SignedSubscription::decode(&body(1000, 60).sign(&control()).encode()).unwrap();
        let b = s.verify(&control().public_key(), id(3), id(1), UnixTime(1010)).unwrap();
        assert_eq!(b.group(), Group { publisher: id(2), stream: StreamId(7) });
    }

    #[test]
    fn every_refusal_is_its_own_error() {
        let ctl = control().public_key();
        let s = body(1000, 60).sign(&control());
        let at = |now| s.verify(&ctl, id(3), id(1), UnixTime(now));
        assert_eq!(at(1060), Err(SubscriptionError::Expired { expires_at: UnixTime(1060), now: UnixTime(1060) }));
        assert!(matches!(at(900), Err(SubscriptionError::NotYetValid { .. })));
        // Shown to another relay, or presented by someone else.
        assert_eq!(
            s.verify(&ctl, id(4), id(1), UnixTime(1010)),
            Err(SubscriptionError::WrongRelay { intended: id(3) })
        );
        let e = s.verify(&ctl, id(3), id(5), UnixTime(1010)).unwrap_err();
        assert_eq!(e, SubscriptionError::WrongSubscriber { subscriber: id(1), presenter: id(5) });
        assert!(e.to_string().contains("presented by"), "{e}");
        // Signed by someone other than the control key.
        let forged = body(1000, 60).sign(&Identity::from_seed([66; 32]));
        assert_eq!(forged.verify(&ctl, id(3), id(1), UnixTime(1010)), Err(SubscriptionError::BadSignature));
        // Altered by the holder: another publisher's stream, a later expiry.
        for alter in [
            (|b: &mut SubscriptionBody| b.publisher = id(8)) as fn(&mut SubscriptionBody),
            |b| b.stream = StreamId(8),
            |b| b.expires_at = UnixTime(999_999),
        ] {
            let mut t = s;
            alter(&mut t.body);
            assert_eq!(t.verify(&ctl, id(3), id(1), UnixTime(1010)), Err(SubscriptionError::BadSignature));
        }
        let mut bytes = s.encode();
        bytes[0] = 2;
        assert_eq!(SignedSubscription::decode(&bytes), Err(SubscriptionError::UnsupportedVersion(2)));
        let mut bytes = s.encode();
        bytes[1] = 1;
        assert_eq!(SignedSubscription::decode(&bytes), Err(SubscriptionError::Malformed));
    }

    /// The control key signs tickets too: a permit's signature must not pass for a
    /// subscription's, whatever the bytes line up to.
    #[test]
    fn a_ticket_signature_is_no_subscription_signature() {
        let node = Identity::from_seed([1; 32]);
        let permit: SignedTicket =
            TicketBody::new(TicketKind::RelayPermit, node.public_key(), Roles::CLIENT, UnixTime(1000), 60)
                .sign(&control());
        let mut s = body(1000, 60).sign(&control());
        s.signature = permit.signature;
        assert_eq!(
            s.verify(&control().public_key(), id(3), id(1), UnixTime(1010)),
            Err(SubscriptionError::BadSignature)
        );
    }

    #[test]
    fn truncated_at_every_length_is_an_error() {
        let bytes = body(1000, 60).sign(&control()).encode();
        for len in 0..SUBSCRIPTION_LEN {
            assert_eq!(SignedSubscription::decode(&bytes[..len]), Err(SubscriptionError::Truncated { got: len }));
        }
    }

    proptest! {
        #[test]
        fn round_trip(a in any::<[u8; 8]>(), b in any::<[u8; 8]>(), r in any::<[u8; 8]>(), stream in any::<u16>(), issued in any::<u32>(), ttl in any::<u32>()) {
            let s = SubscriptionBody {
                subscriber: NodeId(a),
                publisher: NodeId(b),
                stream: StreamId(stream),
                relay: NodeId(r),
                issued_at: UnixTime(issued.into()),
                expires_at: UnixTime(u64::from(issued) + u64::from(ttl)),
            }
            .sign(&control());
            prop_assert_eq!(SignedSubscription::decode(&s.encode()), Ok(s));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(s) = SignedSubscription::decode(&bytes) {
                let _ = s.verify(&control().public_key(), id(3), id(1), UnixTime(0));
            }
        }

        #[test]
        fn any_flipped_bit_is_refused(bit in 0usize..SUBSCRIPTION_LEN * 8) {
            let mut bytes = body(1000, 60).sign(&control()).encode();
            bytes[bit / 8] ^= 1 << (bit % 8);
            let verdict = SignedSubscription::decode(&bytes)
                .and_then(|s| s.verify(&control().public_key(), id(3), id(1), UnixTime(1010)));
            prop_assert!(verdict.is_err());
        }
    }
}
