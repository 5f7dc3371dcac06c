//! Realistic multi-merchant traffic with its ground truth, for tests and benchmarks.
//!
//! Merchants get Zipf-distributed shares of the events (a few big sites, a long tail).
//! Each site has visitors with a stable country, region, city, device, browser and OS (the
//! reserved `$country`... properties the edge's enrichment records), who make visits of one
//! to eight page views a few seconds to minutes apart. A visit lands from a source (direct,
//! search engines, social networks, a referring blog, UTM-tagged newsletter and ad
//! campaigns) and later page views carry the previous page as referrer, as browsers send
//! them. Some visits sign up or buy (revenue in EUR or USD, whole cents); those events name
//! their goal in the `goal` property. A share of events is marked late: a test sends them
//! after the rest, into hours already rolled up.
//!
//! Every event comes with [`Truth`]: what the generator meant (the landing source, the page),
//! so tests compute expected metrics from the intent, not by re-running Beacon's code.

use std::collections::BTreeMap;

use beacon_proto::event::PAGEVIEW;
use beacon_proto::Event;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct Site {
    pub merchant_id: String,
    pub host: String,
}

/// `n` sites: merchant ids from `merchant_id(i)`, hosts `site<i>.example`.
pub fn sites(n: usize, merchant_id: impl Fn(usize) -> String) -> Vec<Site> {
    (0..n)
        .map(|i| Site {
            merchant_id: merchant_id(i),
            host: format!("site{i}.example"),
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct TrafficConfig {
    pub seed: u64,
    /// Total events over all sites (approximately: whole visits are generated).
    pub events: usize,
    /// First instant of the traffic, epoch ms.
    pub start_ms: i64,
    pub days: u32,
    /// Zipf exponent of the merchants' sizes.
    pub zipf_s: f64,
    /// Share of events marked late.
    pub late_share: f64,
}

/// What the generator intended for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truth {
    /// The page path.
    pub page: &'static str,
    /// (source, medium) of a landing page view; `None` for internal navigation and for
    /// events other than page views.
    pub landing: Option<(String, &'static str)>,
    pub goal: Option<&'static str>,
}

#[derive(Debug, Clone)]
pub struct Generated {
    pub event: Event,
    pub truth: Truth,
    /// Sent after everything else, into hours already rolled up.
    pub late: bool,
}

const PAGES: &[(&str, u32)] = &[
    ("/", 30),
    ("/products", 14),
    ("/products/red-shirt", 8),
    ("/products/blue-jeans", 6),
    ("/products/green-hat", 4),
    ("/cart", 6),
    ("/checkout", 3),
    ("/blog/launch", 5),
    ("/blog/sizing-guide", 4),
    ("/about", 3),
    ("/contact", 2),
    ("/pricing", 5),
];

/// (country, region, city, weight).
const PLACES: &[(&str, &str, &str, u32)] = &[
    ("US", "California", "San Francisco", 14),
    ("US", "New York", "New York", 12),
    ("DE", "Berlin", "Berlin", 10),
    ("DE", "Bavaria", "Munich", 6),
    ("GB", "England", "London", 10),
    ("FR", "Ile-de-France", "Paris", 7),
    ("IN", "Karnataka", "Bengaluru", 8),
    ("BR", "Sao Paulo", "Sao Paulo", 5),
    ("JP", "Tokyo", "Tokyo", 5),
    ("CA", "Ontario", "Toronto", 4),
];

/// (device, browser, os, weight).
const DEVICES: &[(&str, &str, &str, u32)] = &[
    ("Desktop", "Chrome", "Windows", 30),
    ("Desktop", "Edge", "Windows", 8),
    ("Desktop", "Safari", "macOS", 12),
    ("Desktop", "Firefox", "Linux", 4),
    ("Mobile", "Safari", "iOS", 22),
    ("Mobile", "Chrome", "Android", 20),
    ("Tablet", "Safari", "iOS", 4),
];

/// How a visit lands: (referrer, UTM query, source, medium, weight).
#[allow(clippy::type_complexity)]
const LANDINGS: &[(Option<&str>, Option<&str>, &str, &str, u32)] = &[
    (None, None, "Direct / None", "direct", 33),
    (
        Some("https://www.google.com/search?q=shop"),
        None,
        "Google",
        "search",
        20,
    ),
    (Some("https://www.google.de/"), None, "Google", "search", 5),
    (
        Some("https://www.bing.com/search?q=shop"),
        None,
        "Bing",
        "search",
        5,
    ),
    (
        Some("https://duckduckgo.com/"),
        None,
        "DuckDuckGo",
        "search",
        3,
    ),
    (
        Some("https://l.facebook.com/l.php?u=x"),
        None,
        "Facebook",
        "social",
        7,
    ),
    (Some("https://t.co/x1y2"), None, "Twitter", "social", 4),
    (
        Some("https://news.ycombinator.com/item?id=1"),
        None,
        "Hacker News",
        "social",
        2,
    ),
    (
        Some("https://blog.partner.example/best-shops"),
        None,
        "blog.partner.example",
        "referral",
        8,
    ),
    (
        Some("https://mail.google.com/"),
        Some("utm_source=newsletter&utm_medium=email&utm_campaign=spring_sale"),
        "newsletter",
        "email",
        8,
    ),
    (
        Some("https://www.google.com/"),
        Some("utm_source=google&utm_medium=cpc&utm_campaign=brand"),
        "google",
        "cpc",
        5,
    ),
];

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T], weight: impl Fn(&T) -> u32) -> &'a T {
    let total: u32 = items.iter().map(&weight).sum();
    let mut x = rng.random_range(0..total.max(1));
    for item in items {
        let w = weight(item);
        if x < w {
            return item;
        }
        x -= w;
    }
    &items[0]
}

