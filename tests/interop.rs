//! Third-party clients against real parts: rsocket-py's QUIC client (PyPI `rsocket` +
//! `aioquic`) against an edge, and PyIceberg reading the warehouse's tables (all installed
//! by scripts/setup.sh into the project venv).

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{venv_python, wait_for, Cluster};

/// Waits for the child, killing it if it outlives `deadline` (a hung client fails the test
/// instead of hanging it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsocket_py_quic_client_sends_request_response_and_fire_and_forget() {
    let cluster = Cluster::start(false);
    let (merchant, key) = cluster.merchant("python-shop");
    let v = rsocket_py(&cluster, "rsocket_quic_client.py", &key, "run1");
    assert_eq!(v["request_response"]["accepted"], 5, "{v}");

    let c = &cluster;
    wait_for(
        Duration::from_secs(60),
        "both python batches in Iceberg",
        || {
            (c.count(&format!("SELECT count(*) FROM raw_events WHERE merchant_id = '{merchant}' AND event_id LIKE 'py-run1-%'")) == 10)
            .then_some(())
        },
    );
    assert_eq!(
        c.count(&format!("SELECT count(*) FROM raw_events WHERE merchant_id = '{merchant}' AND event_id LIKE 'py-run1-fnf-%'")),
        5
    );
}

/// Runs `script` (an rsocket-py client in tests/python) against the cluster's edge with
/// the merchant's `key` and `last` as its last argument; its one JSON line.
fn rsocket_py(cluster: &Cluster, script: &str, key: &str, last: &str) -> serde_json::Value {
    let addr: std::net::SocketAddr = cluster
        .endpoints
        .edge_quic
        .as_ref()
        .expect("edge")
        .parse()
        .expect("addr");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/python")
        .join(script);
    let ca = cluster.endpoints.edge_ca_cert.as_ref().expect("ca");
    let out = Command::new(venv_python())
        .arg(&script)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(ca)
        .args([key, last])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python");
    let out = common::wait_with_deadline(out, Duration::from_secs(90));
    assert!(
        out.status.success(),
        "{} failed: {}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim()).expect("json line")
}

/// A rate-limited merchant's connection is not read while its allowance refills, so the
/// client's KEEPALIVEs go unanswered; the edge sends its own meanwhile, and rsocket-py with
/// a 1 s lifetime never finds it silent through a wait of several seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_waiting_for_its_allowance_stays_alive_for_rsocket_py() {
    let cluster = Cluster::start(false);
    // 10 events/s, burst 10: a batch of 40 is taken and leaves ~3 s of debt.
    let (_, key) = cluster.merchant_with(
        "slow-shop",
        &[
            "--domain",
            "ka.example",
            "--rate-limit",
            "10",
            "--burst",
            "10",
        ],
    );
    let v = rsocket_py(&cluster, "rsocket_keepalive.py", &key, "40");
    eprintln!("rsocket-py through a rate-limit wait: {v}");
    assert_eq!(v["first"]["accepted"], 40, "{v}");
    assert_eq!(v["second"]["accepted"], 1, "{v}");
    // The scenario happened: the second batch waited well past the client's lifetime.
    assert!(v["second_s"].as_f64().is_some_and(|s| s >= 2.0), "{v}");
    assert_eq!(v["keepalive_timeouts"], serde_json::json!([]), "{v}");
    assert_eq!(v["server_alive"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyiceberg_reads_the_same_counts_and_sums_as_beacon_sql() {
    let cluster = Cluster::start(false);
    let mut merchants = Vec::new();
    for (i, name) in ["py-a", "py-b", "py-c"].iter().enumerate() {
        let (id, key) = cluster.merchant(name);
        let client = cluster.client(&key).await.expect("client");
        let now = beacon_edge::now_ms();
        let mut events = beacon::demo::generate(
            40 + i as u64,
            "pyi.example",
            1_500 * (i + 1),
            now - 3_600_000,
            3_600_000,
            300,
        );
        // One invalid event per merchant, so `failed_events` has rows too.
        events[0].event_id.clear();
        for batch in events.chunks(500) {
            client.send(batch).await.expect("sent");
        }
        merchants.push((id, events.len() - 1));
    }
    let total: usize = merchants.iter().map(|m| m.1).sum();
    let c = &cluster;
    wait_for(Duration::from_secs(60), "all events in Iceberg", || {
        (c.count("SELECT count(*) FROM events") == total as i64
            && c.count("SELECT count(*) FROM failed_events") == 3)
            .then_some(())
    });

    let data_dir = cluster.data_dir();
    let v = common::pyiceberg_read(data_dir);
    let sql = |q: &str| c.count(q);
    for table in ["raw_events", "events"] {
        assert_eq!(
            v[table]["rows"],
            sql(&format!("SELECT count(*) FROM {table}")),
            "{table}: {v}"
        );
        assert_eq!(
            v[table]["distinct_event_ids"],
            sql(&format!("SELECT count(DISTINCT event_id) FROM {table}")),
            "{table}"
        );
        assert_eq!(
            v[table]["revenue_micros"],
            sql(&format!(
                "SELECT CAST(sum(revenue_micros) AS BIGINT) FROM {table}"
            )),
            "{table}"
        );
    }
    assert_eq!(v["events"]["rows"], total);
    assert_eq!(v["failed_events"]["rows"], 3);
    for (id, n) in &merchants {
        assert_eq!(v["events"]["by_merchant"][id], *n, "{id}");
    }
    let one = v["events"]["filtered_merchant"].as_str().expect("merchant");
    assert_eq!(
        v["events"]["filtered_rows"],
        sql(&format!(
            "SELECT count(*) FROM events WHERE merchant_id = '{one}'"
        ))
    );
}
