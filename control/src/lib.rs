//! Beacon's control plane: what operators and merchants use to change processing.
//!
//! - [`registry`]: plugin components, immutable and content-addressed (sha256) in the
//!   JetStream Object Store, validated before they are stored.
//! - [`pipelines`]: each merchant's pipeline in a JetStream KV bucket with history; every
//!   change (activate, canary, promote, rollback) is a compare-and-set write recording who,
//!   when and why, and every pipeline version stays stored for rollback and re-processing.
//! - [`edges`]: which pipeline revision every live edge runs.
//! - [`admin`]: the same operations over an authenticated HTTP API.
//!
//! Edges never call this crate: they only watch the buckets it writes.

pub mod admin;
pub mod edges;
pub mod ops;
pub mod pipelines;
pub mod registry;

use std::sync::Arc;

use async_nats::jetstream::{self, kv, object_store};
use beacon_plugins::{PluginError, Runtime};
use beacon_proto::bus;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// The request can never succeed as is (bad plugin, bad reference, bad config).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// Someone else changed the pipeline between our read and our write: re-read, retry.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Stored, but not (yet) running everywhere.
    #[error("{0}")]
    NotApplied(String),
}

pub(crate) fn nats<E: std::fmt::Display>(e: E) -> ControlError {
    ControlError::Nats(e.to_string())
}

/// The first 12 characters of a sha256 (or all of a shorter string), for messages.
pub fn short_sha(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Handles on every bucket the control plane writes, and a plugin runtime to validate with.
#[derive(Clone)]
pub struct Control {
    pub(crate) js: jetstream::Context,
    pub(crate) pipelines: kv::Store,
    pub(crate) versions: kv::Store,
    pub(crate) plugin_info: kv::Store,
    pub(crate) objects: object_store::ObjectStore,
    pub(crate) runtime: Arc<Runtime>,
}

impl Control {
    /// Opens (creating if needed) the buckets. `runtime` validates uploads and activations
    /// with the same sandbox the edges use.
    pub async fn open(js: jetstream::Context, runtime: Arc<Runtime>) -> Result<Self, ControlError> {
        use beacon_proto::stores::{open_kv, open_objects};
        let pipelines = open_kv(&js, bus::PIPELINES_BUCKET).await.map_err(nats)?;
        let versions = open_kv(&js, bus::PIPELINE_VERSIONS_BUCKET)
            .await
            .map_err(nats)?;
        let plugin_info = open_kv(&js, bus::PLUGIN_INFO_BUCKET).await.map_err(nats)?;
        let objects = open_objects(&js, bus::PLUGINS_OBJECT_STORE)
            .await
            .map_err(nats)?;
        Ok(Self {
            js,
            pipelines,
            versions,
            plugin_info,
            objects,
            runtime,
        })
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }
}
