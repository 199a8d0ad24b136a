//! Real NAT on one machine, the second tier of NAT testing after the simulator's models
//! ([`crate::nat`]): Linux network namespaces joined by veth pairs and a bridge, two routers
//! that masquerade with iptables, and the relay, the control server and two SDK peers
//! (`shoal-nat-peer`) running inside them, so the kernel's conntrack decides what gets through.
//! Nothing links the namespaces to the root one: no packet leaves the machine.
//!
//! ```text
//! hostA 10.0.1.2 ── natA 10.0.1.1 | 203.0.113.1 ──┐
//!                                                   ├── pub: bridge br0, 203.0.113.100
//! hostB 10.0.2.2 ── natB 10.0.2.1 | 203.0.113.2 ──┘   (relay :7000, control server :4433)
//! ```
//!
//! Each router drops unsolicited inbound packets on its WAN side as a home router does. That
//! rule matters: without it, a peer's early punch leaves a conntrack entry on the other router
//! that steals the port, and punching fails even between two cone NATs.
//!
//! Needs root, `ip` and `iptables` ([`unavailable`] says what is missing;
//! `scripts/nat-for-tests.sh` installs iptables). [`measure`] runs the whole thing once.

mod measure;
pub mod peer;

use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use measure::{Binaries, PathChange, PathEnd, PeerRun, RealNatRun, measure, measure_with};

/// The address of the public side: the relay and the control server listen here.
pub const PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
/// The relay's mesh port on [`PUBLIC_IP`].
pub const RELAY_PORT: u16 = 7000;
/// The control server's QUIC port on [`PUBLIC_IP`].
pub const CONTROL_PORT: u16 = 4433;

/// How a router maps its hosts' flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NatMode {
    /// `MASQUERADE`, which keeps the source port when it can: one mapping per local address
    /// whatever the destination (endpoint-independent mapping), answers only from the exact
    /// address and port a flow went to (port-restricted cone). Punchable.
    Cone,
    /// `MASQUERADE --random-fully`: a random port for every new flow (endpoint-dependent
    /// mapping, a symmetric NAT). Not punchable from another NAT.
    Symmetric,
}

impl NatMode {
    fn masquerade_flags(self) -> &'static [&'static str] {
        match self {
            NatMode::Cone => &[],
            NatMode::Symmetric => &["--random-fully"],
        }
    }
}

impl fmt::Display for NatMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NatMode::Cone => "cone",
            NatMode::Symmetric => "symmetric",
        })
    }
}

/// One namespace of the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// The public network: a bridge at [`PUBLIC_IP`] joining both routers' WAN sides.
    Public,
    /// Host A's router, 10.0.1.1 inside, 203.0.113.1 outside.
    RouterA,
    /// Host B's router, 10.0.2.1 inside, 203.0.113.2 outside.
    RouterB,
    /// Host A, 10.0.1.2 behind router A.
    HostA,
    /// Host B, 10.0.2.2 behind router B.
    HostB,
}

impl Site {
    const ALL: [Site; 5] = [Site::Public, Site::RouterA, Site::RouterB, Site::HostA, Site::HostB];

    fn suffix(self) -> &'static str {
        match self {
            Site::Public => "pub",
            Site::RouterA => "nata",
            Site::RouterB => "natb",
            Site::HostA => "ha",
            Site::HostB => "hb",
        }
    }
}

/// Why the topology could not be set up or a run failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A setup command exited with an error.
    #[error("`{command}` failed: {output}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr, or its exit status.
        output: String,
    },
    /// A program could not be started at all.
    #[error("cannot start {what}: {error}")]
    Spawn {
        /// The program.
        what: String,
        /// The error.
        error: std::io::Error,
    },
    /// A scratch file could not be written.
    #[error("cannot write {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// `cargo build` of the binaries a run needs failed.
    #[error("building {0} failed")]
    Build(String),
    /// A daemon or a peer did not do what it should in time.
    #[error("{what}\n{log}")]
    Run {
        /// What went wrong.
        what: String,
        /// What the processes involved printed, for the diagnosis.
        log: String,
    },
}

