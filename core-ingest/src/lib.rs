//! core-ingest: moves batch envelopes from JetStream into Iceberg, exactly once.
//!
//! The Iceberg tables, not the consumer, are the record of progress: every commit carries
//! the last stream sequence it contains ([`beacon_warehouse::tables::SEQ_PROPERTY`]). On
//! start, ingest reads those sequences and (re)creates its durable consumer to deliver from
//! the lowest one + 1; each table then skips what it already holds. Messages are acked only
//! after the commits. So a crash at any point - before, between or after the three table
//! commits, or before the ack - neither loses nor duplicates a row. One ingest process per
//! stream: concurrent writers to the same tables are not supported (see ARCHITECTURE.md).

pub mod convert;
pub mod dimensions;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use beacon_proto::{bus, Envelope};
use beacon_warehouse::tables::{arrow_schema, SEQ_PROPERTY};
use beacon_warehouse::{TableKind, Warehouse, WarehouseError};
use futures::StreamExt;
use tokio::sync::watch;

use crate::convert::Received;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error(transparent)]
    Warehouse(#[from] WarehouseError),
    #[error("Arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("table writer task failed: {0}")]
    Task(String),
}

fn nats<E: std::fmt::Display>(e: E) -> IngestError {
    IngestError::Nats(e.to_string())
}

#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub nats_url: String,
    /// Most envelopes per Iceberg commit.
    pub max_batch: usize,
    /// Longest an envelope waits for its commit when traffic is light.
    pub max_wait: Duration,
    /// Most envelope bytes per fetch (and so per commit). It also keeps each pull under the
    /// server's per-client pending limit (64 MiB by default), past which nats-server
    /// disconnects a "slow consumer".
    pub max_fetch_bytes: usize,
    /// The JetStream domains of the edge regions (their leaf nats-servers) whose events
    /// streams the hub's events stream sources (the topology of docs/OPERATIONS.md); ingest
    /// creates or updates that stream. Empty: the stream the edges create on this server.
    pub sources: Vec<String>,
    /// Replicas of that hub stream (3 on a 3-node hub).
    pub stream_replicas: usize,
}

impl IngestConfig {
    pub fn new(nats_url: impl Into<String>) -> Self {
        Self {
            nats_url: nats_url.into(),
            max_batch: 2000,
            max_wait: Duration::from_secs(1),
            max_fetch_bytes: 16 << 20,
            sources: Vec::new(),
            stream_replicas: 1,
        }
    }
}

/// How far a table's committed sequence may fall behind before an empty commit advances it.
const MAX_SEQ_LAG: u64 = 10_000;

const TABLES: [TableKind; 3] = [
    TableKind::RawEvents,
    TableKind::Events,
    TableKind::FailedEvents,
];

