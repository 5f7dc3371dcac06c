//! Goal (conversion) tagging: sets property `goal` on events that match configured goals.
//!
//! Config (JSON):
//!
//! ```json
//! {
//!   "goals": [
//!     {"name": "signup", "event": "signup"},
//!     {"name": "purchase", "path": "/checkout/thanks"},
//!     {"name": "docs", "path_prefix": "/docs/"},
//!     {"name": "big-order", "event": "purchase", "min_revenue_micros": 100000000},
//!     {"name": "pro-trial", "event": "trial_started", "properties": {"plan": "pro"}}
//!   ],
//!   "property": "goal",
//!   "separator": ","
//! }
//! ```
//!
//! A goal has a `name` and one or more conditions, all of which must hold:
//! - `event`: the event name equals this (case-sensitive).
//! - `path`: the URL path equals this; `path_prefix`: the URL path starts with this (at
//!   most one of the two). Paths are compared percent-decoded, case-sensitively, without
//!   query string, fragment and trailing slash (`/checkout/thanks/?id=1` matches
//!   `/checkout/thanks`; `/` stays `/`). A prefix ending in `/` also matches the directory
//!   itself: `/docs/` matches `/docs`, `/docs/` and `/docs/api`, not `/docsearch`. A goal
//!   with a path but no `event` applies to `pageview` events only (so a click on the thank-you
//!   page is not a second conversion); give `event` to match other events by path.
//! - `min_revenue_micros`: the event has `revenue_micros` ≥ this (in the event's currency:
//!   run the currency plugin first to compare across currencies).
//! - `currency`: the event's currency equals this (case-insensitive).
//! - `properties`: every listed property has exactly this value.
//!
//! A matching event gets property `property` (default `goal`) = the names of all matching
//! goals, in config order, without duplicates (several goals may share a name to express
//! "either"), joined by `separator` (default `,`): e.g. `purchase,big-order`. It replaces
//! an existing value; events that match nothing are left unchanged. `goals` absent or empty
//! = nothing is tagged.

use std::collections::BTreeMap;

use beacon_plugin_sdk::batch::{Batch, EventRef};
use beacon_plugin_sdk::{parse_config, url, PluginError};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct GoalConfig {
    name: String,
    event: Option<String>,
    path: Option<String>,
    path_prefix: Option<String>,
    min_revenue_micros: Option<i64>,
    currency: Option<String>,
    properties: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    goals: Vec<GoalConfig>,
    property: String,
    separator: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            goals: Vec::new(),
            property: "goal".into(),
            separator: ",".into(),
        }
    }
}

#[derive(Debug)]
enum PathRule {
    Exact(String),
    Prefix { prefix: String, dir: Option<String> },
}

#[derive(Debug)]
struct Goal {
    name: String,
    event: Option<String>,
    path: Option<PathRule>,
    min_revenue_micros: Option<i64>,
    currency: Option<String>,
    properties: BTreeMap<String, String>,
}

/// `/a/b/` -> `/a/b`; `/` and `` stay.
fn trim_slash(path: &str) -> &str {
    match path.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => path,
    }
}

impl Goal {
    fn compile(c: GoalConfig, separator: &str) -> Result<Self, String> {
        if c.name.is_empty() {
            return Err("`name` is required".into());
        }
        if c.name.contains(separator) {
            return Err(format!(
                "name `{}` contains the separator `{separator}`",
                c.name
            ));
        }
        let check = |p: &str, what: &str| {
            if p.starts_with('/') {
                Ok(())
            } else {
                Err(format!("{what} `{p}` must start with `/`"))
            }
        };
        let path = match (c.path, c.path_prefix) {
            (Some(_), Some(_)) => return Err("give `path` or `path_prefix`, not both".into()),
            (Some(p), None) => {
                check(&p, "path")?;
                Some(PathRule::Exact(trim_slash(&p).to_string()))
            }
            (None, Some(p)) => {
                check(&p, "path_prefix")?;
                let dir = (p.len() > 1 && p.ends_with('/')).then(|| trim_slash(&p).to_string());
                Some(PathRule::Prefix { prefix: p, dir })
            }
            (None, None) => None,
        };
        if c.event.is_none()
            && path.is_none()
            && c.min_revenue_micros.is_none()
            && c.currency.is_none()
            && c.properties.is_empty()
        {
            return Err(format!("goal `{}` has no condition", c.name));
        }
        Ok(Goal {
            name: c.name,
            // A path goal without an event name counts page views only.
            event: c
                .event
                .or_else(|| path.as_ref().map(|_| "pageview".to_string())),
            path,
            min_revenue_micros: c.min_revenue_micros,
            currency: c.currency,
            properties: c.properties,
        })
    }

