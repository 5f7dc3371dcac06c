//! Plausible's events API: `POST /api/event` with short or long keys (`n`/`name`,
//! `u`/`url`, `d`/`domain`, `r`/`referrer`, `p`/`props`/`m`/`meta`, `$`/`revenue`, `h`
//! hash mode), whatever the content type (browser scripts send `text/plain`). Props may be
//! an object or a JSON-encoded string. `domain` may list several sites (comma-separated):
//! the event is counted for each.

use beacon_proto::bus::{normalize_domain, TrackerId};
use beacon_proto::Event;
use serde_json::Value;

use super::{
    amount_micros, canonical_name, currency, invalid, new_event_id, put_prop, scalar_string,
    DecodeError, Decoded, Hit,
};

/// Sites one event may be counted for (`d: "a.example,all.example"`): each is a copy.
pub const MAX_DOMAINS: usize = 16;

pub fn decode(body: &[u8], now_ms: i64) -> Result<Decoded, DecodeError> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| invalid(format!("body is not JSON: {e}")))?;
    let obj = doc
        .as_object()
        .ok_or_else(|| invalid("body must be a JSON object"))?;
    let field = |short: &str, long: &str| obj.get(short).or_else(|| obj.get(long));
    let text = |short: &str, long: &str| {
        field(short, long)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    };
    let name = text("n", "name").ok_or_else(|| invalid("`name` (or `n`) is required"))?;
    let raw_url = text("u", "url").ok_or_else(|| invalid("`url` (or `u`) is required"))?;
    let parsed = url::Url::parse(raw_url)
        .map_err(|e| invalid(format!("`url` is not an absolute URL: {e}")))?;
    let hash_mode =
        field("h", "hash_mode").is_some_and(|v| v.as_bool() == Some(true) || v.as_i64() == Some(1));
    let url = match (hash_mode, parsed.fragment()) {
        // Hash-based routing: `/app/#/pricing` is the page `/app/pricing` (port, base path
        // and query kept).
        (true, Some(f)) if f.starts_with('/') => {
            let mut u = parsed.clone();
            let path = format!("{}{f}", parsed.path().trim_end_matches('/'));
            u.set_fragment(None);
            u.set_path(&path);
            u.to_string()
        }
        _ => raw_url.to_string(),
    };
    let domains: Vec<String> = match text("d", "domain") {
        Some(d) => d
            .split(',')
            .map(normalize_domain)
            .filter(|d| !d.is_empty())
            .collect(),
        None => parsed
            .host_str()
            .map(normalize_domain)
            .into_iter()
            .collect(),
    };
    let mut domains = domains;
    domains.sort();
    domains.dedup();
    if domains.is_empty() {
        return Err(invalid("no `domain` and none in the url"));
    }
    if domains.len() > MAX_DOMAINS {
        return Err(invalid(format!(
            "{} domains in one event, over the limit of {MAX_DOMAINS}",
            domains.len()
        )));
    }
    let mut event = Event {
        name: canonical_name(name),
        ts: now_ms,
        url: Some(url),
        referrer: text("r", "referrer").map(str::to_string),
        ..Default::default()
    };
    let props = ["p", "props", "m", "meta"].iter().find_map(|k| obj.get(*k));
    match props {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => add_props(&mut event, m),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(m)) => add_props(&mut event, &m),
            _ => {
                return Err(invalid(
                    "`props` must be an object or a JSON-encoded object",
                ))
            }
        },
        Some(_) => {
            return Err(invalid(
                "`props` must be an object or a JSON-encoded object",
            ))
        }
    }
    if let Some(rev) = field("$", "revenue") {
        let rev = match rev {
            Value::String(s) => serde_json::from_str(s).map_err(|_| {
                invalid("`revenue` must be an object {\"amount\": .., \"currency\": ..}")
            })?,
            v => v.clone(),
        };
        let amount = rev.get("amount").and_then(amount_micros);
        let cur = rev
            .get("currency")
            .and_then(Value::as_str)
            .and_then(currency);
        match (amount, cur) {
            (Some(a), Some(c)) => {
                event.revenue_micros = Some(a);
                event.currency = Some(c);
            }
            _ => {
                return Err(invalid(
                    "`revenue` needs a numeric `amount` and a 3-letter `currency`",
                ))
            }
        }
    }
    let hits = domains
        .into_iter()
        .map(|d| {
            let mut e = event.clone();
            // One id per site: the copies are distinct events of distinct merchants.
            e.event_id = new_event_id();
            Hit {
                tracker: TrackerId::Domain(d),
                event: e,
                user_agent: None,
                ip: None,
            }
        })
        .collect();
    Ok(Decoded {
        hits,
        api_secret: None,
        dedup_key: None,
    })
}

