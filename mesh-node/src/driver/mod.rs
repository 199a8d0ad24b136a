//! Drivers that run the sans-IO cores on real UDP sockets with tokio.

pub mod batch;
pub mod endpoint;
pub mod register;
pub mod relay;
