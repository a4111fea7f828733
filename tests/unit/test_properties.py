"""Property-based tests (hypothesis) of the sans-I/O core: the protocol parser, the registry, and
the node keeping the broker's subscriptions equal to the registry's channels.

No sockets and no processes here; every example is bounded (``max_examples``, small sizes).
"""

from __future__ import annotations

import asyncio
import json
import random
import string

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hub.brokers.memory import MemoryBroker
from hub.exceptions import ProtocolError
from hub.node import Node
from hub.protocol import (
    CHANNEL_RE,
    ERROR_CODES,
    OPS,
    Command,
    Connect,
    History,
    Ping,
    Presence,
    PresenceStats,
    Publish,
    Refresh,
    Subscribe,
    Unsubscribe,
    check_channel,
    error_frame,
    parse_command,
)
from hub.registry import Registry

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
PARSER_CODES = {"bad_request", "bad_channel"}  # the only codes parsing alone may give

# -- strategies ------------------------------------------------------------------------------

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson can encode
json_scalars = (st.none() | st.booleans() | INT64
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)

valid_ids = st.none() | INT64 | st.text(max_size=64)
invalid_ids = (st.booleans() | st.floats(allow_nan=False, allow_infinity=False)
               | st.text(min_size=65, max_size=80) | st.lists(INT64, max_size=2)
               | st.dictionaries(st.text(max_size=3), INT64, max_size=2))

CHANNEL_CHARS = string.ascii_letters + string.digits + "_.:@/-"
raw_channels = st.text(alphabet=CHANNEL_CHARS, min_size=1, max_size=128)


def _reserved_misspelling(name: str) -> bool:
    low = name.lower()
    return any(low.startswith(p) and not name.startswith(p) for p in ("user:", "private:"))


valid_channels = raw_channels.filter(lambda n: not _reserved_misspelling(n))


def json_text(value: object) -> str:
    return orjson.dumps(value).decode()


# -- the parser --------------------------------------------------------------------------------

def outcome(frame: str | bytes) -> Command | ProtocolError:
    """parse_command's result; any exception other than ProtocolError fails the test."""
    try:
        return parse_command(frame)
    except ProtocolError as exc:
        return exc


def assert_documented_error(exc: ProtocolError) -> None:
    assert exc.code in ERROR_CODES and exc.code in PARSER_CODES, exc.code
    assert isinstance(exc.message, str) and exc.message
    assert exc.id is None or (isinstance(exc.id, (int, str)) and not isinstance(exc.id, bool))
    # The hub can always build the error frame, and the id survives the trip.
    frame = orjson.loads(error_frame(exc.code, exc.message, exc.id))
    assert frame == {"type": "error", "id": exc.id, "code": exc.code, "message": exc.message}


def assert_well_formed(cmd: Command) -> None:
    assert cmd.op in OPS
    assert isinstance(cmd, (Subscribe, Unsubscribe, Publish, Ping, Connect, Refresh, History,
                            Presence, PresenceStats))
    if isinstance(cmd, (Subscribe, Unsubscribe, Publish, History, Presence, PresenceStats)):
        assert cmd.channel is not None and CHANNEL_RE.fullmatch(cmd.channel)
    if isinstance(cmd, Publish):
        assert cmd.data is not None
        orjson.loads(cmd.data)
    if isinstance(cmd, (Connect, Refresh)):
        assert isinstance(cmd.token, str) and cmd.token


JSON_TOKENS = ['{', '}', '[', ']', ':', ',', '"', '"op"', '"id"', '"channel"', '"data"',
               '"token"', '"subscribe"', '"publish"', '"ping"', '"refresh"', '"unsubscribe"',
               '"user:a"', '"private:x"', '"User:a"', "1", "-0", "1e999", "1.5", "null", "true",
               str(2**64), " ", "\\u0000", '"\\ud800"', "\xff", "\u00e9"]
jsonish = st.lists(st.sampled_from(JSON_TOKENS), max_size=40).map("".join)


