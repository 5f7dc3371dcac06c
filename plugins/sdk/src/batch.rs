//! Batch plugins (contract 1.1, world `batch-processor`): the batch arrives as one packed
//! buffer and the plugin reads it through a lazy view. Reading a field borrows it from the
//! buffer; setting one, dropping an event or adding one records a change; only the changes go
//! back to the host. Plugin code stays as short as with owned events:
//!
//! ```ignore
//! use beacon_plugin_sdk::batch::Batch;
//! use beacon_plugin_sdk::PluginError;
//!
//! pub fn process(config: &str, batch: &mut Batch) -> Result<(), PluginError> {
//!     for mut e in batch.events_mut() {
//!         if e.name() == "pageview" && e.url_path() == Some("/thanks") {
//!             e.set_property("goal", "thanks");
//!         }
//!     }
//!     Ok(())
//! }
//!
//! beacon_plugin_sdk::export_batch_plugin!(process);
//! ```
//!
//! [`run`] calls such a function natively on owned events (tests, benchmarks, `native-check`),
//! through the same encoding the host uses.

use beacon_plugin_abi::{Changes, Edit, EventFields, Input, Int, Origin, Str, Writer};

use crate::{url, Event, EventExt, PluginError};

/// The signature of a batch plugin's processing function, as taken by
/// [`export_batch_plugin!`](crate::export_batch_plugin).
pub type BatchFn = fn(&str, &mut Batch) -> Result<(), PluginError>;

/// Fields set on an input event, by the plugin, since the batch arrived.
#[derive(Default, Debug)]
struct Edits {
    strs: Vec<(Str, Option<String>)>,
    ints: Vec<(Int, Option<i64>)>,
    /// `None`: removed. After `props_cleared`, only these exist.
    props: Vec<(String, Option<String>)>,
    props_cleared: bool,
}

#[derive(Debug)]
enum Slot {
    Input { index: u32, edits: Edits },
    New(Box<Event>),
    Dropped,
}

/// One batch: the input events (read lazily from the host's buffer) as changed so far.
pub struct Batch<'a> {
    input: Input<'a>,
    slots: Vec<Slot>,
}

impl<'a> Batch<'a> {
    /// Opens a batch buffer (validated once; reading fields afterwards cannot fail).
    pub fn open(buf: &'a [u8]) -> Result<Self, PluginError> {
        let input = Input::open(buf)
            .map_err(|e| PluginError::new(format!("malformed batch from the host: {e}")))?;
        let slots = (0..input.len() as u32)
            .map(|index| Slot::Input {
                index,
                edits: Edits::default(),
            })
            .collect();
        Ok(Self { input, slots })
    }

    /// The number of events the batch holds now (dropped ones not counted).
    pub fn len(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| !matches!(s, Slot::Dropped))
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The events, in order.
    pub fn events(&self) -> impl Iterator<Item = EventRef<'_>> {
        let input = self.input;
        self.slots
            .iter()
            .filter(|s| !matches!(s, Slot::Dropped))
            .map(move |slot| EventRef { input, slot })
    }

    /// The events, in order, to read and change.
    pub fn events_mut(&mut self) -> impl Iterator<Item = EventMut<'_>> {
        let input = self.input;
        self.slots
            .iter_mut()
            .filter(|s| !matches!(s, Slot::Dropped))
            .map(move |slot| EventMut { input, slot })
    }

    /// Keeps only the events for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&EventRef<'_>) -> bool) {
        let input = self.input;
        for slot in &mut self.slots {
            if !matches!(slot, Slot::Dropped) && !keep(&EventRef { input, slot }) {
                *slot = Slot::Dropped;
            }
        }
    }

    /// Appends a new event (derive its id deterministically, e.g. `<id>.<n>`).
    pub fn push(&mut self, event: Event) {
        self.slots.push(Slot::New(Box::new(event)));
    }

    /// The changes buffer for the host.
    pub fn into_changes(self) -> Vec<u8> {
        let mut w = Writer::new();
        for slot in &self.slots {
            match slot {
                Slot::Dropped => {}
                Slot::Input { index, edits } => {
                    w.record(Origin::Input(*index));
                    if edits.props_cleared {
                        w.edit(Edit::ClearProperties);
                    }
                    for (f, v) in &edits.strs {
                        w.edit(match v {
                            Some(v) => Edit::SetStr(*f, v),
                            None => Edit::ClearStr(*f),
                        });
                    }
                    for (f, v) in &edits.ints {
                        w.edit(match v {
                            Some(v) => Edit::SetInt(*f, *v),
                            None => Edit::ClearInt(*f),
                        });
                    }
                    for (k, v) in &edits.props {
                        w.edit(match v {
                            Some(v) => Edit::SetProperty(k, v),
                            None => Edit::RemoveProperty(k),
                        });
                    }
                }
                Slot::New(e) => {
                    w.record(Origin::New);
                    for (f, v) in Str::ALL.into_iter().zip(strs(e)) {
                        if let Some(v) = v {
                            w.edit(Edit::SetStr(f, v));
                        }
                    }
                    w.edit(Edit::SetInt(Int::Ts, e.ts));
                    w.edit(Edit::SetInt(Int::ReceivedAt, e.received_at));
                    if let Some(r) = e.revenue_micros {
                        w.edit(Edit::SetInt(Int::RevenueMicros, r));
                    }
                    for (k, v) in &e.properties {
                        w.edit(Edit::SetProperty(k, v));
                    }
                }
            }
        }
        w.finish()
    }
}

