//! `shoal-nat-peer`: one player of a real-NAT run ([`shoal_tests::netns`]), started inside a
//! host's network namespace. It signs in with a [`Session`], stands near the other player and,
//! once introduced, talks on the VC the control server's introductions open: message `ping N`
//! at once and then every `--every-ms`, each answered by the other side with `pong N`. It
//! prints one JSON line per event ([`PeerLine`]) and its final stats on a `stop` line on stdin,
//! at stdin's end, or after `--max-secs`; after a `stop` it signs out when stdin ends.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use shoal_mesh::wire::VcId;
use shoal_protocol::Identity;
use shoal_protocol::identity::parse_hex;
use shoal_sdk::path::Punch;
use shoal_sdk::{Event, PathKind, PlayerState, Session, SessionConfig, SessionEvent, Trust, VcEvent, VcKey, VcStats};
use shoal_tests::netns::peer::{PathLine, PeerLine, STOP, kind_name, micros, path_text};
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(Parser, Debug)]
#[command(
    name = "shoal-nat-peer",
    about = "One player of a real-NAT run: signs in, talks to its neighbour, prints JSON lines"
)]
struct Args {
    /// The control server's QUIC address.
    #[arg(long)]
    control: SocketAddr,
    /// The control server's certificate fingerprint (64 hex digits).
    #[arg(long)]
    fingerprint: String,
    /// The account.
    #[arg(long)]
    account: String,
    /// Its password.
    #[arg(long)]
    password: String,
    /// The player's key is this byte, 32 times.
    #[arg(long)]
    seed: u8,
    /// Where the character stands on the x axis.
    #[arg(long, default_value_t = 0.0)]
    x: f32,
    /// The VC to talk on: one the introductions open.
    #[arg(long, default_value_t = 3)]
    vc: u32,
    /// Milliseconds between messages.
    #[arg(long, default_value_t = 50)]
    every_ms: u64,
    /// The run ends after this many seconds whatever happens.
    #[arg(long, default_value_t = 30)]
    max_secs: u64,
}

fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, micros)
}

fn emit(line: &PeerLine) {
    if let Ok(text) = serde_json::to_string(line) {
        println!("{text}");
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let result = match runtime {
        Ok(rt) => rt.block_on(run(args)),
        Err(e) => Err(format!("no runtime: {e}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(what) => {
            emit(&PeerLine::Failed { what });
            ExitCode::FAILURE
        }
    }
}

/// What stdin says: [`STOP`] (print the final stats), then its end (sign out and exit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Told {
    Stop,
    End,
}

/// What stdin says, as it says it.
fn told() -> mpsc::UnboundedReceiver<Told> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        loop {
            line.clear();
            match std::io::stdin().read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if line.trim() == STOP => {
                    let _ = tx.send(Told::Stop);
                }
                Ok(_) => {}
            }
        }
        let _ = tx.send(Told::End);
    });
    rx
}

/// Prints what the session says about addresses, whatever the phase.
fn note(ev: &SessionEvent) {
    match ev {
        SessionEvent::Observed(addr) => emit(&PeerLine::Observed { unix_us: unix_us(), addr: *addr }),
        SessionEvent::Node(Event::RelayBound { addr, observed, .. }) => {
            emit(&PeerLine::RelayBound { unix_us: unix_us(), relay: *addr, observed: *observed });
        }
        _ => {}
    }
}

/// Whether this side's outcome is clear: messages went both ways, and either the VC is direct
/// with an answer received while direct and data come in over the direct path, or every
/// direct candidate's punching attempt has failed.
fn settled(stats: &VcStats, received: u64, echoes: u64, echo_while_direct: bool) -> bool {
    if received == 0 || echoes == 0 {
        return false;
    }
    match &stats.path {
        Some(p) if p.kind == PathKind::Direct => echo_while_direct && p.stats.bytes_received > 0,
        _ => stats
            .paths
            .iter()
            .filter(|p| p.kind == PathKind::Direct)
            .all(|p| matches!(p.stats.punch, Some(Punch::Failed { .. }))),
    }
}

/// The number in `prefix N`.
fn numbered(message: &[u8], prefix: &[u8]) -> Option<u64> {
    std::str::from_utf8(message.strip_prefix(prefix)?).ok()?.parse().ok()
}

