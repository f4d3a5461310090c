"""Isolated Python environments for pool kernels: ``dspex env create|list|remove|rebuild``.

Each environment is a virtualenv under ``$DSPEX_HOME/envs/NAME`` with ipykernel and the
kernel-side runtime of dspex_jupyter installed, and a kernelspec ``dspex-NAME`` in a
private kernelspec folder (``$DSPEX_HOME/share/jupyter/kernels``), so the user's own
Jupyter kernel list never changes. What was installed is recorded in
``ENV/dspex-env.json`` (plus ``ENV/requirements.lock.txt``) so it can be rebuilt.

How a half-made environment is told apart from a finished one: a virtualenv records its
own absolute path (``pyvenv.cfg``, script shebangs), so building in a temporary folder and
renaming it into place would break it. Instead the environment is built at its final path
and the record file is written last, atomically (write + rename): a folder without a valid
record is incomplete. While a create, rebuild or remove runs it holds an exclusive
``flock`` on ``envs/.locks/NAME.lock``; a folder without a record whose lock is free was
left by a create that died, and is reported as broken. A failed create removes its
folder itself. Removal first renames the folder to a hidden trash name, so a removal cut
short never leaves something that looks like an environment.

Progress: a create or rebuild reports each of its steps (runtime wheel, virtual
environment, packages, kernelspec, lock file) to a callback as an ``EnvStep``, whose text is
one line for a person. By default that is a progress bar widget in a notebook and one line
per step on stderr elsewhere. What the subprocesses print (pip's output above all) goes to
``ENV/dspex-install.log`` (0600), not to the screen; after a failure the log is kept in
``envs/.logs/NAME.log``, which the error names.

POSIX only (``fcntl``), like the rest of the kernel-pool machinery.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from jupyter_client.kernelspec import KernelSpecManager

from .errors import EnvError, EnvironmentNotFound, InvalidSpec
from .spec import check_name

RECORD_FILE = "dspex-env.json"
LOCK_FILE = "requirements.lock.txt"
RECORD_FORMAT = 1
KERNEL_PREFIX = "dspex-"
INSTALLERS = ("pip", "uv")
MIN_PYTHON = (3, 10)
# Runtime dependencies of the kernel side; kept in step with pyproject.toml.
RUNTIME_DEPENDENCIES = (
    "ipykernel>=6.29",
    "jupyter_client>=8.6",
    "pyzmq>=25",
    "psutil>=5.9",
    "cloudpickle>=3.0",
)
INSTALL_LOG = "dspex-install.log"
FAILED_LOGS = ".logs"  # under envs/: hidden, so never taken for an environment
_TAIL_LINES = 12
_DIR_MODE = 0o700
# Variables that would let an environment's Python see packages outside it.
_LEAKY_VARS = ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__")


# --------------------------------------------------------------------------------------
# Progress

# The steps of a create or rebuild, in order, with what a person reads for each.
STEPS = {
    "runtime": "dspex runtime wheel",
    "venv": "virtual environment",
    "packages": "installing packages",
    "kernelspec": "registering the kernelspec",
    "lock": "recording the lock file",
}


@dataclass(frozen=True)
class EnvStep:
    """One progress report of a create or rebuild.

    ``step`` is a key of ``STEPS``, or "done" / "failed" at the end; ``update`` is True for
    a new count within the same step (pip collected another package), so a terminal
    prints one line per step and a widget moves its text."""

    env: str
    action: str  # "create" or "rebuild"
    step: str
    index: int  # 1..total for a step; total at the end
    total: int
    text: str
    count: int | None = None
    update: bool = False

    def __str__(self) -> str:
        if self.step in STEPS:
            return f"[{self.index}/{self.total}] {self.text}"
        return self.text


Progress = Callable[[EnvStep], None]
ProgressArg = Progress | Literal["auto"] | None


class TerminalProgress:
    """One line per step on a stream (stderr); on a terminal, a step's counts rewrite
    its line in place. A failure prints nothing: the error that follows says it all."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self._open_line = False

    def __call__(self, step: EnvStep) -> None:
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if step.update:
            if tty:
                self.stream.write(f"\r\x1b[K{step}")
                self.stream.flush()
                self._open_line = True
            return
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        if step.step != "failed":
            self.stream.write(f"{step}\n")
        self.stream.flush()


