"""GEPA in a session kernel vs in-process DSPy, on the same seeded offline task.

Run from the repository root::

    .venv/bin/python bench/bench_gepa.py [--quick] [--latency 0.01]

1. wall time of a whole run: dspex (``dspex.compile`` to ``result``, pool already started,
   so kernel start is excluded) vs ``dspy.GEPA(...).compile`` in this process, same seed;
   both print DSPy's logs to a file; one untimed warm-up run each, then alternating timed
   runs. Target: ratio of the medians <= 1.05.
2. checkpoint overhead per iteration: in this process, ``ResumableGEPA`` writing each
   iteration's checkpoint as a snapshot would (gepa state to JSON, canonical encoding) vs
   ``dspy.GEPA`` without: the time spent on it over the iteration's time (median), and the
   whole runs' ratio. Target: <= 2 %.
3. resume latency: a run cancelled at iteration 3, then the time from ``dspex.resume()`` to
   its "resumed" event and to the end of the next iteration.

The simulated LM answers after ``--latency`` seconds per call, standing in for a hosted
LM (real ones take 0.3-3 s a call; the default 10 ms is a harsh case for overheads).
"""

from __future__ import annotations

import argparse
import contextlib
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

import dspy  # noqa: E402

import dspex_jupyter as dspex  # noqa: E402
from bench.common import exit_code_after_leak_check, print_table  # noqa: E402
from dspex_jupyter import PoolManager, PoolSpec  # noqa: E402
from dspex_jupyter.checkpoint import canonical  # noqa: E402
from dspex_jupyter.runtime.gepa import GEPAHooks, ResumableGEPA, RunController  # noqa: E402
from dspex_jupyter.testing import get_task  # noqa: E402

BUDGET = 150


def make_task() -> Any:
    return get_task("arithmetic", n_train=20, n_val=15)


def settings(task: Any, lm: Any) -> dict[str, Any]:
    return {
        "metric": task.feedback_metric,
        "reflection_lm": lm,
        "max_metric_calls": BUDGET,
        "seed": 0,
        "num_threads": 1,
    }


