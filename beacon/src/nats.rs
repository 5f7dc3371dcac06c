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
        Self::start_on(store_dir, None)
    }

    /// Starts nats-server on `port` (a restart keeps its clients' URL), else on a free port.
    pub fn start_on(store_dir: &Path, port: Option<u16>) -> Result<Self, NatsError> {
        let bin = Self::find_binary()?;
        check_version(&bin)?;
        std::fs::create_dir_all(store_dir)?;
        // Two servers must never share a store: one left by a crashed `beacon up` (still
        // shutting down on its parent-death signal) is stopped first.
        stop_previous(store_dir);
        let log = store_dir.join("nats-server.log");
        // The kernel may hand the same free port to someone else between our probe and the
        // server's bind; retry a few times rather than fail a test on that race.
        let mut last_err = None;
        // A fixed port (a restart) is tried once: retrying helps only the free-port race.
        let attempts = if port.is_some() { 1 } else { 5 };
        for _ in 0..attempts {
            let port = match port {
                Some(p) => p,
                None => free_port()?,
            };
            let mut args: Vec<std::ffi::OsString> =
                ["-js", "-a", "127.0.0.1", "-p"].map(Into::into).to_vec();
            args.push(port.to_string().into());
            args.push("-sd".into());
            args.push(store_dir.into());
            match Self::launch(&bin, &args, port, store_dir) {
                Ok(server) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or(NatsError::NotReady {
            port: 0,
            secs: READY_WITHIN.as_secs(),
            log,
        }))
    }

    /// Starts nats-server from a configuration file (a node of a generated topology,
    /// `crate::topology`) whose clients' port is `port`; its log and pid file go in `dir`.
    pub fn start_with_config(config: &Path, port: u16, dir: &Path) -> Result<Self, NatsError> {
        let bin = Self::find_binary()?;
        check_version(&bin)?;
        std::fs::create_dir_all(dir)?;
        Self::launch(&bin, &["-c".into(), config.into()], port, dir)
    }

    /// Spawns the server with `args` (plus its log in `dir`) and waits until it is ready.
    fn launch(
        bin: &Path,
        args: &[std::ffi::OsString],
        port: u16,
        dir: &Path,
    ) -> Result<Self, NatsError> {
        let log = dir.join("nats-server.log");
        // A fresh log per start (readiness is read from it); the previous ones are kept,
        // so the cause of a crash survives the restart.
        rotate_logs(&log);
        let mut cmd = Command::new(bin);
        // If we die without running Drop (SIGKILL), the kernel stops the server too.
        // SAFETY: prctl is async-signal-safe and touches only the child being spawned.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                // Its own process group: Ctrl-C in a terminal reaches `beacon up`, which
                // drains through the bus and only then stops the server, not both at once.
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        let child = cmd
            .args(args)
            .arg("--log")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let _ = std::fs::write(dir.join(PID_FILE), child.id().to_string());
        let mut server = Self {
            child,
            port,
            store_dir: dir.to_path_buf(),
        };
        // JetStream recovers the store before it is ready: after a crash with a large
        // store that takes a while, so the bound is generous (a server that exits is
        // noticed at once).
        match server.wait_ready(READY_WITHIN) {
            Ok(()) => Ok(server),
            Err(e) => {
                let _ = server.child.kill();
                let _ = server.child.wait();
                Err(e)
            }
        }
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
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        // Only our own pid file: a successor may have written its own already.
        let pid_file = self.store_dir.join(PID_FILE);
        if std::fs::read_to_string(&pid_file).is_ok_and(|p| p.trim() == self.child.id().to_string())
        {
            let _ = std::fs::remove_file(pid_file);
        }
    }

    /// `Some(status)` once the server has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines of its log: why it stopped.
    fn log_tail(&self, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.store_dir.join("nats-server.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join(" | ")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// How long a starting server may take to be ready (JetStream recovery included).
const READY_WITHIN: Duration = Duration::from_secs(120);
/// The running server's pid, beside its store.
const PID_FILE: &str = "nats-server.pid";
/// Logs of earlier runs kept beside the current one (`nats-server.log.1` is the newest).
const KEPT_LOGS: usize = 5;

fn rotate_logs(log: &Path) {
    let name = |n: usize| PathBuf::from(format!("{}.{n}", log.display()));
    for n in (1..KEPT_LOGS).rev() {
        let _ = std::fs::rename(name(n), name(n + 1));
    }
    let _ = std::fs::rename(log, name(1));
}

/// Stops a nats-server that an earlier process left running on `store_dir` (its pid file
/// names it, and its command line names the store): SIGTERM, then SIGKILL after 10 s.
fn stop_previous(store_dir: &Path) {
    let Ok(text) = std::fs::read_to_string(store_dir.join(PID_FILE)) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    // A nats-server whose `-sd` argument is exactly this store (a pid may have been reused).
    let store = store_dir.as_os_str().as_encoded_bytes().to_vec();
    let ours = || {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
            args.first().is_some_and(|a| a.ends_with(b"nats-server"))
                && args
                    .windows(2)
                    .any(|w| w[0] == b"-sd" && w[1] == store.as_slice())
        })
    };
    if !ours() {
        return;
    }
    tracing::warn!(pid, store = %store_dir.display(), "a nats-server from an earlier run still uses the store; stopping it");
    // SAFETY: kill(2) on a pid whose command line we just checked.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while ours() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if ours() {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        while ours() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The name of the supervisor's readiness check.
pub const HEALTH_CHECK: &str = "nats-server";

/// `beacon up`'s own nats-server, kept serving without an operator:
///
/// - restarted on the same port and store whenever it exits (backoff 100 ms doubling to
///   5 s), each restart logged with the tail of the dead server's log;
/// - restarted gracefully when it keeps failing to store while its disk has room again:
///   after a full disk, nats-server 2.10-2.15 keeps failing every write to the stream's
///   block file until it restarts (see docs/RELIABILITY.md);
/// - its state in the `nats-server` check: not ready while it is down or cannot store.
///
/// Clients reconnect to the same URL and JetStream recovers the store, and the edge retries
/// a publish under the same message id, so a restart costs a pause, not data.
pub struct Supervised {
    url: String,
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Store errors within this long count as "failing to store now".
/// (nats-server logs a failing write each time a client retries it, every few seconds.)
const STORE_ERROR_WINDOW: Duration = Duration::from_secs(15);
/// At most one restart for store errors per this long (the restart itself takes ~1 s).
const STORE_RESTART_COOLDOWN: Duration = Duration::from_secs(30);

impl Supervised {
    pub fn start(store_dir: &Path, health: beacon_serve::Health) -> Result<Self, NatsError> {
        let server = NatsServer::start(store_dir)?;
        let url = server.url();
        health.set(HEALTH_CHECK, Ok(()));
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("nats-supervisor".into())
            .spawn(move || supervise(server, health, stopped))?;
        Ok(Self {
            url,
            stop,
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Stops supervising and the server (SIGTERM, SIGKILL if it lingers).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The supervisor's loop: looks at the child every 100 ms and at its log every second.
fn supervise(
    mut server: NatsServer,
    health: beacon_serve::Health,
    stopped: std::sync::mpsc::Receiver<()>,
) {
    let port = server.port();
    let store_dir = server.store_dir.clone();
    let mut watch = StoreWatch::default();
    let mut last_restart: Option<Instant> = None;
    let mut last_scan = Instant::now();
    loop {
        match stopped.recv_timeout(Duration::from_millis(100)) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            _ => return server.shutdown(),
        }
        let reason = if let Some(status) = server.exited() {
            let reason = format!("exited ({status}); last log lines: {}", server.log_tail(5));
            tracing::error!(%reason, "nats-server died; restarting it");
            metrics::counter!("beacon_nats_server_restarts_total", "reason" => "exited")
                .increment(1);
            reason
        } else if last_scan.elapsed() >= Duration::from_secs(1) {
            last_scan = Instant::now();
            let Some(error) = watch.failing(&store_dir) else {
                if watch.reported {
                    watch.reported = false;
                    health.set(HEALTH_CHECK, Ok(()));
                }
                continue;
            };
            let free = free_bytes(&store_dir);
            let enough = free.is_some_and(|(free, total)| free >= (total / 8).min(256 << 20));
            let cooling = last_restart.is_some_and(|t| t.elapsed() < STORE_RESTART_COOLDOWN);
            if !enough || cooling {
                watch.reported = true;
                health.set(
                    HEALTH_CHECK,
                    Err(format!(
                        "JetStream cannot store ({} bytes free): {error}",
                        free.map(|(f, _)| f).unwrap_or(0)
                    )),
                );
                continue;
            }
            let reason = format!("failing to store with free space again: {error}");
            tracing::error!(%reason, "restarting nats-server");
            metrics::counter!("beacon_nats_server_restarts_total", "reason" => "store_failing")
                .increment(1);
            server.shutdown();
            reason
        } else {
            continue;
        };
        health.set(HEALTH_CHECK, Err(reason));
        let mut pause = Duration::from_millis(100);
        loop {
            match NatsServer::start_on(&store_dir, Some(port)) {
                Ok(s) => {
                    server = s;
                    watch = StoreWatch::default();
                    last_restart = Some(Instant::now());
                    tracing::info!(port, pid = server.pid(), "nats-server restarted");
                    health.set(HEALTH_CHECK, Ok(()));
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, "restarting nats-server failed; retrying in {pause:?}");
                    health.set(HEALTH_CHECK, Err(format!("restart failed: {e}")));
                }
            }
            if !matches!(
                stopped.recv_timeout(pause),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            ) {
                return;
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }
}

/// Follows the running server's log for store failures.
#[derive(Default)]
struct StoreWatch {
    offset: u64,
    last_error: Option<(Instant, String)>,
    /// The check currently says "cannot store".
    reported: bool,
}

impl StoreWatch {
    /// The latest store error, if one was logged within [`STORE_ERROR_WINDOW`].
    fn failing(&mut self, store_dir: &Path) -> Option<String> {
        use std::io::{Read, Seek};
        if let Ok(mut f) = std::fs::File::open(store_dir.join("nats-server.log")) {
            let mut new = Vec::new();
            if f.seek(std::io::SeekFrom::Start(self.offset)).is_ok()
                && f.read_to_end(&mut new).is_ok()
            {
                // Whole lines only: a line being written is read on the next look.
                let whole = new.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                self.offset += whole as u64;
                let text = String::from_utf8_lossy(&new[..whole]);
                if let Some(line) = text.lines().rev().find(|l| l.contains("failed to store")) {
                    self.last_error = Some((Instant::now(), line.to_string()));
                }
            }
        }
        self.last_error
            .as_ref()
            .filter(|(at, _)| at.elapsed() < STORE_ERROR_WINDOW)
            .map(|(_, line)| line.clone())
    }
}

/// (available, total) bytes of the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the struct we pass; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some((st.f_bavail as u64 * frsize, st.f_blocks as u64 * frsize))
}

impl Drop for Supervised {
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
