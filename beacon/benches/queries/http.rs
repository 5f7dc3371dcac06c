//! The dashboard over real HTTP: the metrics API server (`beacon_query::api::serve`, with
//! its result cache, token directory and budget) on a query runtime of its own, as
//! `beacon api` runs it, with read tokens in a real nats-server's merchants bucket.
//!
//! Two request mixes, named in the report:
//! - **cold**: every dashboard is for a (merchant, 30-day range) never asked before, so
//!   nothing can come from the cache;
//! - **realistic**: a dashboard is computed once per rollup commit (every 30 s by default)
//!   and seen by three viewers in that window: one request in three is a new dashboard,
//!   the other two repeat one of the last 64 new ones (in flight or answered).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use beacon::traffic::Site;
use beacon_warehouse::Warehouse;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::{panels, pct, pick_index};

/// A dashboard: a merchant, and its range as `[from, to]` dates.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Dash {
    pub merchant: usize,
    pub ends_days_ago: i64,
    pub days: i64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    Cold,
    Realistic,
}

impl Mix {
    pub fn name(self) -> &'static str {
        match self {
            Mix::Cold => "cold",
            Mix::Realistic => "realistic",
        }
    }
}

/// Every new dashboard drawn in this run: the server's cache lives across the bench's
/// phases, so "new" has to mean never asked in the whole run.
static SEEN: std::sync::Mutex<Option<HashSet<Dash>>> = std::sync::Mutex::new(None);

/// Draws dashboards for a mix: new ones never repeat a (merchant, range) drawn before.
pub struct Draw {
    mix: Mix,
    rng: StdRng,
    recent: VecDeque<Dash>,
}

impl Draw {
    pub fn new(mix: Mix, seed: u64) -> Self {
        Self {
            mix,
            rng: StdRng::seed_from_u64(seed),
            recent: VecDeque::new(),
        }
    }

    pub fn next(&mut self, sites: &[Site]) -> Dash {
        if self.mix == Mix::Realistic && !self.recent.is_empty() && self.rng.random_bool(2.0 / 3.0)
        {
            let i = self.rng.random_range(0..self.recent.len());
            return self.recent[i].clone();
        }
        loop {
            let merchant = pick_index(&mut self.rng, sites.len());
            let d = Dash {
                merchant,
                ends_days_ago: self.rng.random_range(0..60),
                days: 30,
            };
            let new = SEEN
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(HashSet::new)
                .insert(d.clone());
            if new {
                self.recent.push_back(d.clone());
                if self.recent.len() > 64 {
                    self.recent.pop_front();
                }
                return d;
            }
        }
    }
}

/// The four panels' request bodies for `d`.
pub fn bodies(d: &Dash, sites: &[Site], today: chrono::NaiveDate) -> Vec<String> {
    let to = today - chrono::Duration::days(d.ends_days_ago);
    let from = to - chrono::Duration::days(d.days - 1);
    let range = json!([from.to_string(), to.to_string()]);
    let site = &sites[d.merchant].merchant_id;
    panels()
        .into_iter()
        .map(|mut q| {
            q["site_id"] = json!(site);
            q["date_range"] = range.clone();
            q.to_string()
        })
        .collect()
}

