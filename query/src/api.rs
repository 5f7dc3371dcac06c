//! The metrics API over HTTP: `POST /api/v2/query` with `Authorization: Bearer <read token>`.
//!
//! A read token belongs to one merchant: asking for another `site_id` is 403, whatever the
//! site; a missing or unknown token is 401; a request that can never be valid is 400 with a
//! message naming the field (complexity limits included, checked before any SQL is built).
//!
//! Every request runs in a session derived for it under the query budget
//! ([`crate::budget`]): over the merchant's running-query slots it is 429 with
//! `Retry-After`, past the statement timeout 504, over its memory share 422.

use std::sync::Arc;

use async_nats::jetstream::kv;
use axum::extract::Query;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use beacon_warehouse::Warehouse;

use beacon_warehouse::WarehouseError;
use datafusion::prelude::SessionContext;

use crate::budget::{is_out_of_memory, Budget, Scope, Stopped};
use crate::cache::{CacheLimits, ResultCache, Served};
use crate::directory::{Directory, LookupError};
use crate::query::{Plan, QueryRequest, Source};

#[derive(Clone)]
struct AppState {
    warehouse: Arc<Warehouse>,
    directory: Arc<Directory>,
    budget: Arc<Budget>,
    answers: Arc<ResultCache>,
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.0, Json(serde_json::json!({"error": self.1}))).into_response();
        if self.0 == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        resp
    }
}

/// The answer for a query that failed: the budget's stops are the client's to act on.
fn query_failed(e: &WarehouseError) -> ApiError {
    if let WarehouseError::DataFusion(df) = e {
        match Stopped::of(df) {
            Some(s @ (Stopped::Busy { .. } | Stopped::ServerBusy(_))) => {
                return ApiError(StatusCode::TOO_MANY_REQUESTS, s.to_string())
            }
            Some(s @ Stopped::Timeout(_)) => {
                return ApiError(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("{s}: narrow the date range or the filters"),
                )
            }
            Some(s @ Stopped::Cancelled) => {
                return ApiError(StatusCode::SERVICE_UNAVAILABLE, s.to_string())
            }
            None if is_out_of_memory(df) => {
                return ApiError(StatusCode::UNPROCESSABLE_ENTITY, df.to_string())
            }
            None => {}
        }
    }
    tracing::error!(error = %e, "metrics query");
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        "the warehouse could not answer".into(),
    )
}

/// A session for one request of `merchant`, under the query budget.
async fn session(app: &AppState, merchant: &str) -> Result<SessionContext, ApiError> {
    budgeted_session(&app.warehouse, &app.budget, merchant)
        .await
        .map_err(|e| query_failed(&e))
}

/// A session over every row whose queries run under `budget` for `merchant` (the metrics
/// API scopes rows in its SQL; public for the query benchmark).
pub async fn budgeted_session(
    warehouse: &Warehouse,
    budget: &Arc<Budget>,
    merchant: &str,
) -> Result<SessionContext, WarehouseError> {
    let base = warehouse.shared_session().await?;
    let scope = Scope::new(merchant, budget.limits().statement_timeout);
    Ok(budget.session(base, scope)?)
}

pub fn router(
    warehouse: Arc<Warehouse>,
    directory: Arc<Directory>,
    budget: Arc<Budget>,
    answers: Arc<ResultCache>,
) -> Router {
    Router::new()
        .route("/api/v2/query", post(query))
        .route("/api/v1/stats/realtime/visitors", get(realtime))
        .route("/api/v2/realtime", get(realtime_all))
        .route("/api/v2/openapi.json", get(openapi))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(AppState {
            warehouse,
            directory,
            budget,
            answers,
        })
}

/// The checked-in OpenAPI description of this API (docs/openapi.json).
async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../../docs/openapi.json"),
    )
        .into_response()
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
    let merchant = app
        .directory
        .merchant_for(token)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("token check: {e}")))?
        .ok_or_else(|| ApiError(StatusCode::UNAUTHORIZED, "not a read token".into()))?;
    Ok(merchant.to_string())
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

/// Visitors, page views and events of the last 30 minutes, from `events`, so as fresh as
/// ingest (about a second).
async fn realtime_counts(app: &AppState, merchant: &str) -> Result<serde_json::Value, ApiError> {
    let since = (chrono::Utc::now() - chrono::Duration::minutes(30)).format("%Y-%m-%dT%H:%M:%SZ");
    let sql = format!(
        "SELECT count(DISTINCT visitor_id) AS visitors, \
                CAST(sum(CASE WHEN name = 'pageview' THEN 1 ELSE 0 END) AS BIGINT) AS pageviews, \
                count(*) AS events \
         FROM events WHERE merchant_id = '{merchant}' AND ts >= TIMESTAMP '{since}'"
    );
    let ctx = session(app, merchant).await?;
    let row = sql_rows(&ctx, &sql)
        .await
        .map_err(|e| query_failed(&e))?
        .into_iter()
        .next()
        .unwrap_or_default();
    let n = |k: &str| {
        row.get(k)
            .cloned()
            .filter(|v| !v.is_null())
            .unwrap_or(0.into())
    };
    Ok(serde_json::json!({
        "visitors": n("visitors"),
        "pageviews": n("pageviews"),
        "events": n("events"),
    }))
}

