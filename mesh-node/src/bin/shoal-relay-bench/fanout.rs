//! `--fanout`: one relay worker copies publishes to groups of N subscribers, against the raw
//! forwarder at the same datagrams a second.
//!
//! The publishes come from `--publishers` publishers (each bound to the relay on its own
//! socket), and every subscriber holds a subscription to each of their groups, so the copies
//! one subscriber receives a second are `rate / N`, whoever publishes them: a watcher in a
//! crowd takes a few hundred streams at 5 Hz, about 1,000 to 1,300 copies a second. Copies
//! for one subscriber within `--bundle-window-ms` share a datagram, as a relay sends them by
//! default; the bench reports the copies per datagram that came of it.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use shoal_mesh::clock::WallClock;
use shoal_mesh::driver::batch::Batch;
use shoal_mesh::endpoint::{Endpoint, EndpointEvent};
use shoal_mesh::wire::{self, Datagram, HEADER_LEN, Kind, ROUTE_ENTRY_LEN, SubscribeStatus};
use shoal_protocol::{Identity, Roles, SignedSubscription, StreamId, SubscriptionBody, UnixTime};

use crate::{
    Args, Hop, Load, RunResult, STAMP_LEN, bind_blocking, median_run, permit, send_paced, spawn_relay, thread_cpu_ns,
    udp, unix_now,
};

/// Presents `sub` over a blocking socket until the relay answers.
fn subscribe_blocking(sock: &UdpSocket, ep: &mut Endpoint, sub: &SignedSubscription) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        ep.subscribe(Instant::now(), sub, false)?;
        while let Some(t) = ep.poll_transmit() {
            sock.send_to(&t.bytes, t.to)?;
        }
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            ep.handle_datagram(Instant::now(), from, &buf[..n]);
        }
        while let Some(e) = ep.poll_event() {
            if let EndpointEvent::Subscription { ack, .. } = e {
                if ack.status == SubscribeStatus::Member {
                    return Ok(());
                }
                bail!("subscription refused: {:?}", ack.status);
            }
        }
    }
    bail!("the relay never answered a subscription")
}

