"""Core benchmarks of dspex_jupyter, each against a baseline measured in the same run.

Run from the repository root (pool kernels must be able to import ``bench.noop``)::

    .venv/bin/python bench/bench_core.py [--quick] [--json bench/results/core.json]

1. session checkout from a warm pool      vs a cold kernel start (KernelManager + ready)
2. no-op call round trip (pool.call)      vs raw kernel_info, and ipyparallel apply_sync
3. pool start of 1, 4 and 8 kernels       vs a pool of one
4. idle RSS of a light pool's kernel      vs a bare ipykernel

Targets are checked and printed as PASS/MISS; the exit status is 0 whatever the figures
(benchmarks report, they do not gate), and 1 only if kernels or engines leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import leaked_processes, percentile, timed  # noqa: E402

NOOP = "bench.noop:noop"
perf = time.perf_counter
MiB = 1024 * 1024


# ---- statistics ---------------------------------------------------------------------
@dataclass
class Stat:
    name: str
    unit: str  # "s" or "B"
    samples: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def p90(self) -> float:
        return percentile(self.samples, 90)

    def summary(self) -> dict[str, Any]:
        s = self.samples
        return {
            "unit": self.unit,
            "n": len(s),
            "p50": self.p50,
            "p90": self.p90,
            "mean": statistics.fmean(s) if s else math.nan,
            "min": min(s) if s else math.nan,
            "max": max(s) if s else math.nan,
        }


def fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if unit == "B":
        return f"{value / MiB:.1f} MiB"
    ms = value * 1000
    if ms < 10:
        return f"{ms:.3f} ms"
    if ms < 1000:
        return f"{ms:.1f} ms"
    return f"{value:.2f} s"


@dataclass
class Row:
    """One line of the results table: a measure, its baseline and, maybe, a target."""

    label: str
    stat: Stat
    base: Stat | None = None
    base_label: str = ""
    target: str = ""
    # Given (p50, baseline p50): is the target met?
    check: Callable[[float, float], bool] | None = None
    note: str = ""

    @property
    def ratio(self) -> float:
        if self.base is None or not self.base.samples or not self.stat.samples:
            return math.nan
        return self.stat.p50 / self.base.p50

    @property
    def verdict(self) -> str:
        if self.check is None:
            return "info"
        if not self.stat.samples or (self.base is not None and not self.base.samples):
            return "n/a"
        base = self.base.p50 if self.base is not None else math.nan
        return "PASS" if self.check(self.stat.p50, base) else "MISS"

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "measure": self.stat.name,
            "stats": self.stat.summary(),
            "baseline": self.base.name if self.base else None,
            "baseline_label": self.base_label or None,
            "baseline_stats": self.base.summary() if self.base else None,
            "ratio_p50": None if math.isnan(self.ratio) else self.ratio,
            "target": self.target or None,
            "result": self.verdict,
            "note": self.note or None,
        }


# ---- environment --------------------------------------------------------------------
def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "dspex_jupyter": version("dspex-jupyter"),
        "jupyter_client": version("jupyter_client"),
        "ipykernel": version("ipykernel"),
        "ipyparallel": version("ipyparallel"),
        "pyzmq": version("pyzmq"),
    }


# ---- a bare kernel, started by plain jupyter_client ---------------------------------
def write_kernelspec(folder: Path) -> Any:
    """A kernelspec with the argv a dspex pool uses for the current interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec_dir = folder / "bare"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "bare", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(folder)])


class BareKernel:
    """An ipykernel started by jupyter_client's own KernelManager (ipc transport)."""

    def __init__(self, ksm: Any, runtime: Path) -> None:
        self.ksm = ksm
        self.runtime = runtime
        self.km: Any = None
        self.kc: Any = None

    def start(self) -> None:
        from jupyter_client import KernelManager

        self.km = KernelManager(
            kernel_spec_manager=self.ksm,
            kernel_name="bare",
            transport="ipc",
            connection_file=str(self.runtime / f"bare-{uuid.uuid4().hex[:8]}.json"),
        )
        self.km.start_kernel(cwd=str(ROOT))
        self.kc = self.km.blocking_client()
        self.kc.start_channels(hb=False, stdin=False, control=False)
        self.kc.wait_for_ready(timeout=60)

    @property
    def pid(self) -> int:
        return int(self.km.provisioner.process.pid)

    def kernel_info_client(self) -> None:
        """kernel_info through BlockingKernelClient (request, then wait for the reply)."""
        msg_id = self.kc.kernel_info()
        while True:
            reply = self.kc.get_shell_msg(timeout=10)
            if reply["parent_header"].get("msg_id") == msg_id:
                return

    def kernel_info_raw(self) -> None:
        """kernel_info on the client's shell socket with jupyter_client's Session, no
        channel layer: send, then a blocking receive and deserialize (HMAC check included)."""
        sock = self.kc.shell_channel.socket
        msg_id = self.kc.session.send(sock, "kernel_info_request", {})["header"]["msg_id"]
        while True:
            _, reply = self.kc.session.recv(sock, mode=0)
            if reply is not None and reply["parent_header"].get("msg_id") == msg_id:
                return

    def drain_iopub(self) -> None:
        """Discard the status messages that kernel_info left on IOPub (not timed)."""
        with contextlib.suppress(queue.Empty):
            while True:
                self.kc.get_iopub_msg(timeout=0)

    def stop(self) -> None:
        if self.kc is not None:
            with contextlib.suppress(Exception):
                self.kc.stop_channels()
        if self.km is not None and self.km.has_kernel:
            try:
                self.km.shutdown_kernel(now=False)
            except Exception:
                with contextlib.suppress(Exception):
                    self.km.shutdown_kernel(now=True)