async fn run(args: Args) -> Result<(), String> {
    let limit = Instant::now() + Duration::from_secs(args.max_secs);
    let fingerprint = parse_hex::<32>(&args.fingerprint).map_err(|e| format!("--fingerprint: {e}"))?;
    let identity = Identity::from_seed([args.seed; 32]);
    let mut cfg = SessionConfig::new(args.control, Trust::Pinned(fingerprint), &args.account, &args.password, identity);
    cfg.report_every = Duration::from_millis(100);
    let mut session = Session::start(cfg).await.map_err(|e| format!("signing in: {e}"))?;
    emit(&PeerLine::SignedIn { unix_us: unix_us(), id: session.id().to_string(), local: session.local_addr() });
    session
        .set_state(PlayerState { position: [args.x, 0.0, 0.0], status: "playing".into(), ..Default::default() })
        .map_err(|e| format!("setting the state: {e}"))?;
    let mut stdin = told();

    let key: VcKey = loop {
        let ev = tokio::select! {
            ev = session.next() => ev.ok_or("the session stopped before the introduction")?,
            () = tokio::time::sleep_until(limit) => return Err("no introduction in time".into()),
            _ = stdin.recv() => return Err("stopped before the introduction".into()),
        };
        match ev {
            SessionEvent::Introduced { vcs, .. } => match vcs.into_iter().find(|k| k.vc == VcId(args.vc)) {
                Some(k) => break k,
                None => return Err(format!("the introduction opened no VC {}", args.vc)),
            },
            other => note(&other),
        }
    };
    let t0 = Instant::now();
    let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1000.0;
    let stats = session.stats(key).await.ok().flatten();
    let candidates = stats.map(|s| s.paths.iter().map(|p| path_text(&p.path)).collect()).unwrap_or_default();
    emit(&PeerLine::Introduced { unix_us: unix_us(), peer: key.peer.to_string(), candidates });

    let mut sent_at = vec![t0];
    let _ = session.send(key, &b"ping 0"[..]).await;
    let every = Duration::from_millis(args.every_ms.max(1));
    let mut tick = tokio::time::interval_at(t0 + every, every);
    let mut check = tokio::time::interval(Duration::from_millis(20));
    let mut active: Option<PathKind> = None;
    let (mut received, mut echoes) = (0u64, 0u64);
    let (mut echo_while_direct, mut is_settled, mut timed_out) = (false, false, false);
    let mut stopped = None;
    loop {
        tokio::select! {
            ev = session.next() => match ev.ok_or("the session stopped")? {
                SessionEvent::Node(Event::Vc(k, e)) if k == key => match e {
                    VcEvent::Opened => emit(&PeerLine::Opened { ms: ms(Instant::now()) }),
                    VcEvent::PathChanged { new, reason, .. } => {
                        active = Some(new.kind);
                        echo_while_direct = false;
                        emit(&PeerLine::Path {
                            ms: ms(Instant::now()),
                            kind: kind_name(new.kind).into(),
                            path: path_text(&new.path),
                            srtt_us: new.stats.srtt.map(micros),
                            reason: format!("{reason:?}"),
                        });
                    }
                    VcEvent::Closed(reason) => {
                        emit(&PeerLine::Closed { ms: ms(Instant::now()), reason: format!("{reason:?}") });
                        break;
                    }
                    _ => {}
                },
                SessionEvent::Message(k, m) if k == key => {
                    let now = Instant::now();
                    let on = active.map(|k| kind_name(k).to_string());
                    if let Some(n) = numbered(&m, b"ping ") {
                        received += 1;
                        if received == 1 {
                            emit(&PeerLine::Message { ms: ms(now), unix_us: unix_us(), n, on });
                        }
                        let _ = session.send(key, format!("pong {n}").into_bytes()).await;
                    } else if let Some(n) = numbered(&m, b"pong ") {
                        let Some(sent) = usize::try_from(n).ok().and_then(|i| sent_at.get(i)) else { continue };
                        echoes += 1;
                        if echoes == 1 {
                            emit(&PeerLine::Echo { ms: ms(now), n, rtt_us: micros(now - *sent), on });
                        }
                        echo_while_direct |= active == Some(PathKind::Direct);
                    }
                }
                other => note(&other),
            },
            _ = tick.tick() => {
                let n = sent_at.len();
                sent_at.push(Instant::now());
                let _ = session.send(key, format!("ping {n}").into_bytes()).await;
            }
            _ = check.tick(), if !is_settled => {
                if let Ok(Some(stats)) = session.stats(key).await
                    && settled(&stats, received, echoes, echo_while_direct)
                {
                    is_settled = true;
                    let kind = stats.path.map_or("none", |p| kind_name(p.kind));
                    emit(&PeerLine::Settled { ms: ms(Instant::now()), kind: kind.into() });
                }
            }
            t = stdin.recv() => {
                stopped = t;
                break;
            }
            () = tokio::time::sleep_until(limit) => {
                timed_out = true;
                break;
            }
        }
    }
    let stats = session.stats(key).await.ok().flatten();
    emit(&PeerLine::Final {
        ms: ms(Instant::now()),
        timed_out,
        active: stats.as_ref().and_then(|s| s.path.as_ref()).map(|p| kind_name(p.kind).into()),
        paths: stats.as_ref().map(|s| s.paths.iter().map(PathLine::of).collect()).unwrap_or_default(),
        sent: sent_at.len() as u64,
        received,
        echoes,
    });
    // Sign out (which makes the control server bid the other peer farewell, closing its VC)
    // only once the caller has the other's final stats too, and says so by closing stdin.
    if stopped == Some(Told::Stop) {
        let end = async { while stdin.recv().await.is_some_and(|t| t != Told::End) {} };
        let _ = tokio::time::timeout_at(limit, end).await;
    }
    session.sign_out().await;
    Ok(())
}
