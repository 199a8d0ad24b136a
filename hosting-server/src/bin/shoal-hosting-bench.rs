//! `shoal-hosting-bench`: what the hosting server's world costs, driven through its core
//! directly (no sockets): the world of N wandering NPCs in a square zone, C clients standing
//! in it, each with its interest and snapshot writer, every snapshot acknowledged.
//!
//! Per population it reports the bytes a moving entity costs in a snapshot (against naive full
//! snapshots of the same entities' states with postcard, from the same run), the egress per
//! client, and the tick's CPU time (world, interest, snapshots; median over the run) on this
//! one thread. Ends with one JSON line.

use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use glam::Vec2;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use shoal_hosting::behaviour::BUILT_IN;
use shoal_hosting::content::Content;
use shoal_hosting::interest::{ClientInterest, EntityGrid, InterestConfig};
use shoal_hosting::snapshot::{Quantised, SnapshotWriter, quantise};
use shoal_hosting::world::{EntityId, World};
use shoal_protocol::NodeId;

#[derive(Parser, Debug)]
#[command(
    name = "shoal-hosting-bench",
    about = "Hosting server: snapshot bytes per entity, egress per client, tick time"
)]
struct Args {
    /// Entities in the world, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [100usize, 1000, 10000])]
    entities: Vec<usize>,
    /// Clients.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Simulated seconds per population.
    #[arg(long, default_value_t = 10.0)]
    secs: f32,
    /// Ticks a second.
    #[arg(long, default_value_t = 20)]
    tick_hz: u32,
}

/// A naive full snapshot's entry, as a server without deltas or quantisation would send it.
#[derive(Serialize)]
struct Naive {
    id: u32,
    x: f32,
    z: f32,
    heading: f32,
    state: u16,
}

struct Client {
    at: Vec2,
    interest: ClientInterest,
    writer: SnapshotWriter,
    last: rustc_hash::FxHashMap<EntityId, Quantised>,
}

#[derive(Debug, Default)]
struct Run {
    entities: usize,
    side: f32,
    bytes_per_moving: f64,
    naive_per_moving: f64,
    egress_kbps_per_client: f64,
    tick_ms_p50: f64,
    tick_ms_p99: f64,
    per_snapshot: f64,
}

/// A square zone with `n` sheep wandering in 100 spawn circles; density as in the demo zone.
fn content(n: usize) -> anyhow::Result<(Content, f32)> {
    let side = ((n as f32 / 0.0025).sqrt()).max(200.0);
    let mut text = format!(
        "[[zone]]\nname = \"z\"\nmin = [0.0, 0.0]\nmax = [{side}, {side}]\n\n[[npc_kind]]\nname = \"sheep\"\nbehaviour = \"wander\"\nspeed = 3.0\nhealth = 20\nrespawn_secs = 20\n"
    );
    let groups = 100.min(n);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(9);
    for g in 0..groups {
        let count = n / groups + usize::from(g < n % groups);
        let (x, z) = (rng.random_range(0.1..0.9) * side, rng.random_range(0.1..0.9) * side);
        text.push_str(&format!(
            "\n[[spawn]]\nkind = \"sheep\"\nzone = \"z\"\ncount = {count}\naround = [{x}, {z}]\nradius = {}\n",
            side / 10.0
        ));
    }
    Ok((Content::parse(&text, BUILT_IN).context("bench content")?, side))
}

