//! `beacon reprocess` and `beacon forget`: rewriting history (see `beacon-reprocess`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use beacon_reprocess::forget::{ForgetRequest, Person};
use beacon_reprocess::{Jobs, Request, Scope};
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
    given
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "operator".into())
}

/// RFC 3339, or `YYYY-MM-DD` (midnight UTC), as epoch milliseconds.
fn parse_time(s: &str) -> Result<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        if let Some(t) = d.and_hms_opt(0, 0, 0) {
            return Ok(t.and_utc().timestamp_millis());
        }
    }
    bail!("{s:?}: not an RFC 3339 time (2026-12-03T10:00:00Z) or a date (2026-12-03)")
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
    if a.merchants.is_empty() && !a.all_merchants {
        bail!("name the merchants (--merchant, repeatable) or --all-merchants");
    }
    let (Some(from), Some(to)) = (&a.from, &a.to) else {
        bail!("--from and --to are required");
    };
    let request = Request {
        scope: Scope {
            merchants: a.merchants.clone(),
            from_ms: parse_time(from)?,
            to_ms: parse_time(to)?,
        },
        version: a.pipeline_version,
        dry_run: a.dry_run,
        who: who(&a.who),
        reason: a.reason.clone(),
        limits: beacon_proto::Limits::default(),
        workers: a
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        job_id: None,
    };
    request.validate()?;
    let control = plugin_cmd::control_with(&a.target, a.sandbox.limits()).await?;
    let js = a.target.jetstream().await?;
    let jobs = Jobs::open(&js).await?;
    let wh = open_warehouse(&a.target.data_dir).await?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {pos}/{len} raw events [{elapsed_precise}] {per_sec} ETA {eta}",
        )
        .map_err(|e| anyhow!("{e}"))?,
    );
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let report = beacon_reprocess::reprocess(&wh, &control, &js, &jobs, &request, &progress).await;
    bar.finish_and_clear();
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
    let person = match (&a.user, &a.visitor) {
        (Some(u), None) => Person::User(u.clone()),
        (None, Some(v)) => Person::Visitor(v.clone()),
        _ => bail!("give exactly one of --user and --visitor"),
    };
    let jobs = Jobs::open(&a.target.jetstream().await?).await?;
    let wh = open_warehouse(&a.target.data_dir).await?;
    let request = ForgetRequest {
        merchant_id: a.merchant.clone(),
        person,
        who: who(&a.who),
        reason: a.reason.clone(),
        dry_run: a.dry_run,
        job_id: None,
    };
    request.validate()?;
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

async fn open_warehouse(data_dir: &std::path::Path) -> Result<Arc<beacon_warehouse::Warehouse>> {
    let dir: PathBuf = data_dir.to_path_buf();
    Ok(Arc::new(
        beacon_warehouse::Warehouse::open_existing(&dir)
            .await
            .with_context(|| format!("opening the warehouse in {}", dir.display()))?,
    ))
}

