//! Table definitions and the append path.
//!
//! Layout decisions (see docs/ARCHITECTURE.md): event tables are partitioned by `day(ts)` and
//! `bucket(4, merchant_id)`, and each written batch is sorted by (merchant_id, ts) so Parquet
//! statistics prune one merchant's time range. The bucket count is small on purpose: every
//! commit writes one file per touched partition, and until compaction exists (append-only
//! Iceberg crate) the file count is bounded by commit cadence x touched partitions.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef};
use arrow::compute::{cast, lexsort_to_indices, take_record_batch, SortColumn};
use arrow::datatypes::SchemaRef as ArrowSchemaRef;
use arrow::record_batch::RecordBatch;
use iceberg::arrow::{schema_to_arrow_schema, RecordBatchPartitionSplitter};
use iceberg::spec::{
    DataFile, DataFileFormat, MapType, NestedField, NullOrder, PrimitiveType, Schema,
    SortDirection, SortField, SortOrder, Transform, Type, UnboundPartitionSpec,
};
use iceberg::table::Table;
use iceberg::transaction::{AddColumn, ApplyTransactionAction, Transaction};
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::location_generator::{
    DefaultFileNameGenerator, DefaultLocationGenerator,
};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::partitioning::fanout_writer::FanoutWriter;
use iceberg::writer::partitioning::PartitioningWriter;
use iceberg::{Catalog, NamespaceIdent, TableCreation, TableIdent};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::{WarehouseError, NAMESPACE};

/// Snapshot summary property: the last JetStream stream sequence whose rows this snapshot
/// (and every earlier one) contains.
pub const SEQ_PROPERTY: &str = "beacon.stream-seq";
/// How many stream partitions ingest reads (docs/ARCHITECTURE.md, "Ingest partitions"):
/// partition 0's watermark is [`SEQ_PROPERTY`], partition `k > 0`'s is
/// `beacon.stream-seq.<k>` ([`partition_seq_property`]). Absent: one partition.
pub const PARTITIONS_PROPERTY: &str = "beacon.stream-partitions";
/// Rollup snapshots: the `events` stream sequence up to which they aggregate.
pub const ROLLUP_SEQ_PROPERTY: &str = "beacon.events-seq";
/// Rollup snapshots: changed by every rebuild of past hours, so a delta run that read
/// `events` before the rebuild cannot land after it (its commit requires the generation it
/// started with).
pub const ROLLUP_GEN_PROPERTY: &str = "beacon.rollup-gen";

/// The derived dimension columns at the end of `events`, in order (from the dimension table).
pub use crate::dimensions::EVENT_DIMENSIONS;

const MERCHANT_BUCKETS: u32 = 4;
pub(crate) const TARGET_FILE_BYTES: usize = 128 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TableKind {
    RawEvents,
    Events,
    FailedEvents,
    RollupsHourly,
    RevenueHourly,
    BreakdownsHourly,
    Visits,
}

