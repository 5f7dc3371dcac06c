//! The HTTP collectors: existing trackers' wire shapes on one port, beside RSocket/QUIC.
//!
//! Status discipline (what trackers' retry logic expects):
//! - 2xx only once every event of the request is durable in JetStream (events that fail
//!   validation are durable too: in `failed_events`);
//! - 4xx for input that will never be valid (malformed, unknown merchant, bad secret, over a
//!   size limit), with a short reason; trackers drop these;
//! - 429 (rate limit) and 503 (pipeline cannot take it now) with `Retry-After`; trackers
//!   retry, and requests that carry their own event ids are stored once.
//!
//! CORS: browser trackers send with credentials, so the origin is echoed (never `*`) with
//! `Access-Control-Allow-Credentials: true`, and preflights are answered.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Query, RawQuery, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use beacon_proto::bus::TrackerId;

use crate::enrich::ClientCtx;
use crate::limits::Limited;
use crate::locate::Locator;
use crate::process::{Incoming, MerchantBatch, ProcessError, Processor, Submission};
use crate::registry::{hash_write_key, Registry, Trust};
use beacon_collect::{self as collect, ga4, Decoded};
use beacon_serve::conn_limit::ClientAddr;

#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Largest request body (tp2 batches, multi-hit gtag bodies).
    pub max_body: usize,
    /// Take the client address from the last `X-Forwarded-For` hop, the one the trusted
    /// proxy or CDN appended (behind one only: anyone can send the header), and the end
    /// user's address a payload carries (a Snowplow event's `ip`, GA4 `ip_override`), which
    /// servers sending on users' behalf set.
    pub trust_forwarded_for: bool,
    /// Open connections from one address (the peer's, not the forwarded one).
    pub max_conns_per_ip: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_body: 1 << 20,
            trust_forwarded_for: false,
            max_conns_per_ip: 256,
        }
    }
}

#[derive(Clone)]
pub struct App {
    pub registry: Registry,
    pub processor: Arc<Processor>,
    pub locator: Locator,
    pub limits: HttpLimits,
    pub health: beacon_serve::Health,
}

pub fn router(app: App) -> Router {
    let max_body = app.limits.max_body;
    let health = app.health.router();
    Router::new()
        .route("/com.snowplowanalytics.snowplow/tp2", post(snowplow_post))
        .route("/i", get(snowplow_get))
        .route("/mp/collect", post(mp_collect))
        .route("/debug/mp/collect", post(mp_debug))
        .route("/g/collect", get(gtag).post(gtag))
        .route("/api/event", post(plausible))
        .route("/locate", get(locate))
        .merge(health)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(cors))
        .with_state(app)
}

/// Serves until `shutdown` resolves; in-flight requests finish first. Connections are
/// capped per address and in total, with header and body deadlines ([`beacon_serve::http`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let limits = beacon_serve::http::HttpLimits {
        max_conns_per_ip: app.limits.max_conns_per_ip,
        ..Default::default()
    };
    beacon_serve::http::serve(listener, router(app), limits, "edge-http", shutdown).await;
}

async fn cors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let preflight = req.method() == Method::OPTIONS;
    let requested = req
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned();
    let mut resp = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(req).await
    };
    if let Some(origin) = origin {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        if preflight {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                requested.unwrap_or_else(|| HeaderValue::from_static("Content-Type")),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("86400"),
            );
        }
    }
    resp
}

/// Why a request was not taken, as the tracker must see it.
#[derive(Debug)]
pub enum HttpError {
    BadRequest(String),
    Unauthorized(String),
    Forbidden(String),
    TooLarge(String),
    Limited(Limited),
    Unavailable(String),
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        // Every refused request of the HTTP collectors, whatever stage refused it.
        let reason = match &self {
            HttpError::BadRequest(_) => "bad_request",
            HttpError::Unauthorized(_) => "unauthorized",
            HttpError::Forbidden(_) => "forbidden",
            HttpError::TooLarge(_) => "too_large",
            HttpError::Limited(_) => "limited",
            HttpError::Unavailable(_) => "unavailable",
        };
        metrics::counter!("beacon_edge_http_refused_total", "reason" => reason).increment(1);
        let (status, msg, retry_after) = match self {
            HttpError::BadRequest(m) => (StatusCode::BAD_REQUEST, m, None),
            HttpError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m, None),
            HttpError::Forbidden(m) => (StatusCode::FORBIDDEN, m, None),
            HttpError::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, m, None),
            HttpError::Limited(l) => (
                StatusCode::TOO_MANY_REQUESTS,
                l.to_string(),
                Some(l.retry_after_ms().div_ceil(1000)),
            ),
            HttpError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m, Some(1)),
        };
        let mut resp = (status, msg).into_response();
        if let Some(secs) = retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl From<ProcessError> for HttpError {
    fn from(e: ProcessError) -> Self {
        match e {
            ProcessError::Decode(m) => HttpError::BadRequest(m),
            e @ ProcessError::TooManyEvents { .. } => HttpError::TooLarge(e.to_string()),
            ProcessError::TooLarge(m) => HttpError::TooLarge(m),
            ProcessError::Limited(l) => HttpError::Limited(l),
            e @ (ProcessError::NotDurable(_) | ProcessError::Busy | ProcessError::Enrich(_)) => {
                HttpError::Unavailable(e.to_string())
            }
        }
    }
}

