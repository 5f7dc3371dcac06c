//! Table maintenance: compaction, rollup folding, manifest rewriting, snapshot expiry and
//! deletion of files nothing references any more. Safe while ingest and rollups commit: every
//! rewrite is one [`replace`](crate::replace) commit that removes only files that are still
//! live (a concurrent append is kept; a concurrent rewrite of the same files makes this one
//! abort and try again next run), and expiry keeps every snapshot younger than the retention.
//!
//! What runs, per table:
//! 1. **compact**: per partition and size tier ([`plan_bins`]: tiered, so data is rewritten a
//!    logarithmic number of times, not on every run), files under 3/4 of the target size are
//!    packed into bins of at most [`MaintainOptions::bin_bytes`] input bytes; each bin of two
//!    or more files is read,
//!    sorted and written back as one file (rollup tables are *folded* on the way: one row per
//!    key within the bin, sums added and HLL sketches unioned, so the 30-second deltas of the
//!    files in a bin become one row per merchant-hour). All bins of a table land in one
//!    `replace` snapshot that also rewrites the manifests into one.
//! 2. **rewrite manifests** when nothing was compacted but the manifest count is high.
//! 3. **expire snapshots** older than [`MaintainOptions::retain`] (keeping at least
//!    [`MaintainOptions::retain_last`]), through the `iceberg` crate's own action.
//! 4. **delete** data files, manifests, manifest lists and metadata JSON files that no retained
//!    snapshot or metadata-log entry references and that are older than
//!    [`MaintainOptions::orphan_age`] (so a writer's staged but not yet committed files
//!    survive), on local disk or in an S3 bucket ([`crate::storage`]: FileIO cannot list).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use iceberg::scan::FileScanTask;
use iceberg::spec::{DataFile, DataFileFormat, ManifestContentType, Operation};
use iceberg::table::Table;
use iceberg::transaction::{ApplyTransactionAction, Transaction};

use crate::replace::Rewrite;
use crate::storage::Files;
use crate::tables::{self, TARGET_FILE_BYTES};
use crate::{TableKind, Warehouse, WarehouseError};

#[derive(Debug, Clone)]
pub struct MaintainOptions {
    /// Plan and report only; write nothing.
    pub dry_run: bool,
    /// Most input bytes (compressed) read into one compacted file: bounds memory.
    pub bin_bytes: u64,
    /// Snapshots younger than this are kept (time travel, readers in flight).
    pub retain: Duration,
    /// At least this many snapshots are kept whatever their age.
    pub retain_last: usize,
    /// Unreferenced files younger than this are kept: a writer may be about to commit them.
    pub orphan_age: Duration,
    /// Rewrite manifests (without compaction) once a snapshot has more than this many.
    pub max_manifests: usize,
}

impl Default for MaintainOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            bin_bytes: 64 << 20,
            retain: Duration::from_secs(300),
            retain_last: 10,
            orphan_age: Duration::from_secs(3600),
            max_manifests: 16,
        }
    }
}

/// What one table's maintenance found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableReport {
    pub table: &'static str,
    pub files_before: u64,
    pub bytes_before: u64,
    pub rows_before: u64,
    pub manifests_before: u64,
    pub files_after: u64,
    pub bytes_after: u64,
    pub rows_after: u64,
    pub manifests_after: u64,
    /// Bins compacted (each: several files in, one or a few out).
    pub bins: u64,
    pub files_compacted: u64,
    pub snapshots_expired: u64,
    pub files_deleted: u64,
    pub bytes_deleted: u64,
    /// Set when the rewrite lost to another job and was skipped until the next run.
    pub skipped: Option<String>,
}

