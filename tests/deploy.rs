//! The deployment files in `deploy/` are checked, not just written: the Kubernetes manifests
//! against the API schemas (`kubernetes-validate --strict`, PyPI), the systemd units with
//! `systemd-analyze verify`, the nats-server configurations inside the manifests with
//! `nats-server -t`, and every `beacon` command line in them against the CLI itself.

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::servers::free_port;
use common::{beacon_bin, venv_python};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("deploy dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no .{ext} files in {}", dir.display());
    out
}

/// `beacon <args> --help` parses: every flag in a deployment file exists.
fn assert_beacon_accepts(args: &[String], origin: &str) {
    let out = Command::new(beacon_bin())
        .args(args)
        .arg("--help")
        .output()
        .expect("run beacon");
    assert!(
        out.status.success(),
        "{origin}: `beacon {}` is refused: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The beacon containers (command line, whether their NATS URL comes from a Secret) and the
/// nats-server configurations of the Kubernetes manifests, read with PyYAML (installed with
/// kubernetes-validate).
fn manifest_parts(manifests: &[PathBuf]) -> Value {
    let script = r#"
import json, sys, yaml
out = {"beacon": [], "nats": []}
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        if doc["kind"] == "ConfigMap" and "nats.conf" in doc.get("data", {}):
            out["nats"].append([path, doc["metadata"]["name"], doc["data"]["nats.conf"]])
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            if "beacon" in c["image"]:
                url = [e for e in c.get("env", []) if e["name"] == "BEACON_NATS_URL"]
                secret = bool(url) and "secretKeyRef" in url[0].get("valueFrom", {})
                out["beacon"].append([path, c["name"], c.get("args", []), secret])
print(json.dumps(out))
"#;
    let out = Command::new(venv_python())
        .arg("-c")
        .arg(script)
        .args(manifests)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// The files of Secret nats-tls (`ca.crt`, `tls.crt`, `tls.key`) in a directory under `dir`,
/// made as docs/OPERATIONS.md says: `beacon topology certs` naming `hosts`.
fn nats_tls(dir: &Path, hosts: &[&str]) -> PathBuf {
    let certs = dir.join("certs");
    let mut cmd = Command::new(beacon_bin());
    cmd.args(["topology", "certs", "--dir"]).arg(&certs);
    for h in hosts {
        cmd.args(["--host", h]);
    }
    let out = cmd.output().expect("beacon topology certs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("create secret generic nats-tls"));
    let secret = dir.join("nats-tls");
    std::fs::create_dir_all(&secret).expect("mkdir");
    for (from, to) in [
        ("ca.pem", "ca.crt"),
        ("server.pem", "tls.crt"),
        ("server-key.pem", "tls.key"),
    ] {
        std::fs::copy(certs.join(from), secret.join(to)).expect("copy");
    }
    secret
}

#[test]
fn kubernetes_manifests_match_the_api_schemas_and_the_cli() {
    let dir = deploy_dir().join("kubernetes");
    let manifests = files(&dir, "yaml");
    let validate = venv_python()
        .parent()
        .expect("venv bin")
        .join("kubernetes-validate");
    let out = Command::new(&validate)
        .args(["--strict", "--quiet", "-k", "1.31.0"])
        .args(&manifests)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (scripts/setup.sh installs it with BEACON_SETUP_BROWSER=1, as scripts/test.sh does)",
                validate.display()
            )
        });
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let found = manifest_parts(&manifests);
    let containers = found["beacon"].as_array().expect("containers");
    assert!(containers.len() >= 5, "{found}");
    for c in containers {
        let args: Vec<String> = c[2]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a.as_str().expect("arg").to_string())
            .collect();
        assert_beacon_accepts(&args, &format!("{} {}", c[0], c[1]));
        // The URL carries the client password: from a Secret, never written in a manifest.
        assert_eq!(
            c[3], true,
            "{} {}: BEACON_NATS_URL not from a Secret",
            c[0], c[1]
        );
    }
    let configs = found["nats"].as_array().expect("nats configs");
    assert!(configs.len() >= 2, "{found}");
    let tmp = tempfile::tempdir().expect("tmp");
    let secret = nats_tls(tmp.path(), &["*.nats-hub.beacon.svc", "*.beacon.svc"]);
    let nats = beacon::nats::NatsServer::find_binary().expect("nats-server");
    let check = |file: &Path, password: Option<&str>| {
        let mut cmd = Command::new(&nats);
        cmd.env("POD_NAME", "nats-hub-0")
            .env_remove("NATS_CLIENT_PASSWORD")
            .arg("-t")
            .arg("-c")
            .arg(file);
        if let Some(p) = password {
            cmd.env("NATS_CLIENT_PASSWORD", p);
        }
        cmd.output().expect("nats-server -t")
    };
    for c in configs {
        let name = c[1].as_str().expect("name");
        let conf = c[2].as_str().expect("conf");
        // Secured: clients with TLS and a password, other servers with mutual TLS.
        assert!(
            conf.contains("password: $NATS_CLIENT_PASSWORD") && conf.contains("ca_file:"),
            "{name}: {conf}"
        );
        let listeners = conf.matches("listen: 0.0.0.0:6222").count()
            + conf.matches("listen: 0.0.0.0:7422").count();
        let verifying =
            conf.matches("verify: true").count() + conf.matches("verify_and_map: true").count();
        assert_eq!(verifying, listeners, "{name}: {conf}");
        let file = tmp.path().join(format!("{name}.conf"));
        let local = conf.replace("/etc/nats-tls/", &format!("{}/", secret.display()));
        std::fs::write(&file, local).expect("write");
        let out = check(&file, Some("a-password"));
        assert!(
            out.status.success(),
            "{} {name}: {}{}",
            c[0],
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The password really comes from the environment.
        assert!(
            !check(&file, None).status.success(),
            "{name} without its password"
        );
    }
}

#[test]
fn systemd_units_verify_and_their_commands_parse() {
    let units = files(&deploy_dir().join("systemd"), "service");
    let tmp = tempfile::tempdir().expect("tmp");
    let beacon = beacon_bin();
    let nats = beacon::nats::NatsServer::find_binary().expect("nats-server");
    for unit in &units {
        let text = std::fs::read_to_string(unit).expect("unit");
        // The units name the installed paths; verify them against the binaries built here.
        let here = text
            .replace("/usr/local/bin/beacon", &beacon.display().to_string())
            .replace("/usr/local/bin/nats-server", &nats.display().to_string());
        let name = unit
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        // A template is verified as one of its instances.
        let name = name.replace("@.service", "@hub-1.service");
        let copy = tmp.path().join(&name);
        std::fs::write(&copy, &here).expect("copy");
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&copy)
            .output()
            .unwrap_or_else(|e| panic!("systemd-analyze: {e} (Debian's systemd package)"));
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("ExecStart");
        let mut words = exec.split_whitespace();
        if words.next() == Some("/usr/local/bin/beacon") {
            // %H (the host name) as systemd would expand it.
            let args: Vec<String> = words.map(|w| w.replace("%H", "edge-host")).collect();
            assert_beacon_accepts(&args, &name);
        }
    }
}

