//! The replace commit, maintenance and serving reads against real Iceberg tables on local
//! disk (SQLite catalog), through the crate's public API only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    new_null_array, ArrayRef, Int64Array, LargeBinaryArray, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, TimeUnit};
use arrow::record_batch::RecordBatch;
use beacon_warehouse::maintain::{self, MaintainOptions};
use beacon_warehouse::replace::{Outcome, Rewrite, JOB_PROPERTY};
use beacon_warehouse::tables::{arrow_schema, SEQ_PROPERTY};
use beacon_warehouse::{ServingReads, TableKind, Warehouse, WarehouseError};
use iceberg::spec::Operation;

const HOUR_US: i64 = 3_600_000_000;
/// 2026-11-02T00:00:00Z
const DAY0_US: i64 = 1_793_577_600_000_000;

/// `n` rows for `kind` (any table): ids `prefix-0..n`, merchants m0..m3, times spread over two
/// days so rows land in several partitions, all with JetStream sequence `seq`.
async fn rows(wh: &Warehouse, kind: TableKind, prefix: &str, n: usize, seq: u64) -> RecordBatch {
    let table = wh.table(kind).await.unwrap();
    let schema = arrow_schema(&table).unwrap();
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| -> ArrayRef {
            match (f.name().as_str(), f.data_type()) {
                ("stream_seq", _) => {
                    Arc::new(Int64Array::from_iter_values((0..n).map(|_| seq as i64)))
                }
                ("merchant_id", _) => Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| format!("m{}", i % 4)),
                )),
                (_, DataType::Utf8) if !f.is_nullable() || f.name() == "visitor_id" => Arc::new(
                    StringArray::from_iter_values((0..n).map(|i| format!("{prefix}-{i}"))),
                ),
                (_, DataType::Timestamp(TimeUnit::Microsecond, tz)) => Arc::new(
                    TimestampMicrosecondArray::from_iter_values(
                        (0..n).map(|i| DAY0_US + (i as i64 % 48) * HOUR_US),
                    )
                    .with_timezone_opt(tz.clone()),
                ),
                (_, DataType::Int64) if !f.is_nullable() => {
                    Arc::new(Int64Array::from_iter_values((0..n).map(|i| i as i64 + 1)))
                }
                (_, DataType::LargeBinary) => {
                    Arc::new(LargeBinaryArray::from_iter((0..n).map(|_| None::<&[u8]>)))
                }
                (_, t) => new_null_array(t, n),
            }
        })
        .collect();
    RecordBatch::try_new(schema, columns).unwrap()
}

/// The result of `sql` in `ctx`.
async fn rows_of(ctx: &datafusion::prelude::SessionContext, sql: &str) -> Vec<RecordBatch> {
    ctx.sql(sql).await.unwrap().collect().await.unwrap()
}

async fn count(wh: &Warehouse, sql: &str) -> i64 {
    let batches = rows_of(&wh.session().await.unwrap(), sql).await;
    let col = batches[0].column(0);
    arrow::compute::cast(col, &DataType::Int64)
        .unwrap()
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0)
}

/// Query results as JSON text, through an uncached session (sees the latest commit).
async fn query_json(wh: &Warehouse, sql: &str) -> String {
    let batches = rows_of(&wh.session().await.unwrap(), sql).await;
    beacon_warehouse::output::json(&batches).unwrap()
}

async fn live_paths(wh: &Warehouse, kind: TableKind) -> Vec<String> {
    let table = wh.table(kind).await.unwrap();
    let Some(snapshot) = table.metadata().current_snapshot() else {
        return vec![];
    };
    let list = table.manifest_list_reader(snapshot).load().await.unwrap();
    let mut paths = vec![];
    for m in list.entries() {
        let manifest = m.load_manifest(table.file_io()).await.unwrap();
        for e in manifest.entries().iter().filter(|e| e.is_alive()) {
            paths.push(e.file_path().to_string());
        }
    }
    paths.sort();
    paths
}

