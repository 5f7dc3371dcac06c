//! Configuration file: TOML whose keys are the `BEACON_*` environment variables, grouped.
//!
//! ```toml
//! data_dir = "/var/lib/beacon"
//! nats_url = "nats://127.0.0.1:4222"
//!
//! [edge]
//! listen = "0.0.0.0:4433"     # BEACON_EDGE_LISTEN
//! id = "edge-eu-1"            # BEACON_EDGE_ID
//!
//! [ingest]
//! max_wait_ms = 1000          # BEACON_INGEST_MAX_WAIT_MS
//! max_batch = 2000            # BEACON_INGEST_MAX_BATCH
//!
//! [rollup]
//! interval = 10               # BEACON_ROLLUP_INTERVAL
//! ```
//!
//! Precedence: command-line flag, then environment variable, then this file, then the
//! built-in default. The file is applied by filling in environment variables that are not
//! already set, before the command line is parsed, so every flag with an `env` name is
//! configurable and there is one source of truth for names.

use std::collections::BTreeMap;
use std::path::Path;

/// Every setting the file may hold, as environment variable names.
pub const KNOWN: &[&str] = &[
    "BEACON_DATA_DIR",
    "BEACON_NATS_URL",
    "BEACON_EDGE_LISTEN",
    "BEACON_EDGE_ID",
    "BEACON_HUB_DOMAIN",
    "BEACON_SOURCE_DOMAINS",
    "BEACON_STREAM_REPLICAS",
    "BEACON_INGEST_PARTITIONS",
    "BEACON_INGEST_ID",
    "BEACON_HTTP_LISTEN",
    "BEACON_REGION",
    "BEACON_GEOIP",
    "BEACON_TRUST_FORWARDED_FOR",
    "BEACON_MAX_CONNS_PER_IP",
    "BEACON_IN_FLIGHT_MEMORY_MB",
    "BEACON_INGEST_MAX_WAIT_MS",
    "BEACON_INGEST_MAX_BATCH",
    "BEACON_ROLLUP_INTERVAL",
    "BEACON_ADMIN_LISTEN",
    "BEACON_METRICS_LISTEN",
    "BEACON_API_LISTEN",
    "BEACON_SQL_LISTEN",
    "BEACON_ADMIN_TOKENS",
    "BEACON_PLUGIN_FUEL",
    "BEACON_PLUGIN_TIMEOUT_MS",
    "BEACON_PLUGIN_MEMORY_MB",
    "BEACON_PLUGIN_MAX_COMPONENT_KB",
    "BEACON_PLUGIN_MAX_OUTPUT_MB",
    "BEACON_QUERY_TIMEOUT_MS",
    "BEACON_QUERY_MEMORY_MB",
    "BEACON_QUERY_MEMORY_TOTAL_MB",
    "BEACON_QUERY_CONCURRENT_PER_MERCHANT",
    "BEACON_QUERY_CONCURRENT_TOTAL",
    "BEACON_QUERY_THREADS",
    "BEACON_SQL_MAX_BYTES",
    "BEACON_SQL_MAX_CONNS_PER_IP",
    "BEACON_SQL_MAX_CONNS",
    "BEACON_MAINTAIN_INTERVAL",
    "BEACON_SNAPSHOT_RETAIN_SECS",
    "BEACON_SNAPSHOT_RETAIN_LAST",
    "BEACON_ORPHAN_AGE_SECS",
    "BEACON_COMPACT_BIN_MB",
    "BEACON_CATALOG_URI",
    "BEACON_WAREHOUSE_URI",
    "BEACON_S3_ENDPOINT",
    "BEACON_S3_REGION",
    "BEACON_S3_VIRTUAL_HOSTED",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not valid TOML: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("{path}: unknown setting `{key}` (known: {known})")]
    Unknown {
        path: String,
        key: String,
        known: String,
    },
    #[error("{path}: `{key}` must be a string, number or boolean")]
    BadValue { path: String, key: String },
}

/// Reads `path` and returns the settings as `BEACON_*` variable names and values.
pub fn load(path: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: p.clone(),
        source,
    })?;
    parse(&p, &text)
}

pub fn parse(path: &str, text: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let table: toml::Table = text.parse().map_err(|source| ConfigError::Parse {
        path: path.to_string(),
        source,
    })?;
    let mut out = BTreeMap::new();
    flatten(path, "BEACON", &table, &mut out)?;
    Ok(out)
}

fn flatten(
    path: &str,
    prefix: &str,
    table: &toml::Table,
    out: &mut BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    for (k, v) in table {
        let name = format!("{prefix}_{}", k.to_uppercase().replace('-', "_"));
        let value = match v {
            toml::Value::Table(t) => {
                flatten(path, &name, t, out)?;
                continue;
            }
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => {
                return Err(ConfigError::BadValue {
                    path: path.to_string(),
                    key: name,
                })
            }
        };
        if !KNOWN.contains(&name.as_str()) {
            return Err(ConfigError::Unknown {
                path: path.to_string(),
                key: name,
                known: KNOWN.join(", "),
            });
        }
        out.insert(name, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_map_to_variables() {
        let got = parse(
            "t.toml",
            "data_dir = \"/d\"\n[edge]\nlisten = \"0.0.0.0:4433\"\n[ingest]\nmax_wait_ms = 250\n",
        )
        .unwrap();
        assert_eq!(got["BEACON_DATA_DIR"], "/d");
        assert_eq!(got["BEACON_EDGE_LISTEN"], "0.0.0.0:4433");
        assert_eq!(got["BEACON_INGEST_MAX_WAIT_MS"], "250");
    }

    #[test]
    fn typos_are_errors_that_name_the_key() {
        let err = parse("t.toml", "[ingest]\nmax_wiat_ms = 1\n").unwrap_err();
        assert!(
            err.to_string().contains("BEACON_INGEST_MAX_WIAT_MS"),
            "{err}"
        );
        assert!(matches!(
            parse("t.toml", "x = [1]"),
            Err(ConfigError::Unknown { .. } | ConfigError::BadValue { .. })
        ));
        assert!(matches!(
            parse("t.toml", "not toml ="),
            Err(ConfigError::Parse { .. })
        ));
    }
}
