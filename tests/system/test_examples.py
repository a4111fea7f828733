"""The examples in examples/ work: each runs against a real hub process and a real Redis, and a
real WebSocket client receives what the example pushes."""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import json
import sys
import time
from types import ModuleType

import httpx
import jwt
import pytest
from asgi_lifespan import LifespanManager

from hub import Publisher
from tests.helpers import (
    ROOT,
    command,
    message,
    no_message,
    open_ws,
    recv_json,
    subscribe,
    wait_until_async,
)

SECRET = "examples-test-secret-of-at-least-32-bytes!"


EXAMPLES = {
    "client_sigterm": ROOT / "examples" / "client_sigterm.py",
    "django_notify": ROOT / "examples" / "django_notify" / "app.py",
    "fastapi_app": ROOT / "examples" / "fastapi_app.py",
    "flask_app": ROOT / "examples" / "flask_app.py",
    "token_endpoint": ROOT / "examples" / "token_endpoint.py",
}


def load_example(name: str) -> ModuleType:
    """Import the example ``name`` (a key of EXAMPLES) by path, under a name no other module
    uses (not as an installed package: examples/ is not one)."""
    module_name = f"hub_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES[name])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested_and_says_how_to_run_it():
    found = {p for p in (ROOT / "examples").rglob("*.py") if "__pycache__" not in p.parts}
    assert found == set(EXAMPLES.values())
    for path in found:
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and "Run it by hand" in doc and "hub serve" in doc, path


# -- Django -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def django_example(tmp_path_factory):
    module = load_example("django_notify")
    module.configure(tmp_path_factory.mktemp("django"), "redis://127.0.0.1:1/0",
                     notes_per_user=1)
    return module


async def test_django_pushes_a_committed_write_and_nothing_on_rollback(
        django_example, redis_server, hub_factory):
    from django.db import connection
    from django.test import Client, override_settings

    hub = hub_factory(redis=redis_server)

    def post(user_id: str, text: str):
        # Django refuses database calls from a thread running an event loop: use another.
        with override_settings(HUB_REDIS_URL=redis_server.url):
            return Client().post(f"/notes/{user_id}", {"text": text})

    def count(user_id: str) -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM notes WHERE user_id = %s", [user_id])
            return cursor.fetchone()[0]

    async with open_ws(hub.ws_url + "?user=dj-alice") as ws:
        response = await asyncio.to_thread(post, "dj-alice", "hello")
        assert response.status_code == 201, response.content
        note = response.json()["note"]
        assert await recv_json(ws) == message("user:dj-alice", {"note": note, "text": "hello"})

        # Past the quota the view's transaction rolls back after the insert: on_commit never
        # runs, so nothing is pushed and the row is gone.
        response = await asyncio.to_thread(post, "dj-alice", "one too many")
        assert response.status_code == 429, response.content
        await no_message(ws, 0.5)
        assert await asyncio.to_thread(count, "dj-alice") == 1


# -- FastAPI ------------------------------------------------------------------------------


async def test_fastapi_lifespan_publisher_pushes(redis_server, hub_factory):
    example = load_example("fastapi_app")
    hub = hub_factory(redis=redis_server)
    redis_client = redis_server.client()
    app = example.create_app(redis_server.url)
    async with open_ws(hub.ws_url) as ws:
        await subscribe(ws, "news")
        clients_before = len(redis_client.client_list())
        # LifespanManager runs the app's lifespan (ASGITransport alone does not): the publisher
        # is opened before the first request and closed after the last.
        async with LifespanManager(app) as manager, httpx.AsyncClient(
                transport=httpx.ASGITransport(app=manager.app), base_url="http://app") as client:
            ok = await client.post("/announce", json={"channel": "news", "data": {"title": "hi"}})
            assert ok.status_code == 200 and ok.json() == {"reached": 1}
            assert await recv_json(ws) == message("news", {"title": "hi"})
            bad = await client.post("/announce", json={"channel": "no spaces", "data": 1})
            assert bad.status_code == 422 and "bad_channel" in bad.text
            # The publisher holds one Redis connection while the app runs.
            assert len(redis_client.client_list()) == clients_before + 1
        await no_message(ws)
        # The lifespan's end closed it.
        await wait_until_async(lambda: len(redis_client.client_list()) <= clients_before, 5,
                               what="the publisher's connection closed")


# -- Flask --------------------------------------------------------------------------------