/// The tools the topology runs, found once.
#[derive(Debug)]
struct Tools {
    ip: PathBuf,
    iptables: PathBuf,
}

/// Finds `name` on `PATH` or in the sbin directories (which a non-login root shell may lack).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn tools() -> Result<&'static Tools, String> {
    static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
    TOOLS
        .get_or_init(|| {
            let ip = find_tool("ip").ok_or("`ip` (iproute2) is not installed")?;
            let iptables = find_tool("iptables")
                .ok_or("`iptables` is not installed (scripts/nat-for-tests.sh installs it, as root)")?;
            Ok(Tools { ip, iptables })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The effective user id, from `/proc/self/status`.
fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Why real-NAT runs cannot happen here, or `None` when they can: needs Linux, root, `ip`,
/// `iptables`, and the right to make a network namespace with a masquerading rule in it
/// (tried once, on a namespace deleted straight after). Namespaces left by a process of ours
/// that died are deleted on the way.
pub fn unavailable() -> Option<String> {
    static WHY: OnceLock<Option<String>> = OnceLock::new();
    WHY.get_or_init(|| {
        if !cfg!(target_os = "linux") {
            return Some("network namespaces need Linux".into());
        }
        if euid() != Some(0) {
            return Some("network namespaces need root".into());
        }
        let tools = match tools() {
            Ok(t) => t,
            Err(e) => return Some(e),
        };
        remove_stale();
        let probe = format!("{}-probe", prefix());
        let tried = run(Command::new(&tools.ip).args(["netns", "add", &probe])).and_then(|()| {
            let masquerade = ["-w", "-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-j", "MASQUERADE", "--random-fully"];
            run(Command::new(&tools.ip).args(["netns", "exec", &probe]).arg(&tools.iptables).args(masquerade))
        });
        let _ = run(Command::new(&tools.ip).args(["netns", "del", &probe]));
        tried.err().map(|e| format!("cannot set up a masquerading network namespace: {e}"))
    })
    .clone()
}

/// Runs `cmd` to completion; an error carries its stderr.
fn run(cmd: &mut Command) -> Result<(), NetnsError> {
    let command = format!("{cmd:?}").replace('"', "");
    let out = cmd.stdin(Stdio::null()).output().map_err(|error| NetnsError::Spawn { what: command.clone(), error })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(NetnsError::Command { command, output: if stderr.is_empty() { out.status.to_string() } else { stderr } })
}

/// Runs `cmd` and returns its stdout (empty on any failure).
fn output(cmd: &mut Command) -> String {
    cmd.stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The prefix of every namespace this process makes: `shoal<pid>`.
fn prefix() -> String {
    format!("shoal{}", std::process::id())
}

/// The pid in a namespace name `shoal<pid>-…`, if it is one of ours.
fn owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("shoal")?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

/// Names of the network namespaces there are.
fn namespaces(ip: &Path) -> Vec<String> {
    output(Command::new(ip).args(["netns", "list"]))
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Kills whatever still runs in namespace `ns` (only processes a run of ours started there)
/// and deletes it.
fn delete_namespace(ip: &Path, ns: &str) {
    for pid in output(Command::new(ip).args(["netns", "pids", ns])).split_whitespace() {
        let _ = output(Command::new("kill").args(["-KILL", pid]));
    }
    let _ = run(Command::new(ip).args(["netns", "del", ns]));
}

/// Deletes the namespaces and scratch directories of processes of ours that are gone (a run
/// killed before its cleanup), with anything still running in those namespaces.
fn remove_stale() {
    let gone = |name: &str| owner(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
    let Ok(tools) = tools() else { return };
    for ns in namespaces(&tools.ip) {
        if gone(&ns) {
            delete_namespace(&tools.ip, &ns);
        }
    }
    let Ok(dirs) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for dir in dirs.flatten() {
        if dir.file_name().to_str().is_some_and(gone) {
            let _ = std::fs::remove_dir_all(dir.path());
        }
    }
}

/// The five namespaces, wired and with their NAT rules; deleted (with anything still running
/// in them) when dropped, so a failing test cleans up too.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    modes: [NatMode; 2],
    made: Vec<String>,
    ip: PathBuf,
    iptables: PathBuf,
}

impl Topology {
    /// Builds the topology with router A in `mode_a` and router B in `mode_b`. Namespace names
    /// are unique to this process and call, so runs in parallel do not meet.
    pub fn new(mode_a: NatMode, mode_b: NatMode) -> Result<Topology, NetnsError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tools = tools().map_err(|what| NetnsError::Run { what, log: String::new() })?;
        let mut t = Topology {
            prefix: format!("{}-{}", prefix(), NEXT.fetch_add(1, Ordering::Relaxed)),
            modes: [mode_a, mode_b],
            made: Vec::new(),
            ip: tools.ip.clone(),
            iptables: tools.iptables.clone(),
        };
        t.build()?;
        Ok(t)
    }

    /// The prefix of its namespaces' names, unique to this process and topology.
    pub fn name(&self) -> &str {
        &self.prefix
    }

    /// The routers' modes, A then B.
    pub fn modes(&self) -> [NatMode; 2] {
        self.modes
    }

    /// The name of `site`'s namespace.
    pub fn ns(&self, site: Site) -> String {
        format!("{}-{}", self.prefix, site.suffix())
    }

    /// A command that runs `program` inside `site`'s namespace.
    pub fn command(&self, site: Site, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(&self.ip);
        c.args(["netns", "exec", &self.ns(site)]).arg(program);
        c
    }

    fn ip(&self, site: Option<Site>, args: &str) -> Result<(), NetnsError> {
        let mut c = Command::new(&self.ip);
        if let Some(site) = site {
            c.args(["-n", &self.ns(site)]);
        }
        run(c.args(args.split_whitespace()))
    }

    fn iptables(&self, site: Site, args: &str, extra: &[&str]) -> Result<(), NetnsError> {
        run(self.command(site, &self.iptables).arg("-w").args(args.split_whitespace()).args(extra))
    }

    fn build(&mut self) -> Result<(), NetnsError> {
        for site in Site::ALL {
            let ns = self.ns(site);
            run(Command::new(&self.ip).args(["netns", "add", &ns]))?;
            self.made.push(ns);
            self.ip(Some(site), "link set lo up")?;
        }
        let public = Some(Site::Public);
        self.ip(public, "link add br0 type bridge")?;
        self.ip(public, &format!("addr add {PUBLIC_IP}/24 dev br0"))?;
        self.ip(public, "link set br0 up")?;
        // Each veth pair is made with both ends already in their namespaces.
        let (pubns, nata, natb) = (self.ns(Site::Public), self.ns(Site::RouterA), self.ns(Site::RouterB));
        let (ha, hb) = (self.ns(Site::HostA), self.ns(Site::HostB));
        self.ip(None, &format!("link add wan netns {nata} type veth peer name pa netns {pubns}"))?;
        self.ip(None, &format!("link add wan netns {natb} type veth peer name pb netns {pubns}"))?;
        self.ip(None, &format!("link add lan netns {nata} type veth peer name eth0 netns {ha}"))?;
        self.ip(None, &format!("link add lan netns {natb} type veth peer name eth0 netns {hb}"))?;
        for port in ["pa", "pb"] {
            self.ip(public, &format!("link set {port} master br0"))?;
            self.ip(public, &format!("link set {port} up"))?;
        }
        let [mode_a, mode_b] = self.modes;
        self.router(Site::RouterA, "203.0.113.1", "10.0.1.1", mode_a)?;
        self.router(Site::RouterB, "203.0.113.2", "10.0.2.1", mode_b)?;
        self.host(Site::HostA, "10.0.1.2", "10.0.1.1")?;
        self.host(Site::HostB, "10.0.2.2", "10.0.2.1")
    }

    fn router(&self, site: Site, wan: &str, lan: &str, mode: NatMode) -> Result<(), NetnsError> {
        run(self.command(site, "sh").args(["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]))?;
        self.ip(Some(site), &format!("addr add {wan}/24 dev wan"))?;
        self.ip(Some(site), &format!("addr add {lan}/24 dev lan"))?;
        self.ip(Some(site), "link set wan up")?;
        self.ip(Some(site), "link set lan up")?;
        self.iptables(site, "-t nat -A POSTROUTING -o wan -j MASQUERADE", mode.masquerade_flags())?;
        for chain in ["INPUT", "FORWARD"] {
            let accept = format!("-A {chain} -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT");
            self.iptables(site, &accept, &[])?;
            self.iptables(site, &format!("-A {chain} -i wan -j DROP"), &[])?;
        }
        Ok(())
    }

    fn host(&self, site: Site, addr: &str, gateway: &str) -> Result<(), NetnsError> {
        self.ip(Some(site), &format!("addr add {addr}/24 dev eth0"))?;
        self.ip(Some(site), "link set eth0 up")?;
        self.ip(Some(site), &format!("route add default via {gateway}"))
    }

    /// Starts `program args…` inside `site`'s namespace as `label`, its stderr written to
    /// `dir/<label>.stderr` and its stdout read line by line into [`NsProc::line`].
    pub fn spawn(
        &self,
        site: Site,
        label: &str,
        dir: &Path,
        program: &Path,
        args: &[String],
    ) -> Result<NsProc, NetnsError> {
        let stderr_path = dir.join(format!("{label}.stderr"));
        let stderr =
            std::fs::File::create(&stderr_path).map_err(|error| NetnsError::Io { path: stderr_path.clone(), error })?;
        let mut child = self
            .command(site, program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|error| NetnsError::Spawn { what: label.into(), error })?;
        let (tx, lines) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { return };
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        let stdin = child.stdin.take();
        Ok(NsProc { label: label.into(), child, stdin, lines, stderr_path })
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            delete_namespace(&self.ip, ns);
        }
    }
}

/// A process running in a namespace; killed when dropped.
#[derive(Debug)]
pub struct NsProc {
    label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr_path: PathBuf,
}

impl NsProc {
    /// Its label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The next line it printed, waiting until `deadline` at most; `None` at the deadline or
    /// once it has closed its stdout.
    pub fn line(&self, deadline: Instant) -> Option<String> {
        let wait = deadline.saturating_duration_since(Instant::now());
        self.lines.recv_timeout(wait).ok()
    }

    /// A line it printed already, if any.
    pub fn try_line(&self) -> Option<String> {
        self.lines.try_recv().ok()
    }

    /// Writes `line` to its stdin.
    pub fn say(&mut self, line: &str) {
        if let Some(stdin) = &mut self.stdin {
            let _ = writeln!(stdin, "{line}").and_then(|()| stdin.flush());
        }
    }

    /// Closes its stdin.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits up to `limit` for it to exit; kills it after that.
    pub fn finish(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last lines of its stderr, for a diagnosis.
    pub fn stderr_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for NsProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory under the system's temporary one, removed when dropped.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Makes (afresh) `<tmp>/<name>`.
    pub fn new(name: &str) -> Result<ScratchDir, NetnsError> {
        let path = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|error| NetnsError::Io { path: path.clone(), error })?;
        Ok(ScratchDir(path))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `text` to `name` inside it, returning the file's path.
    pub fn write(&self, name: &str, text: &str) -> Result<PathBuf, NetnsError> {
        let path = self.0.join(name);
        std::fs::write(&path, text).map_err(|error| NetnsError::Io { path: path.clone(), error })?;
        Ok(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_namespaces_named_by_a_process_of_ours_are_claimed() {
        assert_eq!(owner("shoal1234-0-pub"), Some(1234));
        assert_eq!(owner("shoal1234-probe"), Some(1234));
        assert_eq!(owner("shoalx-0-pub"), None);
        assert_eq!(owner("rmnat-pub"), None);
        assert_eq!(owner("shoal1234"), None);
    }
}
