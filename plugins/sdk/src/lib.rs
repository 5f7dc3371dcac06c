//! Guest SDK for Beacon processing plugins (`wit/plugin.wit`, contract 1.1).
//!
//! Two ways to write a plugin, one function plus one macro each:
//!
//! - **Batch plugins** ([`batch`], world `batch-processor`, contract 1.1; what the example
//!   plugins use): the batch crosses into the sandbox as one buffer and is read through a
//!   lazy view, and only the changes come back. Several times cheaper per event than records
//!   (docs/BENCHMARKS.md, "Plugins"); see [`batch`] for the shape.
//! - **Record plugins** (world `processor`, contract 1.0): owned events in, owned events out:
//!
//! ```ignore
//! use beacon_plugin_sdk::{Event, EventExt, PluginError};
//!
//! pub fn process(config: &str, mut batch: Vec<Event>) -> Result<Vec<Event>, PluginError> {
//!     for e in &mut batch {
//!         e.set_property("seen_by", "my-plugin");
//!     }
//!     Ok(batch)
//! }
//!
//! beacon_plugin_sdk::export_plugin!(process);
//! ```
//!
//! [`export_plugin!`] emits the component export only when compiling for `wasm32`, so the
//! same crate (as an `rlib`) can be linked natively, next to other plugins, into tests and
//! benchmarks that call `process` directly.
//!
//! Keep plugins deterministic: no `HashMap`/`HashSet` with the default hasher (it reads
//! `wasi:random`, and such a component is refused at load; use `BTreeMap`/`Vec`), no clocks,
//! files or network.

pub mod batch;
pub mod url;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "processor",
        // The export macro is used from the plugin crates (see `export_plugin!`).
        pub_export_macro: true,
        export_macro_name: "export_processor",
        default_bindings_module: "::beacon_plugin_sdk::bindings",
        additional_derives: [PartialEq, Eq, Default],
    });
}

#[doc(hidden)]
pub mod batch_bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "batch-processor",
        pub_export_macro: true,
        export_macro_name: "export_batch_processor",
        default_bindings_module: "::beacon_plugin_sdk::batch_bindings",
    });
}

/// A canonical event (`beacon:plugin/types.event`). `properties` is a list of key/value
/// pairs; use [`EventExt`] to read and change it with the contract's "keys are unique, the
/// last of duplicates wins" semantics.
pub use bindings::Event;
/// Why a plugin refused a batch (`beacon:plugin/types.plugin-error`); the whole batch goes
/// to `failed_events` with this message.
pub use bindings::PluginError;

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Deserialize;

/// The signature of a plugin's processing function, as taken by [`export_plugin!`].
pub type ProcessFn = fn(&str, Vec<Event>) -> Result<Vec<Event>, PluginError>;

/// Exports `process` (a `fn(&str, Vec<Event>) -> Result<Vec<Event>, PluginError>`) as the
/// component's `process` function.
///
/// The export is emitted only for `target_arch = "wasm32"`: natively the macro just checks
/// the function's signature, so several plugin crates can be linked into one native binary
/// without clashing exported symbols.
#[macro_export]
macro_rules! export_plugin {
    ($process:path) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __BeaconPluginExport;

            impl $crate::bindings::Guest for __BeaconPluginExport {
                fn process(
                    config: ::std::string::String,
                    batch: ::std::vec::Vec<$crate::Event>,
                ) -> ::core::result::Result<::std::vec::Vec<$crate::Event>, $crate::PluginError>
                {
                    let process: $crate::ProcessFn = $process;
                    process(&config, batch)
                }
            }

            $crate::bindings::export_processor!(__BeaconPluginExport with_types_in $crate::bindings);
        };

        // Natively: no export, but the signature is still checked (and the function used).
        #[cfg(not(target_arch = "wasm32"))]
        const _: $crate::ProcessFn = $process;
    };
}

/// Exports `process` (a [`batch::BatchFn`]: `fn(&str, &mut Batch) -> Result<(), PluginError>`)
/// as the component's `process-batch` function (world `batch-processor`, contract 1.1).
///
/// Like [`export_plugin!`], the export is emitted only for `target_arch = "wasm32"`; natively
/// call the function through [`batch::run`].
#[macro_export]
macro_rules! export_batch_plugin {
    ($process:path) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __BeaconBatchExport;

            impl $crate::batch_bindings::Guest for __BeaconBatchExport {
                fn process_batch(
                    config: ::std::string::String,
                    batch: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<::std::vec::Vec<u8>, $crate::batch_bindings::PluginError>
                {
                    $crate::batch::serve($process, &config, &batch).map_err(|e| {
                        $crate::batch_bindings::PluginError { message: e.message }
                    })
                }
            }

            $crate::batch_bindings::export_batch_processor!(__BeaconBatchExport with_types_in $crate::batch_bindings);
        };

        #[cfg(not(target_arch = "wasm32"))]
        const _: $crate::batch::BatchFn = $process;
    };
}

impl PluginError {
    /// A plugin error with `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl From<String> for PluginError {
    fn from(message: String) -> Self {
        Self::new(message)
    }
}

impl From<&str> for PluginError {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}

