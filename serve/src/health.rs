//! `/healthz` and `/readyz` that mean something.
//!
//! - **Liveness** (`/healthz`): the process answers HTTP on the runtime that does its work.
//!   A wedged runtime fails it; a dependency that is down does not, because restarting this
//!   process would not bring the dependency back.
//! - **Readiness** (`/readyz`): every named check of this role passed on its last run (the
//!   edge: JetStream stores an event; the metrics API: the warehouse's tables load; a whole
//!   `beacon up`: each of its roles and child processes). 200 when all pass, 503 otherwise,
//!   with a JSON body that names each check, whether it passes, since when, and why not.
//!
//! Checks are pushed ([`Health::set`]) by the code that learns the state (a supervisor that
//! sees its child exit, an ingest loop that commits) or pulled by a [`Health::probe`] loop.
//! A check registered but never run counts as failing: "not checked yet" is not ready.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The named checks of one role (cheap to clone; clones share the checks).
#[derive(Clone, Default)]
pub struct Health {
    checks: Arc<Mutex<BTreeMap<&'static str, State>>>,
    /// Other roles' checks reported with these (a whole `beacon up` on its admin port).
    parts: Arc<Mutex<Vec<Health>>>,
}

#[derive(Debug, Clone)]
struct State {
    ok: bool,
    detail: String,
    since: Instant,
    /// How often the check went from passing to failing (restarts, outages).
    failures: u64,
}

/// One check as `/readyz` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    /// For how long the check has been in its current state.
    pub for_secs: f64,
    pub failures: u64,
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check that fails until it first runs.
    pub fn register(&self, name: &'static str) {
        self.lock().entry(name).or_insert_with(|| State {
            ok: false,
            detail: "not checked yet".into(),
            since: Instant::now(),
            failures: 0,
        });
    }

    /// Records a check's outcome; a change of state is logged (failing: warn, passing
    /// again: info) so the log tells when and why a role stopped being ready.
    pub fn set(&self, name: &'static str, result: Result<(), String>) {
        metrics::gauge!("beacon_ready", "check" => name).set(if result.is_ok() {
            1.0
        } else {
            0.0
        });
        let mut checks = self.lock();
        let now = Instant::now();
        let (ok, detail) = match result {
            Ok(()) => (true, String::new()),
            Err(e) => (false, e),
        };
        match checks.get_mut(name) {
            Some(s) if s.ok == ok => s.detail = detail,
            Some(s) => {
                if ok {
                    tracing::info!(check = name, after = ?now - s.since, "ready again");
                } else {
                    s.failures += 1;
                    tracing::warn!(check = name, reason = %detail, "not ready");
                }
                *s = State {
                    ok,
                    detail,
                    since: now,
                    failures: s.failures,
                };
            }
            None => {
                if !ok {
                    tracing::warn!(check = name, reason = %detail, "not ready");
                }
                checks.insert(
                    name,
                    State {
                        ok,
                        detail,
                        since: now,
                        failures: u64::from(!ok),
                    },
                );
            }
        }
    }

    /// Reports `part`'s checks with this one's (it must not include this one).
    pub fn include(&self, part: Health) {
        self.parts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(part);
    }

    /// This role's checks and its parts', by name.
    pub fn checks(&self) -> Vec<Check> {
        let now = Instant::now();
        let mut checks: Vec<Check> = self
            .lock()
            .iter()
            .map(|(name, s)| Check {
                name,
                ok: s.ok,
                detail: s.detail.clone(),
                for_secs: (now - s.since).as_secs_f64(),
                failures: s.failures,
            })
            .collect();
        let parts = self.parts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for part in parts {
            checks.extend(part.checks());
        }
        checks.sort_by_key(|c| c.name);
        checks
    }

    pub fn ready(&self) -> bool {
        self.checks().iter().all(|c| c.ok)
    }

    /// Runs `check` every `every` (each run bounded by `timeout`) and records the outcome,
    /// until the returned task is aborted or the runtime stops.
    pub fn probe<F, Fut>(
        &self,
        name: &'static str,
        every: Duration,
        timeout: Duration,
        mut check: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send,
    {
        self.register(name);
        let health = self.clone();
        tokio::spawn(async move {
            loop {
                let outcome = match tokio::time::timeout(timeout, check()).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                };
                health.set(name, outcome);
                tokio::time::sleep(every).await;
            }
        })
    }

    /// `GET /healthz` and `GET /readyz`, unauthenticated (load balancers and orchestrators
    /// call them), for any router state.
    pub fn router<S: Clone + Send + Sync + 'static>(&self) -> Router<S> {
        let health = self.clone();
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(move || std::future::ready(health.readyz())))
    }

    fn readyz(&self) -> Response {
        let checks = self.checks();
        let ready = checks.iter().all(|c| c.ok);
        let body = serde_json::json!({
            "ready": ready,
            "checks": checks.iter().map(|c| (c.name.to_string(), serde_json::json!({
                "ok": c.ok,
                "for_s": (c.for_secs * 10.0).round() / 10.0,
                "failures": c.failures,
                "detail": c.detail,
            }))).collect::<serde_json::Map<_, _>>(),
        });
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, State>> {
        // A panic while holding this lock cannot leave the map inconsistent (each update is
        // one assignment), so a poisoned lock is still good to read.
        self.checks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_but_unchecked_is_not_ready_and_failures_are_counted() {
        let h = Health::new();
        assert!(h.ready(), "no checks: nothing to wait for");
        h.register("bus");
        assert!(!h.ready());
        h.set("bus", Ok(()));
        assert!(h.ready());
        h.set("bus", Err("no responders".into()));
        h.set("bus", Err("still no responders".into()));
        let c = &h.checks()[0];
        assert_eq!((c.ok, c.failures), (false, 1));
        assert_eq!(c.detail, "still no responders");
        h.set("bus", Ok(()));
        h.set("bus", Err("again".into()));
        h.set("bus", Ok(()));
        assert!(h.ready());
        assert_eq!(h.checks()[0].failures, 2);

        let node = Health::new();
        node.register("nats-server");
        node.include(h.clone());
        assert_eq!(
            node.checks().iter().map(|c| c.name).collect::<Vec<_>>(),
            ["bus", "nats-server"]
        );
        assert!(!node.ready());
        node.set("nats-server", Ok(()));
        assert!(node.ready());
        h.set("bus", Err("down".into()));
        assert!(!node.ready(), "a part failing makes the whole not ready");
    }

    #[tokio::test]
    async fn a_probe_that_hangs_fails_by_its_timeout() {
        let h = Health::new();
        let task = h.probe(
            "slow",
            Duration::from_millis(10),
            Duration::from_millis(20),
            std::future::pending::<Result<(), String>>,
        );
        // Waits on the check's state (bounded), not on a guess of the probe's timing.
        tokio::time::timeout(Duration::from_secs(10), async {
            while h.checks()[0].detail == "not checked yet" {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the probe reported within 10 s");
        task.abort();
        let c = &h.checks()[0];
        assert!(!c.ok && c.detail.contains("no answer within"), "{c:?}");
    }
}
