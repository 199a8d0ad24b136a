//! Control messages over a quinn stream: [`shoal_protocol::framing`] run on a `RecvStream` and
//! a `SendStream`.

use serde::Serialize;
use serde::de::DeserializeOwned;
use shoal_protocol::control::MAX_CONTROL_FRAME;
use shoal_protocol::framing::{FrameDecoder, FrameError, encode_frame};

use crate::LinkError;

/// The receiving half of a control stream, split into frames of at most [`MAX_CONTROL_FRAME`]
/// bytes.
///
/// Reads are cancel-safe: bytes read before a read is dropped stay in the decoder, so a read
/// may race a timer in a `select!`.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl FrameReader {
    /// Frames from `recv`.
    pub fn new(recv: quinn::RecvStream) -> FrameReader {
        FrameReader { recv, decoder: FrameDecoder::new(MAX_CONTROL_FRAME) }
    }

    /// One frame's bytes, undecoded. A frame over the limit is refused by its length prefix
    /// ([`FrameError::TooLarge`]); the stream cannot be resynchronised after it.
    pub async fn read_frame(&mut self) -> Result<Vec<u8>, LinkError> {
        self.next(FrameDecoder::poll_frame).await
    }

    /// One message. A frame that does not decode as a `T` is an error
    /// ([`FrameError::Codec`]), after which the next frame can still be read.
    pub async fn read_message<T: DeserializeOwned>(&mut self) -> Result<T, LinkError> {
        self.next(FrameDecoder::poll_message::<T>).await
    }

    async fn next<R>(
        &mut self,
        poll: impl Fn(&mut FrameDecoder) -> Result<Option<R>, FrameError>,
    ) -> Result<R, LinkError> {
        loop {
            if let Some(r) = poll(&mut self.decoder)? {
                return Ok(r);
            }
            // No more than the frame needs, so the decoder never holds more than one.
            let chunk = self.recv.read_chunk(self.decoder.needed(), true).await;
            match chunk.map_err(|e| LinkError::Closed(e.to_string()))? {
                Some(chunk) => self.decoder.feed(&chunk.bytes),
                None => return Err(LinkError::Closed("the stream ended".into())),
            }
        }
    }
}

/// Writes one message as one frame.
pub async fn write_message<T: Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<(), LinkError> {
    let frame = encode_frame(msg, MAX_CONTROL_FRAME)?;
    send.write_all(&frame).await.map_err(|e| LinkError::Closed(e.to_string()))
}
