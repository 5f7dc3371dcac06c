//! `beacon`: one binary, a subcommand per role.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use beacon::endpoints::Endpoints;
use clap::{Parser, Subcommand, ValueEnum};
#[cfg(feature = "full")]
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "beacon",
    version,
    about = "Self-hostable analytics backend: edge, ingest, warehouse, SQL"
)]
struct Cli {
    /// TOML file of settings (keys are the BEACON_* variables, see beacon/src/config.rs);
    /// flags and environment variables override it.
    #[arg(long, global = true, env = "BEACON_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve `/metrics` (Prometheus), `/healthz` and `/readyz` of this role on a listener
    /// of their own (port 0 picks a free one; the address is printed). `beacon up` and
    /// `beacon admin` also serve them on the admin port.
    #[arg(
        long,
        global = true,
        env = "BEACON_METRICS_LISTEN",
        value_name = "ADDR"
    )]
    metrics_listen: Option<SocketAddr>,
    #[cfg(feature = "full")]
    #[command(flatten)]
    store: beacon::store::StoreArgs,
    #[command(subcommand)]
    command: Command,
}

#[cfg(feature = "full")]
mod history_cmd;
mod plugin_cmd;

#[derive(Clone, Copy, ValueEnum, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
    Csv,
}

#[derive(Subcommand)]
// Parsed once at start-up: the size of the biggest variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// The whole pipeline on this machine: nats-server, edge, ingest and rollups.
    #[cfg(feature = "full")]
    Up {
        #[arg(long, env = "BEACON_DATA_DIR", default_value = ".beacon-data")]
        data_dir: PathBuf,
        /// Where the edge listens for RSocket over QUIC (port 0 picks a free one).
        #[arg(long, env = "BEACON_EDGE_LISTEN", default_value = "127.0.0.1:0")]
        edge_listen: SocketAddr,
        /// Use this NATS server instead of starting one.
        #[arg(long, env = "BEACON_NATS_URL", hide_env_values = true)]
        nats_url: Option<String>,
        /// Directory of example plugin components, shown in the start-up message.
        #[arg(long)]
        plugins_dir: Option<PathBuf>,
        /// Where the admin HTTP API listens.
        #[arg(long, env = "BEACON_ADMIN_LISTEN", default_value = "127.0.0.1:0")]
        admin_listen: SocketAddr,
        /// Where the metrics API listens.
        #[arg(long, env = "BEACON_API_LISTEN", default_value = "127.0.0.1:0")]
        api_listen: SocketAddr,
        /// Where SQL over the Postgres wire protocol listens.
        #[arg(long, env = "BEACON_SQL_LISTEN", default_value = "127.0.0.1:0")]
        sql_listen: SocketAddr,
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        tuning: Tuning,
        #[command(flatten)]
        sandbox: SandboxArgs,
        #[command(flatten)]
        edge: EdgeArgs,
        #[command(flatten)]
        query: QueryArgs,
        #[command(flatten)]
        maintain: MaintainArgs,
    },
    /// Edge role: RSocket/QUIC and HTTP collectors publishing to JetStream.
    Edge {
        #[arg(long, env = "BEACON_NATS_URL", hide_env_values = true)]
        nats_url: String,
        #[arg(long, env = "BEACON_DATA_DIR")]
        data_dir: PathBuf,
        #[arg(long, env = "BEACON_EDGE_LISTEN", default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[arg(long, env = "BEACON_EDGE_ID", default_value = "edge-1")]
        edge_id: String,
        /// `--nats-url` is this region's leaf nats-server (`beacon topology`): events are made
        /// durable there, what edges share is in the hub's JetStream domain (`hub`).
        #[arg(long, env = "BEACON_HUB_DOMAIN", value_name = "DOMAIN")]
        hub_domain: Option<String>,
        #[command(flatten)]
        sandbox: SandboxArgs,
        #[command(flatten)]
        edge: EdgeArgs,
    },
    /// Ingest role: JetStream -> Iceberg, exactly once.
    #[cfg(feature = "full")]
    Ingest {
        #[arg(long, env = "BEACON_NATS_URL", hide_env_values = true)]
        nats_url: String,
        #[arg(long, env = "BEACON_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        tuning: Tuning,
        #[command(flatten)]
        hub: HubArgs,
    },
    /// Warehouse role: keeps the hourly rollups current.
    #[cfg(feature = "full")]
    Rollup {
        #[arg(long, env = "BEACON_DATA_DIR")]
        data_dir: PathBuf,
        #[arg(
            long,
            env = "BEACON_ROLLUP_INTERVAL",
            default_value = "10",
            value_name = "SECONDS"
        )]
        interval: u64,
        #[command(flatten)]
        maintain: MaintainArgs,
    },
    /// Table maintenance, once: compact small files, fold rollup deltas, rewrite manifests,
    /// expire old snapshots, delete files nothing references. Safe while the pipeline runs
    /// (the warehouse role also runs it on a schedule: `--maintain-interval`).
    #[cfg(feature = "full")]
    Maintain {
        #[arg(long, env = "BEACON_DATA_DIR", default_value = ".beacon-data")]
        data_dir: PathBuf,
        /// Only these tables (repeatable; default: all).
        #[arg(long = "table", value_name = "TABLE")]
        tables: Vec<String>,
        /// Show what would be compacted; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        maintain: MaintainArgs,
    },
    /// Copy a stopped data directory (warehouse, catalog, bus store, keys) to a new
    /// directory that is itself a working data directory (`--data-dir <backup>` reads it).
    #[cfg(feature = "full")]
    Backup {
        #[arg(long, env = "BEACON_DATA_DIR", default_value = ".beacon-data")]
        data_dir: PathBuf,
        /// A new (or empty) directory.
        #[arg(long)]
        to: PathBuf,
    },
    /// Copy a backup into a new data directory and make it work there.
    #[cfg(feature = "full")]
    Restore {
        /// The backup (a directory `beacon backup` wrote).
        #[arg(long)]
        from: PathBuf,
        /// A new (or empty) directory.
        #[arg(long, env = "BEACON_DATA_DIR", default_value = ".beacon-data")]
        data_dir: PathBuf,
    },
    /// Make a data directory that was copied or moved by other means (cp, rsync, a volume
    /// snapshot) work where it is now: rewrites the absolute paths Iceberg recorded.
    #[cfg(feature = "full")]
    Relocate {
        #[arg(long, env = "BEACON_DATA_DIR", default_value = ".beacon-data")]
        data_dir: PathBuf,
    },
    /// Run SQL over the warehouse (tables: raw_events, events, failed_events, rollups_hourly,
    /// revenue_hourly, breakdowns_hourly, visits; views: rollups, revenue, sessions,
    /// daily_metrics).
    #[cfg(feature = "full")]
    Sql {
        query: String,
        #[arg(long, env = "BEACON_DATA_DIR", default_value = ".beacon-data")]
        data_dir: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Merchants and their write keys.
    Merchant {
        #[command(subcommand)]
        command: MerchantCommand,
    },
    /// Re-run stored pipeline versions over raw events and replace what they produced
    /// (`beacon reprocess history`: the audit trail).
    #[cfg(feature = "full")]
    Reprocess(history_cmd::ReprocessArgs),
    /// Remove a person's rows (by user or visitor id) from every table.
    #[cfg(feature = "full")]
    Forget(history_cmd::ForgetArgs),
    /// Processing plugins.
    Plugin {
        #[command(subcommand)]
        command: plugin_cmd::PluginCommand,
    },
    /// Metrics API: `POST /api/v2/query` (Plausible Stats API v2 shape), per-merchant read tokens.
    #[cfg(feature = "full")]
    Api {
        #[arg(long, env = "BEACON_NATS_URL", hide_env_values = true)]
        nats_url: String,
        #[arg(long, env = "BEACON_DATA_DIR")]
        data_dir: PathBuf,
        #[arg(long, env = "BEACON_API_LISTEN", default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Where SQL over the Postgres wire protocol listens (users: merchant ids with a read
        /// token as password, or admin token names with the secret).
        #[arg(long, env = "BEACON_SQL_LISTEN", default_value = "127.0.0.1:0")]
        sql_listen: SocketAddr,
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        query: QueryArgs,
    },
    /// Admin HTTP API: plugin registry and pipelines for operators' tools (admin tokens).
    Admin {
        #[arg(long, env = "BEACON_NATS_URL", hide_env_values = true)]
        nats_url: String,
        #[arg(long, env = "BEACON_DATA_DIR")]
        data_dir: PathBuf,
        #[arg(long, env = "BEACON_ADMIN_LISTEN", default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[command(flatten)]
        admin: AdminArgs,
        /// Uploads and activations are checked with these (use the edges' settings).
        #[command(flatten)]
        sandbox: SandboxArgs,
    },
    /// NATS beyond one machine: a replicated hub and a leaf server per edge region
    /// (docs/OPERATIONS.md, "Topology").
    Topology {
        #[command(subcommand)]
        command: TopologyCommand,
    },
    /// Send realistic demo traffic through the SDK to a running edge (also a load generator).
    Demo {
        #[arg(long, env = "BEACON_DATA_DIR", default_value = ".beacon-data")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        events: usize,
        #[arg(long, default_value_t = 3)]
        merchants: usize,
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Acknowledged batches in flight per merchant connection.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Attach this plugin component (with an empty config) to each demo merchant first.
        #[arg(long)]
        attach_plugin: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

/// Table maintenance (docs/ARCHITECTURE.md, "Commits and maintenance").
#[cfg(feature = "full")]
#[derive(clap::Args, Clone)]
struct MaintainArgs {
    /// Seconds between scheduled maintenance runs in the warehouse role (0: never).
    #[arg(long, env = "BEACON_MAINTAIN_INTERVAL", default_value_t = 120)]
    maintain_interval: u64,
    /// Snapshots younger than this many seconds are kept (time travel, readers in flight).
    #[arg(long, env = "BEACON_SNAPSHOT_RETAIN_SECS", default_value_t = 300)]
    snapshot_retain_secs: u64,
    /// At least this many snapshots per table are kept.
    #[arg(long, env = "BEACON_SNAPSHOT_RETAIN_LAST", default_value_t = 10)]
    snapshot_retain_last: usize,
    /// Unreferenced files younger than this many seconds are kept (a writer may be about to
    /// commit them). Below the longest write (a compaction, an ingest commit) this can delete
    /// files a concurrent writer is about to commit: use small values only when nothing else
    /// writes.
    #[arg(long, env = "BEACON_ORPHAN_AGE_SECS", default_value_t = 3600)]
    orphan_age_secs: u64,
    /// Most input MiB compacted into one file (bounds memory).
    #[arg(long, env = "BEACON_COMPACT_BIN_MB", default_value_t = 64)]
    compact_bin_mb: u64,
}

#[cfg(feature = "full")]
impl MaintainArgs {
    fn options(&self, dry_run: bool) -> beacon_warehouse::maintain::MaintainOptions {
        beacon_warehouse::maintain::MaintainOptions {
            dry_run,
            bin_bytes: self.compact_bin_mb.max(1) << 20,
            retain: Duration::from_secs(self.snapshot_retain_secs),
            retain_last: self.snapshot_retain_last.max(1),
            orphan_age: Duration::from_secs(self.orphan_age_secs),
            ..Default::default()
        }
    }

    /// The scheduled loop, when enabled, on a runtime of its own: one thread at low CPU
    /// priority, because compaction is seconds of CPU at a time (Parquet encoding inside
    /// futures) and must not hold a worker of the runtime that collects events.
    fn spawn(
        &self,
        wh: Arc<beacon_warehouse::Warehouse>,
        stop: watch::Receiver<bool>,
    ) -> Result<Option<Maintenance>> {
        if self.maintain_interval == 0 {
            return Ok(None);
        }
        let runtime = beacon_query::runtime::QueryRuntime::new(
            beacon_query::runtime::RuntimeSettings::background(),
        )?;
        let task = runtime.spawn(beacon_warehouse::maintain::run_loop(
            wh,
            Duration::from_secs(self.maintain_interval),
            self.options(false),
            stop,
        ));
        Ok(Some(Maintenance {
            task,
            _runtime: runtime,
        }))
    }
}

/// The scheduled maintenance task and the runtime it runs on (dropped after the task ends).
#[cfg(feature = "full")]
struct Maintenance {
    task: tokio::task::JoinHandle<()>,
    _runtime: beacon_query::runtime::QueryRuntime,
}

#[cfg(feature = "full")]
#[derive(clap::Args, Clone)]
struct Tuning {
    /// Seconds between rollup runs.
    #[arg(long, env = "BEACON_ROLLUP_INTERVAL", default_value_t = 10)]
    rollup_interval: u64,
    /// Longest an event waits in ingest before its Iceberg commit, in milliseconds.
    #[arg(long, env = "BEACON_INGEST_MAX_WAIT_MS", default_value_t = 1000)]
    ingest_max_wait_ms: u64,
    /// Most envelopes per Iceberg commit.
    #[arg(long, env = "BEACON_INGEST_MAX_BATCH", default_value_t = 2000)]
    ingest_max_batch: usize,
    /// Seconds an event id stays known to ingest: an event whose merchant and id were
    /// stored within this window (a tracker's regrouped retry) is not stored again. Costs
    /// memory per distinct id in the window, and a restart re-reads the window from the
    /// stream (docs/OPERATIONS.md). 0 turns per-event deduplication off.
    #[arg(long, env = "BEACON_DEDUPE_WINDOW_SECS", default_value_t = 3600)]
    dedupe_window_secs: u64,
}

/// What query work may cost: the metrics API and SQL run on their own runtime, apart from
/// collection, under these limits (docs/SQL.md, docs/METRICS-API.md).
#[cfg(feature = "full")]
#[derive(clap::Args, Clone)]
struct QueryArgs {
    /// Statement timeout of every query, and the most `SET statement_timeout` may ask.
    #[arg(long, env = "BEACON_QUERY_TIMEOUT_MS", default_value_t = 30_000)]
    query_timeout_ms: u64,
    /// Memory one query may hold (MiB); past it the query fails with a clear error.
    #[arg(long, env = "BEACON_QUERY_MEMORY_MB", default_value_t = 512)]
    query_memory_mb: usize,
    /// Memory all queries together may hold (MiB).
    #[arg(long, env = "BEACON_QUERY_MEMORY_TOTAL_MB", default_value_t = 2048)]
    query_memory_total_mb: usize,
    /// Queries running at once for one merchant (or admin login).
    #[arg(
        long,
        env = "BEACON_QUERY_CONCURRENT_PER_MERCHANT",
        default_value_t = 4
    )]
    query_concurrent_per_merchant: usize,
    /// Queries running at once in all.
    #[arg(long, env = "BEACON_QUERY_CONCURRENT_TOTAL", default_value_t = 32)]
    query_concurrent_total: usize,
    /// Threads of the query runtime (default: the number of cores; they run at a lower
    /// CPU priority than collection).
    #[arg(long, env = "BEACON_QUERY_THREADS")]
    query_threads: Option<usize>,
    /// Largest SQL text accepted (bytes).
    #[arg(long, env = "BEACON_SQL_MAX_BYTES", default_value_t = 64 * 1024)]
    sql_max_bytes: usize,
    /// SQL connections from one address.
    #[arg(long, env = "BEACON_SQL_MAX_CONNS_PER_IP", default_value_t = 32)]
    sql_max_conns_per_ip: usize,
    /// SQL connections in all.
    #[arg(long, env = "BEACON_SQL_MAX_CONNS", default_value_t = 512)]
    sql_max_conns: usize,
}

