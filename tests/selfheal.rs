//! The single `beacon up` heals itself (issue 17, fault test 8):
//!
//! - its nats-server killed with -9 while SDKs send with acknowledgements: the supervisor
//!   restarts it on the same port and store without an operator, `/readyz` says what
//!   happened, and every event id (each batch retried under its batch id until
//!   acknowledged) is stored exactly once;
//! - a corrupt byte in a table's metadata file: `beacon up` still starts and collects, its
//!   log and `/readyz` name the table and the file, and once the file is repaired the
//!   backlog is committed without a restart.
//!
//! Both also check `/healthz` and `/readyz` answers on the edge, admin and metrics ports.

#[path = "common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use beacon::endpoints::Endpoints;
use common::{cli_in, first_int, http, sigterm, spawn_up_guarded, sql_in, wait_for};
use serde_json::Value;

fn readyz(base: &str) -> (u16, Value) {
    let (status, body) = http(base, "GET", "/readyz", None, b"");
    let v = serde_json::from_str(&body).unwrap_or(Value::Null);
    (status, v)
}

/// Waits (up to `within`) until the node at `admin` answers `/readyz` with 200.
fn wait_ready(admin: &str, within: Duration) {
    wait_for(within, "node ready", || {
        (readyz(admin).0 == 200).then_some(())
    });
}

