//! Avatar figures: what the codec spends per update on the movement model, and what a crowd
//! of players serving avatars in the simulator puts on the wire and shows.

use std::time::{Duration, Instant};

use shoal_sdk::Traffic;
use shoal_sdk::avatar::stream::SEAL_OVERHEAD;
use shoal_sdk::avatar::{
    Ack, CodecConfig, ConfigError, Decoder, Encoder, Quantizer, StreamDecoder, StreamEncoder, Trace,
};

use crate::link::{LinkConfig, Loss};
use crate::overhead::IP_UDP_HEADERS;
use crate::sim::HostId;
use crate::world::{AvatarStats, World, WorldSpec, WorldStats};

/// Bits per avatar update on a recorded trace, beside postcard-encoded full states.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodecBits {
    /// Updates of moving avatars: median and 99th percentile, bits.
    pub moving_p50: usize,
    /// See `moving_p50`.
    pub moving_p99: usize,
    /// Updates of avatars standing still.
    pub idle_p50: usize,
    /// See `idle_p50`.
    pub idle_p99: usize,
    /// Mean over all updates.
    pub mean: f64,
    /// Mean of the same states as postcard full states (position, orientation, velocity as
    /// `f32` arrays, the animation id).
    pub postcard_mean: f64,
}

/// Every player of `trace`, each served at 30 Hz on the 60 Hz avatar clock to one receiver
/// whose acks come one update later (a 33 ms RTT).
pub fn codec_bits(trace: &Trace) -> Result<CodecBits, ConfigError> {
    let q = Quantizer::new(CodecConfig::default())?;
    let (mut moving, mut idle, mut postcard) = (Vec::new(), Vec::new(), 0usize);
    for p in 0..trace.players() {
        let (mut enc, mut dec) = (Encoder::new(q), Decoder::new(q));
        let mut pending: Option<Ack> = None;
        for (i, s) in trace.player(p).iter().enumerate() {
            let (_, bytes) = enc.encode(2 * i as u32, s);
            let _ = dec.decode(&bytes);
            if let Some(a) = dec.ack().and_then(|a| pending.replace(a)) {
                enc.on_ack(a);
            }
            let bits = bytes.len() * 8;
            if s.velocity.length() > 0.01 {
                moving.push(bits)
            } else {
                idle.push(bits)
            }
            let full = (s.position.to_array(), s.orientation.to_array(), s.velocity.to_array(), s.anim);
            postcard += postcard::to_allocvec(&full).map_or(0, |v| v.len() * 8);
        }
    }
    let n = (moving.len() + idle.len()).max(1) as f64;
    let total: usize = moving.iter().chain(&idle).sum();
    Ok(CodecBits {
        moving_p50: AvatarStats::quantile(&mut moving, 0.5).unwrap_or(0),
        moving_p99: AvatarStats::quantile(&mut moving, 0.99).unwrap_or(0),
        idle_p50: AvatarStats::quantile(&mut idle, 0.5).unwrap_or(0),
        idle_p99: AvatarStats::quantile(&mut idle, 0.99).unwrap_or(0),
        mean: total as f64 / n,
        postcard_mean: postcard as f64 / n,
    })
}

/// Bits per update on `trace`, each player sent at `hz` (a divisor of the trace's rate) as a
/// published stream (key states every [`shoal_sdk::avatar::stream::KEY_EVERY`] ticks, no acknowledgements) and as the
/// pairwise codec with acks one update later; both without loss. Returns (stream, pairwise),
/// each as (mean, p50, p99) over moving avatars' updates.
///
/// # Errors
/// When the default codec configuration is refused, or `hz` does not divide the trace's rate.
pub fn stream_bits(trace: &Trace, hz: u32) -> Result<[(f64, usize, usize); 2], ConfigError> {
    let q = Quantizer::new(CodecConfig::default())?;
    let every = (u32::from(trace.hz()) / hz.max(1)).max(1) as usize;
    let t0 = Instant::now();
    let (mut stream, mut pairwise) = (Vec::new(), Vec::new());
    for p in 0..trace.players() {
        let (mut se, mut sd) = (StreamEncoder::new(q), StreamDecoder::new(q));
        let (mut enc, mut dec) = (Encoder::new(q), Decoder::new(q));
        let mut pending: Option<Ack> = None;
        for (i, s) in trace.player(p).iter().enumerate().step_by(every) {
            // Ticks of the 60 Hz avatar clock, as the session stamps them.
            let tick = 2 * i as u32;
            let moving = s.velocity.length() > 0.01;
            let (_, bytes) = se.encode(tick, s);
            let _ = sd.decode(t0 + Duration::from_millis(33 * i as u64), &bytes);
            if moving {
                stream.push(bytes.len() * 8);
            }
            let (_, bytes) = enc.encode(tick, s);
            let _ = dec.decode(&bytes);
            if let Some(a) = dec.ack().and_then(|a| pending.replace(a)) {
                enc.on_ack(a);
            }
            if moving {
                pairwise.push(bytes.len() * 8);
            }
        }
    }
    let sum = |v: &mut Vec<usize>| {
        let mean = v.iter().sum::<usize>() as f64 / v.len().max(1) as f64;
        (mean, AvatarStats::quantile(v, 0.5).unwrap_or(0), AvatarStats::quantile(v, 0.99).unwrap_or(0))
    };
    Ok([sum(&mut stream), sum(&mut pairwise)])
}

