//! A client over several edges: it uses the first that answers (callers order them with
//! `locate`, nearest first), notices a dead edge within about a second (short QUIC idle
//! timeout), and resends the unacknowledged batch to the next edge under the *same* batch
//! id, so a batch the dead edge had already made durable is not stored twice (JetStream
//! drops the repeat inside its two-minute duplicate window).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use beacon_proto::wire;
use beacon_proto::{BatchResponse, Event};

use crate::{new_batch_id, Client, ClientConfig, SdkError};

/// One edge a [`FailoverClient`] may use.
#[derive(Debug, Clone)]
pub struct EdgeTarget {
    pub addr: SocketAddr,
    /// PEM of the CA to trust for this edge.
    pub ca_pem: Vec<u8>,
}

pub struct FailoverClient {
    edges: Vec<EdgeTarget>,
    write_key: String,
    current: tokio::sync::Mutex<Option<(usize, Arc<Client>)>>,
    /// How long one batch keeps being retried (across edges) before its error is returned.
    pub give_up_after: Duration,
    /// Dead-connection detection; also bounds how long connecting to a dead edge takes.
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    failovers: AtomicU64,
}

impl FailoverClient {
    /// Connects lazily, on the first batch.
    pub fn new(edges: Vec<EdgeTarget>, write_key: impl Into<String>) -> Self {
        Self {
            edges,
            write_key: write_key.into(),
            current: tokio::sync::Mutex::new(None),
            give_up_after: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
            failovers: AtomicU64::new(0),
        }
    }

    /// Times the client moved to another edge.
    pub fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::Relaxed)
    }

    /// The edge in use, if connected.
    pub async fn current_edge(&self) -> Option<SocketAddr> {
        let cur = self.current.lock().await;
        cur.as_ref().map(|(i, _)| self.edges[*i].addr)
    }

    pub async fn send(&self, events: &[Event]) -> Result<BatchResponse, SdkError> {
        self.send_batch(&new_batch_id(), events).await
    }

    /// Sends until some edge acknowledges the batch as durable, or `give_up_after`.
    pub async fn send_batch(
        &self,
        batch_id: &str,
        events: &[Event],
    ) -> Result<BatchResponse, SdkError> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(20);
        // REJECTED answers in a row from the current edge: alive, but not storing.
        let mut rejected = 0u32;
        loop {
            let attempt = match self.client().await {
                Ok((i, c)) => c
                    .send_batch(batch_id, events)
                    .await
                    .map_err(|e| (i, Some(c), e)),
                Err(e) => Err((usize::MAX, None, e)),
            };
            let (i, client, err) = match attempt {
                Ok(r) => return Ok(r),
                Err(x) => x,
            };
            if !err.is_retryable() || started.elapsed() >= self.give_up_after {
                return Err(err);
            }
            let Some(client) = client else {
                // No edge took a connection this round: wait before the next round.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            };
            let is_rejected =
                matches!(&err, SdkError::Remote { code, .. } if *code == wire::ERR_REJECTED);
            if is_rejected {
                rejected += 1;
            }
            if !is_rejected || rejected >= 3 {
                // Gone, or alive but unable to store (cut off from the bus): move on; the
                // next `client()` connects to the following edge.
                self.abandon(i, &client).await;
                rejected = 0;
            } else {
                // Busy or over a rate limit: wait, then try the same edge again.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }

    /// The connected client, or a connection to the next edge that accepts one.
    async fn client(&self) -> Result<(usize, Arc<Client>), SdkError> {
        let mut cur = self.current.lock().await;
        let start = match &*cur {
            Some((i, c)) if !c.is_closed() => return Ok((*i, c.clone())),
            Some((i, _)) => i + 1,
            None => 0,
        };
        if start > 0 {
            self.failovers.fetch_add(1, Ordering::Relaxed);
        }
        let mut last = SdkError::Config("no edges given".into());
        for k in 0..self.edges.len() {
            let i = (start + k) % self.edges.len();
            let e = &self.edges[i];
            let mut cfg = ClientConfig::new(e.addr, e.ca_pem.clone(), self.write_key.clone());
            cfg.idle_timeout = self.idle_timeout;
            cfg.request_timeout = self.request_timeout;
            match tokio::time::timeout(self.idle_timeout * 2, Client::connect(cfg)).await {
                Ok(Ok(c)) => {
                    let c = Arc::new(c);
                    *cur = Some((i, c.clone()));
                    return Ok((i, c));
                }
                Ok(Err(err)) if !err.is_retryable() => return Err(err),
                Ok(Err(err)) => last = err,
                Err(_) => last = SdkError::Timeout(self.idle_timeout * 2),
            }
        }
        *cur = None;
        Err(last)
    }

    /// Forgets `client` if it is still the current one (another task may have moved on).
    async fn abandon(&self, i: usize, client: &Arc<Client>) {
        let cur = self.current.lock().await;
        if let Some((ci, c)) = &*cur {
            if *ci == i && Arc::ptr_eq(c, client) {
                // Keep the index so the next connection starts after this edge.
                c.conn.close(0u32.into(), b"failover");
            }
        }
    }
}
