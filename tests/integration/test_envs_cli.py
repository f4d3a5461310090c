"""The real ``dspex env`` command: venv + pip, the runtime wheel, the private kernelspec.

One environment is created for the whole module (about 10-15 s with the runtime wheel
build); the tests after it inspect, use, rebuild and finally remove it. All of it happens
in a temporary DSPEX_HOME.
"""

from __future__ import annotations

import json
import os
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


def test_create_reports_progress_and_result(
    created: subprocess.CompletedProcess[str], env_dir: Path
) -> None:
    assert "installing packages" in created.stderr  # progress on stderr
    assert "Successfully installed" in created.stderr  # pip's own output streamed
    assert str(env_dir) in created.stdout


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


def test_rebuild_recreates_from_the_lock(home: Path, env_dir: Path) -> None:
    before = (env_dir / envs.LOCK_FILE).read_text()
    dspex(home, "env", "rebuild", NAME)
    record = json.loads((env_dir / envs.RECORD_FILE).read_text())
    assert "rebuilt" in record
    assert record["packages"] == ["six"]
    assert (env_dir / envs.LOCK_FILE).read_text() == before
    run_env_python(env_dir, "import six, ipykernel, dspex_jupyter.runtime")
    assert not [p for p in (home / "envs").iterdir() if p.name.startswith(".rebuild-")]


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
