"""Who is on the other end of a connection: the peer's address, or the client behind a
trusted reverse proxy (``--trusted-proxies``).

``X-Forwarded-For`` is a comma-separated list that every proxy on the way appends the
address it saw to. Only the entries added by proxies we trust can be believed, so the
list is read from the right: while the hop that handed us the connection is a trusted
proxy, step to the address it reports; the first address that is not a trusted proxy is
the client. Without ``--trusted-proxies`` the header is ignored (anyone can send it), and
the client is the socket's peer. Parsing is one split of a header h11 has already bounded
(16 KiB); at most :data:`MAX_HOPS` entries are looked at.

The node uses the result for the per-address session allowances (and for the log).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_HOPS = 32


def parse_trusted_proxies(text: str | Iterable[str] | None) -> tuple[IPNetwork, ...]:
    """``"10.0.0.1, 192.168.0.0/16, ::1"`` as networks; ValueError names a bad entry."""
    if text is None:
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[IPNetwork] = []
    for item in items:
        entry = item.strip()
        if not entry:
            continue
        try:
            out.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(
                f"--trusted-proxies: {entry[:64]!r} is not an IP address or network"
            ) from None
    return tuple(out)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "203.0.113.7:51000"
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, proxies: tuple[IPNetwork, ...]
) -> bool:
    """Whether ``ip`` is in one of the configured proxy networks (nothing secret here)."""
    return any(ip.version == net.version and ip in net for net in proxies)


def client_address(
    peer: str | None, headers: Mapping[str, str], trusted_proxies: tuple[IPNetwork, ...]
) -> str | None:
    """The client's IP address as text (``None`` when the peer is unknown).

    ``peer`` is the socket's remote host; ``headers`` the request's, lower-case names.
    """
    if peer is None:
        return None
    current = _ip(peer)
    if current is None:
        return peer[:64]
    if not trusted_proxies or not _trusted(current, trusted_proxies):
        return str(current)
    forwarded = headers.get("x-forwarded-for", "")
    hops = [h for h in forwarded.split(",")[-MAX_HOPS:] if h.strip()] if forwarded else []
    for hop in reversed(hops):
        address = _ip(hop)
        if address is None:
            break  # garbage in the chain: stop at the last hop we could trust
        current = address
        if not _trusted(current, trusted_proxies):
            break
    return str(current)
