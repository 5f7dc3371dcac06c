//! The request as it arrives (Plausible's Stats API v2 shape) and its parts, each read and
//! checked on its own: metrics, dimensions, filters (with their complexity limits), order,
//! pagination, `include`. Nothing here knows about tables or plans.

use serde::Deserialize;
use serde_json::Value;

use beacon_warehouse::dimensions;

#[derive(Debug, thiserror::Error)]
#[error("invalid `{field}`: {message}")]
pub struct QueryError {
    pub field: String,
    pub message: String,
}

pub(crate) fn bad(field: &str, message: impl Into<String>) -> QueryError {
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

pub(crate) fn default_limit() -> u32 {
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
    /// The sum of `revenue` over events that carry one, in their currency.
    TotalRevenue,
    /// [`Metric::TotalRevenue`] per event that carries revenue (an order).
    AverageRevenue,
}

pub(crate) const METRICS: &[(&str, Metric)] = &[
    ("visitors", Metric::Visitors),
    ("pageviews", Metric::Pageviews),
    ("events", Metric::Events),
    ("visits", Metric::Visits),
    ("bounce_rate", Metric::BounceRate),
    ("visit_duration", Metric::VisitDuration),
    ("views_per_visit", Metric::ViewsPerVisit),
    ("conversion_rate", Metric::ConversionRate),
    ("total_revenue", Metric::TotalRevenue),
    ("average_revenue", Metric::AverageRevenue),
];

/// Where a metric is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    /// Per event: the rollups or `events`.
    Event,
    /// Per visit: `sessions`.
    Visit,
    /// Per event with revenue, per currency: `revenue_hourly` or `events`.
    Revenue,
}

impl Metric {
    pub fn grain(self) -> Grain {
        match self {
            Metric::Visitors | Metric::Pageviews | Metric::Events | Metric::ConversionRate => {
                Grain::Event
            }
            Metric::Visits | Metric::BounceRate | Metric::VisitDuration | Metric::ViewsPerVisit => {
                Grain::Visit
            }
            Metric::TotalRevenue | Metric::AverageRevenue => Grain::Revenue,
        }
    }

    pub fn name(self) -> &'static str {
        METRICS
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("", |(n, _)| n)
    }

    pub(crate) fn parse(m: &str) -> Result<Metric, QueryError> {
        METRICS
            .iter()
            .find(|(n, _)| *n == m)
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
            })
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
    pub(crate) fn trunc(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Week => "week",
            Self::Month => "month",
        }
    }
    /// How the bucket is labelled in results (as Plausible does).
    pub(crate) fn format(self) -> &'static str {
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
    /// A column of `events` (and of `sessions`, for visit dimensions): one row of the
    /// dimension table.
    Column(&'static dimensions::Dimension),
    /// Each goal named in the `goal` property (several per event possible).
    Goal,
    Prop(String),
    EntryPage,
    ExitPage,
}

impl Dim {
    pub(crate) fn parse(field: &str, s: &str) -> Result<Dim, QueryError> {
        Ok(match s {
            "time:hour" => Dim::Time(TimeBucket::Hour),
            "time" | "time:day" => Dim::Time(TimeBucket::Day),
            "time:week" => Dim::Time(TimeBucket::Week),
            "time:month" => Dim::Time(TimeBucket::Month),
            "event:goal" => Dim::Goal,
            "visit:entry_page" => Dim::EntryPage,
            "visit:exit_page" => Dim::ExitPage,
            other => {
                if let Some(d) = dimensions::by_api(other) {
                    Dim::Column(d)
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
                            dimensions::DIMENSIONS
                                .iter()
                                .map(|d| d.api)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
        })
    }

    pub fn is_time(&self) -> bool {
        matches!(self, Dim::Time(_))
    }

    /// `event:currency`: revenue is summed per currency, never across.
    pub fn is_currency(&self) -> bool {
        matches!(self, Dim::Column(d) if d.column == "currency")
    }

    /// Needs the visit (only `sessions` knows it).
    pub fn is_session(&self) -> bool {
        matches!(self, Dim::EntryPage | Dim::ExitPage)
    }

    /// Visit metrics can use it: the `sessions` view has it (visit dimensions, entry and
    /// exit pages, time, and event dimensions that `sessions` also carries).
    pub fn in_sessions(&self) -> bool {
        match self {
            Dim::Column(d) => d.in_sessions,
            Dim::Goal | Dim::Prop(_) => false,
            _ => true,
        }
    }

    /// Its `dimension` in `breakdowns_hourly`, if the rollups carry it.
    pub fn breakdown(&self) -> Option<String> {
        match self {
            Dim::Column(d) if d.rolled_up => Some(d.api.to_string()),
            Dim::Goal => Some("event:goal".into()),
            Dim::Prop(k) => Some(format!("event:props:{k}")),
            _ => None,
        }
    }

    /// Its name in the API.
    pub fn api_name(&self) -> String {
        match self {
            Dim::Column(d) => d.api.to_string(),
            Dim::Goal => "event:goal".into(),
            Dim::Prop(k) => format!("event:props:{k}"),
            Dim::EntryPage => "visit:entry_page".into(),
            Dim::ExitPage => "visit:exit_page".into(),
            Dim::Time(_) => "time".into(),
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
pub(crate) struct FilterBudget {
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

impl Filter {
    pub(crate) fn parse_within(
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

    pub(crate) fn dims(&self, out: &mut Vec<Dim>) {
        match self {
            Filter::Is { dim, .. } | Filter::Contains { dim, .. } => out.push(dim.clone()),
            Filter::And(fs) | Filter::Or(fs) => fs.iter().for_each(|f| f.dims(out)),
            Filter::Not(f) => f.dims(out),
        }
    }
}

pub(crate) fn short(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text,
    }
}

/// What `include` asks for besides `results` (Plausible v2's names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Include {
    /// `total_rows`: how many rows the query has before pagination.
    pub total_rows: bool,
    /// `time_labels`: every bucket label of the range, also those without data.
    pub time_labels: bool,
    /// `imports`: Beacon imports nothing; accepted, and `meta.imports_included` is false.
    pub imports: bool,
}

impl Include {
    pub(crate) fn parse(v: Option<&Value>) -> Result<Include, QueryError> {
        let f = "include";
        let Some(v) = v else {
            return Ok(Include::default());
        };
        let obj = v
            .as_object()
            .ok_or_else(|| bad(f, "must be an object like {\"total_rows\": true}"))?;
        let mut out = Include::default();
        for (k, v) in obj {
            let on = v
                .as_bool()
                .ok_or_else(|| bad(f, format!("`{k}` must be true or false")))?;
            match k.as_str() {
                "total_rows" => out.total_rows = on,
                "time_labels" => out.time_labels = on,
                "imports" => out.imports = on,
                other => {
                    return Err(bad(
                        f,
                        format!("unknown `{other}` (supported: total_rows, time_labels, imports)"),
                    ))
                }
            }
        }
        Ok(out)
    }
}
