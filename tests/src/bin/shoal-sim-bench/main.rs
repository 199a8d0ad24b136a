//! `shoal-sim-bench`: figures from the deterministic simulator, in virtual time.
//!
//! `failover`: over many seeds (each a random topology of three one-relay paths and one
//! two-relay path, 5–40 ms per link), a VC streams 100 messages a second from A to B; after
//! two seconds the first relay of its active path crashes. For Realtime (with and without a
//! redundant copy) and Reliable it reports, p50 and p99 over the seeds, the time from the crash
//! until the first message sent after it arrives, in ms and in RTTs of the failed path, and the
//! messages lost within a second of the crash. Ends with one JSON line.
//!
//! `bulk`: over several seeds, 20 MB from A to B on a Bulk VC over three one-relay paths
//! narrowed to 4, 2.5 and 1.5 MB/s (20–35 ms one way, 1 ms jitter), striped over all three
//! and then over the best single path. Reports the time to deliver it all, the goodput as a
//! share of the paths' capacity, the bytes sent per path and the retransmission overhead, and
//! checks every transfer's SHA-256. Ends with one JSON line.
//!
//! `nat`: hole punching across the 21 pairs of {public, full cone, address-restricted, home,
//! address-dependent mapping, symmetric}, over many seeds each. Each seed draws the links (the
//! relay's legs 5–40 ms one way, the direct path anywhere the triangle inequality allows beside
//! them). Both players, bound to one relay and introduced with its route and the address it saw
//! for the other, open a Reliable VC at the same moment, and A sends a message. Per pair it
//! reports, p50 and p99 over the seeds, the time from the open until the message is delivered to
//! B (in ms and in RTTs of the relayed path) and until both sides' VCs are on the direct path
//! (in ms and in RTTs of the direct path); then the matrix of pairs that went direct beside the
//! pairs the NAT models allow, and the runs over each target, left relayed where a direct path
//! was possible, or with no traffic at all. Ends with one JSON line.
//!
//! `nat-real` (real NAT and real time, as root): the same two players in Linux network
//! namespaces behind iptables MASQUERADE routers (`shoal_tests::netns`), with the relay and the
//! control server as processes on the public side, once behind two cone NATs and once behind a
//! cone and a symmetric (`--random-fully`) one, `--runs` times each. Reports per run the time
//! from the introduction to the first message and to the direct upgrade, in ms and in relay
//! RTTs, and the medians. Ends with one JSON line.
//!
//! `overhead`: what the mesh itself costs a player, per neighbour: one player with 1, 4, 16 and
//! 64 neighbours (all on the open network, bound to one relay, each introduced with the relay's
//! route and its direct address, with the session's realtime and reliable VCs), measured after
//! a warm-up over a window, idle, with 20-byte avatar updates flowing both ways at 30 Hz on
//! every realtime VC, and flowing one way only. Overhead is every datagram that carries no
//! message (pings, pongs, acks, keepalives, hellos, binds) plus the bytes that ride in the ones
//! that do; sent and received together, as UDP payload and with IPv4/UDP headers. Ends with one
//! JSON line holding the worst figure over the neighbour counts of each case.
//!
//! `crowd`: relay fan-out. For each population (100, 500 and 1,000 by default), the
//! `avatars` crowd with watching on: every player is introduced to its nearest (up to 16,
//! served directly) and watches the others within 150 m through their publishers' relays at
//! 5 Hz. Reports per-player upload, staleness of neighbours and of watched players, relay
//! egress, the egress a classic server would need for the same views, and how many of the
//! pairs in view show each other; then one player's upload watched by 1, 10, 100 and 500
//! others. Ends with one JSON line.
//!
//! `sockets` (real sockets and real time, not the simulator): a control server and a relay
//! process on loopback and `--players` players through the public `Session` API, moving
//! together in a 20 m square and setting their avatar 30 times a second, which the session
//! serves to every neighbour it is introduced to. Reports per player the datagrams and bytes a second it sends
//! and receives, the mesh's own share of them per neighbour, the path changes, and the CPU the
//! process (players and control server) spent. Ends with one JSON line.
//!
//! `sessions`: the world of `shoal_tests::world`: players that sign in to the control server's
//! core, walk between random waypoints, report their positions, are introduced to the players
//! near them, send a message on every VC with each neighbour twice a second, and part with
//! farewells. For each population (200 and 1,000 players by default) it runs the same number
//! of simulated seconds and reports the wall time per simulated second, with the sign-ins,
//! introductions, farewells and messages of the run. Ends with one JSON line.
//!
//! `avatars`: what serving avatars costs and shows. The headers an update pays on an
//! established direct VC (the overhead star, updates one way at 30 Hz); the codec's bits per
//! update on the recorded trace (`tests/fixtures/avatars-100x300s.trace`: 100 players for
//! five minutes at 30 Hz) beside the same states as postcard full states; then, for each
//! population (200 and 1,000 by default), players in clusters of about 20 serving their
//! avatars over 20 ms links with 2 % bursty loss, measured after a warm-up: each player's
//! upload on the wire split into avatar payload and the rest, the rest per neighbour, the age
//! of the newest update held from near neighbours (those serving at the full rate: within
//! 15 m while the budget allows, the nearest it affords in a crowd), from the others within
//! 15 m and from the far ones, how far shown avatars were from where their players were, and
//! the simulator's wall time per simulated second. Ends with one JSON line.
//!
//! `record-trace`: records the movement model's players (seeds 0, 1, …, in a 400 m square)
//! into a trace file; with its defaults it rewrites the fixture `avatars` reads.
//!
//! `loopback` (real sockets and real time, not the simulator): one Reliable VC between two
//! nodes on loopback over the direct path, its sender keeping the VC's buffer full, beside
//! renet's own connection over plain UDP with the same channel settings in the same harness.
//! For 100-byte and 1000-byte messages it reports messages/s, MB/s, CPU per message and bytes
//! of overhead per message of each, and the ratio. Runs alternate, and each figure is the
//! median of the rounds. Ends with one JSON line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use shoal_sdk::{PathKind, Profile};
use shoal_tests::netns::{self, NatMode};
use shoal_tests::overhead::{Flow, OverheadRun, overhead};
use shoal_tests::punch::{Front, PairLinks, PairRun, direct_possible, nat_pair};
use shoal_tests::scenario::{BULK_PATHS, BulkRun, Failover, bulk_transfer, relay_crash_failover};
use shoal_tests::throughput::{self, Contender, Offer};
use shoal_tests::world::{World, WorldSpec};

