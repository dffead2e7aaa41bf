"""The agent as a process: frames only on stdout, exits (after cleanup) when stdin closes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import transport
from transport.client import AgentConnection
from transport.testing import REPO_ROOT

from .conftest import RECORDING
from .drivers import RecordingHypervisor

pytestmark = pytest.mark.anyio


async def _read_frame(stdout, buf: bytearray) -> dict:  # type: ignore[no-untyped-def]
    while b"\n" not in buf:
        buf += await stdout.receive()
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    frame = json.loads(line)  # stdout carries only frames: anything else fails here
    assert frame["v"] == transport.PROTOCOL_VERSION
    return frame


async def test_agent_process_serves_frames_and_exits_on_stdin_eof_after_cleanup(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "transport.agent", "--node", "n7", "--hypervisor", RECORDING,
            "--hv-option", f"state_dir={json.dumps(str(tmp_path))}", "--log-level", "debug"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    async with await anyio.open_process(argv, env=env, stderr=subprocess.PIPE) as proc:
        assert proc.stdin and proc.stdout
        buf = bytearray()
        with anyio.fail_after(15):
            hello = await _read_frame(proc.stdout, buf)
            assert hello["hello"]["node"] == "n7"
            await proc.stdin.send(b'{"v":1,"id":1,"method":"verify","params":{"hvparams":{"sleep":30}}}\n')
            await proc.stdin.send(b'{"v":1,"id":2,"method":"ping"}\nnot json\n')
            seen: dict = {}
            while not ({2, None} <= set(seen) and "progress" in seen.get(1, {})):
                frame = await _read_frame(proc.stdout, buf)
                seen[frame["id"]] = frame
            assert seen[2]["result"]["node"] == "n7" and seen[2]["result"]["calls_in_flight"] == 1
            assert "not valid JSON" in seen[None]["error"]["message"]
            await proc.stdin.aclose()  # the SSH session died
            assert await proc.wait() == 0
        assert proc.stderr is not None
        logs = b""
        async for chunk in proc.stderr:
            logs += chunk
    assert b"cancelling calls" in logs  # logs went to stderr
    assert [e["event"] for e in RecordingHypervisor.read_events(tmp_path)] == ["begin", "cleanup"]


async def test_agent_that_cannot_build_its_driver_says_why_and_exits_2(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "transport.agent", "--node", "n1", "--hypervisor", "xen"]
    result = await anyio.run_process(argv, check=False, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 2 and result.stdout == b""
    assert b"unknown hypervisor 'xen'" in result.stderr


async def test_client_refuses_an_agent_of_another_protocol_version() -> None:
    to_client_send, to_client_recv = anyio.create_memory_object_stream[bytes](10)

    async def receive() -> bytes:
        try:
            return await to_client_recv.receive()
        except anyio.EndOfStream:
            return b""

    async def send(_data: bytes) -> None:
        return None

    conn = AgentConnection("n1", send)
    async with to_client_send, to_client_recv, anyio.create_task_group() as tg:
        tg.start_soon(conn.run_reader, receive)
        await to_client_send.send(b'{"v": 99, "hello": {"node": "n1"}}\n')
        with pytest.raises(transport.ProtocolError, match="v=99"):
            await conn.wait_hello(5)
        to_client_send.close()


async def test_frame_reader_refuses_oversized_frames_but_keeps_their_id() -> None:
    from transport.protocol import FrameReader, Oversized

    chunks = [b'{"v":1,"id":42,"method":"ping","x":"', b"z" * 300, b'"}\n{"v":1,"id":43}\n', b"tail-without-newline"]

    async def receive() -> bytes:
        return chunks.pop(0) if chunks else b""

    reader = FrameReader(receive, max_frame=100)
    big = await reader.next()
    assert isinstance(big, Oversized) and big.size > 300 and big.frame_id == 42
    assert await reader.next() == b'{"v":1,"id":43}'
    assert await reader.next() == b"tail-without-newline"
    assert await reader.next() is None


def test_error_payloads_rebuild_the_right_exception() -> None:
    import hv
    from transport.protocol import error_from_payload, error_payload

    err = error_from_payload(error_payload(hv.MigrationError("no room", node="n2"), node="n2"), node="n2", method="m")
    assert type(err) is hv.MigrationError and err.node == "n2" and str(err) == "[node n2] no room"
    unknown = error_from_payload({"kind": "hv", "class": "WeirdError", "message": "x"}, node="n1", method="m")
    assert type(unknown) is hv.HypervisorError and "WeirdError: x" in str(unknown)
    timeout = error_from_payload({"kind": "timeout", "class": "CallTimeout", "message": "late"}, node="n1", method="m")
    assert isinstance(timeout, transport.CallTimeout) and isinstance(timeout, TimeoutError)
    proto = error_from_payload({"kind": "protocol", "class": "ProtocolError", "message": "bad"}, node="n1", method="m")
    assert isinstance(proto, transport.ProtocolError) and proto.node == "n1"
    assert isinstance(error_from_payload("garbage", node="n1", method="m"), transport.ProtocolError)