def in_process(optimizer: dspy.GEPA, task: Any, lm: Any, log: Path) -> float:
    """Upstream's compile in this process, printing to a log file as a session's run does."""
    with open(log, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        start = time.perf_counter()
        with dspy.context(lm=lm):
            optimizer.compile(task.make_program(), trainset=task.trainset, valset=task.valset)
        return time.perf_counter() - start


def in_kernel(pool: Any, task: Any, lm: Any, folder: Path) -> tuple[float, Any]:
    start = time.perf_counter()
    with dspy.context(lm=lm):
        run = dspex.compile(
            dspy.GEPA(**settings(task, lm)),
            task.make_program(),
            trainset=task.trainset,
            valset=task.valset,
            pool=pool,
            checkpoint_dir=folder,
        )
    run.result(timeout=600)
    return time.perf_counter() - start, run


class TimedCheckpoints(GEPAHooks):
    """Times what a run does for each iteration's checkpoint: the controller building it
    (gepa state, RNGs, sampler to JSON) and its encoding as a snapshot's body."""

    def __init__(self) -> None:
        self.build: list[float] = []
        self.encode: list[float] = []
        self.marks: list[float] = []

    def iteration_done(self, checkpoint: dict[str, Any], progress: dict[str, Any]) -> None:
        self.marks.append(time.perf_counter())
        canonical({"gepa": {"checkpoint": checkpoint}, "progress": progress})
        self.encode.append(time.perf_counter() - self.marks[-1])

    def shares(self) -> list[float]:
        """Checkpoint time over each iteration's own time. Between two marks lie the last
        encoding, the iteration's work and the next build."""
        out = []
        for i in range(1, len(self.marks)):
            work = self.marks[i] - self.marks[i - 1] - self.encode[i - 1] - self.build[i]
            out.append((self.build[i] + self.encode[i]) / max(work, 1e-9))
        return out


@contextlib.contextmanager
def timing_builds(hooks: TimedCheckpoints) -> Iterator[None]:
    """Time ``RunController.checkpoint`` (measurement only; restored after)."""
    build = RunController.checkpoint

    def timed(self: RunController, state: Any) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            return build(self, state)
        finally:
            hooks.build.append(time.perf_counter() - start)

    RunController.checkpoint = timed  # type: ignore[method-assign]
    try:
        yield
    finally:
        RunController.checkpoint = build  # type: ignore[method-assign]


def with_checkpoints(task: Any, lm: Any, log: Path) -> tuple[float, TimedCheckpoints]:
    hooks = TimedCheckpoints()
    optimizer = ResumableGEPA(**settings(task, lm))
    optimizer.hooks = hooks
    with timing_builds(hooks):
        seconds = in_process(optimizer, task, lm, log)
    return seconds, hooks


def resume_latency(pool: Any, task: Any, lm: Any, folder: Path) -> tuple[float, float]:
    with dspy.context(lm=lm):
        run = dspex.compile(
            dspy.GEPA(**settings(task, lm)),
            task.make_program(),
            trainset=task.trainset,
            valset=task.valset,
            pool=pool,
            checkpoint_dir=folder,
        )
    run.wait_for_event(lambda e: e["kind"] == "progress" and e.get("iteration") == 3, timeout=600)
    run.cancel(timeout=600)
    run.close()
    start = time.perf_counter()
    resumed = dspex.resume(
        folder,
        pool,
        teleprompter=dspy.GEPA(**settings(task, lm)),
        program=task.make_program(),
        lm=lm,
    )
    resumed.wait_for_event(lambda e: e["kind"] == "resumed", timeout=600)
    to_resumed = time.perf_counter() - start
    resumed.wait_for_event(lambda e: e["kind"] == "progress" and "iteration" in e, timeout=600)
    to_iteration = time.perf_counter() - start
    resumed.result(timeout=600)
    return to_resumed, to_iteration


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--latency", type=float, default=0.01, help="seconds per LM call")
    args = parser.parse_args()
    repeats = 1 if args.quick else 5
    task = make_task()
    lm = task.lm(latency_s=args.latency)
    print(
        f"env: python {sys.version.split()[0]}, dspy {dspy.__version__}, "
        f"LM latency {args.latency * 1000:.0f} ms/call, {repeats} repeat(s)"
    )
    spec = PoolSpec("bench-gepa", size=1, warmup=["dspy", "dspex_jupyter.runtime.gepa"])
    with PoolManager([spec]) as manager, tempfile.TemporaryDirectory() as tmp:
        pool = manager["bench-gepa"]
        log = Path(tmp) / "in-process.log"
        # One untimed run each first (lazy imports, caches), then alternating timed runs.
        in_process(dspy.GEPA(**settings(task, lm)), task, lm, log)
        in_kernel(pool, task, lm, Path(tmp) / "warmup")
        base, ours, plain, checked, shares = [], [], [], [], []
        for i in range(repeats):
            base.append(in_process(dspy.GEPA(**settings(task, lm)), task, lm, log))
            seconds, _ = in_kernel(pool, task, lm, Path(tmp) / f"run{i}")
            ours.append(seconds)
            plain.append(in_process(dspy.GEPA(**settings(task, lm)), task, lm, log))
            seconds_checked, hooks = with_checkpoints(task, lm, log)
            checked.append(seconds_checked)
            shares += hooks.shares()
            print(
                f"  run {i + 1}: in-process {base[-1]:.3f} s, dspex {ours[-1]:.3f} s; "
                f"in-process without checkpoints {plain[-1]:.3f} s, with {checked[-1]:.3f} s",
                flush=True,
            )
        to_resumed, to_iteration = resume_latency(pool, task, lm, Path(tmp) / "resume")

    ratio = statistics.median(ours) / statistics.median(base)
    share = statistics.median(shares)
    checked_ratio = statistics.median(checked) / statistics.median(plain)
    rows = [
        (
            f"whole run, dspex session (n={repeats})",
            f"{statistics.median(ours):.2f} s",
            "in-process dspy.GEPA.compile",
            f"{statistics.median(base):.2f} s",
            f"{ratio:.3f}",
            "<= 1.05",
            "PASS" if ratio <= 1.05 else "MISS",
        ),
        (
            "checkpoint per iteration (median)",
            f"{share:.2%} of iteration",
            f"max {max(shares):.2%}",
            "",
            "",
            "<= 2 %",
            "PASS" if share <= 0.02 else "MISS",
        ),
        (
            "whole run with checkpoints, in-process",
            f"{statistics.median(checked):.2f} s",
            "without",
            f"{statistics.median(plain):.2f} s",
            f"{checked_ratio:.3f}",
            "info",
            "",
        ),
        ("resume() to 'resumed'", f"{to_resumed * 1000:.0f} ms", "", "", "", "info", ""),
        (
            "resume() to next iteration done",
            f"{to_iteration * 1000:.0f} ms",
            "",
            "",
            "",
            "info",
            "",
        ),
    ]
    print_table(("benchmark", "dspex", "baseline", "value", "ratio", "target", ""), rows)
    return exit_code_after_leak_check()


if __name__ == "__main__":
    sys.exit(main())
