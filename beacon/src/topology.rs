//! nats-server configurations for Beacon beyond one machine (docs/OPERATIONS.md, "Topology"):
//!
//! - a **hub**: a JetStream cluster (3 nodes for replicas 3) in the domain [`HUB_DOMAIN`],
//!   which ingest, the control plane and the query servers use, and which holds what every
//!   edge shares (merchants, pipelines, plugins, edge status, salts);
//! - per edge region, a **leaf** nats-server with a JetStream domain of its own
//!   (`edge-<region>`), where that region's edges make events durable. The hub's events
//!   stream sources every leaf's stream (ingest creates it: `beacon ingest --source-domain`),
//!   so a region keeps collecting while its link or the hub is down, and its backlog moves to
//!   the hub when the link returns.
//!
//! Every server fsyncs before it acknowledges (`sync_interval: always`): Jepsen's 2025
//! analysis of NATS 2.12.1 lost acknowledged writes to the default of syncing every two
//! minutes when nodes crashed together, and a leaf is the only copy of an event until the
//! hub has sourced it. The leaves refuse event subjects across the link in both directions:
//! plain messages are not filtered by domain, so without that a region's stream would also
//! store other regions' events; the hub gets events only by sourcing.
//!
//! The links between servers (hub routes, leaf connections) use mutual TLS with a CA of the
//! topology's own (written under `tls/` by [`Topology::write`]; every server's certificate is
//! signed by it and names the host) and a password per link kind, so that nothing but the
//! topology's own servers can join the hub's cluster or attach as a leaf and read or inject
//! events. Client ports speak TLS only (the same certificates; clients trust the CA through
//! `BEACON_NATS_CA`), and clients (Beacon's roles, operators) authenticate there with a
//! password of the topology's own (user [`CLIENT_USER`]), which the URLs it gives out carry
//! (`beacon_proto::bus::options` reads both back).
//!
//! [`Topology::plan`] lays a topology out on one machine (free loopback ports, stores under
//! one directory): the development harness (`beacon topology up`) and the tests run it as
//! it is; for machines of their own, change the addresses in the written files.

use std::net::TcpListener;
use std::path::{Path, PathBuf};

pub use beacon_proto::bus::HUB_DOMAIN;

use crate::nats::{NatsError, NatsServer};
use serde::{Deserialize, Serialize};

impl HubNode {
    /// Starts this node's nats-server from its configuration (tests, the harness).
    pub fn start(&self) -> Result<NatsServer, NatsError> {
        NatsServer::start_with_config(&self.config, self.client_port, &self.store_dir)
    }
}

impl Region {
    /// Starts this region's leaf nats-server from its configuration.
    pub fn start(&self) -> Result<NatsServer, NatsError> {
        NatsServer::start_with_config(&self.config, self.client_port, &self.store_dir)
    }
}

/// The file in a topology directory that describes it (written by [`Topology::write`]).
pub const TOPOLOGY_FILE: &str = "topology.json";

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("a hub needs 1 node or more (3 for replicas 3); {0} asked")]
    HubSize(usize),
    #[error("region name {0:?}: use letters, digits and '-' (it becomes a JetStream domain)")]
    Region(String),
    #[error("region {0:?} is named twice")]
    Duplicate(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a topology: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("generating the topology's TLS certificates: {0}")]
    Tls(#[from] rcgen::Error),
}

/// One hub node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HubNode {
    pub name: String,
    pub client_port: u16,
    pub cluster_port: u16,
    pub leaf_port: u16,
    /// nats-server's monitoring port (`/healthz`: its streams are current).
    pub monitor_port: u16,
    pub store_dir: PathBuf,
    pub config: PathBuf,
}

/// One edge region's leaf server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Region {
    pub name: String,
    /// Its JetStream domain: what `beacon ingest --source-domain` names.
    pub domain: String,
    pub client_port: u16,
    /// nats-server's monitoring port (`/healthz`).
    pub monitor_port: u16,
    pub store_dir: PathBuf,
    pub config: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Topology {
    pub host: String,
    /// `always`, or a duration such as `10s` (nats-server's `sync_interval`).
    pub sync: String,
    pub hub: Vec<HubNode>,
    pub regions: Vec<Region>,
    /// The server-to-server links' security; absent in topologies generated before it.
    #[serde(default)]
    pub links: Option<Links>,
}

