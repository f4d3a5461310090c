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
    "envs",
    "gpu",
    "health",
    "optimize",
    "pools",
    "release",
    "resume",
    "run",
    "runs",
    "session",
    "start",
    "stop",
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
        ("optimize --pool p", "dspex: the following arguments are required: --program"),
        ("start 'unclosed", "dspex: cannot split the arguments"),
        ("start bad/name", "dspex: invalid pool name 'bad/name'"),
        ("start p --env e --python /usr/bin/python3", "dspex: pool 'p' names env and python"),
        ("start p --max-memory lots", "dspex: invalid memory size 'lots'"),
        ("stop nosuchpool", "dspex: no running pool named 'nosuchpool'"),
        ("attach nosuchrun", "dspex: no optimization run called 'nosuchrun'"),
        ("release nosuchsession", "dspex: no session named 'nosuchsession'"),
        ("run p", "dspex: %%dspex run is a cell magic"),
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
    dspex(ip, "optimize --pool p --program nothere --trainset t --metric m --lm lm")
    err = capsys.readouterr().err
    assert err.startswith("dspex: --") and "no variable" in err and "define it in a cell" in err


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
