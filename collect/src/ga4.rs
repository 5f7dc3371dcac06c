//! Google Analytics 4: the Measurement Protocol (`POST /mp/collect?measurement_id=&api_secret=`,
//! a JSON body of up to 25 events) and gtag-style hits (`/g/collect`, parameters in the query
//! string and/or one hit per body line).
//!
//! Google answers 2xx even to invalid Measurement Protocol requests and silently drops them;
//! we enforce the same documented limits but say what is wrong (400), and
//! `/debug/mp/collect` reports it in Google's `validationMessages` shape without storing.

use std::collections::BTreeMap;

use beacon_proto::bus::TrackerId;
use beacon_proto::Event;
use serde_json::Value;

use super::{
    amount_micros, canonical_name, content_key, currency, invalid, new_event_id, put_prop,
    scalar_string, DecodeError, Decoded, Hit,
};

/// Google's Measurement Protocol limits.
pub const MAX_BODY: usize = 130_000;
pub const MAX_EVENTS: usize = 25;
pub const MAX_PARAMS: usize = 25;
pub const MAX_USER_PROPERTIES: usize = 25;
pub const MAX_EVENT_NAME: usize = 40;
pub const MAX_PARAM_NAME: usize = 40;
pub const MAX_PARAM_VALUE: usize = 100;
pub const MAX_USER_PROPERTY_NAME: usize = 24;
pub const MAX_USER_PROPERTY_VALUE: usize = 36;
/// Hits in one gtag request body (each repeats the shared query parameters).
pub const MAX_GTAG_HITS: usize = 100;

/// One broken rule, as Google's validation server reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidationMessage {
    pub field_path: String,
    pub description: String,
    pub validation_code: &'static str,
}