/// The user clients authenticate as on a secured topology's client ports.
pub const CLIENT_USER: &str = "beacon";

/// TLS and credentials of the links between servers.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct Links {
    /// `ca.pem`, and `<server>.pem` / `<server>-key.pem` per server.
    pub tls_dir: PathBuf,
    /// Hub nodes authenticate each other's routes with it (user `route`).
    pub route_password: String,
    /// Leaves authenticate to the hub with it (user `leaf`).
    pub leaf_password: String,
    /// Clients (edges, ingest, the other roles, operators) authenticate with it (user
    /// `beacon`) on every server's client port; [`Topology::hub_url`] and
    /// [`Topology::leaf_url`] carry it. Absent in topologies generated before it: their
    /// client ports take anyone who reaches them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_password: Option<String>,
    /// Client ports speak TLS only (the servers' certificates, clients trusting `ca.pem`:
    /// [`Topology::client_ca`]); the URLs say `tls://`. False in topologies generated before.
    #[serde(default)]
    pub client_tls: bool,
}

/// Passwords never reach logs or panic messages.
impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("tls_dir", &self.tls_dir)
            .field("route_password", &"<redacted>")
            .field("leaf_password", &"<redacted>")
            .field(
                "client_password",
                &self.client_password.as_ref().map(|_| "<redacted>"),
            )
            .field("client_tls", &self.client_tls)
            .finish()
    }
}

impl Links {
    /// The `authorization` block of a server's client port, if clients must authenticate.
    fn client_block(&self, server: &str) -> String {
        let mut block = String::new();
        if let Some(p) = &self.client_password {
            block += &format!(
                "# clients (edges, ingest, the other roles) authenticate as user {CLIENT_USER}\n\
                 authorization {{\n  user: {CLIENT_USER}\n  password: {p:?}\n}}\n"
            );
        }
        if self.client_tls {
            let (cert, key) = self.cert(server);
            block += &format!(
                "# clients connect with TLS only, trusting this topology's CA (BEACON_NATS_CA)\n\
                 tls {{\n  cert_file: {cert:?}\n  key_file: {key:?}\n  timeout: 5\n}}\n"
            );
        }
        block
    }

    fn cert(&self, server: &str) -> (String, String) {
        let p = |f: String| self.tls_dir.join(f).display().to_string();
        (p(format!("{server}.pem")), p(format!("{server}-key.pem")))
    }

    fn ca(&self) -> String {
        self.tls_dir.join("ca.pem").display().to_string()
    }

    /// A `tls { }` block for `server`: its certificate, and peers verified against the CA.
    fn tls_block(&self, server: &str, indent: &str) -> String {
        let (cert, key) = self.cert(server);
        format!(
            "{indent}# mutual TLS: peers present a certificate of this topology's CA\n\
             {indent}tls {{\n\
             {indent}  cert_file: {cert:?}\n\
             {indent}  key_file: {key:?}\n\
             {indent}  ca_file: {ca:?}\n\
             {indent}  verify: true\n\
             {indent}  timeout: 5\n\
             {indent}}}\n",
            ca = self.ca(),
        )
    }
}

fn random_secret() -> String {
    crate::secrets::random_hex::<24>()
}

