//! A player's session: the control-server client beside the mesh node.
//!
//! What a session decides lives in [`SessionCore`], a sans-IO state machine: signing in, or
//! resuming with the session ticket and signing in again when the server refuses it; the
//! reconnect backoff; check-ins; the report schedule and what reports carry; turning
//! introductions, farewells and permits into [`NodeCommand`]s; refusals. It is fed
//! `(now, input)` and polled for control-link commands, node commands, events and its next
//! timeout, so the tokio driver ([`Session`]) and the deterministic simulator run the same
//! decisions.
//!
//! [`Session::start`] signs in over QUIC, starts the node with the relay permit it receives,
//! binds to the relays the welcome names and checks in with the node's addresses. From then
//! on its task
//! - reports the player's state ([`Session::set_state`]) with every VC's stats, the relays'
//!   round-trip times and the peers lost since the last report, every
//!   [`SessionConfig::report_every`];
//! - acts on introductions by adding the neighbour and opening the VCs it names (or
//!   [`SessionConfig::profiles`]), and on farewells by closing them;
//! - installs renewed permits, and checks in again when a relay sees a new address for us;
//! - when the control connection is lost, keeps the mesh running and reconnects with
//!   exponential backoff, resuming with its session ticket (signing in again with the
//!   credentials if the ticket is refused).
//!
//! The game reads everything that happens from [`Session::next`] and talks on VCs through
//! the [`NodeHandle`](crate::NodeHandle) the session derefs to.

mod commands;
mod core;
mod driver;
mod report;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use renet::Bytes;
use shoal_link::{LinkError, Trust};
use shoal_mesh::wire::VcId;
use shoal_protocol::control::{ClientToControl, MAX_CONTROL_FRAME, Refusal, Report};
use shoal_protocol::{Identity, NodeId};

use crate::avatar::{AvatarEvent, CodecConfig, InterpConfig, Quantizer, RateConfig};
use crate::node::{Event, VcKey};
use crate::profile::Profile;

pub use self::commands::{NodeCommand, NodeOutcome};
pub use self::core::{LinkCommand, LinkId, SessionCore, SessionCounters, StartFailure};
pub use self::driver::Session;

/// Bytes of a report's frame kept for what the session adds to the game's state: the stats of
/// every VC and the peers lost since the last report.
pub const REPORT_RESERVE: usize = 8 * 1024;

/// The most a report carrying only the game's [`PlayerState`] (no link stats) may encode to:
/// a control frame ([`MAX_CONTROL_FRAME`]) less [`REPORT_RESERVE`].
pub const MAX_STATE_REPORT: usize = MAX_CONTROL_FRAME - REPORT_RESERVE;

/// What a session needs.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The control server.
    pub control: SocketAddr,
    /// How its certificate is trusted.
    pub trust: Trust,
    /// The account.
    pub account: String,
    /// Its password (sent inside TLS only).
    pub password: String,
    /// The player's long-term key.
    pub identity: Identity,
    /// Where the mesh socket binds.
    pub mesh_bind: SocketAddr,
    /// Hash of this build, checked against the server's allow-list.
    pub build_hash: [u8; 32],
    /// How often the session reports.
    pub report_every: Duration,
    /// VCs opened with every introduced neighbour when the introduction names none.
    pub profiles: Vec<(VcId, Profile)>,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// First wait before reconnecting; doubles per failed attempt.
    pub reconnect_min: Duration,
    /// Longest wait between attempts.
    pub reconnect_max: Duration,
    /// How the player's avatar is served to its neighbours and theirs shown; `None` for a
    /// session without avatars (its realtime VC is then the game's alone).
    pub avatars: Option<AvatarConfig>,
}

/// How a session serves its avatar ([`SessionCore::set_avatar`]) to every neighbour and shows
/// theirs.
///
/// Avatars travel on one VC with every neighbour, [`AvatarConfig::vc`]: by default the
/// realtime VC (1) the introductions open. The session takes every message on it; a game
/// that wants unreliable messages of its own opens another realtime VC for them.
#[derive(Debug, Clone, Copy)]
pub struct AvatarConfig {
    /// The VC avatars travel on (default 1, the realtime one).
    pub vc: VcId,
    /// The zone's bounds and resolutions (every player of a zone must use the same).
    pub codec: Quantizer,
    /// How neighbours' avatars are shown.
    pub interp: InterpConfig,
    /// Rates by distance, and the upload budget.
    pub rates: RateConfig,
    /// Updates a second published for watchers beyond the neighbours, when anyone watches
    /// (default 5).
    pub watch_hz: f32,
}

impl Default for AvatarConfig {
    fn default() -> Self {
        // The default codec is valid by construction (see the avatar tests).
        let codec = Quantizer::new(CodecConfig::default())
            .unwrap_or_else(|e| unreachable!("default avatar codec invalid: {e}"));
        AvatarConfig {
            vc: VcId(1),
            codec,
            interp: InterpConfig::default(),
            rates: RateConfig::default(),
            watch_hz: 5.0,
        }
    }
}

