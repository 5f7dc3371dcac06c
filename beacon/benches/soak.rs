//! Soak benchmark: commits like production for a long time, with maintenance off and then on,
//! over the same traffic in one run. Each simulated second is one ingest commit of realistic
//! multi-merchant traffic (through core-ingest's `Writer`: `raw_events` and `events`
//! concurrently, with their watermarks); every 30 commits the rollups run; with maintenance on, `maintain` runs over every table every
//! `BEACON_SOAK_MAINTAIN_EVERY` commits. At the start and at the end it reports file counts and
//! bytes per table, manifests and metadata JSON size, ingest commit latency p50/p99, rollup run
//! time, and a dashboard's p50/p99 (the metrics API's four dashboard panels).
//!
//!     cargo bench -p beacon --bench soak                      # 3,600 commits of 250 events
//!     BEACON_SOAK_MAINTAIN_EVERY=120 BEACON_SOAK_RETAIN=300   # the defaults, in commits
//!     BEACON_SOAK_COMMITS=600 cargo bench -p beacon --bench soak
//!
//! Everything runs in one process, one step after another (maintenance never overlaps a
//! commit here, so unreferenced files are deleted at once and snapshots kept by count only).
//! Prints a Markdown report; docs/BENCHMARKS.md records it.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use beacon::traffic::{self, TrafficConfig};
use beacon_ingest::convert::Received;
use beacon_proto::envelope::ENVELOPE_VERSION;
use beacon_proto::{Envelope, Event};
use beacon_query::metrics::{Plan, QueryRequest};
use beacon_warehouse::maintain::{self, MaintainOptions};
use beacon_warehouse::{rollup, TableKind, Warehouse};
use common::{env_usize, pct};
use serde_json::json;

const ROLLUP_EVERY: usize = 30;

