"""Functions that the Ctrl-C tests run inside pool kernels, importable there by path.

A long call first tells the test it has started, by connecting to a Unix socket the test
listens on, so the test interrupts it at the right moment without sleeping.
"""

from __future__ import annotations

import signal
import socket
import time

LOADED: dict[str, object] = {}  # what calls loaded into the kernel (a model, in real use)


def load(key: str, value: object) -> list[str]:
    LOADED[key] = value
    return sorted(LOADED)


def loaded(key: str) -> object:
    return LOADED.get(key)


def _tell_started(address: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(address)
        conn.sendall(b"started")


def work_until_interrupted(address: str, seconds: float = 120.0) -> str:
    """Say the call started, then compute in a Python loop that only an interrupt stops
    (or, should none come, the deadline: the test then fails instead of hanging)."""
    _tell_started(address)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sum(range(1000))  # pure-Python work: the interrupt lands between bytecodes
    return "finished without an interrupt"


def ignore_interrupts_and_work(address: str, seconds: float = 120.0) -> str:
    """A call that ignores SIGINT (as some C extensions do): only killing stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return work_until_interrupted(address, seconds)
