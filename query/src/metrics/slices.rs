//! A merchant's rows of a rollup table kept in memory, and a plan's rollup sources
//! answered from them without planning a query.
//!
//! Why: a computed panel costs about 3 ms of CPU in DataFusion, most of it fixed (session,
//! plan, optimizer, physical plan, opening files) whatever the rows, while one merchant's
//! rollup rows are few: at most ~183k over 90 days at 10M events (26k of one dimension). A
//! [`Slice`] is one merchant's rows of `rollups_hourly`, `breakdowns_hourly` (every
//! dimension: one scan of the merchant's rows, not one per dimension) or `revenue_hourly`,
//! at one snapshot of that table:
//!
//! - loaded once through the merchant's session (the same view SQL reads, so rows are
//!   scoped to the merchant by the one mechanism both paths share), the merchant's whole
//!   history of that table, so any date range, bucket, time zone and breakdown is
//!   answered from it;
//! - kept while the table's snapshot is current, in a cache bounded in bytes; a new
//!   snapshot is a new key (the result cache keys its answers the same way);
//! - too big (a merchant with a huge number of property values) is remembered as such and
//!   the source runs in DataFusion, whose aggregation is bounded by the query budget.
//!
//! The rows equal DataFusion's for the same plan (bucket labels, sums, sketch unions
//! estimated as `hll_estimate(hll_union(..))`): `tests/metrics_slices.rs` compares the two
//! over every rolled-up dimension, bucket and several time zones.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type};
use arrow::record_batch::RecordBatch;
use beacon_warehouse::hll::Union;
use beacon_warehouse::scan::Increment;
use chrono::DateTime;
use chrono_tz::Tz;
use datafusion::error::{DataFusionError, Result};
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use serde_json::{json, Map, Value};

use super::dates::bucket_label;
use super::plan::{Plan, Source, SourceKind};
use super::request::{Dim, TimeBucket};
use crate::budget::{Budget, Stopped};

/// `values` of a row without one (SQL NULL).
const NONE: u32 = u32::MAX;

/// Which rows of which table a slice holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    merchant: String,
    table: &'static str,
    snapshot: i64,
}

/// One merchant's rows of one rollup table at one snapshot of it.
#[derive(Debug)]
pub struct Slice {
    /// The snapshot whose rows these are (`None`: not known, so the next snapshot's slice
    /// is read whole rather than extended by the rows added since).
    snapshot: Option<i64>,
    /// Shared with the next snapshot's slice when that added none of the merchant's rows.
    columns: Arc<Columns>,
}

impl std::ops::Deref for Slice {
    type Target = Columns;

    fn deref(&self) -> &Columns {
        &self.columns
    }
}

/// A slice's rows, sorted by breakdown dimension, then hour. Columns are kept apart so a
/// range is a binary search.
#[derive(Debug, Default)]
pub struct Columns {
    /// The rows of each `dimension` of `breakdowns_hourly` (one part, named "", for the
    /// other tables), sorted by name.
    parts: Vec<(String, Range<usize>)>,
    /// Microseconds since the epoch (UTC).
    hours: Vec<i64>,
    /// The row's `value` (`currency` of `revenue_hourly`) as an index into `names`; `None`
    /// for `rollups_hourly`, which has no such column.
    values: Option<Vec<u32>>,
    names: Vec<String>,
    /// `events` (`orders` of `revenue_hourly`).
    a: Vec<i64>,
    /// `pageviews` (`revenue_micros`).
    b: Vec<i64>,
    /// Where each row's sketch ends in `sketches` (it starts where the previous one ends;
    /// NULL is empty); empty for `revenue_hourly`.
    sketch_ends: Vec<u32>,
    sketches: Vec<u8>,
}