/// An owned event's string fields in [`Str`] order.
fn strs(e: &Event) -> [Option<&str>; 10] {
    [
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
    ]
}

fn str_mut(e: &mut Event, f: Str) -> &mut Option<String> {
    match f {
        Str::Url => &mut e.url,
        Str::Referrer => &mut e.referrer,
        Str::Title => &mut e.title,
        Str::VisitorId => &mut e.visitor_id,
        Str::SessionId => &mut e.session_id,
        Str::UserId => &mut e.user_id,
        Str::Currency => &mut e.currency,
        // Required fields are set through `set_required`.
        Str::EventId | Str::MerchantId | Str::Name => unreachable!("a required field"),
    }
}

fn set_str(e: &mut Event, f: Str, v: Option<String>) {
    match (f, v) {
        (Str::EventId, v) => e.event_id = v.unwrap_or_default(),
        (Str::MerchantId, v) => e.merchant_id = v.unwrap_or_default(),
        (Str::Name, v) => e.name = v.unwrap_or_default(),
        (f, v) => *str_mut(e, f) = v,
    }
}

fn set_int(e: &mut Event, f: Int, v: Option<i64>) {
    match f {
        Int::Ts => e.ts = v.unwrap_or_default(),
        Int::ReceivedAt => e.received_at = v.unwrap_or_default(),
        Int::RevenueMicros => e.revenue_micros = v,
    }
}

/// A read-only view of one event of a [`Batch`].
#[derive(Clone, Copy)]
pub struct EventRef<'b> {
    input: Input<'b>,
    slot: &'b Slot,
}

