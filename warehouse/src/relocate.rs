//! Moving a warehouse: Iceberg records absolute paths (the catalog's metadata locations,
//! the table location and manifest lists in each metadata file, the manifests in each
//! manifest list, the data files in each manifest), so a copied data directory would still
//! read, and commit next to, the original's files. [`relocate`] rewrites every recorded
//! path from where the catalog says the warehouse was to where it is now, keeping the whole
//! history (snapshots, time travel) intact; [`Warehouse::open`](crate::Warehouse::open)
//! refuses a directory whose catalog points elsewhere, naming both places.
//!
//! What it rewrites: `*.metadata.json` (every string value under the old root), Avro
//! manifest lists and manifests (every string value, header metadata kept), then the
//! catalog rows in one transaction, last, so an interrupted run is simply run again (each
//! step only touches strings that still carry the old root). Parquet data files hold no
//! paths and are not touched.

use std::path::{Path, PathBuf};

use apache_avro::types::Value as Avro;
use serde_json::Value as Json;

use crate::{replace::CatalogSwap, sqlx_uri, Layout, WarehouseError, CATALOG_NAME, NAMESPACE};

/// What [`relocate`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Relocation {
    pub from: PathBuf,
    pub to: PathBuf,
    /// Metadata, manifest-list and manifest files rewritten.
    pub files: usize,
    pub tables: usize,
}

/// Where the catalog's rows say the warehouse directory is (`None`: no tables yet).
pub(crate) async fn recorded_root(
    catalog: &CatalogSwap,
) -> Result<Option<PathBuf>, WarehouseError> {
    Ok(catalog
        .locations()
        .await?
        .iter()
        .find_map(|row| root_of(&row.metadata)))
}

/// True when `recorded` is this layout's warehouse directory (compared after resolving
/// links, so a symlinked path to the same directory is not a move).
pub fn is_here(layout: &Layout, recorded: &Path) -> bool {
    match (
        std::fs::canonicalize(recorded),
        std::fs::canonicalize(&layout.warehouse_dir),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => recorded == layout.warehouse_dir,
    }
}

/// Rewrites the warehouse under `data_dir` to live where it is now. `None`: it already did.
pub async fn relocate(data_dir: &Path) -> Result<Option<Relocation>, WarehouseError> {
    let layout = Layout::new(data_dir);
    if !layout.catalog_db.exists() {
        return Ok(None);
    }
    let catalog = CatalogSwap::connect(&sqlx_uri(&layout), CATALOG_NAME).await?;
    let Some(from) = recorded_root(&catalog).await? else {
        return Ok(None);
    };
    let to = std::fs::canonicalize(&layout.warehouse_dir).map_err(|source| WarehouseError::Io {
        path: layout.warehouse_dir.clone(),
        source,
    })?;
    if from == to {
        return Ok(None);
    }
    let paths = Paths {
        from: from.to_string_lossy().into_owned(),
        to: to.to_string_lossy().into_owned(),
    };
    let mut files = 0;
    for file in walk(&to)? {
        let name = file.to_string_lossy();
        let rewritten = if name.ends_with(".metadata.json") {
            rewrite_json(&file, &paths)?
        } else if name.ends_with(".avro") {
            rewrite_avro(&file, &paths)?
        } else {
            false
        };
        files += usize::from(rewritten);
    }
    let rows = catalog.locations().await?;
    let moved: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.clone(),
                paths
                    .apply(&r.metadata)
                    .unwrap_or_else(|| r.metadata.clone()),
                r.previous
                    .as_deref()
                    .map(|p| paths.apply(p).unwrap_or_else(|| p.to_string())),
            )
        })
        .collect();
    catalog.set_locations(&moved).await?;
    Ok(Some(Relocation {
        from,
        to,
        files,
        tables: rows.len(),
    }))
}

/// `<root>/analytics/<table>/metadata/<file>` -> `<root>` (by position, not by searching
/// for the namespace's name, which may also appear higher up the path).
fn root_of(location: &str) -> Option<PathBuf> {
    let path = Path::new(location.strip_prefix("file://").unwrap_or(location));
    let mut up = path.ancestors();
    let namespace = up.nth(3)?;
    if namespace.file_name()? != NAMESPACE {
        return None;
    }
    up.next().map(Path::to_path_buf)
}

struct Paths {
    from: String,
    to: String,
}

