//! What one query may cost, enforced inside DataFusion rather than around it.
//!
//! Every session that answers a merchant (the metrics API's, each SQL connection's) is
//! derived from the warehouse's with [`Budget::session`], which gives it
//! - its own memory pool: at most [`QueryLimits::memory_per_query`] per query, drawn from a
//!   pool all queries share ([`QueryLimits::memory_total`]); no spilling to disk, so a query
//!   over its share fails with a clear error instead of filling the disk or the RAM;
//! - a query planner that puts a [`GuardExec`] on top of every physical plan. The guard
//!   admits the query (at most [`QueryLimits::concurrent_per_merchant`] running per
//!   merchant and [`QueryLimits::concurrent_total`] in all, waiting up to
//!   [`QueryLimits::admission_wait`] for a slot), then enforces the statement timeout and
//!   the cancel signal on every batch. Dropping the stream stops the work: DataFusion aborts
//!   the tasks it spawned.
//!
//! DataFusion's cooperative scheduling (the `EnsureCooperative` rule) makes long operators
//! yield, so the guard gets polled and the deadline is seen even in a tight aggregation.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::context::{QueryPlanner, SessionState};
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{
    GreedyMemoryPool, MemoryLimit, MemoryPool, MemoryReservation,
};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use datafusion::physical_planner::{DefaultPhysicalPlanner, PhysicalPlanner};
use datafusion::prelude::SessionContext;
use futures::future::BoxFuture;
use futures::{FutureExt, Stream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::sql_limits::SqlLimits;

/// The operator's limits for query work (flags `--query-*` of `beacon up` / `beacon api`).
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    /// Default statement timeout, and the most a session may `SET statement_timeout` to.
    pub statement_timeout: Duration,
    /// Memory one query may hold.
    pub memory_per_query: usize,
    /// Memory all queries together may hold.
    pub memory_total: usize,
    /// Queries running at once for one merchant (or one admin login).
    pub concurrent_per_merchant: usize,
    /// Queries running at once in all.
    pub concurrent_total: usize,
    /// How long a query waits for a slot before it is refused as busy.
    pub admission_wait: Duration,
    /// Limits on SQL text, checked before parsing.
    pub sql: SqlLimits,
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self {
            statement_timeout: Duration::from_secs(30),
            memory_per_query: 512 << 20,
            memory_total: 2 << 30,
            concurrent_per_merchant: 4,
            concurrent_total: 32,
            admission_wait: Duration::from_secs(5),
            sql: SqlLimits::default(),
        }
    }
}

/// Why a query was stopped by its budget (carried inside DataFusion errors as
/// `DataFusionError::External`, see [`Stopped::of`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stopped {
    #[error("canceling statement due to statement timeout ({0} ms)")]
    Timeout(u64),
    #[error("canceling statement due to user request")]
    Cancelled,
    #[error(
        "too many queries running for {who} (at most {limit} at once): retry when one has finished"
    )]
    Busy { who: String, limit: usize },
    #[error("too many queries running on this server (at most {0} at once): retry shortly")]
    ServerBusy(usize),
}

impl Stopped {
    /// The `Stopped` inside a DataFusion error, however deeply it was wrapped.
    pub fn of(e: &DataFusionError) -> Option<&Stopped> {
        match e {
            DataFusionError::External(inner) => inner.downcast_ref::<Stopped>(),
            DataFusionError::Context(_, inner) => Self::of(inner),
            DataFusionError::Shared(inner) => Self::of(inner),
            _ => None,
        }
    }

    /// SQLSTATE: 57014 (query_canceled), 53300 (too_many_connections).
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Stopped::Timeout(_) | Stopped::Cancelled => "57014",
            Stopped::Busy { .. } | Stopped::ServerBusy(_) => "53300",
        }
    }
}