@SETTINGS
@given(st.text(max_size=300) | jsonish)
def test_any_text_parses_or_raises_a_documented_protocol_error(frame):
    result = outcome(frame)
    if isinstance(result, ProtocolError):
        assert_documented_error(result)
    else:
        assert_well_formed(result)


@SETTINGS
@given(st.binary(max_size=300))
def test_any_binary_frame_is_a_bad_request_without_id(frame):
    result = outcome(frame)
    assert isinstance(result, ProtocolError)
    assert (result.code, result.id) == ("bad_request", None)


@SETTINGS
@given(st.builds(
    dict,
    op=st.sampled_from([*OPS, "dance", "PING", ""]) | json_values,
    id=valid_ids | invalid_ids,
    channel=valid_channels | st.text(max_size=130) | json_values,
    data=json_values,
    token=st.text(max_size=20) | json_values,
).flatmap(lambda d: st.sets(st.sampled_from(sorted(d)), max_size=5).map(
    lambda keys: {k: d[k] for k in keys})))
def test_any_object_parses_or_raises_with_the_id_echoed_when_it_is_valid(obj):
    result = outcome(json_text(obj))
    cid = obj.get("id")
    id_valid = cid is None or (isinstance(cid, (int, str)) and not isinstance(cid, bool)
                               and not (isinstance(cid, str) and len(cid) > 64))
    if isinstance(result, ProtocolError):
        assert_documented_error(result)
        assert result.id == (cid if id_valid else None)
        if not id_valid:
            assert result.code == "bad_request"
        return
    assert_well_formed(result)
    assert id_valid and result.id == cid
    assert result.op == obj["op"]
    if getattr(result, "channel", None) is not None:
        assert result.channel == obj["channel"]
    if isinstance(result, Publish):
        assert orjson.loads(result.data) == obj["data"]
    if isinstance(result, Refresh):
        assert result.token == obj["token"]


def command_dicts():
    """Valid commands as the dict a client would serialise."""
    base = {"id": valid_ids}
    return st.one_of(
        st.fixed_dictionaries({"op": st.sampled_from(["subscribe", "unsubscribe"]),
                               "channel": valid_channels, **base}),
        st.fixed_dictionaries({"op": st.just("publish"), "channel": valid_channels,
                               "data": json_values, **base}),
        st.fixed_dictionaries({"op": st.just("ping"), **base}),
        st.fixed_dictionaries({"op": st.just("refresh"),
                               "token": st.text(min_size=1, max_size=40), **base}),
    )


@SETTINGS
@given(command_dicts(), st.sampled_from(["orjson", "json", "json-ascii", "json-indent"]),
       st.dictionaries(st.text(min_size=1, max_size=5).filter(
           lambda k: k not in ("op", "id", "channel", "data", "token")), json_values,
           max_size=3))
def test_valid_commands_round_trip_whatever_the_encoder(cmd, encoder, extra):
    obj = {**cmd, **extra}  # unknown fields are ignored
    if encoder == "orjson":
        text = json_text(obj)
    else:
        text = json.dumps(obj, ensure_ascii=encoder == "json-ascii",
                          indent=2 if encoder == "json-indent" else None)
    parsed = parse_command(text)
    assert parsed.op == cmd["op"] and parsed.id == cmd["id"]
    # typed commands: a field the op does not have is absent, not None
    assert getattr(parsed, "channel", None) == cmd.get("channel")
    assert getattr(parsed, "token", None) == cmd.get("token")
    if cmd["op"] == "publish":
        assert isinstance(parsed, Publish) and orjson.loads(parsed.data) == cmd["data"]
    else:
        assert not hasattr(parsed, "data")
    # Same command, same parse, however it was written; a publish's data is the client's
    # own text of the value (docs/protocol.md section 3), so its value is what is the same.
    again = parse_command(json_text(obj))
    if isinstance(parsed, Publish) and isinstance(again, Publish):
        assert orjson.loads(again.data) == orjson.loads(parsed.data)
        assert (again.channel, again.id) == (parsed.channel, parsed.id)
    else:
        assert again == parsed