impl Topology {
    /// A hub of `hub_nodes` and a leaf per region on this machine's loopback, each server on
    /// free ports, configurations and stores under `dir`.
    pub fn plan(
        dir: &Path,
        hub_nodes: usize,
        regions: &[String],
        sync: &str,
    ) -> Result<Self, TopologyError> {
        if hub_nodes == 0 {
            return Err(TopologyError::HubSize(hub_nodes));
        }
        for (i, r) in regions.iter().enumerate() {
            if r.is_empty() || !r.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err(TopologyError::Region(r.clone()));
            }
            if regions[..i].contains(r) {
                return Err(TopologyError::Duplicate(r.clone()));
            }
        }
        let io = |source| TopologyError::Io {
            path: dir.to_path_buf(),
            source,
        };
        // All ports are held until every one is chosen, so no two are the same.
        let mut held = Vec::new();
        let mut port = || -> Result<u16, TopologyError> {
            let l = TcpListener::bind("127.0.0.1:0").map_err(io)?;
            let p = l.local_addr().map_err(io)?.port();
            held.push(l);
            Ok(p)
        };
        let mut hub = Vec::new();
        for i in 1..=hub_nodes {
            let name = format!("hub-{i}");
            hub.push(HubNode {
                client_port: port()?,
                cluster_port: port()?,
                leaf_port: port()?,
                monitor_port: port()?,
                store_dir: dir.join("store").join(&name),
                config: dir.join(format!("{name}.conf")),
                name,
            });
        }
        let mut leaves = Vec::new();
        for r in regions {
            let name = format!("leaf-{r}");
            leaves.push(Region {
                domain: format!("edge-{r}"),
                client_port: port()?,
                monitor_port: port()?,
                store_dir: dir.join("store").join(&name),
                config: dir.join(format!("{name}.conf")),
                name: r.clone(),
            });
        }
        Ok(Self {
            host: "127.0.0.1".into(),
            sync: sync.into(),
            hub,
            regions: leaves,
            links: Some(Links {
                tls_dir: dir.join("tls"),
                route_password: random_secret(),
                leaf_password: random_secret(),
                client_password: Some(random_secret()),
                client_tls: true,
            }),
        })
    }

    /// The URLs ingest, control and queries connect with (any node will do; the client
    /// fails over between them).
    pub fn hub_url(&self) -> String {
        self.hub
            .iter()
            .map(|n| self.client_url(n.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The URL of a region's leaf, for its edges (`beacon edge --hub-domain hub`).
    pub fn leaf_url(&self, region: &str) -> Option<String> {
        self.regions
            .iter()
            .find(|r| r.name == region)
            .map(|r| self.client_url(r.client_port))
    }

    /// A client port's URL: `tls://` when it speaks TLS, and `beacon:<password>@` when
    /// clients authenticate (`beacon_proto::bus::options` reads both back).
    fn client_url(&self, port: u16) -> String {
        let scheme = if self.client_ca().is_some() {
            "tls"
        } else {
            "nats"
        };
        let user = match self.links.as_ref().and_then(|l| l.client_password.as_ref()) {
            Some(p) => format!("{CLIENT_USER}:{p}@"),
            None => String::new(),
        };
        format!("{scheme}://{user}{}:{port}", self.host)
    }

    /// The CA that clients must trust when client ports speak TLS: what
    /// [`beacon_proto::bus::NATS_CA_ENV`] names for every role.
    pub fn client_ca(&self) -> Option<PathBuf> {
        self.links
            .as_ref()
            .filter(|l| l.client_tls)
            .map(|l| l.tls_dir.join("ca.pem"))
    }

    /// Every port the topology's servers listen on.
    pub fn ports(&self) -> Vec<u16> {
        self.hub
            .iter()
            .flat_map(|n| [n.client_port, n.cluster_port, n.leaf_port, n.monitor_port])
            .chain(
                self.regions
                    .iter()
                    .flat_map(|r| [r.client_port, r.monitor_port]),
            )
            .collect()
    }

    /// The leaves' JetStream domains, for `beacon ingest --source-domain`.
    pub fn source_domains(&self) -> Vec<String> {
        self.regions.iter().map(|r| r.domain.clone()).collect()
    }

    pub fn hub_config(&self, node: &HubNode) -> String {
        let route_user = self
            .links
            .as_ref()
            .map(|l| format!("route:{}@", l.route_password))
            .unwrap_or_default();
        let routes: Vec<String> = self
            .hub
            .iter()
            .map(|n| {
                format!(
                    "    nats-route://{route_user}{}:{}",
                    self.host, n.cluster_port
                )
            })
            .collect();
        let (cluster_security, leaf_security) = match &self.links {
            Some(l) => (
                format!(
                    "{}  authorization {{\n    user: route\n    password: {:?}\n  }}\n",
                    l.tls_block(&node.name, "  "),
                    l.route_password
                ),
                format!(
                    "{}  authorization {{\n    user: leaf\n    password: {:?}\n  }}\n",
                    l.tls_block(&node.name, "  "),
                    l.leaf_password
                ),
            ),
            None => (String::new(), String::new()),
        };
        let client_security = self
            .links
            .as_ref()
            .map(|l| l.client_block(&node.name))
            .unwrap_or_default();
        format!(
            "# Beacon hub node {name} (generated by `beacon topology generate`).\n\
             server_name: {name}\n\
             listen: {host}:{client}\n\
             {client_security}\
             # /healthz: ready once this node's streams are current (wait for it between\n\
             # the nodes of a rolling restart)\n\
             http: {host}:{monitor}\n\
             \n\
             jetstream {{\n  store_dir: {store:?}\n  domain: {domain}\n  # fsync before every acknowledgement (Jepsen 2025; the default is 2m)\n  sync_interval: {sync}\n}}\n\
             \n\
             cluster {{\n  name: beacon-hub\n  listen: {host}:{cluster}\n{cluster_security}  routes: [\n{routes}\n  ]\n}}\n\
             \n\
             leafnodes {{\n  listen: {host}:{leaf}\n{leaf_security}}}\n",
            name = node.name,
            host = self.host,
            client = node.client_port,
            monitor = node.monitor_port,
            store = node.store_dir.display().to_string(),
            domain = HUB_DOMAIN,
            sync = self.sync,
            cluster = node.cluster_port,
            routes = routes.join("\n"),
            leaf = node.leaf_port,
        )
    }

    pub fn leaf_config(&self, region: &Region) -> String {
        let leaf_user = self
            .links
            .as_ref()
            .map(|l| format!("leaf:{}@", l.leaf_password))
            .unwrap_or_default();
        let remotes: Vec<String> = self
            .hub
            .iter()
            .map(|n| {
                format!(
                    "        \"nats-leaf://{leaf_user}{}:{}\"",
                    self.host, n.leaf_port
                )
            })
            .collect();
        let tls = self
            .links
            .as_ref()
            .map(|l| l.tls_block(&format!("leaf-{}", region.name), "      "))
            .unwrap_or_default();
        let client_security = self
            .links
            .as_ref()
            .map(|l| l.client_block(&format!("leaf-{}", region.name)))
            .unwrap_or_default();
        format!(
            "# Beacon edge region {name}'s leaf (generated by `beacon topology generate`).\n\
             server_name: leaf-{name}\n\
             listen: {host}:{client}\n\
             {client_security}\
             http: {host}:{monitor}\n\
             \n\
             jetstream {{\n  store_dir: {store:?}\n  domain: {domain}\n  # the only copy of an event until the hub has sourced it\n  sync_interval: {sync}\n}}\n\
             \n\
             leafnodes {{\n  reconnect: \"1s\"\n  remotes [\n    {{\n      urls: [\n{remotes}\n      ]\n{tls}      \
             # Events cross only by sourcing: a region's stream never stores another's events.\n      \
             deny_imports: [\"{subjects}\"]\n      deny_exports: [\"{subjects}\"]\n    }}\n  ]\n}}\n",
            name = region.name,
            host = self.host,
            client = region.client_port,
            monitor = region.monitor_port,
            store = region.store_dir.display().to_string(),
            domain = region.domain,
            sync = self.sync,
            remotes = remotes.join("\n"),
            subjects = beacon_proto::bus::EVENTS_SUBJECTS,
        )
    }

    /// The CA and one certificate per server (naming the host), each unless already there:
    /// a topology keeps its CA when its configurations are written again, and servers added
    /// since get certificates signed by it.
    fn write_tls(&self, links: &Links) -> Result<(), TopologyError> {
        let ca = Ca::open(&links.tls_dir)?;
        let servers = self
            .hub
            .iter()
            .map(|n| n.name.clone())
            .chain(self.regions.iter().map(|r| format!("leaf-{}", r.name)));
        for server in servers {
            let (cert_path, key_path) = links.cert(&server);
            // Kept only beside the CA that signed them: a new CA re-issues every one.
            if ca.existing && Path::new(&cert_path).exists() && Path::new(&key_path).exists() {
                continue;
            }
            ca.issue(
                &server,
                &[self.host.clone(), "localhost".into()],
                Path::new(&cert_path),
                Path::new(&key_path),
            )?;
        }
        ca.finish()
    }

    /// Writes every server's configuration and [`TOPOLOGY_FILE`] into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), TopologyError> {
        std::fs::create_dir_all(dir).map_err(|source| TopologyError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        if let Some(links) = &self.links {
            self.write_tls(links)?;
        }
        // Configurations hold the link passwords: readable by their owner only.
        for n in &self.hub {
            write_private(&n.config, &self.hub_config(n))?;
        }
        for r in &self.regions {
            write_private(&r.config, &self.leaf_config(r))?;
        }
        let json = serde_json::to_string_pretty(self).map_err(|source| TopologyError::Json {
            path: dir.join(TOPOLOGY_FILE),
            source,
        })?;
        write_private(&dir.join(TOPOLOGY_FILE), &json)
    }

    pub fn read(dir: &Path) -> Result<Self, TopologyError> {
        let path = dir.join(TOPOLOGY_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| TopologyError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| TopologyError::Json { path, source })
    }
}

/// A CA (kept when `dir` has one, created otherwise) and one certificate signed by it,
/// `server.pem` and `server-key.pem`, naming `hosts` (DNS names, wildcards such as
/// `*.nats-hub.beacon.svc`, or IP addresses), for server and client use alike: the TLS
/// identity of nats-servers that are not on one machine (machines of their own, Kubernetes;
/// docs/OPERATIONS.md), each presenting it to clients, routes and leaf connections. Returns
/// the paths of the CA certificate, the certificate and its key.
pub fn write_server_certificate(
    dir: &Path,
    hosts: &[String],
) -> Result<(PathBuf, PathBuf, PathBuf), TopologyError> {
    let ca = Ca::open(dir)?;
    let (cert, key) = (dir.join("server.pem"), dir.join("server-key.pem"));
    ca.issue("beacon-nats", hosts, &cert, &key)?;
    ca.finish()?;
    Ok((dir.join("ca.pem"), cert, key))
}

/// The topology's certificate authority in a directory (`ca.pem`, `ca-key.pem`).
struct Ca {
    dir: PathBuf,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    /// Read from the directory, not created now.
    existing: bool,
}

impl Ca {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TopologyError {
        let path = path.to_path_buf();
        move |source| TopologyError::Io { path, source }
    }

    /// The CA in `dir`, or a new one (written by [`Ca::finish`]).
    fn open(dir: &Path) -> Result<Self, TopologyError> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        std::fs::create_dir_all(dir).map_err(Self::io(dir))?;
        let key_pem = dir.join("ca-key.pem");
        let existing = dir.join("ca.pem").exists();
        let key = if existing {
            let text = std::fs::read_to_string(&key_pem).map_err(Self::io(&key_pem))?;
            KeyPair::from_pem(&text)?
        } else {
            KeyPair::generate()?
        };
        // The same parameters and key as the stored CA certificate: what it signs verifies
        // against `ca.pem` (same subject, same key).
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "Beacon topology CA");
        let cert = ca.self_signed(&key)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            cert,
            key,
            existing,
        })
    }

    /// A certificate for `name`, naming `hosts`, usable as TLS server and client (servers
    /// are both to their peers: routes, leaf connections).
    fn issue(
        &self,
        name: &str,
        hosts: &[String],
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<(), TopologyError> {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(hosts.to_vec())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        write_private(key_path, &key.serialize_pem())?;
        std::fs::write(cert_path, cert.pem()).map_err(Self::io(cert_path))
    }

    /// Writes a new CA: its key (which signs servers added later), then its certificate,
    /// written last, which marks a complete set.
    fn finish(self) -> Result<(), TopologyError> {
        if self.existing {
            return Ok(());
        }
        write_private(&self.dir.join("ca-key.pem"), &self.key.serialize_pem())?;
        let ca_pem = self.dir.join("ca.pem");
        std::fs::write(&ca_pem, self.cert.pem()).map_err(Self::io(&ca_pem))
    }
}

