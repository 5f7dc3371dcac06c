//! The operator's page, on the admin port: `GET /ops/` after logging in with an admin token
//! at `/ops/login`. The page calls the admin API (`/v1/...`) with its session cookie, so what
//! it shows and changes is exactly what the API and the CLI show and change: a rollback is the
//! same compare-and-set, recorded under the admin token's name.
//!
//! Sessions hold the admin token's name. A change made with a session cookie (any method but
//! GET and HEAD) must also carry `X-Beacon-CSRF: 1`, which a page of another site cannot add
//! without a CORS preflight that this server never grants; with `SameSite=Strict` that makes
//! cross-site requests doubly impossible.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use beacon_serve::pages::{
    self, cross_site, escape_html, login_form, page, redirect_with_cookie, Sessions,
};

use crate::admin::AdminTokens;

pub const COOKIE: &str = "beacon_ops";
/// The header a cookie-authenticated change must carry.
pub const CSRF_HEADER: &str = "x-beacon-csrf";
/// Operators' sessions end sooner than merchants': they can change pipelines.
const IDLE: Duration = Duration::from_secs(2 * 3600);
const MAX_SESSIONS: usize = 1_000;

const ASSETS: &[pages::Asset] = &[
    pages::PAGE_JS,
    (
        "ops.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../ops/ops.js"),
    ),
    (
        "ops.css",
        "text/css; charset=utf-8",
        include_bytes!("../ops/ops.css"),
    ),
];
const INDEX: &str = include_str!("../ops/index.html");
const LOGIN: &str = include_str!("../ops/login.html");

/// Operator sessions: session id -> the admin token's name.
pub struct OpsLogins {
    sessions: Sessions<String>,
    tokens: Arc<AdminTokens>,
}

/// How a request without a bearer token fared with its cookie.
pub enum CookieAuth {
    /// The admin token's name.
    Caller(String),
    /// A live session, but a change without the CSRF header.
    MissingCsrf,
    None,
}

impl OpsLogins {
    pub fn new(tokens: Arc<AdminTokens>) -> Self {
        Self {
            sessions: Sessions::new(COOKIE, IDLE, 20, MAX_SESSIONS),
            tokens,
        }
    }

    /// The caller of a request authenticated by its session cookie.
    pub fn authenticate(&self, method: &Method, headers: &HeaderMap) -> CookieAuth {
        let Some(name) = self.sessions.get(headers) else {
            return CookieAuth::None;
        };
        let reads = method == Method::GET || method == Method::HEAD;
        if !reads
            && headers
                .get(CSRF_HEADER)
                .is_none_or(|v| v.as_bytes() != b"1")
        {
            return CookieAuth::MissingCsrf;
        }
        CookieAuth::Caller(name)
    }
}

pub fn router(logins: Arc<OpsLogins>) -> Router {
    Router::new()
        .route("/ops", get(|| async { Redirect::to("/ops/") }))
        .route("/ops/", get(index))
        .route("/ops/login", get(login_page).post(login))
        .route("/ops/logout", post(logout))
        .route("/ops/assets/{file}", get(asset))
        .with_state(logins)
}

fn login_html(error: &str) -> String {
    login_form(LOGIN, error)
}

async fn index(State(l): State<Arc<OpsLogins>>, headers: HeaderMap) -> Response {
    match l.sessions.get(&headers) {
        Some(name) => page(
            StatusCode::OK,
            INDEX.replace("<!--operator-->", &escape_html(&name)),
        ),
        None => Redirect::to("/ops/login").into_response(),
    }
}

async fn login_page() -> Response {
    page(StatusCode::OK, login_html(""))
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(l): State<Arc<OpsLogins>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if cross_site(&headers) {
        return page(
            StatusCode::FORBIDDEN,
            login_html("cross-site login refused"),
        );
    }
    let Some(name) = l.tokens.check(form.token.trim()).map(str::to_string) else {
        tracing::warn!("operator page: refused login");
        return page(
            StatusCode::UNAUTHORIZED,
            login_html("that is not an admin token"),
        );
    };
    let cookie = l.sessions.start(name.clone(), &headers);
    tracing::info!(operator = %name, "operator page login");
    redirect_with_cookie("/ops/", &cookie)
}

async fn logout(State(l): State<Arc<OpsLogins>>, headers: HeaderMap) -> Response {
    redirect_with_cookie("/ops/login", &l.sessions.end(&headers))
}

async fn asset(Path(file): Path<String>) -> Response {
    pages::asset(ASSETS, &file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{header, HeaderValue};

    fn logins() -> OpsLogins {
        OpsLogins::new(Arc::new(
            AdminTokens::parse("alice:0123456789abcdef0123").unwrap(),
        ))
    }

    fn with_cookie(set_cookie: &str, extra: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        let c = set_cookie.split(';').next().unwrap();
        h.insert(header::COOKIE, HeaderValue::from_str(c).unwrap());
        for (k, v) in extra {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn a_session_reads_freely_but_changes_only_with_the_csrf_header() {
        let l = logins();
        let set = l.sessions.start("alice".into(), &HeaderMap::new());
        let plain = with_cookie(&set, &[]);
        assert!(matches!(
            l.authenticate(&Method::GET, &plain),
            CookieAuth::Caller(n) if n == "alice"
        ));
        assert!(matches!(
            l.authenticate(&Method::POST, &plain),
            CookieAuth::MissingCsrf
        ));
        let marked = with_cookie(&set, &[(CSRF_HEADER, "1")]);
        assert!(matches!(
            l.authenticate(&Method::POST, &marked),
            CookieAuth::Caller(_)
        ));
        assert!(matches!(
            l.authenticate(&Method::GET, &HeaderMap::new()),
            CookieAuth::None
        ));
    }
}
