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
- Every stage of a connect has a deadline: TCP connect, SSH handshake and
  authentication share ``connect_timeout``; opening the agent's session and
  the agent's hello share ``agent_start_timeout``. A stage that overruns is
  abandoned (the SSH connection aborted), logged with the stage and the time
  spent, and the call fails with ``NodeUnreachable`` naming the stage.
- known_hosts is read by herd (a missing or unreadable file is a
  :class:`~transport.errors.ConfigError` naming it, never "unknown host key")
  and matched as OpenSSH does: a plain ``host`` entry is for port 22 only; any
  other port needs a ``[host]:port`` entry.
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

from ._conn import ConnectionTransport, NodeState, StageTimeout, connect_stage
from .client import AgentConnection
from .config import ClusterConfig, NodeConfig, SshSettings, check_known_hosts
from .errors import ConfigError, HostKeyError, NodeUnreachable

log = structlog.get_logger("herd.transport.ssh")


class StrictKnownHosts(asyncssh.SSHKnownHosts):
    """known_hosts matched as OpenSSH does: a port other than 22 needs a ``[host]:port`` entry.

    asyncssh's own match retries without the port when nothing matched
    ``[host]:port``, so a plain ``host`` entry (meant for port 22) would vouch
    for every port of that host, e.g. another user's sshd on port 2222.
    """

    def match(self, host: str, addr: str, port: int | None) -> Any:
        return self._match(host, addr, port if port and port != 22 else None)


def load_known_hosts(cluster: ClusterConfig, node: NodeConfig) -> StrictKnownHosts:
    """The node's known_hosts, read now (ConfigError naming the file if it cannot be)."""
    path = cluster.ssh_settings(node.name).known_hosts
    try:
        check_known_hosts(node, source=cluster.source)
    except ConfigError as err:
        err.node = node.name
        raise
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{cluster.source or '<cluster>'}: [nodes.{node.name}] known_hosts: cannot be read ({path}: "
            f"{getattr(err, 'strerror', None) or err}): fix its permissions or path",
            node=node.name,
        ) from None
    known = StrictKnownHosts()
    try:
        known.load(text)
    except (ValueError, asyncssh.Error) as err:
        raise ConfigError(
            f"{cluster.source or '<cluster>'}: [nodes.{node.name}] known_hosts: not a known_hosts file ({path}: {err}): "
            "regenerate it with ssh-keyscan",
            node=node.name,
        ) from None
    return known


class _StageClient(asyncssh.SSHClient):
    """Tracks how far the SSH connect got, to name the stage a deadline hit."""

    def __init__(self) -> None:
        self.stage = "tcp connect"
        self.conn: asyncssh.SSHClientConnection | None = None

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn
        self.stage = "ssh handshake"

    def begin_auth(self, username: str) -> None:
        self.stage = "ssh authentication"


def describe_host_key_error(node: NodeConfig, err: Exception, known_hosts: StrictKnownHosts | None = None) -> HostKeyError:
    """Say whether the key is unknown (no entry) or changed (entries, none match)."""
    known = False
    if known_hosts is not None:
        known = bool(known_hosts.match(node.address, node.address, node.port)[0])
    what = "CHANGED: it does not match" if known else "UNKNOWN: it is not in"
    entry = node.address if node.port == 22 else f"[{node.address}]:{node.port}"
    return HostKeyError(
        f"host key of {node.address}:{node.port} is {what} {node.known_hosts} (looked for entries of {entry}); "
        f"connection refused ({err})",
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
        settings = self.cluster.ssh_settings(node.name)
        t0 = anyio.current_time()
        known_hosts = load_known_hosts(self.cluster, node)
        client = _StageClient()
        where = f" of {settings.host}:{settings.port}"
        ssh: asyncssh.SSHClientConnection | None = None
        try:
            with connect_stage(node.name, lambda: client.stage, settings.connect_timeout, where):
                ssh = await asyncssh.connect(
                    settings.host, client_factory=lambda: client, **settings.asyncssh_options(known_hosts)
                )
        except asyncssh.HostKeyNotVerifiable as err:
            raise describe_host_key_error(node, err, known_hosts) from None
        except asyncssh.PermissionDenied as err:
            raise NodeUnreachable(f"ssh authentication as {node.user!r} with {node.identity_file} refused: {err.reason}", node=node.name) from None
        except (OSError, asyncssh.Error) as err:
            raise NodeUnreachable(f"cannot connect to {node.address}:{node.port}: {err}", node=node.name) from None
        finally:
            if ssh is None and client.conn is not None:
                client.conn.abort()  # an abandoned handshake: drop the socket now
        state.hangup = ssh.close
        try:
            await self._serve_agent(state, node, settings, ssh, started, t0)
        finally:
            ssh.close()
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await ssh.wait_closed()

    async def _serve_agent(
        self,
        state: NodeState,
        node: NodeConfig,
        settings: SshSettings,
        ssh: asyncssh.SSHClientConnection,
        started: Callable[[AgentConnection], None],
        t0: float,
    ) -> None:
        command = shlex.join(node.agent_argv())
        limit = settings.agent_start_timeout
        deadline = anyio.current_time() + limit
        try:
            with connect_stage(node.name, "agent session", limit, f" ({command})"):
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
                    with connect_stage(node.name, "agent hello", limit, f" ({command})"):
                        hello = await conn.wait_hello(max(deadline - anyio.current_time(), 0.0))
                except NodeUnreachable as err:
                    with anyio.move_on_after(1):
                        await process.wait_closed()
                    status = process.exit_status
                    detail = "; ".join(stderr_tail) or "no output on stderr"
                    message = f"{err.message} (command: {command}; exit status {status}; stderr: {detail})"
                    if isinstance(err, StageTimeout) or conn.alive:
                        raise StageTimeout(
                            f"connect stuck in stage 'agent hello': no hello within {limit:g}s of starting the agent; "
                            f"abandoned (command: {command}; stderr: {detail})",
                            node=node.name,
                            stage="agent hello",
                        ) from None
                    raise NodeUnreachable(message, node=node.name) from None
                self.setup_times[node.name].append(anyio.current_time() - t0)
                log.info("agent connected", node=node.name, pid=hello.get("pid"))
                started(conn)
                await conn.wait_closed()
                tg.cancel_scope.cancel()
        finally:
            process.close()
