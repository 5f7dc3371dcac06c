//! Batch envelopes -> Arrow record batches shaped exactly like the Iceberg tables.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Int64Builder, MapBuilder, MapFieldNames, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, SchemaRef};
use arrow::error::ArrowError;
use beacon_proto::{Envelope, Event};

use beacon_warehouse::tables::EVENT_DIMENSIONS;

use crate::dedupe::Duplicates;
use crate::dimensions::Dimensions;

/// One envelope as read from the stream.
pub struct Received {
    pub seq: u64,
    /// When the stream stored it (ms): the clock of per-event deduplication.
    pub stored_at: i64,
    pub envelope: Envelope,
    /// Its rows that are already stored (`crate::dedupe`): left out of every table.
    pub duplicates: Duplicates,
}

impl Received {
    /// Message `seq` holding `envelope`, taken to be stored when the edge received it (the
    /// stream's own time is set by the consumer that read it).
    pub fn new(seq: u64, envelope: Envelope) -> Self {
        Self {
            seq,
            stored_at: envelope.received_at,
            envelope,
            duplicates: Duplicates::default(),
        }
    }

    /// Whether the processed event at `index` (of `envelope.processed_events()`) is an
    /// `events` row: not a duplicate, and not a bot's (flagged by the edge's enrichment; bots
    /// stay in `raw_events`, uncounted).
    fn keeps_processed(&self, index: usize, e: &Event) -> bool {
        !self.duplicates.processed(index) && !is_bot(e)
    }
}

/// Set by the edge from the user agent; see `beacon_edge::enrich`.
pub fn is_bot(e: &Event) -> bool {
    e.properties.contains_key("$bot")
}

/// Builds the rows of `raw_events` (`processed == false`) or `events` from `items`.
pub fn events_batch(
    schema: &SchemaRef,
    items: &[&Received],
    processed: bool,
) -> Result<RecordBatch, ArrowError> {
    let rows: Vec<(&Received, &Event)> = items
        .iter()
        .flat_map(|r| -> Box<dyn Iterator<Item = (&Received, &Event)>> {
            if processed {
                Box::new(
                    r.envelope
                        .processed_events()
                        .enumerate()
                        .filter(|(i, e)| r.keeps_processed(*i, e))
                        .map(move |(_, e)| (*r, e)),
                )
            } else {
                Box::new(
                    r.envelope
                        .raw
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !r.duplicates.raw(*i))
                        .map(move |(_, e)| (*r, e)),
                )
            }
        })
        .collect();
    let n = rows.len();
    // Borrowed values: no per-row string copies on the way into Arrow.
    let str_col = |f: &dyn for<'a> Fn(&'a Received, &'a Event) -> Option<&'a str>| -> ArrayRef {
        let mut b = StringBuilder::with_capacity(n, n * 16);
        for (r, e) in &rows {
            b.append_option(f(r, e));
        }
        Arc::new(b.finish())
    };
    let ts_col = |f: &dyn Fn(&Event) -> i64| -> ArrayRef {
        let mut b = TimestampMicrosecondBuilder::with_capacity(n);
        for (_, e) in &rows {
            b.append_value(f(e).saturating_mul(1000));
        }
        Arc::new(b.finish().with_timezone("+00:00"))
    };
    let mut revenue = Int64Builder::with_capacity(n);
    let mut seq = Int64Builder::with_capacity(n);
    for (r, e) in &rows {
        revenue.append_option(e.revenue_micros);
        seq.append_value(r.seq as i64);
    }
    let mut props = map_builder(schema.field_with_name("properties")?)?;
    for (_, e) in &rows {
        for (k, v) in &e.properties {
            props.keys().append_value(k);
            props.values().append_value(v);
        }
        props.append(true)?;
    }
    let mut columns: Vec<ArrayRef> = vec![
        str_col(&|_, e| Some(&e.event_id)),
        str_col(&|_, e| Some(&e.merchant_id)),
        str_col(&|_, e| Some(&e.name)),
        ts_col(&|e| e.ts),
        ts_col(&|e| e.received_at),
        str_col(&|_, e| e.url.as_deref()),
        str_col(&|_, e| e.referrer.as_deref()),
        str_col(&|_, e| e.title.as_deref()),
        str_col(&|_, e| e.visitor_id.as_deref()),
        str_col(&|_, e| e.session_id.as_deref()),
        str_col(&|_, e| e.user_id.as_deref()),
        Arc::new(revenue.finish()),
        str_col(&|_, e| e.currency.as_deref()),
        Arc::new(props.finish()),
        str_col(&|r, _| Some(&r.envelope.edge_id)),
        str_col(&|r, _| Some(&r.envelope.batch_id)),
        Arc::new(seq.finish()),
    ];
    if processed {
        // One label per pipeline part of an envelope, not per row.
        let mut b = StringBuilder::with_capacity(n, n * 4);
        for r in items {
            let mut index = 0;
            for (pipeline, events) in r.envelope.processed_parts() {
                let label = pipeline.map(|p| p.label());
                for e in events {
                    if r.keeps_processed(index, e) {
                        b.append_option(label.as_deref());
                    }
                    index += 1;
                }
            }
        }
        columns.push(Arc::new(b.finish()));
        columns.extend(dimension_columns(&rows));
    } else {
        // Lineage: where each raw event sat in its batch and what the edge made of it, so
        // re-processing can re-run the batch exactly (`beacon reprocess`).
        let mut index = Int64Builder::with_capacity(n);
        let mut version = Int64Builder::with_capacity(n);
        let mut canary = BooleanBuilder::with_capacity(n);
        let mut outcome = StringBuilder::with_capacity(n, n * 10);
        for r in items {
            for (i, l) in r.envelope.lineage().into_iter().enumerate() {
                if r.duplicates.raw(i) {
                    continue;
                }
                index.append_value(i as i64);
                version.append_option(l.version.map(|v| v as i64));
                canary.append_option(l.canary);
                outcome.append_value(l.outcome.as_str());
            }
        }
        columns.push(Arc::new(index.finish()));
        columns.push(Arc::new(version.finish()));
        columns.push(Arc::new(canary.finish()));
        columns.push(Arc::new(outcome.finish()));
    }
    RecordBatch::try_new(schema.clone(), columns)
}

