//! Versioned pipelines: activate, canary, promote, roll back, history.
//!
//! The pipelines bucket holds one entry per merchant (what runs now); every write is a
//! compare-and-set on the revision read, so two operators cannot both create "version N",
//! and records who, when and why. Pipeline definitions are also written, create-only, to the
//! versions bucket, so any version can be rolled back to or re-run long after the entry's
//! history has rolled over.

use std::sync::Arc;

use async_nats::jetstream::kv;
use beacon_plugins::Plugin;
use beacon_proto::bus::{Canary, OnFailure, Pipeline, PipelineDef};
use beacon_proto::{Event, PluginRef};
use futures::StreamExt;

use crate::registry::sample_events;
use crate::{nats, now_ms, Control, ControlError};

/// One plugin of a pipeline to activate: a reference (`name`, `name@sha-prefix` or a sha256
/// prefix) and its configuration.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    pub plugin: String,
    /// A string is passed as is; any other JSON value is passed as its JSON text.
    #[serde(default)]
    pub config: serde_json::Value,
}

impl PluginSpec {
    pub fn config_string(&self) -> String {
        match &self.config {
            serde_json::Value::Null => String::new(),
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        }
    }
}

/// A new pipeline version to activate.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Activation {
    pub plugins: Vec<PluginSpec>,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Run it for this share of visitors only (1-99), beside the active version.
    #[serde(default)]
    pub canary_percent: Option<u8>,
    #[serde(default)]
    pub reason: String,
    /// Skip running the chain over sample events first (for plugins that legitimately
    /// refuse the built-in samples).
    #[serde(default)]
    pub force: bool,
}

/// The result of a change: the merchant's entry and its revision (edges report the revision
/// they run, see [`crate::edges::wait_applied`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Change {
    pub pipeline: Pipeline,
    pub revision: u64,
}

/// One change in a merchant's pipeline history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HistoryEntry {
    pub revision: u64,
    /// `None` when the pipeline was removed.
    pub pipeline: Option<Pipeline>,
}

fn parse(entry_key: &str, value: &[u8]) -> Result<Pipeline, ControlError> {
    Pipeline::from_json(value)
        .map_err(|e| ControlError::Invalid(format!("pipeline entry {entry_key}: {e}")))
}

fn version_key(merchant_id: &str, version: u64) -> String {
    format!("{merchant_id}.{version}")
}

impl Control {
    /// The merchant's current pipeline and its revision, if it has one.
    pub async fn current(&self, merchant_id: &str) -> Result<Option<Change>, ControlError> {
        check_merchant(merchant_id)?;
        match self.pipelines.entry(merchant_id).await.map_err(nats)? {
            Some(e) if e.operation == kv::Operation::Put => Ok(Some(Change {
                pipeline: parse(&e.key, &e.value)?,
                revision: e.revision,
            })),
            _ => Ok(None),
        }
    }

    /// A stored pipeline version.
    pub async fn version(
        &self,
        merchant_id: &str,
        version: u64,
    ) -> Result<PipelineDef, ControlError> {
        check_merchant(merchant_id)?;
        let value = self
            .versions
            .get(version_key(merchant_id, version))
            .await
            .map_err(nats)?
            .ok_or_else(|| {
                ControlError::NotFound(format!("pipeline version {version} of {merchant_id}"))
            })?;
        serde_json::from_slice(&value).map_err(|e| ControlError::Invalid(e.to_string()))
    }

