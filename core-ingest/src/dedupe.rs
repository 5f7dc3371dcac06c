//! Per-event deduplication: an event whose merchant and id were already seen in the same
//! stream partition within the window is not stored again.
//!
//! The edge deduplicates retried *requests* (JetStream's `Nats-Msg-Id` window), but a
//! tracker that regroups retried events with new ones (Snowplow's emitters put failed
//! events back into their buffer) sends them under a different request key, and a 503 that
//! came after the bus stored the batch makes such a retry a duplicate. Here, the decision
//! is a pure function of the partition's stream: an event at stream sequence `s` is a
//! duplicate when an earlier position of the partition (an earlier message, or earlier in
//! the same message) holds the same `(merchant, event_id)` and that message was stored at
//! most `window` before message `s` (JetStream's storage time, which never changes).
//!
//! Being a function of the stream is what keeps ingest exactly once: after a crash the
//! three tables resume from their own watermarks, and every replayed message gets the same
//! verdict it had, because the state is rebuilt at start by reading the window of stream
//! before the resume point ([`Dedupe::observe`] on each message, in order).
//!
//! Verdicts are per table: `raw_events` rows on the raw events' ids, `events` rows on the
//! processed events' ids (a plugin may add events with ids of their own). A failed-events
//! row whose event was a duplicate goes with it: the failure was recorded the first time.
//!
//! Memory: one entry per distinct event id in the window ([`Dedupe::heap_bytes`]; measured
//! in docs/BENCHMARKS.md). Keys are 128-bit
//! hashes under per-process random keys: a false match needs a 2^-128 collision.

use std::collections::hash_map::{Entry, HashMap, RandomState};
use std::collections::VecDeque;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::time::Duration;

use beacon_proto::Envelope;

/// Leeway for stream timestamps that are not monotonic (a stream leader that moved to a
/// node whose clock is slightly behind): an entry is forgotten only this long after it left
/// the window, and the rebuild reads this much further back.
pub const CLOCK_SLACK_MS: i64 = 60_000;

/// The default window: longer than the Snowplow trackers' in-process retry schedules
/// (capped at one minute between attempts) by far, and an hour of partition traffic is
/// what a restart re-reads.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(3600);

/// Positions (in order) of the rows of one message that are duplicates; empty for most
/// messages, so no allocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Duplicates {
    /// Indexes into `envelope.raw`.
    pub raw: Vec<u32>,
    /// Indexes into `envelope.processed_events()`.
    pub processed: Vec<u32>,
}

impl Duplicates {
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty() && self.processed.is_empty()
    }

    pub fn raw(&self, index: usize) -> bool {
        contains(&self.raw, index)
    }

    pub fn processed(&self, index: usize) -> bool {
        contains(&self.processed, index)
    }
}

fn contains(sorted: &[u32], index: usize) -> bool {
    !sorted.is_empty() && sorted.binary_search(&(index as u32)).is_ok()
}

/// When a key was last seen, as raw and as processed event (stream time, ms; `NEVER`).
#[derive(Clone, Copy)]
struct Seen {
    raw: i64,
    processed: i64,
}

const NEVER: i64 = i64::MIN;

impl Seen {
    fn latest(self) -> i64 {
        self.raw.max(self.processed)
    }
}

/// The keys are already uniformly random: the map uses them as they are.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u128` is used; fold anything else in, to stay correct.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, k: u128) {
        self.0 = k as u64;
    }
}

/// The per-partition state: every key seen within the window (plus slack).
pub struct Dedupe {
    window_ms: i64,
    seen: HashMap<u128, Seen, BuildHasherDefault<KeyHasher>>,
    /// (stream time, key) in arrival order, to forget keys as they leave the window.
    order: VecDeque<(i64, u128)>,
    hashers: (RandomState, RandomState),
    /// Newest stream time observed (forgetting is relative to it).
    newest: i64,
}

