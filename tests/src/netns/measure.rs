//! One real-NAT run from end to end, shared by the tests and the benchmarks: the topology, the
//! relay and the control server in the public namespace, one `shoal-nat-peer` behind each
//! router, and what the peers printed read back into a [`RealNatRun`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_protocol::identity::to_hex;
use shoal_protocol::{Identity, Roles};
use shoal_sdk::PathKind;
use shoal_sdk::path::Punch;

use super::peer::{PeerLine, STOP, parse_kind, parse_punch};
use super::{CONTROL_PORT, NatMode, NetnsError, NsProc, PUBLIC_IP, RELAY_PORT, ScratchDir, Site, Topology, run};
use crate::procs::permit;

/// How long the daemons may take to print their ready lines.
const READY_LIMIT: Duration = Duration::from_secs(15);
/// How long the peers may take, from their start, to sign in, be introduced and settle.
const RUN_LIMIT: Duration = Duration::from_secs(20);
/// Traffic kept flowing after both peers have settled, before they are stopped.
const LINGER: Duration = Duration::from_millis(300);
/// How long a stopped peer may take to print its final line and exit.
const STOP_LIMIT: Duration = Duration::from_secs(5);
/// The VC the introductions open (reliable) and the peers talk on.
const VC: u32 = 3;

/// The three programs of a run.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `shoal-mesh-node`.
    pub relay: PathBuf,
    /// `shoal-control-server`.
    pub control: PathBuf,
    /// `shoal-nat-peer`.
    pub peer: PathBuf,
}

impl Binaries {
    /// Builds the three with the running program's profile (so a run never uses stale ones)
    /// and finds them beside it.
    pub fn build() -> Result<Binaries, NetnsError> {
        let dir = crate::procs::build_binaries(&[
            ("shoal-mesh", "shoal-mesh-node"),
            ("shoal-control", "shoal-control-server"),
            ("shoal-tests", "shoal-nat-peer"),
        ])
        .map_err(NetnsError::Build)?;
        Ok(Binaries {
            relay: dir.join("shoal-mesh-node"),
            control: dir.join("shoal-control-server"),
            peer: dir.join("shoal-nat-peer"),
        })
    }
}

/// A change of a VC's active path, as one peer saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct PathChange {
    /// Since the peer's introduction.
    pub at: Duration,
    /// The new path's kind.
    pub kind: PathKind,
    /// Where it goes.
    pub path: String,
    /// Its smoothed RTT when chosen, if measured yet.
    pub srtt: Option<Duration>,
    /// Why it was chosen.
    pub reason: String,
}

/// One candidate path at the end of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct PathEnd {
    /// Its kind.
    pub kind: PathKind,
    /// Where it goes.
    pub path: String,
    /// Whether it carried the traffic.
    pub active: bool,
    /// Its smoothed RTT.
    pub srtt: Option<Duration>,
    /// Pings sent over it.
    pub pings: u64,
    /// Pongs received over it.
    pub pongs: u64,
    /// Data bytes sent over it.
    pub bytes_sent: u64,
    /// Data bytes received over it.
    pub bytes_received: u64,
    /// Direct paths: where punching stood.
    pub punch: Option<Punch>,
}

