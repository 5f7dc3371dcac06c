//! Publishing batch envelopes to JetStream, acknowledged.
//!
//! A batch counts as accepted only when JetStream has acknowledged it. Retries reuse the
//! envelope's `batch_id` as `Nats-Msg-Id`, so a publish whose ack was lost is not stored
//! twice (JetStream drops it inside the duplicate window).

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
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
    /// How long to keep retrying one batch before telling the client to retry later.
    pub deadline: Duration,
}

/// Creates (or updates) the events stream. Every role calls this at start, so it does not
/// matter which starts first.
pub async fn ensure_stream(js: &jetstream::Context) -> Result<(), async_nats::Error> {
    js.create_or_update_stream(stream::Config {
        name: bus::EVENTS_STREAM.into(),
        subjects: vec![bus::EVENTS_SUBJECTS.into()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        // Raw events live on in Iceberg; the stream only has to outlast ingest outages.
        max_age: Duration::from_secs(7 * 24 * 3600),
        duplicate_window: Duration::from_secs(120),
        num_replicas: 1,
        ..Default::default()
    })
    .await?;
    Ok(())
}

impl Publisher {
    pub fn new(js: jetstream::Context, max_payload: usize) -> Self {
        Self {
            js,
            max_payload,
            deadline: Duration::from_secs(10),
        }
    }

    /// The largest envelope the server takes (its `max_payload`).
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Publishes and waits for JetStream's ack; returns the stream sequence.
    pub async fn publish(&self, envelope: &Envelope) -> Result<u64, PublishError> {
        let payload = Bytes::from(envelope.to_json());
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
                    if ack.duplicate {
                        tracing::debug!(batch_id = %envelope.batch_id, "batch already stored (retry)");
                    }
                    return Ok(ack.sequence);
                }
                Err(e) => e.to_string(),
            };
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
