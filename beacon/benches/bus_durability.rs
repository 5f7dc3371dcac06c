//! What fsync-before-acknowledge costs on the bus: batch-sized messages published with 64
//! acknowledgements in flight to a leaf's single-replica stream (where an edge makes events
//! durable) and to the hub's 3-replica stream, with `sync_interval: always` and with
//! nats-server's default of 2 minutes, each on a topology that `beacon topology` generates
//! (3 hub nodes and a leaf on this machine's loopback). The default is the baseline of the
//! same run. `cargo bench -p beacon --bench bus_durability` (BEACON_BENCH_MESSAGES, default
//! 3000; BEACON_BENCH_MESSAGE_KIB, default 16: about 60 events).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use beacon::topology::{Topology, HUB_DOMAIN};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Messages per second through `js` into a new stream of `replicas` on `subject`.
async fn publish_rate(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    messages: usize,
    payload: &bytes::Bytes,
) -> f64 {
    let subject = format!("bench.{}", name.to_lowercase());
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec![subject.clone()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .expect("stream");
    let started = Instant::now();
    let mut in_flight = VecDeque::new();
    for _ in 0..messages {
        if in_flight.len() == 64 {
            let ack: jetstream::context::PublishAckFuture =
                in_flight.pop_front().expect("in flight");
            ack.await.expect("acknowledged");
        }
        in_flight.push_back(
            js.publish(subject.clone(), payload.clone())
                .await
                .expect("published"),
        );
    }
    for ack in in_flight {
        ack.await.expect("acknowledged");
    }
    messages as f64 / started.elapsed().as_secs_f64()
}

async fn wait_jetstream(js: &jetstream::Context) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while js.query_account().await.is_err() {
        assert!(Instant::now() < deadline, "JetStream did not answer");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// (leaf R1, hub R3) messages per second with `sync`.
async fn run(sync: &str, messages: usize, payload: &bytes::Bytes) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("dir");
    let t = Topology::plan(dir.path(), 3, &["eu".into()], sync).expect("plan");
    t.write(dir.path()).expect("write");
    let mut servers: Vec<_> = t.hub.iter().map(|n| n.start().expect("hub")).collect();
    servers.push(t.regions[0].start().expect("leaf"));
    let hub_client = beacon_proto::bus::options_with_ca(&t.hub_url(), t.client_ca().as_deref())
        .connect(beacon_proto::bus::servers(&t.hub_url()))
        .await
        .expect("hub");
    let leaf_client = beacon_proto::bus::options_with_ca(
        &t.leaf_url("eu").expect("leaf url"),
        t.client_ca().as_deref(),
    )
    .connect(t.leaf_url("eu").expect("leaf url"))
    .await
    .expect("leaf");
    let hub = jetstream::new(hub_client);
    let local = jetstream::new(leaf_client.clone());
    wait_jetstream(&hub).await;
    wait_jetstream(&jetstream::with_domain(leaf_client, HUB_DOMAIN)).await;
    let r1 = publish_rate(&local, "LEAF", 1, messages, payload).await;
    let r3 = publish_rate(&hub, "HUB", 3, messages, payload).await;
    drop(servers);
    (r1, r3)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let messages = env_usize("BEACON_BENCH_MESSAGES", 3000);
    let kib = env_usize("BEACON_BENCH_MESSAGE_KIB", 16);
    let payload = bytes::Bytes::from(vec![b'x'; kib << 10]);
    println!("{messages} messages of {kib} KiB, 64 acknowledgements in flight, one publisher");
    let (base_r1, base_r3) = run("2m", messages, &payload).await;
    let (sync_r1, sync_r3) = run("always", messages, &payload).await;
    println!("| stream | sync_interval 2m (default) msg/s | always msg/s | always / default |");
    println!("|---|---|---|---|");
    println!(
        "| leaf, 1 replica | {base_r1:.0} | {sync_r1:.0} | {:.2} |",
        sync_r1 / base_r1
    );
    println!(
        "| hub, 3 replicas | {base_r3:.0} | {sync_r3:.0} | {:.2} |",
        sync_r3 / base_r3
    );
}
