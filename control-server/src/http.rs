//! The control server's HTTP side, on its own port: `/healthz`, Prometheus `/metrics`, and
//! `/api/state`, the live state as JSON (players with positions and neighbours, the links they
//! report with their path kind and stats, relays) for the dashboard.

use std::fmt::Write;

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use crate::server::{ServerClient, Stats};

/// The router.
pub fn router(client: ServerClient) -> axum::Router {
    let (metrics, state) = (client.clone(), client);
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || async move {
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], render_prometheus(&metrics.stats()))
            }),
        )
        .route(
            "/api/state",
            get(move || async move {
                match state.snapshot().await {
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
    if let Err(e) = axum::serve(listener, router(client)).with_graceful_shutdown(shutdown).await {
        tracing::error!("control HTTP server: {e}");
    }
}

/// The counters in Prometheus' text format.
pub fn render_prometheus(s: &Stats) -> String {
    let c = &s.counters;
    let mut out = String::new();
    let _ = writeln!(out, "# HELP shoal_control_players Signed-in players.\n# TYPE shoal_control_players gauge");
    let _ = writeln!(out, "shoal_control_players {}", s.players);
    let counters: [(&str, &str, u64); 12] = [
        ("shoal_control_sign_ins_total", "Sign-ins accepted, new or resumed.", c.signed_in),
        ("shoal_control_resumes_total", "Sessions resumed with a ticket.", c.resumed),
        ("shoal_control_relay_registrations_total", "Relay registrations accepted.", c.relays_registered),
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
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    }
    let _ = writeln!(
        out,
        "# HELP shoal_control_refusals_total Messages and clients refused, by reason.\n# TYPE shoal_control_refusals_total counter"
    );
    for (reason, v) in [
        ("bad_credentials", c.bad_credentials),
        ("bad_proof", c.bad_proofs),
        ("bad_ticket", c.bad_tickets),
        ("not_signed_in", c.not_signed_in),
        ("malformed", c.malformed),
        ("bad_seq", c.bad_seqs),
        ("relay_refused", c.relays_refused),
    ] {
        let _ = writeln!(out, "shoal_control_refusals_total{{reason=\"{reason}\"}} {v}");
    }
    out
}
