//! From a decoded request to a durable envelope, the one path every listener takes after
//! decoding ([`Processor::ingest`]): size, admission (rate limit and quota), the
//! reserved-property policy, enrichment, validation, canary split, plugins, publish; the
//! answer comes only once JetStream has acknowledged. Listeners only decode (and reserve the
//! request's memory before they do).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use beacon_proto::bus::{MerchantLimits, OnFailure};
use beacon_proto::envelope::{ENVELOPE_VERSION, ENVELOPE_VERSION_CANARY};
use beacon_proto::event::RejectedEvent;
use beacon_proto::{
    BatchResponse, CanaryPart, Envelope, Event, Failure, FailureStage, Limits, Outcome,
    PipelineRef, Share,
};
use tokio::sync::Semaphore;

use beacon_plugins::{stage as plugin_stage, PluginError};

use crate::enrich::{ClientCtx, EnrichError, Enricher};
use crate::limits::{Limited, RateLimiter};
use crate::pipelines::{Pipelines, Runnable, Stage};
use crate::publish::{PublishError, Publisher};
use crate::registry::Registry;
use crate::reserved::{self, Trust};

/// One event as a listener decoded it, with what only its request knew.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub event: Event,
    /// The end user's user agent when the payload carried one (Snowplow `ua`); else the
    /// request's.
    pub user_agent: Option<String>,
    /// The end user's address when a trusted relay gave one per event (Snowplow `ip`); else
    /// the request's.
    pub ip: Option<IpAddr>,
}

impl From<Event> for Incoming {
    fn from(event: Event) -> Self {
        Self {
            event,
            user_agent: None,
            ip: None,
        }
    }
}

/// One merchant's events of a request.
#[derive(Debug)]
pub struct MerchantBatch {
    pub merchant: Arc<str>,
    pub events: Vec<Incoming>,
    /// The client's id for this share: a retry with the same id is stored once.
    pub batch_id: Option<String>,
    /// Allowance held for it when its frame was read ([`Processor::hold`]; 0: none).
    pub held: usize,
}

/// A decoded request, as every listener hands it to [`Processor::ingest`].
pub struct Submission<'a> {
    /// `quic` or `http`, for metrics.
    pub listener: &'static str,
    pub trust: Trust,
    pub client: &'a ClientCtx,
    /// Every identity already resolved to its merchant (one share per merchant).
    pub shares: Vec<MerchantBatch>,
    /// The request's size on the wire when it is one share (sizes the envelopes).
    pub wire_bytes: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The payload is not a batch; the client must fix it (never retried).
    #[error("undecodable batch: {0}")]
    Decode(String),
    #[error("batch holds {count} events, over the limit of {max}")]
    TooManyEvents { count: usize, max: usize },
    #[error("{0}")]
    TooLarge(String),
    /// The pipeline cannot take it now; the client should retry the same batch.
    #[error("not stored, retry: {0}")]
    NotDurable(#[from] PublishError),
    /// This merchant's plugins are all busy; the client should retry the same batch.
    #[error("not stored, retry: this merchant's plugins are busy at this edge")]
    Busy,
    /// Over the merchant's rate limit or daily quota; retry after the time it names.
    #[error("not stored: {0}")]
    Limited(#[from] Limited),
    /// Enrichment could not run (the daily salt is on the bus); retry.
    #[error("not stored, retry: {0}")]
    Enrich(#[from] EnrichError),
}

impl ProcessError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ProcessError::Decode(_) => "undecodable",
            ProcessError::TooManyEvents { .. } => "too_many_events",
            ProcessError::TooLarge(_) => "too_large",
            ProcessError::NotDurable(_) => "not_durable",
            ProcessError::Busy => "busy",
            ProcessError::Limited(_) => "limited",
            ProcessError::Enrich(_) => "enrich",
        }
    }
}

pub struct Processor {
    edge_id: String,
    /// `<edge-id>-<boot-ms>`: batch ids stay unique across restarts of the same edge.
    batch_prefix: String,
    seq: AtomicU64,
    limits: Limits,
    pub max_batch_events: usize,
    /// Concurrent plugin runs per merchant (see `plugin_slots`).
    pub plugin_concurrency: usize,
    plugin_slots: std::sync::Mutex<std::collections::HashMap<String, Arc<Semaphore>>>,
    plugin_health: std::sync::Mutex<std::collections::HashMap<String, Health>>,
    pipelines: Pipelines,
    publisher: Publisher,
    active: AtomicUsize,
    active_gauge: metrics::Gauge,
    enricher: Arc<Enricher>,
    registry: Registry,
    limiter: RateLimiter,
    /// Limits of merchants whose record sets none; `None`: unlimited.
    pub default_limits: Option<MerchantLimits>,
    budget: Budget,
}

