//! One pipeline stage over one share of a batch: what the edge does when a batch arrives and
//! what re-processing does again later, in one place so both give the same result.

use beacon_proto::bus::OnFailure;
use beacon_proto::{Event, Failure, FailureStage, Limits, Outcome, PipelineRef};

use crate::{Chain, ChainFailure, PluginError};

/// Runs `events` through `chain` and validates the output like client input, with `now`
/// (the batch's receive time) as the clock the validation uses.
pub fn run_checked(
    chain: &Chain,
    events: &[Event],
    limits: &Limits,
    now: i64,
) -> Result<Vec<Event>, ChainFailure> {
    let out = chain.run(events)?;
    for (i, e) in out.iter().enumerate() {
        if let Err(v) = e.validate(limits, now) {
            return Err(ChainFailure {
                plugin: format!("pipeline v{}", chain.pipeline().version),
                error: PluginError::InvalidOutput(format!(
                    "output event {i} ({}): {v}",
                    e.event_id
                )),
            });
        }
    }
    Ok(out)
}

/// What a failed stage leaves: per the pipeline's policy, nothing for `events` (`hold`) or
/// the raw events unlabelled (`pass-through`); either way a `failed_events` row per event.
pub struct Failed {
    /// The pipeline to label the events with; `None` when they pass through unprocessed.
    pub pipeline: Option<PipelineRef>,
    pub events: Vec<Event>,
    pub failures: Vec<Failure>,
    pub outcome: Outcome,
}

pub fn failed(
    pipeline: &PipelineRef,
    on_failure: OnFailure,
    events: &[Event],
    plugin: Option<String>,
    reason: &str,
) -> Failed {
    let failures = events
        .iter()
        .map(|e| Failure {
            stage: FailureStage::Plugin,
            event_id: e.event_id.clone(),
            plugin: plugin.clone(),
            pipeline_version: Some(pipeline.version),
            reason: reason.to_string(),
            // The raw event is in the envelope's `raw`; ingest fills the payload in from
            // there, so a failing plugin does not double the envelope past max_payload.
            payload: String::new(),
        })
        .collect();
    match on_failure {
        OnFailure::Hold => Failed {
            pipeline: Some(pipeline.clone()),
            events: Vec::new(),
            failures,
            outcome: Outcome::Held,
        },
        OnFailure::PassThrough => Failed {
            pipeline: None,
            events: events.to_vec(),
            failures,
            outcome: Outcome::PassedThrough,
        },
    }
}
