//! `shoal-control-bench`: the control server under load, measured from outside its process.
//!
//! Three figures the control plane's targets are stated in: the interest tick for 100k
//! synthetic players (in this process, one core); the reports per second one
//! `shoal-control-server` process takes and persists (SQLite, and PostgreSQL when a URL is
//! given); and how long a sign-in takes while that load runs.
//!
//! Per database: the accounts are created first (a cheap argon2 cost for the load clients, the
//! default cost for the sign-in probes, since that is what a real sign-in pays), and the
//! [`Store`] is timed on its own with the rows and characters the load will produce. Then the
//! `shoal-control-server` binary found beside this one starts on a fresh data directory (for
//! PostgreSQL, on the given database; earlier rows there are left alone and only deltas count).
//! Sign-in probes on the idle server come first. Then `--clients` QUIC clients sign in, each
//! with its own account and key, and report at `--rate` reports/s in all (static plausible
//! positions, three links, a 100-byte character). After a warm-up, a window of `--seconds`
//! counts the reports the server took (its `/metrics`) and the rows that reached the database
//! (`Store::report_count`), while a fresh connection signs in every 100 ms, timed from connect
//! to `Welcome`. The clients then pause until the server has taken and persisted everything.
//! An optional unthrottled phase (`--flood-seconds`: clients write back-to-back) shows what
//! happens past the ceiling: the server's per-connection rate limit, set to twice each load
//! client's share of the offered rate (a load client stands in for many players), slows the
//! clients, and the server's peak memory and the sign-in latency show whether it held. Last the server gets SIGTERM, and the rows it left in the
//! database are checked against the reports it said it took.
//!
//! Progress goes to stderr; stdout gets one JSON line at the end.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail, ensure};
use clap::Parser;
use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use shoal_control::auth::{HashCost, hash_password};
use shoal_control::interest::{Interest, InterestConfig};
use shoal_control::server::TICK;
use shoal_control::store::{Character, ReportRow, Store};
use shoal_control::synthetic::{Layout, positions, walk};
use shoal_link::{ControlLink, FrameReader, Trust, write_message};
use shoal_protocol::codec::encode;
use shoal_protocol::control::{ClientToControl, ControlToClient, KeyProof, LinkReport, Report};
use shoal_protocol::identity::parse_hex;
use shoal_protocol::{Identity, NodeId};

#[derive(Parser, Debug)]
#[command(
    name = "shoal-control-bench",
    about = "Load tool for shoal-control-server: interest tick, reports/s into the database, sign-in latency under load"
)]
struct Args {
    /// Seconds of the measured window at the offered rate.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Concurrent QUIC clients, each signed in with its own account and key.
    #[arg(long, default_value_t = 128)]
    clients: usize,
    /// Reports per second offered in the measured window, all clients together.
    #[arg(long, default_value_t = 25_000)]
    rate: u64,
    /// Seconds of an unthrottled phase after the window (clients write back-to-back); 0 skips it.
    #[arg(long, default_value_t = 0.0)]
    flood_seconds: f64,
    /// PostgreSQL URL for a second run (default: the SHOAL_TEST_POSTGRES_URL environment variable).
    #[arg(long)]
    postgres: Option<String>,
    /// Messages per second each connection may send (the server's `[limits]`); default twice
    /// each load client's share of `--rate`, and at least the server's default of 20.
    #[arg(long)]
    client_limit: Option<f64>,
    /// A short run for a smoke check: at most a 2 s window, 1 s warm-up and 1 s flood, and 32
    /// clients; 10 idle sign-in probes; 3 neighbour ticks.
    #[arg(long)]
    quick: bool,
}

/// The run's durations and sizes, after `--quick`.
#[derive(Debug, Clone, Copy)]
struct Plan {
    seconds: f64,
    warmup: f64,
    flood: f64,
    clients: usize,
    rate: u64,
    /// Messages per second each connection may send.
    client_limit: f64,
    idle_probes: usize,
    ticks: usize,
}

impl Plan {
    fn new(a: &Args) -> anyhow::Result<Plan> {
        ensure!(a.seconds > 0.0 && a.seconds.is_finite(), "--seconds must be positive");
        ensure!(a.flood_seconds >= 0.0 && a.flood_seconds.is_finite(), "--flood-seconds must be 0 or more");
        ensure!(a.clients > 0, "--clients must be at least 1");
        ensure!(a.rate > 0, "--rate must be at least 1");
        ensure!(a.client_limit.is_none_or(|l| l.is_finite() && l > 0.0), "--client-limit must be positive");
        let limit =
            |clients: usize| a.client_limit.unwrap_or_else(|| (2.0 * a.rate as f64 / clients as f64).max(20.0).ceil());
        Ok(if a.quick {
            Plan {
                seconds: a.seconds.min(2.0),
                warmup: 1.0,
                flood: a.flood_seconds.min(1.0),
                clients: a.clients.min(32),
                rate: a.rate,
                client_limit: limit(a.clients.min(32)),
                idle_probes: 10,
                ticks: 3,
            }
        } else {
            Plan {
                seconds: a.seconds,
                warmup: 3.0,
                flood: a.flood_seconds,
                clients: a.clients,
                rate: a.rate,
                client_limit: limit(a.clients),
                idle_probes: 30,
                ticks: 9,
            }
        })
    }
}

