//! Ingest scaled out: the events stream split into 4 partitions shared by 3 ingest
//! processes on one warehouse. Under load, one process is killed with -9 (its partitions are
//! taken over when its leases expire) and another is frozen with SIGSTOP until it has lost
//! its partitions, then thawed mid-batch (its commits must fail, not write a second copy).
//! At the end every acknowledged event id is in `raw_events` and `events` exactly once and
//! the rollups, which aggregate up to the lowest partition's watermark, count them all.

#[path = "common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{http, metric, wait_for, Cluster, PacedSender, Role};

const PARTITIONS: &str = "4";

fn spawn_ingester(cluster: &Cluster, name: &'static str) -> Role {
    cluster.spawn(
        name,
        &[
            "ingest",
            "--partitions",
            PARTITIONS,
            "--ingest-id",
            name,
            "--ingest-max-wait-ms",
            "200",
            "--ingest-max-batch",
            "50",
        ],
    )
}

/// Partitions `name` holds, from its metrics (`None` until it answers). Only for a
/// process that runs (a frozen one would hold the request up).
fn held(cluster: &Cluster, name: &str) -> Option<f64> {
    let (status, body) = http(&cluster.status_url(name), "GET", "/metrics", None, b"");
    (status == 200 && body.contains("beacon_ingest_partitions_held"))
        .then(|| metric(&body, "beacon_ingest_partitions_held"))
}