impl<'b> EventRef<'b> {
    fn str(&self, f: Str) -> Option<&'b str> {
        match self.slot {
            Slot::Input { index, edits } => match edits.strs.iter().find(|(g, _)| *g == f) {
                Some((_, v)) => v.as_deref(),
                None => self.input.str(*index as usize, f),
            },
            Slot::New(e) => strs(e)[f as usize],
            Slot::Dropped => None,
        }
    }

    fn int(&self, f: Int) -> Option<i64> {
        match self.slot {
            Slot::Input { index, edits } => match edits.ints.iter().find(|(g, _)| *g == f) {
                Some((_, v)) => *v,
                None => self.input.int(*index as usize, f),
            },
            Slot::New(e) => match f {
                Int::Ts => Some(e.ts),
                Int::ReceivedAt => Some(e.received_at),
                Int::RevenueMicros => e.revenue_micros,
            },
            Slot::Dropped => None,
        }
    }

    pub fn event_id(&self) -> &'b str {
        self.str(Str::EventId).unwrap_or_default()
    }
    pub fn merchant_id(&self) -> &'b str {
        self.str(Str::MerchantId).unwrap_or_default()
    }
    pub fn name(&self) -> &'b str {
        self.str(Str::Name).unwrap_or_default()
    }
    pub fn ts(&self) -> i64 {
        self.int(Int::Ts).unwrap_or_default()
    }
    pub fn received_at(&self) -> i64 {
        self.int(Int::ReceivedAt).unwrap_or_default()
    }
    pub fn url(&self) -> Option<&'b str> {
        self.str(Str::Url)
    }
    pub fn referrer(&self) -> Option<&'b str> {
        self.str(Str::Referrer)
    }
    pub fn title(&self) -> Option<&'b str> {
        self.str(Str::Title)
    }
    pub fn visitor_id(&self) -> Option<&'b str> {
        self.str(Str::VisitorId)
    }
    pub fn session_id(&self) -> Option<&'b str> {
        self.str(Str::SessionId)
    }
    pub fn user_id(&self) -> Option<&'b str> {
        self.str(Str::UserId)
    }
    pub fn revenue_micros(&self) -> Option<i64> {
        self.int(Int::RevenueMicros)
    }
    pub fn currency(&self) -> Option<&'b str> {
        self.str(Str::Currency)
    }

    /// The value of property `key`.
    pub fn property(&self, key: &str) -> Option<&'b str> {
        match self.slot {
            Slot::Input { index, edits } => match edits.props.iter().find(|(k, _)| k == key) {
                Some((_, v)) => v.as_deref(),
                None if edits.props_cleared => None,
                None => self.input.property(*index as usize, key),
            },
            Slot::New(e) => e.property(key),
            Slot::Dropped => None,
        }
    }

    pub fn has_property(&self, key: &str) -> bool {
        self.property(key).is_some()
    }

    /// Every property (each key once), in no particular order.
    pub fn properties(&self) -> Vec<(&'b str, &'b str)> {
        match self.slot {
            Slot::Input { index, edits } => {
                let mut out: Vec<(&str, &str)> = Vec::new();
                if !edits.props_cleared {
                    out.extend(
                        self.input
                            .properties(*index as usize)
                            .filter(|(k, _)| !edits.props.iter().any(|(e, _)| e == k)),
                    );
                }
                out.extend(
                    edits
                        .props
                        .iter()
                        .filter_map(|(k, v)| Some((k.as_str(), v.as_deref()?))),
                );
                out
            }
            Slot::New(e) => {
                let mut out: Vec<(&str, &str)> = Vec::new();
                for (k, v) in e.properties.iter().rev() {
                    if !out.iter().any(|(o, _)| o == k) {
                        out.push((k, v));
                    }
                }
                out
            }
            Slot::Dropped => Vec::new(),
        }
    }

    /// The path of `url` (no query or fragment; `/` for `https://host`), if there is a URL.
    pub fn url_path(&self) -> Option<&'b str> {
        self.url().map(url::path)
    }

    /// The host of `url` (no user info or port), if any. Not lower-cased.
    pub fn url_host(&self) -> Option<&'b str> {
        self.url().and_then(url::host)
    }

    /// The first value of query parameter `name` in `url`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.url().and_then(|u| url::query_param(u, name))
    }

    /// The event as an owned [`Event`] (copies every field): to split it or add a variant.
    pub fn to_event(&self) -> Event {
        let s = |f| self.str(f).map(str::to_string);
        let mut props: Vec<(String, String)> = self
            .properties()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        props.sort();
        Event {
            event_id: self.event_id().to_string(),
            merchant_id: self.merchant_id().to_string(),
            name: self.name().to_string(),
            ts: self.ts(),
            received_at: self.received_at(),
            url: s(Str::Url),
            referrer: s(Str::Referrer),
            title: s(Str::Title),
            visitor_id: s(Str::VisitorId),
            session_id: s(Str::SessionId),
            user_id: s(Str::UserId),
            revenue_micros: self.revenue_micros(),
            currency: s(Str::Currency),
            properties: props,
        }
    }
}

/// One event of a [`Batch`], to read and change. Reads see earlier changes.
pub struct EventMut<'b> {
    input: Input<'b>,
    slot: &'b mut Slot,
}

macro_rules! getters {
    ($($name:ident -> $ty:ty),* $(,)?) => {
        $(
            #[doc = concat!("See [`EventRef::", stringify!($name), "`].")]
            pub fn $name(&self) -> $ty {
                self.get().$name()
            }
        )*
    };
}

