//! Re-processing throughput against ingest's, in the same run on the same data: realistic
//! multi-merchant traffic is ingested by core-ingest's writer (envelope JSON -> `raw_events`
//! and `events`, the baseline), then every merchant's history is re-processed with a
//! one-plugin pipeline (utm) by `beacon_reprocess` (read the pinned raw snapshot in lineage
//! order, re-run each batch in the Wasm sandbox on all cores, convert, write, one replace
//! commit per table, rollups rebuilt), and finally one merchant-day of the largest merchant.
//!
//!     cargo bench -p beacon --bench reprocess                     # 400k events, 20 merchants
//!     BEACON_BENCH_EVENTS=1000000 cargo bench -p beacon --bench reprocess
//!
//! Needs nats-server on the PATH (the pipeline versions and plugins live in NATS) and the
//! example plugins built (scripts/setup.sh). Prints a Markdown report.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use beacon::traffic::{self, TrafficConfig};
use beacon_control::pipelines::{Activation, PluginSpec};
use beacon_control::Control;
use beacon_reprocess::{Jobs, Request, Scope};
use beacon_warehouse::tables::{snapshot_property_u64, SEQ_PROPERTY};
use beacon_warehouse::{rollup, TableKind, Warehouse};
use common::{env_usize, plugin_path};

