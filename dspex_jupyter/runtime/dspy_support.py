"""Which DSPy releases a run supports, checked in the kernel when a run starts.

The run's search loop (``runtime/mipro.py``) re-implements DSPy 3.4.1's
``MIPROv2._optimize_prompt_parameters`` step for step and calls its private helpers, so it
is only known to be right for that minor release. Any other installed DSPy is refused with
the installed and the supported versions, rather than optimizing subtly differently.

Standard library only (``importlib.metadata``): it runs before DSPy is used.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

from ..core.errors import DspexError

# Keep in step with the ``dspy`` extra in pyproject.toml.
SUPPORTED_DSPY = ">=3.4.1,<3.5"
_LOWEST = (3, 4, 1)
_END = (3, 5, 0)  # first release not supported
_VERSION = re.compile(r"^\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(.*)$")
# Pre-releases (3.5.0rc1, 3.4.1.dev0) come before their release.
_PRE_RELEASE = re.compile(r"^[.-]?(a|b|c|rc|alpha|beta|pre|preview|dev)", re.IGNORECASE)


class DspyVersionError(DspexError):
    """The kernel's DSPy is missing or outside the range the run's search loop follows."""

    hint = f"install a supported DSPy into the pool's environment: 'dspy[optuna]{SUPPORTED_DSPY}'"


def installed_dspy_version() -> str | None:
    """The version of the installed ``dspy`` distribution (None when it is not installed)."""
    try:
        return importlib.metadata.version("dspy")
    except importlib.metadata.PackageNotFoundError:
        return None


def _sort_key(version: str) -> tuple[tuple[int, int, int], int] | None:
    match = _VERSION.match(version)
    if match is None:
        return None
    release = tuple(int(part or 0) for part in match.group(1, 2, 3))
    final = 0 if _PRE_RELEASE.match(match.group(4)) else 1
    return (release[0], release[1], release[2]), final


def is_supported(version: str) -> bool:
    """Whether DSPy ``version`` is in ``SUPPORTED_DSPY``."""
    key = _sort_key(version)
    return key is not None and (_LOWEST, 1) <= key < (_END, 0)


def check_dspy_version(version: str | None = None) -> str:
    """The installed DSPy's version if a run supports it; else ``DspyVersionError`` naming
    the installed and the supported versions and the command that installs one."""
    installed = version if version is not None else installed_dspy_version()
    install = f"{sys.executable} -m pip install 'dspy[optuna]{SUPPORTED_DSPY}'"
    if installed is None:
        raise DspyVersionError(
            f"DSPy is not installed in this kernel's environment; dspex runs need "
            f"dspy{SUPPORTED_DSPY}",
            hint=f"install it into the pool's environment: {install}",
        )
    if not is_supported(installed):
        raise DspyVersionError(
            f"DSPy {installed} is installed in this kernel's environment, but dspex's MIPROv2 "
            f"search loop follows dspy{SUPPORTED_DSPY} only",
            hint=f"install a supported DSPy into the pool's environment: {install}",
        )
    return installed
