//! A hostile but authenticated merchant against one `beacon up` (edge, ingest, rollups,
//! admin, metrics API and SQL in one process): every request here once crashed, froze,
//! starved or locked out the whole process. Each case asserts that the hostile request gets
//! a clear error, that a bystander merchant's query and the edge answer within a bound while
//! it runs, and that the process is still up afterwards.

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{http, http_with, psql, wait_for, Merchant, Up};
use serde_json::{json, Value};

/// How long a bystander may wait while a hostile request runs. Generous: CI machines are
/// shared; without isolation these took from seconds to forever.
const BYSTANDER_BOUND: Duration = Duration::from_secs(5);

/// `beacon up` with tight query limits, so that the budget cases finish fast.
fn start_up() -> Up {
    Up::start(&[
        "--query-timeout-ms",
        "4000",
        "--query-memory-mb",
        "256",
        "--query-concurrent-per-merchant",
        "2",
        "--sql-max-conns-per-ip",
        "16",
    ])
}

/// While `hostile` runs (on its own thread), a bystander's SQL query, its metrics-API query
/// and the edge's `/healthz` all answer within the bound. Returns the hostile request's
/// result.
fn while_running<T: Send + 'static>(
    up: &mut Up,
    bystander: &Merchant,
    hostile: impl FnOnce() -> T + Send + 'static,
) -> T {
    let running = std::thread::spawn(hostile);
    let mut checks = 0;
    while !running.is_finished() && checks < 3 {
        let t = Instant::now();
        let rows = up
            .psql(bystander, "SELECT 1")
            .unwrap_or_else(|e| panic!("bystander SQL failed: {e}"));
        assert_eq!(rows, "1");
        let sql_took = t.elapsed();
        let t = Instant::now();
        let (status, body) = http(&up.edge_http(), "GET", "/healthz", None, b"");
        assert_eq!(status, 200, "{body}");
        let edge_took = t.elapsed();
        let t = Instant::now();
        let q = json!({"site_id": bystander.id, "metrics": ["events"], "date_range": "day"});
        let (status, body) = api_query(&up.api(), bystander, &q);
        assert_eq!(status, 200, "{body}");
        let api_took = t.elapsed();
        for (what, took) in [("SQL", sql_took), ("edge", edge_took), ("API", api_took)] {
            assert!(
                took < BYSTANDER_BOUND,
                "bystander {what} took {took:?} while the hostile request ran"
            );
        }
        checks += 1;
    }
    let out = running.join().expect("hostile thread");
    up.still_up();
    out
}

fn api_query(api: &str, m: &Merchant, body: &Value) -> (u16, String) {
    http(
        api,
        "POST",
        "/api/v2/query",
        Some(&m.token),
        body.to_string().as_bytes(),
    )
}