impl std::fmt::Display for TableReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<18} files {:>6} -> {:<6} bytes {:>11} -> {:<11} rows {:>10} -> {:<10} manifests {:>4} -> {:<4} bins {:>3}  expired {:>4}  deleted {} files ({} bytes)",
            self.table,
            self.files_before,
            self.files_after,
            self.bytes_before,
            self.bytes_after,
            self.rows_before,
            self.rows_after,
            self.manifests_before,
            self.manifests_after,
            self.bins,
            self.snapshots_expired,
            self.files_deleted,
            self.bytes_deleted,
        )?;
        if let Some(why) = &self.skipped {
            write!(f, "  (rewrite skipped: {why})")?;
        }
        Ok(())
    }
}

/// Progress of a long run: (table, step, done, total).
pub type Progress<'a> = &'a (dyn Fn(&str, &str, u64, u64) + Send + Sync);

/// Maintains `kind` (see the module docs for the steps).
pub async fn maintain_table(
    wh: &Warehouse,
    kind: TableKind,
    options: &MaintainOptions,
    progress: Progress<'_>,
) -> Result<TableReport, WarehouseError> {
    let table = wh.table(kind).await?;
    let live = live_files(&table).await?;
    let (files, bytes, rows) = live.stats();
    let bins = plan_bins(&live.files, options.bin_bytes);
    let mut report = TableReport {
        table: kind.name(),
        files_before: files,
        bytes_before: bytes,
        rows_before: rows,
        manifests_before: live.manifests,
        bins: bins.len() as u64,
        files_compacted: bins.iter().map(|b| b.len() as u64).sum(),
        ..Default::default()
    };
    if options.dry_run {
        // What a run would leave: each bin becomes one file (bytes and rows as they are,
        // though folding shrinks a rollup table's rows).
        report.files_after = files - report.files_compacted + report.bins;
        (report.bytes_after, report.rows_after) = (bytes, rows);
        report.manifests_after = live.manifests;
        return Ok(report);
    }

    let mut changed = false;
    if !bins.is_empty() || live.manifests as usize > options.max_manifests {
        let mut rewrite = Rewrite::new(
            Operation::Replace,
            format!("maintain-{}", uuid::Uuid::now_v7()),
        );
        rewrite.merge_manifests = true;
        let total = bins.len() as u64;
        for (i, bin) in bins.iter().enumerate() {
            progress(kind.name(), "compact", i as u64, total);
            let batch = fold(kind, &table, read_files(&table, bin).await?).await?;
            rewrite
                .added
                .extend(tables::write_files(kind, &table, batch).await?);
            rewrite
                .removed
                .extend(bin.iter().map(|f| f.file.file_path().to_string()));
        }
        progress(kind.name(), "compact", total, total);
        match wh.replace(kind, &rewrite).await {
            Ok(_) => changed = true,
            Err(e @ WarehouseError::NotLive { .. }) => {
                // Another maintenance run got there first: our output is unreferenced (the
                // next runs delete it once old enough) and the next run re-plans.
                report.skipped = Some(e.to_string());
                (report.bins, report.files_compacted) = (0, 0);
                for f in &rewrite.added {
                    let _ = table.file_io().delete(f.file_path()).await;
                }
            }
            Err(e) => return Err(e),
        }
    }
    progress(kind.name(), "expire", 0, 1);
    report.snapshots_expired = expire(wh, kind, options).await?;
    changed |= report.snapshots_expired > 0;
    progress(kind.name(), "delete", 0, 1);
    (report.files_deleted, report.bytes_deleted) = delete_unreferenced(wh, kind, options).await?;

    let after = if changed {
        live_files(&wh.table(kind).await?).await?
    } else {
        live
    };
    (report.files_after, report.bytes_after, report.rows_after) = after.stats();
    report.manifests_after = after.manifests;
    Ok(report)
}

/// Maintains every table in `kinds`, one after another.
pub async fn maintain(
    wh: &Warehouse,
    kinds: &[TableKind],
    options: &MaintainOptions,
    progress: Progress<'_>,
) -> Result<Vec<TableReport>, WarehouseError> {
    let mut reports = Vec::new();
    for kind in kinds {
        reports.push(maintain_table(wh, *kind, options, progress).await?);
    }
    Ok(reports)
}

