"""Loop-stall benchmark: how late the manager's event loop runs its callbacks under load.

Run from the repository root (kernels import ``bench.exchange_helpers``)::

    .venv/bin/python bench/bench_loop_stall.py [--quick] [--seconds 4] [--mb 100]

Every call, stream and death notice of every pool goes through one asyncio loop (the
manager's thread), so anything slow done there delays all of them. A probe on that loop
asks to wake up every 1 ms and records how late it woke. Two phases in the same run:

- idle (the baseline): the probe alone, no traffic;
- load: the JupyterLab sidebar's snapshot path polled as the sidebar does (a ``LabBridge``
  with one open comm: a snapshot twice a second) while a ``--mb`` MB numpy array and a
  ``--mb`` MB bytes value travel to a kernel and back with ``pool.call``, one after the other.

Printed: p50 / p99 / max lateness per phase and the load phase's p99 against the target
(p99 <= 5 ms). Exit status 0 whatever the figures, 1 only if kernels leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import exit_code_after_leak_check, percentile, print_table  # noqa: E402
from dspex_jupyter import PoolManager, PoolSpec  # noqa: E402
from dspex_jupyter.notebook.lab_bridge import LabBridge  # noqa: E402

IDENTITY = "bench.exchange_helpers:identity"
TICK_S = 0.001
TARGET_P99_MS = 5.0
MB = 1_000_000
perf = time.perf_counter


class SilentComm:
    """Stands in for the sidebar's comm: takes the states the bridge sends, counts them."""

    def __init__(self) -> None:
        self.states = 0

    def send(self, data: dict[str, Any]) -> None:
        self.states += data.get("type") == "state"

    def on_msg(self, _callback: Any) -> None:
        pass

    def on_close(self, _callback: Any) -> None:
        pass

    def close(self) -> None:
        pass


async def probe(samples: list[float], stop: threading.Event) -> None:
    """Ask to wake up every ``TICK_S``; record how much later than that each wake-up was."""
    while not stop.is_set():
        start = perf()
        await asyncio.sleep(TICK_S)
        samples.append(max(0.0, perf() - start - TICK_S))


def measure(pool: Any, during: Any) -> list[float]:
    """Lateness samples (seconds) of the probe while ``during()`` runs in this thread."""
    samples: list[float] = []
    stop = threading.Event()
    future = pool.runner.submit(probe(samples, stop))  # the manager's loop, every pool's
    try:
        during()
    finally:
        stop.set()
        future.result(timeout=10)
    return samples


def stats_row(name: str, samples: list[float], target: bool) -> list[Any]:
    p99 = 1000 * percentile(samples, 99)
    verdict = ("PASS" if p99 <= TARGET_P99_MS else "MISS") if target else "baseline"
    return [
        name,
        len(samples),
        f"{1000 * statistics.median(samples):.3f}",
        f"{p99:.3f}",
        f"{1000 * max(samples):.3f}",
        verdict,
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, shorter phases")
    parser.add_argument("--seconds", type=float, default=None, help="idle/sidebar phase length")
    parser.add_argument("--mb", type=int, default=100, help="size of the travelling values")
    args = parser.parse_args()
    seconds = args.seconds or (2.0 if args.quick else 3.0)
    rounds, trips = (1, 3) if args.quick else (3, 4)
    array = np.random.default_rng(0).integers(0, 255, args.mb * MB, dtype=np.uint8)
    values = {"array": array, "bytes": array.tobytes()}
    round_trips: dict[str, list[float]] = {name: [] for name in values}
    samples: dict[str, list[float]] = {}
    sidebar = SilentComm()

    with PoolManager([PoolSpec("stall", size=1)]) as manager:
        pool = manager["stall"]
        for value in values.values():  # imports numpy there, maps the first files: untimed
            pool.call(IDENTITY, value)

        def idle() -> None:
            time.sleep(seconds)  # the baseline: the probe alone, for a while

        def travel(name: str) -> None:
            for _ in range(trips):
                start = perf()
                back = pool.call(IDENTITY, values[name])
                round_trips[name].append(perf() - start)
                assert len(back) == len(values[name])

        for number in range(rounds):
            print(f"round {number + 1} of {rounds}", flush=True)
            samples.setdefault("idle (baseline)", []).extend(measure(pool, idle))
            bridge = LabBridge()
            bridge.open(sidebar)  # a snapshot twice a second, as with an open sidebar
            try:
                samples.setdefault("sidebar", []).extend(measure(pool, idle))
                for name in values:
                    phase = f"sidebar + {args.mb} MB {name}"
                    samples.setdefault(phase, []).extend(measure(pool, lambda n=name: travel(n)))
            finally:
                bridge.unregister()

    loaded = [s for phase, found in samples.items() if phase.startswith("sidebar +") for s in found]
    rows = [stats_row(phase, found, phase != "idle (baseline)") for phase, found in samples.items()]
    rows.append(stats_row(f"load: sidebar + {args.mb} MB values", loaded, True))
    print()
    print_table(["phase", "ticks", "p50 ms", "p99 ms", "max ms", f"p99 <= {TARGET_P99_MS:g}"], rows)
    idle_p99 = 1000 * percentile(samples["idle (baseline)"], 99)
    p99 = 1000 * percentile(loaded, 99)
    print(f"\nload p99 {p99:.2f} ms vs idle p99 {idle_p99:.2f} ms: ratio {p99 / idle_p99:.1f} x")
    for name, times in round_trips.items():
        print(f"{args.mb} MB {name} round trip: median {1000 * statistics.median(times):.0f} ms")
    print(f"sidebar states sent: {sidebar.states}")
    return exit_code_after_leak_check()


if __name__ == "__main__":
    sys.exit(main())