impl Columns {
    /// What it holds in memory, about.
    fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.hours.capacity() * 8
            + self.values.as_ref().map_or(0, Vec::capacity) * 4
            + self.names.iter().map(|n| n.capacity() + 24).sum::<usize>()
            + self
                .parts
                .iter()
                .map(|p| p.0.capacity() + 40)
                .sum::<usize>()
            + (self.a.capacity() + self.b.capacity()) * 8
            + self.sketch_ends.capacity() * 4
            + self.sketches.capacity()
    }

    /// The rows of `dimension` (of the whole table: `None`), empty if it has none.
    fn part(&self, dimension: Option<&str>) -> Range<usize> {
        let name = dimension.unwrap_or("");
        match self.parts.binary_search_by(|p| p.0.as_str().cmp(name)) {
            Ok(i) => self.parts[i].1.clone(),
            Err(_) => 0..0,
        }
    }

    /// The rows of `part` with an hour in `[from, to)` (microseconds).
    fn range(&self, part: Range<usize>, from: i64, to: i64) -> Range<usize> {
        let hours = &self.hours[part.clone()];
        part.start + hours.partition_point(|h| *h < from)
            ..part.start + hours.partition_point(|h| *h < to)
    }

    fn sketch(&self, row: usize) -> &[u8] {
        let start = match row {
            0 => 0,
            r => self.sketch_ends[r - 1] as usize,
        };
        &self.sketches[start..self.sketch_ends[row] as usize]
    }
}

/// The table (and breakdown dimension) a source of `plan` reads, when slices can answer
/// it: the rolled-up sources.
fn slice_of(plan: &Plan, source: &Source) -> Option<(&'static str, Option<String>)> {
    if !source.rolled_up() {
        return None;
    }
    match source.kind {
        SourceKind::Rollups => {
            let table = *source.tables.first()?;
            let dimension = plan.dims.iter().find_map(Dim::breakdown);
            Some((table, dimension.filter(|_| table == "breakdowns_hourly")))
        }
        SourceKind::Totals => Some(("rollups_hourly", None)),
        SourceKind::Revenue => Some(("revenue_hourly", None)),
        SourceKind::Events | SourceKind::Sessions => None,
    }
}

/// Rows grouped on the runtime's worker at most; more go to a blocking thread, so one
/// request's grouping does not hold up the others' on the same worker.
const INLINE_ROWS: usize = 20_000;

/// Slices kept in memory, bounded in bytes, shared by every merchant's requests.
pub struct Slices {
    cache: moka::future::Cache<Key, Arc<Slice>>,
    /// Each (merchant, table)'s newest slice (by the snapshot it was keyed by): what the
    /// next snapshot's slice is extended from, and the entry it replaces.
    latest: moka::sync::Cache<(String, &'static str), (i64, Weak<Slice>)>,
    /// (merchant, table) whose slice was too big lately: DataFusion answers without a
    /// wasted load on every new snapshot.
    too_big: moka::future::Cache<(String, &'static str), ()>,
    /// A slice bigger than this is not kept (nor is a bigger one loaded past it).
    max_slice_bytes: usize,
    counts: Counters,
}

#[derive(Default)]
struct Counters {
    loaded: AtomicU64,
    extended: AtomicU64,
    reused: AtomicU64,
}

/// What slices did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Slices read whole (every row of the merchant's in the table).
    pub loaded: u64,
    /// Slices made from the previous snapshot's and the rows added since.
    pub extended: u64,
    /// Answers from a slice already in memory.
    pub reused: u64,
}

impl Slices {
    /// Keeps at most `max_bytes` of slices, least useful first out beyond it.
    pub fn new(max_bytes: u64) -> Self {
        Self {
            cache: moka::future::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_: &Key, v: &Arc<Slice>| u32::try_from(v.bytes()).unwrap_or(u32::MAX))
                .build(),
            // (Small entries, but millions of merchants: the recently active are kept.)
            latest: moka::sync::Cache::builder()
                .max_capacity(1 << 20)
                .time_to_idle(Duration::from_secs(600))
                .build(),
            too_big: moka::future::Cache::builder()
                .max_capacity(65_536)
                .time_to_live(Duration::from_secs(600))
                .build(),
            max_slice_bytes: (max_bytes / 4).min(64 << 20) as usize,
            counts: Counters::default(),
        }
    }

    pub fn counts(&self) -> Counts {
        Counts {
            loaded: self.counts.loaded.load(Ordering::Relaxed),
            extended: self.counts.extended.load(Ordering::Relaxed),
            reused: self.counts.reused.load(Ordering::Relaxed),
        }
    }