/// Runs [`maintain`] over all tables every `interval` (the warehouse role's schedule);
/// errors are logged and retried next round.
pub async fn run_loop(
    wh: Arc<Warehouse>,
    interval: Duration,
    options: MaintainOptions,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        for kind in TableKind::ALL {
            let started = std::time::Instant::now();
            let run = maintain_table(&wh, kind, &options, &|_, _, _, _| {}).await;
            let outcome = if run.is_ok() { "ok" } else { "error" };
            metrics::counter!("beacon_maintenance_runs_total", "table" => kind.name(), "outcome" => outcome)
                .increment(1);
            metrics::histogram!("beacon_maintenance_run_seconds", "table" => kind.name())
                .record(started.elapsed().as_secs_f64());
            match run {
                Ok(r) if r.bins + r.snapshots_expired + r.files_deleted > 0 => {
                    tracing::info!(report = %r, "maintenance")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(table = kind.name(), error = %e, "maintenance failed; will retry")
                }
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }
}

/// A live data file and the partition spec of the manifest that lists it.
#[derive(Clone)]
pub(crate) struct LiveFile {
    pub(crate) file: DataFile,
    pub(crate) spec_id: i32,
}

pub(crate) struct Live {
    pub(crate) files: Vec<LiveFile>,
    manifests: u64,
}

impl Live {
    /// (files, bytes, rows)
    fn stats(&self) -> (u64, u64, u64) {
        self.files.iter().fold((0, 0, 0), |(n, b, r), f| {
            (
                n + 1,
                b + f.file.file_size_in_bytes(),
                r + f.file.record_count(),
            )
        })
    }
}

pub(crate) async fn live_files(table: &Table) -> Result<Live, WarehouseError> {
    let mut live = Live {
        files: Vec::new(),
        manifests: 0,
    };
    let Some(snapshot) = table.metadata().current_snapshot() else {
        return Ok(live);
    };
    let list = table.manifest_list_reader(snapshot).load().await?;
    for manifest in list.entries() {
        live.manifests += 1;
        if manifest.content != ManifestContentType::Data {
            continue;
        }
        let loaded = manifest.load_manifest(table.file_io()).await?;
        for e in loaded.entries().iter().filter(|e| e.is_alive()) {
            live.files.push(LiveFile {
                file: e.data_file().clone(),
                spec_id: manifest.partition_spec_id,
            });
        }
    }
    Ok(live)
}

/// Size tiers for compaction: tier 0 is under [`TIER_BASE`], tier k holds
/// [`TIER_BASE`] x 4^(k-1) up to 4^k.
const TIER_BASE: u64 = 1 << 20;
/// Files a tier above 0 needs before it is compacted (tier 0, the fresh small files, needs
/// two).
const TIER_MIN_FILES: usize = 4;

fn tier(size: u64) -> u32 {
    let mut tier = 0;
    let mut bound = TIER_BASE;
    while size >= bound && bound < u64::MAX {
        tier += 1;
        bound = bound.saturating_mul(4);
    }
    tier
}

/// Bins to compact, size-tiered so that data is rewritten O(log size) times rather than on
/// every run: per partition, files under 3/4 of the target size are grouped by [`tier`]; a
/// tier with enough files (two in tier 0, four above) is packed, smallest first, into bins
/// of at most `bin_bytes`; a bin needs at least two files. Four files of one tier make about
/// one file of the next.
fn plan_bins(files: &[LiveFile], bin_bytes: u64) -> Vec<Vec<LiveFile>> {
    let small = (TARGET_FILE_BYTES as u64) * 3 / 4;
    type Key = (i32, String, u32);
    let mut groups: BTreeMap<Key, Vec<&LiveFile>> = BTreeMap::new();
    for f in files {
        let size = f.file.file_size_in_bytes();
        if size < small && f.file.file_format() == DataFileFormat::Parquet {
            // Debug text orders partitions stably (Struct has no Ord).
            groups
                .entry((f.spec_id, format!("{:?}", f.file.partition()), tier(size)))
                .or_default()
                .push(f);
        }
    }
    let mut bins = Vec::new();
    for ((_, _, tier), mut group) in groups {
        if group.len() < if tier == 0 { 2 } else { TIER_MIN_FILES } {
            continue;
        }
        group.sort_by_key(|f| f.file.file_size_in_bytes());
        let mut bin: Vec<LiveFile> = Vec::new();
        let mut bytes = 0;
        for f in group {
            let size = f.file.file_size_in_bytes();
            if !bin.is_empty() && bytes + size > bin_bytes {
                if bin.len() > 1 {
                    bins.push(std::mem::take(&mut bin));
                } else {
                    bin.clear();
                }
                bytes = 0;
            }
            bytes += size;
            bin.push(f.clone());
        }
        if bin.len() > 1 {
            bins.push(bin);
        }
    }
    bins
}

/// Reads `files` of `table` with its current schema (older files get NULL for newer columns).
pub(crate) async fn read_files(
    table: &Table,
    files: &[LiveFile],
) -> Result<RecordBatch, WarehouseError> {
    let md = table.metadata();
    let schema = md.current_schema().clone();
    let field_ids: Vec<i32> = schema.as_struct().fields().iter().map(|f| f.id).collect();
    let mut tasks = Vec::with_capacity(files.len());
    for LiveFile { file: f, spec_id } in files {
        let spec = md.partition_spec_by_id(*spec_id).cloned();
        tasks.push(Ok(FileScanTask::builder()
            .with_file_size_in_bytes(f.file_size_in_bytes())
            .with_start(0)
            .with_length(f.file_size_in_bytes())
            .with_record_count(Some(f.record_count()))
            .with_data_file_path(f.file_path().to_string())
            .with_data_file_format(f.file_format())
            .with_schema(schema.clone())
            .with_project_field_ids(field_ids.clone())
            .with_partition(Some(f.partition().clone()))
            .with_partition_spec(spec)
            .with_case_sensitive(true)
            .build()));
    }
    let stream = table
        .reader_builder()
        .build()
        .read(Box::pin(futures::stream::iter(tasks)))?
        .stream();
    let batches: Vec<RecordBatch> = stream.try_collect().await?;
    tables::conform(&batches, &tables::arrow_schema(table)?)
}

/// Folds a rollup table's delta rows into one row per key (what its views compute anyway);
/// other tables' batches are returned as they are.
async fn fold(
    kind: TableKind,
    table: &Table,
    batch: RecordBatch,
) -> Result<RecordBatch, WarehouseError> {
    let query = match kind {
        TableKind::RollupsHourly => {
            "SELECT merchant_id, hour, sum(events), sum(pageviews), hll_union(visitors_hll), \
                    sum(revenue_events) FROM t GROUP BY merchant_id, hour"
        }
        TableKind::RevenueHourly => {
            "SELECT merchant_id, hour, currency, sum(orders), sum(revenue_micros) \
             FROM t GROUP BY merchant_id, hour, currency"
        }
        TableKind::BreakdownsHourly => {
            "SELECT merchant_id, hour, dimension, value, sum(events), sum(pageviews), \
                    hll_union(visitors_hll) FROM t GROUP BY merchant_id, hour, dimension, value"
        }
        _ => return Ok(batch),
    };
    let ctx = SessionContext::new();
    crate::hll::register(&ctx);
    // Arrow field-id metadata is irrelevant to the aggregation; drop it for DataFusion.
    let plain = Arc::new(arrow::datatypes::Schema::new(
        batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_metadata(HashMap::new()))
            .collect::<Vec<_>>(),
    ));
    let input = RecordBatch::try_new(plain.clone(), batch.columns().to_vec())?;
    ctx.register_table("t", Arc::new(MemTable::try_new(plain, vec![vec![input]])?))?;
    let folded = ctx.sql(query).await?.collect().await?;
    // (`conform` also turns `hll_union`'s Binary into the table's LargeBinary.)
    tables::conform(&folded, &tables::arrow_schema(table)?)
}

