//! Starting a private nats-server with JetStream, for `beacon up` and for tests.
//!
//! The server listens on a free loopback port, stores JetStream data under a directory we
//! own, and is killed when the handle drops, so no test or demo leaves a server behind.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error(
        "nats-server not found: set BEACON_NATS_SERVER or run scripts/setup.sh \
         (it installs nats-server 2.10+ into ~/.cache/beacon/venv/bin)"
    )]
    NotFound,
    #[error("nats-server {found} is too old: Beacon needs 2.10 or newer (Debian's 2.9 lacks KV and multi-filter features)")]
    TooOld { found: String },
    #[error("cannot start nats-server: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "nats-server did not accept connections on port {port} within {secs} s; its log is {log}"
    )]
    NotReady { port: u16, secs: u64, log: PathBuf },
}

/// A nats-server child process; killed (and reaped) on drop.
pub struct NatsServer {
    child: Child,
    port: u16,
    store_dir: PathBuf,
}

impl NatsServer {
    /// Finds the binary: `$BEACON_NATS_SERVER`, then the project's venv, then `PATH`.
    pub fn find_binary() -> Result<PathBuf, NatsError> {
        if let Some(p) = std::env::var_os("BEACON_NATS_SERVER") {
            return Ok(PathBuf::from(p));
        }
        let mut candidates = Vec::new();
        if let Some(home) = std::env::var_os("HOME") {
            candidates.push(PathBuf::from(home).join(".cache/beacon/venv/bin/nats-server"));
        }
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path).map(|d| d.join("nats-server")));
        }
        candidates
            .into_iter()
            .find(|p| p.is_file())
            .ok_or(NatsError::NotFound)
    }

    /// Starts nats-server with JetStream on a free 127.0.0.1 port, storing under `store_dir`.
    pub fn start(store_dir: &Path) -> Result<Self, NatsError> {
        let bin = Self::find_binary()?;
        check_version(&bin)?;
        std::fs::create_dir_all(store_dir)?;
        let log = store_dir.join("nats-server.log");
        // The kernel may hand the same free port to someone else between our probe and the
        // server's bind; retry a few times rather than fail a test on that race.
        let mut last_err = None;
        for _ in 0..5 {
            let port = free_port()?;
            // A fresh log per start: readiness is read from it.
            let _ = std::fs::remove_file(&log);
            let mut cmd = Command::new(&bin);
            // If we die without running Drop (SIGKILL), the kernel stops the server too.
            // SAFETY: prctl is async-signal-safe and touches only the child being spawned.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
            let child = cmd
                .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
                .arg(store_dir)
                .args(["--log"])
                .arg(&log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let mut server = Self {
                child,
                port,
                store_dir: store_dir.to_path_buf(),
            };
            match server.wait_ready(Duration::from_secs(15)) {
                Ok(()) => return Ok(server),
                Err(e) => {
                    let _ = server.child.kill();
                    let _ = server.child.wait();
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or(NatsError::NotReady {
            port: 0,
            secs: 15,
            log,
        }))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), NatsError> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            // JetStream is ready once the server logs it; the TCP port alone opens earlier.
            // (The log was cleared before this start, so the line is this server's.)
            let log =
                std::fs::read_to_string(self.store_dir.join("nats-server.log")).unwrap_or_default();
            if log.contains("Server is ready")
                && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err(NatsError::NotReady {
            port: self.port,
            secs: timeout.as_secs(),
            log: self.store_dir.join("nats-server.log"),
        })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server: SIGTERM (it flushes and exits), SIGKILL if it lingers.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn check_version(bin: &Path) -> Result<(), NatsError> {
    let out = Command::new(bin).arg("--version").output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // "nats-server: v2.15.1"
    let ver = text.trim().rsplit('v').next().unwrap_or("").to_string();
    let mut parts = ver.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (2, 10) {
        return Err(NatsError::TooOld { found: ver });
    }
    Ok(())
}
