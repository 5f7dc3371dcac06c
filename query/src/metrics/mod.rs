//! The metrics API's queries, in the shape of Plausible's Stats API v2, from request to
//! answer:
//!
//! - [`request`]: the request and its parts (metrics, dimensions, filters with their
//!   complexity limits, order, pagination, `include`), each checked on its own;
//! - [`dates`]: time zones and date ranges in the merchant's zone;
//! - [`plan`]: the request validated as a whole into a [`Plan`], and which sources answer
//!   it: the hourly rollups (events, page views, visitors as merged HLL sketches, by time
//!   and at most one rolled-up dimension, unfiltered, in zones a whole number of hours from
//!   UTC), `events` (everything else, exact), the `sessions` view over the pre-aggregated `visits` (visit metrics, entry and
//!   exit pages), `revenue_hourly` or `events` (revenue per currency);
//! - [`logical`]: each source as a DataFusion plan built from expressions, in the
//!   merchant's session (no SQL text, no request value spliced into one);
//! - [`execute`]: the merchants' sessions and running a plan;
//! - [`slices`]: a merchant's rollup rows kept in memory per snapshot, from which the
//!   rolled-up sources are answered without planning a query;
//! - [`results`]: the sources' rows merged, sorted and paged into the [`Answer`].
//!
//! Dimensions come from one table, `beacon_warehouse::dimensions`. Anything unsupported is
//! refused with a 400 naming the field, never silently ignored (docs/METRICS-API.md).

pub mod dates;
pub mod execute;
pub mod logical;
pub mod plan;
pub mod request;
pub mod results;
pub mod slices;

pub use dates::parse_timezone;
pub use execute::{execute, json_rows, AnswerError, MerchantSessions, SLICE_BYTES};
pub use plan::{Plan, Source, SourceKind};
pub use request::{filter_limits, Dim, Filter, Include, Metric, QueryError, QueryRequest};
pub use results::Answer;

#[cfg(test)]
mod tests;
