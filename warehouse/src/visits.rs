//! Pre-aggregated visits: the `visits` table, one row per visit, kept current by the rollup
//! role beside the hourly rollups, and rebuilt with them when `events` rows are replaced or
//! removed (re-processing, forgetting). The `sessions` view reads it (`crate::views`).
//!
//! A visit is the events of one visit key (the tracker's session id, else the visitor id,
//! else the event id) with no gap over [`GAP`]. A later event can extend a visit, join two
//! visits into one, or (removed by a re-processing job) split one; so a run does not append
//! deltas, it replaces rows:
//!
//! 1. **seeds**: per key, the time range that changed (a run: the new events' first and
//!    last time; a rebuild: the rebuilt span);
//! 2. **windows**: each seed's range widened to the key's existing visits that lie within
//!    [`GAP`] of it. Visits of one key never overlap in time and are more than [`GAP`] apart,
//!    so every visit of the key lies wholly inside the window or wholly outside it, and the
//!    ones outside cannot change;
//! 3. the window's stored visits and the new events are merged into visits again, and those
//!    rows replace the key's rows that start inside the window, in one replace commit
//!    ([`crate::rewrite::rewrite_rows`]) that also moves the watermark.
//!
//! Step 3 works on *segments*: a stored visit is a segment (first and last time, counts,
//! its entry and exit event and their attributes) and a new event is a segment of one
//! event. Sorted by start, a segment starts a new visit when it begins over [`GAP`] after
//! every earlier segment of the key has ended; the merged visit's counts are sums, its entry
//! is its earliest segment's and its exit its latest's. So a run reads only the new events
//! and the stored visits of their keys, never older `events` rows. A rebuild cannot merge
//! (removed events may split a visit): it makes one-event segments of every `events` row of
//! the key inside the window.
//!
//! The commit requires the watermark and generation read before `events` was pinned, as
//! the rollup deltas do, so two runners or a run racing a rebuild never apply a change
//! twice or on stale rows. Re-running the same `events` rows gives the same rows: a visit's
//! entry and exit events are ordered by time, then event id.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::error::ArrowError;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use iceberg::spec::Operation;
use iceberg::table::Table;
use iceberg_datafusion::IcebergStaticTableProvider;

use crate::replace::Rewrite;
use crate::rewrite::{i64_column, str_column, Prune, RowReport, RowRewrite};
use crate::rollup::{rfc3339, HourSpan};
use crate::tables::{self, ROLLUP_GEN_PROPERTY, ROLLUP_SEQ_PROPERTY};
use crate::{TableKind, Warehouse, WarehouseError};

/// The longest pause inside one visit (as Google Analytics and Plausible count them).
const GAP_US: i64 = 30 * 60 * 1_000_000;
const GAP: &str = "INTERVAL '30 minutes'";

/// The visit's key, from an `events` row.
const VISIT_KEY: &str = "COALESCE(session_id, visitor_id, event_id)";

/// The `events` columns whose first non-null value is an event's visit key (`VISIT_KEY`):
/// for readers that join events to their visits (the metrics API's visit metrics by event
/// dimensions).
pub const VISIT_KEY_COLUMNS: [&str; 3] = ["session_id", "visitor_id", "event_id"];

/// Which event of a visit a visit's value is taken from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pick {
    /// Its first event (time, then event id).
    Entry,
    /// Its last event (time, then event id).
    Exit,
}

/// The visit's string columns: (column, which event it comes from, `events` column). Ties
/// in time are broken by event id, so a visit's entry and exit are the same on every run.
const ATTRIBUTES: &[(&str, Pick, &str)] = &[
    ("entry_url", Pick::Entry, "url"),
    ("exit_url", Pick::Exit, "url"),
    ("entry_page", Pick::Entry, "path"),
    ("exit_page", Pick::Exit, "path"),
    ("source", Pick::Entry, "source"),
    ("medium", Pick::Entry, "medium"),
    ("utm_source", Pick::Entry, "utm_source"),
    ("utm_medium", Pick::Entry, "utm_medium"),
    ("utm_campaign", Pick::Entry, "utm_campaign"),
    ("country", Pick::Entry, "country"),
    ("region", Pick::Entry, "region"),
    ("city", Pick::Entry, "city"),
    ("device", Pick::Entry, "device"),
    ("browser", Pick::Entry, "browser"),
    ("os", Pick::Entry, "os"),
    ("pipeline_version", Pick::Entry, "pipeline_version"),
];

/// The visit's string columns, in the table's order (its schema reads them).
pub fn attribute_columns() -> impl Iterator<Item = &'static str> {
    ATTRIBUTES.iter().map(|(name, _, _)| *name)
}

