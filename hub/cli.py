"""The ``hub`` command: ``hub serve`` and ``hub publish``. Nothing else configures logging.

``hub serve [options]`` runs a hub process (or a supervisor of ``--workers`` processes);
every option is listed in :data:`hub.config.OPTIONS` and docs/protocol.md.
``hub publish CHANNEL JSON [--redis-url URL ...] [--redis-prefix hub:] [--config PATH]
[--idempotency-key KEY]`` publishes one message and prints one line: how many hub processes
received it on a plain channel, ``<offset> <epoch>`` on a history channel (the configuration
file's namespace options say which). ``hub --version`` prints ``hub <version>``.

Exit codes: 0 on success and on a graceful stop, 2 on a usage or configuration error (a bad
value, a malformed Redis URL, an unreadable TLS file, a port in use, a host that does not
resolve, a file-descriptor limit below what the limits need), with one line ``hub: ...`` on
stderr; 1 when ``hub publish`` cannot reach Redis or Redis answers it with an error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from . import __version__
from .config import OPTIONS, Config, Option
from .exceptions import ConfigError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``hub`` command (the CLI contract of docs/protocol.md)."""
    parser = argparse.ArgumentParser(prog="hub", description="Realtime pub/sub hub over WebSocket.")
    parser.add_argument("--version", action="version", version=f"hub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the hub",
                           description="Run the hub. Every option also reads HUB_<OPTION>.")
    for opt in OPTIONS:
        _add_option(serve, opt)

    publish = sub.add_parser("publish", help="publish one message through Redis")
    publish.add_argument("channel", help="channel name, e.g. news or user:alice")
    publish.add_argument("json", help="the message, a JSON document")
    for opt in OPTIONS:
        if opt.name in _PUBLISH_OPTIONS:
            # publish has no embedded broker to fall back to
            _add_option(publish, opt, "none, one is required" if opt.name == "redis_url" else None)
    publish.add_argument("--idempotency-key", metavar="KEY", default=None,
                         help="history channels only: a repeat with the same key on the same "
                         "channel within 300 s publishes nothing and prints the first offset "
                         "and epoch (a per-message value: no variable; default none)")
    return parser


_PUBLISH_OPTIONS = ("redis_url", "redis_prefix", "redis_cluster", "config")


def _add_option(parser: argparse.ArgumentParser, opt: Option,
                default_help: str | None = None) -> None:
    """Add ``opt`` to ``parser``; its help ends with its variable and, once, its default
    (``default_help`` or :attr:`Option.default_help`)."""
    # default=None: "not given", so that Config.from_sources can fall back to the variable.
    shown = default_help or opt.default_help
    kwargs: dict[str, Any] = {"dest": opt.name, "default": None,
                    "help": f"{opt.help} (env {opt.env}; default {shown})"}
    if opt.type is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = opt.type
        kwargs["metavar"] = opt.name.split("_")[-1].upper()
        if opt.repeat:
            kwargs["action"] = "append"
        if opt.choices:
            kwargs["choices"] = opt.choices
            del kwargs["metavar"]
    parser.add_argument(opt.flag, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hub`` console script. Returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            config = Config.from_sources(vars(args))
            # Before any worker forks (they inherit it); exits 2 when it stays too low.
            from .oslimits import fds_needed, raise_fd_limit

            raise_fd_limit(fds_needed(config.max_connections, config.max_pending_handshakes))
            _setup_logging(config.log_level)
            if config.workers > 1:
                from .supervisor import run_workers

                return run_workers(config)
            from .server import run

            # --share-port: listen with SO_REUSEPORT, so that this process and hubs already
            # on the port (started with --share-port too) take turns at new connections.
            return run(config, reuse_port=config.share_port)
        return _publish(args)
    except ConfigError as exc:
        print(f"hub: {exc}", file=sys.stderr)
        return 2


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s",
    )
    # websockets logs every handshake failure at INFO; keep its lines but not below WARNING
    # at the default level, so that one line per connection comes from hub only.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, logging.root.level))


def _publish(args: argparse.Namespace) -> int:
    from .publisher import Publisher

    config = Config.from_sources({name: getattr(args, name) for name in _PUBLISH_OPTIONS})
    if not config.redis_url:
        raise ConfigError("hub publish needs --redis-url or HUB_REDIS_URL")
    try:
        data = orjson.loads(args.json)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"JSON argument is not valid JSON: {exc}") from None
    from redis.exceptions import ResponseError

    key = args.idempotency_key or None
    try:
        with Publisher(list(config.redis_url), prefix=config.redis_prefix,
                       cluster=config.redis_cluster, namespaces=dict(config.namespaces),
                       channels=config.channels) as publisher:
            result = publisher.publish(args.channel, data, idempotency_key=key)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    except ResponseError as exc:  # an error reply, e.g. from the history function
        print(f"hub: Redis refused the publish: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"hub: cannot reach Redis: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # redis.exceptions.ConnectionError is not an OSError
        if type(exc).__module__.startswith("redis"):
            print(f"hub: cannot reach Redis: {exc}", file=sys.stderr)
            return 1
        raise
    # one line: the hubs reached (plain channel), or "<offset> <epoch>" (history channel)
    print(result if isinstance(result, int) else f"{result.offset} {result.epoch}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
