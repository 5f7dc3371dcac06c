//! Each edge reports itself (address, active pipeline versions) in a KV bucket whose entries
//! expire: a live edge refreshes its entry, a dead one disappears. Operators and tools read
//! it to see which pipeline version every edge runs (`beacon plugin attach` waits on it).

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use beacon_proto::bus::{self, EdgeStatus};

use crate::pipelines::Pipelines;

/// Entries older than this are gone: an edge that stops refreshing is considered dead.
pub const TTL: Duration = Duration::from_secs(15);
const REFRESH: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(100);

pub async fn open_bucket(js: &jetstream::Context) -> Result<kv::Store, async_nats::Error> {
    Ok(js
        .create_key_value(kv::Config {
            bucket: bus::EDGES_BUCKET.into(),
            max_age: TTL,
            history: 1,
            ..Default::default()
        })
        .await?)
}

/// Publishes this edge's status on every pipeline change (checked every 100 ms) and at least
/// every 5 s, until the task is aborted.
pub async fn report(store: kv::Store, edge_id: String, addr: String, pipelines: Pipelines) {
    let mut last: Option<EdgeStatus> = None;
    let mut last_put = tokio::time::Instant::now();
    loop {
        let status = EdgeStatus {
            edge_id: edge_id.clone(),
            addr: addr.clone(),
            pipelines: pipelines.versions(),
            updated_at: crate::now_ms(),
        };
        let changed = last
            .as_ref()
            .is_none_or(|l| l.pipelines != status.pipelines);
        if changed || last_put.elapsed() >= REFRESH {
            match serde_json::to_vec(&status) {
                Ok(json) => match store.put(&edge_id, json.into()).await {
                    Ok(_) => {
                        last = Some(status);
                        last_put = tokio::time::Instant::now();
                    }
                    Err(e) => tracing::warn!(error = %e, "could not report edge status"),
                },
                Err(e) => tracing::warn!(error = %e, "could not encode edge status"),
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The live edges' statuses.
pub async fn live_edges(js: &jetstream::Context) -> Result<Vec<EdgeStatus>, async_nats::Error> {
    use futures::StreamExt;
    let store = open_bucket(js).await?;
    let mut keys = store.keys().await?;
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key?;
        if let Some(v) = store.get(&key).await? {
            if let Ok(s) = serde_json::from_slice::<EdgeStatus>(&v) {
                out.push(s);
            }
        }
    }
    Ok(out)
}

/// Waits until every live edge runs pipeline `version` (or newer) for `merchant_id`.
/// Returns how many edges reported and how long it took; `Err` names the edges still behind
/// at `timeout`.
pub async fn wait_applied(
    js: &jetstream::Context,
    merchant_id: &str,
    version: u64,
    timeout: Duration,
) -> Result<(usize, Duration), String> {
    let started = tokio::time::Instant::now();
    loop {
        let edges = live_edges(js).await.map_err(|e| e.to_string())?;
        let behind: Vec<&str> = edges
            .iter()
            .filter(|e| e.pipelines.get(merchant_id).copied().unwrap_or(0) < version)
            .map(|e| e.edge_id.as_str())
            .collect();
        if behind.is_empty() {
            return Ok((edges.len(), started.elapsed()));
        }
        if started.elapsed() >= timeout {
            return Err(format!(
                "pipeline v{version} of {merchant_id} is stored, but edges {} did not apply it within {timeout:?} (see their logs)",
                behind.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
