//! core-ingest: moves batch envelopes from JetStream into Iceberg, exactly once.
//!
//! The Iceberg tables, not the consumer, are the record of progress: every commit carries
//! the last stream sequence it contains, per stream partition
//! ([`beacon_warehouse::tables::partition_seq_property`]). A partition's worker reads those
//! sequences and (re)creates the partition's durable consumer to deliver from the lowest
//! one + 1; each table then skips what it already holds. Messages are acked only after the
//! commits. So a crash at any point - before, between or after the three table commits, or
//! before the ack - neither loses nor duplicates a row.
//!
//! Several ingest processes share the partitions ([`leases`]); every commit is a
//! compare-and-swap that requires the partition's watermark it last saw, so two writers of
//! one partition (a process that lost its lease without noticing) cannot both commit.

pub mod convert;
pub mod dedupe;
pub mod dimensions;
mod leases;
pub mod sources;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use beacon_proto::bus::{self, Partition};
use beacon_proto::Envelope;
use beacon_warehouse::replace::Rewrite;
use beacon_warehouse::tables::{
    self, arrow_schema, partition_seq_property, snapshot_property, PARTITIONS_PROPERTY,
};
use beacon_warehouse::{TableKind, Warehouse, WarehouseError};
use futures::StreamExt;
use iceberg::spec::Operation;
use tokio::sync::watch;

use crate::convert::Received;
use crate::dedupe::Dedupe;

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
    #[error("partition {partition}: {table} was committed by another writer (its watermark is {found}, this one's was {expected}); starting over from the table")]
    Overtaken {
        partition: u32,
        table: String,
        expected: String,
        found: String,
    },
    #[error("{0}")]
    Config(String),
}

fn nats<E: std::fmt::Display>(e: E) -> IngestError {
    IngestError::Nats(e.to_string())
}

#[derive(Clone, Debug)]
pub struct IngestConfig {
    /// Shown redacted in `Debug`: the password never reaches a log.
    pub nats_url: bus::NatsUrl,
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
    /// How many partitions the stream is split into for ingest (at least what the tables
    /// record: partitions can only grow). 1: no split.
    pub partitions: u32,
    /// This process's name on the partition leases: unique among running ingest
    /// processes, and best the same across a restart (it then takes its partitions back
    /// at once instead of after their leases expire).
    pub owner: String,
    /// How long an event id stays known per partition ([`dedupe`]): an event whose merchant
    /// and id the partition stored within it is not stored again. Zero turns it off.
    pub dedupe_window: Duration,
}

impl IngestConfig {
    pub fn new(nats_url: impl Into<String>) -> Self {
        Self {
            nats_url: bus::NatsUrl::new(nats_url),
            max_batch: 2000,
            max_wait: Duration::from_secs(1),
            max_fetch_bytes: 16 << 20,
            sources: Vec::new(),
            stream_replicas: 1,
            partitions: 1,
            owner: default_owner(),
            dedupe_window: dedupe::DEFAULT_WINDOW,
        }
    }
}

/// `ingest-<pid>-<random>`: unique per process.
pub fn default_owner() -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("ingest-{}-{}", std::process::id(), &random[..8])
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
    let mut backoff = Backoff::default();
    let mut stop = shutdown.clone();
    loop {
        let started = Instant::now();
        let Err(e) = run(cfg.clone(), wh.clone(), &health, shutdown.clone()).await else {
            return;
        };
        tracing::error!(error = %e, "ingest failed; restarting in {:?}", backoff.pause);
        metrics::counter!("beacon_ingest_restarts_total").increment(1);
        health.set(HEALTH_CHECK, Err(e.to_string()));
        if !backoff.wait(started, &mut stop).await {
            return;
        }
    }
}

/// The pause before restarting something that failed: 200 ms, doubling to 10 s, and
/// starting afresh after a run that lasted a minute.
pub(crate) struct Backoff {
    pub(crate) pause: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            pause: Duration::from_millis(200),
        }
    }
}

