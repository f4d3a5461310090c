"""The run history (core/history.py): the SQLite store, its queries, concurrent writers in
separate processes, recording run handles, load_program, `dspex runs` and `%dspex runs`."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from dspex_jupyter import cli
from dspex_jupyter.core import history
from dspex_jupyter.core.errors import HistoryError, InvalidSpec, NoBestProgram, RunNotFound
from dspex_jupyter.core.history import RunHistory, RunRecord

from .test_notebook_fakes import FakeRun, feed_typical_run

PREDICT_STATE = {
    "traces": [],
    "train": [],
    "demos": [{"question": "1+1", "answer": "2"}],
    "signature": {
        "instructions": "Add the numbers.",
        "fields": [
            {"prefix": "Question:", "description": "${question}"},
            {"prefix": "Answer:", "description": "${answer}"},
        ],
    },
    "lm": None,
}


def trial(number, score, best, kind="full", when=1000.0):
    return {"number": number, "eval": kind, "score": score, "best_score": best,
            "params": {"0_predictor_instruction": number % 3}, "time": when + number}  # fmt: skip


def fake_clock(times):
    """history's ``time`` module with ``time()`` taken from ``times`` (created/updated)."""
    return SimpleNamespace(time=lambda: next(times), monotonic=time.monotonic)


@pytest.fixture
def store(tmp_path):
    return RunHistory(tmp_path / "home" / "runs.sqlite3")


# ---- the store -------------------------------------------------------------------------
def test_records_update_in_place_and_keep_what_is_not_given(store):
    config = {"optimizer": {"auto": "light", "seed": 0}, "compile": {"num_trials": 8}}
    store.record("aaa111", optimizer="MIPROv2", status="running", config=config,
                 usage={"calls": 3, "cost": 0.5}, trial_rows=[trial(1, 40.0, 40.0)])  # fmt: skip
    first = store.get("aaa111")
    store.record("aaa111", status="completed", best_score=55.0, best_program=PREDICT_STATE,
                 trial_rows=[trial(2, 50.0, 40.0, "minibatch"), trial(3, 55.0, 55.0)])  # fmt: skip
    record = store.get("aaa111")
    assert (record.status, record.best_score, record.optimizer) == ("completed", 55.0, "MIPROv2")
    assert record.config == config and record.usage == {"calls": 3, "cost": 0.5}
    assert record.cost == 0.5  # follows the usage
    assert record.created == first.created and record.updated >= first.updated
    assert record.instructions == {"self": "Add the numbers."}  # a lone Predict's flat state
    assert [(t["number"], t["eval"], t["score"]) for t in store.trials("aaa111")] == [
        (1, "full", 40.0),
        (2, "minibatch", 50.0),
        (3, "full", 55.0),
    ]
    # A trial sent again (a resumed run replays its events) replaces its row.
    store.record("aaa111", trial_rows=[trial(3, 55.0, 55.0)])
    assert len(store.trials("aaa111")) == 3
    assert store.count() == 1


