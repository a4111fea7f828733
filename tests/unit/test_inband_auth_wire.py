"""In-band authentication's wire format and origin checks, without sockets: ``parse_connect``
and its token limits, ``origin_problems``. The hub's behaviour is in
tests/system/test_inband_auth.py.
"""

from __future__ import annotations

import json

import pytest

from hub.auth import MAX_TOKEN_BYTES, origin_problems
from hub.exceptions import ProtocolError
from hub.protocol import Connect, parse_command, parse_connect

# -- the wire format, without sockets --------------------------------------------------------

def test_parse_connect_and_its_token_limits():
    assert parse_command('{"op":"connect","token":"t","id":1}') == Connect("t", 1)
    assert parse_connect('{"op":"connect","token":"t"}') == Connect("t")
    at_limit = "t" * MAX_TOKEN_BYTES
    assert parse_connect(json.dumps({"op": "connect", "token": at_limit})).token == at_limit
    for bad in ('{"op":"connect"}', '{"op":"connect","token":""}', '{"op":"connect","token":5}',
                '{"op":"connect","token":null}', '{"op":"connect","token":["t"]}',
                json.dumps({"op": "connect", "token": "t" * (MAX_TOKEN_BYTES + 1)})):
        for parse in (parse_command, parse_connect):
            with pytest.raises(ProtocolError) as info:
                parse(bad)
            assert info.value.code == "bad_request", bad
    # Anything that is not a connect command at all: None (the hub closes with 4006).
    for other in ('{"op":"ping","id":1}', '{"op":"subscribe","channel":"news"}', "{", "[]",
                  "null", b'{"op":"connect","token":"t"}', '{"token":"t"}',
                  '{"op":"connect","token":"t","id":true}', '{"op":"CONNECT","token":"t"}'):
        assert parse_connect(other) is None, other


def test_origin_problems_name_each_value_no_browser_can_send():
    good = ["https://app.example", "http://localhost:3000", "http://[::1]:8080",
            "https://app.example:8443", "null"]
    assert origin_problems(good) == []
    bad = {
        "https://app.example/": "trailing slash",
        "https://app.example/app": "path",
        "https://app.example?x=1": "query",
        "https://app.example#top": "fragment",
        "app.example": "no scheme",
        "ws://app.example": "not http or https",
        "chrome://settings": "not http or https",
        "https://user@app.example": "user info",
        "https://App.example": "lower case",
        "https://app.example:443": "default port",
        "http://app.example:80": "default port",
        "https://app.example:99999": "port",
        "https://": "no host",
    }
    for value, reason in bad.items():
        problems = origin_problems([value])
        assert len(problems) == 1, value
        assert repr(value) in problems[0] and reason in problems[0], (value, problems)
    # One message per distinct bad value, in order.
    assert len(origin_problems(["a.example", "https://ok.example", "a.example", "b.example"])) == 2
