//! The admin HTTP API: the control plane over HTTP, for operators' tools and dashboards.
//!
//! Every request needs `Authorization: Bearer <admin token>`. Admin tokens are configured
//! as `name:secret` pairs (`BEACON_ADMIN_TOKENS`); the name is recorded as who made each
//! change. Write keys (collection-only, public) are never admin tokens.
//!
//! | method | path | does |
//! |---|---|---|
//! | GET | `/v1/plugins` | uploaded components |
//! | POST | `/v1/plugins?name=N` (body: the `.wasm`) | validate and store |
//! | GET | `/v1/merchants/{m}/pipeline` | current pipeline and revision |
//! | POST | `/v1/merchants/{m}/pipeline` (body: `Activation`) | new version, active or canary |
//! | POST | `/v1/merchants/{m}/pipeline/promote` | canary becomes active |
//! | POST | `/v1/merchants/{m}/pipeline/rollback` (`{"to": N}` optional) | re-activate a version |
//! | GET | `/v1/merchants/{m}/pipeline/history` | every change, who/when/why |
//! | GET | `/v1/merchants/{m}/pipeline/versions/{n}` | one stored version |
//! | GET | `/v1/edges` | live edges and the revisions they run |
//! | GET | `/v1/merchants?q=&after=` | merchants with a pipeline, by id: name, active version, canary (500 a page; `q`: part of the id; `after`: the last id of the page before) |
//! | GET | `/v1/ingest` | the events stream and the ingest consumer: backlog, acknowledged |
//!
//! The operator's page (`/ops/`, [`crate::ops`]) calls these with its session cookie instead
//! of the header.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use sha2::{Digest, Sha256};

use crate::pipelines::Activation;
use crate::{Control, ControlError};

/// Admin tokens, kept as (name, sha256 of the secret).
#[derive(Clone, Default)]
pub struct AdminTokens(Vec<(String, [u8; 32])>);

#[derive(Debug, thiserror::Error)]
#[error("admin tokens must be `name:secret` pairs separated by commas, with secrets of at least 16 characters")]
pub struct BadTokens;

impl AdminTokens {
    /// Parses `name:secret,name:secret`.
    pub fn parse(spec: &str) -> Result<Self, BadTokens> {
        let mut out = Vec::new();
        for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, secret) = pair.split_once(':').ok_or(BadTokens)?;
            if name.is_empty() || secret.len() < 16 {
                return Err(BadTokens);
            }
            out.push((name.to_string(), Sha256::digest(secret.as_bytes()).into()));
        }
        if out.is_empty() {
            return Err(BadTokens);
        }
        Ok(Self(out))
    }

    /// The name of the token `secret` is, if any. Compares hashes in constant time.
    pub fn check(&self, secret: &str) -> Option<&str> {
        let h: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let mut found = None;
        for (name, want) in &self.0 {
            let diff = want
                .iter()
                .zip(h.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(name.as_str());
            }
        }
        found
    }
}