const DAY_MS: i64 = 86_400_000;

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let events_n = env_usize("BEACON_BENCH_EVENTS", 400_000);
    let merchants = env_usize("BEACON_BENCH_MERCHANTS", 20);
    let per_envelope = env_usize("BEACON_BENCH_ENVELOPE", 500);
    let per_commit = env_usize("BEACON_BENCH_COMMIT", 100);
    let start_ms = 1_793_577_600_000;
    let sites = traffic::sites(merchants, |i| format!("rp-{i}"));
    let config = TrafficConfig {
        seed: 9,
        events: events_n,
        start_ms,
        days: 2,
        zipf_s: 1.0,
        late_share: 0.0,
    };
    let events = traffic::events_in_time_order(&config, &sites);
    let total = events.len();
    let mut per_merchant: HashMap<String, Vec<i64>> = HashMap::new();
    for e in &events {
        per_merchant
            .entry(e.merchant_id.clone())
            .or_default()
            .push(e.ts);
    }
    let (largest, largest_ts) = per_merchant
        .into_iter()
        .max_by_key(|(_, ts)| ts.len())
        .expect("merchants");
    let envelopes = traffic::envelopes(events, per_envelope);
    let mut ids: Vec<String> = envelopes.iter().map(|e| e.merchant_id.clone()).collect();
    ids.sort();
    ids.dedup();
    let payloads: Vec<Vec<u8>> = envelopes.iter().map(|e| e.to_json()).collect();

    // Baseline: core-ingest writing the same events.
    let dir = tempfile::tempdir().expect("tempdir");
    let wh = Arc::new(Warehouse::open(dir.path()).await.expect("warehouse"));
    let mut writer = beacon_ingest::Writer::open(wh.clone(), beacon_proto::bus::Partition::WHOLE)
        .await
        .expect("writer");
    let started = Instant::now();
    for (c, chunk) in payloads.chunks(per_commit).enumerate() {
        let received = chunk
            .iter()
            .enumerate()
            .map(|(i, p)| beacon_ingest::decode((c * per_commit + i + 1) as u64, p))
            .collect();
        writer.commit(received).await.expect("commit");
    }
    let ingest_s = started.elapsed().as_secs_f64();
    rollup::run_once(&wh).await.expect("rollups");

    // The pipeline: utm, active for every merchant.
    let nats = beacon::nats::NatsServer::start(&dir.path().join("nats")).expect("nats-server");
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("nats"));
    let runtime = Arc::new(
        beacon_plugins::Runtime::new(beacon_plugins::SandboxLimits::default(), None)
            .expect("runtime"),
    );
    let control = Control::open(js.clone(), runtime).await.expect("control");
    let bytes = std::fs::read(plugin_path("beacon_plugin_utm")).expect("utm plugin");
    control
        .upload("utm", bytes, "", None, "bench")
        .await
        .expect("upload");
    let registry = js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: beacon_proto::bus::MERCHANTS_BUCKET.into(),
            ..Default::default()
        })
        .await
        .expect("merchants bucket");
    for m in &ids {
        registry
            .put(format!("m.{m}"), "{}".into())
            .await
            .expect("merchant");
        let activation = Activation {
            plugins: vec![PluginSpec {
                plugin: "utm".into(),
                config: serde_json::Value::Null,
            }],
            ..Default::default()
        };
        control
            .activate(m, &activation, "bench")
            .await
            .expect("activate");
    }
    let jobs = Jobs::open(&js).await.expect("jobs");
    let floor = snapshot_property_u64(
        &wh.table(TableKind::RawEvents).await.expect("raw"),
        SEQ_PROPERTY,
    );
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let request = |merchants: Vec<String>, from_ms: i64, to_ms: i64| Request {
        scope: Scope {
            merchants,
            from_ms,
            to_ms,
        },
        version: Some(1),
        dry_run: false,
        who: "bench".into(),
        reason: "bench".into(),
        limits: beacon_proto::Limits::default(),
        workers,
        job_id: None,
    };

    let all = request(Vec::new(), start_ms - DAY_MS, start_ms + 3 * DAY_MS);
    let started = Instant::now();
    let report = beacon_reprocess::reprocess_at(&wh, &control, &jobs, &all, floor, &|_, _| {})
        .await
        .expect("reprocess all");
    let all_s = started.elapsed().as_secs_f64();
    assert_eq!(report.raw_rows as usize, total, "every raw event re-run");

    // One merchant-day of the largest merchant: its busiest UTC day.
    let mut per_day: HashMap<i64, usize> = HashMap::new();
    for ts in &largest_ts {
        *per_day.entry(ts.div_euclid(DAY_MS)).or_default() += 1;
    }
    let (day, _) = per_day.into_iter().max_by_key(|(_, n)| *n).expect("a day");
    let one = request(vec![largest.clone()], day * DAY_MS, (day + 1) * DAY_MS);
    let started = Instant::now();
    let day_report = beacon_reprocess::reprocess_at(&wh, &control, &jobs, &one, floor, &|_, _| {})
        .await
        .expect("reprocess one merchant-day");
    let day_s = started.elapsed().as_secs_f64();
    // (By receive time: a batch belongs to the day its first event arrived.)
    let day_events = day_report.raw_rows as usize;

    let ingest_rate = total as f64 / ingest_s;
    let all_rate = report.raw_rows as f64 / all_s;
    println!(
        "\n{total} events of {merchants} Zipf-sized merchants over two days, envelopes of {per_envelope}, {workers} workers.\n"
    );
    println!("| run | seconds | events/s | vs ingest |");
    println!("|---|---|---|---|");
    println!("| core-ingest writer (JSON envelopes -> raw_events + events) | {ingest_s:.2} | {ingest_rate:.0} | 1.00x |");
    println!(
        "| re-process every merchant with utm (read raw, re-run in Wasm, write events, replace, rebuild rollups) | {all_s:.2} | {all_rate:.0} | **{:.2}x** |",
        all_rate / ingest_rate
    );
    println!(
        "| one merchant-day of the largest merchant ({day_events} events) | {day_s:.2} | {:.0} | {:.2}x |",
        day_events as f64 / day_s,
        day_events as f64 / day_s / ingest_rate
    );
    println!(
        "\nAll-merchant job: {} batches, events rows {} -> {}, rollup rows rebuilt {}.",
        report.batches, report.events_before, report.events_after, report.rollup_rows_rebuilt
    );
    println!(
        "Its phases (s): {}; one merchant-day's: {}.",
        serde_json::to_string(&report.phases).unwrap_or_default(),
        serde_json::to_string(&day_report.phases).unwrap_or_default()
    );
}
