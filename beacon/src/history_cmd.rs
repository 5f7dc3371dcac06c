//! `beacon reprocess` and `beacon forget`: rewriting history (see `beacon-reprocess`).

use std::sync::Arc;

use anyhow::{Context, Result};
use beacon_reprocess::forget::{ForgetAsk, ForgetRequest};
use beacon_reprocess::{Ask, Jobs, ReprocessError, Request};
use clap::{Args, Subcommand};

use crate::plugin_cmd;
use crate::{Format, NatsTarget, SandboxArgs};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ReprocessArgs {
    #[command(subcommand)]
    command: Option<ReprocessCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum ReprocessCommand {
    /// Past re-processing and forget jobs (the audit trail), oldest first.
    History {
        #[command(flatten)]
        target: NatsTarget,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Merchant to re-process (repeatable).
    #[arg(long = "merchant", value_name = "ID")]
    merchants: Vec<String>,
    /// Every merchant with events received in the range.
    #[arg(long, conflicts_with = "merchants")]
    all_merchants: bool,
    /// Start of the edge receive-time range (RFC 3339, or a UTC date YYYY-MM-DD), inclusive.
    #[arg(long)]
    from: Option<String>,
    /// End of the range, exclusive.
    #[arg(long)]
    to: Option<String>,
    /// The stored pipeline version to re-run (default: each merchant's active one).
    #[arg(long)]
    pipeline_version: Option<u64>,
    /// Show rows and per-day figures before and after; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Why (kept in the audit record; required unless --dry-run).
    #[arg(long, default_value = "")]
    reason: String,
    /// Who (default: $USER).
    #[arg(long)]
    who: Option<String>,
    /// Batches re-run at once (default: the cores).
    #[arg(long)]
    workers: Option<usize>,
    #[command(flatten)]
    sandbox: SandboxArgs,
    #[command(flatten)]
    target: NatsTarget,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

#[derive(Args)]
pub struct ForgetArgs {
    #[arg(long)]
    merchant: String,
    /// The person's user id.
    #[arg(long, conflicts_with = "visitor", required_unless_present = "visitor")]
    user: Option<String>,
    /// The person's visitor id.
    #[arg(long)]
    visitor: Option<String>,
    /// Count what would be removed; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Why (kept in the audit record; required unless --dry-run).
    #[arg(long, default_value = "")]
    reason: String,
    #[arg(long)]
    who: Option<String>,
    #[command(flatten)]
    target: NatsTarget,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

fn who(given: &Option<String>) -> String {
    given.clone().unwrap_or_else(crate::whoami)
}

pub async fn reprocess(args: ReprocessArgs) -> Result<()> {
    if let Some(ReprocessCommand::History { target, format }) = args.command {
        let jobs = Jobs::open(&target.jetstream().await?).await?;
        let list = jobs.list().await?;
        match format {
            Format::Json => println!("{}", serde_json::to_string_pretty(&list)?),
            _ => {
                println!("job\tkind\tstate\twho\treason\tscope\tcounts\tcommits");
                for r in list {
                    println!(
                        "{}\t{}\t{:?}\t{}\t{}\t{}\t{}\t{}",
                        r.id,
                        r.kind,
                        r.state,
                        r.who,
                        r.reason,
                        r.scope,
                        serde_json::to_string(&r.counts)?,
                        serde_json::to_string(&r.commits)?
                    );
                }
            }
        }
        return Ok(());
    }
    let a = args.run;
    let ask = Ask {
        merchants: a.merchants.clone(),
        all_merchants: a.all_merchants,
        from: a.from.clone().unwrap_or_default(),
        to: a.to.clone().unwrap_or_default(),
        pipeline_version: a.pipeline_version,
        dry_run: a.dry_run,
        reason: a.reason.clone(),
    };
    let request = Request::from_ask(ask, who(&a.who), a.workers.unwrap_or_else(cores))?;
    let control = plugin_cmd::control_with(&a.target, a.sandbox.limits()).await?;
    let js = a.target.jetstream().await?;
    let jobs = Jobs::open(&js).await?;
    let wh = open_warehouse(&a.target.data_dir).await?;
    let shown = beacon::progress::Progress::new("re-processing", "raw events", 0);
    let progress = |done: u64, total: u64| {
        shown.set_total(total);
        shown.set(done);
    };
    let report = beacon_reprocess::reprocess(&wh, &control, &js, &jobs, &request, &progress).await;
    shown.finish();
    let report = report?;
    match a.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        _ => {
            println!(
                "{} job {}{}: {} batches, {} raw events (snapshot {:?}, up to stream sequence {}) in {:.1} s",
                if report.dry_run { "dry run of" } else { "re-processed:" },
                report.job_id,
                if report.resumed { " (resumed)" } else { "" },
                report.batches,
                report.raw_rows,
                report.raw_snapshot,
                report.watermark,
                report.seconds
            );
            println!(
                "versions: {}",
                report
                    .versions
                    .iter()
                    .map(|(m, v)| format!("{m}={}", v.map_or("none".into(), |v| format!("v{v}"))))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!(
                "events rows {} -> {}, failed_events rows {} -> {}, rollup rows rebuilt {}",
                report.events_before,
                report.events_after,
                report.failed_before,
                report.failed_after,
                report.rollup_rows_rebuilt
            );
            println!("merchant\tday\tevents\tpageviews\tvisitors\trevenue");
            for d in &report.days {
                let revenue = d
                    .revenue_micros
                    .iter()
                    .map(|(c, (b, a))| {
                        format!("{c} {:.2} -> {:.2}", *b as f64 / 1e6, *a as f64 / 1e6)
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                println!(
                    "{}\t{}\t{} -> {}\t{} -> {}\t{} -> {}\t{}",
                    d.merchant_id,
                    d.day,
                    d.events.0,
                    d.events.1,
                    d.pageviews.0,
                    d.pageviews.1,
                    d.visitors.0,
                    d.visitors.1,
                    revenue
                );
            }
            for (table, snapshot) in &report.commits {
                println!("committed {table}: snapshot {snapshot}");
            }
            if report.unacknowledged_at_start > 0 {
                println!(
                    "warning: {} messages were not yet ingested when the job started; batches among them \
                     that an old version processed are not covered: run the job again once ingest has caught up",
                    report.unacknowledged_at_start
                );
            }
        }
    }
    Ok(())
}

pub async fn forget(a: ForgetArgs) -> Result<()> {
    let ask = ForgetAsk {
        merchant: a.merchant.clone(),
        user: a.user.clone(),
        visitor: a.visitor.clone(),
        dry_run: a.dry_run,
        reason: a.reason.clone(),
    };
    let request = ForgetRequest::from_ask(ask, who(&a.who))?;
    let jobs = Jobs::open(&a.target.jetstream().await?).await?;
    let wh = open_warehouse(&a.target.data_dir).await?;
    let report = beacon_reprocess::forget::forget(&wh, &jobs, &request).await?;
    match a.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        _ => {
            println!(
                "{} job {}: rows {} in {:.1} s; rollup rows rebuilt {}",
                if report.dry_run {
                    "dry run of"
                } else {
                    "forgot:"
                },
                report.job_id,
                serde_json::to_string(&report.rows)?,
                report.seconds,
                report.rollup_rows_rebuilt
            );
            if !report.dry_run {
                println!(
                    "The old files stay readable through older snapshots until maintenance expires them \
                     (scheduled: snapshots older than the retention, default 300 s; now: \
                     `beacon maintain --snapshot-retain-secs 0 --snapshot-retain-last 1 --orphan-age-secs 0` \
                     while nothing else writes). Copies also stay in the JetStream stream until its retention drops them."
                );
            }
        }
    }
    Ok(())
}

async fn open_warehouse(data_dir: &std::path::Path) -> Result<beacon_warehouse::Warehouse> {
    beacon::store::open_existing(data_dir)
        .await
        .with_context(|| format!("opening the warehouse in {}", data_dir.display()))
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The admin API's history routes, served beside the control plane's by `beacon up` and
/// `beacon admin` (when the data directory holds a warehouse):
/// - `POST /v1/reprocess` `{"merchants": [..] | "all_merchants": true, "from", "to",
///   "pipeline_version"?, "dry_run"?, "reason"}`: validated as the CLI validates; a dry run
///   answers with the report, a real run with `202 {"job_id"}` and runs in the background;
/// - `POST /v1/forget` `{"merchant", "user" | "visitor", "dry_run"?, "reason"}`: the same;
/// - `GET /v1/jobs`: the audit trail;
/// - `GET /v1/failed`: failed events of the last 24 hours by merchant, stage, plugin and
///   pipeline version, with an example reason (the operator page's table).
///
/// Jobs run one at a time on a runtime of their own (one thread at low CPU priority; the
/// plugins on its blocking threads), never on the one that collects events.
pub struct JobService {
    wh: beacon_warehouse::Warehouse,
    control: beacon_control::Control,
    js: async_nats::jetstream::Context,
    jobs: Jobs,
    runtime: beacon_query::runtime::QueryRuntime,
    one_at_a_time: Arc<tokio::sync::Semaphore>,
    /// Jobs this process has started and not finished (an unfinished record whose id is not
    /// here belongs to a run that died: the same request resumes it).
    running: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl JobService {
    /// `None` when `data_dir` holds no warehouse (an admin role on another machine).
    pub async fn open(
        target: &NatsTarget,
        limits: beacon_plugins::SandboxLimits,
    ) -> Result<Option<Arc<Self>>> {
        let Ok(wh) = beacon::store::open_existing(&target.data_dir).await else {
            return Ok(None);
        };
        let js = target.jetstream().await?;
        let runtime = beacon_query::runtime::QueryRuntime::new(
            beacon_query::runtime::RuntimeSettings::background(),
        )?;
        Ok(Some(Arc::new(Self {
            wh,
            control: plugin_cmd::control_with(target, limits).await?,
            jobs: Jobs::open(&js).await?,
            js,
            runtime,
            one_at_a_time: Arc::new(tokio::sync::Semaphore::new(1)),
            running: Default::default(),
        })))
    }

    /// Runs `job` on the jobs runtime, one at a time. A real job (`claim`: kind, id prefix,
    /// scope) gets an id first, an interrupted one's with the same scope (resumed) or a fresh
    /// one, and is answered `202 {"job_id"}` at once (refused with 409 while this process
    /// still runs that scope); a dry run (`None`) is answered with its report.
    async fn start<R, Fut>(
        self: &Arc<Self>,
        claim: Option<(&str, &str, serde_json::Value)>,
        job: impl FnOnce(Arc<Self>, Option<String>) -> Fut + Send + 'static,
    ) -> ApiResponse
    where
        R: serde::Serialize + Send + 'static,
        Fut: std::future::Future<Output = Result<R, ReprocessError>> + Send + 'static,
    {
        use axum::http::StatusCode;
        use axum::response::IntoResponse;
        let job_id = match claim {
            None => None,
            Some((kind, prefix, scope)) => {
                let id = match self.jobs.unfinished(kind, &scope).await {
                    Ok(Some(r)) => r.id,
                    Ok(None) => format!("{prefix}-{}", uuid::Uuid::now_v7()),
                    Err(e) => return api_error(StatusCode::SERVICE_UNAVAILABLE, e),
                };
                let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
                if !running.insert(id.clone()) {
                    return api_error(
                        StatusCode::CONFLICT,
                        format!("job {id} over this scope is still running (GET /v1/jobs)"),
                    );
                }
                Some(id)
            }
        };
        let svc = self.clone();
        let id = job_id.clone();
        let run = self.runtime.spawn(async move {
            let _turn = svc.one_at_a_time.acquire().await;
            let result = job(svc.clone(), id.clone()).await;
            if let Some(id) = &id {
                // The caller got 202: how the job ended goes to the log (and the audit).
                svc.running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(id);
                match &result {
                    Ok(_) => tracing::info!(job = %id, "history job finished"),
                    Err(e) => tracing::error!(job = %id, error = %e, "history job failed"),
                }
            }
            result
        });
        match job_id {
            Some(id) => {
                tracing::info!(job = %id, "history job started from the admin API");
                (
                    StatusCode::ACCEPTED,
                    axum::Json(serde_json::json!({ "job_id": id })),
                )
                    .into_response()
            }
            None => match run.await {
                Ok(Ok(report)) => axum::Json(report).into_response(),
                Ok(Err(e)) => invalid(e),
                Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
            },
        }
    }

    pub fn router(self: Arc<Self>) -> axum::Router {
        use axum::routing::{get, post};
        axum::Router::new()
            .route("/v1/reprocess", post(post_reprocess))
            .route("/v1/forget", post(post_forget))
            .route("/v1/jobs", get(list_jobs))
            .route("/v1/failed", get(failed_events))
            .with_state(self)
    }
}

type ApiResponse = axum::response::Response;

fn api_error(status: axum::http::StatusCode, e: impl std::fmt::Display) -> ApiResponse {
    use axum::response::IntoResponse;
    (
        status,
        axum::Json(serde_json::json!({"error": e.to_string()})),
    )
        .into_response()
}

fn invalid(e: impl std::fmt::Display) -> ApiResponse {
    api_error(axum::http::StatusCode::UNPROCESSABLE_ENTITY, e)
}

/// The JSON body of a request, parsed by hand (as the control plane's routes): a bad body's
/// message names the field.
#[allow(clippy::result_large_err)] // an HTTP answer, returned at once
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiResponse> {
    serde_json::from_slice(bytes)
        .map_err(|e| api_error(axum::http::StatusCode::BAD_REQUEST, format!("body: {e}")))
}

async fn post_reprocess(
    axum::extract::State(s): axum::extract::State<Arc<JobService>>,
    axum::Extension(caller): axum::Extension<beacon_control::admin::Caller>,
    bytes: axum::body::Bytes,
) -> ApiResponse {
    let request = match body::<Ask>(&bytes) {
        Ok(ask) => match Request::from_ask(ask, caller.0, cores()) {
            Ok(r) => r,
            Err(e) => return invalid(e),
        },
        Err(response) => return response,
    };
    let claim = (!request.dry_run).then(|| ("reprocess", "rp", request.scope_json()));
    s.start(claim, move |svc, job_id| async move {
        let request = Request { job_id, ..request };
        let (wh, control, js, jobs) = (&svc.wh, &svc.control, &svc.js, &svc.jobs);
        beacon_reprocess::reprocess(wh, control, js, jobs, &request, &|_, _| {}).await
    })
    .await
}

async fn post_forget(
    axum::extract::State(s): axum::extract::State<Arc<JobService>>,
    axum::Extension(caller): axum::Extension<beacon_control::admin::Caller>,
    bytes: axum::body::Bytes,
) -> ApiResponse {
    let request = match body::<ForgetAsk>(&bytes) {
        Ok(ask) => match ForgetRequest::from_ask(ask, caller.0) {
            Ok(r) => r,
            Err(e) => return invalid(e),
        },
        Err(response) => return response,
    };
    let claim = (!request.dry_run).then(|| ("forget", "fg", request.scope_json()));
    s.start(claim, move |svc, job_id| async move {
        let request = ForgetRequest { job_id, ..request };
        beacon_reprocess::forget::forget(&svc.wh, &svc.jobs, &request).await
    })
    .await
}

async fn list_jobs(axum::extract::State(s): axum::extract::State<Arc<JobService>>) -> ApiResponse {
    use axum::response::IntoResponse;
    match s.jobs.list().await {
        Ok(list) => axum::Json(list).into_response(),
        Err(e) => api_error(axum::http::StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// Failed events of the last 24 hours, grouped as operators look for a cause: which merchant,
/// which stage, which plugin of which pipeline version; the newest and an example reason.
/// Read on the jobs runtime (low priority), never on the collecting one.
async fn failed_events(
    axum::extract::State(s): axum::extract::State<Arc<JobService>>,
) -> ApiResponse {
    use axum::response::IntoResponse;
    let svc = s.clone();
    let read = s.runtime.spawn(async move {
        let batches = svc
            .wh
            .sql(
                "SELECT merchant_id, stage, plugin, pipeline_version, count(*) AS events, \
                 max(received_at) AS last_at, min(reason) AS example \
                 FROM failed_events WHERE received_at >= now() - INTERVAL '24 hours' \
                 GROUP BY merchant_id, stage, plugin, pipeline_version \
                 ORDER BY events DESC, merchant_id LIMIT 200",
            )
            .await?;
        beacon_warehouse::output::json_rows(&batches)
    });
    match read.await {
        Ok(Ok(rows)) => axum::Json(serde_json::json!({ "groups": rows })).into_response(),
        Ok(Err(e)) => api_error(axum::http::StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e) => api_error(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}
