"""What a run's threads print goes to the run's log file, not through the kernel's IOPub.

Why: ipykernel's ``OutStream.flush()`` called from a thread other than the IO thread waits
for a round trip through the IO thread, and DSPy flushes after every log record and every
tqdm refresh. A MIPROv2 run printed about 400 times and spent ~0.3 s of a 3 s run on those
round trips, for text nobody saw: a run is started by a comm message, so no cell shows its
output. In the log file it is kept instead, next to the run's checkpoints, with secrets
from the kernel's environment masked.

Routing is by DSPy context, not by thread: ``dspy.context`` values follow DSPy's
``ParallelExecutor`` into its worker threads, so ``num_threads > 1`` is covered too.
Anything else the kernel prints still goes where it went.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dspy

from ..checkpoint import SECRET_KEY_PATTERN

_CONTEXT_KEY = "dspex_run_output"
_install_lock = threading.Lock()
_installs = 0


def _secret_values() -> re.Pattern[str] | None:
    """The values of secret-looking environment variables, to mask in the log."""
    values = sorted(
        {v for k, v in os.environ.items() if SECRET_KEY_PATTERN.search(k) and len(v) >= 8},
        key=len,
        reverse=True,
    )
    return re.compile("|".join(map(re.escape, values))) if values else None


class RunLog:
    """A run's log file (0600, appended to across resumes). ``on_text`` sees every write
    first: the run turns DSPy's progress prints into events there."""

    def __init__(self, path: Path, on_text: Callable[[str], None] | None = None) -> None:
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "w", encoding="utf-8", errors="replace")
        self._lock = threading.Lock()
        self._on_text = on_text
        self._secrets = _secret_values()

    def write(self, text: str) -> int:
        if self._on_text is not None:
            self._on_text(text)
        if self._secrets is not None:
            text = self._secrets.sub("[secret]", text)
        with self._lock:
            if not self._file.closed:
                self._file.write(text)
        return len(text)

    def flush(self) -> None:
        """Does nothing: DSPy flushes after every line and tqdm after every refresh, a
        system call each; the run calls ``sync`` at every checkpoint instead."""

    def sync(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()  # to the OS, not the disk: a SIGKILL loses nothing more

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        with self._lock:
            self._file.close()


class _RoutedStream:
    """Stands in for ``sys.stdout``/``sys.stderr`` while runs go."""

    def __init__(self, original: Any) -> None:
        self.original = original

    def _target(self) -> Any:
        log = dspy.settings.get(_CONTEXT_KEY)
        return self.original if log is None else log

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def __getattr__(self, name: str) -> Any:  # set_parent, encoding, fileno, ...
        return getattr(self.original, name)


@contextlib.contextmanager
def routed_to(log: RunLog) -> Iterator[None]:
    """Within this block (and DSPy's worker threads it starts), print to ``log``."""
    global _installs
    with _install_lock:
        if _installs == 0:
            sys.stdout, sys.stderr = _RoutedStream(sys.stdout), _RoutedStream(sys.stderr)
        _installs += 1
    try:
        with dspy.context(**{_CONTEXT_KEY: log}):
            yield
    finally:
        log.sync()
        with _install_lock:
            _installs -= 1
            if _installs == 0:
                for name in ("stdout", "stderr"):
                    stream = getattr(sys, name)
                    if isinstance(stream, _RoutedStream):  # not replaced by someone since
                        setattr(sys, name, stream.original)
