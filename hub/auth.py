"""Who a connection is: JWT verification (HS256 only), the development fallback, and the
``--allowed-origin`` values a browser can actually send.

With ``--jwt-secret`` a connection authenticates in one of three ways:

* ``Authorization: Bearer <jwt>`` on the handshake (services; a browser cannot set it);
* the ``token`` query parameter of the handshake (kept for compatibility: the URL lands in
  proxy access logs and browser consoles); the header wins when both are given;
* in-band: a handshake that offers neither is accepted pending authentication and its first
  frame must be ``{"op":"connect","token":"<jwt>"}`` (hub.server; browsers should use this).

Later ``refresh`` commands replace the token. Claims (RFC 7519): ``sub`` (string, required)
is the user id; ``exp`` (seconds since the epoch, a JSON number) is honoured, as are ``nbf``
and ``iat``; ``channels`` (optional list of strings) lists the ``private:`` channels the user
may subscribe to, as exact names or prefixes ending in ``*``.

Tokens are never logged: :class:`hub.exceptions.AuthError` messages name the reason only.
"""

from __future__ import annotations

import math
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qs

import jwt

from .channels import personal_channel
from .exceptions import AuthError, TokenExpired
from .protocol import CHANNEL_RE, MAX_TOKEN_BYTES

__all__ = ["MAX_TOKEN_BYTES", "Identity", "identify", "origin_problems", "verify_token"]

#: The only algorithm accepted: ``alg: none`` and public-key algorithms are refused.
ALGORITHMS = ["HS256"]
#: What a browser puts in Origin for each scheme when the port is the default one.
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Identity:
    """The user of a connection. ``user`` None means anonymous (no personal channel);
    ``channels`` are the private channel patterns; ``expires_at`` is the token's ``exp`` in
    seconds since the epoch, or None when the identity does not expire."""

    user: str | None = None
    channels: tuple[str, ...] = ()
    expires_at: float | None = None


def check_user_id(user: object) -> str:
    """Return ``user`` if ``user:<user>`` is a valid channel name, else raise AuthError."""
    if (not isinstance(user, str) or not user
            or CHANNEL_RE.fullmatch(personal_channel(user)) is None):
        raise AuthError("user id must be 1-123 characters of A-Z a-z 0-9 _ . : @ / -")
    return user


def verify_token(token: str, secret: str) -> Identity:
    """Verify an HS256 JWT and return its :class:`Identity`.

    Raises :class:`TokenExpired` (an :class:`AuthError`) for a token whose ``exp`` has
    passed, :class:`AuthError` for one that is too long (> :data:`MAX_TOKEN_BYTES`
    characters), malformed, signed with another key or algorithm, not yet valid (``nbf`` or
    ``iat`` in the future, as PyJWT), with an ``exp``, ``nbf`` or ``iat`` that is not a
    NumericDate (RFC 7519: a JSON number; a numeric string, a boolean, null or a number
    beyond a double's range are refused), or lacking a valid ``sub`` or ``channels`` claim.
    """
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthError(f"token longer than {MAX_TOKEN_BYTES} characters")
    try:
        # The times are checked below, after their types: PyJWT would take "exp": "123" (it
        # calls int()) and then the connection would never expire.
        claims = jwt.decode(token, secret, algorithms=ALGORITHMS,
                            options={"require": ["sub"], "verify_exp": False,
                                     "verify_nbf": False, "verify_iat": False})
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token ({type(exc).__name__})") from None
    times = {name: _numeric_date(claims, name) for name in _TIME_CLAIMS}
    now = time.time()
    exp = times["exp"]
    if exp is not None and exp <= now:
        raise TokenExpired("token expired")
    for name in ("nbf", "iat"):  # as PyJWT: a token is not valid before either
        value = times[name]
        if value is not None and value > now:
            raise AuthError(f"invalid token (not yet valid: {name})")
    user = check_user_id(claims["sub"])
    channels = claims.get("channels", [])
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise AuthError("the channels claim must be a list of strings")
    return Identity(user, tuple(channels), exp)


#: The claims that are times: NumericDate values (RFC 7519 section 2).
_TIME_CLAIMS = ("exp", "nbf", "iat")


