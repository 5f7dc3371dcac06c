//! The rollup hours a job touches: per merchant, the time range of the rows it replaces or
//! removes, kept in the job's record (so a resumed job still rebuilds them) and rebuilt at
//! its end.

use std::collections::BTreeMap;

use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use beacon_warehouse::replace::Outcome;
use beacon_warehouse::rewrite::{i64_column, str_column};
use beacon_warehouse::rollup::{self, HourSpan};
use beacon_warehouse::{Warehouse, WarehouseError};

/// Per merchant, `[min, max]` event time in epoch milliseconds.
pub type Spans = BTreeMap<String, (i64, i64)>;

/// Widens `merchant`'s range to cover `[lo, hi]`.
pub fn widen(spans: &mut Spans, merchant: &str, lo: i64, hi: i64) {
    match spans.get_mut(merchant) {
        Some(s) => *s = (s.0.min(lo), s.1.max(hi)),
        None => {
            spans.insert(merchant.to_string(), (lo, hi));
        }
    }
}

/// Widens by the `ts` of `events` rows (microseconds in the table).
pub fn widen_rows(spans: &mut Spans, rows: &RecordBatch) -> Result<(), ArrowError> {
    let merchants = str_column(rows, "merchant_id")?;
    let ts = i64_column(rows, "ts")?;
    for (m, t) in merchants.iter().zip(ts.iter()) {
        if let (Some(m), Some(t)) = (m, t) {
            let ms = t.div_euclid(1000);
            widen(spans, m, ms, ms);
        }
    }
    Ok(())
}

/// Rebuilds the rollup hours of `spans` (job `<job_id>/<table>`); returns the rows written
/// and, per rollup table, the snapshot committed.
pub async fn rebuild(
    wh: &Warehouse,
    spans: &Spans,
    job_id: &str,
    commits: &mut BTreeMap<String, i64>,
) -> Result<u64, WarehouseError> {
    let hours: Vec<HourSpan> = spans
        .iter()
        .map(|(m, (lo, hi))| HourSpan::covering(m, lo * 1000, hi * 1000))
        .collect();
    let mut rows = 0;
    for r in rollup::rebuild(wh, &hours, job_id).await? {
        rows += r.report.rows_added;
        if let Some(Outcome::Committed { snapshot_id, .. }) = r.report.outcome {
            commits.insert(r.kind.name().into(), snapshot_id);
        }
    }
    Ok(rows)
}