#[test]
fn hostile_sql_gets_clear_errors_and_nobody_else_waits() {
    let mut up = start_up();
    let evil = up.merchant("evil", &[]);
    let good = up.merchant("good", &[]);
    let (port, id, token) = (up.sql_port(), evil.id.clone(), evil.token.clone());
    let run = move |sql: String| psql(&port, &id, &token, &sql);

    // A flat chain of 1,000 UNION ALL terms (24 KB): refused before parsing, by name.
    let chain = vec!["SELECT 1"; 1000].join(" UNION ALL ");
    let r = while_running(&mut up, &good, {
        let run = run.clone();
        move || run(chain)
    });
    let e = r.expect_err("the chain must be refused");
    assert!(
        e.contains("query too complex") && e.contains("UNION/INTERSECT/EXCEPT"),
        "{e}"
    );

    // 34 nested `NOT (` (the parser backtracked for 38 s): refused at once.
    let nots = format!(
        "SELECT 1 WHERE {}true{}",
        "NOT (".repeat(34),
        ")".repeat(34)
    );
    let t = Instant::now();
    let e = run(nots).expect_err("nested NOT must be refused");
    assert!(e.contains("nesting depth of `NOT (`"), "{e}"); // `NOT (`, `IN (` and `EXISTS (`
    assert!(t.elapsed() < BYSTANDER_BOUND);

    // Unbounded memory: stopped by the per-query memory share (or the statement timeout),
    // while the bystander keeps getting answers.
    let r = while_running(&mut up, &good, {
        let run = run.clone();
        move || run("SELECT count(DISTINCT value) FROM generate_series(1, 4000000000)".into())
    });
    let e = r.expect_err("the query must be stopped");
    assert!(
        e.contains("memory limit of 256 MiB") || e.contains("statement timeout"),
        "{e}"
    );

    // A CPU-bound query past the statement timeout.
    let t = Instant::now();
    let r = while_running(&mut up, &good, {
        let run = run.clone();
        move || run("SELECT sum(value * 2) FROM generate_series(1, 100000000000)".into())
    });
    let e = r.expect_err("the query must time out");
    assert!(
        e.contains("canceling statement due to statement timeout (4000 ms)"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(30));

    // `SET statement_timeout` lowers the limit for the session, never raises it.
    let e = run("SET statement_timeout = '1min'".into()).expect_err("above the limit");
    assert!(e.contains("at most 4000 ms"), "{e}");
    let e = run(
        "SET statement_timeout = 300; SELECT sum(value) FROM generate_series(1, 100000000000)"
            .into(),
    )
    .expect_err("lowered timeout");
    assert!(e.contains("statement timeout (300 ms)"), "{e}");
    assert_eq!(
        run("SET statement_timeout = '2s'; SHOW statement_timeout".into()).unwrap(),
        "SET\n2000ms"
    );
    up.still_up();
}

#[test]
fn a_cancel_request_stops_the_running_query() {
    let up = start_up();
    let evil = up.merchant("evil", &[]);
    let v = common::python_json(
        "pg_cancel.py",
        [&up.sql_port(), &evil.id, &evil.token],
        Duration::from_secs(120),
    );
    assert_eq!(v["sqlstate"], "57014", "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("canceling statement due to user request")),
        "{v}"
    );
    // Well before the 4 s statement timeout.
    assert!(v["seconds"].as_f64().is_some_and(|s| s < 3.5), "{v}");
}

#[test]
fn one_merchant_cannot_take_every_query_slot() {
    // Queries that outlast the 5 s admission wait, so the third one is refused.
    let mut up = Up::start(&[
        "--query-timeout-ms",
        "20000",
        "--query-concurrent-per-merchant",
        "2",
    ]);
    let evil = up.merchant("evil", &[]);
    let good = up.merchant("good", &[]);
    // Two slow queries hold the merchant's two slots; a third waits, then is refused.
    let slow = |m: &Merchant| {
        let (port, id, token) = (up.sql_port(), m.id.clone(), m.token.clone());
        std::thread::spawn(move || {
            psql(
                &port,
                &id,
                &token,
                "SELECT sum(value) FROM generate_series(1, 100000000000)",
            )
        })
    };
    let held = [slow(&evil), slow(&evil)];
    // Wait until both run: the third is refused once the admission wait has passed.
    let third = wait_for(
        Duration::from_secs(30),
        "a refused third query",
        || match up.psql(&evil, "SELECT 1") {
            Err(e) if e.contains("too many queries running") => Some(e),
            _ => None,
        },
    );
    assert!(third.contains("at most 2 at once"), "{third}");
    // Another merchant still gets answers, at once.
    let t = Instant::now();
    assert_eq!(up.psql(&good, "SELECT 1").expect("bystander"), "1");
    assert!(t.elapsed() < BYSTANDER_BOUND);
    for h in held {
        let e = h.join().expect("thread").expect_err("timed out");
        assert!(e.contains("statement timeout"), "{e}");
    }
    up.still_up();
}

#[test]
fn hostile_metrics_api_requests_get_400s_naming_the_limit() {
    let mut up = start_up();
    let evil = up.merchant("evil", &[]);
    let good = up.merchant("good", &[]);
    let api = up.api();
    // An `or` of 2,200 terms (under the 64 KB body limit): overflowed the planner's stack.
    let leaves: Vec<Value> = (0..2200)
        .map(|i| json!(["is", "event:page", [format!("/{i}")]]))
        .collect();
    let q = json!({"site_id": evil.id, "metrics": ["visitors"], "date_range": "7d",
                   "filters": [["or", leaves]]});
    assert!(q.to_string().len() < 64 * 1024);
    let (status, body) = while_running(&mut up, &good, {
        let (api, evil) = (api.clone(), evil.clone());
        move || api_query(&api, &evil, &q)
    });
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("more than 200 filters"), "{body}");

    // 38 nested `not`s (the planner backtracked for minutes).
    let mut deep = json!(["is", "event:page", ["/a"]]);
    for _ in 0..38 {
        deep = json!(["not", deep]);
    }
    let q =
        json!({"site_id": evil.id, "metrics": ["visitors"], "date_range": "7d", "filters": [deep]});
    let (status, body) = api_query(&api, &evil, &q);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("nested deeper than 8"), "{body}");

    // A date range far in the past is the caller's mistake: 400, not 503.
    let q = json!({"site_id": evil.id, "metrics": ["visitors"], "date_range": ["0001-01-01", "0001-12-31"]});
    let (status, body) = api_query(&api, &evil, &q);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("between 1970-01-01 and 2200-12-31"), "{body}");

    // Within the limits, a large balanced filter is answered.
    let leaves: Vec<Value> = (0..150)
        .map(|i| json!(["is", "event:page", [format!("/{i}")]]))
        .collect();
    let q = json!({"site_id": evil.id, "metrics": ["visitors", "pageviews"], "date_range": "7d",
                   "filters": [["or", leaves]]});
    let (status, body) = api_query(&api, &evil, &q);
    assert_eq!(status, 200, "{body}");
    up.still_up();
}

/// A TCP connection from `from` (another loopback address) to `to`.
fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(
        &format!("{from}:0")
            .parse::<SocketAddr>()
            .expect("addr")
            .into(),
    )?;
    socket.connect_timeout(&to.into(), Duration::from_secs(5))?;
    Ok(socket.into())
}

