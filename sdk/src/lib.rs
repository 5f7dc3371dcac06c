//! Rust client for Beacon edges.
//!
//! Opens one QUIC connection to an edge, speaks RSocket on it (see `beacon_proto::wire` for
//! the stream mapping), authenticates with the merchant's write key in SETUP metadata, and
//! sends event batches either fire-and-forget or as request-response that completes only
//! once the edge has the batch durable in JetStream.
//!
//! ```no_run
//! # async fn demo() -> Result<(), beacon_sdk::SdkError> {
//! let client = beacon_sdk::Client::connect(beacon_sdk::ClientConfig::new(
//!     "127.0.0.1:4433".parse().unwrap(),
//!     std::fs::read("ca.pem").unwrap(),
//!     "bk_write_key",
//! )).await?;
//! let ack = client.send(&[/* events */]).await?; // returns once durable
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use beacon_proto::bus::Location;
use beacon_proto::wire::{self, Body, Frame, FrameReader};
use beacon_proto::{BatchResponse, Event};

mod failover;
use bytes::{Bytes, BytesMut};
pub use failover::{EdgeTarget, FailoverClient};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    #[error("invalid client configuration: {0}")]
    Config(String),
    #[error("cannot connect to the edge: {0}")]
    Connect(String),
    #[error("the edge refused the write key: {0}")]
    Rejected(String),
    #[error("the edge answered with error 0x{code:x}: {message}")]
    Remote { code: u32, message: String },
    #[error("connection to the edge lost: {0}")]
    ConnectionLost(String),
    #[error("no answer from the edge within {0:?}")]
    Timeout(Duration),
    #[error("unexpected answer from the edge: {0}")]
    Protocol(String),
}

