//! The contract every Shoal component speaks: node identities, tickets signed by the control
//! server, control messages with their codec and stream framing, and VC profiles. Pure data
//! and codecs; no sockets, no clocks.
//!
//! Times are passed in by the caller as [`UnixTime`] so that every check here is reproducible.

pub mod codec;
pub mod control;
pub mod framing;
pub mod identity;
pub mod profile;
pub mod snapshot;
pub mod subscription;
pub mod ticket;
pub mod world;

pub use identity::{Identity, NodeId, PublicKey, RandomnessError, Signature, SignatureError};
pub use subscription::{Group, SignedSubscription, StreamId, SubscriptionBody, SubscriptionError};
pub use ticket::{Roles, SignedTicket, TicketBody, TicketError, TicketKind, UnixTime, VerifiedTicket};
