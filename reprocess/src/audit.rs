//! The audit trail of history rewrites: one record per job in the KV bucket
//! [`JOBS_BUCKET`], written when the job starts (state `running`) and again when it ends
//! (`done` or `failed`). A `running` record whose job died is what a re-run resumes from.

use std::collections::BTreeMap;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use beacon_control::now_ms;

use crate::ReprocessError;

pub use beacon_proto::bus::JOBS_BUCKET;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Done,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    /// `reprocess` or `forget`.
    pub kind: String,
    pub state: JobState,
    pub who: String,
    pub reason: String,
    /// What the job covers, as given (merchants, range, person hash).
    pub scope: serde_json::Value,
    /// Per merchant, the pipeline version re-run (`null`: none, events stored unprocessed).
    #[serde(default)]
    pub versions: BTreeMap<String, Option<u64>>,
    /// The `raw_events` snapshot the job read.
    #[serde(default)]
    pub raw_snapshot: Option<i64>,
    /// The last stream sequence in scope: rows committed after it are not touched.
    #[serde(default)]
    pub watermark: u64,
    pub started_at: i64,
    #[serde(default)]
    pub finished_at: Option<i64>,
    #[serde(default)]
    pub counts: BTreeMap<String, u64>,
    /// Table -> the snapshot id of the job's commit.
    #[serde(default)]
    pub commits: BTreeMap<String, i64>,
    #[serde(default)]
    pub error: Option<String>,
    /// Per merchant, the times `[min, max]` (epoch ms) of the rows the job replaces or
    /// removes: the rollup hours to rebuild, kept so a resumed job still rebuilds them.
    #[serde(default)]
    pub spans: BTreeMap<String, (i64, i64)>,
}

impl JobRecord {
    /// A new `running` record, or the resumed one's start time kept.
    pub fn start(
        id: &str,
        kind: &str,
        who: &str,
        reason: &str,
        scope: serde_json::Value,
        resumed: Option<&JobRecord>,
    ) -> Self {
        Self {
            id: id.to_string(),
            kind: kind.to_string(),
            state: JobState::Running,
            who: who.to_string(),
            reason: reason.to_string(),
            scope,
            versions: BTreeMap::new(),
            raw_snapshot: None,
            watermark: 0,
            started_at: resumed.map_or_else(now_ms, |r| r.started_at),
            finished_at: None,
            counts: BTreeMap::new(),
            commits: BTreeMap::new(),
            error: None,
            spans: resumed.map(|r| r.spans.clone()).unwrap_or_default(),
        }
    }

    /// Ends the record: `done`, or left `running` with the error (the same command resumes).
    pub fn finish<E: std::fmt::Display>(
        &mut self,
        result: &Result<(), E>,
        counts: BTreeMap<String, u64>,
        commits: BTreeMap<String, i64>,
    ) {
        self.finished_at = Some(now_ms());
        self.counts = counts;
        self.commits = commits;
        match result {
            Ok(()) => self.state = JobState::Done,
            Err(e) => self.error = Some(e.to_string()),
        }
    }
}

/// The jobs bucket.
#[derive(Clone)]
pub struct Jobs {
    kv: kv::Store,
}

impl Jobs {
    pub async fn open(js: &jetstream::Context) -> Result<Self, ReprocessError> {
        let kv = beacon_proto::stores::open_kv(js, JOBS_BUCKET)
            .await
            .map_err(nats)?;
        Ok(Self { kv })
    }

    pub async fn put(&self, record: &JobRecord) -> Result<(), ReprocessError> {
        let value =
            serde_json::to_vec(record).map_err(|e| ReprocessError::Invalid(e.to_string()))?;
        self.kv.put(&record.id, value.into()).await.map_err(nats)?;
        Ok(())
    }

    pub async fn get(&self, id: &str) -> Result<Option<JobRecord>, ReprocessError> {
        match self.kv.get(id).await.map_err(nats)? {
            Some(v) => Ok(serde_json::from_slice(&v).ok()),
            None => Ok(None),
        }
    }

    /// Every job, oldest first.
    pub async fn list(&self) -> Result<Vec<JobRecord>, ReprocessError> {
        let mut keys = self.kv.keys().await.map_err(nats)?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(nats)?;
            if let Some(value) = self.kv.get(&key).await.map_err(nats)? {
                match serde_json::from_slice::<JobRecord>(&value) {
                    Ok(r) => out.push(r),
                    Err(e) => tracing::warn!(key, error = %e, "unreadable job record"),
                }
            }
        }
        out.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
        Ok(out)
    }

    /// The latest unfinished job of `kind` over exactly `scope` (a crashed run to resume).
    pub async fn unfinished(
        &self,
        kind: &str,
        scope: &serde_json::Value,
    ) -> Result<Option<JobRecord>, ReprocessError> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .rev()
            .find(|r| r.kind == kind && r.state == JobState::Running && &r.scope == scope))
    }
}

fn nats<E: std::fmt::Display>(e: E) -> ReprocessError {
    ReprocessError::Nats(e.to_string())
}
