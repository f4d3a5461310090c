"""The bad-input catalogue: each kind of bad input, its exact error type and message.

Every row must fail fast with a typed error that says what to do, and leave the pool usable.
"""

from __future__ import annotations

import json
import os
import sqlite3
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


def _db() -> sqlite3.Connection:
    """A value no pickler can send (a lock can: it travels as a new one)."""
    return sqlite3.connect(":memory:")


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
    ("unserializable argument", lambda m, t: m["bad"].call(f"{H}:echo", _db()),
     SerializationError, r"sent to or from a kernel \(cannot pickle 'sqlite3.Connection'"),
    ("unserializable result", lambda m, t: m["bad"].call("sqlite3:connect", ":memory:"),
     RemoteError,
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
     f"{H}:echo", {"config": {"ok": 1, "db": _db()}}), SerializationError,
     r"argument 1 of the call: .*the part that fails is \['config'\]\['db'\]: Connection <sqlite3"),
    ("result that cannot come back", lambda m, t: m["bad"].call("sqlite3:connect", ":memory:"),
     RemoteSerializationError, r"cannot pickle 'sqlite3.Connection' object\): Connection <sqlite3"),
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


# ---- GEPA runs (helper G, issue #14) ------------------------------------------------------
from dspex_jupyter.core.errors import UnsupportedOptimizerOption  # noqa: E402 (this section's)


def _gepa_with_a_pickling_log_dir(manager, folder):
    import dspy

    import dspex_jupyter as dspex
    from dspex_jupyter.testing import get_task

    task = get_task("arithmetic", n_train=4, n_val=3)
    gepa = dspy.GEPA(metric=task.feedback_metric, reflection_lm=task.lm(), max_metric_calls=10,
                     log_dir=str(folder / "gepa"))  # fmt: skip
    with dspy.context(lm=task.lm()):
        run = dspex.compile(gepa, task.make_program(), trainset=task.trainset,
                            valset=task.valset, pool=manager["bad"],
                            checkpoint_dir=folder / "run")  # fmt: skip
    try:
        return run.result(timeout=120)
    finally:
        assert not (folder / "gepa").exists()  # nothing pickled


GEPA_RUNS = [
    ("GEPA with gepa's pickling log_dir", lambda m, t: _gepa_with_a_pickling_log_dir(m, t),
     UnsupportedOptimizerOption, r"GEPA\(log_dir=\.\.\.\) saves gepa's run state with pickle"),
]  # fmt: skip
CATALOGUE += GEPA_RUNS


