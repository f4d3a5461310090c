"""The real ``dspex env`` command: venv + pip, the runtime wheel, the private kernelspec.

One environment is created for the whole module (about 10-15 s with the runtime wheel
build); the tests after it inspect, use, rebuild and finally remove it. All of it happens
in a temporary DSPEX_HOME.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

import dspex_jupyter
from dspex_jupyter.core import envs

pytestmark = [pytest.mark.envs, pytest.mark.integration]

NAME = "cli-demo"
# Where the test process imports dspex_jupyter from; the CLI subprocess must use the same.
SOURCE_ROOT = Path(dspex_jupyter.__file__).resolve().parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for subprocesses, without anything that leaks the host's packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def dspex(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = clean_env(DSPEX_HOME=str(home), PYTHONPATH=str(SOURCE_ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "dspex_jupyter.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"dspex {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One DSPEX_HOME for the module, so the runtime wheel is built once and shared."""
    return tmp_path_factory.mktemp("dspex-envs") / "home"


@pytest.fixture(scope="module")
def created(home: Path) -> subprocess.CompletedProcess[str]:
    return dspex(home, "env", "create", NAME, "--package", "six")


@pytest.fixture(scope="module")
def env_dir(home: Path, created: subprocess.CompletedProcess[str]) -> Path:
    return home / "envs" / NAME


def run_env_python(env_dir: Path, code: str) -> str:
    proc = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=env_dir,  # not the repository root: it must not be importable from here
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_create_reports_one_line_per_step_and_logs_pip(
    created: subprocess.CompletedProcess[str], env_dir: Path
) -> None:
    lines = created.stderr.splitlines()
    assert lines[:5] == [  # progress on stderr, one line per step (not a terminal: no counts)
        "[1/5] dspex runtime wheel",
        f"[2/5] virtual environment (Python {platform.python_version()})",
        "[3/5] installing packages (pip)",
        f"[4/5] registering the kernelspec ({envs.env_kernel_name(NAME)})",
        f"[5/5] recording the lock file ({envs.LOCK_FILE})",
    ]
    assert re.fullmatch(rf"created environment '{NAME}' \(\d+ packages\) in \d+ s", lines[5])
    assert len(lines) == 6, created.stderr  # nothing else: pip's output is in the log
    assert "kernelspec may not be found" not in created.stderr + created.stdout
    assert str(env_dir) in created.stdout
    log = env_dir / envs.INSTALL_LOG
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    text = log.read_text()
    assert "Successfully installed" in text and "six" in text  # pip's own output
    assert "may not be found" not in text and "is expected" in text  # the note instead


def test_terminal_progress_counts_pip_lines_in_place() -> None:
    """On a terminal the packages step's line is rewritten with pip's count."""

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    progress = envs.TerminalProgress(out)
    steps = envs._Steps("demo", "create", progress)
    steps.begin("packages", "pip")
    counter = envs._PipCounter(steps)
    for line in ("Collecting six", "Processing ./x.whl", "Installing collected packages: six, x"):
        counter(line)
    steps.begin("kernelspec", "dspex-demo")
    assert out.getvalue().split("\n") == [
        "[3/5] installing packages (pip)",
        "\r\x1b[K[3/5] installing packages: 1 collected"
        "\r\x1b[K[3/5] installing packages: 2 collected"
        "\r\x1b[K[3/5] installing packages: installing 2 packages",
        "[4/5] registering the kernelspec (dspex-demo)",
        "",
    ]


def test_environment_has_its_packages_and_is_isolated(env_dir: Path) -> None:
    out = run_env_python(
        env_dir,
        "import sys, six, ipykernel, dspex_jupyter.runtime, dspex_jupyter;"
        "print(sys.prefix); print(dspex_jupyter.__file__)",
    )
    prefix, package_file = out.splitlines()
    assert Path(prefix) == env_dir
    assert Path(prefix) != Path(sys.prefix)
    assert Path(package_file).is_relative_to(env_dir), "runtime must come from the env"


def test_kernelspec_is_private(home: Path, env_dir: Path) -> None:
    kernel = envs.env_kernel_name(NAME)
    spec = envs.kernel_spec_manager(home).get_kernel_spec(kernel)
    assert spec.argv[0] == str(env_dir / "bin" / "python")
    assert spec.metadata["dspex"] == {"env": NAME}
    assert spec.display_name == f"dspex: {NAME}"
    assert Path(spec.resource_dir) == envs.kernels_dir(home) / kernel
    # The user's own kernel list (what `jupyter kernelspec list` shows) has not changed.
    assert kernel not in KernelSpecManager().find_kernel_specs()


