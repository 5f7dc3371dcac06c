//! Hourly rollups, kept current incrementally.
//!
//! Each run aggregates only the `events` rows committed since the previous run (by their
//! JetStream `stream_seq`, which ingest commits in order) and appends one *delta* row per
//! merchant-hour: counts, revenue, and an HLL sketch of the visitors. Queries merge deltas
//! (`sum`, `hll_union`), so a late event simply adds a delta to its (old) hour, and a
//! visitor count over any range is a true distinct estimate. The `events` snapshot read and
//! the sequence range are pinned, and each rollup commit records the last `events` sequence
//! it covers ([`ROLLUP_SEQ_PROPERTY`]): a crash between runs neither skips nor double-counts.
//!
//! `breakdowns_hourly` holds the same per merchant-hour for each breakdown dimension and
//! value ([`crate::dimensions`]), capped at [`BREAKDOWN_CAP`] values per run with the rest folded
//! into [`OTHER`].
//!
//! Deltas accumulate small files; compaction (replace commits) will fold them later.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use iceberg_datafusion::IcebergStaticTableProvider;
use tokio::sync::watch;

use iceberg::spec::Operation;

use crate::replace::Rewrite;
use crate::tables::{
    self, arrow_schema, snapshot_property_u64, ROLLUP_GEN_PROPERTY, ROLLUP_SEQ_PROPERTY,
};
use crate::{TableKind, Warehouse, WarehouseError};

/// Views every SQL session gets: the merged rollups.
pub const VIEWS: &[&str] = &[
    "CREATE VIEW rollups AS \
     SELECT merchant_id, hour, \
            CAST(sum(events) AS BIGINT) AS events, \
            CAST(sum(pageviews) AS BIGINT) AS pageviews, \
            CAST(round(hll_estimate(hll_union(visitors_hll))) AS BIGINT) AS visitors, \
            hll_union(visitors_hll) AS visitors_hll \
     FROM rollups_hourly GROUP BY merchant_id, hour",
    "CREATE VIEW revenue AS \
     SELECT merchant_id, hour, currency, \
            CAST(sum(orders) AS BIGINT) AS orders, \
            CAST(sum(revenue_micros) AS BIGINT) AS revenue_micros, \
            CAST(sum(revenue_micros) AS DOUBLE) / 1000000.0 AS revenue \
     FROM revenue_hourly GROUP BY merchant_id, hour, currency",
];

/// Distinct values kept per merchant, hour, dimension and rollup run; the rest are folded
/// into [`OTHER`]. Bounds a merchant-hour's rows however wild its URLs or properties are.
pub const BREAKDOWN_CAP: usize = 1000;
pub const OTHER: &str = "(other)";

fn breakdowns_query(range: &str) -> String {
    // Besides the table's rolled-up dimensions, `event:goal` (each goal named in the `goal`
    // property, as the goals plugin writes it) and `event:props:<key>` (every custom
    // property not starting with `$`).
    let names = crate::dimensions::rolled_up()
        .map(|d| format!("'{}'", d.api))
        .collect::<Vec<_>>()
        .join(", ");
    let columns = crate::dimensions::rolled_up()
        .map(|d| d.column)
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "WITH base AS ( \
             SELECT merchant_id, date_trunc('hour', ts) AS hour, name, visitor_id, \
                    unnest(make_array({names})) AS dimension, \
                    unnest(make_array({columns})) AS value \
             FROM events_pinned WHERE {range} \
             UNION ALL \
             SELECT merchant_id, date_trunc('hour', ts), name, visitor_id, 'event:goal', \
                    trim(unnest(string_to_array(properties['goal'], ','))) \
             FROM events_pinned WHERE {range} AND properties['goal'] IS NOT NULL \
             UNION ALL \
             SELECT merchant_id, hour, name, visitor_id, 'event:props:' || k, v FROM ( \
                 SELECT merchant_id, date_trunc('hour', ts) AS hour, name, visitor_id, \
                        unnest(map_keys(properties)) AS k, unnest(map_values(properties)) AS v \
                 FROM events_pinned WHERE {range} AND cardinality(properties) > 0) p \
             WHERE NOT starts_with(k, '$')), \
         agg AS ( \
             SELECT merchant_id, hour, dimension, value, count(*) AS events, \
                    sum(CASE WHEN name = 'pageview' THEN 1 ELSE 0 END) AS pageviews, \
                    hll_sketch(visitor_id) AS visitors_hll \
             FROM base WHERE value IS NOT NULL AND value <> '' GROUP BY 1, 2, 3, 4), \
         ranked AS ( \
             SELECT *, row_number() OVER (PARTITION BY merchant_id, hour, dimension \
                                          ORDER BY events DESC, value) AS rank \
             FROM agg) \
         SELECT merchant_id, hour, dimension, \
                CASE WHEN rank <= {BREAKDOWN_CAP} THEN value ELSE '{OTHER}' END AS value, \
                sum(events) AS events, sum(pageviews) AS pageviews, \
                hll_union(visitors_hll) AS visitors_hll \
         FROM ranked GROUP BY 1, 2, 3, 4"
    )
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunStats {
    /// `events` sequence range aggregated: (from, to].
    pub from_seq: u64,
    pub to_seq: u64,
    pub rollup_rows: usize,
    pub revenue_rows: usize,
    pub breakdown_rows: usize,
    /// Visits written to `visits` (new ones and the ones later events extended).
    pub visit_rows: u64,
}

