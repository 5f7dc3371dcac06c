//! The packed batch layout of plugin contract 1.1 (`wit/plugin.wit`, world
//! `batch-processor`): a batch crosses into the sandbox as one byte buffer and the plugin's
//! answer comes back as one buffer of changes, instead of one canonical-ABI string copy per
//! field per event per plugin.
//!
//! Both sides of the boundary use this crate: the host encodes batches ([`Encoder`]) and
//! decodes changes ([`Changes::parse`], which validates every offset, length, index, field
//! id and string before anything is applied: malformed output is the plugin's error, never
//! a host panic); the guest SDK reads batches lazily ([`Input`]: fields are borrowed from the
//! buffer, nothing is copied until the plugin keeps it) and writes changes ([`Writer`]).
//!
//! # Layout, version 1 (all integers little-endian)
//!
//! A **batch** (host to plugin):
//!
//! ```text
//! header   magic "BPB1" | version u16 = 1 | flags u16 = 0 | events u32 | properties u32 | string bytes u32
//! slots    `events` x 116 bytes, one per event:
//!            10 string refs (offset u32, length u32), in `Str` order; offset u32::MAX = absent
//!            ts i64 | received_at i64 | revenue_micros i64 | flags u32 (bit 0: revenue present)
//!            first property u32 | property count u32
//! props    `properties` x 16 bytes: key ref, value ref; per event sorted by key, keys unique
//! strings  `string bytes` of UTF-8; refs are offsets into this area
//! ```
//!
//! **Changes** (plugin to host): the output batch, in order, as records.
//!
//! ```text
//! header   magic "BPC1" | version u16 = 1 | flags u16 = 0 | records u32
//! record   origin u8: 0 = input event (then its index u32), 1 = new (empty) event
//!          edits, each an op u8 and its operands, until op 0:
//!            1 set string   field u8, length u32, bytes
//!            2 clear string field u8 (optional fields only)
//!            3 set integer  field u8, value i64
//!            4 clear integer field u8 (revenue_micros only)
//!            5 set property key length u32, key, value length u32, value
//!            6 remove property key length u32, key
//!            7 clear properties
//! ```
//!
//! An input event that no record names is dropped; one named twice is copied (a split). A
//! new event starts with every field empty; the host validates what it becomes like any
//! client event.

use std::fmt;

/// Magic of a batch buffer, then [`VERSION`].
pub const BATCH_MAGIC: [u8; 4] = *b"BPB1";
/// Magic of a changes buffer, then [`VERSION`].
pub const CHANGES_MAGIC: [u8; 4] = *b"BPC1";
/// The layout version this crate reads and writes.
pub const VERSION: u16 = 1;

const HEADER: usize = 20;
const CHANGES_HEADER: usize = 12;
const SLOT: usize = 10 * 8 + 3 * 8 + 4 + 4 + 4;
const PROP: usize = 16;
const ABSENT: u32 = u32::MAX;

/// The string fields of a canonical event, in slot order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Str {
    EventId = 0,
    MerchantId = 1,
    Name = 2,
    Url = 3,
    Referrer = 4,
    Title = 5,
    VisitorId = 6,
    SessionId = 7,
    UserId = 8,
    Currency = 9,
}

impl Str {
    pub const ALL: [Str; 10] = [
        Str::EventId,
        Str::MerchantId,
        Str::Name,
        Str::Url,
        Str::Referrer,
        Str::Title,
        Str::VisitorId,
        Str::SessionId,
        Str::UserId,
        Str::Currency,
    ];

    /// Required fields are always present (possibly empty) and cannot be cleared.
    pub fn required(self) -> bool {
        matches!(self, Str::EventId | Str::MerchantId | Str::Name)
    }

    fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(usize::from(v)).copied()
    }
}

/// The integer fields of a canonical event, in slot order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Int {
    Ts = 0,
    ReceivedAt = 1,
    /// The only optional integer.
    RevenueMicros = 2,
}

impl Int {
    pub const ALL: [Int; 3] = [Int::Ts, Int::ReceivedAt, Int::RevenueMicros];

    fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(usize::from(v)).copied()
    }
}

/// A batch or changes buffer that does not follow the layout. `at` is the byte offset where
/// reading failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbiError {
    pub at: usize,
    pub message: String,
}

impl fmt::Display for AbiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at byte {})", self.message, self.at)
    }
}

impl std::error::Error for AbiError {}

