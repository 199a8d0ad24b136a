//! Shoal's hosting server: the authority for everything in the world except players' avatars
//! (which the avatar mesh carries between players): zones, NPCs and objects, and the world
//! events players' actions cause.
//!
//! A library first. A studio's game is a [`content::Content`] file (zones, NPC kinds and where
//! they spawn, objects) and, where the built-in behaviours (wander, patrol, follow, flee) are not
//! enough, its own [`behaviour::Behaviour`]s registered by name. The world is plain Rust data
//! stepped by [`world::World::tick`] rather than a `bevy_ecs` World: the server needs no
//! scheduler, a tick of 10,000 entities is a loop over a vector, and a studio's Bevy game
//! talks to it over the network through the SDK, not by sharing its ECS.
//!
//! The core is sans-IO: the world takes the time since the last tick and the players'
//! positions, and its own seeded RNG makes every choice, so the same inputs give the same
//! world.
//!
//! The layers, from the inside out:
//! - [`world`]: the entities, moved a tick at a time; [`content`] and [`behaviour`] make it.
//! - [`interest`] and [`snapshot`]: what each client sees and how its states are encoded.
//! - [`host`]: the server's core: hellos checked offline, positions, actions, and each tick's
//!   spawns, despawns, events and snapshot datagrams per client.
//! - [`server`]: the tokio/quinn driver around [`host::Host`], with the registration at the
//!   control server; [`config`] reads its TOML.
//!
//! A studio's own server is [`server::start`] with its [`world::World`] (its content, its
//! behaviours); `shoal-hosting-server` is exactly that with the built-in behaviours.

pub mod behaviour;
pub mod config;
pub mod content;
pub mod grid;
pub mod host;
pub mod interest;
pub mod server;
pub mod snapshot;
pub mod world;

/// The demo zone's content, as shipped with the server.
pub const DEMO_ZONE: &str = include_str!("../content/demo-zone.toml");
