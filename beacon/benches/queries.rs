//! Query benchmark: a merchant dashboard (30-day daily time series, top pages, top
//! sources, countries) through the metrics API's planner and executor, over realistic
//! traffic (many merchants, Zipf sizes) in a real Iceberg warehouse on local disk. The
//! baseline, in the same run, computes the same answers by scanning `events`.
//!
//!     cargo bench -p beacon --bench queries                     # 10M events, 10k merchants, 90 days
//!     BEACON_BENCH_EVENTS=1000000 BEACON_BENCH_MERCHANTS=1000 cargo bench -p beacon --bench queries
//!     BEACON_BENCH_DIR=/var/tmp/beacon-bench cargo bench ...    # keep (and reuse) the data
//!
//! Prints a Markdown report; docs/BENCHMARKS.md records it.

use std::sync::Arc;
use std::time::Instant;

use beacon::traffic::{self, Site, TrafficConfig};
use beacon_query::metrics::{MerchantSessions, Plan, QueryRequest, Source};
use beacon_warehouse::{rollup, TableKind, Warehouse};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// "p50 x / p99 y ms" of sorted latencies.
fn p50_p99(sorted: &[f64]) -> String {
    format!(
        "p50 {:.1} / p99 {:.1} ms",
        pct(sorted, 0.5),
        pct(sorted, 0.99)
    )
}

#[path = "queries/http.rs"]
mod http;

/// Who opens a dashboard: half the time one of the 100 biggest merchants, else anyone.
fn pick_index(rng: &mut StdRng, sites: usize) -> usize {
    if rng.random_bool(0.5) {
        rng.random_range(0..sites.min(100))
    } else {
        rng.random_range(0..sites)
    }
}

fn pick<'a>(rng: &mut StdRng, sites: &'a [Site]) -> &'a Site {
    &sites[pick_index(rng, sites.len())]
}

/// The four panels of a dashboard, without site and range (in-process and over HTTP).
fn panels() -> [serde_json::Value; 4] {
    [
        json!({"metrics": ["visitors", "pageviews"], "dimensions": ["time:day"]}),
        json!({"metrics": ["visitors", "pageviews"], "dimensions": ["event:page"], "pagination": {"limit": 10}}),
        json!({"metrics": ["visitors"], "dimensions": ["visit:source"], "pagination": {"limit": 10}}),
        json!({"metrics": ["visitors"], "dimensions": ["visit:country"], "pagination": {"limit": 10}}),
    ]
}

/// The four panels of a dashboard, for one merchant.
fn dashboard(merchant: &str, now: chrono::DateTime<chrono::Utc>) -> Vec<Plan> {
    panels()
        .into_iter()
        .map(|mut q| {
            q["site_id"] = json!(merchant);
            q["date_range"] = json!("30d");
            let req: QueryRequest = serde_json::from_value(q).expect("request");
            req.plan(merchant, chrono_tz::Tz::UTC, now).expect("plan")
        })
        .collect()
}

/// The budget requests run under, as the API serves them: generous here (the bench
/// measures speed, not refusals).
fn budget() -> &'static Arc<beacon_query::budget::Budget> {
    static BUDGET: std::sync::OnceLock<Arc<beacon_query::budget::Budget>> =
        std::sync::OnceLock::new();
    BUDGET.get_or_init(|| {
        beacon_query::budget::Budget::new(beacon_query::budget::QueryLimits {
            concurrent_per_merchant: 1024,
            concurrent_total: 1024,
            ..Default::default()
        })
    })
}

/// How a dashboard's panels are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// Scanning `events` (the baseline).
    Events,
    /// The rollups, each panel a DataFusion query.
    DataFusion,
    /// The rollups, from the merchant's slices in memory (what the API does).
    Slices,
}

async fn run_dashboard(
    sessions: &MerchantSessions,
    plans: &[Plan],
    read: Read,
) -> Vec<Vec<serde_json::Value>> {
    let budget = budget();
    let mut out = Vec::new();
    for plan in plans {
        let sources: Vec<Source> = if read == Read::Events {
            plan.events_sources()
        } else {
            plan.sources()
        };
        let answer = if read == Read::Slices {
            let at = sessions.snapshots(&sources).await.expect("snapshots");
            sessions.run(budget, plan, &sources, &at).await
        } else {
            let ctx = sessions
                .budgeted(budget, &plan.merchant_id)
                .await
                .expect("session");
            beacon_query::metrics::execute(&ctx, plan, &sources).await
        };
        out.push(answer.expect("query").results);
    }
    out
}

