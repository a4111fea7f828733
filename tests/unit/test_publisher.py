"""The publishers refuse bad channel names before anything is sent (no Redis needed: nothing
listens on the URL they are given)."""

from __future__ import annotations

import pytest

from hub import AsyncPublisher, Publisher


def test_publisher_rejects_bad_channels_before_sending():
    # Nothing listens on port 1: a ValueError proves nothing was sent.
    with Publisher("redis://127.0.0.1:1/0") as pub:
        for bad in ("", "has space", "x" * 129, "caf\u00e9", None):
            with pytest.raises(ValueError):
                pub.publish(bad, {})
        with pytest.raises(ValueError):
            pub.publish_to_user("bad user", {})


async def test_async_publisher_rejects_bad_channels():
    async with AsyncPublisher("redis://127.0.0.1:1/0") as pub:
        with pytest.raises(ValueError):
            await pub.publish("no spaces allowed", 1)
