//! What every Beacon server needs so that no client can take it down by holding sockets:
//!
//! - [`conn_limit`]: open connections per client address (and a total), released on drop;
//! - [`tcp`]: an accept loop that logs and backs off on errors (out of file descriptors,
//!   aborted handshakes) instead of ending the listener;
//! - [`http`]: HTTP/1.1 serving on those, with a header deadline, a body deadline, per-address
//!   and total connection caps, and graceful shutdown (used by the edge's collectors, the
//!   metrics API and the admin API);
//! - [`health`]: `/healthz` (the process answers) and `/readyz` (its named checks pass),
//!   with probes that run a check on an interval under a timeout;
//! - [`metrics`]: `GET /metrics` (Prometheus text) of the process-wide recorder;
//! - [`pages`]: what the web pages (the merchant dashboard, the operator page) share: token
//!   login to an `HttpOnly`, `SameSite=Strict` session cookie, security headers, assets;
//! - [`process`]: start-up hygiene: the file-descriptor soft limit raised to the hard limit,
//!   private file modes for everything the process writes, and tightening of an existing
//!   data directory.
//!
//! No Beacon types here: the crate sits below the edge, the query servers and the control
//! plane, and must stay free of NATS, DataFusion and Iceberg.

pub mod conn_limit;
pub mod health;
pub mod http;
pub mod metrics;
pub mod pages;
pub mod process;
pub mod tcp;

pub use conn_limit::{ClientAddr, ConnLimit, Slot};
pub use health::Health;
