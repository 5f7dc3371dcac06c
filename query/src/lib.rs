//! Beacon's metrics API: what a merchant's dashboard asks, answered from the warehouse.
//!
//! - [`query`]: the request, in the shape of Plausible's Stats API v2 (`POST /api/v2/query`),
//!   validated field by field, and its translation to SQL over the rollups (counts and
//!   unique visitors) and the `sessions` view (visits, bounce rate, duration).
//! - [`tokens`]: per-merchant read tokens (stored hashed in the merchants KV bucket).
//! - [`api`]: the HTTP server.

pub mod api;
pub mod pg;
pub mod query;
pub mod tokens;
