"""``llm-node serve``: build the node from a :class:`NodeConfig` and run it under Trio.

With ``--workers N`` this module is also the supervisor: the parent process checks the
configuration, binds the listening socket once and hands it to N worker processes,
restarts a worker that dies (with backoff and a limit), writes receipts for the dead
worker's open sessions, and owns the shared directory of the workers' metrics.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import trio

from node.config import NodeConfig
from node.crypto.errors import HostKeyError
from node.crypto.hostkey import HostKey
from node.inference.base import Backend
from node.inference.factory import create_backend
from node.protocol.replay import init_capacity
from node.protocol.storage import StorageHealth
from node.server.app import NodeServer, open_listeners
from node.server.context import NodeContext
from node.server.metrics import MULTIPROC_ENV, NodeMetrics
from node.server.shared_replay import (
    SharedReplayCacheError,
    SqliteReplayCache,
    checkpoint_loop,
)
from node.settlement.errors import LedgerError
from node.settlement.ledger import Ledger
from node.settlement.service import ledger_path, open_accounting

log = logging.getLogger("node")

GC_GEN0_THRESHOLD = 20_000
LISTEN_BACKLOG = 1024
# Below this many new encrypted inits per second of replay-cache capacity, warn at start.
MIN_INIT_CAPACITY = 10.0
METRICS_REFRESH_S = 1.0
# Supervision of --workers: a worker that dies is started again after a delay that
# doubles with each restart inside the window; more than the limit inside the window
# stops the whole node (something is wrong that restarting will not fix).
RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_MAX_S = 10.0
RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0


class ConfigError(Exception):
    """A configuration problem found before serving (exit status 2)."""


def build_backend(config: NodeConfig) -> Backend:
    return create_backend(
        config.backend,
        model_path=config.model_path,
        n_ctx=config.n_ctx,
        n_threads=config.n_threads,
        n_gpu_layers=config.n_gpu_layers if config.backend == "llama" else None,
        queue_limit=config.queue_limit if config.backend == "llama" else None,
        echo_delay_ms=config.echo_delay_ms if config.backend == "echo" else None,
        upstream_url=config.upstream_url,
        upstream_api_key=config.upstream_api_key,
        upstream_model_map=config.upstream_model_map or None,
        upstream_timeout_s=config.upstream_timeout_s if config.backend == "openai" else None,
        default_max_tokens=config.default_max_tokens if config.backend != "echo" else None,
        default_temperature=config.default_temperature if config.backend != "echo" else None,
    )


async def _watch_signals(signals: AsyncIterator[int], shutdown: trio.Event) -> None:
    async for signum in signals:
        log.info("signal received, shutting down", extra={"signal": signum})
        shutdown.set()
        return


async def _refresh_metrics(metrics: NodeMetrics) -> None:
    # Another worker may answer the scrape: publish this one's live gauges regularly.
    while True:
        metrics.publish()
        await trio.sleep(METRICS_REFRESH_S)


async def run_node(
    config: NodeConfig,
    host_key: HostKey | None,
    backend: Backend,
    listen_socket: socket.socket | None = None,
) -> None:
    # Signals are caught from the first moment of the run, so a stop that arrives while the
    # ledger opens or the model loads still shuts down gracefully (and exits 0).
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        await _run_node(config, host_key, backend, signals, listen_socket)


def open_replay_cache(config: NodeConfig, health: StorageHealth | None = None) -> SqliteReplayCache:
    """The replay cache file beside the ledger, shared by every worker."""
    return SqliteReplayCache(
        ledger_path(config).with_name("replay-cache.sqlite3"),
        window_s=config.replay_window_s,
        max_entries=config.replay_cache_entries,
        health=health,
    )


def replay_capacity_warning(config: NodeConfig) -> str | None:
    """What to log at start when the replay cache fills below MIN_INIT_CAPACITY inits/s."""
    capacity = init_capacity(config.replay_cache_entries, config.replay_window_s)
    if capacity >= MIN_INIT_CAPACITY:
        return None
    return (
        f"the replay cache holds {config.replay_cache_entries} entries for a "
        f"{config.replay_window_s:g} s window: on average only {capacity:.2f} new encrypted "
        "sessions per second (2 entries each) before it is full and new inits get "
        "RATE_LIMITED; raise --replay-cache-entries (or lower --replay-window)"
    )


async def _run_node(
    config: NodeConfig,
    host_key: HostKey | None,
    backend: Backend,
    signals: AsyncIterator[int],
    listen_socket: socket.socket | None = None,
) -> None:
    storage = StorageHealth(on_ledger_failure=config.on_ledger_failure)
    accounting = await open_accounting(config, host_key, storage)
    if config.replay_window_s < config.session_ttl_s:
        log.warning(
            "the replay window is shorter than the session TTL: an init recorded by an "
            "eavesdropper can be replayed once the window has passed",
            extra={"replay_window": config.replay_window_s, "session_ttl": config.session_ttl_s},
        )
    warning = replay_capacity_warning(config)
    if warning is not None:
        log.warning(
            warning,
            extra={
                "replay_cache_entries": config.replay_cache_entries,
                "replay_window": config.replay_window_s,
            },
        )
    try:
        # Shared by every worker and kept across restarts: a file beside the ledger.
        replay = open_replay_cache(config, storage)
    except BaseException:
        await accounting.aclose()
        raise
    metrics_dir = os.environ.get(MULTIPROC_ENV) if listen_socket is not None else None
    ctx = NodeContext(
        config=config,
        host_key=host_key,
        backend=backend,
        replay_cache=replay,
        accounting=accounting,
        storage=storage,
        metrics=NodeMetrics(multiprocess_dir=metrics_dir or None),
    )
    try:
        if listen_socket is not None:  # a worker: the parent bound it
            listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(listen_socket))]
        else:
            listeners = await open_listeners(config.host, config.port)
        shutdown = trio.Event()
        server = NodeServer(ctx)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, signals, shutdown)
            nursery.start_soon(accounting.watch)
            # The replay cache's WAL is copied back from a worker thread, not by an init.
            nursery.start_soon(checkpoint_loop, replay)

            async def run_server(
                task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                await server.serve(shutdown, listeners=listeners, task_status=task_status)
                nursery.cancel_scope.cancel()

            # HTTP answers from the start (/health, /ready says 503) while the model loads.
            ctx.backend_loading = True
            await nursery.start(run_server)
            _log_listening(listeners, host_key, ctx.protocols())
            log.info("loading backend", extra={"backend": backend.name})
            ready = await backend.ready()
            ctx.backend_loaded = ready
            ctx.backend_loading = False
            if not ready:
                log.warning("backend is not ready yet", extra={"backend": backend.name})
            else:
                log.info("ready", extra={"backend": backend.name})
            if metrics_dir:
                nursery.start_soon(_refresh_metrics, ctx.metrics)
            # Everything loaded so far (modules, the model) lives for the whole run: keep
            # it out of the collector's generations so full collections stay short.
            gc.collect()
            gc.freeze()
            # Thousands of live sessions make each full collection long (tens to hundreds
            # of ms, all connections stalled); collect the young generation less often
            # and promote to a full collection ten times less often than by default.
            gc.set_threshold(GC_GEN0_THRESHOLD, 20, 100)
    finally:
        ctx.metrics.publish()  # a worker's last counts reach the shared files
        with trio.CancelScope(shield=True):
            await backend.aclose()
            await accounting.aclose()
            replay.close()
        if host_key is not None:
            host_key.wipe()
        log.info("stopped")


def _log_listening(
    listeners: list[trio.SocketListener], host_key: HostKey | None, protocols: tuple[str, ...]
) -> None:
    host, port = listeners[0].socket.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    log.info(
        "listening on http://%s:%d (WebSocket ws://%s:%d/v1/ws), protocols %s, encryption %s%s",
        shown,
        port,
        shown,
        port,
        ",".join(protocols),
        "enabled" if host_key else "DISABLED (no HOST_PRIVATE_KEY: plaintext only)",
        f", host public key {host_key.public_key_hex}, address {host_key.address}"
        if host_key
        else "",
        extra={"pid": os.getpid()},
    )


# ----------------------------------------------------------------- configuration


def _check_config(config: NodeConfig) -> tuple[HostKey | None, Backend]:
    """Everything that can be checked before serving; raises :class:`ConfigError`."""
    try:
        host_key = HostKey.from_env()
    except HostKeyError as exc:
        raise ConfigError(exc.message) from None
    if config.require_encryption and host_key is None:
        raise ConfigError("--require-encryption needs HOST_PRIVATE_KEY (run `llm-node keygen`)")
    if config.protocols == ("v2",) and host_key is None:
        raise ConfigError(
            "--protocols v2 needs HOST_PRIVATE_KEY (protocol v2 authenticates the node "
            "by its host key; run `llm-node keygen`)"
        )
    try:
        backend = build_backend(config)
    except Exception as exc:
        if host_key is not None:
            host_key.wipe()
        raise ConfigError(f"cannot create the {config.backend} backend: {exc}") from None
    return host_key, backend


def serve_main(config: NodeConfig) -> int:
    if config.workers > 1:
        return _serve_workers(config)
    return _serve_one(config)


def _serve_one(config: NodeConfig, listen_socket: socket.socket | None = None) -> int:
    try:
        host_key, backend = _check_config(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(run_node, config, host_key, backend, listen_socket)
    except LedgerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except SharedReplayCacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------ workers


def _exit_quietly(signum: int, _frame: object) -> None:  # pragma: no cover - subprocess
    sys.exit(0)


def _worker_main(
    config: NodeConfig, index: int, listen_socket: socket.socket
) -> None:  # pragma: no cover - subprocess
    # A stop asked for before the worker listens is a clean exit; once Trio runs, its
    # signal receiver takes over and shuts the worker down gracefully.
    signal.signal(signal.SIGTERM, _exit_quietly)
    signal.signal(signal.SIGINT, _exit_quietly)
    from node.logs import configure_logging

    configure_logging(config.log_level, config.log_format)
    sys.exit(_serve_one(config, listen_socket))


def bind_listen_socket(host: str, port: int) -> socket.socket:
    """The one listening socket of a multi-worker node, bound by the parent.

    No ``SO_REUSEPORT``: a second node on the same port fails with "Address already in
    use" instead of silently taking a share of the connections. Raises OSError.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