def test_filters_newest_first_and_short_ids(store, monkeypatch):
    clock = iter([1000.0, 2000.0, 3000.0, 4000.0])
    monkeypatch.setattr(history, "time", fake_clock(clock))
    store.record("aaa111", optimizer="MIPROv2", status="completed", notebook="/w/tune.ipynb",
                 config={"optimizer": {"auto": "light"}})  # fmt: skip
    store.record("aab222", optimizer="GEPA", status="failed", notebook="/w/other.ipynb",
                 error="LM down: 100% of calls failed")  # fmt: skip
    store.record("bbb333", optimizer="MIPROv2", status="running")
    ids = lambda records: [r.run_id for r in records]  # noqa: E731
    assert ids(store.runs()) == ["bbb333", "aab222", "aaa111"]
    assert ids(store.runs(optimizer="mipROv2")) == ["bbb333", "aaa111"]
    assert ids(store.runs(status="FAILED")) == ["aab222"]
    assert ids(store.runs(notebook="tune")) == ["aaa111"]
    assert ids(store.runs(text="light")) == ["aaa111"]  # in the config
    assert ids(store.runs(text="100%")) == ["aab222"]  # % is literal, not a wildcard
    assert ids(store.runs(text="1_0")) == []  # and so is _
    assert ids(store.runs(since=1500.0)) == ["bbb333", "aab222"]
    assert ids(store.runs(limit=1)) == ["bbb333"]
    assert store.get("bbb").run_id == "bbb333"
    with pytest.raises(RunNotFound, match="ambiguous") as ambiguous:
        store.get("aa")
    assert "aaa111" in ambiguous.value.hint and "aab222" in ambiguous.value.hint
    with pytest.raises(RunNotFound, match="no run 'zzz'") as missing:
        store.get("zzz")
    assert "dspex runs" in missing.value.hint
    with pytest.raises(InvalidSpec, match="not a date"):
        store.runs(since="last tuesday")
    assert history.parse_since("2026-11-01") == pytest.approx(
        history.dt.datetime(2026, 11, 1).timestamp()
    )


def test_a_run_whose_process_is_gone_shows_as_lost(store):
    """A notebook killed mid-run leaves its row "running": shown (and found) as "lost"."""
    import socket

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    store.record("aaa111", status="running", host=host, pid=gone.pid)
    store.record("bbb222", status="running", host=host, pid=os.getpid())
    store.record("ccc333", status="completed", host=host, pid=gone.pid)
    shown = {r.run_id: r.shown_status for r in store.runs()}
    assert shown == {"aaa111": "lost", "bbb222": "running", "ccc333": "completed"}
    assert store.get("aaa111").status == "running"  # computed when shown, never stored
    assert [r.run_id for r in store.runs(status="lost")] == ["aaa111"]


def test_a_missing_history_reads_as_empty_without_creating_it(store):
    assert store.runs() == [] and store.count() == 0
    assert not store.path.exists() and not store.path.parent.exists()
    with pytest.raises(RunNotFound):
        store.get("aaa111")


def test_the_file_is_private_wal_and_versioned(store):
    store.record("aaa111", status="running")
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == history.SCHEMA_VERSION
        wal = store.path.with_name(store.path.name + "-wal")
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600  # SQLite copies the file's mode


def test_no_secret_reaches_the_file(store):
    secret = "sk-very-secret-123"
    config = {"task_lm": {"kind": "state", "state": {"model": "openai/x", "api_key": secret}},
              "headers": {"Authorization": f"Bearer {secret}"}}  # fmt: skip
    store.record("aaa111", status="running", config=config)
    kept = store.get("aaa111").config
    assert kept == {"task_lm": {"kind": "state", "state": {"model": "openai/x"}}, "headers": {}}
    for path in store.path.parent.iterdir():
        assert secret.encode() not in path.read_bytes(), path.name


def test_a_newer_or_damaged_history_is_a_clear_error(store):
    store.record("aaa111", status="running")
    with sqlite3.connect(store.path) as conn:
        conn.execute(f"PRAGMA user_version = {history.SCHEMA_VERSION + 1}")
    with pytest.raises(HistoryError, match="newer dspex-jupyter") as newer:
        store.runs()
    assert "upgrade" in newer.value.hint
    damaged = RunHistory(store.path.with_name("damaged.sqlite3"))
    damaged.path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(HistoryError, match="cannot be used") as error:
        damaged.record("aaa111", status="running")
    assert "move a damaged one aside" in error.value.hint
    assert damaged.path.read_bytes() == b"this is not a database" * 100  # left as it was


WRITER = """
import sys
from dspex_jupyter.core.history import RunHistory

path, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = RunHistory(path)
print("ready", flush=True)
sys.stdin.readline()  # "go": both writers start together
for i in range(count):
    run_id = f"{prefix}{i:04d}"
    store.record(run_id, optimizer="MIPROv2", status="running", config={"i": i})
    store.record(run_id, status="completed", best_score=float(i), trial_rows=[
        {"number": 1, "eval": "full", "score": float(i), "best_score": float(i)}])
print("done", flush=True)
"""


