//! The edge's view of the merchant registry, fed by a watch on the JetStream KV bucket so
//! new merchants, new tracker identities, changed limits and revoked keys apply without a
//! restart.
//!
//! Keys of the bucket:
//! - `m.<id>`: the `Merchant` record (trackers, limits, time zone);
//! - `k.<sha256(write key)>`: merchant id of a write key;
//! - `s.<sha256(server key)>`: merchant id of a server key (trusted with `$` properties,
//!   see [`crate::reserved`]). A prefix of its own, so an edge that predates server keys
//!   never mistakes one for a write key during a rolling upgrade;
//! - `t.<sha256(claim)>`: merchant id owning a tracker identity (`TrackerId::claim`). Claims
//!   are created with `create`, so two merchants can never own the same app id or domain.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_nats::jetstream::kv;
use beacon_proto::bus::{Merchant, MerchantLimits, TrackerId, Trackers};
use futures::StreamExt;
use sha2::{Digest, Sha256};

pub use crate::reserved::Trust;

/// KV key of a merchant record.
pub fn merchant_key(id: &str) -> String {
    format!("m.{id}")
}

/// KV key mapping a write-key hash to its merchant id.
pub fn write_key_key(hash: &str) -> String {
    format!("k.{hash}")
}

/// KV key mapping a server-key hash to its merchant id.
pub fn server_key_key(hash: &str) -> String {
    format!("s.{hash}")
}

/// KV key of a tracker identity's claim.
pub fn claim_key(id: &TrackerId) -> String {
    format!("t.{}", hash_write_key(&id.claim()))
}

pub fn hash_write_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0} already belongs to merchant {1}")]
    Claimed(TrackerId, String),
    #[error("merchant {0} already exists")]
    Exists(String),
    #[error("registry: {0}")]
    Nats(String),
}

fn nats(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Nats(e.to_string())
}

/// What a tracker identity resolves to.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub merchant_id: Arc<str>,
    /// For GA4 streams: hashes of the accepted `api_secret`s.
    pub api_secrets_sha256: Vec<String>,
}

/// What a write or server key authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOwner {
    pub merchant_id: String,
    pub trust: Trust,
}

#[derive(Default)]
struct Index {
    by_key_hash: HashMap<String, (Arc<str>, Trust)>,
    by_tracker: HashMap<TrackerId, Resolved>,
    limits: HashMap<Arc<str>, MerchantLimits>,
    /// Tracker ids each merchant indexed, so an updated record drops the ones it lost.
    trackers_of: HashMap<Arc<str>, Vec<TrackerId>>,
}

impl Index {
    fn put_merchant(&mut self, m: &Merchant) {
        let id: Arc<str> = m.id.as_str().into();
        self.remove_merchant(&id);
        let mut ids = Vec::new();
        for t in m.trackers.ids() {
            let secrets = match &t {
                TrackerId::Ga4(mid) => m
                    .trackers
                    .ga4
                    .iter()
                    .filter(|s| &s.measurement_id == mid)
                    .flat_map(|s| s.api_secrets_sha256.iter().cloned())
                    .collect(),
                _ => Vec::new(),
            };
            self.by_tracker.insert(
                t.clone(),
                Resolved {
                    merchant_id: id.clone(),
                    api_secrets_sha256: secrets,
                },
            );
            ids.push(t);
        }
        self.trackers_of.insert(id.clone(), ids);
        match m.limits {
            Some(l) => self.limits.insert(id, l),
            None => self.limits.remove(&id),
        };
    }

    fn remove_merchant(&mut self, id: &str) {
        if let Some(ids) = self.trackers_of.remove(id) {
            for t in ids {
                if self
                    .by_tracker
                    .get(&t)
                    .is_some_and(|r| &*r.merchant_id == id)
                {
                    self.by_tracker.remove(&t);
                }
            }
        }
        self.limits.remove(id);
    }
}

