//! Who a read token belongs to and which time zone a merchant reports in, answered from
//! memory: every metrics request needs both, and two NATS KV round trips per request cost
//! more than a cached answer.
//!
//! Both come from the merchants bucket, which a watch follows: a new, changed or deleted
//! token or merchant record drops the cached entry as soon as the bucket's change arrives
//! (milliseconds), so a revoked token stops working and a changed time zone applies at
//! once. While the watch is down (a NATS restart), entries expire after [`FALLBACK_TTL`].

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono_tz::Tz;
use futures::StreamExt;

use crate::tokens::token_key;

/// How long an entry lives if the watch missed its change.
pub const FALLBACK_TTL: Duration = Duration::from_secs(30);
/// Entries per cache: unknown tokens are remembered too (a client retrying a wrong token
/// costs no round trip), so this bounds what a stream of made-up tokens can occupy.
const CAPACITY: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("merchants bucket: {0}")]
    Bucket(String),
    #[error("merchant time zone: {0}")]
    BadZone(String),
}

pub struct Directory {
    store: kv::Store,
    /// Token key (`r.<sha256>`) -> merchant id, or none.
    tokens: moka::future::Cache<String, Option<Arc<str>>>,
    /// Merchant id -> its report time zone name (none: UTC).
    zones: moka::future::Cache<String, Option<Arc<str>>>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for Directory {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl Directory {
    /// Starts following the bucket (before anything is cached, so no change is missed).
    pub async fn start(store: kv::Store) -> Result<Arc<Self>, LookupError> {
        let cache = || {
            moka::future::Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(FALLBACK_TTL)
                .build()
        };
        let (tokens, zones) = (cache(), cache());
        let watch = store
            .watch_all()
            .await
            .map_err(|e| LookupError::Bucket(e.to_string()))?;
        let watcher = tokio::spawn(follow(store.clone(), watch, tokens.clone(), zones.clone()));
        Ok(Arc::new(Self {
            store,
            tokens,
            zones,
            watcher,
        }))
    }

    /// The merchant `token` reads for, if it is a read token.
    pub async fn merchant_for(&self, token: &str) -> Result<Option<Arc<str>>, Arc<LookupError>> {
        self.merchant_for_key(token_key(token)).await
    }

    /// The merchant of the read token stored under `key` (`r.<sha256>`), if it still exists:
    /// a dashboard session keeps only the key, so revoking the token ends its sessions.
    pub async fn merchant_for_key(
        &self,
        key: String,
    ) -> Result<Option<Arc<str>>, Arc<LookupError>> {
        let store = &self.store;
        self.tokens
            .try_get_with(key.clone(), async move {
                let v = store
                    .get(key)
                    .await
                    .map_err(|e| LookupError::Bucket(e.to_string()))?;
                Ok(v.map(|v| Arc::from(String::from_utf8_lossy(&v).as_ref())))
            })
            .await
    }

    /// The merchant's display name (not cached: the dashboard asks once per page load).
    pub async fn name(&self, merchant: &str) -> Result<Option<String>, LookupError> {
        let record = self
            .store
            .get(format!("m.{merchant}"))
            .await
            .map_err(|e| LookupError::Bucket(e.to_string()))?;
        Ok(record
            .and_then(|v| serde_json::from_slice::<beacon_proto::bus::Merchant>(&v).ok())
            .map(|m| m.name))
    }

    /// The merchant's report time zone (UTC unless set); an unparsable stored zone is an
    /// error, not UTC.
    pub async fn timezone(&self, merchant: &str) -> Result<Tz, Arc<LookupError>> {
        let store = &self.store;
        let name = self
            .zones
            .try_get_with(merchant.to_string(), async move {
                let record = store
                    .get(format!("m.{merchant}"))
                    .await
                    .map_err(|e| LookupError::Bucket(e.to_string()))?;
                Ok(record
                    .and_then(|v| serde_json::from_slice::<beacon_proto::bus::Merchant>(&v).ok())
                    .and_then(|m| m.timezone)
                    .map(Arc::from))
            })
            .await?;
        crate::metrics::parse_timezone(name.as_deref())
            .map_err(|e| Arc::new(LookupError::BadZone(e)))
    }
}

type Cache = moka::future::Cache<String, Option<Arc<str>>>;

/// Drops cached entries as their keys change; when the watch ends, drops everything and
/// watches again.
async fn follow(store: kv::Store, mut watch: kv::Watch, tokens: Cache, zones: Cache) {
    let mut backoff = Duration::from_millis(100);
    loop {
        while let Some(entry) = watch.next().await {
            let Ok(entry) = entry else { break };
            backoff = Duration::from_millis(100);
            if entry.key.starts_with("r.") {
                tokens.invalidate(&entry.key).await;
            } else if let Some(merchant) = entry.key.strip_prefix("m.") {
                zones.invalidate(merchant).await;
            }
        }
        // Changes may have been missed while the watch was down.
        tokens.invalidate_all();
        zones.invalidate_all();
        loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            match store.watch_all().await {
                Ok(w) => {
                    watch = w;
                    tokens.invalidate_all();
                    zones.invalidate_all();
                    break;
                }
                Err(e) => tracing::warn!(error = %e, "merchants bucket watch: retrying"),
            }
        }
    }
}