/// Expires snapshots per the options; returns how many were removed.
async fn expire(
    wh: &Warehouse,
    kind: TableKind,
    options: &MaintainOptions,
) -> Result<u64, WarehouseError> {
    let table = wh.table(kind).await?;
    let before = table.metadata().snapshots().count() as u64;
    let cutoff = SystemTime::now()
        .checked_sub(options.retain)
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let expirable = table
        .metadata()
        .snapshots()
        .filter(|s| s.timestamp_ms() < cutoff)
        .count();
    if before as usize <= options.retain_last || expirable == 0 {
        return Ok(0);
    }
    let tx = Transaction::new(&table);
    let action = tx
        .expire_snapshots()
        .expire_older_than_ms(cutoff)
        .retain_last(options.retain_last.max(1));
    let tx = action.apply(tx)?;
    let table = tx.commit(wh.catalog().as_ref()).await?;
    Ok(before.saturating_sub(table.metadata().snapshots().count() as u64))
}

/// Deletes files under the table's location (on local disk or in a bucket) that nothing
/// retained references (see module docs). Returns (files, bytes) deleted.
async fn delete_unreferenced(
    wh: &Warehouse,
    kind: TableKind,
    options: &MaintainOptions,
) -> Result<(u64, u64), WarehouseError> {
    let table = wh.table(kind).await?;
    let md = table.metadata();
    let Some(files) = Files::of(md.location(), wh.location().props())? else {
        tracing::warn!(
            table = kind.name(),
            location = md.location(),
            "unreferenced-file cleanup: not a local path or an S3 bucket"
        );
        return Ok((0, 0));
    };
    let mut keep: HashSet<String> = HashSet::new();
    if let Some(current) = table.metadata_location() {
        keep.extend(files.key(current));
    }
    for entry in md.metadata_log() {
        keep.extend(files.key(&entry.metadata_file));
    }
    let mut seen_manifests: HashSet<String> = HashSet::new();
    for snapshot in md.snapshots() {
        keep.extend(files.key(snapshot.manifest_list()));
        let list = table.manifest_list_reader(snapshot).load().await?;
        for manifest in list.entries() {
            keep.extend(files.key(&manifest.manifest_path));
            if !seen_manifests.insert(manifest.manifest_path.clone()) {
                continue;
            }
            let loaded = manifest.load_manifest(table.file_io()).await?;
            for e in loaded.entries().iter().filter(|e| e.is_alive()) {
                keep.extend(files.key(e.file_path()));
            }
        }
    }
    let cutoff = SystemTime::now()
        .checked_sub(options.orphan_age)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut deleted = (0u64, 0u64);
    for stored in files.list(md.location()).await? {
        // No time from the store: treated as young (kept), as a file being written is.
        let old = stored.modified.is_some_and(|m| m <= cutoff);
        if keep.contains(&stored.key) || !old {
            continue;
        }
        match files.delete(&stored.key).await {
            Ok(()) => {
                deleted.0 += 1;
                deleted.1 += stored.bytes;
            }
            // Gone meanwhile (another maintenance run) or refused: the next run retries.
            Err(e) => {
                tracing::warn!(table = kind.name(), error = %e, "deleting an unreferenced file")
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_grow_by_four() {
        assert_eq!(tier(0), 0);
        assert_eq!(tier(TIER_BASE - 1), 0);
        assert_eq!(tier(TIER_BASE), 1);
        assert_eq!(tier(4 * TIER_BASE - 1), 1);
        assert_eq!(tier(4 * TIER_BASE), 2);
        assert_eq!(tier(64 * TIER_BASE), 4);
        assert!(tier(u64::MAX) < 32);
    }
}
