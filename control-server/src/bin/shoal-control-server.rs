//! `shoal-control-server`: the control server daemon, and the account and fingerprint tools an
//! operator needs around it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Deserialize;
use shoal_control::auth::{HashCost, StoreAccounts};
use shoal_control::core::CoreConfig;
use shoal_control::interest::InterestConfig;
use shoal_control::limit::RateLimit;
use shoal_control::server::{self, ServerConfig};
use shoal_control::store::Store;
use shoal_control::tls::ServerIdentity;
use shoal_control::watch::WatchConfig;
use shoal_link::daemon::{load_or_create_key, shutdown_signal};
use shoal_protocol::NodeId;
use shoal_protocol::control::RelayInfo;
use shoal_protocol::identity::{parse_hex, to_hex};
use shoal_protocol::profile::ProfileConfig;

#[derive(Parser, Debug)]
#[command(name = "shoal-control-server", version, about = "Shoal control server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server from a TOML config file until SIGINT or SIGTERM.
    Run {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Create an account; the password is read from the SHOAL_PASSWORD environment variable.
    CreateAccount {
        /// The config file (for the database).
        #[arg(long, short)]
        config: PathBuf,
        /// The account name.
        #[arg(long)]
        account: String,
    },
    /// Print the certificate fingerprint clients pin, and the control public key (creating
    /// both on first use).
    Fingerprint {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// The config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlFile {
    /// QUIC listen address.
    listen: SocketAddr,
    /// HTTP (health, metrics, live state) listen address.
    http: SocketAddr,
    /// Where the certificate, its key and the default SQLite database live.
    data_dir: PathBuf,
    /// `sqlite:…` or `postgres://…`; default a SQLite file in `data_dir`.
    #[serde(default)]
    database: Option<String>,
    /// The control key (created on first start).
    key_file: PathBuf,
    /// Days of report history kept.
    #[serde(default = "default_retention_days")]
    retention_days: u64,
    /// The fastest a character may move, units per second.
    #[serde(default = "default_max_speed")]
    max_speed: f32,
    /// Introductions.
    #[serde(default)]
    interest: Option<InterestFile>,
    /// Watching beyond the neighbours through relay fan-out; off without it.
    #[serde(default)]
    watch: Option<WatchFile>,
    /// Relays clients may use.
    #[serde(default)]
    relays: Vec<RelayFile>,
    /// Hosting servers that may register (each announces its zone and address itself).
    #[serde(default)]
    hosting: Vec<HostingFile>,
    /// How fast each connection may send.
    #[serde(default)]
    limits: Option<LimitsFile>,
    /// VCs both sides of an introduction open; none leaves the choice to the clients.
    #[serde(default)]
    profiles: Vec<ProfileFile>,
}

/// One VC an introduction asks for: its id and its profile, written as a game writes one.
///
/// ```toml
/// [[profiles]]
/// vc = 1
/// kind = "realtime"
/// ```
#[derive(Debug, Deserialize)]
struct ProfileFile {
    vc: u32,
    #[serde(flatten)]
    profile: ProfileConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    /// Sustained messages per second per connection.
    messages_per_s: f64,
    /// Messages a connection may send back to back.
    burst: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InterestFile {
    enter_radius: f32,
    leave_radius: f32,
    max_neighbours: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchFile {
    /// Relay fan-out is on unless this says otherwise.
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default = "default_view_radius")]
    view_radius: f32,
    #[serde(default = "default_watch_leave_radius")]
    leave_radius: f32,
    #[serde(default = "default_max_watched")]
    max_watched: usize,
    /// Seconds a watcher's subscription lasts (renewed when a third is left).
    #[serde(default = "default_subscription_secs")]
    subscription_secs: u64,
}

fn yes() -> bool {
    true
}

fn default_view_radius() -> f32 {
    WatchConfig::default().view_radius
}

fn default_watch_leave_radius() -> f32 {
    WatchConfig::default().leave_radius
}

fn default_max_watched() -> usize {
    WatchConfig::default().max_watched
}

fn default_subscription_secs() -> u64 {
    60
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayFile {
    /// Node id, 16 hex digits.
    node: String,
    addr: SocketAddr,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostingFile {
    /// Node id, 16 hex digits (`shoal-hosting-server id` prints it).
    node: String,
}

impl ControlFile {
    /// The core's configuration and the connections' rate limit, checked.
    fn core(&self) -> anyhow::Result<(CoreConfig, RateLimit)> {
        let relays = self
            .relays
            .iter()
            .map(|r| {
                let id = parse_hex::<8>(&r.node).with_context(|| format!("relay node id {}", r.node))?;
                Ok(RelayInfo { id: NodeId(id), addr: r.addr, rtt_us: 0 })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let hosting = self
            .hosting
            .iter()
            .map(|h| {
                let id = parse_hex::<8>(&h.node).with_context(|| format!("hosting node id {}", h.node))?;
                Ok(NodeId(id))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let interest = self.interest.as_ref().map_or_else(InterestConfig::default, |i| InterestConfig {
            enter_radius: i.enter_radius,
            leave_radius: i.leave_radius,
            max_neighbours: i.max_neighbours,
        });
        interest.validate().context("[interest]")?;
        // Without a [watch] section, watching is on with its defaults.
        let watch = match &self.watch {
            None => Some(WatchConfig::default()),
            Some(w) if !w.enabled => None,
            Some(w) => Some(WatchConfig {
                view_radius: w.view_radius,
                leave_radius: w.leave_radius,
                max_watched: w.max_watched,
            }),
        };
        if let Some(w) = &watch {
            w.validate().context("[watch]")?;
        }
        let subscription_ttl = Duration::from_secs(self.watch.as_ref().map_or(60, |w| w.subscription_secs));
        anyhow::ensure!(subscription_ttl >= Duration::from_secs(3), "[watch]: subscription_secs must be at least 3");
        let rate_limit = self
            .limits
            .as_ref()
            .map_or_else(RateLimit::default, |l| RateLimit { per_s: l.messages_per_s, burst: l.burst });
        rate_limit.validate().map_err(anyhow::Error::msg).context("[limits]")?;
        let mut profiles: Vec<(u32, ProfileConfig)> = Vec::new();
        for p in &self.profiles {
            p.profile.check().with_context(|| format!("[[profiles]] vc = {}", p.vc))?;
            anyhow::ensure!(profiles.iter().all(|(vc, _)| *vc != p.vc), "[[profiles]]: VC {} is listed twice", p.vc);
            profiles.push((p.vc, p.profile.clone()));
        }
        let core = CoreConfig {
            relays,
            hosting,
            interest,
            profiles,
            max_speed: self.max_speed,
            watch,
            subscription_ttl,
            ..CoreConfig::default()
        };
        Ok((core, rate_limit))
    }
}

fn default_retention_days() -> u64 {
    30
}

fn default_max_speed() -> f32 {
    20.0
}

struct Settings {
    file: ControlFile,
    base: PathBuf,
}

impl Settings {
    fn load(path: &Path) -> anyhow::Result<Settings> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: ControlFile = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Settings { file, base: path.parent().map(PathBuf::from).unwrap_or_default() })
    }

    fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() { p.to_path_buf() } else { self.base.join(p) }
    }

    fn database(&self) -> String {
        self.file
            .database
            .clone()
            .unwrap_or_else(|| format!("sqlite:{}", self.path(&self.file.data_dir).join("control.db").display()))
    }
}

fn main() -> ExitCode {
    // With no RUST_LOG, everything at info: sign-ins, resumptions, sign-outs, refusals with
    // their reasons, relay registrations, and warnings for cut-off players.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match Cli::parse().command {
        Command::Run { config } => run(&config),
        Command::CreateAccount { config, account } => create_account(&config, &account),
        Command::Fingerprint { config } => fingerprint(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-control-server: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn fingerprint(config: &Path) -> anyhow::Result<()> {
    let s = Settings::load(config)?;
    let data = s.path(&s.file.data_dir);
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let tls = ServerIdentity::load_or_create(&data)?;
    let key = load_or_create_key(&s.path(&s.file.key_file))?;
    println!("fingerprint = \"{}\"\ncontrol_public_key = \"{}\"", to_hex(&tls.fingerprint()), key.public_key());
    Ok(())
}

fn create_account(config: &Path, account: &str) -> anyhow::Result<()> {
    let s = Settings::load(config)?;
    let password = std::env::var("SHOAL_PASSWORD").context("set SHOAL_PASSWORD to the new account's password")?;
    let data = s.path(&s.file.data_dir);
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    runtime()?.block_on(async {
        let store = Store::open(&s.database()).await.context("opening the database")?;
        let accounts = StoreAccounts::new(store.clone(), HashCost::default())?;
        let created = accounts.create(account, &password, unix_ms()).await?;
        store.close().await;
        anyhow::ensure!(created, "account {account} already exists");
        println!("created {account}");
        Ok(())
    })
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn run(config: &Path) -> anyhow::Result<()> {
    let s = Settings::load(config)?;
    let data = s.path(&s.file.data_dir);
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let identity = load_or_create_key(&s.path(&s.file.key_file))?;
    let tls = ServerIdentity::load_or_create(&data)?;
    let (core, rate_limit) = s.file.core()?;
    runtime()?.block_on(async {
        let store = Store::open(&s.database()).await.context("opening the database")?;
        let accounts = StoreAccounts::new(store.clone(), HashCost::default())?;
        let fingerprint = tls.fingerprint();
        let cfg = ServerConfig {
            listen: s.file.listen,
            identity: identity.clone(),
            tls,
            core,
            retention: Duration::from_secs(s.file.retention_days * 86_400),
            rate_limit,
        };
        let server = server::start(cfg, store.clone(), Arc::new(accounts))?;
        let http = tokio::net::TcpListener::bind(s.file.http)
            .await
            .with_context(|| format!("cannot listen on {}", s.file.http))?;
        let http_addr = http.local_addr()?;
        let (stop_http, stop_rx) = tokio::sync::watch::channel(false);
        let http_task = tokio::spawn(shoal_control::http::serve(http, server.client(), stop_rx));
        let stop = shutdown_signal();
        println!(
            "shoal-control-server ready quic={} http={} fingerprint={} control_public_key={}",
            server.addr,
            http_addr,
            to_hex(&fingerprint),
            identity.public_key()
        );
        stop.await;
        tracing::info!("shutting down");
        let _ = stop_http.send(true);
        server.shutdown().await;
        if let Err(e) = http_task.await {
            tracing::warn!(addr = %http_addr, "the HTTP server ended abnormally: {e}");
        }
        store.close().await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const BASE: &str = "listen = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\ndata_dir = \"d\"\nkey_file = \"k\"\n";

    fn parse(extra: &str) -> anyhow::Result<(CoreConfig, RateLimit)> {
        let file: ControlFile = toml::from_str(&format!("{BASE}{extra}"))?;
        file.core()
    }

    #[test]
    fn introductions_carry_the_profiles_the_config_names() {
        let (core, limit) = parse(
            "[[profiles]]\nvc = 1\nkind = \"realtime\"\nredundancy = true\n\n\
             [[profiles]]\nvc = 7\nkind = \"custom\"\ndelivery = \"reliable_unordered\"\nmax_latency_ms = 90\n\n\
             [limits]\nmessages_per_s = 5\nburst = 10\n",
        )
        .unwrap();
        assert_eq!(core.profiles.len(), 2);
        assert_eq!(core.profiles[0], (1, ProfileConfig::Realtime { redundancy: true }));
        assert_eq!(core.profiles[1].0, 7);
        assert_eq!(limit, RateLimit { per_s: 5.0, burst: 10.0 });
        let (core, limit) = parse("").unwrap();
        assert!(core.profiles.is_empty());
        assert_eq!(limit, RateLimit::default());
    }

    #[test]
    fn the_readme_control_toml_is_a_config_that_runs() {
        let readme = include_str!("../../../README.md");
        let (_, after) = readme.split_once("`control-data/control.toml`").unwrap();
        let block = after.split("```toml\n").nth(1).and_then(|b| b.split("```").next()).unwrap();
        // The relay's node id is a placeholder there.
        let block = block.replace("<16 hex digits>", "0102030405060708");
        let file: ControlFile = toml::from_str(&block).unwrap_or_else(|e| panic!("{e}\n{block}"));
        let (core, limit) = file.core().unwrap();
        assert_eq!((core.relays.len(), core.profiles.len()), (1, 2));
        assert_eq!(core.watch, Some(WatchConfig::default()));
        assert_eq!(limit, RateLimit { per_s: 20.0, burst: 40.0 });
    }

    #[test]
    fn bad_profiles_and_limits_are_refused_with_their_place() {
        let e = parse("[[profiles]]\nvc = 2\nkind = \"bulk\"\nmax_paths = 9\n").unwrap_err();
        assert!(format!("{e:#}").contains("vc = 2"), "{e:#}");
        let e = parse("[[profiles]]\nvc = 2\nkind = \"voice\"\n[[profiles]]\nvc = 2\nkind = \"voice\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("twice"), "{e:#}");
        assert!(toml::from_str::<ControlFile>(&format!("{BASE}[[profiles]]\nvc = 2\nkind = \"loud\"\n")).is_err());
        let misspelled = format!("{BASE}[[profiles]]\nvc = 2\nkind = \"realtime\"\nredundncy = true\n");
        assert!(toml::from_str::<ControlFile>(&misspelled).is_err());
        let e = parse("[limits]\nmessages_per_s = 0\nburst = 10\n").unwrap_err();
        assert!(format!("{e:#}").contains("[limits]"), "{e:#}");
        let e = parse("[watch]\nview_radius = 150.0\nleave_radius = 100.0\nmax_watched = 8\n").unwrap_err();
        assert!(format!("{e:#}").contains("[watch]"), "{e:#}");
        assert_eq!(parse("").unwrap().0.watch, Some(WatchConfig::default()));
        assert!(parse("[watch]\nenabled = false\n").unwrap().0.watch.is_none());
        let narrow = parse("[watch]\nview_radius = 80.0\nleave_radius = 90.0\n").unwrap().0.watch.unwrap();
        assert_eq!((narrow.view_radius, narrow.max_watched), (80.0, 256));
    }
}