fn err<T>(at: usize, message: impl Into<String>) -> Result<T, AbiError> {
    Err(AbiError {
        at,
        message: message.into(),
    })
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn i64_at(b: &[u8], at: usize) -> i64 {
    let mut v = [0; 8];
    v.copy_from_slice(&b[at..at + 8]);
    i64::from_le_bytes(v)
}

// ---------------------------------------------------------------------------------------------
// Batch: host writes, guest reads.

/// One event's fields, as the encoder takes them.
pub struct EventFields<'a, P> {
    /// In [`Str`] order; required fields must be `Some`.
    pub strs: [Option<&'a str>; 10],
    pub ts: i64,
    pub received_at: i64,
    pub revenue_micros: Option<i64>,
    /// Any order; of duplicate keys the last wins.
    pub properties: P,
}

/// Builds a batch buffer.
#[derive(Default)]
pub struct Encoder {
    slots: Vec<u8>,
    props: Vec<u8>,
    strings: Vec<u8>,
    events: u32,
    prop_count: u32,
}

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// An encoder with room for `events` events of about `bytes_per_event` string bytes.
    pub fn with_capacity(events: usize, bytes_per_event: usize) -> Self {
        Self {
            slots: Vec::with_capacity(events * SLOT),
            props: Vec::with_capacity(events * 4 * PROP),
            strings: Vec::with_capacity(events * bytes_per_event),
            ..Self::default()
        }
    }

    fn string(&mut self, s: Option<&str>) -> [u8; 8] {
        let mut r = [0; 8];
        match s {
            None => r[..4].copy_from_slice(&ABSENT.to_le_bytes()),
            Some(s) => {
                r[..4].copy_from_slice(&(self.strings.len() as u32).to_le_bytes());
                r[4..].copy_from_slice(&(s.len() as u32).to_le_bytes());
                self.strings.extend_from_slice(s.as_bytes());
            }
        }
        r
    }

    /// `s`, referencing the bytes `like` references when they are equal instead of copying.
    fn string_like(&mut self, s: Option<&str>, like: Option<[u8; 8]>) -> [u8; 8] {
        if let (Some(s), Some(r)) = (s, like) {
            let off = u32::from_le_bytes([r[0], r[1], r[2], r[3]]);
            let len = u32::from_le_bytes([r[4], r[5], r[6], r[7]]) as usize;
            if off != ABSENT
                && self.strings.get(off as usize..off as usize + len) == Some(s.as_bytes())
            {
                return r;
            }
        }
        self.string(s)
    }

    /// The reference at byte `at` of `b` (slots or props).
    fn reference(b: &[u8], at: usize) -> [u8; 8] {
        let mut r = [0; 8];
        r.copy_from_slice(&b[at..at + 8]);
        r
    }

    /// Key and value references of property `k` among `range` (an event's sorted
    /// properties), if it has one.
    fn find_property(&self, range: &std::ops::Range<usize>, k: &str) -> Option<([u8; 8], [u8; 8])> {
        let (mut lo, mut hi) = (range.start, range.end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let r = Self::reference(&self.props, mid * PROP);
            let off = u32::from_le_bytes([r[0], r[1], r[2], r[3]]) as usize;
            let len = u32::from_le_bytes([r[4], r[5], r[6], r[7]]) as usize;
            match self.strings[off..off + len].cmp(k.as_bytes()) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => {
                    return Some((r, Self::reference(&self.props, mid * PROP + 8)))
                }
            }
        }
        None
    }

    fn property(&mut self, k: &str, v: &str, like: Option<&std::ops::Range<usize>>) {
        let (k, v) = match like.and_then(|range| self.find_property(range, k)) {
            Some((kr, vr)) => (kr, self.string_like(Some(v), Some(vr))),
            None => (self.string(Some(k)), self.string(Some(v))),
        };
        self.props.extend_from_slice(&k);
        self.props.extend_from_slice(&v);
        self.prop_count += 1;
    }

    /// Appends one event.
    pub fn push<'a, P>(&mut self, e: EventFields<'a, P>)
    where
        P: Iterator<Item = (&'a str, &'a str)> + Clone,
    {
        self.push_inner(e, None)
    }

    /// Appends one event whose strings are likely those of event `like` (an index of an
    /// event already pushed, for example the raw event a plugin's output came from): a
    /// string or property equal to that event's is referenced again rather than copied. The
    /// layout allows any number of references to the same bytes, so readers see no
    /// difference. An index not yet pushed is ignored.
    pub fn push_like<'a, P>(&mut self, e: EventFields<'a, P>, like: usize)
    where
        P: Iterator<Item = (&'a str, &'a str)> + Clone,
    {
        self.push_inner(e, (like < self.events as usize).then_some(like))
    }

    fn push_inner<'a, P>(&mut self, e: EventFields<'a, P>, like: Option<usize>)
    where
        P: Iterator<Item = (&'a str, &'a str)> + Clone,
    {
        let base = like.map(|i| i * SLOT);
        for (f, s) in e.strs.into_iter().enumerate() {
            let candidate = base.map(|b| Self::reference(&self.slots, b + f * 8));
            let r = self.string_like(s, candidate);
            self.slots.extend_from_slice(&r);
        }
        let like_props = base.map(|b| {
            let first = u32_at(&self.slots, b + 108) as usize;
            first..first + u32_at(&self.slots, b + 112) as usize
        });
        let like_props = like_props.as_ref();
        self.slots.extend_from_slice(&e.ts.to_le_bytes());
        self.slots.extend_from_slice(&e.received_at.to_le_bytes());
        self.slots
            .extend_from_slice(&e.revenue_micros.unwrap_or(0).to_le_bytes());
        self.slots
            .extend_from_slice(&u32::from(e.revenue_micros.is_some()).to_le_bytes());
        // Sorted by key, last of duplicates kept: the reader can binary-search. The host's
        // properties (a BTreeMap) already are, and are written in one pass; otherwise the
        // pass is undone and the pairs sorted.
        let (first, props_at, strings_at) = (self.prop_count, self.props.len(), self.strings.len());
        let mut last: Option<&str> = None;
        let mut sorted = true;
        for (k, v) in e.properties.clone() {
            if last.is_some_and(|l| l >= k) {
                sorted = false;
                break;
            }
            last = Some(k);
            self.property(k, v, like_props);
        }
        if !sorted {
            self.props.truncate(props_at);
            self.strings.truncate(strings_at);
            self.prop_count = first;
            let mut pairs: Vec<(&str, &str)> = e.properties.collect();
            // Stable: of equal keys the later pair stays later, and is the one kept.
            pairs.sort_by(|a, b| a.0.cmp(b.0));
            for (i, (k, v)) in pairs.iter().enumerate() {
                if pairs.get(i + 1).is_none_or(|next| next.0 != *k) {
                    self.property(k, v, like_props);
                }
            }
        }
        self.slots.extend_from_slice(&first.to_le_bytes());
        self.slots
            .extend_from_slice(&(self.prop_count - first).to_le_bytes());
        self.events += 1;
    }

    /// The batch buffer.
    pub fn finish(self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(HEADER + self.slots.len() + self.props.len() + self.strings.len());
        self.finish_into(&mut out);
        out
    }

    /// Appends the batch buffer to `out` (one copy fewer where it goes into a larger one).
    pub fn finish_into(self, out: &mut Vec<u8>) {
        out.reserve(HEADER + self.slots.len() + self.props.len() + self.strings.len());
        out.extend_from_slice(&BATCH_MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.events.to_le_bytes());
        out.extend_from_slice(&self.prop_count.to_le_bytes());
        out.extend_from_slice(&(self.strings.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.slots);
        out.extend_from_slice(&self.props);
        out.extend_from_slice(&self.strings);
    }
}

