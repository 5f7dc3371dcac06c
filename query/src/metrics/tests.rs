use super::dates::date_range;
use super::logical::{depth, events_predicate};
use super::*;
use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::{json, Value};

fn req(v: Value) -> QueryRequest {
    serde_json::from_value(v).unwrap()
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 15, 10, 30, 0).unwrap()
}

fn plan(v: Value) -> Result<Plan, QueryError> {
    req(v).plan("m_1", Tz::UTC, now())
}

fn with_filters(filters: Value) -> Result<Plan, QueryError> {
    plan(json!({"site_id": "m_1", "metrics": ["visitors"], "date_range": "7d", "filters": filters}))
}

#[test]
fn a_long_or_becomes_a_balanced_tree_not_a_chain() {
    let leaves: Vec<Value> = (0..150)
        .map(|i| json!(["is", "event:page", [format!("/p{i}")]]))
        .collect();
    let p = with_filters(json!([["or", leaves]])).unwrap();
    let e = events_predicate(&p).unwrap();
    // Depth of the expression tree: about log2(150), not 150.
    let d = depth(&e);
    assert!(d <= 12, "nesting {d}: {e}");
    assert_eq!(e.to_string().matches(" OR ").count(), 149);
}

#[test]
fn filter_complexity_is_refused_with_the_limit_named() {
    let leaf = json!(["is", "event:page", ["/a"]]);
    let msg = |f: Value| with_filters(f).unwrap_err().to_string();
    // 2,200 terms of one `or` (the request that used to overflow the planner's stack).
    let many: Vec<Value> = (0..2200).map(|_| leaf.clone()).collect();
    assert!(msg(json!([["or", many]])).contains("more than 200 filters"));
    // 38 nested `not`s.
    let mut deep = leaf.clone();
    for _ in 0..38 {
        deep = json!(["not", deep]);
    }
    assert!(msg(json!([deep])).contains("nested deeper than 8"));
    // Too many values in all.
    let big: Vec<Value> = (0..6)
        .map(|i| {
            json!([
                "is",
                "event:page",
                (0..1000).map(|j| format!("/{i}/{j}")).collect::<Vec<_>>()
            ])
        })
        .collect();
    assert!(msg(json!(big)).contains("more than 5000 filter values"));
    let contains: Vec<String> = (0..101).map(|i| i.to_string()).collect();
    assert!(msg(json!([["contains", "event:page", contains]])).contains("1-100 values"));
    // Within the limits, fine.
    let mut ok = leaf.clone();
    for _ in 0..7 {
        ok = json!(["not", ok]);
    }
    assert!(with_filters(json!([ok])).is_ok());
}

#[test]
fn dates_outside_what_timestamps_hold_are_a_400_not_a_failure_later() {
    for range in [
        json!(["0001-01-01", "0001-12-31"]),
        json!(["9999-01-01", "9999-01-02"]),
    ] {
        let e = date_range(&range, Tz::UTC, now()).unwrap_err();
        assert_eq!(e.field, "date_range");
        assert!(e.message.contains("between 1970-01-01 and 2200-12-31"));
    }
}

#[test]
fn date_ranges_resolve_in_the_merchants_zone() {
    let r = |v: Value, tz: Tz| date_range(&v, tz, now()).unwrap();
    let (f, t) = r("7d".into(), Tz::UTC);
    assert_eq!(f.to_rfc3339(), "2026-03-09T00:00:00+00:00");
    assert_eq!(t.to_rfc3339(), "2026-03-16T00:00:00+00:00");
    assert_eq!(
        r("12mo".into(), Tz::UTC).0.to_rfc3339(),
        "2025-04-01T00:00:00+00:00"
    );
    assert_eq!(
        r("month".into(), Tz::UTC).0.to_rfc3339(),
        "2026-03-01T00:00:00+00:00"
    );
    // 10:30 UTC is 19:30 in Tokyo; its day started at 15:00 UTC the day before.
    let (f, t) = r("day".into(), Tz::Asia__Tokyo);
    assert_eq!(f.to_rfc3339(), "2026-03-14T15:00:00+00:00");
    assert_eq!(t.to_rfc3339(), "2026-03-15T15:00:00+00:00");
    // 22:00 in Los Angeles is already the next day in UTC.
    let late = Utc.with_ymd_and_hms(2026, 3, 16, 5, 0, 0).unwrap();
    let (f, _) = date_range(&"day".into(), Tz::America__Los_Angeles, late).unwrap();
    assert_eq!(f.to_rfc3339(), "2026-03-15T07:00:00+00:00");
    let (f, t) = r(json!(["2026-01-01", "2026-01-31"]), Tz::Asia__Kolkata);
    assert_eq!(f.to_rfc3339(), "2025-12-31T18:30:00+00:00");
    assert_eq!(t.to_rfc3339(), "2026-01-31T18:30:00+00:00");
    assert!(date_range(&"fortnight".into(), Tz::UTC, now()).is_err());
    assert!(date_range(&json!(["2026-02-01", "2026-01-01"]), Tz::UTC, now()).is_err());
}