/// The client of a request (address and user agent), as the handlers need it.
struct Client(ClientCtx);

impl axum::extract::FromRequestParts<App> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        app: &App,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<ClientAddr>>()
            .map(|ConnectInfo(ClientAddr(a))| a.ip());
        let headers = &parts.headers;
        let forwarded = app
            .limits
            .trust_forwarded_for
            .then(|| headers.get("x-forwarded-for"))
            .flatten()
            .and_then(|v| v.to_str().ok())
            // The hop our proxy appended (the rightmost): whatever is left of it came from
            // the client and can be anything.
            .and_then(|v| v.rsplit(',').next())
            .and_then(|ip| ip.trim().parse::<IpAddr>().ok());
        Ok(Client(ClientCtx {
            ip: forwarded.or(peer),
            user_agent: headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        }))
    }
}

fn bad(e: impl std::fmt::Display) -> HttpError {
    HttpError::BadRequest(e.to_string())
}

/// How a GA4 stream must authenticate.
#[derive(Clone, Copy, PartialEq)]
enum Secret {
    /// Measurement Protocol: `api_secret` must be one of the stream's.
    Required,
    /// gtag hits: the measurement id alone (as Google).
    None,
}

impl App {
    /// Memory for a request of `len` bytes, reserved before it is decoded: full means the
    /// bus or the plugins are behind, and the tracker should retry.
    fn memory(&self, len: usize) -> Result<crate::process::Reservation, HttpError> {
        self.processor.try_reserve(len).ok_or_else(|| {
            HttpError::Unavailable("edge at capacity (batches in flight), retry".into())
        })
    }

    /// Resolves a decoded request's tracker identities to merchants (one share each) and
    /// hands it to the edge's one ingest path; the number of events stored. Every identity
    /// must resolve before anything is stored. A share's batch id derives from the request's
    /// content key, so a tracker's retry of an idempotent request is stored once.
    async fn accept(
        &self,
        decoded: Decoded,
        ctx: &ClientCtx,
        secret: Secret,
    ) -> Result<usize, HttpError> {
        // Refused before any identity is looked up.
        self.processor.check_batch_len(decoded.hits.len())?;
        let mut shares: Vec<MerchantBatch> = Vec::new();
        // Tracker identity -> its merchant's share: one registry look-up per identity, and
        // no scan per event (a tp2 batch may carry thousands).
        let mut share_of: HashMap<TrackerId, usize> = HashMap::new();
        for hit in decoded.hits {
            let at = match share_of.get(&hit.tracker) {
                Some(&at) => at,
                None => {
                    let r = self
                        .registry
                        .resolve(&hit.tracker)
                        .await
                        // The registry could not be asked: temporary, not "unknown".
                        .map_err(|e| HttpError::Unavailable(e.to_string()))?
                        .ok_or_else(|| {
                            HttpError::Forbidden(format!(
                                "unknown {}: no merchant registered it",
                                hit.tracker
                            ))
                        })?;
                    if secret == Secret::Required {
                        let ok = decoded
                            .api_secret
                            .as_deref()
                            .is_some_and(|s| r.api_secrets_sha256.contains(&hash_write_key(s)));
                        if !ok {
                            return Err(HttpError::Unauthorized(format!(
                                "api_secret is not valid for {}",
                                hit.tracker
                            )));
                        }
                    }
                    // Several identities may name one merchant: one share for it.
                    let at = match shares.iter().position(|s| s.merchant == r.merchant_id) {
                        Some(at) => at,
                        None => {
                            shares.push(MerchantBatch {
                                merchant: r.merchant_id,
                                events: Vec::new(),
                                batch_id: None,
                                held: 0,
                            });
                            shares.len() - 1
                        }
                    };
                    share_of.insert(hit.tracker.clone(), at);
                    at
                }
            };
            let incoming = Incoming {
                event: hit.event,
                user_agent: hit.user_agent,
                // An address in the payload is trusted as far as the proxy's header is:
                // otherwise anyone could place their events anywhere on the map.
                ip: hit.ip.filter(|_| self.limits.trust_forwarded_for),
            };
            shares[at].events.push(incoming);
        }
        if let Some(key) = &decoded.dedup_key {
            for (i, share) in shares.iter_mut().enumerate() {
                share.batch_id = Some(format!("http-{key}-{i}"));
            }
        }
        let stored = self
            .processor
            .ingest(Submission {
                listener: "http",
                trust: Trust::Client,
                client: ctx,
                shares,
                wire_bytes: None,
            })
            .await?;
        Ok(stored.accepted)
    }
}

