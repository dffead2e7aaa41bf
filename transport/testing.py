"""A local test cluster: N nodes on this machine, each a real SSH server.

::

    async with LocalCluster(n=3, base_dir=tmp_path, hypervisor="fake") as lc:
        async with SshTransport(lc.config) as t:
            await t.node("n1").get_node_info()
        await lc.kill("n2")       # SSH server and its agents, SIGKILL
        await lc.restart("n2")    # same port, same host key

Each node gets a loopback port, its own host key (listed in a known_hosts
file) and its own state directory; one client key is authorized on all. The
servers are asyncssh (``python -m transport.sshserver``, fast to start) or
OpenSSH's ``sshd`` run as a daemon on an unprivileged port with a private
config — never the system's. The agents run as real subprocesses
(``sys.executable -m transport.agent``). Every process started is stopped.
It holds no task group, so it works under pytest-asyncio and anyio alike.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.abc
import asyncssh

from .config import ClusterConfig, ConnectSettings, NodeConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
SSHD = "/usr/sbin/sshd"


def agent_command() -> list[str]:
    """The agent argv prefix for local nodes: self-sufficient even under sshd's clean environment."""
    return ["env", f"PYTHONPATH={REPO_ROOT}", sys.executable, "-m", "transport.agent"]


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``path`` with exactly ``mode`` whatever the umask (keys, known_hosts, configs)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # an existing file keeps its old mode through os.open
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _private_dir(path: Path) -> None:
    """``path`` made if missing, and mode 0700 whatever the umask."""
    path.mkdir(mode=0o700, parents=False, exist_ok=True)
    os.chmod(path, 0o700)


