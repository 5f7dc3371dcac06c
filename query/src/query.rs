//! A metrics query in the shape of Plausible's Stats API v2, validated field by field, and
//! its plan: which SQL answers which metrics.
//!
//! Three sources, chosen per query (docs/METRICS-API.md):
//! - **rollups** (`rollups_hourly`, `breakdowns_hourly`): events, pageviews and unique
//!   visitors (merged HLL sketches), by time and by at most one breakdown dimension, when
//!   the query has no filters and the merchant's time zone is a whole number of hours from
//!   UTC (the rollups are hourly in UTC);
//! - **events**: the same metrics for everything else (filters, several dimensions,
//!   half-hour time zones), exact;
//! - **sessions** (the view): visits, bounce rate, visit duration, views per visit, and every
//!   metric of a query by or filtered on entry or exit page.
//!
//! Dates and time buckets are in the merchant's time zone. Anything unsupported is refused
//! with a 400 naming the field, never silently ignored.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};

use beacon_warehouse::rollup::BREAKDOWNS;
use chrono::{DateTime, Datelike, Duration, NaiveDate, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use serde::Deserialize;
use serde_json::Value;

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
    pub date_range: Value,
    #[serde(default)]
    pub dimensions: Vec<String>,
    #[serde(default)]
    pub filters: Vec<Value>,
    #[serde(default)]
    pub order_by: Option<Value>,
    #[serde(default)]
    pub pagination: Option<Pagination>,
    #[serde(default)]
    pub include: Option<Value>,
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
    ConversionRate,
}

const METRICS: &[(&str, Metric)] = &[
    ("visitors", Metric::Visitors),
    ("pageviews", Metric::Pageviews),
    ("events", Metric::Events),
    ("visits", Metric::Visits),
    ("bounce_rate", Metric::BounceRate),
    ("visit_duration", Metric::VisitDuration),
    ("views_per_visit", Metric::ViewsPerVisit),
    ("conversion_rate", Metric::ConversionRate),
];

impl Metric {
    /// Counted per event (rollups or `events`), as opposed to per visit (`sessions`).
    fn per_event(self) -> bool {
        matches!(
            self,
            Metric::Visitors | Metric::Pageviews | Metric::Events | Metric::ConversionRate
        )
    }
    fn name(self) -> &'static str {
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

/// A dimension, for grouping or filtering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Time(TimeBucket),
    /// A derived column of `events` (and of `sessions`, for `visit:` dimensions).
    Column {
        api: &'static str,
        column: &'static str,
    },
    /// Each goal named in the `goal` property (several per event possible).
    Goal,
    Prop(String),
    EntryPage,
    ExitPage,
}