/// `POST /mp/collect?measurement_id=..&api_secret=..`. Returns the decoded request, or every
/// rule it breaks.
pub fn decode_mp(query: &str, body: &[u8], now_ms: i64) -> Result<Decoded, Vec<ValidationMessage>> {
    let mut msgs = Vec::new();
    let msg = |path: &str, code: &'static str, d: String| ValidationMessage {
        field_path: path.to_string(),
        description: d,
        validation_code: code,
    };
    let q: BTreeMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let measurement_id = q.get("measurement_id").filter(|v| !v.is_empty());
    if measurement_id.is_none() {
        msgs.push(msg(
            "measurement_id",
            "VALUE_REQUIRED",
            "measurement_id is required in the query string (web streams; firebase_app_id is not supported)".into(),
        ));
    }
    let api_secret = q.get("api_secret").filter(|v| !v.is_empty()).cloned();
    if api_secret.is_none() {
        msgs.push(msg(
            "api_secret",
            "VALUE_REQUIRED",
            "api_secret is required in the query string".into(),
        ));
    }
    if body.len() > MAX_BODY {
        msgs.push(msg(
            "",
            "VALUE_INVALID",
            format!(
                "body is {} bytes, over Google's limit of {MAX_BODY}",
                body.len()
            ),
        ));
        return Err(msgs);
    }
    let doc: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            msgs.push(msg("", "VALUE_INVALID", format!("body is not JSON: {e}")));
            return Err(msgs);
        }
    };
    let client_id = doc.get("client_id").and_then(scalar_string);
    if client_id.is_none() {
        msgs.push(msg(
            "client_id",
            "VALUE_REQUIRED",
            "client_id is required".into(),
        ));
    }
    let user_id = doc.get("user_id").and_then(scalar_string);
    // The end user's address, from a server that sends on their behalf (the edge uses it
    // only where it trusts forwarded addresses).
    let ip_override = match doc.get("ip_override") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let ip = v
                .as_str()
                .and_then(|s| s.trim().parse::<std::net::IpAddr>().ok());
            if ip.is_none() {
                msgs.push(msg(
                    "ip_override",
                    "VALUE_INVALID",
                    "ip_override must be an IPv4 or IPv6 address".into(),
                ));
            }
            ip
        }
    };
    let ts = match doc.get("timestamp_micros") {
        None => now_ms,
        Some(v) => match v
            .as_i64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        {
            Some(us) => us / 1000,
            None => {
                msgs.push(msg(
                    "timestamp_micros",
                    "VALUE_INVALID",
                    "timestamp_micros must be an integer".into(),
                ));
                now_ms
            }
        },
    };
    let mut user_props = BTreeMap::new();
    if let Some(up) = doc.get("user_properties").and_then(Value::as_object) {
        if up.len() > MAX_USER_PROPERTIES {
            msgs.push(msg(
                "user_properties",
                "VALUE_INVALID",
                format!(
                    "{} user properties, over the limit of {MAX_USER_PROPERTIES}",
                    up.len()
                ),
            ));
        }
        for (k, v) in up {
            if k.len() > MAX_USER_PROPERTY_NAME {
                msgs.push(msg(
                    &format!("user_properties.{k}"),
                    "NAME_INVALID",
                    format!("user property names are at most {MAX_USER_PROPERTY_NAME} characters"),
                ));
            }
            let value = v.get("value").and_then(scalar_string);
            match value {
                Some(s) if s.chars().count() > MAX_USER_PROPERTY_VALUE => msgs.push(msg(
                    &format!("user_properties.{k}.value"),
                    "VALUE_INVALID",
                    format!(
                        "user property values are at most {MAX_USER_PROPERTY_VALUE} characters"
                    ),
                )),
                Some(s) => put_prop(&mut user_props, &format!("user.{k}"), s),
                None => {}
            }
        }
    }
    let events = match doc.get("events").and_then(Value::as_array) {
        Some(e) if !e.is_empty() => e,
        _ => {
            msgs.push(msg(
                "events",
                "VALUE_REQUIRED",
                "events must be a non-empty array".into(),
            ));
            return Err(msgs);
        }
    };
    if events.len() > MAX_EVENTS {
        msgs.push(msg(
            "events",
            "VALUE_INVALID",
            format!(
                "{} events, over Google's limit of {MAX_EVENTS} per request",
                events.len()
            ),
        ));
    }
    let tracker = TrackerId::Ga4(measurement_id.cloned().unwrap_or_default());
    let mut hits = Vec::with_capacity(events.len());
    for (i, ev) in events.iter().enumerate() {
        let path = format!("events[{i}]");
        let name = ev.get("name").and_then(Value::as_str).unwrap_or_default();
        if !valid_name(name, MAX_EVENT_NAME) {
            msgs.push(msg(&format!("{path}.name"), "NAME_INVALID", format!("event name {name:?} must be 1-{MAX_EVENT_NAME} letters, digits or underscores, starting with a letter")));
            continue;
        }
        let empty = serde_json::Map::new();
        let params = ev
            .get("params")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        if params.len() > MAX_PARAMS {
            msgs.push(msg(
                &format!("{path}.params"),
                "VALUE_INVALID",
                format!("{} params, over the limit of {MAX_PARAMS}", params.len()),
            ));
        }
        let mut e = Event {
            event_id: new_event_id(),
            name: canonical_name(name),
            ts,
            visitor_id: client_id.clone(),
            user_id: user_id.clone(),
            properties: user_props.clone(),
            ..Default::default()
        };
        let mut value = None;
        for (k, v) in params {
            let limit = match k.as_str() {
                "page_location" => 1000,
                "page_referrer" => 420,
                "page_title" => 300,
                "items" => usize::MAX,
                _ => MAX_PARAM_VALUE,
            };
            if k.len() > MAX_PARAM_NAME {
                msgs.push(msg(
                    &format!("{path}.params.{k}"),
                    "NAME_INVALID",
                    format!("param names are at most {MAX_PARAM_NAME} characters"),
                ));
            }
            let Some(s) = scalar_string(v) else { continue };
            if v.is_string() && s.chars().count() > limit {
                msgs.push(msg(
                    &format!("{path}.params.{k}"),
                    "VALUE_INVALID",
                    format!("{k} is at most {limit} characters"),
                ));
                continue;
            }
            match k.as_str() {
                "page_location" => e.url = Some(s),
                "page_referrer" => e.referrer = Some(s),
                "page_title" => e.title = Some(s),
                "session_id" => e.session_id = Some(s),
                "currency" => e.currency = currency(&s),
                "value" => value = amount_micros(v),
                _ => put_prop(&mut e.properties, k, s),
            }
        }
        match (value, &e.currency) {
            (Some(m), Some(_)) => e.revenue_micros = Some(m),
            (Some(m), None) => put_prop(&mut e.properties, "value", (m as f64 / 1e6).to_string()),
            _ => {}
        }
        hits.push(Hit {
            tracker: tracker.clone(),
            event: e,
            user_agent: None,
            ip: ip_override,
        });
    }
    if !msgs.is_empty() {
        return Err(msgs);
    }
    Ok(Decoded {
        // A request with its own timestamp is the same request when retried.
        dedup_key: doc
            .get("timestamp_micros")
            .is_some()
            .then(|| content_key(&[b"mp", query.as_bytes(), body])),
        hits,
        api_secret,
    })
}

