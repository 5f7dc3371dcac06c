//! Read tokens: one merchant's metrics, nothing else. Stored like write keys, as sha256
//! hashes in the merchants bucket (`r.<hash>` -> merchant id), so a leaked bucket does not
//! leak tokens. A read token is never a write key and never an admin token.

use async_nats::jetstream::kv;
use sha2::{Digest, Sha256};

pub fn token_key(token: &str) -> String {
    format!("r.{}", hex::encode(Sha256::digest(token.as_bytes())))
}

/// Creates a read token for `merchant_id` (which must exist) and returns it.
pub async fn create(store: &kv::Store, merchant_id: &str) -> Result<String, async_nats::Error> {
    if store.get(format!("m.{merchant_id}")).await?.is_none() {
        return Err(format!("merchant {merchant_id} not found").into());
    }
    let token = format!("br_{}", hex::encode(rand_bytes()));
    store
        .put(token_key(&token), merchant_id.as_bytes().to_vec().into())
        .await?;
    Ok(token)
}

/// The merchant a read token belongs to, if any.
pub async fn merchant_for(
    store: &kv::Store,
    token: &str,
) -> Result<Option<String>, async_nats::Error> {
    Ok(store
        .get(token_key(token))
        .await?
        .map(|v| String::from_utf8_lossy(&v).into_owned()))
}

fn rand_bytes() -> [u8; 24] {
    use rand::Rng;
    // ThreadRng: a CSPRNG seeded from the OS.
    rand::rng().random()
}