/// The admin API's history routes, served beside the control plane's by `beacon up` and
/// `beacon admin` (when the data directory holds a warehouse):
/// - `POST /v1/reprocess` `{"merchants": [..] | "all_merchants": true, "from", "to",
///   "pipeline_version"?, "dry_run"?, "reason"}`: validated as the CLI validates; a dry run
///   answers with the report, a real run with `202 {"job_id"}` and runs in the background;
/// - `POST /v1/forget` `{"merchant", "user" | "visitor", "dry_run"?, "reason"}`: the same;
/// - `GET /v1/jobs`: the audit trail.
///
/// Jobs run one at a time on a runtime of their own (one thread at low CPU priority; the
/// plugins on its blocking threads), never on the one that collects events.
pub struct JobService {
    wh: Arc<beacon_warehouse::Warehouse>,
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
        let Ok(wh) = beacon_warehouse::Warehouse::open_existing(&target.data_dir).await else {
            return Ok(None);
        };
        let js = target.jetstream().await?;
        let runtime =
            beacon_query::runtime::QueryRuntime::new(beacon_query::runtime::RuntimeSettings {
                threads: 1,
                stack_bytes: 8 << 20,
                nice: 15,
            })?;
        Ok(Some(Arc::new(Self {
            wh: Arc::new(wh),
            control: plugin_cmd::control_with(target, limits).await?,
            jobs: Jobs::open(&js).await?,
            js,
            runtime,
            one_at_a_time: Arc::new(tokio::sync::Semaphore::new(1)),
            running: Default::default(),
        })))
    }

    /// The id a new real job gets: an interrupted one's with the same scope (resumed), else
    /// a fresh one; refused (409) while this process still runs that scope.
    async fn claim(
        &self,
        kind: &str,
        prefix: &str,
        scope: &serde_json::Value,
    ) -> Result<String, ApiResponse> {
        let id = match self.jobs.unfinished(kind, scope).await {
            Ok(Some(r)) => r.id,
            Ok(None) => format!("{prefix}-{}", uuid::Uuid::now_v7()),
            Err(e) => return Err(api_error(axum::http::StatusCode::SERVICE_UNAVAILABLE, e)),
        };
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if !running.insert(id.clone()) {
            return Err(api_error(
                axum::http::StatusCode::CONFLICT,
                format!("job {id} over this scope is still running (GET /v1/jobs)"),
            ));
        }
        Ok(id)
    }

    /// Forgets a finished job of this process and logs how it ended (the caller got 202).
    fn release<T, E: std::fmt::Display>(&self, id: &Option<String>, outcome: &Result<T, E>) {
        if let Some(id) = id {
            self.running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
            match outcome {
                Ok(_) => tracing::info!(job = %id, "history job finished"),
                Err(e) => tracing::error!(job = %id, error = %e, "history job failed"),
            }
        }
    }

    pub fn router(self: Arc<Self>) -> axum::Router {
        use axum::routing::{get, post};
        axum::Router::new()
            .route("/v1/reprocess", post(post_reprocess))
            .route("/v1/forget", post(post_forget))
            .route("/v1/jobs", get(list_jobs))
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

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReprocessBody {
    #[serde(default)]
    merchants: Vec<String>,
    #[serde(default)]
    all_merchants: bool,
    from: String,
    to: String,
    #[serde(default)]
    pipeline_version: Option<u64>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    reason: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ForgetBody {
    merchant: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    visitor: Option<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    reason: String,
}

async fn post_reprocess(
    axum::extract::State(s): axum::extract::State<Arc<JobService>>,
    axum::Extension(caller): axum::Extension<beacon_control::admin::Caller>,
    body: axum::body::Bytes,
) -> ApiResponse {
    use axum::response::IntoResponse;
    // Parsed by hand (as the control plane's routes): a bad body's message names the field.
    let body: ReprocessBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return api_error(axum::http::StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    if body.merchants.is_empty() != body.all_merchants {
        return invalid("give `merchants` or `all_merchants: true` (one of the two)");
    }
    let (from, to) = match (parse_time(&body.from), parse_time(&body.to)) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) | (_, Err(e)) => return invalid(e),
    };
    let mut request = Request {
        scope: Scope {
            merchants: body.merchants,
            from_ms: from,
            to_ms: to,
        },
        version: body.pipeline_version,
        dry_run: body.dry_run,
        who: caller.0,
        reason: body.reason,
        limits: beacon_proto::Limits::default(),
        workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
        job_id: None,
    };
    if let Err(e) = request.validate() {
        return invalid(e);
    }
    if !request.dry_run {
        match s.claim("reprocess", "rp", &request.scope_json()).await {
            Ok(id) => request.job_id = Some(id),
            Err(response) => return response,
        }
    }
    let job_id = request.job_id.clone();
    let svc = s.clone();
    let run = s.runtime.spawn(async move {
        let _turn = svc.one_at_a_time.acquire().await;
        let r = beacon_reprocess::reprocess(
            &svc.wh,
            &svc.control,
            &svc.js,
            &svc.jobs,
            &request,
            &|_, _| {},
        )
        .await;
        svc.release(&request.job_id, &r);
        r
    });
    match job_id {
        Some(id) => {
            tracing::info!(job = %id, "re-processing job started from the admin API");
            (
                axum::http::StatusCode::ACCEPTED,
                axum::Json(serde_json::json!({"job_id": id})),
            )
                .into_response()
        }
        None => match run.await {
            Ok(Ok(report)) => axum::Json(report).into_response(),
            Ok(Err(e)) => invalid(e),
            Err(e) => api_error(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e),
        },
    }
}

async fn post_forget(
    axum::extract::State(s): axum::extract::State<Arc<JobService>>,
    axum::Extension(caller): axum::Extension<beacon_control::admin::Caller>,
    body: axum::body::Bytes,
) -> ApiResponse {
    use axum::response::IntoResponse;
    let body: ForgetBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return api_error(axum::http::StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    let person = match (body.user, body.visitor) {
        (Some(u), None) => Person::User(u),
        (None, Some(v)) => Person::Visitor(v),
        _ => return invalid("give exactly one of `user` and `visitor`"),
    };
    let mut request = ForgetRequest {
        merchant_id: body.merchant,
        person,
        who: caller.0,
        reason: body.reason,
        dry_run: body.dry_run,
        job_id: None,
    };
    if let Err(e) = request.validate() {
        return invalid(e);
    }
    if !request.dry_run {
        match s.claim("forget", "fg", &request.scope_json()).await {
            Ok(id) => request.job_id = Some(id),
            Err(response) => return response,
        }
    }
    let job_id = request.job_id.clone();
    let svc = s.clone();
    let run = s.runtime.spawn(async move {
        let _turn = svc.one_at_a_time.acquire().await;
        let r = beacon_reprocess::forget::forget(&svc.wh, &svc.jobs, &request).await;
        svc.release(&request.job_id, &r);
        r
    });
    match job_id {
        Some(id) => (
            axum::http::StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({"job_id": id})),
        )
            .into_response(),
        None => match run.await {
            Ok(Ok(report)) => axum::Json(report).into_response(),
            Ok(Err(e)) => invalid(e),
            Err(e) => api_error(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e),
        },
    }
}

async fn list_jobs(axum::extract::State(s): axum::extract::State<Arc<JobService>>) -> ApiResponse {
    use axum::response::IntoResponse;
    match s.jobs.list().await {
        Ok(list) => axum::Json(list).into_response(),
        Err(e) => api_error(axum::http::StatusCode::SERVICE_UNAVAILABLE, e),
    }
}
