//! Rewriting history on real parts: a bad pipeline version rolled back and its window
//! re-processed while another merchant's traffic flows, a held batch recovered, a resumed
//! job after a crash, and a person forgotten down to the Parquet files.

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::time::Duration;

use beacon_proto::Event;
use common::{cli_in, http, plugin_path, wait_for, Cluster};
use serde_json::Value;

/// The same traffic for every merchant given the same seed (ids, visitors, pages, times).
fn traffic(seed: u64, n: usize) -> Vec<Event> {
    let now = beacon_edge::now_ms();
    beacon::demo::generate(seed, "shop.example", n, now - 3_000_000, 2_400_000, 40)
}

fn json(out: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn activate(c: &Cluster, merchant: &str, args: &[&str]) -> Value {
    common::activate(c.data_dir(), &c.nats.url(), merchant, args)
}

/// Everything a merchant's `events` rows say, except what names the merchant or the
/// delivery (merchant id, batch id, edge, stream sequence, receive time).
fn events_of(c: &Cluster, m: &str) -> Vec<Value> {
    c.sql(&format!(
        "SELECT event_id, name, ts, url, referrer, title, visitor_id, session_id, user_id, \
                revenue_micros, currency, properties, pipeline_version, hostname, path, source, \
                medium, utm_source, utm_medium, utm_campaign, country, region, city, device, \
                browser, os \
         FROM events WHERE merchant_id = '{m}' ORDER BY event_id"
    ))
}

/// A merchant's merged rollups (hourly totals, revenue and every breakdown row) and visits.
fn rollups_of(c: &Cluster, m: &str) -> Vec<Value> {
    let mut rows = c.sql(&format!(
        "SELECT hour, events, pageviews, visitors FROM rollups WHERE merchant_id = '{m}' ORDER BY hour"
    ));
    rows.extend(c.sql(&format!(
        "SELECT hour, currency, orders, revenue_micros FROM revenue WHERE merchant_id = '{m}' \
         ORDER BY hour, currency"
    )));
    rows.extend(c.sql(&format!(
        "SELECT hour, dimension, value, CAST(sum(events) AS BIGINT) AS events, \
                CAST(sum(pageviews) AS BIGINT) AS pageviews, \
                CAST(round(hll_estimate(hll_union(visitors_hll))) AS BIGINT) AS visitors \
         FROM breakdowns_hourly WHERE merchant_id = '{m}' GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    )));
    // The pre-aggregated visits (rebuilt by re-processing, kept incrementally otherwise).
    rows.extend(c.sql(&format!(
        "SELECT session, visitor_id, started_at, ended_at, events, pageviews, bounce,                 entry_page, exit_page, source, country, device, pipeline_version          FROM sessions WHERE merchant_id = '{m}' ORDER BY session"
    )));
    rows
}

/// Every row of every table that belongs to `m`, for before/after comparisons.
fn all_rows_of(c: &Cluster, m: &str) -> Vec<Value> {
    let mut rows = events_of(c, m);
    rows.extend(c.sql(&format!(
        "SELECT * FROM raw_events WHERE merchant_id = '{m}' ORDER BY stream_seq, batch_index"
    )));
    rows.extend(c.sql(&format!(
        "SELECT * FROM failed_events WHERE merchant_id = '{m}' ORDER BY stream_seq, event_id"
    )));
    rows.extend(rollups_of(c, m));
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_version_rolled_back_and_reprocessed_matches_a_merchant_that_never_had_it() {
    let c = Cluster::start(true);
    let (a, key_a) = c.merchant("rolled-back");
    let (ctl, key_ctl) = c.merchant("control");
    let (live, key_live) = c.merchant("live");
    let goals = plugin_path("beacon_plugin_goals");
    c.cli(&[
        "plugin",
        "upload",
        goals.to_str().unwrap(),
        "--name",
        "goals",
    ]);
    let good = r#"goals={"goals":[{"name":"checkout","path":"/checkout"},{"name":"blog","path_prefix":"/blog/"}]}"#;
    let buggy = r#"goals={"goals":[{"name":"checkout","path_prefix":"/"},{"name":"blog","path_prefix":"/"}]}"#;
    for m in [&a, &ctl] {
        activate(&c, m, &["--plugin", "goals", "--plugin-config", good]);
    }

    // Before v2: the same traffic for both.
    let before = traffic(1, 600);
    c.send(&key_a, &before).await;
    c.send(&key_ctl, &before).await;
    let live_before: Vec<Event> = traffic(3, 300)
        .into_iter()
        .map(|mut e| {
            e.event_id = format!("pre-{}", e.event_id);
            e
        })
        .collect();
    c.send(&key_live, &live_before).await;

    // v2, with the bug, for `a` only; the same traffic again.
    let v2 = activate(&c, &a, &["--plugin", "goals", "--plugin-config", buggy]);
    assert_eq!(v2["pipeline"]["active"]["version"], 2, "{v2}");
    let window_from = beacon_edge::now_ms();
    let during = traffic(2, 900);
    c.send(&key_a, &during).await;
    c.send(&key_ctl, &during).await;
    c.cli(&[
        "plugin",
        "rollback",
        "--merchant",
        &a,
        "--to",
        "1",
        "--reason",
        "goal bug",
    ]);
    let window_to = beacon_edge::now_ms() + 1;
    c.wait_count(
        &format!("SELECT count(*) FROM events WHERE merchant_id = '{a}'"),
        1500,
    );
    c.wait_count(
        &format!("SELECT count(*) FROM events WHERE merchant_id = '{ctl}'"),
        1500,
    );
    c.wait_rolled_up(3300, Duration::from_secs(90));
    assert_ne!(
        events_of(&c, &a),
        events_of(&c, &ctl),
        "the bug must show before re-processing"
    );
    assert_ne!(rollups_of(&c, &a), rollups_of(&c, &ctl));
    let ctl_before = all_rows_of(&c, &ctl);
    let live_pre = c.sql(&format!(
        "SELECT * FROM events WHERE merchant_id = '{live}' ORDER BY event_id"
    ));

    // Lineage: each raw event knows its batch position, version and outcome.
    let lineage = c.sql(&format!(
        "SELECT pipeline_version, outcome, count(*) AS n, min(batch_index) AS lo FROM raw_events \
         WHERE merchant_id = '{a}' GROUP BY 1, 2 ORDER BY 1"
    ));
    assert_eq!(lineage.len(), 2, "{lineage:?}");
    assert_eq!(lineage[0]["pipeline_version"], 1);
    assert_eq!(lineage[0]["n"], 600);
    assert_eq!(lineage[1]["pipeline_version"], 2);
    assert_eq!(lineage[1]["n"], 900);
    assert!(lineage
        .iter()
        .all(|l| l["outcome"] == "processed" && l["lo"] == 0));

    let (from, to) = (
        chrono::DateTime::from_timestamp_millis(window_from)
            .unwrap()
            .to_rfc3339(),
        chrono::DateTime::from_timestamp_millis(window_to)
            .unwrap()
            .to_rfc3339(),
    );
    let scope = [
        "reprocess",
        "--merchant",
        &a,
        "--from",
        &from,
        "--to",
        &to,
        "--pipeline-version",
        "1",
    ];

    // Dry run: the v2 window's 900 rows, the same pageviews; nothing changes.
    let mut dry: Vec<&str> = scope.to_vec();
    dry.extend(["--dry-run", "--format", "json"]);
    let report = json(&c.cli(&dry));
    assert_eq!(report["raw_rows"], 900, "{report}");
    assert_eq!(report["events_before"], 900);
    assert_eq!(report["events_after"], 900);
    for d in report["days"].as_array().unwrap() {
        assert_eq!(d["pageviews"][0], d["pageviews"][1], "{d}");
    }
    assert_ne!(events_of(&c, &a), events_of(&c, &ctl));

    // A run that dies right after its first commit (events) ...
    let mut run: Vec<&str> = scope.to_vec();
    run.extend([
        "--reason",
        "v2 tagged every page as a goal",
        "--who",
        "ops-test",
        "--format",
        "json",
    ]);
    let crashed = std::process::Command::new(common::beacon_bin())
        .args(&run)
        .env("BEACON_DATA_DIR", c.data_dir())
        .env("BEACON_NATS_URL", c.nats.url())
        .env("BEACON_FAULT_REPLACE", "after-swap")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run beacon");
    assert!(
        !crashed.status.success(),
        "the fault point must kill the run"
    );

    // ... is resumed by the same command, with live traffic for another merchant meanwhile.
    let dir = c.data_dir().to_path_buf();
    let nats = c.nats.url();
    let args: Vec<String> = run.iter().map(|s| s.to_string()).collect();
    let job = std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli_in(&dir, Some(&nats), &args)
    });
    let client = c.client(&key_live).await.expect("client");
    let mut live_sent = 0;
    for round in 0u64.. {
        let batch: Vec<Event> = traffic(100 + round, 50)
            .into_iter()
            .map(|mut e| {
                e.event_id = format!("during-{round}-{}", e.event_id);
                e
            })
            .collect();
        client.send(&batch).await.expect("live batch");
        live_sent += batch.len();
        if job.is_finished() || round >= 200 {
            break;
        }
    }
    let report = json(&job.join().expect("reprocess thread"));
    assert_eq!(report["resumed"], true, "{report}");
    assert_eq!(report["raw_rows"], 900);

    // Exactly the control's rows, value for value; the control untouched; live traffic kept.
    c.wait_count(
        &format!("SELECT count(*) FROM events WHERE merchant_id = '{live}'"),
        300 + live_sent as i64,
    );
    c.wait_rolled_up(3300 + live_sent as i64, Duration::from_secs(90));
    assert_eq!(events_of(&c, &a), events_of(&c, &ctl));
    assert_eq!(rollups_of(&c, &a), rollups_of(&c, &ctl));
    assert_eq!(all_rows_of(&c, &ctl), ctl_before);
    assert_eq!(
        c.sql(&format!(
            "SELECT * FROM events WHERE merchant_id = '{live}' AND event_id LIKE 'pre-%' ORDER BY event_id"
        )),
        live_pre
    );
    assert_eq!(
        c.count(&format!(
            "SELECT count(DISTINCT event_id) FROM events WHERE merchant_id = '{live}' AND event_id LIKE 'during-%'"
        )),
        live_sent as i64
    );

    // The audit trail.
    let history = json(&c.cli(&["reprocess", "history", "--format", "json"]));
    let job = history
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == report["job_id"])
        .expect("job in history");
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["who"], "ops-test");
    assert_eq!(job["versions"][&a], 1);
    assert_eq!(job["counts"]["raw_rows"], 900);
    assert!(job["commits"]["events"].is_i64(), "{job}");
    assert!(job["commits"]["rollups_hourly"].is_i64(), "{job}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_held_by_a_failing_plugin_is_recovered_by_reprocessing_with_a_fixed_version() {
    let c = Cluster::start(true);
    let (m, key) = c.merchant("held");
    let hostile = plugin_path("beacon_plugin_hostile");
    let tag = plugin_path("beacon_plugin_template");
    c.cli(&[
        "plugin",
        "upload",
        hostile.to_str().unwrap(),
        "--name",
        "hostile",
    ]);
    c.cli(&["plugin", "upload", tag.to_str().unwrap(), "--name", "tag"]);
    activate(
        &c,
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
    let from = chrono::Utc::now().to_rfc3339();
    let events = traffic(7, 400);
    c.send(&key, &events).await;
    c.wait_count(
        &format!(
            "SELECT count(*) FROM failed_events WHERE merchant_id = '{m}' AND stage = 'plugin'"
        ),
        400,
    );
    assert_eq!(
        c.count(&format!(
            "SELECT count(*) FROM events WHERE merchant_id = '{m}'"
        )),
        0
    );
    assert_eq!(
        c.count(&format!(
            "SELECT count(*) FROM raw_events WHERE merchant_id = '{m}' AND outcome = 'held' AND pipeline_version = 1"
        )),
        400
    );

    // The fix becomes active; re-processing (default: the active version), asked for over
    // the admin API, recovers the batch.
    activate(
        &c,
        &m,
        &[
            "--plugin",
            "tag",
            "--plugin-config",
            r#"tag={"key":"fixed","value":"yes"}"#,
        ],
    );
    let to = chrono::Utc::now().to_rfc3339();
    let _admin = c.spawn(
        "admin",
        &[
            "admin",
            "--listen",
            "127.0.0.1:0",
            "--admin-tokens",
            "ops:0123456789abcdef0123",
        ],
    );
    let addr = wait_for(Duration::from_secs(30), "admin API address", || {
        c.log("admin").lines().find_map(|l| {
            l.split("admin API: http://")
                .nth(1)
                .map(|a| a.trim().to_string())
        })
    });
    let secret = Some("0123456789abcdef0123");
    let body = |v: Value| v.to_string().into_bytes();
    let ask = |v: Value| http(&addr, "POST", "/v1/reprocess", secret, &body(v));
    assert_eq!(http(&addr, "POST", "/v1/reprocess", None, b"{}").0, 401);
    for (bad, why) in [
        (
            serde_json::json!({"merchants": [&m], "from": &to, "to": &from, "reason": "x"}),
            "before",
        ),
        (
            serde_json::json!({"merchants": [&m], "from": &from, "to": &to}),
            "reason",
        ),
        (
            serde_json::json!({"merchants": ["no'quote"], "from": &from, "to": &to, "reason": "x"}),
            "merchant id",
        ),
        (
            serde_json::json!({"from": &from, "to": &to, "reason": "x"}),
            "all_merchants",
        ),
        (
            serde_json::json!({"merchants": [&m], "from": "yesterday", "to": &to, "reason": "x"}),
            "RFC 3339",
        ),
    ] {
        let (status, text) = ask(bad);
        assert_eq!(status, 422, "{text}");
        assert!(text.contains(why), "{why}: {text}");
    }
    let (status, text) =
        ask(serde_json::json!({"merchants": [&m], "from": &from, "to": &to, "bogus": 1}));
    assert!(
        (400..500).contains(&status),
        "unknown fields are refused: {status} {text}"
    );
    let (status, text) = ask(serde_json::json!({
        "merchants": [&m], "from": &from, "to": &to, "reason": "plugin fixed"
    }));
    assert_eq!(status, 202, "{text}");
    let job_id = json(&text)["job_id"].as_str().expect("job id").to_string();
    let report = wait_for(Duration::from_secs(60), "job done", || {
        let (_, text) = http(&addr, "GET", "/v1/jobs", secret, b"");
        json(&text)
            .as_array()?
            .iter()
            .find(|j| j["id"] == job_id.as_str() && j["state"] == "done")
            .cloned()
    });
    assert_eq!(report["who"], "ops", "{report}");
    assert_eq!(report["versions"][&m], 2, "{report}");
    assert_eq!(report["counts"]["failed_before"], 400, "{report}");
    assert_eq!(report["counts"]["failed_after"], 0, "{report}");
    assert_eq!(
        c.count(&format!(
            "SELECT count(*) FROM events WHERE merchant_id = '{m}' AND properties['fixed'] = 'yes' AND pipeline_version = 'v2'"
        )),
        400
    );
    assert_eq!(
        c.count(&format!(
            "SELECT count(*) FROM failed_events WHERE merchant_id = '{m}'"
        )),
        0
    );
    c.wait_rolled_up(400, Duration::from_secs(90));
    assert_eq!(
        c.count(&format!(
            "SELECT sum(events) FROM rollups WHERE merchant_id = '{m}'"
        )),
        400
    );
}

/// Every string value in every Parquet file under `dir`.
fn parquet_strings(dir: &Path) -> Vec<String> {
    use arrow::array::{Array, AsArray};
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|e| e != "parquet") {
                continue;
            }
            let file = std::fs::File::open(&p).expect("parquet file");
            let reader =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                    .expect("parquet")
                    .build()
                    .expect("reader");
            for batch in reader {
                let batch = batch.expect("batch");
                for col in batch.columns() {
                    let col = match col.data_type() {
                        arrow::datatypes::DataType::Map(..) => {
                            let m = col.as_map();
                            let v =
                                arrow::compute::cast(m.values(), &arrow::datatypes::DataType::Utf8)
                                    .unwrap();
                            let k =
                                arrow::compute::cast(m.keys(), &arrow::datatypes::DataType::Utf8)
                                    .unwrap();
                            for a in [k, v] {
                                out.extend(
                                    a.as_string::<i32>().iter().flatten().map(str::to_string),
                                );
                            }
                            continue;
                        }
                        _ => match arrow::compute::cast(col, &arrow::datatypes::DataType::Utf8) {
                            Ok(c) => c,
                            Err(_) => continue,
                        },
                    };
                    let s = col.as_string::<i32>();
                    out.extend(
                        (0..s.len())
                            .filter(|&i| s.is_valid(i))
                            .map(|i| s.value(i).to_string()),
                    );
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_person_is_gone_from_every_table_and_from_the_files_after_expiry() {
    let c = Cluster::start(true);
    let (m, key) = c.merchant("forget");
    let (other, key_other) = c.merchant("other");
    let mut events = traffic(11, 500);
    for (i, e) in events.iter_mut().enumerate() {
        if i % 10 == 0 {
            e.user_id = Some("user-to-forget".into());
            e.visitor_id = Some("visitor-to-forget".into());
        }
    }
    // One of theirs fails validation: kept in failed_events with its payload.
    let mut bad = events[0].clone();
    bad.event_id = "bad-one".into();
    bad.name = String::new();
    events.push(bad);
    c.send(&key, &events).await;
    // The same id at another merchant is another person: kept.
    let mut theirs = traffic(12, 100);
    for e in &mut theirs {
        e.user_id = Some("user-to-forget".into());
    }
    c.send(&key_other, &theirs).await;
    c.wait_count("SELECT count(*) FROM events", 600);
    c.wait_rolled_up(600, Duration::from_secs(90));
    let visitors_before = c.count(&format!(
        "SELECT CAST(round(hll_estimate(hll_union(visitors_hll))) AS BIGINT) FROM rollups_hourly WHERE merchant_id = '{m}'"
    ));
    let other_before = all_rows_of(&c, &other);

    let dry = json(&c.cli(&[
        "forget",
        "--merchant",
        &m,
        "--user",
        "user-to-forget",
        "--dry-run",
        "--format",
        "json",
    ]));
    assert_eq!(dry["rows"]["events"], 50, "{dry}");
    assert_eq!(dry["rows"]["failed_events"], 1, "{dry}");
    let report = json(&c.cli(&[
        "forget",
        "--merchant",
        &m,
        "--user",
        "user-to-forget",
        "--reason",
        "erasure request 42",
        "--format",
        "json",
    ]));
    assert_eq!(report["rows"]["raw_events"], 50, "{report}");
    assert_eq!(report["rows"]["events"], 50);
    assert_eq!(report["rows"]["failed_events"], 1);
    for t in ["raw_events", "events"] {
        assert_eq!(
            c.count(&format!(
                "SELECT count(*) FROM {t} WHERE merchant_id = '{m}' AND user_id = 'user-to-forget'"
            )),
            0
        );
    }
    assert_eq!(
        c.count(&format!(
            "SELECT count(*) FROM events WHERE merchant_id = '{m}'"
        )),
        450
    );
    // The rollups no longer count them (their visitor is gone from the sketches).
    c.wait_rolled_up(550, Duration::from_secs(90));
    let visitors_after = c.count(&format!(
        "SELECT CAST(round(hll_estimate(hll_union(visitors_hll))) AS BIGINT) FROM rollups_hourly WHERE merchant_id = '{m}'"
    ));
    let exact = c.count(&format!(
        "SELECT count(DISTINCT visitor_id) FROM events WHERE merchant_id = '{m}'"
    ));
    assert_eq!(visitors_after, exact, "before: {visitors_before}");
    assert_eq!(visitors_after + 1, visitors_before);
    assert_eq!(all_rows_of(&c, &other), other_before);

    // Still on disk in old snapshots' files until maintenance expires them; then gone.
    let warehouse = c.data_dir().join("warehouse");
    assert!(parquet_strings(&warehouse)
        .iter()
        .any(|s| s.contains("user-to-forget")));
    c.cli(&[
        "maintain",
        "--snapshot-retain-secs",
        "0",
        "--snapshot-retain-last",
        "1",
        "--orphan-age-secs",
        "0",
    ]);
    let left: Vec<String> = parquet_strings(&warehouse)
        .into_iter()
        .filter(|s| s.contains("user-to-forget") || s.contains("visitor-to-forget"))
        .collect();
    // Only the other merchant's person with the same id remains.
    assert_eq!(
        left.len(),
        100 * 2,
        "raw_events and events of the other merchant: {}",
        left.len()
    );

    let history = json(&c.cli(&["reprocess", "history", "--format", "json"]));
    let job = &history.as_array().unwrap()[0];
    assert_eq!(job["kind"], "forget");
    assert_eq!(job["state"], "done");
    assert!(
        !job.to_string().contains("user-to-forget"),
        "the audit keeps a hash only: {job}"
    );
}
