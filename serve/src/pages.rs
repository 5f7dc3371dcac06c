//! What the web pages Beacon serves (the merchant dashboard, the operator page) share:
//!
//! - [`Sessions`]: a login with a token starts one, identified by a random 256-bit id in an
//!   `HttpOnly`, `SameSite=Strict` cookie, so the token itself never sits in a URL, a page or
//!   script-readable storage. Sessions live in this process's memory, bounded in number (the
//!   least recently used go first) and ended after a time without use.
//! - [`page`], [`login_form`], [`asset`], [`redirect_with_cookie`]: HTML with the pages'
//!   security headers, and the embedded files they load.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

struct Entry<T> {
    value: T,
    last_used: Instant,
}

pub struct Sessions<T> {
    cookie: &'static str,
    idle: Duration,
    capacity: usize,
    per_value: usize,
    inner: Mutex<Inner<T>>,
}

struct Inner<T> {
    entries: HashMap<String, Entry<T>>,
    /// Each value's session ids, oldest first: one tenant's logins evict only its own.
    by_value: HashMap<T, std::collections::VecDeque<String>>,
}

impl<T: Clone + Eq + std::hash::Hash> Sessions<T> {
    /// Sessions named `cookie`, ended after `idle` without a request, at most `per_value`
    /// for one value (one token: its oldest session ends when it logs in once more) and
    /// `capacity` in all.
    pub fn new(cookie: &'static str, idle: Duration, per_value: usize, capacity: usize) -> Self {
        Self {
            cookie,
            idle,
            capacity: capacity.max(1),
            per_value: per_value.max(1),
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                by_value: HashMap::new(),
            }),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner<T>> {
        // A panic while holding the lock cannot leave a map half-written that matters here.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a session holding `value`; returns the `Set-Cookie` header value for it: a
    /// browser-session cookie (no `Max-Age`: the server ends idle sessions, so one in use
    /// lives on), `Secure` when the request came through a proxy that says it was HTTPS.
    pub fn start(&self, value: T, request: &HeaderMap) -> String {
        use rand::Rng;
        // ThreadRng: a CSPRNG seeded from the OS.
        let id: String = rand::rng()
            .random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let now = Instant::now();
        let mut inner = self.inner();
        let Inner { entries, by_value } = &mut *inner;
        let mine = by_value.entry(value.clone()).or_default();
        while mine.len() >= self.per_value {
            if let Some(old) = mine.pop_front() {
                entries.remove(&old);
            }
        }
        mine.push_back(id.clone());
        if entries.len() >= self.capacity {
            // Only many tenants together get here (each holds at most `per_value`): drop the
            // idle ones, then the least recently used.
            let idle = self.idle;
            entries.retain(|_, e| now.duration_since(e.last_used) < idle);
            if entries.len() >= self.capacity {
                if let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(k, _)| k.clone())
                {
                    entries.remove(&oldest);
                }
            }
            by_value.retain(|_, ids| {
                ids.retain(|i| entries.contains_key(i) || *i == id);
                !ids.is_empty()
            });
        }
        entries.insert(
            id.clone(),
            Entry {
                value,
                last_used: now,
            },
        );
        let secure = request
            .get("x-forwarded-proto")
            .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
        format!(
            "{}={id}; Path=/; HttpOnly; SameSite=Strict{}",
            self.cookie,
            if secure { "; Secure" } else { "" }
        )
    }

    fn forget(inner: &mut Inner<T>, id: &str) {
        if let Some(e) = inner.entries.remove(id) {
            if let Some(ids) = inner.by_value.get_mut(&e.value) {
                ids.retain(|i| i != id);
                if ids.is_empty() {
                    inner.by_value.remove(&e.value);
                }
            }
        }
    }

    /// The value of the request's session, if it has a live one (and marks it used).
    pub fn get(&self, request: &HeaderMap) -> Option<T> {
        let id = cookie_value(request, self.cookie)?;
        let mut inner = self.inner();
        let now = Instant::now();
        match inner.entries.get_mut(id) {
            Some(e) if now.duration_since(e.last_used) < self.idle => {
                e.last_used = now;
                Some(e.value.clone())
            }
            Some(_) => {
                Self::forget(&mut inner, id);
                None
            }
            None => None,
        }
    }

