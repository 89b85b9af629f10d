"""The node's pool of pre-generated v2 ephemeral keys, over real sockets."""

from __future__ import annotations

import trio
import trio.testing

from node.server.ephemeral import EphemeralKeys
from tests.server._support import DEV_HOST_PUBLIC_HEX, build_node
from tests.server._v2 import raw_v2, terms

GUARD_S = 20
HOST_PUB = bytes.fromhex(DEV_HOST_PUBLIC_HEX)


async def test_handshakes_take_pooled_keys_once_and_shutdown_wipes_the_rest() -> None:
    node = build_node()
    keys = EphemeralKeys(size=8)
    keys.pool.fill()
    pooled = list(keys.pool._keys)  # the test looks inside: which keys, in which order
    node.ctx.ephemeral_keys = keys
    seen: list[bytes] = []
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(node.server.serve, node.shutdown)
            port = listeners[0].socket.getsockname()[1]
            for _ in range(3):
                async with raw_v2(port, HOST_PUB) as raw:
                    await raw.send(raw.conn.start())
                    msg2 = await raw.recv()
                    raw.conn.receive(msg2)
                    await raw.send(raw.conn.session(terms(), raw.client_key))
                    (ack,) = await raw.events()
                    assert type(ack).__name__ == "SessionAccepted"
                    seen.append(msg2[:33])
                await node.wait_no_connections()
            node.shutdown.set()
    # each connection's e was the next pooled key, and no key served twice
    assert seen == [k.public for k in pooled[:3]]
    assert all(k.private.wiped for k in pooled[:3])  # wiped by their handshakes
    # the keys still pooled at shutdown are wiped with the pool
    assert keys.pool.closed
    assert all(k.private.wiped for k in pooled[3:])
    assert (keys.taken, keys.inline) == (3, 0)


async def test_node_fills_its_own_pool_and_falls_back_inline_when_empty() -> None:
    node = build_node()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(GUARD_S):
            listeners = await nursery.start(node.server.serve, node.shutdown)
            port = listeners[0].socket.getsockname()[1]
            keys = node.ctx.ephemeral_keys
            assert keys is not None
            keys.pool.wipe()  # closed: every handshake now makes its own key
            async with raw_v2(port, HOST_PUB) as raw:
                await raw.open_session()
            await node.wait_no_connections()
            assert (keys.taken, keys.inline) == (0, 1)
            node.shutdown.set()
    assert node.ctx.ephemeral_keys is None  # the node's own pool goes with the run


async def test_refill_task_tops_up_and_wipes_on_cancel() -> None:
    keys = EphemeralKeys(size=8)
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            refilled = keys.refilled
            nursery.start_soon(keys.run)
            await refilled.wait()  # the worker thread filled the empty pool
            assert len(keys.pool) == 8
            for _ in range(5):  # above the low-water mark (2): no refill yet
                assert keys.take() is not None
            await trio.testing.wait_all_tasks_blocked()
            assert len(keys.pool) == 3
            refilled = keys.refilled
            assert keys.take() is not None  # down to 2: a refill is wanted
            await refilled.wait()
            assert len(keys.pool) == 8
            held = list(keys.pool._keys)
            nursery.cancel_scope.cancel()
    assert keys.pool.closed
    assert all(k.private.wiped for k in held)
