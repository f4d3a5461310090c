"""The bad-input catalogue: each kind of bad input, its exact error type and message.

Every row must fail fast with a typed error that says what to do, and leave the pool usable.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from dspex_jupyter import MIPROv2, PoolManager, PoolSpec, load_pool_specs
from dspex_jupyter.checkpoint import CheckpointDir, CheckpointError
from dspex_jupyter.core.envs import create_environment, get_environment
from dspex_jupyter.core.errors import (
    EnvError,
    EnvironmentNotFound,
    InvalidCheckpoint,
    InvalidSpec,
    PoolNotFound,
    RemoteError,
    SessionClosed,
)
from dspex_jupyter.core.recovery import RecoveryPolicy
from dspex_jupyter.protocol import SerializationError
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


def resume(m, folder: CheckpointDir):
    task = mh.task()
    return MIPROv2.resume(folder.path, m["bad"], program=task.make_program(),
                          metric=task.metric, task_lm=task.lm())  # fmt: skip


def damaged(m, tmp: Path, how: str):
    folder = checkpoint_folder(m, tmp)
    # The last snapshot is the finished run's; damage the one before and point LATEST at it.
    snapshot = folder.snapshots()[-2]
    snapshot.write_text(how_to_damage(snapshot.read_text(), how))
    (folder.path / "LATEST").write_text(snapshot.name)
    return resume(m, folder)


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
