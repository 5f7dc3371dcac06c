//! The HTTP collectors with real third-party clients, enrichment, status discipline,
//! retries without duplicates, rate limits and CORS.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{http_with, venv_python, wait_for, Cluster};
use serde_json::Value;

fn geoip() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../edge-node/testdata/GeoIP2-City-Test.mmdb")
        .display()
        .to_string()
}

fn collector_cluster() -> (Cluster, String) {
    let c = Cluster::start_with_edge(false, &["--geoip", &geoip(), "--trust-forwarded-for"]);
    let http = c
        .endpoints
        .edge_http
        .clone()
        .expect("edge_http in endpoints.json");
    (c, http)
}

fn rows(c: &Cluster, merchant: &str, table: &str, n: i64) -> Vec<Value> {
    let q = format!("SELECT * FROM {table} WHERE merchant_id = '{merchant}' ORDER BY ts, name");
    wait_for(
        Duration::from_secs(60),
        &format!("{n} rows in {table}"),
        || {
            let r = c.sql(&q);
            (r.len() as i64 >= n).then_some(r)
        },
    )
}

fn prop<'a>(row: &'a Value, key: &str) -> Option<&'a str> {
    // Maps come back from SQL as [{"key": k, "value": v}] or {k: v} depending on the writer.
    let p = &row["properties"];
    if let Some(obj) = p.as_object() {
        return obj.get(key).and_then(Value::as_str);
    }
    p.as_array()?
        .iter()
        .find(|kv| kv["key"] == key)
        .and_then(|kv| kv["value"].as_str())
}

fn find(rows: &[Value], pred: impl Fn(&Value) -> bool) -> &Value {
    rows.iter()
        .find(|r| pred(r))
        .unwrap_or_else(|| panic!("no such row in {rows:#?}"))
}