/// What a crowd serving avatars did over a measured window.
#[derive(Debug, Clone, Default)]
pub struct AvatarRun {
    /// Players.
    pub players: usize,
    /// Simulated seconds measured (after the warm-up).
    pub secs: f64,
    /// Seconds the simulator took per simulated second, warm-up included: CPU time of the
    /// process (the simulator runs on one thread), which on an otherwise idle machine is its
    /// wall time, and unlike wall time does not grow with what else the machine runs.
    pub cpu_per_sim_s: f64,
    /// Per player: kbit/s sent on the wire (UDP payload and IPv4/UDP headers).
    pub upload_kbps: Vec<f64>,
    /// Per player: of that, the avatar messages' own bytes (updates and acks), kbit/s.
    pub payload_kbps: Vec<f64>,
    /// Per player: the rest (headers, measurement, keepalives, the reliable VC's upkeep),
    /// kbit/s.
    pub rest_kbps: Vec<f64>,
    /// Per player: the rest, per neighbour, kbit/s.
    pub rest_kbps_per_neighbour: Vec<f64>,
    /// Per player, per neighbour: the mesh's overhead, measurement and upkeep, as
    /// `shoal-sim-bench overhead` counts it (datagrams without a message, with their IPv4/UDP
    /// headers, and the bytes that ride in the ones with), kbit/s: the rest less each update's
    /// own headers.
    pub overhead_kbps_per_neighbour: Vec<f64>,
    /// Bits per avatar message on the wire's payload, on average.
    pub bits_per_message: f64,
    /// Neighbours per player at the end, on average.
    pub neighbours: f64,
    /// Datagrams a second a player sent, on average: those that carried messages and those
    /// that did not (pings, pongs, acks, keepalives on their own).
    pub data_dps: f64,
    /// See `data_dps`.
    pub overhead_dps: f64,
    /// Bytes (UDP payload) of each, on average per datagram.
    pub data_bytes: f64,
    /// See `data_bytes`.
    pub overhead_bytes: f64,
    /// Players watched per player (beyond its neighbours) at the end, on average.
    pub watched: f64,
    /// Per relay: kbit/s it sent on the wire (fanned-out copies and relayed pairwise
    /// traffic).
    pub relay_egress_kbps: Vec<f64>,
    /// What a classic server would send to show every player the same avatars at the same
    /// rates with the same codec, kbit/s on the wire: the pairwise updates and acks players
    /// sent each other, each watcher's copies of the streams (without their seal), and a
    /// datagram to every player every 33 ms with IPv4/UDP and a 24-byte header (as the
    /// mesh's own short form).
    pub classic_egress_kbps: f64,
    /// Of the pairs of players (from both sides) within the view radius less what both
    /// could move since their last reports, at the end: how many, and how many show the
    /// other (with watching off, within the enter radius).
    pub view_pairs: (usize, usize),
    /// What players showed of each other, over the whole run.
    pub stats: AvatarStats,
    /// The world's own account of the run: sign-ins, introductions, avatars appeared.
    pub world: WorldStats,
}

/// A classic server's datagrams to each player a second, and the header each carries above
/// UDP (see [`AvatarRun::classic_egress_kbps`]).
const CLASSIC_HZ: f64 = 30.0;
const CLASSIC_HEADER: u64 = 24;

