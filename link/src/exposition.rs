//! `/metrics` for every Shoal daemon: Prometheus' text format (version 0.0.4), rendered by the
//! Prometheus project's client library from a [`Collector`] that reads the daemon's counters
//! when it is scraped. The counters stay plain integers where they are counted (the relay's
//! workers, the control server's core), so no hot path pays for an atomic; a scrape reads the
//! snapshot they last published.
//!
//! A daemon implements [`Collector`] with the helpers below ([`counter`], [`labelled_counters`],
//! [`gauge`], [`histogram`]), wraps it in an [`Exposition`] and serves [`route`].

use std::fmt;
use std::sync::Arc;

pub use prometheus_client::collector::Collector;
pub use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::encoding::{EncodeMetric, NoLabelSet, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// The `Content-Type` of what [`Exposition::render`] returns.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// What a daemon's `/metrics` serves: its collectors, read at each scrape.
#[derive(Debug, Default)]
pub struct Exposition {
    registry: Registry,
}

impl Exposition {
    /// An exposition of one collector.
    pub fn new(collector: impl Collector) -> Exposition {
        let mut e = Exposition::default();
        e.add(collector);
        e
    }

    /// Adds a collector; its metrics follow those already added.
    pub fn add(&mut self, collector: impl Collector) {
        self.registry.register_collector(Box::new(collector));
    }

    /// The metrics as of now, in Prometheus' text format. Fails only if a collector does.
    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut out = String::with_capacity(4096);
        prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The `/metrics` route: the rendered text with its content type, or 500 (logged) if a
/// collector failed.
pub fn route(exposition: Arc<Exposition>) -> axum::routing::MethodRouter {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    axum::routing::get(move || async move {
        match exposition.render() {
            Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
            Err(e) => {
                tracing::error!("rendering /metrics: {e}");
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        }
    })
}

/// The family name the library wants for a counter: the exported name without the `_total`
/// it adds back.
fn counter_family(name: &str) -> &str {
    name.strip_suffix("_total").unwrap_or(name)
}

/// One counter, `name` as exported (ending in `_total`).
pub fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    let m = e.encode_descriptor(counter_family(name), help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(m)
}

/// One counter per value of one label: `name{label="…"}`, in the order given.
pub fn labelled_counters<'v>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'v str, u64)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(counter_family(name), help, None, MetricType::Counter)?;
    for (value, n) in values {
        let labels = [(label, value)];
        ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One gauge.
pub fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    let m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(m)
}

/// A histogram from the count in each bucket (not cumulative): `buckets` pairs each upper
/// bound with the values recorded at or below it and above the bound before; values above
/// the last bound count only in `count`.
pub fn histogram(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    buckets: &[(f64, u64)],
    sum: f64,
    count: u64,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    m.encode_histogram::<NoLabelSet>(sum, count, buckets, None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Debug)]
    struct Fixed;

    impl Collector for Fixed {
        fn encode(&self, mut e: DescriptorEncoder<'_>) -> fmt::Result {
            counter(&mut e, "shoal_test_things_total", "Things.", 3)?;
            labelled_counters(&mut e, "shoal_test_dropped_total", "Drops, by reason.", "reason", [("a", 1), ("b", 2)])?;
            gauge(&mut e, "shoal_test_bound", "Bound now.", 7)?;
            histogram(&mut e, "shoal_test_seconds", "Latency.", &[(0.001, 2), (0.01, 1)], 0.0125, 4)
        }
    }

    #[test]
    fn every_shape_renders_in_the_text_format_with_help_and_type() {
        let text = Exposition::new(Fixed).render().unwrap();
        let want = "# HELP shoal_test_things_total Things.\n\
                    # TYPE shoal_test_things_total counter\n\
                    shoal_test_things_total 3\n\
                    # HELP shoal_test_dropped_total Drops, by reason.\n\
                    # TYPE shoal_test_dropped_total counter\n\
                    shoal_test_dropped_total{reason=\"a\"} 1\n\
                    shoal_test_dropped_total{reason=\"b\"} 2\n\
                    # HELP shoal_test_bound Bound now.\n\
                    # TYPE shoal_test_bound gauge\n\
                    shoal_test_bound 7\n\
                    # HELP shoal_test_seconds Latency.\n\
                    # TYPE shoal_test_seconds histogram\n\
                    shoal_test_seconds_bucket{le=\"0.001\"} 2\n\
                    shoal_test_seconds_bucket{le=\"0.01\"} 3\n\
                    shoal_test_seconds_bucket{le=\"+Inf\"} 4\n\
                    shoal_test_seconds_sum 0.0125\n\
                    shoal_test_seconds_count 4\n";
        assert_eq!(text, want);
    }
}
