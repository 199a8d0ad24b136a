//! Shoal's control server: it vouches for identities and introduces peers, and never carries
//! game payloads.
//!
//! The logic is sans-IO, like every Shoal core: [`interest`] decides from reported coordinates
//! which players are introduced to each other and when they are dismissed.

pub mod interest;
pub mod synthetic;
