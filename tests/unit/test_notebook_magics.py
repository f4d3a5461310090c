"""``%dspex`` parsing, help and error output in an IPython shell (no kernel, no pool)."""

from __future__ import annotations

import pytest
from IPython.core.interactiveshell import InteractiveShell

from dspex_jupyter.core.errors import RemoteError, Where
from dspex_jupyter.notebook import magics as magics_module
from dspex_jupyter.notebook import registry
from dspex_jupyter.notebook.magics import DspexMagics, format_error
from dspex_jupyter.optimizers.mipro import OptimizationRun

SUBCOMMANDS = [
    "attach",
    "cancel",
    "checkpoint",
    "env",
    "envs",
    "gpu",
    "health",
    "log",
    "optimize",
    "pools",
    "release",
    "resume",
    "run",
    "runs",
    "session",
    "start",
    "stop",
    "sweeps",
]


@pytest.fixture(scope="module")
def ip():
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "dspex_jupyter")
    return shell


def dspex(ip, line, cell=None):
    if cell is None:
        return ip.run_line_magic("dspex", line)
    return ip.run_cell_magic("dspex", line, cell)


def test_every_subcommand_has_help(ip, capsys):
    magics = magics_module.extension_state(ip)["magics"]
    assert sorted(magics.commands) == SUBCOMMANDS
    for name in SUBCOMMANDS:
        dspex(ip, f"{name} --help")
        out, err = capsys.readouterr()
        assert out.startswith(f"usage: %dspex {name}"), (name, out)
        assert err == ""
    dspex(ip, "optimize -h")
    out = capsys.readouterr().out
    for flag in (
        "--pool",
        "--program",
        "--trainset",
        "--valset",
        "--metric",
        "--lm",
        "--prompt-lm",
        "--num-candidates",
        "--num-trials",
        "--seed",
        "--checkpoint-dir",
        "--name",
    ):
        assert flag in out


def test_overview_lists_every_subcommand(ip, capsys):
    for line in ("", "--help", "help"):
        dspex(ip, line)
        out = capsys.readouterr().out
        for name in SUBCOMMANDS:
            assert f"\n  {name} " in out
    # The magic's own docstring (%dspex?) says where to look.
    assert "--help" in DspexMagics.dspex.__doc__


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("start", "dspex: the following arguments are required: name"),
        ("start p --size many", "dspex: argument --size: invalid int value: 'many'"),
        ("frobnicate", "dspex: unknown subcommand 'frobnicate'"),
        ("log", "dspex: the following arguments are required: run"),
        ("log r --lines 0", "dspex: ValueError: --lines must be at least 1, got 0"),
        ("optimize --pool p", "dspex: the following arguments are required: --program"),
        ("start 'unclosed", "dspex: cannot split the arguments"),
        ("start bad/name", "dspex: invalid pool name 'bad/name'"),
        ("start p --env e --python /usr/bin/python3", "dspex: pool 'p' names env and python"),
        ("start p --max-memory lots", "dspex: invalid memory size 'lots'"),
        ("stop nosuchpool", "dspex: no running pool named 'nosuchpool'"),
        ("attach nosuchrun", "dspex: no optimization run called 'nosuchrun'"),
        ("release nosuchsession", "dspex: no session named 'nosuchsession'"),
        ("run p", "dspex: %%dspex run is a cell magic"),
        ("env create bad/name", "dspex: invalid environment name 'bad/name'"),
        ("env rebuild", "dspex: env rebuild needs the environment's NAME"),
        ("env list extra", "dspex: env list takes no NAME (got 'extra')"),
        ("env remove x --package six", "dspex: --package, --requirements and --python are for"),
    ],
)
def test_bad_arguments_give_one_clear_line(ip, capsys, line, expected):
    assert dspex(ip, line) is None
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(expected), err
    lines = err.strip().splitlines()
    assert len(lines) <= 2 and all(line.startswith("  hint: ") for line in lines[1:]), err
    assert "Traceback" not in err


def test_only_run_and_session_take_a_cell(ip, capsys):
    dspex(ip, "health", "print(1)")
    assert capsys.readouterr().err.startswith("dspex: %%dspex health takes no cell")