/// Memory for batches in flight, shared by every connection of both listeners. A batch
/// holds its request bytes, the decoded events, the envelope and its JSON at once: about
/// `EXPANSION` times the request (measured with the bus stalled, docs/BENCHMARKS.md), so a
/// request of `n` bytes reserves `EXPANSION * n`. When the budget is used up, QUIC stops
/// reading (flow control pushes back) and HTTP answers 503 at once.
pub struct Budget {
    sem: Arc<Semaphore>,
    total_kib: usize,
    /// Registered once: a batch only bumps them.
    gauges: InFlightGauges,
}

/// `beacon_edge_in_flight_bytes` and `beacon_edge_in_flight_reserved_bytes`.
#[derive(Clone)]
struct InFlightGauges {
    bytes: metrics::Gauge,
    reserved: metrics::Gauge,
}

impl Budget {
    pub const EXPANSION: usize = 5;

    pub fn new(bytes: usize) -> Self {
        let total_kib = (bytes >> 10).clamp(1, u32::MAX as usize);
        metrics::gauge!("beacon_edge_in_flight_budget_bytes").set((total_kib << 10) as f64);
        Self {
            sem: Arc::new(Semaphore::new(total_kib)),
            total_kib,
            gauges: InFlightGauges {
                bytes: metrics::gauge!("beacon_edge_in_flight_bytes"),
                reserved: metrics::gauge!("beacon_edge_in_flight_reserved_bytes"),
            },
        }
    }

    fn kib(&self, request_len: usize) -> u32 {
        // A request larger than the whole budget may still run alone.
        ((request_len * Self::EXPANSION) / 1024 + 1).min(self.total_kib) as u32
    }

    /// Waits for room for a request of `request_len` bytes.
    pub async fn reserve(&self, request_len: usize) -> Option<Reservation> {
        let permit = self
            .sem
            .clone()
            .acquire_many_owned(self.kib(request_len))
            .await
            .ok()?;
        Some(Reservation::new(permit, request_len, &self.gauges))
    }

    /// Room for a request now, or `None` when the edge is full.
    pub fn try_reserve(&self, request_len: usize) -> Option<Reservation> {
        let permit = self
            .sem
            .clone()
            .try_acquire_many_owned(self.kib(request_len))
            .ok()?;
        Some(Reservation::new(permit, request_len, &self.gauges))
    }
}

/// A request's share of the [`Budget`], returned when dropped; while it lives, the request's
/// bytes count in `beacon_edge_in_flight_bytes` and its reservation in
/// `beacon_edge_in_flight_reserved_bytes`.
pub struct Reservation {
    permit: tokio::sync::OwnedSemaphorePermit,
    request_len: usize,
    gauges: InFlightGauges,
}

impl Reservation {
    fn new(
        permit: tokio::sync::OwnedSemaphorePermit,
        request_len: usize,
        gauges: &InFlightGauges,
    ) -> Self {
        gauges.bytes.increment(request_len as f64);
        gauges
            .reserved
            .increment((permit.num_permits() << 10) as f64);
        Self {
            permit,
            request_len,
            gauges: gauges.clone(),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.gauges.bytes.decrement(self.request_len as f64);
        self.gauges
            .reserved
            .decrement((self.permit.num_permits() << 10) as f64);
    }
}

/// Consecutive sandbox-limit breaches after which a pipeline version is quarantined.
const QUARANTINE_AFTER: u32 = 3;
/// Longest a batch waits for one of its merchant's plugin slots before "busy, retry".
const SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Default)]
struct Health {
    breaches: u32,
    until: Option<std::time::Instant>,
}

/// What one pipeline stage made of its share of a batch.
struct StageOutcome {
    /// The pipeline that produced `events`; `None` when they passed through unprocessed.
    pipeline: Option<PipelineRef>,
    events: Vec<Event>,
    failures: Vec<Failure>,
    /// `plugin: reason`, for the client's answer.
    error: Option<String>,
    outcome: Outcome,
}

