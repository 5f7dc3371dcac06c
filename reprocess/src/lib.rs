//! Rewriting history: re-processing `raw_events` with a stored pipeline version, and
//! forgetting a person.
//!
//! **Re-processing** ([`reprocess`]). A job covers some merchants' batches received in
//! `[from, to)`. It pins the `raw_events` snapshot and the watermark `W` = the lowest ingest
//! sequence committed in all three event tables, so every batch with `stream_seq <= W` is
//! wholly in `raw_events`, `events` and `failed_events`, and every batch after it lands in
//! files the job never touches (the rule for traffic that arrives while a job runs: it is
//! processed once, by the edge, with whatever version is active then). It reads the scope's
//! raw rows in lineage order (`stream_seq`, `batch_index`: one JetStream message is one edge
//! batch), re-runs each batch through the chosen version exactly as the edge does
//! ([`beacon_plugins::stage`]: same chain, sandbox limits, output validation, failure policy)
//! on all cores, converts the output with core-ingest's own conversion, and replaces those
//! batches' rows of `events` and their plugin failures in `failed_events`, one atomic replace
//! commit per table. Then the rollup hours it touched are rebuilt
//! ([`beacon_warehouse::rollup::rebuild`]). Readers see all old or all new rows per table.
//!
//! Every commit carries the job id (`<job>/<table>`), so a re-run after a crash skips what
//! landed and redoes the rest from the same pinned snapshot and watermark (kept in the job's
//! audit record, [`audit`]): nothing is written twice.
//!
//! **Forgetting** ([`forget`]). A person's rows (by user id or visitor id) are dropped from
//! the three event tables by rewriting the files that hold them, and their rollup hours are
//! rebuilt. Old snapshots still reference the old files until maintenance expires them.

pub mod audit;
pub mod forget;
mod hours;
pub mod rows;
mod stats;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use beacon_control::Control;
use beacon_ingest::convert::{self, Received};
use beacon_plugins::{stage, Chain};
use beacon_proto::bus::OnFailure;
use beacon_proto::{Limits, Outcome, Share};
use beacon_warehouse::replace::{self, Outcome as CommitOutcome};
use beacon_warehouse::rewrite::{self, Prune, RowRewrite};
use beacon_warehouse::rollup;
use beacon_warehouse::tables::{self, SEQ_PROPERTY};
use beacon_warehouse::{TableKind, Warehouse, WarehouseError};
use futures::StreamExt;
use iceberg_datafusion::IcebergStaticTableProvider;
use serde::Serialize;

pub use audit::{JobRecord, JobState, Jobs};
pub use stats::DayDelta;

#[derive(Debug, thiserror::Error)]
pub enum ReprocessError {
    #[error("{0}")]
    Invalid(String),
    #[error("NATS: {0}")]
    Nats(String),
    #[error(transparent)]
    Control(#[from] beacon_control::ControlError),
    #[error(transparent)]
    Warehouse(#[from] WarehouseError),
    #[error("query: {0}")]
    Query(#[from] datafusion::error::DataFusionError),
    #[error("Arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("Iceberg: {0}")]
    Iceberg(#[from] iceberg::Error),
    #[error("worker: {0}")]
    Worker(String),
    /// The job cannot finish as planned (ends `failed`; the same command starts a new one).
    #[error("{0}")]
    Superseded(String),
}

/// Which batches a job covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Scope {
    /// Empty: every merchant with raw events in the range.
    pub merchants: Vec<String>,
    /// Edge receive time, epoch milliseconds, `[from, to)`.
    pub from_ms: i64,
    pub to_ms: i64,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub scope: Scope,
    /// The pipeline version to re-run for every merchant in scope; `None`: each merchant's
    /// active version (none: stored unprocessed).
    pub version: Option<u64>,
    pub dry_run: bool,
    pub who: String,
    pub reason: String,
    /// Event validation limits (the edge's).
    pub limits: Limits,
    /// Batches re-run at once (default: the cores).
    pub workers: usize,
    /// The id for a new job (default: a fresh `rp-<uuid>`); a resumed job keeps its own.
    pub job_id: Option<String>,
}

/// What an operator asks for, named as the admin API's JSON body names it (the CLI's flags
/// are the same names): both entry points turn it into a [`Request`] the same way.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ask {
    #[serde(default)]
    pub merchants: Vec<String>,
    #[serde(default)]
    pub all_merchants: bool,
    /// RFC 3339, or a UTC date `YYYY-MM-DD`.
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub pipeline_version: Option<u64>,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub reason: String,
}

/// RFC 3339, or `YYYY-MM-DD` (midnight UTC), as epoch milliseconds.
pub fn parse_time(s: &str) -> Result<i64, ReprocessError> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_millis())
        .ok_or_else(|| {
            ReprocessError::Invalid(format!(
                "{s:?}: not an RFC 3339 time (2026-12-03T10:00:00Z) or a date (2026-12-03)"
            ))
        })
}

