//! Enrichment at the edge, before plugins, recorded in the raw event (so re-processing sees
//! the same input and needs neither the IP, the geo database nor the salt of that day):
//!
//! - geo: `$country`, `$region`, `$city` from a MaxMind-format City database (optional:
//!   without one there is no geo, not an error);
//! - device: `$device` (Desktop, Mobile, Tablet), `$browser`, `$os` from the user agent;
//! - bots: `$bot` set to the crawler's name; ingest keeps such events in `raw_events` only,
//!   so they are stored but not counted;
//! - cookieless visitor id when the tracker sent none: `sha256(salt, merchant, ip, ua)`,
//!   with a salt shared by all edges and replaced every UTC day (Plausible's scheme): a
//!   visitor is recognisable within a day and never across days.
//!
//! The IP address itself is never stored: it is used for the lookups and the hash, then
//! dropped. What the sender set itself is kept: a `visitor_id` from any tracker, `$`
//! properties only from a server-key sender (others' are moved out of the namespace before
//! this runs, [`crate::reserved`]).

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::kv;
use beacon_proto::Event;
use sha2::{Digest, Sha256};

use crate::device::{self, UserAgent};
use crate::publish::Outcomes;

/// KV bucket of daily salts, `YYYYMMDD` -> 32 random bytes. Entries expire after two days:
/// once a day's salt is gone, that day's visitor ids can no longer be recomputed.
pub use beacon_proto::stores::SALTS_BUCKET;

#[derive(Debug, thiserror::Error)]
pub enum EnrichError {
    #[error("cannot open the geo database {path}: {reason}")]
    Geo { path: String, reason: String },
    #[error("daily salt unavailable: {0}")]
    Salt(String),
}

/// The request's client, as far as the edge can tell.
#[derive(Debug, Clone, Default)]
pub struct ClientCtx {
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
}