/// Players in the neighbour-tick measurement.
const TICK_PLAYERS: usize = 100_000;
/// Time between sign-in probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// A probe that has not been welcomed by then failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accounts the probes cycle through (each probe signs in with a fresh key).
const PROBE_ACCOUNTS: usize = 4;
/// Load clients' argon2 cost: their sign-in is set-up, not what is measured.
const CHEAP: HashCost = HashCost { memory_kib: 256, iterations: 1 };
/// How often a paced client wakes to send what is due.
const PACE_STEP: Duration = Duration::from_millis(10);
/// Longest wait for the server to work through what the clients sent.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);
/// Rows that have not moved for this long are not coming.
const STALL_LIMIT: Duration = Duration::from_secs(20);
/// A paused client says it is alive this often (the server drops clients silent for 15 s).
const KEEPALIVE: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-control-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let plan = Plan::new(&args)?;
    let server_bin = server_binary()?;
    let postgres =
        args.postgres.clone().or_else(|| std::env::var("SHOAL_TEST_POSTGRES_URL").ok().filter(|u| !u.is_empty()));

    eprintln!("neighbour tick: {TICK_PLAYERS} players, {} ticks per layout", plan.ticks);
    let uniform = neighbour_tick(TICK_PLAYERS, Layout::Uniform, plan.ticks)?;
    let clustered = neighbour_tick(TICK_PLAYERS, Layout::Clustered, plan.ticks)?;
    eprintln!(
        "  uniform: median {:.2} ms (max {:.2}), {} pairs; clustered: median {:.2} ms (max {:.2}), {} pairs",
        uniform.median_ms, uniform.max_ms, uniform.pairs, clustered.median_ms, clustered.max_ms, clustered.pairs
    );

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    let sqlite = rt.block_on(run_backend(plan, &server_bin, Backend::Sqlite))?;
    let pg = match postgres {
        Some(url) => Some(rt.block_on(run_backend(plan, &server_bin, Backend::Postgres(url)))?),
        None => {
            eprintln!("postgres: skipped (no --postgres and no SHOAL_TEST_POSTGRES_URL)");
            None
        }
    };

    let mut j = Json::default();
    j.num("neighbour_tick_100k_ms", uniform.median_ms, 2);
    j.num("reports_per_s_sqlite", sqlite.window.persisted_per_s, 0);
    j.opt("reports_per_s_postgres", pg.as_ref().map(|p| p.window.persisted_per_s), 0);
    j.num("signin_p99_ms_under_load", sqlite.window.probes.p99_ms, 1);
    j.num("signin_p50_ms_under_load", sqlite.window.probes.p50_ms, 1);
    j.num("signin_p99_ms_idle", sqlite.idle.p99_ms, 1);
    j.num("signin_p50_ms_idle", sqlite.idle.p50_ms, 1);
    j.opt("signin_p99_ms_under_load_postgres", pg.as_ref().map(|p| p.window.probes.p99_ms), 1);
    j.num("neighbour_tick_100k_max_ms", uniform.max_ms, 2);
    j.num("neighbour_tick_100k_clustered_ms", clustered.median_ms, 2);
    j.int("neighbour_tick_100k_pairs", uniform.pairs as u64);
    j.int("clients", plan.clients as u64);
    j.int("offered_per_s", plan.rate);
    j.num("client_limit_per_s", plan.client_limit, 0);
    j.num("window_s", plan.seconds, 1);
    j.num("flood_s", plan.flood, 1);
    j.int("report_bytes", sqlite.report_bytes as u64);
    for r in std::iter::once(&sqlite).chain(pg.as_ref()) {
        r.write(&mut j);
    }
    println!("{}", j.finish());
    Ok(())
}

/// The `shoal-control-server` beside this executable.
fn server_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("finding this executable")?;
    let bin = me.with_file_name("shoal-control-server");
    ensure!(
        bin.is_file(),
        "{} not found; build both with `cargo build --release -p shoal-control --bins`",
        bin.display()
    );
    Ok(bin)
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

// ---------------------------------------------------------------------------------------------
// Neighbour tick

#[derive(Debug)]
struct TickResult {
    median_ms: f64,
    max_ms: f64,
    pairs: usize,
}

/// The interest tick over `n` synthetic players, as `benches/neighbour_tick.rs` measures it:
/// paired once, then before each timed tick every player walks up to 1.4 m.
fn neighbour_tick(n: usize, layout: Layout, ticks: usize) -> anyhow::Result<TickResult> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
    let mut pos = positions(n, layout, &mut rng);
    let mut interest = Interest::new(InterestConfig::default())?;
    let ids: Vec<NodeId> = (0..n as u64).map(|i| NodeId(i.to_be_bytes())).collect();
    for (id, p) in ids.iter().zip(&pos) {
        interest.update(*id, *p)?;
    }
    interest.tick();
    while interest.poll_event().is_some() {}
    let mut times = Vec::with_capacity(ticks);
    for _ in 0..ticks.max(1) {
        walk(&mut pos, 1.4, &mut rng);
        for (id, p) in ids.iter().zip(&pos) {
            interest.update(*id, *p)?;
        }
        let t = Instant::now();
        interest.tick();
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        while interest.poll_event().is_some() {}
    }
    times.sort_by(f64::total_cmp);
    Ok(TickResult {
        median_ms: times[times.len() / 2],
        max_ms: times.last().copied().unwrap_or(f64::NAN),
        pairs: interest.stats().pairs,
    })
}

