//! Conversions between the canonical event and the WIT record.

use beacon_proto::Event;

use crate::bindings::beacon::plugin::types::Event as GuestEvent;

pub(crate) fn to_guest(e: &Event) -> GuestEvent {
    GuestEvent {
        event_id: e.event_id.clone(),
        merchant_id: e.merchant_id.clone(),
        name: e.name.clone(),
        ts: e.ts,
        received_at: e.received_at,
        url: e.url.clone(),
        referrer: e.referrer.clone(),
        title: e.title.clone(),
        visitor_id: e.visitor_id.clone(),
        session_id: e.session_id.clone(),
        user_id: e.user_id.clone(),
        revenue_micros: e.revenue_micros,
        currency: e.currency.clone(),
        properties: e
            .properties
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

pub(crate) fn from_guest(e: GuestEvent) -> Event {
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

pub(crate) fn approx_size(e: &GuestEvent) -> usize {
    let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    64 + e.event_id.len()
        + e.merchant_id.len()
        + e.name.len()
        + opt(&e.url)
        + opt(&e.referrer)
        + opt(&e.title)
        + opt(&e.visitor_id)
        + opt(&e.session_id)
        + opt(&e.user_id)
        + opt(&e.currency)
        + e.properties
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}
