//! `shoal-mesh-node`: the standalone relay daemon, and the small key and permit tools an
//! operator needs to run relays before a control server issues their permits.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shoal_link::daemon::{load_or_create_key, shutdown_signal};
use shoal_mesh::config::RelayFile;
use shoal_mesh::driver::batch::bind_reuseport;
use shoal_mesh::driver::register::{self, Registration};
use shoal_mesh::driver::relay::{Relay, RelayStats};
use shoal_mesh::metrics::exposition::{self, Exposition};
use shoal_protocol::identity::to_hex;
use shoal_protocol::{PublicKey, Roles, TicketBody, TicketKind, UnixTime};

#[derive(Parser, Debug)]
#[command(name = "shoal-mesh-node", version, about = "Shoal mesh relay node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the relay from a TOML config file until SIGINT or SIGTERM.
    Run {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Create an identity key file (or read an existing one) and print its public key and id.
    Keygen {
        /// Where the seed is kept.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a relay permit with a control key file; prints the permit as hex.
    Permit {
        /// The control key file (a seed, as written by `keygen`).
        #[arg(long)]
        control_key: PathBuf,
        /// The public key (hex) of the node the permit is for.
        #[arg(long)]
        public_key: String,
        /// Grant the relay role (otherwise client).
        #[arg(long)]
        relay: bool,
        /// Validity in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
    },
}

fn unix_now() -> UnixTime {
    UnixTime(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::Keygen { out } => load_or_create_key(&out).map_err(Into::into).map(|id| {
            println!("public_key = \"{}\"\nnode_id = \"{}\"", id.public_key(), id.node_id());
        }),
        Command::Permit { control_key, public_key, relay, ttl_secs } => {
            permit(control_key, &public_key, relay, ttl_secs)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-mesh-node: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn permit(control_key: PathBuf, public_key: &str, relay: bool, ttl_secs: u64) -> anyhow::Result<()> {
    let control = load_or_create_key(&control_key)?;
    let key: PublicKey = public_key.parse().context("--public-key")?;
    let roles = if relay { Roles::RELAY } else { Roles::CLIENT };
    let t = TicketBody::new(TicketKind::RelayPermit, key, roles, unix_now(), ttl_secs).sign(&control);
    println!("{}", to_hex(&t.encode()));
    Ok(())
}

fn run(config: PathBuf) -> anyhow::Result<()> {
    let file = RelayFile::load(&config)?;
    let base = config.parent().map(PathBuf::from).unwrap_or_default();
    let settings = file.validate(&base, unix_now())?;
    let sockets = bind_reuseport(settings.listen, settings.workers, 8 << 20)
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let identity = settings.options.router.identity.clone();
    let relay = Relay::spawn(sockets, settings.options).context("cannot start workers")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let metrics = match settings.metrics {
            Some(addr) => {
                let listener =
                    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot serve metrics on {addr}"))?;
                Some(listener)
            }
            None => None,
        };
        let metrics_addr = metrics.as_ref().and_then(|l| l.local_addr().ok());
        let stop = shutdown_signal();
        // One line on stdout for whoever started us (scripts, tests); logs go to stderr.
        println!(
            "shoal-mesh-node ready node={} mesh={} metrics={}",
            relay.node_id(),
            relay.local_addr(),
            metrics_addr.map_or("off".to_string(), |a| a.to_string())
        );
        tracing::info!(node = %relay.node_id(), mesh = %relay.local_addr(), workers = settings.workers, "relay running");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server = metrics.map(|l| tokio::spawn(serve_metrics(l, relay.stats().clone(), stop_rx.clone())));
        let registration = settings.control.map(|c| {
            let reg = Registration {
                control: c.addr,
                trust: c.trust,
                identity,
                public_addr: c.public_addr.unwrap_or(relay.local_addr()),
            };
            tokio::spawn(register::run(reg, relay.handle(), stop_rx))
        });
        stop.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        for task in server.into_iter().chain(registration) {
            if let Err(e) = task.await {
                tracing::warn!("a service task ended abnormally: {e}");
            }
        }
        let stats = relay.stats().clone();
        relay.shutdown();
        let c = stats.counters();
        tracing::info!(forwarded = c.forwarded_packets, "relay stopped");
        Ok(())
    })
}

async fn serve_metrics(
    listener: tokio::net::TcpListener,
    stats: Arc<RelayStats>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/metrics", exposition::route(Arc::new(Exposition::new(stats))))
        .route("/healthz", get(|| async { "ok\n" }));
    let shutdown = async move {
        let _ = stop.changed().await;
    };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!("metrics server: {e}");
    }
}
