//! Row-level rewrites on top of the replace commit: drop the rows a mask selects from the
//! files that hold them, add new rows, and commit both in one snapshot. Re-processing (a
//! scope's `events` rows replaced by a re-run's), forgetting a person (rows dropped) and
//! rebuilding rollup hours all go through [`rewrite_rows`].
//!
//! Files are chosen from a pinned table (the snapshot the job planned on) and pruned by their
//! column bounds ([`Prune`]); each candidate is read whole with the current schema, its
//! surviving rows are written to new files, and the file is removed. Files with no selected
//! row are left alone. Rows other writers commit after the pin live in files the job never
//! removes, so they are kept; a file the job removes that someone else removed first fails
//! the commit ([`WarehouseError::NotLive`]) and the job plans again.

use std::collections::HashMap;

use arrow::array::{Array, BooleanArray, Int64Array, StringArray};
use arrow::compute::{cast, filter_record_batch, not, prep_null_mask_filter};
use arrow::datatypes::DataType;
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use iceberg::spec::{DataFile, Operation, PrimitiveLiteral};
use iceberg::table::Table;

use crate::maintain::{live_files, read_files, LiveFile};
use crate::replace::{applied, Outcome, Rewrite};
use crate::{tables, TableKind, Warehouse, WarehouseError};

/// Called with each batch of rows a rewrite drops.
pub type OnDropped<'a> = dyn Fn(&RecordBatch) -> Result<(), ArrowError> + Send + Sync + 'a;

/// Which rows of a batch to drop. `NULL` counts as "keep".
pub type Mask<'a> = &'a (dyn Fn(&RecordBatch) -> Result<BooleanArray, ArrowError> + Send + Sync);

/// Keep only files whose `[lower, upper]` bounds of `column` overlap this range (files
/// without bounds for it are kept).
#[derive(Debug, Clone)]
pub struct Prune {
    pub column: String,
    pub lower: PrimitiveLiteral,
    pub upper: PrimitiveLiteral,
}

impl Prune {
    pub fn string(column: &str, value: &str) -> Self {
        Self {
            column: column.into(),
            lower: PrimitiveLiteral::String(value.into()),
            upper: PrimitiveLiteral::String(value.into()),
        }
    }

    /// An inclusive range of a long or timestamp (micros) column.
    pub fn long(column: &str, lower: i64, upper: i64) -> Self {
        Self {
            column: column.into(),
            lower: PrimitiveLiteral::Long(lower),
            upper: PrimitiveLiteral::Long(upper),
        }
    }
}

/// One row-level rewrite of one table.
#[derive(Clone)]
pub struct RowRewrite<'a> {
    pub kind: TableKind,
    /// The replace's job id (idempotent: a job already in the ancestry is not redone).
    pub job_id: String,
    pub prune: Vec<Prune>,
    pub drop: Mask<'a>,
    /// Rows to add (the table's columns, in order; may be empty).
    pub added: Option<RecordBatch>,
    /// Data files already written (with [`Warehouse::write_files`]) to add as well; the
    /// caller owns them if the commit fails.
    pub added_files: Vec<DataFile>,
    /// Sees every batch of dropped rows (for before/after figures, affected hours).
    pub on_dropped: Option<&'a OnDropped<'a>>,
    /// See [`Rewrite::require`].
    pub require: Vec<(String, String)>,
    pub properties: HashMap<String, String>,
    /// Read and count, write nothing.
    pub dry_run: bool,
    /// Return the dropped rows (for before/after figures).
    pub keep_dropped: bool,
}

impl<'a> RowRewrite<'a> {
    /// Drops the rows `drop` selects from every live file, adds nothing, commits for real:
    /// set the other fields with struct update syntax.
    pub fn new(kind: TableKind, job_id: impl Into<String>, drop: Mask<'a>) -> Self {
        Self {
            kind,
            job_id: job_id.into(),
            prune: Vec::new(),
            drop,
            added: None,
            added_files: Vec::new(),
            on_dropped: None,
            require: Vec::new(),
            properties: HashMap::new(),
            dry_run: false,
            keep_dropped: false,
        }
    }
}

#[derive(Debug, Default)]
pub struct RowReport {
    pub files_scanned: u64,
    pub files_rewritten: u64,
    pub rows_dropped: u64,
    pub rows_kept: u64,
    pub rows_added: u64,
    pub dropped: Vec<RecordBatch>,
    /// `None`: dry run, or nothing to change.
    pub outcome: Option<Outcome>,
}

