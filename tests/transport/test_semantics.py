"""Protocol semantics every transport must keep: results, errors, cancel, bad frames."""

from __future__ import annotations

import math

import anyio
import pytest

import hv
import transport
from transport.client import AgentConnection

from tests._load import warm_call_deadline

from .conftest import Setup
from .drivers import FAILURES
from .util import eventually

pytestmark = pytest.mark.anyio

INST = hv.Instance(name="web1", beparams=hv.BeParams(minmem=256, maxmem=512, vcpus=2), nics=(hv.Nic(mac="aa:00:00:00:00:01"),))


async def test_results_decode_into_real_types(setup: Setup) -> None:
    node = setup.transport.node("n1")
    assert (await node.ping())["node"] == "n1"
    await node.start_instance(INST)
    assert await node.list_instances() == ["web1"]
    info = await node.get_instance_info("web1")
    assert isinstance(info, hv.InstanceInfo) and info.state is hv.HvInstanceState.RUNNING and info.memory == 512
    assert await node.get_instance_info("nope") is None
    infos = await node.get_all_instances_info()
    assert [type(i) for i in infos] == [hv.InstanceInfo]
    assert isinstance(await node.get_node_info(), hv.NodeInfo)
    # A base-class method whose body runs on the node: it calls get_node_info there.
    assert await node.instance_startup_memory(INST) == 512
    result = await node.stop_instance(INST, force=True)
    assert isinstance(result, hv.StopResult) and result.stage is hv.StopStage.SIGKILL
    assert isinstance(result.stages[0], hv.StageTiming)
    assert (await node.stop_instance(None, name="web1", retry=True)).stage is hv.StopStage.ALREADY_STOPPED
    assert await node.accept_instance(INST, "info", "10.0.0.2:8000") == "10.0.0.2:8000"


async def test_driver_errors_come_back_as_the_same_class_with_node(setup: Setup) -> None:
    node = setup.transport.node("n2")
    with pytest.raises(hv.InstanceNotFound) as caught:
        await node.stop_instance(INST)
    assert caught.value.node == "n2" and "web1" in caught.value.message
    with pytest.raises(hv.InjectedFault, match="reboot refused"):
        await node.reboot_instance(INST)
    with pytest.raises(hv.HotplugError):
        await node.hotplug_supported(INST)
    # Not an hv error (a driver bug): a plain HypervisorError naming the class.
    with pytest.raises(hv.HypervisorError, match="RuntimeError: driver bug with 64") as bug:
        await node.balloon_instance_memory(INST, 64)
    assert type(bug.value) is hv.HypervisorError and bug.value.node == "n2"
    with pytest.raises(hv.HypervisorError, match="NotImplementedError"):
        await node.powercycle_node()


@pytest.mark.parametrize(
    ("fail", "expected", "also"),
    [
        pytest.param("stalled", hv.MigrationError, (), id="migration-subclass"),
        pytest.param("disk-timeout", hv.HypervisorTimeout, (TimeoutError,), id="timeout-subclass"),
        pytest.param("bad-mask", hv.ParseError, (ValueError,), id="two-deep"),
        pytest.param("param-value", hv.ParameterValueError, (hv.ParameterError, ValueError), id="known-exact"),
    ],
)
async def test_driver_error_subclass_arrives_as_nearest_known_class(
    setup: Setup, fail: str, expected: type, also: tuple[type, ...]
) -> None:
    """A driver's own error class arrives as its nearest public hv ancestor, message, node and name kept."""
    with pytest.raises(hv.HypervisorError) as caught:
        await setup.transport.node("n2").verify({"fail": fail})
    err = caught.value
    assert type(err) is expected
    assert all(isinstance(err, cls) for cls in also)
    assert err.node == "n2" and err.message == f"verify failed: {fail}"
    assert err.remote_type == FAILURES[fail].__name__