def test_two_processes_write_at_once_without_locking_errors(store):
    """Two notebooks' worth of writers, as separate processes started together: every
    record lands and no write fails with "database is locked"."""
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(store.path), prefix, "200"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for prefix in ("a", "b")
    ]
    try:
        for process in writers:
            assert process.stdout.readline() == "ready\n"
        for process in writers:
            process.stdin.write("go\n")
            process.stdin.flush()
        results = [process.communicate(timeout=120) for process in writers]
    finally:
        for process in writers:
            process.kill()
            process.wait()
    assert [process.returncode for process in writers] == [0, 0], results
    assert all(out == "done\n" and "locked" not in err for out, err in results), results
    records = store.runs()
    assert len(records) == 400 and {r.status for r in records} == {"completed"}
    assert {r.run_id for r in records} == {f"{p}{i:04d}" for p in "ab" for i in range(200)}
    assert all(r.best_score == r.config["i"] for r in records)
    assert len(store.trials("b0199")) == 1


# ---- comparing -------------------------------------------------------------------------
def test_config_differences_and_instruction_diff():
    def program(text):
        return {"gen": {"signature": {"instructions": text}}}

    first = RunRecord("aaa111", config={"optimizer": {"auto": "light", "seed": 0}},
                      best_program=program("Add.\nCheck."))  # fmt: skip
    second = RunRecord("bbb222", config={"optimizer": {"auto": "medium", "seed": 0}},
                       best_program=program("Add.\nVerify."))  # fmt: skip
    assert history.config_differences([first, second]) == {"optimizer.auto": ["light", "medium"]}
    diff = history.instruction_diff(first, second)
    assert diff[:2] == ["--- aaa111/gen", "+++ bbb222/gen"]
    assert "-Check." in diff and "+Verify." in diff and " Add." in diff
    assert history.instruction_diff(first, first) == []


# ---- recording run handles -------------------------------------------------------------
class RecordedRun(FakeRun):
    """A FakeRun with the attributes a real handle records (spec, pool, result)."""

    def __init__(self, run_id, folder):
        super().__init__(run_id, folder)
        self.pool = type("PoolName", (), {"name": "fakepool"})()
        self.spec = {
            "run_id": run_id,
            "checkpoint_dir": str(folder),
            "optimizer": {"auto": "light", "seed": 0},
            "compile": {"num_trials": 7},
            "program": {"kind": "dspy", "class": "dspy.predict.predict:Predict",
                        "signature": "question -> answer", "state": {"big": "initial"}},
            "task_lm": {"kind": "state", "state": {"model": "openai/x", "api_key": "sk-no"}},
        }  # fmt: skip
        history.follow_run(self)  # as OptimizationRun's run_started hook does

    def result(self, timeout=None):
        super().result(timeout)
        return SimpleNamespace(state=PREDICT_STATE)


def test_a_run_handle_records_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPEX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("JPY_SESSION_NAME", "/work/notebooks/tune.ipynb")
    run = RecordedRun("run001", tmp_path / "ckpt")
    feed_typical_run(run, trials=7)
    assert history.writer.flush(30)
    record = RunHistory().get("run001")
    assert (record.status, record.best_score, record.trials) == ("running", 55.0, 7)
    assert record.notebook == "/work/notebooks/tune.ipynb" and record.pool == "fakepool"
    assert record.checkpoint_dir == str(tmp_path / "ckpt") and record.host
    assert record.config["program"] == {"kind": "dspy", "class": "dspy.predict.predict:Predict",
                                        "signature": "question -> answer"}  # fmt: skip
    assert "api_key" not in json.dumps(record.config) and "run_id" not in record.config
    assert record.usage["calls"] == 70 and record.cost == pytest.approx(0.007)
    assert [t["number"] for t in RunHistory().trials("run001")] == list(range(1, 8))

    run.emit("complete", best_score=55.0, usage=run.metrics["usage"])
    run.finish("completed")  # the handle has its result: the final row comes with it
    assert history.writer.flush(30)
    record = RunHistory().get("run001")
    assert record.status == "completed" and record.best_program == PREDICT_STATE

    # One call gives the best program back: rebuilt from DSPy's own class, or loaded into
    # the program given.
    import dspy

    program = history.load_program("run001")
    assert isinstance(program, dspy.Predict) and program.dump_state() == PREDICT_STATE
    given = dspy.Predict("question -> answer")
    loaded = history.load_program("run0", given)
    assert loaded is not given and loaded.dump_state() == PREDICT_STATE
    assert given.demos == []  # the program given is left as it was