/// The API server and what a client needs to call it.
pub struct Server {
    pub base: String,
    pub tokens: Arc<Vec<String>>,
    _runtime: beacon_query::runtime::QueryRuntime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _nats: beacon::nats::NatsServer,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Registers every site as a merchant with a read token, and starts the API.
pub async fn start(wh: Arc<Warehouse>, sites: &[Site], nats_dir: &std::path::Path) -> Server {
    let nats = beacon::nats::NatsServer::start(nats_dir).expect("nats-server");
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let store = beacon_edge::registry::open_bucket(&js)
        .await
        .expect("merchants bucket");
    let mut tokens = Vec::with_capacity(sites.len());
    for chunk in sites.chunks(256) {
        let made = futures::future::join_all(chunk.iter().map(|s| {
            let store = store.clone();
            async move {
                let merchant = beacon_proto::bus::Merchant {
                    id: s.merchant_id.clone(),
                    name: s.host.clone(),
                    write_key_sha256: beacon_edge::registry::hash_write_key(&format!(
                        "bk_bench_{}",
                        s.merchant_id
                    )),
                    server_key_sha256: None,
                    created_at: 0,
                    timezone: None,
                    trackers: Default::default(),
                    limits: None,
                };
                beacon_edge::registry::create_merchant(&store, &merchant)
                    .await
                    .expect("merchant");
                beacon_query::tokens::create(&store, &s.merchant_id)
                    .await
                    .expect("token")
            }
        }))
        .await;
        tokens.extend(made);
    }
    let runtime = beacon_query::runtime::QueryRuntime::new(Default::default()).expect("runtime");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let budget = beacon_query::budget::Budget::new(beacon_query::budget::QueryLimits {
        concurrent_per_merchant: 1024,
        concurrent_total: 1024,
        ..Default::default()
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        beacon_query::api::serve(
            listener,
            wh,
            js,
            budget,
            beacon_query::cache::CacheLimits::default(),
            beacon_serve::Health::new(),
            async move {
                let _ = stopped.await;
            },
        )
        .await
    });
    Server {
        base,
        tokens: Arc::new(tokens),
        _runtime: runtime,
        stop: Some(stop),
        _nats: nats,
    }
}

/// One dashboard: its four queries in turn, as the bench's in-process runs do. Returns
/// how many of them the cache answered, or `None` when the server refused one (429/503, or
/// a connection closed over the cap).
pub async fn dashboard(
    http: &reqwest::Client,
    server_base: &str,
    token: &str,
    bodies: &[String],
) -> Option<usize> {
    let mut hits = 0;
    for body in bodies {
        let resp = http
            .post(format!("{server_base}/api/v2/query"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        // A connection over the per-address cap is answered 429 and closed as it is
        // accepted, which a pooled client may see as a broken response: refused too.
        let Ok(resp) = resp else { return None };
        let status = resp.status();
        hits += usize::from(
            resp.headers()
                .get(beacon_query::api::CACHE_HEADER)
                .is_some_and(|v| v == "hit"),
        );
        let Ok(text) = resp.text().await else {
            return None;
        };
        // Past the connection caps or the query slots the server refuses (and says when
        // to retry): the open loop counts that, it is not a failure of the bench.
        if status == 429 || status == 503 {
            return None;
        }
        assert!(status.is_success(), "{status}: {text}");
        let v: Value = serde_json::from_str(&text).expect("json");
        assert!(v["results"].is_array(), "{text}");
    }
    Some(hits)
}

pub struct Measured {
    pub dashboards: usize,
    pub per_s: f64,
    pub p50: f64,
    pub p99: f64,
    pub hit_rate: f64,
    pub late: usize,
}

/// `clients` concurrent clients, each opening `per_client` dashboards back to back.
pub async fn closed_loop(
    server: &Server,
    sites: &Arc<Vec<Site>>,
    mix: Mix,
    clients: usize,
    per_client: usize,
    today: chrono::NaiveDate,
) -> Measured {
    let http = reqwest::Client::new();
    let draw = Arc::new(std::sync::Mutex::new(Draw::new(mix, 11 + clients as u64)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, draw, sites) = (http.clone(), draw.clone(), sites.clone());
        let (base, tokens) = (server.base.clone(), server.tokens.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..per_client {
                let d = draw.lock().expect("draw").next(&sites);
                let bodies = bodies(&d, &sites, today);
                let t = Instant::now();
                let hits = dashboard(&http, &base, &tokens[d.merchant], &bodies)
                    .await
                    .expect("refused in the closed loop");
                out.push((t.elapsed().as_secs_f64() * 1000.0, hits));
            }
            out
        }));
    }
    let mut lat = Vec::new();
    let mut hits = 0;
    for t in tasks {
        for (ms, h) in t.await.expect("client") {
            lat.push(ms);
            hits += h;
        }
    }
    summarize(lat, hits, 0, started.elapsed().as_secs_f64())
}

/// Marks `d` as asked (so no later draw calls it new).
pub fn asked(d: &Dash) {
    SEEN.lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashSet::new)
        .insert(d.clone());
}

fn summarize(mut lat: Vec<f64>, hits: usize, late: usize, secs: f64) -> Measured {
    lat.sort_by(f64::total_cmp);
    Measured {
        dashboards: lat.len(),
        per_s: lat.len() as f64 / secs.max(1e-9),
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
        hit_rate: hits as f64 / (4 * lat.len()).max(1) as f64,
        late,
    }
}

