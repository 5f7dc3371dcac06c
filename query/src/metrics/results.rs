//! The rows of a plan's sources merged into Plausible's `results`: one row per combination
//! of dimension values, metrics in the requested order, sorted and paged, plus what
//! `include` asked for.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{json, Map, Value};

use super::dates::time_labels;
use super::plan::{Plan, SortKey, SourceKind};
use super::request::{bad, Dim, Metric, QueryError};

/// A query's answer: what the cache keeps and the API sends.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub results: Vec<Value>,
    /// Added to the response's `meta` (`total_rows`, `time_labels`, `currency`, ...).
    pub meta: Map<String, Value>,
}

#[derive(Default)]
struct Row {
    dims: Vec<Value>,
    values: Map<String, Value>,
    /// Orders and revenue in micros. One currency per row: several in one answer are
    /// refused unless `event:currency` is a dimension.
    revenue: (i64, i64),
}

impl Plan {
    /// Merges the rows of every source (JSON objects: `d0..` dimension values and metric
    /// columns).
    pub fn results(&self, rows: &[(SourceKind, Vec<Value>)]) -> Result<Answer, QueryError> {
        let time_index = self.dims.iter().position(Dim::is_time);
        let currency_index = self.dims.iter().position(Dim::is_currency);
        let dim_columns: Vec<String> = (0..self.dims.len()).map(|i| format!("d{i}")).collect();
        let mut merged: BTreeMap<String, Row> = BTreeMap::new();
        let mut totals: HashMap<String, Value> = HashMap::new();
        let mut currencies = BTreeSet::new();
        for (kind, rows) in rows {
            for row in rows {
                let Some(obj) = row.as_object() else { continue };
                if *kind == SourceKind::Totals {
                    let t = obj.get("t").map(Value::to_string).unwrap_or_default();
                    totals.insert(t, obj.get("total_visitors").cloned().unwrap_or(Value::Null));
                    continue;
                }
                let dims: Vec<Value> = dim_columns
                    .iter()
                    .map(|c| obj.get(c).cloned().unwrap_or(Value::Null))
                    .collect();
                let key = serde_json::to_string(&dims).unwrap_or_default();
                let entry = merged.entry(key).or_insert_with(|| Row {
                    dims,
                    ..Row::default()
                });
                if *kind == SourceKind::Revenue {
                    let currency = currency_index
                        .and_then(|i| entry.dims[i].as_str())
                        .or_else(|| obj.get("currency").and_then(Value::as_str))
                        .unwrap_or_default()
                        .to_string();
                    let n = |k: &str| obj.get(k).and_then(Value::as_i64).unwrap_or(0);
                    entry.revenue.0 += n("orders");
                    entry.revenue.1 += n("revenue_micros");
                    currencies.insert(currency);
                    continue;
                }
                for (k, v) in obj {
                    // The sessions source also counts event metrics; the event source wins.
                    if dim_columns.contains(k)
                        || (*kind == SourceKind::Sessions && entry.values.contains_key(k))
                    {
                        continue;
                    }
                    entry.values.insert(k.clone(), v.clone());
                }
            }
        }
        if currencies.len() > 1 && currency_index.is_none() {
            return Err(bad(
                "metrics",
                format!(
                    "revenue in several currencies ({}): filter by one with \
                     [\"is\", \"event:currency\", [..]] or add the dimension event:currency",
                    currencies.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        if merged.is_empty() && self.dims.is_empty() {
            merged.insert(String::new(), Row::default());
        }
        let mut out: Vec<(Vec<Value>, Vec<Value>)> = merged
            .into_values()
            .map(|row| {
                let metrics = self
                    .metrics
                    .iter()
                    .map(|m| self.metric(*m, &row, time_index, &totals))
                    .collect();
                (row.dims, metrics)
            })
            .collect();
        out.sort_by(|a, b| {
            for (key, desc) in &self.order {
                let (x, y) = match key {
                    SortKey::Metric(i) => (a.1.get(*i), b.1.get(*i)),
                    SortKey::Dim(i) => (a.0.get(*i), b.0.get(*i)),
                };
                let o = compare(x, y);
                let o = if *desc { o.reverse() } else { o };
                if o != Ordering::Equal {
                    return o;
                }
            }
            Ordering::Equal
        });
        let mut meta = Map::new();
        if self.include.total_rows {
            meta.insert("total_rows".into(), out.len().into());
        }
        if self.include.imports {
            meta.insert("imports_included".into(), false.into());
        }
        if let (true, Some(Dim::Time(t))) =
            (self.include.time_labels, time_index.map(|i| &self.dims[i]))
        {
            meta.insert(
                "time_labels".into(),
                time_labels(self.tz, self.from, self.to, *t).into(),
            );
        }
        if let ([one], None) = (
            currencies.iter().collect::<Vec<_>>().as_slice(),
            currency_index,
        ) {
            meta.insert("currency".into(), one.as_str().into());
        }
        let results = out
            .into_iter()
            .skip(self.offset as usize)
            .take(self.limit as usize)
            .map(|(dims, metrics)| json!({"metrics": metrics, "dimensions": dims}))
            .collect();
        Ok(Answer { results, meta })
    }

    fn metric(
        &self,
        m: Metric,
        row: &Row,
        time_index: Option<usize>,
        totals: &HashMap<String, Value>,
    ) -> Value {
        let (orders, micros) = row.revenue;
        match m {
            Metric::ConversionRate => {
                let t = time_index
                    .map(|i| row.dims[i].to_string())
                    .unwrap_or_default();
                let visitors = row.values.get("visitors").and_then(Value::as_f64);
                let total = totals.get(&t).and_then(Value::as_f64);
                match (visitors, total) {
                    (Some(v), Some(t)) if t > 0.0 => json!((v * 10_000.0 / t).round() / 100.0),
                    _ => 0.into(),
                }
            }
            // Money in the currency's unit, to the cent.
            Metric::TotalRevenue => json!((micros as f64 / 10_000.0).round() / 100.0),
            Metric::AverageRevenue if orders > 0 => {
                json!((micros as f64 / orders as f64 / 10_000.0).round() / 100.0)
            }
            Metric::AverageRevenue => Value::Null,
            m => {
                let v = row.values.get(m.name()).cloned().unwrap_or(Value::Null);
                // No rows means zero for counts; rates and averages stay null.
                match (m, v.is_null()) {
                    (
                        Metric::Visitors | Metric::Pageviews | Metric::Events | Metric::Visits,
                        true,
                    ) => 0.into(),
                    _ => v,
                }
            }
        }
    }
}

/// Numbers by value, strings by text, nulls first.
fn compare(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x
            .as_f64()
            .unwrap_or(0.0)
            .total_cmp(&y.as_f64().unwrap_or(0.0)),
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        (Some(Value::Null) | None, Some(Value::Null) | None) => Ordering::Equal,
        (Some(Value::Null) | None, _) => Ordering::Less,
        (_, Some(Value::Null) | None) => Ordering::Greater,
        (Some(x), Some(y)) => x.to_string().cmp(&y.to_string()),
    }
}
