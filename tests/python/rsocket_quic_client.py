"""rsocket-py's QUIC client against a Beacon edge (interop check driven by tests/interop.rs).

Usage: rsocket_quic_client.py HOST PORT CA_PEM WRITE_KEY RUN_ID
Sends one request-response batch and one fire-and-forget batch of 5 events each and prints
a JSON line with the edge's answer. Exits non-zero on any error.
"""

import asyncio
import json
import sys
import time
from contextlib import asynccontextmanager

from aioquic.quic.configuration import QuicConfiguration
from rsocket.helpers import single_transport_provider
from rsocket.payload import Payload
from rsocket.rsocket_client import RSocketClient
from rsocket.transports.aioquic_transport import rsocket_connect


def batch(prefix: str, n: int) -> bytes:
    """`n` pageviews with ids `<prefix>-<i>`, as a Beacon batch."""
    now = int(time.time() * 1000)
    events = [
        {
            "event_id": f"{prefix}-{i}",
            "name": "pageview",
            "ts": now,
            "url": f"https://py.example/{prefix}/{i}",
            "visitor_id": f"py-visitor-{i}",
        }
        for i in range(n)
    ]
    return json.dumps({"events": events}).encode()


@asynccontextmanager
async def connect(host: str, port: int, ca: str, key: str, **client_args):
    """An rsocket-py client on QUIC, set up with the merchant's write key."""
    config = QuicConfiguration(is_client=True)
    config.load_verify_locations(ca)
    async with rsocket_connect(host, port, configuration=config) as transport:
        async with RSocketClient(
            single_transport_provider(transport),
            setup_payload=Payload(metadata=key.encode()),
            metadata_encoding=b"text/plain",
            data_encoding=b"application/json",
            **client_args,
        ) as client:
            yield client


async def main(host: str, port: int, ca: str, key: str, run_id: str) -> None:
    async with connect(host, port, ca, key) as client:
        rr = batch(f"py-{run_id}-rr", 5)
        answer = await asyncio.wait_for(client.request_response(Payload(rr)), 20)
        await client.fire_and_forget(Payload(batch(f"py-{run_id}-fnf", 5)))
        # A request behind it on the same stream: the edge reads frames in order, so once
        # this is answered it has read the fire-and-forget batch, and closing cannot lose it.
        locate = Payload(b"", metadata=b"locate:")
        await asyncio.wait_for(client.request_response(locate), 20)
        print(json.dumps({"request_response": json.loads(answer.data)}), flush=True)


if __name__ == "__main__":
    host, port, ca, key, run_id = sys.argv[1:6]
    asyncio.run(main(host, int(port), ca, key, run_id))
