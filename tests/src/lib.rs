//! Shoal's test bed: the deterministic network simulator ([`sim`], [`link`]) and the
//! scenarios that the tests and `shoal-sim-bench` share ([`scenario`]).

pub mod link;
pub mod scenario;
pub mod sim;
