//! Beacon's warehouse: Iceberg tables in a SQL catalog (SQLite by default) on local disk or
//! object storage, DataFusion for SQL, and the hourly rollups.
//!
//! Tables (namespace `analytics`, catalog `beacon`):
//! - `raw_events`: canonical events exactly as the edge accepted them (immutable; what
//!   re-processing reads),
//! - `events`: plugin output, with the `pipeline_version` that produced it,
//! - `failed_events`: everything that failed validation, decoding or a plugin, with the reason,
//! - `rollups_hourly`, `revenue_hourly`, `breakdowns_hourly`: mergeable hourly aggregates,
//!   the last per breakdown dimension and value (see [`rollup`]).
//!
//! Views: `rollups`, `revenue` (merged rollups), `sessions`, `daily_metrics` (see [`views`]).
//!
//! Writers commit the last consumed JetStream sequence as a snapshot property
//! ([`tables::SEQ_PROPERTY`]); that property is what makes ingest exactly-once.

pub mod cached;
pub mod dimensions;
pub mod hll;
mod inspect;
pub mod maintain;
pub mod output;
pub mod relocate;
pub mod replace;
pub mod rewrite;
pub mod rollup;
pub mod scan;
mod storage;
pub mod tables;
pub mod views;
pub mod visits;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use datafusion::catalog::{
    CatalogProvider, MemoryCatalogProvider, MemorySchemaProvider, SchemaProvider,
};
use datafusion::execution::context::SessionConfig;
use datafusion::prelude::SessionContext;
use iceberg::io::LocalFsStorageFactory;
use iceberg::table::Table;
use iceberg::{Catalog, CatalogBuilder, NamespaceIdent, TableIdent};
use iceberg_catalog_sql::{
    SqlBindStyle, SqlCatalogBuilder, SQL_CATALOG_PROP_BIND_STYLE, SQL_CATALOG_PROP_URI,
    SQL_CATALOG_PROP_WAREHOUSE,
};
use iceberg_datafusion::IcebergCatalogProvider;

pub use cached::ServingReads;
pub use tables::TableKind;

/// The catalog name: PyIceberg and other engines must open the catalog with this name.
pub const CATALOG_NAME: &str = "beacon";
pub const NAMESPACE: &str = "analytics";

