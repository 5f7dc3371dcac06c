//! PII scrubbing: replaces e-mail addresses, phone numbers and payment card numbers in the
//! page URL, referrer, title and property values with placeholder tokens, and can drop
//! whole properties.
//!
//! Config (JSON, every field optional; empty config = all defaults):
//!
//! ```json
//! {
//!   "fields": ["url", "referrer", "title", "properties"],
//!   "detect": ["email", "phone", "card"],
//!   "replacements": {"email": "[email]", "phone": "[phone]", "card": "[card]"},
//!   "properties": null,
//!   "skip_properties": [],
//!   "drop_properties": []
//! }
//! ```
//!
//! - `fields`: which parts of the event are scanned (default: all four).
//! - `detect`: which detectors run (default: all three).
//! - `replacements`: the token that replaces each kind (each one optional).
//! - `properties`: if set, only these property keys are scanned; `skip_properties`: keys
//!   that are never scanned (e.g. ids that must stay intact). Both ASCII case-insensitive.
//! - `drop_properties`: keys removed from every event (ASCII case-insensitive), whatever
//!   `fields` says.
//!
//! URLs (`url`, `referrer`, and property values starting with `http://` or `https://`) are
//! scanned piece by piece: each path segment, each query value (and key-less query piece)
//! and the fragment's pieces, percent-decoded first (`john%40example.com`,
//! `%2B44%2020%207946%200958`; a query value starting with `+` is also tried with that `+`
//! kept, for `?tel=+44+20+7946+0958`). Only a
//! piece that contained PII is rewritten, re-encoded; scheme and host are never changed. The
//! title and other property values are scanned as plain text.
//!
//! Detection rules (deterministic; a match must not touch a letter, digit or `_`, and the
//! whole run of digit groups is judged at once — numbers are never split):
//!
//! - **E-mail**: `local@domain`, local part of letters, digits and `._%+-'`, domain of at
//!   least two dot-separated labels whose last (the TLD) is 2+ ASCII letters and not a file
//!   extension (`logo@2x.png` and `lodash@4.17.21` are not e-mails). Non-ASCII letters count
//!   as letters.
//! - **Card**: 13–19 digits, optionally grouped by single spaces or dashes (one kind), first
//!   digit 2–6 (the payment-card industries, so millisecond timestamps never match), passing
//!   the Luhn checksum.
//! - **Phone**: digit groups separated by single spaces, dashes or dots (one kind; the
//!   separator after a country code or a parenthesised group may differ), one of:
//!   1. international: `+` (or `00`, written in groups) then 8–15 digits, the first not 0:
//!      `+44 20 7946 0958`, `+1 (555) 123-4567`, `+4915112345678`, `0044 20 7946 0958`;
//!   2. North American: `NXX NXX XXXX` with area code N = 2–9, optionally after `1`, area
//!      code optionally in parentheses: `(555) 123-4567`, `555.123.4567`, `1-555-123-4567`;
//!   3. national with trunk prefix 0: `0` then 1–9, 10–12 digits in groups whose first has
//!      2+ digits (`020 7946 0958`, `06 12 34 56 78`, `(030) 1234567`), or 10–11 digits
//!      written together (`0612345678`).
//!
//!   So years (`2024`), dates (`2024-06-01 12:30`, `01.06.2024`), prices, IPv4 addresses,
//!   ISBNs, decimals, second/millisecond timestamps and order ids (unless 10–11 digits
//!   starting with a single `0`) are left alone; national numbers without trunk prefix
//!   other than North American ones are not detected unless written with `+`.

pub mod scan;