def test_remote_error_shows_one_line_and_the_remote_traceback(ip, capsys, monkeypatch):
    error = RemoteError(
        "ZeroDivisionError",
        "division by zero",
        remote_traceback=[
            "Traceback (most recent call last):\n",
            '  File "<cell>", line 1, in <module>\n',
            "ZeroDivisionError: division by zero\n",
        ],
        where=Where(pool="p", kernel="p/1", session="abc"),
    )

    class FailingSession:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def execute(self, code, timeout=None):
            raise error

    class FakePool:
        def session(self, timeout=None):
            return FailingSession()

    monkeypatch.setattr(registry, "find_pool", lambda name: FakePool())
    dspex(ip, "run p", "1 / 0")
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0] == (
        "dspex: ZeroDivisionError: division by zero (raised in pool 'p', session 'abc')"
    )
    assert lines[1] == f"  hint: {RemoteError.hint}"  # every error has a default hint
    assert lines[2] == "Remote traceback:"
    assert lines[-1] == "ZeroDivisionError: division by zero"
    assert len(lines) == 6  # no local traceback
    assert 'File "<cell>"' in err and "magics.py" not in err


def test_format_error_keeps_hints_and_kernel_details():
    from dspex_jupyter.checkpoint import CheckpointError
    from dspex_jupyter.core.errors import PoolExhausted, PoolStartError

    text = format_error(PoolExhausted("no kernel of pool 'p' became free", hint="release one"))
    assert text == "dspex: no kernel of pool 'p' became free\n  hint: release one"
    text = format_error(CheckpointError("ckpt-000002.json fails its checksum", hint="use another"))
    assert text == "dspex: ckpt-000002.json fails its checksum\n  hint: use another"
    text = format_error(PoolStartError("start-up code failed in kernel p/1: NameError: x\nline 1"))
    assert text.splitlines() == [
        "dspex: start-up code failed in kernel p/1: NameError: x",
        f"  hint: {PoolStartError.hint}",  # a PoolStartError always has a hint
        "line 1",
    ]
    assert format_error(KeyError("missing")) == "dspex: KeyError: missing"


def test_unexpected_errors_are_short_unless_debugging(ip, capsys, monkeypatch):
    def explode(name):
        raise RuntimeError("something internal broke\nwith details")

    monkeypatch.setattr(registry, "find_pool", explode)
    dspex(ip, "run p", "1")
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "dspex: internal error: RuntimeError: something internal broke",
        "  hint: %dspex --debug run p shows the traceback",
    ]
    with pytest.raises(RuntimeError, match="something internal broke"):
        dspex(ip, "--debug run p", "1")


def test_optimize_checks_its_variables(ip, capsys, monkeypatch):
    monkeypatch.setattr(registry, "find_pool", lambda name: object())
    ip.user_ns["run_taken"] = 42
    dspex(ip, "optimize --pool p --program prog --trainset t --metric m --lm lm --name run_taken")
    assert capsys.readouterr().err.startswith("dspex: the notebook variable 'run_taken' is taken")
    dspex(ip, "optimize --pool p --program prog --trainset t --metric m --lm lm --name my-run")
    assert "is not a Python variable name" in capsys.readouterr().err
    ip.user_ns.update(t=[], m=len, lm=object())
    try:
        dspex(ip, "optimize --pool p --program nothere --trainset t --metric m --lm lm")
    finally:
        for name in ("t", "m", "lm"):
            ip.user_ns.pop(name)
    assert capsys.readouterr().err.splitlines() == [
        "dspex: --program nothere: no variable 'nothere' in the notebook",
        "  hint: define it in a cell first (a program or metric may also be 'package.module:name')",
    ]


def test_load_ext_is_idempotent_and_quiet(capsys):
    shell = InteractiveShell.instance()
    magics_module.unload_ipython_extension(shell)
    assert "dspex" not in shell.magics_manager.magics["line"]
    magics_module.load_ipython_extension(shell)
    first = magics_module.extension_state(shell)
    assert first is not None
    magics_module.load_ipython_extension(shell)
    assert magics_module.extension_state(shell) is first
    assert capsys.readouterr() == ("", "")
    assert "dspex" in shell.magics_manager.magics["line"]
    assert "dspex" in shell.magics_manager.magics["cell"]
    # A run as a cell's value shows its dashboard.
    formatter = shell.display_formatter.ipython_display_formatter
    from dspex_jupyter.notebook.run_dashboard import display_run

    assert formatter.lookup_by_type(OptimizationRun) is display_run
    assert first["bridge"] is None  # no kernel, so no frontend can open the lab comm


