//! Per-day figures of the rows a job replaces, before and after: what `--dry-run` shows.

use std::collections::{BTreeMap, HashSet};

use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use beacon_proto::event::PAGEVIEW;
use beacon_proto::Event;
use beacon_warehouse::rewrite::{i64_column, str_column};
use serde::Serialize;

const DAY_MS: i64 = 86_400_000;

#[derive(Default)]
struct Day {
    rows: u64,
    pageviews: u64,
    visitors: HashSet<String>,
    /// By currency.
    revenue_micros: BTreeMap<String, i64>,
}

/// (merchant, UTC day) -> figures.
#[derive(Default)]
pub(crate) struct Stats(BTreeMap<(String, i64), Day>);

impl Stats {
    fn add(
        &mut self,
        merchant: &str,
        ts_ms: i64,
        name: &str,
        visitor: Option<&str>,
        revenue: Option<(i64, &str)>,
    ) {
        let day = self
            .0
            .entry((merchant.to_string(), ts_ms.div_euclid(DAY_MS)))
            .or_default();
        day.rows += 1;
        if name == PAGEVIEW {
            day.pageviews += 1;
        }
        if let Some(v) = visitor {
            if !day.visitors.contains(v) {
                day.visitors.insert(v.to_string());
            }
        }
        if let Some((micros, currency)) = revenue {
            *day.revenue_micros.entry(currency.to_string()).or_default() += micros;
        }
    }

    pub(crate) fn add_event(&mut self, e: &Event) {
        let revenue = e.revenue_micros.zip(e.currency.as_deref());
        self.add(
            &e.merchant_id,
            e.ts,
            &e.name,
            e.visitor_id.as_deref(),
            revenue,
        );
    }

    /// `events` rows.
    pub(crate) fn add_rows(&mut self, b: &RecordBatch) -> Result<(), ArrowError> {
        let merchant = str_column(b, "merchant_id")?;
        let name = str_column(b, "name")?;
        let visitor = str_column(b, "visitor_id")?;
        let currency = str_column(b, "currency")?;
        let ts = i64_column(b, "ts")?;
        let revenue = i64_column(b, "revenue_micros")?;
        for i in 0..b.num_rows() {
            use arrow::array::Array;
            let rev = (revenue.is_valid(i) && currency.is_valid(i))
                .then(|| (revenue.value(i), currency.value(i)));
            self.add(
                merchant.value(i),
                ts.value(i).div_euclid(1000),
                name.value(i),
                visitor.is_valid(i).then(|| visitor.value(i)),
                rev,
            );
        }
        Ok(())
    }

    pub(crate) fn rows(&self) -> u64 {
        self.0.values().map(|d| d.rows).sum()
    }
}

/// One merchant-day's figures before and after.
#[derive(Debug, Clone, Serialize)]
pub struct DayDelta {
    pub merchant_id: String,
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    pub events: (u64, u64),
    pub pageviews: (u64, u64),
    pub visitors: (u64, u64),
    /// Currency -> (before, after), in micros.
    pub revenue_micros: BTreeMap<String, (i64, i64)>,
}

pub(crate) fn deltas(before: &Stats, after: &Stats) -> Vec<DayDelta> {
    let keys: std::collections::BTreeSet<&(String, i64)> =
        before.0.keys().chain(after.0.keys()).collect();
    let empty = Day::default();
    keys.into_iter()
        .map(|k| {
            let (b, a) = (
                before.0.get(k).unwrap_or(&empty),
                after.0.get(k).unwrap_or(&empty),
            );
            let mut revenue: BTreeMap<String, (i64, i64)> = BTreeMap::new();
            for (c, v) in &b.revenue_micros {
                revenue.entry(c.clone()).or_default().0 = *v;
            }
            for (c, v) in &a.revenue_micros {
                revenue.entry(c.clone()).or_default().1 = *v;
            }
            DayDelta {
                merchant_id: k.0.clone(),
                day: chrono::DateTime::from_timestamp_millis(k.1 * DAY_MS)
                    .map(|d| d.format("%Y-%m-%d").to_string())
                    .unwrap_or_default(),
                events: (b.rows, a.rows),
                pageviews: (b.pageviews, a.pageviews),
                visitors: (b.visitors.len() as u64, a.visitors.len() as u64),
                revenue_micros: revenue,
            }
        })
        .collect()
}
