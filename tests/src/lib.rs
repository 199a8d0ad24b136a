//! Shoal's test bed: the deterministic network simulator ([`sim`], [`link`]) and the
//! scenarios that the tests and `shoal-sim-bench` share ([`scenario`]), and the loopback
//! throughput harness ([`throughput`]).

pub mod link;
pub mod scenario;
pub mod sim;
pub mod throughput;
