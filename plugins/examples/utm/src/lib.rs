//! Campaign attribution: copies `utm_*` query parameters of the page URL into event
//! properties (`utm_source`, `utm_medium`, `utm_campaign`, `utm_term`, `utm_content`), and
//! optionally strips them from the stored URL so page breakdowns are not split by campaign.
//!
//! Config (JSON, every field optional):
//! `{"strip_from_url": true, "property_prefix": "utm_", "lowercase": true}`

use beacon_plugin_sdk::batch::{Batch, EventMut};
use beacon_plugin_sdk::url::decode_query_component as percent_decode;
use beacon_plugin_sdk::{parse_config, PluginError};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    strip_from_url: bool,
    property_prefix: String,
    lowercase: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            strip_from_url: false,
            property_prefix: "utm_".into(),
            lowercase: true,
        }
    }
}

const PARAMS: [&str; 5] = ["source", "medium", "campaign", "term", "content"];

/// Processes one batch (the component's `process-batch` export; natively through
/// `beacon_plugin_sdk::batch::run`).
pub fn process(config: &str, batch: &mut Batch) -> Result<(), PluginError> {
    let config: Config = parse_config(config)?;
    for mut event in batch.events_mut() {
        apply(&config, &mut event);
    }
    Ok(())
}

beacon_plugin_sdk::export_batch_plugin!(process);

fn apply(config: &Config, event: &mut EventMut) {
    let Some(url) = event.url() else {
        return;
    };
    let (found, stripped) = extract(url, config.strip_from_url);
    for (param, value) in found {
        let value = if config.lowercase {
            value.to_lowercase()
        } else {
            value
        };
        // An explicit property set by the tracker wins over the URL.
        event.set_property_if_absent(format!("{}{}", config.property_prefix, param), value);
    }
    if let Some(stripped) = stripped {
        event.set_url(Some(stripped));
    }
}

/// Returns the UTM parameters found in `url`'s query, and the URL without them when asked.
fn extract(url: &str, strip: bool) -> (Vec<(&'static str, String)>, Option<String>) {
    let (before_fragment, fragment) = match url.split_once('#') {
        Some((a, f)) => (a, Some(f)),
        None => (url, None),
    };
    let Some((base, query)) = before_fragment.split_once('?') else {
        return (Vec::new(), None);
    };
    let mut found = Vec::new();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(k);
        match name
            .strip_prefix("utm_")
            .and_then(|p| PARAMS.iter().find(|x| **x == p))
        {
            Some(param) => {
                let v = percent_decode(v);
                if !v.is_empty() && !found.iter().any(|(p, _)| p == param) {
                    found.push((*param, v));
                }
            }
            None => kept.push(pair),
        }
    }
    if !strip || found.is_empty() {
        return (found, None);
    }
    let mut out = base.to_string();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    (found, Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use beacon_plugin_sdk::{Event, EventExt};

    /// The plugin on owned events, through the packed encoding the host uses.
    fn process(config: &str, batch: Vec<Event>) -> Result<Vec<Event>, PluginError> {
        beacon_plugin_sdk::batch::run(super::process, config, batch)
    }

    #[test]
    fn extracts_and_strips() {
        let (found, stripped) = extract(
            "https://s.example/p?a=1&utm_source=News%20Letter&utm_medium=email#top",
            true,
        );
        assert_eq!(
            found,
            vec![
                ("source", "News Letter".to_string()),
                ("medium", "email".to_string())
            ]
        );
        assert_eq!(stripped.as_deref(), Some("https://s.example/p?a=1#top"));
    }

    #[test]
    fn no_query_no_change() {
        assert_eq!(extract("https://s.example/p", true), (vec![], None));
    }

    #[test]
    fn process_copies_params_and_keeps_explicit_properties() {
        let batch = vec![
            Event::new("e1", "pageview", 1)
                .with_url("https://s.example/p?utm_source=NewsLetter&utm_medium=email&x=1"),
            Event::new("e2", "pageview", 2)
                .with_url("https://s.example/p?utm_source=ads")
                .with_property("utm_source", "explicit"),
            Event::new("e3", "pageview", 3),
        ];
        let out = process(r#"{"strip_from_url": true}"#, batch).unwrap();
        assert_eq!(out[0].property("utm_source"), Some("newsletter"));
        assert_eq!(out[0].property("utm_medium"), Some("email"));
        assert_eq!(out[0].url.as_deref(), Some("https://s.example/p?x=1"));
        assert_eq!(out[1].property("utm_source"), Some("explicit"));
        assert_eq!(out[1].properties.len(), 1);
        assert_eq!(out[1].url.as_deref(), Some("https://s.example/p"));
        assert_eq!(out[2], Event::new("e3", "pageview", 3));
    }

    #[test]
    fn config_options_and_errors() {
        let batch = vec![Event::new("e1", "pageview", 1).with_url("/p?utm_campaign=Spring")];
        let out = process(
            r#"{"property_prefix": "c_", "lowercase": false}"#,
            batch.clone(),
        )
        .unwrap();
        assert_eq!(out[0].property("c_campaign"), Some("Spring"));
        assert_eq!(out[0].url.as_deref(), Some("/p?utm_campaign=Spring"));
        let out = process("", batch.clone()).unwrap();
        assert_eq!(out[0].property("utm_campaign"), Some("spring"));
        let err = process(r#"{"strip": true}"#, batch).unwrap_err();
        assert!(err.message.contains("unknown field `strip`"), "{err:?}");
    }

    #[test]
    fn bad_percent_is_kept() {
        assert_eq!(percent_decode("a%zz%4"), "a%zz%4");
        assert_eq!(percent_decode("%41b"), "Ab");
    }
}
