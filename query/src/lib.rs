//! Beacon's metrics API and SQL endpoint: what a merchant's dashboard and analysts ask,
//! answered from the warehouse, on a runtime of their own and under per-query budgets.
//!
//! - [`metrics`]: a query in the shape of Plausible's Stats API v2 (`POST /api/v2/query`),
//!   from request to answer: validated field by field (with complexity limits), planned onto
//!   the rollups, `events`, the `sessions` view and the revenue rollups, built as DataFusion
//!   plans (no SQL text) in the merchant's session, and merged into results.
//! - [`tokens`]: per-merchant read tokens (stored hashed in the merchants KV bucket);
//!   [`directory`]: tokens and time zones answered from memory, following the bucket.
//! - [`cache`]: answers kept per (merchant, query, snapshots read), with single flight.
//! - [`api`]: the HTTP server; [`dashboard`]: the merchant's web page on it (read-token
//!   login, session cookie, embedded assets); [`annotations`]: pipeline changes and
//!   re-processing, the markers on its chart.
//! - [`pg`]: SQL over the Postgres wire protocol; [`pg_rows`]: what the wire needs of rows.
//! - [`sql_limits`]: limits on SQL text, checked before parsing.
//! - [`budget`]: what one query may cost (memory, time, slots), enforced in DataFusion.
//! - [`runtime`]: the query runtime, apart from collection.

pub mod annotations;
pub mod api;
pub mod budget;
pub mod cache;
pub mod dashboard;
pub mod directory;
pub mod metrics;
pub mod pg;
pub mod pg_rows;
pub mod runtime;
pub mod sql_limits;
pub mod tokens;
