//! Bad input gets a clear error, only the offender is affected, and nothing is lost.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use beacon_proto::wire;
use beacon_sdk::SdkError;
use bytes::{BufMut, Bytes, BytesMut};
use common::{wait_for, Cluster};

fn events(seed: u64, n: usize) -> Vec<beacon_proto::Event> {
    let now = beacon_edge::now_ms();
    beacon::demo::generate(seed, "shop.example", n, now - 600_000, 600_000, 50)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_write_key_is_rejected_at_setup() {
    let cluster = Cluster::start(false);
    match cluster.client("bk_not_a_real_key").await {
        Err(SdkError::Rejected(msg)) => assert!(msg.contains("unknown write key"), "{msg}"),
        Err(other) => panic!("expected a SETUP rejection, got {other}"),
        Ok(_) => panic!("a bad key must be refused"),
    }
    // The edge keeps serving good keys.
    let (_, key) = cluster.merchant("good");
    let client = cluster.client(&key).await.expect("good key connects");
    let ack = client.send(&events(1, 10)).await.expect("send");
    assert_eq!(ack.accepted, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_frames_close_only_that_connection() {
    let cluster = Cluster::start(false);
    let (_, key) = cluster.merchant("m");
    let bystander = cluster.client(&key).await.expect("connect");

    // A frame announcing 8 MiB (limit 1 MiB).
    let big = cluster.client(&key).await.expect("connect");
    big.send_raw(&[0x80, 0x00, 0x00, 0, 0, 0, 1])
        .await
        .expect("write");
    let err = big
        .send(&events(2, 1))
        .await
        .expect_err("connection must be closed");
    assert!(
        matches!(&err, SdkError::Remote { code, message } if *code == wire::ERR_CONN_FAILED && message.contains("exceeds the limit"))
            || matches!(err, SdkError::ConnectionLost(_)),
        "{err}"
    );

    // An unknown frame type (0x3F) and a metadata length past the frame end.
    for bad in [vec![0u8, 0, 0, 1, 0xFC, 0x00], {
        let mut b = vec![0u8, 0, 0, 1];
        b.extend_from_slice(&((0x04u16 << 10) | 0x100).to_be_bytes());
        b.extend_from_slice(&[0x00, 0xFF, 0xFF, 1, 2]);
        b
    }] {
        let c = cluster.client(&key).await.expect("connect");
        let mut framed = BytesMut::new();
        framed.put_uint(bad.len() as u64, 3);
        framed.extend_from_slice(&bad);
        c.send_raw(&framed).await.expect("write");
        let err = c.send(&events(3, 1)).await.expect_err("closed");
        assert!(
            matches!(err, SdkError::Remote { .. } | SdkError::ConnectionLost(_)),
            "{err}"
        );
    }

    // Malformed JSON in a well-formed frame: an error for that request only.
    let c = cluster.client(&key).await.expect("connect");
    match c
        .request(Bytes::from_static(b"{\"events\": [ this is not json"))
        .await
    {
        Err(SdkError::Remote { code, message }) => {
            assert_eq!(code, wire::ERR_INVALID);
            assert!(message.contains("not valid JSON"), "{message}");
        }
        other => panic!("expected INVALID, got {other:?}"),
    }
    let ack = c
        .send(&events(4, 5))
        .await
        .expect("same connection still works");
    assert_eq!(ack.accepted, 5);

    // The same for a packed batch whose string reference points past its strings: the
    // header is fine, the first event is not.
    let mut packed = wire::encode_batch(&events(6, 2), wire::BatchEncoding::Packed).to_vec();
    packed[20 + 7] = 0xff;
    match c.request(Bytes::from(packed)).await {
        Err(SdkError::Remote { code, message }) => {
            assert_eq!(code, wire::ERR_INVALID);
            assert!(
                message.contains("packed batch: string out of bounds"),
                "{message}"
            );
        }
        other => panic!("expected INVALID, got {other:?}"),
    }
    // A client that still sends JSON batches is served beside packed ones.
    let json = common::client_encoding(&cluster.endpoints, &key, wire::BatchEncoding::Json)
        .await
        .expect("connect");
    assert_eq!(
        json.send(&events(7, 3)).await.expect("json batch").accepted,
        3
    );
    assert_eq!(
        c.send(&events(8, 4)).await.expect("packed batch").accepted,
        4
    );

    // The bystander never noticed.
    let ack = bystander.send(&events(5, 20)).await.expect("bystander");
    assert_eq!(ack.accepted, 20);

    // The undecodable payload is kept in failed_events with its reason.
    let cl = &cluster;
    wait_for(Duration::from_secs(60), "decode failure recorded", || {
        (cl.count("SELECT count(*) FROM failed_events WHERE stage = 'decode' AND payload LIKE '%this is not json%'") == 1)
            .then_some(())
    });
    // The packed one as hex ("BPB1" is 42504231), with its reason.
    wait_for(
        Duration::from_secs(60),
        "packed decode failure recorded",
        || {
            (cl.count("SELECT count(*) FROM failed_events WHERE stage = 'decode' AND payload LIKE 'hex:42504231%' AND reason LIKE '%string out of bounds%'") == 1)
            .then_some(())
        },
    );
    // Every good batch stored: 5 + 20 + 3 + 4.
    wait_for(Duration::from_secs(60), "good batches stored", || {
        (cl.count("SELECT count(*) FROM raw_events") == 32).then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_are_stopped_and_other_merchants_keep_flowing() {
    let cluster = Cluster::start(false);
    let (looper, loop_key) = cluster.merchant("looper");
    let (hog, hog_key) = cluster.merchant("hog");
    let (fine, fine_key) = cluster.merchant("fine");
    cluster.attach(&looper, "beacon_plugin_hostile", "loop");
    cluster.attach(&hog, "beacon_plugin_hostile", "alloc");
    cluster.attach(&fine, "beacon_plugin_utm", "");

    let fine_client = cluster.client(&fine_key).await.expect("connect");
    let loop_client = cluster.client(&loop_key).await.expect("connect");
    let hog_client = cluster.client(&hog_key).await.expect("connect");

    let fine_events = events(10, 2000);
    let (loop_events, hog_events) = (events(11, 50), events(12, 50));
    let (l, h, f) = tokio::join!(
        loop_client.send(&loop_events),
        hog_client.send(&hog_events),
        beacon::demo::send_all(
            std::sync::Arc::new(fine_client),
            fine_events.clone(),
            200,
            2
        ),
    );
    let l = l.expect("loop batch is durable even though its plugin failed");
    let h = h.expect("hog batch is durable even though its plugin failed");
    f.expect("other merchant unaffected");
    let le = l.plugin_error.expect("loop reported");
    assert!(le.contains("CPU budget") || le.contains("deadline"), "{le}");
    let he = h.plugin_error.expect("alloc reported");
    assert!(he.contains("memory limit"), "{he}");

    let c = &cluster;
    wait_for(Duration::from_secs(60), "all batches ingested", || {
        (c.count(&format!(
            "SELECT count(*) FROM events WHERE merchant_id = '{fine}'"
        )) == 2000
            && c.count(&format!(
                "SELECT count(*) FROM failed_events WHERE merchant_id IN ('{looper}', '{hog}')"
            )) == 100)
            .then_some(())
    });
    // Raw events are kept for re-processing; the processed ones are held back.
    assert_eq!(
        c.count(&format!(
            "SELECT count(*) FROM raw_events WHERE merchant_id = '{looper}'"
        )),
        50
    );
    assert_eq!(
        c.count(&format!(
            "SELECT count(*) FROM events WHERE merchant_id = '{looper}'"
        )),
        0
    );
    let rows = c.sql(&format!(
        "SELECT DISTINCT stage, plugin, pipeline_version, reason FROM failed_events WHERE merchant_id = '{hog}'"
    ));
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0]["plugin"]
        .as_str()
        .unwrap()
        .starts_with("beacon_plugin_hostile@"));
    assert!(rows[0]["reason"].as_str().unwrap().contains("memory limit"));
    assert_eq!(rows[0]["pipeline_version"].as_i64(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_too_big_for_one_bus_message_is_split_and_stored_whole() {
    let cluster = Cluster::start(false);
    let (id, key) = cluster.merchant("bulky");
    // With a plugin the envelope carries raw and processed events: ~2x the frame, over the
    // bus's 1 MiB message limit as one envelope.
    cluster.attach(&id, "beacon_plugin_utm", "");
    let mut big = events(20, 240);
    for e in &mut big {
        for k in 0..4 {
            e.properties.insert(format!("blob{k}"), "x".repeat(1000));
        }
    }
    let client = cluster.client(&key).await.expect("connect");
    let ack = client
        .send(&big)
        .await
        .expect("stored in several envelopes");
    assert_eq!(ack.accepted, 240);
    assert!(ack.rejected.is_empty());
    let c = &cluster;
    wait_for(Duration::from_secs(60), "all stored", || {
        (c.count(&format!(
            "SELECT count(*) FROM events WHERE merchant_id = '{id}'"
        )) == 240)
            .then_some(())
    });
    assert_eq!(
        c.count(&format!(
            "SELECT count(DISTINCT event_id) FROM raw_events WHERE merchant_id = '{id}'"
        )),
        240
    );
    assert_eq!(
        c.count(&format!(
            "SELECT count(*) FROM failed_events WHERE merchant_id = '{id}'"
        )),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_plugin_output_fails_the_batch_with_the_reason() {
    let cluster = Cluster::start(false);
    let (id, key) = cluster.merchant("blanked");
    cluster.attach(&id, "beacon_plugin_hostile", "blank");
    let client = cluster.client(&key).await.expect("connect");
    let ack = client.send(&events(30, 10)).await.expect("durable even so");
    let err = ack.plugin_error.expect("reported");
    assert!(
        err.contains("invalid event") && err.contains("event_id is empty"),
        "{err}"
    );
    let c = &cluster;
    wait_for(Duration::from_secs(60), "held in failed_events", || {
        (c.count(&format!(
            "SELECT count(*) FROM failed_events WHERE merchant_id = '{id}' AND stage = 'plugin'"
        )) == 10
            && c.count(&format!(
                "SELECT count(*) FROM raw_events WHERE merchant_id = '{id}'"
            )) == 10)
            .then_some(())
    });
    assert_eq!(
        c.count(&format!(
            "SELECT count(*) FROM events WHERE merchant_id = '{id}'"
        )),
        0
    );
}