/// Who made the request (the admin token's name): a request extension every handler, also
/// those of [`router`]'s `extra` routes, can read.
#[derive(Clone)]
pub struct Caller(pub String);

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({"error": self.1}))).into_response()
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let status = match &e {
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Invalid(_) | ControlError::Plugin(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ControlError::Conflict(_) => StatusCode::CONFLICT,
            ControlError::NotApplied(_) => StatusCode::ACCEPTED,
            ControlError::Nats(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, e.to_string())
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The admin API router. `extra` routes (served by the binary, e.g. history rewrites that
/// need the warehouse) sit behind the same authentication.
pub fn router(control: Control, tokens: AdminTokens, extra: Router) -> Router {
    let max_upload = control.runtime.limits().max_component_bytes + 4096;
    let tokens = Arc::new(tokens);
    let logins = Arc::new(crate::ops::OpsLogins::new(tokens.clone()));
    let auth = logins.clone();
    Router::new()
        .route("/v1/plugins", get(list_plugins).post(upload))
        .route("/v1/merchants/{m}/pipeline", get(current).post(activate))
        .route("/v1/merchants/{m}/pipeline/promote", post(promote))
        .route("/v1/merchants/{m}/pipeline/rollback", post(rollback))
        .route("/v1/merchants/{m}/pipeline/history", get(history))
        .route("/v1/merchants/{m}/pipeline/versions/{n}", get(version))
        .route("/v1/edges", get(edges))
        .route("/v1/merchants", get(merchants))
        .route("/v1/ingest", get(ingest))
        .with_state(control)
        .merge(extra)
        .layer(DefaultBodyLimit::max(max_upload))
        .layer(middleware::from_fn(move |req, next| {
            authenticate(tokens.clone(), auth.clone(), req, next)
        }))
        .merge(crate::ops::router(logins))
}

async fn authenticate(
    tokens: Arc<AdminTokens>,
    logins: Arc<crate::ops::OpsLogins>,
    mut req: Request,
    next: Next,
) -> Response {
    use crate::ops::CookieAuth;
    if !req.headers().contains_key(header::AUTHORIZATION) {
        match logins.authenticate(req.method(), req.headers()) {
            CookieAuth::Caller(name) => {
                req.extensions_mut().insert(Caller(name));
                return next.run(req).await;
            }
            CookieAuth::MissingCsrf => {
                return ApiError(
                    StatusCode::FORBIDDEN,
                    format!(
                        "a change made with the operator page's session needs the `{}: 1` header",
                        crate::ops::CSRF_HEADER
                    ),
                )
                .into_response()
            }
            CookieAuth::None => {}
        }
    }
    let secret = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(secret) = secret else {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "missing `Authorization: Bearer <admin token>`".into(),
        )
        .into_response();
    };
    match tokens.check(secret) {
        Some(name) => {
            let caller = Caller(name.to_string());
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        None => ApiError(StatusCode::UNAUTHORIZED, "not an admin token".into()).into_response(),
    }
}

async fn list_plugins(State(c): State<Control>) -> ApiResult<Vec<beacon_proto::bus::PluginInfo>> {
    Ok(Json(c.list_plugins().await?))
}

#[derive(serde::Deserialize)]
struct UploadQuery {
    name: String,
    #[serde(default)]
    config: String,
}

async fn upload(
    State(c): State<Control>,
    Extension(Caller(who)): Extension<Caller>,
    Query(q): Query<UploadQuery>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<crate::registry::Uploaded>), ApiError> {
    let up = c
        .upload(&q.name, body.to_vec(), &q.config, None, &who)
        .await?;
    let status = if up.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(up)))
}

async fn current(
    State(c): State<Control>,
    Path(m): Path<String>,
) -> ApiResult<crate::pipelines::Change> {
    c.current(&m)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("{m} has no pipeline")))
}

async fn activate(
    State(c): State<Control>,
    Extension(Caller(who)): Extension<Caller>,
    Path(m): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<crate::pipelines::Change> {
    // Parsed by hand so a bad body gets a message naming the field, as JSON.
    let activation: Activation = serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("activation body: {e}")))?;
    Ok(Json(c.activate(&m, &activation, &who).await?))
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ChangeBody {
    #[serde(default)]
    to: Option<u64>,
    #[serde(default)]
    reason: String,
    /// The revision the caller decided on (the operator page sends the one it shows): the
    /// change is refused with 409 if the pipeline moved on since.
    #[serde(default)]
    expect_revision: Option<u64>,
}

fn change_body(body: &[u8]) -> Result<ChangeBody, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ChangeBody::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("body: {e}")))
}

