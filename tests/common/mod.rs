//! Test harness: a real pipeline made of real processes on loopback.
//!
//! Each test gets its own temp directory, its own nats-server (JetStream, free port) and its
//! own `beacon` role processes; everything is killed when the `Cluster` drops.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod guest;
pub mod servers;

use beacon::endpoints::Endpoints;
use beacon::nats::NatsServer;
use serde_json::Value;

pub fn beacon_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_beacon"))
}

/// Where the example plugins were built (`scripts/setup.sh` builds them into the shared
/// target dir: `<target>/wasm32-wasip2/release`).
pub fn plugin_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("BEACON_PLUGINS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // <target>/release/deps/<test-exe> -> <target>/wasm32-wasip2/release
            let exe = std::env::current_exe().expect("test exe path");
            exe.ancestors()
                .nth(3)
                .expect("target dir")
                .join("wasm32-wasip2/release")
        });
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build the plugins first (scripts/setup.sh, or cargo build --release --target wasm32-wasip2 --manifest-path plugins/examples/Cargo.toml)",
        path.display()
    );
    path
}

pub struct Role {
    pub name: &'static str,
    pub child: Child,
}

impl Role {
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) {
        sigterm(&self.child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill_hard();
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// Fields drop in order: the roles (killed), nats-server, and only then the directory, so
/// no process writes into it after it is removed.
pub struct Cluster {
    pub rollup: Option<Role>,
    pub ingest: Option<Role>,
    pub edge: Option<Role>,
    pub nats: NatsServer,
    pub endpoints: Endpoints,
    /// Extra arguments of `beacon edge` (geo database, limits, region).
    pub edge_args: Vec<String>,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// nats-server + edge + ingest (+ rollups every second when `rollups`).
    pub fn start(rollups: bool) -> Self {
        Self::start_with_edge(rollups, &[])
    }

    /// As `start`, with extra `beacon edge` arguments.
    pub fn start_with_edge(rollups: bool, edge_args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("beacon-test-")
            .tempdir()
            .expect("tempdir");
        let nats = NatsServer::start(&dir.path().join("nats")).expect("start nats-server");
        let mut c = Self {
            endpoints: Endpoints::default(),
            edge_args: edge_args.iter().map(|a| a.to_string()).collect(),
            dir,
            nats,
            edge: None,
            ingest: None,
            rollup: None,
        };
        c.start_edge();
        c.start_ingest();
        if rollups {
            c.rollup = Some(c.spawn("rollup", &["rollup", "--interval", "1"]));
        }
        c
    }

    pub fn spawn(&self, name: &'static str, args: &[&str]) -> Role {
        self.spawn_with_env(name, args, &[])
    }

    /// Runs `beacon <command> --data-dir <dir>/<name> <args>`: a role on a "machine" of its
    /// own (its own data directory), for tests where the warehouse is shared.
    /// With `env` (fault points) added to its environment.
    pub fn spawn_on_machine(
        &self,
        name: &'static str,
        command: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Role {
        let dir = self.data_dir().join(name);
        std::fs::create_dir_all(&dir).expect("machine dir");
        let mut all = vec![command, "--data-dir", dir.to_str().expect("utf8")];
        all.extend_from_slice(args);
        self.spawn_with_env(name, &all, env)
    }

    /// As `spawn`, with extra environment variables (fault points).
    pub fn spawn_with_env(&self, name: &'static str, args: &[&str], env: &[(&str, &str)]) -> Role {
        let log =
            std::fs::File::create(self.data_dir().join(format!("{name}.log"))).expect("log file");
        let mut cmd = Command::new(beacon_bin());
        cmd.args(args)
            .envs(env.iter().copied())
            .env("BEACON_NATS_URL", self.nats.url())
            .env("BEACON_DATA_DIR", self.data_dir())
            // Every role serves its metrics and health on a port of its own.
            .env("BEACON_METRICS_LISTEN", "127.0.0.1:0")
            .env(
                "RUST_LOG",
                std::env::var("BEACON_TEST_LOG").unwrap_or_else(|_| "info,async_nats=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        Role {
            name,
            child: cmd.spawn().expect("spawn beacon"),
        }
    }

    /// (Re)starts the edge process and waits for its endpoints.
    pub fn start_edge(&mut self) {
        if let Some(mut old) = self.edge.take() {
            old.terminate();
        }
        let _ = std::fs::remove_file(Endpoints::path(self.data_dir()));
        let mut args = vec!["edge", "--listen", "127.0.0.1:0"];
        args.extend(self.edge_args.iter().map(String::as_str));
        self.edge = Some(self.spawn("edge", &args));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(e) = Endpoints::read(self.data_dir()) {
                self.endpoints = e;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "edge did not write endpoints.json"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts another edge (own id, data dir and port) on the same bus; returns it and the
    /// endpoints it wrote.
    pub fn spawn_edge(&self, id: &'static str) -> (Role, Endpoints) {
        self.spawn_edge_with(id, &[])
    }

    /// As `spawn_edge`, with extra `beacon edge` arguments.
    pub fn spawn_edge_with(&self, id: &'static str, extra: &[&str]) -> (Role, Endpoints) {
        let dir = self.data_dir().join(id);
        std::fs::create_dir_all(&dir).expect("edge dir");
        let mut args = vec![
            "edge",
            "--listen",
            "127.0.0.1:0",
            "--edge-id",
            id,
            "--data-dir",
            dir.to_str().expect("utf8"),
        ];
        args.extend_from_slice(extra);
        let role = self.spawn(id, &args);
        let endpoints = wait_for(Duration::from_secs(30), "second edge endpoints", || {
            Endpoints::read(&dir).ok()
        });
        (role, endpoints)
    }

    pub fn start_ingest(&mut self) {
        // Small commits so a kill lands between commits often.
        self.start_ingest_with(&["--ingest-max-wait-ms", "200", "--ingest-max-batch", "100"]);
    }

    pub fn start_ingest_with(&mut self, args: &[&str]) {
        self.start_ingest_env(args, &[]);
    }

    /// Starts the ingester with `args` and `env` (one still running is killed).
    pub fn start_ingest_env(&mut self, args: &[&str], env: &[(&str, &str)]) {
        let mut all = vec!["ingest"];
        all.extend_from_slice(args);
        self.ingest = Some(self.spawn_with_env("ingest", &all, env));
        // Ready once it has opened (on first start: created) the warehouse: a test's first
        // query must not race ingest's start.
        let dir = self.data_dir().to_path_buf();
        wait_for(
            Duration::from_secs(60),
            "ingest opened the warehouse",
            || cli_try(&dir, None, &["sql", "SELECT count(*) FROM raw_events"]).ok(),
        );
    }

    /// Sends `events` with `write_key` in acknowledged batches of 500.
    pub async fn send(&self, write_key: &str, events: &[beacon_proto::Event]) {
        let client = self.client(write_key).await.expect("client");
        for batch in events.chunks(500) {
            client.send(batch).await.expect("sent");
        }
    }

    /// A read token for `merchant`'s metrics and SQL.
    pub fn read_token(&self, merchant: &str) -> String {
        self.cli(&["merchant", "read-token", "--merchant", merchant])
            .trim()
            .to_string()
    }

    /// Waits until `query` (a count) gives `want`.
    pub fn wait_count(&self, query: &str, want: i64) {
        wait_for(Duration::from_secs(60), query, || {
            (self.count(query) == want).then_some(())
        });
    }

    /// Waits until the rollups and the visits (`sessions`) count `events` events in all.
    pub fn wait_rolled_up(&self, events: i64, timeout: Duration) {
        wait_for(timeout, "events rolled up", || {
            (self.count(ROLLED_UP) == events && self.count(IN_VISITS) == events).then_some(())
        });
    }

    /// Starts `beacon api` on a free loopback port; returns the role and its address.
    pub fn spawn_api(&self) -> (Role, String) {
        let role = self.spawn("api", &["api", "--listen", "127.0.0.1:0"]);
        let addr = wait_for(Duration::from_secs(30), "metrics API address", || {
            self.log("api").lines().find_map(|l| {
                l.split("metrics API: http://")
                    .nth(1)
                    .map(|a| a.trim().to_string())
            })
        });
        (role, addr)
    }

    /// Where role `name` serves `/metrics`, `/healthz` and `/readyz` (`http://...`).
    pub fn status_url(&self, name: &str) -> String {
        wait_for(Duration::from_secs(30), "metrics address", || {
            self.log(name).lines().find_map(|l| {
                l.split("metrics and health: ")
                    .nth(1)
                    .map(|a| a.trim().to_string())
            })
        })
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.data_dir().join(format!("{name}.log"))).unwrap_or_default()
    }

    pub fn cli(&self, args: &[&str]) -> String {
        cli_in(self.data_dir(), Some(&self.nats.url()), args)
    }

    /// Creates a merchant; returns (id, write key).
    pub fn merchant(&self, name: &str) -> (String, String) {
        self.merchant_with(name, &[])
    }

    /// Creates a merchant with extra `merchant create` flags (trackers, limits).
    pub fn merchant_with(&self, name: &str, extra: &[&str]) -> (String, String) {
        let v = self.merchant_json(name, extra);
        (
            v["id"].as_str().expect("id").to_string(),
            v["write_key"].as_str().expect("key").to_string(),
        )
    }

    /// `merchant create --format json` (id, write key, server key) with extra flags.
    pub fn merchant_json(&self, name: &str, extra: &[&str]) -> Value {
        let mut args = vec!["merchant", "create", name, "--format", "json"];
        args.extend_from_slice(extra);
        serde_json::from_str(&self.cli(&args)).expect("merchant json")
    }

    pub fn attach(&self, merchant: &str, plugin: &str, config: &str) {
        let path = plugin_path(plugin);
        self.cli(&[
            "plugin",
            "attach",
            "--merchant",
            merchant,
            "--name",
            plugin,
            path.to_str().expect("utf8 path"),
            "--plugin-config",
            config,
            // Hostile fixtures would (rightly) fail the check run on sample events.
            if plugin.contains("hostile") {
                "--force"
            } else {
                "--wait=10"
            },
        ]);
    }

    /// Runs SQL through `beacon sql --format json`.
    pub fn sql(&self, query: &str) -> Vec<Value> {
        sql_in(self.data_dir(), query)
    }

    pub fn count(&self, query: &str) -> i64 {
        first_int(&self.sql(query))
    }

    pub async fn client(
        &self,
        write_key: &str,
    ) -> Result<beacon_sdk::Client, beacon_sdk::SdkError> {
        client_for(&self.endpoints, write_key).await
    }
}

/// An SDK client for the edge described by `endpoints`.
pub async fn client_for(
    endpoints: &Endpoints,
    write_key: &str,
) -> Result<beacon_sdk::Client, beacon_sdk::SdkError> {
    client_encoding(endpoints, write_key, Default::default()).await
}

/// An SDK client that encodes batches with `encoding`.
pub async fn client_encoding(
    endpoints: &Endpoints,
    write_key: &str,
    encoding: beacon_proto::wire::BatchEncoding,
) -> Result<beacon_sdk::Client, beacon_sdk::SdkError> {
    let addr = endpoints
        .edge_quic
        .as_ref()
        .expect("edge addr")
        .parse()
        .expect("addr");
    let ca = std::fs::read(endpoints.edge_ca_cert.as_ref().expect("ca")).expect("ca pem");
    let mut cfg = beacon_sdk::ClientConfig::new(addr, ca, write_key);
    cfg.request_timeout = Duration::from_secs(20);
    cfg.batch_encoding = encoding;
    beacon_sdk::Client::connect(cfg).await
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failing test shows what the roles said: CI output is all we get there.
        if std::thread::panicking() {
            // Every role's log (each spawned role writes `<name>.log` in the data directory).
            let mut names: Vec<String> = std::fs::read_dir(self.data_dir())
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".log").map(str::to_string)
                })
                .collect();
            names.sort();
            for name in &names {
                print_tail(&format!("{name}.log"), &self.log(name), 40);
            }
        }
    }
}

/// The last `lines` lines of `text` (a log called `name`), for a failing test's output:
/// CI output is all a failing run leaves.
pub fn print_tail(name: &str, text: &str, lines: usize) {
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    eprintln!("--- {name} (last {} lines) ---", tail.len());
    for line in tail.iter().rev() {
        eprintln!("{line}");
    }
}

/// `beacon maintain` flags that expire every snapshot but the newest and sweep every
/// unreferenced file now, whatever its age (for tests on quiet tables).
pub const SWEEP_NOW: [&str; 6] = [
    "--orphan-age-secs",
    "0",
    "--snapshot-retain-secs",
    "0",
    "--snapshot-retain-last",
    "1",
];

/// Runs a `beacon` subcommand against `data_dir` (and `nats_url`, else endpoints.json);
/// panics with its stderr if it fails.
pub fn cli_in(data_dir: &Path, nats_url: Option<&str>, args: &[&str]) -> String {
    cli_try(data_dir, nats_url, args)
        .unwrap_or_else(|stderr| panic!("beacon {args:?} failed: {stderr}"))
}

/// As [`cli_in`]: its stdout, or its stderr when it fails.
pub fn cli_try(data_dir: &Path, nats_url: Option<&str>, args: &[&str]) -> Result<String, String> {
    cli_env(data_dir, nats_url, &[], args)
}

/// As [`cli_try`], with more environment variables (`(name, value)`).
pub fn cli_env(
    data_dir: &Path,
    nats_url: Option<&str>,
    env: &[(&str, &std::ffi::OsStr)],
    args: &[&str],
) -> Result<String, String> {
    let mut cmd = Command::new(beacon_bin());
    cmd.args(args)
        .env("BEACON_DATA_DIR", data_dir)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied());
    if let Some(url) = nats_url {
        cmd.env("BEACON_NATS_URL", url);
    }
    let out = cmd.output().expect("run beacon");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Runs `beacon plugin ... --format json` against `dir` and `nats` and parses its output.
pub fn plugin_json(dir: &Path, nats: &str, args: &[&str]) -> Value {
    let mut all = vec!["plugin"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--format", "json"]);
    let out = cli_in(dir, Some(nats), &all);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `beacon plugin activate --merchant <merchant> <args> --format json`.
pub fn activate(dir: &Path, nats: &str, merchant: &str, args: &[&str]) -> Value {
    let mut all = vec!["activate", "--merchant", merchant];
    all.extend_from_slice(args);
    plugin_json(dir, nats, &all)
}

/// Runs SQL through `beacon sql --format json` on `data_dir`.
pub fn sql_in(data_dir: &Path, query: &str) -> Vec<Value> {
    let out = cli_in(data_dir, None, &["sql", query, "--format", "json"]);
    match serde_json::from_str::<Value>(&out) {
        Ok(Value::Array(rows)) => rows,
        other => panic!("unexpected sql output {other:?}: {out}"),
    }
}

/// The first column of the first row as an integer (0 for no rows).
pub fn first_int(rows: &[Value]) -> i64 {
    rows.first()
        .and_then(|r| r.as_object())
        .and_then(|o| o.values().next())
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

pub fn sigterm(child: &Child) {
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body). (A dozen lines
/// instead of an HTTP client dependency for the tests.)
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| ("Authorization", a))
        .into_iter()
        .collect();
    let r = http_with(addr, method, path, &headers, body);
    (r.status, r.body)
}

pub struct HttpResponse {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// As `http`, with request headers, returning the response headers too.
pub fn http_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    use std::io::{Read, Write};
    let addr = addr.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect HTTP");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    s.write_all(body).expect("write body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let out = String::from_utf8_lossy(&raw);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_string(),
    }
}

/// The project venv's Python (scripts/setup.sh installs the third-party clients there).
/// Runs `tests/python/<script>` with the venv's Python and `args` (killed after
/// `deadline`); panics with its stderr unless it succeeds; returns its stdout as JSON.
pub fn python_json<A: AsRef<std::ffi::OsStr>>(
    script: &str,
    args: impl IntoIterator<Item = A>,
    deadline: Duration,
) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/python")
        .join(script);
    use std::os::unix::process::CommandExt;
    // Its own process group, so a deadline also ends what it started (ChromeDriver, Chromium).
    let child = Command::new(venv_python())
        .arg(&path)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("run python");
    let out = wait_with_deadline(child, deadline);
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(out.stdout.trim_ascii()).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// What PyIceberg (another engine) reads from the warehouse under `data_dir`
/// (`tests/python/pyiceberg_read.py`: rows, distinct ids and sums per table), given the
/// catalog and warehouse URIs exactly as `beacon up` prints them.
pub fn pyiceberg_read(data_dir: &Path) -> Value {
    let layout = beacon_warehouse::Layout::new(data_dir);
    python_json(
        "pyiceberg_read.py",
        [layout.catalog_uri(), layout.warehouse_uri()],
        Duration::from_secs(120),
    )
}

/// Waits for `child` to exit (at most `deadline`, then kills it) and collects its output.
/// A helper thread blocks on the child itself and hands the output over: no polling.
pub fn wait_with_deadline(child: Child, deadline: Duration) -> std::process::Output {
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(deadline) {
        Ok(output) => output,
        Err(_) => {
            // SAFETY: plain kill(2) on our own child's pid, and on its process group when it
            // leads one (ESRCH otherwise, harmless); the helper thread then reaps it.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::kill(-pid, libc::SIGKILL);
            }
            rx.recv().expect("waiter thread")
        }
    };
    output.expect("output")
}

pub fn venv_python() -> PathBuf {
    let venv = std::env::var_os("BEACON_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/beacon/venv")
        });
    let py = venv.join("bin/python");
    assert!(
        py.exists(),
        "{} missing: run scripts/setup.sh",
        py.display()
    );
    py
}