/// Whether `e` is a query running out of its memory share.
pub fn is_out_of_memory(e: &DataFusionError) -> bool {
    match e {
        DataFusionError::ResourcesExhausted(_) => true,
        DataFusionError::Context(_, inner) => is_out_of_memory(inner),
        DataFusionError::Shared(inner) => is_out_of_memory(inner),
        _ => false,
    }
}

/// The shared side of the budget: memory every query draws from, and the slots.
pub struct Budget {
    limits: QueryLimits,
    memory: Arc<dyn MemoryPool>,
    total: Arc<Semaphore>,
    per_who: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budget")
            .field("limits", &self.limits)
            .finish()
    }
}

/// Who runs queries in a session and with what deadline; one per SQL connection (its
/// `SET statement_timeout` changes it) or per API request.
#[derive(Debug)]
pub struct Scope {
    /// The merchant id, or `admin:<name>`: the key of the per-merchant slot count.
    pub who: String,
    timeout_ms: AtomicU64,
    cancel: Mutex<Option<tokio::sync::watch::Receiver<u64>>>,
}

impl Scope {
    pub fn new(who: impl Into<String>, timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            who: who.into(),
            timeout_ms: AtomicU64::new(timeout.as_millis() as u64),
            cancel: Mutex::new(None),
        })
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    /// Sets this scope's statement timeout (the caller checks it against the limit).
    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
    }

    /// Connects a cancel signal: every increment of the watched counter cancels the query
    /// running at that moment.
    pub fn set_cancel(&self, rx: tokio::sync::watch::Receiver<u64>) {
        *self.cancel.lock().unwrap_or_else(|p| p.into_inner()) = Some(rx);
    }

    fn cancel_signal(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.cancel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|rx| {
                let mut rx = rx.clone();
                rx.mark_unchanged();
                rx
            })
    }
}

impl Budget {
    pub fn new(limits: QueryLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            memory: Arc::new(GreedyMemoryPool::new(limits.memory_total)),
            total: Arc::new(Semaphore::new(limits.concurrent_total.max(1))),
            per_who: Arc::default(),
        })
    }

    pub fn limits(&self) -> &QueryLimits {
        &self.limits
    }

    /// Memory held by all queries now.
    pub fn memory_reserved(&self) -> usize {
        self.memory.reserved()
    }

    /// A session like `base` (same catalog, views, functions and settings) whose queries
    /// run under this budget for `scope`. Cheap: the catalog is shared, not copied.
    pub fn session(
        self: &Arc<Self>,
        base: &SessionContext,
        scope: Arc<Scope>,
    ) -> Result<SessionContext> {
        let pool: Arc<dyn MemoryPool> = Arc::new(QueryPool {
            limit: self.limits.memory_per_query,
            used: AtomicUsize::new(0),
            shared: self.memory.clone(),
        });
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(pool)
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            )
            .build_arc()?;
        let state = SessionStateBuilder::new_from_existing(base.state())
            .with_runtime_env(runtime)
            .with_query_planner(Arc::new(GuardPlanner {
                budget: self.clone(),
                scope,
            }))
            .build();
        Ok(SessionContext::new_with_state(state))
    }

    /// A running slot for work `who` does outside DataFusion (grouping rows kept in memory),
    /// held until dropped; waits up to the admission wait, as a query does.
    pub async fn slot(self: &Arc<Self>, who: &str) -> Result<Slot> {
        Ok(Slot(self.clone().admit(who.to_string()).await?))
    }

    /// A running slot for `who`, waiting up to the admission wait.
    async fn admit(self: Arc<Self>, who: String) -> Result<Admission> {
        let wait = self.limits.admission_wait;
        let sem = {
            let mut map = self.per_who.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(who.clone())
                .or_insert_with(|| {
                    Arc::new(Semaphore::new(self.limits.concurrent_per_merchant.max(1)))
                })
                .clone()
        };
        // One deadline for both slots: the documented wait is the whole wait.
        let deadline = tokio::time::Instant::now() + wait;
        let mine = match tokio::time::timeout_at(deadline, sem.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => {
                forget_idle(&self.per_who, &who, &sem);
                return Err(external(Stopped::Busy {
                    who,
                    limit: self.limits.concurrent_per_merchant,
                }));
            }
        };
        let all = match tokio::time::timeout_at(deadline, self.total.clone().acquire_owned()).await
        {
            Ok(Ok(p)) => p,
            _ => {
                drop(mine);
                forget_idle(&self.per_who, &who, &sem);
                return Err(external(Stopped::ServerBusy(self.limits.concurrent_total)));
            }
        };
        Ok(Admission {
            mine: Some(mine),
            _all: all,
            sem,
            who,
            per_who: self.per_who.clone(),
        })
    }
}

