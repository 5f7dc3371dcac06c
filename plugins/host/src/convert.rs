//! Conversions between the canonical event and the WIT records: borrowed views to lower a
//! batch into a plugin without copying it first, owned results lifted out of it.

use beacon_proto::Event;

pub(crate) use crate::bindings::beacon::plugin::types::{EventParam, EventResult};

/// Borrowed key/value pairs of one event's properties.
pub(crate) fn pairs<'a>(
    props: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Vec<(&'a str, &'a str)> {
    props
        .into_iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// The WIT view of any event with the canonical fields (host or WIT-owned), borrowing its
/// strings: one field mapping for both.
macro_rules! event_param {
    ($e:expr, $props:expr) => {
        EventParam {
            event_id: &$e.event_id,
            merchant_id: &$e.merchant_id,
            name: &$e.name,
            ts: $e.ts,
            received_at: $e.received_at,
            url: $e.url.as_deref(),
            referrer: $e.referrer.as_deref(),
            title: $e.title.as_deref(),
            visitor_id: $e.visitor_id.as_deref(),
            session_id: $e.session_id.as_deref(),
            user_id: $e.user_id.as_deref(),
            revenue_micros: $e.revenue_micros,
            currency: $e.currency.as_deref(),
            properties: $props,
        }
    };
}

pub(crate) fn param<'a>(e: &'a Event, props: &'a [(&'a str, &'a str)]) -> EventParam<'a> {
    event_param!(e, props)
}

/// A previous plugin's output as the next one's input, without copying its strings.
pub(crate) fn reborrow<'a>(e: &'a EventResult, props: &'a [(&'a str, &'a str)]) -> EventParam<'a> {
    event_param!(e, props)
}

/// Bytes of an event's strings plus fixed fields, `per_property` more per property.
macro_rules! event_size {
    ($e:expr, $per_property:expr) => {
        64 + $e.event_id.len()
            + $e.merchant_id.len()
            + $e.name.len()
            + [
                &$e.url,
                &$e.referrer,
                &$e.title,
                &$e.visitor_id,
                &$e.session_id,
                &$e.user_id,
                &$e.currency,
            ]
            .into_iter()
            .map(|s| s.as_ref().map_or(0, |s| s.len()))
            .sum::<usize>()
            + $e.properties
                .iter()
                .map(|(k, v)| $per_property + k.len() + v.len())
                .sum::<usize>()
    };
}

/// Bytes of an input event as the guest sees them (strings plus fixed fields).
pub(crate) fn param_size(e: &EventParam) -> usize {
    event_size!(e, 16)
}

pub(crate) fn from_guest(e: EventResult) -> Event {
    Event {
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
        // Duplicate keys: the last one wins, deterministically.
        properties: e.properties.into_iter().collect(),
    }
}

pub(crate) fn approx_size(e: &EventResult) -> usize {
    event_size!(e, 0)
}
