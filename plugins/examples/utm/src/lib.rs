//! Campaign attribution: copies `utm_*` query parameters of the page URL into event
//! properties (`utm_source`, `utm_medium`, `utm_campaign`, `utm_term`, `utm_content`), and
//! optionally strips them from the stored URL so page breakdowns are not split by campaign.
//!
//! Config (JSON, every field optional):
//! `{"strip_from_url": true, "property_prefix": "utm_", "lowercase": true}`

wit_bindgen::generate!({ path: "../../../wit", world: "processor" });

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

struct Utm;

impl Guest for Utm {
    fn process(config: String, mut batch: Vec<Event>) -> Result<Vec<Event>, PluginError> {
        let config: Config = if config.trim().is_empty() {
            Config::default()
        } else {
            serde_json::from_str(&config).map_err(|e| PluginError {
                message: format!("invalid utm config: {e}"),
            })?
        };
        for event in &mut batch {
            apply(&config, event);
        }
        Ok(batch)
    }
}

fn apply(config: &Config, event: &mut Event) {
    let Some(url) = event.url.as_deref() else {
        return;
    };
    let (found, stripped) = extract(url, config.strip_from_url);
    for (param, value) in found {
        let value = if config.lowercase {
            value.to_lowercase()
        } else {
            value
        };
        let key = format!("{}{}", config.property_prefix, param);
        match event.properties.iter_mut().find(|(k, _)| *k == key) {
            // An explicit property set by the tracker wins over the URL.
            Some(_) => {}
            None => event.properties.push((key, value)),
        }
    }
    if let Some(stripped) = stripped {
        event.url = Some(stripped);
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

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

export!(Utm);

#[cfg(test)]
mod tests {
    use super::*;

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
    fn bad_percent_is_kept() {
        assert_eq!(percent_decode("a%zz%4"), "a%zz%4");
        assert_eq!(percent_decode("%41b"), "Ab");
    }
}
