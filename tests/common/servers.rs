//! Real servers the shared-warehouse tests start themselves: PostgreSQL (Debian's packages)
//! for the catalog and s3s-fs (an S3-compatible server from crates.io, installed by
//! `scripts/setup.sh`) for the table files. Each on a free loopback port, in a temp
//! directory, stopped when dropped.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::wait_for;

/// A port nothing listens on right now (the server binds it a moment later).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Sends `signal` and reaps the child. Both signals used end the process without its help:
/// SIGKILL, and PostgreSQL's immediate shutdown (SIGQUIT), whose postmaster kills children
/// that have not exited after 5 s.
fn stop(child: &mut Child, signal: libc::c_int) {
    // SAFETY: a signal to a child process this harness started and has not reaped.
    unsafe { libc::kill(child.id() as i32, signal) };
    let _ = child.wait();
}

/// A PostgreSQL server of the test's own: a fresh cluster (`initdb`), trust authentication
/// on 127.0.0.1 only, and a database `beacon`.
pub struct Postgres {
    child: Option<Child>,
    /// `postgres://beacon@127.0.0.1:<port>/beacon`
    pub url: String,
    pub port: u16,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    dir: tempfile::TempDir,
}

impl Postgres {
    pub fn start() -> Self {
        let bin = postgres_bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("beacon-pg-")
            .tempdir()
            .expect("tempdir");
        // PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres`
        // user that Debian's package creates.
        let user = as_postgres_user(dir.path());
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-D", data.to_str().expect("utf8"), "-U", "beacon"])
            .args(["-A", "trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        run_as(&mut initdb, user);
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut pg = Self {
            child: None,
            url: format!("postgres://beacon@127.0.0.1:{port}/beacon"),
            port,
            bin,
            user,
            dir,
        };
        pg.start_again();
        pg.psql("postgres", "CREATE DATABASE beacon")
            .expect("create database");
        pg
    }

    /// Stops the server at once (immediate shutdown: connections cut, no checkpoint), as a
    /// crash of the database machine looks to its clients.
    pub fn stop_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child, libc::SIGQUIT);
        }
    }

    /// Starts the server on its port and data (after [`Postgres::stop_now`]: crash recovery)
    /// and waits until it accepts connections.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "PostgreSQL is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))
            .expect("log");
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.args(["-D", self.dir.path().join("data").to_str().expect("utf8")])
            .args(["-p", &self.port.to_string()])
            .args(["-k", self.dir.path().to_str().expect("utf8")])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        run_as(&mut cmd, self.user);
        self.child = Some(cmd.spawn().expect("start postgres"));
        wait_for(Duration::from_secs(60), "PostgreSQL accepting", || {
            self.psql("postgres", "SELECT 1").ok()
        });
    }

    /// Runs `sql` with psql in `database`; its output, or stderr on failure.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, String> {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "beacon", "-d", database, "-XAtc", sql])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Immediate shutdown: the test's data is thrown away with the directory.
        self.stop_now();
    }
}

/// Debian keeps the server binaries out of PATH: `/usr/lib/postgresql/<major>/bin`
/// (the newest), or `BEACON_POSTGRES_BIN`.
fn postgres_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BEACON_POSTGRES_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((major, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .expect("no PostgreSQL server under /usr/lib/postgresql: run scripts/setup.sh (Debian's postgresql)")
}

/// As root: gives `dir` to the `postgres` user and returns its (uid, gid).
fn as_postgres_user(dir: &Path) -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").expect("name");
    // SAFETY: a valid C string; the result is read at once, before any other getpw* call.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "running as root needs the postgres user (Debian's postgresql package)"
    );
    // SAFETY: non-null, as checked.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("chown the cluster dir");
    Some((uid, gid))
}

fn run_as(cmd: &mut Command, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid).env("HOME", "/tmp");
    }
}

/// An S3-compatible server (s3s-fs) with one bucket, serving a directory on a free port.
pub struct S3Server {
    child: Option<Child>,
    bin: PathBuf,
    port: u16,
    /// `http://127.0.0.1:<port>`
    pub endpoint: String,
    /// Where the server keeps objects: `<root>/<bucket>/<key>`.
    pub root: PathBuf,
    pub access_key: &'static str,
    pub secret_key: &'static str,
    _dir: tempfile::TempDir,
}

impl S3Server {
    pub fn start(bucket: &str) -> Self {
        let bin = std::env::var_os("BEACON_S3S_FS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                    .join(".cache/beacon/s3s/bin/s3s-fs")
            });
        assert!(
            bin.exists(),
            "{} missing: run scripts/setup.sh (cargo install s3s-fs)",
            bin.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("beacon-s3-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().join("objects");
        // A bucket is a directory of the server's root.
        std::fs::create_dir_all(root.join(bucket)).expect("bucket dir");
        let (access_key, secret_key) = ("beacon-test", "beacon-test-secret");
        let port = free_port();
        let mut s3 = Self {
            child: None,
            bin,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            root,
            access_key,
            secret_key,
            _dir: dir,
        };
        s3.start_again();
        s3
    }

    /// Kills the server (-9): requests are refused until [`S3Server::start_again`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child, libc::SIGKILL);
        }
    }

    /// Starts the server on its port and objects and waits until it listens.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "s3s-fs is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self._dir.path().join("s3s-fs.log"))
            .expect("log");
        self.child = Some(
            Command::new(&self.bin)
                .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
                .args([
                    "--access-key",
                    self.access_key,
                    "--secret-key",
                    self.secret_key,
                ])
                .arg(&self.root)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("start s3s-fs"),
        );
        let port = self.port;
        wait_for(Duration::from_secs(30), "s3s-fs listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
    }

    /// Every object under `prefix` of `bucket` (paths relative to the bucket).
    pub fn objects(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let base = self.root.join(bucket);
        let mut out = Vec::new();
        let mut stack = vec![base.join(prefix)];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(&base) {
                    out.push(rel.display().to_string());
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Points every process the test starts from now on (they inherit the environment) at a
/// shared warehouse: the catalog in `pg`, the tables in `s3`'s `bucket` under `warehouse/`.
pub fn use_shared_warehouse(pg: &Postgres, s3: &S3Server, bucket: &str) {
    std::env::set_var("BEACON_CATALOG_URI", &pg.url);
    std::env::set_var("BEACON_WAREHOUSE_URI", format!("s3://{bucket}/warehouse"));
    std::env::set_var("BEACON_S3_ENDPOINT", &s3.endpoint);
    std::env::set_var("AWS_ACCESS_KEY_ID", s3.access_key);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", s3.secret_key);
}
