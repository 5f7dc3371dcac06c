//! The metrics API on real parts: read tokens scoped to one merchant, Plausible-v2-shaped
//! queries answered from the rollups and the sessions view, checked against SQL over events.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use common::{http, Cluster};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_api_answers_from_rollups_and_keeps_merchants_apart() {
    let cluster = Cluster::start(true);
    let now = beacon_edge::now_ms();
    let mut sites = Vec::new();
    let mut write_keys = Vec::new();
    for (i, name) in ["api-a", "api-b"].iter().enumerate() {
        let (id, key) = cluster.merchant(name);
        let events = beacon::demo::generate(
            70 + i as u64,
            "api.example",
            3_000,
            now - 2 * 3_600_000,
            2 * 3_600_000,
            400,
        );
        cluster.send(&key, &events).await;
        let token = cluster.read_token(&id);
        sites.push((id, token));
        write_keys.push(key);
    }
    cluster.wait_rolled_up(6_000, Duration::from_secs(60));
    let c = &cluster;
    let (_api, addr) = cluster.spawn_api();
    let (a, a_token) = &sites[0];
    let (b, _) = &sites[1];
    let query = |token: Option<&str>, body: Value| {
        let (status, text) = http(
            &addr,
            "POST",
            "/api/v2/query",
            token,
            body.to_string().as_bytes(),
        );
        (
            status,
            serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)),
        )
    };
    let today = chrono_day(now);
    let yesterday = chrono_day(now - 86_400_000);
    let range = json!([yesterday, today]);

    // Auth: no token, a wrong token, a write key, another merchant's site.
    let ok_body = json!({"site_id": a, "metrics": ["visitors"], "date_range": range});
    assert_eq!(query(None, ok_body.clone()).0, 401);
    assert_eq!(query(Some("br_nope"), ok_body.clone()).0, 401);
    let (status, body) = query(
        Some(a_token),
        json!({"site_id": b, "metrics": ["visitors"], "date_range": range}),
    );
    assert_eq!(status, 403, "{body}");
    // Bad requests name the field.
    for (bad, field) in [
        (
            json!({"site_id": a, "metrics": ["visitorz"], "date_range": range}),
            "metrics",
        ),
        (
            json!({"site_id": a, "metrics": ["visitors"], "date_range": "fortnight"}),
            "date_range",
        ),
        (
            json!({"site_id": a, "metrics": ["visitors"], "date_range": range, "dimensions": ["visit:nope"]}),
            "dimensions",
        ),
        (
            json!({"site_id": a, "metrics": ["visitors"], "date_range": range, "limit": 5}),
            "limit",
        ),
    ] {
        let (status, body) = query(Some(a_token), bad);
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"].as_str().unwrap_or("").contains(field),
            "{body}"
        );
    }

    // The aggregate matches SQL straight over `events` (visitors within 2%: HLL).
    let metrics = ["visitors", "pageviews", "events", "visits", "bounce_rate"];
    let (status, body) = query(
        Some(a_token),
        json!({"site_id": a, "metrics": metrics, "date_range": range}),
    );
    assert_eq!(status, 200, "{body}");
    let got = &body["results"][0]["metrics"];
    let scope = format!("FROM events WHERE merchant_id = '{a}'");
    let visitors = c.count(&format!("SELECT count(DISTINCT visitor_id) {scope}")) as f64;
    let est = got[0].as_f64().expect("visitors");
    assert!(
        (est - visitors).abs() / visitors < 0.02,
        "visitors {est} vs {visitors}"
    );
    assert_eq!(
        got[1],
        c.count(&format!("SELECT count(*) {scope} AND name = 'pageview'"))
    );
    assert_eq!(got[2], 3_000);
    assert_eq!(
        got[3],
        c.count(&format!(
            "SELECT count(*) FROM sessions WHERE merchant_id = '{a}'"
        ))
    );
    let bounce = got[4].as_f64().expect("bounce rate");
    assert!((0.0..=100.0).contains(&bounce), "{bounce}");
    let bounces = c.count(&format!(
        "SELECT count(*) FROM sessions WHERE merchant_id = '{a}' AND bounce"
    ));
    let visits = got[3].as_i64().expect("visits");
    let want = (100.0 * bounces as f64 / visits as f64).round();
    assert_eq!(bounce, want, "bounce rate {bounce} vs {bounces}/{visits}");

    // By day: the buckets add up to the aggregate; dimensions carry the date.
    let (status, body) = query(
        Some(a_token),
        json!({"site_id": a, "metrics": ["events", "visits"], "date_range": range, "dimensions": ["time:day"]}),
    );
    assert_eq!(status, 200, "{body}");
    let rows = body["results"].as_array().expect("results");
    let events: i64 = rows
        .iter()
        .map(|r| r["metrics"][0].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(events, 3_000);
    assert!(
        rows.iter().all(|r| r["dimensions"][0]
            .as_str()
            .is_some_and(|d| d == today || d == yesterday)),
        "{body}"
    );

    // Top pages (from events): paths without query strings, most viewed first, and the same
    // numbers as SQL.
    let (status, body) = query(
        Some(a_token),
        json!({"site_id": a, "metrics": ["pageviews", "visitors"], "date_range": range, "dimensions": ["event:page"], "pagination": {"limit": 3}}),
    );
    assert_eq!(status, 200, "{body}");
    let pages = body["results"].as_array().expect("results");
    assert_eq!(pages.len(), 3, "{body}");
    let views: Vec<i64> = pages
        .iter()
        .map(|p| p["metrics"][0].as_i64().unwrap_or(0))
        .collect();
    assert!(views.windows(2).all(|w| w[0] >= w[1]), "{views:?}");
    for p in pages {
        let path = p["dimensions"][0].as_str().expect("path");
        assert!(path.starts_with('/') && !path.contains('?'), "{path}");
        let like = format!("%.example{path}");
        let sql = c.count(&format!(
            "SELECT count(*) {scope} AND name = 'pageview' AND (url LIKE '{like}' OR url LIKE '{like}?%' OR url LIKE '{like}#%')"
        ));
        assert_eq!(p["metrics"][0], sql, "{path}");
    }
    let (status, body) = query(
        Some(a_token),
        json!({"site_id": a, "metrics": ["visits"], "date_range": range, "dimensions": ["visit:entry_page", "event:page"]}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("dimensions"), "{body}");

    // The result cache: the same query again is answered from memory, identically; once
    // new events are rolled up (a new snapshot of the table it reads) it is computed anew
    // and counts them.
    let daily = json!({"site_id": a, "metrics": ["visitors", "pageviews"], "date_range": range, "dimensions": ["time:day"]});
    let ask = |body: &Value| {
        let auth = format!("Bearer {a_token}");
        let r = common::http_with(
            &addr,
            "POST",
            "/api/v2/query",
            &[("Authorization", auth.as_str())],
            body.to_string().as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let cache = r.header("x-beacon-cache").unwrap_or("").to_string();
        (cache, serde_json::from_str::<Value>(&r.body).expect("json"))
    };
    let pageviews = |body: &Value| -> i64 {
        body["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| r["metrics"][1].as_i64().unwrap_or(0))
            .sum()
    };
    let (first, before) = ask(&daily);
    assert_eq!(first, "miss");
    let (second, again) = ask(&daily);
    assert_eq!(second, "hit");
    assert_eq!(again["results"], before["results"]);
    assert_eq!(before["meta"]["sources"], json!(["rollups"]), "{before}");
    let more = beacon::demo::generate(90, "api.example", 500, now - 3_600_000, 3_600_000, 100);
    cluster.send(&write_keys[0], &more).await;
    cluster.wait_rolled_up(6_500, Duration::from_secs(60));
    let want = c.count(&format!("SELECT count(*) {scope} AND name = 'pageview'"));
    assert!(want > pageviews(&before), "the new events have page views");
    let after = common::wait_for(Duration::from_secs(10), "a fresh answer", || {
        let (cache, body) = ask(&daily);
        (cache == "miss" && pageviews(&body) == want).then_some(body)
    });
    assert_eq!(ask(&daily).0, "hit");
    assert_eq!(pageviews(&after), want);

    // A changed time zone applies to the next request (the bucket's watch drops the cached
    // one), not after the cache's fallback expiry.
    let nats = async_nats::connect(cluster.nats.url()).await.expect("nats");
    let bucket = beacon_edge::registry::open_bucket(&async_nats::jetstream::new(nats))
        .await
        .expect("merchants bucket");
    let record = bucket
        .get(format!("m.{a}"))
        .await
        .expect("get")
        .expect("merchant");
    let mut record: Value = serde_json::from_slice(&record).expect("merchant record");
    record["timezone"] = json!("Asia/Tokyo");
    bucket
        .put(format!("m.{a}"), record.to_string().into())
        .await
        .expect("put");
    common::wait_for(Duration::from_secs(5), "the new time zone", || {
        let (_, body) = ask(&daily);
        (body["meta"]["time_zone"] == "Asia/Tokyo").then_some(())
    });

    // Realtime: unique visitors of the last 30 minutes, as SQL counts them (the window moves
    // with the clock, so compare with SQL run right after).
    let (status, body) = http(
        &addr,
        "GET",
        &format!("/api/v1/stats/realtime/visitors?site_id={a}"),
        Some(a_token),
        b"",
    );
    assert_eq!(status, 200, "{body}");
    let realtime: i64 = body.trim().parse().expect("a number");
    let since = beacon_edge::now_ms() - 30 * 60_000;
    let sql = c.count(&format!(
        "SELECT count(DISTINCT visitor_id) {scope} AND CAST(ts AS BIGINT) >= {}",
        since * 1000
    ));
    assert!(
        realtime > 0 && (realtime - sql).abs() <= 2,
        "realtime {realtime} vs {sql}"
    );
    let (status, _) = http(
        &addr,
        "GET",
        &format!("/api/v1/stats/realtime/visitors?site_id={b}"),
        Some(a_token),
        b"",
    );
    assert_eq!(status, 403);
}

/// `YYYY-MM-DD` (UTC) of an epoch-milliseconds instant.
fn chrono_day(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    // Civil-from-days (Howard Hinnant's algorithm): no date crate needed in the test.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