fn valid_name(name: &str, max: usize) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && name.len() <= max
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// gtag hits: `query` holds shared parameters, each non-empty body line one hit's own
/// (overriding the shared ones); no body line means the query is the one hit.
pub fn decode_gtag(query: &str, body: &[u8], now_ms: i64) -> Result<Decoded, DecodeError> {
    let shared: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let body = std::str::from_utf8(body).map_err(|_| invalid("body is not UTF-8"))?;
    let lines: Vec<&str> = body
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.len() > MAX_GTAG_HITS {
        return Err(invalid(format!(
            "{} hits in one request, over the limit of {MAX_GTAG_HITS}",
            lines.len()
        )));
    }

    let mut hits = Vec::new();
    let mut one = |own: &str| -> Result<(), DecodeError> {
        let mut p: BTreeMap<String, String> = shared.iter().cloned().collect();
        p.extend(url::form_urlencoded::parse(own.as_bytes()).into_owned());
        hits.push(gtag_hit(&p, now_ms).map_err(|e| {
            let DecodeError::Invalid(m) = e;
            invalid(format!("hit {}: {m}", hits.len()))
        })?);
        Ok(())
    };
    if lines.is_empty() {
        one("")?;
    } else {
        for l in lines {
            one(l)?;
        }
    }
    Ok(Decoded {
        hits,
        api_secret: None,
        dedup_key: None,
    })
}

fn gtag_hit(p: &BTreeMap<String, String>, now_ms: i64) -> Result<Hit, DecodeError> {
    let get = |k: &str| p.get(k).map(String::as_str).filter(|v| !v.is_empty());
    if let Some(v) = get("v") {
        if v != "2" {
            return Err(invalid(format!(
                "protocol version v={v}; only v=2 (GA4) is accepted"
            )));
        }
    }
    let tid = get("tid").ok_or_else(|| invalid("no `tid` (measurement id)"))?;
    let name = get("en").ok_or_else(|| invalid("no `en` (event name)"))?;
    let mut e = Event {
        event_id: new_event_id(),
        name: canonical_name(name),
        ts: now_ms,
        url: get("dl").map(str::to_string),
        referrer: get("dr").map(str::to_string),
        title: get("dt").map(str::to_string),
        visitor_id: get("cid").map(str::to_string),
        session_id: get("sid").map(str::to_string),
        user_id: get("uid").map(str::to_string),
        currency: get("cu").and_then(currency),
        ..Default::default()
    };
    let mut items = Vec::new();
    for (k, v) in p {
        if let Some(key) = k.strip_prefix("ep.").or_else(|| k.strip_prefix("epn.")) {
            if key == "value" && e.currency.is_some() {
                e.revenue_micros = amount_micros(&Value::String(v.clone()));
            } else {
                put_prop(&mut e.properties, key, v.clone());
            }
        } else if let Some(key) = k.strip_prefix("up.").or_else(|| k.strip_prefix("upn.")) {
            put_prop(&mut e.properties, &format!("user.{key}"), v.clone());
        } else if k.len() > 2 && k.starts_with("pr") && k[2..].bytes().all(|b| b.is_ascii_digit()) {
            items.push(gtag_item(v));
        }
    }
    if !items.is_empty() {
        put_prop(&mut e.properties, "items", Value::Array(items).to_string());
    }
    Ok(Hit {
        tracker: TrackerId::Ga4(tid.to_string()),
        event: e,
        user_agent: None,
        ip: None,
    })
}