def test_record_and_lock(env_dir: Path) -> None:
    record = json.loads((env_dir / envs.RECORD_FILE).read_text())
    assert record["name"] == NAME
    assert record["packages"] == ["six"]
    assert record["installer"] == "pip"
    assert record["python"]["version"] == ".".join(map(str, sys.version_info[:2])) + (
        f".{sys.version_info[2]}"
    )
    assert record["runtime_wheel"]["file"].startswith("dspex_jupyter-")
    assert len(record["runtime_wheel"]["sha256"]) == 64
    lock = (env_dir / envs.LOCK_FILE).read_text().splitlines()
    assert lock == record["lock"]
    assert any(line.lower().startswith("six==") for line in lock)
    assert any(line.lower().startswith("ipykernel==") for line in lock)


def test_folders_are_private(home: Path, env_dir: Path) -> None:
    kernel_dir = envs.kernels_dir(home) / envs.env_kernel_name(NAME)
    for folder in (home, home / "envs", env_dir, envs.kernels_dir(home), kernel_dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_list_json_shows_it(home: Path, env_dir: Path) -> None:
    rows = json.loads(dspex(home, "env", "list", "--json").stdout)
    assert [row["name"] for row in rows] == [NAME]
    row = rows[0]
    assert row["status"] == "ok"
    assert row["path"] == str(env_dir)
    assert row["packages"] == ["six"]
    assert row["kernel_name"] == envs.env_kernel_name(NAME)
    table = dspex(home, "--home", str(home), "env", "list").stdout
    assert NAME in table and "six" in table


def test_kernel_starts_from_the_environment(home: Path, env_dir: Path) -> None:
    km = KernelManager(
        kernel_name=envs.env_kernel_name(NAME), kernel_spec_manager=envs.kernel_spec_manager(home)
    )
    km.start_kernel(env=clean_env())
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        printed: list[str] = []
        reply = kc.execute_interactive(
            "import sys, dspex_jupyter.runtime; print(sys.prefix)",
            timeout=30,
            output_hook=lambda msg: printed.append(msg["content"].get("text", "")),
        )
        assert reply["content"]["status"] == "ok"
        assert Path("".join(printed).strip()) == env_dir
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_failed_create_leaves_nothing(home: Path, env_dir: Path) -> None:
    proc = dspex(
        home, "env", "create", "broken", "--quiet",
        "--package", "this-package-does-not-exist-dspex==0",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    # --quiet: stderr holds only the error, which quotes pip's own complaint.
    assert proc.stderr.startswith("error: installing packages into environment 'broken' failed")
    assert "this-package-does-not-exist-dspex" in proc.stderr
    assert "No matching distribution" in proc.stderr
    assert "hint:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (home / "envs" / "broken").exists()
    assert not (envs.kernels_dir(home) / "dspex-broken").exists()
    # The runtime wheel built for the first create was reused, not built again.
    assert len(list((home / "cache" / "runtime-wheels").glob("*/*.whl"))) == 1


def test_failed_install_names_its_log(home: Path, env_dir: Path, tmp_path: Path) -> None:
    """A package that cannot be installed (a local path that does not exist: no network
    needed): the error quotes pip and names the log that holds all of its output."""
    missing = tmp_path / "no-such-package"
    proc = dspex(home, "env", "create", "badpath", "--package", str(missing), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[2] == "[3/5] installing packages (pip)"  # progress up to the failing step
    error = "\n".join(lines[3:])
    assert error.startswith("error: installing packages into environment 'badpath' failed")
    assert f"'{missing}' does not exist" in error  # pip's own words
    log = home / "envs" / ".logs" / "badpath.log"
    assert f"the whole output: {log}" in error and f"the whole output is in {log}" in error
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert str(missing) in log.read_text()
    assert not (home / "envs" / "badpath").exists()
    assert [env["name"] for env in json.loads(dspex(home, "env", "list", "--json").stdout)] == [
        NAME
    ]  # the kept log is not taken for an environment


def test_rebuild_recreates_from_the_lock(home: Path, env_dir: Path) -> None:
    before = (env_dir / envs.LOCK_FILE).read_text()
    dspex(home, "env", "rebuild", NAME)
    record = json.loads((env_dir / envs.RECORD_FILE).read_text())
    assert "rebuilt" in record
    assert record["packages"] == ["six"]
    assert (env_dir / envs.LOCK_FILE).read_text() == before
    run_env_python(env_dir, "import six, ipykernel, dspex_jupyter.runtime")
    assert not [p for p in (home / "envs").iterdir() if p.name.startswith(".rebuild-")]


def test_refresh_runtime_installs_the_runtime_in_place(home: Path, env_dir: Path) -> None:
    """Only the runtime is reinstalled (what the tutorials do when dspex-jupyter changed):
    the other packages and the folder stay."""
    lock_before = (env_dir / envs.LOCK_FILE).read_text().splitlines()
    python_before = (env_dir / "bin" / "python").stat().st_ino
    steps: list[envs.EnvStep] = []
    envs.refresh_runtime(NAME, home, progress=steps.append)
    assert [(s.step, s.action) for s in steps if not s.update] == [
        ("runtime", "refresh"),
        ("packages", "refresh"),
        ("lock", "refresh"),
        ("done", "refresh"),
    ]
    record = json.loads((env_dir / envs.RECORD_FILE).read_text())
    sha256 = record["runtime_wheel"]["sha256"]
    assert "refreshed" in record and f"sha256={sha256}" in "\n".join(record["lock"])
    cached = (home / "cache" / "runtime-wheels").glob("*/*.whl")
    assert sha256 in {envs._file_sha256(wheel) for wheel in cached}  # the wheel it installed
    lock = (env_dir / envs.LOCK_FILE).read_text().splitlines()
    assert [x for x in lock if "dspex" not in x] == [x for x in lock_before if "dspex" not in x]
    assert (env_dir / "bin" / "python").stat().st_ino == python_before  # not recreated
    assert "--force-reinstall --no-deps" in (env_dir / envs.INSTALL_LOG).read_text()
    run_env_python(env_dir, "import six, dspex_jupyter.runtime")


FAKE_UV = """\
#!{python}
# Stands in for uv (not installed here, and it would not use pip's local configuration):
# logs each call, then does the same with venv and pip, which uv's commands mirror.
import os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_UV_LOG"], "a") as log:
    print(" ".join(args), file=log)
python = args[args.index("--python") + 1]
rest = [a for i, a in enumerate(args) if a != "--python" and args[i - 1] != "--python"]
if rest[0] == "venv":
    os.execv(python, [python, "-m", "venv", rest[-1]])
if rest[:1] == ["pip"]:
    os.execv(python, [python, "-m", "pip", *rest[1:]])
sys.exit("fake uv: unexpected arguments %r" % args)
"""


def test_uv_installer_with_requirements(home: Path, env_dir: Path, tmp_path: Path) -> None:
    """--installer uv calls uv venv / uv pip install / uv pip freeze with the env's Python;
    --requirements is installed and its content recorded."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "uv").write_text(FAKE_UV.format(python=sys.executable))
    (bin_dir / "uv").chmod(0o755)
    log = tmp_path / "uv.log"
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("six\n")
    env = clean_env(
        DSPEX_HOME=str(home),
        PYTHONPATH=str(SOURCE_ROOT),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_UV_LOG=str(log),
    )
    name = "uv-demo"
    argv = ["env", "create", name, "--installer", "uv", "-r", str(requirements)]
    argv += ["--python", sys.executable]
    proc = subprocess.run(
        [sys.executable, "-m", "dspex_jupyter.cli", *argv],
        capture_output=True, text=True, env=env, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    path = home / "envs" / name
    python = str(path / "bin" / "python")
    calls = log.read_text().splitlines()
    assert calls[0] == f"venv --python {sys.executable} {path}"
    assert calls[1].startswith(f"pip install --python {python} ipykernel ")
    assert calls[1].endswith(f"-r {requirements}")
    assert calls[2] == f"pip freeze --exclude-editable --python {python}"
    record = json.loads((path / envs.RECORD_FILE).read_text())
    assert record["installer"] == "uv"
    assert record["requirements"] == {"file": str(requirements), "content": "six\n"}
    assert record["python"]["requested"] == sys.executable
    run_env_python(path, "import six, dspex_jupyter.runtime")
    envs.remove_environment(name, home)
    assert not path.exists()


def test_remove_deletes_folder_and_kernelspec(home: Path, env_dir: Path) -> None:
    """Last in the module: it removes the shared environment."""
    proc = dspex(home, "env", "remove", NAME)
    assert NAME in proc.stdout
    assert not env_dir.exists()
    assert envs.env_kernel_name(NAME) not in envs.kernel_spec_manager(home).find_kernel_specs()
    assert json.loads(dspex(home, "env", "list", "--json").stdout) == []
    again = dspex(home, "env", "remove", NAME, check=False)
    assert again.returncode == 2 and again.stderr.startswith("error: no dspex environment")