    /// The rows of `source` of `plan` from a slice (loaded in `ctx`, the plan's merchant's
    /// session under `budget`, when not in memory), as DataFusion would give them; `None`
    /// when slices do not answer it (not a rolled-up source, no snapshot yet, or too big).
    /// The grouping takes one of the merchant's query slots and stops at `deadline`.
    pub async fn rows(
        &self,
        ctx: &SessionContext,
        budget: &Arc<Budget>,
        plan: &Plan,
        source: &Source,
        snapshots: &[(&str, Option<i64>)],
        deadline: Deadline,
    ) -> Result<Option<Vec<Value>>> {
        let Some((table, dimension)) = slice_of(plan, source) else {
            return Ok(None);
        };
        let Some(snapshot) = snapshots
            .iter()
            .find(|(t, _)| *t == table)
            .and_then(|(_, s)| *s)
        else {
            return Ok(None);
        };
        let merchant = plan.merchant_id.clone();
        let mine = (merchant.clone(), table);
        if self.too_big.contains_key(&mine) {
            return Ok(None);
        }
        let key = Key {
            merchant,
            table,
            snapshot,
        };
        let previous = self.latest.get(&mine);
        let base = previous.as_ref().and_then(|(_, s)| s.upgrade());
        let max = self.max_slice_bytes;
        let entry = match self
            .cache
            .entry(key.clone())
            .or_try_insert_with(load(ctx, table, max, base, &self.counts))
            .await
        {
            Ok(entry) => entry,
            Err(e) => match &*e {
                // Every request that waited on this load sees it too.
                LoadError::TooBig => {
                    self.too_big.insert(mine, ()).await;
                    return Ok(None);
                }
                LoadError::Query(e) => return Err(DataFusionError::Shared(e.clone())),
            },
        };
        if entry.is_fresh() {
            self.replaced(mine, previous, &key, entry.value()).await;
        } else {
            self.counts.reused.fetch_add(1, Ordering::Relaxed);
        }
        let slice = entry.into_value();
        let part = slice.part(dimension.as_deref());
        // The load's own slot was released when its stream ended.
        let _slot = budget.slot(&plan.merchant_id).await?;
        if part.len() <= INLINE_ROWS {
            return rows(plan, source.kind, &slice, part, deadline).map(Some);
        }
        let (plan, kind) = (plan.clone(), source.kind);
        tokio::task::spawn_blocking(move || rows(&plan, kind, &slice, part, deadline))
            .await
            .map_err(|e| DataFusionError::Execution(format!("grouping a slice: {e}")))?
            .map(Some)
    }
}

impl Slices {
    /// Records `slice`, just loaded under `key`, as (merchant, table) `mine`'s newest, and
    /// drops the slice it replaces (`previous` when the load began): requests resolve the
    /// newest snapshot, so the older slice's memory goes now rather than when the cache's
    /// bound needs it. Not when another load replaced `previous` meanwhile, nor when this one
    /// read a newer snapshot than its key (a request that resolved its snapshot late):
    /// neither is the newest.
    async fn replaced(
        &self,
        mine: (String, &'static str),
        previous: Option<(i64, Weak<Slice>)>,
        key: &Key,
        slice: &Arc<Slice>,
    ) {
        if slice.snapshot != Some(key.snapshot) {
            return;
        }
        let now = self.latest.get(&mine);
        let same = match (&now, &previous) {
            (None, None) => true,
            (Some((a, x)), Some((b, y))) => a == b && x.ptr_eq(y),
            _ => false,
        };
        if !same {
            return;
        }
        if let Some((old, _)) = previous.filter(|(old, _)| *old != key.snapshot) {
            self.cache
                .invalidate(&Key {
                    snapshot: old,
                    ..key.clone()
                })
                .await;
        }
        self.latest
            .insert(mine, (key.snapshot, Arc::downgrade(slice)));
    }
}

/// Interns strings as indexes into `names`.
#[derive(Default)]
struct Names {
    names: Vec<String>,
    index: HashMap<String, u32>,
}

impl Names {
    /// The index of `name`, and the bytes it added.
    fn of(&mut self, name: &str) -> (u32, usize) {
        if let Some(n) = self.index.get(name) {
            return (*n, 0);
        }
        let n = self.names.len() as u32;
        self.names.push(name.to_string());
        self.index.insert(name.to_string(), n);
        (n, 2 * name.len() + 48)
    }
}

/// Why a slice was not loaded: an error, or more than its share of memory (then the
/// source runs in DataFusion, whose aggregation the query budget bounds).
enum LoadError {
    TooBig,
    Query(Arc<DataFusionError>),
}

/// [`read`], as the cache of slices keeps it, counted.
async fn load(
    ctx: &SessionContext,
    table: &'static str,
    max_bytes: usize,
    base: Option<Arc<Slice>>,
    counts: &Counters,
) -> std::result::Result<Arc<Slice>, LoadError> {
    match read(ctx, table, max_bytes, base.as_deref()).await {
        Ok(Some((slice, extended))) => {
            let count = match extended {
                true => &counts.extended,
                false => &counts.loaded,
            };
            count.fetch_add(1, Ordering::Relaxed);
            Ok(Arc::new(slice))
        }
        Ok(None) => Err(LoadError::TooBig),
        Err(e) => Err(LoadError::Query(Arc::new(e))),
    }
}

/// Which columns of a rollup table a slice reads, and which of its own they fill.
struct Shape {
    /// The hour first, then (dimension, value, a, b, sketch) where present.
    columns: &'static [&'static str],
    dimension: bool,
    value: bool,
    sketch: bool,
}