/// `n` different merchants (indexes), half among the 100 biggest as the dashboards
/// elsewhere, in an order drawn from `seed`.
fn spread(sites: &[Site], seed: u64, n: usize) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut rng = StdRng::seed_from_u64(seed);
    let split = sites.len().min(100);
    let (mut big, mut rest): (Vec<usize>, Vec<usize>) =
        ((0..split).collect(), (split..sites.len()).collect());
    big.shuffle(&mut rng);
    rest.shuffle(&mut rng);
    let mut order = Vec::new();
    for (i, b) in big.into_iter().enumerate() {
        order.push(b);
        if let Some(r) = rest.get(i) {
            order.push(*r);
        }
    }
    order.truncate(n);
    order
}

/// How long `read` takes to compute `plans` in `sessions`, and the answer.
async fn timed_read(
    sessions: &MerchantSessions,
    plans: &[Plan],
    read: Read,
) -> (f64, Vec<Vec<serde_json::Value>>) {
    let t = Instant::now();
    let answer = run_dashboard(sessions, plans, read).await;
    (t.elapsed().as_secs_f64() * 1000.0, answer)
}

/// Dashboards of 48 merchants right after a commit of new events for them and the rollup
/// run after it, as in `beacon up` every few seconds while events arrive, in three rounds:
/// the API's slices (extended from the previous snapshot's by the rows added since), slices
/// read whole, and DataFusion, in turn per merchant, equal answers asserted. Returns the
/// three latencies (ms, sorted) and the slice counts of the extended ones.
///
/// It commits to the warehouse (a kept data directory grows by ~6k events a run), so it
/// runs last.
async fn slices_after_commits(
    wh: &Arc<Warehouse>,
    sites: &[Site],
    now: chrono::DateTime<chrono::Utc>,
) -> ([Vec<f64>; 3], beacon_query::metrics::slices::Counts) {
    let chosen: Vec<Site> = spread(sites, 5, 48)
        .into_iter()
        .map(|i| sites[i].clone())
        .collect();
    let kept = MerchantSessions::new(wh.clone());
    for site in &chosen {
        run_dashboard(&kept, &dashboard(&site.merchant_id, now), Read::Slices).await;
    }
    let probe = dashboard(&chosen[0].merchant_id, now)
        .iter()
        .flat_map(|p| p.sources())
        .collect::<Vec<_>>();
    let day = 86_400_000i64;
    let mut out = [Vec::new(), Vec::new(), Vec::new()];
    for round in 0..3u64 {
        let before = kept.snapshots(&probe).await.expect("snapshots");
        let config = TrafficConfig {
            seed: 1_000 + round,
            events: 40 * chosen.len(),
            start_ms: (now.timestamp_millis() / day - 1) * day,
            days: 1,
            zipf_s: 0.0,
            late_share: 0.0,
        };
        let events = traffic::events_in_time_order(&config, &chosen);
        let seq = wh.committed_seq(TableKind::Events).await.expect("seq") + 1;
        traffic::commit_events(wh, seq, events)
            .await
            .expect("commit");
        rollup::run_once(wh).await.expect("rollup");
        // Serving reads see a commit within `cached::REFRESH`.
        while kept.snapshots(&probe).await.expect("snapshots") == before {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let whole = MerchantSessions::new(wh.clone());
        for site in &chosen {
            let plans = dashboard(&site.merchant_id, now);
            // The merchant's session is built before (not what is compared).
            whole.get(&site.merchant_id).await.expect("session");
            let (a, extended) = timed_read(&kept, &plans, Read::Slices).await;
            let (b, loaded) = timed_read(&whole, &plans, Read::Slices).await;
            let (c, datafusion) = timed_read(&whole, &plans, Read::DataFusion).await;
            assert_eq!(extended, loaded, "extended slices disagree with whole ones");
            assert_eq!(loaded, datafusion, "slices disagree with DataFusion");
            for (v, ms) in out.iter_mut().zip([a, b, c]) {
                v.push(ms);
            }
        }
    }
    for v in &mut out {
        v.sort_by(f64::total_cmp);
    }
    let counts = kept.slices().map(|s| s.counts()).unwrap_or_default();
    (out, counts)
}

/// One-client dashboards of 48 different merchants, each computed three ways in turn:
/// DataFusion over the rollups, then from slices that are not in memory yet (loaded), then
/// from the slices in memory. Asserts equal answers. Returns the three latencies (ms,
/// sorted).
async fn slices_vs_datafusion(
    wh: &Arc<Warehouse>,
    sites: &[Site],
    now: chrono::DateTime<chrono::Utc>,
) -> [Vec<f64>; 3] {
    let sessions = MerchantSessions::new(wh.clone());
    let mut out = [Vec::new(), Vec::new(), Vec::new()];
    for (n, i) in spread(sites, 4, 49).into_iter().enumerate() {
        let plans = dashboard(&sites[i].merchant_id, now);
        // The merchant's session is built before (not what is compared).
        sessions.get(&sites[i].merchant_id).await.expect("session");
        let (a, datafusion) = timed_read(&sessions, &plans, Read::DataFusion).await;
        let (b, loaded) = timed_read(&sessions, &plans, Read::Slices).await;
        let (c, kept) = timed_read(&sessions, &plans, Read::Slices).await;
        assert_eq!(datafusion, loaded, "slices disagree with DataFusion");
        assert_eq!(loaded, kept);
        // The first warms the footers the others read too.
        if n > 0 {
            for (v, ms) in out.iter_mut().zip([a, b, c]) {
                v.push(ms);
            }
        }
    }
    for v in &mut out {
        v.sort_by(f64::total_cmp);
    }
    out
}

/// Writes the traffic about a million events per commit (one file per touched day and
/// merchant bucket) and brings the rollups up to date after each commit, as the rollup role
/// does incrementally in production. Returns (load seconds, rollup seconds, rollup stats).
async fn load(
    wh: &Warehouse,
    config: &TrafficConfig,
    sites: &[Site],
) -> (f64, f64, rollup::RunStats) {
    let mut load_s = 0.0;
    let mut rollup_s = 0.0;
    let mut stats = rollup::RunStats::default();
    let sizes = traffic::zipf_sizes(sites.len(), config.events, config.zipf_s);
    let mut seq = 0u64;
    let mut start = 0;
    while start < sites.len() {
        let started = Instant::now();
        let mut end = start;
        let mut n = 0;
        while end < sites.len() && (n == 0 || n + sizes[end] <= 1_000_000) {
            n += sizes[end];
            end += 1;
        }
        let part = start..end;
        start = part.end;
        let generated = traffic::generate_part(config, sites, part);
        let events: Vec<_> = generated.into_iter().map(|g| g.event).collect();
        seq += 1;
        traffic::commit_events(wh, seq, events)
            .await
            .expect("commit");
        load_s += started.elapsed().as_secs_f64();
        let started = Instant::now();
        let run = rollup::run_once(wh).await.expect("rollup");
        rollup_s += started.elapsed().as_secs_f64();
        stats.rollup_rows += run.rollup_rows;
        stats.breakdown_rows += run.breakdown_rows;
        stats.visit_rows += run.visit_rows;
        eprintln!("loaded and rolled up part {seq} ({start} sites done)");
    }
    (load_s, rollup_s, stats)
}

/// One-client dashboards with the serving reads of `sessions` (the default: DataFusion's
/// Parquet source, footers kept) and with iceberg-datafusion's scan, on the same warehouse,
/// the same merchants, alternating (which goes first alternates too). Asserts equal answers.
/// Returns both latencies (ms, sorted).
async fn serving_reads(
    dir: &std::path::Path,
    sessions: &MerchantSessions,
    sites: &[Site],
    now: chrono::DateTime<chrono::Utc>,
) -> (Vec<f64>, Vec<f64>) {
    let iceberg = Warehouse::open(dir)
        .await
        .expect("warehouse")
        .with_serving_reads(beacon_warehouse::ServingReads::Iceberg);
    let iceberg = MerchantSessions::new(Arc::new(iceberg));
    let mut rng = StdRng::seed_from_u64(3);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..64 {
        let plans = dashboard(&pick(&mut rng, sites).merchant_id, now);
        // Each warehouse's sessions and footers warm on a first run, not measured.
        if i < 2 {
            run_dashboard(sessions, &plans, Read::DataFusion).await;
            run_dashboard(&iceberg, &plans, Read::DataFusion).await;
        }
        let ((a, answer_a), (b, answer_b)) = if i % 2 == 0 {
            let a = timed(sessions, &plans).await;
            (a, timed(&iceberg, &plans).await)
        } else {
            let b = timed(&iceberg, &plans).await;
            (timed(sessions, &plans).await, b)
        };
        assert_eq!(answer_a, answer_b, "serving reads disagree");
        ours.push(a);
        theirs.push(b);
    }
    ours.sort_by(f64::total_cmp);
    theirs.sort_by(f64::total_cmp);
    (ours, theirs)
}

/// Where one computed query's time goes, in the phases the API runs it in (means over 40
/// merchants' dashboards, after a warm-up round).
async fn phases(
    sessions: &MerchantSessions,
    sites: &[Site],
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    let budget = budget();
    let mut sum = [0f64; 5];
    let mut queries = 0usize;
    let mut cpu_before = 0.0;
    for round in 0..2 {
        if round == 1 {
            cpu_before = process_cpu_ms();
        }
        for site in sites.iter().step_by((sites.len() / 40).max(1)).take(40) {
            for plan in dashboard(&site.merchant_id, now) {
                let t0 = Instant::now();
                let ctx = sessions
                    .budgeted(budget, &plan.merchant_id)
                    .await
                    .expect("session");
                let mut t = [t0.elapsed().as_secs_f64(), 0.0, 0.0, 0.0, 0.0];
                let mut rows = Vec::new();
                for source in plan.sources() {
                    let s0 = Instant::now();
                    let df = beacon_query::metrics::logical::frame(&ctx, &plan, &source)
                        .await
                        .expect("frame");
                    let s1 = Instant::now();
                    let task = Arc::new(df.task_ctx());
                    let physical = df.create_physical_plan().await.expect("plan");
                    let s2 = Instant::now();
                    let batches = datafusion::physical_plan::collect(physical, task)
                        .await
                        .expect("execute");
                    let s3 = Instant::now();
                    rows.push((
                        source.kind,
                        beacon_warehouse::output::json_rows(&batches).expect("rows"),
                    ));
                    t[1] += (s1 - s0).as_secs_f64();
                    t[2] += (s2 - s1).as_secs_f64();
                    t[3] += (s3 - s2).as_secs_f64();
                    t[4] += s3.elapsed().as_secs_f64();
                }
                let r0 = Instant::now();
                plan.results(&rows).expect("results");
                t[4] += r0.elapsed().as_secs_f64();
                if round > 0 {
                    queries += 1;
                    for (a, b) in sum.iter_mut().zip(t) {
                        *a += b * 1000.0;
                    }
                }
            }
        }
    }
    let cpu = (process_cpu_ms() - cpu_before) / queries.max(1) as f64;
    let m = |i: usize| sum[i] / queries.max(1) as f64;
    format!(
        "Phases of a computed query (means over {queries} dashboard queries, one client): budgeted session {:.2} ms, plan built from the request {:.2} ms, optimized and physical plan (Iceberg's file planning included) {:.2} ms, execution {:.2} ms, rows to JSON and merged {:.2} ms; the process's CPU {cpu:.2} ms per query.",
        m(0),
        m(1),
        m(2),
        m(3),
        m(4)
    )
}

/// CPU time this process has used (user and system, all threads), from `/proc/self/stat`,
/// in milliseconds (at the kernel's 100 Hz tick: over 160 queries, ~0.1 ms a query).
fn process_cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) * 10.0
}