/// Receives on every subscriber socket until `stop` and a quiet period; returns the copies
/// (each copy inside a bundle counted) and the datagrams.
fn fanout_sink(socks: Vec<UdpSocket>, stop: Arc<AtomicBool>) -> (u64, u64) {
    let mut b = Batch::new();
    let (mut copies, mut datagrams) = (0u64, 0u64);
    let mut quiet_since: Option<Instant> = None;
    loop {
        let mut got = 0;
        for s in &socks {
            if let Ok(n) = b.recv(s.as_raw_fd()) {
                got += n;
                for i in 0..n {
                    copies += match Datagram::parse(b.received(i).1) {
                        Ok(d) if d.kind() == Kind::Bundle => wire::bundled(d.body()).count() as u64,
                        _ => 1,
                    };
                }
            }
        }
        datagrams += got as u64;
        if got > 0 {
            quiet_since = None;
            continue;
        }
        if stop.load(Ordering::Relaxed) {
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_millis(100) {
                return (copies, datagrams);
            }
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// What one fan-out run measured.
#[derive(Debug, Clone)]
struct FanoutResult {
    run: RunResult,
    /// Copies per datagram the subscribers received.
    per_datagram: f64,
}

/// `args.publishers` publishers, each fanned out to the same `n` subscribers: the relay
/// worker's CPU time per copy.
fn fanout_run(n: usize, size: usize, args: &Args) -> anyhow::Result<FanoutResult> {
    let publishes = (args.rate as f64 * args.secs / n as f64) as u64;
    let control = Identity::generate()?;
    let window = Duration::from_millis(args.bundle_window_ms);
    let r = spawn_relay(&control, window)?;
    let payload = vec![0x5au8; size.max(STAMP_LEN)];
    let mut publishers = Vec::with_capacity(args.publishers);
    for _ in 0..args.publishers.max(1) {
        let sock = udp("127.0.0.1:0")?;
        let p = Identity::generate()?;
        let mut ep = Endpoint::new(p.clone(), permit(&control, &p, Roles::CLIENT), WallClock::system());
        bind_blocking(&sock, &mut ep, r.local_addr())?;
        ep.publish(Instant::now(), r.node_id(), 1, true, &payload)?;
        let template = ep.poll_transmit().context("no publish")?.bytes;
        let stamp_at = template.len() - payload.len();
        let load = Load { to: r.local_addr(), template, stamp_at, origin_at: Some(HEADER_LEN + ROUTE_ENTRY_LEN) };
        publishers.push((sock, p.node_id(), load));
    }
    let mut socks = Vec::with_capacity(n);
    for _ in 0..n {
        let sock = udp("127.0.0.1:0")?;
        let id = Identity::generate()?;
        let mut e = Endpoint::new(id.clone(), permit(&control, &id, Roles::CLIENT), WallClock::system());
        bind_blocking(&sock, &mut e, r.local_addr())?;
        for (_, publisher, _) in &publishers {
            let sub = SubscriptionBody {
                subscriber: id.node_id(),
                publisher: *publisher,
                stream: StreamId(1),
                relay: r.node_id(),
                issued_at: UnixTime(unix_now()),
                expires_at: UnixTime(unix_now() + 3600),
            }
            .sign(&control);
            subscribe_blocking(&sock, &mut e, &sub)?;
        }
        sock.set_nonblocking(true)?;
        socks.push(sock);
    }
    let tid = *r.stats().worker_tids().first().context("relay worker never started")?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop_sink = stop.clone();
    let sink_thread = std::thread::spawn(move || fanout_sink(socks, stop_sink));
    let start = Instant::now() + Duration::from_millis(50);
    let cpu0 = thread_cpu_ns(tid)?;
    let copies0 = r.stats().counters().copies;
    let senders: Vec<(&UdpSocket, &Load)> = publishers.iter().map(|(s, _, l)| (s, l)).collect();
    let sent = send_paced(&senders, args.rate / n as u64, publishes, start);
    std::thread::sleep(Duration::from_millis(300));
    let cpu1 = thread_cpu_ns(tid)?;
    stop.store(true, Ordering::Relaxed);
    let (received, datagrams) = sink_thread.join().map_err(|_| anyhow::anyhow!("sink panicked"))?;
    // The workers publish their counters every 100 ms.
    std::thread::sleep(Duration::from_millis(150));
    let copies = r.stats().counters().copies - copies0;
    r.shutdown();
    if copies == 0 {
        bail!("the relay sent no copies");
    }
    Ok(FanoutResult {
        run: RunResult {
            sent: sent * n as u64,
            received,
            duplicates: 0,
            cpu_ns_per_dgram: (cpu1 - cpu0) as f64 / copies as f64,
            p50_us: f64::NAN,
            p99_us: f64::NAN,
        },
        per_datagram: received as f64 / datagrams.max(1) as f64,
    })
}

/// `--fanout`: each group size against the raw forwarder at the same datagrams a second.
pub(crate) fn fanout_main(args: &Args) -> anyhow::Result<()> {
    println!(
        "shoal-relay-bench --fanout: {} copies/s for {} s, sizes {:?}, {} publisher(s), bundle window {} ms, median of {} runs",
        args.rate, args.secs, args.sizes, args.publishers, args.bundle_window_ms, args.runs
    );
    println!("| size B | path | copies out | loss | copies per datagram | CPU ns per copy |");
    println!("|---|---|---|---|---|---|");
    let mut json = Vec::new();
    for &size in &args.sizes {
        let raw = median_run(Hop::Raw, size, args)?;
        let loss = |r: &RunResult| 1.0 - r.received as f64 / r.sent.max(1) as f64;
        println!(
            "| {size} | raw mmsg forwarder | {} | {:.4}% | 1 | {:.0} |",
            raw.sent,
            loss(&raw) * 100.0,
            raw.cpu_ns_per_dgram
        );
        for &n in &args.fanout {
            let mut runs = Vec::new();
            for _ in 0..args.runs.max(1) {
                runs.push(fanout_run(n, size, args)?);
            }
            runs.sort_by(|a, b| a.run.cpu_ns_per_dgram.total_cmp(&b.run.cpu_ns_per_dgram));
            let f = runs[runs.len() / 2].clone();
            let ratio = f.run.cpu_ns_per_dgram / raw.cpu_ns_per_dgram;
            println!(
                "| {size} | shoal relay, 1 → {n} | {} | {:.4}% | {:.1} | {:.0} ({ratio:.3}x raw) |",
                f.run.sent,
                loss(&f.run) * 100.0,
                f.per_datagram,
                f.run.cpu_ns_per_dgram
            );
            json.push(format!("\"fanout_copy_ratio_{n}_{size}\":{ratio:.3}"));
            json.push(format!("\"fanout_ns_per_copy_{n}_{size}\":{:.0}", f.run.cpu_ns_per_dgram));
            json.push(format!("\"fanout_copies_per_datagram_{n}_{size}\":{:.2}", f.per_datagram));
            json.push(format!("\"fanout_loss_{n}_{size}\":{:.6}", loss(&f.run)));
            if size == args.sizes[0] {
                json.push(format!("\"fanout_copy_ratio_{n}\":{ratio:.3}"));
            }
        }
        json.push(format!("\"raw_ns_per_dgram_{size}\":{:.0}", raw.cpu_ns_per_dgram));
    }
    println!(
        "{{{},\"rate\":{},\"publishers\":{},\"bundle_window_ms\":{}}}",
        json.join(","),
        args.rate,
        args.publishers,
        args.bundle_window_ms
    );
    Ok(())
}