async def test_flask_view_pushes(redis_server, hub_factory):
    example = load_example("flask_app")
    hub = hub_factory(redis=redis_server)
    client = example.create_app(redis_server.url).test_client()
    async with open_ws(hub.ws_url + "?user=fl-bob") as ws:
        response = client.post("/notify/fl-bob", json={"text": "you have mail"})
        assert response.status_code == 200 and response.get_json() == {"reached": 1}
        assert await recv_json(ws) == message("user:fl-bob", {"text": "you have mail"})

        assert client.post("/notify/fl-bob", json={"txt": 1}).status_code == 400
        assert client.post("/notify/no%20spaces", json={"text": "x"}).status_code == 400
        await no_message(ws)


# -- Token endpoint -----------------------------------------------------------------------


def fetch_token(example: ModuleType, user_id: str) -> str:
    app = example.create_app(SECRET, channels_for=lambda user: ("private:team-red:*",
                                                                f"private:{user}-reports"))
    client = app.test_client()
    assert client.get("/hub-token").status_code == 401  # nobody logged in
    with client.session_transaction() as session:
        session["user_id"] = user_id
    response = client.get("/hub-token")
    assert response.status_code == 200, response.data
    body = response.get_json()
    assert body["user"] == user_id
    return body["token"]


def test_mint_token_claims(monkeypatch):
    monkeypatch.delenv("HUB_JWT_SECRET", raising=False)
    example = load_example("token_endpoint")
    token = example.mint_token("carol", channels=["private:a"], ttl=60, secret=SECRET)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "carol" and claims["channels"] == ["private:a"]
    assert abs(claims["exp"] - (time.time() + 60)) < 30  # now + ttl, give or take
    for bad in ({"user_id": ""}, {"ttl": 0}, {"channels": "private:a"},
                {"secret": "too short"}, {"secret": None}):
        with pytest.raises(ValueError):
            example.mint_token(**{"user_id": "x", "secret": SECRET, **bad})


def test_mint_token_reads_the_hubs_variable(monkeypatch):
    example = load_example("token_endpoint")
    monkeypatch.setenv("HUB_JWT_SECRET", SECRET)
    token = example.mint_token("carol")
    assert jwt.decode(token, SECRET, algorithms=["HS256"])["channels"] == []
    assert example.create_app().test_client().get("/hub-token").status_code == 401
    monkeypatch.delenv("HUB_JWT_SECRET")
    with pytest.raises(ValueError):
        example.create_app()


async def check_token_grants(ws, redis_server, user_id: str) -> None:
    assert await command(ws, op="subscribe", channel="private:team-red:general", id=2) == {
        "type": "ack", "id": 2}
    reply = await command(ws, op="subscribe", channel="private:team-blue:general", id=3)
    assert reply["type"] == "error" and reply["code"] == "forbidden", reply
    with Publisher(redis_server.url) as pub:
        assert pub.publish_to_user(user_id, {"text": "hi"}) == 1
        assert pub.publish("private:team-red:general", 7) == 1
    assert await recv_json(ws) == message(f"user:{user_id}", {"text": "hi"})
    assert await recv_json(ws) == message("private:team-red:general", 7)


async def test_token_endpoint_header_auth(redis_server, hub_factory):
    example = load_example("token_endpoint")
    hub = hub_factory("--jwt-secret", SECRET, redis=redis_server)
    token = fetch_token(example, "tk-dave")
    async with open_ws(hub.ws_url,
                       additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        await check_token_grants(ws, redis_server, "tk-dave")


async def test_token_endpoint_in_band_connect(redis_server, hub_factory):
    example = load_example("token_endpoint")
    hub = hub_factory("--jwt-secret", SECRET, redis=redis_server)
    token = fetch_token(example, "tk-erin")
    async with open_ws(hub.ws_url) as ws:  # no token on the handshake: the browser's way
        await ws.send(json.dumps({"op": "connect", "token": token, "id": 1}))
        reply = await recv_json(ws)
        assert reply["type"] == "ack" and reply["id"] == 1 and reply["user"] == "tk-erin", reply
        await check_token_grants(ws, redis_server, "tk-erin")


# -- hub.client and SIGTERM ---------------------------------------------------------------


async def test_client_sigterm_example_stops_cleanly(hub_factory):
    import os
    import signal
    import subprocess

    hub = hub_factory("--client-publish", "news")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-X", "dev", str(EXAMPLES["client_sigterm"]), hub.ws_url, "news",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert json.loads(ready) == {"ready": "news"}
        async with open_ws(hub.ws_url) as ws:
            assert (await command(ws, op="publish", channel="news", data={"n": 1},
                                  id=1))["type"] == "ack"
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert json.loads(line) == {"channel": "news", "data": {"n": 1}, "offset": None}
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    assert out.decode().strip() == "stopped"
    assert b"Task was destroyed" not in err and b"never retrieved" not in err, err
    assert b"Traceback" not in err, err
