//! A table provider for query-serving sessions that reuses table metadata for a short while.
//!
//! The catalog-backed Iceberg provider loads the table on every scan: a catalog query, the
//! metadata JSON, and (through a fresh `Table`, whose object cache starts empty) the
//! manifest list and manifests. For a dashboard that is most of a query's cost. Here the
//! loaded `Table` is kept for [`REFRESH`]; after that the catalog is asked again, and the
//! same `Table` (with its warm manifest cache) is kept when the metadata location has not
//! changed. Reads are at most [`REFRESH`] (plus one catalog load) behind the last commit.
//!
//! One task refreshes at a time and the others go on with the metadata they have, so a
//! slow catalog load never queues every query on the table behind it.
//!
//! Scans read the planned files with DataFusion's Parquet source and footers decoded once
//! ([`crate::scan`]) where that reads what Iceberg's own scan reads, and with Iceberg's
//! scan otherwise (or when the warehouse was opened with [`ServingReads::Iceberg`]).

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use iceberg::table::Table;
use iceberg::{Catalog, TableIdent};
use iceberg_datafusion::IcebergStaticTableProvider;

use crate::scan::{self, Footers, Increment, Scanned};

/// How long loaded table metadata is reused.
pub const REFRESH: Duration = Duration::from_secs(1);

/// How serving sessions read data files.
#[derive(Clone, Debug)]
pub enum ServingReads {
    /// DataFusion's Parquet source over the files Iceberg plans, with decoded footers kept
    /// (up to `footer_cache_bytes` in memory); Iceberg's scan where that would differ.
    Parquet { footer_cache_bytes: u64 },
    /// iceberg-datafusion's scan for everything (what the Parquet reads are measured against).
    Iceberg,
}

impl Default for ServingReads {
    fn default() -> Self {
        ServingReads::Parquet {
            footer_cache_bytes: 256 << 20,
        }
    }
}

#[derive(Clone)]
struct Loaded {
    at: Instant,
    /// Its metadata location says whether a reload changed anything; its current snapshot
    /// is what scans read.
    table: Table,
    /// Whether reading by column name reads what Iceberg reads ([`scan::reads_by_name`]).
    by_name: bool,
    provider: Arc<IcebergStaticTableProvider>,
}

pub struct CachedTable {
    catalog: Arc<dyn Catalog>,
    ident: TableIdent,
    schema: SchemaRef,
    /// Where decoded footers are kept; `None`: Iceberg's scan reads the files.
    footers: Option<Arc<Footers>>,
    /// What scans read now (held only to copy it out).
    loaded: std::sync::Mutex<Option<Loaded>>,
    /// Held by the one task that reloads from the catalog.
    refreshing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for CachedTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedTable")
            .field("ident", &self.ident)
            .finish()
    }
}

impl CachedTable {
    pub fn new(
        catalog: Arc<dyn Catalog>,
        ident: TableIdent,
        schema: SchemaRef,
        footers: Option<Arc<Footers>>,
    ) -> Self {
        Self {
            catalog,
            ident,
            schema,
            footers,
            loaded: std::sync::Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    fn current(&self) -> Option<Loaded> {
        self.loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn loaded(&self) -> DfResult<Loaded> {
        let current = self.current();
        if let Some(l) = &current {
            if l.at.elapsed() < REFRESH {
                return Ok(l.clone());
            }
        }
        // Stale or never loaded: one task reloads; with metadata in hand the others keep
        // reading it meanwhile, without any they wait for the reload.
        let _refresh = match (self.refreshing.try_lock(), current) {
            (Ok(guard), _) => guard,
            (Err(_), Some(l)) => return Ok(l),
            (Err(_), None) => self.refreshing.lock().await,
        };
        if let Some(l) = self.current().filter(|l| l.at.elapsed() < REFRESH) {
            return Ok(l);
        }
        let err = |e: iceberg::Error| DataFusionError::External(Box::new(e));
        let table = self.catalog.load_table(&self.ident).await.map_err(err)?;
        let fresh = match self.current() {
            Some(l) if l.table.metadata_location() == table.metadata_location() => Loaded {
                at: Instant::now(),
                ..l
            },
            _ => {
                let metadata = table.metadata();
                // Files without field ids are matched through the name mapping by Iceberg.
                let by_name = !metadata
                    .properties()
                    .contains_key("schema.name-mapping.default")
                    && scan::reads_by_name(
                        metadata.current_schema(),
                        metadata.schemas_iter().map(|s| s.as_ref()),
                    );
                Loaded {
                    at: Instant::now(),
                    by_name,
                    provider: Arc::new(
                        IcebergStaticTableProvider::try_new_from_table(table.clone())
                            .await
                            .map_err(err)?,
                    ),
                    table,
                }
            }
        };
        *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) = Some(fresh.clone());
        Ok(fresh)
    }

    /// The snapshot that scans of this table read now (`None` before the first commit):
    /// with the other tables a query reads, what its answer depends on.
    pub async fn snapshot_id(&self) -> DfResult<Option<i64>> {
        Ok(self.loaded().await?.table.metadata().current_snapshot_id())
    }
}

#[async_trait]
impl TableProvider for CachedTable {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let loaded = self.loaded().await?;
        let increment = Increment::of(state, self.ident.name());
        if let (Some(footers), true) = (&self.footers, loaded.by_name) {
            let plan = scan::plan(
                &loaded.table,
                &self.schema,
                footers,
                state,
                projection,
                filters,
                limit,
                increment.as_deref(),
            )
            .await?;
            if let Some(plan) = plan {
                return Ok(plan);
            }
        }
        // Iceberg's scan reads every row.
        if let Some(increment) = increment {
            increment.record(Scanned {
                snapshot: None,
                added_only: false,
            });
        }
        loaded
            .provider
            .scan(state, projection, filters, limit)
            .await
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }
}
