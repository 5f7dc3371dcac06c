//! Merchants' plugin pipelines at the edge.
//!
//! Pipelines live in a JetStream KV bucket (one key per merchant, with history) and plugin
//! components in the JetStream Object Store, addressed by sha256. The edge watches the bucket,
//! compiles what it has not seen (the runtime caches compiled code on disk by hash), and swaps
//! a merchant's chain atomically: a batch holds an `Arc` to the chain it started with, so a
//! change lands between batches and never half-way through one.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_nats::jetstream::{self, kv, object_store};
use beacon_plugins::{Chain, Runtime};
use beacon_proto::bus::{self, OnFailure, Pipeline, PipelineDef};
use beacon_proto::PluginRef;
use futures::StreamExt;
use tokio::io::AsyncReadExt;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error("plugin {name}@{sha256} is not in the object store")]
    MissingComponent { name: String, sha256: String },
    #[error(transparent)]
    Plugin(#[from] beacon_plugins::PluginError),
    #[error("pipeline JSON for {key}: {source}")]
    Json {
        key: String,
        source: serde_json::Error,
    },
}

fn nats<E: std::fmt::Display>(e: E) -> PipelineError {
    PipelineError::Nats(e.to_string())
}

/// One stage a batch can go through: a chain and what to do when it fails.
pub struct Stage {
    pub chain: Arc<Chain>,
    pub on_failure: OnFailure,
}

/// A merchant's pipeline as this edge runs it: the active version and, optionally, a canary
/// version for a share of visitors.
pub struct Active {
    /// Revision of the pipelines-bucket entry this came from (reported in edge status).
    pub revision: u64,
    pub stable: Stage,
    pub canary: Option<(Stage, u8)>,
}

/// A merchant's pipeline this edge could not load (missing component, bad entry) and has
/// no earlier version of: its batches fail by the pipeline's policy rather than being
/// stored as if the merchant had no plugins (a PII scrubber must not be skipped).
pub struct Unavailable {
    pub version: u64,
    pub on_failure: OnFailure,
    pub reason: String,
}

/// What the edge runs for a merchant.
pub enum Runnable {
    Ready(Active),
    Unavailable(Unavailable),
}

impl Active {
    /// Whether an event of `visitor` (or `event_id` when anonymous) goes to the canary.
    pub fn is_canary(&self, visitor: Option<&str>, event_id: &str) -> bool {
        self.canary
            .as_ref()
            .is_some_and(|(_, pct)| bus::canary_bucket(visitor.unwrap_or(event_id)) < *pct)
    }
}

/// The pipelines currently active at this edge, by merchant.
#[derive(Clone, Default)]
pub struct Pipelines {
    active: Arc<RwLock<HashMap<String, Arc<Runnable>>>>,
}

impl Pipelines {
    pub fn get(&self, merchant_id: &str) -> Option<Arc<Runnable>> {
        self.active.read().ok()?.get(merchant_id).cloned()
    }

