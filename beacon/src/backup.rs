//! `beacon backup`, `beacon restore` and `beacon relocate`: a data directory (Iceberg
//! warehouse, SQLite catalog, the bus's JetStream store with merchants and pipelines, keys
//! and certificates) copied whole while nothing runs on it, and made to work wherever it
//! lands by rewriting the absolute paths Iceberg records ([`beacon_warehouse::relocate`]).
//!
//! A backup is itself a data directory: `beacon sql --data-dir <backup>` reads it, and
//! restoring is copying it back anywhere and relocating it there. Online backups (while
//! `beacon up` runs) are not supported yet: see docs/RELIABILITY.md.

use std::path::{Path, PathBuf};

use beacon_warehouse::relocate::Relocation;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0} is not a data directory (no catalog.db)")]
    NotADataDir(PathBuf),
    #[error("{0} is in use (a `beacon up`, ingest or rollup role runs on it): stop it first")]
    InUse(PathBuf),
    #[error("{0} exists and is not empty: choose a new directory")]
    NotEmpty(PathBuf),
    #[error("{to} is inside {from}: a copy cannot hold itself")]
    Inside { from: PathBuf, to: PathBuf },
    #[error("{0} is a symbolic link: copy what it points to into the data directory first")]
    Link(PathBuf),
    #[error(transparent)]
    Lock(crate::lock::LockError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Warehouse(#[from] beacon_warehouse::WarehouseError),
}

/// What a backup or restore copied, and the warehouse check afterwards.
#[derive(Debug)]
pub struct Copied {
    pub files: usize,
    pub bytes: u64,
    pub relocation: Option<Relocation>,
}

impl std::fmt::Display for Copied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} files, {:.1} MiB, {} metadata files rewritten",
            self.files,
            self.bytes as f64 / (1 << 20) as f64,
            self.relocation.as_ref().map_or(0, |r| r.files)
        )
    }
}

/// Copies the stopped data directory `from` to the new directory `to` and relocates the
/// copy, then opens it and loads every table (the copy is checked, not assumed).
pub async fn copy(from: &Path, to: &Path) -> Result<Copied, BackupError> {
    if !from.join("catalog.db").is_file() {
        return Err(BackupError::NotADataDir(from.to_path_buf()));
    }
    let _held = hold(from)?;
    let canonical = std::fs::canonicalize(from).map_err(io(from))?;
    let target = std::path::absolute(to).map_err(io(to))?;
    if target.starts_with(&canonical) || target.starts_with(from) {
        return Err(BackupError::Inside {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
        });
    }
    if to.exists() && std::fs::read_dir(to).map_err(io(to))?.next().is_some() {
        return Err(BackupError::NotEmpty(to.to_path_buf()));
    }
    std::fs::create_dir_all(to).map_err(io(to))?;
    let mut copied = Copied {
        files: 0,
        bytes: 0,
        relocation: None,
    };
    copy_tree(from, to, &mut copied)?;
    copied.relocation = beacon_warehouse::relocate::relocate(to).await?;
    let wh = beacon_warehouse::Warehouse::open_existing(to).await?;
    wh.check().await?;
    Ok(copied)
}

/// Rewrites a data directory that was copied or moved by other means (cp, rsync, a volume
/// snapshot) to work where it is.
pub async fn relocate(data_dir: &Path) -> Result<Option<Relocation>, BackupError> {
    if !data_dir.join("catalog.db").is_file() {
        return Err(BackupError::NotADataDir(data_dir.to_path_buf()));
    }
    let _held = hold(data_dir)?;
    let moved = beacon_warehouse::relocate::relocate(data_dir).await?;
    beacon_warehouse::Warehouse::open_existing(data_dir)
        .await?
        .check()
        .await?;
    Ok(moved)
}

/// The role locks `beacon up` (and the ingest and rollup roles) hold while they run: taken,
/// nothing that writes the warehouse or the bus store runs on `dir` while we copy it.
fn hold(dir: &Path) -> Result<(crate::lock::RoleLock, crate::lock::RoleLock), BackupError> {
    let take = |role| {
        crate::lock::lock_role(dir, role).map_err(|e| match e {
            crate::lock::LockError::Held { .. } => BackupError::InUse(dir.to_path_buf()),
            e => BackupError::Lock(e),
        })
    };
    Ok((take("ingest")?, take("rollup")?))
}

/// What a copy leaves behind: the running state of the source (its endpoints, the pid of
/// its nats-server, role locks) and half-written temporary files.
fn skipped(name: &str) -> bool {
    matches!(name, "endpoints.json" | "nats-server.pid")
        || name.ends_with(".lock")
        || name.ends_with(".tmp")
        // SQLite's shared-memory index of the catalog's write-ahead log: rebuilt on open
        // (the `-wal` file itself is data and is copied).
        || name.ends_with("-shm")
}

fn copy_tree(from: &Path, to: &Path, copied: &mut Copied) -> Result<(), BackupError> {
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let name = entry.file_name();
        if skipped(&name.to_string_lossy()) {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        let kind = entry.file_type().map_err(io(&src))?;
        if kind.is_dir() {
            std::fs::create_dir_all(&dst).map_err(io(&dst))?;
            // The same private mode as the source directory.
            let mode = std::fs::metadata(&src).map_err(io(&src))?.permissions();
            std::fs::set_permissions(&dst, mode).map_err(io(&dst))?;
            copy_tree(&src, &dst, copied)?;
        } else if kind.is_symlink() {
            // Skipping it would make a backup that silently lacks part of the data.
            return Err(BackupError::Link(src));
        } else if kind.is_file() {
            // `fs::copy` keeps the file's permissions.
            copied.bytes += std::fs::copy(&src, &dst).map_err(io(&src))?;
            copied.files += 1;
        }
    }
    Ok(())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let path = path.to_path_buf();
    move |source| BackupError::Io { path, source }
}
