//! Role locks on a data directory: an advisory `flock` on `<data-dir>/<role>.lock`, which
//! the kernel releases when the process dies, however it dies.
//!
//! Ingest takes its lock shared: several ingest processes may write the same tables (each
//! commit is a compare-and-swap on its partition's watermark, core-ingest's docs). The
//! rollup builder takes its lock exclusively (a second one would only redo the first's work),
//! and a backup takes both exclusively, so nothing writes while it copies.

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
    #[error("`beacon {role}` cannot start on {dir} while a backup or restore holds {file}")]
    Busy {
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

/// The role's lock, exclusively: no other holder of any kind.
pub fn lock_role(data_dir: &Path, role: &str) -> Result<RoleLock, LockError> {
    take(data_dir, role, libc::LOCK_EX)
}

/// The role's lock, shared with other processes of the role (not with [`lock_role`]).
pub fn share_role(data_dir: &Path, role: &str) -> Result<RoleLock, LockError> {
    take(data_dir, role, libc::LOCK_SH)
}

fn take(data_dir: &Path, role: &str, mode: libc::c_int) -> Result<RoleLock, LockError> {
    let path = data_dir.join(format!("{role}.lock"));
    let io = |source| LockError::Io {
        file: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let file = File::create(&path).map_err(io)?;
    // SAFETY: flock on a file descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) };
    if rc != 0 && mode == libc::LOCK_SH {
        return Err(LockError::Busy {
            role: role.to_string(),
            dir: data_dir.display().to_string(),
            file: path.display().to_string(),
        });
    }
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

    #[test]
    fn shared_holders_coexist_and_keep_the_exclusive_one_out() {
        let dir = tempfile::tempdir().unwrap();
        let a = share_role(dir.path(), "ingest").unwrap();
        let b = share_role(dir.path(), "ingest").unwrap();
        assert!(lock_role(dir.path(), "ingest").is_err());
        drop((a, b));
        let exclusive = lock_role(dir.path(), "ingest").unwrap();
        let err = share_role(dir.path(), "ingest").unwrap_err();
        assert!(err.to_string().contains("backup"), "{err}");
        drop(exclusive);
    }
}