/// A borrowed view of a batch buffer: reading a field copies nothing and checks only that
/// field.
///
/// [`Input::open`] checks the header and that the sections add up; each reference is
/// bounds- and UTF-8-checked when it is read, so a plugin pays only for the fields it reads
/// (validating a whole batch up front costed about as much as the rest of the sandbox
/// boundary). The host writes batches with [`Encoder`]: a reference that fails its check is a
/// host bug, and panics (traps the plugin, failing the batch with this message) rather than
/// being read as something else.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    slots: &'a [u8],
    props: &'a [u8],
    strings: &'a [u8],
    events: usize,
}

#[cold]
#[inline(never)]
fn malformed(what: &str, at: usize) -> ! {
    panic!("malformed batch from the host: {what} (reference at byte {at} of its section)")
}

impl<'a> Input<'a> {
    /// Checks the header and the section sizes.
    pub fn open(buf: &'a [u8]) -> Result<Self, AbiError> {
        if buf.len() < HEADER || buf[..4] != BATCH_MAGIC {
            return err(0, "not a Beacon batch (magic BPB1)");
        }
        let version = u16_at(buf, 4);
        if version != VERSION {
            return err(
                4,
                format!("batch layout version {version}, expected {VERSION}"),
            );
        }
        let events = u32_at(buf, 8) as usize;
        let props = u32_at(buf, 12) as usize;
        let strings = u32_at(buf, 16) as usize;
        // Checked arithmetic: the counts come from the buffer.
        let ends = events
            .checked_mul(SLOT)
            .and_then(|s| s.checked_add(HEADER))
            .and_then(|slots_end| {
                let props_end = props.checked_mul(PROP)?.checked_add(slots_end)?;
                (props_end.checked_add(strings)? == buf.len()).then_some((slots_end, props_end))
            });
        let Some((slots_end, props_end)) = ends else {
            return err(8, "batch sizes do not add up to the buffer's length");
        };
        Ok(Self {
            slots: &buf[HEADER..slots_end],
            props: &buf[slots_end..props_end],
            strings: &buf[props_end..],
            events,
        })
    }

    /// Checks every reference of every event: strings in bounds and UTF-8, required
    /// fields present, property ranges inside the table, each event's property keys sorted
    /// and unique. A batch that passes is read without a panic, and `property` finds every
    /// key. For buffers that did not come from this process's [`Encoder`] (a client's batch,
    /// an envelope read back from the bus), where a bad reference must be an error, not a
    /// trap; the sandbox skips it because a plugin pays only for the fields it reads.
    ///
    /// References may share bytes (what [`Encoder::push_like`] writes), so a small buffer
    /// can name far more string bytes than it holds, and a reader that copies every field
    /// would allocate all of them. `max_string_bytes` bounds the total the references name,
    /// counting repeats: the buffer's own length for one written with [`Encoder::push`]
    /// alone.
    pub fn validate(&self, max_string_bytes: u64) -> Result<(), AbiError> {
        let named = std::cell::Cell::new(0u64);
        let text = |b: &[u8], at: usize, base: usize| -> Result<(), AbiError> {
            let off = u32_at(b, at) as usize;
            let len = u32_at(b, at + 4) as usize;
            match off
                .checked_add(len)
                .and_then(|end| self.strings.get(off..end))
            {
                None => return err(base + at, "string out of bounds"),
                Some(s) if std::str::from_utf8(s).is_err() => {
                    return err(base + at, "string is not UTF-8")
                }
                Some(_) => {}
            }
            named.set(named.get() + len as u64);
            if named.get() > max_string_bytes {
                return err(
                    base + at,
                    format!("references name over {max_string_bytes} bytes of strings"),
                );
            }
            Ok(())
        };
        let props = self.props.len() / PROP;
        let props_base = HEADER + self.events * SLOT;
        for i in 0..self.events {
            let (slot, base) = (self.slot(i), HEADER + i * SLOT);
            for f in Str::ALL {
                let at = f as usize * 8;
                if u32_at(slot, at) == ABSENT {
                    if f.required() {
                        return err(base + at, format!("required field {f:?} is absent"));
                    }
                } else {
                    text(slot, at, base)?;
                }
            }
            let first = u32_at(slot, 108) as usize;
            let Some(end) = first
                .checked_add(u32_at(slot, 112) as usize)
                .filter(|&end| end <= props)
            else {
                return err(base + 108, "property range out of bounds");
            };
            // Checked per event (a range may be another event's too), so a shared range
            // counts against the bound each time it is read.
            let mut previous: Option<&[u8]> = None;
            for p in first..end {
                text(self.props, p * PROP, props_base)?;
                text(self.props, p * PROP + 8, props_base)?;
                let key = self.bytes(self.props, p * PROP);
                if previous.is_some_and(|prev| prev >= key) {
                    return err(props_base + p * PROP, "property keys not sorted and unique");
                }
                previous = Some(key);
            }
        }
        Ok(())
    }

