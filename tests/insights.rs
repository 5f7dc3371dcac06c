//! The metrics API against an independent computation: realistic traffic for a dozen
//! merchants (Zipf sizes, visits, sources, UTM, countries, devices, goals, revenue, late
//! events) goes through the real edge, JetStream, ingest and rollups; every metric and
//! breakdown the API returns is compared with what the generator's own events and intent
//! say it must be, computed here in plain Rust without Beacon's rollup or SQL code. Counts
//! and revenue must match exactly, visitor estimates within 2%.

#[path = "common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use beacon::traffic::{self, Generated, Site, TrafficConfig};
use chrono::{TimeZone, Utc};
use chrono_tz::Tz;
use common::{http, Cluster};
use serde_json::{json, Value};

const SITES: usize = 12;
/// (site index, time zone): a UTC site, a whole-hour zone (answered from rollups), a
/// half-hour zone (answered from events), and a small site from the tail.
const CHECKED: &[(usize, &str)] = &[
    (0, "UTC"),
    (1, "America/New_York"),
    (2, "Asia/Kolkata"),
    (11, "UTC"),
];

#[derive(Default, Debug, Clone)]
struct Agg {
    events: i64,
    pageviews: i64,
    visitors: HashSet<String>,
}

impl Agg {
    fn add(&mut self, e: &beacon_proto::Event) {
        self.events += 1;
        if e.name == "pageview" {
            self.pageviews += 1;
        }
        if let Some(v) = &e.visitor_id {
            self.visitors.insert(v.clone());
        }
    }
}

fn group<'a>(
    evs: impl Iterator<Item = &'a Generated>,
    key: impl Fn(&Generated) -> Option<String>,
) -> BTreeMap<String, Agg> {
    let mut out: BTreeMap<String, Agg> = BTreeMap::new();
    for g in evs {
        if let Some(k) = key(g) {
            out.entry(k).or_default().add(&g.event);
        }
    }
    out
}

fn local_day(ts_ms: i64, tz: Tz) -> String {
    Utc.timestamp_millis_opt(ts_ms)
        .single()
        .expect("ts")
        .with_timezone(&tz)
        .format("%Y-%m-%d")
        .to_string()
}

fn prop(g: &Generated, k: &str) -> Option<String> {
    g.event.properties.get(k).cloned()
}