impl SessionConfig {
    /// A session with the defaults: mesh socket on any address, a report a second, realtime
    /// (VC 1) and reliable (VC 2) VCs with each neighbour, reconnects from 250 ms up to 10 s.
    pub fn new(control: SocketAddr, trust: Trust, account: &str, password: &str, identity: Identity) -> SessionConfig {
        let any: IpAddr = if control.is_ipv4() { [0, 0, 0, 0].into() } else { [0u16; 8].into() };
        SessionConfig {
            control,
            trust,
            account: account.into(),
            password: password.into(),
            identity,
            mesh_bind: SocketAddr::new(if control.ip().is_loopback() { control.ip() } else { any }, 0),
            build_hash: [0; 32],
            report_every: Duration::from_secs(1),
            profiles: vec![(VcId(1), Profile::realtime(false)), (VcId(2), Profile::reliable())],
            connect_timeout: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(10),
            avatars: Some(AvatarConfig::default()),
        }
    }
}

/// What the player reports about itself; the session sends the latest with each report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlayerState {
    /// Where the character is.
    pub position: [f32; 3],
    /// A short status word ("playing", "loading").
    pub status: String,
    /// The character's state, persisted by the control server.
    pub character: Vec<u8>,
    /// Application status and data.
    pub app: Vec<u8>,
    /// Game state.
    pub game: Vec<u8>,
}

/// Something that happened in the session.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// A node event (VC opened, path changed, closed; relay bound or lost).
    Node(Event),
    /// A message arrived on a VC.
    Message(VcKey, Bytes),
    /// The control server introduced a neighbour; these VCs were opened with it.
    Introduced {
        /// The neighbour.
        peer: NodeId,
        /// The VCs opened.
        vcs: Vec<VcKey>,
    },
    /// A neighbour is no longer one; these VCs were closed.
    Farewell {
        /// The former neighbour.
        peer: NodeId,
        /// The VCs closed.
        closed: Vec<VcKey>,
    },
    /// The control server takes this address for our mesh socket (told once per address,
    /// however often it repeats it).
    Observed(SocketAddr),
    /// The control connection was lost; the mesh runs on and the session reconnects.
    ControlLost(String),
    /// Reconnected and resumed (or signed in again).
    ControlRestored,
    /// The control server refused something. After a refusal that ends the session
    /// (credentials, implausible reports, unknown build) the session stops reconnecting.
    Refused(Refusal),
    /// A neighbour's avatar appeared, moved or left.
    Avatar(AvatarEvent),
    /// The hosting servers of the world and the zones they serve (after the welcome, and
    /// whenever that changes). The session connects to them by itself.
    Hosting(Vec<shoal_protocol::world::HostingInfo>),
    /// The world view: a hosting server connected or left, an entity or avatar spawned or
    /// despawned, something happened, an action's outcome.
    World(crate::world::WorldEvent),
}

/// Why a session could not start.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The control server could not be reached or the link broke.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// Connecting took longer than [`SessionConfig::connect_timeout`].
    #[error("the control server did not answer in time")]
    Timeout,
    /// The control server refused the sign-in.
    #[error("the control server refused: {0}")]
    Refused(Refusal),
    /// The welcome carried something unusable.
    #[error("bad welcome: {0}")]
    BadWelcome(String),
    /// The mesh socket could not be set up.
    #[error("mesh socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Why the game's state was not taken for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// A report carrying this state would not fit a control frame beside the link stats;
    /// sent, the server would close the connection on it, and every report after a reconnect
    /// would do the same. The state the reports carry is unchanged.
    #[error(
        "a report with this state would take {len} bytes; the state may fill at most {max} of a control \
         frame's {MAX_CONTROL_FRAME} (the rest is kept for link stats)"
    )]
    TooLarge {
        /// Bytes a report with this state and no link stats encodes to.
        len: usize,
        /// The most it may: [`MAX_STATE_REPORT`].
        max: usize,
    },
}

/// A report of `state` as it goes on the wire, with the longest sequence number and time a
/// report can carry and no link stats.
fn state_report(state: &PlayerState, build_hash: [u8; 32]) -> ClientToControl {
    ClientToControl::Report(Box::new(Report {
        seq: u64::MAX,
        unix_ms: u64::MAX,
        status: state.status.clone(),
        app: state.app.clone(),
        build_hash,
        position: state.position,
        character: state.character.clone(),
        game: state.game.clone(),
        links: Vec::new(),
        lost: Vec::new(),
        observed: Vec::new(),
    }))
}

/// Checks that reports can carry `state`: a report with it and no link stats must fit in
/// [`MAX_STATE_REPORT`] bytes. [`Session::set_state`] and [`SessionCore::set_state`] refuse
/// a state that does not, so it is never sent.
pub fn check_state(state: &PlayerState) -> Result<(), StateError> {
    let len = encoded_len(&state_report(state, [0; 32]));
    if len > MAX_STATE_REPORT {
        return Err(StateError::TooLarge { len, max: MAX_STATE_REPORT });
    }
    Ok(())
}

/// Bytes `msg` takes as a control frame's body (its codec frame: version byte and postcard).
/// A message that does not encode counts as too large for any frame.
fn encoded_len(msg: &ClientToControl) -> usize {
    shoal_protocol::codec::encode(msg).map_or(usize::MAX, |f| f.len())
}
