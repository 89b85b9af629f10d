"""Node metrics, exported through the Prometheus project's Python client.

One :class:`NodeMetrics` per node process. The server counts in plain attributes
(``metrics.errors[code] += 1``, ``metrics.chunks += 1``): a prometheus-client increment
costs over a microsecond (a lock and a value object), a frame a few tens, so the hot
path never calls the client. :meth:`NodeMetrics.publish` hands what changed since the
last call to the client's counters and sets the gauges: whenever this process renders
a scrape, and every second in a worker of a multi-worker node. The two histograms
observe into the client directly (one observation per session or handshake).

Single process: the metrics live in a private registry and a scrape renders it.

Several worker processes (``--workers N``): the parent creates a private directory
(mode 0700) and names it in ``PROMETHEUS_MULTIPROC_DIR`` before it starts the workers;
prometheus-client then keeps every value in small memory-mapped files per process in
it, and whichever worker answers a scrape reads all of them
(:class:`~prometheus_client.multiprocess.MultiProcessCollector`). Counters and
histograms are summed over every process that ever ran, dead ones included (a
restarted worker does not make a counter go down). Gauges are summed over the
processes alive now (mode ``livesum``): the parent deletes a dead worker's gauge files
(:func:`~prometheus_client.multiprocess.mark_process_dead`). Another worker's values
are at most a second old.
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

from node.protocol.storage import STORES, StorageHealth

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PROTOCOLS = ("v1", "v2")
INIT_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)

# ``*_created`` series would double the output and mean little for a node's counters.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

# (attribute, metric name, help, label) of the counters kept as plain attributes: an int
# when ``label`` is None, else a Counter by that label's value.
_COUNTERS: tuple[tuple[str, str, str, str | None], ...] = (
    ("connections_total", "llm_node_connections_total", "WebSocket connections accepted.", None),
    (
        "connections_refused",
        "llm_node_connections_refused_total",
        "Connections refused by --max-connections.",
        None,
    ),
    (
        "inits_accepted",
        "llm_node_inits_accepted_total",
        "Session inits accepted, by mode.",
        "mode",
    ),
    ("inits_refused", "llm_node_inits_refused_total", "Session inits refused, by code.", "code"),
    ("messages", "llm_node_messages_total", "Inbound messages, by type.", "type"),
    (
        "requests",
        "llm_node_requests_total",
        "Inference requests, by finish reason.",
        "finish_reason",
    ),
    ("chunks", "llm_node_chunks_total", "Streamed chunks sent.", None),
    ("tokens", "llm_node_tokens_total", "Completion tokens streamed.", None),
    ("errors", "llm_node_errors_total", "Error frames sent, by code.", "code"),
    ("http_requests", "llm_node_http_requests_total", "HTTP requests, by status.", "status"),
    (
        "protocol_connections",
        "llm_node_protocol_connections_total",
        "WebSocket connections accepted, by protocol.",
        "protocol",
    ),
    (
        "protocol_refused",
        "llm_node_protocol_refused_total",
        "WebSocket upgrades refused because --protocols disables the protocol.",
        "protocol",
    ),
    (
        "v2_handshakes",
        "llm_node_noise_handshakes_total",
        "Protocol v2 handshakes, by result (accepted, or the error code).",
        "result",
    ),
    (
        "v2_auth_failures",
        "llm_node_record_auth_failures_total",
        "Protocol v2 records that failed authentication (connection closed 1008).",
        None,
    ),
    (
        "worker_restarts",
        "llm_node_worker_restarts_total",
        "Worker processes restarted after an unexpected exit (--workers).",
        None,
    ),
)


class NodeMetrics:
    """Counters, gauges and histograms of one node process.

    ``multiprocess_dir``: the shared directory of a multi-worker node (None: this
    process alone). Count in the attributes; the gauges of live state (sessions, keys,
    connections by protocol) are computed from ``live_states`` at each publish.
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
        self.inits_accepted: Counter[str] = Counter()  # by mode
        self.inits_refused: Counter[str] = Counter()  # by code
        self.messages: Counter[str] = Counter()  # inbound by type
        self.chunks = 0
        self.tokens = 0
        self.requests: Counter[str] = Counter()  # by finish reason
        self.errors: Counter[str] = Counter()  # by code
        self.http_requests: Counter[str] = Counter()  # by status
        self.protocol_connections: Counter[str] = Counter()  # accepted, by protocol
        self.protocol_refused: Counter[str] = Counter()  # upgrades refused by --protocols
        self.v2_handshakes: Counter[str] = Counter()  # by result
        self.v2_auth_failures = 0
        self.worker_restarts = 0
        # Per open connection: (protocol, keys, key bytes, encrypted, plaintext sessions).
        self.live_states: Callable[[], Iterable[tuple[str, int, int, int, int]]] = lambda: ()
        # The node's files (node.protocol.storage): failures counted, state now.
        self.storage: StorageHealth | None = None

        self._storage_failures = PromCounter(
            "llm_node_storage_failures_total",
            "Failed writes (or reads) of the node's files, by store (ledger, replay_cache).",
            ["store"],
            registry=reg,
        )
        self._storage_failing = PromGauge(
            "llm_node_storage_failing",
            "1 while a store's last write failed (until one succeeds), by store.",
            ["store"],
            registry=reg,
            multiprocess_mode="livemax",
        )
        self._storage_published: Counter[str] = Counter()
        for store in STORES:
            self._storage_failures.labels(store)
            self._storage_failing.labels(store).set(0)
        self._connections_open = PromGauge(
            "llm_node_connections_open",
            "Open WebSocket connections.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._counters: dict[str, PromCounter] = {}
        self._published: dict[str, Counter[str] | int] = {}
        for attr, name, help_text, label in _COUNTERS:
            labels = () if label is None else (label,)
            self._counters[attr] = PromCounter(name, help_text, labels, registry=reg)
            self._published[attr] = 0 if label is None else Counter()
        self._sessions = PromGauge(
            "llm_node_sessions",
            "Sessions held by open connections, by mode.",
            ["mode"],
            registry=reg,
            multiprocess_mode="livesum",
        )
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
        self._protocol_open = PromGauge(
            "llm_node_protocol_connections_open",
            "Open WebSocket connections, by protocol.",
            ["protocol"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._protocol_keys = PromGauge(
            "llm_node_protocol_session_keys",
            "Connections' secret keys held in memory, by protocol.",
            ["protocol"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.init_latency = PromHistogram(
            "llm_node_init_seconds",
            "Time to handle an encrypted_session_init.",
            buckets=INIT_BUCKETS_S,
            registry=reg,
        )
        self.v2_handshake_latency = PromHistogram(
            "llm_node_noise_handshake_seconds",
            "Server CPU time to handle a v2 handshake message and the session record.",
            buckets=INIT_BUCKETS_S,
            registry=reg,
        )

    def worker_restarted(self) -> None:
        self.worker_restarts += 1
        self.publish()

    def publish(self) -> None:
        """Hand the counts since the last call to prometheus-client; set the gauges."""
        for attr, counter in self._counters.items():
            current = getattr(self, attr)
            published = self._published[attr]
            if isinstance(current, Counter):
                assert isinstance(published, Counter)
                for label, count in current.items():
                    if count != published[label]:
                        counter.labels(label).inc(count - published[label])
                        published[label] = count
            elif current != published:
                counter.inc(current - published)
                self._published[attr] = current
        keys = key_bytes = enc = plain = 0
        open_by: Counter[str] = Counter(dict.fromkeys(PROTOCOLS, 0))
        keys_by: Counter[str] = Counter(dict.fromkeys(PROTOCOLS, 0))
        for protocol, k, nbytes, e, p in self.live_states():
            keys += k
            key_bytes += nbytes
            enc += e
            plain += p
            open_by[protocol] += 1
            keys_by[protocol] += k
        self._connections_open.set(self.connections_open)
        self._sessions.labels("encrypted").set(enc)
        self._sessions.labels("plaintext").set(plain)
        self._session_keys.set(keys)
        self._session_key_bytes.set(key_bytes)
        for protocol in sorted(open_by):
            self._protocol_open.labels(protocol).set(open_by[protocol])
            self._protocol_keys.labels(protocol).set(keys_by[protocol])
        storage = self.storage
        if storage is not None:
            for store in STORES:
                count = storage.failures[store]
                if count != self._storage_published[store]:
                    self._storage_failures.labels(store).inc(count - self._storage_published[store])
                    self._storage_published[store] = count
                self._storage_failing.labels(store).set(int(storage.failing(store)))

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
        self.publish()
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self._collect_from()), content_type

    def render(self) -> str:
        """The classic Prometheus text format (what a plain ``GET /metrics`` returns)."""
        self.publish()
        return generate_latest(self._collect_from()).decode("utf-8")


def multiprocess_dir_from_env() -> str | None:
    """The shared metrics directory a multi-worker parent named for its workers."""
    return os.environ.get(MULTIPROC_ENV) or None