#[test]
fn idle_connections_cannot_lock_out_the_sql_port() {
    let mut up = start_up();
    let good = up.merchant("good", &[]);
    let sql: SocketAddr = format!("127.0.0.1:{}", up.sql_port())
        .parse()
        .expect("addr");
    // 1,000 idle, unauthenticated connections from one address (not the bystander's).
    let mut idle = Vec::new();
    let mut refused = 0;
    for _ in 0..1000 {
        match connect_from("127.0.0.2", sql) {
            Ok(s) => idle.push(s),
            Err(_) => refused += 1,
        }
    }
    // The server keeps 16 of them (its per-address cap) and answers the rest with an error.
    use std::io::Read;
    let mut answered = 0;
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut buf = [0u8; 256];
        if let Ok(n) = s.read(&mut buf) {
            if n > 0 && buf[0] == b'E' {
                answered += 1;
                assert!(String::from_utf8_lossy(&buf[..n]).contains("too many connections"));
            }
        }
    }
    assert!(
        answered + refused >= 1000 - 16,
        "{answered} refused with an error, {refused} not connected"
    );
    // The bystander (another address) logs in and queries meanwhile.
    assert_eq!(up.psql(&good, "SELECT 1").expect("bystander"), "1");
    let (status, _) = http(&up.edge_http(), "GET", "/healthz", None, b"");
    assert_eq!(status, 200);
    // The idle ones that were kept are closed after the startup timeout (10 s).
    let started = Instant::now();
    let mut open = 0;
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        // Closed: EOF or a reset. Still open: data without EOF, or the read timed out.
        let still_open = |r: std::io::Result<usize>| match r {
            Ok(0) => false,
            Ok(_) => true,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        };
        let first = s.read(&mut buf);
        let answered = matches!(first, Ok(n) if n > 0);
        // A refused one gets its error answer first, then EOF.
        if still_open(first) && (!answered || still_open(s.read(&mut buf))) {
            open += 1;
        }
    }
    assert_eq!(open, 0);
    assert!(started.elapsed() < Duration::from_secs(30));
    up.still_up();
}

#[test]
fn slow_http_clients_are_disconnected_and_files_are_private() {
    let mut up = start_up();
    // Slowloris on the metrics API: headers that never end are cut off (10 s header deadline).
    use std::io::{Read, Write};
    let api = up.api();
    let mut s = std::net::TcpStream::connect(api.trim_start_matches("http://")).expect("connect");
    s.write_all(b"POST /api/v2/query HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let t = Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "the server waited for ever"
    );
    up.still_up();

    // The data directory and what holds events or keys: private to the user.
    let data = up.data();
    let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("catalog.db")) & 0o077, 0);
    let cert = up.endpoints.edge_ca_cert.clone().expect("cert");
    for entry in std::fs::read_dir(cert.parent().expect("tls dir")).expect("tls dir") {
        let p = entry.expect("entry").path();
        assert_eq!(mode(&p) & 0o077, 0, "{}", p.display());
    }
    let mut stack = vec![data.join("warehouse")];
    let mut files = 0;
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("dir") {
            let p = entry.expect("entry").path();
            if p.is_dir() {
                assert_eq!(mode(&p), 0o700, "{}", p.display());
                stack.push(p);
            } else {
                assert_eq!(mode(&p) & 0o077, 0, "{}", p.display());
                files += 1;
            }
        }
    }
    assert!(files > 0, "the warehouse has metadata files");
}

#[test]
fn a_documented_10000_event_snowplow_batch_is_stored_whole() {
    let up = start_up();
    let m = up.merchant("big", &["--snowplow-app-id", "big-app"]);
    let data: Vec<Value> = (0..10_000)
        .map(|i| {
            json!({"e": "pv", "url": format!("https://b.ex/{}", i % 97), "aid": "big-app",
                   "eid": format!("e{i}"), "duid": format!("d{}", i % 500)})
        })
        .collect();
    let body =
        json!({"schema": "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4",
                      "data": data})
        .to_string();
    assert!(body.len() < 1 << 20, "the body fits the 1 MiB limit");
    let post = || {
        http_with(
            &up.edge_http(),
            "POST",
            "/com.snowplowanalytics.snowplow/tp2",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    };
    let r = post();
    assert_eq!(r.status, 200, "{}", r.body);
    // A retry of the same request is stored once (each envelope of the split has a stable id).
    let r = post();
    assert_eq!(r.status, 200, "{}", r.body);
    let q = format!(
        "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM raw_events WHERE merchant_id = '{}'",
        m.id
    );
    let row = wait_for(Duration::from_secs(60), "10,000 events stored", || {
        let rows = common::sql_in(&up.data(), &q);
        (rows.first()?["n"].as_i64()? >= 10_000).then(|| rows[0].clone())
    });
    assert_eq!(row["n"], 10_000, "{row}");
    assert_eq!(row["d"], 10_000, "{row}");
    // Over the wire as a merchant: `SELECT *` with the properties map, as JSON text.
    let rows = up
        .psql(&m, "SELECT properties FROM events LIMIT 1")
        .expect("select properties");
    assert!(rows.starts_with('{') && rows.ends_with('}'), "{rows}");
    up.psql(&m, "SELECT * FROM events LIMIT 3")
        .expect("select *");
}
