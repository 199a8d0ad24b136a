//! The `shoal-hosting-server` binary as an operator runs it: prints its node id, runs the demo
//! zone until SIGTERM with health and metrics on HTTP, refuses a forged hello with its reason
//! and counts it, and refuses a bad config with exit code 2 and a message naming the field.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shoal_link::{ControlLink, Trust, WORLD_ALPN};
use shoal_protocol::control::KeyProof;
use shoal_protocol::identity::parse_hex;
use shoal_protocol::world::{ClientToHost, HostRefusal, HostToClient, WORLD_ACCOUNT};
use shoal_protocol::{Identity, Roles, TicketBody, TicketKind, UnixTime};

const BIN: &str = env!("CARGO_BIN_EXE_shoal-hosting-server");
const CONTROL_KEY: [u8; 32] = [77; 32];

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-hosting-bin-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("hosting.toml");
    let control = Identity::from_seed(CONTROL_KEY).public_key();
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\nkey_file = \"hosting.key\"\n\
             control_public_key = \"{control}\"\n{extra}"
        ),
    )
    .unwrap();
    path
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn runs_the_demo_zone_serves_health_and_metrics_refuses_a_forged_hello_and_stops_on_sigterm() {
    let dir = dir("run");
    let cfg = config(&dir, "");
    let out = Command::new(BIN).args(["keygen", "--out"]).arg(dir.join("hosting.key")).output().unwrap();
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(printed.contains("node_id = \""), "{printed}");
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("shoal-hosting-server ready"), "{line}");
    let field = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap().to_string();
    assert!(printed.contains(&field("node=")), "the key file's node id is the one running");
    let http = field("metrics=");
    assert!(http_get(&http, "/healthz").ends_with("ok\n"));
    let metrics = http_get(&http, "/metrics");
    assert!(metrics.contains("shoal_hosting_clients 0"), "{metrics}");
    let entities: usize = metrics
        .lines()
        .find_map(|l| l.strip_prefix("shoal_hosting_entities "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no entity count in {metrics}"));
    assert!(entities > 300, "the demo zone has {entities} entities");

    // A hello whose ticket the control key did not sign.
    let quic: SocketAddr = field("quic=").parse().unwrap();
    let cert: [u8; 32] = parse_hex(field("cert=sha256:").as_str()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let answer = rt.block_on(async {
        let forger = Identity::from_seed([9; 32]);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let session =
            TicketBody::new(TicketKind::Session, forger.public_key(), Roles::CLIENT, UnixTime(now.as_secs()), 60)
                .sign(&forger)
                .encode()
                .to_vec();
        let proof = KeyProof::new(&forger, WORLD_ACCOUNT, now.as_millis() as u64, &cert);
        let mut link = ControlLink::connect_with(quic, &Trust::Pinned(cert), WORLD_ALPN).await.unwrap();
        link.send(&ClientToHost::Hello { session, proof }).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), link.recv::<HostToClient>()).await.unwrap().unwrap()
    });
    assert_eq!(answer, HostToClient::Closed(HostRefusal::BadTicket));
    // Counted: /metrics shows it once the server's turn that refused it has published.
    let counted = "shoal_hosting_refused_total{reason=\"bad_ticket\"} 1";
    let mut metrics = http_get(&http, "/metrics");
    for _ in 0..50 {
        if metrics.contains(counted) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        metrics = http_get(&http, "/metrics");
    }
    assert!(metrics.contains(counted), "{metrics}");

    let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_config_is_refused_with_exit_code_2_naming_the_field() {
    let dir = dir("bad");
    for (extra, field) in [
        ("zone = \"moon\"", "zone"),
        ("[interest]\nradius = 100.0\nleave_radius = 50.0\nbudget = 1000", "interest"),
        ("content = \"nowhere.toml\"", "content"),
    ] {
        let cfg = config(&dir, extra);
        let out = Command::new(BIN).args(["run", "--config"]).arg(&cfg).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{extra}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "{extra}: {err}");
    }
    // A content file with a mistake: the line and the field.
    std::fs::write(dir.join("bad-content.toml"), "[[zone]]\nname = \"z\"\nmin = [0.0, 0.0]\nmax = [-5.0, 10.0]\n")
        .unwrap();
    let cfg = config(&dir, "content = \"bad-content.toml\"");
    let out = Command::new(BIN).args(["run", "--config"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 4") && err.contains("zone[0].max"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