// ---------------------------------------------------------------------------------------------
// One database

#[derive(Debug, Clone)]
enum Backend {
    Sqlite,
    Postgres(String),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }
}

/// What one run against one database measured.
#[derive(Debug)]
struct BackendResult {
    name: &'static str,
    report_bytes: usize,
    /// The store without the server.
    direct: StoreAlone,
    /// The paced window.
    window: Window,
    /// After paced sending stopped: until the server had taken and persisted everything.
    paced_settle: Settled,
    /// The unthrottled phase, if run.
    flood: Option<(Window, Settled)>,
    idle: Percentiles,
    /// The server's resident memory after the idle probes, MiB.
    idle_rss_mib: f64,
    sent_total: u64,
    taken_total: u64,
    /// Rows in the database after the server stopped, beyond those before it started.
    rows_persisted: i64,
    introductions: u64,
    refusals: u64,
    shutdown_s: f64,
    warnings: usize,
}

impl BackendResult {
    fn write(&self, j: &mut Json) {
        let n = self.name;
        self.window.write(j, n);
        j.num(&format!("{n}_store_alone_rows_per_s"), self.direct.rows_per_s, 0);
        j.int(&format!("{n}_store_alone_batch"), self.direct.batch as u64);
        j.num(&format!("{n}_store_alone_character_saves_ms"), self.direct.character_saves_ms, 1);
        self.paced_settle.write(j, n);
        self.idle.write(j, &format!("{n}_signin_idle"));
        j.num(&format!("{n}_server_rss_mib_idle"), self.idle_rss_mib, 0);
        if let Some((w, s)) = &self.flood {
            w.write(j, &format!("{n}_flood"));
            s.write(j, &format!("{n}_flood"));
        }
        j.int(&format!("{n}_reports_sent"), self.sent_total);
        j.int(&format!("{n}_reports_taken"), self.taken_total);
        j.int(&format!("{n}_rows_persisted"), self.rows_persisted.max(0) as u64);
        j.signed(&format!("{n}_rows_lost"), self.taken_total as i64 - self.rows_persisted);
        j.int(&format!("{n}_introductions"), self.introductions);
        j.int(&format!("{n}_refusals"), self.refusals);
        j.num(&format!("{n}_shutdown_s"), self.shutdown_s, 2);
        j.int(&format!("{n}_server_warnings"), self.warnings as u64);
    }
}

/// One database's run. PostgreSQL runs in a schema of its own, created fresh and dropped at
/// the end, so earlier runs' rows (and the tests' tables) are neither measured nor touched.
async fn run_backend(plan: Plan, server_bin: &Path, backend: Backend) -> anyhow::Result<BackendResult> {
    let name = backend.name();
    let dir = std::env::temp_dir().join(format!("shoal-control-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    match &backend {
        Backend::Sqlite => {
            let url = format!("sqlite:{}", dir.join("control.db").display());
            run_on(plan, server_bin, name, &url, &dir).await
        }
        Backend::Postgres(base) => {
            let schema = format!("shoal_bench_{}", std::process::id());
            let admin = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(base)
                .await
                .with_context(|| format!("connecting to {base}"))?;
            sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"))
                .execute(&admin)
                .await
                .with_context(|| format!("creating schema {schema}"))?;
            let sep = if base.contains('?') { '&' } else { '?' };
            let url = format!("{base}{sep}options[search_path]={schema}");
            let result = run_on(plan, server_bin, name, &url, &dir).await;
            if let Err(e) = sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE")).execute(&admin).await {
                eprintln!("{name}: dropping schema {schema}: {e}");
            }
            admin.close().await;
            result
        }
    }
}

