"""Channel rules without sockets (hub.channels), and the configuration table (hub.config)."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest

from hub.channels import (
    PERSONAL_PREFIX,
    PRIVATE_PREFIX,
    ChannelRules,
    namespace_of,
    personal_channel,
)
from hub.config import OPTIONS, Config, Option
from hub.exceptions import ProtocolError

HUB = pathlib.Path(__file__).resolve().parents[2] / "hub"


@pytest.mark.parametrize(("channel", "namespace"), [
    ("chat:room1", "chat"), ("user:alice", "user"), ("private:x:y", "private"),
    ("news", ""), (":x", ""), ("a.b:c", "a.b"),
])
def test_namespace_is_the_name_before_the_first_colon(channel, namespace):
    assert namespace_of(channel) == namespace


def forbidden(call, *args) -> str:
    with pytest.raises(ProtocolError) as info:
        call(*args, 7)
    assert info.value.code == "forbidden" and info.value.id == 7
    return info.value.message


def test_subscribe_rules():
    rules = ChannelRules()
    rules.check_subscribe("alice", (), "user:alice")
    rules.check_subscribe(None, (), "news")
    assert "another user" in forbidden(rules.check_subscribe, "alice", (), "user:bob")
    assert "another user" in forbidden(rules.check_subscribe, None, (), "user:alice")
    rules.check_subscribe("alice", ("private:team-*",), "private:team-1")
    assert "private" in forbidden(rules.check_subscribe, "alice", ("private:team-*",),
                                  "private:other")
    assert "private" in forbidden(rules.check_subscribe, None, (), "private:x")


def test_publish_rules():
    assert "may not publish" in forbidden(ChannelRules().check_publish, "news")
    rules = ChannelRules(("chat:*", "lobby"))
    rules.check_publish("chat:1")
    rules.check_publish("lobby")
    forbidden(rules.check_publish, "lobby2")
    ChannelRules(("*",)).check_publish(personal_channel("bob"))  # documented: * allows all


def test_the_personal_channel_is_implicit_and_refresh_revokes_only_private_channels():
    assert ChannelRules.is_implicit("alice", "user:alice")
    assert not ChannelRules.is_implicit("alice", "user:bob")
    assert not ChannelRules.is_implicit(None, "user:alice")
    held = ["news", "user:alice", "private:a", "private:b1", "private:b2"]
    assert ChannelRules.revoked(held, ("private:b*",)) == ["private:a"]
    assert ChannelRules.revoked(held, ()) == ["private:a", "private:b1", "private:b2"]


def test_reserved_prefixes_are_spelled_only_in_hub_channels():
    literal = re.compile(rf"[\"']({re.escape(PERSONAL_PREFIX)}|{re.escape(PRIVATE_PREFIX)})[\"']")
    for path in HUB.rglob("*.py"):
        if path.name != "channels.py":
            assert not literal.search(path.read_text()), path


def test_every_option_is_a_config_field_and_back_with_its_default_written_once():
    fields = {f.name: f for f in dataclasses.fields(Config) if not f.metadata.get("file_only")}
    assert [o.name for o in OPTIONS] == list(fields)
    for opt in OPTIONS:
        assert opt.default == fields[opt.name].default
    # the table cannot hold a second copy: an Option has no default of its own
    assert "default" not in {f.name for f in dataclasses.fields(Option)}
