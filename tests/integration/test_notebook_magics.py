"""``%dspex`` in an IPython shell driving real pool kernels and a real MIPROv2 run.

One shell and one pool for the module; the default manager is shut down at the end.
"""

from __future__ import annotations

import re

import pytest
from IPython.core.interactiveshell import InteractiveShell

from dspex_jupyter.checkpoint import CheckpointDir
from dspex_jupyter.core.errors import RemoteError
from dspex_jupyter.notebook import magics as magics_module
from dspex_jupyter.notebook import registry
from dspex_jupyter.notebook.gpu_widget import GpuMemoryWidget
from dspex_jupyter.notebook.magics import format_error
from dspex_jupyter.notebook.pool_dashboard import PoolDashboard
from dspex_jupyter.notebook.run_dashboard import dashboard_for
from dspex_jupyter.optimizers.mipro import RUNTIME
from tests.integration import mipro_helpers as mh

pytestmark = pytest.mark.integration

POOL = "nbpool"
WAIT = 60.0


@pytest.fixture(scope="module")
def ip():
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "dspex_jupyter")
    shell.run_line_magic("dspex", f"start {POOL} --size 2 --env-var DSPEX_NB_TEST=hello")
    try:
        yield shell
    finally:
        magics = magics_module.extension_state(shell)["magics"]
        for session in list(magics.sessions.values()):
            if session.active:
                session.release()
        magics.sessions.clear()
        registry.shutdown_default_manager()
        close_dspex_widgets()


def close_dspex_widgets() -> None:
    """Widgets displayed by the magics refresh on timers until closed."""
    from ipywidgets.widgets.widget import _instances

    for widget in list(_instances.values()):
        if type(widget).__module__.startswith("dspex_jupyter."):
            widget.close()


def dspex(ip, line, cell=None):
    if cell is None:
        return ip.run_line_magic("dspex", line)
    return ip.run_cell_magic("dspex", line, cell)


def test_start_run_and_session_cells(ip, capsys):
    dspex(ip, f"start {POOL} --size 2 --env-var DSPEX_NB_TEST=hello")
    assert capsys.readouterr().out == f"pool {POOL!r} is already running\n"
    dspex(ip, f"start {POOL} --size 3")
    assert "already running with other settings" in capsys.readouterr().err

    dspex(ip, f"run {POOL}", "import os\nprint('hi from', os.environ['DSPEX_NB_TEST'])\n6 * 7")
    out, err = capsys.readouterr()
    assert "hi from hello" in out and "42" in out and err == ""

    dspex(ip, f"run {POOL}", "def f():\n    return 1 / 0\nf()")
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert lines[0].startswith("dspex: ZeroDivisionError: division by zero (raised in pool ")
    assert "Remote traceback:" in lines and "return 1 / 0" in err
    assert "dspex_jupyter" not in err  # no internal traceback

    dspex(ip, f"session s1 --pool {POOL}")
    assert re.match(
        rf"session 's1' open on kernel {POOL}/\d+ of pool '{POOL}'", capsys.readouterr().out
    )
    dspex(ip, "session s1", "x = 41")
    dspex(ip, "session s1", "print(x + 1)")
    assert capsys.readouterr().out == "42\n"
    dspex(ip, f"session s1 --pool {POOL}")
    assert "is already open" in capsys.readouterr().err

    dspex(ip, "health")
    out = capsys.readouterr().out
    assert f"{POOL}: " in out and "2/2 kernels, 1 sessions" in out and "session " in out

    dspex(ip, "release s1")
    assert capsys.readouterr().out == "session 's1' released\n"
    dspex(ip, "session s1", "print(x)")
    assert "no session named 's1'" in capsys.readouterr().err


def test_limits_read_as_typed_and_dspex_checks_in_a_kernel_are_one_line(ip, capsys, tmp_path):
    dspex(ip, "start sized --max-memory 512MB")
    capsys.readouterr()
    try:
        dspex(ip, "health")
        lines = capsys.readouterr().out.splitlines()
        assert any(
            line.startswith("sized: ") and line.endswith(", memory limit 512MB") for line in lines
        ), lines
        assert registry.find_pool("sized").spec.max_memory == 512_000_000  # the limit, in bytes
    finally:
        dspex(ip, "stop sized")
    assert capsys.readouterr().out == "pool 'sized' stopped\n"

    # A check of dspex's own failing in a kernel (the folder check of start_run, which the
    # magic's own check pre-empts): its message and hint, no remote frames of dspex.
    used = CheckpointDir(tmp_path / "used")
    used.create()
    used.run_file.write_text("{}")
    with (
        registry.find_pool(POOL).session(timeout=WAIT) as session,
        pytest.raises(RemoteError) as caught,
    ):
        session.call(f"{RUNTIME}:start_run", {"checkpoint_dir": str(used.path)}, {}, {})
    assert caught.value.remote_traceback  # the kernel sent one ...
    assert format_error(caught.value).splitlines() == [  # ... and it is not shown
        f"dspex: CheckpointError: {used.path} already holds a run (raised in pool '{POOL}', "
        f"session '{session.id}')",
        "  hint: resume it with MIPROv2.resume(dir), or choose an empty checkpoint_dir",
    ]