/// Shorthand for [`PluginError::new`]: `return Err(error(format!("...")))`.
pub fn error(message: impl Into<String>) -> PluginError {
    PluginError::new(message)
}

/// Parses the plugin's configuration string as JSON into `T`.
///
/// An empty or all-whitespace string yields `T::default()`. Otherwise the string must be
/// valid JSON for `T` (use `#[serde(default, deny_unknown_fields)]` on config structs so
/// misspelt keys are reported); the error message names the problem and its position, e.g.
/// `invalid plugin config: unknown field `strip`, expected ... at line 1 column 8`.
pub fn parse_config<T: DeserializeOwned + Default>(config: &str) -> Result<T, PluginError> {
    if config.trim().is_empty() {
        return Ok(T::default());
    }
    serde_json::from_str(config)
        .map_err(|e| PluginError::new(format!("invalid plugin config: {e}")))
}

/// A canonical event as JSON, the format of `beacon plugin test --events` files.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEvent {
    event_id: String,
    #[serde(default)]
    merchant_id: String,
    name: String,
    ts: i64,
    #[serde(default)]
    received_at: i64,
    url: Option<String>,
    referrer: Option<String>,
    title: Option<String>,
    visitor_id: Option<String>,
    session_id: Option<String>,
    user_id: Option<String>,
    revenue_micros: Option<i64>,
    currency: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, String>,
}

/// Parses canonical events in JSON Lines (one JSON object per line, blank lines skipped),
/// the format `beacon plugin test --events` reads: handy for tests over the same
/// `sample.jsonl`. Properties come out sorted by key. Errors name the line.
pub fn events_from_jsonl(text: &str) -> Result<Vec<Event>, PluginError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let e: JsonEvent = serde_json::from_str(line)
                .map_err(|e| PluginError::new(format!("line {}: {e}", i + 1)))?;
            Ok(Event {
                event_id: e.event_id,
                merchant_id: e.merchant_id,
                name: e.name,
                ts: e.ts,
                received_at: e.received_at,
                url: e.url,
                referrer: e.referrer,
                title: e.title,
                visitor_id: e.visitor_id,
                session_id: e.session_id,
                user_id: e.user_id,
                revenue_micros: e.revenue_micros,
                currency: e.currency,
                properties: e.properties.into_iter().collect(),
            })
        })
        .collect()
}

impl Event {
    /// A new event with the required fields; everything else is empty. Mostly for tests and
    /// for plugins that split or add events (derive ids deterministically, e.g. `<id>.<n>`).
    pub fn new(event_id: impl Into<String>, name: impl Into<String>, ts: i64) -> Self {
        Self {
            event_id: event_id.into(),
            name: name.into(),
            ts,
            ..Self::default()
        }
    }

    /// Builder: sets `url`.
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// Builder: sets `revenue_micros` and `currency`.
    pub fn with_revenue(mut self, revenue_micros: i64, currency: impl Into<String>) -> Self {
        self.revenue_micros = Some(revenue_micros);
        self.currency = Some(currency.into());
        self
    }

    /// Builder: sets a property (replacing an existing one with the same key).
    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.set_property(key, value);
        self
    }
}

/// Property and URL helpers on [`Event`].
///
/// Properties follow the contract: keys are unique and the last of duplicates wins (the
/// host keeps the last one). `set_property` and `remove_property` remove duplicates.
pub trait EventExt {
    /// The value of property `key` (the last one if the key is duplicated).
    fn property(&self, key: &str) -> Option<&str>;
    /// Whether property `key` is present.
    fn has_property(&self, key: &str) -> bool {
        self.property(key).is_some()
    }
    /// Sets property `key` to `value`, replacing any existing value (and dropping
    /// duplicates of the key). Returns the previous value.
    fn set_property(&mut self, key: impl Into<String>, value: impl Into<String>) -> Option<String>;
    /// Sets property `key` only if it is absent; returns whether it was set.
    fn set_property_if_absent(&mut self, key: impl Into<String>, value: impl Into<String>) -> bool;
    /// Removes property `key` (every duplicate); returns the value that was in effect.
    fn remove_property(&mut self, key: &str) -> Option<String>;
    /// The path of `url` (no query or fragment; `/` for `https://host`), if there is a URL.
    fn url_path(&self) -> Option<&str>;
    /// The host of `url` (no user info or port, IPv6 without brackets), if any. Not
    /// lower-cased: compare with `eq_ignore_ascii_case`.
    fn url_host(&self) -> Option<&str>;
    /// The first value of query parameter `name` in `url`, percent-decoded.
    fn query_param(&self, name: &str) -> Option<String>;
}

