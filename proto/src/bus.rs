//! Names on the NATS bus, in one place so the edge, ingest and operators agree.

/// JetStream stream holding batch envelopes.
pub const EVENTS_STREAM: &str = "BEACON_EVENTS";
/// Envelopes are published on `beacon.events.<merchant-id>`.
pub const EVENTS_SUBJECT_PREFIX: &str = "beacon.events";
pub const EVENTS_SUBJECTS: &str = "beacon.events.>";
/// How long an events stream keeps batches: raw events live on in Iceberg, so the stream
/// only has to outlast an ingest or hub outage.
pub const EVENTS_MAX_AGE_SECS: u64 = 7 * 24 * 3600;
/// A batch id (`Nats-Msg-Id`) seen again within this window is stored once.
pub const EVENTS_DUPLICATE_WINDOW_SECS: u64 = 120;
/// The servers of a NATS URL setting: one URL, or a cluster's nodes separated by commas
/// (`nats://h1:4222,nats://h2:4222`); a client connects to any and fails over to the others.
pub fn servers(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// The environment variable naming the CA certificate (PEM) that a NATS server's TLS
/// certificate must chain to: a generated topology's `tls/ca.pem`. Set, every connection a
/// role makes requires TLS and trusts that CA (and only it).
pub const NATS_CA_ENV: &str = "BEACON_NATS_CA";

/// Connection options for a NATS URL setting, with the CA of [`NATS_CA_ENV`] if set.
#[cfg(feature = "nats")]
pub fn options(url: &str) -> async_nats::ConnectOptions {
    let ca = std::env::var_os(NATS_CA_ENV).filter(|v| !v.is_empty());
    options_with_ca(url, ca.as_deref().map(std::path::Path::new))
}

/// Connects to the NATS URL setting `url` (one or more comma-separated servers, credentials
/// and TLS as [`options`] reads them) as `name`, the connection name servers list.
#[cfg(feature = "nats")]
pub async fn connect(
    url: &NatsUrl,
    name: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let url = url.expose();
    options(url).name(name).connect(addresses(url)).await
}

/// Connection options for a NATS URL setting: a user and password written into its URLs
/// (`nats://user:password@host:4222`, as a secured topology gives them out) become the
/// connection's, since the client does not take them from the address by itself; with
/// `ca`, TLS is required and the server's certificate must chain to it.
#[cfg(feature = "nats")]
pub fn options_with_ca(url: &str, ca: Option<&std::path::Path>) -> async_nats::ConnectOptions {
    let credentials = servers(url).into_iter().find_map(|s| {
        let addr: async_nats::ServerAddr = s.parse().ok()?;
        Some((addr.username()?.to_string(), addr.password()?.to_string()))
    });
    let options = match credentials {
        Some((user, password)) => {
            async_nats::ConnectOptions::with_user_and_password(user, password)
        }
        None => async_nats::ConnectOptions::new(),
    };
    // rustls cannot choose between the two crypto providers the dependency tree enables,
    // and any connection may turn out to need TLS (a `tls://` URL, a server that requires
    // it): ring, the one QUIC uses. (An error: one is installed already.)
    let _ = rustls::crypto::ring::default_provider().install_default();
    match ca {
        Some(ca) => options
            .add_root_certificates(ca.to_path_buf())
            .require_tls(true),
        None => options,
    }
}

/// A NATS URL (or a comma-separated list of them) that may carry passwords. It shows
/// itself redacted ([`redact`]) in `Debug` and `Display`, so whatever holds one (a
/// configuration, an error) can derive `Debug` and be logged; [`NatsUrl::expose`] gives the
/// URL itself, for connecting.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsUrl(String);

impl NatsUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its passwords: only for connecting, never for a log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for NatsUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl From<&str> for NatsUrl {
    fn from(url: &str) -> Self {
        Self(url.to_string())
    }
}

impl std::fmt::Debug for NatsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&redact(&self.0), f)
    }
}

impl std::fmt::Display for NatsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

