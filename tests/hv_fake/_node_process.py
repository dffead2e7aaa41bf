"""A fake node in its own process, for tests that kill a node agent mid-migration.

usage: python -m tests.hv_fake._target_node STATE_DIR NODE INFO_JSON
Prints the address ``accept_instance`` returned, then serves until killed.
"""

from __future__ import annotations

import sys

import anyio
import msgspec

import hv
from hv.fake import FakeHypervisor


async def main(state_dir: str, node: str, info: str) -> None:
    spec = msgspec.json.decode(info, type=dict)["spec"]
    async with FakeHypervisor(state_dir, node=node) as driver:
        address = await driver.accept_instance(msgspec.convert(spec, hv.Instance), info, "")
        print(address, flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:4])
