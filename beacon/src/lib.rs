//! The `beacon` binary's building blocks, public so end-to-end tests can drive them:
//! the private nats-server launcher, the endpoints file, demo traffic, progress display,
//! copying a data directory (backup, restore, relocate), and the NATS topology's generated
//! configurations.

#[cfg(feature = "full")]
pub mod backup;
pub mod config;
pub mod demo;
pub mod endpoints;
pub mod lock;
pub mod nats;
pub mod progress;
pub mod secrets;
#[cfg(feature = "full")]
pub mod store;
pub mod topology;
pub mod traffic;