impl EventMut<'_> {
    /// A read-only view (what every getter reads through).
    pub fn get(&self) -> EventRef<'_> {
        EventRef {
            input: self.input,
            slot: self.slot,
        }
    }

    getters!(
        event_id -> &str, merchant_id -> &str, name -> &str, ts -> i64, received_at -> i64,
        url -> Option<&str>, referrer -> Option<&str>, title -> Option<&str>,
        visitor_id -> Option<&str>, session_id -> Option<&str>, user_id -> Option<&str>,
        revenue_micros -> Option<i64>, currency -> Option<&str>, url_path -> Option<&str>,
        url_host -> Option<&str>, properties -> Vec<(&str, &str)>, to_event -> Event,
    );

    pub fn property(&self, key: &str) -> Option<&str> {
        self.get().property(key)
    }

    pub fn has_property(&self, key: &str) -> bool {
        self.get().has_property(key)
    }

    pub fn query_param(&self, name: &str) -> Option<String> {
        self.get().query_param(name)
    }

    fn set_str(&mut self, f: Str, v: Option<String>) {
        match self.slot {
            Slot::Input { edits, .. } => match edits.strs.iter_mut().find(|(g, _)| *g == f) {
                Some(e) => e.1 = v,
                None => edits.strs.push((f, v)),
            },
            Slot::New(e) => set_str(e, f, v),
            Slot::Dropped => {}
        }
    }

    fn set_int(&mut self, f: Int, v: Option<i64>) {
        match self.slot {
            Slot::Input { edits, .. } => match edits.ints.iter_mut().find(|(g, _)| *g == f) {
                Some(e) => e.1 = v,
                None => edits.ints.push((f, v)),
            },
            Slot::New(e) => set_int(e, f, v),
            Slot::Dropped => {}
        }
    }

    pub fn set_event_id(&mut self, v: impl Into<String>) {
        self.set_str(Str::EventId, Some(v.into()))
    }
    pub fn set_name(&mut self, v: impl Into<String>) {
        self.set_str(Str::Name, Some(v.into()))
    }
    pub fn set_ts(&mut self, v: i64) {
        self.set_int(Int::Ts, Some(v))
    }
    pub fn set_received_at(&mut self, v: i64) {
        self.set_int(Int::ReceivedAt, Some(v))
    }
    pub fn set_url(&mut self, v: Option<String>) {
        self.set_str(Str::Url, v)
    }
    pub fn set_referrer(&mut self, v: Option<String>) {
        self.set_str(Str::Referrer, v)
    }
    pub fn set_title(&mut self, v: Option<String>) {
        self.set_str(Str::Title, v)
    }
    pub fn set_visitor_id(&mut self, v: Option<String>) {
        self.set_str(Str::VisitorId, v)
    }
    pub fn set_session_id(&mut self, v: Option<String>) {
        self.set_str(Str::SessionId, v)
    }
    pub fn set_user_id(&mut self, v: Option<String>) {
        self.set_str(Str::UserId, v)
    }
    pub fn set_revenue_micros(&mut self, v: Option<i64>) {
        self.set_int(Int::RevenueMicros, v)
    }
    pub fn set_currency(&mut self, v: Option<String>) {
        self.set_str(Str::Currency, v)
    }

    /// Sets property `key` to `value`, replacing any existing value.
    pub fn set_property(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let (key, value) = (key.into(), value.into());
        match self.slot {
            Slot::Input { edits, .. } => match edits.props.iter_mut().find(|(k, _)| *k == key) {
                Some(e) => e.1 = Some(value),
                None => edits.props.push((key, Some(value))),
            },
            Slot::New(e) => {
                e.set_property(key, value);
            }
            Slot::Dropped => {}
        }
    }

    /// Sets property `key` only if it is absent; returns whether it was set.
    pub fn set_property_if_absent(
        &mut self,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> bool {
        let key = key.into();
        if self.has_property(&key) {
            return false;
        }
        self.set_property(key, value);
        true
    }

    /// Removes property `key`; returns whether it was there.
    pub fn remove_property(&mut self, key: &str) -> bool {
        let had = self.has_property(key);
        match self.slot {
            Slot::Input { edits, .. } if had => {
                match edits.props.iter_mut().find(|(k, _)| k == key) {
                    Some(e) => e.1 = None,
                    None => edits.props.push((key.to_string(), None)),
                }
            }
            Slot::New(e) => {
                e.remove_property(key);
            }
            _ => {}
        }
        had
    }

    /// Keeps only the properties for which `keep(key, value)` is true.
    pub fn retain_properties(&mut self, mut keep: impl FnMut(&str, &str) -> bool) {
        let gone: Vec<String> = self
            .properties()
            .into_iter()
            .filter(|(k, v)| !keep(k, v))
            .map(|(k, _)| k.to_string())
            .collect();
        for k in gone {
            self.remove_property(&k);
        }
    }

    /// Removes every property.
    pub fn clear_properties(&mut self) {
        match self.slot {
            Slot::Input { edits, .. } => {
                edits.props.clear();
                edits.props_cleared = true;
            }
            Slot::New(e) => e.properties.clear(),
            Slot::Dropped => {}
        }
    }

    /// Drops the event from the batch.
    pub fn discard(self) {
        *self.slot = Slot::Dropped;
    }
}

