"""The OpenAPI document of the HTTP API: the one served is docs/openapi.json, and it names
every route of the app and nothing else (no sockets: the app is routed in-process)."""

from __future__ import annotations

import json

import pytest
from aiohttp.test_utils import make_mocked_request

from hub.api import API_ERRORS, ENDPOINTS, ApiServer
from hub.api.commands import MAX_BATCH_COMMANDS, MAX_BROADCAST_CHANNELS, METHODS
from hub.brokers.memory import MemoryBroker
from hub.metrics import Metrics
from hub.node import Node
from tests.helpers import ROOT

DOC = ROOT / "docs" / "openapi.json"


def api_server() -> ApiServer:
    return ApiServer(Node(MemoryBroker()), Metrics(), keys=["k" * 32], max_body_bytes=1024,
                     version="0")


async def test_the_served_document_is_docs_openapi_json():
    server = api_server()
    request = make_mocked_request("GET", "/api/openapi.json", app=server.app)
    match = await server.app.router.resolve(request)
    response = await match.handler(request)
    assert response.status == 200
    assert response.content_type == "application/json"
    assert response.body == DOC.read_bytes()


def test_every_route_has_a_path_entry_and_every_path_a_route():
    doc = json.loads(DOC.read_text())
    assert doc["openapi"].startswith("3.1")
    routes = {(r.method.lower(), r.resource.canonical) for r in api_server().app.router.routes()
              if r.resource is not None}
    paths = {(method, path) for path, item in doc["paths"].items() for method in item}
    assert routes == paths
    assert {f"/api/{name}" for name in ENDPOINTS} <= {p for _, p in paths}


def test_the_document_states_the_limits_and_codes_of_the_code():
    schemas = json.loads(DOC.read_text())["components"]["schemas"]
    assert schemas["BroadcastRequest"]["properties"]["channels"]["maxItems"] == \
        MAX_BROADCAST_CHANNELS
    assert schemas["BatchRequest"]["properties"]["commands"]["maxItems"] == MAX_BATCH_COMMANDS
    assert schemas["BatchCommand"]["properties"]["method"]["enum"] == list(METHODS)
    assert schemas["Error"]["properties"]["error"]["properties"]["code"]["enum"] == \
        list(API_ERRORS)


def test_api_md_documents_every_endpoint_and_error_code():
    text = (ROOT / "docs" / "api.md").read_text()
    for name in ENDPOINTS:
        assert f"/api/{name}" in text, name
        assert f"localhost:8766/api/{name}" in text, f"no curl example for {name}"
    for code, (status, _) in API_ERRORS.items():
        assert f"| `{code}` | {status} |" in text, code


@pytest.mark.parametrize("keys", [[], ()])
def test_an_api_server_without_keys_is_refused(keys):
    with pytest.raises(ValueError):
        ApiServer(Node(MemoryBroker()), Metrics(), keys=keys, max_body_bytes=1, version="0")


def test_aiohttp_errors_are_one_line_per_interval_without_traceback():
    import logging

    from hub.api.app import _OneLinePerInterval

    quiet = _OneLinePerInterval()

    def record(level: int = logging.ERROR) -> logging.LogRecord:
        try:
            raise ValueError("bad request line")
        except ValueError:
            import sys

            return logging.LogRecord("x", level, __file__, 1, "Error handling %s", ("request",),
                                     sys.exc_info())

    first = record()
    assert quiet.filter(first)
    assert first.getMessage() == "HTTP API: Error handling request: bad request line"
    assert first.exc_info is None and first.levelname == "WARNING"
    assert not quiet.filter(record()) and not quiet.filter(record())
    assert quiet.filter(record(logging.DEBUG))  # debug lines untouched
    quiet.last -= 11
    again = record()
    assert quiet.filter(again)
    assert again.getMessage().endswith("(2 more since the last such line)")
