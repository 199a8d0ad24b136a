//! Profiles: what a virtual connection promises (delivery) and how it picks its paths
//! (policy and criteria). Written as plain serde data ([`ProfileConfig`]), validated once
//! into a typed [`Profile`] that the VC and its path manager read.

use std::time::Duration;

use renet::{ChannelConfig, ConnectionConfig, SendType};
use serde::{Deserialize, Serialize};

/// What renet may emit per call on a paced (widest-path) profile.
const PACED_BYTES_PER_CALL: u64 = 12_000;
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

/// Which path a VC prefers among those that meet its criteria.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Lowest smoothed RTT.
    LowestLatency,
    /// Lowest loss, then lowest latency.
    LowestLoss,
    /// Widest, striped over up to [`Profile::stripe`] paths.
    Widest,
    /// Lowest jitter, then lowest latency.
    MostStable,
}

/// Which named profile a [`Profile`] came from, for stats and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileKind {
    /// [`ProfileConfig::Realtime`].
    Realtime,
    /// [`ProfileConfig::Reliable`].
    Reliable,
    /// [`ProfileConfig::Bulk`].
    Bulk,
    /// [`ProfileConfig::Voice`].
    Voice,
    /// [`ProfileConfig::Custom`].
    Custom,
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

/// A validated profile: the typed criteria a VC runs by.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Where it came from.
    pub kind: ProfileKind,
    /// How messages are delivered.
    pub delivery: Delivery,
    /// How paths are ranked.
    pub policy: Policy,
    /// Paths slower than this are left while another meets it.
    pub max_latency: Option<Duration>,
    /// Paths known to be narrower than this (bytes/s) are left while another meets it. A path's
    /// width is known once the VC has filled it: what it delivered when its queue built up.
    pub min_bandwidth: Option<u64>,
    /// Paths losing more than this fraction are left while another meets it.
    pub max_loss: f32,
    /// Every packet also goes on a second, relay-disjoint path.
    pub redundancy: bool,
    /// Paths used at once for sending (1 unless striping).
    pub stripe: u8,
    /// How often the VC flushes renet when the game has not asked it to.
    pub tick: Duration,
    /// How long renet waits for an ack before it resends a reliable message.
    pub resend: Duration,
    /// Bytes renet may emit per flush.
    pub bytes_per_flush: u64,
    /// Bytes a VC may hold unacknowledged (reliable) or queued (unreliable).
    pub max_buffered: usize,
    /// The config it was validated from, sent to the peer in the hello.
    pub config: ProfileConfig,
}

impl ProfileConfig {
    /// Checks the config and derives the typed profile.
    pub fn validate(&self) -> Result<Profile, ProfileError> {
        let base = |kind, delivery, policy| Profile {
            kind,
            delivery,
            policy,
            max_latency: None,
            min_bandwidth: None,
            max_loss: 0.05,
            redundancy: false,
            stripe: 1,
            tick: Duration::from_millis(10),
            resend: Duration::from_millis(100),
            bytes_per_flush: 60_000,
            max_buffered: 4 << 20,
            config: self.clone(),
        };
        let mut p = match self {
            ProfileConfig::Realtime { redundancy } => Profile {
                redundancy: *redundancy,
                tick: Duration::from_millis(5),
                ..base(ProfileKind::Realtime, Delivery::Unreliable, Policy::LowestLatency)
            },
            ProfileConfig::Reliable { max_latency_ms } => Profile {
                max_latency: Some(ms(max_latency_ms.unwrap_or(250))?),
                max_loss: 0.02,
                ..base(ProfileKind::Reliable, Delivery::ReliableOrdered, Policy::LowestLoss)
            },
            ProfileConfig::Bulk { max_paths } => {
                let stripe = max_paths.unwrap_or(MAX_STRIPE);
                if !(1..=MAX_STRIPE).contains(&stripe) {
                    return Err(ProfileError::Stripe(stripe));
                }
                Profile {
                    stripe,
                    max_loss: 0.10,
                    resend: Duration::from_millis(200),
                    max_buffered: 64 << 20,
                    ..base(ProfileKind::Bulk, Delivery::ReliableUnordered, Policy::Widest)
                }
            }
            ProfileConfig::Voice => Profile {
                tick: Duration::from_millis(5),
                max_loss: 0.10,
                ..base(ProfileKind::Voice, Delivery::Unreliable, Policy::MostStable)
            },
            ProfileConfig::Custom(c) => {
                let max_loss = c.max_loss.unwrap_or(0.05);
                if !(0.0..=1.0).contains(&max_loss) {
                    return Err(ProfileError::Loss(max_loss));
                }
                if c.redundancy && c.delivery != Delivery::Unreliable {
                    return Err(ProfileError::RedundantReliable);
                }
                let policy = match (c.min_bandwidth_kbps, c.delivery) {
                    (Some(_), _) => Policy::Widest,
                    (None, Delivery::Unreliable) => Policy::LowestLatency,
                    (None, _) => Policy::LowestLoss,
                };
                Profile {
                    max_latency: c.max_latency_ms.as_ref().map(|m| ms(*m)).transpose()?,
                    min_bandwidth: c.min_bandwidth_kbps.map(|k| u64::from(k) * 125),
                    max_loss,
                    redundancy: c.redundancy,
                    ..base(ProfileKind::Custom, c.delivery, policy)
                }
            }
        };
        if p.policy == Policy::Widest {
            // Paced profiles call renet once per ten slices or so, so that what it emits
            // spreads over the paths a few frames at a time.
            p.bytes_per_flush = PACED_BYTES_PER_CALL;
        }
        Ok(p)
    }
}

