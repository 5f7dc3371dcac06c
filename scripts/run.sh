#!/usr/bin/env bash
# One command from a fresh machine to a running pipeline: installs what is missing, builds,
# starts `beacon up` (nats-server, edge, ingest, rollups on this machine), creates a demo
# merchant with the UTM plugin, sends a burst of demo traffic and shows the result in SQL.
# Leaves `beacon up` running in the foreground; Ctrl-C stops it gracefully.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

DATA_DIR="${BEACON_DATA_DIR:-$PWD/.beacon-data}"
BEACON="$CARGO_TARGET_DIR/release/beacon"
mkdir -p "$DATA_DIR"
rm -f "$DATA_DIR/endpoints.json"

say "starting beacon up (data in $DATA_DIR)"
"$BEACON" up --data-dir "$DATA_DIR" --plugins-dir "$BEACON_PLUGINS_DIR" &
UP_PID=$!
trap 'kill -TERM $UP_PID 2>/dev/null; wait $UP_PID' EXIT INT TERM
for _ in $(seq 1 300); do
  [ -f "$DATA_DIR/endpoints.json" ] && break
  kill -0 $UP_PID 2>/dev/null || { echo "beacon up exited" >&2; exit 1; }
  sleep 0.1
done

count() { "$BEACON" sql --data-dir "$DATA_DIR" --format csv "SELECT count(*) FROM raw_events" | tail -n 1; }
BEFORE=$(count)
say "sending demo traffic (3 merchants, 20000 events, UTM plugin attached)"
"$BEACON" demo --data-dir "$DATA_DIR" --events 20000 --merchants 3 --attach-plugin "$BEACON_PLUGINS_DIR/beacon_plugin_utm.wasm"

say "waiting for the events to land in Iceberg"
for _ in $(seq 1 60); do
  [ "$(count)" -ge $((BEFORE + 20000)) ] && break
  sleep 0.5
done
"$BEACON" sql --data-dir "$DATA_DIR" "SELECT merchant_id, count(*) AS events, count(DISTINCT visitor_id) AS visitors FROM events GROUP BY merchant_id ORDER BY merchant_id"

DASHBOARD=$(python3 -c 'import json,sys; e=json.load(open(sys.argv[1])); print("%s/dashboard/" % e["metrics_http"]) if e.get("metrics_http") else print("(waiting for the warehouse)")' "$DATA_DIR/endpoints.json")
DEMO_TOKEN=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1]))[0]; print("%s (%s)" % (m.get("read_token", "beacon merchant read-token --merchant " + m["id"]), m["name"]))' "$DATA_DIR/demo-merchants.json")

cat <<MSG

Beacon is running. Endpoints: $DATA_DIR/endpoints.json
  Dashboard: $DASHBOARD
             log in with the read token $DEMO_TOKEN
  SQL:      $BEACON sql --data-dir $DATA_DIR "SELECT * FROM rollups ORDER BY hour DESC LIMIT 10"
  Traffic:  $BEACON demo --data-dir $DATA_DIR --events 100000 --merchants 5
Ctrl-C stops it (in-flight batches are drained first).
MSG
wait $UP_PID
