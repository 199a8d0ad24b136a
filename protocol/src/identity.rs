//! Long-term node identities: an ed25519 key pair, and the short [`NodeId`] derived from its
//! public key that names the node on the wire.

use std::fmt;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

/// Bytes of a [`NodeId`] on the wire.
pub const NODE_ID_LEN: usize = 8;
/// Bytes of an ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Bytes of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// The short, fixed-size name of a node on the wire: the first 8 bytes of SHA-256 over its
/// public key.
///
/// It is a name, not a credential: whoever claims a `NodeId` proves it with the full public
/// key inside a signed ticket and a signature made with the matching secret key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct NodeId(pub [u8; NODE_ID_LEN]);

impl NodeId {
    /// The id of the node holding `key`.
    pub fn from_public_key(key: &PublicKey) -> NodeId {
        let digest = ring::digest::digest(&ring::digest::SHA256, &key.0);
        let mut id = [0; NODE_ID_LEN];
        id.copy_from_slice(&digest.as_ref()[..NODE_ID_LEN]);
        NodeId(id)
    }

    /// The id as a big-endian integer, for compact logs and hashing.
    pub fn to_u64(self) -> u64 {
        u64::from_be_bytes(self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for NodeId {
    type Err = HexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(NodeId(parse_hex(s)?))
    }
}

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PublicKey(pub [u8; PUBLIC_KEY_LEN]);

impl PublicKey {
    /// Checks `signature` over `context || message`. The context separates the uses of one
    /// key (tickets, bind proofs) so a signature made for one can never be replayed as another.
    pub fn verify(&self, context: &[u8], message: &[u8], signature: &Signature) -> Result<(), SignatureError> {
        let mut buf = Vec::with_capacity(context.len() + message.len());
        buf.extend_from_slice(context);
        buf.extend_from_slice(message);
        UnparsedPublicKey::new(&ED25519, &self.0).verify(&buf, &signature.0).map_err(|_| SignatureError)
    }

    /// The node id this key names.
    pub fn node_id(&self) -> NodeId {
        NodeId::from_public_key(self)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for PublicKey {
    type Err = HexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(PublicKey(parse_hex(s)?))
    }
}

/// An ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; SIGNATURE_LEN]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Signature(..)")
    }
}

// serde implements arrays only up to 32 elements; a signature travels as 64 raw bytes.
impl serde::Serialize for Signature {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Signature {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Signature, D::Error> {
        struct Bytes64;
        impl serde::de::Visitor<'_> for Bytes64 {
            type Value = Signature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{SIGNATURE_LEN} bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Signature, E> {
                let a: [u8; SIGNATURE_LEN] = v.try_into().map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(Signature(a))
            }
        }
        d.deserialize_bytes(Bytes64)
    }
}

/// A signature did not match the key and message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("signature does not match the key and message")]
pub struct SignatureError;

/// The operating system's random source gave no bytes for a new key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the operating system's random source failed; no key could be made")]
pub struct RandomnessError;

/// A hex string was not the expected number of hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected {expected} hex digits")]
pub struct HexError {
    /// Hex digits expected.
    pub expected: usize,
}

/// Parses exactly `N` bytes of hex.
pub fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N], HexError> {
    let err = HexError { expected: N * 2 };
    let s = s.trim().as_bytes();
    if s.len() != N * 2 {
        return Err(err);
    }
    let mut out = [0; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16).ok_or(err.clone())?;
        let lo = (pair[1] as char).to_digit(16).ok_or(err.clone())?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Ok(out)
}

/// Formats bytes as lower-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A node's long-term key pair.
///
/// Made from a 32-byte seed so that the simulator can derive identities from its own seeded
/// random source; [`Identity::generate`] draws the seed from the operating system.
pub struct Identity {
    seed: [u8; 32],
    pair: Ed25519KeyPair,
    public: PublicKey,
    id: NodeId,
}

impl Identity {
    /// The identity whose secret key is `seed`.
    pub fn from_seed(seed: [u8; 32]) -> Identity {
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed)
            // ring only rejects seeds of the wrong length, which the array type rules out.
            .unwrap_or_else(|_| unreachable!("a 32-byte ed25519 seed is always valid"));
        let mut public = [0; PUBLIC_KEY_LEN];
        public.copy_from_slice(pair.public_key().as_ref());
        let public = PublicKey(public);
        Identity { seed, pair, id: public.node_id(), public }
    }

    /// A new identity with a seed from the operating system's random source.
    pub fn generate() -> Result<Identity, RandomnessError> {
        use ring::rand::{SecureRandom, SystemRandom};
        let mut seed = [0; 32];
        SystemRandom::new().fill(&mut seed).map_err(|_| RandomnessError)?;
        Ok(Identity::from_seed(seed))
    }

    /// The secret seed, for storing the identity in a key file.
    pub fn seed(&self) -> &[u8; 32] {
        &self.seed
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// The short wire name.
    pub fn node_id(&self) -> NodeId {
        self.id
    }

    /// Signs `context || message` (see [`PublicKey::verify`]).
    pub fn sign(&self, context: &[u8], message: &[u8]) -> Signature {
        let mut buf = Vec::with_capacity(context.len() + message.len());
        buf.extend_from_slice(context);
        buf.extend_from_slice(message);
        let mut sig = [0; SIGNATURE_LEN];
        sig.copy_from_slice(self.pair.sign(&buf).as_ref());
        Signature(sig)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity::from_seed(self.seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify_with_context() {
        let id = Identity::from_seed([7; 32]);
        let sig = id.sign(b"ctx-a", b"hello");
        assert!(id.public_key().verify(b"ctx-a", b"hello", &sig).is_ok());
        assert_eq!(id.public_key().verify(b"ctx-b", b"hello", &sig), Err(SignatureError));
        assert_eq!(id.public_key().verify(b"ctx-a", b"hellO", &sig), Err(SignatureError));
    }

    #[test]
    fn a_generated_identity_fails_with_an_error_that_boxes() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        // `?` into a boxed error (as into anyhow's) needs a std error type.
        let (a, b) = (Identity::generate()?, Identity::generate()?);
        assert_ne!(a.node_id(), b.node_id());
        assert!(!RandomnessError.to_string().is_empty());
        Ok(())
    }

    #[test]
    fn node_id_is_stable_and_hex_round_trips() {
        let a = Identity::from_seed([1; 32]);
        assert_eq!(a.node_id(), Identity::from_seed([1; 32]).node_id());
        assert_ne!(a.node_id(), Identity::from_seed([2; 32]).node_id());
        let text = a.node_id().to_string();
        assert_eq!(text.parse::<NodeId>(), Ok(a.node_id()));
        assert_eq!(a.public_key().to_string().parse::<PublicKey>(), Ok(a.public_key()));
        assert!("zz".parse::<NodeId>().is_err());
    }
}
