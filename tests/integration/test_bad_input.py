"""The bad-input catalogue: each kind of bad input, its exact error type and message.

Every row must fail fast with a typed error that says what to do, and leave the pool usable.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from dspex_jupyter import (
    DspexError,
    ExchangeConfig,
    ExchangeError,
    InvalidFunction,
    MIPROv2,
    PoolManager,
    PoolSpec,
    RemoteSerializationError,
    UnsupportedDspyVersion,
    load_pool_specs,
)
from dspex_jupyter.checkpoint import (
    CheckpointDir,
    CheckpointError,
    ForbiddenReferenceError,
    read_json_checked,
    write_json_atomic,
)
from dspex_jupyter.core import memory_limits
from dspex_jupyter.core.envs import create_environment, get_environment
from dspex_jupyter.core.errors import (
    EnvError,
    EnvironmentNotFound,
    ForbiddenReference,
    InvalidCheckpoint,
    InvalidLM,
    InvalidSpec,
    MissingEnvVars,
    PoolNotFound,
    RemoteError,
    SessionClosed,
    TrustError,
    UntrustedCheckpoint,
    UntrustedManifest,
)
from dspex_jupyter.core.recovery import RecoveryPolicy
from dspex_jupyter.exchange import decode
from dspex_jupyter.protocol import SerializationError
from dspex_jupyter.trust import sign_checkpoint, trust, write_signed_manifest
from tests.integration import mipro_helpers as mh

pytestmark = pytest.mark.integration
H = "tests.integration.helpers"


@pytest.fixture(scope="module")
def manager():
    with PoolManager([PoolSpec("bad", size=1)]) as m:
        yield m


def toml(tmp: Path, text: str) -> Path:
    path = tmp / "dspex.toml"
    path.write_text(text)
    return path


def released_session(m):
    session = m["bad"].session()
    session.release()
    return session.call("os:getpid")


def checkpoint_folder(m, tmp: Path) -> CheckpointDir:
    task = mh.task()
    run = MIPROv2(m["bad"], metric=task.metric, task_lm=task.lm(), **mh.OPTIONS).optimize(
        task.make_program(), task.trainset, task.valset, checkpoint_dir=tmp / "run", **mh.COMPILE
    )
    run.result(timeout=120)
    return CheckpointDir(tmp / "run")


def resume(m, folder: CheckpointDir, snapshot: str | None = None):
    task = mh.task()
    return MIPROv2.resume(folder.path, m["bad"], program=task.make_program(),
                          metric=task.metric, task_lm=task.lm(), snapshot=snapshot)  # fmt: skip


def damaged(m, tmp: Path, how: str):
    folder = checkpoint_folder(m, tmp)
    # The last snapshot is the finished run's; damage the one before and resume from it by
    # name (resume() with no name skips a damaged snapshot: tests/integration/test_mipro.py).
    snapshot = folder.snapshots()[-2]
    snapshot.write_text(how_to_damage(snapshot.read_text(), how))
    return resume(m, folder, snapshot.name)


def how_to_damage(text: str, how: str) -> str:
    if how == "truncated":
        return text[: len(text) // 2]
    if how == "foreign-version":
        data = json.loads(text)
        data["version"] = 99
        return json.dumps(data)
    if how == "corrupted":
        return text.replace('"value":', '"value":1', 1)
    return json.dumps({"format": "someone.else", "version": 1})


CATALOGUE = [
    # (id, action(manager, tmp_path), error type, message pattern)
    ("unknown pool", lambda m, t: m.pool("nope"), PoolNotFound, r"no pool named 'nope'"),
    ("unknown environment", lambda m, t: get_environment("ghost"), EnvironmentNotFound,
     r"no dspex environment named 'ghost'"),
    ("pool from unknown environment", lambda m, t: m.start(PoolSpec("x", env="ghost")),
     EnvironmentNotFound, r"dspex env create ghost"),
    ("size zero", lambda m, t: PoolSpec("x", size=0), InvalidSpec, r"size must be between 1"),
    ("size as text", lambda m, t: PoolSpec("x", size="4"), InvalidSpec,
     r"size must be an integer"),
    ("memory string", lambda m, t: PoolSpec("x", max_memory="lots"), InvalidSpec,
     r"invalid memory size 'lots'"),
    ("negative memory", lambda m, t: PoolSpec("x", max_memory=-5), InvalidSpec,
     r"memory size must be positive"),
    ("missing python", lambda m, t: m.start(PoolSpec("x", python="/no/such/python")),
     InvalidSpec, r"does not exist or is not executable"),
    ("unknown kernelspec", lambda m, t: m.start(PoolSpec("x", kernel="no-such-kernel")),
     InvalidSpec, r"no kernelspec named 'no-such-kernel'"),
    ("two kernel sources", lambda m, t: PoolSpec("x", env="a", python="/usr/bin/python3"),
     InvalidSpec, r"give exactly one of env=, kernel= or python="),
    ("path traversal in pool name", lambda m, t: PoolSpec("../etc"), InvalidSpec,
     r"invalid pool name '../etc'"),
    ("path traversal in env name", lambda m, t: create_environment("../../tmp/x"), InvalidSpec,
     r"invalid environment name"),
    ("env vars not strings", lambda m, t: PoolSpec("x", env_vars={"N": 1}), InvalidSpec,
     r"env_vars must map strings to strings"),
    ("wrong type in dspex.toml", lambda m, t: load_pool_specs(toml(t, "[pools.a]\nsize = 'x'\n")),
     InvalidSpec, r"size must be an integer"),
    ("unknown key in dspex.toml", lambda m, t: load_pool_specs(toml(t, "[pools.a]\nsiz = 2\n")),
     InvalidSpec, r"unknown key\(s\) siz"),
    ("broken dspex.toml", lambda m, t: load_pool_specs(toml(t, "[pools.a\n")), InvalidSpec,
     r"not valid TOML"),
    ("bad recovery policy", lambda m, t: RecoveryPolicy(auto_resume=-1), InvalidSpec,
     r"auto_resume must be a non-negative integer"),
    ("python for an env too old", lambda m, t: create_environment("old", python="9.99"), EnvError,
     r"9\.99"),
    ("function reference without colon", lambda m, t: m["bad"].call("os.getpid"), ValueError,
     r"must look like 'package.module:function'"),
    ("reference to something not callable", lambda m, t: m["bad"].call("os:sep"), RemoteError,
     r"not callable"),
    ("unserializable argument", lambda m, t: m["bad"].call(f"{H}:echo", threading.Lock()),
     SerializationError, r"cannot be sent to or from a kernel \(cannot pickle '_thread.lock'"),
    ("unserializable result", lambda m, t: m["bad"].call("threading:Lock"), RemoteError,
     r"SerializationError: a value cannot be sent"),
    ("session state not a dict", lambda m, t: m["bad"].session(state=[1]), TypeError,
     r"session state must be a dict"),
    ("map chunksize zero", lambda m, t: m["bad"].map(f"{H}:square", [1], chunksize=0),
     ValueError, r"chunksize must be a positive integer"),
    ("released session used", lambda m, t: released_session(m), SessionClosed,
     r"was released"),
    ("program of the wrong type", lambda m, t: MIPROv2(m["bad"], metric="m:f",
     task_lm=mh.task().lm()).optimize(42, []), TypeError, r"program must be a dspy.Module"),
    ("resume from a folder that holds no run", lambda m, t: MIPROv2.resume(t, m["bad"]),
     CheckpointError, r"holds no dspex run"),
    ("corrupted checkpoint", lambda m, t: damaged(m, t, "corrupted"), InvalidCheckpoint,
     r"fails its checksum"),
    ("truncated checkpoint", lambda m, t: damaged(m, t, "truncated"), InvalidCheckpoint,
     r"not valid JSON \(truncated or corrupted\)"),
    ("foreign-version checkpoint", lambda m, t: damaged(m, t, "foreign-version"),
     InvalidCheckpoint, r"checkpoint version 99"),
    ("foreign file as checkpoint", lambda m, t: damaged(m, t, "foreign"), InvalidCheckpoint,
     r"is not a dspex MIPROv2 checkpoint"),
    # Trust (A1): files this user's key did not sign are data; references are allowlisted.
    ("resume a folder signed in another DSPEX_HOME", lambda m, t: foreign_signed(m, t),
     UntrustedCheckpoint, r"was not signed with this user's dspex key, so dspex will not import"),
    ("checkpoint naming a module outside the trusted ones", lambda m, t: forged_metric(m, t),
     ForbiddenReference, r"metric 'os:system' is in module 'os', which is not a trusted module"),
    ("trusted_modules entry that is not a module name", lambda m, t: MIPROv2.resume(
     fake_run(t), m["bad"], trusted_modules=("os; rm",)), ForbiddenReferenceError,
     r"trusted module 'os; rm' is not a module name"),
    ("restore a manifest signed by another key", lambda m, t: PoolManager.restore(
     manifest(t, home=t / "someone-else")), UntrustedManifest,
     r"is not signed by this user's dspex key"),
    ("restore without an env var's value", lambda m, t: PoolManager.restore(manifest(t)),
     MissingEnvVars, r"these have no value: pool 'p': DSPEX_BAD_INPUT_KEY"),
    ("dspex trust on a folder with no run", lambda m, t: trust(t), TrustError,
     r"holds no dspex run \(run.json is missing\)"),
    ("LM string that is no model name or import path", lambda m, t: MIPROv2(m["bad"],
     metric="m:f", task_lm="gpt 4").optimize(mh.task().make_program(), []), InvalidLM,
     r"LM 'gpt 4' is neither a model name 'provider/model' nor an import path"),
    ("LM of the wrong type", lambda m, t: MIPROv2(m["bad"], metric="m:f", task_lm=object())
     .optimize(mh.task().make_program(), []), InvalidLM,
     r"an LM must be a dspy.BaseLM or a string, got object"),
    ("unknown DSPEX_MEMORY_LIMITS", lambda m, t: memory_limits_setting("magic"),
     memory_limits.MemoryLimitsUnavailable,
     r"DSPEX_MEMORY_LIMITS='magic' is not one of auto, cgroup, proc"),
    ("metric reference that is no import path", lambda m, t: MIPROv2(m["bad"],
     metric="my metric", task_lm=mh.task().lm()).optimize(mh.task().make_program(), []),
     InvalidSpec, r"metric reference 'my metric' must look like 'package.module:name'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("action", "error", "pattern"),
    [pytest.param(a, e, p, id=i) for i, a, e, p in CATALOGUE],
)
def test_bad_input_gets_a_typed_clear_error(manager, tmp_path, action, error, pattern):
    with pytest.raises(error, match=pattern):
        action(manager, tmp_path)
    assert manager["bad"].call(f"{H}:square", 5) == 25  # the pool is still fine


def test_catalogue_is_at_least_25_kinds():
    assert len({row[0] for row in CATALOGUE}) >= 25


# ---- helpers of the trust rows (A1) ----------------------------------------------------
def stopped_folder(m, tmp: Path) -> CheckpointDir:
    """A finished run's folder less its final snapshot: a run that stopped, resumable."""
    folder = checkpoint_folder(m, tmp)
    folder.snapshots()[-1].unlink()
    (folder.path / "LATEST").write_text(folder.snapshots()[-1].name)
    return folder


