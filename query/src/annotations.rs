//! What changed a merchant's numbers, for the markers on its dashboard chart: every change of
//! its pipeline (a new version, a canary started, promoted or stopped, a rollback) from the
//! pipelines bucket's history, and every re-processing of its history from the jobs bucket.
//!
//! Read-only, and only the asking merchant's entries: its pipeline key and the jobs whose
//! `versions` name it. Forget jobs are not shown (they are about one person, not the site).
//! Answers are kept a few seconds per merchant, so a tenant refreshing in a loop costs one
//! bucket read per interval.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use beacon_proto::bus::{Pipeline, JOBS_BUCKET, PIPELINES_BUCKET};
use futures::StreamExt;
use serde::Serialize;

/// How long one merchant's answer is reused.
const FRESH_FOR: Duration = Duration::from_secs(5);
/// Job records read at most (the most recently written), whatever the bucket holds.
const MAX_JOBS_SCANNED: usize = 10_000;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A new active version (first pipeline or a direct activation).
    Activated,
    /// A canary started beside the active version.
    CanaryStarted,
    /// The canary became the active version.
    Promoted,
    /// The canary was removed without promotion.
    CanaryStopped,
    /// Back to an earlier version.
    RolledBack,
    /// The pipeline was removed.
    Removed,
    /// History was re-processed with a stored pipeline version.
    Reprocessed,
}

#[derive(Debug, Clone, Serialize)]
pub struct Annotation {
    /// Epoch milliseconds.
    pub at: i64,
    pub kind: Kind,
    /// The version the change made active (or the canary's, or the one re-run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The canary's share of visitors, for `canary_started`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    /// Plugin names of that version, in order.
    pub plugins: Vec<String>,
    pub who: String,
    pub reason: String,
    /// For re-processing: the span of event time it rewrote, epoch ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span: Option<(i64, i64)>,
}

#[derive(Debug, thiserror::Error)]
#[error("annotations: {0}")]
pub struct AnnotationsError(String);

pub struct Annotations {
    js: jetstream::Context,
    answers: moka::future::Cache<String, Arc<Vec<Annotation>>>,
    /// The job records, read once per interval for all merchants (not once per merchant).
    jobs: moka::future::Cache<(), Arc<Vec<Vec<u8>>>>,
}

impl Annotations {
    pub fn new(js: jetstream::Context) -> Self {
        Self {
            js,
            answers: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(FRESH_FOR)
                .build(),
            jobs: moka::future::Cache::builder()
                .max_capacity(1)
                .time_to_live(FRESH_FOR)
                .build(),
        }
    }

    /// The merchant's annotations, oldest first.
    pub async fn of(&self, merchant: &str) -> Result<Arc<Vec<Annotation>>, Arc<AnnotationsError>> {
        self.answers
            .try_get_with(merchant.to_string(), async {
                let mut out = pipeline_changes(&self.js, merchant).await?;
                let jobs = self
                    .jobs
                    .try_get_with((), job_records(&self.js))
                    .await
                    .map_err(|e| AnnotationsError(e.to_string()))?;
                out.extend(jobs.iter().filter_map(|r| job_annotation(r, merchant)));
                out.sort_by_key(|a| a.at);
                Ok(Arc::new(out))
            })
            .await
    }
}

