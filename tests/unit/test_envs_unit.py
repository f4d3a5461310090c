"""Fast tests of dspex_jupyter.core.envs and the ``dspex`` CLI: no pip, no venv."""

from __future__ import annotations

import json
import os
import stat
import sys
import zipfile
from pathlib import Path

import pytest

from dspex_jupyter import __version__
from dspex_jupyter.cli import main
from dspex_jupyter.core import envs
from dspex_jupyter.core.errors import EnvError, EnvironmentNotFound, InvalidSpec


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private DSPEX_HOME; the real ~/.dspex is never touched."""
    path = tmp_path / "dspex-home"
    monkeypatch.setenv("DSPEX_HOME", str(path))
    monkeypatch.setenv("HOME", str(tmp_path / "user-home"))
    return path


def fake_env(home: Path, name: str, *, record: bool = True) -> Path:
    """An environment folder as create_environment leaves it, without running pip."""
    path = home / "envs" / name
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "python").touch(mode=0o755)
    if record:
        data = {
            "name": name,
            "installer": "pip",
            "packages": ["six"],
            "python": {"version": "3.11.7"},
            "lock": ["six==1.17.0"],
        }
        (path / envs.RECORD_FILE).write_text(json.dumps(data))
    return path


def fake_kernelspec(folder: Path, name: str) -> None:
    (folder / name).mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]}
    spec.update(display_name=name, language="python")
    (folder / name / "kernel.json").write_text(json.dumps(spec))


# -- places ----------------------------------------------------------------------------


def test_home_comes_from_dspex_home(home: Path) -> None:
    assert envs.dspex_home() == home
    assert envs.envs_dir() == home / "envs"
    assert envs.kernels_dir() == home / "share" / "jupyter" / "kernels"
    assert not home.exists(), "reading paths must not create anything"


def test_home_defaults_to_dot_dspex(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSPEX_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert envs.dspex_home() == tmp_path / ".dspex"


def test_relative_home_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DSPEX_HOME", "rel")
    assert envs.dspex_home() == tmp_path / "rel"


def test_kernel_name() -> None:
    assert envs.env_kernel_name("demo") == "dspex-demo"


def test_ensure_dir_creates_private_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c"
    envs._ensure_dir(target)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_kernel_spec_manager_sees_only_the_private_folder(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    global_dir = tmp_path / "global-jupyter"
    fake_kernelspec(global_dir / "kernels", "someone-elses")
    monkeypatch.setenv("JUPYTER_PATH", str(global_dir))
    fake_kernelspec(envs.kernels_dir(home), "dspex-demo")

    specs = envs.kernel_spec_manager(home).find_kernel_specs()

    assert set(specs) == {"dspex-demo"}  # no python3, no global kernels
    assert Path(specs["dspex-demo"]).parent == envs.kernels_dir(home)


# -- names -----------------------------------------------------------------------------

BAD_NAMES = ["", "../x", "a/b", "/abs", ".hidden", "-dash", "a b", "x" * 65]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_rejected_everywhere(home: Path, name: str) -> None:
    with pytest.raises(InvalidSpec, match="invalid environment name"):
        envs.create_environment(name)
    with pytest.raises(InvalidSpec):
        envs.get_environment(name)
    with pytest.raises(InvalidSpec):
        envs.remove_environment(name)
    with pytest.raises(InvalidSpec):
        envs.rebuild_environment(name)
    assert not (home / "envs").exists() or not any((home / "envs").iterdir())


# -- finding ---------------------------------------------------------------------------


def test_unknown_environment_says_how_to_create_it(home: Path) -> None:
    with pytest.raises(EnvironmentNotFound) as info:
        envs.get_environment("nope")
    assert "dspex env create nope" in info.value.hint
    assert isinstance(info.value, EnvError)


def test_finished_environment_is_found_and_listed(home: Path) -> None:
    path = fake_env(home, "demo")
    env = envs.get_environment("demo")
    assert env.path == path
    assert env.python == path / "bin" / "python"
    assert env.kernel_name == "dspex-demo"
    assert env.packages == ["six"]
    assert env.python_version == "3.11.7"
    assert [e.name for e in envs.list_environments()] == ["demo"]


def test_folder_without_record_is_broken(home: Path) -> None:
    fake_env(home, "ok")
    fake_env(home, "half", record=False)
    (home / "envs" / ".removing-old-1234").mkdir()  # trash is not an environment
    with pytest.raises(EnvironmentNotFound, match="not usable") as info:
        envs.get_environment("half")
    assert "dspex env remove half" in info.value.hint
    assert [e.name for e in envs.list_environments()] == ["ok"]
    assert set(envs.broken_environments()) == {"half"}


def test_folder_being_created_is_reported_as_such(home: Path) -> None:
    fake_env(home, "busy", record=False)
    with envs._env_lock("busy", home, "create"):
        assert "being created" in envs.broken_environments()["busy"]
    assert "did not finish" in envs.broken_environments()["busy"]


def test_list_of_missing_home_is_empty(home: Path) -> None:
    assert envs.list_environments() == []
    assert envs.broken_environments() == {}


# -- create: refusals that need no pip ---------------------------------------------------


def test_create_refuses_an_existing_environment(home: Path) -> None:
    fake_env(home, "demo")
    with pytest.raises(EnvError, match="already exists") as info:
        envs.create_environment("demo")
    assert "dspex env remove demo" in info.value.hint


def test_create_refuses_a_broken_leftover(home: Path) -> None:
    fake_env(home, "demo", record=False)
    with pytest.raises(EnvError, match="broken") as info:
        envs.create_environment("demo")
    assert "dspex env remove demo" in info.value.hint


def test_create_refuses_a_name_that_clashes_ignoring_case(home: Path) -> None:
    fake_env(home, "Demo")
    with pytest.raises(EnvError, match="ignore case"):
        envs.create_environment("demo")


def test_create_refuses_while_another_process_works_on_it(home: Path) -> None:
    # flock locks belong to an open file, so a second open in this process conflicts too.
    with envs._env_lock("demo", home, "create"):
        with pytest.raises(EnvError, match="another dspex process") as info:
            envs.create_environment("demo")
        assert str(os.getpid()) in str(info.value)
        # Names that differ only in case share a kernelspec, hence a lock.
        with pytest.raises(EnvError, match="another dspex process"):
            envs.create_environment("DEMO")
    assert not (home / "envs" / "demo").exists()


def test_unknown_python_version(home: Path) -> None:
    with pytest.raises(EnvError, match=r"python9\.99") as info:
        envs.create_environment("demo", python="9.99")
    assert "--python" in info.value.hint
    assert not (home / "envs" / "demo").exists()


def test_python_path_that_is_not_an_interpreter(home: Path, tmp_path: Path) -> None:
    with pytest.raises(EnvError, match="no Python interpreter"):
        envs.create_environment("demo", python=str(tmp_path / "missing" / "python"))
    script = tmp_path / "notpython"
    script.write_text("#!/bin/sh\necho nonsense\n")
    script.chmod(0o755)
    with pytest.raises(EnvError, match="does not work"):
        envs.create_environment("demo", python=str(script))
    assert not (home / "envs" / "demo").exists()


def test_uv_installer_needs_uv(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(EnvError, match="'uv' is not on PATH"):
        envs.create_environment("demo", installer="uv", python=sys.executable)


def test_unknown_installer(home: Path) -> None:
    with pytest.raises(EnvError, match="unknown installer"):
        envs.create_environment("demo", installer="conda")


def test_package_specs_are_not_options(home: Path) -> None:
    with pytest.raises(EnvError, match="must not be installer options"):
        envs.create_environment("demo", packages=["six", "--index-url=http://example.invalid"])


def test_missing_requirements_file(home: Path, tmp_path: Path) -> None:
    with pytest.raises(EnvError, match="requirements file"):
        envs.create_environment("demo", requirements=tmp_path / "nope.txt")


# -- remove / rebuild without pip ------------------------------------------------------


def test_remove_deletes_folder_and_kernelspec(home: Path) -> None:
    fake_env(home, "demo")
    fake_kernelspec(envs.kernels_dir(home), "dspex-demo")
    fake_kernelspec(envs.kernels_dir(home), "dspex-other")
    envs.remove_environment("demo")
    assert not (home / "envs" / "demo").exists()
    assert set(envs.kernel_spec_manager(home).find_kernel_specs()) == {"dspex-other"}
    assert [p.name for p in (home / "envs").iterdir() if not p.name.startswith(".")] == []
    assert not [p for p in (home / "envs").iterdir() if p.name.startswith(".removing")]


def test_remove_cleans_a_broken_environment(home: Path) -> None:
    fake_env(home, "half", record=False)
    envs.remove_environment("half")
    assert not (home / "envs" / "half").exists()


def test_remove_unknown(home: Path) -> None:
    with pytest.raises(EnvironmentNotFound, match="no dspex environment"):
        envs.remove_environment("nope")


def test_rebuild_unknown(home: Path) -> None:
    with pytest.raises(EnvironmentNotFound) as info:
        envs.rebuild_environment("nope")
    assert "dspex env create nope" in info.value.hint


def test_lock_gets_the_current_runtime_wheel() -> None:
    wheel = Path("/cache/dspex_jupyter-0.2.0-py3-none-any.whl")
    lock = [
        "six==1.17.0",
        "dspex-jupyter @ file:///old/dspex_jupyter-0.1.0-py3-none-any.whl",
        "Dspex_Jupyter==0.1.0",
        "dspex-jupyter-extra==1.0",
    ]
    assert envs._lock_with_wheel(lock, wheel) == [
        "six==1.17.0",
        "dspex-jupyter-extra==1.0",
        str(wheel),
    ]


# -- runtime wheel (pip replaced by a fake) ----------------------------------------------


def test_runtime_wheel_is_built_once_and_cached(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[list[str]] = []

    def fake_pip_wheel(argv, what, progress=None, **kwargs):  # type: ignore[no-untyped-def]
        argv = [str(a) for a in argv]
        builds.append(argv)
        out, src = Path(argv[argv.index("-w") + 1]), Path(argv[-1])
        assert (src / "dspex_jupyter" / "runtime" / "__init__.py").is_file()
        assert not list(src.rglob("__pycache__"))
        assert 'name = "dspex-jupyter"' in (src / "pyproject.toml").read_text()
        out.mkdir(parents=True)
        with zipfile.ZipFile(out / f"dspex_jupyter-{__version__}-py3-none-any.whl", "w") as zf:
            zf.writestr("dspex_jupyter/__init__.py", "")
        return ""

    monkeypatch.setattr(envs, "_run", fake_pip_wheel)
    first = envs.runtime_wheel(home)
    second = envs.runtime_wheel(home)
    assert first == second and first.is_file()
    assert len(builds) == 1
    assert first.parent.parent == home / "cache" / "runtime-wheels"
    assert len(first.parent.name) == 16
    leftovers = [p for p in first.parent.parent.iterdir() if p.name.startswith(".build-")]
    assert leftovers == []


# -- CLI -------------------------------------------------------------------------------


def test_cli_error_format_and_exit_status(home: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["env", "remove", "nope"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: no dspex environment named 'nope'")
    assert "hint: see the environments with: dspex env list" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_cli_invalid_name(home: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["env", "create", "../x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid environment name '../x'")
    assert "hint:" in err


def test_cli_unknown_python(home: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["env", "create", "demo", "--python", "9.99"]) == 2
    err = capsys.readouterr().err
    assert "error: no Python 9.99" in err and "python9.99" in err
    assert not (home / "envs" / "demo").exists()


def test_cli_home_option_in_either_place(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = tmp_path / "other-home"
    fake_env(other, "there")
    for argv in (
        ["--home", str(other), "env", "list", "--json"],
        ["env", "list", "--json", "--home", str(other)],
    ):
        assert main(argv) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [(r["name"], r["status"]) for r in rows] == [("there", "ok")]
    assert main(["env", "list", "--json"]) == 0  # DSPEX_HOME, which is empty
    assert json.loads(capsys.readouterr().out) == []


def test_cli_list_table_shows_broken(home: Path, capsys: pytest.CaptureFixture) -> None:
    fake_env(home, "demo")
    fake_env(home, "half", record=False)
    assert main(["env", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "PYTHON", "PATH", "PACKAGES"]
    assert lines[1].split()[:2] == ["demo", "3.11.7"] and lines[1].endswith("six")
    assert lines[2].split()[:2] == ["half", "broken"]


def test_cli_list_empty(home: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["env", "list"]) == 0
    assert "dspex env create NAME" in capsys.readouterr().out


def test_cli_version_and_usage(capsys: pytest.CaptureFixture) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dspex {__version__}"
    assert main([]) == 2  # a command is required
    assert main(["env", "frobnicate"]) == 2
