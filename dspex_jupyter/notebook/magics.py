"""``%dspex`` and ``%%dspex``: pools, sessions and optimization runs from notebook cells.

Load with ``%load_ext dspex_jupyter``. ``%dspex --help`` lists the subcommands and
``%dspex SUBCOMMAND --help`` explains one. Pools started here belong to one notebook-level
``PoolManager`` (see ``registry``); pools of managers made in Python are found too.

A failing subcommand prints one line, ``dspex: <what went wrong>``, and its hint on
stderr; misspelt names get "did you mean". The remote traceback follows only when code of
the user's failed in a pool kernel (not for dspex's own checks there); the internal
traceback is not shown (``%dspex --debug SUBCOMMAND ...`` shows it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.utils.process import arg_split

from ..checkpoint import CheckpointDir, CheckpointError
from ..core.errors import DspexError, EnvironmentNotFound, RemoteError
from . import actions, registry
from .html_render import first_line
from .registry import did_you_mean

# Errors that are the user's to fix: one line and a hint, no traceback.
EXPECTED_ERRORS = (DspexError, CheckpointError, ValueError, TypeError, LookupError, TimeoutError)
CELL_COMMANDS = ("run", "session")
ENV_ACTIONS = ("create", "list", "remove", "rebuild")
DEFAULT_RUN_NAME = "run"
DEFAULT_LOG_LINES = 20


# Shared by every magic that waits for a free kernel of a pool.
WAIT_ARGUMENT = argument(
    "--wait", type=float, default=60.0, metavar="SECONDS", help="seconds to wait for a free kernel"
)


def run_output_arguments(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--name`` and ``--no-display``, for the magics that start a run."""
    func = argument("--no-display", action="store_true", help="do not show the dashboard")(func)
    return argument("--name", help=f"variable to store the run in (default {DEFAULT_RUN_NAME!r})")(
        func
    )


def format_error(exc: BaseException, command: str = "") -> str:
    """One line saying what went wrong, its hint, and the remote traceback if any."""
    if isinstance(exc, UsageError):
        more = f"%dspex {command} --help" if command else "%dspex --help"
        return f"dspex: {exc}\n  hint: {more} shows the options"
    message = str(exc.args[0]) if exc.args else type(exc).__name__
    lines = message.strip().splitlines() or [type(exc).__name__]
    if not isinstance(exc, DspexError | CheckpointError):
        lines[0] = f"{type(exc).__name__}: {lines[0]}"
    hint = getattr(exc, "hint", "")
    if getattr(exc, "inline_hint", False):
        return f"dspex: {lines[0]}: {hint}"
    out = [f"dspex: {lines[0]}"]
    if hint:
        out.append(f"  hint: {hint}")
    # Kernel-side details folded into the message (e.g. failing start-up code).
    out.extend(line for line in lines[1:] if not line.strip().startswith("hint:"))
    if isinstance(exc, RemoteError) and exc.remote_traceback and not _raised_by_dspex(exc):
        out.append("Remote traceback:")
        out.extend("".join(exc.remote_traceback).rstrip("\n").splitlines())
    return "\n".join(out)


def _raised_by_dspex(exc: RemoteError) -> bool:
    """An error type of dspex's own (a check such as "folder already holds a run"): its
    remote traceback runs through dspex's frames only, nothing of the user's to read."""
    return exc.remote_module.split(".")[0] == "dspex_jupyter"


def _usage(parser: argparse.ArgumentParser) -> str:
    return parser.format_help().replace("::\n\n  %", "usage: %", 1)


def _key_values(pairs: list[str] | None, what: str) -> dict[str, str]:
    """``KEY=VALUE`` pairs; a bare ``KEY`` copies the notebook's own environment variable."""
    values = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            if key not in os.environ:
                raise ValueError(f"{what} {key!r} has no value and is not set in this notebook")
            value = os.environ[key]
        values[key] = value
    return values