/// Brings the rollup tables and `visits` ([`crate::visits`]) up to the latest committed
/// `events` snapshot.
///
/// Each table's delta is committed only if the table still has the watermark and the
/// generation ([`ROLLUP_GEN_PROPERTY`]) read *before* `events` was pinned: a second rollup
/// runner or a rebuild of past hours (re-processing, forgetting) that landed meanwhile makes
/// this run skip the table (the next run redoes it), never count rows twice or stale.
pub async fn run_once(wh: &Warehouse) -> Result<RunStats, WarehouseError> {
    let kinds = [
        TableKind::RollupsHourly,
        TableKind::RevenueHourly,
        TableKind::BreakdownsHourly,
        TableKind::Visits,
    ];
    let mut targets = Vec::with_capacity(kinds.len());
    for kind in kinds {
        let target = wh.table(kind).await?;
        let from_seq = snapshot_property_u64(&target, ROLLUP_SEQ_PROPERTY);
        let generation = tables::snapshot_property(&target, ROLLUP_GEN_PROPERTY);
        targets.push((kind, target, from_seq, generation));
    }
    let events = wh.table(TableKind::Events).await?;
    let Some(snapshot) = events.metadata().current_snapshot().cloned() else {
        return Ok(RunStats::default());
    };
    // With several ingest partitions, the lowest one's: everything at or below it is in.
    let to_seq = tables::stream_floor(&events);
    let mut stats = RunStats {
        to_seq,
        ..Default::default()
    };
    // One session for both tables, with the exact `events` snapshot whose sequence we record.
    let mut session = None;
    for (kind, target, from_seq, generation) in targets {
        if from_seq >= to_seq {
            continue;
        }
        stats.from_seq = from_seq;
        let ctx = match &session {
            Some(ctx) => ctx,
            None => {
                let ctx = wh.session().await?;
                let pinned = IcebergStaticTableProvider::try_new_from_table_snapshot(
                    events.clone(),
                    snapshot.snapshot_id(),
                )
                .await?;
                ctx.register_table("events_pinned", Arc::new(pinned))?;
                session.insert(ctx)
            }
        };
        if kind == TableKind::Visits {
            match crate::visits::run(wh, ctx, target, from_seq, to_seq, generation).await {
                Ok(rows) => stats.visit_rows = rows,
                // A rebuild or another runner moved the table on, or maintenance rewrote a
                // file this run would replace: the next run starts from the new state.
                Err(e @ (WarehouseError::Stale { .. } | WarehouseError::NotLive { .. })) => {
                    tracing::debug!(table = kind.name(), error = %e, "visits raced another commit; next run");
                }
                Err(e) => return Err(e),
            }
            continue;
        }
        let range = format!("stream_seq > {from_seq} AND stream_seq <= {to_seq}");
        let batches = ctx
            .sql(&rollup_query(kind, &range))
            .await?
            .collect()
            .await?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        // (`conform` casts the sums and turns `hll_sketch`'s Binary into LargeBinary.)
        let batch = tables::conform(&batches, &arrow_schema(&target)?)?;
        let mut delta = Rewrite::new(
            Operation::Append,
            format!("rollup-{}", uuid::Uuid::now_v7()),
        );
        delta.added = tables::write_files(kind, &target, batch).await?;
        delta.properties = HashMap::from([(ROLLUP_SEQ_PROPERTY.to_string(), to_seq.to_string())]);
        delta.require = vec![
            (ROLLUP_SEQ_PROPERTY.to_string(), seq_text(from_seq)),
            (ROLLUP_GEN_PROPERTY.to_string(), generation),
        ];
        // Starting from the table the files were written for saves a load per delta.
        match wh.replace_owned(kind, Some(target), &delta).await {
            Ok(_) => {}
            Err(e) => {
                if let WarehouseError::Stale { .. } = e {
                    tracing::debug!(table = kind.name(), error = %e, "rollup delta raced a rebuild or another runner; next run");
                    continue;
                }
                return Err(e);
            }
        }
        match kind {
            TableKind::RollupsHourly => stats.rollup_rows = rows,
            TableKind::BreakdownsHourly => stats.breakdown_rows = rows,
            _ => stats.revenue_rows = rows,
        }
    }
    Ok(stats)
}

