"""Build herd's tiny test guests (argument lists only, no shell).

``build_dirty_kernel(out_dir)`` compiles ``dirty.c`` + ``entry.s`` into a
32-bit multiboot ELF that QEMU boots with ``-kernel`` (TCG or KVM). It writes
to every page of its RAM above 4 MiB forever, so its migration does not
converge at a limited bandwidth. Needs gcc (``-m32`` compile only: no
multilib, no libgcc) and binutils (``as --32``, ``ld -m elf_i386``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("entry.s", "dirty.c", "link.ld")
CFLAGS = [
    "-m32", "-march=i686", "-ffreestanding", "-fno-pic", "-fno-pie", "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables", "-nostdlib", "-O2", "-Wall", "-Wextra", "-Werror",
]


class GuestBuildError(RuntimeError):
    """A tool is missing or failed; the message says which and why."""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise GuestBuildError(f"{name} not found on PATH: install gcc and binutils (Debian: apt-get install gcc)")
    return path


def _run(argv: list[str]) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if res.returncode != 0:
        raise GuestBuildError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")


def build_dirty_kernel(out_dir: str | os.PathLike[str]) -> Path:
    """Build (or reuse, keyed by the sources' hash) ``dirty-kernel-<hash>.elf`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((HERE / name).read_bytes())
    kernel = out / f"dirty-kernel-{digest.hexdigest()[:12]}.elf"
    if kernel.is_file():
        return kernel
    gcc, as_, ld = _tool("gcc"), _tool("as"), _tool("ld")
    entry_o, dirty_o = out / "entry.o", out / "dirty.o"
    _run([as_, "--32", "-o", str(entry_o), str(HERE / "entry.s")])
    _run([gcc, *CFLAGS, "-c", "-o", str(dirty_o), str(HERE / "dirty.c")])
    tmp = kernel.with_suffix(".tmp")
    _run([ld, "-m", "elf_i386", "-nostdlib", "-T", str(HERE / "link.ld"), "-o", str(tmp), str(entry_o), str(dirty_o)])
    os.replace(tmp, kernel)
    return kernel


if __name__ == "__main__":
    import sys

    print(build_dirty_kernel(sys.argv[1] if len(sys.argv) > 1 else "."))