/// What one peer saw. Times are since its introduction, when its session opened the VC.
#[derive(Debug, Clone, Default)]
pub struct PeerRun {
    /// Every line it printed.
    pub lines: Vec<String>,
    /// Its mesh socket's address on its host.
    pub local: Option<SocketAddr>,
    /// The relay's view of it: its NAT's mapping towards the relay.
    pub relay_observed: Option<SocketAddr>,
    /// The control server's views of its mesh address, in order.
    pub observed: Vec<SocketAddr>,
    /// Its introduction, wall-clock microseconds.
    pub introduced_unix_us: Option<u64>,
    /// The VC's candidate paths at the introduction.
    pub candidates: Vec<String>,
    /// When the VC's keys were agreed.
    pub opened: Option<Duration>,
    /// The active path's changes, the first being the initial choice.
    pub path_changes: Vec<PathChange>,
    /// When the other peer's first message arrived, wall-clock microseconds.
    pub first_message_unix_us: Option<u64>,
    /// The kind of its own active path then (which need not be the one the message came over).
    pub first_message_on: Option<PathKind>,
    /// When the first answer to its own messages arrived.
    pub first_echo: Option<Duration>,
    /// That answer's round trip (message out, answer back).
    pub first_echo_rtt: Option<Duration>,
    /// When its outcome was clear (see `shoal-nat-peer`).
    pub settled: Option<Duration>,
    /// Why the VC closed, if it did.
    pub closed: Option<String>,
    /// Why the peer gave up, if it did.
    pub failed: Option<String>,
    /// Whether the final line came (the run ended normally).
    pub finished: bool,
    /// The peer's own time limit ended it.
    pub timed_out: bool,
    /// The kind of the active path at the end.
    pub final_kind: Option<PathKind>,
    /// The candidate paths at the end.
    pub final_paths: Vec<PathEnd>,
    /// Messages sent.
    pub sent: u64,
    /// The other peer's messages received.
    pub received: u64,
    /// Answers to its messages received.
    pub echoes: u64,
}

fn ms(ms: f64) -> Duration {
    Duration::from_secs_f64(ms.max(0.0) / 1000.0)
}

impl PeerRun {
    fn take(&mut self, text: String) {
        if let Ok(line) = serde_json::from_str::<PeerLine>(&text) {
            self.apply(line);
        }
        self.lines.push(text);
    }

    fn apply(&mut self, line: PeerLine) {
        match line {
            PeerLine::SignedIn { local, .. } => self.local = Some(local),
            PeerLine::Observed { addr, .. } => self.observed.push(addr),
            PeerLine::RelayBound { observed, .. } => self.relay_observed = Some(observed),
            PeerLine::Introduced { unix_us, candidates, .. } => {
                self.introduced_unix_us = Some(unix_us);
                self.candidates = candidates;
            }
            PeerLine::Opened { ms: t } => self.opened = Some(ms(t)),
            PeerLine::Path { ms: t, kind, path, srtt_us, reason } => {
                if let Some(kind) = parse_kind(&kind) {
                    let srtt = srtt_us.map(Duration::from_micros);
                    self.path_changes.push(PathChange { at: ms(t), kind, path, srtt, reason });
                }
            }
            PeerLine::Message { unix_us, on, .. } => {
                self.first_message_unix_us = Some(unix_us);
                self.first_message_on = on.as_deref().and_then(parse_kind);
            }
            PeerLine::Echo { ms: t, rtt_us, .. } => {
                self.first_echo = Some(ms(t));
                self.first_echo_rtt = Some(Duration::from_micros(rtt_us));
            }
            PeerLine::Settled { ms: t, .. } => self.settled = Some(ms(t)),
            PeerLine::Closed { reason, .. } => self.closed = Some(reason),
            PeerLine::Failed { what } => self.failed = Some(what),
            PeerLine::Final { timed_out, active, paths, sent, received, echoes, .. } => {
                self.finished = true;
                self.timed_out = timed_out;
                self.final_kind = active.as_deref().and_then(parse_kind);
                self.final_paths = paths
                    .into_iter()
                    .filter_map(|p| {
                        Some(PathEnd {
                            kind: parse_kind(&p.kind)?,
                            path: p.path,
                            active: p.active,
                            srtt: p.srtt_us.map(Duration::from_micros),
                            pings: p.pings,
                            pongs: p.pongs,
                            bytes_sent: p.bytes_sent,
                            bytes_received: p.bytes_received,
                            punch: p.punch.as_deref().and_then(parse_punch),
                        })
                    })
                    .collect();
                (self.sent, self.received, self.echoes) = (sent, received, echoes);
            }
        }
    }

    /// Whether it has stopped printing for good (finished or gave up).
    fn ended(&self) -> bool {
        self.finished || self.failed.is_some()
    }