impl SdkError {
    /// Whether resending the same batch (same event ids) may succeed: true for transport
    /// trouble and temporary refusals, false for input the edge will never accept.
    pub fn is_retryable(&self) -> bool {
        match self {
            SdkError::ConnectionLost(_) | SdkError::Timeout(_) | SdkError::Connect(_) => true,
            // REJECTED: not processed; CONNECTION_CLOSE: the edge is shutting down.
            SdkError::Remote { code, .. } => {
                *code == wire::ERR_REJECTED || *code == wire::ERR_CONN_CLOSED
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub addr: SocketAddr,
    /// Name the edge's certificate is issued for.
    pub server_name: String,
    /// PEM of the CA (or self-signed certificate) to trust for the edge.
    pub ca_pem: Vec<u8>,
    pub write_key: String,
    pub request_timeout: Duration,
    /// A connection silent this long is dead (keepalives go out at a quarter of it). Short
    /// values make a dead edge noticed quickly, which is what failover needs.
    pub idle_timeout: Duration,
    /// How batches are encoded: packed (the default; edges read it since the packed
    /// envelope) or JSON, for an edge that predates it.
    pub batch_encoding: wire::BatchEncoding,
}

impl ClientConfig {
    pub fn new(addr: SocketAddr, ca_pem: Vec<u8>, write_key: impl Into<String>) -> Self {
        Self {
            addr,
            server_name: "localhost".into(),
            ca_pem,
            write_key: write_key.into(),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            batch_encoding: wire::BatchEncoding::default(),
        }
    }
}

type Pending = Arc<Mutex<HashMap<u32, oneshot::Sender<Result<Bytes, SdkError>>>>>;

/// A connection to one edge. Cheap to share (`Arc<Client>`); requests are multiplexed.
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: tokio::sync::Mutex<quinn::SendStream>,
    next_stream_id: AtomicU32,
    pending: Pending,
    closed: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
    timeout: Duration,
    encoding: wire::BatchEncoding,
}

impl Client {
    /// Connects, sends SETUP with the write key, and waits for the edge to accept it (a
    /// KEEPALIVE round trip), so a wrong key fails here with [`SdkError::Rejected`].
    pub async fn connect(cfg: ClientConfig) -> Result<Self, SdkError> {
        let quic = quic_config(&cfg.ca_pem, cfg.idle_timeout)?;
        let bind: SocketAddr = if cfg.addr.is_ipv6() {
            "[::]:0"
                .parse()
                .map_err(|_| SdkError::Config("bind".into()))?
        } else {
            "0.0.0.0:0"
                .parse()
                .map_err(|_| SdkError::Config("bind".into()))?
        };
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| SdkError::Connect(e.to_string()))?;
        endpoint.set_default_client_config(quic);
        let conn = endpoint
            .connect(cfg.addr, &cfg.server_name)
            .map_err(|e| SdkError::Connect(e.to_string()))?
            .await
            .map_err(|e| SdkError::Connect(e.to_string()))?;
        let (mut send, _unused_recv) = conn
            .open_bi()
            .await
            .map_err(|e| SdkError::Connect(e.to_string()))?;
        let mut buf = BytesMut::new();
        wire::encode(&wire::setup_frame(&cfg.write_key), &mut buf);
        // Stream id 0 doubles as the key for connection-level answers (the KEEPALIVE echo).
        wire::encode(
            &wire::frame::Keepalive::builder(0, Frame::FLAG_RESPOND).build(),
            &mut buf,
        );
        send.write_all(&buf)
            .await
            .map_err(|e| SdkError::Connect(e.to_string()))?;

        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let (setup_tx, setup_rx) = oneshot::channel();
        pending
            .lock()
            .map_err(|_| SdkError::Protocol("poisoned".into()))?
            .insert(0, setup_tx);
        let reader = tokio::spawn(read_loop(conn.clone(), pending.clone(), closed.clone()));
        let client = Self {
            endpoint,
            conn,
            send: tokio::sync::Mutex::new(send),
            next_stream_id: AtomicU32::new(1),
            pending,
            closed,
            reader,
            timeout: cfg.request_timeout,
            encoding: cfg.batch_encoding,
        };
        match tokio::time::timeout(cfg.request_timeout, setup_rx).await {
            Ok(Ok(Ok(_))) => Ok(client),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(SdkError::ConnectionLost("closed during SETUP".into())),
            Err(_) => Err(SdkError::Timeout(cfg.request_timeout)),
        }
    }

    /// Sends a batch and waits until the edge reports it durable.
    pub async fn send(&self, events: &[Event]) -> Result<BatchResponse, SdkError> {
        self.send_batch(&new_batch_id(), events).await
    }

    /// Sends a batch under `batch_id` and waits until it is durable. Resending the same
    /// events with the same id after an error (within two minutes) stores them once.
    pub async fn send_batch(
        &self,
        batch_id: &str,
        events: &[Event],
    ) -> Result<BatchResponse, SdkError> {
        let data = self
            .request_with(
                wire::encode_batch(events, self.encoding),
                Some(Bytes::copy_from_slice(batch_id.as_bytes())),
            )
            .await?;
        serde_json::from_slice(&data).map_err(|e| SdkError::Protocol(e.to_string()))
    }

    /// The live edges nearest to `region` (or to this client's address), nearest first.
    pub async fn locate(&self, region: Option<&str>) -> Result<Location, SdkError> {
        let meta = format!("{}{}", wire::LOCATE_PREFIX, region.unwrap_or(""));
        let data = self
            .request_with(Bytes::new(), Some(Bytes::from(meta)))
            .await?;
        serde_json::from_slice(&data).map_err(|e| SdkError::Protocol(e.to_string()))
    }

    /// Sends pre-encoded batch JSON and waits for the raw answer. For tests and tools that
    /// need to send what the typed API would not.
    pub async fn request(&self, body: Bytes) -> Result<Bytes, SdkError> {
        self.request_with(body, None).await
    }

    async fn request_with(&self, body: Bytes, metadata: Option<Bytes>) -> Result<Bytes, SdkError> {
        let id = self.stream_id();
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| SdkError::Protocol("poisoned".into()))?
            .insert(id, tx);
        let mut builder = wire::frame::RequestResponse::builder(id, 0).set_data(body);
        if let Some(m) = metadata {
            builder = builder.set_metadata(m);
        }
        let frame = builder.build();
        if let Err(e) = self.write(&frame).await {
            self.forget(id);
            return Err(e);
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(SdkError::ConnectionLost("connection closed".into())),
            Err(_) => {
                self.forget(id);
                Err(SdkError::Timeout(self.timeout))
            }
        }
    }

    /// Sends a batch without waiting for an answer. The edge still publishes it with acks;
    /// the client just does not learn the outcome.
    pub async fn send_fire_and_forget(&self, events: &[Event]) -> Result<(), SdkError> {
        let id = self.stream_id();
        let frame = wire::frame::RequestFNF::builder(id, 0)
            .set_data(wire::encode_batch(events, self.encoding))
            .set_metadata(Bytes::from(new_batch_id()))
            .build();
        self.write(&frame).await
    }

