"""The signing key, signatures and the trusted-module rules, without kernels."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from dspex_jupyter import PoolSpec
from dspex_jupyter.checkpoint import (
    ForbiddenReferenceError,
    import_reference,
    trusted_module_roots,
    write_json_atomic,
)
from dspex_jupyter.core.errors import TrustError
from dspex_jupyter.trust import (
    key_path,
    load_key,
    sign_checkpoint,
    verify_checkpoint,
    verify_manifest,
    write_signed_manifest,
)


def test_key_is_made_once_private_and_kept(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("DSPEX_HOME", str(home))
    key = load_key()
    assert len(key) == 32 and load_key() == key
    assert stat.S_IMODE(key_path().stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert load_key(tmp_path / "other") != key  # another home, another user


def test_a_key_others_can_read_or_a_damaged_key_is_refused(tmp_path):
    load_key(tmp_path)
    os.chmod(key_path(tmp_path), 0o644)
    with pytest.raises(TrustError, match="can be read by other users") as info:
        load_key(tmp_path)
    assert "chmod 600" in info.value.hint
    os.chmod(key_path(tmp_path), 0o600)
    key_path(tmp_path).write_text("short")
    with pytest.raises(TrustError, match="is damaged"):
        load_key(tmp_path)


def test_signatures_catch_any_change_and_any_other_key(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    write_json_atomic(folder / "run.json", {"run_id": "r", "metric": {"kind": "ref"}})
    write_json_atomic(folder / "data.json", {"trainset": []})
    home = tmp_path / "me"
    assert "is not signed" in verify_checkpoint(folder, home=home).reason
    sign_checkpoint(folder, home=home)
    assert verify_checkpoint(folder, home=home).trusted
    assert not verify_checkpoint(folder, home=tmp_path / "you").trusted
    write_json_atomic(folder / "data.json", {"trainset": [1]})  # a valid checksum, new body
    verdict = verify_checkpoint(folder, home=home)
    assert not verdict.trusted and "data.json is not signed by this user's" in verdict.reason


def test_manifest_signature(tmp_path):
    path = tmp_path / "m.json"
    write_signed_manifest(path, {"pools": []}, home=tmp_path / "me")
    assert verify_manifest(path, home=tmp_path / "me")[1].trusted
    assert not verify_manifest(path, home=tmp_path / "you")[1].trusted


def test_trusted_modules_come_from_defaults_argument_and_setting():
    env = {"DSPEX_TRUSTED_MODULES": "a.b, c  d"}
    assert trusted_module_roots(["x"], env) == (
        "dspy",
        "dspex_jupyter.testing",
        "x",
        "a.b",
        "c",
        "d",
    )
    assert trusted_module_roots("x", {}) == ("dspy", "dspex_jupyter.testing", "x")
    with pytest.raises(ForbiddenReferenceError, match="'' is not a module name"):
        trusted_module_roots([""], {})


def test_reference_checked_before_import(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "dspex_unit_probe.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef f():\n    return 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    roots = trusted_module_roots((), {})
    with pytest.raises(ForbiddenReferenceError, match="which is not a trusted module"):
        import_reference("dspex_unit_probe:f", roots, "metric")
    # A module whose name merely starts like a trusted one is not trusted.
    with pytest.raises(ForbiddenReferenceError, match="'dspyx'"):
        import_reference("dspyx:f", roots, "metric")
    assert not marker.exists() and "dspex_unit_probe" not in sys.modules
    assert import_reference("dspex_unit_probe:f", ("dspex_unit_probe",), "metric")() == 1
    assert marker.exists()  # the control: importing it does leave the marker
    sys.modules.pop("dspex_unit_probe", None)


def test_pool_spec_repr_masks_env_var_values():
    spec = PoolSpec("p", env_vars={"OPENAI_API_KEY": "sk-secret-value"})
    assert "sk-secret-value" not in repr(spec) and "sk-secret-value" not in str(spec)
    assert "env_vars={'OPENAI_API_KEY': '***'}" in repr(spec)
    assert spec.env_vars["OPENAI_API_KEY"] == "sk-secret-value"  # the value is still there
