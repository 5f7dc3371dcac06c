//! Names on the NATS bus, in one place so the edge, ingest and operators agree.

/// JetStream stream holding batch envelopes.
pub const EVENTS_STREAM: &str = "BEACON_EVENTS";
/// Envelopes are published on `beacon.events.<merchant-id>`.
pub const EVENTS_SUBJECT_PREFIX: &str = "beacon.events";
pub const EVENTS_SUBJECTS: &str = "beacon.events.>";
/// Durable consumer name of core-ingest.
pub const INGEST_CONSUMER: &str = "beacon-ingest";
/// KV bucket: merchant id -> `Merchant` JSON.
pub const MERCHANTS_BUCKET: &str = "beacon_merchants";
/// KV bucket: merchant id -> `Pipeline` JSON, with history.
pub const PIPELINES_BUCKET: &str = "beacon_pipelines";
/// KV bucket: edge id -> `EdgeStatus` JSON, refreshed by each live edge (entries expire).
pub const EDGES_BUCKET: &str = "beacon_edges";
/// Object store holding plugin components by sha256.
pub const PLUGINS_OBJECT_STORE: &str = "beacon_plugins";

pub fn events_subject(merchant_id: &str) -> String {
    format!("{EVENTS_SUBJECT_PREFIX}.{merchant_id}")
}

/// A merchant as stored in the registry. Write keys are stored only as sha256 hashes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Merchant {
    pub id: String,
    pub name: String,
    pub write_key_sha256: String,
    pub created_at: i64,
}

/// What a live edge reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EdgeStatus {
    pub edge_id: String,
    /// RSocket over QUIC address.
    pub addr: String,
    /// Active pipeline version per merchant.
    pub pipelines: std::collections::BTreeMap<String, u64>,
    pub updated_at: i64,
}

/// A merchant's processing pipeline: ordered plugins pinned by content hash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pipeline {
    pub merchant_id: String,
    pub version: u64,
    pub plugins: Vec<crate::PluginRef>,
    /// Who changed it and why: every change is audited in the KV history.
    #[serde(default)]
    pub changed_by: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub changed_at: i64,
}
