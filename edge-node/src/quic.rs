//! The RSocket-over-QUIC listener: one thin async loop per connection around the pure
//! framing in `beacon_proto::wire`.
//!
//! Backpressure: each connection has a bounded number of requests in flight, and all
//! batches in flight share the edge's memory budget (`process::Budget`). When either is
//! used up (JetStream slow, plugins slow), the loop stops reading the QUIC stream, the
//! receive window fills, and QUIC flow control stops the client. Nothing is buffered
//! without bound.

use std::sync::Arc;
use std::time::Duration;

use beacon_proto::wire::{self, Body, Frame, FrameReader};
use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, Semaphore};
use tracing::Instrument;

use beacon_proto::{BatchResponse, Event};

use crate::enrich::ClientCtx;
use crate::limits::Limited;
use crate::locate::Locator;
use crate::process::{count_events, Incoming, MerchantBatch, ProcessError, Processor, Submission};
use crate::registry::{Registry, Trust};
use beacon_serve::conn_limit::ConnLimit;

/// Longest an answer waits for room in a connection's send queue (a client that does not
/// read its answers); the batch is durable either way.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct QuicLimits {
    pub max_frame_len: usize,
    pub max_in_flight_per_conn: usize,
    pub setup_timeout: Duration,
    /// Open connections from one IP address; more are refused at the handshake.
    pub max_conns_per_ip: usize,
}

impl Default for QuicLimits {
    fn default() -> Self {
        Self {
            max_frame_len: wire::DEFAULT_MAX_FRAME_LEN,
            max_in_flight_per_conn: 64,
            setup_timeout: Duration::from_secs(5),
            max_conns_per_ip: 256,
        }
    }
}

pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // One request stream per connection; windows sized for a few frames in flight, so flow
    // control engages quickly when we stop reading.
    t.max_concurrent_bidi_streams(4u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window((4u32 << 20).into())
        .receive_window((8u32 << 20).into())
        .keep_alive_interval(Some(Duration::from_secs(10)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(60)) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

#[derive(Clone)]
pub struct Shared {
    pub registry: Registry,
    pub processor: Arc<Processor>,
    pub locator: Locator,
    pub limits: QuicLimits,
    /// Turns true when the edge shuts down: connections stop taking new batches, finish the
    /// ones in flight, and tell the client to reconnect elsewhere.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    pub conns_per_ip: ConnLimit,
}

/// Accepts connections until the endpoint is closed.
pub async fn serve(endpoint: quinn::Endpoint, shared: Shared) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        let remote = incoming.remote_address();
        let Some(slot) = shared.conns_per_ip.take(remote.ip()) else {
            tracing::warn!(%remote, "too many connections from this address; refused");
            incoming.refuse();
            continue;
        };
        tokio::spawn(async move {
            match incoming.await {
                Ok(conn) => {
                    let span = tracing::info_span!("conn", %remote);
                    handle(conn, shared).instrument(span).await;
                    drop(slot);
                }
                Err(e) => tracing::debug!(%remote, error = %e, "handshake failed"),
            }
        });
    }
}

enum Outcome {
    /// The client went away or closed normally.
    Done,
    /// A connection-level error to report before closing.
    Error(u32, String),
}

async fn handle(conn: quinn::Connection, shared: Shared) {
    // The server writes only on its own first bidirectional stream.
    let (tx, rx) = mpsc::channel::<Frame>(shared.limits.max_in_flight_per_conn + 8);
    let writer = {
        let conn = conn.clone();
        tokio::spawn(write_loop(conn, rx))
    };
    let outcome = read_loop(&conn, &shared, tx.clone()).await;
    if let Outcome::Error(code, message) = &outcome {
        tracing::info!(code, %message, "closing connection");
        let _ = tx.send(wire::error_frame(0, *code, message)).await;
    }
    drop(tx);
    // Let the writer flush in-flight answers and the final ERROR, then close.
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    conn.close(0u32.into(), b"");
}

