"""Stream throughput and latency, against naive one-comm-message-per-event in the same run.

Run from the repository root::

    .venv/bin/python bench/bench_streams.py [--quick]

1. throughput: N small events streamed from a session kernel; events/s delivered, and loss
   (every event is checked, in order). Target: >= 50,000 events/s with zero loss.
2. latency at 100 events/s: a paced generator stamps each event; p50 of arrival - stamp.
   Target: p50 < 5 ms.
3. baseline: the naive way, one comm message per event sent back to back from the kernel
   and read with a plain jupyter_client: its rate and how many events IOPub dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import queue
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jupyter_client import KernelManager  # noqa: E402

from bench.common import print_table  # noqa: E402
from dspex_jupyter import PoolManager, PoolSpec  # noqa: E402

NAIVE_SENDER = """
from comm import create_comm
_c = create_comm(target_name="naive-bench")
for _i in range({n}):
    _c.send({{"i": _i, "phase": "trial", "score": 0.5}})
"""


def naive_comm_events(n: int) -> tuple[float, int]:
    """Send n comm messages from a kernel back to back; return (events/s, received)."""
    km = KernelManager(transport="ipc")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        msg_id = kc.execute(NAIVE_SENDER.format(n=n))
        received = 0
        start = last = time.perf_counter()
        replied = False
        while True:
            # IOPub may drop the "idle" status too: the shell's execute_reply is what says
            # the sender finished; after it, IOPub is drained until it goes quiet.
            try:
                msg = kc.get_iopub_msg(timeout=1.0)
            except queue.Empty:
                if replied:
                    break
                with contextlib.suppress(queue.Empty):
                    replied = kc.get_shell_msg(timeout=0)["parent_header"].get("msg_id") == msg_id
                continue
            kind = msg["header"]["msg_type"]
            if kind == "comm_msg":
                received += 1
                last = time.perf_counter()
            idle = kind == "status" and msg["content"]["execution_state"] == "idle"
            if idle and msg["parent_header"].get("msg_id") == msg_id:
                break
        elapsed = last - start  # to the last event that arrived, not the quiet wait after it
        return received / elapsed, received
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 100_000 if args.quick else 300_000
    n_naive = 20_000
    latency_events = 150 if args.quick else 400
    print(f"env: python {sys.version.split()[0]}, {datetime.datetime.now().isoformat()[:19]}")

    with PoolManager([PoolSpec("bench-streams", size=1)]) as manager:
        session = manager["bench-streams"].session()
        # Warm up imports and code paths.
        assert list(session.stream("bench.stream_helpers:events", 2000))[-1]["i"] == 1999

        rates = []
        for _ in range(1 if args.quick else 3):
            start = time.perf_counter()
            expected = 0
            for event in session.stream("bench.stream_helpers:events", n):
                if event["i"] != expected:
                    raise SystemExit(f"stream lost or reordered events at {expected}")
                expected += 1
            rates.append(n / (time.perf_counter() - start))
            assert expected == n
        throughput = statistics.median(rates)

        delays = []
        for event in session.stream("bench.stream_helpers:paced", latency_events, 100.0):
            delays.append((time.time() - event["t"]) * 1000)
        delays.sort()
        p50, p90 = delays[len(delays) // 2], delays[int(len(delays) * 0.9)]
        session.release()

    naive_rate, naive_received = naive_comm_events(n_naive)
    loss = 1 - naive_received / n_naive

    rows = [
        (
            "dspex stream throughput",
            f"{throughput:,.0f} events/s",
            f"0 lost of {n:,}",
            "naive comm per event",
            f"{naive_rate:,.0f} events/s",
            f"{loss:.1%} lost of {n_naive:,}",
            f"{throughput / naive_rate:.2f}x",
            ">= 50,000/s, 0 lost",
            "PASS" if throughput >= 50_000 else "MISS",
        ),
        (
            "dspex latency at 100 events/s",
            f"p50 {p50:.2f} ms",
            f"p90 {p90:.2f} ms",
            "",
            "",
            "",
            "",
            "p50 < 5 ms",
            "PASS" if p50 < 5 else "MISS",
        ),
    ]
    header = ("benchmark", "value", "detail", "baseline", "value", "detail", "ratio", "target", "")
    print_table(header, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
