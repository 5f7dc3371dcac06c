//! Batch envelopes: the unit the edge publishes to JetStream and core-ingest consumes.
//!
//! One envelope carries one client batch for one merchant: the canonical (pre-plugin)
//! events, the plugin chain's output with the pipeline version that made it, and every
//! failure (validation or plugin) so that nothing the edge acknowledged is ever dropped.

use serde::{Deserialize, Serialize};

use crate::event::Event;
use crate::packed;

/// Bumped when the envelope's shape changes incompatibly; ingest refuses unknown versions
/// into `failed_events` rather than guessing. Version 2 adds the canary part: an envelope
/// with one is written as v2, so an ingest that predates it refuses it (kept, re-readable
/// after its upgrade) instead of silently dropping the canary share.
pub const ENVELOPE_VERSION: u32 = 1;
pub const ENVELOPE_VERSION_CANARY: u32 = 2;

/// Envelope versions this build reads.
pub fn is_supported(v: u32) -> bool {
    v == ENVELOPE_VERSION || v == ENVELOPE_VERSION_CANARY
}

/// How much of an undecodable payload is kept in `failed_events` for diagnosis.
pub const MAX_KEPT_PAYLOAD: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    /// `<edge-id>:<batch-seq>`; also the `Nats-Msg-Id`, so a retried publish is dropped by
    /// JetStream's duplicate window.
    pub batch_id: String,
    pub merchant_id: String,
    pub edge_id: String,
    /// Edge clock, epoch milliseconds.
    pub received_at: i64,
    /// The pipeline that produced `processed`; `None` when the merchant has no plugins.
    #[serde(default)]
    pub pipeline: Option<PipelineRef>,
    /// Canonical events that passed validation, before any plugin ran.
    pub raw: Vec<Event>,
    /// Plugin output. `None` when no plugin ran: the processed events are `raw` unchanged,
    /// and not sending them twice halves the envelope. Empty when the chain failed and the
    /// batch is held in `failed_events` for re-processing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processed: Option<Vec<Event>>,
    /// The share of the batch a canary pipeline processed (visitors in its percentage); the
    /// rest is in `processed`. `raw` holds the raw events of both shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryPart>,
    #[serde(default)]
    pub failures: Vec<Failure>,
    /// How the edge processed the raw events, one entry per share of the batch (stable,
    /// canary): the lineage re-processing needs. Envelopes from edges that predate it have
    /// none; [`Envelope::lineage`] then derives what it can.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<Share>,
}

/// One share of a batch and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// The pipeline version that ran (or should have run) on it; `None`: no pipeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Whether this is the canary share.
    #[serde(default)]
    pub canary: bool,
    pub outcome: Outcome,
    /// Positions in `raw` of this share's events, ascending. Empty only when this is the
    /// envelope's one share and so the whole batch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub raw: Vec<u32>,
}

/// What a share's pipeline made of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The chain ran; its output is in `events`.
    Processed,
    /// The chain failed (or could not run) and the policy is `hold`: nothing in `events`.
    Held,
    /// The chain failed and the policy is `pass-through`: the raw events, unlabelled.
    PassedThrough,
    /// The merchant has no pipeline: the raw events are the processed ones.
    Unprocessed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Processed => "processed",
            Self::Held => "held",
            Self::PassedThrough => "passed_through",
            Self::Unprocessed => "unprocessed",
        }
    }
}

/// The lineage of one raw event, as `raw_events` stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawLineage {
    pub version: Option<u64>,
    /// `None` when an older edge did not record the split.
    pub canary: Option<bool>,
    pub outcome: Outcome,
}

/// Events a canary pipeline produced. `pipeline` is `None` when the canary failed and its
/// pipeline lets events pass through unprocessed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryPart {
    pub pipeline: Option<PipelineRef>,
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineRef {
    pub merchant_id: String,
    pub version: u64,
    pub plugins: Vec<PluginRef>,
}