impl EventExt for Event {
    fn property(&self, key: &str) -> Option<&str> {
        self.properties
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn set_property(&mut self, key: impl Into<String>, value: impl Into<String>) -> Option<String> {
        let key = key.into();
        let value = value.into();
        let previous = self.remove_property(&key);
        self.properties.push((key, value));
        previous
    }

    fn set_property_if_absent(&mut self, key: impl Into<String>, value: impl Into<String>) -> bool {
        let key = key.into();
        if self.has_property(&key) {
            return false;
        }
        self.properties.push((key, value.into()));
        true
    }

    fn remove_property(&mut self, key: &str) -> Option<String> {
        let mut previous = None;
        let mut i = 0;
        while i < self.properties.len() {
            if self.properties[i].0 == key {
                previous = Some(self.properties.remove(i).1);
            } else {
                i += 1;
            }
        }
        previous
    }

    fn url_path(&self) -> Option<&str> {
        self.url.as_deref().map(url::path)
    }

    fn url_host(&self) -> Option<&str> {
        self.url.as_deref().and_then(url::host)
    }

    fn query_param(&self, name: &str) -> Option<String> {
        self.url.as_deref().and_then(|u| url::query_param(u, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Config {
        name: String,
        level: u32,
    }

    #[test]
    fn empty_config_is_default() {
        assert_eq!(parse_config::<Config>("").unwrap(), Config::default());
        assert_eq!(parse_config::<Config>("  \n\t").unwrap(), Config::default());
        assert_eq!(
            parse_config::<Config>(r#"{"level": 3}"#).unwrap(),
            Config {
                name: String::new(),
                level: 3
            }
        );
    }

    #[test]
    fn config_errors_name_the_problem() {
        let e = parse_config::<Config>(r#"{"levle": 3}"#).unwrap_err();
        assert!(e.message.starts_with("invalid plugin config: "), "{e:?}");
        assert!(e.message.contains("unknown field `levle`"), "{e:?}");
        let e = parse_config::<Config>("{").unwrap_err();
        assert!(e.message.contains("EOF"), "{e:?}");
        let e = parse_config::<Config>(r#"{"level": "x"}"#).unwrap_err();
        assert!(e.message.contains("invalid type"), "{e:?}");
    }

    #[test]
    fn jsonl_events() {
        let text = r#"{"event_id":"a","name":"pageview","ts":1,"url":"/p","properties":{"z":"1","a":"2"}}

{"event_id":"b","merchant_id":"m","name":"buy","ts":2,"received_at":3,"revenue_micros":5,"currency":"EUR","user_id":"u"}
"#;
        let events = events_from_jsonl(text).unwrap();
        assert_eq!(
            events,
            vec![
                Event::new("a", "pageview", 1)
                    .with_url("/p")
                    .with_property("a", "2")
                    .with_property("z", "1"),
                Event {
                    merchant_id: "m".into(),
                    received_at: 3,
                    user_id: Some("u".into()),
                    ..Event::new("b", "buy", 2).with_revenue(5, "EUR")
                },
            ]
        );
        let err =
            events_from_jsonl("{\"event_id\":\"a\",\"name\":\"x\",\"ts\":1}\n{\"name\":\"x\"}")
                .unwrap_err();
        assert!(
            err.message.starts_with("line 2: missing field `event_id`"),
            "{err:?}"
        );
    }

    #[test]
    fn errors() {
        assert_eq!(PluginError::new("x").message, "x");
        assert_eq!(error(String::from("y")).message, "y");
        let e: PluginError = "z".into();
        assert_eq!(e.message, "z");
    }

    #[test]
    fn properties_last_wins_and_set_replaces() {
        let mut e = Event::new("e1", "pageview", 1);
        e.properties = vec![
            ("a".into(), "1".into()),
            ("b".into(), "2".into()),
            ("a".into(), "3".into()),
        ];
        assert_eq!(e.property("a"), Some("3"));
        assert!(e.has_property("b"));
        assert!(!e.has_property("c"));
        assert_eq!(e.set_property("a", "4"), Some("3".into()));
        assert_eq!(
            e.properties,
            vec![("b".into(), "2".into()), ("a".into(), "4".into())]
        );
        assert!(!e.set_property_if_absent("b", "x"));
        assert!(e.set_property_if_absent("c", "5"));
        assert_eq!(e.property("c"), Some("5"));
        assert_eq!(e.remove_property("b"), Some("2".into()));
        assert_eq!(e.remove_property("b"), None);
        assert_eq!(e.set_property("d", "6"), None);
        assert_eq!(
            e.properties,
            vec![
                ("a".into(), "4".into()),
                ("c".into(), "5".into()),
                ("d".into(), "6".into())
            ]
        );
    }

    #[test]
    fn builders_and_url_helpers() {
        let e = Event::new("e1", "purchase", 7)
            .with_url("https://User@Shop.Example:8443/a/b?x=1&utm_source=News%20Letter#f")
            .with_revenue(5_000_000, "EUR")
            .with_property("k", "v");
        assert_eq!(e.ts, 7);
        assert_eq!(e.revenue_micros, Some(5_000_000));
        assert_eq!(e.currency.as_deref(), Some("EUR"));
        assert_eq!(e.property("k"), Some("v"));
        assert_eq!(e.url_path(), Some("/a/b"));
        assert_eq!(e.url_host(), Some("Shop.Example"));
        assert_eq!(e.query_param("utm_source").as_deref(), Some("News Letter"));
        assert_eq!(e.query_param("nope"), None);
        assert_eq!(Event::new("e2", "x", 0).url_path(), None);
    }
}