impl TableKind {
    pub const ALL: [TableKind; 7] = [
        TableKind::RawEvents,
        TableKind::Events,
        TableKind::FailedEvents,
        TableKind::RollupsHourly,
        TableKind::RevenueHourly,
        TableKind::BreakdownsHourly,
        TableKind::Visits,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TableKind::RawEvents => "raw_events",
            TableKind::Events => "events",
            TableKind::FailedEvents => "failed_events",
            TableKind::RollupsHourly => "rollups_hourly",
            TableKind::RevenueHourly => "revenue_hourly",
            TableKind::BreakdownsHourly => "breakdowns_hourly",
            TableKind::Visits => "visits",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    pub fn ident(self) -> TableIdent {
        TableIdent::new(NamespaceIdent::new(NAMESPACE.into()), self.name().into())
    }

    fn schema(self) -> iceberg::Result<Schema> {
        let s = |id, name: &str| {
            NestedField::required(id, name, Type::Primitive(PrimitiveType::String)).into()
        };
        let os = |id, name: &str| {
            NestedField::optional(id, name, Type::Primitive(PrimitiveType::String)).into()
        };
        let ts = |id, name: &str| {
            NestedField::required(id, name, Type::Primitive(PrimitiveType::Timestamptz)).into()
        };
        let long = |id, name: &str| {
            NestedField::required(id, name, Type::Primitive(PrimitiveType::Long)).into()
        };
        let olong = |id, name: &str| {
            NestedField::optional(id, name, Type::Primitive(PrimitiveType::Long)).into()
        };
        let fields: Vec<iceberg::spec::NestedFieldRef> = match self {
            TableKind::RawEvents | TableKind::Events => {
                let mut f = vec![
                    s(1, "event_id"),
                    s(2, "merchant_id"),
                    s(3, "name"),
                    ts(4, "ts"),
                    ts(5, "received_at"),
                    os(6, "url"),
                    os(7, "referrer"),
                    os(8, "title"),
                    os(9, "visitor_id"),
                    os(10, "session_id"),
                    os(11, "user_id"),
                    olong(12, "revenue_micros"),
                    os(13, "currency"),
                    NestedField::optional(
                        14,
                        "properties",
                        Type::Map(MapType::new(
                            NestedField::map_key_element(
                                100,
                                Type::Primitive(PrimitiveType::String),
                            )
                            .into(),
                            NestedField::map_value_element(
                                101,
                                Type::Primitive(PrimitiveType::String),
                                false,
                            )
                            .into(),
                        )),
                    )
                    .into(),
                    s(15, "edge_id"),
                    s(16, "batch_id"),
                    long(17, "stream_seq"),
                ];
                if self == TableKind::RawEvents {
                    // Lineage (see `Envelope::lineage`): position in the batch, the pipeline
                    // version and share that processed it, and the outcome.
                    f.push(olong(18, "batch_index"));
                    f.push(olong(19, "pipeline_version"));
                    f.push(
                        NestedField::optional(
                            20,
                            "canary",
                            Type::Primitive(PrimitiveType::Boolean),
                        )
                        .into(),
                    );
                    f.push(os(21, "outcome"));
                }
                if self == TableKind::Events {
                    f.push(os(18, "pipeline_version"));
                    // Derived breakdown dimensions (core-ingest's `dimensions` module).
                    for (i, name) in EVENT_DIMENSIONS.iter().enumerate() {
                        f.push(os(19 + i as i32, name));
                    }
                }
                f
            }
            TableKind::FailedEvents => vec![
                s(1, "merchant_id"),
                s(2, "batch_id"),
                s(3, "event_id"),
                s(4, "stage"),
                os(5, "plugin"),
                olong(6, "pipeline_version"),
                s(7, "reason"),
                s(8, "payload"),
                ts(9, "received_at"),
                s(10, "edge_id"),
                long(11, "stream_seq"),
            ],
            TableKind::RollupsHourly => vec![
                s(1, "merchant_id"),
                ts(2, "hour"),
                long(3, "events"),
                long(4, "pageviews"),
                NestedField::optional(5, "visitors_hll", Type::Primitive(PrimitiveType::Binary))
                    .into(),
                long(6, "revenue_events"),
            ],
            TableKind::RevenueHourly => vec![
                s(1, "merchant_id"),
                ts(2, "hour"),
                s(3, "currency"),
                long(4, "orders"),
                long(5, "revenue_micros"),
            ],
            TableKind::BreakdownsHourly => vec![
                s(1, "merchant_id"),
                ts(2, "hour"),
                s(3, "dimension"),
                s(4, "value"),
                long(5, "events"),
                long(6, "pageviews"),
                NestedField::optional(7, "visitors_hll", Type::Primitive(PrimitiveType::Binary))
                    .into(),
            ],
            // One row per visit (`crate::visits`); the `sessions` view numbers them.
            TableKind::Visits => {
                let mut f = vec![
                    s(1, "merchant_id"),
                    s(2, "visit_key"),
                    os(3, "visitor_id"),
                    ts(4, "started_at"),
                    ts(5, "ended_at"),
                    long(6, "duration_ms"),
                    long(7, "events"),
                    long(8, "pageviews"),
                    // The first and last event (time, then id): a later merge of visits
                    // breaks ties in time the way a regrouping of their events does.
                    s(9, "entry_event_id"),
                    s(10, "exit_event_id"),
                ];
                let mut next = 11;
                for name in crate::visits::attribute_columns() {
                    f.push(os(next, name));
                    next += 1;
                }
                f.push(
                    NestedField::required(next, "bounce", Type::Primitive(PrimitiveType::Boolean))
                        .into(),
                );
                f.push(olong(next + 1, "revenue_micros"));
                f
            }
        };
        Schema::builder()
            .with_schema_id(0)
            .with_fields(fields)
            .build()
    }

    fn partition_spec(self) -> iceberg::Result<UnboundPartitionSpec> {
        let b = UnboundPartitionSpec::builder();
        Ok(match self {
            TableKind::RawEvents | TableKind::Events => b
                .add_partition_field(4, "ts_day", Transform::Day)?
                .add_partition_field(2, "merchant_bucket", Transform::Bucket(MERCHANT_BUCKETS))?
                .build(),
            TableKind::FailedEvents => b
                .add_partition_field(9, "received_day", Transform::Day)?
                .build(),
            // Rollups are small: one partition per month keeps their file count low.
            TableKind::RollupsHourly | TableKind::RevenueHourly | TableKind::BreakdownsHourly => b
                .add_partition_field(2, "hour_month", Transform::Month)?
                .build(),
            // By month, as the rollups: a merchant's 90 days are a few files to open (by day
            // they were ~90: 94 ms against 21 ms by month, in two runs of the query bench;
            // docs/BENCHMARKS.md).
            // A run rewrites only the files whose rows it replaces, which are recent and
            // small until maintenance compacts them.
            TableKind::Visits => b
                .add_partition_field(4, "started_month", Transform::Month)?
                .build(),
        })
    }

    /// The tables dashboards read, a merchant's few rows at a time (the others are read
    /// by scans and written in bulk): their files are laid out for that (below).
    fn serves_dashboards(self) -> bool {
        matches!(
            self,
            TableKind::RollupsHourly
                | TableKind::RevenueHourly
                | TableKind::BreakdownsHourly
                | TableKind::Visits
        )
    }

    /// Parquet row group size. Rows are sorted by merchant first, so small groups let a
    /// merchant's query skip most of a file by the groups' min/max statistics: small for
    /// the tables dashboards read, larger for the event tables, which scans read.
    fn row_group_rows(self) -> usize {
        if self.serves_dashboards() {
            8 * 1024
        } else {
            64 * 1024
        }
    }

    /// How data files are compressed, as the table property other engines' writers read
    /// (tables created before LZ4 keep saying `zstd`; each file names its own codec).
    /// Dashboards read a few small column chunks at a time, and a zstd column chunk costs
    /// a fresh compression and decompression context on every read (7% of a dashboard
    /// query's CPU in a profile); LZ4 needs none. The big tables keep zstd's better ratio.
    fn codec_name(self) -> &'static str {
        if self.serves_dashboards() {
            "lz4_raw"
        } else {
            "zstd"
        }
    }

