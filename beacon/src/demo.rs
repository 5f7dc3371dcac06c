//! Realistic demo traffic: visitors with sessions of several pageviews, referrers, UTM-tagged
//! landing pages, custom events and purchases. Deterministic for a given seed, so tests can
//! compute the exact expected results from the same events independently of Beacon.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use beacon_proto::event::PAGEVIEW;
use beacon_proto::Event;
use beacon_sdk::{Client, SdkError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const PAGES: &[&str] = &[
    "/",
    "/products",
    "/products/red-shirt",
    "/products/blue-jeans",
    "/products/green-hat",
    "/cart",
    "/checkout",
    "/blog/launch",
    "/blog/sizing-guide",
    "/about",
];
const REFERRERS: &[Option<&str>] = &[
    None,
    Some("https://www.google.com/"),
    Some("https://duckduckgo.com/"),
    Some("https://twitter.com/"),
    Some("https://news.ycombinator.com/"),
    Some("https://partner.example/reviews"),
];
const CAMPAIGNS: &[(&str, &str, &str)] = &[
    ("newsletter", "email", "spring_sale"),
    ("facebook", "cpc", "retargeting"),
    ("google", "cpc", "brand"),
];

/// Generates `n` events for one merchant site, `start_ms` onwards, spread over `span_ms`.
/// `visitor_pool` bounds the distinct visitors (so tests know roughly how many to expect).
pub fn generate(
    seed: u64,
    site: &str,
    n: usize,
    start_ms: i64,
    span_ms: i64,
    visitor_pool: u64,
) -> Vec<Event> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n);
    let mut seq = 0u64;
    while out.len() < n {
        let visitor = format!("v-{}-{}", seed, rng.random_range(0..visitor_pool.max(1)));
        let session = format!("s-{seed}-{}", seq);
        let mut ts = start_ms + rng.random_range(0..span_ms.max(1));
        let views = rng.random_range(1..=6);
        let referrer = REFERRERS[rng.random_range(0..REFERRERS.len())];
        let campaign =
            (rng.random_range(0..4) == 0).then(|| CAMPAIGNS[rng.random_range(0..CAMPAIGNS.len())]);
        let mut previous: Option<String> = None;
        for v in 0..views {
            if out.len() >= n {
                break;
            }
            let page = PAGES[rng.random_range(0..PAGES.len())];
            let mut url = format!("https://{site}{page}");
            if let (0, Some((src, med, name))) = (v, campaign) {
                url.push_str(&format!(
                    "?utm_source={src}&utm_medium={med}&utm_campaign={name}"
                ));
            }
            out.push(Event {
                event_id: format!("e-{seed}-{seq}"),
                merchant_id: String::new(),
                name: PAGEVIEW.into(),
                ts,
                received_at: 0,
                url: Some(url.clone()),
                // Later page views carry the previous page, as browsers send it.
                referrer: if v == 0 {
                    referrer.map(str::to_string)
                } else {
                    previous.clone()
                },
                title: Some(format!("{site} {page}")),
                visitor_id: Some(visitor.clone()),
                session_id: Some(session.clone()),
                user_id: None,
                revenue_micros: None,
                currency: None,
                properties: BTreeMap::new(),
            });
            previous = Some(url);
            seq += 1;
            ts += rng.random_range(5_000..90_000);
        }
        // Some sessions end in a custom event, some in a purchase.
        if out.len() < n && rng.random_range(0..5) == 0 {
            let purchase = rng.random_range(0..2) == 0;
            let mut properties = BTreeMap::new();
            properties.insert(
                "plan".to_string(),
                ["free", "pro", "team"][rng.random_range(0..3)].to_string(),
            );
            out.push(Event {
                event_id: format!("e-{seed}-{seq}"),
                merchant_id: String::new(),
                name: if purchase {
                    "purchase".into()
                } else {
                    "signup".into()
                },
                ts,
                received_at: 0,
                url: Some(format!("https://{site}/checkout")),
                referrer: None,
                title: None,
                visitor_id: Some(visitor),
                session_id: Some(session),
                user_id: None,
                // Whole cents, like real prices.
                revenue_micros: purchase.then(|| rng.random_range(100..50_000i64) * 10_000),
                currency: purchase.then(|| "EUR".to_string()),
                properties,
            });
            seq += 1;
        }
    }
    out
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SendReport {
    pub events: u64,
    pub batches: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    pub p50_batch_ms: f64,
    pub p99_batch_ms: f64,
}

/// Sends `events` over `client` in batches of `batch`, with up to `concurrency` acknowledged
/// batches in flight. Retries a batch (same event ids) on retryable errors.
pub async fn send_all(
    client: Arc<Client>,
    events: Vec<Event>,
    batch: usize,
    concurrency: usize,
) -> Result<SendReport, SdkError> {
    send_all_counted(client, events, batch, concurrency, None).await
}

/// As [`send_all`], advancing `progress` by each acknowledged batch's events.
pub async fn send_all_counted(
    client: Arc<Client>,
    events: Vec<Event>,
    batch: usize,
    concurrency: usize,
    progress: Option<indicatif::ProgressBar>,
) -> Result<SendReport, SdkError> {
    let started = Instant::now();
    let batches: Vec<Vec<Event>> = events.chunks(batch.max(1)).map(<[Event]>::to_vec).collect();
    let total = events.len() as u64;
    let queue = Arc::new(std::sync::Mutex::new(
        batches
            .into_iter()
            .collect::<std::collections::VecDeque<_>>(),
    ));
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, queue, sent) = (client.clone(), queue.clone(), sent.clone());
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                let Some(b) = next else { break };
                let t = Instant::now();
                let mut attempt = 0;
                // One id for all attempts: a retry of a batch that was stored is dropped.
                let batch_id = beacon_sdk::new_batch_id();
                loop {
                    match client.send_batch(&batch_id, &b).await {
                        Ok(_) => break,
                        Err(e) if e.is_retryable() && attempt < 5 => {
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                sent.fetch_add(1, Ordering::Relaxed);
                if let Some(p) = &progress {
                    p.inc(b.len() as u64);
                }
            }
            Ok::<_, SdkError>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(l)) => latencies.extend(l),
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(SdkError::Protocol(e.to_string())),
        }
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if latencies.is_empty() {
            0.0
        } else {
            latencies[((latencies.len() - 1) as f64 * p) as usize]
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    Ok(SendReport {
        events: total,
        batches: sent.load(Ordering::Relaxed),
        seconds,
        events_per_second: total as f64 / seconds.max(1e-9),
        p50_batch_ms: pct(0.5),
        p99_batch_ms: pct(0.99),
    })
}