/// `each` of (column, pick, `events` column), as one SQL select list.
fn select_attributes(each: impl Fn(&str, Pick, &str) -> String) -> String {
    ATTRIBUTES
        .iter()
        .map(|(name, pick, column)| each(name, *pick, column))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One-event segments of the `events` rows `from` selects (`ev`: the events columns and
/// `visit_key`).
fn event_segments(from: &str) -> String {
    let attributes = select_attributes(|name, _, column| format!("ev.{column} AS {name}"));
    format!(
        "SELECT ev.merchant_id, ev.visit_key, ev.visitor_id, ev.ts AS s, ev.ts AS e, \
                CAST(1 AS BIGINT) AS events, \
                CAST(CASE WHEN ev.name = 'pageview' THEN 1 ELSE 0 END AS BIGINT) AS pageviews, \
                ev.event_id AS entry_event_id, ev.event_id AS exit_event_id, {attributes}, \
                ev.revenue_micros \
         FROM {from}"
    )
}

/// The stored visits (`visits_pinned`) that start inside their key's window: segments.
fn stored_segments() -> String {
    let attributes = select_attributes(|name, _, _| format!("v.{name}"));
    format!(
        "SELECT v.merchant_id, v.visit_key, v.visitor_id, v.started_at AS s, v.ended_at AS e, \
                v.events, v.pageviews, v.entry_event_id, v.exit_event_id, {attributes}, \
                v.revenue_micros \
         FROM visits_pinned v JOIN visit_windows w \
           ON v.merchant_id = w.merchant_id AND v.visit_key = w.visit_key \
          AND CAST(v.started_at AS BIGINT) >= w.lo AND CAST(v.started_at AS BIGINT) <= w.hi"
    )
}

/// Merges `segments` (see the module docs) into visits, in the `visits` table's columns.
fn merge_query(segments: &str) -> String {
    // Entry-side values come from the earliest segment, exit-side ones from the latest;
    // ties are broken by event id, so the same events give the same visit on every run.
    // A visit's earliest segment is the one that starts it (`starts_visit`, in the order the
    // gaps are found in), its latest is ranked once, and values are picked with plain
    // `max(CASE ..)`: as `first_value(.. ORDER BY ..)` aggregates, the 18 ordered picks took
    // 8-11 s for 400k events (ordering keys kept per group, row by row), a quarter of that
    // this way (docs/BENCHMARKS.md, "Re-processing").
    let pick = |rank: &str, value: &str| format!("max(CASE WHEN {rank} = 1 THEN {value} END)");
    let attributes = select_attributes(|name, which, _| {
        let rank = match which {
            Pick::Exit => "last_rank",
            Pick::Entry => "starts_visit",
        };
        format!("{} AS {name}", pick(rank, name))
    });
    let key = "PARTITION BY merchant_id, visit_key ORDER BY s, entry_event_id";
    let visit = "PARTITION BY merchant_id, visit_key, visit_no";
    format!(
        "WITH segments AS ({segments}), \
         gaps AS ( \
             SELECT *, CASE WHEN prev_e IS NULL OR s - prev_e > {GAP} THEN 1 ELSE 0 END AS starts_visit \
             FROM (SELECT *, max(e) OVER ({key} ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_e \
                   FROM segments)), \
         numbered AS ( \
             SELECT *, sum(starts_visit) OVER ({key} ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS visit_no \
             FROM gaps), \
         ranked AS ( \
             SELECT *, row_number() OVER ({visit} ORDER BY e DESC, exit_event_id DESC) AS last_rank \
             FROM numbered) \
         SELECT merchant_id, visit_key, \
                min(visitor_id) AS visitor_id, \
                min(s) AS started_at, \
                max(e) AS ended_at, \
                (CAST(max(e) AS BIGINT) - CAST(min(s) AS BIGINT)) / 1000 AS duration_ms, \
                CAST(sum(events) AS BIGINT) AS events, \
                CAST(sum(pageviews) AS BIGINT) AS pageviews, \
                {} AS entry_event_id, \
                {} AS exit_event_id, \
                {attributes}, \
                sum(pageviews) <= 1 AS bounce, \
                CAST(sum(revenue_micros) AS BIGINT) AS revenue_micros \
         FROM ranked GROUP BY merchant_id, visit_key, visit_no",
        pick("starts_visit", "entry_event_id"),
        pick("last_rank", "exit_event_id"),
    )
}

/// Where a refresh's segments come from.
enum Segments {
    /// A rollup run: the stored visits of the windows and the events in `(from, to]`.
    Extend { from_seq: u64, to_seq: u64 },
    /// A rebuild: every event up to `seq` of each key inside its window.
    Regroup { seq: u64 },
}

/// Per key, the time range `[lo, hi]` (epoch microseconds) whose visits are recomputed.
#[derive(Debug, Default)]
struct Windows {
    keys: HashMap<(String, String), (i64, i64)>,
}

impl Windows {
    fn span(&self) -> (i64, i64) {
        self.keys
            .values()
            .fold((i64::MAX, i64::MIN), |(a, b), (lo, hi)| {
                (a.min(*lo), b.max(*hi))
            })
    }

    fn merchants(&self) -> BTreeSet<&str> {
        self.keys.keys().map(|(m, _)| m.as_str()).collect()
    }

    /// An SQL predicate on `merchant_id` when few merchants are in play (for pruning), else
    /// `TRUE` (the join with `visit_windows` selects the rows either way).
    fn merchant_predicate(&self, column: &str) -> String {
        let merchants = self.merchants();
        if merchants.is_empty() || merchants.len() > 64 {
            return "TRUE".into();
        }
        let list = merchants
            .iter()
            .map(|m| format!("'{}'", m.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(", ");
        format!("{column} IN ({list})")
    }

    fn batch(&self) -> Result<RecordBatch, ArrowError> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("merchant_id", DataType::Utf8, false),
            Field::new("visit_key", DataType::Utf8, false),
            Field::new("lo", DataType::Int64, false),
            Field::new("hi", DataType::Int64, false),
        ]));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                self.keys.keys().map(|(m, _)| m.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                self.keys.keys().map(|(_, k)| k.as_str()),
            )),
            Arc::new(Int64Array::from_iter_values(
                self.keys.values().map(|(lo, _)| *lo),
            )),
            Arc::new(Int64Array::from_iter_values(
                self.keys.values().map(|(_, hi)| *hi),
            )),
        ];
        RecordBatch::try_new(schema, columns)
    }

    /// Drops the stored visits this refresh recomputes: the key's rows starting in its window.
    fn drop_mask(&self, batch: &RecordBatch) -> Result<BooleanArray, ArrowError> {
        let merchants = str_column(batch, "merchant_id")?;
        let keys = str_column(batch, "visit_key")?;
        let started = i64_column(batch, "started_at")?;
        let mut lookup = (String::new(), String::new());
        Ok((0..batch.num_rows())
            .map(|i| {
                if merchants.is_null(i) || keys.is_null(i) || started.is_null(i) {
                    return Some(false);
                }
                lookup.0.clear();
                lookup.0.push_str(merchants.value(i));
                lookup.1.clear();
                lookup.1.push_str(keys.value(i));
                let t = started.value(i);
                Some(
                    self.keys
                        .get(&lookup)
                        .is_some_and(|(lo, hi)| *lo <= t && t <= *hi),
                )
            })
            .collect())
    }
}

