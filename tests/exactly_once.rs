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
    // A different batch afterwards proves ingest has moved past the retry.
    second.send(&events[..1]).await.expect("marker");

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