/// Drops `who`'s slot counter when nobody holds or waits for it (the map stays as small as
/// the set of merchants querying right now).
fn forget_idle(map: &Mutex<HashMap<String, Arc<Semaphore>>>, who: &str, sem: &Arc<Semaphore>) {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    // The map's reference and the caller's: nobody else is waiting or running. (Taken by
    // reference: a clone here would count itself and the entry would never go.)
    if Arc::strong_count(sem) == 2 {
        map.remove(who);
    }
}

/// A running slot taken by [`Budget::slot`], released when dropped.
pub struct Slot(#[allow(dead_code)] Admission);

/// A query's slots, released when its stream ends or is dropped.
struct Admission {
    mine: Option<OwnedSemaphorePermit>,
    _all: OwnedSemaphorePermit,
    sem: Arc<Semaphore>,
    who: String,
    per_who: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        drop(self.mine.take());
        forget_idle(&self.per_who, &self.who, &self.sem);
    }
}

fn external(s: Stopped) -> DataFusionError {
    DataFusionError::External(Box::new(s))
}

/// One query's memory: at most `limit`, and only what the shared pool can give.
#[derive(Debug)]
struct QueryPool {
    limit: usize,
    used: AtomicUsize,
    shared: Arc<dyn MemoryPool>,
}

impl MemoryPool for QueryPool {
    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.used.fetch_add(additional, Ordering::Relaxed);
        self.shared.grow(reservation, additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.used.fetch_sub(shrink, Ordering::Relaxed);
        self.shared.shrink(reservation, shrink);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                let new = used.checked_add(additional)?;
                (new <= self.limit).then_some(new)
            })
            .map_err(|used| {
                DataFusionError::ResourcesExhausted(format!(
                    "the query needs more than its memory limit of {} MiB ({} MiB held, {} more \
                     asked by {}): narrow the date range, aggregate more, or add a LIMIT",
                    self.limit >> 20,
                    used >> 20,
                    additional.div_ceil(1 << 20),
                    reservation.consumer().name()
                ))
            })?;
        if let Err(e) = self.shared.try_grow(reservation, additional) {
            self.used.fetch_sub(additional, Ordering::Relaxed);
            return Err(DataFusionError::ResourcesExhausted(format!(
                "the server's query memory is in use by other queries: retry shortly ({e})"
            )));
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.limit)
    }
}

/// Plans as DataFusion does, then puts a [`GuardExec`] on top.
struct GuardPlanner {
    budget: Arc<Budget>,
    scope: Arc<Scope>,
}

impl fmt::Debug for GuardPlanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardPlanner")
            .field("who", &self.scope.who)
            .finish()
    }
}

#[async_trait]
impl QueryPlanner for GuardPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session_state: &SessionState,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let plan = DefaultPhysicalPlanner::default()
            .create_physical_plan(logical_plan, session_state)
            .await?;
        // One guard per query: its input must have one output partition (what
        // `execute_stream` would otherwise add above the guard, once per partition).
        let plan: Arc<dyn ExecutionPlan> =
            if plan.properties().output_partitioning().partition_count() > 1 {
                Arc::new(CoalescePartitionsExec::new(plan))
            } else {
                plan
            };
        Ok(Arc::new(GuardExec::new(
            plan,
            self.budget.clone(),
            self.scope.clone(),
        )))
    }
}