async fn run_on(
    plan: Plan,
    server_bin: &Path,
    name: &'static str,
    url: &str,
    dir: &Path,
) -> anyhow::Result<BackendResult> {
    let config = dir.join("control.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\ndata_dir = {}\ndatabase = {}\nkey_file = {}\n\
             [limits]\nmessages_per_s = {limit}\nburst = {limit}\n",
            toml_str(&dir.join("data").display().to_string()),
            toml_str(url),
            toml_str(&dir.join("control.key").display().to_string()),
            limit = plan.client_limit,
        ),
    )
    .with_context(|| format!("writing {}", config.display()))?;

    eprintln!("{name}: creating {} load accounts and {PROBE_ACCOUNTS} probe accounts", plan.clients);
    let store = Store::open(url).await.with_context(|| format!("opening the {name} store"))?;
    // Names unique per run: a PostgreSQL database may hold earlier runs' accounts and rows.
    let tag = format!("bench{}-{}", std::process::id(), unix_ms());
    let load_accounts = create_accounts(&store, &format!("{tag}-load"), plan.clients, CHEAP).await?;
    let probe_accounts = create_accounts(&store, &format!("{tag}-probe"), PROBE_ACCOUNTS, HashCost::default()).await?;
    let direct = store_alone(&store, plan, &load_accounts).await?;
    eprintln!(
        "{name}: the store alone: {:.0} rows/s in batches of {}; {} character saves take {:.0} ms",
        direct.rows_per_s, direct.batch, plan.clients, direct.character_saves_ms
    );
    let rows_before = store.report_count().await?;

    let mut server = ServerProcess::start(server_bin, &config, &dir.join("server.log"))?;
    eprintln!("{name}: server up, quic {} http {}", server.quic, server.http);
    let db = Db { store: &store, rows_before };
    let result = drive(plan, &server, db, load_accounts, probe_accounts, name).await;
    // Whatever happened, stop the server before judging.
    let stopped = server.terminate();
    let warnings = server.warnings();
    let mut r = result?;
    r.direct = direct;
    r.shutdown_s = stopped?.as_secs_f64();
    r.rows_persisted = db.rows().await?;
    store.close().await;
    r.warnings = warnings.len();
    for w in warnings.iter().take(10) {
        eprintln!("{name}: server: {}", w.chars().take(240).collect::<String>());
    }
    let lost = r.taken_total as i64 - r.rows_persisted;
    let w = &r.window;
    eprintln!(
        "{name}: window: {:.0} reports/s persisted, {:.0} taken, {:.0} sent; sign-in p50 {:.1} ms p99 {:.1} ms \
         (idle p99 {:.1} ms); server {:.2} cores, bench {:.2} cores",
        w.persisted_per_s,
        w.taken_per_s,
        w.sent_per_s,
        w.probes.p50_ms,
        w.probes.p99_ms,
        r.idle.p99_ms,
        w.server_cores,
        w.bench_cores
    );
    eprintln!("{name}: {} reports taken in all, {} rows persisted, {lost} missing", r.taken_total, r.rows_persisted);
    if lost != 0 {
        eprintln!("{name}: WARNING: {lost} reports taken were not persisted; data and log stay in {}", dir.display());
    } else if !warnings.is_empty() {
        eprintln!("{name}: the server logged {} warnings; its log stays in {}", warnings.len(), dir.display());
        for db in ["control.db", "control.db-wal", "control.db-shm"] {
            let _ = std::fs::remove_file(dir.join(db));
        }
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(r)
}

/// Creates `n` accounts named `{prefix}-{i}`; returns (name, password) pairs.
async fn create_accounts(
    store: &Store,
    prefix: &str,
    n: usize,
    cost: HashCost,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (name, password) = (format!("{prefix}-{i}"), format!("pw-{prefix}-{i}"));
        let p = password.clone();
        let hash = tokio::task::spawn_blocking(move || hash_password(&p, cost)).await??;
        ensure!(store.create_account(&name, &hash, unix_ms() as i64).await?, "account {name} already exists");
        out.push((name, password));
    }
    Ok(out)
}

/// What the store does without the server around it.
#[derive(Debug, Default, Clone, Copy)]
struct StoreAlone {
    /// `Store::insert_reports` in batches of one server tick's rows at the offered rate, one
    /// batch after another.
    rows_per_s: f64,
    batch: usize,
    /// `Store::save_character` once per load client, one after another, as the server saves
    /// the characters that reported during a tick.
    character_saves_ms: f64,
}