fn signal(role: &Role, sig: libc::c_int) {
    // SAFETY: a signal to a child process we started and still own.
    unsafe { libc::kill(role.child.id() as i32, sig) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_shared_by_several_ingesters_survive_kills_and_pauses_exactly_once() {
    let mut cluster = Cluster::start(true);
    // The single ingester of a fresh cluster goes: three take over, partitioned.
    if let Some(mut first) = cluster.ingest.take() {
        first.terminate();
    }
    let mut a = spawn_ingester(&cluster, "ingest-a");
    let b = spawn_ingester(&cluster, "ingest-b");
    let c = spawn_ingester(&cluster, "ingest-c");
    // An even split in name order: 4 partitions over 3 processes are 2, 1 and 1.
    let shares = |c: &Cluster| -> Vec<f64> {
        ["ingest-a", "ingest-b", "ingest-c"]
            .iter()
            .map(|n| held(c, n).unwrap_or(0.0))
            .collect()
    };
    wait_for(Duration::from_secs(60), "partitions spread", || {
        (shares(&cluster) == [2.0, 1.0, 1.0]).then_some(())
    });

    // Eight merchants, so every partition gets traffic (the mapping is nats-server's hash).
    let merchants: Vec<(String, String)> = (0..8)
        .map(|i| cluster.merchant(&format!("shop-{i}")))
        .collect();
    let now = beacon_edge::now_ms();
    // Senders go on until the faults are over; they count what was acknowledged.
    // Events are made a batch at a time (ids `e-<seed>-<n>`, a seed per batch), up to a
    // bound far above what the faults take; how many were acknowledged while the faults were
    // under way is counted, not assumed.
    const BATCH: usize = 25;
    const MAX_BATCHES: u64 = 4_000;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for (i, (_, key)) in merchants.iter().enumerate() {
        let client = cluster.client(key).await.expect("connect");
        let sender = PacedSender {
            seed: (i as u64 + 1) * 1_000_000,
            host: format!("shop{i}.example"),
            batch: BATCH,
            pace: Duration::from_millis(50),
            max_batches: MAX_BATCHES,
            visitors: 300,
            now_ms: now,
        };
        senders.push(sender.spawn(client, stop.clone(), acked.clone()));
    }

    // Some events in, then kill -9 a: its partitions wait out their leases and move.
    let c2 = &cluster;
    wait_for(Duration::from_secs(60), "ingest under way", || {
        (c2.count("SELECT count(*) FROM raw_events") > 2_000).then_some(())
    });
    a.kill_hard();
    let killed = Instant::now();
    let acked_at_kill = acked.load(Ordering::Relaxed);
    wait_for(Duration::from_secs(60), "a's partitions taken over", || {
        let sum = held(c2, "ingest-b").unwrap_or(0.0) + held(c2, "ingest-c").unwrap_or(0.0);
        (sum == 4.0).then_some(())
    });
    let after_kill = killed.elapsed();

    // Freeze b past its leases: c takes everything; then thaw b, which wakes up holding
    // batches and leases it no longer has.
    let before_freeze = cluster.count("SELECT count(*) FROM raw_events");
    signal(&b, libc::SIGSTOP);
    let frozen = Instant::now();
    wait_for(Duration::from_secs(60), "b's partitions taken over", || {
        (held(c2, "ingest-c") == Some(4.0)).then_some(())
    });
    let after_freeze = frozen.elapsed();
    wait_for(Duration::from_secs(60), "ingest goes on without b", || {
        (c2.count("SELECT count(*) FROM raw_events") > before_freeze).then_some(())
    });
    signal(&b, libc::SIGCONT);
    // a comes back (a new process under the same name) and gets a share again.
    let a = spawn_ingester(&cluster, "ingest-a");
    let rejoined = Instant::now();
    let settled = cluster.count("SELECT count(*) FROM raw_events");
    wait_for(Duration::from_secs(60), "shares after the faults", || {
        (shares(c2) == [2.0, 1.0, 1.0]).then_some(())
    });
    let rebalanced = rejoined.elapsed();
    wait_for(
        Duration::from_secs(60),
        "ingest goes on after the faults",
        || (c2.count("SELECT count(*) FROM raw_events") > settled).then_some(()),
    );

    let acked_after_faults = acked.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        let end = s.await.expect("join").expect("every batch acknowledged");
        assert!(
            end.stopped,
            "the senders ran out before the faults were over"
        );
    }
    assert!(
        acked_after_faults > acked_at_kill,
        "events were acknowledged while the faults were under way"
    );
    let total = acked.load(Ordering::Relaxed) as i64;
    eprintln!(
        "scale-out: {total} events acknowledged; a's partitions owned again {:.1} s after its \
         kill -9, b's {:.1} s after SIGSTOP; even split again {:.1} s after a restarted",
        after_kill.as_secs_f64(),
        after_freeze.as_secs_f64(),
        rebalanced.as_secs_f64()
    );
    wait_for(Duration::from_secs(120), "all events ingested", || {
        (c2.count("SELECT count(*) FROM raw_events") >= total).then_some(())
    });
    let rows = cluster.count("SELECT count(*) FROM raw_events");
    let distinct = cluster.count("SELECT count(DISTINCT event_id) FROM raw_events");
    assert_eq!(distinct, total, "every acknowledged event id is stored");
    assert_eq!(rows, total, "none twice in raw_events");
    assert_eq!(
        cluster.count("SELECT count(*) FROM events"),
        total,
        "none twice in events"
    );
    assert_eq!(
        cluster.count("SELECT count(DISTINCT event_id) FROM events"),
        total
    );
    // Every partition's watermark moved, and the rollups caught up across all of them.
    cluster.wait_rolled_up(total, Duration::from_secs(90));

    let b_log = cluster.log("ingest-b");
    assert!(
        b_log.contains("lost the lease") || b_log.contains("committed by another writer"),
        "b noticed it had lost its partitions:\n{b_log}"
    );
    // The stream really is split: several partitions' consumers acknowledged messages (which
    // partition a merchant lands in is nats-server's hash of its random id, so one of the
    // four may have had no traffic; the rollups above caught up past it all the same).
    let client = async_nats::connect(cluster.nats.url()).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(beacon_proto::bus::EVENTS_STREAM)
        .await
        .expect("stream");
    let current = beacon_proto::stores::current_ingest_consumers(&stream)
        .await
        .expect("consumers");
    let mut busy = 0;
    for index in 0..4 {
        let partition = beacon_proto::bus::Partition { index, count: 4 };
        let names = beacon_proto::stores::ingest_consumer_names(&stream, partition)
            .await
            .expect("consumers");
        // Every takeover removed its predecessor's consumer.
        assert_eq!(names.len(), 1, "partition {index}: {names:?}");
        let info = current.get(&index).expect("a consumer");
        assert_eq!(
            info.num_pending + info.num_ack_pending as u64,
            0,
            "{}",
            info.name
        );
        busy += usize::from(info.ack_floor.stream_sequence > 0);
    }
    assert!(busy >= 2, "only {busy} partitions had traffic");
    for name in ["ingest-a", "ingest-b", "ingest-c"] {
        for line in cluster
            .log(name)
            .lines()
            .filter(|l| l.contains("partition") && !l.contains("DEBUG") || l.contains("ERROR"))
        {
            eprintln!("{name}: {line}");
        }
    }
    drop((a, b, c));
}
