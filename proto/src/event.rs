//! The canonical event: what every collector maps its protocol into, what plugins see,
//! and what lands (one row per event) in the `raw_events` and `events` tables.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One user interaction. Field names are the stable, documented column names.
///
/// `merchant_id` and `received_at` are set by the edge from the authenticated connection and
/// its own clock; whatever a client sends there is overwritten.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Client-generated unique id (a UUID is recommended); retries reuse it.
    pub event_id: String,
    #[serde(default)]
    pub merchant_id: String,
    /// `pageview` for page views; anything else is a custom event.
    pub name: String,
    /// When the event happened, client clock, epoch milliseconds.
    pub ts: i64,
    /// When the edge received it, edge clock, epoch milliseconds.
    #[serde(default)]
    pub received_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referrer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visitor_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Revenue in millionths of `currency`'s unit: integers keep sums exact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revenue_micros: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

pub const PAGEVIEW: &str = "pageview";

/// Size limits the edge enforces on every event. Defaults are generous for real trackers
/// and small enough that one event can never dominate a batch.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_id_len: usize,
    pub max_name_len: usize,
    pub max_url_len: usize,
    pub max_text_len: usize,
    pub max_properties: usize,
    pub max_property_key_len: usize,
    pub max_property_value_len: usize,
    /// Events further than this in the future (by the edge clock) are refused.
    pub max_future_skew_ms: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_id_len: 128,
            max_name_len: 128,
            max_url_len: 8192,
            max_text_len: 2048,
            max_properties: 64,
            max_property_key_len: 128,
            max_property_value_len: 4096,
            max_future_skew_ms: 24 * 3600 * 1000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("event_id is empty")]
    EmptyId,
    #[error("name is empty")]
    EmptyName,
    #[error("field `{field}` is {len} bytes, over the limit of {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{count} properties, over the limit of {max}")]
    TooManyProperties { count: usize, max: usize },
    #[error("ts {ts} is {skew_ms} ms ahead of the edge clock (limit {max_ms} ms)")]
    FromTheFuture { ts: i64, skew_ms: i64, max_ms: i64 },
    #[error("ts {0} is not a plausible epoch-milliseconds timestamp")]
    BadTimestamp(i64),
    #[error("revenue_micros is set without a currency")]
    RevenueWithoutCurrency,
    #[error("property `{RELAYED_IP}` is `{0}`, not an IP address")]
    BadRelayedIp(String),
}

/// The end user's address, set per event by a relay that holds the merchant's server key
/// (for geo and the cookieless id). The edge takes a valid one out of the event (addresses
/// are never stored); one still present at validation was not an address.
pub const RELAYED_IP: &str = "$ip";

/// The end user's user agent, set per event by such a relay (for device, browser, OS and
/// bot detection); taken out of the event like `$ip`.
pub const RELAYED_USER_AGENT: &str = "$user_agent";

impl Event {
    /// Checks the event against `limits`, given the edge's clock `now_ms`.
    pub fn validate(&self, limits: &Limits, now_ms: i64) -> Result<(), ValidationError> {
        fn check(field: &'static str, v: &str, max: usize) -> Result<(), ValidationError> {
            if v.len() > max {
                return Err(ValidationError::TooLong {
                    field,
                    len: v.len(),
                    max,
                });
            }
            Ok(())
        }
        fn check_opt(
            field: &'static str,
            v: &Option<String>,
            max: usize,
        ) -> Result<(), ValidationError> {
            v.as_deref().map_or(Ok(()), |v| check(field, v, max))
        }
        if self.event_id.is_empty() {
            return Err(ValidationError::EmptyId);
        }
        if self.name.is_empty() {
            return Err(ValidationError::EmptyName);
        }
        check("event_id", &self.event_id, limits.max_id_len)?;
        check("name", &self.name, limits.max_name_len)?;
        check_opt("url", &self.url, limits.max_url_len)?;
        check_opt("referrer", &self.referrer, limits.max_url_len)?;
        check_opt("title", &self.title, limits.max_text_len)?;
        check_opt("visitor_id", &self.visitor_id, limits.max_id_len)?;
        check_opt("session_id", &self.session_id, limits.max_id_len)?;
        check_opt("user_id", &self.user_id, limits.max_id_len)?;
        check_opt("currency", &self.currency, 8)?;
        if self.properties.len() > limits.max_properties {
            return Err(ValidationError::TooManyProperties {
                count: self.properties.len(),
                max: limits.max_properties,
            });
        }
        for (k, v) in &self.properties {
            check("properties key", k, limits.max_property_key_len)?;
            check("properties value", v, limits.max_property_value_len)?;
        }
        // 2001-09-09 .. 2286: anything outside is seconds or microseconds sent by mistake.
        if !(1_000_000_000_000..10_000_000_000_000).contains(&self.ts) {
            return Err(ValidationError::BadTimestamp(self.ts));
        }
        let skew = self.ts - now_ms;
        if skew > limits.max_future_skew_ms {
            return Err(ValidationError::FromTheFuture {
                ts: self.ts,
                skew_ms: skew,
                max_ms: limits.max_future_skew_ms,
            });
        }
        if self.revenue_micros.is_some() && self.currency.is_none() {
            return Err(ValidationError::RevenueWithoutCurrency);
        }
        if let Some(ip) = self.properties.get(RELAYED_IP) {
            return Err(ValidationError::BadRelayedIp(ip.chars().take(64).collect()));
        }
        Ok(())
    }

