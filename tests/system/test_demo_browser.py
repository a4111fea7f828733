"""The demo page (``hub serve --demo``, docs/demo.md) in a real browser: Debian's chromium
driven by playwright-core (tests/browser/demo.e2e.mjs, one JSON command per line), against
real ``hub serve --demo`` processes and a real redis-server.

- two pages on two hub processes exchange messages both ways, each shown with its sender,
  and each sees the other in "Here now";
- the sender shown is the hub's ``from.user`` of a client publish (a name in the data does not
  override it), and the data's ``name`` for a backend's publish;
- a reloaded page shows the room's backlog;
- a page whose hub is SIGKILLed and restarted on the same port shows "reconnecting", then
  every message the other page published meanwhile, once each and in order, and goes on.

Needs node, /usr/bin/chromium (``HUB_CHROMIUM`` names another binary) and ``npm ci`` in
tests/browser (scripts/test.sh does all three); without them the tests skip, except under CI
(the variable ``CI`` set), where they fail. The sender test skips while the hub does not send
``from`` (it lands with the ``from`` envelope, docs/protocol.md section 4).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import subprocess
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from hub import Publisher
from hub.demo import DEMO_OPTIONS
from tests.helpers import ROOT, command, open_ws, recv_json

BROWSER_DIR = ROOT / "tests" / "browser"
DRIVER = BROWSER_DIR / "demo.e2e.mjs"
CHROMIUM = os.environ.get("HUB_CHROMIUM", "/usr/bin/chromium")
NODE = shutil.which("node")

_missing = [what for what, there in (
    ("node (apt-get install nodejs)", NODE is not None),
    (f"{CHROMIUM} (apt-get install chromium)", Path(CHROMIUM).exists()),
    ("tests/browser/node_modules (npm ci in tests/browser)",
     (BROWSER_DIR / "node_modules" / "playwright-core").is_dir()),
) if not there]
if _missing and os.environ.get("CI"):
    pytestmark = pytest.mark.usefixtures("_fail_missing")
else:
    pytestmark = pytest.mark.skipif(bool(_missing), reason=f"missing: {', '.join(_missing)}")


@pytest.fixture
def _fail_missing() -> None:
    pytest.fail(f"missing: {', '.join(_missing)} (bash scripts/test.sh installs them)")


#: Seconds a page may take to show something: a reconnect waits up to 10 s (the client's
#: backoff cap) plus the restart of a hub on the shared machine.
PATIENCE = 40.0

STATE = "document.getElementById('state').dataset.state"
TEXTS = ("[...document.querySelectorAll('#messages li:not(.system)')]"
         ".map(li => [li.dataset.from, li.querySelector('.text').textContent])")
WHO = "[...document.querySelectorAll('#who li')].map(li => li.dataset.user)"


class Browser:
    """The driver process (node tests/browser/demo.e2e.mjs) and its one chromium."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([NODE or "node", str(DRIVER)], cwd=BROWSER_DIR,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, text=True, bufsize=1,
                                         env={**os.environ, "HUB_CHROMIUM": CHROMIUM})
        self.replies: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.next_id = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.replies.put(line)

    def call(self, op: str, timeout: float = PATIENCE, **args: Any) -> Any:
        """Run one command (see demo.e2e.mjs) and return its value; AssertionError with
        the driver's error, and the page's console when there is a page, on failure."""
        self.next_id += 1
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": self.next_id, "op": op, **args}) + "\n")
        self.proc.stdin.flush()
        try:
            reply = json.loads(self.replies.get(timeout=timeout + 10))
        except queue.Empty:
            raise AssertionError(f"the browser driver did not answer {op} within "
                                 f"{timeout + 10} s:\n{self.log_path.read_text()}") from None
        assert reply["id"] == self.next_id, reply
        if not reply["ok"]:
            log = self.call("log", page=args["page"]) if "page" in args and op != "log" else ""
            raise AssertionError(f"{op} {args}: {reply['error']}\npage console: {log}")
        return reply["value"]

    def close(self) -> None:
        try:
            self.call("quit", timeout=10)
            self.proc.wait(15)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)


class Page:
    """One tab of :class:`Browser` showing the demo page, joined to a room."""

    def __init__(self, browser: Browser, name: str, hub: Any, user: str,
                 room: str = "lobby") -> None:
        self.browser, self.name = browser, name
        query = urllib.parse.urlencode({"name": user, "room": room})
        browser.call("open", page=name, url=f"http://127.0.0.1:{hub.port}/demo?{query}")
        self.wait_state("connected")

    def eval(self, expr: str) -> Any:
        return self.browser.call("eval", page=self.name, expr=expr)

    def wait(self, expr: str, timeout: float = PATIENCE) -> Any:
        return self.browser.call("wait", timeout, page=self.name, expr=expr,
                                 ms=int(timeout * 1000))

    def wait_state(self, *states: str) -> str:
        wanted = json.dumps(list(states))
        state: str = self.wait(f"{wanted}.includes({STATE}) && {STATE}")
        return state

    def send(self, text: str) -> None:
        self.wait(f"{STATE} === 'connected'")
        self.browser.call("fill", page=self.name, selector="#text", value=text)
        self.browser.call("click", page=self.name, selector="#send-button")
        # the field empties once the publish is on its way; it is refilled if it failed
        self.wait("document.getElementById('text').value === '' && "
                  "document.getElementById('notice').textContent === ''")

    def messages(self) -> list[tuple[str, str]]:
        """``(sender, text)`` of every message line shown, in order."""
        return [tuple(m) for m in self.eval(TEXTS)]

    def wait_messages(self, count: int) -> list[tuple[str, str]]:
        """The lines shown once there are at least ``count``."""
        self.wait(f"{TEXTS}.length >= {count}")
        return self.messages()

    def errors(self) -> list[str]:
        """The page's uncaught exceptions and console errors so far."""
        log: list[str] = self.browser.call("log", page=self.name)
        return [line for line in log if line.startswith(("pageerror:", "error:"))]

    def screenshot(self, path: Path) -> None:
        self.browser.call("screenshot", page=self.name, path=str(path))


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "browser.log")
    yield b
    b.close()


