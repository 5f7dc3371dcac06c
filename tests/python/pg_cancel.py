"""Cancels a running query the way drivers do (a Postgres CancelRequest on a new
connection, psycopg's conn.cancel_safe()), and prints what the query got back.

usage: pg_cancel.py PORT USER PASSWORD
prints one JSON line: {"sqlstate": ..., "message": ..., "seconds": ...}
"""
import json
import sys
import threading
import time

import psycopg

port, user, password = sys.argv[1], sys.argv[2], sys.argv[3]
conn = psycopg.connect(host="127.0.0.1", port=int(port), user=user, password=password,
                       dbname="beacon", sslmode="disable", autocommit=True)
# Run the query on this connection in a thread; cancel from the main thread once it runs.
result = {}
started = threading.Event()


def run():
    started.set()
    t = time.monotonic()
    try:
        conn.execute("SELECT sum(value) FROM generate_series(1, 100000000000)").fetchall()
        result.update(sqlstate=None, message="finished")
    except psycopg.Error as e:
        result.update(sqlstate=e.sqlstate, message=str(e).strip())
    result["seconds"] = round(time.monotonic() - t, 3)


worker = threading.Thread(target=run)
worker.start()
started.wait()
# A cancel that reaches the server before the query runs is a no-op, so cancel again until
# the worker has its answer (waiting on the worker, bounded).
deadline = time.monotonic() + 20
while worker.is_alive() and time.monotonic() < deadline:
    conn.cancel_safe()
    worker.join(timeout=0.3)
worker.join(timeout=30)
print(json.dumps(result))