async fn write_loop(conn: quinn::Connection, mut rx: mpsc::Receiver<Frame>) {
    let Some(first) = rx.recv().await else { return };
    let Ok((mut send, _recv)) = conn.open_bi().await else {
        return;
    };
    let mut buf = BytesMut::with_capacity(16 * 1024);
    wire::encode(&first, &mut buf);
    loop {
        // Coalesce whatever is ready into one write.
        while let Ok(f) = rx.try_recv() {
            wire::encode(&f, &mut buf);
            if buf.len() > 256 * 1024 {
                break;
            }
        }
        if send.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
        match rx.recv().await {
            Some(f) => wire::encode(&f, &mut buf),
            None => break,
        }
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
}

async fn read_loop(conn: &quinn::Connection, shared: &Shared, tx: mpsc::Sender<Frame>) -> Outcome {
    let limits = &shared.limits;
    let setup = tokio::time::timeout(limits.setup_timeout, conn.accept_bi()).await;
    // Hold the send half of the client's stream for the whole connection: dropping it would
    // finish the stream, and rsocket-py then refuses to write on it.
    let Ok(Ok((_client_stream_send, mut recv))) = setup else {
        return Outcome::Error(wire::ERR_INVALID_SETUP, "no SETUP in time".into());
    };
    let mut reader = FrameReader::new(limits.max_frame_len);

    // SETUP first, within the setup timeout.
    let first =
        tokio::time::timeout(limits.setup_timeout, next_frame(&mut recv, &mut reader)).await;
    let (merchant_id, trust, keepalive) = match first {
        Err(_) => return Outcome::Error(wire::ERR_INVALID_SETUP, "no SETUP in time".into()),
        Ok(Err(outcome)) => return outcome,
        Ok(Ok(None)) => return Outcome::Done,
        Ok(Ok(Some(frame))) => match frame.get_body() {
            Body::Setup(setup) => {
                let key = setup
                    .get_metadata()
                    .map(|m| String::from_utf8_lossy(m).trim().to_string())
                    .unwrap_or_default();
                if key.is_empty() {
                    return Outcome::Error(
                        wire::ERR_REJECT_SETUP,
                        "SETUP metadata must carry the merchant's write key".into(),
                    );
                }
                match shared.registry.merchant_for_key(&key).await {
                    Ok(Some(owner)) => (
                        owner.merchant_id,
                        owner.trust,
                        // Floored: a zero interval must not turn a wait into a busy loop.
                        setup.get_keepalive().max(Duration::from_millis(100)),
                    ),
                    Ok(None) => {
                        return Outcome::Error(wire::ERR_REJECT_SETUP, "unknown write key".into())
                    }
                    // Temporary: CONNECTION_CLOSE tells the client to reconnect and retry.
                    Err(e) => return Outcome::Error(wire::ERR_CONN_CLOSED, e.to_string()),
                }
            }
            _ => {
                return Outcome::Error(
                    wire::ERR_INVALID_SETUP,
                    "the first frame must be SETUP".into(),
                )
            }
        },
    };
    tracing::debug!(merchant = %merchant_id, ?trust, "setup accepted");
    let merchant: Arc<str> = merchant_id.into();
    let ctx = Arc::new(ClientCtx {
        ip: Some(conn.remote_address().ip()),
        user_agent: None,
    });
    let in_flight = Arc::new(Semaphore::new(limits.max_in_flight_per_conn));

    let mut shutdown = shared.shutdown.clone();
    let mut waiter = Waiter {
        tx: tx.clone(),
        keepalive,
        last_sent: tokio::time::Instant::now(),
        shutdown: shared.shutdown.clone(),
    };
    let mut closing = None;
    loop {
        // Over its rate limit, a merchant's connection is not read until the allowance
        // refills: a flood is then held back by QUIC flow control at no cost to the edge,
        // instead of being received, decrypted and refused batch after batch.
        if !wait_for_allowance(shared, &merchant, &mut waiter).await {
            closing = Some(shutting_down());
            break;
        }
        // `next_frame` is cancel-safe: partial frames stay in `reader`.
        let next = tokio::select! {
            f = next_frame(&mut recv, &mut reader) => f,
            _ = shutdown.changed() => {
                closing = Some(shutting_down());
                break;
            }
        };
        let frame = match next {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(outcome) => {
                // Batches already taken still get their answers before the connection closes.
                let _ = in_flight
                    .acquire_many(limits.max_in_flight_per_conn as u32)
                    .await;
                return outcome;
            }
        };
        let stream_id = frame.get_stream_id();
        let flag = frame.get_flag();
        // A batch: request-response (answered) or fire-and-forget.
        let body = frame.get_body();
        let batch = match &body {
            Body::RequestResponse(req) if !wire::is_locate(req.get_metadata()) => {
                Some(Batch::read(
                    stream_id,
                    req.get_data(),
                    req.get_metadata(),
                    Some(tx.clone()),
                ))
            }
            Body::RequestFNF(req) => Some(Batch::read(
                stream_id,
                req.get_data(),
                req.get_metadata(),
                None,
            )),
            _ => None,
        };
        if let Some(batch) = batch {
            let who = (&merchant, trust, &ctx);
            if !spawn_batch(shared, who, &in_flight, &mut waiter, batch).await {
                break;
            }
            continue;
        }
        match body {
            Body::RequestResponse(req) if wire::is_locate(req.get_metadata()) => {
                let region = wire::locate_region(req.get_metadata())
                    .filter(|r| crate::locate::is_known_region(r))
                    .map(str::to_string)
                    .or_else(|| shared.processor.region_of(ctx.ip).map(str::to_string));
                let answer = match shared.locator.locate(region.as_deref()).await {
                    Ok(l) => wire::response_frame(
                        stream_id,
                        Bytes::from(serde_json::to_vec(&l).unwrap_or_default()),
                    ),
                    Err(e) => wire::error_frame(stream_id, wire::ERR_REJECTED, &e),
                };
                if tx.send(answer).await.is_err() {
                    break;
                }
            }
            Body::Keepalive(k) => {
                if flag & Frame::FLAG_RESPOND != 0 {
                    let pong = wire::frame::Keepalive::builder(0, 0)
                        .set_last_received_position(k.get_last_received_position())
                        .build();
                    if tx.send(pong).await.is_err() {
                        break;
                    }
                }
            }
            Body::Error(e) if stream_id == 0 => {
                tracing::info!(code = e.get_code(), "client closed with error");
                break;
            }
            // A batch cannot be un-published; CANCEL and REQUEST_N have nothing to act on.
            Body::Cancel()
            | Body::RequestN(_)
            | Body::Error(_)
            | Body::MetadataPush(_)
            | Body::Lease(_) => {}
            Body::Setup(_) => {
                return Outcome::Error(wire::ERR_INVALID_SETUP, "SETUP sent twice".into());
            }
            _ => {
                let answer = wire::error_frame(
                    stream_id,
                    wire::ERR_REJECTED,
                    "unsupported interaction: use request-response or fire-and-forget",
                );
                if tx.send(answer).await.is_err() {
                    break;
                }
            }
        }
    }
    // Wait for in-flight batches to finish (graceful shutdown drains them).
    let _ = in_flight
        .acquire_many(limits.max_in_flight_per_conn as u32)
        .await;
    closing.unwrap_or(Outcome::Done)
}

/// A batch frame as read: request-response (with where its answer goes) or fire-and-forget.
struct Batch {
    stream_id: u32,
    data: Bytes,
    client_id: Option<String>,
    answer: Option<mpsc::Sender<Frame>>,
}

impl Batch {
    fn read(
        stream_id: u32,
        data: Option<&Bytes>,
        metadata: Option<&Bytes>,
        answer: Option<mpsc::Sender<Frame>>,
    ) -> Self {
        Batch {
            stream_id,
            data: data.cloned().unwrap_or_default(),
            client_id: wire::client_batch_id(metadata).map(str::to_string),
            answer,
        }
    }
}

/// Takes one of the connection's in-flight slots, the batch's memory and a typical batch's
/// worth of the merchant's allowance, then stores the batch in a task of its own (answering
/// it, for request-response). The connection's next frame is not read before all three are
/// had: a merchant at its limit has at most one frame per connection waiting, none decoded
/// only to be refused. `false`: the connection is closing.
async fn spawn_batch(
    shared: &Shared,
    (merchant, trust, ctx): (&Arc<str>, Trust, &Arc<ClientCtx>),
    in_flight: &Arc<Semaphore>,
    waiter: &mut Waiter,
    batch: Batch,
) -> bool {
    let Ok(permit) = in_flight.clone().acquire_owned().await else {
        return false;
    };
    let Some(bytes_permit) = shared.processor.reserve(batch.data.len()).await else {
        return false;
    };
    let Some(held) = hold_allowance(shared, merchant, waiter).await else {
        return false;
    };
    let (processor, merchant, ctx) = (shared.processor.clone(), merchant.clone(), ctx.clone());
    tokio::spawn(async move {
        let Batch {
            stream_id,
            data,
            client_id,
            answer,
        } = batch;
        let result = submit(
            &processor,
            &merchant,
            trust,
            &data,
            client_id.as_deref(),
            held,
            &ctx,
        )
        .await;
        // The memory goes back before the answer is queued: a client that stops reading
        // answers must not hold the edge's shared budget.
        drop((data, bytes_permit));
        match (answer, result) {
            (Some(tx), result) => {
                let frame = match result {
                    Ok(resp) => wire::response_frame(
                        stream_id,
                        Bytes::from(serde_json::to_vec(&resp).unwrap_or_default()),
                    ),
                    Err(e) => wire::error_frame(stream_id, error_code(&e), &e.to_string()),
                };
                if tokio::time::timeout(ANSWER_TIMEOUT, tx.send(frame))
                    .await
                    .is_err()
                {
                    tracing::warn!("client not reading answers; dropping one");
                }
            }
            (None, Err(e)) => {
                tracing::warn!(merchant = %merchant, error = %e, "fire-and-forget batch failed");
            }
            (None, Ok(_)) => {}
        }
        drop(permit);
    });
    true
}

/// Waits until the merchant's allowance holds a typical batch and holds it
/// ([`Processor::hold`]); `None` when the edge shuts down meanwhile. Over the daily quota it
/// holds nothing, so the batch gets its answer (retry after midnight) from admission.
async fn hold_allowance(shared: &Shared, merchant: &str, waiter: &mut Waiter) -> Option<usize> {
    loop {
        match shared.processor.hold(merchant) {
            Ok(held) => return Some(held),
            Err(Limited::Quota { .. }) => return Some(0),
            Err(limited) => {
                if !waiter.wait_out(&limited).await {
                    return None;
                }
            }
        }
    }
}

/// Waits until the merchant's allowance could take a typical batch (without holding it);
/// `false` when the edge starts shutting down meanwhile.
async fn wait_for_allowance(shared: &Shared, merchant: &str, waiter: &mut Waiter) -> bool {
    while let Err(limited) = shared.processor.precheck(merchant) {
        if !waiter.wait_out(&limited).await {
            return false;
        }
    }
    true
}

/// How a connection waits out its merchant's rate limit.
///
/// The connection is not read meanwhile, so the client's KEEPALIVEs go unanswered; a wait
/// longer than the client's lifetime (a merchant with a large burst and a small rate) would
/// make it drop a healthy connection. So the edge sends its own KEEPALIVE (not asking for
/// an answer) every `keepalive`, the interval the client's SETUP gave: RSocket clients take
/// any KEEPALIVE as a sign of life (rsocket-java's `KeepAliveSupport`, rsocket-py).
struct Waiter {
    tx: mpsc::Sender<Frame>,
    keepalive: Duration,
    last_sent: tokio::time::Instant,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Waiter {
    /// Waits a while (at most a keepalive interval and a second) towards the allowance
    /// `limited` says is missing; `false` when the edge starts shutting down meanwhile.
    async fn wait_out(&mut self, limited: &Limited) -> bool {
        if *self.shutdown.borrow() {
            return false;
        }
        let pause = Duration::from_millis(limited.retry_after_ms().max(1))
            .min(self.keepalive)
            .min(Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = self.shutdown.changed() => return false,
        }
        if self.last_sent.elapsed() >= self.keepalive {
            self.last_sent = tokio::time::Instant::now();
            // A full queue means frames are already on their way: nothing to add.
            let _ = self
                .tx
                .try_send(wire::frame::Keepalive::builder(0, 0).build());
        }
        true
    }
}

/// What a connection is told when the edge shuts down.
fn shutting_down() -> Outcome {
    Outcome::Error(
        wire::ERR_CONN_CLOSED,
        "edge shutting down: reconnect and resend unacknowledged batches".into(),
    )
}

/// Decodes one batch frame and hands it to the edge's one ingest path; `held` is the
/// allowance held for it.
async fn submit(
    processor: &Arc<Processor>,
    merchant: &Arc<str>,
    trust: Trust,
    payload: &[u8],
    client_batch_id: Option<&str>,
    held: usize,
    ctx: &ClientCtx,
) -> Result<BatchResponse, ProcessError> {
    let events = match decode(processor, merchant, payload, client_batch_id).await {
        Ok(r) => r,
        Err(e) => {
            processor.release(merchant, held);
            let refused = Err(e);
            count_events("quic", 0, &refused);
            return refused;
        }
    };
    let share = MerchantBatch {
        merchant: merchant.clone(),
        events: events.into_iter().map(Incoming::from).collect(),
        batch_id: client_batch_id.map(str::to_string),
        held,
    };
    let result = processor
        .ingest(Submission {
            listener: "quic",
            trust,
            client: ctx,
            shares: vec![share],
            wire_bytes: Some(payload.len()),
        })
        .await;
    if let Err(ProcessError::TooManyEvents { count, .. }) = &result {
        let reason = format!("batch of {count} events");
        processor
            .keep_undecodable(merchant, client_batch_id, payload, &reason)
            .await;
    }
    result
}

/// A batch payload (packed or `{"events": [...]}`); one that is neither is kept in
/// `failed_events`.
async fn decode(
    processor: &Processor,
    merchant: &str,
    payload: &[u8],
    client_batch_id: Option<&str>,
) -> Result<Vec<Event>, ProcessError> {
    match wire::decode_batch(payload) {
        Ok(events) => Ok(events),
        Err(reason) => {
            processor
                .keep_undecodable(merchant, client_batch_id, payload, &reason)
                .await;
            Err(ProcessError::Decode(reason))
        }
    }
}

fn error_code(e: &ProcessError) -> u32 {
    match e {
        ProcessError::Decode(_)
        | ProcessError::TooManyEvents { .. }
        | ProcessError::TooLarge(_) => wire::ERR_INVALID,
        // REJECTED: not processed, safe to retry.
        ProcessError::NotDurable(_)
        | ProcessError::Busy
        | ProcessError::Limited(_)
        | ProcessError::Enrich(_) => wire::ERR_REJECTED,
    }
}

/// The next frame; `Ok(None)` when the client finished its stream.
async fn next_frame(
    recv: &mut quinn::RecvStream,
    reader: &mut FrameReader,
) -> Result<Option<Frame>, Outcome> {
    loop {
        match reader.next_frame() {
            Ok(Some(f)) => return Ok(Some(f)),
            Ok(None) => {}
            Err(e) => return Err(Outcome::Error(wire::ERR_CONN_FAILED, e.to_string())),
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => reader.extend(&chunk.bytes),
            Ok(None) => return Ok(None),
            Err(_) => return Err(Outcome::Done),
        }
    }
}