#[derive(Clone)]
pub struct Registry {
    store: kv::Store,
    index: Arc<RwLock<Index>>,
    /// Keys recently looked up in the bucket and not found: a key or identity repeated
    /// while unknown costs a map lookup, not a bus round trip each (each new one still
    /// costs one lookup).
    misses: Arc<std::sync::Mutex<HashMap<String, std::time::Instant>>>,
}

/// How long a miss is remembered (a merchant created meanwhile waits at most this long,
/// unless the watch delivers it sooner).
const MISS_TTL: std::time::Duration = std::time::Duration::from_secs(1);

impl Registry {
    /// Loads every merchant and write key and keeps following changes in a background task.
    pub async fn start(store: kv::Store) -> Result<Self, async_nats::Error> {
        let index: Arc<RwLock<Index>> = Arc::default();
        let mut watch = store.watch_with_history(">").await?;
        let idx = index.clone();
        tokio::spawn(async move {
            while let Some(entry) = watch.next().await {
                let Ok(entry) = entry else { continue };
                let Ok(mut index) = idx.write() else { return };
                let put = entry.operation == kv::Operation::Put;
                let key = match entry.key.split_at_checked(2) {
                    Some(("k.", hash)) => Some((hash, Trust::Client)),
                    Some(("s.", hash)) => Some((hash, Trust::Server)),
                    _ => None,
                };
                if let Some((hash, trust)) = key {
                    if put {
                        let id = String::from_utf8_lossy(&entry.value);
                        index
                            .by_key_hash
                            .insert(hash.to_string(), (id.as_ref().into(), trust));
                    } else {
                        index.by_key_hash.remove(hash);
                    }
                } else if let Some(id) = entry.key.strip_prefix("m.") {
                    match serde_json::from_slice::<Merchant>(&entry.value) {
                        Ok(m) if put => index.put_merchant(&m),
                        Ok(_) => index.remove_merchant(id),
                        Err(_) if !put => index.remove_merchant(id),
                        Err(e) => {
                            tracing::warn!(merchant = id, error = %e, "unreadable merchant record")
                        }
                    }
                }
            }
        });
        Ok(Self {
            store,
            index,
            misses: Arc::default(),
        })
    }

    fn recently_missed(&self, key: &str) -> bool {
        let mut m = self.misses.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(key) {
            Some(at) if at.elapsed() < MISS_TTL => true,
            Some(_) => {
                m.remove(key);
                false
            }
            None => false,
        }
    }

    fn missed(&self, key: String) {
        let mut m = self.misses.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= 100_000 {
            m.retain(|_, at| at.elapsed() < MISS_TTL);
            if m.len() >= 100_000 {
                m.clear();
            }
        }
        m.insert(key, std::time::Instant::now());
    }

    /// The merchant a write or server key belongs to, and how far it is trusted. A miss
    /// asks the bucket directly, so a merchant created a moment ago is not refused while
    /// the watch catches up. `Err`: the bucket could not be asked (retry), unlike
    /// `Ok(None)` (no such key).
    pub async fn merchant_for_key(&self, key: &str) -> Result<Option<KeyOwner>, RegistryError> {
        let hash = hash_write_key(key);
        if let Some((id, trust)) = self
            .index
            .read()
            .ok()
            .and_then(|i| i.by_key_hash.get(&hash).cloned())
        {
            return Ok(Some(KeyOwner {
                merchant_id: id.to_string(),
                trust,
            }));
        }
        let miss = write_key_key(&hash);
        if self.recently_missed(&miss) {
            return Ok(None);
        }
        for (kv_key, trust) in [
            (write_key_key(&hash), Trust::Client),
            (server_key_key(&hash), Trust::Server),
        ] {
            if let Some(value) = self.store.get(&kv_key).await.map_err(nats)? {
                let id = String::from_utf8_lossy(&value).into_owned();
                if let Ok(mut m) = self.index.write() {
                    m.by_key_hash.insert(hash, (id.as_str().into(), trust));
                }
                return Ok(Some(KeyOwner {
                    merchant_id: id,
                    trust,
                }));
            }
        }
        self.missed(miss);
        Ok(None)
    }