async fn promote(
    State(c): State<Control>,
    Extension(Caller(who)): Extension<Caller>,
    Path(m): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<crate::pipelines::Change> {
    let b = change_body(&body)?;
    Ok(Json(
        c.promote_seen(&m, b.expect_revision, &who, &b.reason)
            .await?,
    ))
}

async fn rollback(
    State(c): State<Control>,
    Extension(Caller(who)): Extension<Caller>,
    Path(m): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<crate::pipelines::Change> {
    let b = change_body(&body)?;
    Ok(Json(
        c.rollback_seen(&m, b.to, b.expect_revision, &who, &b.reason)
            .await?,
    ))
}

async fn history(
    State(c): State<Control>,
    Path(m): Path<String>,
) -> ApiResult<Vec<crate::pipelines::HistoryEntry>> {
    Ok(Json(c.history(&m).await?))
}

async fn version(
    State(c): State<Control>,
    Path((m, n)): Path<(String, u64)>,
) -> ApiResult<beacon_proto::bus::PipelineDef> {
    Ok(Json(c.version(&m, n).await?))
}

async fn edges(State(c): State<Control>) -> ApiResult<Vec<beacon_proto::bus::EdgeStatus>> {
    Ok(Json(crate::edges::live_edges(&c.js).await?))
}

/// Merchants on one page of `GET /v1/merchants`.
const MERCHANTS_LISTED: usize = 500;

#[derive(serde::Deserialize, Default)]
struct MerchantsQuery {
    /// Part of the merchant id, any case.
    #[serde(default)]
    q: Option<String>,
    /// The page after this id.
    #[serde(default)]
    after: Option<String>,
}

/// The ids of one page: those containing `q` (any case) after `after`, in order, at most
/// `n`; and whether more follow.
fn page_of(mut ids: Vec<String>, query: &MerchantsQuery, n: usize) -> (Vec<String>, bool) {
    let needle = query.q.as_deref().unwrap_or("").to_lowercase();
    ids.retain(|id| {
        query
            .after
            .as_deref()
            .is_none_or(|after| id.as_str() > after)
            && id.to_lowercase().contains(&needle)
    });
    ids.sort_unstable();
    let more = ids.len() > n;
    ids.truncate(n);
    (ids, more)
}

/// One merchant's line on the operator page.
#[derive(serde::Serialize)]
struct MerchantLine {
    id: String,
    /// The revision of its pipelines-bucket entry (changes from the page name it).
    revision: u64,
    name: Option<String>,
    active_version: u64,
    plugins: Vec<String>,
    canary: Option<(u64, u8)>,
    changed_at: i64,
    changed_by: String,
}

/// One page of merchants with a pipeline, in id order. Listing the bucket's keys is one
/// pass over key names (no values); only the page's entries are read.
async fn merchants(
    State(c): State<Control>,
    Query(query): Query<MerchantsQuery>,
) -> ApiResult<serde_json::Value> {
    use futures::StreamExt;
    let names =
        c.js.get_key_value(beacon_proto::bus::MERCHANTS_BUCKET)
            .await
            .ok();
    let mut keys = c.pipelines.keys().await.map_err(crate::nats)?;
    let mut all = Vec::new();
    while let Some(key) = keys.next().await {
        all.push(key.map_err(crate::nats)?);
    }
    let (ids, truncated) = page_of(all, &query, MERCHANTS_LISTED);
    let mut out = Vec::with_capacity(ids.len());
    for key in ids {
        let Some(change) = c.current(&key).await? else {
            continue;
        };
        let name = match &names {
            Some(store) => store
                .get(format!("m.{key}"))
                .await
                .ok()
                .flatten()
                .and_then(|v| serde_json::from_slice::<beacon_proto::bus::Merchant>(&v).ok())
                .map(|m| m.name),
            None => None,
        };
        let p = change.pipeline;
        out.push(MerchantLine {
            id: key,
            revision: change.revision,
            name,
            active_version: p.active.version,
            plugins: p.active.plugins.iter().map(|r| r.name.clone()).collect(),
            canary: p.canary.as_ref().map(|c| (c.def.version, c.percent)),
            changed_at: p.changed_at,
            changed_by: p.changed_by,
        });
    }
    // `next`: the `after` of the following page.
    let next = truncated
        .then(|| out.last().map(|m| m.id.clone()))
        .flatten();
    Ok(Json(
        serde_json::json!({"merchants": out, "truncated": truncated, "next": next}),
    ))
}

/// The events stream and the ingest consumer: what is stored, what ingest has yet to commit.
async fn ingest(State(c): State<Control>) -> ApiResult<serde_json::Value> {
    use beacon_proto::bus::{EVENTS_STREAM, INGEST_CONSUMER};
    let unavailable = |e: &dyn std::fmt::Display| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("events stream: {e}"),
        )
    };
    let mut stream =
        c.js.get_stream(EVENTS_STREAM)
            .await
            .map_err(|e| unavailable(&e))?;
    let info = stream.info().await.map_err(|e| unavailable(&e))?.clone();
    let ms = |t: time::OffsetDateTime| (t.unix_timestamp_nanos() / 1_000_000) as i64;
    // Ingest reads the stream through a consumer per partition (one unless it is split):
    // the backlog is their sum, and everything is committed up to the lowest ack floor.
    let (infos, error) = match beacon_proto::stores::current_ingest_consumers(&stream).await {
        Ok(current) => (current.into_values().collect::<Vec<_>>(), None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let consumer = match (error, infos.is_empty()) {
        (Some(e), _) => serde_json::json!({"name": INGEST_CONSUMER, "error": e}),
        (None, true) => {
            serde_json::json!({"name": INGEST_CONSUMER, "error": "ingest has not started"})
        }
        (None, false) => serde_json::json!({
            "name": INGEST_CONSUMER,
            "partitions": infos.len(),
            "pending": infos.iter().map(|ci| ci.num_pending).sum::<u64>(),
            "ack_pending": infos.iter().map(|ci| ci.num_ack_pending).sum::<usize>(),
            "delivered_sequence": infos.iter().map(|ci| ci.delivered.stream_sequence).max(),
            "acknowledged_sequence": infos.iter().map(|ci| ci.ack_floor.stream_sequence).min(),
            "last_acknowledged_at": infos.iter().filter_map(|ci| ci.ack_floor.last_active).max().map(ms),
            "waiting": infos.iter().map(|ci| ci.num_waiting).sum::<usize>(),
        }),
    };
    Ok(Json(serde_json::json!({
        "stream": {
            "name": EVENTS_STREAM,
            "messages": info.state.messages,
            "bytes": info.state.bytes,
            "first_sequence": info.state.first_sequence,
            "last_sequence": info.state.last_sequence,
            "last_at": ms(info.state.last_timestamp),
        },
        "consumer": consumer,
    })))
}

/// Serves the admin API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    control: Control,
    tokens: AdminTokens,
    extra: Router,
    health: beacon_serve::Health,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    beacon_serve::http::serve(
        listener,
        // Health and metrics are outside the token check: orchestrators and Prometheus
        // call them without credentials (the admin port is the operators' network).
        router(control, tokens, extra)
            .merge(health.router())
            .merge(beacon_serve::metrics::router()),
        beacon_serve::http::HttpLimits::default(),
        "admin-http",
        shutdown,
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn merchant_pages_walk_every_id_once_in_order_and_search_any_case() {
        let all = ids(&["m_d", "m_a", "shop_C", "m_b", "shop_e"]);
        let q = |q: Option<&str>, after: Option<&str>| MerchantsQuery {
            q: q.map(String::from),
            after: after.map(String::from),
        };
        assert_eq!(
            page_of(all.clone(), &q(None, None), 2),
            (ids(&["m_a", "m_b"]), true)
        );
        assert_eq!(
            page_of(all.clone(), &q(None, Some("m_b")), 2),
            (ids(&["m_d", "shop_C"]), true)
        );
        assert_eq!(
            page_of(all.clone(), &q(None, Some("shop_C")), 2),
            (ids(&["shop_e"]), false)
        );
        assert_eq!(
            page_of(all.clone(), &q(Some("SHOP_c"), None), 2),
            (ids(&["shop_C"]), false)
        );
        assert_eq!(page_of(all, &q(Some("zz"), None), 2), (vec![], false));
    }
}
