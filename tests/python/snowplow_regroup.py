"""A real Snowplow tracker (snowplow-tracker 1.1.0) that regroups retried events.

Usage: snowplow_regroup.py <http://ip:port> <app id>

The emitter sends 5 page views in one POST. The test stalls the bus, so the edge answers
503 (the batch may still be stored). The tracker then does what its emitter does: it puts
the failed events back into its buffer and retries them after a delay, together with
whatever was tracked meanwhile, so the retry is a different request.

Talks to the test on stdin/stdout, one line each:
- prints `failed <n>` when the first request failed, then waits for a line on stdin (the
  test resumes the bus and restarts ingest meanwhile);
- tracks 3 more page views while the failed 5 wait for their retry (inside the failure
  callback, before the emitter re-buffers them, so they are certain to share the retry);
- prints one JSON line once everything was delivered: every event id it tracked, the
  requests that failed, and the sizes of the requests that succeeded.
"""
import json
import logging
import sys
import threading

from snowplow_tracker import Emitter, PageView, Subject, Tracker
import snowplow_tracker

BASE = sys.argv[1].rstrip("/")
APP = sys.argv[2]
HOST, PORT = BASE.split("//", 1)[1].split(":")
snowplow_tracker.logger.setLevel(logging.ERROR)

ids = []
failed = []
delivered = []
all_delivered = threading.Event()
tracker = None


def page(i):
    ids.append(tracker.track(PageView(page_url=f"https://regroup.example/p/{i}")))


def on_failure(n_ok, events):
    failed.append(len(events))
    if len(failed) == 1:
        print(f"failed {len(events)}", flush=True)
        if not sys.stdin.readline():
            raise SystemExit("the test went away")
        for i in range(5, 8):
            page(i)


def on_success(events):
    delivered.append(len(events))
    if sum(delivered) >= len(ids):
        all_delivered.set()


emitter = Emitter(HOST, protocol="http", port=int(PORT), method="post", batch_size=5,
                  on_failure=on_failure, on_success=on_success)
# A browser's user agent: the requests library's own would mark the events as a bot's, and
# bots stay out of `events`.
subject = Subject().set_useragent(
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36")
tracker = Tracker(namespace="regroup", emitters=emitter, app_id=APP, subject=subject)
# The fifth event fills the buffer: its flush is the request the bus stall fails.
for i in range(5):
    page(i)

# The emitter's own retry timer resends the buffer (again after each failure); delivery is
# reported by its success callback.
if not all_delivered.wait(60):
    raise SystemExit(f"not delivered: {emitter.event_store.size()} events left")
print(json.dumps({"ids": ids, "failed": failed, "delivered": delivered}), flush=True)
