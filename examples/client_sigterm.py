"""A hub.client consumer that stops cleanly on SIGTERM (the websockets FAQ's pattern).

It subscribes to a channel and prints each message as one JSON line on stdout; SIGTERM (or
SIGINT) closes the client, which ends the subscription's iterator, so the program leaves its
loop and exits 0 with no task left behind. A supervisor (systemd, Kubernetes) stopping it
loses nothing on a history channel: the next run can pass ``since``.

Run it by hand (from the repository root)::

    hub serve --client-publish 'news' &
    python examples/client_sigterm.py ws://127.0.0.1:8765/ws news &
    kill -TERM %2        # prints "stopped" and exits 0

A token for a hub with ``--jwt-secret`` is read from ``$HUB_TOKEN`` and sent in-band.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

from hub.client import Gap, Message, connect


async def consume(url: str, channel: str) -> None:
    """Print every message of ``channel`` until SIGTERM or SIGINT."""
    async with connect(url, token=os.environ.get("HUB_TOKEN") or None) as client:
        # Close the client when receiving SIGTERM: the iterator below then ends.
        loop = asyncio.get_running_loop()
        closing: set[asyncio.Task[None]] = set()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: closing.add(loop.create_task(client.close())))
        sub = await client.subscribe(channel)
        print(json.dumps({"ready": channel}), flush=True)
        while sub.active:
            try:
                async for item in sub:
                    if isinstance(item, Message):
                        print(json.dumps({"channel": item.channel, "data": item.data,
                                          "offset": item.offset}), flush=True)
            except Gap as gap:  # lost messages: reload from the application, go on
                print(json.dumps({"gap": str(gap)}), flush=True)
        for task in closing:
            await task
    print("stopped", flush=True)


def main(argv: list[str]) -> int:
    """``client_sigterm.py URL CHANNEL``: exit 0 after a clean stop."""
    url, channel = (argv + ["ws://127.0.0.1:8765/ws", "news"][len(argv):])[:2]
    asyncio.run(consume(url, channel))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
