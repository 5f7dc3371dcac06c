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

use async_nats::jetstream;
use axum::extract::Query;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use beacon_warehouse::Warehouse;

use beacon_warehouse::WarehouseError;
use datafusion::prelude::SessionContext;

use crate::annotations::Annotations;
use crate::budget::{is_out_of_memory, Budget, Stopped};
use crate::cache::{CacheLimits, ResultCache, Served};
use crate::dashboard::{Logins, SessionError};
use crate::directory::{Directory, LookupError};
use crate::metrics::{
    json_rows, logical, Answer, AnswerError, MerchantSessions, Plan, QueryRequest, Source,
};

#[derive(Clone)]
struct AppState {
    sessions: Arc<MerchantSessions>,
    directory: Arc<Directory>,
    budget: Arc<Budget>,
    answers: Arc<ResultCache>,
    logins: Arc<Logins>,
    annotations: Arc<Annotations>,
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
    app.sessions
        .budgeted(&app.budget, merchant)
        .await
        .map_err(|e| query_failed(&e))
}

/// What the API's handlers share.
pub struct Parts {
    pub sessions: Arc<MerchantSessions>,
    pub directory: Arc<Directory>,
    pub budget: Arc<Budget>,
    pub answers: Arc<ResultCache>,
    /// Dashboard logins: the API also accepts their session cookie.
    pub logins: Arc<Logins>,
    pub annotations: Arc<Annotations>,
}

/// The metrics API and the dashboard that calls it.
pub fn router(parts: Parts) -> Router {
    let dashboard = crate::dashboard::router(parts.directory.clone(), parts.logins.clone());
    Router::new()
        .route("/api/v2/query", post(query))
        .route("/api/v1/stats/realtime/visitors", get(realtime))
        .route("/api/v2/realtime", get(realtime_all))
        .route("/api/v2/annotations", get(annotations))
        .route("/api/v2/openapi.json", get(openapi))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(AppState {
            sessions: parts.sessions,
            directory: parts.directory,
            budget: parts.budget,
            answers: parts.answers,
            logins: parts.logins,
            annotations: parts.annotations,
        })
        .merge(dashboard)
}

/// The checked-in OpenAPI description of this API (docs/openapi.json).
async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../../docs/openapi.json"),
    )
        .into_response()
}

/// The merchant the request's read token belongs to, or its dashboard session's (401
/// otherwise). A request with an `Authorization` header is judged by that header alone.
async fn authorize(app: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    if !headers.contains_key(header::AUTHORIZATION) {
        match app.logins.merchant(headers, &app.directory).await {
            Ok(m) => return Ok(m.to_string()),
            Err(SessionError::Lookup(e)) => {
                return Err(ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("token check: {e}"),
                ))
            }
            Err(SessionError::None) => {}
        }
    }
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
    let since = chrono::Utc::now() - chrono::Duration::minutes(30);
    let ctx = session(app, merchant).await?;
    let recent = logical::recent(&ctx, since)
        .await
        .map_err(|e| query_failed(&e.into()))?;
    let row = json_rows(recent)
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

/// What changed the site's numbers: pipeline changes and re-processing, oldest first.
async fn annotations(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<RealtimeParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let merchant = authorize(&app, &headers).await?;
    if params.site_id != merchant {
        return Err(forbidden());
    }
    let list = app.annotations.of(&merchant).await.map_err(|e| {
        tracing::warn!(error = %e, "annotations");
        ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    })?;
    Ok(Json(serde_json::json!({ "annotations": &*list })))
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
    let started = std::time::Instant::now();
    let answered = answer(&app.sessions, &app.budget, &app.answers, &plan, &sources).await;
    let outcome = match &answered {
        Ok((_, served)) => served.as_str(),
        Err(_) => "error",
    };
    metrics::counter!("beacon_query_answers_total", "cache" => outcome).increment(1);
    // Which tables answered (rollups, events, sessions, revenue): a handful of values.
    let read = sources
        .iter()
        .map(|s| format!("{:?}", s.kind).to_lowercase())
        .collect::<Vec<_>>()
        .join("+");
    metrics::histogram!("beacon_query_seconds", "cache" => outcome, "sources" => read)
        .record(started.elapsed().as_secs_f64());
    let (answer, served) = answered.map_err(|e| match &*e {
        AnswerError::Invalid(q) => ApiError(StatusCode::BAD_REQUEST, q.to_string()),
        AnswerError::Warehouse(w) => query_failed(w),
    })?;
    let from = plan.from.with_timezone(&plan.tz);
    let to = plan.to.with_timezone(&plan.tz);
    let mut meta = serde_json::Map::new();
    meta.insert("time_zone".into(), plan.tz.name().into());
    meta.insert(
        "sources".into(),
        sources
            .iter()
            .map(|s| format!("{:?}", s.kind).to_lowercase())
            .collect::<Vec<_>>()
            .into(),
    );
    meta.extend(answer.meta.clone());
    let mut response = Json(serde_json::json!({
        "results": answer.results,
        "meta": meta,
        "query": {
            "site_id": merchant,
            "metrics": request.metrics,
            "date_range": [from.to_rfc3339(), to.to_rfc3339()],
            "dimensions": request.dimensions,
            "filters": request.filters,
            "include": request.include,
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
/// else computed in the merchant's session under `budget` (what the handler does; public
/// for the query benchmark).
pub async fn answer(
    sessions: &MerchantSessions,
    budget: &Arc<Budget>,
    answers: &ResultCache,
    plan: &Plan,
    sources: &[Source],
) -> Result<(Arc<Answer>, Served), Arc<AnswerError>> {
    let read = sessions
        .snapshots(sources)
        .await
        .map_err(|e| Arc::new(AnswerError::from(e)))?;
    let snapshots: Vec<Option<i64>> = read.iter().map(|(_, s)| *s).collect();
    answers
        .get_or_compute(plan, sources, &snapshots, async {
            sessions.run(budget, plan, sources, &read).await
        })
        .await
}

/// Serves the metrics API on `listener` until `shutdown` resolves (connections capped,
/// header and body deadlines: [`beacon_serve::http`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    warehouse: Arc<Warehouse>,
    js: jetstream::Context,
    budget: Arc<Budget>,
    cache: CacheLimits,
    health: beacon_serve::Health,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // The merchants bucket: the caller created it (the registry owns its settings).
    let merchants = js
        .get_key_value(beacon_proto::bus::MERCHANTS_BUCKET)
        .await
        .map_err(std::io::Error::other)?;
    let directory = Directory::start(merchants)
        .await
        .map_err(std::io::Error::other)?;
    // Ready = every table's metadata loads (a corrupt file is named in the check).
    let probe = {
        let warehouse = warehouse.clone();
        health.probe(
            "tables",
            std::time::Duration::from_secs(5),
            std::time::Duration::from_secs(5),
            move || {
                let warehouse = warehouse.clone();
                async move { warehouse.check().await.map_err(|e| e.to_string()) }
            },
        )
    };
    beacon_serve::http::serve(
        listener,
        router(Parts {
            sessions: Arc::new(MerchantSessions::new(warehouse).with_slices(cache.slice_bytes)),
            directory,
            budget,
            answers: Arc::new(ResultCache::new(cache)),
            logins: Arc::new(Logins::default()),
            annotations: Arc::new(Annotations::new(js)),
        })
        .merge(health.router()),
        beacon_serve::http::HttpLimits::default(),
        "metrics-http",
        shutdown,
    )
    .await;
    probe.abort();
    Ok(())
}