#[test]
fn bad_fields_are_named() {
    let field = |v| plan(v).unwrap_err().field;
    let base = |extra: Value| {
        let mut b = json!({"site_id": "m_1", "metrics": ["visitors"], "date_range": "day"});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    assert_eq!(field(base(json!({"metrics": ["nope"]}))), "metrics");
    assert_eq!(field(base(json!({"date_range": "x"}))), "date_range");
    assert_eq!(
        field(base(json!({"dimensions": ["visit:planet"]}))),
        "dimensions"
    );
    assert_eq!(
        field(base(json!({"dimensions": ["event:props:$os"]}))),
        "dimensions"
    );
    assert_eq!(
        field(base(json!({"filters": [["is", "event:page"]]}))),
        "filters"
    );
    assert_eq!(
        field(base(json!({"filters": [["like", "event:page", ["/"]]]}))),
        "filters"
    );
    assert_eq!(
        field(base(json!({"order_by": [["pageviews", "desc"]]}))),
        "order_by"
    );
    // Entry and exit pages come from `sessions`, which has no per-event dimensions.
    assert_eq!(
        field(base(
            json!({"metrics": ["visits"], "dimensions": ["visit:entry_page", "event:page"]})
        )),
        "dimensions"
    );
    assert_eq!(
        field(base(
            json!({"metrics": ["visitors"], "dimensions": ["visit:exit_page"], "filters": [["is", "event:goal", ["Signup"]]]})
        )),
        "filters"
    );
    assert_eq!(
        field(base(json!({"metrics": ["conversion_rate"]}))),
        "metrics"
    );
    assert_eq!(
        field(base(json!({"include": {"everything": true}}))),
        "include"
    );
    assert_eq!(
        field(base(json!({"include": {"time_labels": true}}))),
        "include"
    );
    assert_eq!(
        field(base(
            json!({"metrics": ["total_revenue"], "dimensions": ["visit:entry_page"]})
        )),
        "metrics"
    );
}

#[test]
fn unfiltered_breakdowns_use_rollups_and_filters_use_events() {
    let p = plan(json!({"site_id": "m_1", "metrics": ["visitors", "pageviews"], "date_range": "7d", "dimensions": ["visit:country"]})).unwrap();
    let s = p.sources();
    assert_eq!(s.len(), 1);
    assert_eq!(
        (s[0].kind, s[0].tables),
        (SourceKind::Rollups, &["breakdowns_hourly"][..])
    );

    let p = plan(json!({"site_id": "m_1", "metrics": ["visitors"], "date_range": "7d", "dimensions": ["event:page"],
            "filters": [["and", [["is", "visit:source", ["Google", "Bing"]], ["not", ["contains", "event:page", ["o'k"]]]]]]})).unwrap();
    let s = p.sources();
    assert_eq!(s[0].kind, SourceKind::Events);
    // Values are literals of the plan, quotes and all: never SQL text.
    let e = events_predicate(&p).unwrap().to_string();
    assert!(
        e.contains(r#"source IN ([Utf8("Google"), Utf8("Bing")])"#),
        "{e}"
    );
    assert!(e.contains(r#"strpos(path, Utf8("o'k"))"#), "{e}");

    // A half-hour zone cannot be regrouped from UTC hours.
    let p = req(json!({"site_id": "m_1", "metrics": ["visitors"], "date_range": "7d", "dimensions": ["time:day"]}))
            .plan("m_1", Tz::Asia__Kolkata, now())
            .unwrap();
    assert_eq!(p.sources()[0].kind, SourceKind::Events);

    let p = plan(json!({"site_id": "m_1", "metrics": ["visitors", "bounce_rate"], "date_range": "7d", "dimensions": ["visit:entry_page"]})).unwrap();
    let kinds: Vec<_> = p.sources().iter().map(|s| s.kind).collect();
    assert_eq!(kinds, vec![SourceKind::Sessions]);

    // Visit metrics by an event dimension join visits with their events; the event
    // metrics still come from the event sources.
    let p = plan(json!({"site_id": "m_1", "metrics": ["pageviews", "bounce_rate"], "date_range": "7d", "dimensions": ["event:page"]})).unwrap();
    let s = p.sources();
    assert_eq!(
        (s[1].kind, s[1].tables),
        (SourceKind::Sessions, &["visits", "events"][..])
    );
    let p = plan(json!({"site_id": "m_1", "metrics": ["visits"], "date_range": "7d", "filters": [["is", "event:goal", ["Signup"]]]})).unwrap();
    assert_eq!(p.sources()[0].tables, &["visits", "events"][..]);
    let p = plan(json!({"site_id": "m_1", "metrics": ["visits"], "date_range": "7d", "filters": [["is", "visit:country", ["DE"]]]})).unwrap();
    assert_eq!(p.sources()[0].tables, &["visits"][..]);

    // Revenue: from revenue_hourly by time or currency, else from events.
    let p = plan(json!({"site_id": "m_1", "metrics": ["total_revenue"], "date_range": "7d", "dimensions": ["time:day", "event:currency"]})).unwrap();
    let s = p.sources();
    assert_eq!(
        (s[0].kind, s[0].tables),
        (SourceKind::Revenue, &["revenue_hourly"][..])
    );
    let p = plan(json!({"site_id": "m_1", "metrics": ["visitors", "average_revenue"], "date_range": "7d", "dimensions": ["event:goal"]})).unwrap();
    let s = p.sources();
    assert_eq!(
        (s[1].kind, s[1].tables),
        (SourceKind::Revenue, &["events"][..])
    );
}

#[test]
fn time_labels_cover_the_range_in_the_merchants_zone() {
    use super::request::TimeBucket;
    let p = plan(json!({"site_id": "m_1", "metrics": ["visitors"], "date_range": "7d", "dimensions": ["time"]})).unwrap();
    let days = super::dates::time_labels(p.tz, p.from, p.to, TimeBucket::Day);
    assert_eq!(days.len(), 7);
    assert_eq!(
        (days[0].as_str(), days[6].as_str()),
        ("2026-03-09", "2026-03-15")
    );
    let weeks = super::dates::time_labels(p.tz, p.from, p.to, TimeBucket::Week);
    assert_eq!(weeks, vec!["2026-03-09"]);
    // The day summer time starts in Berlin has 23 hours.
    let (f, t) = date_range(
        &json!(["2026-03-29", "2026-03-29"]),
        Tz::Europe__Berlin,
        now(),
    )
    .unwrap();
    let hours = super::dates::time_labels(Tz::Europe__Berlin, f, t, TimeBucket::Hour);
    assert_eq!(hours.len(), 23);
    assert!(!hours.iter().any(|h| h.ends_with(" 02:00:00")), "{hours:?}");
}

#[test]
fn results_merge_sources_sort_and_compute_conversion_rates() {
    let p = plan(json!({"site_id": "m_1", "metrics": ["visitors", "visits", "bounce_rate"], "date_range": "7d", "dimensions": ["time:day"]})).unwrap();
    let rows = vec![
        (
            SourceKind::Rollups,
            vec![
                json!({"d0": "2026-03-11", "visitors": 1, "events": 1, "pageviews": 1}),
                json!({"d0": "2026-03-10", "visitors": 3, "events": 9, "pageviews": 7}),
            ],
        ),
        (
            SourceKind::Sessions,
            vec![json!({"d0": "2026-03-10", "visits": 4, "bounce_rate": 50.0, "visitors": 99})],
        ),
    ];
    let out = p.results(&rows).unwrap().results;
    assert_eq!(
        out[0],
        json!({"metrics": [3, 4, 50.0], "dimensions": ["2026-03-10"]})
    );
    assert_eq!(
        out[1],
        json!({"metrics": [1, 0, null], "dimensions": ["2026-03-11"]})
    );

    let p = plan(json!({"site_id": "m_1", "metrics": ["visitors", "conversion_rate"], "date_range": "7d", "dimensions": ["event:goal"]})).unwrap();
    let rows = vec![
        (
            SourceKind::Rollups,
            vec![
                json!({"d0": "Signup", "visitors": 10}),
                json!({"d0": "Purchase", "visitors": 30}),
            ],
        ),
        (SourceKind::Totals, vec![json!({"total_visitors": 200})]),
    ];
    let out = p.results(&rows).unwrap().results;
    assert_eq!(
        out[0],
        json!({"metrics": [30, 15.0], "dimensions": ["Purchase"]})
    );
    assert_eq!(
        out[1],
        json!({"metrics": [10, 5.0], "dimensions": ["Signup"]})
    );

    // Revenue: one currency is named in meta; several without event:currency are refused.
    let p = plan(json!({"site_id": "m_1", "metrics": ["total_revenue", "average_revenue"], "date_range": "7d",
            "include": {"total_rows": true}})).unwrap();
    let eur = |orders: i64, micros: i64, c: &str| json!({"currency": c, "orders": orders, "revenue_micros": micros});
    let a = p
        .results(&[(SourceKind::Revenue, vec![eur(4, 100_005_000, "EUR")])])
        .unwrap();
    assert_eq!(a.results[0]["metrics"], json!([100.01, 25.0]));
    assert_eq!(
        (a.meta["currency"].clone(), a.meta["total_rows"].clone()),
        (json!("EUR"), json!(1))
    );
    let e = p
        .results(&[(
            SourceKind::Revenue,
            vec![eur(1, 1, "EUR"), eur(1, 1, "USD")],
        )])
        .unwrap_err();
    assert!(e.message.contains("EUR, USD"), "{e}");
    let empty = p.results(&[(SourceKind::Revenue, vec![])]).unwrap();
    assert_eq!(empty.results[0]["metrics"], json!([0.0, null]));
}
