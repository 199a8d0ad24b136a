//! `shoal-relay-bench`: what a relay costs, on loopback, at a paced load.
//!
//! A paced sender pushes datagrams through one relay worker to a sink, with permits checked
//! and tracing on, and the same load through a plain batched (recvmmsg/sendmmsg) forwarder as
//! the physical baseline. Per path it reports the forwarding thread's CPU time per datagram
//! (from `/proc/self/task/<tid>/schedstat`, so only that thread's own time counts), one-way
//! latency sender → forwarder → sink (p50/p99, from a timestamp in each payload), and loss.
//! A direct sender → sink run gives the latency of the path without the hop; the latency a
//! hop adds (`p50_hop_us`, `p99_hop_us`) is the relay path's percentile minus the direct
//! path's, from the same run.
//!
//! Ends with one JSON line: `{"relay_ns_per_dgram":…, "raw_ns_per_dgram":…, "ratio":…,
//! "p99_hop_us":…, "loss":…, …}`, the worst case over payload sizes.
//!
//! With `--fanout 10,100` it measures fan-out instead: publishers (`--publishers`, default one)
//! bound to the relay and N subscribers, each on its own socket with a subscription to every
//! publisher's group that the control key signed; the publishers send `rate / N` datagrams a
//! second between them, so the relay sends `rate` copies, and the worker's CPU time per copy is
//! set against the raw forwarder's per datagram at `rate` in the same run (see `fanout.rs`).
//! Ends with `{"fanout_copy_ratio_10":…, "fanout_copy_ratio_100":…, …}`.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use shoal_mesh::clock::WallClock;
use shoal_mesh::driver::batch::{Batch, bind_reuseport};
use shoal_mesh::driver::relay::{Relay, RelayOptions};
use shoal_mesh::endpoint::{Endpoint, EndpointEvent, Envelope, Path};
use shoal_mesh::router::{Rate, RouterConfig};
use shoal_mesh::wire::{HEADER_LEN, ROUTE_ENTRY_LEN, Route, VcId};
use shoal_protocol::{Identity, Roles, SignedTicket, TicketBody, TicketKind, UnixTime};

mod fanout;

#[derive(Parser, Debug)]
#[command(name = "shoal-relay-bench", about = "Relay CPU and latency per datagram against a raw batched forwarder")]
struct Args {
    /// Datagrams per second offered.
    #[arg(long, default_value_t = 300_000)]
    rate: u64,
    /// Seconds of load per run.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Payload sizes in bytes.
    #[arg(long, value_delimiter = ',', default_values_t = [100usize, 1200])]
    sizes: Vec<usize>,
    /// Runs per path and size; the median run (by CPU per datagram) is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Instead: fan-out groups of these sizes, publishers copied to N subscribers, against
    /// the raw forwarder at the same number of datagrams sent a second.
    #[arg(long, value_delimiter = ',')]
    fanout: Vec<usize>,
    /// With `--fanout`: publishers sharing the publishes, each subscribed by every subscriber.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// With `--fanout`: the relay's bundling window in milliseconds (0: each copy on its own).
    #[arg(long, default_value_t = 10)]
    bundle_window_ms: u64,
}

/// Sequence number (8) and send time in ns since the run's start (8) lead every payload.
const STAMP_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    Direct,
    Raw,
    Relay,
}

#[derive(Debug, Clone)]
struct RunResult {
    sent: u64,
    received: u64,
    duplicates: u64,
    cpu_ns_per_dgram: f64,
    p50_us: f64,
    p99_us: f64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn permit(control: &Identity, node: &Identity, roles: Roles) -> SignedTicket {
    TicketBody::new(TicketKind::RelayPermit, node.public_key(), roles, UnixTime(unix_now()), 3600).sign(control)
}

/// CPU time a thread of this process has used, in ns (first field of its schedstat).
fn thread_cpu_ns(tid: i32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))?;
    Ok(text.split_whitespace().next().context("empty schedstat")?.parse()?)
}

fn udp(addr: &str) -> anyhow::Result<UdpSocket> {
    let s = bind_reuseport(addr.parse()?, 1, 16 << 20)?.remove(0);
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(s)
}

