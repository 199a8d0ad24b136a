//! A crowd on real sockets, as a user would run one: a control server (in this process, on
//! loopback), a relay process, and N players signing in through the public `Session` API,
//! moving together in a square of 20 m (by the movement model) so that each is introduced to
//! its nearest neighbours, and setting their avatar 30 times a second; the session serves it
//! to every neighbour. After a warm-up, each player's traffic is read from its node over a
//! window: datagrams and bytes a second it sends and receives, the share that is the mesh's own
//! overhead, and how often its VCs changed path; with the CPU this process spent, and what each
//! player showed of its neighbours' avatars at the start and the end of the window.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glam::Vec3;
use shoal_control::auth::{HashCost, StoreAccounts};
use shoal_control::core::CoreConfig;
use shoal_control::limit::RateLimit;
use shoal_control::server::{self, ServerConfig};
use shoal_control::store::Store;
use shoal_control::tls::ServerIdentity;
use shoal_protocol::control::RelayInfo;
use shoal_protocol::{Identity, NodeId};
use shoal_sdk::avatar::movement::Mover;
use shoal_sdk::{AvatarEvent, Event, Session, SessionConfig, SessionEvent, SwitchReason, Traffic, Trust, VcEvent};
use tokio::sync::mpsc;

use crate::procs::start_relay;

/// What a crowd run measured, summed over the players.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CrowdRun {
    /// Players.
    pub players: usize,
    /// Seconds measured.
    pub secs: f64,
    /// Neighbours per player, on average, during the window.
    pub neighbours: f64,
    /// What the players sent over the window.
    pub sent: Traffic,
    /// What they received.
    pub received: Traffic,
    /// Avatar updates they sent and received over the window.
    pub messages_sent: u64,
    /// See `messages_sent`.
    pub messages_received: u64,
    /// Avatar messages (updates and acks) they sent over the window, and their bytes: the
    /// avatar payload of [`CrowdRun::sent`].
    pub avatar_messages: u64,
    /// See `avatar_messages`.
    pub avatar_bytes: u64,
    /// Per player at the end of the window: its neighbours, the neighbours whose avatar it
    /// shows, and of those the ones shown somewhere else than at the window's start.
    pub views: Vec<View>,
    /// Path changes on their VCs over the window because a path failed (silent, lossy, ...).
    pub path_changes: u64,
    /// Path changes over the window to a path that measured better.
    pub upgrades: u64,
    /// CPU seconds this process (players and control server) spent over the window.
    pub cpu_secs: f64,
}

/// What one player showed of its neighbours.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct View {
    /// Neighbours introduced and not parted.
    pub neighbours: usize,
    /// Of them, those whose avatar is shown.
    pub shown: usize,
    /// Of those, the ones shown at least 10 cm from where they were at the window's start.
    pub moved: usize,
}

/// CPU seconds this process has spent (user and system), from /proc.
/// CPU seconds this process has used so far (user and system).
pub fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    // (The state, a letter, comes first: count fields, not numbers.)
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Clock ticks per second (USER_HZ), 100 on Linux.
    let hz = 100.0;
    (field(11) + field(12)) / hz
}

fn add(a: Traffic, b: Traffic) -> Traffic {
    Traffic {
        data_datagrams: a.data_datagrams + b.data_datagrams,
        data_bytes: a.data_bytes + b.data_bytes,
        riding_bytes: a.riding_bytes + b.riding_bytes,
        overhead_datagrams: a.overhead_datagrams + b.overhead_datagrams,
        overhead_bytes: a.overhead_bytes + b.overhead_bytes,
    }
}

fn sub(a: Traffic, b: Traffic) -> Traffic {
    Traffic {
        data_datagrams: a.data_datagrams - b.data_datagrams,
        data_bytes: a.data_bytes - b.data_bytes,
        riding_bytes: a.riding_bytes - b.riding_bytes,
        overhead_datagrams: a.overhead_datagrams - b.overhead_datagrams,
        overhead_bytes: a.overhead_bytes - b.overhead_bytes,
    }
}

/// Counts a player kept while it ran.
#[derive(Debug, Default, Clone)]
struct Tally {
    sent: u64,
    received: u64,
    avatar_messages: u64,
    avatar_bytes: u64,
    path_changes: u64,
    upgrades: u64,
    neighbours: usize,
    /// Where each neighbour's avatar is shown now.
    shown: BTreeMap<NodeId, Vec3>,
}

enum Ask {
    Snapshot(tokio::sync::oneshot::Sender<(Traffic, Traffic, Tally)>),
    Stop,
}