impl PipelineRef {
    /// The label stored in `events.pipeline_version`: `<merchant-pipeline-version>`.
    pub fn label(&self) -> String {
        format!("v{}", self.version)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRef {
    pub name: String,
    /// sha256 of the component bytes, hex: plugin versions are content-addressed.
    pub sha256: String,
    /// The merchant's configuration string handed to the plugin.
    #[serde(default)]
    pub config: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureStage {
    /// The batch payload could not be decoded at all.
    Decode,
    /// One event broke a limit or a rule.
    Validate,
    /// A plugin trapped, ran out of time or memory, or returned an error.
    Plugin,
}

impl FailureStage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Decode => "decode",
            Self::Validate => "validate",
            Self::Plugin => "plugin",
        }
    }
}

/// One failed event (or, for `Decode`, one undecodable payload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub stage: FailureStage,
    /// Empty when the payload could not be decoded far enough to find one.
    pub event_id: String,
    /// `name@sha256` of the plugin that failed, for `Plugin` failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_version: Option<u64>,
    pub reason: String,
    /// What was received: the event as JSON, or the (truncated, lossy UTF-8) payload.
    pub payload: String,
}

impl Envelope {
    /// An envelope holding only a payload that could not be decoded (kept, at most
    /// [`MAX_KEPT_PAYLOAD`] bytes of it, so it lands in `failed_events` with its reason).
    pub fn undecodable(
        batch_id: String,
        merchant_id: String,
        edge_id: String,
        received_at: i64,
        payload: &[u8],
        reason: String,
    ) -> Self {
        let binary = [PACKED_MAGIC, beacon_plugin_abi::BATCH_MAGIC];
        let payload = if binary.iter().any(|m| payload.starts_with(m)) {
            // Binary: kept as hex (two characters a byte, within the same bound).
            let kept = &payload[..payload.len().min(MAX_KEPT_PAYLOAD / 2)];
            let mut hex = String::with_capacity(4 + 2 * kept.len());
            hex.push_str("hex:");
            for b in kept {
                hex.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
                hex.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
            }
            hex
        } else {
            let kept = &payload[..payload.len().min(MAX_KEPT_PAYLOAD)];
            String::from_utf8_lossy(kept).into_owned()
        };
        Self {
            v: ENVELOPE_VERSION,
            batch_id,
            merchant_id,
            edge_id,
            received_at,
            pipeline: None,
            raw: Vec::new(),
            processed: None,
            canary: None,
            shares: Vec::new(),
            failures: vec![Failure {
                stage: FailureStage::Decode,
                event_id: String::new(),
                plugin: None,
                pipeline_version: None,
                reason,
                payload,
            }],
        }
    }

    /// The events that belong in the `events` table, by the pipeline that produced them
    /// (`None`: unprocessed).
    pub fn processed_parts(&self) -> impl Iterator<Item = (Option<&PipelineRef>, &[Event])> {
        let main = (
            self.pipeline.as_ref(),
            self.processed.as_deref().unwrap_or(&self.raw),
        );
        let canary = self
            .canary
            .as_ref()
            .map(|c| (c.pipeline.as_ref(), c.events.as_slice()));
        std::iter::once(main).chain(canary)
    }

    /// The events that belong in the `events` table.
    pub fn processed_events(&self) -> impl Iterator<Item = &Event> {
        self.processed_parts().flat_map(|(_, events)| events.iter())
    }

    /// Per raw event (in `raw` order), the share it was in and what became of it. Without
    /// recorded shares (older edges) it is derived from the pipeline and the failures, and
    /// the canary split is unknown.
    pub fn lineage(&self) -> Vec<RawLineage> {
        let n = self.raw.len();
        if !self.shares.is_empty() {
            let mut out = vec![
                RawLineage {
                    version: None,
                    canary: Some(false),
                    outcome: Outcome::Unprocessed,
                };
                n
            ];
            let whole = self.shares.len() == 1;
            for share in &self.shares {
                let l = RawLineage {
                    version: share.version,
                    canary: Some(share.canary),
                    outcome: share.outcome,
                };
                if share.raw.is_empty() && whole {
                    out.iter_mut().for_each(|o| *o = l);
                } else {
                    for &i in &share.raw {
                        if let Some(o) = out.get_mut(i as usize) {
                            *o = l;
                        }
                    }
                }
            }
            return out;
        }
        let failed_version = self
            .failures
            .iter()
            .find(|f| f.stage == FailureStage::Plugin)
            .map(|f| f.pipeline_version);
        let l = match failed_version {
            Some(version) => RawLineage {
                version: version.or(self.pipeline.as_ref().map(|p| p.version)),
                canary: None,
                outcome: if self.processed.as_ref().is_some_and(|p| p.is_empty()) {
                    Outcome::Held
                } else {
                    Outcome::PassedThrough
                },
            },
            None => RawLineage {
                version: self.pipeline.as_ref().map(|p| p.version),
                canary: self.canary.is_none().then_some(false),
                outcome: if self.pipeline.is_some() {
                    Outcome::Processed
                } else {
                    Outcome::Unprocessed
                },
            },
        };
        vec![l; n]
    }