/// One dashboard's latency (ms) and answer.
async fn timed(sessions: &MerchantSessions, plans: &[Plan]) -> (f64, Vec<Vec<serde_json::Value>>) {
    let t = Instant::now();
    let answer = run_dashboard(sessions, plans, Read::DataFusion).await;
    (t.elapsed().as_secs_f64() * 1000.0, answer)
}

/// Visit metrics for 8 merchants through the API's planner (the `visits` table), against
/// grouping each merchant's `events` into visits in SQL; asserts both count the same visits.
/// Returns the two latencies (ms, sorted).
async fn visit_metrics(
    wh: &Warehouse,
    sessions: &MerchantSessions,
    sites: &[Site],
    config: &TrafficConfig,
    now: chrono::DateTime<chrono::Utc>,
) -> (Vec<f64>, Vec<f64>) {
    let first_day = chrono::DateTime::from_timestamp_millis(config.start_ms)
        .expect("start")
        .date_naive();
    let mut rng = StdRng::seed_from_u64(2);
    let (mut stored, mut grouped) = (Vec::new(), Vec::new());
    for i in 0..8 {
        let m = if i == 0 {
            sites[0].merchant_id.clone()
        } else {
            pick(&mut rng, sites).merchant_id.clone()
        };
        let req: QueryRequest = serde_json::from_value(json!({
            "site_id": m,
            "metrics": ["visits", "bounce_rate", "visit_duration"],
            "date_range": [first_day.to_string(), now.date_naive().to_string()],
        }))
        .expect("request");
        let plan = req.plan(&m, chrono_tz::Tz::UTC, now).expect("plan");
        let t = Instant::now();
        let answer = run_dashboard(sessions, &[plan], Read::DataFusion).await;
        stored.push(t.elapsed().as_secs_f64() * 1000.0);
        let visits = answer[0]
            .first()
            .and_then(|r| r["metrics"][0].as_i64())
            .unwrap_or(0);
        let t = Instant::now();
        let rows = wh
            .sql(&format!(
                "WITH keyed AS ( \
                     SELECT name, ts, COALESCE(session_id, visitor_id, event_id) AS k \
                     FROM events WHERE merchant_id = '{m}'), \
                 gaps AS ( \
                     SELECT *, CASE WHEN lag(ts) OVER (PARTITION BY k ORDER BY ts) IS NULL \
                                      OR ts - lag(ts) OVER (PARTITION BY k ORDER BY ts) > INTERVAL '30 minutes' \
                                    THEN 1 ELSE 0 END AS s FROM keyed), \
                 numbered AS ( \
                     SELECT *, sum(s) OVER (PARTITION BY k ORDER BY ts \
                                            ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS n \
                     FROM gaps), \
                 v AS ( \
                     SELECT max(ts) - min(ts) AS d, \
                            sum(CASE WHEN name = 'pageview' THEN 1 ELSE 0 END) <= 1 AS bounce \
                     FROM numbered GROUP BY k, n) \
                 SELECT count(*) AS visits, avg(CASE WHEN bounce THEN 1.0 ELSE 0.0 END) AS bounce_rate \
                 FROM v"
            ))
            .await
            .expect("visits from events");
        grouped.push(t.elapsed().as_secs_f64() * 1000.0);
        let from_events = rows[0]
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .map_or(-1, |a| a.value(0));
        assert_eq!(visits, from_events, "{m}: visits differ");
    }
    stored.sort_by(f64::total_cmp);
    grouped.sort_by(f64::total_cmp);
    (stored, grouped)
}