/// `id<sku>~nm<name>~pr<price>~qt<qty>` -> `{"item_id":..,"item_name":..,"price":..,"quantity":..}`.
fn gtag_item(v: &str) -> Value {
    let mut item = serde_json::Map::new();
    for part in v.split('~') {
        if part.len() < 2 || !part.is_char_boundary(2) {
            continue;
        }
        let (k, val) = part.split_at(2);
        let key = match k {
            "id" => "item_id",
            "nm" => "item_name",
            "pr" => "price",
            "qt" => "quantity",
            "ca" => "item_category",
            "br" => "item_brand",
            "va" => "item_variant",
            other => other,
        };
        item.insert(key.to_string(), Value::String(val.to_string()));
    }
    Value::Object(item)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_673_360_000;
    const Q: &str = "measurement_id=G-TEST123&api_secret=SECRET123";

    #[test]
    fn measurement_protocol_as_ga4mp_sends_it() {
        let body = serde_json::json!({"client_id": "1234567890.1700000000",
          "events": [{"name": "page_view", "params": {"page_location": "https://shop.example/p/1", "page_title": "Product 1", "session_id": 1795673444, "engagement_time_msec": 10}},
                     {"name": "purchase", "params": {"currency": "EUR", "value": 19.99, "transaction_id": "o-9",
                        "items": [{"item_id": "sku-1", "price": 19.99, "quantity": 1}], "session_id": 1795673444}}],
          "user_id": "user-42", "user_properties": {"plan": {"value": "gold"}}});
        let d = decode_mp(Q, &serde_json::to_vec(&body).unwrap(), NOW).unwrap();
        assert_eq!(d.api_secret.as_deref(), Some("SECRET123"));
        assert!(d.dedup_key.is_none());
        let pv = &d.hits[0].event;
        assert_eq!(d.hits[0].tracker, TrackerId::Ga4("G-TEST123".into()));
        assert_eq!(pv.name, "pageview");
        assert_eq!(pv.url.as_deref(), Some("https://shop.example/p/1"));
        assert_eq!(pv.session_id.as_deref(), Some("1795673444"));
        assert_eq!(pv.visitor_id.as_deref(), Some("1234567890.1700000000"));
        assert_eq!(pv.properties["user.plan"], "gold");
        assert_eq!(pv.ts, NOW);
        let buy = &d.hits[1].event;
        assert_eq!(buy.revenue_micros, Some(19_990_000));
        assert_eq!(buy.currency.as_deref(), Some("EUR"));
        assert_eq!(buy.properties["transaction_id"], "o-9");
        assert!(buy.properties["items"].contains("sku-1"));
    }

    #[test]
    fn a_server_gives_its_users_address() {
        let relayed = serde_json::json!({"client_id": "c", "ip_override": "81.2.69.142",
            "events": [{"name": "a"}, {"name": "b"}]});
        let d = decode_mp(Q, &serde_json::to_vec(&relayed).unwrap(), NOW).unwrap();
        assert!(d
            .hits
            .iter()
            .all(|h| h.ip == Some("81.2.69.142".parse().unwrap())));
        let bad_ip =
            serde_json::json!({"client_id": "c", "ip_override": "nope", "events": [{"name": "a"}]});
        let err = decode_mp(Q, &serde_json::to_vec(&bad_ip).unwrap(), NOW).unwrap_err();
        assert_eq!(err[0].field_path, "ip_override");
    }

    #[test]
    fn googles_limits_are_reported_together() {
        let events: Vec<Value> = (0..26)
            .map(|_| serde_json::json!({"name": "click", "params": {"x": "y".repeat(101)}}))
            .collect();
        let body = serde_json::json!({"events": events});
        let msgs = decode_mp(
            "measurement_id=G-1",
            &serde_json::to_vec(&body).unwrap(),
            NOW,
        )
        .unwrap_err();
        let paths: Vec<&str> = msgs.iter().map(|m| m.field_path.as_str()).collect();
        assert!(paths.contains(&"api_secret"));
        assert!(paths.contains(&"client_id"));
        assert!(paths.contains(&"events"));
        assert!(paths.contains(&"events[0].params.x"));
        let bad = serde_json::json!({"client_id": "c", "events": [{"name": "1bad-name"}]});
        let msgs = decode_mp(Q, &serde_json::to_vec(&bad).unwrap(), NOW).unwrap_err();
        assert_eq!(msgs[0].validation_code, "NAME_INVALID");
        let big = vec![b' '; MAX_BODY + 1];
        assert!(decode_mp(Q, &big, NOW).unwrap_err()[0]
            .description
            .contains("130000"));
    }

    #[test]
    fn gtag_multi_hit_body() {
        let q =
            "v=2&tid=G-TEST123&cid=555.666&sid=1700000000&dl=https%3A%2F%2Fshop.example%2F&dt=Home";
        let body = b"en=page_view&_et=5\nen=purchase&cu=usd&epn.value=42.5&ep.coupon=X&pr1=idsku-1~nmShirt~pr42.5~qt1\n";
        let d = decode_gtag(q, body, NOW).unwrap();
        assert_eq!(d.hits.len(), 2);
        let pv = &d.hits[0].event;
        assert_eq!(pv.name, "pageview");
        assert_eq!(pv.title.as_deref(), Some("Home"));
        assert_eq!(pv.visitor_id.as_deref(), Some("555.666"));
        let buy = &d.hits[1].event;
        assert_eq!(buy.revenue_micros, Some(42_500_000));
        assert_eq!(buy.currency.as_deref(), Some("USD"));
        assert_eq!(buy.properties["coupon"], "X");
        assert!(buy.properties["items"].contains("\"item_name\":\"Shirt\""));
        // Query only: one hit.
        let one = decode_gtag(&format!("{q}&en=scroll"), b"", NOW).unwrap();
        assert_eq!(one.hits[0].event.name, "scroll");
        assert!(decode_gtag("v=1&tid=UA-1&en=x", b"", NOW).is_err());
        assert!(decode_gtag("v=2&en=x", b"", NOW)
            .unwrap_err()
            .to_string()
            .contains("tid"));
    }
}
