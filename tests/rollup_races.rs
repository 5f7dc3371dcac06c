//! Rollup and maintenance roles killed while they commit, with several of them racing on
//! one shared warehouse (the catalog in a real PostgreSQL, the tables on a real
//! S3-compatible server, each role on a "machine" of its own): every rollup commit is a
//! compare-and-swap on the rollup watermark, and a role killed at any point leaves either
//! its whole delta or none of it. At the end the rollups count every event exactly once, per
//! merchant, and compaction changed no answer.

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::time::Duration;

use common::servers::{Postgres, S3Server};
use common::{cli_try, sql_in, wait_for, wait_stored_once, Cluster, Role};
use serde_json::Value;

const BUCKET: &str = "beacon";

/// What maintenance compacts here: the tables the rollups append to.
const TABLES: [&str; 4] = ["--table", "rollups_hourly", "--table", "breakdowns_hourly"];

/// `beacon rollup` every second from a data directory (a machine) of its own; with `crash`,
/// armed to die at that crash point of its next commit (`BEACON_FAULT_REPLACE`).
fn spawn_rollup(cluster: &Cluster, name: &'static str, crash: Option<&str>) -> Role {
    let env: Vec<(&str, &str)> = crash
        .map(|at| ("BEACON_FAULT_REPLACE", at))
        .into_iter()
        .collect();
    cluster.spawn_on_machine(name, "rollup", &["--interval", "1"], &env)
}

