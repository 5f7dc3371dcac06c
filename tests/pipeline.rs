//! End to end on real parts: SDK -> edge (RSocket/QUIC, Wasm plugin) -> JetStream ->
//! ingest -> Iceberg -> DataFusion (SQL and rollups).

#[path = "common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use beacon_proto::Event;
use common::{http, metric, wait_for, Cluster};

const HOUR_MS: i64 = 3_600_000;

fn hour_key(ts_ms: i64) -> String {
    // Matches DataFusion's date_trunc('hour', ts) rendered by the JSON writer.
    let secs = ts_ms.div_euclid(HOUR_MS) * 3600;
    let days = secs.div_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let h = secs.rem_euclid(86_400) / 3600;
    format!("{y:04}-{m:02}-{d:02}T{h:02}:00:00")
}

// Howard Hinnant's days -> civil date.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_flow_end_to_end_with_exact_counts_plugin_effect_and_rollups() {
    let cluster = Cluster::start(true);
    let now = beacon_edge::now_ms();
    let start = (now / HOUR_MS - 6) * HOUR_MS; // six whole hours back
    let per_merchant = [12_000usize, 10_000, 8_000];

    let mut merchants = Vec::new();
    for (i, n) in per_merchant.iter().enumerate() {
        let (id, key) = cluster.merchant(&format!("shop-{i}"));
        cluster.attach(&id, "beacon_plugin_utm", "");
        let events = beacon::demo::generate(
            100 + i as u64,
            &format!("shop{i}.example"),
            *n,
            start,
            5 * HOUR_MS,
            3000,
        );
        merchants.push((id, key, events));
    }

    let mut sends = Vec::new();
    for (_, key, events) in &merchants {
        let client = Arc::new(cluster.client(key).await.expect("connect"));
        sends.push(tokio::spawn(beacon::demo::send_all(
            client,
            events.clone(),
            400,
            4,
        )));
    }
    for s in sends {
        let report = s.await.expect("join").expect("send");
        assert!(report.batches > 0);
    }
    let total: usize = per_merchant.iter().sum();

    let c = &cluster;
    wait_for(Duration::from_secs(120), "all events in Iceberg", || {
        (c.count("SELECT count(*) FROM raw_events") as usize == total
            && c.count("SELECT count(*) FROM events") as usize == total)
            .then_some(())
    });

    // Exact counts per merchant and per hour.
    let mut expected: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut expected_pv: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut visitors: HashMap<(String, String), HashSet<String>> = HashMap::new();
    let mut utm_expected: HashMap<String, i64> = HashMap::new();
    for (id, _, events) in &merchants {
        for e in events {
            let k = (id.clone(), hour_key(e.ts));
            *expected.entry(k.clone()).or_default() += 1;
            if e.name == "pageview" {
                *expected_pv.entry(k.clone()).or_default() += 1;
            }
            if let Some(v) = &e.visitor_id {
                visitors.entry(k).or_default().insert(v.clone());
            }
            if e.url.as_deref().is_some_and(|u| u.contains("utm_source=")) {
                *utm_expected.entry(id.clone()).or_default() += 1;
            }
        }
    }
    let rows = c.sql(
        "SELECT merchant_id, CAST(date_trunc('hour', ts) AS VARCHAR) AS hour, count(*) AS n \
         FROM raw_events GROUP BY 1, 2 ORDER BY 1, 2",
    );
    let got: BTreeMap<(String, String), i64> = rows
        .iter()
        .map(|r| {
            (
                (
                    r["merchant_id"].as_str().unwrap().to_string(),
                    r["hour"].as_str().unwrap()[..19].to_string(),
                ),
                r["n"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, expected, "per merchant-hour counts in raw_events");
    for (id, _, events) in &merchants {
        let n = c.count(&format!(
            "SELECT count(*) FROM events WHERE merchant_id = '{id}'"
        ));
        assert_eq!(n as usize, events.len(), "events for {id}");
        let ids = c.count(&format!(
            "SELECT count(DISTINCT event_id) FROM raw_events WHERE merchant_id = '{id}'"
        ));
        assert_eq!(ids as usize, events.len(), "distinct event ids for {id}");
    }

    // The UTM plugin's effect: in `events`, not in `raw_events`.
    for (id, _, _) in &merchants {
        let want = utm_expected.get(id).copied().unwrap_or(0);
        assert!(want > 100, "generator should tag some landings ({want})");
        let processed = c.count(&format!(
            "SELECT count(*) FROM events WHERE merchant_id = '{id}' AND properties['utm_source'] IS NOT NULL"
        ));
        assert_eq!(processed, want, "utm_source extracted for {id}");
        let raw = c.count(&format!(
            "SELECT count(*) FROM raw_events WHERE merchant_id = '{id}' AND properties['utm_source'] IS NOT NULL"
        ));
        assert_eq!(raw, 0, "raw_events must hold the events as received");
        let versions = c.count(&format!(
            "SELECT count(*) FROM events WHERE merchant_id = '{id}' AND pipeline_version = 'v1'"
        ));
        assert_eq!(
            versions as usize,
            merchants.iter().find(|m| &m.0 == id).unwrap().2.len()
        );
    }

    // Rollups: pageviews exact, HLL visitors within 2% per merchant-hour.
    let expected_total_pv: i64 = expected_pv.values().sum();
    wait_for(Duration::from_secs(60), "rollups to catch up", || {
        (c.count("SELECT CAST(sum(pageviews) AS BIGINT) FROM rollups") == expected_total_pv)
            .then_some(())
    });
    let rows = c.sql("SELECT merchant_id, CAST(hour AS VARCHAR) AS hour, pageviews, visitors FROM rollups ORDER BY 1, 2");
    assert_eq!(rows.len(), expected.len());
    for r in rows {
        let k = (
            r["merchant_id"].as_str().unwrap().to_string(),
            r["hour"].as_str().unwrap()[..19].to_string(),
        );
        assert_eq!(
            r["pageviews"].as_i64().unwrap(),
            expected_pv.get(&k).copied().unwrap_or(0),
            "pageviews {k:?}"
        );
        let exact = visitors.get(&k).map_or(0, HashSet::len) as f64;
        let est = r["visitors"].as_i64().unwrap() as f64;
        assert!(
            (est - exact).abs() <= 0.02 * exact + 1.0,
            "visitors {k:?}: estimate {est} vs exact {exact}"
        );
    }
    // Merged over all hours: a distinct count, not a sum of hourly uniques.
    for (id, _, events) in &merchants {
        let exact = events
            .iter()
            .filter_map(|e| e.visitor_id.as_ref())
            .collect::<HashSet<_>>()
            .len() as f64;
        let est = c.count(&format!(
            "SELECT CAST(round(hll_estimate(hll_union(visitors_hll))) AS BIGINT) FROM rollups_hourly WHERE merchant_id = '{id}'"
        )) as f64;
        assert!(
            (est - exact).abs() <= 0.02 * exact,
            "{id}: merged visitors {est} vs exact {exact}"
        );
    }
    // Revenue: exact sums.
    for (id, _, events) in &merchants {
        let exact: i64 = events.iter().filter_map(|e: &Event| e.revenue_micros).sum();
        let got = c.count(&format!(
            "SELECT CAST(sum(revenue_micros) AS BIGINT) FROM revenue WHERE merchant_id = '{id}'"
        ));
        assert_eq!(got, exact, "revenue for {id}");
    }

    // Each standalone role serves its own metrics and readiness (`--metrics-listen`), and
    // the counters moved with this traffic.
    let scrape = |role: &str| http(&c.status_url(role), "GET", "/metrics", None, b"").1;
    let ready = |role: &str, check: &str| {
        let (status, body) = http(&c.status_url(role), "GET", "/readyz", None, b"");
        let v: serde_json::Value = serde_json::from_str(&body).expect("readyz json");
        (status == 200 && v["checks"][check]["ok"] == true).then_some(())
    };
    for (role, check) in [("edge", "bus"), ("ingest", "ingest"), ("rollup", "rollups")] {
        wait_for(Duration::from_secs(30), &format!("{role} ready"), || {
            ready(role, check)
        });
    }
    let edge = scrape("edge");
    assert_eq!(
        metric(
            &edge,
            "beacon_edge_events_total{listener=\"quic\",outcome=\"accepted\""
        ),
        total as f64,
        "{edge}"
    );
    assert!(
        metric(&edge, "beacon_edge_publish_seconds_count") > 0.0,
        "{edge}"
    );
    assert!(
        metric(
            &edge,
            "beacon_edge_plugin_batches_total{chain=\"beacon_plugin_utm\",outcome=\"ok\""
        ) > 0.0,
        "{edge}"
    );
    // Nothing in flight once every batch is answered; the budget is there.
    assert_eq!(
        metric(&edge, "beacon_edge_in_flight_batches "),
        0.0,
        "{edge}"
    );
    assert_eq!(metric(&edge, "beacon_edge_in_flight_bytes "), 0.0, "{edge}");
    assert_eq!(
        metric(&edge, "beacon_edge_in_flight_reserved_bytes "),
        0.0,
        "{edge}"
    );
    assert!(
        metric(&edge, "beacon_edge_in_flight_budget_bytes ") > 0.0,
        "{edge}"
    );
    let ingest = scrape("ingest");
    // Each event is a row in raw_events and in events (none failed).
    assert_eq!(
        metric(&ingest, "beacon_ingest_rows_total"),
        2.0 * total as f64,
        "{ingest}"
    );
    assert!(
        metric(&ingest, "beacon_ingest_commit_seconds_count") > 0.0,
        "{ingest}"
    );
    wait_for(Duration::from_secs(30), "no backlog", || {
        let text = scrape("ingest");
        (text.contains("beacon_ingest_consumer_pending{")
            && metric(&text, "beacon_ingest_consumer_pending") == 0.0)
            .then_some(())
    });
    let rollup = scrape("rollup");
    assert!(
        metric(&rollup, "beacon_rollup_runs_total{outcome=\"ok\"") > 0.0,
        "{rollup}"
    );
    assert!(metric(&rollup, "beacon_rollup_sequence") > 0.0, "{rollup}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_edge_runs_the_latest_pipeline_version() {
    let mut cluster = Cluster::start(false);
    let (id, key) = cluster.merchant("versioned");
    for _ in 0..3 {
        cluster.attach(&id, "beacon_plugin_utm", "");
    }
    // The pipeline bucket now holds history (v1..v3); a new edge must start on v3.
    cluster.start_edge();
    let client = cluster.client(&key).await.expect("connect");
    let events = beacon::demo::generate(
        5,
        "v.example",
        20,
        beacon_edge::now_ms() - 60_000,
        60_000,
        5,
    );
    client.send(&events).await.expect("send");
    let c = &cluster;
    wait_for(Duration::from_secs(60), "events after restart", || {
        (c.count(&format!(
            "SELECT count(*) FROM events WHERE merchant_id = '{id}' AND pipeline_version = 'v3'"
        )) == 20)
            .then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_daily_metrics_views_answer_the_common_questions() {
    let cluster = Cluster::start(true);
    let (m, key) = cluster.merchant("views");
    let client = cluster.client(&key).await.expect("client");
    // A fixed day (yesterday, UTC noon) so every event lands on one day.
    let day_ms = (beacon_edge::now_ms() / 86_400_000 - 1) * 86_400_000;
    let t = |min: i64| day_ms + 12 * 3_600_000 + min * 60_000;
    let ev =
        |id: &str, name: &str, ts: i64, visitor: &str, session: Option<&str>, path: &str| Event {
            event_id: id.into(),
            merchant_id: String::new(),
            name: name.into(),
            ts,
            received_at: 0,
            url: Some(format!("https://views.example{path}")),
            referrer: None,
            title: None,
            visitor_id: Some(visitor.into()),
            session_id: session.map(Into::into),
            user_id: None,
            revenue_micros: None,
            currency: None,
            properties: Default::default(),
        };
    let events = vec![
        // Visitor a: one session id, three pageviews over 10 minutes: one visit, no bounce.
        ev("a1", "pageview", t(0), "a", Some("sa"), "/"),
        ev("a2", "pageview", t(4), "a", Some("sa"), "/pricing"),
        ev("a3", "pageview", t(10), "a", Some("sa"), "/signup"),
        ev("a4", "signup", t(10), "a", Some("sa"), "/signup"),
        // Visitor b: one pageview: a bounce.
        ev("b1", "pageview", t(5), "b", Some("sb"), "/blog"),
        // Visitor c, no session id: two pageviews an hour apart are two visits, both bounces.
        ev("c1", "pageview", t(0), "c", None, "/"),
        ev("c2", "pageview", t(60), "c", None, "/docs"),
    ];
    client.send(&events).await.expect("sent");
    let c = &cluster;
    wait_for(Duration::from_secs(60), "events and rollups", || {
        (c.count(&format!(
            "SELECT count(*) FROM events WHERE merchant_id = '{m}'"
        )) == 7
            && c.count(&format!(
                "SELECT coalesce(sum(events), 0) FROM rollups WHERE merchant_id = '{m}'"
            )) == 7
            && c.count(&format!(
                "SELECT coalesce(sum(events), 0) FROM sessions WHERE merchant_id = '{m}'"
            )) == 7)
            .then_some(())
    });
    let visits = c.sql(&format!(
        "SELECT session, pageviews, bounce, duration_ms, entry_url, exit_url FROM sessions \
         WHERE merchant_id = '{m}' ORDER BY session"
    ));
    assert_eq!(visits.len(), 4, "{visits:?}");
    assert_eq!(visits[0]["session"], "c#1");
    assert_eq!(visits[1]["session"], "c#2");
    assert_eq!(visits[2]["session"], "sa#1");
    assert_eq!(visits[2]["pageviews"], 3);
    assert_eq!(visits[2]["bounce"], false);
    assert_eq!(visits[2]["duration_ms"], 600_000);
    assert_eq!(visits[2]["entry_url"], "https://views.example/");
    assert_eq!(visits[2]["exit_url"], "https://views.example/signup");
    assert_eq!(visits[3]["bounce"], true);
    let daily = c.sql(&format!(
        "SELECT events, pageviews, visitors, visits, bounce_rate, views_per_visit \
         FROM daily_metrics WHERE merchant_id = '{m}'"
    ));
    assert_eq!(daily.len(), 1, "{daily:?}");
    assert_eq!(daily[0]["events"], 7);
    assert_eq!(daily[0]["pageviews"], 6);
    assert_eq!(daily[0]["visitors"], 3);
    assert_eq!(daily[0]["visits"], 4);
    assert_eq!(daily[0]["bounce_rate"], 0.75);
    assert_eq!(daily[0]["views_per_visit"], 1.5);
}
