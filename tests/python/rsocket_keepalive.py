"""rsocket-py, with a short keepalive lifetime, against an edge that holds its connection
back for a rate-limited merchant (driven by tests/interop.rs).

Usage: rsocket_keepalive.py HOST PORT CA_PEM WRITE_KEY BIG_BATCH
Sends a batch of BIG_BATCH events (over the merchant's burst: accepted, leaving the
allowance in debt), then a batch of one, which the edge reads only once the allowance has
refilled. Meanwhile the edge reads nothing from the connection, so it does not answer the
client's KEEPALIVEs. Prints a JSON line: both answers, how long the second took, and how
often the client found the server silent for longer than its lifetime (1 s).
"""

import asyncio
import json
import sys
import time
from datetime import timedelta

from rsocket.payload import Payload
from rsocket.request_handler import BaseRequestHandler

from rsocket_quic_client import batch, connect

TIMEOUTS = []


class Handler(BaseRequestHandler):
    async def on_keepalive_timeout(self, time_since_last_keepalive, rsocket):
        TIMEOUTS.append(time_since_last_keepalive.total_seconds())


async def main(host: str, port: int, ca: str, key: str, big: int) -> None:
    async with connect(
        host,
        port,
        ca,
        key,
        handler_factory=Handler,
        keep_alive_period=timedelta(milliseconds=200),
        max_lifetime_period=timedelta(seconds=1),
    ) as client:
        first = await asyncio.wait_for(client.request_response(Payload(batch("ka-big", big))), 20)
        started = time.monotonic()
        second = await asyncio.wait_for(client.request_response(Payload(batch("ka-one", 1))), 60)
        waited = time.monotonic() - started
        print(
            json.dumps(
                {
                    "first": json.loads(first.data),
                    "second": json.loads(second.data),
                    "second_s": waited,
                    "keepalive_timeouts": TIMEOUTS,
                    "server_alive": client.is_server_alive(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    host, port, ca, key, big = sys.argv[1:6]
    asyncio.run(main(host, int(port), ca, key, int(big)))