impl Shape {
    fn of(table: &str) -> Result<Self> {
        let (columns, dimension, value, sketch): (&'static [&'static str], _, _, _) = match table {
            "rollups_hourly" => (
                &["hour", "events", "pageviews", "visitors_hll"],
                false,
                false,
                true,
            ),
            "breakdowns_hourly" => (
                &[
                    "hour",
                    "dimension",
                    "value",
                    "events",
                    "pageviews",
                    "visitors_hll",
                ],
                true,
                true,
                true,
            ),
            "revenue_hourly" => (
                &["hour", "currency", "orders", "revenue_micros"],
                false,
                true,
                false,
            ),
            other => {
                return Err(DataFusionError::Internal(format!(
                    "{other} is not a rollup table"
                )))
            }
        };
        Ok(Self {
            columns,
            dimension,
            value,
            sketch,
        })
    }
}

/// (dimension, hour, value, a, b, the sketch's bytes in the builder's `blobs`)
type Row = (u32, i64, u32, i64, i64, Range<usize>);

/// A slice's rows as they are read, before sorting into columns.
#[derive(Default)]
struct Builder {
    rows: Vec<Row>,
    blobs: Vec<u8>,
    dimensions: Names,
    names: Names,
    /// Bytes the slice will take, about.
    size: usize,
}

impl Builder {
    /// Starting from the rows of `columns` (which stay in their order, and their values'
    /// indexes keep their meaning).
    fn from(columns: &Columns) -> Self {
        let mut builder = Self {
            rows: Vec::with_capacity(columns.hours.len()),
            blobs: columns.sketches.clone(),
            size: columns.bytes(),
            ..Self::default()
        };
        for name in &columns.names {
            builder.names.of(name);
        }
        for (name, part) in &columns.parts {
            let d = match name.as_str() {
                "" => NONE,
                name => builder.dimensions.of(name).0,
            };
            for row in part.clone() {
                let sketch = match columns.sketch_ends.is_empty() {
                    true => 0..0,
                    false => {
                        let end = columns.sketch_ends[row] as usize;
                        end - columns.sketch(row).len()..end
                    }
                };
                builder.rows.push((
                    d,
                    columns.hours[row],
                    columns.values.as_ref().map_or(NONE, |v| v[row]),
                    columns.a[row],
                    columns.b[row],
                    sketch,
                ));
            }
        }
        builder
    }

