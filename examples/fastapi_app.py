"""A FastAPI app that pushes to hub clients with :class:`hub.AsyncPublisher`.

The publisher is opened when the app starts and closed when it stops, in the app's lifespan,
so every request shares one Redis connection pool and shutdown leaves no connection behind.

Run it by hand (three terminals, from the repository root; ``pip install fastapi uvicorn``)::

    redis-server --port 6379
    hub serve --redis-url redis://127.0.0.1:6379/0
    HUB_REDIS_URL=redis://127.0.0.1:6379/0 uvicorn --app-dir examples fastapi_app:app --port 8000

then subscribe a client to ``news`` on ``ws://127.0.0.1:8765/ws`` (README, "Using it") and::

    curl -X POST http://127.0.0.1:8000/announce -H 'Content-Type: application/json' \\
         -d '{"channel": "news", "data": {"title": "hi"}}'

The client receives ``{"type":"message","channel":"news","data":{"title":"hi"}}``; the reply
is ``{"reached": 1}``, the number of hub processes that had a subscriber.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel

from hub import AsyncPublisher


class Announcement(BaseModel):
    """The body of ``POST /announce``: a hub channel name and any JSON value."""

    channel: str
    data: Any


def create_app(redis_url: str | None = None) -> FastAPI:
    """The FastAPI app. ``redis_url``: the hubs' Redis (default ``$HUB_REDIS_URL``, else
    ``redis://127.0.0.1:6379/0``)."""
    url = redis_url or os.environ.get("HUB_REDIS_URL", "redis://127.0.0.1:6379/0")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.hub = AsyncPublisher(url)
        try:
            yield
        finally:
            await app.state.hub.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/announce")
    async def announce(body: Announcement, request: Request) -> dict[str, int]:
        """Publish ``body.data`` to ``body.channel``; 422 for an invalid channel name."""
        try:
            reached = await request.app.state.hub.publish(body.channel, body.data)
        except ValueError as exc:  # an invalid channel name: nothing was sent
            raise HTTPException(status_code=422, detail=str(exc)) from None
        return {"reached": reached}

    return app


app = create_app()
"""The app uvicorn serves (``uvicorn --app-dir examples fastapi_app:app``)."""
