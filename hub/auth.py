"""Who a connection is: JWT verification (HS256 only) and the development fallback.

Tokens come as ``Authorization: Bearer <jwt>`` or as the ``token`` query parameter of the
handshake (the header wins when both are given), and later in ``refresh`` commands. Claims
(RFC 7519): ``sub`` (string, required) is the user id; ``exp`` (seconds since the epoch) is
honoured; ``channels`` (optional list of strings) lists the ``private:`` channels the user may
subscribe to, as exact names or prefixes ending in ``*``.

Tokens are never logged: :class:`hub.exceptions.AuthError` messages name the reason only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import parse_qs

import jwt

from .exceptions import AuthError
from .protocol import CHANNEL_RE, personal_channel

__all__ = ["Identity", "verify_token", "identify", "MAX_TOKEN_BYTES"]

#: Tokens longer than this many characters are rejected before any parsing.
MAX_TOKEN_BYTES = 4096
#: The only algorithm accepted: ``alg: none`` and public-key algorithms are refused.
ALGORITHMS = ["HS256"]


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

    Raises :class:`AuthError` for a token that is too long (> :data:`MAX_TOKEN_BYTES`),
    malformed, signed with another key or algorithm, expired, or lacking a valid ``sub``.
    """
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthError(f"token longer than {MAX_TOKEN_BYTES} characters")
    try:
        claims = jwt.decode(token, secret, algorithms=ALGORITHMS,
                            options={"require": ["sub"]})
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token ({type(exc).__name__})") from None
    user = check_user_id(claims["sub"])
    channels = claims.get("channels", [])
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise AuthError("the channels claim must be a list of strings")
    exp = claims.get("exp")
    expires_at = float(exp) if isinstance(exp, (int, float)) and math.isfinite(exp) else None
    return Identity(user, tuple(channels), expires_at)


def identify(path: str, authorization: str | None, secret: str | None) -> Identity:
    """The identity of a handshake for ``path`` (with its query string).

    With a ``secret``: the Bearer token of ``authorization``, else the ``token`` query
    parameter, must verify (:func:`verify_token`). Without one (development mode): the
    ``user`` query parameter, if any, is the user id, unchecked.
    Raises :class:`AuthError` (the handshake answers 401; 400 for a bad ``user`` parameter
    when auth is off).
    """
    try:
        query = parse_qs(path.partition("?")[2], max_num_fields=16)
    except ValueError:
        raise AuthError("more than 16 query parameters") from None
    if secret is None:
        user = query.get("user", [None])[0]
        return Identity(check_user_id(user) if user is not None else None)
    token = None
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            token = credentials.strip()
    if token is None:
        token = query.get("token", [None])[0]
    if not token:
        raise AuthError("missing token")
    return verify_token(token, secret)