#[derive(Debug, thiserror::Error)]
pub enum WarehouseError {
    #[error("Iceberg: {0}")]
    Iceberg(#[from] iceberg::Error),
    #[error("query: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
    #[error("Arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("Parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// Writing a table's data files failed (a full or read-only disk, an object store that
    /// refuses): names the table and where its files go.
    #[error("writing data files of {table} (under {location}): {source}")]
    WriteFiles {
        table: &'static str,
        location: String,
        source: Box<iceberg::Error>,
    },
    #[error("object storage at {location}: {source}")]
    ObjectStore {
        location: String,
        source: Box<opendal::Error>,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("table {table} was created by another Beacon version (columns: {have}; this version needs: {want}); schema upgrades are not supported yet: export and re-create the data directory")]
    SchemaMismatch {
        table: &'static str,
        have: String,
        want: String,
    },
    /// A table whose metadata cannot be read (a corrupt or missing metadata file): named,
    /// with the file the catalog points at, so an operator knows what to restore.
    #[error("table {table}: cannot load its metadata ({metadata}): {source}")]
    TableMetadata {
        table: String,
        metadata: String,
        source: Box<iceberg::Error>,
    },
    /// A data directory copied or moved without [`relocate::relocate`]: using it would read
    /// (and commit next to) the files of the directory it came from.
    #[error("the catalog in {here} records its tables under {recorded}: this data directory was copied or moved; run `beacon relocate --data-dir {here}` to rewrite its paths (the original is not touched)")]
    Moved { recorded: PathBuf, here: PathBuf },
    #[error("relocating {file}: {reason}")]
    Relocate { file: PathBuf, reason: String },
    #[error("catalog database: {0}")]
    Catalog(sqlx::Error),
    #[error("catalog inconsistent: {0}")]
    CatalogCorrupt(String),
    /// The catalog gave no answer to a commit's compare-and-swap: it may have landed. Its
    /// files must stay (see [`WarehouseError::commit_may_have_landed`]).
    #[error("commit to {table}: no answer from the catalog ({reason}); it may have landed: plan again from the table as it is")]
    CommitUnknown { table: String, reason: String },
    #[error("commit to {table} kept conflicting with other writers ({attempts} attempts)")]
    CommitConflict { table: String, attempts: u32 },
    #[error("{path} is no longer live in {table}: another job rewrote it first")]
    NotLive { table: String, path: String },
    #[error("{table} changed under the job: its {property} is {found}, the job was planned at {expected}; plan again")]
    Stale {
        table: String,
        property: String,
        expected: String,
        found: String,
    },
    #[error("{path} was deleted before the job could commit it (unreferenced-file deletion: raise --orphan-age-secs above the job's duration)")]
    StagedFileGone { path: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("no warehouse at {0}: start `beacon up --data-dir {0}` (or ingest) first")]
    Missing(PathBuf),
    #[error("no warehouse in the shared catalog for {0}: start ingest with the same --catalog-uri and --warehouse-uri first")]
    MissingShared(String),
    #[error("no table named `{0}` in the warehouse")]
    UnknownTable(String),
}

impl WarehouseError {
    /// Whether a failed commit's files may be referenced all the same (its outcome is
    /// unknown): a caller cleaning up after an error must then leave them.
    pub fn commit_may_have_landed(&self) -> bool {
        matches!(self, Self::CommitUnknown { .. })
    }
}

/// Where a data directory keeps the catalog and the table files.
#[derive(Debug, Clone)]
pub struct Layout {
    pub catalog_db: PathBuf,
    pub warehouse_dir: PathBuf,
}

impl Layout {
    pub fn new(data_dir: &Path) -> Self {
        let data_dir = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        Self {
            catalog_db: data_dir.join("catalog.db"),
            warehouse_dir: data_dir.join("warehouse"),
        }
    }

    /// The data directory this layout is in.
    pub fn data_dir(&self) -> PathBuf {
        self.catalog_db
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    pub fn catalog_uri(&self) -> String {
        format!(
            // SQLAlchemy's form (PyIceberg): `sqlite:///` + an absolute path, so four
            // slashes; three would name a path relative to the reader's directory.
            "sqlite:///{}",
            self.catalog_db.display()
        )
    }

    pub fn warehouse_uri(&self) -> String {
        format!("file://{}", self.warehouse_dir.display())
    }
}

/// Where a warehouse is: its catalog database and the root its table files go under.
///
/// [`Location::local`] is the embedded default (a SQLite catalog and table files in the data
/// directory); [`Location::shared`] is the form several machines share: the catalog in
/// PostgreSQL and the files on S3-compatible object storage (each can be chosen alone).
#[derive(Debug, Clone)]
pub struct Location {
    /// The catalog database's sqlx URI (`sqlite:...`, `postgres://...`).
    catalog: String,
    /// The root of the table files: a local path, or `s3://bucket/prefix`.
    warehouse: String,
    /// FileIO settings (`s3.endpoint`, `s3.region`, `s3.access-key-id`, ...), PyIceberg's
    /// names, handed to the storage as they are.
    props: HashMap<String, String>,
    /// Set when catalog and files are both in a data directory (the embedded default), which
    /// is what relocation and the moved-directory check are about.
    local: Option<Layout>,
}

impl Location {
    /// The embedded default: everything under `data_dir`.
    pub fn local(data_dir: &Path) -> Self {
        let layout = Layout::new(data_dir);
        Self {
            catalog: sqlx_uri(&layout),
            warehouse: layout.warehouse_dir.display().to_string(),
            props: HashMap::new(),
            local: Some(layout),
        }
    }