impl Dedupe {
    /// `window` zero: nothing is ever a duplicate (and nothing is kept).
    pub fn new(window: Duration) -> Self {
        Self {
            window_ms: window.as_millis().min(i64::MAX as u128) as i64,
            seen: HashMap::default(),
            order: VecDeque::new(),
            hashers: (RandomState::new(), RandomState::new()),
            newest: NEVER,
        }
    }

    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms as u64)
    }

    pub fn enabled(&self) -> bool {
        self.window_ms > 0
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Heap held, from the tables' capacities (a hash table's control byte per slot).
    pub fn heap_bytes(&self) -> usize {
        self.seen.capacity() * (std::mem::size_of::<(u128, Seen)>() + 1)
            + self.order.capacity() * std::mem::size_of::<(i64, u128)>()
    }

    /// How far before the resume point's storage time the rebuild must read.
    pub fn lookback(&self) -> Duration {
        Duration::from_millis((self.window_ms + CLOCK_SLACK_MS) as u64)
    }

    fn key(&self, merchant: &str, event_id: &str) -> u128 {
        let half = |s: &RandomState| {
            let mut h = s.build_hasher();
            h.write(merchant.as_bytes());
            h.write_u8(0xff); // no (merchant, id) pair runs into another
            h.write(event_id.as_bytes());
            h.finish()
        };
        (u128::from(half(&self.hashers.0)) << 64) | u128::from(half(&self.hashers.1))
    }

    /// Records message `envelope`, stored at `stored_at` (ms), as the next of the partition
    /// and returns which of its rows are duplicates. Call it for every message in stream
    /// order, exactly once each.
    pub fn observe(&mut self, envelope: &Envelope, stored_at: i64) -> Duplicates {
        let mut dups = Duplicates::default();
        if !self.enabled() {
            return dups;
        }
        self.forget(stored_at);
        for (i, e) in envelope.raw.iter().enumerate() {
            if self.check(&e.merchant_id, &e.event_id, stored_at, false) {
                dups.raw.push(i as u32);
            }
        }
        for (i, e) in envelope.processed_events().enumerate() {
            if self.check(&e.merchant_id, &e.event_id, stored_at, true) {
                dups.processed.push(i as u32);
            }
        }
        dups
    }

    /// Whether the key is a duplicate at `now`; records it as seen at `now` either way.
    fn check(&mut self, merchant: &str, event_id: &str, now: i64, processed: bool) -> bool {
        if event_id.is_empty() {
            return false;
        }
        let key = self.key(merchant, event_id);
        let window = self.window_ms;
        let (duplicate, pushed) = match self.seen.entry(key) {
            Entry::Vacant(v) => {
                let mut s = Seen {
                    raw: NEVER,
                    processed: NEVER,
                };
                *slot(&mut s, processed) = now;
                v.insert(s);
                (false, true)
            }
            Entry::Occupied(mut o) => {
                let s = o.get_mut();
                let before = s.latest();
                let at = slot(s, processed);
                // A timestamp behind the last one (clock skew) is within the window.
                let duplicate = *at != NEVER && now.saturating_sub(*at) <= window;
                *at = (*at).max(now);
                (duplicate, s.latest() > before)
            }
        };
        if pushed {
            self.order.push_back((now, key));
        }
        duplicate
    }

    /// Drops keys last seen more than window + slack before the newest stream time.
    fn forget(&mut self, now: i64) {
        self.newest = self.newest.max(now);
        let horizon = self
            .newest
            .saturating_sub(self.window_ms)
            .saturating_sub(CLOCK_SLACK_MS);
        while let Some(&(at, key)) = self.order.front() {
            if at >= horizon {
                break;
            }
            self.order.pop_front();
            if let Entry::Occupied(o) = self.seen.entry(key) {
                if o.get().latest() < horizon {
                    o.remove();
                }
            }
        }
    }
}

