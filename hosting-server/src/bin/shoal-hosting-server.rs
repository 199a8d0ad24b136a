//! `shoal-hosting-server`: the hosting server daemon with the demo's rules (the built-in
//! behaviours), serving a zone of a content file (the demo zone by default).

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::{Parser, Subcommand};
use shoal_hosting::config::HostingFile;
use shoal_hosting::host::{ACTION_REFUSAL_NAMES, REFUSAL_NAMES};
use shoal_hosting::server::{self, Stats, TICK_BUCKETS_US};
use shoal_link::daemon::{load_or_create_key, shutdown_signal};
use shoal_link::exposition::{self, Collector, DescriptorEncoder, Exposition};
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(name = "shoal-hosting-server", version, about = "Shoal hosting server: the authoritative world")]
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
    /// Create an identity key file (or read an existing one) and print its node id, for the
    /// control server's `[[hosting]]` list.
    Keygen {
        /// Where the seed is kept.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match Cli::parse().command {
        Command::Run { config } => run(config),
        Command::Keygen { out } => load_or_create_key(&out).map_err(Into::into).map(|id| {
            println!("public_key = \"{}\"\nnode_id = \"{}\"", id.public_key(), id.node_id());
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-hosting-server: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(config: PathBuf) -> anyhow::Result<()> {
    let file = HostingFile::load(&config)?;
    let base = config.parent().map(PathBuf::from).unwrap_or_default();
    let settings = file.validate(&base)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let metrics = match settings.metrics {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot serve metrics on {addr}"))?,
            ),
            None => None,
        };
        let metrics_addr = metrics.as_ref().and_then(|l| l.local_addr().ok());
        let node = settings.server.identity.node_id();
        let handle = server::start(settings.server, settings.world)?;
        let stop = shutdown_signal();
        // One line on stdout for whoever started us (scripts, tests); logs go to stderr.
        println!(
            "shoal-hosting-server ready node={node} quic={} cert=sha256:{} metrics={}",
            handle.addr,
            shoal_protocol::identity::to_hex(&handle.cert),
            metrics_addr.map_or("off".to_string(), |a| a.to_string())
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        let served = metrics.map(|l| tokio::spawn(serve_metrics(l, handle.stats.clone(), stop_rx)));
        stop.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        handle.shutdown().await;
        if let Some(t) = served {
            let _ = t.await;
        }
        tracing::info!("hosting server stopped");
        Ok(())
    })
}

/// The stats as Prometheus metrics, read from the latest the server published.
#[derive(Debug)]
struct Metrics {
    stats: watch::Receiver<Stats>,
    /// The previous scrape's egress bytes and time, for the rate per client.
    last: Mutex<Option<(u64, std::time::Instant)>>,
}

impl Collector for Metrics {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> fmt::Result {
        use exposition::{counter, gauge, histogram, labelled_counters};
        let s = self.stats.borrow().clone();
        let c = &s.counters;
        gauge(&mut e, "shoal_hosting_clients", "Clients past their hello.", s.clients as u64)?;
        gauge(&mut e, "shoal_hosting_entities", "Entities in the world.", s.entities as u64)?;
        gauge(
            &mut e,
            "shoal_hosting_registered",
            "1 while the control server has the registration.",
            u64::from(s.registered),
        )?;
        let now = std::time::Instant::now();
        let per_client = {
            let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let rate = last.map_or(0.0, |(bytes, at)| {
                let secs = now.saturating_duration_since(at).as_secs_f64().max(1e-3);
                (c.snapshot_bytes.saturating_sub(bytes)) as f64 / secs / s.clients.max(1) as f64
            });
            *last = Some((c.snapshot_bytes, now));
            rate
        };
        gauge(
            &mut e,
            "shoal_hosting_egress_bytes_per_client_per_second",
            "Snapshot bytes a second per client since the previous scrape.",
            per_client as u64,
        )?;
        let per_snapshot = c.entries.checked_div(c.snapshots).unwrap_or(0);
        gauge(
            &mut e,
            "shoal_hosting_entities_per_snapshot",
            "Entity states per snapshot datagram, on average.",
            per_snapshot,
        )?;
        for (name, help, v) in [
            ("shoal_hosting_hellos_total", "Hellos accepted.", c.hellos),
            ("shoal_hosting_actions_total", "Actions done.", c.actions),
            ("shoal_hosting_snapshots_total", "Snapshot datagrams sent.", c.snapshots),
            ("shoal_hosting_snapshot_bytes_total", "Snapshot bytes sent.", c.snapshot_bytes),
            ("shoal_hosting_entries_total", "Entity states sent.", c.entries),
            ("shoal_hosting_events_total", "World events sent to clients.", c.events),
            ("shoal_hosting_implausible_total", "Position reports not taken.", c.implausible),
            ("shoal_hosting_bad_datagrams_total", "Datagrams that were not acknowledgements.", c.bad_datagrams),
            ("shoal_hosting_resends_total", "Entities clients asked to have sent whole again.", c.resends),
            ("shoal_hosting_datagrams_refused_total", "Datagrams the path would not take.", s.datagrams_refused),
            ("shoal_hosting_overflowed_total", "Clients closed for not reading.", s.overflowed),
        ] {
            counter(&mut e, name, help, v)?;
        }
        labelled_counters(
            &mut e,
            "shoal_hosting_refused_total",
            "Clients refused or closed, by reason.",
            "reason",
            REFUSAL_NAMES.iter().copied().zip(c.refused.iter().copied()),
        )?;
        labelled_counters(
            &mut e,
            "shoal_hosting_actions_refused_total",
            "Actions refused, by reason.",
            "reason",
            ACTION_REFUSAL_NAMES.iter().copied().zip(c.actions_refused.iter().copied()),
        )?;
        let buckets: Vec<(f64, u64)> =
            TICK_BUCKETS_US.iter().zip(s.tick_buckets).map(|(&b, n)| (b as f64 / 1e6, n)).collect();
        histogram(&mut e, "shoal_hosting_tick_seconds", "Time a tick takes.", &buckets, s.tick_secs, s.ticks)
    }
}

async fn serve_metrics(
    listener: tokio::net::TcpListener,
    stats: watch::Receiver<Stats>,
    mut stop: watch::Receiver<bool>,
) {
    use axum::routing::get;
    let metrics = Metrics { stats, last: Mutex::new(None) };
    let app = axum::Router::new()
        .route("/metrics", exposition::route(Arc::new(Exposition::new(metrics))))
        .route("/healthz", get(|| async { "ok\n" }));
    let shutdown = async move {
        let _ = stop.changed().await;
    };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!("metrics server: {e}");
    }
}