/// 1x1 transparent GIF: what a Snowplow pixel request expects back.
const PIXEL: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x01, 0x44, 0x00, 0x3b,
];

async fn snowplow_post(
    State(app): State<App>,
    Client(ctx): Client,
    body: Bytes,
) -> Result<&'static str, HttpError> {
    let _memory = app.memory(body.len())?;
    let decoded = collect::snowplow::decode_post(&body, crate::now_ms()).map_err(bad)?;
    app.accept(decoded, &ctx, Secret::None).await?;
    Ok("ok")
}

async fn snowplow_get(
    State(app): State<App>,
    Client(ctx): Client,
    RawQuery(query): RawQuery,
) -> Result<Response, HttpError> {
    let _memory = app.memory(query.as_deref().map_or(0, str::len))?;
    let decoded = collect::snowplow::decode_get(query.as_deref().unwrap_or(""), crate::now_ms())
        .map_err(bad)?;
    app.accept(decoded, &ctx, Secret::None).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/gif"),
            (header::CACHE_CONTROL, "no-cache, no-store"),
        ],
        PIXEL,
    )
        .into_response())
}

async fn mp_collect(
    State(app): State<App>,
    Client(ctx): Client,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<StatusCode, HttpError> {
    let _memory = app.memory(body.len())?;
    let decoded =
        ga4::decode_mp(query.as_deref().unwrap_or(""), &body, crate::now_ms()).map_err(|msgs| {
            let text: Vec<String> = msgs
                .iter()
                .map(|m| format!("{}: {}", m.field_path, m.description))
                .collect();
            HttpError::BadRequest(text.join("; "))
        })?;
    app.accept(decoded, &ctx, Secret::Required).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Google's validation server: reports, never stores.
async fn mp_debug(RawQuery(query): RawQuery, body: Bytes) -> Response {
    let msgs = match ga4::decode_mp(query.as_deref().unwrap_or(""), &body, crate::now_ms()) {
        Ok(_) => Vec::new(),
        Err(m) => m,
    };
    axum::Json(serde_json::json!({ "validationMessages": msgs })).into_response()
}

async fn gtag(
    State(app): State<App>,
    Client(ctx): Client,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<StatusCode, HttpError> {
    let _memory = app.memory(body.len() + query.as_deref().map_or(0, str::len))?;
    let decoded =
        ga4::decode_gtag(query.as_deref().unwrap_or(""), &body, crate::now_ms()).map_err(bad)?;
    app.accept(decoded, &ctx, Secret::None).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn plausible(
    State(app): State<App>,
    Client(ctx): Client,
    body: Bytes,
) -> Result<(StatusCode, &'static str), HttpError> {
    let _memory = app.memory(body.len())?;
    let decoded = collect::plausible::decode(&body, crate::now_ms()).map_err(bad)?;
    app.accept(decoded, &ctx, Secret::None).await?;
    Ok((StatusCode::ACCEPTED, "ok"))
}

#[derive(serde::Deserialize)]
struct LocateQuery {
    region: Option<String>,
}

async fn locate(
    State(app): State<App>,
    Client(ctx): Client,
    Query(q): Query<LocateQuery>,
) -> Response {
    let region = q
        .region
        .filter(|r| crate::locate::is_known_region(r))
        .or_else(|| app.processor.region_of(ctx.ip).map(str::to_string));
    match tokio::time::timeout(
        Duration::from_secs(2),
        app.locator.locate(region.as_deref()),
    )
    .await
    {
        Ok(Ok(answer)) => axum::Json(answer).into_response(),
        Ok(Err(e)) => HttpError::Unavailable(e).into_response(),
        Err(_) => HttpError::Unavailable("edge registry did not answer".into()).into_response(),
    }
}
