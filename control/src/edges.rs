//! Which pipeline revision every live edge runs. Edges report themselves in a KV bucket
//! whose entries expire (see `beacon_edge::status`); this side only reads it.

use std::time::Duration;

use beacon_proto::bus::{self, EdgeStatus};
use futures::StreamExt;

use crate::{nats, ControlError};

/// The live edges' statuses (none when no edge ever started).
pub async fn live_edges(
    js: &async_nats::jetstream::Context,
) -> Result<Vec<EdgeStatus>, ControlError> {
    let store = match js.get_key_value(bus::EDGES_BUCKET).await {
        Ok(s) => s,
        // No edge ever started: no live edges. Anything else is an error, not "none".
        Err(e) if e.to_string().to_lowercase().contains("not found") => return Ok(Vec::new()),
        Err(e) => return Err(nats(e)),
    };
    let mut keys = match store.keys().await {
        Ok(k) => k,
        Err(e) => return Err(nats(e)),
    };
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(nats)?;
        if let Some(v) = store.get(&key).await.map_err(nats)? {
            match serde_json::from_slice::<EdgeStatus>(&v) {
                Ok(s) => out.push(s),
                // An edge whose status we cannot read counts as live and behind on everything.
                Err(_) => out.push(EdgeStatus {
                    edge_id: key.clone(),
                    addr: String::new(),
                    pipelines: Default::default(),
                    updated_at: 0,
                    region: String::new(),
                    http_addr: None,
                    in_flight: 0,
                }),
            }
        }
    }
    out.sort_by(|a, b| a.edge_id.cmp(&b.edge_id));
    Ok(out)
}

/// Waits until every live edge runs revision `revision` (or newer) of the merchant's
/// pipeline. Returns how many edges reported and how long it took; `Err` names the edges
/// still behind at `timeout`.
pub async fn wait_applied(
    js: &async_nats::jetstream::Context,
    merchant_id: &str,
    revision: u64,
    timeout: Duration,
) -> Result<(usize, Duration), ControlError> {
    let started = tokio::time::Instant::now();
    loop {
        let edges = live_edges(js).await?;
        let behind: Vec<&str> = edges
            .iter()
            .filter(|e| e.pipelines.get(merchant_id).copied().unwrap_or(0) < revision)
            .map(|e| e.edge_id.as_str())
            .collect();
        if behind.is_empty() {
            return Ok((edges.len(), started.elapsed()));
        }
        if started.elapsed() >= timeout {
            return Err(ControlError::NotApplied(format!(
                "the pipeline change of {merchant_id} (revision {revision}) is stored, but edges {} did not apply it within {timeout:?} (see their logs)",
                behind.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
