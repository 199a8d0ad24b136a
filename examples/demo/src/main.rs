//! `cargo run --release -p shoal-demo`: a small mesh on loopback with no control server.
//!
//! A local control key signs permits for two relays and two players. Relay R1 binds to relay
//! R2 (and R2 back), player A binds to R1 and player B to R2. Both players then send avatar
//! updates to each other over the two-relay route A → R1 → R2 → B and back, and once a second
//! the demo prints the latency of each hop (from the per-hop trace) and each hop's share of a
//! probe's round trip.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use shoal_mesh::driver::batch::bind_reuseport;
use shoal_mesh::driver::endpoint::MeshEndpoint;
use shoal_mesh::driver::relay::{Relay, RelayOptions};
use shoal_mesh::endpoint::{Envelope, Path, ProbeReport, Received};
use shoal_mesh::router::{Rate, RouterConfig};
use shoal_mesh::wire::{Route, VcId};
use shoal_protocol::{Identity, NodeId, Roles, SignedTicket, TicketBody, TicketKind, UnixTime};

#[derive(Parser, Debug)]
#[command(name = "shoal-demo", about = "Two players exchanging avatar state through two relays on loopback")]
struct Args {
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Avatar updates per second from each player.
    #[arg(long, default_value_t = 30)]
    rate: u32,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn identity() -> anyhow::Result<Identity> {
    Ok(Identity::generate()?)
}

fn permit(control: &Identity, node: &Identity, roles: Roles) -> SignedTicket {
    TicketBody::new(TicketKind::RelayPermit, node.public_key(), roles, UnixTime(unix_now()), 3600).sign(control)
}

fn start_relay(control: &Identity, peers: Vec<std::net::SocketAddr>) -> anyhow::Result<Relay> {
    let me = identity()?;
    let mut secret = [0u8; 32];
    secret.copy_from_slice(&identity()?.seed()[..]);
    let router = RouterConfig {
        permit: Some(permit(control, &me, Roles::RELAY)),
        identity: me,
        control_key: control.public_key(),
        source_packets: Rate { per_sec: 2_000.0, burst: 200.0 },
        source_bytes: Rate { per_sec: 2_000_000.0, burst: 200_000.0 },
        bind_verifications: Rate { per_sec: 100.0, burst: 20.0 },
        notices: Rate { per_sec: 100.0, burst: 20.0 },
        max_bindings: 64,
        cookie_secret: secret,
        fanout: shoal_mesh::fanout::FanoutConfig::default(),
    };
    let sockets = bind_reuseport("127.0.0.1:0".parse()?, 1, 1 << 20)?;
    Ok(Relay::spawn(sockets, RelayOptions { router, peers })?)
}

/// One player's avatar state, as it travels: a tick and a position.
fn avatar_update(tick: u32, t: f32) -> Vec<u8> {
    let (x, y, z) = (10.0 * t.cos(), 10.0 * t.sin(), 0.0f32);
    let mut b = Vec::with_capacity(16);
    for v in [tick.to_le_bytes(), x.to_le_bytes(), y.to_le_bytes(), z.to_le_bytes()] {
        b.extend_from_slice(&v);
    }
    b
}

fn fmt_hops(hops: &[Duration]) -> String {
    hops.iter().map(|h| format!("{:>5}µs", h.as_micros())).collect::<Vec<_>>().join(" |")
}

#[derive(Debug, Default)]
struct PlayerLog {
    sent: u32,
    received: u32,
    last: Option<Received>,
    probes: Vec<ProbeReport>,
}

/// Sends avatar updates to `peer` over `route` until `end`, receiving the peer's meanwhile;
/// probes the route once a second when `probe` is set.
async fn play(
    mut ep: MeshEndpoint,
    peer: NodeId,
    route: Route,
    rate: u32,
    end: Instant,
    probe: bool,
) -> anyhow::Result<PlayerLog> {
    let mut log = PlayerLog::default();
    let period = Duration::from_secs(1) / rate.max(1);
    let env = Envelope { destination: peer, path: Path::Relayed(route), vc: VcId(1), trace: true };
    let start = Instant::now();
    let mut next_probe = start + Duration::from_secs(1);
    let mut tick = 0;
    while Instant::now() < end {
        let t = start.elapsed().as_secs_f32();
        ep.send(&env, &avatar_update(tick, t)).await?;
        tick += 1;
        log.sent += 1;
        let next = start + period * tick;
        while let Some(left) = next.checked_duration_since(Instant::now()) {
            match ep.recv(left).await {
                Ok(rx) => {
                    log.received += 1;
                    log.last = Some(rx);
                }
                Err(_) => break,
            }
        }
        if probe && Instant::now() >= next_probe {
            next_probe += Duration::from_secs(1);
            if let Ok(report) = ep.probe(peer, &env.path).await {
                let rtt = report.rtt;
                let hops = fmt_hops(&report.hop_rtts);
                let one_way = log.last.as_ref().and_then(|r| r.trace).map(|t| fmt_hops(&t.hop_latencies()));
                println!(
                    "t={:>4.1}s  B→A one-way per hop: {}   probe A→B→A rtt {:>5}µs, per hop: {}",
                    start.elapsed().as_secs_f32(),
                    one_way.unwrap_or_else(|| "-".into()),
                    rtt.as_micros(),
                    hops
                );
                log.probes.push(report);
            }
        }
    }
    // Keep answering for a moment so the peer's last probe and updates are not lost.
    while ep.recv(Duration::from_millis(200)).await.is_ok() {
        log.received += 1;
    }
    Ok(log)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let control = identity()?;
    println!("Shoal mesh demo: two players, two relays, loopback. Control key {}", control.public_key());
    let r2 = start_relay(&control, vec![])?;
    let r1 = start_relay(&control, vec![r2.local_addr()])?;
    println!("relay R1 {} on {}   relay R2 {} on {}", r1.node_id(), r1.local_addr(), r2.node_id(), r2.local_addr());

    let (a, b) = (identity()?, identity()?);
    let (pa, pb) = (permit(&control, &a, Roles::CLIENT), permit(&control, &b, Roles::CLIENT));
    let mut ea = MeshEndpoint::bind("127.0.0.1:0".parse()?, a.clone(), pa).await?;
    let mut eb = MeshEndpoint::bind("127.0.0.1:0".parse()?, b.clone(), pb).await?;
    let bind_wait = Duration::from_secs(5);
    ea.attach_relay(r1.local_addr(), bind_wait).await.context("player A could not bind to R1")?;
    eb.attach_relay(r2.local_addr(), bind_wait).await.context("player B could not bind to R2")?;
    println!(
        "player A {} bound to R1 (seen as {})   player B {} bound to R2 (seen as {})",
        a.node_id(),
        ea.core().observed_address().map_or("?".into(), |x| x.to_string()),
        b.node_id(),
        eb.core().observed_address().map_or("?".into(), |x| x.to_string()),
    );
    // R1 and R2 bind to each other in the background; wait until they have.
    let deadline = Instant::now() + bind_wait;
    while r1.stats().bindings() < 2 || r2.stats().bindings() < 2 {
        anyhow::ensure!(Instant::now() < deadline, "the relays did not bind to each other");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let route = Route::new(&[r1.node_id(), r2.node_id()]).context("route")?;
    println!("route A → R1 → R2 → B; hops listed as A→R1 | R1→R2 | R2→B (and reversed for B→A)\n");

    let end = Instant::now() + Duration::from_secs(args.seconds);
    let pa = tokio::spawn(play(ea, b.node_id(), route, args.rate, end, true));
    let pb = tokio::spawn(play(eb, a.node_id(), route.reversed(), args.rate, end, false));
    let (la, lb) = (pa.await??, pb.await??);

    let (c1, c2) = (r1.stats().counters(), r2.stats().counters());
    println!();
    println!("player A sent {} updates, received {} from B", la.sent, la.received);
    println!("player B sent {} updates, received {} from A", lb.sent, lb.received);
    println!(
        "R1 forwarded {} datagrams ({} bytes); R2 forwarded {}",
        c1.forwarded_packets, c1.forwarded_bytes, c2.forwarded_packets
    );
    if let Some(p) = la.probes.last() {
        println!("last probe: rtt {}µs, per hop {}", p.rtt.as_micros(), fmt_hops(&p.hop_rtts));
    }
    r1.shutdown();
    r2.shutdown();
    anyhow::ensure!(la.received > 0 && lb.received > 0, "no avatar update crossed the mesh");
    Ok(())
}
