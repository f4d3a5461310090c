"""MIPROv2 in a session kernel vs in-process DSPy, on the same seeded offline task.

Run from the repository root::

    .venv/bin/python bench/bench_mipro.py [--quick] [--latency 0.01]

1. wall time of a whole run: dspex (``optimize`` to ``result``, pool already started, so
   kernel start is excluded) vs ``dspy.teleprompt.MIPROv2(...).compile`` in this process;
   both print DSPy's logs to a file; one untimed warm-up run each, then alternating
   timed runs. Target: ratio of the medians <= 1.05.
2. checkpoint overhead: seconds spent writing each per-trial checkpoint (measured in the
   kernel) over the trial's own time. Target: <= 2 %.
3. resume latency: time from ``MIPROv2.resume()`` to the next trial starting.

The simulated LM answers after ``--latency`` seconds per call, standing in for a hosted
LM (real ones take 0.3-3 s a call; the default 10 ms is a harsh case for overheads).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dspy  # noqa: E402

from bench.common import mipro_in_process, print_table  # noqa: E402
from dspex_jupyter import MIPROv2, PoolManager, PoolSpec  # noqa: E402
from dspex_jupyter.testing import arithmetic  # noqa: E402
from dspex_jupyter.testing.mipro_settings import quick_settings  # noqa: E402

OPTIONS, COMPILE = quick_settings()
OPTIONS["num_threads"] = 1
COMPILE["num_trials"] = 10


def in_kernel(pool, task, lm, folder: Path):
    optimizer = MIPROv2(pool, metric=task.metric, task_lm=lm, prompt_lm=lm, **OPTIONS)
    start = time.perf_counter()
    run = optimizer.optimize(
        task.make_program(), task.trainset, task.valset, checkpoint_dir=folder, **COMPILE
    )
    run.result(timeout=600)
    return time.perf_counter() - start, run


def checkpoint_overheads(run) -> list[float]:
    """Per trial: time the search thread spends on its checkpoint (encoding the snapshot;
    the disk write and fsync happen on the writer thread) over the trial's own time."""
    ratios, last = [], None
    for event in run.events:
        if event["kind"] == "trial":
            if last is not None:
                ratios.append(last["encode"] / (event["time"] - last["time"]))
            last = None
        elif event["kind"] == "checkpoint" and event["reason"] in ("trial", "requested"):
            last = {"encode": event["encode_seconds"], "time": event["time"]}
    return ratios


def checkpoint_writes(run) -> list[float]:
    return [e["write_seconds"] for e in run.events if e["kind"] == "checkpoint"]


def resume_latency(pool, task, lm, folder: Path) -> float:
    optimizer = MIPROv2(pool, metric=task.metric, task_lm=lm, prompt_lm=lm, **OPTIONS)
    run = optimizer.optimize(
        task.make_program(), task.trainset, task.valset, checkpoint_dir=folder, **COMPILE
    )
    run.wait_for_event(lambda e: e["kind"] == "trial" and e["number"] == 4, timeout=600)
    run.cancel(timeout=600)
    run.close()
    start = time.perf_counter()
    resumed = MIPROv2.resume(
        folder, pool, program=task.make_program(), metric=task.metric, task_lm=lm, prompt_lm=lm
    )
    resumed.wait_for_event(lambda e: e["kind"] == "phase" and e["phase"] == "search", timeout=600)
    elapsed = time.perf_counter() - start
    resumed.result(timeout=600)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--latency", type=float, default=0.01, help="seconds per LM call")
    args = parser.parse_args()
    repeats = 1 if args.quick else 5
    task = arithmetic()
    lm = task.lm(latency_s=args.latency)
    print(
        f"env: python {sys.version.split()[0]}, dspy {dspy.__version__}, "
        f"LM latency {args.latency * 1000:.0f} ms/call, {repeats} repeat(s)"
    )
    with (
        PoolManager([PoolSpec("bench-mipro", size=1)]) as manager,
        tempfile.TemporaryDirectory() as tmp,
    ):
        pool = manager["bench-mipro"]
        pool.warmup(["dspy", "optuna", "dspex_jupyter.runtime.mipro", "dspex_jupyter.testing"])
        # One untimed run each first: both sides then run warm (lazy imports, pydantic's
        # schema caches, the kernel's first thread start), and the timed runs alternate.
        mipro_in_process(task, lm, Path(tmp) / "in-process.log", OPTIONS, COMPILE)
        in_kernel(pool, task, lm, Path(tmp) / "warmup")
        base, ours, overheads, writes = [], [], [], []
        for i in range(repeats):
            base.append(mipro_in_process(task, lm, Path(tmp) / "in-process.log", OPTIONS, COMPILE))
            seconds, run = in_kernel(pool, task, lm, Path(tmp) / f"run{i}")
            ours.append(seconds)
            print(f"  run {i + 1}: in-process {base[-1]:.3f} s, dspex {seconds:.3f} s", flush=True)
            overheads += checkpoint_overheads(run)
            writes += checkpoint_writes(run)
        resume = resume_latency(pool, task, lm, Path(tmp) / "resume")

    ratio = statistics.median(ours) / statistics.median(base)
    overhead = statistics.median(overheads)
    rows = [
        (
            f"whole run, dspex session (n={repeats})",
            f"{statistics.median(ours):.2f} s",
            "in-process MIPROv2.compile",
            f"{statistics.median(base):.2f} s",
            f"{ratio:.3f}",
            "<= 1.05",
            "PASS" if ratio <= 1.05 else "MISS",
        ),
        (
            "checkpoint per trial (median)",
            f"{overhead:.2%} of trial",
            f"max {max(overheads):.2%}",
            "",
            "",
            "<= 2 %",
            "PASS" if overhead <= 0.02 else "MISS",
        ),
        (
            "checkpoint write + fsync (writer thread)",
            f"{statistics.median(writes) * 1000:.1f} ms",
            "",
            "",
            "",
            "info",
            "",
        ),
        ("resume() to next trial", f"{resume * 1000:.0f} ms", "", "", "", "info", ""),
    ]
    header = ("benchmark", "dspex", "baseline", "value", "ratio", "target", "")
    print_table(header, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
