//! Running a plan: its sources' DataFusion plans in the merchant's session, their rows
//! merged into an [`Answer`].
//!
//! The merchant's session is the one [`Warehouse::merchant_session`] gives the Postgres
//! endpoint (every table a view filtered on the merchant), so the metrics API and SQL scope
//! rows by one mechanism. Building one plans the warehouse's views, so sessions are kept
//! per merchant ([`MerchantSessions`]); each request derives its own from it under the
//! query budget. Their tables follow commits on their own (see `beacon_warehouse::cached`).

use std::sync::Arc;
use std::time::Duration;

use beacon_warehouse::{Warehouse, WarehouseError};
use datafusion::dataframe::DataFrame;
use datafusion::prelude::SessionContext;
use serde_json::Value;

use super::logical;
use super::plan::{Plan, Source};
use super::request::QueryError;
use super::results::Answer;
use super::slices::{Deadline, Slices};
use crate::budget::{Budget, Scope};

/// Why a plan has no answer.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error(transparent)]
    Warehouse(#[from] WarehouseError),
    /// The data cannot answer the query as asked (revenue in several currencies).
    #[error(transparent)]
    Invalid(#[from] QueryError),
}

impl From<datafusion::error::DataFusionError> for AnswerError {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        AnswerError::Warehouse(e.into())
    }
}

/// Merchants' sessions, built once and kept while used, and the rollup slices read
/// through them.
pub struct MerchantSessions {
    warehouse: Arc<Warehouse>,
    sessions: moka::future::Cache<String, SessionContext>,
    slices: Option<Slices>,
}

/// Bytes of rollup slices kept by default ([`MerchantSessions::with_slices`]).
pub const SLICE_BYTES: u64 = 512 << 20;

impl MerchantSessions {
    pub fn new(warehouse: Arc<Warehouse>) -> Self {
        Self {
            warehouse,
            slices: Some(Slices::new(SLICE_BYTES)),
            // A session is a catalog of views over shared table providers: small, but
            // there are millions of merchants, so only the recently active are kept.
            sessions: moka::future::Cache::builder()
                .max_capacity(4096)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }

    /// Keeps at most `max_bytes` of rollup slices in memory (0: none, every source runs in
    /// DataFusion).
    pub fn with_slices(mut self, max_bytes: u64) -> Self {
        self.slices = (max_bytes > 0).then(|| Slices::new(max_bytes));
        self
    }

    pub fn slices(&self) -> Option<&Slices> {
        self.slices.as_ref()
    }

    pub fn warehouse(&self) -> &Arc<Warehouse> {
        &self.warehouse
    }

    /// The tables `sources` read, each once, with the snapshot serving sessions read of it
    /// now: what their answer depends on (the result cache's key), and what the slices that
    /// [`Self::run`] reads must be of.
    pub async fn snapshots(
        &self,
        sources: &[Source],
    ) -> Result<Vec<(&'static str, Option<i64>)>, WarehouseError> {
        let mut tables: Vec<&'static str> = Vec::new();
        for t in sources.iter().flat_map(|s| s.tables.iter()) {
            if !tables.contains(t) {
                tables.push(t);
            }
        }
        let snapshots = self.warehouse.serving_snapshots(&tables).await?;
        Ok(tables.into_iter().zip(snapshots).collect())
    }

    /// Runs `sources` of `plan` in the merchant's session under `budget` and merges their
    /// rows, answering rolled-up sources from the merchant's slices in memory; `snapshots`
    /// are the sources' tables' ([`Self::snapshots`]), which the slices must be of.
    pub async fn run(
        &self,
        budget: &Arc<Budget>,
        plan: &Plan,
        sources: &[Source],
        snapshots: &[(&str, Option<i64>)],
    ) -> Result<Answer, AnswerError> {
        let ctx = self.budgeted(budget, &plan.merchant_id).await?;
        let deadline = Deadline::after(budget.limits().statement_timeout);
        let mut rows = Vec::with_capacity(sources.len());
        for source in sources {
            let from_memory = match &self.slices {
                Some(slices) => {
                    slices
                        .rows(&ctx, budget, plan, source, snapshots, deadline)
                        .await?
                }
                None => None,
            };
            let source_rows = match from_memory {
                Some(r) => r,
                None => json_rows(logical::frame(&ctx, plan, source).await?).await?,
            };
            rows.push((source.kind, source_rows));
        }
        Ok(plan.results(&rows)?)
    }

    /// The session of `merchant`. Two first requests at once may both build it: harmless,
    /// and a failed build is not kept.
    pub async fn get(&self, merchant: &str) -> Result<SessionContext, WarehouseError> {
        if let Some(ctx) = self.sessions.get(merchant).await {
            return Ok(ctx);
        }
        let ctx = self.warehouse.merchant_session(merchant).await?;
        // The API's plans are small and built here, not written by analysts: one pass of
        // the optimizer leaves them as three would (about 0.3 ms of each query's planning).
        ctx.state_ref()
            .write()
            .config_mut()
            .options_mut()
            .optimizer
            .max_passes = 1;
        self.sessions
            .insert(merchant.to_string(), ctx.clone())
            .await;
        Ok(ctx)
    }

    /// A session for one request of `merchant` under `budget`.
    pub async fn budgeted(
        &self,
        budget: &Arc<Budget>,
        merchant: &str,
    ) -> Result<SessionContext, WarehouseError> {
        let base = self.get(merchant).await?;
        let scope = Scope::new(merchant, budget.limits().statement_timeout);
        Ok(budget.session(&base, scope)?)
    }
}

/// The rows of `df` as JSON objects.
pub async fn json_rows(df: DataFrame) -> Result<Vec<Value>, WarehouseError> {
    beacon_warehouse::output::json_rows(&df.collect().await?)
}

/// Runs `sources` (a plan's, or [`Plan::events_sources`]) in `ctx`, a session of the
/// plan's merchant, and merges their rows: every source in DataFusion (see
/// [`MerchantSessions::run`] for the API's way).
pub async fn execute(
    ctx: &SessionContext,
    plan: &Plan,
    sources: &[Source],
) -> Result<Answer, AnswerError> {
    let mut rows = Vec::with_capacity(sources.len());
    for source in sources {
        let df = logical::frame(ctx, plan, source).await?;
        rows.push((source.kind, json_rows(df).await?));
    }
    Ok(plan.results(&rows)?)
}
