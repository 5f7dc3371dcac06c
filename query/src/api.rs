//! The metrics API over HTTP: `POST /api/v2/query` with `Authorization: Bearer <read token>`.
//!
//! A read token belongs to one merchant: asking for another `site_id` is 403, whatever the
//! site; a missing or unknown token is 401; a request that can never be valid is 400 with a
//! message naming the field.

use std::sync::Arc;

use async_nats::jetstream::kv;
use axum::extract::Query;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use beacon_warehouse::Warehouse;

use crate::query::QueryRequest;

#[derive(Clone)]
struct AppState {
    warehouse: Arc<Warehouse>,
    merchants: kv::Store,
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({"error": self.1}))).into_response()
    }
}

pub fn router(warehouse: Arc<Warehouse>, merchants: kv::Store) -> Router {
    Router::new()
        .route("/api/v2/query", post(query))
        .route("/api/v1/stats/realtime/visitors", get(realtime))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(AppState {
            warehouse,
            merchants,
        })
}

/// The merchant the request's read token belongs to (401 otherwise).
async fn authorize(app: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            ApiError(
                StatusCode::UNAUTHORIZED,
                "missing `Authorization: Bearer <read token>`".into(),
            )
        })?;
    let merchant = crate::tokens::merchant_for(&app.merchants, token)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("token check: {e}")))?
        .ok_or_else(|| ApiError(StatusCode::UNAUTHORIZED, "not a read token".into()))?;
    Ok(merchant)
}

fn forbidden() -> ApiError {
    ApiError(
        StatusCode::FORBIDDEN,
        "this token does not grant access to that site_id".into(),
    )
}

#[derive(serde::Deserialize)]
struct RealtimeParams {
    site_id: String,
}

/// Unique visitors of the last 30 minutes (Plausible's realtime endpoint: a bare number),
/// from `events`, so as fresh as ingest (about a second).
async fn realtime(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<RealtimeParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let merchant = authorize(&app, &headers).await?;
    if params.site_id != merchant {
        return Err(forbidden());
    }
    let since = (chrono::Utc::now() - chrono::Duration::minutes(30)).format("%Y-%m-%dT%H:%M:%SZ");
    let sql = format!(
        "SELECT count(DISTINCT visitor_id) AS visitors FROM events \
         WHERE merchant_id = '{merchant}' AND ts >= TIMESTAMP '{since}'"
    );
    let rows = rows(&app, &sql).await?;
    Ok(Json(
        rows.first()
            .and_then(|r| r.get("visitors"))
            .cloned()
            .unwrap_or(0.into()),
    ))
}

async fn query(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let merchant = authorize(&app, &headers).await?;
    let request: QueryRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("query body: {e}")))?;
    if request.site_id != merchant {
        return Err(forbidden());
    }
    let plan = request
        .plan(&merchant, chrono::Utc::now())
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let mut rows = Vec::new();
    for sql in [plan.rollups_sql(), plan.sessions_sql(), plan.pages_sql()]
        .into_iter()
        .flatten()
    {
        rows.extend(self::rows(&app, &sql).await?);
    }
    Ok(Json(serde_json::json!({
        "results": plan.results(&rows),
        "meta": {},
        "query": {
            "site_id": merchant,
            "metrics": request.metrics,
            "date_range": [plan.from.to_rfc3339(), plan.to.to_rfc3339()],
            "dimensions": request.dimensions,
        },
    })))
}

/// Runs `sql` and returns its rows as JSON objects.
async fn rows(app: &AppState, sql: &str) -> Result<Vec<serde_json::Value>, ApiError> {
    let batches = app.warehouse.sql(sql).await.map_err(|e| {
        tracing::error!(error = %e, "metrics query");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the warehouse could not answer".into(),
        )
    })?;
    let json = beacon_warehouse::output::json(&batches)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    serde_json::from_str(&json)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// Serves the metrics API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    warehouse: Arc<Warehouse>,
    merchants: kv::Store,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(warehouse, merchants))
        .with_graceful_shutdown(shutdown)
        .await
}
