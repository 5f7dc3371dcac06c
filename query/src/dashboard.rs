//! The merchant's dashboard: a page served from the metrics API's own port, which logs in
//! with a read token and then calls the metrics API like any other client.
//!
//! - `GET /dashboard/login`, `POST /dashboard/login` (form field `token`): a valid read token
//!   starts a session: a random id in an `HttpOnly`, `SameSite=Strict` cookie, so the token
//!   never appears in a URL, in the page or in script-readable storage.
//! - `GET /dashboard/`: the page (assets embedded in the binary, `GET /dashboard/assets/..`);
//!   `GET /dashboard/session`: who is logged in (site, name, time zone, today there).
//! - `POST /dashboard/logout` ends the session.
//!
//! A session keeps only the token's key (`r.<sha256>`), checked on every request through the
//! [`Directory`], so revoking the token ends its sessions at once. Sessions live in this
//! process's memory (bounded, 12 hours idle at most): behind several metrics-API processes,
//! route a browser to one of them (sticky sessions) or log in again after a switch.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};

use beacon_serve::pages::{self, cross_site, login_form, page, redirect_with_cookie, Sessions};

use crate::directory::{Directory, LookupError};
use crate::tokens::token_key;

pub const COOKIE: &str = "beacon_session";
/// A session ends after this long without a request.
const IDLE: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most: only a valid read token opens one; the least recently used go first.
const MAX_SESSIONS: usize = 100_000;
/// Sessions one read token holds at most (browsers, devices): its next login ends its oldest,
/// so a token logging in in a loop cannot push other merchants' sessions out.
const PER_TOKEN: usize = 20;

/// The page's files, embedded: the dashboard needs no build step and no files beside the
/// binary. uPlot (MIT, see `dashboard/vendor/LICENSE-uPlot`) draws the time series.
const ASSETS: &[pages::Asset] = &[
    pages::PAGE_JS,
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../dashboard/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../dashboard/app.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../dashboard/vendor/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../dashboard/vendor/uPlot.min.css"),
    ),
];
const INDEX: &str = include_str!("../dashboard/index.html");
const LOGIN: &str = include_str!("../dashboard/login.html");

/// Dashboard sessions of this process: each holds the read token's key (`r.<sha256>`).
pub struct Logins {
    sessions: Sessions<Arc<str>>,
}

impl Default for Logins {
    fn default() -> Self {
        Self {
            sessions: Sessions::new(COOKIE, IDLE, PER_TOKEN, MAX_SESSIONS),
        }
    }
}

/// Why a cookie did not authenticate.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("no dashboard session")]
    None,
    #[error("token check: {0}")]
    Lookup(#[from] Arc<LookupError>),
}

impl Logins {
    /// The merchant of the request's session cookie: its token must still be a read token.
    pub async fn merchant(
        &self,
        headers: &HeaderMap,
        directory: &Directory,
    ) -> Result<Arc<str>, SessionError> {
        let key = self.sessions.get(headers).ok_or(SessionError::None)?;
        match directory.merchant_for_key(key.to_string()).await? {
            Some(m) => Ok(m),
            None => {
                // The token was revoked: the session ends with it.
                self.sessions.end(headers);
                Err(SessionError::None)
            }
        }
    }
}

#[derive(Clone)]
struct Dash {
    directory: Arc<Directory>,
    logins: Arc<Logins>,
}

pub fn router(directory: Arc<Directory>, logins: Arc<Logins>) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/dashboard/") }))
        .route("/dashboard", get(|| async { Redirect::to("/dashboard/") }))
        .route("/dashboard/", get(index))
        .route("/dashboard/login", get(login_page).post(login))
        .route("/dashboard/logout", post(logout))
        .route("/dashboard/session", get(session))
        .route("/dashboard/assets/{file}", get(asset))
        .with_state(Dash { directory, logins })
}

async fn index(State(d): State<Dash>, headers: HeaderMap) -> Response {
    match d.logins.merchant(&headers, &d.directory).await {
        Ok(_) => page(StatusCode::OK, INDEX.to_string()),
        Err(SessionError::None) => Redirect::to("/dashboard/login").into_response(),
        Err(e) => page(StatusCode::SERVICE_UNAVAILABLE, login_html(&e.to_string())),
    }
}

fn login_html(error: &str) -> String {
    login_form(LOGIN, error)
}

async fn login_page() -> Response {
    page(StatusCode::OK, login_html(""))
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(d): State<Dash>, headers: HeaderMap, Form(form): Form<LoginForm>) -> Response {
    if cross_site(&headers) {
        return page(
            StatusCode::FORBIDDEN,
            login_html("cross-site login refused"),
        );
    }
    let token = form.token.trim();
    if token.is_empty() || token.len() > 256 {
        return page(
            StatusCode::UNAUTHORIZED,
            login_html("that is not a read token"),
        );
    }
    match d.directory.merchant_for(token).await {
        Ok(Some(merchant)) => {
            let cookie = d
                .logins
                .sessions
                .start(Arc::from(token_key(token)), &headers);
            tracing::info!(%merchant, "dashboard login");
            redirect_with_cookie("/dashboard/", &cookie)
        }
        Ok(None) => page(
            StatusCode::UNAUTHORIZED,
            login_html("that is not a read token (beacon merchant read-token creates one)"),
        ),
        Err(e) => page(
            StatusCode::SERVICE_UNAVAILABLE,
            login_html(&format!("cannot check the token now: {e}")),
        ),
    }
}

async fn logout(State(d): State<Dash>, headers: HeaderMap) -> Response {
    redirect_with_cookie("/dashboard/login", &d.logins.sessions.end(&headers))
}

/// Who is logged in, and what the page needs to build its date ranges.
async fn session(State(d): State<Dash>, headers: HeaderMap) -> Response {
    let error = |status: StatusCode, message: String| {
        (status, Json(serde_json::json!({ "error": message }))).into_response()
    };
    let merchant = match d.logins.merchant(&headers, &d.directory).await {
        Ok(m) => m,
        Err(SessionError::None) => return error(StatusCode::UNAUTHORIZED, "not logged in".into()),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let tz = match d.directory.timezone(&merchant).await {
        Ok(tz) => tz,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let name = match d.directory.name(&merchant).await {
        Ok(name) => name,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let now = chrono::Utc::now().with_timezone(&tz);
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(serde_json::json!({
            "site_id": merchant.as_ref(),
            "name": name,
            "time_zone": tz.name(),
            "today": now.format("%Y-%m-%d").to_string(),
        })),
    )
        .into_response()
}

async fn asset(Path(file): Path<String>) -> Response {
    pages::asset(ASSETS, &file)
}