    /// A warehouse shared between machines. `catalog` is a `postgres://` (or `sqlite:`) URI;
    /// `warehouse` is `s3://bucket/prefix` (or a path every machine mounts); `props` are
    /// FileIO settings such as `s3.endpoint` and credentials.
    pub fn shared(
        catalog: &str,
        warehouse: &str,
        props: HashMap<String, String>,
    ) -> Result<Self, WarehouseError> {
        let catalog = match catalog.split_once("://") {
            // SQLAlchemy's spelling, as PyIceberg takes it, accepted too.
            Some(("postgresql" | "postgresql+psycopg" | "postgresql+psycopg2", rest)) => {
                format!("postgres://{rest}")
            }
            Some(("postgres", _)) => catalog.to_string(),
            _ if catalog.starts_with("sqlite:") => catalog.to_string(),
            _ => {
                return Err(WarehouseError::Unsupported(format!(
                    "catalog URI {catalog}: expected postgres://user:password@host:port/database or sqlite:path"
                )))
            }
        };
        let warehouse = warehouse.trim_end_matches('/').to_string();
        if warehouse.is_empty() {
            return Err(WarehouseError::Unsupported(
                "an empty warehouse URI: expected s3://bucket/prefix or an absolute path".into(),
            ));
        }
        Ok(Self {
            catalog,
            warehouse,
            props,
            local: None,
        })
    }

    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// Whether the table files are on S3-compatible object storage.
    pub fn on_object_storage(&self) -> bool {
        ["s3://", "s3a://", "s3n://"]
            .iter()
            .any(|s| self.warehouse.starts_with(s))
    }

    fn is_postgres(&self) -> bool {
        self.catalog.starts_with("postgres://")
    }

    /// The catalog URI as PyIceberg's SQL catalog (SQLAlchemy) opens it, without a password
    /// (it is printed and written to `endpoints.json`; readers take theirs from
    /// `PGPASSWORD` or `~/.pgpass`).
    pub fn pyiceberg_catalog_uri(&self) -> String {
        match &self.local {
            Some(layout) => layout.catalog_uri(),
            None => match self.catalog.strip_prefix("postgres://") {
                Some(rest) => format!("postgresql+psycopg://{}", without_password(rest)),
                None => format!(
                    "sqlite:///{}",
                    self.catalog
                        .trim_start_matches("sqlite:")
                        .split('?')
                        .next()
                        .unwrap_or_default()
                        .trim_start_matches("//")
                ),
            },
        }
    }

    /// The warehouse root as other engines name it (`file:///...` or `s3://...`).
    pub fn warehouse_uri(&self) -> String {
        match &self.local {
            Some(layout) => layout.warehouse_uri(),
            None if self.warehouse.starts_with('/') => format!("file://{}", self.warehouse),
            None => self.warehouse.clone(),
        }
    }

    /// The FileIO settings (for PyIceberg and other readers; may hold credentials).
    pub fn props(&self) -> &HashMap<String, String> {
        &self.props
    }
}

pub struct Warehouse {
    location: Location,
    catalog: Arc<dyn Catalog>,
    provider: Arc<IcebergCatalogProvider>,
    /// The read-only session [`Warehouse::sql`] shares: planning the views costs a few
    /// milliseconds, and the table providers reload metadata on every scan anyway.
    shared: tokio::sync::OnceCell<SessionContext>,
    /// Table providers that reuse metadata briefly ([`cached`]), shared by the sessions
    /// that serve queries (the shared one and merchants').
    cached: std::sync::Mutex<HashMap<String, Arc<cached::CachedTable>>>,
    /// Decoded Parquet footers those providers share; `None`: they read with Iceberg's scan.
    footers: Option<Arc<scan::Footers>>,
    /// The catalog compare-and-swap that replace commits use (opened with the warehouse).
    swap: replace::CatalogSwap,
}

impl Warehouse {
    /// Opens the warehouse under `data_dir`, creating the catalog and tables if needed.
    pub async fn open(data_dir: &Path) -> Result<Self, WarehouseError> {
        Self::open_at(Location::local(data_dir)).await
    }

