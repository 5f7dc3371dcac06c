//! How serving sessions read a table: Iceberg plans the files, DataFusion's Parquet source
//! reads them, and each file's footer is decoded once.
//!
//! iceberg-datafusion's scan opens every planned file afresh on every query: it fetches the
//! file's last 512 KiB, decodes the footer and page indexes, and reads the file in one
//! stream. A dashboard's query reads a few small rollup files, so that fixed work per file
//! was a large share of its cost (BENCHMARKS, "Where a computed dashboard's CPU goes").
//! Here Iceberg still plans the scan (the snapshot, the manifests, partition and
//! column-bound pruning, through the table's warm manifest cache), and DataFusion's own
//! Parquet source reads the planned files: footers and page indexes from [`Footers`] (data
//! files are never changed once written, so a path names one footer for good), row groups
//! and pages pruned with the query's predicate, files spread over the session's partitions.
//!
//! The query's filters prune row groups and pages and are evaluated inside the reader, so
//! the other columns (HLL sketches among them) are decoded only for the rows that pass.
//! DataFusion treats that evaluation as best effort (a row filter it cannot build is
//! skipped with a debug log), so the same filters are applied again above the scan, and a
//! [`Fence`] keeps the optimizer from folding that filter into the scan: the filter above is
//! what holds a merchant's session to its merchant, and it must not depend on a best effort.
//!
//! DataFusion finds a file's columns by name, Iceberg by field id. The two agree unless a
//! column was renamed or a name reused, so a table whose schema history has either is read
//! by Iceberg's own scan ([`reads_by_name`]), as is one with a field that has an initial
//! default or a name mapping for files without field ids, and any scan that meets a delete
//! file (Beacon writes none of these; another engine might).

use std::any::Any;
use std::collections::HashSet;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use datafusion::catalog::Session;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
use datafusion::common::{Column, DFSchema};
use datafusion::datasource::listing::{FileRange, PartitionedFile};
use datafusion::datasource::object_store::ObjectStoreUrl;
use datafusion::datasource::physical_plan::{
    FileGroup, FileScanConfigBuilder, ParquetFileReaderFactory, ParquetSource,
};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::future::BoxFuture;
use futures::{FutureExt, TryStreamExt};
use iceberg::io::{FileIO, FileRead};
use iceberg::spec::{DataFileFormat, Schema};
use iceberg::table::Table;
use iceberg_datafusion::physical_plan::convert_filters_to_predicate;
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::errors::ParquetError;
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader};

/// Decoded Parquet footers (with their page indexes) by data file path, shared by every
/// serving session of a warehouse, bounded by their size in memory.
pub struct Footers {
    cache: moka::sync::Cache<(String, u64), Arc<ParquetMetaData>>,
}

impl Footers {
    /// A cache of at most `bytes` of decoded footers.
    pub fn new(bytes: u64) -> Self {
        Self {
            cache: moka::sync::Cache::builder()
                .max_capacity(bytes)
                .weigher(|_, m: &Arc<ParquetMetaData>| {
                    u32::try_from(m.memory_size()).unwrap_or(u32::MAX)
                })
                .build(),
        }
    }

    /// How many footers are kept now (after pending evictions).
    pub fn len(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for Footers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Footers")
            .field("entries", &self.cache.entry_count())
            .field("bytes", &self.cache.weighted_size())
            .finish()
    }
}

/// Whether reading `table`'s files by column name gives what Iceberg's reading by field id
/// gives: no field id ever had two names, and no name two field ids, in any schema the
/// table has had; nor did a nested column's type change (DataFusion casts primitives,
/// as Iceberg's promotions allow, but matches nested fields by name).
pub fn reads_by_name<'a>(current: &Schema, history: impl IntoIterator<Item = &'a Schema>) -> bool {
    let now = current.as_struct().fields();
    // Iceberg fills a column missing from a file with its initial default, DataFusion with NULL.
    if now.iter().any(|f| f.initial_default.is_some()) {
        return false;
    }
    history.into_iter().all(|old| {
        old.as_struct().fields().iter().all(|field| {
            now.iter().all(|cur| {
                let same_id = cur.id == field.id;
                let same_name = cur.name == field.name;
                same_id == same_name
                    && (!same_id
                        || cur.field_type.is_primitive()
                        || cur.field_type == field.field_type)
            })
        })
    })
}

