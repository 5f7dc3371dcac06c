//! The edge's view of the merchant registry: write-key hash -> merchant id, fed by a watch
//! on the JetStream KV bucket so new merchants and revoked keys apply without a restart.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_nats::jetstream::kv;
use beacon_proto::bus::Merchant;
use futures::StreamExt;
use sha2::{Digest, Sha256};

/// KV key of a merchant record.
pub fn merchant_key(id: &str) -> String {
    format!("m.{id}")
}

/// KV key mapping a write-key hash to its merchant id.
pub fn write_key_key(hash: &str) -> String {
    format!("k.{hash}")
}

pub fn hash_write_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[derive(Clone)]
pub struct Registry {
    store: kv::Store,
    by_key_hash: Arc<RwLock<HashMap<String, String>>>,
}

impl Registry {
    /// Loads every write key and keeps following changes in a background task.
    pub async fn start(store: kv::Store) -> Result<Self, async_nats::Error> {
        let by_key_hash: Arc<RwLock<HashMap<String, String>>> = Arc::default();
        let mut watch = store.watch_with_history("k.>").await?;
        let map = by_key_hash.clone();
        tokio::spawn(async move {
            while let Some(entry) = watch.next().await {
                let Ok(entry) = entry else { continue };
                let Some(hash) = entry.key.strip_prefix("k.") else {
                    continue;
                };
                let Ok(mut m) = map.write() else { return };
                match entry.operation {
                    kv::Operation::Put => {
                        m.insert(
                            hash.to_string(),
                            String::from_utf8_lossy(&entry.value).into_owned(),
                        );
                    }
                    kv::Operation::Delete | kv::Operation::Purge => {
                        m.remove(hash);
                    }
                }
            }
        });
        Ok(Self { store, by_key_hash })
    }

    /// The merchant a write key belongs to. A miss asks the bucket directly, so a merchant
    /// created a moment ago is not refused while the watch catches up.
    pub async fn merchant_for_key(&self, write_key: &str) -> Option<String> {
        let hash = hash_write_key(write_key);
        if let Some(id) = self.by_key_hash.read().ok()?.get(&hash) {
            return Some(id.clone());
        }
        let value = self.store.get(write_key_key(&hash)).await.ok()??;
        let id = String::from_utf8_lossy(&value).into_owned();
        if let Ok(mut m) = self.by_key_hash.write() {
            m.insert(hash, id.clone());
        }
        Some(id)
    }
}

/// Opens (creating if needed) the merchant registry bucket.
pub async fn open_bucket(
    js: &async_nats::jetstream::Context,
) -> Result<kv::Store, async_nats::Error> {
    Ok(js
        .create_key_value(kv::Config {
            bucket: beacon_proto::bus::MERCHANTS_BUCKET.into(),
            history: 8,
            ..Default::default()
        })
        .await?)
}

/// Registers a merchant and its write key (used by `beacon merchant create`).
pub async fn create_merchant(
    store: &kv::Store,
    merchant: &Merchant,
) -> Result<(), async_nats::Error> {
    let json = serde_json::to_vec(merchant)?;
    store
        .create(merchant_key(&merchant.id), json.into())
        .await?;
    store
        .put(
            write_key_key(&merchant.write_key_sha256),
            merchant.id.clone().into_bytes().into(),
        )
        .await?;
    Ok(())
}
