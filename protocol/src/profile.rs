//! VC profiles as written in config files and carried in VC hellos and introductions: what a
//! virtual connection promises (delivery) and the criteria by which it picks its paths. Plain
//! serde data ([`ProfileConfig`]), its fixed-size wire form ([`ProfileConfig::to_wire`]) and the
//! range checks every reader applies ([`ProfileConfig::check`]). The SDK derives the typed
//! profile a VC runs by from a checked config.

use serde::{Deserialize, Serialize};

/// Largest number of paths a Bulk VC stripes over.
pub const MAX_STRIPE: u8 = 3;

/// A profile as written in a game's config file or sent in a VC hello.
///
/// ```toml
/// kind = "realtime"
/// redundancy = true
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ProfileConfig {
    /// Unreliable, latest-wins; lowest latency.
    Realtime {
        /// Send a second copy of every packet on a disjoint path. The receiver then also
        /// takes the slower path's copy of a packet the faster path lost, even after a newer
        /// one: nothing is lost across a single path failure, at the price of strict order.
        #[serde(default)]
        redundancy: bool,
    },
    /// Reliable ordered; lowest loss under a latency bound.
    Reliable {
        /// The latency bound a path must meet, in ms (default 250).
        #[serde(default)]
        max_latency_ms: Option<u32>,
    },
    /// Reliable unordered, large messages; widest paths, striped.
    Bulk {
        /// How many paths to stripe over, 1 to 3 (default 3).
        #[serde(default)]
        max_paths: Option<u8>,
    },
    /// Unreliable; most stable latency.
    Voice,
    /// Criteria of the game's own.
    Custom(CustomCriteria),
}

/// The criteria of a custom profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomCriteria {
    /// How messages are delivered.
    pub delivery: Delivery,
    /// Paths slower than this (smoothed RTT, ms) are not used while a faster one exists.
    #[serde(default)]
    pub max_latency_ms: Option<u32>,
    /// Paths known to carry less than this (kbit/s) are not used while a wider one exists.
    #[serde(default)]
    pub min_bandwidth_kbps: Option<u32>,
    /// Paths losing more than this fraction (0..1) are left.
    #[serde(default)]
    pub max_loss: Option<f32>,
    /// Send a second copy of every packet on a disjoint path.
    #[serde(default)]
    pub redundancy: bool,
}

/// How a VC delivers messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// May be lost or arrive out of order; a newer message supersedes an older one.
    Unreliable,
    /// Every message, in the order sent.
    ReliableOrdered,
    /// Every message, in any order.
    ReliableUnordered,
}

/// A profile that failed validation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProfileError {
    /// A loss fraction outside 0..1.
    #[error("max_loss must lie in 0..1, got {0}")]
    Loss(f32),
    /// A stripe width outside 1..=3.
    #[error("max_paths must be 1 to {MAX_STRIPE}, got {0}")]
    Stripe(u8),
    /// A latency bound of zero.
    #[error("max_latency_ms must be above zero")]
    Latency,
    /// A hello named a profile kind this version does not know.
    #[error("unknown profile kind {0} in a hello")]
    UnknownWire(u8),
    /// Redundant copies of reliable messages: renet already resends them.
    #[error("redundancy applies to unreliable delivery only")]
    RedundantReliable,
}

impl ProfileConfig {
    /// Checks every field's range and their consistency: a stripe width of 1 to
    /// [`MAX_STRIPE`], a loss fraction in 0..1, latency bounds above zero, redundancy only
    /// with unreliable delivery. A config that passes is one the SDK can run a VC by.
    pub fn check(&self) -> Result<(), ProfileError> {
        match self {
            ProfileConfig::Realtime { .. } | ProfileConfig::Voice => Ok(()),
            ProfileConfig::Reliable { max_latency_ms } => check_latency(*max_latency_ms),
            ProfileConfig::Bulk { max_paths } => {
                let stripe = max_paths.unwrap_or(MAX_STRIPE);
                if !(1..=MAX_STRIPE).contains(&stripe) {
                    return Err(ProfileError::Stripe(stripe));
                }
                Ok(())
            }
            ProfileConfig::Custom(c) => {
                if let Some(loss) = c.max_loss
                    && !(0.0..=1.0).contains(&loss)
                {
                    return Err(ProfileError::Loss(loss));
                }
                if c.redundancy && c.delivery != Delivery::Unreliable {
                    return Err(ProfileError::RedundantReliable);
                }
                check_latency(c.max_latency_ms)
            }
        }
    }
}