impl Request {
    /// The validated request for `ask`, made by `who`.
    pub fn from_ask(ask: Ask, who: String, workers: usize) -> Result<Self, ReprocessError> {
        if ask.merchants.is_empty() != ask.all_merchants {
            return Err(ReprocessError::Invalid(
                "name the merchants (`merchants`, --merchant) or ask for all of them \
                 (`all_merchants`, --all-merchants): one of the two"
                    .into(),
            ));
        }
        let request = Request {
            scope: Scope {
                merchants: ask.merchants,
                from_ms: parse_time(&ask.from)?,
                to_ms: parse_time(&ask.to)?,
            },
            version: ask.pipeline_version,
            dry_run: ask.dry_run,
            who,
            reason: ask.reason,
            limits: Limits::default(),
            workers: workers.max(1),
            job_id: None,
        };
        request.validate()?;
        Ok(request)
    }

    /// What every entry point (CLI, admin API) checks before anything runs.
    pub fn validate(&self) -> Result<(), ReprocessError> {
        for m in &self.scope.merchants {
            check_merchant(m)?;
        }
        if self.scope.from_ms >= self.scope.to_ms {
            return Err(ReprocessError::Invalid("`from` must be before `to`".into()));
        }
        if !self.dry_run && self.reason.trim().is_empty() {
            return Err(ReprocessError::Invalid(
                "a re-processing run needs a reason: it goes into the audit record".into(),
            ));
        }
        Ok(())
    }

    /// What identifies the job for resuming: the scope and the version asked for.
    pub fn scope_json(&self) -> serde_json::Value {
        serde_json::json!({ "scope": self.scope, "version": self.version })
    }
}

/// What a job did (or, dry, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub job_id: String,
    pub resumed: bool,
    pub dry_run: bool,
    pub versions: BTreeMap<String, Option<u64>>,
    pub raw_snapshot: Option<i64>,
    pub watermark: u64,
    /// Messages on the bus that ingest had not acknowledged when the job started: batches
    /// among them are not in scope, whatever version processed them.
    pub unacknowledged_at_start: u64,
    pub batches: u64,
    pub raw_rows: u64,
    pub events_before: u64,
    pub events_after: u64,
    pub failed_before: u64,
    pub failed_after: u64,
    /// Table -> snapshot id of the job's commit.
    pub commits: BTreeMap<String, i64>,
    pub rollup_rows_rebuilt: u64,
    pub days: Vec<DayDelta>,
    pub seconds: f64,
    /// Seconds per phase: read (raw rows in lineage order), rerun (plugins), write (new
    /// files), events / failed_events (the replace commits), rollups (the rebuild).
    pub phases: BTreeMap<String, f64>,
}

/// Progress of a running job: raw rows re-run so far, out of the scope's total.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Send + Sync);

const DAY_MS: i64 = 86_400_000;

/// Merchant ids as the control plane accepts them (they end up in SQL literals too).
fn check_merchant(m: &str) -> Result<(), ReprocessError> {
    Ok(beacon_control::pipelines::check_merchant(m)?)
}