/// Runs the bind handshake of `ep` over a blocking socket until `relay` accepts it.
fn bind_blocking(sock: &UdpSocket, ep: &mut Endpoint, relay: SocketAddr) -> anyhow::Result<()> {
    ep.add_relay(Instant::now(), relay);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        ep.handle_timeout(Instant::now());
        while let Some(t) = ep.poll_transmit() {
            sock.send_to(&t.bytes, t.to)?;
        }
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            ep.handle_datagram(Instant::now(), from, &buf[..n]);
        }
        while let Some(t) = ep.poll_transmit() {
            sock.send_to(&t.bytes, t.to)?;
        }
        while let Some(e) = ep.poll_event() {
            if matches!(e, EndpointEvent::RelayBound { .. }) {
                return Ok(());
            }
        }
    }
    bail!("relay {relay} did not accept the bind")
}

/// Receives until `stop` and a quiet period; returns (received, duplicates, latencies in ns).
fn sink(sock: UdpSocket, stamp_at: usize, expect: u64, start: Instant, stop: Arc<AtomicBool>) -> (u64, u64, Vec<u32>) {
    let fd = sock.as_raw_fd();
    let mut b = Batch::new();
    let mut seen = vec![false; expect as usize + 1];
    let mut lat = Vec::with_capacity(expect as usize);
    let (mut received, mut dups) = (0u64, 0u64);
    loop {
        match b.recv_wait(fd) {
            Ok(n) => {
                let now = start.elapsed().as_nanos() as u64;
                for i in 0..n {
                    let (_, bytes) = b.received(i);
                    if bytes.len() < stamp_at + STAMP_LEN {
                        continue;
                    }
                    let mut x = [0u8; 8];
                    x.copy_from_slice(&bytes[stamp_at..stamp_at + 8]);
                    let seq = u64::from_le_bytes(x) as usize;
                    x.copy_from_slice(&bytes[stamp_at + 8..stamp_at + 16]);
                    let sent = u64::from_le_bytes(x);
                    match seen.get_mut(seq) {
                        Some(s) if !*s => {
                            *s = true;
                            received += 1;
                            lat.push(now.saturating_sub(sent).min(u64::from(u32::MAX)) as u32);
                        }
                        _ => dups += 1,
                    }
                }
                if received >= expect {
                    break;
                }
            }
            Err(_) if stop.load(Ordering::Relaxed) => break,
            Err(_) => {}
        }
    }
    (received, dups, lat)
}

/// A plain batched forwarder: everything received goes on to `to`, nothing checked.
fn raw_forwarder(sock: UdpSocket, to: SocketAddr, stop: Arc<AtomicBool>, tid_out: std::sync::mpsc::Sender<i32>) {
    // SAFETY: gettid has no preconditions.
    let _ = tid_out.send(unsafe { libc::gettid() });
    let fd = sock.as_raw_fd();
    let mut b = Batch::new();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(n) = b.recv_wait(fd) {
            for i in 0..n {
                let (_, bytes) = b.received(i);
                let len = bytes.len();
                let _ = b.queue(i, len, to);
            }
            let _ = b.send(fd);
        }
    }
}

/// What the sender sends: `template` is a whole datagram whose payload stamp sits at
/// `stamp_at`, and whose trace origin (if any) at `origin_at`.
struct Load {
    to: SocketAddr,
    template: Vec<u8>,
    stamp_at: usize,
    origin_at: Option<usize>,
}

