"""The golden frames of spec/frames/ (spec/README.md) against the server's wire format.

Every client frame parses with :func:`hub.protocol.parse_command` into the command of its
``op`` with the same fields; every server frame whose builder exists in hub/protocol.py is
what that builder produces (compared as parsed JSON); every ``op`` and ``type`` named in
docs/protocol.md has a golden file. The Python client's parser (:mod:`hub.client.frames`)
reads every server frame and its command builder writes every client frame.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from hub import protocol
from hub.brokers.base import StreamPosition
from hub.client import frames as client_frames
from tests.helpers import ROOT

FRAMES = ROOT / "spec" / "frames"
PROTOCOL = (ROOT / "docs" / "protocol.md").read_text()


def load(path: Path) -> dict[str, Any]:
    spec = json.loads(path.read_text())
    assert set(spec) == {"doc", "frame"}, path
    assert isinstance(spec["doc"], str) and spec["doc"], path
    assert isinstance(spec["frame"], dict), path
    return spec["frame"]


CLIENT = {p.stem: load(p) for p in sorted((FRAMES / "client").glob("*.json"))}
SERVER = {p.stem: load(p) for p in sorted((FRAMES / "server").glob("*.json"))}

#: Server frame kinds whose builders land in parallel work this session (``from`` on
#: deliveries and history entries, the ``subscribed`` push). Remove a kind from here when
#: its builder is in hub/protocol.py, and add it to BUILDERS.
PENDING: dict[str, str] = {}  # server frame kinds whose builder has not landed yet


def _json(value: Any) -> bytes:
    return orjson.dumps(value)


def _from(value: dict[str, Any] | None) -> bytes | None:
    return None if value is None else _json(value)


def _history(f: dict[str, Any]) -> bytes:
    return protocol.history_frame(f["id"], f["channel"], f["offset"], f["epoch"],
                                  [(m["offset"], _json(m["data"]), _from(m.get("from")))
                                   for m in f["messages"]])


#: How each server frame kind is built by hub/protocol.py, from the golden frame's values.
BUILDERS: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "ack": lambda f: protocol.ack_frame(f["id"]),
    "ack_connect": lambda f: protocol.connect_ack_frame(f["id"], f["user"], f["client"],
                                                        float(f["exp"])),
    "ack_connect_no_exp": lambda f: protocol.connect_ack_frame(f["id"], f["user"],
                                                               f["client"], None),
    "ack_subscribe_history": lambda f: protocol.position_ack_frame(f["id"], f["offset"],
                                                                   f["epoch"]),
    "ack_subscribe_recovered": lambda f: protocol.position_ack_frame(
        f["id"], f["offset"], f["epoch"], f["recovered"]),
    "ack_subscribe_not_recovered": lambda f: protocol.position_ack_frame(
        f["id"], f["offset"], f["epoch"], f["recovered"]),
    "ack_publish_history": lambda f: protocol.position_ack_frame(f["id"], f["offset"],
                                                                 f["epoch"]),
    "pong": lambda f: protocol.pong_frame(f["id"]),
    "error": lambda f: protocol.error_frame(f["code"], f["message"], f["id"]),
    "error_no_id": lambda f: protocol.error_frame(f["code"], f["message"], f["id"]),
    "history": _history,
    "presence": lambda f: protocol.presence_frame(
        f["id"], f["channel"], [(c["client"], c["user"]) for c in f["clients"]]),
    "presence_stats": lambda f: protocol.presence_stats_frame(f["id"], f["channel"],
                                                              f["clients"], f["users"]),
    "message": lambda f: protocol.message_frame(_json(f["channel"]), _json(f["data"])),
    "message_history": lambda f: protocol.message_frame(_json(f["channel"]), _json(f["data"]),
                                                        f["offset"]),
    "message_from": lambda f: protocol.message_frame(_json(f["channel"]), _json(f["data"]),
                                                     None, _json(f["from"])),
    "message_from_anonymous": lambda f: protocol.message_frame(
        _json(f["channel"]), _json(f["data"]), None, _json(f["from"])),
    "message_history_from": lambda f: protocol.message_frame(
        _json(f["channel"]), _json(f["data"]), f["offset"], _json(f["from"])),
    "history_from": _history,
    "subscribed": lambda f: protocol.subscribed_frame(f["channel"]),
    "subscribed_history": lambda f: protocol.subscribed_frame(f["channel"], f["offset"],
                                                              f["epoch"]),
    "join": lambda f: protocol.join_leave_frame("join", f["channel"], f["client"], f["user"]),
    "leave": lambda f: protocol.join_leave_frame("leave", f["channel"], f["client"],
                                                 f["user"]),
    "gap": lambda f: protocol.gap_frame(list(reversed(f["channels"]))),  # the builder sorts
    "gap_history": lambda f: protocol.stream_gap_frame(f["channels"][0], f["from"], f["to"],
                                                       f["epoch"]),
    "gap_history_new_epoch": lambda f: protocol.stream_gap_frame(
        f["channels"][0], f["from"], f["to"], f["epoch"]),
    "unsubscribed_revoked": lambda f: protocol.unsubscribed_frame(f["channel"], f["reason"]),
    "unsubscribed_server": lambda f: protocol.unsubscribed_frame(f["channel"], f["reason"]),
}

COMMANDS = {cls.op: cls for cls in (protocol.Connect, protocol.Subscribe, protocol.Unsubscribe,
                                    protocol.Publish, protocol.Ping, protocol.Refresh,
                                    protocol.History, protocol.Presence,
                                    protocol.PresenceStats)}


def test_the_golden_files_are_there():
    assert len(CLIENT) >= len(protocol.OPS) and SERVER
    assert {f["op"] for f in CLIENT.values()} == set(protocol.OPS)
    assert all("op" not in f and isinstance(f.get("type"), str) for f in SERVER.values())


@pytest.mark.parametrize("kind", sorted(CLIENT))
def test_client_frame_parses_into_its_command(kind):
    frame = CLIENT[kind]
    command = protocol.parse_command(json.dumps(frame))
    assert type(command) is COMMANDS[frame["op"]]
    assert command.id == frame["id"]
    for field in ("channel", "token", "last", "limit", "idempotency_key"):
        if field in frame:
            assert getattr(command, field) == frame[field], field
    if "since" in frame:
        assert command.since == StreamPosition(**frame["since"])
    if "data" in frame:
        assert isinstance(command, protocol.Publish)
        assert orjson.loads(command.data) == frame["data"]


@pytest.mark.parametrize("kind", sorted(SERVER))
def test_server_frame_is_what_its_builder_produces(kind):
    if kind in PENDING:
        pytest.skip(f"pending: {PENDING[kind]}")
    assert kind in BUILDERS, f"spec/frames/server/{kind}.json has no builder here nor PENDING"
    frame = SERVER[kind]
    assert orjson.loads(BUILDERS[kind](frame)) == frame


def test_builders_and_pending_name_existing_files():
    assert set(BUILDERS) <= set(SERVER)
    assert set(PENDING) <= set(SERVER)
    assert not set(BUILDERS) & set(PENDING)


def test_every_op_and_type_of_the_protocol_has_a_golden_file():
    ops = set(re.findall(r'\{"op":"(\w+)"', PROTOCOL))
    types = set(re.findall(r'\{"type":"(\w+)"', PROTOCOL))
    assert ops == set(protocol.OPS) and {"ack", "message", "gap"} <= types
    assert ops <= {f["op"] for f in CLIENT.values()}, ops
    assert types <= {f["type"] for f in SERVER.values()}, types


# -- the Python client (hub.client.frames) reads the same files ----------------------------

EXPECTED_CLIENT_TYPES = {
    "ack": client_frames.Ack, "pong": client_frames.Pong, "error": client_frames.ErrorReply,
    "history": client_frames.HistoryReply, "presence": client_frames.PresenceReply,
    "presence_stats": client_frames.PresenceStatsReply, "message": client_frames.Message,
    "join": client_frames.PresenceEvent, "leave": client_frames.PresenceEvent,
    "gap": client_frames.GapFrame, "subscribed": client_frames.Subscribed,
    "unsubscribed": client_frames.UnsubscribedFrame,
}


@pytest.mark.parametrize("kind", sorted(SERVER))
def test_client_parser_reads_every_server_frame(kind):
    frame = SERVER[kind]
    parsed = client_frames.parse_frame(json.dumps(frame))
    assert type(parsed) is EXPECTED_CLIENT_TYPES[frame["type"]], parsed
    for name in ("id", "channel", "offset", "epoch", "recovered", "user", "client", "code",
                 "message", "reason", "to", "users"):
        if name in frame:
            assert getattr(parsed, name) == frame[name], name
    if frame["type"] == "gap":
        assert (parsed.channels, parsed.from_) == (tuple(frame["channels"]), frame.get("from"))
    if frame["type"] == "message":
        assert parsed.data == frame["data"]
        sender = frame.get("from")
        assert parsed.from_ == (sender and client_frames.Sender(sender["user"],
                                                                sender["client"]))
    if frame["type"] == "history":
        assert [(m.offset, m.data) for m in parsed.messages] == [
            (m["offset"], m["data"]) for m in frame["messages"]]
        assert [m.from_ and (m.from_.user, m.from_.client) for m in parsed.messages] == [
            m.get("from") and (m["from"]["user"], m["from"]["client"])
            for m in frame["messages"]]
    if frame["type"] == "ack" and "offset" in frame:
        assert parsed.position == StreamPosition(frame["offset"], frame["epoch"])


def test_client_parser_keeps_unknown_types_and_refuses_non_frames():
    assert isinstance(client_frames.parse_frame('{"type":"future","x":1}'),
                      client_frames.Unknown)
    for bad in ("[]", "{}", '{"type":1}', '{"type":"message"}', "not json"):
        with pytest.raises(ValueError):
            client_frames.parse_frame(bad)


@pytest.mark.parametrize("kind", sorted(CLIENT))
def test_client_command_builder_writes_every_client_frame(kind):
    frame = dict(CLIENT[kind])
    op, cid = frame.pop("op"), frame.pop("id")
    if "since" in frame:
        frame["since"] = StreamPosition(**frame["since"])
    built = client_frames.command(op, cid, **frame)
    assert json.loads(client_frames.encode(built)) == CLIENT[kind]
