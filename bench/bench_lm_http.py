"""MIPROv2 over real HTTP: a dspex session vs in-process DSPy, and the cost of rate limits.

Run from the repository root::

    .venv/bin/python bench/bench_lm_http.py [--quick] [--repeats 3] [--latency 0.01]

Both sides use DSPy's own client, ``dspy.LM("openai/arithmetic", api_base=...)``, against
the loopback SIMULATED server (``dspex_jupyter.testing.lm_server``) run in its own process,
so neither the in-process baseline nor the session shares a GIL with the server. Every
answer comes after ``--latency`` seconds (10 ms: a harsh case for overheads; hosted LMs take
0.3-3 s a call).

(a) wall time of one seeded MIPROv2 run: ``dspex.MIPROv2(pool).optimize(...).result()``
    (pool started, kernel start excluded) vs ``dspy.teleprompt.MIPROv2(...).compile`` here;
    one untimed warm-up each, then alternating pairs. Target: ratio of medians <= 1.05.
(b) the same session run against a server that answers every 7th request with 429 and a
    ``Retry-After``: the run's extra time over a clean session run, against the sum of the
    Retry-After delays the server sent in that run. Target: <= 1.2 (DSPy 3.4.1 waits what
    Retry-After says; a fixed 1-2-4 s backoff would give several times the sum).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import os  # noqa: E402

# DSPy would download a model-price map from GitHub on the first call (5 s timeout).
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "true"

import dspy  # noqa: E402

from bench.common import mipro_in_process, print_table  # noqa: E402
from dspex_jupyter import MIPROv2, PoolManager, PoolSpec  # noqa: E402
from dspex_jupyter.testing import arithmetic  # noqa: E402
from dspex_jupyter.testing.lm_server import STATS_PATH  # noqa: E402
from dspex_jupyter.testing.mipro_settings import quick_settings  # noqa: E402

KEY = "sk-bench-not-a-secret"
OPTIONS, COMPILE = quick_settings()
OPTIONS["num_threads"] = 1
COMPILE["num_trials"] = 10


@contextlib.contextmanager
def server_process(latency: float, *extra: str) -> Iterator[str]:
    """The SIMULATED server in a child process; yields its ``api_base``."""
    command = [sys.executable, "-m", "dspex_jupyter.testing.lm_server", "--key", KEY]
    command += ["--latency", str(latency), *extra]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"the LM server did not start: {url!r}")
        yield url
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # its signal to stop
        proc.wait(timeout=30)


def stats(url: str) -> dict:
    request = urllib.request.Request(url.removesuffix("/v1") + STATS_PATH)
    request.add_header("Authorization", f"Bearer {KEY}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def http_lm(url: str) -> dspy.LM:
    return dspy.LM("openai/arithmetic", api_base=url, api_key=KEY, cache=False)


def in_session(pool, task, lm, folder: Path) -> float:
    optimizer = MIPROv2(pool, metric=task.metric, task_lm=lm, prompt_lm=lm, **OPTIONS)
    start = time.perf_counter()
    run = optimizer.optimize(
        task.make_program(), task.trainset, task.valset, checkpoint_dir=folder, **COMPILE
    )
    run.result(timeout=900)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one timed pair of each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.01, help="seconds per LM call")
    # Long enough that the delays stand out of a loaded machine's noise (about +-2 s a run).
    parser.add_argument("--retry-after", type=float, default=0.5, help="seconds, on each 429")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    task = arithmetic()
    print(
        f"env: python {sys.version.split()[0]}, dspy {dspy.__version__}, LM over HTTP "
        f"(loopback server process), latency {args.latency * 1000:.0f} ms/call, "
        f"{repeats} pair(s)"
    )
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "true"}
    with (
        server_process(args.latency) as clean_url,
        server_process(
            args.latency, "--rate-limit-every", "7", "--retry-after", str(args.retry_after)
        ) as limited_url,
        PoolManager([PoolSpec("bench-lm-http", size=1, env_vars=env)]) as manager,
        tempfile.TemporaryDirectory() as tmp,
    ):
        pool = manager["bench-lm-http"]
        pool.warmup(["dspy", "optuna", "dspex_jupyter.runtime.mipro", "dspex_jupyter.testing"])
        clean, limited = http_lm(clean_url), http_lm(limited_url)
        log = Path(tmp) / "in-process.log"
        mipro_in_process(
            task, clean, log, OPTIONS, COMPILE
        )  # warm-ups: lazy imports, first connections
        in_session(pool, task, clean, Path(tmp) / "warmup")
        in_session(pool, task, limited, Path(tmp) / "warmup-limited")
        base, ours, extra, waited = [], [], [], []
        for i in range(repeats):
            base.append(mipro_in_process(task, clean, log, OPTIONS, COMPILE))
            ours.append(in_session(pool, task, clean, Path(tmp) / f"clean{i}"))
            before = stats(limited_url)
            slow = in_session(pool, task, limited, Path(tmp) / f"limited{i}")
            after = stats(limited_url)
            extra.append(slow - ours[-1])
            waited.append(after["retry_after_sent"] - before["retry_after_sent"])
            print(
                f"  pair {i + 1}: in-process {base[-1]:.2f} s, dspex {ours[-1]:.2f} s, "
                f"dspex with 429s {slow:.2f} s (Retry-After sum {waited[-1]:.1f} s, "
                f"{after['requests'] - before['requests']} requests)",
                flush=True,
            )

    ratio = statistics.median(ours) / statistics.median(base)
    rate_ratio = statistics.median(e / w for e, w in zip(extra, waited, strict=True))
    rows = [
        (
            f"(a) MIPROv2 run over HTTP (n={repeats})",
            f"{statistics.median(ours):.2f} s",
            "in-process compile",
            f"{statistics.median(base):.2f} s",
            f"{ratio:.3f}",
            "<= 1.05",
            "PASS" if ratio <= 1.05 else "MISS",
        ),
        (
            "(b) extra time with 429 every 7th",
            f"{statistics.median(extra):.2f} s",
            "sum of Retry-After",
            f"{statistics.median(waited):.2f} s",
            f"{rate_ratio:.3f}",
            "<= 1.2",
            "PASS" if rate_ratio <= 1.2 else "MISS",
        ),
    ]
    print_table(("benchmark", "dspex", "baseline", "value", "ratio", "target", ""), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
