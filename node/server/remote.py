"""Who is on the other end of a connection: the peer address, or the client's address
as reported by a reverse proxy the operator trusts (``--trusted-proxies``).

``X-Forwarded-For`` is believed only when the TCP peer is a trusted proxy, and then read
from the right: each trusted proxy appends the address it saw, so the first entry from
the right that is not a trusted proxy is the client. Anyone else can write anything in
that header, so without ``--trusted-proxies`` it is ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_FORWARDED_ENTRIES = 32


def parse_trusted_proxies(text: str | None) -> tuple[Network, ...]:
    """``"127.0.0.1,10.0.0.0/8,::1"`` -> networks; raises ValueError naming a bad entry."""
    out: list[Network] = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                f"{item[:60]!r} is not an IP address or network (e.g. 10.0.0.0/8)"
            ) from None
    return tuple(out)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _trusted(address: str, networks: Iterable[Network]) -> bool:
    ip = _ip(address)
    return ip is not None and any(ip in net for net in networks)


def remote_address(
    peer: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]
) -> str | None:
    """The client's address: ``peer``, or from ``X-Forwarded-For`` behind trusted proxies.

    Linear in the header (which the HTTP reader already bounds to 16 KiB); at most
    :data:`MAX_FORWARDED_ENTRIES` entries from the right are examined.
    """
    if peer is None or not trusted or not forwarded_for or not _trusted(peer, trusted):
        return peer
    entries = forwarded_for.rsplit(",", MAX_FORWARDED_ENTRIES)[-MAX_FORWARDED_ENTRIES:]
    client = peer
    for entry in reversed(entries):
        ip = _ip(entry)
        if ip is None:
            break  # garbage: stop at the last address a trusted proxy vouched for
        client = str(ip)
        if not any(ip in net for net in trusted):
            break
    return client