def test_default_manager_is_made_once_and_lazily():
    assert registry._default is None or not registry._default._closed
    manager = registry.default_manager()
    try:
        assert registry.default_manager() is manager
        assert registry.managers()[0] is manager
    finally:
        registry.shutdown_default_manager()
    assert registry._default is None


# ---- errors that read naturally (issue #13) ----------------------------------------------
def test_a_misspelt_subcommand_gets_did_you_mean(ip, capsys):
    dspex(ip, "stat")
    assert capsys.readouterr().err.splitlines() == [
        "dspex: unknown subcommand 'stat'",
        "  hint: did you mean 'start'? %dspex --help lists them",
    ]
    dspex(ip, "frobnicate")  # nothing close: only where to look
    assert capsys.readouterr().err.splitlines()[1] == "  hint: %dspex --help lists them"


def make_environment(home, name):
    """A finished-looking dspex environment: its record and its Python (a link)."""
    import json
    import sys

    from dspex_jupyter.core.envs import RECORD_FILE, envs_dir

    folder = envs_dir(home) / name
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").symlink_to(sys.executable)
    (folder / RECORD_FILE).write_text(json.dumps({"name": name, "packages": []}))


def test_a_misspelt_environment_gets_did_you_mean_and_the_list(ip, capsys, tmp_path, monkeypatch):
    from dspex_jupyter.core.envs import envs_dir, list_environments

    monkeypatch.setenv("DSPEX_HOME", str(tmp_path))
    for name in ("tut-light", "tut-tables"):
        make_environment(tmp_path, name)
    assert [env.name for env in list_environments()] == ["tut-light", "tut-tables"]
    monkeypatch.setattr(registry, "default_manager", lambda: pytest.fail("no pool may start"))
    dspex(ip, "start p --env tut-lihgt")
    assert capsys.readouterr().err.splitlines() == [
        f"dspex: no dspex environment named 'tut-lihgt' in {envs_dir()}",
        "  hint: did you mean 'tut-light'? environments: tut-light, tut-tables; "
        "or create it with: dspex env create tut-lihgt",
    ]
    dspex(ip, "start p --env zzz")
    assert capsys.readouterr().err.splitlines()[1] == (
        "  hint: environments: tut-light, tut-tables; or create it with: dspex env create zzz"
    )


def make_full_environment(home, name, packages=(), lock=3, version="0.1.0"):
    """A finished-looking environment whose record has what `env list` shows."""
    import json

    from dspex_jupyter.core.envs import RECORD_FILE, envs_dir

    make_environment(home, name)
    record = {
        "name": name,
        "packages": list(packages),
        "python": {"version": "3.11.7"},
        "dspex_jupyter_version": version,
        "lock": [f"pkg{i}==1.0" for i in range(lock)],
    }
    (envs_dir(home) / name / RECORD_FILE).write_text(json.dumps(record))