/// What PyIceberg (another engine) reads from the warehouse in `dir`: the JSON that
/// `tests/python/pyiceberg_read.py` prints (rows per table, distinct ids, ...).
fn pyiceberg(dir: &std::path::Path) -> serde_json::Value {
    let venv = std::env::var_os("BEACON_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/beacon/venv")
        });
    let layout = beacon_warehouse::Layout::new(dir);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/pyiceberg_read.py");
    let out = std::process::Command::new(venv.join("bin/python"))
        .arg(script)
        .arg(layout.catalog_uri())
        .arg(layout.warehouse_uri())
        .output()
        .expect("run python (scripts/setup.sh makes the venv)");
    assert!(
        out.status.success(),
        "pyiceberg: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("pyiceberg json")
}

/// A new warehouse with three commits of `n` rows each to `kind` (ids `a-*`, `b-*`,
/// `c-*`), at sequences `step`, `2 * step` and `3 * step`.
async fn with_abc(kind: TableKind, n: usize, step: u64) -> (tempfile::TempDir, Warehouse) {
    let dir = tempfile::tempdir().unwrap();
    let wh = Warehouse::open(dir.path()).await.unwrap();
    for (i, prefix) in ["a", "b", "c"].iter().enumerate() {
        let seq = step * (i as u64 + 1);
        let batch = rows(&wh, kind, prefix, n, seq).await;
        wh.append(kind, batch, seq_props(seq)).await.unwrap();
    }
    (dir, wh)
}