async def test_bad_arguments_are_refused_before_sending(setup: Setup) -> None:
    node = setup.transport.node("n1")
    with pytest.raises(TypeError):
        await node.get_instance_info()  # missing instance_name
    with pytest.raises(transport.ProtocolError, match="unknown method"):
        await node.call("no_such_method")
    with pytest.raises(AttributeError):
        node.not_a_method  # noqa: B018
    with pytest.raises(transport.UnknownNode):
        setup.transport.node("n9")


async def test_progress_events_reach_the_caller(setup: Setup) -> None:
    seen: list[dict] = []
    assert await setup.transport.node("n1").verify({"sleep": 0.3}, on_progress=seen.append) == "slept"
    assert [p["step"] for p in seen] == [0, 1, 2]


async def test_cancel_reaches_the_node_and_its_cleanup_runs(setup: Setup) -> None:
    node = setup.transport.node("n1")
    began = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def slow() -> None:
            await node.verify({"sleep": 30}, on_progress=lambda _p: began.set())

        tg.start_soon(slow)
        await began.wait()
        tg.cancel_scope.cancel()
    await eventually(lambda: any(e["event"] == "cleanup" for e in setup.events("n1")), what="cleanup on the node")
    assert (await node.ping())["calls_in_flight"] == 0


async def test_call_timeout_names_node_method_deadline_and_cancels(setup: Setup) -> None:
    node = setup.transport.node("n2")
    # A warm connection: the deadline times the call, not the connect (SSH, agent start).
    deadline = await warm_call_deadline(node)
    with pytest.raises(transport.CallTimeout) as caught:
        await node.verify({"sleep": 30}, call_timeout=deadline)
    err = caught.value
    assert isinstance(err, TimeoutError) and err.node == "n2"
    assert "verify" in str(err) and f"{deadline:g}s" in str(err)
    await eventually(lambda: any(e["event"] == "cleanup" for e in setup.events("n2")), what="cleanup on the node")


async def test_hundred_concurrent_calls_on_one_connection(setup: Setup) -> None:
    node = setup.transport.node("n1")
    results: dict[int, dict] = {}

    async def one(i: int) -> None:
        results[i] = await node.ping()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(node.verify, {"sleep": 0.5})  # a slow call does not hold up the rest
            for i in range(100):
                tg.start_soon(one, i)
    assert len(results) == 100 and {r["pid"] for r in results.values()} == {results[0]["pid"]}


MALFORMED: list[tuple[bytes, str]] = [
    (b"this is not json\n", "not valid JSON"),
    (b"[1, 2]\n", "must be a JSON object"),
    (b'{"v": 1, "method": "ping"}\n', "no 'id'"),
    (b'{"v": 1, "id": [1], "method": "ping"}\n', "'id' must be"),
    (b'{"v": 1, "id": "m1", "method": "reformat_disk"}\n', "unknown method 'reformat_disk'"),
    (b'{"v": 1, "id": "m2"}\n', "neither 'method' nor 'cancel'"),
    (b'{"v": 1, "id": "m3", "method": 7}\n', "'method' must be a string"),
    (b'{"v": 1, "id": "m4", "method": "start_instance", "params": {"instance": {"name": 5}}}\n', "params.instance.name"),
    (b'{"v": 1, "id": "m5", "method": "start_instance", "params": {}}\n', "missing parameter 'instance'"),
    (b'{"v": 1, "id": "m6", "method": "list_instances", "params": {"bogus": 1}}\n', "unknown parameter 'bogus'"),
    (b'{"v": 1, "id": "m7", "method": "list_instances", "params": [1]}\n', "'params' of list_instances must be an object"),
    (b'{"v": 2, "id": "m8", "method": "ping"}\n', "protocol version mismatch"),
    (b'{"id": "m9", "method": "ping"}\n', "no protocol version"),
    (b'{"v": 1, "id": "m10", "method": "ping", "extra": 1}\n', "unknown field 'extra'"),
    (b'{"v": 1, "id": "m11", "cancel": "yes"}\n', "'cancel' must be true"),
    (b'{"v": 1, "id": "m12", "method": "ping", "payload": "' + b"x" * (2 << 20) + b'"}\n', "exceeds the limit"),
]