/// Sends `count` datagrams paced at `rate` from `start`, a chunk from each sender in turn.
fn send_paced(senders: &[(&UdpSocket, &Load)], rate: u64, count: u64, start: Instant) -> u64 {
    let mut b = Batch::new();
    let clock = WallClock::system();
    // Wake from sleeps on time rather than up to the default 50 µs late.
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches only this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
    let per = Duration::from_secs_f64(1.0 / rate as f64);
    // Small batches keep the pacing smooth: 16 datagrams are 53 µs at 300k/s.
    let chunk = 16u64;
    let mut seq = 0u64;
    let mut turn = 0;
    while seq < count {
        let due = start + per * seq as u32;
        loop {
            let now = Instant::now();
            if now >= due {
                break;
            }
            // Sleep rather than spin: on two CPUs a spinning sender takes one from the
            // forwarder and the sink.
            if due - now > Duration::from_micros(10) {
                std::thread::sleep(due - now);
            } else {
                std::hint::spin_loop();
            }
        }
        let (sock, load) = senders[turn % senders.len()];
        turn += 1;
        let Load { to, ref template, stamp_at, origin_at } = *load;
        let n = chunk.min(count - seq);
        let now = Instant::now();
        let sent_ns = now.duration_since(start).as_nanos() as u64;
        for k in 0..n as usize {
            b.fill(k, template);
            let buf = b.buffer(k);
            buf[stamp_at..stamp_at + 8].copy_from_slice(&(seq + k as u64).to_le_bytes());
            buf[stamp_at + 8..stamp_at + 16].copy_from_slice(&sent_ns.to_le_bytes());
            if let Some(at) = origin_at {
                buf[at..at + 4].copy_from_slice(&clock.stamp_us(now).to_be_bytes());
            }
            let _ = b.queue(k, template.len(), to);
        }
        let _ = b.send_wait(sock.as_raw_fd());
        seq += n;
    }
    seq
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

fn run(hop: Hop, size: usize, args: &Args) -> anyhow::Result<RunResult> {
    let count = (args.rate as f64 * args.secs) as u64;
    let control = Identity::generate()?;
    let sink_sock = udp("127.0.0.1:0")?;
    let sink_addr = sink_sock.local_addr()?;
    let send_sock = udp("127.0.0.1:0")?;
    let stop = Arc::new(AtomicBool::new(false));
    let payload = vec![0x5au8; size.max(STAMP_LEN)];

    // Per path: where the sender aims, the datagram it sends, and the thread whose CPU counts.
    let mut relay = None;
    let mut fwd_thread = None;
    let (to, template, stamp_at, origin_at, tid) = match hop {
        Hop::Direct => (sink_addr, payload.clone(), 0, None, None),
        Hop::Raw => {
            let fwd = udp("127.0.0.1:0")?;
            let fwd_addr = fwd.local_addr()?;
            let (tx, rx) = std::sync::mpsc::channel();
            let stop2 = stop.clone();
            fwd_thread = Some(std::thread::spawn(move || raw_forwarder(fwd, sink_addr, stop2, tx)));
            (fwd_addr, payload.clone(), 0, None, Some(rx.recv()?))
        }
        Hop::Relay => {
            let r = spawn_relay(&control, Duration::ZERO)?;
            let (a, b) = (Identity::generate()?, Identity::generate()?);
            let mut ea = Endpoint::new(a.clone(), permit(&control, &a, Roles::CLIENT), WallClock::system());
            let mut eb = Endpoint::new(b.clone(), permit(&control, &b, Roles::CLIENT), WallClock::system());
            bind_blocking(&send_sock, &mut ea, r.local_addr())?;
            bind_blocking(&sink_sock, &mut eb, r.local_addr())?;
            let env = Envelope {
                destination: b.node_id(),
                path: Path::Relayed(Route::new(&[r.node_id()]).context("route")?),
                vc: VcId(1),
                trace: true,
            };
            let mut buf = vec![0u8; 2048];
            let (to, len) = ea.encode_data(Instant::now(), &env, &payload, &mut buf)?;
            buf.truncate(len);
            let stamp_at = len - payload.len();
            let origin_at = HEADER_LEN + ROUTE_ENTRY_LEN;
            // Wait until the workers published their thread ids.
            let mut tids = r.stats().worker_tids();
            for _ in 0..100 {
                if !tids.is_empty() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
                tids = r.stats().worker_tids();
            }
            let tid = *tids.first().context("relay worker never started")?;
            relay = Some(r);
            (to, buf, stamp_at, Some(origin_at), Some(tid))
        }
    };

    let start = Instant::now() + Duration::from_millis(50);
    let stop_sink = stop.clone();
    let sink_thread = std::thread::spawn(move || sink(sink_sock, stamp_at, count, start, stop_sink));
    let cpu0 = tid.map(thread_cpu_ns).transpose()?;
    let load = Load { to, template, stamp_at, origin_at };
    let sent = send_paced(&[(&send_sock, &load)], args.rate, count, start);
    // Let the tail drain, then stop.
    std::thread::sleep(Duration::from_millis(300));
    let cpu1 = tid.map(thread_cpu_ns).transpose()?;
    stop.store(true, Ordering::Relaxed);
    let (received, duplicates, mut lat) = sink_thread.join().map_err(|_| anyhow::anyhow!("sink panicked"))?;
    if let Some(t) = fwd_thread {
        let _ = t.join();
    }
    if let Some(r) = relay {
        let c = r.stats().counters();
        if received > 0 && c.forwarded_packets == 0 {
            bail!("the relay counted nothing forwarded");
        }
        r.shutdown();
    }
    lat.sort_unstable();
    let cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) if received > 0 => (b - a) as f64 / received as f64,
        _ => 0.0,
    };
    Ok(RunResult {
        sent,
        received,
        duplicates,
        cpu_ns_per_dgram: cpu,
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
    })
}