/// The events each site gets: Zipf shares of `total`, at least one visit's worth each.
pub fn zipf_sizes(sites: usize, total: usize, s: f64) -> Vec<usize> {
    let weights: Vec<f64> = (0..sites).map(|i| 1.0 / ((i + 1) as f64).powf(s)).collect();
    let sum: f64 = weights.iter().sum();
    weights
        .iter()
        .map(|w| ((total as f64) * w / sum).round().max(5.0) as usize)
        .collect()
}

/// Generates traffic for `sites` (ordered: the first is the biggest).
pub fn generate(config: &TrafficConfig, sites: &[Site]) -> Vec<Generated> {
    generate_part(config, sites, 0..sites.len())
}

/// The traffic of `sites[part]` only, exactly as [`generate`] makes it for them: large
/// data sets are generated and written a slice of sites at a time.
pub fn generate_part(
    config: &TrafficConfig,
    sites: &[Site],
    part: std::ops::Range<usize>,
) -> Vec<Generated> {
    let sizes = zipf_sizes(sites.len(), config.events, config.zipf_s);
    let mut out = Vec::new();
    for i in part.filter(|i| *i < sites.len()) {
        let mut rng = StdRng::seed_from_u64(config.seed.wrapping_mul(1_000_003) ^ i as u64);
        site_traffic(&mut rng, config, i, &sites[i], sizes[i], &mut out);
    }
    out
}

