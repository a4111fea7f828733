"""The ``hub`` command: ``hub serve`` and ``hub publish``. Nothing else configures logging.

``hub serve [options]`` runs a hub process (or a supervisor of ``--workers`` processes);
every option is listed in :data:`hub.config.OPTIONS` and docs/protocol.md.
``hub publish CHANNEL JSON [--redis-url URL ...] [--redis-prefix hub:]`` publishes one
message and prints how many hub processes received it.

Exit codes: 0 on success and on a graceful stop, 2 on a usage or configuration error,
1 when ``hub publish`` cannot reach Redis.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import orjson

from .config import OPTIONS, Config, env_name
from .exceptions import ConfigError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``hub`` command (the CLI contract of docs/protocol.md)."""
    parser = argparse.ArgumentParser(prog="hub", description="Realtime pub/sub hub over WebSocket.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the hub",
                           description="Run the hub. Every option also reads HUB_<OPTION>.")
    for opt in OPTIONS:
        kwargs: dict = {"dest": opt.name, "default": None,
                        "help": f"{opt.help} (env {opt.env}; default {_show(opt.default)})"}
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
        serve.add_argument(opt.flag, **kwargs)

    publish = sub.add_parser("publish", help="publish one message through Redis")
    publish.add_argument("channel", help="channel name, e.g. news or user:alice")
    publish.add_argument("json", help="the message, a JSON document")
    publish.add_argument("--redis-url", action="append", dest="redis_url", default=None,
                         help=f"Redis URL, repeat for shards (env {env_name('redis_url')})")
    publish.add_argument("--redis-prefix", dest="redis_prefix", default=None,
                         help=f"channel prefix (env {env_name('redis_prefix')}; default hub:)")
    publish.add_argument("--redis-cluster", dest="redis_cluster", default=None,
                         action=argparse.BooleanOptionalAction,
                         help=f"the URL is a Redis Cluster seed (env {env_name('redis_cluster')})")
    return parser


def _show(value: object) -> str:
    if value in ((), None):
        return "none"
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hub`` console script. Returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            config = Config.from_sources(vars(args))
            _setup_logging(config.log_level)
            if config.workers > 1:
                from .supervisor import run_workers

                return run_workers(config)
            from .server import run

            return run(config)
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

    config = Config.from_sources({"redis_url": args.redis_url, "redis_prefix": args.redis_prefix,
                                  "redis_cluster": args.redis_cluster})
    if not config.redis_url:
        raise ConfigError("hub publish needs --redis-url or HUB_REDIS_URL")
    try:
        data = orjson.loads(args.json)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"JSON argument is not valid JSON: {exc}") from None
    try:
        with Publisher(list(config.redis_url), prefix=config.redis_prefix,
                       cluster=config.redis_cluster) as publisher:
            print(publisher.publish(args.channel, data))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        print(f"hub: cannot reach Redis: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # redis.exceptions.ConnectionError is not an OSError
        if type(exc).__module__.startswith("redis"):
            print(f"hub: cannot reach Redis: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