def _numeric_date(claims: dict[str, object], name: str) -> float | None:
    """The claim ``name`` as seconds since the epoch, None when absent. Raises AuthError
    unless it is a NumericDate: a JSON number (not a string such as ``"1767225600"``, not
    a boolean) that is finite as a double."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AuthError(f"invalid token (the {name} claim is not a number)")
    try:
        seconds = float(value)
    except OverflowError:  # an integer beyond a double's range
        seconds = math.inf
    if not math.isfinite(seconds):
        raise AuthError(f"invalid token (the {name} claim is out of range)")
    return seconds


def identify(path: str, authorization: str | None, secret: str | None) -> Identity | None:
    """The identity of a handshake for ``path`` (with its query string).

    With a ``secret``: the token of an ``Authorization: Bearer`` header (``authorization``;
    a header of another scheme, e.g. Basic from a proxy, is ignored), else the first
    non-empty ``token`` query parameter, must verify (:func:`verify_token`). None when the
    handshake offers no token at all (no Bearer header, no ``token`` parameter): the
    connection is to authenticate in-band with ``connect``. Without a secret (development
    mode): the ``user`` query parameter, if any, is the user id (:func:`check_user_id`);
    without one the connection is anonymous.
    Raises :class:`AuthError` (the handshake answers 401; 400 when auth is off) for a bad
    token, an empty Bearer header or ``token`` parameter, more than 16 query parameters,
    and without a secret for a ``user`` parameter that is empty (``?user=``, ``?user``),
    not a valid user id, or given more than once (``?user=&user=x``, even with equal
    values: one handshake names one user).
    """
    try:
        query = parse_qs(path.partition("?")[2], keep_blank_values=True, max_num_fields=16)
    except ValueError:
        raise AuthError("more than 16 query parameters") from None
    if secret is None:
        users = query.get("user", [])
        if len(users) > 1:
            raise AuthError("more than one user parameter")
        return Identity(check_user_id(users[0]) if users else None)
    token = None
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer":
            token = credentials.strip()
            if not token:
                raise AuthError("empty Bearer token")
    if token is None:
        if "token" not in query:
            return None
        token = next((t for t in query["token"] if t), None)
        if token is None:
            raise AuthError("empty token parameter")
    return verify_token(token, secret)


def origin_problems(origins: Iterable[str]) -> list[str]:
    """One message for each distinct ``--allowed-origin`` value that no browser can send.

    A browser's ``Origin`` header (RFC 6454) is exactly ``scheme://host[:port]`` with a
    lower-case ``http`` or ``https`` scheme and host, and no port when it is the scheme's
    default; the hub compares it as a string. Values with a trailing slash, a path, a query,
    a fragment, user info, no scheme, another scheme, upper-case letters, a bad or default
    port can never equal it. Pure: the caller logs the messages.
    """
    problems = []
    for value in dict.fromkeys(origins):
        reason = _origin_problem(value)
        if reason is not None:
            problems.append(f"--allowed-origin {value!r} can never match a browser's Origin "
                            f"(scheme://host[:port], e.g. https://app.example.com): {reason}")
    return problems


def _origin_problem(value: str) -> str | None:
    if value == "null":  # what sandboxed iframes and file: pages send: it can match
        return None
    if "://" not in value:
        return "it has no scheme (http:// or https://)"
    parts = urllib.parse.urlsplit(value)
    scheme = value.partition("://")[0]
    if scheme.lower() not in _DEFAULT_PORTS:
        return f"the scheme {scheme!r} is not http or https"
    if parts.path == "/" and not parts.query and not parts.fragment and "?" not in value:
        return "it has a trailing slash"
    if parts.path:
        return "it has a path"
    if "?" in value:
        return "it has a query"
    if "#" in value:
        return "it has a fragment"
    if "@" in parts.netloc:
        return "it has user info"
    if not parts.hostname:
        return "it has no host"
    if value != value.lower():
        return "browsers send it in lower case"
    try:
        port = parts.port
    except ValueError:
        return "its port is not a number from 0 to 65535"
    if port is None and parts.netloc.endswith(":"):
        return "it has an empty port"
    if port == _DEFAULT_PORTS[scheme]:
        return "browsers leave out the scheme's default port"
    return None