def _auto_progress() -> Progress:
    """A progress bar widget in a Jupyter kernel (when ipywidgets is installed), else one
    line per step on stderr. The widget lives in notebook/; it is imported only here, and
    only inside a kernel, so core keeps working without ipywidgets."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None and getattr(shell, "kernel", None) is not None:
            from ..notebook.env_progress import EnvProgressBar

            return EnvProgressBar.shown()
    except ImportError:
        pass
    return TerminalProgress()


class _Steps:
    """Reports one create's or rebuild's steps, and keeps its subprocesses' log."""

    def __init__(self, name: str, action: str, progress: ProgressArg) -> None:
        self.name, self.action = name, action
        self.progress = _auto_progress() if progress == "auto" else progress
        self.started = time.monotonic()
        self.step = ""
        self.log: IO[str] | None = None
        self.log_path: Path | None = None

    def _emit(self, step: str, index: int, text: str, **extra: Any) -> None:
        if self.progress is not None:
            self.progress(EnvStep(self.name, self.action, step, index, len(STEPS), text, **extra))

    def begin(self, step: str, detail: str = "") -> None:
        self.step = step
        text = f"{STEPS[step]} ({detail})" if detail else STEPS[step]
        self._emit(step, list(STEPS).index(step) + 1, text)

    def update(self, detail: str, count: int | None = None) -> None:
        """A new count or detail within the current step."""
        index = list(STEPS).index(self.step) + 1
        self._emit(self.step, index, f"{STEPS[self.step]}: {detail}", count=count, update=True)

    def finish(self, text: str) -> None:
        self._emit("done", len(STEPS), f"{text} in {time.monotonic() - self.started:.0f} s")

    def fail(self, exc: BaseException) -> None:
        first = str(exc.args[0]).splitlines()[0] if exc.args else type(exc).__name__
        if isinstance(exc, KeyboardInterrupt):
            first = "interrupted"
        self._emit("failed", list(STEPS).index(self.step) + 1 if self.step else 1, first)

    def open_log(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.log = os.fdopen(fd, "a", encoding="utf-8", errors="replace")
        self.log_path = path

    def close_log(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None

    def keep_failed_log(self, home: Path) -> Path | None:
        """Move the log out of an environment folder about to be removed; its new path."""
        self.close_log()
        if self.log_path is None or not self.log_path.exists():
            return None
        kept = _ensure_dir(envs_dir(home) / FAILED_LOGS) / f"{self.name}.log"
        os.replace(self.log_path, kept)
        self.log_path = kept
        return kept

    def run(
        self,
        argv: Sequence[str | Path],
        what: str,
        *,
        hint: str = "",
        on_line: Callable[[str], None] | None = None,
        rewrite: Callable[[str], str] | None = None,
    ) -> str:
        return _run(argv, what, hint=hint, log=self.log, on_line=on_line, rewrite=rewrite)


class _PipCounter:
    """Counts what pip (or uv) reports while installing, for the packages step's text."""

    COLLECTING = re.compile(r"^(Collecting|Processing|Requirement already satisfied:) ")
    INSTALLING = re.compile(r"^Installing collected packages: (.+)$")
    UV_COUNT = re.compile(r"^\s*(Resolved|Prepared|Installed) (\d+) packages?")

    def __init__(self, steps: _Steps) -> None:
        self.steps = steps
        self.collected = 0

    def __call__(self, line: str) -> None:
        if self.COLLECTING.match(line):
            self.collected += 1
            self.steps.update(f"{self.collected} collected", self.collected)
        elif match := self.INSTALLING.match(line):
            count = len(match.group(1).split(","))
            self.steps.update(f"installing {count} packages", count)
        elif match := self.UV_COUNT.match(line):
            count = int(match.group(2))
            self.steps.update(f"{match.group(1).lower()} {count} packages", count)


# --------------------------------------------------------------------------------------
# Places


def _as_home(home: str | Path | None) -> Path:
    return dspex_home() if home is None else Path(os.path.abspath(os.path.expanduser(home)))


def dspex_home() -> Path:
    """``$DSPEX_HOME`` or ``~/.dspex``, absolute (kernelspecs and venvs store absolute paths)."""
    raw = os.environ.get("DSPEX_HOME") or "~/.dspex"
    return Path(os.path.abspath(os.path.expanduser(raw)))


def envs_dir(home: Path | None = None) -> Path:
    """Where environments live: ``HOME/envs``."""
    return _as_home(home) / "envs"


def kernels_dir(home: Path | None = None) -> Path:
    """The private kernelspec folder; ``ipykernel install --prefix HOME`` writes here."""
    return _as_home(home) / "share" / "jupyter" / "kernels"


def kernel_spec_manager(home: Path | None = None) -> KernelSpecManager:
    """A KernelSpecManager that sees dspex's private kernelspecs and nothing else.

    ``ensure_native_kernel`` is off: otherwise jupyter_client would add the ``python3``
    kernel of the calling Python, which is not a dspex environment.
    """
    return KernelSpecManager(kernel_dirs=[str(kernels_dir(home))], ensure_native_kernel=False)


def env_kernel_name(name: str) -> str:
    """Kernelspec name of environment NAME (Jupyter matches kernel names ignoring case)."""
    return KERNEL_PREFIX + name


def _kernelspec_dir(name: str, home: Path) -> Path:
    # jupyter_client lowercases kernel names when it installs a kernelspec.
    return kernels_dir(home) / env_kernel_name(name).lower()


def _env_python(path: Path) -> Path:
    return path / "bin" / "python"


def _ensure_dir(path: Path) -> Path:
    """Create ``path`` and any missing parents with mode 0700 (existing folders are left
    as they are: the user may have chosen a shared home on purpose)."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=_DIR_MODE)
            os.chmod(folder, _DIR_MODE)  # mkdir's mode is filtered by the umask
    return path


# --------------------------------------------------------------------------------------
# Environments


@dataclass(frozen=True)
class Environment:
    """A finished dspex environment, as its record describes it."""

    name: str
    path: Path
    python: Path
    kernel_name: str
    record: dict[str, Any] = field(compare=False, hash=False, repr=False)

    @property
    def record_file(self) -> Path:
        return self.path / RECORD_FILE

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def python_version(self) -> str:
        return str(self.record.get("python", {}).get("version", ""))

    @property
    def packages(self) -> list[str]:
        return list(self.record.get("packages", []))


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _broken_reason(name: str, path: Path, home: Path, *, check_lock: bool = True) -> str:
    """Why a folder under envs/ is not a usable environment ('' when it is).

    ``check_lock=False`` when the caller holds NAME's lock itself.
    """
    if _read_record(path) is None:
        if check_lock and _lock_holder(name, home) is not None:
            return "it is being created or rebuilt by another dspex process"
        return "its creation did not finish (no record file)"
    if not _env_python(path).exists():
        return f"its Python {_env_python(path)} is missing"
    return ""


def get_environment(name: str, home: Path | None = None) -> Environment:
    """The environment called NAME; EnvironmentNotFound if there is none or it is broken."""
    check_name("environment", name)
    home = _as_home(home)
    path = envs_dir(home) / name
    if not path.is_dir():
        raise EnvironmentNotFound(
            f"no dspex environment named {name!r} in {envs_dir(home)}",
            hint=f"create it with: dspex env create {name}",
        )
    reason = _broken_reason(name, path, home)
    if reason:
        raise EnvironmentNotFound(
            f"dspex environment {name!r} at {path} is not usable: {reason}",
            hint=f"recreate it with: dspex env remove {name} && dspex env create {name}",
        )
    record = _read_record(path) or {}
    return Environment(
        name=name,
        path=path,
        python=_env_python(path),
        kernel_name=env_kernel_name(name),
        record=record,
    )


def _env_folders(home: Path) -> list[Path]:
    root = envs_dir(home)
    if not root.is_dir():
        return []
    # Hidden entries are locks and trash; invalid names are not ours.
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and _valid_name(p.name)
    )


def _valid_name(name: str) -> bool:
    try:
        check_name("environment", name)
    except InvalidSpec:
        return False
    return True


def list_environments(home: Path | None = None) -> list[Environment]:
    """Every usable environment, sorted by name (see ``broken_environments`` for the rest)."""
    home = _as_home(home)
    found = []
    for path in _env_folders(home):
        try:
            found.append(get_environment(path.name, home))
        except EnvironmentNotFound:
            continue
    return found


def broken_environments(home: Path | None = None) -> dict[str, str]:
    """Folders under envs/ that are not usable environments: name -> reason."""
    home = _as_home(home)
    broken = {}
    for path in _env_folders(home):
        reason = _broken_reason(path.name, path, home)
        if reason:
            broken[path.name] = reason
    return broken


# --------------------------------------------------------------------------------------
# Locks


def _lock_path(name: str, home: Path) -> Path:
    # Lowercased: names differing only in case share a kernelspec, so they share a lock.
    return envs_dir(home) / ".locks" / f"{name.lower()}.lock"


def _lock_holder(name: str, home: Path) -> str | None:
    """The pid (as text) holding NAME's lock, or None when it is free."""
    path = _lock_path(name, home)
    if not path.exists():
        return None
    try:
        with path.open("r+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return fh.read().strip() or "?"
            fcntl.flock(fh, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


@contextlib.contextmanager
def _env_lock(name: str, home: Path, action: str) -> Iterator[None]:
    """Hold NAME's lock for one create/rebuild/remove; refuse at once if another has it."""
    path = _lock_path(name, home)
    _ensure_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = fh.read().strip()
            if holder:
                raise EnvError(
                    f"cannot {action} environment {name!r}: another dspex process "
                    f"(pid {holder}) is working on it",
                    hint="wait for it to finish, then try again",
                ) from None
            # No pid written: a `list` probing the lock for an instant, or a holder
            # just taking or releasing it. Either lets go at once, so wait.
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------
# Subprocesses


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LEAKY_VARS}
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"  # so pip's lines reach ``progress`` as they come
    return env


def _run(
    argv: Sequence[str | Path],
    what: str,
    *,
    hint: str = "",
    env: dict[str, str] | None = None,
    log: IO[str] | None = None,
    on_line: Callable[[str], None] | None = None,
    rewrite: Callable[[str], str] | None = None,
) -> str:
    """Run a command; its output lines go to ``log`` (after ``rewrite``) and
    ``on_line``; return all output.

    On failure raise EnvError with the command and the tail of its output (the whole of
    it is in the log, which the caller names).
    """
    cmd = [str(a) for a in argv]
    lines: list[str] = []
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    if log is not None:
        log.write(f"$ {_quote(cmd)}\n")
        log.flush()
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=_clean_env() if env is None else env,
        )
    except OSError as exc:
        raise EnvError(f"{what} failed: cannot run {cmd[0]}: {exc}", hint=hint) from None
    assert proc.stdout is not None
    with proc:
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            if rewrite is not None:
                line = rewrite(line)
            lines.append(line)
            tail.append(line)
            if log is not None:
                log.write(line + "\n")
                log.flush()
            if on_line is not None:
                on_line(line)
    if proc.returncode != 0:
        shown = "\n".join(f"    {line}" for line in tail) or "    (no output)"
        raise EnvError(
            f"{what} failed (exit status {proc.returncode}).\n"
            f"  command: {_quote(cmd)}\n"
            f"  last lines of its output:\n{shown}",
            hint=hint,
        )
    return "\n".join(lines)


def _quote(cmd: Sequence[str]) -> str:
    import shlex

    return " ".join(shlex.quote(c) for c in cmd)


# --------------------------------------------------------------------------------------
# Interpreters


_PROBE = (
    "import json, platform, sys; print(json.dumps({"
    "'executable': sys.executable, "
    "'base_executable': getattr(sys, '_base_executable', sys.executable), "
    "'version': platform.python_version(), "
    "'implementation': platform.python_implementation(), "
    "'version_info': list(sys.version_info[:2])}))"
)


def _find_python(python: str | None) -> str:
    """``None`` -> this Python; ``"3.11"`` -> ``python3.11`` on PATH; else a path or a
    command name."""
    if python is None:
        return sys.executable
    wanted = python.strip()
    if not wanted:
        raise EnvError("--python is empty", hint="give a version such as 3.11 or a path")
    if re.fullmatch(r"\d+(\.\d+)*", wanted):
        command = f"python{wanted}"
        found = shutil.which(command)
        if not found:
            raise EnvError(
                f"no Python {wanted}: {command!r} is not on PATH",
                hint=f"install Python {wanted}, or pass --python /path/to/python",
            )
        return found
    if os.sep in wanted or wanted.startswith("~"):
        path = Path(wanted).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EnvError(
                f"no Python interpreter at {str(path)!r} (not an executable file)",
                hint="pass a version such as 3.11 or the path of a python executable",
            )
        return str(path.absolute())
    found = shutil.which(wanted)
    if not found:
        raise EnvError(
            f"no Python interpreter {wanted!r} on PATH",
            hint="pass a version such as 3.11 or the path of a python executable",
        )
    return found


def _interpreter(python: str | None) -> tuple[str, dict[str, Any]]:
    """Find and check the interpreter before anything slow happens."""
    executable = _find_python(python)
    return executable, _probe_python(executable)


def _probe_python(executable: str) -> dict[str, Any]:
    try:
        out = subprocess.run(
            [executable, "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=120,
            env=_clean_env(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnvError(
            f"cannot run the Python interpreter {executable}: {exc}",
            hint="pass --python with a working interpreter",
        ) from None
    info: dict[str, Any] | None = None
    if out.returncode == 0:
        with contextlib.suppress(ValueError):
            info = json.loads(out.stdout.strip().splitlines()[-1])
    if not isinstance(info, dict):
        detail = (out.stderr or out.stdout).strip()[-2000:]
        raise EnvError(
            f"the Python interpreter {executable} does not work: {detail or 'no output'}",
            hint="pass --python with a working interpreter",
        )
    if tuple(info["version_info"]) < MIN_PYTHON:
        need = ".".join(map(str, MIN_PYTHON))
        raise EnvError(
            f"{executable} is Python {info['version']}; dspex kernels need Python {need}+",
            hint=f"pass --python with Python {need} or newer",
        )
    return info


def _require_uv() -> str:
    uv = shutil.which("uv")
    if not uv:
        raise EnvError(
            "--installer uv was asked for, but 'uv' is not on PATH",
            hint="install uv, or use the default installer (--installer pip)",
        )
    return uv


# --------------------------------------------------------------------------------------
# Runtime wheel


_WHEEL_PYPROJECT = """\
[build-system]
requires = ["hatchling>=1.20"]
build-backend = "hatchling.build"

[project]
name = "dspex-jupyter"
version = "{version}"
description = "Kernel-side runtime of dspex-jupyter, built by dspex for its environments."
requires-python = ">=3.10"
dependencies = [{dependencies}]

[tool.hatch.build.targets.wheel]
packages = ["dspex_jupyter"]
"""
# labextension: the built JupyterLab extension (JS), which kernels never need.
_WHEEL_IGNORE = (
    "__pycache__",
    "*.pyc",
    "*.pyo",
    ".ipynb_checkpoints",
    "node_modules",
    "labextension",
)


def _package_dir() -> Path:
    import dspex_jupyter

    return Path(dspex_jupyter.__file__).resolve().parent


def _tree_hash(root: Path, extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(b"\0" + path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    _ensure_dir(path.parent)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached_wheel(folder: Path) -> Path | None:
    wheels = sorted(folder.glob("dspex_jupyter-*.whl")) if folder.is_dir() else []
    return wheels[0] if len(wheels) == 1 else None


def runtime_wheel(home: Path | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """A wheel of the dspex_jupyter package this Python imports, for environments.

    Built from the installed package's files (editable or not) so an environment's kernels
    run the same runtime as the client. Cached under ``HOME/cache/runtime-wheels/<hash>``
    by a hash of the files, and built under a file lock so concurrent creates share it.
    """
    import dspex_jupyter

    home = _as_home(home)
    cache = _ensure_dir(home / "cache" / "runtime-wheels")
    pyproject = _WHEEL_PYPROJECT.format(
        version=dspex_jupyter.__version__,
        dependencies=", ".join(json.dumps(d) for d in RUNTIME_DEPENDENCIES),
    )
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache) as tmp:
        build = Path(tmp) / "src"
        # Copy first and hash the copy, so the wheel matches its cache key even if the
        # package's files change meanwhile.
        shutil.copytree(
            _package_dir(), build / "dspex_jupyter", ignore=shutil.ignore_patterns(*_WHEEL_IGNORE)
        )
        key = _tree_hash(build / "dspex_jupyter", pyproject)[:16]
        target = cache / key
        wheel = _cached_wheel(target)
        if wheel is not None:
            return wheel
        with _file_lock(cache / ".lock"):
            wheel = _cached_wheel(target)
            if wheel is not None:
                return wheel
            (build / "pyproject.toml").write_text(pyproject, encoding="utf-8")
            out = Path(tmp) / "wheel"
            if progress is not None:
                progress(f"building it ({key})")
            _run(
                [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-input",
                 "--progress-bar", "off", "-w", out, build],
                "building the dspex-jupyter runtime wheel",
                hint=f"{sys.executable} needs pip, and pip must be able to fetch hatchling "
                "(check your pip configuration)",
                env=os.environ.copy(),
            )  # fmt: skip
            if _cached_wheel(out) is None:
                raise EnvError(
                    f"pip wheel produced no single dspex_jupyter wheel in {out}",
                    hint="report this as a dspex bug",
                )
            if target.exists():  # a leftover without a wheel
                shutil.rmtree(target)
            os.replace(out, target)
            os.chmod(target, _DIR_MODE)
            wheel = _cached_wheel(target)
            assert wheel is not None
            return wheel


# --------------------------------------------------------------------------------------
# Create / remove / rebuild


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _check_absent(name: str, home: Path) -> None:
    root = envs_dir(home)
    path = root / name
    if path.exists():
        broken = (
            _broken_reason(name, path, home, check_lock=False)
            if path.is_dir()
            else "it is not a folder"
        )
        state = f"exists but is broken ({broken})" if broken else "already exists"
        raise EnvError(
            f"environment {name!r} {state}: {path}",
            hint=f"remove it first with: dspex env remove {name}",
        )
    for other in _env_folders(home):
        if other.name.lower() == name.lower():
            raise EnvError(
                f"environment {other.name!r} already exists, and its kernel name clashes "
                f"with {name!r} (Jupyter kernel names ignore case)",
                hint=f"choose another name, or remove it first with: dspex env remove {other.name}",
            )


def _installer_cmd(installer: str, env_python: Path) -> list[str]:
    if installer == "uv":
        return [_require_uv(), "pip", "install", "--python", str(env_python)]
    return [str(env_python), "-m", "pip", "install", "--no-input", "--progress-bar", "off"]


def _freeze(installer: str, env_python: Path, steps: _Steps) -> list[str]:
    if installer == "uv":
        argv = [_require_uv(), "pip", "freeze", "--exclude-editable", "--python", str(env_python)]
    else:
        argv = [str(env_python), "-m", "pip", "freeze", "--exclude-editable"]
    out = steps.run(argv, "recording the installed packages (pip freeze)")
    return [line for line in out.splitlines() if line.strip() and not line.startswith("#")]


def _kernelspec_note(home: Path) -> Callable[[str], str]:
    """ipykernel warns that a kernelspec under ``--prefix`` "may not be found", since the
    prefix is not on Jupyter's own path. That is on purpose here (dspex reads its private
    folder itself), so the log says so instead of repeating the warning."""

    def rewrite(line: str) -> str:
        if "may not be found" in line:
            return (
                f"(ipykernel's note that {home} is not on Jupyter's kernel path is expected: "
                f"dspex finds its kernelspecs in {kernels_dir(home)})"
            )
        return line

    return rewrite


def _install_kernelspec(name: str, env_python: Path, home: Path, steps: _Steps) -> None:
    kernel = env_kernel_name(name)
    _ensure_dir(kernels_dir(home))
    steps.run(
        [env_python, "-m", "ipykernel", "install", "--prefix", home,
         "--name", kernel, "--display-name", f"dspex: {name}"],
        "registering the kernelspec",
        hint="the environment's ipykernel may be broken; remove and recreate it",
        rewrite=_kernelspec_note(home),
    )  # fmt: skip
    spec_dir = _kernelspec_dir(name, home)
    spec_file = spec_dir / "kernel.json"
    try:
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EnvError(f"ipykernel wrote no readable kernelspec at {spec_file}: {exc}") from None
    metadata = spec.setdefault("metadata", {})
    metadata["dspex"] = {"env": name}
    _write_json_atomic(spec_file, spec)
    os.chmod(spec_dir, _DIR_MODE)


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _build(
    name: str,
    home: Path,
    *,
    install_args: list[str],
    python: str | None,
    interpreter: tuple[str, dict[str, Any]],
    installer: str,
    record: dict[str, Any],
    steps: _Steps,
) -> Environment:
    """Make the environment at its final path; on any failure remove what was made.

    The caller holds NAME's lock and has checked the folder does not exist. The
    subprocesses' output goes to ``ENV/dspex-install.log``; after a failure that log is
    moved to ``envs/.logs/NAME.log`` and an EnvError names it.
    """
    path = envs_dir(home) / name
    env_python = _env_python(path)
    executable, info = interpreter
    path.mkdir(mode=_DIR_MODE)  # fails if another process made it: never build into theirs
    os.chmod(path, _DIR_MODE)
    try:
        steps.open_log(path / INSTALL_LOG)
        steps.begin("venv", f"Python {info['version']}")
        if installer == "uv":
            steps.run(
                [_require_uv(), "venv", "--python", executable, path],
                "creating the virtual environment (uv venv)",
            )
        else:
            steps.run(
                [executable, "-m", "venv", path],
                "creating the virtual environment (python -m venv)",
                hint=f"{executable} needs the venv module (on Debian: apt install python3-venv)",
            )
        os.chmod(path, _DIR_MODE)
        steps.begin("packages", installer)
        cmd = _installer_cmd(installer, env_python)
        steps.run(
            [*cmd, *install_args],
            f"installing packages into environment {name!r}",
            hint="check the package names and versions, and that your package index "
            "(pip configuration) can serve them",
            on_line=_PipCounter(steps),
        )
        steps.begin("kernelspec", env_kernel_name(name))
        _install_kernelspec(name, env_python, home, steps)
        steps.begin("lock", LOCK_FILE)
        lock = _freeze(installer, env_python, steps)
        (path / LOCK_FILE).write_text("\n".join(lock) + "\n", encoding="utf-8")
        steps.close_log()
        record = {
            **record,
            "format": RECORD_FORMAT,
            "name": name,
            "kernel_name": env_kernel_name(name),
            "installer": installer,
            "python": {
                "requested": python,
                "executable": executable,
                "base_executable": info["base_executable"],
                "version": info["version"],
                "implementation": info["implementation"],
            },
            "env_python": str(env_python),
            "lock": lock,
        }
        # Written last: its presence is what makes the folder a finished environment.
        _write_json_atomic(path / RECORD_FILE, record)
    except BaseException as exc:
        kept = steps.keep_failed_log(home)
        _remove_tree(path)
        _remove_tree(_kernelspec_dir(name, home))
        if isinstance(exc, EnvError) and kept is not None:
            raise EnvError(
                f"{exc.args[0]}\n  the whole output: {kept}",
                hint=f"{exc.hint}; the whole output is in {kept}",
            ) from None
        raise
    return get_environment(name, home)


def create_environment(
    name: str,
    packages: Sequence[str] = (),
    requirements: str | Path | None = None,
    python: str | None = None,
    installer: str = "pip",
    home: Path | None = None,
    progress: ProgressArg = "auto",
) -> Environment:
    """Create environment NAME with ipykernel, the dspex runtime and ``packages``.

    One installer call installs everything, so the resolver sees all constraints at once.
    A failed create leaves nothing behind but its log (named in the error). ``progress``
    gets each step as an ``EnvStep``: "auto" shows a progress bar in a notebook and one
    line per step on stderr elsewhere; None shows nothing.
    """
    check_name("environment", name)
    if installer not in INSTALLERS:
        raise EnvError(
            f"unknown installer {installer!r}", hint=f"use one of: {', '.join(INSTALLERS)}"
        )
    if isinstance(packages, str):
        packages = [packages]
    packages = [p.strip() for p in packages if p and p.strip()]
    options = [p for p in packages if p.startswith("-")]
    if options:
        raise EnvError(
            f"package specs must not be installer options: {' '.join(options)}",
            hint="put installer options in a requirements file and pass it with --requirements",
        )
    requirements_record = None
    if requirements is not None:
        req_path = Path(requirements).expanduser()
        try:
            content = req_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise EnvError(
                f"cannot read the requirements file {str(req_path)!r}: {exc.strerror or exc}",
                hint="pass the path of an existing requirements.txt",
            ) from None
        requirements_record = {"file": str(req_path.absolute()), "content": content}
    home = _as_home(home)
    _ensure_dir(envs_dir(home))
    with _env_lock(name, home, "create"):
        _check_absent(name, home)
        interpreter = _interpreter(python)
        if installer == "uv":
            _require_uv()
        steps = _Steps(name, "create", progress)
        try:
            env = _create(name, home, packages, requirements_record, python, interpreter,
                          installer, steps)  # fmt: skip
        except BaseException as exc:
            steps.fail(exc)
            raise
    steps.finish(f"created environment {name!r} ({len(env.record.get('lock', []))} packages)")
    return env


def _create(
    name: str,
    home: Path,
    packages: list[str],
    requirements_record: dict[str, Any] | None,
    python: str | None,
    interpreter: tuple[str, dict[str, Any]],
    installer: str,
    steps: _Steps,
) -> Environment:
    steps.begin("runtime")
    wheel = runtime_wheel(home, steps.update)
    install_args = ["ipykernel", str(wheel), *packages]
    if requirements_record is not None:
        install_args += ["-r", requirements_record["file"]]
    record = {
        "created": _now(),
        "dspex_jupyter_version": _dspex_version(),
        "packages": packages,
        "requirements": requirements_record,
        "runtime_wheel": {"file": wheel.name, "sha256": _file_sha256(wheel)},
    }
    return _build(
        name,
        home,
        install_args=install_args,
        python=python,
        interpreter=interpreter,
        installer=installer,
        record=record,
        steps=steps,
    )


def _dspex_version() -> str:
    import dspex_jupyter

    return str(dspex_jupyter.__version__)


def remove_environment(name: str, home: Path | None = None) -> None:
    """Remove environment NAME's folder and its kernelspec (broken ones too)."""
    check_name("environment", name)
    home = _as_home(home)
    path = envs_dir(home) / name
    spec_dir = _kernelspec_dir(name, home)
    if not path.exists() and not spec_dir.exists():
        raise EnvironmentNotFound(
            f"no dspex environment named {name!r} in {envs_dir(home)}",
            hint="see the environments with: dspex env list",
        )
    with _env_lock(name, home, "remove"):
        # The kernelspec goes first: a pool must never find a kernel whose Python is gone.
        _remove_tree(spec_dir)
        if path.exists():
            trash = path.with_name(f".removing-{name}-{uuid.uuid4().hex[:8]}")
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            if trash.exists():
                raise EnvError(
                    f"environment {name!r} was removed, but its files in {trash} "
                    "could not all be deleted",
                    hint=f"delete {trash} by hand",
                )


_REQ_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _normalise(project: str) -> str:
    return re.sub(r"[-_.]+", "-", project).lower()


def _lock_with_wheel(lock: Sequence[str], wheel: Path) -> list[str]:
    """The lock with its dspex-jupyter line pointing at the current runtime wheel."""
    lines = []
    for line in lock:
        match = _REQ_NAME.match(line)
        if match and _normalise(match.group(1)) == "dspex-jupyter":
            continue
        lines.append(line)
    lines.append(str(wheel))
    return lines


def rebuild_environment(
    name: str, home: Path | None = None, progress: ProgressArg = "auto"
) -> Environment:
    """Recreate environment NAME from its lock (exact versions), with the current runtime.

    The old environment is moved aside and restored if the rebuild fails. ``progress`` as
    for ``create_environment``.
    """
    check_name("environment", name)
    home = _as_home(home)
    path = envs_dir(home) / name
    with _env_lock(name, home, "rebuild"):
        old = _read_record(path) if path.is_dir() else None
        if old is None or not isinstance(old.get("lock"), list):
            if not path.exists():
                raise EnvironmentNotFound(
                    f"no dspex environment named {name!r} in {envs_dir(home)}",
                    hint=f"create it with: dspex env create {name}",
                )
            raise EnvError(
                f"environment {name!r} has no usable record to rebuild from",
                hint=f"dspex env remove {name}, then dspex env create {name}",
            )
        installer = str(old.get("installer", "pip"))
        python = _rebuild_python(old)
        interpreter = _interpreter(python)
        if installer == "uv":
            _require_uv()
        steps = _Steps(name, "rebuild", progress)
        try:
            steps.begin("runtime")
            wheel = runtime_wheel(home, steps.update)
        except BaseException as exc:
            steps.fail(exc)
            raise
        aside = path.with_name(f".rebuild-{name}-{uuid.uuid4().hex[:8]}")
        spec_dir = _kernelspec_dir(name, home)
        spec_aside = aside.with_name(aside.name + ".kernelspec")
        os.replace(path, aside)
        if spec_dir.exists():
            os.replace(spec_dir, spec_aside)
        try:
            lock_file = aside / ".rebuild-requirements.txt"
            lock_file.write_text(
                "\n".join(_lock_with_wheel(old["lock"], wheel)) + "\n", encoding="utf-8"
            )
            record = {
                key: old.get(key) for key in ("created", "packages", "requirements") if key in old
            }
            record.update(
                rebuilt=_now(),
                dspex_jupyter_version=_dspex_version(),
                runtime_wheel={"file": wheel.name, "sha256": _file_sha256(wheel)},
            )
            env = _build(
                name,
                home,
                install_args=["-r", str(lock_file)],
                python=python,
                interpreter=interpreter,
                installer=installer,
                record=record,
                steps=steps,
            )
        except BaseException as exc:
            steps.fail(exc)
            _remove_tree(path)
            os.replace(aside, path)
            if spec_aside.exists():
                _remove_tree(spec_dir)
                os.replace(spec_aside, spec_dir)
            raise
        shutil.rmtree(aside, ignore_errors=True)
        _remove_tree(spec_aside)
    steps.finish(f"rebuilt environment {name!r} ({len(env.record.get('lock', []))} packages)")
    return env


def _rebuild_python(record: dict[str, Any]) -> str:
    """The interpreter the environment was made with, or the same minor version."""
    info = record.get("python") or {}
    for key in ("executable", "base_executable"):
        candidate = info.get(key)
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    version = str(info.get("version", ""))
    minor = ".".join(version.split(".")[:2])
    if minor:
        return minor
    raise EnvError(
        "the environment's record does not say which Python it used",
        hint="remove it and create it again with --python",
    )


def refresh_runtime(
    name: str, home: Path | None = None, progress: ProgressArg = "auto"
) -> Environment:
    """Install this dspex-jupyter's runtime into environment NAME, in place, and record it.

    What ``rebuild_environment`` does when only the runtime changed, in seconds instead of
    minutes: the other packages stay as they are (a rebuild reinstalls every one of them
    from the lock, which is what to do when those changed). A failure leaves the old
    runtime uninstalled at worst; its error names the log, and a rebuild repairs it.
    """
    env = get_environment(name, home)
    home = _as_home(home)
    with _env_lock(name, home, "refresh"):
        steps = _Steps(name, "refresh", progress)
        try:
            steps.begin("runtime")
            wheel = runtime_wheel(home, steps.update)
            steps.open_log(env.path / INSTALL_LOG)
            steps.begin("packages", "the dspex runtime only")
            pip = [*_installer_cmd(str(env.record.get("installer", "pip")), env.python)]
            hint = f"rebuild it: dspex env rebuild {name}"
            steps.run([*pip, "--force-reinstall", "--no-deps", wheel], "installing the runtime",
                      hint=hint)  # fmt: skip
            # Its dependencies, should the new runtime need more than the old one did.
            steps.run([*pip, wheel], "installing the runtime's dependencies", hint=hint)
            steps.begin("lock", LOCK_FILE)
            lock = _freeze(str(env.record.get("installer", "pip")), env.python, steps)
            (env.path / LOCK_FILE).write_text("\n".join(lock) + "\n", encoding="utf-8")
            steps.close_log()
            record = {
                **env.record,
                "lock": lock,
                "refreshed": _now(),
                "dspex_jupyter_version": _dspex_version(),
                "runtime_wheel": {"file": wheel.name, "sha256": _file_sha256(wheel)},
            }
            _write_json_atomic(env.record_file, record)
        except BaseException as exc:
            steps.close_log()
            steps.fail(exc)
            if isinstance(exc, EnvError) and steps.log_path is not None:
                raise EnvError(
                    f"{exc.args[0]}\n  the whole output: {steps.log_path}",
                    hint=f"{exc.hint}; the whole output is in {steps.log_path}",
                ) from None
            raise
    steps.finish(f"refreshed the dspex runtime of environment {name!r}")
    return get_environment(name, home)