#[cfg(feature = "full")]
impl QueryArgs {
    fn limits(&self) -> beacon_query::budget::QueryLimits {
        let defaults = beacon_query::budget::QueryLimits::default();
        beacon_query::budget::QueryLimits {
            statement_timeout: Duration::from_millis(self.query_timeout_ms.max(1)),
            memory_per_query: self.query_memory_mb.max(1) << 20,
            memory_total: self.query_memory_total_mb.max(1) << 20,
            concurrent_per_merchant: self.query_concurrent_per_merchant.max(1),
            concurrent_total: self.query_concurrent_total.max(1),
            sql: beacon_query::sql_limits::SqlLimits {
                max_bytes: self.sql_max_bytes.max(1),
                ..defaults.sql
            },
            ..defaults
        }
    }

    fn listener(&self) -> beacon_query::pg::ListenerLimits {
        beacon_query::pg::ListenerLimits {
            max_conns_per_ip: self.sql_max_conns_per_ip.max(1),
            max_conns: self.sql_max_conns.max(1),
            ..Default::default()
        }
    }

    fn runtime(&self) -> beacon_query::runtime::RuntimeSettings {
        let defaults = beacon_query::runtime::RuntimeSettings::default();
        beacon_query::runtime::RuntimeSettings {
            threads: self.query_threads.unwrap_or(defaults.threads).max(1),
            ..defaults
        }
    }
}

#[derive(clap::Args, Clone)]
pub struct AdminArgs {
    /// Admin tokens, `name:secret,...` (secrets of 16+ characters). Without any, a token
    /// named `admin` is generated into `<data-dir>/admin-token` (mode 0600).
    #[arg(long, env = "BEACON_ADMIN_TOKENS", hide_env_values = true)]
    admin_tokens: Option<String>,
}

impl AdminArgs {
    fn tokens(&self, data_dir: &Path) -> Result<beacon_control::admin::AdminTokens> {
        use beacon_control::admin::AdminTokens;
        if let Some(spec) = &self.admin_tokens {
            return Ok(AdminTokens::parse(spec)?);
        }
        let path = data_dir.join("admin-token");
        // Whatever its history, the token file is readable by this user only.
        if path.exists() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("restricting {}", path.display()))?;
        }
        let secret = match std::fs::read_to_string(&path) {
            Ok(s) if s.trim().len() >= 16 => s.trim().to_string(),
            _ => {
                let secret = format!("ba_{}", beacon::secrets::random_hex::<24>());
                beacon::secrets::write_private(&path, &format!("{secret}\n"))
                    .with_context(|| format!("writing {}", path.display()))?;
                secret
            }
        };
        Ok(AdminTokens::parse(&format!("admin:{secret}"))?)
    }
}

/// The metrics API and the SQL endpoint, running on their own runtime.
#[cfg(feature = "full")]
struct QueryServers {
    api: SocketAddr,
    sql: SocketAddr,
    /// Ends when both servers have stopped.
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// Kept until the servers have stopped; dropping it stops what still runs on it.
    runtime: beacon_query::runtime::QueryRuntime,
}

#[cfg(feature = "full")]
impl QueryServers {
    /// Stops servers that were started but will not be used.
    async fn abandon(self) {
        self.task.abort();
        let runtime = self.runtime;
        let _ = tokio::task::spawn_blocking(move || drop(runtime)).await;
    }

