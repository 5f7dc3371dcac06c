//! Snowplow tracker protocol: `POST /com.snowplowanalytics.snowplow/tp2` (a
//! `payload_data` JSON document with one object per event) and `GET /i` (one event in the
//! query string). Every value arrives as a string; `co`/`ue_pr` are JSON, `cx`/`ue_px` the
//! same JSON in base64 (URL-safe or standard, with or without padding).
//!
//! Mapping (docs/COLLECTORS.md): `e=pv` -> `pageview`; `se` -> the action (`se_ac`) with
//! `category`/`label`/`property`/`value`; `ue` -> the self-describing event's schema name
//! with its data as properties; `tr`/`ti` -> `transaction` (revenue `tr_tt` in `tr_cu`) /
//! `transaction_item`; `pp` -> `page_ping`. Contexts become `<schema name>.<field>`
//! properties. Time: `ttm` if sent, else `dtm` corrected for the device clock's skew
//! (Snowplow's derived timestamp: `now - (stm - dtm)`), else the edge clock.

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine;
use beacon_proto::bus::TrackerId;
use beacon_proto::Event;
use serde_json::{Map, Value};

use super::{
    amount_micros, canonical_name, content_key, currency, invalid, new_event_id, put_prop,
    scalar_string, DecodeError, Decoded, Hit,
};

/// One event's fields, borrowed from the request where no unescaping was needed.
type Fields<'a> = BTreeMap<Str<'a>, Str<'a>>;

#[derive(serde::Deserialize)]
struct PayloadData<'a> {
    #[serde(borrow)]
    data: Vec<Fields<'a>>,
}

/// `POST /com.snowplowanalytics.snowplow/tp2`.
pub fn decode_post(body: &[u8], now_ms: i64) -> Result<Decoded, DecodeError> {
    // Typed and borrowing: a tp2 batch is mostly short strings, and building a
    // `serde_json::Value` tree of them cost more than the rest of the edge's work per event.
    let doc: PayloadData = serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            invalid(format!("body is not JSON: {e}"))
        } else {
            invalid(format!(
                "expected a payload_data document {{\"schema\": ..., \"data\": [{{...}}]}}: {e}"
            ))
        }
    })?;
    let mut hits = Vec::with_capacity(doc.data.len());
    for (i, fields) in doc.data.iter().enumerate() {
        hits.push(decode_event(fields, now_ms).map_err(|e| prefix(i, e))?);
    }
    Ok(Decoded {
        dedup_key: retry_key(&doc.data),
        hits,
        api_secret: None,
    })
}

/// `GET /i?e=pv&...`.
pub fn decode_get(query: &str, now_ms: i64) -> Result<Decoded, DecodeError> {
    let fields: Fields = url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (Str(k), Str(v)))
        .collect();
    let hit = decode_event(&fields, now_ms)?;
    Ok(Decoded {
        dedup_key: retry_key(std::slice::from_ref(&fields)),
        hits: vec![hit],
        api_secret: None,
    })
}

/// The idempotency key of a request whose every event has an `eid`: app ids and event ids
/// in order. Trackers re-stamp `stm` (sent time) on each attempt, so the body itself changes
/// between a request and its retry; the events it carries do not.
fn retry_key(events: &[Fields]) -> Option<String> {
    let mut parts: Vec<&[u8]> = vec![b"sp"];
    for f in events {
        let eid = f.get("eid").filter(|v| !v.0.is_empty())?;
        parts.push(f.get("aid").map_or(&b""[..], |a| a.0.as_bytes()));
        parts.push(eid.0.as_bytes());
    }
    Some(content_key(&parts))
}

/// A tracker field's text: JSON strings as they are (borrowed when unescaped), numbers and
/// booleans as their JSON text, null as empty (absent), arrays and objects as compact JSON.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Str<'a>(Cow<'a, str>);

