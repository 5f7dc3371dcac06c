//! Nearest edge and failover: two edges in different regions register themselves; `locate`
//! (HTTP and RSocket) orders them by the caller's region; an SDK sending 100k events with
//! acknowledgements loses its edge (SIGKILL) mid-stream, fails over to the other, and
//! every event is stored exactly once.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use beacon_proto::bus::Location;
use beacon_sdk::{EdgeTarget, FailoverClient};
use common::{http_with, wait_for, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locate_orders_by_region_and_failover_loses_and_duplicates_nothing() {
    let cluster = Cluster::start_with_edge(false, &["--region", "eu-west", "--edge-id", "eu-1"]);
    let (mut us, us_endpoints) = cluster.spawn_edge_with("us-1", &["--region", "us-east"]);
    let (merchant, key) = cluster.merchant("global-shop");
    let eu_endpoints = cluster.endpoints.clone();
    let eu_http = eu_endpoints.edge_http.clone().expect("http");

    // Both edges report themselves; a caller in Germany gets Ireland first, one in
    // Virginia gets Virginia first, whichever edge it asks.
    let located = |region: &str| -> Location {
        let r = http_with(
            &eu_http,
            "GET",
            &format!("/locate?region={region}"),
            &[],
            b"",
        );
        assert_eq!(r.status, 200, "{}", r.body);
        serde_json::from_str(&r.body).expect("location JSON")
    };
    let both = wait_for(Duration::from_secs(20), "both edges registered", || {
        let l = located("eu-central");
        (l.edges.len() == 2).then_some(l)
    });
    assert_eq!(both.edges[0].edge_id, "eu-1");
    assert_eq!(both.edges[0].quic, eu_endpoints.edge_quic.clone().unwrap());
    assert!(both.edges[0].http.is_some());
    assert_eq!(located("us-east").edges[0].edge_id, "us-1");
    let via_rsocket = cluster
        .client(&key)
        .await
        .expect("connect")
        .locate(Some("us-west"))
        .await
        .expect("locate over RSocket");
    assert_eq!(via_rsocket.region.as_deref(), Some("us-west"));
    assert_eq!(via_rsocket.edges[0].edge_id, "us-1");
    assert_eq!(via_rsocket.edges[1].edge_id, "eu-1");

    // An SDK in the US: nearest (us-1) first, eu-1 as fallback.
    let ca = |e: &beacon::endpoints::Endpoints| {
        std::fs::read(e.edge_ca_cert.as_ref().expect("ca")).expect("ca pem")
    };
    let targets = vec![
        EdgeTarget {
            addr: us_endpoints.edge_quic.clone().unwrap().parse().unwrap(),
            ca_pem: ca(&us_endpoints),
        },
        EdgeTarget {
            addr: eu_endpoints.edge_quic.clone().unwrap().parse().unwrap(),
            ca_pem: ca(&eu_endpoints),
        },
    ];
    let client = Arc::new(FailoverClient::new(targets.clone(), key.clone()));
    let total = 100_000;
    let now = beacon_edge::now_ms();
    let events = Arc::new(beacon::demo::generate(
        11,
        "global.example",
        total,
        now - 3_600_000,
        3_600_000,
        5_000,
    ));
    // Four senders, each with its own batches of 250 in flight one at a time.
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    for part in 0..4 {
        let (client, events, acked) = (client.clone(), events.clone(), acked.clone());
        senders.push(tokio::spawn(async move {
            for chunk in events.chunks(250).skip(part).step_by(4) {
                let r = client.send(chunk).await?;
                assert_eq!(r.accepted, chunk.len());
                acked.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
            }
            Ok::<_, beacon_sdk::SdkError>(())
        }));
    }
    // Kill the edge in use once a quarter is acknowledged.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(std::sync::atomic::Ordering::Relaxed) < total / 4 {
        assert!(Instant::now() < deadline, "sending stalled before the kill");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(client.current_edge().await, Some(targets[0].addr));
    let acked_at_kill = acked.load(std::sync::atomic::Ordering::Relaxed);
    let killed_at = Instant::now();
    us.kill_hard();
    for s in senders {
        s.await.expect("join").expect("every batch acknowledged");
    }
    assert!(
        acked_at_kill < total,
        "the kill must land while events flow"
    );
    assert_eq!(client.current_edge().await, Some(targets[1].addr));
    assert!(client.failovers() >= 1);
    eprintln!(
        "failover: killed at {acked_at_kill} acked events; the rest took {:?}",
        killed_at.elapsed()
    );

    let c = &cluster;
    wait_for(Duration::from_secs(120), "all events ingested", || {
        (c.count(&format!(
            "SELECT count(*) FROM raw_events WHERE merchant_id = '{merchant}'"
        )) >= total as i64)
            .then_some(())
    });
    // Give a straggling duplicate the chance to land before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rows = c.count(&format!(
        "SELECT count(*) FROM raw_events WHERE merchant_id = '{merchant}'"
    ));
    let distinct = c.count(&format!(
        "SELECT count(DISTINCT event_id) FROM raw_events WHERE merchant_id = '{merchant}'"
    ));
    assert_eq!(distinct, total as i64, "lost events");
    assert_eq!(rows, total as i64, "duplicated events");
}