    /// The bytes of the string referenced at `b[at..at + 8]`.
    fn bytes(&self, b: &[u8], at: usize) -> &'a [u8] {
        let off = u32_at(b, at) as usize;
        let len = u32_at(b, at + 4) as usize;
        off.checked_add(len)
            .and_then(|end| self.strings.get(off..end))
            .unwrap_or_else(|| malformed("string out of bounds", at))
    }

    fn text(&self, b: &[u8], at: usize) -> &'a str {
        std::str::from_utf8(self.bytes(b, at))
            .unwrap_or_else(|_| malformed("string is not UTF-8", at))
    }

    fn slot(&self, i: usize) -> &'a [u8] {
        &self.slots[i * SLOT..(i + 1) * SLOT]
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.events
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// String field `f` of event `i` (`i < len()`); a required field is never absent when the
    /// host wrote the batch.
    pub fn str(&self, i: usize, f: Str) -> Option<&'a str> {
        let slot = self.slot(i);
        let at = f as usize * 8;
        (u32_at(slot, at) != ABSENT).then(|| self.text(slot, at))
    }

    /// Integer field `f` of event `i`.
    pub fn int(&self, i: usize, f: Int) -> Option<i64> {
        let slot = self.slot(i);
        match f {
            Int::Ts => Some(i64_at(slot, 80)),
            Int::ReceivedAt => Some(i64_at(slot, 88)),
            Int::RevenueMicros => (u32_at(slot, 104) & 1 == 1).then(|| i64_at(slot, 96)),
        }
    }

    fn prop_range(&self, i: usize) -> std::ops::Range<usize> {
        let slot = self.slot(i);
        let first = u32_at(slot, 108) as usize;
        match first.checked_add(u32_at(slot, 112) as usize) {
            Some(end) if end <= self.props.len() / PROP => first..end,
            _ => malformed("property range out of bounds", 108),
        }
    }

    /// Event `i`'s properties, sorted by key.
    pub fn properties(
        &self,
        i: usize,
    ) -> impl ExactSizeIterator<Item = (&'a str, &'a str)> + Clone + 'a {
        let this = *self;
        self.prop_range(i).map(move |p| {
            (
                this.text(this.props, p * PROP),
                this.text(this.props, p * PROP + 8),
            )
        })
    }

    /// Property `key` of event `i` (binary search: the encoder sorts keys).
    pub fn property(&self, i: usize, key: &str) -> Option<&'a str> {
        let range = self.prop_range(i);
        let (mut lo, mut hi) = (range.start, range.end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            // Byte order is UTF-8 string order: keys are not decoded to compare them.
            match self.bytes(self.props, mid * PROP).cmp(key.as_bytes()) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(self.text(self.props, mid * PROP + 8)),
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Changes: guest writes, host reads.

/// Where an output event comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Input event at this index, then edited.
    Input(u32),
    /// A new event, every field empty before its edits.
    New,
}