/// A bucket that does not exist yet has no entries.
async fn bucket(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<kv::Store>, AnnotationsError> {
    match js.get_key_value(name).await {
        Ok(s) => Ok(Some(s)),
        // The source (stream not found, JetStream code 10059) is only in the debug form.
        Err(e)
            if e.kind() == jetstream::context::KeyValueErrorKind::GetBucket
                && format!("{e:?}").contains("not found") =>
        {
            Ok(None)
        }
        Err(e) => Err(AnnotationsError(format!("{name}: {e}"))),
    }
}

async fn pipeline_changes(
    js: &jetstream::Context,
    merchant: &str,
) -> Result<Vec<Annotation>, AnnotationsError> {
    let Some(store) = bucket(js, PIPELINES_BUCKET).await? else {
        return Ok(Vec::new());
    };
    let mut entries = match store.history(merchant).await {
        Ok(h) => h,
        Err(e) if e.to_string().contains("not found") => return Ok(Vec::new()),
        Err(e) => return Err(AnnotationsError(e.to_string())),
    };
    let mut history: Vec<(Option<Pipeline>, i64)> = Vec::new();
    while let Some(entry) = entries.next().await {
        let entry = entry.map_err(|e| AnnotationsError(e.to_string()))?;
        let at = entry.created.unix_timestamp_nanos() / 1_000_000;
        let pipeline = match entry.operation {
            kv::Operation::Put => Pipeline::from_json(&entry.value).ok(),
            _ => None,
        };
        history.push((pipeline, at as i64));
    }
    Ok(changes(&history))
}

fn plugin_names(p: &beacon_proto::bus::PipelineDef) -> Vec<String> {
    p.plugins.iter().map(|r| r.name.clone()).collect()
}

/// Each step of a pipeline's history as what it did, comparing it with the step before.
fn changes(history: &[(Option<Pipeline>, i64)]) -> Vec<Annotation> {
    let mut out = Vec::new();
    let mut before: Option<&Pipeline> = None;
    // When the bucket's history is full, its oldest entry is only what ran then, not a
    // change we saw happen: it is the baseline, not an "activated".
    let full = history.len() as i64 >= beacon_proto::bus::PIPELINES_HISTORY;
    if full {
        before = history.first().and_then(|(p, _)| p.as_ref());
    }
    for (pipeline, written) in history.iter().skip(usize::from(full)) {
        let Some(p) = pipeline else {
            if before.is_some() {
                out.push(Annotation {
                    at: *written,
                    kind: Kind::Removed,
                    version: None,
                    percent: None,
                    plugins: Vec::new(),
                    who: String::new(),
                    reason: String::new(),
                    span: None,
                });
            }
            before = None;
            continue;
        };
        let at = if p.changed_at > 0 {
            p.changed_at
        } else {
            *written
        };
        let note =
            |kind: Kind, def: &beacon_proto::bus::PipelineDef, percent: Option<u8>| Annotation {
                at,
                kind,
                version: Some(def.version),
                percent,
                plugins: plugin_names(def),
                who: p.changed_by.clone(),
                reason: p.reason.clone(),
                span: None,
            };
        let prev_active = before.map(|b| b.active.version);
        let prev_canary = before.and_then(|b| b.canary.as_ref().map(|c| c.def.version));
        if prev_active != Some(p.active.version) {
            let kind = match (prev_active, prev_canary) {
                (_, Some(c)) if c == p.active.version => Kind::Promoted,
                // A version older than the newest ever defined came back: a rollback.
                (Some(_), _) if p.active.version < p.latest_version => Kind::RolledBack,
                _ => Kind::Activated,
            };
            // The canary it replaced, if it was not the one promoted.
            if let Some(c) = before.and_then(|b| b.canary.as_ref()) {
                if c.def.version != p.active.version && p.canary.is_none() {
                    out.push(note(Kind::CanaryStopped, &c.def, None));
                }
            }
            out.push(note(kind, &p.active, None));
        } else if prev_canary.is_some() && p.canary.is_none() {
            if let Some(c) = before.and_then(|b| b.canary.as_ref()) {
                out.push(note(Kind::CanaryStopped, &c.def, None));
            }
        }
        if let Some(c) = &p.canary {
            if prev_canary != Some(c.def.version) {
                out.push(note(Kind::CanaryStarted, &c.def, Some(c.percent)));
            }
        }
        before = Some(p);
    }
    out
}

/// The job audit records, the most recently written [`MAX_JOBS_SCANNED`] of them (keys come
/// oldest-written first).
async fn job_records(js: &jetstream::Context) -> Result<Arc<Vec<Vec<u8>>>, AnnotationsError> {
    let Some(store) = bucket(js, JOBS_BUCKET).await? else {
        return Ok(Arc::new(Vec::new()));
    };
    let err = |e: &dyn std::fmt::Display| AnnotationsError(e.to_string());
    let mut keys = store.keys().await.map_err(|e| err(&e))?;
    let mut all = std::collections::VecDeque::new();
    while let Some(key) = keys.next().await {
        all.push_back(key.map_err(|e| err(&e))?);
        if all.len() > MAX_JOBS_SCANNED {
            all.pop_front();
        }
    }
    let mut out = Vec::with_capacity(all.len());
    for key in all {
        if let Some(value) = store.get(&key).await.map_err(|e| err(&e))? {
            out.push(value.to_vec());
        }
    }
    Ok(Arc::new(out))
}

/// The annotation of one job record, if it is a re-processing that covered `merchant`.
/// Read loosely (only the fields shown), so the record can grow without breaking this.
fn job_annotation(record: &[u8], merchant: &str) -> Option<Annotation> {
    #[derive(serde::Deserialize)]
    struct Job {
        kind: String,
        state: String,
        #[serde(default)]
        who: String,
        #[serde(default)]
        reason: String,
        #[serde(default)]
        versions: std::collections::BTreeMap<String, Option<u64>>,
        started_at: i64,
        #[serde(default)]
        finished_at: Option<i64>,
        #[serde(default)]
        spans: std::collections::BTreeMap<String, (i64, i64)>,
    }
    let job: Job = serde_json::from_slice(record).ok()?;
    if job.kind != "reprocess" || job.state != "done" {
        return None;
    }
    let version = *job.versions.get(merchant)?;
    // A job over several merchants: its reason may name the others, so it is not shown.
    let own = job.versions.len() == 1;
    Some(Annotation {
        at: job.finished_at.unwrap_or(job.started_at),
        kind: Kind::Reprocessed,
        version,
        percent: None,
        plugins: Vec::new(),
        who: if own { job.who } else { String::new() },
        reason: if own { job.reason } else { String::new() },
        span: job.spans.get(merchant).copied(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use beacon_proto::bus::{Canary, OnFailure, PipelineDef};

    fn def(version: u64) -> PipelineDef {
        PipelineDef {
            merchant_id: "m".into(),
            version,
            plugins: vec![beacon_proto::PluginRef {
                name: format!("p{version}"),
                sha256: String::new(),
                config: String::new(),
            }],
            on_failure: OnFailure::default(),
            created_by: String::new(),
            created_at: 0,
        }
    }

    /// `latest`: the highest version defined so far (a high-water mark, as the bucket keeps it).
    fn pipeline(active: u64, canary: Option<(u64, u8)>, latest: u64, at: i64) -> Option<Pipeline> {
        Some(Pipeline {
            merchant_id: "m".into(),
            active: def(active),
            canary: canary.map(|(v, percent)| Canary {
                def: def(v),
                percent,
            }),
            latest_version: latest,
            changed_by: "ops".into(),
            reason: String::new(),
            changed_at: at,
        })
    }

    #[test]
    fn history_reads_as_what_each_change_did() {
        let history = vec![
            (pipeline(1, None, 1, 10), 0),
            (pipeline(1, Some((2, 10)), 2, 20), 0),
            (pipeline(2, None, 2, 30), 0),
            (pipeline(2, Some((3, 50)), 3, 40), 0),
            (pipeline(2, None, 3, 50), 0),
            (pipeline(1, None, 3, 60), 0),
            (None, 70),
            (pipeline(4, None, 4, 80), 0),
            (pipeline(4, Some((5, 10)), 5, 90), 0),
            // A direct activation while a canary ran: the canary stopped too.
            (pipeline(6, None, 6, 100), 0),
        ];
        let got: Vec<(i64, Kind, Option<u64>)> = changes(&history)
            .into_iter()
            .map(|a| (a.at, a.kind, a.version))
            .collect();
        assert_eq!(
            got,
            vec![
                (10, Kind::Activated, Some(1)),
                (20, Kind::CanaryStarted, Some(2)),
                (30, Kind::Promoted, Some(2)),
                (40, Kind::CanaryStarted, Some(3)),
                (50, Kind::CanaryStopped, Some(3)),
                (60, Kind::RolledBack, Some(1)),
                (70, Kind::Removed, None),
                (80, Kind::Activated, Some(4)),
                (90, Kind::CanaryStarted, Some(5)),
                (100, Kind::CanaryStopped, Some(5)),
                (100, Kind::Activated, Some(6)),
            ]
        );
    }

    #[test]
    fn only_finished_reprocessing_of_the_merchant_shows() {
        let job = |kind: &str, state: &str, merchant: &str| {
            serde_json::json!({
                "id": "j", "kind": kind, "state": state, "who": "ops", "reason": "bug 12",
                "scope": {}, "versions": {merchant: 3}, "started_at": 5, "finished_at": 9,
                "spans": {merchant: [1, 2]},
            })
            .to_string()
        };
        let a = job_annotation(job("reprocess", "done", "m").as_bytes(), "m").unwrap();
        assert_eq!(
            (a.at, a.kind, a.version, a.span),
            (9, Kind::Reprocessed, Some(3), Some((1, 2)))
        );
        assert!(job_annotation(job("reprocess", "done", "other").as_bytes(), "m").is_none());
        assert!(job_annotation(job("reprocess", "running", "m").as_bytes(), "m").is_none());
        assert!(job_annotation(job("forget", "done", "m").as_bytes(), "m").is_none());
        assert!(job_annotation(b"not json", "m").is_none());
    }
}