/// `url` with every password in it replaced by `***`, for logs and error messages.
pub fn redact(url: &str) -> String {
    servers(url)
        .into_iter()
        .map(|s| match userinfo(s) {
            // `user:password@`: the user stays; a lone `token@` is all secret.
            (scheme, Some(userinfo), host) => {
                let user = match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:***"),
                    None => "***".to_string(),
                };
                format!("{scheme}{user}@{host}")
            }
            (_, None, _) => s.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The servers of `url` without the credentials written into them, for the client to
/// connect to: async-nats logs the address it dials at debug level, password and all
/// (`url::Url`'s `Debug`). It never logs in with them anyway: [`options_with_ca`] takes them
/// from the URL into the connection's options.
pub fn addresses(url: &str) -> Vec<String> {
    servers(url)
        .into_iter()
        .map(|s| match userinfo(s) {
            (scheme, Some(_), host) => format!("{scheme}{host}"),
            (_, None, _) => s.to_string(),
        })
        .collect()
}

/// One server's URL as (scheme with `://`, the userinfo before `@` if any, the rest).
fn userinfo(server: &str) -> (&str, Option<&str>, &str) {
    // Without a scheme the client reads `nats://` in front, credentials included.
    let (scheme, rest) = match server.find("://") {
        Some(i) => server.split_at(i + 3),
        None => ("", server),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => (scheme, Some(&rest[..at]), &rest[at + 1..]),
        None => (scheme, None, rest),
    }
}

/// The hub's JetStream domain in the leaf topology (docs/OPERATIONS.md); an edge region's
/// leaf has the domain `edge-<region>`.
pub const HUB_DOMAIN: &str = "hub";
/// Durable consumer name of core-ingest (its partition 0).
pub const INGEST_CONSUMER: &str = "beacon-ingest";
/// KV bucket: which ingest process holds which stream partition (entries expire unless
/// renewed: a dead process's partitions are taken over).
pub const INGEST_LEASES_BUCKET: &str = "beacon_ingest_leases";

/// Ingest's stream partitions (docs/ARCHITECTURE.md, "Ingest partitions"). With `count > 1`
/// the stream that ingest reads maps `beacon.events.<merchant>` to
/// `beacon.events.<k>.<merchant>` ([`partition_transform`], nats-server's deterministic
/// `partition` function of the merchant id), so all of a merchant's batches land in one
/// partition. Partition 0 also reads the unmapped subjects, so batches stored before the
/// stream was partitioned are still ingested, in order, under the same watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition {
    pub index: u32,
    pub count: u32,
}

impl Partition {
    /// The whole stream, unsplit.
    pub const WHOLE: Partition = Partition { index: 0, count: 1 };

    /// The durable consumer that reads this partition for the owner whose lease has
    /// revision `generation`. A name per owner, not one per partition: a process that lost
    /// the partition without noticing (frozen, cut off) must not pull from, or acknowledge
    /// on, its successor's consumer (an ack-all there would move the successor's ack floor
    /// past messages it has not committed).
    pub fn consumer(&self, generation: u64) -> String {
        format!("{}_{generation}", ingest_consumer(self.index))
    }

    /// Whether `name` is one of this partition's consumers (any generation).
    pub fn owns_consumer(&self, name: &str) -> bool {
        self.generation_of(name).is_some()
    }

    /// The generation of this partition's consumer `name` (0 for a name from before
    /// generations); `None` when it is not one of this partition's.
    pub fn generation_of(&self, name: &str) -> Option<u64> {
        parse_ingest_consumer(name)
            .filter(|(index, _)| *index == self.index)
            .map(|(_, generation)| generation)
    }

    /// The consumer's filter subjects (none: the whole stream).
    pub fn filters(&self) -> Vec<String> {
        match (self.count, self.index) {
            (0 | 1, _) => Vec::new(),
            (_, 0) => vec![
                format!("{EVENTS_SUBJECT_PREFIX}.*"),
                format!("{EVENTS_SUBJECT_PREFIX}.0.*"),
            ],
            (_, k) => vec![format!("{EVENTS_SUBJECT_PREFIX}.{k}.*")],
        }
    }

    /// Its lease key in [`INGEST_LEASES_BUCKET`].
    pub fn lease_key(&self) -> String {
        format!("partition.{}", self.index)
    }
}

/// The name (prefix, see [`Partition::consumer`]) of ingest's consumers of partition `index`.
pub fn ingest_consumer(index: u32) -> String {
    if index == 0 {
        INGEST_CONSUMER.to_string()
    } else {
        format!("{INGEST_CONSUMER}-{index}")
    }
}

/// (partition index, generation) of an ingest consumer's name (see [`Partition::consumer`]);
/// `None` for any other name.
pub fn parse_ingest_consumer(name: &str) -> Option<(u32, u64)> {
    let rest = name.strip_prefix(INGEST_CONSUMER)?;
    let (index, rest) = match rest.strip_prefix('-') {
        Some(r) => {
            let digits = r.find('_').unwrap_or(r.len());
            (
                r[..digits].parse().ok().filter(|&i: &u32| i > 0)?,
                &r[digits..],
            )
        }
        None => (0, rest),
    };
    match rest {
        "" => Some((index, 0)),
        _ => Some((index, rest.strip_prefix('_')?.parse().ok()?)),
    }
}

/// The subject transform (source, destination) that partitions the events stream `count`
/// ways; `None` for one partition.
pub fn partition_transform(count: u32) -> Option<(String, String)> {
    (count > 1).then(|| {
        (
            format!("{EVENTS_SUBJECT_PREFIX}.*"),
            format!("{EVENTS_SUBJECT_PREFIX}.{{{{partition({count},1)}}}}.{{{{wildcard(1)}}}}"),
        )
    })
}
/// KV bucket: merchant id -> `Merchant` JSON.
pub const MERCHANTS_BUCKET: &str = "beacon_merchants";
/// KV bucket: merchant id -> `Pipeline` JSON, with history.
pub const PIPELINES_BUCKET: &str = "beacon_pipelines";
/// History kept per merchant in the pipelines bucket (NATS KV allows at most 64).
pub const PIPELINES_HISTORY: i64 = 64;
/// KV bucket: edge id -> `EdgeStatus` JSON, refreshed by each live edge (entries expire).
pub const EDGES_BUCKET: &str = "beacon_edges";
/// Object store holding plugin components by sha256.
pub const PLUGINS_OBJECT_STORE: &str = "beacon_plugins";

pub fn events_subject(merchant_id: &str) -> String {
    format!("{EVENTS_SUBJECT_PREFIX}.{merchant_id}")
}

/// A merchant as stored in the registry. Write keys are stored only as sha256 hashes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Merchant {
    pub id: String,
    pub name: String,
    pub write_key_sha256: String,
    /// The server key's hash: a key for the merchant's own servers (relays, imports of
    /// already-enriched data), which may set the `$` properties the edge otherwise keeps for
    /// its enrichment. The write key is the one embedded in pages and apps, so anyone can
    /// read it; the server key must stay secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_key_sha256: Option<String>,
    pub created_at: i64,
    /// IANA time zone of the merchant's reports (dates and time buckets); UTC when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// How the merchant's existing trackers name it at the HTTP collectors.
    #[serde(default, skip_serializing_if = "Trackers::is_empty")]
    pub trackers: Trackers,
    /// Per-merchant collection limits; the edge's defaults apply when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<MerchantLimits>,
}