    /// Adds the rows of `batch` (the `shape`'s columns in order); `false` once the slice
    /// would take more than `max_bytes`.
    fn add(&mut self, batch: &RecordBatch, shape: &Shape, max_bytes: usize) -> Result<bool> {
        let mut next = 0;
        let mut column = |to: &DataType| {
            next += 1;
            cast(batch.column(next - 1), to)
        };
        let hours = column(&DataType::Int64)?;
        let dims = if shape.dimension {
            Some(column(&DataType::Utf8)?)
        } else {
            None
        };
        let values = if shape.value {
            Some(column(&DataType::Utf8)?)
        } else {
            None
        };
        let a = column(&DataType::Int64)?;
        let b = column(&DataType::Int64)?;
        let sketches = if shape.sketch {
            Some(column(&DataType::Binary)?)
        } else {
            None
        };
        let hours = hours.as_primitive::<Int64Type>();
        let (a, b) = (a.as_primitive::<Int64Type>(), b.as_primitive::<Int64Type>());
        let dims = dims.as_ref().map(|v| v.as_string::<i32>());
        let values = values.as_ref().map(|v| v.as_string::<i32>());
        let sketches = sketches.as_ref().map(|s| s.as_binary::<i32>());
        let number = |c: &arrow::array::PrimitiveArray<Int64Type>, i: usize| {
            if c.is_null(i) {
                0
            } else {
                c.value(i)
            }
        };
        for i in 0..batch.num_rows() {
            if hours.is_null(i) {
                continue;
            }
            let size = &mut self.size;
            let mut intern =
                |names: &mut Names, column: Option<&arrow::array::StringArray>| match column
                    .filter(|c| !c.is_null(i))
                {
                    Some(c) => {
                        let (n, added) = names.of(c.value(i));
                        *size += added;
                        n
                    }
                    None => NONE,
                };
            let d = intern(&mut self.dimensions, dims);
            let v = intern(&mut self.names, values);
            let start = self.blobs.len();
            if let Some(s) = sketches.filter(|s| !s.is_null(i)) {
                self.blobs.extend_from_slice(s.value(i));
            }
            self.rows.push((
                d,
                hours.value(i),
                v,
                number(a, i),
                number(b, i),
                start..self.blobs.len(),
            ));
            self.size += 56 + (self.blobs.len() - start);
            if self.size > max_bytes {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The rows as a slice's columns.
    fn build(mut self, shape: &Shape) -> Columns {
        let dimensions = &self.dimensions.names;
        // By dimension name (parts are found by binary search), then hour and value.
        let order: Vec<u32> = {
            let mut by_name: Vec<u32> = (0..dimensions.len() as u32).collect();
            by_name.sort_by(|x, y| dimensions[*x as usize].cmp(&dimensions[*y as usize]));
            let mut rank = vec![0u32; by_name.len()];
            for (r, d) in by_name.iter().enumerate() {
                rank[*d as usize] = r as u32;
            }
            rank
        };
        // Rows without a dimension (every row of the other tables) form the part named "".
        let rank = |d: u32| if d == NONE { 0 } else { order[d as usize] + 1 };
        // Stable: rows from an earlier slice are one sorted run ahead of the added ones,
        // which the sort merges rather than sorting everything again.
        self.rows.sort_by_key(|r| (rank(r.0), r.1, r.2));
        let rows = &self.rows;
        let mut parts: Vec<(String, Range<usize>)> = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            let name = match r.0 {
                NONE => "",
                d => dimensions[d as usize].as_str(),
            };
            match parts.last_mut() {
                Some(p) if p.0 == name => p.1.end = i + 1,
                _ => parts.push((name.to_string(), i..i + 1)),
            }
        }
        let mut columns = Columns {
            parts,
            hours: rows.iter().map(|r| r.1).collect(),
            values: shape.value.then(|| rows.iter().map(|r| r.2).collect()),
            names: self.names.names,
            a: rows.iter().map(|r| r.3).collect(),
            b: rows.iter().map(|r| r.4).collect(),
            sketch_ends: Vec::new(),
            sketches: Vec::new(),
        };
        if shape.sketch {
            columns.sketches.reserve_exact(self.blobs.len());
            columns.sketch_ends.reserve_exact(rows.len());
            for r in rows {
                columns.sketches.extend_from_slice(&self.blobs[r.5.clone()]);
                columns.sketch_ends.push(columns.sketches.len() as u32);
            }
        }
        columns
    }
}

/// The merchant's rows of `table` through the merchant's session `ctx` (every breakdown
/// dimension at once: one scan of the merchant's rows instead of one per dimension), and
/// whether they extend `base` (an earlier snapshot's slice) by the rows added since rather
/// than being read whole; `None` past `max_bytes`.
async fn read(
    ctx: &SessionContext,
    table: &'static str,
    max_bytes: usize,
    base: Option<&Slice>,
) -> Result<Option<(Slice, bool)>> {
    let shape = Shape::of(table)?;
    // The scan reads only the files added since the base's snapshot where that gives the
    // rows added since (beacon_warehouse::scan::Increment), and says whether it did.
    let increment = Arc::new(Increment::new(table, base.and_then(|b| b.snapshot)));
    let mut state = ctx.state();
    state.config_mut().set_extension(increment.clone());
    let mut stream = SessionContext::new_with_state(state)
        .table(table)
        .await?
        .select_columns(shape.columns)?
        .execute_stream()
        .await?;
    let scanned = increment.scanned();
    let base = base.filter(|_| scanned.is_some_and(|s| s.added_only));
    let mut builder = base.map_or_else(Builder::default, |b| Builder::from(&b.columns));
    while let Some(batch) = stream.next().await {
        if !builder.add(&batch?, &shape, max_bytes)? {
            return Ok(None);
        }
    }
    let snapshot = scanned.and_then(|s| s.snapshot);
    let columns = match base {
        // Nothing of the merchant's was added: the same rows, as of the newer snapshot.
        Some(base) if builder.rows.len() == base.hours.len() => base.columns.clone(),
        _ => Arc::new(builder.build(&shape)),
    };
    Ok(Some((Slice { snapshot, columns }, base.is_some())))
}

/// The label of the bucket holding `hour` (microseconds, UTC) in `tz`.
fn label(bucket: TimeBucket, tz: Tz, hour: i64) -> Option<String> {
    Some(bucket_label(
        tz,
        DateTime::from_timestamp_micros(hour)?,
        bucket,
    ))
}

/// When a request's statement timeout stops its grouping.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    timeout: Duration,
}

impl Deadline {
    pub fn after(timeout: Duration) -> Self {
        Self {
            at: Instant::now() + timeout,
            timeout,
        }
    }

