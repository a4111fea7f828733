"""hub.demo without a socket: what ``--demo`` adds to the channel options, the option
itself, and the packaging of the JS client (one source: ``hub/demo/hub.js`` is a symlink to
``clients/js/hub.js``, which the wheel carries as a plain file; docs/demo.md)."""

from __future__ import annotations

import os

import pytest

from hub.channels import NamespaceOptions
from hub.config import Config
from hub.demo import DEMO_OPTIONS, asset, demo_channels
from hub.exceptions import ConfigError
from tests.helpers import ROOT


def test_demo_adds_its_namespace_and_publish_pattern():
    chat = NamespaceOptions(history_size=10, history_ttl=60)
    patterns, namespaces = demo_channels(("news",), {"chat": chat})
    assert patterns == ("news", "demo:*")
    assert namespaces == {"chat": chat, "demo": DEMO_OPTIONS}
    assert (DEMO_OPTIONS.history_size, DEMO_OPTIONS.history_ttl) == (100, 3600)
    assert DEMO_OPTIONS.presence and DEMO_OPTIONS.join_leave


def test_a_namespace_demo_of_the_configuration_wins():
    mine = NamespaceOptions()
    original = {"demo": mine}
    _, namespaces = demo_channels((), original)
    assert namespaces == {"demo": mine}
    assert original == {"demo": mine}  # not changed in place


@pytest.mark.parametrize(("given", "expected"), [
    (("*",), ("*",)),
    (("demo:*",), ("demo:*",)),
    (("de*",), ("de*",)),
    (("demo:lobby",), ("demo:lobby", "demo:*")),  # one room is not every room
    (("demo:lobby*",), ("demo:lobby*", "demo:*")),
])
def test_the_pattern_is_added_only_when_no_pattern_covers_every_room(given, expected):
    assert demo_channels(given, {})[0] == expected


def test_the_option_reads_its_variable_and_refuses_authentication():
    assert Config.from_sources({}, {"HUB_DEMO": "yes"}).demo is True
    assert Config.from_sources({}, {}).demo is False
    with pytest.raises(ConfigError, match="--demo needs authentication off"):
        Config.from_sources({"demo": True}, {"HUB_JWT_SECRET": "x" * 32})


def test_the_assets_and_their_types():
    page = asset("/demo")
    assert page is not None and page[0].content_type == "text/html; charset=utf-8"
    assert page[1] == (ROOT / "hub" / "demo" / "index.html").read_bytes()
    script = asset("/hub.js")
    assert script is not None and script[0].content_type == "text/javascript; charset=utf-8"
    assert asset("/demo/") is None and asset("/index.html") is None


def test_the_packaged_client_is_a_link_to_the_one_source():
    link = ROOT / "hub" / "demo" / "hub.js"
    assert link.is_symlink(), "hub/demo/hub.js must stay a symlink, not a copy that drifts"
    assert os.readlink(link) == "../../clients/js/hub.js"
    assert link.resolve() == (ROOT / "clients" / "js" / "hub.js").resolve()
