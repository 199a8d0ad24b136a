//! Snapshots: the codec is [`shoal_protocol::snapshot`], which the SDK decodes with; this
//! module adds how the world's entities are quantised for it.

pub use shoal_protocol::snapshot::*;

use crate::world::Entity;

/// `e`'s state as a snapshot carries it.
pub fn quantise(e: &Entity) -> Quantised {
    Quantised::new(e.at.to_array(), e.heading, e.state)
}
