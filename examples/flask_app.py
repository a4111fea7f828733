"""A Flask view that pushes to hub clients with :class:`hub.Publisher`.

Run it by hand (three terminals, from the repository root)::

    redis-server --port 6379
    hub serve --redis-url redis://127.0.0.1:6379/0
    HUB_REDIS_URL=redis://127.0.0.1:6379/0 flask --app examples/flask_app.py run --port 5000

(``flask --app`` finds the ``create_app`` factory), then connect a client to
``ws://127.0.0.1:8765/ws?user=alice`` (README, "Using it") and::

    curl -X POST http://127.0.0.1:5000/notify/alice -H 'Content-Type: application/json' \\
         -d '{"text": "you have mail"}'

The client receives ``{"type":"message","channel":"user:alice","data":{"text":"you have mail"}}``.
The reply is ``{"reached": 1}``: the number of hub processes that had a subscriber (0 means
nobody was listening, which is not an error: pushes are fire-and-forget).
"""

from __future__ import annotations

import os

from flask import Flask, jsonify, request

from hub import Publisher


def create_app(redis_url: str | None = None) -> Flask:
    """The Flask app. ``redis_url``: the hubs' Redis (default ``$HUB_REDIS_URL``, else
    ``redis://127.0.0.1:6379/0``). One :class:`hub.Publisher` (a redis-py connection pool,
    safe to share between threads) serves every request."""
    app = Flask(__name__)
    publisher = Publisher(redis_url or os.environ.get("HUB_REDIS_URL",
                                                      "redis://127.0.0.1:6379/0"))

    @app.post("/notify/<user_id>")
    def notify(user_id: str):
        """Push ``{"text": ...}`` to every connection of ``user_id``."""
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            return jsonify(error='expected a JSON object {"text": "..."}'), 400
        try:
            reached = publisher.publish_to_user(user_id, {"text": body["text"]})
        except ValueError as exc:  # an invalid user id: nothing was sent
            return jsonify(error=str(exc)), 400
        return jsonify(reached=reached)

    return app


if __name__ == "__main__":
    create_app().run(port=5000)
