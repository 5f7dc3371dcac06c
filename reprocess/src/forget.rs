//! Forgetting a person: their rows out of `raw_events`, `events` and `failed_events`, and
//! the rollup hours they counted in rebuilt.
//!
//! Each table's files that hold the person's rows are rewritten without them in one replace
//! commit (job `<job>/<table>`, so a re-run after a crash does not redo a table). The old
//! files stay readable through older snapshots until maintenance expires those snapshots and
//! deletes the files no snapshot references; only then is the data gone from disk. The audit
//! record keeps a sha256 of the id, never the id itself.

use std::collections::BTreeMap;
use std::sync::Mutex;

use arrow::array::{Array, BooleanArray};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use beacon_proto::Event;
use beacon_warehouse::replace::Outcome as CommitOutcome;
use beacon_warehouse::rewrite::{self, Prune, RowRewrite};
use beacon_warehouse::{TableKind, Warehouse};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::audit::{JobRecord, Jobs};
use crate::hours;
use crate::ReprocessError;

/// Whose rows to remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Person {
    User(String),
    Visitor(String),
}

impl Person {
    fn column(&self) -> &'static str {
        match self {
            Person::User(_) => "user_id",
            Person::Visitor(_) => "visitor_id",
        }
    }

    fn id(&self) -> &str {
        match self {
            Person::User(u) | Person::Visitor(u) => u,
        }
    }

    /// Whether a kept event (a `failed_events` payload) is this person's.
    fn owns(&self, e: &Event) -> bool {
        match self {
            Person::User(u) => e.user_id.as_deref() == Some(u),
            Person::Visitor(v) => e.visitor_id.as_deref() == Some(v),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ForgetRequest {
    pub merchant_id: String,
    pub person: Person,
    pub who: String,
    pub reason: String,
    pub dry_run: bool,
    /// The id for a new job (default: a fresh `fg-<uuid>`); a resumed job keeps its own.
    pub job_id: Option<String>,
}

/// What an operator asks to forget, named as the admin API's JSON body names it (the CLI's
/// flags are the same names).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForgetAsk {
    pub merchant: String,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub visitor: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub reason: String,
}

impl ForgetRequest {
    /// The validated request for `ask`, made by `who`.
    pub fn from_ask(ask: ForgetAsk, who: String) -> Result<Self, ReprocessError> {
        let person = match (ask.user, ask.visitor) {
            (Some(u), None) => Person::User(u),
            (None, Some(v)) => Person::Visitor(v),
            _ => {
                return Err(ReprocessError::Invalid(
                    "give exactly one of `user` and `visitor`".into(),
                ))
            }
        };
        let request = ForgetRequest {
            merchant_id: ask.merchant,
            person,
            who,
            reason: ask.reason,
            dry_run: ask.dry_run,
            job_id: None,
        };
        request.validate()?;
        Ok(request)
    }

    /// What every entry point (CLI, admin API) checks before anything runs.
    pub fn validate(&self) -> Result<(), ReprocessError> {
        crate::check_merchant(&self.merchant_id)?;
        if self.person.id().is_empty() {
            return Err(ReprocessError::Invalid("an empty id matches no one".into()));
        }
        if !self.dry_run && self.reason.trim().is_empty() {
            return Err(ReprocessError::Invalid(
                "forgetting needs a reason: it goes into the audit record".into(),
            ));
        }
        Ok(())
    }

    /// What identifies the job for resuming; the id only as a hash.
    pub fn scope_json(&self) -> serde_json::Value {
        serde_json::json!({
            "merchant": self.merchant_id,
            "person": self.person.column(),
            "sha256": hex::encode(Sha256::digest(self.person.id().as_bytes())),
        })
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ForgetReport {
    pub job_id: String,
    pub resumed: bool,
    pub dry_run: bool,
    /// Table -> rows removed (or, dry, that would be).
    pub rows: BTreeMap<String, u64>,
    /// Table -> files rewritten.
    pub files: BTreeMap<String, u64>,
    pub commits: BTreeMap<String, i64>,
    pub rollup_rows_rebuilt: u64,
    pub seconds: f64,
}

pub async fn forget(
    wh: &Warehouse,
    jobs: &Jobs,
    req: &ForgetRequest,
) -> Result<ForgetReport, ReprocessError> {
    let started = std::time::Instant::now();
    req.validate()?;
    let scope = req.scope_json();
    let resumed = if req.dry_run {
        None
    } else {
        jobs.unfinished("forget", &scope).await?
    };
    let job_id = match (&resumed, &req.job_id) {
        (Some(r), _) => r.id.clone(),
        (None, Some(id)) => id.clone(),
        (None, None) => format!("fg-{}", uuid::Uuid::now_v7()),
    };
    let mut report = ForgetReport {
        job_id: job_id.clone(),
        resumed: resumed.is_some(),
        dry_run: req.dry_run,
        ..Default::default()
    };
    let mut record = JobRecord::start(
        &job_id,
        "forget",
        &req.who,
        &req.reason,
        scope,
        resumed.as_ref(),
    );
    if !req.dry_run {
        jobs.put(&record).await?;
    }
    let result = run(wh, req, &job_id, &mut report, jobs, &mut record).await;
    report.seconds = started.elapsed().as_secs_f64();
    if req.dry_run {
        return result.map(|()| report);
    }
    let mut counts = report.rows.clone();
    counts.insert("rollup_rows_rebuilt".into(), report.rollup_rows_rebuilt);
    record.finish(&result, counts, report.commits.clone());
    jobs.put(&record).await?;
    result.map(|()| report)
}

async fn run(
    wh: &Warehouse,
    req: &ForgetRequest,
    job_id: &str,
    report: &mut ForgetReport,
    jobs: &Jobs,
    record: &mut JobRecord,
) -> Result<(), ReprocessError> {
    let merchant = req.merchant_id.as_str();
    let person = &req.person;
    let column = person.column();
    let by_column = |b: &RecordBatch| -> Result<BooleanArray, ArrowError> {
        let m = rewrite::str_column(b, "merchant_id")?;
        let p = rewrite::str_column(b, column)?;
        Ok(m.iter()
            .zip(p.iter())
            .map(|(m, p)| Some(m == Some(merchant) && p == Some(person.id())))
            .collect())
    };
    // A kept payload is the event's JSON (validation and plugin failures) or, for a batch
    // that did not decode, the raw text: matched by the id as a JSON string.
    let quoted = serde_json::to_string(person.id()).unwrap_or_default();
    let by_payload = |b: &RecordBatch| -> Result<BooleanArray, ArrowError> {
        let m = rewrite::str_column(b, "merchant_id")?;
        let payload = rewrite::str_column(b, "payload")?;
        Ok((0..b.num_rows())
            .map(|i| {
                if !m.is_valid(i) || m.value(i) != merchant || !payload.is_valid(i) {
                    return Some(false);
                }
                let text = payload.value(i);
                Some(match serde_json::from_str::<Event>(text) {
                    Ok(e) => person.owns(&e),
                    Err(_) => text.contains(&quoted),
                })
            })
            .collect())
    };
    let by_person = vec![
        Prune::string("merchant_id", merchant),
        Prune::string(column, person.id()),
    ];
    let steps: [(TableKind, rewrite::Mask, Vec<Prune>); 3] = [
        (TableKind::RawEvents, &by_column, by_person.clone()),
        (TableKind::Events, &by_column, by_person.clone()),
        (
            TableKind::FailedEvents,
            &by_payload,
            vec![Prune::string("merchant_id", merchant)],
        ),
    ];
    let step = |kind: TableKind| format!("{job_id}/{}", kind.name());
    if !req.dry_run {
        // The hours to rebuild, found (a read-only pass over `events`) and kept before
        // anything is removed: a resumed job cannot see the rows it already removed.
        let spans = Mutex::new(hours::Spans::new());
        let on_events = |b: &RecordBatch| {
            hours::widen_rows(&mut spans.lock().unwrap_or_else(|p| p.into_inner()), b)
        };
        rewrite::rewrite_current(
            wh,
            RowRewrite {
                prune: by_person,
                on_dropped: Some(&on_events),
                dry_run: true,
                ..RowRewrite::new(TableKind::Events, step(TableKind::Events), &by_column)
            },
        )
        .await?;
        for (m, (lo, hi)) in spans.into_inner().unwrap_or_else(|p| p.into_inner()) {
            hours::widen(&mut record.spans, &m, lo, hi);
        }
        jobs.put(record).await?;
    }
    for (kind, drop, prune) in steps {
        let r = rewrite::rewrite_current(
            wh,
            RowRewrite {
                prune,
                dry_run: req.dry_run,
                ..RowRewrite::new(kind, step(kind), drop)
            },
        )
        .await?;
        report.rows.insert(kind.name().into(), r.rows_dropped);
        report.files.insert(kind.name().into(), r.files_rewritten);
        if let Some(CommitOutcome::Committed { snapshot_id, .. }) = r.outcome {
            report.commits.insert(kind.name().into(), snapshot_id);
        }
    }
    if !req.dry_run {
        report.rollup_rows_rebuilt =
            hours::rebuild(wh, &record.spans, job_id, &mut report.commits).await?;
    }
    Ok(())
}