@magics_class
class DspexMagics(Magics):
    """The ``%dspex`` line magic and ``%%dspex`` cell magic."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.sessions: dict[str, Any] = {}  # named sessions of %dspex session NAME

    @property
    def commands(self) -> dict[str, Callable[[str, str | None], Any]]:
        return {
            name[len("_cmd_") :]: getattr(self, name)
            for name in sorted(dir(self))
            if name.startswith("_cmd_")
        }

    # ---- dispatch -----------------------------------------------------------------
    @line_cell_magic
    def dspex(self, line: str, cell: str | None = None) -> Any:
        """Pools, sessions and optimization runs of dspex-jupyter; %dspex --help lists them."""
        words = line.strip().split(None, 1)
        debug = bool(words) and words[0] == "--debug"
        if debug:
            words = words[1].split(None, 1) if len(words) > 1 else []
        if not words or words[0] in ("-h", "--help", "help"):
            print(self.overview())
            return None
        command, rest = words[0], words[1] if len(words) > 1 else ""
        handler = self.commands.get(command)
        try:
            if handler is None:
                raise DspexError(
                    f"unknown subcommand {command!r}",
                    hint=f"{did_you_mean(command, self.commands)}%dspex --help lists them",
                )
            try:
                tokens = arg_split(rest)
            except ValueError as exc:
                raise UsageError(f"cannot split the arguments: {exc}") from None
            if "-h" in tokens or "--help" in tokens:
                print(_usage(handler.parser))
                return None
            if cell is not None and command not in CELL_COMMANDS:
                raise UsageError(f"%%dspex {command} takes no cell; use %dspex {command}")
            if cell is None and command == "run":
                raise UsageError("%%dspex run is a cell magic: put the code in the cell below it")
            return handler(rest, cell)
        except (*EXPECTED_ERRORS, UsageError) as exc:
            if debug:
                raise
            print(format_error(exc, command if handler is not None else ""), file=sys.stderr)
        except Exception as exc:  # not the user's to fix: short, with the way to see more
            if debug:
                raise
            print(
                f"dspex: internal error: {type(exc).__name__}: {first_line(str(exc))}\n"
                f"  hint: %dspex --debug {line.strip()} shows the traceback",
                file=sys.stderr,
            )
        return None

    def overview(self) -> str:
        return overview()

    # ---- helpers ------------------------------------------------------------------
    @property
    def namespace(self) -> dict[str, Any]:
        return self.shell.user_ns

    def _variables(self, wanted: dict[str, tuple[str | None, str]]) -> dict[str, Any]:
        """The values of ``{flag: (name, kind)}``, every missing variable named at once.

        ``kind``: "variable"; "reference" (or a "package.module:name" path); "lm" (or a
        model name such as "openai/gpt-4o-mini")."""
        found: dict[str, Any] = {}
        missing: list[tuple[str, str, str]] = []
        for flag, (name, kind) in wanted.items():
            if name is None:
                found[flag] = None
            elif name in self.namespace:
                found[flag] = self.namespace[name]
            elif (kind == "reference" and ":" in name) or (kind == "lm" and "/" in name):
                found[flag] = name
            else:
                missing.append((flag, name, kind))
        if missing:
            raise self._missing_variables(missing)
        return found

    def _missing_variables(self, missing: list[tuple[str, str, str]]) -> DspexError:
        hidden = getattr(self.shell, "user_ns_hidden", {})
        defined = [k for k in self.namespace if not k.startswith("_") and k not in hidden]
        guesses = []
        for flag, name, _ in missing:
            close = registry.close_names(name, defined)
            if close:
                guesses.append(f"{close} for {flag} {name}" if len(missing) > 1 else close)
        suggestion = f"did you mean {', '.join(guesses)}? Otherwise " if guesses else ""
        paths = any(kind == "reference" for _, _, kind in missing)
        if len(missing) == 1:
            flag, name, _ = missing[0]
            message = f"{flag} {name}: no variable {name!r} in the notebook"
            todo = "define it in a cell first"
        else:
            named = ", ".join(f"{flag} {name}" for flag, name, _ in missing)
            message = f"{len(missing)} variables are not in the notebook: {named}"
            todo = "define them in a cell first"
        if paths:
            todo += " (a program or metric may also be 'package.module:name')"
        return DspexError(message, hint=suggestion + todo)

    def _run_name(self, name: str | None) -> str:
        from ..optimizers.mipro import OptimizationRun

        name = name or DEFAULT_RUN_NAME
        if not name.isidentifier():
            raise ValueError(f"--name {name!r} is not a Python variable name")
        held = self.namespace.get(name)
        if held is not None and not isinstance(held, OptimizationRun):
            raise DspexError(
                f"the notebook variable {name!r} is taken",
                hint="pass --name OTHER to store the run elsewhere",
            )
        return name

    def _show_run(self, run: Any, name: str, display_it: bool) -> None:
        from .run_dashboard import dashboard_for

        dashboard = dashboard_for(run)
        dashboard.controls.on_resumed(lambda new: self.namespace.__setitem__(name, new))
        if display_it:
            from IPython.display import display

            display(dashboard)

    def _session(self, name: str) -> Any:
        session = self.sessions.get(name)
        if session is None:
            raise DspexError(
                f"no session named {name!r}",
                hint=f"open one with %dspex session {name} --pool POOL",
            )
        if not session.active:
            self.sessions.pop(name, None)
            raise DspexError(
                f"session {name!r} was released or lost its kernel",
                hint=f"open it again with %dspex session {name} --pool POOL",
            )
        return session

    # ---- pools --------------------------------------------------------------------
    @magic_arguments("dspex pools")
    def _cmd_pools(self, line: str, cell: str | None) -> None:
        """Show a live table of the pools, their kernels and sessions (restart, release)."""
        parse_argstring(self._cmd_pools, line)
        from IPython.display import display

        from .pool_dashboard import PoolDashboard

        if not any(manager.pools for manager in registry.managers()):
            print("no pool is running; start one with %dspex start NAME --size N")
            return
        display(PoolDashboard())

    @magic_arguments("dspex start")
    @argument("name", help="the pool's name")
    @argument("--size", type=int, default=1, metavar="N", help="number of kernels (default 1)")
    @argument("--env", help="a dspex environment (dspex env create NAME)")
    @argument("--kernel", help="an installed kernelspec")
    @argument("--python", help="a Python interpreter (e.g. a conda env's)")
    @argument("--max-memory", metavar="SIZE", help='per-kernel memory limit, e.g. "4GB"')
    @argument("--gpu", action="store_true", help="let the kernels see the GPUs")
    @argument("--warmup", nargs="+", metavar="MODULE", default=[], help="modules to import")
    @argument(
        "--env-var",
        nargs="+",
        metavar="KEY[=VALUE]",
        help="environment variables (KEY alone copies the notebook's)",
    )
    @argument("--startup", default="", metavar="CODE", help="code each kernel runs once started")
    @argument(
        "--call-timeout", type=float, metavar="SECONDS", help="seconds before a call is interrupted"
    )
    def _cmd_start(self, line: str, cell: str | None) -> None:
        """Start a pool of kernels (with no source: the notebook's own Python)."""
        args = parse_argstring(self._cmd_start, line)
        from ..core.spec import PoolSpec

        spec = PoolSpec(
            args.name,
            env=args.env,
            kernel=args.kernel,
            python=args.python,
            size=args.size,
            max_memory=args.max_memory,
            gpu=args.gpu,
            warmup=tuple(args.warmup),
            env_vars=_key_values(args.env_var, "--env-var"),
            startup=args.startup,
            call_timeout=args.call_timeout,
        )
        if args.env is not None:
            _check_environment(args.env)
        manager = registry.default_manager()
        if args.name in manager.pools:
            if manager.spec(args.name) == spec:
                print(f"pool {args.name!r} is already running")
                return
            raise DspexError(
                f"pool {args.name!r} is already running with other settings",
                hint=f"stop it first: %dspex stop {args.name}",
            )
        manager.forget_spec(args.name)  # settings of a stopped pool of that name
        (pool,) = manager.start(spec)
        registry.remember_memory_text(pool.name, args.max_memory, spec.max_memory)
        print(f"pool {pool.name!r}: {spec.size} kernel(s) ready ({pool.source.description})")

    @magic_arguments("dspex stop")
    @argument("name", help="the pool's name")
    @argument("--now", action="store_true", help="kill the kernels instead of asking them")
    def _cmd_stop(self, line: str, cell: str | None) -> None:
        """Stop a pool: its kernels shut down and its sessions end."""
        args = parse_argstring(self._cmd_stop, line)
        for manager in registry.managers():
            if args.name in manager.pools:
                manager.stop(args.name, now=args.now)
                print(f"pool {args.name!r} stopped")
                return
        registry.find_pool(args.name)  # raises the clear error

    @magic_arguments("dspex health")
    def _cmd_health(self, line: str, cell: str | None) -> None:
        """Print every kernel's state, session, memory, uptime and calls served."""
        parse_argstring(self._cmd_health, line)
        from .html_render import format_duration
        from .snapshot import pool_health

        pools = pool_health()
        if not pools:
            print("no pool is running; start one with %dspex start NAME")
            return
        for pool in pools:
            limit = registry.memory_text(pool["name"], pool["max_memory"])
            print(
                f"{pool['name']}: {pool['source']}; {len(pool['kernels'])}/{pool['size']} "
                f"kernels, {len(pool['sessions'])} sessions, {pool['deaths']} deaths, "
                f"memory limit {limit}"
            )
            if pool["last_error"]:
                print(f"  last error: {pool['last_error']}")
            for k in pool["kernels"]:
                print(
                    f"  {k['id']:<14} pid {k['pid']!s:<8} {k['state']:<8} "
                    f"session {k['session'] or '-':<13} RSS {k['rss_text']:<10} "
                    f"up {format_duration(k['uptime']):<8} calls {k['calls_served']}"
                )

    @magic_arguments("dspex envs")
    def _cmd_envs(self, line: str, cell: str | None) -> None:
        """List the dspex environments pools can start from (--env); as %dspex env list."""
        parse_argstring(self._cmd_envs, line)
        self._env_list()

    @magic_arguments("dspex env")
    @argument("action", metavar="ACTION", help="create, list, remove or rebuild")
    @argument("name", nargs="?", metavar="NAME", help="the environment (not for list)")
    @argument(
        "-p",
        "--package",
        action="append",
        default=[],
        metavar="SPEC",
        help="(create) a package to install, pip requirement syntax; repeat for more",
    )
    @argument("-r", "--requirements", metavar="FILE", help="(create) install what FILE lists")
    @argument("--python", metavar="VERSION", help="(create) a version such as 3.11, or a path")
    def _cmd_env(self, line: str, cell: str | None) -> None:
        """Create, list, remove or rebuild dspex environments, with a progress bar.

        create NAME [--package SPEC ...] [--requirements FILE] [--python VERSION] | list |
        remove NAME | rebuild NAME. pip's output goes to a log file in the environment,
        which an error names."""
        args = parse_argstring(self._cmd_env, line)
        from ..core import envs

        if args.action not in ENV_ACTIONS:
            raise DspexError(
                f"unknown env action {args.action!r}",
                hint=f"{did_you_mean(args.action, ENV_ACTIONS)}use one of: "
                f"{', '.join(ENV_ACTIONS)}",
            )
        create_only = args.package or args.requirements or args.python
        if args.action != "create" and create_only:
            raise UsageError("--package, --requirements and --python are for env create")
        if args.action == "list":
            if args.name is not None:
                raise UsageError(f"env list takes no NAME (got {args.name!r})")
            self._env_list()
            return
        if args.name is None:
            raise UsageError(f"env {args.action} needs the environment's NAME")
        if args.action == "create":
            env = envs.create_environment(
                args.name,
                packages=args.package,
                requirements=args.requirements,
                python=args.python,
            )
            print(
                f"environment {env.name!r} is ready (kernel {env.kernel_name}); "
                f"start a pool on it with %dspex start POOL --env {env.name}"
            )
            return
        _check_environment(args.name, f"%dspex env create {args.name}")
        if args.action == "remove":
            envs.remove_environment(args.name)
            print(f"environment {args.name!r} removed")
        else:
            env = envs.rebuild_environment(args.name)
            print(f"environment {env.name!r} rebuilt from its lock with this dspex runtime")

    @staticmethod
    def _env_list() -> None:
        from IPython.display import display

        from ..core.envs import envs_dir
        from .envs_table import envs_table

        table = envs_table()
        if not table.rows:
            print(
                f"no dspex environments in {envs_dir()}; create one with: "
                "%dspex env create NAME --package ..."
            )
            return
        display(table)

    @magic_arguments("dspex gpu")
    def _cmd_gpu(self, line: str, cell: str | None) -> None:
        """Show GPU memory per device and per pool kernel (kernel RSS without a GPU)."""
        parse_argstring(self._cmd_gpu, line)
        from IPython.display import display

        from .gpu_widget import GpuMemoryWidget

        display(GpuMemoryWidget())

    # ---- code in pool kernels -----------------------------------------------------
    @magic_arguments("dspex run")
    @argument("pool", help="the pool whose kernel runs the cell")
    @WAIT_ARGUMENT
    @argument(
        "--timeout", type=float, metavar="SECONDS", help="seconds before the code is interrupted"
    )
    def _cmd_run(self, line: str, cell: str | None) -> None:
        """(cell) Run the cell in a free kernel of POOL; its outputs appear here."""
        args = parse_argstring(self._cmd_run, line)
        pool = registry.find_pool(args.pool)
        with pool.session(timeout=args.wait) as session:
            session.execute(cell or "", timeout=args.timeout)

    @magic_arguments("dspex session")
    @argument("name", help="the session's name in this notebook")
    @argument("--pool", help="open it on this pool (if it is not open yet)")
    @WAIT_ARGUMENT
    @argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="(cell) seconds before the code is interrupted",
    )
    def _cmd_session(self, line: str, cell: str | None) -> None:
        """Open a session NAME (one kernel, yours alone) with --pool; run cells there.

        As a cell magic, %%dspex session NAME runs the cell in the session's kernel, where
        its variables stay between cells."""
        args = parse_argstring(self._cmd_session, line)
        held = self.sessions.get(args.name)
        if args.pool is not None and (held is None or not held.active):
            session = registry.find_pool(args.pool).session(timeout=args.wait)
            self.sessions[args.name] = session
            if cell is None:
                print(
                    f"session {args.name!r} open on kernel {session.kernel_id} "
                    f"of pool {args.pool!r}"
                )
        elif args.pool is not None and cell is None:
            raise DspexError(
                f"session {args.name!r} is already open (kernel {held.kernel_id})",
                hint=f"release it first: %dspex release {args.name}",
            )
        session = self._session(args.name)
        if cell is None:
            if args.pool is None:
                print(
                    f"session {args.name!r}: kernel {session.kernel_id} of pool "
                    f"{session.pool_name!r}, id {session.id}"
                )
            return
        session.execute(cell, timeout=args.timeout)

    @magic_arguments("dspex release")
    @argument("name", help="the session's name")
    def _cmd_release(self, line: str, cell: str | None) -> None:
        """Release a session: its kernel goes back to the pool, its state is dropped."""
        args = parse_argstring(self._cmd_release, line)
        session = self.sessions.pop(args.name, None)
        if session is None:
            raise DspexError(
                f"no session named {args.name!r}",
                hint=f"open sessions: {', '.join(self.sessions) or 'none'}",
            )
        session.release()
        print(f"session {args.name!r} released")

    # ---- optimization runs --------------------------------------------------------
    @magic_arguments("dspex optimize")
    @argument("--pool", required=True, help="the pool whose kernel runs the optimization")
    @argument("--program", required=True, help="variable holding the dspy program")
    @argument("--trainset", required=True, help="variable holding the training examples")
    @argument("--valset", help="variable holding the validation examples")
    @argument(
        "--teleprompter",
        metavar="VAR",
        help="variable holding any DSPy optimizer (dspy.GEPA(...), ...): runs it as is; "
        "--metric and --lm are then optional (its own and dspy.settings.lm)",
    )
    @argument(
        "--optimizer",
        metavar="NAME",
        help="which dspy.teleprompt optimizer to build with --metric and --optimizer-args: "
        "mipro (default), gepa, copro, simba, bootstrap_rs, or a class name",
    )
    @argument("--metric", help="variable holding the metric (or 'pkg.mod:name')")
    @argument("--lm", help="variable holding the task LM (or a model name)")
    @argument(
        "--prompt-lm",
        help="variable holding the LM that proposes instructions (GEPA: its reflection_lm)",
    )
    @argument(
        "--auto",
        choices=["light", "medium", "heavy", "none"],
        help="MIPROv2's preset (none is implied by --num-candidates/--num-trials)",
    )
    @argument("--num-candidates", type=int)
    @argument("--num-trials", type=int)
    @argument("--seed", type=int)
    @argument("--num-threads", type=int)
    @argument("--minibatch-size", type=int)
    @argument("--max-bootstrapped-demos", type=int)
    @argument("--max-labeled-demos", type=int)
    @argument(
        "--optimizer-args", metavar="VAR", help="variable holding a dict of MIPROv2(...) arguments"
    )
    @argument(
        "--compile-args", metavar="VAR", help="variable holding a dict of compile(...) arguments"
    )
    @argument("--checkpoint-dir", help="where checkpoints go (default ./dspex-runs/RUN_ID)")
    @WAIT_ARGUMENT
    @run_output_arguments
    def _cmd_optimize(self, line: str, cell: str | None) -> None:
        """Start an optimization run (MIPROv2 unless --optimizer or --teleprompter says
        another) in a session of --pool; show its live dashboard."""
        args = parse_argstring(self._cmd_optimize, line)
        from ..optimizers.mipro import MIPROv2

        name = self._run_name(args.name)
        if args.teleprompter is None and (args.metric is None or args.lm is None):
            missing = [f for f, v in (("--metric", args.metric), ("--lm", args.lm)) if v is None]
            raise DspexError(
                f"the following arguments are required: {', '.join(missing)}",
                hint="give them, or --teleprompter VAR with an optimizer that has its metric",
            )
        given = self._variables(
            {
                "--teleprompter": (args.teleprompter, "variable"),
                "--program": (args.program, "reference"),
                "--trainset": (args.trainset, "variable"),
                "--valset": (args.valset, "variable"),
                "--metric": (args.metric, "reference"),
                "--lm": (args.lm, "lm"),
                "--prompt-lm": (args.prompt_lm, "lm"),
                "--optimizer-args": (args.optimizer_args, "variable"),
                "--compile-args": (args.compile_args, "variable"),
            }
        )
        options = dict(given["--optimizer-args"] or {})
        compile_args = dict(given["--compile-args"] or {})
        for key in ("num_candidates", "seed", "num_threads"):
            if getattr(args, key) is not None:
                options[key] = getattr(args, key)
        for key in ("num_trials", "minibatch_size", "max_bootstrapped_demos", "max_labeled_demos"):
            if getattr(args, key) is not None:
                compile_args[key] = getattr(args, key)
        if args.auto is not None:
            options["auto"] = None if args.auto == "none" else args.auto
        elif "num_candidates" in options or "num_trials" in compile_args:
            options.setdefault("auto", None)
        folder = Path(args.checkpoint_dir).expanduser().resolve() if args.checkpoint_dir else None
        if folder is not None and CheckpointDir(folder).run_file.exists():
            raise _folder_in_use(folder)
        pool = registry.find_pool(args.pool)
        teleprompter = given["--teleprompter"]
        kind = _optimizer_class(args.optimizer) if teleprompter is None else None
        try:
            if teleprompter is None and kind is None:  # MIPROv2, as dspex always ran it
                optimizer = MIPROv2(
                    pool,
                    metric=given["--metric"],
                    task_lm=given["--lm"],
                    prompt_lm=given["--prompt-lm"],
                    session_timeout=args.wait,
                    **options,
                )
                run = optimizer.optimize(
                    given["--program"],
                    given["--trainset"],
                    given["--valset"],
                    checkpoint_dir=folder,
                    **compile_args,
                )
            else:
                run = _compile_run(
                    teleprompter, kind, given, options, compile_args, pool, folder, args.wait
                )
        except RemoteError as exc:
            # The kernel's own check (runtime/mipro.py start_run) when the folder filled
            # up after the check above.
            if folder is not None and "already holds a run" in exc.remote_message:
                raise _folder_in_use(folder) from None
            raise
        self.namespace[name] = run
        print(
            f"run {run.run_id} started in pool {pool.name!r}, stored as `{name}`; "
            f"checkpoints in {run.checkpoint_dir}"
        )
        self._show_run(run, name, not args.no_display)

    @magic_arguments("dspex attach")
    @argument("run", help="variable holding the run or sweep, a run id, or a sweep's id or name")
    @argument("--pool", help="sweep: the pool its unfinished runs resume on (default: its own)")
    @argument("--program", help="sweep: variable holding the program (a notebook object)")
    @argument("--metric", help="sweep: variable holding the metric (a notebook object)")
    @argument("--lm", help="sweep: variable holding the task LM")
    @argument("--trainset", help="sweep: variable holding the trainset (configs not started)")
    @argument("--valset", help="sweep: variable holding the valset")
    @argument("--name", help="sweep: store the sweep in this variable (default: sweep)")
    def _cmd_attach(self, line: str, cell: str | None) -> None:
        """Show a run's live dashboard again (another cell, or after the browser reconnected),
        or a sweep's comparison: after a kernel restart its finished runs come from the run
        history and its unfinished ones resume from their checkpoints."""
        args = parse_argstring(self._cmd_attach, line)
        from IPython.display import display

        from ..optimizers.sweep import Sweep, attach_sweep, live_sweeps
        from .run_dashboard import dashboard_for

        held = self.namespace.get(args.run)
        if isinstance(held, Sweep):
            display(held.widget())
            return
        try:
            run = registry.find_run(args.run, self.namespace)
        except DspexError as not_a_run:
            live = {s.sweep_id: s for s in live_sweeps()} | {s.name: s for s in live_sweeps()}
            if args.run not in live and not self._recorded_sweep(args.run):
                raise not_a_run from None
            given = self._variables(
                {
                    "--program": (args.program, "reference"),
                    "--metric": (args.metric, "reference"),
                    "--lm": (args.lm, "lm"),
                    "--trainset": (args.trainset, "variable"),
                    "--valset": (args.valset, "variable"),
                }
            )
            pool = registry.find_pool(args.pool) if args.pool else None
            sweep = live.get(args.run) or attach_sweep(
                args.run,
                pool,
                program=given["--program"],
                metric=given["--metric"],
                lm=given["--lm"],
                trainset=given["--trainset"],
                valset=given["--valset"],
            )
            name = args.name or "sweep"
            self.namespace[name] = sweep
            print(f"sweep {sweep.name} ({sweep.sweep_id}): {sweep.state}, stored as `{name}`")
            display(sweep.widget())
            return
        display(dashboard_for(run))

    @staticmethod
    def _recorded_sweep(key: str) -> bool:
        from ..core.history import RunHistory

        try:
            RunHistory().get_sweep(key)
        except DspexError:
            return False
        return True

    @magic_arguments("dspex sweeps")
    @argument("--limit", type=int, default=20, metavar="N", help="newest N (default 20)")
    def _cmd_sweeps(self, line: str, cell: str | None) -> None:
        """The recorded sweeps, newest first: name, id, status, runs, started."""
        args = parse_argstring(self._cmd_sweeps, line)
        from IPython.display import display

        from ..core.history import RunHistory
        from .runs_table import sweeps_table

        records = RunHistory().sweeps(limit=args.limit)
        if not records:
            print("no sweep recorded yet; start one with dspex.sweep(configs, program, ...)")
            return
        display(sweeps_table(records))

    @magic_arguments("dspex checkpoint")
    @argument("run", help="variable holding the run, or its run id")
    @argument("--timeout", type=float, default=actions.ACTION_TIMEOUT_S, metavar="SECONDS")
    def _cmd_checkpoint(self, line: str, cell: str | None) -> None:
        """Write a checkpoint of a running optimization now (within one trial)."""
        args = parse_argstring(self._cmd_checkpoint, line)
        run = registry.find_run(args.run, self.namespace)
        print(actions.checkpoint_run(run, timeout=args.timeout))

    @magic_arguments("dspex cancel")
    @argument("run", help="variable holding the run, or its run id")
    @argument("--timeout", type=float, default=actions.ACTION_TIMEOUT_S, metavar="SECONDS")
    def _cmd_cancel(self, line: str, cell: str | None) -> None:
        """Stop a running optimization within one trial; it stays resumable."""
        args = parse_argstring(self._cmd_cancel, line)
        run = registry.find_run(args.run, self.namespace)
        print(actions.cancel_run(run, timeout=args.timeout))

    @magic_arguments("dspex resume")
    @argument("dir", help="the run's checkpoint folder")
    @argument("--pool", required=True, help="the pool whose kernel goes on with it")
    @argument("--program", help="variable holding the program (if it was a notebook object)")
    @argument("--metric", help="variable holding the metric (if it was a notebook object)")
    @argument("--lm", help="variable holding the task LM")
    @argument("--prompt-lm", help="variable holding the prompt LM")
    @argument(
        "--teleprompter",
        metavar="VAR",
        help="variable holding the optimizer the run was started with (dspex.compile runs)",
    )
    @argument("--snapshot", help="resume from this checkpoint file (default: the newest)")
    @WAIT_ARGUMENT
    @run_output_arguments
    def _cmd_resume(self, line: str, cell: str | None) -> None:
        """Go on with a stopped run from its checkpoint folder, in a new session."""
        args = parse_argstring(self._cmd_resume, line)
        from ..optimizers.mipro import MIPROv2

        name = self._run_name(args.name)
        folder = Path(args.dir).expanduser().resolve()
        known: dict[str, Any] = {}
        for run in registry.runs():  # a run of that folder started here: its objects
            if Path(run.checkpoint_dir).resolve() == folder:
                if not run.done:
                    raise DspexError(
                        f"run {run.run_id} of {folder} is still {run.status}",
                        hint=f"cancel it first: %dspex cancel {run.run_id}",
                    )
                known = dict(run.resume_objects)
                run.close()  # its kernel goes back to the pool
        values = self._variables(
            {
                "--program": (args.program, "reference"),
                "--metric": (args.metric, "reference"),
                "--lm": (args.lm, "lm"),
                "--prompt-lm": (args.prompt_lm, "lm"),
                "--teleprompter": (args.teleprompter, "variable"),
            }
        )
        teleprompter = values["--teleprompter"] or known.get("teleprompter")
        if teleprompter is not None:  # a dspex.compile run: any optimizer
            from ..optimizers.runs import resume

            run = resume(
                folder,
                registry.find_pool(args.pool),
                teleprompter=teleprompter,
                program=values["--program"] or known.get("program"),
                lm=values["--lm"] or known.get("task_lm"),
                snapshot=args.snapshot,
                session_timeout=args.wait,
            )
            self.namespace[name] = run
            print(f"run {run.run_id} resumed in pool {args.pool!r}, stored as `{name}`")
            self._show_run(run, name, not args.no_display)
            return
        given = {
            "program": values["--program"],
            "metric": values["--metric"],
            "task_lm": values["--lm"],
            "prompt_lm": values["--prompt-lm"],
        }
        objects = {k: given[k] if given[k] is not None else known.get(k) for k in given}
        run = MIPROv2.resume(
            folder,
            registry.find_pool(args.pool),
            snapshot=args.snapshot,
            session_timeout=args.wait,
            **objects,
        )
        self.namespace[name] = run
        print(f"run {run.run_id} resumed in pool {args.pool!r}, stored as `{name}`")
        self._show_run(run, name, not args.no_display)

    @magic_arguments("dspex runs")
    @argument("--all", action="store_true", help="add the run history: other notebooks, days")
    @argument("--optimizer", metavar="NAME", help="only this optimizer's runs (implies --all)")
    @argument("--status", metavar="STATUS", help="only runs of this status (implies --all)")
    @argument("--since", metavar="DATE", help="only runs started since (implies --all)")
    @argument("--notebook", metavar="TEXT", help="only runs of notebooks named so (implies --all)")
    @argument("--text", metavar="TEXT", help="only runs whose record mentions TEXT (implies --all)")
    @argument("--limit", type=int, default=50, metavar="N", help="with --all: at most N runs")
    @argument("--compare", nargs="+", metavar="RUN", help="recorded runs side by side (run ids)")
    def _cmd_runs(self, line: str, cell: str | None) -> None:
        """Table of the runs: variable, optimizer, status, best score and instruction, cost."""
        args = parse_argstring(self._cmd_runs, line)
        from IPython.display import display

        from ..core.history import default_history
        from .runs_table import comparison_text, history_table, runs_table

        if args.compare:
            print(comparison_text(default_history().compare(args.compare)))
            return
        runs = registry.runs()
        names = ("optimizer", "status", "since", "notebook", "text")
        filters = {name: getattr(args, name) for name in names}
        if args.all or any(filters.values()):
            records = default_history().runs(**filters, limit=args.limit)
            if not records:
                print("no recorded run matches; `dspex runs` lists them in a terminal")
                return
            display(history_table(records, runs, self.namespace))
            return
        if not runs:
            recorded = default_history().count()
            more = f"; %dspex runs --all lists {recorded} recorded runs" if recorded else ""
            print(f"no optimization run yet; start one with %dspex optimize --pool POOL ...{more}")
            return
        display(runs_table(runs, self.namespace))

    @magic_arguments("dspex log")
    @argument("run", help="variable holding the run, or its run id")
    @argument(
        "--lines",
        type=int,
        default=DEFAULT_LOG_LINES,
        metavar="N",
        help=f"how many of the last lines (default {DEFAULT_LOG_LINES})",
    )
    def _cmd_log(self, line: str, cell: str | None) -> None:
        """Print the end of a run's run.log (what DSPy printed during the run)."""
        args = parse_argstring(self._cmd_log, line)
        if args.lines < 1:
            raise ValueError(f"--lines must be at least 1, got {args.lines}")
        run = registry.find_run(args.run, self.namespace)
        path = Path(run.log_path)
        if not path.is_file():
            print(f"run {run.run_id} has written no log yet ({path})")
            return
        print(tail(path, args.lines), end="")


def tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a text file as a terminal shows them: a progress bar
    redrawn with carriage returns is its last state. A run's log can be long: read from
    the end."""
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        end = position = handle.tell()
        chunk = b""
        while position > 0 and chunk.count(b"\n") <= lines:
            position = max(0, position - 65536)
            handle.seek(position)
            chunk = handle.read(end - position)
    found = chunk.decode("utf-8", errors="replace").split("\n")
    if found[-1] == "":  # the file ends with a newline
        found.pop()
    return "".join(_last_redraw(line) + "\n" for line in found[-lines:])


def _last_redraw(line: str) -> str:
    drawn = [part for part in line.split("\r") if part]
    return drawn[-1] if drawn else ""


def _folder_in_use(folder: Path) -> CheckpointError:
    """``--checkpoint-dir`` of a folder that already holds a run: one line."""
    error = CheckpointError(
        f"{folder} already holds a run",
        hint=f"`%dspex resume {folder}` to go on, or give a new --checkpoint-dir",
    )
    error.inline_hint = True  # type: ignore[attr-defined]  # the hint ends the sentence
    return error


def _check_environment(name: str, create: str = "") -> None:
    """A missing environment: the closest existing names and the list, before any kernel
    starts or any folder changes. ``create``: the command that would create it."""
    from ..core.envs import broken_environments, envs_dir, list_environments

    names = sorted(env.name for env in list_environments())
    if name in names or name in broken_environments():  # a broken one has its own error
        return
    raise EnvironmentNotFound(
        f"no dspex environment named {name!r} in {envs_dir()}",
        hint=f"{did_you_mean(name, names)}environments: {', '.join(names) or 'none'}; "
        f"or create it with: {create or f'dspex env create {name}'}",
    )


def overview() -> str:
    """Every subcommand with its one-line summary (``%dspex --help`` and ``%dspex?``)."""
    lines = [
        "%dspex SUBCOMMAND [options]  (or %%dspex run POOL / %%dspex session NAME "
        "on a cell); %dspex SUBCOMMAND --help explains one",
        "",
    ]
    for attribute in sorted(vars(DspexMagics)):
        if attribute.startswith("_cmd_"):
            summary = first_line(getattr(DspexMagics, attribute).parser.description or "")
            lines.append(f"  {attribute[len('_cmd_') :]:<11} {summary}")
    lines += ["", "%dspex --debug SUBCOMMAND ... shows the full traceback of an error."]
    return "\n".join(lines)


DspexMagics.dspex.__doc__ = overview()


# ---- the extension -------------------------------------------------------------------
# --optimizer NAME: short names of the optimizers dspex has adapters for.
OPTIMIZER_CLASSES = {
    "mipro": None,  # dspex.MIPROv2's own path
    "miprov2": None,
    "gepa": "GEPA",
    "copro": "COPRO",
    "simba": "SIMBA",
    "bootstrap_rs": "BootstrapFewShotWithRandomSearch",
}


def _optimizer_class(name: str | None) -> type | None:
    """The dspy.teleprompt class --optimizer names (None: MIPROv2's own path)."""
    if name is None or name.lower() in ("mipro", "miprov2"):
        return None
    import dspy

    class_name = OPTIMIZER_CLASSES.get(name.lower(), name)
    cls = getattr(dspy.teleprompt, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, dspy.teleprompt.Teleprompter)):
        known = [*OPTIMIZER_CLASSES, *sorted(dspy.teleprompt.__all__)]
        raise DspexError(
            f"--optimizer {name}: no such DSPy optimizer",
            hint=f"{registry.did_you_mean(name, known)}use one of {', '.join(OPTIMIZER_CLASSES)}"
            ", a dspy.teleprompt class name, or --teleprompter VAR",
        )
    return cls


