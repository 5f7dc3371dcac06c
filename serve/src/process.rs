//! Start-up hygiene for a server process.
//!
//! - [`raise_fd_limit`]: the soft limit on open files is raised to the hard limit, so that a
//!   burst of connections runs into the listeners' own caps long before the process runs
//!   out of descriptors (a common soft limit is 1,024).
//! - [`private_files`]: everything the process (and its children: nats-server) creates is
//!   private to its user, whatever the umask: directories 0700, files 0600. Raw events,
//!   the catalog and the edge's TLS key are nobody else's business.
//! - [`tighten`]: an existing data directory written before that is brought to the same
//!   modes.
//! - [`no_library_backtraces`]: `RUST_BACKTRACE=1` keeps panics' stack traces without
//!   making every library error walk the stack.

use std::os::unix::fs::PermissionsExt;

/// Library errors capture no stack trace unless `RUST_LIB_BACKTRACE` asks for one, even
/// with `RUST_BACKTRACE=1` (which keeps panics' traces). Some dependencies make and drop
/// errors as control flow on the query path (iceberg's reader, per column and file): with
/// traces on, stack walking was ~3.5% of the metrics API's CPU samples in a profile of the
/// dashboard benchmark. Call first in `main`, before any thread exists (the setting is read
/// once, at the first capture).
pub fn no_library_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
}
use std::path::Path;

/// The file-descriptor limits after [`raise_fd_limit`]: `(soft, hard)`.
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    // `rlim_t` is not `u64` on every target.
    #[allow(clippy::unnecessary_cast)]
    Ok((lim.rlim_cur as u64, lim.rlim_max as u64))
}

/// Makes every file and directory this process creates from now on private (umask 077).
/// Call it before any thread starts.
pub fn private_files() {
    // SAFETY: umask has no failure mode; it is process-wide, hence "before threads".
    unsafe {
        libc::umask(0o077);
    }
}

/// What [`tighten`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tightened {
    pub dirs: u64,
    pub files: u64,
}

/// Brings `dir` and everything under it to 0700 (directories) and 0600 (files); symbolic
/// links are not followed. Returns how many entries were changed.
pub fn tighten(dir: &Path) -> std::io::Result<Tightened> {
    let mut done = Tightened::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            if mode != 0o700 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
                done.dirs += 1;
            }
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        } else if meta.is_file() && mode & 0o077 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o700))?;
            done.files += 1;
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tighten_makes_a_tree_private_and_counts_what_it_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        std::fs::create_dir_all(root.join("warehouse/events")).unwrap();
        std::fs::write(root.join("catalog.db"), b"x").unwrap();
        std::fs::write(root.join("warehouse/events/a.parquet"), b"x").unwrap();
        for p in ["", "warehouse", "warehouse/events"] {
            std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for p in ["catalog.db", "warehouse/events/a.parquet"] {
            std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let done = tighten(&root).unwrap();
        assert_eq!(done, Tightened { dirs: 3, files: 2 });
        let mode = |p: &str| {
            std::fs::metadata(root.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(""), 0o700);
        assert_eq!(mode("warehouse/events"), 0o700);
        assert_eq!(mode("catalog.db"), 0o600);
        assert_eq!(mode("warehouse/events/a.parquet"), 0o600);
        // A second pass has nothing left to do.
        assert_eq!(tighten(&root).unwrap(), Tightened::default());
    }

    #[test]
    fn the_fd_soft_limit_ends_at_the_hard_limit() {
        let (soft, hard) = raise_fd_limit().unwrap();
        assert_eq!(soft, hard);
        // What the kernel now holds, not just what the function said.
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct we pass.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
    }
}
