//! The warehouse shared by several machines: the Iceberg catalog in a real PostgreSQL, the
//! table files on a real S3-compatible server (s3s-fs), and ingest, rollup and query roles
//! each in a data directory of its own (as on separate machines) all pointed at them.
//!
//! Two ingest processes share the stream's partitions and race on the same tables; one is
//! killed with -9 mid-stream and started again while a compaction races them. At the end every acknowledged event id is in
//! `raw_events` and `events` exactly once, the rollups count them all, maintenance compacts
//! on object storage without changing an answer, no table file is on a local disk, and
//! PyIceberg (another engine) reads the same tables from the same catalog and bucket.

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::time::Duration;

use common::servers::{Postgres, S3Server};
use common::{
    cli_in, cli_try, first_int, python_json, sql_in, wait_for, wait_stored_once, Cluster, Role,
};

const BUCKET: &str = "beacon";

fn spawn_ingester(cluster: &Cluster, name: &'static str) -> Role {
    cluster.spawn_on_machine(
        name,
        "ingest",
        &[
            "--partitions",
            "2",
            "--ingest-id",
            name,
            "--ingest-max-wait-ms",
            "200",
            "--ingest-max-batch",
            "100",
        ],
        &[],
    )
}

fn count(dir: &Path, sql: &str) -> i64 {
    first_int(&sql_in(dir, sql))
}