fn seq_props(seq: u64) -> HashMap<String, String> {
    HashMap::from([(SEQ_PROPERTY.to_string(), seq.to_string())])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_swaps_files_in_one_snapshot_and_carries_watermarks_forward() {
    let kind = TableKind::FailedEvents;
    let (dir, wh) = with_abc(kind, 10, 10).await;
    let before = live_paths(&wh, kind).await;
    let old_snapshot = wh
        .table(kind)
        .await
        .unwrap()
        .metadata()
        .current_snapshot_id()
        .unwrap();
    assert_eq!(count(&wh, "SELECT count(*) FROM failed_events").await, 30);

    // Replace everything with one file holding the same 30 rows plus 5 new ones ("overwrite").
    let mut all = vec![];
    for p in ["a", "b", "c"] {
        all.push(rows(&wh, kind, p, 10, 0).await);
    }
    all.push(rows(&wh, kind, "d", 5, 0).await);
    let batch = arrow::compute::concat_batches(&all[0].schema(), &all).unwrap();
    let mut rewrite = Rewrite::new(Operation::Overwrite, "job-1");
    rewrite.removed = before.clone();
    rewrite.added = wh.write_files(kind, batch).await.unwrap();
    rewrite
        .properties
        .insert("beacon.reason".into(), "test".into());
    let outcome = wh.replace(kind, &rewrite).await.unwrap();
    assert!(matches!(outcome, Outcome::Committed { attempts: 1, .. }));

    assert_eq!(count(&wh, "SELECT count(*) FROM failed_events").await, 35);
    let py = pyiceberg(dir.path());
    assert_eq!(py["failed_events"]["rows"], 35, "{py}");
    assert_eq!(py["failed_events"]["distinct_event_ids"], 35, "{py}");
    let after = live_paths(&wh, kind).await;
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "old files still live"
    );
    let table = wh.table(kind).await.unwrap();
    let current = table.metadata().current_snapshot().unwrap();
    let props = &current.summary().additional_properties;
    assert_eq!(current.summary().operation, Operation::Overwrite);
    assert_eq!(props.get(SEQ_PROPERTY).map(String::as_str), Some("30"));
    assert_eq!(props.get("beacon.reason").map(String::as_str), Some("test"));
    assert_eq!(props.get(JOB_PROPERTY).map(String::as_str), Some("job-1"));
    assert_eq!(props.get("total-records").map(String::as_str), Some("35"));
    assert_eq!(wh.committed_seq(kind).await.unwrap(), 30);

    // Time travel to before the replace still reads the old files.
    let ctx = wh.session().await.unwrap();
    let pinned = iceberg_datafusion::IcebergStaticTableProvider::try_new_from_table_snapshot(
        table.clone(),
        old_snapshot,
    )
    .await
    .unwrap();
    ctx.register_table("old", Arc::new(pinned)).unwrap();
    let old = rows_of(&ctx, "SELECT count(*) FROM old").await;
    assert_eq!(
        old[0]
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0),
        30
    );

    // The same job again is a no-op; a job naming a file that is gone aborts.
    assert!(matches!(
        wh.replace(kind, &rewrite).await.unwrap(),
        Outcome::AlreadyApplied { .. }
    ));
    assert_eq!(count(&wh, "SELECT count(*) FROM failed_events").await, 35);
    let mut stale = Rewrite::new(Operation::Delete, "job-2");
    stale.removed = vec![before[0].clone()];
    match wh.replace(kind, &stale).await {
        Err(WarehouseError::NotLive { path, .. }) => assert_eq!(path, before[0]),
        other => panic!("expected NotLive, got {other:?}"),
    }

    // A delete: rows go, the watermark stays.
    let mut delete = Rewrite::new(Operation::Delete, "job-3");
    delete.removed = after.clone();
    wh.replace(kind, &delete).await.unwrap();
    assert_eq!(count(&wh, "SELECT count(*) FROM failed_events").await, 0);
    assert_eq!(pyiceberg(dir.path())["failed_events"]["rows"], 0);
    assert_eq!(wh.committed_seq(kind).await.unwrap(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaces_racing_appends_keep_every_row_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let wh = Arc::new(Warehouse::open(dir.path()).await.unwrap());
    let kind = TableKind::Events;
    const APPENDS: usize = 40;
    const ROWS: usize = 25;
    let appender = {
        let wh = wh.clone();
        tokio::spawn(async move {
            for i in 0..APPENDS {
                let batch = rows(&wh, kind, &format!("e{i}"), ROWS, i as u64 + 1).await;
                wh.append(kind, batch, seq_props(i as u64 + 1))
                    .await
                    .unwrap();
            }
        })
    };
    // Compact whatever is live, again and again, while the appends land.
    let mut compactions = 0;
    let mut conflicts = 0;
    let mut runs = 0;
    while !appender.is_finished() || compactions == 0 {
        runs += 1;
        assert!(runs < 500, "no compaction in {runs} maintenance runs");
        let report =
            maintain::maintain_table(&wh, kind, &MaintainOptions::default(), &|_, _, _, _| {})
                .await
                .unwrap();
        if report.bins > 0 {
            compactions += 1;
        }
        if report.skipped.is_some() {
            conflicts += 1;
        }
    }
    appender.await.unwrap();
    let total = (APPENDS * ROWS) as i64;
    assert_eq!(count(&wh, "SELECT count(*) FROM events").await, total);
    assert_eq!(
        count(&wh, "SELECT count(DISTINCT event_id) FROM events").await,
        total
    );
    assert_eq!(wh.committed_seq(kind).await.unwrap(), APPENDS as u64);
    assert!(
        compactions > 0,
        "nothing was compacted ({conflicts} conflicts)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_compacts_folds_expires_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let wh = Warehouse::open(dir.path()).await.unwrap();
    for i in 0..6u64 {
        let batch = rows(&wh, TableKind::Events, &format!("e{i}"), 50, i + 1).await;
        wh.append(TableKind::Events, batch, seq_props(i + 1))
            .await
            .unwrap();
        beacon_warehouse::rollup::run_once(&wh).await.unwrap();
    }
    let rollup_rows_before = count(&wh, "SELECT count(*) FROM rollups_hourly").await;
    let merged = "SELECT merchant_id, hour, events, pageviews, visitors FROM rollups \
                  ORDER BY merchant_id, hour";
    let view_before = query_json(&wh, merged).await;
    let events_files = live_paths(&wh, TableKind::Events).await.len();

    let options = MaintainOptions {
        retain: Duration::ZERO,
        retain_last: 1,
        orphan_age: Duration::ZERO,
        ..Default::default()
    };
    let dry = maintain::maintain_table(
        &wh,
        TableKind::Events,
        &MaintainOptions {
            dry_run: true,
            ..options.clone()
        },
        &|_, _, _, _| {},
    )
    .await
    .unwrap();
    assert_eq!(live_paths(&wh, TableKind::Events).await.len(), events_files);
    assert!(dry.bins > 0);

    let reports = maintain::maintain(&wh, &TableKind::ALL, &options, &|_, _, _, _| {})
        .await
        .unwrap();
    let events = &reports[1];
    assert_eq!(events.table, "events");
    assert_eq!(events.files_before as usize, events_files);
    assert_eq!(events.files_after, dry.files_after);
    assert_eq!(events.rows_after, events.rows_before);
    // 48 hourly timestamps over two days, 4 merchant buckets at most: 8 partitions.
    assert!(events.files_after <= 8, "{events}");
    assert!(events.manifests_after <= 1, "{events}");
    assert!(events.snapshots_expired > 0, "{events}");
    assert!(events.files_deleted > 0, "{events}");
    assert_eq!(count(&wh, "SELECT count(*) FROM events").await, 300);
    assert_eq!(wh.committed_seq(TableKind::Events).await.unwrap(), 6);

    // Rollup deltas folded into one row per key; the merged view reads the same.
    let rollups = &reports[3];
    assert_eq!(rollups.table, "rollups_hourly");
    let rollup_rows_after = count(&wh, "SELECT count(*) FROM rollups_hourly").await;
    assert!(
        rollup_rows_after < rollup_rows_before,
        "{rollup_rows_after} rows after, {rollup_rows_before} before"
    );
    assert_eq!(
        rollup_rows_after,
        count(&wh, "SELECT count(*) FROM rollups").await
    );
    assert_eq!(view_before, query_json(&wh, merged).await);
    // The rollup watermark survived, so the next run adds nothing twice.
    let again = beacon_warehouse::rollup::run_once(&wh).await.unwrap();
    assert_eq!(again.rollup_rows, 0);

    // Only files a retained snapshot references remain on disk.
    let table = wh.table(TableKind::Events).await.unwrap();
    let location = table.metadata().location().trim_start_matches("file://");
    let data_files = walk(&std::path::Path::new(location).join("data"));
    assert_eq!(data_files, events.files_after as usize, "{events}");
}

fn walk(dir: &std::path::Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.file_type().unwrap().is_dir() {
            n += walk(&entry.path());
        } else {
            n += 1;
        }
    }
    n
}

/// A rollup rebuild of past hours replaces their rows with exact aggregates and moves the
/// generation, so a delta planned before it is refused instead of landing stale rows; the
/// next regular run then brings the rollups level with `events` again, nothing counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollup_rebuild_refuses_deltas_planned_before_it_and_counts_exactly() {
    use beacon_warehouse::rollup::{self, HourSpan};
    use beacon_warehouse::tables::{snapshot_property, ROLLUP_GEN_PROPERTY, ROLLUP_SEQ_PROPERTY};
    let dir = tempfile::tempdir().unwrap();
    let wh = Warehouse::open(dir.path()).await.unwrap();
    let events = TableKind::Events;
    wh.append(events, rows(&wh, events, "a", 400, 1).await, seq_props(1))
        .await
        .unwrap();
    rollup::run_once(&wh).await.unwrap();
    let total = "SELECT CAST(sum(events) AS BIGINT) FROM rollups";
    assert_eq!(count(&wh, total).await, 400);

    // A delta run reads the generation, then a rebuild lands before its commit.
    let planned = wh.table(TableKind::RollupsHourly).await.unwrap();
    let generation = snapshot_property(&planned, ROLLUP_GEN_PROPERTY);
    let seq = snapshot_property(&planned, ROLLUP_SEQ_PROPERTY);
    wh.append(events, rows(&wh, events, "b", 200, 2).await, seq_props(2))
        .await
        .unwrap();
    let spans = [HourSpan {
        merchant_id: "m0".into(),
        from_us: DAY0_US,
        to_us: DAY0_US + 48 * HOUR_US,
    }];
    let rebuilt = rollup::rebuild(&wh, &spans, "job-rebuild").await.unwrap();
    assert_eq!(rebuilt.len(), 4);
    let mut stale = Rewrite::new(Operation::Append, "stale-delta");
    stale.properties = HashMap::from([(ROLLUP_SEQ_PROPERTY.to_string(), "2".to_string())]);
    stale.require = vec![
        (ROLLUP_SEQ_PROPERTY.to_string(), seq),
        (ROLLUP_GEN_PROPERTY.to_string(), generation),
    ];
    assert!(matches!(
        wh.replace(TableKind::RollupsHourly, &stale).await,
        Err(WarehouseError::Stale { .. })
    ));

    // m0's hours were rebuilt from events up to the rollup watermark (seq 1): still exact.
    assert_eq!(count(&wh, total).await, 400);
    rollup::run_once(&wh).await.unwrap();
    assert_eq!(count(&wh, total).await, 600);
    assert_eq!(
        count(
            &wh,
            "SELECT CAST(sum(events) AS BIGINT) FROM rollups WHERE merchant_id = 'm0'"
        )
        .await,
        count(&wh, "SELECT count(*) FROM events WHERE merchant_id = 'm0'").await
    );
}

