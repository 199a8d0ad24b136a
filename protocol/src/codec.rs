//! Framing of serde control messages: one version byte, then the postcard encoding.
//!
//! Control-plane messages are named by direction (`ClientToControl`, `ControlToClient`, ...)
//! by the crates that define them; this module only frames and bounds them, so that every
//! message type gets the same answer to a foreign version, an oversized frame or garbage.

use serde::{Serialize, de::DeserializeOwned};

/// Version byte leading every control message frame.
pub const CONTROL_VERSION: u8 = 1;

/// Why a control frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// An empty frame.
    #[error("empty frame")]
    Empty,
    /// A frame from a protocol version this build does not speak.
    #[error("unsupported control protocol version {0}")]
    UnsupportedVersion(u8),
    /// A frame over the receiver's limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Frame length.
        len: usize,
        /// The receiver's limit.
        max: usize,
    },
    /// The body is not a valid encoding of the expected message (unknown variant, truncation,
    /// trailing bytes).
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Encodes `msg` behind the version byte.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    postcard::to_extend(msg, vec![CONTROL_VERSION]).map_err(|e| CodecError::Malformed(e.to_string()))
}

/// Decodes one frame of at most `max` bytes. Trailing bytes are an error: a frame is exactly
/// one message.
pub fn decode<T: DeserializeOwned>(frame: &[u8], max: usize) -> Result<T, CodecError> {
    if frame.len() > max {
        return Err(CodecError::TooLarge { len: frame.len(), max });
    }
    let (&version, body) = frame.split_first().ok_or(CodecError::Empty)?;
    if version != CONTROL_VERSION {
        return Err(CodecError::UnsupportedVersion(version));
    }
    let (msg, rest) = postcard::take_from_bytes(body).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CodecError::Malformed(format!("{} trailing bytes", rest.len())));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    enum Sample {
        Ping(u64),
        Hello { name: String, roles: u8 },
    }

    #[test]
    fn refusals() {
        let frame = encode(&Sample::Ping(5)).unwrap();
        assert_eq!(decode::<Sample>(&frame, 2), Err(CodecError::TooLarge { len: frame.len(), max: 2 }));
        assert_eq!(decode::<Sample>(&[], 10), Err(CodecError::Empty));
        assert_eq!(decode::<Sample>(&[9, 0], 10), Err(CodecError::UnsupportedVersion(9)));
        assert!(matches!(decode::<Sample>(&[1, 77], 10), Err(CodecError::Malformed(_))));
        let mut long = frame.clone();
        long.push(0);
        assert!(matches!(decode::<Sample>(&long, 100), Err(CodecError::Malformed(_))));
    }

    proptest! {
        #[test]
        fn round_trip(n in any::<u64>(), name in ".{0,40}", roles in any::<u8>()) {
            for msg in [Sample::Ping(n), Sample::Hello { name: name.clone(), roles }] {
                prop_assert_eq!(decode::<Sample>(&encode(&msg).unwrap(), 1024), Ok(msg));
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode::<Sample>(&bytes, 1024);
        }
    }
}
