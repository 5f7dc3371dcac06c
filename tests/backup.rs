//! Backup, restore and moving a data directory (issue 17): a backup is refused while
//! `beacon up` runs; a plain copy is refused with the original's path named (instead of
//! silently reading and committing next to the original's files) until `beacon relocate`;
//! after the original is deleted, a restore into a new place runs `beacon up`, keeps the
//! merchants and every event, takes new events, references no file outside itself, and
//! PyIceberg reads it with the catalog URI as printed.

#[path = "common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{beacon_bin, cli_in, first_int, sigterm, spawn_up_guarded, sql_in, wait_for};
use serde_json::Value;

/// Runs `beacon <args>`: (success, stdout + stderr).
fn beacon(args: &[&str]) -> (bool, String) {
    let out = Command::new(beacon_bin())
        .args(args)
        .output()
        .expect("run beacon");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `beacon backup --data-dir from --to to`.
fn backup(from: &Path, to: &Path) -> (bool, String) {
    let (from, to) = (from.to_str().expect("path"), to.to_str().expect("path"));
    beacon(&["backup", "--data-dir", from, "--to", to])
}

fn count(dir: &Path) -> i64 {
    first_int(&sql_in(
        dir,
        "SELECT count(DISTINCT event_id) FROM raw_events",
    ))
}

async fn send(dir: &Path, key: &str, seed: u64, n: usize) -> HashSet<String> {
    let endpoints = beacon::endpoints::Endpoints::read(dir).expect("endpoints");
    let addr = endpoints.edge_quic.expect("edge").parse().expect("addr");
    let ca = std::fs::read(endpoints.edge_ca_cert.expect("ca")).expect("ca");
    let client =
        beacon_sdk::Client::connect(beacon_sdk::ClientConfig::new(addr, ca, key.to_string()))
            .await
            .expect("connect");
    let events = beacon::demo::generate(
        seed,
        "backup.example",
        n,
        beacon_edge::now_ms() - 60_000,
        60_000,
        100,
    );
    for batch in events.chunks(100) {
        let ack = client.send(batch).await.expect("send");
        assert_eq!(ack.accepted, batch.len());
    }
    events.into_iter().map(|e| e.event_id).collect()
}

/// Every path string in the warehouse's metadata files.
fn recorded_paths(data: &Path) -> String {
    let mut all = String::new();
    let mut todo = vec![data.join("warehouse")];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.to_string_lossy().ends_with(".metadata.json") {
                all.push_str(&std::fs::read_to_string(&p).expect("metadata"));
            }
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_restore_and_move_keep_everything_and_touch_nothing_outside() {
    let root = tempfile::Builder::new()
        .prefix("beacon-backup-")
        .tempdir()
        .expect("tempdir");
    let (a, b, c, d) = (
        root.path().join("a"),
        root.path().join("b"),
        root.path().join("c"),
        root.path().join("d"),
    );
    let (mut up, _) = spawn_up_guarded(&a, &root.path().join("a.log"), &[]);
    let created: Value = serde_json::from_str(&cli_in(
        &a,
        None,
        &["merchant", "create", "keep-shop", "--format", "json"],
    ))
    .expect("json");
    let key = created["write_key"].as_str().expect("key").to_string();
    let mut sent = send(&a, &key, 1, 1_000).await;
    wait_for(Duration::from_secs(60), "events stored", || {
        (count(&a) == 1_000).then_some(())
    });

    // Not while it runs.
    let (ok, out) = backup(&a, &b);
    assert!(!ok && out.contains("in use"), "{out}");
    sigterm(&up);
    assert!(up.wait().expect("wait").success());

    // Not into itself.
    let inside = a.join("backup");
    let (ok, out) = backup(&a, &inside);
    assert!(!ok && out.contains("inside"), "{out}");
    let (ok, out) = backup(&a, &b);
    assert!(ok, "{out}");
    assert_eq!(count(&b), 1_000, "the backup is a working data directory");

    // A plain copy is refused, naming where its catalog points, until relocated.
    let cp = Command::new("cp")
        .arg("-a")
        .arg(&a)
        .arg(&c)
        .status()
        .expect("cp");
    assert!(cp.success());
    let (ok, out) = beacon(&["sql", "--data-dir", c.to_str().unwrap(), "SELECT 1"]);
    assert!(
        !ok && out.contains("beacon relocate")
            && out.contains(&a.join("warehouse").display().to_string()),
        "{out}"
    );
    let (ok, out) = beacon(&["relocate", "--data-dir", c.to_str().unwrap()]);
    assert!(ok && out.contains("relocated"), "{out}");
    assert!(!recorded_paths(&c).contains(&a.display().to_string()));

    // Disaster: the original is gone. The relocated copy reads its own files (a manifest
    // still pointing into the original would fail now); restore somewhere new and carry on.
    std::fs::remove_dir_all(&a).expect("lose the original");
    assert_eq!(count(&c), 1_000);
    let (ok, out) = beacon(&[
        "restore",
        "--from",
        b.to_str().unwrap(),
        "--data-dir",
        d.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    // Out of reach while the restored copy runs: any path still pointing into the backup
    // (a manifest list, a manifest) would fail the reads below.
    let parked = root.path().join("b-parked");
    std::fs::rename(&b, &parked).expect("park the backup");
    let (mut up, _) = spawn_up_guarded(&d, &root.path().join("d.log"), &[]);
    // The merchant (in the restored bus store) still sends; its events join the restored ones.
    sent.extend(send(&d, &key, 2, 500).await);
    let ids: HashSet<String> = wait_for(Duration::from_secs(60), "restored + new events", || {
        let rows = sql_in(&d, "SELECT event_id FROM raw_events");
        (rows.len() >= 1_500).then(|| {
            rows.iter()
                .filter_map(|r| r["event_id"].as_str().map(String::from))
                .collect()
        })
    });
    assert_eq!(ids, sent, "every event, once");
    assert_eq!(
        first_int(&sql_in(&d, "SELECT count(*) FROM raw_events")),
        1_500
    );
    sigterm(&up);
    assert!(up.wait().expect("wait").success());
    let recorded = recorded_paths(&d);
    assert!(
        !recorded.contains(&b.display().to_string()),
        "a path into the backup"
    );
    assert!(recorded.contains(&d.join("warehouse").display().to_string()));
    std::fs::rename(&parked, &b).expect("unpark the backup");
    assert_eq!(count(&b), 1_000, "the backup itself is untouched");

    // Another engine reads the restored warehouse with the URIs as printed (the backup
    // out of reach again).
    std::fs::rename(&b, &parked).expect("park the backup");
    let v = common::pyiceberg_read(&d);
    assert_eq!(v["raw_events"]["distinct_event_ids"], 1_500, "{v}");
}