    async fn wait(self) -> Result<()> {
        let result = self.task.await;
        // Dropped off the async context (a runtime must not be dropped inside another).
        let runtime = self.runtime;
        let _ = tokio::task::spawn_blocking(move || drop(runtime)).await;
        result??;
        Ok(())
    }
}

/// Serves the metrics API (HTTP) and SQL (Postgres wire protocol) on a query runtime of
/// their own (large stacks, lower CPU priority), so no query can delay collection.
#[cfg(feature = "full")]
async fn start_api(
    nats_url: &str,
    data_dir: &Path,
    (listen, sql_listen): (SocketAddr, SocketAddr),
    admin_tokens: beacon_control::admin::AdminTokens,
    query: &QueryArgs,
    health: beacon_serve::Health,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<QueryServers> {
    let runtime = beacon_query::runtime::QueryRuntime::new(query.runtime())
        .context("starting the query runtime")?;
    let (nats_url, data_dir) = (nats_url.to_string(), data_dir.to_path_buf());
    let (limits, listener_limits) = (query.limits(), query.listener());
    // One shutdown signal for both servers, crossing runtimes.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let started = runtime.spawn(async move {
        let warehouse = Arc::new(beacon::store::open(&data_dir).await?);
        let js = async_nats::jetstream::new(connect_bus(&nats_url, "beacon-up").await?);
        let merchants = registry_bucket(&js).await?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("metrics API: cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let sql_listener = tokio::net::TcpListener::bind(sql_listen)
            .await
            .with_context(|| format!("SQL: cannot listen on {sql_listen}"))?;
        let sql_addr = sql_listener.local_addr()?;
        let admin_tokens = Arc::new(admin_tokens);
        let budget = beacon_query::budget::Budget::new(limits);
        let sql = beacon_query::pg::SqlServer::new(
            warehouse.clone(),
            merchants.clone(),
            Arc::new(move |user: &str, password: &str| admin_tokens.check(password) == Some(user)),
            budget.clone(),
            listener_limits,
        );
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let http = tokio::spawn(beacon_query::api::serve(
            listener,
            warehouse,
            js,
            budget,
            beacon_query::cache::CacheLimits::default(),
            health,
            stopped(stop_rx.clone()),
        ));
        let pg = tokio::spawn(sql.serve(sql_listener, stopped(stop_rx)));
        let task = tokio::spawn(async move {
            let (a, b) = (http.await, pg.await);
            a.map_err(std::io::Error::other)??;
            b.map_err(std::io::Error::other)?
        });
        anyhow::Ok((addr, sql_addr, task))
    });
    let (api, sql, served) = started.await??;
    let task = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        served.await.map_err(std::io::Error::other)?
    });
    tracing::info!(%api, %sql, "metrics API (HTTP) and SQL (Postgres wire) listening on the query runtime");
    Ok(QueryServers {
        api,
        sql,
        task,
        runtime,
    })
}

/// Serves the admin API; returns its address and task.
async fn start_admin(
    nats_url: &str,
    data_dir: &Path,
    listen: SocketAddr,
    tokens: beacon_control::admin::AdminTokens,
    limits: beacon_plugins::SandboxLimits,
    health: &beacon_serve::Health,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let target = NatsTarget {
        nats_url: Some(nats_url.to_string()),
        data_dir: data_dir.to_path_buf(),
    };
    let control = plugin_cmd::control_with(&target, limits.clone()).await?;
    // History rewrites (re-processing, forgetting) where the warehouse is.
    #[cfg(feature = "full")]
    let extra = match history_cmd::JobService::open(&target, limits).await? {
        Some(jobs) => jobs.router(),
        None => axum::Router::new(),
    };
    #[cfg(not(feature = "full"))]
    let extra = axum::Router::new();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("admin API: cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(beacon_control::admin::serve(
        listener,
        control,
        tokens,
        extra,
        health.clone(),
        shutdown,
    ));
    tracing::info!(%addr, "admin API listening (HTTP)");
    Ok((addr, task))
}

/// Ingest on a hub that sources the edge regions' leaf streams.
#[cfg(feature = "full")]
#[derive(clap::Args, Clone)]
struct HubArgs {
    /// A region leaf's JetStream domain whose events stream the hub's stream sources
    /// (repeatable, or comma-separated; `beacon topology generate` prints them). Ingest
    /// creates or updates the hub's stream with these sources.
    #[arg(
        long = "source-domain",
        env = "BEACON_SOURCE_DOMAINS",
        value_delimiter = ',',
        value_name = "DOMAIN"
    )]
    sources: Vec<String>,
    /// Replicas of the hub's events stream (3 on a 3-node hub).
    #[arg(long, env = "BEACON_STREAM_REPLICAS", default_value_t = 1)]
    stream_replicas: usize,
    /// Split the events stream into this many partitions (by merchant), shared among all
    /// running ingest processes; a dead process's partitions are taken over. Can only grow;
    /// a process started with fewer follows what the tables record.
    #[arg(long, env = "BEACON_INGEST_PARTITIONS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    partitions: u32,
    /// This process's name on the partition leases (default: unique per process). Give a
    /// stable one (a StatefulSet pod's name) so a restarted process takes its partitions
    /// back at once; never the same to two running processes.
    #[arg(long, env = "BEACON_INGEST_ID", value_parser = ingest_id)]
    ingest_id: Option<String>,
}

/// A lease name: a NATS KV key token.
#[cfg(feature = "full")]
fn ingest_id(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
    if ok {
        Ok(s.to_string())
    } else {
        Err("1-128 characters of A-Z, a-z, 0-9, '-' and '_'".into())
    }
}