@SETTINGS
@given(st.text(max_size=140))
def test_accepted_channel_names_are_ascii_and_never_misspell_a_reserved_prefix(name):
    try:
        accepted = check_channel(name)
    except ProtocolError as exc:
        assert exc.code == "bad_channel"
        return
    assert accepted == name and name.isascii() and 1 <= len(name) <= 128
    assert not _reserved_misspelling(name)


@SETTINGS
@given(st.sampled_from(["user:", "private:"]), st.data(),
       st.text(alphabet=CHANNEL_CHARS, max_size=20))
def test_every_other_casing_of_a_reserved_prefix_is_a_bad_channel(prefix, data, rest):
    flips = data.draw(st.lists(st.booleans(), min_size=len(prefix), max_size=len(prefix)))
    cased = "".join(c.upper() if f else c for c, f in zip(prefix, flips, strict=True))
    assume(cased != prefix)
    with pytest.raises(ProtocolError) as info:
        check_channel(cased + rest, "cid")
    assert (info.value.code, info.value.id) == ("bad_channel", "cid")


# -- the registry ------------------------------------------------------------------------------

class FakeConn:
    """Just what the registry and the node look at."""

    def __init__(self, name: str, user: str | None) -> None:
        self.name = name
        self.user = user
        self.dropping = False
        self.protocol = None
        self.transport = None

    def __repr__(self) -> str:
        return f"FakeConn({self.name!r}, user={self.user!r})"

    async def close(self, code: int = 1000, reason: str = "") -> None:
        raise AssertionError("the node never closes a connection in these tests")


CONNS = 4
CHANNELS = ["a", "b", "c", "user:u0", "user:u1"]
USERS = [None, "u0", "u1"]

registry_ops = st.lists(st.tuples(
    st.sampled_from(["add", "subscribe", "unsubscribe", "remove"]),
    st.integers(0, CONNS - 1), st.sampled_from(CHANNELS), st.sampled_from(USERS)),
    max_size=60)


def assert_registry_consistent(reg: Registry, model: dict, users: dict) -> None:
    # channels_of mirrors the model exactly
    assert {c: set(chs) for c, chs in reg.channels_of.items()} == model
    # by_channel is the inverse of channels_of, with no empty sets
    inverse: dict[str, set] = {}
    for conn, chans in reg.channels_of.items():
        for ch in chans:
            inverse.setdefault(ch, set()).add(conn)
    assert reg.by_channel == inverse
    assert all(reg.by_channel.values())
    # by_user holds every registered connection of a user, and nothing else
    expected_users: dict[str, set] = {}
    for conn in reg.channels_of:
        if users[conn] is not None:
            expected_users.setdefault(users[conn], set()).add(conn)
    assert reg.by_user == expected_users
    assert all(reg.by_user.values())
    assert len(reg) == len(model)
    assert set(reg.channels()) == set(inverse)
    for ch in CHANNELS:
        assert reg.has_channel(ch) == (ch in inverse)
        assert reg.subscribers(ch) == inverse.get(ch)