fn site_traffic(
    rng: &mut StdRng,
    config: &TrafficConfig,
    index: usize,
    site: &Site,
    size: usize,
    out: &mut Vec<Generated>,
) {
    let span_ms = i64::from(config.days.max(1)) * 86_400_000;
    let visitors = (size / 6).max(3) as u64;
    let mut made = 0;
    let mut visit_no = 0u64;
    while made < size {
        visit_no += 1;
        let visitor = rng.random_range(0..visitors);
        // A visitor's place and device are stable: derive them from the visitor.
        let mut vrng = StdRng::seed_from_u64(config.seed ^ ((index as u64) << 32) ^ visitor);
        let (country, region, city, _) = *pick(&mut vrng, PLACES, |p| p.3);
        let (device, browser, os, _) = *pick(&mut vrng, DEVICES, |d| d.3);
        let visitor_id = format!("v{index}-{visitor}");
        // Most trackers keep a session id; the rest are sessionised by visitor.
        let session_id = (rng.random_range(0..10) < 7).then(|| format!("s{index}-{visit_no}"));
        let landing = pick(rng, LANDINGS, |l| l.4);
        let views = 1 + (rng.random_range(0..100u32) * rng.random_range(0..100u32)) / 1300;
        let late = rng.random_bool(config.late_share.clamp(0.0, 1.0));
        let mut ts = config.start_ms + rng.random_range(0..span_ms - 3_600_000);
        let mut previous: Option<String> = None;
        let props = |extra: &[(&str, &str)]| {
            let mut p = BTreeMap::from([
                ("$country".to_string(), country.to_string()),
                ("$region".to_string(), region.to_string()),
                ("$city".to_string(), city.to_string()),
                ("$device".to_string(), device.to_string()),
                ("$browser".to_string(), browser.to_string()),
                ("$os".to_string(), os.to_string()),
            ]);
            for (k, v) in extra {
                p.insert(k.to_string(), v.to_string());
            }
            p
        };
        let mut page = "/";
        for v in 0..views {
            page = pick(rng, PAGES, |p| p.1).0;
            let mut url = format!("https://{}{page}", site.host);
            let referrer = match (&previous, v) {
                (_, 0) => {
                    if let Some(q) = landing.1 {
                        url.push('?');
                        url.push_str(q);
                    }
                    landing.0.map(str::to_string)
                }
                (p, _) => p.clone(),
            };
            out.push(Generated {
                event: Event {
                    event_id: format!("g{}-{index}-{visit_no}-{v}", config.seed),
                    merchant_id: site.merchant_id.clone(),
                    name: PAGEVIEW.into(),
                    ts,
                    received_at: 0,
                    url: Some(url.clone()),
                    referrer,
                    title: Some(format!("{} {page}", site.host)),
                    visitor_id: Some(visitor_id.clone()),
                    session_id: session_id.clone(),
                    user_id: None,
                    revenue_micros: None,
                    currency: None,
                    properties: props(&[]),
                },
                truth: Truth {
                    page,
                    landing: (v == 0).then(|| (landing.2.to_string(), landing.3)),
                    goal: None,
                },
                late,
            });
            previous = Some(url);
            made += 1;
            ts += rng.random_range(5_000..240_000);
        }
        // Some visits convert.
        let roll = rng.random_range(0..100);
        let conversion = match roll {
            0..=5 => Some(("purchase", "Purchase")),
            6..=17 => Some(("signup", "Signup")),
            _ => None,
        };
        if let Some((name, goal)) = conversion {
            let plan = ["free", "pro", "team"][rng.random_range(0..3)];
            let purchase = name == "purchase";
            let currency = ["EUR", "USD"][rng.random_range(0..2)];
            out.push(Generated {
                event: Event {
                    event_id: format!("g{}-{index}-{visit_no}-c", config.seed),
                    merchant_id: site.merchant_id.clone(),
                    name: name.into(),
                    ts: ts + 1_000,
                    received_at: 0,
                    url: Some(format!("https://{}{page}", site.host)),
                    referrer: None,
                    title: None,
                    visitor_id: Some(visitor_id.clone()),
                    session_id: session_id.clone(),
                    user_id: None,
                    revenue_micros: purchase.then(|| rng.random_range(100..50_000i64) * 10_000),
                    currency: purchase.then(|| currency.to_string()),
                    properties: props(&[("plan", plan), ("goal", goal)]),
                },
                truth: Truth {
                    page,
                    landing: None,
                    goal: Some(goal),
                },
                late,
            });
            made += 1;
        }
    }
}

/// The events of [`generate`] alone, in time order (the order edges receive them).
pub fn events_in_time_order(config: &TrafficConfig, sites: &[Site]) -> Vec<Event> {
    let mut events: Vec<Event> = generate(config, sites)
        .into_iter()
        .map(|g| g.event)
        .collect();
    events.sort_by_key(|e| e.ts);
    events
}