#[derive(Subcommand)]
enum TopologyCommand {
    /// Write the nats-server configurations of a hub and a leaf per region, for this
    /// machine (free loopback ports; edit the addresses for machines of their own).
    Generate {
        /// Where the configurations, `topology.json` and the servers' stores go.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        hub_nodes: usize,
        /// An edge region (repeatable); its leaf's JetStream domain is `edge-<region>`.
        #[arg(long = "region", required = true)]
        regions: Vec<String>,
        /// nats-server's `sync_interval`: `always` (fsync before acknowledging) or a
        /// duration such as `10s` (faster; acknowledged writes can be lost to power loss).
        #[arg(long, default_value = "always")]
        sync: String,
    },
    /// A TLS certificate for nats-servers on machines of their own or in Kubernetes, naming
    /// their hosts, signed by the CA in `--dir` (created when it has none): `ca.pem`,
    /// `server.pem`, `server-key.pem`. Every server presents it to clients, routes and leaf
    /// connections (docs/OPERATIONS.md, "Securing the bus").
    Certs {
        #[arg(long)]
        dir: PathBuf,
        /// A DNS name (wildcards such as `*.nats-hub.beacon.svc` too) or IP address the
        /// servers are reached at (repeatable).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
    },
    /// Start every server of a generated topology on this machine (a development harness);
    /// Ctrl-C stops them.
    Up {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Create every bucket and object store on the hub with `--replicas` (or raise theirs):
    /// run once the hub is up, best before the roles first start.
    Provision {
        /// The hub (any node, or every node comma-separated).
        #[arg(long, env = "BEACON_NATS_URL", hide_env_values = true)]
        nats_url: String,
        #[arg(long, default_value_t = 3)]
        replicas: usize,
    },
}

#[derive(Subcommand)]
enum MerchantCommand {
    /// Create a merchant; prints its id, its write key (for pages and apps: public) and its
    /// server key (for its own servers: secret, may set the edge's `$` properties).
    Create {
        name: String,
        /// IANA time zone of the merchant's reports (`Europe/Berlin`); UTC by default.
        #[arg(long)]
        timezone: Option<String>,
        #[command(flatten)]
        trackers: TrackerArgs,
        #[command(flatten)]
        limits: MerchantLimitArgs,
        #[command(flatten)]
        target: NatsTarget,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Add tracker identities to a merchant, or change its collection limits.
    Update {
        #[arg(long)]
        merchant: String,
        /// Identities to add.
        #[command(flatten)]
        trackers: TrackerArgs,
        #[command(flatten)]
        limits: MerchantLimitArgs,
        /// Remove the merchant's own limits (the edges' defaults apply).
        #[arg(long, conflicts_with_all = ["rate_limit", "daily_quota"])]
        default_limits: bool,
        #[command(flatten)]
        target: NatsTarget,
    },
    /// Give a merchant a new server key, replacing its old one; prints it.
    ServerKey {
        #[arg(long)]
        merchant: String,
        #[command(flatten)]
        target: NatsTarget,
    },
    /// Create a read token for a merchant's metrics API (`POST /api/v2/query`); prints it.
    #[cfg(feature = "full")]
    ReadToken {
        #[arg(long)]
        merchant: String,
        #[command(flatten)]
        target: NatsTarget,
    },
}

/// Plugin sandbox limits (defaults and their anchors: docs/PLUGINS.md).
#[derive(clap::Args, Clone, Copy)]
pub struct SandboxArgs {
    /// CPU budget per plugin call, in fuel (about one wasm instruction each).
    #[arg(long, env = "BEACON_PLUGIN_FUEL", default_value_t = 2_000_000_000)]
    plugin_fuel: u64,
    /// Wall-clock backstop per plugin call.
    #[arg(long, env = "BEACON_PLUGIN_TIMEOUT_MS", default_value_t = 2000)]
    plugin_timeout_ms: u64,
    /// Linear memory per plugin call.
    #[arg(long, env = "BEACON_PLUGIN_MEMORY_MB", default_value_t = 64)]
    plugin_memory_mb: usize,
    /// Largest component accepted.
    #[arg(long, env = "BEACON_PLUGIN_MAX_COMPONENT_KB", default_value_t = 8192)]
    plugin_max_component_kb: usize,
    /// Largest output of one call.
    #[arg(long, env = "BEACON_PLUGIN_MAX_OUTPUT_MB", default_value_t = 32)]
    plugin_max_output_mb: usize,
    /// Plugin calls running at once (the instance pool's size); more wait for a slot.
    #[arg(long, env = "BEACON_PLUGIN_CONCURRENT_CALLS", default_value_t = 32)]
    plugin_concurrent_calls: usize,
}

impl SandboxArgs {
    /// The limits, with out-of-range settings clamped: zero would fail every batch, and a
    /// shift past `usize` would wrap.
    pub fn limits(self) -> beacon_plugins::SandboxLimits {
        let mb = |v: usize| v.clamp(1, 1 << 20) << 20;
        beacon_plugins::SandboxLimits {
            fuel: self.plugin_fuel.max(1_000_000),
            timeout: Duration::from_millis(self.plugin_timeout_ms.max(10)),
            memory_bytes: mb(self.plugin_memory_mb),
            max_component_bytes: self.plugin_max_component_kb.clamp(1, 1 << 30) << 10,
            max_output_bytes: mb(self.plugin_max_output_mb),
            concurrent_calls: self.plugin_concurrent_calls.clamp(1, 4096),
            ..Default::default()
        }
    }
}

/// Per-merchant collection limits, enforced by each edge.
#[derive(clap::Args, Clone, Default)]
pub struct MerchantLimitArgs {
    /// Sustained events per second at each edge.
    #[arg(long)]
    rate_limit: Option<u32>,
    /// Events accepted at once above the rate (default: 10 s worth).
    #[arg(long, requires = "rate_limit")]
    burst: Option<u32>,
    /// Events per UTC day at each edge.
    #[arg(long)]
    daily_quota: Option<u64>,
}

impl MerchantLimitArgs {
    fn limits(&self) -> Option<beacon_proto::bus::MerchantLimits> {
        if self.rate_limit.is_none() && self.daily_quota.is_none() {
            return None;
        }
        let rate = self.rate_limit.unwrap_or(u32::MAX / 16);
        Some(beacon_proto::bus::MerchantLimits {
            events_per_second: rate.max(1),
            burst: self.burst.unwrap_or(rate.saturating_mul(10)).max(1),
            daily_events: self.daily_quota,
        })
    }
}

/// Settings of an edge beside its QUIC listener.
#[derive(clap::Args, Clone)]
pub struct EdgeArgs {
    /// Where the HTTP collectors (Snowplow, GA4, Plausible) and `GET /locate` listen.
    #[arg(long, env = "BEACON_HTTP_LISTEN", default_value = "127.0.0.1:0")]
    http_listen: SocketAddr,
    /// This edge's region, for `locate` (us-east, eu-west, ap-south, ...).
    #[arg(long, env = "BEACON_REGION", default_value = "local")]
    region: String,
    /// MaxMind-format City database (GeoLite2-City.mmdb) for geo enrichment.
    #[arg(long, env = "BEACON_GEOIP")]
    geoip: Option<PathBuf>,
    /// Take HTTP clients' addresses from the last `X-Forwarded-For` hop (the one your proxy
    /// appended; only behind your own proxy), Snowplow events' own `ip` fields and GA4
    /// Measurement Protocol `ip_override` (set by servers that send users' events).
    #[arg(long, env = "BEACON_TRUST_FORWARDED_FOR")]
    trust_forwarded_for: bool,
    /// Memory for batches in flight, both listeners together (each batch reserves five
    /// times its request size; when it is used up, QUIC stops reading and HTTP answers 503).
    #[arg(long, env = "BEACON_IN_FLIGHT_MEMORY_MB", default_value_t = 256)]
    in_flight_memory_mb: usize,
    /// Open connections per client address, on each listener (QUIC and HTTP).
    #[arg(long, env = "BEACON_MAX_CONNS_PER_IP", default_value_t = 256)]
    max_conns_per_ip: usize,
    /// How envelopes are written on the bus: `packed` (binary) or `json`, which ingest
    /// builds before the packed encoding read. Upgrade ingest first, then edges
    /// (docs/OPERATIONS.md); `json` is for an edge that must run ahead of an old ingest.
    #[arg(long, env = "BEACON_ENVELOPE_ENCODING", default_value = "packed")]
    envelope_encoding: beacon_proto::envelope::Encoding,
    /// Limits of merchants that have none of their own (default: unlimited).
    #[command(flatten)]
    default_limits: MerchantLimitArgs,
}

impl EdgeArgs {
    fn apply(&self, cfg: &mut beacon_edge::EdgeConfig) -> Result<()> {
        if self.region != "local" && !beacon_edge::locate::is_known_region(&self.region) {
            let known: Vec<&str> = beacon_edge::locate::REGIONS.iter().map(|r| r.0).collect();
            return Err(anyhow!(
                "--region {}: not one of {}",
                self.region,
                known.join(", ")
            ));
        }
        cfg.region = self.region.clone();
        cfg.http_listen = Some(self.http_listen);
        cfg.geoip = self.geoip.clone();
        cfg.http.trust_forwarded_for = self.trust_forwarded_for;
        cfg.http.max_conns_per_ip = self.max_conns_per_ip;
        cfg.in_flight_memory = self.in_flight_memory_mb.max(1) << 20;
        cfg.quic.max_conns_per_ip = self.max_conns_per_ip;
        cfg.default_limits = self.default_limits.limits();
        cfg.envelope_encoding = self.envelope_encoding;
        Ok(())
    }
}

/// Connects to the bus at the URL setting `url`; the error names the servers, without
/// their passwords.
async fn connect_bus(url: &str, name: &str) -> Result<async_nats::Client> {
    let url = beacon_proto::bus::NatsUrl::from(url);
    beacon_proto::bus::connect(&url, name)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))
}

#[derive(clap::Args, Clone)]
pub struct NatsTarget {
    /// NATS URL; defaults to the one in `<data-dir>/endpoints.json`.
    #[arg(long, env = "BEACON_NATS_URL", hide_env_values = true)]
    nats_url: Option<String>,
    #[arg(long, env = "BEACON_DATA_DIR", default_value = ".beacon-data")]
    pub data_dir: PathBuf,
}

impl NatsTarget {
    pub async fn jetstream(&self) -> Result<async_nats::jetstream::Context> {
        let url = match &self.nats_url {
            Some(u) => u.clone(),
            None => Endpoints::read(&self.data_dir)?.nats_url,
        };
        Ok(async_nats::jetstream::new(
            connect_bus(&url, "beacon-cli").await?,
        ))
    }

    /// The merchant registry's bucket on the target's bus.
    pub async fn registry(&self) -> Result<async_nats::jetstream::kv::Store> {
        registry_bucket(&self.jetstream().await?).await
    }
}

/// The merchant registry's bucket (created if missing).
async fn registry_bucket(
    js: &async_nats::jetstream::Context,
) -> Result<async_nats::jetstream::kv::Store> {
    beacon_edge::registry::open_bucket(js)
        .await
        .map_err(|e| anyhow!("opening the merchant registry: {e}"))
}

fn main() -> Result<()> {
    beacon_serve::process::no_library_backtraces();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,async_nats=warn,iceberg=warn,datafusion=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    apply_config_file()?;
    let cli = Cli::parse();
    // Before any thread or file: everything this process and its nats-server write is
    // private to this user; and the descriptor limit is the hard one, so the listeners'
    // own caps bind first.
    beacon_serve::process::private_files();
    match beacon_serve::process::raise_fd_limit() {
        Ok((soft, _)) => tracing::debug!(limit = soft, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

/// Fills in `BEACON_*` variables from `--config FILE` (or `BEACON_CONFIG`) before clap reads
/// them, so flags override the environment, which overrides the file.
fn apply_config_file() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let from_args = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--config=").map(String::from))
        });
    let Some(path) = from_args.or_else(|| std::env::var("BEACON_CONFIG").ok()) else {
        return Ok(());
    };
    for (name, value) in beacon::config::load(Path::new(&path))? {
        if std::env::var_os(&name).is_none() {
            // Single-threaded here: the runtime starts after this.
            std::env::set_var(name, value);
        }
    }
    Ok(())
}