def test_pool_dashboard_restarts_kernels_and_releases_sessions(ip, capsys):
    pool = registry.find_pool(POOL)
    dspex(ip, f"session held --pool {POOL}")
    capsys.readouterr()
    held = magics_module.extension_state(ip)["magics"].sessions["held"]
    board = PoolDashboard()
    try:
        assert f"{POOL}/" in board.table.value and held.id in board.table.value
        board.session_picker.value = (POOL, held.id)
        board.release_button.click()
        assert board.wait_idle(WAIT)
        assert f"session {held.id} released" in board.outcome.value
        assert not held.active

        free = next(k for k in pool.health()["kernels"] if k["session"] is None)
        board.refresh()
        board.kernel_picker.value = (POOL, free["id"])
        board.restart_button.click()
        assert board.wait_idle(WAIT)
        assert (
            f"kernel {free['id']} (pid {free['pid']}) killed and replaced by {POOL}/"
            in board.outcome.value
        )
        assert pool.wait_ready(timeout=WAIT)
        ids = [k["id"] for k in pool.health()["kernels"]]
        assert free["id"] not in ids and len(ids) == 2  # replaced
    finally:
        board.close()
    dspex(ip, "pools")
    assert "PoolDashboard" in capsys.readouterr().out  # displayed (as text in a shell)


def test_env_create_shows_its_steps_and_a_pool_starts_from_it(ip, capsys, tmp_path, monkeypatch):
    """%dspex env create with a real venv and pip: one line per step (no widget frontend in
    this shell), pip's output in the log; a pool runs the environment's Python; remove."""
    monkeypatch.setenv("DSPEX_HOME", str(tmp_path))
    dspex(ip, "env create nb-env --package six")
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert [line[:5] for line in lines[:5]] == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    assert re.fullmatch(r"created environment 'nb-env' \(\d+ packages\) in \d+ s", lines[5])
    assert len(lines) == 6, err
    assert out == (
        "environment 'nb-env' is ready (kernel dspex-nb-env); "
        "start a pool on it with %dspex start POOL --env nb-env\n"
    )
    env_dir = tmp_path / "envs" / "nb-env"
    assert "Successfully installed" in (env_dir / "dspex-install.log").read_text()
    dspex(ip, "env list")
    (row,) = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert row[0] == "nb-env" and row[-1] == "six" and int(row[3]) > 10
    dspex(ip, "start envpool --env nb-env")
    try:
        python = registry.find_pool("envpool").call(lambda: __import__("sys").executable)
        assert python == str(env_dir / "bin" / "python")
    finally:
        dspex(ip, "stop envpool")
    capsys.readouterr()
    dspex(ip, "env remove nb-env")
    assert capsys.readouterr().out == "environment 'nb-env' removed\n"
    assert not env_dir.exists()


def test_gpu_widget_without_a_gpu_shows_kernel_memory(ip):
    widget = GpuMemoryWidget()
    try:
        if not widget.state["available"]:  # these machines have no GPU
            assert "No GPU" in widget.body.value and f"{POOL}/" in widget.body.value
    finally:
        widget.close()


