//! Profiles: what a virtual connection promises (delivery) and how it picks its paths
//! (policy and criteria). Written as plain serde data ([`ProfileConfig`], defined with its wire
//! form in [`shoal_protocol::profile`] so that the control server reads and sends the same
//! thing), validated once into a typed [`Profile`] that the VC and its path manager read.

use std::time::Duration;

use renet::{ChannelConfig, ConnectionConfig, SendType};
pub use shoal_protocol::profile::{
    CustomCriteria, Delivery, MAX_STRIPE, PROFILE_WIRE_LEN, ProfileConfig, ProfileError,
};

/// What renet may emit per call on a paced (widest-path) profile.
const PACED_BYTES_PER_CALL: u64 = 12_000;

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

impl Profile {
    /// Checks the config ([`ProfileConfig::check`]) and derives the typed profile.
    pub fn from_config(config: &ProfileConfig) -> Result<Profile, ProfileError> {
        config.check()?;
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
            config: config.clone(),
        };
        // Every range below has been checked: the derivation cannot fail.
        let mut p = match config {
            ProfileConfig::Realtime { redundancy } => Profile {
                redundancy: *redundancy,
                tick: Duration::from_millis(5),
                ..base(ProfileKind::Realtime, Delivery::Unreliable, Policy::LowestLatency)
            },
            ProfileConfig::Reliable { max_latency_ms } => Profile {
                max_latency: Some(ms(max_latency_ms.unwrap_or(250))),
                max_loss: 0.02,
                ..base(ProfileKind::Reliable, Delivery::ReliableOrdered, Policy::LowestLoss)
            },
            ProfileConfig::Bulk { max_paths } => Profile {
                stripe: max_paths.unwrap_or(MAX_STRIPE),
                max_loss: 0.10,
                resend: Duration::from_millis(200),
                max_buffered: 64 << 20,
                ..base(ProfileKind::Bulk, Delivery::ReliableUnordered, Policy::Widest)
            },
            ProfileConfig::Voice => Profile {
                tick: Duration::from_millis(5),
                max_loss: 0.10,
                ..base(ProfileKind::Voice, Delivery::Unreliable, Policy::MostStable)
            },
            ProfileConfig::Custom(c) => {
                let policy = match (c.min_bandwidth_kbps, c.delivery) {
                    (Some(_), _) => Policy::Widest,
                    (None, Delivery::Unreliable) => Policy::LowestLatency,
                    (None, _) => Policy::LowestLoss,
                };
                Profile {
                    max_latency: c.max_latency_ms.map(ms),
                    min_bandwidth: c.min_bandwidth_kbps.map(|k| u64::from(k) * 125),
                    max_loss: c.max_loss.unwrap_or(0.05),
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

fn ms(v: u32) -> Duration {
    Duration::from_millis(u64::from(v))
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
        Profile::from_config(&c).unwrap_or_else(|e| unreachable!("built-in profile invalid: {e}"))
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
    fn configs_from_toml_derive_their_criteria_and_bad_ones_are_refused() {
        let c: ProfileConfig = toml::from_str(
            "kind = \"custom\"\ndelivery = \"unreliable\"\nmax_latency_ms = 80\nmax_loss = 0.01\nredundancy = true",
        )
        .unwrap();
        let p = Profile::from_config(&c).unwrap();
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
        assert_eq!(Profile::from_config(&bad), Err(ProfileError::RedundantReliable));
        assert_eq!(Profile::from_config(&ProfileConfig::Bulk { max_paths: Some(4) }), Err(ProfileError::Stripe(4)));
        assert_eq!(
            Profile::from_config(&ProfileConfig::Reliable { max_latency_ms: Some(0) }),
            Err(ProfileError::Latency)
        );
    }
}