/// The players of `spec` (serving avatars) over 20 ms links with 2 % bursty loss: `warmup`,
/// then `secs` measured.
///
/// # Errors
/// When the world's interest settings are refused.
pub fn avatar_run(
    seed: u64,
    spec: WorldSpec,
    warmup: Duration,
    secs: Duration,
) -> Result<AvatarRun, shoal_control::interest::InterestError> {
    let started = crate::crowd::cpu_secs();
    let players = spec.players;
    let mut world = World::new(seed, spec)?;
    world.sim.set_default_link(LinkConfig::latency(Duration::from_millis(20)).with_loss(Loss::BURSTY));
    world.run_for(warmup);
    let snapshot = |w: &mut World| -> Vec<(Traffic, u64, u64)> {
        (0..w.len())
            .map(|i| {
                let h = w.host(i);
                let c = w.sim.session(h).avatar_counters();
                (w.sim.node(h).traffic().0, c.bytes_sent, c.messages_sent)
            })
            .collect()
    };
    let relays = |w: &World| -> Vec<((u64, u64), u64)> {
        (0..w.spec().relays).map(|r| (w.sim.sent_by(HostId(r)), w.sim.relay_counters(HostId(r)).copies)).collect()
    };
    let published = |w: &World| -> (u64, u64) {
        (0..w.len()).fold((0, 0), |(n, b), i| {
            let c = w.sim.session(w.host(i)).avatar_counters();
            (n + c.published, b + c.published_bytes)
        })
    };
    let (before, relays0, published0) = (snapshot(&mut world), relays(&world), published(&world));
    world.run_for(secs);
    let (after, relays1, published1) = (snapshot(&mut world), relays(&world), published(&world));
    let cpu_per_sim_s = (crate::crowd::cpu_secs() - started) / (warmup + secs).as_secs_f64();
    let s = secs.as_secs_f64();
    let kbps = |bytes: u64| bytes as f64 * 8.0 / 1000.0 / s;
    let mut run = AvatarRun { players, secs: s, cpu_per_sim_s, ..AvatarRun::default() };
    let (mut bytes, mut messages, mut neighbours) = (0u64, 0u64, 0usize);
    let mut sum = Traffic::default();
    for (i, ((t0, b0, m0), (t1, b1, m1))) in before.iter().zip(&after).enumerate() {
        let wire = t1.on_the_wire() - t0.on_the_wire();
        let payload = b1 - b0;
        sum.data_datagrams += t1.data_datagrams - t0.data_datagrams;
        sum.overhead_datagrams += t1.overhead_datagrams - t0.overhead_datagrams;
        sum.data_bytes += t1.data_bytes - t0.data_bytes;
        sum.overhead_bytes += t1.overhead_bytes - t0.overhead_bytes;
        let n = world.neighbours(i).count();
        neighbours += n;
        bytes += payload;
        messages += m1 - m0;
        run.upload_kbps.push(kbps(wire));
        run.payload_kbps.push(kbps(payload));
        run.rest_kbps.push(kbps(wire - payload));
        if n > 0 {
            run.rest_kbps_per_neighbour.push(kbps(wire - payload) / n as f64);
            let lone = t1.overhead_bytes - t0.overhead_bytes
                + IP_UDP_HEADERS * (t1.overhead_datagrams - t0.overhead_datagrams);
            let riding = t1.riding_bytes - t0.riding_bytes;
            run.overhead_kbps_per_neighbour.push(kbps(lone + riding) / n as f64);
        }
    }
    run.bits_per_message = bytes as f64 * 8.0 / messages.max(1) as f64;
    run.neighbours = neighbours as f64 / players.max(1) as f64;
    let per_player = |x: u64| x as f64 / players.max(1) as f64 / s;
    run.data_dps = per_player(sum.data_datagrams);
    run.overhead_dps = per_player(sum.overhead_datagrams);
    run.data_bytes = sum.data_bytes as f64 / sum.data_datagrams.max(1) as f64;
    run.overhead_bytes = sum.overhead_bytes as f64 / sum.overhead_datagrams.max(1) as f64;
    let mut copies = 0;
    for (((d0, b0), c0), ((d1, b1), c1)) in relays0.iter().zip(&relays1) {
        run.relay_egress_kbps.push(kbps(b1 - b0 + IP_UDP_HEADERS * (d1 - d0)));
        copies += c1 - c0;
    }
    let (updates, sealed) = (published1.0 - published0.0, published1.1 - published0.1);
    let plain = sealed.saturating_sub(SEAL_OVERHEAD as u64 * updates) as f64 / updates.max(1) as f64;
    let datagrams = players as f64 * CLASSIC_HZ * s;
    let classic = bytes as f64 + copies as f64 * plain + datagrams * (IP_UDP_HEADERS + CLASSIC_HEADER) as f64;
    run.classic_egress_kbps = classic * 8.0 / 1000.0 / s;
    let watched: usize = (0..players)
        .map(|i| {
            let m = world.sim.session(world.host(i)).avatar_mesh();
            let neighbours: Vec<_> = world.neighbours(i).collect();
            m.map_or(0, |m| m.watched().filter(|p| !neighbours.contains(p)).count())
        })
        .sum();
    run.watched = watched as f64 / players.max(1) as f64;
    let control = &world.spec().control.core;
    let radius = control.watch.map_or(control.interest.enter_radius, |w| w.view_radius);
    // Less what both may have moved while the control server had not heard them yet, and
    // while a new watcher waited for the stream's next key state (one a second) to decode.
    let within = radius - world.report_margin() - 2.0 * shoal_sdk::avatar::movement::RUN;
    run.view_pairs = world.shown_within(within);
    for why in world.unshown_within(within, 5) {
        eprintln!("{why}");
    }
    run.stats = world.avatar_stats(Duration::from_secs(2));
    run.world = world.stats();
    Ok(run)
}
