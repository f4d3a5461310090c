"""A MIPROv2 run whose evaluation is CPU-bound: eval pool of 2 kernels vs in-process threads.

Run from the repository root::

    .venv/bin/python bench/bench_eval_pool.py [--repeats 3] [--quick]

The metric does ~20 ms of deterministic pure-Python work per example
(``bench/eval_pool_helpers.py``), as a parser or a local scorer would. Baseline, in the
same process run: ``dspy.teleprompt.MIPROv2(num_threads=2).compile`` in this process (DSPy's
threads share one GIL). Measured: ``dspex.compile(..., pool="opt", eval_pool="eval")`` with
the same optimizer configuration, from the call to the result, pools already started, so
kernel start is excluded. Each repeat runs both (alternating, after one untimed warm-up
each); the results must be the same run (trials, scores, program). Prints the ratio of the
medians. Target: >= 1.7 x (2 cores: the limit is 2 x).
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

import dspy  # noqa: E402

import dspex_jupyter as dspex  # noqa: E402
from bench.common import print_table  # noqa: E402
from bench.eval_pool_helpers import cpu_metric  # noqa: E402
from dspex_jupyter import PoolManager, PoolSpec  # noqa: E402
from dspex_jupyter.testing import arithmetic  # noqa: E402
from dspex_jupyter.testing.mipro_settings import quick_settings  # noqa: E402

THREADS = 2


def settings(quick: bool) -> tuple[dict, dict]:
    options, compile_args = quick_settings()
    options["num_threads"] = THREADS
    # Evaluation is most of the run, as it is with a real program: minibatches of 40 and
    # full evaluations of the 80-example valset.
    compile_args.update(num_trials=6 if quick else 10, minibatch_size=40)
    return options, compile_args


def teleprompter(lm, options):
    return dspy.teleprompt.MIPROv2(
        metric=cpu_metric, prompt_model=lm, task_model=lm, verbose=False, **options
    )


def in_process(task, options, compile_args, log: Path):
    lm = task.lm()
    start = time.perf_counter()
    with open(log, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        best = teleprompter(lm, options).compile(
            task.make_program(), trainset=task.trainset, valset=task.valset, **compile_args
        )
    seconds = time.perf_counter() - start
    return seconds, {"state": best.dump_state(), "score": best.score}


def on_eval_pool(manager, task, options, compile_args, folder: Path):
    lm = task.lm()
    start = time.perf_counter()
    with dspy.context(lm=lm):
        run = dspex.compile(
            teleprompter(lm, options),
            task.make_program(),
            trainset=task.trainset,
            valset=task.valset,
            pool=manager["opt"],
            eval_pool="eval",
            checkpoint_dir=folder,
            **compile_args,
        )
    result = run.result(timeout=1800)
    seconds = time.perf_counter() - start
    shards = sum(1 for e in run.events if e["kind"] == "eval_shard")
    return seconds, {"state": result.state, "score": result.score}, shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer trials (a smoke run)")
    args = parser.parse_args()
    options, compile_args = settings(args.quick)
    task = arithmetic(n_train=50, n_val=80)
    print(f"load average before: {os.getloadavg()}")
    specs = [PoolSpec("opt", size=1, warmup=["dspy"]), PoolSpec("eval", size=2, warmup=["dspy"])]
    with tempfile.TemporaryDirectory() as tmp, PoolManager(specs) as manager:
        tmp_path = Path(tmp)
        log = tmp_path / "in-process.log"
        _, expected = in_process(task, options, compile_args, log)  # warm-up, untimed
        _, warm, _ = on_eval_pool(manager, task, options, compile_args, tmp_path / "warm")
        assert warm == expected, "the eval-pool run differs from the in-process run"
        local_s, pool_s = [], []
        for i in range(args.repeats):
            seconds, got = in_process(task, options, compile_args, log)
            assert got == expected
            local_s.append(seconds)
            seconds, got, shards = on_eval_pool(
                manager, task, options, compile_args, tmp_path / f"run{i}"
            )
            assert got == expected, "the eval-pool run differs from the in-process run"
            pool_s.append(seconds)
    rows = [
        [f"in-process DSPy, num_threads={THREADS}", *(f"{s:.2f}" for s in local_s)],
        ["dspex eval_pool of 2 kernels", *(f"{s:.2f}" for s in pool_s)],
    ]
    print_table(["run (seconds)", *(f"#{i + 1}" for i in range(args.repeats))], rows)
    ratio = statistics.median(local_s) / statistics.median(pool_s)
    pairs = ", ".join(f"{a / b:.2f}" for a, b in zip(local_s, pool_s, strict=True))
    print(f"per pair (in-process / eval pool, run i against run i): {pairs}")
    print(f"shards per eval-pool run: {shards}; same result: yes (trials' program and score)")
    print(
        f"median in-process {statistics.median(local_s):.2f} s, eval pool "
        f"{statistics.median(pool_s):.2f} s: {ratio:.2f} x faster (target >= 1.7 x)"
    )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