/// Seeds (merchant, key, first, last) as a query returns them.
fn seeds_of(batches: &[RecordBatch]) -> Result<Vec<(String, String, i64, i64)>, ArrowError> {
    let mut out = Vec::new();
    for b in batches {
        let merchants = str_column(b, "merchant_id")?;
        let keys = str_column(b, "visit_key")?;
        let lo = i64_column(b, "lo")?;
        let hi = i64_column(b, "hi")?;
        for i in 0..b.num_rows() {
            if merchants.is_null(i) || keys.is_null(i) || lo.is_null(i) || hi.is_null(i) {
                continue;
            }
            out.push((
                merchants.value(i).to_string(),
                keys.value(i).to_string(),
                lo.value(i),
                hi.value(i),
            ));
        }
    }
    Ok(out)
}

/// Widens each seed to the stored visits of its key within [`GAP_US`] of it (step 2).
/// The seeds are joined in SQL (`visit_seeds`), so only the visits that widen a window
/// come back, not every stored visit of the time range.
async fn windows(
    ctx: &SessionContext,
    seeds: Vec<(String, String, i64, i64)>,
    stored: bool,
) -> Result<Windows, WarehouseError> {
    let mut windows = Windows::default();
    for (m, k, lo, hi) in seeds {
        let w = windows.keys.entry((m, k)).or_insert((lo, hi));
        *w = (w.0.min(lo), w.1.max(hi));
    }
    if windows.keys.is_empty() || !stored {
        return Ok(windows);
    }
    let batch = windows.batch()?;
    ctx.register_table(
        "visit_seeds",
        Arc::new(MemTable::try_new(batch.schema(), vec![vec![batch]])?),
    )?;
    let (lo, hi) = windows.span();
    let sql = format!(
        "SELECT v.merchant_id, v.visit_key, CAST(v.started_at AS BIGINT) AS lo, \
                CAST(v.ended_at AS BIGINT) AS hi \
         FROM visits_pinned v JOIN visit_seeds s \
           ON v.merchant_id = s.merchant_id AND v.visit_key = s.visit_key \
          AND CAST(v.ended_at AS BIGINT) >= s.lo - {GAP_US} \
          AND CAST(v.started_at AS BIGINT) <= s.hi + {GAP_US} \
         WHERE v.ended_at >= '{}' AND v.started_at <= '{}' AND {}",
        rfc3339(lo.saturating_sub(GAP_US)),
        rfc3339(hi.saturating_add(GAP_US)),
        windows.merchant_predicate("v.merchant_id"),
    );
    for (m, k, start, end) in seeds_of(&ctx.sql(&sql).await?.collect().await?)? {
        if let Some(w) = windows.keys.get_mut(&(m, k)) {
            *w = (w.0.min(start), w.1.max(end));
        }
    }
    Ok(windows)
}

