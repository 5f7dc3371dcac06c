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
use beacon_proto::bus::{self, Pipeline};
use beacon_proto::{PipelineRef, PluginRef};
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

/// The chains currently active at this edge, by merchant.
#[derive(Clone, Default)]
pub struct Pipelines {
    chains: Arc<RwLock<HashMap<String, Arc<Chain>>>>,
}

impl Pipelines {
    pub fn get(&self, merchant_id: &str) -> Option<Arc<Chain>> {
        self.chains.read().ok()?.get(merchant_id).cloned()
    }

    /// The active pipeline version of every merchant that has one.
    pub fn versions(&self) -> std::collections::BTreeMap<String, u64> {
        self.chains
            .read()
            .map(|c| {
                c.iter()
                    .map(|(m, ch)| (m.clone(), ch.pipeline().version))
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
                if let Ok(mut c) = self.chains.write() {
                    c.remove(&merchant);
                }
                tracing::info!(%merchant, "pipeline removed");
            }
            kv::Operation::Put => match load_chain(objects, runtime, &entry).await {
                Ok(chain) => {
                    tracing::info!(%merchant, version = chain.pipeline().version, "pipeline active");
                    if let Ok(mut c) = self.chains.write() {
                        c.insert(merchant, Arc::new(chain));
                    }
                }
                // Keep the previous chain: a broken change must not stop a merchant's traffic.
                Err(e) => tracing::error!(%merchant, error = %e, "pipeline change not applied"),
            },
        }
    }
}

async fn open_stores(
    js: &jetstream::Context,
) -> Result<(kv::Store, object_store::ObjectStore), PipelineError> {
    let kv = js
        .create_key_value(kv::Config {
            bucket: bus::PIPELINES_BUCKET.into(),
            history: 64,
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

async fn load_chain(
    objects: &object_store::ObjectStore,
    runtime: &Arc<Runtime>,
    entry: &kv::Entry,
) -> Result<Chain, PipelineError> {
    let pipeline: Pipeline =
        serde_json::from_slice(&entry.value).map_err(|source| PipelineError::Json {
            key: entry.key.clone(),
            source,
        })?;
    let mut plugins = Vec::new();
    for p in &pipeline.plugins {
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
    Ok(Chain::new(
        PipelineRef {
            merchant_id: pipeline.merchant_id.clone(),
            version: pipeline.version,
            plugins: pipeline.plugins.clone(),
        },
        plugins,
    ))
}

async fn fetch_component(
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

/// Stores a component (content-addressed) and makes it the merchant's only plugin, as a new
/// pipeline version. Returns the new pipeline. Used by `beacon plugin attach`.
pub async fn attach_plugin(
    js: &jetstream::Context,
    merchant_id: &str,
    name: &str,
    component: &[u8],
    config: &str,
    changed_by: &str,
) -> Result<Pipeline, PipelineError> {
    let (kv, objects) = open_stores(js).await?;
    let sha256 = Runtime::sha256(component);
    if objects.info(&sha256).await.is_err() {
        let mut reader = component;
        objects
            .put(sha256.as_str(), &mut reader)
            .await
            .map_err(nats)?;
    }
    let current = kv.entry(merchant_id).await.map_err(nats)?;
    let (version, revision) = match &current {
        Some(e) if e.operation == kv::Operation::Put => {
            let p: Pipeline =
                serde_json::from_slice(&e.value).map_err(|source| PipelineError::Json {
                    key: e.key.clone(),
                    source,
                })?;
            (p.version + 1, e.revision)
        }
        Some(e) => (1, e.revision),
        None => (1, 0),
    };
    let pipeline = Pipeline {
        merchant_id: merchant_id.to_string(),
        version,
        plugins: vec![PluginRef {
            name: name.to_string(),
            sha256,
            config: config.to_string(),
        }],
        changed_by: changed_by.to_string(),
        reason: format!("attach {name}"),
        changed_at: crate::now_ms(),
    };
    let json = serde_json::to_vec(&pipeline).map_err(|source| PipelineError::Json {
        key: merchant_id.to_string(),
        source,
    })?;
    // Compare-and-set on the revision we read: two operators cannot both make "version N".
    kv.update(merchant_id, json.into(), revision)
        .await
        .map_err(nats)?;
    Ok(pipeline)
}
