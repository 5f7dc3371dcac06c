//! Every key-value bucket and object store Beacon keeps on the bus, with its settings, in
//! one table: every role opens them through [`open_kv`] and [`open_objects`], so no two
//! roles create one differently, and an operator can create them all replicated on a hub
//! beforehand ([`provision`], `beacon topology provision`). A role opens what exists,
//! whatever its replicas, and creates (with one replica) only what is missing.

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store};

use crate::bus;

/// The day's salts for cookieless visitor ids (the edges share them).
pub const SALTS_BUCKET: &str = "beacon_salts";
/// How long an edge's status lives without a refresh: an edge that stops refreshing is
/// considered dead.
pub const EDGE_STATUS_TTL: Duration = Duration::from_secs(15);

/// The settings of the bucket `name`, if it is one of Beacon's.
pub fn kv_config(name: &str) -> Option<kv::Config> {
    let (history, max_age) = match name {
        bus::MERCHANTS_BUCKET => (8, Duration::ZERO),
        bus::PIPELINES_BUCKET => (bus::PIPELINES_HISTORY, Duration::ZERO),
        bus::PIPELINE_VERSIONS_BUCKET | bus::PLUGIN_INFO_BUCKET => (1, Duration::ZERO),
        bus::EDGES_BUCKET => (1, EDGE_STATUS_TTL),
        SALTS_BUCKET => (1, Duration::from_secs(2 * 86_400)),
        bus::JOBS_BUCKET => (8, Duration::ZERO),
        bus::INGEST_LEASES_BUCKET => (1, INGEST_LEASE_TTL),
        _ => return None,
    };
    Some(kv::Config {
        bucket: name.into(),
        history,
        max_age,
        ..Default::default()
    })
}

/// How long an ingest process's partition lease lives without a renewal: the longest a dead
/// process's partitions wait for a new owner.
pub const INGEST_LEASE_TTL: Duration = Duration::from_secs(6);

/// Every bucket of [`kv_config`].
pub const KV_BUCKETS: [&str; 8] = [
    bus::INGEST_LEASES_BUCKET,
    bus::MERCHANTS_BUCKET,
    bus::PIPELINES_BUCKET,
    bus::PIPELINE_VERSIONS_BUCKET,
    bus::PLUGIN_INFO_BUCKET,
    bus::EDGES_BUCKET,
    SALTS_BUCKET,
    bus::JOBS_BUCKET,
];

/// Every object store.
pub const OBJECT_STORES: [&str; 1] = [bus::PLUGINS_OBJECT_STORE];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} is not one of Beacon's buckets")]
    Unknown(String),
    #[error("bucket {bucket}: {reason}")]
    Nats { bucket: String, reason: String },
}

fn nats(bucket: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Nats {
        bucket: bucket.into(),
        reason: e.to_string(),
    }
}

/// Opens Beacon's bucket `name`, creating it with its settings if it does not exist yet.
pub async fn open_kv(js: &jetstream::Context, name: &str) -> Result<kv::Store, StoreError> {
    let config = kv_config(name).ok_or_else(|| StoreError::Unknown(name.into()))?;
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    js.create_key_value(config).await.map_err(|e| nats(name, e))
}

/// Opens Beacon's object store `name`, creating it if it does not exist yet.
pub async fn open_objects(
    js: &jetstream::Context,
    name: &str,
) -> Result<object_store::ObjectStore, StoreError> {
    if !OBJECT_STORES.contains(&name) {
        return Err(StoreError::Unknown(name.into()));
    }
    if let Ok(store) = js.get_object_store(name).await {
        return Ok(store);
    }
    js.create_object_store(object_store::Config {
        bucket: name.into(),
        ..Default::default()
    })
    .await
    .map_err(|e| nats(name, e))
}

/// Creates every bucket and object store with `replicas` (a hub: 3), or raises the replicas
/// of those that exist already (roles that started first created them with one). Returns
/// the names changed.
pub async fn provision(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<Vec<String>, StoreError> {
    let replicas = replicas.max(1);
    let mut changed = Vec::new();
    for name in KV_BUCKETS {
        let config = kv::Config {
            num_replicas: replicas,
            ..kv_config(name).ok_or_else(|| StoreError::Unknown(name.into()))?
        };
        match js.get_stream(format!("KV_{name}")).await {
            Ok(mut stream) => {
                let info = stream.info().await.map_err(|e| nats(name, e))?;
                if info.config.num_replicas != replicas {
                    js.update_key_value(config)
                        .await
                        .map_err(|e| nats(name, e))?;
                    changed.push(name.to_string());
                }
            }
            Err(_) => {
                js.create_key_value(config)
                    .await
                    .map_err(|e| nats(name, e))?;
                changed.push(name.to_string());
            }
        }
    }
    for name in OBJECT_STORES {
        let stream_name = format!("OBJ_{name}");
        match js.get_stream(&stream_name).await {
            Ok(mut stream) => {
                let info = stream.info().await.map_err(|e| nats(name, e))?;
                if info.config.num_replicas != replicas {
                    let mut config = info.config.clone();
                    config.num_replicas = replicas;
                    js.update_stream(config).await.map_err(|e| nats(name, e))?;
                    changed.push(name.to_string());
                }
            }
            Err(_) => {
                js.create_object_store(object_store::Config {
                    bucket: name.into(),
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| nats(name, e))?;
                changed.push(name.to_string());
            }
        }
    }
    Ok(changed)
}

/// The names of every consumer of ingest's stream partition `partition`: the current
/// owner's, and for a moment after a takeover (or longer, if the bus could not delete it)
/// a predecessor's.
pub async fn ingest_consumer_names(
    stream: &jetstream::stream::Stream,
    partition: bus::Partition,
) -> Result<Vec<String>, String> {
    use futures::TryStreamExt;
    let names: Vec<String> = stream
        .consumer_names()
        .try_collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(names
        .into_iter()
        .filter(|n| partition.owns_consumer(n))
        .collect())
}

/// Each partition's current ingest consumer (its newest generation), by partition index:
/// what ingest has still to commit. Only the newest is asked for its state: a predecessor's
/// left on an unhealthy server must not make the current one unreadable.
pub async fn current_ingest_consumers(
    stream: &jetstream::stream::Stream,
) -> Result<std::collections::BTreeMap<u32, jetstream::consumer::Info>, String> {
    use futures::TryStreamExt;
    let names: Vec<String> = stream
        .consumer_names()
        .try_collect()
        .await
        .map_err(|e| e.to_string())?;
    let mut newest: std::collections::BTreeMap<u32, (u64, String)> = Default::default();
    for name in names {
        if let Some((index, generation)) = bus::parse_ingest_consumer(&name) {
            if newest.get(&index).is_none_or(|(g, _)| generation > *g) {
                newest.insert(index, (generation, name));
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    for (index, (_, name)) in newest {
        let info = stream
            .consumer_info(&name)
            .await
            .map_err(|e| format!("consumer {name}: {e}"))?;
        out.insert(index, info);
    }
    Ok(out)
}
