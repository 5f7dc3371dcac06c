//! Each source of a [`Plan`] as a DataFusion plan built from expressions (`col`, `lit`,
//! function calls), never from SQL text: a request's values reach DataFusion as literals,
//! so nothing a merchant sends is ever parsed, and there is no SQL parsing per request.
//!
//! The plans run in the merchant's session (the one the Postgres endpoint also uses:
//! every table there is already filtered on the merchant), so they do not scope rows
//! themselves. Each returns dimension columns `d0..` and metric columns named as
//! [`super::results`] reads them.

use chrono::{DateTime, Utc};
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::{Column, ScalarValue};
use datafusion::dataframe::DataFrame;
use datafusion::error::Result;
use datafusion::execution::FunctionRegistry;
use datafusion::functions::expr_fn::{
    btrim, coalesce, date_trunc, get_field, round, strpos, to_char,
};
use datafusion::functions_aggregate::expr_fn::{avg, count, count_distinct, sum};
use datafusion::functions_nested::expr_fn::array_has;
use datafusion::functions_nested::string::string_to_array_udf;
use datafusion::prelude::{cast, col, lit, when, Expr, SessionContext};

use super::plan::{Plan, Source, SourceKind};
use super::request::{Dim, Filter, TimeBucket};

/// The plan of `source` in `ctx` (a merchant's session).
pub async fn frame(ctx: &SessionContext, plan: &Plan, source: &Source) -> Result<DataFrame> {
    match source.kind {
        SourceKind::Rollups => event_metrics_rollups(ctx, plan, source.tables[0]).await,
        SourceKind::Events => event_metrics(ctx, plan).await,
        SourceKind::Sessions => visit_metrics(ctx, plan).await,
        SourceKind::Totals => total_visitors(ctx, plan, source.rolled_up()).await,
        SourceKind::Revenue => revenue(ctx, plan, source.rolled_up()).await,
    }
}

/// The instant `t` as a literal of `column`'s type in `df` (compared at its own type, so
/// no cast lands on the column and pruning by file statistics keeps working).
fn instant(df: &DataFrame, column: &str, t: DateTime<Utc>) -> Result<Expr> {
    let ty = df
        .schema()
        .field_with_unqualified_name(column)?
        .data_type()
        .clone();
    Ok(cast(
        lit(ScalarValue::TimestampMicrosecond(
            Some(t.timestamp_micros()),
            Some("UTC".into()),
        )),
        ty,
    ))
}

/// `[from, to)` on `column`, a timestamp of `df`.
fn bounds(df: &DataFrame, plan: &Plan, column: &str) -> Result<Expr> {
    Ok(col(column)
        .gt_eq(instant(df, column, plan.from)?)
        .and(col(column).lt(instant(df, column, plan.to)?)))
}

/// The label of `column`'s time bucket in the merchant's time zone (what `AT TIME ZONE`
/// and `to_char` give in SQL).
fn bucket(plan: &Plan, t: TimeBucket, column: &str) -> Expr {
    let local = cast(
        col(column),
        DataType::Timestamp(TimeUnit::Nanosecond, Some(plan.tz.name().into())),
    );
    to_char(date_trunc(lit(t.trunc()), local), lit(t.format()))
}

/// `exprs` joined by `op` as a balanced tree: `N` terms nest `log2 N` deep, so a long
/// `or` from a request stays shallow for every recursive pass over the plan.
fn balanced(mut exprs: Vec<Expr>, op: fn(Expr, Expr) -> Expr) -> Expr {
    match exprs.len() {
        0 => lit(true),
        1 => exprs.remove(0),
        n => {
            let rest = exprs.split_off(n / 2);
            op(balanced(exprs, op), balanced(rest, op))
        }
    }
}

fn goal_list() -> Expr {
    string_to_array_udf().call(vec![get_field(col("properties"), "goal"), lit(",")])
}