    /// Opens the warehouse at `location`, creating the catalog and tables if needed.
    pub async fn open_at(location: Location) -> Result<Self, WarehouseError> {
        if !location.on_object_storage() {
            let root = PathBuf::from(&location.warehouse);
            std::fs::create_dir_all(&root)
                .map_err(|source| WarehouseError::Io { path: root, source })?;
        }
        // (After opening: that creates the catalog's own tables when they are missing.)
        let catalog = open_catalog(&location).await?;
        // The same catalog connection serves replace commits later.
        let swap = replace::CatalogSwap::connect(&location.catalog, CATALOG_NAME).await?;
        if let Some(layout) = &location.local {
            if let Some(recorded) = relocate::recorded_root(&swap).await? {
                if !relocate::is_here(layout, &recorded) {
                    return Err(WarehouseError::Moved {
                        recorded,
                        here: layout.data_dir(),
                    });
                }
            }
        }
        if let Err(e) = tables::ensure_all(catalog.as_ref()).await {
            return Err(name_metadata_file(&swap, e).await);
        }
        // The provider caches the table list, so it is built after the tables exist; it
        // reloads table metadata on every scan, so queries always see the latest commits.
        let provider = Arc::new(IcebergCatalogProvider::try_new(catalog.clone()).await?);
        Ok(Self {
            location,
            catalog,
            provider,
            shared: tokio::sync::OnceCell::new(),
            cached: Default::default(),
            footers: footers_for(&ServingReads::default()),
            swap,
        })
    }

    /// This warehouse with its serving sessions reading data files as `reads` says.
    pub fn with_serving_reads(mut self, reads: ServingReads) -> Self {
        self.footers = footers_for(&reads);
        self.cached = Default::default();
        self.shared = tokio::sync::OnceCell::new();
        self
    }

    /// The decoded footers serving reads keep (`None` with [`ServingReads::Iceberg`]).
    pub fn footers(&self) -> Option<&Arc<scan::Footers>> {
        self.footers.as_ref()
    }

    /// Opens an existing warehouse; refuses to create one (for read-only tools like `sql`).
    pub async fn open_existing(data_dir: &Path) -> Result<Self, WarehouseError> {
        let layout = Layout::new(data_dir);
        if !layout.catalog_db.exists() {
            return Err(WarehouseError::Missing(data_dir.to_path_buf()));
        }
        Self::open(data_dir).await
    }