    /// Defines a new pipeline version from `activation`, checks it over sample events with
    /// the given configs, and makes it active (or the canary).
    pub async fn activate(
        &self,
        merchant_id: &str,
        activation: &Activation,
        changed_by: &str,
    ) -> Result<Change, ControlError> {
        check_merchant(merchant_id)?;
        self.check_merchant_exists(merchant_id).await?;
        if let Some(p) = activation.canary_percent {
            if !(1..=99).contains(&p) {
                return Err(ControlError::Invalid(format!(
                    "canary_percent must be 1..=99, not {p} (100 is a full activation)"
                )));
            }
        }
        let mut plugins = Vec::new();
        for spec in &activation.plugins {
            let info = self.resolve(&spec.plugin).await?;
            plugins.push(PluginRef {
                name: info.name,
                sha256: info.sha256,
                config: spec.config_string(),
            });
        }
        if activation.force {
            // Still load each plugin: it must compile and pass the import checks.
            for p in &plugins {
                self.load(&p.sha256).await?;
            }
        } else {
            self.check_chain(merchant_id, &plugins).await?;
        }
        let current = self.pipelines.entry(merchant_id).await.map_err(nats)?;
        let revision = current.as_ref().map_or(0, |e| e.revision);
        let current = match current {
            // An entry nobody can read is replaced (the CAS still guards it); history keeps it.
            Some(e) if e.operation == kv::Operation::Put => match parse(&e.key, &e.value) {
                Ok(p) => Some(p),
                Err(err) => {
                    tracing::warn!(merchant = merchant_id, error = %err, "replacing an unreadable pipeline entry");
                    None
                }
            },
            _ => None,
        };
        if activation.canary_percent.is_some() && current.is_none() {
            return Err(ControlError::Invalid(format!(
                "{merchant_id} has no active pipeline to run a canary beside; activate one first"
            )));
        }
        let latest = match &current {
            Some(p) => p.latest_version,
            // Removed or never set: continue after the highest version ever stored.
            None => self.highest_version(merchant_id).await?,
        };
        let mut def = PipelineDef {
            merchant_id: merchant_id.to_string(),
            version: latest + 1,
            plugins,
            on_failure: activation.on_failure,
            created_by: changed_by.to_string(),
            created_at: now_ms(),
        };
        // The definition first, create-only: an entry never points at a version that is not
        // stored. A number already taken (a concurrent activation, or one whose entry write
        // failed) is skipped, so versions stay unique and nothing gets stuck.
        let mut attempts = 0;
        loop {
            let json =
                serde_json::to_vec(&def).map_err(|e| ControlError::Invalid(e.to_string()))?;
            match self
                .versions
                .create(version_key(merchant_id, def.version), json.into())
                .await
            {
                Ok(_) => break,
                Err(e) if attempts < 64 && e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    attempts += 1;
                    def.version += 1;
                }
                Err(e) => return Err(nats(e)),
            }
        }
        let pipeline = match (activation.canary_percent, current) {
            (Some(percent), Some(cur)) => Pipeline {
                canary: Some(Canary {
                    def: def.clone(),
                    percent,
                }),
                latest_version: def.version,
                changed_by: changed_by.to_string(),
                reason: reason_or(&activation.reason, || {
                    format!("canary v{} at {percent}%", def.version)
                }),
                changed_at: now_ms(),
                ..cur
            },
            (Some(_), None) => {
                return Err(ControlError::Invalid(format!(
                "{merchant_id} has no active pipeline to run a canary beside; activate one first"
            )))
            }
            (None, _) => Pipeline {
                merchant_id: merchant_id.to_string(),
                active: def.clone(),
                canary: None,
                latest_version: def.version,
                changed_by: changed_by.to_string(),
                reason: reason_or(&activation.reason, || format!("activate v{}", def.version)),
                changed_at: now_ms(),
            },
        };
        self.write(merchant_id, pipeline, revision).await
    }

    /// Makes the canary the active version for all traffic.
    pub async fn promote(
        &self,
        merchant_id: &str,
        changed_by: &str,
        reason: &str,
    ) -> Result<Change, ControlError> {
        self.promote_seen(merchant_id, None, changed_by, reason)
            .await
    }

    /// The merchant's entry, which must still be at revision `seen` when one is given: a
    /// change decided on a view (the operator page) is refused once the entry moved on.
    async fn current_seen(
        &self,
        merchant_id: &str,
        seen: Option<u64>,
    ) -> Result<Change, ControlError> {
        let cur = self
            .current(merchant_id)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("pipeline of {merchant_id}")))?;
        match seen {
            Some(r) if r != cur.revision => Err(ControlError::Conflict(format!(
                "the pipeline of {merchant_id} changed since revision {r} (now {}); look again",
                cur.revision
            ))),
            _ => Ok(cur),
        }
    }

    /// [`Control::promote`], refused unless the entry is still at revision `seen`.
    pub async fn promote_seen(
        &self,
        merchant_id: &str,
        seen: Option<u64>,
        changed_by: &str,
        reason: &str,
    ) -> Result<Change, ControlError> {
        let cur = self.current_seen(merchant_id, seen).await?;
        let Some(canary) = cur.pipeline.canary.clone() else {
            return Err(ControlError::Invalid(format!(
                "{merchant_id} has no canary to promote"
            )));
        };
        let version = canary.def.version;
        let pipeline = Pipeline {
            active: canary.def,
            canary: None,
            changed_by: changed_by.to_string(),
            reason: reason_or(reason, || format!("promote canary v{version}")),
            changed_at: now_ms(),
            ..cur.pipeline
        };
        self.write(merchant_id, pipeline, cur.revision).await
    }

    /// Makes version `to` active again (default: the version that was active before the
    /// current one), and drops any canary.
    pub async fn rollback(
        &self,
        merchant_id: &str,
        to: Option<u64>,
        changed_by: &str,
        reason: &str,
    ) -> Result<Change, ControlError> {
        self.rollback_seen(merchant_id, to, None, changed_by, reason)
            .await
    }

    /// [`Control::rollback`], refused unless the entry is still at revision `seen`.
    pub async fn rollback_seen(
        &self,
        merchant_id: &str,
        to: Option<u64>,
        seen: Option<u64>,
        changed_by: &str,
        reason: &str,
    ) -> Result<Change, ControlError> {
        let cur = self.current_seen(merchant_id, seen).await?;
        let active = cur.pipeline.active.version;
        if to.is_none() {
            if let Some(c) = &cur.pipeline.canary {
                // Rolling back during a canary means "stop the canary", not "also replace the
                // version everyone else runs".
                let version = c.def.version;
                let pipeline = Pipeline {
                    canary: None,
                    changed_by: changed_by.to_string(),
                    reason: reason_or(reason, || format!("roll back canary v{version}")),
                    changed_at: now_ms(),
                    ..cur.pipeline
                };
                return self.write(merchant_id, pipeline, cur.revision).await;
            }
        }
        let to = match to {
            Some(v) => v,
            None => self
                .history(merchant_id)
                .await?
                .iter()
                .rev()
                .filter_map(|h| h.pipeline.as_ref().map(|p| p.active.version))
                .find(|v| *v != active)
                .ok_or_else(|| {
                    ControlError::Invalid(format!(
                        "{merchant_id} has no earlier version in its history; give --to"
                    ))
                })?,
        };
        let def = self.version(merchant_id, to).await?;
        let pipeline = Pipeline {
            active: def,
            canary: None,
            changed_by: changed_by.to_string(),
            reason: reason_or(reason, || format!("roll back from v{active} to v{to}")),
            changed_at: now_ms(),
            ..cur.pipeline
        };
        self.write(merchant_id, pipeline, cur.revision).await
    }

    /// Every recorded change of the merchant's pipeline, oldest first (the bucket keeps the
    /// last 64; every version's definition is kept for good, see [`Control::version`]).
    pub async fn history(&self, merchant_id: &str) -> Result<Vec<HistoryEntry>, ControlError> {
        check_merchant(merchant_id)?;
        let mut out = Vec::new();
        let mut entries = match self.pipelines.history(merchant_id).await {
            Ok(h) => h,
            Err(e) => {
                // No history at all is an empty history, not an error.
                if e.to_string().contains("not found") {
                    return Ok(out);
                }
                return Err(nats(e));
            }
        };
        while let Some(entry) = entries.next().await {
            let entry = entry.map_err(nats)?;
            let pipeline = match entry.operation {
                // An unreadable entry shows as a gap rather than hiding the whole history.
                kv::Operation::Put => parse(&entry.key, &entry.value).ok(),
                _ => None,
            };
            out.push(HistoryEntry {
                revision: entry.revision,
                pipeline,
            });
        }
        Ok(out)
    }

    /// Uploads `bytes` and makes it the merchant's only plugin (`beacon plugin attach`).
    /// The configuration is checked on sample events at activation, unless `force`.
    pub async fn attach(
        &self,
        merchant_id: &str,
        name: &str,
        bytes: Vec<u8>,
        config: &str,
        force: bool,
        changed_by: &str,
    ) -> Result<Change, ControlError> {
        let up = self.upload(name, bytes, "", None, changed_by).await?;
        self.activate(
            merchant_id,
            &Activation {
                // By hash: the same bytes may have been uploaded under another name first.
                plugins: vec![PluginSpec {
                    plugin: up.plugin.sha256.clone(),
                    config: serde_json::Value::String(config.to_string()),
                }],
                reason: format!("attach {name}"),
                force,
                ..Default::default()
            },
            changed_by,
        )
        .await
    }

    async fn check_merchant_exists(&self, merchant_id: &str) -> Result<(), ControlError> {
        let missing = || ControlError::NotFound(format!("merchant {merchant_id}"));
        let store = self
            .js
            .get_key_value(beacon_proto::bus::MERCHANTS_BUCKET)
            .await
            .map_err(|_| missing())?;
        match store.get(format!("m.{merchant_id}")).await.map_err(nats)? {
            Some(_) => Ok(()),
            None => Err(missing()),
        }
    }

    async fn write(
        &self,
        merchant_id: &str,
        pipeline: Pipeline,
        revision: u64,
    ) -> Result<Change, ControlError> {
        let json =
            serde_json::to_vec(&pipeline).map_err(|e| ControlError::Invalid(e.to_string()))?;
        let conflict = |e: &dyn std::fmt::Display| {
            ControlError::Conflict(format!(
                "the pipeline of {merchant_id} changed while this change was prepared ({e}); re-read and retry"
            ))
        };
        let revision = if revision == 0 {
            self.pipelines
                .create(merchant_id, json.into())
                .await
                .map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => conflict(&e),
                    _ => nats(e),
                })?
        } else {
            self.pipelines
                .update(merchant_id, json.into(), revision)
                .await
                .map_err(|e| match e.kind() {
                    kv::UpdateErrorKind::WrongLastRevision => conflict(&e),
                    _ => nats(e),
                })?
        };
        tracing::info!(
            merchant = merchant_id,
            active = pipeline.active.version,
            canary = ?pipeline.canary.as_ref().map(|c| (c.def.version, c.percent)),
            revision,
            by = %pipeline.changed_by,
            reason = %pipeline.reason,
            "pipeline changed"
        );
        Ok(Change { pipeline, revision })
    }

    async fn highest_version(&self, merchant_id: &str) -> Result<u64, ControlError> {
        let mut keys = match self.versions.keys().await {
            Ok(k) => k,
            Err(e) => return Err(nats(e)),
        };
        let prefix = format!("{merchant_id}.");
        let mut max = 0;
        while let Some(key) = keys.next().await {
            let key = key.map_err(nats)?;
            if let Some(v) = key
                .strip_prefix(&prefix)
                .and_then(|v| v.parse::<u64>().ok())
            {
                max = max.max(v);
            }
        }
        Ok(max)
    }

    /// Runs the chain over sample events with the real configs: a typo in a config or a
    /// plugin that breaks on ordinary events is refused before it meets traffic.
    async fn check_chain(
        &self,
        merchant_id: &str,
        plugins: &[PluginRef],
    ) -> Result<(), ControlError> {
        let mut loaded: Vec<(PluginRef, Arc<Plugin>)> = Vec::new();
        for p in plugins {
            loaded.push((p.clone(), self.load(&p.sha256).await?));
        }
        let sample: Vec<Event> = sample_events(merchant_id);
        tokio::task::spawn_blocking(move || {
            let mut batch = sample;
            for (r, plugin) in &loaded {
                let fail = |e: String| {
                    ControlError::Invalid(format!(
                        "plugin {}@{} with this config fails on sample events: {e}",
                        r.name,
                        crate::short_sha(&r.sha256)
                    ))
                };
                batch = plugin
                    .process(&r.config, &batch)
                    .map_err(|e| fail(e.to_string()))?;
                crate::registry::validate_output(&batch).map_err(fail)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| ControlError::Nats(format!("check task: {e}")))?
    }
}

fn reason_or(reason: &str, default: impl FnOnce() -> String) -> String {
    if reason.trim().is_empty() {
        default()
    } else {
        reason.to_string()
    }
}

/// Merchant ids are KV keys and subject tokens: refuse anything else early, by name.
pub fn check_merchant(id: &str) -> Result<(), ControlError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ControlError::Invalid(format!(
            "`{id}` is not a merchant id"
        )))
    }
}