    fn matches(&self, event: &EventRef, path: &mut Option<Option<String>>) -> bool {
        if self.event.as_deref().is_some_and(|n| n != event.name()) {
            return false;
        }
        if let Some(min) = self.min_revenue_micros {
            if event.revenue_micros().is_none_or(|r| r < min) {
                return false;
            }
        }
        if let Some(c) = &self.currency {
            if !event
                .currency()
                .is_some_and(|e| e.trim().eq_ignore_ascii_case(c))
            {
                return false;
            }
        }
        if self
            .properties
            .iter()
            .any(|(k, v)| event.property(k) != Some(v.as_str()))
        {
            return false;
        }
        if let Some(rule) = &self.path {
            // Decoded and normalised once per event, when a goal first needs it.
            let path = path.get_or_insert_with(|| {
                event
                    .url()
                    .map(|u| trim_slash(&url::percent_decode(url::path(u))).to_string())
            });
            let Some(path) = path.as_deref() else {
                return false;
            };
            return match rule {
                PathRule::Exact(p) => path == p,
                PathRule::Prefix { prefix, dir } => {
                    path.starts_with(prefix.as_str()) || dir.as_deref() == Some(path)
                }
            };
        }
        true
    }
}

/// Processes one batch (the component's `process-batch` export; natively through
/// `beacon_plugin_sdk::batch::run`).
pub fn process(config: &str, batch: &mut Batch) -> Result<(), PluginError> {
    let config: Config = parse_config(config)?;
    let bad = |m: String| PluginError::new(format!("invalid plugin config: {m}"));
    if config.property.is_empty() {
        return Err(bad("`property` is empty".into()));
    }
    if config.separator.is_empty() {
        return Err(bad("`separator` is empty".into()));
    }
    let goals: Vec<Goal> = config
        .goals
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            Goal::compile(g, &config.separator).map_err(|e| bad(format!("goals[{i}]: {e}")))
        })
        .collect::<Result<_, _>>()?;
    if goals.is_empty() {
        return Ok(());
    }
    let mut names: Vec<&str> = Vec::new();
    for mut event in batch.events_mut() {
        names.clear();
        let mut path = None;
        for goal in &goals {
            if !names.contains(&goal.name.as_str()) && goal.matches(&event.get(), &mut path) {
                names.push(&goal.name);
            }
        }
        if !names.is_empty() {
            event.set_property(config.property.as_str(), names.join(&config.separator));
        }
    }
    Ok(())
}

beacon_plugin_sdk::export_batch_plugin!(process);

#[cfg(test)]
mod tests {
    use super::*;
    use beacon_plugin_sdk::{Event, EventExt};

    /// The plugin on owned events, through the packed encoding the host uses.
    fn process(config: &str, batch: Vec<Event>) -> Result<Vec<Event>, PluginError> {
        beacon_plugin_sdk::batch::run(super::process, config, batch)
    }

