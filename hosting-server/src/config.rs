//! The hosting server's configuration file: plain serde data, checked once into what the
//! server runs with.
//!
//! ```toml
//! listen = "0.0.0.0:7400"             # QUIC, for clients
//! metrics = "127.0.0.1:9400"          # optional: Prometheus /metrics and /healthz
//! key_file = "hosting.key"            # the server's identity seed (hex); created if missing
//! control_public_key = "…64 hex…"     # the only key whose session tickets it takes
//! content = "world.toml"              # optional: the world's content (the demo zone if absent)
//! zone = "meadow"                     # optional: the zone served (the content's first if absent)
//! seed = 1                            # the world's RNG
//! tick_hz = 20
//! overlap = 135.0                     # m past the zone's border still served (at least
//!                                     # the interest's leave radius, for no gap at the border)
//!
//! [interest]
//! radius = 120.0                      # entities this near enter a client's view, m
//! leave_radius = 135.0                # and leave it past this
//! budget = 1100                       # bytes of entity states per client per tick
//!
//! [limits]
//! messages_per_sec = 30               # per client, on its stream
//! message_burst = 60
//! actions_per_sec = 4
//! action_burst = 8
//! reach = 6.0                         # m from an entity to act on it
//! max_speed = 12.0                    # m/s a player may move
//! max_clients = 2000
//!
//! [control]                           # optional: register with the control server
//! addr = "192.0.2.1:7100"
//! trust = "sha256:…64 hex…"           # its certificate's fingerprint, or a CA file's path
//! public_addr = "192.0.2.30:7400"     # where clients reach this server (default: listen)
//! ```
//!
//! Relative paths are read from the config file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use shoal_link::Trust;
use shoal_link::daemon::load_or_create_key;
use shoal_protocol::PublicKey;
use shoal_protocol::identity::parse_hex;

use crate::behaviour::BUILT_IN;
use crate::content::Content;
use crate::host::HostConfig;
use crate::interest::InterestConfig;
use crate::server::{ControlSettings, ServerConfig};
use crate::world::World;

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostingFile {
    /// QUIC address.
    pub listen: SocketAddr,
    /// HTTP address for `/metrics` and `/healthz`.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// Identity seed file.
    pub key_file: PathBuf,
    /// The control server's public key, hex.
    pub control_public_key: String,
    /// The content file; the demo zone when absent.
    #[serde(default)]
    pub content: Option<PathBuf>,
    /// The zone served, by name.
    #[serde(default)]
    pub zone: Option<String>,
    /// The world's seed.
    #[serde(default = "one")]
    pub seed: u64,
    /// Ticks a second.
    #[serde(default = "default_tick_hz")]
    pub tick_hz: u16,
    /// Overlap band, m.
    #[serde(default = "default_overlap")]
    pub overlap: f32,
    /// Interest.
    #[serde(default)]
    pub interest: Option<InterestFile>,
    /// Limits.
    #[serde(default)]
    pub limits: LimitsFile,
    /// Registration with the control server.
    #[serde(default)]
    pub control: Option<ControlFile>,
}

/// The `[interest]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterestFile {
    /// Enter radius, m.
    pub radius: f32,
    /// Leave radius, m.
    pub leave_radius: f32,
    /// Bytes per client per tick.
    pub budget: usize,
}

/// The `[limits]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsFile {
    /// Messages a second per client.
    pub messages_per_sec: f64,
    /// Messages at once.
    pub message_burst: f64,
    /// Actions a second per player.
    pub actions_per_sec: f32,
    /// Actions at once.
    pub action_burst: f32,
    /// Reach, m.
    pub reach: f32,
    /// Fastest plausible move, m/s.
    pub max_speed: f32,
    /// Most clients.
    pub max_clients: usize,
}

impl Default for LimitsFile {
    fn default() -> Self {
        let h = HostConfig::default();
        LimitsFile {
            messages_per_sec: 30.0,
            message_burst: 60.0,
            actions_per_sec: h.actions_per_sec,
            action_burst: h.action_burst,
            reach: h.reach,
            max_speed: h.max_speed,
            max_clients: h.max_clients,
        }
    }
}

/// The `[control]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlFile {
    /// The control server's QUIC address.
    pub addr: SocketAddr,
    /// `sha256:<hex>` or a CA file.
    pub trust: String,
    /// Where clients reach this server.
    #[serde(default)]
    pub public_addr: Option<SocketAddr>,
}

fn one() -> u64 {
    1
}

fn default_tick_hz() -> u16 {
    HostConfig::default().tick_hz
}

fn default_overlap() -> f32 {
    HostConfig::default().overlap
}

/// A configuration that is wrong, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// The field (or file).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError { field: field.to_string(), reason: reason.to_string() }
}

/// What the server runs with.
#[derive(Debug)]
pub struct Settings {
    /// The server's configuration.
    pub server: ServerConfig,
    /// Its world.
    pub world: World,
    /// Where `/metrics` is served.
    pub metrics: Option<SocketAddr>,
}