def test_two_pages_on_two_hubs_exchange_messages_both_ways(browser, hub_factory, redis_server,
                                                           tmp_path):
    hub_a = hub_factory("--demo", redis=redis_server)
    hub_b = hub_factory("--demo", redis=redis_server)
    alice = Page(browser, "alice", hub_a, "alice")
    bob = Page(browser, "bob", hub_b, "bob")
    assert alice.eval("getComputedStyle(document.getElementById('join')).display") == "none"
    # who is here: each page sees both, across the two processes (join frames, presence)
    for page in (alice, bob):
        page.wait(f"JSON.stringify({WHO}) === '[\"alice\",\"bob\"]'")
    alice.send("hi bob, this is alice on the first hub")
    assert bob.wait_messages(1) == [("alice", "hi bob, this is alice on the first hub")]
    bob.send("hello alice! bob here, on the second hub")
    alice.send("the backlog survives reloads, and reconnects recover")
    expected = [("alice", "hi bob, this is alice on the first hub"),
                ("bob", "hello alice! bob here, on the second hub"),
                ("alice", "the backlog survives reloads, and reconnects recover")]
    for page in (alice, bob):
        page.wait(f"{TEXTS}.length >= 3")
        assert page.messages() == expected
    assert alice.eval("document.querySelector('#who li[data-user=\"alice\"]').textContent") \
        == "alice (you)"
    assert alice.errors() == [] and bob.errors() == []
    shot = tmp_path / "demo.png"
    alice.screenshot(shot)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")  # docs/img/demo.png is one of these


async def test_the_sender_shown_is_the_hub_s_from_user_else_the_data_s_name(
        browser, hub_factory, redis_server):
    hub = hub_factory("--demo", redis=redis_server)
    alice = await asyncio.to_thread(Page, browser, "alice", hub, "alice")
    async with open_ws(hub.ws_url + "?user=mallory") as ws:
        assert (await command(ws, op="subscribe", channel="demo:lobby", id=1))["type"] == "ack"
        await ws.send(json.dumps({"op": "publish", "channel": "demo:lobby", "id": 2,
                                  "data": {"text": "I am bob, honest", "name": "bob"}}))
        delivery = await recv_json(ws)
        while delivery.get("type") != "message":  # its ack and its own join come too
            delivery = await recv_json(ws)
    if "from" not in delivery:
        pytest.skip("this hub does not send from yet (docs/protocol.md section 4)")
    with Publisher(redis_server.url, namespaces={"demo": DEMO_OPTIONS}) as backend:
        backend.publish("demo:lobby", {"text": "maintenance at noon", "name": "ops"})
        backend.publish("demo:lobby", {"text": "no name here"})
    lines = await asyncio.to_thread(alice.wait_messages, 3)
    assert lines == [("mallory", "I am bob, honest"), ("ops", "maintenance at noon"),
                     ("anonymous", "no name here")]


def test_a_reloaded_page_shows_the_backlog(browser, hub_factory):
    hub = hub_factory("--demo")  # the embedded broker keeps the history in memory
    alice = Page(browser, "alice", hub, "alice", room="reload")
    for i in range(3):
        alice.send(f"message {i}")
    alice.wait_messages(3)
    browser.call("reload", page="alice")
    alice.wait_state("connected")
    lines = alice.wait_messages(3)
    assert lines == [("alice", f"message {i}") for i in range(3)]
    # a second page joining later gets the same backlog
    carol = Page(browser, "carol", hub, "carol", room="reload")
    assert carol.wait_messages(3) == lines


def test_a_page_recovers_what_was_published_while_its_hub_was_down(browser, hub_factory,
                                                                   redis_server):
    hub_a = hub_factory("--demo", redis=redis_server)
    hub_b = hub_factory("--demo", redis=redis_server)
    alice = Page(browser, "alice", hub_a, "alice")
    bob = Page(browser, "bob", hub_b, "bob")
    alice.send("before the crash")
    bob.wait_messages(1)
    hub_a.kill()  # SIGKILL: no close frame, no leave; the browser sees the socket drop
    alice.wait_state("reconnecting", "cannot_connect")
    missed = [f"while you were away {i}" for i in range(4)]
    for text in missed:
        bob.send(text)
    assert alice.messages() == [("alice", "before the crash")]  # nothing came in the meantime
    hub_factory("--demo", redis=redis_server, port=hub_a.port)  # the same port again
    alice.wait_state("connected")
    alice.wait_messages(1 + len(missed))
    bob.send("after the restart")
    alice.send("and alice is back")
    expected = [("alice", "before the crash"), *[("bob", t) for t in missed],
                ("bob", "after the restart"), ("alice", "and alice is back")]
    for page in (alice, bob):
        page.wait(f"{TEXTS}.length >= {len(expected)}")
        assert page.messages() == expected  # every one, once, in order
    for page in (alice, bob):  # console errors are expected: the refused reconnects
        assert not [e for e in page.errors() if e.startswith("pageerror:")]
