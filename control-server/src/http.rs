//! The control server's HTTP side, on its own port: `/healthz`, Prometheus `/metrics`, and
//! `/api/state`, the live state as JSON (players with positions and neighbours, the links they
//! report with their path kind and stats, relays) for the dashboard.

use std::fmt;
use std::sync::Arc;

use axum::Json;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use shoal_link::exposition::{self, Collector, DescriptorEncoder, Exposition};
use tokio::sync::watch;

use crate::server::{ServerClient, Stats};

/// The router.
pub fn router(client: ServerClient) -> axum::Router {
    let metrics = Arc::new(Exposition::new(Live(client.clone())));
    axum::Router::new().route("/healthz", get(|| async { "ok\n" })).route("/metrics", exposition::route(metrics)).route(
        "/api/state",
        get(move || async move {
            match client.snapshot().await {
                Some(s) => Json(s).into_response(),
                None => (StatusCode::SERVICE_UNAVAILABLE, "stopped\n").into_response(),
            }
        }),
    )
}

/// Serves the router on `listener` until `stop` turns true.
pub async fn serve(listener: tokio::net::TcpListener, client: ServerClient, mut stop: watch::Receiver<bool>) {
    let shutdown = async move {
        while !*stop.borrow() {
            if stop.changed().await.is_err() {
                break;
            }
        }
    };
    let addr = listener.local_addr();
    if let Err(e) = axum::serve(listener, router(client)).with_graceful_shutdown(shutdown).await {
        tracing::error!(addr = ?addr.ok(), "control HTTP server: {e}");
    }
}

/// What `/metrics` reads: the stats the server published after its last turn.
#[derive(Debug)]
struct Live(ServerClient);

impl Collector for Live {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> fmt::Result {
        encode(&self.0.stats(), &mut e)
    }
}

/// Stats as they were.
#[derive(Debug)]
struct Fixed(Stats);

impl Collector for Fixed {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> fmt::Result {
        encode(&self.0, &mut e)
    }
}

/// `s` in Prometheus' text format, as `/metrics` serves it.
pub fn render_prometheus(s: &Stats) -> Result<String, fmt::Error> {
    Exposition::new(Fixed(*s)).render()
}

fn encode(s: &Stats, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
    use exposition::{counter, gauge, labelled_counters};
    let c = &s.counters;
    gauge(e, "shoal_control_players", "Signed-in players.", s.players as u64)?;
    let counters: [(&str, &str, u64); 13] = [
        ("shoal_control_sign_ins_total", "Sign-ins accepted, new or resumed.", c.signed_in),
        ("shoal_control_resumes_total", "Sessions resumed with a ticket.", c.resumed),
        ("shoal_control_relay_registrations_total", "Relay registrations accepted.", c.relays_registered),
        ("shoal_control_hosting_registrations_total", "Hosting server registrations accepted.", c.hosting_registered),
        ("shoal_control_reports_total", "Reports taken.", c.reports),
        ("shoal_control_implausible_reports_total", "Reports with implausible movement.", c.implausible),
        ("shoal_control_cut_off_total", "Clients cut off for implausible reports.", c.cut_off),
        ("shoal_control_lost_total", "Clients that went silent.", c.lost),
        ("shoal_control_introductions_total", "Introductions sent, one per side.", c.introductions),
        ("shoal_control_farewells_total", "Farewells sent, one per side.", c.farewells),
        ("shoal_control_unknown_builds_total", "Reports from builds not on the allow-list.", c.unknown_builds),
        ("shoal_control_throttled_total", "Messages whose reading waited for the sender's rate limit.", s.throttled),
        ("shoal_control_overflowed_total", "Connections closed for not reading what was sent to them.", c.overflowed),
    ];
    for (name, help, v) in counters {
        counter(e, name, help, v)?;
    }
    let refusals = [
        ("bad_credentials", c.bad_credentials),
        ("bad_proof", c.bad_proofs),
        ("bad_ticket", c.bad_tickets),
        ("not_signed_in", c.not_signed_in),
        ("malformed", c.malformed),
        ("bad_seq", c.bad_seqs),
        ("relay_refused", c.relays_refused),
        ("hosting_refused", c.hosting_refused),
    ];
    labelled_counters(e, "shoal_control_refusals_total", "Messages and clients refused, by reason.", "reason", refusals)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::core::CoreCounters;

    #[test]
    fn every_control_metric_is_exposed_under_its_name_with_help_and_type() {
        let counters = CoreCounters { bad_credentials: 2, introductions: 4, overflowed: 1, ..CoreCounters::default() };
        let text = render_prometheus(&Stats { counters, players: 3, throttled: 9 }).unwrap();
        for line in [
            "# HELP shoal_control_players Signed-in players.",
            "# TYPE shoal_control_players gauge",
            "shoal_control_players 3",
            "# TYPE shoal_control_throttled_total counter",
            "shoal_control_throttled_total 9",
            "# TYPE shoal_control_overflowed_total counter",
            "shoal_control_overflowed_total 1",
            "shoal_control_introductions_total 4",
            "# TYPE shoal_control_refusals_total counter",
            "shoal_control_refusals_total{reason=\"bad_credentials\"} 2",
            "shoal_control_refusals_total{reason=\"relay_refused\"} 0",
            "# TYPE shoal_control_hosting_registrations_total counter",
            "shoal_control_refusals_total{reason=\"hosting_refused\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        let families = text.lines().filter(|l| l.starts_with("# TYPE")).count();
        assert_eq!(families, text.lines().filter(|l| l.starts_with("# HELP")).count());
        assert_eq!(families, 15);
    }
}