/// A dimension over `events` (after a goal breakdown's unnest, `goal` is a column).
fn events_dim(d: &Dim) -> Expr {
    match d {
        Dim::Column(c) => col(c.column),
        Dim::Goal => col("goal"),
        Dim::Prop(k) => get_field(col("properties"), k.as_str()),
        // Not over `events` (validation keeps them out of these plans).
        Dim::EntryPage | Dim::ExitPage | Dim::Time(_) => lit(ScalarValue::Utf8(None)),
    }
}

/// A dimension over `sessions`: the visit's columns and its entry and exit pages.
fn sessions_dim(d: &Dim) -> Expr {
    match d {
        Dim::Column(c) if c.in_sessions => col(c.column),
        Dim::EntryPage => col("entry_page"),
        Dim::ExitPage => col("exit_page"),
        // Dimensions `sessions` lacks are refused for visit metrics at validation.
        _ => lit(ScalarValue::Utf8(None)),
    }
}

/// The predicate of a filter tree; `dim` maps a dimension to its expression.
fn predicate(f: &Filter, dim: &dyn Fn(&Dim) -> Expr) -> Expr {
    let any = |exprs: Vec<Expr>| coalesce(vec![balanced(exprs, Expr::or), lit(false)]);
    match f {
        // A goal is one of a comma-separated list: match the element, not the text.
        Filter::Is {
            dim: Dim::Goal,
            values,
            negate,
        } => {
            let matched = any(values
                .iter()
                .map(|v| array_has(goal_list(), lit(v.as_str())))
                .collect());
            if *negate {
                !matched
            } else {
                matched
            }
        }
        Filter::Is {
            dim: d,
            values,
            negate,
        } => {
            let e = dim(d);
            let list = values.iter().map(|v| lit(v.as_str())).collect();
            if *negate {
                // Plausible: `is_not` keeps events without the dimension.
                e.clone().is_null().or(e.in_list(list, true))
            } else {
                e.in_list(list, false)
            }
        }
        Filter::Contains { dim: d, values } => {
            let e = if *d == Dim::Goal {
                get_field(col("properties"), "goal")
            } else {
                dim(d)
            };
            any(values
                .iter()
                .map(|v| strpos(e.clone(), lit(v.as_str())).gt(lit(0)))
                .collect())
        }
        Filter::And(fs) => balanced(fs.iter().map(|f| predicate(f, dim)).collect(), Expr::and),
        Filter::Or(fs) => balanced(fs.iter().map(|f| predicate(f, dim)).collect(), Expr::or),
        Filter::Not(f) => !predicate(f, dim),
    }
}

/// The plan's dimensions as `d0..` group expressions, and the predicate that drops rows
/// without a value for a non-time one.
fn group_by(plan: &Plan, time_column: &str, dim: &dyn Fn(&Dim) -> Expr) -> (Vec<Expr>, Expr) {
    let mut groups = Vec::new();
    let mut present = Vec::new();
    for (i, d) in plan.dims.iter().enumerate() {
        let e = match d {
            Dim::Time(t) => bucket(plan, *t, time_column),
            other => {
                let e = dim(other);
                present.push(e.clone().is_not_null().and(e.clone().not_eq(lit(""))));
                e
            }
        };
        groups.push(e.alias(format!("d{i}")));
    }
    (groups, balanced(present, Expr::and))
}

fn int(e: Expr) -> Expr {
    cast(e, DataType::Int64)
}

/// One output metric: an aggregate, then what is computed from it (a cast, a rounding,
/// an estimate from a merged sketch).
struct Metric {
    name: &'static str,
    aggregate: Expr,
    then: Box<dyn Fn(Expr) -> Expr + Send + Sync>,
}

fn metric(name: &'static str, aggregate: Expr) -> Metric {
    Metric {
        name,
        aggregate,
        then: Box::new(|e| e),
    }
}

fn metric_then(
    name: &'static str,
    aggregate: Expr,
    then: impl Fn(Expr) -> Expr + Send + Sync + 'static,
) -> Metric {
    Metric {
        name,
        aggregate,
        then: Box::new(then),
    }
}

