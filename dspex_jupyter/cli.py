"""The ``dspex`` command.

``dspex env create|list|remove|rebuild`` manages the environments pool kernels run in.
``dspex trust PATH`` signs a checkpoint folder or manifest someone else wrote.
Each command group adds its own subparsers (see ``_add_env_commands``) and sets
``handler`` on its leaf parsers, so later groups (``dspex pools`` ...) plug in the same
way. Progress goes to stderr, results to stdout; a dspex error prints ``error: ...`` with
its hint and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .core.errors import DspexError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]


def _progress(args: argparse.Namespace) -> Callable[[Any], None] | None:
    """One line per step of a create or rebuild on stderr (pip's output goes to the
    environment's log file); nothing with --quiet."""
    if args.quiet:
        return None
    from .core.envs import TerminalProgress

    return TerminalProgress(sys.stderr)


def _home(args: argparse.Namespace) -> Path | None:
    return Path(args.home) if args.home else None


# --------------------------------------------------------------------------------------
# dspex env ...


def _env_create(args: argparse.Namespace) -> int:
    from .core.envs import create_environment

    if args.remote:  # bad remote options fail before the environment is built
        from .core.kernelspecs import check_remote_options

        check_remote_options(args.remote, **_remote_options(args, args.remote))
    packages = list(args.package)
    if args.remote == "ssh":  # the hosts run gateway_provisioners' launcher in this env
        from .core.kernelspecs import HOST_PACKAGES

        packages += [p for p in HOST_PACKAGES if p not in packages]
    env = create_environment(
        args.name,
        packages=packages,
        requirements=args.requirements,
        python=args.python,
        installer=args.installer,
        home=_home(args),
        progress=_progress(args),
    )
    print(f"created environment {env.name!r}: {env.path}")
    print(f"kernel: {env.kernel_name}   python: {env.python}")
    if args.remote:
        _env_remote_kernelspec(args, env.name)
    return 0


def _env_summary(env: Any) -> dict[str, Any]:
    record = env.record
    requirements = record.get("requirements") or {}
    return {
        "name": env.name,
        "status": "ok",
        "path": str(env.path),
        "python": str(env.python),
        "python_version": env.python_version,
        "kernel_name": env.kernel_name,
        "installer": record.get("installer", ""),
        "packages": env.packages,
        "requirements": requirements.get("file"),
        "created": record.get("created", ""),
    }


def _env_list(args: argparse.Namespace) -> int:
    from .core.envs import broken_environments, envs_dir, list_environments

    home = _home(args)
    rows = [_env_summary(env) for env in list_environments(home)]
    for name, reason in broken_environments(home).items():
        rows.append(
            {
                "name": name,
                "status": "broken",
                "reason": reason,
                "path": str(envs_dir(home) / name),
            }
        )
    rows.sort(key=lambda row: row["name"])
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no environments in {envs_dir(home)} (create one with: dspex env create NAME)")
        return 0
    table = [("NAME", "PYTHON", "PATH", "PACKAGES")]
    for row in rows:
        if row["status"] == "ok":
            packages = " ".join(row["packages"])
            if row["requirements"]:
                packages = f"{packages} -r {row['requirements']}".strip()
            table.append((row["name"], row["python_version"], row["path"], packages or "-"))
        else:
            table.append((row["name"], "broken", row["path"], row["reason"]))
    # The last column (packages, or why it is broken) is not padded.
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for r in table:
        cells = [r[i].ljust(widths[i]) for i in range(3)]
        print("  ".join([*cells, r[3]]))
    return 0


def _env_remove(args: argparse.Namespace) -> int:
    from .core.envs import remove_environment

    remove_environment(args.name, home=_home(args))
    print(f"removed environment {args.name!r}")
    return 0


def _env_rebuild(args: argparse.Namespace) -> int:
    from .core.envs import rebuild_environment

    env = rebuild_environment(args.name, home=_home(args), progress=_progress(args))
    print(f"rebuilt environment {env.name!r}: {env.path}")
    return 0


def _add_env_commands(
    commands: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    env = commands.add_parser(
        "env",
        parents=[common],
        help="manage the Python environments pool kernels run in",
        description="Isolated environments with ipykernel and the dspex runtime, each "
        "registered as kernel dspex-NAME in dspex's own kernelspec folder.",
    )
    sub = env.add_subparsers(dest="env_command", metavar="COMMAND", required=True)

    create = sub.add_parser(
        "create", parents=[common], help="create an environment and register its kernel"
    )
    create.add_argument("name", metavar="NAME")
    create.add_argument(
        "-p",
        "--package",
        action="append",
        default=[],
        metavar="SPEC",
        help="a package to install (pip requirement syntax); repeat for more",
    )
    create.add_argument(
        "-r", "--requirements", metavar="FILE", help="install the requirements in FILE"
    )
    create.add_argument(
        "--python",
        metavar="VERSION",
        help="Python to use: a version such as 3.11 (python3.11 on PATH) or a path "
        "(default: the Python running dspex)",
    )
    create.add_argument(
        "--installer",
        choices=("pip", "uv"),
        default="pip",
        help="venv + pip (default; honours your pip configuration) or uv, if installed",
    )
    create.add_argument(
        "--remote",
        choices=("ssh", "k8s", "docker"),
        help="also write a kernelspec KIND_NAME that runs this environment's kernels on SSH "
        "hosts (--hosts), or as pods or containers of --image (dspex kernelspec --help)",
    )
    _add_remote_options(create, None)
    create.set_defaults(handler=_env_create)

    listing = sub.add_parser("list", parents=[common], help="list environments")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_env_list)

    remove = sub.add_parser(
        "remove", parents=[common], help="remove an environment and its kernelspec"
    )
    remove.add_argument("name", metavar="NAME")
    remove.add_argument(
        "-y", "--yes", action="store_true", help="accepted for scripts; removal never asks"
    )
    remove.set_defaults(handler=_env_remove)

    rebuild = sub.add_parser(
        "rebuild",
        parents=[common],
        help="recreate an environment from its lock with the current dspex runtime",
    )
    rebuild.add_argument("name", metavar="NAME")
    rebuild.set_defaults(handler=_env_rebuild)


# --------------------------------------------------------------------------------------
# dspex trust PATH


def _trust(args: argparse.Namespace) -> int:
    from .trust import describe, trust

    kind, lines = describe(args.path)
    print(f"{args.path} is a dspex {kind}; it names:")
    for line in lines or ["(nothing)"]:
        print(f"  {line}")
    if args.show:
        return 0
    trust(args.path, home=_home(args))
    print(f"signed {args.path} with this user's key: dspex will now load what it names")
    return 0


def _add_trust_command(
    commands: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    command = commands.add_parser(
        "trust",
        parents=[common],
        help="trust a checkpoint folder or manifest that someone else wrote",
        description="Sign a run's checkpoint folder (its run.json and data.json) or a "
        "shutdown manifest with your dspex key (HOME/signing.key), after printing what it "
        "names: the program, metric and LM classes a resume imports, or the Python, "
        "start-up code and runs a restore starts. dspex signs what it writes itself; a "
        "file signed by another key (another user, another DSPEX_HOME) or changed since is "
        "only read as data until you trust it. Trusted checkpoints still import only from "
        "DSPy, dspex_jupyter.testing and the modules in $DSPEX_TRUSTED_MODULES.",
    )
    command.add_argument("path", metavar="PATH", help="a checkpoint folder or manifest file")
    command.add_argument("--show", action="store_true", help="print what it names; do not sign it")
    command.set_defaults(handler=_trust)


# --------------------------------------------------------------------------------------
# dspex kernelspec ssh|k8s|docker NAME, list, remove (and env create --remote)


def _remote_options(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """The write_*_kernelspec keyword arguments the command line gave for ``kind``."""
    options: dict[str, Any] = {
        "home": _home(args),
        "replace": args.replace,
        "allow_root": args.allow_root,
        "launch_timeout": args.launch_timeout,
        "transport_encryption": args.transport_encryption,
    }
    if args.response_ip is not None:
        options["response_ip"] = args.response_ip
    if kind == "ssh":
        options.update(
            hosts=args.hosts or "",
            remote_python=args.remote_python,
            user=args.user,
            port=args.port,
        )
    else:
        options["image"] = args.image
        if kind == "k8s":
            options["namespace"] = args.namespace
    return options


def _print_kernelspec(spec: Any) -> None:
    dspex = spec.spec["metadata"]["dspex"]
    where = ", ".join(dspex.get("hosts") or []) or dspex.get("image")
    print(f"wrote kernelspec {spec.name!r} ({spec.provisioner}: {where}): {spec.path}")
    print(f'use it with: PoolSpec("{spec.name}", kernel="{spec.name}")')


def _kernelspec_write(args: argparse.Namespace) -> int:
    from .core.kernelspecs import write_kernelspec

    options = _remote_options(args, args.kind)
    if args.kind == "ssh":
        options["env"] = args.env
    _print_kernelspec(write_kernelspec(args.kind, args.name, **options))
    return 0


def _kernelspec_list(args: argparse.Namespace) -> int:
    from .core.kernelspecs import remote_kernelspecs

    rows = [
        {"name": s.name, "kind": s.kind, "provisioner": s.provisioner, "path": str(s.path),
         **s.spec["metadata"]["dspex"]}
        for s in remote_kernelspecs(_home(args))
    ]  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no remote kernelspecs (write one: dspex kernelspec ssh NAME --env ENV --hosts H)")
    for row in [] if args.json else rows:
        target = ",".join(row.get("hosts") or []) or row.get("image") or ""
        print(f"{row['name']}  {row['kind']}  {target}  {row['path']}")
    return 0


def _kernelspec_remove(args: argparse.Namespace) -> int:
    from .core.kernelspecs import remove_kernelspec

    remove_kernelspec(args.name, home=_home(args))
    print(f"removed kernelspec {args.name!r}")
    return 0


def _env_remote_kernelspec(args: argparse.Namespace, env_name: str) -> None:
    """``dspex env create NAME --remote KIND``: the environment's remote kernelspec,
    ``KIND_name`` (e.g. ssh_mipro), next to its local one."""
    from .core.kernelspecs import write_kernelspec

    options = _remote_options(args, args.remote)
    if args.remote == "ssh":
        options["env"] = env_name
    name = f"{args.remote}_{env_name}".lower()
    _print_kernelspec(write_kernelspec(args.remote, name, **options))


def _add_remote_options(parser: argparse.ArgumentParser, kind: str | None) -> None:
    """Options of a remote kernelspec; ``kind=None``: all of them (env create --remote)."""
    if kind in ("ssh", None):
        parser.add_argument(
            "--hosts", metavar="H1,H2", help="SSH hosts kernels start on, round-robin"
        )
        parser.add_argument(
            "--remote-python",
            metavar="PATH",
            help="the Python on the hosts (default: the environment's, at the same path)",
        )
        parser.add_argument("--user", metavar="USER", help="SSH login (default: you)")
        parser.add_argument("--port", type=int, metavar="PORT", help="SSH port (default: 22)")
    if kind in ("k8s", "docker", None):
        parser.add_argument(
            "--image", metavar="IMAGE", help="container image with the dspex runtime in it"
        )
    if kind in ("k8s", None):
        parser.add_argument(
            "--namespace", metavar="NS", help="Kubernetes namespace (default: shared one)"
        )
    parser.add_argument(
        "--response-ip",
        metavar="IP",
        help="address of this machine the kernels send their connection info to "
        "(ssh default 127.0.0.1; containers: this machine's first public address)",
    )
    parser.add_argument(
        "--transport-encryption",
        choices=("required", "auto", "disabled"),
        default="required",
        help="CurveZMQ encryption of the kernel's channels (default: required)",
    )
    parser.add_argument(
        "--allow-root",
        action="store_true",
        help="let root start these kernels (gateway_provisioners refuses root by default)",
    )
    parser.add_argument(
        "--launch-timeout", type=int, metavar="S", help="seconds a kernel may take to start"
    )
    parser.add_argument(
        "--replace", action="store_true", help="overwrite a kernelspec of the same name"
    )


def _add_kernelspec_commands(
    commands: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    group = commands.add_parser(
        "kernelspec",
        parents=[common],
        help="write kernelspecs for kernels on other machines (SSH, Kubernetes, Docker)",
        description="Write gateway_provisioners kernelspecs into dspex's kernelspec folder "
        "(HOME/share/jupyter/kernels); a pool uses one with PoolSpec(NAME, kernel=NAME). The "
        "provisioner runs in the notebook's process; channels are CurveZMQ-encrypted.",
    )
    sub = group.add_subparsers(dest="kernelspec_command", metavar="COMMAND", required=True)
    helps = {
        "ssh": "kernels on SSH hosts (distributed-provisioner)",
        "k8s": "kernels as Kubernetes pods (kubernetes-provisioner)",
        "docker": "kernels as Docker containers (docker-provisioner)",
    }
    for kind, text in helps.items():
        writer = sub.add_parser(kind, parents=[common], help=text, description=text)
        writer.add_argument("name", metavar="NAME", help="the kernelspec's name (lowercase)")
        if kind == "ssh":
            writer.add_argument("--env", metavar="ENV", help="the dspex environment to run")
        _add_remote_options(writer, kind)
        writer.set_defaults(handler=_kernelspec_write, kind=kind)
    listing = sub.add_parser("list", parents=[common], help="list remote kernelspecs")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_kernelspec_list)
    remove = sub.add_parser("remove", parents=[common], help="remove a remote kernelspec")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(handler=_kernelspec_remove)


# --------------------------------------------------------------------------------------
# dspex runs ...


def _history(args: argparse.Namespace) -> Any:
    from .core.history import RunHistory, history_path, writer

    writer.flush()
    return RunHistory(history_path(_home(args)))


def _score(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else "-"


def _cost(record: Any) -> str:
    return f"${record.cost:.4f}" if record.cost is not None else "-"


def _notebook_name(path: str | None) -> str:
    return Path(path).name if path else "-"


def _print_table(rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell; the last one (free text) is not."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]]))


def _runs_list(args: argparse.Namespace) -> int:
    from .core.history import format_time
    from .notebook.runs_table import shorten

    records = _history(args).runs(
        optimizer=args.optimizer,
        status=args.status,
        notebook=args.notebook,
        since=args.since,
        text=args.text,
        limit=args.limit,
    )
    if args.json:
        print(json.dumps([record.to_json() for record in records], indent=2))
        return 0
    if not records:
        print("no runs recorded (that match); runs appear here as they start")
        return 0
    rows = [("RUN", "OPTIMIZER", "STATUS", "BEST", "TRIALS", "COST", "NOTEBOOK", "STARTED",
             "BEST INSTRUCTION")]  # fmt: skip
    for r in records:
        instruction = " | ".join(r.instructions.values())
        rows.append(
            (r.run_id, r.optimizer, r.shown_status, _score(r.best_score), str(r.trials), _cost(r),
             _notebook_name(r.notebook), format_time(r.created),
             shorten(instruction) if instruction else "-")
        )  # fmt: skip
    _print_table(rows)
    return 0


def _runs_show(args: argparse.Namespace) -> int:
    from .core.history import format_time

    history = _history(args)
    record = history.get(args.run_id)
    trials = history.trials(record.run_id)
    if args.json:
        print(json.dumps({**record.to_json(), "trial_rows": trials}, indent=2))
        return 0
    usage = record.usage or {}
    lines = [
        ("run", record.run_id),
        ("optimizer", record.optimizer),
        ("status", record.shown_status + (f" ({record.error})" if record.error else "")),
        ("best score", _score(record.best_score)),
        ("trials", str(record.trials)),
        ("usage", f"{usage.get('calls', 0)} calls, {usage.get('total_tokens', 0)} tokens, "
                  f"cost {_cost(record)}"),
        ("notebook", record.notebook or "-"),
        ("pool", record.pool or "-"),
        ("checkpoints", record.checkpoint_dir or "-"),
        ("started", format_time(record.created)),
        ("updated", format_time(record.updated)),
    ]  # fmt: skip
    for label, value in lines:
        print(f"{label + ':':<13}{value}")
    for name, text in record.instructions.items():
        print(f"instruction of {name}:\n  " + "\n  ".join(text.splitlines() or [""]))
    if trials:
        rows = [("TRIAL", "EVAL", "SCORE", "BEST")]
        rows += [(str(t["number"]), t["eval"], _score(t["score"]), _score(t["best_score"]))
                 for t in trials]  # fmt: skip
        _print_table(rows)
    return 0


def _runs_compare(args: argparse.Namespace) -> int:
    from .core.history import config_differences, instruction_diff
    from .notebook.runs_table import comparison_text

    records = _history(args).compare(args.run_ids)
    if not args.json:
        print(comparison_text(records))
        return 0
    body = {
        "runs": [record.to_json() for record in records],
        "config_differences": config_differences(records),
        "instruction_diffs": [instruction_diff(records[0], other) for other in records[1:]],
    }
    print(json.dumps(body, indent=2, default=str))
    return 0


def _runs_export(args: argparse.Namespace) -> int:
    from .optimizers.export import to_mlflow

    history = _history(args)
    record = history.get(args.run_id)
    mlflow_run = to_mlflow(
        record, tracking_uri=args.tracking_uri, experiment=args.experiment, history=history
    )
    print(f"exported run {record.run_id} to MLflow: run {mlflow_run}")
    return 0


def _runs_remove(args: argparse.Namespace) -> int:
    history = _history(args)
    record = history.get(args.run_id)
    history.remove(record.run_id)
    print(f"removed run {record.run_id} from the history (its checkpoints stay in "
          f"{record.checkpoint_dir or '-'})")  # fmt: skip
    return 0


def _add_runs_commands(
    commands: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--optimizer", metavar="NAME", help="only this optimizer's runs")
    filters.add_argument(
        "--status", metavar="STATUS", help="only runs that are running, completed, failed..."
    )
    filters.add_argument("--since", metavar="DATE", help="only runs started since, e.g. 2026-11-01")
    filters.add_argument("--notebook", metavar="TEXT", help="only runs of notebooks named so")
    filters.add_argument("--text", metavar="TEXT", help="only runs whose record mentions TEXT")
    filters.add_argument("--limit", type=int, metavar="N", help="at most N runs, newest first")
    filters.add_argument("--json", action="store_true", help="print JSON")
    runs = commands.add_parser(
        "runs",
        parents=[common, filters],
        help="list, show, compare and export recorded optimization runs",
        description="Every optimization run started from any notebook or script is recorded "
        "in HOME/runs.sqlite3: `dspex runs` lists them, newest first.",
    )
    runs.set_defaults(handler=_runs_list)
    sub = runs.add_subparsers(dest="runs_command", metavar="COMMAND")
    listing = sub.add_parser("list", parents=[common, filters], help="list runs (the default)")
    listing.set_defaults(handler=_runs_list)
    show = sub.add_parser("show", parents=[common], help="one run: record, instructions, trials")
    show.add_argument("run_id", metavar="RUN_ID", help="a run id or a unique start of one")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_runs_show)
    compare = sub.add_parser(
        "compare", parents=[common], help="runs side by side: scores, settings, instructions"
    )
    compare.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="two or more run ids")
    compare.add_argument("--json", action="store_true", help="print JSON")
    compare.set_defaults(handler=_runs_compare)
    export = sub.add_parser(
        "export", parents=[common], help="log a finished run to MLflow (the mlflow extra)"
    )
    export.add_argument("run_id", metavar="RUN_ID")
    export.add_argument("--tracking-uri", metavar="URI", help="default: MLflow's own")
    export.add_argument("--experiment", metavar="NAME", help='default: "dspex"')
    export.set_defaults(handler=_runs_export)
    remove = sub.add_parser("remove", parents=[common], help="forget a run (checkpoints stay)")
    remove.add_argument("run_id", metavar="RUN_ID")
    remove.set_defaults(handler=_runs_remove)


# --------------------------------------------------------------------------------------
# Top level


def _common_options() -> argparse.ArgumentParser:
    """Options accepted both before and after a subcommand (``dspex --home X env list``
    and ``dspex env list --home X``). SUPPRESS keeps a subparser from resetting a value
    given at the top."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--home",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="dspex's folder (default: $DSPEX_HOME or ~/.dspex)",
    )
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print no progress",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="dspex",
        parents=[common],
        description="Pools of Jupyter kernels in separate Python environments.",
    )
    parser.add_argument("--version", action="version", version=f"dspex {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_env_commands(commands, common)
    _add_trust_command(commands, common)
    _add_kernelspec_commands(commands, common)
    _add_runs_commands(commands, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dspex`` command; return its exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    args.home = getattr(args, "home", None)
    args.quiet = getattr(args, "quiet", False)
    handler: Handler = args.handler
    try:
        return handler(args)
    except DspexError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