    /// [`TableKind::codec_name`] for the writer.
    fn compression(self) -> Result<Compression, WarehouseError> {
        Ok(if self.serves_dashboards() {
            Compression::LZ4_RAW
        } else {
            Compression::ZSTD(ZstdLevel::try_new(3)?)
        })
    }

    /// Columns each written batch is sorted by.
    pub(crate) fn sort_columns(self) -> &'static [&'static str] {
        match self {
            TableKind::RawEvents | TableKind::Events => &["merchant_id", "ts"],
            TableKind::FailedEvents => &["merchant_id", "received_at"],
            TableKind::RollupsHourly | TableKind::RevenueHourly => &["merchant_id", "hour"],
            TableKind::BreakdownsHourly => &["merchant_id", "dimension", "hour"],
            TableKind::Visits => &["merchant_id", "started_at"],
        }
    }
}

pub(crate) async fn ensure_all(catalog: &dyn Catalog) -> Result<(), WarehouseError> {
    let ns = NamespaceIdent::new(NAMESPACE.into());
    if !catalog.namespace_exists(&ns).await? {
        // Several roles may start at once: losing the creation race is fine (the SQL
        // catalog reports it as a constraint violation, so check again rather than trust
        // the error kind).
        if let Err(e) = catalog.create_namespace(&ns, HashMap::new()).await {
            if !catalog.namespace_exists(&ns).await? {
                return Err(e.into());
            }
        }
    }
    for kind in TableKind::ALL {
        if catalog.table_exists(&kind.ident()).await? {
            check_schema(catalog, kind).await?;
            continue;
        }
        let schema = kind.schema()?;
        let mut sort_fields = Vec::new();
        for column in kind.sort_columns() {
            let field = schema.field_by_name(column).ok_or_else(|| {
                iceberg::Error::new(
                    iceberg::ErrorKind::DataInvalid,
                    format!("sort column {column} is not in {}", kind.name()),
                )
            })?;
            sort_fields.push(
                SortField::builder()
                    .source_id(field.id)
                    .transform(Transform::Identity)
                    .direction(SortDirection::Ascending)
                    .null_order(NullOrder::First)
                    .build(),
            );
        }
        let sort = SortOrder::builder()
            .with_order_id(1)
            .with_fields(sort_fields)
            .build_unbound()?;
        let creation = TableCreation::builder()
            .name(kind.name().to_string())
            .schema(schema)
            .partition_spec(kind.partition_spec()?)
            .sort_order(sort)
            .properties(HashMap::from([
                (
                    "write.parquet.compression-codec".to_string(),
                    kind.codec_name().to_string(),
                ),
                (
                    "write.target-file-size-bytes".to_string(),
                    TARGET_FILE_BYTES.to_string(),
                ),
            ]))
            .build();
        match catalog.create_table(&ns, creation).await {
            Ok(_) => tracing::info!(table = kind.name(), "created table"),
            Err(_) if catalog.table_exists(&kind.ident()).await? => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Upgrades a table created by an older Beacon: columns this version appends (always
/// optional) are added by a schema update, so old rows read them as NULL. Any other
/// difference is refused before a write can fail with a less helpful error.
async fn check_schema(catalog: &dyn Catalog, kind: TableKind) -> Result<(), WarehouseError> {
    let table = catalog.load_table(&kind.ident()).await.map_err(|source| {
        WarehouseError::TableMetadata {
            table: kind.name().to_string(),
            metadata: String::new(),
            source: Box::new(source),
        }
    })?;
    let have: Vec<&str> = table
        .metadata()
        .current_schema()
        .as_struct()
        .fields()
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    let want_schema = kind.schema()?;
    let want: Vec<&str> = want_schema
        .as_struct()
        .fields()
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    if have == want {
        return Ok(());
    }
    let added = &want_schema.as_struct().fields()[have.len().min(want.len())..];
    if want.starts_with(&have) && added.iter().all(|f| !f.required) {
        let tx = Transaction::new(&table);
        let mut action = tx.update_schema();
        for f in added {
            action = action.add_column(AddColumn::optional(&f.name, (*f.field_type).clone()));
        }
        let tx = action.apply(tx)?;
        let table = tx.commit(catalog).await?;
        // Scans read a snapshot with the schema it was written with: an empty snapshot
        // (same watermark properties) makes the new columns readable (NULL in old files)
        // before the next write.
        if let Some(snapshot) = table.metadata().current_snapshot() {
            let properties = watermarks(Some(snapshot));
            let schema = arrow_schema(&table)?;
            append(
                catalog,
                kind,
                &table,
                RecordBatch::new_empty(schema),
                properties,
            )
            .await?;
        }
        tracing::info!(
            table = kind.name(),
            added = added.len(),
            "upgraded table schema"
        );
        return Ok(());
    }
    Err(WarehouseError::SchemaMismatch {
        table: kind.name(),
        have: have.join(", "),
        want: want.join(", "),
    })
}

/// The Arrow schema batches for `table` must have (field ids included).
pub fn arrow_schema(table: &Table) -> Result<ArrowSchemaRef, WarehouseError> {
    Ok(Arc::new(schema_to_arrow_schema(
        table.metadata().current_schema(),
    )?))
}

/// One batch with exactly `schema` (field ids included), from batches with the same columns
/// in the same order but possibly other physical types (Binary vs LargeBinary, Int64 sums).
pub(crate) fn conform(
    batches: &[RecordBatch],
    schema: &ArrowSchemaRef,
) -> Result<RecordBatch, WarehouseError> {
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    if rows == 0 {
        return Ok(RecordBatch::new_empty(schema.clone()));
    }
    let mut columns = Vec::with_capacity(schema.fields().len());
    for (i, field) in schema.fields().iter().enumerate() {
        let parts = batches
            .iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| {
                let col = b.column(i);
                if col.data_type() == field.data_type() {
                    Ok(col.clone())
                } else {
                    cast(col, field.data_type())
                }
            })
            .collect::<Result<Vec<ArrayRef>, _>>()?;
        let refs: Vec<&dyn Array> = parts.iter().map(|a| a.as_ref()).collect();
        columns.push(arrow::compute::concat(&refs)?);
    }
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// The current snapshot's watermark properties (ingest's and the rollups' stream
/// sequences, the rollup generation): what every commit that is not an ingest or rollup commit must carry forward,
/// or the next restart re-reads (and re-commits) what the table already holds.
pub(crate) fn watermarks(snapshot: Option<&iceberg::spec::SnapshotRef>) -> HashMap<String, String> {
    let Some(snapshot) = snapshot else {
        return HashMap::new();
    };
    snapshot
        .summary()
        .additional_properties
        .iter()
        .filter(|(k, _)| is_watermark(k) || k.as_str() == ROLLUP_GEN_PROPERTY)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Whether `key` is one of the watermark properties (which only ever grow): ingest's per
/// partition and the rollups'.
pub(crate) fn is_watermark(key: &str) -> bool {
    key == SEQ_PROPERTY
        || key == ROLLUP_SEQ_PROPERTY
        || key == PARTITIONS_PROPERTY
        || key
            .strip_prefix(SEQ_PROPERTY)
            .and_then(|k| k.strip_prefix('.'))
            .is_some_and(|k| k.parse::<u32>().is_ok())
}

/// The watermark property of ingest's stream partition `index`.
pub fn partition_seq_property(index: u32) -> String {
    if index == 0 {
        SEQ_PROPERTY.to_string()
    } else {
        format!("{SEQ_PROPERTY}.{index}")
    }
}

/// How many stream partitions the table's current snapshot records (at least 1).
pub fn stream_partitions(table: &Table) -> u32 {
    snapshot_property(table, PARTITIONS_PROPERTY)
        .parse::<u32>()
        .unwrap_or(1)
        .max(1)
}

/// The stream sequence up to which the table holds every partition's rows: the lowest
/// partition watermark. Every message at or below it that has rows for this table is in
/// it, and none above it from a partition that lags (a rollup aggregates up to this).
pub fn stream_floor(table: &Table) -> u64 {
    (0..stream_partitions(table))
        .map(|k| snapshot_property_u64(table, &partition_seq_property(k)))
        .min()
        .unwrap_or(0)
}

/// A snapshot property of the current snapshot; empty when absent.
pub fn snapshot_property(table: &Table, key: &str) -> String {
    table
        .metadata()
        .current_snapshot()
        .and_then(|s| s.summary().additional_properties.get(key).cloned())
        .unwrap_or_default()
}

/// An integer snapshot property of the current snapshot; 0 when absent.
pub fn snapshot_property_u64(table: &Table, key: &str) -> u64 {
    snapshot_property(table, key).parse().unwrap_or(0)
}

/// Writes `batch` (sorted, split by partition, zstd Parquet) and commits it in one snapshot
/// with `properties`. An empty batch with properties still commits (it moves watermarks).
pub(crate) async fn append(
    catalog: &dyn Catalog,
    kind: TableKind,
    table: &Table,
    batch: RecordBatch,
    properties: HashMap<String, String>,
) -> Result<(), WarehouseError> {
    let data_files = write_files(kind, table, batch).await?;
    if data_files.is_empty() && properties.is_empty() {
        return Ok(());
    }
    let tx = Transaction::new(table);
    let action = tx
        .fast_append()
        // File names are UUID-unique; checking every manifest for duplicates on each commit
        // would make commits slower as history grows.
        .with_check_duplicate(false)
        .add_data_files(data_files)
        .set_snapshot_properties(properties);
    let tx = action.apply(tx)?;
    tx.commit(catalog).await?;
    Ok(())
}

/// Writes `batch` as data files of `table` (sorted by the table's sort columns, split by
/// partition, zstd Parquet) without committing them.
pub(crate) async fn write_files(
    kind: TableKind,
    table: &Table,
    batch: RecordBatch,
) -> Result<Vec<DataFile>, WarehouseError> {
    let batch = sort_batch(batch, kind.sort_columns())?;
    if batch.num_rows() == 0 {
        return Ok(Vec::new());
    }
    let md = table.metadata();
    let schema = md.current_schema().clone();
    let spec = md.default_partition_spec().clone();
    let props = WriterProperties::builder()
        .set_compression(kind.compression()?)
        .set_max_row_group_row_count(Some(kind.row_group_rows()))
        .build();
    let parquet = ParquetWriterBuilder::new(props, schema.clone());
    let location = DefaultLocationGenerator::new(md)?;
    // A unique prefix per write: the generator numbers files from zero each time.
    let names = DefaultFileNameGenerator::new(
        uuid::Uuid::now_v7().to_string(),
        None,
        DataFileFormat::Parquet,
    );
    let rolling = RollingFileWriterBuilder::new(
        parquet,
        TARGET_FILE_BYTES,
        table.file_io().clone(),
        location,
        names,
    );
    let mut fanout: FanoutWriter<_> = FanoutWriter::new(DataFileWriterBuilder::new(rolling));
    let splitter = RecordBatchPartitionSplitter::try_new_with_computed_values(schema, spec)?;
    let failed = |source| WarehouseError::WriteFiles {
        table: kind.name(),
        location: md.location().to_string(),
        source: Box::new(source),
    };
    for (key, part) in splitter.split(&batch)? {
        fanout.write(key, part).await.map_err(failed)?;
    }
    fanout.close().await.map_err(failed)
}

fn sort_batch(batch: RecordBatch, columns: &[&str]) -> Result<RecordBatch, WarehouseError> {
    if batch.num_rows() < 2 || columns.is_empty() {
        return Ok(batch);
    }
    let sort_columns = columns
        .iter()
        .filter_map(|c| batch.column_by_name(c))
        .map(|values| SortColumn {
            values: values.clone(),
            options: None,
        })
        .collect::<Vec<_>>();
    let indices = lexsort_to_indices(&sort_columns, None)?;
    Ok(take_record_batch(&batch, &indices)?)
}