/// One UTC day's salt.
#[derive(Clone)]
pub struct Salt {
    day: i64,
    bytes: Arc<[u8]>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Geo {
    pub country: Option<String>,
    pub region: Option<String>,
    pub city: Option<String>,
}

/// A MaxMind-format City database (GeoLite2/GeoIP2 City, or DB-IP's compatible files).
pub struct GeoDb(maxminddb::Reader<Vec<u8>>);

impl GeoDb {
    pub fn open(path: &Path) -> Result<Self, EnrichError> {
        maxminddb::Reader::open_readfile(path)
            .map(GeoDb)
            .map_err(|e| EnrichError::Geo {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
    }

    pub fn lookup(&self, ip: IpAddr) -> Option<Geo> {
        let city = self
            .0
            .lookup(ip)
            .ok()?
            .decode::<maxminddb::geoip2::City>()
            .ok()??;
        let sub = city.subdivisions.first();
        Some(Geo {
            country: city.country.iso_code.map(str::to_owned),
            region: sub.and_then(|s| s.iso_code).map(str::to_owned),
            city: city.city.names.english.map(str::to_owned),
        })
    }
}

pub struct Enricher {
    geo: Option<GeoDb>,
    salts: kv::Store,
    current: Mutex<Option<Salt>>,
    /// Creating a day's salt is a bus write: its outcome feeds the edge's readiness.
    writes: Arc<Outcomes>,
}

const DAY_MS: i64 = 86_400_000;

impl Enricher {
    pub async fn open(
        js: &async_nats::jetstream::Context,
        geoip: Option<&Path>,
        writes: Arc<Outcomes>,
    ) -> Result<Self, EnrichError> {
        let geo = geoip.map(GeoDb::open).transpose()?;
        let salts = beacon_proto::stores::open_kv(js, SALTS_BUCKET)
            .await
            .map_err(|e| EnrichError::Salt(e.to_string()))?;
        Ok(Self {
            geo,
            salts,
            current: Mutex::new(None),
            writes,
        })
    }

    pub fn has_geo(&self) -> bool {
        self.geo.is_some()
    }

    /// The salt of the UTC day of `now_ms`, created by whichever edge asks first.
    pub async fn salt(&self, now_ms: i64) -> Result<Salt, EnrichError> {
        let day = now_ms.div_euclid(DAY_MS);
        if let Some(s) = self.current.lock().ok().and_then(|c| c.clone()) {
            if s.day == day {
                return Ok(s);
            }
        }
        let key = format!("d{day}");
        let err = |e: &dyn std::fmt::Display| EnrichError::Salt(e.to_string());
        let bytes = match self.salts.get(&key).await.map_err(|e| err(&e))? {
            Some(v) => v.to_vec(),
            None => {
                let fresh: [u8; 32] = rand::random();
                match self.salts.create(&key, fresh.to_vec().into()).await {
                    Ok(_) => {
                        self.writes.ok();
                        fresh.to_vec()
                    }
                    // Another edge created it first: use theirs, so ids agree fleet-wide.
                    Err(create) => match self.salts.get(&key).await.map_err(|e| err(&e))? {
                        Some(v) => v.to_vec(),
                        None => {
                            let e = format!("cannot store the day's salt: {create}");
                            self.writes.failed(&e);
                            return Err(EnrichError::Salt(e));
                        }
                    },
                }
            }
        };
        let salt = Salt {
            day,
            bytes: bytes.into(),
        };
        if let Ok(mut c) = self.current.lock() {
            *c = Some(salt.clone());
        }
        Ok(salt)
    }

    pub fn geo(&self, ip: IpAddr) -> Option<Geo> {
        self.geo.as_ref()?.lookup(ip)
    }

    /// The serving region of the client's country, for `locate`.
    pub fn region_of(&self, ip: Option<IpAddr>) -> Option<&'static str> {
        let country = self.geo(ip?)?.country?;
        crate::locate::region_of_country(&country)
    }

    /// Fills in what a batch's events lack from each event's client address and user agent
    /// (the request's, or ones the payload carried per event). A batch mostly has one
    /// client: the geo lookup runs once per run of events from the same address, and a
    /// user agent is parsed once per run of events that share it.
    pub async fn enrich_batch<'a>(
        &self,
        merchant: &str,
        events: impl IntoIterator<Item = (&'a mut Event, Option<&'a str>, Option<IpAddr>)>,
    ) -> Result<(), EnrichError> {
        let salt = self.salt(crate::now_ms()).await?;
        let mut located: Option<(IpAddr, Option<Geo>)> = None;
        let mut parsed: Option<(&str, UserAgent)> = None;
        for (e, user_agent, ip) in events {
            if located.as_ref().map(|(at, _)| *at) != ip {
                located = ip.map(|ip| (ip, self.geo(ip)));
            }
            let geo = located.as_ref().and_then(|(_, g)| g.as_ref());
            let ua = user_agent.map(|text| match &parsed {
                Some((t, info)) if *t == text => info.clone(),
                _ => {
                    let info = device::parse(text);
                    parsed = Some((text, info.clone()));
                    info
                }
            });
            let props = &mut e.properties;
            if let Some(g) = geo.filter(|_| !props.contains_key("$country")) {
                for (k, v) in [
                    ("$country", &g.country),
                    ("$region", &g.region),
                    ("$city", &g.city),
                ] {
                    if let Some(v) = v {
                        props.insert(k.to_string(), v.clone());
                    }
                }
            }
            if let Some(ua) = ua {
                if let Some(bot) = ua.bot {
                    props.entry("$bot".into()).or_insert(bot);
                }
                for (k, v) in [
                    ("$device", ua.device),
                    ("$browser", ua.browser),
                    ("$os", ua.os),
                ] {
                    if let Some(v) = v {
                        props.entry(k.to_string()).or_insert(v);
                    }
                }
            }
            if e.visitor_id.is_none() {
                if let (Some(ip), Some(ua)) = (ip, user_agent) {
                    e.visitor_id = Some(cookieless_id(&salt, merchant, ip, ua));
                }
            }
        }
        Ok(())
    }
}

/// Plausible's scheme: the same visitor of the same site on the same day gets the same id;
/// nothing links it to the IP without that day's salt, which expires.
pub fn cookieless_id(salt: &Salt, merchant: &str, ip: IpAddr, user_agent: &str) -> String {
    let mut h = Sha256::new();
    // As 16 bytes (IPv4 mapped), not as text: no allocation per event.
    let ip = match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    for part in [
        &salt.bytes[..],
        merchant.as_bytes(),
        &ip,
        user_agent.as_bytes(),
    ] {
        h.update((part.len() as u32).to_be_bytes());
        h.update(part);
    }
    format!("c{}", hex::encode(&h.finalize()[..12]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn salt(day: i64, b: u8) -> Salt {
        Salt {
            day,
            bytes: vec![b; 32].into(),
        }
    }

    #[test]
    fn cookieless_ids_rotate_with_the_salt_and_separate_merchants() {
        let ip: IpAddr = "81.2.69.142".parse().unwrap();
        let ua = "Mozilla/5.0";
        let a = cookieless_id(&salt(1, 1), "m1", ip, ua);
        assert_eq!(a, cookieless_id(&salt(1, 1), "m1", ip, ua));
        assert_ne!(a, cookieless_id(&salt(2, 2), "m1", ip, ua));
        assert_ne!(a, cookieless_id(&salt(1, 1), "m2", ip, ua));
        assert_ne!(
            a,
            cookieless_id(&salt(1, 1), "m1", "81.2.69.143".parse().unwrap(), ua)
        );
        assert!(!a.contains("81.2"));
    }

    #[test]
    fn geo_from_the_test_database() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/GeoIP2-City-Test.mmdb");
        let db = GeoDb::open(&path).unwrap();
        let g = db.lookup("81.2.69.142".parse().unwrap()).unwrap();
        assert_eq!(g.country.as_deref(), Some("GB"));
        assert_eq!(g.region.as_deref(), Some("ENG"));
        assert_eq!(g.city.as_deref(), Some("London"));
        let se = db.lookup("89.160.20.112".parse().unwrap()).unwrap();
        assert_eq!(se.city.as_deref(), Some("Linköping"));
        assert_eq!(db.lookup("127.0.0.1".parse().unwrap()), None);
        assert!(GeoDb::open(Path::new("/nonexistent.mmdb")).is_err());
    }
}
