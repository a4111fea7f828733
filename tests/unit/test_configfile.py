"""The TOML configuration file (hub.configfile, Config.from_sources): precedence, namespaces,
and an error naming the file and the key for every kind of mistake."""

from __future__ import annotations

import textwrap

import pytest

from hub.channels import ChannelRules, NamespaceOptions
from hub.config import Config
from hub.exceptions import ConfigError


def write(tmp_path, text: str) -> str:
    path = tmp_path / "hub.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def load(path: str, flags: dict | None = None, environ: dict | None = None) -> Config:
    return Config.from_sources({"config": path, **(flags or {})}, environ or {})


def test_the_issue_s_example_works_as_written(tmp_path):
    path = write(tmp_path, """\
        [namespaces.chat]
        history_size = 100
        history_ttl = 600
        """)
    config = load(path)
    rules = ChannelRules(config.client_publish, dict(config.namespaces), config.channels)
    assert rules.options("chat:room1") == NamespaceOptions(100, 600.0)
    assert rules.options("chat:room1").history
    assert rules.options("news") == NamespaceOptions() and not rules.options("news").history
    assert rules.options("user:alice") == NamespaceOptions()


def test_channels_table_is_the_default_and_namespaces_inherit_from_it(tmp_path):
    path = write(tmp_path, """\
        [channels]
        history_size = 10
        history_ttl = 60

        [namespaces.user]
        history_size = 50

        [namespaces.live]
        history_size = 0
        """)
    rules = ChannelRules((), dict(load(path).namespaces), load(path).channels)
    assert rules.options("news") == NamespaceOptions(10, 60.0)
    assert rules.options("other:x") == NamespaceOptions(10, 60.0)
    assert rules.options("user:alice") == NamespaceOptions(50, 60.0)
    assert rules.options("live:scores") == NamespaceOptions(0, 60.0)


def test_precedence_flag_over_environment_over_file_over_default(tmp_path):
    path = write(tmp_path, """\
        port = 9001
        max_connections = 500
        rate_limit = 5
        redis_url = ["redis://127.0.0.1:7000/0"]
        redis_prefix = "file:"
        """)
    config = load(path, {"port": 9003}, {"HUB_PORT": "9002", "HUB_MAX_CONNECTIONS": "600"})
    assert config.port == 9003  # flag
    assert config.max_connections == 600  # variable
    assert config.rate_limit == 5.0 and isinstance(config.rate_limit, float)  # file
    assert config.redis_url == ("redis://127.0.0.1:7000/0",)
    assert config.redis_prefix == "file:"
    assert config.max_subscriptions == 128  # default
    assert load(path, environ={"HUB_PORT": "9002"}).port == 9002
    assert load(path).port == 9001
    # HUB_CONFIG names the file when the flag does not
    assert Config.from_sources({}, {"HUB_CONFIG": path}).port == 9001


@pytest.mark.parametrize(("text", "expected"), [
    ("port = 80 80", r"hub\.toml: not valid TOML: .*line 1"),
    ("prot = 80", r"hub\.toml: prot: unknown key"),
    ('port = "80"', r"hub\.toml: port: expected an integer, got '80'"),
    ("port = 70000", r"hub\.toml: port: --port must be 0\.\.65535, got 70000"),
    ("max_connections = 0", r"hub\.toml: max_connections: --max-connections must be > 0"),
    ("rate_limit = true", r"hub\.toml: rate_limit: expected a number, got True"),
    ("redis_cluster = 1", r"hub\.toml: redis_cluster: expected true or false, got 1"),
    ('redis_url = "redis://x"', r"hub\.toml: redis_url: expected a list of strings"),
    ('compression = "gzip"', r"hub\.toml: compression: --compression must be one of"),
    ('config = "other.toml"', r"hub\.toml: config: a configuration file cannot name another"),
    ("namespaces = 3", r"hub\.toml: namespaces: expected tables"),
    ("[namespaces.chat]\nhistory_sise = 3", r"hub\.toml: namespaces\.chat\.history_sise: "
                                            r"unknown key"),
    ("[namespaces.chat]\nhistory_size = -1", r"namespaces\.chat\.history_size: expected an "
                                             r"integer >= 0 \(messages\), got -1"),
    ("[namespaces.chat]\nhistory_size = 1.5", r"namespaces\.chat\.history_size: expected an "
                                              r"integer"),
    ('[namespaces.chat]\nhistory_size = 10\nhistory_ttl = "10m"',
     r"namespaces\.chat\.history_ttl: expected a number of seconds >= 0, got '10m'"),
    ("[namespaces.chat]\nhistory_size = 10", r"namespaces\.chat\.history_ttl: must be > 0 "
                                             r"seconds when history_size is 10"),
    ('[namespaces."a:b"]\nhistory_size = 0', r"namespaces\.a:b: a namespace name is"),
    ("[channels]\nhistory_ttl = -5", r"hub\.toml: channels\.history_ttl: expected a number"),
    ("channels = 1", r"hub\.toml: channels: expected a table"),
    ("[namespaces.chat]\npresence = 1", r"hub\.toml: namespaces\.chat\.presence: expected "
                                        r"true or false, got 1"),
    ('[channels]\njoin_leave = "yes"', r"hub\.toml: channels\.join_leave: expected true or "
                                       r"false, got 'yes'"),
    ("[namespaces.chat]\njoin_leave = true", r"hub\.toml: namespaces\.chat\.join_leave: needs "
                                             r"presence = true"),
    ("[namespaces.chat]\npresence = true\npresence_ttl = 1",
     r"hub\.toml: namespaces\.chat\.presence_ttl: expected a number of seconds from 3 to "
     r"86400, got 1"),
    ('[namespaces.chat]\npresence_ttl = "1m"', r"namespaces\.chat\.presence_ttl: expected a "
                                              r"number of seconds"),
])
def test_every_mistake_names_the_file_and_the_key(tmp_path, text, expected):
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError, match=expected) as info:
        load(path)
    assert str(info.value).startswith(path) or "hub.toml" in str(info.value)


def test_presence_options_and_their_inheritance(tmp_path):
    path = write(tmp_path, """
        [channels]
        presence = true
        join_leave = true
        presence_ttl = 30

        [namespaces.chat]

        [namespaces.big]
        join_leave = false

        [namespaces.quiet]
        presence = false
        """)
    config = load(path)
    assert config.channels == NamespaceOptions(presence=True, join_leave=True, presence_ttl=30.0)
    namespaces = dict(config.namespaces)
    chat, big, quiet = (namespaces[n] for n in ("chat", "big", "quiet"))
    assert (chat.presence, chat.join_leave, chat.presence_ttl) == (True, True, 30.0)
    assert (big.presence, big.join_leave) == (True, False)
    assert (quiet.presence, quiet.join_leave) == (False, False)  # the inherited one is off
    assert NamespaceOptions().presence_ttl == 60.0
    assert isinstance(chat.presence_ttl, float)


def test_an_unreadable_or_non_utf8_file(tmp_path):
    with pytest.raises(ConfigError, match=r"--config .*missing\.toml: cannot read it"):
        load(str(tmp_path / "missing.toml"))
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'redis_prefix = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1\.toml: not valid TOML"):
        load(str(bad))


def test_a_cross_option_error_still_names_the_flags(tmp_path):
    path = write(tmp_path, "workers = 2\n")
    with pytest.raises(ConfigError, match="--workers above 1 needs --redis-url"):
        load(path)
