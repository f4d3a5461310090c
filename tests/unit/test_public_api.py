"""The public API: everything documented imports from ``dspex_jupyter``, every error is a
``DspexError`` with a hint, and the DSPy version check names both versions."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import dspex_jupyter
from dspex_jupyter.core.errors import DspexError, PoolStartError
from dspex_jupyter.runtime import dspy_support

ROOT = Path(__file__).resolve().parents[2]


def all_dspex_errors() -> set[type[DspexError]]:
    """Every DspexError subclass defined anywhere in the package (modules that import
    without optional extras)."""
    for info in pkgutil.walk_packages(dspex_jupyter.__path__, "dspex_jupyter."):
        if ".labextension" in info.name or info.name.startswith("dspex_jupyter.notebook"):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:
            continue
    found: set[type[DspexError]] = set()
    todo = [DspexError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return {c for c in found if c.__module__.startswith("dspex_jupyter")}


def test_all_names_resolve():
    for name in dspex_jupyter.__all__:
        assert getattr(dspex_jupyter, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = dspex_jupyter.Nope


def test_errors_named_in_the_readme_are_exported():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Errors", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([A-Z][A-Za-z]+)`", section)) - {"Decimal"}  # the stdlib's
    assert {"DspexError", "SerializationError", "ExchangeError", "CheckpointError"} <= named
    for name in sorted(named):
        assert name in dspex_jupyter.__all__, f"{name} is documented but not exported"
    assert "RecoveryPolicy" in dspex_jupyter.__all__


def test_every_exported_error_is_a_dspex_error_with_a_hint():
    exported = {
        name: getattr(dspex_jupyter, name)
        for name in dspex_jupyter.__all__
        if isinstance(getattr(dspex_jupyter, name), type)
        and issubclass(getattr(dspex_jupyter, name), BaseException)
    }
    assert len(exported) >= 25
    for name, cls in exported.items():
        assert issubclass(cls, DspexError), f"{name} is not a DspexError"
        assert isinstance(cls.hint, str) and cls.hint.strip(), f"{name} has no default hint"


def test_every_dspex_error_in_the_package_is_exported():
    for cls in all_dspex_errors():
        assert cls.hint.strip(), f"{cls.__qualname__} has no default hint"
        assert getattr(dspex_jupyter, cls.__name__, None) is cls, (
            f"{cls.__module__}.{cls.__qualname__} cannot be imported from dspex_jupyter"
        )


def test_shared_errors_keep_their_builtin_bases():
    # Code that caught the builtin types before they became DspexErrors still does.
    assert issubclass(dspex_jupyter.SerializationError, TypeError)
    assert issubclass(dspex_jupyter.ExchangeError, ValueError)
    assert issubclass(dspex_jupyter.RemoteSerializationError, dspex_jupyter.SerializationError)
    assert issubclass(dspex_jupyter.RemoteSerializationError, dspex_jupyter.RemoteError)


def test_a_raise_site_hint_replaces_the_default():
    assert PoolStartError("no kernel").hint == PoolStartError.hint
    assert PoolStartError("no kernel", hint="do this").hint == "do this"
    assert str(dspex_jupyter.CheckpointError("gone", "look elsewhere")).endswith(
        "hint: look elsewhere"
    )
    lost = dspex_jupyter.SessionKernelLost("died")
    assert lost.hint == dspex_jupyter.SessionKernelLost.hint != dspex_jupyter.KernelDied.hint


def runtime_imports(path: Path) -> set[str]:
    """Modules ``path`` imports at run time (``if TYPE_CHECKING:`` blocks left out)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    return {
        "." * node.level + (node.module or "")
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and id(node) not in typing_only
    }


def test_pool_and_session_do_not_import_each_other():
    # A pool makes sessions (pool -> session); a session no longer needs the pool module,
    # which it once imported for encode_function (now in protocol.py, beside the wire format).
    assert ".pool" not in runtime_imports(ROOT / "dspex_jupyter/core/session.py")
    from dspex_jupyter.protocol import encode_function

    assert encode_function("os:getpid", []) == {"ref": "os:getpid"}


@pytest.mark.parametrize("version", ["3.4.1", "3.4.2", "3.4.1.post1"])
def test_supported_dspy_versions_pass(version):
    assert dspy_support.check_dspy_version(version) == version


@pytest.mark.parametrize("version", ["3.0.0", "3.4.0", "3.4.1rc1", "3.5.0", "3.5.0b2", "4.1"])
def test_other_dspy_versions_are_refused_naming_both(version):
    with pytest.raises(dspy_support.DspyVersionError) as info:
        dspy_support.check_dspy_version(version)
    message = str(info.value)
    assert f"DSPy {version} is installed" in message
    assert dspy_support.SUPPORTED_DSPY in message
    assert "pip install 'dspy[optuna]>=3.4.1,<3.5'" in info.value.hint


def test_the_installed_version_is_what_is_checked(monkeypatch):
    monkeypatch.setattr(dspy_support, "installed_dspy_version", lambda: "3.1.2")
    with pytest.raises(dspy_support.DspyVersionError, match=r"DSPy 3\.1\.2 is installed"):
        dspy_support.check_dspy_version()
    monkeypatch.setattr(dspy_support, "installed_dspy_version", lambda: None)
    with pytest.raises(dspy_support.DspyVersionError, match="DSPy is not installed"):
        dspy_support.check_dspy_version()


def test_the_installed_dspy_is_supported_and_pinned_alike():
    assert dspy_support.check_dspy_version() == dspy_support.installed_dspy_version()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"dspy[optuna]{dspy_support.SUPPORTED_DSPY}"' in pyproject


def test_the_kernel_error_becomes_a_typed_client_error():
    from dspex_jupyter.core.errors import Where, classify

    try:
        dspy_support.check_dspy_version("3.0.0")
    except dspy_support.DspyVersionError as exc:
        from dspex_jupyter.protocol import error_from_exception

        error = error_from_exception("r1", exc)["error"]
    converted = classify(error, Where(pool="p"))
    assert isinstance(converted, dspex_jupyter.UnsupportedDspyVersion)
    assert "DSPy 3.0.0 is installed" in converted.remote_message
    assert "hint:" not in converted.remote_message  # the hint travels apart
    assert "dspy[optuna]>=3.4.1,<3.5" in converted.hint


def test_manager_members_notebook_code_uses_instead_of_privates():
    from dspex_jupyter.core.manager import live_managers

    spec = dspex_jupyter.PoolSpec("configured")
    manager = dspex_jupyter.PoolManager([spec])
    try:
        assert manager in live_managers() and not manager.closed
        assert manager.spec("configured") is spec and manager.spec("other") is None
        manager.forget_spec("configured")  # not running: its name is free again
        assert manager.spec("configured") is None
    finally:
        manager.shutdown()
    assert manager.closed and manager not in live_managers()
