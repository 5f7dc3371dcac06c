//! Where the warehouse is: in the data directory (the embedded default), or shared by many
//! machines (the catalog in PostgreSQL, the table files on S3-compatible object storage).
//!
//! Set once per process from global flags (`--catalog-uri`, `--warehouse-uri`, the `s3`
//! settings) and read by every role that opens the warehouse, so each role's data directory
//! keeps only what is local to it (locks, the NATS store, endpoints) while the tables are
//! wherever the flags say.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use beacon_warehouse::{Location, Warehouse, WarehouseError};

/// The global flags that choose a shared warehouse. Without them, each data directory has its
/// own SQLite catalog and local table files.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct StoreArgs {
    /// The Iceberg catalog database shared by every role: `postgres://user@host:port/db`, the
    /// password from `PGPASSWORD` or `~/.pgpass` (the SQLite catalog in the data directory
    /// when unset).
    #[arg(long, global = true, env = "BEACON_CATALOG_URI", value_name = "URI")]
    pub catalog_uri: Option<String>,
    /// Where the table files go: `s3://bucket/prefix` (or a path every machine mounts).
    /// Needs --catalog-uri.
    #[arg(long, global = true, env = "BEACON_WAREHOUSE_URI", value_name = "URI")]
    pub warehouse_uri: Option<String>,
    /// The S3 endpoint for an S3-compatible store (`http://host:port`); AWS when unset.
    #[arg(long, global = true, env = "BEACON_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,
    #[arg(long, global = true, env = "BEACON_S3_REGION", value_name = "REGION")]
    pub s3_region: Option<String>,
    /// Virtual-hosted bucket addressing (`bucket.host`) instead of path style (`host/bucket`),
    /// which S3-compatible servers expect.
    #[arg(long, global = true, env = "BEACON_S3_VIRTUAL_HOSTED")]
    pub s3_virtual_hosted: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("--warehouse-uri {0} needs --catalog-uri (a catalog every machine reaches)")]
    WarehouseWithoutCatalog(String),
    #[error("--catalog-uri needs --warehouse-uri: tables in a shared catalog cannot live in one machine's data directory")]
    CatalogWithoutWarehouse,
    #[error(transparent)]
    Warehouse(#[from] WarehouseError),
}

static STORE: OnceLock<StoreArgs> = OnceLock::new();

impl StoreArgs {
    /// Makes these the process's warehouse settings (the first call wins).
    pub fn install(self) {
        let _ = STORE.set(self);
    }

    /// The warehouse location for a role running on `data_dir`.
    pub fn location(&self, data_dir: &Path) -> Result<Location, StoreError> {
        match (&self.catalog_uri, &self.warehouse_uri) {
            (None, None) => Ok(Location::local(data_dir)),
            (None, Some(w)) => Err(StoreError::WarehouseWithoutCatalog(w.clone())),
            (Some(_), None) => Err(StoreError::CatalogWithoutWarehouse),
            (Some(catalog), Some(warehouse)) => {
                Ok(Location::shared(catalog, warehouse, self.file_io_props())?)
            }
        }
    }

    /// FileIO settings under PyIceberg's names. Credentials come from the standard AWS
    /// variables, so they never appear on a command line.
    fn file_io_props(&self) -> HashMap<String, String> {
        let mut props = HashMap::new();
        if let Some(endpoint) = &self.s3_endpoint {
            props.insert("s3.endpoint".into(), endpoint.clone());
        }
        let region = self
            .s3_region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .unwrap_or_else(|| "us-east-1".into());
        props.insert("s3.region".into(), region);
        props.insert(
            "s3.path-style-access".into(),
            (!self.s3_virtual_hosted).to_string(),
        );
        for (var, prop) in [
            ("AWS_ACCESS_KEY_ID", "s3.access-key-id"),
            ("AWS_SECRET_ACCESS_KEY", "s3.secret-access-key"),
            ("AWS_SESSION_TOKEN", "s3.session-token"),
        ] {
            if let Ok(value) = std::env::var(var) {
                props.insert(prop.into(), value);
            }
        }
        props
    }
}

fn installed() -> StoreArgs {
    STORE.get().cloned().unwrap_or_default()
}

/// The warehouse location this process uses for `data_dir`.
pub fn location(data_dir: &Path) -> Result<Location, StoreError> {
    installed().location(data_dir)
}

/// Opens (creating if needed) the warehouse this process uses for `data_dir`.
pub async fn open(data_dir: &Path) -> Result<Warehouse, StoreError> {
    Ok(Warehouse::open_at(location(data_dir)?).await?)
}

/// Opens the warehouse this process uses for `data_dir`; refuses to create one.
pub async fn open_existing(data_dir: &Path) -> Result<Warehouse, StoreError> {
    Ok(Warehouse::open_existing_at(location(data_dir)?).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_a_shared_warehouse_is_refused() {
        let dir = Path::new("/tmp/x");
        let only_files = StoreArgs {
            warehouse_uri: Some("s3://b/p".into()),
            ..Default::default()
        };
        assert!(matches!(
            only_files.location(dir),
            Err(StoreError::WarehouseWithoutCatalog(_))
        ));
        let only_catalog = StoreArgs {
            catalog_uri: Some("postgres://u@h/db".into()),
            ..Default::default()
        };
        assert!(matches!(
            only_catalog.location(dir),
            Err(StoreError::CatalogWithoutWarehouse)
        ));
        assert!(StoreArgs::default().location(dir).unwrap().is_local());
    }

    #[test]
    fn a_shared_warehouse_names_itself_for_pyiceberg() {
        let args = StoreArgs {
            catalog_uri: Some("postgresql://u:p@127.0.0.1:5432/beacon".into()),
            warehouse_uri: Some("s3://bucket/wh/".into()),
            s3_endpoint: Some("http://127.0.0.1:9000".into()),
            ..Default::default()
        };
        let loc = args.location(Path::new("/tmp/x")).unwrap();
        assert!(!loc.is_local() && loc.on_object_storage());
        assert_eq!(
            loc.pyiceberg_catalog_uri(),
            "postgresql+psycopg://u@127.0.0.1:5432/beacon"
        );
        assert_eq!(loc.warehouse_uri(), "s3://bucket/wh");
        assert_eq!(loc.props()["s3.path-style-access"], "true");
        assert_eq!(loc.props()["s3.endpoint"], "http://127.0.0.1:9000");
    }
}