/// Measures the store on its own, before the server starts, with the same rows and
/// characters the load clients will produce.
async fn store_alone(store: &Store, plan: Plan, accounts: &[(String, String)]) -> anyhow::Result<StoreAlone> {
    let batch = ((plan.rate as f64 * TICK.as_secs_f64()) as usize).max(1);
    let total = (plan.rate as usize * 2).clamp(batch, 100_000);
    let now = unix_ms() as i64;
    let rows: Vec<ReportRow> = (0..total)
        .map(|i| {
            let r = report_for(i % plan.clients);
            Ok(ReportRow {
                account: accounts[i % accounts.len()].0.clone(),
                node_id: (i as u64).to_be_bytes(),
                seq: i as i64,
                received_ms: now,
                status: r.status.clone(),
                position: r.position.map(f64::from),
                body: encode(&r)?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let t = Instant::now();
    for chunk in rows.chunks(batch) {
        store.insert_reports(chunk).await?;
    }
    let rows_per_s = total as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (i, (account, _)) in accounts.iter().enumerate() {
        store
            .save_character(&Character {
                account: account.clone(),
                node_id: (i as u64).to_be_bytes(),
                position: [0.0; 3],
                state: (0..100u8).collect(),
                updated_ms: now,
            })
            .await?;
    }
    Ok(StoreAlone { rows_per_s, batch, character_saves_ms: t.elapsed().as_secs_f64() * 1000.0 })
}

/// The bench's own handle on the server's database.
#[derive(Debug, Clone, Copy)]
struct Db<'a> {
    store: &'a Store,
    rows_before: i64,
}

impl Db<'_> {
    /// Report rows written since the server started.
    async fn rows(&self) -> anyhow::Result<i64> {
        Ok(self.store.report_count().await? - self.rows_before)
    }
}

/// Client modes, shared through an atomic.
const PACED: u8 = 0;
const FLOOD: u8 = 1;
const PAUSE: u8 = 2;
const STOP: u8 = 3;

/// What the load clients share.
#[derive(Debug, Default)]
struct Shared {
    mode: AtomicU8,
    sent: AtomicU64,
    introductions: AtomicU64,
    refusals: AtomicU64,
}

async fn drive(
    plan: Plan,
    server: &ServerProcess,
    db: Db<'_>,
    load_accounts: Vec<(String, String)>,
    probe_accounts: Vec<(String, String)>,
    name: &'static str,
) -> anyhow::Result<BackendResult> {
    let target = Target { addr: server.quic, fp: server.fingerprint, http: server.http, pid: server.child.id() };
    let probe_accounts = Arc::new(probe_accounts);

    eprintln!("{name}: {} sign-in probes on the idle server", plan.idle_probes);
    let idle = probe_series(target, probe_accounts.clone(), plan.idle_probes).await?;
    let idle_rss_mib = resident_mib(target.pid)?;

    eprintln!("{name}: signing in {} load clients", plan.clients);
    let mut joins = Vec::new();
    for (account, password) in load_accounts {
        joins.push(tokio::spawn(async move { sign_in(target, &account, &password).await }));
    }
    let mut links = Vec::new();
    for j in joins {
        links.push(j.await?.context("signing in a load client")?);
    }

    let shared = Arc::new(Shared::default());
    let per_client = plan.rate as f64 / plan.clients as f64;
    let mut connections = Vec::new();
    let mut senders = Vec::new();
    let mut report_bytes = 0;
    for (i, link) in links.into_iter().enumerate() {
        let ControlLink { endpoint, connection, send, recv } = link;
        connections.push((endpoint, connection));
        let report = ClientToControl::Report(Box::new(report_for(i)));
        report_bytes = encode(&report)?.len();
        tokio::spawn(drain_client(recv, shared.clone()));
        // Staggered so the clients' wake-ups spread over a pacing step.
        let offset = PACE_STEP.mul_f64(i as f64 / plan.clients as f64);
        senders.push(tokio::spawn(load_client(send, report, per_client, offset, shared.clone())));
    }

    eprintln!("{name}: {} reports/s offered; {:.0} s warm-up, {:.0} s window", plan.rate, plan.warmup, plan.seconds);
    tokio::time::sleep(Duration::from_secs_f64(plan.warmup)).await;
    let window = measure(plan.seconds, target, &probe_accounts, db, &shared).await?;
    shared.mode.store(PAUSE, Ordering::Relaxed);
    let paced_settle = settle(target, db, &shared).await?;
    eprintln!(
        "{name}: paced phase settled: taken {:.2} s and persisted {} after sending stopped, {} rows missing",
        paced_settle.taken_s,
        paced_settle.persisted_s.map_or("never".into(), |s| format!("{s:.2} s")),
        paced_settle.rows_missing
    );

    let flood = if plan.flood > 0.0 {
        eprintln!("{name}: {:.0} s unthrottled", plan.flood);
        shared.mode.store(FLOOD, Ordering::Relaxed);
        let w = measure(plan.flood, target, &probe_accounts, db, &shared).await?;
        shared.mode.store(PAUSE, Ordering::Relaxed);
        let s = settle(target, db, &shared).await?;
        eprintln!(
            "{name}: unthrottled: {:.0} sent/s, {:.0} taken/s, {:.0} persisted/s, {:.0} throttled/s; server at most \
             {:.0} MiB; sign-in p99 {:.1} ms; settled: taken {:.2} s and persisted {} after sending stopped, {} rows \
             missing",
            w.sent_per_s,
            w.taken_per_s,
            w.persisted_per_s,
            w.throttled_per_s,
            w.server_rss_mib_max,
            w.probes.p99_ms,
            s.taken_s,
            s.persisted_s.map_or("never".into(), |s| format!("{s:.2} s")),
            s.rows_missing
        );
        Some((w, s))
    } else {
        None
    };
    shared.mode.store(STOP, Ordering::Relaxed);
    for s in senders {
        s.await?.context("a load client failed")?;
    }
    let sent_total = shared.sent.load(Ordering::Relaxed);
    let taken_total = metric(target.http, "shoal_control_reports_total").await?;
    for (endpoint, connection) in &connections {
        connection.close(0u32.into(), b"bench done");
        endpoint.close(0u32.into(), b"bench done");
    }

    Ok(BackendResult {
        name,
        report_bytes,
        direct: StoreAlone::default(),
        window,
        paced_settle,
        flood,
        idle,
        idle_rss_mib,
        sent_total,
        taken_total,
        rows_persisted: 0,
        introductions: shared.introductions.load(Ordering::Relaxed),
        refusals: shared.refusals.load(Ordering::Relaxed),
        shutdown_s: 0.0,
        warnings: 0,
    })
}

/// Where the server under test is.
#[derive(Debug, Clone, Copy)]
struct Target {
    addr: SocketAddr,
    fp: [u8; 32],
    http: SocketAddr,
    pid: u32,
}

/// One measured stretch.
#[derive(Debug)]
struct Window {
    sent_per_s: f64,
    taken_per_s: f64,
    persisted_per_s: f64,
    /// The server process's CPU time over the stretch, in cores.
    server_cores: f64,
    /// This process's.
    bench_cores: f64,
    /// The server's CPU per report taken, microseconds.
    server_us_per_report: f64,
    /// The server process's largest resident memory seen over the stretch, MiB.
    server_rss_mib_max: f64,
    /// Messages the server made wait for their connection's rate limit, per second.
    throttled_per_s: f64,
    probes: Percentiles,
}

impl Window {
    /// `prefix` is the backend's name, so the paced window's fields read `sqlite_persisted_per_s`.
    fn write(&self, j: &mut Json, prefix: &str) {
        j.num(&format!("{prefix}_persisted_per_s"), self.persisted_per_s, 0);
        j.num(&format!("{prefix}_taken_per_s"), self.taken_per_s, 0);
        j.num(&format!("{prefix}_sent_per_s"), self.sent_per_s, 0);
        j.num(&format!("{prefix}_server_cores"), self.server_cores, 2);
        j.num(&format!("{prefix}_bench_cores"), self.bench_cores, 2);
        j.num(&format!("{prefix}_server_us_per_report"), self.server_us_per_report, 1);
        j.num(&format!("{prefix}_server_rss_mib_max"), self.server_rss_mib_max, 0);
        j.num(&format!("{prefix}_throttled_per_s"), self.throttled_per_s, 0);
        self.probes.write(j, &format!("{prefix}_signin"));
    }
}

/// Counts sent, taken and persisted reports over `seconds`, with sign-in probes throughout.
async fn measure(
    seconds: f64,
    target: Target,
    probe_accounts: &Arc<Vec<(String, String)>>,
    db: Db<'_>,
    shared: &Shared,
) -> anyhow::Result<Window> {
    let probes = (seconds / PROBE_INTERVAL.as_secs_f64()).round() as usize;
    let rows0 = db.rows().await?;
    let taken0 = metric(target.http, "shoal_control_reports_total").await?;
    let throttled0 = metric(target.http, "shoal_control_throttled_total").await?;
    let sent0 = shared.sent.load(Ordering::Relaxed);
    let (server0, bench0) = (cpu_seconds(target.pid)?, cpu_seconds(std::process::id())?);
    let t0 = Instant::now();
    let probing = tokio::spawn(probe_series(target, probe_accounts.clone(), probes));
    let end = t0 + Duration::from_secs_f64(seconds);
    let mut rss_max = resident_mib(target.pid)?;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100).min(end.saturating_duration_since(Instant::now()))).await;
        rss_max = rss_max.max(resident_mib(target.pid)?);
    }
    let sent1 = shared.sent.load(Ordering::Relaxed);
    let (server1, bench1) = (cpu_seconds(target.pid)?, cpu_seconds(std::process::id())?);
    let taken1 = metric(target.http, "shoal_control_reports_total").await?;
    let throttled1 = metric(target.http, "shoal_control_throttled_total").await?;
    let rows1 = db.rows().await?;
    let secs = t0.elapsed().as_secs_f64();
    let probes = probing.await??;
    Ok(Window {
        sent_per_s: (sent1 - sent0) as f64 / secs,
        taken_per_s: (taken1 - taken0) as f64 / secs,
        persisted_per_s: (rows1 - rows0) as f64 / secs,
        server_cores: (server1 - server0) / secs,
        bench_cores: (bench1 - bench0) / secs,
        server_us_per_report: (server1 - server0) * 1e6 / (taken1 - taken0).max(1) as f64,
        server_rss_mib_max: rss_max,
        throttled_per_s: (throttled1 - throttled0) as f64 / secs,
        probes,
    })
}