def test_optimize_dashboard_buttons_and_run_magics(ip, capsys, tmp_path):
    task = mh.task()
    ip.user_ns.update(
        program=task.make_program(),
        trainset=task.trainset,
        valset=task.valset,
        metric=task.metric,
        lm=task.lm(latency_s=0.1),
        OPTIONS=mh.OPTIONS,
        COMPILE=mh.COMPILE,
    )
    folder = tmp_path / "run"
    dspex(
        ip,
        f"optimize --pool {POOL} --program program --trainset trainset --valset valset "
        f"--metric metric --lm lm --optimizer-args OPTIONS --compile-args COMPILE "
        f"--checkpoint-dir {folder} --name nbrun",
    )
    out, err = capsys.readouterr()
    assert err == "" and "stored as `nbrun`" in out and "RunDashboard" in out
    run = ip.user_ns["nbrun"]
    board = dashboard_for(run)

    # The notebook goes on while the run runs, and the dashboard follows the run.
    run.wait_for_event(lambda e: e["kind"] == "trial" and e["number"] == 2, timeout=WAIT)
    assert ip.run_cell("y = sum(range(10))").success and ip.user_ns["y"] == 45
    dspex(ip, f"run {POOL}", "print('the other kernel is free')")
    assert "the other kernel is free" in capsys.readouterr().out
    assert board.wait_drawn(WAIT)
    assert board.chart.value.count('class="trial') >= 2 and not run.done
    assert board.phase_bars["bootstrap"].bar_style == "success"
    assert "Answer" in board.candidates.value or board.candidates.value.count("<tr>") > 1

    dspex(ip, "checkpoint nbrun")
    assert capsys.readouterr().out.startswith("checkpoint written: ckpt-")
    controls = board.controls
    assert not controls.checkpoint_button.disabled and controls.resume_button.disabled
    controls.checkpoint_button.click()
    assert controls.wait_idle(WAIT)
    assert "checkpoint written: ckpt-" in controls.outcome.value
    controls.cancel_button.click()  # asks to confirm first
    assert controls.cancel_button.description == "Confirm cancel?" and not run.done
    controls.cancel_button.click()
    assert controls.wait_idle(WAIT)
    assert run.status == "cancelled"
    assert board.wait_drawn(WAIT)  # the dashboard says it, once
    assert re.search(
        r"cancelled at trial \d+; resumable checkpoint: ckpt-\d+\.json", board.error.value
    )
    assert controls.checkpoint_button.disabled and controls.cancel_button.disabled
    assert not controls.resume_button.disabled  # the newest checkpoint is chosen

    dspex(ip, "attach nbrun")
    assert "RunDashboard" in capsys.readouterr().out
    assert dashboard_for(run) is board  # the same live widget, shown again

    controls.resume_button.click()
    assert controls.wait_idle(WAIT)
    assert "resumed run" in controls.outcome.value, controls.outcome.value
    resumed = board.run
    assert resumed is not run and ip.user_ns["nbrun"] is resumed
    assert dashboard_for(resumed) is board  # attach shows the dashboard that followed it
    resumed.wait_for_event(lambda e: e["kind"] == "trial", timeout=WAIT)
    dspex(ip, "cancel nbrun")  # the name now means the resumed run
    out = capsys.readouterr().out
    assert out.startswith("cancelled at trial") or "ended completed" in out

    dspex(ip, f"resume {folder} --pool {POOL} --name nbrun")
    out, err = capsys.readouterr()
    assert err == "" and "resumed in pool" in out
    final = ip.user_ns["nbrun"]
    result = final.result(timeout=WAIT)
    assert result.score is not None
    board = dashboard_for(final)
    assert board.wait_drawn(WAIT)
    assert "completed" in board.header.value
    dspex(ip, "cancel nbrun")
    assert "has already finished (completed)" in capsys.readouterr().err
    dspex(ip, "runs")
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == [
        "variable",
        "run",
        "optimizer",
        "status",
        "best",
        "best",
        "instruction",
        "cost",
        "time",
    ]
    # Runs other tests of this process still hold are listed too (variable "-"): find ours.
    ours = [row.split()[:4] for row in rows[1:] if row.split()[:1] == ["nbrun"]]
    assert ours == [["nbrun", run.run_id, "MIPROv2", "completed"]], rows

    # The folder holds that run now: one line, the way on, and no traceback.
    dspex(
        ip,
        f"optimize --pool {POOL} --program program --trainset trainset --metric metric --lm lm "
        f"--checkpoint-dir {folder} --name nbrun2",
    )
    out, err = capsys.readouterr()
    assert (out, err) == (
        "",
        f"dspex: {folder} already holds a run: `%dspex resume {folder}` to go on, "
        "or give a new --checkpoint-dir\n",
    )
    assert "nbrun2" not in ip.user_ns

    # What DSPy printed there; a progress bar redrawn with "\r" shows as its last state.
    text = final.log_path.read_bytes().decode()  # read_text would turn "\r" into "\n"
    written = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    assert written.pop() == "" and len(written) >= 3, written
    dspex(ip, "log nbrun --lines 3")
    assert capsys.readouterr() == ("".join(f"{line}\n" for line in written[-3:]), "")
    dspex(ip, f"log {run.run_id} --lines 1")  # by run id too
    assert capsys.readouterr().out == f"{written[-1]}\n"
    dspex(ip, "log nbrn")
    assert capsys.readouterr().err.startswith(
        "dspex: no optimization run called 'nbrn'\n  hint: did you mean 'nbrun'? "
    )