/// Registers `target`'s current snapshot as `visits_pinned`; false if it has none yet.
async fn pin(ctx: &SessionContext, target: &Table) -> Result<bool, WarehouseError> {
    let Some(s) = target.metadata().current_snapshot() else {
        return Ok(false);
    };
    let pinned =
        IcebergStaticTableProvider::try_new_from_table_snapshot(target.clone(), s.snapshot_id())
            .await?;
    ctx.register_table("visits_pinned", Arc::new(pinned))?;
    Ok(true)
}

/// What one refresh commits besides its rows.
struct Commit {
    job_id: String,
    require: Vec<(String, String)>,
    properties: HashMap<String, String>,
}

/// Steps 2 and 3 for `seeds`, committed to `target` (the table as read before `events` was
/// pinned).
async fn refresh(
    wh: &Warehouse,
    ctx: &SessionContext,
    target: &Table,
    seeds: Vec<(String, String, i64, i64)>,
    stored: bool,
    from: Segments,
    commit: Commit,
) -> Result<RowReport, WarehouseError> {
    let windows = windows(ctx, seeds, stored).await?;
    if windows.keys.is_empty() {
        // Nothing to recompute; the watermark still moves.
        let mut mark = Rewrite::new(Operation::Append, commit.job_id);
        mark.require = commit.require;
        mark.properties = commit.properties;
        let outcome = wh
            .replace_owned(TableKind::Visits, Some(target.clone()), &mark)
            .await?;
        return Ok(RowReport {
            outcome: Some(outcome),
            ..Default::default()
        });
    }
    let batch = windows.batch()?;
    ctx.register_table(
        "visit_windows",
        Arc::new(MemTable::try_new(batch.schema(), vec![vec![batch]])?),
    )?;
    let (lo, hi) = windows.span();
    let keyed = |bounds: String| {
        format!("(SELECT *, {VISIT_KEY} AS visit_key FROM events_pinned WHERE {bounds}) ev")
    };
    let segments = match from {
        Segments::Extend { from_seq, to_seq } => {
            // Every new event's key is a seed, so its window holds it: no join needed.
            let new = event_segments(&keyed(format!(
                "stream_seq > {from_seq} AND stream_seq <= {to_seq}"
            )));
            if stored {
                format!("{new} UNION ALL {}", stored_segments())
            } else {
                new
            }
        }
        Segments::Regroup { seq } => event_segments(&format!(
            "{} JOIN visit_windows w \
               ON ev.merchant_id = w.merchant_id AND ev.visit_key = w.visit_key \
              AND CAST(ev.ts AS BIGINT) >= w.lo AND CAST(ev.ts AS BIGINT) <= w.hi",
            keyed(format!(
                "stream_seq <= {seq} AND ts >= '{}' AND ts <= '{}' AND {}",
                rfc3339(lo),
                rfc3339(hi),
                windows.merchant_predicate("merchant_id"),
            ))
        )),
    };
    let fresh = ctx.sql(&merge_query(&segments)).await?.collect().await?;
    let fresh = tables::conform(&fresh, &tables::arrow_schema(target)?)?;
    let mut prune = vec![Prune::long("started_at", lo, hi)];
    let merchants = windows.merchants();
    if merchants.len() == 1 {
        if let Some(m) = merchants.first() {
            prune.push(Prune::string("merchant_id", m));
        }
    }
    let drop = |b: &RecordBatch| windows.drop_mask(b);
    crate::rewrite::rewrite_rows(
        wh,
        target,
        RowRewrite {
            prune,
            added: Some(fresh),
            require: commit.require,
            properties: commit.properties,
            ..RowRewrite::new(TableKind::Visits, commit.job_id, &drop)
        },
    )
    .await
}