/// The component export's body: open, process, write the changes.
#[doc(hidden)]
pub fn serve(process: BatchFn, config: &str, buf: &[u8]) -> Result<Vec<u8>, PluginError> {
    let mut batch = Batch::open(buf)?;
    process(config, &mut batch)?;
    Ok(batch.into_changes())
}

/// The batch buffer of owned events, as the host would send it.
pub fn encode(events: &[Event]) -> Vec<u8> {
    let bytes: usize = events
        .iter()
        .map(|e| strs(e).iter().flatten().map(|s| s.len()).sum::<usize>())
        .sum();
    let mut enc =
        beacon_plugin_abi::Encoder::with_capacity(events.len(), bytes / events.len().max(1));
    for e in events {
        enc.push(EventFields {
            strs: strs(e),
            ts: e.ts,
            received_at: e.received_at,
            revenue_micros: e.revenue_micros,
            properties: e.properties.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        });
    }
    enc.finish()
}

/// Applies a changes buffer to the events it answers, as the host does (the host's copy is
/// in `plugins/host`; both follow `plugins/abi`).
pub fn apply(changes: &[u8], events: Vec<Event>) -> Result<Vec<Event>, PluginError> {
    let parsed = Changes::parse(changes, events.len(), usize::MAX)
        .map_err(|e| PluginError::new(format!("malformed changes: {e}")))?;
    let mut uses: Vec<u32> = (0..events.len()).map(|i| parsed.uses(i)).collect();
    let mut events: Vec<Option<Event>> = events.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(parsed.len());
    for (origin, edits) in parsed.records() {
        let mut e = match origin {
            Origin::New => Event::default(),
            Origin::Input(i) => {
                let i = i as usize;
                uses[i] -= 1;
                let mut e = if uses[i] == 0 {
                    events[i].take().unwrap_or_default()
                } else {
                    events[i].clone().unwrap_or_default()
                };
                // As the host keeps them (and the plugin saw them): one value per key, the
                // last of duplicates.
                dedupe_properties(&mut e.properties);
                e
            }
        };
        for edit in edits {
            match edit {
                Edit::SetStr(f, v) => set_str(&mut e, f, Some(v.to_string())),
                Edit::ClearStr(f) => set_str(&mut e, f, None),
                Edit::SetInt(f, v) => set_int(&mut e, f, Some(v)),
                Edit::ClearInt(f) => set_int(&mut e, f, None),
                Edit::SetProperty(k, v) => {
                    e.set_property(k, v);
                }
                Edit::RemoveProperty(k) => {
                    e.remove_property(k);
                }
                Edit::ClearProperties => e.properties.clear(),
            }
        }
        // The host keeps properties sorted by key; so does this, so outputs compare equal.
        e.properties.sort();
        out.push(e);
    }
    Ok(out)
}

/// Sorts properties by key, keeping the last of duplicate keys.
fn dedupe_properties(props: &mut Vec<(String, String)>) {
    let mut pairs = std::mem::take(props);
    // Stable: of equal keys the later pair stays later, and is the one kept.
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, v) in pairs.into_iter().rev() {
        if props.last().is_none_or(|(last, _)| *last != k) {
            props.push((k, v));
        }
    }
    props.reverse();
}