def foreign_signed(m, tmp: Path):
    folder = stopped_folder(m, tmp)
    sign_checkpoint(folder, home=tmp / "someone-else")
    return MIPROv2.resume(folder.path, m["bad"])


def forged_metric(m, tmp: Path):
    folder = stopped_folder(m, tmp)
    spec = read_json_checked(folder.run_file)
    spec["metric"] = {"kind": "ref", "ref": "os:system"}
    write_json_atomic(folder.run_file, spec)
    sign_checkpoint(folder)  # the user trusted it: the allowlist still applies
    return MIPROv2.resume(folder.path, m["bad"])


def fake_run(tmp: Path) -> Path:
    write_json_atomic(tmp / "run.json", {"run_id": "r"})
    return tmp


def manifest(tmp: Path, home: Path | None = None) -> Path:
    body = {"pools": [{"name": "p", "env_vars": ["DSPEX_BAD_INPUT_KEY"]}], "sessions": [],
            "entries": []}  # fmt: skip
    write_signed_manifest(tmp / "m.json", body, home=home)
    return tmp / "m.json"


def memory_limits_setting(value: str) -> None:
    """Start a pool with max_memory under DSPEX_MEMORY_LIMITS=value."""
    old = os.environ.get(memory_limits.ENV_VAR)
    os.environ[memory_limits.ENV_VAR] = value
    manager = PoolManager([PoolSpec("limited", size=1, max_memory="300MB")])
    try:
        manager.start()
    finally:
        manager.shutdown()
        if old is None:
            os.environ.pop(memory_limits.ENV_VAR, None)
        else:
            os.environ[memory_limits.ENV_VAR] = old


