//! Beacon's edge node: where SDKs and trackers connect.
//!
//! Data flow: QUIC connection -> RSocket SETUP (write or server key -> merchant) -> batch
//! frames, or an HTTP tracker request -> its identities' merchants; either listener only
//! decodes, then [`process::Processor::ingest`] (admission, reserved properties, enrichment,
//! validation, plugin chain) -> [`publish::Publisher`] (JetStream, acked) -> answer to the
//! client. The edge never links the warehouse: it only knows the bus.

use beacon_serve::conn_limit;
pub mod device;
pub mod enrich;
pub mod http;
pub mod limits;
pub mod locate;
pub mod pipelines;
pub mod process;
pub mod publish;
pub mod quic;
pub mod registry;
pub mod reserved;
pub mod status;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use beacon_plugins::{Runtime, SandboxLimits};
use beacon_proto::bus::{self, MerchantLimits};
use beacon_proto::Limits;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Nats { url: String, reason: String },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Plugins(#[from] beacon_plugins::PluginError),
    #[error(transparent)]
    Pipelines(#[from] pipelines::PipelineError),
    #[error(transparent)]
    Enrich(#[from] enrich::EnrichError),
}

#[derive(Clone, Debug)]
pub struct EdgeConfig {
    pub edge_id: String,
    /// Shown redacted in `Debug`: the password never reaches a log.
    pub nats_url: bus::NatsUrl,
    pub listen: SocketAddr,
    /// Holds the TLS identity and the compiled-plugin cache.
    pub data_dir: PathBuf,
    pub quic: quic::QuicLimits,
    pub event_limits: Limits,
    pub sandbox: SandboxLimits,
    /// Where this edge is, for `locate` (see `locate::REGIONS`).
    pub region: String,
    /// HTTP collectors (Snowplow, GA4, Plausible) and `GET /locate`; `None`: QUIC only.
    pub http_listen: Option<SocketAddr>,
    pub http: http::HttpLimits,
    /// MaxMind-format City database for geo enrichment; `None`: no geo.
    pub geoip: Option<PathBuf>,
    /// Rate limit of merchants whose record sets none; `None`: unlimited.
    pub default_limits: Option<MerchantLimits>,
    /// Memory for batches in flight, both listeners together (see `process::Budget`).
    pub in_flight_memory: usize,
    /// The hub's JetStream domain, when `nats_url` is this region's leaf nats-server (the
    /// topology of docs/OPERATIONS.md): events are made durable in the leaf's own JetStream,
    /// which the hub's stream sources, so collection goes on while the hub or the link is
    /// down; what all edges share (merchants, pipelines, plugins, status, salts) is the
    /// hub's. `None`: one JetStream for everything.
    pub hub_domain: Option<String>,
    /// How envelopes are written on the bus (ingest reads both).
    pub envelope_encoding: beacon_proto::envelope::Encoding,
}

impl EdgeConfig {
    pub fn new(nats_url: impl Into<String>, listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            edge_id: "edge-1".into(),
            nats_url: bus::NatsUrl::new(nats_url),
            listen,
            data_dir,
            quic: quic::QuicLimits::default(),
            event_limits: Limits::default(),
            sandbox: SandboxLimits::default(),
            region: "local".into(),
            http_listen: None,
            http: http::HttpLimits::default(),
            geoip: None,
            default_limits: None,
            in_flight_memory: 256 << 20,
            hub_domain: None,
            envelope_encoding: Default::default(),
        }
    }
}

/// A running edge.
pub struct Edge {
    pub addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    http_task: Option<tokio::task::JoinHandle<()>>,
    pub cert_path: PathBuf,
    endpoint: quinn::Endpoint,
    processor: Arc<process::Processor>,
    task: tokio::task::JoinHandle<()>,
    reporter: tokio::task::JoinHandle<()>,
    probe: tokio::task::JoinHandle<()>,
    /// Readiness (`/readyz` on the HTTP listener): the bus check.
    pub health: beacon_serve::Health,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
}

impl Edge {
    pub async fn start(cfg: EdgeConfig) -> Result<Self, EdgeError> {
        let nats_err = |e: &dyn std::fmt::Display| EdgeError::Nats {
            url: cfg.nats_url.to_string(),
            reason: e.to_string(),
        };
        let client = bus::connect(&cfg.nats_url, &format!("beacon-edge {}", cfg.edge_id))
            .await
            .map_err(|e| nats_err(&e))?;
        let max_payload = client.server_info().max_payload;
        // Events go to `js`; what edges share, to `shared` (the hub's domain behind a leaf).
        let shared = match &cfg.hub_domain {
            Some(domain) => jetstream::with_domain(client.clone(), domain),
            None => jetstream::new(client.clone()),
        };
        let js = jetstream::new(client);
        // The stream first, so the first readiness probe does not report it missing.
        publish::ensure_stream(&js)
            .await
            .map_err(|e| nats_err(&e))?;
        // Ready = JetStream answers for the events stream (checked every second).
        let health = beacon_serve::Health::new();
        let publisher = publish::Publisher::new(js.clone(), max_payload, cfg.envelope_encoding);
        // Bus writes other than events (status puts, salts): a store that fails them fails
        // events too, unless they go to the hub, whose outage the leaf is there to ride out.
        let status_puts = Arc::new(publish::Outcomes::default());
        let probe = {
            let js = js.clone();
            let mut watched = vec![publisher.outcomes()];
            if cfg.hub_domain.is_none() {
                watched.push(status_puts.clone());
            }
            let watched: Arc<[Arc<publish::Outcomes>]> = watched.into();
            health.probe(
                "bus",
                Duration::from_secs(1),
                Duration::from_secs(2),
                move || {
                    let (js, watched) = (js.clone(), watched.clone());
                    async move {
                        let writes: Vec<&publish::Outcomes> =
                            watched.iter().map(|o| o.as_ref()).collect();
                        publish::probe(&js, &writes).await
                    }
                },
            )
        };
        let merchants = registry::open_bucket(&shared)
            .await
            .map_err(|e| nats_err(&e))?;
        let registry = registry::Registry::start(merchants)
            .await
            .map_err(|e| nats_err(&e))?;
        let runtime = Arc::new(Runtime::new(
            cfg.sandbox.clone(),
            Some(cfg.data_dir.join("plugin-cache")),
        )?);
        let pipelines = pipelines::Pipelines::start(&shared, runtime).await?;
        let status_bucket = status::open_bucket(&shared)
            .await
            .map_err(|e| nats_err(&e))?;
        let enricher = Arc::new(
            enrich::Enricher::open(&shared, cfg.geoip.as_deref(), status_puts.clone()).await?,
        );
        let mut processor = process::Processor::new(
            cfg.edge_id.clone(),
            cfg.event_limits,
            pipelines.clone(),
            publisher,
            enricher,
            registry.clone(),
        );
        processor.default_limits = cfg.default_limits;
        processor.set_in_flight_memory(cfg.in_flight_memory);
        let processor = Arc::new(processor);
        let locator = locate::Locator::new(status_bucket.clone());

        let identity = tls::Identity::load_or_create(&cfg.data_dir.join("tls"))?;
        let server_config = identity.server_config(quic::transport_config())?;
        let endpoint = quinn::Endpoint::server(server_config, cfg.listen).map_err(|source| {
            EdgeError::Listen {
                addr: cfg.listen,
                source,
            }
        })?;
        let addr = endpoint.local_addr().map_err(|source| EdgeError::Listen {
            addr: cfg.listen,
            source,
        })?;
        let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
        let (http_addr, http_task) = match cfg.http_listen {
            Some(listen) => {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .map_err(|source| EdgeError::Listen {
                        addr: listen,
                        source,
                    })?;
                let bound = listener.local_addr().map_err(|source| EdgeError::Listen {
                    addr: listen,
                    source,
                })?;
                let app = http::App {
                    registry: registry.clone(),
                    processor: processor.clone(),
                    locator: locator.clone(),
                    limits: cfg.http.clone(),
                    health: health.clone(),
                };
                let mut stop = shutdown.clone();
                let task = tokio::spawn(http::serve(listener, app, async move {
                    let _ = stop.wait_for(|s| *s).await;
                }));
                tracing::info!(addr = %bound, "HTTP collectors listening");
                (Some(bound), Some(task))
            }
            None => (None, None),
        };
        let shared = quic::Shared {
            registry,
            processor: processor.clone(),
            locator,
            limits: cfg.quic.clone(),
            shutdown,
            conns_per_ip: conn_limit::ConnLimit::new(cfg.quic.max_conns_per_ip),
        };
        let task = tokio::spawn(quic::serve(endpoint.clone(), shared));
        let reporter = tokio::spawn(status::report(
            status_bucket,
            status::Me {
                edge_id: cfg.edge_id.clone(),
                addr: addr.to_string(),
                region: cfg.region.clone(),
                http_addr: http_addr.map(|a| a.to_string()),
            },
            pipelines,
            processor.clone(),
            status_puts,
        ));
        tracing::info!(%addr, edge_id = %cfg.edge_id, region = %cfg.region, "edge listening (RSocket over QUIC)");
        Ok(Self {
            addr,
            http_addr,
            http_task,
            cert_path: identity.cert_path,
            endpoint,
            processor,
            task,
            reporter,
            probe,
            shutdown_tx,
            health,
        })
    }

    /// Stops accepting, lets in-flight batches reach JetStream and their answers reach the
    /// clients, then closes every connection.
    pub async fn shutdown(self, grace: Duration) {
        self.endpoint.set_server_config(None);
        let _ = self.shutdown_tx.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        while self.processor.in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Give the writers a moment to flush the last answers and the closing ERROR.
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.endpoint.close(0u32.into(), b"edge shutting down");
        if let Some(http) = self.http_task {
            let _ = tokio::time::timeout(Duration::from_secs(2), http).await;
        }
        self.task.abort();
        self.reporter.abort();
        self.probe.abort();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_never_shows_the_bus_password() {
        let cfg = EdgeConfig::new(
            "tls://beacon:s3cret@leaf.example:4222",
            "127.0.0.1:0".parse().expect("addr"),
            PathBuf::from("/tmp/edge"),
        );
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("leaf.example:4222"),
            "{shown}"
        );
    }
}