/// Applies `rr` to the table as pinned in `base` (see the module docs).
pub async fn rewrite_rows(
    wh: &Warehouse,
    base: &Table,
    rr: RowRewrite<'_>,
) -> Result<RowReport, WarehouseError> {
    let mut report = RowReport::default();
    if !rr.dry_run {
        if let Some(snapshot_id) = applied(&wh.table(rr.kind).await?, &rr.job_id) {
            report.outcome = Some(Outcome::AlreadyApplied { snapshot_id });
            return Ok(report);
        }
    }
    let schema = base.metadata().current_schema().clone();
    let prune: Vec<(i32, &Prune)> = rr
        .prune
        .iter()
        .filter_map(|p| Some((schema.field_by_name(&p.column)?.id, p)))
        .collect();
    let candidates: Vec<LiveFile> = live_files(base)
        .await?
        .files
        .into_iter()
        .filter(|f| prune.iter().all(|(id, p)| may_hold(&f.file, *id, p)))
        .collect();
    let mut rewrite = Rewrite::new(Operation::Overwrite, rr.job_id.clone());
    // How many of `rewrite.added` this call wrote (the rest are the caller's).
    let mut own = usize::MAX;
    let result = async {
        for f in &candidates {
            report.files_scanned += 1;
            let batch = read_files(base, std::slice::from_ref(f)).await?;
            let mask = (rr.drop)(&batch)?;
            let mask = if mask.null_count() > 0 {
                prep_null_mask_filter(&mask)
            } else {
                mask
            };
            let dropped = mask.true_count() as u64;
            if dropped == 0 {
                continue;
            }
            report.files_rewritten += 1;
            report.rows_dropped += dropped;
            report.rows_kept += batch.num_rows() as u64 - dropped;
            if rr.keep_dropped || rr.on_dropped.is_some() {
                let dropped = filter_record_batch(&batch, &mask)?;
                if let Some(f) = rr.on_dropped {
                    f(&dropped)?;
                }
                if rr.keep_dropped {
                    report.dropped.push(dropped);
                }
            }
            if !rr.dry_run {
                let kept = filter_record_batch(&batch, &not(&mask)?)?;
                rewrite
                    .added
                    .extend(tables::write_files(rr.kind, base, kept).await?);
                rewrite.removed.push(f.file.file_path().to_string());
            }
        }
        report.rows_added = rr.added_files.iter().map(|f| f.record_count()).sum();
        if let Some(added) = &rr.added {
            report.rows_added += added.num_rows() as u64;
            if !rr.dry_run && added.num_rows() > 0 {
                let added =
                    tables::conform(std::slice::from_ref(added), &tables::arrow_schema(base)?)?;
                rewrite
                    .added
                    .extend(tables::write_files(rr.kind, base, added).await?);
            }
        }
        if rr.dry_run
            || (rewrite.removed.is_empty() && rewrite.added.is_empty() && rr.added_files.is_empty())
        {
            return Ok(());
        }
        own = rewrite.added.len();
        for f in &rr.added_files {
            // Written earlier by the caller: maintenance deletes unreferenced files older than
            // its orphan age, and a commit must never point at a file that is gone.
            if !base.file_io().exists(f.file_path()).await? {
                return Err(WarehouseError::StagedFileGone {
                    path: f.file_path().to_string(),
                });
            }
        }
        rewrite.added.extend(rr.added_files.iter().cloned());
        if report.rows_added == 0 && report.rows_kept == 0 {
            rewrite.operation = Operation::Delete;
        }
        rewrite.require = rr.require.clone();
        rewrite.properties = rr.properties.clone();
        report.outcome = Some(wh.replace(rr.kind, &rewrite).await?);
        Ok::<(), WarehouseError>(())
    }
    .await;
    let spare = match &result {
        Err(e) => !e.commit_may_have_landed(),
        Ok(()) => matches!(report.outcome, Some(Outcome::AlreadyApplied { .. })),
    };
    if spare {
        // Nothing references what this attempt wrote.
        for f in rewrite.added.iter().take(own) {
            let _ = base.file_io().delete(f.file_path()).await;
        }
    }
    result.map(|()| report)
}

/// [`rewrite_rows`] on the table as it is now, planned again (up to ten times) when another
/// job rewrote one of its files first. `on_dropped` sees the dropped rows of every attempt.
pub async fn rewrite_current(
    wh: &Warehouse,
    rr: RowRewrite<'_>,
) -> Result<RowReport, WarehouseError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let base = wh.table(rr.kind).await?;
        match rewrite_rows(wh, &base, rr.clone()).await {
            Err(WarehouseError::NotLive { table, path }) if attempt < 10 => {
                tracing::info!(
                    table,
                    path,
                    attempt,
                    "a file was rewritten under the job; planning again"
                );
            }
            r => return r,
        }
    }
}

/// Whether `file` may hold rows in `p`'s range, by its column bounds.
fn may_hold(file: &DataFile, field_id: i32, p: &Prune) -> bool {
    let (Some(lo), Some(hi)) = (
        file.lower_bounds().get(&field_id),
        file.upper_bounds().get(&field_id),
    ) else {
        return true;
    };
    match (lo.literal(), hi.literal(), &p.lower, &p.upper) {
        (
            PrimitiveLiteral::Long(lo),
            PrimitiveLiteral::Long(hi),
            PrimitiveLiteral::Long(a),
            PrimitiveLiteral::Long(b),
        ) => lo <= b && a <= hi,
        (
            PrimitiveLiteral::String(lo),
            PrimitiveLiteral::String(hi),
            PrimitiveLiteral::String(a),
            PrimitiveLiteral::String(b),
        ) => {
            // An upper bound may be a truncated prefix: a value it prefixes may still be in.
            lo.as_str() <= b.as_str() && (a.as_str() <= hi.as_str() || a.starts_with(hi.as_str()))
        }
        _ => true,
    }
}

/// Column `name` of `batch` as UTF-8 strings.
pub fn str_column(batch: &RecordBatch, name: &str) -> Result<StringArray, ArrowError> {
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| ArrowError::SchemaError(format!("no column {name}")))?;
    let col = cast(col, &DataType::Utf8)?;
    col.as_any()
        .downcast_ref::<StringArray>()
        .cloned()
        .ok_or_else(|| ArrowError::SchemaError(format!("{name} is not a string column")))
}

/// Column `name` of `batch` as i64 (timestamps: microseconds).
pub fn i64_column(batch: &RecordBatch, name: &str) -> Result<Int64Array, ArrowError> {
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| ArrowError::SchemaError(format!("no column {name}")))?;
    let col = cast(col, &DataType::Int64)?;
    col.as_any()
        .downcast_ref::<Int64Array>()
        .cloned()
        .ok_or_else(|| ArrowError::SchemaError(format!("{name} is not an integer column")))
}
