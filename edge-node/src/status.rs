//! Each edge reports itself (address, active pipeline versions) in a KV bucket whose entries
//! expire: a live edge refreshes its entry, a dead one disappears. Operators and tools read
//! it (`beacon_control::edges`) to see which pipeline revision every edge runs: `beacon plugin
//! activate` waits until all live edges run the change.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use beacon_proto::bus::{self, EdgeStatus};

use std::sync::Arc;

use crate::pipelines::Pipelines;
use crate::process::Processor;
use crate::publish::Outcomes;

/// What an edge says about itself besides its pipelines.
pub struct Me {
    pub edge_id: String,
    pub addr: String,
    pub region: String,
    pub http_addr: Option<String>,
}

/// Entries older than this are gone: an edge that stops refreshing is considered dead.
pub const TTL: Duration = beacon_proto::stores::EDGE_STATUS_TTL;
const REFRESH: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(100);

pub async fn open_bucket(js: &jetstream::Context) -> Result<kv::Store, async_nats::Error> {
    Ok(beacon_proto::stores::open_kv(js, bus::EDGES_BUCKET).await?)
}

/// Publishes this edge's status on every pipeline change (checked every 100 ms) and at least
/// every 5 s, until the task is aborted.
pub async fn report(
    store: kv::Store,
    me: Me,
    pipelines: Pipelines,
    processor: Arc<Processor>,
    puts: Arc<Outcomes>,
) {
    let mut last: Option<EdgeStatus> = None;
    let mut last_put = tokio::time::Instant::now();
    loop {
        let status = EdgeStatus {
            edge_id: me.edge_id.clone(),
            addr: me.addr.clone(),
            pipelines: pipelines.versions(),
            updated_at: crate::now_ms(),
            region: me.region.clone(),
            http_addr: me.http_addr.clone(),
            in_flight: processor.in_flight(),
        };
        let changed = last
            .as_ref()
            .is_none_or(|l| l.pipelines != status.pipelines);
        if changed || last_put.elapsed() >= REFRESH {
            match serde_json::to_vec(&status) {
                Ok(json) => match store.put(&me.edge_id, json.into()).await {
                    Ok(_) => {
                        puts.ok();
                        last = Some(status);
                        last_put = tokio::time::Instant::now();
                    }
                    Err(e) => {
                        puts.failed(&e.to_string());
                        tracing::warn!(error = %e, "could not report edge status");
                    }
                },
                Err(e) => tracing::warn!(error = %e, "could not encode edge status"),
            }
        }
        tokio::time::sleep(POLL).await;
    }
}