mod avatars;
mod crowd;
mod sockets;

#[derive(Parser, Debug)]
#[command(name = "shoal-sim-bench", about = "Figures from Shoal's deterministic network simulator")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Failover after a relay crash, over many seeds.
    Failover {
        /// Seeds to run (0..seeds).
        #[arg(long, default_value_t = 100)]
        seeds: u64,
    },
    /// A 20 MB Bulk transfer striped over three narrow paths, against the best one alone.
    Bulk {
        /// Seeds to run (0..seeds).
        #[arg(long, default_value_t = 20)]
        seeds: u64,
        /// Megabytes to transfer.
        #[arg(long, default_value_t = 20)]
        mb: usize,
    },
    /// Time to the first message and to the direct upgrade across every pair of NAT models.
    Nat {
        /// Seeds to run (0..seeds) per pair of NATs.
        #[arg(long, default_value_t = 100)]
        seeds: u64,
    },
    /// Hole punching through real NAT in network namespaces (needs root and iptables).
    NatReal {
        /// Runs of each NAT pair.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// The mesh's own traffic per neighbour, idle and while avatar updates flow.
    Overhead {
        /// Seconds measured per run, after a 20-second warm-up.
        #[arg(long, default_value_t = 30)]
        secs: u64,
        /// The seed of the topology.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// A crowd of sessions on real sockets: what each player puts on the wire.
    Sockets {
        /// Players.
        #[arg(long, default_value_t = 20)]
        players: usize,
        /// Seconds measured, after a 10-second warm-up.
        #[arg(long, default_value_t = 30)]
        secs: u64,
    },
    /// Players signing in, introduced by proximity and talking as they move: wall time per
    /// simulated second.
    Sessions {
        /// Populations to run, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "200,1000")]
        players: Vec<usize>,
        /// Simulated seconds per population.
        #[arg(long, default_value_t = 20)]
        secs: u64,
        /// The simulator's seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Relay fan-out: crowds in clusters who see everyone in view, the nearest directly and
    /// the rest through their relays; and one player's upload as more watch it.
    Crowd {
        /// Populations to run, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "100,500,1000")]
        players: Vec<usize>,
        /// Simulated seconds measured per population, after a 5-second warm-up.
        #[arg(long, default_value_t = 20)]
        secs: u64,
        /// The simulator's seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Audiences for the upload-against-watchers runs, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,10,100,500")]
        watchers: Vec<usize>,
    },
    /// Avatars: header bytes, codec bits, and crowds serving avatars in clusters.
    Avatars {
        /// Populations to run, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "200,1000")]
        players: Vec<usize>,
        /// Simulated seconds measured per population, after a 5-second warm-up.
        #[arg(long, default_value_t = 20)]
        secs: u64,
        /// The simulator's seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The recorded trace the codec's bits are measured on.
        #[arg(long, default_value = avatars::TRACE)]
        trace: PathBuf,
    },
    /// Records the movement model's players into a trace file (the codec's fixture).
    /// The published stream's codec (key states, no acknowledgements) beside the pairwise
    /// one, on the recorded trace.
    StreamCodec {
        /// Updates a second each is sent at (the trace is 30 Hz; this must divide it).
        #[arg(long, value_delimiter = ',', default_values_t = [30u32, 10, 5])]
        hz: Vec<u32>,
        /// The recorded trace.
        #[arg(long, default_value = avatars::TRACE)]
        trace: PathBuf,
    },
    RecordTrace {
        /// Players.
        #[arg(long, default_value_t = 100)]
        players: u16,
        /// Seconds, at 30 frames a second.
        #[arg(long, default_value_t = 300)]
        secs: u32,
        /// Where to write it.
        #[arg(long, default_value = avatars::TRACE)]
        out: PathBuf,
    },
    /// VC throughput on loopback against renet over plain UDP.
    Loopback {
        /// Rounds of each contender and size.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds measured per run (after one second of warm-up).
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
    },
}

#[derive(Debug, Default)]
struct Summary {
    ms: Vec<f64>,
    rtts: Vec<f64>,
    lost: u64,
    never_resumed: u64,
    out_of_order_runs: u64,
    over_target: u64,
}

impl Summary {
    fn add(&mut self, f: &Failover) {
        match f.resumed {
            Some(d) => {
                self.ms.push(d.as_secs_f64() * 1e3);
                self.rtts.push(d.as_secs_f64() / f.failed_rtt.as_secs_f64().max(1e-9));
                if d > 3 * f.failed_rtt + Duration::from_millis(20) {
                    self.over_target += 1;
                }
            }
            None => self.never_resumed += 1,
        }
        self.lost += f.lost;
        self.out_of_order_runs += u64::from(!f.all_in_order);
    }
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() - 1) as f64 * p).round() as usize]
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.cmd {
        Cmd::Failover { seeds } => failover(seeds),
        Cmd::Bulk { seeds, mb } => bulk(seeds, mb),
        Cmd::Nat { seeds } => nat(seeds),
        Cmd::NatReal { runs } => nat_real(runs),
        Cmd::Loopback { rounds, secs } => loopback(rounds, secs),
        Cmd::Overhead { secs, seed } => overhead_bench(seed, secs),
        Cmd::Sockets { players, secs } => sockets::sockets(players, secs),
        Cmd::Crowd { players, secs, seed, watchers } => crowd::crowd(&players, secs, seed, &watchers),
        Cmd::Sessions { players, secs, seed } => sessions(&players, secs, seed),
        Cmd::Avatars { players, secs, seed, trace } => avatars::avatars(&players, secs, seed, &trace),
        Cmd::RecordTrace { players, secs, out } => avatars::record_trace(players, secs, &out),
        Cmd::StreamCodec { hz, trace } => avatars::stream_codec(&hz, &trace),
    }
}

