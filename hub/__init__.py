"""hub: realtime pub/sub broadcast over WebSocket, with Redis fan-out across processes.

The public surface for backends is :class:`Publisher` and :class:`AsyncPublisher`; the server
runs as the ``hub serve`` command.
"""

from importlib.metadata import PackageNotFoundError, version

from .publisher import AsyncPublisher, Publisher

__all__ = ["AsyncPublisher", "Publisher", "__version__"]

_SOURCE_VERSION = "0.1.0"
"""pyproject.toml's version: what ``__version__`` is when hub runs from a source tree that was
never installed (tests/system/test_cli.py keeps the two equal)."""

try:
    __version__: str = version("hub-realtime")  # the distribution's name, not the package's
except PackageNotFoundError:
    __version__ = _SOURCE_VERSION
