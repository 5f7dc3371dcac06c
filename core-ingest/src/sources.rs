//! On a hub: how its events stream's sources (the regions' leaf streams) are doing, and
//! getting a stalled one going again.
//!
//! Why: after a region's link or leaf comes back, nats-server 2.15's source of the region's
//! stream can stay quiet for 35-50 s, once for minutes (docs/RELIABILITY.md): a retry the
//! stream's leader started while the region was unreachable waits 30 s for an answer that
//! never comes, then backs off 10 s per failure, and the reconnect's own retry is skipped
//! while that one is in flight. Nothing is lost, but freshness waits. A new leader sets
//! every source up afresh (no backoff) from the last message it stored of each (the
//! replicated source state, then the sourced messages' headers), so nothing is copied twice
//! or skipped: when a source has been quiet past [`STALLED`] (or, never heard by the
//! current leader, has been seen so by ingest for that long) while its region's JetStream
//! answers for the source's stream, ingest asks the stream's leader to step down (at most
//! once per [`STEP_DOWN_EVERY`], doubling while step-downs do not help). A stream of one
//! replica cannot step down; it waits.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use beacon_proto::bus;
use serde_json::Value;

/// A source quiet for this long is stalled: nats-server heartbeats a healthy one every
/// second, and retries a quiet one itself after 10 s.
pub const STALLED: Duration = Duration::from_secs(12);

/// At most one step-down per ingest process in this long.
pub const STEP_DOWN_EVERY: Duration = Duration::from_secs(30);

/// How long a region's JetStream has to answer.
const REGION_ANSWERS: Duration = Duration::from_secs(2);

/// What one ingest process remembers between looks.
#[derive(Debug, Default)]
pub struct Watch {
    /// The stream's leader at the last look: a new one has heard no source yet.
    leader: Option<String>,
    /// Since when (by our looks) each source (by its region's API prefix) has never been
    /// heard by the current leader.
    unheard_since: HashMap<String, Instant>,
    last_step_down: Option<Instant>,
    /// Step-downs since a look last found no source stalled: each doubles the wait before
    /// the next (a source that cannot start, say its region's stream is gone, is not
    /// helped by another leader every 30 s).
    in_a_row: u32,
}

impl Watch {
    /// How long after the last step-down the next may come.
    fn wait(&self) -> Duration {
        STEP_DOWN_EVERY * 2u32.pow(self.in_a_row.saturating_sub(1).min(4))
    }
}

/// One source of the hub's stream, as `STREAM.INFO` gives it.
struct Source {
    /// The region's stream.
    name: String,
    /// The region's JetStream API prefix (`$JS.<domain>.API`).
    api: Option<String>,
    /// Since the leader last heard from it; `None`: never (since it became leader).
    active: Option<Duration>,
    lag: u64,
}

fn sources(info: &Value) -> Vec<Source> {
    let Some(list) = info.get("sources").and_then(Value::as_array) else {
        return Vec::new();
    };
    list.iter()
        .map(|s| Source {
            name: s
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            api: s
                .pointer("/external/api")
                .and_then(Value::as_str)
                .map(str::to_string),
            // Nanoseconds; -1 when never heard.
            active: s
                .get("active")
                .and_then(Value::as_i64)
                .filter(|n| *n >= 0)
                .map(|n| Duration::from_nanos(n as u64)),
            lag: s.get("lag").and_then(Value::as_u64).unwrap_or(0),
        })
        .collect()
}

/// Whether the region's JetStream answers for its stream `name` through `api` (an error
/// reply, such as no such stream, is no answer: a new leader could not start that source).
async fn region_answers(js: &jetstream::Context, api: &str, name: &str) -> bool {
    let asked = tokio::time::timeout(
        REGION_ANSWERS,
        js.client()
            .request(format!("{api}.STREAM.INFO.{name}"), Default::default()),
    )
    .await;
    match asked {
        Ok(Ok(reply)) => serde_json::from_slice::<Value>(&reply.payload)
            .is_ok_and(|v| v.get("error").is_none() && v.get("config").is_some()),
        _ => false,
    }
}

