//! The `beacon` binary's building blocks, public so end-to-end tests can drive them:
//! the private nats-server launcher, the endpoints file, and demo traffic.

pub mod config;
pub mod demo;
pub mod endpoints;
pub mod lock;
pub mod nats;
pub mod traffic;
