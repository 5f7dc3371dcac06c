//! Collector benchmark on one edge (real nats-server, a `beacon edge` process with the test
//! geo database; ingest stopped so it does not compete for the 2 cores). Prints a Markdown
//! report: events/s and edge CPU per event for
//!
//! - baseline: the bare QUIC frame loop (in this process: decodes RSocket frames and answers,
//!   nothing else), driven by the same SDK load;
//! - RSocket/QUIC batches through the edge, ack after durable, enrichment, no plugin;
//! - the same with a 2-plugin chain (UTM, PII);
//! - HTTP Snowplow tp2 batches (wrk, 50 events per POST), ack after durable, enrichment
//!   (UA parsing, cookieless id), 2-plugin chain;
//! - HTTP floor: wrk `GET /healthz` (the HTTP stack alone, no decoding, no publishing).
//!
//! Run:
//!
//!     cargo bench -p beacon --bench collectors          # 200,000 events per QUIC phase
//!     BEACON_BENCH_EVENTS=500000 BEACON_BENCH_SECS=20 cargo bench -p beacon --bench collectors
//!
//! Needs `wrk` (Debian package) for the HTTP phases; without it they are skipped.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use beacon_proto::wire::{self, Body, FrameReader};
use beacon_proto::Event;
use bytes::{Bytes, BytesMut};
use common::{cpu_seconds, Cluster};

struct Row {
    name: String,
    events: u64,
    seconds: f64,
    edge_cpu: Option<f64>,
    /// The nats-server's CPU over the same phase: what storing the envelopes costs.
    nats_cpu: Option<f64>,
    /// Bytes the events stream grew by (envelopes, headers, JetStream's framing).
    bus_bytes: Option<u64>,
}

/// The nats-server's pid, for its CPU per phase.
static NATS_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// The bus, for the bytes each phase stored.
static BUS: std::sync::OnceLock<async_nats::jetstream::Context> = std::sync::OnceLock::new();

/// Bytes in the events stream so far (0 before the bus is known).
async fn stream_bytes() -> u64 {
    let Some(js) = BUS.get() else { return 0 };
    match js.get_stream(beacon_proto::bus::EVENTS_STREAM).await {
        Ok(mut s) => s.info().await.map_or(0, |i| i.state.bytes),
        Err(_) => 0,
    }
}

/// CPU seconds of the nats-server so far (0 before it is known).
fn nats_cpu() -> f64 {
    NATS_PID.get().map_or(0.0, |&p| cpu_seconds(p))
}

impl Row {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }
}