/// The renet channel a VC carries its messages on.
pub const RENET_CHANNEL: u8 = 0;

impl Profile {
    /// The renet connection settings a VC with this profile runs: one channel
    /// ([`RENET_CHANNEL`]) with the profile's delivery, resend time and memory, and its bytes
    /// per flush.
    pub fn renet_config(&self) -> ConnectionConfig {
        let send_type = match self.delivery {
            Delivery::Unreliable => SendType::Unreliable,
            Delivery::ReliableOrdered => SendType::ReliableOrdered { resend_time: self.resend },
            Delivery::ReliableUnordered => SendType::ReliableUnordered { resend_time: self.resend },
        };
        let channels =
            vec![ChannelConfig { channel_id: RENET_CHANNEL, max_memory_usage_bytes: self.max_buffered, send_type }];
        ConnectionConfig {
            available_bytes_per_tick: self.bytes_per_flush,
            server_channels_config: channels.clone(),
            client_channels_config: channels,
        }
    }
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

    /// Reads [`ProfileConfig::to_wire`]; the result still needs [`ProfileConfig::validate`].
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

fn ms(v: u32) -> Result<Duration, ProfileError> {
    if v == 0 { Err(ProfileError::Latency) } else { Ok(Duration::from_millis(u64::from(v))) }
}

impl Profile {
    /// The realtime profile, with or without redundant copies.
    pub fn realtime(redundancy: bool) -> Profile {
        Self::known(ProfileConfig::Realtime { redundancy })
    }

    /// The reliable profile with its default latency bound.
    pub fn reliable() -> Profile {
        Self::known(ProfileConfig::Reliable { max_latency_ms: None })
    }

    /// The bulk profile striping over three paths.
    pub fn bulk() -> Profile {
        Self::known(ProfileConfig::Bulk { max_paths: None })
    }

    /// The voice profile.
    pub fn voice() -> Profile {
        Self::known(ProfileConfig::Voice)
    }

    fn known(c: ProfileConfig) -> Profile {
        // The named profiles with default fields are valid by construction (see the tests).
        c.validate().unwrap_or_else(|e| unreachable!("built-in profile invalid: {e}"))
    }

    /// Whether messages are resent until acknowledged.
    pub fn is_reliable(&self) -> bool {
        self.delivery != Delivery::Unreliable
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn named_profiles_validate_with_their_policies() {
        assert_eq!(Profile::realtime(true).policy, Policy::LowestLatency);
        assert!(Profile::realtime(true).redundancy);
        assert_eq!(Profile::reliable().delivery, Delivery::ReliableOrdered);
        assert_eq!(Profile::reliable().max_latency, Some(Duration::from_millis(250)));
        assert_eq!(Profile::bulk().stripe, 3);
        assert_eq!(Profile::bulk().delivery, Delivery::ReliableUnordered);
        assert_eq!(Profile::voice().policy, Policy::MostStable);
    }

    #[test]
    fn config_reads_from_toml_and_bad_values_name_the_field() {
        let c: ProfileConfig = toml::from_str("kind = \"realtime\"\nredundancy = true").unwrap();
        assert_eq!(c, ProfileConfig::Realtime { redundancy: true });
        let c: ProfileConfig = toml::from_str(
            "kind = \"custom\"\ndelivery = \"unreliable\"\nmax_latency_ms = 80\nmax_loss = 0.01\nredundancy = true",
        )
        .unwrap();
        let p = c.validate().unwrap();
        assert_eq!(
            (p.policy, p.max_latency, p.max_loss),
            (Policy::LowestLatency, Some(Duration::from_millis(80)), 0.01)
        );
        let bad = ProfileConfig::Custom(CustomCriteria {
            delivery: Delivery::ReliableOrdered,
            max_latency_ms: None,
            min_bandwidth_kbps: None,
            max_loss: None,
            redundancy: true,
        });
        assert_eq!(bad.validate(), Err(ProfileError::RedundantReliable));
        assert_eq!(ProfileConfig::Bulk { max_paths: Some(4) }.validate(), Err(ProfileError::Stripe(4)));
        assert_eq!(ProfileConfig::Reliable { max_latency_ms: Some(0) }.validate(), Err(ProfileError::Latency));
        assert!(toml::from_str::<ProfileConfig>("kind = \"realtime\"\nredundncy = true").is_err());
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
