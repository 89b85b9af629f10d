"""Node URLs, host key discovery and its challenge check (PROTOCOL.md section 7).

Without a chain to look the host key up in, a client learns it from ``GET /v1/host-key``.
Protocol v1 confirms it with ``POST /v1/auth/challenge`` (:func:`discover_host_key`): the
node signs SHA256 of 32 random bytes the client chose, and the signature must recover to
the key it announced. Protocol v2 does not need the challenge (:func:`fetch_host_key`):
its Noise NK handshake only completes with a node that holds the private key, so the
handshake itself is the proof (``verified_by_handshake``). A client that knows which node
it wants pins the node's address (``expected_address``), checked before any WebSocket.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import attrs
import httpx

from node.client.errors import ConnectFailed, HostKeyMismatch, HostVerificationFailed
from node.crypto.curve import address_of, parse_public_key, recover_public_key, sha256
from node.crypto.encoding import decode_hex
from node.crypto.errors import CryptoError
from node.crypto.secret import constant_time_equal

WS_PATH: Final = "/v1/ws"
WS_PATHS: Final = {"v1": "/v1/ws", "v2": "/v2/ws"}
_ADDRESS: Final = re.compile(r"0x[0-9a-fA-F]{40}")
DEFAULT_HTTP_TIMEOUT_S: Final = 10.0


@attrs.frozen
class HostIdentity:
    """A node's host key (33-byte compressed) and its EIP-55 address.

    ``verified_by_challenge``: the node signed a v1 challenge with this key.
    ``verified_by_handshake``: a protocol v2 handshake with this key completed, which only
    a node holding its private key can do. Both False: the key is only announced or given.
    """

    public_key: bytes
    address: str
    verified_by_challenge: bool = False
    verified_by_handshake: bool = False

    @property
    def verified(self) -> bool:
        """The node has proven that it holds this key (by challenge or handshake)."""
        return self.verified_by_challenge or self.verified_by_handshake

    @property
    def public_key_hex(self) -> str:
        return self.public_key.hex()


def websocket_url(url: str, protocol: str | None = None) -> str:
    """``http://h:p`` -> ``ws://h:p/v1/ws`` (https -> wss; ``/v2/ws`` for protocol v2).

    A ws/wss URL is kept as is, except that with ``protocol`` given a path ending in
    another protocol's endpoint is switched to this protocol's.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    endpoint = WS_PATHS.get(protocol or "v1", WS_PATH)
    if scheme in ("ws", "wss"):
        if protocol is not None:
            path = parts.path.rstrip("/")
            for other in WS_PATHS.values():
                if path.endswith(other):
                    return urlunsplit(parts._replace(path=path[: -len(other)] + endpoint))
        return urlunsplit(parts)
    if scheme not in ("http", "https"):
        raise ValueError(f"node URL must start with http://, https://, ws:// or wss://: {url!r}")
    if not parts.netloc:
        raise ValueError(f"node URL has no host: {url!r}")
    ws_scheme = "wss" if scheme == "https" else "ws"
    return urlunsplit((ws_scheme, parts.netloc, parts.path.rstrip("/") + endpoint, "", ""))


def endpoint_protocol(url: str) -> str | None:
    """The protocol a ws/wss URL names by its path (``/v1/ws`` or ``/v2/ws``), else None."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("ws", "wss"):
        return None
    path = parts.path.rstrip("/")
    for protocol, endpoint in WS_PATHS.items():
        if path.endswith(endpoint):
            return protocol
    return None


def http_base_url(url: str) -> str:
    """The node's HTTP base for the REST routes: ``ws://h:p/v1/ws`` -> ``http://h:p``."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    if scheme not in ("ws", "wss"):
        raise ValueError(f"node URL must start with http://, https://, ws:// or wss://: {url!r}")
    path = parts.path.rstrip("/")
    for endpoint in WS_PATHS.values():
        if path.endswith(endpoint):
            path = path[: -len(endpoint)]
            break
    return urlunsplit(("https" if scheme == "wss" else "http", parts.netloc, path, "", ""))


def normalize_address(address: str) -> str:
    """Check ``0x`` + 40 hex digits; returns it lowercased for comparison."""
    text = address.strip()
    if not _ADDRESS.fullmatch(text):
        raise ValueError("an Ethereum address is 0x followed by 40 hex digits")
    return text.lower()