fn overhead_bench(seed: u64, secs: u64) -> ExitCode {
    let warmup = Duration::from_secs(20);
    let window = Duration::from_secs(secs);
    let cases = [
        ("idle", Flow::Idle),
        ("flowing", Flow::Both { hz: 30 }),
        ("one_way", Flow::Out { hz: 30 }),
        ("uneven", Flow::Uneven { hz: 30, back_hz: 1 }),
    ];
    println!(
        "{:<9} {:>10} {:>14} {:>14} {:>16} {:>14} {:>12}",
        "case", "neighbours", "kbit/s per nb", "on the wire", "datagrams/s/nb", "payload kbit/s", "path changes"
    );
    let mut worst = Vec::new();
    for (name, flow) in cases {
        let mut runs: Vec<OverheadRun> = Vec::new();
        for n in [1, 4, 16, 64] {
            let r = overhead(seed, n, flow, warmup, window);
            println!(
                "{name:<9} {n:>10} {:>14.3} {:>14.3} {:>16.2} {:>14.2} {:>12}",
                r.kbps_per_neighbour(),
                r.kbps_per_neighbour_on_the_wire(),
                r.datagrams_per_neighbour(),
                r.payload_kbps_per_neighbour(),
                r.path_changes
            );
            runs.push(r);
        }
        let max = |f: fn(&OverheadRun) -> f64| runs.iter().map(f).fold(0.0, f64::max);
        worst.push((
            name,
            max(OverheadRun::kbps_per_neighbour),
            max(OverheadRun::kbps_per_neighbour_on_the_wire),
            max(OverheadRun::datagrams_per_neighbour),
            runs.iter().map(|r| r.path_changes).sum::<usize>(),
        ));
    }
    let mut json = serde_json::Map::new();
    json.insert("seed".into(), seed.into());
    json.insert("secs".into(), secs.into());
    for (name, kbps, wire, dgrams, changes) in worst {
        let r = |v: f64| (v * 1000.0).round() / 1000.0;
        json.insert(format!("overhead_kbps_per_neighbour_{name}"), r(kbps).into());
        json.insert(format!("overhead_kbps_per_neighbour_{name}_on_the_wire"), r(wire).into());
        json.insert(format!("overhead_datagrams_per_neighbour_{name}"), r(dgrams).into());
        json.insert(format!("path_changes_{name}"), changes.into());
    }
    println!("{}", serde_json::Value::Object(json));
    ExitCode::SUCCESS
}