/// Starts nats-server on `conf` (with the client password in its environment) and waits
/// until its log says it is ready.
fn serve(dir: &Path, name: &str, conf: &str) -> common::KillOnDrop {
    let file = dir.join(format!("{name}.conf"));
    std::fs::write(&file, conf).expect("write");
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(beacon::nats::NatsServer::find_binary().expect("nats-server"))
        .env("POD_NAME", "nats-hub-0")
        .env("NATS_CLIENT_PASSWORD", "a-password")
        .arg("-c")
        .arg(&file)
        .arg("--log")
        .arg(&log)
        .spawn()
        .expect("nats-server");
    let server = common::KillOnDrop(child);
    common::wait_for(
        std::time::Duration::from_secs(30),
        "nats-server ready",
        || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|l| l.contains("Server is ready"))
                .map(|_| ())
        },
    );
    server
}

/// A manifest's nats-server configuration on loopback: each `0.0.0.0:<port>` listener on
/// the free port given for it, the hub nodes' `<port>` addresses on `hub`'s, the Secret's
/// files in `tls_dir`, the store in `store`; nothing else changed.
fn on_loopback(
    conf: &str,
    listeners: &[(u16, u16)],
    hub: (u16, u16),
    tls_dir: &str,
    store: &Path,
) -> String {
    let mut c = conf.replace("/etc/nats-tls/", tls_dir).replace(
        "store_dir: /data",
        &format!("store_dir: {}", store.display()),
    );
    for (from, to) in listeners {
        c = c.replace(&format!("0.0.0.0:{from}"), &format!("127.0.0.1:{to}"));
    }
    for i in 0..3 {
        c = c.replace(
            &format!("nats-hub-{i}.nats-hub.beacon.svc:{}", hub.0),
            &format!("127.0.0.1:{}", hub.1),
        );
    }
    assert!(!c.contains("beacon.svc") && !c.contains("0.0.0.0"), "{c}");
    c
}