def _open_log(path: Path) -> int:
    """A log file opened for appending, mode 0600 whatever the umask (a raw fd for the child)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return fd


#: The umask of the servers (and so of the agents): what they create is private.
_CHILD_UMASK = 0o077


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children.get(child, []))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class _Node:
    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self.port = 0
        self.host_key_path = root / "ssh_host_ed25519_key"
        self.host_public = ""
        self.process: anyio.abc.Process | None = None
        self.log_path = root / "server.log"


class LocalCluster:
    """N SSH-server nodes on loopback; see the module doc."""

    def __init__(
        self,
        n: int = 3,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        hypervisor: str = "fake",
        server: Literal["asyncssh", "sshd"] = "asyncssh",
        hv_options: Mapping[str, Any] | None = None,
        names: list[str] | None = None,
        cluster_name: str = "local",
        keepalive_interval: float = 1.0,
        keepalive_count_max: int = 2,
        call_timeout: float | None = 60.0,
        connect_timeout: float = 10.0,
        agent_start_timeout: float = 10.0,
    ) -> None:
        if server not in ("asyncssh", "sshd"):
            raise ValueError(f"server must be 'asyncssh' or 'sshd', got {server!r}")
        self.names = names or [f"n{i}" for i in range(1, n + 1)]
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="herd-cluster-"))
        self.hypervisor = hypervisor
        self.server = server
        self.hv_options = dict(hv_options or {})
        self.cluster_name = cluster_name
        #: The cluster's connection knobs (fast reconnects: test nodes come and go).
        self.settings = ConnectSettings(
            connect_timeout=connect_timeout,
            agent_start_timeout=agent_start_timeout,
            keepalive_interval=keepalive_interval,
            keepalive_count_max=keepalive_count_max,
            reconnect_backoff_min=0.1,
            reconnect_backoff_max=1.0,
            call_timeout=call_timeout,
        )
        self.user = getpass.getuser()
        self._nodes = {name: _Node(name, self.base_dir / name) for name in self.names}
        self.identity_file = self.base_dir / "id_ed25519"
        self.authorized_keys = self.base_dir / "authorized_keys"
        self.known_hosts = self.base_dir / "known_hosts"
        self.config_path = self.base_dir / "cluster.toml"
        self.config: ClusterConfig | None = None  # type: ignore[assignment]

    # --- public --------------------------------------------------------------

    def state_dir(self, node: str) -> Path:
        return self._nodes[node].root / "state"

    def port(self, node: str) -> int:
        return self._nodes[node].port

    async def __aenter__(self) -> LocalCluster:
        try:
            await self.start()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Make keys, start every node's server, write known_hosts and cluster.toml."""
        # Every file and directory gets an explicit mode: under umask 000 the
        # defaults would leave keys and known_hosts world-writable.
        self.base_dir.parent.mkdir(parents=True, exist_ok=True)
        _private_dir(self.base_dir)
        client_key = asyncssh.generate_private_key("ssh-ed25519", comment="herd-test-client")
        _write_private(self.identity_file, client_key.export_private_key())
        _write_private(self.authorized_keys, client_key.export_public_key())
        for node in self._nodes.values():
            _private_dir(node.root)
            _private_dir(self.state_dir(node.name))
            host_key = asyncssh.generate_private_key("ssh-ed25519", comment=f"herd-test-{node.name}")
            _write_private(node.host_key_path, host_key.export_private_key())
            node.host_public = " ".join(host_key.export_public_key().decode().split()[:2])
        if self.server == "sshd":
            _prepare_sshd()
        async with anyio.create_task_group() as tg:
            for node in self._nodes.values():
                tg.start_soon(self._start_server, node)
        self.write_known_hosts()
        self.config = self._build_config()
        _write_private(self.config_path, self.config.to_toml().encode())

    def write_known_hosts(self, overrides: Mapping[str, str] | None = None) -> None:
        """known_hosts for every node; ``overrides`` maps a node to another key line (tests)."""
        lines = []
        for node in self._nodes.values():
            key = (overrides or {}).get(node.name) or node.host_public
            lines.append(f"[127.0.0.1]:{node.port} {key}")
        _write_private(self.known_hosts, ("\n".join(lines) + "\n").encode())

    async def kill(self, node: str) -> None:
        """Stop the node's SSH server and every process under it (agents) with SIGKILL."""
        await self._stop_server(self._nodes[node], hard=True)

    async def restart(self, node: str) -> None:
        """Start the node's server again: same port, same host key, same state."""
        n = self._nodes[node]
        if n.process is not None:
            await self._stop_server(n, hard=False)
        await self._start_server(n)

    def freeze(self, node: str) -> None:
        """SIGSTOP the node's server and its children: a silent partition for keepalives."""
        n = self._nodes[node]
        if n.process is not None:
            _signal([n.process.pid, *_descendants(n.process.pid)], signal.SIGSTOP)

    def thaw(self, node: str) -> None:
        n = self._nodes[node]
        if n.process is not None:
            _signal([n.process.pid, *_descendants(n.process.pid)], signal.SIGCONT)

    def agent_pids(self, node: str) -> list[int]:
        """The node's running agent processes (children of its server)."""
        n = self._nodes[node]
        if n.process is None:
            return []
        pids = []
        for pid in _descendants(n.process.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"transport.agent" in cmdline and _alive(pid):
                pids.append(pid)
        return pids

    async def aclose(self) -> None:
        """Stop every server and agent; remove the directory if we made it."""
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for node in self._nodes.values():
                    if node.process is not None:
                        tg.start_soon(self._stop_server, node, False)
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    # --- internals -----------------------------------------------------------

    def _build_config(self) -> ClusterConfig:
        nodes = {}
        for node in self._nodes.values():
            nodes[node.name] = NodeConfig(
                name=node.name,
                address="127.0.0.1",
                port=node.port,
                user=self.user,
                identity_file=str(self.identity_file),
                known_hosts=str(self.known_hosts),
                hypervisor=self.hypervisor,
                hv_options={"state_dir": str(self.state_dir(node.name)), **self.hv_options},
                agent_command=agent_command(),
                transport="ssh",
            )
        return ClusterConfig(
            name=self.cluster_name, nodes=nodes, source=str(self.config_path), **self.settings.connect_settings()
        )

    async def _start_server(self, node: _Node) -> None:
        log = _open_log(node.log_path)  # handed to the child, closed below
        try:
            if self.server == "asyncssh":
                argv = [
                    sys.executable, "-m", "transport.sshserver", "--port", str(node.port),
                    "--host-key", str(node.host_key_path), "--authorized-keys", str(self.authorized_keys),
                ]
                env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
                node.process = await anyio.open_process(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=env,
                    start_new_session=True, cwd=str(REPO_ROOT), umask=_CHILD_UMASK,
                )
                node.port = await self._read_ready(node)
            else:
                if not node.port:
                    node.port = _free_port()
                config = self._write_sshd_config(node)
                node.process = await anyio.open_process(
                    [SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    start_new_session=True, umask=_CHILD_UMASK,
                )
                await self._wait_listening(node)
        finally:
            os.close(log)

    async def _read_ready(self, node: _Node) -> int:
        assert node.process is not None and node.process.stdout is not None
        buf = b""
        with anyio.fail_after(20):
            while b"\n" not in buf:
                try:
                    buf += await node.process.stdout.receive()
                except anyio.EndOfStream:
                    raise RuntimeError(f"ssh server of {node.name} exited: {self._log_tail(node)}") from None
        line = buf.split(b"\n", 1)[0].decode()
        if not line.startswith("READY "):
            raise RuntimeError(f"ssh server of {node.name} said {line!r}: {self._log_tail(node)}")
        return int(line.split()[1])

    async def _wait_listening(self, node: _Node) -> None:
        """Poll sshd's port until it accepts (an external process we can only watch)."""
        assert node.process is not None
        with anyio.move_on_after(20):
            while True:
                if node.process.returncode is not None:
                    raise RuntimeError(f"sshd of {node.name} exited {node.process.returncode}: {self._log_tail(node)}")
                try:
                    stream = await anyio.connect_tcp("127.0.0.1", node.port)
                except OSError:
                    await anyio.sleep(0.02)
                    continue
                await stream.aclose()
                return
        raise RuntimeError(f"sshd of {node.name} did not listen on {node.port}: {self._log_tail(node)}")

    def _write_sshd_config(self, node: _Node) -> Path:
        path = node.root / "sshd_config"
        _write_private(
            path,
            "\n".join(
                [
                    f"Port {node.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {node.host_key_path}",
                    f"PidFile {node.root / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "PermitRootLogin prohibit-password",
                    f"AllowUsers {self.user}",
                    "ClientAliveInterval 1",
                    "ClientAliveCountMax 3",
                    "X11Forwarding no",
                    "AllowTcpForwarding no",
                    "PrintMotd no",
                    "LogLevel INFO",
                    "",
                ]
            ).encode(),
        )
        return path

    def _log_tail(self, node: _Node) -> str:
        try:
            return node.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    async def _stop_server(self, node: _Node, hard: bool) -> None:
        process, node.process = node.process, None
        if process is None:
            return
        with anyio.CancelScope(shield=True):
            tree = _descendants(process.pid)
            if hard:
                _signal([process.pid, *tree], signal.SIGKILL)
            else:
                _signal([process.pid, *tree], signal.SIGCONT)  # in case it was frozen
                process.terminate()
            with anyio.move_on_after(3):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            # Agents exit when their input closes; whatever is left is killed.
            with anyio.move_on_after(5):
                while any(_alive(pid) for pid in tree):
                    await anyio.sleep(0.02)
            _signal([pid for pid in tree if _alive(pid)], signal.SIGKILL)
            await process.aclose()


def _prepare_sshd() -> None:
    if not os.path.exists(SSHD):
        raise RuntimeError(f"{SSHD} not found: install Debian's openssh-server")
    # sshd's privilege separation needs this directory (Debian makes it at boot).
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    """``scripts/cluster``: start a local cluster, print its TOML, stay up until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(prog="scripts/cluster", description="Start N local SSH nodes for herd.")
    parser.add_argument("-n", type=int, default=3, help="number of nodes (default 3)")
    parser.add_argument("--server", choices=["asyncssh", "sshd"], default="asyncssh")
    parser.add_argument("--hypervisor", default="fake", help="fake, kvm or module:Class")
    parser.add_argument("--dir", help="where keys, state and cluster.toml go (default: a new temp dir, removed at exit)")
    parser.add_argument("--name", default="local", help="cluster name")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("-n must be ≥ 1")

    async def run() -> None:
        async with LocalCluster(
            n=args.n, base_dir=args.dir, hypervisor=args.hypervisor, server=args.server, cluster_name=args.name
        ) as lc:
            assert lc.config is not None
            print(lc.config.to_toml(), flush=True)
            print(f"# written to {lc.config_path}; Ctrl-C stops every node", file=sys.stderr, flush=True)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break

    anyio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