def test_env_actions_get_did_you_mean(ip, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DSPEX_HOME", str(tmp_path))
    dspex(ip, "env creat demo")
    assert capsys.readouterr().err.splitlines() == [
        "dspex: unknown env action 'creat'",
        "  hint: did you mean 'create'? use one of: create, list, remove, rebuild",
    ]
    make_full_environment(tmp_path, "tut-light")
    dspex(ip, "env remove tut-lihgt")
    assert capsys.readouterr().err.splitlines()[1] == (
        "  hint: did you mean 'tut-light'? environments: tut-light; "
        "or create it with: %dspex env create tut-lihgt"
    )
    dspex(ip, "env rebuild nothing-close")
    assert capsys.readouterr().err.splitlines()[1] == (
        "  hint: environments: tut-light; or create it with: %dspex env create nothing-close"
    )
    assert (tmp_path / "envs" / "tut-light").is_dir()  # nothing was touched


def test_env_list_is_a_table_of_python_runtime_and_packages(ip, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DSPEX_HOME", str(tmp_path))
    dspex(ip, "env list")
    assert capsys.readouterr().out.startswith("no dspex environments in ")
    make_full_environment(tmp_path, "tut-opt", ["dspy==3.4.1", "optuna"], lock=61)
    make_full_environment(tmp_path, "tut-light", lock=32, version="0.0.9")
    (tmp_path / "envs" / "half").mkdir()  # a create that died: no record
    dspex(ip, "env list")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines] == [
        ["name", "Python", "dspex", "runtime", "packages", "asked", "for"],
        ["half", "not", "usable", "-", "-", "its", "creation", "did", "not", "finish", "(no",
         "record", "file)"],
        ["tut-light", "3.11.7", "0.0.9", "32", "-"],
        ["tut-opt", "3.11.7", "0.1.0", "61", "dspy==3.4.1", "optuna"],
    ]  # fmt: skip
    assert lines[0].index("packages") == lines[3].index("61")  # aligned columns
    from dspex_jupyter.notebook.envs_table import envs_table

    html = envs_table()._repr_html_()
    assert html.count("<tr>") == 4 and "<th" in html and "dspex runtime" in html
    dspex(ip, "envs")  # the older spelling shows the same table
    assert "tut-opt" in capsys.readouterr().out


def test_env_remove_removes_the_folder_and_says_so(ip, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DSPEX_HOME", str(tmp_path))
    make_full_environment(tmp_path, "gone")
    dspex(ip, "env remove gone")
    assert capsys.readouterr().out == "environment 'gone' removed\n"
    assert not (tmp_path / "envs" / "gone").exists()


def test_env_progress_bar_follows_the_steps():
    from dspex_jupyter.core.envs import STEPS, EnvStep
    from dspex_jupyter.notebook.env_progress import EnvProgressBar

    bar = EnvProgressBar()
    try:
        assert (bar.bar.value, bar.bar.max) == (0, len(STEPS)) and "starting" in bar.label.value
        bar(EnvStep("tut-opt", "create", "packages", 3, 5, "installing packages (pip)"))
        assert bar.bar.value == 2  # runtime wheel and venv done
        bar(EnvStep("tut-opt", "create", "packages", 3, 5, "installing packages: 7 collected",
                    count=7, update=True))  # fmt: skip
        assert "<b>tut-opt</b> · [3/5] installing packages: 7 collected" in bar.label.value
        assert repr(bar) == "environment tut-opt: [3/5] installing packages: 7 collected"
        bar(EnvStep("tut-opt", "create", "done", 5, 5, "created environment 'tut-opt' in 40 s"))
        assert (bar.bar.value, bar.bar.bar_style) == (5, "success")
        assert "created environment &#x27;tut-opt&#x27; in 40 s" in bar.label.value
        bar(EnvStep("x", "create", "failed", 3, 5, "installing packages failed"))
        assert bar.bar.bar_style == "danger" and "error-color" in bar.label.value
    finally:
        bar.close()


class PoolsOf:
    """A manager stand-in holding pools by name (what find_pool and `pools` read)."""

    def __init__(self, *names):
        self.pools = dict.fromkeys(names)


def test_a_misspelt_pool_gets_did_you_mean(ip, capsys, monkeypatch):
    monkeypatch.setattr(registry, "managers", lambda: [PoolsOf("nbpool", "gpu-pool")])
    dspex(ip, "stop nbpol")
    assert capsys.readouterr().err.splitlines() == [
        "dspex: no running pool named 'nbpol'",
        "  hint: did you mean 'nbpool'? running pools: gpu-pool, nbpool; "
        "start one with %dspex start nbpol",
    ]


OPTIMIZE = "optimize --pool p --program prog --trainset trainst --metric metrik --lm task_lm"


def test_every_missing_variable_is_named_at_once_with_suggestions(ip, capsys, monkeypatch):
    monkeypatch.setattr(registry, "find_pool", lambda name: pytest.fail("looked for a pool"))
    # Only the names this test defines may be near-misses (another test may have left
    # `train` or `task` in the shared shell's namespace).
    for name in [n for n in ip.user_ns if not n.startswith("_")]:
        monkeypatch.delitem(ip.user_ns, name)
    ip.user_ns.update(program=object(), trainset=[], metric=len)
    try:
        dspex(ip, OPTIMIZE)
        assert capsys.readouterr().err.splitlines() == [
            "dspex: 4 variables are not in the notebook: --program prog, --trainset trainst, "
            "--metric metrik, --lm task_lm",
            "  hint: did you mean 'program' for --program prog, 'trainset' for --trainset "
            "trainst, 'metric' for --metric metrik? Otherwise define them in a cell first "
            "(a program or metric may also be 'package.module:name')",
        ]
        dspex(ip, OPTIMIZE.replace("task_lm", "openai/gpt-4o-mini").replace("prog ", "program "))
        assert capsys.readouterr().err.splitlines() == [
            "dspex: 2 variables are not in the notebook: --trainset trainst, --metric metrik",
            "  hint: did you mean 'trainset' for --trainset trainst, 'metric' for --metric "
            "metrik? Otherwise define them in a cell first "
            "(a program or metric may also be 'package.module:name')",
        ]
        dspex(ip, "resume /nowhere --pool p --lm task_lmm")
        assert capsys.readouterr().err.splitlines() == [
            "dspex: --lm task_lmm: no variable 'task_lmm' in the notebook",
            "  hint: define it in a cell first",
        ]
    finally:
        for name in ("program", "trainset", "metric"):
            ip.user_ns.pop(name, None)


def test_a_used_checkpoint_folder_is_one_line(ip, capsys, monkeypatch, tmp_path):
    from dspex_jupyter.checkpoint import CheckpointDir

    folder = CheckpointDir(tmp_path / "used")
    folder.create()
    folder.run_file.write_text("{}")
    monkeypatch.setattr(registry, "find_pool", lambda name: pytest.fail("looked for a pool"))
    ip.user_ns.update(prog=object(), ts=[], m=len, lm=object())
    try:
        dspex(
            ip,
            f"optimize --pool p --program prog --trainset ts --metric m --lm lm "
            f"--checkpoint-dir {tmp_path / 'used'}",
        )
    finally:
        for name in ("prog", "ts", "m", "lm"):
            ip.user_ns.pop(name)
    assert capsys.readouterr().err == (
        f"dspex: {folder.path} already holds a run: `%dspex resume {folder.path}` to go on, "
        "or give a new --checkpoint-dir\n"
    )


def remote_error(module, etype, message):
    return RemoteError(
        etype,
        message,
        remote_module=module,
        remote_traceback=[
            "Traceback (most recent call last):\n",
            '  File "/site-packages/dspex_jupyter/runtime/mipro.py", line 9, in start_run\n',
            f"{etype}: {message}\n",
        ],
        where=Where(pool="p", kernel="p/1", session="abc"),
        hint="what to do",
    )


def test_dspex_own_remote_errors_have_no_remote_traceback():
    own = remote_error("dspex_jupyter.checkpoint", "CheckpointError", "/x is not a run")
    assert format_error(own).splitlines() == [
        "dspex: CheckpointError: /x is not a run (raised in pool 'p', session 'abc')",
        "  hint: what to do",
    ]
    users = remote_error("mymetrics", "KeyError", "'answer'")
    assert format_error(users).splitlines()[2:4] == [
        "Remote traceback:",
        "Traceback (most recent call last):",
    ]


# ---- empty states ------------------------------------------------------------------------
def test_pools_and_runs_without_any_say_how_to_start(ip, capsys, monkeypatch):
    monkeypatch.setattr(registry, "managers", lambda: [PoolsOf()])
    monkeypatch.setattr(registry, "runs", lambda: [])
    dspex(ip, "pools")
    assert capsys.readouterr() == (
        "no pool is running; start one with %dspex start NAME --size N\n",
        "",
    )
    dspex(ip, "runs")
    assert capsys.readouterr() == (
        "no optimization run yet; start one with %dspex optimize --pool POOL ...\n",
        "",
    )


def test_gpu_widget_without_gpu_or_limit_has_no_dangling_text():
    from dspex_jupyter.notebook.gpu_widget import GpuMemoryWidget

    assert GpuMemoryWidget._no_gpu_html("no NVML", []) == (
        "<div><b>No GPU</b>: no NVML. No pool is running: start one with %dspex start NAME.</div>"
    )
    row = {"pool": "p", "kernel": "p/0", "pid": 7, "state": "idle", "rss": 2**20}
    html = GpuMemoryWidget._no_gpu_html("no NVML", [{**row, "max_memory": None}])
    assert html.startswith("<div><b>No GPU</b>: no NVML. Kernel memory (RSS):</div><table")
    assert ">RSS</th>" in html and "max_memory" not in html
    html = GpuMemoryWidget._no_gpu_html("no NVML", [{**row, "max_memory": 2**30}])
    assert "Kernel memory (RSS), against each pool's max_memory:</div>" in html
    assert ">RSS / max_memory</th>" in html


# ---- sizes as the user gave them ---------------------------------------------------------
def test_memory_limits_are_shown_in_the_unit_given():
    from dspex_jupyter.core.spec import parse_memory

    registry.remember_memory_text("sized", "512MB", parse_memory("512MB"))
    try:
        assert registry.memory_text("sized", 512_000_000) == "512MB"
        assert registry.memory_text("sized", 2**30) == "1GiB"  # restarted with another
        # Pools started in Python: the unit that holds the limit exactly.
        assert registry.memory_text("other", 512_000_000) == "512MB"
        assert registry.memory_text("other", 3 * 2**29) == "1536MiB"
        assert registry.memory_text("sized", None) == "no limit"
    finally:
        registry.remember_memory_text("sized", None, None)
    assert registry.memory_text("sized", 512_000_000) == "512MB"
    registry.remember_memory_text("typed", "4G", parse_memory("4G"))
    try:
        assert registry.memory_text("typed", 4 * 2**30) == "4G"  # exactly as typed
    finally:
        registry.remember_memory_text("typed", None, None)


def test_pool_dashboard_shows_the_limit_as_given():
    from dspex_jupyter.notebook.pool_dashboard import pools_html
    from dspex_jupyter.notebook.snapshot import snapshot

    from .test_notebook_fakes import FakeManager, FakeNvml

    def html(limit):
        return pools_html(snapshot([FakeManager(max_memory=limit)], [], nvml=FakeNvml({})))

    assert "memory limit 512MB" in html(512_000_000) and " / 512MB" in html(512_000_000)
    assert "488.3 MiB" not in html(512_000_000)
    registry.remember_memory_text("fakepool", "0.5GB", 500_000_000)
    try:
        assert "memory limit 0.5GB" in html(500_000_000) and " / 0.5GB" in html(500_000_000)
    finally:
        registry.remember_memory_text("fakepool", None, None)
    assert "no memory limit" in html(None)


def test_format_limit_round_trips_and_picks_the_exact_unit():
    from dspex_jupyter.core.spec import format_limit, parse_memory

    for text, shown in [
        ("512MB", "512MB"),
        ("4GB", "4GB"),
        ("2GiB", "2GiB"),
        ("1.5GiB", "1536MiB"),
    ]:
        assert format_limit(parse_memory(text)) == shown
        assert parse_memory(shown) == parse_memory(text)
    assert format_limit(123_456_789) == "117.7 MiB"  # no exact unit: as format_bytes writes it


def test_health_shows_the_limit_as_typed(ip, capsys, monkeypatch):
    from dspex_jupyter.notebook import snapshot

    from .test_notebook_fakes import FakeManager

    monkeypatch.setattr(registry, "managers", lambda: [FakeManager(max_memory=4 * 10**9)])
    registry.remember_memory_text("fakepool", "4GB", 4 * 10**9)
    try:
        dspex(ip, "health")
    finally:
        registry.remember_memory_text("fakepool", None, None)
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (
        "fakepool: python /usr/bin/python3; 2/2 kernels, 1 sessions, 1 deaths, memory limit 4GB"
    )
    assert snapshot.pool_health()[0]["max_memory"] == 4 * 10**9  # the limit stays in bytes


# ---- runs and their logs -----------------------------------------------------------------
def fake_runs(tmp_path):
    from .test_notebook_fakes import FakeRun, feed_typical_run

    class LoggedRun(FakeRun):
        spec = {"optimizer": {"auto": "light"}}

        @property
        def log_path(self):
            return self.checkpoint_dir / "run.log"

    first = LoggedRun("aaa111", tmp_path / "a")
    feed_typical_run(first, trials=7)
    first.emit("complete", best_score=55.0, usage=first.metrics["usage"], time=1010.0)
    first.finish("completed")
    second = LoggedRun("bbb222", tmp_path / "b")
    second.spec = {"optimizer": {"auto": None}}
    second.emit("status", status="running", time=2000.0)
    return first, second


def test_runs_is_a_table_of_variables_scores_and_instructions(ip, capsys, monkeypatch, tmp_path):
    from dspex_jupyter.notebook.runs_table import runs_table

    first, second = fake_runs(tmp_path)
    namespace = {"_": first, "tuned": first, "x": 3}
    table = runs_table([first, second], namespace, now=2075.0)
    assert repr(table).splitlines() == [
        "variable  run     optimizer      status     best  best instruction              cost"
        "     time",
        "tuned     aaa111  MIPROv2 light  completed  55    Think about <units> & answer  $0.0070"
        "  10s",
        "-         bbb222  MIPROv2        starting   -     -                             -"
        "        1m 15s",
    ]
    html = table._repr_html_()
    assert html.startswith('<table class="dspex-runs"') and "<th" in html
    assert ">Think about &lt;units&gt; &amp; answer</td>" in html  # escaped

    monkeypatch.setattr(registry, "runs", lambda: [first])
    ip.user_ns["tuned"] = first
    try:
        dspex(ip, "runs")
    finally:
        ip.user_ns.pop("tuned")
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("tuned     aaa111  MIPROv2 light  completed  55 ")


def test_long_instructions_are_shortened():
    from dspex_jupyter.notebook.runs_table import shorten

    assert shorten("word " * 30, 20) == "word word word word…"
    assert shorten("a\n  b") == "a b"


def test_log_prints_the_end_of_run_log(ip, capsys, monkeypatch, tmp_path):
    first, second = fake_runs(tmp_path)
    monkeypatch.setattr(registry, "runs", lambda: [first, second])
    first.checkpoint_dir.mkdir()
    first.log_path.write_text("".join(f"line {i}\n" for i in range(1, 101)))
    dspex(ip, "log aaa111 --lines 3")
    assert capsys.readouterr() == ("line 98\nline 99\nline 100\n", "")
    dspex(ip, "log aaa111")
    assert capsys.readouterr().out == "".join(f"line {i}\n" for i in range(81, 101))
    dspex(ip, "log bbb222")
    assert capsys.readouterr().out == (
        f"run bbb222 has written no log yet ({tmp_path / 'b' / 'run.log'})\n"
    )
    dspex(ip, "log aaa11")
    assert capsys.readouterr().err.splitlines() == [
        "dspex: no optimization run called 'aaa11'",
        "  hint: did you mean 'aaa111'? give the variable that holds the run "
        "(--name of %dspex optimize) or its run id; run ids: aaa111, bbb222",
    ]


def test_tail_reads_long_logs_from_the_end(tmp_path):
    from dspex_jupyter.notebook.magics import tail

    log = tmp_path / "run.log"
    log.write_text("x" * 200_000 + "\nsecond\nlast without newline")
    assert tail(log, 2) == "second\nlast without newline\n"
    log.write_text("")
    assert tail(log, 5) == ""
    log.write_text("start\nbar  10%\rbar  50%\rbar 100%\r\ndone\n")  # a progress bar
    assert tail(log, 2) == "bar 100%\ndone\n"


def test_a_folder_filled_meanwhile_gets_the_same_line_from_the_kernel(
    ip, capsys, monkeypatch, tmp_path
):
    """The kernel's own check (a run started there after the notebook looked)."""
    from dspex_jupyter.optimizers import mipro

    folder = tmp_path / "raced"

    class KernelSaysUsed:
        def __init__(self, pool, **options):
            pass

        def optimize(self, *args, checkpoint_dir=None, **kwargs):
            raise remote_error(
                "dspex_jupyter.checkpoint", "CheckpointError", f"{folder} already holds a run"
            )

    monkeypatch.setattr(registry, "find_pool", lambda name: object())
    monkeypatch.setattr(mipro, "MIPROv2", KernelSaysUsed)
    ip.user_ns.update(prog=object(), ts=[], m=len, lm=object())
    try:
        dspex(
            ip,
            "optimize --pool p --program prog --trainset ts --metric m --lm lm "
            f"--checkpoint-dir {folder} --name raced_run",
        )
    finally:
        for name in ("prog", "ts", "m", "lm"):
            ip.user_ns.pop(name)
    assert capsys.readouterr().err == (
        f"dspex: {folder} already holds a run: `%dspex resume {folder}` to go on, "
        "or give a new --checkpoint-dir\n"
    )
    assert "raced_run" not in ip.user_ns