/// The realtime counts of the site the token may read.
async fn realtime_for(
    app: &AppState,
    headers: &HeaderMap,
    site_id: &str,
) -> Result<serde_json::Value, ApiError> {
    let merchant = authorize(app, headers).await?;
    if site_id != merchant {
        return Err(forbidden());
    }
    realtime_counts(app, &merchant).await
}

/// Plausible's realtime endpoint: the last 30 minutes' unique visitors, a bare number.
async fn realtime(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<RealtimeParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let counts = realtime_for(&app, &headers, &params.site_id).await?;
    Ok(Json(counts["visitors"].clone()))
}

/// Visitors, page views and events of the last 30 minutes, as an object.
async fn realtime_all(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<RealtimeParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(realtime_for(&app, &headers, &params.site_id).await?))
}

async fn query(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let merchant = authorize(&app, &headers).await?;
    let request: QueryRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("query body: {e}")))?;
    if request.site_id != merchant {
        return Err(forbidden());
    }
    let tz = app.directory.timezone(&merchant).await.map_err(|e| {
        let status = match *e {
            LookupError::Bucket(_) => StatusCode::SERVICE_UNAVAILABLE,
            LookupError::BadZone(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    })?;
    let plan = request
        .plan(&merchant, tz, chrono::Utc::now())
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let sources = plan.sources();
    let (results, served) = answer(&app.warehouse, &app.budget, &app.answers, &plan, &sources)
        .await
        .map_err(|e| query_failed(&e))?;
    let from = plan.from.with_timezone(&plan.tz);
    let to = plan.to.with_timezone(&plan.tz);
    let mut response = Json(serde_json::json!({
        "results": *results,
        "meta": {
            "time_zone": plan.tz.name(),
            "sources": sources.iter().map(|s| format!("{:?}", s.kind).to_lowercase()).collect::<Vec<_>>(),
        },
        "query": {
            "site_id": merchant,
            "metrics": request.metrics,
            "date_range": [from.to_rfc3339(), to.to_rfc3339()],
            "dimensions": request.dimensions,
            "filters": request.filters,
        },
    }))
    .into_response();
    response.headers_mut().insert(
        CACHE_HEADER,
        header::HeaderValue::from_static(served.as_str()),
    );
    Ok(response)
}

/// Says whether the answer was computed for this request (`miss`) or served from the result
/// cache (`hit`, including a computation this request waited for).
pub const CACHE_HEADER: &str = "x-beacon-cache";

/// The answer of `plan`: from `answers` while nothing its sources read has a new snapshot,
/// else computed in a session under `budget` (what the handler does; public for the
/// query benchmark).
pub async fn answer(
    warehouse: &Warehouse,
    budget: &Arc<Budget>,
    answers: &ResultCache,
    plan: &Plan,
    sources: &[Source],
) -> Result<(Arc<Vec<serde_json::Value>>, Served), Arc<WarehouseError>> {
    let mut tables: Vec<&str> = Vec::new();
    for t in sources.iter().flat_map(|s| s.tables.iter()) {
        if !tables.contains(t) {
            tables.push(t);
        }
    }
    let snapshots = warehouse
        .serving_snapshots(&tables)
        .await
        .map_err(Arc::new)?;
    answers
        .get_or_compute(plan, sources, &snapshots, async {
            let ctx = budgeted_session(warehouse, budget, &plan.merchant_id).await?;
            execute(&ctx, plan, sources).await
        })
        .await
}

/// Runs `sql` (read-only) in `ctx` and returns its rows as JSON objects.
async fn sql_rows(
    ctx: &SessionContext,
    sql: &str,
) -> Result<Vec<serde_json::Value>, WarehouseError> {
    let batches = ctx
        .sql_with_options(sql, beacon_warehouse::read_only())
        .await?
        .collect()
        .await?;
    beacon_warehouse::output::json_rows(&batches)
}

/// Runs `sources` (a plan's, or [`Plan::events_sources`]) and merges their rows into the
/// API's `results`: what the handler does, public for the query benchmark.
pub async fn execute(
    ctx: &SessionContext,
    plan: &Plan,
    sources: &[Source],
) -> Result<Vec<serde_json::Value>, WarehouseError> {
    let mut rows = Vec::new();
    for source in sources {
        rows.push((source.kind, sql_rows(ctx, &source.sql).await?));
    }
    Ok(plan.results(&rows))
}

/// Serves the metrics API on `listener` until `shutdown` resolves (connections capped,
/// header and body deadlines: [`beacon_serve::http`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    warehouse: Arc<Warehouse>,
    merchants: kv::Store,
    budget: Arc<Budget>,
    cache: CacheLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let directory = Directory::start(merchants)
        .await
        .map_err(std::io::Error::other)?;
    beacon_serve::http::serve(
        listener,
        router(
            warehouse,
            directory,
            budget,
            Arc::new(ResultCache::new(cache)),
        ),
        beacon_serve::http::HttpLimits::default(),
        "metrics-http",
        shutdown,
    )
    .await;
    Ok(())
}
