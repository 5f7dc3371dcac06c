#!/usr/bin/env bash
# Runs the whole test suite on real components: installs and builds what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
export BEACON_SETUP_BROWSER=1
source scripts/setup.sh

say "running tests"
cargo test --release --workspace -- --test-threads=1 "$@"
say "running plugin SDK, template and example plugin unit tests (host target)"
cargo test --release --manifest-path plugins/examples/Cargo.toml --workspace

say "checking the edge does not link the warehouse"
if cargo tree -p beacon-edge -e normal --prefix none | grep -qiE '^(datafusion|iceberg|arrow|parquet) '; then
  echo "beacon-edge depends on DataFusion/Iceberg/Arrow: the edge must stay small" >&2
  exit 1
fi