/// One player: moves by `mover`, sets its avatar every `every`, answers snapshots.
async fn player(session: Session, mut mover: Mover, every: Duration, mut asks: mpsc::UnboundedReceiver<Ask>) {
    let mut session = session;
    let mut tick = tokio::time::interval(every);
    let mut neighbours = 0usize;
    let mut tally = Tally::default();
    loop {
        tokio::select! {
            ev = session.next() => match ev {
                Some(SessionEvent::Introduced { .. }) => neighbours += 1,
                Some(SessionEvent::Farewell { .. }) => neighbours = neighbours.saturating_sub(1),
                Some(SessionEvent::Avatar(AvatarEvent::Left(_))) => {}
                Some(SessionEvent::Node(Event::Vc(_, VcEvent::PathChanged { reason, .. }))) => match reason {
                    SwitchReason::Initial => {}
                    SwitchReason::Better => tally.upgrades += 1,
                    _ => tally.path_changes += 1,
                },
                Some(_) => {}
                None => return,
            },
            _ = tick.tick() => session.set_avatar(mover.step(every.as_secs_f32())),
            a = asks.recv() => match a {
                Some(Ask::Snapshot(tx)) => {
                    tally.neighbours = neighbours;
                    let c = session.avatar_counters().await;
                    (tally.sent, tally.received) = (c.updates_sent, c.updates_received);
                    (tally.avatar_messages, tally.avatar_bytes) = (c.messages_sent, c.bytes_sent);
                    tally.shown =
                        session.avatars(Instant::now()).await.into_iter().map(|(p, s)| (p, s.position)).collect();
                    let st = session.status().await.unwrap_or_default();
                    let _ = tx.send((st.sent, st.received, tally.clone()));
                }
                Some(Ask::Stop) | None => {
                    session.sign_out().await;
                    return;
                }
            },
        }
    }
}

/// Runs `players` players for `warmup`, then measures them for `window`. Needs the relay
/// binary (built on first use) and a folder it may write in.
///
/// # Panics
/// If the control server, the relay or a sign-in cannot be started: the run means nothing then.
#[allow(clippy::expect_used)]
pub async fn crowd(dir: &Path, players: usize, warmup: Duration, window: Duration) -> CrowdRun {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("run folder");
    let control = Identity::from_seed([77; 32]);
    let relay = start_relay(dir, &control, 9, "");
    let store = Store::open(&format!("sqlite:{}", dir.join("control.db").display())).await.expect("store");
    let accounts = StoreAccounts::new(store.clone(), HashCost { memory_kib: 256, iterations: 1 }).expect("accounts");
    for i in 0..players {
        accounts.create(&format!("p{i}"), "pw", 1).await.expect("account");
    }
    let tls = ServerIdentity::load_or_create(dir).expect("certificate");
    let fingerprint = tls.fingerprint();
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        identity: control.clone(),
        tls,
        core: CoreConfig {
            relays: vec![RelayInfo { id: relay.id, addr: relay.addr, rtt_us: 0 }],
            ..CoreConfig::default()
        },
        retention: Duration::from_secs(3600),
        rate_limit: RateLimit::default(),
    };
    let server = server::start(cfg, store, Arc::new(accounts)).expect("control server");
    let every = Duration::from_secs(1) / 30;
    let mut handles = Vec::new();
    for i in 0..players {
        let id = Identity::from_seed([i as u8 ^ 0xa5; 32]);
        let mut c = SessionConfig::new(server.addr, Trust::Pinned(fingerprint), &format!("p{i}"), "pw", id);
        c.mesh_bind = "127.0.0.1:0".parse().expect("address");
        let session = Session::start(c).await.expect("sign-in");
        // Together, within everyone's radius.
        let mover = Mover::around(i as u64, Vec3::ZERO, 20.0);
        session.set_avatar(mover.state());
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(player(session, mover, every, rx));
        handles.push(tx);
    }
    tokio::time::sleep(warmup).await;
    let snapshot = |handles: &Vec<mpsc::UnboundedSender<Ask>>| {
        let asks: Vec<_> = handles
            .iter()
            .map(|h| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let _ = h.send(Ask::Snapshot(tx));
                rx
            })
            .collect();
        async move {
            let mut total = (Traffic::default(), Traffic::default(), Tally::default());
            let mut each = Vec::new();
            for rx in asks {
                if let Ok((s, r, t)) = rx.await {
                    total.0 = add(total.0, s);
                    total.1 = add(total.1, r);
                    total.2.sent += t.sent;
                    total.2.received += t.received;
                    total.2.avatar_messages += t.avatar_messages;
                    total.2.avatar_bytes += t.avatar_bytes;
                    total.2.path_changes += t.path_changes;
                    total.2.upgrades += t.upgrades;
                    total.2.neighbours += t.neighbours;
                    each.push(t);
                }
            }
            (total.0, total.1, total.2, each)
        }
    };
    let (s0, r0, t0, before) = snapshot(&handles).await;
    let (cpu0, wall0) = (cpu_secs(), Instant::now());
    tokio::time::sleep(window).await;
    let (s1, r1, t1, after) = snapshot(&handles).await;
    let views = before
        .iter()
        .zip(&after)
        .map(|(b, a)| View {
            neighbours: a.neighbours,
            shown: a.shown.len(),
            moved: a
                .shown
                .iter()
                .filter(|(p, now)| b.shown.get(p).is_some_and(|was| was.distance(**now) > 0.1))
                .count(),
        })
        .collect();
    let (cpu1, secs) = (cpu_secs(), wall0.elapsed().as_secs_f64());
    for h in &handles {
        let _ = h.send(Ask::Stop);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(server);
    drop(relay);
    CrowdRun {
        players,
        secs,
        neighbours: (t0.neighbours + t1.neighbours) as f64 / 2.0 / players.max(1) as f64,
        sent: sub(s1, s0),
        received: sub(r1, r0),
        messages_sent: t1.sent - t0.sent,
        messages_received: t1.received - t0.received,
        avatar_messages: t1.avatar_messages - t0.avatar_messages,
        avatar_bytes: t1.avatar_bytes - t0.avatar_bytes,
        views,
        path_changes: t1.path_changes - t0.path_changes,
        upgrades: t1.upgrades - t0.upgrades,
        cpu_secs: cpu1 - cpu0,
    }
}