/// Brings `visits` from its watermark `from_seq` to `to_seq` with the `events_pinned` rows in
/// between (a rollup run's step for this table). Returns the visits written.
pub(crate) async fn run(
    wh: &Warehouse,
    ctx: &SessionContext,
    target: Table,
    from_seq: u64,
    to_seq: u64,
    generation: String,
) -> Result<u64, WarehouseError> {
    let seeds = ctx
        .sql(&format!(
            "SELECT merchant_id, {VISIT_KEY} AS visit_key, CAST(min(ts) AS BIGINT) AS lo, \
                    CAST(max(ts) AS BIGINT) AS hi \
             FROM events_pinned WHERE stream_seq > {from_seq} AND stream_seq <= {to_seq} \
             GROUP BY 1, 2"
        ))
        .await?
        .collect()
        .await?;
    let commit = Commit {
        job_id: format!("visits-{}", uuid::Uuid::now_v7()),
        require: vec![
            (
                ROLLUP_SEQ_PROPERTY.to_string(),
                crate::rollup::seq_text(from_seq),
            ),
            (ROLLUP_GEN_PROPERTY.to_string(), generation),
        ],
        properties: HashMap::from([(ROLLUP_SEQ_PROPERTY.to_string(), to_seq.to_string())]),
    };
    let stored = pin(ctx, &target).await?;
    let report = refresh(
        wh,
        ctx,
        &target,
        seeds_of(&seeds)?,
        stored,
        Segments::Extend { from_seq, to_seq },
        commit,
    )
    .await?;
    Ok(report.rows_added)
}

/// Recomputes the visits of every key with events or stored visits in `spans`, from `events`
/// up to the table's watermark `seq` (`events_pinned` in `ctx`); job `job_id`, and a new
/// generation so that runs which read `events` before it cannot land after it.
pub(crate) async fn rebuild(
    wh: &Warehouse,
    ctx: &SessionContext,
    target: &Table,
    spans: &[HourSpan],
    seq: u64,
    job_id: &str,
) -> Result<RowReport, WarehouseError> {
    let stored = pin(ctx, target).await?;
    let mut seeds = Vec::new();
    let in_events = ctx
        .sql(&format!(
            "SELECT DISTINCT merchant_id, {VISIT_KEY} AS visit_key FROM events_pinned \
             WHERE stream_seq <= {seq} AND ({})",
            crate::rollup::spans_sql(spans, "ts", "ts")
        ))
        .await?
        .collect()
        .await?;
    let mut keys = Vec::new();
    keys.extend(in_events);
    if stored {
        keys.extend(
            ctx.sql(&format!(
                "SELECT DISTINCT merchant_id, visit_key FROM visits_pinned WHERE {}",
                crate::rollup::spans_sql(spans, "ended_at", "started_at")
            ))
            .await?
            .collect()
            .await?,
        );
    }
    // Each key's seed is its merchant's whole rebuilt range.
    let mut ranges: HashMap<&str, (i64, i64)> = HashMap::new();
    for s in spans {
        let r = ranges
            .entry(s.merchant_id.as_str())
            .or_insert((s.from_us, s.to_us - 1));
        *r = (r.0.min(s.from_us), r.1.max(s.to_us - 1));
    }
    for b in &keys {
        let merchants = str_column(b, "merchant_id")?;
        let visit_keys = str_column(b, "visit_key")?;
        for i in 0..b.num_rows() {
            if merchants.is_null(i) || visit_keys.is_null(i) {
                continue;
            }
            if let Some((lo, hi)) = ranges.get(merchants.value(i)) {
                seeds.push((
                    merchants.value(i).to_string(),
                    visit_keys.value(i).to_string(),
                    *lo,
                    *hi,
                ));
            }
        }
    }
    let commit = Commit {
        job_id: job_id.to_string(),
        require: vec![(ROLLUP_SEQ_PROPERTY.to_string(), seq.to_string())],
        properties: HashMap::from([(
            ROLLUP_GEN_PROPERTY.to_string(),
            uuid::Uuid::now_v7().to_string(),
        )]),
    };
    refresh(
        wh,
        ctx,
        target,
        seeds,
        stored,
        Segments::Regroup { seq },
        commit,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_visit_key_columns_are_the_visit_key() {
        assert_eq!(
            VISIT_KEY,
            format!("COALESCE({})", VISIT_KEY_COLUMNS.join(", "))
        );
    }
}
