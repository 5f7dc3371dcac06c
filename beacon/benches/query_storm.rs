//! Query isolation: the edge's latency with a storm of hostile queries running in the same
//! `beacon up` process, against the same edge load without the storm, in one run.
//!
//!     cargo bench -p beacon --bench query_storm
//!     BEACON_BENCH_SECS=20 BEACON_BENCH_STORM=6 cargo bench -p beacon --bench query_storm
//!
//! Edge load: one SDK connection sending acknowledged (durable) batches of 20 events at a
//! fixed rate, plus `GET /healthz` on the HTTP collector port; both latencies recorded.
//! Storm: `BEACON_BENCH_STORM` clients (default 4) looping over the queries a hostile
//! merchant would send over SQL (CPU-bound scans, a memory hog) and the metrics API (a
//! 150-term filter over a year of events). The process runs queries on its own runtime at a
//! lower CPU priority; this measures what that buys the edge. Prints a Markdown report.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env_usize as env, http, pct, psql, Up};
use serde_json::json;

struct Phase {
    acks_ms: Vec<f64>,
    health_ms: Vec<f64>,
    queries: u64,
    refused: u64,
}

/// Runs the edge load for `secs` (with the storm when `storm > 0`).
async fn phase(up: &Up, m: &common::Merchant, storm: usize, secs: u64, seed: u64) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let queries = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut stormers = Vec::new();
    for i in 0..storm {
        let (stop, queries, refused) = (stop.clone(), queries.clone(), refused.clone());
        let (port, api, m) = (up.sql_port(), up.api(), m.clone());
        stormers.push(std::thread::spawn(move || {
            let leaves: Vec<_> = (0..150)
                .map(|j| json!(["is", "event:page", [format!("/p/{j}")]]))
                .collect();
            let api_query = json!({"site_id": m.id, "metrics": ["visitors", "pageviews"],
                "date_range": "12mo", "dimensions": ["event:page", "visit:source", "time:day"],
                "filters": [["or", leaves]]})
            .to_string();
            let sql = [
                "SELECT sum(value * 2) FROM generate_series(1, 3000000000)",
                "SELECT count(DISTINCT value) FROM generate_series(1, 4000000000)",
                "SELECT path, count(DISTINCT visitor_id) FROM events GROUP BY path ORDER BY 2 DESC",
            ];
            let mut k = i;
            while !stop.load(Ordering::Relaxed) {
                let ok = if k % 4 == 3 {
                    let (s, _) = http(
                        &api,
                        "POST",
                        "/api/v2/query",
                        Some(&m.token),
                        api_query.as_bytes(),
                    );
                    s == 200
                } else {
                    psql(&port, &m.id, &m.token, sql[k % 3]).is_ok()
                };
                queries.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                k += 1;
            }
        }));
    }
    let ca = std::fs::read(up.endpoints.edge_ca_cert.clone().expect("ca")).expect("ca");
    let addr = up
        .endpoints
        .edge_quic
        .clone()
        .expect("edge")
        .parse()
        .expect("addr");
    let client =
        beacon_sdk::Client::connect(beacon_sdk::ClientConfig::new(addr, ca, m.write_key.clone()))
            .await
            .expect("connect");
    let health = {
        let (stop, edge) = (stop.clone(), up.edge_http());
        std::thread::spawn(move || {
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let (s, _) = http(&edge, "GET", "/healthz", None, b"");
                assert_eq!(s, 200);
                out.push(t.elapsed().as_secs_f64() * 1e3);
                std::thread::sleep(Duration::from_millis(20));
            }
            out
        })
    };
    let mut acks = Vec::new();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        n += 1;
        let now = beacon_edge::now_ms();
        let batch = beacon::demo::generate(
            seed * 1_000_000 + n,
            "storm.example",
            20,
            now - 60_000,
            60_000,
            500,
        );
        let t = Instant::now();
        client.send(&batch).await.expect("ack");
        acks.push(t.elapsed().as_secs_f64() * 1e3);
    }
    stop.store(true, Ordering::Relaxed);
    let mut health_ms = health.join().expect("health");
    for s in stormers {
        s.join().expect("stormer");
    }
    acks.sort_by(f64::total_cmp);
    health_ms.sort_by(f64::total_cmp);
    Phase {
        acks_ms: acks,
        health_ms,
        queries: queries.load(Ordering::Relaxed),
        refused: refused.load(Ordering::Relaxed),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs = env("BEACON_BENCH_SECS", 15) as u64;
    let storm = env("BEACON_BENCH_STORM", 4);
    let up = Up::start(&["--query-timeout-ms", "5000"]);
    let m = up.merchant("storm", &[]);
    // Some data for the events queries to scan.
    let _ = phase(&up, &m, 0, 3, 1).await;

    let baseline = phase(&up, &m, 0, secs, 2).await;
    let stormed = phase(&up, &m, storm, secs, 3).await;
    let after = phase(&up, &m, 0, secs, 4).await;

    println!("\n## Query isolation: edge latency under a query storm (one `beacon up`)\n");
    println!("{secs} s per phase; edge load: acknowledged batches of 20 events every 10 ms over QUIC, `GET /healthz` every 20 ms; storm: {storm} clients looping hostile SQL and metrics-API queries.\n");
    println!("| phase | ack p50 ms | ack p99 ms | healthz p50 ms | healthz p99 ms | storm queries (refused or stopped) |");
    println!("|---|---|---|---|---|---|");
    for (name, p) in [
        ("no storm (baseline)", &baseline),
        ("query storm", &stormed),
        ("no storm (after)", &after),
    ] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {} ({}) |",
            pct(&p.acks_ms, 0.5),
            pct(&p.acks_ms, 0.99),
            pct(&p.health_ms, 0.5),
            pct(&p.health_ms, 0.99),
            p.queries,
            p.refused
        );
    }
    println!(
        "\nack p99 under the storm / baseline: **{:.2}x**; healthz p99: **{:.2}x**",
        pct(&stormed.acks_ms, 0.99) / pct(&baseline.acks_ms, 0.99),
        pct(&stormed.health_ms, 0.99) / pct(&baseline.health_ms, 0.99)
    );
}