    /// The merchant owning a tracker identity (same miss handling as write keys).
    pub async fn resolve(&self, id: &TrackerId) -> Result<Option<Resolved>, RegistryError> {
        if let Some(r) = self
            .index
            .read()
            .ok()
            .and_then(|i| i.by_tracker.get(id).cloned())
        {
            return Ok(Some(r));
        }
        let key = claim_key(id);
        if self.recently_missed(&key) {
            return Ok(None);
        }
        let Some(owner) = self.store.get(&key).await.map_err(nats)? else {
            self.missed(key);
            return Ok(None);
        };
        let owner = String::from_utf8_lossy(&owner).into_owned();
        let record = self.store.get(merchant_key(&owner)).await.map_err(nats)?;
        let merchant = record.and_then(|r| serde_json::from_slice::<Merchant>(&r).ok());
        let found = merchant.and_then(|m| {
            let mut index = self.index.write().ok()?;
            index.put_merchant(&m);
            index.by_tracker.get(id).cloned()
        });
        if found.is_none() {
            // A claim whose merchant does not list it (an interrupted update): unknown.
            self.missed(key);
        }
        Ok(found)
    }

    /// The merchant's own limits, if it has any.
    pub fn limits(&self, merchant_id: &str) -> Option<MerchantLimits> {
        self.index.read().ok()?.limits.get(merchant_id).copied()
    }
}

/// Opens (creating if needed) the merchant registry bucket.
pub async fn open_bucket(
    js: &async_nats::jetstream::Context,
) -> Result<kv::Store, async_nats::Error> {
    Ok(beacon_proto::stores::open_kv(js, beacon_proto::bus::MERCHANTS_BUCKET).await?)
}

/// Registers a merchant, its write key and its tracker identities (used by `beacon
/// merchant create`). Identities are claimed first: one already owned by another merchant
/// refuses the whole merchant, and the claims taken so far are released.
pub async fn create_merchant(store: &kv::Store, merchant: &Merchant) -> Result<(), RegistryError> {
    let mut claimed = Vec::new();
    for t in merchant.trackers.ids() {
        let key = claim_key(&t);
        if let Err(e) = store
            .create(&key, merchant.id.clone().into_bytes().into())
            .await
        {
            release(store, &claimed).await;
            return Err(match claim_owner(store, &key).await {
                Some(o) => RegistryError::Claimed(t, o),
                None => nats(e),
            });
        }
        claimed.push(key);
    }
    let json = serde_json::to_vec(merchant).map_err(nats)?;
    if let Err(e) = store.create(merchant_key(&merchant.id), json.into()).await {
        release(store, &claimed).await;
        return Err(if e.kind() == kv::CreateErrorKind::AlreadyExists {
            RegistryError::Exists(merchant.id.clone())
        } else {
            nats(e)
        });
    }
    store
        .put(
            write_key_key(&merchant.write_key_sha256),
            merchant.id.clone().into_bytes().into(),
        )
        .await
        .map_err(nats)?;
    if let Some(hash) = &merchant.server_key_sha256 {
        store
            .put(
                server_key_key(hash),
                merchant.id.clone().into_bytes().into(),
            )
            .await
            .map_err(nats)?;
    }
    Ok(())
}

/// A merchant's record and its revision (for a conditional update).
async fn read_merchant(
    store: &kv::Store,
    merchant_id: &str,
) -> Result<(Merchant, u64), RegistryError> {
    let entry = store
        .entry(merchant_key(merchant_id))
        .await
        .map_err(nats)?
        .filter(|e| e.operation == kv::Operation::Put)
        .ok_or_else(|| RegistryError::Nats(format!("no merchant {merchant_id}")))?;
    let m = serde_json::from_slice(&entry.value).map_err(nats)?;
    Ok((m, entry.revision))
}