impl Dim {
    fn parse(field: &str, s: &str) -> Result<Dim, QueryError> {
        Ok(match s {
            "time:hour" => Dim::Time(TimeBucket::Hour),
            "time" | "time:day" => Dim::Time(TimeBucket::Day),
            "time:week" => Dim::Time(TimeBucket::Week),
            "time:month" => Dim::Time(TimeBucket::Month),
            "event:goal" => Dim::Goal,
            "visit:entry_page" => Dim::EntryPage,
            "visit:exit_page" => Dim::ExitPage,
            other => {
                if let Some((api, column)) = BREAKDOWNS.iter().find(|(a, _)| *a == other) {
                    Dim::Column { api, column }
                } else if let Some(key) = other.strip_prefix("event:props:") {
                    if key.is_empty()
                        || key.len() > 128
                        || key.starts_with('$')
                        || !key
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c))
                    {
                        return Err(bad(field, format!("`{other}`: not a custom property name")));
                    }
                    Dim::Prop(key.to_string())
                } else {
                    return Err(bad(
                        field,
                        format!(
                            "unknown dimension `{other}` (supported: time, time:hour, time:day, \
                             time:week, time:month, {}, event:goal, event:props:<name>, \
                             visit:entry_page, visit:exit_page)",
                            BREAKDOWNS
                                .iter()
                                .map(|(a, _)| *a)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
        })
    }

    fn is_time(&self) -> bool {
        matches!(self, Dim::Time(_))
    }

    /// Needs the visit (only `sessions` knows it).
    fn is_session(&self) -> bool {
        matches!(self, Dim::EntryPage | Dim::ExitPage)
    }

    fn is_event_scoped(&self) -> bool {
        match self {
            Dim::Column { api, .. } => api.starts_with("event:"),
            Dim::Goal | Dim::Prop(_) => true,
            _ => false,
        }
    }

    /// Its `dimension` in `breakdowns_hourly`.
    fn breakdown(&self) -> Option<String> {
        match self {
            Dim::Column { api, .. } => Some(api.to_string()),
            Dim::Goal => Some("event:goal".into()),
            Dim::Prop(k) => Some(format!("event:props:{k}")),
            _ => None,
        }
    }

    /// The expression over `events` (time dimensions take the column to bucket).
    fn events_expr(&self) -> String {
        match self {
            Dim::Column { column, .. } => column.to_string(),
            Dim::Goal => "goal".into(),
            Dim::Prop(k) => format!("properties['{}']", esc(k)),
            Dim::EntryPage | Dim::ExitPage | Dim::Time(_) => String::new(),
        }
    }

    /// The expression over `sessions`, if the visit has it.
    fn sessions_expr(&self) -> Option<String> {
        match self {
            Dim::Column { api, column } if api.starts_with("visit:") => Some(column.to_string()),
            Dim::EntryPage => Some("entry_page".into()),
            Dim::ExitPage => Some("exit_page".into()),
            _ => None,
        }
    }
}

/// A filter in Plausible's v2 syntax: `[op, dimension, [values]]` with `is`, `is_not`,
/// `contains`, or `["and"|"or", [filters]]`, `["not", filter]`.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    Is {
        dim: Dim,
        values: Vec<String>,
        negate: bool,
    },
    Contains {
        dim: Dim,
        values: Vec<String>,
    },
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
}

/// Complexity limits of a request's filters, checked while they are read (before any SQL is
/// built): a filter tree is walked recursively here and turned into SQL that DataFusion
/// parses and plans recursively, so its depth and size are bounded.
pub mod filter_limits {
    /// Nesting of `and` / `or` / `not`.
    pub const MAX_DEPTH: usize = 8;
    /// Filters in one request, counting every `and`, `or`, `not` and leaf.
    pub const MAX_FILTERS: usize = 200;
    /// Values in one `is` / `is_not` list.
    pub const MAX_VALUES: usize = 1000;
    /// Values in one `contains` list (each is its own substring test).
    pub const MAX_CONTAINS_VALUES: usize = 100;
    /// Values in all lists of one request.
    pub const MAX_TOTAL_VALUES: usize = 5000;
}

/// What a request's filters have used of [`filter_limits`] so far.
#[derive(Default)]
struct FilterBudget {
    filters: usize,
    values: usize,
}

impl FilterBudget {
    fn enter(&mut self, depth: usize) -> Result<(), QueryError> {
        use filter_limits::*;
        if depth > MAX_DEPTH {
            return Err(bad(
                "filters",
                format!("nested deeper than {MAX_DEPTH} levels of and/or/not"),
            ));
        }
        self.filters += 1;
        if self.filters > MAX_FILTERS {
            return Err(bad(
                "filters",
                format!("more than {MAX_FILTERS} filters in one query (use `is` with a list of values instead of `or` of many filters)"),
            ));
        }
        Ok(())
    }

    fn values(&mut self, n: usize) -> Result<(), QueryError> {
        use filter_limits::*;
        self.values += n;
        if self.values > MAX_TOTAL_VALUES {
            return Err(bad(
                "filters",
                format!("more than {MAX_TOTAL_VALUES} filter values in one query"),
            ));
        }
        Ok(())
    }
}

/// `items` joined by `op` as a balanced tree of parentheses: `N` terms nest `log2 N` deep
/// in the SQL, not `N` deep as a flat chain would be to the parser and planner.
fn balanced(items: &[String], op: &str) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        _ => {
            let (a, b) = items.split_at(items.len() / 2);
            format!("({} {op} {})", balanced(a, op), balanced(b, op))
        }
    }
}

