"""A fake node in its own process, for tests that kill a node agent mid-migration.

usage: python -m tests.hv_fake._node_process target STATE_DIR NODE INFO_JSON
           prints the address ``accept_instance`` returned, then serves until killed
       python -m tests.hv_fake._node_process source STATE_DIR NODE ADDRESS
           starts instance web1 (64 MiB), migrates it live to ADDRESS, prints "migrating"
"""

from __future__ import annotations

import sys

import anyio
import msgspec

import hv
from hv.fake import FakeHypervisor


async def main(role: str, state_dir: str, node: str, arg: str) -> None:
    async with FakeHypervisor(state_dir, node=node) as driver:
        if role == "target":
            spec = msgspec.convert(msgspec.json.decode(arg, type=dict)["spec"], hv.Instance)
            print(await driver.accept_instance(spec, arg, ""), flush=True)
        elif role == "source":
            spec = hv.Instance(name="web1", beparams=hv.BeParams(minmem=64, maxmem=64))
            await driver.start_instance(spec)
            await driver.migrate_instance(spec, arg, True)
            print("migrating", flush=True)
        else:
            raise SystemExit(f"unknown role {role!r}")
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:5])
