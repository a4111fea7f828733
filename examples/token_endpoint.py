"""Minting hub tokens in your backend, and a Flask route that hands one to the logged-in user.

With ``hub serve --jwt-secret SECRET`` every connection needs an HS256 JWT signed with the same
secret (docs/protocol.md section 2). Your web app, which knows who is logged in, mints it:
``sub`` is the user id (the personal channel ``user:<sub>``), ``exp`` bounds its life, and
``channels`` lists the ``private:`` channels (exact names, or prefixes ending in ``*``) the
user may subscribe to. The browser fetches ``GET /hub-token`` and then, on its WebSocket,
sends the token in-band as its first frame::

    const {token} = await (await fetch("/hub-token")).json();
    const ws = new WebSocket("wss://hub.example.com/ws");
    ws.onopen = () => ws.send(JSON.stringify({op: "connect", token, id: 1}));

(services may send ``Authorization: Bearer <token>`` on the handshake instead). Before
``exp`` the client fetches a new token and sends ``{"op":"refresh","token":...}``.

In any other framework, call ``mint_token(request.user.id, channels=[...])`` in the view
that knows the user; only the route below is Flask's.

Run it by hand (from the repository root, ``pip install flask``; PyJWT comes with hub; the
secret must be the hub's, at least 32 bytes)::

    export HUB_JWT_SECRET=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
    hub serve &                         # reads HUB_JWT_SECRET too
    flask --app examples/token_endpoint.py run --port 5000
    curl -c jar http://127.0.0.1:5000/login/alice      # a stand-in for your real login
    curl -b jar http://127.0.0.1:5000/hub-token   # {"token": "...", "exp": ..., "user": "alice"}

then open ``ws://127.0.0.1:8765/ws`` and send ``{"op":"connect","token":"<token>","id":1}``
first: the reply is ``{"type":"ack","id":1,"user":"alice",...}``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

import jwt
from flask import Flask, jsonify, session

#: The shortest secret :func:`mint_token` accepts, in bytes: an HS256 key should be at least as
#: long as the hash (RFC 7518 section 3.2).
MIN_SECRET_BYTES = 32


def hub_secret(secret: str | None = None) -> str:
    """``secret``, or ``$HUB_JWT_SECRET`` when it is None. Raises ValueError when there is
    none or it is shorter than :data:`MIN_SECRET_BYTES` bytes (UTF-8)."""
    if secret is None:
        secret = os.environ.get("HUB_JWT_SECRET")
    if not secret:
        raise ValueError("no secret: pass one or set HUB_JWT_SECRET (the hub's --jwt-secret)")
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"the secret must be at least {MIN_SECRET_BYTES} bytes long")
    return secret


def mint_token(user_id: str, channels: Iterable[str] = (), ttl: int = 600, *,
               secret: str | None = None) -> str:
    """An HS256 JWT for hub: claims ``sub`` (``user_id``), ``exp`` (now + ``ttl`` seconds)
    and ``channels`` (the ``private:`` channels granted: exact names, or prefixes ending in
    ``*``; a list of strings).

    ``secret`` is the hub's ``--jwt-secret``; by default ``$HUB_JWT_SECRET``, the variable
    ``hub serve`` reads too. Raises ValueError for an empty ``user_id``, a ``ttl`` that is not
    a positive number of seconds, or a secret that is missing or shorter than
    :data:`MIN_SECRET_BYTES` bytes (UTF-8). The hub checks the rest of the user id (1-123
    characters of ``A-Z a-z 0-9 _ . : @ / -``) and refuses a token with another one.
    """
    if not user_id:
        raise ValueError("user_id must not be empty")
    if ttl <= 0:
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl}")
    secret = hub_secret(secret)
    if isinstance(channels, str):  # a lone name would be split into characters
        raise ValueError("channels must be a list of channel names, not one string")
    claims = {"sub": user_id, "exp": int(time.time()) + int(ttl), "channels": list(channels)}
    return jwt.encode(claims, secret, algorithm="HS256")


def create_app(secret: str | None = None,
               channels_for: Callable[[str], Iterable[str]] = lambda user_id: (),
               ttl: int = 600) -> Flask:
    """A Flask app with ``GET /hub-token``: 200 ``{"token", "exp", "user"}`` for the user in
    the session, 401 when nobody is logged in. ``secret`` defaults to ``$HUB_JWT_SECRET``
    (ValueError at once when there is none, or it is too short: :func:`hub_secret`);
    ``channels_for(user_id)`` says which ``private:`` channels to grant; ``ttl``: seconds.

    ``GET /login/<user_id>`` stands in for your real login: it only puts the user in the
    session (delete it in a real app).
    """
    secret = hub_secret(secret)
    app = Flask(__name__)
    app.secret_key = os.environ.get("FLASK_SECRET_KEY") or os.urandom(32)

    @app.get("/login/<user_id>")
    def login(user_id: str):
        session["user_id"] = user_id
        return jsonify(user=user_id)

    @app.get("/hub-token")
    def hub_token():
        user_id = session.get("user_id")
        if not user_id:
            return jsonify(error="not logged in"), 401
        token = mint_token(user_id, channels_for(user_id), ttl, secret=secret)
        exp = jwt.decode(token, options={"verify_signature": False})["exp"]
        return jsonify(token=token, exp=exp, user=user_id)

    return app