/// Backup, restore and relocation copy a data directory; a shared warehouse (PostgreSQL
/// catalog, object storage) is backed up with its own tools (docs/OPERATIONS.md).
#[cfg(feature = "full")]
fn local_warehouse_only(data_dir: &Path) -> Result<()> {
    if !beacon::store::location(data_dir)?.is_local() {
        bail!("this copies a data directory's own warehouse; a shared one (--catalog-uri, --warehouse-uri) is backed up with pg_dump and the bucket's versioning (docs/OPERATIONS.md, \"Shared warehouse\")");
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    // Operator metrics, served at `/metrics` on the admin port (docs/OPERATIONS.md).
    if let Err(e) = beacon_serve::metrics::install() {
        tracing::warn!(error = %e, "metrics disabled");
    }
    if let Some(path) = &cli.config {
        tracing::info!(config = %path.display(), "settings file applied");
    }
    #[cfg(feature = "full")]
    cli.store.clone().install();
    // This role's readiness checks, on its own port with the metrics (`--metrics-listen`)
    // and on the role's HTTP port where it has one.
    let status = beacon_serve::Health::new();
    if let Some(listen) = cli.metrics_listen {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("metrics: cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        tokio::spawn(beacon_serve::metrics::serve_status(
            listener,
            status.clone(),
            std::future::pending(),
        ));
        tracing::info!(%addr, "metrics and health listening (HTTP)");
        eprintln!("metrics and health: http://{addr}");
    }
    match cli.command {
        #[cfg(feature = "full")]
        Command::Up {
            data_dir,
            edge_listen,
            nats_url,
            plugins_dir,
            admin_listen,
            api_listen,
            sql_listen,
            admin,
            tuning,
            sandbox,
            edge,
            query,
            maintain,
        } => {
            up(
                data_dir,
                (edge_listen, edge),
                nats_url,
                plugins_dir,
                (admin_listen, admin, api_listen, sql_listen),
                (tuning, query, maintain),
                (sandbox, status),
            )
            .await
        }
        Command::Edge {
            nats_url,
            data_dir,
            listen,
            edge_id,
            hub_domain,
            sandbox,
            edge: edge_args,
        } => {
            std::fs::create_dir_all(&data_dir)?;
            tighten_data_dir(&data_dir)?;
            let mut cfg = beacon_edge::EdgeConfig::new(nats_url.clone(), listen, data_dir.clone());
            cfg.edge_id = edge_id;
            cfg.hub_domain = hub_domain;
            cfg.sandbox = sandbox.limits();
            edge_args.apply(&mut cfg)?;
            let edge = beacon_edge::Edge::start(cfg).await?;
            status.include(edge.health.clone());
            Endpoints {
                nats_url,
                edge_quic: Some(edge.addr.to_string()),
                edge_http: edge.http_addr.map(|a| format!("http://{a}")),
                edge_ca_cert: Some(edge.cert_path.clone()),
                data_dir: data_dir.clone(),
                pid: std::process::id(),
                ..Default::default()
            }
            .write(&data_dir)?;
            shutdown_signal().await;
            edge.shutdown(Duration::from_secs(10)).await;
            Ok(())
        }
        #[cfg(feature = "full")]
        Command::Ingest {
            nats_url,
            data_dir,
            tuning,
            hub,
        } => {
            let (tx, rx) = watch::channel(false);
            let mut ingest =
                tokio::spawn(run_ingest(nats_url, data_dir, (tuning, hub), status, rx));
            tokio::select! {
                _ = shutdown_signal() => {
                    let _ = tx.send(true);
                    ingest.await??;
                }
                r = &mut ingest => r??,
            }
            Ok(())
        }
        #[cfg(feature = "full")]
        Command::Rollup {
            data_dir,
            interval,
            maintain,
        } => {
            let _lock = beacon::lock::lock_role(&data_dir, "rollup")?;
            let (tx, rx) = watch::channel(false);
            let wh = Arc::new(beacon::store::open(&data_dir).await?);
            let maintenance = maintain.spawn(wh.clone(), rx.clone())?;
            let task = tokio::spawn(beacon_warehouse::rollup::run_loop(
                wh,
                Duration::from_secs(interval),
                rx,
                rollup_check(&status),
            ));
            shutdown_signal().await;
            let _ = tx.send(true);
            task.await?;
            if let Some(m) = maintenance {
                m.task.await?;
            }
            Ok(())
        }
        #[cfg(feature = "full")]
        Command::Maintain {
            data_dir,
            tables,
            dry_run,
            maintain,
        } => run_maintain(&data_dir, &tables, maintain.options(dry_run)).await,
        #[cfg(feature = "full")]
        Command::Backup { data_dir, to } => {
            local_warehouse_only(&data_dir)?;
            let c = beacon::backup::copy(&data_dir, &to).await?;
            println!(
                "backed up {} to {}: {c}; the backup is a data directory (check it: beacon sql --data-dir {} ...)",
                data_dir.display(),
                to.display(),
                to.display()
            );
            Ok(())
        }
        #[cfg(feature = "full")]
        Command::Restore { from, data_dir } => {
            local_warehouse_only(&data_dir)?;
            let c = beacon::backup::copy(&from, &data_dir).await?;
            println!(
                "restored {} into {}: {c}; start it with: beacon up --data-dir {}",
                from.display(),
                data_dir.display(),
                data_dir.display()
            );
            Ok(())
        }
        #[cfg(feature = "full")]
        Command::Relocate { data_dir } => {
            local_warehouse_only(&data_dir)?;
            match beacon::backup::relocate(&data_dir).await? {
                Some(r) => println!(
                    "relocated {} tables from {} to {} ({} metadata files rewritten)",
                    r.tables,
                    r.from.display(),
                    r.to.display(),
                    r.files
                ),
                None => println!("{} already records its own paths", data_dir.display()),
            }
            Ok(())
        }
        #[cfg(feature = "full")]
        Command::Sql {
            query,
            data_dir,
            format,
        } => {
            let wh = beacon::store::open_existing(&data_dir).await?;
            let batches = wh.sql(&query).await?;
            let text = match format {
                Format::Table => beacon_warehouse::output::table(&batches)?,
                Format::Json => beacon_warehouse::output::json(&batches)?,
                Format::Csv => beacon_warehouse::output::csv(&batches)?,
            };
            print!("{text}");
            Ok(())
        }
        Command::Merchant {
            command:
                MerchantCommand::Create {
                    name,
                    timezone,
                    trackers,
                    limits,
                    target,
                    format,
                },
        } => {
            if let Some(tz) = &timezone {
                tz.parse::<chrono_tz::Tz>()
                    .map_err(|_| anyhow!("--timezone {tz}: not an IANA time zone name"))?;
            }
            let trackers = trackers.trackers()?;
            let js = target.jetstream().await?;
            let (merchant, keys) =
                create_merchant(&js, &name, timezone, trackers, limits.limits()).await?;
            let (key, server) = (keys.write, keys.server);
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::json!({"id": merchant.id, "name": merchant.name, "write_key": key, "server_key": server})
                ),
                Format::Csv => println!(
                    "id,name,write_key,server_key\n{},{},{},{}",
                    merchant.id, merchant.name, key, server
                ),
                Format::Table => println!(
                    "merchant id: {}\nname:        {}\nwrite key:   {key}\nserver key:  {server} (secret)",
                    merchant.id, merchant.name
                ),
            }
            Ok(())
        }
        Command::Merchant {
            command:
                MerchantCommand::Update {
                    merchant,
                    trackers,
                    limits,
                    default_limits,
                    target,
                },
        } => {
            let add = trackers.trackers()?;
            let limits = if default_limits {
                Some(None)
            } else {
                limits.limits().map(Some)
            };
            let store = target.registry().await?;
            let m = beacon_edge::registry::update_merchant(&store, &merchant, &add, limits)
                .await
                .map_err(|e| anyhow!("updating merchant {merchant}: {e}"))?;
            println!("{}", serde_json::to_string_pretty(&m)?);
            Ok(())
        }
        Command::Merchant {
            command: MerchantCommand::ServerKey { merchant, target },
        } => {
            let store = target.registry().await?;
            let key = new_key("bs");
            let hash = beacon_edge::registry::hash_write_key(&key);
            beacon_edge::registry::set_server_key(&store, &merchant, &hash)
                .await
                .map_err(|e| anyhow!("setting merchant {merchant}'s server key: {e}"))?;
            println!("{key}");
            Ok(())
        }
        #[cfg(feature = "full")]
        Command::Merchant {
            command: MerchantCommand::ReadToken { merchant, target },
        } => {
            let store = target.registry().await?;
            let token = beacon_query::tokens::create(&store, &merchant)
                .await
                .map_err(|e| anyhow!("creating a read token: {e}"))?;
            println!("{token}");
            Ok(())
        }
        #[cfg(feature = "full")]
        Command::Api {
            nats_url,
            data_dir,
            listen,
            sql_listen,
            admin,
            query,
        } => {
            let servers = start_api(
                &nats_url,
                &data_dir,
                (listen, sql_listen),
                admin.tokens(&data_dir)?,
                &query,
                status,
                shutdown_signal(),
            )
            .await?;
            eprintln!("metrics API: http://{}", servers.api);
            eprintln!("SQL (Postgres wire): {}", servers.sql);
            servers.wait().await
        }
        Command::Plugin { command } => plugin_cmd::run(command).await,
        Command::Topology { command } => topology(command).await,
        #[cfg(feature = "full")]
        Command::Reprocess(args) => history_cmd::reprocess(args).await,
        #[cfg(feature = "full")]
        Command::Forget(args) => history_cmd::forget(args).await,
        Command::Admin {
            nats_url,
            data_dir,
            listen,
            admin,
            sandbox,
        } => {
            std::fs::create_dir_all(&data_dir)?;
            let (addr, task) = start_admin(
                &nats_url,
                &data_dir,
                listen,
                admin.tokens(&data_dir)?,
                sandbox.limits(),
                &status,
                shutdown_signal(),
            )
            .await?;
            eprintln!("admin API: http://{addr}");
            task.await??;
            Ok(())
        }
        Command::Demo {
            data_dir,
            events,
            merchants,
            batch,
            concurrency,
            attach_plugin,
            seed,
            format,
        } => {
            demo(
                &data_dir,
                events,
                merchants,
                batch,
                concurrency,
                attach_plugin,
                seed,
                format,
            )
            .await
        }
    }
}

