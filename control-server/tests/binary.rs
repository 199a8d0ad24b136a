//! The `shoal-control-server` binary as an operator runs it: create an account, print the
//! fingerprint, run until SIGTERM with health and metrics on HTTP, log sign-ins, sign-outs and
//! refusals at the default level, and refuse a bad config with a message naming the problem.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shoal_link::{ControlLink, Trust};
use shoal_protocol::Identity;
use shoal_protocol::control::{ClientToControl, ControlToClient, KeyProof, Refusal};
use shoal_protocol::identity::parse_hex;
use tokio::time::timeout;

const BIN: &str = env!("CARGO_BIN_EXE_shoal-control-server");

fn config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("control.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\ndata_dir = \"data\"\nkey_file = \"control.key\"\n\
             [[relays]]\nnode = \"0102030405060708\"\naddr = \"127.0.0.1:7000\"\n{extra}"
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
fn runs_serves_health_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("shoal-control-bin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config(&dir, "");
    let out = Command::new(BIN)
        .args(["create-account", "--account", "ana", "--config"])
        .arg(&cfg)
        .env("SHOAL_PASSWORD", "pw")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A second time: the name is taken.
    let out = Command::new(BIN)
        .args(["create-account", "--account", "ana", "--config"])
        .arg(&cfg)
        .env("SHOAL_PASSWORD", "pw")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = Command::new(BIN).args(["fingerprint", "--config"]).arg(&cfg).output().unwrap();
    let printed = String::from_utf8(out.stdout).unwrap();
    let fingerprint = printed.lines().next().unwrap().split('"').nth(1).unwrap().to_string();
    assert_eq!(fingerprint.len(), 64);

    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("shoal-control-server ready"), "{line}");
    let field = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap().to_string();
    assert_eq!(field("fingerprint="), fingerprint, "the printed fingerprint is the one served");
    let http = field("http=");
    assert!(http_get(&http, "/healthz").ends_with("ok\n"));
    assert!(http_get(&http, "/metrics").contains("shoal_control_players 0"));
    assert!(http_get(&http, "/api/state").contains("\"0102030405060708\""));
    let quic: SocketAddr = field("quic=").parse().unwrap();
    let fp: [u8; 32] = parse_hex(&fingerprint).unwrap();
    let player = Identity::from_seed([5; 32]);
    sign_in_and_out(quic, fp, &player);
    // SIGTERM: a clean stop.
    terminate(child.id());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // With no RUST_LOG, the operator still sees who came, who was refused and why, and who
    // left, with their account, node and address, and refusals in words.
    let mut log = String::new();
    child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    let node = player.node_id().to_string();
    let line = |what: &str| log.lines().find(|l| l.contains(what)).unwrap_or_else(|| panic!("no {what:?} in {log}"));
    let refused = line("sign-in refused");
    assert!(refused.contains("wrong account or password") && refused.contains("account=\"ana\""), "{refused}");
    assert!(refused.contains("addr=127.0.0.1:"), "{refused}");
    for what in ["signed in", "signed out"] {
        let l = line(what);
        assert!(l.contains("INFO") && l.contains(&node) && l.contains("account=\"ana\""), "{l}");
    }
    assert!(!log.contains("BadCredentials"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Signs `player` in as ana with a wrong password, then the right one, then out.
fn sign_in_and_out(server: SocketAddr, fingerprint: [u8; 32], player: &Identity) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut link = ControlLink::connect(server, &Trust::Pinned(fingerprint)).await.unwrap();
        let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        for password in ["nope", "pw"] {
            let proof = KeyProof::new(player, "ana", unix_ms, &fingerprint);
            let msg = ClientToControl::SignIn { account: "ana".into(), password: password.into(), proof };
            link.send(&msg).await.unwrap();
            let answer: ControlToClient = timeout(Duration::from_secs(10), link.recv()).await.unwrap().unwrap();
            match password {
                "nope" => assert_eq!(answer, ControlToClient::Refused(Refusal::BadCredentials)),
                _ => assert!(matches!(answer, ControlToClient::Welcome { .. }), "{answer:?}"),
            }
        }
        link.send(&ClientToControl::SignOut).await.unwrap();
        // The server closes the connection once it has read the goodbye.
        while let Ok(Ok(_)) = timeout(Duration::from_secs(10), link.recv::<ControlToClient>()).await {}
    });
}

fn terminate(pid: u32) {
    let ok = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(ok.success());
}

#[test]
fn a_bad_config_is_refused_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("shoal-control-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config(&dir, "[interest]\nenter_radius = 50.0\nleave_radius = 10.0\nmax_neighbours = 8\n");
    let out = Command::new(BIN).args(["run", "--config"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[interest]") && err.contains("leave"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