/// Table files (Parquet, Avro, metadata JSON) under `dir`: a machine's data directory must
/// have none when the warehouse is shared.
fn local_table_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .is_some_and(|x| x == "parquet" || x == "avro" || x == "json")
                && p.to_string_lossy().contains("/analytics/")
            {
                found.push(p.display().to_string());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_on_several_machines_share_a_postgres_catalog_and_tables_on_s3() {
    let pg = Postgres::start();
    let s3 = S3Server::start(BUCKET);
    // Every process this test starts inherits these: the shared warehouse's settings.
    common::servers::use_shared_warehouse(&pg, &s3, BUCKET);

    let mut cluster = Cluster::start(true);
    // The first ingester makes way for two on "machines" of their own.
    if let Some(mut first) = cluster.ingest.take() {
        first.terminate();
    }
    let mut a = spawn_ingester(&cluster, "ingest-a");
    let _b = spawn_ingester(&cluster, "ingest-b");

    let merchants: Vec<(String, String)> = (0..4)
        .map(|i| cluster.merchant(&format!("shared-{i}")))
        .collect();
    let now = beacon_edge::now_ms();
    let batch_of = |m: usize, n: u64| {
        beacon::demo::generate(
            (m as u64 + 1) * 1_000_000 + n,
            &format!("shared{m}.example"),
            250,
            now - 3_600_000,
            3_600_000,
            200,
        )
    };
    let mut sent = 0i64;
    for n in 0..4 {
        for (m, (_, key)) in merchants.iter().enumerate() {
            let batch = batch_of(m, n);
            cluster.send(key, &batch).await;
            sent += batch.len() as i64;
        }
    }
    let data = cluster.data_dir().to_path_buf();
    wait_for(Duration::from_secs(120), "ingest under way", || {
        (count(&data, "SELECT count(*) FROM raw_events") > 0).then_some(())
    });
    // kill -9 one of the racing writers mid-stream, keep sending, start it again; a
    // maintenance run (compaction: replace commits) races the writers meanwhile.
    a.kill_hard();
    let racing = {
        let dir = data.join("maintainer");
        std::fs::create_dir_all(&dir).expect("maintainer dir");
        std::thread::spawn(move || {
            cli_in(
                &dir,
                None,
                &["maintain", "--table", "raw_events", "--table", "events"],
            )
        })
    };
    for n in 4..8 {
        for (m, (_, key)) in merchants.iter().enumerate() {
            let batch = batch_of(m, n);
            cluster.send(key, &batch).await;
            sent += batch.len() as i64;
        }
    }
    let _a = spawn_ingester(&cluster, "ingest-a");
    eprintln!(
        "maintain (racing ingest): {}",
        racing.join().expect("maintain")
    );

    // Read from a third machine: every acknowledged id exactly once.
    let reader = data.join("reader");
    std::fs::create_dir_all(&reader).expect("reader dir");
    wait_stored_once(&reader, sent, Duration::from_secs(180));

    // Maintenance on object storage, now on quiet tables: compaction and snapshot expiry
    // change no answer.
    let before = sql_in(
        &reader,
        "SELECT merchant_id, count(*) AS n FROM events GROUP BY merchant_id ORDER BY merchant_id",
    );
    let report = cli_in(
        &reader,
        None,
        &["maintain", "--table", "raw_events", "--table", "events"],
    );
    eprintln!("maintain: {report}");
    assert_eq!(
        sql_in(
            &reader,
            "SELECT merchant_id, count(*) AS n FROM events GROUP BY merchant_id ORDER BY merchant_id",
        ),
        before
    );
    assert_eq!(count(&reader, "SELECT count(*) FROM raw_events"), sent);

    // What nothing references any more is swept from the bucket once old enough: the killed
    // writer's staged files, the racing compaction's inputs, and one planted object. After it
    // every Parquet object under a table is one of its live data files, and answers stand.
    let planted = s3
        .root
        .join(BUCKET)
        .join("warehouse/analytics/events/data/planted-orphan.parquet");
    std::fs::create_dir_all(planted.parent().expect("parent")).expect("data dir");
    std::fs::write(&planted, b"referenced by nothing").expect("plant an orphan");
    let mut args = vec!["maintain", "--table", "raw_events", "--table", "events"];
    args.extend(common::SWEEP_NOW);
    let report = cli_in(&reader, None, &args);
    eprintln!("maintain (sweep): {report}");
    assert!(
        !planted.exists(),
        "the planted orphan is still there: {report}"
    );
    for table in ["raw_events", "events"] {
        let live = count(
            &reader,
            &format!(
                "SELECT sum(added_data_files_count + existing_data_files_count) \
                 FROM \"{table}$manifests\" WHERE content = 0"
            ),
        );
        let stored = s3
            .objects(BUCKET, &format!("warehouse/analytics/{table}/"))
            .iter()
            .filter(|o| o.ends_with(".parquet"))
            .count() as i64;
        assert!(live > 0, "{table}: no live data files");
        assert_eq!(
            stored, live,
            "{table}: Parquet objects against live data files"
        );
    }
    assert_eq!(
        sql_in(
            &reader,
            "SELECT merchant_id, count(*) AS n FROM events GROUP BY merchant_id ORDER BY merchant_id",
        ),
        before
    );
    assert_eq!(count(&reader, "SELECT count(*) FROM raw_events"), sent);

    // The tables are in the bucket and the catalog, not on any machine's disk.
    let objects = s3.objects(BUCKET, "warehouse/analytics/raw_events");
    assert!(
        objects.iter().any(|o| o.ends_with(".parquet"))
            && objects.iter().any(|o| o.ends_with(".metadata.json")),
        "raw_events has no data or metadata files in the bucket: {objects:?}"
    );
    assert_eq!(local_table_files(&data), Vec::<String>::new());
    let rows = pg
        .psql(
            "beacon",
            "SELECT count(*) FROM iceberg_tables WHERE metadata_location LIKE 's3://beacon/warehouse/%'",
        )
        .expect("catalog rows");
    assert!(
        rows.parse::<i64>().expect("count") >= 6,
        "catalog rows: {rows}"
    );

    // A data directory's backup cannot copy a shared warehouse: refused, with the way to do it.
    let refused = cli_try(
        &reader,
        None,
        &[
            "backup",
            "--to",
            data.join("backup").to_str().expect("utf8"),
        ],
    )
    .expect_err("backup of a shared warehouse");
    assert!(refused.contains("pg_dump"), "{refused}");

    // PyIceberg, from the same catalog and bucket, as printed for other engines.
    let read = python_json(
        "pyiceberg_read.py",
        [
            format!("postgresql+psycopg://beacon@127.0.0.1:{}/beacon", pg.port),
            format!("s3://{BUCKET}/warehouse"),
            format!("s3.endpoint={}", s3.endpoint),
            format!("s3.access-key-id={}", s3.access_key),
            format!("s3.secret-access-key={}", s3.secret_key),
            "s3.region=us-east-1".into(),
        ],
        Duration::from_secs(180),
    );
    assert_eq!(read["raw_events"]["rows"], sent, "{read}");
    assert_eq!(read["raw_events"]["distinct_event_ids"], sent, "{read}");
    assert_eq!(read["events"]["rows"], sent, "{read}");
}