fn ts_literal(ms: i64) -> String {
    rollup::rfc3339(ms.saturating_mul(1000))
}

/// Re-processes `req.scope` (see the crate docs), up to ingest's acknowledged sequence.
pub async fn reprocess(
    wh: &Warehouse,
    control: &Control,
    js: &async_nats::jetstream::Context,
    jobs: &Jobs,
    req: &Request,
    progress: Progress<'_>,
) -> Result<Report, ReprocessError> {
    let partitions = tables::stream_partitions(&wh.table(TableKind::RawEvents).await?);
    let floor = ingest_ack_floor(js, partitions).await?;
    let last = match js.get_stream(beacon_proto::bus::EVENTS_STREAM).await {
        Ok(mut stream) => stream.info().await.map_or(floor, |i| i.state.last_sequence),
        Err(_) => floor,
    };
    let mut report = reprocess_at(wh, control, jobs, req, floor, progress).await?;
    report.unacknowledged_at_start = last.saturating_sub(floor);
    Ok(report)
}

/// [`reprocess`] with the watermark given: every message up to `floor` must be complete in
/// all three event tables (ingest's ack floor, or, with no ingest running, the tables'
/// common sequence). A resumed job keeps its own.
pub async fn reprocess_at(
    wh: &Warehouse,
    control: &Control,
    jobs: &Jobs,
    req: &Request,
    floor: u64,
    progress: Progress<'_>,
) -> Result<Report, ReprocessError> {
    let started = std::time::Instant::now();
    let scope = &req.scope;
    req.validate()?;
    let scope_json = req.scope_json();
    let mut resumed = if req.dry_run {
        None
    } else {
        jobs.unfinished("reprocess", &scope_json).await?
    };
    let raw = wh.table(TableKind::RawEvents).await?;
    if let Some(r) = &resumed {
        let pinned_gone = r
            .raw_snapshot
            .is_some_and(|id| raw.metadata().snapshot_by_id(id).is_none());
        if pinned_gone {
            // Expired before the job could resume: that job ends failed, and a fresh one
            // (new pin, new watermark) does the whole scope again (its steps are idempotent
            // in effect: the same rows replace the same rows).
            let mut old = r.clone();
            old.finish(
                &Err::<(), _>("its pinned raw_events snapshot expired before it could resume; superseded by a new job"),
                old.counts.clone(),
                old.commits.clone(),
            );
            old.state = JobState::Failed;
            jobs.put(&old).await?;
            resumed = None;
        }
    } else if let Some(id) = &req.job_id {
        if jobs.get(id).await?.is_some() {
            return Err(ReprocessError::Invalid(format!(
                "job id {id} is already in the audit trail"
            )));
        }
    }
    let (job_id, raw_snapshot, watermark) = match &resumed {
        Some(r) => (r.id.clone(), r.raw_snapshot, r.watermark),
        None => {
            // Ingest acknowledges a message only once all three tables hold its rows (a table
            // with no rows for it commits nothing, so the tables' own watermarks can lag):
            // everything up to the ack floor is complete, and the raw snapshot loaded after
            // reading the floor holds all of it.
            let w = floor;
            let raw_seq = tables::snapshot_property_u64(&raw, SEQ_PROPERTY);
            if w == 0 && raw_seq > 0 {
                // Ingest recreates its consumer when it starts: no floor to trust right now.
                return Err(ReprocessError::Invalid(
                    "ingest has acknowledged nothing (is it starting?): try again once it runs"
                        .into(),
                ));
            }
            // (With several partitions an idle one's raw watermark may lag the floor.)
            if raw_seq < w && tables::stream_partitions(&raw) == 1 {
                return Err(ReprocessError::Invalid(format!(
                    "raw_events is at stream sequence {raw_seq}, behind ingest's acknowledged {w}"
                )));
            }
            (
                req.job_id
                    .clone()
                    .unwrap_or_else(|| format!("rp-{}", uuid::Uuid::now_v7())),
                raw.metadata().current_snapshot_id(),
                w,
            )
        }
    };
    let mut report = Report {
        job_id: job_id.clone(),
        resumed: resumed.is_some(),
        dry_run: req.dry_run,
        raw_snapshot,
        watermark,
        ..Default::default()
    };
    let Some(raw_snapshot) = raw_snapshot else {
        return Ok(report);
    };

    let ctx = wh.session().await?;
    let pinned = IcebergStaticTableProvider::try_new_from_table_snapshot(raw, raw_snapshot).await?;
    ctx.register_table("raw_pinned", Arc::new(pinned))?;
    let merchant_sql = if scope.merchants.is_empty() {
        "TRUE".to_string()
    } else {
        format!(
            "merchant_id IN ({})",
            scope
                .merchants
                .iter()
                .map(|m| format!("'{m}'"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let where_in = |from: i64, to: i64| {
        format!(
            "{merchant_sql} AND received_at >= '{}' AND received_at < '{}' AND stream_seq <= {watermark}",
            ts_literal(from),
            ts_literal(to)
        )
    };
    let whole = where_in(scope.from_ms, scope.to_ms);

    // The chain per merchant: the requested version, else the active one.
    let merchants: Vec<String> = if scope.merchants.is_empty() {
        let batches = ctx
            .sql(&format!(
                "SELECT DISTINCT merchant_id FROM raw_pinned WHERE {whole} ORDER BY 1"
            ))
            .await?
            .collect()
            .await?;
        let mut out = Vec::new();
        for b in &batches {
            let col = rewrite::str_column(b, "merchant_id")?;
            out.extend(col.iter().flatten().map(str::to_string));
        }
        out
    } else {
        scope.merchants.clone()
    };
    let mut chains: HashMap<String, Option<(Arc<Chain>, OnFailure)>> = HashMap::new();
    for m in &merchants {
        // A resumed job re-runs what it started with, whatever is active now.
        let recorded = resumed.as_ref().and_then(|r| r.versions.get(m).copied());
        let version = match (recorded, req.version) {
            (Some(v), _) => v,
            (None, Some(v)) => Some(v),
            (None, None) => control.current(m).await?.map(|c| c.pipeline.active.version),
        };
        let chain = match version {
            Some(v) => {
                let def = control.version(m, v).await?;
                Some((Arc::new(control.chain(&def).await?), def.on_failure))
            }
            None => None,
        };
        report.versions.insert(m.clone(), version);
        chains.insert(m.clone(), chain);
    }

    let mut record = JobRecord::start(
        &job_id,
        "reprocess",
        &req.who,
        &req.reason,
        scope_json,
        resumed.as_ref(),
    );
    record.versions = report.versions.clone();
    record.raw_snapshot = Some(raw_snapshot);
    record.watermark = watermark;
    if !req.dry_run {
        jobs.put(&record).await?;
    }
    let result = run_job(
        wh,
        req,
        Job {
            ctx: &ctx,
            chains: &chains,
            where_in: &where_in,
            whole: &whole,
            raw_snapshot,
            jobs,
            record: &mut record,
        },
        &mut report,
        progress,
    )
    .await;
    report.seconds = started.elapsed().as_secs_f64();
    if req.dry_run {
        return result.map(|()| report);
    }
    let counts = BTreeMap::from([
        ("batches".into(), report.batches),
        ("raw_rows".into(), report.raw_rows),
        ("events_before".into(), report.events_before),
        ("events_after".into(), report.events_after),
        ("failed_before".into(), report.failed_before),
        ("failed_after".into(), report.failed_after),
        ("rollup_rows_rebuilt".into(), report.rollup_rows_rebuilt),
    ]);
    record.finish(&result, counts, report.commits.clone());
    if matches!(result, Err(ReprocessError::Superseded(_))) {
        record.state = JobState::Failed;
    }
    jobs.put(&record).await?;
    result.map(|()| report)
}

/// What a planned job works with.
struct Job<'a> {
    ctx: &'a datafusion::prelude::SessionContext,
    chains: &'a HashMap<String, Option<(Arc<Chain>, OnFailure)>>,
    where_in: &'a (dyn Fn(i64, i64) -> String + Sync),
    whole: &'a str,
    raw_snapshot: i64,
    jobs: &'a Jobs,
    record: &'a mut JobRecord,
}

async fn run_job(
    wh: &Warehouse,
    req: &Request,
    job_ctx: Job<'_>,
    report: &mut Report,
    progress: Progress<'_>,
) -> Result<(), ReprocessError> {
    let Job {
        ctx,
        chains,
        where_in,
        whole,
        raw_snapshot,
        jobs,
        record,
    } = job_ctx;
    let job = report.job_id.clone();
    let events_job = format!("{job}/events");
    let failed_job = format!("{job}/failed_events");
    // Steps a crashed run of this job committed already.
    let events_done = replace::applied(&wh.table(TableKind::Events).await?, &events_job);
    let failed_done = replace::applied(&wh.table(TableKind::FailedEvents).await?, &failed_job);
    for (kind, done) in [
        (TableKind::Events, events_done),
        (TableKind::FailedEvents, failed_done),
    ] {
        if let Some(snapshot) = done {
            report.commits.insert(kind.name().into(), snapshot);
        }
    }
    let (events_done, failed_done) = (events_done.is_some(), failed_done.is_some());
    // The scope's size and its actual time span (a wide range with little in it must not
    // cost a query per empty day).
    let (total, first_ms, last_ms) = scope_extent(ctx, whole).await?;
    let events_schema = tables::arrow_schema(&wh.table(TableKind::Events).await?)?;
    let failed_schema = tables::arrow_schema(&wh.table(TableKind::FailedEvents).await?)?;
    let after = Mutex::new(stats::Stats::default());
    let mut seqs: HashSet<i64> = HashSet::new();
    let mut spans = hours::Spans::new();
    let mut events_files = Vec::new();
    let mut failed_files = Vec::new();
    let (write_events, write_failed) = (!req.dry_run && !events_done, !req.dry_run && !failed_done);
    let workers = req.workers.max(1);

    // A day of the scope at a time bounds the memory a job holds.
    let mut from = req.scope.from_ms.max(first_ms);
    let end = req.scope.to_ms.min(last_ms.saturating_add(1));
    while from < end {
        let to = ((from.div_euclid(DAY_MS) + 1) * DAY_MS).min(end);
        let mut clock = std::time::Instant::now();
        let mut lap = |report: &mut Report, phase: &str| {
            *report.phases.entry(phase.into()).or_default() += clock.elapsed().as_secs_f64();
            clock = std::time::Instant::now();
        };
        let batches = ctx
            .sql(&format!(
                "SELECT {} FROM raw_pinned WHERE {} ORDER BY {}",
                rows::COLUMNS,
                where_in(from, to),
                rows::ORDER
            ))
            .await?
            .collect()
            .await?;
        from = to;
        let envelopes = rows::envelopes(&batches)?;
        drop(batches);
        lap(report, "read");
        if envelopes.is_empty() {
            continue;
        }
        let limits = req.limits;
        let done: Vec<Received> = futures::stream::iter(envelopes.into_iter().map(|mut r| {
            let chain = chains.get(&r.envelope.merchant_id).cloned().flatten();
            tokio::task::spawn_blocking(move || {
                rerun(
                    &mut r,
                    chain.as_ref().map(|(c, f)| (c.as_ref(), *f)),
                    &limits,
                );
                r
            })
        }))
        .buffered(workers)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(|e| ReprocessError::Worker(e.to_string()))?;
        let mut n = 0u64;
        {
            let mut after = after.lock().unwrap_or_else(|p| p.into_inner());
            for r in &done {
                seqs.insert(r.seq as i64);
                n += r.envelope.raw.len() as u64;
                report.failed_after += r.envelope.failures.len() as u64;
                let (lo, hi) = r
                    .envelope
                    .raw
                    .iter()
                    .chain(r.envelope.processed_events())
                    .fold((i64::MAX, i64::MIN), |(lo, hi), e| {
                        (lo.min(e.ts), hi.max(e.ts))
                    });
                if lo <= hi {
                    hours::widen(&mut spans, &r.envelope.merchant_id, lo, hi);
                }
                for e in r
                    .envelope
                    .processed_events()
                    .filter(|e| !convert::is_bot(e))
                {
                    after.add_event(e);
                    report.events_after += 1;
                }
            }
        }
        report.batches += done.len() as u64;
        report.raw_rows += n;
        progress(report.raw_rows, total);
        lap(report, "rerun");
        let refs: Vec<&Received> = done.iter().collect();
        if write_events {
            let batch = convert::events_batch(&events_schema, &refs, true)?;
            events_files.extend(wh.write_files(TableKind::Events, batch).await?);
        }
        if write_failed {
            let batch = convert::failures_batch(&failed_schema, &refs)?;
            failed_files.extend(wh.write_files(TableKind::FailedEvents, batch).await?);
        }
        lap(report, "write");
    }

    // The hours to rebuild, kept before anything is committed (a resumed job has no old rows
    // to look at for the steps already done).
    if !req.dry_run {
        for (m, (lo, hi)) in &spans {
            hours::widen(&mut record.spans, m, *lo, *hi);
        }
        jobs.put(record).await?;
        // A forget that ran since the pin must not be undone by rows re-run from the pinned
        // snapshot.
        let pinned_at = wh
            .table(TableKind::RawEvents)
            .await?
            .metadata()
            .snapshot_by_id(raw_snapshot)
            .map_or(record.started_at, |s| s.timestamp_ms());
        if let Some(forget) = forget_since(jobs, &req.scope.merchants, pinned_at).await? {
            return Err(ReprocessError::Superseded(format!(
                "{forget} ran while this job was planned on older raw events; run the same command again once it is done"
            )));
        }
    }

    // Replace the scope's rows: `events` first, then its plugin failures.
    let before = Mutex::new(stats::Stats::default());
    let before_spans = Mutex::new(hours::Spans::new());
    let seq_range = (
        seqs.iter().copied().min().unwrap_or(0),
        seqs.iter().copied().max().unwrap_or(0),
    );
    let mut prune = vec![Prune::long("stream_seq", seq_range.0, seq_range.1)];
    if req.scope.merchants.len() == 1 {
        prune.push(Prune::string("merchant_id", &req.scope.merchants[0]));
    }
    let drop_events = |b: &arrow::record_batch::RecordBatch| rows::in_set(b, "stream_seq", &seqs);
    let on_events = |b: &arrow::record_batch::RecordBatch| {
        before
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add_rows(b)?;
        hours::widen_rows(
            &mut before_spans.lock().unwrap_or_else(|p| p.into_inner()),
            b,
        )
    };
    let drop_failed = |b: &arrow::record_batch::RecordBatch| {
        let in_scope = rows::in_set(b, "stream_seq", &seqs)?;
        let stage = rewrite::str_column(b, "stage")?;
        Ok(in_scope
            .iter()
            .zip(stage.iter())
            .map(|(s, st)| Some(s == Some(true) && st == Some("plugin")))
            .collect())
    };
    let failed_count = Mutex::new(0u64);
    let on_failed = |b: &arrow::record_batch::RecordBatch| {
        *failed_count.lock().unwrap_or_else(|p| p.into_inner()) += b.num_rows() as u64;
        Ok(())
    };
    let steps: [(
        TableKind,
        &str,
        rewrite::Mask,
        &rewrite::OnDropped<'_>,
        Vec<_>,
        bool,
    ); 2] = [
        (
            TableKind::Events,
            &events_job,
            &drop_events,
            &on_events,
            events_files,
            events_done,
        ),
        (
            TableKind::FailedEvents,
            &failed_job,
            &drop_failed,
            &on_failed,
            failed_files,
            failed_done,
        ),
    ];
    // Every message up to the job's watermark is complete in these tables (ingest
    // acknowledged it): tables that had no rows for the last ones learn so, for every
    // partition.
    let partitions = tables::stream_partitions(&wh.table(TableKind::RawEvents).await?);
    let watermarks: HashMap<String, String> = (0..partitions)
        .map(|k| {
            (
                tables::partition_seq_property(k),
                report.watermark.to_string(),
            )
        })
        .collect();
    for (kind, job_id, drop, on_dropped, files, done) in steps {
        if done {
            continue;
        }
        let clock = std::time::Instant::now();
        let r = commit_rows(
            wh,
            kind,
            job_id,
            &prune,
            drop,
            on_dropped,
            &files,
            &watermarks,
            req.dry_run,
        )
        .await;
        let spare = match &r {
            Err(ReprocessError::Warehouse(e)) => !e.commit_may_have_landed(),
            Err(_) => true,
            Ok(done) => done.is_none(),
        };
        if spare {
            let _ = wh.delete_files(kind, &files).await;
        }
        if let Some(snapshot) = r? {
            report.commits.insert(kind.name().into(), snapshot);
        }
        report
            .phases
            .insert(kind.name().into(), clock.elapsed().as_secs_f64());
    }
    report.failed_before = *failed_count.lock().unwrap_or_else(|p| p.into_inner());
    let before = before.into_inner().unwrap_or_else(|p| p.into_inner());
    report.events_before = before.rows();
    report.days = stats::deltas(
        &before,
        &after.into_inner().unwrap_or_else(|p| p.into_inner()),
    );
    if req.dry_run {
        return Ok(());
    }

    // Rollups of every hour the old or the new rows fall in (the recorded spans too).
    let old = before_spans.into_inner().unwrap_or_else(|p| p.into_inner());
    for (m, (lo, hi)) in old.iter().chain(&spans) {
        hours::widen(&mut record.spans, m, *lo, *hi);
    }
    jobs.put(record).await?;
    let clock = std::time::Instant::now();
    report.rollup_rows_rebuilt =
        hours::rebuild(wh, &record.spans, &job, &mut report.commits).await?;
    report
        .phases
        .insert("rollups".into(), clock.elapsed().as_secs_f64());
    Ok(())
}

/// One table's row rewrite (re-planned when maintenance rewrote a file first). Returns the
/// committed snapshot (`None`: dry run, nothing to change, or already applied).
#[allow(clippy::too_many_arguments)]
async fn commit_rows(
    wh: &Warehouse,
    kind: TableKind,
    job_id: &str,
    prune: &[Prune],
    drop: rewrite::Mask<'_>,
    on_dropped: &rewrite::OnDropped<'_>,
    files: &[iceberg::spec::DataFile],
    watermarks: &HashMap<String, String>,
    dry_run: bool,
) -> Result<Option<i64>, ReprocessError> {
    let r = rewrite::rewrite_current(
        wh,
        RowRewrite {
            prune: prune.to_vec(),
            added_files: files.to_vec(),
            on_dropped: Some(on_dropped),
            properties: watermarks.clone(),
            dry_run,
            ..RowRewrite::new(kind, job_id, drop)
        },
    )
    .await?;
    Ok(match r.outcome {
        Some(CommitOutcome::Committed { snapshot_id, .. }) => Some(snapshot_id),
        _ => None,
    })
}

/// Re-runs one batch as the edge would: the chain over all its raw events (re-processing
/// applies one version; no canary split), output validated against the batch's receive
/// time, failures by the version's policy.
fn rerun(r: &mut Received, chain: Option<(&Chain, OnFailure)>, limits: &Limits) {
    let env = &mut r.envelope;
    let Some((chain, on_failure)) = chain else {
        // No pipeline: the raw events are the processed ones.
        env.shares = vec![Share {
            version: None,
            canary: false,
            outcome: Outcome::Unprocessed,
            raw: Vec::new(),
        }];
        return;
    };
    let version = chain.pipeline().version;
    let (pipeline, processed, failures, outcome) =
        match stage::run_checked(chain, &env.raw, limits, env.received_at) {
            Ok(out) => (
                Some(chain.pipeline().clone()),
                Some(out),
                Vec::new(),
                Outcome::Processed,
            ),
            Err(f) => {
                let failed = stage::failed(
                    chain.pipeline(),
                    on_failure,
                    &env.raw,
                    Some(f.plugin),
                    &f.error.to_string(),
                );
                let processed = (failed.outcome == Outcome::Held).then(Vec::new);
                (failed.pipeline, processed, failed.failures, failed.outcome)
            }
        };
    env.pipeline = pipeline;
    env.processed = processed;
    env.failures = failures;
    env.shares = vec![Share {
        version: Some(version),
        canary: false,
        outcome,
        raw: Vec::new(),
    }];
}

/// The scope's raw rows: how many, and the first and last receive time (epoch ms).
async fn scope_extent(
    ctx: &datafusion::prelude::SessionContext,
    whole: &str,
) -> Result<(u64, i64, i64), ReprocessError> {
    let batches = ctx
        .sql(&format!(
            "SELECT count(*) AS n, CAST(min(received_at) AS BIGINT) AS lo, \
                    CAST(max(received_at) AS BIGINT) AS hi FROM raw_pinned WHERE {whole}"
        ))
        .await?
        .collect()
        .await?;
    let Some(b) = batches.first().filter(|b| b.num_rows() > 0) else {
        return Ok((0, 0, 0));
    };
    use arrow::array::Array;
    let n = rewrite::i64_column(b, "n")?;
    let (lo, hi) = (rewrite::i64_column(b, "lo")?, rewrite::i64_column(b, "hi")?);
    if n.value(0) == 0 || lo.is_null(0) || hi.is_null(0) {
        return Ok((0, 0, 0));
    }
    // (Timestamps cast to BIGINT are microseconds.)
    Ok((n.value(0) as u64, lo.value(0) / 1000, hi.value(0) / 1000))
}

/// A forget job for a merchant in `merchants` (empty: any) that has not finished, or
/// finished after `since_ms`: its removals are not in the pinned raw snapshot, and rows re-run
/// from it would bring the person back. (Asked of the audit trail, not of the table's
/// snapshots, which maintenance expires.)
async fn forget_since(
    jobs: &Jobs,
    merchants: &[String],
    since_ms: i64,
) -> Result<Option<String>, ReprocessError> {
    Ok(jobs.list().await?.into_iter().find_map(|j| {
        let merchant = j.scope.get("merchant").and_then(|m| m.as_str())?;
        let relevant = j.kind == "forget"
            && (merchants.is_empty() || merchants.iter().any(|m| m == merchant))
            && (j.state == JobState::Running || j.finished_at.is_some_and(|t| t >= since_ms));
        relevant.then(|| format!("forget job {} for {merchant}", j.id))
    }))
}

/// The last stream sequence core-ingest has acknowledged (0 before it ever ran).
pub async fn ingest_ack_floor(
    js: &async_nats::jetstream::Context,
    partitions: u32,
) -> Result<u64, ReprocessError> {
    use beacon_proto::bus::EVENTS_STREAM;
    let Ok(mut stream) = js.get_stream(EVENTS_STREAM).await else {
        return Ok(0);
    };
    // Read before the consumers: a message stored later is above it or counted pending.
    let last = match stream.info().await {
        Ok(info) => info.state.last_sequence,
        Err(e) => return Err(ReprocessError::Nats(e.to_string())),
    };
    let mut current = beacon_proto::stores::current_ingest_consumers(&stream)
        .await
        .map_err(ReprocessError::Nats)?;
    let mut floor = u64::MAX;
    for index in 0..partitions.max(1) {
        let partition_floor = match current.remove(&index) {
            // Several partitions: one with nothing pending is complete up to the stream's
            // end, else it would hold the floor at its last message for as long as it idles.
            Some(info) if partitions > 1 && info.num_pending == 0 && info.num_ack_pending == 0 => {
                last
            }
            Some(info) => info.ack_floor.stream_sequence,
            None => 0,
        };
        floor = floor.min(partition_floor);
    }
    Ok(floor)
}
