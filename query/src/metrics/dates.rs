//! Time zones and date ranges: a request's dates are days in the merchant's zone, resolved
//! here into `[from, to)` instants in UTC.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::Value;

use super::request::{bad, QueryError, TimeBucket};

/// Parses an IANA time zone name (`Europe/Berlin`); `None` or empty is UTC.
pub fn parse_timezone(name: Option<&str>) -> Result<Tz, String> {
    match name.map(str::trim).filter(|n| !n.is_empty()) {
        None => Ok(Tz::UTC),
        Some(n) => n
            .parse::<Tz>()
            .map_err(|_| format!("`{n}` is not an IANA time zone name")),
    }
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
pub(crate) fn date_range(
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

/// Every bucket label of `[from, to)` in `tz`, in order, as the plans label buckets
/// (`include: {"time_labels": true}`): also the buckets without data.
pub fn time_labels(tz: Tz, from: DateTime<Utc>, to: DateTime<Utc>, t: TimeBucket) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |label: String| {
        // A repeated local hour (the end of summer time) is one bucket.
        if out.last() != Some(&label) {
            out.push(label);
        }
    };
    match t {
        TimeBucket::Hour => {
            let mut at = from;
            while at < to {
                push(bucket_label(tz, at, t));
                at += Duration::hours(1);
            }
        }
        TimeBucket::Day | TimeBucket::Week | TimeBucket::Month => {
            let first = from.with_timezone(&tz).date_naive();
            let last = (to - Duration::nanoseconds(1))
                .with_timezone(&tz)
                .date_naive();
            let mut d = first;
            while d <= last {
                push(bucket_start(d, t).format(t.format()).to_string());
                d += Duration::days(1);
            }
        }
    }
    out
}

/// The first day of the bucket holding local day `d` (weeks start on Monday, as
/// DataFusion's `date_trunc('week', ..)`).
fn bucket_start(d: NaiveDate, t: TimeBucket) -> NaiveDate {
    match t {
        TimeBucket::Week => d - Duration::days(i64::from(d.weekday().num_days_from_monday())),
        TimeBucket::Month => d.with_day(1).unwrap_or(d),
        TimeBucket::Hour | TimeBucket::Day => d,
    }
}

/// The label of the bucket holding instant `at` in `tz`: what the plans'
/// `to_char(date_trunc(bucket, local time))` gives.
pub(crate) fn bucket_label(tz: Tz, at: DateTime<Utc>, t: TimeBucket) -> String {
    let local = at.with_timezone(&tz);
    match t {
        TimeBucket::Hour => local.format(t.format()).to_string(),
        _ => bucket_start(local.date_naive(), t)
            .format(t.format())
            .to_string(),
    }
}
