//! Freshness: how long after its acknowledgement an event shows in the metrics API, under
//! steady load from another merchant. Real parts: nats-server, edge, ingest, the rollup role
//! (every 1 s here; `beacon up` defaults to 30 s), the metrics API over HTTP.
//!
//!     cargo bench -p beacon --bench freshness
//!     BEACON_BENCH_PROBES=100 BEACON_BENCH_LOAD_EPS=10000 cargo bench -p beacon --bench freshness
//!
//! One probe event at a time (a new visitor each) is sent and acknowledged; then the API is
//! polled every 20 ms until it counts it: realtime (`/api/v2/realtime`, read from `events`)
//! and a daily total (`/api/v2/query`, answered from the rollups). Prints a Markdown report.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env_usize as env, http, pct, Cluster};
use serde_json::{json, Value};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let probes = env("BEACON_BENCH_PROBES", 40);
    let load_eps = env("BEACON_BENCH_LOAD_EPS", 5_000);
    let cluster = Cluster::start(true);
    let (_, load_key) = cluster.merchant("load");
    let (probe_id, probe_key) = cluster.merchant("probe");
    let token = cluster
        .cli(&["merchant", "read-token", "--merchant", &probe_id])
        .trim()
        .to_string();
    let (_api, addr) = cluster.spawn_api();

    // Steady background load: batches of 500 at `load_eps`.
    let stop = Arc::new(AtomicBool::new(false));
    let loaded = Arc::new(AtomicU64::new(0));
    let load = {
        let client = cluster.client(&load_key).await.expect("client");
        let (stop, loaded) = (stop.clone(), loaded.clone());
        tokio::spawn(async move {
            let every = Duration::from_secs_f64(500.0 / load_eps.max(1) as f64);
            let mut seed = 1_000;
            let mut tick = tokio::time::interval(every);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                seed += 1;
                let now = beacon_edge::now_ms();
                let batch =
                    beacon::demo::generate(seed, "load.example", 500, now - 60_000, 60_000, 5_000);
                if client.send(&batch).await.is_ok() {
                    loaded.fetch_add(500, Ordering::Relaxed);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;

    let client = cluster.client(&probe_key).await.expect("client");
    let get = |path: String| {
        let (addr, token) = (addr.clone(), token.clone());
        async move {
            tokio::task::spawn_blocking(move || http(&addr, "GET", &path, Some(&token), b""))
                .await
                .expect("http")
        }
    };
    let post = |body: Value| {
        let (addr, token) = (addr.clone(), token.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                http(
                    &addr,
                    "POST",
                    "/api/v2/query",
                    Some(&token),
                    body.to_string().as_bytes(),
                )
            })
            .await
            .expect("http")
        }
    };
    let mut realtime = Vec::new();
    let mut rolled = Vec::new();
    let started = Instant::now();
    for i in 1..=probes {
        let mut e = beacon::demo::generate(7_000 + i as u64, "probe.example", 1, 0, 1, 1).remove(0);
        e.event_id = format!("probe-{i}");
        e.visitor_id = Some(format!("probe-visitor-{i}"));
        e.ts = beacon_edge::now_ms();
        client
            .send(std::slice::from_ref(&e))
            .await
            .expect("probe sent");
        let acked = Instant::now();
        let mut seen_realtime = None;
        let mut seen_rollup = None;
        while seen_realtime.is_none() || seen_rollup.is_none() {
            if seen_realtime.is_none() {
                let (_, body) = get(format!("/api/v2/realtime?site_id={probe_id}")).await;
                let v: Value = serde_json::from_str(&body).unwrap_or_default();
                if v["events"].as_u64() >= Some(i as u64) {
                    seen_realtime = Some(acked.elapsed());
                }
            }
            if seen_rollup.is_none() {
                let (_, body) =
                    post(json!({"site_id": probe_id, "metrics": ["events"], "date_range": "7d"}))
                        .await;
                let v: Value = serde_json::from_str(&body).unwrap_or_default();
                if v["results"][0]["metrics"][0].as_u64() >= Some(i as u64) {
                    seen_rollup = Some(acked.elapsed());
                }
            }
            assert!(
                acked.elapsed() < Duration::from_secs(120),
                "probe {i} never showed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        realtime.push(seen_realtime.unwrap_or_default().as_secs_f64() * 1000.0);
        rolled.push(seen_rollup.unwrap_or_default().as_secs_f64() * 1000.0);
    }
    let secs = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    realtime.sort_by(f64::total_cmp);
    rolled.sort_by(f64::total_cmp);
    let background = loaded.load(Ordering::Relaxed) as f64 / (secs + 3.0);
    println!(
        "\n## Freshness: acknowledgement -> metrics API ({probes} probes, background load {background:.0} events/s acknowledged)\n"
    );
    println!("| read | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|");
    for (name, v) in [
        ("realtime (`/api/v2/realtime`, from `events`)", &realtime),
        (
            "daily total (`/api/v2/query`, from the rollups, run every 1 s)",
            &rolled,
        ),
    ] {
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} |",
            pct(v, 0.5),
            pct(v, 0.99),
            v[v.len() - 1]
        );
    }
}
