"""hub: realtime pub/sub broadcast over WebSocket, with Redis fan-out across processes.

The public surface for backends is :class:`Publisher` and :class:`AsyncPublisher`; the server
runs as the ``hub serve`` command.
"""

from .publisher import AsyncPublisher, Publisher

__all__ = ["Publisher", "AsyncPublisher", "__version__"]
__version__ = "0.1.0"