# ---- helper D (issue #12 items 9-11): DSPy version, values that cannot travel, API -------
def run_with_dspy(m, tmp: Path, version: str):
    """A real run in a kernel that reads DSPy ``version`` (see dspy_version_helpers)."""
    m["bad"].call("tests.integration.dspy_version_helpers:pretend_dspy_version", version)
    try:
        task = mh.task()
        run = MIPROv2(m["bad"], metric=task.metric, task_lm=task.lm(), **mh.OPTIONS).optimize(
            task.make_program(), task.trainset, task.valset, checkpoint_dir=tmp / "run",
            **mh.COMPILE,
        )  # fmt: skip
        return run.result(timeout=120)
    finally:
        m["bad"].call("tests.integration.dspy_version_helpers:pretend_dspy_version", None)


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


HYGIENE = [
    ("unsupported DSPy version in the pool", lambda m, t: run_with_dspy(m, t, "3.0.0"),
     UnsupportedDspyVersion,
     r"DSPy 3\.0\.0 is installed in this kernel's environment, but dspex's MIPROv2 search loop "
     r"follows dspy>=3\.4\.1,<3\.5 only"),
    ("value nested too deeply to send", lambda m, t: m["bad"].call(f"{H}:echo", nested(100_000)),
     SerializationError, r"cannot be sent to or from a kernel \(.*recursion.*\): list \[\[\[\["),
    ("not a function", lambda m, t: m["bad"].call(42), InvalidFunction,
     r"expected a callable or a 'module:function' string, got int 42"),
    ("unserializable part of a container", lambda m, t: m["bad"].call(
     f"{H}:echo", {"config": {"ok": 1, "lock": threading.Lock()}}), SerializationError,
     r"argument 1 of the call: .*the part that fails is \['config'\]\['lock'\]: lock <unlocked"),
    ("result that cannot come back", lambda m, t: m["bad"].call("threading:Lock"),
     RemoteSerializationError, r"cannot pickle '_thread.lock' object\): lock <unlocked"),
    ("exchange file outside the folder", lambda m, t: decode(
     {"enc": "bytes", "type": "bytes", "nbytes": 3, "file": "../../etc/passwd"}, [],
     ExchangeConfig(folder=str(t))), ExchangeError,
     r"refusing exchange file '\.\./\.\./etc/passwd'"),
    ("forget the settings of a running pool", lambda m, t: m.forget_spec("bad"), InvalidSpec,
     r"pool 'bad' is running with these settings"),
]  # fmt: skip
CATALOGUE += HYGIENE


