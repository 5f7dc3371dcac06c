"""Drives a Beacon edge's HTTP collectors with the real third-party clients.

Usage: trackers.py <http://ip:port>

Sends, and prints one JSON line describing what was sent (ids the test then looks for):
- snowplow-tracker 1.1.0: POST (base64 off) page view, structured and self-describing
  events; GET (base64 on) page view and self-describing event;
- ga4mp 2.0.4 (GtagMP, the Measurement Protocol): page_view and purchase;
- plausible-events 0.1.0: a page view and a custom event (long keys, JSON);
- Plausible's browser script shape by hand: short keys, text/plain, props as a JSON string,
  revenue, from a phone behind a proxy (X-Forwarded-For).
Exits non-zero if any client could not deliver.
"""
import json
import logging
import sys
import threading
import time
import urllib.request

from ga4mp import GtagMP
from plausible_events import PlausibleEvents
from snowplow_tracker import (Emitter, PageView, SelfDescribing, SelfDescribingJson,
                              StructuredEvent, Subject, Tracker)
import snowplow_tracker

BASE = sys.argv[1].rstrip("/")
HOST, PORT = BASE.split("//", 1)[1].split(":")
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
          "(KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36")
IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
          "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1")
snowplow_tracker.logger.setLevel(logging.WARNING)
logging.getLogger("ga4mp").setLevel(logging.ERROR)
logging.getLogger().setLevel(logging.ERROR)
sent = {}


def drain(tracker, emitter, timeout=30):
    """flush() returns while a retry is pending; wait until the buffer is really empty."""
    end = time.monotonic() + timeout
    tracker.flush()
    while emitter.event_store.size() and time.monotonic() < end:
        time.sleep(0.1)
        tracker.flush()
    return emitter.event_store.size() == 0


failures = []


def on_failure(n_ok, failed):
    failures.append(len(failed))


def snowplow(method, base64):
    em = Emitter(HOST, protocol="http", port=int(PORT), method=method, on_failure=on_failure)
    subject = Subject().set_user_id("user-42").set_useragent(CHROME)
    t = Tracker(namespace="ns-" + method, emitters=em, app_id="shop-1",
                encode_base64=base64, subject=subject)
    ctx = SelfDescribingJson("iglu:com.acme/merchant/jsonschema/1-0-0", {"tier": "gold"})
    t.track(PageView(page_url=f"https://shop.example/{method}/p/1", page_title="Product 1",
                     referrer="https://www.google.com/", context=[ctx]))
    if method == "post":
        t.track(StructuredEvent(category="checkout", action="add-to-basket", label="sku-1",
                                value=2.5))
    t.track(SelfDescribing(SelfDescribingJson(
        "iglu:com.acme/purchase/jsonschema/1-0-0", {"order_id": f"o-{method}", "total": 19.99})))
    if not drain(t, em) or failures:
        raise SystemExit(f"snowplow {method}: events not delivered ({failures})")


snowplow("post", False)
snowplow("get", True)

ga = GtagMP(api_secret="SECRET123", measurement_id="G-TEST123", client_id="555.1700000000")
ga._base_domain = f"{BASE}/mp/collect"
ga._validation_domain = f"{BASE}/debug/mp/collect"
ga.store.set_user_property("user_id", "user-ga")
pv = ga.create_new_event("page_view")
pv.set_event_param("page_location", "https://shop.example/ga/landing")
pv.set_event_param("page_title", "GA landing")
ga.send([pv, {"name": "purchase", "params": {"currency": "EUR", "value": 9.5,
                                              "transaction_id": "t-ga"}}])


class LocalPlausible(PlausibleEvents):
    def _get_ip(self):  # the package asks api.ipify.org otherwise (no internet here)
        return "89.160.20.112"


pe = LocalPlausible(domain="shop.example", api=f"{BASE}/api/event", timeout=1.0,
                    headers={"User-Agent": CHROME})
pe.worker.daemon = True
pe.pageview("/pl/home")
pe.event("signup", dict(plan="pro"), path="/pl/signup")
done = threading.Event()
pe._enqueue_task(done.set)
if not done.wait(20):
    raise SystemExit("plausible-events: events not delivered")

body = json.dumps({"n": "Purchase", "u": "https://www.shop.example/pl/checkout", "d": "shop.example",
                   "r": "https://news.example/", "p": json.dumps({"plan": "pro"}),
                   "$": json.dumps({"amount": "19.99", "currency": "EUR"})}).encode()
req = urllib.request.Request(f"{BASE}/api/event", data=body, method="POST", headers={
    "Content-Type": "text/plain", "User-Agent": IPHONE, "X-Forwarded-For": "10.9.9.9, 81.2.69.142",
    "Origin": "https://shop.example"})
with urllib.request.urlopen(req, timeout=10) as r:
    if r.status != 202:
        raise SystemExit(f"plausible short keys: {r.status}")
    sent["plausible_cors"] = r.headers.get("Access-Control-Allow-Origin")

print(json.dumps(sent))