#[test]
fn real_trackers_arrive_enriched() {
    let (c, http) = collector_cluster();
    let (m, _) = c.merchant_with(
        "shop",
        &[
            "--snowplow-app-id",
            "shop-1",
            "--ga4",
            "G-TEST123:SECRET123",
            "--domain",
            "www.Shop.example",
        ],
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/python/trackers.py");
    let out = Command::new(venv_python())
        .arg(&script)
        .arg(&http)
        .output()
        .expect("run trackers.py");
    assert!(
        out.status.success(),
        "trackers.py failed: {}\n{}\nedge log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        c.log("edge")
    );
    let sent: Value = serde_json::from_slice(out.stdout.trim_ascii()).expect("script JSON");
    assert_eq!(sent["plausible_cors"], "https://shop.example");

    // Snowplow 3 (POST) + 2 (GET), GA4 2, plausible-events 2, hand-made Plausible 1.
    let raw = rows(&c, &m, "raw_events", 10);
    assert_eq!(raw.len(), 10, "{raw:#?}");

    // Snowplow POST, base64 off: page view with its context, the tracker's subject.
    let pv = find(&raw, |r| r["url"] == "https://shop.example/post/p/1");
    assert_eq!(pv["name"], "pageview");
    assert_eq!(pv["title"], "Product 1");
    assert_eq!(pv["referrer"], "https://www.google.com/");
    assert_eq!(pv["user_id"], "user-42");
    assert_eq!(prop(pv, "merchant.tier"), Some("gold"));
    // The tracker's `ua` field, not the request's python-requests agent, is the user's.
    assert_eq!(prop(pv, "$browser"), Some("Chrome"));
    assert_eq!(prop(pv, "$device"), Some("Desktop"));
    assert_eq!(prop(pv, "$bot"), None);
    let se = find(&raw, |r| r["name"] == "add-to-basket");
    assert_eq!(prop(se, "category"), Some("checkout"));
    assert_eq!(prop(se, "value"), Some("2.5"));
    for method in ["post", "get"] {
        let buy = find(&raw, |r| {
            prop(r, "order_id") == Some(&format!("o-{method}"))
        });
        assert_eq!(buy["name"], "purchase");
        assert_eq!(prop(buy, "total"), Some("19.99"));
        assert_eq!(
            prop(buy, "schema"),
            Some("iglu:com.acme/purchase/jsonschema/1-0-0")
        );
    }
    // GET, base64 on: the context came through cx.
    let get_pv = find(&raw, |r| r["url"] == "https://shop.example/get/p/1");
    assert_eq!(prop(get_pv, "merchant.tier"), Some("gold"));

    // GA4 Measurement Protocol.
    let ga_pv = find(&raw, |r| r["url"] == "https://shop.example/ga/landing");
    assert_eq!(ga_pv["name"], "pageview");
    assert_eq!(ga_pv["visitor_id"], "555.1700000000");
    assert_eq!(ga_pv["user_id"], "user-ga");
    let ga_buy = find(&raw, |r| prop(r, "transaction_id") == Some("t-ga"));
    assert_eq!(ga_buy["revenue_micros"], 9_500_000);
    assert_eq!(ga_buy["currency"], "EUR");

    // plausible-events: its own app:// URLs; visitor id is cookieless (no id sent).
    let pl = find(&raw, |r| r["name"] == "signup");
    assert_eq!(prop(pl, "plan"), Some("pro"));
    let cookieless = pl["visitor_id"].as_str().expect("cookieless visitor id");
    assert!(
        cookieless.starts_with('c') && cookieless.len() == 25,
        "{cookieless}"
    );
    // Geo from X-Forwarded-For (trusted here): 89.160.20.112 is Linköping in the test db.
    assert_eq!(prop(pl, "$country"), Some("SE"));
    assert_eq!(prop(pl, "$city"), Some("Linköping"));
    let home = find(&raw, |r| r["url"] == "app://localhost/pl/home");
    assert_eq!(
        home["visitor_id"], pl["visitor_id"],
        "same visitor, same day: same id"
    );

    // Plausible short keys from a phone behind a proxy.
    let phone = find(&raw, |r| r["name"] == "Purchase");
    assert_eq!(phone["revenue_micros"], 19_990_000);
    assert_eq!(phone["referrer"], "https://news.example/");
    assert_eq!(prop(phone, "$country"), Some("GB"));
    assert_eq!(prop(phone, "$region"), Some("ENG"));
    assert_eq!(prop(phone, "$city"), Some("London"));
    assert_eq!(prop(phone, "$device"), Some("Mobile"));
    assert_eq!(prop(phone, "$os"), Some("iOS"));
    assert_ne!(phone["visitor_id"], pl["visitor_id"]);
    // The IP itself is stored nowhere.
    let dump = serde_json::to_string(&raw).unwrap();
    for ip in ["81.2.69.142", "89.160.20.112", "127.0.0.1"] {
        assert!(!dump.contains(ip), "{ip} stored");
    }
    // Derived dimensions downstream use the enrichment.
    let ev = c.sql(&format!(
        "SELECT country, device, source FROM events WHERE merchant_id = '{m}' AND name = 'Purchase'"
    ));
    assert_eq!(ev[0]["country"], "GB");
    assert_eq!(ev[0]["device"], "Mobile");
}

#[test]
fn status_discipline_retries_bots_limits_and_cors() {
    let (c, http) = collector_cluster();
    let (m, _) = c.merchant_with(
        "shop",
        &[
            "--snowplow-app-id",
            "app-a",
            "--ga4",
            "G-A:right-secret",
            "--domain",
            "a.example",
        ],
    );
    let (limited, _) = c.merchant_with(
        "limited",
        &[
            "--domain",
            "limited.example",
            "--rate-limit",
            "1",
            "--burst",
            "3",
        ],
    );
    let post = |path: &str, headers: &[(&str, &str)], body: &[u8]| {
        http_with(&http, "POST", path, headers, body)
    };
    const TP2: &str = "/com.snowplowanalytics.snowplow/tp2";
    let batch = |aid: &str, eid: &str| {
        serde_json::json!({"schema": "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4",
            "data": [{"e": "pv", "url": "https://a.example/", "aid": aid, "eid": eid, "duid": "d-1",
                      "dtm": "1795673352516", "stm": "1795673352516"}]})
        .to_string()
    };

    // A retried batch (same body, same event ids) is stored once.
    let body = batch("app-a", "11111111-1111-4111-8111-111111111111");
    assert_eq!(post(TP2, &[], body.as_bytes()).status, 200);
    assert_eq!(post(TP2, &[], body.as_bytes()).status, 200);
    // Trackers re-stamp the sent time (`stm`) on a retry: still the same events.
    let restamped = body.replacen("\"stm\":\"1795673352516\"", "\"stm\":\"1795673359999\"", 1);
    assert_ne!(restamped, body);
    assert_eq!(post(TP2, &[], restamped.as_bytes()).status, 200);

    // Input that will never be valid: 4xx with a reason, nothing stored.
    let r = post(TP2, &[], batch("nobody", "e-x").as_bytes());
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        r.body.contains("unknown Snowplow app id `nobody`"),
        "{}",
        r.body
    );
    let r = post(TP2, &[], b"{\"data\": [");
    assert_eq!(r.status, 400);
    assert!(r.body.contains("not JSON"), "{}", r.body);
    let r = post(TP2, &[], &vec![b' '; 2 << 20]);
    assert_eq!(r.status, 413);
    let mp = serde_json::json!({"client_id": "1.2", "events": [{"name": "page_view", "params": {"page_location": "https://a.example/mp"}}]}).to_string();
    let r = post(
        "/mp/collect?measurement_id=G-A&api_secret=wrong",
        &[],
        mp.as_bytes(),
    );
    assert_eq!(r.status, 401, "{}", r.body);
    let r = post(
        "/mp/collect?measurement_id=G-NONE&api_secret=x",
        &[],
        mp.as_bytes(),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    let many: Vec<Value> = (0..26)
        .map(|_| serde_json::json!({"name": "click"}))
        .collect();
    let too_many = serde_json::json!({"client_id": "1.2", "events": many}).to_string();
    let r = post(
        "/mp/collect?measurement_id=G-A&api_secret=right-secret",
        &[],
        too_many.as_bytes(),
    );
    assert_eq!(r.status, 400);
    assert!(r.body.contains("over Google's limit of 25"), "{}", r.body);
    // Google's validation endpoint shape; stores nothing.
    let r = post(
        "/debug/mp/collect?measurement_id=G-A&api_secret=x",
        &[],
        too_many.as_bytes(),
    );
    assert_eq!(r.status, 200);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["validationMessages"][0]["fieldPath"], "events");
    assert_eq!(
        post(
            "/mp/collect?measurement_id=G-A&api_secret=right-secret",
            &[],
            mp.as_bytes()
        )
        .status,
        204
    );
    // gtag hits: query + two body lines.
    let r = post(
        "/g/collect?v=2&tid=G-A&cid=9.9&dl=https%3A%2F%2Fa.example%2Fg",
        &[],
        b"en=page_view\nen=scroll&epn.percent=90",
    );
    assert_eq!(r.status, 204, "{}", r.body);

    // A bot is kept in raw_events, with its name, and not counted in events.
    let pl = |ua: &str, u: &str| {
        let body = format!(r#"{{"n":"pageview","u":"{u}","d":"a.example"}}"#);
        post(
            "/api/event",
            &[("User-Agent", ua), ("Content-Type", "text/plain")],
            body.as_bytes(),
        )
    };
    assert_eq!(
        pl(
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            "https://a.example/bot"
        )
        .status,
        202
    );

    // CORS as browser trackers need it.
    let r = http_with(
        &http,
        "OPTIONS",
        TP2,
        &[
            ("Origin", "https://a.example"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "content-type"),
        ],
        b"",
    );
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://a.example")
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("content-type")
    );
    let r = http_with(
        &http,
        "GET",
        "/i?e=pv&aid=app-a&eid=22222222-2222-4222-8222-222222222222&url=https%3A%2F%2Fa.example%2Fpixel",
        &[("Origin", "https://a.example")],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("image/gif"));
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://a.example")
    );

    // Rate limit: a burst of 3, then 429 with Retry-After; other merchants unaffected.
    let lim = |n: usize| {
        let body = format!(r#"{{"n":"pageview","u":"https://limited.example/{n}"}}"#);
        post(
            "/api/event",
            &[(
                "User-Agent",
                "Mozilla/5.0 (X11; Linux x86_64) Firefox/121.0",
            )],
            body.as_bytes(),
        )
    };
    for n in 0..3 {
        assert_eq!(lim(n).status, 202);
    }
    let r = lim(3);
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(r.body.contains("rate limit of 1 events/s"), "{}", r.body);
    assert_eq!(
        pl(
            "Mozilla/5.0 (X11; Linux x86_64) Firefox/121.0",
            "https://a.example/ok"
        )
        .status,
        202
    );

    // Operators change a merchant without a restart: lift the limit, add a site; an identity
    // another merchant owns is refused.
    c.cli(&[
        "merchant",
        "update",
        "--merchant",
        &limited,
        "--default-limits",
    ]);
    wait_for(Duration::from_secs(10), "limit lifted at the edge", || {
        (lim(4).status == 202).then_some(())
    });
    c.cli(&[
        "merchant",
        "update",
        "--merchant",
        &m,
        "--domain",
        "b.example",
    ]);
    wait_for(
        Duration::from_secs(10),
        "new domain known at the edge",
        || {
            let body = br#"{"n":"pageview","u":"https://b.example/new"}"#;
            (post(
                "/api/event",
                &[(
                    "User-Agent",
                    "Mozilla/5.0 (X11; Linux x86_64) Firefox/121.0",
                )],
                body,
            )
            .status
                == 202)
                .then_some(())
        },
    );
    let refused = std::process::Command::new(common::beacon_bin())
        .args([
            "merchant",
            "update",
            "--merchant",
            &limited,
            "--domain",
            "a.example",
        ])
        .env("BEACON_DATA_DIR", c.data_dir())
        .env("BEACON_NATS_URL", c.nats.url())
        .output()
        .expect("run beacon");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("already belongs to merchant"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // Stored: tp2 once (not twice), the MP page view, 2 gtag hits, the bot, the pixel, /ok,
    // and the new domain's page view.
    let raw = rows(&c, &m, "raw_events", 8);
    let urls: Vec<&str> = raw.iter().filter_map(|r| r["url"].as_str()).collect();
    assert_eq!(
        urls.iter().filter(|u| **u == "https://a.example/").count(),
        1,
        "{urls:?}"
    );
    assert_eq!(raw.len(), 8, "{urls:?}");
    let bot = find(&raw, |r| r["url"] == "https://a.example/bot");
    assert_eq!(prop(bot, "$bot"), Some("Googlebot"));
    let scroll = find(&raw, |r| r["name"] == "scroll");
    assert_eq!(prop(scroll, "percent"), Some("90"));
    assert_eq!(scroll["visitor_id"], "9.9");
    let counted = rows(&c, &m, "events", 7);
    assert!(counted.iter().all(|r| r["url"] != "https://a.example/bot"));
    assert_eq!(counted.len(), 7);
    assert_eq!(rows(&c, &limited, "raw_events", 4).len(), 4);
}

/// `$` properties are the edge's enrichment: from a write key (QUIC) or any HTTP tracker
/// they are moved out of the namespace (`$bot` -> `bot`) on every listener, from the
/// merchant's server key they are kept. A Snowplow relay's per-event `ip` places each user
/// only at an edge that trusts forwarded addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_properties_and_relayed_addresses() {
    let (c, http) = collector_cluster();
    let m = c.merchant_json(
        "shop",
        &[
            "--snowplow-app-id",
            "relay-1",
            "--domain",
            "res.example",
            "--ga4",
            "G-RES:res-secret",
        ],
    );
    let id = m["id"].as_str().expect("id").to_string();
    let (write_key, server_key) = (
        m["write_key"].as_str().expect("write key"),
        m["server_key"].as_str().expect("server key"),
    );
    assert_ne!(write_key, server_key);

    let now = beacon_edge::now_ms();
    let forged = |event_id: &str, props: &[(&str, &str)]| beacon_proto::Event {
        event_id: event_id.into(),
        name: "pageview".into(),
        ts: now,
        url: Some(format!("https://res.example/{event_id}")),
        visitor_id: Some(format!("v-{event_id}")),
        properties: props
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    c.send(
        write_key,
        &[forged(
            "q-client",
            &[("$bot", "forged"), ("$country", "XX"), ("plan", "pro")],
        )],
    )
    .await;
    c.send(
        server_key,
        &[forged(
            "q-server",
            &[("$country", "DE"), ("$device", "Tablet")],
        )],
    )
    .await;
    // A server-side relay on QUIC: each event names its user's address and user agent.
    let relayed = |event_id: &str, ip: &str| {
        let mut e = forged(
            event_id,
            &[
                ("$ip", ip),
                (
                    "$user_agent",
                    "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0 Safari/537.36",
                ),
            ],
        );
        e.visitor_id = None;
        e
    };
    let answer = c
        .client(server_key)
        .await
        .expect("client")
        .send(&[
            relayed("q-gb", "81.2.69.142"),
            relayed("q-se", "89.160.20.112"),
            relayed("q-nowhere", "nowhere"),
        ])
        .await
        .expect("sent");
    assert_eq!(answer.accepted, 2, "{answer:?}");
    assert_eq!(answer.rejected.len(), 1, "{answer:?}");
    assert!(
        answer.rejected[0]
            .reason
            .contains("`$ip` is `nowhere`, not an IP address"),
        "{answer:?}"
    );

    // Plausible with `$` props of its own, from behind the trusted proxy (London).
    let plausible = br#"{"name":"pageview","url":"https://res.example/pl","domain":"res.example","props":{"$bot":"forged","$city":"Nowhere"}}"#;
    let r = http_with(
        &http,
        "POST",
        "/api/event",
        &[
            ("Content-Type", "application/json"),
            (
                "User-Agent",
                "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0 Safari/537.36",
            ),
            ("X-Forwarded-For", "81.2.69.142"),
        ],
        plausible,
    );
    assert_eq!(r.status, 202, "{}", r.body);
    // GA4 Measurement Protocol (a server-side sender, but with a tracker's credentials),
    // giving its user's address.
    let ga = br#"{"client_id":"555.1","ip_override":"89.160.20.112","events":[{"name":"page_view","params":{"page_location":"https://res.example/ga","$bot":"forged","$country":"XX"}}]}"#;
    let r = http_with(
        &http,
        "POST",
        "/mp/collect?measurement_id=G-RES&api_secret=res-secret",
        &[("Content-Type", "application/json")],
        ga,
    );
    assert_eq!(r.status, 204, "{}", r.body);

    // A relay sends two users' events in one request, each with its user's address.
    let relay = |suffix: &str| {
        let ev = |eid: &str, ip: &str, page: &str| {
            serde_json::json!({"e": "pv", "aid": "relay-1", "eid": format!("{eid}{suffix}"), "ip": ip,
                "ua": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0 Safari/537.36",
                "url": format!("https://res.example/{page}{suffix}"), "dtm": now.to_string()})
        };
        serde_json::to_vec(&serde_json::json!({
            "schema": "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4",
            "data": [ev("sp-gb", "81.2.69.142", "gb"), ev("sp-se", "89.160.20.112", "se")]
        }))
        .expect("json")
    };
    const TP2: &str = "/com.snowplowanalytics.snowplow/tp2";
    let json = [("Content-Type", "application/json")];
    let r = http_with(&http, "POST", TP2, &json, &relay(""));
    assert_eq!(r.status, 200, "{}", r.body);
    // The same relay at an edge that does not trust forwarded addresses.
    let (_untrusting, ends) = c.spawn_edge_with("edge-untrusting", &["--geoip", &geoip()]);
    let http2 = ends.edge_http.expect("edge_http of the second edge");
    let r = http_with(&http2, "POST", TP2, &json, &relay("-untrusted"));
    assert_eq!(r.status, 200, "{}", r.body);

    let raw = rows(&c, &id, "raw_events", 10);
    assert_eq!(raw.len(), 10, "{raw:#?}");
    let by_id = |eid: &str| find(&raw, |r| r["event_id"] == eid);

    let client = by_id("q-client");
    assert_eq!(prop(client, "$bot"), None, "a write key cannot mark a bot");
    assert_eq!(prop(client, "$country"), None);
    assert_eq!(prop(client, "bot"), Some("forged"));
    assert_eq!(prop(client, "country"), Some("XX"));
    assert_eq!(prop(client, "plan"), Some("pro"));
    let server = by_id("q-server");
    assert_eq!(prop(server, "$country"), Some("DE"), "the server key may");
    assert_eq!(prop(server, "$device"), Some("Tablet"));
    let (q_gb, q_se) = (by_id("q-gb"), by_id("q-se"));
    assert_eq!(prop(q_gb, "$country"), Some("GB"), "{q_gb}");
    assert_eq!(prop(q_se, "$country"), Some("SE"));
    assert_eq!(prop(q_gb, "$browser"), Some("Chrome"));
    assert!(q_gb["visitor_id"].is_string() && q_se["visitor_id"].is_string());
    assert_ne!(q_gb["visitor_id"], q_se["visitor_id"]);
    for e in [q_gb, q_se] {
        assert_eq!(prop(e, "$ip"), None, "addresses are not stored");
        assert_eq!(prop(e, "$user_agent"), None);
    }
    let pl = find(&raw, |r| r["url"] == "https://res.example/pl");
    assert_eq!(prop(pl, "$bot"), None);
    assert_eq!(prop(pl, "bot"), Some("forged"));
    assert_eq!(
        prop(pl, "$city"),
        Some("London"),
        "enrichment, not the client"
    );
    let ga = find(&raw, |r| r["url"] == "https://res.example/ga");
    assert_eq!(prop(ga, "$bot"), None);
    assert_eq!(prop(ga, "bot"), Some("forged"));
    assert_eq!(prop(ga, "country"), Some("XX"));
    // The server's `ip_override` (trusted here) placed its user, not the forged value.
    assert_eq!(prop(ga, "$country"), Some("SE"));

    // Trusted: each relayed user has their own place and cookieless id.
    let (gb, se) = (by_id("sp-gb"), by_id("sp-se"));
    assert_eq!(prop(gb, "$country"), Some("GB"));
    assert_eq!(prop(se, "$country"), Some("SE"));
    assert_ne!(gb["visitor_id"], se["visitor_id"]);
    // Untrusted: the payload's addresses are ignored, so both are the relay itself.
    let (gb2, se2) = (by_id("sp-gb-untrusted"), by_id("sp-se-untrusted"));
    assert_eq!(prop(gb2, "$country"), None);
    assert_eq!(prop(se2, "$country"), None);
    assert_eq!(gb2["visitor_id"], se2["visitor_id"]);
    let dump = serde_json::to_string(&raw).expect("json");
    assert!(!dump.contains("81.2.69.142") && !dump.contains("89.160.20.112"));

    // The moves are counted per listener (the HTTP decoders already dropped their `$`).
    let scraped = common::http(&c.status_url("edge"), "GET", "/metrics", None, b"").1;
    assert_eq!(
        common::metric(
            &scraped,
            "beacon_edge_reserved_properties_moved_total{listener=\"quic\"}"
        ),
        2.0,
        "{scraped}"
    );

    // Downstream, the forged bot counts as a visit and the server's country is used.
    let ev = c.sql(&format!(
        "SELECT event_id, country FROM events WHERE merchant_id = '{id}' AND event_id IN ('q-client', 'q-server') ORDER BY event_id"
    ));
    assert_eq!(ev.len(), 2, "{ev:#?}");
    assert_eq!(ev[1]["country"], "DE");
}
