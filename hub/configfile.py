"""The TOML configuration file of ``--config PATH`` (``HUB_CONFIG``), read with :mod:`tomllib`.

The file holds any option of ``hub serve`` under its Config name (``port = 8765``,
``redis_url = ["redis://127.0.0.1:6379/0"]``), and the per-namespace channel options::

    [channels]            # every channel whose namespace has no table below
    history_size = 0

    [namespaces.chat]     # channels chat:<anything>
    history_size = 100    # messages kept per channel; 0: no history
    history_ttl = 600     # seconds the history lives after the channel's last publish
    presence = true       # who is subscribed: the presence and presence_stats ops
    join_leave = true     # join/leave frames to the subscribers (needs presence)
    presence_ttl = 60     # seconds the entries of a dead process live

A namespace table inherits every key it does not set from ``[channels]``. Precedence of an
option: flag > environment variable > file > default. docs/protocol.md section 7 is the
contract; every error names the file, the key and what is wrong.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .channels import NamespaceOptions
from .exceptions import ConfigError

__all__ = ["ConfigFile", "read_config_file"]

#: Namespace names: what may stand before the first ``:`` of a channel name.
NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.@/-]{1,64}")


@dataclass(frozen=True)
class ConfigFile:
    """What a configuration file says: ``options`` maps Config names to checked values
    (repeatable options as tuples); ``channels`` are the options of channels in no
    configured namespace; ``namespaces`` maps a namespace name to its options."""

    options: Mapping[str, Any]
    channels: NamespaceOptions
    namespaces: Mapping[str, NamespaceOptions]


def read_config_file(path: str, option_types: Mapping[str, tuple[type, bool]]) -> ConfigFile:
    """Read and check the file at ``path``.

    ``option_types`` maps each option name that the file may set to ``(type, repeatable)``
    (:data:`hub.config.OPTIONS` gives it). Raises :class:`ConfigError` ``"<path>: <key>:
    <problem>"`` for an unreadable file, a TOML syntax error (with its line), an unknown
    key, or a value of the wrong type or out of range.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: the file is not UTF-8") from None
    options: dict[str, Any] = {}
    channels = NamespaceOptions()
    namespaces: dict[str, Any] = {}
    for key, value in data.items():
        if key == "channels":
            channels = _namespace(path, "channels", value, NamespaceOptions())
        elif key == "namespaces":
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: namespaces: expected tables [namespaces.<name>]")
            namespaces = value
        elif key == "config":
            raise ConfigError(f"{path}: config: a configuration file cannot name another one")
        elif key in option_types:
            options[key] = _option(path, key, value, *option_types[key])
        else:
            raise ConfigError(f"{path}: {key}: unknown key (the options are those of "
                              "`hub serve --help` with underscores, e.g. max_connections; "
                              "and the tables [channels] and [namespaces.<name>])")
    checked = {}
    for name, table in namespaces.items():
        where = f"namespaces.{name}"
        if NAMESPACE_RE.fullmatch(name) is None:
            raise ConfigError(f"{path}: {where}: a namespace name is 1-64 characters of "
                              "A-Z a-z 0-9 _ . @ / - (the part of a channel name before ':')")
        checked[name] = _namespace(path, where, table, channels)
    return ConfigFile(options, channels, checked)


def _option(path: str, key: str, value: Any, kind: type, repeat: bool) -> Any:
    if repeat:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: {key}: expected a list of strings, got {_show(value)}")
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{path}: {key}: expected true or false, got {_show(value)}")
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{path}: {key}: expected {_KINDS[kind]}, got {_show(value)}")
    return value


def _namespace(path: str, where: str, table: Any, base: NamespaceOptions) -> NamespaceOptions:
    """The options of one ``[channels]`` or ``[namespaces.<name>]`` table, keys it does not
    set taken from ``base``."""
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {where}: expected a table, got {_show(table)}")
    fields = {f.name: f.type for f in dataclasses.fields(NamespaceOptions)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{path}: {where}.{key}: unknown key (a namespace has "
                              f"{', '.join(sorted(fields))})")
        values[key] = value
    size = values.get("history_size", base.history_size)
    ttl = values.get("history_ttl", base.history_ttl)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ConfigError(f"{path}: {where}.history_size: expected an integer >= 0 (messages), "
                          f"got {_show(size)}")
    if (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl)
            or ttl < 0):
        raise ConfigError(f"{path}: {where}.history_ttl: expected a number of seconds >= 0, "
                          f"got {_show(ttl)}")
    if size > 0 and ttl <= 0:
        raise ConfigError(f"{path}: {where}.history_ttl: must be > 0 seconds when "
                          f"history_size is {size}")
    flags = {}
    for key in ("presence", "join_leave"):
        flag = values.get(key, getattr(base, key))
        if not isinstance(flag, bool):
            raise ConfigError(f"{path}: {where}.{key}: expected true or false, got "
                              f"{_show(flag)}")
        flags[key] = flag
    presence_ttl = values.get("presence_ttl", base.presence_ttl)
    if (isinstance(presence_ttl, bool) or not isinstance(presence_ttl, (int, float))
            or not math.isfinite(presence_ttl) or not 3 <= presence_ttl <= 86400):
        raise ConfigError(f"{path}: {where}.presence_ttl: expected a number of seconds from "
                          f"3 to 86400, got {_show(presence_ttl)}")
    if values.get("join_leave") is True and not flags["presence"]:
        raise ConfigError(f"{path}: {where}.join_leave: needs presence = true")
    # an inherited join_leave = true under presence = false is off
    return NamespaceOptions(history_size=size, history_ttl=float(ttl), presence=flags["presence"],
                            join_leave=flags["join_leave"] and flags["presence"],
                            presence_ttl=float(presence_ttl))


_KINDS = {str: "a string", int: "an integer", float: "a number"}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