/// `beacon topology`: generate the configurations, or run them all here.
async fn topology(command: TopologyCommand) -> Result<()> {
    use beacon::topology::Topology;
    match command {
        TopologyCommand::Generate {
            dir,
            hub_nodes,
            regions,
            sync,
        } => {
            std::fs::create_dir_all(&dir)?;
            let dir = dir.canonicalize()?;
            let t = Topology::plan(&dir, hub_nodes, &regions, &sync)?;
            t.write(&dir)?;
            println!(
                "wrote {} hub and {} leaf configurations to {}",
                t.hub.len(),
                t.regions.len(),
                dir.display()
            );
            print_topology(&t);
            Ok(())
        }
        TopologyCommand::Provision { nats_url, replicas } => {
            let client = connect_bus(&nats_url, "beacon-topology").await?;
            let changed =
                beacon_proto::stores::provision(&async_nats::jetstream::new(client), replicas)
                    .await?;
            if changed.is_empty() {
                println!("every bucket already has {replicas} replicas");
            } else {
                println!("{} now with {replicas} replicas", changed.join(", "));
            }
            Ok(())
        }
        TopologyCommand::Certs { dir, hosts } => {
            let (ca, cert, key) = beacon::topology::write_server_certificate(&dir, &hosts)?;
            println!(
                "CA {}\ncertificate {} (naming {})\nkey {}",
                ca.display(),
                cert.display(),
                hosts.join(", "),
                key.display()
            );
            println!(
                "Kubernetes: kubectl -n beacon create secret generic nats-tls --from-file=ca.crt={} --from-file=tls.crt={} --from-file=tls.key={}",
                ca.display(),
                cert.display(),
                key.display()
            );
            Ok(())
        }
        TopologyCommand::Up { dir } => {
            let t = Topology::read(&dir)?;
            if t.links.is_none() {
                tracing::warn!(
                    dir = %dir.display(),
                    "this topology's links between servers have no TLS and no passwords \
                     (generated before they were added): run `beacon topology generate` again"
                );
            }
            // The hub first: the leaves link to it.
            let mut servers = Vec::new();
            for n in &t.hub {
                servers.push(n.start().with_context(|| format!("hub node {}", n.name))?);
            }
            for r in &t.regions {
                let leaf = r.start();
                servers.push(leaf.with_context(|| format!("the leaf of region {}", r.name))?);
            }
            println!(
                "topology is up ({} servers); Ctrl-C stops them",
                servers.len()
            );
            print_topology(&t);
            shutdown_signal().await;
            // Leaves first, so no region is left sourcing from a hub that is going away.
            while let Some(s) = servers.pop() {
                s.stop();
            }
            Ok(())
        }
    }
}

/// The environment variable every `--nats-url` reads.
const NATS_URL_ENV: &str = "BEACON_NATS_URL";

fn print_topology(t: &beacon::topology::Topology) {
    let hub = t.hub_url();
    if t.links
        .as_ref()
        .is_some_and(|l| l.client_password.is_some())
    {
        println!("(the URLs carry the client password: keep them out of shared logs)");
    }
    if let Some(ca) = t.client_ca() {
        // Every role and CLI command below needs it to trust the servers' TLS certificates.
        println!(
            "  export {}={}",
            beacon_proto::bus::NATS_CA_ENV,
            ca.display()
        );
    }
    println!("hub (ingest, admin, api, merchants): {hub}");
    for r in &t.regions {
        println!(
            "region {} leaf (edges): {}   JetStream domain: {}",
            r.name,
            t.leaf_url(&r.name).unwrap_or_default(),
            r.domain
        );
    }
    // The URLs go in the environment (`--nats-url` reads BEACON_NATS_URL), not on command
    // lines, where `ps` shows any password in them to every user of the machine.
    println!(
        "  export {NATS_URL_ENV}='{hub}'\n  beacon topology provision --replicas {}\n  beacon ingest --source-domain {} --stream-replicas {} --data-dir DIR",
        t.hub.len().min(3),
        t.source_domains().join(","),
        t.hub.len().min(3)
    );
    if let Some(r) = t.regions.first() {
        println!(
            "  {NATS_URL_ENV}='{}' beacon edge --hub-domain {} --data-dir DIR",
            t.leaf_url(&r.name).unwrap_or_default(),
            beacon::topology::HUB_DOMAIN
        );
    }
}

