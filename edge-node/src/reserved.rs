//! The reserved-property policy: `$`-prefixed properties (`$country`, `$device`, `$bot`...)
//! are what the edge's enrichment records, and the rollups, bot filtering and breakdowns
//! trust them. A page or an app holds only the merchant's write key, which anyone can read,
//! so what such a client sends under a `$` name is moved out of the namespace (`$bot` ->
//! `bot`) before enrichment; only a sender with the merchant's server key may set them
//! (already-enriched imports, relays that looked the visitor up themselves).
//!
//! Every listener applies it on the one ingest path ([`crate::process::Processor::ingest`]);
//! the HTTP decoders also never emit `$` names, so for them this is a second line.

use std::collections::BTreeMap;
use std::net::IpAddr;

use beacon_proto::event::{RELAYED_IP, RELAYED_USER_AGENT};
use beacon_proto::Event;

/// Who sent a batch, as its listener authenticated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// Pages, apps and third-party trackers (write keys, tracker identities).
    Client,
    /// The merchant's own servers (the server key): `$` properties are kept as sent.
    Server,
}

/// Applies the policy to one event; the number of properties moved out of the namespace.
/// A moved property does not replace one the client also sent under the plain name.
pub fn apply(event: &mut Event, trust: Trust) -> usize {
    if trust == Trust::Server || !event.properties.keys().any(|k| k.starts_with('$')) {
        return 0;
    }
    let props = std::mem::take(&mut event.properties);
    let (reserved, mut kept): (BTreeMap<_, _>, BTreeMap<_, _>) =
        props.into_iter().partition(|(k, _)| k.starts_with('$'));
    let moved = reserved.len();
    for (k, v) in reserved {
        let plain = k.trim_start_matches('$');
        if !plain.is_empty() && !kept.contains_key(plain) {
            kept.insert(plain.to_string(), v);
        }
    }
    event.properties = kept;
    moved
}

/// What a server-key sender said about the end user of one event it relays:
/// [`RELAYED_IP`] and [`RELAYED_USER_AGENT`], taken out of its properties. An address that
/// does not parse stays in place, and validation refuses the event with the reason.
pub fn take_relayed(event: &mut Event) -> (Option<IpAddr>, Option<String>) {
    let ip = match event.properties.get(RELAYED_IP).map(|v| v.trim().parse()) {
        Some(Ok(ip)) => {
            event.properties.remove(RELAYED_IP);
            Some(ip)
        }
        _ => None,
    };
    (ip, event.properties.remove(RELAYED_USER_AGENT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(props: &[(&str, &str)]) -> Event {
        Event {
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn keys(e: &Event) -> Vec<(&str, &str)> {
        e.properties
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn a_relay_gives_each_event_its_user() {
        let mut e = event(&[
            ("$ip", " 2001:db8::7 "),
            ("$user_agent", "Mozilla/5.0"),
            ("plan", "pro"),
        ]);
        let (ip, ua) = take_relayed(&mut e);
        assert_eq!(ip, Some("2001:db8::7".parse().unwrap()));
        assert_eq!(ua.as_deref(), Some("Mozilla/5.0"));
        assert_eq!(keys(&e), vec![("plan", "pro")]);
        // Not an address: left for validation to refuse.
        let mut bad = event(&[("$ip", "somewhere")]);
        assert_eq!(take_relayed(&mut bad), (None, None));
        assert_eq!(keys(&bad), vec![("$ip", "somewhere")]);
        bad.event_id = "e".into();
        bad.name = "pageview".into();
        bad.ts = 1_700_000_000_000;
        assert_eq!(
            bad.validate(&beacon_proto::event::Limits::default(), bad.ts)
                .map_err(|e| e.to_string()),
            Err("property `$ip` is `somewhere`, not an IP address".to_string())
        );
    }

    #[test]
    fn clients_cannot_set_reserved_properties() {
        let mut e = event(&[
            ("$bot", "no"),
            ("$country", "XX"),
            ("country", "mine"),
            ("$$", "x"),
            ("plan", "pro"),
        ]);
        assert_eq!(apply(&mut e, Trust::Client), 3);
        assert_eq!(
            keys(&e),
            vec![("bot", "no"), ("country", "mine"), ("plan", "pro")]
        );
        assert!(e.properties.keys().all(|k| !k.starts_with('$')));
    }

    #[test]
    fn servers_keep_them_and_clean_events_are_untouched() {
        let mut e = event(&[("$country", "DE"), ("plan", "pro")]);
        assert_eq!(apply(&mut e, Trust::Server), 0);
        assert_eq!(keys(&e), vec![("$country", "DE"), ("plan", "pro")]);
        let mut clean = event(&[("plan", "pro")]);
        assert_eq!(apply(&mut clean, Trust::Client), 0);
        assert_eq!(keys(&clean), vec![("plan", "pro")]);
    }
}
