//! SQL over the Postgres wire protocol with real clients (`psql`, psycopg 3 over the
//! extended protocol): an admin sees every merchant; a merchant, logged in with its read
//! token, sees its own rows and nothing else, whatever SQL it writes; the endpoint is
//! read-only; wrong credentials are refused.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use common::{wait_for, Cluster};

const ADMIN: &str = "ops";
const ADMIN_SECRET: &str = "s3cret-admin-token-0123456789";

struct Psql {
    port: String,
}

impl Psql {
    /// Runs one statement; Ok(unaligned rows) or Err(stderr).
    fn run(&self, user: &str, password: &str, sql: &str) -> Result<String, String> {
        common::psql(&self.port, user, password, sql)
    }

    fn value(&self, user: &str, password: &str, sql: &str) -> String {
        self.run(user, password, sql)
            .unwrap_or_else(|e| panic!("{user}: {sql}: {e}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_endpoint_keeps_merchants_apart_and_is_read_only() {
    let cluster = Cluster::start(true);
    let now = beacon_edge::now_ms();
    let mut merchants = Vec::new();
    for (i, name) in ["sql-a", "sql-b"].iter().enumerate() {
        let (id, key) = cluster.merchant(name);
        let n = 1_000 + 500 * i;
        let events = beacon::demo::generate(
            90 + i as u64,
            "sql.example",
            n,
            now - 7_200_000,
            7_200_000,
            200,
        );
        cluster.send(&key, &events).await;
        let token = cluster.read_token(&id);
        merchants.push((id, key, token, n));
    }
    cluster.wait_rolled_up(2_500, Duration::from_secs(60));
    let _api = cluster.spawn(
        "api",
        &[
            "api",
            "--listen",
            "127.0.0.1:0",
            "--sql-listen",
            "127.0.0.1:0",
            "--admin-tokens",
            &format!("{ADMIN}:{ADMIN_SECRET}"),
        ],
    );
    let addr = wait_for(Duration::from_secs(30), "SQL address", || {
        cluster.log("api").lines().find_map(|l| {
            l.split("SQL (Postgres wire): ")
                .nth(1)
                .map(|a| a.trim().to_string())
        })
    });
    let port = addr.rsplit(':').next().expect("port").to_string();
    let psql = Psql { port: port.clone() };
    let (a, a_key, a_token, a_n) = &merchants[0];
    let (b, _, b_token, _) = &merchants[1];

    // The admin sees everything.
    assert_eq!(
        psql.value(ADMIN, ADMIN_SECRET, "SELECT count(*) FROM events"),
        "2500"
    );
    assert_eq!(
        psql.value(
            ADMIN,
            ADMIN_SECRET,
            "SELECT count(DISTINCT merchant_id) FROM raw_events"
        ),
        "2"
    );

    // A merchant sees its own rows, in every table and view, however it asks.
    let mine = |sql: &str| psql.value(a, a_token, sql);
    let n = a_n.to_string();
    assert_eq!(mine("SELECT count(*) FROM events"), n);
    assert_eq!(mine("SELECT DISTINCT merchant_id FROM events"), *a);
    for sql in [
        "SELECT count(*) FROM analytics.events",
        "SELECT count(*) FROM beacon.analytics.raw_events",
        "SELECT count(*) FROM events WHERE merchant_id <> '' OR true",
        "SELECT count(*) FROM events e JOIN raw_events r ON e.event_id = r.event_id",
        "SELECT count(*) FROM (SELECT * FROM events UNION ALL SELECT * FROM events) x WHERE merchant_id = merchant_id",
        "SELECT CAST(sum(events) AS BIGINT) FROM rollups",
        "SELECT CAST(sum(events) AS BIGINT) FROM breakdowns_hourly WHERE dimension = 'event:name'",
    ] {
        let want = if sql.contains("UNION ALL") {
            (2 * a_n).to_string()
        } else {
            n.clone()
        };
        assert_eq!(mine(sql), want, "{sql}");
    }
    for sql in [
        format!("SELECT count(*) FROM events WHERE merchant_id = '{b}'"),
        format!("SELECT count(*) FROM sessions WHERE merchant_id = '{b}'"),
        format!("SELECT count(*) FROM failed_events WHERE merchant_id = '{b}'"),
        format!("SELECT count(*) FROM events WHERE event_id IN (SELECT event_id FROM raw_events WHERE merchant_id = '{b}')"),
        format!("SELECT count(*) FROM daily_metrics WHERE merchant_id = '{b}'"),
    ] {
        assert_eq!(mine(&sql), "0", "{sql}");
    }
    // The catalog names the tables, and only the filtered ones are reachable.
    let tables = mine(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'analytics' ORDER BY 1",
    );
    assert!(
        tables.contains("events") && tables.contains("rollups_hourly"),
        "{tables}"
    );
    // Time travel is not a way around it.
    if let Ok(v) = psql.run(
        a,
        a_token,
        "SELECT count(*) FROM events FOR SYSTEM_TIME AS OF '2000-01-01'",
    ) {
        assert!(v.parse::<usize>().is_ok_and(|v| v <= *a_n), "{v}");
    }

    // Read-only for everyone: no external tables over server files, no COPY, no settings.
    for (user, password) in [(a.as_str(), a_token.as_str()), (ADMIN, ADMIN_SECRET)] {
        for sql in [
            "CREATE EXTERNAL TABLE leak STORED AS CSV LOCATION '/etc/passwd'",
            "COPY (SELECT 1) TO '/tmp/beacon-copy-test.csv'",
            "CREATE VIEW v AS SELECT 1",
            "SET datafusion.execution.batch_size = 1",
        ] {
            let err = psql.run(user, password, sql).expect_err(sql);
            // The Postgres dialect does not even parse CREATE EXTERNAL TABLE; the rest reach
            // the read-only check.
            assert!(
                err.contains("read-only") || sql.contains("EXTERNAL"),
                "{user} {sql}: {err}"
            );
        }
        assert!(psql
            .run(user, password, "SELECT count(*) FROM leak")
            .is_err());
    }
    assert!(!std::path::Path::new("/tmp/beacon-copy-test.csv").exists());

    // Wrong credentials: another merchant's token, a write key, an unknown user, a bad secret.
    for (user, password) in [
        (a.as_str(), b_token.as_str()),
        (a.as_str(), a_key.as_str()),
        ("m_nobody", a_token.as_str()),
        (ADMIN, "not-the-secret-0000000000"),
        (b.as_str(), ADMIN_SECRET),
    ] {
        let err = psql.run(user, password, "SELECT 1").expect_err(user);
        assert!(
            err.to_lowercase()
                .contains("password authentication failed"),
            "{user}: {err}"
        );
    }

    // A driver on the extended protocol (server-side parameters) gets the same isolation.
    let got = common::python_json(
        "pg_extended.py",
        [
            "127.0.0.1",
            port.as_str(),
            a.as_str(),
            a_token.as_str(),
            b.as_str(),
        ],
        Duration::from_secs(120),
    );
    let pageviews = psql.value(
        ADMIN,
        ADMIN_SECRET,
        &format!("SELECT count(*) FROM events WHERE merchant_id = '{a}' AND name = 'pageview'"),
    );
    assert_eq!(got["pageviews"].to_string(), pageviews, "{got}");
    assert_eq!(got["other_merchant_rows"], 0, "{got}");
    assert_eq!(got["merchants_visible"], 1, "{got}");
}