/// Writes a file only its owner can read (keys, passwords).
fn write_private(path: &Path, text: &str) -> Result<(), TopologyError> {
    crate::secrets::write_private(path, text).map_err(|source| TopologyError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_has_distinct_ports_routes_to_every_node_and_leaves_that_deny_event_subjects() {
        let dir = tempfile::tempdir().expect("dir");
        let t = Topology::plan(dir.path(), 3, &["eu".into(), "us".into()], "always").expect("plan");
        let mut ports = t.ports();
        let n = ports.len();
        assert_eq!(n, 3 * 4 + 2 * 2);
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), n, "every port distinct");
        let links = t.links.clone().expect("links are secured");
        assert_ne!(links.route_password, links.leaf_password);
        let hub = t.hub_config(&t.hub[1]);
        for node in &t.hub {
            assert!(hub.contains(&format!(
                "nats-route://route:{}@127.0.0.1:{}",
                links.route_password, node.cluster_port
            )));
        }
        // Both listeners for other servers demand TLS with this CA and a password.
        assert_eq!(hub.matches("verify: true").count(), 2, "{hub}");
        assert!(hub.contains(&format!("password: {:?}", links.leaf_password)));
        assert!(hub.contains("hub-2.pem") && hub.contains("ca.pem"), "{hub}");
        assert!(hub.contains("domain: hub") && hub.contains("sync_interval: always"));
        let leaf = t.leaf_config(&t.regions[0]);
        assert!(leaf.contains("domain: edge-eu"), "{leaf}");
        assert!(
            leaf.contains("deny_imports: [\"beacon.events.>\"]"),
            "{leaf}"
        );
        for node in &t.hub {
            assert!(leaf.contains(&format!(
                "nats-leaf://leaf:{}@127.0.0.1:{}",
                links.leaf_password, node.leaf_port
            )));
        }
        assert!(leaf.contains("leaf-eu.pem"), "{leaf}");
        // Clients authenticate on every client port, with the password the URLs carry.
        let client_password = links.client_password.clone().expect("client password");
        let client_auth =
            format!("authorization {{\n  user: beacon\n  password: {client_password:?}");
        assert!(hub.contains(&client_auth), "{hub}");
        assert!(leaf.contains(&client_auth), "{leaf}");
        // ... over TLS only, with each server's own certificate.
        assert!(
            hub.contains("tls {\n  cert_file:") && hub.contains("hub-2.pem"),
            "{hub}"
        );
        assert!(leaf.contains("tls {\n  cert_file:"), "{leaf}");
        assert_eq!(t.client_ca(), Some(links.tls_dir.join("ca.pem")));
        let with_password = format!("tls://beacon:{client_password}@127.0.0.1:");
        assert!(t
            .hub_url()
            .split(',')
            .all(|u| u.starts_with(&with_password)));
        assert!(t.leaf_url("eu").expect("eu").starts_with(&with_password));
        assert!(!format!("{links:?}").contains(&client_password));
        assert_eq!(t.source_domains(), ["edge-eu", "edge-us"]);
        assert_eq!(t.hub_url().split(',').count(), 3);
        t.write(dir.path()).expect("write");
        assert_eq!(Topology::read(dir.path()).expect("read"), t);
        for f in [
            "ca.pem",
            "ca-key.pem",
            "hub-1.pem",
            "hub-3-key.pem",
            "leaf-us.pem",
        ] {
            assert!(links.tls_dir.join(f).exists(), "{f}");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("file").permissions().mode() & 0o777;
        assert_eq!(
            mode(&t.hub[0].config),
            0o600,
            "configurations hold passwords"
        );
        assert_eq!(mode(&links.tls_dir.join("ca-key.pem")), 0o600);
        // Written again, the topology keeps its CA and the certificates it has; one that went
        // missing (a server added since) is signed by the same CA, and a configuration made
        // readable by others is narrowed again.
        let ca = std::fs::read(links.tls_dir.join("ca.pem")).expect("ca");
        let hub_cert = std::fs::read(links.tls_dir.join("hub-1.pem")).expect("hub-1");
        std::fs::remove_file(links.tls_dir.join("leaf-us.pem")).expect("rm");
        std::fs::remove_file(links.tls_dir.join("leaf-us-key.pem")).expect("rm");
        std::fs::set_permissions(&t.hub[0].config, std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        t.write(dir.path()).expect("write again");
        assert_eq!(std::fs::read(links.tls_dir.join("ca.pem")).expect("ca"), ca);
        assert_eq!(
            std::fs::read(links.tls_dir.join("hub-1.pem")).expect("hub-1"),
            hub_cert
        );
        assert_eq!(mode(&t.hub[0].config), 0o600);
        assert_eq!(mode(&links.tls_dir.join("leaf-us-key.pem")), 0o600);
        for server in ["hub-1", "leaf-us"] {
            verify(&ca, &links.tls_dir.join(format!("{server}.pem")))
                .unwrap_or_else(|e| panic!("{server}: {e}"));
        }
        // Without its CA certificate the set is incomplete: a new CA re-issues every
        // server's certificate, so none is left signed by the old one.
        std::fs::remove_file(links.tls_dir.join("ca.pem")).expect("rm ca");
        t.write(dir.path()).expect("write with a new CA");
        let new_ca = std::fs::read(links.tls_dir.join("ca.pem")).expect("new ca");
        assert_ne!(new_ca, ca);
        for server in ["hub-1", "hub-3", "leaf-eu", "leaf-us"] {
            verify(&new_ca, &links.tls_dir.join(format!("{server}.pem")))
                .unwrap_or_else(|e| panic!("{server} after a new CA: {e}"));
        }
        // And a certificate of another CA does not pass that check.
        let other = tempfile::tempdir().expect("tempdir");
        let t2 = Topology::plan(other.path(), 1, &["eu".to_string()], "always").expect("plan");
        t2.write(other.path()).expect("write");
        let other_tls = &t2.links.as_ref().expect("links").tls_dir;
        assert!(verify(&ca, &other_tls.join("leaf-eu.pem")).is_err());
    }

    /// The certificate for servers of their own names the hosts it is given (wildcards and
    /// addresses too), chains to the CA, and a second one keeps that CA.
    #[test]
    fn a_server_certificate_names_its_hosts() {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, ServerName};
        let dir = tempfile::tempdir().expect("dir");
        let hosts = [
            "*.nats-hub.beacon.svc".to_string(),
            "*.beacon.svc".into(),
            "10.0.0.5".into(),
        ];
        let (ca, cert, key) = write_server_certificate(dir.path(), &hosts).expect("certs");
        let ca_pem = std::fs::read(&ca).expect("ca");
        verify(&ca_pem, &cert).expect("chains to the CA");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pem = std::fs::read(&cert).expect("cert");
        let der = CertificateDer::from_pem_slice(&pem).expect("der");
        let ee = webpki::EndEntityCert::try_from(&der).expect("ee");
        let named = |host: &str| {
            let name = ServerName::try_from(host.to_string()).expect("name");
            ee.verify_is_valid_for_subject_name(&name).is_ok()
        };
        for host in [
            "nats-hub-0.nats-hub.beacon.svc",
            "nats-leaf-eu.beacon.svc",
            "10.0.0.5",
        ] {
            assert!(named(host), "{host}");
        }
        for host in ["evil.example", "a.b.beacon.svc", "127.0.0.1"] {
            assert!(!named(host), "{host}");
        }
        write_server_certificate(dir.path(), &hosts[..1]).expect("again");
        assert_eq!(std::fs::read(&ca).expect("ca"), ca_pem, "the CA is kept");
        verify(&ca_pem, &cert).expect("the new one chains to it too");
    }

    /// Checks `cert` chains to the CA `ca_pem` for both of a server's uses.
    fn verify(ca_pem: &[u8], cert: &Path) -> Result<(), String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, UnixTime};
        let ca = CertificateDer::from_pem_slice(ca_pem).map_err(|e| e.to_string())?;
        let anchor = webpki::anchor_from_trusted_cert(&ca).map_err(|e| e.to_string())?;
        let pem = std::fs::read(cert).map_err(|e| e.to_string())?;
        let der = CertificateDer::from_pem_slice(&pem).map_err(|e| e.to_string())?;
        let ee = webpki::EndEntityCert::try_from(&der).map_err(|e| e.to_string())?;
        for usage in [
            webpki::KeyUsage::server_auth(),
            webpki::KeyUsage::client_auth(),
        ] {
            ee.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                std::slice::from_ref(&anchor),
                &[],
                UnixTime::now(),
                usage,
                None,
                None,
            )
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    #[test]
    fn bad_plans_are_refused_with_the_reason() {
        let dir = Path::new("/nonexistent");
        assert!(matches!(
            Topology::plan(dir, 0, &[], "always"),
            Err(TopologyError::HubSize(0))
        ));
        assert!(matches!(
            Topology::plan(dir, 3, &["e.u".into()], "always"),
            Err(TopologyError::Region(_))
        ));
        assert!(matches!(
            Topology::plan(dir, 3, &["eu".into(), "eu".into()], "always"),
            Err(TopologyError::Duplicate(_))
        ));
    }
}