/// Runs [`run`] until `shutdown`, restarting it after errors (NATS or storage trouble) with
/// a growing pause. A restart is the same recovery path as a crash: it resumes from the
/// sequences committed in the tables, so nothing is lost or duplicated.
///
/// `health` gets an `ingest` check: passing while ingest consumes and commits, failing
/// (with the error) from a failure until the next successful start.
pub async fn run_supervised(
    cfg: IngestConfig,
    wh: Arc<Warehouse>,
    health: beacon_serve::Health,
    shutdown: watch::Receiver<bool>,
) {
    health.register(HEALTH_CHECK);
    let mut pause = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        match run(cfg.clone(), wh.clone(), &health, shutdown.clone()).await {
            Ok(()) => return,
            Err(e) => {
                tracing::error!(error = %e, "ingest failed; restarting in {pause:?}");
                metrics::counter!("beacon_ingest_restarts_total").increment(1);
                health.set(HEALTH_CHECK, Err(e.to_string()));
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            pause = Duration::from_millis(200);
        }
        let mut stop = shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}

/// How long past its `expires` a pull may stay unanswered before ingest starts over.
const PULL_SLACK: Duration = Duration::from_secs(10);

/// How often [`sample_backlog`] looks.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);

/// Keeps `beacon_ingest_consumer_pending` (messages not yet committed: undelivered plus
/// delivered but unacknowledged) current from the consumer's state on the bus, on a
/// connection of its own, until `shutdown`: the commit loop updates it too, but not while it
/// is stalled or not running (a warehouse that fails or cannot be opened), which is when
/// the figure matters most. Run it beside ingest, started before the warehouse is opened.
pub async fn sample_backlog(nats_url: String, mut shutdown: watch::Receiver<bool>) {
    let mut js = None;
    loop {
        if js.is_none() {
            match async_nats::ConnectOptions::new()
                .name("beacon-ingest-backlog")
                .connect(bus::servers(&nats_url))
                .await
            {
                Ok(c) => js = Some(jetstream::new(c)),
                Err(e) => tracing::debug!(error = %e, "backlog sampler: no bus yet"),
            }
        }
        if let Some(js) = &js {
            match consumer_backlog(js).await {
                Ok(n) => metrics::gauge!("beacon_ingest_consumer_pending", "consumer" => bus::INGEST_CONSUMER)
                    .set(n as f64),
                // The consumer is re-created on every ingest start; the next sample finds it.
                Err(e) => tracing::debug!(error = %e, "backlog sampler"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(BACKLOG_EVERY) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

async fn consumer_backlog(js: &jetstream::Context) -> Result<u64, String> {
    let stream = js
        .get_stream(bus::EVENTS_STREAM)
        .await
        .map_err(|e| e.to_string())?;
    // On a hub: how its sources (the regions' leaf streams) are doing. A source that stays
    // inactive after a link or leaf restart holds events back without a lag to show for it
    // (docs/RELIABILITY.md).
    let sources = &stream.cached_info().sources;
    if !sources.is_empty() {
        let inactive = sources.iter().filter(|s| s.active.is_none()).count();
        metrics::gauge!("beacon_ingest_sources_inactive").set(inactive as f64);
        let lag: u64 = sources.iter().map(|s| s.lag).sum();
        metrics::gauge!("beacon_ingest_sources_lag").set(lag as f64);
    }
    let info = stream
        .consumer_info(bus::INGEST_CONSUMER)
        .await
        .map_err(|e| e.to_string())?;
    Ok(info.num_pending + info.num_ack_pending as u64)
}

/// Creates or updates the hub's events stream: no subjects of its own (events reach the hub
/// only through the regions' streams, so none is stored twice), a source per region's leaf
/// domain. The hub dedupes a batch on its id (`Nats-Msg-Id`, kept by sourcing) within its
/// window; a source resumes after the last message it stored when a link comes back.
pub async fn ensure_hub_stream(
    js: &jetstream::Context,
    domains: &[String],
    replicas: usize,
) -> Result<(), IngestError> {
    use jetstream::stream;
    let sources = domains
        .iter()
        .map(|domain| stream::Source {
            name: bus::EVENTS_STREAM.into(),
            // `external`, not `domain`: the client would send a field the server refuses.
            external: Some(stream::External {
                api_prefix: format!("$JS.{domain}.API"),
                delivery_prefix: None,
            }),
            ..Default::default()
        })
        .collect();
    js.create_or_update_stream(stream::Config {
        name: bus::EVENTS_STREAM.into(),
        sources: Some(sources),
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age: Duration::from_secs(bus::EVENTS_MAX_AGE_SECS),
        duplicate_window: Duration::from_secs(bus::EVENTS_DUPLICATE_WINDOW_SECS),
        num_replicas: replicas.max(1),
        ..Default::default()
    })
    .await
    .map_err(|e| IngestError::Nats(format!("the hub's events stream: {e}")))?;
    Ok(())
}

/// The name of ingest's readiness check.
pub const HEALTH_CHECK: &str = "ingest";

/// Runs until `shutdown` turns true (finishing the batch in hand) or an error occurs.
pub async fn run(
    cfg: IngestConfig,
    wh: Arc<Warehouse>,
    health: &beacon_serve::Health,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let client = async_nats::ConnectOptions::new()
        .name("beacon-ingest")
        .connect(bus::servers(&cfg.nats_url))
        .await
        .map_err(nats)?;
    let js = jetstream::new(client);
    if !cfg.sources.is_empty() {
        ensure_hub_stream(&js, &cfg.sources, cfg.stream_replicas).await?;
    }
    let mut stream = loop {
        match js.get_stream(bus::EVENTS_STREAM).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::info!(error = %e, "waiting for the events stream (created by the first edge)");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
            }
        }
    };

    let mut committed: HashMap<TableKind, u64> = HashMap::new();
    for kind in TABLES {
        committed.insert(kind, wh.committed_seq(kind).await?);
    }
    let start = committed.values().copied().min().unwrap_or(0);
    let _ = stream.delete_consumer(bus::INGEST_CONSUMER).await;
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(bus::INGEST_CONSUMER.into()),
            deliver_policy: if start == 0 {
                consumer::DeliverPolicy::All
            } else {
                consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start + 1,
                }
            },
            ack_policy: consumer::AckPolicy::All,
            ack_wait: Duration::from_secs(300),
            max_ack_pending: (cfg.max_batch as i64) * 4,
            ..Default::default()
        })
        .await
        .map_err(nats)?;
    let last_seq = stream.info().await.map_err(nats)?.state.last_sequence;
    tracing::info!(
        from = start + 1,
        stream_last = last_seq,
        ?committed,
        "ingest started"
    );

    let mut writer = Writer::new(wh.clone(), committed).await?;
    health.set(HEALTH_CHECK, Ok(()));

    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let mut batch = consumer
            .batch()
            .max_messages(cfg.max_batch)
            .max_bytes(cfg.max_fetch_bytes)
            .expires(cfg.max_wait)
            .messages()
            .await
            .map_err(nats)?;
        let mut received = Vec::new();
        let mut last = None;
        loop {
            // A pull ends by `expires` at the latest; one whose answer was lost (a hub
            // restarting under it) would otherwise wait forever, silently.
            let next = tokio::select! {
                m = tokio::time::timeout(cfg.max_wait + PULL_SLACK, batch.next()) => match m {
                    Ok(m) => m,
                    Err(_) => {
                        return Err(IngestError::Nats(format!(
                            "a pull got no answer within {:?}",
                            cfg.max_wait + PULL_SLACK
                        )))
                    }
                },
                _ = shutdown.changed() => break,
            };
            let msg = match next {
                Some(Ok(msg)) => msg,
                // A status ends the pull (e.g. 409 when `max_bytes` is reached); a broken
                // connection surfaces on the next pull request instead.
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "pull ended");
                    break;
                }
                None => break,
            };
            let seq = msg.info().map_err(nats)?.stream_sequence;
            received.push(decode(seq, &msg.payload));
            last = Some(msg);
        }
        let Some(last) = last else { continue };
        let started = Instant::now();
        let envelopes = received.len();
        let (rows, max_seq) = writer.commit(received).await?;
        metrics::histogram!("beacon_ingest_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("beacon_ingest_envelopes_total").increment(envelopes as u64);
        metrics::counter!("beacon_ingest_rows_total").increment(rows as u64);
        metrics::gauge!("beacon_ingest_committed_sequence").set(max_seq as f64);
        // What the consumer still had to deliver when the batch's last message came: the
        // backlog behind this commit (once acknowledged below, nothing else is pending).
        if let Ok(info) = last.info() {
            metrics::gauge!("beacon_ingest_consumer_pending", "consumer" => bus::INGEST_CONSUMER)
                .set(info.pending as f64);
        }
        // AckPolicy::All: acking the last message acks the whole batch.
        last.double_ack().await.map_err(nats)?;
        health.set(HEALTH_CHECK, Ok(()));
        tracing::debug!(
            envelopes,
            rows,
            max_seq,
            ms = started.elapsed().as_millis() as u64,
            "committed"
        );
    }
}