/// The identities third-party trackers send instead of a write key. Each one belongs to at
/// most one merchant (claimed in the registry when the merchant is created); an identity no
/// merchant claims is refused, never stored under a guess.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Trackers {
    /// Snowplow `aid` (application id).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snowplow_app_ids: Vec<String>,
    /// GA4 data streams: `measurement_id` and its Measurement Protocol secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ga4: Vec<Ga4Stream>,
    /// Plausible `domain` (site) names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
}

impl Trackers {
    pub fn is_empty(&self) -> bool {
        self.snowplow_app_ids.is_empty() && self.ga4.is_empty() && self.domains.is_empty()
    }

    /// Every identity, as registry claims.
    pub fn ids(&self) -> impl Iterator<Item = TrackerId> + '_ {
        let apps = self
            .snowplow_app_ids
            .iter()
            .cloned()
            .map(TrackerId::SnowplowApp);
        let ga4 = self
            .ga4
            .iter()
            .map(|s| TrackerId::Ga4(s.measurement_id.clone()));
        let domains = self
            .domains
            .iter()
            .map(|d| TrackerId::Domain(normalize_domain(d)));
        apps.chain(ga4).chain(domains)
    }
}

/// A site name as registered and as looked up: lower case, without `www.` (as Plausible).
pub fn normalize_domain(d: &str) -> String {
    let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
    match d.strip_prefix("www.") {
        Some(rest) => rest.to_string(),
        None => d,
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ga4Stream {
    pub measurement_id: String,
    /// sha256 (hex) of each accepted `api_secret`; `/g/collect` hits need none (as Google's).
    #[serde(default)]
    pub api_secrets_sha256: Vec<String>,
}

/// One identity a tracker sends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TrackerId {
    SnowplowApp(String),
    Ga4(String),
    Domain(String),
}

impl TrackerId {
    /// The stable text a registry claim is keyed by.
    pub fn claim(&self) -> String {
        match self {
            TrackerId::SnowplowApp(a) => format!("snowplow:{a}"),
            TrackerId::Ga4(m) => format!("ga4:{m}"),
            TrackerId::Domain(d) => format!("domain:{d}"),
        }
    }
}

impl std::fmt::Display for TrackerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrackerId::SnowplowApp(a) => write!(f, "Snowplow app id `{a}`"),
            TrackerId::Ga4(m) => write!(f, "GA4 measurement id `{m}`"),
            TrackerId::Domain(d) => write!(f, "domain `{d}`"),
        }
    }
}