/// One change to an output event's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit<'a> {
    SetStr(Str, &'a str),
    /// Only optional fields.
    ClearStr(Str),
    SetInt(Int, i64),
    /// Only [`Int::RevenueMicros`].
    ClearInt(Int),
    SetProperty(&'a str, &'a str),
    RemoveProperty(&'a str),
    ClearProperties,
}

const OP_END: u8 = 0;
const OP_SET_STR: u8 = 1;
const OP_CLEAR_STR: u8 = 2;
const OP_SET_INT: u8 = 3;
const OP_CLEAR_INT: u8 = 4;
const OP_SET_PROP: u8 = 5;
const OP_REMOVE_PROP: u8 = 6;
const OP_CLEAR_PROPS: u8 = 7;

/// Writes a changes buffer: records in output order, each an origin and its edits.
pub struct Writer {
    buf: Vec<u8>,
    records: u32,
    open: bool,
}

impl Default for Writer {
    fn default() -> Self {
        Self::new()
    }
}

impl Writer {
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(4096);
        buf.extend_from_slice(&CHANGES_MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        buf.extend_from_slice(&0u16.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        Self {
            buf,
            records: 0,
            open: false,
        }
    }

    fn close(&mut self) {
        if self.open {
            self.buf.push(OP_END);
            self.open = false;
        }
    }

    /// Starts the next output record; its edits follow.
    pub fn record(&mut self, origin: Origin) {
        self.close();
        match origin {
            Origin::Input(i) => {
                self.buf.push(0);
                self.buf.extend_from_slice(&i.to_le_bytes());
            }
            Origin::New => self.buf.push(1),
        }
        self.records += 1;
        self.open = true;
    }

    fn bytes(&mut self, s: &str) {
        self.buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(s.as_bytes());
    }

    /// Adds an edit to the current record.
    pub fn edit(&mut self, edit: Edit<'_>) {
        debug_assert!(self.open, "an edit outside a record");
        match edit {
            Edit::SetStr(f, v) => {
                self.buf.extend_from_slice(&[OP_SET_STR, f as u8]);
                self.bytes(v);
            }
            Edit::ClearStr(f) => self.buf.extend_from_slice(&[OP_CLEAR_STR, f as u8]),
            Edit::SetInt(f, v) => {
                self.buf.extend_from_slice(&[OP_SET_INT, f as u8]);
                self.buf.extend_from_slice(&v.to_le_bytes());
            }
            Edit::ClearInt(f) => self.buf.extend_from_slice(&[OP_CLEAR_INT, f as u8]),
            Edit::SetProperty(k, v) => {
                self.buf.push(OP_SET_PROP);
                self.bytes(k);
                self.bytes(v);
            }
            Edit::RemoveProperty(k) => {
                self.buf.push(OP_REMOVE_PROP);
                self.bytes(k);
            }
            Edit::ClearProperties => self.buf.push(OP_CLEAR_PROPS),
        }
    }

    /// The changes buffer.
    pub fn finish(mut self) -> Vec<u8> {
        self.close();
        self.buf[8..12].copy_from_slice(&self.records.to_le_bytes());
        self.buf
    }
}

/// A validated changes buffer: [`Changes::parse`] has read all of it, so iterating cannot
/// fail.
pub struct Changes<'a> {
    /// Per record: origin and the byte range of its edits.
    records: Vec<(Origin, usize, usize)>,
    buf: &'a [u8],
    /// How many records name each input event.
    uses: Vec<u32>,
}

/// Reads from a buffer that may be anything: every read is bounds-checked.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], AbiError> {
        match self.at.checked_add(n) {
            Some(end) if end <= self.buf.len() => {
                let s = &self.buf[self.at..end];
                self.at = end;
                Ok(s)
            }
            _ => err(self.at, format!("changes end inside {what}")),
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8, AbiError> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32, AbiError> {
        Ok(u32_at(self.take(4, what)?, 0))
    }
    fn i64(&mut self, what: &str) -> Result<i64, AbiError> {
        Ok(i64_at(self.take(8, what)?, 0))
    }
    fn str(&mut self, what: &str) -> Result<&'a str, AbiError> {
        let len = self.u32(what)? as usize;
        let at = self.at;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).or_else(|_| err(at, format!("{what} is not UTF-8")))
    }
    fn str_field(&mut self) -> Result<Str, AbiError> {
        let at = self.at;
        let v = self.u8("a field id")?;
        Str::from_u8(v).map_or_else(|| err(at, format!("unknown string field {v}")), Ok)
    }
    fn int_field(&mut self) -> Result<Int, AbiError> {
        let at = self.at;
        let v = self.u8("a field id")?;
        Int::from_u8(v).map_or_else(|| err(at, format!("unknown integer field {v}")), Ok)
    }

    fn edit(&mut self) -> Result<Option<Edit<'a>>, AbiError> {
        let at = self.at;
        Ok(Some(match self.u8("an edit")? {
            OP_END => return Ok(None),
            OP_SET_STR => {
                let f = self.str_field()?;
                Edit::SetStr(f, self.str("a string value")?)
            }
            OP_CLEAR_STR => {
                let f = self.str_field()?;
                if f.required() {
                    return err(at, format!("cannot clear required field {f:?}"));
                }
                Edit::ClearStr(f)
            }
            OP_SET_INT => {
                let f = self.int_field()?;
                Edit::SetInt(f, self.i64("an integer value")?)
            }
            OP_CLEAR_INT => {
                let f = self.int_field()?;
                if f != Int::RevenueMicros {
                    return err(at, format!("cannot clear required field {f:?}"));
                }
                Edit::ClearInt(f)
            }
            OP_SET_PROP => {
                let k = self.str("a property key")?;
                Edit::SetProperty(k, self.str("a property value")?)
            }
            OP_REMOVE_PROP => Edit::RemoveProperty(self.str("a property key")?),
            OP_CLEAR_PROPS => Edit::ClearProperties,
            op => return err(at, format!("unknown edit op {op}")),
        }))
    }
}

impl<'a> Changes<'a> {
    /// The number of output events a changes buffer declares, if it has a changes header:
    /// to tell "too many events" (a resource limit) from a malformed buffer before parsing.
    pub fn declared_records(buf: &[u8]) -> Option<usize> {
        (buf.len() >= CHANGES_HEADER && buf[..4] == CHANGES_MAGIC).then(|| u32_at(buf, 8) as usize)
    }

    /// Validates a whole changes buffer against an input batch of `inputs` events, allowing at
    /// most `max_records` output events (checked before anything is allocated for them).
    pub fn parse(buf: &'a [u8], inputs: usize, max_records: usize) -> Result<Self, AbiError> {
        if buf.len() < CHANGES_HEADER || buf[..4] != CHANGES_MAGIC {
            return err(0, "not Beacon changes (magic BPC1)");
        }
        let version = u16_at(buf, 4);
        if version != VERSION {
            return err(
                4,
                format!("changes layout version {version}, expected {VERSION}"),
            );
        }
        let count = u32_at(buf, 8) as usize;
        if count > max_records {
            return err(
                8,
                format!("{count} output events, over the limit of {max_records}"),
            );
        }
        // Every record takes at least two bytes: a count the buffer cannot hold is a lie.
        if count > (buf.len() - CHANGES_HEADER) / 2 {
            return err(8, format!("{count} records cannot fit in the changes"));
        }
        let mut c = Cursor {
            buf,
            at: CHANGES_HEADER,
        };
        let mut records = Vec::with_capacity(count);
        let mut uses = vec![0u32; inputs];
        for _ in 0..count {
            let at = c.at;
            let origin = match c.u8("a record")? {
                0 => {
                    let i = c.u32("an input index")?;
                    match uses.get_mut(i as usize) {
                        Some(u) => *u += 1,
                        None => {
                            return err(
                                at + 1,
                                format!("input event {i} does not exist ({inputs} in the batch)"),
                            )
                        }
                    }
                    Origin::Input(i)
                }
                1 => Origin::New,
                o => return err(at, format!("unknown record origin {o}")),
            };
            let start = c.at;
            while c.edit()?.is_some() {}
            records.push((origin, start, c.at));
        }
        if c.at != buf.len() {
            return err(c.at, "bytes after the last record");
        }
        Ok(Self { records, buf, uses })
    }

    /// Number of output events.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// How many output events start from input event `i` (0: dropped; 2 or more: copied).
    pub fn uses(&self, i: usize) -> u32 {
        self.uses.get(i).copied().unwrap_or(0)
    }

