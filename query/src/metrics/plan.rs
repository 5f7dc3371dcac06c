//! A request validated as a whole into a [`Plan`] (one merchant, resolved instants, typed
//! metrics, dimensions and filters), and which sources answer it. How each source becomes
//! a DataFusion plan is [`super::logical`]'s business.

use chrono::{DateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::Value;

use super::dates::date_range;
use super::request::{
    bad, default_limit, filter_limits, Dim, Filter, FilterBudget, Grain, Include, Metric,
    Pagination, QueryError, QueryRequest,
};

/// What a sort key refers to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SortKey {
    Metric(usize),
    Dim(usize),
}

/// A validated query for one merchant.
#[derive(Debug, Clone)]
pub struct Plan {
    pub merchant_id: String,
    pub metrics: Vec<Metric>,
    pub tz: Tz,
    pub from: DateTime<Utc>,
    /// Exclusive.
    pub to: DateTime<Utc>,
    pub dims: Vec<Dim>,
    pub filter: Option<Filter>,
    /// Grouped or filtered by entry/exit page: every metric comes from `sessions`.
    pub(crate) sessions_only: bool,
    /// Visit metrics by or filtered on event dimensions that `sessions` lacks: visits are
    /// joined with their events (a visit counts under each value its events have, and
    /// passes a filter when one of its events does).
    pub(crate) visits_by_events: bool,
    pub(crate) order: Vec<(SortKey, bool)>,
    pub limit: u32,
    pub offset: u32,
    pub include: Include,
}

/// Where a part of the answer comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// Events, page views and visitors from the hourly rollups.
    Rollups,
    /// The same from `events`.
    Events,
    /// Visit metrics (and, for entry/exit pages, every metric) from the `sessions` view.
    Sessions,
    /// Total visitors per time bucket (the denominator of `conversion_rate`).
    Totals,
    /// Orders and revenue per currency, from `revenue_hourly` or `events`.
    Revenue,
}

#[derive(Debug, Clone)]
pub struct Source {
    pub kind: SourceKind,
    /// The warehouse table it reads (views resolved): what its answer depends on, and,
    /// for the rollup sources, the table its plan scans.
    pub tables: &'static [&'static str],
}

impl Source {
    fn of(kind: SourceKind, rolled_up: bool, rollup: &'static [&'static str]) -> Source {
        Source {
            kind,
            tables: if rolled_up { rollup } else { &["events"] },
        }
    }

    /// Read from a rollup table (else from `events`).
    pub fn rolled_up(&self) -> bool {
        self.tables != ["events"]
    }
}