impl Filter {
    fn parse_within(
        v: &Value,
        depth: usize,
        budget: &mut FilterBudget,
    ) -> Result<Filter, QueryError> {
        let f = "filters";
        budget.enter(depth)?;
        let a = v
            .as_array()
            .ok_or_else(|| bad(f, format!("`{}` is not a filter array", short(v))))?;
        let op = a.first().and_then(Value::as_str).unwrap_or("");
        match (op, a.len()) {
            ("and" | "or", 2) => {
                let list = a[1]
                    .as_array()
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| bad(f, format!("`{op}` takes a non-empty list of filters")))?;
                if list.len() > filter_limits::MAX_FILTERS {
                    return Err(bad(
                        f,
                        format!("`{op}` of more than {} filters", filter_limits::MAX_FILTERS),
                    ));
                }
                let subs = list
                    .iter()
                    .map(|s| Filter::parse_within(s, depth + 1, budget))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(if op == "and" {
                    Filter::And(subs)
                } else {
                    Filter::Or(subs)
                })
            }
            ("not", 2) => Ok(Filter::Not(Box::new(Filter::parse_within(
                &a[1],
                depth + 1,
                budget,
            )?))),
            ("is" | "is_not" | "contains", 3) => {
                let dim = Dim::parse(f, a[1].as_str().unwrap_or(""))?;
                if dim.is_time() {
                    return Err(bad(f, "filter by time with date_range instead"));
                }
                let max = if op == "contains" {
                    filter_limits::MAX_CONTAINS_VALUES
                } else {
                    filter_limits::MAX_VALUES
                };
                let list = a[2]
                    .as_array()
                    .filter(|v| !v.is_empty() && v.len() <= max)
                    .ok_or_else(|| bad(f, format!("`{op}` takes a list of 1-{max} values")))?;
                budget.values(list.len())?;
                let values = list
                    .iter()
                    .map(|v| match v {
                        Value::String(s) => Ok(s.clone()),
                        Value::Number(n) => Ok(n.to_string()),
                        other => Err(bad(f, format!("filter value `{other}` is not a string"))),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(if op == "contains" {
                    Filter::Contains { dim, values }
                } else {
                    Filter::Is {
                        dim,
                        values,
                        negate: op == "is_not",
                    }
                })
            }
            _ => Err(bad(
                f,
                format!("`{}`: expected [is|is_not|contains, dimension, [values]], [and|or, [filters]] or [not, filter]", short(v)),
            )),
        }
    }

    fn dims(&self, out: &mut Vec<Dim>) {
        match self {
            Filter::Is { dim, .. } | Filter::Contains { dim, .. } => out.push(dim.clone()),
            Filter::And(fs) | Filter::Or(fs) => fs.iter().for_each(|f| f.dims(out)),
            Filter::Not(f) => f.dims(out),
        }
    }

    /// SQL predicate; `expr` maps a dimension to its column expression.
    fn sql(&self, expr: &dyn Fn(&Dim) -> String) -> String {
        let list = |values: &[String]| {
            values
                .iter()
                .map(|v| format!("'{}'", esc(v)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            // A goal is one of a comma-separated list: match the element, not the text.
            Filter::Is {
                dim,
                values,
                negate,
            } if *dim == Dim::Goal => {
                let any = balanced(
                    &values
                        .iter()
                        .map(|v| {
                            format!(
                                "array_has(string_to_array(properties['goal'], ','), '{}')",
                                esc(v)
                            )
                        })
                        .collect::<Vec<_>>(),
                    "OR",
                );
                if *negate {
                    format!("NOT COALESCE(({any}), false)")
                } else {
                    format!("COALESCE(({any}), false)")
                }
            }
            Filter::Is {
                dim,
                values,
                negate,
            } => {
                let e = expr(dim);
                if *negate {
                    // Plausible: `is_not` keeps events without the dimension.
                    format!("({e} IS NULL OR {e} NOT IN ({}))", list(values))
                } else {
                    format!("{e} IN ({})", list(values))
                }
            }
            Filter::Contains { dim, values } => {
                let e = if *dim == Dim::Goal {
                    "properties['goal']".to_string()
                } else {
                    expr(dim)
                };
                let any = balanced(
                    &values
                        .iter()
                        .map(|v| format!("strpos({e}, '{}') > 0", esc(v)))
                        .collect::<Vec<_>>(),
                    "OR",
                );
                format!("COALESCE(({any}), false)")
            }
            Filter::And(fs) => format!(
                "({})",
                balanced(&fs.iter().map(|f| f.sql(expr)).collect::<Vec<_>>(), "AND")
            ),
            Filter::Or(fs) => format!(
                "({})",
                balanced(&fs.iter().map(|f| f.sql(expr)).collect::<Vec<_>>(), "OR")
            ),
            Filter::Not(f) => format!("(NOT {})", f.sql(expr)),
        }
    }
}

/// A request value for an error message: at most 80 characters of its JSON.
fn short(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text,
    }
}

/// A SQL string literal's content.
fn esc(s: &str) -> String {
    s.replace('\'', "''")
}

/// What a sort key refers to.
#[derive(Debug, Clone, PartialEq)]
enum SortKey {
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
    sessions_only: bool,
    order: Vec<(SortKey, bool)>,
    pub limit: u32,
    pub offset: u32,
}

/// Where a part of the answer comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Rollups,
    Events,
    Sessions,
    /// Total visitors per time bucket (the denominator of `conversion_rate`).
    Totals,
}

#[derive(Debug, Clone)]
pub struct Source {
    pub kind: SourceKind,
    pub sql: String,
    /// The warehouse tables the SQL reads (views resolved): what its answer depends on.
    pub tables: &'static [&'static str],
}

