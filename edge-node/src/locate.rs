//! Nearest edge: live edges (from the edges KV bucket, where each refreshes its entry and a
//! dead one expires) ordered by distance from the caller's region, then by load.
//!
//! Regions are a fixed table of cloud-style names with a representative location; distance
//! is great-circle. The caller's region is what it says (`?region=`), else the region of its
//! country (from the geo database), else unknown: then edges are ordered by load alone.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use beacon_proto::bus::{EdgeStatus, LocatedEdge, Location};
use futures::StreamExt;

/// Live edges are read from the bucket at most this often (per edge process).
const CACHE_FOR: Duration = Duration::from_millis(500);

/// Live edges as last read, and when.
type Cached = Option<(Instant, Vec<EdgeStatus>)>;

/// Answers `locate` from the edges bucket.
#[derive(Clone)]
pub struct Locator {
    store: kv::Store,
    cache: Arc<Mutex<Cached>>,
}

impl Locator {
    pub fn new(store: kv::Store) -> Self {
        Self {
            store,
            cache: Arc::default(),
        }
    }

    /// Live edges, nearest to `region` first.
    pub async fn locate(&self, region: Option<&str>) -> Result<Location, String> {
        let cached = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.clone())
            .filter(|(at, _)| at.elapsed() < CACHE_FOR);
        let mut edges = match cached {
            Some((_, e)) => e,
            None => {
                let e = self.read().await?;
                if let Ok(mut c) = self.cache.lock() {
                    *c = Some((Instant::now(), e.clone()));
                }
                e
            }
        };
        order(&mut edges, region);
        Ok(Location {
            region: region.map(str::to_string),
            edges: edges
                .into_iter()
                .map(|e| LocatedEdge {
                    edge_id: e.edge_id,
                    region: e.region,
                    quic: e.addr,
                    http: e.http_addr,
                    in_flight: e.in_flight,
                })
                .collect(),
        })
    }

    async fn read(&self) -> Result<Vec<EdgeStatus>, String> {
        let err = |e: &dyn std::fmt::Display| format!("edge registry: {e}");
        let mut keys = self.store.keys().await.map_err(|e| err(&e))?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| err(&e))?;
            if let Some(v) = self.store.get(&key).await.map_err(|e| err(&e))? {
                if let Ok(s) = serde_json::from_slice::<EdgeStatus>(&v) {
                    out.push(s);
                }
            }
        }
        Ok(out)
    }
}

/// Region name, latitude, longitude.
pub const REGIONS: &[(&str, f64, f64)] = &[
    ("us-east", 38.9, -77.0),
    ("us-west", 37.4, -122.1),
    ("us-central", 41.9, -93.1),
    ("ca-central", 45.5, -73.6),
    ("sa-east", -23.5, -46.6),
    ("eu-west", 53.3, -6.3),
    ("eu-central", 50.1, 8.7),
    ("eu-north", 59.3, 18.1),
    ("eu-south", 45.5, 9.2),
    ("me-central", 25.2, 55.3),
    ("af-south", -33.9, 18.4),
    ("ap-south", 19.1, 72.9),
    ("ap-southeast", 1.35, 103.8),
    ("ap-northeast", 35.7, 139.7),
    ("ap-east", 22.3, 114.2),
    ("au-southeast", -33.9, 151.2),
];

fn coords(region: &str) -> Option<(f64, f64)> {
    REGIONS
        .iter()
        .find(|(r, _, _)| *r == region)
        .map(|&(_, lat, lon)| (lat, lon))
}

pub fn is_known_region(region: &str) -> bool {
    coords(region).is_some()
}

/// Kilometres between two regions; `None` when either is unknown.
pub fn distance_km(a: &str, b: &str) -> Option<f64> {
    let ((lat1, lon1), (lat2, lon2)) = (coords(a)?, coords(b)?);
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let h = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    Some(2.0 * 6371.0 * h.sqrt().asin())
}

