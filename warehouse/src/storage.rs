//! A table's files where they are stored, for the one thing Iceberg's FileIO cannot do: list
//! them (maintenance's sweep of files nothing references). A local directory is walked with
//! `std::fs`; a bucket on S3-compatible storage is listed through OpenDAL (the library the
//! tables' FileIO already uses), configured from the same FileIO settings (`s3.endpoint`,
//! region, keys, path style), so the sweep sees the bucket as the writers do.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use futures::TryStreamExt;

use crate::WarehouseError;

/// One stored file: its key (see [`Files::key`]), when it was last written (`None`: the
/// store did not say) and its size.
pub(crate) struct Stored {
    pub key: String,
    pub modified: Option<SystemTime>,
    pub bytes: u64,
}

/// Where a table's files are.
pub(crate) enum Files {
    Local,
    Bucket {
        op: opendal::Operator,
        bucket: String,
    },
}

const S3_SCHEMES: [&str; 3] = ["s3://", "s3a://", "s3n://"];

impl Files {
    /// The store of a table at `location` (its root), with the warehouse's FileIO `props`;
    /// `None` for a scheme Beacon does not write to.
    pub fn of(
        location: &str,
        props: &HashMap<String, String>,
    ) -> Result<Option<Self>, WarehouseError> {
        if local_path(location).is_some() {
            return Ok(Some(Files::Local));
        }
        let Some(rest) = S3_SCHEMES.iter().find_map(|s| location.strip_prefix(s)) else {
            return Ok(None);
        };
        let bucket = rest.split('/').next().unwrap_or_default().to_string();
        let mut cfg = opendal::services::S3Config::default();
        cfg.bucket = bucket.clone();
        cfg.endpoint = props.get("s3.endpoint").cloned();
        cfg.region = props
            .get("client.region")
            .or_else(|| props.get("s3.region"))
            .cloned();
        cfg.access_key_id = props.get("s3.access-key-id").cloned();
        cfg.secret_access_key = props.get("s3.secret-access-key").cloned();
        cfg.session_token = props.get("s3.session-token").cloned();
        // As Iceberg's FileIO reads it: virtual-hosted unless path style is asked for.
        cfg.enable_virtual_host_style = !props
            .get("s3.path-style-access")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "t" | "1" | "on"));
        let op = opendal::Operator::from_config(cfg)
            .map_err(|e| object_store(location, e))?
            .finish();
        Ok(Some(Files::Bucket { op, bucket }))
    }

    /// How `location` (as table metadata names a file) is keyed in this store: a local
    /// path, or an object's key in the bucket. `None`: not in this store.
    pub fn key(&self, location: &str) -> Option<String> {
        match self {
            Files::Local => local_path(location).map(|p| p.display().to_string()),
            Files::Bucket { bucket, .. } => S3_SCHEMES
                .iter()
                .find_map(|s| location.strip_prefix(s))
                .and_then(|rest| rest.strip_prefix(bucket.as_str()))
                .and_then(|rest| rest.strip_prefix('/'))
                .map(str::to_string),
        }
    }

    /// Every file under `root` (a table's location).
    pub async fn list(&self, root: &str) -> Result<Vec<Stored>, WarehouseError> {
        let Some(root_key) = self.key(root) else {
            return Ok(Vec::new());
        };
        match self {
            Files::Local => Ok(walk(Path::new(&root_key))),
            Files::Bucket { op, .. } => {
                let prefix = format!("{}/", root_key.trim_end_matches('/'));
                let entries: Vec<opendal::Entry> = op
                    .lister_with(&prefix)
                    .recursive(true)
                    .await
                    .map_err(|e| object_store(root, e))?
                    .try_collect()
                    .await
                    .map_err(|e| object_store(root, e))?;
                Ok(entries
                    .into_iter()
                    .filter(|e| e.metadata().is_file())
                    .map(|e| Stored {
                        key: e.path().trim_start_matches('/').to_string(),
                        modified: e.metadata().last_modified().map(SystemTime::from),
                        bytes: e.metadata().content_length(),
                    })
                    .collect())
            }
        }
    }

    /// Deletes the file at `key`.
    pub async fn delete(&self, key: &str) -> Result<(), WarehouseError> {
        match self {
            Files::Local => std::fs::remove_file(key).map_err(|source| WarehouseError::Io {
                path: PathBuf::from(key),
                source,
            }),
            Files::Bucket { op, bucket } => op
                .delete(key)
                .await
                .map_err(|e| object_store(&format!("s3://{bucket}/{key}"), e)),
        }
    }
}

fn object_store(location: &str, e: opendal::Error) -> WarehouseError {
    WarehouseError::ObjectStore {
        location: location.to_string(),
        source: Box::new(e),
    }
}

/// The files under `root`, recursively (unreadable directories and entries are skipped:
/// what cannot be seen is not deleted).
fn walk(root: &Path) -> Vec<Stored> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                found.push(Stored {
                    key: entry.path().display().to_string(),
                    modified: meta.modified().ok(),
                    bytes: meta.len(),
                });
            }
        }
    }
    found
}

/// The local path of a `file://` (or bare absolute) location; `None` for object storage.
pub(crate) fn local_path(location: &str) -> Option<PathBuf> {
    let path = location
        .strip_prefix("file://")
        .or_else(|| location.strip_prefix("file:"))
        .unwrap_or(location);
    path.starts_with('/').then(|| Path::new(path).to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_paths_or_objects_of_the_bucket() {
        assert_eq!(
            Files::Local.key("file:///w/a/data/x.parquet").as_deref(),
            Some("/w/a/data/x.parquet")
        );
        assert_eq!(Files::Local.key("s3://b/x"), None);
        let props = HashMap::from([
            ("s3.endpoint".to_string(), "http://127.0.0.1:1".to_string()),
            ("s3.path-style-access".to_string(), "true".to_string()),
            ("s3.region".to_string(), "us-east-1".to_string()),
        ]);
        let bucket = Files::of("s3://beacon/warehouse/analytics/events", &props)
            .expect("config")
            .expect("a bucket");
        assert_eq!(
            bucket
                .key("s3://beacon/warehouse/analytics/events/data/x.parquet")
                .as_deref(),
            Some("warehouse/analytics/events/data/x.parquet")
        );
        assert_eq!(bucket.key("s3a://beacon/w/x").as_deref(), Some("w/x"));
        // Another bucket, or a bucket whose name merely starts the same, is not this one.
        assert_eq!(bucket.key("s3://other/w/x"), None);
        assert_eq!(bucket.key("s3://beacon2/w/x"), None);
        assert!(Files::of("gs://b/w", &props).expect("no error").is_none());
    }
}
