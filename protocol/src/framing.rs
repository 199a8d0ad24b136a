//! Framing of control messages on a byte stream, sans-IO: each frame is a u32 big-endian length
//! followed by that many bytes of one [`crate::codec`] frame (version byte, then postcard).
//!
//! [`encode_frame`] makes a frame; a [`FrameDecoder`] is fed whatever bytes the stream gave
//! ([`FrameDecoder::feed`]) and polled for whole frames ([`FrameDecoder::poll_frame`] or, decoded,
//! [`FrameDecoder::poll_message`]) until it has none. The quinn driver in `shoal-link` reads
//! exactly [`FrameDecoder::needed`] bytes at a time, so the buffer never holds more than one
//! frame.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{self, CodecError};

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Why a frame could not be made or taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame longer than the limit. Nothing after it on the stream can be trusted to be a
    /// frame boundary, so a decoder that returned this returns it again from then on.
    #[error("control frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The frame's length (from the prefix, or as encoded).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A whole frame whose body is not the expected message. The stream stays in step: the
    /// next poll reads the next frame.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// `msg` as it goes on the stream: its length, then its codec frame. Fails if the frame would
/// be longer than `max`, which the receiver would refuse.
pub fn encode_frame<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let body = codec::encode(msg)?;
    if body.len() > max || u32::try_from(body.len()).is_err() {
        return Err(FrameError::TooLarge { len: body.len(), max });
    }
    let mut out = Vec::with_capacity(LEN_PREFIX + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Splits a byte stream into frames of at most `max` bytes.
///
/// Call order: [`FrameDecoder::feed`] what arrived, then poll until the poll gives `Ok(None)`
/// (more bytes needed) or [`FrameError::TooLarge`] (the stream is unusable).
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max: usize,
    buf: Vec<u8>,
    /// Set once a prefix announced an oversized frame.
    broken: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max` bytes (not counting the prefix).
    pub fn new(max: usize) -> FrameDecoder {
        FrameDecoder { max, buf: Vec::new(), broken: None }
    }

    /// Appends bytes read from the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.broken.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes fed but not yet taken as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// How many more bytes complete the next prefix or frame: what a reader should read next
    /// so as never to hold more than one frame. 0 when a frame is ready or the stream broken.
    pub fn needed(&self) -> usize {
        if self.broken.is_some() {
            return 0;
        }
        match self.announced() {
            None => LEN_PREFIX - self.buf.len(),
            Some(len) => (LEN_PREFIX + len.min(self.max)).saturating_sub(self.buf.len()),
        }
    }

    /// The length the buffered prefix announces, once all of it is in.
    fn announced(&self) -> Option<usize> {
        let prefix: [u8; LEN_PREFIX] = self.buf.get(..LEN_PREFIX)?.try_into().ok()?;
        Some(u32::from_be_bytes(prefix) as usize)
    }

    /// The next whole frame's bytes (the codec frame, without the prefix), `Ok(None)` if it
    /// has not all arrived.
    #[must_use = "a frame taken is gone from the decoder"]
    pub fn poll_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let Some(len) = self.announced() else { return Ok(None) };
        if len > self.max {
            let e = FrameError::TooLarge { len, max: self.max };
            self.broken = Some(e.clone());
            self.buf = Vec::new();
            return Err(e);
        }
        if self.buf.len() < LEN_PREFIX + len {
            return Ok(None);
        }
        let frame = self.buf[LEN_PREFIX..LEN_PREFIX + len].to_vec();
        self.buf.drain(..LEN_PREFIX + len);
        Ok(Some(frame))
    }

    /// The next whole frame, decoded as a `T`.
    #[must_use = "a message taken is gone from the decoder"]
    pub fn poll_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.poll_frame()? {
            Some(frame) => Ok(Some(codec::decode(&frame, self.max)?)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::control::{ClientToControl, ControlToClient, MAX_CONTROL_FRAME, Refusal};
    use proptest::prelude::*;

    fn messages() -> Vec<ClientToControl> {
        vec![
            ClientToControl::Keepalive,
            ClientToControl::RelayRtts(vec![(crate::NodeId([1; 8]), 12_000)]),
            ClientToControl::CheckIn {
                local: vec!["10.0.0.2:4000".parse().unwrap()],
                mesh_port: 4000,
                reflexive: None,
            },
            ClientToControl::SignOut,
        ]
    }

    fn drain(d: &mut FrameDecoder) -> Vec<ClientToControl> {
        let mut out = Vec::new();
        while let Some(m) = d.poll_message().unwrap() {
            out.push(m);
        }
        out
    }

    #[test]
    fn a_frame_is_its_length_then_the_codec_frame() {
        let f = encode_frame(&ControlToClient::Refused(Refusal::BadCredentials), MAX_CONTROL_FRAME).unwrap();
        let body = codec::encode(&ControlToClient::Refused(Refusal::BadCredentials)).unwrap();
        assert_eq!(f[..LEN_PREFIX], (body.len() as u32).to_be_bytes());
        assert_eq!(f[LEN_PREFIX..], body[..]);
    }

    #[test]
    fn truncated_frames_wait_for_the_rest() {
        let f = encode_frame(&messages()[2], MAX_CONTROL_FRAME).unwrap();
        for cut in 0..f.len() {
            let mut d = FrameDecoder::new(MAX_CONTROL_FRAME);
            d.feed(&f[..cut]);
            assert_eq!(d.poll_frame(), Ok(None), "cut at {cut}");
            assert_eq!(d.needed(), if cut < LEN_PREFIX { LEN_PREFIX - cut } else { f.len() - cut });
            d.feed(&f[cut..]);
            assert_eq!(d.poll_message::<ClientToControl>(), Ok(Some(messages()[2].clone())));
            assert_eq!((d.buffered(), d.needed()), (0, LEN_PREFIX));
        }
    }

    #[test]
    fn an_oversized_frame_is_refused_by_its_prefix_and_breaks_the_stream() {
        let mut d = FrameDecoder::new(16);
        d.feed(&17u32.to_be_bytes());
        let e = FrameError::TooLarge { len: 17, max: 16 };
        assert_eq!(d.poll_frame(), Err(e.clone()));
        assert_eq!(e.to_string(), "control frame of 17 bytes exceeds the limit of 16 bytes");
        d.feed(&encode_frame(&ClientToControl::Keepalive, 16).unwrap());
        assert_eq!(d.poll_frame(), Err(e));
        assert_eq!((d.buffered(), d.needed()), (0, 0));
    }

    #[test]
    fn bytes_fed_after_a_refusal_change_nothing() {
        // A fuzzer's find: four bytes announcing 2,374,864,138, then more bytes in later chunks.
        let mut d = FrameDecoder::new(1);
        d.feed(&[0x8d, 0x8d, 0x8d, 0x0a]);
        let e = FrameError::TooLarge { len: 0x8d8d_8d0a, max: 1 };
        assert_eq!(d.poll_message::<ClientToControl>(), Err(e.clone()));
        d.feed(&[0x0a]);
        assert_eq!(d.poll_message::<ClientToControl>(), Err(e));
        assert_eq!((d.buffered(), d.needed()), (0, 0));
    }

    #[test]
    fn the_encoder_refuses_what_the_receiver_would() {
        let big = ClientToControl::RelayRtts(vec![(crate::NodeId([1; 8]), 1); 100]);
        let len = codec::encode(&big).unwrap().len();
        assert_eq!(encode_frame(&big, 64), Err(FrameError::TooLarge { len, max: 64 }));
    }

    #[test]
    fn a_bad_body_is_an_error_and_the_next_frame_still_decodes() {
        let mut d = FrameDecoder::new(MAX_CONTROL_FRAME);
        d.feed(&[0, 0, 0, 2, 9, 9]);
        d.feed(&encode_frame(&ClientToControl::SignOut, MAX_CONTROL_FRAME).unwrap());
        assert_eq!(d.poll_message::<ClientToControl>(), Err(FrameError::Codec(CodecError::UnsupportedVersion(9))));
        assert_eq!(d.poll_message::<ClientToControl>(), Ok(Some(ClientToControl::SignOut)));
    }

    proptest! {
        #[test]
        fn frames_round_trip_however_the_stream_is_cut(
            picks in proptest::collection::vec(0..4usize, 0..12),
            cuts in proptest::collection::vec(1..40usize, 1..20),
        ) {
            let sent: Vec<ClientToControl> = picks.iter().map(|&i| messages()[i].clone()).collect();
            let stream: Vec<u8> =
                sent.iter().flat_map(|m| encode_frame(m, MAX_CONTROL_FRAME).unwrap()).collect();
            let mut d = FrameDecoder::new(MAX_CONTROL_FRAME);
            let (mut got, mut at) = (Vec::new(), 0);
            for n in cuts.iter().cycle() {
                if at >= stream.len() {
                    break;
                }
                let end = (at + n).min(stream.len());
                d.feed(&stream[at..end]);
                at = end;
                got.extend(drain(&mut d));
            }
            prop_assert_eq!(got, sent);
            prop_assert_eq!(d.buffered(), 0);
        }

        #[test]
        fn arbitrary_chunks_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let mut d = FrameDecoder::new(64);
            for c in &chunks {
                d.feed(c);
                while let Ok(Some(_)) | Err(FrameError::Codec(_)) = d.poll_message::<ControlToClient>() {}
                prop_assert!(d.buffered() < LEN_PREFIX + 64);
            }
        }
    }
}