impl std::borrow::Borrow<str> for Str<'_> {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for Str<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v)))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(if v { "true" } else { "false" })))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_string())))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_string())))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(
                    serde_json::Number::from_f64(v).map_or_else(String::new, |n| n.to_string()),
                )))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed("")))
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed("")))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Self::Value, A::Error> {
                let v: Value = serde::Deserialize::deserialize(
                    serde::de::value::SeqAccessDeserializer::new(seq),
                )?;
                Ok(Str(Cow::Owned(v.to_string())))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                let v: Value = serde::Deserialize::deserialize(
                    serde::de::value::MapAccessDeserializer::new(map),
                )?;
                Ok(Str(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_any(V)
    }
}

fn prefix(i: usize, e: DecodeError) -> DecodeError {
    let DecodeError::Invalid(m) = e;
    invalid(format!("data[{i}]: {m}"))
}

fn decode_event(f: &Fields, now_ms: i64) -> Result<Hit, DecodeError> {
    let get = |k: &str| f.get(k).map(|v| &*v.0).filter(|v| !v.is_empty());
    let aid = get("aid").ok_or_else(|| {
        invalid("no `aid` (application id): set app_id in the tracker to the id registered for the merchant")
    })?;
    let kind = get("e").ok_or_else(|| invalid("no event type `e`"))?;
    let mut props = BTreeMap::new();
    let mut revenue_micros = None;
    let mut cur = None;
    let name = match kind {
        "pv" => canonical_name("pv"),
        "pp" => "page_ping".to_string(),
        "se" => {
            for (field, key) in [
                ("se_ca", "category"),
                ("se_la", "label"),
                ("se_pr", "property"),
                ("se_va", "value"),
            ] {
                if let Some(v) = get(field) {
                    put_prop(&mut props, key, v.to_string());
                }
            }
            get("se_ac").unwrap_or("structured").to_string()
        }
        "ue" => {
            let json = json_field(f, "ue_pr", "ue_px")?
                .ok_or_else(|| invalid("self-describing event (e=ue) without ue_pr or ue_px"))?;
            // unstruct_event envelope -> the event's own {schema, data}.
            let inner = json
                .get("data")
                .ok_or_else(|| invalid("ue_pr/ue_px has no `data`"))?;
            let schema = inner
                .get("schema")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("self-describing event without a schema"))?;
            put_prop(&mut props, "schema", schema.to_string());
            if let Some(Value::Object(data)) = inner.get("data") {
                flatten_into(&mut props, None, data);
            }
            schema_name(schema)?.to_string()
        }
        "tr" => {
            for (field, key) in [
                ("tr_id", "order_id"),
                ("tr_af", "affiliation"),
                ("tr_tx", "tax"),
                ("tr_sh", "shipping"),
            ] {
                if let Some(v) = get(field) {
                    put_prop(&mut props, key, v.to_string());
                }
            }
            if let (Some(total), Some(c)) = (get("tr_tt"), get("tr_cu").and_then(currency)) {
                revenue_micros = amount_micros(&Value::String(total.to_string()));
                cur = revenue_micros.map(|_| c);
            }
            "transaction".to_string()
        }
        "ti" => {
            for (field, key) in [
                ("ti_id", "order_id"),
                ("ti_sk", "sku"),
                ("ti_nm", "item_name"),
                ("ti_ca", "item_category"),
                ("ti_pr", "price"),
                ("ti_qu", "quantity"),
                ("ti_cu", "currency"),
            ] {
                if let Some(v) = get(field) {
                    put_prop(&mut props, key, v.to_string());
                }
            }
            "transaction_item".to_string()
        }
        other => other.to_string(),
    };
    if let Some(ctx) = json_field(f, "co", "cx")? {
        let items = ctx
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("contexts (co/cx) without a `data` array"))?;
        for c in items {
            let schema = c.get("schema").and_then(Value::as_str).unwrap_or_default();
            if let (Ok(prefix), Some(Value::Object(data))) = (schema_name(schema), c.get("data")) {
                flatten_into(&mut props, Some(prefix), data);
            }
        }
    }
    let ts = timestamp(get("ttm"), get("dtm"), get("stm"), now_ms)?;
    let event = Event {
        event_id: get("eid").map_or_else(new_event_id, str::to_string),
        name,
        ts,
        url: get("url").map(str::to_string),
        referrer: get("refr").map(str::to_string),
        title: get("page").map(str::to_string),
        visitor_id: get("duid")
            .or_else(|| get("nuid"))
            .or_else(|| get("tnuid"))
            .map(str::to_string),
        session_id: get("sid").map(str::to_string),
        user_id: get("uid").map(str::to_string),
        revenue_micros,
        currency: cur,
        properties: props,
        ..Default::default()
    };
    Ok(Hit {
        tracker: TrackerId::SnowplowApp(aid.to_string()),
        event,
        user_agent: get("ua").map(str::to_string),
        ip: get("ip")
            .map(|ip| {
                ip.trim()
                    .parse()
                    .map_err(|_| invalid(format!("`ip` is not an IP address: {ip:?}")))
            })
            .transpose()?,
    })
}