def _compile_run(
    teleprompter: Any,
    cls: type | None,
    given: dict[str, Any],
    options: dict[str, Any],
    compile_args: dict[str, Any],
    pool: Any,
    folder: Path | None,
    wait: float,
) -> Any:
    """``dspex.compile`` for --teleprompter VAR, or for --optimizer NAME built from
    --metric, --optimizer-args and --prompt-lm (its prompt_model or reflection_lm)."""
    import contextlib
    import inspect

    import dspy

    from ..optimizers.runs import compile as dspex_compile

    if teleprompter is None:
        kwargs = dict(options)
        params = inspect.signature(cls.__init__).parameters
        helper = given["--prompt-lm"] or given["--lm"]
        for param in ("prompt_model", "reflection_lm"):
            if param in params and helper is not None and param not in kwargs:
                kwargs[param] = helper
        teleprompter = cls(metric=given["--metric"], **kwargs)
    lm = given["--lm"]
    if isinstance(lm, str):
        lm = dspy.LM(lm)
    context = dspy.context(lm=lm) if lm is not None else contextlib.nullcontext()
    with context:  # the program's LM, as dspy.settings.lm is for teleprompter.compile
        return dspex_compile(
            teleprompter,
            given["--program"],
            trainset=given["--trainset"],
            valset=given["--valset"],
            pool=pool,
            checkpoint_dir=folder,
            session_timeout=wait,
            **compile_args,
        )


