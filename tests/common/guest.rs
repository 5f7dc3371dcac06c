//! The guest SDK's owned event and the host's canonical event, field by field: to run the
//! example plugins natively next to their components (equality tests, the plugin bench).

use beacon_plugin_sdk::Event as GuestEvent;
use beacon_proto::Event;

pub fn to_guest(e: &Event) -> GuestEvent {
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

pub fn from_guest(e: GuestEvent) -> Event {
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
        properties: e.properties.into_iter().collect(),
    }
}