/// The event time in epoch ms: `ttm`, else `dtm` shifted by the device clock's skew.
fn timestamp(
    ttm: Option<&str>,
    dtm: Option<&str>,
    stm: Option<&str>,
    now_ms: i64,
) -> Result<i64, DecodeError> {
    let ms = |field: &str, v: &str| {
        v.trim()
            .parse::<i64>()
            .map_err(|_| invalid(format!("`{field}` is not epoch milliseconds: {v:?}")))
    };
    if let Some(t) = ttm {
        return ms("ttm", t);
    }
    match (dtm, stm) {
        (Some(d), Some(s)) => {
            let (d, s) = (ms("dtm", d)?, ms("stm", s)?);
            // Time the event waited on the device, measured on the device clock.
            Ok(now_ms - s.saturating_sub(d).clamp(0, 30 * 86_400_000))
        }
        (Some(d), None) => ms("dtm", d),
        _ => Ok(now_ms),
    }
}

/// JSON from the plain field or the base64 one.
fn json_field(f: &Fields, plain: &str, b64: &str) -> Result<Option<Value>, DecodeError> {
    let text: Cow<str> = match (f.get(plain), f.get(b64)) {
        (Some(p), _) if !p.0.is_empty() => Cow::Borrowed(&p.0),
        (_, Some(b)) if !b.0.is_empty() => {
            let bytes =
                decode_base64(&b.0).ok_or_else(|| invalid(format!("`{b64}` is not base64")))?;
            Cow::Owned(
                String::from_utf8(bytes).map_err(|_| invalid(format!("`{b64}` is not UTF-8")))?,
            )
        }
        _ => return Ok(None),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| invalid(format!("`{plain}`/`{b64}` is not JSON: {e}")))
}

/// URL-safe or standard alphabet, padded or not (trackers differ).
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let normalised: String = s
        .chars()
        .filter(|c| !c.is_ascii_whitespace() && *c != '=')
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(normalised)
        .ok()
}

/// `iglu:com.acme/purchase/jsonschema/1-0-0` -> `purchase`.
fn schema_name(schema: &str) -> Result<&str, DecodeError> {
    schema
        .strip_prefix("iglu:")
        .and_then(|s| s.split('/').nth(1))
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid(format!("not an Iglu schema URI: {schema:?}")))
}

