//! Pipeline rollout on real parts: versions activated, canaried, promoted and rolled back on
//! live edges while events flow, the failure policies, and the admin HTTP API.

#[path = "common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use beacon_proto::Event;
use common::{activate, client_for, first_int, http, plugin_json, plugin_path, wait_for, Cluster};
use serde_json::Value;

fn path(plugin: &str) -> String {
    plugin_path(plugin).to_str().expect("utf8").to_string()
}

fn events_for(merchant: &str, seed: u64, n: usize, visitors: u64) -> Vec<Event> {
    let now = beacon_edge::now_ms();
    let mut events = beacon::demo::generate(
        seed,
        "rollout.example",
        n,
        now - 3_600_000,
        3_600_000,
        visitors,
    );
    for e in &mut events {
        e.merchant_id = merchant.to_string();
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activate_and_roll_back_on_two_live_edges_while_50k_events_flow() {
    let cluster = Cluster::start(false);
    let (_edge2, endpoints2) = cluster.spawn_edge("edge-2");
    let (m, key) = cluster.merchant("rollout");
    let dir = cluster.data_dir().to_path_buf();
    let nats = cluster.nats.url();
    plugin_json(
        &dir,
        &nats,
        &["upload", &path("beacon_plugin_template"), "--name", "tag"],
    );
    plugin_json(
        &dir,
        &nats,
        &["upload", &path("beacon_plugin_goals"), "--name", "goals"],
    );
    let v1 = activate(
        &dir,
        &nats,
        &m,
        &[
            "--plugin",
            "tag",
            "--plugin-config",
            r#"tag={"key":"ver","value":"one"}"#,
            "--reason",
            "first",
        ],
    );
    assert_eq!(v1["pipeline"]["active"]["version"], 1);
    assert_eq!(v1["edges"], 2, "both edges report: {v1}");

    // 50,000 events in 200 acknowledged batches, alternating edges, paced over ~10 s so the
    // changes land mid-flow.
    let events = events_for(&m, 11, 50_000, 5_000);
    let clients = [
        Arc::new(cluster.client(&key).await.expect("client edge-1")),
        Arc::new(client_for(&endpoints2, &key).await.expect("client edge-2")),
    ];
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = {
        let sent = sent.clone();
        tokio::spawn(async move {
            for (i, batch) in events.chunks(250).enumerate() {
                let r = clients[i % 2]
                    .send_batch(&format!("rollout-{i}"), batch)
                    .await
                    .expect("acknowledged");
                assert_eq!(r.accepted, batch.len());
                assert!(r.plugin_error.is_none(), "{:?}", r.plugin_error);
                sent.fetch_add(batch.len(), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let at = |n: usize| {
        let sent = sent.clone();
        async move {
            while sent.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    at(15_000).await;
    let (d, n) = (dir.clone(), nats.clone());
    let m2 = m.clone();
    let v2 = tokio::task::spawn_blocking(move || {
        activate(
            &d,
            &n,
            &m2,
            &[
                "--plugin",
                "tag",
                "--plugin",
                "goals",
                "--plugin-config",
                r#"tag={"key":"ver","value":"two"}"#,
                "--plugin-config",
                r#"goals={"goals":[{"name":"any-page","path_prefix":"/"}]}"#,
                "--reason",
                "add goals",
            ],
        )
    })
    .await
    .expect("activate v2");
    assert_eq!(v2["pipeline"]["active"]["version"], 2);
    assert_eq!(v2["edges"], 2);
    let applied_ms = v2["applied_ms"].as_u64().expect("applied_ms");
    assert!(
        applied_ms < 5_000,
        "v2 reached every edge after {applied_ms} ms"
    );
    eprintln!("pipeline v2 active on 2 edges {applied_ms} ms after the change was stored");

    at(32_000).await;
    let (d, n) = (dir.clone(), nats.clone());
    let m2 = m.clone();
    let back = tokio::task::spawn_blocking(move || {
        plugin_json(
            &d,
            &n,
            &["rollback", "--merchant", &m2, "--reason", "goals misfire"],
        )
    })
    .await
    .expect("rollback");
    assert_eq!(back["pipeline"]["active"]["version"], 1, "{back}");
    assert_eq!(back["edges"], 2);
    sender.await.expect("sender");

    let scope = format!("FROM events WHERE merchant_id = '{m}'");
    cluster.wait_count(&format!("SELECT count(*) {scope}"), 50_000);
    assert_eq!(
        cluster.count(&format!("SELECT count(DISTINCT event_id) {scope}")),
        50_000
    );
    assert_eq!(
        cluster.count(&format!(
            "SELECT count(*) FROM raw_events WHERE merchant_id = '{m}'"
        )),
        50_000
    );
    let by_version = cluster.sql(&format!(
        "SELECT pipeline_version AS v, count(*) AS n {scope} GROUP BY 1 ORDER BY 1"
    ));
    let versions: Vec<&str> = by_version.iter().filter_map(|r| r["v"].as_str()).collect();
    assert_eq!(versions, ["v1", "v2"], "{by_version:?}");
    // Every event was processed by exactly the version it is labelled with...
    assert_eq!(
        cluster.count(&format!(
            "SELECT count(*) {scope} AND NOT ((pipeline_version = 'v1' AND properties['ver'] = 'one' AND properties['goal'] IS NULL) \
             OR (pipeline_version = 'v2' AND properties['ver'] = 'two' AND (name <> 'pageview' OR properties['goal'] = 'any-page')))"
        )),
        0
    );
    // ...no batch was split between versions...
    assert_eq!(
        cluster
            .sql(&format!(
                "SELECT batch_id {scope} GROUP BY 1 HAVING count(DISTINCT pipeline_version) > 1"
            ))
            .len(),
        0
    );
    // ...and on each edge the switch points are clean: v1, then v2, then v1 again.
    for edge in ["edge-1", "edge-2"] {
        let w = cluster.sql(&format!(
            "SELECT CAST(min(received_at) AS BIGINT) AS lo, CAST(max(received_at) AS BIGINT) AS hi {scope} \
             AND edge_id = '{edge}' AND pipeline_version = 'v2'"
        ));
        let (lo, hi) = (
            w[0]["lo"].as_i64().expect("v2 on edge"),
            w[0]["hi"].as_i64().expect("hi"),
        );
        // received_at is in microseconds; allow 20 ms for batches decoded around a switch.
        let inside = first_int(&cluster.sql(&format!(
            "SELECT count(*) {scope} AND edge_id = '{edge}' AND pipeline_version = 'v1' \
             AND CAST(received_at AS BIGINT) > {} AND CAST(received_at AS BIGINT) < {}",
            lo + 20_000,
            hi - 20_000
        )));
        assert_eq!(inside, 0, "{edge}: v1 events inside the v2 period");
        for (cmp, bound) in [("<", lo), (">", hi)] {
            let n = first_int(&cluster.sql(&format!(
                "SELECT count(*) {scope} AND edge_id = '{edge}' AND pipeline_version = 'v1' AND CAST(received_at AS BIGINT) {cmp} {bound}"
            )));
            assert!(n > 0, "{edge}: no v1 events {cmp} the v2 period");
        }
    }
    // The history tells who did what and why.
    let history = plugin_json(&dir, &nats, &["history", "--merchant", &m]);
    let reasons: Vec<&str> = history
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["pipeline"]["reason"].as_str())
        .collect();
    assert_eq!(reasons, ["first", "add goals", "goals misfire"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_takes_a_stable_share_of_visitors_then_is_promoted() {
    let cluster = Cluster::start(false);
    let (m, key) = cluster.merchant("canary");
    let dir = cluster.data_dir().to_path_buf();
    let nats = cluster.nats.url();
    plugin_json(
        &dir,
        &nats,
        &["upload", &path("beacon_plugin_template"), "--name", "tag"],
    );
    activate(
        &dir,
        &nats,
        &m,
        &[
            "--plugin",
            "tag",
            "--plugin-config",
            r#"tag={"key":"ver","value":"stable"}"#,
        ],
    );
    let canary = activate(
        &dir,
        &nats,
        &m,
        &[
            "--plugin",
            "tag",
            "--plugin-config",
            r#"tag={"key":"ver","value":"canary"}"#,
            "--canary",
            "30",
        ],
    );
    assert_eq!(canary["pipeline"]["active"]["version"], 1);
    assert_eq!(canary["pipeline"]["canary"]["def"]["version"], 2);
    assert_eq!(canary["pipeline"]["canary"]["percent"], 30);

    let client = cluster.client(&key).await.expect("client");
    let events = events_for(&m, 12, 6_000, 1_000);
    for batch in events.chunks(500) {
        client.send(batch).await.expect("sent");
    }
    let scope = format!("FROM events WHERE merchant_id = '{m}'");
    cluster.wait_count(&format!("SELECT count(*) {scope}"), 6_000);
    // A visitor sees one version only, and the labels match what ran.
    assert_eq!(
        cluster
            .sql(&format!(
                "SELECT visitor_id {scope} GROUP BY 1 HAVING count(DISTINCT pipeline_version) > 1"
            ))
            .len(),
        0
    );
    assert_eq!(
        cluster.count(&format!(
            "SELECT count(*) {scope} AND NOT ((pipeline_version = 'v1' AND properties['ver'] = 'stable') OR (pipeline_version = 'v2' AND properties['ver'] = 'canary'))"
        )),
        0
    );
    let visitors = cluster.count(&format!("SELECT count(DISTINCT visitor_id) {scope}"));
    let on_canary = cluster.count(&format!(
        "SELECT count(DISTINCT visitor_id) {scope} AND pipeline_version = 'v2'"
    ));
    let share = on_canary as f64 / visitors as f64;
    assert!(
        (0.2..0.4).contains(&share),
        "canary share {share} of {visitors} visitors"
    );

    let promoted = plugin_json(&dir, &nats, &["promote", "--merchant", &m]);
    assert_eq!(promoted["pipeline"]["active"]["version"], 2);
    assert!(promoted["pipeline"]["canary"].is_null());
    let more = events_for(&m, 13, 1_000, 300);
    client.send(&more).await.expect("sent");
    cluster.wait_count(&format!("SELECT count(*) {scope}"), 7_000);
    let ids: Vec<String> = more.iter().map(|e| format!("'{}'", e.event_id)).collect();
    assert_eq!(
        cluster.count(&format!(
            "SELECT count(*) {scope} AND pipeline_version = 'v2' AND event_id IN ({})",
            ids.join(",")
        )),
        1_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_plugins_hold_or_pass_through_and_are_always_recorded() {
    let cluster = Cluster::start(false);
    let (m, key) = cluster.merchant("failing");
    let dir = cluster.data_dir().to_path_buf();
    let nats = cluster.nats.url();
    plugin_json(
        &dir,
        &nats,
        &[
            "upload",
            &path("beacon_plugin_hostile"),
            "--name",
            "hostile",
        ],
    );
    // The sample-events check refuses a plugin that always fails...
    let refused = std::process::Command::new(common::beacon_bin())
        .args([
            "plugin",
            "activate",
            "--merchant",
            &m,
            "--plugin",
            "hostile",
            "--plugin-config",
            "hostile=error",
        ])
        .env("BEACON_NATS_URL", &nats)
        .env("BEACON_DATA_DIR", &dir)
        .output()
        .expect("run");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("fails on sample events"));
    // ...unless forced.
    activate(
        &dir,
        &nats,
        &m,
        &[
            "--plugin",
            "hostile",
            "--plugin-config",
            "hostile=error",
            "--on-failure",
            "pass-through",
            "--force",
        ],
    );
    let client = cluster.client(&key).await.expect("client");
    let first = events_for(&m, 14, 100, 20);
    let r = client.send(&first).await.expect("acknowledged");
    assert!(
        r.plugin_error
            .as_deref()
            .unwrap_or("")
            .contains("refused on purpose"),
        "{r:?}"
    );
    let scope = format!("WHERE merchant_id = '{m}'");
    cluster.wait_count(
        &format!("SELECT count(*) FROM events {scope} AND pipeline_version IS NULL"),
        100,
    );

    activate(
        &dir,
        &nats,
        &m,
        &[
            "--plugin",
            "hostile",
            "--plugin-config",
            "hostile=trap",
            "--on-failure",
            "hold",
            "--force",
        ],
    );
    let trapped = client
        .send(&events_for(&m, 15, 100, 20))
        .await
        .expect("acknowledged");
    // The client learns that the plugin trapped, not what the plugin wrote to stderr (which
    // may echo its config or other events); failed_events keeps that for operators.
    let told = trapped.plugin_error.unwrap_or_default();
    assert!(told.contains("trapped"), "{told}");
    assert!(!told.contains("panics on purpose"), "{told}");
    cluster.wait_count(&format!("SELECT count(*) FROM raw_events {scope}"), 200);
    cluster.wait_count(&format!("SELECT count(*) FROM failed_events {scope}"), 200);
    assert_eq!(
        cluster.count(&format!("SELECT count(*) FROM events {scope}")),
        100,
        "held"
    );
    let failures = cluster.sql(&format!(
        "SELECT pipeline_version AS v, count(*) AS n, min(plugin) AS plugin, min(reason) AS reason \
         FROM failed_events {scope} AND stage = 'plugin' GROUP BY 1 ORDER BY 1"
    ));
    assert_eq!(failures.len(), 2, "{failures:?}");
    assert_eq!(failures[0]["v"], 1);
    assert_eq!(failures[0]["n"], 100);
    assert!(failures[0]["reason"]
        .as_str()
        .unwrap_or("")
        .contains("refused on purpose"));
    assert_eq!(failures[1]["v"], 2);
    assert!(failures[1]["reason"]
        .as_str()
        .unwrap_or("")
        .contains("trapped"));
    assert!(failures[1]["reason"]
        .as_str()
        .unwrap_or("")
        .contains("panics on purpose"));
    assert!(failures[1]["plugin"]
        .as_str()
        .unwrap_or("")
        .starts_with("hostile@"));

    // Three batches in a row out of fuel and this pipeline version is quarantined at the
    // edge: the next batch fails without running. (Traps, like the one above, don't count:
    // client input can cause them.)
    activate(
        &dir,
        &nats,
        &m,
        &[
            "--plugin",
            "hostile",
            "--plugin-config",
            "hostile=loop",
            "--force",
        ],
    );
    let mut last = String::new();
    for seed in 16..20 {
        let r = client
            .send(&events_for(&m, seed, 10, 5))
            .await
            .expect("acknowledged");
        last = r.plugin_error.unwrap_or_default();
    }
    assert!(last.contains("quarantined"), "{last}");
    // Quarantine belongs to that version: a fixed version runs at once.
    activate(
        &dir,
        &nats,
        &m,
        &["--plugin", "hostile", "--plugin-config", "hostile=pass"],
    );
    let r = client
        .send(&events_for(&m, 20, 10, 5))
        .await
        .expect("acknowledged");
    assert!(r.plugin_error.is_none(), "{:?}", r.plugin_error);
    cluster.wait_count(&format!("SELECT count(*) FROM raw_events {scope}"), 250);
    // Plugin failures travel without payloads; ingest fills them in from the raw events.
    assert_eq!(
        cluster.count(&format!(
            "SELECT count(*) FROM failed_events {scope} AND stage = 'plugin' AND payload NOT LIKE '%event_id%'"
        )),
        0
    );
}

#[test]
fn the_admin_api_needs_an_admin_token_and_manages_plugins_and_pipelines() {
    let cluster = Cluster::start(false);
    let (m, write_key) = cluster.merchant("admin-api");
    let token = "ops:0123456789abcdef0123";
    let _admin = cluster.spawn(
        "admin",
        &["admin", "--listen", "127.0.0.1:0", "--admin-tokens", token],
    );
    let addr = wait_for(Duration::from_secs(30), "admin API address", || {
        cluster.log("admin").lines().find_map(|l| {
            l.split("admin API: http://")
                .nth(1)
                .map(|a| a.trim().to_string())
        })
    });
    let secret = Some("0123456789abcdef0123");

    assert_eq!(http(&addr, "GET", "/v1/plugins", None, b"").0, 401);
    assert_eq!(
        http(&addr, "GET", "/v1/plugins", Some(&write_key), b"").0,
        401,
        "write keys are not admin tokens"
    );
    let wasm = std::fs::read(plugin_path("beacon_plugin_template")).expect("component");
    let (status, body) = http(&addr, "POST", "/v1/plugins?name=tag", secret, &wasm);
    assert_eq!(status, 201, "{body}");
    let up: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(up["plugin"]["uploaded_by"], "ops");
    assert_eq!(
        http(&addr, "POST", "/v1/plugins?name=tag", secret, &wasm).0,
        200,
        "idempotent"
    );
    let clock = std::fs::read(plugin_path("beacon_plugin_clock")).expect("component");
    let (status, body) = http(&addr, "POST", "/v1/plugins?name=clock", secret, &clock);
    assert_eq!(status, 422);
    assert!(body.contains("wasi:clocks"), "{body}");

    let pipeline = format!("/v1/merchants/{m}/pipeline");
    assert_eq!(http(&addr, "GET", &pipeline, secret, b"").0, 404);
    let (status, body) = http(
        &addr,
        "POST",
        &pipeline,
        secret,
        br#"{"plugins": [{"plugin": "nope"}]}"#,
    );
    assert_eq!(status, 404, "{body}");
    let (status, body) = http(
        &addr,
        "POST",
        &pipeline,
        secret,
        br#"{"plugins": [{"plugin": "tag"}], "on_failure": "sometimes"}"#,
    );
    assert_eq!(status, 400);
    assert!(
        body.contains("on_failure") || body.contains("sometimes"),
        "{body}"
    );
    let (status, body) = http(
        &addr,
        "POST",
        &pipeline,
        secret,
        br#"{"plugins": [{"plugin": "tag", "config": {"key": "via", "value": "http"}}], "reason": "from the API"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let change: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(change["pipeline"]["active"]["version"], 1);
    assert_eq!(change["pipeline"]["changed_by"], "ops");
    let (status, body) = http(&addr, "POST", &format!("{pipeline}/rollback"), secret, b"");
    assert_eq!(status, 422, "nothing to roll back to: {body}");
    let (status, body) = http(&addr, "GET", &format!("{pipeline}/history"), secret, b"");
    assert_eq!(status, 200);
    assert!(body.contains("from the API"), "{body}");
    let (status, body) = http(&addr, "GET", &format!("{pipeline}/versions/1"), secret, b"");
    assert_eq!(status, 200);
    assert!(body.contains("via"), "{body}");
    let (status, body) = http(&addr, "GET", "/v1/edges", secret, b"");
    assert_eq!(status, 200);
    assert!(body.contains("edge-1"), "{body}");
}