/// (event id, session id, visitor id, minute after DAY0, name).
type VisitEvent<'a> = (&'a str, Option<&'a str>, Option<&'a str>, i64, &'a str);

/// `events` rows of merchant `m`, all with stream sequence `seq`; the path is `/<event id>`.
async fn visit_events(wh: &Warehouse, m: &str, rows: &[VisitEvent<'_>], seq: u64) -> RecordBatch {
    let table = wh.table(TableKind::Events).await.unwrap();
    let schema = arrow_schema(&table).unwrap();
    let n = rows.len();
    let text = |f: &dyn Fn(&VisitEvent<'_>) -> Option<String>| {
        Arc::new(StringArray::from_iter(rows.iter().map(f))) as ArrayRef
    };
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| -> ArrayRef {
            match (f.name().as_str(), f.data_type()) {
                ("event_id", _) => text(&|r| Some(r.0.to_string())),
                ("merchant_id", _) => text(&|_| Some(m.to_string())),
                ("name", _) => text(&|r| Some(r.4.to_string())),
                ("session_id", _) => text(&|r| r.1.map(str::to_string)),
                ("visitor_id", _) => text(&|r| r.2.map(str::to_string)),
                ("path", _) => text(&|r| Some(format!("/{}", r.0))),
                ("edge_id" | "batch_id", _) => text(&|_| Some("x".to_string())),
                ("stream_seq", _) => {
                    Arc::new(Int64Array::from_iter_values((0..n).map(|_| seq as i64)))
                }
                (_, DataType::Timestamp(TimeUnit::Microsecond, tz)) => Arc::new(
                    TimestampMicrosecondArray::from_iter_values(
                        rows.iter().map(|r| DAY0_US + r.3 * 60_000_000),
                    )
                    .with_timezone_opt(tz.clone()),
                ),
                (_, t) => new_null_array(t, n),
            }
        })
        .collect();
    RecordBatch::try_new(schema, columns).unwrap()
}