@SETTINGS
@given(registry_ops)
def test_registry_stays_consistent_under_any_sequence(ops):
    reg: Registry = Registry()
    pool: dict[int, FakeConn] = {}
    model: dict[FakeConn, set[str]] = {}
    users: dict[FakeConn, str | None] = {}
    for op, i, channel, user in ops:
        if op == "add":
            if i in pool and pool[i] in model:
                continue  # already registered; a new connection takes a free slot
            conn = pool[i] = FakeConn(f"c{i}", user)
            reg.add_connection(conn, user)
            model[conn], users[conn] = set(), user
        elif i not in pool or pool[i] not in model:
            conn = FakeConn("never-added", user)
            if op == "subscribe":
                with pytest.raises(KeyError):
                    reg.subscribe(conn, channel)
            elif op == "unsubscribe":
                assert reg.unsubscribe(conn, channel) is False
            else:
                assert reg.remove_connection(conn, user) == []
        else:
            conn = pool[i]
            before = {ch for chans in model.values() for ch in chans}
            if op == "subscribe":
                assert reg.subscribe(conn, channel) == (channel not in model[conn])
                model[conn].add(channel)
            elif op == "unsubscribe":
                was = channel in model[conn]
                model[conn].discard(channel)
                still = any(channel in chans for chans in model.values())
                assert reg.unsubscribe(conn, channel) == (was and not still)
            else:
                chans = model.pop(conn)
                emptied = reg.remove_connection(conn, users[conn])
                after = {ch for cs in model.values() for ch in cs}
                assert sorted(emptied) == sorted(chans - after)
                assert set(emptied) <= before
                del pool[i]
        assert_registry_consistent(reg, model, users)


# -- the node and its broker ------------------------------------------------------------------

class YieldingBroker(MemoryBroker):
    """A MemoryBroker whose (un)subscribe takes a few loop iterations, like a real link, so
    that operations on one channel overlap."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng

    async def subscribe(self, channel: str, timeout: float) -> None:
        for _ in range(self.rng.randint(0, 3)):
            await asyncio.sleep(0)
        await super().subscribe(channel, timeout)

    async def unsubscribe(self, channel: str) -> None:
        for _ in range(self.rng.randint(0, 3)):
            await asyncio.sleep(0)
        await super().unsubscribe(channel)


node_ops = st.lists(st.tuples(
    st.sampled_from(["attach", "subscribe", "subscribe-bg", "unsubscribe", "detach", "yield"]),
    st.integers(0, CONNS - 1), st.sampled_from(CHANNELS[:3])), max_size=50)


async def settle(node: Node, mine: set) -> None:
    """Run until neither the node nor the test has a task left."""
    for _ in range(1000):
        pending = [t for t in (*node._tasks, *mine) if not t.done()]
        if not pending:
            return
        await asyncio.wait(pending, timeout=5)
    raise AssertionError("tasks never settled")


async def run_node_scenario(ops, slow: bool, seed: int) -> None:
    broker = YieldingBroker(random.Random(seed)) if slow else MemoryBroker()
    node = Node(broker)
    await node.start()
    conns: dict[int, FakeConn] = {}
    mine: set[asyncio.Task] = set()
    for op, i, channel in ops:
        conn = conns.get(i)
        if op == "attach":
            if conn is None:
                conn = conns[i] = FakeConn(f"c{i}", f"u{i % 2}")
                node.attach(conn)
        elif op == "yield":
            await asyncio.sleep(0)
        elif conn is None:
            continue
        elif op == "subscribe":
            await asyncio.wait_for(node.subscribe(conn, channel), 5)
            assert broker.is_live(channel)  # the ack promise: live once subscribe returns
        elif op == "subscribe-bg":
            mine.add(asyncio.create_task(node.subscribe(conn, channel)))
        elif op == "unsubscribe":
            node.unsubscribe(conn, channel)
        elif op == "detach":
            node.detach(conn)
            node.detach(conn)  # idempotent
            del conns[i]
    await settle(node, mine)
    for task in mine:
        # a background subscribe of a connection detached meanwhile may find it gone
        if task.exception() is not None:
            assert isinstance(task.exception(), KeyError), task.exception()
    # the control channels ($control, $node:<id>) are the broker's too, for the node's life
    assert {c for c in broker._subscribed if c[0] != "$"} == set(node.registry.by_channel)
    assert node._locks == {}
    assert set(node.registry.connections()) == set(conns.values())
    await node.stop()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(node_ops, st.booleans(), st.integers(0, 2**32 - 1))
def test_broker_subscriptions_equal_registry_channels_once_settled(ops, slow, seed):
    asyncio.run(run_node_scenario(ops, slow, seed))