/// CPU seconds (user + system) a process has used, from /proc (benchmarks).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the ')'.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Benchmark load: `events` split evenly over `clients`, each sending acknowledged batches
/// of 500 with 8 in flight; returns the wall seconds until every batch is durable.
pub async fn send_split(
    clients: &[std::sync::Arc<beacon_sdk::Client>],
    events: &[beacon_proto::Event],
) -> f64 {
    let started = Instant::now();
    let per = events.len().div_ceil(clients.len().max(1));
    let mut tasks = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let part = events[(i * per).min(events.len())..((i + 1) * per).min(events.len())].to_vec();
        tasks.push(tokio::spawn(beacon::demo::send_all(
            c.clone(),
            part,
            500,
            8,
        )));
    }
    for t in tasks {
        t.await.expect("join").expect("send");
    }
    started.elapsed().as_secs_f64()
}

/// One `beacon up` (everything in one process, as the README's first command runs it) on
/// loopback, with its own data directory; killed on drop.
pub struct Up {
    pub child: Child,
    pub endpoints: Endpoints,
    pub dir: tempfile::TempDir,
}

/// A merchant of an [`Up`]: id, write key, server key and a read token.
#[derive(Clone)]
pub struct Merchant {
    pub id: String,
    pub write_key: String,
    pub server_key: String,
    pub token: String,
}

