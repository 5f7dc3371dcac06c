//! Pipeline benchmark on real parts: nats-server, a `beacon edge` process, a `beacon ingest`
//! process, the Rust SDK in this process. Prints a Markdown report.
//!
//!     cargo bench -p beacon --bench pipeline            # default 300,000 events
//!     BEACON_BENCH_EVENTS=1000000 cargo bench -p beacon --bench pipeline
//!
//! Figures are reported with an in-run baseline (the same envelopes published straight to
//! JetStream by this process), because the machines are shared and noisy.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use beacon_proto::envelope::ENVELOPE_VERSION;
use beacon_proto::{Envelope, Event};
use beacon_warehouse::{TableKind, Warehouse};
use common::{cpu_seconds, Cluster};

fn padded_events(n: usize, seed: u64) -> Vec<Event> {
    let now = beacon_edge::now_ms();
    let mut events =
        beacon::demo::generate(seed, "bench.example", n, now - 3_600_000, 3_600_000, 20_000);
    // Bring every event to ~300 bytes of JSON, the size the figures are quoted for.
    for e in &mut events {
        let len = serde_json::to_vec(&*e).map(|v| v.len()).unwrap_or(300);
        // `"pad":""` adds 8 bytes (9 with the comma) before the padding itself.
        let pad = 300usize.saturating_sub(len + 9);
        if pad > 0 {
            e.properties.insert("pad".into(), "x".repeat(pad));
        }
    }
    events
}

struct Phase {
    name: &'static str,
    events: usize,
    seconds: f64,
    cpu: Vec<(&'static str, f64)>,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }
}

async fn send_through_edge(
    cluster: &Cluster,
    key: &str,
    events: &[Event],
    edge_pid: u32,
    name: &'static str,
) -> Phase {
    let nats_pid = cluster.nats.pid();
    let connections = 4;
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(Arc::new(cluster.client(key).await.expect("connect")));
    }
    let (edge0, nats0) = (cpu_seconds(edge_pid), cpu_seconds(nats_pid));
    let seconds = common::send_split(&clients, events).await;
    Phase {
        name,
        events: events.len(),
        seconds,
        cpu: vec![
            ("edge", cpu_seconds(edge_pid) - edge0),
            ("nats-server", cpu_seconds(nats_pid) - nats0),
        ],
    }
}

