//! `<data-dir>/endpoints.json`: where a running `beacon up` (or role) can be reached, for
//! scripts, tests and the other subcommands.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Endpoints {
    pub nats_url: String,
    /// RSocket over QUIC, `ip:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_quic: Option<String>,
    /// HTTP collectors, `http://ip:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_http: Option<String>,
    /// The edge's certificate (self-signed in development): trust it to connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_ca_cert: Option<PathBuf>,
    pub data_dir: PathBuf,
    /// Empty for a role without a warehouse (an edge on its own).
    #[serde(default)]
    pub catalog_uri: String,
    #[serde(default)]
    pub warehouse: String,
    /// Admin HTTP API base URL, `http://ip:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_http: Option<String>,
    /// Metrics API base URL (`POST /api/v2/query`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_http: Option<String>,
    /// SQL over the Postgres wire protocol, `postgresql://127.0.0.1:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql_pg: Option<String>,
    pub pid: u32,
}

pub const FILE_NAME: &str = "endpoints.json";

impl Endpoints {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(FILE_NAME)
    }

    pub fn read(data_dir: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(Self::path(data_dir)).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "{}: {e} (is `beacon up --data-dir {}` running?)",
                    Self::path(data_dir).display(),
                    data_dir.display()
                ),
            )
        })?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }

    /// Written atomically (temp file + rename): readers never see half a file.
    pub fn write(&self, data_dir: &Path) -> std::io::Result<()> {
        let tmp = data_dir.join(format!("{FILE_NAME}.tmp"));
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, Self::path(data_dir))
    }

    pub fn remove(data_dir: &Path) {
        let _ = std::fs::remove_file(Self::path(data_dir));
    }
}
