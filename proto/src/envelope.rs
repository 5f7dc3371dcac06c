//! Batch envelopes: the unit the edge publishes to JetStream and core-ingest consumes.
//!
//! One envelope carries one client batch for one merchant: the canonical (pre-plugin)
//! events, the plugin chain's output with the pipeline version that made it, and every
//! failure (validation or plugin) so that nothing the edge acknowledged is ever dropped.

use serde::{Deserialize, Serialize};

use crate::event::Event;

/// Bumped when the envelope's shape changes incompatibly; ingest refuses unknown versions
/// into `failed_events` rather than guessing. Version 2 adds the canary part: an envelope
/// with one is written as v2, so an ingest that predates it refuses it (kept, re-readable
/// after its upgrade) instead of silently dropping the canary share.
pub const ENVELOPE_VERSION: u32 = 1;
pub const ENVELOPE_VERSION_CANARY: u32 = 2;

/// Envelope versions this build reads.
pub fn is_supported(v: u32) -> bool {
    v == ENVELOPE_VERSION || v == ENVELOPE_VERSION_CANARY
}

/// How much of an undecodable payload is kept in `failed_events` for diagnosis.
pub const MAX_KEPT_PAYLOAD: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    /// `<edge-id>:<batch-seq>`; also the `Nats-Msg-Id`, so a retried publish is dropped by
    /// JetStream's duplicate window.
    pub batch_id: String,
    pub merchant_id: String,
    pub edge_id: String,
    /// Edge clock, epoch milliseconds.
    pub received_at: i64,
    /// The pipeline that produced `processed`; `None` when the merchant has no plugins.
    #[serde(default)]
    pub pipeline: Option<PipelineRef>,
    /// Canonical events that passed validation, before any plugin ran.
    pub raw: Vec<Event>,
    /// Plugin output. `None` when no plugin ran: the processed events are `raw` unchanged,
    /// and not sending them twice halves the envelope. Empty when the chain failed and the
    /// batch is held in `failed_events` for re-processing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processed: Option<Vec<Event>>,
    /// The share of the batch a canary pipeline processed (visitors in its percentage); the
    /// rest is in `processed`. `raw` holds the raw events of both shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryPart>,
    #[serde(default)]
    pub failures: Vec<Failure>,
}

/// Events a canary pipeline produced. `pipeline` is `None` when the canary failed and its
/// pipeline lets events pass through unprocessed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryPart {
    pub pipeline: Option<PipelineRef>,
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineRef {
    pub merchant_id: String,
    pub version: u64,
    pub plugins: Vec<PluginRef>,
}

impl PipelineRef {
    /// The label stored in `events.pipeline_version`: `<merchant-pipeline-version>`.
    pub fn label(&self) -> String {
        format!("v{}", self.version)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRef {
    pub name: String,
    /// sha256 of the component bytes, hex: plugin versions are content-addressed.
    pub sha256: String,
    /// The merchant's configuration string handed to the plugin.
    #[serde(default)]
    pub config: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureStage {
    /// The batch payload could not be decoded at all.
    Decode,
    /// One event broke a limit or a rule.
    Validate,
    /// A plugin trapped, ran out of time or memory, or returned an error.
    Plugin,
}

impl FailureStage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Decode => "decode",
            Self::Validate => "validate",
            Self::Plugin => "plugin",
        }
    }
}

/// One failed event (or, for `Decode`, one undecodable payload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub stage: FailureStage,
    /// Empty when the payload could not be decoded far enough to find one.
    pub event_id: String,
    /// `name@sha256` of the plugin that failed, for `Plugin` failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_version: Option<u64>,
    pub reason: String,
    /// What was received: the event as JSON, or the (truncated, lossy UTF-8) payload.
    pub payload: String,
}

impl Envelope {
    /// An envelope holding only a payload that could not be decoded (kept, at most
    /// [`MAX_KEPT_PAYLOAD`] bytes of it, so it lands in `failed_events` with its reason).
    pub fn undecodable(
        batch_id: String,
        merchant_id: String,
        edge_id: String,
        received_at: i64,
        payload: &[u8],
        reason: String,
    ) -> Self {
        let kept = &payload[..payload.len().min(MAX_KEPT_PAYLOAD)];
        Self {
            v: ENVELOPE_VERSION,
            batch_id,
            merchant_id,
            edge_id,
            received_at,
            pipeline: None,
            raw: Vec::new(),
            processed: None,
            canary: None,
            failures: vec![Failure {
                stage: FailureStage::Decode,
                event_id: String::new(),
                plugin: None,
                pipeline_version: None,
                reason,
                payload: String::from_utf8_lossy(kept).into_owned(),
            }],
        }
    }

    /// The events that belong in the `events` table, by the pipeline that produced them
    /// (`None`: unprocessed).
    pub fn processed_parts(&self) -> impl Iterator<Item = (Option<&PipelineRef>, &[Event])> {
        let main = (
            self.pipeline.as_ref(),
            self.processed.as_deref().unwrap_or(&self.raw),
        );
        let canary = self
            .canary
            .as_ref()
            .map(|c| (c.pipeline.as_ref(), c.events.as_slice()));
        std::iter::once(main).chain(canary)
    }

    /// The events that belong in the `events` table.
    pub fn processed_events(&self) -> impl Iterator<Item = &Event> {
        self.processed_parts().flat_map(|(_, events)| events.iter())
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain data structures cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let env = Envelope {
            v: ENVELOPE_VERSION,
            batch_id: "edge-1:7".into(),
            merchant_id: "m1".into(),
            edge_id: "edge-1".into(),
            received_at: 1,
            pipeline: Some(PipelineRef {
                merchant_id: "m1".into(),
                version: 3,
                plugins: vec![PluginRef {
                    name: "utm".into(),
                    sha256: "ab".into(),
                    config: "{}".into(),
                }],
            }),
            raw: vec![],
            processed: Some(vec![]),
            canary: Some(CanaryPart {
                pipeline: None,
                events: vec![],
            }),
            failures: vec![Failure {
                stage: FailureStage::Plugin,
                event_id: "e".into(),
                plugin: Some("utm@ab".into()),
                pipeline_version: Some(3),
                reason: "fuel".into(),
                payload: "{}".into(),
            }],
        };
        assert_eq!(Envelope::from_json(&env.to_json()).unwrap(), env);
    }
}
