//! When JetStream stalls (nats-server stopped with SIGSTOP), the edge answers "retry later"
//! on both protocols instead of buffering (HTTP 503 + Retry-After, RSocket REJECTED); when it
//! resumes, the retried requests are stored exactly once. And one address cannot hold more
//! than its share of connections.

#[path = "common/mod.rs"]
mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{http_with, wait_for, Cluster};

struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Self {
        // SAFETY: plain signal to a child process we own.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above; resuming is always safe.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_bus_gets_retry_later_and_retries_are_stored_once() {
    let cluster = Cluster::start_with_edge(false, &["--max-conns-per-ip", "4"]);
    let (merchant, key) = cluster.merchant_with("stall", &["--snowplow-app-id", "stall-app"]);
    let http = cluster.endpoints.edge_http.clone().expect("http");
    let tp2 = |eid: &str| {
        serde_json::json!({"schema": "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4",
            "data": [{"e": "pv", "url": "https://stall.example/", "aid": "stall-app", "eid": eid}]})
        .to_string()
    };
    const TP2: &str = "/com.snowplowanalytics.snowplow/tp2";
    let now = beacon_edge::now_ms();
    let events = beacon::demo::generate(5, "stall.example", 500, now - 60_000, 60_000, 50);
    let client = cluster.client(&key).await.expect("connect");
    // Warm: registry entry, daily salt.
    assert_eq!(
        http_with(&http, "POST", TP2, &[], tp2("warm").as_bytes()).status,
        200
    );

    // Per-address connection limit: 4 (one is the SDK's QUIC connection on the other
    // listener, counted separately); the fifth HTTP connection is refused.
    let addr = http.trim_start_matches("http://").to_string();
    let held: Vec<_> = (0..4)
        .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
        .collect();
    let mut fifth = std::net::TcpStream::connect(&addr).expect("connect");
    fifth
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = String::new();
    let _ = fifth.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer:?}");
    drop((held, fifth));
    // The edge notices the closes asynchronously; then requests are served again.
    wait_for(Duration::from_secs(10), "connection slots released", || {
        (http_with(&http, "GET", "/healthz", &[], b"").status == 200).then_some(())
    });

    let nats_pid = cluster.nats.pid();
    let batch_id = beacon_sdk::new_batch_id();
    {
        let _stopped = Stopped::new(nats_pid);
        let started = Instant::now();
        let r = http_with(&http, "POST", TP2, &[], tp2("during-stall").as_bytes());
        assert_eq!(r.status, 503, "{}", r.body);
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(r.body.contains("retry"), "{}", r.body);
        let err = client
            .send_batch(&batch_id, &events)
            .await
            .expect_err("not durable while the bus is stopped");
        assert!(err.is_retryable(), "{err}");
        // Answered within the publish deadline (10 s) each, not held forever.
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
    }
    // Resumed: the same requests again.
    let r = wait_for(
        Duration::from_secs(30),
        "HTTP accepted after resume",
        || {
            let r = http_with(&http, "POST", TP2, &[], tp2("during-stall").as_bytes());
            (r.status == 200).then_some(r)
        },
    );
    assert_eq!(r.body, "ok");
    let mut resent = None;
    for _ in 0..50 {
        match client.send_batch(&batch_id, &events).await {
            Ok(r) => {
                resent = Some(r);
                break;
            }
            Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(resent.expect("accepted after resume").accepted, 500);

    let q = |extra: &str| {
        format!("SELECT count(*) FROM raw_events WHERE merchant_id = '{merchant}' {extra}")
    };
    let c = &cluster;
    wait_for(Duration::from_secs(60), "all ingested", || {
        (c.count(&q("")) >= 502).then_some(())
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    // warm + the stalled tp2 request + the stalled batch: each once, whatever reached the
    // bus before the 503/REJECTED.
    assert_eq!(c.count(&q("")), 502);
    assert_eq!(c.count(&q("AND event_id = 'during-stall'")), 1);
}

/// Per-event deduplication, with a real tracker that regroups: snowplow-tracker's emitter
/// sends 5 page views while the bus is stalled and gets a 503, although the edge's publish
/// reaches the bus and is stored once it resumes. The emitter re-buffers the 5 and retries
/// them together with 3 tracked meanwhile: a request with another key, which the bus's
/// per-request window cannot recognise. Ingest is restarted between the two, so it knows
/// the first 5 only from rebuilding its state from the stream. Every event is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracker_that_regroups_retried_events_stores_each_once() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};

    let mut cluster = Cluster::start(false);
    let (merchant, _) = cluster.merchant_with("regroup", &["--snowplow-app-id", "regroup-app"]);
    let http = cluster.endpoints.edge_http.clone().expect("http");
    const TP2: &str = "/com.snowplowanalytics.snowplow/tp2";
    let tp2 = |eid: &str| {
        serde_json::json!({"schema": "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4",
            "data": [{"e": "pv", "url": "https://regroup.example/", "aid": "regroup-app", "eid": eid}]})
        .to_string()
    };
    // Warm: registry entry, daily salt.
    assert_eq!(
        http_with(&http, "POST", TP2, &[], tp2("warm").as_bytes()).status,
        200
    );

    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/python/snowplow_regroup.py");
    let mut tracker = common::KillOnDrop(
        Command::new(common::venv_python())
            .arg(&script)
            .args([http.as_str(), "regroup-app"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run the tracker"),
    );
    let mut lines = BufReader::new(tracker.0.stdout.take().expect("stdout")).lines();
    let mut stdin = tracker.0.stdin.take().expect("stdin");
    {
        let _stopped = Stopped::new(cluster.nats.pid());
        let line = lines.next().expect("a line").expect("read");
        assert_eq!(line, "failed 5", "the stalled request failed");
    }
    let raw = |extra: &str| {
        format!(
            "SELECT count(*) FROM raw_events WHERE merchant_id = '{merchant}' \
             AND event_id <> 'warm' AND event_id IS NOT NULL {extra}"
        )
    };
    // The "failed" batch is stored once the bus resumes.
    cluster.wait_count(&raw(""), 5);
    cluster.ingest.as_mut().expect("ingest").kill_hard();
    cluster.start_ingest();
    writeln!(stdin, "go").expect("resume the tracker");
    let line = lines.next().expect("the report").expect("read");
    let report: serde_json::Value = serde_json::from_str(&line).expect("json");
    let ids: Vec<&str> = report["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_str().expect("id"))
        .collect();
    assert_eq!(ids.len(), 8);
    // The retry was one request of all 8: regrouped, so another request key.
    assert!(
        report["delivered"]
            .as_array()
            .expect("delivered")
            .iter()
            .any(|n| n == 8),
        "{report}"
    );
    drop(tracker);

    // A last event behind the retry: once it is stored, so is everything before it (one
    // partition, committed in stream order).
    assert_eq!(
        http_with(&http, "POST", TP2, &[], tp2("last").as_bytes()).status,
        200
    );
    cluster.wait_count(
        &format!(
            "SELECT count(*) FROM events WHERE merchant_id = '{merchant}' AND event_id = 'last'"
        ),
        1,
    );
    let list = ids
        .iter()
        .map(|id| format!("'{id}'"))
        .collect::<Vec<_>>()
        .join(",");
    for table in ["raw_events", "events"] {
        let rows = cluster.sql(&format!(
            "SELECT event_id, count(*) AS n FROM {table} WHERE merchant_id = '{merchant}' \
             AND event_id IN ({list}) GROUP BY event_id"
        ));
        assert_eq!(rows.len(), 8, "{table}: every tracked event: {rows:?}");
        for r in &rows {
            assert_eq!(r["n"], 1, "{table}: {r}");
        }
    }
    // The restarted ingest recognised the 5 from the stream: it counted them.
    let metrics = http_with(&cluster.status_url("ingest"), "GET", "/metrics", &[], b"").body;
    for table in ["raw_events", "events"] {
        let line = format!("beacon_ingest_duplicates_total{{table=\"{table}\"}} 5");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
}