/// The derived breakdown columns of `events`, in [`EVENT_DIMENSIONS`] order.
fn dimension_columns(rows: &[(&Received, &Event)]) -> Vec<ArrayRef> {
    let n = rows.len();
    let mut builders: Vec<StringBuilder> = EVENT_DIMENSIONS
        .iter()
        .map(|_| StringBuilder::with_capacity(n, n * 8))
        .collect();
    for (_, e) in rows {
        let d = Dimensions::derive(e);
        let values: [Option<&str>; EVENT_DIMENSIONS.len()] = [
            d.hostname,
            d.path,
            d.source.as_deref(),
            d.medium.as_deref(),
            d.utm_source.as_deref(),
            d.utm_medium.as_deref(),
            d.utm_campaign.as_deref(),
            d.country,
            d.region,
            d.city,
            d.device,
            d.browser,
            d.os,
        ];
        for (b, v) in builders.iter_mut().zip(values) {
            b.append_option(v);
        }
    }
    builders
        .into_iter()
        .map(|mut b| Arc::new(b.finish()) as ArrayRef)
        .collect()
}

/// Builds the rows of `failed_events` from `items`.
pub fn failures_batch(schema: &SchemaRef, items: &[&Received]) -> Result<RecordBatch, ArrowError> {
    let rows: Vec<_> = items
        .iter()
        .flat_map(|r| {
            let stored = stored_before(r);
            r.envelope
                .failures
                .iter()
                .filter(move |f| f.event_id.is_empty() || !stored.contains(f.event_id.as_str()))
                .map(move |f| (*r, f))
        })
        .collect();
    let n = rows.len();
    let mut cols: Vec<StringBuilder> = (0..8)
        .map(|_| StringBuilder::with_capacity(n, n * 32))
        .collect();
    let mut version = Int64Builder::with_capacity(n);
    let mut received = TimestampMicrosecondBuilder::with_capacity(n);
    let mut seq = Int64Builder::with_capacity(n);
    // Plugin failures carry no payload of their own (the edge keeps envelopes small): the
    // failed event is the raw one with the same id in the same envelope.
    let mut raw_by_id: Option<(u64, std::collections::HashMap<&str, &Event>)> = None;
    for (r, f) in &rows {
        let filled;
        let payload = if f.payload.is_empty() && !f.event_id.is_empty() {
            if raw_by_id.as_ref().is_none_or(|(seq, _)| *seq != r.seq) {
                let map = r
                    .envelope
                    .raw
                    .iter()
                    .rev() // the first event with an id wins
                    .map(|e| (e.event_id.as_str(), e))
                    .collect();
                raw_by_id = Some((r.seq, map));
            }
            filled = raw_by_id
                .as_ref()
                .and_then(|(_, m)| m.get(f.event_id.as_str()))
                .map(|e| serde_json::to_string(e).unwrap_or_default())
                .unwrap_or_default();
            filled.as_str()
        } else {
            f.payload.as_str()
        };
        cols[0].append_value(&r.envelope.merchant_id);
        cols[1].append_value(&r.envelope.batch_id);
        cols[2].append_value(&f.event_id);
        cols[3].append_value(f.stage.as_str());
        cols[4].append_option(f.plugin.as_deref());
        version.append_option(f.pipeline_version.map(|v| v as i64));
        cols[5].append_value(&f.reason);
        cols[6].append_value(payload);
        received.append_value(r.envelope.received_at.saturating_mul(1000));
        cols[7].append_value(&r.envelope.edge_id);
        seq.append_value(r.seq as i64);
    }
    let mut s = cols
        .into_iter()
        .map(|mut b| Arc::new(b.finish()) as ArrayRef);
    let mut next = || {
        s.next()
            .ok_or_else(|| ArrowError::SchemaError("column count".into()))
    };
    let columns: Vec<ArrayRef> = vec![
        next()?,
        next()?,
        next()?,
        next()?,
        next()?,
        Arc::new(version.finish()),
        next()?,
        next()?,
        Arc::new(received.finish().with_timezone("+00:00")),
        next()?,
        Arc::new(seq.finish()),
    ];
    RecordBatch::try_new(schema.clone(), columns)
}

