"""One frozen :class:`Config`: every option of ``hub serve``, its default, unit and variable.

Each option is a command-line flag (``--max-buffer-bytes``) and an environment variable
(``HUB_MAX_BUFFER_BYTES``); the flag wins over the variable, the variable over the default.
Repeatable options (``--redis-url``, ``--client-publish``, ``--allowed-origin``) read their
variable as a comma-separated list. :data:`OPTIONS` is the single table the CLI, the docs
test and the deployment-file test read.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.connection import parse_url

from .channels import NamespaceOptions
from .exceptions import ConfigError
from .forwarded import parse_networks

__all__ = ["OPTIONS", "Config", "Option", "address_error", "env_name"]


@dataclass(frozen=True)
class Option:
    """One option of ``hub serve``: its flag, type, unit and help text; its default is the
    :class:`Config` field's.

    ``help`` says what the option does and never its default: ``--help`` appends
    :attr:`default_help`, which is ``default_text`` when given (what an empty or None
    default means, e.g. ``"none: authentication off"``), else the default itself.
    """

    name: str  # the Config field; flag is --name-with-dashes, env HUB_NAME
    type: type
    help: str
    repeat: bool = False
    choices: tuple[str, ...] | None = None
    default_text: str | None = None

    @property
    def default(self) -> Any:
        """The default value: the one of the :class:`Config` field, written only there."""
        return _DEFAULTS[self.name]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return env_name(self.name)

    @property
    def default_help(self) -> str:
        """The default as ``--help`` shows it: ``default_text``, ``on``/``off``, the value."""
        if self.default_text is not None:
            return self.default_text
        if self.type is bool:
            return "on" if self.default else "off"
        if self.default in ((), None):
            return "none"
        return str(self.default)


def env_name(name: str) -> str:
    """The environment variable of option ``name``: ``max_buffer_bytes`` gives
    ``HUB_MAX_BUFFER_BYTES``."""
    return "HUB_" + name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("host", str, "interface to listen on"),
    Option("port", int, "TCP port for WebSocket (/ws) and HTTP (/healthz, /readyz, /metrics)"),
    Option("tls_cert", str, "PEM certificate chain file: serve wss:// and https:// "
           "(the probes too); needs --tls-key", default_text="none: plain ws:// and http://"),
    Option("tls_key", str, "PEM private key file of --tls-cert (unencrypted)"),
    Option("redis_url", str, "Redis URL (redis://, rediss:// or unix://); repeat to shard "
           "channels over several Redis instances", repeat=True,
           default_text="none: the embedded in-process broker"),
    Option("redis_cluster", bool, "treat --redis-url as a seed node of a Redis Cluster "
           "and use sharded pub/sub (SSUBSCRIBE/SPUBLISH)"),
    Option("redis_prefix", str, "prefix of every Redis channel name"),
    Option("jwt_secret", str, "HS256 secret; when set, every connection needs a token",
           default_text="none: authentication off"),
    Option("auth_timeout", float, "seconds a connection that offered no token at the "
           "handshake has to send its connect command; then close 4005"),
    Option("client_publish", str, "channel pattern clients may publish to (exact name or "
           "prefix ending in *); repeatable", repeat=True,
           default_text="none: clients cannot publish"),
    Option("allowed_origin", str, "allowed Origin header of browser handshakes; "
           "repeatable", repeat=True, default_text="any Origin"),
    Option("trusted_proxy", str, "address or CIDR network of a reverse proxy whose "
           "X-Forwarded-For header names the client (for log lines); repeatable", repeat=True),
    Option("compression", str, "permessage-deflate on ('deflate') or off ('none')",
           choices=("none", "deflate")),
    Option("log_level", str, "logging level",
           choices=("debug", "info", "warning", "error")),
    Option("loop", str, "event loop: 'auto' is uvloop when installed (the hub-realtime[uvloop] "
           "extra), else asyncio", choices=("auto", "asyncio", "uvloop")),
    Option("workers", int, "worker processes sharing the port (SO_REUSEPORT); >1 needs Redis"),
    Option("share_port", bool, "join hub processes already listening on this port "
           "(SO_REUSEPORT), e.g. for a rolling restart", default_text="off: such a port is "
           "refused"),
    Option("metrics_port", int, "TCP port of a second, private listener for /metrics, "
           "/healthz and /readyz (plain HTTP, no authentication; SO_REUSEPORT with "
           "--workers); /metrics on --port then answers 404",
           default_text="none: /metrics on --port"),
    Option("api_port", int, "TCP port of the HTTP server API (docs/api.md: publish, "
           "broadcast, history, batch, info); needs --api-key; SO_REUSEPORT with --workers",
           default_text="none: no HTTP API"),
    Option("api_host", str, "interface the HTTP API listens on"),
    Option("api_key", str, "a key the HTTP API accepts as Authorization: Bearer <key>; "
           "repeatable, any one of them is accepted (rotation)", repeat=True,
           default_text="none"),
    Option("demo", bool, "serve a chat page at /demo and the JS client at /hub.js on --port, "
           "with what it needs: the namespace demo (history, presence, join/leave) unless the "
           "configuration file defines it, and client publish to demo:*; needs "
           "authentication off (docs/demo.md)"),
    # Limits
    Option("max_connections", int, "connections per process; past it the handshake gets 503"),
    Option("max_connections_per_user", int, "connections per user id per process; past it "
           "the handshake gets 429 and an in-band connect is closed with 4009; 0 disables"),
    Option("max_pending_handshakes", int, "TCP connections per process whose opening "
           "handshake has not finished; one more aborts the oldest of them"),
    Option("handshake_timeout", float, "seconds a client has for the TLS handshake (with "
           "--tls-cert) and then for its whole handshake request; then it is aborted"),
    Option("max_request_headers", int, "header lines in a handshake request; more: the "
           "connection is closed without a response"),
    Option("max_header_line_bytes", int, "longest request line or header line of a handshake "
           "request, in bytes; longer: the connection is closed without a response"),
    Option("max_subscriptions", int, "channel subscriptions per connection"),
    Option("api_max_body_bytes", int, "largest HTTP API request body in bytes; larger: 413"),
    Option("api_max_inflight", int, "HTTP API requests a process runs at once; one more: 429 "
           "with Retry-After"),
    Option("max_message_bytes", int, "largest client message in bytes; larger closes with 1009"),
    Option("max_buffer_bytes", int, "per-connection write buffer in bytes above which a "
           "slow consumer is closed with 4008"),
    Option("max_payload_bytes", int, "largest broker (backend) payload in bytes, as delivered "
           "(a non-JSON payload counted as its JSON string); a larger one is delivered to "
           "nobody, counted in hub_payloads_dropped_total; below --max-buffer-bytes"),
    Option("max_lag", float, "seconds the delivery of broker messages may lag behind Redis "
           "(liveness probe round trip) before /readyz answers 503"),
    Option("rate_limit", float, "client commands per second per connection (token bucket, "
           "burst of twice that); 0 disables. A connection with more than half of a window "
           "of 4x burst commands refused is closed with 4029"),
    Option("max_frame_rate", float, "WebSocket frames per second per connection, every frame "
           "the client sends counted (pings, pongs, fragments); token bucket, burst of twice "
           "that; past it close 4029; 0 disables"),
    Option("ping_interval", float, "seconds between keepalive pings; 0 disables"),
    Option("shutdown_timeout", float, "seconds a graceful stop waits for clients to close "
           "before aborting them"),
    Option("probe_interval", float, "seconds between Redis liveness probes"),
    Option("probe_timeout", float, "seconds a probe may take before the Redis link is "
           "declared dead and reconnected"),
    Option("config", str, "TOML configuration file: any option above (under its name with "
           "underscores) and the [channels] and [namespaces.<name>] tables; flags and "
           "variables win over it", default_text="none"),
)

_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class Config:
    """Settings of one hub process. Units: bytes, seconds, commands per second.

    Build it with :meth:`from_sources`, which applies environment variables and checks every
    value; direct construction applies defaults only (handy in tests).
    """

    host: str = "127.0.0.1"
    port: int = 8765
    tls_cert: str | None = None
    tls_key: str | None = None
    redis_url: tuple[str, ...] = ()
    redis_cluster: bool = False
    redis_prefix: str = "hub:"
    jwt_secret: str | None = field(default=None, repr=False)
    auth_timeout: float = 10.0
    client_publish: tuple[str, ...] = ()
    allowed_origin: tuple[str, ...] = ()
    trusted_proxy: tuple[str, ...] = ()
    compression: str = "none"
    log_level: str = "info"
    loop: str = "auto"
    workers: int = 1
    share_port: bool = False
    metrics_port: int | None = None
    api_port: int | None = None
    api_host: str = "127.0.0.1"
    api_key: tuple[str, ...] = field(default=(), repr=False)
    demo: bool = False
    # Limits
    max_connections: int = 10000
    max_connections_per_user: int = 100
    max_pending_handshakes: int = 256
    handshake_timeout: float = 5.0
    max_request_headers: int = 32
    max_header_line_bytes: int = 8192
    max_subscriptions: int = 128
    api_max_body_bytes: int = 1048576
    api_max_inflight: int = 256
    max_message_bytes: int = 65536
    max_buffer_bytes: int = 1048576
    max_payload_bytes: int = 65536
    max_lag: float = 1.0
    rate_limit: float = 100.0
    max_frame_rate: float = 1000.0
    ping_interval: float = 20.0
    shutdown_timeout: float = 10.0
    probe_interval: float = 1.0
    probe_timeout: float = 2.0
    config: str | None = None
    # Only in the configuration file (no flag): the per-namespace channel options.
    channels: NamespaceOptions = field(default=NamespaceOptions(), metadata={"file_only": True})
    namespaces: tuple[tuple[str, NamespaceOptions], ...] = field(
        default=(), metadata={"file_only": True})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first option whose value is out of range."""
        positive = ("max_connections", "max_subscriptions", "max_message_bytes",
                    "max_buffer_bytes", "max_payload_bytes", "max_lag", "workers",
                    "probe_interval", "probe_timeout", "auth_timeout", "max_pending_handshakes",
                    "handshake_timeout", "max_request_headers", "max_header_line_bytes",
                    "api_max_body_bytes", "api_max_inflight")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_BY_NAME[name].flag} must be > 0, got {getattr(self, name)}")
        for name in ("rate_limit", "max_frame_rate", "ping_interval", "shutdown_timeout",
                     "max_connections_per_user"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_BY_NAME[name].flag} must be >= 0, got {getattr(self, name)}")
        if math.isnan(self.max_frame_rate):
            raise ConfigError("--max-frame-rate must be a number, got nan")
        for name in ("auth_timeout", "handshake_timeout"):
            if not math.isfinite(getattr(self, name)):  # nan passes the > 0 check above
                raise ConfigError(f"{_BY_NAME[name].flag} must be a finite number, "
                                  f"got {getattr(self, name)}")
        if math.isnan(self.max_lag):
            raise ConfigError("--max-lag must be a number, got nan")
        if self.max_payload_bytes >= self.max_buffer_bytes:
            raise ConfigError(f"--max-payload-bytes ({self.max_payload_bytes}) must be below "
                              f"--max-buffer-bytes ({self.max_buffer_bytes})")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0..65535, got {self.port}")
        if self.metrics_port is not None:
            if not 0 <= self.metrics_port <= 65535:
                raise ConfigError(f"--metrics-port must be 0..65535, got {self.metrics_port}")
            if self.metrics_port == self.port and self.port != 0:
                raise ConfigError("--metrics-port must differ from --port")
        self._validate_api()
        if self.demo and self.jwt_secret is not None:
            raise ConfigError("--demo needs authentication off (no --jwt-secret): the demo "
                              "page has no token to connect with")
        if self.workers > 1 and not self.redis_url:
            raise ConfigError("--workers above 1 needs --redis-url: the embedded broker only "
                              "reaches its own process")
        if self.redis_cluster and len(self.redis_url) != 1:
            raise ConfigError("--redis-cluster takes exactly one --redis-url (a seed node)")
        for url in self.redis_url:
            try:
                parse_url(url)  # type: ignore[no-untyped-call]  # redis-py's own parser
            except ValueError as exc:
                raise ConfigError(f"--redis-url {_redact(url)!r}: {exc}") from None
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
        try:
            parse_networks(self.trusted_proxy)
        except ValueError as exc:
            raise ConfigError(f"--trusted-proxy: {exc}") from None
        for opt in OPTIONS:
            if opt.choices and getattr(self, opt.name) not in opt.choices:
                raise ConfigError(f"{opt.flag} must be one of {', '.join(opt.choices)}")

    def _validate_api(self) -> None:
        if self.api_port is None:
            if self.api_key:
                raise ConfigError("--api-key is given without --api-port: the key would "
                                  "enable nothing")
            return
        if not 0 <= self.api_port <= 65535:
            raise ConfigError(f"--api-port must be 0..65535, got {self.api_port}")
        if self.api_port != 0 and self.api_port in (self.port, self.metrics_port):
            raise ConfigError("--api-port must differ from --port and --metrics-port")
        if not self.api_key:
            raise ConfigError("--api-port needs --api-key: the HTTP API is never open "
                              "without a key")
        for key in self.api_key:
            if not key or any(c.isspace() or c == "," or not c.isprintable()
                              or not c.isascii() for c in key):
                raise ConfigError("--api-key: a key is 1 or more printable ASCII characters "
                                  "without spaces or commas")

    @classmethod
    def from_sources(cls, flags: Mapping[str, Any], environ: Mapping[str, str] | None = None,
                     ) -> Config:
        """Merge ``flags`` (None or absent: not given) over ``environ`` over the configuration
        file (``config``, from the flag or ``HUB_CONFIG``) over the defaults.

        Raises :class:`ConfigError` naming the flag, variable or file key whose value is bad.
        """
        environ = os.environ if environ is None else environ
        path = flags.get("config") or environ.get(env_name("config")) or None
        file = None
        if path is not None:
            from .configfile import read_config_file

            file = read_config_file(path, {o.name: (o.type, o.repeat) for o in OPTIONS
                                           if o.name != "config"})
        values: dict[str, Any] = {}
        from_file: list[str] = []
        for opt in OPTIONS:
            value = flags.get(opt.name)
            if value is None or (opt.repeat and not value):
                raw = environ.get(opt.env)
                if raw is None or raw == "":
                    if file is None or opt.name not in file.options:
                        continue
                    value = file.options[opt.name]
                    from_file.append(opt.name)
                else:
                    value = _parse(opt, raw)
            values[opt.name] = tuple(value) if opt.repeat else value
        if file is not None:
            values["channels"] = file.channels
            values["namespaces"] = tuple(sorted(file.namespaces.items()))
        try:
            return cls(**values)
        except ConfigError as exc:
            for name in from_file:  # a value of the file: say where it came from
                flag = _BY_NAME[name].flag
                if str(exc).startswith((flag + " ", flag + ":")):
                    raise ConfigError(f"{path}: {name}: {exc}") from None
            raise

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server TLS context of ``--tls-cert``/``--tls-key``; None when TLS is off.

        Reads both files now (call it again to pick up renewed files). Raises
        :class:`ConfigError` naming the file that is unreadable, holds no PEM certificate,
        no usable private key, or a key that does not match the certificate.
        """
        if self.tls_cert is None or self.tls_key is None:
            return None
        cert, key = self.tls_cert, self.tls_key
        for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from None
        try:  # load_cert_chain's "PEM lib" error does not say which file is bad: try the cert
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
        except ssl.SSLError:
            raise ConfigError(f"--tls-cert {cert}: no PEM certificate in it") from None

        def no_password() -> bytes:
            raise ConfigError(f"--tls-key {key}: the key is encrypted; give an unencrypted one")

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(cert, key, password=no_password)
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise ConfigError(f"--tls-key {key} is not the key of the certificate in "
                                  f"--tls-cert {cert}") from None
            raise ConfigError(f"--tls-key {key}: no PEM private key in it") from None
        return context


#: Every option's default, from the Config fields (the one place each is written).
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Config)
                             if not f.metadata.get("file_only")}


def address_error(host: str, port: int, exc: OSError, flag: str = "--host") -> ConfigError:
    """The one-line configuration error for ``exc``, raised binding ``host:port`` (``flag``
    names the host's option)."""
    if isinstance(exc, socket.gaierror):
        return ConfigError(f"{flag} {host!r} is neither an IP address nor a name that resolves: "
                           f"{exc.strerror or exc}")
    # uvloop's strerror is a whole sentence naming the address again; the errno says it all
    reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else str(exc)
    return ConfigError(f"cannot listen on {host}:{port}: {reason}")


def _redact(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for error messages)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{hostport}").geturl()


def _parse(opt: Option, raw: str) -> Any:
    try:
        if opt.repeat:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if opt.type is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return opt.type(raw)
    except ValueError:
        raise ConfigError(f"{opt.env}={raw!r} is not a valid {opt.type.__name__}") from None
