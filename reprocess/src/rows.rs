//! `raw_events` rows back into the batches the edge processed.

use std::collections::BTreeMap;

use arrow::array::{Array, AsArray, BooleanArray, Int64Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use beacon_ingest::convert::Received;
use beacon_proto::envelope::ENVELOPE_VERSION;
use beacon_proto::{Envelope, Event};
use beacon_warehouse::rewrite::{i64_column, str_column};

/// The columns [`envelopes`] reads, in the order the reader selects them.
pub const COLUMNS: &str = "event_id, merchant_id, name, ts, received_at, url, referrer, title, \
     visitor_id, session_id, user_id, revenue_micros, currency, properties, edge_id, batch_id, \
     stream_seq, batch_index";

/// The order that gives back each batch as the edge saw it: one JetStream message (one
/// `stream_seq`) is one edge batch, its events by position. Rows from before lineage was
/// recorded have no position; they follow in time order.
pub const ORDER: &str = "stream_seq, batch_index NULLS LAST, ts, event_id";

/// Groups rows (in [`ORDER`]) into one raw-only envelope per `stream_seq`.
pub fn envelopes(batches: &[RecordBatch]) -> Result<Vec<Received>, ArrowError> {
    let mut out: Vec<Received> = Vec::new();
    for b in batches {
        let s = |name| str_column(b, name);
        let (event_id, merchant, name) = (s("event_id")?, s("merchant_id")?, s("name")?);
        let (url, referrer, title) = (s("url")?, s("referrer")?, s("title")?);
        let (visitor, session, user) = (s("visitor_id")?, s("session_id")?, s("user_id")?);
        let (currency, edge, batch_id) = (s("currency")?, s("edge_id")?, s("batch_id")?);
        let ts = i64_column(b, "ts")?;
        let received = i64_column(b, "received_at")?;
        let revenue = i64_column(b, "revenue_micros")?;
        let seq = i64_column(b, "stream_seq")?;
        let props = properties(b)?;
        for (i, properties) in props.into_iter().enumerate() {
            let opt = |a: &StringArray| a.is_valid(i).then(|| a.value(i).to_string());
            let event = Event {
                event_id: event_id.value(i).to_string(),
                merchant_id: merchant.value(i).to_string(),
                name: name.value(i).to_string(),
                ts: ts.value(i).div_euclid(1000),
                received_at: received.value(i).div_euclid(1000),
                url: opt(&url),
                referrer: opt(&referrer),
                title: opt(&title),
                visitor_id: opt(&visitor),
                session_id: opt(&session),
                user_id: opt(&user),
                revenue_micros: revenue.is_valid(i).then(|| revenue.value(i)),
                currency: opt(&currency),
                properties,
            };
            let row_seq = seq.value(i) as u64;
            match out.last_mut() {
                Some(r) if r.seq == row_seq => r.envelope.raw.push(event),
                _ => out.push(Received::new(
                    row_seq,
                    Envelope {
                        v: ENVELOPE_VERSION,
                        batch_id: batch_id.value(i).to_string(),
                        merchant_id: event.merchant_id.clone(),
                        edge_id: edge.value(i).to_string(),
                        received_at: event.received_at,
                        pipeline: None,
                        raw: vec![event],
                        processed: None,
                        canary: None,
                        failures: Vec::new(),
                        shares: Vec::new(),
                    },
                )),
            }
        }
    }
    Ok(out)
}

fn properties(b: &RecordBatch) -> Result<Vec<BTreeMap<String, String>>, ArrowError> {
    let col = b
        .column_by_name("properties")
        .ok_or_else(|| ArrowError::SchemaError("no column properties".into()))?;
    let map = col
        .as_map_opt()
        .ok_or_else(|| ArrowError::SchemaError("properties is not a map".into()))?;
    let keys = cast(map.keys(), &DataType::Utf8)?;
    let values = cast(map.values(), &DataType::Utf8)?;
    let (keys, values) = (keys.as_string::<i32>(), values.as_string::<i32>());
    let offsets = map.value_offsets();
    Ok((0..map.len())
        .map(|i| {
            if map.is_null(i) {
                return BTreeMap::new();
            }
            (offsets[i] as usize..offsets[i + 1] as usize)
                .filter(|&j| keys.is_valid(j) && values.is_valid(j))
                .map(|j| (keys.value(j).to_string(), values.value(j).to_string()))
                .collect()
        })
        .collect())
}

/// `true` where `column` (an integer) is in `set`.
pub fn in_set(
    b: &RecordBatch,
    column: &str,
    set: &std::collections::HashSet<i64>,
) -> Result<BooleanArray, ArrowError> {
    let values: Int64Array = i64_column(b, column)?;
    Ok(values
        .iter()
        .map(|v| Some(v.is_some_and(|v| set.contains(&v))))
        .collect())
}
