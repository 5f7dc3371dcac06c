//! Fault 7 of issue 17 on the shared warehouse: its object store and then its catalog
//! database stopped while events keep coming. Collection must not notice (the edge
//! acknowledges from the bus), ingest must say it is not ready while it cannot commit, and
//! once each server is back the backlog must drain with every acknowledged id exactly once,
//! without restarting any Beacon process.
//!
//! Each outage lasts until ingest has reported itself not ready and `BEACON_OUTAGE_EVENTS`
//! events (default 5,000, about 10 s at the test's ~500 events/s) have been acknowledged
//! meanwhile; the 10 minutes is `BEACON_OUTAGE_EVENTS=300000`, run on demand.

#[path = "common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::servers::{Postgres, S3Server};
use common::{
    env_usize, first_int, http, sql_in, wait_for, wait_stored_once, Cluster, PacedSender,
};

const BUCKET: &str = "beacon";

fn count(c: &Cluster, sql: &str) -> i64 {
    first_int(&sql_in(c.data_dir(), sql))
}

fn ready(c: &Cluster, role: &str) -> bool {
    http(&c.status_url(role), "GET", "/readyz", None, b"").0 == 200
}

/// Holds an outage until ingest says it cannot commit and `events` more have been
/// acknowledged (collection goes on); returns how long ingest took to say so.
fn hold(c: &Cluster, events: usize, acked: &AtomicUsize) -> Duration {
    let start = Instant::now();
    let before = acked.load(Ordering::Relaxed);
    // Ready means "can commit": a commit that fails, or hangs for 10 s, says otherwise.
    wait_for(Duration::from_secs(120), "ingest not ready", || {
        (!ready(c, "ingest")).then_some(())
    });
    let unready = start.elapsed();
    wait_for(
        Duration::from_secs(events as u64),
        "events acknowledged during the outage",
        || (acked.load(Ordering::Relaxed) - before >= events).then_some(()),
    );
    unready
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_goes_on_and_the_backlog_drains_when_the_warehouse_servers_stop() {
    let outage = env_usize("BEACON_OUTAGE_EVENTS", 5_000);
    let mut pg = Postgres::start();
    let mut s3 = S3Server::start(BUCKET);
    common::servers::use_shared_warehouse(&pg, &s3, BUCKET);

    let cluster = Cluster::start(true);
    let merchants: Vec<(String, String)> = (0..2)
        .map(|i| cluster.merchant(&format!("outage-{i}")))
        .collect();
    let now = beacon_edge::now_ms();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for (i, (_, key)) in merchants.iter().enumerate() {
        let client = cluster.client(key).await.expect("connect");
        // ~500 events/s in all.
        let sender = PacedSender {
            seed: (i as u64 + 1) * 10_000_000,
            host: format!("outage{i}.example"),
            batch: 25,
            pace: Duration::from_millis(100),
            max_batches: u64::MAX,
            visitors: 100,
            now_ms: now,
        };
        senders.push(sender.spawn(client, stop.clone(), acked.clone()));
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
        let during_from = acked.load(Ordering::Relaxed);
        let unready = hold(&cluster, outage, &acked);
        let during = acked.load(Ordering::Relaxed) - during_from;
        assert!(
            during >= outage,
            "collection stalled while the {server} was down"
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
            "{server} down: {during} events acknowledged meanwhile; ingest not ready after {unready:.1?}; backlog stored {drained:.1?} after it returned"
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let mut longest = Duration::ZERO;
    for s in senders {
        let end = s.await.expect("sender").expect("every batch acknowledged");
        longest = longest.max(end.longest);
    }
    let sent = acked.load(Ordering::Relaxed) as i64;
    wait_stored_once(cluster.data_dir(), sent, Duration::from_secs(180));
    for line in &report {
        eprintln!("{line}");
    }
    eprintln!(
        "{sent} sent and acknowledged, {sent} stored once; longest wait for an ack {longest:.3?}"
    );
}