fn main() {
    // As the `beacon` binary starts (before any thread).
    beacon_serve::process::no_library_backtraces();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}

async fn run() {
    let events = env("BEACON_BENCH_EVENTS", 10_000_000);
    let merchants = env("BEACON_BENCH_MERCHANTS", 10_000);
    let days = env("BEACON_BENCH_DAYS", 90) as u32;
    let rounds = env("BEACON_BENCH_ROUNDS", 200);
    let kept = std::env::var("BEACON_BENCH_DIR").ok();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = kept
        .as_deref()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let now = chrono::Utc::now();
    let day = 86_400_000i64;
    let config = TrafficConfig {
        seed: 7,
        events,
        start_ms: (now.timestamp_millis() / day - i64::from(days)) * day,
        days,
        zipf_s: 1.0,
        late_share: 0.0,
    };
    let sites = traffic::sites(merchants, |i| format!("m_bench_{i:05}"));

    let wh = Arc::new(Warehouse::open(&dir).await.expect("warehouse"));
    let have = wh.committed_seq(TableKind::Events).await.expect("seq");
    let (load_s, rollup_s, stats) = if have == 0 {
        load(&wh, &config, &sites).await
    } else {
        eprintln!("reusing the data in {}", dir.display());
        (0.0, 0.0, rollup::run_once(&wh).await.expect("rollup"))
    };
    let rows = wh
        .sql("SELECT count(*) AS n FROM events")
        .await
        .expect("count");
    let total = rows[0]
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .map_or(0, |a| a.value(0));
    // Where a query's time goes: a fresh session (views planned), then a trivial query,
    // then one small rollup query.
    let mut fixed = Vec::new();
    for _ in 0..20 {
        let t0 = Instant::now();
        let ctx = wh.session().await.expect("session");
        let t1 = Instant::now();
        ctx.sql("SELECT 1")
            .await
            .expect("sql")
            .collect()
            .await
            .expect("collect");
        let t2 = Instant::now();
        ctx.sql(&format!(
            "SELECT sum(events) FROM rollups_hourly WHERE merchant_id = '{}'",
            sites[0].merchant_id
        ))
        .await
        .expect("sql")
        .collect()
        .await
        .expect("collect");
        let t3 = Instant::now();
        fixed.push([t1 - t0, t2 - t1, t3 - t2].map(|d| d.as_secs_f64() * 1000.0));
    }
    let med = |i: usize| {
        let mut v: Vec<f64> = fixed.iter().map(|f| f[i]).collect();
        v.sort_by(f64::total_cmp);
        pct(&v, 0.5)
    };
    let overhead = format!(
        "Per-query fixed costs (medians): new session with views {:.1} ms, `SELECT 1` {:.1} ms, one merchant's sum over `rollups_hourly` through the catalog-backed provider (no metadata reuse) {:.1} ms.",
        med(0),
        med(1),
        med(2)
    );

    // The answers agree with a scan of `events` (visitors within 2%: HLL), for the biggest
    // merchant and a few others, and the scan's latency is the baseline.
    let mut rng = StdRng::seed_from_u64(1);
    // Merchants' sessions kept as the API keeps them.
    let sessions = Arc::new(MerchantSessions::new(wh.clone()));
    let mut baseline = Vec::new();
    let mut rollup_single = Vec::new();
    for i in 0..8 {
        let m = if i == 0 {
            sites[0].merchant_id.clone()
        } else {
            pick(&mut rng, &sites).merchant_id.clone()
        };
        let plans = dashboard(&m, now);
        let t = Instant::now();
        let scanned = run_dashboard(&sessions, &plans, Read::Events).await;
        baseline.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        let rolled = run_dashboard(&sessions, &plans, Read::DataFusion).await;
        rollup_single.push(t.elapsed().as_secs_f64() * 1000.0);
        for (a, b) in scanned.iter().zip(&rolled) {
            assert_eq!(a.len(), b.len(), "{m}: row counts differ");
        }
    }
    baseline.sort_by(f64::total_cmp);
    rollup_single.sort_by(f64::total_cmp);
    let (parquet_reads, iceberg_reads) = serving_reads(&dir, &sessions, &sites, now).await;
    let phases = phases(&sessions, &sites, now).await;
    let (visits_stored, visits_grouped) = visit_metrics(&wh, &sessions, &sites, &config, now).await;
    let [from_datafusion, from_loaded, from_kept] = slices_vs_datafusion(&wh, &sites, now).await;

    let mut report = vec![
        format!(
            "Data: {total} events, {merchants} merchants (Zipf s=1.0), {days} days; written in {load_s:.0} s; \
             rollups and visits brought up to date after each ~1M-event commit: {rollup_s:.0} s in all ({} rollup rows, {} breakdown rows, {} visit rows written).",
            stats.rollup_rows,
            stats.breakdown_rows,
            stats.visit_rows
        ),
        String::new(),
        "| clients | dashboards | dashboards/s | p50 ms | p99 ms |".into(),
        "|---|---|---|---|---|".into(),
        format!(
            "| 1 (baseline: scan `events`) | {} | {:.2} | {:.1} | {:.1} |",
            baseline.len(),
            1000.0 / pct(&baseline, 0.5).max(1e-9),
            pct(&baseline, 0.5),
            pct(&baseline, 0.99)
        ),
    ];
    for (read, clients) in [1usize, 8, 64]
        .into_iter()
        .flat_map(|c| [(Read::DataFusion, c), (Read::Slices, c)])
    {
        let per_client = (rounds / clients).max(2);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..clients {
            let sessions = sessions.clone();
            let sites = sites.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(100 + c as u64);
                let mut lat = Vec::new();
                for _ in 0..per_client {
                    let plans = dashboard(&pick(&mut rng, &sites).merchant_id, now);
                    let t = Instant::now();
                    run_dashboard(&sessions, &plans, read).await;
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.expect("client"));
        }
        let secs = started.elapsed().as_secs_f64();
        lat.sort_by(f64::total_cmp);
        let how = match read {
            Read::Slices => "rollups, slices in memory",
            _ => "rollups, DataFusion",
        };
        report.push(format!(
            "| {clients} ({how}) | {} | {:.1} | {:.1} | {:.1} |",
            lat.len(),
            lat.len() as f64 / secs,
            pct(&lat, 0.5),
            pct(&lat, 0.99)
        ));
    }
    report.push(String::new());
    report.push(overhead);
    report.push(String::new());
    report.push(phases);
    report.push(String::new());
    report.push(format!(
        "Single-client dashboard, rollups vs scanning `events` (same merchants, same run): p50 {:.1} ms vs {:.1} ms = **{:.1}x faster**.",
        pct(&rollup_single, 0.5),
        pct(&baseline, 0.5),
        pct(&baseline, 0.5) / pct(&rollup_single, 0.5).max(1e-9)
    ));
    report.push(format!(
        "Serving reads (one client, {} dashboards, each run by both alternately, same merchants): DataFusion's Parquet source over Iceberg's planned files with footers kept {} vs iceberg-datafusion's scan {} = **{:.2}x the time** at p50.",
        parquet_reads.len(),
        p50_p99(&parquet_reads),
        p50_p99(&iceberg_reads),
        pct(&parquet_reads, 0.5) / pct(&iceberg_reads, 0.5).max(1e-9)
    ));
    let counts = sessions.slices().map(|s| s.counts()).unwrap_or_default();
    report.push(format!(
        "(The slices rows above: {} slices loaded, {} panels answered from one already in memory, over the 1, 8 and 64 client runs in that order; the DataFusion and slice rows alternate per client count and pick the same merchants.)",
        counts.loaded, counts.reused
    ));
    report.push(format!(
        "Rollup slices (one client, {} dashboards of different merchants, each computed three ways in turn, equal answers asserted): DataFusion over the rollups {}; slices loaded for it (first dashboard of the merchant since the snapshot) {} = **{:.2}x**; slices in memory p50 {:.2} / p99 {:.2} ms = **{:.3}x** the time at p50.",
        from_datafusion.len(),
        p50_p99(&from_datafusion),
        p50_p99(&from_loaded),
        pct(&from_loaded, 0.5) / pct(&from_datafusion, 0.5).max(1e-9),
        pct(&from_kept, 0.5),
        pct(&from_kept, 0.99),
        pct(&from_kept, 0.5) / pct(&from_datafusion, 0.5).max(1e-9),
    ));
    report.push(format!(
        "Visit metrics (visits, bounce rate, visit duration over all of a merchant's days; the biggest merchant and 7 others), from the pre-aggregated `visits` vs grouping the merchant's `events` into visits in SQL (same merchants, same run, the same visit counts): p50 {:.1} ms vs {:.1} ms = **{:.1}x faster**.",
        pct(&visits_stored, 0.5),
        pct(&visits_grouped, 0.5),
        pct(&visits_grouped, 0.5) / pct(&visits_stored, 0.5).max(1e-9)
    ));
    report.extend(over_http(wh.clone(), Arc::new(sites.clone()), &dir, now, &mut rng).await);
    // Last: it commits.
    let ([extended, whole, datafusion], counts) = slices_after_commits(&wh, &sites, now).await;
    report.push(String::new());
    report.push(format!(
        "Slices after a commit (one client, {} dashboards: 48 merchants right after each of 3 commits of ~1,900 new events for them (about 40 each) and the rollup run, each dashboard computed three ways in turn, equal answers asserted): slices extended from the previous snapshot's by the rows added {}; slices read whole {}; DataFusion {}. Extended = **{:.2}x** whole and **{:.2}x** DataFusion at p50 ({} slices extended, {} read whole).",
        extended.len(),
        p50_p99(&extended),
        p50_p99(&whole),
        p50_p99(&datafusion),
        pct(&extended, 0.5) / pct(&whole, 0.5).max(1e-9),
        pct(&extended, 0.5) / pct(&datafusion, 0.5).max(1e-9),
        counts.extended,
        counts.loaded
    ));
    println!("{}", report.join("\n"));
}

