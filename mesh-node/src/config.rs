//! The relay's configuration file: plain serde data, validated once into [`RelayOptions`].
//!
//! ```toml
//! listen = "0.0.0.0:7000"
//! metrics = "127.0.0.1:9100"        # optional: Prometheus /metrics and /healthz
//! workers = 2                        # threads sharing the port with SO_REUSEPORT
//! key_file = "relay.key"            # the relay's identity seed (hex); created if missing
//! control_public_key = "…64 hex…"   # the only key whose tickets this relay trusts
//! permit = "…248 hex…"              # this relay's permit, role relay, signed by that key
//!                                    # (not with [control], which issues it)
//! peers = ["192.0.2.10:7000"]       # relays to bind to at start
//!
//! [control]                          # optional: register with the control server
//! addr = "192.0.2.1:7100"           # its QUIC address
//! trust = "sha256:…64 hex…"         # its certificate's fingerprint, or a CA file's path
//! public_addr = "192.0.2.20:7000"   # where clients reach this relay (default: the listen
//!                                    # address, which must then be a specific one)
//!
//! [limits]
//! source_packets_per_sec = 20000
//! source_bytes_per_sec = 25000000
//! burst_secs = 0.1
//! bind_verifications_per_sec = 2000
//! notices_per_sec = 1000
//! max_bindings = 100000
//! max_group_members = 512
//! max_groups = 65536
//! bundle_window_ms = 10              # copies for one member within this share a datagram
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use shoal_link::Trust;
use shoal_link::daemon::load_or_create_key;
use shoal_protocol::identity::parse_hex;
use shoal_protocol::ticket::TICKET_LEN;
use shoal_protocol::{Identity, PublicKey, Roles, SignedTicket, TicketKind, UnixTime};

use crate::driver::relay::RelayOptions;
use crate::fanout::FanoutConfig;
use crate::router::{Rate, RouterConfig};

/// The file as written.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RelayFile {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// HTTP address for `/metrics` and `/healthz`.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// Worker threads.
    #[serde(default = "one")]
    pub workers: usize,
    /// Identity seed file, relative to the config file.
    pub key_file: PathBuf,
    /// Control server public key, hex.
    pub control_public_key: String,
    /// This relay's permit, hex.
    #[serde(default)]
    pub permit: Option<String>,
    /// Peer relays.
    #[serde(default)]
    pub peers: Vec<SocketAddr>,
    /// Rate and size limits.
    #[serde(default)]
    pub limits: Limits,
    /// Registration with the control server.
    #[serde(default)]
    pub control: Option<ControlFile>,
}

/// The `[control]` table.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlFile {
    /// The control server's QUIC address.
    pub addr: SocketAddr,
    /// `sha256:<hex>` or a CA file.
    pub trust: String,
    /// Where clients reach this relay.
    #[serde(default)]
    pub public_addr: Option<SocketAddr>,
}

/// Validated `[control]` settings.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// The control server's QUIC address.
    pub addr: SocketAddr,
    /// How its certificate is trusted.
    pub trust: Trust,
    /// Where clients reach this relay; `None` means the address the relay is bound to.
    pub public_addr: Option<SocketAddr>,
}

fn one() -> usize {
    1
}

/// Rate and size limits.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Datagrams per second one source may send through this relay.
    pub source_packets_per_sec: f64,
    /// Bytes per second one source may send through this relay.
    pub source_bytes_per_sec: f64,
    /// Burst allowance, in seconds of the sustained rates.
    pub burst_secs: f64,
    /// Bind proofs verified per second, all sources together.
    pub bind_verifications_per_sec: f64,
    /// Notices sent per second, all destinations together.
    pub notices_per_sec: f64,
    /// Most nodes bound at once.
    pub max_bindings: usize,
    /// Most members of one fan-out group: the copies one published datagram may become.
    pub max_group_members: usize,
    /// Most fan-out groups held at once.
    pub max_groups: usize,
    /// How long copies for one member may wait to share a datagram, in milliseconds (0: each
    /// copy on its own).
    pub bundle_window_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            source_packets_per_sec: 20_000.0,
            source_bytes_per_sec: 25_000_000.0,
            burst_secs: 0.1,
            bind_verifications_per_sec: 2_000.0,
            notices_per_sec: 1_000.0,
            max_bindings: 100_000,
            max_group_members: FanoutConfig::default().max_members,
            max_groups: FanoutConfig::default().max_groups,
            bundle_window_ms: FanoutConfig::default().bundle_window.as_millis() as u64,
        }
    }
}

/// A configuration that cannot run, with what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A field has an invalid value.
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Two settings that cannot be used together are both set.
    #[error("`{first}` and `{second}` cannot both be set: {reason}")]
    Conflict {
        /// The one field.
        first: &'static str,
        /// The other.
        second: &'static str,
        /// Why, and what to do.
        reason: &'static str,
    },
    /// The key file could not be read or created.
    #[error("key file {path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// What `shoal-mesh-node run` needs: where to listen and how to route.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// UDP address.
    pub listen: SocketAddr,
    /// HTTP address for metrics.
    pub metrics: Option<SocketAddr>,
    /// Worker threads.
    pub workers: usize,
    /// Router and peers.
    pub options: RelayOptions,
    /// Registration with the control server, if configured.
    pub control: Option<ControlSettings>,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, reason: reason.into() }
}