    /// [`Warehouse::open_existing`] for any [`Location`]: a shared catalog must already hold
    /// Beacon's tables.
    pub async fn open_existing_at(location: Location) -> Result<Self, WarehouseError> {
        if let Some(layout) = &location.local {
            return Self::open_existing(&layout.data_dir()).await;
        }
        let swap = replace::CatalogSwap::connect(&location.catalog, CATALOG_NAME).await?;
        if !swap.locations().await.is_ok_and(|rows| !rows.is_empty()) {
            return Err(WarehouseError::MissingShared(location.warehouse_uri()));
        }
        drop(swap);
        Self::open_at(location).await
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    pub fn catalog(&self) -> &Arc<dyn Catalog> {
        &self.catalog
    }

    /// Removes and adds data files of `kind` in one atomic snapshot (see [`replace`]).
    pub async fn replace(
        &self,
        kind: TableKind,
        rewrite: &replace::Rewrite,
    ) -> Result<replace::Outcome, WarehouseError> {
        self.replace_on(kind, None, rewrite).await
    }

    /// [`Warehouse::replace`] starting from `loaded`, a recent load of `kind` (the one its
    /// files were written for): a writer that commits every second saves a metadata load
    /// (a catalog query and a metadata file read) per commit.
    pub async fn replace_on(
        &self,
        kind: TableKind,
        loaded: Option<Table>,
        rewrite: &replace::Rewrite,
    ) -> Result<replace::Outcome, WarehouseError> {
        let (catalog, ident) = (self.catalog.as_ref(), kind.ident());
        replace::replace(catalog, &self.swap, &ident, loaded, rewrite).await
    }

    /// [`Warehouse::replace_on`] for a rewrite whose added files the caller wrote and owns:
    /// they are deleted again when no snapshot references them (the commit certainly did
    /// not land, or the job had already been applied with other files), and kept when the
    /// commit's outcome is unknown. One `FileIO` for all of them, not a table load each.
    pub async fn replace_owned(
        &self,
        kind: TableKind,
        loaded: Option<Table>,
        rewrite: &replace::Rewrite,
    ) -> Result<replace::Outcome, WarehouseError> {
        let file_io = loaded.as_ref().map(|t| t.file_io().clone());
        let result = self.replace_on(kind, loaded, rewrite).await;
        let spare = match &result {
            Ok(outcome) => matches!(outcome, replace::Outcome::AlreadyApplied { .. }),
            Err(e) => !e.commit_may_have_landed(),
        };
        if spare {
            // (A table that cannot be loaded now leaves them as orphans for maintenance.)
            let _ = match file_io {
                Some(io) => delete_all(&io, &rewrite.added).await,
                None => self.delete_files(kind, &rewrite.added).await,
            };
        }
        result
    }

    /// Writes `batch` as data files of `kind` (sorted and partitioned like appends) without
    /// committing them: the `added` side of a [`replace`].
    pub async fn write_files(
        &self,
        kind: TableKind,
        batch: RecordBatch,
    ) -> Result<Vec<iceberg::spec::DataFile>, WarehouseError> {
        let table = self.table(kind).await?;
        tables::write_files(kind, &table, batch).await
    }

    /// [`Warehouse::write_files`] for an already loaded `table` of `kind`.
    pub async fn write_files_to(
        &self,
        kind: TableKind,
        table: &Table,
        batch: RecordBatch,
    ) -> Result<Vec<iceberg::spec::DataFile>, WarehouseError> {
        tables::write_files(kind, table, batch).await
    }

    /// Deletes data files written for `kind` that no commit references (a failed job's),
    /// with one table load for all of them.
    pub async fn delete_files(
        &self,
        kind: TableKind,
        files: &[iceberg::spec::DataFile],
    ) -> Result<(), WarehouseError> {
        if files.is_empty() {
            return Ok(());
        }
        delete_all(self.table(kind).await?.file_io(), files).await
    }

    pub async fn table(&self, kind: TableKind) -> Result<Table, WarehouseError> {
        match self.catalog.load_table(&kind.ident()).await {
            Ok(t) => Ok(t),
            Err(source) => Err(name_metadata_file(
                &self.swap,
                WarehouseError::TableMetadata {
                    table: kind.name().to_string(),
                    metadata: String::new(),
                    source: Box::new(source),
                },
            )
            .await),
        }
    }

    /// Loads every table's current metadata: the warehouse can answer and commit. The
    /// readiness check of the roles that need the warehouse.
    pub async fn check(&self) -> Result<(), WarehouseError> {
        for kind in TableKind::ALL {
            self.table(kind).await?;
        }
        Ok(())
    }

    /// A DataFusion session over the warehouse: tables by bare name, HLL functions, views.
    pub async fn session(&self) -> Result<SessionContext, WarehouseError> {
        self.session_scoped(None, false).await
    }

    /// A session that sees one merchant's rows and nothing else: every table is replaced by
    /// a view filtered on `merchant_id` whose plan holds the table's provider directly, so
    /// no SQL in this session can name the unfiltered table (not by qualified name, not
    /// through `information_schema`, not through a view: the views are rebuilt on the
    /// filtered tables).
    /// Its reads may be up to [`cached::REFRESH`] behind the last commit.
    pub async fn merchant_session(
        &self,
        merchant_id: &str,
    ) -> Result<SessionContext, WarehouseError> {
        self.session_scoped(Some(merchant_id), true).await
    }

    /// A session for serving queries: every row, reads up to [`cached::REFRESH`] behind.
    pub async fn serving_session(&self) -> Result<SessionContext, WarehouseError> {
        self.session_scoped(None, true).await
    }

    async fn session_scoped(
        &self,
        merchant: Option<&str>,
        cached: bool,
    ) -> Result<SessionContext, WarehouseError> {
        let config = SessionConfig::new()
            .with_default_catalog_and_schema(CATALOG_NAME, NAMESPACE)
            .with_information_schema(true);
        let ctx = SessionContext::new_with_config(config);
        // The session's catalog is an in-memory one holding the Iceberg tables' providers
        // (which reload metadata on every scan) plus this session's views and pinned
        // snapshots, so nothing a session registers leaks into the shared Iceberg provider.
        let schema = Arc::new(MemorySchemaProvider::new());
        if let Some(iceberg) = self.provider.schema(NAMESPACE) {
            let scratch = SessionContext::new();
            for name in iceberg.table_names() {
                let Some(table) = iceberg.table(&name).await? else {
                    continue;
                };
                let table: Arc<dyn datafusion::catalog::TableProvider> = if name.contains('$') {
                    Arc::new(inspect::Projected(table))
                } else if cached {
                    self.cached_table(&name, table.schema())
                } else {
                    table
                };
                let table = match merchant {
                    None => table,
                    // Metadata tables (`events$snapshots`, ...) describe every merchant's
                    // commits: not for a merchant's eyes.
                    Some(_) if name.contains('$') => continue,
                    Some(m) => {
                        use datafusion::prelude::{col, lit};
                        scratch
                            .read_table(table)?
                            .filter(col("merchant_id").eq(lit(m)))?
                            .into_view()
                    }
                };
                schema.register_table(name, table)?;
            }
        }
        let catalog = Arc::new(MemoryCatalogProvider::new());
        catalog.register_schema(NAMESPACE, schema)?;
        ctx.register_catalog(CATALOG_NAME, catalog);
        hll::register(&ctx);
        for view in rollup::VIEWS.iter().chain(views::VIEWS) {
            ctx.sql(view).await?;
        }
        Ok(ctx)
    }

    /// Runs one read-only query in the shared session (statements that would change the
    /// session, like `CREATE VIEW` or `SET`, are refused: use [`Warehouse::session`]).
    pub async fn sql(&self, query: &str) -> Result<Vec<RecordBatch>, WarehouseError> {
        Ok(self
            .shared_session()
            .await?
            .sql_with_options(query, read_only())
            .await?
            .collect()
            .await?)
    }

    /// The shared serving session (every row, read-only use only): the base from which
    /// per-request sessions with their own budgets are derived (see `beacon-query`).
    pub async fn shared_session(&self) -> Result<&SessionContext, WarehouseError> {
        self.shared.get_or_try_init(|| self.serving_session()).await
    }

    fn cached_table(
        &self,
        name: &str,
        schema: arrow::datatypes::SchemaRef,
    ) -> Arc<cached::CachedTable> {
        let mut map = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(cached::CachedTable::new(
                    self.catalog.clone(),
                    iceberg::TableIdent::new(
                        iceberg::NamespaceIdent::new(NAMESPACE.into()),
                        name.into(),
                    ),
                    schema,
                    self.footers.clone(),
                ))
            })
            .clone()
    }

