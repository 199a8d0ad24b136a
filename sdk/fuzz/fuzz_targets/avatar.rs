//! Arbitrary bytes as avatar messages from a neighbour (`avatar::AvatarMesh::handle_message`)
//! and as updates to a decoder that holds a genuine state (`avatar::Decoder::decode`).
//!
//! Neither may panic. A refused update must leave the decoder as it was (its ack unchanged
//! unless it now asks for a full state); a decoded one must lie within the zone's bounds and
//! the speed limit, and the mesh must still answer for the neighbour's avatar with finite
//! numbers at any time.

#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use shoal_protocol::NodeId;
use shoal_sdk::avatar::{
    AvatarMesh, AvatarState, CodecConfig, Decoder, Encoder, InterpConfig, Quantizer, RateConfig,
};

fn quantizer() -> Quantizer {
    static Q: OnceLock<Quantizer> = OnceLock::new();
    *Q.get_or_init(|| Quantizer::new(CodecConfig::default()).unwrap())
}

fuzz_target!(|data: &[u8]| {
    let q = quantizer();
    let cfg = *q.config();
    // A decoder that holds one genuine full state, then the input as an update.
    let mut enc = Encoder::new(q);
    let mut dec = Decoder::new(q);
    let (_, full) = enc.encode(1000, &AvatarState::default());
    dec.decode(&full).unwrap();
    let before = dec.ack().unwrap();
    match dec.decode(data) {
        Ok(d) => {
            let s = d.state;
            assert!(s.position.cmpge(cfg.min - 0.01).all() && s.position.cmple(cfg.max + 0.01).all(), "{s:?}");
            assert!(s.velocity.abs().max_element() <= cfg.max_speed + cfg.velocity_resolution, "{s:?}");
            assert!(s.orientation.is_finite() && (s.orientation.length() - 1.0).abs() < 1e-3, "{s:?}");
        }
        Err(_) => assert_eq!(dec.ack().unwrap().tick, before.tick),
    }

    // The same bytes, split in two, as messages from a neighbour to a mesh.
    let t0 = Instant::now();
    let peer = NodeId([7; 8]);
    let mut mesh = AvatarMesh::new(q, InterpConfig::default(), RateConfig::default(), 50, t0);
    mesh.set_avatar(AvatarState::default());
    mesh.set_neighbour(t0, peer, 10.0);
    let (_, full) = Encoder::new(q).encode(0, &AvatarState::default());
    let mut msg = vec![4u8];
    msg.extend_from_slice(&full);
    mesh.handle_message(t0, peer, &msg);
    let cut = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    for (i, part) in [&data[..cut], &data[cut..]].into_iter().enumerate() {
        let now = t0 + Duration::from_millis(20 * (i as u64 + 1));
        mesh.handle_message(now, peer, part);
        let _ = mesh.poll_messages(now);
    }
    for ms in [0u64, 50, 500, 5_000] {
        if let Some(s) = mesh.avatar_of(peer, t0 + Duration::from_millis(ms)) {
            assert!(s.position.is_finite() && s.velocity.is_finite() && s.orientation.is_finite(), "{s:?}");
        }
    }
});
