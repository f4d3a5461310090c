"""What enforcing ``max_memory`` costs while nothing happens, and how fast a breach stops.

Run from the repository root (kernels import ``bench.memory_helpers``)::

    .venv/bin/python bench/bench_memory_watch.py [--kernels 16] [--seconds 20] [--breaches 5]

1. idle CPU of the notebook process with N kernels under max_memory, per path (cgroup:
   the OS enforces it; proc: the /proc watch), vs the same manager with no limit, measured
   in the same run (targets: ≤ 1 % of a core above the baseline).
2. breach latency: from the moment a kernel's allocation passes the limit (its own log)
   to the death being seen by the pool (its "died" kernel event); target ≤ 1 s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import exit_code_after_leak_check, print_table  # noqa: E402
from dspex_jupyter import PoolManager, PoolSpec  # noqa: E402
from dspex_jupyter.core import memory_limits  # noqa: E402
from dspex_jupyter.core.errors import MemoryLimitExceeded  # noqa: E402

HOG = "bench.memory_helpers:hog_logged"
LIMIT = 300_000_000


def idle_cpu(kernels: int, seconds: float, path: str | None) -> float:
    """Share of one core the notebook process uses with ``kernels`` idle kernels."""
    if path is None:
        os.environ.pop(memory_limits.ENV_VAR, None)
        spec = PoolSpec("idle", size=kernels)
    else:
        os.environ[memory_limits.ENV_VAR] = path
        spec = PoolSpec("idle", size=kernels, max_memory="1GB")
    with PoolManager([spec]) as manager:
        assert manager["idle"].wait_ready(timeout=300)
        time.sleep(2.0)  # let start-up work (log lines, GC) settle before measuring
        cpu0, wall0 = time.process_time(), time.monotonic()
        time.sleep(seconds)  # the measurement: an idle manager
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    return cpu / wall


def breach_latencies(path: str, breaches: int, folder: Path) -> list[float]:
    """Seconds from an allocation past the limit to the death being seen, per breach."""
    os.environ[memory_limits.ENV_VAR] = path
    out = []
    with PoolManager([PoolSpec("breach", size=1, max_memory=LIMIT)]) as manager:
        pool = manager["breach"]
        for n in range(breaches):
            assert pool.wait_ready(timeout=120)
            worker = pool.workers[0]
            pool.call("bench.noop:noop")  # a kernel that served a call is no crash loop
            # The figure the limit is compared with (cgroup usage or tree RSS), before.
            baseline = pool.runner.run(_usage(pool, worker))
            log = folder / f"{path}-{n}.log"
            with contextlib.suppress(MemoryLimitExceeded):
                pool.call(HOG, 600, str(log))
            died = next(
                e["time"]
                for e in reversed(pool.kernel_events)
                if e["event"] == "died" and e["kernel"] == worker.id
            )
            steps = [tuple(map(float, line.split())) for line in log.read_text().splitlines()]
            # Past the limit: the first step over it by the kernel's own count; under a
            # cgroup, the OOM killer stops the step that would pass it: the last logged.
            passed = next((t for t, b in steps if baseline + b > LIMIT), steps[-1][0])
            out.append(died - passed)
    return out


async def _usage(pool, worker) -> int:
    return pool._memory.usage(worker)  # private: the figure the limit is compared with


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--breaches", type=int, default=5)
    args = parser.parse_args()
    paths = ["proc"]
    if memory_limits.own_memory_cgroup() is not None:
        paths.insert(0, "cgroup")
    else:
        print("no writable cgroup v1 memory controller: the cgroup path is skipped")

    baseline = idle_cpu(args.kernels, args.seconds, None)
    rows = [["no limit (baseline)", f"{100 * baseline:.2f} %", "", "", ""]]
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            used = idle_cpu(args.kernels, args.seconds, path)
            latencies = breach_latencies(path, args.breaches, Path(tmp))
            rows.append(
                [
                    path,
                    f"{100 * used:.2f} %",
                    f"{100 * (used - baseline):+.2f} %",
                    f"{1000 * statistics.median(latencies):.0f} ms",
                    f"{1000 * max(latencies):.0f} ms",
                ]
            )
    print(
        f"{args.kernels} idle kernels, {args.seconds:g} s; breaches of a {LIMIT / 1e6:g} MB limit"
    )
    print_table(
        ["memory limits", "idle CPU (of a core)", "vs baseline", "breach p50", "breach max"],
        rows,
    )
    return exit_code_after_leak_check()


if __name__ == "__main__":
    sys.exit(main())
