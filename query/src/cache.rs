//! Answers of metrics queries, kept until the data under them changes.
//!
//! A dashboard refreshed by many viewers asks the same few queries again and again, and
//! between two rollup commits the answer cannot change. An answer is keyed by everything it
//! depends on: the merchant and the validated query with its dates resolved in the
//! merchant's time zone (the [`Plan`]), how its sources read, and the snapshot id of every
//! table those sources read ([`Source::tables`]). A commit to one of those tables changes
//! the key, so a cached answer is never older than what an uncached query would read; it
//! is simply not asked for again and ages out.
//!
//! Concurrent requests for the same key share one computation (single flight): the first
//! computes, the others wait for its answer. Failures are not kept.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::metrics::{Answer, Plan, Source};

/// How much the cache may hold.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// Bytes of answers (as JSON) kept; least useful first out beyond it. 0 disables.
    pub max_bytes: u64,
    /// How long an answer is kept at most, even if nothing it read has changed.
    pub ttl: Duration,
    /// Bytes of merchants' rollup rows kept in memory to answer from (0: none; see
    /// `metrics::slices`).
    pub slice_bytes: u64,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            ttl: Duration::from_secs(600),
            slice_bytes: crate::metrics::SLICE_BYTES,
        }
    }
}

/// Whether an answer was computed for this request or came from the cache (computed for
/// an earlier request, or by a concurrent one this request waited for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    Computed,
    Cached,
}

impl Served {
    pub fn as_str(self) -> &'static str {
        match self {
            Served::Computed => "miss",
            Served::Cached => "hit",
        }
    }
}

type Key = [u8; 32];

