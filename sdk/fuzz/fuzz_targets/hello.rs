//! A `HelloBody` and signature built from arbitrary bytes through `vc::check_hello`, the whole
//! check a node runs before a hello may create a VC (key, signature, time, profile); and the
//! hello's profile bytes through `ProfileConfig::from_wire` and `Profile::from_config`.
//!
//! Input: `[mode][vc u32][ephemeral 32][static key 32][unix ms 8][profile 16][signature 64]`,
//! zero-filled when short. The mode picks how far the hello can get: taken as it is (a key
//! other than the peer's stops it at once); carrying the peer's key with the input's signature
//! (stopped at the signature); or signed by the peer itself, for us or for another node or
//! VC, at a time within a few minutes of ours, so that the time and profile checks run on
//! arbitrary values. The outcome must be the one the checks' documentation gives.

#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use shoal_mesh::clock::WallClock;
use shoal_mesh::wire::VcId;
use shoal_protocol::profile::{MAX_STRIPE, PROFILE_WIRE_LEN};
use shoal_protocol::{Identity, NodeId, PublicKey, Signature};
use shoal_sdk::crypto::{CryptoError, HelloBody};
use shoal_sdk::vc::{HELLO_MAX_SKEW, HelloError, check_hello};
use shoal_sdk::{Delivery, Profile, ProfileConfig};

const T0_UNIX_US: u64 = 1_800_000_000_000_000;

struct Fixture {
    base: Instant,
    me: Identity,
    peer: Identity,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture {
        base: Instant::now(),
        me: Identity::from_seed([1; 32]),
        peer: Identity::from_seed([2; 32]),
    })
}

/// Reads fixed-size fields off the input, zeros past its end.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let clock = WallClock::new(f.base, T0_UNIX_US);
    let now = f.base + Duration::from_secs(1);
    let ours_ms = clock.unix_us(now) / 1000;

    let mut r = Reader(data);
    let [mode] = r.take::<1>();
    let vc = VcId(u32::from_be_bytes(r.take()));
    let ephemeral = r.take::<32>();
    let key = PublicKey(r.take());
    let ms = u64::from_be_bytes(r.take());
    let profile = r.take::<PROFILE_WIRE_LEN>();
    let sig = Signature(r.take());

    check_profile(&profile);

    let me = f.me.node_id();
    let peer_key = f.peer.public_key();
    match mode % 3 {
        0 => {
            let h = HelloBody { ephemeral, static_key: key, unix_ms: ms, profile };
            let got = check_hello(me, &clock, now, peer_key, vc, &h, &sig);
            if key != peer_key {
                assert_eq!(got, Err(HelloError::WrongKey));
            }
            display(&got);
        }
        1 => {
            let h = HelloBody { ephemeral, static_key: peer_key, unix_ms: ms, profile };
            let got = check_hello(me, &clock, now, peer_key, vc, &h, &sig);
            // Nobody but the peer can sign for its key.
            assert_eq!(got, Err(HelloError::Signature(CryptoError::BadSignature)));
            display(&got);
        }
        _ => {
            // A time within about ±200 s of ours (the bound is 120 s), or any at all.
            let unix_ms = if ms >> 63 == 0 {
                let offset = (ms % 400_000) as i64 - 200_000;
                ours_ms.saturating_add_signed(offset)
            } else {
                ms
            };
            let h = HelloBody { ephemeral, static_key: peer_key, unix_ms, profile };
            // Signed for us on this VC, or (by the mode's other bits) for another VC or node.
            let (to, for_vc) = match (mode / 3) % 3 {
                0 => (me, vc),
                1 => (me, VcId(vc.0.wrapping_add(1))),
                _ => (NodeId([mode; 8]), vc),
            };
            let sig = h.sign(&f.peer, to, for_vc);
            let got = check_hello(me, &clock, now, peer_key, vc, &h, &sig);
            let skew = Duration::from_millis(ours_ms.abs_diff(unix_ms));
            let expected = if (to, for_vc) != (me, vc) {
                Err(HelloError::Signature(CryptoError::BadSignature))
            } else if skew > HELLO_MAX_SKEW {
                Err(HelloError::Skew { skew })
            } else {
                ProfileConfig::from_wire(&profile)
                    .and_then(|c| Profile::from_config(&c))
                    .map_err(HelloError::Profile)
            };
            // Compared as printed: a refused loss of NaN is not equal to itself.
            assert_eq!(format!("{got:?}"), format!("{expected:?}"));
            display(&got);
        }
    }
});

fn display(r: &Result<Profile, HelloError>) {
    match r {
        Ok(p) => {
            let _ = format!("{p:?}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// A profile read off the wire is checked before anything runs by it; one that passes derives
/// a profile within the documented ranges and survives the trip back to the wire and again.
fn check_profile(w: &[u8; PROFILE_WIRE_LEN]) {
    let config = match ProfileConfig::from_wire(w) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let checked = config.check();
    let derived = Profile::from_config(&config);
    match (&checked, &derived) {
        (Ok(()), Ok(_)) => {}
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("check gave {checked:?} but from_config {derived:?} for {config:?}"),
    }
    let Ok(p) = derived else { return };
    assert_eq!(p.config, config);
    assert!((0.0..=1.0).contains(&p.max_loss), "max_loss {}", p.max_loss);
    assert!((1..=MAX_STRIPE).contains(&p.stripe), "stripe {}", p.stripe);
    assert!(p.max_latency.is_none_or(|d| !d.is_zero()));
    assert!(!p.redundancy || p.delivery == Delivery::Unreliable);
    assert!(!p.tick.is_zero() && !p.resend.is_zero() && p.bytes_per_flush > 0 && p.max_buffered > 0);
    let _ = p.renet_config();
    let again = config.to_wire();
    assert_eq!(ProfileConfig::from_wire(&again).as_ref(), Ok(&config), "a checked profile changed on the wire");
    assert_eq!(ProfileConfig::from_wire(&again).map(|c| c.to_wire()), Ok(again));
}
