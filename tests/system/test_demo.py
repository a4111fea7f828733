"""``hub serve --demo`` without a browser (docs/demo.md, docs/protocol.md sections 1 and 7):
``/demo`` and ``/hub.js`` answer 200 with their Content-Type with ``--demo`` (or
``HUB_DEMO``) and 404 without; the served client is ``clients/js/hub.js`` byte for byte; the
page's rooms ``demo:<room>`` keep history and presence and take client publishes with no
other flag; a ``[namespaces.demo]`` table of the configuration file wins; ``--jwt-secret``
with ``--demo`` exits 2. The page itself is driven in a real browser by
tests/system/test_demo_browser.py."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.helpers import ROOT, command, config_error, open_ws, recv_json, run_cli

CLIENT = ROOT / "clients" / "js" / "hub.js"


def get(hub, path: str) -> tuple[int, str | None, bytes]:
    """``(status, Content-Type, body)`` of ``GET path`` on ``hub``'s port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{hub.port}{path}", timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read()


def test_demo_serves_the_page_and_the_client(hub_factory):
    hub = hub_factory("--demo")
    status, kind, page = get(hub, "/demo")
    assert (status, kind) == (200, "text/html; charset=utf-8")
    assert page.startswith(b"<!doctype html>")
    assert b'<script type="module">' in page and b'from "./hub.js"' in page
    status, kind, script = get(hub, "/hub.js")
    assert (status, kind) == (200, "text/javascript; charset=utf-8")
    assert script == CLIENT.read_bytes()  # the one source, not a copy that drifted
    assert b"export class HubClient" in script
    assert get(hub, "/demo?name=alice&room=lobby")[0] == 200  # the page's own links
    assert get(hub, "/demo/")[0] == 404
    assert get(hub, "/healthz")[0] == 200


def test_without_demo_both_paths_are_404(hub_factory):
    hub = hub_factory()
    for path in ("/demo", "/hub.js"):
        assert get(hub, path)[0] == 404, path


def test_the_variable_turns_it_on(hub_factory):
    hub = hub_factory(env={"HUB_DEMO": "1"})
    assert get(hub, "/demo")[0] == 200
    assert get(hub, "/hub.js")[0] == 200


async def test_demo_rooms_keep_history_and_presence_and_take_client_publishes(
        hub_factory, redis_server):
    hub = hub_factory("--demo", redis=redis_server)
    url = hub.ws_url
    async with open_ws(url + "?user=alice") as alice:
        ack = await command(alice, op="subscribe", channel="demo:lobby", id=1, last=50)
        assert ack["offset"] == 0 and ack["epoch"], ack  # a history channel
        for i in range(3):
            ack = await command(alice, op="publish", channel="demo:lobby", id=10 + i,
                                data={"text": f"hi {i}", "name": "alice"})
            assert ack["offset"] == i + 1, ack
        await alice.send(json.dumps({"op": "presence", "channel": "demo:lobby", "id": 20}))
        reply = await recv_json(alice)
        while reply.get("id") != 20:  # alice's own join comes first
            reply = await recv_json(alice)
        assert reply["type"] == "presence", reply
        assert [c["user"] for c in reply["clients"]] == ["alice"]
    # a page opened later (a reload) gets the backlog
    async with open_ws(url + "?user=bob") as bob:
        await bob.send(json.dumps({"op": "subscribe", "channel": "demo:lobby", "id": 1,
                                   "last": 50}))
        frames = [await recv_json(bob) for _ in range(4)]
        assert frames[0]["type"] == "ack"
        assert [(f["offset"], f["data"]["text"]) for f in frames[1:]] == [
            (1, "hi 0"), (2, "hi 1"), (3, "hi 2")]
        # outside the demo namespace nothing changed: no history, no client publish
        reply = await command(bob, op="publish", channel="chat:x", id=2, data=1)
        assert reply["code"] == "forbidden", reply


async def test_a_namespaces_demo_table_of_the_file_wins(hub_factory, tmp_path):
    path = tmp_path / "hub.toml"
    path.write_text('client_publish = ["news"]\n\n[namespaces.demo]\nhistory_size = 0\n')
    hub = hub_factory("--demo", "--config", str(path))
    async with open_ws(hub.ws_url + "?user=alice") as ws:
        reply = await command(ws, op="subscribe", channel="demo:lobby", id=1, last=50)
        assert reply["code"] == "no_history", reply  # the user's table, as it is
        assert await command(ws, op="subscribe", channel="demo:lobby", id=2) == {
            "type": "ack", "id": 2}
        # demo:* is added to the file's client_publish, which still counts
        assert (await command(ws, op="publish", channel="demo:lobby", id=3, data=1))["type"] \
            == "ack"
        assert (await command(ws, op="publish", channel="news", id=4, data=1))["type"] == "ack"


@pytest.mark.parametrize("how", [("--demo", "--jwt-secret", "s" * 32),
                                 ("--jwt-secret", "s" * 32)])
def test_demo_with_authentication_on_exits_2(how):
    env = {} if "--demo" in how else {"HUB_DEMO": "true"}
    line = config_error(run_cli("serve", "--port", "0", *how, env=env))
    assert "--demo needs authentication off" in line