/// Asks the scan of one table in a query (set as a session config extension) to read only
/// the rows added since an earlier snapshot of it: a reader that keeps what it read before
/// (the metrics API's rollup slices) then reads a commit's new files, not the whole table.
///
/// Data files never change once written, so when every file the same filters planned at
/// `since` is still planned now (nothing was removed, as after appends) and no delete file
/// applies, the rows now are the rows then plus the rows of the files planned now and not
/// then. Otherwise the scan reads every row, and [`Increment::scanned`] says which it did.
#[derive(Debug)]
pub struct Increment {
    table: String,
    since: Option<i64>,
    scanned: Mutex<Option<Scanned>>,
}

/// How a scan asked for an [`Increment`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    /// The snapshot whose rows it read (`None`: not known, as when Iceberg's own scan read).
    pub snapshot: Option<i64>,
    /// Only the rows added since the increment's `since`; otherwise every row.
    pub added_only: bool,
}

impl Increment {
    /// For the scan of `table` (by name), the rows added since snapshot `since` (`None`: every row).
    pub fn new(table: &str, since: Option<i64>) -> Self {
        Self {
            table: table.to_string(),
            since,
            scanned: Mutex::new(None),
        }
    }

    /// How the scan read (`None` before the query's plan was built, or if it scanned nothing).
    pub fn scanned(&self) -> Option<Scanned> {
        *self.scanned.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn record(&self, scanned: Scanned) {
        *self.scanned.lock().unwrap_or_else(|p| p.into_inner()) = Some(scanned);
    }

    /// The increment `state`'s session asks of `table`'s scans, if any.
    pub(crate) fn of(state: &dyn Session, table: &str) -> Option<Arc<Self>> {
        state
            .config()
            .get_extension::<Self>()
            .filter(|i| i.table == table)
    }
}

/// The data files Iceberg plans for `predicate` in `snapshot` of `table`.
async fn plan_files(
    table: &Table,
    snapshot: i64,
    predicate: Option<iceberg::expr::Predicate>,
) -> DfResult<Vec<iceberg::scan::FileScanTask>> {
    let err = |e: iceberg::Error| DataFusionError::External(Box::new(e));
    let mut scan = table.scan().snapshot_id(snapshot);
    if let Some(predicate) = predicate {
        scan = scan.with_filter(predicate);
    }
    scan.build()
        .map_err(err)?
        .plan_files()
        .await
        .map_err(err)?
        .try_collect()
        .await
        .map_err(err)
}

/// A plan reading the files Iceberg plans for `filters` in `table`'s current snapshot
/// with DataFusion's Parquet source, or `None` where that would not read what Iceberg reads
/// (a delete file, a file not in Parquet): the caller then uses Iceberg's scan. With an
/// `increment`, only the files it asks for when that reads what it means (and it is told).
#[allow(clippy::too_many_arguments)]
pub async fn plan(
    table: &Table,
    schema: &SchemaRef,
    footers: &Arc<Footers>,
    state: &dyn Session,
    projection: Option<&Vec<usize>>,
    filters: &[Expr],
    limit: Option<usize>,
    increment: Option<&Increment>,
) -> DfResult<Option<Arc<dyn ExecutionPlan>>> {
    let projected = match projection {
        Some(p) => Arc::new(schema.project(p)?),
        None => schema.clone(),
    };
    let Some(snapshot) = table.metadata().current_snapshot_id() else {
        if let Some(increment) = increment {
            increment.record(Scanned {
                snapshot: None,
                added_only: false,
            });
        }
        return Ok(Some(Arc::new(EmptyExec::new(projected))));
    };
    let predicate = convert_filters_to_predicate(filters);
    let mut tasks = plan_files(table, snapshot, predicate.clone()).await?;
    if tasks
        .iter()
        .any(|t| !t.deletes.is_empty() || t.data_file_format != DataFileFormat::Parquet)
    {
        return Ok(None);
    }
    if let Some(increment) = increment {
        let mut added_only = false;
        // (A snapshot expired since is not planned again: everything is read.)
        if let Some(since) = increment
            .since
            .filter(|s| table.metadata().snapshot_by_id(*s).is_some())
        {
            // (Planning it can fail where maintenance deleted the manifests of a snapshot
            // that metadata a second old still lists: then everything is read.)
            match plan_files(table, since, predicate).await {
                Ok(before) => {
                    let before: HashSet<String> =
                        before.into_iter().map(|t| t.data_file_path).collect();
                    let now: HashSet<&str> =
                        tasks.iter().map(|t| t.data_file_path.as_str()).collect();
                    if before.iter().all(|p| now.contains(p.as_str())) {
                        tasks.retain(|t| !before.contains(&t.data_file_path));
                        added_only = true;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, since, "the earlier snapshot is not planned again: every row is read")
                }
            }
        }
        increment.record(Scanned {
            snapshot: Some(snapshot),
            added_only,
        });
    }
    if tasks.is_empty() {
        return Ok(Some(Arc::new(EmptyExec::new(projected))));
    }
    let files: Vec<PartitionedFile> = tasks
        .into_iter()
        .map(|t| {
            let mut file = PartitionedFile::new(t.data_file_path.clone(), t.file_size_in_bytes);
            // (Iceberg reads a zero length as the whole file.)
            if t.length != 0 && (t.start != 0 || t.length != t.file_size_in_bytes) {
                file.range = Some(FileRange {
                    start: i64::try_from(t.start).unwrap_or(i64::MAX),
                    end: i64::try_from(t.start.saturating_add(t.length)).unwrap_or(i64::MAX),
                });
            }
            // The object-store path DataFusion derives from a URI is not one FileIO opens.
            file.extensions = Some(Arc::new(t.data_file_path));
            file
        })
        .collect();
    // Files dealt round-robin into the session's partitions, so they are read in parallel.
    let partitions = state.config().target_partitions().clamp(1, files.len());
    let mut groups = vec![Vec::new(); partitions];
    for (i, file) in files.into_iter().enumerate() {
        groups[i % partitions].push(file);
    }

    let mut source = ParquetSource::new(schema.clone())
        .with_table_parquet_options(state.table_options().parquet.clone())
        .with_parquet_file_reader_factory(Arc::new(Files {
            io: table.file_io().clone(),
            footers: footers.clone(),
        }));
    if let Some(filter) = conjunction(filters.iter().cloned()) {
        // The filters name the table's columns through the session's alias for it.
        let filter = filter
            .transform(|e| match e {
                Expr::Column(c) => Ok(Transformed::yes(Expr::Column(Column::new_unqualified(
                    c.name,
                )))),
                e => Ok(Transformed::no(e)),
            })
            .data()?;
        let df_schema = DFSchema::try_from(schema.as_ref().clone())?;
        match state.create_physical_expr(filter, &df_schema) {
            Ok(predicate) => {
                source = source
                    .with_predicate(predicate)
                    .with_pushdown_filters(true)
                    .with_reorder_filters(true);
            }
            // Only speed is lost: the filter above the scan applies them.
            Err(e) => tracing::debug!(error = %e, "scan filters not pushed into the reader"),
        }
    }
    let config = FileScanConfigBuilder::new(ObjectStoreUrl::local_filesystem(), Arc::new(source))
        .with_file_groups(groups.into_iter().map(FileGroup::new).collect())
        .with_projection_indices(projection.cloned())?
        .with_limit(limit)
        .build();
    Ok(Some(Arc::new(Fence {
        input: DataSourceExec::from_data_source(config),
    })))
}

/// Passes its input through and takes no filter from above (the default of
/// [`ExecutionPlan::gather_filters_for_pushdown`]), so DataFusion's filter pushdown cannot
/// remove the filter above a scan by folding it into the scan's best-effort row filter.
#[derive(Debug)]
pub struct Fence {
    input: Arc<dyn ExecutionPlan>,
}

impl DisplayAs for Fence {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "FenceExec")
    }
}

