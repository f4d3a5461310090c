"""Kernel-side runtime: what runs inside pool kernels.

Importing it is cheap on purpose (standard library only): an idle pool kernel must cost
no more memory than a bare ipykernel. Heavy libraries are imported by the ops that need
them, when they run.
"""

from __future__ import annotations

from . import health as _health  # noqa: F401  (registers kernel_figures)
from . import ops as _ops  # noqa: F401  (registers the built-in ops)
from . import streams as _streams  # noqa: F401  (registers the stream ops)
from .kernel import handle_message, install
from .registry import OPS, op
from .state import session_state

__all__ = ["OPS", "handle_message", "install", "op", "session_state"]
