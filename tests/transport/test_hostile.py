"""Hostile or broken frames: no line kills an agent, and no reply hangs or crashes the engine side."""

from __future__ import annotations

import json

import anyio
import pytest

import transport
from transport.client import AgentConnection
from transport.protocol import MAX_NESTING, decode_frame, nesting_depth

from .conftest import Setup

pytestmark = pytest.mark.anyio

DEEP = b"[" * 1000 + b"]" * 1000
DEEP_OBJ = b'{"a":' * 1000 + b"1" + b"}" * 1000

#: Lines that used to make the agent exit with RecursionError (msgspec's decoder
#: recurses once per nesting level), and what the refusal says.
HOSTILE_REQUESTS = [
    pytest.param(DEEP + b"\n", None, id="deep-array-line"),
    pytest.param(b"[" * 200_000 + b"]" * 200_000 + b"\n", None, id="very-deep-array-line"),
    pytest.param(b"[" * 5000 + b"\n", None, id="unclosed-arrays"),
    pytest.param(b'{"v":1,"id":"h1","method":"verify","params":{"hvparams":' + DEEP_OBJ + b"}}\n", "h1", id="deep-params"),
    pytest.param(b'{"v":1,"id":7,"method":"ping","params":' + DEEP + b"}\n", 7, id="deep-params-array"),
]


@pytest.mark.parametrize(("line", "reply_id"), HOSTILE_REQUESTS)
async def test_hostile_frame_gets_an_error_reply_and_the_agent_keeps_serving(
    setup: Setup, line: bytes, reply_id: int | str | None
) -> None:
    node = setup.transport.node("n1")
    conn: AgentConnection = await node.connection()  # type: ignore[attr-defined]
    before = len(conn.refusals)
    await conn.send_raw(line)
    with anyio.fail_after(10):
        refusal = await conn.next_refusal(before)
    assert refusal["error"]["kind"] == "protocol"
    assert f"deeper than {MAX_NESTING} levels" in refusal["error"]["message"]
    assert refusal["id"] == reply_id
    with anyio.fail_after(10):
        assert (await node.ping())["node"] == "n1"
    assert setup.transport.connection_count("n1") == 1  # the same agent answered: it did not die


def test_nesting_depth_ignores_brackets_inside_strings() -> None:
    assert nesting_depth(b'{"a": "[[[[{{{{", "b": [[1], {"c": []}]}') == 4
    assert nesting_depth(b'{"s": "\\"[[[[", "x": ' + b"[" * 70 + b"]" * 70 + b"}") == 71
    legit = json.dumps({"v": 1, "id": 1, "result": [{"name": f"vm{i}", "tags": ["[" * 80]} for i in range(200)]})
    assert decode_frame(legit.encode())["result"][0]["name"] == "vm0"


#: Replies a hostile or broken node may send for call id 1, and the error the call gets.
HOSTILE_REPLIES = [
    pytest.param(b'{"v":1,"id":1,"result":' + DEEP + b"}\n", "deeper than", id="deep-result"),
    pytest.param(b'{"v":1,"id":1,"progress":' + DEEP_OBJ + b"}\n", "deeper than", id="deep-progress"),
    pytest.param(b'{"v":1,"id":1,"error":' + DEEP_OBJ + b"}\n", "deeper than", id="deep-error"),
    pytest.param(b'{"v":1,"id":1,"result":[1,2\n', "not valid JSON", id="truncated-result"),
]


@pytest.mark.parametrize(("reply", "expected"), HOSTILE_REPLIES)
async def test_hostile_reply_fails_its_call_at_once_and_the_connection_goes_on(reply: bytes, expected: str) -> None:
    """A fake "node": the engine's side of the decoding must turn every reply into a result or an error."""
    to_client_send, to_client_recv = anyio.create_memory_object_stream[bytes](100)
    requests: list[dict] = []

    async def receive() -> bytes:
        try:
            return await to_client_recv.receive()
        except anyio.EndOfStream:
            return b""

    async def send(data: bytes) -> None:
        for line in data.splitlines():
            frame = json.loads(line)
            requests.append(frame)
            if frame.get("cancel"):
                continue
            if frame["id"] == 1:
                await to_client_send.send(DEEP + b"\n")  # noise without an id: dropped, logged
                await to_client_send.send(reply)
            else:
                await to_client_send.send(json.dumps({"v": 1, "id": frame["id"], "result": {"ok": True}}).encode() + b"\n")

    conn = AgentConnection("n1", send)
    async with to_client_send, to_client_recv, anyio.create_task_group() as tg:
        tg.start_soon(conn.run_reader, receive)
        await to_client_send.send(b'{"v": 1, "hello": {"node": "n1"}}\n')
        with anyio.fail_after(5):
            await conn.wait_hello(5)
            with pytest.raises(transport.ProtocolError, match=expected) as info:
                await conn.call("ping", {})
            assert info.value.node == "n1"
            assert await conn.call("ping", {}) == {"ok": True}
        assert conn.alive
        to_client_send.close()
