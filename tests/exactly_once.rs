//! Kill the ingester (SIGKILL, not a graceful stop) at random points while events flow;
//! at the end every event_id is in `raw_events` exactly once.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{wait_for, Cluster};
use rand::Rng;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_killed_repeatedly_loses_and_duplicates_nothing() {
    let mut cluster = Cluster::start(false);
    let (_, key) = cluster.merchant("crashy-shop");
    let now = beacon_edge::now_ms();
    let total = 20_000;
    let events =
        beacon::demo::generate(7, "crashy.example", total, now - 3_600_000, 3_600_000, 2000);
    let client = Arc::new(cluster.client(&key).await.expect("connect"));
    // Small batches at a steady pace for several seconds: a long stream of envelopes, so
    // the kills land before, during and after commits.
    let sender = tokio::spawn(async move {
        for chunk in events.chunks(50) {
            client.send(chunk).await?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok::<_, beacon_sdk::SdkError>(())
    });

    let mut rng = rand::rng();
    let mut kills_while_sending = 0;
    let mut kills = 0;
    while !sender.is_finished() || kills < 3 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1200))).await;
        if !sender.is_finished() {
            kills_while_sending += 1;
        }
        if let Some(ingest) = cluster.ingest.as_mut() {
            ingest.kill_hard();
        }
        kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        cluster.start_ingest();
    }
    sender
        .await
        .expect("join")
        .expect("every batch acknowledged");
    assert!(
        kills_while_sending >= 2,
        "the ingester must be killed while events flow ({kills_while_sending})"
    );

    let c = &cluster;
    wait_for(Duration::from_secs(120), "all events ingested", || {
        (c.count("SELECT count(*) FROM raw_events") >= total as i64).then_some(())
    });
    // One more restart after everything landed: a replay must add nothing.
    cluster.ingest.as_mut().expect("ingest").kill_hard();
    cluster.start_ingest();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let rows = cluster.count("SELECT count(*) FROM raw_events");
    let distinct = cluster.count("SELECT count(DISTINCT event_id) FROM raw_events");
    let events_rows = cluster.count("SELECT count(*) FROM events");
    assert_eq!(
        distinct, total as i64,
        "every event id present ({kills} kills)"
    );
    assert_eq!(
        rows, total as i64,
        "no duplicates in raw_events ({kills} kills)"
    );
    assert_eq!(events_rows, total as i64, "no duplicates in events");
    let dup = cluster.count(
        "SELECT count(*) FROM (SELECT event_id FROM raw_events GROUP BY event_id HAVING count(*) > 1)",
    );
    assert_eq!(dup, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_retrying_a_batch_with_its_id_stores_it_once() {
    let cluster = Cluster::start(false);
    let (id, key) = cluster.merchant("retrying-shop");
    let events = beacon::demo::generate(
        8,
        "retry.example",
        300,
        beacon_edge::now_ms() - 60_000,
        60_000,
        50,
    );
    let batch_id = beacon_sdk::new_batch_id();
    let first = cluster.client(&key).await.expect("connect");
    let a = first
        .send_batch(&batch_id, &events)
        .await
        .expect("first send");
    // The answer was "lost": the client reconnects and sends the same batch again.
    first.close().await;
    let second = cluster.client(&key).await.expect("reconnect");
    let b = second.send_batch(&batch_id, &events).await.expect("retry");
    assert_eq!(a.batch_id, b.batch_id);
    // A different batch afterwards proves ingest has moved past the retry (a new event:
    // one of the batch's again would be left out as a duplicate).
    let mut marker = events[0].clone();
    marker.event_id = format!("{batch_id}-marker");
    second.send(&[marker]).await.expect("marker");

    let c = &cluster;
    wait_for(Duration::from_secs(60), "marker ingested", || {
        (c.count(&format!(
            "SELECT count(*) FROM raw_events WHERE merchant_id = '{id}'"
        )) >= 301)
            .then_some(())
    });
    assert_eq!(
        c.count(&format!(
            "SELECT count(*) FROM raw_events WHERE merchant_id = '{id}'"
        )),
        301
    );
}

/// A commit whose catalog answer is lost (`WarehouseError::CommitUnknown`): ingest keeps the
/// files of a commit that landed, since the table references them, and re-does one that did
/// not; a lost reply whose re-read answers counts as committed. Either way every event is
/// stored once and every file the tables reference can be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_commits_whose_answer_is_lost_store_every_event_once() {
    let mut cluster = Cluster::start(false);
    let (_, key) = cluster.merchant("lost-answers");
    let client = cluster.client(&key).await.expect("connect");
    let now = beacon_edge::now_ms();
    let mut total = 0;
    for (round, fault) in ["reply-lost", "unanswered", "reply-lost-reread"]
        .into_iter()
        .enumerate()
    {
        if let Some(mut old) = cluster.ingest.take() {
            old.terminate();
        }
        // The fault hits the first catalog swap of this ingester.
        cluster.start_ingest_env(
            &["--ingest-max-wait-ms", "200", "--ingest-max-batch", "100"],
            &[("BEACON_FAULT_REPLACE", fault)],
        );
        let events = beacon::demo::generate(
            100 + round as u64,
            "lost.example",
            500,
            now - 3_600_000,
            3_600_000,
            100,
        );
        for chunk in events.chunks(100) {
            client.send(chunk).await.expect("acknowledged");
        }
        total += events.len() as i64;
        let c = &cluster;
        // Distinct ids make the scan open every referenced file (a plain count may be
        // answered from the manifests' statistics).
        wait_for(
            Duration::from_secs(90),
            &format!("{fault}: {total} events once"),
            || {
                let q = |t: &str| {
                    c.sql(&format!(
                        "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM {t}"
                    ))
                };
                let (raw, ev) = (q("raw_events"), q("events"));
                let pair = |r: &[serde_json::Value]| (r[0]["n"].as_i64(), r[0]["d"].as_i64());
                (pair(&raw) == (Some(total), Some(total))
                    && pair(&ev) == (Some(total), Some(total)))
                    .then_some(())
            },
        );
        let log = cluster.log("ingest");
        let unknown = log.contains("it may have landed");
        assert_eq!(
            unknown,
            fault != "reply-lost-reread",
            "{fault}: the commit's outcome reported unknown: {unknown}\n{log}"
        );
    }
    // A restart replays from the watermarks: nothing is added twice.
    if let Some(mut old) = cluster.ingest.take() {
        old.terminate();
    }
    cluster.start_ingest();
    let c = &cluster;
    wait_for(
        Duration::from_secs(30),
        "ingest caught up after restart",
        || (c.count("SELECT count(DISTINCT event_id) FROM raw_events") == total).then_some(()),
    );
    assert_eq!(cluster.count("SELECT count(*) FROM raw_events"), total);
}