/// The region serving a country (ISO 3166-1 alpha-2), by continent-level proximity.
pub fn region_of_country(iso: &str) -> Option<&'static str> {
    let r = match iso.to_ascii_uppercase().as_str() {
        "US" | "MX" | "CU" | "DO" | "PR" | "GT" | "HN" | "SV" | "NI" | "CR" | "PA" | "JM" => {
            "us-east"
        }
        "CA" => "ca-central",
        "BR" | "AR" | "CL" | "CO" | "PE" | "VE" | "EC" | "BO" | "PY" | "UY" => "sa-east",
        "GB" | "IE" | "IS" | "PT" | "ES" | "FR" | "BE" | "NL" | "LU" => "eu-west",
        "DE" | "AT" | "CH" | "PL" | "CZ" | "SK" | "HU" | "SI" | "HR" | "RS" | "RO" | "BG"
        | "UA" | "BY" | "LT" | "LV" | "EE" | "RU" => "eu-central",
        "SE" | "NO" | "FI" | "DK" => "eu-north",
        "IT" | "GR" | "MT" | "CY" | "AL" | "MK" | "ME" | "BA" | "TR" => "eu-south",
        "AE" | "SA" | "QA" | "KW" | "BH" | "OM" | "IL" | "JO" | "EG" | "IR" | "IQ" => "me-central",
        "ZA" | "NG" | "KE" | "GH" | "MA" | "TN" | "ET" | "TZ" | "UG" => "af-south",
        "IN" | "PK" | "BD" | "LK" | "NP" => "ap-south",
        "SG" | "MY" | "ID" | "TH" | "VN" | "PH" => "ap-southeast",
        "JP" | "KR" => "ap-northeast",
        "CN" | "HK" | "TW" | "MO" => "ap-east",
        "AU" | "NZ" => "au-southeast",
        _ => return None,
    };
    Some(r)
}

/// Orders live edges for a caller in `from` (nearest first; equal distance: least loaded,
/// then id). Edges without an address for the caller's protocol are left out by the caller.
pub fn order(edges: &mut [EdgeStatus], from: Option<&str>) {
    let key = |e: &EdgeStatus| {
        let d = from
            .and_then(|f| distance_km(f, &e.region))
            .unwrap_or(f64::MAX);
        // Whole kilometres: two edges in one region tie on distance and split by load.
        (d.round() as u64, e.in_flight, e.edge_id.clone())
    };
    edges.sort_by_cached_key(key);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(id: &str, region: &str, in_flight: usize) -> EdgeStatus {
        EdgeStatus {
            edge_id: id.into(),
            addr: format!("{id}:1"),
            pipelines: Default::default(),
            updated_at: 0,
            region: region.into(),
            http_addr: None,
            in_flight,
        }
    }

    #[test]
    fn nearest_first_then_least_loaded() {
        let mut edges = vec![
            edge("us1", "us-east", 0),
            edge("eu1", "eu-west", 9),
            edge("eu2", "eu-west", 1),
            edge("ap1", "ap-northeast", 0),
            edge("xx", "moon", 0),
        ];
        order(&mut edges, Some("eu-central"));
        let ids: Vec<&str> = edges.iter().map(|e| e.edge_id.as_str()).collect();
        assert_eq!(ids, ["eu2", "eu1", "us1", "ap1", "xx"]);
        order(&mut edges, Some("ap-east"));
        assert_eq!(edges[0].edge_id, "ap1");
        order(&mut edges, None);
        assert_eq!(edges[0].edge_id, "ap1", "unknown caller: by load, then id");
    }

    #[test]
    fn distances_are_plausible() {
        let d = distance_km("eu-west", "us-east").unwrap();
        assert!((5000.0..6000.0).contains(&d), "{d}");
        assert_eq!(distance_km("eu-west", "eu-west"), Some(0.0));
        assert_eq!(region_of_country("de"), Some("eu-central"));
        assert!(REGIONS.iter().all(|(r, _, _)| is_known_region(r)));
    }
}