impl QueryRequest {
    /// Validates the request for `merchant_id` (the token's merchant, already checked to be
    /// `site_id`) in the merchant's time zone `tz`, as of `now`.
    pub fn plan(&self, merchant_id: &str, tz: Tz, now: DateTime<Utc>) -> Result<Plan, QueryError> {
        if self.metrics.is_empty() {
            return Err(bad("metrics", "at least one metric is required"));
        }
        let mut metrics = Vec::new();
        for m in &self.metrics {
            let metric = Metric::parse(m)?;
            if metrics.contains(&metric) {
                return Err(bad("metrics", format!("`{m}` is listed twice")));
            }
            metrics.push(metric);
        }
        let (from, to) = date_range(&self.date_range, tz, now)?;
        let mut dims = Vec::new();
        for d in &self.dimensions {
            let dim = Dim::parse("dimensions", d)?;
            if dims.contains(&dim) {
                return Err(bad("dimensions", format!("`{d}` is listed twice")));
            }
            if dim.is_time() && dims.iter().any(Dim::is_time) {
                return Err(bad("dimensions", "at most one time dimension"));
            }
            dims.push(dim);
        }
        if dims.iter().filter(|d| !d.is_time()).count() > 3 {
            return Err(bad("dimensions", "at most three non-time dimensions"));
        }
        let mut budget = FilterBudget::default();
        let filter = match self.filters.len() {
            0 => None,
            1 => Some(Filter::parse_within(&self.filters[0], 1, &mut budget)?),
            n if n > filter_limits::MAX_FILTERS => {
                return Err(bad(
                    "filters",
                    format!(
                        "more than {} filters in one query",
                        filter_limits::MAX_FILTERS
                    ),
                ))
            }
            _ => Some(Filter::And(
                self.filters
                    .iter()
                    .map(|f| Filter::parse_within(f, 2, &mut budget))
                    .collect::<Result<_, _>>()?,
            )),
        };
        let mut filter_dims = Vec::new();
        if let Some(f) = &filter {
            f.dims(&mut filter_dims);
        }
        let per_visit = metrics.iter().any(|m| m.grain() == Grain::Visit);
        let sessions_only =
            dims.iter().any(Dim::is_session) || filter_dims.iter().any(Dim::is_session);
        // Entry and exit pages are the visit's, so every metric with them comes from
        // `sessions`, which has no per-event dimensions.
        if sessions_only {
            let what = "entry and exit pages";
            if let Some(d) = dims.iter().find(|d| !d.in_sessions()) {
                return Err(bad(
                    "dimensions",
                    format!("{what} cannot be broken down by {} yet", d.api_name()),
                ));
            }
            if let Some(d) = filter_dims.iter().find(|d| !d.in_sessions()) {
                return Err(bad(
                    "filters",
                    format!("{what} cannot be filtered by {} yet", d.api_name()),
                ));
            }
        }
        let visits_by_events = per_visit
            && !sessions_only
            && dims.iter().chain(&filter_dims).any(|d| !d.in_sessions());
        if metrics.iter().any(|m| m.grain() == Grain::Revenue) && sessions_only {
            return Err(bad(
                "metrics",
                "revenue by entry or exit page is not supported yet",
            ));
        }
        if metrics.contains(&Metric::ConversionRate) {
            if !dims.contains(&Dim::Goal) {
                return Err(bad(
                    "metrics",
                    "conversion_rate needs the event:goal dimension",
                ));
            }
            if sessions_only || filter.is_some() {
                return Err(bad(
                    "metrics",
                    "conversion_rate with filters or entry/exit pages is not supported yet",
                ));
            }
        }
        let include = Include::parse(self.include.as_ref())?;
        if include.time_labels && !dims.iter().any(Dim::is_time) {
            return Err(bad("include", "time_labels needs a time dimension"));
        }
        let order = match &self.order_by {
            None => default_order(&dims),
            Some(v) => parse_order(v, &self.metrics, &self.dimensions)?,
        };
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
            tz,
            from,
            to,
            dims,
            filter,
            sessions_only,
            visits_by_events,
            order,
            limit: p.limit,
            offset: p.offset,
            include,
        })
    }
}

/// Time ascending when there is a time dimension, else the first metric descending; the
/// dimensions then break ties so pages are stable.
fn default_order(dims: &[Dim]) -> Vec<(SortKey, bool)> {
    let mut order = Vec::new();
    if let Some(i) = dims.iter().position(Dim::is_time) {
        order.push((SortKey::Dim(i), false));
    }
    order.push((SortKey::Metric(0), true));
    order.extend((0..dims.len()).map(|i| (SortKey::Dim(i), false)));
    order
}

