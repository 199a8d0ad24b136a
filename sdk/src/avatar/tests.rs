//! The codec's promises: what comes back is within the quantisation error, and under any loss
//! and reordering of updates and acks the receiver decodes exactly the state the sender
//! encoded for that tick, or refuses; never a state against a baseline the sender did not use.

#![allow(clippy::unwrap_used)]

use glam::{Quat, Vec3};
use proptest::prelude::*;

use super::*;

fn quantizer() -> Quantizer {
    Quantizer::new(CodecConfig::default()).unwrap()
}

fn state() -> impl Strategy<Value = AvatarState> {
    let cfg = CodecConfig::default();
    let coord = |a: usize| cfg.min[a]..cfg.max[a];
    let speed = -cfg.max_speed..cfg.max_speed;
    (
        (coord(0), coord(1), coord(2)),
        (-1.0f32..1.0, -1.0f32..1.0, -1.0f32..1.0, -1.0f32..1.0),
        (speed.clone(), speed.clone(), speed),
        any::<u16>(),
    )
        .prop_filter_map("a quaternion of some length", |(p, r, v, anim)| {
            let q = Quat::from_xyzw(r.0, r.1, r.2, r.3);
            (q.length() > 0.1).then(|| AvatarState {
                position: Vec3::new(p.0, p.1, p.2),
                orientation: q.normalize(),
                velocity: Vec3::new(v.0, v.1, v.2),
                anim,
            })
        })
}

fn assert_close(q: &Quantizer, want: &AvatarState, got: &AvatarState) {
    let perr = q.position_error() * 1.001 + 1e-4;
    let verr = q.velocity_error() * 1.001 + 1e-5;
    for a in 0..3 {
        assert!((want.position[a] - got.position[a]).abs() <= perr, "position {want:?} came back {got:?}");
        assert!((want.velocity[a] - got.velocity[a]).abs() <= verr, "velocity {want:?} came back {got:?}");
    }
    let angle = want.orientation.angle_between(got.orientation);
    assert!(angle <= q.orientation_error(), "orientation off by {angle} rad (bound {})", q.orientation_error());
    assert_eq!(want.anim, got.anim);
}