impl ExecutionPlan for Fence {
    fn name(&self) -> &str {
        "FenceExec"
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        match <[_; 1]>::try_from(children) {
            Ok([input]) => Ok(Arc::new(Fence { input })),
            Err(_) => Err(DataFusionError::Internal("FenceExec has one input".into())),
        }
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        self.input.execute(partition, context)
    }
}

/// Opens planned data files through the table's [`FileIO`] (local disk or object storage).
#[derive(Debug)]
struct Files {
    io: FileIO,
    footers: Arc<Footers>,
}

impl ParquetFileReaderFactory for Files {
    fn create_reader(
        &self,
        _partition_index: usize,
        file: PartitionedFile,
        _metadata_size_hint: Option<usize>,
        _metrics: &ExecutionPlanMetricsSet,
    ) -> DfResult<Box<dyn AsyncFileReader + Send>> {
        let path = file
            .extensions
            .as_ref()
            .and_then(|e| e.downcast_ref::<String>())
            .cloned()
            .ok_or_else(|| {
                DataFusionError::Internal(format!(
                    "planned file {} has no data file path",
                    file.object_meta.location
                ))
            })?;
        let input = self
            .io
            .new_input(&path)
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(Box::new(FileReader {
            path,
            size: file.object_meta.size,
            input,
            open: None,
            footers: self.footers.clone(),
        }))
    }
}

