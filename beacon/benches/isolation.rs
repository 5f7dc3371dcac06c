//! Merchant isolation under a hostile plugin, on real parts (nats-server, a `beacon edge`
//! process, the SDK here): a victim merchant's request latency (batches through the UTM
//! plugin, acknowledged once durable) measured alone, then while another merchant floods the
//! same edge with batches whose plugin loops until its CPU budget is gone, or allocates until
//! its memory cap. Prints a Markdown report.
//!
//!     cargo bench -p beacon --bench isolation

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use beacon_proto::Event;
use common::Cluster;

const VICTIM_BATCHES: usize = 400;
const BATCH: usize = 100;

fn events(merchant_seed: u64, n: usize) -> Vec<Event> {
    let now = beacon_edge::now_ms();
    beacon::demo::generate(
        merchant_seed,
        "iso.example",
        n,
        now - 3_600_000,
        3_600_000,
        2_000,
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The victim's batches one at a time; returns each round trip.
async fn victim_run(client: &beacon_sdk::Client, events: &[Event]) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(VICTIM_BATCHES);
    for batch in events.chunks(BATCH).take(VICTIM_BATCHES) {
        let t = Instant::now();
        let r = client.send(batch).await.expect("victim batch");
        assert!(r.plugin_error.is_none(), "{:?}", r.plugin_error);
        lat.push(t.elapsed());
    }
    lat.sort();
    lat
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut cluster = Cluster::start(false);
    // Only the edge is under test; ingest would add its own CPU to the 2 cores.
    cluster.ingest.as_mut().expect("ingest").kill_hard();
    let (victim, victim_key) = cluster.merchant("victim");
    cluster.attach(&victim, "beacon_plugin_utm", "");
    let (attacker, attacker_key) = cluster.merchant("attacker");
    let victim_events = events(1, VICTIM_BATCHES * BATCH);
    let victim_client = cluster.client(&victim_key).await.expect("victim client");
    // Warm-up.
    let _ = victim_run(&victim_client, &victim_events[..50 * BATCH]).await;

    println!("\n## Isolation benchmark (victim: {VICTIM_BATCHES} batches of {BATCH} events through UTM, one in flight)\n");
    println!("| phase | victim p50 | victim p99 | p99 / alone | p99 / normal neighbour | neighbour batches (failed) |");
    println!("|---|---:|---:|---:|---:|---:|");
    let alone = victim_run(&victim_client, &victim_events).await;
    let (p50, alone99) = (percentile(&alone, 0.5), percentile(&alone, 0.99));
    println!(
        "| alone | {:.2} ms | {:.2} ms | 1.00x | - | - |",
        p50.as_secs_f64() * 1e3,
        alone99.as_secs_f64() * 1e3
    );
    let mut normal99 = None;
    // `pass` is a well-behaved neighbour with the same traffic: the "normal" to compare with.
    for mode in ["pass", "loop", "alloc", "trap", "bigout"] {
        cluster.attach(&attacker, "beacon_plugin_hostile", mode);
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new(AtomicUsize::new(0));
        let mut attackers = Vec::new();
        // 2 connections x 2 batches in flight, for as long as the victim runs: the attacker's
        // traffic is ordinary, its plugin is not. (Request floods are a rate-limit matter.)
        for c in 0..2 {
            let client = Arc::new(
                cluster
                    .client(&attacker_key)
                    .await
                    .expect("attacker client"),
            );
            for k in 0..2 {
                let (client, stop, failed, sent) =
                    (client.clone(), stop.clone(), failed.clone(), sent.clone());
                let batch = events(100 + c * 2 + k, BATCH);
                attackers.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(r) = client.send(&batch).await {
                            sent.fetch_add(1, Ordering::Relaxed);
                            if r.plugin_error.is_some() {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let under = victim_run(&victim_client, &victim_events).await;
        stop.store(true, Ordering::Relaxed);
        for a in attackers {
            let _ = a.await;
        }
        let (a50, a99) = (percentile(&under, 0.5), percentile(&under, 0.99));
        let normal = *normal99.get_or_insert(a99);
        println!(
            "| neighbour's plugin: {mode} | {:.2} ms | {:.2} ms | {:.2}x | {:.2}x | {} ({}) |",
            a50.as_secs_f64() * 1e3,
            a99.as_secs_f64() * 1e3,
            a99.as_secs_f64() / alone99.as_secs_f64(),
            a99.as_secs_f64() / normal.as_secs_f64(),
            sent.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed)
        );
    }
}