    /// Sends arbitrary bytes on the request stream (tests of the edge's input handling).
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<(), SdkError> {
        let mut send = self.send.lock().await;
        send.write_all(bytes)
            .await
            .map_err(|e| SdkError::ConnectionLost(e.to_string()))
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed) || self.conn.close_reason().is_some()
    }

    /// Waits for outstanding writes and closes the connection cleanly.
    pub async fn close(self) {
        self.closed.store(true, Ordering::Relaxed);
        if let Ok(mut s) = self.send.try_lock() {
            let _ = s.finish();
        }
        self.conn.close(0u32.into(), b"bye");
        self.reader.abort();
        self.endpoint.wait_idle().await;
    }

    fn stream_id(&self) -> u32 {
        // Client-initiated RSocket streams use odd ids.
        let n = self.next_stream_id.fetch_add(2, Ordering::Relaxed);
        n & 0x7FFF_FFFF | 1
    }

    fn forget(&self, id: u32) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&id);
        }
    }

    async fn write(&self, frame: &Frame) -> Result<(), SdkError> {
        if self.is_closed() {
            return Err(SdkError::ConnectionLost("connection closed".into()));
        }
        let mut buf = BytesMut::new();
        wire::encode(frame, &mut buf);
        let mut send = self.send.lock().await;
        send.write_all(&buf)
            .await
            .map_err(|e| SdkError::ConnectionLost(e.to_string()))
    }
}

impl Drop for Client {
    /// A client dropped without `close` still ends its connection and reader task.
    fn drop(&mut self) {
        self.reader.abort();
        self.conn.close(0u32.into(), b"dropped");
    }
}

/// A fresh batch id (UUID v4, hyphenated).
pub fn new_batch_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Reads the server's stream and completes pending requests by stream id.
async fn read_loop(conn: quinn::Connection, pending: Pending, closed: Arc<AtomicBool>) {
    let reason = match read_frames(&conn, &pending).await {
        Ok(()) => SdkError::ConnectionLost("the edge closed the connection".into()),
        Err(e) => e,
    };
    closed.store(true, Ordering::Relaxed);
    let waiters: Vec<_> = match pending.lock() {
        Ok(mut p) => p.drain().collect(),
        Err(_) => Vec::new(),
    };
    for (_, tx) in waiters {
        let _ = tx.send(Err(clone_err(&reason)));
    }
}

fn clone_err(e: &SdkError) -> SdkError {
    match e {
        SdkError::Rejected(m) => SdkError::Rejected(m.clone()),
        SdkError::Remote { code, message } => SdkError::Remote {
            code: *code,
            message: message.clone(),
        },
        other => SdkError::ConnectionLost(other.to_string()),
    }
}

async fn read_frames(conn: &quinn::Connection, pending: &Pending) -> Result<(), SdkError> {
    let (_server_send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| SdkError::ConnectionLost(e.to_string()))?;
    let mut reader = FrameReader::new(wire::DEFAULT_MAX_FRAME_LEN);
    loop {
        let chunk = recv
            .read_chunk(64 * 1024, true)
            .await
            .map_err(|e| SdkError::ConnectionLost(e.to_string()))?;
        let Some(chunk) = chunk else { return Ok(()) };
        reader.extend(&chunk.bytes);
        while let Some(frame) = reader
            .next_frame()
            .map_err(|e| SdkError::Protocol(e.to_string()))?
        {
            let id = frame.get_stream_id();
            let result = match frame.get_body() {
                Body::Payload(p) => Ok(p.get_data().cloned().unwrap_or_default()),
                Body::Keepalive(_) => Ok(Bytes::new()),
                Body::Error(e) => {
                    let message = e.get_data_utf8().unwrap_or("").to_string();
                    let code = e.get_code();
                    if id == 0 {
                        // Connection-level error: everything outstanding fails with it.
                        return Err(if code == wire::ERR_REJECT_SETUP {
                            SdkError::Rejected(message)
                        } else {
                            SdkError::Remote { code, message }
                        });
                    }
                    Err(SdkError::Remote { code, message })
                }
                _ => continue,
            };
            let tx = pending.lock().ok().and_then(|mut p| p.remove(&id));
            if let Some(tx) = tx {
                let _ = tx.send(result);
            }
        }
    }
}

fn quic_config(ca_pem: &[u8], idle: Duration) -> Result<quinn::ClientConfig, SdkError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| SdkError::Config(format!("CA PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| SdkError::Config(format!("CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(SdkError::Config("no certificate in the CA PEM".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| SdkError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| SdkError::Config(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some((idle / 4).max(Duration::from_millis(50))));
    transport.max_idle_timeout(Some(
        idle.try_into()
            .map_err(|_| SdkError::Config("idle timeout".into()))?,
    ));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}