use beacon_plugin_sdk::batch::Batch;
use beacon_plugin_sdk::url::{
    decode_query_component, encode_path_segment, encode_query_component, percent_decode, split,
};
use beacon_plugin_sdk::{parse_config, PluginError};
use scan::{Detectors, Kind};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Field {
    Url,
    Referrer,
    Title,
    Properties,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Detector {
    Email,
    Phone,
    Card,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Replacements {
    email: String,
    phone: String,
    card: String,
}

impl Default for Replacements {
    fn default() -> Self {
        Self {
            email: "[email]".into(),
            phone: "[phone]".into(),
            card: "[card]".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    fields: Vec<Field>,
    detect: Vec<Detector>,
    replacements: Replacements,
    properties: Option<Vec<String>>,
    skip_properties: Vec<String>,
    drop_properties: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            fields: vec![Field::Url, Field::Referrer, Field::Title, Field::Properties],
            detect: vec![Detector::Email, Detector::Phone, Detector::Card],
            replacements: Replacements::default(),
            properties: None,
            skip_properties: Vec::new(),
            drop_properties: Vec::new(),
        }
    }
}

struct Scrubber<'c> {
    config: &'c Config,
    detectors: Detectors,
}

impl Scrubber<'_> {
    fn token(&self, kind: Kind) -> &str {
        match kind {
            Kind::Email => &self.config.replacements.email,
            Kind::Phone => &self.config.replacements.phone,
            Kind::Card => &self.config.replacements.card,
        }
    }

    fn text(&self, text: &str) -> Option<String> {
        scan::scrub(text, &self.detectors, |k| self.token(k))
    }

    /// Scrubs one decoded URL piece; `None` if unchanged.
    fn piece(&self, raw: &str, query: bool) -> Option<String> {
        if query {
            if let Some(s) = self.text(&decode_query_component(raw)) {
                return Some(encode_query_component(&s));
            }
            // `+` means a space in a query, but a leading one may be meant literally
            // (`?tel=+44+20+7946+0958` from a hand-written link).
            if let Some(rest) = raw.strip_prefix('+') {
                let literal = format!("+{}", decode_query_component(rest));
                if let Some(s) = self.text(&literal) {
                    return Some(encode_query_component(&s));
                }
            }
            None
        } else {
            self.text(&percent_decode(raw))
                .map(|s| encode_path_segment(&s))
        }
    }

    /// Scrubs `a=b&c&d=e` (a query or fragment): values and key-less pieces.
    fn pairs(&self, s: &str, out: &mut String) -> bool {
        let mut changed = false;
        for (i, piece) in s.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            let (key, value) = match piece.split_once('=') {
                Some((k, v)) => (Some(k), v),
                None => (None, piece),
            };
            if let Some(k) = key {
                out.push_str(k);
                out.push('=');
            }
            match self.piece(value, true) {
                Some(v) => {
                    changed = true;
                    out.push_str(&v);
                }
                None => out.push_str(value),
            }
        }
        changed
    }

    fn url(&self, url: &str) -> Option<String> {
        if !url.bytes().any(|c| c == b'@' || c.is_ascii_digit()) {
            return None;
        }
        let parts = split(url);
        let prefix_len = url.len()
            - parts.path.len()
            - parts.query.map_or(0, |q| q.len() + 1)
            - parts.fragment.map_or(0, |f| f.len() + 1);
        let mut out = String::with_capacity(url.len() + 16);
        out.push_str(&url[..prefix_len]);
        let mut changed = false;
        for (i, segment) in parts.path.split('/').enumerate() {
            if i > 0 {
                out.push('/');
            }
            match self.piece(segment, false) {
                Some(s) => {
                    changed = true;
                    out.push_str(&s);
                }
                None => out.push_str(segment),
            }
        }
        if let Some(q) = parts.query {
            out.push('?');
            changed |= self.pairs(q, &mut out);
        }
        if let Some(f) = parts.fragment {
            out.push('#');
            changed |= self.pairs(f, &mut out);
        }
        changed.then_some(out)
    }

    fn value(&self, value: &str) -> Option<String> {
        let lower = value.get(..8).unwrap_or(value).to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            self.url(value)
        } else {
            self.text(value)
        }
    }
}

fn contains_key(list: &[String], key: &str) -> bool {
    list.iter().any(|k| k.eq_ignore_ascii_case(key))
}

