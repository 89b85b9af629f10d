"""Node metrics in the Prometheus text exposition format (no third-party client)."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterable

PROTOCOLS = ("v1", "v2")
INIT_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class Histogram:
    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class NodeMetrics:
    """Counters and gauges of one node process.

    Gauges that describe live state (connections, sessions, keys) are read at render
    time from ``live_states`` so they can never drift from the truth.
    """

    def __init__(self) -> None:
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
        self.init_latency = Histogram(INIT_BUCKETS_S)
        self.protocol_connections: Counter[str] = Counter()  # accepted, by protocol
        self.protocol_refused: Counter[str] = Counter()  # upgrades refused by --protocols
        self.v2_handshakes: Counter[str] = Counter()  # by result
        self.v2_auth_failures = 0
        self.v2_handshake_latency = Histogram(INIT_BUCKETS_S)
        # Per open connection: (protocol, keys, key bytes, encrypted, plaintext sessions).
        self.live_states: Callable[[], Iterable[tuple[str, int, int, int, int]]] = lambda: ()

    def render(self) -> str:
        keys = key_bytes = sessions_enc = sessions_plain = 0
        open_by: Counter[str] = Counter({p: 0 for p in PROTOCOLS})
        keys_by: Counter[str] = Counter({p: 0 for p in PROTOCOLS})
        for protocol, k, nbytes, enc, plain in self.live_states():
            keys += k
            key_bytes += nbytes
            sessions_enc += enc
            sessions_plain += plain
            open_by[protocol] += 1
            keys_by[protocol] += k
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(
                    f"{name}{labels} {value:g}"
                    if isinstance(value, float)
                    else f"{name}{labels} {value}"
                )

        def by(label: str, counter: Counter[str]) -> list[tuple[str, float]]:
            return [(f'{{{label}="{_escape(k)}"}}', v) for k, v in sorted(counter.items())]

        metric(
            "llm_node_connections_open",
            "gauge",
            "Open WebSocket connections.",
            [("", self.connections_open)],
        )
        metric(
            "llm_node_connections_total",
            "counter",
            "WebSocket connections accepted.",
            [("", self.connections_total)],
        )
        metric(
            "llm_node_connections_refused_total",
            "counter",
            "Connections refused by --max-connections.",
            [("", self.connections_refused)],
        )
        metric(
            "llm_node_sessions",
            "gauge",
            "Sessions held by open connections, by mode.",
            [('{mode="encrypted"}', sessions_enc), ('{mode="plaintext"}', sessions_plain)],
        )
        metric("llm_node_session_keys", "gauge", "Session keys held in memory.", [("", keys)])
        metric(
            "llm_node_session_key_bytes",
            "gauge",
            "Bytes of session key material held.",
            [("", key_bytes)],
        )
        metric(
            "llm_node_inits_accepted_total",
            "counter",
            "Session inits accepted, by mode.",
            by("mode", self.inits_accepted),
        )
        metric(
            "llm_node_inits_refused_total",
            "counter",
            "Session inits refused, by code.",
            by("code", self.inits_refused),
        )
        metric(
            "llm_node_messages_total",
            "counter",
            "Inbound messages, by type.",
            by("type", self.messages),
        )
        metric(
            "llm_node_requests_total",
            "counter",
            "Inference requests, by finish reason.",
            by("finish_reason", self.requests),
        )
        metric("llm_node_chunks_total", "counter", "Streamed chunks sent.", [("", self.chunks)])
        metric(
            "llm_node_tokens_total", "counter", "Completion tokens streamed.", [("", self.tokens)]
        )
        metric(
            "llm_node_errors_total",
            "counter",
            "Error frames sent, by code.",
            by("code", self.errors),
        )
        metric(
            "llm_node_http_requests_total",
            "counter",
            "HTTP requests, by status.",
            by("status", self.http_requests),
        )
        histogram(
            lines,
            "llm_node_init_seconds",
            "Time to handle an encrypted_session_init.",
            self.init_latency,
        )
        metric(
            "llm_node_protocol_connections_open",
            "gauge",
            "Open WebSocket connections, by protocol.",
            by("protocol", open_by),
        )
        metric(
            "llm_node_protocol_connections_total",
            "counter",
            "WebSocket connections accepted, by protocol.",
            by("protocol", self.protocol_connections),
        )
        metric(
            "llm_node_protocol_session_keys",
            "gauge",
            "Connections' secret keys held in memory, by protocol.",
            by("protocol", keys_by),
        )
        metric(
            "llm_node_protocol_refused_total",
            "counter",
            "WebSocket upgrades refused because --protocols disables the protocol.",
            by("protocol", self.protocol_refused),
        )
        metric(
            "llm_node_noise_handshakes_total",
            "counter",
            "Protocol v2 handshakes, by result (accepted, or the error code).",
            by("result", self.v2_handshakes),
        )
        metric(
            "llm_node_record_auth_failures_total",
            "counter",
            "Protocol v2 records that failed authentication (connection closed 1008).",
            [("", self.v2_auth_failures)],
        )
        histogram(
            lines,
            "llm_node_noise_handshake_seconds",
            "Server CPU time to handle a v2 handshake message and the session record.",
            self.v2_handshake_latency,
        )
        return "\n".join(lines) + "\n"


def histogram(lines: list[str], name: str, help_text: str, h: Histogram) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} histogram")
    cumulative = 0
    for bound, count in zip(h.buckets, h.counts, strict=False):
        cumulative += count
        lines.append(f'{name}_bucket{{le="{bound:g}"}} {cumulative}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {h.count}')
    lines.append(f"{name}_sum {h.sum:.6f}")
    lines.append(f"{name}_count {h.count}")