/// Visits computed from `events` directly, independently of the `visits` table: what the
/// `sessions` view computed before visits were pre-aggregated.
const VISITS_FROM_EVENTS: &str = "\
    WITH keyed AS ( \
        SELECT merchant_id, name, path, ts, COALESCE(session_id, visitor_id, event_id) AS k \
        FROM events), \
    gaps AS ( \
        SELECT *, CASE WHEN lag(ts) OVER (PARTITION BY merchant_id, k ORDER BY ts) IS NULL \
                         OR ts - lag(ts) OVER (PARTITION BY merchant_id, k ORDER BY ts) > INTERVAL '30 minutes' \
                       THEN 1 ELSE 0 END AS s \
        FROM keyed), \
    numbered AS ( \
        SELECT *, sum(s) OVER (PARTITION BY merchant_id, k ORDER BY ts \
                               ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS n \
        FROM gaps) \
    SELECT merchant_id, k || '#' || CAST(n AS VARCHAR) AS session, min(ts) AS started_at, \
           max(ts) AS ended_at, count(*) AS events, \
           CAST(sum(CASE WHEN name = 'pageview' THEN 1 ELSE 0 END) AS BIGINT) AS pageviews, \
           first_value(path ORDER BY ts) AS entry_page, last_value(path ORDER BY ts) AS exit_page \
    FROM numbered GROUP BY merchant_id, k, n ORDER BY merchant_id, session";