    /// Ends the request's session; returns the `Set-Cookie` value that clears the cookie.
    pub fn end(&self, request: &HeaderMap) -> String {
        if let Some(id) = cookie_value(request, self.cookie) {
            Self::forget(&mut self.inner(), id);
        }
        format!(
            "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
            self.cookie
        )
    }

    pub fn len(&self) -> usize {
        self.inner().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Our cookie's value among the request's `Cookie` headers, if it looks like a session id.
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// True unless the request plainly came from this site's own page: a login or a change posted
/// from another site (login CSRF). Browsers say where a request came from in
/// `Sec-Fetch-Site` (`same-origin`, or `none` when typed or bookmarked); older ones only in
/// `Origin`, which must then name this host (`X-Forwarded-Host` behind a proxy that rewrites
/// `Host`). `Origin: null` (sandboxed frames, `data:` pages, cross-site redirects) is refused;
/// a request with neither header (not a browser form) is not cross-site.
pub fn cross_site(headers: &HeaderMap) -> bool {
    let get = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    if let Some(site) = get("sec-fetch-site") {
        return !matches!(site, "same-origin" | "none");
    }
    let Some(origin) = get("origin") else {
        return false;
    };
    if origin == "null" {
        return true;
    }
    let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
    let forwarded = get("x-forwarded-host").map(|h| h.split(',').next().unwrap_or(h).trim());
    Some(origin_host) != forwarded && Some(origin_host) != get("host")
}

/// Headers of every HTML page: scripts and styles only from this origin (inline style
/// attributes allowed: the chart library sets them), never framed, no referrer (a page's
/// query string can name filters).
pub const PAGE_HEADERS: [(header::HeaderName, &str); 4] = [
    (header::CACHE_CONTROL, "no-store"),
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
         img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; \
         form-action 'self'; base-uri 'none'",
    ),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::REFERRER_POLICY, "no-referrer"),
];

/// An HTML page with [`PAGE_HEADERS`].
pub fn page(status: StatusCode, html: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        PAGE_HEADERS,
        html,
    )
        .into_response()
}

/// A login form `template` with `error` (escaped) where it has `<!--error-->`.
pub fn login_form(template: &str, error: &str) -> String {
    let error = if error.is_empty() {
        String::new()
    } else {
        format!(
            r#"<p class="error" role="alert" id="login-error">{}</p>"#,
            escape_html(error)
        )
    };
    template.replace("<!--error-->", &error)
}

