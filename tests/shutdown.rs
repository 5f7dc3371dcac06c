//! `beacon up` stops gracefully on SIGTERM while clients are sending: every batch it
//! acknowledged is in Iceberg after a restart, exactly once, and it leaves no process behind.

#[path = "common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use beacon::endpoints::Endpoints;
use common::{cli_in, first_int, sigterm, sql_in, wait_for};

fn start_up(dir: &std::path::Path) -> (Child, Endpoints) {
    common::spawn_up(dir, &dir.join("up.log"), &[])
}

fn count(dir: &std::path::Path, sql: &str) -> i64 {
    first_int(&sql_in(dir, sql))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_batches_and_loses_nothing_acknowledged() {
    let dir = tempfile::Builder::new()
        .prefix("beacon-up-")
        .tempdir()
        .expect("tempdir");
    let (mut up, endpoints) = start_up(dir.path());
    let created: serde_json::Value = serde_json::from_str(&cli_in(
        dir.path(),
        None,
        &["merchant", "create", "shop", "--format", "json"],
    ))
    .expect("json");
    let key = created["write_key"].as_str().expect("key").to_string();

    let addr = endpoints
        .edge_quic
        .clone()
        .expect("edge")
        .parse()
        .expect("addr");
    let ca = std::fs::read(endpoints.edge_ca_cert.clone().expect("ca")).expect("ca");
    let events = beacon::demo::generate(
        9,
        "shutdown.example",
        40_000,
        beacon_edge::now_ms() - 60_000,
        60_000,
        500,
    );
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut senders = Vec::new();
    for part in events.chunks(10_000) {
        let client = beacon_sdk::Client::connect(beacon_sdk::ClientConfig::new(
            addr,
            ca.clone(),
            key.clone(),
        ))
        .await
        .expect("connect");
        let (part, acked) = (part.to_vec(), acked.clone());
        senders.push(tokio::spawn(async move {
            for batch in part.chunks(50) {
                match client.send(batch).await {
                    Ok(ack) => {
                        assert_eq!(ack.accepted, batch.len());
                        let mut a = acked.lock().expect("lock");
                        a.extend(batch.iter().map(|e| e.event_id.clone()));
                    }
                    // The edge is going away: the rest of this client's batches are unacknowledged.
                    Err(_) => return,
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let acked_before_signal = acked.lock().expect("lock").len();
    sigterm(&up);
    let stopped = Instant::now();
    let status = loop {
        if let Some(s) = up.try_wait().expect("wait") {
            break s;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(30),
            "beacon up did not stop within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "beacon up exited with {status}");
    for s in senders {
        s.await.expect("sender");
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(
        acked_before_signal > 0 && acked.len() < events.len(),
        "the signal must land mid-stream ({} acked)",
        acked.len()
    );
    // No nats-server of ours left running.
    let nats_store = dir.path().join("nats");
    let leftover = Command::new("pgrep")
        .args(["-f", &nats_store.display().to_string()])
        .output()
        .expect("pgrep");
    assert!(
        leftover.stdout.is_empty(),
        "nats-server still running: {}",
        String::from_utf8_lossy(&leftover.stdout)
    );

    // Restart on the same data: whatever was acknowledged is there, once.
    let (mut up, _) = start_up(dir.path());
    let d = dir.path();
    let present: HashSet<String> = wait_for(
        Duration::from_secs(60),
        "acknowledged events in Iceberg",
        || {
            let ids: HashSet<String> = sql_in(d, "SELECT event_id FROM raw_events")
                .iter()
                .filter_map(|r| r["event_id"].as_str().map(String::from))
                .collect();
            acked.is_subset(&ids).then_some(ids)
        },
    );
    assert!(present.len() >= acked.len());
    assert_eq!(
        count(d, "SELECT count(*) FROM raw_events"),
        count(d, "SELECT count(DISTINCT event_id) FROM raw_events"),
        "no duplicates"
    );
    sigterm(&up);
    let _ = up.wait();
}