impl HostingFile {
    /// Reads and parses `path`.
    ///
    /// # Errors
    /// When it cannot be read or is not valid TOML of this shape.
    pub fn load(path: &Path) -> Result<HostingFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| invalid(&path.display().to_string(), e))?;
        toml::from_str(&text).map_err(|e| invalid(&path.display().to_string(), e))
    }

    /// Checks every field and loads the key and the content; relative paths are under `base`.
    ///
    /// # Errors
    /// The first field that is wrong, by name.
    pub fn validate(&self, base: &Path) -> Result<Settings, ConfigError> {
        let control_key = PublicKey(parse_hex(&self.control_public_key).map_err(|e| invalid("control_public_key", e))?);
        let identity = load_or_create_key(&base.join(&self.key_file)).map_err(|e| invalid("key_file", e))?;
        let content = match &self.content {
            None => Content::parse(crate::DEMO_ZONE, BUILT_IN).map_err(|e| invalid("content (the demo zone)", e))?,
            Some(p) => {
                let path = base.join(p);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| invalid("content", format!("{}: {e}", path.display())))?;
                Content::parse(&text, BUILT_IN).map_err(|e| invalid("content", format!("{}: {e}", path.display())))?
            }
        };
        let zone = match &self.zone {
            None => 0,
            Some(name) => content
                .zones
                .iter()
                .position(|z| z.name == *name)
                .ok_or_else(|| invalid("zone", format!("the content has no zone {name:?}")))?,
        };
        if !(1..=120).contains(&self.tick_hz) {
            return Err(invalid("tick_hz", "must be between 1 and 120"));
        }
        if !(self.overlap.is_finite() && self.overlap >= 0.0) {
            return Err(invalid("overlap", "must be 0 or more"));
        }
        let interest = match &self.interest {
            None => InterestConfig::default(),
            Some(i) => {
                if !(i.radius > 0.0 && i.leave_radius >= i.radius && i.leave_radius.is_finite()) {
                    return Err(invalid("interest", "needs 0 < radius <= leave_radius"));
                }
                if i.budget < 64 {
                    return Err(invalid("interest.budget", "must be at least 64 bytes"));
                }
                InterestConfig { radius: i.radius, leave_radius: i.leave_radius, budget: i.budget }
            }
        };
        let l = &self.limits;
        for (name, v) in [
            ("limits.messages_per_sec", l.messages_per_sec),
            ("limits.message_burst", l.message_burst),
            ("limits.actions_per_sec", f64::from(l.actions_per_sec)),
            ("limits.action_burst", f64::from(l.action_burst)),
            ("limits.reach", f64::from(l.reach)),
            ("limits.max_speed", f64::from(l.max_speed)),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(name, "must be above zero"));
            }
        }
        if l.message_burst < 1.0 || l.action_burst < 1.0 {
            return Err(invalid("limits", "bursts must be at least 1"));
        }
        let control = match &self.control {
            None => None,
            Some(c) => Some(ControlSettings {
                addr: c.addr,
                trust: c.trust.parse::<Trust>().map_err(|e| invalid("control.trust", e))?,
                public_addr: c.public_addr,
            }),
        };
        if control.as_ref().is_some_and(|c| c.public_addr.is_none()) && self.listen.ip().is_unspecified() {
            return Err(invalid("control.public_addr", "needed when listen is a wildcard address"));
        }
        let world = World::new(content, self.seed, &[]).map_err(|e| invalid("content", e))?;
        let host = HostConfig {
            tick_hz: self.tick_hz,
            zone,
            overlap: self.overlap,
            interest,
            reach: l.reach,
            actions_per_sec: l.actions_per_sec,
            action_burst: l.action_burst,
            max_speed: l.max_speed,
            max_clients: l.max_clients,
            ..HostConfig::default()
        };
        let server = ServerConfig {
            listen: self.listen,
            identity,
            control_key,
            host,
            messages_per_sec: l.messages_per_sec,
            message_burst: l.message_burst,
            control,
        };
        Ok(Settings { server, world, metrics: self.metrics })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const KEY: &str = "0000000000000000000000000000000000000000000000000000000000000001";

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("shoal-hosting-config-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn parse(extra: &str) -> Result<Settings, ConfigError> {
        let text = format!("listen = \"127.0.0.1:0\"\nkey_file = \"h.key\"\ncontrol_public_key = \"{KEY}\"\n{extra}");
        let file: HostingFile = toml::from_str(&text).map_err(|e| invalid("toml", e))?;
        file.validate(&dir())
    }

    #[test]
    fn the_defaults_serve_the_demo_zone_and_every_mistake_names_its_field() {
        let s = parse("").unwrap();
        assert_eq!(s.server.host.tick_hz, 20);
        assert!(s.world.entities().len() > 200);
        for (extra, field) in [
            ("zone = \"moon\"", "zone"),
            ("tick_hz = 0", "tick_hz"),
            ("overlap = -1.0", "overlap"),
            ("[interest]\nradius = 100.0\nleave_radius = 50.0\nbudget = 1000", "interest"),
            ("[limits]\nreach = 0.0", "limits.reach"),
            ("content = \"missing.toml\"", "content"),
            ("[control]\naddr = \"127.0.0.1:1\"\ntrust = \"sha256:12\"", "control.trust"),
        ] {
            let e = parse(extra).unwrap_err();
            assert_eq!(e.field, field, "{extra}: {e}");
        }
        let bad_key = "listen = \"127.0.0.1:0\"\nkey_file = \"h.key\"\ncontrol_public_key = \"zz\"\n";
        let e = toml::from_str::<HostingFile>(bad_key).unwrap().validate(&dir()).unwrap_err();
        assert_eq!(e.field, "control_public_key");
        assert!(toml::from_str::<HostingFile>("listen = \"127.0.0.1:0\"\ncolour = 1").is_err());
    }
}
