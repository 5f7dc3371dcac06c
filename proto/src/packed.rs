//! Canonical events in the packed batch layout of `beacon-plugin-abi` (documented there):
//! what a batch plugin reads, and how an envelope carries its events on the bus. One layout
//! for both, so the edge encodes a batch once per use and never as JSON text.

use std::collections::{BTreeMap, HashMap};

pub use beacon_plugin_abi::AbiError;
use beacon_plugin_abi::{Encoder, EventFields, Input, Int, Str};

use crate::Event;

/// Bytes per event the encoder reserves for strings before it grows.
const STRING_BYTES_PER_EVENT: usize = 256;

/// The packed buffer of `events`.
pub fn encode<'a>(events: impl ExactSizeIterator<Item = &'a Event>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(events, &mut out);
    out
}

/// Appends the packed buffer of `events` to `out`.
pub fn encode_into<'a>(events: impl ExactSizeIterator<Item = &'a Event>, out: &mut Vec<u8>) {
    let mut enc = Encoder::with_capacity(events.len(), STRING_BYTES_PER_EVENT);
    for e in events {
        enc.push(fields(e));
    }
    enc.finish_into(out)
}

/// Appends one packed buffer holding `raw`, then every event of `derived` in order (what
/// plugins made of `raw`): a derived event references the strings and properties it shares
/// with the raw event of the same `event_id` instead of repeating them, so the processed
/// copy of a batch costs little more than what the plugins changed.
pub fn encode_derived_into(raw: &[Event], derived: &[&[Event]], out: &mut Vec<u8>) {
    let total = raw.len() + derived.iter().map(|d| d.len()).sum::<usize>();
    let mut enc = Encoder::with_capacity(total, STRING_BYTES_PER_EVENT);
    for e in raw {
        enc.push(fields(e));
    }
    if derived.iter().any(|d| !d.is_empty()) {
        let mut by_id: HashMap<&str, usize> = HashMap::with_capacity(raw.len());
        for (i, e) in raw.iter().enumerate() {
            by_id.entry(e.event_id.as_str()).or_insert(i);
        }
        for part in derived {
            for (j, e) in part.iter().enumerate() {
                // Usually the same position (plugins mostly keep order); else by id.
                let like = match raw.get(j) {
                    Some(r) if r.event_id == e.event_id => Some(j),
                    _ => by_id.get(e.event_id.as_str()).copied(),
                };
                match like {
                    Some(i) => enc.push_like(fields(e), i),
                    None => enc.push(fields(e)),
                }
            }
        }
    }
    enc.finish_into(out)
}

fn fields(e: &Event) -> EventFields<'_, impl Iterator<Item = (&str, &str)> + Clone> {
    EventFields {
        strs: [
            Some(e.event_id.as_str()),
            Some(e.merchant_id.as_str()),
            Some(e.name.as_str()),
            e.url.as_deref(),
            e.referrer.as_deref(),
            e.title.as_deref(),
            e.visitor_id.as_deref(),
            e.session_id.as_deref(),
            e.user_id.as_deref(),
            e.currency.as_deref(),
        ],
        ts: e.ts,
        received_at: e.received_at,
        revenue_micros: e.revenue_micros,
        properties: e.properties.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    }
}

/// The events of a packed buffer that may come from anywhere: every reference is checked
/// first, so a malformed buffer is an error, never a panic. Its references may name no more
/// string bytes than the buffer holds (no shared strings: a client's batch), so decoding
/// allocates about the buffer's size.
pub fn decode(buf: &[u8]) -> Result<Vec<Event>, AbiError> {
    decode_within(buf, buf.len() as u64)
}

/// [`decode`] for buffers whose events may share strings ([`encode_derived_into`]), naming
/// at most `max_string_bytes` of them in all: what decoding may allocate for strings.
pub fn decode_within(buf: &[u8], max_string_bytes: u64) -> Result<Vec<Event>, AbiError> {
    let input = Input::open(buf)?;
    input.validate(max_string_bytes)?;
    let text = |i, f| input.str(i, f).map(str::to_owned);
    Ok((0..input.len())
        .map(|i| Event {
            event_id: text(i, Str::EventId).unwrap_or_default(),
            merchant_id: text(i, Str::MerchantId).unwrap_or_default(),
            name: text(i, Str::Name).unwrap_or_default(),
            ts: input.int(i, Int::Ts).unwrap_or_default(),
            received_at: input.int(i, Int::ReceivedAt).unwrap_or_default(),
            url: text(i, Str::Url),
            referrer: text(i, Str::Referrer),
            title: text(i, Str::Title),
            visitor_id: text(i, Str::VisitorId),
            session_id: text(i, Str::SessionId),
            user_id: text(i, Str::UserId),
            revenue_micros: input.int(i, Int::RevenueMicros),
            currency: text(i, Str::Currency),
            properties: input
                .properties(i)
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect::<BTreeMap<_, _>>(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        let events = vec![
            Event {
                event_id: "e1".into(),
                merchant_id: "m".into(),
                name: "pageview".into(),
                ts: -3,
                received_at: 9,
                url: Some("https://shop.example/é?q=\"x\"".into()),
                referrer: Some(String::new()),
                revenue_micros: Some(0),
                currency: Some("EUR".into()),
                properties: [("b", "2"), ("a", "")]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                ..Default::default()
            },
            Event::default(),
        ];
        assert_eq!(decode(&encode(events.iter())).unwrap(), events);
        assert_eq!(decode(&encode([].iter())).unwrap(), Vec::<Event>::new());
        assert!(decode(b"BPB1").is_err());
    }

    #[test]
    fn derived_events_share_the_raw_strings() {
        let raw: Vec<Event> = (0..3)
            .map(|i| Event {
                event_id: format!("e{i}"),
                merchant_id: "m".into(),
                name: "pageview".into(),
                url: Some(format!("https://shop.example/p/{i}?utm_source=news")),
                properties: [("k".to_owned(), "v".repeat(50))].into(),
                ..Default::default()
            })
            .collect();
        // A plugin's output: reordered, one dropped, one changed, one new.
        let mut processed = vec![raw[2].clone(), raw[0].clone()];
        processed[1].url = Some("https://shop.example/p/0".into());
        processed[1]
            .properties
            .insert("utm_source".into(), "news".into());
        processed.push(Event {
            event_id: "new".into(),
            ..Default::default()
        });
        let (mut shared, mut copied) = (Vec::new(), Vec::new());
        encode_derived_into(&raw, &[&processed], &mut shared);
        let both: Vec<&Event> = raw.iter().chain(&processed).collect();
        encode_into(both.into_iter(), &mut copied);
        let all = decode_within(&shared, u64::MAX).unwrap();
        assert_eq!(all, decode(&copied).unwrap());
        assert_eq!(all[..3], raw[..]);
        assert_eq!(all[3..], processed[..]);
        // The two kept events' ids, names, merchant and properties are not repeated; the
        // first one's url is not either.
        assert!(shared.len() + 2 * (2 + 1 + 8 + 1 + 50) + 38 <= copied.len());
    }
}
