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
    /// How the edge processed the raw events, one entry per share of the batch (stable,
    /// canary): the lineage re-processing needs. Envelopes from edges that predate it have
    /// none; [`Envelope::lineage`] then derives what it can.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<Share>,
}

/// One share of a batch and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// The pipeline version that ran (or should have run) on it; `None`: no pipeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Whether this is the canary share.
    #[serde(default)]
    pub canary: bool,
    pub outcome: Outcome,
    /// Positions in `raw` of this share's events, ascending. Empty only when this is the
    /// envelope's one share and so the whole batch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub raw: Vec<u32>,
}

/// What a share's pipeline made of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The chain ran; its output is in `events`.
    Processed,
    /// The chain failed (or could not run) and the policy is `hold`: nothing in `events`.
    Held,
    /// The chain failed and the policy is `pass-through`: the raw events, unlabelled.
    PassedThrough,
    /// The merchant has no pipeline: the raw events are the processed ones.
    Unprocessed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Processed => "processed",
            Self::Held => "held",
            Self::PassedThrough => "passed_through",
            Self::Unprocessed => "unprocessed",
        }
    }
}

/// The lineage of one raw event, as `raw_events` stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawLineage {
    pub version: Option<u64>,
    /// `None` when an older edge did not record the split.
    pub canary: Option<bool>,
    pub outcome: Outcome,
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
            shares: Vec::new(),
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

    /// Per raw event (in `raw` order), the share it was in and what became of it. Without
    /// recorded shares (older edges) it is derived from the pipeline and the failures, and
    /// the canary split is unknown.
    pub fn lineage(&self) -> Vec<RawLineage> {
        let n = self.raw.len();
        if !self.shares.is_empty() {
            let mut out = vec![
                RawLineage {
                    version: None,
                    canary: Some(false),
                    outcome: Outcome::Unprocessed,
                };
                n
            ];
            let whole = self.shares.len() == 1;
            for share in &self.shares {
                let l = RawLineage {
                    version: share.version,
                    canary: Some(share.canary),
                    outcome: share.outcome,
                };
                if share.raw.is_empty() && whole {
                    out.iter_mut().for_each(|o| *o = l);
                } else {
                    for &i in &share.raw {
                        if let Some(o) = out.get_mut(i as usize) {
                            *o = l;
                        }
                    }
                }
            }
            return out;
        }
        let failed_version = self
            .failures
            .iter()
            .find(|f| f.stage == FailureStage::Plugin)
            .map(|f| f.pipeline_version);
        let l = match failed_version {
            Some(version) => RawLineage {
                version: version.or(self.pipeline.as_ref().map(|p| p.version)),
                canary: None,
                outcome: if self.processed.as_ref().is_some_and(|p| p.is_empty()) {
                    Outcome::Held
                } else {
                    Outcome::PassedThrough
                },
            },
            None => RawLineage {
                version: self.pipeline.as_ref().map(|p| p.version),
                canary: self.canary.is_none().then_some(false),
                outcome: if self.pipeline.is_some() {
                    Outcome::Processed
                } else {
                    Outcome::Unprocessed
                },
            },
        };
        vec![l; n]
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
            shares: vec![Share {
                version: Some(3),
                canary: true,
                outcome: Outcome::Held,
                raw: vec![0, 2],
            }],
        };
        assert_eq!(Envelope::from_json(&env.to_json()).unwrap(), env);
    }

    fn event(id: &str) -> Event {
        serde_json::from_value(serde_json::json!({
            "event_id": id, "merchant_id": "m1", "name": "pageview", "ts": 1
        }))
        .unwrap()
    }

    #[test]
    fn lineage_follows_recorded_shares_and_is_derived_without_them() {
        let pipeline = |version| PipelineRef {
            merchant_id: "m1".into(),
            version,
            plugins: vec![],
        };
        let mut env =
            Envelope::undecodable("b".into(), "m1".into(), "e".into(), 1, b"", "x".into());
        env.failures.clear();
        env.raw = vec![event("a"), event("b"), event("c")];
        env.pipeline = Some(pipeline(3));
        env.processed = Some(vec![event("a"), event("c")]);
        env.shares = vec![
            Share {
                version: Some(3),
                canary: false,
                outcome: Outcome::Processed,
                raw: vec![0, 2],
            },
            Share {
                version: Some(4),
                canary: true,
                outcome: Outcome::Held,
                raw: vec![1],
            },
        ];
        let l = env.lineage();
        assert_eq!(
            l[0],
            RawLineage {
                version: Some(3),
                canary: Some(false),
                outcome: Outcome::Processed
            }
        );
        assert_eq!(
            l[1],
            RawLineage {
                version: Some(4),
                canary: Some(true),
                outcome: Outcome::Held
            }
        );
        assert_eq!(l[2], l[0]);
        // A second share with no positions covers nothing (only a lone share is the batch).
        env.shares[0].raw = vec![0, 1, 2];
        env.shares[1].raw.clear();
        assert!(env
            .lineage()
            .iter()
            .all(|l| l.canary == Some(false) && l.version == Some(3)));

        // An older edge's envelope: a held plugin failure, no split recorded.
        env.shares.clear();
        env.canary = None;
        env.processed = Some(Vec::new());
        env.failures = vec![Failure {
            stage: FailureStage::Plugin,
            event_id: "a".into(),
            plugin: None,
            pipeline_version: Some(3),
            reason: "trap".into(),
            payload: String::new(),
        }];
        let l = env.lineage();
        assert!(l
            .iter()
            .all(|l| l.outcome == Outcome::Held && l.version == Some(3)));
        env.pipeline = None;
        env.processed = None;
        env.failures.clear();
        assert!(env
            .lineage()
            .iter()
            .all(|l| l.outcome == Outcome::Unprocessed && l.canary == Some(false)));
    }
}