/// Writes consumed envelopes into the three tables, exactly once: each table skips the
/// sequences it already holds and commits its own watermark ([`SEQ_PROPERTY`]).
pub struct Writer {
    wh: Arc<Warehouse>,
    schemas: HashMap<TableKind, arrow::datatypes::SchemaRef>,
    committed: HashMap<TableKind, u64>,
}

impl Writer {
    /// `committed`: each table's watermark, as read from its current snapshot.
    pub async fn new(
        wh: Arc<Warehouse>,
        committed: HashMap<TableKind, u64>,
    ) -> Result<Self, IngestError> {
        let mut schemas = HashMap::new();
        for kind in TABLES {
            schemas.insert(kind, arrow_schema(&wh.table(kind).await?)?);
        }
        Ok(Self {
            wh,
            schemas,
            committed,
        })
    }

    /// Converts and commits `received` (in stream order) to every table that does not hold
    /// it yet. The tables are written concurrently, each on its own task (conversion, sort
    /// and Parquet encoding are CPU work): one commit costs the slowest table, not the sum.
    /// Returns (rows written, highest sequence). On an error, the tables that committed keep
    /// their new watermark and the rest are retried from the stream.
    pub async fn commit(&mut self, received: Vec<Received>) -> Result<(usize, u64), IngestError> {
        let max_seq = received.iter().map(|r| r.seq).max().unwrap_or(0);
        let received = Arc::new(received);
        let mut tasks = Vec::new();
        for kind in TABLES {
            let done = self.committed[&kind];
            if !received.iter().any(|r| r.seq > done) {
                continue;
            }
            let (wh, received) = (self.wh.clone(), received.clone());
            let schema = self.schemas[&kind].clone();
            tasks.push(tokio::spawn(async move {
                let todo: Vec<&Received> = received.iter().filter(|r| r.seq > done).collect();
                let batch = match kind {
                    TableKind::RawEvents => convert::events_batch(&schema, &todo, false)?,
                    TableKind::Events => convert::events_batch(&schema, &todo, true)?,
                    _ => convert::failures_batch(&schema, &todo)?,
                };
                // Tables without rows for these messages need no commit: their sequence may
                // lag but they hold nothing from the skipped range, so a replay adds nothing.
                // Once the lag is large, an empty commit moves the sequence on, so a restart
                // does not re-read days of stream for a table that rarely gets rows
                // (failed_events).
                if batch.num_rows() == 0 && max_seq - done < MAX_SEQ_LAG {
                    return Ok::<_, IngestError>((kind, 0, false));
                }
                let rows = batch.num_rows();
                wh.append(
                    kind,
                    batch,
                    HashMap::from([(SEQ_PROPERTY.to_string(), max_seq.to_string())]),
                )
                .await?;
                Ok((kind, rows, true))
            }));
        }
        let mut rows = 0;
        let mut first_error = None;
        for task in tasks {
            match task.await {
                Ok(Ok((kind, n, wrote))) => {
                    rows += n;
                    if wrote {
                        self.committed.insert(kind, max_seq);
                    }
                }
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(join) => {
                    first_error.get_or_insert(IngestError::Task(join.to_string()));
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok((rows, max_seq)),
        }
    }
}

/// Decodes an envelope; anything unreadable becomes a `failed_events` row, not a lost message.
pub fn decode(seq: u64, payload: &[u8]) -> Received {
    let envelope = match Envelope::from_json(payload) {
        Ok(env) if beacon_proto::envelope::is_supported(env.v) => env,
        Ok(env) => unreadable(
            payload,
            format!("unsupported envelope version {}", env.v),
            Some(env),
        ),
        Err(e) => unreadable(payload, format!("undecodable envelope: {e}"), None),
    };
    Received { seq, envelope }
}

fn unreadable(payload: &[u8], reason: String, env: Option<Envelope>) -> Envelope {
    let (batch_id, merchant_id, edge_id, received_at) = match env {
        Some(e) => (e.batch_id, e.merchant_id, e.edge_id, e.received_at),
        None => (String::new(), String::new(), String::new(), now_ms()),
    };
    Envelope::undecodable(batch_id, merchant_id, edge_id, received_at, payload, reason)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
