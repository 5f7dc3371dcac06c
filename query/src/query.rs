//! A metrics query in the shape of Plausible's Stats API v2, validated field by field, and
//! its plan: which metrics come from the hourly rollups (events, pageviews, unique visitors:
//! merged HLL sketches, so any range is a true distinct estimate) and which from the
//! `sessions` view over `events` (visits, bounce rate, visit duration, views per visit).
//!
//! Supported so far: the metrics above; `date_range` `"day"`, `"7d"`, `"30d"`, `"month"`,
//! `"12mo"`, `"year"` or `[from, to]` (dates, inclusive); dimensions `time`, `time:hour`,
//! `time:day`, `time:week`, `time:month`, or `event:page` (from `events`); `pagination`. Dates are UTC. Anything else is
//! refused with a 400 naming the field, never silently ignored.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
#[error("invalid `{field}`: {message}")]
pub struct QueryError {
    pub field: String,
    pub message: String,
}

fn bad(field: &str, message: impl Into<String>) -> QueryError {
    QueryError {
        field: field.to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    pub site_id: String,
    pub metrics: Vec<String>,
    pub date_range: serde_json::Value,
    #[serde(default)]
    pub dimensions: Vec<String>,
    #[serde(default)]
    pub filters: Vec<serde_json::Value>,
    #[serde(default)]
    pub order_by: Option<serde_json::Value>,
    #[serde(default)]
    pub pagination: Option<Pagination>,
    #[serde(default)]
    pub include: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pagination {
    #[serde(default = "default_limit")]
    pub limit: u32,
    #[serde(default)]
    pub offset: u32,
}

fn default_limit() -> u32 {
    10_000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Visitors,
    Pageviews,
    Events,
    Visits,
    BounceRate,
    VisitDuration,
    ViewsPerVisit,
}

const METRICS: &[(&str, Metric)] = &[
    ("visitors", Metric::Visitors),
    ("pageviews", Metric::Pageviews),
    ("events", Metric::Events),
    ("visits", Metric::Visits),
    ("bounce_rate", Metric::BounceRate),
    ("visit_duration", Metric::VisitDuration),
    ("views_per_visit", Metric::ViewsPerVisit),
];

impl Metric {
    fn in_rollups(self) -> bool {
        matches!(self, Metric::Visitors | Metric::Pageviews | Metric::Events)
    }
    fn column(self) -> &'static str {
        METRICS
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("", |(n, _)| n)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeBucket {
    Hour,
    Day,
    Week,
    Month,
}

impl TimeBucket {
    fn trunc(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Week => "week",
            Self::Month => "month",
        }
    }
    /// How the bucket is labelled in results (as Plausible does).
    fn format(self) -> &'static str {
        match self {
            Self::Hour => "%Y-%m-%d %H:00:00",
            _ => "%Y-%m-%d",
        }
    }
}

/// A validated query for one merchant.
#[derive(Debug, Clone)]
pub struct Plan {
    pub merchant_id: String,
    pub metrics: Vec<Metric>,
    pub from: DateTime<Utc>,
    /// Exclusive.
    pub to: DateTime<Utc>,
    pub time: Option<TimeBucket>,
    /// `event:page`: a breakdown by page path, top pages first.
    pub by_page: bool,
    pub limit: u32,
    pub offset: u32,
}

impl QueryRequest {
    /// Validates the request for `merchant_id` (the token's merchant, already checked to be
    /// `site_id`), as of `now`.
    pub fn plan(&self, merchant_id: &str, now: DateTime<Utc>) -> Result<Plan, QueryError> {
        if self.metrics.is_empty() {
            return Err(bad("metrics", "at least one metric is required"));
        }
        let mut metrics = Vec::new();
        for m in &self.metrics {
            let metric = METRICS
                .iter()
                .find(|(n, _)| n == m)
                .map(|(_, metric)| *metric)
                .ok_or_else(|| {
                    bad(
                        "metrics",
                        format!(
                            "unknown or unsupported metric `{m}` (supported: {})",
                            METRICS
                                .iter()
                                .map(|(n, _)| *n)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })?;
            if metrics.contains(&metric) {
                return Err(bad("metrics", format!("`{m}` is listed twice")));
            }
            metrics.push(metric);
        }
        let (from, to) = date_range(&self.date_range, now)?;
        let mut time = None;
        let mut by_page = false;
        for d in &self.dimensions {
            let bucket = match d.as_str() {
                "time:hour" => TimeBucket::Hour,
                "time" | "time:day" => TimeBucket::Day,
                "time:week" => TimeBucket::Week,
                "time:month" => TimeBucket::Month,
                "event:page" => {
                    by_page = true;
                    continue;
                }
                other => {
                    return Err(bad(
                        "dimensions",
                        format!("dimension `{other}` is not supported yet (supported: time, time:hour, time:day, time:week, time:month, event:page)"),
                    ))
                }
            };
            if time.replace(bucket).is_some() {
                return Err(bad("dimensions", "at most one time dimension"));
            }
        }
        if by_page {
            if time.is_some() {
                return Err(bad(
                    "dimensions",
                    "event:page together with a time dimension is not supported yet",
                ));
            }
            if let Some(m) = metrics
                .iter()
                .find(|m| !matches!(m, Metric::Visitors | Metric::Pageviews))
            {
                return Err(bad(
                    "metrics",
                    format!(
                        "`{}` by event:page is not supported yet (visitors, pageviews are)",
                        m.column()
                    ),
                ));
            }
        }
        if !self.filters.is_empty() {
            return Err(bad("filters", "filters are not supported yet"));
        }
        if self.order_by.is_some() {
            return Err(bad(
                "order_by",
                "order_by is not supported yet (time dimensions are returned in time order)",
            ));
        }
        if self.include.is_some() {
            return Err(bad("include", "include is not supported yet"));
        }
        let p = self.pagination.unwrap_or(Pagination {
            limit: default_limit(),
            offset: 0,
        });
        if p.limit == 0 || p.limit > 10_000 {
            return Err(bad("pagination", "limit must be 1..=10000"));
        }
        Ok(Plan {
            merchant_id: merchant_id.to_string(),
            metrics,
            from,
            to,
            time,
            by_page,
            limit: p.limit,
            offset: p.offset,
        })
    }
}

fn day_start(d: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default())
}

/// `[from, to)` for a date range, UTC.
fn date_range(
    v: &serde_json::Value,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), QueryError> {
    let today = now.date_naive();
    let tomorrow = day_start(today) + Duration::days(1);
    let first_of = |y: i32, m: u32| NaiveDate::from_ymd_opt(y, m, 1).map(day_start);
    match v {
        serde_json::Value::String(s) => {
            let from = match s.as_str() {
                "day" => Some(day_start(today)),
                "7d" => Some(day_start(today) - Duration::days(6)),
                "30d" => Some(day_start(today) - Duration::days(29)),
                "month" => first_of(today.year(), today.month()),
                "year" => first_of(today.year(), 1),
                "12mo" => {
                    let months = today.year() * 12 + today.month0() as i32 - 11;
                    first_of(months.div_euclid(12), months.rem_euclid(12) as u32 + 1)
                }
                _ => None,
            }
            .ok_or_else(|| {
                bad(
                    "date_range",
                    format!("`{s}` is not one of day, 7d, 30d, month, 12mo, year, or [from, to]"),
                )
            })?;
            Ok((from, tomorrow))
        }
        serde_json::Value::Array(a) if a.len() == 2 => {
            let date = |i: usize| {
                a[i].as_str()
                    .and_then(|s| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
                    .ok_or_else(|| {
                        bad(
                            "date_range",
                            format!("element {i} must be a date YYYY-MM-DD"),
                        )
                    })
            };
            let (from, to) = (date(0)?, date(1)?);
            if to < from {
                return Err(bad("date_range", "the end is before the start"));
            }
            Ok((day_start(from), day_start(to) + Duration::days(1)))
        }
        _ => Err(bad("date_range", "must be a period name or [from, to]")),
    }
}

impl Plan {
    fn bounds(&self, column: &str) -> String {
        format!(
            "{column} >= TIMESTAMP '{}' AND {column} < TIMESTAMP '{}'",
            self.from.format("%Y-%m-%dT%H:%M:%SZ"),
            self.to.format("%Y-%m-%dT%H:%M:%SZ")
        )
    }

    fn bucket(&self, column: &str) -> String {
        match self.time {
            Some(t) => format!(
                "to_char(date_trunc('{}', {column}), '{}')",
                t.trunc(),
                t.format()
            ),
            None => "'all'".into(),
        }
    }

    /// SQL for a page breakdown: the rollups have no breakdowns yet, so this reads `events`
    /// (pageviews of the range, by URL path without query or fragment), top pages first.
    pub fn pages_sql(&self) -> Option<String> {
        self.by_page.then(|| {
            format!(
                "SELECT page AS bucket, count(*) AS pageviews, count(DISTINCT visitor_id) AS visitors \
                 FROM (SELECT visitor_id, CASE WHEN p = '' THEN '/' ELSE p END AS page \
                       FROM (SELECT visitor_id, \
                                    split_part(split_part(regexp_replace(COALESCE(url, ''), \
                                        '^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*', ''), '?', 1), '#', 1) AS p \
                             FROM events WHERE merchant_id = '{}' AND name = 'pageview' AND {}) raw) pages \
                 GROUP BY page ORDER BY pageviews DESC, page LIMIT {} OFFSET {}",
                self.merchant_id,
                self.bounds("ts"),
                self.limit,
                self.offset
            )
        })
    }

    /// SQL over the hourly rollups, if any metric needs it. `merchant_id` is the token's
    /// merchant, validated by the registry, never request text.
    pub fn rollups_sql(&self) -> Option<String> {
        if self.by_page {
            return None;
        }
        self.metrics.iter().any(|m| m.in_rollups()).then(|| {
            format!(
                "SELECT {} AS bucket, \
                        CAST(sum(events) AS BIGINT) AS events, \
                        CAST(sum(pageviews) AS BIGINT) AS pageviews, \
                        CAST(round(hll_estimate(hll_union(visitors_hll))) AS BIGINT) AS visitors \
                 FROM rollups_hourly WHERE merchant_id = '{}' AND {} GROUP BY 1",
                self.bucket("hour"),
                self.merchant_id,
                self.bounds("hour")
            )
        })
    }

    /// SQL over the `sessions` view, if any metric needs it.
    pub fn sessions_sql(&self) -> Option<String> {
        if self.by_page {
            return None;
        }
        self.metrics.iter().any(|m| !m.in_rollups()).then(|| {
            format!(
                "SELECT {} AS bucket, \
                        count(*) AS visits, \
                        round(100.0 * avg(CASE WHEN bounce THEN 1.0 ELSE 0.0 END)) AS bounce_rate, \
                        round(avg(CAST(duration_ms AS DOUBLE)) / 1000.0) AS visit_duration, \
                        round(avg(CAST(pageviews AS DOUBLE)), 2) AS views_per_visit \
                 FROM sessions WHERE merchant_id = '{}' AND {} GROUP BY 1",
                self.bucket("started_at"),
                self.merchant_id,
                self.bounds("started_at")
            )
        })
    }

    /// Merges the rows of both sources (JSON objects with `bucket` and metric columns) into
    /// Plausible's `results`: `{"metrics": [...], "dimensions": [...]}` per bucket.
    pub fn results(&self, rows: &[serde_json::Value]) -> Vec<serde_json::Value> {
        use std::collections::BTreeMap;
        if self.by_page {
            // Already ordered (top pages first) and paginated by the SQL.
            return rows
                .iter()
                .map(|row| {
                    let metrics: Vec<serde_json::Value> = self
                        .metrics
                        .iter()
                        .map(|m| row.get(m.column()).cloned().unwrap_or(0.into()))
                        .collect();
                    let page = row
                        .get("bucket")
                        .cloned()
                        .unwrap_or(serde_json::Value::Null);
                    serde_json::json!({"metrics": metrics, "dimensions": [page]})
                })
                .collect();
        }
        let mut by_bucket: BTreeMap<String, serde_json::Map<String, serde_json::Value>> =
            BTreeMap::new();
        for row in rows {
            let Some(obj) = row.as_object() else { continue };
            let bucket = obj
                .get("bucket")
                .and_then(|b| b.as_str())
                .unwrap_or("all")
                .to_string();
            let entry = by_bucket.entry(bucket).or_default();
            for (k, v) in obj {
                if k != "bucket" {
                    entry.insert(k.clone(), v.clone());
                }
            }
        }
        if by_bucket.is_empty() && self.time.is_none() {
            by_bucket.insert("all".into(), Default::default());
        }
        by_bucket
            .into_iter()
            .skip(self.offset as usize)
            .take(self.limit as usize)
            .map(|(bucket, values)| {
                let metrics: Vec<serde_json::Value> = self
                    .metrics
                    .iter()
                    .map(|m| {
                        let v = values
                            .get(m.column())
                            .cloned()
                            .unwrap_or(serde_json::Value::Null);
                        // No rows means zero for counts; rates and averages stay null.
                        match (m, v.is_null()) {
                            (
                                Metric::Visitors
                                | Metric::Pageviews
                                | Metric::Events
                                | Metric::Visits,
                                true,
                            ) => 0.into(),
                            _ => v,
                        }
                    })
                    .collect();
                let dimensions: Vec<serde_json::Value> = match self.time {
                    Some(_) => vec![bucket.into()],
                    None => vec![],
                };
                serde_json::json!({"metrics": metrics, "dimensions": dimensions})
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: serde_json::Value) -> Result<QueryRequest, serde_json::Error> {
        serde_json::from_value(json)
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 15, 10, 30, 0).unwrap()
    }

    #[test]
    fn date_ranges_resolve_to_utc_days() {
        let r = |v: serde_json::Value| date_range(&v, now()).unwrap();
        let (f, t) = r("7d".into());
        assert_eq!(f.to_rfc3339(), "2026-03-09T00:00:00+00:00");
        assert_eq!(t.to_rfc3339(), "2026-03-16T00:00:00+00:00");
        assert_eq!(r("12mo".into()).0.to_rfc3339(), "2025-04-01T00:00:00+00:00");
        assert_eq!(
            r("month".into()).0.to_rfc3339(),
            "2026-03-01T00:00:00+00:00"
        );
        let (f, t) = r(serde_json::json!(["2026-01-01", "2026-01-31"]));
        assert_eq!(
            (f.to_rfc3339(), t.to_rfc3339()),
            (
                "2026-01-01T00:00:00+00:00".into(),
                "2026-02-01T00:00:00+00:00".into()
            )
        );
        assert!(date_range(&"fortnight".into(), now()).is_err());
        assert!(date_range(&serde_json::json!(["2026-02-01", "2026-01-01"]), now()).is_err());
    }

    #[test]
    fn bad_fields_are_named() {
        let plan = |v| req(v).unwrap().plan("m_1", now()).unwrap_err().field;
        assert_eq!(
            plan(serde_json::json!({"site_id": "m_1", "metrics": ["nope"], "date_range": "day"})),
            "metrics"
        );
        assert_eq!(
            plan(serde_json::json!({"site_id": "m_1", "metrics": ["visitors"], "date_range": "x"})),
            "date_range"
        );
        assert_eq!(
            plan(
                serde_json::json!({"site_id": "m_1", "metrics": ["visitors"], "date_range": "day", "dimensions": ["visit:source"]})
            ),
            "dimensions"
        );
        assert_eq!(
            plan(
                serde_json::json!({"site_id": "m_1", "metrics": ["visitors"], "date_range": "day", "filters": [["is", "event:page", ["/"]]]})
            ),
            "filters"
        );
        assert!(req(serde_json::json!({"site_id": "m_1", "metrics": ["visitors"], "date_range": "day", "metric": 1})).is_err());
    }

    #[test]
    fn results_merge_sources_by_bucket_and_fill_zero_counts() {
        let p = req(serde_json::json!({"site_id": "m_1", "metrics": ["visitors", "visits", "bounce_rate"], "date_range": "7d", "dimensions": ["time:day"]}))
            .unwrap()
            .plan("m_1", now())
            .unwrap();
        let rows = vec![
            serde_json::json!({"bucket": "2026-03-10", "visitors": 3, "events": 9, "pageviews": 7}),
            serde_json::json!({"bucket": "2026-03-10", "visits": 4, "bounce_rate": 50.0}),
            serde_json::json!({"bucket": "2026-03-11", "visits": 1, "bounce_rate": 100.0}),
        ];
        let out = p.results(&rows);
        assert_eq!(
            out[0],
            serde_json::json!({"metrics": [3, 4, 50.0], "dimensions": ["2026-03-10"]})
        );
        assert_eq!(
            out[1],
            serde_json::json!({"metrics": [0, 1, 100.0], "dimensions": ["2026-03-11"]})
        );
    }
}
