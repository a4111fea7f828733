"""The errors of the HTTP server API: one exception, one JSON body, one table of codes.

Every error answer is ``{"error":{"code":"...","message":"..."}}`` with the HTTP status of
its code (:data:`API_ERRORS`, docs/api.md "Errors"). This module is a leaf: it imports
nothing of the hub's.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["API_ERRORS", "ApiError", "error_body"]

#: Error code -> (HTTP status, meaning). docs/api.md lists the same table.
API_ERRORS: dict[str, tuple[int, str]] = {
    "bad_request": (400, "the body is not JSON, not an object, or a field is missing, "
                         "unknown or of the wrong type or range; in a batch, an unknown method"),
    "bad_channel": (400, "a channel name does not match ^[A-Za-z0-9_.:@/-]{1,128}$ or "
                         "misspells a reserved prefix"),
    "no_history": (400, "history, since or an idempotency_key on a channel whose namespace "
                        "keeps no history"),
    "no_presence": (400, "presence or presence_stats on a channel whose namespace keeps no "
                         "presence"),
    "unauthorized": (401, "no Authorization: Bearer header, or a key that is not one of "
                          "--api-key"),
    "not_found": (404, "no such path"),
    "method_not_allowed": (405, "the path exists, the method does not (the Allow header "
                                "names the one that does)"),
    "too_large": (413, "the body is over --api-max-body-bytes, or a message's data is over "
                       "--max-payload-bytes"),
    "rate_limited": (429, "more than --api-max-inflight requests are running on this process; "
                          "retry after the Retry-After seconds"),
    "unavailable": (503, "the broker (Redis) or the history store did not take or answer the "
                         "command in time; nothing was published; retry"),
    "internal": (500, "a bug in the hub; the request may or may not have taken effect"),
}


class ApiError(Exception):
    """An error answer: its ``code`` (a key of :data:`API_ERRORS`) gives the HTTP status."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        assert code in API_ERRORS, code
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        return API_ERRORS[self.code][0]

    def to_json(self) -> dict[str, Any]:
        """The ``{"code":..,"message":..}`` object (the value of ``"error"``)."""
        return {"code": self.code, "message": self.message}

    def prefixed(self, where: str) -> ApiError:
        """The same error with ``where`` (``commands[3]``) before its message."""
        return ApiError(self.code, f"{where}: {self.message}")


def error_body(error: ApiError) -> bytes:
    """The JSON body of an error answer."""
    return orjson.dumps({"error": error.to_json()})
