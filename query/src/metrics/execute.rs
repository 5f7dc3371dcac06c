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
use datafusion::prelude::SessionContext;

use super::logical;
use super::plan::{Plan, Source};
use super::request::QueryError;
use super::results::Answer;
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

/// Merchants' sessions, built once and kept while used.
pub struct MerchantSessions {
    warehouse: Arc<Warehouse>,
    sessions: moka::future::Cache<String, SessionContext>,
}

impl MerchantSessions {
    pub fn new(warehouse: Arc<Warehouse>) -> Self {
        Self {
            warehouse,
            // A session is a catalog of views over shared table providers: small, but
            // there are millions of merchants, so only the recently active are kept.
            sessions: moka::future::Cache::builder()
                .max_capacity(4096)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }

    pub fn warehouse(&self) -> &Arc<Warehouse> {
        &self.warehouse
    }

    /// The session of `merchant`. Two first requests at once may both build it: harmless,
    /// and a failed build is not kept.
    pub async fn get(&self, merchant: &str) -> Result<SessionContext, WarehouseError> {
        if let Some(ctx) = self.sessions.get(merchant).await {
            return Ok(ctx);
        }
        let ctx = self.warehouse.merchant_session(merchant).await?;
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
        under_budget(&self.get(merchant).await?, budget, merchant)
    }
}

/// A session derived from `base` for one request of `merchant`, under `budget`.
fn under_budget(
    base: &SessionContext,
    budget: &Arc<Budget>,
    merchant: &str,
) -> Result<SessionContext, WarehouseError> {
    let scope = Scope::new(merchant, budget.limits().statement_timeout);
    Ok(budget.session(base, scope)?)
}

/// A budgeted session of `merchant` built afresh (benchmarks; the API keeps them).
pub async fn budgeted_session(
    warehouse: &Warehouse,
    budget: &Arc<Budget>,
    merchant: &str,
) -> Result<SessionContext, WarehouseError> {
    under_budget(
        &warehouse.merchant_session(merchant).await?,
        budget,
        merchant,
    )
}

/// Runs `sources` (a plan's, or [`Plan::events_sources`]) in `ctx`, a session of the
/// plan's merchant, and merges their rows.
pub async fn execute(
    ctx: &SessionContext,
    plan: &Plan,
    sources: &[Source],
) -> Result<Answer, AnswerError> {
    let mut rows = Vec::with_capacity(sources.len());
    for source in sources {
        let batches = logical::frame(ctx, plan, source).await?.collect().await?;
        rows.push((source.kind, beacon_warehouse::output::json_rows(&batches)?));
    }
    Ok(plan.results(&rows)?)
}