/// One relay worker on loopback that trusts `control`, with no rate limits in the way.
fn spawn_relay(control: &Identity, bundle_window: Duration) -> anyhow::Result<Relay> {
    let me = Identity::generate()?;
    let unlimited = Rate { per_sec: 1e12, burst: 1e12 };
    let cfg = RouterConfig {
        permit: Some(permit(control, &me, Roles::RELAY)),
        identity: me,
        control_key: control.public_key(),
        source_packets: unlimited,
        source_bytes: unlimited,
        bind_verifications: unlimited,
        notices: Rate { per_sec: 1000.0, burst: 100.0 },
        max_bindings: 4096,
        cookie_secret: [7; 32],
        fanout: shoal_mesh::fanout::FanoutConfig { bundle_window, ..Default::default() },
    };
    Ok(Relay::spawn(bind_reuseport("127.0.0.1:0".parse()?, 1, 16 << 20)?, RelayOptions { router: cfg, peers: vec![] })?)
}

fn median_run(hop: Hop, size: usize, args: &Args) -> anyhow::Result<RunResult> {
    let mut runs = Vec::with_capacity(args.runs);
    for _ in 0..args.runs.max(1) {
        runs.push(run(hop, size, args)?);
    }
    runs.sort_by(|a, b| a.cpu_ns_per_dgram.total_cmp(&b.cpu_ns_per_dgram).then(a.p99_us.total_cmp(&b.p99_us)));
    Ok(runs[runs.len() / 2].clone())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.fanout.is_empty() {
        return fanout::fanout_main(&args);
    }
    println!(
        "shoal-relay-bench: {} datagrams/s for {} s, sizes {:?}, median of {} runs",
        args.rate, args.secs, args.sizes, args.runs
    );
    println!("| size B | path | sent | loss | CPU ns/dgram | p50 µs | p99 µs |");
    println!("|---|---|---|---|---|---|---|");
    let mut worst = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let mut details = Vec::new();
    for &size in &args.sizes {
        let direct = median_run(Hop::Direct, size, &args)?;
        let raw = median_run(Hop::Raw, size, &args)?;
        let relay = median_run(Hop::Relay, size, &args)?;
        for (name, r) in [("direct", &direct), ("raw mmsg forwarder", &raw), ("shoal relay", &relay)] {
            let loss = 1.0 - r.received as f64 / r.sent.max(1) as f64;
            println!(
                "| {size} | {name} | {} | {:.4}% | {:.0} | {:.1} | {:.1} |",
                r.sent,
                loss * 100.0,
                r.cpu_ns_per_dgram,
                r.p50_us,
                r.p99_us
            );
            if r.duplicates > 0 {
                println!("  ({} duplicates)", r.duplicates);
            }
        }
        let ratio = relay.cpu_ns_per_dgram / raw.cpu_ns_per_dgram;
        let loss = 1.0 - relay.received as f64 / relay.sent.max(1) as f64;
        // What the hop adds: sender -> relay -> sink against sender -> sink in the same run.
        let (hop_p50, hop_p99) = ((relay.p50_us - direct.p50_us).max(0.0), (relay.p99_us - direct.p99_us).max(0.0));
        println!(
            "  {size} B: the relay hop adds p50 {hop_p50:.1} µs, p99 {hop_p99:.1} µs; CPU {ratio:.3}x the raw forwarder"
        );
        details.push(format!(
            "{{\"size\":{size},\"relay_ns_per_dgram\":{:.0},\"raw_ns_per_dgram\":{:.0},\"ratio\":{ratio:.3},\"p50_hop_us\":{hop_p50:.1},\"p99_hop_us\":{hop_p99:.1},\"relay_p50_us\":{:.1},\"relay_p99_us\":{:.1},\"raw_p99_us\":{:.1},\"direct_p50_us\":{:.1},\"direct_p99_us\":{:.1},\"loss\":{loss:.6}}}",
            relay.cpu_ns_per_dgram, raw.cpu_ns_per_dgram, relay.p50_us, relay.p99_us, raw.p99_us, direct.p50_us, direct.p99_us
        ));
        if ratio > worst.2 {
            worst = (relay.cpu_ns_per_dgram, raw.cpu_ns_per_dgram, ratio, worst.3, worst.4);
        }
        worst.3 = worst.3.max(hop_p99);
        worst.4 = worst.4.max(loss);
    }
    println!(
        "{{\"relay_ns_per_dgram\":{:.0},\"raw_ns_per_dgram\":{:.0},\"ratio\":{:.3},\"p99_hop_us\":{:.1},\"loss\":{:.6},\"rate\":{},\"sizes\":[{}]}}",
        worst.0,
        worst.1,
        worst.2,
        worst.3,
        worst.4,
        args.rate,
        details.join(",")
    );
    Ok(())
}