/// Groups `df` by `groups` and computes `metrics`: the aggregates first (DataFusion's
/// aggregate node takes bare aggregate calls), then a projection of the groups as they are
/// and each metric from its aggregate.
fn aggregate(df: DataFrame, groups: Vec<Expr>, metrics: Vec<Metric>) -> Result<DataFrame> {
    let n = groups.len();
    let df = df.aggregate(
        groups,
        metrics
            .iter()
            .map(|m| m.aggregate.clone().alias(format!("__{}", m.name)))
            .collect(),
    )?;
    let mut out: Vec<Expr> = df
        .schema()
        .fields()
        .iter()
        .take(n)
        .map(|f| Expr::Column(Column::from_name(f.name())))
        .collect();
    out.extend(
        metrics.iter().map(|m| {
            (m.then)(Expr::Column(Column::from_name(format!("__{}", m.name)))).alias(m.name)
        }),
    );
    df.select(out)
}

fn pageview_flag() -> Result<Expr> {
    when(col("name").eq(lit("pageview")), lit(1i64)).otherwise(lit(0i64))
}

/// `events` of the range, one row per (event, goal) when the plan breaks down by goal.
async fn events_in_range(ctx: &SessionContext, plan: &Plan) -> Result<DataFrame> {
    let events = ctx.table("events").await?;
    let range = bounds(&events, plan, "ts")?;
    let events = events.filter(range)?;
    if !plan.dims.contains(&Dim::Goal) {
        return Ok(events);
    }
    events
        .filter(get_field(col("properties"), "goal").is_not_null())?
        .with_column("goal", goal_list())?
        .unnest_columns(&["goal"])?
        .with_column("goal", btrim(vec![col("goal")]))
}

fn event_counts() -> Result<Vec<Metric>> {
    Ok(vec![
        metric("events", count(lit(1i64))),
        metric_then("pageviews", sum(pageview_flag()?), int),
        metric("visitors", count_distinct(col("visitor_id"))),
    ])
}

async fn event_metrics(ctx: &SessionContext, plan: &Plan) -> Result<DataFrame> {
    let mut df = events_in_range(ctx, plan).await?;
    if let Some(f) = &plan.filter {
        df = df.filter(predicate(f, &events_dim))?;
    }
    let (groups, present) = group_by(plan, "ts", &events_dim);
    aggregate(df.filter(present)?, groups, event_counts()?)
}

/// Unique visitors from the rollups: the union of the hourly sketches, estimated.
fn hll_visitors(ctx: &SessionContext, name: &'static str) -> Result<Metric> {
    let union = ctx.udaf("hll_union")?;
    let estimate = ctx.udf("hll_estimate")?;
    Ok(metric_then(
        name,
        union.call(vec![col("visitors_hll")]),
        move |sketch| int(round(vec![estimate.call(vec![sketch])])),
    ))
}

/// From `table`, the one [`Plan::sources`] chose: `breakdowns_hourly` when the plan has a
/// rolled-up breakdown, else `rollups_hourly`.
async fn event_metrics_rollups(
    ctx: &SessionContext,
    plan: &Plan,
    table: &str,
) -> Result<DataFrame> {
    let breakdown = plan.dims.iter().find_map(Dim::breakdown);
    let df = ctx.table(table).await?;
    let mut df = df.clone().filter(bounds(&df, plan, "hour")?)?;
    if let Some(b) = breakdown {
        df = df.filter(col("dimension").eq(lit(b)))?;
    }
    let (groups, present) = group_by(plan, "hour", &|_: &Dim| col("value"));
    aggregate(
        df.filter(present)?,
        groups,
        vec![
            metric_then("events", sum(col("events")), int),
            metric_then("pageviews", sum(col("pageviews")), int),
            hll_visitors(ctx, "visitors")?,
        ],
    )
}