/// `events` as they reach the bus: per merchant, batches of `per_envelope` in time order
/// (one edge batch each, received when its first event happened: every event of a batch gets
/// that receive time, as the edge sets it), the merchants' batches interleaved by a stable
/// shuffle, as many edges publish them.
pub fn envelopes(events: Vec<Event>, per_envelope: usize) -> Vec<beacon_proto::Envelope> {
    let mut by_merchant: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    for e in events {
        by_merchant
            .entry(e.merchant_id.clone())
            .or_default()
            .push(e);
    }
    let mut out = Vec::new();
    for (m, events) in by_merchant {
        for (i, chunk) in events.chunks(per_envelope.max(1)).enumerate() {
            let received_at = chunk[0].ts;
            out.push(beacon_proto::Envelope {
                v: beacon_proto::envelope::ENVELOPE_VERSION,
                batch_id: format!("{m}:{i}"),
                merchant_id: m.clone(),
                edge_id: "bench".into(),
                received_at,
                pipeline: None,
                raw: chunk
                    .iter()
                    .map(|e| Event {
                        received_at,
                        ..e.clone()
                    })
                    .collect(),
                processed: None,
                canary: None,
                failures: Vec::new(),
                shares: Vec::new(),
            });
        }
    }
    let n = out.len().max(1);
    let mut order: Vec<(usize, beacon_proto::Envelope)> = out.into_iter().enumerate().collect();
    order.sort_by_key(|(i, _)| (i * 2_654_435_761usize) % n);
    order.into_iter().map(|(_, e)| e).collect()
}

/// Commits `events` to the `events` table as ingest would have (one envelope per merchant,
/// JetStream sequence `seq` recorded on the snapshot), without a bus: for tests and benches
/// that need a warehouse's contents quickly.
#[cfg(feature = "full")]
pub async fn commit_events(
    wh: &beacon_warehouse::Warehouse,
    seq: u64,
    events: Vec<Event>,
) -> Result<(), beacon_warehouse::WarehouseError> {
    use beacon_ingest::convert::{events_batch, Received};
    use beacon_warehouse::tables::{arrow_schema, SEQ_PROPERTY};
    let kind = beacon_warehouse::TableKind::Events;
    let schema = arrow_schema(&wh.table(kind).await?)?;
    let received: Vec<Received> = envelopes(events, usize::MAX)
        .into_iter()
        .map(|e| Received::new(seq, e))
        .collect();
    let received: Vec<&Received> = received.iter().collect();
    let batch = events_batch(&schema, &received, true)?;
    wh.append(
        kind,
        batch,
        [(SEQ_PROPERTY.to_string(), seq.to_string())].into(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TrafficConfig {
        TrafficConfig {
            seed: 5,
            events: 20_000,
            start_ms: 1_790_000_000_000,
            days: 10,
            zipf_s: 1.1,
            late_share: 0.02,
        }
    }

    fn sites(n: usize) -> Vec<Site> {
        super::sites(n, |i| format!("m_{i}"))
    }

    #[test]
    fn deterministic_zipf_and_realistic() {
        let a = generate(&config(), &sites(20));
        let b = generate(&config(), &sites(20));
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).all(|(x, y)| x.event == y.event));
        let count = |m: &str| a.iter().filter(|g| g.event.merchant_id == m).count();
        // Zipf: the biggest site dwarfs the tail, every site has traffic.
        assert!(
            count("m_0") > 8 * count("m_19"),
            "{} {}",
            count("m_0"),
            count("m_19")
        );
        assert!(count("m_19") >= 5);
        let late = a.iter().filter(|g| g.late).count() as f64 / a.len() as f64;
        assert!((0.005..0.05).contains(&late), "{late}");
        let ids: std::collections::HashSet<_> = a.iter().map(|g| &g.event.event_id).collect();
        assert_eq!(ids.len(), a.len());
        // Later page views of a visit carry the previous page as referrer.
        let internal = a
            .iter()
            .filter(|g| g.event.name == PAGEVIEW && g.truth.landing.is_none())
            .all(|g| {
                g.event
                    .referrer
                    .as_deref()
                    .is_some_and(|r| r.contains(".example/"))
            });
        assert!(internal);
        assert!(a.iter().any(|g| g.event.revenue_micros.is_some()));
    }
}