/// How the server caught up once the clients stopped sending.
#[derive(Debug)]
struct Settled {
    /// Until it had taken every report sent.
    taken_s: f64,
    /// Until the database held a row for each report taken; `None` if it never did.
    persisted_s: Option<f64>,
    /// Reports taken without a row when the wait ended.
    rows_missing: i64,
}

impl Settled {
    fn write(&self, j: &mut Json, prefix: &str) {
        j.num(&format!("{prefix}_backlog_taken_s"), self.taken_s, 2);
        j.opt(&format!("{prefix}_backlog_persisted_s"), self.persisted_s, 2);
        j.signed(&format!("{prefix}_rows_missing_after_settle"), self.rows_missing);
    }
}

/// With the clients paused: waits until the server has taken every report sent, then until
/// the database holds a row for each, or the row count has stood still for [`STALL_LIMIT`].
async fn settle(target: Target, db: Db<'_>, shared: &Shared) -> anyhow::Result<Settled> {
    let t = Instant::now();
    // A client may be in the middle of a burst when the mode changes.
    tokio::time::sleep(PACE_STEP * 2).await;
    let sent = shared.sent.load(Ordering::Relaxed);
    let mut taken = metric(target.http, "shoal_control_reports_total").await?;
    while taken < sent {
        ensure!(
            t.elapsed() < DRAIN_LIMIT,
            "the server took {taken} of {sent} reports and did not catch up within {DRAIN_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        taken = metric(target.http, "shoal_control_reports_total").await?;
    }
    let taken_s = t.elapsed().as_secs_f64();
    let (mut rows, mut moved) = (db.rows().await?, Instant::now());
    while rows < taken as i64 && moved.elapsed() < STALL_LIMIT && t.elapsed() < DRAIN_LIMIT {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = db.rows().await?;
        if now != rows {
            moved = Instant::now();
        }
        rows = now;
    }
    let rows_missing = taken as i64 - rows;
    Ok(Settled { taken_s, persisted_s: (rows_missing <= 0).then(|| t.elapsed().as_secs_f64()), rows_missing })
}

/// A process's resident memory, MiB (`VmRSS` in `/proc/<pid>/status`).
fn resident_mib(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .context("no VmRSS in the process status")?;
    Ok(kib / 1024.0)
}

/// CPU time a process has used, seconds (utime + stime from `/proc/<pid>/stat`, in the
/// kernel's fixed 100 Hz user-visible clock ticks).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name may hold spaces; the fields after it are plain.
    let rest = text.rsplit_once(')').map(|(_, r)| r).context("malformed stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).context("short stat")?.parse::<u64>().context("stat field")? as f64)
    };
    // Fields 14 and 15 of stat; `rest` starts at field 3.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

// ---------------------------------------------------------------------------------------------
// Clients

/// Connects, signs in with a fresh key, and waits for the welcome.
async fn sign_in(target: Target, account: &str, password: &str) -> anyhow::Result<ControlLink> {
    let fp = target.fp;
    let mut link = ControlLink::connect(target.addr, &Trust::Pinned(fp)).await?;
    let id = Identity::generate()?;
    let proof = KeyProof::new(&id, account, unix_ms(), &fp);
    link.send(&ClientToControl::SignIn { account: account.into(), password: password.into(), proof }).await?;
    loop {
        match link.recv::<ControlToClient>().await? {
            ControlToClient::Welcome { .. } => return Ok(link),
            ControlToClient::Refused(why) => bail!("sign-in of {account} refused: {why}"),
            _ => {}
        }
    }
}

/// A small, plausible report: the client stands still on a 40 m grid (so neighbours within
/// 50 m get introduced), with three links and a 100-byte character.
fn report_for(i: usize) -> Report {
    let links = (0..3u8)
        .map(|k| LinkReport {
            peer: NodeId([k + 1, (i % 251) as u8, 0, 0, 0, 0, 0, 1]),
            vc: 1,
            path_kind: k.min(2),
            relays: if k == 0 { vec![] } else { vec![NodeId([0xee, k, 0, 0, 0, 0, 0, 0])] },
            rtt_us: 20_000 + 5_000 * u32::from(k),
            loss: 0.002,
            send_bps: 12_000,
            recv_bps: 11_500,
            auth_failures: 0,
        })
        .collect();
    Report {
        seq: 0,
        unix_ms: unix_ms(),
        status: "playing".into(),
        app: b"zone=7;party=3".to_vec(),
        build_hash: [0x5a; 32],
        position: [(i % 16) as f32 * 40.0, 0.0, (i / 16) as f32 * 40.0],
        character: (0..100u8).collect(),
        game: vec![],
        links,
        lost: vec![],
        observed: vec![],
    }
}

/// Writes reports: paced at `rate`/s, back-to-back in [`FLOOD`] mode, only keepalives in
/// [`PAUSE`], until [`STOP`].
async fn load_client(
    mut send: quinn::SendStream,
    mut msg: ClientToControl,
    rate: f64,
    offset: Duration,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    tokio::time::sleep(offset).await;
    let start = Instant::now();
    let mut paced = 0u64;
    let mut seq = 0u64;
    let mut alive = Instant::now();
    loop {
        let burst = match shared.mode.load(Ordering::Relaxed) {
            PACED => ((start.elapsed().as_secs_f64() * rate) as u64).saturating_sub(paced),
            FLOOD => 16,
            PAUSE => {
                if alive.elapsed() >= KEEPALIVE {
                    write_message(&mut send, &ClientToControl::Keepalive).await.context("writing a keepalive")?;
                    alive = Instant::now();
                }
                tokio::time::sleep(PACE_STEP).await;
                continue;
            }
            _ => return Ok(()),
        };
        for _ in 0..burst {
            seq += 1;
            if let ClientToControl::Report(r) = &mut msg {
                r.seq = seq;
                r.unix_ms = unix_ms();
            }
            write_message(&mut send, &msg).await.context("writing a report")?;
            shared.sent.fetch_add(1, Ordering::Relaxed);
        }
        alive = Instant::now();
        match shared.mode.load(Ordering::Relaxed) {
            PACED => {
                paced += burst;
                tokio::time::sleep(PACE_STEP).await;
            }
            _ => tokio::task::yield_now().await,
        }
    }
}

/// Reads what the server sends a load client, counting introductions and refusals.
async fn drain_client(mut recv: FrameReader, shared: Arc<Shared>) {
    while let Ok(msg) = recv.read_message::<ControlToClient>().await {
        match msg {
            ControlToClient::Introduce(_) => {
                shared.introductions.fetch_add(1, Ordering::Relaxed);
            }
            ControlToClient::Refused(why) => {
                let before = shared.refusals.fetch_add(1, Ordering::Relaxed);
                if before < 5 {
                    eprintln!("a load client was refused: {why}");
                }
            }
            _ => {}
        }
    }
}

/// Latency percentiles of a series of sign-ins; failed ones count as [`PROBE_TIMEOUT`].
#[derive(Debug, Clone, Copy)]
struct Percentiles {
    n: usize,
    failed: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Percentiles {
    fn of(mut ms: Vec<f64>, failed: usize) -> Percentiles {
        ms.sort_by(f64::total_cmp);
        // Nearest rank.
        let at = |q: f64| {
            if ms.is_empty() { f64::NAN } else { ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1] }
        };
        Percentiles { n: ms.len(), failed, p50_ms: at(0.5), p99_ms: at(0.99), max_ms: at(1.0) }
    }

    fn write(&self, j: &mut Json, prefix: &str) {
        j.num(&format!("{prefix}_p50_ms"), self.p50_ms, 1);
        j.num(&format!("{prefix}_p99_ms"), self.p99_ms, 1);
        j.num(&format!("{prefix}_max_ms"), self.max_ms, 1);
        j.int(&format!("{prefix}_n"), self.n as u64);
        j.int(&format!("{prefix}_failed"), self.failed as u64);
    }
}

/// `n` sign-ins with the default hash cost, one started every [`PROBE_INTERVAL`] whether or
/// not the previous one has finished (so a slow answer does not thin out the samples).
async fn probe_series(target: Target, accounts: Arc<Vec<(String, String)>>, n: usize) -> anyhow::Result<Percentiles> {
    let start = tokio::time::Instant::now();
    let mut joins = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until(start + PROBE_INTERVAL.mul_f64(i as f64)).await;
        let accounts = accounts.clone();
        joins.push(tokio::spawn(async move {
            let (account, password) = &accounts[i % accounts.len()];
            let t = Instant::now();
            let link = tokio::time::timeout(PROBE_TIMEOUT, sign_in(target, account, password)).await;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            match link {
                Ok(Ok(link)) => {
                    link.close("probe done");
                    Ok(ms)
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(anyhow!("no welcome within {PROBE_TIMEOUT:?}")),
            }
        }));
    }
    let (mut ms, mut failed) = (Vec::with_capacity(n), 0);
    for j in joins {
        match j.await? {
            Ok(t) => ms.push(t),
            Err(e) => {
                if failed < 3 {
                    eprintln!("a sign-in probe failed: {e:#}");
                }
                failed += 1;
                // Counted as the timeout, so that failures raise the percentiles rather than
                // drop out of them.
                ms.push(PROBE_TIMEOUT.as_secs_f64() * 1000.0);
            }
        }
    }
    Ok(Percentiles::of(ms, failed))
}

// ---------------------------------------------------------------------------------------------
// The server process

/// A running `shoal-control-server run`; killed if dropped while still running.
#[derive(Debug)]
struct ServerProcess {
    child: Child,
    quic: SocketAddr,
    http: SocketAddr,
    fingerprint: [u8; 32],
    log: PathBuf,
}

impl ServerProcess {
    /// Starts the server and waits for its ready line.
    fn start(bin: &Path, config: &Path, log: &Path) -> anyhow::Result<ServerProcess> {
        let stderr = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .env("NO_COLOR", "1")
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = ServerProcess {
            child,
            quic: SocketAddr::from(([0, 0, 0, 0], 0)),
            http: SocketAddr::from(([0, 0, 0, 0], 0)),
            fingerprint: [0; 32],
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let line = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("shoal-control-server ready") => break line,
                Ok(_) => {}
                Err(_) => bail!("the server did not print its ready line; its log:\n{}", server.log_tail()),
            }
        };
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .with_context(|| format!("no {k} in the ready line: {line}"))
        };
        server.quic = field("quic=")?.parse().context("quic= in the ready line")?;
        server.http = field("http=")?.parse().context("http= in the ready line")?;
        server.fingerprint = parse_hex(field("fingerprint=")?).context("fingerprint= in the ready line")?;
        Ok(server)
    }

    /// SIGTERM, then waits for a clean exit (the server writes what is pending first).
    fn terminate(&mut self) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().context("running kill")?;
        ensure!(status.success(), "kill -TERM {pid} failed");
        loop {
            if let Some(exit) = self.child.try_wait()? {
                ensure!(exit.success(), "the server exited with {exit}; its log:\n{}", self.log_tail());
                return Ok(t.elapsed());
            }
            ensure!(t.elapsed() < Duration::from_secs(60), "the server did not stop within 60 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Warnings and errors the server logged.
    fn warnings(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).map(String::from).collect()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A counter from the server's `/metrics`.
async fn metric(http: SocketAddr, name: &'static str) -> anyhow::Result<u64> {
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(http).with_context(|| format!("connecting to {http}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body).context("reading /metrics")?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .with_context(|| format!("no {name} in /metrics"))?
            .trim()
            .parse()
            .with_context(|| format!("{name} in /metrics"))
    })
    .await?
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The JSON line, in insertion order.
#[derive(Debug, Default)]
struct Json(Vec<String>);

impl Json {
    fn num(&mut self, key: &str, v: f64, decimals: usize) {
        let v = if v.is_finite() { format!("{v:.decimals$}") } else { "null".into() };
        self.0.push(format!("\"{key}\":{v}"));
    }

    fn opt(&mut self, key: &str, v: Option<f64>, decimals: usize) {
        self.num(key, v.unwrap_or(f64::NAN), decimals);
    }

    fn int(&mut self, key: &str, v: u64) {
        self.0.push(format!("\"{key}\":{v}"));
    }

    fn signed(&mut self, key: &str, v: i64) {
        self.0.push(format!("\"{key}\":{v}"));
    }

    fn finish(self) -> String {
        format!("{{{}}}", self.0.join(","))
    }
}