    const CONFIG: &str = r#"{"goals": [
        {"name": "signup", "event": "signup"},
        {"name": "purchase", "path": "/checkout/thanks"},
        {"name": "docs", "path_prefix": "/docs/"},
        {"name": "big-order", "event": "purchase", "min_revenue_micros": 100000000},
        {"name": "purchase", "event": "purchase"}
    ]}"#;

    fn goal(e: &Event) -> Option<&str> {
        e.property("goal")
    }

    fn view(url: &str) -> Event {
        Event::new("v", "pageview", 1).with_url(url)
    }

    #[test]
    fn the_documented_example() {
        let out = process(
            CONFIG,
            vec![
                Event::new("s", "signup", 1),
                view("https://shop.example/checkout/thanks?order=17#top"),
                view("https://shop.example/checkout/thanks/"),
                view("/docs"),
                view("/docs/"),
                view("/docs/api/events"),
                view("/docsearch"),
                view("/"),
                Event::new("big", "purchase", 1).with_revenue(150_000_000, "EUR"),
                Event::new("small", "purchase", 1).with_revenue(99_999_999, "EUR"),
                Event::new("click", "click", 1).with_url("/checkout/thanks"),
            ],
        )
        .unwrap();
        let goals: Vec<Option<&str>> = out.iter().map(goal).collect();
        assert_eq!(
            goals,
            [
                Some("signup"),
                Some("purchase"),
                Some("purchase"),
                Some("docs"),
                Some("docs"),
                Some("docs"),
                None,
                None,
                // Config order, duplicates once.
                Some("big-order,purchase"),
                Some("purchase"),
                None,
            ]
        );
    }

    #[test]
    fn paths_are_decoded_and_case_sensitive() {
        let config =
            r#"{"goals": [{"name": "cafe", "path": "/café/"}, {"name": "root", "path": "/"}]}"#;
        let out = process(
            config,
            vec![
                view("https://x.example/caf%C3%A9?x=1"),
                view("https://x.example/Café"),
                view("https://x.example"),
                view("https://x.example/?q=1"),
                view("/index.html"),
                Event::new("no-url", "pageview", 1),
            ],
        )
        .unwrap();
        let goals: Vec<Option<&str>> = out.iter().map(goal).collect();
        assert_eq!(
            goals,
            [Some("cafe"), None, Some("root"), Some("root"), None, None]
        );
    }

    #[test]
    fn prefixes_without_slash_are_plain_prefixes() {
        let out = process(
            r#"{"goals": [{"name": "blog", "path_prefix": "/blog-"}, {"name": "all", "path_prefix": "/"}]}"#,
            vec![view("/blog-2024/post"), view("/blog"), view("/x")],
        )
        .unwrap();
        let goals: Vec<Option<&str>> = out.iter().map(goal).collect();
        assert_eq!(goals, [Some("blog,all"), Some("all"), Some("all")]);
    }

    #[test]
    fn path_goals_with_an_event_name_match_that_event() {
        let out = process(
            r#"{"goals": [{"name": "cta", "event": "click", "path_prefix": "/pricing"}]}"#,
            vec![
                Event::new("c", "click", 1).with_url("/pricing?plan=pro"),
                view("/pricing"),
            ],
        )
        .unwrap();
        assert_eq!(goal(&out[0]), Some("cta"));
        assert_eq!(goal(&out[1]), None);
    }

    #[test]
    fn currency_and_property_conditions() {
        let config = r#"{"goals": [
            {"name": "usd-sale", "currency": "usd", "min_revenue_micros": 1},
            {"name": "pro", "event": "trial", "properties": {"plan": "pro", "source": "ad"}}
        ]}"#;
        let out = process(
            config,
            vec![
                Event::new("a", "purchase", 1).with_revenue(5, "USD"),
                Event::new("b", "purchase", 1).with_revenue(5, "EUR"),
                Event::new("c", "purchase", 1).with_revenue(0, "USD"),
                Event::new("d", "trial", 1)
                    .with_property("plan", "pro")
                    .with_property("source", "ad"),
                Event::new("e", "trial", 1).with_property("plan", "pro"),
                Event::new("f", "trial", 1)
                    .with_property("plan", "Pro")
                    .with_property("source", "ad"),
            ],
        )
        .unwrap();
        let goals: Vec<Option<&str>> = out.iter().map(goal).collect();
        assert_eq!(
            goals,
            [Some("usd-sale"), None, None, Some("pro"), None, None]
        );
    }

    #[test]
    fn property_and_separator_options_and_replacement() {
        let config = r#"{"property": "conversion", "separator": "|", "goals": [
            {"name": "a", "event": "x"}, {"name": "b", "event": "x"}
        ]}"#;
        let e = Event::new("e", "x", 1).with_property("conversion", "old");
        let out = process(
            config,
            vec![
                e,
                Event::new("n", "y", 1).with_property("conversion", "keep"),
            ],
        )
        .unwrap();
        assert_eq!(out[0].property("conversion"), Some("a|b"));
        assert_eq!(out[0].properties.len(), 1);
        assert_eq!(out[1].property("conversion"), Some("keep"));
    }

    #[test]
    fn no_goals_is_a_no_op() {
        let batch = vec![view("/checkout/thanks"), Event::new("s", "signup", 1)];
        assert_eq!(process("", batch.clone()).unwrap(), batch);
        assert_eq!(process(r#"{"goals": []}"#, batch.clone()).unwrap(), batch);
    }

    #[test]
    fn deterministic() {
        let batch: Vec<Event> = (0..300)
            .map(|i| match i % 3 {
                0 => view(&format!("/docs/{i}")),
                1 => Event::new(format!("p{i}"), "purchase", i).with_revenue(i * 1_000_000, "EUR"),
                _ => Event::new(format!("s{i}"), "signup", i),
            })
            .collect();
        let a = process(CONFIG, batch.clone()).unwrap();
        assert_eq!(a, process(CONFIG, batch.clone()).unwrap());
        assert_eq!(a.len(), batch.len());
        assert!(a.iter().zip(&batch).all(|(x, y)| x.event_id == y.event_id));
    }

    #[test]
    fn config_errors() {
        for (config, needle) in [
            (
                r#"{"goals": [{"event": "x"}]}"#,
                "goals[0]: `name` is required",
            ),
            (
                r#"{"goals": [{"name": "x"}]}"#,
                "goals[0]: goal `x` has no condition",
            ),
            (
                r#"{"goals": [{"name": "a,b", "event": "x"}]}"#,
                "contains the separator",
            ),
            (
                r#"{"goals": [{"name": "x", "path": "checkout"}]}"#,
                "must start with `/`",
            ),
            (
                r#"{"goals": [{"name": "x", "path": "/a", "path_prefix": "/b"}]}"#,
                "not both",
            ),
            (
                r#"{"goals": [{"name": "x", "url": "/a"}]}"#,
                "unknown field `url`",
            ),
            (
                r#"{"goals": [{"name": "x", "min_revenue_micros": "5"}]}"#,
                "invalid type",
            ),
            (r#"{"property": ""}"#, "`property` is empty"),
            (r#"{"separator": ""}"#, "`separator` is empty"),
        ] {
            let err = process(config, vec![]).unwrap_err();
            assert!(err.message.contains(needle), "{config}: {}", err.message);
        }
    }
}