fn run(n: usize, args: &Args) -> anyhow::Result<Run> {
    let (content, side) = content(n)?;
    let mut world = World::new(content, 1, &[]).context("bench world")?;
    let cfg = InterestConfig::default();
    let mut grid = EntityGrid::new(cfg.leave_radius);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(2);
    let players: Vec<(NodeId, Vec2)> = (0..args.clients)
        .map(|i| {
            let at = Vec2::new(rng.random_range(0.0..side), rng.random_range(0.0..side));
            (NodeId((i as u64).to_be_bytes()), at)
        })
        .collect();
    let mut clients: Vec<Client> = players
        .iter()
        .map(|&(_, at)| Client {
            at,
            interest: ClientInterest::new(),
            writer: SnapshotWriter::new(),
            last: Default::default(),
        })
        .collect();
    let dt = 1.0 / args.tick_hz as f32;
    let ticks = (args.secs * args.tick_hz as f32) as usize;
    let (mut bytes, mut naive, mut moving, mut entries, mut snapshots) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut tick_ms = Vec::with_capacity(ticks);
    let mut buf = Vec::new();
    let mut states = Vec::new();
    for _ in 0..ticks {
        // Timed: the world's tick, the grid, and each client's interest and snapshot; the
        // bench's own accounting (the naive postcard sizes) is not.
        let t0 = Instant::now();
        world.tick(dt, &players);
        let all = world.entities();
        grid.rebuild(all);
        let mut core = t0.elapsed();
        for c in &mut clients {
            let t1 = Instant::now();
            let change = c.interest.update(&cfg, &grid, all, c.at);
            for id in change.despawned {
                c.writer.forget(id);
                c.last.remove(&id);
            }
            let chosen = c.interest.choose(all, c.at, cfg.budget, |_| 8);
            states.clear();
            states.extend(chosen.iter().map(|&id| (id, quantise(&all[id.0 as usize]))));
            let seq = c.writer.write(&states, &mut buf);
            c.writer.ack(seq);
            core += t1.elapsed();
            snapshots += 1;
            bytes += buf.len() as u64;
            entries += states.len() as u64;
            for &(id, q) in &states {
                let e = &all[id.0 as usize];
                let naive_entry = Naive { id: id.0, x: e.at.x, z: e.at.y, heading: e.heading, state: e.state };
                naive += postcard::to_allocvec(&naive_entry).map_or(0, |v| v.len() as u64);
                if c.last.insert(id, q).is_some_and(|old| old != q) {
                    moving += 1;
                }
            }
        }
        tick_ms.push(core.as_secs_f64() * 1000.0);
    }
    tick_ms.sort_by(f64::total_cmp);
    let secs = f64::from(args.secs);
    Ok(Run {
        entities: n,
        side,
        // Snapshot headers counted in, spread over the entries.
        bytes_per_moving: bytes as f64 / moving.max(1) as f64,
        naive_per_moving: (naive as f64 + snapshots as f64 * 2.0) / moving.max(1) as f64,
        egress_kbps_per_client: bytes as f64 * 8.0 / 1000.0 / secs / args.clients.max(1) as f64,
        tick_ms_p50: tick_ms[tick_ms.len() / 2],
        tick_ms_p99: tick_ms[(tick_ms.len() * 99 / 100).min(tick_ms.len() - 1)],
        per_snapshot: entries as f64 / snapshots.max(1) as f64,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "shoal-hosting-bench: {} clients, {} Hz, {} s per population; the core driven directly on one thread",
        args.clients, args.tick_hz, args.secs
    );
    println!(
        "| entities | zone side m | entities per snapshot | bytes per moving entity | postcard, full | ratio | egress kbit/s per client | tick ms p50 / p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut json = Vec::new();
    for &n in &args.entities {
        let r = run(n, &args)?;
        let ratio = r.bytes_per_moving / r.naive_per_moving;
        println!(
            "| {} | {:.0} | {:.1} | {:.2} | {:.2} | {ratio:.3} | {:.1} | {:.2} / {:.2} |",
            r.entities,
            r.side,
            r.per_snapshot,
            r.bytes_per_moving,
            r.naive_per_moving,
            r.egress_kbps_per_client,
            r.tick_ms_p50,
            r.tick_ms_p99
        );
        json.push(format!("\"bytes_per_moving_entity_{n}\":{:.2}", r.bytes_per_moving));
        json.push(format!("\"postcard_ratio_{n}\":{ratio:.3}"));
        json.push(format!("\"egress_kbps_per_client_{n}\":{:.1}", r.egress_kbps_per_client));
        json.push(format!("\"tick_ms_{}_clients_{n}_entities\":{:.2}", args.clients, r.tick_ms_p50));
        if n == *args.entities.last().unwrap_or(&n) {
            json.push(format!("\"bytes_per_moving_entity\":{:.2}", r.bytes_per_moving));
            json.push(format!("\"postcard_ratio\":{ratio:.3}"));
            json.push(format!("\"egress_kbps_per_client\":{:.1}", r.egress_kbps_per_client));
        }
    }
    println!("{{{}}}", json.join(","));
    Ok(())
}