/// Collection limits of one merchant, enforced per edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MerchantLimits {
    /// Sustained events per second (token bucket refill).
    pub events_per_second: u32,
    /// Events accepted at once above the sustained rate (bucket size).
    pub burst: u32,
    /// Events per UTC day; `None` is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_events: Option<u64>,
}

/// KV bucket: `<merchant-id>.<version>` -> `PipelineDef` JSON. Definitions are immutable
/// (create-only), so every version ever activated stays re-runnable and rollback-able even
/// after the pipelines bucket's history (64 entries per key) has rolled over.
pub const PIPELINE_VERSIONS_BUCKET: &str = "beacon_pipeline_versions";
/// KV bucket: job id -> a history rewrite's audit record (re-processing, forget), JSON
/// written by `beacon-reprocess`; the dashboard reads it for its chart markers.
pub const JOBS_BUCKET: &str = "beacon_jobs";
/// KV bucket: sha256 -> `PluginInfo` JSON, one per uploaded component.
pub const PLUGIN_INFO_BUCKET: &str = "beacon_plugin_info";

/// What a live edge reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EdgeStatus {
    pub edge_id: String,
    /// RSocket over QUIC address.
    pub addr: String,
    /// Per merchant, the revision of its pipelines-bucket entry this edge runs. Revisions grow
    /// with every change (activation, canary, rollback), so "applied" is `>=`.
    pub pipelines: std::collections::BTreeMap<String, u64>,
    pub updated_at: i64,
    /// Where the edge is (`eu-west`, `us-east`, ...; see `beacon_edge::locate`).
    #[serde(default)]
    pub region: String,
    /// HTTP collectors and `GET /locate`, `ip:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<String>,
    /// Batches being processed right now: a rough load figure for `locate`.
    #[serde(default)]
    pub in_flight: usize,
}

/// The answer to `locate` (`GET /locate`, or an RSocket request-response with metadata
/// `locate`): live edges, nearest to the caller first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Location {
    /// The caller's region as the edge understood it (asked for, or from its address).
    pub region: Option<String>,
    pub edges: Vec<LocatedEdge>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LocatedEdge {
    pub edge_id: String,
    pub region: String,
    /// RSocket over QUIC, `ip:port`.
    pub quic: String,
    /// HTTP collectors, `ip:port`.
    pub http: Option<String>,
    pub in_flight: usize,
}

/// What happens to a batch when a plugin of its pipeline fails (trap, limit, error).
/// Either way the raw events are stored and the failure is in `failed_events`, so the
/// batch can be re-processed later; this only decides what `events` gets now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Keep the batch out of `events` until it is re-processed.
    #[default]
    Hold,
    /// Store the events unprocessed (with no `pipeline_version`), so metrics stay complete.
    PassThrough,
}

impl std::str::FromStr for OnFailure {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hold" => Ok(Self::Hold),
            "pass-through" | "pass_through" => Ok(Self::PassThrough),
            _ => Err(format!(
                "on-failure must be `hold` or `pass-through`, not `{s}`"
            )),
        }
    }
}

/// The canary hash key of an event: salted with the merchant and the canary version, so each
/// canary tests a different slice of visitors (the event id stands in for an anonymous one).
pub fn canary_key(merchant_id: &str, version: u64, visitor: &str) -> String {
    format!("{merchant_id}:{version}:{visitor}")
}

