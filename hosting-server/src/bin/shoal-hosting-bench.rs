//! `shoal-hosting-bench`: what the hosting server costs, driven through its sans-IO core
//! ([`Host`]) directly (no sockets): clients say hello with real session tickets, report where
//! they stand, and acknowledge every snapshot datagram at once.
//!
//! Per population it reports the bytes a moving entity costs in a snapshot (against naive
//! full snapshots of the same entities' states with postcard, from the same run), the egress
//! per client (snapshot datagrams and stream messages), and the tick's CPU time (the core's
//! tick and the acknowledgements it takes; median and p99) on this one thread. Then a scene
//! like naia's shooter benchmark (90 moving entities, all in view), and the handover: a client
//! walking across the border of two cores' zones and back, connecting and leaving as the SDK
//! does, with the longest an entity within its view went without a state. Ends with one JSON
//! line.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use glam::Vec2;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use rustc_hash::FxHashMap;
use serde::Serialize;
use shoal_hosting::behaviour::BUILT_IN;
use shoal_hosting::content::Content;
use shoal_hosting::host::{ClientId, Host, HostConfig, Output};
use shoal_hosting::interest::InterestConfig;
use shoal_hosting::snapshot::{Quantised, SnapshotReader, decode};
use shoal_hosting::world::{EntityId, World};
use shoal_protocol::control::KeyProof;
use shoal_protocol::world::{Acks, ClientToHost, HostingInfo, SNAPSHOT_HEADER, WORLD_ACCOUNT};
use shoal_protocol::{Identity, NodeId, Roles, TicketBody, TicketKind, UnixTime};

#[derive(Parser, Debug)]
#[command(
    name = "shoal-hosting-bench",
    about = "Hosting server: snapshot bytes per entity, egress per client, tick time, handover"
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
    tick_hz: u16,
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

const T0_MS: u64 = 1_800_000_000_000;
const CERT: [u8; 32] = [7; 32];

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

/// Square zones of `n` sheep wandering in spawn circles, at the demo zone's density; `zones`
/// side by side along x.
fn content(n: usize, zones: usize, speed: f32) -> anyhow::Result<(Content, f32)> {
    let side = ((n as f32 / zones as f32 / 0.0025).sqrt()).max(200.0);
    let mut text = String::new();
    for z in 0..zones {
        let x0 = z as f32 * side;
        text.push_str(&format!("[[zone]]\nname = \"z{z}\"\nmin = [{x0}, 0.0]\nmax = [{}, {side}]\n\n", x0 + side));
    }
    text.push_str(&format!(
        "[[npc_kind]]\nname = \"sheep\"\nbehaviour = \"wander\"\nspeed = {speed}\nhealth = 20\nrespawn_secs = 20\n"
    ));
    let groups = 100.min(n);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(9);
    for g in 0..groups {
        let count = n / groups + usize::from(g < n % groups);
        let zone = g % zones;
        let (x, z) = ((zone as f32 + rng.random_range(0.1..0.9)) * side, rng.random_range(0.1..0.9) * side);
        text.push_str(&format!(
            "\n[[spawn]]\nkind = \"sheep\"\nzone = \"z{zone}\"\ncount = {count}\naround = [{x}, {z}]\nradius = {}\n",
            side / 10.0
        ));
    }
    Ok((Content::parse(&text, BUILT_IN).context("bench content")?, side))
}

/// A client's hello, made as the SDK makes it at `ms`.
fn hello(control: &Identity, who: &Identity, ms: u64) -> ClientToHost {
    let session = TicketBody::new(TicketKind::Session, who.public_key(), Roles::CLIENT, UnixTime(T0_MS / 1000), 3600)
        .sign(control)
        .encode()
        .to_vec();
    ClientToHost::Hello { session, proof: KeyProof::new(who, WORLD_ACCOUNT, ms, &CERT) }
}

/// What a bench client keeps: the states it took, to tell moving entities.
#[derive(Default)]
struct Seen {
    reader: SnapshotReader,
    last: FxHashMap<EntityId, Quantised>,
}