    /// The output records in order: origin and edits.
    pub fn records(&self) -> impl Iterator<Item = (Origin, Edits<'a>)> + '_ {
        self.records.iter().map(|&(origin, start, end)| {
            (
                origin,
                Edits {
                    cursor: Cursor {
                        buf: &self.buf[..end],
                        at: start,
                    },
                },
            )
        })
    }
}

/// One record's edits, in order (already validated).
pub struct Edits<'a> {
    cursor: Cursor<'a>,
}

impl<'a> Iterator for Edits<'a> {
    type Item = Edit<'a>;
    fn next(&mut self) -> Option<Edit<'a>> {
        // Validated by `Changes::parse`; an error here cannot happen and ends the edits.
        self.cursor.edit().ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(
        id: &'a str,
        url: Option<&'a str>,
        props: &'a [(&'a str, &'a str)],
    ) -> EventFields<'a, impl Iterator<Item = (&'a str, &'a str)> + Clone> {
        let mut strs = [None; 10];
        strs[Str::EventId as usize] = Some(id);
        strs[Str::MerchantId as usize] = Some("m");
        strs[Str::Name as usize] = Some("pageview");
        strs[Str::Url as usize] = url;
        EventFields {
            strs,
            ts: 7,
            received_at: 8,
            revenue_micros: (id == "b").then_some(-5),
            properties: props.iter().copied(),
        }
    }

    fn batch() -> Vec<u8> {
        let mut e = Encoder::new();
        e.push(fields(
            "a",
            Some("/é"),
            &[("z", "1"), ("a", "2"), ("z", "3")],
        ));
        e.push(fields("b", None, &[]));
        e.push(fields("c", Some(""), &[("k", "v")]));
        e.finish()
    }

    /// `push_like` reads back exactly as `push` does, and repeats no equal string.
    #[test]
    fn events_like_earlier_ones_share_their_strings() {
        let base = [("utm_source", "news"), ("a", "1"), ("z", "long value")];
        let derived = [("z", "long value"), ("a", "2"), ("new", "x")];
        let (mut plain, mut shared) = (Encoder::new(), Encoder::new());
        for enc in [&mut plain, &mut shared] {
            enc.push(fields(
                "event-one",
                Some("https://shop.example/p?q=1"),
                &base,
            ));
            enc.push(fields("b", None, &[]));
        }
        plain.push(fields(
            "event-one",
            Some("https://shop.example/p?q=1"),
            &derived,
        ));
        shared.push_like(
            fields("event-one", Some("https://shop.example/p?q=1"), &derived),
            0,
        );
        // Unsorted properties take the sorting path, which shares too; an index not pushed
        // yet is ignored.
        plain.push(fields(
            "event-one",
            Some("/"),
            &[("z", "long value"), ("a", "1")],
        ));
        shared.push_like(
            fields("event-one", Some("/"), &[("z", "long value"), ("a", "1")]),
            0,
        );
        plain.push(fields("c", None, &[("k", "v")]));
        shared.push_like(fields("c", None, &[("k", "v")]), 99);
        let (plain, shared) = (plain.finish(), shared.finish());
        assert!(
            shared.len() < plain.len(),
            "{} vs {}",
            shared.len(),
            plain.len()
        );
        // Repeated: "event-one" twice, the url once, "m" and "pageview" twice, "z"/"long
        // value" twice, "a" twice and "1" once.
        let saved = 2 * 9 + 26 + 2 * (1 + 8) + 2 * (1 + 10) + 2 + 1;
        assert_eq!(plain.len() - shared.len(), saved);
        let (a, b) = (Input::open(&plain).unwrap(), Input::open(&shared).unwrap());
        assert_eq!(b.validate(u64::MAX), Ok(()));
        assert_eq!(a.len(), b.len());
        for i in 0..a.len() {
            for f in Str::ALL {
                assert_eq!(a.str(i, f), b.str(i, f));
            }
            for f in Int::ALL {
                assert_eq!(a.int(i, f), b.int(i, f));
            }
            assert!(a.properties(i).eq(b.properties(i)));
        }
    }

    /// Shared references can name far more bytes than a buffer holds: the bound says how
    /// many a reader may copy. Keys out of order are refused, as `property` would miss them.
    #[test]
    fn validation_bounds_shared_strings_and_checks_key_order() {
        let long = "x".repeat(1000);
        let mut enc = Encoder::new();
        enc.push(fields("a", Some(&long), &[]));
        for _ in 0..10 {
            enc.push_like(fields("a", Some(&long), &[]), 0);
        }
        let buf = enc.finish();
        let input = Input::open(&buf).unwrap();
        assert_eq!(input.validate(u64::MAX), Ok(()));
        assert!(buf.len() < 11 * 1000);
        let e = input.validate(buf.len() as u64).unwrap_err();
        assert!(e.message.contains("references name over"), "{e}");
        // Event 0's two properties, "a" and "z", swapped in the table.
        let mut v = batch();
        let props = HEADER + 3 * SLOT;
        let (a, z) = (
            v[props..props + PROP].to_vec(),
            v[props + PROP..props + 2 * PROP].to_vec(),
        );
        v[props..props + PROP].copy_from_slice(&z);
        v[props + PROP..props + 2 * PROP].copy_from_slice(&a);
        let e = Input::open(&v).unwrap().validate(u64::MAX).unwrap_err();
        assert!(e.message.contains("not sorted and unique"), "{e}");
        assert_eq!(e.at, props + PROP);
    }

    #[test]
    fn a_batch_reads_back() {
        let buf = batch();
        let input = Input::open(&buf).unwrap();
        assert_eq!(input.len(), 3);
        assert_eq!(input.str(0, Str::EventId), Some("a"));
        assert_eq!(input.str(0, Str::Url), Some("/é"));
        assert_eq!(input.str(1, Str::Url), None);
        assert_eq!(input.str(2, Str::Url), Some(""));
        assert_eq!(input.str(1, Str::Title), None);
        assert_eq!(input.int(0, Int::Ts), Some(7));
        assert_eq!(input.int(0, Int::ReceivedAt), Some(8));
        assert_eq!(input.int(0, Int::RevenueMicros), None);
        assert_eq!(input.int(1, Int::RevenueMicros), Some(-5));
        // Sorted, last duplicate wins.
        assert_eq!(
            input.properties(0).collect::<Vec<_>>(),
            [("a", "2"), ("z", "3")]
        );
        assert_eq!(input.property(0, "z"), Some("3"));
        assert_eq!(input.property(0, "q"), None);
        assert_eq!(input.properties(1).len(), 0);
        assert_eq!(input.property(2, "k"), Some("v"));
        assert!(Input::open(&Encoder::new().finish()).unwrap().is_empty());
    }

    #[test]
    fn changes_round_trip() {
        let mut w = Writer::new();
        w.record(Origin::Input(2));
        w.record(Origin::Input(0));
        w.edit(Edit::SetStr(Str::Url, "/x"));
        w.edit(Edit::ClearStr(Str::Title));
        w.edit(Edit::SetInt(Int::Ts, -1));
        w.edit(Edit::ClearInt(Int::RevenueMicros));
        w.edit(Edit::SetProperty("k", "é"));
        w.edit(Edit::RemoveProperty("z"));
        w.edit(Edit::ClearProperties);
        w.record(Origin::New);
        w.edit(Edit::SetStr(Str::EventId, "n"));
        w.record(Origin::Input(0));
        let buf = w.finish();
        let c = Changes::parse(&buf, 3, 10).unwrap();
        assert_eq!(c.len(), 4);
        assert_eq!((c.uses(0), c.uses(1), c.uses(2)), (2, 0, 1));
        let got: Vec<(Origin, Vec<Edit>)> = c.records().map(|(o, e)| (o, e.collect())).collect();
        assert_eq!(
            got,
            vec![
                (Origin::Input(2), vec![]),
                (
                    Origin::Input(0),
                    vec![
                        Edit::SetStr(Str::Url, "/x"),
                        Edit::ClearStr(Str::Title),
                        Edit::SetInt(Int::Ts, -1),
                        Edit::ClearInt(Int::RevenueMicros),
                        Edit::SetProperty("k", "é"),
                        Edit::RemoveProperty("z"),
                        Edit::ClearProperties,
                    ]
                ),
                (Origin::New, vec![Edit::SetStr(Str::EventId, "n")]),
                (Origin::Input(0), vec![]),
            ]
        );
        assert!(Changes::parse(&Writer::new().finish(), 0, 0)
            .unwrap()
            .is_empty());
    }

    fn parse_err(buf: &[u8]) -> String {
        Changes::parse(buf, 3, 10)
            .err()
            .expect("an error")
            .to_string()
    }

    #[test]
    fn malformed_changes_are_named() {
        let ok = {
            let mut w = Writer::new();
            w.record(Origin::Input(1));
            w.edit(Edit::SetStr(Str::Url, "/x"));
            w.finish()
        };
        assert!(parse_err(b"nope").contains("magic"));
        let mut v = ok.clone();
        v[4] = 9;
        assert!(parse_err(&v).contains("version 9"));
        let mut v = ok.clone();
        v[8] = 11;
        assert!(parse_err(&v).contains("over the limit of 10"));
        let mut v = ok.clone();
        v[8] = 2;
        assert!(parse_err(&v).contains("changes end inside a record"));
        let mut v = ok.clone();
        v[13] = 3;
        assert!(parse_err(&v).contains("input event 3 does not exist"));
        let mut v = ok.clone();
        v[12] = 4;
        assert!(parse_err(&v).contains("unknown record origin 4"));
        let mut v = ok.clone();
        v[18] = 10;
        assert!(parse_err(&v).contains("unknown string field 10"));
        let mut v = ok.clone();
        v[17] = 2;
        v[18] = 0;
        assert!(parse_err(&v).contains("cannot clear required field EventId"));
        let mut v = ok.clone();
        v[19] = 200;
        assert!(parse_err(&v).contains("changes end inside a string value"));
        let mut v = ok.clone();
        v[23] = 0xff;
        assert!(parse_err(&v).contains("not UTF-8"));
        let mut v = ok.clone();
        v.push(0);
        assert!(parse_err(&v).contains("bytes after the last record"));
        let mut v = ok.clone();
        v.pop();
        assert!(parse_err(&v).contains("changes end inside an edit"));
        let mut v = ok.clone();
        v[17] = 99;
        assert!(parse_err(&v).contains("unknown edit op 99"));
    }

    /// The panic message of `f`, if it panics.
    fn panics(f: impl FnOnce()) -> Option<String> {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        r.err().map(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| p.downcast_ref::<&str>().unwrap_or(&"").to_string())
        })
    }

    #[test]
    fn malformed_batches_are_refused_or_trap_where_read() {
        let ok = batch();
        assert!(Input::open(&ok[..10])
            .unwrap_err()
            .message
            .contains("magic"));
        let mut v = ok.clone();
        v.push(b'x');
        assert!(Input::open(&v).unwrap_err().message.contains("add up"));
        let mut v = ok.clone();
        v[4] = 2;
        assert!(Input::open(&v).unwrap_err().message.contains("version 2"));
        // A string reference past the end: fields not read are not checked; the one read is.
        let mut v = ok.clone();
        v[HEADER + Str::Url as usize * 8 + 4] = 0xff;
        let input = Input::open(&v).unwrap();
        assert_eq!(input.str(0, Str::EventId), Some("a"));
        let msg = panics(|| {
            input.str(0, Str::Url);
        })
        .expect("a panic");
        assert!(
            msg.contains("malformed batch from the host: string out of bounds"),
            "{msg}"
        );
        // Inside a multi-byte character: "/é" is 3 bytes; cut it after 2.
        let mut v = ok.clone();
        v[HEADER + Str::Url as usize * 8 + 4] = 2;
        let input = Input::open(&v).unwrap();
        let msg = panics(|| {
            input.str(0, Str::Url);
        })
        .expect("a panic");
        assert!(msg.contains("not UTF-8"), "{msg}");
        // A property range past the table.
        let mut v = ok.clone();
        v[HEADER + 112] = 200;
        let input = Input::open(&v).unwrap();
        let msg = panics(|| {
            input.property(0, "a");
        })
        .expect("a panic");
        assert!(msg.contains("property range out of bounds"), "{msg}");
        assert!(Input::open(&v)
            .unwrap()
            .validate(u64::MAX)
            .unwrap_err()
            .message
            .contains("property range out of bounds"));
        // `validate` finds what a reader would trap on, before anything is read.
        assert_eq!(Input::open(&ok).unwrap().validate(u64::MAX), Ok(()));
        let mut v = ok.clone();
        v[HEADER + Str::Url as usize * 8 + 4] = 0xff;
        let e = Input::open(&v).unwrap().validate(u64::MAX).unwrap_err();
        assert!(e.message.contains("out of bounds"), "{e}");
        assert_eq!(e.at, HEADER + Str::Url as usize * 8);
        let mut v = ok.clone();
        v[HEADER + Str::Url as usize * 8 + 4] = 2;
        assert!(Input::open(&v)
            .unwrap()
            .validate(u64::MAX)
            .unwrap_err()
            .message
            .contains("not UTF-8"));
        let mut v = ok.clone();
        v[HEADER + Str::Name as usize * 8..][..4].copy_from_slice(&ABSENT.to_le_bytes());
        assert!(Input::open(&v)
            .unwrap()
            .validate(u64::MAX)
            .unwrap_err()
            .message
            .contains("required field Name is absent"));
    }

    /// A deterministic xorshift: mutations without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Fuzzing the decoders that read what the other side wrote: random bit flips, byte
    /// writes, truncations and splices of valid buffers, and pure noise, must give `Ok` or a
    /// named error, never a panic; whatever parses must also iterate without a panic.
    #[test]
    fn fuzz_the_decoders() {
        let mut w = Writer::new();
        for i in 0..3 {
            w.record(Origin::Input(i));
            w.edit(Edit::SetProperty("goal", "x"));
            w.edit(Edit::SetInt(Int::RevenueMicros, 5));
        }
        w.record(Origin::New);
        w.edit(Edit::SetStr(Str::EventId, "n"));
        w.edit(Edit::ClearStr(Str::Url));
        w.edit(Edit::RemoveProperty("k"));
        w.edit(Edit::ClearProperties);
        w.edit(Edit::ClearInt(Int::RevenueMicros));
        let seeds = [w.finish(), batch()];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // Expected panics would each print a report.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let (mut parsed, mut refused, mut validated) = (0, 0, 0);
        for round in 0..200_000 {
            let mut v = seeds[round % 2].clone();
            for _ in 0..1 + rng.below(4) {
                match rng.below(5) {
                    0 | 1 if v.is_empty() => {}
                    0 => {
                        let i = rng.below(v.len());
                        v[i] ^= 1 << rng.below(8);
                    }
                    1 => {
                        let i = rng.below(v.len());
                        v[i] = [0, 1, 0xff, 0x7f, 3][rng.below(5)];
                    }
                    2 => v.truncate(rng.below(v.len() + 1)),
                    3 => {
                        let i = rng.below(v.len() + 1);
                        let extra: Vec<u8> = (0..rng.below(16)).map(|_| rng.next() as u8).collect();
                        v.splice(i..i, extra);
                    }
                    _ => v = (0..rng.below(64)).map(|_| rng.next() as u8).collect(),
                }
            }
            match Changes::parse(&v, 3, 64) {
                Ok(c) => {
                    parsed += 1;
                    for (_, edits) in c.records() {
                        for e in edits {
                            std::hint::black_box(e);
                        }
                    }
                }
                Err(_) => refused += 1,
            }
            if let Ok(input) = Input::open(&v) {
                if input.validate(u64::MAX).is_ok() {
                    // What validates reads without a panic.
                    for i in 0..input.len() {
                        for f in Str::ALL {
                            assert!(!f.required() || input.str(i, f).is_some());
                        }
                        std::hint::black_box(input.properties(i).count());
                        std::hint::black_box(input.property(i, "k"));
                    }
                    validated += 1;
                }
                // Reading a corrupted batch may panic (the plugin traps), with our message
                // only: no other panic, no out-of-bounds read.
                let read = panics(|| {
                    for i in 0..input.len() {
                        for f in Str::ALL {
                            std::hint::black_box(input.str(i, f));
                        }
                        for f in Int::ALL {
                            std::hint::black_box(input.int(i, f));
                        }
                        std::hint::black_box(input.properties(i).count());
                        std::hint::black_box(input.property(i, "k"));
                    }
                });
                if let Some(msg) = read {
                    assert!(msg.starts_with("malformed batch from the host"), "{msg}");
                }
            }
        }
        std::panic::set_hook(hook);
        // Both outcomes were exercised, so the fuzzing reached past the headers.
        assert!(
            parsed > 1_000 && refused > 1_000 && validated > 1_000,
            "{parsed} parsed, {refused} refused, {validated} batches validated"
        );
    }
}