/// The aggregation of `kind` over the `events_pinned` rows that `range` selects.
fn rollup_query(kind: TableKind, range: &str) -> String {
    let range = format!("({range})");
    match kind {
            TableKind::RollupsHourly => format!(
                "SELECT merchant_id, date_trunc('hour', ts) AS hour, \
                        count(*) AS events, \
                        sum(CASE WHEN name = 'pageview' THEN 1 ELSE 0 END) AS pageviews, \
                        hll_sketch(visitor_id) AS visitors_hll, \
                        sum(CASE WHEN revenue_micros IS NOT NULL THEN 1 ELSE 0 END) AS revenue_events \
                 FROM events_pinned WHERE {range} GROUP BY 1, 2"
            ),
            TableKind::BreakdownsHourly => breakdowns_query(&range),
            _ => format!(
                "SELECT merchant_id, date_trunc('hour', ts) AS hour, currency, \
                        count(*) AS orders, sum(revenue_micros) AS revenue_micros \
                 FROM events_pinned WHERE {range} AND revenue_micros IS NOT NULL AND currency IS NOT NULL \
                 GROUP BY 1, 2, 3"
        ),
    }
}

/// A rollup watermark as its snapshot property reads: absent (empty) before the first run.
pub(crate) fn seq_text(seq: u64) -> String {
    if seq == 0 {
        String::new()
    } else {
        seq.to_string()
    }
}

/// Hours `[from, to)` (epoch microseconds, whole hours) of one merchant's rollups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourSpan {
    pub merchant_id: String,
    pub from_us: i64,
    pub to_us: i64,
}

const HOUR_US: i64 = 3_600_000_000;

impl HourSpan {
    /// The whole hours covering the timestamps `[min_us, max_us]`.
    pub fn covering(merchant_id: &str, min_us: i64, max_us: i64) -> Self {
        Self {
            merchant_id: merchant_id.to_string(),
            from_us: min_us.div_euclid(HOUR_US) * HOUR_US,
            to_us: (max_us.div_euclid(HOUR_US) + 1) * HOUR_US,
        }
    }
}

/// What [`rebuild`] did to one rollup table.
#[derive(Debug)]
pub struct Rebuilt {
    pub kind: TableKind,
    pub report: crate::rewrite::RowReport,
    /// The `events` sequence the rebuilt rows cover (the table's watermark).
    pub events_seq: u64,
}

/// Rebuilds the rollup rows of `spans` from `events` as it is now: each rollup table's rows
/// of those merchant-hours are replaced by one fresh row per key aggregating every `events`
/// row up to the table's watermark, in one replace commit per table (job `<job_id>/<table>`).
/// Needed when `events` rows were replaced or removed (re-processing, forgetting): deltas
/// can add, but an HLL sketch cannot subtract a visitor.
///
/// A rollup run that moves a table's watermark meanwhile makes the commit stale (it may hold
/// deltas of old rows); the table is then rebuilt again from the new watermark.
pub async fn rebuild(
    wh: &Warehouse,
    spans: &[HourSpan],
    job_id: &str,
) -> Result<Vec<Rebuilt>, WarehouseError> {
    if spans.is_empty() {
        return Ok(Vec::new());
    }
    // The three tables are independent: rebuilt concurrently.
    let runs = [
        TableKind::RollupsHourly,
        TableKind::RevenueHourly,
        TableKind::BreakdownsHourly,
        TableKind::Visits,
    ]
    .map(|kind| async move {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match rebuild_table(wh, kind, spans, &format!("{job_id}/{}", kind.name())).await {
                Err(WarehouseError::Stale { .. } | WarehouseError::NotLive { .. })
                    if attempt < 20 =>
                {
                    tracing::debug!(
                        table = kind.name(),
                        attempt,
                        "rollup rebuild raced a commit; again"
                    );
                }
                r => return r,
            }
        }
    });
    futures::future::join_all(runs).await.into_iter().collect()
}