/// Parses an IANA time zone name (`Europe/Berlin`); `None` or empty is UTC.
pub fn parse_timezone(name: Option<&str>) -> Result<Tz, String> {
    match name.map(str::trim).filter(|n| !n.is_empty()) {
        None => Ok(Tz::UTC),
        Some(n) => n
            .parse::<Tz>()
            .map_err(|_| format!("`{n}` is not an IANA time zone name")),
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
            let metric = METRICS
                .iter()
                .find(|(n, _)| n == m)
                .map(|(_, metric)| *metric)
                .ok_or_else(|| {
                    bad(
                        "metrics",
                        format!(
                            "unknown metric `{m}` (supported: {})",
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
        let per_visit = metrics.iter().any(|m| !m.per_event());
        let sessions_only =
            dims.iter().any(Dim::is_session) || filter_dims.iter().any(Dim::is_session);
        if per_visit || sessions_only {
            let what = if per_visit {
                "visit metrics"
            } else {
                "entry and exit pages"
            };
            if let Some(d) = dims.iter().find(|d| d.is_event_scoped()) {
                return Err(bad(
                    "dimensions",
                    format!("{what} cannot be broken down by {} yet", api_name(d)),
                ));
            }
            if let Some(d) = filter_dims.iter().find(|d| d.is_event_scoped()) {
                return Err(bad(
                    "filters",
                    format!("{what} cannot be filtered by {} yet", api_name(d)),
                ));
            }
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
        if self.include.is_some() {
            return Err(bad("include", "include is not supported yet"));
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
            order,
            limit: p.limit,
            offset: p.offset,
        })
    }
}

fn api_name(d: &Dim) -> String {
    match d {
        Dim::Column { api, .. } => api.to_string(),
        Dim::Goal => "event:goal".into(),
        Dim::Prop(k) => format!("event:props:{k}"),
        Dim::EntryPage => "visit:entry_page".into(),
        Dim::ExitPage => "visit:exit_page".into(),
        Dim::Time(_) => "time".into(),
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

fn local_midnight(tz: Tz, d: NaiveDate) -> DateTime<Utc> {
    let naive = d.and_hms_opt(0, 0, 0).unwrap_or_default();
    // A midnight skipped by a DST change starts the day at the first instant after it.
    tz.from_local_datetime(&naive)
        .earliest()
        .or_else(|| {
            tz.from_local_datetime(&(naive + Duration::hours(1)))
                .earliest()
        })
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| Utc.from_utc_datetime(&naive))
}

/// `[from, to)` for a date range in `tz`, as UTC instants.
fn date_range(
    v: &Value,
    tz: Tz,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), QueryError> {
    let today = now.with_timezone(&tz).date_naive();
    let tomorrow = local_midnight(tz, today + Duration::days(1));
    let first_of = |y: i32, m: u32| NaiveDate::from_ymd_opt(y, m, 1);
    match v {
        Value::String(s) => {
            let from = match s.as_str() {
                "day" => Some(today),
                "7d" => Some(today - Duration::days(6)),
                "30d" => Some(today - Duration::days(29)),
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
            Ok((local_midnight(tz, from), tomorrow))
        }
        Value::Array(a) if a.len() == 2 => {
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
            let (earliest, latest) = (
                NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default(),
                NaiveDate::from_ymd_opt(2200, 12, 31).unwrap_or_default(),
            );
            if from < earliest || to > latest {
                return Err(bad(
                    "date_range",
                    "dates must be between 1970-01-01 and 2200-12-31",
                ));
            }
            if to < from {
                return Err(bad("date_range", "the end is before the start"));
            }
            if (to - from).num_days() > 3 * 366 {
                return Err(bad("date_range", "at most three years"));
            }
            Ok((
                local_midnight(tz, from),
                local_midnight(tz, to + Duration::days(1)),
            ))
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

    /// The label of `column`'s time bucket, in the merchant's time zone.
    fn bucket(&self, t: TimeBucket, column: &str) -> String {
        format!(
            "to_char(date_trunc('{}', {column} AT TIME ZONE '{}'), '{}')",
            t.trunc(),
            self.tz.name(),
            t.format()
        )
    }

    /// Hourly UTC rollups can be regrouped into local buckets when every local hour is a
    /// UTC hour: the zone's offset is whole hours over the whole range.
    fn whole_hour_zone(&self) -> bool {
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

    /// Dimensions as `expr AS d0, ...` and the GROUP BY list; `expr` maps non-time ones.
    fn dim_columns(&self, time_column: &str, expr: &dyn Fn(&Dim) -> String) -> (String, String) {
        let mut select = Vec::new();
        let mut not_null = Vec::new();
        for (i, d) in self.dims.iter().enumerate() {
            let e = match d {
                Dim::Time(t) => self.bucket(*t, time_column),
                other => {
                    let e = expr(other);
                    not_null.push(format!("{e} IS NOT NULL AND {e} <> ''"));
                    e
                }
            };
            select.push(format!("{e} AS d{i}, "));
        }
        let group = if self.dims.is_empty() {
            String::new()
        } else {
            format!(
                " GROUP BY {}",
                (1..=self.dims.len())
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let where_ = not_null
            .iter()
            .map(|c| format!(" AND {c}"))
            .collect::<String>();
        (select.concat(), format!("{where_}{group}"))
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

    /// The SQL that answers the query, one statement per source.
    pub fn sources(&self) -> Vec<Source> {
        let m = esc(&self.merchant_id);
        let mut out = Vec::new();
        let sessions_only = self.sessions_only;
        let per_event = self.metrics.iter().any(|m| m.per_event());
        if per_event && !sessions_only {
            let kind = if self.rollups_eligible() {
                SourceKind::Rollups
            } else {
                SourceKind::Events
            };
            out.push(self.event_metrics(kind, &m));
        }
        if sessions_only || self.metrics.iter().any(|m| !m.per_event()) {
            out.push(Source {
                kind: SourceKind::Sessions,
                sql: self.sessions_sql(&m),
                tables: &["events"],
            });
        }
        if self.metrics.contains(&Metric::ConversionRate) {
            out.push(Source {
                kind: SourceKind::Totals,
                sql: self.totals_sql(&m),
                tables: if self.whole_hour_zone() {
                    &["rollups_hourly"]
                } else {
                    &["events"]
                },
            });
        }
        out
    }

    fn event_metrics(&self, kind: SourceKind, m: &str) -> Source {
        let tables: &'static [&'static str] = match kind {
            SourceKind::Rollups if self.dims.iter().any(|d| d.breakdown().is_some()) => {
                &["breakdowns_hourly"]
            }
            SourceKind::Rollups => &["rollups_hourly"],
            _ => &["events"],
        };
        Source {
            kind,
            sql: self.event_metrics_sql(kind, m),
            tables,
        }
    }

    /// The same answer computed from `events` alone (and `sessions`), never the rollups:
    /// the baseline of the query benchmark and a cross-check.
    pub fn events_sources(&self) -> Vec<Source> {
        self.sources()
            .into_iter()
            .map(|s| match s.kind {
                SourceKind::Rollups => {
                    self.event_metrics(SourceKind::Events, &esc(&self.merchant_id))
                }
                _ => s,
            })
            .collect()
    }

    fn event_metrics_sql(&self, kind: SourceKind, m: &str) -> String {
        if kind == SourceKind::Rollups {
            let breakdown = self.dims.iter().find_map(Dim::breakdown);
            let (dims, group) = self.dim_columns("hour", &|_| "value".into());
            let (table, extra) = match &breakdown {
                Some(b) => (
                    "breakdowns_hourly",
                    format!(" AND dimension = '{}'", esc(b)),
                ),
                None => ("rollups_hourly", String::new()),
            };
            return format!(
                "SELECT {dims}CAST(sum(events) AS BIGINT) AS events, \
                        CAST(sum(pageviews) AS BIGINT) AS pageviews, \
                        CAST(round(hll_estimate(hll_union(visitors_hll))) AS BIGINT) AS visitors \
                 FROM {table} WHERE merchant_id = '{m}'{extra} AND {}{group}",
                self.bounds("hour")
            );
        }
        let (dims, group) = self.dim_columns("ts", &Dim::events_expr);
        let filter = self
            .filter
            .as_ref()
            .map(|f| format!(" AND {}", f.sql(&Dim::events_expr)))
            .unwrap_or_default();
        let bounds = self.bounds("ts");
        // A goal breakdown counts an event once per goal it names.
        let from = if self.dims.contains(&Dim::Goal) {
            format!(
                "(SELECT *, trim(unnest(string_to_array(properties['goal'], ','))) AS goal \
                  FROM events WHERE merchant_id = '{m}' AND {bounds} AND properties['goal'] IS NOT NULL) g"
            )
        } else {
            "events".into()
        };
        format!(
            "SELECT {dims}count(*) AS events, \
                    CAST(sum(CASE WHEN name = 'pageview' THEN 1 ELSE 0 END) AS BIGINT) AS pageviews, \
                    count(DISTINCT visitor_id) AS visitors \
             FROM {from} WHERE merchant_id = '{m}' AND {bounds}{filter}{group}"
        )
    }

    fn sessions_sql(&self, m: &str) -> String {
        let expr = |d: &Dim| d.sessions_expr().unwrap_or_default();
        let (dims, group) = self.dim_columns("started_at", &expr);
        let filter = self
            .filter
            .as_ref()
            .map(|f| format!(" AND {}", f.sql(&expr)))
            .unwrap_or_default();
        // Event metrics too, when the query is about entry or exit pages.
        format!(
            "SELECT {dims}count(*) AS visits, \
                    round(100.0 * avg(CASE WHEN bounce THEN 1.0 ELSE 0.0 END)) AS bounce_rate, \
                    round(avg(CAST(duration_ms AS DOUBLE)) / 1000.0) AS visit_duration, \
                    round(avg(CAST(pageviews AS DOUBLE)), 2) AS views_per_visit, \
                    count(DISTINCT visitor_id) AS visitors, \
                    CAST(sum(pageviews) AS BIGINT) AS pageviews, \
                    CAST(sum(events) AS BIGINT) AS events \
             FROM sessions WHERE merchant_id = '{m}' AND {}{filter}{group}",
            self.bounds("started_at")
        )
    }

    fn totals_sql(&self, m: &str) -> String {
        let time = self.dims.iter().find_map(|d| match d {
            Dim::Time(t) => Some(*t),
            _ => None,
        });
        let (col, table, visitors) = if self.whole_hour_zone() {
            (
                "hour",
                "rollups_hourly",
                "CAST(round(hll_estimate(hll_union(visitors_hll))) AS BIGINT)",
            )
        } else {
            ("ts", "events", "count(DISTINCT visitor_id)")
        };
        match time {
            Some(t) => format!(
                "SELECT {} AS t, {visitors} AS total_visitors FROM {table} \
                 WHERE merchant_id = '{m}' AND {} GROUP BY 1",
                self.bucket(t, col),
                self.bounds(col)
            ),
            None => format!(
                "SELECT {visitors} AS total_visitors FROM {table} WHERE merchant_id = '{m}' AND {}",
                self.bounds(col)
            ),
        }
    }

    /// Merges the rows of every source (JSON objects: `d0..` dimension values and metric
    /// columns) into Plausible's `results`, sorted and paginated.
    pub fn results(&self, rows: &[(SourceKind, Vec<Value>)]) -> Vec<Value> {
        let time_index = self.dims.iter().position(Dim::is_time);
        let mut merged: BTreeMap<String, (Vec<Value>, serde_json::Map<String, Value>)> =
            BTreeMap::new();
        let mut totals: HashMap<String, Value> = HashMap::new();
        for (kind, rows) in rows {
            for row in rows {
                let Some(obj) = row.as_object() else { continue };
                if *kind == SourceKind::Totals {
                    let t = obj.get("t").map(Value::to_string).unwrap_or_default();
                    totals.insert(t, obj.get("total_visitors").cloned().unwrap_or(Value::Null));
                    continue;
                }
                let dims: Vec<Value> = (0..self.dims.len())
                    .map(|i| obj.get(&format!("d{i}")).cloned().unwrap_or(Value::Null))
                    .collect();
                let key = serde_json::to_string(&dims).unwrap_or_default();
                let entry = merged
                    .entry(key)
                    .or_insert_with(|| (dims, Default::default()));
                for (k, v) in obj {
                    // The sessions source also counts event metrics; the event source wins.
                    if k.starts_with('d') && k[1..].chars().all(|c| c.is_ascii_digit()) {
                        continue;
                    }
                    if *kind == SourceKind::Sessions && entry.1.contains_key(k) {
                        continue;
                    }
                    entry.1.insert(k.clone(), v.clone());
                }
            }
        }
        if merged.is_empty() && self.dims.is_empty() {
            merged.insert(String::new(), (Vec::new(), Default::default()));
        }
        let mut out: Vec<(Vec<Value>, Vec<Value>)> = merged
            .into_values()
            .map(|(dims, values)| {
                let metrics = self
                    .metrics
                    .iter()
                    .map(|m| match m {
                        Metric::ConversionRate => {
                            let t = time_index.map(|i| dims[i].to_string()).unwrap_or_default();
                            let visitors = values.get("visitors").and_then(Value::as_f64);
                            let total = totals.get(&t).and_then(Value::as_f64);
                            match (visitors, total) {
                                (Some(v), Some(t)) if t > 0.0 => {
                                    serde_json::json!((v * 10_000.0 / t).round() / 100.0)
                                }
                                _ => 0.into(),
                            }
                        }
                        m => {
                            let v = values.get(m.name()).cloned().unwrap_or(Value::Null);
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
                        }
                    })
                    .collect();
                (dims, metrics)
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
        out.into_iter()
            .skip(self.offset as usize)
            .take(self.limit as usize)
            .map(|(dims, metrics)| serde_json::json!({"metrics": metrics, "dimensions": dims}))
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(v: Value) -> QueryRequest {
        serde_json::from_value(v).unwrap()
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 15, 10, 30, 0).unwrap()
    }

    fn plan(v: Value) -> Result<Plan, QueryError> {
        req(v).plan("m_1", Tz::UTC, now())
    }

    fn with_filters(filters: Value) -> Result<Plan, QueryError> {
        plan(
            json!({"site_id": "m_1", "metrics": ["visitors"], "date_range": "7d", "filters": filters}),
        )
    }

    #[test]
    fn a_long_or_becomes_a_balanced_tree_not_a_chain() {
        let leaves: Vec<Value> = (0..150)
            .map(|i| json!(["is", "event:page", [format!("/p{i}")]]))
            .collect();
        let p = with_filters(json!([["or", leaves]])).unwrap();
        let sql = p.filter.as_ref().unwrap().sql(&Dim::events_expr);
        // Nesting depth of the SQL: about log2(150), not 150.
        let mut depth = 0i32;
        let mut max = 0;
        for c in sql.chars() {
            match c {
                '(' => {
                    depth += 1;
                    max = max.max(depth);
                }
                ')' => depth -= 1,
                _ => {}
            }
        }
        assert!(max <= 12, "nesting {max}: {sql}");
        assert_eq!(sql.matches(" OR ").count(), 149);
    }

    #[test]
    fn filter_complexity_is_refused_with_the_limit_named() {
        let leaf = json!(["is", "event:page", ["/a"]]);
        let msg = |f: Value| with_filters(f).unwrap_err().to_string();
        // 2,200 terms of one `or` (the request that used to overflow the planner's stack).
        let many: Vec<Value> = (0..2200).map(|_| leaf.clone()).collect();
        assert!(msg(json!([["or", many]])).contains("more than 200 filters"));
        // 38 nested `not`s.
        let mut deep = leaf.clone();
        for _ in 0..38 {
            deep = json!(["not", deep]);
        }
        assert!(msg(json!([deep])).contains("nested deeper than 8"));
        // Too many values in all.
        let big: Vec<Value> = (0..6)
            .map(|i| {
                json!([
                    "is",
                    "event:page",
                    (0..1000).map(|j| format!("/{i}/{j}")).collect::<Vec<_>>()
                ])
            })
            .collect();
        assert!(msg(json!(big)).contains("more than 5000 filter values"));
        let contains: Vec<String> = (0..101).map(|i| i.to_string()).collect();
        assert!(msg(json!([["contains", "event:page", contains]])).contains("1-100 values"));
        // Within the limits, fine.
        let mut ok = leaf.clone();
        for _ in 0..7 {
            ok = json!(["not", ok]);
        }
        assert!(with_filters(json!([ok])).is_ok());
    }

    #[test]
    fn dates_outside_what_timestamps_hold_are_a_400_not_a_failure_later() {
        for range in [
            json!(["0001-01-01", "0001-12-31"]),
            json!(["9999-01-01", "9999-01-02"]),
        ] {
            let e = date_range(&range, Tz::UTC, now()).unwrap_err();
            assert_eq!(e.field, "date_range");
            assert!(e.message.contains("between 1970-01-01 and 2200-12-31"));
        }
    }

    #[test]
    fn date_ranges_resolve_in_the_merchants_zone() {
        let r = |v: Value, tz: Tz| date_range(&v, tz, now()).unwrap();
        let (f, t) = r("7d".into(), Tz::UTC);
        assert_eq!(f.to_rfc3339(), "2026-03-09T00:00:00+00:00");
        assert_eq!(t.to_rfc3339(), "2026-03-16T00:00:00+00:00");
        assert_eq!(
            r("12mo".into(), Tz::UTC).0.to_rfc3339(),
            "2025-04-01T00:00:00+00:00"
        );
        assert_eq!(
            r("month".into(), Tz::UTC).0.to_rfc3339(),
            "2026-03-01T00:00:00+00:00"
        );
        // 10:30 UTC is 19:30 in Tokyo; its day started at 15:00 UTC the day before.
        let (f, t) = r("day".into(), Tz::Asia__Tokyo);
        assert_eq!(f.to_rfc3339(), "2026-03-14T15:00:00+00:00");
        assert_eq!(t.to_rfc3339(), "2026-03-15T15:00:00+00:00");
        // 22:00 in Los Angeles is already the next day in UTC.
        let late = Utc.with_ymd_and_hms(2026, 3, 16, 5, 0, 0).unwrap();
        let (f, _) = date_range(&"day".into(), Tz::America__Los_Angeles, late).unwrap();
        assert_eq!(f.to_rfc3339(), "2026-03-15T07:00:00+00:00");
        let (f, t) = r(json!(["2026-01-01", "2026-01-31"]), Tz::Asia__Kolkata);
        assert_eq!(f.to_rfc3339(), "2025-12-31T18:30:00+00:00");
        assert_eq!(t.to_rfc3339(), "2026-01-31T18:30:00+00:00");
        assert!(date_range(&"fortnight".into(), Tz::UTC, now()).is_err());
        assert!(date_range(&json!(["2026-02-01", "2026-01-01"]), Tz::UTC, now()).is_err());
    }

    #[test]
    fn bad_fields_are_named() {
        let field = |v| plan(v).unwrap_err().field;
        let base = |extra: Value| {
            let mut b = json!({"site_id": "m_1", "metrics": ["visitors"], "date_range": "day"});
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            b
        };
        assert_eq!(field(base(json!({"metrics": ["nope"]}))), "metrics");
        assert_eq!(field(base(json!({"date_range": "x"}))), "date_range");
        assert_eq!(
            field(base(json!({"dimensions": ["visit:planet"]}))),
            "dimensions"
        );
        assert_eq!(
            field(base(json!({"dimensions": ["event:props:$os"]}))),
            "dimensions"
        );
        assert_eq!(
            field(base(json!({"filters": [["is", "event:page"]]}))),
            "filters"
        );
        assert_eq!(
            field(base(json!({"filters": [["like", "event:page", ["/"]]]}))),
            "filters"
        );
        assert_eq!(
            field(base(json!({"order_by": [["pageviews", "desc"]]}))),
            "order_by"
        );
        assert_eq!(
            field(base(
                json!({"metrics": ["bounce_rate"], "dimensions": ["event:page"]})
            )),
            "dimensions"
        );
        assert_eq!(
            field(base(
                json!({"metrics": ["visits"], "filters": [["is", "event:goal", ["Signup"]]]})
            )),
            "filters"
        );
        assert_eq!(
            field(base(json!({"metrics": ["conversion_rate"]}))),
            "metrics"
        );
        assert_eq!(
            field(base(json!({"include": {"imports": true}}))),
            "include"
        );
    }

    #[test]
    fn unfiltered_breakdowns_use_rollups_and_filters_use_events() {
        let p = plan(json!({"site_id": "m_1", "metrics": ["visitors", "pageviews"], "date_range": "7d", "dimensions": ["visit:country"]})).unwrap();
        let s = p.sources();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].kind, SourceKind::Rollups);
        assert!(
            s[0].sql.contains("dimension = 'visit:country'"),
            "{}",
            s[0].sql
        );

        let p = plan(json!({"site_id": "m_1", "metrics": ["visitors"], "date_range": "7d", "dimensions": ["event:page"],
            "filters": [["and", [["is", "visit:source", ["Google", "Bing"]], ["not", ["contains", "event:page", ["o'k"]]]]]]})).unwrap();
        let s = p.sources();
        assert_eq!(s[0].kind, SourceKind::Events);
        assert!(
            s[0].sql.contains("source IN ('Google', 'Bing')"),
            "{}",
            s[0].sql
        );
        assert!(s[0].sql.contains("strpos(path, 'o''k')"), "{}", s[0].sql);

        // A half-hour zone cannot be regrouped from UTC hours.
        let p = req(json!({"site_id": "m_1", "metrics": ["visitors"], "date_range": "7d", "dimensions": ["time:day"]}))
            .plan("m_1", Tz::Asia__Kolkata, now())
            .unwrap();
        assert_eq!(p.sources()[0].kind, SourceKind::Events);
        assert!(p.sources()[0].sql.contains("AT TIME ZONE 'Asia/Kolkata'"));

        let p = plan(json!({"site_id": "m_1", "metrics": ["visitors", "bounce_rate"], "date_range": "7d", "dimensions": ["visit:entry_page"]})).unwrap();
        let kinds: Vec<_> = p.sources().iter().map(|s| s.kind).collect();
        assert_eq!(kinds, vec![SourceKind::Sessions]);
    }

    #[test]
    fn results_merge_sources_sort_and_compute_conversion_rates() {
        let p = plan(json!({"site_id": "m_1", "metrics": ["visitors", "visits", "bounce_rate"], "date_range": "7d", "dimensions": ["time:day"]})).unwrap();
        let rows = vec![
            (
                SourceKind::Rollups,
                vec![
                    json!({"d0": "2026-03-11", "visitors": 1, "events": 1, "pageviews": 1}),
                    json!({"d0": "2026-03-10", "visitors": 3, "events": 9, "pageviews": 7}),
                ],
            ),
            (
                SourceKind::Sessions,
                vec![json!({"d0": "2026-03-10", "visits": 4, "bounce_rate": 50.0, "visitors": 99})],
            ),
        ];
        let out = p.results(&rows);
        assert_eq!(
            out[0],
            json!({"metrics": [3, 4, 50.0], "dimensions": ["2026-03-10"]})
        );
        assert_eq!(
            out[1],
            json!({"metrics": [1, 0, null], "dimensions": ["2026-03-11"]})
        );

        let p = plan(json!({"site_id": "m_1", "metrics": ["visitors", "conversion_rate"], "date_range": "7d", "dimensions": ["event:goal"]})).unwrap();
        let rows = vec![
            (
                SourceKind::Rollups,
                vec![
                    json!({"d0": "Signup", "visitors": 10}),
                    json!({"d0": "Purchase", "visitors": 30}),
                ],
            ),
            (SourceKind::Totals, vec![json!({"total_visitors": 200})]),
        ];
        let out = p.results(&rows);
        assert_eq!(
            out[0],
            json!({"metrics": [30, 15.0], "dimensions": ["Purchase"]})
        );
        assert_eq!(
            out[1],
            json!({"metrics": [10, 5.0], "dimensions": ["Signup"]})
        );
    }
}
