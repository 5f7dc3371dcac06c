//! Fault 7 of issue 17 on the shared warehouse: its object store and then its catalog
//! database stopped while events keep coming. Collection must not notice (the edge
//! acknowledges from the bus), ingest must say it is not ready while it cannot commit, and
//! once each server is back the backlog must drain with every acknowledged id exactly once,
//! without restarting any Beacon process.
//!
//! Each outage lasts `BEACON_OUTAGE_SECS` (default 15; the 10 minutes is
//! `BEACON_OUTAGE_SECS=600`, run on demand).

#[path = "common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::servers::{Postgres, S3Server};
use common::{env_usize, first_int, http, sql_in, wait_for, Cluster};

const BUCKET: &str = "beacon";

fn count(c: &Cluster, sql: &str) -> i64 {
    first_int(&sql_in(c.data_dir(), sql))
}

fn ready(c: &Cluster, role: &str) -> bool {
    http(&c.status_url(role), "GET", "/readyz", None, b"").0 == 200
}

/// Holds an outage for `secs` while the senders go on; returns (acknowledged during it,
/// whether ingest reported itself not ready at some point, after how long).
async fn hold(c: &Cluster, secs: u64, acked: &AtomicUsize) -> (usize, Option<Duration>) {
    let start = Instant::now();
    let before = acked.load(Ordering::Relaxed);
    let mut unready = None;
    // The fault's length is the test's parameter: the clock, not a state, ends it.
    while start.elapsed() < Duration::from_secs(secs) {
        if unready.is_none() && !ready(c, "ingest") {
            unready = Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    (acked.load(Ordering::Relaxed) - before, unready)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_goes_on_and_the_backlog_drains_when_the_warehouse_servers_stop() {
    let outage = env_usize("BEACON_OUTAGE_SECS", 15) as u64;
    let mut pg = Postgres::start();
    let mut s3 = S3Server::start(BUCKET);
    std::env::set_var("BEACON_CATALOG_URI", &pg.url);
    std::env::set_var("BEACON_WAREHOUSE_URI", format!("s3://{BUCKET}/warehouse"));
    std::env::set_var("BEACON_S3_ENDPOINT", &s3.endpoint);
    std::env::set_var("AWS_ACCESS_KEY_ID", s3.access_key);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", s3.secret_key);

    let cluster = Cluster::start(true);
    let merchants: Vec<(String, String)> = (0..2)
        .map(|i| cluster.merchant(&format!("outage-{i}")))
        .collect();
    let now = beacon_edge::now_ms();
    const BATCH: usize = 25;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for (i, (_, key)) in merchants.iter().enumerate() {
        let client = cluster.client(key).await.expect("connect");
        let (stop, acked) = (stop.clone(), acked.clone());
        senders.push(tokio::spawn(async move {
            // ~500 events/s in all (the rate, not the outcome, is set by the clock).
            let mut pace = tokio::time::interval(Duration::from_millis(100));
            let mut longest = Duration::ZERO;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                let batch = beacon::demo::generate(
                    (i as u64 + 1) * 10_000_000 + n,
                    &format!("outage{i}.example"),
                    BATCH,
                    now - 3_600_000,
                    3_600_000,
                    100,
                );
                let sent = Instant::now();
                client.send(&batch).await?;
                longest = longest.max(sent.elapsed());
                acked.fetch_add(batch.len(), Ordering::Relaxed);
                n += 1;
            }
            Ok::<_, beacon_sdk::SdkError>(longest)
        }));
    }
    wait_for(Duration::from_secs(60), "ingest under way", || {
        (count(&cluster, "SELECT count(*) FROM raw_events") > 0).then_some(())
    });

    let mut report = Vec::new();
    for server in [
        "object store (s3s-fs killed)",
        "catalog (PostgreSQL stopped)",
    ] {
        if server.starts_with("object") {
            s3.kill();
        } else {
            pg.stop_now();
        }
        let (during, unready) = hold(&cluster, outage, &acked).await;
        assert!(
            during > 0,
            "nothing was acknowledged while the {server} was down"
        );
        // Ready means "can commit": a commit that hangs for 10 s (or fails) says otherwise.
        assert!(
            unready.is_some(),
            "ingest stayed ready through {outage} s without its {server}"
        );
        if server.starts_with("object") {
            s3.start_again();
        } else {
            pg.start_again();
        }
        let back = Instant::now();
        let target = acked.load(Ordering::Relaxed) as i64;
        wait_for(Duration::from_secs(180), "the backlog stored", || {
            (count(&cluster, "SELECT count(*) FROM raw_events") >= target).then_some(())
        });
        let drained = back.elapsed();
        wait_for(Duration::from_secs(60), "ingest ready again", || {
            ready(&cluster, "ingest").then_some(())
        });
        report.push(format!(
            "{server} for {outage} s: {during} events acknowledged meanwhile; ingest not ready after {unready:?}; backlog stored {drained:.1?} after it returned"
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let mut longest = Duration::ZERO;
    for s in senders {
        longest = longest.max(s.await.expect("sender").expect("every batch acknowledged"));
    }
    let sent = acked.load(Ordering::Relaxed) as i64;
    wait_for(Duration::from_secs(180), "every event stored", || {
        (count(&cluster, "SELECT count(*) FROM raw_events") == sent).then_some(())
    });
    assert_eq!(
        count(&cluster, "SELECT count(DISTINCT event_id) FROM raw_events"),
        sent
    );
    wait_for(Duration::from_secs(180), "every event processed", || {
        (count(&cluster, "SELECT count(*) FROM events") == sent).then_some(())
    });
    assert_eq!(
        count(&cluster, "SELECT count(DISTINCT event_id) FROM events"),
        sent
    );
    wait_for(Duration::from_secs(180), "every event rolled up", || {
        (count(&cluster, "SELECT coalesce(sum(events), 0) FROM rollups") == sent).then_some(())
    });
    for line in &report {
        eprintln!("{line}");
    }
    eprintln!(
        "{sent} sent and acknowledged, {sent} stored once; longest wait for an ack {longest:.3?}"
    );
}