# ---- the benchmark ------------------------------------------------------------------
@dataclass
class Config:
    iterations: int
    warmup: int
    block: int
    cold_starts: int
    rss_kernels: int
    start_reps: int
    start_sizes: tuple[int, ...] = (1, 4, 8)


FULL = Config(iterations=300, warmup=30, block=30, cold_starts=5, rss_kernels=3, start_reps=3)
QUICK = Config(iterations=100, warmup=10, block=20, cold_starts=2, rss_kernels=2, start_reps=1)


def say(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def pool_manager(name: str, size: int) -> Iterator[Any]:
    from dspex_jupyter import PoolManager, PoolSpec

    manager = PoolManager([PoolSpec(name, size=size)])
    try:
        yield manager
    finally:
        manager.shutdown()


class Bench:
    def __init__(self, cfg: Config, tmp: Path) -> None:
        self.cfg = cfg
        self.tmp = tmp
        self.stats: dict[str, Stat] = {}
        self.notes: list[str] = []
        self.ksm = write_kernelspec(tmp / "kernelspecs")

    def stat(self, name: str, unit: str = "s") -> Stat:
        return self.stats.setdefault(name, Stat(name, unit))

    # 1 (baseline) and 4: cold kernel starts, then RSS of bare vs pool kernels -----------
    def cold_starts_and_rss(self) -> None:
        cfg = self.cfg
        bare: list[BareKernel] = []
        try:
            say(f"cold kernel starts x{cfg.cold_starts}")
            for _ in range(max(cfg.cold_starts, cfg.rss_kernels)):
                kernel = BareKernel(self.ksm, self.tmp)
                bare.append(kernel)
                t0 = perf()
                kernel.start()
                elapsed = perf() - t0
                if len(bare) <= cfg.cold_starts:
                    self.stat("cold_kernel_start").samples.append(elapsed)
            for kernel in bare:
                kernel.kernel_info_client()
            say(f"idle RSS: {cfg.rss_kernels} bare kernels vs a light pool of {cfg.rss_kernels}")
            with pool_manager("light", cfg.rss_kernels) as manager:
                manager.start()
                pool = manager["light"]
                # One call on each kernel: hold them all in sessions, call in each.
                sessions = [pool.session() for _ in range(cfg.rss_kernels)]
                for session in sessions:
                    session.call(NOOP)
                for session in sessions:
                    session.release()
                pool.call(NOOP)  # the last release is answered before this call runs
                time.sleep(0.5)  # both sets settle the same time after their last message
                for kernel in bare[: cfg.rss_kernels]:
                    rss = psutil.Process(kernel.pid).memory_info().rss
                    self.stat("rss_bare_ipykernel", "B").samples.append(rss)
                for pid in pool.kernel_pids:
                    rss = psutil.Process(pid).memory_info().rss
                    self.stat("rss_pool_kernel", "B").samples.append(rss)
        finally:
            for kernel in bare:
                kernel.stop()

    # 1 and 2: latencies, interleaved in blocks so that drift hits all of them alike -----
    def latencies(self) -> None:
        cfg = self.cfg
        from bench.noop import noop

        cluster = rc = None
        kernel = BareKernel(self.ksm, self.tmp)
        loop = asyncio.new_event_loop()
        try:
            view = None
            try:
                import ipyparallel

                say("starting a 1-engine ipyparallel cluster")
                profile_dir = self.tmp / "ipyparallel"
                profile_dir.mkdir()
                cluster = ipyparallel.Cluster(
                    n=1, profile_dir=str(profile_dir), log_level=logging.ERROR
                )
                rc = cluster.start_and_connect_sync()
                view = rc[0]
            except ImportError:
                self.notes.append("ipyparallel is not installed: its baseline was skipped")
            say("starting a bare kernel and a pool of 1")
            kernel.start()
            with pool_manager("lat", 1) as manager:
                manager.start()
                pool = manager["lat"]

                def session_round() -> tuple[float, float, float]:
                    t0 = perf()
                    session = pool.session()
                    t1 = perf()
                    session.call(NOOP)
                    t2 = perf()
                    session.call(NOOP)
                    t3 = perf()
                    session.release()
                    pool.call(NOOP)  # untimed: waits until the kernel is idle in the pool
                    return t1 - t0, t2 - t1, t3 - t2

                async def acall_block(n: int) -> list[float]:
                    out = []
                    for _ in range(n):
                        t0 = perf()
                        await pool.acall(NOOP)
                        out.append(perf() - t0)
                    return out

                simple: dict[str, Callable[[], Any]] = {
                    "call_pool": lambda: pool.call(NOOP),
                    "kernel_info_raw": kernel.kernel_info_raw,
                    "kernel_info_client": kernel.kernel_info_client,
                }
                if view is not None:
                    simple["ipyparallel_apply_sync"] = lambda: view.apply_sync(noop)

                def run_block(n: int, record: bool) -> None:
                    for name, fn in simple.items():
                        samples = timed(fn, n)
                        if record:
                            self.stat(name).samples.extend(samples)
                    kernel.drain_iopub()
                    samples = loop.run_until_complete(acall_block(n))
                    if record:
                        self.stat("acall_pool").samples.extend(samples)
                    for _ in range(n):
                        checkout, first, second = session_round()
                        if record:
                            self.stat("session_checkout").samples.append(checkout)
                            self.stat("session_first_call").samples.append(first)
                            self.stat("session_second_call").samples.append(second)

                say(f"latencies: {cfg.warmup} warm-up + {cfg.iterations} round trips each")
                run_block(cfg.warmup, record=False)
                done = 0
                while done < cfg.iterations:
                    n = min(cfg.block, cfg.iterations - done)
                    run_block(n, record=True)
                    done += n
        finally:
            kernel.stop()
            loop.close()
            if rc is not None:
                with contextlib.suppress(Exception):
                    rc.close()
            if cluster is not None:
                with contextlib.suppress(Exception):
                    cluster.stop_cluster_sync()

    # 3: pool start of 1, 4, 8 kernels, in fresh managers -------------------------------
    def pool_starts(self) -> None:
        cfg = self.cfg
        say(f"pool starts of {cfg.start_sizes} kernels x{cfg.start_reps}")
        for _ in range(cfg.start_reps):
            for size in cfg.start_sizes:
                with pool_manager(f"start{size}", size) as manager:
                    t0 = perf()
                    manager.start()
                    self.stat(f"pool_start_{size}").samples.append(perf() - t0)
                time.sleep(0.3)  # let the stopped kernels' exit settle before the next start

    def rows(self) -> list[Row]:
        s = self.stats
        cold = s.get("cold_kernel_start")
        ki_raw, ki_client = s.get("kernel_info_raw"), s.get("kernel_info_client")
        # The target is set against jupyter_client's own client API (what "raw jupyter_client"
        # offers); the hand-rolled Session-on-zmq floor below it is shown too, as information.
        kernel_info = ki_client if ki_client is not None and ki_client.samples else ki_raw
        ki_label = (
            "kernel_info (BlockingKernelClient)"
            if kernel_info is ki_client
            else "raw kernel_info (Session on zmq)"
        )
        ipp = s.get("ipyparallel_apply_sync")
        call = s.get("call_pool", Stat("call_pool", "s"))
        rows = [
            Row(
                "session checkout (warm pool)",
                s.get("session_checkout", Stat("session_checkout", "s")),
                cold,
                "cold kernel start + ready",
                "p50 <= 1 ms",
                lambda v, _b: v <= 0.001,
            ),
            Row(
                "  first session.call after checkout",
                s.get("session_first_call", Stat("session_first_call", "s")),
                call,
                "pool.call no-op",
                note="the kernel handles the queued init_session first",
            ),
            Row(
                "  second session.call",
                s.get("session_second_call", Stat("session_second_call", "s")),
                call,
                "pool.call no-op",
            ),
            Row(
                "no-op pool.call",
                call,
                kernel_info,
                ki_label,
                "<= 1.25 x",
                lambda v, b: v <= 1.25 * b,
            ),
            Row(
                "no-op pool.call",
                call,
                ipp,
                "ipyparallel apply_sync (1 engine)",
                "<= 0.5 x",
                lambda v, b: v <= 0.5 * b,
            ),
            Row(
                "no-op await pool.acall",
                s.get("acall_pool", Stat("acall_pool", "s")),
                kernel_info,
                ki_label,
            ),
        ]
        if ki_raw is not None and ki_raw.samples and kernel_info is not ki_raw:
            rows.append(Row("no-op pool.call", call, ki_raw, "raw kernel_info (Session on zmq)"))
        one = s.get("pool_start_1", Stat("pool_start_1", "s"))
        rows.append(Row("pool start, 1 kernel", one, cold, "cold kernel start + ready"))
        for size in self.cfg.start_sizes:
            if size == 1:
                continue
            stat = s.get(f"pool_start_{size}", Stat(f"pool_start_{size}", "s"))
            if size == 8:
                rows.append(
                    Row(
                        f"pool start, {size} kernels",
                        stat,
                        one,
                        "pool start, 1 kernel",
                        "<= 3 x",
                        lambda v, b: v <= 3 * b,
                    )
                )
            else:
                rows.append(Row(f"pool start, {size} kernels", stat, one, "pool start, 1 kernel"))
        rows.append(
            Row(
                "idle RSS, light pool kernel",
                s.get("rss_pool_kernel", Stat("rss_pool_kernel", "B")),
                s.get("rss_bare_ipykernel"),
                "bare ipykernel (jupyter_client)",
                "<= 1.1 x",
                lambda v, b: v <= 1.1 * b,
            )
        )
        return rows


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'benchmark':<36} {'p50':>10} {'p90':>10}  {'baseline':<34} {'p50':>10} "
        f"{'p90':>10} {'ratio':>8}  {'target':<12} result"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        base = row.base
        ratio = row.ratio
        if math.isnan(ratio):
            ratio_text = ""
        else:
            ratio_text = f"{ratio:.3f}" if ratio >= 0.01 else f"{ratio:.1e}"
        print(
            f"{row.label:<36} {fmt(row.stat.p50, row.stat.unit):>10} "
            f"{fmt(row.stat.p90, row.stat.unit):>10}  {row.base_label:<34} "
            f"{fmt(base.p50, base.unit) if base else '':>10} "
            f"{fmt(base.p90, base.unit) if base else '':>10} {ratio_text:>8}  "
            f"{row.target:<12} {row.verdict}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (< 40 s)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    out = Path(args.json).resolve() if args.json else None
    if Path.cwd() != ROOT:
        # Pool kernels inherit the working directory and import bench.noop from it.
        os.chdir(ROOT)
    cfg = QUICK if args.quick else FULL

    env = environment()
    print(
        f"env: {env['cpus']} CPUs, Python {env['python']} ({env['machine']}), "
        f"dspex-jupyter {env['dspex_jupyter']}, jupyter_client {env['jupyter_client']}, "
        f"ipykernel {env['ipykernel']}, ipyparallel {env['ipyparallel']}, "
        f"pyzmq {env['pyzmq']}; {'quick' if args.quick else 'full'} run, {env['date']}",
        flush=True,
    )
    started = perf()
    tmp = Path(tempfile.mkdtemp(prefix="dspex-bench-"))
    bench = Bench(cfg, tmp)
    error: BaseException | None = None
    try:
        bench.cold_starts_and_rss()
        bench.latencies()
        bench.pool_starts()
    except Exception as exc:  # report what was measured, then the failure
        error = exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = perf() - started

    rows = bench.rows()
    print()
    print_table(rows)
    for note in bench.notes:
        print(f"note: {note}")
    targets = [r for r in rows if r.check is not None]
    passed = sum(r.verdict == "PASS" for r in targets)
    print(f"\ntargets: {passed} of {len(targets)} met; run took {elapsed:.1f} s")
    if error is not None:
        print(f"ERROR: the run stopped early: {type(error).__name__}: {error}")

    leaks = leaked_processes()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "environment": env,
            "mode": "quick" if args.quick else "full",
            "config": cfg.__dict__,
            "elapsed_s": elapsed,
            "rows": [r.as_dict() for r in rows],
            "stats": {name: st.summary() for name, st in bench.stats.items()},
            "notes": bench.notes,
            "error": None if error is None else f"{type(error).__name__}: {error}",
            "leaked": [p.pid for p in leaks],
        }
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"results written to {out}")
    if leaks:
        print(f"WARNING: {len(leaks)} kernel/engine processes leaked:")
        for proc in leaks:
            with contextlib.suppress(psutil.Error):
                print(f"  pid {proc.pid}: {' '.join(proc.cmdline())[:160]}")
                proc.kill()  # our own child: do not leave it running
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
