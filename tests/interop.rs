//! Third-party clients against a real edge: rsocket-py's QUIC client (PyPI `rsocket` +
//! `aioquic`, installed by scripts/setup.sh into the project venv).

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{wait_for, Cluster};

fn venv_python() -> PathBuf {
    let venv = std::env::var_os("BEACON_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/beacon/venv")
        });
    let py = venv.join("bin/python");
    assert!(
        py.exists(),
        "{} missing: run scripts/setup.sh",
        py.display()
    );
    py
}

/// Waits for the child, killing it if it outlives `deadline` (a hung client fails the test
/// instead of hanging it).
fn wait_with_deadline(mut child: std::process::Child, deadline: Duration) -> std::process::Output {
    let start = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsocket_py_quic_client_sends_request_response_and_fire_and_forget() {
    let cluster = Cluster::start(false);
    let (merchant, key) = cluster.merchant("python-shop");
    let addr: std::net::SocketAddr = cluster
        .endpoints
        .edge_quic
        .as_ref()
        .expect("edge")
        .parse()
        .expect("addr");
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/python/rsocket_quic_client.py");
    let out = Command::new(venv_python())
        .arg(&script)
        .args([
            addr.ip().to_string(),
            addr.port().to_string(),
            cluster
                .endpoints
                .edge_ca_cert
                .as_ref()
                .expect("ca")
                .display()
                .to_string(),
            key,
            "run1".into(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python");
    let out = wait_with_deadline(out, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "rsocket-py client failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim()).expect("json line");
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
