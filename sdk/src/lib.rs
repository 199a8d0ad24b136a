//! The Shoal SDK core: what a game links to talk to other players over the mesh.
//!
//! A [`Node`] holds one mesh endpoint and many virtual connections ([`vc`]), each an
//! end-to-end encrypted session with one peer, tuned by a [`profile`]: its own keys
//! ([`crypto`]), its own renet connection for reliability and channels, and its own choice of
//! [`path`]s by its profile's policy. What the paths to a peer measure is shared by every VC
//! with that peer, and the pings that keep it current ride on data where data flows.
//!
//! Everything here is sans-IO: fed `now` and datagrams, polled for datagrams, events and
//! the next timeout. The tokio driver and the deterministic simulator run the same code.

pub mod avatar;
pub mod crypto;
pub mod driver;
pub mod frame;
pub mod node;
pub mod pacing;
pub mod path;
mod peer;
pub mod profile;
pub mod session;
pub mod vc;
pub mod world;

pub use avatar::{AvatarEvent, AvatarState};
pub use driver::{Client, ClientError, ClientEvent, NodeHandle, NodeStatus};
pub use node::{Event, IP_UDP_HEADERS, MAX_VCS_PER_PEER, Node, NodeCounters, NodeError, PeerInfo, Traffic, VcKey};
pub use path::{PathId, PathInfo, PathKind, PathStats, SwitchReason};
pub use profile::{Delivery, Policy, Profile, ProfileConfig};
pub use session::{
    AvatarConfig, LinkCommand, LinkId, MAX_STATE_REPORT, NodeCommand, NodeOutcome, PlayerState, Session, SessionConfig,
    SessionCore, SessionCounters, SessionError, SessionEvent, StartFailure, StateError,
};
pub use shoal_link::{LinkError, Trust, TrustError};
pub use shoal_mesh::endpoint::Path;
pub use shoal_mesh::wire::{Route, VcId};
pub use shoal_protocol::control::Refusal;
pub use shoal_protocol::{Identity, NodeId, PublicKey, RandomnessError, SignedTicket};
pub use vc::{CloseReason, HelloError, VcCounters, VcEvent, VcSendError, VcStats};

/// The README's Rust blocks, compiled as doctests so that they follow the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