async fn rebuild_table(
    wh: &Warehouse,
    kind: TableKind,
    spans: &[HourSpan],
    job_id: &str,
) -> Result<Rebuilt, WarehouseError> {
    let target = wh.table(kind).await?;
    let seq = snapshot_property_u64(&target, ROLLUP_SEQ_PROPERTY);
    let report = crate::rewrite::RowReport::default();
    if seq == 0 {
        // Nothing rolled up yet: the next run aggregates everything.
        return Ok(Rebuilt {
            kind,
            report,
            events_seq: 0,
        });
    }
    let events = wh.table(TableKind::Events).await?;
    let ctx = wh.session().await?;
    if let Some(snapshot) = events.metadata().current_snapshot() {
        let pinned = IcebergStaticTableProvider::try_new_from_table_snapshot(
            events.clone(),
            snapshot.snapshot_id(),
        )
        .await?;
        ctx.register_table("events_pinned", Arc::new(pinned))?;
    }
    if kind == TableKind::Visits {
        let report = crate::visits::rebuild(wh, &ctx, &target, spans, seq, job_id).await?;
        return Ok(Rebuilt {
            kind,
            report,
            events_seq: seq,
        });
    }
    let range = format!("stream_seq <= {seq} AND ({})", spans_sql(spans, "ts", "ts"));
    let batches = ctx
        .sql(&rollup_query(kind, &range))
        .await?
        .collect()
        .await?;
    let fresh = tables::conform(&batches, &arrow_schema(&target)?)?;
    let by_merchant: HashMap<&str, Vec<(i64, i64)>> =
        spans.iter().fold(HashMap::new(), |mut m, s| {
            m.entry(s.merchant_id.as_str())
                .or_default()
                .push((s.from_us, s.to_us));
            m
        });
    let drop = |b: &arrow::record_batch::RecordBatch| -> Result<
        arrow::array::BooleanArray,
        arrow::error::ArrowError,
    > {
        let merchants = crate::rewrite::str_column(b, "merchant_id")?;
        let hours = crate::rewrite::i64_column(b, "hour")?;
        Ok(merchants
            .iter()
            .zip(hours.iter())
            .map(|(m, h)| {
                Some(match (m.and_then(|m| by_merchant.get(m)), h) {
                    (Some(ranges), Some(h)) => ranges.iter().any(|(a, b)| *a <= h && h < *b),
                    _ => false,
                })
            })
            .collect())
    };
    let mut prune = Vec::new();
    if by_merchant.len() == 1 {
        prune.push(crate::rewrite::Prune::string(
            "merchant_id",
            &spans[0].merchant_id,
        ));
    }
    let (lo, hi) = spans.iter().fold((i64::MAX, i64::MIN), |(lo, hi), s| {
        (lo.min(s.from_us), hi.max(s.to_us - 1))
    });
    prune.push(crate::rewrite::Prune::long("hour", lo, hi));
    let report = crate::rewrite::rewrite_rows(
        wh,
        &target,
        crate::rewrite::RowRewrite {
            prune,
            added: Some(fresh),
            require: vec![(ROLLUP_SEQ_PROPERTY.to_string(), seq.to_string())],
            // A new generation: delta runs that read `events` before this are refused.
            properties: HashMap::from([(
                ROLLUP_GEN_PROPERTY.to_string(),
                uuid::Uuid::now_v7().to_string(),
            )]),
            ..crate::rewrite::RowRewrite::new(kind, job_id, &drop)
        },
    )
    .await?;
    Ok(Rebuilt {
        kind,
        report,
        events_seq: seq,
    })
}

/// Rows of `spans` (their merchant, and `end_col >= from AND start_col < to`: for a point in
/// time both are the same column), as an SQL predicate.
pub(crate) fn spans_sql(spans: &[HourSpan], end_col: &str, start_col: &str) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "(merchant_id = '{}' AND {end_col} >= '{}' AND {start_col} < '{}')",
                s.merchant_id.replace('\'', "''"),
                rfc3339(s.from_us),
                rfc3339(s.to_us)
            )
        })
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// `2026-12-03T10:00:00.000000Z` for epoch microseconds.
pub fn rfc3339(us: i64) -> String {
    match arrow::temporal_conversions::timestamp_us_to_datetime(us) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        None => "1970-01-01T00:00:00Z".into(),
    }
}

/// Runs [`run_once`] every `interval` until `shutdown` turns true; errors are logged and
/// retried next round (the watermark makes every run idempotent).
/// `report` hears each run's outcome (a readiness check).
pub async fn run_loop(
    wh: Arc<Warehouse>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
    report: impl Fn(Result<(), String>) + Send + 'static,
) {
    loop {
        let started = std::time::Instant::now();
        let run = run_once(&wh).await;
        report(run.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        let outcome = if run.is_ok() { "ok" } else { "error" };
        metrics::counter!("beacon_rollup_runs_total", "outcome" => outcome).increment(1);
        metrics::histogram!("beacon_rollup_run_seconds").record(started.elapsed().as_secs_f64());
        if let Ok(s) = &run {
            metrics::gauge!("beacon_rollup_sequence").set(s.to_seq as f64);
        }
        match run {
            Ok(s) if s.rollup_rows + s.revenue_rows + s.breakdown_rows > 0 || s.visit_rows > 0 => {
                tracing::info!(
                    visit_rows = s.visit_rows,
                    from = s.from_seq,
                    to = s.to_seq,
                    rows = s.rollup_rows,
                    revenue_rows = s.revenue_rows,
                    breakdown_rows = s.breakdown_rows,
                    "rollups updated"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "rollup run failed; will retry"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
    }
}
