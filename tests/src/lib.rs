//! Shoal's test bed: the deterministic network simulator ([`sim`], [`link`], [`nat`]), with the
//! control server's core and players that sign in to it, and the scenarios that the tests and
//! `shoal-sim-bench` share ([`scenario`], [`punch`], [`world`]), and the loopback
//! throughput harness ([`throughput`]), and the daemons tests start as processes ([`procs`]), and
//! real NAT in Linux network namespaces ([`netns`]).

pub mod avatars;
pub mod crowd;
pub mod fanout;
pub mod link;
pub mod nat;
pub mod netns;
pub mod overhead;
pub mod procs;
pub mod punch;
pub mod scenario;
pub mod sim;
pub mod throughput;
pub mod world;