/// The in-run baseline: the same kind of envelopes published straight to JetStream
/// (pipelined, every ack awaited), i.e. the bus without the edge.
async fn publish_direct(cluster: &Cluster, events: &[Event]) -> Phase {
    let nats_pid = cluster.nats.pid();
    let js = jetstream::new(async_nats::connect(cluster.nats.url()).await.expect("nats"));
    let nats0 = cpu_seconds(nats_pid);
    let started = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for (i, chunk) in events.chunks(500).enumerate() {
        let env = Envelope {
            v: ENVELOPE_VERSION,
            batch_id: format!("bench-direct:{i}"),
            merchant_id: "m_direct".into(),
            edge_id: "bench".into(),
            received_at: beacon_edge::now_ms(),
            pipeline: None,
            raw: chunk.to_vec(),
            processed: None,
            canary: None,
            failures: Vec::new(),
            shares: Vec::new(),
        };
        let mut h = async_nats::HeaderMap::new();
        h.insert(async_nats::header::NATS_MESSAGE_ID, env.batch_id.as_str());
        let ack = js
            .publish_with_headers(
                beacon_proto::bus::events_subject("m_direct"),
                h,
                env.to_json().into(),
            )
            .await
            .expect("publish");
        pending.push_back(ack);
        if pending.len() >= 32 {
            pending.pop_front().expect("ack").await.expect("acked");
        }
    }
    for ack in pending {
        ack.await.expect("acked");
    }
    Phase {
        name: "baseline: envelopes published straight to JetStream (no edge)",
        events: events.len(),
        seconds: started.elapsed().as_secs_f64(),
        cpu: vec![("nats-server", cpu_seconds(nats_pid) - nats0)],
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("BEACON_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let mut cluster = Cluster::start(false);
    // Ingest would compete for the 2 cores during the edge phases: measure it separately.
    cluster.ingest.as_mut().expect("ingest").kill_hard();
    let edge_pid = cluster.edge.as_ref().expect("edge").child.id();

    let (_, plain_key) = cluster.merchant("bench-plain");
    let (with_plugin, plugin_key) = cluster.merchant("bench-utm");
    cluster.attach(&with_plugin, "beacon_plugin_utm", "");

    let events = padded_events(n, 1);
    let avg_bytes = events
        .iter()
        .map(|e| serde_json::to_vec(e).map(|v| v.len()).unwrap_or(0))
        .sum::<usize>()
        / n;
    // Warm up connections, JIT-free but caches and allocator.
    let _ = send_through_edge(
        &cluster,
        &plain_key,
        &events[..n.min(20_000)],
        edge_pid,
        "warm-up",
    )
    .await;

    let baseline = publish_direct(&cluster, &events).await;
    let plain = send_through_edge(
        &cluster,
        &plain_key,
        &events,
        edge_pid,
        "SDK -> edge -> JetStream, ack after durable, no plugin",
    )
    .await;
    let plugin = send_through_edge(
        &cluster,
        &plugin_key,
        &padded_events(n, 2),
        edge_pid,
        "SDK -> edge -> JetStream, ack after durable, UTM plugin",
    )
    .await;

    // Ingest: everything published so far, from a cold start of the ingest process.
    let wh = Warehouse::open(cluster.data_dir())
        .await
        .expect("warehouse");
    let js = jetstream::new(async_nats::connect(cluster.nats.url()).await.expect("nats"));
    let mut stream = js
        .get_stream(beacon_proto::bus::EVENTS_STREAM)
        .await
        .expect("stream");
    let last = stream.info().await.expect("info").state.last_sequence;
    let rows_total = 20_000.min(n) + 3 * n; // warm-up + direct + plain + plugin
    cluster.start_ingest_with(&["--ingest-max-batch", "1000", "--ingest-max-wait-ms", "1000"]);
    let ingest_pid = cluster.ingest.as_ref().expect("ingest").child.id();
    let started = Instant::now();
    let ingest0 = cpu_seconds(ingest_pid);
    loop {
        if wh.committed_seq(TableKind::RawEvents).await.unwrap_or(0) >= last
            && wh.committed_seq(TableKind::Events).await.unwrap_or(0) >= last
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "ingest did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ingest = Phase {
        name: "ingest: JetStream -> Iceberg raw_events + events (rows/s counts both tables)",
        events: rows_total * 2,
        seconds: started.elapsed().as_secs_f64(),
        cpu: vec![("ingest", cpu_seconds(ingest_pid) - ingest0)],
    };

    // Freshness: one event, acknowledged, until a query sees it.
    let client = cluster.client(&plain_key).await.expect("connect");
    let mut lat = Vec::new();
    for i in 0..7 {
        let mut e = padded_events(1, 100 + i).remove(0);
        e.event_id = format!("latency-{i}");
        let t = Instant::now();
        client.send(std::slice::from_ref(&e)).await.expect("send");
        let acked = t.elapsed();
        loop {
            let q = format!("SELECT count(*) FROM raw_events WHERE event_id = 'latency-{i}'");
            let b = wh.sql(&q).await.expect("sql");
            let n = b
                .first()
                .map(|b| {
                    arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(b.column(0))
                        .value(0)
                })
                .unwrap_or(0);
            if n == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        lat.push((
            acked.as_secs_f64() * 1000.0,
            t.elapsed().as_secs_f64() * 1000.0,
        ));
    }
    lat.sort_by(|a, b| a.1.total_cmp(&b.1));

    println!("\n## Pipeline benchmark ({n} events of ~{avg_bytes} B JSON, batches of 500, 4 connections x 8 in flight)\n");
    println!("| phase | events | s | events/s | vs baseline | CPU us/event |");
    println!("|---|---:|---:|---:|---:|---|");
    for p in [&baseline, &plain, &plugin, &ingest] {
        let cpu: Vec<String> = p
            .cpu
            .iter()
            .map(|(who, s)| format!("{who} {:.2}", s * 1e6 / p.events as f64))
            .collect();
        println!(
            "| {} | {} | {:.2} | {:.0} | {:.2} | {} |",
            p.name,
            p.events,
            p.seconds,
            p.rate(),
            p.rate() / baseline.rate(),
            cpu.join(", ")
        );
    }
    println!(
        "\nSend -> visible in SQL (single event, ingest max wait 1000 ms; ack ms / visible ms):"
    );
    for (a, v) in &lat {
        println!("- ack {a:.1} ms, visible {v:.0} ms");
    }
    println!("median visible: {:.0} ms", lat[lat.len() / 2].1);
    if std::env::var_os("BEACON_BENCH_VERBOSE").is_some() {
        println!("\ningest log:\n{}", cluster.log("ingest"));
    }
}