    /// The kind of the first path the VC used.
    pub fn first_kind(&self) -> Option<PathKind> {
        self.path_changes.first().map(|c| c.kind)
    }

    /// When the VC first moved to a direct path.
    pub fn direct_at(&self) -> Option<Duration> {
        self.path_changes.iter().find(|c| c.kind == PathKind::Direct).map(|c| c.at)
    }

    /// The candidates of `kind` at the end.
    pub fn paths_of(&self, kind: PathKind) -> impl Iterator<Item = &PathEnd> {
        self.final_paths.iter().filter(move |p| p.kind == kind)
    }

    /// The smoothed RTT at the end of the best measured candidate of `kind`.
    pub fn rtt_of(&self, kind: PathKind) -> Option<Duration> {
        self.paths_of(kind).filter_map(|p| p.srtt).min()
    }
}

/// One real-NAT run: two peers behind routers in `modes`, a relay and a control server in the
/// public namespace.
#[derive(Debug, Clone)]
pub struct RealNatRun {
    /// Router A's and router B's modes.
    pub modes: [NatMode; 2],
    /// Peer A (behind router A) and peer B.
    pub peers: [PeerRun; 2],
    /// The whole run, namespaces and daemons included.
    pub wall: Duration,
}

fn mean(ds: impl Iterator<Item = Duration>) -> Option<Duration> {
    let ds: Vec<Duration> = ds.collect();
    let n = u32::try_from(ds.len()).ok().filter(|n| *n > 0)?;
    Some(ds.iter().sum::<Duration>() / n)
}

impl RealNatRun {
    /// From a peer's VC open (its introduction, when it queued its first message) to that
    /// message's delivery at the other peer, in the slower of the two directions. It normally
    /// crosses the relay, but with sub-millisecond links punching may finish first:
    /// [`RealNatRun::first_message_relayed`] says which.
    pub fn first_message(&self) -> Option<Duration> {
        let one = |from: &PeerRun, to: &PeerRun| {
            Some(Duration::from_micros(to.first_message_unix_us?.saturating_sub(from.introduced_unix_us?)))
        };
        let [a, b] = &self.peers;
        Some(one(a, b)?.max(one(b, a)?))
    }

    /// Whether each peer's first message was delivered before its sender left the relay (a
    /// VC sends on its active path only, so that message crossed the relay).
    pub fn first_message_relayed(&self) -> bool {
        let one = |from: &PeerRun, to: &PeerRun| {
            let (Some(sent), Some(got)) = (from.introduced_unix_us, to.first_message_unix_us) else { return false };
            let left_relay = from.direct_at().map(|d| sent + super::peer::micros(d));
            from.first_kind() == Some(PathKind::OneRelay) && left_relay.is_none_or(|left| got < left)
        };
        let [a, b] = &self.peers;
        one(a, b) && one(b, a)
    }

    /// From the VC's open to its move to a direct path, on the slower side; `None` unless both
    /// sides went direct.
    pub fn direct_upgrade(&self) -> Option<Duration> {
        let [a, b] = &self.peers;
        Some(a.direct_at()?.max(b.direct_at()?))
    }

    /// The relayed path's smoothed RTT at the end, the mean of both sides' measurements.
    pub fn relay_rtt(&self) -> Option<Duration> {
        mean(self.peers.iter().filter_map(|p| p.rtt_of(PathKind::OneRelay)))
    }

    /// The direct path's smoothed RTT at the end, the mean of both sides' measurements.
    pub fn direct_rtt(&self) -> Option<Duration> {
        mean(self.peers.iter().filter_map(|p| p.rtt_of(PathKind::Direct).filter(|_| p.direct_at().is_some())))
    }

    /// `d` in relayed round trips.
    pub fn in_relay_rtts(&self, d: Duration) -> Option<f64> {
        let rtt = self.relay_rtt().filter(|r| !r.is_zero())?;
        Some(d.as_secs_f64() / rtt.as_secs_f64())
    }