    /// The JSON encoding: what edges wrote before the packed one, and still write when told
    /// to (`--envelope-encoding json`, for an ingest that predates the packed encoding).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain data structures cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The envelope in `encoding`.
    pub fn encode(&self, encoding: Encoding) -> Vec<u8> {
        match encoding {
            Encoding::Packed => self.to_packed(),
            Encoding::Json => self.to_json(),
        }
    }

    /// The packed encoding (layout below): the batch's fields once in a small JSON header,
    /// its events in one buffer of the packed batch layout of plugin contract 1.1
    /// (`beacon-plugin-abi`): raw events, then processed, then canary. No event is JSON
    /// text (no field names per event, no escaping), and a processed event references the
    /// strings it shares with its raw event rather than repeating them.
    ///
    /// ```text
    /// magic "BENV" | layout version u16 = 1 | flags u16 (bit 0: processed, bit 1: canary)
    /// raw events u32 | processed events u32 | canary events u32
    /// header length u32 | header: JSON of the envelope's other fields
    /// events length u32 | one packed batch: the raw, processed and canary events in order
    /// ```
    pub fn to_packed(&self) -> Vec<u8> {
        let header = PackedHeader {
            v: self.v,
            batch_id: &self.batch_id,
            merchant_id: &self.merchant_id,
            edge_id: &self.edge_id,
            received_at: self.received_at,
            pipeline: self.pipeline.as_ref(),
            canary_pipeline: self.canary.as_ref().and_then(|c| c.pipeline.as_ref()),
            failures: &self.failures,
            shares: &self.shares,
        };
        let flags = if self.processed.is_some() {
            FLAG_PROCESSED
        } else {
            0
        } | if self.canary.is_some() {
            FLAG_CANARY
        } else {
            0
        };
        let processed = self.processed.as_deref().unwrap_or_default();
        let canary = self.canary.as_ref().map_or(&[][..], |c| &c.events[..]);
        let events = self.raw.len() + processed.len() + canary.len();
        let mut out = Vec::with_capacity(256 + events * 400);
        out.extend_from_slice(&PACKED_MAGIC);
        out.extend_from_slice(&PACKED_LAYOUT.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        for n in [self.raw.len(), processed.len(), canary.len()] {
            out.extend_from_slice(&(n as u32).to_le_bytes());
        }
        section(&mut out, |out| {
            // Serializing plain data structures into a Vec cannot fail.
            let _ = serde_json::to_writer(out, &header);
        });
        section(&mut out, |out| {
            packed::encode_derived_into(&self.raw, &[processed, canary], out)
        });
        out
    }

    /// An envelope in either encoding: packed (by its magic) or JSON.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.starts_with(&PACKED_MAGIC) {
            Self::from_packed(bytes)
        } else {
            Ok(Self::from_json(bytes)?)
        }
    }

    fn from_packed(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Sections { bytes, at: 4 };
        let layout = r.u16()?;
        if layout != PACKED_LAYOUT {
            return Err(DecodeError::Packed(format!(
                "layout version {layout}, this build reads {PACKED_LAYOUT}"
            )));
        }
        let flags = r.u16()?;
        if flags & !(FLAG_PROCESSED | FLAG_CANARY) != 0 {
            return Err(DecodeError::Packed(format!("unknown flags {flags:#x}")));
        }
        let (raw_n, processed_n, canary_n) = (r.u32()?, r.u32()?, r.u32()?);
        let h: PackedHeaderOwned = serde_json::from_slice(r.section()?)
            .map_err(|e| DecodeError::Packed(format!("header: {e}")))?;
        if h.canary_pipeline.is_some() && flags & FLAG_CANARY == 0 {
            return Err(DecodeError::Packed(
                "a canary pipeline without a canary part".into(),
            ));
        }
        let mut raw = packed::decode_within(r.section()?, MAX_DECODED_STRING_BYTES)
            .map_err(|e| DecodeError::Packed(format!("events: {e}")))?;
        if r.at != bytes.len() {
            return Err(DecodeError::Packed(format!(
                "{} bytes after the last section",
                bytes.len() - r.at
            )));
        }
        // Counts from the buffer: compared in u64, so no sum overflows.
        let counted = u64::from(raw_n) + u64::from(processed_n) + u64::from(canary_n);
        if counted != raw.len() as u64
            || (flags & FLAG_PROCESSED == 0 && processed_n > 0)
            || (flags & FLAG_CANARY == 0 && canary_n > 0)
        {
            return Err(DecodeError::Packed(format!(
                "{} events, but the header counts {raw_n} raw, {processed_n} processed and {canary_n} canary (flags {flags})",
                raw.len()
            )));
        }
        let mut processed = raw.split_off(raw_n as usize);
        let canary_events = processed.split_off(processed_n as usize);
        Ok(Self {
            v: h.v,
            batch_id: h.batch_id,
            merchant_id: h.merchant_id,
            edge_id: h.edge_id,
            received_at: h.received_at,
            pipeline: h.pipeline,
            raw,
            processed: (flags & FLAG_PROCESSED != 0).then_some(processed),
            canary: (flags & FLAG_CANARY != 0).then_some(CanaryPart {
                pipeline: h.canary_pipeline,
                events: canary_events,
            }),
            failures: h.failures,
            shares: h.shares,
        })
    }
}