/// Looks at the hub's sources once (nothing on a stream without sources): sets the
/// `beacon_ingest_sources_*` gauges, and steps the stream's leader down when a source is
/// stalled while its region answers. Whether it stepped down.
pub async fn look(js: &jetstream::Context, watch: &mut Watch) -> Result<bool, String> {
    let info: Value = js
        .request(format!("STREAM.INFO.{}", bus::EVENTS_STREAM), &())
        .await
        .map_err(|e| format!("the events stream's info: {e}"))?;
    if let Some(e) = info.get("error") {
        return Err(format!("the events stream's info: {e}"));
    }
    let sources = sources(&info);
    if sources.is_empty() {
        return Ok(false);
    }
    let now = Instant::now();
    let leader = info
        .pointer("/cluster/leader")
        .and_then(Value::as_str)
        .map(str::to_string);
    if leader != watch.leader {
        watch.leader = leader;
        watch.unheard_since.clear();
    }
    watch.unheard_since.retain(|api, _| {
        sources
            .iter()
            .any(|s| s.active.is_none() && s.api.as_deref() == Some(api))
    });
    let mut stalled = Vec::new();
    for source in &sources {
        let quiet = match (source.active, &source.api) {
            (Some(a), _) => a > STALLED,
            // Never heard by this leader: stalled once we have seen it so for as long.
            (None, Some(api)) => {
                let since = *watch.unheard_since.entry(api.clone()).or_insert(now);
                now.duration_since(since) > STALLED
            }
            (None, None) => false,
        };
        if let (true, Some(api)) = (quiet, &source.api) {
            stalled.push((api.clone(), source.name.clone()));
        }
    }
    metrics::gauge!("beacon_ingest_sources_inactive").set(stalled.len() as f64);
    metrics::gauge!("beacon_ingest_sources_lag")
        .set(sources.iter().map(|s| s.lag).sum::<u64>() as f64);
    if stalled.is_empty() {
        watch.in_a_row = 0;
        return Ok(false);
    }
    let replicas = info
        .pointer("/config/num_replicas")
        .and_then(Value::as_u64)
        .unwrap_or(1);
    if replicas < 2
        || watch
            .last_step_down
            .is_some_and(|t| t.elapsed() < watch.wait())
    {
        return Ok(false);
    }
    // Its region must answer: while a link is down a new leader would wait as the old one.
    let answers = futures::future::join_all(
        stalled
            .iter()
            .map(|(api, name)| region_answers(js, api, name)),
    )
    .await;
    let Some((api, _)) = stalled
        .iter()
        .zip(answers)
        .find_map(|(s, a)| a.then_some(s))
    else {
        return Ok(false);
    };
    watch.last_step_down = Some(now);
    watch.in_a_row += 1;
    let reply: Value = js
        .request(
            format!("STREAM.LEADER.STEPDOWN.{}", bus::EVENTS_STREAM),
            &(),
        )
        .await
        .map_err(|e| format!("stepping the events stream's leader down: {e}"))?;
    if let Some(e) = reply.get("error") {
        return Err(format!("stepping the events stream's leader down: {e}"));
    }
    metrics::counter!("beacon_ingest_source_restarts_total").increment(1);
    tracing::warn!(
        source = %api,
        "the hub's source of a region was stalled while the region answered: the events stream's leader stepped down, and the next sets its sources up again"
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_read_from_stream_info() {
        let info = serde_json::json!({
            "config": {"num_replicas": 3},
            "cluster": {"leader": "hub-1"},
            "sources": [
                {"name": "EVENTS", "external": {"api": "$JS.eu.API", "deliver": ""}, "lag": 4, "active": 2_000_000_000i64},
                {"name": "EVENTS", "external": {"api": "$JS.us.API"}, "lag": 0, "active": -1},
                {"name": "EVENTS", "lag": 0}
            ]
        });
        let s = sources(&info);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].api.as_deref(), Some("$JS.eu.API"));
        assert_eq!(s[0].name, "EVENTS");
        assert_eq!(s[0].active, Some(Duration::from_secs(2)));
        assert_eq!(s[0].lag, 4);
        assert_eq!(s[1].active, None);
        assert_eq!(s[2].api, None);
        assert!(sources(&serde_json::json!({})).is_empty());
    }
}
