//! One process per role and data directory: two ingesters (or rollup builders) writing the
//! same tables would double-count, because the Iceberg commit retry does not re-check our
//! sequence properties. An advisory `flock` on `<data-dir>/<role>.lock` enforces it; the
//! kernel releases it when the process dies, however it dies.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another `beacon {role}` already runs on {dir} (holds {file}); stop it first")]
    Held {
        role: String,
        dir: String,
        file: String,
    },
    #[error("lock file {file}: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
}

/// Held for as long as the role runs.
#[derive(Debug)]
pub struct RoleLock {
    _file: File,
}

pub fn lock_role(data_dir: &Path, role: &str) -> Result<RoleLock, LockError> {
    let path = data_dir.join(format!("{role}.lock"));
    let io = |source| LockError::Io {
        file: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let file = File::create(&path).map_err(io)?;
    // SAFETY: flock on a file descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(LockError::Held {
            role: role.to_string(),
            dir: data_dir.display().to_string(),
            file: path.display().to_string(),
        });
    }
    Ok(RoleLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_role(dir.path(), "ingest").unwrap();
        let err = lock_role(dir.path(), "ingest").unwrap_err();
        assert!(err.to_string().contains("another `beacon ingest`"), "{err}");
        lock_role(dir.path(), "rollup").unwrap();
        drop(first);
        lock_role(dir.path(), "ingest").unwrap();
    }
}