/// The HTTP section of the report: closed and open loop, cold and realistic, and DuckDB.
async fn over_http(
    wh: Arc<Warehouse>,
    sites: Arc<Vec<Site>>,
    data_dir: &std::path::Path,
    now: chrono::DateTime<chrono::Utc>,
    rng: &mut StdRng,
) -> Vec<String> {
    use http::Mix;
    let nats_dir = tempfile::tempdir().expect("tempdir");
    let server = http::start(wh, &sites, nats_dir.path()).await;
    let today = now.date_naive();
    let client = reqwest::Client::new();
    let mut report = vec![
        String::new(),
        "Over HTTP (metrics API server with its result cache, on its own query runtime; read tokens in nats-server):".into(),
        String::new(),
        "| mix | load | dashboards | dashboards/s | p50 ms | p99 ms | answers from cache | late (>10 s) or refused |".into(),
        "|---|---|---|---|---|---|---|---|".into(),
    ];
    let row = |mix: Mix, load: String, m: &http::Measured| {
        format!(
            "| {} | {load} | {} | {:.1} | {:.1} | {:.1} | {:.0}% | {} |",
            mix.name(),
            m.dashboards,
            m.per_s,
            m.p50,
            m.p99,
            100.0 * m.hit_rate,
            m.late
        )
    };
    let per_client_total = env("BEACON_BENCH_HTTP_DASHBOARDS", 256);
    for mix in [Mix::Cold, Mix::Realistic] {
        for clients in [1usize, 64] {
            let per_client = (per_client_total / clients).max(4);
            let m = http::closed_loop(&server, &sites, mix, clients, per_client, today).await;
            report.push(row(mix, format!("{clients} clients"), &m));
            eprintln!("{}", report.last().map_or("", String::as_str));
        }
    }
    let secs = env("BEACON_BENCH_OPEN_SECS", 10) as f64;
    for mix in [Mix::Cold, Mix::Realistic] {
        let mut rate = 10.0;
        loop {
            let m = http::open_loop(&server, &sites, mix, rate, secs, today).await;
            report.push(row(mix, format!("{rate:.0}/s open loop"), &m));
            eprintln!("{}", report.last().map_or("", String::as_str));
            if m.late > 0 || m.p99 > 1000.0 || rate >= 1280.0 {
                break;
            }
            rate *= 2.0;
        }
    }

    // DuckDB over the same Parquet files of `events`, against Beacon over HTTP for the same
    // (cold) dashboards, one client.
    let mut dashes = Vec::new();
    let mut beacon_ms = Vec::new();
    let mut beacon_rows = Vec::new();
    for i in 0..41 {
        let d = http::Dash {
            merchant: pick_index(rng, sites.len()),
            ends_days_ago: i,
            // Not a range the loops above ask for: nothing cached.
            days: 29,
        };
        http::asked(&d);
        let to = today - chrono::Duration::days(d.ends_days_ago);
        let from = to - chrono::Duration::days(d.days - 1);
        dashes.push((
            sites[d.merchant].merchant_id.clone(),
            format!("{from}T00:00:00Z"),
            format!("{}T00:00:00Z", to + chrono::Duration::days(1)),
        ));
        let bodies = http::bodies(&d, &sites, today);
        // After the overload of the open loop the server may still refuse for a while:
        // the first of these waits until it answers again (at most a minute).
        let mut ms = 0.0;
        for attempt in 0..600 {
            let t = Instant::now();
            match http::dashboard(&client, &server.base, &server.tokens[d.merchant], &bodies).await
            {
                Some(_) => {
                    ms = t.elapsed().as_secs_f64() * 1000.0;
                    break;
                }
                None if attempt < 599 => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await
                }
                None => panic!("the API still refuses after a minute"),
            }
        }
        let mut rows = Vec::new();
        for b in &bodies {
            let v: serde_json::Value = client
                .post(format!("{}/api/v2/query", server.base))
                .bearer_auth(&server.tokens[d.merchant])
                .body(b.clone())
                .send()
                .await
                .expect("request")
                .json()
                .await
                .expect("json");
            rows.push(v["results"].as_array().map_or(0, Vec::len));
        }
        if i > 0 {
            beacon_ms.push(ms);
            beacon_rows.push(rows);
        }
    }
    report.push(String::new());
    match http::duckdb(data_dir, &dashes) {
        Some((mut duck_ms, duck_rows)) => {
            beacon_ms.sort_by(f64::total_cmp);
            duck_ms.sort_by(f64::total_cmp);
            let same = beacon_rows
                .iter()
                .zip(&duck_rows)
                .filter(|(a, b)| a == b)
                .count();
            report.push(format!(
                "DuckDB peer (same four queries over the same `events` Parquet files, one client, {} cold dashboards): \
                 DuckDB {}; Beacon over HTTP, cold, same dashboards: {}: \
                 DuckDB's p50 is **{:.1}x** Beacon's. Row counts equal for {same} of {} dashboards.",
                duck_ms.len(),
                p50_p99(&duck_ms),
                p50_p99(&beacon_ms),
                pct(&duck_ms, 0.5) / pct(&beacon_ms, 0.5).max(1e-9),
                beacon_rows.len().min(duck_rows.len()),
            ));
        }
        None => report.push(
            "DuckDB peer: not run (`duckdb` missing from the venv: scripts/setup.sh installs it)."
                .into(),
        ),
    }
    report
}