impl RelayFile {
    /// Reads and parses a file (not yet validated).
    pub fn load(path: &Path) -> Result<RelayFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })
    }

    /// Validates into settings. `base` is the folder relative paths start from; `now` is the
    /// wall-clock time the permit must be valid at.
    pub fn validate(&self, base: &Path, now: UnixTime) -> Result<RelaySettings, ConfigError> {
        if self.workers == 0 || self.workers > 64 {
            return Err(invalid("workers", "must be between 1 and 64"));
        }
        let control_key =
            PublicKey(parse_hex(&self.control_public_key).map_err(|e| invalid("control_public_key", e.to_string()))?);
        if self.permit.is_some() && self.control.is_some() {
            return Err(ConfigError::Conflict {
                first: "permit",
                second: "[control]",
                reason: "the control server issues the relay's permit; remove `permit` to register, or \
                         `[control]` to run on the permit alone",
            });
        }
        let identity = load_or_create_key(&base.join(&self.key_file))
            .map_err(|e| ConfigError::Key { path: e.path, reason: e.reason })?;
        let permit = match &self.permit {
            Some(hex) => Some(self.check_permit(hex, &identity, &control_key, now)?),
            None if self.control.is_some() => None,
            None => return Err(invalid("permit", "required unless [control] is set (the control server issues it)")),
        };
        let control = match &self.control {
            Some(c) => {
                if c.public_addr.is_none() && self.listen.ip().is_unspecified() {
                    return Err(invalid(
                        "control.public_addr",
                        "required when listen is an unspecified address: clients must be told where to reach us",
                    ));
                }
                let trust = c.trust.parse::<Trust>().map_err(|e| invalid("control.trust", e.to_string()))?;
                Some(ControlSettings { addr: c.addr, trust, public_addr: c.public_addr })
            }
            None => None,
        };
        let l = &self.limits;
        let positive =
            |field, v: f64| if v > 0.0 && v.is_finite() { Ok(v) } else { Err(invalid(field, "must be > 0")) };
        let burst = positive("limits.burst_secs", l.burst_secs)?;
        let packets = positive("limits.source_packets_per_sec", l.source_packets_per_sec)?;
        let bytes = positive("limits.source_bytes_per_sec", l.source_bytes_per_sec)?;
        let binds = positive("limits.bind_verifications_per_sec", l.bind_verifications_per_sec)?;
        let notices = positive("limits.notices_per_sec", l.notices_per_sec)?;
        if l.max_bindings == 0 {
            return Err(invalid("limits.max_bindings", "must be > 0"));
        }
        if l.max_group_members == 0 || l.max_groups == 0 {
            return Err(invalid("limits.max_group_members", "fan-out limits must be > 0"));
        }
        if l.bundle_window_ms > 1_000 {
            return Err(invalid("limits.bundle_window_ms", "must be at most 1000"));
        }
        let mut cookie_secret = [0; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut cookie_secret)
            .map_err(|_| invalid("key_file", "no system randomness for the cookie secret"))?;
        let router = RouterConfig {
            identity,
            permit,
            control_key,
            source_packets: Rate { per_sec: packets, burst: (packets * burst).max(1.0) },
            source_bytes: Rate { per_sec: bytes, burst: (bytes * burst).max(2048.0) },
            bind_verifications: Rate { per_sec: binds, burst: binds.max(1.0) },
            notices: Rate { per_sec: notices, burst: notices.max(1.0) },
            max_bindings: l.max_bindings,
            cookie_secret,
            fanout: FanoutConfig {
                max_members: l.max_group_members,
                max_groups: l.max_groups,
                bundle_window: std::time::Duration::from_millis(l.bundle_window_ms),
            },
        };
        Ok(RelaySettings {
            listen: self.listen,
            metrics: self.metrics,
            workers: self.workers,
            options: RelayOptions { router, peers: self.peers.clone() },
            control,
        })
    }

    fn check_permit(
        &self,
        hex: &str,
        identity: &Identity,
        control_key: &PublicKey,
        now: UnixTime,
    ) -> Result<SignedTicket, ConfigError> {
        let permit_bytes: [u8; TICKET_LEN] = parse_hex(hex).map_err(|e| invalid("permit", e.to_string()))?;
        let permit = SignedTicket::decode(&permit_bytes).map_err(|e| invalid("permit", e.to_string()))?;
        if permit.body.node_id != identity.node_id() {
            return Err(invalid(
                "permit",
                format!("issued to node {}, but key_file holds node {}", permit.body.node_id, identity.node_id()),
            ));
        }
        permit
            .verify(control_key, TicketKind::RelayPermit, Roles::RELAY, now)
            .map_err(|e| invalid("permit", e.to_string()))?;
        Ok(permit)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    const CONTROL_KEY: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    fn parse(extra: &str) -> RelayFile {
        let text = format!(
            "listen = \"127.0.0.1:7000\"\nkey_file = \"r.key\"\ncontrol_public_key = \"{CONTROL_KEY}\"\n{extra}"
        );
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn a_permit_beside_control_registration_is_refused_naming_both() {
        let file = parse(&format!(
            "permit = \"{}\"\n[control]\naddr = \"127.0.0.1:7100\"\ntrust = \"sha256:{}\"\n",
            "00".repeat(TICKET_LEN),
            "ab".repeat(32)
        ));
        // Refused before anything is read or written (the key file does not exist).
        let base = std::env::temp_dir().join(format!("shoal-config-{}-none", std::process::id()));
        let err = file.validate(&base, UnixTime(0)).unwrap_err();
        assert!(matches!(err, ConfigError::Conflict { first: "permit", second: "[control]", .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("`permit`") && text.contains("`[control]`"), "{text}");
        assert!(!base.exists());
    }
}