_RUN_TYPE = ("dspex_jupyter.optimizers.runs", "OptimizationRun")
# What the extension registered, per shell: kept beside the shell rather than set on it,
# and gone with it.
_LOADED: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def extension_state(ipython: Any) -> dict[str, Any] | None:
    """The extension's ``{"magics", "bridge"}`` in ``ipython``; None when not loaded."""
    return _LOADED.get(ipython)


def load_ipython_extension(ipython: Any) -> None:
    """Register the magics, show runs as dashboards, and serve the lab sidebar's comm.
    Loading again does nothing."""
    if ipython in _LOADED:
        return
    from .run_dashboard import display_run

    magics = DspexMagics(ipython)
    ipython.register_magics(magics)
    formatter = ipython.display_formatter.ipython_display_formatter
    formatter.for_type_by_name(*_RUN_TYPE, display_run)
    bridge = None
    if getattr(ipython, "kernel", None) is not None:  # a frontend can open comms
        from .lab_bridge import LabBridge

        bridge = LabBridge()
        bridge.register()
    _LOADED[ipython] = {"magics": magics, "bridge": bridge}


def unload_ipython_extension(ipython: Any) -> None:
    """Undo ``load_ipython_extension``; pools and runs keep going."""
    state = _LOADED.pop(ipython, None)
    if state is None:
        return
    if state["bridge"] is not None:
        state["bridge"].unregister()
    formatter = ipython.display_formatter.ipython_display_formatter
    with contextlib.suppress(KeyError):
        formatter.pop(".".join(_RUN_TYPE))
    for kind in ("line", "cell"):
        ipython.magics_manager.magics[kind].pop("dspex", None)