fn check_latency(ms: Option<u32>) -> Result<(), ProfileError> {
    if ms == Some(0) { Err(ProfileError::Latency) } else { Ok(()) }
}

/// Bytes of a profile in a VC hello.
pub const PROFILE_WIRE_LEN: usize = 16;

impl ProfileConfig {
    /// The fixed-size form sent in a VC hello, so that the peer opens the VC with the same
    /// delivery and channel settings. An absent option is written as zero, which no valid
    /// profile uses.
    pub fn to_wire(&self) -> [u8; PROFILE_WIRE_LEN] {
        let mut w = [0; PROFILE_WIRE_LEN];
        let (tag, flags, delivery, paths, latency, bandwidth, loss) = match self {
            ProfileConfig::Realtime { redundancy } => (1, u8::from(*redundancy), 0, 0, None, None, None),
            ProfileConfig::Reliable { max_latency_ms } => (2, 0, 0, 0, *max_latency_ms, None, None),
            ProfileConfig::Bulk { max_paths } => (3, 0, 0, max_paths.unwrap_or(0), None, None, None),
            ProfileConfig::Voice => (4, 0, 0, 0, None, None, None),
            ProfileConfig::Custom(c) => {
                let d = match c.delivery {
                    Delivery::Unreliable => 1,
                    Delivery::ReliableOrdered => 2,
                    Delivery::ReliableUnordered => 3,
                };
                (5, u8::from(c.redundancy), d, 0, c.max_latency_ms, c.min_bandwidth_kbps, c.max_loss)
            }
        };
        w[0] = tag;
        w[1] = flags;
        w[2] = delivery;
        w[3] = paths;
        w[4..8].copy_from_slice(&latency.unwrap_or(0).to_be_bytes());
        w[8..12].copy_from_slice(&bandwidth.unwrap_or(0).to_be_bytes());
        // Loss travels as a non-negative f32 plus one, so that zero still means "absent".
        w[12..16].copy_from_slice(&loss.map_or(0.0, |l| l + 1.0).to_be_bytes());
        w
    }

