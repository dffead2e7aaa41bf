"""One QMP connection per QEMU process, owned by the driver.

Every command runs under a timeout: a QEMU that stops answering is a
:class:`~hv.errors.HypervisorTimeout` naming the instance and the command,
never a hang. Events are counted and announced through an anyio Event, so a
caller can wait for "the next MIGRATION event" instead of sleeping.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Any

import anyio
from qemu.qmp import ConnectError, EventListener, ExecInterruptedError, ExecuteError, QMPClient, QMPError
from qemu.qmp.protocol import Runstate

from ..errors import HypervisorError, HypervisorTimeout, InstanceNotFound

# qemu.qmp logs an ERROR on every EOF, which is how QEMU ends a session after
# `quit`: that is expected, so keep its logger quiet unless asked.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

#: Longest path a sockaddr_un can hold (108 bytes including the NUL).
_SUN_PATH_MAX = 107


class QmpCommandError(HypervisorError):
    """QEMU answered a command with an error (``error_class`` says which)."""

    def __init__(self, message: str, *, error_class: str = "", node: str | None = None) -> None:
        super().__init__(message, node=node)
        self.error_class = error_class


class _Listener(EventListener):
    """Hands each event to the monitor without keeping an unbounded history."""

    def __init__(self, monitor: Monitor) -> None:
        super().__init__()
        self._monitor = monitor

    async def put(self, event: Any) -> None:  # called by qemu.qmp's reader task
        self._monitor._on_event(dict(event))


def _connect_unix(path: str) -> socket.socket:
    """A connected AF_UNIX socket; long paths go through /proc/self/fd."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(os.fsencode(path)) <= _SUN_PATH_MAX:
            sock.connect(path)
        else:
            dirfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                sock.connect(f"/proc/self/fd/{dirfd}/{os.path.basename(path)}")
            finally:
                os.close(dirfd)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Monitor:
    """A QMP session with one QEMU process."""

    def __init__(self, instance: str, path: str, *, timeout: float, node: str | None = None) -> None:
        self.instance = instance
        self.path = path
        self.timeout = timeout
        self.node = node
        self._client: QMPClient | None = None
        self._lock = anyio.Lock()
        #: Number of events seen and the latest of each name.
        self.event_count = 0
        self.last_events: dict[str, dict[str, Any]] = {}
        #: Device ids QEMU reported as deleted (DEVICE_DELETED).
        self.deleted_devices: set[str] = set()
        self._changed = anyio.Event()

    # --- connection ---------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.runstate == Runstate.RUNNING

    async def connect(self) -> None:
        """Connect (once); a dead session is dropped and replaced."""
        async with self._lock:
            if self.connected:
                return
            await self._drop()
            client = QMPClient(f"herd-{self.instance}")
            client.events.names = {"HERD-NO-SUCH-EVENT"}  # the default listener keeps nothing
            client.register_listener(_Listener(self))
            try:
                sock = _connect_unix(self.path)
            except OSError as err:
                raise InstanceNotFound(
                    f"instance {self.instance}: cannot connect to QMP socket {self.path}: {err}", node=self.node
                ) from err
            try:
                with anyio.fail_after(self.timeout):
                    await client.connect(sock)
            except TimeoutError as err:
                sock.close()
                await self._disconnect(client)
                raise HypervisorTimeout(
                    f"instance {self.instance}: QMP greeting not received within {self.timeout}s", node=self.node
                ) from err
            except (ConnectError, OSError, EOFError) as err:
                sock.close()
                await self._disconnect(client)
                raise HypervisorError(
                    f"instance {self.instance}: QMP connection to {self.path} failed: {err}", node=self.node
                ) from err
            self._client = client

    @staticmethod
    async def _disconnect(client: QMPClient) -> None:
        try:
            with anyio.move_on_after(2.0):
                await client.disconnect()
        except (QMPError, OSError, EOFError):  # EOF after `quit` is the normal end
            pass

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await self._disconnect(client)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._drop()
        self._changed.set()

    # --- events -------------------------------------------------------------

    def _on_event(self, event: dict[str, Any]) -> None:
        self.event_count += 1
        self.last_events[str(event.get("event"))] = event
        if event.get("event") == "DEVICE_DELETED":
            device = (event.get("data") or {}).get("device")
            if isinstance(device, str):
                self.deleted_devices.add(device)
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def wait_event(self, since: int, timeout: float) -> bool:
        """Wait until more than ``since`` events were seen; False on timeout."""
        with anyio.move_on_after(timeout):
            while self.event_count <= since:
                await self._changed.wait()
            return True
        return self.event_count > since

    # --- commands -----------------------------------------------------------

    async def execute(
        self, cmd: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run one QMP command; errors and timeouts name the instance and command."""
        limit = self.timeout if timeout is None else timeout
        try:
            with anyio.fail_after(limit):
                await self.connect()
                assert self._client is not None
                return await self._client.execute(cmd, dict(args) if args else None)
        except TimeoutError as err:
            raise HypervisorTimeout(
                f"instance {self.instance}: QMP command {cmd!r} got no answer within {limit}s", node=self.node
            ) from err
        except ExecuteError as err:
            raise QmpCommandError(
                f"instance {self.instance}: QMP command {cmd!r} failed: {err}",
                error_class=err.error_class,
                node=self.node,
            ) from err
        except (ExecInterruptedError, EOFError, ConnectError, OSError) as err:
            await self._drop()
            raise HypervisorError(
                f"instance {self.instance}: QMP connection lost during {cmd!r}: {err or type(err).__name__}",
                node=self.node,
            ) from err
        except QMPError as err:  # StateError when the session died between connect and execute
            await self._drop()
            raise HypervisorError(
                f"instance {self.instance}: QMP command {cmd!r} failed: {err or type(err).__name__}", node=self.node
            ) from err
