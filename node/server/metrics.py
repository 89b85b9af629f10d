"""Node metrics, exported through the Prometheus project's Python client.

One :class:`NodeMetrics` per node process. Code updates it through its methods (never
the ``prometheus_client`` objects directly); each method also keeps a plain in-process
count, which is what tests and the server itself read back.

Single process: the metrics live in a private registry and a scrape renders it.

Several worker processes (``--workers N``): the parent creates a private directory
(mode 0700) and names it in ``PROMETHEUS_MULTIPROC_DIR`` before it starts the workers;
``prometheus_client`` then keeps every value in a small memory-mapped file per process
and metric kind there, and any worker answering a scrape reads all of them
(:class:`~prometheus_client.multiprocess.MultiProcessCollector`). Counters and the
histogram are summed over every process that ever ran, dead ones included (a restarted
worker does not make a counter go down). Gauges are summed over the processes alive
now (mode ``livesum``): the parent deletes a dead worker's gauge files
(:func:`~prometheus_client.multiprocess.mark_process_dead`).

Gauges that describe live state (sessions, keys) are computed from the connections
(``live_states``) when this process renders a scrape, and every second in each worker,
so another worker's share may be up to a second old. The same holds for the per-frame
counters (chunks, tokens, inbound messages), which stay plain integers on the hot path
(a prometheus-client increment costs over a microsecond, a frame a few tens).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge
from prometheus_client import Histogram as PromHistogram
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
INIT_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# ``*_created`` series would double the output and mean little for a node's counters.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


class NodeMetrics:
    """Counters, gauges and the init histogram of one node process.

    ``multiprocess_dir``: the shared directory of a multi-worker node (None: this
    process alone). The attributes (``connections_total``, ``errors[code]``, ...) are
    this process's own counts, for reading; update only through the methods.
    """

    def __init__(self, *, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self._registry: CollectorRegistry | None = (
            None if multiprocess_dir else CollectorRegistry(auto_describe=True)
        )
        reg = self._registry
        self.connections_total = 0
        self.connections_open = 0
        self.connections_refused = 0
        self.chunks = 0
        self.tokens = 0
        self.worker_restarts = 0
        self.inits_accepted: Counter[str] = Counter()  # by mode
        self.inits_refused: Counter[str] = Counter()  # by code
        self.messages: Counter[str] = Counter()  # inbound by type
        self.requests: Counter[str] = Counter()  # by finish reason
        self.errors: Counter[str] = Counter()  # by code
        self.http_requests: Counter[str] = Counter()  # by status
        self.live_states: Callable[[], Iterable[tuple[int, int, int]]] = lambda: ()

        self._connections_open = PromGauge(
            "llm_node_connections_open",
            "Open WebSocket connections.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._connections_total = PromCounter(
            "llm_node_connections_total", "WebSocket connections accepted.", registry=reg
        )
        self._connections_refused = PromCounter(
            "llm_node_connections_refused_total",
            "Connections refused by --max-connections.",
            registry=reg,
        )
        self._sessions = PromGauge(
            "llm_node_sessions",
            "Sessions held by open connections, by mode.",
            ["mode"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._sessions_enc = self._sessions.labels("encrypted")
        self._sessions_plain = self._sessions.labels("plaintext")
        self._session_keys = PromGauge(
            "llm_node_session_keys",
            "Session keys held in memory.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._session_key_bytes = PromGauge(
            "llm_node_session_key_bytes",
            "Bytes of session key material held.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._inits_accepted = PromCounter(
            "llm_node_inits_accepted_total",
            "Session inits accepted, by mode.",
            ["mode"],
            registry=reg,
        )
        self._inits_refused = PromCounter(
            "llm_node_inits_refused_total",
            "Session inits refused, by code.",
            ["code"],
            registry=reg,
        )
        self._messages = PromCounter(
            "llm_node_messages_total", "Inbound messages, by type.", ["type"], registry=reg
        )
        self._requests = PromCounter(
            "llm_node_requests_total",
            "Inference requests, by finish reason.",
            ["finish_reason"],
            registry=reg,
        )
        self._chunks = PromCounter("llm_node_chunks_total", "Streamed chunks sent.", registry=reg)
        self._tokens = PromCounter(
            "llm_node_tokens_total", "Completion tokens streamed.", registry=reg
        )
        self._errors = PromCounter(
            "llm_node_errors_total", "Error frames sent, by code.", ["code"], registry=reg
        )
        self._http_requests = PromCounter(
            "llm_node_http_requests_total", "HTTP requests, by status.", ["status"], registry=reg
        )
        self._init_seconds = PromHistogram(
            "llm_node_init_seconds",
            "Time to handle an encrypted_session_init.",
            buckets=INIT_BUCKETS_S,
            registry=reg,
        )
        self._worker_restarts = PromCounter(
            "llm_node_worker_restarts_total",
            "Worker processes restarted after an unexpected exit (--workers).",
            registry=reg,
        )
        # The per-frame counters (chunks, tokens, inbound messages) are plain integers
        # on the hot path and reach prometheus-client in :meth:`publish`: at each scrape
        # this process answers, and every second in a worker.
        self._published_chunks = 0
        self._published_tokens = 0
        self._published_messages: Counter[str] = Counter()

    # -- updates ---------------------------------------------------------------------

    def connection_opened(self) -> None:
        self.connections_total += 1
        self.connections_open += 1
        self._connections_total.inc()
        self._connections_open.inc()

    def connection_closed(self) -> None:
        self.connections_open -= 1
        self._connections_open.dec()

    def connection_refused(self) -> None:
        self.connections_refused += 1
        self._connections_refused.inc()

    def init_accepted(self, mode: str, seconds: float | None = None) -> None:
        self.inits_accepted[mode] += 1
        self._inits_accepted.labels(mode).inc()
        if seconds is not None:
            self._init_seconds.observe(seconds)

    def init_refused(self, code: str) -> None:
        self.inits_refused[code] += 1
        self._inits_refused.labels(code).inc()

    def message(self, kind: str) -> None:
        self.messages[kind] += 1

    def request_finished(self, finish_reason: str) -> None:
        self.requests[finish_reason] += 1
        self._requests.labels(finish_reason).inc()

    def error_sent(self, code: str) -> None:
        self.errors[code] += 1
        self._errors.labels(code).inc()

    def chunk_sent(self, tokens: int = 0) -> None:
        self.chunks += 1
        self.tokens += tokens

    def http_answered(self, status: int) -> None:
        self.http_requests[str(status)] += 1
        self._http_requests.labels(str(status)).inc()

    def worker_restarted(self) -> None:
        self.worker_restarts += 1
        self._worker_restarts.inc()

    def refresh_live(self) -> None:
        """Publish the per-frame counters and set the session and key gauges from the
        live connections of this process."""
        if self.chunks != self._published_chunks:
            self._chunks.inc(self.chunks - self._published_chunks)
            self._published_chunks = self.chunks
        if self.tokens != self._published_tokens:
            self._tokens.inc(self.tokens - self._published_tokens)
            self._published_tokens = self.tokens
        for kind, count in self.messages.items():
            published = self._published_messages[kind]
            if count != published:
                self._messages.labels(kind).inc(count - published)
                self._published_messages[kind] = count
        keys = enc = plain = 0
        for k, e, p in self.live_states():
            keys += k
            enc += e
            plain += p
        self._sessions_enc.set(enc)
        self._sessions_plain.set(plain)
        self._session_keys.set(keys)
        self._session_key_bytes.set(keys * 32)

    # -- export ----------------------------------------------------------------------

    def _collect_from(self) -> CollectorRegistry:
        if self._registry is not None:
            return self._registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return registry

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The scrape body and its content type, negotiated from an ``Accept`` header.

        OpenMetrics when the scraper asks for it, otherwise the classic text format 0.0.4.
        """
        self.refresh_live()
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self._collect_from()), content_type

    def render(self) -> str:
        """The classic Prometheus text format (what a plain ``GET /metrics`` returns)."""
        self.refresh_live()
        return generate_latest(self._collect_from()).decode("utf-8")


def multiprocess_dir_from_env() -> str | None:
    """The shared metrics directory a multi-worker parent named for its workers."""
    return os.environ.get(MULTIPROC_ENV) or None