    fn check(&self) -> Result<()> {
        if Instant::now() > self.at {
            return Err(DataFusionError::External(Box::new(Stopped::Timeout(
                self.timeout.as_millis() as u64,
            ))));
        }
        Ok(())
    }
}

/// What a group sums.
struct Acc {
    a: i64,
    b: i64,
    visitors: Option<Union>,
}

/// The rows a `kind` source of `plan` gives in DataFusion (`d0..` and metric columns, see
/// [`super::logical`]), from `slice`.
fn rows(
    plan: &Plan,
    kind: SourceKind,
    slice: &Slice,
    part: Range<usize>,
    deadline: Deadline,
) -> Result<Vec<Value>> {
    let failed = |e: String| DataFusionError::Execution(e);
    let time = plan.dims.iter().enumerate().find_map(|(i, d)| match d {
        Dim::Time(t) => Some((i, *t)),
        _ => None,
    });
    let other = plan.dims.iter().position(|d| !d.is_time());
    // Totals group by time only; revenue always by currency (a dimension or a column).
    let by_value = match kind {
        SourceKind::Rollups => other.is_some(),
        SourceKind::Revenue => true,
        _ => false,
    };
    let values = match (&slice.values, by_value) {
        (Some(v), true) => Some(v),
        (None, true) => return Err(failed("a breakdown asked of a slice without values".into())),
        (_, false) => None,
    };
    let sketched = matches!(kind, SourceKind::Rollups | SourceKind::Totals);
    let micros = |t: DateTime<chrono::Utc>| t.timestamp_micros();
    let range = slice.range(part, micros(plan.from), micros(plan.to));

    let mut labels: Vec<String> = Vec::new();
    let mut label_index: HashMap<String, u32> = HashMap::new();
    let mut last: Option<(i64, u32)> = None;
    let mut index: HashMap<(u32, u32), usize> = HashMap::new();
    let mut groups: Vec<((u32, u32), Acc)> = Vec::new();
    for row in range {
        // The statement timeout holds here too (the grouping runs outside DataFusion).
        if row % 4096 == 0 {
            deadline.check()?;
        }
        let value = values.map_or(NONE, |v| v[row]);
        // Rows without a value for a breakdown count in none of its groups.
        if kind == SourceKind::Rollups
            && by_value
            && (value == NONE || slice.names[value as usize].is_empty())
        {
            continue;
        }
        let bucket = match time {
            None => NONE,
            Some((_, t)) => {
                let hour = slice.hours[row];
                match last {
                    Some((h, l)) if h == hour => l,
                    _ => {
                        let text = label(t, plan.tz, hour)
                            .ok_or_else(|| failed(format!("hour {hour} has no local time")))?;
                        let l = match label_index.get(&text) {
                            Some(p) => *p,
                            None => {
                                label_index.insert(text.clone(), labels.len() as u32);
                                labels.push(text);
                                labels.len() as u32 - 1
                            }
                        };
                        last = Some((hour, l));
                        l
                    }
                }
            }
        };
        let at = match index.get(&(bucket, value)) {
            Some(at) => *at,
            None => {
                groups.push((
                    (bucket, value),
                    Acc {
                        a: 0,
                        b: 0,
                        visitors: if sketched {
                            Some(Union::new().map_err(failed)?)
                        } else {
                            None
                        },
                    },
                ));
                index.insert((bucket, value), groups.len() - 1);
                groups.len() - 1
            }
        };
        let acc = &mut groups[at].1;
        acc.a += slice.a[row];
        acc.b += slice.b[row];
        if let Some(u) = &mut acc.visitors {
            let sketch = slice.sketch(row);
            if !sketch.is_empty() {
                u.merge(sketch).map_err(failed)?;
            }
        }
    }

    let visitors = |acc: &Acc| {
        acc.visitors
            .as_ref()
            .map_or(0, |u| u.estimate().round() as i64)
    };
    let name = |v: u32| match v {
        NONE => Value::Null,
        v => Value::String(slice.names[v as usize].clone()),
    };
    let mut out = Vec::with_capacity(groups.len().max(1));
    // An aggregate without groups has one row even over no rows (sums NULL).
    let ungrouped = match kind {
        SourceKind::Rollups => plan.dims.is_empty(),
        SourceKind::Totals => time.is_none(),
        _ => false,
    };
    if groups.is_empty() && ungrouped {
        out.push(match kind {
            SourceKind::Totals => json!({"total_visitors": 0}),
            // Sums over no rows are NULL, which the JSON rows leave out.
            _ => json!({"visitors": 0}),
        });
        return Ok(out);
    }
    for ((bucket, value), acc) in &groups {
        let mut row = Map::new();
        let bucket = || Value::String(labels[*bucket as usize].clone());
        match kind {
            SourceKind::Totals => {
                if time.is_some() {
                    row.insert("t".into(), bucket());
                }
                row.insert("total_visitors".into(), visitors(acc).into());
            }
            _ => {
                for (i, d) in plan.dims.iter().enumerate() {
                    let v = if d.is_time() { bucket() } else { name(*value) };
                    row.insert(format!("d{i}"), v);
                }
                if kind == SourceKind::Revenue {
                    if other.is_none() {
                        row.insert("currency".into(), name(*value));
                    }
                    row.insert("orders".into(), acc.a.into());
                    row.insert("revenue_micros".into(), acc.b.into());
                } else {
                    row.insert("events".into(), acc.a.into());
                    row.insert("pageviews".into(), acc.b.into());
                    row.insert("visitors".into(), visitors(acc).into());
                }
            }
        }
        out.push(Value::Object(row));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn at(y: i32, m: u32, d: u32, h: u32) -> i64 {
        Utc.with_ymd_and_hms(y, m, d, h, 0, 0)
            .unwrap()
            .timestamp_micros()
    }

    #[test]
    fn labels_are_local_buckets() {
        let ny: Tz = "America/New_York".parse().unwrap();
        // 03:00 UTC on a Monday is 23:00 on Sunday in New York (EDT).
        let t = at(2026, 6, 1, 3);
        assert_eq!(
            label(TimeBucket::Hour, ny, t).unwrap(),
            "2026-05-31 23:00:00"
        );
        assert_eq!(label(TimeBucket::Day, ny, t).unwrap(), "2026-05-31");
        assert_eq!(label(TimeBucket::Week, ny, t).unwrap(), "2026-05-25");
        assert_eq!(label(TimeBucket::Month, ny, t).unwrap(), "2026-05-01");
        assert_eq!(label(TimeBucket::Week, Tz::UTC, t).unwrap(), "2026-06-01");
    }

    #[test]
    fn ranges_are_half_open_by_hour() {
        let slice = Columns {
            hours: vec![
                at(2026, 1, 1, 0),
                at(2026, 1, 1, 1),
                at(2026, 1, 1, 1),
                at(2026, 1, 1, 3),
            ],
            ..Columns::default()
        };
        // (part, from, to, rows): positions stay the slice's within a part (a dimension's).
        for (part, from, to, want) in [
            (0..4, at(2026, 1, 1, 1), at(2026, 1, 1, 3), 1..3),
            (0..4, at(2025, 1, 1, 1), at(2027, 1, 1, 3), 0..4),
            (0..4, at(2026, 1, 1, 2), at(2026, 1, 1, 3), 3..3),
            (2..4, at(2025, 1, 1, 1), at(2027, 1, 1, 3), 2..4),
            (1..3, at(2026, 1, 1, 1), at(2026, 1, 1, 2), 1..3),
        ] {
            assert_eq!(slice.range(part.clone(), from, to), want, "{part:?}");
        }
    }
}