/// Visits as the docs define them: a tracker session id (else the visitor), split where
/// 30 minutes pass without an event.
struct Visit {
    visitor: String,
    events: Vec<(i64, bool, &'static str)>, // (ts, is pageview, page)
}

fn visits(evs: &[&Generated]) -> Vec<Visit> {
    let mut by_key: HashMap<String, Vec<&Generated>> = HashMap::new();
    for g in evs {
        let key = g
            .event
            .session_id
            .clone()
            .or(g.event.visitor_id.clone())
            .expect("generated events have a visitor");
        by_key.entry(key).or_default().push(g);
    }
    let mut out = Vec::new();
    for (_, mut list) in by_key {
        list.sort_by_key(|g| g.event.ts);
        let mut current: Option<Visit> = None;
        let mut last_ts = i64::MIN;
        for g in list {
            if current.is_none() || g.event.ts - last_ts > 30 * 60_000 {
                out.extend(current.take());
                current = Some(Visit {
                    visitor: g.event.visitor_id.clone().unwrap_or_default(),
                    events: Vec::new(),
                });
            }
            last_ts = g.event.ts;
            if let Some(v) = current.as_mut() {
                v.events
                    .push((g.event.ts, g.event.name == "pageview", g.truth.page));
            }
        }
        out.extend(current);
    }
    out
}

fn close_visitors(got: &Value, want: usize, what: &str) {
    let got = got.as_f64().unwrap_or(f64::NAN);
    let want = want as f64;
    assert!(
        (got - want).abs() <= (0.02 * want).max(1.0),
        "{what}: visitors {got} vs {want}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_api_matches_an_independent_computation_of_generated_traffic() {
    let cluster = Cluster::start(true);
    let mut sites = Vec::new();
    let mut keys = Vec::new();
    let mut zones = [Tz::UTC; SITES];
    for (i, zone) in zones.iter_mut().enumerate() {
        let tz = CHECKED
            .iter()
            .find(|(s, _)| *s == i)
            .map_or("UTC", |(_, z)| *z);
        let out = cluster.cli(&[
            "merchant",
            "create",
            &format!("site {i}"),
            "--timezone",
            tz,
            "--format",
            "json",
        ]);
        let m: Value = serde_json::from_str(&out).expect("merchant json");
        *zone = tz.parse().expect("tz");
        sites.push(Site {
            merchant_id: m["id"].as_str().expect("id").to_string(),
            host: format!("site{i}.example"),
        });
        // The generated events carry the edge's `$` properties (countries, devices) already,
        // as an import of enriched data does: only the server key may set them.
        keys.push(m["server_key"].as_str().expect("key").to_string());
    }
    let now = beacon_edge::now_ms();
    let day = 86_400_000;
    let config = TrafficConfig {
        seed: 42,
        events: 24_000,
        start_ms: (now / day - 35) * day,
        days: 34,
        zipf_s: 1.1,
        late_share: 0.02,
    };
    let all = traffic::generate(&config, &sites);
    assert!(all.iter().all(|g| g.event.ts < now));

    // On time first, then the late events into hours already rolled up.
    let mut clients = Vec::new();
    for key in &keys {
        clients.push(cluster.client(key).await.expect("client"));
    }
    let mut sent = 0i64;
    for late in [false, true] {
        for (i, site) in sites.iter().enumerate() {
            let batch: Vec<_> = all
                .iter()
                .filter(|g| g.late == late && g.event.merchant_id == site.merchant_id)
                .map(|g| g.event.clone())
                .collect();
            for chunk in batch.chunks(500) {
                clients[i].send(chunk).await.expect("sent");
            }
            sent += batch.len() as i64;
        }
        cluster.wait_rolled_up(sent, Duration::from_secs(120));
    }

    let (_api, addr) = cluster.spawn_api();

    for &(index, _) in CHECKED {
        let tz = zones[index];
        let site = &sites[index].merchant_id;
        let token = cluster.read_token(site);
        let evs: Vec<&Generated> = all
            .iter()
            .filter(|g| &g.event.merchant_id == site)
            .collect();
        let first = evs.iter().map(|g| g.event.ts).min().expect("events");
        let last = evs.iter().map(|g| g.event.ts).max().expect("events");
        let range = json!([local_day(first, tz), local_day(last, tz)]);
        // The site's query over the whole range: (status, body).
        let ask = |body: Value| -> (u16, String) {
            let mut body = body;
            body["site_id"] = json!(site);
            body["date_range"] = range.clone();
            http(
                &addr,
                "POST",
                "/api/v2/query",
                Some(&token),
                body.to_string().as_bytes(),
            )
        };
        let query = |body: Value| -> Value {
            let (status, text) = ask(body.clone());
            assert_eq!(status, 200, "{body}: {text}");
            serde_json::from_str(&text).expect("json")
        };
        let results = |v: &Value| -> BTreeMap<String, Value> {
            v["results"]
                .as_array()
                .expect("results")
                .iter()
                .map(|r| {
                    let dims: Vec<String> = r["dimensions"]
                        .as_array()
                        .expect("dims")
                        .iter()
                        .map(|d| d.as_str().unwrap_or_default().to_string())
                        .collect();
                    (dims.join("|"), r["metrics"].clone())
                })
                .collect()
        };
        let ctx = format!("site {index} ({tz})");
        let sources = |v: &Value| v["meta"]["sources"].to_string();

        // Totals.
        let v = query(json!({"metrics": ["visitors", "pageviews", "events"]}));
        let total = group(evs.iter().copied(), |_| Some(String::new()));
        let t = &total[""];
        let m = &v["results"][0]["metrics"];
        close_visitors(&m[0], t.visitors.len(), &ctx);
        assert_eq!(
            (m[1].as_i64(), m[2].as_i64()),
            (Some(t.pageviews), Some(t.events)),
            "{ctx}"
        );
        // Hourly UTC rollups cannot start a day at a half hour.
        let half_hour = tz == Tz::Asia__Kolkata;
        let unfiltered = if half_hour {
            r#"["events"]"#
        } else {
            r#"["rollups"]"#
        };
        assert_eq!(sources(&v), unfiltered, "{ctx}: unfiltered totals");

        // The daily time series (in the merchant's zone) and breakdowns by page, landing
        // source, country, device and a custom property: all from the rollups.
        type KeyFn<'a> = Box<dyn Fn(&Generated) -> Option<String> + 'a>;
        let breakdowns: [(&str, KeyFn); 6] = [
            ("time:day", Box::new(|g| Some(local_day(g.event.ts, tz)))),
            ("event:page", Box::new(|g| Some(g.truth.page.to_string()))),
            (
                "visit:source",
                Box::new(|g| g.truth.landing.as_ref().map(|l| l.0.clone())),
            ),
            ("visit:country", Box::new(|g| prop(g, "$country"))),
            ("visit:device", Box::new(|g| prop(g, "$device"))),
            ("event:props:plan", Box::new(|g| prop(g, "plan"))),
        ];
        for (dim, key) in breakdowns {
            let v =
                query(json!({"metrics": ["visitors", "pageviews", "events"], "dimensions": [dim]}));
            let want = group(evs.iter().copied(), key);
            let got = results(&v);
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>(),
                "{ctx}: {dim} values"
            );
            for (k, a) in &want {
                close_visitors(&got[k][0], a.visitors.len(), &format!("{ctx} {dim}={k}"));
                assert_eq!(
                    (got[k][1].as_i64(), got[k][2].as_i64()),
                    (Some(a.pageviews), Some(a.events)),
                    "{ctx} {dim}={k}"
                );
            }
            assert_eq!(sources(&v), unfiltered, "{ctx} {dim}");
        }

        // Goals and conversion rates.
        let v = query(
            json!({"metrics": ["visitors", "events", "conversion_rate"], "dimensions": ["event:goal"]}),
        );
        let want = group(evs.iter().copied(), |g| g.truth.goal.map(str::to_string));
        let got = results(&v);
        assert_eq!(got.len(), want.len(), "{ctx}: goals {got:?}");
        for (goal, a) in &want {
            assert_eq!(got[goal][1].as_i64(), Some(a.events), "{ctx} goal {goal}");
            let rate = 100.0 * a.visitors.len() as f64 / t.visitors.len() as f64;
            let got_rate = got[goal][2].as_f64().expect("rate");
            assert!(
                (got_rate - rate).abs() <= (0.04 * rate).max(0.02),
                "{ctx} {goal}: conversion rate {got_rate} vs {rate}"
            );
        }

        // Filters are answered from `events`: pages of German visitors; product pages seen
        // on anything but a phone; Google landings per day.
        let v = query(
            json!({"metrics": ["visitors", "pageviews"], "dimensions": ["event:page"],
            "filters": [["is", "visit:country", ["DE"]]]}),
        );
        assert_eq!(sources(&v), r#"["events"]"#, "{ctx}");
        let want = group(
            evs.iter()
                .copied()
                .filter(|g| prop(g, "$country").as_deref() == Some("DE")),
            |g| Some(g.truth.page.to_string()),
        );
        let got = results(&v);
        assert_eq!(got.len(), want.len(), "{ctx}: DE pages");
        for (k, a) in &want {
            assert_eq!(
                got[k][0].as_u64(),
                Some(a.visitors.len() as u64),
                "{ctx} DE {k}"
            );
            assert_eq!(got[k][1].as_i64(), Some(a.pageviews), "{ctx} DE {k}");
        }
        let v = query(json!({"metrics": ["pageviews", "events"],
            "filters": [["and", [["contains", "event:page", ["/products"]], ["not", ["is", "visit:device", ["Mobile"]]]]]]}));
        let want = group(
            evs.iter().copied().filter(|g| {
                g.truth.page.contains("/products")
                    && prop(g, "$device").as_deref() != Some("Mobile")
            }),
            |_| Some(String::new()),
        );
        let a = want.get("").cloned().unwrap_or_default();
        assert_eq!(
            v["results"][0]["metrics"],
            json!([a.pageviews, a.events]),
            "{ctx}: products not on mobile"
        );
        let v = query(json!({"metrics": ["visitors"], "dimensions": ["time:day"],
            "filters": [["or", [["is", "visit:source", ["Google"]], ["is", "visit:source", ["Bing"]]]]]}));
        let want = group(
            evs.iter().copied().filter(|g| {
                matches!(
                    g.truth.landing.as_ref().map(|l| l.0.as_str()),
                    Some("Google" | "Bing")
                )
            }),
            |g| Some(local_day(g.event.ts, tz)),
        );
        let got = results(&v);
        assert_eq!(got.len(), want.len(), "{ctx}: search days");
        for (k, a) in &want {
            assert_eq!(
                got[k][0].as_u64(),
                Some(a.visitors.len() as u64),
                "{ctx} search {k}"
            );
        }

        // Visits from the sessions view.
        let all_visits = visits(&evs);
        let n = all_visits.len() as f64;
        let v = query(
            json!({"metrics": ["visits", "bounce_rate", "visit_duration", "views_per_visit"]}),
        );
        let m = &v["results"][0]["metrics"];
        assert_eq!(
            m[0].as_u64(),
            Some(all_visits.len() as u64),
            "{ctx}: visits"
        );
        let bounces = all_visits
            .iter()
            .filter(|v| v.events.iter().filter(|e| e.1).count() <= 1)
            .count() as f64;
        let duration: f64 = all_visits
            .iter()
            .map(|v| {
                let ts: Vec<i64> = v.events.iter().map(|e| e.0).collect();
                (ts.iter().max().unwrap_or(&0) - ts.iter().min().unwrap_or(&0)) as f64 / 1000.0
            })
            .sum::<f64>()
            / n;
        let views: f64 = all_visits
            .iter()
            .map(|v| v.events.iter().filter(|e| e.1).count() as f64)
            .sum::<f64>()
            / n;
        assert!(
            (m[1].as_f64().expect("bounce") - (100.0 * bounces / n).round()).abs() <= 1.0,
            "{ctx}: bounce {m}"
        );
        assert!(
            (m[2].as_f64().expect("duration") - duration.round()).abs() <= 1.0,
            "{ctx}: duration {m} vs {duration}"
        );
        assert!(
            (m[3].as_f64().expect("views") - views).abs() <= 0.011,
            "{ctx}: views per visit {m} vs {views}"
        );

        // Entry pages: visits and visitors.
        let v =
            query(json!({"metrics": ["visits", "visitors"], "dimensions": ["visit:entry_page"]}));
        let mut want: BTreeMap<&str, (u64, HashSet<&str>)> = BTreeMap::new();
        for visit in &all_visits {
            let entry = visit
                .events
                .iter()
                .min_by_key(|e| e.0)
                .map(|e| e.2)
                .unwrap_or("/");
            let w = want.entry(entry).or_default();
            w.0 += 1;
            w.1.insert(&visit.visitor);
        }
        let got = results(&v);
        assert_eq!(got.len(), want.len(), "{ctx}: entry pages");
        for (page, (n, visitors)) in &want {
            assert_eq!(got[*page][0].as_u64(), Some(*n), "{ctx} entry {page}");
            assert_eq!(
                got[*page][1].as_u64(),
                Some(visitors.len() as u64),
                "{ctx} entry {page}"
            );
        }

        // Visit metrics by an event dimension: a visit counts under each page its events
        // were on (the visits joined with their events).
        let v = query(json!({"metrics": ["visits", "bounce_rate"], "dimensions": ["event:page"]}));
        assert!(sources(&v).contains("sessions"), "{ctx}: {}", sources(&v));
        let mut want: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for visit in &all_visits {
            let pages: BTreeSet<&str> = visit.events.iter().map(|e| e.2).collect();
            let bounced = visit.events.iter().filter(|e| e.1).count() <= 1;
            for page in pages {
                let w = want.entry(page).or_default();
                w.0 += 1;
                w.1 += u64::from(bounced);
            }
        }
        let got = results(&v);
        assert_eq!(got.len(), want.len(), "{ctx}: visits by page");
        for (page, (n, bounces)) in &want {
            assert_eq!(got[*page][0].as_u64(), Some(*n), "{ctx}: visits on {page}");
            let rate = (100.0 * *bounces as f64 / *n as f64).round();
            assert!(
                (got[*page][1].as_f64().expect("bounce") - rate).abs() <= 1.0,
                "{ctx}: bounce rate of visits on {page}: {} vs {rate}",
                got[*page][1]
            );
        }

        // Filtered on an event dimension: the visits one of whose events was on a product
        // page, and their visitors.
        let v = query(json!({"metrics": ["visits", "visitors"],
            "filters": [["contains", "event:page", ["/products"]]]}));
        let reached: Vec<&Visit> = all_visits
            .iter()
            .filter(|v| v.events.iter().any(|e| e.2.contains("/products")))
            .collect();
        assert!(
            !reached.is_empty(),
            "{ctx}: the generator visits product pages"
        );
        let m = &v["results"][0]["metrics"];
        assert_eq!(
            m[0].as_u64(),
            Some(reached.len() as u64),
            "{ctx}: visits reaching products"
        );
        let visitors: HashSet<&str> = reached.iter().map(|v| v.visitor.as_str()).collect();
        assert_eq!(
            m[1].as_u64(),
            Some(visitors.len() as u64),
            "{ctx}: their visitors"
        );

        // Ordering and pagination: pages by page views, second to fourth.
        let v = query(
            json!({"metrics": ["pageviews"], "dimensions": ["event:page"],
            "order_by": [["pageviews", "desc"]], "pagination": {"limit": 3, "offset": 1}}),
        );
        let mut want: Vec<(i64, String)> =
            group(evs.iter().copied(), |g| Some(g.truth.page.to_string()))
                .into_iter()
                .map(|(k, a)| (a.pageviews, k))
                .collect();
        want.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let want: Vec<Value> = want
            .iter()
            .skip(1)
            .take(3)
            .map(|(n, k)| json!({"metrics": [n], "dimensions": [k]}))
            .collect();
        assert_eq!(v["results"], json!(want), "{ctx}: ordered pages");

        // Revenue, exactly, per currency (SQL view over the revenue rollup).
        let mut want: BTreeMap<String, i64> = BTreeMap::new();
        for g in &evs {
            if let (Some(r), Some(c)) = (g.event.revenue_micros, &g.event.currency) {
                *want.entry(c.clone()).or_default() += r;
            }
        }
        let got: BTreeMap<String, i64> = cluster
            .sql(&format!(
                "SELECT currency, CAST(sum(revenue_micros) AS BIGINT) AS r FROM revenue \
                 WHERE merchant_id = '{site}' GROUP BY 1"
            ))
            .iter()
            .map(|r| {
                (
                    r["currency"].as_str().unwrap_or("").to_string(),
                    r["r"].as_i64().unwrap_or(0),
                )
            })
            .collect();
        assert_eq!(got, want, "{ctx}: revenue");

        // The same through the API, per currency, with the count of rows before paging.
        let mut orders: BTreeMap<String, i64> = BTreeMap::new();
        for g in &evs {
            if let (Some(_), Some(c)) = (g.event.revenue_micros, &g.event.currency) {
                *orders.entry(c.clone()).or_default() += 1;
            }
        }
        let money =
            |micros: i64, n: i64| json!((micros as f64 / n as f64 / 10_000.0).round() / 100.0);
        let v = query(json!({"metrics": ["total_revenue", "average_revenue"],
            "dimensions": ["event:currency"], "include": {"total_rows": true},
            "pagination": {"limit": 1}}));
        assert_eq!(
            v["meta"]["total_rows"],
            json!(want.len()),
            "{ctx}: total_rows"
        );
        assert_eq!(
            v["results"].as_array().map(Vec::len),
            Some(want.len().min(1))
        );
        let v = query(json!({"metrics": ["total_revenue", "average_revenue"],
            "dimensions": ["event:currency"]}));
        let got = results(&v);
        assert_eq!(got.len(), want.len(), "{ctx}: currencies {got:?}");
        for (c, micros) in &want {
            assert_eq!(
                got[c],
                json!([money(*micros, 1), money(*micros, orders[c])]),
                "{ctx}: revenue in {c}"
            );
        }
        // By goal in one currency, filtered (from `events`): an order counts under its goal.
        if let Some(c) = want.keys().next() {
            let v = query(
                json!({"metrics": ["total_revenue"], "dimensions": ["event:goal"],
                "filters": [["is", "event:currency", [c]]]}),
            );
            assert_eq!(v["meta"]["currency"], json!(c), "{ctx}");
            let mut by_goal: BTreeMap<String, i64> = BTreeMap::new();
            for g in &evs {
                if let (Some(r), Some(cur), Some(goal)) =
                    (g.event.revenue_micros, &g.event.currency, g.truth.goal)
                {
                    if cur == c {
                        *by_goal.entry(goal.to_string()).or_default() += r;
                    }
                }
            }
            let got = results(&v);
            assert_eq!(got.len(), by_goal.len(), "{ctx}: revenue goals {got:?}");
            for (goal, micros) in &by_goal {
                assert_eq!(
                    got[goal],
                    json!([money(*micros, 1)]),
                    "{ctx}: revenue of {goal} in {c}"
                );
            }
        }
        // Several currencies without choosing one: refused, naming them.
        if want.len() > 1 {
            let (status, text) = ask(json!({"metrics": ["total_revenue"]}));
            assert_eq!(status, 400, "{ctx}: {text}");
            assert!(text.contains("several currencies"), "{ctx}: {text}");
        }

        // time_labels: every day of the range, also days without traffic, in order.
        let v = query(
            json!({"metrics": ["visitors"], "dimensions": ["time:day"], "include": {"time_labels": true}}),
        );
        let labels: Vec<String> = v["meta"]["time_labels"]
            .as_array()
            .expect("time_labels")
            .iter()
            .map(|l| l.as_str().unwrap_or_default().to_string())
            .collect();
        let (first_day, last_day) = (local_day(first, tz), local_day(last, tz));
        assert_eq!(
            (labels.first(), labels.last()),
            (Some(&first_day), Some(&last_day)),
            "{ctx}"
        );
        let days = (chrono::NaiveDate::parse_from_str(&last_day, "%Y-%m-%d").expect("day")
            - chrono::NaiveDate::parse_from_str(&first_day, "%Y-%m-%d").expect("day"))
        .num_days() as usize
            + 1;
        assert_eq!(labels.len(), days, "{ctx}: one label per day");
        assert!(results(&v).keys().all(|d| labels.contains(d)), "{ctx}");
    }

    // The checked-in OpenAPI document is what the server serves, and names every route.
    let (status, text) = http(&addr, "GET", "/api/v2/openapi.json", None, b"");
    assert_eq!(status, 200);
    let served: Value = serde_json::from_str(&text).expect("openapi json");
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"))
            .expect("docs/openapi.json"),
    )
    .expect("json");
    assert_eq!(served, file);
}
