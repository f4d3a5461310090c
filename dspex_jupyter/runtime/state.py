"""Kernel-wide state of the runtime: sessions held in this kernel and counters."""

from __future__ import annotations

import contextvars
import os
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SessionRecord:
    id: str
    state: dict[str, Any]
    started: float = field(default_factory=time.time)
    calls: int = 0


@dataclass
class KernelState:
    started: float = field(default_factory=time.time)
    pid: int = field(default_factory=os.getpid)
    ops_served: int = 0
    calls_served: int = 0
    sessions: dict[str, SessionRecord] = field(default_factory=dict)


STATE = KernelState()
current_session: contextvars.ContextVar[SessionRecord | None] = contextvars.ContextVar(
    "dspex_current_session", default=None
)


def session_state() -> dict[str, Any]:
    """The state dict of the session the current call belongs to.

    Functions run by ``session.call`` use it to keep state between calls::

        from dspex_jupyter.runtime import session_state
        def add(x):
            session_state().setdefault("items", []).append(x)
    """
    record = current_session.get()
    if record is None:
        raise RuntimeError("session_state() is only available inside a call made by a session")
    return record.state