proptest! {
    #[test]
    fn a_full_state_comes_back_within_the_quantisation_error(s in state()) {
        let q = quantizer();
        let mut enc = Encoder::new(q);
        let mut dec = Decoder::new(q);
        let (form, bytes) = enc.encode(7, &s);
        prop_assert_eq!(form, Form::Full);
        let d = dec.decode(&bytes).unwrap();
        prop_assert_eq!(d.tick, 7);
        assert_close(&q, &s, &d.state);
    }

    #[test]
    fn a_delta_against_any_baseline_comes_back_within_the_quantisation_error(
        base in state(), s in state(), age in 1u32..=MAX_AGE,
    ) {
        let q = quantizer();
        let mut enc = Encoder::new(q);
        let mut dec = Decoder::new(q);
        let (_, bytes) = enc.encode(1000, &base);
        dec.decode(&bytes).unwrap();
        enc.on_ack(dec.ack().unwrap());
        let (form, bytes) = enc.encode(1000 + age, &s);
        prop_assert!(form != Form::Full);
        let d = dec.decode(&bytes).unwrap();
        assert_close(&q, &s, &d.state);
        prop_assert_eq!(d.quantized, q.quantize(&s));
    }

    /// Updates and acks are each dropped, delayed or delivered out of order as the pattern
    /// says; every update decoded is exactly the state encoded for its tick.
    #[test]
    fn under_any_loss_and_reordering_the_receiver_never_decodes_a_wrong_state(
        pattern in proptest::collection::vec((0u8..10, 0u8..8, 0u8..10, 0u8..8), 50..300),
        seed_state in state(),
    ) {
        let q = quantizer();
        let mut enc = Encoder::new(q);
        let mut dec = Decoder::new(q);
        let mut sent = std::collections::BTreeMap::new();
        // (deliver at step, tick, bytes) and (deliver at step, ack).
        let mut updates: Vec<(usize, u32, Vec<u8>)> = Vec::new();
        let mut acks: Vec<(usize, Ack)> = Vec::new();
        let mut s = seed_state;
        let mut tick = 40_000u32;
        for (step, &(drop_u, delay_u, drop_a, delay_a)) in pattern.iter().enumerate() {
            // Mostly steady movement, now and then a turn, a stop or a new animation.
            tick += 1 + u32::from(delay_u % 3);
            match step % 17 {
                0 => s.velocity = Vec3::new(3.0, 0.0, -1.5),
                5 => s.orientation = Quat::from_rotation_y(step as f32 * 0.3),
                9 => s.velocity = Vec3::ZERO,
                13 => s.anim = s.anim.wrapping_add(1),
                _ => {}
            }
            s.position = (s.position + s.velocity / 60.0).clamp(q.config().min, q.config().max);
            let (_, bytes) = enc.encode(tick, &s);
            sent.insert(tick, q.quantize(&s));
            if drop_u >= 2 {
                updates.push((step + usize::from(delay_u), tick, bytes));
            }
            let due: Vec<_> = updates.iter().filter(|u| u.0 <= step).cloned().collect();
            updates.retain(|u| u.0 > step);
            for (_, t, bytes) in due {
                match dec.decode(&bytes) {
                    Ok(d) => {
                        let want = sent[&t];
                        prop_assert_eq!(d.quantized, want, "update of tick {} decoded as another state", t);
                        if d.form != Form::Unchanged {
                            prop_assert_eq!(d.tick.rem_euclid(1 << 16), i64::from(t % (1 << 16)));
                        }
                    }
                    Err(DecodeError::MissingBaseline { .. }) => {}
                    Err(e) => prop_assert!(false, "{e}"),
                }
                if let Some(a) = dec.ack()
                    && drop_a >= 3
                {
                    acks.push((step + usize::from(delay_a), a));
                }
            }
            let due: Vec<_> = acks.iter().filter(|a| a.0 <= step).map(|a| a.1).collect();
            acks.retain(|a| a.0 > step);
            for a in due {
                enc.on_ack(a);
            }
        }
        prop_assert!(dec.counters().decoded > 0);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_change_nothing_when_refused(
        first in state(), junk in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let q = quantizer();
        let mut enc = Encoder::new(q);
        let mut dec = Decoder::new(q);
        let (_, bytes) = enc.encode(5, &first);
        dec.decode(&bytes).unwrap();
        let before = dec.ack();
        if dec.decode(&junk).is_err() {
            prop_assert_eq!(dec.ack().map(|a| a.tick), before.map(|a| a.tick));
        }
    }
}

#[test]
fn a_steadily_moving_avatar_costs_a_few_bits_and_an_idle_one_a_byte() {
    let q = quantizer();
    let mut enc = Encoder::new(q);
    let mut dec = Decoder::new(q);
    let mut s = AvatarState {
        position: Vec3::new(10.0, 0.0, 20.0),
        orientation: Quat::from_rotation_y(0.7),
        velocity: Vec3::new(1.4, 0.0, -0.6),
        anim: 3,
    };
    let mut bits = Vec::new();
    // 30 Hz updates on a 60 Hz avatar clock, acks one update behind.
    let mut pending = None;
    for i in 0..60u32 {
        let tick = 100 + 2 * i;
        s.position += s.velocity * 2.0 / 60.0;
        let (form, bytes) = enc.encode(tick, &s);
        if i > 2 {
            assert_eq!(form, Form::Delta);
            bits.push(bytes.len() * 8);
        }
        dec.decode(&bytes).unwrap();
        if let Some(a) = pending.replace(dec.ack().unwrap()) {
            enc.on_ack(a);
        }
    }
    bits.sort_unstable();
    let median = bits[bits.len() / 2];
    assert!(median <= 32, "a steady walk costs {median} bits an update");
    // Standing still: the unchanged form, one byte.
    s.velocity = Vec3::ZERO;
    let (_, bytes) = enc.encode(300, &s);
    dec.decode(&bytes).unwrap();
    enc.on_ack(dec.ack().unwrap());
    let (form, bytes) = enc.encode(302, &s);
    assert_eq!((form, bytes.len()), (Form::Unchanged, 1));
    assert_eq!(dec.decode(&bytes).unwrap().state, q.dequantize(&q.quantize(&s)));
}

#[test]
fn a_delta_whose_baseline_is_gone_is_refused_and_the_ack_asks_for_a_full_state() {
    let q = quantizer();
    let mut enc = Encoder::new(q);
    let mut dec = Decoder::new(q);
    let mut other = Decoder::new(q);
    let s = AvatarState::default();
    let (_, full) = enc.encode(10, &s);
    dec.decode(&full).unwrap();
    enc.on_ack(dec.ack().unwrap());
    let moved = AvatarState { position: Vec3::X, ..s };
    let (form, delta) = enc.encode(12, &moved);
    assert_eq!(form, Form::Delta);
    // A receiver that never had tick 10 (joined late, lost it) refuses, and asks for a full state.
    assert_eq!(other.decode(&delta), Err(DecodeError::NoState));
    let (_, other_full) = Encoder::new(q).encode(11, &s);
    other.decode(&other_full).unwrap();
    assert!(matches!(other.decode(&delta), Err(DecodeError::MissingBaseline { tick: 10 })));
    let ack = other.ack().unwrap();
    assert!(ack.need_full);
    enc.on_ack(ack);
    assert_eq!(enc.encode(14, &moved).0, Form::Full);
}

#[test]
fn configurations_that_cannot_work_are_refused() {
    let bad = |f: fn(&mut CodecConfig)| {
        let mut c = CodecConfig::default();
        f(&mut c);
        Quantizer::new(c).is_err()
    };
    assert!(bad(|c| c.min.x = c.max.x));
    assert!(bad(|c| c.position_resolution = 0.0));
    assert!(bad(|c| c.velocity_resolution = f32::NAN));
    assert!(bad(|c| c.position_resolution = 1e-9));
    assert!(bad(|c| c.orientation_bits = 16));
    assert!(bad(|c| c.tick_hz = 0));
    assert!(!bad(|_| {}));
}

#[test]
fn broken_states_are_sent_as_something() {
    let q = quantizer();
    let s = AvatarState {
        position: Vec3::new(f32::NAN, f32::INFINITY, -1e30),
        orientation: Quat::from_xyzw(0.0, 0.0, 0.0, 0.0),
        velocity: Vec3::splat(f32::NEG_INFINITY),
        anim: 1,
    };
    let mut dec = Decoder::new(q);
    let d = dec.decode(&Encoder::new(q).encode(1, &s).1).unwrap();
    assert!(d.state.position.is_finite() && d.state.velocity.is_finite());
    assert!(d.state.orientation.angle_between(Quat::IDENTITY) <= q.orientation_error());
}

/// A game that sets its avatar faster than the avatar clock ticks may have two updates sent
/// in one tick; the second goes at the next tick, so that a tick never names two states.
#[test]
fn two_updates_in_one_tick_never_name_two_states() {
    let q = quantizer();
    let mut enc = Encoder::new(q);
    let mut dec = Decoder::new(q);
    let a = AvatarState { position: Vec3::new(1.0, 0.0, 1.0), ..Default::default() };
    let b = AvatarState { position: Vec3::new(2.0, 0.0, 1.0), ..Default::default() };
    let c = AvatarState { position: Vec3::new(3.0, 0.0, 1.0), ..Default::default() };
    let (_, first) = enc.encode(50, &a);
    assert_eq!(dec.decode(&first).unwrap().tick, 50);
    enc.on_ack(dec.ack().unwrap());
    let (_, second) = enc.encode(50, &b);
    let d = dec.decode(&second).unwrap();
    assert_eq!((d.tick, d.quantized), (51, q.quantize(&b)));
    // The receiver acked 50 as `a`; a delta against it must still decode to `c`.
    let (_, third) = enc.encode(53, &c);
    assert_eq!(dec.decode(&third).unwrap().quantized, q.quantize(&c));
    enc.on_ack(dec.ack().unwrap());
    let (_, fourth) = enc.encode(53, &a);
    assert_eq!(dec.decode(&fourth).unwrap().quantized, q.quantize(&a));
}