impl Paths {
    /// `s` with the old root replaced (plain or `file://`), or `None` if it has none.
    fn apply(&self, s: &str) -> Option<String> {
        let (scheme, path) = match s.strip_prefix("file://") {
            Some(p) => ("file://", p),
            None => ("", s),
        };
        let rest = path.strip_prefix(&self.from)?;
        // A whole path component: `/w` must not match `/w2/...`.
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        Some(format!("{scheme}{}{rest}", self.to))
    }
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>, WarehouseError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WarehouseError::Io { path, source }
    };
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).map_err(io(&d))? {
            let path = entry.map_err(io(&d))?.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes `bytes` over `file` atomically (a temporary file beside it, then a rename).
fn replace_file(file: &Path, bytes: &[u8]) -> Result<(), WarehouseError> {
    let tmp = file.with_extension("relocating");
    let io = |source| WarehouseError::Io {
        path: file.to_path_buf(),
        source,
    };
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        // On disk before the catalog is pointed at it (an in-place relocate has no copy).
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, file).map_err(io)
}

fn rewrite_json(file: &Path, paths: &Paths) -> Result<bool, WarehouseError> {
    let text = std::fs::read(file).map_err(|source| WarehouseError::Io {
        path: file.to_path_buf(),
        source,
    })?;
    let mut json: Json = serde_json::from_slice(&text)?;
    if !walk_json(&mut json, paths) {
        return Ok(false);
    }
    replace_file(file, &serde_json::to_vec(&json)?)?;
    Ok(true)
}

fn walk_json(v: &mut Json, paths: &Paths) -> bool {
    match v {
        Json::String(s) => match paths.apply(s) {
            Some(new) => {
                *s = new;
                true
            }
            None => false,
        },
        Json::Array(items) => items
            .iter_mut()
            .fold(false, |changed, i| walk_json(i, paths) | changed),
        Json::Object(map) => map
            .values_mut()
            .fold(false, |changed, i| walk_json(i, paths) | changed),
        _ => false,
    }
}

fn rewrite_avro(file: &Path, paths: &Paths) -> Result<bool, WarehouseError> {
    let avro = |e: apache_avro::Error| WarehouseError::Relocate {
        file: file.to_path_buf(),
        reason: e.to_string(),
    };
    let bytes = std::fs::read(file).map_err(|source| WarehouseError::Io {
        path: file.to_path_buf(),
        source,
    })?;
    let reader = apache_avro::Reader::new(&bytes[..]).map_err(avro)?;
    let schema = reader.writer_schema().clone();
    let metadata = reader.user_metadata().clone();
    let mut values = Vec::new();
    let mut changed = false;
    for value in reader {
        let mut value = value.map_err(avro)?;
        changed |= walk_avro(&mut value, paths);
        values.push(value);
    }
    if !changed {
        return Ok(false);
    }
    let mut writer = apache_avro::Writer::with_codec(
        &schema,
        Vec::new(),
        apache_avro::Codec::Deflate(Default::default()),
    );
    let mut keys: Vec<_> = metadata.into_iter().collect();
    keys.sort();
    for (k, v) in keys {
        writer.add_user_metadata(k, v).map_err(avro)?;
    }
    for v in values {
        writer.append(v).map_err(avro)?;
    }
    replace_file(file, &writer.into_inner().map_err(avro)?)?;
    Ok(true)
}

fn walk_avro(v: &mut Avro, paths: &Paths) -> bool {
    match v {
        Avro::String(s) => match paths.apply(s) {
            Some(new) => {
                *s = new;
                true
            }
            None => false,
        },
        Avro::Union(_, inner) => walk_avro(inner, paths),
        Avro::Array(items) => items
            .iter_mut()
            .fold(false, |changed, i| walk_avro(i, paths) | changed),
        Avro::Map(map) => map
            .values_mut()
            .fold(false, |changed, i| walk_avro(i, paths) | changed),
        Avro::Record(fields) => fields
            .iter_mut()
            .fold(false, |changed, (_, i)| walk_avro(i, paths) | changed),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_components_of_the_old_root_move() {
        let p = Paths {
            from: "/a/w".into(),
            to: "/b/data/w".into(),
        };
        assert_eq!(p.apply("/a/w/x.json").as_deref(), Some("/b/data/w/x.json"));
        assert_eq!(
            p.apply("file:///a/w/t/m.avro").as_deref(),
            Some("file:///b/data/w/t/m.avro")
        );
        assert_eq!(p.apply("/a/w2/x.json"), None);
        assert_eq!(p.apply("s3://a/w/x"), None);
        assert_eq!(
            root_of("/d/warehouse/analytics/events/metadata/0.metadata.json"),
            Some(PathBuf::from("/d/warehouse"))
        );
        assert_eq!(
            root_of("file:///srv/analytics/b/warehouse/analytics/events/metadata/0.metadata.json"),
            Some(PathBuf::from("/srv/analytics/b/warehouse"))
        );
        assert_eq!(
            root_of("/d/warehouse/other/events/metadata/0.metadata.json"),
            None
        );
    }
}