fn failover(seeds: u64) -> ExitCode {
    let cases = [
        ("realtime", Profile::realtime(false)),
        ("realtime_redundant", Profile::realtime(true)),
        ("reliable", Profile::reliable()),
    ];
    let mut out = Vec::new();
    println!(
        "{:<20} {:>9} {:>9} {:>10} {:>10} {:>6} {:>8} {:>10}",
        "profile", "p50 ms", "p99 ms", "p50 RTTs", "p99 RTTs", "lost", "stalled", ">3RTT+20"
    );
    for (name, profile) in cases {
        let mut s = Summary::default();
        for seed in 0..seeds {
            s.add(&relay_crash_failover(seed, profile.clone()));
        }
        println!(
            "{name:<20} {:>9.1} {:>9.1} {:>10.2} {:>10.2} {:>6} {:>8} {:>10}",
            pct(&s.ms, 0.5),
            pct(&s.ms, 0.99),
            pct(&s.rtts, 0.5),
            pct(&s.rtts, 0.99),
            s.lost,
            s.never_resumed,
            s.over_target
        );
        out.push((name, s));
    }
    let get = |n: &str| out.iter().find(|(k, _)| *k == n).map(|(_, s)| s);
    let (Some(rt), Some(red), Some(rel)) = (get("realtime"), get("realtime_redundant"), get("reliable")) else {
        return ExitCode::FAILURE;
    };
    println!(
        "{{\"seeds\":{seeds},\"realtime_failover_p50_ms\":{:.1},\"realtime_failover_p99_ms\":{:.1},\
         \"realtime_failover_p50_rtts\":{:.2},\"realtime_failover_p99_rtts\":{:.2},\
         \"realtime_redundant_failover_p99_ms\":{:.1},\"reliable_failover_p50_ms\":{:.1},\
         \"reliable_failover_p99_ms\":{:.1},\"reliable_failover_p99_rtts\":{:.2},\
         \"reliable_lost\":{},\"reliable_out_of_order_runs\":{},\"realtime_lost\":{},\
         \"realtime_lost_with_redundancy\":{},\"realtime_over_target_runs\":{}}}",
        pct(&rt.ms, 0.5),
        pct(&rt.ms, 0.99),
        pct(&rt.rtts, 0.5),
        pct(&rt.rtts, 0.99),
        pct(&red.ms, 0.99),
        pct(&rel.ms, 0.5),
        pct(&rel.ms, 0.99),
        pct(&rel.rtts, 0.99),
        rel.lost,
        rel.out_of_order_runs,
        rt.lost,
        red.lost,
        rt.over_target + red.over_target,
    );
    ExitCode::SUCCESS
}