# ---- MIPROv2 runs: budgets, outage policy, nothing to resume (helper E2) ---------------
from dspex_jupyter.core.errors import NothingToResume  # noqa: E402 (this section's own)


def _resume_a_completed_run(manager, folder):
    task = mh.task()
    optimizer = MIPROv2(manager["bad"], metric=task.metric, task_lm=task.lm(), **mh.OPTIONS)
    run = optimizer.optimize(task.make_program(), task.trainset, task.valset,
                             checkpoint_dir=folder, **mh.COMPILE)  # fmt: skip
    run.result(timeout=120)
    return MIPROv2.resume(folder, manager["bad"], metric=task.metric, task_lm=task.lm())


RUN_MACHINERY = [
    ("budget of zero calls", lambda m, t: MIPROv2(m["bad"], metric=mh.always_zero,
     task_lm=None, max_calls=0), InvalidSpec, r"max_calls must be a positive number"),
    ("budget as text", lambda m, t: MIPROv2(m["bad"], metric=mh.always_zero, task_lm=None,
     max_cost="5 dollars"), InvalidSpec, r"max_cost must be a positive number"),
    ("outage wait in words", lambda m, t: RecoveryPolicy(lm_outage_wait="a while"), InvalidSpec,
     r"lm_outage_wait must be seconds or a duration like '10m'"),
    ("negative outage wait", lambda m, t: RecoveryPolicy(lm_outage_wait=-1), InvalidSpec,
     r"lm_outage_wait must not be negative"),
    ("resume a completed run", lambda m, t: _resume_a_completed_run(m, t / "run"),
     NothingToResume, r"completed; there is nothing to resume"),
]  # fmt: skip


CATALOGUE += RUN_MACHINERY


@pytest.mark.parametrize(
    ("action", "error", "pattern"),
    [pytest.param(a, e, p, id=i) for i, a, e, p in HYGIENE + RUN_MACHINERY],
)
def test_newer_bad_input_gets_a_dspex_error_with_a_hint(manager, tmp_path, action, error, pattern):
    """The rows added with issues #11 and #12: each is a DspexError with a hint, and the
    pool stays fine (integers of any size included)."""
    with pytest.raises(error, match=pattern) as info:
        action(manager, tmp_path)
    assert isinstance(info.value, DspexError) and info.value.hint.strip()
    assert manager["bad"].call(f"{H}:square", 5) == 25  # the pool is still fine
    assert manager["bad"].call(f"{H}:echo", 2**100) == ((2**100,), {})  # ints of any size