/// How an edge writes envelopes on the bus. Ingest reads both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Encoding {
    /// Binary ([`Envelope::to_packed`]); the default.
    #[default]
    Packed,
    /// JSON text, as edges before the packed encoding wrote it.
    Json,
}

impl std::str::FromStr for Encoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "packed" => Ok(Self::Packed),
            "json" => Ok(Self::Json),
            _ => Err(format!("unknown envelope encoding {s:?} (packed or json)")),
        }
    }
}

/// The string bytes a packed envelope's events may name in all, shared ones counted each
/// time (processed events share their raw events' strings). Twice the plugin host's default
/// output cap (32 MiB, per share) plus room for the raw events: an envelope an edge wrote
/// stays far below it, and a crafted one cannot make ingest allocate more.
pub const MAX_DECODED_STRING_BYTES: u64 = 128 << 20;

/// Flags of a packed envelope: which parts follow the raw events.
const FLAG_PROCESSED: u16 = 1;
const FLAG_CANARY: u16 = 2;

/// Magic of a packed envelope (a JSON one starts with `{`).
pub const PACKED_MAGIC: [u8; 4] = *b"BENV";
const PACKED_LAYOUT: u16 = 1;

/// An envelope that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("packed envelope: {0}")]
    Packed(String),
}

/// Appends a length-prefixed section that `write` fills.
fn section(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    write(out);
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// Reads a packed envelope's fields in order, each bounds-checked.
struct Sections<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Sections<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(DecodeError::Packed(format!(
                "ends inside a section (needs {n} bytes at byte {})",
                self.at
            )));
        };
        let b = &self.bytes[self.at..end];
        self.at = end;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn section(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()?;
        self.take(len as usize)
    }
}

/// The packed envelope's header: every field but the events.
#[derive(Serialize)]
struct PackedHeader<'a> {
    v: u32,
    batch_id: &'a str,
    merchant_id: &'a str,
    edge_id: &'a str,
    received_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pipeline: Option<&'a PipelineRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    canary_pipeline: Option<&'a PipelineRef>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    failures: &'a [Failure],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    shares: &'a [Share],
}

