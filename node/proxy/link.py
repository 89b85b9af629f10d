"""The proxy's side of the node: a pool of encrypted sessions, built on node.client.

This is the only module of the proxy that knows how the node is spoken to. The HTTP side
sees :class:`NodeLink`: ``async with link.request(req) as answer`` yields an
:class:`Answer` to iterate for text pieces; leaving the block before the answer ended
cancels the request on the node (a ``stream_cancel`` goes out at once) and reads the
node's last frames before the session goes back to the pool.

Sessions: one WebSocket connection per session, one request at a time on each (the
protocol allows no more). At most ``max_concurrency`` run at once; further requests
wait in a FIFO queue (``max_queue`` of them; more get :class:`QueueFull`). Idle sessions
are kept per model and reused, at most ``max_concurrency`` of them in all (the one idle
longest is closed first); one idle for ``idle_ttl_s`` is closed (by default well before
the node's own idle timeout, ``--idle-timeout``, 300 s). Which protocol is spoken
(``v2``, or ``v1`` when allowed) is the link's ``protocol``
attribute, chosen by :func:`choose_protocol`.

A pooled session may still have been closed by the node meanwhile (a shorter
``--idle-timeout``, a restart, a network cut) or forgotten (v1: ``SESSION_EXPIRED``,
``SESSION_KEY_NOT_FOUND``). When a request on a reused session fails that way before
the node answered anything of it, the session is dropped and the request is sent once
more on a fresh session: the HTTP client sees nothing of it. There is no second retry,
none on a fresh session, and none once any piece of the answer arrived.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, Protocol, Self

import attrs
import httpx
import trio
from coincurve import PrivateKey
from trio_websocket import WebSocketConnection

from node.client import (
    ClientError,
    ClientSession,
    ConnectFailed,
    HostIdentity,
    NodeErrorResponse,
    ResponseStream,
    SessionClosed,
    StreamTimeout,
    StreamTruncated,
    discover_host_key,
    fetch_host_key,
    http_base_url,
    open_session,
    random_client_key,
)
from node.client.discovery import fetch_protocols
from node.crypto.curve import address_of
from node.proxy.openai_api import ProxyRequest

log = logging.getLogger("node.proxy")

# Protocols this build of node.client can speak, best first.
CLIENT_PROTOCOLS: Final = ("v2", "v1")
PROTOCOL_CHOICES: Final = ("auto", "v2", "v1")
#: How long a finished session waits in the pool for the next request. Shorter than the
#: node's default ``--idle-timeout`` (300 s, node.config.NodeConfig.idle_timeout_s), so
#: the pool closes its idle sessions before the node does.
DEFAULT_IDLE_TTL_S: Final = 60.0
CANCEL_SETTLE_S: Final = 5.0
DEFAULT_MAX_QUEUE: Final = 256


class ProtocolUnavailable(Exception):
    """The protocol asked for cannot be used with this node (or this build)."""


class QueueFull(Exception):
    """More requests are waiting for a session than the queue holds."""


def choose_protocol(requested: str, node_offers: tuple[str, ...], *, allow_v1: bool) -> str:
    """The protocol to speak: ``v2`` when both sides have it; ``v1`` only when allowed.

    ``requested`` is ``auto``, ``v2`` or ``v1``; ``--protocol v1`` counts as allowing v1.
    Raises :class:`ProtocolUnavailable` with a message for the user otherwise.
    """
    if requested not in PROTOCOL_CHOICES:
        raise ProtocolUnavailable(f"unknown protocol {requested!r}; choose auto, v2 or v1")
    both = [p for p in CLIENT_PROTOCOLS if p in node_offers]
    if requested == "v1":
        if "v1" not in node_offers:
            raise ProtocolUnavailable("the node does not offer protocol v1")
        return "v1"
    if "v2" in both:
        return "v2"
    if requested == "v2":
        why = "the node does not offer it" if "v2" not in node_offers else "this build lacks it"
        raise ProtocolUnavailable(f"protocol v2 is not available: {why}")
    if "v1" in both and allow_v1:
        return "v1"
    if "v1" in both:
        raise ProtocolUnavailable(
            "protocol v2 is not available with this node; pass --allow-v1 to use the older "
            "v1 protocol (its encrypted frames carry session and request ids in plaintext)"
        )
    raise ProtocolUnavailable("the node offers no protocol this proxy speaks")


@attrs.frozen
class NodeModel:
    id: str
    owned_by: str


class Answer(Protocol):
    """One answer: iterate for text pieces; then ``finish_reason`` and ``usage`` are set."""

    finish_reason: str | None
    usage: dict[str, int] | None

    def __aiter__(self) -> AsyncIterator[str]: ...

    async def __anext__(self) -> str: ...


class NodeLink(Protocol):
    """What the HTTP side of the proxy needs from the node."""

    url: str
    protocol: str
    host: HostIdentity

    async def models(self) -> list[NodeModel]: ...

    def request(self, request: ProxyRequest) -> contextlib.AbstractAsyncContextManager[Answer]: ...


#: Wire codes with which the node says it no longer knows a (v1) session.
_FORGOTTEN_SESSION_CODES: Final = frozenset({"SESSION_EXPIRED", "SESSION_KEY_NOT_FOUND"})


def stale_session_error(exc: ClientError) -> bool:
    """Does ``exc`` say the session was gone before the request reached the model?

    The connection was found closed or cut (not a timeout: a slow node may be working on
    the request), the session had broken earlier, or the node answered that it does not
    know the session (any more).
    """
    if isinstance(exc, NodeErrorResponse):
        return exc.code in _FORGOTTEN_SESSION_CODES
    if isinstance(exc, StreamTimeout):
        return False
    return isinstance(exc, StreamTruncated | SessionClosed)


class _Answer:
    """One request's answer; may move to a fresh session once (see the module doc)."""

    def __init__(
        self, pool: SessionPool, request: ProxyRequest, lease: _Lease, *, reused: bool
    ) -> None:
        self._pool = pool
        self._request = request
        self.lease = lease
        self.reused = reused
        self.response = lease.stream(request)
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.began = False
        self.pieces = 0  # pieces handed to the caller
        self.error: ClientError | None = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> str:
        self.began = True
        while True:
            try:
                piece = await self.response.__anext__()
            except StopAsyncIteration:
                self._finish()
                raise
            except ClientError as exc:
                if not self._may_retry(exc):
                    self.error = exc
                    raise
                await self._move_to_fresh_session(exc)
                continue
            self.pieces += 1
            return piece

    def _may_retry(self, exc: ClientError) -> bool:
        """Only on a reused session (so only once: the retry runs on a fresh one), and
        only before any piece of the answer arrived (each is handed on at once)."""
        return self.reused and self.pieces == 0 and stale_session_error(exc)

    async def _move_to_fresh_session(self, exc: ClientError) -> None:
        self.lease.close()  # never back into the pool
        self._pool.retries += 1
        log.info(
            "a pooled session was gone (%s); sending the request again on a fresh session",
            exc.code,
        )
        try:
            self.lease = await self._pool._open_lease(self._request.model)
        except ClientError as error:
            self.error = error
            raise
        self.reused = False
        self.response = self.lease.stream(self._request)

    def _finish(self) -> None:
        completion = self.response.completion
        assert completion is not None
        self.finish_reason = completion.finish_reason
        usage = completion.usage_dict()
        if usage is None:  # pragma: no cover - the node always reports usage
            tokens = completion.tokens_used
            usage = {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens}
        self.usage = usage


