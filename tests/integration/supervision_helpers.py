"""Functions the supervision tests run in pool kernels."""

from __future__ import annotations

import subprocess
import sys

_HOG = (
    "import sys, threading\n"
    "block = bytearray(int(sys.argv[1]) * 1_000_000)\n"
    "for i in range(0, len(block), 4096): block[i] = 1\n"
    "print('allocated', flush=True)\n"
    "threading.Event().wait()\n"
)


def child_hogs(megabytes: int) -> int:
    """Start a subprocess that allocates ``megabytes`` and holds them; wait for it."""
    child = subprocess.Popen([sys.executable, "-c", _HOG, str(megabytes)])
    return child.wait()