/// The manifests' hub and leaf configurations, run for real on loopback (addresses, ports
/// and paths replaced, nothing else): the leaf logs in to the hub with its certificate alone,
/// clients need TLS with the deployment's CA and the password, and anything less is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifests_bus_is_secured_and_its_leaf_connects() {
    let found = manifest_parts(&files(&deploy_dir().join("kubernetes"), "yaml"));
    let conf = |name: &str| -> String {
        found["nats"]
            .as_array()
            .expect("configs")
            .iter()
            .find(|c| c[1] == name)
            .unwrap_or_else(|| panic!("no {name} configuration"))[2]
            .as_str()
            .expect("conf")
            .to_string()
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let tls = nats_tls(tmp.path(), &["127.0.0.1", "localhost"]);
    let tls_dir = format!("{}/", tls.display());
    let (client, cluster, leaf, monitor) = (free_port(), free_port(), free_port(), free_port());
    let hub = on_loopback(
        &conf("nats-hub"),
        &[
            (4222, client),
            (6222, cluster),
            (7422, leaf),
            (8222, monitor),
        ],
        (6222, cluster),
        &tls_dir,
        &tmp.path().join("hub"),
    );
    let _hub = serve(tmp.path(), "hub", &hub);
    let (leaf_client, leaf_monitor) = (free_port(), free_port());
    let region = on_loopback(
        &conf("nats-leaf-eu"),
        &[(4222, leaf_client), (8222, leaf_monitor)],
        (7422, leaf),
        &tls_dir,
        &tmp.path().join("leaf"),
    );
    let _leaf = serve(tmp.path(), "leaf", &region);

    // The leaf attaches to the hub (it retries every second until it is in): the hub's
    // monitoring endpoint counts it.
    let monitor_addr = format!("127.0.0.1:{monitor}");
    let log = tmp.path().join("hub.log");
    common::wait_for(
        Duration::from_secs(30),
        "the leaf attached to the hub",
        || {
            let (status, body) = common::http(&monitor_addr, "GET", "/leafz", None, b"");
            let leafz: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            (status == 200 && leafz["leafnodes"].as_u64() == Some(1)).then_some(())
        },
    );
    assert!(
        !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("authentication error"),
        "the hub refused the leaf at first"
    );

    // Clients: TLS with the CA and the password, on both servers.
    let ca = tls.join("ca.crt");
    for port in [client, leaf_client] {
        let url = format!("tls://beacon:a-password@127.0.0.1:{port}");
        let c = beacon_proto::bus::options_with_ca(&url, Some(&ca))
            .connect(beacon_proto::bus::addresses(&url))
            .await
            .unwrap_or_else(|e| panic!("{port}: {e}"));
        c.flush().await.expect("round trip");
        for bad in [
            format!("tls://beacon:wrong@127.0.0.1:{port}"),
            format!("tls://127.0.0.1:{port}"),
        ] {
            let refused = beacon_proto::bus::options_with_ca(&bad, Some(&ca))
                .connect(beacon_proto::bus::addresses(&bad))
                .await;
            assert!(refused.is_err(), "{bad} was let in");
        }
        // The right password, but not trusting the deployment's CA: the server's
        // certificate is refused (the client upgrades to TLS because the server demands it).
        let no_ca = beacon_proto::bus::options_with_ca(&url, None)
            .connect(beacon_proto::bus::addresses(&url))
            .await;
        assert!(no_ca.is_err(), "{port}: connected without the CA");
    }
}