    /// The figures on one line.
    pub fn summary(&self) -> String {
        let [ma, mb] = self.modes;
        let shown = |d: Option<Duration>| match d {
            Some(d) => match self.in_relay_rtts(d) {
                Some(r) => format!("{:.2} ms ({r:.1} relay RTTs)", d.as_secs_f64() * 1000.0),
                None => format!("{:.2} ms", d.as_secs_f64() * 1000.0),
            },
            None => "never".into(),
        };
        let rtt = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.3} ms", d.as_secs_f64() * 1000.0));
        let kind = |p: &PeerRun| p.final_kind.map_or("none", super::peer::kind_name);
        format!(
            "{ma}/{mb}: first message {}, direct {}, relay RTT {}, direct RTT {}, final {}/{}, wall {:.1} s",
            shown(self.first_message()),
            shown(self.direct_upgrade()),
            rtt(self.relay_rtt()),
            rtt(self.direct_rtt()),
            kind(&self.peers[0]),
            kind(&self.peers[1]),
            self.wall.as_secs_f64()
        )
    }
}

/// Builds the binaries ([`Binaries::build`]) and runs once with router A in `mode_a` and router
/// B in `mode_b`: see [`measure_with`].
pub fn measure(mode_a: NatMode, mode_b: NatMode) -> Result<RealNatRun, NetnsError> {
    measure_with(&Binaries::build()?, mode_a, mode_b)
}

