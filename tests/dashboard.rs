//! The merchant dashboard in a real browser (headless Chromium from Debian's packages, driven
//! through ChromeDriver by `tests/python/dashboard_browser.py`) against `beacon up`: log in
//! with a read token, change the range, click a filter, open the shared URL, a keyboard-only
//! pass, phone width, log out; every figure the page shows is checked against the metrics
//! API's answer to the same query. Screenshots are kept in `$BEACON_TEST_ARTIFACTS/dashboard`
//! (default: the target directory's `test-artifacts`); `scripts/screenshots.sh` puts them in
//! `docs/screenshots/`.

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{
    activate, client_for, http, http_with, plugin_json, plugin_path, python_json, wait_for, Up,
};
use serde_json::{json, Value};

/// An IANA zone whose local time is between 10:00 and 14:00 now.
fn noon_zone() -> String {
    let hour = (beacon_edge::now_ms() / 3_600_000 % 24) as i64;
    let offset = (12 - hour + 36) % 24 - 12; // -12..=11: local = UTC + offset is near noon
    match offset {
        0 => "Etc/UTC".into(),
        // POSIX sign: Etc/GMT-3 is three hours ahead of UTC.
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    }
}

/// Posts the login form of a page (`/dashboard/login`, `/ops/login`) with `token`, as a
/// page of `origin` when given.
fn form_login(addr: &str, path: &str, token: &str, origin: Option<&str>) -> common::HttpResponse {
    let mut headers = vec![("Content-Type", "application/x-www-form-urlencoded")];
    headers.extend(origin.map(|o| ("Origin", o)));
    http_with(
        addr,
        "POST",
        path,
        &headers,
        format!("token={token}").as_bytes(),
    )
}

/// The session cookie (`name=value`) a successful login set.
fn session_cookie(login: &common::HttpResponse) -> String {
    assert_eq!(login.status, 303, "{}", login.body);
    login
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .expect("session cookie")
        .to_string()
}

fn admin_url(up: &Up) -> String {
    up.endpoints.admin_http.clone().expect("admin_http")
}

fn artifacts() -> PathBuf {
    let root = std::env::var_os("BEACON_TEST_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
                .join("test-artifacts")
        });
    root.join("dashboard")
}

/// The figures the metrics API gives for `body` (the test's own read token, Bearer).
fn api(up: &Up, token: &str, body: Value) -> Value {
    let (status, text) = http(
        &up.api(),
        "POST",
        "/api/v2/query",
        Some(token),
        body.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{body}: {text}");
    serde_json::from_str(&text).expect("json")
}

fn totals(up: &Up, token: &str, site: &str, range: Value, filters: Value) -> (i64, i64) {
    let r = api(
        up,
        token,
        json!({"site_id": site, "metrics": ["visitors", "pageviews"], "date_range": range, "filters": filters}),
    );
    let m = &r["results"][0]["metrics"];
    (m[0].as_i64().unwrap_or(0), m[1].as_i64().unwrap_or(0))
}

/// (name, visitors) of the first ten sources, as the page's panel asks for them.
fn sources(up: &Up, token: &str, site: &str, range: &str) -> Vec<(String, i64)> {
    let r = api(
        up,
        token,
        json!({"site_id": site, "metrics": ["visitors", "visits", "bounce_rate"], "date_range": range,
               "dimensions": ["visit:source"], "pagination": {"limit": 10}}),
    );
    r["results"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|row| {
            let name = match &row["dimensions"][0] {
                Value::String(s) if !s.is_empty() => s.clone(),
                _ => "(none)".to_string(),
            };
            (name, row["metrics"][0].as_i64().unwrap_or(-1))
        })
        .collect()
}

fn page_sources(page: &Value) -> Vec<(String, i64)> {
    page["sources"]
        .as_array()
        .expect("sources")
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or("").to_string(),
                r["metrics"][0].as_i64().unwrap_or(-1),
            )
        })
        .collect()
}