/// `beacon maintain`: one maintenance pass with a progress display, then a report per table.
#[cfg(feature = "full")]
async fn run_maintain(
    data_dir: &Path,
    tables: &[String],
    options: beacon_warehouse::maintain::MaintainOptions,
) -> Result<()> {
    use beacon_warehouse::TableKind;
    let kinds = if tables.is_empty() {
        TableKind::ALL.to_vec()
    } else {
        tables
            .iter()
            .map(|t| {
                TableKind::from_name(t).ok_or_else(|| {
                    anyhow::anyhow!(
                        "no table {t:?}; tables: {}",
                        TableKind::ALL.map(|k| k.name()).join(", ")
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?
    };
    let wh = beacon::store::open_existing(data_dir).await?;
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{prefix:>18} {msg:<8} [{bar:30}] {pos}/{len}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let progress = |table: &str, step: &str, done: u64, total: u64| {
        bar.set_prefix(table.to_string());
        bar.set_message(step.to_string());
        bar.set_length(total);
        bar.set_position(done);
    };
    let reports = beacon_warehouse::maintain::maintain(&wh, &kinds, &options, &progress).await?;
    bar.finish_and_clear();
    if options.dry_run {
        println!("dry run: nothing was changed; \"after\" is what a run would leave");
    }
    for r in &reports {
        println!("{r}");
    }
    Ok(())
}

#[cfg(feature = "full")]
async fn run_ingest(
    nats_url: String,
    data_dir: PathBuf,
    (tuning, hub): (Tuning, HubArgs),
    health: beacon_serve::Health,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    // Shared: several ingest processes may write one warehouse (not while a backup copies it).
    let _lock = beacon::lock::share_role(&data_dir, "ingest")?;
    tokio::spawn(beacon_ingest::sample_backlog(
        nats_url.as_str().into(),
        shutdown.clone(),
    ));
    let wh = Arc::new(beacon::store::open(&data_dir).await?);
    let mut cfg = beacon_ingest::IngestConfig::new(nats_url);
    cfg.max_batch = tuning.ingest_max_batch;
    cfg.max_wait = Duration::from_millis(tuning.ingest_max_wait_ms);
    cfg.dedupe_window = Duration::from_secs(tuning.dedupe_window_secs);
    cfg.sources = hub.sources;
    cfg.stream_replicas = hub.stream_replicas;
    cfg.partitions = hub.partitions;
    if let Some(id) = hub.ingest_id {
        cfg.owner = id;
    }
    beacon_ingest::run_supervised(cfg, wh, health, shutdown).await;
    Ok(())
}

#[cfg(feature = "full")]
async fn up(
    data_dir: PathBuf,
    (edge_listen, edge_args): (SocketAddr, EdgeArgs),
    nats_url: Option<String>,
    plugins_dir: Option<PathBuf>,
    (admin_listen, admin, api_listen, sql_listen): (SocketAddr, AdminArgs, SocketAddr, SocketAddr),
    (tuning, query, maintain): (Tuning, QueryArgs, MaintainArgs),
    (sandbox, node): (SandboxArgs, beacon_serve::Health),
) -> Result<()> {
    std::fs::create_dir_all(&data_dir)?;
    let data_dir = data_dir.canonicalize()?;
    tighten_data_dir(&data_dir)?;
    let _locks = (
        beacon::lock::share_role(&data_dir, "ingest")?,
        beacon::lock::lock_role(&data_dir, "rollup")?,
    );
    Endpoints::remove(&data_dir);
    // The node's readiness (`/readyz` on the admin port): its nats-server, the warehouse
    // opening, ingest, rollups, and the edge's and query servers' own checks.
    let (nats, nats_url) = match nats_url {
        Some(url) => (None, url),
        None => {
            let server = beacon::nats::Supervised::start(&data_dir.join("nats"), node.clone())?;
            let url = server.url();
            (Some(server), url)
        }
    };
    // Collection first, and independent of the warehouse: the edge only needs the bus.
    let mut edge_cfg =
        beacon_edge::EdgeConfig::new(nats_url.clone(), edge_listen, data_dir.clone());
    edge_cfg.sandbox = sandbox.limits();
    edge_args.apply(&mut edge_cfg)?;
    let edge = beacon_edge::Edge::start(edge_cfg).await?;
    node.include(edge.health.clone());

    let (stop_tx, stop_rx) = watch::channel(false);
    let until_stopped = |mut stop: watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    // Ingest's backlog is watched from the start, also while the warehouse cannot be opened.
    tokio::spawn(beacon_ingest::sample_backlog(
        nats_url.as_str().into(),
        stop_rx.clone(),
    ));
    // A warehouse that cannot be opened (a corrupt metadata file, a catalog being restored)
    // holds back ingest, rollups and queries, not collection: the bus keeps the backlog,
    // and the roles start as soon as it opens.
    node.register(WAREHOUSE_CHECK);
    let first = beacon::store::open(&data_dir).await;
    if let Err(e) = &first {
        tracing::error!(error = %e, "the warehouse cannot be opened: collecting into the bus only, retrying");
        node.set(WAREHOUSE_CHECK, Err(e.to_string()));
    }

    // One token set for the admin API and SQL logins (generated on first start).
    let admin_tokens = admin.tokens(&data_dir)?;
    let (admin_addr, admin_task) = start_admin(
        &nats_url,
        &data_dir,
        admin_listen,
        admin_tokens.clone(),
        sandbox.limits(),
        &node,
        until_stopped(stop_rx.clone()),
    )
    .await?;

    let location = beacon::store::location(&data_dir)?;
    let mut endpoints = Endpoints {
        nats_url: nats_url.clone(),
        edge_quic: Some(edge.addr.to_string()),
        edge_http: edge.http_addr.map(|a| format!("http://{a}")),
        edge_ca_cert: Some(edge.cert_path.clone()),
        data_dir: data_dir.clone(),
        catalog_uri: location.pyiceberg_catalog_uri(),
        warehouse: location.warehouse_uri(),
        admin_http: Some(format!("http://{admin_addr}")),
        metrics_http: None,
        sql_pg: None,
        pid: std::process::id(),
    };
    let roles = WarehouseRoles {
        nats_url: nats_url.clone(),
        data_dir: data_dir.clone(),
        listen: (api_listen, sql_listen),
        admin_tokens,
        tuning,
        query,
        maintain,
        node: node.clone(),
        stop: stop_rx.clone(),
    };
    let opened = match first {
        Ok(wh) => {
            node.set(WAREHOUSE_CHECK, Ok(()));
            let running = roles.start(Arc::new(wh)).await?;
            running.publish(&mut endpoints);
            Some(running)
        }
        Err(_) => None,
    };
    endpoints.write(&data_dir)?;
    let warehouse_roles = match opened {
        Some(running) => tokio::spawn(std::future::ready(Some(running))),
        None => tokio::spawn(roles.start_when_open(endpoints.clone())),
    };
    eprintln!(
        "\nbeacon is up\n  edge (RSocket/QUIC): {}   trust: {}\n  edge (HTTP):         http://{}   (Snowplow /com.snowplowanalytics.snowplow/tp2 and /i, GA4 /mp/collect and /g/collect, Plausible /api/event)\n  admin API (HTTP):    http://{admin_addr}   token: {}   (health: /healthz, /readyz)\n  metrics API (HTTP):  {}   (read tokens: beacon merchant read-token)\n  dashboard:           {}   (log in with a read token)\n  SQL (Postgres wire): {}\n  NATS:                {}\n  catalog:             {}\n  warehouse:           {}\n  endpoints file:      {}{}\n",
        edge.addr,
        edge.cert_path.display(),
        edge.http_addr.map(|a| a.to_string()).unwrap_or_default(),
        if admin.admin_tokens.is_some() { "from BEACON_ADMIN_TOKENS".to_string() } else { data_dir.join("admin-token").display().to_string() },
        endpoints.metrics_http.as_deref().map(|a| format!("{a}/api/v2/query")).unwrap_or_else(|| "waiting for the warehouse (see /readyz)".into()),
        endpoints.metrics_http.as_deref().map(|a| format!("{a}/dashboard/")).unwrap_or_else(|| "waiting for the warehouse (see /readyz)".into()),
        endpoints.sql_pg.as_deref().map(|a| format!("psql {a}/beacon -U <merchant id or admin>   (password: read token or admin token)")).unwrap_or_else(|| "waiting for the warehouse (see /readyz)".into()),
        nats_url,
        endpoints.catalog_uri,
        endpoints.warehouse,
        Endpoints::path(&data_dir).display(),
        plugins_dir.map(|d| format!("\n  example plugins:     {}", d.display())).unwrap_or_default(),
    );

    shutdown_signal().await;
    eprintln!("shutting down: draining in-flight batches");
    Endpoints::remove(&data_dir);
    // Order matters: the edge stops taking batches and flushes what it acknowledged to
    // JetStream; ingest then commits what it has read; only then does NATS go away.
    edge.shutdown(Duration::from_secs(10)).await;
    let _ = stop_tx.send(true);
    if let Ok(Some(roles)) = warehouse_roles.await {
        roles.wait().await;
    }
    Endpoints::remove(&data_dir);
    let _ = admin_task.await;
    if let Some(n) = nats {
        n.stop();
    }
    Ok(())
}

/// The rollups' readiness check: failing after two failed runs in a row (one can lose a
/// commit race with maintenance and is simply retried), with the last error.
#[cfg(feature = "full")]
fn rollup_check(health: &beacon_serve::Health) -> impl Fn(Result<(), String>) + Send + 'static {
    const CHECK: &str = "rollups";
    health.register(CHECK);
    let health = health.clone();
    let failed_in_a_row = std::sync::atomic::AtomicU32::new(0);
    move |run| {
        use std::sync::atomic::Ordering;
        match run {
            Ok(()) => {
                failed_in_a_row.store(0, Ordering::Relaxed);
                health.set(CHECK, Ok(()));
            }
            Err(e) => {
                if failed_in_a_row.fetch_add(1, Ordering::Relaxed) >= 1 {
                    health.set(CHECK, Err(format!("the last rollup runs failed: {e}")));
                }
            }
        }
    }
}

/// The node's check that the warehouse opened (the query servers then probe it themselves).
#[cfg(feature = "full")]
const WAREHOUSE_CHECK: &str = "warehouse";

/// What `beacon up` runs on the warehouse: ingest, rollups, maintenance and the query servers.
#[cfg(feature = "full")]
#[derive(Clone)]
struct WarehouseRoles {
    nats_url: String,
    data_dir: PathBuf,
    listen: (SocketAddr, SocketAddr),
    admin_tokens: beacon_control::admin::AdminTokens,
    tuning: Tuning,
    query: QueryArgs,
    maintain: MaintainArgs,
    node: beacon_serve::Health,
    stop: watch::Receiver<bool>,
}

#[cfg(feature = "full")]
struct RunningRoles {
    ingest: tokio::task::JoinHandle<()>,
    rollups: tokio::task::JoinHandle<()>,
    maintenance: Option<Maintenance>,
    query: QueryServers,
}

#[cfg(feature = "full")]
impl WarehouseRoles {
    async fn start(&self, wh: Arc<beacon_warehouse::Warehouse>) -> Result<RunningRoles> {
        // The fallible parts first, so a failure leaves nothing running behind.
        let api_health = beacon_serve::Health::new();
        let mut stop = self.stop.clone();
        let query = start_api(
            &self.nats_url,
            &self.data_dir,
            self.listen,
            self.admin_tokens.clone(),
            &self.query,
            api_health.clone(),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        )
        .await?;
        let maintenance = match self.maintain.spawn(wh.clone(), self.stop.clone()) {
            Ok(m) => m,
            Err(e) => {
                query.abandon().await;
                return Err(e);
            }
        };
        self.node.include(api_health);
        let rollups = tokio::spawn(beacon_warehouse::rollup::run_loop(
            wh.clone(),
            Duration::from_secs(self.tuning.rollup_interval),
            self.stop.clone(),
            rollup_check(&self.node),
        ));
        let mut ingest_cfg = beacon_ingest::IngestConfig::new(self.nats_url.clone());
        ingest_cfg.max_batch = self.tuning.ingest_max_batch;
        ingest_cfg.max_wait = Duration::from_millis(self.tuning.ingest_max_wait_ms);
        ingest_cfg.dedupe_window = Duration::from_secs(self.tuning.dedupe_window_secs);
        // The same name across restarts of this node: it takes its partition leases back at
        // once instead of waiting for them to expire.
        ingest_cfg.owner = "beacon-up".into();
        let ingest = tokio::spawn(beacon_ingest::run_supervised(
            ingest_cfg,
            wh.clone(),
            self.node.clone(),
            self.stop.clone(),
        ));
        Ok(RunningRoles {
            ingest,
            rollups,
            maintenance,
            query,
        })
    }

    /// Retries opening the warehouse (2 s, doubling to 30 s) until it opens or `beacon up`
    /// stops; then starts the roles and adds the query servers to `endpoints.json`.
    async fn start_when_open(self, mut endpoints: Endpoints) -> Option<RunningRoles> {
        let mut stop = self.stop.clone();
        let mut pause = Duration::from_secs(2);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.wait_for(|s| *s) => return None,
            }
            match beacon::store::open(&self.data_dir).await {
                Ok(wh) => match self.start(Arc::new(wh)).await {
                    Ok(running) => {
                        self.node.set(WAREHOUSE_CHECK, Ok(()));
                        running.publish(&mut endpoints);
                        // Not once shutting down: endpoints.json is gone for good then.
                        if !*self.stop.borrow() {
                            if let Err(e) = endpoints.write(&self.data_dir) {
                                tracing::error!(error = %e, "cannot update endpoints.json");
                            }
                        }
                        tracing::info!(
                            metrics_api = ?endpoints.metrics_http,
                            "the warehouse opened: ingest, rollups and queries started"
                        );
                        return Some(running);
                    }
                    Err(e) => {
                        // E.g. NATS restarting at that moment: try again (nothing was left
                        // running by the failed start).
                        tracing::error!(error = %e, "the warehouse opened but its roles did not start; retrying in {pause:?}");
                        self.node.set(WAREHOUSE_CHECK, Err(format!("{e:#}")));
                        pause = (pause * 2).min(Duration::from_secs(30));
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "the warehouse still cannot be opened; retrying in {pause:?}");
                    self.node.set(WAREHOUSE_CHECK, Err(e.to_string()));
                    pause = (pause * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

#[cfg(feature = "full")]
impl RunningRoles {
    fn publish(&self, endpoints: &mut Endpoints) {
        endpoints.metrics_http = Some(format!("http://{}", self.query.api));
        endpoints.sql_pg = Some(format!("postgresql://127.0.0.1:{}", self.query.sql.port()));
    }

    /// Waits for every role to finish after the stop signal.
    async fn wait(self) {
        if let Err(e) = self.ingest.await {
            eprintln!("ingest task failed: {e}");
        }
        let _ = self.rollups.await;
        if let Some(m) = self.maintenance {
            let _ = m.task.await;
        }
        if let Err(e) = self.query.wait().await {
            eprintln!("query servers: {e}");
        }
    }
}

/// An installation written before files were private: bring it to 0700/0600 now, and say
/// so. A data directory already 0700 is taken as done (no walk over millions of files).
fn tighten_data_dir(data_dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data_dir)?.permissions().mode() & 0o777;
    if mode == 0o700 {
        return Ok(());
    }
    let done = beacon_serve::process::tighten(data_dir)
        .with_context(|| format!("making {} private", data_dir.display()))?;
    tracing::info!(
        dir = %data_dir.display(),
        dirs = done.dirs,
        files = done.files,
        "data directory made private to this user (directories 0700, files 0600)"
    );
    Ok(())
}

/// The identities existing trackers send (`merchant create` and `update`).
#[derive(clap::Args, Clone, Default)]
pub struct TrackerArgs {
    /// Snowplow application id (`aid`) of the merchant's trackers (repeatable).
    #[arg(long = "snowplow-app-id")]
    snowplow_app_ids: Vec<String>,
    /// GA4 data stream as `MEASUREMENT_ID:API_SECRET` (repeatable; the secret may be empty
    /// for gtag hits only).
    #[arg(long = "ga4")]
    ga4: Vec<String>,
    /// Plausible site domain (repeatable).
    #[arg(long = "domain")]
    domains: Vec<String>,
}

impl TrackerArgs {
    fn trackers(&self) -> Result<beacon_proto::bus::Trackers> {
        let (snowplow_app_ids, ga4, domains) =
            (self.snowplow_app_ids.clone(), &self.ga4, &self.domains);
        let mut streams: Vec<beacon_proto::bus::Ga4Stream> = Vec::new();
        for g in ga4 {
            let (mid, secret) = g.split_once(':').unwrap_or((g.as_str(), ""));
            if mid.is_empty() {
                return Err(anyhow!("--ga4 {g}: expected MEASUREMENT_ID:API_SECRET"));
            }
            let pos = match streams.iter().position(|s| s.measurement_id == mid) {
                Some(p) => p,
                None => {
                    streams.push(beacon_proto::bus::Ga4Stream {
                        measurement_id: mid.to_string(),
                        api_secrets_sha256: Vec::new(),
                    });
                    streams.len() - 1
                }
            };
            if !secret.is_empty() {
                streams[pos]
                    .api_secrets_sha256
                    .push(beacon_edge::registry::hash_write_key(secret));
            }
        }
        let domains = domains
            .iter()
            .map(|d| beacon_proto::bus::normalize_domain(d))
            .filter(|d| !d.is_empty())
            .collect();
        Ok(beacon_proto::bus::Trackers {
            snowplow_app_ids,
            ga4: streams,
            domains,
        })
    }
}

/// A new merchant's keys, shown once (the registry keeps only their hashes).
struct MerchantKeys {
    /// For pages and apps: anyone can read it.
    write: String,
    /// For the merchant's own servers: trusted with the `$` properties.
    server: String,
}

/// A random key: `<prefix>_` and 128 bits in hex.
fn new_key(prefix: &str) -> String {
    format!("{prefix}_{}", beacon::secrets::random_hex::<16>())
}

async fn create_merchant(
    js: &async_nats::jetstream::Context,
    name: &str,
    timezone: Option<String>,
    trackers: beacon_proto::bus::Trackers,
    limits: Option<beacon_proto::bus::MerchantLimits>,
) -> Result<(beacon_proto::bus::Merchant, MerchantKeys)> {
    use rand::Rng;
    let id = format!("m_{:012x}", rand::rng().random::<u64>() & 0xffff_ffff_ffff);
    let keys = MerchantKeys {
        write: new_key("bk"),
        server: new_key("bs"),
    };
    let merchant = beacon_proto::bus::Merchant {
        id,
        name: name.to_string(),
        write_key_sha256: beacon_edge::registry::hash_write_key(&keys.write),
        server_key_sha256: Some(beacon_edge::registry::hash_write_key(&keys.server)),
        created_at: beacon_edge::now_ms(),
        timezone,
        trackers,
        limits,
    };
    let store = registry_bucket(js).await?;
    beacon_edge::registry::create_merchant(&store, &merchant)
        .await
        .map_err(|e| anyhow!("registering merchant: {e}"))?;
    Ok((merchant, keys))
}

pub fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "operator".into())
}

#[derive(serde::Serialize, serde::Deserialize)]
struct DemoMerchant {
    name: String,
    id: String,
    write_key: String,
    /// For the dashboard and the metrics API (`scripts/run.sh` prints the first one's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    read_token: Option<String>,
}

#[allow(clippy::too_many_arguments)]
async fn demo(
    data_dir: &Path,
    events: usize,
    merchants: usize,
    batch: usize,
    concurrency: usize,
    attach_plugin: Option<PathBuf>,
    seed: u64,
    format: Format,
) -> Result<()> {
    let endpoints = Endpoints::read(data_dir)?;
    let edge = endpoints
        .edge_quic
        .clone()
        .ok_or_else(|| anyhow!("no edge in endpoints.json"))?;
    let ca = endpoints
        .edge_ca_cert
        .clone()
        .ok_or_else(|| anyhow!("no edge certificate in endpoints.json"))?;
    let js = async_nats::jetstream::new(connect_bus(&endpoints.nats_url, "beacon-demo").await?);

    // Demo merchants are kept with their keys (the registry only has hashes).
    let keys_path = data_dir.join("demo-merchants.json");
    let mut known: Vec<DemoMerchant> = std::fs::read(&keys_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    while known.len() < merchants {
        let name = format!("demo-shop-{}", known.len() + 1);
        let (m, keys) = create_merchant(&js, &name, None, Default::default(), None).await?;
        known.push(DemoMerchant {
            name,
            id: m.id,
            write_key: keys.write,
            read_token: None,
        });
    }
    #[cfg(feature = "full")]
    {
        let store = registry_bucket(&js).await?;
        for m in known.iter_mut().filter(|m| m.read_token.is_none()) {
            m.read_token = Some(
                beacon_query::tokens::create(&store, &m.id)
                    .await
                    .map_err(|e| anyhow!("creating a read token: {e}"))?,
            );
        }
    }
    std::fs::write(&keys_path, serde_json::to_vec_pretty(&known)?)?;
    if let Some(file) = &attach_plugin {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let control = plugin_cmd::control(&NatsTarget {
            nats_url: Some(endpoints.nats_url.clone()),
            data_dir: data_dir.to_path_buf(),
        })
        .await?;
        let mut attached = Vec::new();
        for m in known.iter().take(merchants) {
            attached.push(
                control
                    .attach(
                        &m.id,
                        "utm",
                        bytes.clone(),
                        r#"{"strip_from_url": true}"#,
                        false,
                        "demo",
                    )
                    .await?,
            );
        }
        // Edges apply pipeline changes from a KV watch: wait until every live one has.
        for c in attached {
            beacon_control::edges::wait_applied(
                &js,
                &c.pipeline.merchant_id,
                c.revision,
                Duration::from_secs(10),
            )
            .await?;
        }
    }

    let started = std::time::Instant::now();
    let progress = (!matches!(format, Format::Json))
        .then(|| beacon::progress::Progress::new("sending", "events", events as u64));
    let ca_pem = std::fs::read(&ca)?;
    let addr: SocketAddr = edge.parse()?;
    let now = beacon_edge::now_ms();
    let per = events / merchants.max(1);
    let mut tasks = Vec::new();
    for (i, m) in known.iter().take(merchants).enumerate() {
        let n = if i + 1 == merchants {
            events - per * (merchants - 1)
        } else {
            per
        };
        let evs = beacon::demo::generate(
            seed * 1000 + i as u64,
            &format!("{}.example", m.name),
            n,
            now - 3 * 3600 * 1000,
            3 * 3600 * 1000,
            (n as u64 / 5).max(1),
        );
        let client = Arc::new(
            beacon_sdk::Client::connect(beacon_sdk::ClientConfig::new(
                addr,
                ca_pem.clone(),
                m.write_key.clone(),
            ))
            .await?,
        );
        tasks.push(tokio::spawn(beacon::demo::send_all_counted(
            client,
            evs,
            batch,
            concurrency,
            progress.as_ref().map(|p| p.bar().clone()),
        )));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??.events;
    }
    drop(progress);
    let secs = started.elapsed().as_secs_f64();
    let report = serde_json::json!({"events": total, "merchants": merchants, "seconds": secs, "events_per_second": total as f64 / secs});
    match format {
        Format::Json => println!("{report}"),
        _ => eprintln!("sent {total} events for {merchants} merchants in {secs:.2} s ({:.0} events/s, acknowledged as durable)", total as f64 / secs),
    }
    if total == 0 {
        bail!("no events sent");
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
