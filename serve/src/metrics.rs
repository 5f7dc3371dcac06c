//! `GET /metrics` in Prometheus' text format, for every role.
//!
//! The libraries record through the `metrics` facade (a no-op until a recorder is
//! installed, so tests and embedders pay nothing); the binary calls [`install`] once at
//! start, and every HTTP server of the process serves the same registry with [`router`].
//! Names and what to alert on: docs/OPERATIONS.md.

use std::sync::OnceLock;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets (seconds) for the `_seconds` histograms: 1 ms to 30 s.
const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs the process-wide Prometheus recorder (idempotent; an error if another recorder
/// was installed first).
pub fn install() -> Result<(), String> {
    if HANDLE.get().is_some() {
        return Ok(());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .map_err(|e| e.to_string())?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
    let _ = HANDLE.set(handle.clone());
    // Keeps histograms bounded: the exporter drains them on render and here, regularly.
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                handle.run_upkeep();
            }
        });
    }
    Ok(())
}

/// `GET /metrics` for any router state: 404 until [`install`] ran.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/metrics", get(|| std::future::ready(render())))
}

fn render() -> Response {
    match HANDLE.get() {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` (with `health`'s checks) on a listener of
/// their own (`--metrics-listen`), until `shutdown`: for roles without an HTTP port
/// (ingest, rollups) and for those whose port faces the public (the edge's collectors), so
/// that only the scraper and the orchestrator reach them.
pub async fn serve_status(
    listener: tokio::net::TcpListener,
    health: crate::Health,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let router = router().merge(health.router());
    crate::http::serve(
        listener,
        router,
        crate::http::HttpLimits {
            max_conns_per_ip: 16,
            max_conns: 64,
            ..Default::default()
        },
        "status",
        shutdown,
    )
    .await;
}