/// Dashboards arriving at `rate` per second (Poisson) for `secs`, whatever the latency
/// (open loop: a slow answer does not slow the arrivals). Latency counts from the
/// scheduled arrival, so queueing is included; a dashboard not answered within 10 s counts
/// as late (and at 10 s in the percentiles).
pub async fn open_loop(
    server: &Server,
    sites: &Arc<Vec<Site>>,
    mix: Mix,
    rate: f64,
    secs: f64,
    today: chrono::NaiveDate,
) -> Measured {
    let http = reqwest::Client::new();
    let mut draw = Draw::new(mix, 1000 + rate as u64);
    let mut rng = StdRng::seed_from_u64(rate as u64);
    let start = tokio::time::Instant::now();
    let mut at = 0.0f64;
    let mut tasks = Vec::new();
    while at < secs {
        // Exponential inter-arrival times.
        let u: f64 = rng.random_range(f64::EPSILON..1.0);
        at += -u.ln() / rate;
        let due = start + Duration::from_secs_f64(at);
        let d = draw.next(sites);
        let bodies = bodies(&d, sites, today);
        let (http, base, token) = (
            http.clone(),
            server.base.clone(),
            server.tokens[d.merchant].clone(),
        );
        tokio::time::sleep_until(due).await;
        tasks.push(tokio::spawn(async move {
            let answered = tokio::time::timeout(
                Duration::from_secs(10),
                dashboard(&http, &base, &token, &bodies),
            )
            .await;
            let ms = due.elapsed().as_secs_f64() * 1000.0;
            match answered {
                Ok(Some(hits)) => (ms, hits, false),
                Ok(None) | Err(_) => (10_000.0, 0, true),
            }
        }));
    }
    let mut lat = Vec::new();
    let (mut hits, mut late) = (0, 0);
    for t in tasks {
        let (ms, h, l) = t.await.expect("dashboard");
        lat.push(ms);
        hits += h;
        late += usize::from(l);
    }
    // The offered rate over the arrival window (the drain after it is not throughput).
    let mut m = summarize(lat, hits, late, secs);
    m.per_s = m.dashboards as f64 / secs;
    m
}

/// DuckDB (from PyPI, in the test venv) answering the same four queries over the same
/// Parquet files of `events`, one dashboard at a time: per-dashboard latencies (ms) and
/// each dashboard's row counts. `None` when DuckDB is not installed.
pub fn duckdb(
    data_dir: &std::path::Path,
    dashes: &[(String, String, String)],
) -> Option<(Vec<f64>, Vec<Vec<usize>>)> {
    let home = std::path::PathBuf::from(std::env::var_os("HOME")?);
    let venv = std::env::var_os("BEACON_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| home.join(".cache/beacon/venv"));
    let python = venv.join("bin/python");
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(DUCKDB_SCRIPT)
        .arg(data_dir)
        .arg(serde_json::to_string(dashes).ok()?)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "DuckDB peer skipped: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let lat = v["ms"]
        .as_array()?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    let rows = v["rows"]
        .as_array()?
        .iter()
        .map(|r| {
            r.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_u64)
                        .map(|n| n as usize)
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect();
    Some((lat, rows))
}

const DUCKDB_SCRIPT: &str = r#"
import duckdb, glob, json, sys, time
data, dashes = sys.argv[1], json.loads(sys.argv[2])
# Every data file of `events`: right here because the bench only appends (after a replace
# commit, files no snapshot references would be read too).
files = glob.glob(f"{data}/warehouse/**/events/data/**/*.parquet", recursive=True)
con = duckdb.connect()
con.execute("SET TimeZone = 'UTC'")
con.execute("SET threads = 2")
con.execute(f"CREATE VIEW events AS SELECT * FROM read_parquet({files!r})")
scope = "merchant_id = $m AND ts >= CAST($f AS TIMESTAMPTZ) AND ts < CAST($t AS TIMESTAMPTZ)"
panels = [
    f"SELECT strftime(date_trunc('day', ts), '%Y-%m-%d') AS d, count(DISTINCT visitor_id), count(*) FILTER (WHERE name = 'pageview') FROM events WHERE {scope} GROUP BY 1 ORDER BY 1",
    f"SELECT path, count(DISTINCT visitor_id) AS v, count(*) FILTER (WHERE name = 'pageview') FROM events WHERE {scope} AND path IS NOT NULL AND path <> '' GROUP BY 1 ORDER BY v DESC, 1 LIMIT 10",
    f"SELECT source, count(DISTINCT visitor_id) AS v FROM events WHERE {scope} AND source IS NOT NULL AND source <> '' GROUP BY 1 ORDER BY v DESC, 1 LIMIT 10",
    f"SELECT country, count(DISTINCT visitor_id) AS v FROM events WHERE {scope} AND country IS NOT NULL AND country <> '' GROUP BY 1 ORDER BY v DESC, 1 LIMIT 10",
]
ms, rows = [], []
for i, (m, f, t) in enumerate(dashes):
    start = time.perf_counter()
    counts = [len(con.execute(p, {"m": m, "f": f, "t": t}).fetchall()) for p in panels]
    if i > 0:  # the first warms DuckDB's caches, as Beacon's warm-up does
        ms.append((time.perf_counter() - start) * 1000)
        rows.append(counts)
print(json.dumps({"ms": ms, "rows": rows}))
"#;
