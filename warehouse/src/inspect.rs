//! Iceberg's metadata tables (`events$snapshots`, `events$manifests`) as SQL sees them.
//!
//! iceberg-datafusion 0.10.1 returns every column of a metadata table whatever columns a
//! scan asks for, so any query that does not select them all (`SELECT count(*)`,
//! `SELECT content FROM "events$manifests"`) failed with an internal error. [`Projected`]
//! applies the scan's projection itself.

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::error::Result;
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::ExecutionPlan;

/// A metadata table whose scans return the columns they were asked for.
#[derive(Debug)]
pub(crate) struct Projected(pub Arc<dyn TableProvider>);

#[async_trait]
impl TableProvider for Projected {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn schema(&self) -> SchemaRef {
        self.0.schema()
    }

    fn table_type(&self) -> TableType {
        self.0.table_type()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        // No filter or limit is pushed down (the default: DataFusion applies them above).
        let all = self.0.scan(state, None, &[], None).await?;
        let Some(columns) = projection else {
            return Ok(all);
        };
        let schema = all.schema();
        let exprs: Vec<(Arc<dyn PhysicalExpr>, String)> = columns
            .iter()
            .map(|&i| {
                let name = schema.field(i).name().clone();
                (
                    Arc::new(Column::new(&name, i)) as Arc<dyn PhysicalExpr>,
                    name,
                )
            })
            .collect();
        Ok(Arc::new(ProjectionExec::try_new(exprs, all)?))
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;

    use crate::{TableKind, Warehouse};

    async fn first_int(wh: &Warehouse, sql: &str) -> i64 {
        let batches = wh.sql(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        batches[0]
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .map_or(-1, |a| a.value(0))
    }

    /// Queries that select some of a metadata table's columns, or none, answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metadata_tables_answer_projections_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let wh = Warehouse::open(dir.path()).await.unwrap();
        let kind = TableKind::FailedEvents;
        for prefix in ["a", "b"] {
            let rows = crate::replace::tests::rows(&wh, prefix, 3).await;
            wh.append(kind, rows, Default::default()).await.unwrap();
        }
        let table = kind.name();
        assert_eq!(
            first_int(&wh, &format!("SELECT count(*) FROM \"{table}$snapshots\"")).await,
            2
        );
        let files = format!(
            "SELECT sum(added_data_files_count + existing_data_files_count) FROM \"{table}$manifests\" WHERE content = 0"
        );
        assert_eq!(first_int(&wh, &files).await, 2);
    }
}