/// `beacon_edge_events_total{listener, outcome, reason}`: `accepted` (stored), `rejected`
/// (invalid events, kept as failed events), `refused` (the whole batch answered with an
/// error; `reason="not_durable"` is the "not confirmed" answer that may still be stored);
/// and `beacon_edge_batches_refused_total{listener, reason}`, which also counts batches
/// refused before their events could be counted (undecodable ones).
pub fn count_events(
    listener: &'static str,
    n: usize,
    result: &Result<BatchResponse, ProcessError>,
) {
    let count = |outcome: &'static str, reason: &'static str, k: usize| {
        if k > 0 {
            metrics::counter!("beacon_edge_events_total", "listener" => listener, "outcome" => outcome, "reason" => reason)
                .increment(k as u64);
        }
    };
    match result {
        Ok(r) => {
            count("accepted", "", r.accepted);
            count("rejected", "invalid", r.rejected.len());
        }
        Err(e) => {
            count("refused", e.reason(), n);
            metrics::counter!("beacon_edge_batches_refused_total", "listener" => listener, "reason" => e.reason())
                .increment(1);
        }
    }
}

/// Counts a batch as in flight for as long as it lives.
/// (`beacon_edge_in_flight_batches` follows the count; its handle is registered once.)
struct InFlight<'a>(&'a AtomicUsize, &'a metrics::Gauge);

impl<'a> InFlight<'a> {
    fn new(c: &'a AtomicUsize, gauge: &'a metrics::Gauge) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        gauge.increment(1.0);
        Self(c, gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
        self.1.decrement(1.0);
    }
}

impl Processor {
    pub fn new(
        edge_id: String,
        limits: Limits,
        pipelines: Pipelines,
        publisher: Publisher,
        enricher: Arc<Enricher>,
        registry: Registry,
    ) -> Self {
        Self {
            batch_prefix: format!("{edge_id}-{}", crate::now_ms()),
            edge_id,
            seq: AtomicU64::new(0),
            limits,
            max_batch_events: 10_000,
            plugin_concurrency: default_plugin_concurrency(),
            plugin_slots: Default::default(),
            plugin_health: Default::default(),
            pipelines,
            publisher,
            active: AtomicUsize::new(0),
            active_gauge: metrics::gauge!("beacon_edge_in_flight_batches"),
            enricher,
            registry,
            limiter: RateLimiter::default(),
            default_limits: None,
            budget: Budget::new(256 << 20),
        }
    }

    /// Memory for batches in flight, both listeners together (the default is 256 MiB).
    pub fn set_in_flight_memory(&mut self, bytes: usize) {
        self.budget = Budget::new(bytes);
    }

    /// Waits for memory for a request of `len` bytes, before it is read or decoded.
    pub async fn reserve(&self, len: usize) -> Option<Reservation> {
        self.budget.reserve(len).await
    }

    /// Memory for a request of `len` bytes now, or `None` when the edge is full.
    pub fn try_reserve(&self, len: usize) -> Option<Reservation> {
        self.budget.try_reserve(len)
    }

