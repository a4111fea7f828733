"""The client's address behind trusted reverse proxies (``--trusted-proxy``, X-Forwarded-For).

A proxy such as nginx or haproxy connects to the hub itself, so the TCP peer of a proxied
WebSocket is the proxy. When that peer is listed in ``--trusted-proxy`` the hub reads the
``X-Forwarded-For`` header (the de-facto form of RFC 7239's ``for=``: a comma-separated list
of addresses, each proxy appending the address it received the request from) and takes, from
the right, the first address that is not itself a trusted proxy: the same rule as nginx's
``real_ip_recursive on``. Entries to the left of that one were written by the client and are
never believed. A peer that is not trusted is the client, whatever headers it sends.

The address is used in the hub's log lines (open, close, refused handshakes). Rate limits are
per connection, not per address; per-address limits belong at the proxy (docs/deploy.md).
``X-Forwarded-Proto`` is not used.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["Networks", "client_address", "parse_networks"]

Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def parse_networks(values: Iterable[str]) -> Networks:
    """Parse ``--trusted-proxy`` values: addresses (``127.0.0.1``, ``::1``) or networks in
    CIDR form (``10.0.0.0/8``). Raises :class:`ValueError` naming the first bad value."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or network") from None
    return tuple(networks)


def _trusted(address: str, trusted: Networks) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in trusted if network.version == ip.version)


def client_address(peer: str | None, forwarded_for: Sequence[str], trusted: Networks) -> str:
    """The client's address of a request from TCP peer ``peer``.

    ``forwarded_for`` holds the values of every ``X-Forwarded-For`` header, in order. Returns
    ``peer`` unless it is in ``trusted``; otherwise the rightmost forwarded address that is
    not trusted, or the leftmost when all are (or the last trusted hop when an entry is not an
    IP address: nothing left of a malformed entry is believed). ``"?"`` when ``peer`` is None
    (a Unix socket or an already closed transport).
    """
    if peer is None:
        return "?"
    if not trusted or not _trusted(peer, trusted):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    address = peer
    for hop in reversed([h for h in hops if h]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return address
        address = hop
        if not _trusted(hop, trusted):
            return hop
    return address