fn parse_order(
    v: &Value,
    metrics: &[String],
    dims: &[String],
) -> Result<Vec<(SortKey, bool)>, QueryError> {
    let f = "order_by";
    let items = v
        .as_array()
        .ok_or_else(|| bad(f, "must be a list of [metric or dimension, asc|desc]"))?;
    if items.len() > metrics.len() + dims.len() {
        return Err(bad(f, "more keys than requested metrics and dimensions"));
    }
    let mut order = Vec::new();
    for item in items {
        let pair = item.as_array().filter(|p| p.len() == 2);
        let (key, dir) = match pair {
            Some(p) => (p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or("")),
            None => return Err(bad(f, format!("`{item}` is not [name, asc|desc]"))),
        };
        let desc = match dir {
            "asc" => false,
            "desc" => true,
            _ => return Err(bad(f, format!("direction `{dir}` is not asc or desc"))),
        };
        let sort = if let Some(i) = metrics.iter().position(|m| m == key) {
            SortKey::Metric(i)
        } else if let Some(i) = dims
            .iter()
            .position(|d| d == key || (key == "time" && d.starts_with("time")))
        {
            SortKey::Dim(i)
        } else {
            return Err(bad(
                f,
                format!("`{key}` is neither a requested metric nor a requested dimension"),
            ));
        };
        order.push((sort, desc));
    }
    // Ties still resolve deterministically.
    order.extend((0..dims.len()).map(|i| (SortKey::Dim(i), false)));
    Ok(order)
}

impl Plan {
    /// Hourly UTC rollups can be regrouped into local buckets when every local hour is a
    /// UTC hour: the zone's offset is whole hours over the whole range.
    pub(crate) fn whole_hour_zone(&self) -> bool {
        let whole = |t: DateTime<Utc>| {
            self.tz
                .offset_from_utc_datetime(&t.naive_utc())
                .fix()
                .local_minus_utc()
                % 3600
                == 0
        };
        whole(self.from) && whole(self.to)
    }

    fn rollups_eligible(&self) -> bool {
        self.filter.is_none()
            && self.whole_hour_zone()
            && self
                .dims
                .iter()
                .all(|d| d.is_time() || d.breakdown().is_some())
            && self.dims.iter().filter(|d| !d.is_time()).count() <= 1
    }

    /// Revenue can come from `revenue_hourly` (per merchant, hour and currency).
    fn revenue_rollups_eligible(&self) -> bool {
        self.filter.is_none()
            && self.whole_hour_zone()
            && self.dims.iter().all(|d| d.is_time() || d.is_currency())
    }

    /// The sources that answer the query.
    pub fn sources(&self) -> Vec<Source> {
        let mut out = Vec::new();
        let has = |g: Grain| self.metrics.iter().any(|m| m.grain() == g);
        if has(Grain::Event) && !self.sessions_only {
            out.push(self.event_source(self.rollups_eligible()));
        }
        if self.sessions_only || has(Grain::Visit) {
            // The `sessions` view over the pre-aggregated `visits` (joined with `events`
            // for event dimensions).
            out.push(Source {
                kind: SourceKind::Sessions,
                tables: if self.visits_by_events {
                    &["visits", "events"]
                } else {
                    &["visits"]
                },
            });
        }
        if has(Grain::Revenue) {
            let rolled_up = self.revenue_rollups_eligible();
            out.push(Source::of(
                SourceKind::Revenue,
                rolled_up,
                &["revenue_hourly"],
            ));
        }
        if self.metrics.contains(&Metric::ConversionRate) {
            let rolled_up = self.whole_hour_zone();
            out.push(Source::of(
                SourceKind::Totals,
                rolled_up,
                &["rollups_hourly"],
            ));
        }
        out
    }

    fn event_source(&self, rolled_up: bool) -> Source {
        if !rolled_up {
            Source::of(SourceKind::Events, false, &[])
        } else if self.dims.iter().any(|d| d.breakdown().is_some()) {
            Source::of(SourceKind::Rollups, true, &["breakdowns_hourly"])
        } else {
            Source::of(SourceKind::Rollups, true, &["rollups_hourly"])
        }
    }

    /// The same answer computed from `events` alone (and `sessions`), never the rollups:
    /// the baseline of the query benchmark and a cross-check.
    pub fn events_sources(&self) -> Vec<Source> {
        self.sources()
            .into_iter()
            .map(|s| match s.kind {
                SourceKind::Rollups => self.event_source(false),
                SourceKind::Revenue | SourceKind::Totals => Source::of(s.kind, false, &[]),
                _ => s,
            })
            .collect()
    }
}
