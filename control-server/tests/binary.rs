//! The `shoal-control-server` binary as an operator runs it: create an account, print the
//! fingerprint, run until SIGTERM with health and metrics on HTTP, and refuse a bad config
//! with a message naming the problem.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

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
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
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
    // SIGTERM: a clean stop.
    terminate(child.id());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
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