/// Figures over one window of commits.
#[derive(Default, Clone)]
struct Figures {
    /// (table, files, bytes, manifests, metadata JSON bytes)
    tables: Vec<(&'static str, u64, u64, u64, u64)>,
    commit_p50: f64,
    commit_p99: f64,
    rollup_ms: f64,
    dash_p50: f64,
    dash_p99: f64,
}

impl Figures {
    fn files(&self) -> u64 {
        self.tables.iter().map(|t| t.1).sum()
    }
    fn bytes(&self) -> u64 {
        self.tables.iter().map(|t| t.2).sum()
    }
    fn manifests(&self) -> u64 {
        self.tables.iter().map(|t| t.3).sum()
    }
    fn metadata(&self) -> u64 {
        self.tables.iter().map(|t| t.4).sum()
    }
}

fn dashboard(merchant: &str, now: chrono::DateTime<chrono::Utc>) -> Vec<Plan> {
    [
        json!({"metrics": ["visitors", "pageviews"], "dimensions": ["time:hour"], "date_range": "day"}),
        json!({"metrics": ["visitors", "pageviews"], "dimensions": ["event:page"], "pagination": {"limit": 10}, "date_range": "day"}),
        json!({"metrics": ["visitors"], "dimensions": ["visit:source"], "pagination": {"limit": 10}, "date_range": "day"}),
        json!({"metrics": ["visitors"], "dimensions": ["visit:country"], "pagination": {"limit": 10}, "date_range": "day"}),
    ]
    .into_iter()
    .map(|mut q| {
        q["site_id"] = json!(merchant);
        let req: QueryRequest = serde_json::from_value(q).expect("request");
        req.plan(merchant, chrono_tz::Tz::UTC, now).expect("plan")
    })
    .collect()
}

async fn dashboards(
    wh: &Arc<Warehouse>,
    merchants: &[String],
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<f64> {
    let budget = beacon_query::budget::Budget::new(beacon_query::budget::QueryLimits {
        concurrent_per_merchant: 1024,
        concurrent_total: 1024,
        ..Default::default()
    });
    // As the API keeps them: a merchant's first dashboard here builds its session.
    let sessions = beacon_query::metrics::MerchantSessions::new(wh.clone());
    let mut times = Vec::new();
    for m in merchants {
        let started = Instant::now();
        for plan in dashboard(m, now) {
            let ctx = sessions
                .budgeted(&budget, &plan.merchant_id)
                .await
                .expect("session");
            beacon_query::metrics::execute(&ctx, &plan, &plan.sources())
                .await
                .expect("query");
        }
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    times
}

async fn table_figures(wh: &Warehouse) -> Vec<(&'static str, u64, u64, u64, u64)> {
    let dry = MaintainOptions {
        dry_run: true,
        ..Default::default()
    };
    let mut out = Vec::new();
    for kind in TableKind::ALL {
        let r = maintain::maintain_table(wh, kind, &dry, &|_, _, _, _| {})
            .await
            .expect("stats");
        let table = wh.table(kind).await.expect("table");
        let metadata = table
            .metadata_location()
            .map(|l| l.trim_start_matches("file://").to_string())
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len());
        out.push((
            kind.name(),
            r.files_before,
            r.bytes_before,
            r.manifests_before,
            metadata,
        ));
    }
    out
}

/// What both phases run.
struct Soak<'a> {
    events: &'a [Event],
    commits: usize,
    rows: usize,
    window: usize,
    /// The commit after which the "start" figures are taken.
    start_at: usize,
    retain_commits: usize,
    merchants: &'a [String],
    now: chrono::DateTime<chrono::Utc>,
}

/// One phase over a fresh warehouse; returns (start, end, seconds spent in maintenance).
async fn phase(soak: &Soak<'_>, maintain_every: Option<usize>) -> (Figures, Figures, f64) {
    let Soak {
        events,
        commits,
        rows,
        window,
        start_at,
        retain_commits,
        merchants,
        now,
    } = *soak;
    let dir = tempfile::Builder::new()
        .prefix("beacon-soak-")
        .tempdir()
        .expect("tempdir");
    let wh = Arc::new(Warehouse::open(dir.path()).await.expect("warehouse"));
    // core-ingest's own writer: the tables it commits, concurrently, with their watermarks.
    let mut writer = beacon_ingest::Writer::open(wh.clone(), beacon_proto::bus::Partition::WHOLE)
        .await
        .expect("writer");
    // The soak cycles through one generated day, so its event ids repeat by design: they
    // are new events here, not retries.
    writer.dedupe = beacon_ingest::dedupe::Dedupe::new(Duration::ZERO);
    // Simulated time runs faster than the clock: retention is counted in commits (one per
    // simulated second) instead.
    let options = MaintainOptions {
        retain: Duration::ZERO,
        retain_last: retain_commits,
        orphan_age: Duration::ZERO,
        ..Default::default()
    };
    let mut commit_ms = Vec::new();
    let mut rollup_ms = Vec::new();
    let mut maintain_s = 0.0;
    let mut start = Figures::default();
    for i in 0..commits {
        let from = (i * rows) % events.len();
        let slice = &events[from..(from + rows).min(events.len())];
        let seq = i as u64 + 1;
        let received = Received::new(
            seq,
            Envelope {
                v: ENVELOPE_VERSION,
                batch_id: format!("soak:{seq}"),
                merchant_id: String::new(),
                edge_id: "soak".into(),
                received_at: 0,
                pipeline: None,
                raw: slice.to_vec(),
                processed: None,
                canary: None,
                failures: Vec::new(),
                shares: Vec::new(),
            },
        );
        let started = Instant::now();
        writer.commit(vec![received]).await.expect("commit");
        commit_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        if (seq as usize).is_multiple_of(ROLLUP_EVERY) {
            let started = Instant::now();
            rollup::run_once(&wh).await.expect("rollup");
            rollup_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        // Measured before this commit's maintenance: the worst point of a maintenance cycle.
        if seq as usize == start_at || seq as usize == commits {
            let recent = &mut commit_ms[commit_ms.len().saturating_sub(window)..].to_vec();
            recent.sort_by(f64::total_cmp);
            let rolls = &rollup_ms[rollup_ms
                .len()
                .saturating_sub((window / ROLLUP_EVERY).max(1))..];
            let dash = dashboards(&wh, merchants, now).await;
            let figures = Figures {
                tables: table_figures(&wh).await,
                commit_p50: pct(recent, 0.5),
                commit_p99: pct(recent, 0.99),
                rollup_ms: rolls.iter().sum::<f64>() / rolls.len().max(1) as f64,
                dash_p50: pct(&dash, 0.5),
                dash_p99: pct(&dash, 0.99),
            };
            if seq as usize == start_at {
                start = figures;
            } else {
                eprintln!("phase done: maintenance {}", maintain_every.is_some());
                return (start, figures, maintain_s);
            }
        }
        if let Some(every) = maintain_every {
            if (seq as usize).is_multiple_of(every) {
                let started = Instant::now();
                maintain::maintain(&wh, &TableKind::ALL, &options, &|_, _, _, _| {})
                    .await
                    .expect("maintain");
                maintain_s += started.elapsed().as_secs_f64();
            }
        }
        if seq.is_multiple_of(300) {
            eprintln!(
                "{seq}/{commits} commits (maintenance {})",
                maintain_every.is_some()
            );
        }
    }
    (start.clone(), start, maintain_s)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let commits = env_usize("BEACON_SOAK_COMMITS", 3600);
    let rows = env_usize("BEACON_SOAK_ROWS", 250);
    let merchants = env_usize("BEACON_SOAK_MERCHANTS", 200);
    let window = env_usize("BEACON_SOAK_WINDOW", 120)
        .min(commits / 2)
        .max(ROLLUP_EVERY);
    let maintain_every = env_usize("BEACON_SOAK_MAINTAIN_EVERY", 120);
    // `beacon up`'s defaults: maintenance every 120 s, snapshots kept for 300 s.
    let retain = env_usize("BEACON_SOAK_RETAIN", 300).max(1);
    let dashboards_n = env_usize("BEACON_SOAK_DASHBOARDS", 40);

    // 2026-11-02T00:00:00Z: one day of traffic, in time order, cycled if too short.
    let start_ms = 1_793_577_600_000;
    let sites = traffic::sites(merchants, |i| format!("soak-{i}"));
    let config = TrafficConfig {
        seed: 11,
        events: commits * rows,
        start_ms,
        days: 1,
        zipf_s: 1.0,
        late_share: 0.0,
    };
    // Arrival order is time order, and each commit is one simulated second: events get the
    // time of the second they are committed in (a visit's events spread out; nothing here
    // reads visits), so the run covers `commits` seconds of one day.
    let mut events = traffic::events_in_time_order(&config, &sites);
    for (i, e) in events.iter_mut().enumerate() {
        e.ts = start_ms + (i / rows) as i64 * 1000 + ((i % rows) * 1000 / rows) as i64;
    }
    let now = chrono::DateTime::from_timestamp_millis(start_ms + 12 * 3_600_000).expect("now");
    // "Start" once the snapshot retention has filled (steady state), at a maintenance point.
    let start_at = retain.max(window).div_ceil(maintain_every) * maintain_every;
    assert!(
        start_at < commits,
        "BEACON_SOAK_COMMITS must be past the retention ({start_at} commits)"
    );
    let who: Vec<String> = (0..dashboards_n)
        .map(|i| sites[i % sites.len().min(20)].merchant_id.clone())
        .collect();

    let soak = Soak {
        events: &events,
        commits,
        rows,
        window,
        start_at,
        retain_commits: retain,
        merchants: &who,
        now,
    };
    let (off_start, off_end, _) = phase(&soak, None).await;
    let (on_start, on_end, maintain_s) = phase(&soak, Some(maintain_every)).await;

    let ratio = |a: f64, b: f64| if a > 0.0 { b / a } else { f64::NAN };
    let row = |name: &str, f: &dyn Fn(&Figures) -> f64, unit: &str| {
        format!(
            "| {name} | {:.1}{unit} | {:.1}{unit} | **{:.2}x** | {:.1}{unit} | {:.1}{unit} | **{:.2}x** |",
            f(&off_start),
            f(&off_end),
            ratio(f(&off_start), f(&off_end)),
            f(&on_start),
            f(&on_end),
            ratio(f(&on_start), f(&on_end)),
        )
    };
    println!(
        "\n{commits} commits of {rows} events ({} events, {merchants} merchants), rollups every {ROLLUP_EVERY} commits, maintenance every {maintain_every} commits when on (keeping the last {retain} snapshots); start = after commit {start_at}, end = after commit {commits}, both just before that commit's maintenance (latencies and rollup times over the last {window} commits before each). Dashboards: the four panels over the current day.\n",
        commits * rows
    );
    println!(
        "| figure | off: start | off: end | off: end/start | on: start | on: end | on: end/start |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "{}",
        row("data files (all tables)", &|f| f.files() as f64, "")
    );
    println!(
        "{}",
        row(
            "data MiB (all tables)",
            &|f| f.bytes() as f64 / 1048576.0,
            ""
        )
    );
    println!(
        "{}",
        row("manifests (all tables)", &|f| f.manifests() as f64, "")
    );
    println!(
        "{}",
        row(
            "metadata JSON KiB (all tables)",
            &|f| f.metadata() as f64 / 1024.0,
            ""
        )
    );
    println!("{}", row("ingest commit p50", &|f| f.commit_p50, " ms"));
    println!("{}", row("ingest commit p99", &|f| f.commit_p99, " ms"));
    println!("{}", row("rollup run", &|f| f.rollup_ms, " ms"));
    println!("{}", row("dashboard p50", &|f| f.dash_p50, " ms"));
    println!("{}", row("dashboard p99", &|f| f.dash_p99, " ms"));
    println!("\nPer table at the end (files / manifests / metadata KiB), off vs on:\n");
    println!("| table | off | on |");
    println!("|---|---|---|");
    for (off, on) in off_end.tables.iter().zip(&on_end.tables) {
        println!(
            "| {} | {} / {} / {:.0} | {} / {} / {:.0} |",
            off.0,
            off.1,
            off.3,
            off.4 as f64 / 1024.0,
            on.1,
            on.3,
            on.4 as f64 / 1024.0
        );
    }
    println!("\nTime spent in maintenance (on): {maintain_s:.1} s in all.");
}