/// The top of every plan run under a budget: admission, statement timeout, cancellation.
#[derive(Debug)]
pub struct GuardExec {
    input: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
    budget: Arc<Budget>,
    scope: Arc<Scope>,
}

impl GuardExec {
    fn new(input: Arc<dyn ExecutionPlan>, budget: Arc<Budget>, scope: Arc<Scope>) -> Self {
        let properties = input.properties().clone();
        Self {
            input,
            properties,
            budget,
            scope,
        }
    }
}

impl DisplayAs for GuardExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GuardExec: timeout={}ms",
            self.scope.timeout().as_millis()
        )
    }
}

impl ExecutionPlan for GuardExec {
    fn name(&self) -> &str {
        "GuardExec"
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal(
                "GuardExec takes exactly one child".into(),
            ));
        }
        Ok(Arc::new(GuardExec::new(
            children.swap_remove(0),
            self.budget.clone(),
            self.scope.clone(),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let timeout = self.scope.timeout();
        let admit = self.budget.clone().admit(self.scope.who.clone()).boxed();
        Ok(Box::pin(GuardStream {
            schema: self.input.schema(),
            state: State::Admitting {
                admit,
                input: self.input.clone(),
                partition,
                context,
            },
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout_ms: timeout.as_millis() as u64,
            cancel: self.scope.cancel_signal().map(|rx| {
                Box::pin(async move {
                    let mut rx = rx;
                    let _ = rx.changed().await;
                })
                .boxed()
            }),
            admission: None,
        }))
    }
}

enum State {
    Admitting {
        admit: BoxFuture<'static, Result<Admission>>,
        input: Arc<dyn ExecutionPlan>,
        partition: usize,
        context: Arc<TaskContext>,
    },
    Running(SendableRecordBatchStream),
    Done,
}

struct GuardStream {
    schema: SchemaRef,
    state: State,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout_ms: u64,
    cancel: Option<BoxFuture<'static, ()>>,
    admission: Option<Admission>,
}

impl GuardStream {
    fn stop(&mut self, why: Stopped) -> Poll<Option<Result<RecordBatch>>> {
        // Dropping the input stream stops its work and frees its memory now.
        self.state = State::Done;
        self.admission = None;
        Poll::Ready(Some(Err(external(why))))
    }
}

impl Stream for GuardStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if matches!(self.state, State::Done) {
            return Poll::Ready(None);
        }
        if let Some(cancel) = self.cancel.as_mut() {
            if cancel.as_mut().poll(cx).is_ready() {
                return self.stop(Stopped::Cancelled);
            }
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let ms = self.timeout_ms;
            return self.stop(Stopped::Timeout(ms));
        }
        loop {
            match &mut self.state {
                State::Admitting {
                    admit,
                    input,
                    partition,
                    context,
                } => match admit.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => {
                        self.state = State::Done;
                        return Poll::Ready(Some(Err(e)));
                    }
                    Poll::Ready(Ok(admission)) => {
                        let stream = input.execute(*partition, context.clone());
                        self.admission = Some(admission);
                        match stream {
                            Ok(s) => self.state = State::Running(s),
                            Err(e) => {
                                self.state = State::Done;
                                self.admission = None;
                                return Poll::Ready(Some(Err(e)));
                            }
                        }
                    }
                },
                State::Running(stream) => {
                    let next = stream.as_mut().poll_next(cx);
                    if matches!(next, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
                        self.state = State::Done;
                        self.admission = None;
                    }
                    return next;
                }
                State::Done => return Poll::Ready(None),
            }
        }
    }
}

