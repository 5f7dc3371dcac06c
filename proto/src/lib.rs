//! Beacon's shared vocabulary: the canonical event every collector produces, the batch
//! envelope the edge publishes to JetStream, the names on the bus, and the RSocket-over-QUIC
//! framing spoken between SDKs and edges.
//!
//! This crate is deliberately small and free of I/O so that every other crate can depend on it.

pub mod bus;
pub mod envelope;
pub mod event;
pub mod packed;
#[cfg(feature = "nats")]
pub mod stores;
pub mod wire;

pub use envelope::{
    CanaryPart, Envelope, Failure, FailureStage, Outcome, PipelineRef, PluginRef, RawLineage, Share,
};
pub use event::{BatchRequest, BatchResponse, Event, Limits, ValidationError};
