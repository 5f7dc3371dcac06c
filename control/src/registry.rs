//! Plugin components: validated, then stored immutable under their sha256.

use std::sync::Arc;

use beacon_plugins::{Chain, Plugin, Runtime};
use beacon_proto::bus::PluginInfo;
use beacon_proto::Event;
use futures::StreamExt;
use tokio::io::AsyncReadExt;

use crate::{nats, now_ms, Control, ControlError};

/// What an upload stored, and how the smoke run over sample events went.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Uploaded {
    pub plugin: PluginInfo,
    /// `false` when these exact bytes were already stored (uploads are idempotent).
    pub created: bool,
    /// Events in and out of the smoke run.
    pub smoke_in: usize,
    pub smoke_out: usize,
    /// The plugin's own error on the sample with the given config, if it returned one (a
    /// plugin may legitimately refuse to run without configuration). Traps and limit
    /// breaches fail the upload instead.
    pub smoke_error: Option<String>,
}

/// Canonical events every upload and activation is smoke-run on: a pageview with campaign
/// parameters, a custom event with revenue, an anonymous event.
pub fn sample_events(merchant_id: &str) -> Vec<Event> {
    let ts = 1_767_225_600_000; // fixed: the smoke run must be deterministic too
    let base = |id: &str, name: &str| Event {
        event_id: id.into(),
        merchant_id: merchant_id.into(),
        name: name.into(),
        ts,
        received_at: ts,
        url: None,
        referrer: None,
        title: None,
        visitor_id: Some("sample-visitor".into()),
        session_id: Some("sample-session".into()),
        user_id: None,
        revenue_micros: None,
        currency: None,
        properties: Default::default(),
    };
    let mut pageview = base("sample-1", "pageview");
    pageview.url = Some(
        "https://shop.example/products/42?utm_source=newsletter&utm_medium=email&utm_campaign=spring"
            .into(),
    );
    pageview.referrer = Some("https://www.google.com/".into());
    pageview.title = Some("Product 42".into());
    pageview.properties.insert(
        "user_agent".into(),
        "Mozilla/5.0 (X11; Linux x86_64)".into(),
    );
    let mut purchase = base("sample-2", "purchase");
    purchase.url = Some("https://shop.example/checkout/thanks".into());
    purchase.revenue_micros = Some(49_990_000);
    purchase.currency = Some("USD".into());
    purchase.user_id = Some("customer-7".into());
    let mut anonymous = base("sample-3", "signup");
    anonymous.visitor_id = None;
    anonymous.session_id = None;
    vec![pageview, purchase, anonymous]
}

impl Control {
    /// Validates a component (parses, implements the world, allowed imports, size, a smoke
    /// run on `sample` with `config`) and stores it. Storing the same bytes again is a no-op.
    pub async fn upload(
        &self,
        name: &str,
        bytes: Vec<u8>,
        config: &str,
        sample: Option<Vec<Event>>,
        uploaded_by: &str,
    ) -> Result<Uploaded, ControlError> {
        check_name(name)?;
        let sha256 = Runtime::sha256(&bytes);
        let plugin = self.compile(&sha256, bytes.clone()).await?;
        let sample = sample.unwrap_or_else(|| sample_events("m_sample"));
        let smoke_in = sample.len();
        let (smoke_out, smoke_error) = smoke(plugin.clone(), config.to_string(), sample).await?;
        let existing = self.info(&sha256).await.ok();
        if existing.is_none() || self.objects.info(&sha256).await.is_err() {
            let mut reader = bytes.as_slice();
            self.objects
                .put(sha256.as_str(), &mut reader)
                .await
                .map_err(nats)?;
        }
        let created = existing.is_none();
        let info = match existing {
            Some(i) => i,
            None => {
                let info = PluginInfo {
                    sha256: sha256.clone(),
                    name: name.to_string(),
                    size: bytes.len() as u64,
                    contract: plugin.contract().to_string(),
                    uploaded_by: uploaded_by.to_string(),
                    uploaded_at: now_ms(),
                };
                let json =
                    serde_json::to_vec(&info).map_err(|e| ControlError::Nats(e.to_string()))?;
                self.plugin_info
                    .put(&sha256, json.into())
                    .await
                    .map_err(nats)?;
                info
            }
        };
        Ok(Uploaded {
            created,
            plugin: info,
            smoke_in,
            smoke_out,
            smoke_error,
        })
    }