/// A redirect to `to` that sets (or clears) a cookie.
pub fn redirect_with_cookie(to: &str, set_cookie: &str) -> Response {
    let mut resp = Redirect::to(to).into_response();
    if let Ok(v) = HeaderValue::from_str(set_cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// A file embedded in the binary: (name, content type, bytes).
pub type Asset = (&'static str, &'static str, &'static [u8]);

/// The script every page loads before its own: `window.beaconPage` (`$`, `el`, `ApiError`).
pub const PAGE_JS: Asset = (
    "page.js",
    "text/javascript; charset=utf-8",
    include_bytes!("../pages/page.js"),
);

/// The asset named `file`, or 404 (only names in the list are ever served).
pub fn asset(assets: &[Asset], file: &str) -> Response {
    match assets.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, bytes)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "public, max-age=300"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *bytes,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Escapes text for an HTML page.
pub fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn cookie_of(set_cookie: &str) -> String {
        set_cookie.split(';').next().unwrap().to_string()
    }

    #[test]
    fn a_session_is_found_by_its_cookie_among_others_and_ends() {
        let s: Sessions<u32> = Sessions::new("sid", Duration::from_secs(60), 5, 10);
        let set = s.start(7, &HeaderMap::new());
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict"),
            "{set}"
        );
        assert!(!set.contains("Secure") && !set.contains("Max-Age"), "{set}");
        let c = cookie_of(&set);
        let req = headers(&[("cookie", &format!("a=1; {c}; b=2"))]);
        assert_eq!(s.get(&req), Some(7));
        let split = headers(&[("cookie", "x=1"), ("cookie", &c)]);
        assert_eq!(s.get(&split), Some(7));
        assert!(s.end(&req).contains("Max-Age=0"));
        assert_eq!(s.get(&req), None);
    }

    #[test]
    fn forged_short_or_foreign_cookies_are_no_session() {
        let s: Sessions<u32> = Sessions::new("sid", Duration::from_secs(60), 5, 10);
        s.start(1, &HeaderMap::new());
        for c in [
            format!("sid={}", "0".repeat(64)),
            "sid=short".into(),
            format!("sid={}", "z".repeat(64)),
            format!("other={}", "0".repeat(64)),
        ] {
            assert_eq!(s.get(&headers(&[("cookie", &c)])), None, "{c}");
        }
        assert_eq!(s.get(&HeaderMap::new()), None);
    }

    #[test]
    fn idle_sessions_end_and_the_least_recently_used_make_room() {
        let s: Sessions<u32> = Sessions::new("sid", Duration::ZERO, 5, 10);
        let c = cookie_of(&s.start(1, &HeaderMap::new()));
        assert_eq!(s.get(&headers(&[("cookie", &c)])), None, "idle at once");
        let s: Sessions<u32> = Sessions::new("sid", Duration::from_secs(60), 5, 2);
        let first = cookie_of(&s.start(1, &HeaderMap::new()));
        let second = cookie_of(&s.start(2, &HeaderMap::new()));
        assert_eq!(s.get(&headers(&[("cookie", &first)])), Some(1));
        s.start(3, &HeaderMap::new());
        assert_eq!(s.len(), 2);
        assert_eq!(
            s.get(&headers(&[("cookie", &second)])),
            None,
            "least recently used"
        );
        assert_eq!(s.get(&headers(&[("cookie", &first)])), Some(1));
    }

    #[test]
    fn one_value_logging_in_again_and_again_ends_only_its_own_sessions() {
        let s: Sessions<u32> = Sessions::new("sid", Duration::from_secs(60), 2, 100);
        let other = cookie_of(&s.start(9, &HeaderMap::new()));
        let first = cookie_of(&s.start(1, &HeaderMap::new()));
        for _ in 0..50 {
            s.start(1, &HeaderMap::new());
        }
        assert_eq!(
            s.len(),
            3,
            "two of the flooding value's, one of the other's"
        );
        assert_eq!(s.get(&headers(&[("cookie", &first)])), None);
        assert_eq!(s.get(&headers(&[("cookie", &other)])), Some(9));
    }

    #[test]
    fn secure_behind_an_https_proxy() {
        let s: Sessions<u32> = Sessions::new("sid", Duration::from_secs(60), 5, 10);
        let set = s.start(1, &headers(&[("x-forwarded-proto", "https")]));
        assert!(set.ends_with("; Secure"), "{set}");
    }

    #[test]
    fn a_post_from_another_site_is_cross_site() {
        let same = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
        ]);
        assert!(!cross_site(&same));
        let other = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "https://evil.example"),
        ]);
        assert!(cross_site(&other));
        assert!(!cross_site(&headers(&[("host", "127.0.0.1:8080")])));
        assert!(cross_site(&headers(&[("host", "h:1"), ("origin", "null")])));
        assert!(cross_site(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(cross_site(&headers(&[("sec-fetch-site", "same-site")])));
        assert!(!cross_site(&headers(&[("sec-fetch-site", "same-origin")])));
        let proxied = headers(&[
            ("host", "10.0.0.5:8080"),
            ("x-forwarded-host", "stats.example.com"),
            ("origin", "https://stats.example.com"),
        ]);
        assert!(!cross_site(&proxied));
    }

    #[test]
    fn html_is_escaped_also_in_login_errors() {
        assert_eq!(
            escape_html(r#"<a href="x">&"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;"
        );
        let html = login_form("<form><!--error--></form>", "<script>x</script>");
        assert!(html.contains("&lt;script&gt;x&lt;/script&gt;"), "{html}");
        assert!(!login_form("<!--error-->", "").contains("login-error"));
    }

    #[test]
    fn only_listed_assets_are_served() {
        const A: &[Asset] = &[("a.js", "text/javascript", b"x")];
        assert_eq!(asset(A, "a.js").status(), StatusCode::OK);
        assert_eq!(asset(A, "../Cargo.toml").status(), StatusCode::NOT_FOUND);
    }
}