impl Backoff {
    /// After a run (started at `started`) failed: waits the pause unless `stop` turns true;
    /// whether to go on.
    pub(crate) async fn wait(
        &mut self,
        started: Instant,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        if started.elapsed() > Duration::from_secs(60) {
            *self = Self::default();
        }
        let go_on = pause_unless_stopped(self.pause, stop).await;
        self.pause = (self.pause * 2).min(Duration::from_secs(10));
        go_on
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
pub async fn sample_backlog(nats_url: bus::NatsUrl, mut shutdown: watch::Receiver<bool>) {
    let mut js = None;
    let mut sources = sources::Watch::default();
    loop {
        if js.is_none() {
            match bus::connect(&nats_url, "beacon-ingest-backlog").await {
                Ok(c) => js = Some(jetstream::new(c)),
                Err(e) => tracing::debug!(error = %e, "backlog sampler: no bus yet"),
            }
        }
        if let Some(js) = &js {
            // (Ingest re-creates its consumers on every start; the next sample finds them.)
            if let Err(e) = sample_once(js, &mut sources).await {
                tracing::debug!(error = %e, "backlog sampler");
            }
        }
        if !pause_unless_stopped(BACKLOG_EVERY, &mut shutdown).await {
            return;
        }
    }
}

/// Waits `pause`, or less if `stop` turns true; whether to go on.
pub(crate) async fn pause_unless_stopped(
    pause: Duration,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(pause) => {}
        _ = stop.changed() => {}
    }
    !*stop.borrow()
}

/// One sample: every partition's backlog (the partitions are those whose consumers exist,
/// so no setting has to agree with ingest's), and on a hub its sources, a stalled one set
/// going again ([`sources`]).
async fn sample_once(js: &jetstream::Context, watch: &mut sources::Watch) -> Result<(), String> {
    let stream = js
        .get_stream(bus::EVENTS_STREAM)
        .await
        .map_err(|e| e.to_string())?;
    for (index, info) in beacon_proto::stores::current_ingest_consumers(&stream).await? {
        metrics::gauge!("beacon_ingest_consumer_pending", "consumer" => bus::ingest_consumer(index))
            .set((info.num_pending + info.num_ack_pending as u64) as f64);
    }
    if !stream.cached_info().sources.is_empty() {
        if let Err(e) = sources::look(js, watch).await {
            tracing::warn!(error = %e, "the hub's sources");
        }
    }
    Ok(())
}

/// Creates or updates the hub's events stream: no subjects of its own (events reach the hub
/// only through the regions' streams, so none is stored twice), a source per region's leaf
/// domain. The hub dedupes a batch on its id (`Nats-Msg-Id`, kept by sourcing) within its
/// window; a source resumes after the last message it stored when a link comes back.
pub async fn ensure_hub_stream(
    js: &jetstream::Context,
    domains: &[String],
    replicas: usize,
    partitions: u32,
) -> Result<(), IngestError> {
    use jetstream::stream;
    // Partitioned as the hub copies each message in (the regions' streams stay unsplit).
    let transforms: Vec<stream::SubjectTransform> = bus::partition_transform(partitions)
        .map(|(source, destination)| stream::SubjectTransform {
            source,
            destination,
        })
        .into_iter()
        .collect();
    let sources = domains
        .iter()
        .map(|domain| stream::Source {
            name: bus::EVENTS_STREAM.into(),
            // `external`, not `domain`: the client would send a field the server refuses.
            external: Some(stream::External {
                api_prefix: format!("$JS.{domain}.API"),
                delivery_prefix: None,
            }),
            subject_transforms: transforms.clone(),
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

/// Partitions this node's events stream `partitions` ways (a subject transform on the
/// stream the edges write to; the hub's partitions its sources instead). Batches stored
/// before keep their subjects and are read by partition 0.
async fn ensure_partitioned(
    stream: &mut jetstream::stream::Stream,
    js: &jetstream::Context,
    partitions: u32,
) -> Result<(), IngestError> {
    let Some((source, destination)) = bus::partition_transform(partitions) else {
        return Ok(());
    };
    let have = stream.info().await.map_err(nats)?.config.clone();
    if have.subjects.is_empty() {
        // A hub's stream (sources only): partitioned by `ensure_hub_stream`.
        return Ok(());
    }
    let wanted = jetstream::stream::SubjectTransform {
        source,
        destination,
    };
    if have.subject_transform.as_ref() != Some(&wanted) {
        let mut config = have;
        config.subject_transform = Some(wanted);
        js.update_stream(config)
            .await
            .map_err(|e| IngestError::Nats(format!("partitioning the events stream: {e}")))?;
        tracing::info!(partitions, "the events stream is partitioned");
    }
    Ok(())
}

/// Runs this process's share of the stream's partitions (all of them when it is the only
/// ingest process) until `shutdown` turns true (each worker finishing the batch in hand) or
/// a bus error occurs.
pub async fn run(
    mut cfg: IngestConfig,
    wh: Arc<Warehouse>,
    health: &beacon_serve::Health,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let client = bus::connect(&cfg.nats_url, "beacon-ingest")
        .await
        .map_err(nats)?;
    let js = jetstream::new(client);
    // Partitions only grow: the tables say how many there have been.
    for kind in TABLES {
        cfg.partitions = cfg
            .partitions
            .max(tables::stream_partitions(&wh.table(kind).await?));
    }
    cfg.partitions = cfg.partitions.max(1);
    if !cfg.sources.is_empty() {
        ensure_hub_stream(&js, &cfg.sources, cfg.stream_replicas, cfg.partitions).await?;
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
    ensure_partitioned(&mut stream, &js, cfg.partitions).await?;
    tracing::info!(partitions = cfg.partitions, owner = %cfg.owner, "ingest started");
    health.set(HEALTH_CHECK, Ok(()));
    leases::manage(&cfg, wh, js, health, shutdown).await
}

/// A commit slower than this marks ingest not ready until one succeeds (commits take well
/// under a second normally).
const SLOW_COMMIT: Duration = Duration::from_secs(10);

/// How long a partition stays idle before its `events` watermark is moved up to the
/// stream's end: the rollups aggregate up to the lowest partition's, so a partition
/// without traffic must not hold the others back.
const IDLE_ADVANCE: Duration = Duration::from_secs(2);

/// Ingests one partition until `stop` turns true (finishing the batch in hand) or an error.
pub(crate) async fn run_partition(
    cfg: IngestConfig,
    wh: Arc<Warehouse>,
    js: jetstream::Context,
    (partition, generation): (Partition, u64),
    health: beacon_serve::Health,
    stop: watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let mut stream = js.get_stream(bus::EVENTS_STREAM).await.map_err(nats)?;
    let mut writer = Writer::open(wh.clone(), partition).await?;
    let start = writer.resume_from();
    writer.dedupe = Dedupe::new(cfg.dedupe_window);
    prime(&stream, partition, start, &mut writer.dedupe, &stop).await?;
    // The previous owners' consumers go: nothing pulls from them again. (One the bus cannot
    // delete now is left behind: the new one does not depend on it.)
    for old in beacon_proto::stores::ingest_consumer_names(&stream, partition)
        .await
        .map_err(IngestError::Nats)?
    {
        if let Err(e) = stream.delete_consumer(&old).await {
            tracing::warn!(consumer = %old, error = %e, "could not delete a previous owner's consumer");
        }
    }
    let name = partition.consumer(generation);
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subjects: partition.filters(),
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
    // Metrics name the partition, not the owner's generation.
    let label = bus::ingest_consumer(partition.index);
    let last_seq = stream.info().await.map_err(nats)?.state.last_sequence;
    tracing::info!(
        consumer = %name,
        partition = partition.index,
        of = partition.count,
        from = start + 1,
        stream_last = last_seq,
        committed = ?writer.committed,
        "partition started"
    );
    health.set(HEALTH_CHECK, Ok(()));
    let mut last_commit = Instant::now();
    // The consumer numbers its deliveries from 1. AckPolicy::All acknowledges every delivery
    // below the one acked, so one that never arrived (its answer lost while a hub node
    // restarted under the pull) would be acknowledged unread, and the watermark would pass
    // it: a gap in the numbers stops the partition before it commits, and the restart reads
    // again from what is committed.
    let mut next_delivery = 1u64;

    loop {
        if *stop.borrow() {
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
        let mut stopping = stop.clone();
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
                _ = stopping.changed() => break,
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
            let info = msg.info().map_err(nats)?;
            let delivery = info.consumer_sequence;
            if delivery != next_delivery {
                metrics::counter!("beacon_ingest_delivery_gaps_total").increment(1);
                return Err(IngestError::Nats(format!(
                    "delivery {delivery} came where {next_delivery} was due: a delivery was lost on its way, so the partition starts over from what is committed"
                )));
            }
            next_delivery = delivery + 1;
            received.push(from_stream(&info, &msg.payload));
            last = Some(msg);
        }
        let Some(last) = last else {
            if partition.count > 1 && last_commit.elapsed() >= IDLE_ADVANCE {
                last_commit = Instant::now();
                advance_idle(&mut writer, &mut stream, &consumer).await?;
            }
            continue;
        };
        let started = Instant::now();
        let envelopes = received.len();
        let commit = writer.commit(received);
        tokio::pin!(commit);
        let (rows, max_seq) = tokio::select! {
            done = &mut commit => done?,
            // A catalog or object store that stopped answering makes a commit hang (up to the
            // connection pool's 30 s acquire timeout, then a restart that hangs again): say
            // so at once, so `/readyz` means "can commit", and keep waiting for the answer.
            _ = tokio::time::sleep(SLOW_COMMIT) => {
                tracing::warn!(partition = partition.index, "a commit has been running for over {SLOW_COMMIT:?}");
                health.set(
                    HEALTH_CHECK,
                    Err(format!(
                        "partition {}: a commit has been running for over {SLOW_COMMIT:?} (is the catalog or the object store answering?)",
                        partition.index
                    )),
                );
                commit.await?
            }
        };
        last_commit = Instant::now();
        metrics::histogram!("beacon_ingest_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("beacon_ingest_envelopes_total").increment(envelopes as u64);
        metrics::counter!("beacon_ingest_rows_total").increment(rows as u64);
        metrics::gauge!("beacon_ingest_committed_sequence", "consumer" => label.clone())
            .set(max_seq as f64);
        // What the consumer still had to deliver when the batch's last message came: the
        // backlog behind this commit (once acknowledged below, nothing else is pending).
        if let Ok(info) = last.info() {
            metrics::gauge!("beacon_ingest_consumer_pending", "consumer" => label.clone())
                .set(info.pending as f64);
        }
        // AckPolicy::All: acking the last message acks the whole batch.
        last.double_ack().await.map_err(nats)?;
        health.set(HEALTH_CHECK, Ok(()));
        tracing::debug!(
            partition = partition.index,
            envelopes,
            rows,
            max_seq,
            ms = started.elapsed().as_millis() as u64,
            "committed"
        );
    }
}

/// Moves an idle partition's `events` watermark up to the stream's last sequence, if
/// nothing of the partition is pending: every one of its messages up to there is then
/// committed (the last sequence is read before the consumer's state, so a message stored
/// after it is either above it or counted as pending).
async fn advance_idle(
    writer: &mut Writer,
    stream: &mut jetstream::stream::Stream,
    consumer: &consumer::PullConsumer,
) -> Result<(), IngestError> {
    let last = stream.info().await.map_err(nats)?.state.last_sequence;
    if last <= writer.committed_seq(TableKind::Events) {
        return Ok(());
    }
    let mut consumer = consumer.clone();
    let info = consumer.info().await.map_err(nats)?;
    if info.num_pending > 0 || info.num_ack_pending > 0 {
        return Ok(());
    }
    writer.advance(TableKind::Events, last).await
}

/// A table's watermark for one partition as last read or committed: the property's exact
/// text (empty when absent), which the next commit requires to be unchanged.
#[derive(Debug, Clone, Default)]
struct Mark {
    seq: u64,
    text: String,
}

/// Writes one partition's envelopes into the three tables, exactly once: each table skips
/// the sequences it already holds and commits its own watermark for the partition, on the
/// condition that nobody else moved it meanwhile.
pub struct Writer {
    wh: Arc<Warehouse>,
    partition: Partition,
    schemas: HashMap<TableKind, arrow::datatypes::SchemaRef>,
    committed: HashMap<TableKind, Mark>,
    /// Verdicts on every message this writer is given, in stream order.
    pub dedupe: Dedupe,
}

impl Writer {
    /// Reads each table's watermark for `partition` from its current snapshot.
    pub async fn open(wh: Arc<Warehouse>, partition: Partition) -> Result<Self, IngestError> {
        let key = partition_seq_property(partition.index);
        let mut schemas = HashMap::new();
        let mut committed = HashMap::new();
        for kind in TABLES {
            let table = wh.table(kind).await?;
            let text = snapshot_property(&table, &key);
            let seq = text.parse().unwrap_or(0);
            committed.insert(kind, Mark { seq, text });
            schemas.insert(kind, arrow_schema(&table)?);
        }
        Ok(Self {
            wh,
            partition,
            schemas,
            committed,
            dedupe: Dedupe::new(dedupe::DEFAULT_WINDOW),
        })
    }

    /// The lowest watermark of the three tables: delivery resumes after it.
    pub fn resume_from(&self) -> u64 {
        self.committed.values().map(|m| m.seq).min().unwrap_or(0)
    }

    pub fn committed_seq(&self, kind: TableKind) -> u64 {
        self.committed.get(&kind).map_or(0, |m| m.seq)
    }

    /// Converts and commits `received` (in stream order) to every table that does not hold
    /// it yet. The tables are written concurrently, each on its own task (conversion, sort
    /// and Parquet encoding are CPU work): one commit costs the slowest table, not the sum.
    /// Returns (rows written, highest sequence). On an error, the tables that committed keep
    /// their new watermark and the rest are retried from the stream.
    pub async fn commit(
        &mut self,
        mut received: Vec<Received>,
    ) -> Result<(usize, u64), IngestError> {
        let max_seq = received.iter().map(|r| r.seq).max().unwrap_or(0);
        // Every message gets its verdict, whichever tables still need it: a replay after a
        // crash asks again and must hear the same.
        let (mut raw_dups, mut processed_dups) = (0, 0);
        for r in &mut received {
            r.duplicates = self.dedupe.observe(&r.envelope, r.stored_at);
            raw_dups += r.duplicates.raw.len();
            processed_dups += r.duplicates.processed.len();
        }
        if raw_dups + processed_dups > 0 {
            metrics::counter!("beacon_ingest_duplicates_total", "table" => "raw_events")
                .increment(raw_dups as u64);
            metrics::counter!("beacon_ingest_duplicates_total", "table" => "events")
                .increment(processed_dups as u64);
            tracing::debug!(
                partition = self.partition.index,
                raw = raw_dups,
                processed = processed_dups,
                "events already stored left out"
            );
        }
        metrics::gauge!("beacon_ingest_dedupe_keys", "consumer" => bus::ingest_consumer(self.partition.index))
            .set(self.dedupe.len() as f64);
        let received = Arc::new(received);
        let mut tasks = Vec::new();
        for kind in TABLES {
            let mark = self.committed[&kind].clone();
            let done = mark.seq;
            if !received.iter().any(|r| r.seq > done) {
                continue;
            }
            let (wh, received) = (self.wh.clone(), received.clone());
            let schema = self.schemas[&kind].clone();
            let partition = self.partition;
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
                // One load serves the write and the commit's first attempt.
                let table = wh.table(kind).await?;
                let files = wh.write_files_to(kind, &table, batch).await?;
                commit_files(&wh, kind, Some(table), partition, &mark, files, max_seq).await?;
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
                        self.committed.insert(kind, Mark::at(max_seq));
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

    /// Moves `kind`'s watermark up to `seq` with an empty commit (the caller knows every
    /// message of the partition up to `seq` is committed).
    async fn advance(&mut self, kind: TableKind, seq: u64) -> Result<(), IngestError> {
        let mark = self.committed[&kind].clone();
        commit_files(&self.wh, kind, None, self.partition, &mark, Vec::new(), seq).await?;
        self.committed.insert(kind, Mark::at(seq));
        Ok(())
    }
}

impl Mark {
    fn at(seq: u64) -> Self {
        Self {
            seq,
            text: seq.to_string(),
        }
    }
}

/// One commit of `files` to `kind` with the partition's watermark `seq`, requiring the
/// watermark still to be `mark` (a compare-and-swap on the catalog row, re-based over other
/// partitions' and jobs' commits).
async fn commit_files(
    wh: &Warehouse,
    kind: TableKind,
    loaded: Option<iceberg::table::Table>,
    partition: Partition,
    mark: &Mark,
    files: Vec<iceberg::spec::DataFile>,
    seq: u64,
) -> Result<(), IngestError> {
    let key = partition_seq_property(partition.index);
    let mut rewrite = Rewrite::new(
        Operation::Append,
        format!("ingest/{}/{}", partition.index, seq),
    );
    rewrite.added = files;
    rewrite.properties = HashMap::from([(key.clone(), seq.to_string())]);
    if partition.count > 1 {
        rewrite
            .properties
            .insert(PARTITIONS_PROPERTY.into(), partition.count.to_string());
    }
    rewrite.require = vec![(key, mark.text.clone())];
    // The files are ours: deleted again unless a snapshot may reference them (an unknown
    // outcome keeps them; the restart reads the watermark it left).
    match wh.replace_owned(kind, loaded, &rewrite).await {
        // `AlreadyApplied`: a writer that lost this partition while it committed got the
        // same range in first (it read the same watermark, so it wrote the same rows).
        Ok(_) => Ok(()),
        Err(WarehouseError::Stale {
            table,
            expected,
            found,
            ..
        }) => Err(IngestError::Overtaken {
            partition: partition.index,
            table,
            expected,
            found,
        }),
        Err(e) => Err(IngestError::Warehouse(e)),
    }
}

/// How long the rebuild of the deduplication state waits for the next message before it
/// gives up (and the partition starts over).
const PRIME_STALL: Duration = Duration::from_secs(30);

/// Rebuilds `dedupe` as it stood after message `start` of `partition`: every message of
/// the partition from `start`'s storage time minus the lookback, up to `start`, observed in
/// order. Then the messages after `start` get the verdicts they had (or would have had)
/// before the restart.
async fn prime(
    stream: &jetstream::stream::Stream,
    partition: Partition,
    start: u64,
    dedupe: &mut Dedupe,
    stop: &watch::Receiver<bool>,
) -> Result<(), IngestError> {
    if !dedupe.enabled() || start == 0 {
        return Ok(());
    }
    let started = Instant::now();
    let at = match stream.get_raw_message(start).await {
        Ok(m) => m.time,
        Err(e) => {
            // Gone (expired or purged): so is everything before it, unless the window is
            // longer than the stream keeps messages.
            tracing::warn!(partition = partition.index, seq = start, error = %e,
                "the resume point is no longer in the stream; deduplication starts empty");
            return Ok(());
        }
    };
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subjects: partition.filters(),
            deliver_policy: consumer::DeliverPolicy::ByStartTime {
                start_time: at - dedupe.lookback(),
            },
            ..Default::default()
        })
        .await
        .map_err(nats)?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(());
    }
    let mut messages = consumer.messages().await.map_err(nats)?;
    let (mut read, mut stopping) = (0u64, stop.clone());
    loop {
        let next = tokio::select! {
            m = tokio::time::timeout(PRIME_STALL, messages.next()) => m.map_err(|_| {
                IngestError::Nats(format!("rebuilding deduplication: no message within {PRIME_STALL:?}"))
            })?,
            _ = stopping.changed() => return Ok(()),
        };
        let Some(msg) = next else { break };
        let msg = msg.map_err(nats)?;
        let info = msg.info().map_err(nats)?;
        let pending = info.pending;
        let r = from_stream(&info, &msg.payload);
        if r.seq > start {
            break;
        }
        dedupe.observe(&r.envelope, r.stored_at);
        read += 1;
        if r.seq == start || pending == 0 {
            break;
        }
    }
    tracing::info!(
        partition = partition.index,
        messages = read,
        keys = dedupe.len(),
        window = ?dedupe.window(),
        ms = started.elapsed().as_millis() as u64,
        "deduplication state rebuilt from the stream"
    );
    Ok(())
}

/// A message read from the stream: its envelope at its sequence, stamped with the time the
/// stream stored it.
fn from_stream(info: &jetstream::message::Info, payload: &[u8]) -> Received {
    let mut r = decode(info.stream_sequence, payload);
    r.stored_at = (info.published.unix_timestamp_nanos() / 1_000_000) as i64;
    r
}

/// Decodes an envelope; anything unreadable becomes a `failed_events` row, not a lost message.
/// Its storage time is taken to be the edge's receipt time until the caller knows better.
pub fn decode(seq: u64, payload: &[u8]) -> Received {
    let envelope = match Envelope::decode(payload) {
        Ok(env) if beacon_proto::envelope::is_supported(env.v) => env,
        Ok(env) => unreadable(
            payload,
            format!("unsupported envelope version {}", env.v),
            Some(env),
        ),
        Err(e) => unreadable(payload, format!("undecodable envelope: {e}"), None),
    };
    Received::new(seq, envelope)
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

#[cfg(test)]
mod tests {
    use super::*;
    use beacon_proto::envelope::ENVELOPE_VERSION;
    use beacon_proto::Event;

    #[test]
    fn the_config_never_shows_the_bus_password() {
        let cfg =
            IngestConfig::new("tls://beacon:s3cret@127.0.0.1:4222,tls://beacon:s3cret@h2:4222");
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("h2:4222"),
            "{shown}"
        );
    }

    /// A batch envelope at stream sequence `seq` with `n` events.
    fn received(seq: u64, n: usize) -> Received {
        let raw = (0..n)
            .map(|i| Event {
                event_id: format!("e{seq}-{i}"),
                merchant_id: "m".into(),
                name: "pageview".into(),
                ts: 1_700_000_000_000,
                received_at: 1_700_000_000_000,
                ..Default::default()
            })
            .collect();
        let env = Envelope {
            v: ENVELOPE_VERSION,
            batch_id: format!("b{seq}"),
            merchant_id: "m".into(),
            edge_id: "edge".into(),
            received_at: 1_700_000_000_000,
            pipeline: None,
            raw,
            processed: None,
            canary: None,
            failures: Vec::new(),
            shares: Vec::new(),
        };
        decode(seq, &env.to_json())
    }

    async fn count(wh: &Warehouse, table: &str) -> i64 {
        // A fresh session: the shared one may reuse table metadata for a moment.
        let batches = wh
            .session()
            .await
            .expect("session")
            .sql(&format!("SELECT count(*) AS n FROM {table}"))
            .await
            .expect("plan")
            .collect()
            .await
            .expect("count");
        let rows = beacon_warehouse::output::json_rows(&batches).expect("rows");
        rows[0]["n"].as_i64().expect("n")
    }

    /// Two writers of one partition (a process that lost it without noticing, and its
    /// successor): whichever commits second from the same watermark is refused, and nothing
    /// is stored twice. Writers of other partitions commit alongside, each keeping its own
    /// watermark, and the table's floor is the lowest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_writer_of_a_partition_cannot_commit_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wh = Arc::new(Warehouse::open(dir.path()).await.expect("warehouse"));
        let p1 = Partition { index: 1, count: 2 };
        let mut zombie = Writer::open(wh.clone(), p1).await.expect("writer");
        let mut successor = Writer::open(wh.clone(), p1).await.expect("writer");
        let mut other = Writer::open(wh.clone(), Partition { index: 0, count: 2 })
            .await
            .expect("writer");

        successor
            .commit(vec![received(2, 3), received(4, 2)])
            .await
            .expect("successor commits");
        other
            .commit(vec![received(3, 4)])
            .await
            .expect("partition 0 commits");
        let err = zombie
            .commit(vec![received(2, 3)])
            .await
            .expect_err("the stale writer is refused");
        assert!(
            matches!(err, IngestError::Overtaken { partition: 1, .. }),
            "{err}"
        );
        assert_eq!(count(&wh, "raw_events").await, 9);
        assert_eq!(count(&wh, "events").await, 9);
        // A stale writer with exactly the range that landed (it read the same watermark, so
        // its batch is the same): its commit is recognised as done, and its files dropped.
        let mut twin = Writer::open(wh.clone(), p1).await.expect("writer");
        twin.committed = zombie.committed.clone();
        twin.commit(vec![received(2, 3), received(4, 2)])
            .await
            .expect("already applied");
        assert_eq!(count(&wh, "raw_events").await, 9);
        assert_eq!(count(&wh, "events").await, 9);

        // The successor goes on from its own watermark; a writer opened now resumes after it.
        successor
            .commit(vec![received(6, 1)])
            .await
            .expect("next commit");
        assert_eq!(
            Writer::open(wh.clone(), p1)
                .await
                .expect("writer")
                .resume_from(),
            0
        );
        let events = wh.table(TableKind::Events).await.expect("events");
        assert_eq!(snapshot_property(&events, "beacon.stream-seq.1"), "6");
        assert_eq!(snapshot_property(&events, tables::SEQ_PROPERTY), "3");
        assert_eq!(tables::stream_partitions(&events), 2);
        assert_eq!(tables::stream_floor(&events), 3);
        assert_eq!(count(&wh, "events").await, 10);
    }
}
