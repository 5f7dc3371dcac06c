//! All example plugins in one native binary, called directly as a host benchmark would,
//! chained like a merchant pipeline.

use beacon_plugin_sdk::batch::BatchFn;
use beacon_plugin_sdk::{Event, EventExt};

type Step = (BatchFn, &'static str);

const CHAIN: &[Step] = &[
    (
        beacon_plugin_botfilter::process,
        r#"{"rules": [{"property": "user_agent", "contains_any": ["bot"]}, {"property": "ip", "cidr": ["10.0.0.0/8"]}]}"#,
    ),
    (beacon_plugin_pii::process, ""),
    (beacon_plugin_utm::process, r#"{"strip_from_url": true}"#),
    (
        beacon_plugin_currency::process,
        r#"{"base": "EUR", "rates": {"USD": 0.92}}"#,
    ),
    (
        beacon_plugin_goals::process,
        r#"{"goals": [{"name": "thanks", "path": "/checkout/thanks"}, {"name": "big", "event": "purchase", "min_revenue_micros": 50000000}]}"#,
    ),
    (beacon_plugin_template::process, ""),
];

fn run(mut batch: Vec<Event>) -> Vec<Event> {
    for (process, config) in CHAIN {
        batch = beacon_plugin_sdk::batch::run(*process, config, batch).expect("plugin");
    }
    batch
}

fn input() -> Vec<Event> {
    vec![
        Event::new("e1", "pageview", 1_790_000_000_000)
            .with_url("https://shop.example/checkout/thanks/?utm_source=News&email=jo%40x.example")
            .with_property("user_agent", "Mozilla/5.0 Firefox/125.0")
            .with_property("ip", "203.0.113.9"),
        Event::new("e2", "pageview", 1_790_000_000_001)
            .with_url("https://shop.example/")
            .with_property("user_agent", "Googlebot/2.1"),
        Event::new("e3", "purchase", 1_790_000_000_002)
            .with_revenue(60_000_000, "USD")
            .with_property("note", "call +44 20 7946 0958"),
        Event::new("e4", "pageview", 1_790_000_000_003).with_property("ip", "10.1.2.3"),
    ]
}

#[test]
fn every_plugin_links_and_runs_natively_in_one_binary() {
    let out = run(input());
    let ids: Vec<&str> = out.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids, ["e1", "e3"], "bot and internal traffic dropped");

    let e1 = &out[0];
    assert_eq!(
        e1.url.as_deref(),
        Some("https://shop.example/checkout/thanks/?email=[email]")
    );
    assert_eq!(e1.property("utm_source"), Some("news"));
    assert_eq!(e1.property("goal"), Some("thanks"));
    assert_eq!(e1.property("tagged_by"), Some("template"));

    let e3 = &out[1];
    assert_eq!(e3.revenue_micros, Some(55_200_000));
    assert_eq!(e3.currency.as_deref(), Some("EUR"));
    assert_eq!(e3.property("original_currency"), Some("USD"));
    assert_eq!(e3.property("note"), Some("call [phone]"));
    assert_eq!(e3.property("goal"), Some("big"));
}

#[test]
fn the_chain_is_deterministic() {
    assert_eq!(run(input()), run(input()));
}