pub struct ResultCache {
    answers: Option<moka::future::Cache<Key, Arc<Answer>>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl ResultCache {
    pub fn new(limits: CacheLimits) -> Self {
        let answers = (limits.max_bytes > 0).then(|| {
            moka::future::Cache::builder()
                .max_capacity(limits.max_bytes)
                .weigher(|_: &Key, v: &Arc<Answer>| u32::try_from(weight(v)).unwrap_or(u32::MAX))
                .time_to_live(limits.ttl)
                .build()
        });
        Self {
            answers,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The answer of `plan` (answered by `sources`, which read tables at `snapshots`): from
    /// the cache, or from `compute`, which then fills it.
    pub async fn get_or_compute<E, F>(
        &self,
        plan: &Plan,
        sources: &[Source],
        snapshots: &[Option<i64>],
        compute: F,
    ) -> Result<(Arc<Answer>, Served), Arc<E>>
    where
        E: Send + Sync + 'static,
        F: std::future::Future<Output = Result<Answer, E>>,
    {
        let Some(answers) = &self.answers else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return Ok((Arc::new(compute.await.map_err(Arc::new)?), Served::Computed));
        };
        let entry = answers
            .entry(key(plan, sources, snapshots))
            .or_try_insert_with(async { compute.await.map(Arc::new) })
            .await?;
        let served = if entry.is_fresh() {
            self.misses.fetch_add(1, Ordering::Relaxed);
            Served::Computed
        } else {
            self.hits.fetch_add(1, Ordering::Relaxed);
            Served::Cached
        };
        Ok((entry.into_value(), served))
    }

    /// (hits, misses) since start.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

/// What an answer costs to keep: about its size as JSON.
fn weight(answer: &Answer) -> usize {
    fn size(v: &Value) -> usize {
        match v {
            Value::Null | Value::Bool(_) => 8,
            Value::Number(_) => 16,
            Value::String(s) => 24 + s.len(),
            Value::Array(a) => 24 + a.iter().map(size).sum::<usize>(),
            Value::Object(o) => 48 + o.iter().map(|(k, v)| 24 + k.len() + size(v)).sum::<usize>(),
        }
    }
    64 + answer.results.iter().map(size).sum::<usize>()
        + answer
            .meta
            .iter()
            .map(|(k, v)| 24 + k.len() + size(v))
            .sum::<usize>()
}

/// Everything an answer depends on, hashed. The plan's debug form is complete (merchant,
/// metrics, resolved instants, zone, dimensions, filter tree, order, page, include); the
/// sources say which tables answer it and how.
fn key(plan: &Plan, sources: &[Source], snapshots: &[Option<i64>]) -> Key {
    let mut h = Sha256::new();
    h.update(b"beacon-answer-v2\0");
    h.update(format!("{plan:?}").as_bytes());
    for s in sources {
        h.update(b"\0source\0");
        h.update(format!("{:?}", s.kind).as_bytes());
        for t in s.tables {
            h.update(b"\0");
            h.update(t.as_bytes());
        }
    }
    for s in snapshots {
        h.update(b"\0snapshot\0");
        h.update(s.map_or_else(|| "none".to_string(), |id| id.to_string()));
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::QueryRequest;
    use serde_json::json;

    fn answer(results: Vec<Value>) -> Answer {
        Answer {
            results,
            meta: Default::default(),
        }
    }

    fn plan(merchant: &str, range: Value) -> Plan {
        let req: QueryRequest = serde_json::from_value(json!({
            "site_id": merchant, "metrics": ["visitors"], "date_range": range,
        }))
        .expect("request");
        let now = chrono::DateTime::parse_from_rfc3339("2026-03-10T12:00:00Z")
            .expect("now")
            .with_timezone(&chrono::Utc);
        req.plan(merchant, chrono_tz::Tz::UTC, now).expect("plan")
    }

    #[tokio::test]
    async fn answers_are_kept_per_merchant_query_and_snapshot() {
        let cache = ResultCache::new(CacheLimits::default());
        let computed = AtomicU64::new(0);
        let ask = |p: Plan, snapshot: i64| {
            let cache = &cache;
            let computed = &computed;
            async move {
                let sources = p.sources();
                cache
                    .get_or_compute::<std::convert::Infallible, _>(
                        &p,
                        &sources,
                        &[Some(snapshot)],
                        async move {
                            let n = computed.fetch_add(1, Ordering::SeqCst);
                            Ok(answer(vec![json!({"n": n})]))
                        },
                    )
                    .await
                    .expect("answer")
            }
        };
        let (first, served) = ask(plan("a", json!("7d")), 1).await;
        assert_eq!(served, Served::Computed);
        let (again, served) = ask(plan("a", json!("7d")), 1).await;
        assert_eq!((served, &again), (Served::Cached, &first));
        // Another merchant, another range, a new snapshot: computed anew.
        for (p, snap) in [
            (plan("b", json!("7d")), 1),
            (plan("a", json!("30d")), 1),
            (plan("a", json!("7d")), 2),
        ] {
            let (answer, served) = ask(p, snap).await;
            assert_eq!(served, Served::Computed);
            assert_ne!(answer, first);
        }
        assert_eq!(computed.load(Ordering::SeqCst), 4);
        assert_eq!(cache.counts(), (1, 4));
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_computation_and_failures_are_not_kept() {
        let cache = Arc::new(ResultCache::new(CacheLimits::default()));
        let computed = Arc::new(AtomicU64::new(0));
        let (release, gate) = tokio::sync::watch::channel(false);
        let mut waiting = Vec::new();
        for _ in 0..16 {
            let (cache, computed, mut gate) = (cache.clone(), computed.clone(), gate.clone());
            waiting.push(tokio::spawn(async move {
                let p = plan("a", json!("day"));
                let sources = p.sources();
                cache
                    .get_or_compute::<String, _>(&p, &sources, &[Some(7)], async move {
                        computed.fetch_add(1, Ordering::SeqCst);
                        let _ = gate.wait_for(|open| *open).await;
                        Ok(answer(vec![json!({"visitors": 3})]))
                    })
                    .await
                    .map(|(a, _)| a)
            }));
        }
        let _ = release.send(true);
        for w in waiting {
            let answer = w.await.expect("task").expect("answer");
            assert_eq!(answer.results, vec![json!({"visitors": 3})]);
        }
        assert_eq!(computed.load(Ordering::SeqCst), 1);

        let p = plan("a", json!("month"));
        let sources = p.sources();
        let failed = cache
            .get_or_compute::<String, _>(&p, &sources, &[None], async { Err("busy".into()) })
            .await;
        assert_eq!(failed.err().as_deref().map(String::as_str), Some("busy"));
        let (_, served) = cache
            .get_or_compute::<String, _>(&p, &sources, &[None], async { Ok(answer(vec![])) })
            .await
            .expect("answer");
        assert_eq!(served, Served::Computed);
    }
}