@attrs.define
class RestartPolicy:
    """When to start a dead worker again, and when to give up.

    ``record`` is called at each unexpected exit with the current monotonic time and
    returns the delay before the restart, or None when more than ``limit`` exits fell
    inside ``window_s`` (the node then stops).
    """

    backoff_s: float = RESTART_BACKOFF_S
    backoff_max_s: float = RESTART_BACKOFF_MAX_S
    limit: int = RESTART_LIMIT
    window_s: float = RESTART_WINDOW_S
    _exits: collections.deque[float] = attrs.field(factory=collections.deque)

    def record(self, now: float) -> float | None:
        self._exits.append(now)
        while self._exits and self._exits[0] <= now - self.window_s:
            self._exits.popleft()
        if len(self._exits) > self.limit:
            return None
        return float(min(self.backoff_max_s, self.backoff_s * 2 ** (len(self._exits) - 1)))


class _Supervisor:
    """The parent of ``--workers N``: starts, watches and restarts the workers."""

    def __init__(
        self,
        config: NodeConfig,
        listen_socket: socket.socket,
        metrics: NodeMetrics,
        target: Any = None,
    ) -> None:
        import multiprocessing

        self.target = _worker_main if target is None else target  # tests pass their own
        self.config = config
        self.listen_socket = listen_socket
        self.metrics = metrics
        self.policy = RestartPolicy()
        self.mp = multiprocessing.get_context("spawn")
        self.procs: dict[int, Any] = {}
        self.restart_at: dict[int, float] = {}
        self.stopping = False
        self.failed: str | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def start(self, index: int) -> None:
        proc = self.mp.Process(
            target=self.target,
            args=(self.config, index, self.listen_socket),
            name=f"llm-node-worker-{index}",
        )
        proc.start()
        self.procs[index] = proc
        log.info("worker started", extra={"worker": index, "worker_pid": proc.pid})

    def stop(self, signum: int = signal.SIGTERM, _frame: object = None) -> None:
        """Signal handler: forward the stop to every worker and wake the loop."""
        self.stopping = True
        for proc in self.procs.values():
            if proc.pid is not None and proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                    os.kill(proc.pid, signal.SIGTERM)
        with contextlib.suppress(OSError):  # the pipe is full: already woken
            self._wake_w.send(b"\0")

    def run(self) -> int:
        from multiprocessing.connection import wait

        for index in range(self.config.workers):
            self.start(index)
        while not self.stopping:
            now = time.monotonic()
            timeout = max(0.0, min(self.restart_at.values()) - now) if self.restart_at else None
            watched: list[Any] = [p.sentinel for p in self.procs.values()]
            wait([*watched, self._wake_r], timeout)
            try:
                while self._wake_r.recv(64):
                    pass
            except BlockingIOError:
                pass
            if self.stopping:
                break
            for index, proc in list(self.procs.items()):
                if proc.exitcode is not None:
                    del self.procs[index]
                    self._worker_died(index, proc)
                    if self.failed:
                        break
            if self.failed:
                self.stop()
                break
            now = time.monotonic()
            for index, when in list(self.restart_at.items()):
                if when <= now:
                    del self.restart_at[index]
                    self.start(index)
                    self.metrics.worker_restarted()
        for proc in self.procs.values():
            proc.join()
        self._wake_r.close()
        self._wake_w.close()
        if self.failed:
            print(f"error: {self.failed}", file=sys.stderr)
            return 1

        def clean(code: int | None) -> bool:
            # A worker stopped before it had even started Python's handlers ends by the
            # signal itself; after a stop we asked for, that is a clean exit too.
            return code == 0 or code in (-signal.SIGTERM, -signal.SIGINT)

        return 0 if all(clean(p.exitcode) for p in self.procs.values()) else 1

    def _worker_died(self, index: int, proc: Any) -> None:
        from prometheus_client import multiprocess

        code = proc.exitcode
        proc.join()
        log.error(
            "worker exited unexpectedly",
            extra={"worker": index, "worker_pid": proc.pid, "exit_code": code},
        )
        if self.metrics.multiprocess_dir:
            multiprocess.mark_process_dead(proc.pid, self.metrics.multiprocess_dir)  # type: ignore[no-untyped-call]
        self._settle_dead_worker(proc.pid)
        delay = self.policy.record(time.monotonic())
        if delay is None:
            self.failed = (
                f"worker {index} exited unexpectedly (exit code {code}); more than "
                f"{self.policy.limit} worker exits within {self.policy.window_s:g} s, "
                "stopping the node (see the log above for the cause)"
            )
            log.error(self.failed)
            return
        log.warning("restarting worker", extra={"worker": index, "delay_s": round(delay, 3)})
        self.restart_at[index] = time.monotonic() + delay

    def _settle_dead_worker(self, pid: int) -> None:
        """Receipts for the sessions the dead worker left open (as after any crash)."""
        host_key: HostKey | None = None
        try:
            host_key = HostKey.from_env()
            with Ledger.open(ledger_path(self.config), host_key=host_key, recover=False) as led:
                receipts = led.store.recover_open_sessions(host_key=host_key, owner_pid=pid)
        except (HostKeyError, LedgerError) as exc:
            log.error(
                "cannot write receipts for the dead worker's sessions",
                extra={"worker_pid": pid, "error": getattr(exc, "message", str(exc))},
            )
            return
        finally:
            if host_key is not None:
                host_key.wipe()
        if receipts:
            log.warning(
                "wrote receipts for sessions the dead worker left open",
                extra={"worker_pid": pid, "count": len(receipts)},
            )


