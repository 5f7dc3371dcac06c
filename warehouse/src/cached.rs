//! A table provider for query-serving sessions that reuses table metadata for a short while.
//!
//! The catalog-backed Iceberg provider loads the table on every scan: a catalog query, the
//! metadata JSON, and (through a fresh `Table`, whose object cache starts empty) the
//! manifest list and manifests. For a dashboard that is most of a query's cost. Here the
//! loaded `Table` is kept for [`REFRESH`]; after that the catalog is asked again, and the
//! same `Table` (with its warm manifest cache) is kept when the metadata location has not
//! changed. Reads are at most [`REFRESH`] behind the last commit.

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
use iceberg::{Catalog, TableIdent};
use iceberg_datafusion::IcebergStaticTableProvider;
use tokio::sync::Mutex;

/// How long loaded table metadata is reused.
pub const REFRESH: Duration = Duration::from_secs(1);

struct Loaded {
    at: Instant,
    location: Option<String>,
    provider: Arc<IcebergStaticTableProvider>,
}

pub struct CachedTable {
    catalog: Arc<dyn Catalog>,
    ident: TableIdent,
    schema: SchemaRef,
    loaded: Mutex<Option<Loaded>>,
}

impl std::fmt::Debug for CachedTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedTable")
            .field("ident", &self.ident)
            .finish()
    }
}

impl CachedTable {
    pub fn new(catalog: Arc<dyn Catalog>, ident: TableIdent, schema: SchemaRef) -> Self {
        Self {
            catalog,
            ident,
            schema,
            loaded: Mutex::new(None),
        }
    }

    async fn provider(&self) -> DfResult<Arc<IcebergStaticTableProvider>> {
        let mut loaded = self.loaded.lock().await;
        if let Some(l) = loaded.as_ref() {
            if l.at.elapsed() < REFRESH {
                return Ok(l.provider.clone());
            }
        }
        let err = |e: iceberg::Error| DataFusionError::External(Box::new(e));
        let table = self.catalog.load_table(&self.ident).await.map_err(err)?;
        let location = table.metadata_location().map(str::to_string);
        let provider = match loaded.take() {
            Some(l) if l.location == location => l.provider,
            _ => Arc::new(
                IcebergStaticTableProvider::try_new_from_table(table)
                    .await
                    .map_err(err)?,
            ),
        };
        *loaded = Some(Loaded {
            at: Instant::now(),
            location,
            provider: provider.clone(),
        });
        Ok(provider)
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
        self.provider()
            .await?
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
