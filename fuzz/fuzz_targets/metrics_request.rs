//! Metrics-API requests, structure-aware: the bytes are a small program that builds a filter
//! tree (leaves, `not`, `and`/`or` of the last few) and picks metrics, dimensions and dates,
//! so deep nesting and long chains are reached at once. Every request must either be refused
//! with a field-named error or plan into expressions of bounded depth (long chains become
//! balanced trees), and never panic.
#![no_main]
use beacon_query::metrics::{logical, QueryRequest};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

const DIMS: &[&str] = &["event:page", "visit:source", "visit:country", "event:goal", "event:props:plan", "visit:entry_page", "time:hour", "nope"];
const METRICS: &[&str] = &["visitors", "pageviews", "events", "visits", "bounce_rate", "conversion_rate", "x"];

fuzz_target!(|data: &[u8]| {
    let mut stack: Vec<Value> = Vec::new();
    let mut metrics = vec![];
    let mut dims = vec![];
    let mut it = data.iter().copied();
    while let Some(op) = it.next() {
        let arg = it.next().unwrap_or(0) as usize;
        match op % 8 {
            0 => {
                let op = ["is", "is_not", "contains"][arg % 3];
                let dim = DIMS[arg % DIMS.len()];
                let values: Vec<String> = (0..=(arg % 5)).map(|i| format!("/v{i}'\\\"")).collect();
                stack.push(json!([op, dim, values]));
            }
            1 => if let Some(f) = stack.pop() { stack.push(json!(["not", f])) },
            2 | 3 => {
                let n = (arg % 16).max(1).min(stack.len());
                if n > 0 {
                    let subs = stack.split_off(stack.len() - n);
                    stack.push(json!([if op % 8 == 2 { "and" } else { "or" }, subs]));
                }
            }
            4 => if let Some(f) = stack.last().cloned() { for _ in 0..(arg % 64) { stack.push(f.clone()) } },
            5 => metrics.push(METRICS[arg % METRICS.len()]),
            6 => dims.push(DIMS[arg % DIMS.len()]),
            _ => stack.push(json!(arg)),
        }
        if stack.len() > 5000 { break; }
    }
    if metrics.is_empty() { metrics.push("visitors"); }
    let request = json!({"site_id": "m_1", "metrics": metrics, "date_range": "30d",
                         "dimensions": dims, "filters": stack});
    let Ok(req) = serde_json::from_value::<QueryRequest>(request) else { return };
    let now = chrono::DateTime::from_timestamp(1_795_673_360, 0).unwrap_or_default();
    if let Ok(plan) = req.plan("m_1", chrono_tz::Tz::UTC, now) {
        let _ = plan.sources();
        if let Some(e) = logical::events_predicate(&plan) {
            let d = logical::depth(&e);
            assert!(d <= 64, "a valid request planned into a predicate {d} deep");
        }
    }
});
