//! Arbitrary bytes as a control stream, fed to a `FrameDecoder` in arbitrary chunks. The first
//! byte picks the limit and the chunk sizes; the rest is the stream. However it is cut, the
//! decoder gives the same frames and errors as when fed the whole stream at once, never holds
//! more than one frame, and once it refused an oversized frame refuses everything after.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_protocol::codec;
use shoal_protocol::control::ClientToControl;
use shoal_protocol::framing::{FrameDecoder, FrameError, LEN_PREFIX};

/// What polling gave, in order.
#[derive(Debug, PartialEq)]
enum Got {
    Frame(Vec<u8>),
    /// A decoded message, encoded again (a NaN inside would not compare equal).
    Message(Vec<u8>),
    Bad,
    TooLarge(FrameError),
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else { return };
    let max = [0, 1, 8, 64, 512, 64 * 1024][usize::from(seed % 6)];
    let decode_messages = seed & 0x80 != 0;
    // Chunk sizes cycle through 1..=8 scaled by the seed, so both tiny and large cuts occur.
    let step = usize::from(seed >> 3 & 0x0f) + 1;

    let mut whole = FrameDecoder::new(max);
    whole.feed(stream);
    let expected = drain(&mut whole, max, decode_messages);

    let mut cut = FrameDecoder::new(max);
    let mut got = Vec::new();
    let (mut at, mut i) = (0, 0);
    while at < stream.len() {
        let n = (i % 8 + 1) * step;
        i += 1;
        let end = (at + n).min(stream.len());
        cut.feed(&stream[at..end]);
        at = end;
        got.extend(drain(&mut cut, max, decode_messages));
        if matches!(got.last(), Some(Got::TooLarge(_))) {
            // A reader stops at the first refusal; `drain` checked that polls repeat it.
            break;
        }
    }
    assert_eq!(got, expected);
    assert_eq!(cut.buffered(), whole.buffered());
    assert_eq!(cut.needed(), whole.needed());
});

fn drain(d: &mut FrameDecoder, max: usize, decode_messages: bool) -> Vec<Got> {
    let mut out = Vec::new();
    loop {
        let got = if decode_messages {
            match d.poll_message::<ClientToControl>() {
                Ok(Some(m)) => Got::Message(codec::encode(&m).unwrap_or_default()),
                Ok(None) => break,
                Err(FrameError::Codec(_)) => Got::Bad,
                Err(e) => Got::TooLarge(e),
            }
        } else {
            match d.poll_frame() {
                Ok(Some(f)) => {
                    assert!(f.len() <= max);
                    Got::Frame(f)
                }
                Ok(None) => break,
                Err(FrameError::Codec(e)) => panic!("poll_frame decoded: {e}"),
                Err(e) => Got::TooLarge(e),
            }
        };
        let broken = matches!(got, Got::TooLarge(_));
        out.push(got);
        if broken {
            // Broken for good: the same error again, nothing buffered, nothing needed.
            assert!(matches!(d.poll_frame(), Err(FrameError::TooLarge { .. })));
            assert_eq!((d.buffered(), d.needed()), (0, 0));
            break;
        }
    }
    assert!(d.buffered() < LEN_PREFIX + max.max(1) || d.needed() == 0);
    out
}