async fn visit_metrics(ctx: &SessionContext, plan: &Plan) -> Result<DataFrame> {
    if plan.visits_by_events {
        return visit_metrics_by_events(ctx, plan).await;
    }
    let df = ctx.table("sessions").await?;
    let mut df = df.clone().filter(bounds(&df, plan, "started_at")?)?;
    if let Some(f) = &plan.filter {
        df = df.filter(predicate(f, &sessions_dim))?;
    }
    let (groups, present) = group_by(plan, "started_at", &sessions_dim);
    aggregate(df.filter(present)?, groups, visit_counts()?)
}

/// A column of one side of the visits-events join.
fn side(table: &str, column: &str) -> Expr {
    Expr::Column(Column::new(Some(table), column))
}

/// A dimension over visits joined with their events: what `sessions` has from the visit
/// (its first event's value, as without event dimensions), the rest from the event.
fn joined_dim(d: &Dim) -> Expr {
    match d {
        Dim::Column(c) if c.in_sessions => side("v", c.column),
        Dim::Column(c) => side("e", c.column),
        Dim::Goal => side("e", "goal"),
        Dim::Prop(k) => get_field(side("e", "properties"), k.as_str()),
        Dim::EntryPage | Dim::ExitPage | Dim::Time(_) => lit(ScalarValue::Utf8(None)),
    }
}

/// Visit metrics by or filtered on event dimensions (Plausible's semantics): the visits
/// that started in the range, joined with their events in the range (same visit key, time
/// within the visit). A visit passes the filter when one of its events does, and counts once
/// under each value of the event dimensions its events have.
async fn visit_metrics_by_events(ctx: &SessionContext, plan: &Plan) -> Result<DataFrame> {
    use beacon_warehouse::visits::VISIT_KEY_COLUMNS;
    let key = coalesce(VISIT_KEY_COLUMNS.iter().map(|c| col(*c)).collect());
    let events = events_in_range(ctx, plan)
        .await?
        .with_column("__visit_key", key)?
        .alias("e")?;
    let visits = ctx.table("visits").await?;
    let visits = visits
        .clone()
        .filter(bounds(&visits, plan, "started_at")?)?
        .alias("v")?;
    let mut joined = events.join_on(
        visits,
        datafusion::logical_expr::JoinType::Inner,
        [
            side("e", "__visit_key").eq(side("v", "visit_key")),
            side("e", "ts").gt_eq(side("v", "started_at")),
            side("e", "ts").lt_eq(side("v", "ended_at")),
        ],
    )?;
    if let Some(f) = &plan.filter {
        joined = joined.filter(predicate(f, &joined_dim))?;
    }
    // Qualified: after the join only the visit's start is the time of a visit.
    let (groups, present) = group_by(plan, "v.started_at", &joined_dim);
    let n = groups.len();
    // One row per visit and combination of dimension values, then the visit metrics.
    let mut columns = groups;
    columns.extend([
        side("v", "visit_key").alias("__visit"),
        side("v", "started_at").alias("__started"),
        side("v", "bounce").alias("bounce"),
        side("v", "duration_ms").alias("duration_ms"),
        side("v", "pageviews").alias("pageviews"),
    ]);
    let visits = joined.filter(present)?.select(columns)?.distinct()?;
    let groups = (0..n).map(|i| col(format!("d{i}"))).collect();
    // Only the visit metrics: a whole visit's pageviews, events and visitors under an event
    // dimension's value would be wrong there, and the event source answers those.
    aggregate(visits, groups, visit_only()?)
}

/// The visit metrics over rows of visits (`sessions` or the join's distinct visits), and
/// their event metrics, which queries about entry or exit pages read from here.
fn visit_counts() -> Result<Vec<Metric>> {
    let mut metrics = visit_only()?;
    metrics.extend([
        metric("visitors", count_distinct(col("visitor_id"))),
        metric_then("pageviews", sum(col("pageviews")), int),
        metric_then("events", sum(col("events")), int),
    ]);
    Ok(metrics)
}

