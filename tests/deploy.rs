//! The deployment files in `deploy/` are checked, not just written: the Kubernetes manifests
//! against the API schemas (`kubernetes-validate --strict`, PyPI), the systemd units with
//! `systemd-analyze verify`, the nats-server configurations inside the manifests with
//! `nats-server -t`, and every `beacon` command line in them against the CLI itself.

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

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

    // The beacon containers' command lines and the nats-server configurations, read with
    // PyYAML (installed with kubernetes-validate).
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
                out["beacon"].append([path, c["name"], c.get("args", [])])
print(json.dumps(out))
"#;
    let out = Command::new(venv_python())
        .arg("-c")
        .arg(script)
        .args(&manifests)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found: Value = serde_json::from_slice(&out.stdout).expect("json");
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
    }
    let configs = found["nats"].as_array().expect("nats configs");
    assert!(configs.len() >= 2, "{found}");
    let tmp = tempfile::tempdir().expect("tmp");
    let nats = beacon::nats::NatsServer::find_binary().expect("nats-server");
    for c in configs {
        let file = tmp
            .path()
            .join(format!("{}.conf", c[1].as_str().expect("name")));
        std::fs::write(&file, c[2].as_str().expect("conf")).expect("write");
        let out = Command::new(&nats)
            .env("POD_NAME", "nats-hub-0")
            .arg("-t")
            .arg("-c")
            .arg(&file)
            .output()
            .expect("nats-server -t");
        assert!(
            out.status.success(),
            "{} {}: {}{}",
            c[0],
            c[1],
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
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
