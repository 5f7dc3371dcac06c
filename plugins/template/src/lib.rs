//! A minimal Beacon plugin: tags every event with a property.
//!
//! Config (JSON, every field optional; empty config = defaults):
//! `{"key": "tagged_by", "value": "template"}`

use beacon_plugin_sdk::batch::Batch;
use beacon_plugin_sdk::{parse_config, PluginError};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    key: String,
    value: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            key: "tagged_by".into(),
            value: "template".into(),
        }
    }
}

/// Processes one batch: the whole plugin. Read fields with `event.url()`, `event.property(k)`
/// ...; change them with `event.set_property(k, v)`, `event.set_url(..)` ...; drop events with
/// `event.discard()` or `batch.retain(..)`, add them with `batch.push(..)`. Return
/// `Err(PluginError::new(..))` to refuse the batch (it then goes to `failed_events` with
/// your message).
pub fn process(config: &str, batch: &mut Batch) -> Result<(), PluginError> {
    let config: Config = parse_config(config)?;
    if config.key.is_empty() {
        return Err(PluginError::new("config: `key` must not be empty"));
    }
    for mut event in batch.events_mut() {
        event.set_property(config.key.as_str(), config.value.as_str());
    }
    Ok(())
}

beacon_plugin_sdk::export_batch_plugin!(process);

#[cfg(test)]
mod tests {
    use super::*;
    use beacon_plugin_sdk::{Event, EventExt};

    /// Runs the plugin natively on owned events, through the same packed encoding the host
    /// uses: what unit tests call.
    fn process(config: &str, batch: Vec<Event>) -> Result<Vec<Event>, PluginError> {
        beacon_plugin_sdk::batch::run(super::process, config, batch)
    }

    #[test]
    fn tags_every_event() {
        let batch = vec![
            Event::new("e1", "pageview", 1_790_000_000_000).with_url("https://shop.example/"),
            Event::new("e2", "signup", 1_790_000_001_000).with_property("tagged_by", "old"),
        ];
        let out = process("", batch).unwrap();
        assert_eq!(out.len(), 2);
        assert!(out
            .iter()
            .all(|e| e.property("tagged_by") == Some("template")));
        assert_eq!(out[1].properties.len(), 1, "replaced, not duplicated");

        let out = process(
            r#"{"key": "k", "value": "v"}"#,
            vec![Event::new("e", "x", 1)],
        )
        .unwrap();
        assert_eq!(out[0].property("k"), Some("v"));
    }

    #[test]
    fn sample_events() {
        // The same file `beacon plugin test --events sample.jsonl` reads.
        let batch = beacon_plugin_sdk::events_from_jsonl(include_str!("../sample.jsonl")).unwrap();
        let out = process(r#"{"value": "sample"}"#, batch.clone()).unwrap();
        assert_eq!(out.len(), batch.len());
        for (o, i) in out.iter().zip(&batch) {
            assert_eq!(o.event_id, i.event_id);
            assert_eq!(o.property("tagged_by"), Some("sample"));
        }
    }

    #[test]
    fn bad_config_is_an_error() {
        assert!(process(r#"{"kye": "x"}"#, vec![]).is_err());
        assert!(process(r#"{"key": ""}"#, vec![]).is_err());
    }
}