impl RecordBatchStream for GuardStream {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> QueryLimits {
        QueryLimits {
            statement_timeout: Duration::from_secs(30),
            memory_per_query: 64 << 20,
            memory_total: 256 << 20,
            concurrent_per_merchant: 1,
            concurrent_total: 4,
            admission_wait: Duration::from_millis(200),
            sql: SqlLimits::default(),
        }
    }

    async fn run(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>> {
        ctx.sql(sql).await?.collect().await
    }

    #[tokio::test]
    async fn a_query_past_its_timeout_is_stopped_with_the_reason() {
        let budget = Budget::new(limits());
        let scope = Scope::new("m_a", Duration::from_millis(300));
        let ctx = budget.session(&SessionContext::new(), scope).unwrap();
        let started = std::time::Instant::now();
        let err = run(
            &ctx,
            "SELECT sum(value * 2) FROM generate_series(1, 100000000000)",
        )
        .await
        .unwrap_err();
        assert_eq!(Stopped::of(&err), Some(&Stopped::Timeout(300)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_query_over_its_memory_share_fails_cleanly() {
        let budget = Budget::new(limits());
        let ctx = budget
            .session(
                &SessionContext::new(),
                Scope::new("m_a", Duration::from_secs(60)),
            )
            .unwrap();
        let err = run(
            &ctx,
            "SELECT count(DISTINCT value) FROM generate_series(1, 4000000000)",
        )
        .await
        .unwrap_err();
        assert!(is_out_of_memory(&err), "{err}");
        assert!(err.to_string().contains("memory limit of 64 MiB"), "{err}");
        // Everything it held is back once its aborted tasks have unwound.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while budget.memory_reserved() != 0 && std::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        assert_eq!(budget.memory_reserved(), 0);
    }

    #[tokio::test]
    async fn one_merchant_cannot_take_more_than_its_slots() {
        let budget = Budget::new(limits());
        let slow = budget
            .session(
                &SessionContext::new(),
                Scope::new("m_a", Duration::from_millis(1500)),
            )
            .unwrap();
        let again = budget
            .session(
                &SessionContext::new(),
                Scope::new("m_a", Duration::from_secs(5)),
            )
            .unwrap();
        let other = budget
            .session(
                &SessionContext::new(),
                Scope::new("m_b", Duration::from_secs(5)),
            )
            .unwrap();
        // m_a's only slot is held by a stream that is open but not finished.
        let mut held = slow
            .sql("SELECT value FROM generate_series(1, 100000000)")
            .await
            .unwrap()
            .execute_stream()
            .await
            .unwrap();
        use futures::StreamExt;
        assert!(held.next().await.unwrap().is_ok());
        let err = run(&again, "SELECT 1").await.unwrap_err();
        assert!(
            matches!(Stopped::of(&err), Some(Stopped::Busy { limit: 1, .. })),
            "{err}"
        );
        // Another merchant is not affected.
        assert_eq!(run(&other, "SELECT 1").await.unwrap()[0].num_rows(), 1);
        drop(held);
        assert_eq!(run(&again, "SELECT 1").await.unwrap()[0].num_rows(), 1);
        // Nobody holds or waits for a slot any more: the per-merchant counters are gone.
        assert!(budget.per_who.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_cancel_signal_stops_the_running_query() {
        let budget = Budget::new(limits());
        let scope = Scope::new("m_a", Duration::from_secs(60));
        let (tx, rx) = tokio::sync::watch::channel(0u64);
        scope.set_cancel(rx);
        let ctx = budget.session(&SessionContext::new(), scope).unwrap();
        let query = tokio::spawn(async move {
            run(
                &ctx,
                "SELECT sum(value * 2) FROM generate_series(1, 100000000000)",
            )
            .await
        });
        // Cancel once the query holds its slot (it is running).
        while budget.per_who.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        tx.send_modify(|n| *n += 1);
        let err = query.await.unwrap().unwrap_err();
        assert_eq!(Stopped::of(&err), Some(&Stopped::Cancelled), "{err}");
    }
}
