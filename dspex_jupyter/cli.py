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


def _progress(args: argparse.Namespace) -> Callable[[str], None] | None:
    if args.quiet:
        return None

    def emit(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    return emit


def _home(args: argparse.Namespace) -> Path | None:
    return Path(args.home) if args.home else None


# --------------------------------------------------------------------------------------
# dspex env ...


def _env_create(args: argparse.Namespace) -> int:
    from .core.envs import create_environment

    env = create_environment(
        args.name,
        packages=args.package,
        requirements=args.requirements,
        python=args.python,
        installer=args.installer,
        home=_home(args),
        progress=_progress(args),
    )
    print(f"created environment {env.name!r}: {env.path}")
    print(f"kernel: {env.kernel_name}   python: {env.python}")
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
