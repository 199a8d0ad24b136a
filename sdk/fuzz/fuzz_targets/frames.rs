//! Arbitrary bytes into `frame::Frame::parse` and, as an opened plaintext, into
//! `frame::parse_items`. Neither may panic; what parses must keep the layout of `sdk/src/frame.rs`:
//! a hello is exactly `HELLO_LEN` bytes and writes back to itself, a sealed frame's packet
//! number and ciphertext sit at their offsets, and items take the bytes `Inner::wire_len` says
//! and write back (`write_items`) to the same bytes, save that a length-prefixed renet packet
//! that ends the plaintext is written back in the shorter form that runs to the end.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_sdk::crypto::TAG_LEN;
use shoal_sdk::frame::{
    self, Frame, FrameError, HELLO, HELLO_LEN, Inner, KIND_RENET, MAX_ADVERTISED, SEALED, parse_items, write_hello,
    write_items,
};

/// Item kind of a renet packet with a length (any item but the last), as `frame.rs` writes it.
const KIND_RENET_PART: u8 = 7;

fuzz_target!(|data: &[u8]| {
    check_frame(data);
    check_items(data);
    // The plaintext of a sealed frame starts after the type and packet number.
    if let Some(p) = data.get(9..) {
        check_items(p);
    }
});

fn check_frame(data: &[u8]) {
    match Frame::parse(data) {
        Ok(Frame::Hello(body, sig)) => {
            assert_eq!(data[0], HELLO);
            assert_eq!(data.len(), HELLO_LEN);
            assert_eq!(write_hello(&body, &sig), data, "a hello does not write back to its bytes");
            let _ = format!("{body:?}");
        }
        Ok(Frame::Sealed { pn, ciphertext }) => {
            assert_eq!(data[0], SEALED);
            assert!(data.len() >= 9 + 1 + TAG_LEN, "sealed frame of {} bytes", data.len());
            assert_eq!(pn.to_be_bytes()[..], data[1..9]);
            assert_eq!(ciphertext, &data[9..]);
        }
        Err(e) => {
            let _ = e.to_string();
            let expected = match data.first() {
                None => FrameError::Empty,
                Some(&k) if k == HELLO || k == SEALED => FrameError::Truncated { kind: k, len: data.len() },
                Some(&k) => FrameError::UnknownType(k),
            };
            assert_eq!(e, expected);
        }
    }
}

fn check_items(p: &[u8]) {
    let items: Vec<Inner<'_>> = match parse_items(p) {
        Ok(items) => items.collect(),
        Err(e) => {
            let _ = e.to_string();
            if p.is_empty() {
                assert_eq!(e, FrameError::Empty);
            }
            return;
        }
    };
    assert!(!items.is_empty(), "a plaintext of {} bytes parsed to no items", p.len());

    // Where each item starts: every item but the last takes `wire_len(false)` bytes, whatever
    // its kind (a renet packet that is not last carries its length).
    let mut at = 0;
    let last = items.len() - 1;
    for (i, item) in items.iter().enumerate() {
        check_item(item);
        let kind = p[at];
        if i < last {
            if let Inner::Renet(_) = item {
                assert_eq!(kind, KIND_RENET_PART, "a renet packet before the last item without a length");
            }
            at += item.wire_len(false);
            assert!(at < p.len(), "item {i} runs past the plaintext");
        } else {
            let took = p.len() - at;
            let extra = if kind == KIND_RENET_PART { 2 } else { 0 };
            assert_eq!(took, item.wire_len(true) + extra, "the last item ({item:?}) took {took} bytes");
            if let Inner::Renet(_) = item {
                assert!(kind == KIND_RENET || kind == KIND_RENET_PART);
            }
        }
    }

    // Written back, the items take the bytes their lengths say, parse to the same items, and
    // match the input but for the last item's shorter form.
    let mut out = Vec::new();
    write_items(&items, &mut out);
    let lens: usize = items.iter().enumerate().map(|(i, it)| it.wire_len(i == last)).sum();
    assert_eq!(out.len(), lens);
    assert!(out.len() <= p.len());
    assert_eq!(out[..at], p[..at], "items before the last do not write back to their bytes");
    if p[at] == KIND_RENET_PART {
        assert_eq!(out[at], KIND_RENET);
        assert_eq!(out[at + 1..], p[at + 3..]);
    } else {
        assert_eq!(out[at..], p[at..], "the last item does not write back to its bytes");
    }
    let back: Vec<Inner<'_>> = match parse_items(&out) {
        Ok(items) => items.collect(),
        Err(e) => panic!("written items do not parse: {e}"),
    };
    assert_eq!(back, items);
}

fn check_item(item: &Inner<'_>) {
    let _ = format!("{item:?}");
    match item {
        Inner::Candidates(c) => {
            assert!(c.addrs().count() <= MAX_ADVERTISED);
            // The same addresses built through the public constructor are the same set.
            let addrs: Vec<_> = c.addrs().collect();
            assert_eq!(frame::Candidates::new(c.seq, &addrs), *c);
        }
        Inner::Renet(_)
        | Inner::Ping { .. }
        | Inner::Pong { .. }
        | Inner::Close(_)
        | Inner::CandidatesAck(_)
        | Inner::Confirm => {}
    }
}