fn slot(s: &mut Seen, processed: bool) -> &mut i64 {
    if processed {
        &mut s.processed
    } else {
        &mut s.raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use beacon_proto::Event;

    fn envelope(merchant: &str, ids: &[&str]) -> Envelope {
        let raw: Vec<Event> = ids
            .iter()
            .map(|id| Event {
                event_id: id.to_string(),
                merchant_id: merchant.into(),
                name: "pageview".into(),
                ..Default::default()
            })
            .collect();
        Envelope {
            v: beacon_proto::envelope::ENVELOPE_VERSION,
            batch_id: "b".into(),
            merchant_id: merchant.into(),
            edge_id: "edge".into(),
            received_at: 0,
            pipeline: None,
            processed: Some(raw.clone()),
            raw,
            canary: None,
            failures: Vec::new(),
            shares: Vec::new(),
        }
    }

    const MIN: i64 = 60_000;

    #[test]
    fn a_regrouped_retry_within_the_window_is_a_duplicate() {
        let mut d = Dedupe::new(Duration::from_secs(600));
        assert!(d.observe(&envelope("m", &["a", "b"]), 0).is_empty());
        // The retry comes with a new event, and a repeat inside its own batch.
        let dups = d.observe(&envelope("m", &["c", "a", "b", "c"]), 2 * MIN);
        assert_eq!(dups.raw, vec![1, 2, 3]);
        assert_eq!(dups.processed, vec![1, 2, 3]);
        assert!(dups.raw(1) && !dups.raw(0));
        // Another merchant's event with the same id is another event.
        assert!(d.observe(&envelope("n", &["a"]), 3 * MIN).is_empty());
        // Empty ids are never matched.
        assert!(d.observe(&envelope("m", &["", ""]), 3 * MIN).is_empty());
    }

    #[test]
    fn the_window_is_measured_from_the_last_sighting_and_keys_are_forgotten() {
        let mut d = Dedupe::new(Duration::from_secs(600));
        d.observe(&envelope("m", &["a"]), 0);
        // 9 minutes later: a duplicate, and the key's clock restarts.
        assert_eq!(d.observe(&envelope("m", &["a"]), 9 * MIN).raw, vec![0]);
        assert_eq!(d.observe(&envelope("m", &["a"]), 18 * MIN).raw, vec![0]);
        // Over 10 minutes after the last sighting: new again.
        assert!(d.observe(&envelope("m", &["a"]), 29 * MIN).is_empty());
        // A stream timestamp slightly behind (another leader's clock) is inside the window.
        assert_eq!(d.observe(&envelope("m", &["a"]), 28 * MIN).raw, vec![0]);
        // Far later, every old key is forgotten (only the newest message's remain).
        d.observe(
            &envelope("m", &["z"]),
            29 * MIN + 600_000 + CLOCK_SLACK_MS + 1,
        );
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn a_rebuild_from_the_lookback_gives_every_later_message_the_same_verdict() {
        // A stream of messages, each a minute apart, with ids repeating at varying distance.
        let stream: Vec<(i64, Vec<String>)> = (0..200)
            .map(|i: i64| {
                let ids = (0..5)
                    .map(|j| format!("e{}", (i * 7 + j * 13) % 97))
                    .collect();
                (i * MIN, ids)
            })
            .collect();
        let window = Duration::from_secs(20 * 60);
        let verdicts = |from: usize, resume: usize| -> Vec<Duplicates> {
            let mut d = Dedupe::new(window);
            let mut out = Vec::new();
            for (i, (at, ids)) in stream.iter().enumerate().skip(from) {
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                let v = d.observe(&envelope("m", &ids), *at);
                if i > resume {
                    out.push(v);
                }
            }
            out
        };
        let whole = verdicts(0, 120);
        assert!(
            whole.iter().any(|v| !v.is_empty()),
            "the stream has duplicates"
        );
        assert!(whole.iter().any(|v| v.raw.len() < 5), "and new events");
        // A restart after message 120 reads from its time minus the lookback.
        let lookback = Dedupe::new(window).lookback().as_millis() as i64;
        let from = stream
            .iter()
            .position(|(at, _)| *at >= stream[120].0 - lookback)
            .expect("start");
        assert!(from > 0);
        assert_eq!(verdicts(from, 120), whole);
    }

    #[test]
    fn without_plugin_output_the_processed_verdicts_are_the_raw_ones() {
        let mut d = Dedupe::new(Duration::from_secs(600));
        let plain = |ids: &[&str]| {
            let mut e = envelope("m", ids);
            e.processed = None;
            e
        };
        d.observe(&plain(&["a"]), 0);
        let dups = d.observe(&plain(&["b", "a", "", "b"]), MIN);
        assert_eq!(dups.raw, vec![1, 3]);
        assert_eq!(dups.processed, dups.raw);
        // A processed copy of `a` seen later is judged against the processed sightings.
        assert_eq!(
            d.observe(&envelope("m", &["a"]), 2 * MIN).processed,
            vec![0]
        );
    }

    #[test]
    fn a_zero_window_keeps_everything() {
        let mut d = Dedupe::new(Duration::ZERO);
        d.observe(&envelope("m", &["a"]), 0);
        assert!(d.observe(&envelope("m", &["a", "a"]), 1).is_empty());
        assert!(d.is_empty());
    }
}