async def test_each_malformed_frame_gets_an_error_and_good_calls_go_on(setup: Setup) -> None:
    node = setup.transport.node("n1")
    conn: AgentConnection = await node.connection()  # type: ignore[attr-defined]
    before = len(conn.refusals)
    async with anyio.create_task_group() as tg:
        slow_result: list[str | None] = []

        async def slow() -> None:
            slow_result.append(await node.verify({"sleep": 0.5}))

        tg.start_soon(slow)
        for i, (frame, expected) in enumerate(MALFORMED):
            await conn.send_raw(frame)
            with anyio.fail_after(5):
                refusal = await conn.next_refusal(before + i)
            assert refusal["error"]["kind"] == "protocol", frame[:80]
            assert expected in refusal["error"]["message"], (expected, refusal)
            assert refusal["error"]["node"] == "n1"
            # The id is echoed when it was usable, so the sender can match the refusal.
            if b'"id": "m' in frame[:40]:
                assert isinstance(refusal["id"], str) and refusal["id"].startswith("m"), refusal
            assert (await node.ping())["node"] == "n1"
    assert slow_result == ["slept"]


async def test_connection_drop_fails_calls_then_reconnects(setup: Setup) -> None:
    t = setup.transport
    node = t.node("n2")
    await node.ping()
    assert t.connection_count("n2") == 1
    began = anyio.Event()
    failures: list[BaseException] = []

    async def slow() -> None:
        try:
            await node.verify({"sleep": 30}, on_progress=lambda _p: began.set())
        except transport.NodeUnreachable as err:
            failures.append(err)

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow)
        await began.wait()
        await t.drop_connection("n2")
    assert len(failures) == 1 and failures[0].node == "n2"
    # The node saw its input close: the call was cancelled and cleaned up.
    await eventually(lambda: any(e["event"] == "cleanup" for e in setup.events("n2")), what="cleanup on the node")
    assert (await node.ping())["node"] == "n2"
    assert t.connection_count("n2") == 2


async def test_transport_fault_injection(setup: Setup) -> None:
    t = setup.transport
    node = t.node("n1")
    t.faults.inject("n1", "get_node_info", error="boom", times=1)
    with pytest.raises(hv.InjectedFault, match="boom") as caught:
        await node.get_node_info()
    assert caught.value.node == "n1"
    assert isinstance(await node.get_node_info(), hv.NodeInfo)  # times=1: spent
    t.faults.inject("n1", "list_instances", hang=True)
    with pytest.raises(transport.CallTimeout):
        await node.list_instances(call_timeout=0.2)
    t.faults.clear("n1")
    assert await node.list_instances() == []
    t.faults.inject("n2", "ping", drop_connection=True, times=1)
    with pytest.raises(transport.NodeUnreachable):
        await t.node("n2").ping()
    assert (await t.node("n2").ping())["node"] == "n2"
    t.faults.inject("n2", "ping", delay=0.05)
    start = anyio.current_time()
    await t.node("n2").ping()
    assert anyio.current_time() - start >= 0.05
    assert not math.isnan(start)


async def test_the_node_enforces_the_call_deadline_even_without_a_cancel_frame(setup: Setup) -> None:
    node = setup.transport.node("n2")
    conn: AgentConnection = await node.connection()  # type: ignore[attr-defined]
    before = len(conn.refusals)
    # A raw request that nobody will cancel: the agent's own deadline stops it.
    await conn.send_raw(b'{"v":1,"id":"d1","method":"verify","params":{"hvparams":{"sleep":30}},"timeout":0.3}\n')
    with anyio.fail_after(10):
        reply = await conn.next_refusal(before)
    assert reply["id"] == "d1" and reply["error"]["kind"] == "timeout"
    assert "verify ran out of its deadline of 0.3s on the node" in reply["error"]["message"]
    assert any(e["event"] == "cleanup" for e in setup.events("n2"))
    await conn.send_raw(b'{"v":1,"id":"d2","method":"ping","timeout":-1}\n')
    with anyio.fail_after(10):
        bad = await conn.next_refusal(before + 1)
    assert "'timeout' must be a positive number" in bad["error"]["message"]