/// One immutable pipeline version: ordered plugins, each pinned by content hash, with configs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PipelineDef {
    pub merchant_id: String,
    pub version: u64,
    pub plugins: Vec<crate::PluginRef>,
    #[serde(default)]
    pub on_failure: OnFailure,
    #[serde(default)]
    pub created_by: String,
    #[serde(default)]
    pub created_at: i64,
}

impl PipelineDef {
    pub fn to_ref(&self) -> crate::PipelineRef {
        crate::PipelineRef {
            merchant_id: self.merchant_id.clone(),
            version: self.version,
            plugins: self.plugins.clone(),
        }
    }
}

/// A pipeline version tried on a share of a merchant's traffic before full rollout.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Canary {
    pub def: PipelineDef,
    /// 1..=99: share of visitors (by a stable hash of the visitor id) it processes.
    pub percent: u8,
}

/// A merchant's entry in the pipelines bucket: what runs now. Every write is a change with
/// who, when and why, kept in the bucket's history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pipeline {
    pub merchant_id: String,
    pub active: PipelineDef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
    /// Highest version number ever defined for this merchant (new versions take the next).
    pub latest_version: u64,
    /// Who changed it and why: every change is audited in the KV history.
    #[serde(default)]
    pub changed_by: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub changed_at: i64,
}

impl Pipeline {
    /// Parses a pipelines-bucket entry, including the pre-versioning shape (`{merchant_id,
    /// version, plugins, ...}`, written by `plugin attach` before canaries existed), read as
    /// that version active with the `hold` policy.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        #[derive(serde::Deserialize)]
        struct Legacy {
            merchant_id: String,
            version: u64,
            plugins: Vec<crate::PluginRef>,
            #[serde(default)]
            changed_by: String,
            #[serde(default)]
            reason: String,
            #[serde(default)]
            changed_at: i64,
        }
        serde_json::from_slice::<Self>(bytes).or_else(|e| {
            let l: Legacy = serde_json::from_slice(bytes).map_err(|_| e)?;
            Ok(Self {
                active: PipelineDef {
                    merchant_id: l.merchant_id.clone(),
                    version: l.version,
                    plugins: l.plugins,
                    on_failure: OnFailure::Hold,
                    created_by: l.changed_by.clone(),
                    created_at: l.changed_at,
                },
                merchant_id: l.merchant_id,
                canary: None,
                latest_version: l.version,
                changed_by: l.changed_by,
                reason: l.reason,
                changed_at: l.changed_at,
            })
        })
    }
}

/// An uploaded plugin component (the bytes are in the object store under `sha256`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PluginInfo {
    pub sha256: String,
    pub name: String,
    pub size: u64,
    /// The plugin contract version the component was built against, e.g. `1.0.0`.
    pub contract: String,
    pub uploaded_by: String,
    pub uploaded_at: i64,
}

/// Which share a visitor falls into, 0..100: FNV-1a of `key`. Stable across edges, restarts
/// and releases: changing it would move visitors between canary and stable.
pub fn canary_bucket(key: &str) -> u8 {
    (fnv1a(FNV_OFFSET, key.as_bytes()) % 100) as u8
}