/// One data file, opened on its first read.
struct FileReader {
    path: String,
    size: u64,
    input: iceberg::io::InputFile,
    open: Option<iceberg::arrow::ArrowFileReader>,
    footers: Arc<Footers>,
}

fn external(e: iceberg::Error) -> ParquetError {
    ParquetError::External(Box::new(e))
}

impl FileReader {
    /// The file's reader: iceberg's, which coalesces nearby ranges and fetches them
    /// concurrently (one request per column chunk would be slow on object storage).
    async fn reader(&mut self) -> parquet::errors::Result<&mut iceberg::arrow::ArrowFileReader> {
        if self.open.is_none() {
            let read: Box<dyn FileRead> = self.input.reader().await.map_err(external)?;
            let meta = iceberg::io::FileMetadata { size: self.size };
            self.open = Some(iceberg::arrow::ArrowFileReader::new(meta, read));
        }
        self.open
            .as_mut()
            .ok_or_else(|| ParquetError::General("file reader not open".into()))
    }
}

impl AsyncFileReader for FileReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move { self.reader().await?.get_bytes(range).await }.boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        async move { self.reader().await?.get_byte_ranges(ranges).await }.boxed()
    }

    /// The footer with its page indexes, decoded once per file: more than the caller asks
    /// for (DataFusion asks without page indexes and loads them when its predicate can use
    /// them), which it takes as it is.
    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            // Keyed by size too: a file rewritten in place (against the spec) is not misread.
            let key = (self.path.clone(), self.size);
            if let Some(footer) = self.footers.cache.get(&key) {
                return Ok(footer);
            }
            let size = self.size;
            let reader = self.reader().await?;
            let footer = ParquetMetaDataReader::new()
                .with_prefetch_hint(Some(64 * 1024))
                .with_page_index_policy(PageIndexPolicy::Optional)
                .load_and_finish(reader, size)
                .await
                .map_err(|e| {
                    ParquetError::General(format!("reading the footer of {}: {e}", self.path))
                })?;
            let footer = Arc::new(footer);
            self.footers.cache.insert(key, footer.clone());
            Ok(footer)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use iceberg::spec::{NestedField, PrimitiveType, Type};

    use super::*;

    fn schema(id: i32, fields: &[(i32, &str, Type)]) -> Schema {
        Schema::builder()
            .with_schema_id(id)
            .with_fields(
                fields
                    .iter()
                    .map(|(i, n, t)| NestedField::optional(*i, *n, t.clone()).into()),
            )
            .build()
            .expect("schema")
    }

    #[test]
    fn names_must_mean_the_same_field_in_every_schema() {
        let s = Type::Primitive(PrimitiveType::String);
        let int = Type::Primitive(PrimitiveType::Int);
        let long = Type::Primitive(PrimitiveType::Long);
        let v1 = schema(0, &[(1, "merchant_id", s.clone()), (2, "n", int.clone())]);
        // Added columns and promoted primitives read the same by name.
        let added = schema(
            1,
            &[
                (1, "merchant_id", s.clone()),
                (2, "n", long.clone()),
                (3, "page", s.clone()),
            ],
        );
        assert!(reads_by_name(&added, [&v1, &added]));
        // A rename: files written before it hold the old name.
        let renamed = schema(
            1,
            &[(1, "merchant_id", s.clone()), (2, "count", int.clone())],
        );
        assert!(!reads_by_name(&renamed, [&v1, &renamed]));
        // A dropped column's name reused for a new field.
        let reused = schema(1, &[(1, "merchant_id", s.clone()), (3, "n", int.clone())]);
        assert!(!reads_by_name(&reused, [&v1, &reused]));
        // A dropped column whose name is not reused is fine.
        let dropped = schema(1, &[(1, "merchant_id", s)]);
        assert!(reads_by_name(&dropped, [&v1, &dropped]));
    }
}
