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
use beacon_proto::stores;
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
    /// The chain's plugin names (`utm>pii`), the `chain` label of the plugin metrics: made
    /// once here, not per batch. Names, not merchants: the label's values stay few.
    pub metrics_label: Arc<str>,
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
        self.canary.as_ref().is_some_and(|(stage, pct)| {
            let p = stage.chain.pipeline();
            bus::canary_share(&p.merchant_id, p.version, visitor.unwrap_or(event_id)) < *pct
        })
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
        // Apply the existing pipelines before accepting traffic: serving a merchant whose
        // pipeline is not applied yet would store its events unprocessed (a PII scrubber
        // skipped). The watch delivers the latest entry per merchant first; `delta` counts
        // what is still pending of that snapshot, so 0 means caught up. (The bucket's
        // message count includes history, not the number of entries the watch delivers.)
        if kv.status().await.map_err(nats)?.values() > 0 {
            loop {
                let next = tokio::time::timeout(STARTUP_TIMEOUT, watch.next());
                match next.await {
                    Ok(Some(Ok(entry))) => {
                        let caught_up = entry.delta == 0;
                        this.apply(&objects, &runtime, entry).await;
                        if caught_up {
                            break;
                        }
                    }
                    Ok(Some(Err(e))) => return Err(nats(e)),
                    Ok(None) => return Err(nats("the pipelines watch ended during start-up")),
                    Err(_) => {
                        return Err(nats(format!(
                            "pipelines not all read within {STARTUP_TIMEOUT:?}; not serving with some missing"
                        )))
                    }
                }
            }
        }
        let me = this.clone();
        tokio::spawn(async move {
            loop {
                while let Some(entry) = watch.next().await {
                    match entry {
                        Ok(entry) => me.apply(&objects, &runtime, entry).await,
                        Err(e) => tracing::error!(error = %e, "pipelines watch"),
                    }
                }
                // The watch ended (NATS reconnect, stream change): follow again from the
                // latest entries; applying an entry twice is harmless.
                tracing::error!("pipelines watch ended; re-subscribing");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                match kv.watch_with_history(">").await {
                    Ok(w) => watch = w,
                    Err(e) => tracing::error!(error = %e, "pipelines watch: re-subscribe failed"),
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
                // A retry of an older revision finishing late must not undo a newer one.
                Ok(active) if self.newer_applied(&merchant, active.revision) => {}
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
                        let parsed = Pipeline::from_json(&entry.value).ok();
                        c.insert(
                            merchant.clone(),
                            Arc::new(Runnable::Unavailable(Unavailable {
                                version: parsed.as_ref().map_or(0, |p| p.active.version),
                                on_failure: parsed.map_or(OnFailure::Hold, |p| p.active.on_failure),
                                reason: format!("pipeline could not be loaded at this edge: {e}"),
                            })),
                        );
                    }
                    drop(c);
                    // A component fetch or NATS hiccup must not leave this edge behind until
                    // the next change: retry with backoff while this revision is the latest.
                    let (me, objects, runtime) = (self.clone(), objects.clone(), runtime.clone());
                    tokio::spawn(async move {
                        let mut wait = std::time::Duration::from_secs(1);
                        for _ in 0..10 {
                            tokio::time::sleep(wait).await;
                            if me.newer_applied(&merchant, entry.revision) {
                                return;
                            }
                            if let Ok(active) = load_active(&objects, &runtime, &entry).await {
                                tracing::info!(%merchant, revision = entry.revision, "pipeline applied on retry");
                                if let Ok(mut c) = me.active.write() {
                                    c.insert(merchant, Arc::new(Runnable::Ready(active)));
                                }
                                return;
                            }
                            wait = (wait * 2).min(std::time::Duration::from_secs(30));
                        }
                    });
                }
            },
        }
    }
}

/// How long an edge waits at start for every merchant's pipeline before refusing to start.
const STARTUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl Pipelines {
    /// Whether a revision newer than `revision` already runs for the merchant.
    fn newer_applied(&self, merchant: &str, revision: u64) -> bool {
        self.active.read().is_ok_and(|c| {
            matches!(c.get(merchant).map(|r| r.as_ref()), Some(Runnable::Ready(a)) if a.revision > revision)
        })
    }
}

/// Opens (creating if needed) the pipelines bucket and the plugin object store, with the
/// settings every component uses.
pub async fn open_stores(
    js: &jetstream::Context,
) -> Result<(kv::Store, object_store::ObjectStore), PipelineError> {
    let kv = stores::open_kv(js, bus::PIPELINES_BUCKET)
        .await
        .map_err(nats)?;
    let objects = stores::open_objects(js, bus::PLUGINS_OBJECT_STORE)
        .await
        .map_err(nats)?;
    Ok((kv, objects))
}

async fn load_active(
    objects: &object_store::ObjectStore,
    runtime: &Arc<Runtime>,
    entry: &kv::Entry,
) -> Result<Active, PipelineError> {
    let pipeline = Pipeline::from_json(&entry.value).map_err(|source| PipelineError::Json {
        key: entry.key.clone(),
        source,
    })?;
    let stable = load_stage(objects, runtime, &pipeline.active).await?;
    // A canary that cannot load must not take the stable version down with it.
    let canary = match &pipeline.canary {
        Some(c) => match load_stage(objects, runtime, &c.def).await {
            Ok(stage) => Some((stage, c.percent)),
            Err(e) => {
                tracing::error!(merchant = %pipeline.merchant_id, version = c.def.version, error = %e, "canary not loaded; the active version takes all traffic");
                None
            }
        },
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
    let metrics_label = def
        .plugins
        .iter()
        .map(|p| p.name.as_str())
        .collect::<Vec<_>>()
        .join(">")
        .into();
    Ok(Stage {
        chain: Arc::new(Chain::new(def.to_ref(), plugins)),
        on_failure: def.on_failure,
        metrics_label,
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
