//! The Shoal SDK core: what a game links to talk to other players over the mesh.
//!
//! A [`Node`] holds one mesh endpoint and many virtual connections ([`vc`]), each an
//! end-to-end encrypted session with one peer, tuned by a [`profile`]: its own keys
//! ([`crypto`]), its own renet connection for reliability and channels, and its own
//! [`path`] manager that measures the candidate paths and moves traffic between them.
//!
//! Everything here is sans-IO: fed `now` and datagrams, polled for datagrams, events and
//! the next timeout. The tokio driver and the deterministic simulator run the same code.

pub mod crypto;
pub mod driver;
pub mod frame;
pub mod node;
pub mod pacing;
pub mod path;
pub mod profile;
pub mod session;
pub mod vc;

pub use driver::{Client, ClientError, ClientEvent, NodeHandle, NodeStatus};
pub use node::{Event, Node, NodeCounters, NodeError, PeerInfo, VcKey};
pub use path::{PathId, PathInfo, PathKind, PathStats, SwitchReason};
pub use profile::{Delivery, Policy, Profile, ProfileConfig};
pub use session::{PlayerState, Session, SessionConfig, SessionError, SessionEvent};
pub use shoal_link::{LinkError, Trust, TrustError};
pub use shoal_mesh::endpoint::Path;
pub use shoal_mesh::wire::{Route, VcId};
pub use shoal_protocol::control::Refusal;
pub use shoal_protocol::{Identity, NodeId, PublicKey, RandomnessError, SignedTicket};
pub use vc::{CloseReason, VcCounters, VcEvent, VcSendError, VcStats};

/// The README's Rust blocks, compiled as doctests so that they follow the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