/// Runs a batch plugin natively on owned events, through the same packed encoding the host
/// uses: what tests, benchmarks and `native-check` call.
pub fn run(process: BatchFn, config: &str, events: Vec<Event>) -> Result<Vec<Event>, PluginError> {
    let buf = encode(&events);
    let changes = serve(process, config, &buf)?;
    apply(&changes, events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Event> {
        vec![
            Event::new("a", "pageview", 1)
                .with_url("https://x.example/p?utm_source=N")
                .with_property("k", "v")
                .with_property("z", "1"),
            Event::new("b", "buy", 2).with_revenue(5, "EUR"),
            Event::new("c", "pageview", 3),
        ]
    }

    #[test]
    fn reads_see_the_input_and_earlier_changes() {
        fn process(_: &str, batch: &mut Batch) -> Result<(), PluginError> {
            assert_eq!(batch.len(), 3);
            let mut it = batch.events_mut();
            let mut a = it.next().unwrap();
            assert_eq!(a.event_id(), "a");
            assert_eq!(a.url_path(), Some("/p"));
            assert_eq!(a.url_host(), Some("x.example"));
            assert_eq!(a.query_param("utm_source").as_deref(), Some("N"));
            assert_eq!(a.property("k"), Some("v"));
            a.set_property("k", "w");
            a.set_property("n", "1");
            assert!(a.remove_property("z"));
            assert!(!a.remove_property("z"));
            assert!(!a.set_property_if_absent("n", "2"));
            assert_eq!(a.property("k"), Some("w"));
            assert_eq!(a.property("z"), None);
            let mut props = a.properties();
            props.sort();
            assert_eq!(props, [("k", "w"), ("n", "1")]);
            a.set_url(None);
            assert_eq!(a.url(), None);
            let mut b = it.next().unwrap();
            assert_eq!(b.revenue_micros(), Some(5));
            b.set_revenue_micros(Some(7));
            b.set_currency(Some("USD".into()));
            b.clear_properties();
            b.set_property("only", "x");
            it.next().unwrap().discard();
            drop(it);
            let split = batch.events().next().unwrap().to_event();
            batch.push(Event {
                event_id: format!("{}.1", split.event_id),
                ..split
            });
            assert_eq!(batch.len(), 3);
            Ok(())
        }
        let out = run(process, "", sample()).unwrap();
        let ids: Vec<&str> = out.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "a.1"]);
        assert_eq!(out[0].url, None);
        assert_eq!(
            out[0].properties,
            vec![("k".into(), "w".into()), ("n".into(), "1".into())]
        );
        assert_eq!(out[1].revenue_micros, Some(7));
        assert_eq!(out[1].currency.as_deref(), Some("USD"));
        assert_eq!(out[1].properties, vec![("only".into(), "x".into())]);
        assert_eq!(out[2].name, "pageview");
        assert_eq!(out[2].properties, out[0].properties);
    }

    #[test]
    fn unchanged_batches_come_back_equal_and_retain_drops() {
        fn identity(_: &str, _: &mut Batch) -> Result<(), PluginError> {
            Ok(())
        }
        fn keep_pageviews(_: &str, batch: &mut Batch) -> Result<(), PluginError> {
            batch.retain(|e| e.name() == "pageview");
            Ok(())
        }
        let mut expected = sample();
        for e in &mut expected {
            e.properties.sort();
        }
        assert_eq!(run(identity, "", sample()).unwrap(), expected);
        let out = run(keep_pageviews, "", sample()).unwrap();
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|e| e.name == "pageview"));
    }

    #[test]
    fn duplicate_keys_come_out_as_the_host_keeps_them() {
        fn read(_: &str, batch: &mut Batch) -> Result<(), PluginError> {
            let e = batch.events().next().unwrap();
            assert_eq!(e.property("a"), Some("2"), "the last duplicate");
            Ok(())
        }
        let mut e = Event::new("d", "x", 1);
        e.properties = vec![
            ("z".into(), "0".into()),
            ("a".into(), "1".into()),
            ("a".into(), "2".into()),
        ];
        let out = run(read, "", vec![e]).unwrap();
        assert_eq!(
            out[0].properties,
            vec![("a".into(), "2".into()), ("z".into(), "0".into())]
        );
    }

    #[test]
    fn errors_pass_through_and_bad_buffers_are_named() {
        fn fail(_: &str, _: &mut Batch) -> Result<(), PluginError> {
            Err(PluginError::new("no"))
        }
        assert_eq!(run(fail, "", sample()).unwrap_err().message, "no");
        let err = Batch::open(b"garbage").err().unwrap();
        assert!(err.message.contains("malformed batch"), "{err:?}");
    }
}