const VISITS_STORED: &str = "\
    SELECT merchant_id, session, started_at, ended_at, events, pageviews, entry_page, exit_page \
    FROM sessions ORDER BY merchant_id, session";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visits_follow_late_events_that_join_visits_and_rebuilds_that_split_them() {
    use beacon_warehouse::rewrite::{self, str_column, RowRewrite};
    use beacon_warehouse::rollup::{self, HourSpan};
    let dir = tempfile::tempdir().unwrap();
    let wh = Warehouse::open(dir.path()).await.unwrap();
    let events = TableKind::Events;
    let visits = "SELECT count(*) FROM sessions";
    let steps: [(&str, &[VisitEvent<'_>], i64); 3] = [
        (
            "m0",
            &[
                ("a1", Some("s1"), Some("v1"), 0, "pageview"),
                ("a2", Some("s1"), Some("v1"), 10, "pageview"),
                ("b1", None, Some("v2"), 0, "pageview"),
                ("c1", Some("s3"), Some("v3"), 100, "pageview"),
                ("z1", None, None, 5, "signup"),
            ],
            4,
        ),
        (
            "m0",
            // Over 30 minutes after each key's last event: new visits.
            &[
                ("a3", Some("s1"), Some("v1"), 80, "pageview"),
                ("c2", Some("s3"), Some("v3"), 140, "click"),
            ],
            6,
        ),
        (
            "m0",
            // Late events that close the gaps: s1's two visits become one, and s3's too.
            &[
                ("a4", Some("s1"), Some("v1"), 40, "pageview"),
                ("a5", Some("s1"), Some("v1"), 60, "pageview"),
                ("c3", Some("s3"), Some("v3"), 120, "pageview"),
            ],
            4,
        ),
    ];
    // Another merchant's visit, untouched by everything after it.
    wh.append(
        events,
        visit_events(
            &wh,
            "m1",
            &[("o1", Some("s1"), Some("v9"), 0, "pageview")],
            1,
        )
        .await,
        seq_props(1),
    )
    .await
    .unwrap();
    for (i, (m, rows, want)) in steps.iter().enumerate() {
        let seq = i as u64 + 2;
        wh.append(
            events,
            visit_events(&wh, m, rows, seq).await,
            seq_props(seq),
        )
        .await
        .unwrap();
        let run = rollup::run_once(&wh).await.unwrap();
        assert!(run.visit_rows > 0, "step {i}: {run:?}");
        assert_eq!(count(&wh, visits).await, want + 1, "step {i}");
        assert_eq!(
            query_json(&wh, VISITS_STORED).await,
            query_json(&wh, VISITS_FROM_EVENTS).await,
            "step {i}"
        );
    }
    // Every event is in exactly one visit.
    assert_eq!(
        count(&wh, "SELECT CAST(sum(events) AS BIGINT) FROM sessions").await,
        count(&wh, "SELECT count(*) FROM events").await
    );

    // A job removes the late events (as forgetting or re-processing does), then rebuilds
    // the merchant's rollups and visits: s1 and s3 split again.
    let late = |b: &RecordBatch| -> Result<arrow::array::BooleanArray, arrow::error::ArrowError> {
        let ids = str_column(b, "event_id")?;
        Ok(ids
            .iter()
            .map(|id| Some(matches!(id, Some("a4" | "a5" | "c3"))))
            .collect())
    };
    let removed = rewrite::rewrite_current(&wh, RowRewrite::new(events, "job-drop", &late))
        .await
        .unwrap();
    assert_eq!(removed.rows_dropped, 3);
    let spans = [HourSpan {
        merchant_id: "m0".into(),
        from_us: DAY0_US,
        to_us: DAY0_US + 3 * HOUR_US,
    }];
    let rebuilt = rollup::rebuild(&wh, &spans, "job-drop-rollups")
        .await
        .unwrap();
    assert!(rebuilt.iter().any(|r| r.kind == TableKind::Visits));
    assert_eq!(count(&wh, visits).await, 7);
    assert_eq!(
        query_json(&wh, VISITS_STORED).await,
        query_json(&wh, VISITS_FROM_EVENTS).await
    );
    // A run with nothing new changes nothing, and the watermark holds.
    let before = query_json(&wh, VISITS_STORED).await;
    rollup::run_once(&wh).await.unwrap();
    assert_eq!(query_json(&wh, VISITS_STORED).await, before);
}

/// Serving sessions read planned files with DataFusion's Parquet source and cached footers
/// ([`ServingReads::Parquet`], the default): every answer equals Iceberg's own scan of the
/// same snapshot, across appends, a replace, projections, filters that prune and limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_reads_by_parquet_source_equal_icebergs_scan() {
    let kind = TableKind::Events;
    let (dir, wh) = with_abc(kind, 200, 1).await;
    // A replace of the first commit's files (another snapshot shape: overwrite).
    let first = live_paths(&wh, kind).await;
    let mut rewrite = Rewrite::new(Operation::Overwrite, "job-serving");
    rewrite.added = wh
        .write_files(kind, rows(&wh, kind, "d", 50, 0).await)
        .await
        .unwrap();
    rewrite.removed = first[..1].to_vec();
    wh.replace(kind, &rewrite).await.unwrap();

    let iceberg = Warehouse::open(dir.path())
        .await
        .unwrap()
        .with_serving_reads(ServingReads::Iceberg);
    let queries = [
        "SELECT merchant_id, count(*) AS n, count(DISTINCT event_id) AS ids, min(ts) AS first, max(ts) AS last \
         FROM events GROUP BY merchant_id ORDER BY merchant_id",
        "SELECT count(*) AS n FROM events WHERE merchant_id = 'm1'",
        "SELECT event_id, ts FROM events WHERE ts >= TIMESTAMP '2026-11-03T00:00:00Z' ORDER BY event_id",
        "SELECT * FROM events ORDER BY event_id LIMIT 7",
        "SELECT count(*) AS n FROM events WHERE merchant_id = 'nobody'",
        "SELECT event_id FROM events LIMIT 3",
    ];
    for q in queries {
        let ours = wh.sql(q).await.unwrap();
        let theirs = iceberg.sql(q).await.unwrap();
        let (ours, theirs) = (
            beacon_warehouse::output::json(&ours).unwrap(),
            beacon_warehouse::output::json(&theirs).unwrap(),
        );
        if q.ends_with("LIMIT 3") {
            // Which three rows is unspecified; that there are three is not.
            assert_eq!(ours.matches("event_id").count(), 3, "{q}: {ours}");
        } else {
            assert_eq!(ours, theirs, "{q}");
        }
    }
    // A merchant's session reads through the same scan and sees only that merchant.
    let ctx = wh.merchant_session("m2").await.unwrap();
    let batches = rows_of(&ctx, "SELECT DISTINCT merchant_id FROM events").await;
    assert_eq!(
        beacon_warehouse::output::json(&batches).unwrap(),
        "[{\"merchant_id\":\"m2\"}]\n"
    );

    // The Parquet source did the reading (its plan, and footers kept), not a fallback.
    let plan = beacon_warehouse::output::json(
        &wh.sql("EXPLAIN SELECT count(*) FROM events WHERE merchant_id = 'm1'")
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(
        plan.contains("DataSourceExec") && plan.contains("file_type=parquet"),
        "{plan}"
    );
    assert!(
        plan.contains("predicate="),
        "filters reach the scan for pruning: {plan}"
    );
    // In a merchant's session the merchant filter is evaluated inside the reader and again
    // by a FilterExec above the scan, which the optimizer may not fold into it.
    let scoped = beacon_warehouse::output::json(
        &rows_of(
            &ctx,
            "EXPLAIN SELECT count(*) FROM events WHERE ts IS NOT NULL",
        )
        .await,
    )
    .unwrap();
    let filter = scoped.find("FilterExec: ").expect("a FilterExec");
    let fence = scoped.find("FenceExec").expect("the fence below it");
    assert!(filter < fence, "{scoped}");
    assert!(scoped[filter..fence].contains("m2"), "{scoped}");
    assert!(scoped[fence..].contains("predicate="), "{scoped}");
    let footers = wh.footers().expect("footers kept by default");
    assert_eq!(footers.len(), live_paths(&wh, kind).await.len() as u64);
    let theirs = beacon_warehouse::output::json(
        &iceberg
            .sql("EXPLAIN SELECT count(*) FROM events")
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(theirs.contains("IcebergTableScan"), "{theirs}");
}