    /// The snapshot ids that serving sessions read now for each of `tables` (by name), in
    /// order: what a result computed from those tables depends on, so a cache of results
    /// can key on them.
    pub async fn serving_snapshots(
        &self,
        tables: &[&str],
    ) -> Result<Vec<Option<i64>>, WarehouseError> {
        let schema = self
            .provider
            .schema(NAMESPACE)
            .ok_or_else(|| WarehouseError::UnknownTable(NAMESPACE.into()))?;
        let mut out = Vec::with_capacity(tables.len());
        for name in tables {
            let table = schema
                .table(name)
                .await?
                .ok_or_else(|| WarehouseError::UnknownTable((*name).into()))?;
            out.push(
                self.cached_table(name, table.schema())
                    .snapshot_id()
                    .await?,
            );
        }
        Ok(out)
    }

    /// The last JetStream sequence committed into `kind`, from its current snapshot.
    pub async fn committed_seq(&self, kind: TableKind) -> Result<u64, WarehouseError> {
        let table = self.table(kind).await?;
        Ok(tables::snapshot_property_u64(&table, tables::SEQ_PROPERTY))
    }

    /// Appends `batch` to `kind` in one Iceberg commit carrying `properties`.
    pub async fn append(
        &self,
        kind: TableKind,
        batch: RecordBatch,
        properties: HashMap<String, String>,
    ) -> Result<(), WarehouseError> {
        let table = self.table(kind).await?;
        tables::append(self.catalog.as_ref(), kind, &table, batch, properties).await
    }
}

/// Where serving reads keep footers (`None`: they read with Iceberg's scan).
fn footers_for(reads: &ServingReads) -> Option<Arc<scan::Footers>> {
    match reads {
        ServingReads::Parquet { footer_cache_bytes } => {
            Some(Arc::new(scan::Footers::new(*footer_cache_bytes)))
        }
        ServingReads::Iceberg => None,
    }
}

/// SQL options that refuse anything but queries: no DDL (`CREATE VIEW`), DML or statements
/// (`SET`). Every read path plans with these.
pub fn read_only() -> datafusion::execution::context::SQLOptions {
    datafusion::execution::context::SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// The sqlx URI of the catalog database (the same one the SQL catalog opens).
/// Fills in which metadata file a [`WarehouseError::TableMetadata`] is about (the catalog
/// row's `metadata_location`); other errors pass through.
async fn name_metadata_file(catalog: &replace::CatalogSwap, e: WarehouseError) -> WarehouseError {
    match e {
        WarehouseError::TableMetadata {
            table,
            metadata,
            source,
        } if metadata.is_empty() => {
            let ident = TableIdent::new(NamespaceIdent::new(NAMESPACE.into()), table.clone());
            let metadata = match catalog.metadata_location(&ident).await {
                Ok(Some(location)) => location,
                Ok(None) => "no catalog row".into(),
                Err(e) => format!("catalog unreadable: {e}"),
            };
            WarehouseError::TableMetadata {
                table,
                metadata,
                source,
            }
        }
        e => e,
    }
}

/// Deletes every file, trying all of them; the first error, if any.
async fn delete_all(
    io: &iceberg::io::FileIO,
    files: &[iceberg::spec::DataFile],
) -> Result<(), WarehouseError> {
    let mut first = Ok(());
    for f in files {
        if let Err(e) = io.delete(f.file_path()).await {
            first = first.and(Err(e.into()));
        }
    }
    first
}

/// `user:password@host/db` -> `user@host/db`.
fn without_password(authority_and_path: &str) -> String {
    match authority_and_path.split_once('@') {
        Some((user_info, rest)) => {
            let user = user_info.split(':').next().unwrap_or_default();
            format!("{user}@{rest}")
        }
        None => authority_and_path.to_string(),
    }
}

fn sqlx_uri(layout: &Layout) -> String {
    format!("sqlite:{}?mode=rwc", layout.catalog_db.display())
}

async fn open_catalog(location: &Location) -> Result<Arc<dyn Catalog>, WarehouseError> {
    let storage: Arc<dyn iceberg::io::StorageFactory> = if location.on_object_storage() {
        Arc::new(iceberg_storage_opendal::OpenDalStorageFactory::S3 {
            customized_credential_load: None,
        })
    } else {
        Arc::new(LocalFsStorageFactory)
    };
    let bind = if location.is_postgres() {
        SqlBindStyle::DollarNumeric
    } else {
        SqlBindStyle::QMark
    };
    let mut props = location.props.clone();
    props.extend([
        (SQL_CATALOG_PROP_URI.to_string(), location.catalog.clone()),
        (
            SQL_CATALOG_PROP_WAREHOUSE.to_string(),
            location.warehouse.clone(),
        ),
        (SQL_CATALOG_PROP_BIND_STYLE.to_string(), bind.to_string()),
    ]);
    let catalog = SqlCatalogBuilder::default()
        .with_storage_factory(storage)
        .load(CATALOG_NAME, props)
        .await?;
    Ok(Arc::new(catalog))
}