/// Gives a merchant a new server key (`hash` of it), replacing the one it had: the new key
/// works before the record names it, and the old one stops once the record no longer does.
pub async fn set_server_key(
    store: &kv::Store,
    merchant_id: &str,
    hash: &str,
) -> Result<Merchant, RegistryError> {
    let (mut m, revision) = read_merchant(store, merchant_id).await?;
    let new_key = server_key_key(hash);
    store
        .put(&new_key, merchant_id.as_bytes().to_vec().into())
        .await
        .map_err(nats)?;
    let old = m.server_key_sha256.replace(hash.to_string());
    let json = serde_json::to_vec(&m).map_err(nats)?;
    if let Err(e) = store
        .update(merchant_key(merchant_id), json.into(), revision)
        .await
    {
        let _ = store.purge(&new_key).await;
        return Err(nats(format!(
            "merchant {merchant_id} changed meanwhile, retry: {e}"
        )));
    }
    if let Some(old) = old.filter(|o| o != hash) {
        store.purge(server_key_key(&old)).await.map_err(nats)?;
    }
    Ok(m)
}

/// Adds tracker identities to a merchant and, when `limits` is `Some`, replaces its limits
/// (`Some(None)`: back to the edge defaults). New identities are claimed first, as at
/// creation; the record is then written conditionally on the revision read, so concurrent
/// updates cannot overwrite each other. Edges apply it within a moment.
pub async fn update_merchant(
    store: &kv::Store,
    merchant_id: &str,
    add: &Trackers,
    limits: Option<Option<MerchantLimits>>,
) -> Result<Merchant, RegistryError> {
    let (mut m, revision) = read_merchant(store, merchant_id).await?;
    // Claims made here are released if anything after them fails, as in `create_merchant`.
    let mut claimed = Vec::new();
    for t in add.ids() {
        let key = claim_key(&t);
        if store
            .create(&key, merchant_id.as_bytes().to_vec().into())
            .await
            .is_ok()
        {
            claimed.push(key);
            continue;
        }
        let err = match claim_owner(store, &key).await {
            Some(o) if o == merchant_id => continue,
            Some(o) => RegistryError::Claimed(t, o),
            None => nats(format!("could not claim {t}")),
        };
        release(store, &claimed).await;
        return Err(err);
    }
    let tr = &mut m.trackers;
    for a in &add.snowplow_app_ids {
        if !tr.snowplow_app_ids.contains(a) {
            tr.snowplow_app_ids.push(a.clone());
        }
    }
    for d in &add.domains {
        if !tr.domains.contains(d) {
            tr.domains.push(d.clone());
        }
    }
    for g in &add.ga4 {
        match tr
            .ga4
            .iter_mut()
            .find(|s| s.measurement_id == g.measurement_id)
        {
            Some(s) => {
                for h in &g.api_secrets_sha256 {
                    if !s.api_secrets_sha256.contains(h) {
                        s.api_secrets_sha256.push(h.clone());
                    }
                }
            }
            None => tr.ga4.push(g.clone()),
        }
    }
    if let Some(l) = limits {
        m.limits = l;
    }
    let json = serde_json::to_vec(&m).map_err(nats)?;
    if let Err(e) = store
        .update(merchant_key(merchant_id), json.into(), revision)
        .await
    {
        release(store, &claimed).await;
        return Err(nats(format!(
            "merchant {merchant_id} changed meanwhile, retry: {e}"
        )));
    }
    Ok(m)
}

/// The merchant holding a claim, if it can be read.
async fn claim_owner(store: &kv::Store, key: &str) -> Option<String> {
    let v = store.get(key).await.ok()??;
    Some(String::from_utf8_lossy(&v).into_owned())
}

/// Gives up claims taken by a registration that then failed.
async fn release(store: &kv::Store, claims: &[String]) {
    for k in claims {
        let _ = store.purge(k).await;
    }
}