/// Per merchant: events and page views, from the rollups and from `events` itself.
fn per_merchant(dir: &Path) -> (Vec<Value>, Vec<Value>) {
    let rolled = sql_in(
        dir,
        "SELECT merchant_id, CAST(sum(events) AS BIGINT) AS events, \
         CAST(sum(pageviews) AS BIGINT) AS pageviews \
         FROM rollups GROUP BY merchant_id ORDER BY merchant_id",
    );
    let counted = sql_in(
        dir,
        "SELECT merchant_id, count(*) AS events, \
         count(*) FILTER (WHERE name = 'pageview') AS pageviews \
         FROM events GROUP BY merchant_id ORDER BY merchant_id",
    );
    (rolled, counted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollup_and_maintenance_roles_killed_while_racing_count_every_event_once() {
    let pg = Postgres::start();
    let s3 = S3Server::start(BUCKET);
    // Every process this test starts inherits these: the shared warehouse's settings.
    common::servers::use_shared_warehouse(&pg, &s3, BUCKET);

    let cluster = Cluster::start(false);
    let mut rollups = [
        Some(spawn_rollup(&cluster, "rollup-a", None)),
        Some(spawn_rollup(&cluster, "rollup-b", None)),
    ];
    let names = ["rollup-a", "rollup-b"];
    let merchants: Vec<(String, String)> = (0..3)
        .map(|i| cluster.merchant(&format!("racing-{i}")))
        .collect();
    let data = cluster.data_dir().to_path_buf();
    let rolled_up = |dir: &Path| {
        common::first_int(&sql_in(dir, "SELECT coalesce(sum(events), 0) FROM rollups"))
    };
    let now = beacon_edge::now_ms();
    let mut sent = 0i64;
    let (mut kills, mut crashes) = (0, 0);
    let mut maintenance = Vec::new();
    for round in 0..6u64 {
        // (Read before sending: a quick rollup run may count the round before it is read.)
        let before = rolled_up(&data);
        let victim = round as usize % 2;
        // Odd rounds: the victim runs alone, armed to die just before or just after the
        // catalog swap of its next commit, so the kill lands mid-commit by construction.
        let crash = (round % 2 == 1).then_some(if round % 4 == 1 {
            "before-swap"
        } else {
            "after-swap"
        });
        if let Some(at) = crash {
            for mut r in rollups.iter_mut().filter_map(Option::take) {
                r.kill_hard();
                kills += 1;
            }
            rollups[victim] = Some(spawn_rollup(&cluster, names[victim], Some(at)));
        }
        for (m, (_, key)) in merchants.iter().enumerate() {
            let batch = beacon::demo::generate(
                (m as u64 + 1) * 1_000 + round,
                &format!("racing{m}.example"),
                200,
                now - 7_200_000,
                7_200_000,
                100,
            );
            cluster.send(key, &batch).await;
            sent += batch.len() as i64;
        }
        if let Some(at) = crash {
            let armed = &mut rollups[victim].as_mut().expect("armed rollup").child;
            wait_for(Duration::from_secs(60), "the armed rollup died", || {
                matches!(armed.try_wait(), Ok(Some(_))).then_some(())
            });
            let said = cluster.log(names[victim]);
            assert!(
                said.contains(&format!("BEACON_FAULT_REPLACE: dying {at}")),
                "{said}"
            );
            crashes += 1;
            for (i, name) in names.into_iter().enumerate() {
                rollups[i] = Some(spawn_rollup(&cluster, name, None));
            }
        }
        // A run got this round's events in; in even rounds, one of the two racing rollups
        // is then killed (in turn) at whatever point it is.
        wait_for(Duration::from_secs(60), "a rollup run under way", || {
            (rolled_up(&data) > before).then_some(())
        });
        if crash.is_none() {
            if let Some(mut r) = rollups[victim].take() {
                r.kill_hard();
                kills += 1;
            }
            rollups[victim] = Some(spawn_rollup(&cluster, names[victim], None));
        }
        // Compaction of the rollup tables races the rollups every other round (a replace
        // commit of its own, folding their deltas), from a third machine; in the other rounds
        // a maintenance process is killed with -9 as soon as it runs.
        if round % 2 == 1 {
            let name: &'static str = if round == 1 {
                "maintain-k1"
            } else {
                "maintain-k2"
            };
            let mut m = cluster.spawn_on_machine(name, "maintain", &TABLES, &[]);
            // Running: it logged, or used some CPU past its start (or already finished).
            wait_for(Duration::from_secs(30), "maintenance running", || {
                let busy =
                    !cluster.log(name).is_empty() || common::cpu_seconds(m.child.id()) >= 0.05;
                let done = matches!(m.child.try_wait(), Ok(Some(_)));
                (busy || done).then_some(())
            });
            m.kill_hard();
        } else {
            let dir = data.join(format!("maintainer-{round}"));
            std::fs::create_dir_all(&dir).expect("maintainer dir");
            maintenance.push(std::thread::spawn(move || {
                let mut args = vec!["maintain"];
                args.extend(TABLES);
                cli_try(&dir, None, &args)
            }));
        }
    }
    for m in maintenance {
        // A maintenance run may lose its commits to the rollups' (it says so and leaves
        // the table as it was); it must not fail otherwise or change an answer.
        match m.join().expect("maintain thread") {
            Ok(report) => eprintln!("maintain (racing): {report}"),
            Err(e) => assert!(
                e.contains("another job rewrote it first")
                    || e.contains("kept conflicting with other writers"),
                "maintenance failed: {e}"
            ),
        }
    }

    let reader = data.join("reader");
    std::fs::create_dir_all(&reader).expect("reader dir");
    wait_stored_once(&reader, sent, Duration::from_secs(180));
    let (rolled, counted) = per_merchant(&reader);
    assert_eq!(rolled.len(), merchants.len(), "{rolled:?}");
    assert_eq!(rolled, counted, "the rollups count each event once");
    eprintln!(
        "{sent} events, {kills} rollups killed, {crashes} died at a crash point; rollups per merchant: {}",
        serde_json::to_string(&rolled).expect("json")
    );

    // A quiet compaction afterwards changes no answer either.
    let mut args = vec!["maintain"];
    args.extend(TABLES);
    let report = cli_try(&reader, None, &args).expect("maintain");
    eprintln!("maintain: {report}");
    assert_eq!(per_merchant(&reader).0, rolled);
}