@attrs.define(eq=False)
class _Lease:
    session: ClientSession
    model: str
    closing: trio.Event = attrs.field(factory=trio.Event)
    idle: bool = False
    idle_since: float = 0.0
    # Set (and replaced) when the session goes idle or is closed: wakes its idle timer.
    changed: trio.Event = attrs.field(factory=trio.Event)

    def close(self) -> None:
        self.idle = False
        self.closing.set()
        self._notify()

    def go_idle(self, now: float) -> None:
        self.idle = True
        self.idle_since = now
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def stream(self, request: ProxyRequest) -> ResponseStream:
        return self.session.stream(
            request.prompt,
            messages=request.messages,
            model=request.model,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            stop=request.stop,
            seed=request.seed,
        )


class SessionPool:
    """A :class:`NodeLink` over a pool of node.client sessions. Make with :meth:`open`."""

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        url: str,
        protocol: str,
        host: HostIdentity,
        client_key: PrivateKey,
        max_concurrency: int,
        max_queue: int = DEFAULT_MAX_QUEUE,
        idle_ttl_s: float = DEFAULT_IDLE_TTL_S,
        rng: Callable[[int], bytes] = os.urandom,
        session_options: dict[str, Any] | None = None,
        open_websocket: Callable[[], contextlib.AbstractAsyncContextManager[WebSocketConnection]]
        | None = None,
    ) -> None:
        """``open_websocket``, when given, makes the connection of each new session
        instead of connecting to ``url`` (custom transports, tests over memory streams)."""
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if not idle_ttl_s > 0:
            raise ValueError("idle_ttl_s must be positive")
        self._nursery = nursery
        self.url = url
        self.protocol = protocol
        self.host = host
        self._client_key = client_key
        self._slots = trio.Semaphore(max_concurrency)
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.waiting = 0
        self._idle: defaultdict[str, list[_Lease]] = defaultdict(list)
        self._live: set[_Lease] = set()
        self._idle_ttl_s = idle_ttl_s
        self._rng = rng
        self._session_options = session_options or {}
        self._open_websocket = open_websocket
        self.sessions_opened = 0
        self.retries = 0  # requests sent again on a fresh session (see the module doc)
        self._returned = trio.Event()

    @property
    def client_address(self) -> str:
        return address_of(self._client_key.public_key)

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        url: str,
        *,
        protocol: str = "auto",
        allow_v1: bool = False,
        expected_host_address: str | None = None,
        client_key: PrivateKey | None = None,
        max_concurrency: int = 4,
        **kwargs: Any,
    ) -> AsyncIterator[Self]:
        """Check the node (protocols, host key, the pin) and start the pool.

        The host key comes from ``/v1/host-key`` and must match ``expected_host_address``.
        For v2 the v1 challenge is not run (each session's handshake proves the node holds
        the key, so a node with ``--no-v1-challenge`` serves the proxy); for v1 the
        challenge must succeed. Raises :class:`ClientError` subclasses when the node
        cannot be used and :class:`ProtocolUnavailable` when no allowed protocol is shared.
        """
        chosen = choose_protocol(protocol, await fetch_protocols(url), allow_v1=allow_v1)
        if chosen == "v2":
            host = await fetch_host_key(url, expected_address=expected_host_address)
        else:
            host = await discover_host_key(url, expected_address=expected_host_address)
        key = client_key if client_key is not None else random_client_key()
        async with trio.open_nursery() as nursery:
            pool = cls(
                nursery,
                url=url,
                protocol=chosen,
                host=host,
                client_key=key,
                max_concurrency=max_concurrency,
                **kwargs,
            )
            try:
                yield pool
            finally:
                pool.close()

    def close(self) -> None:
        for lease in list(self._live):
            lease.close()
        self._idle.clear()

    @property
    def idle_sessions(self) -> int:
        return sum(len(v) for v in self._idle.values())

    async def models(self) -> list[NodeModel]:
        base = http_base_url(self.url)
        try:
            async with httpx.AsyncClient(timeout=10.0) as client:
                response = await client.get(base + "/v1/models")
        except httpx.HTTPError as exc:
            raise ConnectFailed(f"cannot reach {base}/v1/models: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise ConnectFailed(f"GET {base}/v1/models answered HTTP {response.status_code}")
        try:
            data = response.json().get("data")
        except (ValueError, AttributeError):
            data = None
        if not isinstance(data, list):
            raise ConnectFailed("/v1/models did not answer with a model list")
        models = []
        for m in data:
            if isinstance(m, dict) and isinstance(m.get("id"), str):
                owner = m.get("owned_by")
                models.append(NodeModel(m["id"], owner if isinstance(owner, str) else "node"))
        return models

    # ------------------------------------------------------------ requests

    @asynccontextmanager
    async def request(self, request: ProxyRequest) -> AsyncIterator[Answer]:
        if self.waiting >= self.max_queue and self._slots.value == 0:
            raise QueueFull(f"{self.waiting} requests are already waiting for the node")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            lease, reused = await self._take(request.model)
            answer = _Answer(self, request, lease, reused=reused)
            try:
                yield answer
            finally:
                with trio.CancelScope(shield=True):
                    await self._give_back(answer.lease, answer)
        finally:
            self._slots.release()

    async def _take(self, model: str) -> tuple[_Lease, bool]:
        """An idle session for ``model`` (reused: True), else a new one (False)."""
        idle = self._idle.get(model)
        now = trio.current_time()
        while idle:
            lease = idle.pop()
            lease.idle = False
            if lease.session.closed or now - lease.idle_since >= self._idle_ttl_s:
                lease.close()
                continue
            return lease, True
        return await self._open_lease(model), False

    async def _open_lease(self, model: str) -> _Lease:
        lease: _Lease = await self._nursery.start(self._run_session, model)
        return lease

    async def _run_session(
        self, model: str, *, task_status: trio.TaskStatus[_Lease] = trio.TASK_STATUS_IGNORED
    ) -> None:
        job_id = str(int.from_bytes(self._rng(6), "big") + 1)
        started = False
        options = dict(self._session_options)
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self._open_websocket is not None:
                    options["websocket"] = await stack.enter_async_context(self._open_websocket())
                session = await stack.enter_async_context(
                    open_session(
                        self.url,
                        model=model,
                        job_id=job_id,
                        host_public_key=self.host.public_key,
                        client_key=self._client_key,
                        rng=self._rng,
                        protocol=self.protocol,
                        **options,
                    )
                )
                lease = _Lease(session, model)
                self._live.add(lease)
                self.sessions_opened += 1
                try:
                    task_status.started(lease)
                    started = True
                    await self._hold(lease)
                finally:
                    self._live.discard(lease)
        except Exception as exc:
            # Before ``started`` this reaches the request (nursery.start raises it);
            # after it, the request that used the session already saw why it broke.
            if not started:
                raise
            log.debug("a pooled session ended", extra={"error_type": type(exc).__name__})

    async def _hold(self, lease: _Lease) -> None:
        """Keep the session open until it is closed, or idle for ``idle_ttl_s``."""
        while not lease.closing.is_set():
            changed = lease.changed
            if not lease.idle:
                await changed.wait()
                continue
            deadline = lease.idle_since + self._idle_ttl_s
            if trio.current_time() >= deadline:
                idle = self._idle.get(lease.model)
                if idle is not None and lease in idle:
                    idle.remove(lease)
                log.debug("closing a session idle for %g s", self._idle_ttl_s)
                lease.close()
                return
            with trio.move_on_at(deadline):
                await changed.wait()

    async def _give_back(self, lease: _Lease, answer: _Answer) -> None:
        """Return the session to the pool, or close it when it cannot be trusted."""
        if lease.closing.is_set():
            return  # dropped already (its request moved to a fresh session)
        session = lease.session
        response = answer.response
        reusable = not session.closed
        if answer.error is not None:
            # A refused request (an error frame) leaves the session usable; anything
            # else the client raised has already broken it.
            reusable = reusable and isinstance(answer.error, NodeErrorResponse)
        elif answer.began and not response.started:
            reusable = False  # interrupted while the request was being sent
        elif response.started and not response.done and reusable:
            with trio.move_on_after(CANCEL_SETTLE_S):
                try:
                    await response.aclose()  # sends the cancel, reads to the end
                except ClientError as exc:
                    log.debug("cancelling left the session unusable (%s)", exc.code)
            reusable = response.done and not session.closed
        if not reusable:
            log.debug(
                "closing a pooled session (broken %s, error %s, began %s, started %s, done %s)",
                session.closed,
                type(answer.error).__name__ if answer.error else None,
                answer.began,
                response.started,
                response.done,
            )
            lease.close()
            return
        if self.idle_sessions >= self.max_concurrency:
            # Model names come from clients: keep at most max_concurrency idle sessions
            # in all, closing the one idle longest.
            oldest = min(
                (idle for idle in self._idle.values() if idle), key=lambda v: v[0].idle_since
            )
            oldest.pop(0).close()
        lease.go_idle(trio.current_time())
        self._idle[lease.model].append(lease)
        self._returned.set()
        self._returned = trio.Event()

    async def wait_idle(self, count: int) -> None:
        """Wait until ``count`` sessions are idle in the pool (tests, shutdown)."""
        while self.idle_sessions < count:
            await self._returned.wait()