fn add_props(e: &mut Event, m: &serde_json::Map<String, Value>) {
    for (k, v) in m {
        if let Some(s) = scalar_string(v) {
            put_prop(&mut e.properties, k, s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_673_360_000;

    #[test]
    fn short_keys_props_as_string_and_revenue() {
        let body = br#"{"n":"Purchase","u":"https://www.shop.example/checkout?x=1","d":"shop.example","r":"https://news.example/","p":"{\"plan\":\"pro\",\"n\":3}","$":"{\"amount\":\"19.99\",\"currency\":\"eur\"}"}"#;
        let d = decode(body, NOW).unwrap();
        let h = &d.hits[0];
        assert_eq!(h.tracker, TrackerId::Domain("shop.example".into()));
        assert_eq!(h.event.name, "Purchase");
        assert_eq!(h.event.referrer.as_deref(), Some("https://news.example/"));
        assert_eq!(h.event.properties["plan"], "pro");
        assert_eq!(h.event.properties["n"], "3");
        assert_eq!(h.event.revenue_micros, Some(19_990_000));
        assert_eq!(h.event.currency.as_deref(), Some("EUR"));
    }

    #[test]
    fn long_keys_domain_from_url_and_rollups() {
        let body = br#"{"name":"pageview","url":"https://WWW.Shop.example/#/pricing","h":1,"props":{"a":"b","$bot":"no"}}"#;
        let d = decode(body, NOW).unwrap();
        assert_eq!(d.hits[0].tracker, TrackerId::Domain("shop.example".into()));
        assert_eq!(d.hits[0].event.name, "pageview");
        assert_eq!(
            d.hits[0].event.url.as_deref(),
            Some("https://www.shop.example/pricing")
        );
        let port = br#"{"n":"pageview","u":"https://a.example:8443/app/?q=1#/pricing","h":1}"#;
        assert_eq!(
            decode(port, NOW).unwrap().hits[0].event.url.as_deref(),
            Some("https://a.example:8443/app/pricing?q=1")
        );
        let same = br#"{"n":"pageview","u":"https://a.example/","d":"a.example,www.a.example"}"#;
        assert_eq!(decode(same, NOW).unwrap().hits.len(), 1);
        let many = format!(
            r#"{{"n":"x","u":"https://a/","d":"{}"}}"#,
            (0..100)
                .map(|i| format!("d{i}.example"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(decode(many.as_bytes(), NOW).is_err());
        assert_eq!(
            d.hits[0].event.properties.get("bot").map(String::as_str),
            Some("no")
        );
        let two = decode(
            br#"{"n":"pageview","u":"https://a.example/","d":"a.example,all.example"}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(two.hits.len(), 2);
        assert_ne!(two.hits[0].event.event_id, two.hits[1].event.event_id);
    }

    #[test]
    fn errors() {
        let e = |b: &str| decode(b.as_bytes(), NOW).unwrap_err().to_string();
        assert!(e("nope").contains("not JSON"));
        assert!(e(r#"{"u":"https://a/"}"#).contains("name"));
        assert!(e(r#"{"n":"x","u":"/relative"}"#).contains("absolute"));
        assert!(e(r#"{"n":"x","u":"https://a/","p":[1]}"#).contains("props"));
        assert!(e(r#"{"n":"x","u":"https://a/","$":{"amount":"lots"}}"#).contains("revenue"));
    }
}
