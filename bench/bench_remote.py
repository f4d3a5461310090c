"""Remote kernels over SSH against their baselines, all in one run, over the same SSH host.

Run from the repository root, as a user whose kernels may start there (root: see --help)::

    .venv/bin/python bench/bench_remote.py [--quick] [--size-mb 100] [--reps 5]

The SSH host is the test suite's (``tests/integration/remote_fixtures.py``): sshd on
127.0.0.2 with keys made for the run, a real SSH hop on one machine (gateway_provisioners and
ipyparallel both skip SSH for the machine's own addresses, and 127.0.0.2 is not one of
them), and a virtual environment of its own as the host's Python. Measured, medians:

1. no-op call round trip: a dspex pool of SSH kernels (CurveZMQ, the default), a local
   dspex pool, and ipyparallel engines started by ipyparallel's SSH engine launcher;
2. a table of ``--size-mb`` MB (Arrow) to a kernel and back: dspex SSH kernel encrypted and
   unencrypted, against ipyparallel ``push`` + ``pull`` to its SSH engine (target: dspex
   >= 1x ipyparallel);
3. start time of a pool of 4 SSH kernels (until every kernel answered), against 4 local.

Prints a table and the ratios; exit status 0 whatever the figures (1 if processes leaked).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_exchange import make_table  # noqa: E402
from bench.common import (  # noqa: E402
    exit_code_after_leak_check,
    print_table,
    say,
)
from bench.common import timed_after_warmup as timed  # noqa: E402
from dspex_jupyter import PoolManager, PoolSpec  # noqa: E402
from dspex_jupyter.core.kernelspecs import write_ssh_kernelspec  # noqa: E402
from tests.integration import remote_fixtures  # noqa: E402

NOOP = "bench.noop:noop"
IDENTITY = "bench.exchange_helpers:identity"
MB = 1_000_000
perf = time.perf_counter


# ---- ipyparallel over SSH -------------------------------------------------------------
@contextlib.contextmanager
def ipyparallel_over_ssh(tmp: Path, host: Any) -> Iterator[Any]:
    """A controller here and one engine started on the SSH host by ipyparallel's own SSH
    engine launcher, in the host's Python."""
    import ipyparallel

    ssh_args = ["-F", "/dev/null", "-i", str(host.home / ".ssh" / "id_ed25519"),
                "-o", f"UserKnownHostsFile={host.home / '.ssh' / 'known_hosts'}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]  # fmt: skip

    profile = tmp / "ipyparallel"
    profile.mkdir()
    cluster = ipyparallel.Cluster(
        n=1,
        profile_dir=str(profile),
        engine_launcher_class="ssh",
        controller_ip="127.0.0.1",
        log_level=logging.ERROR,
    )
    launcher_config = cluster.config.SSHEngineSetLauncher
    launcher_config.engines = {f"{host.user}@{host.ip}:{host.port}": 1}
    launcher_config.ssh_args = ssh_args
    launcher_config.scp_args = ["-O", *ssh_args]  # the classic protocol: the host has no sftp
    launcher_config.remote_python = str(host.python)
    launcher_config.remote_profile_dir = str(profile)
    cluster.config.SSHEngineLauncher.engine_args = ["--log-level=ERROR"]
    try:
        client = cluster.start_and_connect_sync()
        try:
            client.wait_for_engines(1, timeout=120)
            yield client[0]
        finally:
            client.close()
    finally:
        cluster.stop_cluster_sync()


# ---- the measures ---------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 MB table, fewer repetitions")
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--reps", type=int, default=5, help="round trips per table measure")
    parser.add_argument("--calls", type=int, default=300, help="no-op calls per measure")
    args = parser.parse_args()
    if args.quick:
        args.size_mb, args.reps, args.calls = 10.0, 3, 100
    tmp = Path(tempfile.mkdtemp(prefix="dspex-bench-remote-"))
    os.environ.setdefault("DSPEX_HOME", str(tmp / "home"))
    results: dict[str, Any] = {}
    notes: list[str] = []
    try:
        with remote_fixtures.ssh_host(tmp / "ssh") as host, host.client_env():
            measure(args, tmp, host, results, notes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(args, results, notes)
    return exit_code_after_leak_check()


def _plain_spec(host: Any, name: str) -> str:
    """The host's kernelspec without CurveZMQ, for the unencrypted figure."""
    path = Path(os.environ["DSPEX_HOME"]) / "share" / "jupyter" / "kernels"
    encrypted = json.loads((path / host.write_kernelspec(os.environ["DSPEX_HOME"], name) /
                            "kernel.json").read_text())  # fmt: skip
    dspex = encrypted["metadata"]["dspex"]
    write_ssh_kernelspec(
        name,
        hosts=dspex["hosts"],
        remote_python=dspex["python"],
        user=dspex["ssh_user"],
        port=dspex["ssh_port"],
        response_ip=dspex["response_ip"],
        transport_encryption="disabled",
        allow_root=True,
        launch_timeout=60,
        replace=True,
    )
    return name


def measure(
    args: argparse.Namespace,
    tmp: Path,
    host: Any,
    results: dict[str, Any],
    notes: list[str],
) -> None:
    table = make_table(args.size_mb)
    results["table_bytes"] = table.nbytes
    say(f"{table.num_rows} rows, {table.nbytes / MB:.0f} MB")
    say("ipyparallel: 1 engine by its SSH launcher")
    try:
        with ipyparallel_over_ssh(tmp, host) as view:
            from bench.noop import noop

            results["ipp_call"] = timed(lambda: view.apply_sync(noop), args.calls)

            def push_pull() -> Any:
                view.push({"t": table}, block=True)
                return view.pull("t", block=True)

            results["ipp_table"] = timed(push_pull, args.reps)
    except Exception as exc:  # its baseline is reported as missing, the rest goes on
        notes.append(f"ipyparallel over SSH failed: {type(exc).__name__}: {exc}")

    say("dspex: a local pool")
    with PoolManager([PoolSpec("local", size=1)]) as manager:
        pool = manager["local"]
        results["local_call"] = timed(lambda: pool.call(NOOP), args.calls)
        started = perf()
        manager.start(PoolSpec("local4", size=4))
        results["local_start4"] = perf() - started

    specs = {"curve": host.write_kernelspec(os.environ["DSPEX_HOME"], "bench_ssh"),
             "plain": _plain_spec(host, "bench_ssh_plain")}  # fmt: skip
    # One manager for every SSH pool: gateway_provisioners' response listener is a
    # process-wide singleton that lives on the loop of the manager that first used it.
    with PoolManager([]) as manager:
        for label, kernel in specs.items():
            say(f"dspex: a pool of 1 SSH kernel ({label})")
            try:
                ssh_pool_figures(manager, label, kernel, table, args, results)
            except Exception as exc:
                notes.append(f"dspex SSH pool ({label}) failed: {type(exc).__name__}: {exc}")
        say("dspex: start of a pool of 4 SSH kernels")
        try:
            started = perf()
            manager.start(PoolSpec("ssh4", kernel=specs["curve"], size=4))
            results["ssh_start4"] = perf() - started
        except Exception as exc:
            notes.append(f"dspex SSH pool of 4 failed: {type(exc).__name__}: {exc}")


def ssh_pool_figures(
    manager: PoolManager,
    label: str,
    kernel: str,
    table: Any,
    args: argparse.Namespace,
    results: dict[str, Any],
) -> None:
    manager.start(PoolSpec(f"ssh-{label}", kernel=kernel, size=1))
    pool = manager[f"ssh-{label}"]
    try:
        if label == "curve":
            results["ssh_call"] = timed(lambda: pool.call(NOOP), args.calls)
        with pool.session() as session:
            back = session.call(IDENTITY, table)
            if not back.equals(table):
                raise AssertionError("the table came back different")
            results[f"ssh_table_{label}"] = timed(lambda: session.call(IDENTITY, table), args.reps)
    finally:
        manager.stop(f"ssh-{label}")


def _median_ms(values: list[float] | None) -> float | None:
    return statistics.median(values) * 1e3 if values else None


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def report(args: argparse.Namespace, results: dict[str, Any], notes: list[str]) -> None:
    nbytes = results.get("table_bytes", 0)
    call = {k: _median_ms(results.get(k)) for k in ("ssh_call", "local_call", "ipp_call")}
    tables = {k: _median_ms(results.get(k)) for k in
              ("ssh_table_curve", "ssh_table_plain", "ipp_table")}  # fmt: skip

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if not a or not b else f"{a / b:.2f}x"

    def speed(ms: float | None) -> str:
        return "-" if not ms else f"{nbytes / MB / (ms / 1e3):.0f} MB/s"

    print(f"\nno-op call round trip, median of {args.calls} (ms):")
    print_table(
        ["dspex SSH (curve)", "dspex local", "ipyparallel SSH", "SSH / local", "SSH / ipp"],
        [[_fmt(call["ssh_call"], ".3f"), _fmt(call["local_call"], ".3f"),
          _fmt(call["ipp_call"], ".3f"), ratio(call["ssh_call"], call["local_call"]),
          ratio(call["ssh_call"], call["ipp_call"])]],
    )  # fmt: skip
    print(f"\n{nbytes / MB:.0f} MB table to the kernel and back, median of {args.reps}:")
    print_table(
        ["", "ms", "speed", "ipp time / this (>= 1x: as fast or faster)"],
        [["dspex SSH, CurveZMQ", _fmt(tables["ssh_table_curve"], ".0f"),
          speed(tables["ssh_table_curve"]), ratio(tables["ipp_table"], tables["ssh_table_curve"])],
         ["dspex SSH, unencrypted", _fmt(tables["ssh_table_plain"], ".0f"),
          speed(tables["ssh_table_plain"]), ratio(tables["ipp_table"], tables["ssh_table_plain"])],
         ["ipyparallel push+pull", _fmt(tables["ipp_table"], ".0f"),
          speed(tables["ipp_table"]), "1.00x"]],
    )  # fmt: skip
    ssh4, local4 = results.get("ssh_start4"), results.get("local_start4")
    print(f"\npool of 4 kernels ready: SSH {_fmt(ssh4)} s, local {_fmt(local4)} s, "
          f"ratio {ratio(ssh4, local4)}")  # fmt: skip
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    raise SystemExit(main())