/// A child process killed (and reaped) on drop, so a failing test leaves nothing running.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// [`spawn_up`], killed on drop.
pub fn spawn_up_guarded(data: &Path, log: &Path, extra: &[&str]) -> (KillOnDrop, Endpoints) {
    let (child, endpoints) = spawn_up(data, log, extra);
    (KillOnDrop(child), endpoints)
}

/// Starts `beacon up --data-dir <data>` (ingest commits every 200 ms, then `extra` flags),
/// appending its log to `log`, and waits for its endpoints file.
pub fn spawn_up(data: &Path, log: &Path, extra: &[&str]) -> (Child, Endpoints) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    let child = Command::new(beacon_bin())
        .args(["up", "--data-dir"])
        .arg(data)
        .args(["--ingest-max-wait-ms", "200"])
        .args(extra)
        .env("RUST_LOG", "info,async_nats=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn beacon up");
    let endpoints = wait_for(Duration::from_secs(90), "endpoints.json", || {
        Endpoints::read(data).ok()
    });
    (child, endpoints)
}

impl Up {
    /// Starts `beacon up` (HTTP collectors on, rollups every second, `extra` flags) and waits
    /// for its endpoints file.
    pub fn start(extra: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("beacon-up-")
            .tempdir()
            .expect("tempdir");
        let mut args = vec!["--rollup-interval", "1", "--http-listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let (child, endpoints) =
            spawn_up(&dir.path().join("data"), &dir.path().join("up.log"), &args);
        Self {
            child,
            endpoints,
            dir,
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn merchant(&self, name: &str, extra: &[&str]) -> Merchant {
        let mut args = vec!["merchant", "create", name, "--format", "json"];
        args.extend_from_slice(extra);
        let v: Value =
            serde_json::from_str(&cli_in(&self.data(), None, &args)).expect("merchant json");
        let id = v["id"].as_str().expect("id").to_string();
        let token = cli_in(
            &self.data(),
            None,
            &["merchant", "read-token", "--merchant", &id],
        )
        .trim()
        .to_string();
        Merchant {
            id,
            write_key: v["write_key"].as_str().expect("key").to_string(),
            server_key: v["server_key"].as_str().expect("server key").to_string(),
            token,
        }
    }

    pub fn sql_port(&self) -> String {
        let url = self.endpoints.sql_pg.clone().expect("sql_pg");
        url.rsplit(':').next().expect("port").to_string()
    }

    pub fn api(&self) -> String {
        self.endpoints.metrics_http.clone().expect("metrics_http")
    }

    pub fn edge_http(&self) -> String {
        self.endpoints.edge_http.clone().expect("edge_http")
    }

    /// psql as `m`: Ok(rows, unaligned) or Err(stderr).
    pub fn psql(&self, m: &Merchant, sql: &str) -> Result<String, String> {
        psql(&self.sql_port(), &m.id, &m.token, sql)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
    }

    /// Asserts the process is still running.
    pub fn still_up(&mut self) {
        assert!(
            self.child.try_wait().expect("wait").is_none(),
            "beacon up died; log:\n{}",
            self.log()
        );
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One statement through `psql` on 127.0.0.1: Ok(rows, unaligned) or Err(stderr).
pub fn psql(port: &str, user: &str, password: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-U",
            user,
            "-d",
            "beacon",
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .env("PGSSLMODE", "disable")
        .output()
        .expect("psql runs (scripts/setup.sh installs postgresql-client)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A benchmark setting from the environment, or `default`.
/// The sum of the samples in Prometheus text `scraped` whose line starts with `prefix`
/// (a name, or a name with its first labels: `name{a="x"`).
pub fn metric(scraped: &str, prefix: &str) -> f64 {
    scraped
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p` quantile of `sorted` (NaN when empty).
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A steady sender of demo events for fault tests: `batch` events every `pace` (the rate,
/// not the outcome, is set by the clock) with ids from seed `seed + n` for the n-th batch,
/// until `stop` is set or `max_batches` are sent; adds what was acknowledged to `acked`.
pub struct PacedSender {
    pub seed: u64,
    pub host: String,
    pub batch: usize,
    pub pace: Duration,
    pub max_batches: u64,
    pub visitors: u64,
    /// Event times fall in the hour before this (ms since the epoch).
    pub now_ms: i64,
}

/// How a [`PacedSender`] ended.
pub struct SenderEnd {
    /// Stopped by the flag (not by running out of batches).
    pub stopped: bool,
    /// The longest wait for an acknowledgement.
    pub longest: Duration,
}

impl PacedSender {
    pub fn spawn(
        self,
        client: beacon_sdk::Client,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        acked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) -> tokio::task::JoinHandle<Result<SenderEnd, beacon_sdk::SdkError>> {
        use std::sync::atomic::Ordering;
        tokio::spawn(async move {
            let mut pace = tokio::time::interval(self.pace);
            let mut longest = Duration::ZERO;
            for n in 0..self.max_batches {
                if stop.load(Ordering::Relaxed) {
                    return Ok(SenderEnd {
                        stopped: true,
                        longest,
                    });
                }
                pace.tick().await;
                let batch = beacon::demo::generate(
                    self.seed + n,
                    &self.host,
                    self.batch,
                    self.now_ms - 3_600_000,
                    3_600_000,
                    self.visitors,
                );
                let sent = Instant::now();
                client.send(&batch).await?;
                longest = longest.max(sent.elapsed());
                acked.fetch_add(batch.len(), Ordering::Relaxed);
            }
            Ok(SenderEnd {
                stopped: false,
                longest,
            })
        })
    }
}

/// Waits until `raw_events` and `events` (read through `data_dir`) hold `sent` rows with
/// `sent` distinct ids each, and the rollups count `sent` events: every acknowledged event
/// exactly once, end to end.
pub fn wait_stored_once(data_dir: &Path, sent: i64, timeout: Duration) {
    let count = |sql: &str| first_int(&sql_in(data_dir, sql));
    for table in ["raw_events", "events"] {
        wait_for(timeout, &format!("every event in {table}"), || {
            (count(&format!("SELECT count(*) FROM {table}")) == sent).then_some(())
        });
        assert_eq!(
            count(&format!("SELECT count(DISTINCT event_id) FROM {table}")),
            sent,
            "{table} holds a duplicate"
        );
    }
    wait_for(timeout, "every event rolled up", || {
        (count(ROLLED_UP) == sent && count(IN_VISITS) == sent).then_some(())
    });
}

/// Events the hourly rollups count.
pub const ROLLED_UP: &str = "SELECT coalesce(sum(events), 0) FROM rollups";
/// Events the pre-aggregated visits count (each event is in one visit).
pub const IN_VISITS: &str = "SELECT coalesce(sum(events), 0) FROM sessions";