    /// Converts a decimal amount (as trackers send it) into exact micros.
    pub fn micros_from_amount(amount: f64) -> Option<i64> {
        let m = (amount * 1_000_000.0).round();
        (m.is_finite() && m.abs() < 9.0e18).then_some(m as i64)
    }
}

/// The body of a batch sent over RSocket (REQUEST_FNF or REQUEST_RESPONSE data), JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchRequest {
    pub events: Vec<Event>,
}

/// The edge's answer to an acknowledged batch: sent only once the batch is durable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchResponse {
    pub batch_id: String,
    /// Events stored (in `raw_events`, and in `events` unless a plugin failed).
    pub accepted: usize,
    /// Events that failed validation: stored in `failed_events`, listed here.
    pub rejected: Vec<RejectedEvent>,
    /// Set when the merchant's plugin chain failed on this batch: the events are stored in
    /// `raw_events` and held in `failed_events` (with this reason) for re-processing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectedEvent {
    pub index: usize,
    pub event_id: String,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> Event {
        Event {
            event_id: "e1".into(),
            merchant_id: String::new(),
            name: PAGEVIEW.into(),
            ts: 1_790_000_000_000,
            received_at: 0,
            url: Some("https://shop.example/".into()),
            referrer: None,
            title: None,
            visitor_id: Some("v".into()),
            session_id: None,
            user_id: None,
            revenue_micros: None,
            currency: None,
            properties: BTreeMap::new(),
        }
    }

    #[test]
    fn valid_event_passes() {
        assert_eq!(ev().validate(&Limits::default(), 1_790_000_000_000), Ok(()));
    }

    #[test]
    fn limits_are_enforced() {
        let l = Limits::default();
        let now = 1_790_000_000_000;
        let mut e = ev();
        e.url = Some("x".repeat(l.max_url_len + 1));
        assert!(matches!(
            e.validate(&l, now),
            Err(ValidationError::TooLong { field: "url", .. })
        ));
        let mut e = ev();
        e.ts = 1_790_000_000; // seconds by mistake
        assert_eq!(
            e.validate(&l, now),
            Err(ValidationError::BadTimestamp(e.ts))
        );
        let mut e = ev();
        e.ts = now + l.max_future_skew_ms + 1;
        assert!(matches!(
            e.validate(&l, now),
            Err(ValidationError::FromTheFuture { .. })
        ));
        let mut e = ev();
        e.revenue_micros = Some(1);
        assert_eq!(
            e.validate(&l, now),
            Err(ValidationError::RevenueWithoutCurrency)
        );
        let mut e = ev();
        e.event_id.clear();
        assert_eq!(e.validate(&l, now), Err(ValidationError::EmptyId));
    }

    #[test]
    fn micros_are_exact_for_cents() {
        assert_eq!(Event::micros_from_amount(19.99), Some(19_990_000));
        assert_eq!(Event::micros_from_amount(f64::NAN), None);
    }
}