def _check_pin(identity: HostIdentity, expected_address: str | None) -> None:
    if expected_address is None:
        return
    if not constant_time_equal(
        identity.address.lower().encode(), normalize_address(expected_address).encode()
    ):
        raise HostKeyMismatch(
            f"the node's host key belongs to {identity.address}, not to the expected "
            f"address {expected_address.strip()}"
        )


def identity_from_public_key(
    public_key: bytes | str, *, expected_address: str | None = None
) -> HostIdentity:
    """A host identity from a key the caller already knows (33/65 bytes or hex)."""
    try:
        raw = (
            decode_hex(public_key, "host public key") if isinstance(public_key, str) else public_key
        )
        point = parse_public_key(raw, field="host public key")
    except CryptoError as exc:
        raise ValueError(exc.message) from None
    identity = HostIdentity(point.format(compressed=True), address_of(point))
    _check_pin(identity, expected_address)
    return identity


def connection_failure_cause(exc: BaseException) -> str:
    """What made a connection fail, in words: a TLS certificate problem is named as
    such (with the verifier's reason), an OS error by its message, else the type."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            reason = current.verify_message or current.reason or "certificate verify failed"
            return (
                f"TLS certificate verification failed ({reason}); if the node uses a "
                "private CA, pass its certificate with --ca-file"
            )
        if isinstance(current, ssl.SSLError):
            return f"TLS handshake failed ({current.reason or current})"
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        current = current.__cause__ or current.__context__
    return type(exc).__name__


def tls_context(ca_file: str | None) -> ssl.SSLContext | None:
    """A client TLS context trusting ``ca_file`` as well as nothing else (None: the
    system's trust store). Raises ValueError when the file cannot be used."""
    if ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use {ca_file} as CA certificates: {exc}") from None


async def _request_json(
    client: httpx.AsyncClient, method: str, url: str, *, json_body: Any = None
) -> Any:
    try:
        response = await client.request(method, url, json=json_body)
    except httpx.HTTPError as exc:
        raise ConnectFailed(f"cannot reach {url}: {connection_failure_cause(exc)}") from None
    if response.status_code == 404 and url.endswith(("/v1/host-key", "/v1/auth/challenge")):
        raise ConnectFailed(
            "the node has no host key (it serves plaintext clients only)",
            code="ENCRYPTION_NOT_SUPPORTED",
        )
    if response.status_code == 403 and url.endswith("/v1/auth/challenge"):
        raise ConnectFailed(
            "the node has turned its host-key challenge off (--no-v1-challenge): use "
            "protocol v2 (its handshake proves the host key), or get the node's host "
            "public key from the operator and pin it (--host-pubkey)"
        )
    if response.status_code != 200:
        raise ConnectFailed(f"{method} {url} answered HTTP {response.status_code}")
    try:
        return response.json()
    except ValueError:
        raise ConnectFailed(f"{method} {url} did not answer with JSON") from None


async def _announced_identity(
    client: httpx.AsyncClient, base: str, expected_address: str | None
) -> HostIdentity:
    """``GET /v1/host-key``: the key, its address checked against it and the pin."""
    announced = await _request_json(client, "GET", base + "/v1/host-key")
    if not isinstance(announced, dict) or not isinstance(announced.get("publicKey"), str):
        raise HostVerificationFailed("/v1/host-key did not answer with a publicKey")
    try:
        identity = identity_from_public_key(announced["publicKey"])
    except ValueError as exc:
        raise HostVerificationFailed(f"/v1/host-key announced an invalid key: {exc}") from None
    claimed = announced.get("address")
    if not isinstance(claimed, str) or not constant_time_equal(
        claimed.lower().encode(), identity.address.lower().encode()
    ):
        raise HostVerificationFailed(
            "/v1/host-key announced an address that does not belong to its public key"
        )
    _check_pin(identity, expected_address)
    return identity


async def fetch_host_key(
    url: str,
    *,
    expected_address: str | None = None,
    timeout_s: float = DEFAULT_HTTP_TIMEOUT_S,
    transport: httpx.AsyncBaseTransport | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> HostIdentity:
    """Fetch the node's announced host key without the v1 challenge (for protocol v2).

    The key is not proven yet (both ``verified_by_*`` False): only a v2 handshake with it
    proves the node holds it, so use it for v2 only. ``expected_address`` is checked here,
    before any connection to the WebSocket. Raises like :func:`discover_host_key`.
    """
    if expected_address is not None:
        normalize_address(expected_address)
    base = http_base_url(url)
    async with httpx.AsyncClient(
        timeout=timeout_s, transport=transport, verify=ssl_context or True
    ) as client:
        return await _announced_identity(client, base, expected_address)


async def discover_host_key(
    url: str,
    *,
    expected_address: str | None = None,
    timeout_s: float = DEFAULT_HTTP_TIMEOUT_S,
    rng: Callable[[int], bytes] = os.urandom,
    transport: httpx.AsyncBaseTransport | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> HostIdentity:
    """Fetch the node's host key and prove the node holds it (the v1 challenge).

    Raises :class:`HostKeyMismatch` when ``expected_address`` is given and differs,
    :class:`HostVerificationFailed` when the challenge signature does not recover to the
    announced key, :class:`ConnectFailed` when the routes cannot be used (HTTP 403 from
    the challenge route: the node runs with ``--no-v1-challenge``).
    """
    if expected_address is not None:
        normalize_address(expected_address)
    base = http_base_url(url)
    async with httpx.AsyncClient(
        timeout=timeout_s, transport=transport, verify=ssl_context or True
    ) as client:
        identity = await _announced_identity(client, base, expected_address)
        challenge = rng(32)
        answer = await _request_json(
            client, "POST", base + "/v1/auth/challenge", json_body={"challenge": challenge.hex()}
        )
    verify_challenge_answer(identity, challenge, answer)
    return attrs.evolve(identity, verified_by_challenge=True)


def verify_challenge_answer(identity: HostIdentity, challenge: bytes, answer: Any) -> None:
    """Check ``{"signature": r||s hex, "recid": 0|1}`` over SHA256(challenge)."""
    if not isinstance(answer, dict):
        raise HostVerificationFailed("the challenge answer is not a JSON object")
    signature_hex, recid = answer.get("signature"), answer.get("recid")
    if not isinstance(signature_hex, str) or isinstance(recid, bool) or recid not in (0, 1):
        raise HostVerificationFailed("the challenge answer needs a signature and a recid of 0/1")
    try:
        rs = decode_hex(signature_hex, "signature")
        if len(rs) != 64:
            raise HostVerificationFailed("the challenge signature must be 64 bytes (r||s)")
        signer = recover_public_key(sha256(challenge), rs + bytes((recid,)))
    except CryptoError as exc:
        raise HostVerificationFailed(f"the challenge signature is invalid: {exc.message}") from None
    if not constant_time_equal(signer.format(compressed=True), identity.public_key):
        raise HostVerificationFailed(
            "the challenge was not signed by the announced host key (the node cannot prove "
            "it holds that key)"
        )


async def fetch_models(
    url: str,
    *,
    timeout_s: float = DEFAULT_HTTP_TIMEOUT_S,
    transport: httpx.AsyncBaseTransport | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> list[str]:
    """Model ids from ``GET /v1/models``, in the node's order."""
    base = http_base_url(url)
    async with httpx.AsyncClient(
        timeout=timeout_s, transport=transport, verify=ssl_context or True
    ) as client:
        listing = await _request_json(client, "GET", base + "/v1/models")
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list):
        raise ConnectFailed("/v1/models did not answer with a model list")
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


async def fetch_protocols(
    url: str,
    *,
    timeout_s: float = DEFAULT_HTTP_TIMEOUT_S,
    transport: httpx.AsyncBaseTransport | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[str, ...]:
    """The WebSocket protocols the node offers, from ``GET /v1/version`` (``protocols``).

    A node that does not list them (older than protocol v2) speaks v1 only.
    """
    base = http_base_url(url)
    async with httpx.AsyncClient(
        timeout=timeout_s, transport=transport, verify=ssl_context or True
    ) as client:
        info = await _request_json(client, "GET", base + "/v1/version")
    listed = info.get("protocols") if isinstance(info, dict) else None
    if listed is None:
        return ("v1",)
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        raise ConnectFailed("/v1/version lists its protocols in an unreadable form")
    return tuple(p for p in listed[:16] if p in WS_PATHS)