fn nats_pid(data: &Path) -> Option<i32> {
    std::fs::read_to_string(data.join("nats/nats-server.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn merchant(data: &Path) -> String {
    let v: Value = serde_json::from_str(&cli_in(
        data,
        None,
        &["merchant", "create", "heal-shop", "--format", "json"],
    ))
    .expect("json");
    v["write_key"].as_str().expect("key").to_string()
}

/// Where the senders stop until the test has injected its fault: each sender waits for
/// `open` after `batches` acknowledged batches, so the fault lands mid-stream by
/// construction rather than by pacing.
struct Gate {
    batches: usize,
    open: tokio::sync::watch::Receiver<bool>,
}

/// A gate for `clients` senders holding after `events` acknowledged events in all, and
/// the switch that opens it.
fn gate(events: usize, clients: usize) -> (Gate, tokio::sync::watch::Sender<bool>) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    (
        Gate {
            batches: events / 50 / clients,
            open: rx,
        },
        tx,
    )
}

/// Connects to the edge that `endpoints.json` in `data` names, once it names one whose
/// process is alive (a restarted `beacon up` listens on new ports).
async fn connect_live(data: &Path, key: &str) -> beacon_sdk::Client {
    loop {
        let d = data.to_path_buf();
        let endpoints = tokio::task::spawn_blocking(move || {
            wait_for(
                Duration::from_secs(90),
                "a live edge in endpoints.json",
                || Endpoints::read(&d).ok().filter(|e| alive(e.pid as i32)),
            )
        })
        .await
        .expect("wait");
        let (Some(addr), Some(ca)) = (endpoints.edge_quic, endpoints.edge_ca_cert) else {
            panic!("endpoints.json without an edge");
        };
        let ca = std::fs::read(ca).expect("ca");
        let config =
            beacon_sdk::ClientConfig::new(addr.parse().expect("addr"), ca, key.to_string());
        if let Ok(client) = beacon_sdk::Client::connect(config).await {
            return client;
        }
    }
}

/// Sends `events` in batches of 50 from `clients` SDK connections, each batch retried under
/// its own batch id until acknowledged (a tracker's retry by id), at most `deadline`; a
/// sender whose attempt failed reconnects to whichever live edge `endpoints.json` names.
/// Adds acknowledged ids to `acked`; returns how many attempts failed (and were retried)
/// and the longest a batch waited for its acknowledgement, retries included.
async fn send_all(
    data: PathBuf,
    key: String,
    events: Vec<beacon_proto::Event>,
    clients: usize,
    acked: Arc<Mutex<HashSet<String>>>,
    gate: Option<Gate>,
    deadline: Duration,
) -> (usize, Duration) {
    let started = Instant::now();
    let per = events.len().div_ceil(clients);
    let mut tasks = Vec::new();
    for part in events.chunks(per) {
        let (part, acked, data, key) = (part.to_vec(), acked.clone(), data.clone(), key.clone());
        let mut gate = gate.as_ref().map(|g| (g.batches, g.open.clone()));
        tasks.push(tokio::spawn(async move {
            let mut client = connect_live(&data, &key).await;
            let (mut failures, mut longest) = (0, Duration::ZERO);
            for (i, batch) in part.chunks(50).enumerate() {
                if let Some((at, open)) = &mut gate {
                    if i == *at {
                        open.wait_for(|o| *o).await.expect("gate");
                    }
                }
                let batch_id = beacon_sdk::new_batch_id();
                let first_try = Instant::now();
                loop {
                    assert!(
                        started.elapsed() < deadline,
                        "a batch was not acknowledged within {deadline:?}"
                    );
                    match client.send_batch(&batch_id, batch).await {
                        Ok(ack) => {
                            assert_eq!(ack.accepted, batch.len());
                            acked
                                .lock()
                                .expect("lock")
                                .extend(batch.iter().map(|e| e.event_id.clone()));
                            longest = longest.max(first_try.elapsed());
                            break;
                        }
                        Err(_) => {
                            failures += 1;
                            client = connect_live(&data, &key).await;
                        }
                    }
                }
            }
            (failures, longest)
        }));
    }
    let (mut failures, mut longest) = (0, Duration::ZERO);
    for t in tasks {
        let (f, l) = t.await.expect("sender");
        failures += f;
        longest = longest.max(l);
    }
    (failures, longest)
}

fn stored_ids(data: &Path) -> Vec<String> {
    sql_in(data, "SELECT event_id FROM raw_events")
        .iter()
        .filter_map(|r| r["event_id"].as_str().map(String::from))
        .collect()
}

/// Waits until `raw_events` holds as many rows as `all`, then checks they are exactly
/// `all`, each once.
fn assert_stored_exactly_once(data: &Path, all: &HashSet<String>) {
    let ids = wait_for(Duration::from_secs(90), "every event stored", || {
        let ids = stored_ids(data);
        (ids.len() >= all.len()).then_some(ids)
    });
    let unique: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(&unique, all, "every acknowledged id stored, nothing else");
    assert_eq!(ids.len(), all.len(), "no event stored twice");
}

/// Demo traffic being sent in the background by [`send_all`]: its ids, those acknowledged
/// so far, the switch of its gate (if it holds), and the senders' outcome.
struct Stream {
    all: HashSet<String>,
    acked: Arc<Mutex<HashSet<String>>>,
    open: Option<tokio::sync::watch::Sender<bool>>,
    sending: tokio::task::JoinHandle<(usize, Duration)>,
}

impl Stream {
    /// `n` events of `site` (seed `seed`, `visitors` distinct) from `clients` connections;
    /// with `hold_at`, the senders wait at that many acknowledged events until
    /// [`Stream::release`].
    fn start(
        data: &Path,
        key: &str,
        (seed, site, n, visitors): (u64, &str, usize, u64),
        clients: usize,
        hold_at: Option<usize>,
        deadline: Duration,
    ) -> Self {
        let events = beacon::demo::generate(
            seed,
            site,
            n,
            beacon_edge::now_ms() - 60_000,
            60_000,
            visitors,
        );
        let all = events.iter().map(|e| e.event_id.clone()).collect();
        let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
        let (hold, open) = match hold_at.map(|at| gate(at, clients)) {
            Some((hold, open)) => (Some(hold), Some(open)),
            None => (None, None),
        };
        let sending = tokio::spawn(send_all(
            data.to_path_buf(),
            key.to_string(),
            events,
            clients,
            acked.clone(),
            hold,
            deadline,
        ));
        Self {
            all,
            acked,
            open,
            sending,
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().expect("lock").len()
    }

    /// Waits until the senders hold at their gate (`at` events acknowledged).
    fn wait_held(&self, at: usize) {
        wait_for(Duration::from_secs(60), "first acknowledgements", || {
            (self.acked() >= at).then_some(())
        });
    }

    fn release(&self) {
        if let Some(open) = &self.open {
            open.send(true).expect("open the gate");
        }
    }

    /// Waits for the senders; checks every event was acknowledged; returns (failed
    /// attempts, longest wait for an acknowledgement).
    async fn finish(self) -> (usize, Duration, HashSet<String>) {
        let (failures, longest) = self.sending.await.expect("senders");
        let acked = self.acked.lock().expect("lock").clone();
        assert_eq!(acked, self.all, "every batch acknowledged in the end");
        (failures, longest, self.all)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nats_server_is_restarted_and_nothing_acknowledged_is_lost_or_doubled() {
    let dir = tempfile::Builder::new()
        .prefix("beacon-heal-")
        .tempdir()
        .expect("tempdir");
    let data = dir.path().join("data");
    let log = dir.path().join("up.log");
    let (mut up, endpoints) = spawn_up_guarded(&data, &log, &["--http-listen", "127.0.0.1:0"]);
    let key = merchant(&data);
    let admin = endpoints.admin_http.clone().expect("admin");
    let edge_http = endpoints.edge_http.clone().expect("edge http");
    let api = endpoints.metrics_http.clone().expect("api");
    for base in [&admin, &edge_http, &api] {
        assert_eq!(http(base, "GET", "/healthz", None, b"").0, 200, "{base}");
        wait_for(Duration::from_secs(20), "ready", || {
            (readyz(base).0 == 200).then_some(())
        });
    }
    let (_, node) = readyz(&admin);
    for check in ["bus", "ingest", "nats-server", "tables", "warehouse"] {
        assert_eq!(node["checks"][check]["ok"], true, "{check}: {node}");
    }

    let stream = Stream::start(
        &data,
        &key,
        (17, "heal.example", 24_000, 300),
        4,
        Some(1_000),
        Duration::from_secs(120),
    );
    // Mid-stream: the senders hold at 1,000 acknowledged events, the rest still to come.
    let first = nats_pid(&data).expect("nats pid file");
    stream.wait_held(1_000);
    // SAFETY: SIGKILL to the nats-server `beacon up` started (its pid file).
    unsafe { libc::kill(first, libc::SIGKILL) };
    stream.release();
    let killed_at = Instant::now();
    let acked_at_kill = stream.acked();

    // Restarted by the supervisor, no operator: a new pid, the node ready again, and the
    // restart visible in /readyz.
    let second = wait_for(Duration::from_secs(30), "a new nats-server", || {
        nats_pid(&data).filter(|p| *p != first && alive(*p))
    });
    let node = wait_for(Duration::from_secs(60), "node ready again", || {
        let (status, v) = readyz(&admin);
        (status == 200).then_some(v)
    });
    let recovered = killed_at.elapsed();
    assert!(
        node["checks"]["nats-server"]["failures"].as_u64() >= Some(1),
        "{node}"
    );
    let (failures, longest, all) = stream.finish().await;
    assert!(
        acked_at_kill < all.len(),
        "the kill must land mid-stream ({acked_at_kill} acknowledged)"
    );

    // Exactly once in the warehouse.
    assert_stored_exactly_once(&data, &all);
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        log_text.contains("nats-server died; restarting it"),
        "{log_text}"
    );
    assert!(
        data.join("nats/nats-server.log.1").exists(),
        "the dead server's log is kept"
    );
    // The operator's metrics moved with what happened.
    let (status, text) = http(&admin, "GET", "/metrics", None, b"");
    assert_eq!(status, 200);
    let metric = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        metric("beacon_nats_server_restarts_total{reason=\"exited\"}"),
        1.0,
        "{text}"
    );
    assert!(
        metric("beacon_edge_events_total{listener=\"quic\",outcome=\"accepted\"")
            >= all.len() as f64,
        "{text}"
    );
    assert_eq!(metric("beacon_ready{check=\"nats-server\"}"), 1.0, "{text}");
    assert!(
        metric("beacon_ingest_envelopes_total") >= (all.len() / 50) as f64,
        "{text}"
    );
    assert!(
        text.contains("beacon_edge_publish_seconds_bucket"),
        "{text}"
    );
    eprintln!(
        "nats-server {first} killed, {second} ready: node ready again after {recovered:?}; \
         {} events, {acked_at_kill} acknowledged before the kill, {failures} failed attempts \
         retried, longest wait for an acknowledgement {longest:?}",
        all.len()
    );

    sigterm(&up);
    let status = up.wait().expect("wait");
    assert!(status.success(), "beacon up exited with {status}");
    assert!(!alive(second), "nats-server stopped with beacon up");
}

/// The current metadata file of `table` (the highest-numbered one).
fn current_metadata(data: &Path, table: &str) -> PathBuf {
    let dir = data.join(format!("warehouse/analytics/{table}/metadata"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("metadata dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".metadata.json"))
        .collect();
    files.sort();
    files.pop().expect("a metadata file")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_metadata_file_stops_neither_start_nor_collection_and_is_named() {
    let dir = tempfile::Builder::new()
        .prefix("beacon-corrupt-")
        .tempdir()
        .expect("tempdir");
    let data = dir.path().join("data");
    let log = dir.path().join("up.log");
    let (mut up, _) = spawn_up_guarded(&data, &log, &[]);
    let key = merchant(&data);
    let events = beacon::demo::generate(
        3,
        "corrupt.example",
        2_000,
        beacon_edge::now_ms() - 60_000,
        60_000,
        100,
    );
    let (before, after) = events.split_at(1_000);
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    send_all(
        data.clone(),
        key.clone(),
        before.to_vec(),
        1,
        acked.clone(),
        None,
        Duration::from_secs(60),
    )
    .await;
    wait_for(Duration::from_secs(60), "first events stored", || {
        (first_int(&sql_in(&data, "SELECT count(*) FROM raw_events")) == 1_000).then_some(())
    });
    sigterm(&up);
    assert!(up.wait().expect("wait").success());

    // One corrupt byte in the events table's current metadata.
    let file = current_metadata(&data, "events");
    let good = std::fs::read(&file).expect("read");
    let mut bad = good.clone();
    bad[0] = b'#';
    std::fs::write(&file, &bad).expect("corrupt");

    let log2 = dir.path().join("up2.log");
    let (mut up, endpoints) = spawn_up_guarded(&data, &log2, &["--http-listen", "127.0.0.1:0"]);
    assert!(
        endpoints.metrics_http.is_none(),
        "no query server without a warehouse"
    );
    let admin = endpoints.admin_http.clone().expect("admin");
    let edge_http = endpoints.edge_http.clone().expect("edge http");
    let name = file
        .file_name()
        .expect("name")
        .to_string_lossy()
        .to_string();
    // The node is not ready, and says which table and which file; the edge is ready.
    let (status, node) = readyz(&admin);
    assert_eq!(status, 503, "{node}");
    let detail = node["checks"]["warehouse"]["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        detail.contains("table events") && detail.contains(&name),
        "{detail}"
    );
    let log_text = std::fs::read_to_string(&log2).unwrap_or_default();
    assert!(
        log_text.contains(&name),
        "the log names the file: {log_text}"
    );
    wait_for(Duration::from_secs(20), "edge ready", || {
        (readyz(&edge_http).0 == 200).then_some(())
    });

    // Collection goes on: the second half is acknowledged while the warehouse is broken.
    send_all(
        data.clone(),
        key.clone(),
        after.to_vec(),
        1,
        acked.clone(),
        None,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(acked.lock().expect("lock").len(), 2_000);
    // The operator sees the backlog grow while nothing is committed.
    wait_for(Duration::from_secs(30), "backlog in the metrics", || {
        (pending_metric(&admin) > 0.0).then_some(())
    });

    // Repaired: the roles start on their own, the backlog is committed, exactly once.
    std::fs::write(&file, &good).expect("repair");
    let endpoints = wait_for(Duration::from_secs(90), "query servers started", || {
        Endpoints::read(&data)
            .ok()
            .filter(|e| e.metrics_http.is_some())
    });
    let ids = wait_for(Duration::from_secs(90), "backlog committed", || {
        let ids = stored_ids(&data);
        (ids.len() >= 2_000).then_some(ids)
    });
    let unique: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(unique, *acked.lock().expect("lock"));
    assert_eq!(ids.len(), 2_000, "no duplicates");
    wait_ready(&admin, Duration::from_secs(30));
    let api = endpoints.metrics_http.expect("api");
    assert_eq!(readyz(&api).0, 200);
    wait_for(
        Duration::from_secs(30),
        "backlog gone from the metrics",
        || (pending_metric(&admin) == 0.0).then_some(()),
    );
    assert!(up.try_wait().expect("wait").is_none(), "still running");
    sigterm(&up);
    assert!(up.wait().expect("wait").success());
}

/// `beacon_ingest_consumer_pending` as `/metrics` on `base` shows it (-1: not there).
fn pending_metric(base: &str) -> f64 {
    let (_, text) = http(base, "GET", "/metrics", None, b"");
    text.lines()
        .find(|l| l.starts_with("beacon_ingest_consumer_pending{"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(-1.0)
}

/// A `beacon up` node one of whose directories is a small file system filled to the brim: a
/// ballast file holds the space until [`FullDisk::free`]. Fields drop in order: the node
/// (killed), the file system (unmounted), the directory.
struct FullDisk {
    up: common::KillOnDrop,
    endpoints: Endpoints,
    key: String,
    data: PathBuf,
    log: PathBuf,
    ballast: PathBuf,
    _disk: Tmpfs,
    _dir: tempfile::TempDir,
}

impl FullDisk {
    /// `beacon up` (with `up_args`) whose `<data dir>/<under>` is a `size` tmpfs, then
    /// filled; a merchant created.
    fn start(under: &str, size: &str, up_args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("beacon-full-")
            .tempdir()
            .expect("tempdir");
        let data = dir.path().join("data");
        let disk = Tmpfs::mount(&data.join(under), size);
        let log = dir.path().join("up.log");
        let (up, endpoints) = spawn_up_guarded(&data, &log, up_args);
        let key = merchant(&data);
        // A running node's disk fills, not a starting one's.
        let admin = endpoints.admin_http.clone().expect("admin");
        wait_ready(&admin, Duration::from_secs(60));
        let ballast = data.join(under).join("ballast");
        fill(&ballast);
        Self {
            up,
            endpoints,
            key,
            data,
            log,
            ballast,
            _disk: disk,
            _dir: dir,
        }
    }

    fn admin(&self) -> String {
        self.endpoints.admin_http.clone().expect("admin")
    }

    /// Gives the space back; when.
    fn free(&self) -> Instant {
        std::fs::remove_file(&self.ballast).expect("free space");
        Instant::now()
    }

    /// The node healed in place (the process that was full is still running), and stops
    /// cleanly on SIGTERM.
    fn stop(mut self) {
        assert!(
            self.up.try_wait().expect("wait").is_none(),
            "the same process"
        );
        sigterm(&self.up);
        assert!(self.up.wait().expect("wait").success());
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        // CI output is all a failing run leaves: what the node and its nats-server said.
        if std::thread::panicking() {
            for log in [self.log.clone(), self.data.join("nats/nats-server.log")] {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                common::print_tail(&log.display().to_string(), &text, 60);
            }
        }
    }
}

/// A small file system mounted over a directory for one test; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "this test mounts a {size} tmpfs to fill a disk, which needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes zeros into `path` until the file system is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("ballast");
    let chunk = vec![0u8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_bus_disk_answers_errors_and_heals_when_space_returns_without_a_restart() {
    let node = FullDisk::start("nats", "24m", &["--http-listen", "127.0.0.1:0"]);
    let (data, admin) = (&node.data, node.admin());
    let edge_http = node.endpoints.edge_http.clone().expect("edge http");
    let stream = Stream::start(
        data,
        &node.key,
        (5, "full.example", 3_000, 100),
        2,
        None,
        Duration::from_secs(150),
    );
    // Full: the node and the edge say they cannot store, and why.
    let said = wait_for(
        Duration::from_secs(60),
        "node reports the full store",
        || {
            let (status, v) = readyz(&admin);
            let detail = v["checks"]["nats-server"]["detail"].as_str().unwrap_or("");
            (status == 503 && detail.contains("cannot store")).then_some(v)
        },
    );
    wait_for(
        Duration::from_secs(30),
        "the edge not ready, saying why",
        || {
            let (status, v) = readyz(&edge_http);
            let why = v["checks"]["bus"]["detail"].as_str().unwrap_or("");
            (status == 503 && why.contains("JetStream does not store")).then_some(())
        },
    );
    let acked_while_full = stream.acked();

    // Space returns: recovered without restarting `beacon up`, nothing lost or doubled.
    let freed = node.free();
    let (failures, longest, all) = stream.finish().await;
    let recovered = freed.elapsed();
    wait_ready(&admin, Duration::from_secs(60));
    assert_stored_exactly_once(data, &all);
    let log_text = std::fs::read_to_string(&node.log).unwrap_or_default();
    assert!(
        log_text.contains("failing to store with free space again"),
        "{log_text}"
    );
    eprintln!(
        "full store: {} events, {acked_while_full} acknowledged before space returned, all \
         acknowledged {recovered:?} after; {failures} failed attempts retried, longest wait \
         {longest:?}; node while full: {said}",
        all.len()
    );
    node.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beacon_up_killed_mid_stream_and_restarted_loses_and_doubles_nothing() {
    let dir = tempfile::Builder::new()
        .prefix("beacon-kill-")
        .tempdir()
        .expect("tempdir");
    let data = dir.path().join("data");
    let (mut up, _) = spawn_up_guarded(&data, &dir.path().join("up.log"), &[]);
    let key = merchant(&data);
    let stream = Stream::start(
        &data,
        &key,
        (11, "kill.example", 12_000, 300),
        2,
        Some(1_000),
        Duration::from_secs(150),
    );
    stream.wait_held(1_000);
    up.kill().expect("kill -9 beacon up");
    up.wait().expect("reap");
    let killed_at = Instant::now();
    let acked_at_kill = stream.acked();
    // What a killed process leaves behind; the restart writes a fresh one.
    std::fs::remove_file(data.join("endpoints.json")).expect("stale endpoints");
    // The senders resume against the dead edge (and fail over) while it restarts.
    stream.release();
    let (mut up, _) = spawn_up_guarded(&data, &dir.path().join("up2.log"), &[]);
    let restarted = killed_at.elapsed();
    let (failures, _, all) = stream.finish().await;
    assert!(acked_at_kill < all.len(), "the kill must land mid-stream");
    assert_stored_exactly_once(&data, &all);
    // One nats-server on the store, not the old one beside the new.
    let store = data.join("nats").display().to_string();
    let servers = std::process::Command::new("pgrep")
        .args(["-f", &format!("nats-server.*{store}")])
        .output()
        .expect("pgrep");
    assert_eq!(
        String::from_utf8_lossy(&servers.stdout).lines().count(),
        1,
        "nats-servers on the store"
    );
    eprintln!(
        "beacon up killed with {acked_at_kill} of {} acknowledged; restarted (endpoints \
         written) {restarted:?} later; {failures} failed attempts retried",
        all.len()
    );
    sigterm(&up);
    assert!(up.wait().expect("wait").success());
}

/// Fault 6 on the warehouse: the disk under the Iceberg tables fills up. Collection goes on
/// (the bus is on another disk, and every batch is acknowledged while the warehouse cannot
/// take a byte); ingest says why it cannot commit; once space returns it catches up without
/// a restart of `beacon up`, and every acknowledged event is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_warehouse_disk_stops_nothing_but_commits_and_heals_when_space_returns() {
    let node = FullDisk::start("warehouse", "16m", &[]);
    let (data, admin) = (&node.data, node.admin());
    let stream = Stream::start(
        data,
        &node.key,
        (13, "whfull.example", 3_000, 100),
        2,
        None,
        Duration::from_secs(150),
    );
    // Full: ingest is not ready, and says why. It stays full through several of ingest's
    // restarts (each one the crash-recovery path).
    let said = wait_for(
        Duration::from_secs(60),
        "node reports that ingest cannot commit, three times",
        || {
            let (status, v) = readyz(&admin);
            let ingest = &v["checks"]["ingest"];
            let detail = ingest["detail"].as_str().unwrap_or("");
            let failures = ingest["failures"].as_u64().unwrap_or(0);
            let named = detail.contains("writing data files of ");
            (status == 503 && detail.contains("No space left") && named && failures >= 3)
                .then_some(v)
        },
    );
    // Collection does not wait for the warehouse: every batch is acknowledged while full.
    let (failures, longest, all) = stream.finish().await;
    let stored_while_full = stored_ids(data).len();
    assert!(
        stored_while_full < all.len(),
        "the warehouse was full, yet all {} events were stored",
        all.len()
    );

    // Space returns: ingest catches up without a restart, nothing lost or doubled.
    let freed = node.free();
    assert_stored_exactly_once(data, &all);
    let caught_up = freed.elapsed();
    wait_ready(&admin, Duration::from_secs(60));
    eprintln!(
        "full warehouse disk: {} events all acknowledged while full ({failures} failed attempts \
         retried, longest wait {longest:?}), {stored_while_full} stored before space returned, \
         all stored {caught_up:?} after; node while full: {said}",
        all.len()
    );
    node.stop();
}