fn bulk(seeds: u64, mb: usize) -> ExitCode {
    let total = mb << 20;
    let limit = Duration::from_secs(120);
    let capacity: u64 = BULK_PATHS.iter().map(|p| p.2).sum();
    let best = BULK_PATHS[0].2;
    let (mut striped, mut single, mut speedup) = (Vec::new(), Vec::new(), Vec::new());
    let (mut intact, mut runs, mut overhead) = (0u64, 0u64, Vec::new());
    let mut shares = [0u64; 3];
    println!(
        "{:>5} {:>11} {:>10} {:>8} {:>28} {:>9}",
        "seed", "striped s", "single s", "speedup", "bytes per path (MB)", "overhead"
    );
    for seed in 0..seeds {
        let s = bulk_transfer(seed, 3, total, limit);
        let one = bulk_transfer(seed, 1, total, limit);
        for r in [&s, &one] {
            runs += 1;
            intact += u64::from(r.received_hash.as_ref() == Some(&r.sent_hash) && r.duplicates == 0);
        }
        let secs = |r: &BulkRun| r.took.map_or(f64::NAN, |d| d.as_secs_f64());
        let sent: u64 = s.bytes_per_path.iter().sum();
        for (acc, b) in shares.iter_mut().zip(&s.bytes_per_path) {
            *acc += b;
        }
        overhead.push(sent as f64 / total as f64 - 1.0);
        let mbs: Vec<String> = s.bytes_per_path.iter().map(|b| format!("{:.1}", *b as f64 / 1e6)).collect();
        println!(
            "{seed:>5} {:>11.2} {:>10.2} {:>8.2} {:>28} {:>8.1}%",
            secs(&s),
            secs(&one),
            secs(&one) / secs(&s),
            mbs.join(" / "),
            100.0 * overhead[overhead.len() - 1]
        );
        striped.push(secs(&s));
        single.push(secs(&one));
        speedup.push(secs(&one) / secs(&s));
    }
    let all: u64 = shares.iter().sum();
    let share: Vec<String> = shares.iter().map(|b| format!("{:.3}", *b as f64 / all.max(1) as f64)).collect();
    let cap_share: Vec<String> = BULK_PATHS.iter().map(|p| format!("{:.3}", p.2 as f64 / capacity as f64)).collect();
    println!("bytes per path, share: {} (capacity share {})", share.join(" / "), cap_share.join(" / "));
    let goodput = |secs: f64, cap: u64| total as f64 / secs / cap as f64;
    println!(
        "{{\"seeds\":{seeds},\"mb\":{mb},\"bulk_striped_s_p50\":{:.3},\"bulk_striped_s_p99\":{:.3},\
         \"bulk_single_s_p50\":{:.3},\"bulk_speedup_p50\":{:.2},\"bulk_speedup_min\":{:.2},\
         \"striped_goodput_of_capacity_p50\":{:.3},\"single_goodput_of_capacity_p50\":{:.3},\
         \"striped_overhead_p50\":{:.3},\"intact_runs\":{intact},\"runs\":{runs}}}",
        pct(&striped, 0.5),
        pct(&striped, 0.99),
        pct(&single, 0.5),
        pct(&speedup, 0.5),
        pct(&speedup, 0.0),
        goodput(pct(&striped, 0.5), capacity),
        goodput(pct(&single, 0.5), best),
        pct(&overhead, 0.5),
    );
    if intact == runs { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// The first message may take one round trip of the relayed path plus this.
const FIRST_SLACK: Duration = Duration::from_millis(5);
/// The direct upgrade may take this many round trips of the direct path.
const UPGRADE_RTTS: f64 = 3.0;
/// Hole-punching success libp2p measured in the wild (70% ± 7%).
const LIBP2P_SUCCESS: (f64, f64) = (0.70, 0.07);
/// Share of NATs that allowed UDP hole punching in Ford, Srisuresh and Kegel's survey.
const FORD_UDP_PUNCH: f64 = 0.82;
/// Short names of [`Front::all`], in its order, for the tables.
const SHORT: [&str; 6] = ["public", "full cone", "addr-restricted", "home", "addr-dep mapping", "symmetric"];

/// What one pair of NATs measured over the seeds.
#[derive(Debug, Default)]
struct PairSummary {
    first_ms: Vec<f64>,
    first_rtts: Vec<f64>,
    upgrade_ms: Vec<f64>,
    upgrade_rtts: Vec<f64>,
    runs: u64,
    /// Runs that ended with both sides on a direct path.
    direct: u64,
    /// First message later than one relay round trip plus [`FIRST_SLACK`], or never.
    first_over: u64,
    /// Both sides direct later than [`UPGRADE_RTTS`] direct round trips after the open.
    upgrade_over: u64,
    /// The NATs allow a direct path, and the run ended relayed.
    missed: u64,
    /// Nothing got through at all.
    failed: u64,
    /// Talked, but not relay first, or not both ways at the end.
    odd: u64,
}

impl PairSummary {
    fn add(&mut self, run: &PairRun, possible: bool) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let (relay, direct) = (run.links.relay_rtt(), run.links.direct_rtt());
        self.runs += 1;
        match run.first_message {
            Some(d) => {
                self.first_ms.push(ms(d));
                self.first_rtts.push(d.as_secs_f64() / relay.as_secs_f64());
                self.first_over += u64::from(d > relay + FIRST_SLACK);
            }
            None => self.first_over += 1,
        }
        if let Some(d) = run.direct_upgrade() {
            let rtts = d.as_secs_f64() / direct.as_secs_f64();
            self.upgrade_ms.push(ms(d));
            self.upgrade_rtts.push(rtts);
            self.upgrade_over += u64::from(rtts > UPGRADE_RTTS);
        }
        self.direct += u64::from(run.ended_direct());
        self.missed += u64::from(possible && !run.ended_direct());
        self.failed += u64::from(!run.talked());
        let relay_first = run.first_path == [Some(PathKind::OneRelay); 2];
        self.odd += u64::from(run.talked() && !(relay_first && run.both_ways));
    }
}

/// Runs every (A's front, B's front, seed) on all cores; results in the order given.
fn run_pairs(jobs: &[(Front, Front, u64)]) -> Vec<PairRun> {
    let next = AtomicUsize::new(0);
    let out = Mutex::new(vec![None; jobs.len()]);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(x, y, seed)) = jobs.get(i) else { break };
                    let run = nat_pair(seed, x, y, PairLinks::random(seed));
                    if let Ok(mut o) = out.lock() {
                        o[i] = Some(run);
                    }
                }
            });
        }
    });
    out.into_inner().unwrap_or_default().into_iter().flatten().collect()
}