@pytest.mark.parametrize(
    ("action", "error", "pattern"), [pytest.param(a, e, p, id=i) for i, a, e, p in GEPA_RUNS]
)
def test_gepa_bad_input_gets_a_dspex_error_with_a_hint(manager, tmp_path, action, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        action(manager, tmp_path)
    assert isinstance(info.value, DspexError) and "checkpoint_dir" in info.value.hint
    assert manager["bad"].call(f"{H}:square", 5) == 25  # the pool is still fine


# ---- run history and export (helper H, issue #15) -------------------------------------------
from dspex_jupyter.core.errors import (  # noqa: E402 (this section's)
    HistoryError,
    NoBestProgram,
    RunNotFinished,
    RunNotFound,
)


def _history_with(status: str, **fields):
    from dspex_jupyter.core.history import RunHistory

    history = RunHistory()
    history.record("h1s7", optimizer="MIPROv2", status=status, **fields)
    return history


def _newer_history():
    import sqlite3

    history = _history_with("completed")
    with sqlite3.connect(history.path) as conn:
        conn.execute("PRAGMA user_version = 99")
    return history.runs()


def _load(run_id: str):
    import dspex_jupyter as dspex

    return dspex.load_program(run_id)


RUN_HISTORY = [
    ("load_program of an unknown run", lambda m, t: _load("nosuchrun"),
     RunNotFound, r"no run 'nosuchrun' in the run history"),
    ("load_program of a failed run", lambda m, t: (_history_with("failed"), _load("h1s7")),
     NoBestProgram, r"run h1s7 has no best program \(it is failed\)"),
    ("load_program of a notebook-defined program without it",
     lambda m, t: (_history_with("completed", best_program={"x": {}},
                                 config={"program": {"kind": "value"}}), _load("h1s7")),
     HistoryError, r"program was defined in a notebook"),
    ("export of a run still going",
     lambda m, t: (_history_with("running"), __import__("dspex_jupyter").to_mlflow("h1s7")),
     RunNotFinished, r"run h1s7 is still running"),
    ("runs since a date that is not one",
     lambda m, t: _history_with("completed").runs(since="next week"),
     InvalidSpec, r"since='next week' is not a date"),
    ("a history written by a newer dspex", lambda m, t: _newer_history(),
     HistoryError, r"written by a newer dspex-jupyter"),
]  # fmt: skip
CATALOGUE += RUN_HISTORY


@pytest.mark.parametrize(
    ("action", "error", "pattern"), [pytest.param(a, e, p, id=i) for i, a, e, p in RUN_HISTORY]
)
def test_run_history_bad_input_gets_a_dspex_error_with_a_hint(
    manager, tmp_path, action, error, pattern
):
    with pytest.raises(error, match=pattern) as info:
        action(manager, tmp_path)
    assert isinstance(info.value, DspexError) and info.value.hint.strip()


# ---- remote kernelspecs and checkpoint mirroring (issue #16) ------------------------------
def _kernelspec(kind: str, tmp: Path, **options):
    from dspex_jupyter.core.kernelspecs import write_kernelspec

    return write_kernelspec(kind, "remote_x", home=tmp, **options)


def _reused_kernel_folder(manager, tmp: Path):
    """A second run told to write the kernel-side folder a first run already holds."""
    task = mh.task()
    used = tmp / "kernel-side"
    used.mkdir()
    write_json_atomic(used / "run.json", {"run_id": "old"})
    optimizer = MIPROv2(manager["bad"], metric=task.metric, task_lm=task.lm(), **mh.OPTIONS)
    folders = {"checkpoint_dir": tmp / "notebook", "kernel_checkpoint_dir": used}
    return optimizer.optimize(task.make_program(), task.trainset, task.valset, **folders)


from dspex_jupyter.core.errors import KernelspecError  # noqa: E402

REMOTE = [
    ("ssh kernelspec without hosts",
     lambda m, t: _kernelspec("ssh", t, remote_python="/opt/py/bin/python", hosts=""),
     KernelspecError, r"an SSH kernelspec needs at least one host"),
    ("ssh kernelspec of an unknown environment",
     lambda m, t: _kernelspec("ssh", t, env="nope", hosts="gpu1"),
     EnvironmentNotFound, r"no dspex environment named 'nope'"),
    ("k8s kernelspec with a bad image", lambda m, t: _kernelspec("k8s", t, image="My Image"),
     KernelspecError, r"invalid image reference 'My Image'"),
    ("docker kernelspec without an image", lambda m, t: _kernelspec("docker", t, image=""),
     KernelspecError, r"a container kernelspec needs an image"),
    ("kernel-side checkpoint folder that holds a run", _reused_kernel_folder,
     RemoteError, r"already holds a run"),
]  # fmt: skip
CATALOGUE += REMOTE


@pytest.mark.parametrize(
    ("action", "error", "pattern"), [pytest.param(a, e, p, id=i) for i, a, e, p in REMOTE]
)
def test_remote_kernel_bad_input_gets_a_dspex_error_with_a_hint(
    manager, tmp_path, action, error, pattern
):
    with pytest.raises(error, match=pattern) as info:
        action(manager, tmp_path)
    assert isinstance(info.value, DspexError) and info.value.hint.strip()
    assert not (tmp_path / "notebook" / "run.json").exists()  # nothing half-started here


# ---- remote pools: encryption (core/kernel_source.py) -----------------------------------
def _unencrypted_remote_pool(manager, tmp_path):
    """A kernelspec for gateway_provisioners' SSH provisioner that does not declare Curve:
    refused before anything is launched (no SSH host needed)."""
    folder = Path(os.environ["DSPEX_HOME"]) / "share" / "jupyter" / "kernels" / "plain-ssh"
    folder.mkdir(parents=True)
    spec = {
        "argv": ["/opt/py/bin/python", "-m", "dspex_jupyter.runtime.remote_launcher"],
        "display_name": "plain",
        "language": "python",
        "metadata": {"kernel_provisioner": {"provisioner_name": "distributed-provisioner"}},
    }
    (folder / "kernel.json").write_text(json.dumps(spec))
    PoolManager([PoolSpec("plain", kernel="plain-ssh")]).start()


from dspex_jupyter.core.errors import TransportNotEncrypted  # noqa: E402

REMOTE_TRANSPORT = [
    ("remote pool whose kernelspec does not declare Curve", _unencrypted_remote_pool,
     TransportNotEncrypted, r"(?s)traffic must be encrypted.*allow_unencrypted='plain'"),
    ("allow_unencrypted naming another pool",
     lambda m, t: PoolSpec("gpu", kernel="k", allow_unencrypted="other"),
     InvalidSpec, r"allow_unencrypted must be the pool's own name, got 'other'"),
]  # fmt: skip
CATALOGUE += REMOTE_TRANSPORT


@pytest.mark.parametrize(
    ("action", "error", "pattern"),
    [pytest.param(a, e, p, id=i) for i, a, e, p in REMOTE_TRANSPORT],
)
def test_remote_transport_bad_input_gets_a_dspex_error_with_a_hint(
    manager, tmp_path, action, error, pattern
):
    with pytest.raises(error, match=pattern) as info:
        action(manager, tmp_path)
    assert isinstance(info.value, DspexError) and info.value.hint.strip()
    assert manager["bad"].call(len, [1, 2]) == 2  # the running pool is untouched