    /// The applied pipelines-bucket revision of every merchant with a running pipeline (an
    /// unavailable one is not reported as applied).
    pub fn versions(&self) -> std::collections::BTreeMap<String, u64> {
        self.active
            .read()
            .map(|c| {
                c.iter()
                    .filter_map(|(m, r)| match r.as_ref() {
                        Runnable::Ready(a) => Some((m.clone(), a.revision)),
                        Runnable::Unavailable(_) => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Loads every pipeline, then follows changes in the background.
    pub async fn start(
        js: &jetstream::Context,
        runtime: Arc<Runtime>,
    ) -> Result<Self, PipelineError> {
        let (kv, objects) = open_stores(js).await?;
        let this = Self::default();
        let mut watch = kv.watch_with_history(">").await.map_err(nats)?;
        // Apply the existing pipelines before accepting traffic. The watch delivers the
        // latest entry per merchant first; `delta` counts what is still pending of that
        // snapshot, so 0 means caught up. (The bucket's message count includes history and
        // is not the number of entries the watch delivers.)
        if kv.status().await.map_err(nats)?.values() > 0 {
            loop {
                let next = tokio::time::timeout(std::time::Duration::from_secs(10), watch.next());
                match next.await {
                    Ok(Some(Ok(entry))) => {
                        let caught_up = entry.delta == 0;
                        this.apply(&objects, &runtime, entry).await;
                        if caught_up {
                            break;
                        }
                    }
                    Ok(Some(Err(e))) => return Err(nats(e)),
                    Ok(None) => break,
                    Err(_) => {
                        tracing::warn!("pipeline history not fully read within 10 s; continuing");
                        break;
                    }
                }
            }
        }
        let me = this.clone();
        tokio::spawn(async move {
            while let Some(entry) = watch.next().await {
                if let Ok(entry) = entry {
                    me.apply(&objects, &runtime, entry).await;
                }
            }
        });
        Ok(this)
    }

    async fn apply(
        &self,
        objects: &object_store::ObjectStore,
        runtime: &Arc<Runtime>,
        entry: kv::Entry,
    ) {
        let merchant = entry.key.clone();
        match entry.operation {
            kv::Operation::Delete | kv::Operation::Purge => {
                if let Ok(mut c) = self.active.write() {
                    c.remove(&merchant);
                }
                tracing::info!(%merchant, "pipeline removed");
            }
            kv::Operation::Put => match load_active(objects, runtime, &entry).await {
                Ok(active) => {
                    tracing::info!(
                        %merchant,
                        version = active.stable.chain.pipeline().version,
                        canary = ?active.canary.as_ref().map(|(s, p)| (s.chain.pipeline().version, *p)),
                        revision = active.revision,
                        "pipeline active"
                    );
                    if let Ok(mut c) = self.active.write() {
                        c.insert(merchant, Arc::new(Runnable::Ready(active)));
                    }
                }
                Err(e) => {
                    tracing::error!(%merchant, error = %e, "pipeline change not applied");
                    let Ok(mut c) = self.active.write() else {
                        return;
                    };
                    // Keep a running previous version: a broken change must not stop a
                    // merchant's traffic. Without one, fail batches by the pipeline's policy.
                    if !matches!(
                        c.get(&merchant).map(|r| r.as_ref()),
                        Some(Runnable::Ready(_))
                    ) {
                        let parsed = serde_json::from_slice::<Pipeline>(&entry.value).ok();
                        c.insert(
                            merchant,
                            Arc::new(Runnable::Unavailable(Unavailable {
                                version: parsed.as_ref().map_or(0, |p| p.active.version),
                                on_failure: parsed.map_or(OnFailure::Hold, |p| p.active.on_failure),
                                reason: format!("pipeline could not be loaded at this edge: {e}"),
                            })),
                        );
                    }
                }
            },
        }
    }
}

/// Opens (creating if needed) the pipelines bucket and the plugin object store, with the
/// settings every component uses.
pub async fn open_stores(
    js: &jetstream::Context,
) -> Result<(kv::Store, object_store::ObjectStore), PipelineError> {
    let kv = js
        .create_key_value(kv::Config {
            bucket: bus::PIPELINES_BUCKET.into(),
            history: bus::PIPELINES_HISTORY,
            ..Default::default()
        })
        .await
        .map_err(nats)?;
    let objects = js
        .create_object_store(object_store::Config {
            bucket: bus::PLUGINS_OBJECT_STORE.into(),
            ..Default::default()
        })
        .await
        .map_err(nats)?;
    Ok((kv, objects))
}

async fn load_active(
    objects: &object_store::ObjectStore,
    runtime: &Arc<Runtime>,
    entry: &kv::Entry,
) -> Result<Active, PipelineError> {
    let pipeline: Pipeline =
        serde_json::from_slice(&entry.value).map_err(|source| PipelineError::Json {
            key: entry.key.clone(),
            source,
        })?;
    let stable = load_stage(objects, runtime, &pipeline.active).await?;
    let canary = match &pipeline.canary {
        Some(c) => Some((load_stage(objects, runtime, &c.def).await?, c.percent)),
        None => None,
    };
    Ok(Active {
        revision: entry.revision,
        stable,
        canary,
    })
}

async fn load_stage(
    objects: &object_store::ObjectStore,
    runtime: &Arc<Runtime>,
    def: &PipelineDef,
) -> Result<Stage, PipelineError> {
    let mut plugins = Vec::new();
    for p in &def.plugins {
        let loaded = match runtime.cached(&p.sha256) {
            Some(l) => l,
            None => {
                let bytes = fetch_component(objects, p).await?;
                let rt = runtime.clone();
                let sha = p.sha256.clone();
                tokio::task::spawn_blocking(move || rt.load(&sha, &bytes))
                    .await
                    .map_err(nats)??
            }
        };
        plugins.push((p.clone(), loaded));
    }
    Ok(Stage {
        chain: Arc::new(Chain::new(def.to_ref(), plugins)),
        on_failure: def.on_failure,
    })
}

/// Reads a component's bytes from the object store.
pub async fn fetch_component(
    objects: &object_store::ObjectStore,
    p: &PluginRef,
) -> Result<Vec<u8>, PipelineError> {
    let mut obj = objects
        .get(&p.sha256)
        .await
        .map_err(|_| PipelineError::MissingComponent {
            name: p.name.clone(),
            sha256: p.sha256.clone(),
        })?;
    let mut bytes = Vec::new();
    obj.read_to_end(&mut bytes).await.map_err(nats)?;
    Ok(bytes)
}