fn figures(page: &Value) -> (i64, i64) {
    (
        page["visitors"].as_i64().expect("visitors shown"),
        page["pageviews"].as_i64().expect("pageviews shown"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_what_the_api_answers_in_a_real_browser() {
    let up = Up::start(&[]);
    let data = up.data();
    let nats = up.endpoints.nats_url.clone();
    // A zone where it is around noon now, so "today" cannot roll over while the test runs
    // (the page and the API are asked minutes apart): Etc/GMT-N is UTC+N.
    let zone = noon_zone();
    let shop = up.merchant("Dashboard Shop", &["--timezone", &zone]);
    let other = up.merchant("Other Shop", &[]);

    // A pipeline and a canary beside it: markers on the chart and the canary note.
    let path = |p: &str| plugin_path(p).to_str().expect("utf8").to_string();
    plugin_json(
        &data,
        &nats,
        &["upload", &path("beacon_plugin_utm"), "--name", "utm"],
    );
    plugin_json(
        &data,
        &nats,
        &["upload", &path("beacon_plugin_template"), "--name", "tag"],
    );
    activate(&data, &nats, &shop.id, &["--plugin", "utm"]);
    activate(
        &data,
        &nats,
        &shop.id,
        &[
            "--plugin",
            "tag",
            "--plugin-config",
            r#"tag={"key":"ver","value":"canary"}"#,
            "--canary",
            "20",
        ],
    );

    // Two hours of traffic for the shop, and some for another merchant the page must not
    // show. Nothing between 40 and 5 minutes ago, so the realtime window (30 minutes) holds
    // the same visitors for the whole test, however long the browser takes.
    let now = beacon_edge::now_ms();
    let minute = 60_000;
    let mut sent = 0;
    for (m, seed, n, from, span) in [
        (&shop, 11, 2_400, now - 120 * minute, 80 * minute),
        (&shop, 13, 300, now - 5 * minute, 4 * minute),
        (&other, 12, 600, now - 120 * minute, 115 * minute),
    ] {
        let events = beacon::demo::generate(seed, "shop.example", n, from, span, 300);
        let client = client_for(&up.endpoints, &m.write_key)
            .await
            .expect("client");
        for batch in events.chunks(500) {
            client.send(batch).await.expect("sent");
        }
        sent += n as i64;
    }
    wait_for(Duration::from_secs(90), "events rolled up", || {
        let count = |sql| common::first_int(&common::sql_in(&data, sql));
        (count(common::ROLLED_UP) == sent && count(common::IN_VISITS) == sent).then_some(())
    });

    let shots = artifacts();
    let page = python_json(
        "dashboard_browser.py",
        [up.api(), shop.token.clone(), shots.display().to_string()],
        Duration::from_secs(240),
    );
    eprintln!("dashboard pass: {page}");

    // Login: redirected there, a wrong token refused, the right one a cookie the page's
    // scripts cannot read, never in a URL.
    assert!(
        page["first_url"]
            .as_str()
            .unwrap()
            .ends_with("/dashboard/login"),
        "{page}"
    );
    assert!(
        page["login_error"]
            .as_str()
            .unwrap()
            .contains("not a read token"),
        "{page}"
    );
    assert_eq!(page["cookie"]["httpOnly"], true, "{page}");
    assert_eq!(page["cookie"]["sameSite"], "Strict", "{page}");
    assert_eq!(page["token_in_storage"], false, "{page}");
    for url in page["urls"].as_array().unwrap() {
        assert!(!url.as_str().unwrap().contains(&shop.token), "{url}");
    }

    let site = &shop.id;
    let t = &shop.token;
    // Today: the top figures and the sources panel are the API's.
    let day = &page["day"];
    assert_eq!(day["states"]["stats"], "ready", "{day}");
    assert_eq!(day["states"]["chart"], "ready", "{day}");
    assert_eq!(
        figures(day),
        totals(&up, t, site, json!("day"), json!([])),
        "{day}"
    );
    assert!(figures(day).1 > 0, "{day}");
    assert_eq!(page_sources(day), sources(&up, t, site, "day"), "{day}");
    assert!(day["chart_points"].as_i64().unwrap() >= 1, "{day}");
    // The pipeline change and the canary are marked.
    let markers: Vec<&str> = day["markers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(markers.contains(&"activated"), "{markers:?}");
    assert!(markers.contains(&"canary_started"), "{markers:?}");
    assert!(
        day["canary"]
            .as_str()
            .unwrap_or("")
            .contains("20% of visitors"),
        "{day}"
    );
    // During the canary, the period's figures per pipeline version, side by side, as the API
    // splits them; both versions processed some of the traffic.
    let split = api(
        &up,
        &shop.token,
        json!({"site_id": shop.id, "metrics": ["visitors", "pageviews", "events", "visits", "bounce_rate", "visit_duration"],
               "date_range": "day", "dimensions": ["event:pipeline_version"]}),
    );
    // Numbers compared as numbers (the page's 50 is the API's 50.0).
    let numbers = |v: &Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap_or(f64::NAN))
            .collect()
    };
    let split: Vec<(Value, Vec<f64>)> = split["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["dimensions"][0].clone(), numbers(&r["metrics"])))
        .collect();
    let shown: Vec<(Value, Vec<f64>)> = day["split"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["version"].clone(), numbers(&r["metrics"])))
        .collect();
    assert_eq!(shown, split, "{day}");
    // Visit figures are split too: every version has visits.
    assert!(split.iter().all(|(_, m)| m[3] >= 1.0), "{split:?}");
    let versions: Vec<&str> = split.iter().filter_map(|(v, _)| v.as_str()).collect();
    assert!(
        versions.contains(&"v1") && versions.contains(&"v2"),
        "{split:?}"
    );
    // Realtime: the last 30 minutes, as the API counts them.
    let (status, text) = http(
        &up.api(),
        "GET",
        &format!("/api/v2/realtime?site_id={site}"),
        Some(t),
        b"",
    );
    assert_eq!(status, 200, "{text}");
    let realtime: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        day["realtime"].as_str().map(|v| v.parse::<i64>().unwrap()),
        realtime["visitors"].as_i64(),
        "{day}"
    );

    // 7 days, in the URL.
    let week = &page["week"];
    assert_eq!(week["query"]["range"][0], "7d", "{week}");
    assert_eq!(
        figures(week),
        totals(&up, t, site, json!("7d"), json!([])),
        "{week}"
    );

    // The clicked source filters every figure, and is in the URL.
    let source = page["filter_value"].as_str().expect("a source to click");
    let filter = json!([["is", "visit:source", [source]]]);
    let filtered = &page["filtered"];
    assert_eq!(
        filtered["query"]["f"][0],
        format!("visit:source={source}"),
        "{filtered}"
    );
    assert_eq!(
        figures(filtered),
        totals(&up, t, site, json!("7d"), filter.clone()),
        "{filtered}"
    );
    assert!(figures(filtered).0 < figures(week).0, "{filtered}");
    assert_eq!(
        filtered["filters"].as_array().unwrap().len(),
        1,
        "{filtered}"
    );
    // The shared URL shows the same view.
    assert_eq!(figures(&page["shared"]), figures(filtered), "{page}");

    // Keyboard only: 30 days, then a filter, by Tab and Enter.
    let kb = &page["keyboard"];
    assert_eq!(kb["query"]["range"][0], "30d", "{kb}");
    let kb_source = kb["filter_value"].as_str().expect("focused a source");
    assert_eq!(
        figures(kb),
        totals(
            &up,
            t,
            site,
            json!("30d"),
            json!([["is", "visit:source", [kb_source]]])
        ),
        "{kb}"
    );

    // Phone width: no sideways scrolling.
    let phone = &page["phone"];
    assert!(
        phone["scroll_width"].as_i64().unwrap() <= phone["inner_width"].as_i64().unwrap(),
        "{phone}"
    );
    // Logged out: the page is closed; the browser logged no errors.
    assert!(
        page["after_logout_url"]
            .as_str()
            .unwrap()
            .ends_with("/dashboard/login"),
        "{page}"
    );
    assert_eq!(page["console_errors"], json!([]), "{page}");
    for shot in ["dashboard-desktop.png", "dashboard-phone.png", "login.png"] {
        let len = std::fs::metadata(shots.join(shot))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 10_000, "{shot}: {len} bytes");
    }

    // The operator's metrics moved with this traffic: plugin runs per chain, rollup runs,
    // the consumer's backlog, query time by the tables that answered.
    let scraped = http(&admin_url(&up), "GET", "/metrics", None, b"").1;
    let value = |prefix: &str| -> f64 {
        scraped
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        value("beacon_edge_plugin_batches_total{chain=\"utm\",outcome=\"ok\"}") > 0.0,
        "{scraped}"
    );
    assert!(
        value("beacon_edge_plugin_seconds_count{chain=\"tag\"}") > 0.0,
        "{scraped}"
    );
    assert!(
        value("beacon_rollup_runs_total{outcome=\"ok\"}") > 0.0,
        "{scraped}"
    );
    assert!(
        scraped.contains("beacon_ingest_consumer_pending{"),
        "{scraped}"
    );
    assert_eq!(value("beacon_ingest_consumer_pending"), 0.0, "{scraped}");
    assert!(
        value("beacon_query_seconds_count{cache=\"miss\",sources=\"rollups") > 0.0,
        "{scraped}"
    );

    // The operator's page: readiness, ingest, edges, the shop's pipeline with its canary;
    // promote the canary, then roll back, by clicks; the admin API sees both, under the
    // admin token's name, and the dashboard's markers follow.
    let admin = admin_url(&up);
    let admin_token = std::fs::read_to_string(data.join("admin-token"))
        .expect("admin token")
        .trim()
        .to_string();
    let ops = python_json(
        "ops_browser.py",
        [
            admin.clone(),
            admin_token.clone(),
            shots.display().to_string(),
            shop.id.clone(),
        ],
        Duration::from_secs(240),
    );
    eprintln!("operator pass: {ops}");
    assert!(
        ops["first_url"].as_str().unwrap().ends_with("/ops/login"),
        "{ops}"
    );
    assert!(
        ops["login_error"]
            .as_str()
            .unwrap()
            .contains("not an admin token"),
        "{ops}"
    );
    let before = &ops["before"];
    for (section, state) in before["states"].as_object().unwrap() {
        assert_eq!(state, "ready", "{section}: {ops}");
    }
    assert_eq!(before["operator"], "admin", "{ops}");
    assert!(!before["edges"].as_array().unwrap().is_empty(), "{ops}");
    assert!(
        before["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "ingest"),
        "{ops}"
    );
    assert_eq!(before["backlog"], "0", "every batch committed: {ops}");
    // Search by part of the id, in any case; a search without a match says so.
    let searched: Vec<&str> = ops["searched"]
        .as_array()
        .expect("merchants found")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(searched.contains(&shop.id.as_str()), "{ops}");
    let part = shop.id[shop.id.len() - 6..].to_lowercase();
    assert!(
        searched.iter().all(|id| id.to_lowercase().contains(&part)),
        "{ops}"
    );
    assert!(
        ops["searched_nothing"]
            .as_str()
            .unwrap_or("")
            .contains("No merchant id"),
        "{ops}"
    );
    let row = before["merchant_row"].as_str().expect("the shop's row");
    assert!(row.contains("v2 at 20%"), "{row}");
    assert!(
        ops["promoted"].as_str().unwrap().contains("now runs v2"),
        "{ops}"
    );
    assert!(
        ops["rolled_back"].as_str().unwrap().contains("now runs v1"),
        "{ops}"
    );
    assert_eq!(ops["console_errors"], json!([]), "{ops}");
    assert!(
        ops["after_logout_url"]
            .as_str()
            .unwrap()
            .ends_with("/ops/login"),
        "{ops}"
    );
    let current = http(
        &admin,
        "GET",
        &format!("/v1/merchants/{}/pipeline", shop.id),
        Some(&admin_token),
        b"",
    );
    let current: Value = serde_json::from_str(&current.1).expect("pipeline json");
    assert_eq!(current["pipeline"]["active"]["version"], 1, "{current}");
    assert!(current["pipeline"]["canary"].is_null(), "{current}");
    assert_eq!(current["pipeline"]["changed_by"], "admin", "{current}");
    // Annotations are reused for a few seconds: wait for the answer that has both changes.
    let annotated = wait_for(
        Duration::from_secs(30),
        "annotations of both changes",
        || {
            let (_, marks) = http(
                &up.api(),
                "GET",
                &format!("/api/v2/annotations?site_id={site}"),
                Some(t),
                b"",
            );
            let marks: Value = serde_json::from_str(&marks).ok()?;
            (marks["annotations"].as_array()?.len() == 4).then_some(marks)
        },
    );
    let kinds: Vec<&str> = annotated["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        kinds,
        ["activated", "canary_started", "promoted", "rolled_back"],
        "{annotated}"
    );
    assert_eq!(annotated["annotations"][3]["who"], "admin", "{annotated}");
    // A change made with the page's session needs its CSRF header; reads do not.
    let ops_cookie = session_cookie(&form_login(&admin, "/ops/login", &admin_token, None));
    let promote = format!("/v1/merchants/{}/pipeline/rollback", shop.id);
    let r = http_with(&admin, "POST", &promote, &[("Cookie", &ops_cookie)], b"{}");
    assert_eq!(r.status, 403, "{}", r.body);
    let r = http_with(&admin, "GET", "/v1/ingest", &[("Cookie", &ops_cookie)], b"");
    assert_eq!(r.status, 200, "{}", r.body);
    // Sessions do not cross ports: a dashboard session is no operator session, an operator
    // session no dashboard session, and a made-up one nothing.
    let cookie = session_cookie(&form_login(
        &up.api(),
        "/dashboard/login",
        &shop.token,
        None,
    ));
    let as_ops = cookie.replacen("beacon_session=", "beacon_ops=", 1);
    let r = http_with(&admin, "GET", "/v1/edges", &[("Cookie", &as_ops)], b"");
    assert_eq!(r.status, 401, "{}", r.body);
    let as_dash = ops_cookie.replacen("beacon_ops=", "beacon_session=", 1);
    let q = json!({"site_id": site, "metrics": ["visitors"], "date_range": "day"});
    let r = http_with(
        &up.api(),
        "POST",
        "/api/v2/query",
        &[("Cookie", &as_dash)],
        q.to_string().as_bytes(),
    );
    assert_eq!(r.status, 401, "{}", r.body);
    let forged = format!("beacon_ops={}", "0".repeat(64));
    let r = http_with(&admin, "GET", "/v1/edges", &[("Cookie", &forged)], b"");
    assert_eq!(r.status, 401, "{}", r.body);
    // A change decided on a stale view is refused: the revision it saw is gone.
    let stale = http_with(
        &admin,
        "POST",
        &format!("/v1/merchants/{}/pipeline/rollback", shop.id),
        &[("Cookie", &ops_cookie), ("X-Beacon-CSRF", "1")],
        br#"{"to": 1, "expect_revision": 1}"#,
    );
    assert_eq!(stale.status, 409, "{}", stale.body);

    // A session is its merchant's only: the shop's cookie reads the shop, never the other
    // site; a cross-site login form is refused; a forged or ended session is no session.
    let with_cookie = |method: &str, path: &str, body: Value| {
        let r = http_with(
            &up.api(),
            method,
            path,
            &[("Cookie", &cookie), ("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        );
        (r.status, r.body)
    };
    let mine = json!({"site_id": site, "metrics": ["visitors"], "date_range": "day"});
    let theirs = json!({"site_id": other.id, "metrics": ["visitors"], "date_range": "day"});
    assert_eq!(with_cookie("POST", "/api/v2/query", mine.clone()).0, 200);
    assert_eq!(with_cookie("POST", "/api/v2/query", theirs).0, 403);
    let path = format!("/api/v2/annotations?site_id={}", other.id);
    assert_eq!(with_cookie("GET", &path, json!(null)).0, 403);
    let path = format!("/api/v2/realtime?site_id={}", other.id);
    assert_eq!(with_cookie("GET", &path, json!(null)).0, 403);
    let (status, body) = with_cookie("GET", "/dashboard/session", json!(null));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["time_zone"],
        zone.as_str()
    );
    let cross = form_login(
        &up.api(),
        "/dashboard/login",
        &shop.token,
        Some("https://evil.example"),
    );
    assert_eq!(cross.status, 403);
    let null_origin = form_login(&up.api(), "/dashboard/login", &shop.token, Some("null"));
    assert_eq!(null_origin.status, 403);
    assert!(cross.header("set-cookie").is_none());
    let forged = format!("beacon_session={}", "0".repeat(64));
    let r = http_with(
        &up.api(),
        "POST",
        "/api/v2/query",
        &[("Cookie", &forged)],
        mine.to_string().as_bytes(),
    );
    assert_eq!(r.status, 401);
    let out = http_with(
        &up.api(),
        "POST",
        "/dashboard/logout",
        &[("Cookie", &cookie)],
        b"",
    );
    assert_eq!(out.status, 303);
    assert_eq!(with_cookie("POST", "/api/v2/query", mine).0, 401);
}
