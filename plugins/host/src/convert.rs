//! Conversions between the canonical event and what crosses the sandbox boundary: for record
//! plugins (1.0) the WIT records, borrowed to lower a batch without copying it first and owned
//! when lifted out; for batch plugins (1.1) the packed buffer and the changes applied back.

use beacon_plugin_abi::{Changes, Edit, Int, Origin, Str};
use beacon_proto::packed::encode;
use beacon_proto::Event;

use crate::PluginError;

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

/// What a property costs in host memory beyond its bytes (two `String`s and a map entry):
/// charged against the output cap, so many tiny properties cannot pass it at a small
/// fraction of what they take.
const PROPERTY_OVERHEAD: usize = 64;

pub(crate) fn approx_size(e: &EventResult) -> usize {
    event_size!(e, PROPERTY_OVERHEAD)
}

pub(crate) fn host_size(e: &Event) -> usize {
    event_size!(e, PROPERTY_OVERHEAD)
}

/// The events a batch plugin's changes refer to: borrowed (the chain's input, cloned when
/// kept) or owned (a previous plugin's output, moved when kept the last time).
pub(crate) enum Source<'a> {
    Borrowed(&'a [Event]),
    Owned(Vec<Option<Event>>),
}

impl Source<'_> {
    /// The packed batch buffer of these events.
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            Source::Borrowed(e) => encode(e.iter()),
            Source::Owned(e) => encode(
                e.iter()
                    .map(|e| e.as_ref().expect("every slot is full before changes apply")),
            ),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Source::Borrowed(e) => e.len(),
            Source::Owned(e) => e.len(),
        }
    }

    /// Input event `i`; `last` when no later record names it.
    fn get(&mut self, i: usize, last: bool) -> Event {
        match self {
            Source::Borrowed(e) => e[i].clone(),
            // Taken only by its last use (`Changes::uses` counts them), so still there.
            Source::Owned(e) if last => e[i].take().expect("an event taken before its last use"),
            Source::Owned(e) => e[i].clone().expect("an event taken before its last use"),
        }
    }
}

fn optional(e: &mut Event, f: Str) -> Option<&mut Option<String>> {
    Some(match f {
        Str::Url => &mut e.url,
        Str::Referrer => &mut e.referrer,
        Str::Title => &mut e.title,
        Str::VisitorId => &mut e.visitor_id,
        Str::SessionId => &mut e.session_id,
        Str::UserId => &mut e.user_id,
        Str::Currency => &mut e.currency,
        Str::EventId | Str::MerchantId | Str::Name => return None,
    })
}

fn set_str(e: &mut Event, f: Str, v: &str) {
    let field = match f {
        Str::EventId => &mut e.event_id,
        Str::MerchantId => &mut e.merchant_id,
        Str::Name => &mut e.name,
        // Reuses the field's buffer when it has one.
        f => match optional(e, f) {
            Some(o) => o.get_or_insert_with(String::new),
            None => return,
        },
    };
    field.clear();
    field.push_str(v);
}

/// Builds a batch plugin's output from its validated changes and the input they refer to,
/// failing once the output passes `max_bytes` (before building more of it).
pub(crate) fn apply(
    changes: &Changes,
    mut source: Source,
    max_bytes: usize,
) -> Result<Vec<Event>, PluginError> {
    let mut remaining: Vec<u32> = (0..source.len()).map(|i| changes.uses(i)).collect();
    let mut out = Vec::with_capacity(changes.len());
    let mut bytes = 0usize;
    for (origin, edits) in changes.records() {
        let mut e = match origin {
            Origin::New => Event::default(),
            Origin::Input(i) => {
                // In range: checked by `Changes::parse` against the input's length.
                let i = i as usize;
                remaining[i] -= 1;
                source.get(i, remaining[i] == 0)
            }
        };
        // What the record's properties add, checked as they come: one record can carry
        // millions of property edits, which must fail before they are all built.
        let mut adding = 0usize;
        for edit in edits {
            match edit {
                Edit::SetStr(f, v) => set_str(&mut e, f, v),
                Edit::ClearStr(f) => {
                    if let Some(o) = optional(&mut e, f) {
                        *o = None;
                    }
                }
                Edit::SetInt(Int::Ts, v) => e.ts = v,
                Edit::SetInt(Int::ReceivedAt, v) => e.received_at = v,
                Edit::SetInt(Int::RevenueMicros, v) => e.revenue_micros = Some(v),
                Edit::ClearInt(_) => e.revenue_micros = None,
                Edit::SetProperty(k, v) => {
                    adding = adding.saturating_add(PROPERTY_OVERHEAD + k.len() + v.len());
                    if bytes.saturating_add(adding) > max_bytes {
                        return Err(PluginError::OutputTooLarge {
                            what: "bytes",
                            actual: bytes.saturating_add(adding),
                            max: max_bytes,
                        });
                    }
                    match e.properties.get_mut(k) {
                        Some(old) => {
                            old.clear();
                            old.push_str(v);
                        }
                        None => {
                            e.properties.insert(k.to_string(), v.to_string());
                        }
                    }
                }
                Edit::RemoveProperty(k) => {
                    e.properties.remove(k);
                }
                Edit::ClearProperties => e.properties.clear(),
            }
        }
        bytes = bytes.saturating_add(host_size(&e));
        if bytes > max_bytes {
            return Err(PluginError::OutputTooLarge {
                what: "bytes",
                actual: bytes,
                max: max_bytes,
            });
        }
        out.push(e);
    }
    Ok(out)
}
