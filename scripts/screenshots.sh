#!/usr/bin/env bash
# Refreshes the screenshots in docs/screenshots/ (the merchant dashboard at desktop and phone
# width, the operator page) by running the browser test (tests/dashboard.rs: beacon up, real
# traffic, headless Chromium), which saves them.
set -euo pipefail
cd "$(dirname "$0")/.."
export BEACON_SETUP_BROWSER=1
source scripts/setup.sh
mkdir -p docs/screenshots
BEACON_TEST_ARTIFACTS="$PWD/docs/screenshots/.run" \
  cargo test --release -p beacon --test dashboard -- --test-threads=1
for f in dashboard-desktop.png dashboard-phone.png dashboard-filtered.png login.png ops.png; do
  cp "docs/screenshots/.run/dashboard/$f" "docs/screenshots/$f"
done
rm -rf docs/screenshots/.run
say "screenshots refreshed in docs/screenshots/"