fn flatten_into(
    props: &mut BTreeMap<String, String>,
    prefix: Option<&str>,
    data: &Map<String, Value>,
) {
    for (k, v) in data {
        if let Some(s) = scalar_string(v) {
            let key = match prefix {
                Some(p) => format!("{p}.{k}"),
                None => k.clone(),
            };
            put_prop(props, &key, s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_673_360_000;

    fn b64url(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE.encode(s)
    }

    #[test]
    fn post_batch_as_the_python_tracker_sends_it() {
        let co = r#"{"schema": "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-1", "data": [{"schema": "iglu:com.acme/merchant/jsonschema/1-0-0", "data": {"merchant_id": "m-1"}}]}"#;
        let ue = r#"{"schema": "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0", "data": {"schema": "iglu:com.acme/purchase/jsonschema/1-0-0", "data": {"order_id": "o-9", "total": 19.99}}}"#;
        let body = serde_json::json!({
            "schema": "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4",
            "data": [
                {"e": "pv", "url": "https://shop.example/p/1", "page": "Product 1", "refr": "https://ref.example/",
                 "co": co, "p": "srv", "uid": "user-42", "eid": "6fde19b1-0000-4000-8000-000000000001",
                 "dtm": "1795673352516", "stm": "1795673352600", "tv": "py-1.1.0", "aid": "shop-1"},
                {"e": "se", "se_ca": "checkout", "se_ac": "add-to-basket", "se_la": "sku-1", "se_va": "2.5",
                 "eid": "6fde19b1-0000-4000-8000-000000000002", "aid": "shop-1", "dtm": "1795673352516"},
                {"e": "ue", "ue_px": b64url(ue).trim_end_matches('=').to_string(), "ttm": "1700000000000",
                 "eid": "6fde19b1-0000-4000-8000-000000000003", "aid": "shop-1"}
            ]
        });
        let bytes = serde_json::to_vec(&body).unwrap();
        let d = decode_post(&bytes, NOW).unwrap();
        assert_eq!(d.hits.len(), 3);
        assert!(d.dedup_key.is_some());
        let pv = &d.hits[0];
        assert_eq!(pv.tracker, TrackerId::SnowplowApp("shop-1".into()));
        assert_eq!(pv.event.name, "pageview");
        assert_eq!(pv.event.url.as_deref(), Some("https://shop.example/p/1"));
        assert_eq!(pv.event.referrer.as_deref(), Some("https://ref.example/"));
        assert_eq!(pv.event.title.as_deref(), Some("Product 1"));
        assert_eq!(pv.event.user_id.as_deref(), Some("user-42"));
        assert_eq!(pv.event.ts, NOW - 84, "device skew corrected");
        assert_eq!(pv.event.properties["merchant.merchant_id"], "m-1");
        let se = &d.hits[1].event;
        assert_eq!(se.name, "add-to-basket");
        assert_eq!(se.properties["category"], "checkout");
        assert_eq!(se.properties["value"], "2.5");
        assert_eq!(se.ts, 1795673352516);
        let ue = &d.hits[2].event;
        assert_eq!(ue.name, "purchase");
        assert_eq!(ue.ts, 1_700_000_000_000);
        assert_eq!(ue.properties["order_id"], "o-9");
        assert_eq!(ue.properties["total"], "19.99");
        assert_eq!(
            ue.properties["schema"],
            "iglu:com.acme/purchase/jsonschema/1-0-0"
        );
    }

    #[test]
    fn get_pixel_with_padded_base64_context() {
        let co = r#"{"schema":"iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-0","data":[{"schema":"iglu:com.acme/user/jsonschema/1-0-0","data":{"tier":"gold","$country":"XX"}}]}"#;
        let q = format!(
            "e=pv&url=https%3A%2F%2Fshop.example%2Fp%2F1&aid=shop-1&eid=e-1&duid=d-1&sid=s-1&cx={}",
            b64url(co)
        );
        let d = decode_get(&q, NOW).unwrap();
        let e = &d.hits[0].event;
        assert_eq!(e.visitor_id.as_deref(), Some("d-1"));
        assert_eq!(e.session_id.as_deref(), Some("s-1"));
        assert_eq!(e.properties["user.tier"], "gold");
        // Reserved names cannot be set by a browser.
        assert!(!e.properties.keys().any(|k| k.starts_with('$')));
        assert_eq!(e.ts, NOW);
    }

    #[test]
    fn transactions_carry_revenue() {
        let q = "e=tr&aid=a&tr_id=o-1&tr_tt=19.99&tr_cu=eur";
        let e = decode_get(q, NOW).unwrap().hits.remove(0).event;
        assert_eq!(e.name, "transaction");
        assert_eq!(e.revenue_micros, Some(19_990_000));
        assert_eq!(e.currency.as_deref(), Some("EUR"));
        assert!(
            decode_get(q, NOW).unwrap().dedup_key.is_none(),
            "no eid: not idempotent"
        );
    }

    #[test]
    fn a_relay_gives_each_event_its_users_address() {
        let body = serde_json::json!({"data": [
            {"e": "pv", "aid": "a", "eid": "e-1", "ip": "81.2.69.142", "ua": "UA-1"},
            {"e": "pv", "aid": "a", "eid": "e-2", "ip": " 2001:db8::1 "},
            {"e": "pv", "aid": "a", "eid": "e-3"}
        ]});
        let d = decode_post(&serde_json::to_vec(&body).unwrap(), NOW).unwrap();
        let ips: Vec<Option<String>> = d.hits.iter().map(|h| h.ip.map(|i| i.to_string())).collect();
        assert_eq!(
            ips,
            [Some("81.2.69.142".into()), Some("2001:db8::1".into()), None]
        );
        assert_eq!(d.hits[0].user_agent.as_deref(), Some("UA-1"));
        let bad = decode_get("e=pv&aid=a&ip=10.0.0.300", NOW).unwrap_err();
        assert!(
            bad.to_string().contains("`ip` is not an IP address"),
            "{bad}"
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let err = |b: &str| decode_post(b.as_bytes(), NOW).unwrap_err().to_string();
        assert!(err("{").contains("not JSON"));
        assert!(err(r#"{"data": 3}"#).contains("payload_data"));
        assert!(err(r#"{"data": [{"e": "pv"}]}"#).contains("data[0]: no `aid`"));
        assert!(err(r#"{"data": [{"e": "ue", "aid": "a", "ue_px": "!!"}]}"#).contains("not base64"));
        assert!(err(r#"{"data": [{"e": "pv", "aid": "a", "dtm": "soon"}]}"#).contains("`dtm`"));
    }

    #[test]
    fn base64_variants() {
        for s in ["eyJhIjoxfQ==", "eyJhIjoxfQ", "eyJhIjoxfQ%3D%3D"] {
            let s = s.replace("%3D", "=");
            assert_eq!(decode_base64(&s).unwrap(), br#"{"a":1}"#);
        }
        assert_eq!(
            decode_base64("-_-_").unwrap(),
            decode_base64("+/+/").unwrap()
        );
    }
}
