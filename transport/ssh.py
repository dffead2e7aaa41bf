"""SshTransport: each node's agent runs behind one SSH connection per node.

- One asyncssh connection per node, opened on the first call and reused; the
  agent runs as one long-lived exec session on it (``agent_command`` +
  ``--node … --hypervisor … --hv-option …``, passed through ``shlex.join``:
  never a shell string built from data), so a login shell's start-up cost
  (``~/.bashrc``) is paid once per connection, not per call.
- Key authentication only (the node's ``identity_file``; no ssh-agent, no
  password, no ``~/.ssh/config``); host keys verified against the node's
  ``known_hosts`` file — an unknown or changed key is refused with
  :class:`~transport.errors.HostKeyError`, never trusted.
- Keepalives (``keepalive_interval`` × ``keepalive_count_max``) report a dead
  or partitioned node as ``NodeUnreachable`` within seconds; the next call
  reconnects, with a jittered exponential backoff between failed attempts.
"""

from __future__ import annotations

import collections
import random
import shlex
from collections.abc import Callable
from typing import Any

import anyio
import asyncssh
import structlog

from ._conn import ConnectionTransport, NodeState
from .client import AgentConnection
from .config import ClusterConfig, NodeConfig
from .errors import HostKeyError, NodeUnreachable

log = structlog.get_logger("herd.transport.ssh")


def _ssh_options(cluster: ClusterConfig, node: NodeConfig) -> dict[str, Any]:
    return {
        "port": node.port,
        "username": node.user,
        "client_keys": [node.identity_file] if node.identity_file else [],
        "known_hosts": node.known_hosts,
        "keepalive_interval": cluster.keepalive_interval,
        "keepalive_count_max": cluster.keepalive_count_max,
        "connect_timeout": cluster.connect_timeout,
        "login_timeout": cluster.connect_timeout,
        "preferred_auth": "publickey",
        "agent_path": None,
        "password": None,
        "gss_host": None,
        "config": [],
    }


def describe_host_key_error(node: NodeConfig, err: Exception) -> HostKeyError:
    """Say whether the key is unknown (no entry) or changed (entries, none match)."""
    known = False
    if node.known_hosts:
        try:
            entries = asyncssh.read_known_hosts(node.known_hosts)
            trusted = entries.match(node.address, node.address, node.port)[0]
            known = bool(trusted)
        except (OSError, ValueError, asyncssh.Error):
            known = False
    what = "CHANGED: it does not match" if known else "UNKNOWN: it is not in"
    return HostKeyError(
        f"host key of {node.address}:{node.port} is {what} {node.known_hosts}; connection refused ({err})",
        node=node.name,
    )


class SshTransport(ConnectionTransport):
    """Reaches every node of ``cluster`` through SSH (see the module doc for the knobs)."""

    def __init__(self, cluster: ClusterConfig, *, rng: random.Random | None = None) -> None:
        names = [n for n, node in cluster.nodes.items() if node.transport == "ssh"]
        super().__init__(
            names,
            call_timeout=cluster.call_timeout,
            backoff_min=cluster.reconnect_backoff_min,
            backoff_max=cluster.reconnect_backoff_max,
            connect_timeout=cluster.connect_timeout,
            rng=rng,
        )
        self.cluster = cluster
        #: Time from starting to connect to the agent's hello, per (re)connection (bench).
        self.setup_times: dict[str, list[float]] = {name: [] for name in names}

    async def _serve_connection(self, state: NodeState, started: Callable[[AgentConnection], None]) -> None:
        node = self.cluster.nodes[state.name]
        t0 = anyio.current_time()
        try:
            with anyio.fail_after(self.cluster.connect_timeout):
                ssh = await asyncssh.connect(node.address, **_ssh_options(self.cluster, node))
        except asyncssh.HostKeyNotVerifiable as err:
            raise describe_host_key_error(node, err) from None
        except asyncssh.PermissionDenied as err:
            raise NodeUnreachable(f"ssh authentication as {node.user!r} with {node.identity_file} refused: {err.reason}", node=node.name) from None
        except TimeoutError:
            raise NodeUnreachable(
                f"cannot connect to {node.address}:{node.port} within {self.cluster.connect_timeout:g}s", node=node.name
            ) from None
        except (OSError, asyncssh.Error) as err:
            raise NodeUnreachable(f"cannot connect to {node.address}:{node.port}: {err}", node=node.name) from None
        state.hangup = ssh.close
        try:
            await self._serve_agent(state, node, ssh, started, t0)
        finally:
            ssh.close()
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await ssh.wait_closed()

    async def _serve_agent(
        self,
        state: NodeState,
        node: NodeConfig,
        ssh: asyncssh.SSHClientConnection,
        started: Callable[[AgentConnection], None],
        t0: float,
    ) -> None:
        command = shlex.join(node.agent_argv())
        try:
            process = await ssh.create_process(command, encoding=None)
        except (OSError, asyncssh.Error) as err:
            raise NodeUnreachable(f"cannot start the agent ({command}): {err}", node=node.name) from None
        stdin, stdout, stderr = process.stdin, process.stdout, process.stderr

        async def send(data: bytes) -> None:
            try:
                stdin.write(data)
                await stdin.drain()
            except (asyncssh.Error, OSError) as err:
                raise BrokenPipeError(str(err) or type(err).__name__) from None

        async def receive() -> bytes:
            try:
                return await stdout.read(1 << 16)
            except (asyncssh.Error, OSError) as err:
                raise ConnectionError(str(err) or type(err).__name__) from None

        stderr_tail: collections.deque[str] = collections.deque(maxlen=20)

        async def pump_stderr() -> None:
            # The agent's logs: forwarded to ours, and kept to explain a failed start.
            try:
                while line := await stderr.readline():
                    text = line.decode(errors="replace").rstrip()
                    stderr_tail.append(text)
                    log.debug("agent stderr", node=node.name, line=text)
            except (asyncssh.Error, OSError):
                pass

        conn = AgentConnection(node.name, send)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(conn.run_reader, receive)
                tg.start_soon(pump_stderr)
                try:
                    hello = await conn.wait_hello(self.cluster.connect_timeout)
                except NodeUnreachable as err:
                    with anyio.move_on_after(1):
                        await process.wait_closed()
                    status = process.exit_status
                    detail = "; ".join(stderr_tail) or "no output on stderr"
                    raise NodeUnreachable(
                        f"{err.message} (command: {command}; exit status {status}; stderr: {detail})", node=node.name
                    ) from None
                self.setup_times[node.name].append(anyio.current_time() - t0)
                log.info("agent connected", node=node.name, pid=hello.get("pid"))
                started(conn)
                await conn.wait_closed()
                tg.cancel_scope.cancel()
        finally:
            process.close()