    /// The serving region of a client's address (for `locate`), from the geo database.
    pub fn region_of(&self, ip: Option<IpAddr>) -> Option<&'static str> {
        self.enricher.region_of(ip)
    }

    /// The merchant's own limits, else the edge's defaults; `None`: unlimited.
    fn limits_of(&self, merchant_id: &str) -> Option<MerchantLimits> {
        self.registry.limits(merchant_id).or(self.default_limits)
    }

    /// Refuses a merchant whose allowance is used up, before its batch is decoded.
    pub fn precheck(&self, merchant_id: &str) -> Result<(), Limited> {
        let Some(limits) = self.limits_of(merchant_id) else {
            return Ok(());
        };
        self.limiter.precheck(
            merchant_id,
            &limits,
            crate::now_ms(),
            std::time::Instant::now(),
        )
    }

    /// Holds a typical batch's worth of the merchant's allowance for a frame just read
    /// ([`RateLimiter::hold`]); the batch carries it as [`MerchantBatch::held`].
    pub fn hold(&self, merchant_id: &str) -> Result<usize, Limited> {
        let Some(limits) = self.limits_of(merchant_id) else {
            return Ok(0);
        };
        self.limiter.hold(
            merchant_id,
            &limits,
            crate::now_ms(),
            std::time::Instant::now(),
        )
    }

    /// Gives back a hold whose batch never reached admission.
    pub fn release(&self, merchant_id: &str, held: usize) {
        if let Some(limits) = self.limits_of(merchant_id) {
            self.limiter.release(merchant_id, held, &limits);
        }
    }

    /// Gives back what `admit` took for a batch that was not stored.
    fn refund(&self, merchant_id: &str, n: usize) {
        if let Some(limits) = self.limits_of(merchant_id) {
            self.limiter.refund(merchant_id, n, &limits);
        }
    }

    /// Takes a batch's events from the merchant's rate limit and daily quota, crediting
    /// what was held for it (given back even when the batch is refused).
    fn admit(&self, batch: &MerchantBatch) -> Result<(), Limited> {
        let Some(limits) = self.limits_of(&batch.merchant) else {
            return Ok(());
        };
        self.limiter.take(
            &batch.merchant,
            batch.events.len(),
            batch.held,
            &limits,
            crate::now_ms(),
            std::time::Instant::now(),
        )
    }

    /// Batches being processed or published right now.
    pub fn in_flight(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// The batch id is the JetStream message id: with the client's own id (or a request's
    /// content key), a retried batch within the duplicate window is stored once.
    fn batch_id(&self, merchant_id: &str, client_batch_id: Option<&str>) -> String {
        match client_batch_id {
            Some(id) => format!("{merchant_id}:{id}"),
            None => format!(
                "{}:{}",
                self.batch_prefix,
                self.seq.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }

    /// Checks a request's event count against the batch limit: [`Self::ingest`] does, and a
    /// listener may call it first to refuse before resolving identities.
    pub fn check_batch_len(&self, count: usize) -> Result<(), ProcessError> {
        if count > self.max_batch_events {
            return Err(ProcessError::TooManyEvents {
                count,
                max: self.max_batch_events,
            });
        }
        Ok(())
    }

    /// Stores a decoded request: the one path of every listener. Every share is admitted
    /// (rate limit and quota) before any is published, and all are given back if one is
    /// refused. With several shares, a failure publishing a later one leaves the earlier
    /// ones stored: a retry is then deduplicated only where the shares carry batch ids.
    /// `rejected` indexes count through the shares in order.
    pub async fn ingest(
        self: &Arc<Self>,
        submission: Submission<'_>,
    ) -> Result<BatchResponse, ProcessError> {
        let listener = submission.listener;
        let n = submission.shares.iter().map(|s| s.events.len()).sum();
        let result = self.ingest_shares(submission, n).await;
        count_events(listener, n, &result);
        result
    }

    async fn ingest_shares(
        self: &Arc<Self>,
        submission: Submission<'_>,
        n: usize,
    ) -> Result<BatchResponse, ProcessError> {
        let _in_flight = InFlight::new(&self.active, &self.active_gauge);
        let Submission {
            listener,
            trust,
            client,
            shares,
            wire_bytes,
        } = submission;
        if let Err(e) = self.check_batch_len(n) {
            for s in &shares {
                self.release(&s.merchant, s.held);
            }
            return Err(e);
        }
        for (i, share) in shares.iter().enumerate() {
            if let Err(l) = self.admit(share) {
                for s in &shares[..i] {
                    self.refund(&s.merchant, s.events.len());
                }
                for s in &shares[i + 1..] {
                    self.release(&s.merchant, s.held);
                }
                return Err(l.into());
            }
        }
        let now = crate::now_ms();
        let mut total: Option<BatchResponse> = None;
        let mut offset = 0;
        let mut shares = shares.into_iter();
        while let Some(share) = shares.next() {
            let (merchant, len) = (share.merchant.clone(), share.events.len());
            let stored = self
                .store_share(share, listener, trust, client, wire_bytes, now)
                .await;
            let mut r = match stored {
                Ok(r) => r,
                Err(e) => {
                    self.refund(&merchant, len);
                    for s in shares {
                        self.refund(&s.merchant, s.events.len());
                    }
                    return Err(e);
                }
            };
            for x in &mut r.rejected {
                x.index += offset;
            }
            offset += len;
            match &mut total {
                None => total = Some(r),
                Some(t) => {
                    t.accepted += r.accepted;
                    t.rejected.append(&mut r.rejected);
                    t.plugin_error = t.plugin_error.take().or(r.plugin_error);
                }
            }
        }
        Ok(total.unwrap_or_else(|| BatchResponse {
            batch_id: String::new(),
            accepted: 0,
            rejected: Vec::new(),
            plugin_error: None,
        }))
    }

    /// The reserved-property policy, enrichment, then validation, plugins and publishing of
    /// one merchant's share.
    async fn store_share(
        self: &Arc<Self>,
        mut share: MerchantBatch,
        listener: &'static str,
        trust: Trust,
        client: &ClientCtx,
        wire_bytes: Option<usize>,
        now: i64,
    ) -> Result<BatchResponse, ProcessError> {
        if trust == Trust::Server {
            // A relay's per-event end user (the server key vouches for it, as
            // `--trust-forwarded-for` does for a proxy's header); a collector's own per-event
            // fields come first.
            for i in &mut share.events {
                let (ip, user_agent) = reserved::take_relayed(&mut i.event);
                i.ip = i.ip.or(ip);
                i.user_agent = i.user_agent.take().or(user_agent);
            }
        }
        let moved: usize = share
            .events
            .iter_mut()
            .map(|i| reserved::apply(&mut i.event, trust))
            .sum();
        if moved > 0 {
            metrics::counter!("beacon_edge_reserved_properties_moved_total", "listener" => listener)
                .increment(moved as u64);
        }
        let per_event = share
            .events
            .iter()
            .any(|i| i.ip.is_some() || i.user_agent.is_some());
        if client.ip.is_some() || client.user_agent.is_some() || per_event {
            let batch = share.events.iter_mut().map(|i| {
                let ua = i.user_agent.as_deref().or(client.user_agent.as_deref());
                (&mut i.event, ua, i.ip.or(client.ip))
            });
            self.enricher.enrich_batch(&share.merchant, batch).await?;
        }
        let events: Vec<Event> = share.events.into_iter().map(|i| i.event).collect();
        let chunk = self.chunk_len(&events, wire_bytes);
        let batch_id = self.batch_id(&share.merchant, share.batch_id.as_deref());
        self.publish_chunked(&share.merchant, events, batch_id, now, chunk)
            .await
    }

    /// Events per envelope for `events` (which arrived as `wire_bytes`, when known): an
    /// envelope carries each event up to three times (raw, processed, canary or JSON
    /// escaping) plus what enrichment adds, and must fit the bus's largest message. A batch
    /// the client was allowed to send (10,000 events in 1 MiB) can need several.
    fn chunk_len(&self, events: &[Event], wire_bytes: Option<usize>) -> usize {
        const ENRICHMENT: usize = 512;
        let n = events.len().max(1);
        let per_event = match wire_bytes {
            Some(b) => b.div_ceil(n),
            None => {
                // A few evenly spaced events stand for the batch.
                let step = (n / 8).max(1);
                let sample: Vec<usize> = events
                    .iter()
                    .step_by(step)
                    .take(8)
                    .map(|e| serde_json::to_vec(e).map_or(0, |v| v.len()))
                    .collect();
                sample.iter().sum::<usize>() / sample.len().max(1)
            }
        };
        (self.publisher.max_payload() / (3 * per_event + ENRICHMENT)).clamp(1, n)
    }

    /// [`Self::publish_events`] in envelopes of at most `chunk` events. Envelope `k` of a
    /// split batch has the id `<batch id>~<k>`: the split depends only on the events, so a
    /// retried batch maps onto the same ids and JetStream drops the envelopes it stored.
    async fn publish_chunked(
        self: &Arc<Self>,
        merchant_id: &str,
        mut events: Vec<Event>,
        batch_id: String,
        now: i64,
        chunk: usize,
    ) -> Result<BatchResponse, ProcessError> {
        if events.len() <= chunk {
            return self
                .publish_events(merchant_id, events, batch_id, now)
                .await;
        }
        let mut total = BatchResponse {
            batch_id: batch_id.clone(),
            accepted: 0,
            rejected: Vec::new(),
            plugin_error: None,
        };
        let (mut offset, mut k) = (0, 0);
        while !events.is_empty() {
            let rest = events.split_off(chunk.min(events.len()));
            let part = std::mem::replace(&mut events, rest);
            let len = part.len();
            let r = self
                .publish_events(merchant_id, part, format!("{batch_id}~{k}"), now)
                .await?;
            total.accepted += r.accepted;
            total.rejected.extend(r.rejected.into_iter().map(|mut x| {
                x.index += offset;
                x
            }));
            if total.plugin_error.is_none() {
                total.plugin_error = r.plugin_error;
            }
            offset += len;
            k += 1;
        }
        Ok(total)
    }

    /// Validation, plugins, publishing.
    async fn publish_events(
        self: &Arc<Self>,
        merchant_id: &str,
        events: Vec<Event>,
        batch_id: String,
        now: i64,
    ) -> Result<BatchResponse, ProcessError> {
        let mut raw = Vec::with_capacity(events.len());
        let mut failures = Vec::new();
        let mut rejected = Vec::new();
        for (index, mut event) in events.into_iter().enumerate() {
            // Identity and receive time come from the connection and our clock, never the client.
            event.merchant_id = merchant_id.to_string();
            event.received_at = now;
            match event.validate(&self.limits, now) {
                Ok(()) => raw.push(event),
                Err(e) => {
                    let reason = e.to_string();
                    rejected.push(RejectedEvent {
                        index,
                        event_id: event.event_id.clone(),
                        reason: reason.clone(),
                    });
                    failures.push(Failure {
                        stage: FailureStage::Validate,
                        event_id: event.event_id.clone(),
                        plugin: None,
                        pipeline_version: None,
                        reason,
                        payload: serde_json::to_string(&event).unwrap_or_default(),
                    });
                }
            }
        }

        let mut plugin_error = None;
        let mut pipeline = None;
        let mut processed = None;
        let mut canary = None;
        let mut shares = Vec::new();
        let runnable = self.pipelines.get(merchant_id);
        if let Some(Runnable::Unavailable(u)) = runnable.as_deref() {
            tracing::warn!(merchant = merchant_id, batch_id, version = u.version, error = %u.reason, "pipeline unavailable");
            plugin_error = Some(format!(
                "pipeline v{} is not available at this edge; the batch is kept in failed_events",
                u.version
            ));
            for e in &raw {
                failures.push(Failure {
                    stage: FailureStage::Plugin,
                    event_id: e.event_id.clone(),
                    plugin: None,
                    pipeline_version: Some(u.version),
                    reason: u.reason.clone(),
                    // The raw event is in `raw`; ingest fills the payload in from there.
                    payload: String::new(),
                });
            }
            let outcome = if u.on_failure == OnFailure::Hold {
                processed = Some(Vec::new());
                Outcome::Held
            } else {
                Outcome::PassedThrough
            };
            shares.push(Share {
                version: Some(u.version),
                canary: false,
                outcome,
                raw: Vec::new(),
            });
        }
        if let Some(Runnable::Ready(active)) = runnable.as_deref() {
            // Share of the batch per pipeline version: canary by a stable hash of the visitor.
            // Without a canary the whole batch is the stable share: lent to the stage and
            // given back, not copied.
            // The split is recorded (positions in `raw`) so re-processing can tell the shares apart.
            let (mut to_canary, mut to_stable) = (Vec::new(), Vec::new());
            let (mut canary_at, mut stable_at) = (Vec::new(), Vec::new());
            match &active.canary {
                Some(_) => {
                    for (i, e) in raw.iter().enumerate() {
                        if active.is_canary(e.visitor_id.as_deref(), &e.event_id) {
                            to_canary.push(e.clone());
                            canary_at.push(i as u32);
                        } else {
                            to_stable.push(e.clone());
                            stable_at.push(i as u32);
                        }
                    }
                }
                None => to_stable = std::mem::take(&mut raw),
            }
            // A merchant's plugins run on at most `plugin_slots` blocking threads at once, so
            // one merchant's expensive (or hostile) plugin cannot take every core.
            // The wait is bounded: a merchant whose slow plugins back up must get "retry
            // later", not hold request bytes that other merchants' reads need.
            let slots = self.plugin_slots(merchant_id);
            let _slot = match tokio::time::timeout(SLOT_WAIT, slots.acquire_owned()).await {
                Ok(permit) => permit.ok(),
                Err(_) => return Err(ProcessError::Busy),
            };
            let (stable, stable_input) = self
                .run_stage(merchant_id, &batch_id, &active.stable, to_stable, now)
                .await;
            if active.canary.is_none() {
                raw = stable_input;
            }
            if let Some(reason) = stable.error {
                plugin_error = Some(reason);
            }
            failures.extend(stable.failures);
            // An empty position list means "the whole batch": only without a canary. A
            // share that got no events is not recorded at all.
            if active.canary.is_none() || !stable_at.is_empty() {
                shares.push(Share {
                    version: Some(active.stable.chain.pipeline().version),
                    canary: false,
                    outcome: stable.outcome,
                    raw: stable_at,
                });
            }
            pipeline = stable.pipeline;
            processed = Some(stable.events);
            if let Some((stage, _)) = &active.canary {
                let (part, _) = self
                    .run_stage(merchant_id, &batch_id, stage, to_canary, now)
                    .await;
                if let Some(reason) = part.error {
                    plugin_error.get_or_insert(reason);
                }
                failures.extend(part.failures);
                if !canary_at.is_empty() {
                    shares.push(Share {
                        version: Some(stage.chain.pipeline().version),
                        canary: true,
                        outcome: part.outcome,
                        raw: canary_at,
                    });
                }
                canary = Some(CanaryPart {
                    pipeline: part.pipeline,
                    events: part.events,
                });
            }
            if canary.is_none() && pipeline.is_none() {
                // Passed through unprocessed: the events are the raw ones, no need to send twice.
                processed = None;
            }
        }

        let accepted = raw.len();
        let envelope = Envelope {
            v: if canary.is_some() {
                ENVELOPE_VERSION_CANARY
            } else {
                ENVELOPE_VERSION
            },
            batch_id: batch_id.clone(),
            merchant_id: merchant_id.to_string(),
            edge_id: self.edge_id.clone(),
            received_at: now,
            pipeline,
            raw,
            processed,
            canary,
            failures,
            shares,
        };
        match self.publisher.publish(&envelope).await {
            Ok(_) => {}
            Err(e @ PublishError::TooLarge { .. }) => {
                // Never storable as is: keep (the start of) it in failed_events and tell the
                // client, who must split the batch.
                let reason = e.to_string();
                let payload = serde_json::to_vec(&envelope.raw).unwrap_or_default();
                self.keep_payload(merchant_id, &batch_id, now, &payload, &reason)
                    .await;
                return Err(ProcessError::TooLarge(reason));
            }
            Err(e) => return Err(e.into()),
        }
        Ok(BatchResponse {
            batch_id,
            accepted,
            rejected,
            plugin_error,
        })
    }

    fn plugin_slots(&self, merchant_id: &str) -> Arc<Semaphore> {
        let mut slots = self.plugin_slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.len() > 10_000 {
            // Forget idle merchants' semaphores (nobody else holds a clone).
            slots.retain(|_, s| Arc::strong_count(s) > 1);
        }
        slots
            .entry(merchant_id.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.plugin_concurrency.max(1))))
            .clone()
    }

    /// Runs one share of a batch through a pipeline stage. On failure the events are either
    /// held (none go to `events`) or passed through unprocessed, per the pipeline; both ways
    /// every event gets a `failed_events` row naming the plugin, version and reason.
    /// Returns the outcome and the input events, given back to the caller (who needs the
    /// raw events for the envelope) instead of copied.
    async fn run_stage(
        &self,
        merchant_id: &str,
        batch_id: &str,
        stage: &Stage,
        events: Vec<Event>,
        now: i64,
    ) -> (StageOutcome, Vec<Event>) {
        if events.is_empty() {
            let outcome = StageOutcome {
                pipeline: Some(stage.chain.pipeline().clone()),
                events: Vec::new(),
                failures: Vec::new(),
                error: None,
                outcome: Outcome::Processed,
            };
            return (outcome, events);
        }
        let health_key = format!("{merchant_id}:v{}", stage.chain.pipeline().version);
        let chain_label = &stage.metrics_label;
        if let Some(reason) = self.quarantined(&health_key) {
            metrics::counter!("beacon_edge_plugin_batches_total", "chain" => chain_label.clone(), "outcome" => "quarantined")
                .increment(1);
            let outcome = self.stage_failed(
                merchant_id,
                batch_id,
                stage,
                &events,
                None,
                reason.clone(),
                reason,
            );
            return (outcome, events);
        }
        let runner = stage.chain.clone();
        let limits = self.limits;
        let input = Arc::new(events);
        let lent = input.clone();
        let started = std::time::Instant::now();
        // Plugins are CPU-bound and bounded by their fuel; keep them off the I/O workers.
        // Plugin output must be as valid as client input.
        let result = tokio::task::spawn_blocking(move || {
            plugin_stage::run_checked(&runner, &lent, &limits, now)
        })
        .await;
        metrics::histogram!("beacon_edge_plugin_seconds", "chain" => chain_label.clone())
            .record(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(Ok(_)) => "ok",
            Ok(Err(f)) => f.error.kind(),
            Err(_) => "host_task",
        };
        metrics::counter!("beacon_edge_plugin_batches_total", "chain" => chain_label.clone(), "outcome" => outcome)
            .increment(1);
        // The task has ended (finished or unwound), so its clone of the input is gone.
        let events = Arc::try_unwrap(input).unwrap_or_else(|shared| (*shared).clone());
        let (plugin, reason, public) = match result {
            Ok(Ok(out)) => {
                self.record_health(&health_key, false);
                let outcome = StageOutcome {
                    pipeline: Some(stage.chain.pipeline().clone()),
                    events: out,
                    failures: Vec::new(),
                    error: None,
                    outcome: Outcome::Processed,
                };
                return (outcome, events);
            }
            Ok(Err(f)) => {
                // Only exhausting a resource budget counts: that is what costs other
                // merchants. Traps and the plugin's own errors are cheap, and since client
                // input can trigger them, counting them would let anyone with the (public)
                // write key switch a merchant's plugins off.
                let breach = matches!(
                    f.error,
                    PluginError::OutOfFuel { .. }
                        | PluginError::Timeout(_)
                        | PluginError::MemoryLimit { .. }
                        | PluginError::OutputTooLarge { .. }
                        | PluginError::OutputCopyCapped { .. }
                );
                self.record_health(&health_key, breach);
                (Some(f.plugin), f.error.to_string(), f.error.public())
            }
            Err(join) => {
                let reason = format!("plugin host task failed: {join}");
                (None, reason.clone(), reason)
            }
        };
        let outcome = self.stage_failed(
            merchant_id,
            batch_id,
            stage,
            &events,
            plugin,
            reason,
            public,
        );
        (outcome, events)
    }

    /// Why a pipeline version's plugins are not run right now, if they are quarantined.
    /// Health is kept per merchant and pipeline version (`m:vN`): a canary's breaches do not
    /// stop the stable version, and activating a fixed version starts clean.
    fn quarantined(&self, key: &str) -> Option<String> {
        let health = self.plugin_health.lock().unwrap_or_else(|p| p.into_inner());
        let h = health.get(key)?;
        let until = h.until?;
        let left = until.checked_duration_since(std::time::Instant::now())?;
        Some(format!(
            "plugins quarantined at this edge for {} ms more after {} consecutive batches broke a sandbox limit",
            left.as_millis(),
            h.breaches
        ))
    }

    /// Counts consecutive limit breaches; from the third on, the merchant's plugins are not
    /// run for 1 s, doubling per further breach up to 60 s. Batches meanwhile fail by the
    /// pipeline's policy (kept for re-processing), so a plugin burning its CPU or memory
    /// budget on every batch cannot keep a core busy at other merchants' expense.
    fn record_health(&self, key: &str, breach: bool) {
        let mut health = self.plugin_health.lock().unwrap_or_else(|p| p.into_inner());
        if !breach {
            health.remove(key);
            return;
        }
        if health.len() > 10_000 {
            let now = std::time::Instant::now();
            health.retain(|_, h| h.until.is_some_and(|u| u > now));
        }
        let h = health.entry(key.to_string()).or_default();
        h.breaches += 1;
        if h.breaches >= QUARANTINE_AFTER {
            let secs = 1u64 << (h.breaches - QUARANTINE_AFTER).min(6);
            h.until =
                Some(std::time::Instant::now() + std::time::Duration::from_secs(secs.min(60)));
            metrics::counter!("beacon_edge_plugin_quarantines_total").increment(1);
            tracing::warn!(
                pipeline = key,
                breaches = h.breaches,
                secs,
                "plugins quarantined"
            );
        }
    }

    /// `reason` goes to `failed_events` and the log; `public` (without plugin internals) to
    /// the client.
    #[allow(clippy::too_many_arguments)]
    fn stage_failed(
        &self,
        merchant_id: &str,
        batch_id: &str,
        stage: &Stage,
        events: &[Event],
        plugin: Option<String>,
        reason: String,
        public: String,
    ) -> StageOutcome {
        let version = stage.chain.pipeline().version;
        let held = stage.on_failure == OnFailure::Hold;
        tracing::warn!(merchant = merchant_id, batch_id, version, plugin = ?plugin, error = %reason, held, "plugin failed");
        let error = Some(match &plugin {
            Some(p) => format!("{p}: {public}"),
            None => public,
        });
        let failed = plugin_stage::failed(
            stage.chain.pipeline(),
            stage.on_failure,
            events,
            plugin,
            &reason,
        );
        StageOutcome {
            pipeline: failed.pipeline,
            events: failed.events,
            failures: failed.failures,
            error,
            outcome: failed.outcome,
        }
    }

    /// Keeps a payload a listener could not decode (or that is over the batch limit), so it
    /// is in `failed_events` and not just a log line.
    pub async fn keep_undecodable(
        &self,
        merchant_id: &str,
        client_batch_id: Option<&str>,
        payload: &[u8],
        reason: &str,
    ) {
        let batch_id = self.batch_id(merchant_id, client_batch_id);
        self.keep_payload(merchant_id, &batch_id, crate::now_ms(), payload, reason)
            .await;
    }

    async fn keep_payload(
        &self,
        merchant_id: &str,
        batch_id: &str,
        now: i64,
        payload: &[u8],
        reason: &str,
    ) {
        let envelope = Envelope::undecodable(
            batch_id.to_string(),
            merchant_id.to_string(),
            self.edge_id.clone(),
            now,
            payload,
            reason.to_string(),
        );
        if let Err(e) = self.publisher.publish(&envelope).await {
            tracing::error!(batch_id, error = %e, "could not keep an undecodable batch");
        }
    }
}

/// Half the cores (at least one): a merchant's plugins can never take the whole machine.
pub fn default_plugin_concurrency() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}
