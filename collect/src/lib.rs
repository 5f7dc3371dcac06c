//! Decoders for the wire shapes existing trackers send (see docs/COLLECTORS.md): each turns
//! a request into canonical [`Event`]s tagged with the tracker identity that names the
//! merchant. Pure functions of the request (and the edge clock), so they are unit-tested and
//! fuzzed (`fuzz/`) without a server; the edge's `http` module serves them.
//!
//! Decoders never emit `$`-prefixed properties from client input: those are reserved for
//! the edge's enrichment, which only trusted server-side senders may set themselves.

pub mod ga4;
pub mod plausible;
pub mod snowplow;

use std::collections::BTreeMap;

use beacon_proto::bus::TrackerId;
use beacon_proto::Event;
use serde_json::Value;

/// One decoded event and who it is for.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub tracker: TrackerId,
    pub event: Event,
    /// A user agent carried in the payload (Snowplow `ua`), overriding the request's.
    pub user_agent: Option<String>,
    /// The end user's address carried in the payload (Snowplow `ip`, sent by server-side
    /// relays): the edge uses it instead of the request's only where it trusts the sender
    /// as it trusts `X-Forwarded-For`.
    pub ip: Option<std::net::IpAddr>,
}

/// A decoded request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decoded {
    pub hits: Vec<Hit>,
    /// GA4 Measurement Protocol `api_secret`.
    pub api_secret: Option<String>,
    /// Set when the request is idempotent by content (every event carries its own id or
    /// timestamp): a tracker's retry of the same request is then stored once.
    pub dedup_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn invalid(msg: impl Into<String>) -> DecodeError {
    DecodeError::Invalid(msg.into())
}

/// A JSON scalar as the string our properties hold; arrays and objects as compact JSON.
pub(crate) fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        other => Some(other.to_string()),
    }
}

/// Adds a client-supplied property, keeping the `$` namespace for the edge.
pub(crate) fn put_prop(props: &mut BTreeMap<String, String>, key: &str, value: String) {
    let key = key.trim_start_matches('$');
    if !key.is_empty() {
        props.insert(key.to_string(), value);
    }
}

/// A fresh event id for protocols whose events carry none.
pub(crate) fn new_event_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// `pageview` in our vocabulary for the names trackers use.
pub(crate) fn canonical_name(name: &str) -> String {
    match name {
        "page_view" | "pv" | "pageview" => beacon_proto::event::PAGEVIEW.to_string(),
        other => other.to_string(),
    }
}

/// A short content hash for idempotency keys.
pub(crate) fn content_key(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    hex::encode(&h.finalize()[..16])
}

/// Amount (number or numeric string) to micros.
pub(crate) fn amount_micros(v: &Value) -> Option<i64> {
    let f = match v {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    Event::micros_from_amount(f)
}

/// Normalised currency code (three ASCII letters, upper case).
pub(crate) fn currency(v: &str) -> Option<String> {
    let c = v.trim();
    (c.len() == 3 && c.bytes().all(|b| b.is_ascii_alphabetic())).then(|| c.to_ascii_uppercase())
}

/// A bounded, deterministic mutation run over every decoder in the ordinary test suite, so
/// a panic on hostile input fails CI even where libFuzzer (`scripts/fuzz.sh`) is not run.
#[cfg(test)]
mod garbage {
    const SEEDS: &[&[u8]] = &[
        br#"{"schema":"s","data":[{"e":"ue","aid":"a","ue_px":"eyJkYXRhIjp7InNjaGVtYSI6ImlnbHU6YS9iL2MvMSIsImRhdGEiOnsieCI6MX19fQ","co":"{\"data\":[{\"schema\":\"iglu:a/b/c/1\",\"data\":{\"k\":[1]}}]}","dtm":"1","stm":"2","tr_tt":"1e400"}]}"#,
        br#"{"client_id":"1","timestamp_micros":"9","events":[{"name":"page_view","params":{"page_location":"x","value":"NaN","currency":"EUR"}}],"user_properties":{"a":{"value":[1]}}}"#,
        b"v=2&tid=G&en=purchase&cu=EUR&epn.value=1e309&pr1=id\xc3\xa9~nm\n\nen=x&pr99=~~~",
        br#"{"n":"pageview","u":"https://a.example/#/\u00e9","d":",,","h":1,"p":"{\"a\":{}}","$":"{\"amount\":1e999,\"currency\":\"EURO\"}"}"#,
    ];

    fn run_all(data: &[u8]) {
        let now = 1_795_673_360_000;
        let _ = super::snowplow::decode_post(data, now);
        let _ = super::ga4::decode_mp("measurement_id=G&api_secret=s", data, now);
        let _ = super::ga4::decode_gtag("v=2&tid=G", data, now);
        let _ = super::plausible::decode(data, now);
        if let Ok(q) = std::str::from_utf8(data) {
            let _ = super::snowplow::decode_get(q, now);
            let _ = super::ga4::decode_gtag(q, b"", now);
        }
    }

    #[test]
    fn mutated_inputs_never_panic() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for seed in SEEDS {
            run_all(seed);
            for _ in 0..5_000 {
                let mut d = seed.to_vec();
                for _ in 0..(next() % 8 + 1) {
                    let i = (next() as usize) % d.len().max(1);
                    match next() % 4 {
                        0 if !d.is_empty() => d[i] = next() as u8,
                        1 if !d.is_empty() => {
                            d.remove(i);
                        }
                        2 => {
                            const TOKENS: &[u8] = b"{}[]\":,\\=&~%\n";
                            let t = TOKENS[(next() as usize) % TOKENS.len()];
                            d.insert(i.min(d.len()), t);
                        }
                        _ => d.truncate(i),
                    }
                }
                run_all(&d);
            }
        }
    }
}
