"""``hub serve --demo``: a chat page at ``/demo`` and the JS client at ``/hub.js``, on the
WebSocket port, and the channel options the page needs (docs/demo.md).

The two files are package data of this package (``index.html``; ``hub.js``, a symlink to
``clients/js/hub.js`` in a checkout, which setuptools copies into the wheel as a plain file),
read once with :mod:`importlib.resources`. The page talks to the hub with the JS client on
channels ``demo:<room>``: :func:`demo_channels` adds the namespace ``demo`` (history, presence,
join/leave) and the client-publish pattern ``demo:*`` to what the configuration says, unless the
configuration defines the namespace ``demo`` itself (then its table is used as it is).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources

from ..channels import NamespaceOptions

__all__ = ["ASSETS", "DEMO_NAMESPACE", "DEMO_OPTIONS", "DEMO_PUBLISH", "Asset", "asset",
           "demo_channels"]

#: The namespace of the page's rooms: room ``lobby`` is channel ``demo:lobby``.
DEMO_NAMESPACE = "demo"
#: Its options when the configuration does not define ``[namespaces.demo]``: 100 messages
#: kept an hour (the page's backlog and its recovery after a reconnect), presence and
#: join/leave frames (who is here).
DEMO_OPTIONS = NamespaceOptions(history_size=100, history_ttl=3600.0, presence=True,
                                join_leave=True)
#: The ``--client-publish`` pattern the page needs (the page sends with ``publish``).
DEMO_PUBLISH = "demo:*"


@dataclass(frozen=True)
class Asset:
    """One file served with ``--demo``: its package-data name and ``Content-Type``."""

    name: str
    content_type: str


#: URL path -> the file served there.
ASSETS: Mapping[str, Asset] = {
    "/demo": Asset("index.html", "text/html; charset=utf-8"),
    "/hub.js": Asset("hub.js", "text/javascript; charset=utf-8"),
}


def demo_channels(client_publish: tuple[str, ...],
                  namespaces: Mapping[str, NamespaceOptions],
                  ) -> tuple[tuple[str, ...], dict[str, NamespaceOptions]]:
    """``(client_publish, namespaces)`` with what the page needs added.

    The namespace ``demo`` gets :data:`DEMO_OPTIONS` unless ``namespaces`` has it (the
    user's table wins, as it is); ``client_publish`` gets :data:`DEMO_PUBLISH` unless a
    pattern already allows ``demo:`` channels. Returns new objects; the arguments are not
    changed.
    """
    merged = dict(namespaces)
    merged.setdefault(DEMO_NAMESPACE, DEMO_OPTIONS)
    patterns = tuple(client_publish)
    # a prefix pattern that every room matches ("*", "demo:*", "d*") is enough already
    if not any(p.endswith("*") and DEMO_PUBLISH.startswith(p[:-1]) for p in patterns):
        patterns += (DEMO_PUBLISH,)
    return patterns, merged


def asset(path: str) -> tuple[Asset, bytes] | None:
    """The file served at URL ``path`` (``/demo``, ``/hub.js``) and its bytes, read from the
    package once; None for any other path. Raises :class:`OSError` when the package lacks
    the file (a broken install)."""
    found = ASSETS.get(path)
    if found is None:
        return None
    return found, _read(found.name)


@cache  # keyed by the few package-data names only, never by a request's path
def _read(name: str) -> bytes:
    return resources.files(__name__).joinpath(name).read_bytes()