/// The bare frame loop: SETUP, KEEPALIVE echo, and an empty acknowledgement per request.
async fn bare_server(dir: &std::path::Path) -> (std::net::SocketAddr, PathBuf, Arc<AtomicU64>) {
    let id = beacon_edge::tls::Identity::load_or_create(dir).expect("tls");
    let cfg = id
        .server_config(beacon_edge::quic::transport_config())
        .expect("server config");
    let ep = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).expect("endpoint");
    let addr = ep.local_addr().expect("addr");
    let frames = Arc::new(AtomicU64::new(0));
    let count = frames.clone();
    tokio::spawn(async move {
        while let Some(inc) = ep.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(conn) = inc.await else { return };
                let Ok((_s, mut recv)) = conn.accept_bi().await else {
                    return;
                };
                let Ok((mut send, _r)) = conn.open_bi().await else {
                    return;
                };
                let mut reader = FrameReader::new(wire::DEFAULT_MAX_FRAME_LEN);
                let ack = Bytes::from_static(br#"{"batch_id":"b","accepted":0,"rejected":[]}"#);
                while let Ok(Some(chunk)) = recv.read_chunk(64 * 1024, true).await {
                    reader.extend(&chunk.bytes);
                    let mut out = BytesMut::new();
                    while let Ok(Some(f)) = reader.next_frame() {
                        count.fetch_add(1, Ordering::Relaxed);
                        let id = f.get_stream_id();
                        match f.get_body() {
                            Body::Keepalive(_) => wire::encode(
                                &wire::frame::Keepalive::builder(0, 0).build(),
                                &mut out,
                            ),
                            Body::RequestResponse(_) => {
                                wire::encode(&wire::response_frame(id, ack.clone()), &mut out)
                            }
                            _ => {}
                        }
                    }
                    if !out.is_empty() && send.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, id.cert_path, frames)
}

async fn sdk_load(
    addr: std::net::SocketAddr,
    ca: Vec<u8>,
    key: &str,
    events: &[Event],
    edge_pid: Option<u32>,
    name: &str,
    encoding: wire::BatchEncoding,
) -> Row {
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut cfg = beacon_sdk::ClientConfig::new(addr, ca.clone(), key);
        cfg.request_timeout = Duration::from_secs(60);
        cfg.batch_encoding = encoding;
        clients.push(Arc::new(
            beacon_sdk::Client::connect(cfg).await.expect("connect"),
        ));
    }
    let cpu0 = edge_pid.map(cpu_seconds);
    let nats0 = nats_cpu();
    let bytes0 = stream_bytes().await;
    let seconds = common::send_split(&clients, events).await;
    Row {
        name: name.into(),
        events: events.len() as u64,
        seconds,
        edge_cpu: edge_pid.zip(cpu0).map(|(p, c)| cpu_seconds(p) - c),
        nats_cpu: edge_pid.map(|_| nats_cpu() - nats0),
        bus_bytes: match edge_pid {
            Some(_) => Some(stream_bytes().await - bytes0),
            None => None,
        },
    }
}

const WRK_TP2: &str = r#"
local B = 50
local ev = '{"e":"pv","url":"https://bench.example/p/%d?utm_source=news","page":"Page %d","refr":"https://www.google.com/","aid":"AID","eid":"%d-%d","dtm":"1795673352516","stm":"1795673352600","ua":"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36","co":"{\\"schema\\":\\"iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-1\\",\\"data\\":[{\\"schema\\":\\"iglu:com.acme/user/jsonschema/1-0-0\\",\\"data\\":{\\"tier\\":\\"gold\\",\\"email\\":\\"a@b.example\\"}}]}"}'
local threads = {}
local n = 0
function setup(thread)
  n = n + 1
  thread:set("tid", n)
  table.insert(threads, thread)
end
counter = 0
function request()
  counter = counter + 1
  local parts = {}
  for i = 1, B do parts[i] = string.format(ev, i, i, tid, counter * B + i) end
  local body = '{"schema":"iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4","data":[' .. table.concat(parts, ",") .. ']}'
  return wrk.format("POST", "/com.snowplowanalytics.snowplow/tp2", {["Content-Type"] = "application/json"}, body)
end
"#;

/// Prints wrk's totals as one JSON line for the bench to read.
const WRK_DONE: &str = r#"
function done(summary, latency, requests)
  io.write(string.format('RESULT {"requests":%d,"non2xx":%d,"errors":%d,"us":%d,"p99_us":%d}\n',
    summary.requests, summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.duration, latency:percentile(99)))
end
"#;

fn wrk(
    url: &str,
    script: String,
    secs: u64,
    per_request: u64,
    edge_pid: u32,
    name: &str,
) -> Option<Row> {
    let dir = tempfile::tempdir().ok()?;
    let path = dir.path().join("s.lua");
    std::fs::write(&path, script).ok()?;
    let cpu0 = cpu_seconds(edge_pid);
    let nats0 = nats_cpu();
    let out = Command::new("wrk")
        .args([
            "-t2",
            "-c32",
            &format!("-d{secs}s"),
            "--timeout",
            "30s",
            "-s",
        ])
        .arg(&path)
        .arg(url)
        .output()
        .ok()?;
    let cpu = cpu_seconds(edge_pid) - cpu0;
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text.lines().find_map(|l| l.strip_prefix("RESULT "))?;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let requests = v["requests"].as_u64()?;
    let bad = v["non2xx"].as_u64()? + v["errors"].as_u64()?;
    assert_eq!(bad, 0, "{name}: {bad} failed requests\n{text}");
    eprintln!(
        "{name}: p99 {} ms per request",
        v["p99_us"].as_u64()? / 1000
    );
    Some(Row {
        name: name.into(),
        events: requests * per_request,
        seconds: v["us"].as_u64()? as f64 / 1e6,
        edge_cpu: Some(cpu),
        nats_cpu: Some(nats_cpu() - nats0),
        bus_bytes: None,
    })
}

fn p99_ms(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get((v.len() * 99 / 100).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

/// Fairness: a victim merchant's acknowledged 10-event batches, one at a time, alone, then
/// while another merchant (rate-limited at 20k events/s) sends from 8 connections with
/// 500-event batches at exactly its limit, then while it floods at 100k events/s (5x its
/// limit). The first ratio is the target's (flood against alone); the second separates what
/// the excess costs the victim from what the neighbour's admitted load costs on shared cores.
/// The victim runs on its own thread and runtime, and the flooder sends pre-encoded bytes, so
/// the bench process's own work does not stand in for the edge's.
async fn flood_fairness(
    addr: std::net::SocketAddr,
    ca: &[u8],
    victim_key: &str,
    flooder_key: &str,
    events: &[Event],
) -> String {
    let connect = |key: &str| {
        let mut cfg = beacon_sdk::ClientConfig::new(addr, ca.to_vec(), key);
        cfg.request_timeout = Duration::from_secs(60);
        beacon_sdk::Client::connect(cfg)
    };
    // One probe per phase: the victim thread waits for `go`, measures, answers on `p99`.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (p99_tx, p99_rx) = std::sync::mpsc::channel::<f64>();
    let victim_cfg = {
        let mut cfg = beacon_sdk::ClientConfig::new(addr, ca.to_vec(), victim_key);
        cfg.request_timeout = Duration::from_secs(60);
        cfg
    };
    let probe_events: Vec<Event> = events[..1000.min(events.len())].to_vec();
    let victim = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let victim = beacon_sdk::Client::connect(victim_cfg)
                .await
                .expect("victim");
            while go_rx.recv().is_ok() {
                // Let the neighbour's senders reach their pace first.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let mut lat = Vec::with_capacity(2000);
                for i in 0..2000 {
                    let b = &probe_events[(i * 10) % (probe_events.len() - 10)..][..10];
                    let t = Instant::now();
                    victim.send(b).await.expect("victim batch");
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                if p99_tx.send(p99_ms(lat)).is_err() {
                    return;
                }
            }
        })
    });
    // (The wait leaves this worker thread to the neighbour's senders.)
    let probe = || {
        go_tx.send(()).expect("victim thread");
        tokio::task::block_in_place(|| p99_rx.recv().expect("victim p99"))
    };
    let alone = probe();
    let body = Bytes::from(
        serde_json::to_vec(&serde_json::json!({ "events": &events[..500] })).expect("json"),
    );
    let mut flooders = Vec::new();
    for _ in 0..8 {
        flooders.push(Arc::new(
            connect(flooder_key).await.expect("connect flooder"),
        ));
    }
    // 32 senders x one 500-event batch per `period`: 800 ms = 20k events/s (the limit),
    // 160 ms = 100k events/s.
    let neighbour = |period: Duration| {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (acked, limited) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut tasks = Vec::new();
        for (k, c) in flooders.iter().enumerate() {
            for j in 0..4 {
                // Staggered over the period, as independent senders would be (in step, the
                // 32 batches would land together once a period).
                let offset = period * (k * 4 + j) as u32 / 32;
                let (c, stop, acked, limited, body) = (
                    c.clone(),
                    stop.clone(),
                    acked.clone(),
                    limited.clone(),
                    body.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let mut tick =
                        tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        match c.request(body.clone()).await {
                            Ok(_) => acked.fetch_add(1, Ordering::Relaxed),
                            Err(_) => limited.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }));
            }
        }
        (stop, acked, limited, tasks)
    };
    let phase = |period: Duration| {
        let (stop, acked, limited, tasks) = neighbour(period);
        let p99 = probe();
        stop.store(true, Ordering::Relaxed);
        (p99, acked, limited, tasks)
    };
    let (at_limit, _, _, tasks) = phase(Duration::from_millis(800));
    for t in tasks {
        let _ = t.await;
    }
    // Let the limiter's bucket refill before the flood.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (during, acked, limited, tasks) = phase(Duration::from_millis(160));
    for t in tasks {
        let _ = t.await;
    }
    drop(go_tx);
    let _ = tokio::task::spawn_blocking(move || victim.join()).await;
    format!(
        "flood fairness (flooder offers 100k events/s against a 20k/s limit): victim p99 {alone:.1} ms alone, {at_limit:.1} ms beside a neighbour at its limit, {during:.1} ms during the flood (**{:.2}x** alone; {:.2}x the at-limit neighbour); flooder: {} batches acknowledged, {} refused",
        during / alone.max(0.001),
        during / at_limit.max(0.001),
        acked.load(Ordering::Relaxed),
        limited.load(Ordering::Relaxed)
    )
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Backpressure under a stalled bus: nats-server is stopped (SIGSTOP) while 16 connections
/// each try to keep 64 batches of 500 events in flight. The edge must stop reading rather
/// than buffer; its resident memory is sampled for 8 s.
async fn stalled_bus_flood(
    cluster: &Cluster,
    addr: std::net::SocketAddr,
    ca: &[u8],
    key: &str,
    events: &[Event],
    edge_pid: u32,
) -> String {
    let batch: Arc<Vec<Event>> = Arc::new(events[..500.min(events.len())].to_vec());
    let batch_bytes = serde_json::to_vec(&serde_json::json!({"events": &*batch}))
        .map(|v| v.len())
        .unwrap_or(0);
    let mut clients = Vec::new();
    for _ in 0..16 {
        let mut cfg = beacon_sdk::ClientConfig::new(addr, ca.to_vec(), key);
        cfg.request_timeout = Duration::from_secs(120);
        clients.push(Arc::new(
            beacon_sdk::Client::connect(cfg).await.expect("connect"),
        ));
    }
    let before = rss_kib(edge_pid);
    let nats = cluster.nats.pid();
    // SAFETY: signals to a child process we own.
    unsafe { libc::kill(nats as i32, libc::SIGSTOP) };
    let mut tasks = Vec::new();
    for c in &clients {
        for _ in 0..64 {
            let (c, b) = (c.clone(), batch.clone());
            tasks.push(tokio::spawn(async move {
                let _ = c.send(&b).await;
            }));
        }
    }
    let mut peak = before;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        peak = peak.max(rss_kib(edge_pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SAFETY: as above.
    unsafe { libc::kill(nats as i32, libc::SIGCONT) };
    for t in tasks {
        let _ = t.await;
    }
    format!(
        "stalled bus: {} batches of {} KiB offered ({} MiB); edge RSS {} MiB before, peak {} MiB while stalled",
        16 * 64,
        batch_bytes / 1024,
        (16 * 64 * batch_bytes) >> 20,
        before >> 10,
        peak >> 10
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("BEACON_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let secs: u64 = std::env::var("BEACON_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let geoip = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../edge-node/testdata/GeoIP2-City-Test.mmdb");
    let mut cluster = Cluster::start_with_edge(false, &["--geoip", geoip.to_str().unwrap()]);
    cluster.ingest.as_mut().expect("ingest").kill_hard();
    let edge_pid = cluster.edge.as_ref().expect("edge").child.id();
    let _ = NATS_PID.set(cluster.nats.pid());
    let bus = async_nats::connect(cluster.nats.url()).await.expect("nats");
    let _ = BUS.set(async_nats::jetstream::new(bus));
    let (_, plain_key) =
        cluster.merchant_with("bench-plain", &["--snowplow-app-id", "bench-app-plain"]);
    let (chained, chained_key) =
        cluster.merchant_with("bench-chain", &["--snowplow-app-id", "bench-app"]);
    let dir = cluster.data_dir().to_path_buf();
    let nats = cluster.nats.url();
    for (plugin, name) in [("beacon_plugin_utm", "utm"), ("beacon_plugin_pii", "pii")] {
        let path = common::plugin_path(plugin);
        common::cli_in(
            &dir,
            Some(&nats),
            &["plugin", "upload", path.to_str().unwrap(), "--name", name],
        );
    }
    common::cli_in(
        &dir,
        Some(&nats),
        &[
            "plugin",
            "activate",
            "--merchant",
            &chained,
            "--plugin",
            "utm",
            "--plugin",
            "pii",
            "--wait",
            "10",
        ],
    );
    let events = beacon::demo::generate(
        3,
        "bench.example",
        n,
        beacon_edge::now_ms() - 3_600_000,
        3_600_000,
        20_000,
    );
    let edge_addr = cluster
        .endpoints
        .edge_quic
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    let edge_ca = std::fs::read(cluster.endpoints.edge_ca_cert.clone().unwrap()).unwrap();
    let http = cluster.endpoints.edge_http.clone().expect("edge http");
    let edge_ca_for_stall = edge_ca.clone();

    // Batches as the Rust SDK sends them (packed), unless a row says otherwise.
    let packed = wire::BatchEncoding::Packed;
    println!(
        "edge envelopes: {}",
        std::env::var("BEACON_ENVELOPE_ENCODING").unwrap_or_else(|_| "packed".into())
    );
    // Warm-up (connections, allocator, plugin instances).
    for key in [&plain_key, &chained_key] {
        let warm = &events[..n.min(20_000)];
        sdk_load(
            edge_addr,
            edge_ca.clone(),
            key,
            warm,
            None,
            "warm-up",
            packed,
        )
        .await;
    }

    let bare_dir = tempfile::tempdir().expect("tmp");
    let (bare_addr, bare_ca, frames) = bare_server(bare_dir.path()).await;
    let bare_ca = std::fs::read(bare_ca).unwrap();
    let mut rows = vec![
        sdk_load(
            bare_addr,
            bare_ca,
            "k",
            &events,
            None,
            "baseline: bare QUIC frame loop (this process)",
            packed,
        )
        .await,
        sdk_load(
            edge_addr,
            edge_ca.clone(),
            &plain_key,
            &events,
            Some(edge_pid),
            "RSocket/QUIC -> edge -> JetStream, ack after durable, enrichment",
            packed,
        )
        .await,
        sdk_load(
            edge_addr,
            edge_ca.clone(),
            &chained_key,
            &events,
            Some(edge_pid),
            "RSocket/QUIC, ack after durable, enrichment + 2 plugins (utm, pii)",
            packed,
        )
        .await,
        // The same with JSON batches (rsocket-py and older SDKs): what the packed batch
        // encoding saves, in this run.
        sdk_load(
            edge_addr,
            edge_ca,
            &chained_key,
            &events,
            Some(edge_pid),
            "... the same, JSON batches from the client",
            wire::BatchEncoding::Json,
        )
        .await,
    ];
    assert!(frames.load(Ordering::Relaxed) > 0);
    let has_wrk = Command::new("wrk").arg("--version").output().is_ok();
    if has_wrk {
        rows.extend(wrk(
            &format!("{http}/healthz"),
            WRK_DONE.to_string(),
            secs,
            1,
            edge_pid,
            "HTTP floor: wrk GET /healthz (no decoding, no publishing; events = requests)",
        ));
        for (aid, name) in [
            ("bench-app-plain", "HTTP Snowplow tp2 (wrk, 50 events/POST), ack after durable, enrichment"),
            ("bench-app", "HTTP Snowplow tp2 (wrk, 50 events/POST), ack after durable, enrichment + 2 plugins"),
        ] {
            let script = WRK_TP2.replace("AID", aid) + WRK_DONE;
            rows.extend(wrk(&http, script, secs, 50, edge_pid, name));
        }
    } else {
        eprintln!("wrk not found: HTTP phases skipped (apt-get install wrk)");
    }

    let (_, flooder_key) = cluster.merchant_with(
        "bench-flooder",
        &["--rate-limit", "20000", "--burst", "20000"],
    );
    let fairness = flood_fairness(
        edge_addr,
        &edge_ca_for_stall,
        &plain_key,
        &flooder_key,
        &events,
    )
    .await;
    let stall = stalled_bus_flood(
        &cluster,
        edge_addr,
        &edge_ca_for_stall,
        &plain_key,
        &events,
        edge_pid,
    )
    .await;
    // Peak resident memory of the edge over the whole run (VmHWM), against the bound the
    // backpressure is meant to keep (256 MiB of QUIC request bytes in flight plus copies).
    let hwm = std::fs::read_to_string(format!("/proc/{edge_pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    println!("\nedge peak RSS (VmHWM) over the run: {hwm}");
    println!("{fairness}");
    println!("{stall}");
    let base = rows[0].rate();
    println!("\n| phase | events | seconds | events/s | vs bare QUIC loop | edge CPU us/event | nats-server CPU us/event | bus bytes/event |");
    println!("|---|---|---|---|---|---|---|---|");
    let per_event = |cpu: Option<f64>, r: &Row| {
        cpu.map(|c| format!("{:.2}", c * 1e6 / r.events as f64))
            .unwrap_or_else(|| "-".into())
    };
    for r in &rows {
        println!(
            "| {} | {} | {:.2} | {:.0} | {:.2} | {} | {} | {} |",
            r.name,
            r.events,
            r.seconds,
            r.rate(),
            r.rate() / base,
            per_event(r.edge_cpu, r),
            per_event(r.nats_cpu, r),
            r.bus_bytes
                .map(|b| format!("{:.0}", b as f64 / r.events as f64))
                .unwrap_or_else(|| "-".into()),
        );
    }
}