def test_load_program_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPEX_HOME", str(tmp_path / "home"))
    store = RunHistory()
    store.record("run001", status="failed")
    with pytest.raises(NoBestProgram, match=r"run001 has no best program \(it is failed\)"):
        history.load_program("run001")
    store.record("run002", status="completed", best_program=PREDICT_STATE,
                 config={"program": {"kind": "value", "class": "__main__:Mine"}})  # fmt: skip
    with pytest.raises(HistoryError, match="defined in a notebook") as by_value:
        history.load_program("run002")
    assert "load_program('run002', MyProgram())" in by_value.value.hint
    store.record("run003", status="completed", best_program=PREDICT_STATE,
                 checkpoint_dir=str(tmp_path / "unsigned"),
                 config={"program": {"kind": "ref", "ref": "os:system"}})  # fmt: skip
    with pytest.raises(HistoryError, match="will not import from") as unsigned:
        history.load_program("run003")
    assert "dspex trust" in unsigned.value.hint


def test_load_program_imports_a_reference_only_from_a_signed_folder(tmp_path, monkeypatch):
    from dspex_jupyter.checkpoint import write_json_atomic
    from dspex_jupyter.testing.faults import OomOnNewInstructions
    from dspex_jupyter.trust import sign_checkpoint

    monkeypatch.setenv("DSPEX_HOME", str(tmp_path / "home"))
    folder = tmp_path / "run"
    folder.mkdir()
    reference = {"kind": "ref", "ref": "dspex_jupyter.testing.faults:OomOnNewInstructions"}
    write_json_atomic(folder / "run.json", {"run_id": "run004", "program": reference})
    write_json_atomic(folder / "data.json", {"trainset": [], "valset": None})
    best = OomOnNewInstructions()
    best.predict.predict.signature = best.predict.predict.signature.with_instructions("Tuned.")
    RunHistory().record("run004", status="completed", best_program=best.dump_state(),
                        checkpoint_dir=str(folder), config={"program": reference})  # fmt: skip
    with pytest.raises(HistoryError, match="will not import from"):
        history.load_program("run004")  # written, not signed: data only
    sign_checkpoint(folder)
    program = history.load_program("run004")
    assert isinstance(program, OomOnNewInstructions)
    assert program.predict.predict.signature.instructions == "Tuned."


