"""``llm-node serve``: build the node from a :class:`NodeConfig` and run it under Trio."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator

import attrs
import trio

from node.config import NodeConfig
from node.crypto.errors import HostKeyError
from node.crypto.hostkey import HostKey
from node.inference.base import Backend
from node.inference.factory import create_backend
from node.server.app import NodeServer, open_listeners
from node.server.context import NodeContext
from node.server.shared_replay import SharedReplayCacheError, SqliteReplayCache
from node.settlement.errors import LedgerError
from node.settlement.ledger import Ledger
from node.settlement.service import ledger_path, open_accounting

log = logging.getLogger("node")

GC_GEN0_THRESHOLD = 20_000


def build_backend(config: NodeConfig) -> Backend:
    return create_backend(
        config.backend,
        model_path=config.model_path,
        n_ctx=config.n_ctx,
        n_threads=config.n_threads,
        queue_limit=config.queue_limit if config.backend == "llama" else None,
        echo_delay_ms=config.echo_delay_ms if config.backend == "echo" else None,
        upstream_url=config.upstream_url,
        upstream_api_key=config.upstream_api_key,
        upstream_model_map=config.upstream_model_map or None,
        upstream_timeout_s=config.upstream_timeout_s if config.backend == "openai" else None,
    )


async def _watch_signals(signals: AsyncIterator[int], shutdown: trio.Event) -> None:
    async for signum in signals:
        log.info("signal received, shutting down", extra={"signal": signum})
        shutdown.set()
        return


async def run_node(config: NodeConfig, host_key: HostKey | None, backend: Backend) -> None:
    # Signals are caught from the first moment of the run, so a stop that arrives while the
    # ledger opens or the model loads still shuts down gracefully (and exits 0).
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        await _run_node(config, host_key, backend, signals)


async def _run_node(
    config: NodeConfig, host_key: HostKey | None, backend: Backend, signals: AsyncIterator[int]
) -> None:
    accounting = await open_accounting(config, host_key)
    try:
        # Shared by every worker and kept across restarts: a file beside the ledger.
        replay = SqliteReplayCache(
            ledger_path(config).with_name("replay-cache.sqlite3"),
            window_s=config.replay_window_s,
        )
    except BaseException:
        await accounting.aclose()
        raise
    ctx = NodeContext(
        config=config,
        host_key=host_key,
        backend=backend,
        replay_cache=replay,
        accounting=accounting,
    )
    listeners = await open_listeners(config.host, config.port, reuse_port=config.workers > 1)
    shutdown = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, signals, shutdown)
            log.info("loading backend", extra={"backend": backend.name})
            if not await backend.ready():
                log.warning("backend is not ready yet", extra={"backend": backend.name})
            # Everything loaded so far (modules, the model) lives for the whole run: keep
            # it out of the collector's generations so full collections stay short.
            gc.collect()
            gc.freeze()
            # Thousands of live sessions make each full collection long (tens to hundreds
            # of ms, all connections stalled); collect the young generation less often
            # and promote to a full collection ten times less often than by default.
            gc.set_threshold(GC_GEN0_THRESHOLD, 20, 100)
            host, port = listeners[0].socket.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            log.info(
                "listening on http://%s:%d (WebSocket ws://%s:%d/v1/ws), protocols %s, "
                "encryption %s%s",
                shown,
                port,
                shown,
                port,
                ",".join(ctx.protocols()),
                "enabled" if host_key else "DISABLED (no HOST_PRIVATE_KEY: plaintext only)",
                f", host public key {host_key.public_key_hex}, address {host_key.address}"
                if host_key
                else "",
                extra={"pid": os.getpid()},
            )
            await NodeServer(ctx).serve(shutdown, listeners=listeners)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await backend.aclose()
            await accounting.aclose()
            replay.close()
        if host_key is not None:
            host_key.wipe()
        log.info("stopped")


def _exit_quietly(signum: int, _frame: object) -> None:  # pragma: no cover - subprocess
    sys.exit(0)


def _worker_main(config: NodeConfig, index: int) -> None:  # pragma: no cover - subprocess
    # A stop asked for before the worker listens is a clean exit; once Trio runs, its
    # signal receiver takes over and shuts the worker down gracefully.
    signal.signal(signal.SIGTERM, _exit_quietly)
    signal.signal(signal.SIGINT, _exit_quietly)
    from node.logs import configure_logging

    configure_logging(config.log_level, config.log_format)
    logging.getLogger("node").info("worker started", extra={"worker": index})
    sys.exit(_serve_one(config))


def _serve_workers(config: NodeConfig) -> int:
    """Run ``config.workers`` processes that share the port through SO_REUSEPORT.

    Each worker is a separate Trio process with its own host-key copy (read from the
    environment), its own backend and its own session keys: nothing secret crosses a
    process boundary. The parent forwards SIGINT/SIGTERM and exits 0 when all workers did.
    """
    import multiprocessing
    import socket

    if config.port == 0:  # pick one port for all workers
        probe = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind((config.host, 0))
        config.port = probe.getsockname()[1]
        probe.close()
    # Receipts for sessions a crashed run left open are written once, here, before any
    # worker can open a session of its own; the workers then skip that step.
    try:
        host_key = HostKey.from_env()
        Ledger.open(ledger_path(config), host_key=host_key).close()
    except (HostKeyError, LedgerError) as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    if host_key is not None:
        host_key.wipe()
    config = attrs.evolve(config, ledger_recover=False)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(config, i)) for i in range(config.workers)]
    for proc in procs:
        proc.start()

    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    for proc in procs:
        proc.join()

    def clean(code: int | None) -> bool:
        # A worker stopped before it had even started Python's handlers ends by the
        # signal itself; after a stop we asked for, that is a clean exit too.
        return code == 0 or (stopping and code in (-signal.SIGTERM, -signal.SIGINT))

    return 0 if all(clean(proc.exitcode) for proc in procs) else 1


def serve_main(config: NodeConfig) -> int:
    if config.workers > 1:
        return _serve_workers(config)
    return _serve_one(config)


def _serve_one(config: NodeConfig) -> int:
    try:
        host_key = HostKey.from_env()
    except HostKeyError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    if config.require_encryption and host_key is None:
        print(
            "error: --require-encryption needs HOST_PRIVATE_KEY (run `llm-node keygen`)",
            file=sys.stderr,
        )
        return 2
    if config.protocols == ("v2",) and host_key is None:
        print(
            "error: --protocols v2 needs HOST_PRIVATE_KEY (protocol v2 authenticates the node "
            "by its host key; run `llm-node keygen`)",
            file=sys.stderr,
        )
        return 2
    try:
        backend = build_backend(config)
    except Exception as exc:
        print(f"error: cannot create the {config.backend} backend: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(run_node, config, host_key, backend)
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