/// Visits, bounce rate, visit duration and views per visit.
fn visit_only() -> Result<Vec<Metric>> {
    let bounced = when(col("bounce"), lit(1.0f64)).otherwise(lit(0.0f64))?;
    let float = |c: &str| cast(col(c), DataType::Float64);
    Ok(vec![
        metric("visits", count(lit(1i64))),
        metric_then("bounce_rate", avg(bounced), |e| {
            round(vec![lit(100.0f64) * e])
        }),
        metric_then("visit_duration", avg(float("duration_ms")), |e| {
            round(vec![e / lit(1000.0f64)])
        }),
        metric_then("views_per_visit", avg(float("pageviews")), |e| {
            round(vec![e, lit(2i64)])
        }),
    ])
}

async fn total_visitors(ctx: &SessionContext, plan: &Plan, rolled_up: bool) -> Result<DataFrame> {
    let (table, column, visitors) = if rolled_up {
        (
            "rollups_hourly",
            "hour",
            hll_visitors(ctx, "total_visitors")?,
        )
    } else {
        (
            "events",
            "ts",
            metric("total_visitors", count_distinct(col("visitor_id"))),
        )
    };
    let df = ctx.table(table).await?;
    let df = df.clone().filter(bounds(&df, plan, column)?)?;
    let groups = plan
        .dims
        .iter()
        .find_map(|d| match d {
            Dim::Time(t) => Some(vec![bucket(plan, *t, column).alias("t")]),
            _ => None,
        })
        .unwrap_or_default();
    aggregate(df, groups, vec![visitors])
}

/// Orders and revenue (micros) per group and currency.
async fn revenue(ctx: &SessionContext, plan: &Plan, rolled_up: bool) -> Result<DataFrame> {
    let by_currency = plan.dims.iter().any(Dim::is_currency);
    let currency = |groups: &mut Vec<Expr>| {
        if !by_currency {
            groups.push(col("currency").alias("currency"));
        }
    };
    if rolled_up {
        let df = ctx.table("revenue_hourly").await?;
        let df = df.clone().filter(bounds(&df, plan, "hour")?)?;
        let (mut groups, _) = group_by(plan, "hour", &|_: &Dim| col("currency"));
        currency(&mut groups);
        return aggregate(
            df,
            groups,
            vec![
                metric_then("orders", sum(col("orders")), int),
                metric_then("revenue_micros", sum(col("revenue_micros")), int),
            ],
        );
    }
    let mut df = events_in_range(ctx, plan).await?.filter(
        col("revenue_micros")
            .is_not_null()
            .and(col("currency").is_not_null()),
    )?;
    if let Some(f) = &plan.filter {
        df = df.filter(predicate(f, &events_dim))?;
    }
    let (mut groups, present) = group_by(plan, "ts", &events_dim);
    currency(&mut groups);
    aggregate(
        df.filter(present)?,
        groups,
        vec![
            metric("orders", count(lit(1i64))),
            metric_then("revenue_micros", sum(col("revenue_micros")), int),
        ],
    )
}

/// Visitors, page views and events of `events` since `since`: the realtime counters.
pub async fn recent(ctx: &SessionContext, since: DateTime<Utc>) -> Result<DataFrame> {
    let events = ctx.table("events").await?;
    let since = instant(&events, "ts", since)?;
    aggregate(
        events.filter(col("ts").gt_eq(since))?,
        vec![],
        event_counts()?,
    )
}

/// A plan's filter as the predicate over `events` its plans apply (the fuzz target and
/// tests check its shape).
pub fn events_predicate(plan: &Plan) -> Option<Expr> {
    plan.filter.as_ref().map(|f| predicate(f, &events_dim))
}

/// Nesting depth of an expression tree.
pub fn depth(e: &Expr) -> usize {
    match e {
        Expr::BinaryExpr(b) => 1 + depth(&b.left).max(depth(&b.right)),
        Expr::ScalarFunction(f) => 1 + f.args.iter().map(depth).max().unwrap_or(0),
        Expr::Not(e)
        | Expr::IsNull(e)
        | Expr::IsNotNull(e)
        | Expr::Alias(datafusion::logical_expr::expr::Alias { expr: e, .. }) => 1 + depth(e),
        Expr::InList(l) => 1 + depth(&l.expr),
        _ => 1,
    }
}