def _serve_workers(config: NodeConfig) -> int:
    """Run ``config.workers`` processes on one socket bound here, and supervise them.

    Each worker is a separate Trio process with its own host-key copy (read from the
    environment), its own backend and its own session keys: nothing secret crosses a
    process boundary. The parent forwards SIGINT/SIGTERM and exits 0 when all workers did.
    """
    # Configuration errors are reported once, here, with exit status 2.
    try:
        host_key, backend = _check_config(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Receipts for sessions a crashed run left open are written once, here, before any
    # worker can open a session of its own; the workers then skip that step.
    try:
        Ledger.open(ledger_path(config), host_key=host_key).close()
        open_replay_cache(config).close()
    except LedgerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except SharedReplayCacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if host_key is not None:
            host_key.wipe()
        del backend  # built only to check the options; each worker builds its own
    try:
        listen_socket = bind_listen_socket(config.host, config.port)
    except OSError as exc:
        print(f"error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    config = attrs.evolve(config, ledger_recover=False)
    metrics_dir = tempfile.mkdtemp(prefix="llm-node-metrics-")  # mode 0700
    saved_env = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = metrics_dir
    from prometheus_client import values

    saved_value_class = values.ValueClass
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    try:
        supervisor = _Supervisor(config, listen_socket, NodeMetrics(multiprocess_dir=metrics_dir))
        signal.signal(signal.SIGINT, supervisor.stop)
        signal.signal(signal.SIGTERM, supervisor.stop)
        return supervisor.run()
    finally:
        listen_socket.close()
        values.ValueClass = saved_value_class
        if saved_env is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = saved_env
        shutil.rmtree(metrics_dir, ignore_errors=True)