def test_a_recording_failure_warns_once_and_never_reaches_the_run(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("DSPEX_HOME", str(blocker))  # the history cannot be made here
    monkeypatch.setattr(history.writer, "_warned", False)
    run = RecordedRun("run001", tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING, logger="dspex_jupyter"):
        feed_typical_run(run, trials=3)  # the events still reach the run
        run.finish("failed")
        assert history.writer.flush(30)
    assert run.metrics["trials"] == 3
    warnings = [r for r in caplog.records if "run history" in r.getMessage()]
    assert len(warnings) == 1


def test_the_notebook_comes_from_the_kernel(monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    shell = InteractiveShell.instance()
    monkeypatch.setitem(shell.user_ns, "__session__", "/w/from-kernel.ipynb")
    assert history.current_notebook() == "/w/from-kernel.ipynb"
    monkeypatch.delitem(shell.user_ns, "__session__")
    assert history.current_notebook() is None  # a terminal: no notebook


# ---- dspex runs ------------------------------------------------------------------------
@pytest.fixture
def recorded(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("DSPEX_HOME", str(home))
    clock = iter([1000.0, 2000.0])
    monkeypatch.setattr(history, "time", fake_clock(clock))
    store = RunHistory()
    store.record("aaa111", optimizer="MIPROv2", status="completed", best_score=55.0,
                 notebook="/w/tune.ipynb", usage={"calls": 70, "total_tokens": 900, "cost": 0.007},
                 config={"optimizer": {"auto": "light"}}, trials=2,
                 best_program={"gen": {"signature": {"instructions": "Add carefully."}}},
                 trial_rows=[trial(1, 40.0, 40.0), trial(2, 55.0, 55.0)])  # fmt: skip
    store.record("bbb222", optimizer="MIPROv2", status="completed", best_score=47.5,
                 config={"optimizer": {"auto": "medium"}}, trials=1,
                 best_program={"gen": {"signature": {"instructions": "Add."}}})  # fmt: skip
    return store


def test_dspex_runs_lists_shows_and_compares(recorded, capsys):
    assert cli.main(["runs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["RUN", "OPTIMIZER", "STATUS", "BEST", "TRIALS", "COST",
                                "NOTEBOOK", "STARTED", "BEST", "INSTRUCTION"]  # fmt: skip
    assert lines[1].split()[:7] == ["bbb222", "MIPROv2", "completed", "47.5", "1", "-", "-"]
    assert lines[2].split()[:7] == ["aaa111", "MIPROv2", "completed", "55", "2", "$0.0070",
                                    "tune.ipynb"]  # fmt: skip
    assert lines[2].endswith("Add carefully.")

    assert cli.main(["runs", "--notebook", "tune", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["run_id"] for row in rows] == ["aaa111"] and rows[0]["best_score"] == 55.0

    assert cli.main(["runs", "show", "aaa"]) == 0
    out = capsys.readouterr().out
    assert "run:         aaa111" in out and "Add carefully." in out
    assert "usage:       70 calls, 900 tokens, cost $0.0070" in out
    assert out.splitlines()[-1].split() == ["2", "full", "55", "55"]

    assert cli.main(["runs", "compare", "aaa111", "bbb222"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["aaa111", "bbb222"]
    assert ["best", "score", "55", "47.5"] in [line.split() for line in out.splitlines()]
    assert ["optimizer.auto", '"light"', '"medium"'] in [line.split() for line in out.splitlines()]
    assert "-Add carefully." in out and "+Add." in out


def test_dspex_runs_errors_are_one_line_with_a_hint(recorded, capsys):
    assert cli.main(["runs", "show", "zzz"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: no run 'zzz' in the run history") and "hint:" in err
    assert cli.main(["runs", "compare", "aaa111"]) == cli.EXIT_ERROR
    assert "compare needs at least two runs" in capsys.readouterr().err
    assert cli.main(["runs", "--since", "yesterday-ish"]) == cli.EXIT_ERROR
    assert "is not a date" in capsys.readouterr().err
    assert cli.main(["runs", "--status", "cancelled"]) == 0
    assert "no runs recorded" in capsys.readouterr().out


def test_dspex_runs_remove_forgets_a_run(recorded, capsys):
    assert cli.main(["runs", "remove", "bbb"]) == 0
    assert "removed run bbb222" in capsys.readouterr().out
    assert [r.run_id for r in recorded.runs()] == ["aaa111"]


# ---- %dspex runs --all ---------------------------------------------------------------
def test_percent_runs_all_adds_other_notebooks_to_the_live_table(recorded, tmp_path, monkeypatch):
    from dspex_jupyter.notebook.runs_table import history_table

    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    live = FakeRun("bbb222", tmp_path / "b")  # this kernel holds one of the recorded runs
    live.spec = {"optimizer": {"auto": "medium"}}
    feed_typical_run(live, trials=3)
    table = history_table(recorded.runs(), [live], {"mine": live}, now=1010.0)
    assert table.headers[-2:] == ("notebook", "started")
    rows = [row[:5] + row[-2:] for row in table.rows]
    started = history.format_time
    assert rows == [
        ["mine", "bbb222", "MIPROv2 medium", "running", "55", "-", started(2000.0)],
        ["-", "aaa111", "MIPROv2 light", "completed", "55", "tune.ipynb", started(1000.0)],
    ]
    assert table.rows[1][5] == "Add carefully."


def test_percent_runs_magic_all_filters_and_empty_hint(recorded, capsys, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell

    from dspex_jupyter.notebook import registry

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "dspex_jupyter")
    capsys.readouterr()  # the shell is shared: it may say the extension is already loaded
    monkeypatch.setattr(registry, "runs", lambda: [])
    shell.run_line_magic("dspex", "runs")
    assert capsys.readouterr().out == (
        "no optimization run yet; start one with %dspex optimize --pool POOL ...; "
        "%dspex runs --all lists 2 recorded runs\n"
    )
    shell.run_line_magic("dspex", "runs --all")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-2:] == ["notebook", "started"]
    assert [line.split()[1] for line in lines[1:]] == ["bbb222", "aaa111"]
    shell.run_line_magic("dspex", "runs --notebook tune")  # a filter implies --all
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]] == ["aaa111"]
    shell.run_line_magic("dspex", "runs --status failed")
    assert "no recorded run matches" in capsys.readouterr().out
    shell.run_line_magic("dspex", "runs --compare aaa bbb")
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["aaa111", "bbb222"] and "+Add." in out


# ---- every optimizer's trials ----------------------------------------------------------
# "progress" events as each runtime adapter sends them after a step (runtime/gepa.py
# GEPAAdapter.progress, copro.py, simba.py, bootstrap_rs.py through step_state.StepHooks,
# generic.py per dspy.Evaluate), and one between steps (metric calls counted).
STEP_EVENTS = {
    "GEPA": {"iteration": 3, "metric_calls_used": 40, "max_metric_calls": 60, "candidates": 3,
             "pareto_front": 2, "best_score": 0.75, "best_candidate": 2,
             "proposal": {"instructions": {"pred": "x"}, "accepted": True, "candidate": 2,
                          "score": 0.75}},
    "COPRO": {"phase": "depth", "step": 2, "total": 3, "breadth": 3, "candidates": 6,
              "evaluated": 6, "best_score": 62.5, "best_instruction": "Classify it."},
    "SIMBA": {"phase": "step", "step": 2, "total": 3, "batch_size": 4, "programs": 5,
              "baseline_score": 0.5, "step_best": 0.75, "best_score": 0.7},
    "BootstrapFewShotWithRandomSearch": {"phase": "candidate", "step": 4, "total": 6,
                                         "seed": 1, "score": 50.0, "best_score": 75.0,
                                         "best_seed": -1},
    "FirstDemos": {"metric_calls": 16, "evaluations": 2, "best_score": 87.5},
}  # fmt: skip


@pytest.mark.parametrize("optimizer", sorted(STEP_EVENTS))
def test_every_optimizers_steps_are_trials(optimizer):
    event = {"seq": 9, "time": 1234.5, "kind": "progress", "optimizer": optimizer,
             **STEP_EVENTS[optimizer]}  # fmt: skip
    (row,) = history.trials_of(event)
    number, _, evaluated = history.PROGRESS_TRIALS.get(optimizer, history.GENERIC_TRIAL)
    assert row["number"] == STEP_EVENTS[optimizer][number] and row["eval"] == evaluated
    assert row["best_score"] == STEP_EVENTS[optimizer]["best_score"] and row["time"] == 1234.5
    expected = {"GEPA": 0.75, "SIMBA": 0.75, "BootstrapFewShotWithRandomSearch": 50.0}
    assert row["score"] == expected.get(optimizer)
    assert "proposal" not in row["params"] and "best_score" not in row["params"]
    json.dumps(row)  # the history stores it as JSON
    between = {"seq": 10, "time": 1235.0, "kind": "progress", "optimizer": optimizer,
               "metric_calls": 30}  # fmt: skip
    assert history.trials_of(between) == []
    assert history.trials_of({"kind": "phase", "phase": "x", "step": 1}) == []


def test_a_step_optimizers_run_records_each_step_as_a_trial(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPEX_HOME", str(tmp_path / "home"))
    run = RecordedRun("simba01", tmp_path / "ckpt")
    run.optimizer = "SIMBA"
    run.emit("status", status="running", optimizer="SIMBA")
    for step in (1, 2, 3):  # many at once: a step's progress is never throttled away
        run.emit("progress", optimizer="SIMBA", phase="step", step=step, total=3,
                 step_best=0.5 + step / 10, best_score=0.4 + step / 10)  # fmt: skip
        run.emit("progress", optimizer="SIMBA", metric_calls=step * 10)
    assert history.writer.flush(30)
    record = RunHistory().get("simba01")
    assert record.optimizer == "SIMBA" and record.trials == 3
    trials = RunHistory().trials("simba01")
    assert [(t["number"], t["eval"], t["score"]) for t in trials] == [
        (1, "minibatch", 0.6), (2, "minibatch", 0.7), (3, "minibatch", 0.8)]  # fmt: skip
    run.finish("cancelled")


def test_program_diff_shows_instructions_and_demos():
    def program(text, demos):
        return {"gen": {"signature": {"instructions": text}, "demos": demos}}

    first = RunRecord("aaa111", best_program=program("Add.", [{"question": "1+1", "answer": "2"}]))
    second = RunRecord("bbb222", best_program=program("Sum.", [
        {"question": "1+1", "answer": "2"}, {"question": "2+2", "answer": "4"}]))  # fmt: skip
    diff = history.program_diff(first, second)
    assert "-Add." in diff and "+Sum." in diff
    at = diff.index("--- aaa111/gen/demos")
    assert diff[at + 1] == "+++ bbb222/gen/demos"
    assert "+question: 2+2 | answer: 4" in diff and " question: 1+1 | answer: 2" in diff
    assert history.program_diff(first, first) == []


def test_sweeps_are_recorded_and_found_by_id_prefix_or_name(store):
    runs = [{"index": 0, "label": "MIPROv2 seed=0", "run_id": "r1", "checkpoint_dir": "/x/00",
             "status": "completed"}]  # fmt: skip
    store.record_sweep("abc123def456", name="seeds", status="running", runs=runs,
                       configs=[{"label": "MIPROv2 seed=0", "args": {"seed": 0}}],
                       budget={"max_calls": 500}, pool="opt", pid=os.getpid())  # fmt: skip
    store.record_sweep("abc123def456", status="completed")  # the rest is kept
    for key in ("abc123def456", "abc1", "seeds"):
        found = store.get_sweep(key)
        assert (found.sweep_id, found.name, found.status) == ("abc123def456", "seeds", "completed")
        assert found.runs == runs and found.budget == {"max_calls": 500}
    assert [s.name for s in store.sweeps()] == ["seeds"]
    with pytest.raises(RunNotFound, match="no sweep 'nope'") as missing:
        store.get_sweep("nope")
    assert "name" in missing.value.hint


def test_a_version_1_history_gains_the_sweeps_table(store):
    with sqlite3.connect(store.path.parent.mkdir(mode=0o700, parents=True) or store.path) as conn:
        for statement in history._SCHEMA.split("CREATE TABLE IF NOT EXISTS sweeps")[0].split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("ALTER TABLE runs DROP COLUMN pid")  # an early version-1 file had none
        conn.execute("INSERT INTO runs (run_id, created, updated) VALUES ('old1', 1, 1)")
        conn.execute("PRAGMA user_version = 1")
    assert store.sweeps() == [] and store.get("old1").run_id == "old1"
    store.record_sweep("s1", name="after-upgrade")
    assert store.get_sweep("after-upgrade").sweep_id == "s1"
    store.record("old1", status="running", pid=os.getpid())
    assert store.get("old1").pid == os.getpid() and store.get("old1").created == 1
