"""The HTTP server API (docs/api.md): its own listener, ``--api-port``, aiohttp.

:class:`ApiServer` serves it, :mod:`hub.api.commands` parses the requests (sans-I/O),
:mod:`hub.api.errors` holds the error codes and their HTTP statuses.
"""

from .app import ENDPOINTS, OPENAPI, ApiServer
from .errors import API_ERRORS, ApiError

__all__ = ["API_ERRORS", "ENDPOINTS", "OPENAPI", "ApiError", "ApiServer"]
