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
//! value ([`BREAKDOWNS`]), capped at [`BREAKDOWN_CAP`] values per run with the rest folded
//! into [`OTHER`].
//!
//! Deltas accumulate small files; compaction (replace commits) will fold them later.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use iceberg_datafusion::IcebergStaticTableProvider;
use tokio::sync::watch;

use crate::tables::{self, arrow_schema, snapshot_property_u64, ROLLUP_SEQ_PROPERTY, SEQ_PROPERTY};
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

/// Breakdown dimensions kept in `breakdowns_hourly`: (API name, `events` column). Besides
/// these, `event:goal` (each goal named in the `goal` property, as the goals plugin writes
/// it) and `event:props:<key>` (every custom property not starting with `$`).
pub const BREAKDOWNS: &[(&str, &str)] = &[
    ("event:page", "path"),
    ("event:hostname", "hostname"),
    ("event:name", "name"),
    ("visit:source", "source"),
    ("visit:medium", "medium"),
    ("visit:utm_source", "utm_source"),
    ("visit:utm_medium", "utm_medium"),
    ("visit:utm_campaign", "utm_campaign"),
    ("visit:country", "country"),
    ("visit:region", "region"),
    ("visit:city", "city"),
    ("visit:device", "device"),
    ("visit:browser", "browser"),
    ("visit:os", "os"),
];

/// Distinct values kept per merchant, hour, dimension and rollup run; the rest are folded
/// into [`OTHER`]. Bounds a merchant-hour's rows however wild its URLs or properties are.
pub const BREAKDOWN_CAP: usize = 1000;
pub const OTHER: &str = "(other)";

fn breakdowns_query(range: &str) -> String {
    let names = BREAKDOWNS
        .iter()
        .map(|(n, _)| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let columns = BREAKDOWNS
        .iter()
        .map(|(_, c)| *c)
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
}

/// Brings both rollup tables up to the latest committed `events` snapshot.
pub async fn run_once(wh: &Warehouse) -> Result<RunStats, WarehouseError> {
    let events = wh.table(TableKind::Events).await?;
    let Some(snapshot) = events.metadata().current_snapshot().cloned() else {
        return Ok(RunStats::default());
    };
    let to_seq = snapshot_property_u64(&events, SEQ_PROPERTY);
    let mut stats = RunStats {
        to_seq,
        ..Default::default()
    };
    // One session for both tables, with the exact `events` snapshot whose sequence we record.
    let mut session = None;
    for kind in [
        TableKind::RollupsHourly,
        TableKind::RevenueHourly,
        TableKind::BreakdownsHourly,
    ] {
        let target = wh.table(kind).await?;
        let from_seq = snapshot_property_u64(&target, ROLLUP_SEQ_PROPERTY);
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
        let range = format!("stream_seq > {from_seq} AND stream_seq <= {to_seq}");
        let query = match kind {
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
        };
        let batches = ctx.sql(&query).await?.collect().await?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        // (`conform` casts the sums and turns `hll_sketch`'s Binary into LargeBinary.)
        let batch = tables::conform(&batches, &arrow_schema(&target)?)?;
        tables::append(
            wh.catalog().as_ref(),
            kind,
            &target,
            batch,
            HashMap::from([(ROLLUP_SEQ_PROPERTY.to_string(), to_seq.to_string())]),
        )
        .await?;
        match kind {
            TableKind::RollupsHourly => stats.rollup_rows = rows,
            TableKind::BreakdownsHourly => stats.breakdown_rows = rows,
            _ => stats.revenue_rows = rows,
        }
    }
    Ok(stats)
}

/// Runs [`run_once`] every `interval` until `shutdown` turns true; errors are logged and
/// retried next round (the watermark makes every run idempotent).
pub async fn run_loop(wh: Arc<Warehouse>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    loop {
        match run_once(&wh).await {
            Ok(s) if s.rollup_rows + s.revenue_rows + s.breakdown_rows > 0 => {
                tracing::info!(
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