/// The ids of `r`'s raw events that are all duplicates (none of their occurrences in `r` is
/// kept): a failure of one of them was recorded with its first copy.
fn stored_before(r: &Received) -> std::collections::HashSet<&str> {
    if r.duplicates.raw.is_empty() {
        return Default::default();
    }
    let (mut dup, mut kept) = (
        std::collections::HashSet::new(),
        std::collections::HashSet::new(),
    );
    for (i, e) in r.envelope.raw.iter().enumerate() {
        if r.duplicates.raw(i) {
            &mut dup
        } else {
            &mut kept
        }
        .insert(e.event_id.as_str());
    }
    dup.retain(|id| !kept.contains(id));
    dup
}

/// A map builder whose entry/key/value fields (names, nullability, field ids) match `field`.
fn map_builder(field: &Field) -> Result<MapBuilder<StringBuilder, StringBuilder>, ArrowError> {
    let DataType::Map(entries, _) = field.data_type() else {
        return Err(ArrowError::SchemaError(format!(
            "{} is not a map",
            field.name()
        )));
    };
    let DataType::Struct(kv) = entries.data_type() else {
        return Err(ArrowError::SchemaError(
            "map entries are not a struct".into(),
        ));
    };
    Ok(MapBuilder::new(
        Some(MapFieldNames {
            entry: entries.name().clone(),
            key: kv[0].name().clone(),
            value: kv[1].name().clone(),
        }),
        StringBuilder::new(),
        StringBuilder::new(),
    )
    .with_keys_field(kv[0].clone())
    .with_values_field(kv[1].clone()))
}
