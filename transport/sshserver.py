"""A minimal SSH server for local test clusters (asyncssh), one per node.

``python -m transport.sshserver --port 0 --host-key KEY --authorized-keys FILE``
listens on loopback, accepts only the authorized keys, and runs each exec
request's command as an argument list (``shlex.split``; no shell) with its
stdin/stdout/stderr wired to the channel. It prints ``READY <port>`` on
stdout once listening. Keepalives (like sshd's ``ClientAliveInterval``) make
it notice a vanished client, close that session and so end its agent.

It is a test fixture, not a production server: no PTYs, no shells, no
forwarding, and the command runs as the server's own user.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import sys
from collections.abc import Sequence

import asyncssh


async def _run_command(process: asyncssh.SSHServerProcess[bytes]) -> None:
    command = process.command
    if not command:
        process.stderr.write(b"this server only runs commands (no shell)\n")
        process.exit(1)
        return
    try:
        argv = shlex.split(command)
        child = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except (OSError, ValueError) as err:
        process.stderr.write(f"cannot run {command!r}: {err}\n".encode())
        process.exit(127)
        return
    try:
        await process.redirect(stdin=child.stdin, stdout=child.stdout, stderr=child.stderr)
        status = await child.wait()
        process.exit(status if status >= 0 else 128 - status)
    except (asyncssh.Error, OSError, asyncio.CancelledError):
        pass
    finally:
        if child.returncode is None:
            # The session went away: close the child's input (it exits on EOF),
            # and make sure it does not outlive us.
            if child.stdin is not None:
                child.stdin.close()
            try:
                await asyncio.wait_for(child.wait(), 10)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                child.kill()
                await child.wait()


async def serve(args: argparse.Namespace) -> None:
    server = await asyncssh.listen(
        args.bind,
        args.port,
        server_host_keys=[args.host_key],
        authorized_client_keys=args.authorized_keys,
        process_factory=_run_command,
        encoding=None,
        allow_scp=False,
        agent_forwarding=False,
        x11_forwarding=False,
        password_auth=False,
        kbdint_auth=False,
        keepalive_interval=args.keepalive_interval,
        keepalive_count_max=args.keepalive_count_max,
        reuse_address=True,
    )
    port = server.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="herd-test-sshd", description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host-key", required=True)
    parser.add_argument("--authorized-keys", required=True)
    parser.add_argument("--keepalive-interval", type=float, default=1.0)
    parser.add_argument("--keepalive-count-max", type=int, default=3)
    args = parser.parse_args(argv)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
