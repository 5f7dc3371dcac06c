//! The metrics API's rollup slices (`beacon_query::metrics::slices`: a merchant's rollup
//! rows in memory, grouped in Rust) against DataFusion over the same snapshot: realistic
//! traffic for a few merchants written in two commits, rolled up after each, and every
//! rolled-up query shape (each bucket, each rolled-up dimension with and without a time
//! bucket, goals and custom properties, conversion rate, revenue) in several time zones and
//! ranges must give the same answer both ways, also after new snapshots: appended rollup
//! deltas (slices extended by the rows added) and a compaction (slices read again whole).

use std::sync::Arc;
use std::time::Duration;

use beacon::traffic::{self, TrafficConfig};
use beacon_query::budget::{Budget, QueryLimits};
use beacon_query::metrics::slices::Deadline;
use beacon_query::metrics::{execute, json_rows, logical, MerchantSessions, Plan, QueryRequest};
use beacon_warehouse::maintain::{self, MaintainOptions};
use beacon_warehouse::{dimensions, rollup, TableKind, Warehouse};
use chrono::{TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::{json, Value};

async fn commit(wh: &Warehouse, seq: u64, events: Vec<beacon_proto::Event>) {
    traffic::commit_events(wh, seq, events)
        .await
        .expect("commit");
    rollup::run_once(wh).await.expect("rollup");
}

/// Every rolled-up query shape the API has.
fn requests() -> Vec<Value> {
    let mut out = Vec::new();
    let counts = json!(["visitors", "pageviews", "events"]);
    for ranges in ["30d", "7d", "12mo", "day"] {
        out.push(json!({"metrics": counts, "date_range": ranges}));
        for t in ["time:hour", "time:day", "time:week", "time:month"] {
            out.push(json!({"metrics": counts, "date_range": ranges, "dimensions": [t]}));
        }
    }
    let mut dims: Vec<String> = dimensions::rolled_up().map(|d| d.api.to_string()).collect();
    // A property no event has: no rows in any slice.
    dims.extend(["event:goal", "event:props:plan", "event:props:nothing"].map(String::from));
    for d in &dims {
        out.push(json!({"metrics": counts, "date_range": "30d", "dimensions": [d]}));
        out.push(json!({"metrics": counts, "date_range": "12mo", "dimensions": [d, "time:month"]}));
        out.push(json!({"metrics": ["visitors"], "date_range": "12mo", "dimensions": ["time:week", d],
                        "order_by": [["visitors", "desc"]], "pagination": {"limit": 5, "offset": 1}}));
    }
    out.push(json!({"metrics": ["visitors", "conversion_rate"], "date_range": "12mo", "dimensions": ["event:goal"]}));
    out.push(json!({"metrics": ["conversion_rate"], "date_range": "30d", "dimensions": ["time:day", "event:goal"]}));
    out.push(json!({"metrics": ["total_revenue", "average_revenue"], "date_range": "12mo", "dimensions": ["event:currency"]}));
    out.push(json!({"metrics": ["total_revenue"], "date_range": "12mo", "dimensions": ["time:month", "event:currency"]}));
    // Two currencies in the data: refused the same way by both.
    out.push(json!({"metrics": ["total_revenue"], "date_range": "12mo"}));
    out.push(json!({"metrics": ["visitors"], "date_range": ["2026-01-01", "2026-01-02"], "dimensions": ["time:day"],
                    "include": {"time_labels": true, "total_rows": true}}));
    out
}

/// Compares every request's answer from slices with DataFusion's; returns how many plans
/// had a rolled-up source.
async fn compare(
    slices: &MerchantSessions,
    plain: &MerchantSessions,
    merchants: &[String],
    now: chrono::DateTime<Utc>,
) -> usize {
    let budget = Budget::new(QueryLimits::default());
    let mut rolled = 0;
    for merchant in merchants {
        for tz in ["UTC", "America/New_York", "Asia/Tokyo", "Asia/Kolkata"] {
            let tz: Tz = tz.parse().expect("tz");
            for mut req in requests() {
                req["site_id"] = json!(merchant);
                let request: QueryRequest = serde_json::from_value(req.clone()).expect("request");
                let plan: Plan = request.plan(merchant, tz, now).expect("plan");
                let sources = plan.sources();
                if sources.iter().any(|s| s.rolled_up()) {
                    rolled += 1;
                }
                let read = slices.snapshots(&sources).await.expect("snapshots");
                let a = slices.run(&budget, &plan, &sources, &read).await;
                let ctx = plain.budgeted(&budget, merchant).await.expect("session");
                let b = execute(&ctx, &plan, &sources).await;
                match (a, b) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b, "{req} in {tz}"),
                    (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{req} in {tz}"),
                    (a, b) => panic!("{req} in {tz}: slices {a:?}, DataFusion {b:?}"),
                }
                // Each source's rows too, before merging (which could hide a difference).
                let memory = slices.slices().expect("slices");
                for source in &sources {
                    let deadline = Deadline::after(Duration::from_secs(60));
                    let mine = memory
                        .rows(&ctx, &budget, &plan, source, &read, deadline)
                        .await
                        .expect("slice rows");
                    let Some(mut mine) = mine else { continue };
                    let df = logical::frame(&ctx, &plan, source).await.expect("plan");
                    let mut theirs = json_rows(df).await.expect("rows");
                    mine.sort_by_key(Value::to_string);
                    theirs.sort_by_key(Value::to_string);
                    assert_eq!(mine, theirs, "{:?} rows of {req} in {tz}", source.kind);
                }
            }
        }
    }
    rolled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollup_slices_answer_as_datafusion_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wh = Arc::new(Warehouse::open(dir.path()).await.expect("warehouse"));
    let now = Utc
        .with_ymd_and_hms(2026, 3, 1, 12, 0, 0)
        .single()
        .expect("now");
    let day = 86_400_000;
    let config = TrafficConfig {
        seed: 11,
        events: 12_000,
        start_ms: (now.timestamp_millis() / day - 75) * day,
        days: 75,
        zipf_s: 1.0,
        late_share: 0.0,
    };
    let sites = traffic::sites(5, |i| format!("m_slices_{i}"));
    // The later part arrives in a second commit: new snapshots, slices loaded anew.
    let mut events = traffic::events_in_time_order(&config, &sites);
    let later = events.split_off(events.len() * 2 / 3);
    commit(&wh, 1, events).await;

    let slices = MerchantSessions::new(wh.clone());
    let plain = MerchantSessions::new(wh.clone()).with_slices(0);
    // And a merchant without any rows in tables that have other merchants' rows.
    let mut merchants: Vec<String> = [0, 1, 4]
        .iter()
        .map(|i| sites[*i].merchant_id.clone())
        .collect();
    merchants.push("m_slices_none".into());
    let rolled = compare(&slices, &plain, &merchants, now).await;
    let first = slices.slices().expect("slices").counts();
    // The comparisons went through slices, one per merchant and rollup table (every
    // breakdown dimension in one), reused across plans.
    assert!(rolled > 100, "{rolled} rolled-up plans");
    assert!(
        first.extended == 0 && first.reused > first.loaded * 20,
        "{first:?}"
    );

    // Appended rollup deltas: each slice is the previous one plus the rows of the files
    // added since, not read again whole.
    commit(&wh, 2, later).await;
    compare(&slices, &plain, &merchants, now).await;
    let second = slices.slices().expect("slices").counts();
    // 4 merchants (one without rows), 3 tables.
    assert_eq!(first.loaded, 12, "{first:?}");
    assert_eq!(
        (second.loaded, second.extended),
        (first.loaded, first.loaded),
        "after appends: {first:?} then {second:?}"
    );

    // Compaction replaces the delta files with folded ones: a slice built on the files
    // that are gone cannot be extended, and is read whole again; the merchant without rows
    // had no files planned before nor now (column bounds), so its empty slices are extended.
    let kinds = [
        TableKind::RollupsHourly,
        TableKind::BreakdownsHourly,
        TableKind::RevenueHourly,
    ];
    let reports = maintain::maintain(&wh, &kinds, &MaintainOptions::default(), &|_, _, _, _| {})
        .await
        .expect("maintain");
    assert!(
        reports.iter().all(|r| r.files_compacted >= 2),
        "{reports:?}"
    );
    compare(&slices, &plain, &merchants, now).await;
    let third = slices.slices().expect("slices").counts();
    assert_eq!(
        (third.loaded, third.extended),
        (second.loaded + 9, second.extended + 3),
        "after compaction: {second:?} then {third:?}"
    );
}
