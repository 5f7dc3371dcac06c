//! Replace commits and `beacon maintain` against a running pipeline in other processes: ingest
//! appending while maintenance rewrites, maintenance killed at the two moments that matter,
//! and PyIceberg (another engine) reading what the rewrites left.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{beacon_bin, wait_for, Cluster};

/// Runs `beacon maintain` in its own process; returns (success, stdout, stderr).
fn maintain(cluster: &Cluster, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(beacon_bin());
    cmd.arg("maintain")
        .args(args)
        .env("BEACON_DATA_DIR", cluster.data_dir())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run beacon maintain");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `files a -> b` figures of `table` in a maintain report.
fn files(report: &str, table: &str) -> (u64, u64) {
    let line = report
        .lines()
        .find(|l| l.split_whitespace().next() == Some(table))
        .unwrap_or_else(|| panic!("no {table} line in report:\n{report}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "files").expect("files") + 1;
    (
        words[at].parse().expect("before"),
        words[at + 2].parse().expect("after"),
    )
}

/// Live data files of `table`, from its `$manifests` metadata table. (Summed here: the
/// iceberg-datafusion 0.10 metadata table fails on projections of some of its columns.)
fn data_files(cluster: &Cluster, table: &str) -> i64 {
    cluster
        .sql(&format!("SELECT * FROM \"{table}$manifests\""))
        .iter()
        .filter(|m| m["content"].as_i64() == Some(0))
        .map(|m| {
            m["added_data_files_count"].as_i64().unwrap_or(0)
                + m["existing_data_files_count"].as_i64().unwrap_or(0)
        })
        .sum()
}

static NEXT_SEED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(7);

async fn send_rounds(cluster: &Cluster, key: &str, rounds: usize, per_round: usize) -> usize {
    send_until(cluster, key, rounds, per_round, || true).await
}

/// Sends rounds of traffic: at least `min_rounds`, then more while `more()` says so (at most
/// ten times as many). Returns the number of events acknowledged.
async fn send_until(
    cluster: &Cluster,
    key: &str,
    min_rounds: usize,
    per_round: usize,
    more: impl Fn() -> bool,
) -> usize {
    let client = cluster.client(key).await.expect("client");
    let now = beacon_edge::now_ms();
    let mut sent = 0;
    let mut round = 0;
    while round < min_rounds || (more() && round < 10 * min_rounds) {
        round += 1;
        let events = beacon::demo::generate(
            // Event ids are `e-<seed>-<n>`: every round of the test run gets its own seed.
            NEXT_SEED.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            "maint.example",
            per_round,
            now - 2 * 3_600_000,
            2 * 3_600_000,
            100,
        );
        for batch in events.chunks(100) {
            client.send(batch).await.expect("acknowledged");
        }
        sent += events.len();
    }
    sent
}

fn assert_exact(cluster: &Cluster, total: usize) {
    for table in ["raw_events", "events"] {
        assert_eq!(
            cluster.count(&format!("SELECT count(*) FROM {table}")),
            total as i64,
            "{table} rows"
        );
        assert_eq!(
            cluster.count(&format!("SELECT count(DISTINCT event_id) FROM {table}")),
            total as i64,
            "{table} distinct ids"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_in_another_process_keeps_every_acknowledged_event_exactly_once() {
    let cluster = Cluster::start(true);
    let (_, key) = cluster.merchant("maint-shop");

    // Maintenance runs back to back in its own process while the edge, ingest (small
    // commits) and rollups keep committing.
    let data_dir = cluster.data_dir().to_path_buf();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let compactions = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let runner = {
        let stop = stop.clone();
        let compactions = compactions.clone();
        std::thread::spawn(move || {
            let mut compacted = 0u64;
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && runs < 300 {
                runs += 1;
                let out = Command::new(beacon_bin())
                    .args([
                        "maintain",
                        "--snapshot-retain-secs",
                        "0",
                        "--snapshot-retain-last",
                        "2",
                    ])
                    .env("BEACON_DATA_DIR", &data_dir)
                    .env("RUST_LOG", "warn")
                    .output()
                    .expect("run maintain");
                assert!(
                    out.status.success(),
                    "maintain failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let report = String::from_utf8_lossy(&out.stdout).into_owned();
                let (before, after) = files(&report, "events");
                compacted += before.saturating_sub(after);
                if after < before {
                    compactions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            compacted
        })
    };
    // Traffic goes on until maintenance has compacted `events` a few times meanwhile.
    let total = send_until(&cluster, &key, 8, 300, || {
        compactions.load(std::sync::atomic::Ordering::Relaxed) < 3
    })
    .await;
    let c = &cluster;
    wait_for(Duration::from_secs(90), "all events in Iceberg", || {
        (c.count("SELECT count(*) FROM events") >= total as i64).then_some(())
    });
    cluster.wait_rolled_up(total as i64, Duration::from_secs(60));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let compacted = runner.join().expect("maintain runner");
    assert_exact(&cluster, total);
    assert!(
        compacted > 0,
        "maintenance never compacted while ingest ran"
    );

    // A final pass leaves one file per partition of `events`, still exact, rollups unchanged.
    let (ok, report, err) = maintain(&cluster, &[], &[]);
    assert!(ok, "{err}");
    assert_exact(&cluster, total);
    assert_eq!(
        cluster.count("SELECT coalesce(sum(events), 0) FROM rollups"),
        total as i64,
        "{report}"
    );
    let partitions =
        cluster.count("SELECT count(DISTINCT CAST(date_trunc('day', ts) AS VARCHAR)) FROM events");
    assert!(data_files(&cluster, "events") <= partitions * 4, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_killed_before_or_after_its_swap_loses_and_doubles_nothing() {
    let cluster = Cluster::start(false);
    let (_, key) = cluster.merchant("crash-shop");
    let total = send_rounds(&cluster, &key, 4, 400).await;
    let c = &cluster;
    wait_for(Duration::from_secs(60), "all events in Iceberg", || {
        (c.count("SELECT count(*) FROM events") == total as i64).then_some(())
    });
    let files_before = data_files(&cluster, "events");
    assert!(files_before > 1, "nothing to compact");

    // Dies after staging everything, before the catalog swap: nothing changes.
    let (ok, _, err) = maintain(
        &cluster,
        &["--table", "events"],
        &[("BEACON_FAULT_REPLACE", "before-swap")],
    );
    assert!(!ok && err.contains("dying before-swap"), "{err}");
    assert_eq!(data_files(&cluster, "events"), files_before);
    assert_exact(&cluster, total);

    // Dies right after the swap: the rewrite is in, once.
    let (ok, _, err) = maintain(
        &cluster,
        &["--table", "events"],
        &[("BEACON_FAULT_REPLACE", "after-swap")],
    );
    assert!(!ok && err.contains("dying after-swap"), "{err}");
    let files_after = data_files(&cluster, "events");
    assert!(
        files_after < files_before,
        "{files_after} >= {files_before}"
    );
    assert_exact(&cluster, total);

    // More traffic, then a clean run: still exact, and ingest's watermark survived the
    // rewrites (no envelope was committed twice after restart).
    let more = send_rounds(&cluster, &key, 1, 300).await;
    let total = total + more;
    wait_for(Duration::from_secs(60), "new events in Iceberg", || {
        (c.count("SELECT count(*) FROM events") == total as i64).then_some(())
    });
    let (ok, report, err) = maintain(&cluster, &common::SWEEP_NOW, &[]);
    assert!(ok, "{err}");
    assert_exact(&cluster, total);

    // The orphans both crashes left are gone: every Parquet file on disk is live.
    let live = data_files(&cluster, "events");
    let dir = cluster.data_dir().join("warehouse");
    let on_disk = parquet_files_under(&dir, "events");
    assert_eq!(on_disk as i64, live, "{report}");

    // PyIceberg reads exactly the rows Beacon's SQL does after the rewrites.
    let v = common::pyiceberg_read(cluster.data_dir());
    for table in ["raw_events", "events"] {
        assert_eq!(v[table]["rows"], total as i64, "{table}: {v}");
        assert_eq!(v[table]["distinct_event_ids"], total as i64, "{table}: {v}");
    }
}

/// Parquet files under the `table` directory of the warehouse (any namespace layout).
fn parquet_files_under(dir: &std::path::Path, table: &str) -> usize {
    fn walk(dir: &std::path::Path, inside: bool, table: &str, n: &mut usize) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                walk(&path, inside || name == table, table, n);
            } else if inside && name.ends_with(".parquet") {
                *n += 1;
            }
        }
    }
    let mut n = 0;
    walk(dir, false, table, &mut n);
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warehouse_role_maintains_tables_on_its_schedule() {
    let mut cluster = Cluster::start(false);
    cluster.rollup = Some(cluster.spawn(
        "rollup",
        &[
            "rollup",
            "--interval",
            "1",
            "--maintain-interval",
            "1",
            "--snapshot-retain-secs",
            "0",
            "--snapshot-retain-last",
            "3",
        ],
    ));
    let (_, key) = cluster.merchant("scheduled-shop");
    // Each round committed before the next: at least six snapshots of `events`, so the
    // schedule has snapshots to expire however fast ingest batches a quick sender.
    let mut total = 0;
    for _ in 0..6 {
        total += send_rounds(&cluster, &key, 1, 300).await;
        let c = &cluster;
        wait_for(Duration::from_secs(60), "the round in Iceberg", || {
            (c.count("SELECT count(*) FROM events") == total as i64).then_some(())
        });
    }
    let c = &cluster;
    cluster.wait_rolled_up(total as i64, Duration::from_secs(60));
    // Traffic has stopped: the schedule compacts what ingest left and expires snapshots.
    let partitions =
        cluster.count("SELECT count(DISTINCT CAST(date_trunc('day', ts) AS VARCHAR)) FROM events");
    wait_for(Duration::from_secs(60), "scheduled compaction", || {
        // (`SELECT *`: the 0.10 metadata tables fail on `count(*)`.)
        let snapshots = c.sql("SELECT * FROM \"events$snapshots\"").len() as i64;
        (data_files(c, "events") <= partitions * 4 && snapshots <= 4).then_some(())
    });
    assert_exact(&cluster, total);
    assert_eq!(
        cluster.count("SELECT coalesce(sum(events), 0) FROM rollups"),
        total as i64
    );
    // The report is logged just after the commit it describes.
    let log = wait_for(Duration::from_secs(30), "a maintenance report", || {
        let log = cluster.log("rollup");
        log.contains("maintenance").then_some(log)
    });
    assert!(
        !log.contains("maintenance failed"),
        "a failed maintenance run in the rollup role's log:\n{log}"
    );
}