    /// Reads [`ProfileConfig::to_wire`]; the result still needs [`ProfileConfig::check`].
    pub fn from_wire(w: &[u8; PROFILE_WIRE_LEN]) -> Result<ProfileConfig, ProfileError> {
        let u32_at = |i: usize| u32::from_be_bytes([w[i], w[i + 1], w[i + 2], w[i + 3]]);
        let opt = |v: u32| (v != 0).then_some(v);
        let latency = opt(u32_at(4));
        let loss = f32::from_be_bytes([w[12], w[13], w[14], w[15]]);
        Ok(match w[0] {
            1 => ProfileConfig::Realtime { redundancy: w[1] & 1 == 1 },
            2 => ProfileConfig::Reliable { max_latency_ms: latency },
            3 => ProfileConfig::Bulk { max_paths: (w[3] != 0).then_some(w[3]) },
            4 => ProfileConfig::Voice,
            5 => ProfileConfig::Custom(CustomCriteria {
                delivery: match w[2] {
                    1 => Delivery::Unreliable,
                    2 => Delivery::ReliableOrdered,
                    3 => Delivery::ReliableUnordered,
                    other => return Err(ProfileError::UnknownWire(other)),
                },
                max_latency_ms: latency,
                min_bandwidth_kbps: opt(u32_at(8)),
                max_loss: (loss != 0.0).then_some(loss - 1.0),
                redundancy: w[1] & 1 == 1,
            }),
            other => return Err(ProfileError::UnknownWire(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn custom(delivery: Delivery) -> CustomCriteria {
        CustomCriteria { delivery, max_latency_ms: None, min_bandwidth_kbps: None, max_loss: None, redundancy: false }
    }

    #[test]
    fn config_reads_from_toml_and_bad_values_name_the_field() {
        let c: ProfileConfig = toml::from_str("kind = \"realtime\"\nredundancy = true").unwrap();
        assert_eq!(c, ProfileConfig::Realtime { redundancy: true });
        let c: ProfileConfig = toml::from_str(
            "kind = \"custom\"\ndelivery = \"unreliable\"\nmax_latency_ms = 80\nmax_loss = 0.01\nredundancy = true",
        )
        .unwrap();
        assert_eq!(
            c,
            ProfileConfig::Custom(CustomCriteria {
                max_latency_ms: Some(80),
                max_loss: Some(0.01),
                redundancy: true,
                ..custom(Delivery::Unreliable)
            })
        );
        assert_eq!(c.check(), Ok(()));
        assert!(toml::from_str::<ProfileConfig>("kind = \"realtime\"\nredundncy = true").is_err());
    }

    #[test]
    fn check_refuses_what_no_vc_can_run() {
        for ok in [
            ProfileConfig::Realtime { redundancy: true },
            ProfileConfig::Reliable { max_latency_ms: None },
            ProfileConfig::Reliable { max_latency_ms: Some(1) },
            ProfileConfig::Bulk { max_paths: None },
            ProfileConfig::Bulk { max_paths: Some(1) },
            ProfileConfig::Bulk { max_paths: Some(MAX_STRIPE) },
            ProfileConfig::Voice,
            ProfileConfig::Custom(CustomCriteria { max_loss: Some(0.0), ..custom(Delivery::ReliableOrdered) }),
            ProfileConfig::Custom(CustomCriteria {
                max_loss: Some(1.0),
                redundancy: true,
                ..custom(Delivery::Unreliable)
            }),
        ] {
            assert_eq!(ok.check(), Ok(()), "{ok:?}");
        }
        let redundant = CustomCriteria { redundancy: true, ..custom(Delivery::ReliableOrdered) };
        assert_eq!(ProfileConfig::Custom(redundant).check(), Err(ProfileError::RedundantReliable));
        assert_eq!(ProfileConfig::Bulk { max_paths: Some(4) }.check(), Err(ProfileError::Stripe(4)));
        assert_eq!(ProfileConfig::Bulk { max_paths: Some(0) }.check(), Err(ProfileError::Stripe(0)));
        assert_eq!(ProfileConfig::Reliable { max_latency_ms: Some(0) }.check(), Err(ProfileError::Latency));
        let zero_latency = CustomCriteria { max_latency_ms: Some(0), ..custom(Delivery::Unreliable) };
        assert_eq!(ProfileConfig::Custom(zero_latency).check(), Err(ProfileError::Latency));
        for loss in [-0.1, 1.5] {
            let c = CustomCriteria { max_loss: Some(loss), ..custom(Delivery::Unreliable) };
            assert_eq!(ProfileConfig::Custom(c).check(), Err(ProfileError::Loss(loss)));
        }
        let nan = CustomCriteria { max_loss: Some(f32::NAN), ..custom(Delivery::Unreliable) };
        assert!(matches!(ProfileConfig::Custom(nan).check(), Err(ProfileError::Loss(l)) if l.is_nan()));
    }

    #[test]
    fn profiles_round_trip_through_the_hello_encoding() {
        let custom = ProfileConfig::Custom(CustomCriteria {
            delivery: Delivery::Unreliable,
            max_latency_ms: Some(80),
            min_bandwidth_kbps: Some(512),
            max_loss: Some(0.25),
            redundancy: true,
        });
        for c in [
            ProfileConfig::Realtime { redundancy: false },
            ProfileConfig::Realtime { redundancy: true },
            ProfileConfig::Reliable { max_latency_ms: Some(120) },
            ProfileConfig::Bulk { max_paths: Some(2) },
            ProfileConfig::Voice,
            custom,
        ] {
            assert_eq!(ProfileConfig::from_wire(&c.to_wire()), Ok(c));
        }
        let mut junk = ProfileConfig::Voice.to_wire();
        junk[0] = 99;
        assert_eq!(ProfileConfig::from_wire(&junk), Err(ProfileError::UnknownWire(99)));
    }
}
