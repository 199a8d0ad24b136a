//! Shoal's control server: it vouches for identities and introduces peers, and never carries
//! game payloads.
//!
//! The logic is sans-IO, like every Shoal core: [`core`] is the server's state machine (sign-in,
//! check-in, reports, plausibility, presence, permits, introductions); [`interest`] decides from reported coordinates
//! which players are introduced to each other and when they are dismissed, and [`watch`] who
//! watches whom beyond them through relay fan-out; [`store`] keeps
//! accounts, characters and report history in SQLite or PostgreSQL; [`auth`] checks sign-ins
//! (argon2id, or the operator's own [`auth::Authenticator`]); [`tls`] makes and keeps the
//! server's certificate and lets clients pin it; [`server`] runs the core on real QUIC, each connection held to a [`limit`], and [`http`] serves health, metrics and the
//! live state.

pub mod auth;
pub mod core;
pub mod http;
pub mod interest;
pub mod limit;
pub mod server;
pub mod store;
pub mod synthetic;
pub mod tls;
pub mod watch;