/// [`canary_bucket`] of [`canary_key`]`(merchant_id, version, visitor)`, without building the
/// key: this runs for every event of a merchant with a canary.
pub fn canary_share(merchant_id: &str, version: u64, visitor: &str) -> u8 {
    let mut digits = [0u8; 20];
    let mut n = version;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut h = fnv1a(FNV_OFFSET, merchant_id.as_bytes());
    h = fnv1a(h, b":");
    h = fnv1a(h, &digits[i..]);
    h = fnv1a(h, b":");
    (fnv1a(h, visitor.as_bytes()) % 100) as u8
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_redacted() {
        assert_eq!(
            redact("nats://beacon:s3cret@127.0.0.1:4222, nats://beacon:s3cret@h2:4222/x"),
            "nats://beacon:***@127.0.0.1:4222,nats://beacon:***@h2:4222/x"
        );
        assert_eq!(redact("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact("127.0.0.1:4222"), "127.0.0.1:4222");
        assert_eq!(redact("beacon:pw@h:4222"), "beacon:***@h:4222");
        assert_eq!(redact("tls://s3cret@h:4222"), "tls://***@h:4222");
        let url = NatsUrl::from("tls://beacon:s3cret@h:4222");
        assert_eq!(url.expose(), "tls://beacon:s3cret@h:4222");
        assert_eq!(url.to_string(), "tls://beacon:***@h:4222");
        assert_eq!(format!("{url:?}"), "\"tls://beacon:***@h:4222\"");
    }

    #[test]
    fn addresses_to_dial_carry_no_credentials() {
        assert_eq!(
            addresses("nats://beacon:s3cret@127.0.0.1:4222, tls://tok@h2:4222,h3:4222"),
            ["nats://127.0.0.1:4222", "tls://h2:4222", "h3:4222"]
        );
        // A password with an `@` in it: the host is after the last one.
        assert_eq!(addresses("u:p@ss@h:4222"), ["h:4222"]);
    }

    #[test]
    fn partitions_filter_disjoint_subjects() {
        assert!(Partition { index: 0, count: 1 }.filters().is_empty());
        assert_eq!(
            Partition { index: 0, count: 4 }.filters(),
            ["beacon.events.*", "beacon.events.0.*"]
        );
        assert_eq!(
            Partition { index: 3, count: 4 }.filters(),
            ["beacon.events.3.*"]
        );
        let p3 = Partition { index: 3, count: 4 };
        assert_eq!(p3.consumer(7), "beacon-ingest-3_7");
        assert!(p3.owns_consumer("beacon-ingest-3_7") && p3.owns_consumer("beacon-ingest-3"));
        assert!(!p3.owns_consumer("beacon-ingest-30_7") && !p3.owns_consumer("beacon-ingest-3_x"));
        assert_eq!(p3.generation_of("beacon-ingest-3_7"), Some(7));
        assert_eq!(parse_ingest_consumer("beacon-ingest_9"), Some((0, 9)));
        assert_eq!(parse_ingest_consumer("beacon-ingest-12_3"), Some((12, 3)));
        assert_eq!(parse_ingest_consumer("beacon-ingest-0_3"), None);
        assert_eq!(parse_ingest_consumer("beacon-ingester"), None);
        let p0 = Partition { index: 0, count: 4 };
        assert_eq!(p0.consumer(2), "beacon-ingest_2");
        assert!(p0.owns_consumer(INGEST_CONSUMER) && !p0.owns_consumer("beacon-ingest-1_2"));
        assert_eq!(
            partition_transform(4),
            Some((
                "beacon.events.*".to_string(),
                "beacon.events.{{partition(4,1)}}.{{wildcard(1)}}".to_string()
            ))
        );
        assert_eq!(partition_transform(1), None);
    }

    #[test]
    fn canary_bucket_is_stable_and_spread() {
        // Pinned values: a change here moves visitors between pipeline versions.
        assert_eq!(canary_bucket("visitor-1"), canary_bucket("visitor-1"));
        assert_eq!(canary_bucket(""), (0xcbf2_9ce4_8422_2325u64 % 100) as u8);
        let n = 100_000;
        let under_30 = (0..n)
            .filter(|i| canary_bucket(&format!("v{i}")) < 30)
            .count();
        let share = under_30 as f64 / n as f64;
        assert!((0.28..0.32).contains(&share), "share {share}");
    }

    #[test]
    fn canary_share_is_the_bucket_of_the_key() {
        for (m, v, visitor) in [("m_1", 0, "a"), ("m_abc", 7, ""), ("m_x", u64::MAX, "v-1")] {
            assert_eq!(
                canary_share(m, v, visitor),
                canary_bucket(&canary_key(m, v, visitor))
            );
        }
    }

    #[test]
    fn legacy_pipeline_entries_still_parse() {
        let old = br#"{"merchant_id":"m_1","version":3,"plugins":[{"name":"utm","sha256":"ab","config":""}],"changed_by":"ops","reason":"attach utm","changed_at":5}"#;
        let p = Pipeline::from_json(old).unwrap();
        assert_eq!(p.active.version, 3);
        assert_eq!(p.latest_version, 3);
        assert_eq!(p.active.on_failure, OnFailure::Hold);
        assert_eq!(p.active.plugins[0].name, "utm");
        let new = serde_json::to_vec(&p).unwrap();
        assert_eq!(Pipeline::from_json(&new).unwrap(), p);
    }
}
