//! Publishing batch envelopes to JetStream, acknowledged.
//!
//! A batch counts as accepted only when JetStream has acknowledged it. Retries reuse the
//! envelope's `batch_id` as `Nats-Msg-Id`, so a publish whose ack was lost is not stored
//! twice (JetStream drops it inside the duplicate window).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use beacon_proto::envelope::Encoding;
use beacon_proto::{bus, Envelope};
use bytes::Bytes;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Retrying cannot help: the envelope is over the server's message size limit.
    #[error("batch {batch_id} is {size} bytes as an envelope, over the bus limit of {max} bytes: send smaller batches")]
    TooLarge {
        batch_id: String,
        size: usize,
        max: usize,
    },
    #[error("JetStream did not acknowledge batch {batch_id} within {waited:?}: {last}")]
    NotAcknowledged {
        batch_id: String,
        waited: Duration,
        last: String,
    },
}

#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    /// The server's largest message; bigger envelopes are refused up front.
    max_payload: usize,
    encoding: Encoding,
    /// How long to keep retrying one batch before telling the client to retry later.
    pub deadline: Duration,
    outcomes: Arc<Outcomes>,
}

/// The latest publish outcomes, for readiness: a bus that answers questions but does not
/// store (a full disk) must not look ready.
#[derive(Default)]
pub struct Outcomes {
    /// Milliseconds since `epoch` (0: never).
    last_ok: AtomicU64,
    last_failure: AtomicU64,
    error: Mutex<String>,
    epoch: std::sync::OnceLock<Instant>,
}

/// How long a failed publish keeps the edge unready without a success after it. Bounded, so
/// an edge that a load balancer stopped sending to gets traffic again and can find out.
const FAILURE_MEMORY: Duration = Duration::from_secs(10);

impl Outcomes {
    fn now(&self) -> u64 {
        self.epoch.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
    }

    pub(crate) fn ok(&self) {
        self.last_ok.store(self.now(), Ordering::Relaxed);
    }

    pub(crate) fn failed(&self, error: &str) {
        error.clone_into(&mut self.error.lock().unwrap_or_else(|p| p.into_inner()));
        self.last_failure.store(self.now(), Ordering::Relaxed);
    }

    /// `Err` while the latest publish failed, within the last [`FAILURE_MEMORY`].
    pub fn check(&self) -> Result<(), String> {
        let (ok, failed) = (
            self.last_ok.load(Ordering::Relaxed),
            self.last_failure.load(Ordering::Relaxed),
        );
        if failed > ok && self.now() - failed < FAILURE_MEMORY.as_millis() as u64 {
            let error = self.error.lock().unwrap_or_else(|p| p.into_inner()).clone();
            return Err(format!("JetStream does not store: {error}"));
        }
        Ok(())
    }
}

/// Creates (or updates) the events stream. Every role calls this at start, so it does not
/// matter which starts first.
/// Readiness of the bus: JetStream answers for the events stream, and the latest writes
/// (if recent) were stored: event publishes, and the edge's status put every 5 s, which
/// finds a store that fails while no events arrive (a full disk still answers questions
/// but fails every write).
pub async fn probe(js: &jetstream::Context, writes: &[&Outcomes]) -> Result<(), String> {
    for outcomes in writes {
        outcomes.check()?;
    }
    let mut stream = js
        .get_stream(bus::EVENTS_STREAM)
        .await
        .map_err(|e| format!("JetStream: {e}"))?;
    stream
        .info()
        .await
        .map_err(|e| format!("JetStream stream {}: {e}", bus::EVENTS_STREAM))?;
    Ok(())
}

/// Creates the events stream, or brings an existing one's settings that the edge owns
/// (subjects, storage, retention, age, duplicate window) back to Beacon's. What others set
/// is kept: ingest's partitioning transform, an operator's replicas.
pub async fn ensure_stream(js: &jetstream::Context) -> Result<(), async_nats::Error> {
    let mut stream = match js.get_stream(bus::EVENTS_STREAM).await {
        Ok(stream) => stream,
        // Create-only: a stream that another role created meanwhile (ingest, partitioned)
        // is not overwritten but merged into below.
        Err(_) => match js
            .create_stream(stream::Config {
                num_replicas: 1,
                ..edge_settings(stream::Config::default())
            })
            .await
        {
            Ok(_) => return Ok(()),
            Err(_) => js.get_stream(bus::EVENTS_STREAM).await?,
        },
    };
    let have = stream.info().await?.config.clone();
    let wanted = edge_settings(have.clone());
    if wanted != have {
        js.update_stream(wanted).await?;
    }
    Ok(())
}

fn edge_settings(config: stream::Config) -> stream::Config {
    stream::Config {
        name: bus::EVENTS_STREAM.into(),
        subjects: vec![bus::EVENTS_SUBJECTS.into()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age: Duration::from_secs(bus::EVENTS_MAX_AGE_SECS),
        duplicate_window: Duration::from_secs(bus::EVENTS_DUPLICATE_WINDOW_SECS),
        ..config
    }
}

impl Publisher {
    pub fn new(js: jetstream::Context, max_payload: usize, encoding: Encoding) -> Self {
        Self {
            js,
            max_payload,
            encoding,
            deadline: Duration::from_secs(10),
            outcomes: Arc::default(),
        }
    }

    /// Its publish outcomes (shared), for a readiness check.
    pub fn outcomes(&self) -> Arc<Outcomes> {
        self.outcomes.clone()
    }

    /// The largest envelope the server takes (its `max_payload`).
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Publishes and waits for JetStream's ack; returns the stream sequence.
    pub async fn publish(&self, envelope: &Envelope) -> Result<u64, PublishError> {
        let payload = Bytes::from(envelope.encode(self.encoding));
        if payload.len() > self.max_payload {
            return Err(PublishError::TooLarge {
                batch_id: envelope.batch_id.clone(),
                size: payload.len(),
                max: self.max_payload,
            });
        }
        let subject = bus::events_subject(&envelope.merchant_id);
        let started = Instant::now();
        let mut backoff = Duration::from_millis(20);
        loop {
            let mut headers = HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                envelope.batch_id.as_str(),
            );
            let attempt = async {
                self.js
                    .publish_with_headers(subject.clone(), headers, payload.clone())
                    .await?
                    .await
            };
            let last = match attempt.await {
                Ok(ack) => {
                    self.outcomes.ok();
                    metrics::histogram!("beacon_edge_publish_seconds")
                        .record(started.elapsed().as_secs_f64());
                    // With ingest's committed sequence: the bus backlog (docs/OPERATIONS.md).
                    metrics::gauge!("beacon_edge_published_sequence").set(ack.sequence as f64);
                    if ack.duplicate {
                        tracing::debug!(batch_id = %envelope.batch_id, "batch already stored (retry)");
                    }
                    return Ok(ack.sequence);
                }
                Err(e) => e.to_string(),
            };
            self.outcomes.failed(&last);
            metrics::counter!("beacon_edge_publish_failures_total").increment(1);
            if started.elapsed() + backoff > self.deadline {
                return Err(PublishError::NotAcknowledged {
                    batch_id: envelope.batch_id.clone(),
                    waited: started.elapsed(),
                    last,
                });
            }
            tracing::warn!(batch_id = %envelope.batch_id, error = %last, "publish failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}
