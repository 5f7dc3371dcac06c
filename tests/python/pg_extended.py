"""Queries Beacon's SQL endpoint with psycopg 3 over the extended protocol (server-side
parameters, as drivers and BI tools do). Prints one JSON object.

usage: pg_extended.py HOST PORT USER PASSWORD MERCHANT_TO_PROBE
"""
import json
import sys

import psycopg

host, port, user, password, other = sys.argv[1:6]
out = {}
with psycopg.connect(host=host, port=int(port), user=user, password=password,
                     dbname="beacon", connect_timeout=10, sslmode="disable") as conn:
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM events WHERE name = %s", ("pageview",))
        out["pageviews"] = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM events WHERE merchant_id = %s", (other,))
        out["other_merchant_rows"] = cur.fetchone()[0]
        cur.execute("SELECT count(DISTINCT merchant_id) FROM events")
        out["merchants_visible"] = cur.fetchone()[0]
print(json.dumps(out))
