//! Daemons the integration tests start as real processes: the `shoal-mesh-node` relay.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use shoal_protocol::identity::to_hex;
use shoal_protocol::{Identity, NodeId, Roles, SignedTicket, TicketBody, TicketKind, UnixTime};

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A relay permit for `node`, signed by `control`, valid for ten minutes.
pub fn permit(control: &Identity, node: &Identity, roles: Roles) -> SignedTicket {
    TicketBody::new(TicketKind::RelayPermit, node.public_key(), roles, UnixTime(unix_now()), 600).sign(control)
}

/// Builds `bins` (package, binary) with the running program's profile, so a test or a
/// benchmark never runs a stale one, and returns the profile directory they are in.
pub fn build_binaries(bins: &[(&str, &str)]) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // Test binaries live in the profile's `deps`, binaries in the profile directory itself.
    if dir.ends_with("deps") {
        dir.pop();
    }
    let mut build = Command::new(env!("CARGO"));
    build.args(["build", "-q"]);
    for (package, bin) in bins {
        build.args(["-p", package, "--bin", bin]);
    }
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            build.arg("--release");
        }
        Some(profile) => {
            build.args(["--profile", profile]);
        }
    }
    match build.stdin(Stdio::null()).status() {
        Ok(s) if s.success() => Ok(dir),
        Ok(s) => Err(format!("{build:?}: {s}")),
        Err(e) => Err(format!("{build:?}: {e}")),
    }
}

/// The relay binary, built first (see [`build_binaries`]).
///
/// # Panics
/// If the build fails.
#[allow(clippy::panic)]
pub fn relay_binary() -> PathBuf {
    match build_binaries(&[("shoal-mesh", "shoal-mesh-node")]) {
        Ok(dir) => dir.join("shoal-mesh-node"),
        Err(e) => panic!("building shoal-mesh-node failed: {e}"),
    }
}

/// A running relay process; killed when dropped.
#[derive(Debug)]
pub struct RelayProc {
    child: Child,
    /// Its node id.
    pub id: NodeId,
    /// Its mesh address.
    pub addr: SocketAddr,
    /// The line it printed when ready.
    pub ready: String,
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a relay with identity seed `seed` in `dir`, trusting `control`'s tickets and holding a
/// permit from it, with `extra` appended to its config file; waits for its ready line.
pub fn start_relay(dir: &Path, control: &Identity, seed: u8, extra: &str) -> RelayProc {
    let identity = Identity::from_seed([seed; 32]);
    let permit = to_hex(&permit(control, &identity, Roles::RELAY).encode());
    spawn_relay(
        dir,
        seed,
        &format!("control_public_key = \"{}\"\npermit = \"{permit}\"\n{extra}", control.public_key()),
    )
}

/// Starts a relay with identity seed `seed` in `dir` that holds no permit of its own: it
/// registers with the control server at `server` (pinned by `fingerprint`), which issues one.
pub fn start_registered_relay(
    dir: &Path,
    control: &Identity,
    seed: u8,
    server: SocketAddr,
    fingerprint: &[u8; 32],
) -> RelayProc {
    let body = format!(
        "control_public_key = \"{}\"\n[control]\naddr = \"{server}\"\ntrust = \"sha256:{}\"\n",
        control.public_key(),
        to_hex(fingerprint)
    );
    spawn_relay(dir, seed, &body)
}

fn spawn_relay(dir: &Path, seed: u8, body: &str) -> RelayProc {
    let create = std::fs::create_dir_all(dir);
    assert!(create.is_ok(), "cannot create {}", dir.display());
    let identity = Identity::from_seed([seed; 32]);
    let key = format!("relay-{seed}.key");
    let written = std::fs::write(dir.join(&key), to_hex(identity.seed()));
    assert!(written.is_ok(), "cannot write the relay key");
    let config =
        format!("listen = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\nworkers = 1\nkey_file = \"{key}\"\n{body}");
    let path = dir.join(format!("relay-{seed}.toml"));
    let written = std::fs::write(&path, config);
    assert!(written.is_ok(), "cannot write the relay config");
    let child = Command::new(relay_binary())
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else { panic!("cannot start shoal-mesh-node") };
    let mut ready = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut ready);
    }
    assert!(ready.starts_with("shoal-mesh-node ready"), "relay did not start: {ready}");
    let field = |k: &str| ready.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap_or_default().to_string();
    let (id, addr) = (field("node=").parse(), field("mesh=").parse());
    let (Ok(id), Ok(addr)) = (id, addr) else { panic!("unreadable ready line: {ready}") };
    RelayProc { child, id, addr, ready }
}

/// A running hosting server process; killed when dropped.
#[derive(Debug)]
pub struct HostingProc {
    child: Child,
    /// Its node id.
    pub id: NodeId,
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// Its certificate's fingerprint.
    pub cert: [u8; 32],
}

impl Drop for HostingProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `shoal-hosting-server` with identity seed `seed` in `dir`, serving zone `zone` of
/// the content `content`, trusting `control`'s tickets and registering with the control
/// server at `server` (pinned by `fingerprint`), with `extra` appended to its config; waits
/// for its ready line.
pub fn start_hosting(
    dir: &Path,
    control: &Identity,
    seed: u8,
    content: &str,
    zone: &str,
    (server, fingerprint): (SocketAddr, &[u8; 32]),
    extra: &str,
) -> HostingProc {
    let create = std::fs::create_dir_all(dir);
    assert!(create.is_ok(), "cannot create {}", dir.display());
    let identity = Identity::from_seed([seed; 32]);
    let key = format!("hosting-{seed}.key");
    let written = std::fs::write(dir.join(&key), to_hex(identity.seed()));
    assert!(written.is_ok(), "cannot write the hosting key");
    let written = std::fs::write(dir.join(format!("content-{seed}.toml")), content);
    assert!(written.is_ok(), "cannot write the content");
    let config = format!(
        "listen = \"127.0.0.1:0\"\nkey_file = \"{key}\"\ncontrol_public_key = \"{}\"\ncontent = \"content-{seed}.toml\"\n\
         zone = \"{zone}\"\n{extra}\n[control]\naddr = \"{server}\"\ntrust = \"sha256:{}\"\n",
        control.public_key(),
        to_hex(fingerprint)
    );
    let path = dir.join(format!("hosting-{seed}.toml"));
    let written = std::fs::write(&path, config);
    assert!(written.is_ok(), "cannot write the hosting config");
    let bin = match build_binaries(&[("shoal-hosting", "shoal-hosting-server")]) {
        Ok(dir) => dir.join("shoal-hosting-server"),
        Err(e) => panic!("building shoal-hosting-server failed: {e}"),
    };
    let child =
        Command::new(bin).args(["run", "--config"]).arg(&path).stdout(Stdio::piped()).stderr(Stdio::null()).spawn();
    let Ok(mut child) = child else { panic!("cannot start shoal-hosting-server") };
    let mut ready = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut ready);
    }
    assert!(ready.starts_with("shoal-hosting-server ready"), "hosting server did not start: {ready}");
    let field = |k: &str| ready.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap_or_default().to_string();
    let cert = shoal_protocol::identity::parse_hex::<32>(field("cert=sha256:").as_str());
    let (id, addr) = (field("node=").parse(), field("quic=").parse());
    let (Ok(id), Ok(addr), Ok(cert)) = (id, addr, cert) else { panic!("unreadable ready line: {ready}") };
    HostingProc { child, id, addr, cert }
}
