"""stream_end waits for the ledger; the closing frames without usage do not.

Under load many requests end in one ledger group commit. The final chunk and the
encrypted finish reason carry no usage, so they go as soon as the backend is done;
stream_end, which reports the usage, only after the usage is recorded. Until then the
request is still the active one. Memory streams and an autojump MockClock: no timing.
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from node.inference.base import GenerationResult
from node.protocol.connection import Session
from tests.server._support import RecordingAccounting, build_node, memory_client


class GatedAccounting(RecordingAccounting):
    """Holds every request_finished until the test opens the gate (shielded, like the
    ledger's writes: a write that was asked for completes even if its caller is
    cancelled)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.waiting = trio.Event()

    async def request_finished(
        self, session: Session, request_id: str | int | None, result: GenerationResult
    ) -> None:
        self.waiting.set()
        with trio.CancelScope(shield=True):
            await self.gate.wait()
            await super().request_finished(session, request_id, result)


async def test_stream_end_only_after_the_usage_is_recorded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = build_node()
    accounting = GatedAccounting()
    node.ctx.accounting = accounting
    with trio.fail_after(300):
        async with memory_client(node) as client:
            _, session = await client.init(node.host_public_key, session_id="1")
            await client.send(session.message_frame({"prompt": "one two three"}, request_id="a"))
            seen: list[dict[str, Any]] = []
            while not seen or seen[-1]["type"] != "encrypted_response":
                seen.append(await client.recv())
            await accounting.waiting.wait()
            assert seen[-2]["type"] == "encrypted_chunk"
            assert seen[-2].get("final") is True
            assert accounting.finished == []  # nothing recorded yet, and no stream_end
            # The request is still the active one: another is refused meanwhile.
            await client.send(session.message_frame({"prompt": "next"}, request_id="b"))
            refused = await client.expect_error("REQUEST_IN_PROGRESS", request_id="b")
            assert refused["session_id"] == "1"
            accounting.gate.set()
            end = await client.expect("stream_end")
            assert end["id"] == "a"
            assert end["usage"]["completion_tokens"] == 3
            assert [r.completion_tokens for _, _, r in accounting.finished] == [3]
            # Then the connection takes requests again.
            again = await client.ask(session, "four five", request_id="c")
            assert again.text == "four five"
            assert again.end["usage"]["completion_tokens"] == 2


async def test_usage_is_recorded_when_the_client_leaves_before_stream_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = build_node()
    accounting = GatedAccounting()
    node.ctx.accounting = accounting
    with trio.fail_after(300):
        async with memory_client(node) as client:
            _, session = await client.init(node.host_public_key, session_id="1")
            await client.send(session.message_frame({"prompt": "one two three"}, request_id="a"))
            await accounting.waiting.wait()
            await client.ws.aclose()
            await trio.testing.wait_all_tasks_blocked()
            accounting.gate.set()
        await node.wait_no_connections()
    # Recorded with the request's own outcome, not as a cancel with nothing delivered.
    [(_, request_id, result)] = accounting.finished
    assert request_id == "a"
    assert result.finish_reason == "stop"
    assert result.completion_tokens == 3