/// Runs once with router A in `mode_a` and router B in `mode_b`: builds the namespaces, starts
/// the relay and the control server (which introduces two players standing near each other and
/// opens a reliable VC between them) in the public namespace and a `shoal-nat-peer` on each
/// host; waits until both peers' outcomes are clear (direct with traffic over it, or every
/// punch failed while the relay carries the messages), lets traffic flow a little longer,
/// stops them and reads back what they printed. Bounded: about 20 s at worst beyond the
/// daemons' start. Everything it made is gone when it returns, also on an error.
///
/// An error means the run could not happen (setup, daemons, a peer never introduced); a run
/// whose peers never went direct is not an error but a result to check.
pub fn measure_with(bins: &Binaries, mode_a: NatMode, mode_b: NatMode) -> Result<RealNatRun, NetnsError> {
    let started = Instant::now();
    let topo = Topology::new(mode_a, mode_b)?;
    let dir = ScratchDir::new(&format!("{}-files", topo.name()))?;
    let path = |name: &str| dir.path().join(name).display().to_string();

    let control = Identity::from_seed([77; 32]);
    let relay_id = Identity::from_seed([42; 32]);
    dir.write("control.key", &to_hex(control.seed()))?;
    dir.write("relay.key", &to_hex(relay_id.seed()))?;
    let relay_addr = SocketAddr::from((PUBLIC_IP, RELAY_PORT));
    let relay_toml = dir.write(
        "relay.toml",
        &format!(
            "listen = \"{relay_addr}\"\nworkers = 1\nkey_file = \"{}\"\ncontrol_public_key = \"{}\"\npermit = \"{}\"\n",
            path("relay.key"),
            control.public_key(),
            to_hex(&permit(&control, &relay_id, Roles::RELAY).encode()),
        ),
    )?;
    let control_addr = SocketAddr::from((PUBLIC_IP, CONTROL_PORT));
    let control_toml = dir.write(
        "control.toml",
        &format!(
            "listen = \"{control_addr}\"\nhttp = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nkey_file = \"{}\"\n\n\
             [[relays]]\nnode = \"{}\"\naddr = \"{relay_addr}\"\n\n[[profiles]]\nvc = {VC}\nkind = \"reliable\"\n",
            path("control"),
            path("control.key"),
            relay_id.node_id(),
        ),
    )?;
    let config_args = |file: &Path| vec!["run".to_string(), "--config".into(), file.display().to_string()];

    let relay = topo.spawn(Site::Public, "relay", dir.path(), &bins.relay, &config_args(&relay_toml))?;
    for account in ["ana", "bob"] {
        let mut create = Command::new(&bins.control);
        create.args(["create-account", "--config", &control_toml.display().to_string(), "--account", account]);
        run(create.env("SHOAL_PASSWORD", format!("{account}-pw")))?;
    }
    ready(&relay, "shoal-mesh-node ready")?;
    let server = topo.spawn(Site::Public, "control", dir.path(), &bins.control, &config_args(&control_toml))?;
    let line = ready(&server, "shoal-control-server ready")?;
    let fingerprint = line.split_whitespace().find_map(|w| w.strip_prefix("fingerprint=")).unwrap_or_default();

    let peer_args = |account: &str, seed: u8, x: f32| {
        let args = [
            "--control",
            &control_addr.to_string(),
            "--fingerprint",
            fingerprint,
            "--account",
            account,
            "--password",
            &format!("{account}-pw"),
            "--seed",
            &seed.to_string(),
            "--x",
            &x.to_string(),
            "--vc",
            &VC.to_string(),
            "--max-secs",
            &(RUN_LIMIT + STOP_LIMIT).as_secs().to_string(),
        ];
        args.map(str::to_string).to_vec()
    };
    let a = topo.spawn(Site::HostA, "peer-a", dir.path(), &bins.peer, &peer_args("ana", 1, 0.0))?;
    let b = topo.spawn(Site::HostB, "peer-b", dir.path(), &bins.peer, &peer_args("bob", 2, 3.0))?;
    let mut procs = [a, b];
    let mut peers = [PeerRun::default(), PeerRun::default()];
    let drain = |procs: &[NsProc; 2], peers: &mut [PeerRun; 2]| {
        let mut any = false;
        for (p, run) in procs.iter().zip(peers.iter_mut()) {
            while let Some(line) = p.try_line() {
                run.take(line);
                any = true;
            }
        }
        any
    };
    let deadline = Instant::now() + RUN_LIMIT;
    while Instant::now() < deadline && !peers.iter().all(|p| p.settled.is_some() || p.ended()) {
        if !drain(&procs, &mut peers) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let linger = Instant::now() + LINGER;
    while Instant::now() < linger {
        if !drain(&procs, &mut peers) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    for p in &mut procs {
        p.say(STOP);
    }
    let end = Instant::now() + STOP_LIMIT;
    for (p, run) in procs.iter_mut().zip(peers.iter_mut()) {
        while !run.ended() {
            let Some(line) = p.line(end) else { break };
            run.take(line);
        }
    }
    // Both final lines are in: now they may sign out.
    for p in &mut procs {
        p.close_stdin();
    }
    for p in &mut procs {
        p.finish(end.saturating_duration_since(Instant::now()));
    }

    let log = || {
        let mut log = String::new();
        for (p, run) in procs.iter().zip(&peers) {
            log += &format!(
                "--- {} stdout\n{}\n--- {} stderr\n{}\n",
                p.label(),
                run.lines.join("\n"),
                p.label(),
                p.stderr_tail(30)
            );
        }
        for p in [&relay, &server] {
            log += &format!("--- {} stderr\n{}\n", p.label(), p.stderr_tail(30));
        }
        log
    };
    for (name, run) in ["a", "b"].iter().zip(&peers) {
        if let Some(why) = &run.failed {
            return Err(NetnsError::Run { what: format!("peer {name} gave up: {why}"), log: log() });
        }
        if run.introduced_unix_us.is_none() || !run.finished {
            let what = format!("peer {name} was never introduced or never finished");
            return Err(NetnsError::Run { what, log: log() });
        }
    }
    Ok(RealNatRun { modes: [mode_a, mode_b], peers, wall: started.elapsed() })
}

/// Waits for `p`'s line starting with `prefix`.
fn ready(p: &NsProc, prefix: &str) -> Result<String, NetnsError> {
    let deadline = Instant::now() + READY_LIMIT;
    while let Some(line) = p.line(deadline) {
        if line.starts_with(prefix) {
            return Ok(line);
        }
    }
    Err(NetnsError::Run { what: format!("{} printed no ready line", p.label()), log: p.stderr_tail(30) })
}