/// Processes one batch (the component's `process-batch` export; natively through
/// `beacon_plugin_sdk::batch::run`).
pub fn process(config: &str, batch: &mut Batch) -> Result<(), PluginError> {
    let config: Config = parse_config(config)?;
    let scrubber = Scrubber {
        config: &config,
        detectors: Detectors {
            email: config.detect.contains(&Detector::Email),
            phone: config.detect.contains(&Detector::Phone),
            card: config.detect.contains(&Detector::Card),
        },
    };
    let has = |f| config.fields.contains(&f);
    for mut event in batch.events_mut() {
        if !config.drop_properties.is_empty() {
            event.retain_properties(|k, _| !contains_key(&config.drop_properties, k));
        }
        if has(Field::Url) {
            if let Some(new) = event.url().and_then(|u| scrubber.url(u)) {
                event.set_url(Some(new));
            }
        }
        if has(Field::Referrer) {
            if let Some(new) = event.referrer().and_then(|u| scrubber.url(u)) {
                event.set_referrer(Some(new));
            }
        }
        if has(Field::Title) {
            if let Some(new) = event.title().and_then(|t| scrubber.text(t)) {
                event.set_title(Some(new));
            }
        }
        if has(Field::Properties) {
            let scrubbed: Vec<(String, String)> = event
                .properties()
                .into_iter()
                .filter(|(key, _)| {
                    config
                        .properties
                        .as_deref()
                        .is_none_or(|only| contains_key(only, key))
                        && !contains_key(&config.skip_properties, key)
                })
                .filter_map(|(key, value)| Some((key.to_string(), scrubber.value(value)?)))
                .collect();
            for (key, value) in scrubbed {
                event.set_property(key, value);
            }
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

    fn one(config: &str, event: Event) -> Event {
        let mut out = process(config, vec![event]).unwrap();
        assert_eq!(out.len(), 1);
        out.remove(0)
    }

    fn page(url: &str) -> Event {
        Event::new("e1", "pageview", 1_790_000_000_000).with_url(url)
    }

    #[test]
    fn scrubs_urls_piece_by_piece() {
        let e = one(
            "",
            page("https://john@shop.example:8443/u/jane%40example.com/orders/12345?email=a.b%40c.example&tel=%2B44%2020%207946%200958&page=2&q=hello+world#ref=x@y.example"),
        );
        assert_eq!(
            e.url.as_deref(),
            Some("https://john@shop.example:8443/u/[email]/orders/12345?email=[email]&tel=[phone]&page=2&q=hello+world#ref=[email]")
        );
    }

    #[test]
    fn query_plus_is_tried_both_ways() {
        let e = one("", page("/s?tel=+44+20+7946+0958&x=+1"));
        assert_eq!(e.url.as_deref(), Some("/s?tel=[phone]&x=+1"));
        let e = one("", page("/s?tel=020+7946+0958"));
        assert_eq!(e.url.as_deref(), Some("/s?tel=[phone]"));
    }

    #[test]
    fn keyless_query_and_fragment_pieces() {
        let e = one("", page("/p?jo@x.example#/contact/jo@x.example"));
        assert_eq!(e.url.as_deref(), Some("/p?[email]#/contact/[email]"));
    }

    #[test]
    fn rewritten_values_are_re_encoded() {
        let e = one(
            r#"{"replacements": {"email": "<redacted & gone>"}}"#,
            page("/p?e=jo%40x.example&n=1"),
        );
        assert_eq!(
            e.url.as_deref(),
            Some("/p?e=%3Credacted%20%26%20gone%3E&n=1")
        );
        let e = one(
            r#"{"replacements": {"email": "a/b?"}}"#,
            page("/u/jo@x.example/x"),
        );
        assert_eq!(e.url.as_deref(), Some("/u/a%2Fb%3F/x"));
    }

    #[test]
    fn ordinary_urls_are_untouched() {
        for url in [
            "https://shop.example/products/2024-collection?id=123456789&price=1299.00&page=2",
            "https://cdn.example/img/logo@2x.png",
            "https://cdn.example/npm/lodash@4.17.21/lodash.min.js",
            "https://shop.example/order/10000001?ts=1718000000000",
            "https://shop.example/?ip=192.168.100.200&d=2024-06-01+12:30:00",
            "https://shop.example/%zz/%E2%82%AC?x=%",
        ] {
            assert_eq!(one("", page(url)).url.as_deref(), Some(url), "{url}");
        }
    }

    #[test]
    fn title_referrer_and_properties() {
        let mut event = page("/p");
        event.referrer = Some("https://mail.example/?to=jo%40x.example".into());
        event.title = Some("Order for jo@x.example (+1 555 123 4567)".into());
        event.properties = vec![
            ("note".into(), "card 4111 1111 1111 1111, ok".into()),
            (
                "landing".into(),
                "HTTPS://shop.example/?e=jo%40x.example".into(),
            ),
            ("plain".into(), "jo%40x.example".into()),
            ("amount".into(), "1299.00".into()),
        ];
        let e = one("", event);
        assert_eq!(
            e.referrer.as_deref(),
            Some("https://mail.example/?to=[email]")
        );
        assert_eq!(e.title.as_deref(), Some("Order for [email] ([phone])"));
        assert_eq!(e.property("note"), Some("card [card], ok"));
        assert_eq!(
            e.property("landing"),
            Some("HTTPS://shop.example/?e=[email]")
        );
        // Not a URL: scanned as plain text, where `%40` is not an `@`.
        assert_eq!(e.property("plain"), Some("jo%40x.example"));
        assert_eq!(e.property("amount"), Some("1299.00"));
    }

    #[test]
    fn field_and_property_selection() {
        let mut event = page("/p?e=jo@x.example");
        event.title = Some("jo@x.example".into());
        event.properties = vec![
            ("a".into(), "jo@x.example".into()),
            ("B".into(), "jo@x.example".into()),
            ("c".into(), "jo@x.example".into()),
        ];
        let e = one(
            r#"{"fields": ["title", "properties"], "properties": ["a", "b"], "skip_properties": ["A"]}"#,
            event.clone(),
        );
        assert_eq!(e.url.as_deref(), Some("/p?e=jo@x.example"));
        assert_eq!(e.title.as_deref(), Some("[email]"));
        assert_eq!(e.property("a"), Some("jo@x.example"));
        assert_eq!(e.property("B"), Some("[email]"));
        assert_eq!(e.property("c"), Some("jo@x.example"));

        let e = one(r#"{"fields": []}"#, event);
        assert_eq!(e.title.as_deref(), Some("jo@x.example"));
    }

    #[test]
    fn drop_properties_and_detector_selection() {
        let event = page("/p?e=jo@x.example&t=0612345678")
            .with_property("Email", "jo@x.example")
            .with_property("phone", "0612345678")
            .with_property("keep", "x");
        let e = one(
            r#"{"drop_properties": ["email", "PHONE"], "fields": []}"#,
            event.clone(),
        );
        assert_eq!(e.properties, vec![("keep".to_string(), "x".to_string())]);
        assert_eq!(e.url, event.url);

        let e = one(
            r#"{"detect": ["phone"], "replacements": {"phone": "☎"}}"#,
            event,
        );
        assert_eq!(e.url.as_deref(), Some("/p?e=jo@x.example&t=%E2%98%8E"));
        assert_eq!(e.property("Email"), Some("jo@x.example"));
        assert_eq!(e.property("phone"), Some("☎"));
    }

    #[test]
    fn other_fields_and_order_are_kept_and_output_is_deterministic() {
        let batch: Vec<Event> = (0..50)
            .map(|i| {
                let mut e = page(&format!("/p/{i}?e=user{i}@x.example"))
                    .with_revenue(i * 1_000_000, "EUR")
                    .with_property("i", i.to_string());
                e.visitor_id = Some(format!("v{i}"));
                e
            })
            .collect();
        let a = process("", batch.clone()).unwrap();
        let b = process("", batch.clone()).unwrap();
        assert_eq!(a, b);
        for (i, (out, input)) in a.iter().zip(&batch).enumerate() {
            assert_eq!(out.event_id, input.event_id);
            assert_eq!(
                out.url.as_deref(),
                Some(format!("/p/{i}?e=[email]").as_str())
            );
            assert_eq!(out.visitor_id, input.visitor_id);
            assert_eq!(out.revenue_micros, input.revenue_micros);
            assert_eq!(out.properties, input.properties);
        }
    }

    #[test]
    fn arbitrary_urls_never_panic_and_scrubbing_is_idempotent() {
        let alphabet: Vec<char> = "https:/?#&=%+@.-() 0123456789aBxé".chars().collect();
        let mut state: u64 = 42;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize
        };
        let mut batch = Vec::new();
        for i in 0..5_000 {
            let len = next() % 48;
            let url: String = (0..len)
                .map(|_| alphabet[next() % alphabet.len()])
                .collect();
            let mut e = page(&url);
            e.event_id = format!("e{i}");
            e.title = Some(url.clone());
            e.properties = vec![("p".into(), url)];
            batch.push(e);
        }
        let once = process("", batch).unwrap();
        let twice = process("", once.clone()).unwrap();
        assert_eq!(once, twice);
    }

    #[test]
    fn config_errors() {
        for (config, needle) in [
            (r#"{"fields": ["body"]}"#, "unknown variant `body`"),
            (r#"{"detect": ["ssn"]}"#, "unknown variant `ssn`"),
            (r#"{"replacement": {}}"#, "unknown field `replacement`"),
            (r#"{"replacements": {"mail": "x"}}"#, "unknown field `mail`"),
            ("[1]", "invalid type"),
        ] {
            let err = process(config, vec![]).unwrap_err();
            assert!(err.message.contains(needle), "{config}: {}", err.message);
        }
    }
}
