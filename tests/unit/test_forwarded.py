"""The client address behind trusted proxies (hub.forwarded): pure, no I/O."""

from __future__ import annotations

import pytest

from hub.forwarded import client_address, parse_networks

LOCAL = parse_networks(["127.0.0.1", "10.0.0.0/8"])


def test_an_untrusted_peer_is_the_client_whatever_it_sends():
    assert client_address("203.0.113.9", ["1.2.3.4"], LOCAL) == "203.0.113.9"
    assert client_address("203.0.113.9", ["1.2.3.4"], ()) == "203.0.113.9"


def test_a_trusted_peer_gives_the_rightmost_untrusted_hop():
    assert client_address("127.0.0.1", ["198.51.100.7"], LOCAL) == "198.51.100.7"
    # the client wrote the leftmost entry itself; the proxy appended the real address
    assert client_address("127.0.0.1", ["6.6.6.6, 198.51.100.7"], LOCAL) == "198.51.100.7"
    # two proxies (10.1.2.3 in front of nginx on 127.0.0.1), headers split over two lines
    assert client_address("127.0.0.1", ["198.51.100.7", "10.1.2.3"], LOCAL) == "198.51.100.7"


def test_all_trusted_gives_the_leftmost_and_no_header_the_peer():
    assert client_address("127.0.0.1", ["10.0.0.5, 10.0.0.6"], LOCAL) == "10.0.0.5"
    assert client_address("127.0.0.1", [], LOCAL) == "127.0.0.1"
    assert client_address("127.0.0.1", [" , "], LOCAL) == "127.0.0.1"


def test_nothing_left_of_a_malformed_entry_is_believed():
    assert client_address("127.0.0.1", ["198.51.100.7, junk"], LOCAL) == "127.0.0.1"
    assert client_address("127.0.0.1", ["junk, 10.0.0.5"], LOCAL) == "10.0.0.5"


def test_ipv6_and_mapped_ipv4_peers():
    assert client_address("::ffff:127.0.0.1", ["2001:db8::1"], LOCAL) == "2001:db8::1"
    assert client_address("::1", ["2001:db8::1"], parse_networks(["::1"])) == "2001:db8::1"
    assert client_address(None, ["2001:db8::1"], LOCAL) == "?"


def test_bad_networks_are_refused_by_name():
    with pytest.raises(ValueError, match="'nope'"):
        parse_networks(["127.0.0.1", "nope"])
    assert parse_networks(["10.1.2.3/8"])[0].prefixlen == 8  # host bits are allowed
