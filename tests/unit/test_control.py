"""The control channel's messages (docs/control-format.md), sans sockets: encoding, the close
rules of a disconnect, and what a process does with malformed or foreign messages."""

from __future__ import annotations

import orjson
import pytest

from hub.brokers.base import Publication
from hub.brokers.memory import MemoryBroker
from hub.channels import ChannelRules, NamespaceOptions
from hub.control import CONTROL_CHANNEL, MAX_REASON_BYTES, check_close, encode, node_channel
from hub.node import Node


def test_encode_and_channels():
    assert orjson.loads(encode("bye", node="n1")) == {"v": 1, "type": "bye", "node": "n1"}
    assert CONTROL_CHANNEL == "$control"
    assert node_channel("abc") == "$node:abc"


@pytest.mark.parametrize("code,reason,expected", [
    (None, None, (4003, "")),
    (4000, "x", (4000, "x")),
    (4999, "é" * (MAX_REASON_BYTES // 2), (4999, "é" * (MAX_REASON_BYTES // 2))),
])
def test_check_close_accepts(code, reason, expected):
    assert check_close(code, reason) == expected


@pytest.mark.parametrize("code,reason", [
    (1000, ""), (3999, ""), (5000, ""), (True, ""), ("4003", ""), (4003.0, ""),
    (4003, "x" * (MAX_REASON_BYTES + 1)), (4003, "é" * (MAX_REASON_BYTES // 2 + 1)),
    (4003, 5), (4003, "\ud800"),
])
def test_check_close_refuses(code, reason):
    with pytest.raises(ValueError):
        check_close(code, reason)


def heartbeat(node: str, **extra) -> dict:
    return {"v": 1, "type": "heartbeat", "node": node, "name": "h:1", "version": "0",
            "pid": 1, "host": "h", "connections": 2, "subscriptions": 3, "channels": 1,
            "uptime": 5.0, "ready": True, **extra}


@pytest.mark.parametrize("payload", [
    b"", b"not json", b"[]", b"1", b'{"type":"heartbeat"}',  # no v
    orjson.dumps({**heartbeat("x"), "v": 2}),
    orjson.dumps({"v": 1, "type": "nope"}),
    orjson.dumps({k: v for k, v in heartbeat("x").items() if k != "pid"}),
    orjson.dumps(heartbeat("x", pid="one")),
    orjson.dumps({"v": 1, "type": "disconnect", "user": "a", "code": 1000}),
    orjson.dumps({"v": 1, "type": "disconnect", "user": 5}),
    orjson.dumps({"v": 1, "type": "subscribe", "user": "a", "channel": "bad channel"}),
    orjson.dumps({"v": 1, "type": "subscribe", "user": "a", "channel": "$control"}),
    orjson.dumps({"v": 1, "type": "channels_reply", "request": "r", "node": "n",
                  "channels": []}),
    orjson.dumps({"v": 1, "type": "bye"}),
])
def test_malformed_messages_are_ignored(payload):
    node = Node(MemoryBroker())
    node.on_publication(Publication(CONTROL_CHANNEL, payload))  # never raises
    assert [n.node for n in node.control.nodes()] == [node.control.node_id]


def test_heartbeats_list_the_other_processes_and_bye_forgets():
    node = Node(MemoryBroker())
    control = node.control
    node.on_publication(Publication(CONTROL_CHANNEL, orjson.dumps(heartbeat("other"))))
    node.on_publication(Publication(CONTROL_CHANNEL,
                                    orjson.dumps(heartbeat(control.node_id))))  # its own
    nodes = control.nodes()
    assert [n.node for n in nodes] == [control.node_id, "other"]
    assert nodes[1].connections == 2 and nodes[1].age >= 0
    node.on_publication(Publication(CONTROL_CHANNEL, encode("bye", node="other")))
    assert [n.node for n in control.nodes()] == [control.node_id]


def test_reserved_channels_keep_nothing_whatever_the_defaults():
    rules = ChannelRules(defaults=NamespaceOptions(history_size=10, history_ttl=60,
                                                   presence=True))
    assert rules.keeps_history("news") and rules.keeps_presence("news")
    assert not rules.keeps_history(CONTROL_CHANNEL)
    assert not rules.keeps_presence(node_channel("x"))