fn run(n: usize, clients: usize, secs: f32, tick_hz: u16, all_in_view: bool) -> anyhow::Result<Run> {
    let (content, side) = content(n, 1, 3.0)?;
    let world = World::new(content, 1, &[]).context("bench world")?;
    let control = Identity::from_seed([1; 32]);
    let cfg = HostConfig { tick_hz, max_clients: clients + 1, ..HostConfig::default() };
    let mut host = Host::new(world, cfg, control.public_key(), CERT);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(2);
    let t0 = Instant::now();
    for i in 0..clients {
        let id = ClientId(i as u64);
        host.connected(id);
        let mut seed = [7u8; 32];
        seed[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let who = Identity::from_seed(seed);
        host.on_message(t0, T0_MS, id, hello(&control, &who, T0_MS));
        let at = if all_in_view {
            Vec2::splat(side / 2.0)
        } else {
            Vec2::new(rng.random_range(0.0..side), rng.random_range(0.0..side))
        };
        host.on_message(t0, T0_MS, id, ClientToHost::Position { at: [at.x, 0.0, at.y] });
    }
    while host.poll_output().is_some() {}
    let mut seen: Vec<Seen> = (0..clients).map(|_| Seen::default()).collect();
    let ticks = (secs * f32::from(tick_hz)) as usize;
    let dt = Duration::from_secs_f64(1.0 / f64::from(tick_hz));
    let (mut bytes, mut naive, mut moving, mut entries, mut snapshots) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut tick_ms = Vec::with_capacity(ticks);
    let mut outputs = Vec::new();
    for k in 0..ticks {
        let now = t0 + dt * k as u32;
        // Timed: the core's tick; then, below, the acknowledgements it takes.
        let started = Instant::now();
        host.tick(now);
        let mut core = started.elapsed();
        outputs.extend(std::iter::from_fn(|| host.poll_output()));
        let mut acks: Vec<(ClientId, Acks)> = Vec::new();
        for o in outputs.drain(..) {
            match o {
                Output::Datagram(id, d) => {
                    bytes += d.len() as u64;
                    snapshots += 1;
                    let Ok((seq, list)) = decode(&d[SNAPSHOT_HEADER..]) else {
                        anyhow::bail!("a snapshot did not decode")
                    };
                    let s = &mut seen[id.0 as usize];
                    for (e, q) in s.reader.apply(seq, &list) {
                        entries += 1;
                        let truth = &host.world().entities()[e.0 as usize];
                        let entry =
                            Naive { id: e.0, x: truth.at.x, z: truth.at.y, heading: truth.heading, state: truth.state };
                        naive += postcard::to_allocvec(&entry).map_or(0, |v| v.len() as u64);
                        if s.last.insert(e, q).is_some_and(|old| old != q) {
                            moving += 1;
                        }
                    }
                    let mut a = None;
                    Acks::take(&mut a, seq);
                    if let Some(a) = a {
                        acks.push((id, a));
                    }
                }
                // A frame: its postcard body, a version byte and a 4-byte length.
                Output::Message(_, m) => bytes += postcard::to_allocvec(&m).map_or(0, |v| v.len() as u64 + 5),
                Output::Close(_) => {}
            }
        }
        let started = Instant::now();
        for (id, a) in acks {
            host.on_datagram(id, &a.encode());
        }
        core += started.elapsed();
        tick_ms.push(core.as_secs_f64() * 1000.0);
    }
    tick_ms.sort_by(f64::total_cmp);
    Ok(Run {
        entities: n,
        side,
        // Snapshot and datagram headers counted in, spread over the entries that moved.
        bytes_per_moving: bytes as f64 / moving.max(1) as f64,
        naive_per_moving: (naive as f64 + snapshots as f64 * 2.0) / moving.max(1) as f64,
        egress_kbps_per_client: bytes as f64 * 8.0 / 1000.0 / f64::from(secs) / clients.max(1) as f64,
        tick_ms_p50: tick_ms[tick_ms.len() / 2],
        tick_ms_p99: tick_ms[(tick_ms.len() * 99 / 100).min(tick_ms.len() - 1)],
        per_snapshot: entries as f64 / snapshots.max(1) as f64,
    })
}

/// Two cores serve the two halves of a world; one client walks across their border and back
/// at `speed`, connecting to a server once inside its band less 10 m and leaving it past its
/// band less 2 m, as the SDK's view does. Returns the longest an entity within the view radius
/// (less 5 m) went without a state from any server, ms, over the walk.
fn handover(speed: f32, tick_hz: u16) -> anyhow::Result<f64> {
    let (content, side) = content(400, 2, 1.0)?;
    let control = Identity::from_seed([1; 32]);
    let me = Identity::from_seed([2; 32]);
    let mut hosts: Vec<(HostingInfo, Host)> = (0..2)
        .map(|z| {
            let world = World::new(content.clone(), 3, &[]).context("handover world")?;
            let host =
                Host::new(world, HostConfig { zone: z, tick_hz, ..HostConfig::default() }, control.public_key(), CERT);
            let info = HostingInfo {
                id: NodeId([z as u8; 8]),
                addr: ([127, 0, 0, 1], 1).into(),
                cert: CERT,
                zone: host.zone().clone(),
                overlap: host.config().overlap,
            };
            Ok((info, host))
        })
        .collect::<anyhow::Result<_>>()?;
    let radius = InterestConfig::default().radius;
    let (from, to) = (side * 0.3, side * 1.7);
    let walk = 2.0 * (to - from) / speed;
    let dt = 1.0 / f32::from(tick_hz);
    let t0 = Instant::now();
    let mut linked: Vec<Option<SnapshotReader>> = vec![None, None];
    let mut last_state: FxHashMap<EntityId, f32> = FxHashMap::default();
    let mut worst = 0.0f32;
    let ticks = (walk / dt) as usize;
    for k in 0..=ticks {
        let t = k as f32 * dt;
        let d = speed * t;
        let x = if d <= to - from { from + d } else { to - (d - (to - from)) };
        let at = [x, side / 2.0];
        let now = t0 + Duration::from_secs_f32(t);
        let ms = T0_MS + (t * 1000.0) as u64;
        for (i, (info, host)) in hosts.iter_mut().enumerate() {
            let connect = info.zone.contains(at, info.overlap - 10.0);
            let keep = info.zone.contains(at, info.overlap - 2.0);
            if linked[i].is_none() && connect {
                host.connected(ClientId(1));
                host.on_message(now, ms, ClientId(1), hello(&control, &me, ms));
                linked[i] = Some(SnapshotReader::new());
            } else if linked[i].is_some() && !keep {
                host.disconnected(ClientId(1));
                linked[i] = None;
            }
            if linked[i].is_some() {
                host.on_message(now, ms, ClientId(1), ClientToHost::Position { at: [at[0], 0.0, at[1]] });
            }
            host.tick(now);
            while let Some(o) = host.poll_output() {
                let (Output::Datagram(_, d), Some(reader)) = (o, linked[i].as_mut()) else { continue };
                let Ok((seq, list)) = decode(&d[SNAPSHOT_HEADER..]) else { anyhow::bail!("a snapshot did not decode") };
                for (e, _) in reader.apply(seq, &list) {
                    last_state.insert(e, t);
                }
                let mut a = None;
                Acks::take(&mut a, seq);
                if let Some(a) = a {
                    host.on_datagram(ClientId(1), &a.encode());
                }
            }
        }
        // Skip the first second: the first connection's own start.
        if t < 1.0 {
            continue;
        }
        for (_, host) in &hosts {
            let w = host.world();
            for e in w.entities().iter().filter(|e| e.present && w.serves(e.id)) {
                if e.at.distance(Vec2::from(at)) < radius - 5.0 {
                    let since = last_state.get(&e.id).map_or(f32::INFINITY, |&s| t - s);
                    worst = worst.max(since);
                }
            }
        }
    }
    Ok(f64::from(worst) * 1000.0)
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
    let row = |r: &Run| {
        println!(
            "| {} | {:.0} | {:.1} | {:.2} | {:.2} | {:.3} | {:.1} | {:.2} / {:.2} |",
            r.entities,
            r.side,
            r.per_snapshot,
            r.bytes_per_moving,
            r.naive_per_moving,
            r.bytes_per_moving / r.naive_per_moving,
            r.egress_kbps_per_client,
            r.tick_ms_p50,
            r.tick_ms_p99
        );
    };
    for &n in &args.entities {
        let r = run(n, args.clients, args.secs, args.tick_hz, false)?;
        row(&r);
        let ratio = r.bytes_per_moving / r.naive_per_moving;
        json.push(format!("\"bytes_per_moving_entity_{n}\":{:.2}", r.bytes_per_moving));
        json.push(format!("\"postcard_ratio_{n}\":{ratio:.3}"));
        json.push(format!("\"egress_kbps_per_client_{n}\":{:.1}", r.egress_kbps_per_client));
        json.push(format!("\"tick_ms_{}_clients_{n}_entities\":{:.2}", args.clients, r.tick_ms_p50));
        json.push(format!("\"tick_ms_p99_{}_clients_{n}_entities\":{:.2}", args.clients, r.tick_ms_p99));
        if n == *args.entities.last().unwrap_or(&n) {
            json.push(format!("\"bytes_per_moving_entity\":{:.2}", r.bytes_per_moving));
            json.push(format!("\"postcard_ratio\":{ratio:.3}"));
            json.push(format!("\"egress_kbps_per_client\":{:.1}", r.egress_kbps_per_client));
        }
    }
    // naia's shooter scene: 90 moving entities, every one in view of the client.
    let scene = run(90, 1, args.secs, args.tick_hz, true)?;
    println!(
        "90 moving entities all in view (naia's shooter scene): {:.2} bytes per moving entity, {:.1} entities per snapshot",
        scene.bytes_per_moving, scene.per_snapshot
    );
    json.push(format!("\"bytes_per_moving_entity_90_in_view\":{:.2}", scene.bytes_per_moving));
    let gap = handover(5.0, args.tick_hz)?;
    println!(
        "handover: walking across two servers' border and back at 5 m/s, the longest an entity in view went without a state: {gap:.0} ms (one snapshot interval: {:.0} ms)",
        1000.0 / f64::from(args.tick_hz)
    );
    json.push(format!("\"handover_gap_ms\":{gap:.0}"));
    println!("{{{}}}", json.join(","));
    Ok(())
}