fn nat(seeds: u64) -> ExitCode {
    let fronts = Front::all();
    let pairs: Vec<(usize, usize)> = (0..fronts.len()).flat_map(|i| (i..fronts.len()).map(move |j| (i, j))).collect();
    let jobs: Vec<(Front, Front, u64)> =
        pairs.iter().flat_map(|&(i, j)| (0..seeds).map(move |s| (fronts[i], fronts[j], s))).collect();
    let runs = run_pairs(&jobs);
    if runs.len() != jobs.len() {
        eprintln!("{} of {} runs finished", runs.len(), jobs.len());
        return ExitCode::FAILURE;
    }
    let fmt =
        |v: &[f64], p: f64, prec: usize| if v.is_empty() { "-".to_string() } else { format!("{:.prec$}", pct(v, p)) };
    println!(
        "{:<36} {:>6} {:>7} | {:>17} {:>11} | {:>17} {:>11} | {:>6} {:>6} {:>6} {:>5}",
        "A / B",
        "allows",
        "direct",
        "first msg p50/p99",
        "relay RTTs",
        "upgrade p50/p99",
        "direct RTTs",
        "first>",
        "upgr>",
        "missed",
        "fail"
    );
    let mut all = PairSummary::default();
    let mut per_pair = Vec::new();
    for (k, &(i, j)) in pairs.iter().enumerate() {
        let possible = direct_possible(fronts[i], fronts[j]);
        let mut s = PairSummary::default();
        for run in &runs[k * seeds as usize..(k + 1) * seeds as usize] {
            s.add(run, possible);
            all.add(run, possible);
        }
        println!(
            "{:<36} {:>6} {:>6.0}% | {:>6} / {:>6} ms {:>4} / {:>4} | {:>6} / {:>6} ms {:>4} / {:>4} | {:>6} {:>6} {:>6} {:>5}",
            format!("{} / {}", SHORT[i], SHORT[j]),
            if possible { "yes" } else { "no" },
            100.0 * s.direct as f64 / s.runs.max(1) as f64,
            fmt(&s.first_ms, 0.5, 1),
            fmt(&s.first_ms, 0.99, 1),
            fmt(&s.first_rtts, 0.5, 2),
            fmt(&s.first_rtts, 0.99, 2),
            fmt(&s.upgrade_ms, 0.5, 1),
            fmt(&s.upgrade_ms, 0.99, 1),
            fmt(&s.upgrade_rtts, 0.5, 2),
            fmt(&s.upgrade_rtts, 0.99, 2),
            s.first_over,
            s.upgrade_over,
            s.missed,
            s.failed,
        );
        per_pair.push(((i, j), possible, s));
    }
    println!(
        "(first>: first message later than 1 relay RTT + {} ms; upgr>: both sides direct later than {UPGRADE_RTTS} \
         direct RTTs; missed: the NATs allow a direct path and the run ended relayed; fail: nothing got through)",
        FIRST_SLACK.as_millis()
    );

    // The success matrix, symmetric: a pair runs once, A in front of the row's NAT.
    println!("\nshare of seeds that ended on a direct path (and whether the NAT models allow one):");
    print!("{:<17}", "");
    for name in SHORT {
        print!(" {name:>16}");
    }
    println!();
    for (i, row) in SHORT.iter().enumerate() {
        print!("{row:<17}");
        for j in 0..fronts.len() {
            let key = (i.min(j), i.max(j));
            if let Some((_, possible, s)) = per_pair.iter().find(|(k, _, _)| *k == key) {
                let share = 100.0 * s.direct as f64 / s.runs.max(1) as f64;
                print!(" {:>16}", format!("{share:.0}% ({})", if *possible { "yes" } else { "no" }));
            }
        }
        println!();
    }
    let direct_pairs = per_pair.iter().filter(|(_, _, s)| s.runs > 0 && s.direct == s.runs).count();
    let possible_pairs = per_pair.iter().filter(|(_, p, _)| *p).count();
    let failed_pairs = per_pair.iter().filter(|(_, _, s)| s.failed > 0).count();
    let n = pairs.len();
    let share = direct_pairs as f64 / n.max(1) as f64;
    println!(
        "\nNAT pairs direct in every seed: {direct_pairs} of {n} ({:.0}%); the models allow {possible_pairs} of {n} \
         ({:.0}%). For reference (populations of real NATs, not pairs of models): libp2p's hole punching in the \
         wild {:.0}% ± {:.0}%; Ford et al., {:.0}% of NATs allow UDP hole punching.",
        100.0 * share,
        100.0 * possible_pairs as f64 / n.max(1) as f64,
        100.0 * LIBP2P_SUCCESS.0,
        100.0 * LIBP2P_SUCCESS.1,
        100.0 * FORD_UDP_PUNCH
    );
    let upgrades = all.upgrade_ms.len();
    println!(
        "all {} runs: first message p50 {} / p99 {} ms, {} / {} relay RTTs ({} over target); direct upgrade in {upgrades} \
         runs: p50 {} / p99 {} ms, {} / {} direct RTTs ({} over target); {} runs relayed where the NATs allow direct; \
         {} runs with no traffic; {} runs not relay-first or not both ways",
        all.runs,
        fmt(&all.first_ms, 0.5, 1),
        fmt(&all.first_ms, 0.99, 1),
        fmt(&all.first_rtts, 0.5, 2),
        fmt(&all.first_rtts, 0.99, 2),
        all.first_over,
        fmt(&all.upgrade_ms, 0.5, 1),
        fmt(&all.upgrade_ms, 0.99, 1),
        fmt(&all.upgrade_rtts, 0.5, 2),
        fmt(&all.upgrade_rtts, 0.99, 2),
        all.upgrade_over,
        all.missed,
        all.failed,
        all.odd,
    );
    let num = |v: &[f64], p: f64| if v.is_empty() { "null".to_string() } else { format!("{:.3}", pct(v, p)) };
    println!(
        "{{\"seeds\":{seeds},\"pairs\":{n},\"runs\":{},\"first_message_rtts_p50\":{},\"first_message_rtts_p99\":{},\
         \"first_message_ms_p50\":{},\"first_message_ms_p99\":{},\"direct_upgrade_rtts_p50\":{},\
         \"direct_upgrade_rtts_p99\":{},\"direct_upgrade_ms_p50\":{},\"direct_upgrade_ms_p99\":{},\
         \"direct_upgrade_runs\":{upgrades},\"direct_pairs\":{direct_pairs},\"possible_direct_pairs\":{possible_pairs},\
         \"direct_pair_share\":{share:.3},\"failed_pairs\":{failed_pairs},\"failed_runs\":{},\
         \"first_message_over_target_runs\":{},\"direct_upgrade_over_target_runs\":{},\
         \"possible_not_direct_runs\":{},\"libp2p_wild_success\":{:.2},\"libp2p_wild_success_pm\":{:.2},\
         \"ford_nats_allowing_udp_punch\":{:.2}}}",
        all.runs,
        num(&all.first_rtts, 0.5),
        num(&all.first_rtts, 0.99),
        num(&all.first_ms, 0.5),
        num(&all.first_ms, 0.99),
        num(&all.upgrade_rtts, 0.5),
        num(&all.upgrade_rtts, 0.99),
        num(&all.upgrade_ms, 0.5),
        num(&all.upgrade_ms, 0.99),
        all.failed,
        all.first_over,
        all.upgrade_over,
        all.missed,
        LIBP2P_SUCCESS.0,
        LIBP2P_SUCCESS.1,
        FORD_UDP_PUNCH,
    );
    if all.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn sessions(populations: &[usize], secs: u64, seed: u64) -> ExitCode {
    println!(
        "{:>8} {:>7} {:>9} {:>14} {:>9} {:>13} {:>10} {:>12} {:>12} {:>12}",
        "players",
        "relays",
        "build ms",
        "wall ms/sim s",
        "signed in",
        "introductions",
        "farewells",
        "msgs sent",
        "delivered",
        "datagrams"
    );
    let mut runs = Vec::new();
    let mut ok = true;
    for &n in populations {
        let started = std::time::Instant::now();
        let mut world = match World::new(seed, WorldSpec::new(n)) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("building the world: {e}");
                return ExitCode::FAILURE;
            }
        };
        let built = started.elapsed();
        let started = std::time::Instant::now();
        world.run_for(Duration::from_secs(secs));
        let wall = started.elapsed();
        let per_sim_s = wall.as_secs_f64() * 1e3 / secs as f64;
        let k = world.stats();
        let net = world.sim.net_stats();
        ok &= k.signed_in == n as u64 && k.corrupt == 0;
        println!(
            "{n:>8} {:>7} {:>9.0} {per_sim_s:>14.1} {:>9} {:>13} {:>10} {:>12} {:>12} {:>12}",
            world.spec().relays,
            built.as_secs_f64() * 1e3,
            k.signed_in,
            k.introductions,
            k.farewells,
            k.messages_sent,
            k.messages_delivered,
            net.delivered,
        );
        runs.push(format!(
            "{{\"players\":{n},\"relays\":{},\"wall_ms_per_sim_s\":{per_sim_s:.1},\"build_ms\":{:.0},\
             \"signed_in\":{},\"introductions\":{},\"farewells\":{},\"vcs_opened\":{},\"vcs_closed\":{},\
             \"messages_sent\":{},\"messages_delivered\":{},\"datagrams_delivered\":{},\"control_lost\":{}}}",
            world.spec().relays,
            built.as_secs_f64() * 1e3,
            k.signed_in,
            k.introductions,
            k.farewells,
            k.vcs_opened,
            k.vcs_closed,
            k.messages_sent,
            k.messages_delivered,
            net.delivered,
            k.control_lost,
        ));
    }
    println!("{{\"seed\":{seed},\"sim_secs\":{secs},\"runs\":[{}]}}", runs.join(","));
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn loopback(rounds: usize, secs: f64) -> ExitCode {
    let profile = Profile::reliable();
    let (warmup, window) = (Duration::from_secs(1), Duration::from_secs_f64(secs));
    let mut json = Vec::new();
    println!(
        "{:<6} {:<10} {:<12} {:>12} {:>9} {:>12} {:>14} {:>12} {:>13}",
        "size",
        "load",
        "contender",
        "messages/s",
        "MB/s",
        "CPU/message",
        "overhead B/msg",
        "return B/msg",
        "dgrams/100msg"
    );
    // The saturating load measures throughput; a fixed load both sustain measures what a
    // message costs.
    for (size, rate) in [(100usize, 200_000.0), (1000, 50_000.0)] {
        for (load, offer) in [("max", Offer::Saturate), ("fixed", Offer::Rate(rate))] {
            let mut runs: [Vec<throughput::Run>; 2] = [Vec::new(), Vec::new()];
            for _ in 0..rounds {
                for (i, who) in [Contender::PlainRenet, Contender::Shoal].into_iter().enumerate() {
                    match throughput::run(who, &profile, size, offer, warmup, window) {
                        Ok(r) => runs[i].push(r),
                        Err(e) => {
                            eprintln!("loopback run failed: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                }
            }
            let med = |v: &[throughput::Run], f: fn(&throughput::Run) -> f64| {
                let x: Vec<f64> = v.iter().map(f).collect();
                pct(&x, 0.5)
            };
            let mut figures = Vec::new();
            for (i, name) in ["renet/UDP", "shoal VC"].into_iter().enumerate() {
                let r = &runs[i];
                let f = (
                    med(r, |r| r.messages_per_s),
                    med(r, |r| r.payload_bytes_per_s / 1e6),
                    med(r, |r| r.cpu_per_message.as_secs_f64() * 1e6),
                    med(r, |r| r.overhead_per_message),
                    med(r, |r| r.return_bytes_per_message),
                    med(r, |r| r.datagrams_per_100),
                    med(r, |r| r.return_datagrams_per_100),
                );
                println!(
                    "{size:<6} {load:<10} {name:<12} {:>12.0} {:>9.2} {:>10.2}us {:>14.1} {:>12.1} {:>6.1} / {:<5.1}",
                    f.0, f.1, f.2, f.3, f.4, f.5, f.6
                );
                figures.push(f);
            }
            // The ratio within each round's pair, so that drift between rounds cancels.
            let ratio = |f: fn(&throughput::Run) -> f64| {
                let v: Vec<f64> = runs[1].iter().zip(&runs[0]).map(|(s, r)| f(s) / f(r).max(1e-12)).collect();
                (pct(&v, 0.5), pct(&v, 0.0), pct(&v, 1.0))
            };
            let (r, s) = (figures[0], figures[1]);
            if offer == Offer::Saturate {
                let (tput, lo, hi) = ratio(|r| r.messages_per_s);
                println!("{size:<6} {load:<10} shoal/renet  throughput {tput:.2}x (rounds {lo:.2}-{hi:.2})");
                json.push(format!(
                    "\"renet_msgs_per_s_{size}\":{:.0},\"shoal_msgs_per_s_{size}\":{:.0},\"renet_mb_per_s_{size}\":{:.2},\
                     \"shoal_mb_per_s_{size}\":{:.2},\"throughput_ratio_{size}\":{tput:.3},\"throughput_ratio_min_{size}\":{lo:.3},\
                     \"renet_overhead_bytes_{size}\":{:.1},\"shoal_overhead_bytes_{size}\":{:.1}",
                    r.0, s.0, r.1, s.1, r.3, s.3
                ));
            } else {
                let (cpu, lo, hi) = ratio(|r| r.cpu_per_message.as_secs_f64());
                println!("{size:<6} {load:<10} shoal/renet  CPU per message {cpu:.2}x (rounds {lo:.2}-{hi:.2})");
                json.push(format!(
                    "\"fixed_rate_{size}\":{rate},\"renet_cpu_us_per_msg_{size}\":{:.3},\
                     \"shoal_cpu_us_per_msg_{size}\":{:.3},\"cpu_ratio_{size}\":{cpu:.3}",
                    r.2, s.2
                ));
            }
        }
    }
    println!("{{\"rounds\":{rounds},\"secs\":{secs},{}}}", json.join(","));
    ExitCode::SUCCESS
}

fn nat_real(runs: usize) -> ExitCode {
    if let Some(why) = netns::unavailable() {
        eprintln!("nat-real cannot run here: {why}");
        return ExitCode::FAILURE;
    }
    let bins = match netns::Binaries::build() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("building the binaries: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    let mut json = Vec::new();
    for (a, b) in [(NatMode::Cone, NatMode::Cone), (NatMode::Cone, NatMode::Symmetric)] {
        let (mut first, mut first_rtts, mut upgrade, mut upgrade_rtts, mut relay, mut direct) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut direct_runs, mut relayed_first) = (0, 0);
        for _ in 0..runs {
            let run = match netns::measure_with(&bins, a, b) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("{a}/{b}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            println!("{}", run.summary());
            first.extend(ms(run.first_message()));
            first_rtts.extend(run.first_message().and_then(|d| run.in_relay_rtts(d)));
            upgrade.extend(ms(run.direct_upgrade()));
            upgrade_rtts.extend(run.direct_upgrade().and_then(|d| run.in_relay_rtts(d)));
            relay.extend(ms(run.relay_rtt()));
            direct.extend(ms(run.direct_rtt()));
            direct_runs += usize::from(run.peers.iter().all(|p| p.final_kind == Some(PathKind::Direct)));
            relayed_first += usize::from(run.first_message_relayed());
        }
        let med = |v: &[f64]| pct(v, 0.5);
        println!(
            "{a}/{b}: {direct_runs} of {runs} runs direct, first message over the relay in {relayed_first}; \
             medians: first message {:.2} ms ({:.2} relay RTTs), direct upgrade {:.2} ms ({:.2} relay RTTs), \
             relay RTT {:.3} ms, direct RTT {:.3} ms",
            med(&first),
            med(&first_rtts),
            med(&upgrade),
            med(&upgrade_rtts),
            med(&relay),
            med(&direct)
        );
        let key = format!("{a}_{b}").replace('-', "_");
        let num = |x: f64| if x.is_finite() { format!("{x:.3}") } else { "null".into() };
        json.push(format!(
            "\"{key}_runs\":{runs},\"{key}_direct_runs\":{direct_runs},\"{key}_first_message_ms_p50\":{},\
             \"{key}_first_message_rtts_p50\":{},\"{key}_direct_upgrade_ms_p50\":{},\
             \"{key}_direct_upgrade_rtts_p50\":{},\"{key}_relay_rtt_ms\":{},\"{key}_direct_rtt_ms\":{}",
            num(med(&first)),
            num(med(&first_rtts)),
            num(med(&upgrade)),
            num(med(&upgrade_rtts)),
            num(med(&relay)),
            num(med(&direct)),
        ));
    }
    println!("{{{}}}", json.join(","));
    ExitCode::SUCCESS
}