    /// Every uploaded component, newest first.
    pub async fn list_plugins(&self) -> Result<Vec<PluginInfo>, ControlError> {
        let mut keys = match self.plugin_info.keys().await {
            Ok(k) => k,
            Err(e) => return Err(nats(e)),
        };
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(nats)?;
            if let Ok(info) = self.info(&key).await {
                out.push(info);
            }
        }
        out.sort_by(|a, b| b.uploaded_at.cmp(&a.uploaded_at).then(a.name.cmp(&b.name)));
        Ok(out)
    }

    pub async fn info(&self, sha256: &str) -> Result<PluginInfo, ControlError> {
        let value = self
            .plugin_info
            .get(sha256)
            .await
            .map_err(nats)?
            .ok_or_else(|| ControlError::NotFound(format!("plugin {sha256}")))?;
        serde_json::from_slice(&value).map_err(|e| ControlError::Invalid(e.to_string()))
    }

    /// Resolves `name`, `name@<sha256 prefix>` or `<sha256 prefix>` to one uploaded component.
    /// A bare name means that name's most recent upload.
    pub async fn resolve(&self, reference: &str) -> Result<PluginInfo, ControlError> {
        let all = self.list_plugins().await?;
        let (name, prefix) = match reference.split_once('@') {
            Some((n, p)) => (Some(n), Some(p)),
            None if reference.len() >= 8 && reference.chars().all(|c| c.is_ascii_hexdigit()) => {
                (None, Some(reference))
            }
            None => (Some(reference), None),
        };
        let matches: Vec<&PluginInfo> = all
            .iter()
            .filter(|i| name.is_none_or(|n| i.name == n))
            .filter(|i| prefix.is_none_or(|p| i.sha256.starts_with(&p.to_ascii_lowercase())))
            .collect();
        match (matches.as_slice(), prefix) {
            ([], _) => Err(ControlError::NotFound(format!(
                "no uploaded plugin matches `{reference}` (see `beacon plugin list`)"
            ))),
            ([one], _) => Ok((*one).clone()),
            ([newest, ..], None) => Ok((*newest).clone()),
            (_, Some(_)) => Err(ControlError::Invalid(format!(
                "`{reference}` matches {} uploads; give more of the sha256",
                matches.len()
            ))),
        }
    }

    /// The component's bytes.
    pub async fn component(&self, sha256: &str) -> Result<Vec<u8>, ControlError> {
        let mut obj = self
            .objects
            .get(sha256)
            .await
            .map_err(|_| ControlError::NotFound(format!("component {sha256}")))?;
        let mut bytes = Vec::new();
        obj.read_to_end(&mut bytes).await.map_err(nats)?;
        Ok(bytes)
    }

    /// Loads a stored component into the runtime (compiling it, or from the cache).
    pub(crate) async fn load(&self, sha256: &str) -> Result<Arc<Plugin>, ControlError> {
        if let Some(p) = self.runtime.cached(sha256) {
            return Ok(p);
        }
        let bytes = self.component(sha256).await?;
        self.compile(sha256, bytes).await
    }

    /// A stored pipeline version as a runnable chain (components from the object store,
    /// compiled with this control's sandbox limits): what re-processing re-runs.
    pub async fn chain(&self, def: &beacon_proto::bus::PipelineDef) -> Result<Chain, ControlError> {
        let mut plugins = Vec::with_capacity(def.plugins.len());
        for p in &def.plugins {
            plugins.push((p.clone(), self.load(&p.sha256).await?));
        }
        Ok(Chain::new(def.to_ref(), plugins))
    }

    async fn compile(&self, sha256: &str, bytes: Vec<u8>) -> Result<Arc<Plugin>, ControlError> {
        let rt = self.runtime.clone();
        let sha = sha256.to_string();
        Ok(tokio::task::spawn_blocking(move || rt.load(&sha, &bytes))
            .await
            .map_err(|e| ControlError::Nats(format!("compile task: {e}")))??)
    }
}

/// Runs `plugin` over `sample`. A guest error is reported; a trap or limit breach is an error.
pub(crate) async fn smoke(
    plugin: Arc<Plugin>,
    config: String,
    sample: Vec<Event>,
) -> Result<(usize, Option<String>), ControlError> {
    let result = tokio::task::spawn_blocking(move || plugin.process(&config, &sample))
        .await
        .map_err(|e| ControlError::Nats(format!("smoke run task: {e}")))?;
    match result {
        Ok(out) => {
            validate_output(&out)
                .map_err(|e| ControlError::Invalid(format!("smoke run on sample events: {e}")))?;
            Ok((out.len(), None))
        }
        Err(beacon_plugins::PluginError::Guest(msg)) => Ok((0, Some(msg))),
        Err(e) => Err(ControlError::Invalid(format!(
            "smoke run on sample events failed: {e}"
        ))),
    }
}

/// Plugin output must be as valid as client input (the edge refuses it otherwise).
pub fn validate_output(events: &[Event]) -> Result<(), String> {
    let limits = beacon_proto::Limits::default();
    let now = now_ms();
    for (i, e) in events.iter().enumerate() {
        e.validate(&limits, now)
            .map_err(|v| format!("output event {i} ({}) is invalid: {v}", e.event_id))?;
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), ControlError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !ok {
        return Err(ControlError::Invalid(format!(
            "plugin name `{name}` must be 1-64 characters of a-z, 0-9, `-`, `_`, `.`"
        )));
    }
    if name.len() >= 8 && name.chars().all(|c| c.is_ascii_hexdigit()) {
        // References read such a string as a sha256 prefix: the name could never be used.
        return Err(ControlError::Invalid(format!(
            "plugin name `{name}` looks like a sha256 prefix; add a letter outside a-f"
        )));
    }
    Ok(())
}
