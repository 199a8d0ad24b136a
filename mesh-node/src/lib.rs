//! The mesh plane: Shoal's datagram format, the relay router, endpoints that send over
//! source routes, and the batched UDP driver that runs them.
//!
//! Cores (`wire`, `router`, `bind`, `endpoint`) are sans-IO: they take `now` and bytes and
//! return decisions. The `driver` module runs them on real sockets with tokio.

pub mod bind;
pub mod bundle;
pub mod clock;
pub mod config;
pub mod driver;
pub mod endpoint;
pub mod fanout;
pub mod metrics;
pub mod router;
pub mod wire;