#[derive(Deserialize)]
struct PackedHeaderOwned {
    v: u32,
    batch_id: String,
    merchant_id: String,
    edge_id: String,
    received_at: i64,
    #[serde(default)]
    pipeline: Option<PipelineRef>,
    #[serde(default)]
    canary_pipeline: Option<PipelineRef>,
    #[serde(default)]
    failures: Vec<Failure>,
    #[serde(default)]
    shares: Vec<Share>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let env = Envelope {
            v: ENVELOPE_VERSION,
            batch_id: "edge-1:7".into(),
            merchant_id: "m1".into(),
            edge_id: "edge-1".into(),
            received_at: 1,
            pipeline: Some(PipelineRef {
                merchant_id: "m1".into(),
                version: 3,
                plugins: vec![PluginRef {
                    name: "utm".into(),
                    sha256: "ab".into(),
                    config: "{}".into(),
                }],
            }),
            raw: vec![],
            processed: Some(vec![]),
            canary: Some(CanaryPart {
                pipeline: None,
                events: vec![],
            }),
            failures: vec![Failure {
                stage: FailureStage::Plugin,
                event_id: "e".into(),
                plugin: Some("utm@ab".into()),
                pipeline_version: Some(3),
                reason: "fuel".into(),
                payload: "{}".into(),
            }],
            shares: vec![Share {
                version: Some(3),
                canary: true,
                outcome: Outcome::Held,
                raw: vec![0, 2],
            }],
        };
        assert_eq!(Envelope::from_json(&env.to_json()).unwrap(), env);
        assert_eq!(Envelope::decode(&env.to_json()).unwrap(), env);
        assert_eq!(Envelope::decode(&env.to_packed()).unwrap(), env);
    }

    /// Every part of an envelope survives the packed encoding, in every combination of
    /// the optional parts; JSON still reads.
    #[test]
    fn packed_round_trip() {
        let mut env =
            Envelope::undecodable("e:1".into(), "m1".into(), "e".into(), 5, b"", "x".into());
        env.v = ENVELOPE_VERSION_CANARY;
        env.raw = vec![event("a"), event("b")];
        env.raw[1]
            .properties
            .insert("utm_source".into(), "x\"y".into());
        env.raw[1].revenue_micros = Some(-1);
        env.pipeline = Some(PipelineRef {
            merchant_id: "m1".into(),
            version: 2,
            plugins: vec![],
        });
        for processed in [None, Some(vec![]), Some(vec![event("a")])] {
            for canary in [
                None,
                Some(CanaryPart {
                    pipeline: None,
                    events: vec![event("b")],
                }),
                Some(CanaryPart {
                    pipeline: env.pipeline.clone(),
                    events: vec![],
                }),
            ] {
                env.processed = processed.clone();
                env.canary = canary;
                let packed = env.encode(Encoding::Packed);
                assert!(packed.starts_with(&PACKED_MAGIC));
                assert_eq!(Envelope::decode(&packed).unwrap(), env);
                assert_eq!(Envelope::decode(&env.encode(Encoding::Json)).unwrap(), env);
            }
        }
    }

    /// A packed envelope cut anywhere, or with bytes added, flipped or a section grown, is
    /// an error that says where, never a panic.
    #[test]
    fn malformed_packed_envelopes_are_errors() {
        let mut env =
            Envelope::undecodable("e:1".into(), "m1".into(), "e".into(), 5, b"", "x".into());
        env.raw = vec![event("a"), event("b")];
        env.processed = Some(vec![event("a")]);
        let ok = env.to_packed();
        for cut in 0..ok.len() {
            assert!(Envelope::decode(&ok[..cut]).is_err(), "cut at {cut}");
        }
        let mut v = ok.clone();
        v.push(0);
        let e = Envelope::decode(&v).unwrap_err().to_string();
        assert!(e.contains("1 bytes after the last section"), "{e}");
        let mut v = ok.clone();
        v[4] = 9;
        let e = Envelope::decode(&v).unwrap_err().to_string();
        assert!(e.contains("layout version 9"), "{e}");
        for i in 0..ok.len() {
            for bit in 0..8 {
                let mut v = ok.clone();
                v[i] ^= 1 << bit;
                // Ok (a flipped byte inside a string or number) or an error: no panic.
                let _ = Envelope::decode(&v);
            }
        }
        // An event reference past the strings: named, with the part it is in.
        let raw_at = ok.windows(4).position(|w| w == b"BPB1").unwrap();
        let mut v = ok.clone();
        v[raw_at + 20 + 7] = 0xff;
        let e = Envelope::decode(&v).unwrap_err().to_string();
        assert!(e.contains("events: string out of bounds"), "{e}");
        let mut v = ok.clone();
        v[6] |= 4;
        let e = Envelope::decode(&v).unwrap_err().to_string();
        assert!(e.contains("unknown flags"), "{e}");
        // Counts that do not match the events.
        let mut v = ok.clone();
        v[8] = 3;
        let e = Envelope::decode(&v).unwrap_err().to_string();
        assert!(e.contains("3 raw, 1 processed"), "{e}");
    }

    /// What ingest keeps of an undecodable packed envelope is hex: lossy text could not be
    /// decoded again.
    #[test]
    fn undecodable_packed_payloads_are_kept_as_hex() {
        let env = Envelope::undecodable(
            "".into(),
            "".into(),
            "".into(),
            0,
            b"BENV\x00\xff",
            "bad".into(),
        );
        assert_eq!(env.failures[0].payload, "hex:42454e5600ff");
        let env =
            Envelope::undecodable("".into(), "".into(), "".into(), 0, b"{\"v\"", "bad".into());
        assert_eq!(env.failures[0].payload, "{\"v\"");
    }

    fn event(id: &str) -> Event {
        serde_json::from_value(serde_json::json!({
            "event_id": id, "merchant_id": "m1", "name": "pageview", "ts": 1
        }))
        .unwrap()
    }

    #[test]
    fn lineage_follows_recorded_shares_and_is_derived_without_them() {
        let pipeline = |version| PipelineRef {
            merchant_id: "m1".into(),
            version,
            plugins: vec![],
        };
        let mut env =
            Envelope::undecodable("b".into(), "m1".into(), "e".into(), 1, b"", "x".into());
        env.failures.clear();
        env.raw = vec![event("a"), event("b"), event("c")];
        env.pipeline = Some(pipeline(3));
        env.processed = Some(vec![event("a"), event("c")]);
        env.shares = vec![
            Share {
                version: Some(3),
                canary: false,
                outcome: Outcome::Processed,
                raw: vec![0, 2],
            },
            Share {
                version: Some(4),
                canary: true,
                outcome: Outcome::Held,
                raw: vec![1],
            },
        ];
        let l = env.lineage();
        assert_eq!(
            l[0],
            RawLineage {
                version: Some(3),
                canary: Some(false),
                outcome: Outcome::Processed
            }
        );
        assert_eq!(
            l[1],
            RawLineage {
                version: Some(4),
                canary: Some(true),
                outcome: Outcome::Held
            }
        );
        assert_eq!(l[2], l[0]);
        // A second share with no positions covers nothing (only a lone share is the batch).
        env.shares[0].raw = vec![0, 1, 2];
        env.shares[1].raw.clear();
        assert!(env
            .lineage()
            .iter()
            .all(|l| l.canary == Some(false) && l.version == Some(3)));

        // An older edge's envelope: a held plugin failure, no split recorded.
        env.shares.clear();
        env.canary = None;
        env.processed = Some(Vec::new());
        env.failures = vec![Failure {
            stage: FailureStage::Plugin,
            event_id: "a".into(),
            plugin: None,
            pipeline_version: Some(3),
            reason: "trap".into(),
            payload: String::new(),
        }];
        let l = env.lineage();
        assert!(l
            .iter()
            .all(|l| l.outcome == Outcome::Held && l.version == Some(3)));
        env.pipeline = None;
        env.processed = None;
        env.failures.clear();
        assert!(env
            .lineage()
            .iter()
            .all(|l| l.outcome == Outcome::Unprocessed && l.canary == Some(false)));
    }
}
